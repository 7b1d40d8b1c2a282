//! Commands that ask a running node through its admin socket: `status`, `transfers`,
//! `peers` and `install-log` (the cache commands are in `cache`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use pkgmesh_node::admin::client::AdminClient;
use pkgmesh_node::admin::{InstallLog, NodeStatus, PeerEntry};
use pkgmesh_node::peer::transfers::TransferStatus;
use pkgmesh_node::peer::NodeSettings;
use pkgmesh_protocol::units::HumanBytes;

use crate::mesh::runtime;
use crate::output::{print_json, print_table, rfc3339};

/// Which node to ask.
#[derive(Args, Clone)]
pub struct NodeTarget {
    /// The node's admin socket. Default: <data>/admin.sock.
    #[arg(long, value_name = "SOCKET")]
    pub node: Option<PathBuf>,
    /// The node's data directory (its admin socket is inside).
    #[arg(long, env = "PKGMESH_DATA", value_name = "DIR")]
    pub data: Option<PathBuf>,
}

impl NodeTarget {
    pub fn client(&self) -> anyhow::Result<AdminClient> {
        match (&self.node, &self.data) {
            (Some(socket), _) => Ok(AdminClient::new(socket)),
            (None, Some(data)) => Ok(AdminClient::new(NodeSettings::admin_socket_in(data))),
            (None, None) => Err(crate::UsageError(
                "say which node: --node SOCKET or --data DIR (or PKGMESH_DATA)".into(),
            )
            .into()),
        }
    }
}

#[derive(Args)]
pub struct LocalArgs {
    #[command(flatten)]
    target: NodeTarget,
    #[arg(long)]
    json: bool,
}

pub fn run_status(args: LocalArgs) -> anyhow::Result<ExitCode> {
    let client = args.target.client()?;
    let status: NodeStatus = runtime()?.block_on(client.get("/v1/status"))?;
    if args.json {
        print_json(&status)?;
    } else {
        print_table(
            &["FIELD", "VALUE"],
            &[
                vec!["node".into(), status.node],
                vec!["site".into(), status.site],
                vec!["listen".into(), status.listen],
                vec![
                    "seed".into(),
                    format!(
                        "{} ({})",
                        status.seed,
                        if status.seed_connected {
                            "connected"
                        } else {
                            "not connected"
                        }
                    ),
                ],
                vec![
                    "cache".into(),
                    format!(
                        "{} of {} in {} blobs",
                        HumanBytes(status.cache_used_bytes),
                        HumanBytes(status.cache_budget_bytes),
                        status.cache_blobs
                    ),
                ],
                vec![
                    "transfers".into(),
                    format!("{} in flight", status.transfers_in_flight),
                ],
            ],
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_transfers(args: LocalArgs) -> anyhow::Result<ExitCode> {
    let client = args.target.client()?;
    let transfers: Vec<TransferStatus> = runtime()?.block_on(client.get("/v1/transfers"))?;
    if args.json {
        print_json(&transfers)?;
    } else if transfers.is_empty() {
        println!("no transfers in flight");
    } else {
        let rows: Vec<Vec<String>> = transfers
            .iter()
            .map(|t| {
                vec![
                    t.blob.chars().take(16).collect(),
                    format!("{}/{}", t.chunks_held, t.chunks),
                    HumanBytes(t.bytes_held()).to_string(),
                    HumanBytes(t.size).to_string(),
                    t.peers_in_use.to_string(),
                    HumanBytes(t.bytes_from_local_peers + t.bytes_from_remote_peers).to_string(),
                    HumanBytes(t.bytes_from_seed).to_string(),
                    format!("{:.1}", t.seconds),
                ]
            })
            .collect();
        print_table(
            &[
                "BLOB",
                "CHUNKS",
                "HELD",
                "SIZE",
                "PEERS",
                "FROM PEERS",
                "FROM SEED",
                "SECS",
            ],
            &rows,
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_peers(args: LocalArgs) -> anyhow::Result<ExitCode> {
    let client = args.target.client()?;
    let peers: Vec<PeerEntry> = runtime()?.block_on(client.get("/v1/peers"))?;
    if args.json {
        print_json(&serde_json::json!({ "peers": peers }))?;
    } else if peers.is_empty() {
        println!("no peers known yet: the node learns them from the tracker as it fetches");
    } else {
        let rows: Vec<Vec<String>> = peers
            .iter()
            .map(|p| {
                let r = &p.record;
                vec![
                    r.node.clone(),
                    p.site.clone().unwrap_or_else(|| "?".into()),
                    match r.same_site {
                        Some(true) => "yes".into(),
                        Some(false) => "no".into(),
                        None => "?".into(),
                    },
                    format!("{} ({})", r.chunks_received, HumanBytes(r.bytes_received)),
                    format!("{} ({})", r.chunks_sent, HumanBytes(r.bytes_sent)),
                    r.rate_bytes_per_sec
                        .map(|rate| format!("{}/s", HumanBytes(rate as u64)))
                        .unwrap_or_else(|| "-".into()),
                    format!("{} ({} timeouts)", r.failures, r.timeouts),
                    match (&r.banned, &r.banned_blob) {
                        (Some(reason), Some(blob)) => {
                            format!("{reason} (blob {})", &blob[..blob.len().min(12)])
                        }
                        (Some(reason), None) => reason.clone(),
                        _ => "-".into(),
                    },
                    if r.last_exchange == 0 {
                        "never".into()
                    } else {
                        rfc3339(r.last_exchange)
                    },
                ]
            })
            .collect();
        print_table(
            &[
                "PEER",
                "SITE",
                "SAME SITE",
                "RECEIVED",
                "SENT",
                "RATE",
                "FAILURES",
                "BANNED",
                "LAST EXCHANGE",
            ],
            &rows,
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct InstallLogArgs {
    /// Package name.
    name: String,
    #[command(flatten)]
    target: NodeTarget,
    #[arg(long)]
    json: bool,
}

/// The scripts the last install, update or uninstall of a package ran, with their output.
pub fn run_install_log(args: InstallLogArgs) -> anyhow::Result<ExitCode> {
    let client = args.target.client()?;
    let path = format!("/v1/installed/{}/log", url_segment(&args.name));
    let log: InstallLog = runtime()?.block_on(client.get(&path))?;
    if args.json {
        print_json(&log)?;
        return Ok(ExitCode::SUCCESS);
    }
    let record = &log.record;
    println!(
        "{}: {} {}{}",
        record.name,
        record.state,
        record
            .installed_version
            .as_deref()
            .or(record.target_version.as_deref())
            .unwrap_or("-"),
        record
            .message
            .as_deref()
            .map(|m| format!(" ({m})"))
            .unwrap_or_default()
    );
    if log.actions.is_empty() {
        println!("its last operation ran no script");
    }
    for action in &log.actions {
        println!(
            "--- {} {}: {} at {} ---",
            action.action,
            action.version,
            action.status,
            rfc3339(action.finished_at)
        );
        match (&action.log, &action.log_error) {
            (Some(text), _) if text.is_empty() => println!("(no output)"),
            (Some(text), _) => print!("{}{}", text, if text.ends_with('\n') { "" } else { "\n" }),
            (None, Some(error)) => println!("({error})"),
            (None, None) => println!("(no log was kept)"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A package name as one URL path segment. Package names are `[a-zA-Z0-9_.-]` only, so
/// anything else is escaped (and the node then says no such package).
fn url_segment(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[derive(Args)]
pub struct NodeAuditArgs {
    #[command(flatten)]
    target: NodeTarget,
    /// Only records at or after this time: unix seconds or RFC 3339 (2026-11-26T10:00:00Z).
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Most records to print.
    #[arg(long, default_value_t = 1000)]
    limit: usize,
    #[arg(long)]
    json: bool,
}

pub fn run_node_audit(args: NodeAuditArgs) -> anyhow::Result<ExitCode> {
    let since = args
        .since
        .as_deref()
        .map(super::fleet::parse_since)
        .transpose()?;
    let client = args.target.client()?;
    let mut path = format!("/v1/audit?limit={}", args.limit);
    if let Some(since) = since {
        path.push_str(&format!("&since={since}"));
    }
    let records: Vec<pkgmesh_protocol::wire::AuditRecord> =
        runtime()?.block_on(client.get(&path))?;
    if args.json {
        print_json(&serde_json::json!({ "records": records }))?;
    } else {
        super::fleet::print_audit_table(&records);
    }
    Ok(ExitCode::SUCCESS)
}
