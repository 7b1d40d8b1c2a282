//! `pkgmesh node`: run a node until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use pkgmesh_node::config::{self, NodeFile};
use pkgmesh_node::peer::{self, NodeSettings};

use super::platform::PlatformSource;
use super::seed::wait_for_shutdown_signal;
use crate::mesh::{load_identity, resolve, runtime};
use crate::output::print_ready_line;

#[derive(Args)]
pub struct NodeArgs {
    /// Address to listen on (UDP), e.g. 0.0.0.0:7401. Default 0.0.0.0:7401.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// The seed's address, host:port.
    #[arg(long, env = "PKGMESH_SEED", value_name = "ADDR")]
    seed: Option<String>,
    /// Data directory: the chunk cache (and, later, installed packages).
    #[arg(long, env = "PKGMESH_DATA", value_name = "DIR")]
    data: Option<PathBuf>,
    /// Identity directory of the node (a certificate with the `node` role).
    #[arg(long, env = "PKGMESH_IDENTITY", value_name = "DIR")]
    identity: Option<PathBuf>,
    /// The site this node is in; peers in the same site are preferred.
    #[arg(long)]
    site: Option<String>,
    /// A tag KEY=VALUE (repeatable), for deployment targets.
    #[arg(long = "tag", value_name = "K=V")]
    tags: Vec<String>,
    /// Size of the chunk cache, e.g. 4GiB.
    #[arg(long, value_name = "SIZE")]
    cache_budget: Option<String>,
    /// Cap on chunk bytes sent to peers per second, e.g. 4MiB or 32Mbit (0: none).
    #[arg(long, value_name = "RATE")]
    upload_limit: Option<String>,
    /// Cap on chunk bytes received per second, e.g. 4MiB or 32Mbit (0: none).
    #[arg(long, value_name = "RATE")]
    download_limit: Option<String>,
    /// Most chunk uploads to peers at once; askers beyond it are told to come back (default 16).
    #[arg(long, value_name = "N")]
    max_uploads: Option<usize>,
    /// The admin API's Unix socket. Default: <data>/admin.sock.
    #[arg(long, value_name = "PATH")]
    admin_socket: Option<PathBuf>,
    #[command(flatten)]
    platform: PlatformSource,
    /// A certificate revocation list to enforce (PEM), besides the identity's crl.pem.
    #[arg(long, value_name = "FILE")]
    crl: Option<PathBuf>,
    /// Also serve Prometheus `/metrics` over HTTP on this TCP address, e.g. 127.0.0.1:9401
    /// (the admin socket always serves it).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// TOML config file; flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the ready line as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: NodeArgs) -> anyhow::Result<ExitCode> {
    let file: NodeFile = match &args.config {
        Some(path) => config::load(path)?,
        None => NodeFile::default(),
    };
    let listen = resolve(
        &args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| "0.0.0.0:7401".into()),
    )?;
    let seed = resolve(
        &args
            .seed
            .or(file.seed)
            .context("no seed: give --seed ADDR or `seed` in the config file")?,
    )?;
    let data = args
        .data
        .or(file.data)
        .context("no data directory: give --data DIR or `data` in the config file")?;
    let identity_dir = args.identity.or(file.identity).context(
        "no identity: give --identity DIR (made with `pkgmesh ca issue --role node`) or `identity` in the config file",
    )?;
    let mut identity = load_identity(&identity_dir)?;
    if let Some(crl) = args.crl.or(file.crl) {
        identity
            .load_crl(&crl)
            .with_context(|| format!("cannot load the CRL {}", crl.display()))?;
    }
    let mut tags: Vec<(String, String)> = file.tags.into_iter().collect();
    for tag in &args.tags {
        let (key, value) = tag
            .split_once('=')
            .with_context(|| format!("--tag {tag:?} is not KEY=VALUE"))?;
        tags.retain(|(k, _)| k != key);
        tags.push((key.to_string(), value.to_string()));
    }
    let platform = args
        .platform
        .clone()
        .or_config(file.platform, file.platform_version, file.arch);
    let admin_socket = args
        .admin_socket
        .clone()
        .unwrap_or_else(|| NodeSettings::admin_socket_in(&data));
    let mut settings = NodeSettings::new(listen, seed, data, identity);
    settings.site = args.site.or(file.site).unwrap_or_else(|| "default".into());
    settings.tags = tags;
    settings.cache_budget = config::size_setting(
        "cache budget",
        args.cache_budget.as_deref(),
        file.cache_budget.as_deref(),
        NodeSettings::DEFAULT_CACHE_BUDGET,
    )
    .map_err(anyhow::Error::msg)?;
    settings.upload_limit = config::rate_setting(
        "upload limit",
        args.upload_limit.as_deref(),
        file.upload_limit.as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    settings.download_limit = config::rate_setting(
        "download limit",
        args.download_limit.as_deref(),
        file.download_limit.as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    settings.max_uploads = args
        .max_uploads
        .or(file.max_uploads)
        .unwrap_or(NodeSettings::DEFAULT_MAX_UPLOADS);
    if settings.max_uploads == 0 {
        anyhow::bail!("max uploads must be at least 1");
    }
    settings.platform = if platform.is_given() {
        Some(platform.resolve()?)
    } else {
        None
    };
    settings.admin_socket = Some(admin_socket);
    settings.follow_deployments = true;
    settings.metrics_listen = args.metrics_listen.as_deref().map(resolve).transpose()?;
    runtime()?.block_on(async move {
        let running = peer::start(settings).await?;
        print_ready_line(
            args.json,
            &serde_json::json!({
                "listening": running.local_addr.to_string(),
                "site": running.state.settings.site,
                "admin_socket": running.state.settings.admin_socket,
                "metrics": running.metrics_addr.map(|a| a.to_string()),
            }),
            &format!(
                "node listening on {} (site {})",
                running.local_addr, running.state.settings.site
            ),
        );
        wait_for_shutdown_signal().await;
        running.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}
