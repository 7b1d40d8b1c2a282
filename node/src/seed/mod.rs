//! The seed: the catalog and the origin store behind it, the tracker, origin admission,
//! publishing and the audit log, served over QUIC with mutual TLS.
//!
//! Owns: starting and stopping a seed and the layout of its data dir:
//! `catalog.redb`, `audit.log`, `cache/` (its chunk cache), `origin/` (the default origin) and
//! `tmp/` (uploads being checked). Does not own: the rules of each part (submodules).

pub mod audit;
pub mod catalog;
pub mod deployments;
mod service;
pub mod tracker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use pkgmesh_cache::{CacheConfig, ChunkStore};

pub use service::{SeedCounters, SeedState};

use crate::origin::{Origin, OriginOptions};
use crate::pki::Identity;
use crate::swarm::admission::{Admission, DEFAULT_RECENT_WINDOW};
use crate::swarm::ratelimit::RateLimiter;
use crate::transport;
use crate::ziplayout::ZipLimits;

/// Connections a seed accepts at once. Every node of the fleet keeps one open (announcing,
/// asking for peers, long-polling its desired state), so this bounds the fleet one seed serves:
/// the transport's default is sized for a node serving its peers, below a 10,000-node fleet.
pub const MAX_CONNECTIONS: usize = 16_384;

/// Everything a seed needs to start; the CLI fills it from flags and the config file.
#[derive(Debug, Clone)]
pub struct SeedSettings {
    pub listen: SocketAddr,
    pub data: PathBuf,
    pub identity: Identity,
    /// `None`: the embedded default, a directory under the data dir.
    pub origin: Option<String>,
    pub origin_options: OriginOptions,
    pub cache_budget: u64,
    pub max_upload_bytes: u64,
    pub admission_window: Duration,
    /// Sites behind a thin WAN link and how many of their nodes fetch each blob across it.
    pub wan_fetchers: Vec<(String, usize)>,
    /// Where to serve Prometheus `/metrics` over TCP; `None` serves none.
    pub metrics_listen: Option<SocketAddr>,
    /// Chunk payload bytes per second the seed sends to nodes; 0 is unlimited. The seed's
    /// uplink is usually the fleet's thinnest pipe, and capping it keeps room for the rest.
    pub upload_limit: u64,
}

impl SeedSettings {
    pub const DEFAULT_CACHE_BUDGET: u64 = 8 << 30;
    pub const DEFAULT_MAX_UPLOAD: u64 = 16 << 30;

    pub fn new(listen: SocketAddr, data: PathBuf, identity: Identity) -> Self {
        SeedSettings {
            listen,
            data,
            identity,
            origin: None,
            origin_options: OriginOptions::default(),
            cache_budget: Self::DEFAULT_CACHE_BUDGET,
            max_upload_bytes: Self::DEFAULT_MAX_UPLOAD,
            admission_window: DEFAULT_RECENT_WINDOW,
            wan_fetchers: Vec::new(),
            metrics_listen: None,
            upload_limit: 0,
        }
    }
}

pub struct RunningSeed {
    pub local_addr: SocketAddr,
    pub state: Arc<SeedState>,
    endpoint: quinn::Endpoint,
    serving: tokio::task::JoinHandle<()>,
    housekeeping: tokio::task::JoinHandle<()>,
    /// Where `/metrics` is served, when it is, and the task serving it.
    pub metrics_addr: Option<SocketAddr>,
    metrics: Option<tokio::task::JoinHandle<()>>,
}

impl RunningSeed {
    /// Stops accepting, closes connections and waits for the accept loop to end.
    pub async fn shutdown(self) {
        self.endpoint.close(0u32.into(), b"seed shutting down");
        self.housekeeping.abort();
        if let Some(metrics) = &self.metrics {
            metrics.abort();
        }
        let _ = self.serving.await;
        self.endpoint.wait_idle().await;
    }
}

/// Opens the seed's stores and starts serving.
pub async fn start(settings: SeedSettings) -> anyhow::Result<RunningSeed> {
    transport::install_crypto_provider();
    let data = &settings.data;
    std::fs::create_dir_all(data)
        .with_context(|| format!("cannot create the data dir {}", data.display()))?;
    let tmp_dir = data.join("tmp");
    // Uploads left by a crash are half-checked: drop them.
    let _ = std::fs::remove_dir_all(&tmp_dir);
    std::fs::create_dir_all(&tmp_dir)
        .with_context(|| format!("cannot create {}", tmp_dir.display()))?;
    let origin = match &settings.origin {
        Some(url) => Origin::from_url(url, &settings.origin_options)?,
        None => Origin::local(&data.join("origin"))?,
    };
    let catalog = catalog::Catalog::open(&data.join("catalog.redb"))?;
    let audit = audit::AuditLog::open(&data.join("audit.log"))
        .with_context(|| format!("cannot open {}", data.join("audit.log").display()))?;
    let cache_dir = data.join("cache");
    let budget = settings.cache_budget;
    let cache = tokio::task::spawn_blocking(move || {
        ChunkStore::open(CacheConfig {
            dir: cache_dir,
            budget_bytes: budget,
        })
    })
    .await??;
    let mut tracker = tracker::Tracker::new();
    for (site, fetchers) in &settings.wan_fetchers {
        tracker.set_wan_fetchers(site, *fetchers);
    }
    let state = Arc::new(SeedState {
        catalog,
        origin,
        cache,
        audit,
        tracker: Mutex::new(tracker),
        admission: Mutex::new(Admission::new(settings.admission_window)),
        counters: SeedCounters::default(),
        upload: RateLimiter::new(settings.upload_limit),
        upload_turn: tokio::sync::Mutex::new(()),
        send_budget: Arc::new(tokio::sync::Semaphore::new(service::SEND_BUDGET_BYTES)),
        tmp_dir,
        max_upload_bytes: settings.max_upload_bytes,
        zip_limits: ZipLimits::default(),
        deployments: deployments::Deployments::open(&data.join("deployments.redb"))?,
        blob_index: Mutex::new(lru::LruCache::new(
            std::num::NonZeroUsize::new(service::BLOB_INDEX_ENTRIES).context("index size")?,
        )),
    });
    // Bound before the QUIC endpoint, so a taken metrics port fails the start cleanly.
    let (metrics_addr, metrics) = match settings.metrics_listen {
        Some(addr) => {
            let source = crate::metrics::MetricsSource::Seed(state.clone());
            let (bound, task) = crate::metrics::serve_metrics(addr, source).await?;
            (Some(bound), Some(task))
        }
        None => (None, None),
    };
    let endpoint = transport::make_endpoint(settings.listen, &settings.identity)?;
    let local_addr = endpoint.local_addr()?;
    let handler = Arc::new(service::SeedHandler {
        state: state.clone(),
    });
    let limits = transport::ServeLimits {
        max_connections: MAX_CONNECTIONS,
        ..transport::ServeLimits::default()
    };
    let serving = tokio::spawn(transport::serve_with(endpoint.clone(), handler, limits));
    let housekeeping_state = state.clone();
    let housekeeping = tokio::spawn(async move {
        // Rollouts step every second: new nodes that match, due repeats and default changes
        // start within that; reports and creations step at once.
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            housekeeping_state
                .tracker
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .expire(std::time::Instant::now());
            housekeeping_state.roll_out();
        }
    });
    tracing::info!(%local_addr, origin = state.origin.url(), "seed serving");
    Ok(RunningSeed {
        local_addr,
        state,
        endpoint,
        serving,
        housekeeping,
        metrics_addr,
        metrics,
    })
}
