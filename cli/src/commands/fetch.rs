//! `pkgmesh fetch NAME --seed ADDR --out FILE`: a one-shot node that fetches the ZIP for this
//! machine's platform from the swarm (peers first, the seed for the rest), checks its SHA-256
//! against the manifest and writes it out.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use pkgmesh_node::peer::{self, fetch::fetch_blob, NodeSettings};
use pkgmesh_protocol::manifest::parse_manifest;
use pkgmesh_protocol::select::select;
use pkgmesh_protocol::units::HumanBytes;
use pkgmesh_protocol::wire::{Request, Response};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::platform::PlatformSource;
use crate::mesh::{load_identity, resolve, runtime, SeedArgs};
use crate::output::print_json;

#[derive(Args)]
pub struct FetchArgs {
    /// Package name.
    name: String,
    /// Version to fetch; the default version when left out.
    #[arg(long)]
    version: Option<String>,
    /// Where to write the ZIP.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    #[command(flatten)]
    seed: SeedArgs,
    /// Data directory for the one-shot node's cache (kept, so a second fetch resumes or is
    /// instant). Default: a temporary directory removed at the end.
    #[arg(long, env = "PKGMESH_DATA", value_name = "DIR")]
    data: Option<PathBuf>,
    /// Address the one-shot node listens on while it fetches (it serves peers meanwhile).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:0")]
    listen: String,
    /// Site of this machine; peers in the same site are preferred.
    #[arg(long, default_value = "default")]
    site: String,
    /// Cache budget of the one-shot node, e.g. 8GiB. Default: unbounded for a temporary data
    /// directory (it is removed at the end), 4GiB for --data.
    #[arg(long, value_name = "SIZE")]
    cache_budget: Option<String>,
    /// Cap on chunk bytes received per second, e.g. 4MiB or 32Mbit.
    #[arg(long, value_name = "RATE")]
    download_limit: Option<String>,
    /// Cap on chunk bytes sent to peers per second while fetching and lingering.
    #[arg(long, value_name = "RATE")]
    upload_limit: Option<String>,
    /// Keep serving peers this many seconds after the fetch completes.
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    linger: u64,
    #[command(flatten)]
    platform: PlatformSource,
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct FetchSummary {
    name: String,
    version: String,
    file: String,
    out: String,
    sha256: String,
    #[serde(flatten)]
    report: peer::fetch::FetchReport,
    mib_per_s: f64,
}

pub fn run(args: FetchArgs) -> anyhow::Result<ExitCode> {
    let platform = args.platform.resolve()?;
    let identity = load_identity(&args.seed.identity)?;
    let seed = resolve(&args.seed.seed)?;
    let temp = match &args.data {
        Some(_) => None,
        None => Some(tempdir()?),
    };
    let data = args
        .data
        .clone()
        .or_else(|| temp.as_ref().map(|t| t.0.clone()))
        .context("no data directory")?;
    let settings = NodeSettings {
        listen: resolve(&args.listen)?,
        seed,
        data,
        identity,
        site: args.site.clone(),
        tags: Vec::new(),
        cache_budget: match (&args.cache_budget, &temp) {
            (Some(text), _) => pkgmesh_protocol::units::parse_size(text)?,
            (None, Some(_)) => pkgmesh_protocol::blob::MAX_BLOB_SIZE,
            (None, None) => NodeSettings::DEFAULT_CACHE_BUDGET,
        },
        upload_limit: args
            .upload_limit
            .as_deref()
            .map(pkgmesh_protocol::units::parse_rate)
            .transpose()?
            .unwrap_or(0),
        download_limit: args
            .download_limit
            .as_deref()
            .map(pkgmesh_protocol::units::parse_rate)
            .transpose()?
            .unwrap_or(0),
    };
    let result = runtime()?.block_on(async {
        let node = peer::start(settings).await?;
        let outcome = async {
            let seed = node.state.seed().await?;
            let response = seed
                .call(&Request::GetManifest {
                    name: args.name.clone(),
                    version: args.version.clone(),
                })
                .await?;
            let Response::Manifest(reply) = response else {
                bail!("the seed answered with something other than a manifest");
            };
            let manifest = parse_manifest(reply.manifest_json.as_bytes())
                .map_err(|e| anyhow::anyhow!("the seed's manifest is invalid:\n{e}"))?;
            let selection = select(&manifest, &platform)?;
            let file = reply
                .files
                .iter()
                .find(|f| f.file == selection.file)
                .with_context(|| format!("the seed has no blob for {}", selection.file))?
                .clone();
            let report = fetch_blob(node.state.clone(), file.blob, file.size).await?;
            let cache = node.state.cache.clone();
            let out = args.out.clone();
            let sha256 =
                tokio::task::spawn_blocking(move || write_out(&cache, &file, &out)).await??;
            if args.linger > 0 {
                tokio::time::sleep(Duration::from_secs(args.linger)).await;
            }
            Ok(FetchSummary {
                name: reply.name,
                version: reply.version,
                file: selection.file,
                out: args.out.display().to_string(),
                sha256,
                mib_per_s: report.size as f64 / 1048576.0 / report.seconds.max(1e-9),
                report,
            })
        }
        .await;
        node.shutdown().await;
        outcome
    });
    drop(temp);
    let summary = result?;
    if args.json {
        print_json(&summary)?;
    } else {
        let r = &summary.report;
        println!(
            "{} {} ({}) -> {}: {} in {:.1} s ({:.1} MiB/s); from peers {} (same site {}), from the seed {}",
            summary.name,
            summary.version,
            summary.file,
            summary.out,
            HumanBytes(r.size),
            r.seconds,
            summary.mib_per_s,
            HumanBytes(r.bytes_from_local_peers + r.bytes_from_remote_peers),
            HumanBytes(r.bytes_from_local_peers),
            HumanBytes(r.bytes_from_seed)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Copies the blob from the cache to `out` (temp file, fsync, rename), checking the SHA-256 the
/// manifest names on the way: a mismatch leaves no file behind.
fn write_out(
    cache: &pkgmesh_cache::ChunkStore,
    file: &pkgmesh_protocol::wire::FileBlob,
    out: &std::path::Path,
) -> anyhow::Result<String> {
    let mut reader = cache.open_blob(&file.blob)?;
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let temp = dir.join(format!(".pkgmesh-fetch-{}", std::process::id()));
    let result = (|| {
        let mut writer = std::fs::File::create(&temp)
            .with_context(|| format!("cannot write {}", temp.display()))?;
        let mut sha = Sha256::new();
        let mut buffer = vec![0u8; 256 * 1024];
        loop {
            let n = reader.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            sha.update(&buffer[..n]);
            writer.write_all(&buffer[..n])?;
        }
        let digest: [u8; 32] = sha.finalize().into();
        if digest != file.sha256 {
            bail!(
                "{} has SHA-256 {} but the manifest says {}: not written",
                file.file,
                hex::encode(digest),
                hex::encode(file.sha256)
            );
        }
        writer.sync_all()?;
        std::fs::rename(&temp, out).with_context(|| format!("cannot write {}", out.display()))?;
        Ok(hex::encode(digest))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// A temporary directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir() -> anyhow::Result<TempDir> {
    let dir = std::env::temp_dir().join(format!(
        "pkgmesh-fetch-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(TempDir(dir))
}
