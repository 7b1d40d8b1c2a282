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

/// Requests one connection may have open at the seed at once. Every node keeps one connection
/// to the seed for as long as it runs, and quinn keeps state for each stream a peer may open
/// next and parks the receive state of every finished stream in one of those slots (see
/// `transport::MAX_CONCURRENT_BIDI_STREAMS`), so each connection settles at about 450 bytes a
/// slot once it has made this many requests: at the transport's default of 256 that was
/// 115 KiB more per node after its first 256 requests, the growth of issue #9. A node needs far
/// fewer: its desired-state poll, a tracker request or two, and up to 8 chunk requests per
/// package it fetches from the seed (`SeedPolicy::max_in_flight`); a request over the limit
/// waits for a stream, it is not refused.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// Flow-control window over all of one connection's streams into the seed. Nodes send the seed
/// only small requests (a frame is at most 1 MiB); only a publisher uploads, one package per
/// connection, and one stream's window ([`crate::transport::STREAM_RECEIVE_WINDOW`]) already
/// lets it fill a fast link. It bounds what a connection can make the seed buffer unread: 8
/// MiB, not the 32 MiB a node allows a peer it fetches chunks from. Not allocated up front.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 8 * 1024 * 1024;

/// The transport for connections the seed accepts: the node's tuning (send window, keep-alive,
/// idle timeout, per-stream window for uploads) with the seed's own stream limit and
/// connection window. What the seed sends (chunks) is governed by the nodes' windows and the
/// seed's send window, which stay as they are.
pub fn seed_transport_config() -> quinn::TransportConfig {
    let mut config = transport::transport_config();
    config
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(MAX_STREAMS_PER_CONNECTION))
        .receive_window(quinn::VarInt::from_u32(CONNECTION_RECEIVE_WINDOW));
    config
}

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
    let endpoint = transport::make_endpoint_with(
        settings.listen,
        &settings.identity,
        seed_transport_config(),
    )?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{self, Role};
    use futures::FutureExt;
    use pkgmesh_protocol::wire::{Request, Response};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_gets_the_seeds_stream_limit_and_streams_again_as_requests_end() {
        transport::install_crypto_provider();
        let work = tempfile::tempdir().unwrap();
        let ca = work.path().join("ca");
        pki::init_ca(&ca, "test fleet").unwrap();
        pki::issue(&ca, "seed", &[Role::Seed], 1, &work.path().join("seed")).unwrap();
        pki::issue(&ca, "node-1", &[Role::Node], 1, &work.path().join("node")).unwrap();
        let settings = SeedSettings::new(
            "127.0.0.1:0".parse().unwrap(),
            work.path().join("data"),
            Identity::load(&work.path().join("seed")).unwrap(),
        );
        let running = start(settings).await.unwrap();
        let node = Identity::load(&work.path().join("node")).unwrap();
        let endpoint = transport::make_endpoint("127.0.0.1:0".parse().unwrap(), &node).unwrap();
        let conn = transport::connect(
            &endpoint,
            running.local_addr,
            Role::Seed,
            Duration::from_secs(10),
        )
        .await
        .unwrap();

        // Streams open without a round trip while the seed's limit allows; then opening waits.
        // The Hello exchange used one stream, which the seed may not have handed back yet.
        let mut open = Vec::new();
        while let Some(streams) = conn.connection.open_bi().now_or_never() {
            open.push(streams.unwrap());
            assert!(
                open.len() <= MAX_STREAMS_PER_CONNECTION as usize,
                "no limit"
            );
        }
        assert!(
            open.len() + 1 >= MAX_STREAMS_PER_CONNECTION as usize,
            "only {} streams",
            open.len()
        );

        // Every one of them is served, and once they are done the connection opens more.
        let mut answers = Vec::new();
        for (nonce, (mut send, mut recv)) in open.into_iter().enumerate() {
            answers.push(tokio::spawn(async move {
                let ping = Request::Ping {
                    nonce: nonce as u64,
                };
                transport::write_frame(&mut send, &ping).await.unwrap();
                let _ = send.finish();
                transport::read_frame::<Response>(&mut recv, Duration::from_secs(10)).await
            }));
        }
        for (nonce, answer) in answers.into_iter().enumerate() {
            match answer.await.unwrap().unwrap() {
                Response::Pong { nonce: got } => assert_eq!(got, nonce as u64),
                other => panic!("{other:?}"),
            }
        }
        for round in 0..2 * MAX_STREAMS_PER_CONNECTION as u64 {
            let ping = Request::Ping { nonce: round };
            let (response, _, _) = transport::request(&conn, &ping, Duration::from_secs(10))
                .await
                .unwrap();
            assert!(matches!(response, Response::Pong { nonce } if nonce == round));
        }
        running.shutdown().await;
    }
}
