//! A discrete-event simulation of one fleet fetching one package at the same moment, driving
//! the real swarm scheduler (`pkgmesh_node::swarm::scheduler`) on every node and the real
//! origin admission (`pkgmesh_node::swarm::admission`) on the seed. Nothing of the scheduling is
//! re-implemented: the simulator only plays the part of `peer::fetch` (the I/O driver), the
//! peers' chunk servers, the seed's service and tracker, and the network.
//!
//! # The model
//!
//! - **Time** is virtual, in nanoseconds from the start, handed to the scheduler and admission
//!   as `base + Duration::from_nanos(t)` for one `base` Instant: both only ever subtract
//!   Instants, so a run depends on `--seed` alone. Events at the same instant run in the order
//!   they were scheduled.
//! - **Nodes** sit in sites (node `i` in site `i mod sites`); every node's daemon has announced
//!   itself (with nothing held) before the deployment, and every node starts its fetch at time
//!   0 (or uniformly within `start_spread`).
//! - **Links** are first-in-first-out queues with a rate: each node's upload and download (the
//!   `rate`), each site's WAN link in each direction, and the seed's upload. A chunk request
//!   reaching a node that holds the chunk queues on that node's upload link at once: this is
//!   exactly the node's upload cap, a token bucket charged with the whole chunk before it is
//!   sent, which serves concurrent requests in arrival order. When the chunk's turn on the
//!   upload comes, it queues on each further link of its path (the sender's site WAN out and
//!   the receiver's site WAN in when it crosses sites, then the receiver's download): it starts
//!   on each link when that link is free and no earlier than on the previous one, occupies it
//!   for `size / rate`, and has fully arrived when the slowest of them is through, plus the
//!   one-way latency. A link is thus never used beyond its rate, and a slow upstream does not
//!   block a link for others (its bytes are assumed buffered in flight, as QUIC windows do).
//!   This is a store-and-forward-free, cut-through approximation of fair sharing: aggregate
//!   throughput per link is exact, while a chunk's latency under load is FIFO's, not
//!   processor sharing's.
//! - **Latency**: `latency` one way within a site; `latency + wan_latency` across sites and to
//!   or from the seed (which sits behind its own link, outside every site). Control messages
//!   (requests, "not held", redirects, tracker traffic) take latency only, no bandwidth.
//! - **The driver** is `peer::fetch` as written: a `GetPeers` (32 peers) at the start and on
//!   every `AskForPeers`; `Request` → a request to a peer or the seed; `Cancel` → the request's
//!   answer is dropped (bytes already queued still use the links); a peer answers "not held" if
//!   it does not hold the chunk when the request arrives; the seed's `TryPeers` becomes
//!   `SeedRedirected` with the tracker's peer info; `Tick` when `poll_timeout` comes due; at
//!   `Done` every request still running is dropped and the scheduler freed. Nodes hear what
//!   others hold only through the tracker (`GetPeers`, redirects), as the real driver does.
//! - **Announcements** follow `peer::announce_loop`: a verified chunk wakes the announcer, which
//!   waits 300 ms (batching), then sends the full bitfield; chunks verified while one is in
//!   flight wake it again. The tracker sees the bitfield one latency after it is read.
//! - **The seed** decides each chunk request with the real `Admission` (holders from the
//!   tracker, `reachable` = known to the tracker), and sends served chunks over its own upload
//!   link. The origin behind it is free.
//! - **Not modelled**: losses and failures (no node fails, lies or stalls), connection set-up
//!   and connection limits, CPU and disk, the periodic 20 s refresh (change-driven
//!   announcements already carry everything), control-message bandwidth.

pub mod tracker;

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use pkgmesh_node::peer::NodeSettings;
use pkgmesh_node::swarm::admission::{Admission, ChunkAsk, Decision, DEFAULT_RECENT_WINDOW};
use pkgmesh_node::swarm::scheduler::{
    Action, ByteCounts, Event, FailReason, PeerCandidate, Scheduler, SchedulerConfig, Source,
};
use pkgmesh_protocol::bitfield::Bitfield;
use pkgmesh_protocol::blob::{BlobId, ChunkLayout};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use tracker::{PeerEntry, SimTracker};

/// The one blob the fleet fetches.
const BLOB: BlobId = BlobId([0x5a; 32]);
/// Peers asked for in one `GetPeers` (`peer::fetch::PEERS_PER_ASK`).
const PEERS_PER_ASK: usize = 32;
/// The announcer's batching delay after a change (`peer::CHANGE_BATCH`).
const CHANGE_BATCH: u64 = 300_000_000;
const NS: f64 = 1e9;

/// One simulation run.
#[derive(Debug, Clone)]
pub struct Config {
    pub nodes: u32,
    pub size_bytes: u64,
    pub sites: u32,
    /// Every node's upload and download rate, Mbit/s.
    pub rate_mbit: f64,
    /// Each site's WAN link, each direction, Mbit/s; 0 is unlimited.
    pub wan_mbit: f64,
    /// The seed's upload, Mbit/s; 0 is unlimited.
    pub seed_rate_mbit: f64,
    /// One-way latency within a site.
    pub latency: Duration,
    /// Added one way across a WAN link (between sites, and to or from the seed).
    pub wan_latency: Duration,
    pub seed: u64,
    /// Nodes start uniformly within this span.
    pub start_spread: Duration,
    /// Stop here even if some nodes are not done.
    pub max_time: Duration,
    /// Run `Scheduler::check_invariants` after every step (slow; for tests).
    pub check_invariants: bool,
    /// Progress lines on stderr every this much virtual time.
    pub progress_every: Option<Duration>,
    /// How the seed's tracker orders the holders of a chunk for admission.
    pub holders_order: HoldersOrder,
    /// Nodes per site allowed to fetch from outside it (the seed's per-site `wan_fetchers`
    /// setting, applied to every site); 0 is no limit. See [`Sim::arrive`].
    pub wan_fetchers: u32,
    /// Chunk uploads a node has in progress at most (`NodeSettings::max_uploads`): a request
    /// beyond them is answered `Unavailable` ("busy"), which the driver reports as `Refused`.
    /// 0 is no limit.
    pub max_uploads: usize,
    /// Admission's memory of recent serves (`Admission::new`).
    pub recent_window: Duration,
    pub scheduler: SchedulerConfig,
}

/// The order in which the tracker hands a chunk's holders to admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldersOrder {
    /// As `Tracker::holders_of_chunk` does: `HashMap` iteration order, the same for every asker.
    Hash,
    /// A fresh random sample for every request (what a tracker that shuffled would give).
    Random,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nodes: 10_000,
            size_bytes: 1024 << 20,
            sites: 20,
            rate_mbit: 100.0,
            wan_mbit: 1000.0,
            seed_rate_mbit: 1000.0,
            latency: Duration::from_millis(1),
            wan_latency: Duration::from_millis(20),
            seed: 1,
            start_spread: Duration::ZERO,
            max_time: Duration::from_secs(3600),
            check_invariants: false,
            progress_every: None,
            holders_order: HoldersOrder::Hash,
            wan_fetchers: 0,
            max_uploads: NodeSettings::DEFAULT_MAX_UPLOADS,
            recent_window: DEFAULT_RECENT_WINDOW,
            scheduler: SchedulerConfig::default(),
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub nodes: u32,
    pub done: u32,
    pub size_bytes: u64,
    pub chunk_bytes: u32,
    pub chunks: u32,
    /// Size ÷ node rate: the time one node needs at its own rate.
    pub ideal_s: f64,
    pub min_s: f64,
    pub p50_s: f64,
    pub p90_s: f64,
    pub p99_s: f64,
    pub max_s: f64,
    /// Payload bytes the seed sent ÷ size.
    pub origin_tx_ratio: f64,
    /// Payload bytes into each site over its WAN link ÷ size.
    pub wan_per_site_max: f64,
    pub wan_per_site_mean: f64,
    pub seed_served: u64,
    pub seed_served_after_peer_failure: u64,
    pub seed_redirected: u64,
    pub requests: u64,
    pub not_held: u64,
    pub refused: u64,
    pub cancels: u64,
    pub bans: u64,
    pub get_peers: u64,
    /// Verified payload by source over all nodes, ÷ (size × nodes).
    pub from_seed_ratio: f64,
    pub from_local_ratio: f64,
    pub from_remote_ratio: f64,
    pub duplicate_ratio: f64,
    /// Peers a node had heard of when it finished, on average.
    pub peers_known_mean: f64,
    /// Verified bytes from other sites' nodes for chunks the seed had redirected, and for the
    /// rest (picked from what the tracker said remote peers hold), ÷ (size × nodes).
    pub remote_after_redirect_ratio: f64,
    pub remote_fresh_ratio: f64,
    /// The busiest node's upload: seconds queued ÷ the run's length.
    pub upload_busy_max: f64,
    pub upload_busy_mean: f64,
    pub events: u64,
    pub sim_s: f64,
}

impl Report {
    pub fn max_vs_ideal(&self) -> f64 {
        self.max_s / self.ideal_s
    }
}

/// Who sends a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Src {
    Seed,
    Node(u32),
}

#[derive(Debug)]
struct Link {
    ns_per_byte: f64,
    free_at: u64,
}

impl Link {
    fn new(mbit: f64) -> Self {
        Link {
            ns_per_byte: if mbit > 0.0 { 8000.0 / mbit } else { 0.0 },
            free_at: 0,
        }
    }

    /// Queues `bytes` ready from `ready` on; the (start, end) of its turn.
    fn book(&mut self, ready: u64, bytes: u64) -> (u64, u64) {
        let start = ready.max(self.free_at);
        let end = start + (bytes as f64 * self.ns_per_byte).round() as u64;
        self.free_at = end;
        (start, end)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Announcer {
    Idle,
    /// Waiting out the batching delay; the send is scheduled.
    Batching,
    /// An announcement is on its way; `true` if woken meanwhile.
    Sending(bool),
}

struct Node {
    site: u32,
    start: u64,
    sched: Option<Box<Scheduler>>,
    holds: Bitfield,
    done_at: Option<u64>,
    up: Link,
    down: Link,
    /// When each upload in progress ends (first in, first out).
    uploads: VecDeque<u64>,
    /// Chunks the seed redirected this node for (diagnostics).
    redirected: Bitfield,
    /// The driver's running requests, by (source, chunk).
    running: BTreeMap<(Src, u32), u32>,
    tick_at: Option<u64>,
    announcer: Announcer,
}

#[derive(Debug, Clone, Copy)]
struct Transfer {
    receiver: u32,
    src: Src,
    index: u32,
    sent_at: u64,
    after_peer_failure: bool,
    /// When the receiver dropped it (cancel, a newer request, or done).
    cancelled_at: Option<u64>,
    /// End of its turn on the sender's upload.
    up_end: u64,
}

enum Ev {
    Start(u32),
    Tick(u32),
    /// A chunk request reaches its source.
    Arrive(u32),
    /// A chunk's turn on its sender's upload begins.
    Send(u32),
    /// The chunk's last byte reached the receiver.
    Deliver(u32),
    NotHeld(u32),
    Refused(u32),
    Redirected(u32, Vec<PeerEntry>),
    GetPeersAtSeed(u32),
    Peers(u32, Vec<PeerEntry>),
    AnnounceSend(u32),
    AnnounceAtSeed(u32, Bitfield),
    AnnounceDone(u32),
}

struct Entry {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    /// Reversed: the heap pops the earliest, then the first scheduled.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

struct Sim {
    cfg: Config,
    layout: ChunkLayout,
    base: Instant,
    now: u64,
    queue: BinaryHeap<Entry>,
    seq: u64,
    nodes: Vec<Node>,
    names: Vec<String>,
    site_names: Vec<String>,
    /// The nodes of each site that may fetch across its WAN link (with `wan_fetchers`).
    fetchers: Vec<Vec<u32>>,
    is_fetcher: Vec<bool>,
    wan_in: Vec<Link>,
    wan_out: Vec<Link>,
    wan_in_bytes: Vec<u64>,
    seed_up: Link,
    seed_tx_bytes: u64,
    admission: Admission,
    tracker: SimTracker,
    transfers: Vec<Transfer>,
    free_transfers: Vec<u32>,
    done: u32,
    events: u64,
    requests: u64,
    not_held: u64,
    refused: u64,
    cancels: u64,
    bans: u64,
    get_peers: u64,
    bytes: ByteCounts,
    peers_known: u64,
    remote_after_redirect: u64,
    remote_fresh: u64,
    /// Upload time booked per node.
    upload_busy: Vec<u64>,
    /// The same at the last progress line.
    upload_busy_then: std::cell::RefCell<Vec<u64>>,
    /// Node whose events and actions are traced on stderr (debugging aid, `SIM_TRACE=n`).
    trace: Option<u32>,
}

/// Runs one simulation to the end (every node done, or `max_time`).
pub fn run(cfg: Config) -> Report {
    let mut sim = Sim::new(cfg);
    sim.run();
    sim.report()
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Sim {
    fn new(cfg: Config) -> Self {
        let layout = ChunkLayout::for_size(cfg.size_bytes).expect("package size");
        let count = layout.chunk_count();
        let sites = cfg.sites.max(1);
        let mut rng = StdRng::seed_from_u64(splitmix(cfg.seed));
        let spread = cfg.start_spread.as_nanos() as u64;
        let nodes: Vec<Node> = (0..cfg.nodes)
            .map(|i| Node {
                site: i % sites,
                start: if spread > 0 {
                    rng.random_range(0..=spread)
                } else {
                    0
                },
                sched: None,
                holds: Bitfield::new(count).expect("chunk count"),
                done_at: None,
                up: Link::new(cfg.rate_mbit),
                down: Link::new(cfg.rate_mbit),
                uploads: VecDeque::new(),
                redirected: Bitfield::new(count).expect("chunk count"),
                running: BTreeMap::new(),
                tick_at: None,
                announcer: Announcer::Idle,
            })
            .collect();
        let site_of: Vec<u32> = nodes.iter().map(|n| n.site).collect();
        let mut tracker = SimTracker::new(site_of, sites, count, splitmix(cfg.seed ^ 0x7472_6163));
        // The daemons announced themselves, holding nothing, before the deployment.
        for i in 0..cfg.nodes {
            tracker.announce(i, Bitfield::new(count).expect("chunk count"));
        }
        // The tracker ranks a site's nodes by a hash of blob and name: any fixed random order.
        let mut fetchers: Vec<Vec<u32>> = vec![Vec::new(); sites as usize];
        let mut is_fetcher = vec![cfg.wan_fetchers == 0; cfg.nodes as usize];
        if cfg.wan_fetchers > 0 {
            let mut ranked: Vec<(u64, u32)> = (0..cfg.nodes)
                .map(|i| (splitmix(cfg.seed ^ 0x6661_7463 ^ (u64::from(i) << 20)), i))
                .collect();
            ranked.sort_unstable();
            for (_, i) in ranked {
                let site = &mut fetchers[(i % sites) as usize];
                if site.len() < cfg.wan_fetchers as usize {
                    site.push(i);
                    is_fetcher[i as usize] = true;
                }
            }
        }
        let mut sim = Sim {
            fetchers,
            is_fetcher,
            layout,
            base: Instant::now(),
            now: 0,
            queue: BinaryHeap::new(),
            seq: 0,
            names: (0..cfg.nodes).map(|i| format!("n{i}")).collect(),
            site_names: (0..sites).map(|s| format!("site{s}")).collect(),
            wan_in: (0..sites).map(|_| Link::new(cfg.wan_mbit)).collect(),
            wan_out: (0..sites).map(|_| Link::new(cfg.wan_mbit)).collect(),
            wan_in_bytes: vec![0; sites as usize],
            seed_up: Link::new(cfg.seed_rate_mbit),
            seed_tx_bytes: 0,
            admission: Admission::new(cfg.recent_window),
            tracker,
            transfers: Vec::new(),
            free_transfers: Vec::new(),
            done: 0,
            events: 0,
            requests: 0,
            not_held: 0,
            refused: 0,
            cancels: 0,
            bans: 0,
            get_peers: 0,
            bytes: ByteCounts::default(),
            peers_known: 0,
            remote_after_redirect: 0,
            remote_fresh: 0,
            upload_busy: vec![0; cfg.nodes as usize],
            upload_busy_then: std::cell::RefCell::new(vec![0; cfg.nodes as usize]),
            trace: std::env::var("SIM_TRACE").ok().and_then(|v| v.parse().ok()),
            nodes,
            cfg,
        };
        for i in 0..sim.cfg.nodes {
            let at = sim.nodes[i as usize].start;
            sim.push(at, Ev::Start(i));
        }
        sim
    }

    fn at(&self, t: u64) -> Instant {
        self.base + Duration::from_nanos(t)
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Entry {
            at,
            seq: self.seq,
            ev,
        });
    }

    fn site_of(&self, src: Src) -> Option<u32> {
        match src {
            Src::Seed => None,
            Src::Node(n) => Some(self.nodes[n as usize].site),
        }
    }

    /// One-way latency between a node and a source.
    fn latency(&self, node: u32, src: Src) -> u64 {
        let local = self.site_of(src) == Some(self.nodes[node as usize].site);
        let mut d = self.cfg.latency;
        if !local {
            d += self.cfg.wan_latency;
        }
        d.as_nanos() as u64
    }

    fn source(&self, src: Src) -> Source {
        match src {
            Src::Seed => Source::Seed,
            Src::Node(n) => Source::Peer(self.names[n as usize].clone()),
        }
    }

    fn src(&self, source: &Source) -> Src {
        match source {
            Source::Seed => Src::Seed,
            Source::Peer(id) => Src::Node(self.node_of(id)),
        }
    }

    fn node_of(&self, name: &str) -> u32 {
        name[1..].parse().expect("a simulated node name")
    }

    fn candidates(&self, node: u32, peers: Vec<PeerEntry>) -> Vec<PeerCandidate> {
        let site = self.nodes[node as usize].site;
        peers
            .into_iter()
            .filter(|p| p.node != node)
            .map(|p| PeerCandidate {
                id: self.names[p.node as usize].clone(),
                site_is_local: p.site == site,
                chunks: p.chunks,
            })
            .collect()
    }

    fn run(&mut self) {
        let max = self.cfg.max_time.as_nanos() as u64;
        let every = self.cfg.progress_every.map(|d| d.as_nanos() as u64);
        let mut next_progress = every.unwrap_or(u64::MAX);
        while let Some(Entry { at, ev, .. }) = self.queue.pop() {
            if at > max || self.done == self.cfg.nodes {
                break;
            }
            while at >= next_progress {
                self.progress(next_progress);
                next_progress += every.unwrap_or(u64::MAX);
            }
            self.now = at;
            self.events += 1;
            self.step(ev);
        }
    }

    fn progress(&self, at: u64) {
        let held: u64 = self
            .nodes
            .iter()
            .map(|n| u64::from(n.holds.count_ones()))
            .sum();
        let total = u64::from(self.layout.chunk_count()) * u64::from(self.cfg.nodes);
        let stats = self.admission.stats();
        let (mut in_flight, mut peers, mut running) = (0u64, 0u64, 0u64);
        for node in &self.nodes {
            if let Some(sched) = &node.sched {
                running += 1;
                in_flight += u64::from(sched.in_flight());
                peers += sched
                    .peer_stats()
                    .iter()
                    .filter(|p| p.transfer.in_flight > 0)
                    .count() as u64;
            }
        }
        let every = self.cfg.progress_every.unwrap_or_default().as_nanos() as f64;
        let mut then = self.upload_busy_then.borrow_mut();
        let mut busy: Vec<f64> = self
            .upload_busy
            .iter()
            .zip(then.iter())
            .map(|(now, before)| (now - before) as f64 / every)
            .collect();
        then.copy_from_slice(&self.upload_busy);
        busy.sort_by(f64::total_cmp);
        let q = |p: f64| busy[((busy.len() - 1) as f64 * p) as usize];
        eprintln!(
            "  running={running} in_flight/node={:.1} peers_in_use/node={:.1} upload busy p10={:.2} p50={:.2} p90={:.2} max={:.2}",
            in_flight as f64 / running.max(1) as f64,
            peers as f64 / running.max(1) as f64,
            q(0.1), q(0.5), q(0.9), q(1.0)
        );
        eprintln!(
            "t={:.0}s done={} held={:.1}% seed_tx={:.3} seed_queue={:.1}s served={} apf={} redirected={} holders={} events={}",
            at as f64 / NS,
            self.done,
            100.0 * held as f64 / total as f64,
            self.seed_tx_bytes as f64 / self.cfg.size_bytes as f64,
            self.seed_up.free_at.saturating_sub(at) as f64 / NS,
            stats.served,
            stats.served_after_peer_failure,
            stats.redirected,
            self.tracker.holder_count(),
            self.events,
        );
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::Start(n) => self.start(n),
            Ev::Tick(n) => {
                if self.nodes[n as usize].tick_at == Some(self.now) {
                    self.nodes[n as usize].tick_at = None;
                    self.handle(n, Event::Tick);
                }
            }
            Ev::Arrive(t) => self.arrive(t),
            Ev::Send(t) => self.send(t),
            Ev::Deliver(t) => {
                let Some(transfer) = self.finish_transfer(t) else {
                    return;
                };
                let (n, index) = (transfer.receiver, transfer.index);
                let bytes = u64::from(self.layout.chunk_len(index).expect("index"));
                if let Src::Node(s) = transfer.src {
                    if self.nodes[s as usize].site != self.nodes[n as usize].site {
                        if self.nodes[n as usize].redirected.get(index) {
                            self.remote_after_redirect += bytes;
                        } else {
                            self.remote_fresh += bytes;
                        }
                    }
                }
                self.nodes[n as usize].holds.set(index, true);
                self.wake_announcer(n);
                let event = Event::ChunkVerified {
                    peer: self.source(transfer.src),
                    index,
                    bytes,
                    elapsed: Duration::from_nanos(self.now - transfer.sent_at),
                };
                self.handle(n, event);
            }
            Ev::NotHeld(t) => {
                self.not_held += 1;
                let Some(transfer) = self.finish_transfer(t) else {
                    return;
                };
                let event = Event::ChunkFailed {
                    peer: self.source(transfer.src),
                    index: transfer.index,
                    reason: FailReason::NotHeld,
                };
                self.handle(transfer.receiver, event);
            }
            Ev::Refused(t) => {
                self.refused += 1;
                let Some(transfer) = self.finish_transfer(t) else {
                    return;
                };
                let event = Event::ChunkFailed {
                    peer: self.source(transfer.src),
                    index: transfer.index,
                    reason: FailReason::Refused,
                };
                self.handle(transfer.receiver, event);
            }
            Ev::Redirected(t, peers) => {
                let Some(transfer) = self.finish_transfer(t) else {
                    return;
                };
                let n = transfer.receiver;
                self.nodes[n as usize].redirected.set(transfer.index, true);
                let event = Event::SeedRedirected {
                    index: transfer.index,
                    peers: self.candidates(n, peers),
                };
                self.handle(n, event);
            }
            Ev::GetPeersAtSeed(n) => {
                let cross_wan = self.is_fetcher[n as usize];
                let peers = self.tracker.peers(n, PEERS_PER_ASK, cross_wan);
                let at = self.now + self.latency(n, Src::Seed);
                self.push(at, Ev::Peers(n, peers));
            }
            Ev::Peers(n, peers) => {
                let candidates = self.candidates(n, peers);
                self.handle(n, Event::PeersDiscovered(candidates));
            }
            Ev::AnnounceSend(n) => {
                let node = &mut self.nodes[n as usize];
                node.announcer = Announcer::Sending(false);
                let snapshot = node.holds.clone();
                let at = self.now + self.latency(n, Src::Seed);
                self.push(at, Ev::AnnounceAtSeed(n, snapshot));
            }
            Ev::AnnounceAtSeed(n, chunks) => {
                self.tracker.announce(n, chunks);
                let at = self.now + self.latency(n, Src::Seed);
                self.push(at, Ev::AnnounceDone(n));
            }
            Ev::AnnounceDone(n) => {
                if self.nodes[n as usize].announcer == Announcer::Sending(true) {
                    self.nodes[n as usize].announcer = Announcer::Batching;
                    self.push(self.now + CHANGE_BATCH, Ev::AnnounceSend(n));
                } else {
                    self.nodes[n as usize].announcer = Announcer::Idle;
                }
            }
        }
    }

    fn start(&mut self, n: u32) {
        let have = Bitfield::new(self.layout.chunk_count()).expect("chunk count");
        let seed = splitmix(self.cfg.seed.wrapping_mul(0x1_0000_0001) ^ u64::from(n));
        let sched =
            Scheduler::new(self.layout, have, self.cfg.scheduler.clone(), seed).expect("scheduler");
        self.nodes[n as usize].sched = Some(Box::new(sched));
        // `fetch_pinned` asks for peers before its first poll.
        self.ask_for_peers(n);
        self.pump(n);
    }

    fn ask_for_peers(&mut self, n: u32) {
        self.get_peers += 1;
        let at = self.now + self.latency(n, Src::Seed);
        self.push(at, Ev::GetPeersAtSeed(n));
    }

    fn wake_announcer(&mut self, n: u32) {
        let node = &mut self.nodes[n as usize];
        match node.announcer {
            Announcer::Idle => {
                node.announcer = Announcer::Batching;
                self.push(self.now + CHANGE_BATCH, Ev::AnnounceSend(n));
            }
            Announcer::Batching | Announcer::Sending(true) => {}
            Announcer::Sending(false) => node.announcer = Announcer::Sending(true),
        }
    }

    fn handle(&mut self, n: u32, event: Event) {
        let now = self.at(self.now);
        if self.trace == Some(n) {
            eprintln!(
                "{:.3} n{n} <- {}",
                self.now as f64 / NS,
                brief_event(&event)
            );
        }
        let Some(sched) = self.nodes[n as usize].sched.as_mut() else {
            return;
        };
        sched.handle(event, now);
        self.pump(n);
    }

    /// Drains the node's actions, as the driver's loop does, and sets its next tick.
    fn pump(&mut self, n: u32) {
        let now = self.at(self.now);
        loop {
            let Some(sched) = self.nodes[n as usize].sched.as_mut() else {
                return;
            };
            let Some(action) = sched.poll_action(now) else {
                break;
            };
            if self.trace == Some(n) {
                eprintln!("{:.3} n{n} -> {action:?}", self.now as f64 / NS);
            }
            match action {
                Action::Request {
                    from,
                    index,
                    after_peer_failure,
                } => self.request(n, self.src(&from), index, after_peer_failure),
                Action::Cancel { from, index } => {
                    self.cancels += 1;
                    let src = self.src(&from);
                    if let Some(t) = self.nodes[n as usize].running.remove(&(src, index)) {
                        self.transfers[t as usize].cancelled_at = Some(self.now);
                    }
                }
                Action::Ban { .. } => self.bans += 1,
                Action::AskForPeers => self.ask_for_peers(n),
                Action::Done => {
                    self.node_done(n);
                    return;
                }
            }
        }
        let node = &mut self.nodes[n as usize];
        let sched = node.sched.as_ref().expect("running");
        if self.cfg.check_invariants {
            if let Err(e) = sched.check_invariants() {
                panic!("node {n} at {}ns: {e}", self.now);
            }
        }
        if let Some(due) = sched.poll_timeout() {
            if self.trace == Some(n) {
                eprintln!(
                    "{:.3} n{n} timeout at {:.6} in_flight {} seed {:?}",
                    self.now as f64 / NS,
                    due.saturating_duration_since(self.base).as_secs_f64(),
                    sched.in_flight(),
                    sched.seed_stats()
                );
            }
            // A deadline already past is due now; never twice at one instant.
            let due = due
                .saturating_duration_since(self.base)
                .as_nanos()
                .max(u128::from(self.now + 1000)) as u64;
            if node.tick_at.is_none_or(|at| due < at) {
                node.tick_at = Some(due);
                self.push(due, Ev::Tick(n));
            }
        }
    }

    fn node_done(&mut self, n: u32) {
        let node = &mut self.nodes[n as usize];
        node.done_at = Some(self.now);
        node.tick_at = None;
        let sched = node.sched.take().expect("running");
        self.peers_known += sched.peer_stats().len() as u64;
        let b = sched.bytes();
        self.bytes.from_seed += b.from_seed;
        self.bytes.from_local_peers += b.from_local_peers;
        self.bytes.from_remote_peers += b.from_remote_peers;
        self.bytes.duplicate += b.duplicate;
        // The driver aborts whatever still runs.
        let running = std::mem::take(&mut node.running);
        for t in running.into_values() {
            self.transfers[t as usize].cancelled_at = Some(self.now);
        }
        self.done += 1;
    }

    fn request(&mut self, n: u32, src: Src, index: u32, after_peer_failure: bool) {
        self.requests += 1;
        let transfer = Transfer {
            receiver: n,
            src,
            index,
            sent_at: self.now,
            after_peer_failure,
            cancelled_at: None,
            up_end: 0,
        };
        let t = match self.free_transfers.pop() {
            Some(t) => {
                self.transfers[t as usize] = transfer;
                t
            }
            None => {
                self.transfers.push(transfer);
                (self.transfers.len() - 1) as u32
            }
        };
        // A new request under the same key replaces (aborts) the old task.
        if let Some(old) = self.nodes[n as usize].running.insert((src, index), t) {
            self.transfers[old as usize].cancelled_at = Some(self.now);
        }
        let at = self.now + self.latency(n, src);
        self.push(at, Ev::Arrive(t));
    }

    /// The last event of a transfer: frees it, and gives it back unless the receiver dropped it.
    fn finish_transfer(&mut self, t: u32) -> Option<Transfer> {
        self.free_transfers.push(t);
        let transfer = &self.transfers[t as usize];
        if transfer.cancelled_at.is_some() {
            return None;
        }
        let key = (transfer.src, transfer.index);
        let running = &mut self.nodes[transfer.receiver as usize].running;
        if running.get(&key) == Some(&t) {
            running.remove(&key);
        }
        Some(*transfer)
    }

    fn arrive(&mut self, t: u32) {
        let Transfer {
            receiver,
            src,
            index,
            after_peer_failure,
            ..
        } = self.transfers[t as usize];
        let bytes = u64::from(self.layout.chunk_len(index).expect("index"));
        let back = self.now + self.latency(receiver, src);
        match src {
            Src::Node(s) => {
                let sender = &mut self.nodes[s as usize];
                if !sender.holds.get(index) {
                    self.push(back, Ev::NotHeld(t));
                    return;
                }
                // An upload is in progress from the request's arrival until its bytes are out
                // (the node's upload cap is a queue: it holds its permit while it waits).
                while sender.uploads.front().is_some_and(|&end| end <= self.now) {
                    sender.uploads.pop_front();
                }
                if self.cfg.max_uploads > 0 && sender.uploads.len() >= self.cfg.max_uploads {
                    self.push(back, Ev::Refused(t));
                    return;
                }
                let (start, end) = sender.up.book(self.now, bytes);
                sender.uploads.push_back(end);
                self.upload_busy[s as usize] += end - start;
                self.transfers[t as usize].up_end = end;
                self.push(start, Ev::Send(t));
            }
            Src::Seed if !self.is_fetcher[receiver as usize] => {
                // `SeedState::chunk` for a node of a WAN-limited site that is not one of its
                // fetchers: sent to the site's fetchers and every same-site holder, by name.
                let site = self.nodes[receiver as usize].site;
                let mut nodes: Vec<u32> = self.fetchers[site as usize].clone();
                nodes.extend_from_slice(self.tracker.site_holders(index, site));
                nodes.sort_by(|a, b| self.names[*a as usize].cmp(&self.names[*b as usize]));
                nodes.dedup();
                nodes.retain(|&node| node != receiver);
                let peers = self.tracker.peer_info(&nodes);
                self.push(back, Ev::Redirected(t, peers));
            }
            Src::Seed => {
                let asker = &self.names[receiver as usize];
                let site = if self.tracker.is_known(receiver) {
                    self.site_names[self.nodes[receiver as usize].site as usize].as_str()
                } else {
                    ""
                };
                let holders = match self.cfg.holders_order {
                    HoldersOrder::Hash => self.tracker.holders_of_chunk(
                        index,
                        receiver,
                        &self.names,
                        &self.site_names,
                    ),
                    HoldersOrder::Random => self.tracker.random_holders_of_chunk(
                        index,
                        receiver,
                        &self.names,
                        &self.site_names,
                    ),
                };
                let tracker = &self.tracker;
                let decision = self.admission.decide(
                    &ChunkAsk {
                        blob: BLOB,
                        index,
                        asker,
                        asker_site: site,
                        after_peer_failure,
                    },
                    &holders,
                    |name| tracker.is_known(name[1..].parse().expect("a simulated node name")),
                    self.base + Duration::from_nanos(self.now),
                );
                match decision {
                    Decision::Serve => {
                        let (start, end) = self.seed_up.book(self.now, bytes);
                        self.transfers[t as usize].up_end = end;
                        self.push(start, Ev::Send(t));
                    }
                    Decision::Redirect(names) => {
                        let nodes: Vec<u32> = names.iter().map(|n| self.node_of(n)).collect();
                        let peers = self.tracker.peer_info(&nodes);
                        self.push(back, Ev::Redirected(t, peers));
                    }
                }
            }
        }
    }

    /// The chunk's turn on the sender's upload: it goes on the wire, through the WAN links on
    /// its way and the receiver's download.
    fn send(&mut self, t: u32) {
        let transfer = &self.transfers[t as usize];
        let (receiver, src, index, up_end) = (
            transfer.receiver,
            transfer.src,
            transfer.index,
            transfer.up_end,
        );
        let back = self.latency(receiver, src);
        // The sender learns of a cancel one latency after it was made: until then it sends.
        if transfer
            .cancelled_at
            .is_some_and(|at| at + back <= self.now)
        {
            self.free_transfers.push(t);
            return;
        }
        let bytes = u64::from(self.layout.chunk_len(index).expect("index"));
        let site = self.nodes[receiver as usize].site;
        let (mut start, mut end) = (self.now, up_end);
        if src == Src::Seed {
            self.seed_tx_bytes += bytes;
        }
        if self.site_of(src) != Some(site) {
            if let Some(from) = self.site_of(src) {
                let (s, e) = self.wan_out[from as usize].book(start, bytes);
                (start, end) = (s, end.max(e));
            }
            let (s, e) = self.wan_in[site as usize].book(start, bytes);
            (start, end) = (s, end.max(e));
            self.wan_in_bytes[site as usize] += bytes;
        }
        let (_, e) = self.nodes[receiver as usize].down.book(start, bytes);
        end = end.max(e);
        self.push(end + back, Ev::Deliver(t));
    }

    fn report(&self) -> Report {
        let size = self.cfg.size_bytes as f64;
        let mut times: Vec<f64> = self
            .nodes
            .iter()
            .filter_map(|n| n.done_at.map(|d| (d - n.start) as f64 / NS))
            .collect();
        times.sort_by(f64::total_cmp);
        let pct = |p: f64| -> f64 {
            if times.is_empty() {
                return f64::NAN;
            }
            let rank = ((p * times.len() as f64).ceil() as usize).clamp(1, times.len());
            times[rank - 1]
        };
        let wan: Vec<f64> = self.wan_in_bytes.iter().map(|&b| b as f64 / size).collect();
        let stats = self.admission.stats();
        let fleet = size * f64::from(self.cfg.nodes);
        Report {
            nodes: self.cfg.nodes,
            done: self.done,
            size_bytes: self.cfg.size_bytes,
            chunk_bytes: self.layout.chunk_size(),
            chunks: self.layout.chunk_count(),
            ideal_s: size * 8.0 / (self.cfg.rate_mbit * 1e6),
            min_s: pct(0.0),
            p50_s: pct(0.5),
            p90_s: pct(0.9),
            p99_s: pct(0.99),
            max_s: pct(1.0),
            origin_tx_ratio: self.seed_tx_bytes as f64 / size,
            wan_per_site_max: wan.iter().copied().fold(0.0, f64::max),
            wan_per_site_mean: wan.iter().sum::<f64>() / wan.len() as f64,
            seed_served: stats.served,
            seed_served_after_peer_failure: stats.served_after_peer_failure,
            seed_redirected: stats.redirected,
            requests: self.requests,
            not_held: self.not_held,
            refused: self.refused,
            cancels: self.cancels,
            bans: self.bans,
            get_peers: self.get_peers,
            from_seed_ratio: self.bytes.from_seed as f64 / fleet,
            from_local_ratio: self.bytes.from_local_peers as f64 / fleet,
            from_remote_ratio: self.bytes.from_remote_peers as f64 / fleet,
            duplicate_ratio: self.bytes.duplicate as f64 / fleet,
            remote_after_redirect_ratio: self.remote_after_redirect as f64 / fleet,
            remote_fresh_ratio: self.remote_fresh as f64 / fleet,
            peers_known_mean: self.peers_known as f64 / f64::from(self.done.max(1)),
            upload_busy_max: self.upload_busy.iter().copied().max().unwrap_or(0) as f64
                / self.now.max(1) as f64,
            upload_busy_mean: self.upload_busy.iter().sum::<u64>() as f64
                / self.upload_busy.len().max(1) as f64
                / self.now.max(1) as f64,
            events: self.events,
            sim_s: self.now as f64 / NS,
        }
    }
}

fn brief_event(event: &Event) -> String {
    let names = |peers: &[PeerCandidate]| {
        peers
            .iter()
            .map(|p| {
                let held = p.chunks.as_ref().map_or(0, Bitfield::count_ones);
                format!("{}{}:{held}", p.id, if p.site_is_local { "*" } else { "" })
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    match event {
        Event::PeersDiscovered(peers) => format!("PeersDiscovered[{}]", names(peers)),
        Event::SeedRedirected { index, peers } => {
            format!("SeedRedirected({index})[{}]", names(peers))
        }
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 60 nodes in 3 sites fetching 8 MiB (32 chunks): small enough for a debug build, big
    /// enough that every site needs the WAN, redirects and same-site fan-out.
    fn small(seed: u64) -> Config {
        Config {
            nodes: 60,
            size_bytes: 8 << 20,
            sites: 3,
            rate_mbit: 100.0,
            wan_mbit: 200.0,
            seed_rate_mbit: 100.0,
            seed,
            ..Config::default()
        }
    }

    #[test]
    fn a_small_fleet_finishes_the_same_way_every_time_with_about_one_copy_per_link() {
        let first = run(small(5));
        assert_eq!(first, run(small(5)), "one seed, two different runs");
        assert_eq!(first.done, 60, "{first:?}");
        assert_eq!(first.chunks, 32);
        assert_eq!(first.bans, 0, "nobody misbehaves here: {first:?}");
        // Simulated time and bytes, not wall-clock: these do not depend on the machine.
        assert!(
            (1.0..=1.5).contains(&first.origin_tx_ratio),
            "origin sent {} copies: {first:?}",
            first.origin_tx_ratio
        );
        // Each site starts empty, so at least one copy crosses each WAN link.
        assert!(first.wan_per_site_mean >= 1.0, "{first:?}");
        assert!(first.wan_per_site_max <= 1.5, "{first:?}");
        // A gross bound only: with 8 MiB (0.7 s at the node rate) fixed delays dominate (the
        // seed's first copy, 300 ms announcement batches, 1 s pauses after a refusal).
        assert!(first.max_vs_ideal() < 15.0, "{first:?}");
    }

    #[test]
    fn every_scheduler_invariant_holds_at_every_step_of_a_small_fleet() {
        let report = run(Config {
            check_invariants: true,
            ..small(9)
        });
        assert_eq!(report.done, 60, "{report:?}");
    }
}
