//! Operators' figures: the per-peer exchange table and transfer totals a node keeps, and the
//! Prometheus `/metrics` exposition of a node and of a seed.
//!
//! Owns: [`NodeStats`] (what each peer sent and was sent, rates, bans; chunk and transfer
//! totals, recorded as each transfer ends), rendering every figure in the Prometheus text
//! format (version 0.0.4) with prometheus-client, and the optional TCP listener that serves
//! `GET /metrics` (`--metrics-listen`). Does not own: the byte counters of the data path
//! ([`crate::peer::NodeState`]'s `received` and `served`, [`crate::seed::SeedCounters`]). It
//! reads those at scrape time, so `/metrics` and the admin API always show the same numbers;
//! the admin socket serves `/metrics` too ([`crate::admin`]).
//!
//! Metrics are built fresh from the live state on every scrape rather than kept in a registry
//! beside it: a second set of counters could drift from the first, one set cannot.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use pkgmesh_protocol::blob::BlobId;
use pkgmesh_protocol::deploy::{DeploymentState, NodeDeployState};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use crate::peer::NodeState;
use crate::seed::SeedState;
use crate::swarm::scheduler::Scheduler;

/// Peers remembered in the exchange table; the one heard from longest ago makes room.
pub const MAX_PEER_RECORDS: usize = 1024;

/// The `Content-Type` of `/metrics` answers.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What this node exchanged with one peer, over every transfer since it started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerRecord {
    pub node: String,
    /// Whether the peer is in this node's site, once a transfer used it.
    pub same_site: Option<bool>,
    /// Verified chunks received from it (endgame duplicates included).
    pub chunks_received: u64,
    pub bytes_received: u64,
    /// Chunks this node sent it.
    pub chunks_sent: u64,
    pub bytes_sent: u64,
    /// Its smoothed delivery rate in the last transfer that measured one.
    pub rate_bytes_per_sec: Option<f64>,
    /// Requests to it that failed (timeouts included), and timeouts alone.
    pub failures: u64,
    pub timeouts: u64,
    /// Why it was last banned, and for which blob (bans are per blob and per transfer).
    pub banned: Option<String>,
    pub banned_blob: Option<String>,
    /// Unix seconds of the last exchange either way.
    pub last_exchange: u64,
}

/// Counters only operators read. The byte counters by source live on the data path
/// (`NodeState::received`); these complete them.
#[derive(Debug, Default)]
pub struct NodeStats {
    /// Chunks received and verified, from any source, endgame duplicates included.
    pub chunks_received: AtomicU64,
    /// Chunk requests that failed: timeouts, refusals, lost connections, bad hashes.
    pub chunk_failures: AtomicU64,
    /// Verified bytes of chunks this node already had when they arrived (endgame races).
    pub duplicate_bytes: AtomicU64,
    /// Transfers that ended with every chunk verified.
    pub transfers_completed: AtomicU64,
    peers: Mutex<HashMap<String, PeerRecord>>,
}

impl NodeStats {
    /// Adds what one finished transfer's scheduler saw: per-peer figures and chunk totals.
    pub fn record_transfer(&self, blob: &BlobId, scheduler: &Scheduler) {
        let now = now_unix();
        let relaxed = Ordering::Relaxed;
        let seed = scheduler.seed_stats();
        let peers = scheduler.peer_stats();
        let chunks = seed.chunks_received
            + peers
                .iter()
                .map(|p| p.transfer.chunks_received)
                .sum::<u64>();
        let failures = seed.failures + peers.iter().map(|p| p.transfer.failures).sum::<u64>();
        self.chunks_received.fetch_add(chunks, relaxed);
        self.chunk_failures.fetch_add(failures, relaxed);
        self.duplicate_bytes
            .fetch_add(scheduler.bytes().duplicate, relaxed);
        self.transfers_completed.fetch_add(1, relaxed);
        let mut table = self.lock();
        for peer in peers {
            let transfer = &peer.transfer;
            let touched = transfer.chunks_received > 0 || transfer.failures > 0;
            if !touched && peer.banned.is_none() && !table.contains_key(&peer.id) {
                // Heard of but never asked: not worth a row (and a table slot).
                continue;
            }
            let record = entry(&mut table, &peer.id);
            record.same_site = Some(peer.site_is_local);
            record.chunks_received += transfer.chunks_received;
            record.bytes_received += transfer.bytes_received;
            record.failures += transfer.failures;
            record.timeouts += transfer.timeouts;
            if transfer.rate_bytes_per_sec.is_some() {
                record.rate_bytes_per_sec = transfer.rate_bytes_per_sec;
            }
            if let Some(reason) = peer.banned {
                record.banned = Some(reason.to_string());
                record.banned_blob = Some(blob.to_hex());
            }
            if touched {
                record.last_exchange = now;
            }
        }
    }

    /// Counts a chunk this node sent to `peer`.
    pub fn record_sent(&self, peer: &str, bytes: u64) {
        let mut table = self.lock();
        let record = entry(&mut table, peer);
        record.chunks_sent += 1;
        record.bytes_sent += bytes;
        record.last_exchange = now_unix();
    }

    /// Every peer in the table, by name.
    pub fn peers(&self) -> Vec<PeerRecord> {
        let mut list: Vec<PeerRecord> = self.lock().values().cloned().collect();
        list.sort_by(|a, b| a.node.cmp(&b.node));
        list
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PeerRecord>> {
        self.peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The record of `peer`, made if needed; a full table first forgets its stalest record.
fn entry<'a>(table: &'a mut HashMap<String, PeerRecord>, peer: &str) -> &'a mut PeerRecord {
    if !table.contains_key(peer) && table.len() >= MAX_PEER_RECORDS {
        if let Some(stalest) = table
            .values()
            .min_by_key(|r| r.last_exchange)
            .map(|r| r.node.clone())
        {
            table.remove(&stalest);
        }
    }
    table.entry(peer.to_string()).or_insert_with(|| PeerRecord {
        node: peer.to_string(),
        ..PeerRecord::default()
    })
}

/// The byte and chunk totals `pkgmesh cache stats` shows and `/metrics` exports: one
/// function reads them for both.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeTotals {
    pub bytes_from_seed: u64,
    pub bytes_from_same_site_peers: u64,
    pub bytes_from_other_site_peers: u64,
    pub bytes_served: u64,
    pub chunks_served: u64,
    pub uploads_refused: u64,
    pub chunks_received: u64,
    pub chunk_failures: u64,
    pub duplicate_bytes: u64,
    pub transfers_completed: u64,
}

impl NodeTotals {
    pub fn read(state: &NodeState) -> NodeTotals {
        let relaxed = Ordering::Relaxed;
        NodeTotals {
            bytes_from_seed: state.received.from_seed.load(relaxed),
            bytes_from_same_site_peers: state.received.from_local_peers.load(relaxed),
            bytes_from_other_site_peers: state.received.from_remote_peers.load(relaxed),
            bytes_served: state.served.chunk_bytes_served.load(relaxed),
            chunks_served: state.served.chunks_served.load(relaxed),
            uploads_refused: state.served.uploads_refused.load(relaxed),
            chunks_received: state.stats.chunks_received.load(relaxed),
            chunk_failures: state.stats.chunk_failures.load(relaxed),
            duplicate_bytes: state.stats.duplicate_bytes.load(relaxed),
            transfers_completed: state.stats.transfers_completed.load(relaxed),
        }
    }
}

/// Builds one exposition: every call registers one metric (or one family) with its values.
struct Exposition {
    registry: Registry,
}

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn clamp(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Exposition {
    fn new() -> Self {
        Exposition {
            registry: Registry::default(),
        }
    }

    /// A counter; `name` without `_total`, which the encoder appends.
    fn counter(&mut self, name: &str, help: &str, value: u64) {
        let counter: Counter = Counter::default();
        counter.inc_by(value);
        self.registry.register(name, help, counter);
    }

    fn counters(&mut self, name: &str, help: &str, values: Vec<(Labels, u64)>) {
        let family: Family<Labels, Counter> = Family::default();
        for (labels, value) in values {
            family.get_or_create(&labels).inc_by(value);
        }
        self.registry.register(name, help, family);
    }

    fn gauge(&mut self, name: &str, help: &str, value: u64) {
        let gauge: Gauge = Gauge::default();
        gauge.set(clamp(value));
        self.registry.register(name, help, gauge);
    }

    fn gauges(&mut self, name: &str, help: &str, values: Vec<(Labels, u64)>) {
        let family: Family<Labels, Gauge> = Family::default();
        for (labels, value) in values {
            family.get_or_create(&labels).set(clamp(value));
        }
        self.registry.register(name, help, family);
    }

    fn render(self) -> String {
        let mut text = String::new();
        if let Err(error) = prometheus_text::encode(&mut text, &self.registry) {
            // Writing into a String cannot fail; an encoder bug shows as an empty scrape.
            tracing::warn!(%error, "could not encode metrics");
            text.clear();
        }
        text
    }
}

/// Install states every node reports, zero included, so a dashboard's series never vanish.
const INSTALL_STATES: [&str; 7] = [
    "installing",
    "installed",
    "failed",
    "rolling_back",
    "rolled_back",
    "uninstalling",
    "uninstalled",
];

/// The node's metrics as Prometheus text.
pub async fn render_node(state: &Arc<NodeState>) -> String {
    let totals = NodeTotals::read(state);
    let cache = state.cache.stats();
    let seed_connected = state.seed_connected().await;
    let records = match state.installer() {
        Ok(installer) => tokio::task::spawn_blocking(move || installer.installed())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    let peers = state.stats.peers();
    let known = state.known_peers().len() as u64;
    let transfers = state.transfers.snapshot().len() as u64;
    // The endpoint's connections are the seed's (when up) plus peers', both directions.
    let connections = state.endpoint.open_connections() as u64;
    let peer_connections = connections.saturating_sub(u64::from(seed_connected));

    let mut out = Exposition::new();
    out.gauges(
        "pkgmesh_node_info",
        "This node's name and site (always 1)",
        vec![(
            labels(&[
                ("node", state.settings.identity.name()),
                ("site", &state.settings.site),
            ]),
            1,
        )],
    );
    out.counters(
        "pkgmesh_node_received_bytes",
        "Chunk bytes received and verified, by source, over finished transfers (duplicates excluded)",
        vec![
            (labels(&[("source", "seed")]), totals.bytes_from_seed),
            (
                labels(&[("source", "peer_same_site")]),
                totals.bytes_from_same_site_peers,
            ),
            (
                labels(&[("source", "peer_other_site")]),
                totals.bytes_from_other_site_peers,
            ),
        ],
    );
    out.counter(
        "pkgmesh_node_served_bytes",
        "Chunk bytes sent to peers",
        totals.bytes_served,
    );
    out.counter(
        "pkgmesh_node_served_chunks",
        "Chunks sent to peers",
        totals.chunks_served,
    );
    out.counter(
        "pkgmesh_node_uploads_refused",
        "Chunk requests turned away because the upload slots were full",
        totals.uploads_refused,
    );
    out.counter(
        "pkgmesh_node_chunks_verified",
        "Chunks received that passed verification, over finished transfers",
        totals.chunks_received,
    );
    out.counter(
        "pkgmesh_node_chunk_failures",
        "Chunk requests that failed (timeouts, refusals, lost connections, bad hashes), over finished transfers",
        totals.chunk_failures,
    );
    out.counter(
        "pkgmesh_node_duplicate_bytes",
        "Verified bytes of chunks already held when they arrived (endgame races)",
        totals.duplicate_bytes,
    );
    out.counter(
        "pkgmesh_node_transfers_completed",
        "Blob transfers that ended with every chunk verified",
        totals.transfers_completed,
    );
    out.gauge(
        "pkgmesh_node_transfers_in_flight",
        "Blob transfers running now",
        transfers,
    );
    out.gauge(
        "pkgmesh_node_cache_used_bytes",
        "Chunk bytes in the cache",
        cache.used_bytes,
    );
    out.gauge(
        "pkgmesh_node_cache_budget_bytes",
        "The cache's budget",
        cache.budget_bytes,
    );
    out.gauge(
        "pkgmesh_node_cache_pinned_bytes",
        "Chunk bytes of pinned blobs",
        cache.pinned_bytes,
    );
    out.gauge(
        "pkgmesh_node_cache_blobs",
        "Blobs in the cache",
        cache.blobs,
    );
    out.counter(
        "pkgmesh_node_cache_hits",
        "Chunk reads served from the cache",
        cache.hits,
    );
    out.counter(
        "pkgmesh_node_cache_misses",
        "Chunk reads the cache could not serve",
        cache.misses,
    );
    out.counter(
        "pkgmesh_node_cache_evicted_chunks",
        "Chunks evicted to stay within the budget",
        cache.evicted_chunks,
    );
    out.counter(
        "pkgmesh_node_cache_evicted_bytes",
        "Bytes evicted to stay within the budget",
        cache.evicted_bytes,
    );
    out.counter(
        "pkgmesh_node_cache_rotted_chunks",
        "Chunks that failed verification at rest and were dropped",
        cache.rotted_chunks,
    );
    out.gauge(
        "pkgmesh_node_seed_connected",
        "1 while the node holds a connection to the seed",
        u64::from(seed_connected),
    );
    out.gauge(
        "pkgmesh_node_peer_connections",
        "QUIC connections open with peers, both directions",
        peer_connections,
    );
    out.gauge(
        "pkgmesh_node_peers_known",
        "Peers heard of from the tracker",
        known,
    );
    out.gauge(
        "pkgmesh_node_peers_banned",
        "Peers whose last ban is in the exchange table",
        peers.iter().filter(|p| p.banned.is_some()).count() as u64,
    );
    let mut by_state: BTreeMap<&str, u64> = INSTALL_STATES.iter().map(|s| (*s, 0)).collect();
    for record in &records {
        *by_state.entry(record.state.as_str()).or_default() += 1;
    }
    out.gauges(
        "pkgmesh_node_packages",
        "Packages with an install record, by the state of their last action",
        by_state
            .into_iter()
            .map(|(s, n)| (labels(&[("state", s)]), n))
            .collect(),
    );
    out.render()
}

/// Deployment and per-node install states the seed reports, zero included.
const DEPLOYMENT_STATES: [DeploymentState; 3] = [
    DeploymentState::Active,
    DeploymentState::Stopped,
    DeploymentState::Cancelled,
];
const NODE_DEPLOY_STATES: [NodeDeployState; 5] = [
    NodeDeployState::Pending,
    NodeDeployState::Downloading,
    NodeDeployState::Installing,
    NodeDeployState::Succeeded,
    NodeDeployState::Failed,
];

/// The seed's metrics as Prometheus text.
pub fn render_seed(state: &SeedState) -> String {
    let relaxed = Ordering::Relaxed;
    let counters = &state.counters;
    let cache = state.cache.stats();
    let mut sites: BTreeMap<String, u64> = BTreeMap::new();
    {
        let tracker = state
            .tracker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (_, meta) in tracker.nodes() {
            *sites.entry(meta.site.clone()).or_default() += 1;
        }
    }
    let deployments = state.deployments.list();
    let mut deployment_states: BTreeMap<String, u64> = DEPLOYMENT_STATES
        .iter()
        .map(|s| (s.to_string(), 0))
        .collect();
    let mut install_states: BTreeMap<String, u64> = NODE_DEPLOY_STATES
        .iter()
        .map(|s| (s.to_string(), 0))
        .collect();
    for info in &deployments {
        *deployment_states.entry(info.state.to_string()).or_default() += 1;
        for status in info.nodes.values() {
            *install_states.entry(status.state.to_string()).or_default() += 1;
        }
    }

    let mut out = Exposition::new();
    out.counter(
        "pkgmesh_seed_served_bytes",
        "Chunk bytes the seed sent to nodes",
        counters.chunk_bytes_served.load(relaxed),
    );
    out.counter(
        "pkgmesh_seed_served_chunks",
        "Chunks the seed sent to nodes",
        counters.chunks_served.load(relaxed),
    );
    out.counters(
        "pkgmesh_seed_admission_decisions",
        "Chunk requests by origin admission's decision: served by the seed, or redirected to peers",
        vec![
            (
                labels(&[("decision", "served")]),
                counters.chunks_served.load(relaxed),
            ),
            (
                labels(&[("decision", "redirected")]),
                counters.redirects.load(relaxed),
            ),
        ],
    );
    out.counter(
        "pkgmesh_seed_origin_reads",
        "Range reads of the origin store",
        counters.origin_reads.load(relaxed),
    );
    out.counter(
        "pkgmesh_seed_origin_read_bytes",
        "Bytes read from the origin store",
        counters.origin_bytes_read.load(relaxed),
    );
    out.gauges(
        "pkgmesh_seed_nodes",
        "Nodes the tracker knows, by site",
        sites
            .into_iter()
            .map(|(site, n)| (labels(&[("site", &site)]), n))
            .collect(),
    );
    out.gauges(
        "pkgmesh_seed_deployments",
        "Deployments by state",
        deployment_states
            .into_iter()
            .map(|(s, n)| (labels(&[("state", &s)]), n))
            .collect(),
    );
    out.gauges(
        "pkgmesh_seed_deployment_installs",
        "Nodes of deployments' current runs, by install state",
        install_states
            .into_iter()
            .map(|(s, n)| (labels(&[("state", &s)]), n))
            .collect(),
    );
    out.gauge(
        "pkgmesh_seed_cache_used_bytes",
        "Chunk bytes in the seed's cache",
        cache.used_bytes,
    );
    out.gauge(
        "pkgmesh_seed_cache_budget_bytes",
        "The seed's cache budget",
        cache.budget_bytes,
    );
    out.render()
}

/// Whose metrics a listener serves.
#[derive(Clone)]
pub enum MetricsSource {
    Node(Arc<NodeState>),
    Seed(Arc<SeedState>),
}

impl MetricsSource {
    pub async fn render(&self) -> String {
        match self {
            MetricsSource::Node(state) => render_node(state).await,
            MetricsSource::Seed(state) => render_seed(state),
        }
    }
}

/// A `/metrics` answer.
pub fn metrics_response(text: String) -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
}

async fn metrics(State(source): State<MetricsSource>) -> Response {
    metrics_response(source.render().await)
}

/// Serves `GET /metrics` over plain HTTP on `addr` until the returned task is aborted.
/// Returns the address bound (useful with port 0).
pub async fn serve_metrics(
    addr: SocketAddr,
    source: MetricsSource,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    let local = listener.local_addr()?;
    let router = Router::new()
        .route("/metrics", get(metrics))
        .with_state(source);
    let task = tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router).await {
            tracing::warn!(%error, "the metrics listener stopped");
        }
    });
    tracing::info!(%local, "metrics listening");
    Ok((local, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exchange_table_stays_bounded_and_forgets_the_stalest() {
        let mut table = HashMap::new();
        for i in 0..MAX_PEER_RECORDS {
            let record = entry(&mut table, &format!("peer-{i}"));
            record.last_exchange = 1000 + i as u64;
        }
        entry(&mut table, "peer-0").last_exchange = 5000;
        entry(&mut table, "newcomer");
        assert_eq!(table.len(), MAX_PEER_RECORDS);
        assert!(table.contains_key("peer-0"), "recently refreshed");
        assert!(!table.contains_key("peer-1"), "the stalest goes");
        assert!(table.contains_key("newcomer"));
    }

    #[test]
    fn sent_chunks_add_up_per_peer() {
        let stats = NodeStats::default();
        stats.record_sent("a", 100);
        stats.record_sent("a", 50);
        stats.record_sent("b", 7);
        let peers = stats.peers();
        assert_eq!(peers.len(), 2);
        assert_eq!((peers[0].chunks_sent, peers[0].bytes_sent), (2, 150));
        assert_eq!((peers[1].chunks_sent, peers[1].bytes_sent), (1, 7));
        assert!(peers[0].last_exchange > 0);
    }

    #[test]
    fn an_exposition_is_prometheus_text() {
        let mut out = Exposition::new();
        out.counter("x_bytes", "Bytes", 5);
        out.counters("y", "Labelled", vec![(labels(&[("source", "seed")]), 3)]);
        out.gauge("z", "A gauge", u64::MAX);
        let text = out.render();
        assert!(
            text.contains("# TYPE x_bytes_total counter\nx_bytes_total 5\n"),
            "{text}"
        );
        assert!(text.contains("y_total{source=\"seed\"} 3\n"), "{text}");
        assert!(text.contains(&format!("z {}\n", i64::MAX)), "{text}");
        assert!(
            !text.contains("# EOF"),
            "the 0.0.4 format has no EOF marker"
        );
    }
}
