//! The node: one QUIC endpoint that serves the chunks this node holds to other nodes and dials
//! the seed and peers; it keeps the seed's tracker told what it holds.
//!
//! Owns: starting a node, its data dir (`cache/`), serving chunks (role node), announcing to
//! the tracker and reconnecting to the seed. Does not own: deciding which chunk to fetch from
//! whom (the pure scheduler in [`crate::swarm`]) or installing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Context;
use pkgmesh_cache::{CacheConfig, ChunkStore};
use pkgmesh_protocol::select::Platform;
use pkgmesh_protocol::wire::{Announcement, ErrorCode, Holding, PeerInfo, Request, Response};
use quinn::{RecvStream, SendStream};
use tokio::sync::Semaphore;

use crate::client::SeedClient;
use crate::pki::{Identity, Role};
use crate::swarm::ratelimit::RateLimiter;
use crate::transport::{self, reply_error, require_role, RequestContext, RequestHandler};

pub mod agent;
pub mod fetch;
pub mod package;
pub mod transfers;

/// How long to wait before dialling the seed again after it went away.
const SEED_RETRY: Duration = Duration::from_secs(2);
/// Changes (chunks verified, blobs evicted) are announced at most this often.
const CHANGE_BATCH: Duration = Duration::from_millis(300);
/// After a failed dial, callers are told the seed is unreachable at once for this long instead
/// of each waiting for a dial timeout of its own.
const SEED_QUIET_AFTER_FAILURE: Duration = Duration::from_secs(3);
/// Peers remembered from the tracker's answers, for when the tracker is out of reach.
const MAX_KNOWN_PEERS: usize = 1024;

#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub listen: SocketAddr,
    pub seed: SocketAddr,
    pub data: PathBuf,
    pub identity: Identity,
    pub site: String,
    pub tags: Vec<(String, String)>,
    pub cache_budget: u64,
    /// Chunk payload bytes per second this node sends to peers; 0 is unlimited.
    pub upload_limit: u64,
    /// Chunk payload bytes per second this node receives; 0 is unlimited.
    pub download_limit: u64,
    /// Chunk uploads to peers at once; a peer asking beyond it is told to come back later.
    pub max_uploads: usize,
    /// The platform packages are chosen for; `None` detects it from this machine when needed.
    pub platform: Option<Platform>,
    /// Where the admin API listens (a Unix socket); `None` runs without one.
    pub admin_socket: Option<PathBuf>,
    /// Long-poll the seed for deployments and install them (a one-shot fetch does not).
    pub follow_deployments: bool,
    /// Where to serve Prometheus `/metrics` over TCP as well as on the admin socket.
    pub metrics_listen: Option<SocketAddr>,
}

impl NodeSettings {
    pub const DEFAULT_CACHE_BUDGET: u64 = 4 << 30;
    pub const DEFAULT_MAX_UPLOADS: usize = 16;

    /// Settings with every optional part at its default.
    pub fn new(listen: SocketAddr, seed: SocketAddr, data: PathBuf, identity: Identity) -> Self {
        NodeSettings {
            listen,
            seed,
            data,
            identity,
            site: "default".into(),
            tags: Vec::new(),
            cache_budget: Self::DEFAULT_CACHE_BUDGET,
            upload_limit: 0,
            download_limit: 0,
            max_uploads: Self::DEFAULT_MAX_UPLOADS,
            platform: None,
            admin_socket: None,
            follow_deployments: false,
            metrics_listen: None,
        }
    }

    /// The admin socket's place in a data directory.
    pub fn admin_socket_in(data: &std::path::Path) -> PathBuf {
        data.join("admin.sock")
    }
}

/// A peer as last heard of from the tracker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownPeer {
    pub listen: SocketAddr,
    pub site: String,
}

/// What this node served to its peers.
#[derive(Debug, Default)]
pub struct ServeCounters {
    pub chunks_served: std::sync::atomic::AtomicU64,
    pub chunk_bytes_served: std::sync::atomic::AtomicU64,
    /// Chunk requests turned away because `max_uploads` were in progress.
    pub uploads_refused: std::sync::atomic::AtomicU64,
}

/// Chunk payload bytes this node received and verified, by source, over all its transfers
/// (added as each transfer ends).
#[derive(Debug, Default)]
pub struct ReceiveCounters {
    pub from_seed: std::sync::atomic::AtomicU64,
    pub from_local_peers: std::sync::atomic::AtomicU64,
    pub from_remote_peers: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct SeedSlot {
    client: Option<Arc<SeedClient>>,
    failed_at: Option<Instant>,
}

/// What the node's tasks share.
pub struct NodeState {
    pub settings: NodeSettings,
    pub cache: ChunkStore,
    pub endpoint: quinn::Endpoint,
    /// Wakes the announcer early: something worth telling the tracker changed.
    pub holdings_changed: tokio::sync::Notify,
    pub upload: Option<RateLimiter>,
    pub download: Option<RateLimiter>,
    /// Chunk uploads in progress.
    pub uploads: Arc<Semaphore>,
    /// Downloads in flight, with their progress.
    pub transfers: transfers::Transfers,
    pub served: ServeCounters,
    pub received: ReceiveCounters,
    /// Per-peer exchanges and chunk totals, for `pkgmesh peers`, `cache stats` and metrics.
    pub stats: crate::metrics::NodeStats,
    /// What the cached blobs are (package, version, file), for `pkgmesh cache ls`.
    pub blob_names: crate::admin::names::BlobNames,
    /// The installer, when this node's platform is known.
    installer: Option<Arc<crate::install::Installer>>,
    /// `<data>/audit.log`: every change made through the admin API or by an operator's
    /// request over the mesh (fetch, install, uninstall, evict, pin, unpin, verify, preheat).
    pub audit: crate::seed::audit::AuditLog,
    known_peers: std::sync::Mutex<HashMap<String, KnownPeer>>,
    seed: tokio::sync::Mutex<SeedSlot>,
}

impl NodeState {
    /// The connection to the seed, dialled again if it was lost.
    pub async fn seed(&self) -> anyhow::Result<Arc<SeedClient>> {
        let mut slot = self.seed.lock().await;
        if let Some(client) = slot.client.as_ref() {
            if client.connection().connection.close_reason().is_none() {
                return Ok(client.clone());
            }
        }
        if let Some(failed_at) = slot.failed_at {
            if failed_at.elapsed() < SEED_QUIET_AFTER_FAILURE {
                anyhow::bail!(
                    "the seed at {} is unreachable (tried {:.1} s ago)",
                    self.settings.seed,
                    failed_at.elapsed().as_secs_f64()
                );
            }
        }
        // A seed dialled again may have restarted with an empty tracker: announce at once
        // rather than at the next refresh, or peers cannot find this node for up to 20 s.
        let reconnecting = slot.client.is_some() || slot.failed_at.is_some();
        match SeedClient::connect_on(self.endpoint.clone(), self.settings.seed).await {
            Ok(client) => {
                let client = Arc::new(client);
                *slot = SeedSlot {
                    client: Some(client.clone()),
                    failed_at: None,
                };
                if reconnecting {
                    self.holdings_changed.notify_one();
                }
                Ok(client)
            }
            Err(error) => {
                slot.client = None;
                slot.failed_at = Some(Instant::now());
                Err(error)
            }
        }
    }

    /// The installer, or why there is none.
    pub fn installer(&self) -> anyhow::Result<Arc<crate::install::Installer>> {
        self.installer.clone().context(
            "this node cannot install: its platform is unknown (give --platform and --platform-version)",
        )
    }

    /// Whether the node holds a live connection to the seed now.
    pub async fn seed_connected(&self) -> bool {
        self.seed
            .lock()
            .await
            .client
            .as_ref()
            .is_some_and(|c| c.connection().connection.close_reason().is_none())
    }

    /// Remembers where peers from a tracker answer listen.
    pub fn remember_peers(&self, peers: &[PeerInfo]) {
        let own = self.settings.identity.name();
        let mut known = self
            .known_peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for peer in peers {
            let Ok(listen) = peer.listen.parse::<SocketAddr>() else {
                continue;
            };
            if peer.node == own
                || (known.len() >= MAX_KNOWN_PEERS && !known.contains_key(&peer.node))
            {
                continue;
            }
            known.insert(
                peer.node.clone(),
                KnownPeer {
                    listen,
                    site: peer.site.clone(),
                },
            );
        }
    }

    /// Peers heard of before, same site first.
    pub fn known_peers(&self) -> Vec<(String, KnownPeer)> {
        let known = self
            .known_peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut list: Vec<(String, KnownPeer)> =
            known.iter().map(|(n, p)| (n.clone(), p.clone())).collect();
        list.sort_by_key(|(name, peer)| (peer.site != self.settings.site, name.clone()));
        list
    }

    /// Everything this node holds, as the tracker wants it.
    fn holdings(&self) -> Vec<Holding> {
        self.cache
            .list()
            .into_iter()
            .filter_map(|info| {
                let chunks = self.cache.bitfield(&info.id)?;
                Some(Holding {
                    blob: info.id,
                    size: info.size,
                    chunks,
                })
            })
            .collect()
    }

    async fn announce(&self) -> anyhow::Result<Duration> {
        let seed = self.seed().await?;
        let announcement = Announcement {
            listen: self.settings.listen.to_string(),
            site: self.settings.site.clone(),
            tags: self.settings.tags.clone(),
            full: true,
            holdings: self.holdings(),
        };
        match seed.call(&Request::Announce(announcement)).await? {
            Response::Announced { refresh_secs } => {
                Ok(Duration::from_secs(refresh_secs.clamp(1, 300) as u64))
            }
            other => anyhow::bail!("the seed answered an announcement with {other:?}"),
        }
    }
}

pub struct RunningNode {
    pub local_addr: SocketAddr,
    pub state: Arc<NodeState>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _admin_socket: Option<crate::admin::AdminSocket>,
    /// Where `/metrics` is served over TCP, when it is.
    pub metrics_addr: Option<SocketAddr>,
}

impl RunningNode {
    pub async fn shutdown(self) {
        for task in &self.tasks {
            task.abort();
        }
        // Tell the tracker first, so nobody is sent to a node that is gone (best effort).
        let leaving = async {
            let seed = self.state.seed().await?;
            let goodbye = Announcement {
                listen: self.state.settings.listen.to_string(),
                site: self.state.settings.site.clone(),
                tags: self.state.settings.tags.clone(),
                full: true,
                holdings: Vec::new(),
            };
            seed.call(&Request::Announce(goodbye)).await
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), leaving).await;
        self.state
            .endpoint
            .close(0u32.into(), b"node shutting down");
        self.state.endpoint.wait_idle().await;
    }
}

/// Opens the node's cache, starts serving peers and announcing to the seed.
pub async fn start(settings: NodeSettings) -> anyhow::Result<RunningNode> {
    transport::install_crypto_provider();
    std::fs::create_dir_all(&settings.data)
        .with_context(|| format!("cannot create the data dir {}", settings.data.display()))?;
    let cache_dir = settings.data.join("cache");
    let budget = settings.cache_budget;
    let cache = tokio::task::spawn_blocking(move || {
        ChunkStore::open(CacheConfig {
            dir: cache_dir,
            budget_bytes: budget,
        })
    })
    .await??;
    let installer = match settings
        .platform
        .clone()
        .map(Ok)
        .unwrap_or_else(pkgmesh_protocol::platform::detect_platform)
    {
        Ok(platform) => {
            let installer = crate::install::Installer::open(
                &settings.data,
                platform,
                crate::install::InstallerOptions::default(),
            )?;
            // An install the node was killed in is finished or rolled back before anything
            // else runs, so every package is in a known state.
            for record in installer.recover().await? {
                tracing::warn!(
                    package = record.name,
                    state = %record.state,
                    message = record.message.as_deref().unwrap_or(""),
                    "recovered an interrupted install"
                );
            }
            Some(Arc::new(installer))
        }
        Err(error) => {
            tracing::warn!(%error, "platform unknown: this node serves and fetches but cannot install");
            None
        }
    };
    let endpoint = transport::make_endpoint(settings.listen, &settings.identity)?;
    let local_addr = endpoint.local_addr()?;
    let mut settings = settings;
    settings.listen = local_addr;
    let upload = RateLimiter::new(settings.upload_limit);
    let download = RateLimiter::new(settings.download_limit);
    let max_uploads = settings.max_uploads.max(1);
    let blob_names = crate::admin::names::BlobNames::open(&settings.data);
    let audit_path = settings.data.join("audit.log");
    let audit = crate::seed::audit::AuditLog::open(&audit_path)
        .with_context(|| format!("cannot open {}", audit_path.display()))?;
    let state = Arc::new(NodeState {
        settings,
        cache,
        endpoint: endpoint.clone(),
        holdings_changed: tokio::sync::Notify::new(),
        upload,
        download,
        uploads: Arc::new(Semaphore::new(max_uploads)),
        transfers: transfers::Transfers::default(),
        served: ServeCounters::default(),
        received: ReceiveCounters::default(),
        stats: crate::metrics::NodeStats::default(),
        blob_names,
        installer,
        audit,
        known_peers: std::sync::Mutex::new(HashMap::new()),
        seed: tokio::sync::Mutex::new(SeedSlot::default()),
    });
    let handler = Arc::new(PeerHandler {
        state: state.clone(),
    });
    let mut tasks = Vec::new();
    let admin_socket = match &state.settings.admin_socket {
        Some(path) => {
            let (socket, task) = crate::admin::serve_admin(state.clone(), path).await?;
            tasks.push(task);
            Some(socket)
        }
        None => None,
    };
    let metrics_addr = match state.settings.metrics_listen {
        Some(addr) => {
            let source = crate::metrics::MetricsSource::Node(state.clone());
            let (bound, task) = crate::metrics::serve_metrics(addr, source).await?;
            tasks.push(task);
            Some(bound)
        }
        None => None,
    };
    tasks.push(tokio::spawn(transport::serve(endpoint, handler)));
    tasks.push(tokio::spawn(announce_loop(state.clone())));
    if state.settings.follow_deployments {
        tasks.push(tokio::spawn(agent::desired_state_loop(state.clone())));
    }
    tracing::info!(%local_addr, site = state.settings.site, "node serving");
    Ok(RunningNode {
        local_addr,
        state,
        tasks,
        _admin_socket: admin_socket,
        metrics_addr,
    })
}

/// Keeps the tracker current: a full announcement at start, on every change (batched) and on
/// every refresh interval; a lost seed is dialled again and the node keeps serving meanwhile.
async fn announce_loop(state: Arc<NodeState>) {
    loop {
        let refresh = match state.announce().await {
            Ok(next) => next,
            Err(error) => {
                tracing::info!(%error, "cannot announce to the seed; retrying");
                tokio::time::sleep(SEED_RETRY).await;
                continue;
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(refresh) => {}
            _ = state.holdings_changed.notified() => {
                tokio::time::sleep(CHANGE_BATCH).await;
            }
        }
    }
}

/// Serves this node's chunks to other nodes.
struct PeerHandler {
    state: Arc<NodeState>,
}

impl RequestHandler for PeerHandler {
    async fn handle(
        &self,
        ctx: RequestContext,
        request: Request,
        mut send: SendStream,
        _recv: RecvStream,
    ) {
        // Preheat is the one request operators send a node; everything else is node to node.
        let roles: &[Role] = match request {
            Request::Preheat { .. } => &[Role::Operator, Role::Deployer, Role::Admin],
            _ => &[Role::Node],
        };
        if let Err(refusal) = require_role(&ctx, roles) {
            // Operators' requests are changes: their refusals are audited too. Refused chunk
            // requests are only logged, so a misconfigured peer cannot fill the disk.
            if let Request::Preheat { name, .. } = &request {
                let held: Vec<String> = ctx.peer.roles.iter().map(|r| r.to_string()).collect();
                let outcome = format!("refused: {}", refusal.message);
                crate::admin::audit(
                    &self.state,
                    &ctx.peer.name,
                    &held,
                    "preheat",
                    name,
                    &outcome,
                );
            }
            reply_error(&mut send, refusal.code, refusal.message).await;
            return;
        }
        let cache = self.state.cache.clone();
        match request {
            Request::Ping { nonce } => {
                let _ = transport::write_frame(&mut send, &Response::Pong { nonce }).await;
                let _ = send.finish();
            }
            Request::GetChunkHashes { blob, size } => match cache.chunk_hashes(&blob) {
                Some(hashes) if hashes.layout().size() == size => {
                    let response = Response::ChunkHashes {
                        blob,
                        packed: hashes.to_packed(),
                    };
                    let _ = transport::write_frame(&mut send, &response).await;
                    let _ = send.finish();
                }
                _ => {
                    reply_error(
                        &mut send,
                        ErrorCode::NotFound,
                        format!("no blob {blob} here"),
                    )
                    .await
                }
            },
            Request::GetBitfield { blob } => {
                let response = Response::Bitfield {
                    blob,
                    chunks: cache.bitfield(&blob),
                };
                let _ = transport::write_frame(&mut send, &response).await;
                let _ = send.finish();
            }
            Request::GetChunk { blob, index, .. } => {
                // Over the cap, the asker is told to come back (its scheduler backs off from
                // this peer for a while) rather than queued behind uploads it cannot see.
                let Ok(_upload) = self.state.uploads.clone().try_acquire_owned() else {
                    self.state
                        .served
                        .uploads_refused
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    reply_error(
                        &mut send,
                        ErrorCode::Busy,
                        format!(
                            "busy: {} uploads in progress",
                            self.state.settings.max_uploads
                        ),
                    )
                    .await;
                    return;
                };
                let got = tokio::task::spawn_blocking(move || cache.get_chunk(&blob, index)).await;
                match got {
                    Ok(Ok(Some(bytes))) => {
                        if let Some(limit) = &self.state.upload {
                            limit.acquire(bytes.len() as u64).await;
                        }
                        if transport::send_chunk(&mut send, blob, index, &bytes)
                            .await
                            .is_ok()
                        {
                            let served = &self.state.served;
                            served
                                .chunks_served
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            served.chunk_bytes_served.fetch_add(
                                bytes.len() as u64,
                                std::sync::atomic::Ordering::Relaxed,
                            );
                            self.state
                                .stats
                                .record_sent(&ctx.peer.name, bytes.len() as u64);
                        }
                    }
                    _ => {
                        reply_error(
                            &mut send,
                            ErrorCode::NotFound,
                            format!("chunk {index} of blob {blob} is not held here"),
                        )
                        .await
                    }
                }
            }
            Request::Preheat { name, version } => {
                let target = match &version {
                    Some(version) => format!("{name}@{version}"),
                    None => name.clone(),
                };
                let result =
                    crate::admin::preheat(&self.state, &ctx.peer.name, &name, version).await;
                let outcome = match &result {
                    Ok(_) => "ok".to_string(),
                    Err(error) => format!("failed: {error:#}"),
                };
                let roles: Vec<String> = ctx.peer.roles.iter().map(|r| r.to_string()).collect();
                crate::admin::audit(
                    &self.state,
                    &ctx.peer.name,
                    &roles,
                    "preheat",
                    &target,
                    &outcome,
                );
                match result {
                    Ok(reply) => {
                        let _ =
                            transport::write_frame(&mut send, &Response::Preheating(reply)).await;
                        let _ = send.finish();
                    }
                    Err(error) => {
                        reply_error(&mut send, ErrorCode::BadRequest, format!("{error:#}")).await
                    }
                }
            }
            _ => {
                reply_error(
                    &mut send,
                    ErrorCode::BadRequest,
                    "a node serves only chunks and chunk hashes",
                )
                .await
            }
        }
    }
}
