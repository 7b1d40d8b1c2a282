//! Fleet-wide questions for the seed: `pkgmesh where` and `pkgmesh audit`.

use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use pkgmesh_protocol::blob::BlobId;
use pkgmesh_protocol::wire::{Request, Response, WhereQuery};

use crate::mesh::{runtime, SeedArgs};
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

fn parse_since(text: &str) -> anyhow::Result<u64> {
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
        Ok(ExitCode::SUCCESS)
    })
}
