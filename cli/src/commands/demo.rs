//! `pkgmesh demo`: shows what pkgmesh does today, on a fresh machine, with no set-up.
//!
//! Today that is the package model and blob addressing: the SSM Agent's platform selection on
//! the sample manifest, and a blob split into chunks that each verify on their own. The fleet
//! demo (seed, nodes, deployment) replaces this once those services exist.

use std::process::ExitCode;

use clap::Args;
use pkgmesh_protocol::blob::{hash_reader, ChunkError};
use pkgmesh_protocol::manifest::parse_manifest;
use pkgmesh_protocol::select::{select, Platform};
use serde::Serialize;

use pkgmesh_protocol::units::HumanBytes;

use crate::output::{print_json, print_table};

const SAMPLE_MANIFEST: &str = include_str!("../../../examples/manifest.example.json");
const DEMO_BLOB_BYTES: usize = 64 * 1024 * 1024;

#[derive(Args)]
pub struct DemoArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct DemoReport {
    selections: Vec<SelectionRow>,
    blob: String,
    blob_bytes: u64,
    chunk_size: u32,
    chunks: u32,
    chunks_verified: u32,
    tampered_chunk_refused: bool,
}

#[derive(Serialize)]
struct SelectionRow {
    platform: String,
    version: String,
    arch: String,
    file: Option<String>,
    error: Option<String>,
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let manifest = parse_manifest(SAMPLE_MANIFEST.as_bytes())
        .map_err(|e| anyhow::anyhow!("the embedded sample manifest is invalid:\n{e}"))?;
    let instances = [
        ("amazon", "2023", "arm64"),
        ("amazon", "2", "x86_64"),
        ("ubuntu", "24.04", "arm64"),
        ("redhat", "8.10", "x86_64"),
        ("redhat", "9.4", "x86_64"),
        ("windows", "10.0.20348", "x86_64"),
        ("debian", "12", "x86_64"),
    ];
    let selections: Vec<SelectionRow> = instances
        .iter()
        .map(|&(name, version, arch)| {
            let result = select(&manifest, &Platform::new(name, version, arch));
            SelectionRow {
                platform: name.into(),
                version: version.into(),
                arch: arch.into(),
                file: result.as_ref().ok().map(|s| s.file.clone()),
                error: result.err().map(|e| e.to_string()),
            }
        })
        .collect();

    // A blob of pseudo-random bytes: hash it in one streaming pass, verify every chunk on its
    // own against the blob id, then show that a single flipped bit is caught.
    let mut state = 0x2545f4914f6cdd1du64;
    let blob: Vec<u8> = (0..DEMO_BLOB_BYTES)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let hashes = hash_reader(&blob[..], blob.len() as u64)?;
    let layout = hashes.layout();
    let mut verified = 0;
    for index in 0..layout.chunk_count() {
        let start = layout.chunk_offset(index) as usize;
        let end = start + layout.chunk_len(index)? as usize;
        hashes.verify_chunk(index, &blob[start..end])?;
        verified += 1;
    }
    let mut tampered = blob[..layout.chunk_len(0)? as usize].to_vec();
    tampered[1000] ^= 0x04;
    let tampered_chunk_refused = matches!(
        hashes.verify_chunk(0, &tampered),
        Err(ChunkError::HashMismatch { index: 0 })
    );

    let report = DemoReport {
        selections,
        blob: hashes.id().to_hex(),
        blob_bytes: blob.len() as u64,
        chunk_size: layout.chunk_size(),
        chunks: layout.chunk_count(),
        chunks_verified: verified,
        tampered_chunk_refused,
    };
    if args.json {
        print_json(&report)?;
    } else {
        print_demo(&report);
    }
    Ok(
        if report.tampered_chunk_refused && verified == layout.chunk_count() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

fn print_demo(report: &DemoReport) {
    println!("pkgmesh demo: the Distributor package model and blob addressing\n");
    println!("1. The SSM Agent's platform selection on the sample manifest (examples/):\n");
    let rows: Vec<Vec<String>> = report
        .selections
        .iter()
        .map(|s| {
            vec![
                s.platform.clone(),
                s.version.clone(),
                s.arch.clone(),
                s.file.clone().unwrap_or_else(|| "(no match)".into()),
            ]
        })
        .collect();
    print_table(&["PLATFORM", "VERSION", "ARCH", "INSTALLS"], &rows);
    println!(
        "\n2. A {} blob, hashed in one streaming pass:\n   blob id {}\n   {} chunks of {}",
        HumanBytes(report.blob_bytes),
        report.blob,
        report.chunks,
        HumanBytes(report.chunk_size as u64)
    );
    println!(
        "   {} of {} chunks verified on their own against the blob id",
        report.chunks_verified, report.chunks
    );
    println!(
        "   chunk 0 with one flipped bit: {}",
        if report.tampered_chunk_refused {
            "refused"
        } else {
            "ACCEPTED (bug)"
        }
    );
    println!("\nThe seed, nodes and installer come next; see README.md for what exists today.");
}
