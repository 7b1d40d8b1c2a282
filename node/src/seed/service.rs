//! The seed's request handlers: what each request needs (role), does, and audits.
//!
//! Owns: the mapping from requests to catalog, tracker, admission, origin and cache operations,
//! role checks on every request, and audit records for every change and refusal. Does not own:
//! the transport (it gets decoded requests from [`crate::transport::serve`]) or storage rules.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use pkgmesh_cache::ChunkStore;
use pkgmesh_protocol::blob::{BlobHasher, BlobId, ChunkHashes, ChunkLayout};
use pkgmesh_protocol::manifest::parse_manifest;
use pkgmesh_protocol::names::validate_package_name;
use pkgmesh_protocol::wire::{
    AuditRecord, BlobName, ErrorCode, ErrorReply, ManifestReply, NodeSummary, PublishOutcome,
    PublishRequest, Request, Response, WhereQuery, MAX_DESCRIBE_BLOBS,
};
use quinn::{RecvStream, SendStream};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::audit::AuditLog;
use super::catalog::{Catalog, CatalogError, FileRecord, PublishResult, VersionRecord};
use super::tracker::{Tracker, REFRESH_INTERVAL};
use crate::origin::Origin;
use crate::pki::Role;
use crate::swarm::admission::{Admission, ChunkAsk, Decision};
use crate::transport::{self, reply_error, require_role, RequestContext, RequestHandler};
use crate::ziplayout::{check_zip_layout, ZipLimits};

/// Waiting for the next piece of an upload; a publisher that goes quiet this long is dropped.
const UPLOAD_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Most audit records one request returns.
const MAX_AUDIT_RECORDS: usize = 2000;
/// Roles that may read the catalog.
const CATALOG_READERS: &[Role] = &[
    Role::Node,
    Role::Publisher,
    Role::Deployer,
    Role::Operator,
    Role::Admin,
];
const PUBLISHERS: &[Role] = &[Role::Publisher, Role::Admin];
const OPERATORS: &[Role] = &[Role::Operator, Role::Admin];
const DEPLOYERS: &[Role] = &[Role::Deployer, Role::Admin];
const DEPLOYMENT_READERS: &[Role] = &[Role::Deployer, Role::Operator, Role::Admin];
/// Roles that may list the fleet's nodes: operators, and deployers choosing nodes to preheat.
const NODE_LISTERS: &[Role] = &[Role::Operator, Role::Deployer, Role::Admin];
/// Roles that may ask what blobs are: nodes labelling their cache, and operators.
const BLOB_DESCRIBERS: &[Role] = &[Role::Node, Role::Operator, Role::Admin];
/// Longest a node's desired-state request is held open (below the client's request timeout).
const MAX_DESIRED_WAIT: Duration = Duration::from_secs(20);

/// Payload counters: what the seed sent and why it did not.
#[derive(Debug, Default)]
pub struct SeedCounters {
    pub chunk_bytes_served: AtomicU64,
    pub chunks_served: AtomicU64,
    pub redirects: AtomicU64,
    pub origin_reads: AtomicU64,
    pub origin_bytes_read: AtomicU64,
}

pub struct SeedState {
    pub catalog: Catalog,
    pub origin: Origin,
    pub cache: ChunkStore,
    pub audit: AuditLog,
    pub tracker: Mutex<Tracker>,
    pub admission: Mutex<Admission>,
    pub counters: SeedCounters,
    /// The seed's upload cap on chunk payloads (the node's token bucket); `None`: uncapped.
    pub upload: Option<crate::swarm::ratelimit::RateLimiter>,
    /// Chunk requests take turns at the capped uplink in arrival order (tokio's mutex is fair).
    pub upload_turn: tokio::sync::Mutex<()>,
    /// Chunk bytes on their way out, in bytes ([`SEND_BUDGET_BYTES`] permits). A chunk is held
    /// in memory until its receiver has taken it, so without a bound clients that ask and never
    /// read would make the seed hold every chunk they asked for (627 MiB for 1 GiB asked, in
    /// the hostile-peer test). Over the budget a request is answered `Busy` at once.
    pub send_budget: Arc<tokio::sync::Semaphore>,
    pub tmp_dir: PathBuf,
    pub max_upload_bytes: u64,
    pub zip_limits: ZipLimits,
    pub deployments: super::deployments::Deployments,
    /// Verified chunk-hash lists of recently asked blobs: every chunk request needs one, and
    /// reading and re-verifying it from the catalog each time costs more than serving the chunk.
    pub blob_index: Mutex<lru::LruCache<BlobId, Arc<CatalogBlob>>>,
}

/// Hash lists kept verified in memory (64 KiB each for the largest blobs).
pub const BLOB_INDEX_ENTRIES: usize = 256;

/// A catalog blob as chunk requests need it.
pub struct CatalogBlob {
    pub size: u64,
    pub origin_key: String,
    pub hashes: ChunkHashes,
}

/// What a handler answers: a frame, or an error to send and (for refusals) audit.
type Answer = Result<Response, ErrorReply>;

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn error(code: ErrorCode, message: impl Into<String>) -> ErrorReply {
    ErrorReply {
        code,
        message: message.into(),
    }
}

fn catalog_error(e: CatalogError) -> ErrorReply {
    let code = match e {
        CatalogError::NoSuchPackage { .. } | CatalogError::NoSuchVersion { .. } => {
            ErrorCode::NotFound
        }
        CatalogError::VersionConflict { .. } => ErrorCode::BadRequest,
        CatalogError::Store { .. } | CatalogError::Damaged { .. } => ErrorCode::Internal,
    };
    error(code, e.to_string())
}

pub struct SeedHandler {
    pub state: Arc<SeedState>,
}

impl RequestHandler for SeedHandler {
    async fn handle(
        &self,
        ctx: RequestContext,
        request: Request,
        mut send: SendStream,
        recv: RecvStream,
    ) {
        let state = &self.state;
        let answer = match request {
            Request::Ping { nonce } => Ok(Response::Pong { nonce }),
            Request::GetManifest { name, version } => state
                .checked(&ctx, CATALOG_READERS, "get-manifest", &name)
                .and_then(|()| state.manifest(&name, version.as_deref())),
            Request::GetChunkHashes { blob, size } => state
                .checked(&ctx, CATALOG_READERS, "get-chunk-hashes", &blob.to_hex())
                .and_then(|()| state.chunk_hashes(blob, size)),
            Request::GetChunk {
                blob,
                index,
                after_peer_failure,
            } => {
                let target = format!("{blob}#{index}");
                if let Err(refusal) = state.checked(&ctx, &[Role::Node], "get-chunk", &target) {
                    Err(refusal)
                } else {
                    match state.chunk(&ctx, blob, index, after_peer_failure).await {
                        Ok(ChunkAnswer::Bytes(bytes, budget)) => {
                            state.send_chunk(&mut send, blob, index, bytes).await;
                            drop(budget);
                            return;
                        }
                        Ok(ChunkAnswer::Frame(response)) => Ok(response),
                        Err(e) => Err(e),
                    }
                }
            }
            Request::Publish(publish) => {
                let target = format!("{}@{}", publish.name, version_of(&publish));
                if let Err(refusal) = state.checked(&ctx, PUBLISHERS, "publish", &target) {
                    Err(refusal)
                } else {
                    let answer = state.publish(&ctx, publish, &mut send, recv).await;
                    state.audit_outcome(&ctx, "publish", &target, &answer);
                    answer
                }
            }
            Request::ListPackages => state
                .checked(&ctx, CATALOG_READERS, "list-packages", "*")
                .and_then(|()| state.catalog.list().map_err(catalog_error))
                .map(Response::Packages),
            Request::SetDefault { name, version } => {
                let target = format!("{name}@{version}");
                let answer = state
                    .checked(&ctx, PUBLISHERS, "set-default", &target)
                    .and_then(|()| {
                        state
                            .catalog
                            .set_default(&name, &version)
                            .map_err(catalog_error)?;
                        Ok(Response::Done {
                            message: format!("{name}: default version is now {version}"),
                        })
                    });
                state.audit_outcome(&ctx, "set-default", &target, &answer);
                answer
            }
            Request::DeletePackage {
                name,
                version,
                force,
            } => {
                let target = format!("{name}@{}", version.as_deref().unwrap_or("*"));
                let answer = match state.checked(&ctx, PUBLISHERS, "delete", &target) {
                    Ok(()) => state.delete(&name, version.as_deref(), force).await,
                    Err(refusal) => Err(refusal),
                };
                state.audit_outcome(&ctx, "delete", &target, &answer);
                answer
            }
            Request::Announce(mut announcement) => state
                .checked(&ctx, &[Role::Node], "announce", &ctx.peer.name)
                .and_then(|()| {
                    // A node listening on 0.0.0.0 is reachable at the address it dialled from:
                    // its one endpoint both serves and dials.
                    if let Ok(listen) = announcement.listen.parse::<SocketAddr>() {
                        if listen.ip().is_unspecified() {
                            announcement.listen =
                                SocketAddr::new(ctx.remote.ip(), listen.port()).to_string();
                        }
                    }
                    state
                        .tracker()
                        .announce(&ctx.peer.name, announcement, Instant::now())
                        .map_err(|m| error(ErrorCode::BadRequest, m))?;
                    Ok(Response::Announced {
                        refresh_secs: REFRESH_INTERVAL.as_secs() as u32,
                    })
                }),
            Request::GetPeers { blob, max, .. } => state
                .checked(&ctx, &[Role::Node], "get-peers", &blob.to_hex())
                .map(|()| {
                    let mut rng = rand::rng();
                    Response::Peers(state.tracker().peers(
                        &blob,
                        &ctx.peer.name,
                        max as usize,
                        &mut rng,
                    ))
                }),
            Request::Where(query) => state
                .checked(&ctx, OPERATORS, "where", &where_target(&query))
                .and_then(|()| state.where_(query)),
            Request::Audit { since, limit } => state
                .checked(&ctx, &[Role::Admin], "audit", "*")
                .and_then(|()| {
                    let limit = (limit as usize).clamp(1, MAX_AUDIT_RECORDS);
                    state
                        .audit
                        .read(since, limit)
                        .map(Response::AuditRecords)
                        .map_err(|e| {
                            error(ErrorCode::Internal, format!("reading the audit log: {e}"))
                        })
                }),
            Request::ReportBan { blob, peer, reason } => {
                let target = format!("{peer} for blob {blob}");
                state
                    .checked(&ctx, &[Role::Node], "report-ban", &target)
                    .map(|()| {
                        let distrusted =
                            state.tracker().report_ban(&blob, &peer, &ctx.peer.name);
                        let reason: String = reason.chars().take(200).collect();
                        tracing::warn!(reporter = %ctx.peer, %peer, %blob, reason, distrusted, "peer reported");
                        state.audit(
                            &ctx,
                            "report-ban",
                            &target,
                            &format!(
                                "recorded ({reason}){}",
                                if distrusted { "; peer no longer named" } else { "" }
                            ),
                        );
                        Response::Done {
                            message: format!("report on {peer} recorded"),
                        }
                    })
            }
            Request::CreateDeployment(spec) => {
                let target = format!("{}@{}", spec.package, spec.version);
                let answer = state
                    .checked(&ctx, DEPLOYERS, "deploy-create", &target)
                    .and_then(|()| {
                        let info = state
                            .deployments
                            .create(
                                spec,
                                &ctx.peer.name,
                                &CatalogVersions(&state.catalog),
                                now_unix(),
                            )
                            .map_err(deployment_error)?;
                        state.roll_out();
                        state
                            .deployments
                            .get(info.id)
                            .map(|info| Response::Deployment(Box::new(info)))
                            .map_err(deployment_error)
                    });
                state.audit_outcome(&ctx, "deploy-create", &target, &answer);
                answer
            }
            Request::ListDeployments => state
                .checked(&ctx, DEPLOYMENT_READERS, "deploy-list", "*")
                .map(|()| Response::Deployments(state.deployments.list())),
            Request::GetDeployment { id } => state
                .checked(&ctx, DEPLOYMENT_READERS, "deploy-status", &id.to_string())
                .and_then(|()| {
                    state
                        .deployments
                        .get(id)
                        .map(|info| Response::Deployment(Box::new(info)))
                        .map_err(deployment_error)
                }),
            Request::CancelDeployment { id } => {
                let target = id.to_string();
                let answer = state
                    .checked(&ctx, DEPLOYERS, "deploy-cancel", &target)
                    .and_then(|()| {
                        state
                            .deployments
                            .cancel(id)
                            .map(|info| Response::Deployment(Box::new(info)))
                            .map_err(deployment_error)
                    });
                state.audit_outcome(&ctx, "deploy-cancel", &target, &answer);
                answer
            }
            Request::GetDesiredState {
                generation,
                wait_secs,
            } => match state.checked(&ctx, &[Role::Node], "desired-state", &ctx.peer.name) {
                Err(refusal) => Err(refusal),
                Ok(()) => {
                    let mut changes = state.deployments.subscribe();
                    let wait = Duration::from_secs(wait_secs as u64).min(MAX_DESIRED_WAIT);
                    let mut desired = state.deployments.desired(&ctx.peer.name);
                    if desired.generation == generation {
                        let _ = tokio::time::timeout(wait, changes.changed()).await;
                        desired = state.deployments.desired(&ctx.peer.name);
                    }
                    Ok(Response::DesiredState(desired))
                }
            },
            Request::ReportInstall(report) => {
                let target = format!("deployment {} run {}", report.deployment, report.run);
                match state.checked(&ctx, &[Role::Node], "install-report", &target) {
                    Err(refusal) => Err(refusal),
                    Ok(()) => {
                        let outcome = format!(
                            "{} {}{}",
                            report.state,
                            report.version,
                            report
                                .exit_code
                                .map(|c| format!(" (exit {c})"))
                                .unwrap_or_default()
                        );
                        let answer = state
                            .deployments
                            .report(&ctx.peer.name, report, now_unix())
                            .map_err(deployment_error)
                            .map(|()| {
                                state.roll_out();
                                Response::Done {
                                    message: "report recorded".into(),
                                }
                            });
                        if answer.is_ok() {
                            state.audit(&ctx, "install-report", &target, &outcome);
                        }
                        answer
                    }
                }
            }
            Request::GetBitfield { .. } => Err(error(
                ErrorCode::BadRequest,
                "the seed serves every chunk of its catalog; ask nodes for their bitfields",
            )),
            Request::Hello(_) => Err(error(
                ErrorCode::BadRequest,
                "Hello is only valid as the first request of a connection",
            )),
            Request::ListNodes => state
                .checked(&ctx, NODE_LISTERS, "list-nodes", "*")
                .and_then(|()| state.list_nodes()),
            Request::DescribeBlobs { blobs } => state
                .checked(&ctx, BLOB_DESCRIBERS, "describe-blobs", "*")
                .and_then(|()| state.describe_blobs(&blobs)),
            Request::Preheat { .. } => Err(error(
                ErrorCode::BadRequest,
                "preheat is asked of nodes, not the seed (`pkgmesh preheat` does that)",
            )),
        };
        match answer {
            Ok(response) => {
                if let Err(e) = transport::write_frame(&mut send, &response).await {
                    tracing::debug!(peer = %ctx.peer, error = %e, "could not send a response");
                }
                let _ = send.finish();
            }
            Err(reply) => reply_error(&mut send, reply.code, reply.message).await,
        }
    }

    fn handshake_refused(&self, remote: SocketAddr, reason: String) {
        let record = AuditRecord {
            time: now_unix(),
            caller: format!("unauthenticated {remote}"),
            roles: Vec::new(),
            action: "connect".into(),
            target: "seed".into(),
            outcome: format!("refused: {reason}"),
        };
        let _ = self.state.audit.append(&record);
    }
}

fn version_of(publish: &PublishRequest) -> String {
    serde_json::from_str::<serde_json::Value>(&publish.manifest_json)
        .ok()
        .and_then(|v| v.get("version").and_then(|v| v.as_str()).map(String::from))
        .unwrap_or_else(|| "?".into())
}

fn where_target(query: &WhereQuery) -> String {
    match query {
        WhereQuery::Blob(blob) => blob.to_hex(),
        WhereQuery::Package { name, version } => {
            format!("{name}@{}", version.as_deref().unwrap_or("default"))
        }
    }
}

enum ChunkAnswer {
    /// The chunk, with its share of the send budget, returned when the send ends.
    Bytes(Bytes, tokio::sync::OwnedSemaphorePermit),
    Frame(Response),
}

/// Chunk bytes the seed keeps on their way to receivers at most (see `SeedState::send_budget`):
/// 128 chunks of 256 KiB, enough to keep a fast link busy.
pub const SEND_BUDGET_BYTES: usize = 32 << 20;

/// Removes a spooled upload however the publish ends.
struct Spool {
    path: PathBuf,
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The catalog as the rollout sees it.
struct CatalogVersions<'a>(&'a Catalog);

impl super::deployments::VersionSource for CatalogVersions<'_> {
    fn default_version(&self, package: &str) -> Option<String> {
        self.0
            .package(package)
            .ok()
            .flatten()
            .and_then(|p| p.default_version().map(|v| v.version.clone()))
    }

    fn has_version(&self, package: &str, version: &str) -> bool {
        self.0
            .package(package)
            .ok()
            .flatten()
            .is_some_and(|p| p.version(version).is_some())
    }
}

fn deployment_error(e: super::deployments::DeploymentError) -> ErrorReply {
    use super::deployments::DeploymentError;
    let code = match e {
        DeploymentError::NoSuchDeployment(_) => ErrorCode::NotFound,
        DeploymentError::Refused(_) => ErrorCode::BadRequest,
        DeploymentError::Store { .. } => ErrorCode::Internal,
    };
    error(code, e.to_string())
}

impl SeedState {
    /// One rollout step over the nodes the tracker knows now.
    pub fn roll_out(&self) {
        // Runs every second: without an active deployment, copying every node's details under
        // the tracker's lock (10,000 of them in a large fleet) would be all it did.
        if !self.deployments.any_active() {
            return;
        }
        let nodes: Vec<(String, super::tracker::NodeMeta)> = self
            .tracker()
            .nodes()
            .map(|(name, meta)| (name.clone(), meta.clone()))
            .collect();
        if let Err(e) =
            self.deployments
                .roll_out(&nodes, &CatalogVersions(&self.catalog), now_unix())
        {
            tracing::warn!(error = %e, "deployment rollout step failed");
        }
    }

    fn tracker(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.tracker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Role check; a refusal is audited with the caller's identity.
    fn checked(
        &self,
        ctx: &RequestContext,
        roles: &[Role],
        action: &str,
        target: &str,
    ) -> Result<(), ErrorReply> {
        require_role(ctx, roles).inspect_err(|refusal| {
            self.audit(
                ctx,
                action,
                target,
                &format!("refused: {}", refusal.message),
            );
        })
    }

    fn audit(&self, ctx: &RequestContext, action: &str, target: &str, outcome: &str) {
        let record = AuditRecord {
            time: now_unix(),
            caller: ctx.peer.name.clone(),
            roles: ctx.peer.roles.iter().map(|r| r.to_string()).collect(),
            action: action.into(),
            target: target.into(),
            outcome: outcome.into(),
        };
        let _ = self.audit.append(&record);
    }

    fn audit_outcome(&self, ctx: &RequestContext, action: &str, target: &str, answer: &Answer) {
        // Role refusals were audited where they happened.
        if let Err(reply) = answer {
            if reply.code == ErrorCode::Forbidden {
                return;
            }
        }
        let outcome = match answer {
            Ok(Response::Published(p)) if p.unchanged => "ok: unchanged".to_string(),
            Ok(_) => "ok".to_string(),
            Err(reply) => format!("failed: {}", reply.message),
        };
        self.audit(ctx, action, target, &outcome);
    }

    fn manifest(&self, name: &str, version: Option<&str>) -> Answer {
        let (record, is_default) = self.catalog.version(name, version).map_err(catalog_error)?;
        Ok(Response::Manifest(ManifestReply {
            name: name.into(),
            version: record.version.clone(),
            is_default,
            manifest_json: record.manifest_json.clone(),
            files: record.file_blobs(),
            published_at: record.published_at,
            published_by: record.published_by.clone(),
        }))
    }

    /// A catalog blob's size, origin key and verified chunk-hash list, or NotFound.
    fn blob(&self, blob: BlobId) -> Result<Arc<CatalogBlob>, ErrorReply> {
        let index = || {
            self.blob_index
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if let Some(known) = index().get(&blob) {
            return Ok(known.clone());
        }
        let (size, origin_key, hashes) = self
            .catalog
            .blob_location(&blob)
            .map_err(catalog_error)?
            .ok_or_else(|| {
                error(
                    ErrorCode::NotFound,
                    format!("blob {blob} is not in the catalog"),
                )
            })?;
        let entry = Arc::new(CatalogBlob {
            size,
            origin_key,
            hashes,
        });
        index().put(blob, entry.clone());
        Ok(entry)
    }

    fn chunk_hashes(&self, blob: BlobId, size: u64) -> Answer {
        let entry = self.blob(blob)?;
        let (known_size, hashes) = (entry.size, &entry.hashes);
        if known_size != size {
            return Err(error(
                ErrorCode::BadRequest,
                format!("blob {blob} is {known_size} bytes, not {size}"),
            ));
        }
        Ok(Response::ChunkHashes {
            blob,
            packed: hashes.to_packed(),
        })
    }

    async fn chunk(
        &self,
        ctx: &RequestContext,
        blob: BlobId,
        index: u32,
        after_peer_failure: bool,
    ) -> Result<ChunkAnswer, ErrorReply> {
        let entry = self.blob(blob)?;
        let (origin_key, hashes) = (&entry.origin_key, &entry.hashes);
        let len = hashes
            .layout()
            .chunk_len(index)
            .map_err(|e| error(ErrorCode::BadRequest, e.to_string()))?;
        // Taken before anything is decided or read, so a refused request costs nothing; a
        // chunk larger than the whole budget (64 MiB chunks) still goes when nothing else does.
        let share = (len as usize).min(SEND_BUDGET_BYTES) as u32;
        let Ok(budget) = self.send_budget.clone().try_acquire_many_owned(share) else {
            return Err(error(
                ErrorCode::Busy,
                format!(
                    "busy: {} MiB of chunks already on their way to receivers",
                    SEND_BUDGET_BYTES >> 20
                ),
            ));
        };
        // With an upload cap, a request waits for its turn at the uplink before admission
        // decides. Deciding on arrival queued chunks behind the cap for seconds while admission
        // already named their receivers as holders, so redirected nodes asked peers that had
        // nothing yet and backed off; deciding when the chunk can leave at once names a
        // receiver that holds it one chunk-time later.
        let turn = match &self.upload {
            Some(limit) => {
                let turn = self.upload_turn.lock().await;
                limit.ready().await;
                Some((limit, turn))
            }
            None => None,
        };
        let decision = {
            let mut tracker = self.tracker();
            let site = tracker
                .node(&ctx.peer.name)
                .map(|m| m.site.clone())
                .unwrap_or_default();
            let holders = tracker.holders_of_chunk(&blob, index);
            if !tracker.may_cross_wan(&blob, &ctx.peer.name) {
                // A node of a WAN-limited site that is not one of its fetchers takes this
                // chunk from inside the site, even after peer failures: the link's budget is
                // the site's, and the chosen fetchers change when one of them goes away.
                let mut names = tracker.site_fetchers(&blob, &site);
                names.extend(
                    holders
                        .iter()
                        .filter(|h| h.site == site)
                        .map(|h| h.node.clone()),
                );
                names.sort();
                names.dedup();
                names.retain(|name| name != &ctx.peer.name);
                let peers = tracker.peer_info(&blob, &names);
                drop(tracker);
                self.counters.redirects.fetch_add(1, Ordering::Relaxed);
                return Ok(ChunkAnswer::Frame(Response::TryPeers {
                    blob,
                    index,
                    peers,
                }));
            }
            let decision = self
                .admission
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .decide(
                    &ChunkAsk {
                        blob,
                        index,
                        asker: &ctx.peer.name,
                        asker_site: &site,
                        after_peer_failure,
                    },
                    &holders,
                    |node| tracker.node(node).is_some(),
                    Instant::now(),
                );
            match decision {
                Decision::Serve => None,
                Decision::Redirect(names) => Some(tracker.peer_info(&blob, &names)),
            }
        };
        if let Some(peers) = decision {
            self.counters.redirects.fetch_add(1, Ordering::Relaxed);
            return Ok(ChunkAnswer::Frame(Response::TryPeers {
                blob,
                index,
                peers,
            }));
        }
        if let Some((limit, _turn)) = turn {
            limit.charge(len as u64);
        }
        let bytes = self.chunk_bytes(hashes, origin_key, index).await?;
        Ok(ChunkAnswer::Bytes(bytes, budget))
    }

    /// A verified chunk from the seed's cache, or read from the origin (once) into it.
    async fn chunk_bytes(
        &self,
        hashes: &ChunkHashes,
        origin_key: &str,
        index: u32,
    ) -> Result<Bytes, ErrorReply> {
        let blob = hashes.id();
        let cache = self.cache.clone();
        let cached = tokio::task::spawn_blocking(move || cache.get_chunk(&blob, index))
            .await
            .map_err(|e| error(ErrorCode::Internal, e.to_string()))?;
        if let Ok(Some(bytes)) = cached {
            return Ok(bytes);
        }
        let layout = hashes.layout();
        let start = layout.chunk_offset(index);
        let len = layout
            .chunk_len(index)
            .map_err(|e| error(ErrorCode::BadRequest, e.to_string()))? as u64;
        let bytes = self
            .origin
            .get_range(origin_key, start..start + len)
            .await
            .map_err(|e| error(ErrorCode::Unavailable, format!("origin: {e}")))?;
        self.counters.origin_reads.fetch_add(1, Ordering::Relaxed);
        self.counters
            .origin_bytes_read
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        hashes.verify_chunk(index, &bytes).map_err(|e| {
            error(
                ErrorCode::Unavailable,
                format!("the origin's copy of {origin_key} is damaged: {e}"),
            )
        })?;
        let cache = self.cache.clone();
        let for_cache = bytes.clone();
        let hashes = hashes.clone();
        let stored = tokio::task::spawn_blocking(move || {
            if cache.chunk_hashes(&blob).is_none() {
                cache.register_blob(&hashes)?;
            }
            cache.put_chunk(&blob, index, &for_cache)
        })
        .await;
        if let Ok(Err(e)) = stored {
            tracing::warn!(%blob, index, error = %e, "could not keep an origin chunk in the cache");
        }
        Ok(bytes)
    }

    async fn send_chunk(&self, send: &mut SendStream, blob: BlobId, index: u32, bytes: Bytes) {
        match transport::send_chunk(send, blob, index, &bytes).await {
            Ok(()) => {
                self.counters.chunks_served.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .chunk_bytes_served
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!(%blob, index, error = %e, "chunk not delivered"),
        }
    }

    async fn publish(
        &self,
        ctx: &RequestContext,
        publish: PublishRequest,
        send: &mut SendStream,
        mut recv: RecvStream,
    ) -> Answer {
        let bad = |m: String| error(ErrorCode::BadRequest, m);
        validate_package_name(&publish.name).map_err(|e| bad(e.to_string()))?;
        let manifest = parse_manifest(publish.manifest_json.as_bytes())
            .map_err(|errors| bad(format!("the manifest is not valid:\n{errors}")))?;
        let mut seen = HashSet::new();
        for file in &publish.files {
            if !seen.insert(file.file.as_str()) {
                return Err(bad(format!("file {:?} is listed twice", file.file)));
            }
            let Some(expected) = manifest.sha256_of(&file.file) else {
                return Err(bad(format!(
                    "file {:?} is not listed in the manifest's files",
                    file.file
                )));
            };
            if expected != file.sha256 {
                return Err(bad(format!(
                    "file {:?} has SHA-256 {} but the manifest says {}",
                    file.file,
                    hex::encode(file.sha256),
                    hex::encode(expected)
                )));
            }
            if file.size > self.max_upload_bytes {
                return Err(bad(format!(
                    "file {:?} is {} bytes, over this seed's {}-byte upload limit",
                    file.file, file.size, self.max_upload_bytes
                )));
            }
        }
        if let Some(missing) = manifest
            .files
            .keys()
            .find(|name| !seen.contains(name.as_str()))
        {
            return Err(bad(format!(
                "the manifest lists {missing:?} but the publish does not include it"
            )));
        }
        let version = manifest.version.clone();
        let key_of = |file: &str| format!("packages/{}/{}/{}", publish.name, version, file);
        let candidate = VersionRecord {
            version: version.clone(),
            manifest_json: publish.manifest_json.clone(),
            files: publish
                .files
                .iter()
                .map(|f| FileRecord {
                    file: f.file.clone(),
                    blob: f.blob.to_hex(),
                    size: f.size,
                    sha256: hex::encode(f.sha256),
                    origin_key: key_of(&f.file),
                })
                .collect(),
            published_at: now_unix(),
            published_by: ctx.peer.name.clone(),
        };
        let unchanged = Response::Published(PublishOutcome {
            name: publish.name.clone(),
            version: version.clone(),
            unchanged: true,
            files_uploaded: 0,
            bytes_uploaded: 0,
        });
        if self
            .catalog
            .check_publish(&publish.name, &candidate)
            .map_err(catalog_error)?
            == Some(PublishResult::Unchanged)
        {
            return Ok(unchanged);
        }
        if self.origin.is_read_only() {
            return Err(error(
                ErrorCode::Unavailable,
                format!(
                    "the origin {} is read-only; publish to it directly",
                    self.origin.url()
                ),
            ));
        }
        let upload: Vec<String> = publish.files.iter().map(|f| f.file.clone()).collect();
        transport::write_frame(send, &Response::PublishReady { upload })
            .await
            .map_err(|e| error(ErrorCode::Unavailable, e.to_string()))?;

        // Receive and check every file before anything reaches the origin.
        let mut spools = Vec::new();
        let mut hashes = Vec::new();
        let mut bytes_uploaded = 0;
        for file in &publish.files {
            let spool = Spool {
                path: self.tmp_dir.join(format!(
                    "upload-{}-{}",
                    std::process::id(),
                    rand::random::<u64>()
                )),
            };
            let received = receive_file(&mut recv, &spool.path, file.size).await?;
            if received.sha256 != file.sha256 {
                return Err(bad(format!(
                    "file {:?}: the bytes received have SHA-256 {}, the manifest says {}",
                    file.file,
                    hex::encode(received.sha256),
                    hex::encode(file.sha256)
                )));
            }
            if received.hashes.id() != file.blob {
                return Err(bad(format!(
                    "file {:?}: the bytes received are blob {}, the publisher said {}",
                    file.file,
                    received.hashes.id(),
                    file.blob
                )));
            }
            let path = spool.path.clone();
            let limits = self.zip_limits.clone();
            let layout = tokio::task::spawn_blocking(move || check_zip_layout(&path, &limits))
                .await
                .map_err(|e| error(ErrorCode::Internal, e.to_string()))?;
            layout.map_err(|e| bad(format!("file {:?}: {e}", file.file)))?;
            bytes_uploaded += file.size;
            hashes.push(received.hashes);
            spools.push(spool);
        }

        let mut stored: Vec<String> = Vec::new();
        let result = async {
            for (file, spool) in publish.files.iter().zip(&spools) {
                let key = key_of(&file.file);
                self.origin
                    .put_file(&key, &spool.path)
                    .await
                    .map_err(|e| error(ErrorCode::Unavailable, format!("origin: {e}")))?;
                stored.push(key);
            }
            self.catalog
                .publish(&publish.name, candidate, &hashes)
                .map_err(catalog_error)
        }
        .await;
        match result {
            Ok(outcome) => {
                // Warm the seed's cache so the first nodes do not wait on the origin.
                for spool in &spools {
                    let cache = self.cache.clone();
                    let path = spool.path.clone();
                    if let Ok(Err(e)) =
                        tokio::task::spawn_blocking(move || cache.import_file(&path)).await
                    {
                        tracing::info!(error = %e, "published file not kept in the seed's cache");
                    }
                }
                Ok(Response::Published(PublishOutcome {
                    name: publish.name,
                    version,
                    unchanged: outcome == PublishResult::Unchanged,
                    files_uploaded: publish.files.len() as u32,
                    bytes_uploaded,
                }))
            }
            Err(reply) => {
                for key in &stored {
                    if let Err(e) = self.origin.delete(key).await {
                        tracing::warn!(key, error = %e, "could not remove a half-published file");
                    }
                }
                Err(reply)
            }
        }
    }

    async fn delete(&self, name: &str, version: Option<&str>, force: bool) -> Answer {
        // Deployments are not tracked yet, so nothing can hold a version in use; `force` will
        // override that check once they are.
        let _ = force;
        let removed = self.catalog.delete(name, version).map_err(catalog_error)?;
        self.blob_index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        for file in removed.iter().flat_map(|r| r.files.iter()) {
            let Ok(blob) = file.blob.parse::<BlobId>() else {
                continue;
            };
            if self.catalog.blob_location(&blob).ok().flatten().is_some() {
                continue;
            }
            if let Err(e) = self.origin.delete(&file.origin_key).await {
                tracing::warn!(key = file.origin_key, error = %e, "origin object not removed");
            }
            let cache = self.cache.clone();
            let _ = tokio::task::spawn_blocking(move || cache.evict_blob(&blob)).await;
        }
        let versions: Vec<&str> = removed.iter().map(|r| r.version.as_str()).collect();
        Ok(Response::Done {
            message: format!("deleted {name} version(s) {}", versions.join(", ")),
        })
    }

    /// Every catalog blob with its size and the package version files that are it.
    fn catalog_blobs(&self) -> Result<HashMap<BlobId, (u64, Vec<BlobName>)>, ErrorReply> {
        let mut blobs: HashMap<BlobId, (u64, Vec<BlobName>)> = HashMap::new();
        for summary in self.catalog.list().map_err(catalog_error)? {
            let Some(package) = self.catalog.package(&summary.name).map_err(catalog_error)? else {
                continue;
            };
            for version in &package.versions {
                for file in version.file_blobs() {
                    let entry = blobs.entry(file.blob).or_insert((file.size, Vec::new()));
                    entry.1.push(BlobName {
                        blob: file.blob,
                        name: package.name.clone(),
                        version: version.version.clone(),
                        file: file.file.clone(),
                    });
                }
            }
        }
        Ok(blobs)
    }

    /// Every node the tracker knows, with its holdings of catalog blobs summed up: the
    /// tracker keeps bitfields, the catalog the sizes that turn them into bytes.
    fn list_nodes(&self) -> Answer {
        let blobs = self.catalog_blobs()?;
        let tracker = self.tracker();
        let now = Instant::now();
        let names: Vec<String> = tracker.nodes().map(|(name, _)| name.clone()).collect();
        let mut nodes: HashMap<String, NodeSummary> = tracker
            .nodes()
            .map(|(name, meta)| {
                (
                    name.clone(),
                    NodeSummary {
                        node: name.clone(),
                        listen: meta.listen.clone(),
                        site: meta.site.clone(),
                        tags: meta.tags.clone(),
                        last_seen_secs_ago: now.duration_since(meta.last_seen).as_secs(),
                        blobs: 0,
                        complete_blobs: 0,
                        chunks_held: 0,
                        bytes_held: 0,
                    },
                )
            })
            .collect();
        for (blob, (size, _)) in &blobs {
            let Ok(layout) = ChunkLayout::for_size(*size) else {
                continue;
            };
            for peer in tracker.peer_info(blob, &names) {
                let (Some(chunks), Some(summary)) = (peer.chunks, nodes.get_mut(&peer.node)) else {
                    continue;
                };
                let held: Vec<u32> = chunks.iter_ones().collect();
                if held.is_empty() {
                    continue;
                }
                summary.blobs += 1;
                summary.complete_blobs += u32::from(held.len() as u32 == layout.chunk_count());
                summary.chunks_held += held.len() as u64;
                summary.bytes_held += held
                    .iter()
                    .map(|&i| u64::from(layout.chunk_len(i).unwrap_or(0)))
                    .sum::<u64>();
            }
        }
        let mut list: Vec<NodeSummary> = nodes.into_values().collect();
        list.sort_by(|a, b| (&a.site, &a.node).cmp(&(&b.site, &b.node)));
        Ok(Response::Nodes(list))
    }

    fn describe_blobs(&self, wanted: &[BlobId]) -> Answer {
        if wanted.len() > MAX_DESCRIBE_BLOBS {
            return Err(error(
                ErrorCode::BadRequest,
                format!(
                    "{} blobs asked about, the limit is {MAX_DESCRIBE_BLOBS}",
                    wanted.len()
                ),
            ));
        }
        let mut blobs = self.catalog_blobs()?;
        Ok(Response::BlobNames(
            wanted
                .iter()
                .filter_map(|blob| blobs.remove(blob))
                .flat_map(|(_, names)| names)
                .collect(),
        ))
    }

    fn where_(&self, query: WhereQuery) -> Answer {
        let blobs: Vec<BlobId> = match query {
            WhereQuery::Blob(blob) => vec![blob],
            WhereQuery::Package { name, version } => {
                let (record, _) = self
                    .catalog
                    .version(&name, version.as_deref())
                    .map_err(catalog_error)?;
                record.file_blobs().into_iter().map(|f| f.blob).collect()
            }
        };
        let tracker = self.tracker();
        let now = Instant::now();
        Ok(Response::Holders(
            blobs.iter().flat_map(|b| tracker.holders(b, now)).collect(),
        ))
    }
}

struct Received {
    sha256: [u8; 32],
    hashes: ChunkHashes,
}

/// Streams exactly `size` bytes of an upload into `path`, hashing as they pass.
async fn receive_file(
    recv: &mut RecvStream,
    path: &Path,
    size: u64,
) -> Result<Received, ErrorReply> {
    let io_error =
        |e: std::io::Error| error(ErrorCode::Internal, format!("spooling an upload: {e}"));
    let mut file = tokio::fs::File::create(path).await.map_err(io_error)?;
    let mut sha = Sha256::new();
    let mut hasher =
        BlobHasher::new(size).map_err(|e| error(ErrorCode::BadRequest, e.to_string()))?;
    let mut remaining = size;
    let mut buffer = vec![0u8; 256 * 1024];
    while remaining > 0 {
        let want = remaining.min(buffer.len() as u64) as usize;
        let read = tokio::time::timeout(UPLOAD_READ_TIMEOUT, recv.read(&mut buffer[..want]))
            .await
            .map_err(|_| {
                error(
                    ErrorCode::BadRequest,
                    format!("the upload stalled for {UPLOAD_READ_TIMEOUT:?}"),
                )
            })?
            .map_err(|e| error(ErrorCode::BadRequest, format!("reading the upload: {e}")))?;
        let Some(n) = read else {
            return Err(error(
                ErrorCode::BadRequest,
                format!("the upload ended {remaining} bytes early"),
            ));
        };
        sha.update(&buffer[..n]);
        hasher.update(&buffer[..n]);
        file.write_all(&buffer[..n]).await.map_err(io_error)?;
        remaining -= n as u64;
    }
    file.sync_all().await.map_err(io_error)?;
    let hashes = hasher
        .finish()
        .map_err(|e| error(ErrorCode::BadRequest, e.to_string()))?;
    Ok(Received {
        sha256: sha.finalize().into(),
        hashes,
    })
}
