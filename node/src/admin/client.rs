//! A client of a node's admin API over its Unix socket (HTTP/1.1, one connection per call).
//!
//! Owns: connecting with timeouts, turning error answers into messages that say what to do,
//! and reading streamed answers line by line or piece by piece. Does not own: printing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

use super::ApiError;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Until the answer's head arrives.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Between two pieces of a streamed answer; the node sends a fetch heartbeat every second.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest line of a streamed JSON answer.
const MAX_LINE: usize = 1 << 20;
/// Largest JSON answer read whole.
const MAX_JSON: usize = 64 << 20;

#[derive(Debug, Clone)]
pub struct AdminClient {
    socket: PathBuf,
}

impl AdminClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        AdminClient {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<hyper::Response<Incoming>> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(&self.socket))
            .await
            .map_err(|_| anyhow!("the node's admin socket {} did not answer", self.socket.display()))?
            .with_context(|| {
                format!(
                    "cannot reach the node's admin socket {} (is `pkgmesh node` running with this data dir, as this user?)",
                    self.socket.display()
                )
            })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("admin API handshake")?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "admin connection ended");
            }
        });
        let has_body = body.is_some();
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "pkgmesh-node");
        if has_body {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .context("building an admin request")?;
        let response = tokio::time::timeout(RESPONSE_TIMEOUT, sender.send_request(request))
            .await
            .map_err(|_| anyhow!("the node did not answer {path} in time"))?
            .with_context(|| format!("admin request {path}"))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = read_limited(response.into_body(), MAX_LINE).await?;
        let message = serde_json::from_slice::<ApiError>(&body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
        Err(AdminError { status, message }.into())
    }

    /// `GET path`, answered with JSON.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let response = self.send(Method::GET, path, None).await?;
        let body = read_limited(response.into_body(), MAX_JSON).await?;
        serde_json::from_slice(&body).with_context(|| format!("the node's answer to {path}"))
    }

    /// `GET path` answered with text, such as `/metrics`.
    pub async fn get_text(&self, path: &str) -> anyhow::Result<String> {
        let response = self.send(Method::GET, path, None).await?;
        let body = read_limited(response.into_body(), MAX_JSON).await?;
        String::from_utf8(body).with_context(|| format!("the node's answer to {path} is not text"))
    }

    /// `POST path` with a JSON body, answered with JSON.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let response = self
            .send(Method::POST, path, Some(serde_json::to_vec(body)?))
            .await?;
        let body = read_limited(response.into_body(), MAX_JSON).await?;
        serde_json::from_slice(&body).with_context(|| format!("the node's answer to {path}"))
    }

    /// `POST path` answered with newline-delimited JSON: `on_line` gets each line as it comes.
    pub async fn post_lines<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        mut on_line: impl FnMut(T) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let response = self
            .send(Method::POST, path, Some(serde_json::to_vec(body)?))
            .await?;
        let mut body = response.into_body();
        let mut pending: Vec<u8> = Vec::new();
        while let Some(piece) = next_piece(&mut body).await? {
            pending.extend_from_slice(&piece);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let value = serde_json::from_slice(&line[..line.len() - 1])
                    .with_context(|| format!("a line of the node's answer to {path}"))?;
                on_line(value)?;
            }
            if pending.len() > MAX_LINE {
                bail!("the node sent a line over {MAX_LINE} bytes");
            }
        }
        Ok(())
    }

    /// `GET path` answered with raw bytes: `on_piece` gets each piece as it comes. Returns the
    /// length the node announced, if it did.
    pub async fn get_bytes(
        &self,
        path: &str,
        mut on_piece: impl FnMut(&[u8]) -> anyhow::Result<()>,
    ) -> anyhow::Result<Option<u64>> {
        let response = self.send(Method::GET, path, None).await?;
        let length = response
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let mut body = response.into_body();
        while let Some(piece) = next_piece(&mut body).await? {
            on_piece(&piece)?;
        }
        Ok(length)
    }
}

/// An error answer of the admin API.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct AdminError {
    pub status: StatusCode,
    pub message: String,
}

async fn next_piece(body: &mut Incoming) -> anyhow::Result<Option<Bytes>> {
    loop {
        let frame = tokio::time::timeout(IDLE_TIMEOUT, body.frame())
            .await
            .map_err(|_| anyhow!("the node went quiet for {} s", IDLE_TIMEOUT.as_secs()))?;
        match frame {
            None => return Ok(None),
            Some(Err(error)) => return Err(anyhow!("the node's answer broke off: {error}")),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    if !data.is_empty() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }
}

async fn read_limited(mut body: Incoming, limit: usize) -> anyhow::Result<Vec<u8>> {
    let mut all = Vec::new();
    while let Some(piece) = next_piece(&mut body).await? {
        if all.len() + piece.len() > limit {
            bail!("the node's answer is over {limit} bytes");
        }
        all.extend_from_slice(&piece);
    }
    Ok(all)
}
