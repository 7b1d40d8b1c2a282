//! A client of the seed, for the CLI and for nodes: one mutual-TLS QUIC connection, one request
//! per stream, the seed's error replies turned into errors that say what the seed said.
//!
//! Owns: connecting with an identity, request/response calls, and the publisher's side of
//! publishing (local checks, then streaming the ZIPs). Does not own: printing or progress bars
//! (callers get a progress callback).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use pkgmesh_protocol::blob::hash_reader_with;
use pkgmesh_protocol::manifest::{parse_manifest, MAX_MANIFEST_BYTES};
use pkgmesh_protocol::names::validate_package_name;
use pkgmesh_protocol::wire::{
    ErrorCode, PublishFile, PublishOutcome, PublishRequest, Request, Response,
};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::pki::{Identity, Role};
use crate::transport::{self, PeerConnection};
use crate::ziplayout::{check_zip_layout, ZipLimits};

/// Dialling and handshaking with the seed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// One request and its response frame.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The seed's answer after the last upload byte: it checks every ZIP and writes the origin.
pub const PUBLISH_FINISH_TIMEOUT: Duration = Duration::from_secs(600);

/// An error reply from the other side, kept typed so callers can tell "not found" from others.
#[derive(Debug, thiserror::Error)]
#[error("{what} answered {code:?}: {message}")]
pub struct Refused {
    pub what: &'static str,
    pub code: ErrorCode,
    pub message: String,
}

pub struct SeedClient {
    endpoint: quinn::Endpoint,
    /// A client that made its own endpoint closes it; one riding a node's endpoint does not.
    owns_endpoint: bool,
    conn: PeerConnection,
}

/// Progress of an upload: bytes sent so far and in all.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Send + Sync);

impl SeedClient {
    pub async fn connect(seed: SocketAddr, identity: &Identity) -> anyhow::Result<SeedClient> {
        transport::install_crypto_provider();
        let bind: SocketAddr = if seed.is_ipv6() {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = transport::make_endpoint(bind, identity)?;
        let mut client = Self::connect_on(endpoint, seed).await?;
        client.owns_endpoint = true;
        Ok(client)
    }

    /// Connects through an endpoint that already exists (a node's, which also serves).
    pub async fn connect_on(
        endpoint: quinn::Endpoint,
        seed: SocketAddr,
    ) -> anyhow::Result<SeedClient> {
        let conn = transport::connect(&endpoint, seed, Role::Seed, CONNECT_TIMEOUT)
            .await
            .with_context(|| format!("cannot reach the seed at {seed}"))?;
        Ok(SeedClient {
            endpoint,
            owns_endpoint: false,
            conn,
        })
    }

    pub fn connection(&self) -> &PeerConnection {
        &self.conn
    }

    /// One request, one response; an error reply becomes a [`Refused`] error.
    pub async fn call(&self, request: &Request) -> anyhow::Result<Response> {
        let (response, _, _) = transport::request(&self.conn, request, REQUEST_TIMEOUT).await?;
        refused_to_error(response)
    }

    /// Checks a package version locally (manifest, checksums, ZIP layout), then publishes it.
    pub async fn publish(
        &self,
        name: &str,
        manifest_path: &Path,
        zip_dir: &Path,
        progress: Progress<'_>,
    ) -> anyhow::Result<PublishOutcome> {
        validate_package_name(name)?;
        let manifest_json = read_manifest_text(manifest_path)?;
        let manifest = parse_manifest(manifest_json.as_bytes()).map_err(|errors| {
            anyhow!(
                "{} is not a valid manifest:\n{errors}",
                manifest_path.display()
            )
        })?;
        let mut files = Vec::new();
        for (file, entry) in &manifest.files {
            let path = zip_dir.join(file);
            let described = describe_zip(&path).await?;
            let expected = manifest.sha256_of(file).unwrap_or_default();
            if described.sha256 != expected {
                bail!(
                    "{} has SHA-256 {} but the manifest says {}",
                    path.display(),
                    hex::encode(described.sha256),
                    entry.checksums.sha256
                );
            }
            check_layout(&path).await?;
            files.push((path, described));
        }
        let request = Request::Publish(PublishRequest {
            name: name.into(),
            manifest_json,
            files: files
                .iter()
                .map(|(path, d)| PublishFile {
                    file: file_name(path),
                    size: d.size,
                    sha256: d.sha256,
                    blob: d.blob,
                })
                .collect(),
        });
        let (response, mut send, mut recv) =
            transport::request(&self.conn, &request, REQUEST_TIMEOUT).await?;
        let upload = match refused_to_error(response)? {
            Response::Published(outcome) => return Ok(outcome),
            Response::PublishReady { upload } => upload,
            other => bail!("the seed answered publish with {other:?}"),
        };
        let total: u64 = files
            .iter()
            .filter(|(path, _)| upload.contains(&file_name(path)))
            .map(|(_, d)| d.size)
            .sum();
        let mut sent = 0u64;
        progress(0, total);
        for wanted in &upload {
            let Some((path, described)) = files.iter().find(|(p, _)| &file_name(p) == wanted)
            else {
                bail!("the seed asked for {wanted:?}, which this publish does not have");
            };
            let mut file = tokio::fs::File::open(path)
                .await
                .with_context(|| format!("cannot open {}", path.display()))?;
            let mut remaining = described.size;
            let mut buffer = vec![0u8; 256 * 1024];
            while remaining > 0 {
                let want = remaining.min(buffer.len() as u64) as usize;
                let n = file
                    .read(&mut buffer[..want])
                    .await
                    .with_context(|| format!("reading {}", path.display()))?;
                if n == 0 {
                    bail!("{} shrank while it was being published", path.display());
                }
                send.write_all(&buffer[..n])
                    .await
                    .context("the seed stopped reading the upload")?;
                remaining -= n as u64;
                sent += n as u64;
                progress(sent, total);
            }
        }
        let _ = send.finish();
        let response = transport::read_frame::<Response>(&mut recv, PUBLISH_FINISH_TIMEOUT).await?;
        match refused_to_error(response)? {
            Response::Published(outcome) => Ok(outcome),
            other => bail!("the seed answered the upload with {other:?}"),
        }
    }

    /// Closes the connection politely and waits for the close to reach the seed.
    pub async fn close(self) {
        self.conn.connection.close(0u32.into(), b"done");
        if self.owns_endpoint {
            self.endpoint.wait_idle().await;
        }
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn refused_to_error(response: Response) -> anyhow::Result<Response> {
    match response {
        Response::Error(reply) => Err(Refused {
            what: "the seed",
            code: reply.code,
            message: reply.message,
        }
        .into()),
        other => Ok(other),
    }
}

fn read_manifest_text(path: &Path) -> anyhow::Result<String> {
    use std::io::Read;
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_MANIFEST_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() > MAX_MANIFEST_BYTES {
        bail!(
            "{} is over the {MAX_MANIFEST_BYTES}-byte manifest limit",
            path.display()
        );
    }
    String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8", path.display()))
}

struct DescribedZip {
    size: u64,
    sha256: [u8; 32],
    blob: pkgmesh_protocol::blob::BlobId,
}

/// SHA-256 and BLAKE3 identity of one ZIP, in one streaming pass.
async fn describe_zip(path: &Path) -> anyhow::Result<DescribedZip> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path)
            .with_context(|| format!("cannot open {} (named in the manifest)", path.display()))?;
        let size = file.metadata()?.len();
        let mut sha = Sha256::new();
        let hashes = hash_reader_with(file, size, |bytes| sha.update(bytes))
            .with_context(|| format!("hashing {}", path.display()))?;
        Ok(DescribedZip {
            size,
            sha256: sha.finalize().into(),
            blob: hashes.id(),
        })
    })
    .await?
}

/// The Distributor layout rules, from the ZIP's central directory.
async fn check_layout(path: &Path) -> anyhow::Result<()> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        check_zip_layout(&path, &ZipLimits::default())
            .map(|_| ())
            .with_context(|| format!("{} is not a valid Distributor package ZIP", path.display()))
    })
    .await?
}
