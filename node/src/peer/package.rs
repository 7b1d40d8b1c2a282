//! From a package name to the one ZIP this node needs: the seed's manifest, the SSM Agent's
//! selection for this node's platform, and the blob that holds the chosen file.
//!
//! Owns: that lookup, and copying a blob out of the cache while checking the SHA-256 the
//! manifest names. Does not own: the selection rules (`pkgmesh_protocol::select`) or the download
//! ([`super::fetch`]).

use std::io::Read;

use anyhow::{bail, Context};
use pkgmesh_protocol::manifest::parse_manifest;
use pkgmesh_protocol::platform::detect_platform;
use pkgmesh_protocol::select::{select, Platform};
use pkgmesh_protocol::wire::{FileBlob, Request, Response};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::NodeState;

/// The ZIP a package version needs on one platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageFile {
    pub name: String,
    pub version: String,
    pub platform: Platform,
    /// The manifest's file name, e.g. `pkg-linux-x86_64.zip`.
    pub file: String,
    pub blob: String,
    pub size: u64,
    pub sha256: String,
}

impl PackageFile {
    pub fn file_blob(&self) -> anyhow::Result<FileBlob> {
        let mut sha256 = [0u8; 32];
        hex::decode_to_slice(&self.sha256, &mut sha256)
            .with_context(|| format!("{:?} is not a SHA-256", self.sha256))?;
        Ok(FileBlob {
            file: self.file.clone(),
            blob: self.blob.parse().context("not a blob id")?,
            size: self.size,
            sha256,
        })
    }
}

/// The platform of this node: from its settings, else detected on this machine.
pub fn node_platform(state: &NodeState) -> anyhow::Result<Platform> {
    match &state.settings.platform {
        Some(platform) => Ok(platform.clone()),
        None => detect_platform().context(
            "cannot detect this machine's platform (set platform, platform_version and arch in the node's config)",
        ),
    }
}

/// Asks the seed for `name` (at `version`, or the default) and chooses the file for `platform`.
pub async fn resolve_package(
    state: &NodeState,
    name: &str,
    version: Option<&str>,
    platform: &Platform,
) -> anyhow::Result<PackageFile> {
    let seed = state.seed().await?;
    let response = seed
        .call(&Request::GetManifest {
            name: name.to_string(),
            version: version.map(String::from),
        })
        .await?;
    let Response::Manifest(reply) = response else {
        bail!("the seed answered a manifest request with {response:?}");
    };
    let manifest = parse_manifest(reply.manifest_json.as_bytes())
        .map_err(|e| anyhow::anyhow!("the seed's manifest of {name} is invalid:\n{e}"))?;
    let selection = select(&manifest, platform)?;
    let file = reply
        .files
        .iter()
        .find(|f| f.file == selection.file)
        .with_context(|| format!("the seed has no blob for {}", selection.file))?;
    Ok(PackageFile {
        name: reply.name,
        version: reply.version,
        platform: platform.clone(),
        file: selection.file,
        blob: file.blob.to_hex(),
        size: file.size,
        sha256: hex::encode(file.sha256),
    })
}

/// Writes a blob from the cache to `out` (a temporary file beside it, fsync, rename), checking
/// the SHA-256 the manifest names on the way: a mismatch leaves no file behind. Returns the
/// SHA-256 in hex.
pub fn copy_verified(
    cache: &pkgmesh_cache::ChunkStore,
    file: &FileBlob,
    out: &std::path::Path,
) -> anyhow::Result<String> {
    let mut reader = cache.open_blob(&file.blob)?;
    let mut sink = VerifiedFile::create(out, file)?;
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let n = reader.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        sink.write(&buffer[..n])?;
    }
    sink.finish()
}

/// A file written beside its final name and moved there only when its SHA-256 matches.
pub struct VerifiedFile {
    temp: std::path::PathBuf,
    out: std::path::PathBuf,
    writer: Option<std::fs::File>,
    sha: Sha256,
    written: u64,
    /// Bytes up to here have been handed to the kernel's writeback ([`WRITEBACK_EVERY`]).
    flushed: u64,
    expected: FileBlob,
}

/// A file being written starts its writeback every this many bytes (`sync_file_range`, which
/// does not wait), so the fsync before the rename finds little left to write instead of the
/// whole file (about 0.5 s for 1 GiB here).
const WRITEBACK_EVERY: u64 = 8 << 20;

impl VerifiedFile {
    pub fn create(out: &std::path::Path, expected: &FileBlob) -> anyhow::Result<Self> {
        let dir = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        let temp = dir.join(format!(
            ".pkgmesh-fetch-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let writer = std::fs::File::create(&temp)
            .with_context(|| format!("cannot write {}", temp.display()))?;
        Ok(VerifiedFile {
            temp,
            out: out.to_path_buf(),
            writer: Some(writer),
            sha: Sha256::new(),
            written: 0,
            flushed: 0,
            expected: expected.clone(),
        })
    }

    pub fn write(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        use std::io::Write;
        self.written += bytes.len() as u64;
        if self.written > self.expected.size {
            bail!(
                "{} is longer than the {} bytes the manifest says",
                self.expected.file,
                self.expected.size
            );
        }
        self.sha.update(bytes);
        let writer = self.writer.as_mut().context("file already finished")?;
        writer
            .write_all(bytes)
            .with_context(|| format!("cannot write {}", self.temp.display()))?;
        if self.written - self.flushed >= WRITEBACK_EVERY {
            start_writeback(writer, self.flushed, self.written - self.flushed);
            self.flushed = self.written;
        }
        Ok(())
    }

    pub fn finish(mut self) -> anyhow::Result<String> {
        let digest: [u8; 32] = std::mem::take(&mut self.sha).finalize().into();
        if self.written != self.expected.size {
            bail!(
                "{} is {} bytes but the manifest says {}: not written",
                self.expected.file,
                self.written,
                self.expected.size
            );
        }
        if digest != self.expected.sha256 {
            bail!(
                "{} has SHA-256 {} but the manifest says {}: not written",
                self.expected.file,
                hex::encode(digest),
                hex::encode(self.expected.sha256)
            );
        }
        let writer = self.writer.take().context("file already finished")?;
        writer.sync_all()?;
        drop(writer);
        std::fs::rename(&self.temp, &self.out)
            .with_context(|| format!("cannot write {}", self.out.display()))?;
        Ok(hex::encode(digest))
    }
}

/// Asks the kernel to start writing `len` bytes at `offset` of `file` to disk, without waiting:
/// only a head start for the fsync that follows, so a failure is ignored (the fsync reports).
#[cfg(target_os = "linux")]
fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range only reads its integer arguments; the descriptor is open.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &std::fs::File, _offset: u64, _len: u64) {}

impl Drop for VerifiedFile {
    fn drop(&mut self) {
        if self.writer.is_some() || self.temp.exists() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}
