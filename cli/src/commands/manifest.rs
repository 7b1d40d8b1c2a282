//! `pkgmesh manifest check|select`: the Distributor package model, usable on its own.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use pkgmesh_protocol::manifest::{parse_manifest, Manifest, ManifestErrors, MAX_MANIFEST_BYTES};
use pkgmesh_protocol::names::validate_package_name;
use pkgmesh_protocol::select::select;
use serde::Serialize;

use super::platform::PlatformSource;
use crate::output::{platform_rows, print_json, print_platforms, print_table, PlatformRow};

#[derive(Subcommand)]
pub enum ManifestCommand {
    /// Validate a manifest: a summary when it is valid, every error when it is not.
    Check(CheckArgs),
    /// Print the file a platform would install from this manifest (the SSM Agent's selection).
    Select(SelectArgs),
}

#[derive(Args)]
pub struct CheckArgs {
    /// The manifest (Distributor schema 2.0 JSON).
    file: PathBuf,
    /// The package name it will be published under, checked too.
    #[arg(long)]
    name: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct SelectArgs {
    /// The manifest (Distributor schema 2.0 JSON).
    file: PathBuf,
    #[command(flatten)]
    platform: PlatformSource,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(command: ManifestCommand) -> anyhow::Result<ExitCode> {
    match command {
        ManifestCommand::Check(args) => check(args),
        ManifestCommand::Select(args) => select_file(args),
    }
}

/// Reads at most one byte past the limit, so an oversized file is refused by the parser with
/// its size named, without reading a huge file into memory.
fn read_manifest(path: &Path) -> anyhow::Result<Vec<u8>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_MANIFEST_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(bytes)
}

#[derive(Serialize)]
struct CheckReport<'a> {
    ok: bool,
    file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    publisher: Option<&'a str>,
    platforms: Vec<PlatformRow>,
    files: Vec<FileEntry<'a>>,
    errors: Vec<ErrorEntry>,
}

#[derive(Serialize)]
struct FileEntry<'a> {
    name: &'a str,
    sha256: &'a str,
}

#[derive(Serialize)]
struct ErrorEntry {
    path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    message: String,
}

fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let bytes = read_manifest(&args.file)?;
    let parsed = parse_manifest(&bytes);
    let mut errors: Vec<ErrorEntry> = match &parsed {
        Ok(_) => Vec::new(),
        Err(ManifestErrors(list)) => list
            .iter()
            .map(|e| ErrorEntry {
                path: e.path.clone(),
                value: e.value.clone(),
                message: e.message.clone(),
            })
            .collect(),
    };
    if let Some(name) = &args.name {
        if let Err(e) = validate_package_name(name) {
            errors.push(ErrorEntry {
                path: "--name".into(),
                value: Some(serde_json::Value::from(name.as_str()).to_string()),
                message: e.to_string(),
            });
        }
    }
    let manifest: Option<&Manifest> = parsed.as_ref().ok();
    let report = CheckReport {
        ok: errors.is_empty(),
        file: args.file.display().to_string(),
        name: args.name.as_deref(),
        version: manifest.map(|m| m.version.as_str()),
        publisher: manifest.and_then(|m| m.publisher.as_deref()),
        platforms: manifest.map(platform_rows).unwrap_or_default(),
        files: manifest
            .map(|m| {
                m.files
                    .iter()
                    .map(|(name, entry)| FileEntry {
                        name,
                        sha256: &entry.checksums.sha256,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        errors,
    };
    if args.json {
        print_json(&report)?;
    } else if report.ok {
        print_check_summary(&report);
    } else {
        eprintln!(
            "{} is not a valid Distributor manifest ({} error{}):",
            report.file,
            report.errors.len(),
            if report.errors.len() == 1 { "" } else { "s" }
        );
        for error in &report.errors {
            match &error.value {
                Some(value) => eprintln!("  {}: {} (got {value})", error.path, error.message),
                None => eprintln!("  {}: {}", error.path, error.message),
            }
        }
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_check_summary(report: &CheckReport) {
    println!("{}: valid Distributor manifest (schema 2.0)", report.file);
    if let Some(name) = report.name {
        println!("name       {name}");
    }
    println!("version    {}", report.version.unwrap_or("-"));
    if let Some(publisher) = report.publisher {
        println!("publisher  {publisher}");
    }
    println!();
    print_platforms(&report.platforms);
    println!();
    let rows: Vec<Vec<String>> = report
        .files
        .iter()
        .map(|f| vec![f.name.to_string(), f.sha256.to_string()])
        .collect();
    print_table(&["FILE", "SHA256"], &rows);
}

#[derive(Serialize)]
struct SelectReport {
    platform: String,
    platform_version: String,
    arch: String,
    platform_key: String,
    version_key: String,
    arch_key: String,
    file: String,
    sha256: String,
}

fn select_file(args: SelectArgs) -> anyhow::Result<ExitCode> {
    let bytes = read_manifest(&args.file)?;
    let manifest = parse_manifest(&bytes).map_err(|errors| {
        anyhow::anyhow!("{} is not a valid manifest:\n{errors}", args.file.display())
    })?;
    let platform = args.platform.resolve()?;
    let selection = select(&manifest, &platform)?;
    let sha256 = manifest
        .files
        .get(&selection.file)
        .map(|f| f.checksums.sha256.clone())
        .unwrap_or_default();
    if args.json {
        print_json(&SelectReport {
            platform: platform.name,
            platform_version: platform.version,
            arch: platform.arch,
            platform_key: selection.platform_key,
            version_key: selection.version_key,
            arch_key: selection.arch_key,
            file: selection.file,
            sha256,
        })?;
    } else {
        println!("{}", selection.file);
    }
    Ok(ExitCode::SUCCESS)
}
