//! The seed's origin store: where published ZIPs live.
//!
//! Owns: opening an origin from a URL (`file:///abs/dir`, `s3://bucket[/prefix]`,
//! `http(s)://host/prefix`, the last read-only), key validation, range reads, streaming uploads
//! that become visible only once complete, deletes, and a cap on requests in flight so the seed
//! never floods the origin.
//!
//! Does not own: which chunk to read when (origin admission), caching what was read (the seed
//! puts chunks it read into `pkgmesh-cache` so the origin is read once), verifying bytes (the
//! caller checks every chunk against the blob id), or the catalog.
//!
//! Everything goes through `object_store`. Its TLS client uses the process-wide rustls
//! provider; opening a network origin installs ring as that provider if nobody has yet, since the
//! design keeps one provider (ring) for the whole process.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use object_store::aws::AmazonS3Builder;
use object_store::http::HttpBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
    WriteMultipart,
};
use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// Default cap on requests in flight towards one origin.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 16;

/// Upper bound for `max_in_flight`: far above any sane origin budget, and it keeps the
/// semaphore well inside tokio's permit limit.
const MAX_IN_FLIGHT_LIMIT: usize = 65_536;

/// Size of one multipart part. S3 wants at least 5 MiB per part (but the last) and at most
/// 10,000 parts, so 8 MiB parts allow objects up to 80 GB; files up to this size go up in one
/// atomic PUT instead.
pub const PART_SIZE: usize = 8 * 1024 * 1024;

/// Parts uploaded at once (fewer if the origin's cap is lower). With the part being read, memory
/// for an upload stays below `(PARTS_IN_FLIGHT + 2) * PART_SIZE` whatever the file size.
const PARTS_IN_FLIGHT: usize = 2;

/// Longest key accepted (S3's own limit is 1,024 bytes).
const MAX_KEY_LEN: usize = 1024;

/// Settings for network origins. Comes from the seed's TOML config; every value left out falls
/// back to the usual `AWS_*` environment variables (`AWS_ENDPOINT`, `AWS_DEFAULT_REGION`,
/// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_ALLOW_HTTP`, ...) and
/// then to the instance's role credentials.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct OriginOptions {
    /// S3 endpoint, e.g. `http://127.0.0.1:9000` for MinIO or moto; AWS when unset.
    pub s3_endpoint: Option<String>,
    /// S3 region (`us-east-1` when neither this nor the environment sets one).
    pub s3_region: Option<String>,
    pub s3_access_key_id: Option<String>,
    pub s3_secret_access_key: Option<String>,
    /// Permit plain `http://` (an S3 endpoint or an HTTP origin). Off by default: the bytes are
    /// verified by hash anyway, but package contents are not meant to cross networks in clear
    /// unless the operator says so.
    pub allow_http: bool,
    /// Requests in flight towards the origin at most ([`DEFAULT_MAX_IN_FLIGHT`] when unset).
    pub max_in_flight: Option<usize>,
}

// Hand-written so the secret key never reaches a log line.
impl fmt::Debug for OriginOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OriginOptions")
            .field("s3_endpoint", &self.s3_endpoint)
            .field("s3_region", &self.s3_region)
            .field("s3_access_key_id", &self.s3_access_key_id)
            .field(
                "s3_secret_access_key",
                &self.s3_secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field("allow_http", &self.allow_http)
            .field("max_in_flight", &self.max_in_flight)
            .finish()
    }
}

/// Why an origin operation failed. Every message names the origin URL and, where there is one,
/// the key.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error("origin {origin}: no object at key {key:?}")]
    NotFound { origin: String, key: String },
    #[error("origin {origin} is read-only: cannot {op} key {key:?}")]
    ReadOnly {
        origin: String,
        key: String,
        op: &'static str,
    },
    #[error("bad origin URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("origin {origin}: invalid key {key:?}: {reason}")]
    BadKey {
        origin: String,
        key: String,
        reason: String,
    },
    #[error("origin {origin}: key {key:?}: local file {}: {source}", path.display())]
    Io {
        origin: String,
        key: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("origin {origin}: key {key:?}: {message}")]
    Backend {
        origin: String,
        key: String,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Local,
    S3,
    Http,
}

/// An origin store. Cheap to clone: clones share the store and the in-flight cap.
#[derive(Clone)]
pub struct Origin {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    backend: Backend,
    store: Arc<dyn ObjectStore>,
    /// Prefix inside the bucket (S3 only; `file://` and `http(s)://` carry it in their root).
    prefix: Option<String>,
    /// One permit per request in flight towards the origin.
    permits: Semaphore,
    max_in_flight: usize,
}

impl fmt::Debug for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Origin")
            .field("url", &self.inner.url)
            .field("backend", &self.inner.backend)
            .finish_non_exhaustive()
    }
}

const SUPPORTED: &str =
    "expected file:///absolute/dir, s3://bucket[/prefix] or http(s)://host[/prefix]";

impl Origin {
    /// Opens the origin named by `url`. Nothing is contacted yet: a wrong bucket or an
    /// unreachable host shows up on the first request.
    pub fn from_url(url: &str, options: &OriginOptions) -> Result<Origin, OriginError> {
        let bad = |reason: String| OriginError::BadUrl {
            url: url.to_string(),
            reason,
        };
        let max_in_flight = options.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT);
        if !(1..=MAX_IN_FLIGHT_LIMIT).contains(&max_in_flight) {
            return Err(bad(format!(
                "max_in_flight must be between 1 and {MAX_IN_FLIGHT_LIMIT}, not {max_in_flight}"
            )));
        }
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(bad(SUPPORTED.into()));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "file" => {
                // `file:///abs` → `/abs`; a host part (`file://host/x`) or relative path is refused.
                if !rest.starts_with('/') {
                    return Err(bad(format!("file URLs need an absolute path; {SUPPORTED}")));
                }
                if rest.contains(['%', '?', '#']) {
                    return Err(bad(
                        "percent-encoding, queries and fragments are not supported in file URLs"
                            .into(),
                    ));
                }
                Self::local_with(Path::new(rest), max_in_flight).map_err(|e| match e {
                    OriginError::Io { path, source, .. } => {
                        bad(format!("cannot create {}: {source}", path.display()))
                    }
                    other => other,
                })
            }
            "s3" => Self::s3(url, rest, options, max_in_flight),
            "http" | "https" => Self::http(url, scheme, options, max_in_flight),
            other => Err(bad(format!("unsupported scheme {other:?}; {SUPPORTED}"))),
        }
    }

    /// A local-directory origin (the seed's embedded default). Creates the directory.
    pub fn local(dir: &Path) -> Result<Origin, OriginError> {
        Self::local_with(dir, DEFAULT_MAX_IN_FLIGHT)
    }

    fn local_with(dir: &Path, max_in_flight: usize) -> Result<Origin, OriginError> {
        let shown = format!("file://{}", dir.display());
        let io_err = |source| OriginError::Io {
            origin: shown.clone(),
            key: String::new(),
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io_err)?;
        let dir = std::fs::canonicalize(dir).map_err(io_err)?;
        let url = format!("file://{}", dir.display());
        // fsync makes a completed upload survive a crash (invariant 5); uploads are staged next
        // to their destination and renamed into place, so a reader never sees half a ZIP.
        let store = LocalFileSystem::new_with_prefix(&dir)
            .map_err(|e| OriginError::Backend {
                origin: url.clone(),
                key: String::new(),
                message: e.to_string(),
            })?
            .with_fsync(true);
        Ok(Self::build(
            url,
            Backend::Local,
            Arc::new(store),
            None,
            max_in_flight,
        ))
    }

    fn s3(
        url: &str,
        rest: &str,
        options: &OriginOptions,
        max_in_flight: usize,
    ) -> Result<Origin, OriginError> {
        let bad = |reason: String| OriginError::BadUrl {
            url: url.to_string(),
            reason,
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        if !bucket_ok {
            return Err(bad(format!(
                "bucket name {bucket:?} is not a valid S3 bucket name (3-63 of a-z 0-9 . -)"
            )));
        }
        let prefix = prefix.trim_matches('/');
        let prefix = if prefix.is_empty() {
            None
        } else {
            check_key(prefix).map_err(|reason| bad(format!("prefix {prefix:?}: {reason}")))?;
            Some(prefix.to_string())
        };
        ensure_crypto_provider();
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_retry(retry_config());
        if let Some(endpoint) = &options.s3_endpoint {
            if endpoint.starts_with("http://") && !options.allow_http {
                return Err(bad(format!(
                    "endpoint {endpoint} is plain http; set allow_http = true to permit it"
                )));
            }
            // Custom endpoints (MinIO, moto, Ceph) address buckets by path, not by host name.
            builder = builder
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(false);
        }
        if let Some(region) = &options.s3_region {
            builder = builder.with_region(region);
        }
        if let Some(key_id) = &options.s3_access_key_id {
            builder = builder.with_access_key_id(key_id);
        }
        if let Some(secret) = &options.s3_secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        if options.allow_http {
            builder = builder.with_allow_http(true);
        }
        let store = builder.build().map_err(|e| bad(e.to_string()))?;
        let shown = match &prefix {
            Some(p) => format!("s3://{bucket}/{p}"),
            None => format!("s3://{bucket}"),
        };
        Ok(Self::build(
            shown,
            Backend::S3,
            Arc::new(store),
            prefix,
            max_in_flight,
        ))
    }

    fn http(
        url: &str,
        scheme: &str,
        options: &OriginOptions,
        max_in_flight: usize,
    ) -> Result<Origin, OriginError> {
        let bad = |reason: String| OriginError::BadUrl {
            url: url.to_string(),
            reason,
        };
        if scheme.eq_ignore_ascii_case("http") && !options.allow_http {
            return Err(bad(
                "plain http origin; set allow_http = true to permit it".into()
            ));
        }
        if url.contains(['?', '#']) {
            return Err(bad("queries and fragments are not supported".into()));
        }
        // object_store appends keys as path segments; a trailing slash would give `prefix//key`.
        let base = url.trim_end_matches('/').to_string();
        ensure_crypto_provider();
        let client = ClientOptions::new().with_allow_http(options.allow_http);
        let store = HttpBuilder::new()
            .with_url(&base)
            .with_client_options(client)
            .with_retry(retry_config())
            .build()
            .map_err(|e| bad(e.to_string()))?;
        Ok(Self::build(
            base,
            Backend::Http,
            Arc::new(store),
            None,
            max_in_flight,
        ))
    }

    fn build(
        url: String,
        backend: Backend,
        store: Arc<dyn ObjectStore>,
        prefix: Option<String>,
        max_in_flight: usize,
    ) -> Origin {
        debug!(%url, ?backend, max_in_flight, "origin opened");
        Origin {
            inner: Arc::new(Inner {
                url,
                backend,
                store,
                prefix,
                permits: Semaphore::new(max_in_flight),
                max_in_flight,
            }),
        }
    }

    /// The origin's URL as opened (a local directory in canonical form).
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// HTTP(S) origins are read-only: uploads and deletes are refused without a request.
    pub fn is_read_only(&self) -> bool {
        self.inner.backend == Backend::Http
    }

    /// Size in bytes of the object at `key`.
    pub async fn size(&self, key: &str) -> Result<u64, OriginError> {
        let location = self.location(key)?;
        let _permit = self.permit(key, 1).await?;
        let meta = self
            .inner
            .store
            .head(&location)
            .await
            .map_err(|e| self.map_err(key, e))?;
        Ok(meta.size)
    }

    /// Bytes `range` of the object at `key`. The seed reads one chunk at a time through this and
    /// never a whole ZIP. A range reaching past the end of the object is an error, not a short
    /// read, so a caller never mistakes a truncated chunk for a whole one.
    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, OriginError> {
        let location = self.location(key)?;
        if range.start > range.end {
            return Err(self.backend_err(key, format!("invalid range {range:?}")));
        }
        if range.start == range.end {
            return Ok(Bytes::new());
        }
        let _permit = self.permit(key, 1).await?;
        let bytes = self
            .inner
            .store
            .get_range(&location, range.clone())
            .await
            .map_err(|e| self.map_err(key, e))?;
        let wanted = range.end - range.start;
        if bytes.len() as u64 != wanted {
            return Err(self.backend_err(
                key,
                format!(
                    "asked for bytes {}..{} ({wanted} bytes), got {}",
                    range.start,
                    range.end,
                    bytes.len()
                ),
            ));
        }
        Ok(bytes)
    }

    /// Uploads the local file at `path` to `key`, streaming it in constant memory. The object
    /// becomes visible only once complete: one PUT for small files, a multipart upload (visible
    /// on completion) for larger ones; a local origin stages the file next to its destination
    /// and renames it into place. Replaces an existing object.
    pub async fn put_file(&self, key: &str, path: &Path) -> Result<(), OriginError> {
        let location = self.location(key)?;
        if self.is_read_only() {
            return Err(self.read_only(key, "upload"));
        }
        let io_err = |source| OriginError::Io {
            origin: self.inner.url.clone(),
            key: key.to_string(),
            path: path.to_path_buf(),
            source,
        };
        let mut file = tokio::fs::File::open(path).await.map_err(io_err)?;
        let len = file.metadata().await.map_err(io_err)?.len();
        debug!(origin = %self.inner.url, key, len, "upload starts");

        if len <= PART_SIZE as u64 {
            let _permit = self.permit(key, 1).await?;
            let first = read_part(&mut file).await.map_err(io_err)?;
            if first.len() as u64 != len {
                return Err(io_err(changed_while_reading(len, first.len() as u64)));
            }
            self.inner
                .store
                .put(&location, PutPayload::from(first))
                .await
                .map_err(|e| self.map_err(key, e))?;
            debug!(origin = %self.inner.url, key, len, "upload done (single put)");
            return Ok(());
        }

        // Parts go up concurrently; each one in flight holds a permit of the origin's cap.
        let parallel = PARTS_IN_FLIGHT.min(self.inner.max_in_flight);
        let _permits = self.permit(key, parallel).await?;
        let upload = self
            .inner
            .store
            .put_multipart(&location)
            .await
            .map_err(|e| self.map_err(key, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut sent: u64 = 0;
        let outcome: Result<(), OriginError> = async {
            loop {
                let part = read_part(&mut file).await.map_err(io_err)?;
                if part.is_empty() {
                    break;
                }
                sent += part.len() as u64;
                if sent > len {
                    return Err(io_err(changed_while_reading(len, sent)));
                }
                // Back pressure: at most `parallel` parts uploading, so memory stays bounded.
                writer
                    .wait_for_capacity(parallel)
                    .await
                    .map_err(|e| self.map_err(key, e))?;
                writer.put(part);
            }
            if sent != len {
                return Err(io_err(changed_while_reading(len, sent)));
            }
            Ok(())
        }
        .await;
        match outcome {
            Ok(()) => {
                writer.finish().await.map_err(|e| self.map_err(key, e))?;
                debug!(origin = %self.inner.url, key, len, "upload done (multipart)");
                Ok(())
            }
            Err(e) => {
                // Abort so the store drops the parts; nothing becomes visible at `key`.
                if let Err(abort) = writer.abort().await {
                    warn!(origin = %self.inner.url, key, error = %abort, "aborting upload failed");
                }
                Err(e)
            }
        }
    }

    /// Deletes the object at `key`. Deleting a missing object succeeds (S3 semantics, and it
    /// makes a retried delete harmless).
    pub async fn delete(&self, key: &str) -> Result<(), OriginError> {
        let location = self.location(key)?;
        if self.is_read_only() {
            return Err(self.read_only(key, "delete"));
        }
        let _permit = self.permit(key, 1).await?;
        match self.inner.store.delete(&location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.map_err(key, e)),
        }
    }

    /// Whether an object exists at `key`.
    pub async fn exists(&self, key: &str) -> Result<bool, OriginError> {
        match self.size(key).await {
            Ok(_) => Ok(true),
            Err(OriginError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn location(&self, key: &str) -> Result<StorePath, OriginError> {
        let bad = |reason: String| OriginError::BadKey {
            origin: self.inner.url.clone(),
            key: key.to_string(),
            reason,
        };
        check_key(key).map_err(bad)?;
        let full = match &self.inner.prefix {
            Some(prefix) => format!("{prefix}/{key}"),
            None => key.to_string(),
        };
        StorePath::parse(&full).map_err(|e| bad(e.to_string()))
    }

    async fn permit(
        &self,
        key: &str,
        n: usize,
    ) -> Result<tokio::sync::SemaphorePermit<'_>, OriginError> {
        // `n` never exceeds max_in_flight (a u32-sized setting in practice); the semaphore is
        // never closed, so an error here would be a bug, reported rather than panicking.
        let n = u32::try_from(n.min(self.inner.max_in_flight)).unwrap_or(u32::MAX);
        self.inner
            .permits
            .acquire_many(n)
            .await
            .map_err(|e| self.backend_err(key, format!("request limiter: {e}")))
    }

    fn map_err(&self, key: &str, e: object_store::Error) -> OriginError {
        match e {
            object_store::Error::NotFound { .. } => OriginError::NotFound {
                origin: self.inner.url.clone(),
                key: key.to_string(),
            },
            other => self.backend_err(key, other.to_string()),
        }
    }

    fn backend_err(&self, key: &str, message: String) -> OriginError {
        OriginError::Backend {
            origin: self.inner.url.clone(),
            key: key.to_string(),
            message,
        }
    }

    fn read_only(&self, key: &str, op: &'static str) -> OriginError {
        OriginError::ReadOnly {
            origin: self.inner.url.clone(),
            key: key.to_string(),
            op,
        }
    }
}

/// Checks a key: a relative `/`-separated path with no empty, `.` or `..` segment, no
/// backslash, no control character and no `#` (the local backend names its staged uploads
/// `KEY#N`, so a key with `#` could collide with one).
fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("empty key".into());
    }
    if key.len() > MAX_KEY_LEN {
        return Err(format!("longer than {MAX_KEY_LEN} bytes"));
    }
    if key.starts_with('/') {
        return Err("keys are relative: no leading '/'".into());
    }
    if let Some(c) = key
        .chars()
        .find(|c| c.is_control() || *c == '\\' || *c == '#')
    {
        return Err(format!("character {c:?} is not allowed"));
    }
    for segment in key.split('/') {
        match segment {
            "" => return Err("empty path segment (leading, trailing or double '/')".into()),
            "." | ".." => return Err(format!("'{segment}' segments are not allowed")),
            _ => {}
        }
    }
    Ok(())
}

/// Reads up to one part from `file`, fewer only at the end of the file.
async fn read_part(file: &mut tokio::fs::File) -> std::io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(PART_SIZE);
    while buf.len() < PART_SIZE {
        // `read_buf` never reads past the spare capacity, so the part stays at PART_SIZE.
        if file.read_buf(&mut buf).await? == 0 {
            break;
        }
    }
    Ok(buf.freeze())
}

fn changed_while_reading(expected: u64, got: u64) -> std::io::Error {
    std::io::Error::other(format!(
        "file changed while uploading: it was {expected} bytes, read {got}"
    ))
}

/// Bounded retries: a failing origin should surface within seconds so the seed can tell nodes
/// to use peers, rather than after object_store's default three minutes.
fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: 3,
        retry_timeout: Duration::from_secs(30),
    }
}

fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another installer is fine: some provider is then installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}
