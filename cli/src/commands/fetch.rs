//! `pkgmesh fetch NAME --out FILE`: the ZIP for this machine's platform, through the local node
//! (its admin socket: `--node SOCKET`, or `--data DIR` of a running node) or, with `--seed`,
//! through a one-shot node. Either way the file is written only after its SHA-256 matches the
//! manifest, and a terminal shows a progress bar.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pkgmesh_node::admin::client::AdminClient;
use pkgmesh_node::admin::{FetchEvent, FetchRequest};
use pkgmesh_node::peer::fetch::start_fetch;
use pkgmesh_node::peer::package::{copy_verified, resolve_package, PackageFile, VerifiedFile};
use pkgmesh_node::peer::transfers::{TransferState, TransferStatus};
use pkgmesh_node::peer::{self, NodeSettings};
use pkgmesh_protocol::units::HumanBytes;
use serde::Serialize;

use super::platform::PlatformSource;
use crate::mesh::{load_identity, resolve, runtime};
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
    /// Ask this node (its admin socket) to fetch. Default: <data>/admin.sock when --data or
    /// PKGMESH_DATA names a running node's data directory and no --seed is given.
    #[arg(long, value_name = "SOCKET")]
    node: Option<PathBuf>,
    /// Run a one-shot node against this seed instead of asking a running node.
    #[arg(long, env = "PKGMESH_SEED", value_name = "ADDR")]
    seed: Option<String>,
    /// Identity of the one-shot node (a certificate with the `node` role).
    #[arg(long, env = "PKGMESH_IDENTITY", value_name = "DIR")]
    identity: Option<PathBuf>,
    /// The running node's data directory; with --seed, the one-shot node's cache (kept, so a
    /// second fetch resumes or is instant; default a temporary directory removed at the end).
    #[arg(long, env = "PKGMESH_DATA", value_name = "DIR")]
    data: Option<PathBuf>,
    /// Address the one-shot node listens on while it fetches (it serves peers meanwhile).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:0")]
    listen: String,
    /// Site of this machine; peers in the same site are preferred (one-shot node).
    #[arg(long, default_value = "default")]
    site: String,
    /// Cache budget of the one-shot node, e.g. 8GiB. Default: unbounded for a temporary data
    /// directory (it is removed at the end), 4GiB for --data.
    #[arg(long, value_name = "SIZE")]
    cache_budget: Option<String>,
    /// Cap on chunk bytes received per second, e.g. 4MiB or 32Mbit (one-shot node).
    #[arg(long, value_name = "RATE")]
    download_limit: Option<String>,
    /// Cap on chunk bytes sent to peers per second while fetching and lingering (one-shot).
    #[arg(long, value_name = "RATE")]
    upload_limit: Option<String>,
    /// Keep serving peers this many seconds after the fetch completes (one-shot node).
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
    /// `node` (through a running node) or `one-shot`.
    via: &'static str,
    #[serde(flatten)]
    report: TransferStatus,
    bytes_from_peers: u64,
    mib_per_s: f64,
}

pub fn run(args: FetchArgs) -> anyhow::Result<ExitCode> {
    let via_node = match (&args.node, &args.seed, &args.data) {
        (Some(socket), _, _) => Some(socket.clone()),
        (None, Some(_), _) => None,
        (None, None, Some(data)) => Some(NodeSettings::admin_socket_in(data)),
        (None, None, None) => {
            return Err(crate::UsageError(
                "say which node fetches: --node SOCKET (or --data DIR) of a running node, or --seed ADDR for a one-shot fetch".into(),
            )
            .into())
        }
    };
    let progress = Progress::new();
    let summary = match via_node {
        Some(socket) => fetch_through_node(&args, &socket, &progress),
        None => fetch_one_shot(&args, &progress),
    };
    progress.finish();
    let summary = summary?;
    if args.json {
        print_json(&summary)?;
    } else {
        let r = &summary.report;
        println!(
            "{} {} ({}) -> {}: {} in {:.1} s ({:.1} MiB/s); from peers {} (same site {}), from the seed {}, already held {} chunks",
            summary.name,
            summary.version,
            summary.file,
            summary.out,
            HumanBytes(r.size),
            r.seconds,
            summary.mib_per_s,
            HumanBytes(summary.bytes_from_peers),
            HumanBytes(r.bytes_from_local_peers),
            HumanBytes(r.bytes_from_seed),
            r.chunks_already_held,
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn summary(
    package: PackageFile,
    out: &std::path::Path,
    sha256: String,
    via: &'static str,
    report: TransferStatus,
) -> FetchSummary {
    FetchSummary {
        name: package.name,
        version: package.version,
        file: package.file,
        out: out.display().to_string(),
        sha256,
        via,
        bytes_from_peers: report.bytes_from_local_peers + report.bytes_from_remote_peers,
        mib_per_s: report.size as f64 / 1048576.0 / report.seconds.max(1e-9),
        report,
    }
}

fn fetch_through_node(
    args: &FetchArgs,
    socket: &std::path::Path,
    progress: &Progress,
) -> anyhow::Result<FetchSummary> {
    let client = AdminClient::new(socket);
    let request = FetchRequest {
        name: args.name.clone(),
        version: args.version.clone(),
        platform: if args.platform.is_given() {
            Some(args.platform.resolve()?)
        } else {
            None
        },
    };
    runtime()?.block_on(async {
        let mut package: Option<PackageFile> = None;
        let mut end: Option<Result<TransferStatus, String>> = None;
        client
            .post_lines("/v1/fetch", &request, |event: FetchEvent| {
                match event {
                    FetchEvent::Resolved(resolved) => {
                        progress.start(&resolved);
                        package = Some(resolved);
                    }
                    FetchEvent::Progress(status) => progress.update(&status),
                    FetchEvent::Done(status) => {
                        progress.update(&status);
                        end = Some(Ok(status));
                    }
                    FetchEvent::Failed { message } => end = Some(Err(message)),
                }
                Ok(())
            })
            .await?;
        let report = match end {
            Some(Ok(report)) => report,
            Some(Err(message)) => bail!("{message}"),
            None => bail!("the node ended the fetch without a result"),
        };
        let package = package.context("the node never said which file it fetched")?;
        let expected = package.file_blob()?;
        let mut file = VerifiedFile::create(&args.out, &expected)?;
        client
            .get_bytes(&format!("/v1/blobs/{}", package.blob), |piece| {
                tokio::task::block_in_place(|| file.write(piece))
            })
            .await?;
        let sha256 = tokio::task::block_in_place(|| file.finish())?;
        Ok(summary(package, &args.out, sha256, "node", report))
    })
}

fn fetch_one_shot(args: &FetchArgs, progress: &Progress) -> anyhow::Result<FetchSummary> {
    let platform = args.platform.resolve()?;
    let identity_dir = args.identity.as_ref().context(
        "a one-shot fetch needs --identity DIR (a certificate with the `node` role) or PKGMESH_IDENTITY",
    )?;
    let identity = load_identity(identity_dir)?;
    let seed = resolve(args.seed.as_deref().context("no --seed")?)?;
    let temp = match &args.data {
        Some(_) => None,
        None => Some(tempdir()?),
    };
    let data = args
        .data
        .clone()
        .or_else(|| temp.as_ref().map(|t| t.0.clone()))
        .context("no data directory")?;
    let mut settings = NodeSettings::new(resolve(&args.listen)?, seed, data, identity);
    settings.site = args.site.clone();
    settings.cache_budget = match (&args.cache_budget, &temp) {
        (Some(text), _) => pkgmesh_protocol::units::parse_size(text)?,
        (None, Some(_)) => pkgmesh_protocol::blob::MAX_BLOB_SIZE,
        (None, None) => NodeSettings::DEFAULT_CACHE_BUDGET,
    };
    settings.upload_limit = parse_rate(args.upload_limit.as_deref())?;
    settings.download_limit = parse_rate(args.download_limit.as_deref())?;
    settings.platform = Some(platform.clone());
    let result = runtime()?.block_on(async {
        let node = peer::start(settings).await?;
        let outcome = async {
            let package =
                resolve_package(&node.state, &args.name, args.version.as_deref(), &platform)
                    .await?;
            progress.start(&package);
            let expected = package.file_blob()?;
            let mut watch = start_fetch(node.state.clone(), expected.blob, expected.size);
            let report = loop {
                let status = watch.borrow_and_update().clone();
                progress.update(&status);
                match status.state {
                    TransferState::Done => break status,
                    TransferState::Failed => {
                        bail!(status.error.unwrap_or_else(|| "the download failed".into()))
                    }
                    TransferState::Running => {}
                }
                if watch.changed().await.is_err() {
                    let last = watch.borrow().clone();
                    if last.state == TransferState::Done {
                        break last;
                    }
                    bail!(last.error.unwrap_or_else(|| "the download stopped".into()));
                }
            };
            let cache = node.state.cache.clone();
            let out = args.out.clone();
            let sha256 =
                tokio::task::spawn_blocking(move || copy_verified(&cache, &expected, &out))
                    .await??;
            if args.linger > 0 {
                tokio::time::sleep(Duration::from_secs(args.linger)).await;
            }
            Ok(summary(package, &args.out, sha256, "one-shot", report))
        }
        .await;
        node.shutdown().await;
        outcome
    });
    drop(temp);
    result
}

fn parse_rate(text: Option<&str>) -> anyhow::Result<u64> {
    Ok(text
        .map(pkgmesh_protocol::units::parse_rate)
        .transpose()?
        .unwrap_or(0))
}

/// The progress bar: drawn on stderr when it is a terminal, absent otherwise (a pipe or a log
/// gets no control characters).
struct Progress {
    bar: ProgressBar,
}

impl Progress {
    fn new() -> Self {
        let bar = if std::io::stderr().is_terminal() {
            ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:20}] {bytes}/{total_bytes} {binary_bytes_per_sec} {wide_msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        Progress { bar }
    }

    fn start(&self, package: &PackageFile) {
        self.bar.set_length(package.size);
        self.bar
            .set_prefix(format!("{} {}", package.name, package.version));
        self.bar.enable_steady_tick(Duration::from_millis(200));
    }

    fn update(&self, status: &TransferStatus) {
        if status.size > 0 {
            self.bar.set_length(status.size);
        }
        self.bar.set_position(status.bytes_held());
        let received = status.bytes_received().max(1) as f64;
        let from_peers = (status.bytes_from_local_peers + status.bytes_from_remote_peers) as f64;
        self.bar.set_message(format!(
            "{} peers, {:.0}% from peers, {:.0}% from the seed",
            status.peers_in_use,
            100.0 * from_peers / received,
            100.0 * status.bytes_from_seed as f64 / received
        ));
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
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
