//! pkgmesh-cache: the on-disk, content-addressed chunk store every node and the seed keep.
//!
//! **Owns**: chunk files on disk, their index, the byte budget, LRU eviction, pins,
//! verification at rest, and the operator's view of all that ([`BlobInfo`], [`CacheStats`],
//! [`VerifyReport`]). **Does not own**: networking, deciding which chunks to fetch or from whom,
//! what a blob means to a package, or blob addressing itself (that is
//! `pkgmesh_protocol::blob`: ids, layouts, chunk-hash lists and their verification).
//!
//! # Layout on disk
//!
//! ```text
//! <dir>/index.redb                     redb: blob hash lists, pins, one row per chunk held
//! <dir>/chunks/<hh>/<64 hex id>.<i>    chunk i of a blob, raw bytes (hh = first two hex digits)
//! <dir>/tmp/<pid>-<n>.part             writes in progress; same filesystem, so rename is atomic
//! ```
//!
//! Chunk files sit flat in 256 fan-out directories rather than one directory per blob: `open`
//! then lists at most 257 directories however many blobs there are (a directory per blob
//! made open three times slower for 100,000 small blobs).
//!
//! # What is durable when
//!
//! The chunk files are the truth for *which chunks exist*; the index is the truth for *which
//! blobs are registered and pinned*. Durability of chunks is a group commit (module `sync`):
//!
//! - A chunk becomes visible only by `rename(tmp → chunks/…)` after its bytes were verified
//!   against the blob's chunk hash, so every file under `chunks/` was written from verified
//!   bytes. `put_chunk` and `ChunkWriter::commit` return once the rename is done: from then on
//!   the chunk is served and **survives a crash of the process** (SIGKILL, panic, OOM kill), since
//!   the kernel's page cache keeps what was written. They do not fsync.
//! - A syncer thread makes puts **durable against power loss** in rounds: within 1 s of a put
//!   (sooner when 128 MiB are waiting), it fdatasyncs every new chunk file, several at once,
//!   fsyncs the directories that gained entries, and only then commits the chunk's index row,
//!   durably, in one transaction per round. Puts wait while more than 1 GiB is not durable yet.
//!   [`ChunkStore::flush`] runs a round now, and dropping the last handle runs a last one.
//!   So a power loss can take the chunks put in the last second or so (at most 1 GiB); they
//!   come back as missing, never as wrong.
//! - Every chunk row names a file whose bytes and name were durable before the row was. Open
//!   trusts files with rows without re-hashing (a readdir walk, no stat, no hashing: about
//!   0.25 s for 100,000 chunks here). A file without a row (put since the last round, or a row
//!   lost) is re-verified: adopted if intact (after syncing it), deleted if torn. Rows whose
//!   file is gone are dropped; temp files, which are never renamed once torn, are deleted.
//! - Blob registrations (hash lists) and pins are committed to redb with immediate durability
//!   before the call returns: without its hash list a chunk could not be verified again.
//! - Reads verify every chunk before (or, streaming, as) it is handed out, so rot after the fact,
//!   or a chunk file a crash left torn, is caught at use: the chunk is dropped and reported as a
//!   miss. A chunk file that cannot be synced is dropped the same way.
//! - [`ChunkStore::open_scratch`] opens a store that skips all of that (no fsync, no chunk
//!   rows) for contents that are deleted anyway, like a one-shot fetch's temporary cache.
//! - If the index file fails while running (say the disk filled up under a commit; redb then
//!   refuses that handle), the store keeps serving from memory and rebuilds the index file from
//!   memory (leaving out chunks not yet synced) once it can. Puts do not fail on index trouble.
//!
//! # Budget, LRU and pins
//!
//! `budget_bytes` bounds chunk bytes on disk plus bytes reserved by writes in progress, so it
//! is never exceeded, not even transiently. A write reserves its chunk's length first, evicting
//! least-recently-used chunks (the `lru` crate, chunk granularity; puts and reads count as use)
//! that are unpinned and not open in a reader or writer. Chunks of pinned blobs are kept out of
//! the LRU altogether; when a blob's last pin goes, its chunks re-enter as most recently used.
//! If nothing evictable is left, the write fails with "cache full of pinned data" (or "full of
//! data in use"). Registrations and the index are not counted: they are a few bytes per chunk.
//! Recency is saved in the index (a logical tick per chunk), so LRU order survives restarts.
//!
//! # Memory
//!
//! Nothing holds a whole blob: writes and reads stream in at most 256 KiB buffers (except
//! [`ChunkStore::get_chunk`], which by its contract returns one whole chunk), imports spool
//! chunk by chunk, and per-blob state is a bitfield and the chunk-hash list (32 bytes a chunk).
//!
//! # Importing
//!
//! [`ChunkStore::import_reader`] reads its stream once: each chunk is spooled into its own temp
//! file while the whole stream is hashed; when the stream ends the id is known, the hash list
//! is registered and the spooled chunks are renamed into place. The installed bytes are the very
//! bytes hashed, so they verify by construction. A file path ([`ChunkStore::import_file`]) goes
//! the same way: one read of the file, no second pass.
//!
//! # Concurrency
//!
//! [`ChunkStore`] is `Clone + Send + Sync` with an `Arc` inside. Methods block on disk I/O;
//! async callers use `spawn_blocking`. One mutex guards the in-memory state and is never held
//! across hashing or data I/O (only across unlinks of evicted files); a second serializes
//! registry changes (register, pin, unpin, evict_blob) with their durable index commits; a
//! third keeps sync rounds and index rebuilds one at a time. Each open store runs one syncer
//! thread, stopped when the last handle is dropped. The index's exclusive file lock keeps a
//! second process out of the same directory.

mod bitfield;
mod error;
mod index;
mod io;
mod store;
mod sync;

pub use bitfield::{Bitfield, BitfieldError};
pub use error::CacheError;
pub use io::{BlobReader, ChunkReader, ChunkWriter};
pub use store::{
    BlobInfo, CacheConfig, CacheStats, ChunkStore, RottedChunk, VerifyReport, MAX_PIN_REASON,
};

/// Serializes blob ids as 64 hex digits in operator-facing output.
pub mod hex_id {
    use pkgmesh_protocol::blob::BlobId;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &BlobId, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&id.to_hex())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<BlobId, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }

    /// The same for a list of ids.
    pub mod list {
        use pkgmesh_protocol::blob::BlobId;
        use serde::ser::SerializeSeq;
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(ids: &[BlobId], serializer: S) -> Result<S::Ok, S::Error> {
            let mut seq = serializer.serialize_seq(Some(ids.len()))?;
            for id in ids {
                seq.serialize_element(&id.to_hex())?;
            }
            seq.end()
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Vec<BlobId>, D::Error> {
            Vec::<String>::deserialize(deserializer)?
                .iter()
                .map(|text| text.parse().map_err(serde::de::Error::custom))
                .collect()
        }
    }
}
