//! `pkgmesh cache ls | stats | verify | evict | pin | unpin`: a node's chunk cache, through its
//! admin socket.
//!
//! A BLOB argument is a full blob id or a unique prefix of one (at least 4 hex digits) among
//! the node's cached blobs, as `cache ls` prints them. `verify` exits 1 when any chunk rotted.

use std::process::ExitCode;

use anyhow::bail;
use clap::{Args, Subcommand};
use pkgmesh_cache::VerifyReport;
use pkgmesh_node::admin::client::AdminClient;
use pkgmesh_node::admin::{
    BlobOrder, CacheEntry, CacheReport, Evicted, Pins, VerifyOrder, OPERATOR_PIN,
};
use pkgmesh_protocol::blob::BlobId;
use pkgmesh_protocol::units::HumanBytes;

use super::local::NodeTarget;
use crate::mesh::runtime;
use crate::output::{print_json, print_table, rfc3339};

#[derive(Subcommand)]
pub enum CacheCommand {
    /// Every blob in the node's cache: package, size, chunks held, pins, last access.
    Ls(CacheArgs),
    /// Cache totals and traffic: hits, misses, evictions, bytes by source, bytes served.
    Stats(CacheArgs),
    /// Re-hash cached chunks (all blobs, or one); rotted chunks are dropped and listed (exit 1).
    Verify(VerifyArgs),
    /// Delete a blob from the node's cache (refused while it is pinned or downloading).
    Evict(BlobArgs),
    /// Keep a blob in the cache whatever the budget needs, with a reason.
    Pin(PinArgs),
    /// Remove one pin reason from a blob.
    Unpin(PinArgs),
}

#[derive(Args)]
pub struct CacheArgs {
    #[command(flatten)]
    target: NodeTarget,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct VerifyArgs {
    /// Only this blob (id or unique prefix); all blobs when left out.
    blob: Option<String>,
    #[command(flatten)]
    target: NodeTarget,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct BlobArgs {
    /// Blob id, or a unique prefix of one (see `pkgmesh cache ls`).
    blob: String,
    #[command(flatten)]
    target: NodeTarget,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct PinArgs {
    /// Blob id, or a unique prefix of one (see `pkgmesh cache ls`).
    blob: String,
    /// Why it is pinned (a short label); pins are counted per reason.
    #[arg(long, default_value = OPERATOR_PIN)]
    reason: String,
    #[command(flatten)]
    target: NodeTarget,
    #[arg(long)]
    json: bool,
}

pub fn run(command: CacheCommand) -> anyhow::Result<ExitCode> {
    match command {
        CacheCommand::Ls(args) => run_ls(args),
        CacheCommand::Stats(args) => run_stats(args),
        CacheCommand::Verify(args) => run_verify(args),
        CacheCommand::Evict(args) => run_evict(args),
        CacheCommand::Pin(args) => run_pin(args, true),
        CacheCommand::Unpin(args) => run_pin(args, false),
    }
}

/// A full blob id, or the one cached blob `text` is a prefix of.
async fn resolve_blob(client: &AdminClient, text: &str) -> anyhow::Result<BlobId> {
    if let Ok(blob) = text.parse::<BlobId>() {
        return Ok(blob);
    }
    let prefix = text.to_ascii_lowercase();
    if prefix.len() < 4 || prefix.len() > 64 || !prefix.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(crate::UsageError(format!(
            "{text:?} is not a blob id: give 64 hex digits, or at least 4 of its first"
        ))
        .into());
    }
    let cached: Vec<CacheEntry> = client.get("/v1/cache").await?;
    let matches: Vec<&CacheEntry> = cached
        .iter()
        .filter(|e| e.blob.starts_with(&prefix))
        .collect();
    match matches.as_slice() {
        [one] => Ok(one.blob.parse()?),
        [] => bail!("no blob in this node's cache starts with {prefix} (see `pkgmesh cache ls`)"),
        many => bail!(
            "{} cached blobs start with {prefix}: give more digits ({})",
            many.len(),
            many.iter()
                .map(|e| &e.blob[..16])
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn package_label(entry: &CacheEntry) -> String {
    match entry.packages.as_slice() {
        [] => "-".into(),
        [one] => format!("{} {}", one.name, one.version),
        [first, rest @ ..] => format!("{} {} (+{} more)", first.name, first.version, rest.len()),
    }
}

fn run_ls(args: CacheArgs) -> anyhow::Result<ExitCode> {
    let client = args.target.client()?;
    let blobs: Vec<CacheEntry> = runtime()?.block_on(client.get("/v1/cache"))?;
    if args.json {
        print_json(&serde_json::json!({ "blobs": blobs }))?;
    } else if blobs.is_empty() {
        println!("the node's cache is empty");
    } else {
        let rows: Vec<Vec<String>> = blobs
            .iter()
            .map(|b| {
                vec![
                    b.blob[..16].to_string(),
                    package_label(b),
                    b.packages
                        .first()
                        .map(|p| p.file.clone())
                        .unwrap_or_else(|| "-".into()),
                    HumanBytes(b.size).to_string(),
                    format!("{}/{}", b.chunks_held, b.chunks_total),
                    if b.pins.is_empty() {
                        "-".into()
                    } else {
                        b.pins.join(", ")
                    },
                    b.last_access.map(rfc3339).unwrap_or_else(|| "never".into()),
                ]
            })
            .collect();
        print_table(
            &[
                "BLOB",
                "PACKAGE",
                "FILE",
                "SIZE",
                "CHUNKS",
                "PINNED",
                "LAST ACCESS",
            ],
            &rows,
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn run_stats(args: CacheArgs) -> anyhow::Result<ExitCode> {
    let client = args.target.client()?;
    let report: CacheReport = runtime()?.block_on(client.get("/v1/cache/stats"))?;
    if args.json {
        print_json(&report)?;
        return Ok(ExitCode::SUCCESS);
    }
    let t = &report.totals;
    let bytes = |n: u64| format!("{} ({n} bytes)", HumanBytes(n));
    print_table(
        &["FIELD", "VALUE"],
        &[
            vec![
                "cache".into(),
                format!(
                    "{} of {} ({} pinned)",
                    HumanBytes(report.used_bytes),
                    HumanBytes(report.budget_bytes),
                    HumanBytes(report.pinned_bytes)
                ),
            ],
            vec![
                "blobs".into(),
                format!(
                    "{} ({} complete, {} chunks)",
                    report.blobs, report.complete_blobs, report.chunks
                ),
            ],
            vec!["hits".into(), report.hits.to_string()],
            vec!["misses".into(), report.misses.to_string()],
            vec![
                "evictions".into(),
                format!(
                    "{} chunks, {}",
                    report.evicted_chunks,
                    HumanBytes(report.evicted_bytes)
                ),
            ],
            vec!["rotted chunks".into(), report.rotted_chunks.to_string()],
            vec![
                "from peers, same site".into(),
                bytes(t.bytes_from_same_site_peers),
            ],
            vec![
                "from peers, other sites".into(),
                bytes(t.bytes_from_other_site_peers),
            ],
            vec!["from the seed".into(), bytes(t.bytes_from_seed)],
            vec![
                "served to peers".into(),
                format!("{} in {} chunks", bytes(t.bytes_served), t.chunks_served),
            ],
            vec!["uploads refused".into(), t.uploads_refused.to_string()],
            vec![
                "chunks verified".into(),
                format!(
                    "{} ({} failed requests)",
                    t.chunks_received, t.chunk_failures
                ),
            ],
            vec![
                "transfers completed".into(),
                t.transfers_completed.to_string(),
            ],
        ],
    );
    Ok(ExitCode::SUCCESS)
}

fn run_verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let client = args.target.client()?;
    let report: VerifyReport = runtime()?.block_on(async {
        let blob = match &args.blob {
            Some(text) => Some(resolve_blob(&client, text).await?.to_hex()),
            None => None,
        };
        client.post("/v1/cache/verify", &VerifyOrder { blob }).await
    })?;
    let intact = report.rotted.is_empty() && report.unknown.is_empty();
    if args.json {
        print_json(&report)?;
    } else {
        println!(
            "checked {} blobs, {} chunks ({})",
            report.blobs_checked,
            report.chunks_checked,
            HumanBytes(report.bytes_checked)
        );
        for blob in &report.unknown {
            println!("blob {blob} is not in this node's cache");
        }
        if report.rotted.is_empty() {
            if report.unknown.is_empty() {
                println!("every chunk is intact");
            }
        } else {
            println!(
                "{} chunks failed verification and were dropped (they will be fetched again when needed):",
                report.rotted.len()
            );
            let rows: Vec<Vec<String>> = report
                .rotted
                .iter()
                .map(|r| vec![r.id.to_hex(), r.index.to_string(), r.detail.clone()])
                .collect();
            print_table(&["BLOB", "CHUNK", "PROBLEM"], &rows);
        }
    }
    Ok(if intact {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn run_evict(args: BlobArgs) -> anyhow::Result<ExitCode> {
    let client = args.target.client()?;
    let evicted: Evicted = runtime()?.block_on(async {
        let blob = resolve_blob(&client, &args.blob).await?;
        client
            .post(
                "/v1/cache/evict",
                &BlobOrder {
                    blob: blob.to_hex(),
                    reason: None,
                },
            )
            .await
    })?;
    if args.json {
        print_json(&evicted)?;
    } else {
        println!(
            "evicted blob {}: {} freed",
            evicted.blob,
            HumanBytes(evicted.freed_bytes)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn run_pin(args: PinArgs, pin: bool) -> anyhow::Result<ExitCode> {
    let client = args.target.client()?;
    let path = if pin {
        "/v1/cache/pin"
    } else {
        "/v1/cache/unpin"
    };
    let pins: Pins = runtime()?.block_on(async {
        let blob = resolve_blob(&client, &args.blob).await?;
        client
            .post(
                path,
                &BlobOrder {
                    blob: blob.to_hex(),
                    reason: Some(args.reason.clone()),
                },
            )
            .await
    })?;
    if args.json {
        print_json(&pins)?;
    } else {
        let now = if pins.pins.is_empty() {
            "no pins left: it can be evicted again".to_string()
        } else {
            format!("pins: {}", pins.pins.join(", "))
        };
        println!(
            "blob {} {} ({:?}); {now}",
            pins.blob,
            if pin { "pinned" } else { "unpinned" },
            args.reason
        );
    }
    Ok(ExitCode::SUCCESS)
}
