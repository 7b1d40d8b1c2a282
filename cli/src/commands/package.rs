//! `pkgmesh package publish|list|show|set-default|delete`: the seed's catalog.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use clap::{Args, Subcommand};
use pkgmesh_protocol::manifest::parse_manifest;
use pkgmesh_protocol::units::HumanBytes;
use pkgmesh_protocol::wire::{Request, Response};
use serde::Serialize;

use crate::mesh::{runtime, SeedArgs};
use crate::output::{platform_rows, print_json, print_platforms, print_table, PlatformRow};

#[derive(Subcommand)]
pub enum PackageCommand {
    /// Check a package version locally and publish it to the seed (role publisher).
    Publish(PublishArgs),
    /// List the packages in the catalog with their versions and default version.
    List(ListArgs),
    /// Show one version (the default unless --version): manifest, files and blobs.
    Show(ShowArgs),
    /// Make VERSION the default version of NAME (role publisher).
    SetDefault(SetDefaultArgs),
    /// Delete one version, or every version, of a package (role publisher).
    Delete(DeleteArgs),
}

#[derive(Args)]
pub struct PublishArgs {
    #[command(flatten)]
    seed: SeedArgs,
    /// Package name (letters, digits, `_`, `-`, `.`; 3 to 128 characters).
    #[arg(long)]
    name: String,
    /// The Distributor manifest (schema 2.0).
    #[arg(long, value_name = "FILE")]
    manifest: PathBuf,
    /// Directory holding the ZIPs the manifest names.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    seed: SeedArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ShowArgs {
    #[command(flatten)]
    seed: SeedArgs,
    name: String,
    #[arg(long)]
    version: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct SetDefaultArgs {
    #[command(flatten)]
    seed: SeedArgs,
    name: String,
    version: String,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    seed: SeedArgs,
    name: String,
    /// Delete only this version; without it every version goes.
    #[arg(long)]
    version: Option<String>,
    /// Delete even if a deployment uses it.
    #[arg(long)]
    force: bool,
    #[arg(long)]
    json: bool,
}

pub fn run(command: PackageCommand) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        match command {
            PackageCommand::Publish(args) => publish(args).await,
            PackageCommand::List(args) => list(args).await,
            PackageCommand::Show(args) => show(args).await,
            PackageCommand::SetDefault(args) => {
                let request = Request::SetDefault {
                    name: args.name,
                    version: args.version,
                };
                done(&args.seed, request, args.json).await
            }
            PackageCommand::Delete(args) => {
                let request = Request::DeletePackage {
                    name: args.name,
                    version: args.version,
                    force: args.force,
                };
                done(&args.seed, request, args.json).await
            }
        }
    })
}

async fn publish(args: PublishArgs) -> anyhow::Result<ExitCode> {
    let client = args.seed.connect().await?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "uploading {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let progress = |sent: u64, total: u64| {
        if let Some(bar) = &bar {
            bar.set_length(total);
            bar.set_position(sent);
        }
    };
    let outcome = client
        .publish(&args.name, &args.manifest, &args.dir, &progress)
        .await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    client.close().await;
    let outcome = outcome?;
    if args.json {
        print_json(&outcome)?;
    } else if outcome.unchanged {
        println!(
            "{} {} is already published with this content: nothing changed",
            outcome.name, outcome.version
        );
    } else {
        println!(
            "published {} {} ({} files, {})",
            outcome.name,
            outcome.version,
            outcome.files_uploaded,
            HumanBytes(outcome.bytes_uploaded)
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let client = args.seed.connect().await?;
    let response = client.call(&Request::ListPackages).await;
    client.close().await;
    let Response::Packages(packages) = response? else {
        bail!("the seed answered with something other than a package list");
    };
    if args.json {
        print_json(&serde_json::json!({ "packages": packages }))?;
    } else if packages.is_empty() {
        println!("no packages published yet (publish one with `pkgmesh package publish`)");
    } else {
        let rows: Vec<Vec<String>> = packages
            .iter()
            .map(|p| {
                vec![
                    p.name.clone(),
                    p.default_version.clone().unwrap_or_else(|| "-".into()),
                    p.versions.join(", "),
                ]
            })
            .collect();
        print_table(&["NAME", "DEFAULT", "VERSIONS"], &rows);
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct ShowReport {
    name: String,
    version: String,
    is_default: bool,
    published_at: u64,
    published_by: String,
    publisher: Option<String>,
    files: Vec<ShowFile>,
    platforms: Vec<PlatformRow>,
}

#[derive(Serialize)]
struct ShowFile {
    file: String,
    size: u64,
    sha256: String,
    blob: String,
}

async fn show(args: ShowArgs) -> anyhow::Result<ExitCode> {
    let client = args.seed.connect().await?;
    let response = client
        .call(&Request::GetManifest {
            name: args.name.clone(),
            version: args.version.clone(),
        })
        .await;
    client.close().await;
    let Response::Manifest(reply) = response? else {
        bail!("the seed answered with something other than a manifest");
    };
    let manifest = parse_manifest(reply.manifest_json.as_bytes()).ok();
    let report = ShowReport {
        name: reply.name,
        version: reply.version,
        is_default: reply.is_default,
        published_at: reply.published_at,
        published_by: reply.published_by,
        publisher: manifest.as_ref().and_then(|m| m.publisher.clone()),
        files: reply
            .files
            .iter()
            .map(|f| ShowFile {
                file: f.file.clone(),
                size: f.size,
                sha256: hex::encode(f.sha256),
                blob: f.blob.to_hex(),
            })
            .collect(),
        platforms: manifest.as_ref().map(platform_rows).unwrap_or_default(),
    };
    if args.json {
        print_json(&report)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} {}{}",
        report.name,
        report.version,
        if report.is_default { " (default)" } else { "" }
    );
    println!(
        "published by {} at {} (unix seconds)",
        report.published_by, report.published_at
    );
    println!();
    print_platforms(&report.platforms);
    println!();
    let rows: Vec<Vec<String>> = report
        .files
        .iter()
        .map(|f| {
            vec![
                f.file.clone(),
                HumanBytes(f.size).to_string(),
                f.blob[..16].to_string(),
            ]
        })
        .collect();
    print_table(&["FILE", "SIZE", "BLOB"], &rows);
    Ok(ExitCode::SUCCESS)
}

async fn done(seed: &SeedArgs, request: Request, json: bool) -> anyhow::Result<ExitCode> {
    let client = seed.connect().await?;
    let response = client.call(&request).await;
    client.close().await;
    let Response::Done { message } = response? else {
        bail!("the seed answered with something unexpected");
    };
    if json {
        print_json(&serde_json::json!({ "ok": true, "message": message }))?;
    } else {
        println!("{message}");
    }
    Ok(ExitCode::SUCCESS)
}
