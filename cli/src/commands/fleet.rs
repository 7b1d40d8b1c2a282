//! Fleet-wide questions for the seed: `pkgmesh nodes`, `where`, `audit`, and `preheat`
//! (which asks the seed for the nodes, then each chosen node directly to fetch).

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use pkgmesh_node::client::SeedClient;
use pkgmesh_node::pki::Role;
use pkgmesh_node::transport;
use pkgmesh_protocol::blob::BlobId;
use pkgmesh_protocol::units::HumanBytes;
use pkgmesh_protocol::wire::{NodeSummary, PreheatReply, Request, Response, WhereQuery};
use serde::Serialize;

use crate::mesh::{load_identity, resolve, runtime, SeedArgs};
use crate::output::{print_json, print_table};

#[derive(Args)]
pub struct WhereArgs {
    #[command(flatten)]
    seed: SeedArgs,
    /// A blob id (64 hex digits), NAME@VERSION, or NAME for its default version.
    target: String,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct AuditArgs {
    #[command(flatten)]
    seed: SeedArgs,
    /// Only records at or after this time: unix seconds or RFC 3339 (2026-11-26T10:00:00Z).
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Most records to print.
    #[arg(long, default_value_t = 1000)]
    limit: u32,
    #[arg(long)]
    json: bool,
}

fn where_query(target: &str) -> WhereQuery {
    if let Ok(blob) = target.parse::<BlobId>() {
        return WhereQuery::Blob(blob);
    }
    match target.split_once('@') {
        Some((name, version)) => WhereQuery::Package {
            name: name.into(),
            version: Some(version.into()),
        },
        None => WhereQuery::Package {
            name: target.into(),
            version: None,
        },
    }
}

pub fn run_where(args: WhereArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        let client = args.seed.connect().await?;
        let response = client
            .call(&Request::Where(where_query(&args.target)))
            .await;
        client.close().await;
        let Response::Holders(holders) = response? else {
            bail!("the seed answered with something other than a holder list");
        };
        if args.json {
            print_json(&serde_json::json!({ "target": args.target, "holders": holders }))?;
        } else if holders.is_empty() {
            println!("no node holds any of {}", args.target);
        } else {
            let rows: Vec<Vec<String>> = holders
                .iter()
                .map(|h| {
                    vec![
                        h.node.clone(),
                        h.site.clone(),
                        h.blob.short(),
                        format!("{}/{}", h.chunks_held, h.chunks_total),
                        format!("{}s ago", h.last_seen_secs_ago),
                    ]
                })
                .collect();
            print_table(&["NODE", "SITE", "BLOB", "CHUNKS", "SEEN"], &rows);
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn parse_since(text: &str) -> anyhow::Result<u64> {
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(secs);
    }
    let time = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .with_context(|| {
            format!("--since {text:?} is neither unix seconds nor RFC 3339 (2026-11-26T10:00:00Z)")
        })?;
    Ok(time.unix_timestamp().max(0) as u64)
}

pub fn run_audit(args: AuditArgs) -> anyhow::Result<ExitCode> {
    let since = args.since.as_deref().map(parse_since).transpose()?;
    runtime()?.block_on(async move {
        let client = args.seed.connect().await?;
        let response = client
            .call(&Request::Audit {
                since,
                limit: args.limit,
            })
            .await;
        client.close().await;
        let Response::AuditRecords(records) = response? else {
            bail!("the seed answered with something other than audit records");
        };
        if args.json {
            print_json(&serde_json::json!({ "records": records }))?;
        } else {
            print_audit_table(&records);
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Audit records as a table, for the seed's log and a node's.
pub fn print_audit_table(records: &[pkgmesh_protocol::wire::AuditRecord]) {
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            vec![
                crate::output::rfc3339(r.time),
                r.caller.clone(),
                r.roles.join(","),
                r.action.clone(),
                r.target.clone(),
                r.outcome.clone(),
            ]
        })
        .collect();
    print_table(
        &["TIME", "CALLER", "ROLES", "ACTION", "TARGET", "OUTCOME"],
        &rows,
    );
}

#[derive(Args)]
pub struct NodesArgs {
    #[command(flatten)]
    seed: SeedArgs,
    #[arg(long)]
    json: bool,
}

async fn list_nodes(client: &SeedClient) -> anyhow::Result<Vec<NodeSummary>> {
    match client.call(&Request::ListNodes).await? {
        Response::Nodes(nodes) => Ok(nodes),
        other => bail!("the seed answered a node list request with {other:?}"),
    }
}

fn tags_text(tags: &[(String, String)]) -> String {
    if tags.is_empty() {
        return "-".into();
    }
    tags.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

pub fn run_nodes(args: NodesArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        let client = args.seed.connect().await?;
        let nodes = list_nodes(&client).await;
        client.close().await;
        let nodes = nodes?;
        if args.json {
            print_json(&serde_json::json!({ "nodes": nodes }))?;
        } else if nodes.is_empty() {
            println!("the seed's tracker knows no node (nodes announce within 20 s of starting)");
        } else {
            let rows: Vec<Vec<String>> = nodes
                .iter()
                .map(|n| {
                    vec![
                        n.node.clone(),
                        n.site.clone(),
                        n.listen.clone(),
                        tags_text(&n.tags),
                        format!("{}s ago", n.last_seen_secs_ago),
                        format!("{} ({} complete)", n.blobs, n.complete_blobs),
                        HumanBytes(n.bytes_held).to_string(),
                    ]
                })
                .collect();
            print_table(
                &["NODE", "SITE", "LISTEN", "TAGS", "SEEN", "BLOBS", "CACHED"],
                &rows,
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[derive(Args)]
pub struct PreheatArgs {
    #[command(flatten)]
    seed: SeedArgs,
    /// NAME or NAME@VERSION (the default version when left out).
    target: String,
    /// Only nodes of this site (repeatable); every site when left out.
    #[arg(long = "site", value_name = "SITE")]
    sites: Vec<String>,
    /// Nodes to preheat in each site; 0 preheats all of them. The rest of a site then fetch
    /// from those, over the site's own network.
    #[arg(long, default_value_t = 1, value_name = "N")]
    per_site: usize,
    /// Wait until every chosen node holds the whole file (asking them again every half second).
    #[arg(long)]
    wait: bool,
    /// With --wait: give up after this many seconds (exit 1).
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    timeout: u64,
    #[arg(long)]
    json: bool,
}

/// How one chosen node took a preheat.
#[derive(Debug, Clone, Serialize)]
struct PreheatResult {
    node: String,
    site: String,
    listen: String,
    /// `started` (downloading), `complete` (holds every chunk) or `failed`.
    state: &'static str,
    reply: Option<PreheatReply>,
    error: Option<String>,
}

/// Dialling a node and its answer to a preheat request.
const NODE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often --wait asks the nodes again.
const WAIT_POLL: Duration = Duration::from_millis(500);

/// `count` nodes of each site (all with 0), in name order, from the sites asked for.
fn choose_nodes(nodes: Vec<NodeSummary>, sites: &[String], count: usize) -> Vec<NodeSummary> {
    let mut by_site: BTreeMap<String, Vec<NodeSummary>> = BTreeMap::new();
    for node in nodes {
        if sites.is_empty() || sites.contains(&node.site) {
            by_site.entry(node.site.clone()).or_default().push(node);
        }
    }
    by_site
        .into_values()
        .flat_map(|mut members| {
            members.sort_by(|a, b| a.node.cmp(&b.node));
            if count > 0 {
                members.truncate(count);
            }
            members
        })
        .collect()
}

/// Asks one node, over a connection to the address the tracker gave, to preheat.
async fn ask_node(
    conn: &transport::PeerConnection,
    node: &NodeSummary,
    name: &str,
    version: Option<String>,
) -> anyhow::Result<PreheatReply> {
    let addr = conn.connection.remote_address();
    if conn.peer.name != node.node {
        bail!(
            "{addr} answered as {}, not {}: the tracker's address is stale",
            conn.peer.name,
            node.node
        );
    }
    let request = Request::Preheat {
        name: name.to_string(),
        version,
    };
    match transport::request(conn, &request, NODE_TIMEOUT).await? {
        (Response::Preheating(reply), _, _) => Ok(reply),
        (Response::Error(reply), _, _) => Err(anyhow!("{}", reply.message)),
        (other, _, _) => bail!("answered {other:?}"),
    }
}

pub fn run_preheat(args: PreheatArgs) -> anyhow::Result<ExitCode> {
    let (name, version) = match args.target.split_once('@') {
        Some((name, version)) => (name.to_string(), Some(version.to_string())),
        None => (args.target.clone(), None),
    };
    if name.is_empty() || version.as_deref() == Some("") {
        return Err(
            crate::UsageError(format!("{:?} is not NAME or NAME@VERSION", args.target)).into(),
        );
    }
    let identity = load_identity(&args.seed.identity)?;
    runtime()?.block_on(async move {
        let client = args.seed.connect().await?;
        let nodes = list_nodes(&client).await;
        client.close().await;
        let nodes = nodes?;
        let known_sites: BTreeSet<String> = nodes.iter().map(|n| n.site.clone()).collect();
        let chosen = choose_nodes(nodes, &args.sites, args.per_site);
        if chosen.is_empty() {
            if args.sites.is_empty() {
                bail!("the seed's tracker knows no node to preheat (see `pkgmesh nodes`)");
            }
            bail!(
                "no node known in site(s) {} (sites with nodes: {})",
                args.sites.join(", "),
                if known_sites.is_empty() {
                    "none".to_string()
                } else {
                    known_sites.into_iter().collect::<Vec<_>>().join(", ")
                }
            );
        }
        let bind: std::net::SocketAddr = ([0, 0, 0, 0], 0).into();
        let endpoint = transport::make_endpoint(bind, &identity)?;
        // Asks the chosen nodes at once; each answers as soon as its download started (or
        // joined the one in flight), with what it holds so far.
        let ask_all = |nodes: Vec<NodeSummary>| {
            let mut asks = tokio::task::JoinSet::new();
            for (i, node) in nodes.into_iter().enumerate() {
                let endpoint = endpoint.clone();
                let (name, version) = (name.clone(), version.clone());
                asks.spawn(async move {
                    let answer = async {
                        let addr = resolve(&node.listen)?;
                        let conn = transport::connect(&endpoint, addr, Role::Node, NODE_TIMEOUT)
                            .await
                            .with_context(|| {
                                format!("cannot reach node {} at {addr}", node.node)
                            })?;
                        let answer = ask_node(&conn, &node, &name, version).await;
                        conn.connection.close(0u32.into(), b"done");
                        answer
                    };
                    (i, answer.await)
                });
            }
            async move {
                let mut answers = BTreeMap::new();
                while let Some(joined) = asks.join_next().await {
                    match joined {
                        Ok((i, answer)) => {
                            answers.insert(i, answer);
                        }
                        Err(error) => tracing::warn!(%error, "a preheat request task failed"),
                    }
                }
                answers
            }
        };
        let mut results: Vec<PreheatResult> = chosen
            .iter()
            .map(|node| PreheatResult {
                node: node.node.clone(),
                site: node.site.clone(),
                listen: node.listen.clone(),
                state: "failed",
                reply: None,
                error: Some("not asked".into()),
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(args.timeout);
        let mut pending: Vec<usize> = (0..chosen.len()).collect();
        let mut first = true;
        let mut timed_out = false;
        loop {
            let asked: Vec<NodeSummary> = pending.iter().map(|&i| chosen[i].clone()).collect();
            let mut answers = ask_all(asked).await;
            let mut still = Vec::new();
            for (k, &i) in pending.iter().enumerate() {
                let result = &mut results[i];
                match answers.remove(&k) {
                    Some(Ok(reply)) => {
                        let whole = reply.chunks_held >= reply.chunks;
                        result.state = if whole { "complete" } else { "started" };
                        result.reply = Some(reply);
                        result.error = None;
                        if !whole {
                            still.push(i);
                        }
                    }
                    // A node that failed the first ask is reported; one that stops answering
                    // while we wait keeps its last state and is asked again.
                    Some(Err(error)) if first => {
                        result.error = Some(format!("{error:#}"));
                    }
                    Some(Err(_)) | None => still.push(i),
                }
            }
            first = false;
            pending = still;
            if !args.wait || pending.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                timed_out = true;
                break;
            }
            tokio::time::sleep(WAIT_POLL).await;
        }
        endpoint.close(0u32.into(), b"done");
        let failed = results.iter().any(|r| r.state == "failed");
        if args.json {
            print_json(&serde_json::json!({
                "name": name,
                "version": version,
                "nodes": results,
                "timed_out": timed_out,
            }))?;
        } else {
            let rows: Vec<Vec<String>> = results
                .iter()
                .map(|r| {
                    let (file, held) = match &r.reply {
                        Some(reply) => (
                            format!("{} {} ({})", reply.version, reply.file, reply.blob.short()),
                            format!(
                                "{}/{} of {}",
                                reply.chunks_held,
                                reply.chunks,
                                HumanBytes(reply.size)
                            ),
                        ),
                        None => ("-".into(), "-".into()),
                    };
                    vec![
                        r.node.clone(),
                        r.site.clone(),
                        file,
                        held,
                        match &r.error {
                            Some(error) => format!("failed: {error}"),
                            None => r.state.to_string(),
                        },
                    ]
                })
                .collect();
            print_table(
                &["NODE", "SITE", "VERSION / FILE", "CHUNKS HELD", "RESULT"],
                &rows,
            );
            if timed_out {
                println!(
                    "gave up waiting after {} s: `pkgmesh where {}` shows how far they got",
                    args.timeout, args.target
                );
            } else if results.iter().any(|r| r.state == "started") {
                println!(
                    "the downloads run in the background: `pkgmesh where {}` shows their progress",
                    args.target
                );
            }
        }
        Ok(if failed || timed_out {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    })
}
