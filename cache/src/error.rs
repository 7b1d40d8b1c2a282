//! What can go wrong in the cache, each error naming the blob, chunk, path or numbers involved so
//! an operator can act on the message alone.

use std::io;
use std::path::PathBuf;

use pkgmesh_protocol::blob::{BlobError, BlobId, ChunkError};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("disk full: no space left on the filesystem holding the cache at {dir} ({action})")]
    DiskFull {
        dir: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cache index {path}: {source}")]
    Index {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("blob {id} is not registered with the cache: register its chunk-hash list first")]
    Unregistered { id: BlobId },
    #[error("chunk {index} of blob {id} is out of range: the blob has {count} chunks")]
    ChunkOutOfRange { id: BlobId, index: u32, count: u32 },
    #[error("chunk {index} of blob {id} failed verification: {detail}")]
    ChunkVerification {
        id: BlobId,
        index: u32,
        detail: String,
    },
    #[error(
        "cache full of pinned data ({pinned} bytes pinned, budget {budget}): \
         cannot make room for {needed} more bytes without evicting pins"
    )]
    FullOfPinned {
        pinned: u64,
        budget: u64,
        needed: u64,
    },
    #[error(
        "cache full of data in use ({used} bytes held, {reserved} reserved by writes in progress, \
         {pinned} pinned, budget {budget}): nothing can be evicted to make room for {needed} \
         more bytes until readers and writers finish"
    )]
    FullInUse {
        used: u64,
        reserved: u64,
        pinned: u64,
        budget: u64,
        needed: u64,
    },
    #[error("{size} bytes cannot fit in the cache (budget {budget}, {pinned} bytes pinned)")]
    TooLargeForBudget { size: u64, budget: u64, pinned: u64 },
    #[error("blob {id} is pinned ({reasons}): unpin it before evicting it")]
    Pinned { id: BlobId, reasons: String },
    #[error("blob {id} is being read or written: try again once that finishes")]
    InUse { id: BlobId },
    #[error("chunk {index} of blob {id}: an earlier write to this writer failed; start a new one")]
    WriterFailed { id: BlobId, index: u32 },
    #[error("blob {id} is incomplete: {held} of {total} chunks held")]
    Incomplete { id: BlobId, held: u32, total: u32 },
    #[error("pin reason {reason:?} is not allowed: it must be 1 to {max} bytes of printable text")]
    BadPinReason { reason: String, max: usize },
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("reading the data to import: {0}")]
    ImportRead(#[source] io::Error),
    #[error("the data to import was promised as {expected} bytes but {got}")]
    ImportSize { expected: u64, got: String },
}

impl CacheError {
    /// Builds the error for a failed chunk check, in the words an operator needs.
    pub(crate) fn from_chunk(id: BlobId, error: ChunkError) -> CacheError {
        match error {
            ChunkError::OutOfRange { index, count } => {
                CacheError::ChunkOutOfRange { id, index, count }
            }
            ChunkError::WrongLength {
                index,
                expected,
                got,
            } => CacheError::ChunkVerification {
                id,
                index,
                detail: format!("it should be {expected} bytes, got {got}"),
            },
            ChunkError::HashMismatch { index } => CacheError::ChunkVerification {
                id,
                index,
                detail: "its bytes do not match the chunk hash".to_string(),
            },
        }
    }

    /// True for the errors that mean the disk (not the cache's budget) ran out of space.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, CacheError::DiskFull { .. })
    }

    /// Maps a cache error into an `io::Error` for the `Write`/`Read` adapters, keeping the kind
    /// callers branch on (disk full, bad data) and the full message.
    pub(crate) fn into_io(self) -> io::Error {
        let kind = match &self {
            CacheError::DiskFull { .. } => io::ErrorKind::StorageFull,
            CacheError::ChunkVerification { .. } | CacheError::ChunkOutOfRange { .. } => {
                io::ErrorKind::InvalidData
            }
            CacheError::Io { source, .. } => source.kind(),
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, self)
    }
}

pub(crate) fn is_out_of_space(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}
