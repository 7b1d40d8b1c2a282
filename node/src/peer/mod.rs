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

use anyhow::Context;
use pkgmesh_cache::{CacheConfig, ChunkStore};
use pkgmesh_protocol::wire::{Announcement, ErrorCode, Holding, Request, Response};
use quinn::{RecvStream, SendStream};

use crate::client::SeedClient;
use crate::pki::{Identity, Role};
use crate::swarm::ratelimit::RateLimiter;
use crate::transport::{self, reply_error, require_role, RequestContext, RequestHandler};

pub mod fetch;

/// How long to wait before dialling the seed again after it went away.
const SEED_RETRY: Duration = Duration::from_secs(2);
/// Changes (chunks verified, blobs evicted) are announced at most this often.
const CHANGE_BATCH: Duration = Duration::from_millis(300);

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
}

impl NodeSettings {
    pub const DEFAULT_CACHE_BUDGET: u64 = 4 << 30;
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
    seed: tokio::sync::Mutex<Option<Arc<SeedClient>>>,
}

impl NodeState {
    /// The connection to the seed, dialled again if it was lost.
    pub async fn seed(&self) -> anyhow::Result<Arc<SeedClient>> {
        let mut slot = self.seed.lock().await;
        if let Some(client) = slot.as_ref() {
            if client.connection().connection.close_reason().is_none() {
                return Ok(client.clone());
            }
        }
        let client =
            Arc::new(SeedClient::connect_on(self.endpoint.clone(), self.settings.seed).await?);
        *slot = Some(client.clone());
        Ok(client)
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
    let endpoint = transport::make_endpoint(settings.listen, &settings.identity)?;
    let local_addr = endpoint.local_addr()?;
    let mut settings = settings;
    settings.listen = local_addr;
    let upload = RateLimiter::new(settings.upload_limit);
    let download = RateLimiter::new(settings.download_limit);
    let state = Arc::new(NodeState {
        settings,
        cache,
        endpoint: endpoint.clone(),
        holdings_changed: tokio::sync::Notify::new(),
        upload,
        download,
        seed: tokio::sync::Mutex::new(None),
    });
    let handler = Arc::new(PeerHandler {
        state: state.clone(),
    });
    let serving = tokio::spawn(transport::serve(endpoint, handler));
    let announcing = tokio::spawn(announce_loop(state.clone()));
    tracing::info!(%local_addr, site = state.settings.site, "node serving");
    Ok(RunningNode {
        local_addr,
        state,
        tasks: vec![serving, announcing],
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
        if let Err(refusal) = require_role(&ctx, &[Role::Node]) {
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
            Request::GetChunk { blob, index, .. } => {
                let got = tokio::task::spawn_blocking(move || cache.get_chunk(&blob, index)).await;
                match got {
                    Ok(Ok(Some(bytes))) => {
                        if let Some(limit) = &self.state.upload {
                            limit.acquire(bytes.len() as u64).await;
                        }
                        let _ = transport::send_chunk(&mut send, blob, index, &bytes).await;
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
