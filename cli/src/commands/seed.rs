//! `pkgmesh seed`: run the seed daemon until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use pkgmesh_node::config::{self, SeedFile};
use pkgmesh_node::seed::{self, SeedSettings};

use crate::mesh::{load_identity, resolve, runtime};
use crate::output::print_ready_line;

#[derive(Args)]
pub struct SeedArgs {
    /// Address to listen on (UDP), e.g. 0.0.0.0:7400. Default 0.0.0.0:7400.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Data directory: catalog, audit log, chunk cache and the default origin.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Identity directory of the seed (a certificate with the `seed` role).
    #[arg(long, env = "PKGMESH_IDENTITY", value_name = "DIR")]
    identity: Option<PathBuf>,
    /// Origin store: file:///DIR, s3://BUCKET[/PREFIX] or https://HOST/PREFIX (read-only).
    /// Default: <data>/origin.
    #[arg(long, value_name = "URL")]
    origin: Option<String>,
    /// Size of the seed's chunk cache, e.g. 8GiB.
    #[arg(long, value_name = "SIZE")]
    cache_budget: Option<String>,
    /// A certificate revocation list to enforce (PEM), besides the identity's crl.pem.
    #[arg(long, value_name = "FILE")]
    crl: Option<PathBuf>,
    /// A site behind a thin WAN link: only N of its nodes fetch each package across the link,
    /// the rest take it from them (repeatable; overrides `[sites.SITE]` in the config).
    #[arg(long = "wan-fetchers", value_name = "SITE=N")]
    wan_fetchers: Vec<String>,
    /// Cap on chunk bytes sent to nodes per second, e.g. 200Mbit or 25MiB (0: none).
    #[arg(long, value_name = "RATE")]
    upload_limit: Option<String>,
    /// Serve Prometheus `/metrics` over HTTP on this TCP address, e.g. 127.0.0.1:9400.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// TOML config file; flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the ready line as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: SeedArgs) -> anyhow::Result<ExitCode> {
    let file: SeedFile = match &args.config {
        Some(path) => config::load(path)?,
        None => SeedFile::default(),
    };
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| "0.0.0.0:7400".into());
    let listen = resolve(&listen)?;
    let data = args
        .data
        .or(file.data)
        .context("no data directory: give --data DIR or `data` in the config file")?;
    let identity_dir = args.identity.or(file.identity).context(
        "no identity: give --identity DIR (made with `pkgmesh ca issue --role seed`) or `identity` in the config file",
    )?;
    let mut identity = load_identity(&identity_dir)?;
    if let Some(crl) = args.crl.or(file.crl) {
        identity
            .load_crl(&crl)
            .with_context(|| format!("cannot load the CRL {}", crl.display()))?;
    }
    let mut settings = SeedSettings::new(listen, data, identity);
    settings.origin = args.origin.or(file.origin);
    settings.origin_options = file.origin_settings;
    settings.cache_budget = config::size_setting(
        "cache budget",
        args.cache_budget.as_deref(),
        file.cache_budget.as_deref(),
        SeedSettings::DEFAULT_CACHE_BUDGET,
    )
    .map_err(anyhow::Error::msg)?;
    settings.max_upload_bytes = config::size_setting(
        "max upload",
        None,
        file.max_upload.as_deref(),
        SeedSettings::DEFAULT_MAX_UPLOAD,
    )
    .map_err(anyhow::Error::msg)?;
    settings.upload_limit = config::rate_setting(
        "upload limit",
        args.upload_limit.as_deref(),
        file.upload_limit.as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    if let Some(secs) = file.admission_window_secs {
        settings.admission_window = Duration::from_secs(secs);
    }
    let mut wan_fetchers: std::collections::BTreeMap<String, usize> = file
        .sites
        .iter()
        .filter_map(|(site, settings)| Some((site.clone(), settings.wan_fetchers?)))
        .collect();
    for flag in &args.wan_fetchers {
        let parsed = flag
            .split_once('=')
            .and_then(|(site, n)| Some((site, n.trim().parse::<usize>().ok()?)))
            .filter(|(site, _)| !site.is_empty());
        let Some((site, n)) = parsed else {
            anyhow::bail!(
                "--wan-fetchers {flag:?} is not SITE=N (N a whole number, 0 for no limit)"
            );
        };
        wan_fetchers.insert(site.to_string(), n);
    }
    settings.wan_fetchers = wan_fetchers.into_iter().collect();
    settings.metrics_listen = args.metrics_listen.as_deref().map(resolve).transpose()?;
    runtime()?.block_on(async move {
        let running = seed::start(settings).await?;
        print_ready_line(
            args.json,
            &serde_json::json!({
                "listening": running.local_addr.to_string(),
                "origin": running.state.origin.url(),
                "metrics": running.metrics_addr.map(|a| a.to_string()),
            }),
            &format!(
                "seed listening on {} (origin {})",
                running.local_addr,
                running.state.origin.url()
            ),
        );
        wait_for_shutdown_signal().await;
        running.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}

pub async fn wait_for_shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
