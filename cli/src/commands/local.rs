//! Commands that ask a running node through its admin socket: `status`, `transfers`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use pkgmesh_node::admin::client::AdminClient;
use pkgmesh_node::admin::NodeStatus;
use pkgmesh_node::peer::transfers::TransferStatus;
use pkgmesh_node::peer::NodeSettings;
use pkgmesh_protocol::units::HumanBytes;

use crate::mesh::runtime;
use crate::output::{print_json, print_table};

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
