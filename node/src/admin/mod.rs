//! The node's admin API: HTTP/JSON on a Unix socket in the node's data dir, so commands on the
//! node's own machine need no certificate. The socket is created 0600 and every connection's
//! peer credentials are checked as well: only the node's own user (or root) is served.
//!
//! Owns: the routes, their JSON shapes ([`FetchEvent`], [`NodeStatus`]) and the socket's
//! life. Does not own: what the routes do (the node's [`crate::peer`] functions) or printing
//! (the CLI, through [`client::AdminClient`]).

pub mod client;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use pkgmesh_protocol::blob::BlobId;
use pkgmesh_protocol::select::Platform;
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use crate::peer::agent::{fetch_and_install, summarize, InstallEvent, InstallOrder};
use crate::peer::fetch::start_fetch;
use crate::peer::package::{node_platform, resolve_package, PackageFile};
use crate::peer::transfers::{TransferState, TransferStatus};
use crate::peer::NodeState;

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
        .with_state(state);
    let listener = OwnerOnly {
        inner: listener,
        owner,
    };
    let task = tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router).await {
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

impl axum::serve::Listener for OwnerOnly {
    type Io = UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => match stream.peer_cred() {
                    Ok(cred) if cred.uid() == self.owner || cred.uid() == 0 => {
                        return (stream, addr)
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
        self.inner.local_addr()
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

async fn fetch(State(state): State<Arc<NodeState>>, Json(request): Json<FetchRequest>) -> Response {
    let (events, receiver) = mpsc::channel::<FetchEvent>(8);
    tokio::spawn(async move {
        if let Err(error) = run_fetch(&state, request, &events).await {
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
async fn install(State(state): State<Arc<NodeState>>, Json(order): Json<InstallOrder>) -> Response {
    let (events, receiver) = mpsc::unbounded_channel::<InstallEvent>();
    tokio::spawn(async move {
        let sink = events.clone();
        let result = fetch_and_install(&state, order, move |event| {
            let _ = sink.send(event);
        })
        .await;
        let last = match result {
            Ok(summary) => InstallEvent::Done(summary),
            Err(error) => InstallEvent::Failed {
                message: format!("{error:#}"),
            },
        };
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
    State(state): State<Arc<NodeState>>,
    Json(order): Json<UninstallOrder>,
) -> Response {
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
