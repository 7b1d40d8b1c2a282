//! The download scheduler: which chunk of one blob to ask from which peer, when to go to the
//! seed, when to duplicate, cancel or give up on a request, and when a peer is banned.
//!
//! A pure state machine in the manner of quinn-proto: the caller feeds [`Event`]s with
//! [`Scheduler::handle`] and drains [`Action`]s with [`Scheduler::poll_action`] until it returns
//! `None`; it calls `handle(Event::Tick, now)` when [`Scheduler::poll_timeout`] comes due. There
//! are no sockets, tasks or clocks here: time is the `now` the caller passes, randomness comes
//! from the seed given to [`Scheduler::new`], and nothing iterates a hash map, so one seed and
//! one sequence of events always give the same actions. The real node, the unit tests below and
//! the 10,000-node simulator drive this same code.
//!
//! Owns: the choice of chunk and source, per-source request windows sized from measured
//! throughput, request timeouts, endgame, the redirect dance with origin admission, trust and
//! bans of peers for this blob, and the counters operators read.
//!
//! Does not own: connections and streams, chunk verification and the cache (the caller verifies
//! every chunk before it reports [`Event::ChunkVerified`], so a chunk that fails never reaches
//! the cache), the tracker (the caller turns [`Action::AskForPeers`] into `GetPeers` and
//! [`Action::Ban`] into a report), and other blobs (one scheduler per blob being fetched).
//!
//! # Policy
//!
//! - **Rarest first.** A peer with room in its window gets the chunk we lack that the fewest
//!   peers can give, ties broken by a per-chunk random rank drawn from the seed, among chunks it
//!   holds and nobody is fetching. "Can give" means reachable, holding it, and not having failed
//!   a request for it. Different nodes draw different ranks, so a fleet starting together
//!   spreads out over the chunks.
//! - **Same site first.** Peers are served in the order local site, then measured rate, then a
//!   random rank; local peers fill their windows first. With
//!   [`SchedulerConfig::prefer_local_strictly`] (the default) a remote peer is only asked for a
//!   chunk no reachable local peer can give, so a site pulls each chunk across its WAN link about
//!   once.
//! - **Windows.** Each source may have `rate × target_queue_time ÷ chunk_size` requests in
//!   flight, clamped to `[min_in_flight_per_peer, max_in_flight_per_peer]`, starting at the
//!   minimum until its rate is measured. The rate is measured between deliveries while the
//!   source is busy, so concurrent streams and queued requests are both measured right. At most
//!   `max_peers_in_use` peers have requests in flight at once (the driver's connection budget).
//! - **The seed** is asked only for chunks no reachable peer holds (after peer discovery answered
//!   once, or `seed.wait_for_peers` passed), at most `seed.max_in_flight` at once, backing off
//!   after errors. When the seed answers `TryPeers` ([`Event::SeedRedirected`]), the chunk is
//!   fetched from the named peers even if their bitfields do not show it yet (admission names
//!   peers it has just served). A named peer that answers "not held" without having claimed the
//!   chunk is asked again after a short, growing delay; a named peer that fails otherwise is
//!   ruled out. Once no named or holding peer is left, or `seed.redirect_patience` has passed,
//!   the chunk goes back to the seed with `after_peer_failure: true`, which admission serves.
//!   The same happens to any chunk whose every holder failed us. Busy is not failed: when the
//!   named peers were only busy (refusals), the chunk goes back to the seed as a plain request
//!   for other names (admission picks among all holders per ask), up to [`MAX_REASKS`] times. A chunk nobody is known to
//!   hold is asked of the seed only while fewer than `seed.max_redirects_waiting` redirected
//!   chunks wait for their peers (only while none waits when every peer slot is busy): a node
//!   asking faster than it can follow its redirects lets them expire into requests the seed
//!   must serve. A peer of another site named in a redirect is asked for that chunk only: the
//!   bitfield the redirect carries for it is not taken in (a tracker answer's still is), so
//!   the seed's word for one chunk does not pull the rest of what it holds across the WAN
//!   link. When the seed cannot help (disabled, or backing off after errors), the next tick
//!   gives the peers that failed such a chunk another chance, so a fleet whose seed is gone
//!   still finishes from itself.
//! - **More peers.** [`Action::AskForPeers`] comes at the first poll (until discovery answers)
//!   and then at most every `ask_for_peers_interval`, when fewer than `min_useful_peers`
//!   reachable peers hold something we lack. When a fleet starts together the first answers
//!   name nobody, and what peers hold grows fastest in the first seconds, so the interval is
//!   short. An answer brings in what other sites' peers hold only every
//!   `remote_holdings_interval`; in between only same-site holdings are taken, so asking often
//!   does not pull the other sites' chunks across the WAN link before the site has them.
//! - **Endgame.** Once at most `endgame_threshold` chunks are missing, a peer with room and no
//!   fresh chunk to take gets a duplicate request for an outstanding chunk it holds (fewest
//!   requests first, then oldest), up to `endgame_max_requests_per_chunk` requests per chunk.
//!   Duplicates never go to the seed. When one copy verifies, the others get [`Action::Cancel`].
//! - **Timeouts** (checked on [`Event::Tick`]): a request fails when its source delivered nothing
//!   for `request_timeout` since it was sent, or when it is older than `request_max_age`. The
//!   request is cancelled, the chunk is asked elsewhere, and the peer gets one strike per tick
//!   however many of its requests timed out together (one stall is one offence).
//! - **Refusals** (a busy peer, over its upload cap) are not failures of the chunk: the peer
//!   gets no new request for `refused_backoff` and restarts at the smallest window, and the
//!   chunk stays its to give. Only `give_up_after_refusals` refusals in a row (refusals during
//!   one pause count once) count as failing the chunk, so a peer that always refuses cannot
//!   hold a chunk hostage; the seed then hears of it as a plain request, not as a failure.
//! - **Misbehaving peers.** A bad hash, a wrong length or an oversized frame bans the peer for
//!   this blob at once. `ban_after_timeouts` stalls in a row (a verified chunk resets the count),
//!   or `ban_after_false_claims` "not held" answers for chunks its bitfield claimed, ban it too.
//!   A banned peer gets no request again, even if rediscovered; [`Action::Ban`] is emitted once,
//!   after a [`Action::Cancel`] for each of its outstanding requests. A lost connection is not
//!   misbehaviour: the peer is put aside for `reconnect_backoff` (doubling on each loss, up to
//!   `max_reconnect_backoff`) and its requests go elsewhere.
//! - **Invariants** (checked by [`Scheduler::check_invariants`] after every step in the tests):
//!   a chunk we hold is never requested; outside endgame a chunk has at most one request; no
//!   source is asked beyond its window when the request is made; a banned or unreachable peer
//!   has no request outstanding; [`Action::Done`] comes exactly once, when every chunk is
//!   verified.
//!
//! # Driving it
//!
//! After every `handle`, drain `poll_action`; sleep until `poll_timeout` (or the next I/O) and
//! then send `Tick`. Report exactly one outcome per `Request` unless it was cancelled (late
//! reports are tolerated). Map the wire onto events: `Response::Chunk` verified with the
//! blob's chunk hashes → `ChunkVerified`; hash mismatch → `BadHash`; length mismatch →
//! `WrongLength`; `WireError::FrameTooLarge` → `FrameTooLarge`; `ErrorCode::NotFound` →
//! `NotHeld`; `Unavailable` or `Forbidden` → `Refused`; a stream or connection error →
//! `ConnectionLost`; `Response::TryPeers` → `SeedRedirected` (with `site_is_local` set from
//! `PeerInfo::site`). Leave this node itself out of every peer list it passes in.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use pkgmesh_protocol::bitfield::Bitfield;
use pkgmesh_protocol::blob::ChunkLayout;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::admission::DEFAULT_RECENT_WINDOW;

/// A node's name, as its certificate and the tracker carry it.
pub type PeerId = String;

/// Where a chunk is asked from or came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    Seed,
    Peer(PeerId),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Seed => write!(f, "the seed"),
            Source::Peer(id) => write!(f, "peer {id}"),
        }
    }
}

/// A peer as discovery (the tracker, or a seed redirect) describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCandidate {
    pub id: PeerId,
    /// The peer announced the same site as this node.
    pub site_is_local: bool,
    /// Chunks it holds, when known. Bits are added to what is already known of the peer (a
    /// tracker answer can be older than what the peer told us); a bitfield whose length is not
    /// the blob's chunk count is ignored.
    pub chunks: Option<Bitfield>,
}

/// Why a request for a chunk failed, as the driver saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailReason {
    /// The bytes did not match the chunk hash (nothing reached the cache).
    BadHash,
    /// The chunk header or body had a length other than the chunk's.
    WrongLength,
    /// A control frame was over the wire limit.
    FrameTooLarge,
    /// The driver's own deadline passed (the scheduler also times requests out on `Tick`).
    Timeout,
    /// The source answered that it does not hold the chunk (`ErrorCode::NotFound`).
    NotHeld,
    /// The source refused for now: busy, over its upload cap, shutting down
    /// (`ErrorCode::Unavailable`), or refused our role.
    Refused,
    /// The connection or the stream broke.
    ConnectionLost,
}

impl FailReason {
    /// What this failure bans a peer for at once, if anything.
    fn immediate_ban(self) -> Option<BanReason> {
        match self {
            FailReason::BadHash => Some(BanReason::BadHash),
            FailReason::WrongLength => Some(BanReason::WrongLength),
            FailReason::FrameTooLarge => Some(BanReason::FrameTooLarge),
            FailReason::Timeout
            | FailReason::NotHeld
            | FailReason::Refused
            | FailReason::ConnectionLost => None,
        }
    }
}

/// Why a peer was banned for this blob (what the driver reports to the tracker).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BanReason {
    BadHash,
    WrongLength,
    FrameTooLarge,
    /// Timed out `ban_after_timeouts` times in a row.
    Stalled,
    /// Answered "not held" `ban_after_false_claims` times for chunks its bitfield claimed.
    FalseClaims,
}

impl fmt::Display for BanReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            BanReason::BadHash => "sent a chunk that failed verification",
            BanReason::WrongLength => "sent a chunk of the wrong length",
            BanReason::FrameTooLarge => "sent a frame over the size limit",
            BanReason::Stalled => "stopped answering requests",
            BanReason::FalseClaims => "claimed chunks it did not hold",
        };
        f.write_str(text)
    }
}

/// What happened, fed to [`Scheduler::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Peers from the tracker (`GetPeers`). The first one, even empty, also tells the scheduler
    /// that discovery answered, so chunks nobody holds may now go to the seed.
    PeersDiscovered(Vec<PeerCandidate>),
    /// Everything a peer holds now (replaces what was known).
    PeerHave { peer: PeerId, chunks: Bitfield },
    /// A peer gained one chunk.
    PeerHaveOne { peer: PeerId, index: u32 },
    /// A chunk arrived and the caller verified it; `bytes` is its length, `elapsed` the time
    /// from request to last byte (kept for operators).
    ChunkVerified {
        peer: Source,
        index: u32,
        bytes: u64,
        elapsed: Duration,
    },
    /// A request failed. Reports for requests already cancelled or timed out are tolerated;
    /// a bad hash, wrong length or oversized frame bans the peer whenever it is reported.
    ChunkFailed {
        peer: Source,
        index: u32,
        reason: FailReason,
    },
    /// The seed answered `TryPeers` for this chunk.
    SeedRedirected {
        index: u32,
        peers: Vec<PeerCandidate>,
    },
    /// The connection to a peer is gone; its outstanding requests are void.
    PeerDisconnected(PeerId),
    /// Time passed: check timeouts, backoffs and deadlines.
    Tick,
}

/// What the driver should do, drained from [`Scheduler::poll_action`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send `GetChunk { index, after_peer_failure }` to `from`.
    Request {
        from: Source,
        index: u32,
        after_peer_failure: bool,
    },
    /// Stop this request (reset the stream); whatever it reports afterwards is tolerated.
    Cancel { from: Source, index: u32 },
    /// Drop this peer for this blob and report it to the tracker. Emitted once per peer.
    Ban { peer: PeerId, reason: BanReason },
    /// Ask the tracker for (more) peers and feed the answer back as [`Event::PeersDiscovered`].
    AskForPeers,
    /// Every chunk is verified. Emitted exactly once.
    Done,
}

/// How the seed (the origin, through admission) is used.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedPolicy {
    /// `false` never asks the seed (it is down, or a test wants peers only).
    pub enabled: bool,
    /// Requests to the seed in flight at once, the top of its window.
    pub max_in_flight: u32,
    /// Before peer discovery has answered once, chunks wait this long before the seed is asked
    /// for them, so a node that has not heard of its peers yet does not pull from the origin.
    pub wait_for_peers: Duration,
    /// How long a redirected chunk waits for the named peers before going back to the seed with
    /// `after_peer_failure`. Admission counts a node it served as a holder for its own recent
    /// window; waiting as long gives such a node time to finish receiving the chunk.
    pub redirect_patience: Duration,
    /// First delay before asking a named peer again after it said "not held" for a chunk it
    /// never claimed (it is probably still receiving it); doubles per answer up to
    /// [`MAX_NOT_YET_RETRY`].
    pub not_yet_retry: Duration,
    /// Pause after a failed seed request, doubling per consecutive failure up to
    /// `max_error_backoff`.
    pub error_backoff: Duration,
    pub max_error_backoff: Duration,
    /// Chunks no known peer holds are asked of the seed only while fewer than this many
    /// redirected chunks wait for a named peer (and, when every peer slot is busy, only while
    /// none waits): each answer is a redirect the node must follow within `redirect_patience`,
    /// and asking faster than it can follow made redirects expire into `after_peer_failure`
    /// requests the seed then served (163 copies of the package in a 500-node simulation).
    /// Default 8.
    pub max_redirects_waiting: u32,
}

impl Default for SeedPolicy {
    fn default() -> Self {
        SeedPolicy {
            enabled: true,
            max_in_flight: 8,
            wait_for_peers: Duration::from_secs(2),
            redirect_patience: DEFAULT_RECENT_WINDOW,
            not_yet_retry: Duration::from_millis(250),
            error_backoff: Duration::from_secs(1),
            max_error_backoff: Duration::from_secs(30),
            max_redirects_waiting: 8,
        }
    }
}

/// Tuning of one scheduler. Every field has a default suited to a fleet on a LAN or a WAN;
/// out-of-range values are raised to the nearest sane one by [`Scheduler::new`].
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// Peers with requests in flight at once (connections the driver keeps busy). Default 12.
    pub max_peers_in_use: usize,
    /// Window of a source whose rate is not measured yet, and the floor of every window
    /// (at least 1). Default 2: one request being served while the next is queued.
    pub min_in_flight_per_peer: u32,
    /// Ceiling of a peer's window. Default 16.
    pub max_in_flight_per_peer: u32,
    /// Work to keep queued at each source: window = rate × this ÷ chunk size. Default 500 ms,
    /// enough to hide a WAN round trip, short enough that a stall strands little.
    pub target_queue_time: Duration,
    /// A request fails when its source delivered nothing for this long since it was sent.
    /// Default 15 s.
    pub request_timeout: Duration,
    /// A request fails when older than this, even if its source keeps delivering other
    /// chunks. Default 60 s.
    pub request_max_age: Duration,
    /// Endgame starts when this many chunks or fewer are missing; 0 disables it. Default 16.
    pub endgame_threshold: u32,
    /// Requests for one chunk at once in endgame, the first included. Default 3.
    pub endgame_max_requests_per_chunk: u32,
    /// Stalls in a row that ban a peer. Default 3.
    pub ban_after_timeouts: u32,
    /// "Not held" answers for claimed chunks that ban a peer. Default 3.
    pub ban_after_false_claims: u32,
    /// Ask a remote peer only for chunks no reachable local peer can give. Default true.
    pub prefer_local_strictly: bool,
    /// A peer that refused a request (busy, over its upload cap) gets no new request for this
    /// long; the chunk stays its to give, so a busy peer does not push chunks to the seed.
    /// Default 1 s.
    pub refused_backoff: Duration,
    /// Refusals in a row after which a refused chunk counts as failed by that peer (and may go
    /// to the seed). Default 8: in a fleet fetching at once, a peer holding a wanted chunk is
    /// busy (at its upload cap) again and again, and giving up after 3 sent such chunks to the
    /// seed as failed, which it must then serve (13% more origin traffic with 500 nodes).
    pub give_up_after_refusals: u32,
    /// First pause after a lost connection; doubles per loss in a row. Default 2 s.
    pub reconnect_backoff: Duration,
    pub max_reconnect_backoff: Duration,
    /// How often to check whether to ask the tracker for more peers. Default 1 s: with 10 s
    /// a 16-node swarm learnt too late who held what and took 1.6 times the ideal time in the
    /// simulator, against 1.4 with 1 s (BENCHMARKS.md).
    pub ask_for_peers_interval: Duration,
    /// How often answers may bring in what other sites' peers hold; answers in between only
    /// bring in what same-site peers hold, so asking often does not pull the other sites'
    /// chunks across the WAN link before the site has them. Default 10 s.
    pub remote_holdings_interval: Duration,
    /// Ask for more peers when fewer reachable peers than this hold something we lack.
    /// Default 8.
    pub min_useful_peers: usize,
    pub seed: SeedPolicy,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_peers_in_use: 12,
            min_in_flight_per_peer: 2,
            max_in_flight_per_peer: 16,
            target_queue_time: Duration::from_millis(500),
            request_timeout: Duration::from_secs(15),
            request_max_age: Duration::from_secs(60),
            endgame_threshold: 16,
            endgame_max_requests_per_chunk: 3,
            ban_after_timeouts: 3,
            ban_after_false_claims: 3,
            prefer_local_strictly: true,
            refused_backoff: Duration::from_secs(1),
            give_up_after_refusals: 8,
            reconnect_backoff: Duration::from_secs(2),
            max_reconnect_backoff: Duration::from_secs(60),
            ask_for_peers_interval: Duration::from_secs(1),
            remote_holdings_interval: Duration::from_secs(10),
            min_useful_peers: 8,
            seed: SeedPolicy::default(),
        }
    }
}

impl SchedulerConfig {
    fn sanitized(mut self) -> Self {
        self.max_peers_in_use = self.max_peers_in_use.max(1);
        self.min_in_flight_per_peer = self.min_in_flight_per_peer.max(1);
        self.max_in_flight_per_peer = self.max_in_flight_per_peer.max(self.min_in_flight_per_peer);
        self.endgame_max_requests_per_chunk = self.endgame_max_requests_per_chunk.max(1);
        self.ban_after_timeouts = self.ban_after_timeouts.max(1);
        self.ban_after_false_claims = self.ban_after_false_claims.max(1);
        self.give_up_after_refusals = self.give_up_after_refusals.max(1);
        self.max_reconnect_backoff = self.max_reconnect_backoff.max(self.reconnect_backoff);
        // A zero interval would make `poll_timeout` due forever.
        self.ask_for_peers_interval = self.ask_for_peers_interval.max(Duration::from_millis(1));
        self.seed.max_in_flight = self.seed.max_in_flight.max(1);
        self.seed.max_error_backoff = self.seed.max_error_backoff.max(self.seed.error_backoff);
        self
    }
}

/// Wanted chunks `pick_fresh` checks, rarest first, before it goes through the peer's own
/// chunks instead: a short walk usually finds one, and its cost stays bounded when the peer
/// holds few of the many chunks wanted (the start of a fleet-wide fetch).
const SHORT_WALK: usize = 64;
/// Ceiling of the growing delay before a named peer that said "not held" is asked again:
/// about ten asks of it within the default 30 s `redirect_patience`.
pub const MAX_NOT_YET_RETRY: Duration = Duration::from_secs(5);
/// Times a redirected chunk whose peers were all busy goes back to the seed for other names
/// before busy counts as failed. Each answer names up to eight holders picked for this asker.
pub const MAX_REASKS: u32 = 3;
/// Deliveries closer together than this are pooled into the next rate sample, so that a burst
/// of chunks finishing together does not read as an infinite rate.
const MIN_RATE_SAMPLE: Duration = Duration::from_millis(1);
/// Weight of a new sample in a source's smoothed rate: reacts within a few chunks, does not
/// swing on one.
const RATE_SMOOTHING: f64 = 0.25;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    #[error("the bitfield of chunks held has {got} bits, the blob has {expected} chunks")]
    HaveLengthMismatch { expected: u32, got: u32 },
}

/// How far the blob is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    pub chunks_have: u32,
    pub chunks_total: u32,
    pub bytes_have: u64,
    pub bytes_total: u64,
}

/// Verified payload bytes by where they came from (chunks held at start are not counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ByteCounts {
    pub from_seed: u64,
    pub from_local_peers: u64,
    pub from_remote_peers: u64,
    /// Verified copies of chunks we already had (endgame races, late answers).
    pub duplicate: u64,
}

/// One source as operators see it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SourceStats {
    pub in_flight: u32,
    /// Requests it may have in flight now.
    pub window: u32,
    /// Smoothed delivery rate, once measured.
    pub rate_bytes_per_sec: Option<f64>,
    pub chunks_received: u64,
    pub bytes_received: u64,
    /// Failed requests of every kind, timeouts included.
    pub failures: u64,
    pub timeouts: u64,
    pub last_chunk_elapsed: Option<Duration>,
}

/// One peer as operators see it.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStats {
    pub id: PeerId,
    pub site_is_local: bool,
    pub chunks_held: u32,
    pub transfer: SourceStats,
    pub consecutive_timeouts: u32,
    pub consecutive_refusals: u32,
    pub false_claims: u32,
    pub banned: Option<BanReason>,
    /// Neither banned nor put aside after a lost connection.
    pub reachable: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SourceKey {
    Seed,
    Peer(usize),
}

#[derive(Debug, Clone, Copy)]
struct Outstanding {
    source: SourceKey,
    sent_at: Instant,
}

#[derive(Debug, Clone)]
struct Redirect {
    /// Peers the seed named, in its order (same site first).
    named: Vec<usize>,
    /// After this the chunk goes back to the seed with `after_peer_failure`.
    deadline: Instant,
    /// Named peers that said "not held" and are asked again only from the given instant.
    not_before: Vec<(usize, Instant)>,
    not_yet_answers: u32,
    /// Every named and holding peer turned it away busy: the seed is asked again, as a plain
    /// request, for more names (it picks among the chunk's holders for each ask).
    reask: bool,
    /// Times it was asked again so; after [`MAX_REASKS`] a busy fleet counts as failed.
    reasks: u32,
}

#[derive(Debug, Clone)]
enum Route {
    /// From peers that hold it, or from the seed when none does.
    Swarm,
    /// The seed said "try these peers".
    Redirected(Redirect),
    /// Peers failed us: the seed, saying so.
    SeedAfterPeerFailure,
}

/// Order of the chunks waiting for a first request: (availability, random rank, index).
type WantedKey = (u32, u32, u32);

#[derive(Debug)]
struct ChunkState {
    have: bool,
    /// Peers that can give it (reachable, holding it, not failed it), and how many of those
    /// are local. Rarity, the same-site rule and the seed decision all read these.
    availability: u32,
    local_availability: u32,
    rank: u32,
    requests: Vec<Outstanding>,
    /// Peers that failed a request for it (timeout, refusal, "not held"): asked elsewhere.
    failed_by: Vec<usize>,
    /// One of them failed for real (not only busy): the seed is told so when asked for it.
    peer_failed: bool,
    route: Route,
    /// Its key in `Scheduler::wanted`, while it is there.
    wanted_key: Option<WantedKey>,
}

#[derive(Debug, Default, Clone)]
struct Transfer {
    in_flight: u32,
    rate: Option<f64>,
    /// Since when it has had requests in flight without a break.
    busy_since: Option<Instant>,
    last_delivery: Option<Instant>,
    unsampled_bytes: u64,
    chunks_received: u64,
    bytes_received: u64,
    failures: u64,
    timeouts: u64,
    last_elapsed: Option<Duration>,
}

impl Transfer {
    fn window(&self, chunk_size: u32, target: Duration, min: u32, max: u32) -> u32 {
        match self.rate {
            None => min,
            Some(rate) => {
                let chunks = (rate * target.as_secs_f64() / f64::from(chunk_size.max(1))).ceil();
                // `as` saturates, and maps NaN to 0; the clamp does the rest.
                (chunks as u32).clamp(min, max)
            }
        }
    }

    /// Counts a delivery; when it answered a request of ours, also samples the rate over the
    /// time the source has been working since its previous delivery.
    fn record_delivery(&mut self, bytes: u64, elapsed: Duration, now: Instant, requested: bool) {
        if requested {
            let start = match (self.busy_since, self.last_delivery) {
                (Some(busy), Some(last)) => busy.max(last),
                (Some(busy), None) => busy,
                (None, Some(last)) => last,
                (None, None) => now,
            };
            let interval = now.saturating_duration_since(start);
            let total = self.unsampled_bytes.saturating_add(bytes);
            if interval < MIN_RATE_SAMPLE {
                self.unsampled_bytes = total;
            } else {
                let sample = total as f64 / interval.as_secs_f64();
                self.rate = Some(match self.rate {
                    None => sample,
                    Some(old) => old + RATE_SMOOTHING * (sample - old),
                });
                self.unsampled_bytes = 0;
            }
        }
        self.last_delivery = Some(now);
        self.chunks_received += 1;
        self.bytes_received = self.bytes_received.saturating_add(bytes);
        self.last_elapsed = Some(elapsed);
    }

    fn stats(&self, window: u32) -> SourceStats {
        SourceStats {
            in_flight: self.in_flight,
            window,
            rate_bytes_per_sec: self.rate,
            chunks_received: self.chunks_received,
            bytes_received: self.bytes_received,
            failures: self.failures,
            timeouts: self.timeouts,
            last_chunk_elapsed: self.last_elapsed,
        }
    }
}

#[derive(Debug)]
struct Peer {
    id: PeerId,
    local: bool,
    chunks: Bitfield,
    held: u32,
    rank: u64,
    transfer: Transfer,
    /// Counted in availability and eligible for requests: not banned and not put aside.
    usable: bool,
    banned: Option<BanReason>,
    down_until: Option<Instant>,
    connection_losses: u32,
    consecutive_timeouts: u32,
    false_claims: u32,
    /// After a refusal: no new request before this.
    paused_until: Option<Instant>,
    consecutive_refusals: u32,
    /// `Scheduler::wanted_epoch` when `pick_fresh` last found nothing it could give: until
    /// the wanted chunks or what it holds change, asking again would find nothing again.
    dry_at: Option<u64>,
}

#[derive(Debug, Default)]
struct SeedState {
    transfer: Transfer,
    backoff_until: Option<Instant>,
    consecutive_errors: u32,
}

/// The download of one blob on one node. See the module documentation for the policy.
#[derive(Debug)]
pub struct Scheduler {
    layout: ChunkLayout,
    config: SchedulerConfig,
    rng: StdRng,
    chunks: Vec<ChunkState>,
    have: Bitfield,
    have_count: u32,
    bytes_have: u64,
    peers: Vec<Peer>,
    peer_index: HashMap<PeerId, usize>,
    seed: SeedState,
    /// Chunks on the swarm route waiting for their first request.
    wanted: BTreeSet<WantedKey>,
    /// Counts the changes that can give a peer a wanted chunk to offer that it had none of: a
    /// chunk entering `wanted`, its last local holder going, failures forgiven. What a peer
    /// holds is the other half, tracked on the peer (`Peer::dry_at`).
    wanted_epoch: u64,
    /// Redirected chunks waiting for a request to a named peer.
    redirect_pending: BTreeSet<u32>,
    /// Chunks waiting for a request to the seed with `after_peer_failure`.
    seed_pending: BTreeSet<u32>,
    /// Redirected chunks whose peers were all busy, waiting to ask the seed for more names.
    seed_reask: BTreeSet<u32>,
    /// Chunks with at least one request outstanding.
    in_flight_chunks: BTreeSet<u32>,
    /// Peers with requests in flight (the ones "in use").
    busy_peers: BTreeSet<usize>,
    /// The earliest reconnect or refusal pause of a peer not banned, as `poll_timeout` needs
    /// it, kept up to date so that it does not walk every peer ever heard of.
    peer_timer: Option<Instant>,
    actions: VecDeque<Action>,
    /// Something changed since the last scheduling pass.
    dirty: bool,
    started: bool,
    peers_discovered: bool,
    seed_grace_until: Option<Instant>,
    next_ask_for_peers: Option<Instant>,
    /// When a tracker answer may next bring in what other sites' peers hold.
    remote_holdings_due: Option<Instant>,
    done_emitted: bool,
    bytes: ByteCounts,
}

fn doubling(base: Duration, max: Duration, times: u32) -> Duration {
    let factor = 1u32 << times.saturating_sub(1).min(20);
    base.checked_mul(factor).unwrap_or(max).min(max)
}

impl Scheduler {
    /// A scheduler for a blob of `layout`, holding the chunks set in `have` already (a resumed
    /// download). `seed` fixes every random choice.
    pub fn new(
        layout: ChunkLayout,
        have: Bitfield,
        config: SchedulerConfig,
        seed: u64,
    ) -> Result<Self, SchedulerError> {
        let config = config.sanitized();
        let count = layout.chunk_count();
        if have.len() != count {
            return Err(SchedulerError::HaveLengthMismatch {
                expected: count,
                got: have.len(),
            });
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let chunks: Vec<ChunkState> = (0..count)
            .map(|index| ChunkState {
                have: have.get(index),
                availability: 0,
                local_availability: 0,
                rank: rng.random(),
                requests: Vec::new(),
                failed_by: Vec::new(),
                peer_failed: false,
                route: Route::Swarm,
                wanted_key: None,
            })
            .collect();
        let bytes_have = have
            .iter_ones()
            .map(|index| u64::from(layout.chunk_len(index).unwrap_or(0)))
            .sum();
        let mut scheduler = Scheduler {
            layout,
            config,
            rng,
            chunks,
            have_count: have.count_ones(),
            have,
            bytes_have,
            peers: Vec::new(),
            peer_index: HashMap::new(),
            seed: SeedState::default(),
            wanted: BTreeSet::new(),
            wanted_epoch: 0,
            redirect_pending: BTreeSet::new(),
            seed_pending: BTreeSet::new(),
            seed_reask: BTreeSet::new(),
            in_flight_chunks: BTreeSet::new(),
            busy_peers: BTreeSet::new(),
            peer_timer: None,
            actions: VecDeque::new(),
            dirty: true,
            started: false,
            peers_discovered: false,
            seed_grace_until: None,
            next_ask_for_peers: None,
            remote_holdings_due: None,
            done_emitted: false,
            bytes: ByteCounts::default(),
        };
        for index in 0..count {
            scheduler.index(index);
        }
        if scheduler.have_count == count {
            scheduler.done_emitted = true;
            scheduler.actions.push_back(Action::Done);
        }
        Ok(scheduler)
    }

    /// Takes one event in. Drain [`Scheduler::poll_action`] afterwards.
    pub fn handle(&mut self, event: Event, now: Instant) {
        self.start(now);
        self.dirty = true;
        match event {
            Event::PeersDiscovered(candidates) => {
                self.peers_discovered = true;
                self.seed_grace_until = None;
                let take_remote = self.remote_holdings_due.is_none_or(|at| now >= at);
                if take_remote {
                    self.remote_holdings_due = Some(now + self.config.remote_holdings_interval);
                }
                for mut candidate in candidates {
                    if !candidate.site_is_local && !take_remote {
                        candidate.chunks = None;
                    }
                    self.add_candidate(candidate);
                }
            }
            Event::PeerHave { peer, chunks } => {
                if chunks.len() == self.chunk_count() {
                    let p = self.peer_slot(&peer);
                    for index in 0..self.chunk_count() {
                        self.set_peer_chunk(p, index, chunks.get(index));
                    }
                }
            }
            Event::PeerHaveOne { peer, index } => {
                if index < self.chunk_count() {
                    let p = self.peer_slot(&peer);
                    self.set_peer_chunk(p, index, true);
                }
            }
            Event::ChunkVerified {
                peer,
                index,
                bytes,
                elapsed,
            } => self.on_verified(peer, index, bytes, elapsed, now),
            Event::ChunkFailed {
                peer,
                index,
                reason,
            } => self.on_failed(peer, index, reason, now),
            Event::SeedRedirected { index, peers } => self.on_redirected(index, peers, now),
            Event::PeerDisconnected(peer) => {
                if let Some(&p) = self.peer_index.get(&peer) {
                    if self.peers[p].usable {
                        self.take_down(p, now);
                    }
                }
            }
            Event::Tick => self.on_tick(now),
        }
    }

    /// The next thing to do, or `None` when there is nothing until the next event.
    pub fn poll_action(&mut self, now: Instant) -> Option<Action> {
        self.start(now);
        if self.actions.is_empty() && self.dirty {
            self.dirty = false;
            self.schedule(now);
        }
        self.actions.pop_front()
    }

    /// Every action due now (a convenience over [`Scheduler::poll_action`]).
    pub fn actions(&mut self, now: Instant) -> Vec<Action> {
        std::iter::from_fn(|| self.poll_action(now)).collect()
    }

    /// When the caller should send [`Event::Tick`] next at the latest: the earliest request
    /// deadline, backoff end, retry time or peer-discovery check. `None` once done.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.done_emitted {
            return None;
        }
        let mut earliest: Option<Instant> = None;
        let mut consider = |at: Instant| {
            earliest = Some(earliest.map_or(at, |e| e.min(at)));
        };
        for &index in &self.in_flight_chunks {
            for request in &self.chunks[index as usize].requests {
                consider(self.request_deadline(request));
            }
        }
        for &index in &self.redirect_pending {
            if let Route::Redirected(redirect) = &self.chunks[index as usize].route {
                consider(redirect.deadline);
                redirect.not_before.iter().for_each(|&(_, at)| consider(at));
            }
        }
        self.peer_timer.into_iter().for_each(&mut consider);
        self.seed.backoff_until.into_iter().for_each(&mut consider);
        self.seed_grace_until.into_iter().for_each(&mut consider);
        self.next_ask_for_peers.into_iter().for_each(&mut consider);
        earliest
    }

    pub fn layout(&self) -> ChunkLayout {
        self.layout
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Every chunk is verified.
    pub fn is_done(&self) -> bool {
        self.have_count == self.chunk_count()
    }

    pub fn has_chunk(&self, index: u32) -> bool {
        self.have.get(index)
    }

    /// The chunks verified so far.
    pub fn have(&self) -> &Bitfield {
        &self.have
    }

    pub fn progress(&self) -> Progress {
        Progress {
            chunks_have: self.have_count,
            chunks_total: self.chunk_count(),
            bytes_have: self.bytes_have,
            bytes_total: self.layout.size(),
        }
    }

    pub fn bytes(&self) -> ByteCounts {
        self.bytes
    }

    /// Requests outstanding, duplicates included.
    pub fn in_flight(&self) -> u32 {
        self.in_flight_chunks
            .iter()
            .map(|&index| self.chunks[index as usize].requests.len() as u32)
            .sum()
    }

    /// Duplicate requests are allowed (few chunks are missing).
    pub fn is_endgame(&self) -> bool {
        self.missing() <= self.config.endgame_threshold
    }

    pub fn seed_stats(&self) -> SourceStats {
        self.seed.transfer.stats(self.seed_window())
    }

    /// Every peer ever heard of, in the order they were first heard of.
    pub fn peer_stats(&self) -> Vec<PeerStats> {
        (0..self.peers.len()).map(|p| self.stats_of(p)).collect()
    }

    pub fn peer(&self, id: &str) -> Option<PeerStats> {
        self.peer_index.get(id).map(|&p| self.stats_of(p))
    }

    fn stats_of(&self, p: usize) -> PeerStats {
        let peer = &self.peers[p];
        PeerStats {
            id: peer.id.clone(),
            site_is_local: peer.local,
            chunks_held: peer.held,
            transfer: peer.transfer.stats(self.peer_window(p)),
            consecutive_timeouts: peer.consecutive_timeouts,
            consecutive_refusals: peer.consecutive_refusals,
            false_claims: peer.false_claims,
            banned: peer.banned,
            reachable: peer.usable,
        }
    }

    fn chunk_count(&self) -> u32 {
        self.chunks.len() as u32
    }

    fn missing(&self) -> u32 {
        self.chunk_count() - self.have_count
    }

    fn start(&mut self, now: Instant) {
        if !self.started {
            self.started = true;
            if !self.peers_discovered {
                self.seed_grace_until = Some(now + self.config.seed.wait_for_peers);
            }
        }
    }

    fn peer_window(&self, p: usize) -> u32 {
        self.peers[p].transfer.window(
            self.layout.chunk_size(),
            self.config.target_queue_time,
            self.config.min_in_flight_per_peer,
            self.config.max_in_flight_per_peer,
        )
    }

    fn seed_window(&self) -> u32 {
        let max = self.config.seed.max_in_flight;
        self.seed.transfer.window(
            self.layout.chunk_size(),
            self.config.target_queue_time,
            self.config.min_in_flight_per_peer.min(max),
            max,
        )
    }

    fn transfer_mut(&mut self, key: SourceKey) -> &mut Transfer {
        match key {
            SourceKey::Seed => &mut self.seed.transfer,
            SourceKey::Peer(p) => &mut self.peers[p].transfer,
        }
    }

    fn transfer(&self, key: SourceKey) -> &Transfer {
        match key {
            SourceKey::Seed => &self.seed.transfer,
            SourceKey::Peer(p) => &self.peers[p].transfer,
        }
    }

    fn source_of(&self, key: SourceKey) -> Source {
        match key {
            SourceKey::Seed => Source::Seed,
            SourceKey::Peer(p) => Source::Peer(self.peers[p].id.clone()),
        }
    }

    // ---- the waiting sets ----

    /// Puts a chunk that needs a request into the set its route draws from.
    fn index(&mut self, index: u32) {
        let chunk = &mut self.chunks[index as usize];
        if chunk.have || !chunk.requests.is_empty() {
            return;
        }
        match chunk.route {
            Route::Swarm => {
                let key = (chunk.availability, chunk.rank, index);
                chunk.wanted_key = Some(key);
                self.wanted.insert(key);
                self.wanted_epoch += 1;
            }
            Route::Redirected(Redirect { reask: true, .. }) => {
                self.seed_reask.insert(index);
            }
            Route::Redirected(_) => {
                self.redirect_pending.insert(index);
            }
            Route::SeedAfterPeerFailure => {
                self.seed_pending.insert(index);
            }
        }
    }

    fn unindex(&mut self, index: u32) {
        if let Some(key) = self.chunks[index as usize].wanted_key.take() {
            self.wanted.remove(&key);
        }
        self.redirect_pending.remove(&index);
        self.seed_pending.remove(&index);
        self.seed_reask.remove(&index);
    }

    fn set_route(&mut self, index: u32, route: Route) {
        self.unindex(index);
        self.chunks[index as usize].route = route;
        self.index(index);
    }

    // ---- peers and what they hold ----

    fn peer_slot(&mut self, id: &str) -> usize {
        if let Some(&p) = self.peer_index.get(id) {
            return p;
        }
        let p = self.peers.len();
        let mut chunks = self.have.clone();
        for index in self.have.iter_ones() {
            chunks.set(index, false);
        }
        self.peers.push(Peer {
            id: id.to_string(),
            local: false,
            chunks,
            held: 0,
            rank: self.rng.random(),
            transfer: Transfer::default(),
            usable: true,
            banned: None,
            down_until: None,
            connection_losses: 0,
            consecutive_timeouts: 0,
            false_claims: 0,
            paused_until: None,
            dry_at: None,
            consecutive_refusals: 0,
        });
        self.peer_index.insert(id.to_string(), p);
        p
    }

    fn add_candidate(&mut self, candidate: PeerCandidate) -> usize {
        let p = self.peer_slot(&candidate.id);
        self.set_local(p, candidate.site_is_local);
        if let Some(chunks) = candidate.chunks {
            if chunks.len() == self.chunk_count() {
                for index in chunks.iter_ones() {
                    self.set_peer_chunk(p, index, true);
                }
            }
        }
        p
    }

    fn set_local(&mut self, p: usize, local: bool) {
        if self.peers[p].local == local {
            return;
        }
        self.peers[p].dry_at = None;
        if !self.peers[p].usable {
            self.peers[p].local = local;
            return;
        }
        let held: Vec<u32> = self.peers[p].chunks.iter_ones().collect();
        for &index in &held {
            self.adjust_availability(index, p, false);
        }
        self.peers[p].local = local;
        for index in held {
            self.adjust_availability(index, p, true);
        }
    }

    /// Counts peer `p` in or out of the chunk's availability, unless it failed the chunk (then
    /// it is not counted either way).
    fn adjust_availability(&mut self, index: u32, p: usize, up: bool) {
        if self.chunks[index as usize].failed_by.contains(&p) {
            return;
        }
        let local = self.peers[p].local;
        let position = self.chunks[index as usize].wanted_key.take();
        if let Some(key) = position {
            self.wanted.remove(&key);
        }
        let chunk = &mut self.chunks[index as usize];
        if up {
            chunk.availability += 1;
            chunk.local_availability += u32::from(local);
        } else {
            chunk.availability = chunk.availability.saturating_sub(1);
            chunk.local_availability = chunk.local_availability.saturating_sub(u32::from(local));
            if local && chunk.local_availability == 0 {
                // Remote holders may offer it now.
                self.wanted_epoch += 1;
            }
        }
        if position.is_some() {
            let key = (chunk.availability, chunk.rank, index);
            chunk.wanted_key = Some(key);
            self.wanted.insert(key);
        }
    }

    fn set_peer_chunk(&mut self, p: usize, index: u32, value: bool) {
        let peer = &mut self.peers[p];
        if peer.chunks.get(index) == value || !peer.chunks.set(index, value) {
            return;
        }
        if value {
            peer.held += 1;
            peer.dry_at = None;
        } else {
            peer.held = peer.held.saturating_sub(1);
        }
        if peer.usable {
            self.adjust_availability(index, p, value);
        }
        if value {
            // It holds the chunk now: no reason to wait before asking it.
            if let Route::Redirected(redirect) = &mut self.chunks[index as usize].route {
                redirect.not_before.retain(|&(q, _)| q != p);
            }
        }
    }

    fn set_usable(&mut self, p: usize, usable: bool) {
        if self.peers[p].usable == usable {
            return;
        }
        self.peers[p].usable = usable;
        self.peers[p].dry_at = None;
        let held: Vec<u32> = self.peers[p].chunks.iter_ones().collect();
        for index in held {
            self.adjust_availability(index, p, usable);
        }
    }

    /// Recomputes [`Scheduler::peer_timer`] after a peer's pause, reconnect wait or ban changed.
    fn refresh_peer_timer(&mut self) {
        self.peer_timer = self
            .peers
            .iter()
            .filter(|peer| peer.banned.is_none())
            .flat_map(|peer| peer.down_until.into_iter().chain(peer.paused_until))
            .min();
    }

    /// Puts a peer aside after a lost connection; its requests go elsewhere.
    fn take_down(&mut self, p: usize, now: Instant) {
        let peer = &mut self.peers[p];
        peer.connection_losses = peer.connection_losses.saturating_add(1);
        peer.down_until = Some(
            now + doubling(
                self.config.reconnect_backoff,
                self.config.max_reconnect_backoff,
                peer.connection_losses,
            ),
        );
        self.refresh_peer_timer();
        self.set_usable(p, false);
        // The connection is gone: nothing to cancel.
        for index in self.drop_requests_of(SourceKey::Peer(p)) {
            self.requeue_after_peer_failure(index, now);
        }
    }

    fn ban(&mut self, p: usize, reason: BanReason, now: Instant) {
        if self.peers[p].banned.is_some() {
            return;
        }
        self.peers[p].banned = Some(reason);
        self.peers[p].down_until = None;
        self.refresh_peer_timer();
        self.set_usable(p, false);
        let id = self.peers[p].id.clone();
        let dropped = self.drop_requests_of(SourceKey::Peer(p));
        for &index in &dropped {
            self.actions.push_back(Action::Cancel {
                from: Source::Peer(id.clone()),
                index,
            });
        }
        for index in dropped {
            self.requeue_after_peer_failure(index, now);
        }
        self.actions.push_back(Action::Ban { peer: id, reason });
    }

    /// One stall of a peer (however many of its requests timed out together).
    fn stall_strike(&mut self, p: usize, now: Instant) {
        let peer = &mut self.peers[p];
        peer.consecutive_timeouts += 1;
        // Start it over at the smallest window: whatever it measured before is not true now.
        peer.transfer.rate = None;
        if peer.consecutive_timeouts >= self.config.ban_after_timeouts {
            self.ban(p, BanReason::Stalled, now);
        }
    }

    fn seed_error(&mut self, now: Instant) {
        self.seed.consecutive_errors = self.seed.consecutive_errors.saturating_add(1);
        self.seed.backoff_until = Some(
            now + doubling(
                self.config.seed.error_backoff,
                self.config.seed.max_error_backoff,
                self.seed.consecutive_errors,
            ),
        );
    }

    // ---- requests ----

    fn issue(&mut self, key: SourceKey, index: u32, now: Instant, after_peer_failure: bool) {
        self.unindex(index);
        self.chunks[index as usize].requests.push(Outstanding {
            source: key,
            sent_at: now,
        });
        self.in_flight_chunks.insert(index);
        let transfer = self.transfer_mut(key);
        if transfer.in_flight == 0 {
            transfer.busy_since = Some(now);
        }
        transfer.in_flight += 1;
        if let SourceKey::Peer(p) = key {
            self.busy_peers.insert(p);
        }
        let from = self.source_of(key);
        self.actions.push_back(Action::Request {
            from,
            index,
            after_peer_failure,
        });
    }

    /// Forgets one request; the caller puts the chunk back where it belongs.
    fn remove_request(&mut self, index: u32, key: SourceKey) -> Option<Outstanding> {
        let chunk = &mut self.chunks[index as usize];
        let position = chunk.requests.iter().position(|r| r.source == key)?;
        let request = chunk.requests.swap_remove(position);
        if chunk.requests.is_empty() {
            self.in_flight_chunks.remove(&index);
        }
        let transfer = self.transfer_mut(key);
        transfer.in_flight = transfer.in_flight.saturating_sub(1);
        if transfer.in_flight == 0 {
            transfer.busy_since = None;
            if let SourceKey::Peer(p) = key {
                self.busy_peers.remove(&p);
            }
        }
        Some(request)
    }

    fn drop_requests_of(&mut self, key: SourceKey) -> Vec<u32> {
        let chunks: Vec<u32> = self
            .in_flight_chunks
            .iter()
            .copied()
            .filter(|&index| {
                self.chunks[index as usize]
                    .requests
                    .iter()
                    .any(|r| r.source == key)
            })
            .collect();
        for &index in &chunks {
            self.remove_request(index, key);
        }
        chunks
    }

    fn request_deadline(&self, request: &Outstanding) -> Instant {
        let progress = self
            .transfer(request.source)
            .last_delivery
            .map_or(request.sent_at, |last| last.max(request.sent_at));
        (progress + self.config.request_timeout).min(request.sent_at + self.config.request_max_age)
    }

    /// Remembers that `p` failed the chunk: it is not asked for it again (while another way
    /// exists) and no longer counts as a holder, so a chunk every holder failed is the seed's.
    /// `busy`: it only refused, again and again (at its upload cap), which says nothing bad
    /// about it or about the fleet's copies of the chunk.
    fn note_failed_by(&mut self, index: u32, p: usize, busy: bool) {
        self.chunks[index as usize].peer_failed |= !busy;
        if self.chunks[index as usize].failed_by.contains(&p) {
            return;
        }
        if self.peers[p].usable && self.peers[p].chunks.get(index) {
            self.adjust_availability(index, p, false);
        }
        self.chunks[index as usize].failed_by.push(p);
    }

    /// Gives every peer that failed the chunk another chance; for when the seed cannot help.
    fn forgive(&mut self, index: u32) {
        let failed = std::mem::take(&mut self.chunks[index as usize].failed_by);
        self.wanted_epoch += 1;
        self.chunks[index as usize].peer_failed = false;
        for p in failed {
            if self.peers[p].usable && self.peers[p].chunks.get(index) {
                self.adjust_availability(index, p, true);
            }
        }
        if matches!(
            self.chunks[index as usize].route,
            Route::SeedAfterPeerFailure
        ) {
            self.set_route(index, Route::Swarm);
        }
    }

    /// A reachable peer that could still give the chunk: it holds it or the seed named it,
    /// and it has not failed it.
    fn has_viable_peer(&self, index: u32) -> bool {
        let chunk = &self.chunks[index as usize];
        let named: &[usize] = match &chunk.route {
            Route::Redirected(redirect) => &redirect.named,
            _ => &[],
        };
        // `availability` counts the usable holders that have not failed it: only the named
        // peers that do not hold it need a look (not every peer ever heard of).
        chunk.availability > 0
            || named
                .iter()
                .any(|&p| self.peers[p].usable && !chunk.failed_by.contains(&p))
    }

    /// A reachable local peer that holds the chunk and has not failed it.
    fn has_viable_local_holder(&self, index: u32) -> bool {
        self.chunks[index as usize].local_availability > 0
    }

    /// Puts a chunk whose request to a peer ended without it back in line. A redirected chunk
    /// goes back to the seed once no named or holding peer is left or its wait is over: for
    /// other names when they were only busy (a few times), saying peers failed otherwise. A swarm
    /// chunk needs nothing more, as its availability already left out the peers that failed it
    /// (at zero the seed takes it).
    fn requeue_after_peer_failure(&mut self, index: u32, now: Instant) {
        let chunk = &self.chunks[index as usize];
        if chunk.have || !chunk.requests.is_empty() {
            return;
        }
        let give_up = match &chunk.route {
            Route::Redirected(redirect) => now >= redirect.deadline || !self.has_viable_peer(index),
            Route::Swarm | Route::SeedAfterPeerFailure => false,
        };
        self.unindex(index);
        let chunk = &mut self.chunks[index as usize];
        if give_up {
            match &mut chunk.route {
                // Busy is not failed: thousands asking for a chunk a few hold keep those few at
                // their upload cap, while more holders appear every second. The seed names
                // others; telling it "peers failed" would make it serve the chunk itself.
                Route::Redirected(redirect)
                    if !chunk.peer_failed
                        && now < redirect.deadline
                        && redirect.reasks < MAX_REASKS
                        && redirect.named.iter().all(|&p| self.peers[p].usable) =>
                {
                    redirect.reask = true;
                    redirect.reasks += 1;
                }
                _ => chunk.route = Route::SeedAfterPeerFailure,
            }
        }
        self.index(index);
    }

    // ---- events ----

    fn on_verified(
        &mut self,
        source: Source,
        index: u32,
        bytes: u64,
        elapsed: Duration,
        now: Instant,
    ) {
        if index >= self.chunk_count() {
            return;
        }
        let key = match &source {
            Source::Seed => SourceKey::Seed,
            Source::Peer(id) => SourceKey::Peer(self.peer_slot(id)),
        };
        let requested = self.chunks[index as usize]
            .requests
            .iter()
            .any(|r| r.source == key);
        // Sample before the request is forgotten: that may end the source's busy period.
        self.transfer_mut(key)
            .record_delivery(bytes, elapsed, now, requested);
        if requested {
            self.remove_request(index, key);
        }
        match key {
            SourceKey::Seed => self.seed.consecutive_errors = 0,
            SourceKey::Peer(p) => {
                self.peers[p].consecutive_timeouts = 0;
                self.peers[p].consecutive_refusals = 0;
                self.peers[p].connection_losses = 0;
                self.set_peer_chunk(p, index, true);
            }
        }
        if self.chunks[index as usize].have {
            self.bytes.duplicate = self.bytes.duplicate.saturating_add(bytes);
            return;
        }
        self.unindex(index);
        self.chunks[index as usize].have = true;
        self.have.set(index, true);
        self.have_count += 1;
        self.bytes_have += u64::from(self.layout.chunk_len(index).unwrap_or(0));
        let counter = match key {
            SourceKey::Seed => &mut self.bytes.from_seed,
            SourceKey::Peer(p) if self.peers[p].local => &mut self.bytes.from_local_peers,
            SourceKey::Peer(_) => &mut self.bytes.from_remote_peers,
        };
        *counter = counter.saturating_add(bytes);
        // Endgame losers.
        let losers: Vec<SourceKey> = self.chunks[index as usize]
            .requests
            .iter()
            .map(|r| r.source)
            .collect();
        for loser in losers {
            self.remove_request(index, loser);
            let from = self.source_of(loser);
            self.actions.push_back(Action::Cancel { from, index });
        }
        self.chunks[index as usize].route = Route::Swarm;
        if self.have_count == self.chunk_count() && !self.done_emitted {
            self.done_emitted = true;
            self.actions.push_back(Action::Done);
        }
    }

    fn on_failed(&mut self, source: Source, index: u32, reason: FailReason, now: Instant) {
        if index >= self.chunk_count() {
            return;
        }
        let key = match &source {
            Source::Seed => SourceKey::Seed,
            Source::Peer(id) => match self.peer_index.get(id) {
                Some(&p) => SourceKey::Peer(p),
                // Never asked, so nothing to undo; nor can a stranger be reported.
                None => return,
            },
        };
        let outstanding = self.remove_request(index, key).is_some();
        let p = match key {
            SourceKey::Seed => {
                if outstanding {
                    self.seed.transfer.failures += 1;
                    if reason == FailReason::Timeout {
                        self.seed.transfer.timeouts += 1;
                    }
                    self.seed_error(now);
                    self.unindex(index);
                    self.index(index);
                }
                return;
            }
            SourceKey::Peer(p) => p,
        };
        if outstanding || reason.immediate_ban().is_some() {
            self.peers[p].transfer.failures += 1;
        }
        if let Some(ban) = reason.immediate_ban() {
            // Whenever it is reported: the bytes were hostile even if we no longer wanted them.
            self.ban(p, ban, now);
        } else if outstanding {
            match reason {
                FailReason::Timeout => {
                    self.peers[p].transfer.timeouts += 1;
                    self.note_failed_by(index, p, false);
                    self.stall_strike(p, now);
                }
                FailReason::NotHeld => self.on_not_held(p, index, now),
                FailReason::Refused => {
                    let peer = &mut self.peers[p];
                    // A window refused in one burst is one refusal, as a stall is one timeout.
                    if peer.paused_until.is_none_or(|at| now >= at) {
                        peer.consecutive_refusals = peer.consecutive_refusals.saturating_add(1);
                        let until = now + self.config.refused_backoff;
                        if peer.paused_until.replace(until).is_some() || peer.banned.is_some() {
                            self.refresh_peer_timer();
                        } else {
                            self.peer_timer = Some(self.peer_timer.map_or(until, |t| t.min(until)));
                        }
                    }
                    let peer = &mut self.peers[p];
                    // It is overloaded: back to the smallest window until it proves otherwise.
                    peer.transfer.rate = None;
                    if peer.consecutive_refusals >= self.config.give_up_after_refusals {
                        self.note_failed_by(index, p, true);
                    }
                }
                FailReason::ConnectionLost => self.take_down(p, now),
                FailReason::BadHash | FailReason::WrongLength | FailReason::FrameTooLarge => {}
            }
        } else if reason == FailReason::ConnectionLost && self.peers[p].usable {
            self.take_down(p, now);
        }
        if outstanding {
            self.requeue_after_peer_failure(index, now);
        }
    }

    fn on_not_held(&mut self, p: usize, index: u32, now: Instant) {
        let claimed = self.peers[p].chunks.get(index);
        if claimed {
            self.set_peer_chunk(p, index, false);
            self.peers[p].false_claims += 1;
            if self.peers[p].false_claims >= self.config.ban_after_false_claims {
                self.ban(p, BanReason::FalseClaims, now);
                return;
            }
        }
        let base = self.config.seed.not_yet_retry;
        match &mut self.chunks[index as usize].route {
            // Named by the seed without claiming the chunk: it is probably still receiving it.
            Route::Redirected(redirect)
                if !claimed && redirect.named.contains(&p) && now < redirect.deadline =>
            {
                redirect.not_yet_answers = redirect.not_yet_answers.saturating_add(1);
                let delay = doubling(base, MAX_NOT_YET_RETRY.max(base), redirect.not_yet_answers);
                redirect.not_before.retain(|&(q, _)| q != p);
                redirect.not_before.push((p, now + delay));
            }
            _ => self.note_failed_by(index, p, false),
        }
    }

    fn on_redirected(&mut self, index: u32, candidates: Vec<PeerCandidate>, now: Instant) {
        if index >= self.chunk_count() {
            return;
        }
        if self.remove_request(index, SourceKey::Seed).is_some() {
            self.seed.consecutive_errors = 0;
        }
        let mut named = Vec::new();
        for mut candidate in candidates {
            // The seed names a peer of another site for this chunk only. What else it holds is
            // no reason to cross the WAN link: every node of the site learning it that way
            // would take those chunks across the link again and again.
            if self.config.prefer_local_strictly && !candidate.site_is_local {
                candidate.chunks = None;
            }
            let p = self.add_candidate(candidate);
            if self.peers[p].banned.is_none() && !named.contains(&p) {
                named.push(p);
            }
        }
        if self.chunks[index as usize].have {
            return;
        }
        self.unindex(index);
        let patience = self.config.seed.redirect_patience;
        let chunk = &mut self.chunks[index as usize];
        match &mut chunk.route {
            Route::Swarm => {
                chunk.route = Route::Redirected(Redirect {
                    named,
                    deadline: now + patience,
                    not_before: Vec::new(),
                    not_yet_answers: 0,
                    reask: false,
                    reasks: 0,
                });
            }
            // A second redirect adds names but does not extend the wait.
            Route::Redirected(redirect) => {
                redirect.reask = false;
                for p in named {
                    if !redirect.named.contains(&p) {
                        redirect.named.push(p);
                    }
                }
            }
            // We already told the seed peers failed; a late redirect changes nothing.
            Route::SeedAfterPeerFailure => {}
        }
        self.index(index);
        self.requeue_after_peer_failure(index, now);
    }

    fn on_tick(&mut self, now: Instant) {
        let seed_cannot_help =
            !self.config.seed.enabled || self.seed.backoff_until.is_some_and(|at| at > now);
        if seed_cannot_help {
            // Chunks only failed peers hold would wait for the seed forever: try those peers
            // again (a refusal or a stall may have been passing; a liar is banned by now or
            // soon). Ticks come at timer pace, so this cannot spin.
            let stuck: Vec<u32> = self
                .wanted
                .range(..(1, 0, 0))
                .map(|&(_, _, index)| index)
                .chain(self.seed_pending.iter().copied())
                .filter(|&index| !self.chunks[index as usize].failed_by.is_empty())
                .collect();
            for index in stuck {
                self.forgive(index);
            }
        }
        if self.seed.backoff_until.is_some_and(|at| at <= now) {
            self.seed.backoff_until = None;
        }
        if self.seed_grace_until.is_some_and(|at| at <= now) {
            self.seed_grace_until = None;
        }
        for p in 0..self.peers.len() {
            if self.peers[p].paused_until.is_some_and(|at| at <= now) {
                self.peers[p].paused_until = None;
            }
            let peer = &self.peers[p];
            if peer.banned.is_none() && peer.down_until.is_some_and(|at| at <= now) {
                self.peers[p].down_until = None;
                self.set_usable(p, true);
            }
        }
        self.refresh_peer_timer();
        let mut expired: Vec<(u32, SourceKey)> = Vec::new();
        for &index in &self.in_flight_chunks {
            for request in &self.chunks[index as usize].requests {
                if self.request_deadline(request) <= now {
                    expired.push((index, request.source));
                }
            }
        }
        let mut stalled: Vec<usize> = Vec::new();
        let mut seed_stalled = false;
        for (index, key) in expired {
            if self.remove_request(index, key).is_none() {
                continue;
            }
            let from = self.source_of(key);
            self.actions.push_back(Action::Cancel { from, index });
            let transfer = self.transfer_mut(key);
            transfer.failures += 1;
            transfer.timeouts += 1;
            match key {
                SourceKey::Seed => {
                    seed_stalled = true;
                    self.unindex(index);
                    self.index(index);
                }
                SourceKey::Peer(p) => {
                    self.note_failed_by(index, p, false);
                    if !stalled.contains(&p) {
                        stalled.push(p);
                    }
                    self.requeue_after_peer_failure(index, now);
                }
            }
        }
        for p in stalled {
            self.stall_strike(p, now);
        }
        if seed_stalled {
            self.seed_error(now);
        }
        let pending: Vec<u32> = self
            .redirect_pending
            .iter()
            .chain(&self.seed_reask)
            .copied()
            .collect();
        for index in pending {
            if let Route::Redirected(redirect) = &mut self.chunks[index as usize].route {
                if now >= redirect.deadline {
                    self.set_route(index, Route::SeedAfterPeerFailure);
                } else {
                    redirect.not_before.retain(|&(_, at)| at > now);
                }
            }
        }
    }

    // ---- the scheduling pass ----

    fn schedule(&mut self, now: Instant) {
        if self.done_emitted {
            return;
        }
        self.maybe_ask_for_peers(now);
        let mut in_use = self.busy_peers.len();
        // In use only grows during a pass: at the limit, only busy peers can take more.
        let order = self.peer_order(in_use >= self.config.max_peers_in_use);
        self.assign_redirected(&order, &mut in_use, now);
        for &p in &order {
            if self.peers[p].dry_at == Some(self.wanted_epoch) {
                continue;
            }
            while self.can_take_more(p, in_use, now) {
                let Some(index) = self.pick_fresh(p) else {
                    self.peers[p].dry_at = Some(self.wanted_epoch);
                    break;
                };
                in_use += usize::from(self.peers[p].transfer.in_flight == 0);
                self.issue(SourceKey::Peer(p), index, now, false);
            }
        }
        self.assign_seed(in_use, now);
        if self.is_endgame() {
            for &p in &order {
                while self.can_take_more(p, in_use, now) {
                    let Some(index) = self.pick_duplicate(p) else {
                        break;
                    };
                    in_use += usize::from(self.peers[p].transfer.in_flight == 0);
                    self.issue(SourceKey::Peer(p), index, now, false);
                }
            }
        }
    }

    fn maybe_ask_for_peers(&mut self, now: Instant) {
        if self.next_ask_for_peers.is_some_and(|at| now < at) {
            return;
        }
        self.next_ask_for_peers = Some(now + self.config.ask_for_peers_interval);
        if !self.peers_discovered || self.useful_peers() < self.config.min_useful_peers {
            self.actions.push_back(Action::AskForPeers);
        }
    }

    /// Reachable peers that hold something we lack.
    fn useful_peers(&self) -> usize {
        self.peers
            .iter()
            .filter(|peer| peer.usable)
            .filter(|peer| {
                peer.chunks
                    .iter_ones()
                    .any(|index| !self.chunks[index as usize].have)
            })
            .count()
    }

    /// Reachable peers (only those with requests in flight if `busy_only`), best first: local
    /// site, then measured rate, then a random rank.
    fn peer_order(&self, busy_only: bool) -> Vec<usize> {
        // Sorting the keys side by side, not indices into `peers`, keeps this cheap with
        // thousands of peers known (it runs on every scheduling pass).
        let key = |p: usize| {
            let peer = &self.peers[p];
            (peer.local, peer.transfer.rate.unwrap_or(0.0), peer.rank, p)
        };
        let mut keyed: Vec<(bool, f64, u64, usize)> = if busy_only {
            // Peers with requests in flight are usable (a peer put aside loses its requests).
            self.busy_peers.iter().map(|&p| key(p)).collect()
        } else {
            // A peer known to hold nothing can give nothing: the seed's named peers are
            // looked at from the redirect itself.
            (0..self.peers.len())
                .filter(|&p| self.peers[p].usable && self.peers[p].held > 0)
                .map(key)
                .collect()
        };
        keyed.sort_by(|a, b| {
            b.0.cmp(&a.0)
                .then_with(|| b.1.total_cmp(&a.1))
                .then_with(|| a.2.cmp(&b.2))
        });
        keyed.into_iter().map(|(_, _, _, p)| p).collect()
    }

    fn can_take_more(&self, p: usize, in_use: usize, now: Instant) -> bool {
        let peer = &self.peers[p];
        peer.usable
            && peer.paused_until.is_none_or(|at| now >= at)
            && peer.transfer.in_flight < self.peer_window(p)
            && (peer.transfer.in_flight > 0 || in_use < self.config.max_peers_in_use)
    }

    fn assign_redirected(&mut self, order: &[usize], in_use: &mut usize, now: Instant) {
        let pending: Vec<u32> = self.redirect_pending.iter().copied().collect();
        for index in pending {
            let expired = matches!(
                &self.chunks[index as usize].route,
                Route::Redirected(redirect) if now >= redirect.deadline
            );
            if expired || !self.has_viable_peer(index) {
                self.set_route(index, Route::SeedAfterPeerFailure);
                continue;
            }
            if let Some(p) = self.pick_peer_for_redirect(index, order, *in_use, now) {
                *in_use += usize::from(self.peers[p].transfer.in_flight == 0);
                self.issue(SourceKey::Peer(p), index, now, false);
            }
        }
    }

    fn pick_peer_for_redirect(
        &self,
        index: u32,
        order: &[usize],
        in_use: usize,
        now: Instant,
    ) -> Option<usize> {
        let chunk = &self.chunks[index as usize];
        let Route::Redirected(redirect) = &chunk.route else {
            return None;
        };
        let viable = |p: usize| {
            let peer = &self.peers[p];
            peer.usable
                && !chunk.failed_by.contains(&p)
                && (peer.chunks.get(index) || redirect.named.contains(&p))
        };
        // A peer that is not named is viable only as a usable holder that has not failed the
        // chunk, which the availability counts: with none, only the named peers need a look.
        let wait_for_local = self.config.prefer_local_strictly
            && (chunk.local_availability > 0
                || redirect
                    .named
                    .iter()
                    .any(|&p| self.peers[p].local && viable(p)));
        let holders: &[usize] = if chunk.availability > 0 { order } else { &[] };
        // The seed's names first, in its order (same site first), then anyone holding it.
        redirect.named.iter().chain(holders).copied().find(|&p| {
            viable(p)
                && (!wait_for_local || self.peers[p].local)
                && !redirect
                    .not_before
                    .iter()
                    .any(|&(q, at)| q == p && at > now)
                && self.can_take_more(p, in_use, now)
        })
    }

    /// The rarest chunk `p` can give that nobody is fetching.
    fn pick_fresh(&self, p: usize) -> Option<u32> {
        let peer = &self.peers[p];
        let remote_waits_for_local = self.config.prefer_local_strictly && !peer.local;
        let eligible = |index: u32| {
            peer.chunks.get(index)
                && !self.chunks[index as usize].failed_by.contains(&p)
                && !(remote_waits_for_local && self.has_viable_local_holder(index))
        };
        let held = peer.held as usize;
        if held == 0 {
            return None;
        }
        let by_own_chunks = || {
            peer.chunks
                .iter_ones()
                .filter_map(|index| self.chunks[index as usize].wanted_key)
                .filter(|&(_, _, index)| eligible(index))
                .min()
                .map(|(_, _, index)| index)
        };
        // Walking the wanted chunks rarest first finds one within about wanted ÷ held steps when
        // the peer's chunks are spread among them; when that is more than a short walk, going
        // through the peer's own chunks is cheaper. Both give the eligible chunk with the
        // smallest key. This runs for every peer on every scheduling pass.
        let wanted = self.wanted.len();
        let walk_all = held.saturating_mul(4) >= wanted;
        if !walk_all && wanted / held >= SHORT_WALK / 4 {
            return by_own_chunks();
        }
        for (walked, &(_, _, index)) in self.wanted.range((1, 0, 0)..).enumerate() {
            if eligible(index) {
                return Some(index);
            }
            if !walk_all && walked >= SHORT_WALK {
                return by_own_chunks();
            }
        }
        None
    }

    /// In endgame: an outstanding chunk `p` holds and is not already fetching, fewest requests
    /// first, then the longest outstanding. The same-site rule holds here too: every node of a
    /// site duplicating its last chunks across the WAN would add up to a copy of the blob.
    fn pick_duplicate(&self, p: usize) -> Option<u32> {
        let peer = &self.peers[p];
        let remote_waits_for_local = self.config.prefer_local_strictly && !peer.local;
        let max = self.config.endgame_max_requests_per_chunk as usize;
        self.in_flight_chunks
            .iter()
            .copied()
            .filter(|&index| {
                let chunk = &self.chunks[index as usize];
                chunk.requests.len() < max
                    && peer.chunks.get(index)
                    && !chunk.failed_by.contains(&p)
                    && !chunk
                        .requests
                        .iter()
                        .any(|r| r.source == SourceKey::Peer(p))
                    && !(remote_waits_for_local && self.has_viable_local_holder(index))
            })
            .min_by_key(|&index| {
                let chunk = &self.chunks[index as usize];
                let oldest = chunk.requests.iter().map(|r| r.sent_at).min();
                (chunk.requests.len(), oldest, chunk.rank)
            })
    }

    fn seed_allowed(&self, now: Instant) -> bool {
        self.config.seed.enabled
            && self.seed.backoff_until.is_none_or(|at| now >= at)
            && (self.peers_discovered || self.seed_grace_until.is_none_or(|at| now >= at))
    }

    fn assign_seed(&mut self, in_use: usize, now: Instant) {
        if !self.seed_allowed(now) {
            return;
        }
        let window = self.seed_window();
        while self.seed.transfer.in_flight < window {
            if let Some(&index) = self.seed_pending.first() {
                self.issue(SourceKey::Seed, index, now, true);
                continue;
            }
            if let Some(&index) = self.seed_reask.first() {
                self.issue(SourceKey::Seed, index, now, false);
                continue;
            }
            // Asking about a chunk nobody is known to hold gets a redirect the node must follow
            // within `redirect_patience`: ask no faster than it can follow.
            let waiting = self.redirect_pending.len();
            let slots_full = in_use >= self.config.max_peers_in_use;
            if waiting >= self.config.seed.max_redirects_waiting as usize
                || (slots_full && waiting > 0)
            {
                break;
            }
            match self.wanted.first() {
                Some(&(0, _, index)) => {
                    let peers_failed = self.chunks[index as usize].peer_failed;
                    self.issue(SourceKey::Seed, index, now, peers_failed);
                }
                _ => break,
            }
        }
    }

    // ---- checking ----

    /// Checks every internal invariant; for tests and simulators (it walks every chunk and
    /// peer, so it is not for the hot path).
    pub fn check_invariants(&self) -> Result<(), String> {
        let count = self.chunk_count();
        let have_count = self.chunks.iter().filter(|c| c.have).count() as u32;
        if have_count != self.have_count || self.have.count_ones() != self.have_count {
            return Err(format!(
                "chunks held: {have_count} by state, {} counted, {} in the bitfield",
                self.have_count,
                self.have.count_ones()
            ));
        }
        if self.done_emitted != (self.have_count == count) {
            return Err(format!(
                "done emitted {} with {}/{count} chunks",
                self.done_emitted, self.have_count
            ));
        }
        let mut in_flight_by_source: HashMap<SourceKey, u32> = HashMap::new();
        for (i, chunk) in self.chunks.iter().enumerate() {
            let index = i as u32;
            let (availability, local_availability) = self
                .peers
                .iter()
                .enumerate()
                .filter(|(p, peer)| {
                    peer.usable && peer.chunks.get(index) && !chunk.failed_by.contains(p)
                })
                .fold((0, 0), |(all, local), (_, peer)| {
                    (all + 1, local + u32::from(peer.local))
                });
            if (availability, local_availability) != (chunk.availability, chunk.local_availability)
            {
                return Err(format!(
                    "chunk {index}: availability {}/{} local, recounted {availability}/{local_availability}",
                    chunk.availability, chunk.local_availability
                ));
            }
            if chunk.have != self.have.get(index) {
                return Err(format!("chunk {index}: state and bitfield disagree"));
            }
            let in_wanted = chunk.wanted_key.is_some();
            if in_wanted
                != self
                    .wanted
                    .contains(&(chunk.availability, chunk.rank, index))
            {
                return Err(format!("chunk {index}: wanted key out of date"));
            }
            let in_redirect = self.redirect_pending.contains(&index);
            let in_seed = self.seed_pending.contains(&index);
            let in_reask = self.seed_reask.contains(&index);
            let in_flight = !chunk.requests.is_empty();
            if in_flight != self.in_flight_chunks.contains(&index) {
                return Err(format!("chunk {index}: in-flight set out of date"));
            }
            let places = [in_wanted, in_redirect, in_seed, in_reask, in_flight]
                .iter()
                .filter(|&&b| b)
                .count();
            if chunk.have {
                if places != 0 {
                    return Err(format!("chunk {index} is held but still scheduled"));
                }
                continue;
            }
            if places != 1 {
                return Err(format!(
                    "chunk {index} is in {places} places (wanted {in_wanted}, redirect \
                     {in_redirect}, seed {in_seed}, reask {in_reask}, in flight {in_flight})"
                ));
            }
            let route_matches = match &chunk.route {
                Route::Swarm => !in_redirect && !in_seed && !in_reask,
                Route::Redirected(redirect) => {
                    !in_wanted
                        && !in_seed
                        && !(if redirect.reask {
                            in_redirect
                        } else {
                            in_reask
                        })
                }
                Route::SeedAfterPeerFailure => !in_wanted && !in_redirect && !in_reask,
            };
            if !route_matches {
                return Err(format!("chunk {index} waits in a set not of its route"));
            }
            if chunk.requests.len() > 1 && !self.is_endgame() {
                return Err(format!(
                    "chunk {index} has {} requests outside endgame",
                    chunk.requests.len()
                ));
            }
            if chunk.requests.len() > self.config.endgame_max_requests_per_chunk as usize {
                return Err(format!("chunk {index} has too many requests"));
            }
            for (n, request) in chunk.requests.iter().enumerate() {
                if chunk.requests[..n]
                    .iter()
                    .any(|r| r.source == request.source)
                {
                    return Err(format!("chunk {index} asked twice from one source"));
                }
                if let SourceKey::Peer(p) = request.source {
                    if !self.peers[p].usable {
                        return Err(format!(
                            "chunk {index} outstanding at unusable peer {}",
                            self.peers[p].id
                        ));
                    }
                }
                *in_flight_by_source.entry(request.source).or_default() += 1;
            }
        }
        let seed_in_flight = in_flight_by_source
            .get(&SourceKey::Seed)
            .copied()
            .unwrap_or(0);
        if seed_in_flight != self.seed.transfer.in_flight
            || seed_in_flight > self.config.seed.max_in_flight
        {
            return Err(format!(
                "seed in flight {} counted, {seed_in_flight} outstanding",
                self.seed.transfer.in_flight
            ));
        }
        let mut in_use = 0;
        for (p, peer) in self.peers.iter().enumerate() {
            let outstanding = in_flight_by_source
                .get(&SourceKey::Peer(p))
                .copied()
                .unwrap_or(0);
            if outstanding != peer.transfer.in_flight
                || outstanding > self.config.max_in_flight_per_peer
            {
                return Err(format!(
                    "peer {}: in flight {} counted, {outstanding} outstanding",
                    peer.id, peer.transfer.in_flight
                ));
            }
            in_use += usize::from(outstanding > 0);
            if peer.usable == (peer.banned.is_some() || peer.down_until.is_some()) {
                return Err(format!("peer {}: usable flag out of date", peer.id));
            }
            if peer.held != peer.chunks.count_ones() {
                return Err(format!("peer {}: held count out of date", peer.id));
            }
            if peer.dry_at == Some(self.wanted_epoch) && peer.usable {
                if let Some(index) = self.pick_fresh(p) {
                    return Err(format!(
                        "peer {} is marked as having nothing to give, but has chunk {index}",
                        peer.id
                    ));
                }
            }
        }
        if in_use > self.config.max_peers_in_use {
            return Err(format!("{in_use} peers in use"));
        }
        let busy: BTreeSet<usize> = (0..self.peers.len())
            .filter(|&p| self.peers[p].transfer.in_flight > 0)
            .collect();
        if busy != self.busy_peers {
            return Err("set of peers in use out of date".into());
        }
        let timer = self
            .peers
            .iter()
            .filter(|peer| peer.banned.is_none())
            .flat_map(|peer| peer.down_until.into_iter().chain(peer.paused_until))
            .min();
        if timer != self.peer_timer {
            return Err("earliest peer timer out of date".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pkgmesh_protocol::blob::MIN_CHUNK_SIZE;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const MIB: f64 = 1024.0 * 1024.0;

    fn layout(chunks: u32) -> ChunkLayout {
        ChunkLayout::for_size(u64::from(chunks) * u64::from(MIN_CHUNK_SIZE)).unwrap()
    }

    fn field(len: u32, ones: impl IntoIterator<Item = u32>) -> Bitfield {
        let mut field = Bitfield::new(len).unwrap();
        for index in ones {
            field.set(index, true);
        }
        field
    }

    fn full(len: u32) -> Bitfield {
        Bitfield::full(len).unwrap()
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Behaviour {
        Honest,
        BadHash,
        /// Accepts requests and never answers.
        Stall,
        /// Every request fails with a lost connection.
        Unreachable,
        /// Refuses a request while it is still serving another (an upload cap of one).
        Busy,
        /// Refuses every request.
        Refuses,
    }

    #[derive(Clone, Debug)]
    struct SimPeer {
        id: String,
        local: bool,
        /// What it really holds.
        holds: Bitfield,
        /// What it tells the tracker it holds.
        claims: Bitfield,
        /// Bytes per second, served one request after another.
        rate: f64,
        behaviour: Behaviour,
        /// Chunks it gains later (offset from the start), without telling anyone.
        gains: Vec<(Duration, u32)>,
        /// Announced in the first `PeersDiscovered`.
        announced: bool,
        busy_until: Option<Instant>,
    }

    fn peer(id: &str, local: bool, holds: Bitfield, rate_mib: f64) -> SimPeer {
        SimPeer {
            id: id.to_string(),
            local,
            claims: holds.clone(),
            holds,
            rate: rate_mib * MIB,
            behaviour: Behaviour::Honest,
            gains: Vec::new(),
            announced: true,
            busy_until: None,
        }
    }

    impl SimPeer {
        fn behaving(mut self, behaviour: Behaviour) -> Self {
            self.behaviour = behaviour;
            self
        }

        fn candidate(&self) -> PeerCandidate {
            PeerCandidate {
                id: self.id.clone(),
                site_is_local: self.local,
                chunks: Some(self.claims.clone()),
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Reply {
        Verified,
        Failed(FailReason),
        Redirected(Vec<PeerCandidate>),
    }

    #[derive(Clone, Debug)]
    struct Pending {
        at: Instant,
        seq: u64,
        from: Source,
        index: u32,
        sent: Instant,
        reply: Reply,
    }

    /// One node's scheduler against a few simulated peers and a seed, on a fake clock. Every
    /// action is checked as it comes out, and the scheduler's invariants after every step.
    struct Sim {
        sched: Scheduler,
        layout: ChunkLayout,
        start: Instant,
        now: Instant,
        peers: Vec<SimPeer>,
        seed_rate: f64,
        seed_busy_until: Option<Instant>,
        /// Chunk → peers the seed names when asked without `after_peer_failure`.
        seed_redirects: BTreeMap<u32, Vec<String>>,
        latency: Duration,
        pending: Vec<Pending>,
        seq: u64,
        log: Vec<(Duration, Action)>,
        banned: Vec<String>,
        done: u32,
        steps: u64,
    }

    impl Sim {
        fn new(chunks: u32, have: Bitfield, peers: Vec<SimPeer>, config: SchedulerConfig) -> Sim {
            Sim::with_seed(chunks, have, peers, config, 7)
        }

        fn with_seed(
            chunks: u32,
            have: Bitfield,
            peers: Vec<SimPeer>,
            config: SchedulerConfig,
            seed: u64,
        ) -> Sim {
            let layout = layout(chunks);
            let start = Instant::now();
            let sched = Scheduler::new(layout, have, config, seed).unwrap();
            let mut sim = Sim {
                sched,
                layout,
                start,
                now: start,
                peers,
                seed_rate: 4.0 * MIB,
                seed_busy_until: None,
                seed_redirects: BTreeMap::new(),
                latency: Duration::from_millis(5),
                pending: Vec::new(),
                seq: 0,
                log: Vec::new(),
                banned: Vec::new(),
                done: 0,
                steps: 0,
            };
            let announced = sim
                .peers
                .iter()
                .filter(|p| p.announced)
                .map(SimPeer::candidate)
                .collect();
            sim.sched
                .handle(Event::PeersDiscovered(announced), sim.start);
            sim
        }

        fn check(&self) {
            if let Err(problem) = self.sched.check_invariants() {
                panic!("invariant broken at {:?}: {problem}", self.now - self.start);
            }
        }

        fn push(&mut self, at: Instant, from: Source, index: u32, reply: Reply) {
            self.seq += 1;
            self.pending.push(Pending {
                at,
                seq: self.seq,
                from,
                index,
                sent: self.now,
                reply,
            });
        }

        fn transfer_time(&self, index: u32, rate: f64) -> Duration {
            let len = self.layout.chunk_len(index).unwrap();
            Duration::from_secs_f64(f64::from(len) / rate)
        }

        fn drain(&mut self) {
            while let Some(action) = self.sched.poll_action(self.now) {
                self.log.push((self.now - self.start, action.clone()));
                match action {
                    Action::Request {
                        from,
                        index,
                        after_peer_failure,
                    } => {
                        assert!(
                            !self.sched.has_chunk(index),
                            "asked for chunk {index}, which we hold"
                        );
                        match from {
                            Source::Peer(id) => {
                                assert!(!self.banned.contains(&id), "asked banned {id}");
                                assert!(!after_peer_failure);
                                let stats = self.sched.peer(&id).unwrap();
                                assert!(
                                    stats.transfer.in_flight <= stats.transfer.window,
                                    "{id} over its window: {stats:?}"
                                );
                                self.peer_request(&id, index);
                            }
                            Source::Seed => {
                                let stats = self.sched.seed_stats();
                                assert!(stats.in_flight <= stats.window, "seed: {stats:?}");
                                self.seed_request(index, after_peer_failure);
                            }
                        }
                    }
                    Action::Cancel { from, index } => self
                        .pending
                        .retain(|p| !(p.from == from && p.index == index)),
                    Action::Ban { peer, .. } => {
                        assert!(!self.banned.contains(&peer), "{peer} banned twice");
                        self.banned.push(peer);
                    }
                    Action::AskForPeers => {}
                    Action::Done => {
                        self.done += 1;
                        assert_eq!(self.done, 1, "done twice");
                        assert!(self.sched.is_done());
                    }
                }
                self.check();
            }
        }

        fn peer_request(&mut self, id: &str, index: u32) {
            let now = self.now;
            let latency = self.latency;
            let from = Source::Peer(id.to_string());
            let Some(at) = self.peers.iter().position(|p| p.id == id) else {
                self.push(
                    now + latency,
                    from,
                    index,
                    Reply::Failed(FailReason::ConnectionLost),
                );
                return;
            };
            let peer = self.peers[at].clone();
            match peer.behaviour {
                Behaviour::Stall => {}
                Behaviour::Unreachable => self.push(
                    now + latency,
                    from,
                    index,
                    Reply::Failed(FailReason::ConnectionLost),
                ),
                Behaviour::Refuses => self.push(
                    now + latency,
                    from,
                    index,
                    Reply::Failed(FailReason::Refused),
                ),
                Behaviour::Busy if peer.busy_until.is_some_and(|busy| busy > now) => self.push(
                    now + latency,
                    from,
                    index,
                    Reply::Failed(FailReason::Refused),
                ),
                Behaviour::Honest | Behaviour::BadHash | Behaviour::Busy => {
                    if !peer.holds.get(index) {
                        self.push(
                            now + latency,
                            from,
                            index,
                            Reply::Failed(FailReason::NotHeld),
                        );
                        return;
                    }
                    let begin = peer.busy_until.map_or(now, |busy| busy.max(now));
                    let end = begin + self.transfer_time(index, peer.rate);
                    self.peers[at].busy_until = Some(end);
                    let reply = if peer.behaviour == Behaviour::BadHash {
                        Reply::Failed(FailReason::BadHash)
                    } else {
                        Reply::Verified
                    };
                    self.push(end + latency, from, index, reply);
                }
            }
        }

        fn seed_request(&mut self, index: u32, after_peer_failure: bool) {
            let now = self.now;
            if !after_peer_failure {
                if let Some(names) = self.seed_redirects.get(&index) {
                    let peers = names
                        .iter()
                        .map(|name| PeerCandidate {
                            id: name.clone(),
                            site_is_local: self.peers.iter().any(|p| &p.id == name && p.local),
                            chunks: None,
                        })
                        .collect();
                    self.push(
                        now + self.latency,
                        Source::Seed,
                        index,
                        Reply::Redirected(peers),
                    );
                    return;
                }
            }
            let begin = self.seed_busy_until.map_or(now, |busy| busy.max(now));
            let end = begin + self.transfer_time(index, self.seed_rate);
            self.seed_busy_until = Some(end);
            self.push(end + self.latency, Source::Seed, index, Reply::Verified);
        }

        fn apply_gains(&mut self) {
            let elapsed = self.now - self.start;
            for peer in &mut self.peers {
                for &(after, index) in &peer.gains {
                    if after <= elapsed {
                        peer.holds.set(index, true);
                    }
                }
            }
        }

        fn deliver(&mut self, pending: Pending) {
            let event = match pending.reply {
                Reply::Verified => Event::ChunkVerified {
                    peer: pending.from,
                    index: pending.index,
                    bytes: u64::from(self.layout.chunk_len(pending.index).unwrap()),
                    elapsed: self.now.saturating_duration_since(pending.sent),
                },
                Reply::Failed(reason) => Event::ChunkFailed {
                    peer: pending.from,
                    index: pending.index,
                    reason,
                },
                Reply::Redirected(peers) => Event::SeedRedirected {
                    index: pending.index,
                    peers,
                },
            };
            self.sched.handle(event, self.now);
        }

        /// Advances to the next reply or timer; `false` when there is neither.
        fn step(&mut self) -> bool {
            self.steps += 1;
            assert!(self.steps < 200_000, "no end in sight");
            let next_reply = self
                .pending
                .iter()
                .enumerate()
                .min_by_key(|(_, p)| (p.at, p.seq))
                .map(|(at, p)| (at, p.at));
            let timer = self.sched.poll_timeout();
            match (next_reply, timer) {
                (None, None) => return false,
                (Some((at, when)), timer) if timer.is_none_or(|t| when <= t) => {
                    self.now = self.now.max(when);
                    self.apply_gains();
                    let pending = self.pending.swap_remove(at);
                    self.deliver(pending);
                }
                (_, Some(timer)) => {
                    self.now = self.now.max(timer);
                    self.apply_gains();
                    self.sched.handle(Event::Tick, self.now);
                }
                (Some(_), None) => unreachable!(),
            }
            self.check();
            self.drain();
            true
        }

        fn run(&mut self) -> &mut Self {
            self.drain();
            while self.done == 0 {
                assert!(self.step(), "stuck with nothing pending");
                assert!(
                    self.now - self.start < Duration::from_secs(3600),
                    "an hour of simulated time and not done: {}",
                    self.summary()
                );
            }
            assert!(self.sched.is_done());
            let progress = self.sched.progress();
            assert_eq!(progress.chunks_have, progress.chunks_total);
            assert_eq!(progress.bytes_have, progress.bytes_total);
            self
        }

        /// What the missing chunks are waiting for, for failure messages.
        fn summary(&self) -> String {
            let sched = &self.sched;
            let mut out = format!(
                "pending replies {}, next timer {:?}, seed allowed {}\n",
                self.pending.len(),
                sched.poll_timeout().map(|t| t - self.now),
                sched.seed_allowed(self.now)
            );
            for (index, chunk) in sched.chunks.iter().enumerate() {
                if !chunk.have {
                    out += &format!(
                        "chunk {index}: avail {} route {:?} requests {:?} failed_by {:?}\n",
                        chunk.availability, chunk.route, chunk.requests, chunk.failed_by
                    );
                }
            }
            for peer in &sched.peers {
                out += &format!(
                    "peer {} usable {} banned {:?} down {:?} in flight {} held {}\n",
                    peer.id,
                    peer.usable,
                    peer.banned,
                    peer.down_until
                        .map(|t| t.saturating_duration_since(self.now)),
                    peer.transfer.in_flight,
                    peer.held
                );
            }
            out + &format!(
                "last actions: {:?}",
                &self.log[self.log.len().saturating_sub(8)..]
            )
        }

        fn requests(&self) -> Vec<(Source, u32, bool)> {
            self.log
                .iter()
                .filter_map(|(_, action)| match action {
                    Action::Request {
                        from,
                        index,
                        after_peer_failure,
                    } => Some((from.clone(), *index, *after_peer_failure)),
                    _ => None,
                })
                .collect()
        }

        fn requests_to(&self, source: &Source) -> Vec<u32> {
            self.requests()
                .into_iter()
                .filter(|(from, _, _)| from == source)
                .map(|(_, index, _)| index)
                .collect()
        }

        fn count(&self, wanted: impl Fn(&Action) -> bool) -> usize {
            self.log.iter().filter(|(_, a)| wanted(a)).count()
        }
    }

    fn named(id: &str) -> Source {
        Source::Peer(id.to_string())
    }

    #[test]
    fn peers_that_hold_everything_serve_everything_and_the_seed_is_never_asked() {
        let n = 40;
        let peers = vec![
            peer("a", true, full(n), 8.0),
            peer("b", true, full(n), 4.0),
            peer("c", false, full(n), 16.0),
        ];
        let mut sim = Sim::new(
            n,
            Bitfield::new(n).unwrap(),
            peers,
            SchedulerConfig::default(),
        );
        sim.run();
        assert!(sim.requests_to(&Source::Seed).is_empty());
        let bytes = sim.sched.bytes();
        assert_eq!(bytes.from_seed, 0);
        assert_eq!(bytes.from_local_peers, sim.layout.size());
        assert_eq!(
            bytes.from_remote_peers, 0,
            "the remote peer is never needed"
        );
        assert_eq!(sim.count(|a| *a == Action::Done), 1);
        assert!(sim.banned.is_empty());
        assert!(sim.sched.poll_timeout().is_none());
    }

    #[test]
    fn the_rarest_chunks_are_asked_for_first() {
        let n = 16;
        // Chunks 8..16 only "a" holds; 0..8 both hold.
        let peers = vec![
            peer("a", true, full(n), 8.0),
            peer("b", true, field(n, 0..8), 8.0),
        ];
        let mut sim = Sim::new(
            n,
            Bitfield::new(n).unwrap(),
            peers,
            SchedulerConfig::default(),
        );
        sim.drain();
        let first_a = sim.requests_to(&named("a"));
        assert!(!first_a.is_empty());
        assert!(first_a.iter().all(|&i| i >= 8), "{first_a:?}");
        // "a" keeps taking rare chunks while any is left, since "b" cannot help with them.
        sim.run();
        let all_a = sim.requests_to(&named("a"));
        let first_common = all_a.iter().position(|&i| i < 8).unwrap_or(all_a.len());
        assert!(first_common >= 8, "a took a common chunk early: {all_a:?}");
    }

    #[test]
    fn one_rare_chunk_is_the_first_request_of_its_only_holder() {
        let n = 32;
        for seed in 0..20 {
            let peers = vec![
                peer("a", true, full(n), 8.0),
                peer("b", true, field(n, (0..n).filter(|&i| i != 21)), 8.0),
                peer("c", true, field(n, (0..n).filter(|&i| i != 21)), 8.0),
            ];
            let mut sim = Sim::with_seed(
                n,
                Bitfield::new(n).unwrap(),
                peers,
                SchedulerConfig::default(),
                seed,
            );
            sim.drain();
            assert_eq!(
                sim.requests_to(&named("a")).first(),
                Some(&21),
                "seed {seed}"
            );
        }
    }

    #[test]
    fn ties_are_broken_at_random_but_the_same_seed_gives_the_same_run() {
        let n = 64;
        let run = |seed: u64| {
            let peers = vec![
                peer("a", true, full(n), 8.0),
                peer("b", true, full(n), 3.0),
                peer("c", false, field(n, 0..40), 5.0),
            ];
            let mut sim =
                Sim::with_seed(n, field(n, [3, 9]), peers, SchedulerConfig::default(), seed);
            sim.run();
            sim.log.clone()
        };
        assert_eq!(run(1), run(1));
        let mut first_requests: Vec<Vec<(Duration, Action)>> = Vec::new();
        for seed in 0..8 {
            let first: Vec<(Duration, Action)> = run(seed).into_iter().take(4).collect();
            if !first_requests.contains(&first) {
                first_requests.push(first);
            }
        }
        assert!(first_requests.len() > 4, "tie-breaks do not look random");
    }

    #[test]
    fn the_seed_is_asked_only_for_chunks_no_peer_holds() {
        let n = 24;
        let most = field(n, (0..n).filter(|i| ![2, 5].contains(i)));
        let peers = vec![
            peer("a", true, most.clone(), 8.0),
            peer("b", true, most, 8.0),
        ];
        let mut sim = Sim::new(
            n,
            Bitfield::new(n).unwrap(),
            peers,
            SchedulerConfig::default(),
        );
        sim.run();
        let seed_asks: Vec<(Source, u32, bool)> = sim
            .requests()
            .into_iter()
            .filter(|(from, _, _)| *from == Source::Seed)
            .collect();
        assert_eq!(
            seed_asks,
            vec![(Source::Seed, 2, false), (Source::Seed, 5, false)]
                .into_iter()
                .filter(|a| seed_asks.contains(a))
                .collect::<Vec<_>>()
        );
        let mut indices: Vec<u32> = seed_asks.iter().map(|(_, i, _)| *i).collect();
        indices.sort_unstable();
        assert_eq!(indices, vec![2, 5]);
        assert_eq!(sim.sched.bytes().from_seed, 2 * u64::from(MIN_CHUNK_SIZE));
    }

    #[test]
    fn the_seed_waits_for_peer_discovery_before_taking_chunks() {
        let n = 4;
        let layout = layout(n);
        let mut sched = Scheduler::new(
            layout,
            Bitfield::new(n).unwrap(),
            SchedulerConfig::default(),
            1,
        )
        .unwrap();
        let t0 = Instant::now();
        let config = SchedulerConfig::default();
        assert!(config.ask_for_peers_interval < config.seed.wait_for_peers);
        assert_eq!(sched.actions(t0), vec![Action::AskForPeers]);
        // Discovery has not answered: asked again, and still nothing asked of the seed.
        let again = sched.poll_timeout().unwrap();
        assert_eq!(again, t0 + config.ask_for_peers_interval);
        sched.handle(Event::Tick, again);
        assert_eq!(sched.actions(again), vec![Action::AskForPeers]);
        let grace = t0 + config.seed.wait_for_peers;
        assert!(sched.poll_timeout().is_some_and(|at| at <= grace));
        sched.handle(Event::Tick, grace);
        let mut actions = sched.actions(grace);
        actions.retain(|a| a != &Action::AskForPeers);
        assert!(actions.iter().all(|a| matches!(
            a,
            Action::Request {
                from: Source::Seed,
                after_peer_failure: false,
                ..
            }
        )));
        assert_eq!(
            actions.len(),
            2,
            "the seed window starts at the minimum: {actions:?}"
        );
    }

    #[test]
    fn a_peer_sending_bad_hashes_is_banned_once_and_others_fill_in() {
        let n = 32;
        let peers = vec![
            peer("liar", true, full(n), 64.0).behaving(Behaviour::BadHash),
            peer("good", true, full(n), 4.0),
        ];
        let mut sim = Sim::new(
            n,
            Bitfield::new(n).unwrap(),
            peers,
            SchedulerConfig::default(),
        );
        sim.run();
        let bans: Vec<&Action> = sim
            .log
            .iter()
            .map(|(_, a)| a)
            .filter(|a| matches!(a, Action::Ban { .. }))
            .collect();
        assert_eq!(
            bans,
            vec![&Action::Ban {
                peer: "liar".into(),
                reason: BanReason::BadHash
            }]
        );
        let stats = sim.sched.peer("liar").unwrap();
        assert_eq!(stats.banned, Some(BanReason::BadHash));
        assert_eq!(stats.transfer.chunks_received, 0);
        assert!(!stats.reachable);
        assert_eq!(sim.sched.bytes().from_local_peers, sim.layout.size());
        assert!(sim.requests_to(&Source::Seed).is_empty());
        // Rediscovering it changes nothing: it is never asked again.
        let asked_before = sim.requests_to(&named("liar")).len();
        let candidate = sim.peers[0].candidate();
        sim.sched
            .handle(Event::PeersDiscovered(vec![candidate]), sim.now);
        sim.drain();
        assert_eq!(sim.requests_to(&named("liar")).len(), asked_before);
    }

    #[test]
    fn a_stalled_peer_times_out_and_its_chunks_are_asked_elsewhere() {
        let n = 24;
        let config = SchedulerConfig {
            endgame_threshold: 0,
            ..SchedulerConfig::default()
        };
        let peers = vec![
            // Fastest-looking and first in order, then silent.
            peer("stuck", true, full(n), 100.0).behaving(Behaviour::Stall),
            peer("slow", true, full(n), 2.0),
        ];
        let mut sim = Sim::new(n, Bitfield::new(n).unwrap(), peers, config.clone());
        sim.run();
        let stuck_asks = sim.requests_to(&named("stuck"));
        assert!(!stuck_asks.is_empty());
        for index in &stuck_asks {
            assert!(
                sim.requests_to(&named("slow")).contains(index),
                "chunk {index} never went elsewhere"
            );
            assert!(sim.log.iter().any(|(_, a)| *a
                == Action::Cancel {
                    from: named("stuck"),
                    index: *index
                }));
        }
        assert!(sim.now - sim.start >= config.request_timeout);
        let stats = sim.sched.peer("stuck").unwrap();
        assert!(stats.transfer.timeouts >= 1);
        assert!(stats.consecutive_timeouts >= 1);
        assert!(sim.requests_to(&Source::Seed).is_empty());
    }

    #[test]
    fn a_peer_that_stalls_again_and_again_is_banned() {
        let n = 64;
        let config = SchedulerConfig {
            endgame_threshold: 0,
            ..SchedulerConfig::default()
        };
        let peers = vec![
            peer("stuck", true, full(n), 100.0).behaving(Behaviour::Stall),
            peer("slow", true, full(n), 0.5),
        ];
        let mut sim = Sim::new(n, Bitfield::new(n).unwrap(), peers, config);
        sim.run();
        assert_eq!(sim.banned, vec!["stuck".to_string()]);
        assert_eq!(
            sim.sched.peer("stuck").unwrap().banned,
            Some(BanReason::Stalled)
        );
    }

    #[test]
    fn endgame_duplicates_the_last_chunks_and_cancels_the_losers() {
        let n = 8;
        let peers = vec![
            peer("fast", true, full(n), 32.0),
            peer("slow", true, full(n), 0.05),
        ];
        let mut sim = Sim::new(
            n,
            Bitfield::new(n).unwrap(),
            peers,
            SchedulerConfig::default(),
        );
        sim.run();
        let slow_asks = sim.requests_to(&named("slow"));
        assert!(!slow_asks.is_empty());
        let fast_asks = sim.requests_to(&named("fast"));
        let duplicated: Vec<u32> = slow_asks
            .iter()
            .copied()
            .filter(|i| fast_asks.contains(i))
            .collect();
        assert!(!duplicated.is_empty(), "no duplicate requests");
        for index in duplicated {
            assert!(
                sim.log.iter().any(|(_, a)| *a
                    == Action::Cancel {
                        from: named("slow"),
                        index
                    }),
                "slow's request for {index} was not cancelled"
            );
        }
        // Everything came from the fast peer well before the slow one could deliver one chunk.
        assert_eq!(sim.sched.peer("fast").unwrap().transfer.chunks_received, 8);
        assert!(sim.now - sim.start < Duration::from_secs(1));
        assert!(sim.banned.is_empty());
    }

    #[test]
    fn a_redirect_to_a_dead_peer_goes_back_to_the_seed_after_peer_failure() {
        let n = 8;
        let mut gone = peer("gone", true, full(n), 8.0).behaving(Behaviour::Unreachable);
        gone.announced = false;
        let peers = vec![peer("p", true, field(n, 1..n), 8.0), gone];
        let mut sim = Sim::new(
            n,
            Bitfield::new(n).unwrap(),
            peers,
            SchedulerConfig::default(),
        );
        sim.seed_redirects.insert(0, vec!["gone".into()]);
        sim.run();
        let chunk0: Vec<(Source, bool)> = sim
            .requests()
            .into_iter()
            .filter(|(_, i, _)| *i == 0)
            .map(|(from, _, apf)| (from, apf))
            .collect();
        assert_eq!(
            chunk0,
            vec![
                (Source::Seed, false),
                (named("gone"), false),
                (Source::Seed, true)
            ]
        );
        assert!(
            sim.banned.is_empty(),
            "a lost connection is not misbehaviour"
        );
        assert!(!sim.sched.peer("gone").unwrap().reachable);
    }

    #[test]
    fn a_redirect_to_a_peer_still_receiving_the_chunk_is_retried_not_escalated() {
        let n = 8;
        let mut soon = peer("soon", true, Bitfield::new(n).unwrap(), 8.0);
        soon.announced = false;
        soon.gains = vec![(Duration::from_millis(900), 0)];
        let peers = vec![peer("p", true, field(n, 1..n), 8.0), soon];
        let mut sim = Sim::new(
            n,
            Bitfield::new(n).unwrap(),
            peers,
            SchedulerConfig::default(),
        );
        sim.seed_redirects.insert(0, vec!["soon".into()]);
        sim.run();
        let chunk0: Vec<(Source, bool)> = sim
            .requests()
            .into_iter()
            .filter(|(_, i, _)| *i == 0)
            .map(|(from, _, apf)| (from, apf))
            .collect();
        assert_eq!(chunk0[0], (Source::Seed, false));
        assert!(
            chunk0[1..].iter().all(|s| *s == (named("soon"), false)),
            "{chunk0:?}"
        );
        assert!(
            chunk0.len() >= 3,
            "asked again after 'not held': {chunk0:?}"
        );
        let stats = sim.sched.peer("soon").unwrap();
        assert_eq!(stats.false_claims, 0, "it never claimed the chunk");
        assert_eq!(stats.transfer.chunks_received, 1);
        assert_eq!(sim.sched.bytes().from_seed, 0);
    }

    #[test]
    fn a_redirect_that_never_pans_out_goes_back_to_the_seed_after_patience() {
        let n = 4;
        let mut never = peer("never", true, Bitfield::new(n).unwrap(), 8.0);
        never.announced = false;
        let peers = vec![peer("p", true, field(n, 1..n), 8.0), never];
        let config = SchedulerConfig::default();
        let patience = config.seed.redirect_patience;
        let mut sim = Sim::new(n, Bitfield::new(n).unwrap(), peers, config);
        sim.seed_redirects.insert(0, vec!["never".into()]);
        sim.run();
        let (at, last) = sim
            .log
            .iter()
            .rev()
            .find(|(_, a)| matches!(a, Action::Request { index: 0, .. }))
            .unwrap();
        assert_eq!(
            *last,
            Action::Request {
                from: Source::Seed,
                index: 0,
                after_peer_failure: true
            }
        );
        assert!(*at >= patience);
        let retries = sim.requests_to(&named("never")).len();
        assert!(
            (3..=10).contains(&retries),
            "{retries} retries in the patience window"
        );
        assert!(sim.banned.is_empty());
    }

    #[test]
    fn a_peer_claiming_chunks_it_lacks_loses_trust_then_is_banned() {
        let n = 32;
        let mut liar = peer("claims", true, Bitfield::new(n).unwrap(), 64.0);
        liar.claims = full(n);
        let peers = vec![liar, peer("good", true, full(n), 2.0)];
        let mut sim = Sim::new(
            n,
            Bitfield::new(n).unwrap(),
            peers,
            SchedulerConfig::default(),
        );
        sim.run();
        assert_eq!(sim.banned, vec!["claims".to_string()]);
        let stats = sim.sched.peer("claims").unwrap();
        assert_eq!(stats.banned, Some(BanReason::FalseClaims));
        assert_eq!(stats.false_claims, 3);
        assert!(sim.requests_to(&Source::Seed).is_empty());
    }

    #[test]
    fn a_busy_peer_is_paused_not_abandoned() {
        let n = 8;
        let peers = vec![peer("busy", true, full(n), 16.0).behaving(Behaviour::Busy)];
        let mut sim = Sim::new(
            n,
            Bitfield::new(n).unwrap(),
            peers,
            SchedulerConfig::default(),
        );
        sim.run();
        let stats = sim.sched.peer("busy").unwrap();
        assert!(stats.transfer.failures > 0, "it never refused: {stats:?}");
        assert_eq!(stats.transfer.chunks_received, u64::from(n));
        assert!(sim.requests_to(&Source::Seed).is_empty());
        assert!(sim.banned.is_empty());
    }

    #[test]
    fn a_peer_that_always_refuses_hands_its_chunks_to_the_seed_after_a_few_tries() {
        let n = 4;
        let config = SchedulerConfig::default();
        let peers = vec![peer("no", true, full(n), 16.0).behaving(Behaviour::Refuses)];
        let mut sim = Sim::new(n, Bitfield::new(n).unwrap(), peers, config.clone());
        // As admission does while "no" is the only holder: a plain ask is sent back to it.
        for index in 0..n {
            sim.seed_redirects.insert(index, vec!["no".into()]);
        }
        sim.run();
        for index in 0..n {
            let seed_asks: Vec<bool> = sim
                .requests()
                .into_iter()
                .filter(|(from, i, _)| *from == Source::Seed && *i == index)
                .map(|(_, _, apf)| apf)
                .collect();
            // Busy is not failed: the seed is asked for other holders a few times first, and
            // told that peers failed only then.
            let mut expected = vec![false; 1 + MAX_REASKS as usize];
            expected.push(true);
            assert_eq!(seed_asks, expected, "chunk {index}");
        }
        assert!(sim.requests_to(&named("no")).len() >= config.give_up_after_refusals as usize);
        assert!(sim.banned.is_empty(), "refusing is not misbehaviour");
    }

    #[test]
    fn local_peers_are_preferred_and_remote_ones_give_only_what_locals_lack() {
        let n = 32;
        let peers = vec![
            peer("near", true, field(n, 0..16), 2.0),
            peer("far", false, full(n), 64.0),
        ];
        let mut sim = Sim::new(
            n,
            Bitfield::new(n).unwrap(),
            peers,
            SchedulerConfig::default(),
        );
        sim.run();
        let far = sim.requests_to(&named("far"));
        assert!(
            far.iter().all(|&i| i >= 16),
            "the WAN carried a local chunk: {far:?}"
        );
        let bytes = sim.sched.bytes();
        assert_eq!(bytes.from_local_peers, 16 * u64::from(MIN_CHUNK_SIZE));
        assert_eq!(bytes.from_remote_peers, 16 * u64::from(MIN_CHUNK_SIZE));

        // Without the strict rule the fast remote peer takes what the slow local one cannot.
        let peers = vec![
            peer("near", true, field(n, 0..16), 2.0),
            peer("far", false, full(n), 64.0),
        ];
        let config = SchedulerConfig {
            prefer_local_strictly: false,
            ..SchedulerConfig::default()
        };
        let mut sim = Sim::new(n, Bitfield::new(n).unwrap(), peers, config);
        sim.run();
        assert!(sim.requests_to(&named("far")).iter().any(|&i| i < 16));
    }

    #[test]
    fn windows_grow_with_measured_rate_and_stay_within_bounds() {
        let n = 256;
        let peers = vec![
            peer("fast", true, full(n), 200.0),
            peer("slow", true, full(n), 0.5),
        ];
        let config = SchedulerConfig::default();
        let mut sim = Sim::new(n, Bitfield::new(n).unwrap(), peers, config.clone());
        let mut widest = BTreeMap::<String, u32>::new();
        sim.drain();
        while sim.done == 0 {
            assert!(sim.step());
            for stats in sim.sched.peer_stats() {
                assert!(stats.transfer.in_flight <= config.max_in_flight_per_peer);
                let widest = widest.entry(stats.id.clone()).or_default();
                *widest = (*widest).max(stats.transfer.window);
            }
        }
        assert_eq!(widest["fast"], config.max_in_flight_per_peer);
        assert_eq!(widest["slow"], config.min_in_flight_per_peer);
        let rate = sim
            .sched
            .peer("fast")
            .unwrap()
            .transfer
            .rate_bytes_per_sec
            .unwrap();
        assert!((rate / (200.0 * MIB) - 1.0).abs() < 0.2, "measured {rate}");
    }

    #[test]
    fn a_resumed_download_never_asks_for_what_it_holds() {
        let n = 20;
        let have = field(n, (0..n).filter(|i| i % 3 == 0));
        let peers = vec![peer("a", true, full(n), 8.0)];
        let mut sim = Sim::new(n, have.clone(), peers, SchedulerConfig::default());
        sim.run();
        let asked: BTreeSet<u32> = sim.requests().into_iter().map(|(_, i, _)| i).collect();
        assert!(asked.iter().all(|&i| !have.get(i)));
        assert_eq!(asked.len() as u32, n - have.count_ones());

        let mut done = Scheduler::new(layout(n), full(n), SchedulerConfig::default(), 1).unwrap();
        assert_eq!(done.actions(Instant::now()), vec![Action::Done]);
        assert_eq!(done.poll_timeout(), None);
        assert!(matches!(
            Scheduler::new(layout(n), full(n + 1), SchedulerConfig::default(), 1),
            Err(SchedulerError::HaveLengthMismatch {
                expected: 20,
                got: 21
            })
        ));
    }

    #[test]
    fn an_empty_blob_is_one_empty_chunk() {
        let layout = ChunkLayout::for_size(0).unwrap();
        let mut sched = Scheduler::new(
            layout,
            Bitfield::new(1).unwrap(),
            SchedulerConfig::default(),
            3,
        )
        .unwrap();
        let t0 = Instant::now();
        sched.handle(Event::PeersDiscovered(vec![]), t0);
        let actions = sched.actions(t0);
        assert!(actions.contains(&Action::Request {
            from: Source::Seed,
            index: 0,
            after_peer_failure: false
        }));
        sched.handle(
            Event::ChunkVerified {
                peer: Source::Seed,
                index: 0,
                bytes: 0,
                elapsed: Duration::ZERO,
            },
            t0,
        );
        assert_eq!(sched.actions(t0), vec![Action::Done]);
        sched.check_invariants().unwrap();
    }

    // ---- the seed's redirects, driven by hand ----

    /// Chunks asked of `from`, in order, among `actions`.
    fn asked_of(actions: &[Action], from: &Source) -> Vec<u32> {
        actions
            .iter()
            .filter_map(|action| match action {
                Action::Request {
                    from: source,
                    index,
                    ..
                } if source == from => Some(*index),
                _ => None,
            })
            .collect()
    }

    fn candidate(id: &str, site_is_local: bool, chunks: Option<Bitfield>) -> PeerCandidate {
        PeerCandidate {
            id: id.to_string(),
            site_is_local,
            chunks,
        }
    }

    #[test]
    fn other_sites_holdings_come_in_only_every_remote_holdings_interval() {
        let config = SchedulerConfig::default();
        let interval = config.remote_holdings_interval;
        let mut sched = Scheduler::new(layout(4), Bitfield::new(4).unwrap(), config, 5).unwrap();
        let t0 = Instant::now();
        // The first answer at the start: nobody holds anything yet.
        sched.handle(
            Event::PeersDiscovered(vec![
                candidate("far", false, Some(field(4, []))),
                candidate("near", true, Some(field(4, []))),
            ]),
            t0,
        );
        sched.actions(t0);
        // A second answer a second later: both hold chunks now, but only the same-site one's
        // are taken in; the remote peer is not asked for what its site holds.
        let t1 = t0 + Duration::from_secs(1);
        sched.handle(
            Event::PeersDiscovered(vec![
                candidate("far", false, Some(field(4, [0, 1, 2, 3]))),
                candidate("near", true, Some(field(4, [0]))),
            ]),
            t1,
        );
        let actions = sched.actions(t1);
        assert_eq!(asked_of(&actions, &named("near")), vec![0], "{actions:?}");
        assert!(asked_of(&actions, &named("far")).is_empty(), "{actions:?}");
        // Once the interval has passed, an answer brings the remote holdings in.
        let t2 = t0 + interval;
        sched.handle(
            Event::PeersDiscovered(vec![candidate("far", false, Some(field(4, [0, 1, 2, 3])))]),
            t2,
        );
        let actions = sched.actions(t2);
        let far = asked_of(&actions, &named("far"));
        assert!(!far.is_empty(), "{actions:?}");
        assert!(far.iter().all(|&i| (1..4).contains(&i)), "{actions:?}");
        sched.check_invariants().unwrap();
    }

    fn verified(from: &str, index: u32) -> Event {
        Event::ChunkVerified {
            peer: named(from),
            index,
            bytes: u64::from(MIN_CHUNK_SIZE),
            elapsed: Duration::from_millis(100),
        }
    }

    /// A scheduler that knows no peer yet and may ask the seed at once.
    fn hand_driven(chunks: u32, config: SchedulerConfig) -> (Scheduler, Instant) {
        let mut sched =
            Scheduler::new(layout(chunks), Bitfield::new(chunks).unwrap(), config, 11).unwrap();
        let t0 = Instant::now();
        sched.handle(Event::PeersDiscovered(vec![]), t0);
        (sched, t0)
    }

    #[test]
    fn the_seed_is_asked_no_faster_than_its_redirects_can_be_followed() {
        let n = 32;
        let config = SchedulerConfig {
            // The named peer takes two requests at a time, however fast it turns out to be.
            max_in_flight_per_peer: 2,
            seed: SeedPolicy {
                max_in_flight: 1,
                max_redirects_waiting: 3,
                ..SeedPolicy::default()
            },
            ..SchedulerConfig::default()
        };
        let (mut sched, t0) = hand_driven(n, config);
        let p = named("p");
        // Every chunk asked of the seed is redirected to "p", which holds none of them yet.
        let mut seed_asks = Vec::new();
        let mut to_p = Vec::new();
        let mut actions = sched.actions(t0);
        loop {
            to_p.extend(asked_of(&actions, &p));
            let asks = asked_of(&actions, &Source::Seed);
            if asks.is_empty() {
                break;
            }
            seed_asks.extend(&asks);
            actions.clear();
            for index in asks {
                let peers = vec![candidate("p", true, None)];
                sched.handle(Event::SeedRedirected { index, peers }, t0);
                actions.extend(sched.actions(t0));
            }
            sched.check_invariants().unwrap();
        }
        // Two chunks went to "p"; three wait for it, and then the seed is left alone (without
        // the limit it would be asked for all 32 chunks, which then expire into the seed).
        assert_eq!(to_p.len(), 2, "{to_p:?}");
        assert_eq!(seed_asks.len(), 2 + 3, "{seed_asks:?}");

        // "p" delivers one: a waiting chunk goes to it, and that frees one seed ask.
        let t1 = t0 + Duration::from_millis(100);
        sched.handle(verified("p", to_p[0]), t1);
        let actions = sched.actions(t1);
        sched.check_invariants().unwrap();
        let next_to_p = asked_of(&actions, &p);
        assert_eq!(next_to_p.len(), 1, "{actions:?}");
        assert!(seed_asks[2..].contains(&next_to_p[0]), "{actions:?}");
        assert_eq!(asked_of(&actions, &Source::Seed).len(), 1, "{actions:?}");
    }

    #[test]
    fn with_every_peer_slot_busy_one_waiting_redirect_holds_back_the_seed() {
        let n = 8;
        let config = SchedulerConfig {
            max_peers_in_use: 1,
            max_in_flight_per_peer: 2,
            seed: SeedPolicy {
                max_in_flight: 1,
                ..SeedPolicy::default()
            },
            ..SchedulerConfig::default()
        };
        let (mut sched, t0) = hand_driven(n, config);
        sched.handle(
            Event::PeersDiscovered(vec![candidate("busy", true, Some(field(n, 0..2)))]),
            t0,
        );
        let actions = sched.actions(t0);
        let mut to_busy = asked_of(&actions, &named("busy"));
        to_busy.sort_unstable();
        assert_eq!(to_busy, vec![0, 1], "{actions:?}");
        let asks = asked_of(&actions, &Source::Seed);
        assert_eq!(asks.len(), 1, "{actions:?}");
        let index = asks[0];
        // Redirected to a peer that cannot be used while "busy" takes the only slot.
        let peers = vec![candidate("free", true, None)];
        sched.handle(Event::SeedRedirected { index, peers }, t0);
        let actions = sched.actions(t0);
        sched.check_invariants().unwrap();
        assert!(actions.is_empty(), "{actions:?}");

        // Once "busy" is done, "free" gets the chunk it was named for.
        let t1 = t0 + Duration::from_millis(100);
        sched.handle(verified("busy", 0), t1);
        sched.handle(verified("busy", 1), t1);
        let actions = sched.actions(t1);
        sched.check_invariants().unwrap();
        assert_eq!(
            asked_of(&actions, &named("free")),
            vec![index],
            "{actions:?}"
        );
    }

    #[test]
    fn a_peer_of_another_site_named_by_the_seed_is_used_for_that_chunk_only() {
        let n = 8;
        let config = SchedulerConfig {
            seed: SeedPolicy {
                max_in_flight: 1,
                ..SeedPolicy::default()
            },
            ..SchedulerConfig::default()
        };
        let (mut sched, t0) = hand_driven(n, config);
        let actions = sched.actions(t0);
        let asks = asked_of(&actions, &Source::Seed);
        assert_eq!(asks.len(), 1, "{actions:?}");
        let index = asks[0];
        // The redirect says "far" holds everything: only the chunk it was named for crosses.
        let peers = vec![candidate("far", false, Some(full(n)))];
        sched.handle(Event::SeedRedirected { index, peers }, t0);
        let actions = sched.actions(t0);
        sched.check_invariants().unwrap();
        assert_eq!(
            asked_of(&actions, &named("far")),
            vec![index],
            "{actions:?}"
        );
        assert_eq!(sched.peer("far").unwrap().chunks_held, 0);

        // A peer of this site named the same way is taken at its word for everything.
        let asks = asked_of(&actions, &Source::Seed);
        assert_eq!(asks.len(), 1, "{actions:?}");
        let peers = vec![candidate("near", true, Some(full(n)))];
        sched.handle(
            Event::SeedRedirected {
                index: asks[0],
                peers,
            },
            t0,
        );
        let actions = sched.actions(t0);
        sched.check_invariants().unwrap();
        assert_eq!(sched.peer("near").unwrap().chunks_held, n);
        assert_eq!(asked_of(&actions, &named("near")).len(), 2, "{actions:?}");
        assert!(asked_of(&actions, &named("far")).is_empty(), "{actions:?}");
    }

    // ---- random event orders ----

    #[derive(Clone, Debug)]
    struct PeerSpec {
        local: bool,
        holds: Vec<bool>,
        extra_claims: Vec<bool>,
        rate_mib: f64,
        behaviour: Behaviour,
    }

    fn behaviour() -> impl Strategy<Value = Behaviour> {
        prop_oneof![
            5 => Just(Behaviour::Honest),
            1 => Just(Behaviour::BadHash),
            1 => Just(Behaviour::Stall),
            1 => Just(Behaviour::Unreachable),
            1 => Just(Behaviour::Busy),
            1 => Just(Behaviour::Refuses),
        ]
    }

    fn peer_spec(chunks: usize) -> impl Strategy<Value = PeerSpec> {
        (
            any::<bool>(),
            proptest::collection::vec(any::<bool>(), chunks),
            proptest::collection::vec(proptest::bool::weighted(0.1), chunks),
            1.0f64..64.0,
            behaviour(),
        )
            .prop_map(
                |(local, holds, extra_claims, rate_mib, behaviour)| PeerSpec {
                    local,
                    holds,
                    extra_claims,
                    rate_mib,
                    behaviour,
                },
            )
    }

    /// A random step of the chaos phase: (kind, a, b), interpreted in the test.
    type Op = (u8, u32, u32);
    /// Chunk count, peers, chaos steps, scheduler seed, small windows.
    type Scenario = (u32, Vec<PeerSpec>, Vec<Op>, u64, bool);

    fn scenario() -> impl Strategy<Value = Scenario> {
        (1u32..24).prop_flat_map(|chunks| {
            (
                Just(chunks),
                proptest::collection::vec(peer_spec(chunks as usize), 0..5),
                proptest::collection::vec((any::<u8>(), any::<u32>(), any::<u32>()), 0..120),
                any::<u64>(),
                any::<bool>(),
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Replies delivered in any order, ticks of any length, lies, disconnects, rediscovery
        /// and redirects: every invariant holds after every step, and once the swarm behaves
        /// in time order again the download completes with exactly one `Done`.
        #[test]
        fn random_event_orders_keep_every_invariant_and_still_finish(
            (chunks, specs, ops, seed, small_windows) in scenario()
        ) {
            let peers: Vec<SimPeer> = specs
                .iter()
                .enumerate()
                .map(|(n, spec)| {
                    let holds = field(chunks, (0..chunks).filter(|&i| spec.holds[i as usize]));
                    let mut sim_peer = peer(&format!("p{n}"), spec.local, holds, spec.rate_mib)
                        .behaving(spec.behaviour);
                    for i in 0..chunks {
                        if spec.extra_claims[i as usize] {
                            sim_peer.claims.set(i, true);
                        }
                    }
                    sim_peer
                })
                .collect();
            let mut config = SchedulerConfig {
                request_timeout: Duration::from_secs(2),
                endgame_threshold: (seed % 8) as u32,
                ..SchedulerConfig::default()
            };
            if small_windows {
                config.max_peers_in_use = 2;
                config.max_in_flight_per_peer = 3;
                config.seed.max_in_flight = 1;
            }
            let have = field(chunks, (0..chunks).filter(|i| (seed >> (i % 64)) & 7 == 0));
            let mut sim = Sim::with_seed(chunks, have, peers, config, seed);
            for index in 0..chunks {
                if !specs.is_empty() && (seed >> (index % 60)) & 3 == 0 {
                    let name = format!("p{}", index as usize % specs.len());
                    sim.seed_redirects.insert(index, vec![name]);
                }
            }
            sim.drain();
            let peer_name = |n: u32| format!("p{}", n as usize % specs.len().max(1));
            for (kind, a, b) in ops {
                sim.now += Duration::from_millis(1);
                match kind % 8 {
                    0..=2 => {
                        if !sim.pending.is_empty() {
                            let pending = sim.pending.swap_remove(a as usize % sim.pending.len());
                            sim.deliver(pending);
                        }
                    }
                    3 => {
                        sim.now += Duration::from_millis(u64::from(a % 5000));
                        sim.sched.handle(Event::Tick, sim.now);
                    }
                    4 => sim.sched.handle(
                        Event::PeerHaveOne { peer: peer_name(a), index: b % chunks },
                        sim.now,
                    ),
                    5 => sim.sched.handle(Event::PeerDisconnected(peer_name(a)), sim.now),
                    6 => {
                        if let Some(p) = sim.peers.get(a as usize % specs.len().max(1)) {
                            let candidate = p.candidate();
                            sim.sched.handle(Event::PeersDiscovered(vec![candidate]), sim.now);
                        }
                    }
                    _ => {
                        // A stray report about a request that may never have existed.
                        let reasons = [
                            FailReason::Timeout,
                            FailReason::NotHeld,
                            FailReason::Refused,
                            FailReason::ConnectionLost,
                        ];
                        let peer = if specs.is_empty() || b % 3 == 0 {
                            Source::Seed
                        } else {
                            Source::Peer(peer_name(a))
                        };
                        sim.sched.handle(
                            Event::ChunkFailed {
                                peer,
                                index: b % chunks,
                                reason: reasons[a as usize % reasons.len()],
                            },
                            sim.now,
                        );
                    }
                }
                sim.check();
                sim.drain();
            }
            // Requests whose replies were delivered out of order may be lost to the scheduler;
            // from here on the network behaves, and the download must still finish.
            sim.run();
            prop_assert_eq!(sim.count(|a| *a == Action::Done), 1);
            // Only a peer that sent bad bytes is banned for them (honest peers may still be
            // banned as stalled: replies held back above look exactly like a stall).
            for (_, action) in &sim.log {
                if let Action::Ban { peer, reason: BanReason::BadHash } = action {
                    let spec = &specs[peer[1..].parse::<usize>().unwrap()];
                    prop_assert_eq!(spec.behaviour, Behaviour::BadHash);
                }
            }
        }
    }
}
