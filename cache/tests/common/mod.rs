//! Helpers shared by the cache's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use pkgmesh_cache::{CacheConfig, ChunkStore};
use pkgmesh_protocol::blob::{hash_reader, BlobId, ChunkHashes, MIN_CHUNK_SIZE};

pub const CHUNK: usize = MIN_CHUNK_SIZE as usize;

/// Deterministic bytes that differ per seed and per position.
pub fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

pub struct TestBlob {
    pub bytes: Vec<u8>,
    pub hashes: ChunkHashes,
}

impl TestBlob {
    pub fn new(len: usize, seed: u64) -> Self {
        let bytes = data(len, seed);
        let hashes = hash_reader(&bytes[..], len as u64).unwrap();
        TestBlob { bytes, hashes }
    }

    pub fn id(&self) -> BlobId {
        self.hashes.id()
    }

    pub fn chunk_count(&self) -> u32 {
        self.hashes.layout().chunk_count()
    }

    pub fn chunk(&self, index: u32) -> &[u8] {
        let layout = self.hashes.layout();
        let start = layout.chunk_offset(index) as usize;
        &self.bytes[start..start + layout.chunk_len(index).unwrap() as usize]
    }
}

pub fn open(dir: &Path, budget_bytes: u64) -> ChunkStore {
    ChunkStore::open(CacheConfig {
        dir: dir.to_path_buf(),
        budget_bytes,
    })
    .unwrap()
}

/// Files under `<dir>/tmp`.
pub fn tmp_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir.join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

/// Every chunk file and its size.
pub fn chunk_files(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.join("chunks")];
    while let Some(path) = stack.pop() {
        for entry in std::fs::read_dir(&path).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            } else {
                out.push((entry.path(), entry.metadata().unwrap().len()));
            }
        }
    }
    out
}

pub fn chunk_path(dir: &Path, id: &BlobId, index: u32) -> PathBuf {
    let hex = id.to_hex();
    dir.join("chunks")
        .join(&hex[..2])
        .join(format!("{hex}.{index}"))
}

/// A scratch directory on tmpfs when there is one (fsync is free there, which keeps tests
/// doing thousands of puts quick); elsewhere a normal temp dir.
pub fn fast_tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::tempdir_in(shm) {
            return dir;
        }
    }
    tempfile::tempdir().unwrap()
}
