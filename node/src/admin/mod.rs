//! The node's admin API: HTTP/JSON on a Unix socket in the node's data dir, so commands on the
//! node's own machine need no certificate. The socket is created 0600 and every connection's
//! peer credentials are checked as well: only the node's own user (or root) is served.
//!
//! Owns: the routes, their JSON shapes ([`FetchEvent`], [`NodeStatus`], [`CacheEntry`],
//! [`CacheReport`], [`PeerEntry`], [`InstallLog`]), the socket's life, the names of cached
//! blobs ([`names`]) and preheating (asked over the mesh by operators, [`preheat`]). Does not
//! own: what the routes do (the node's [`crate::peer`] functions, the cache), the figures
//! (`crate::metrics`, which also renders `GET /metrics` here) or printing (the CLI, through
//! [`client::AdminClient`]).
//!
//! Routes: `GET /v1/status`, `/v1/transfers`, `/v1/cache`, `/v1/cache/stats`, `/v1/peers`,
//! `/v1/installed`, `/v1/installed/{name}/log`, `/v1/blobs/{blob}`, `/metrics`; `POST
//! /v1/fetch`, `/v1/install` (both NDJSON), `/v1/uninstall`, `/v1/cache/verify`,
//! `/v1/cache/evict`, `/v1/cache/pin`, `/v1/cache/unpin`.

pub mod client;
pub mod names;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use pkgmesh_protocol::blob::BlobId;
use pkgmesh_protocol::select::Platform;
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use crate::metrics::{NodeTotals, PeerRecord};
use crate::peer::agent::{fetch_and_install, summarize, InstallEvent, InstallOrder};
use crate::peer::fetch::start_fetch;
use crate::peer::fetch::FETCH_PIN;
use crate::peer::package::{node_platform, resolve_package, PackageFile};
use crate::peer::transfers::{TransferState, TransferStatus};
use crate::peer::NodeState;
use names::PackageRef;

/// A fetch's progress stream sends a snapshot at least this often, so a client can tell a
/// stalled download from a dead node.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Snapshots are sent at most this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);
/// Bytes of a blob sent in one piece of the response body.
const BLOB_PIECE: usize = 256 * 1024;

/// `POST /v1/fetch`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FetchRequest {
    pub name: String,
    pub version: Option<String>,
    /// Choose the file for this platform instead of the node's own.
    pub platform: Option<Platform>,
}

/// One line of the `POST /v1/fetch` response (newline-delimited JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum FetchEvent {
    /// The package version and file chosen for the platform.
    Resolved(PackageFile),
    Progress(TransferStatus),
    /// The last line of a successful fetch: the blob is verified in the node's cache.
    Done(TransferStatus),
    /// The last line of a failed fetch.
    Failed {
        message: String,
    },
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    pub site: String,
    pub listen: String,
    pub seed: String,
    pub seed_connected: bool,
    pub cache_used_bytes: u64,
    pub cache_budget_bytes: u64,
    pub cache_blobs: u64,
    pub transfers_in_flight: usize,
}

/// The JSON body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

fn api_error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(ApiError {
            error: message.into(),
        }),
    )
        .into_response()
}

/// Serves the admin API on `path` until the returned task is aborted; the socket file is
/// removed when the node shuts down ([`AdminSocket`]'s drop).
pub async fn serve_admin(
    state: Arc<NodeState>,
    path: &Path,
) -> anyhow::Result<(AdminSocket, tokio::task::JoinHandle<()>)> {
    remove_stale_socket(path)?;
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot listen on the admin socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", path.display()))?;
    let owner = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .uid();
    let router = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/transfers", get(transfers))
        .route("/v1/fetch", post(fetch))
        .route("/v1/blobs/{blob}", get(blob))
        .route("/v1/install", post(install))
        .route("/v1/uninstall", post(uninstall))
        .route("/v1/installed", get(installed))
        .route("/v1/installed/{name}/log", get(install_log))
        .route("/v1/cache", get(cache_list))
        .route("/v1/cache/stats", get(cache_stats))
        .route("/v1/cache/verify", post(cache_verify))
        .route("/v1/cache/evict", post(cache_evict))
        .route("/v1/cache/pin", post(cache_pin))
        .route("/v1/cache/unpin", post(cache_unpin))
        .route("/v1/peers", get(peers))
        .route("/v1/audit", get(audit_records))
        .route("/metrics", get(metrics))
        .with_state(state);
    let listener = OwnerOnly {
        inner: listener,
        owner,
    };
    let task = tokio::spawn(async move {
        let service = router.into_make_service_with_connect_info::<AdminCaller>();
        if let Err(error) = axum::serve(listener, service).await {
            tracing::warn!(%error, "the admin API stopped");
        }
    });
    tracing::info!(socket = %path.display(), "admin API listening");
    Ok((
        AdminSocket {
            path: path.to_path_buf(),
        },
        task,
    ))
}

/// Removes the socket file when dropped.
pub struct AdminSocket {
    path: PathBuf,
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A socket file left by a node that died is removed; any other file there is an error.
fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display())),
        Ok(_) => anyhow::bail!(
            "{} exists and is not a socket: move it away so the admin API can listen there",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot inspect {}", path.display())),
    }
}

/// Accepts only connections from the socket's owner or root (checked with SO_PEERCRED), so a
/// socket whose mode was loosened still serves nobody else.
struct OwnerOnly {
    inner: UnixListener,
    owner: u32,
}

/// Who is on the other end of an admin connection, from SO_PEERCRED: the name audit records
/// give the caller.
#[derive(Debug, Clone, Copy)]
pub struct AdminCaller {
    pub uid: u32,
}

impl AdminCaller {
    fn audit(self, state: &NodeState, action: &str, target: &str, outcome: &str) {
        audit(
            state,
            &format!("uid {}", self.uid),
            &["local".to_string()],
            action,
            target,
            outcome,
        );
    }

    /// Audits a change whose answer is `response`, before the caller sees it.
    fn audited(
        self,
        state: &NodeState,
        action: &str,
        target: &str,
        response: Response,
    ) -> Response {
        let status = response.status();
        let outcome = if status.is_success() {
            "ok".to_string()
        } else {
            format!("failed: {status}")
        };
        self.audit(state, action, target, &outcome);
        response
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, OwnerOnly>>
    for AdminCaller
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, OwnerOnly>) -> Self {
        *stream.remote_addr()
    }
}

/// `GET /v1/audit?since=UNIX&limit=N`: the node's audit records, oldest first.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AuditQuery {
    pub since: Option<u64>,
    pub limit: Option<usize>,
}

/// Most records one `GET /v1/audit` returns.
pub const MAX_AUDIT_RECORDS: usize = 10_000;

async fn audit_records(
    State(state): State<Arc<NodeState>>,
    axum::extract::Query(query): axum::extract::Query<AuditQuery>,
) -> Response {
    let limit = query.limit.unwrap_or(1000).min(MAX_AUDIT_RECORDS);
    let read = tokio::task::spawn_blocking(move || state.audit.read(query.since, limit)).await;
    match read {
        Ok(Ok(records)) => Json(records).into_response(),
        Ok(Err(e)) => api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the audit log: {e}"),
        ),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Appends a record to the node's audit log. A record that cannot be written is logged by the
/// log itself; the change has happened and the caller is told as usual.
pub fn audit(
    state: &NodeState,
    caller: &str,
    roles: &[String],
    action: &str,
    target: &str,
    outcome: &str,
) {
    let record = pkgmesh_protocol::wire::AuditRecord {
        time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        caller: caller.to_string(),
        roles: roles.to_vec(),
        action: action.to_string(),
        target: target.to_string(),
        outcome: outcome.to_string(),
    };
    let _ = state.audit.append(&record);
}

impl axum::serve::Listener for OwnerOnly {
    type Io = UnixStream;
    type Addr = AdminCaller;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, _)) => match stream.peer_cred() {
                    Ok(cred) if cred.uid() == self.owner || cred.uid() == 0 => {
                        return (stream, AdminCaller { uid: cred.uid() })
                    }
                    Ok(cred) => {
                        tracing::warn!(
                            uid = cred.uid(),
                            "admin connection from another user refused"
                        )
                    }
                    Err(error) => {
                        tracing::warn!(%error, "admin connection without credentials refused")
                    }
                },
                Err(error) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!(%error, "admin socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(AdminCaller { uid: self.owner })
    }
}

async fn status(State(state): State<Arc<NodeState>>) -> Json<NodeStatus> {
    let stats = state.cache.stats();
    Json(NodeStatus {
        node: state.settings.identity.name().to_string(),
        site: state.settings.site.clone(),
        listen: state.settings.listen.to_string(),
        seed: state.settings.seed.to_string(),
        seed_connected: state.seed_connected().await,
        cache_used_bytes: stats.used_bytes,
        cache_budget_bytes: stats.budget_bytes,
        cache_blobs: stats.blobs,
        transfers_in_flight: state.transfers.snapshot().len(),
    })
}

async fn transfers(State(state): State<Arc<NodeState>>) -> Json<Vec<TransferStatus>> {
    Json(state.transfers.snapshot())
}

async fn fetch(
    ConnectInfo(caller): ConnectInfo<AdminCaller>,
    State(state): State<Arc<NodeState>>,
    Json(request): Json<FetchRequest>,
) -> Response {
    let (events, receiver) = mpsc::channel::<FetchEvent>(8);
    tokio::spawn(async move {
        let target = package_target(&request.name, request.version.as_deref());
        let result = run_fetch(&state, request, &events).await;
        let outcome = match &result {
            Ok(()) => "ok".to_string(),
            Err(error) => format!("failed: {error:#}"),
        };
        caller.audit(&state, "fetch", &target, &outcome);
        if let Err(error) = result {
            let _ = events
                .send(FetchEvent::Failed {
                    message: format!("{error:#}"),
                })
                .await;
        }
    });
    let lines = futures::stream::unfold(receiver, |mut receiver| async move {
        let event = receiver.recv().await?;
        let mut line = serde_json::to_vec(&event).unwrap_or_default();
        line.push(b'\n');
        Some((
            Ok::<_, std::convert::Infallible>(Bytes::from(line)),
            receiver,
        ))
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response()
}

/// `NAME` or `NAME@VERSION`, as audit records name a package.
fn package_target(name: &str, version: Option<&str>) -> String {
    match version {
        Some(version) => format!("{name}@{version}"),
        None => name.to_string(),
    }
}

/// Resolves and fetches, sending events until the end. The download itself goes on if the
/// client goes away (another caller or a retry joins it).
async fn run_fetch(
    state: &Arc<NodeState>,
    request: FetchRequest,
    events: &mpsc::Sender<FetchEvent>,
) -> anyhow::Result<()> {
    let platform = match request.platform {
        Some(platform) => platform,
        None => node_platform(state)?,
    };
    let package =
        resolve_package(state, &request.name, request.version.as_deref(), &platform).await?;
    let blob: BlobId = package
        .blob
        .parse()
        .context("the seed named a bad blob id")?;
    remember_name(state, &blob, &package);
    let size = package.size;
    if events.send(FetchEvent::Resolved(package)).await.is_err() {
        return Ok(());
    }
    let mut progress = start_fetch(state.clone(), blob, size);
    loop {
        let status = progress.borrow_and_update().clone();
        let event = match status.state {
            TransferState::Running => FetchEvent::Progress(status),
            TransferState::Done => {
                let _ = events.send(FetchEvent::Done(status)).await;
                return Ok(());
            }
            TransferState::Failed => {
                anyhow::bail!(status.error.unwrap_or_else(|| "the download failed".into()))
            }
        };
        if events.send(event).await.is_err() {
            return Ok(());
        }
        tokio::time::sleep(PROGRESS_EVERY).await;
        match tokio::time::timeout(HEARTBEAT, progress.changed()).await {
            Ok(Ok(())) | Err(_) => {}
            Ok(Err(_)) => {
                // The download task ended; its last snapshot says how.
                let last = progress.borrow().clone();
                if last.state == TransferState::Done {
                    let _ = events.send(FetchEvent::Done(last)).await;
                    return Ok(());
                }
                anyhow::bail!(last
                    .error
                    .unwrap_or_else(|| format!("the download of blob {blob} stopped")));
            }
        }
    }
}

/// `POST /v1/install`: newline-delimited [`InstallEvent`]s, the last `done` or `failed`.
async fn install(
    ConnectInfo(caller): ConnectInfo<AdminCaller>,
    State(state): State<Arc<NodeState>>,
    Json(order): Json<InstallOrder>,
) -> Response {
    let (events, receiver) = mpsc::unbounded_channel::<InstallEvent>();
    tokio::spawn(async move {
        let target = package_target(&order.name, order.version.as_deref());
        let sink = events.clone();
        let names = state.clone();
        let result = fetch_and_install(&state, order, move |event| {
            if let InstallEvent::Resolved(package) = &event {
                if let Ok(blob) = package.blob.parse::<BlobId>() {
                    remember_name(&names, &blob, package);
                }
            }
            let _ = sink.send(event);
        })
        .await;
        let last = match result {
            Ok(summary) => InstallEvent::Done(summary),
            Err(error) => InstallEvent::Failed {
                message: format!("{error:#}"),
            },
        };
        let outcome = match &last {
            InstallEvent::Failed { message } => format!("failed: {message}"),
            _ => "ok".to_string(),
        };
        caller.audit(&state, "install", &target, &outcome);
        let _ = events.send(last);
    });
    ndjson(receiver)
}

/// `POST /v1/uninstall` with `{"name": ...}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UninstallOrder {
    pub name: String,
}

async fn uninstall(
    ConnectInfo(caller): ConnectInfo<AdminCaller>,
    State(state): State<Arc<NodeState>>,
    Json(order): Json<UninstallOrder>,
) -> Response {
    let target = order.name.clone();
    let response = uninstall_package(&state, order).await;
    caller.audited(&state, "uninstall", &target, response)
}

async fn uninstall_package(state: &NodeState, order: UninstallOrder) -> Response {
    let installer = match state.installer() {
        Ok(installer) => installer,
        Err(e) => return api_error(StatusCode::CONFLICT, format!("{e:#}")),
    };
    let request = crate::install::UninstallRequest::new(order.name);
    match installer.uninstall(request, |_| {}).await {
        Ok(outcome) => Json(summarize(&installer, &outcome)).into_response(),
        Err(crate::install::InstallError::NotInstalled { name }) => api_error(
            StatusCode::NOT_FOUND,
            format!("package {name:?} is not installed"),
        ),
        Err(e) => api_error(StatusCode::CONFLICT, e.to_string()),
    }
}

async fn installed(State(state): State<Arc<NodeState>>) -> Response {
    let installer = match state.installer() {
        Ok(installer) => installer,
        Err(e) => return api_error(StatusCode::CONFLICT, format!("{e:#}")),
    };
    match tokio::task::spawn_blocking(move || installer.installed()).await {
        Ok(Ok(records)) => Json(records).into_response(),
        Ok(Err(e)) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// A response body of one JSON line per event.
fn ndjson<T: Serialize + Send + 'static>(receiver: mpsc::UnboundedReceiver<T>) -> Response {
    let lines = futures::stream::unfold(receiver, |mut receiver| async move {
        let event = receiver.recv().await?;
        let mut line = serde_json::to_vec(&event).unwrap_or_default();
        line.push(b'\n');
        Some((
            Ok::<_, std::convert::Infallible>(Bytes::from(line)),
            receiver,
        ))
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response()
}

async fn blob(State(state): State<Arc<NodeState>>, UrlPath(blob): UrlPath<String>) -> Response {
    let Ok(blob) = blob.parse::<BlobId>() else {
        return api_error(
            StatusCode::BAD_REQUEST,
            format!("{blob:?} is not a blob id (64 hex digits)"),
        );
    };
    let Some(info) = state.cache.list().into_iter().find(|b| b.id == blob) else {
        return api_error(
            StatusCode::NOT_FOUND,
            format!("blob {blob} is not in the cache"),
        );
    };
    if !info.complete {
        return api_error(
            StatusCode::CONFLICT,
            format!(
                "blob {blob} is incomplete ({} of {} chunks): fetch it first",
                info.chunks_held, info.chunks_total
            ),
        );
    }
    let cache = state.cache.clone();
    let (pieces, receiver) = mpsc::channel::<std::io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut reader = match cache.open_blob(&blob) {
            Ok(reader) => reader,
            Err(e) => {
                let _ = pieces.blocking_send(Err(std::io::Error::other(e.to_string())));
                return;
            }
        };
        loop {
            let mut buffer = vec![0u8; BLOB_PIECE];
            match reader.read(&mut buffer) {
                Ok(0) => return,
                Ok(n) => {
                    buffer.truncate(n);
                    if pieces.blocking_send(Ok(Bytes::from(buffer))).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = pieces.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    let body = futures::stream::unfold(receiver, |mut receiver| async move {
        let piece = receiver.recv().await?;
        Some((piece, receiver))
    });
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, info.size.to_string()),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// Remembers what `blob` is, saving in the background when that is news.
fn remember_name(state: &NodeState, blob: &BlobId, package: &PackageFile) {
    let named = PackageRef {
        name: package.name.clone(),
        version: package.version.clone(),
        file: package.file.clone(),
    };
    if state.blob_names.remember(blob, named) {
        state.blob_names.save_later();
    }
}

/// Starts fetching a package version for this node's platform and returns at once: what
/// `pkgmesh preheat` asks of a node over the mesh (`caller` is the operator's certificate name).
pub async fn preheat(
    state: &Arc<NodeState>,
    caller: &str,
    name: &str,
    version: Option<String>,
) -> anyhow::Result<pkgmesh_protocol::wire::PreheatReply> {
    let platform = node_platform(state)?;
    let package = resolve_package(state, name, version.as_deref(), &platform).await?;
    let blob: BlobId = package
        .blob
        .parse()
        .context("the seed named a bad blob id")?;
    remember_name(state, &blob, &package);
    let chunks = pkgmesh_protocol::blob::ChunkLayout::for_size(package.size)
        .context("the seed named a blob size no chunk layout fits")?
        .chunk_count();
    let held = |state: &NodeState| {
        state
            .cache
            .bitfield(&blob)
            .map_or(0, |chunks| chunks.count_ones())
    };
    let mut chunks_held = held(state);
    if chunks_held < chunks {
        if state.transfers.follow(&blob).is_none() {
            tracing::info!(
                caller,
                package = package.name,
                version = package.version,
                %blob,
                "preheating"
            );
        }
        // The download runs on its own (a caller asking again joins it); its progress shows
        // in `pkgmesh transfers`.
        let mut progress = start_fetch(state.clone(), blob, package.size);
        chunks_held = chunks_held.max(progress.borrow().chunks_held);
        let state = state.clone();
        tokio::spawn(async move {
            // Dropped with the transfer's end, so this wait ends too.
            while progress.changed().await.is_ok() {}
            if progress.borrow().state == TransferState::Done {
                pin_preheated(&state, blob).await;
            }
        });
    } else {
        pin_preheated(state, blob).await;
    }
    Ok(pkgmesh_protocol::wire::PreheatReply {
        node: state.settings.identity.name().to_string(),
        name: package.name,
        version: package.version,
        file: package.file,
        blob,
        size: package.size,
        chunks,
        chunks_held,
    })
}

/// The pin reason of a preheated blob: it stays until the package is installed (or an
/// operator unpins it), so a preheat is not evicted before the deployment that needs it.
pub const PREHEAT_PIN: &str = "preheat";

async fn pin_preheated(state: &Arc<NodeState>, blob: BlobId) {
    let cache = state.cache.clone();
    match tokio::task::spawn_blocking(move || cache.pin(&blob, PREHEAT_PIN)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%blob, %error, "cannot pin a preheated blob"),
        Err(error) => tracing::warn!(%blob, %error, "cannot pin a preheated blob"),
    }
}

/// An error answer still to be sent: small, so the `Result`s that carry it stay cheap.
struct Refusal {
    status: StatusCode,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Refusal {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        api_error(self.status, self.message)
    }
}

/// The error answer for a cache failure: what the operator can do about it.
fn cache_error(error: pkgmesh_cache::CacheError) -> Refusal {
    use pkgmesh_cache::CacheError;
    let status = match &error {
        CacheError::Unregistered { id } => {
            return Refusal::new(
                StatusCode::NOT_FOUND,
                format!("blob {id} is not in this node's cache (see `pkgmesh cache ls`)"),
            )
        }
        CacheError::Pinned { .. } | CacheError::InUse { .. } => StatusCode::CONFLICT,
        CacheError::BadPinReason { .. } => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    Refusal::new(status, error.to_string())
}

fn parse_blob(text: &str) -> Result<BlobId, Refusal> {
    text.parse::<BlobId>().map_err(|_| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("{text:?} is not a blob id (64 hex digits; see `pkgmesh cache ls`)"),
        )
    })
}

/// Runs blocking cache work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, pkgmesh_cache::CacheError> + Send + 'static,
) -> Result<T, Refusal> {
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(cache_error(error)),
        Err(error) => Err(Refusal::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            error.to_string(),
        )),
    }
}

/// One blob of `GET /v1/cache`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheEntry {
    pub blob: String,
    /// The package versions and files this blob is, when known.
    pub packages: Vec<PackageRef>,
    pub size: u64,
    pub chunk_size: u32,
    pub chunks_held: u32,
    pub chunks_total: u32,
    pub bytes_held: u64,
    pub complete: bool,
    /// Why it is pinned; empty when it is not.
    pub pins: Vec<String>,
    /// Unix seconds of the last put or read of any of its chunks.
    pub last_access: Option<u64>,
}

/// How long `cache ls` waits for the seed to name unknown blobs before listing them unnamed.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(3);

async fn cache_list(State(state): State<Arc<NodeState>>) -> Json<Vec<CacheEntry>> {
    let blobs = state.cache.list();
    let ids: Vec<BlobId> = blobs.iter().map(|b| b.id).collect();
    learn_names(&state, &ids).await;
    if state.blob_names.trim(&ids) {
        state.blob_names.save_later();
    }
    Json(
        blobs
            .into_iter()
            .map(|info| CacheEntry {
                blob: info.id.to_hex(),
                packages: state.blob_names.get(&info.id),
                size: info.size,
                chunk_size: info.chunk_size,
                chunks_held: info.chunks_held,
                chunks_total: info.chunks_total,
                bytes_held: info.bytes_held,
                complete: info.complete,
                pins: info.pins,
                last_access: info.last_access,
            })
            .collect(),
    )
}

/// Asks the seed's catalog about blobs this node has no name for (fetched by a deployment,
/// or before names were kept). Best effort: without the seed they are listed unnamed.
async fn learn_names(state: &NodeState, ids: &[BlobId]) {
    use pkgmesh_protocol::wire::{Request, Response, MAX_DESCRIBE_BLOBS};
    let unknown = state.blob_names.unknown(ids);
    if unknown.is_empty() {
        return;
    }
    let asked = async {
        let seed = state.seed().await?;
        let mut learned = Vec::new();
        for part in unknown.chunks(MAX_DESCRIBE_BLOBS) {
            let request = Request::DescribeBlobs {
                blobs: part.to_vec(),
            };
            match seed.call(&request).await? {
                Response::BlobNames(names) => learned.extend(names),
                other => anyhow::bail!("the seed answered DescribeBlobs with {other:?}"),
            }
        }
        Ok(learned)
    };
    match tokio::time::timeout(DESCRIBE_TIMEOUT, asked).await {
        Ok(Ok(learned)) => {
            let mut news = false;
            for name in learned {
                news |= state.blob_names.remember(
                    &name.blob,
                    PackageRef {
                        name: name.name,
                        version: name.version,
                        file: name.file,
                    },
                );
            }
            if news {
                state.blob_names.save_later();
            }
        }
        Ok(Err(error)) => {
            tracing::debug!(
                error = format!("{error:#}"),
                "cached blobs not named by the seed"
            )
        }
        Err(_) => tracing::debug!("the seed did not name cached blobs in time"),
    }
}

/// `GET /v1/cache/stats`: the cache's totals and the node's traffic, cumulative since it
/// started (byte figures over finished transfers; `pkgmesh transfers` shows those running).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheReport {
    pub used_bytes: u64,
    pub budget_bytes: u64,
    pub pinned_bytes: u64,
    pub blobs: u64,
    pub complete_blobs: u64,
    pub chunks: u64,
    pub hits: u64,
    pub misses: u64,
    pub evicted_chunks: u64,
    pub evicted_bytes: u64,
    pub rotted_chunks: u64,
    /// Same-site and other-site peers together.
    pub bytes_from_peers: u64,
    #[serde(flatten)]
    pub totals: NodeTotals,
}

async fn cache_stats(State(state): State<Arc<NodeState>>) -> Json<CacheReport> {
    let stats = state.cache.stats();
    let totals = NodeTotals::read(&state);
    Json(CacheReport {
        used_bytes: stats.used_bytes,
        budget_bytes: stats.budget_bytes,
        pinned_bytes: stats.pinned_bytes,
        blobs: stats.blobs,
        complete_blobs: stats.complete_blobs,
        chunks: stats.chunks,
        hits: stats.hits,
        misses: stats.misses,
        evicted_chunks: stats.evicted_chunks,
        evicted_bytes: stats.evicted_bytes,
        rotted_chunks: stats.rotted_chunks,
        bytes_from_peers: totals.bytes_from_same_site_peers + totals.bytes_from_other_site_peers,
        totals,
    })
}

/// `POST /v1/cache/verify`; no blob verifies them all.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyOrder {
    pub blob: Option<String>,
}

async fn cache_verify(
    ConnectInfo(caller): ConnectInfo<AdminCaller>,
    State(state): State<Arc<NodeState>>,
    Json(order): Json<VerifyOrder>,
) -> Response {
    let target = order.blob.clone().unwrap_or_else(|| "*".into());
    let response = verify_cache(&state, order).await;
    caller.audited(&state, "cache-verify", &target, response)
}

async fn verify_cache(state: &NodeState, order: VerifyOrder) -> Response {
    let ids = match order.blob.as_deref().map(parse_blob).transpose() {
        Ok(ids) => ids.map(|id| vec![id]),
        Err(refusal) => return refusal.into_response(),
    };
    let cache = state.cache.clone();
    match blocking(move || cache.verify(ids.as_deref())).await {
        Ok(report) => {
            if !report.rotted.is_empty() {
                // Dropped chunks change what this node can serve.
                state.holdings_changed.notify_one();
            }
            Json(report).into_response()
        }
        Err(refusal) => refusal.into_response(),
    }
}

/// `POST /v1/cache/evict`, `/v1/cache/pin` and `/v1/cache/unpin`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlobOrder {
    pub blob: String,
    /// The pin reason (pin and unpin); [`OPERATOR_PIN`] when left out.
    #[serde(default)]
    pub reason: Option<String>,
}

/// The pin reason of `pkgmesh cache pin` without `--reason`.
pub const OPERATOR_PIN: &str = "operator";

/// The answer to evict.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evicted {
    pub blob: String,
    pub freed_bytes: u64,
}

/// The answer to pin and unpin: the blob's pins afterwards.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pins {
    pub blob: String,
    pub pins: Vec<String>,
}

async fn cache_evict(
    ConnectInfo(caller): ConnectInfo<AdminCaller>,
    State(state): State<Arc<NodeState>>,
    Json(order): Json<BlobOrder>,
) -> Response {
    let target = order.blob.clone();
    let response = evict_blob(&state, order).await;
    caller.audited(&state, "cache-evict", &target, response)
}

async fn evict_blob(state: &NodeState, order: BlobOrder) -> Response {
    let blob = match parse_blob(&order.blob) {
        Ok(blob) => blob,
        Err(refusal) => return refusal.into_response(),
    };
    if state.transfers.follow(&blob).is_some() {
        return api_error(
            StatusCode::CONFLICT,
            format!("blob {blob} is being downloaded: evict it once `pkgmesh transfers` no longer lists it"),
        );
    }
    let cache = state.cache.clone();
    match blocking(move || cache.evict_blob(&blob)).await {
        Ok(freed_bytes) => {
            state.holdings_changed.notify_one();
            Json(Evicted {
                blob: blob.to_hex(),
                freed_bytes,
            })
            .into_response()
        }
        Err(refusal) => refusal.into_response(),
    }
}

/// The reason of a pin or unpin order, refusing the one the downloader owns.
fn pin_reason(order: &BlobOrder) -> Result<String, Refusal> {
    let reason = order.reason.clone().unwrap_or_else(|| OPERATOR_PIN.into());
    if reason == FETCH_PIN {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("the pin {FETCH_PIN:?} belongs to downloads: it goes when the download ends"),
        ));
    }
    Ok(reason)
}

fn pins_of(state: &NodeState, blob: &BlobId) -> Vec<String> {
    state
        .cache
        .list()
        .into_iter()
        .find(|b| b.id == *blob)
        .map(|b| b.pins)
        .unwrap_or_default()
}

async fn cache_pin(
    ConnectInfo(caller): ConnectInfo<AdminCaller>,
    State(state): State<Arc<NodeState>>,
    Json(order): Json<BlobOrder>,
) -> Response {
    let target = pin_target(&order);
    let response = pin_blob(&state, order).await;
    caller.audited(&state, "cache-pin", &target, response)
}

/// `BLOB (reason)`, as audit records name a pin.
fn pin_target(order: &BlobOrder) -> String {
    let reason = order.reason.as_deref().unwrap_or(OPERATOR_PIN);
    format!("{} ({reason})", order.blob)
}

async fn pin_blob(state: &NodeState, order: BlobOrder) -> Response {
    let (blob, reason) = match (parse_blob(&order.blob), pin_reason(&order)) {
        (Ok(blob), Ok(reason)) => (blob, reason),
        (Err(refusal), _) | (_, Err(refusal)) => return refusal.into_response(),
    };
    let cache = state.cache.clone();
    match blocking(move || cache.pin(&blob, &reason)).await {
        Ok(()) => Json(Pins {
            blob: blob.to_hex(),
            pins: pins_of(state, &blob),
        })
        .into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

async fn cache_unpin(
    ConnectInfo(caller): ConnectInfo<AdminCaller>,
    State(state): State<Arc<NodeState>>,
    Json(order): Json<BlobOrder>,
) -> Response {
    let target = pin_target(&order);
    let response = unpin_blob(&state, order).await;
    caller.audited(&state, "cache-unpin", &target, response)
}

async fn unpin_blob(state: &NodeState, order: BlobOrder) -> Response {
    let (blob, reason) = match (parse_blob(&order.blob), pin_reason(&order)) {
        (Ok(blob), Ok(reason)) => (blob, reason),
        (Err(refusal), _) | (_, Err(refusal)) => return refusal.into_response(),
    };
    if !state.cache.list().iter().any(|b| b.id == blob) {
        return cache_error(pkgmesh_cache::CacheError::Unregistered { id: blob }).into_response();
    }
    let cache = state.cache.clone();
    let unpinned = {
        let reason = reason.clone();
        blocking(move || cache.unpin(&blob, &reason)).await
    };
    match unpinned {
        Ok(true) => Json(Pins {
            blob: blob.to_hex(),
            pins: pins_of(state, &blob),
        })
        .into_response(),
        Ok(false) => {
            let pins = pins_of(state, &blob);
            let held = if pins.is_empty() {
                "it has no pins".to_string()
            } else {
                format!("its pins: {} (name one with --reason)", pins.join(", "))
            };
            api_error(
                StatusCode::NOT_FOUND,
                format!("blob {blob} has no pin {reason:?}; {held}"),
            )
        }
        Err(refusal) => refusal.into_response(),
    }
}

/// One peer of `GET /v1/peers`: known from the tracker, or met in a transfer, or both.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerEntry {
    /// Its site and address as last heard from the tracker.
    pub site: Option<String>,
    pub listen: Option<String>,
    #[serde(flatten)]
    pub record: PeerRecord,
}

async fn peers(State(state): State<Arc<NodeState>>) -> Json<Vec<PeerEntry>> {
    let known: std::collections::HashMap<String, crate::peer::KnownPeer> =
        state.known_peers().into_iter().collect();
    let mut entries: std::collections::BTreeMap<String, PeerEntry> = state
        .stats
        .peers()
        .into_iter()
        .map(|record| {
            (
                record.node.clone(),
                PeerEntry {
                    site: None,
                    listen: None,
                    record,
                },
            )
        })
        .collect();
    for (name, peer) in &known {
        let entry = entries.entry(name.clone()).or_insert_with(|| PeerEntry {
            site: None,
            listen: None,
            record: PeerRecord {
                node: name.clone(),
                ..PeerRecord::default()
            },
        });
        entry.site = Some(peer.site.clone());
        entry.listen = Some(peer.listen.to_string());
        if entry.record.same_site.is_none() {
            entry.record.same_site = Some(peer.site == state.settings.site);
        }
    }
    Json(entries.into_values().collect())
}

/// `GET /v1/installed/{name}/log`: a package's record and the output of every script its last
/// operation ran (the end of each log, [`LOG_TAIL_BYTES`] at most).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstallLog {
    pub record: crate::install::InstallRecord,
    pub actions: Vec<ActionLog>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActionLog {
    pub action: crate::install::Action,
    pub version: String,
    pub status: crate::install::ScriptStatus,
    pub finished_at: u64,
    pub log_path: Option<PathBuf>,
    /// The end of the script's output; `None` when there is no log to read.
    pub log: Option<String>,
    /// Why the log could not be read, when it could not.
    pub log_error: Option<String>,
}

/// Most bytes of each script log sent.
pub const LOG_TAIL_BYTES: u64 = 64 * 1024;

async fn install_log(
    State(state): State<Arc<NodeState>>,
    UrlPath(name): UrlPath<String>,
) -> Response {
    let installer = match state.installer() {
        Ok(installer) => installer,
        Err(e) => return api_error(StatusCode::CONFLICT, format!("{e:#}")),
    };
    let read = tokio::task::spawn_blocking(move || -> Result<Option<InstallLog>, String> {
        let Some(record) = installer.record(&name).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let actions = record
            .actions
            .iter()
            .map(|action| {
                let (log, log_error) = match &action.log {
                    Some(path) => match crate::install::read_log_tail(path, LOG_TAIL_BYTES) {
                        Ok(text) => (Some(text), None),
                        Err(e) => (None, Some(format!("cannot read {}: {e}", path.display()))),
                    },
                    None => (None, None),
                };
                ActionLog {
                    action: action.action,
                    version: action.version.clone(),
                    status: action.status.clone(),
                    finished_at: action.finished_at,
                    log_path: action.log.clone(),
                    log,
                    log_error,
                }
            })
            .collect();
        Ok(Some(InstallLog { record, actions }))
    })
    .await;
    match read {
        Ok(Ok(Some(log))) => Json(log).into_response(),
        Ok(Ok(None)) => api_error(
            StatusCode::NOT_FOUND,
            "this node has no install record of that package (see `pkgmesh installed`)",
        ),
        Ok(Err(e)) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn metrics(State(state): State<Arc<NodeState>>) -> Response {
    crate::metrics::metrics_response(crate::metrics::render_node(&state).await)
}
