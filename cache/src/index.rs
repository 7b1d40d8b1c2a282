//! The redb index: registered blobs (their chunk-hash lists), pins, and one row per chunk held.
//!
//! Every commit is durable. Blob and pin rows are committed as they change: they are rare, and
//! a chunk file can only be trusted or re-verified while its blob's hash list survives. Chunk
//! rows are committed in batches by the store's sync rounds (see `sync`), each only after the
//! files it names were synced, so a row always names a durable, verified file and open can
//! trust it without re-hashing. A file whose row is missing is re-verified and adopted at open.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use pkgmesh_protocol::blob::{BlobId, ChunkHashes};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::CacheError;

/// Blob id (32 bytes) → size (u64 LE) followed by the packed chunk-hash list.
const BLOBS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("blobs");
/// Blob id (32 bytes) + chunk index (u32 BE) → access tick (u64 LE) + access time (u64 LE, unix s).
const CHUNKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("chunks");
/// Blob id (32 bytes) + pin reason (UTF-8) → nothing.
const PINS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("pins");

/// The index never needs much cache: its rows are small and read once at open.
const INDEX_CACHE_BYTES: usize = 16 << 20;

pub(crate) type ChunkKey = (BlobId, u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkRow {
    pub tick: u64,
    pub accessed: u64,
}

pub(crate) enum ChunkOp {
    Put(ChunkKey, ChunkRow),
    Remove(ChunkKey),
}

/// Everything the index holds, as read at open.
pub(crate) struct Loaded {
    pub blobs: Vec<(BlobId, u64, Vec<u8>)>,
    pub bad_blob_rows: Vec<Vec<u8>>,
    pub pins: Vec<(BlobId, String)>,
    pub bad_pin_rows: Vec<Vec<u8>>,
    pub chunks: Vec<(ChunkKey, ChunkRow)>,
    pub bad_chunk_rows: Vec<Vec<u8>>,
}

/// What the index should hold, rebuilt from memory after the index file failed (e.g. the disk
/// filled up under a commit and redb refuses further use of that handle).
pub(crate) struct Snapshot {
    pub blobs: Vec<ChunkHashes>,
    pub pins: Vec<(BlobId, String)>,
    pub chunks: Vec<(ChunkKey, ChunkRow)>,
}

pub(crate) struct Index {
    path: PathBuf,
    inner: Mutex<IndexInner>,
}

struct IndexInner {
    /// `None` after a failure closed the handle; reopened by [`Index::rebuild`].
    db: Option<Database>,
}

impl Index {
    pub fn open(path: &Path) -> Result<Index, CacheError> {
        let db = open_database(path)?;
        let index = Index {
            path: path.to_path_buf(),
            inner: Mutex::new(IndexInner { db: Some(db) }),
        };
        // Create the tables so reads never meet a missing one.
        index.write(Durability::Immediate, |txn| {
            txn.open_table(BLOBS)?;
            txn.open_table(CHUNKS)?;
            txn.open_table(PINS)?;
            Ok(())
        })?;
        Ok(index)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_broken(&self) -> bool {
        self.lock().db.is_none()
    }

    pub fn load(&self) -> Result<Loaded, CacheError> {
        let guard = self.lock();
        let db = guard.db.as_ref().ok_or_else(|| self.closed_error())?;
        let result = (|| -> Result<Loaded, redb::Error> {
            let txn = db.begin_read()?;
            let mut loaded = Loaded {
                blobs: Vec::new(),
                bad_blob_rows: Vec::new(),
                pins: Vec::new(),
                bad_pin_rows: Vec::new(),
                chunks: Vec::new(),
                bad_chunk_rows: Vec::new(),
            };
            for row in txn.open_table(BLOBS)?.iter()? {
                let (key, value) = row?;
                let (key, value) = (key.value(), value.value());
                match (id_of(key), value.split_first_chunk::<8>()) {
                    (Some(id), Some((size, packed))) if key.len() == 32 => {
                        loaded
                            .blobs
                            .push((id, u64::from_le_bytes(*size), packed.to_vec()))
                    }
                    _ => loaded.bad_blob_rows.push(key.to_vec()),
                }
            }
            for row in txn.open_table(PINS)?.iter()? {
                let (key, _) = row?;
                let key = key.value();
                match (id_of(key), std::str::from_utf8(&key[key.len().min(32)..])) {
                    (Some(id), Ok(reason)) if !reason.is_empty() => {
                        loaded.pins.push((id, reason.to_string()))
                    }
                    _ => loaded.bad_pin_rows.push(key.to_vec()),
                }
            }
            for row in txn.open_table(CHUNKS)?.iter()? {
                let (key, value) = row?;
                let (key, value) = (key.value(), value.value());
                match (decode_chunk_key(key), decode_chunk_row(value)) {
                    (Some(chunk), Some(row)) => loaded.chunks.push((chunk, row)),
                    _ => loaded.bad_chunk_rows.push(key.to_vec()),
                }
            }
            Ok(loaded)
        })();
        result.map_err(|e| self.error(e))
    }

    /// Durably records a registered blob's hash list.
    pub fn put_blob(&self, hashes: &ChunkHashes) -> Result<(), CacheError> {
        let value = blob_value(hashes);
        self.write(Durability::Immediate, |txn| {
            txn.open_table(BLOBS)?
                .insert(hashes.id().0.as_slice(), value.as_slice())?;
            Ok(())
        })
    }

    /// Forgets a blob: its row, its chunk rows and its pins.
    pub fn remove_blob(&self, id: &BlobId, chunks: &[u32]) -> Result<(), CacheError> {
        self.write(Durability::Immediate, |txn| {
            txn.open_table(BLOBS)?.remove(id.0.as_slice())?;
            let mut table = txn.open_table(CHUNKS)?;
            for index in chunks {
                table.remove(chunk_key(&(*id, *index)).as_slice())?;
            }
            let mut pins = txn.open_table(PINS)?;
            let start = id.0.to_vec();
            let mut end = id.0.to_vec();
            end.push(0xff);
            pins.retain_in(start.as_slice()..end.as_slice(), |_, _| false)?;
            Ok(())
        })
    }

    pub fn put_pin(&self, id: &BlobId, reason: &str) -> Result<(), CacheError> {
        let key = pin_key(id, reason);
        self.write(Durability::Immediate, |txn| {
            txn.open_table(PINS)?
                .insert(key.as_slice(), [].as_slice())?;
            Ok(())
        })
    }

    pub fn remove_pin(&self, id: &BlobId, reason: &str) -> Result<(), CacheError> {
        let key = pin_key(id, reason);
        self.write(Durability::Immediate, |txn| {
            txn.open_table(PINS)?.remove(key.as_slice())?;
            Ok(())
        })
    }

    /// Applies a sync round's chunk-row changes in one durable commit. The caller has synced
    /// every file a put row names.
    pub fn chunk_ops(&self, ops: &[ChunkOp]) -> Result<(), CacheError> {
        if ops.is_empty() {
            return Ok(());
        }
        self.write(Durability::Immediate, |txn| {
            let mut table = txn.open_table(CHUNKS)?;
            for op in ops {
                match op {
                    ChunkOp::Put(key, row) => {
                        table.insert(chunk_key(key).as_slice(), chunk_row(row).as_slice())?;
                    }
                    ChunkOp::Remove(key) => {
                        table.remove(chunk_key(key).as_slice())?;
                    }
                }
            }
            Ok(())
        })
    }

    /// Applies what reconciliation at open decided, durably: rows it found unreadable or
    /// pointing at nothing go, chunk files it adopted get rows.
    pub fn reconcile(
        &self,
        blob_keys: &[Vec<u8>],
        pin_keys: &[Vec<u8>],
        chunk_keys: &[Vec<u8>],
        ops: &[ChunkOp],
    ) -> Result<(), CacheError> {
        if blob_keys.is_empty() && pin_keys.is_empty() && chunk_keys.is_empty() && ops.is_empty() {
            return Ok(());
        }
        self.write(Durability::Immediate, |txn| {
            let mut blobs = txn.open_table(BLOBS)?;
            for key in blob_keys {
                blobs.remove(key.as_slice())?;
            }
            let mut pins = txn.open_table(PINS)?;
            for key in pin_keys {
                pins.remove(key.as_slice())?;
            }
            let mut chunks = txn.open_table(CHUNKS)?;
            for key in chunk_keys {
                chunks.remove(key.as_slice())?;
            }
            for op in ops {
                match op {
                    ChunkOp::Put(key, row) => {
                        chunks.insert(chunk_key(key).as_slice(), chunk_row(row).as_slice())?;
                    }
                    ChunkOp::Remove(key) => {
                        chunks.remove(chunk_key(key).as_slice())?;
                    }
                }
            }
            Ok(())
        })
    }

    /// Reopens the index file after a failure and rewrites it from `snapshot`.
    pub fn rebuild(&self, snapshot: Snapshot) -> Result<(), CacheError> {
        {
            let mut inner = self.lock();
            // redb refuses all further use of a handle after an I/O error: drop it first, since
            // it holds the file lock a new handle needs.
            inner.db = None;
            inner.db = Some(open_database(&self.path)?);
        }
        self.write(Durability::Immediate, |txn| {
            txn.delete_table(BLOBS)?;
            txn.delete_table(CHUNKS)?;
            txn.delete_table(PINS)?;
            let mut blobs = txn.open_table(BLOBS)?;
            for hashes in &snapshot.blobs {
                blobs.insert(hashes.id().0.as_slice(), blob_value(hashes).as_slice())?;
            }
            let mut pins = txn.open_table(PINS)?;
            for (id, reason) in &snapshot.pins {
                pins.insert(pin_key(id, reason).as_slice(), [].as_slice())?;
            }
            let mut chunks = txn.open_table(CHUNKS)?;
            for (key, row) in &snapshot.chunks {
                chunks.insert(chunk_key(key).as_slice(), chunk_row(row).as_slice())?;
            }
            Ok(())
        })
    }

    fn write(
        &self,
        durability: Durability,
        body: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), CacheError> {
        let mut inner = self.lock();
        let db = inner.db.as_ref().ok_or_else(|| self.closed_error())?;
        let result = (|| -> Result<(), redb::Error> {
            let mut txn = db.begin_write()?;
            txn.set_durability(durability)?;
            body(&txn)?;
            txn.commit()?;
            Ok(())
        })();
        match result {
            Ok(()) => Ok(()),
            Err(error) => {
                // A failed commit may leave the handle refusing all further use (redb latches
                // I/O errors); close it so the store knows to rebuild.
                tracing::warn!(index = %self.path.display(), %error, "cache index write failed");
                inner.db = None;
                Err(self.error(error))
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, IndexInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn error(&self, source: redb::Error) -> CacheError {
        if let redb::Error::Io(io) = &source {
            if crate::error::is_out_of_space(io) {
                let dir = self.path.parent().unwrap_or(&self.path).to_path_buf();
                return CacheError::DiskFull {
                    dir,
                    action: "writing the index",
                    source: std::io::Error::new(io.kind(), io.to_string()),
                };
            }
        }
        CacheError::Index {
            path: self.path.clone(),
            source: Box::new(source),
        }
    }

    fn closed_error(&self) -> CacheError {
        CacheError::Index {
            path: self.path.clone(),
            source: Box::new(redb::Error::PreviousIo),
        }
    }
}

fn open_database(path: &Path) -> Result<Database, CacheError> {
    Database::builder()
        .set_cache_size(INDEX_CACHE_BYTES)
        .create(path)
        .map_err(|source| CacheError::Index {
            path: path.to_path_buf(),
            source: Box::new(source.into()),
        })
}

fn id_of(bytes: &[u8]) -> Option<BlobId> {
    bytes.first_chunk::<32>().map(|id| BlobId(*id))
}

fn blob_value(hashes: &ChunkHashes) -> Vec<u8> {
    let mut value = hashes.layout().size().to_le_bytes().to_vec();
    value.extend_from_slice(&hashes.to_packed());
    value
}

pub(crate) fn pin_key(id: &BlobId, reason: &str) -> Vec<u8> {
    let mut key = id.0.to_vec();
    key.extend_from_slice(reason.as_bytes());
    key
}

pub(crate) fn chunk_key((id, index): &ChunkKey) -> [u8; 36] {
    let mut key = [0u8; 36];
    key[..32].copy_from_slice(&id.0);
    key[32..].copy_from_slice(&index.to_be_bytes());
    key
}

fn decode_chunk_key(bytes: &[u8]) -> Option<ChunkKey> {
    let key: &[u8; 36] = bytes.try_into().ok()?;
    let (id, index) = key.split_first_chunk::<32>()?;
    Some((BlobId(*id), u32::from_be_bytes(index.try_into().ok()?)))
}

fn chunk_row(row: &ChunkRow) -> [u8; 16] {
    let mut value = [0u8; 16];
    value[..8].copy_from_slice(&row.tick.to_le_bytes());
    value[8..].copy_from_slice(&row.accessed.to_le_bytes());
    value
}

fn decode_chunk_row(bytes: &[u8]) -> Option<ChunkRow> {
    let value: &[u8; 16] = bytes.try_into().ok()?;
    let (tick, accessed) = value.split_first_chunk::<8>()?;
    Some(ChunkRow {
        tick: u64::from_le_bytes(*tick),
        accessed: u64::from_le_bytes(accessed.try_into().ok()?),
    })
}
