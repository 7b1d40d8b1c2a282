//! The I/O driver around the swarm scheduler: it turns [`Action`]s into QUIC requests to peers
//! and the seed, streams answers into the cache (which verifies every chunk before it is
//! visible), and feeds what happened back as [`Event`]s.
//!
//! Owns: connections to peers (dialled on first use, reused, bounded by the scheduler's
//! `max_peers_in_use`), one task per chunk request with a deadline, cancelling losers, and
//! reporting progress. Does not own: any choice of chunk or source (the scheduler decides).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use pkgmesh_protocol::blob::{BlobId, ChunkHashes};
use pkgmesh_protocol::wire::{ErrorCode, PeerInfo, Request, Response};
use tokio::sync::{mpsc, watch};

use super::transfers::{wait_for_end, Joined, TransferState, TransferStatus};
use super::NodeState;
use crate::pki::Role;
use crate::swarm::scheduler::{
    Action, Event, FailReason, PeerCandidate, Scheduler, SchedulerConfig, Source,
};
use crate::transport::{self, PeerConnection, TransportError};

/// Dialling a peer.
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// One chunk request, from the request frame to the last payload byte.
const CHUNK_DEADLINE: Duration = Duration::from_secs(60);
/// Peers asked for in one `GetPeers`.
const PEERS_PER_ASK: u32 = 32;
/// Times the seed may answer "unavailable" (its origin failing) for one chunk before the fetch
/// gives up. The seed serves a chunk only when no reachable peer holds it, so once its origin
/// cannot give it either, waiting longer only hangs the caller; the seed's error backoff
/// (1 s, doubling) spreads these over about 15 s, so a short origin outage is still ridden out.
const SEED_UNAVAILABLE_ATTEMPTS: u32 = 4;

/// A fetch's final status: where its bytes came from.
pub type FetchReport = TransferStatus;

/// Fetches blob `blob` of `size` bytes into the cache, from peers where they can and from the
/// seed where they cannot. Returns when every chunk is verified and in the cache. A download of
/// the same blob already in flight is joined, not repeated.
pub async fn fetch_blob(
    state: Arc<NodeState>,
    blob: BlobId,
    size: u64,
) -> anyhow::Result<FetchReport> {
    wait_for_end(start_fetch(state, blob, size)).await
}

/// Starts the download of `blob` in the background (or joins the one in flight) and returns
/// its progress. The download goes on if the caller stops watching.
pub fn start_fetch(
    state: Arc<NodeState>,
    blob: BlobId,
    size: u64,
) -> watch::Receiver<TransferStatus> {
    let initial = TransferStatus {
        blob: blob.to_hex(),
        size,
        ..TransferStatus::default()
    };
    match state.transfers.join(blob, initial) {
        Joined::Follower(receiver) => receiver,
        Joined::Leader(progress, receiver) => {
            tokio::spawn(async move {
                let result = fetch_and_pin(&state, blob, size, &progress).await;
                if let Err(error) = result {
                    tracing::warn!(%blob, error = format!("{error:#}"), "download failed");
                    progress.send_modify(|status| {
                        status.state = TransferState::Failed;
                        status.error = Some(format!("{error:#}"));
                    });
                }
                state.transfers.finish(&blob);
            });
            receiver
        }
    }
}

async fn fetch_and_pin(
    state: &Arc<NodeState>,
    blob: BlobId,
    size: u64,
    progress: &watch::Sender<TransferStatus>,
) -> anyhow::Result<()> {
    let hashes = chunk_hashes(state, blob, size).await?;
    // Pinned while it downloads, so its own chunks are never evicted to make room for it: a
    // blob larger than the budget then fails with "cache full of pinned data", not a loop.
    let cache = state.cache.clone();
    tokio::task::spawn_blocking(move || cache.pin(&blob, FETCH_PIN)).await??;
    let result = fetch_pinned(state.clone(), hashes, progress).await;
    let cache = state.cache.clone();
    let _ = tokio::task::spawn_blocking(move || cache.unpin(&blob, FETCH_PIN)).await;
    result
}

/// The pin reason of a blob being downloaded.
pub const FETCH_PIN: &str = "download in progress";

/// Progress snapshots are published at most this often (and at the end).
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

async fn fetch_pinned(
    state: Arc<NodeState>,
    hashes: ChunkHashes,
    progress: &watch::Sender<TransferStatus>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let blob = hashes.id();
    let layout = hashes.layout();
    let have = match state.cache.bitfield(&blob) {
        Some(have) => have,
        None => pkgmesh_protocol::bitfield::Bitfield::new(layout.chunk_count())?,
    };
    let already = have.count_ones();
    let mut scheduler = Scheduler::new(
        layout,
        have,
        SchedulerConfig::default(),
        rand::random::<u64>(),
    )
    .map_err(|e| anyhow!("cannot schedule blob {blob}: {e}"))?;
    let (events_tx, mut events) = mpsc::unbounded_channel::<Event>();
    let (fatal_tx, mut fatal) = mpsc::unbounded_channel::<String>();
    let mut driver = Driver {
        state: state.clone(),
        blob,
        hashes: Arc::new(hashes),
        peers: Arc::new(tokio::sync::Mutex::new(HashMap::new())),
        addresses: Arc::new(tokio::sync::Mutex::new(HashMap::new())),
        running: HashMap::new(),
        events: events_tx,
        fatal: fatal_tx,
        banned: Vec::new(),
        seed_unavailable: Arc::new(std::sync::Mutex::new(HashMap::new())),
        asking_for_peers: Arc::new(std::sync::atomic::AtomicBool::new(false)),
    };
    let publish = |scheduler: &Scheduler, driver: &Driver, state: TransferState| {
        let bytes = scheduler.bytes();
        let peers_in_use = scheduler
            .peer_stats()
            .iter()
            .filter(|p| p.transfer.in_flight > 0)
            .count() as u32;
        progress.send_modify(|status| {
            status.chunks = layout.chunk_count();
            status.chunks_held = scheduler.progress().chunks_have;
            status.chunks_already_held = already;
            status.bytes_from_seed = bytes.from_seed;
            status.bytes_from_local_peers = bytes.from_local_peers;
            status.bytes_from_remote_peers = bytes.from_remote_peers;
            status.peers_in_use = peers_in_use;
            status.peers_banned = driver.banned.clone();
            status.seconds = started.elapsed().as_secs_f64();
            status.state = state;
        });
    };
    publish(&scheduler, &driver, TransferState::Running);
    let mut last_published = Instant::now();
    // The scheduler's first action is `AskForPeers`, and it leaves the seed alone until that
    // is answered (or its grace passes), so chunks peers hold are not taken from the seed.
    loop {
        let now = Instant::now();
        let mut done = false;
        while let Some(action) = scheduler.poll_action(now) {
            match action {
                Action::Done => done = true,
                other => driver.perform(other),
            }
        }
        if done {
            break;
        }
        if now.duration_since(last_published) >= PROGRESS_INTERVAL {
            publish(&scheduler, &driver, TransferState::Running);
            last_published = now;
        }
        let deadline = scheduler
            .poll_timeout()
            .unwrap_or_else(|| now + Duration::from_secs(1))
            .min(now + PROGRESS_INTERVAL);
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else { bail!("the fetch driver lost its event channel") };
                if let Event::PeersDiscovered(candidates) = &event {
                    tracing::debug!(%blob, peers = candidates.len(), "peers discovered");
                }
                scheduler.handle(event, Instant::now());
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                scheduler.handle(Event::Tick, Instant::now());
            }
            Some(message) = fatal.recv() => {
                for (_, task) in driver.running.drain() {
                    task.abort();
                }
                bail!("{message}");
            }
        }
    }
    for (_, task) in driver.running.drain() {
        task.abort();
    }
    publish(&scheduler, &driver, TransferState::Done);
    let bytes = scheduler.bytes();
    let received = &state.received;
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    received.from_seed.fetch_add(bytes.from_seed, relaxed);
    received
        .from_local_peers
        .fetch_add(bytes.from_local_peers, relaxed);
    received
        .from_remote_peers
        .fetch_add(bytes.from_remote_peers, relaxed);
    state.stats.record_transfer(&blob, &scheduler);
    Ok(())
}

/// The blob's chunk-hash list: from the cache, else from the seed, else (the seed out of reach)
/// from a peer; always verified against the blob id before use.
async fn chunk_hashes(state: &NodeState, blob: BlobId, size: u64) -> anyhow::Result<ChunkHashes> {
    if let Some(hashes) = state.cache.chunk_hashes(&blob) {
        return Ok(hashes);
    }
    let hashes = match hashes_from_seed(state, blob, size).await {
        Ok(hashes) => hashes,
        Err(seed_error) => match hashes_from_peers(state, blob, size).await {
            Some(hashes) => hashes,
            None => {
                return Err(seed_error.context(format!(
                    "no chunk list for blob {blob}, and no known peer could give one"
                )))
            }
        },
    };
    let cache = state.cache.clone();
    let registered = hashes.clone();
    tokio::task::spawn_blocking(move || cache.register_blob(&registered)).await??;
    Ok(hashes)
}

async fn hashes_from_seed(
    state: &NodeState,
    blob: BlobId,
    size: u64,
) -> anyhow::Result<ChunkHashes> {
    let seed = state.seed().await?;
    let response = seed.call(&Request::GetChunkHashes { blob, size }).await?;
    let Response::ChunkHashes { packed, .. } = response else {
        bail!("the seed answered GetChunkHashes with {response:?}");
    };
    ChunkHashes::verify_packed(blob, size, &packed)
        .with_context(|| format!("the seed's chunk list for blob {blob}"))
}

async fn hashes_from_peers(state: &NodeState, blob: BlobId, size: u64) -> Option<ChunkHashes> {
    for (name, peer) in state.known_peers().into_iter().take(PEERS_PER_ASK as usize) {
        let asked = async {
            let conn = transport::connect(
                &state.endpoint,
                peer.listen,
                Role::Node,
                PEER_CONNECT_TIMEOUT,
            )
            .await?;
            let request = Request::GetChunkHashes { blob, size };
            let (response, _, _) =
                transport::request(&conn, &request, PEER_CONNECT_TIMEOUT).await?;
            match response {
                Response::ChunkHashes { packed, .. } => {
                    Ok(ChunkHashes::verify_packed(blob, size, &packed)?)
                }
                other => Err(anyhow!("answered {other:?}")),
            }
        };
        match asked.await {
            Ok(hashes) => return Some(hashes),
            Err(error) => tracing::debug!(peer = name, %error, "no chunk list from this peer"),
        }
    }
    None
}

/// What known peers hold of `blob`, asked of each directly: discovery while the tracker is out
/// of reach. Peers that do not answer in time are left out.
async fn peers_from_known(state: &NodeState, blob: BlobId) -> Vec<PeerInfo> {
    let asks = state
        .known_peers()
        .into_iter()
        .take(PEERS_PER_ASK as usize)
        .map(|(name, peer)| async move {
            let asked = async {
                let conn = transport::connect(
                    &state.endpoint,
                    peer.listen,
                    Role::Node,
                    PEER_CONNECT_TIMEOUT,
                )
                .await
                .ok()?;
                if conn.peer.name != name {
                    return None;
                }
                let request = Request::GetBitfield { blob };
                match transport::request(&conn, &request, PEER_CONNECT_TIMEOUT).await {
                    Ok((
                        Response::Bitfield {
                            chunks: Some(chunks),
                            ..
                        },
                        _,
                        _,
                    )) => Some(PeerInfo {
                        node: name,
                        listen: peer.listen.to_string(),
                        site: peer.site,
                        chunks: Some(chunks),
                    }),
                    _ => None,
                }
            };
            tokio::time::timeout(PEER_CONNECT_TIMEOUT, asked)
                .await
                .ok()
                .flatten()
        });
    futures::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

type PeerConnections = Arc<tokio::sync::Mutex<HashMap<String, PeerConnection>>>;

struct Driver {
    state: Arc<NodeState>,
    blob: BlobId,
    hashes: Arc<ChunkHashes>,
    peers: PeerConnections,
    /// Where each peer listens, from the tracker's answers and the seed's redirects.
    addresses: AddressBook,
    running: HashMap<(Source, u32), tokio::task::JoinHandle<()>>,
    events: mpsc::UnboundedSender<Event>,
    /// A failure that ends the fetch, as the caller will read it: this node's own (its disk,
    /// its cache), or a chunk nobody can provide.
    fatal: mpsc::UnboundedSender<String>,
    banned: Vec<String>,
    /// Per chunk, how often the seed answered that it cannot provide it.
    seed_unavailable: Arc<std::sync::Mutex<HashMap<u32, u32>>>,
    /// A `GetPeers` is on its way: a slow tracker gets one ask per fetch at a time, not a
    /// pile of them (the scheduler asks every second while it knows few useful peers).
    asking_for_peers: Arc<std::sync::atomic::AtomicBool>,
}

impl Driver {
    fn perform(&mut self, action: Action) {
        match action {
            Action::Request {
                from,
                index,
                after_peer_failure,
            } => self.request(from, index, after_peer_failure),
            Action::Cancel { from, index } => {
                if let Some(task) = self.running.remove(&(from, index)) {
                    task.abort();
                }
            }
            Action::Ban { peer, reason } => {
                tracing::warn!(blob = %self.blob, %peer, %reason, "peer banned for this blob");
                self.banned.push(format!("{peer}: {reason}"));
                let state = self.state.clone();
                let blob = self.blob;
                tokio::spawn(async move {
                    let report = async {
                        let seed = state.seed().await?;
                        let request = Request::ReportBan {
                            blob,
                            peer: peer.clone(),
                            reason: reason.to_string(),
                        };
                        seed.call(&request).await
                    };
                    if let Err(error) = report.await {
                        tracing::info!(%peer, %error, "could not report a banned peer to the tracker");
                    }
                });
            }
            Action::AskForPeers => self.ask_for_peers(),
            Action::Done => {}
        }
    }

    fn ask_for_peers(&mut self) {
        use std::sync::atomic::Ordering;
        if self.asking_for_peers.swap(true, Ordering::AcqRel) {
            return;
        }
        let asking = self.asking_for_peers.clone();
        let state = self.state.clone();
        let events = self.events.clone();
        let addresses = self.addresses.clone();
        let blob = self.blob;
        let size = self.hashes.layout().size();
        tokio::spawn(async move {
            let answer = async {
                let seed = state.seed().await?;
                let request = Request::GetPeers {
                    blob,
                    size,
                    max: PEERS_PER_ASK,
                };
                match seed.call(&request).await? {
                    Response::Peers(peers) => Ok::<_, anyhow::Error>(peers),
                    other => Err(anyhow!("GetPeers answered with {other:?}")),
                }
            }
            .await;
            let peers = match answer {
                Ok(peers) => {
                    state.remember_peers(&peers);
                    peers
                }
                Err(error) => {
                    tracing::info!(%error, "no peer list from the seed; asking known peers");
                    peers_from_known(&state, blob).await
                }
            };
            let candidates = candidates(&state, &addresses, peers).await;
            asking.store(false, Ordering::Release);
            let _ = events.send(Event::PeersDiscovered(candidates));
        });
    }

    fn request(&mut self, from: Source, index: u32, after_peer_failure: bool) {
        let state = self.state.clone();
        let peers = self.peers.clone();
        let hashes = self.hashes.clone();
        let events = self.events.clone();
        let addresses = self.addresses.clone();
        let fatal = self.fatal.clone();
        let seed_unavailable = self.seed_unavailable.clone();
        let key = (from.clone(), index);
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let result = tokio::time::timeout(
                CHUNK_DEADLINE,
                fetch_chunk(
                    &state,
                    &peers,
                    &addresses,
                    &hashes,
                    &from,
                    index,
                    after_peer_failure,
                ),
            )
            .await
            .unwrap_or(Err(ChunkOutcome::Failed(FailReason::Timeout)));
            let event = match result {
                Ok(ChunkOutcome::Verified(bytes)) => {
                    state.holdings_changed.notify_one();
                    Event::ChunkVerified {
                        peer: from,
                        index,
                        bytes,
                        elapsed: started.elapsed(),
                    }
                }
                Ok(ChunkOutcome::Redirected(peers)) => {
                    state.remember_peers(&peers);
                    Event::SeedRedirected {
                        index,
                        peers: candidates(&state, &addresses, peers).await,
                    }
                }
                Ok(ChunkOutcome::Failed(reason)) | Err(ChunkOutcome::Failed(reason)) => {
                    Event::ChunkFailed {
                        peer: from,
                        index,
                        reason,
                    }
                }
                Ok(ChunkOutcome::Local(message)) | Err(ChunkOutcome::Local(message)) => {
                    let blob = hashes.id();
                    let _ = fatal.send(format!("cannot store blob {blob} on this node: {message}"));
                    return;
                }
                Ok(ChunkOutcome::SeedUnavailable(message))
                | Err(ChunkOutcome::SeedUnavailable(message)) => {
                    let attempts = {
                        let mut counts = seed_unavailable
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        let count = counts.entry(index).or_insert(0);
                        *count += 1;
                        *count
                    };
                    if attempts >= SEED_UNAVAILABLE_ATTEMPTS {
                        let blob = hashes.id();
                        let _ = fatal.send(format!(
                            "chunk {index} of blob {blob} is held by no reachable peer and the \
                             seed cannot provide it ({attempts} tries): {message}"
                        ));
                        return;
                    }
                    tracing::info!(index, attempts, %message, "the seed cannot provide a chunk");
                    Event::ChunkFailed {
                        peer: from,
                        index,
                        reason: FailReason::Refused,
                    }
                }
                Err(ChunkOutcome::Verified(_)) | Err(ChunkOutcome::Redirected(_)) => {
                    Event::ChunkFailed {
                        peer: from,
                        index,
                        reason: FailReason::ConnectionLost,
                    }
                }
            };
            let _ = events.send(event);
        });
        if let Some(old) = self.running.insert(key, task) {
            old.abort();
        }
        self.running.retain(|_, task| !task.is_finished());
    }
}

type AddressBook = Arc<tokio::sync::Mutex<HashMap<String, SocketAddr>>>;

/// Peers as the scheduler wants them, remembering where each listens. This node is left out.
async fn candidates(
    state: &NodeState,
    addresses: &AddressBook,
    peers: Vec<PeerInfo>,
) -> Vec<PeerCandidate> {
    let own = state.settings.identity.name();
    let mut book = addresses.lock().await;
    peers
        .into_iter()
        .filter(|p| p.node != own)
        .filter_map(|p| {
            let addr = p.listen.parse::<SocketAddr>().ok()?;
            book.insert(p.node.clone(), addr);
            Some(PeerCandidate {
                site_is_local: p.site == state.settings.site,
                id: p.node,
                chunks: p.chunks,
            })
        })
        .collect()
}

/// Bytes read from a stream at a time.
const STREAM_BUFFER: usize = 64 * 1024;

#[derive(Debug)]
enum ChunkOutcome {
    Verified(u64),
    Redirected(Vec<PeerInfo>),
    Failed(FailReason),
    /// This node cannot store chunks (disk full, cache full of pinned data): no source can fix
    /// that, so the fetch stops with this message.
    Local(String),
    /// The seed cannot provide the chunk now (its origin failing), with the seed's reason.
    SeedUnavailable(String),
}

/// A failure of the cache while storing: the source's fault only if the bytes were wrong.
fn stored_failure(error: pkgmesh_cache::CacheError) -> ChunkOutcome {
    match error {
        pkgmesh_cache::CacheError::ChunkVerification { .. } => {
            ChunkOutcome::Failed(FailReason::BadHash)
        }
        other => local_failure(other),
    }
}

fn local_failure(error: pkgmesh_cache::CacheError) -> ChunkOutcome {
    ChunkOutcome::Local(error.to_string())
}

fn transport_failure(error: &TransportError) -> FailReason {
    match error {
        TransportError::Timeout { .. } => FailReason::Timeout,
        TransportError::Frame(_) => FailReason::FrameTooLarge,
        _ => FailReason::ConnectionLost,
    }
}

/// A connection to `peer`, dialled on first use.
async fn peer_connection(
    state: &NodeState,
    peers: &PeerConnections,
    addresses: &AddressBook,
    peer: &str,
) -> Result<PeerConnection, FailReason> {
    if let Some(conn) = peers.lock().await.get(peer) {
        if conn.connection.close_reason().is_none() {
            return Ok(conn.clone());
        }
    }
    let addr = *addresses
        .lock()
        .await
        .get(peer)
        .ok_or(FailReason::ConnectionLost)?;
    let conn = transport::connect(&state.endpoint, addr, Role::Node, PEER_CONNECT_TIMEOUT)
        .await
        .map_err(|e| {
            tracing::debug!(peer, %addr, error = %e, "cannot reach peer");
            FailReason::ConnectionLost
        })?;
    if conn.peer.name != peer {
        tracing::warn!(
            peer,
            actual = conn.peer.name,
            "peer answered with another identity"
        );
        return Err(FailReason::Refused);
    }
    peers.lock().await.insert(peer.to_string(), conn.clone());
    Ok(conn)
}

async fn fetch_chunk(
    state: &NodeState,
    peers: &PeerConnections,
    addresses: &AddressBook,
    hashes: &ChunkHashes,
    from: &Source,
    index: u32,
    after_peer_failure: bool,
) -> Result<ChunkOutcome, ChunkOutcome> {
    let fail = ChunkOutcome::Failed;
    let conn = match from {
        Source::Seed => state
            .seed()
            .await
            .map_err(|_| fail(FailReason::ConnectionLost))?
            .connection()
            .clone(),
        Source::Peer(peer) => peer_connection(state, peers, addresses, peer)
            .await
            .map_err(fail)?,
    };
    let blob = hashes.id();
    let request = Request::GetChunk {
        blob,
        index,
        after_peer_failure,
    };
    let (response, _send, mut recv) = transport::request(&conn, &request, CHUNK_DEADLINE)
        .await
        .map_err(|e| fail(transport_failure(&e)))?;
    let expected = hashes
        .layout()
        .chunk_len(index)
        .map_err(|_| fail(FailReason::WrongLength))?;
    match response {
        Response::Chunk {
            blob: got_blob,
            index: got_index,
            len,
        } => {
            if got_blob != blob || got_index != index || len != expected {
                return Err(fail(FailReason::WrongLength));
            }
            // Streamed from the socket through the cache's verifying writer in small pieces:
            // memory per request stays at one buffer whatever the chunk size.
            let cache = state.cache.clone();
            let mut writer = tokio::task::block_in_place(|| cache.chunk_writer(&blob, index))
                .map_err(local_failure)?;
            let mut buffer = vec![0u8; STREAM_BUFFER];
            let mut remaining = len as usize;
            while remaining > 0 {
                // Fill the whole buffer before handing it to the writer: a read returns what
                // has arrived (about 20 KiB at loopback speed), and each write is a
                // block_in_place, a syscall and a verifier update, whose fixed cost per call
                // dominated the node's CPU at a few times more calls.
                let want = remaining.min(buffer.len());
                let mut filled = 0;
                while filled < want {
                    let n = recv
                        .read(&mut buffer[filled..want])
                        .await
                        .map_err(|_| fail(FailReason::ConnectionLost))?
                        .ok_or(fail(FailReason::WrongLength))?;
                    if let Some(limit) = &state.download {
                        limit.acquire(n as u64).await;
                    }
                    filled += n;
                }
                tokio::task::block_in_place(|| writer.write(&buffer[..filled]))
                    .map_err(stored_failure)?;
                remaining -= filled;
            }
            tokio::task::block_in_place(|| writer.commit()).map_err(stored_failure)?;
            Ok(ChunkOutcome::Verified(len as u64))
        }
        Response::TryPeers { peers, .. } => Ok(ChunkOutcome::Redirected(peers)),
        Response::Error(reply)
            if matches!(from, Source::Seed) && reply.code == ErrorCode::Unavailable =>
        {
            Err(ChunkOutcome::SeedUnavailable(reply.message))
        }
        Response::Error(reply) => Err(fail(match reply.code {
            ErrorCode::NotFound => FailReason::NotHeld,
            _ => FailReason::Refused,
        })),
        _ => Err(fail(FailReason::WrongLength)),
    }
}
