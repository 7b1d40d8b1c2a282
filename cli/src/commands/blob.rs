//! `pkgmesh blob hash FILE`: the identity a file would have in the mesh.

use std::fs::File;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use pkgmesh_protocol::blob::hash_reader_with;
use serde::Serialize;
use sha2::{Digest, Sha256};

use pkgmesh_protocol::units::HumanBytes;

use crate::output::print_json;

#[derive(Subcommand)]
pub enum BlobCommand {
    /// Print a file's blob id (BLAKE3), size, chunk size and chunk count.
    Hash(HashArgs),
}

#[derive(Args)]
pub struct HashArgs {
    /// The file to hash; it is streamed, so any size works in constant memory.
    file: PathBuf,
    /// Also compute the SHA-256 that a Distributor manifest records (slower: it runs over the same bytes).
    #[arg(long)]
    sha256: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct HashReport {
    file: String,
    blob: String,
    size: u64,
    chunk_size: u32,
    chunks: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
}

pub fn run(command: BlobCommand) -> anyhow::Result<ExitCode> {
    match command {
        BlobCommand::Hash(args) => hash(args),
    }
}

fn hash(args: HashArgs) -> anyhow::Result<ExitCode> {
    let mut file =
        File::open(&args.file).with_context(|| format!("cannot open {}", args.file.display()))?;
    let size = file
        .metadata()
        .with_context(|| format!("cannot stat {}", args.file.display()))?
        .len();
    let mut sha = args.sha256.then(Sha256::new);
    let hashes = hash_reader_with(&mut file, size, |bytes| {
        if let Some(sha) = sha.as_mut() {
            sha.update(bytes);
        }
    })
    .with_context(|| format!("hashing {}", args.file.display()))?;
    let layout = hashes.layout();
    let report = HashReport {
        file: args.file.display().to_string(),
        blob: hashes.id().to_hex(),
        size,
        chunk_size: layout.chunk_size(),
        chunks: layout.chunk_count(),
        sha256: sha.map(|sha| hex::encode(sha.finalize())),
    };
    if args.json {
        print_json(&report)?;
    } else {
        println!("file        {}", report.file);
        println!("blob        {}", report.blob);
        println!("size        {} ({})", report.size, HumanBytes(report.size));
        println!(
            "chunk size  {} ({})",
            report.chunk_size,
            HumanBytes(report.chunk_size as u64)
        );
        println!("chunks      {}", report.chunks);
        if let Some(sha) = &report.sha256 {
            println!("sha256      {sha}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
