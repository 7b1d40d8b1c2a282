//! Blob and chunk addressing.
//!
//! A blob (one package ZIP) is named by the BLAKE3 hash of the whole file: its [`BlobId`]. The
//! file is split into chunks of a power-of-two size chosen from the file size ([`ChunkLayout`]).
//! Because the chunk size is a power of two of at least BLAKE3's 1 KiB chunk, every chunk is a
//! whole subtree of the BLAKE3 tree, so its chaining value (a "chunk hash") can be computed from
//! the chunk's bytes alone. The list of chunk hashes ([`ChunkHashes`]) is verified once against
//! the blob id by merging it up the tree to the root — the chunk-granular "outboard" of BAO —
//! and then every chunk verifies on its own against its entry in the list.
//!
//! Owns: the id, the layout rules, streaming hashing in constant memory, and verification.
//! Does not own: where chunks are stored or how they travel.

use std::fmt;
use std::io::{self, Read};
use std::str::FromStr;

use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, HasherExt, Mode};
use serde::{Deserialize, Serialize};

/// Smallest chunk: small packages still split into enough chunks for a swarm to share.
pub const MIN_CHUNK_SIZE: u32 = 256 * 1024;
/// Largest chunk: bounds what one request moves and what a peer must hold before serving.
pub const MAX_CHUNK_SIZE: u32 = 64 * 1024 * 1024;
/// The layout picks the smallest chunk size that keeps a blob at or under this many chunks.
pub const TARGET_MAX_CHUNKS: u64 = 2048;
/// Largest blob pkgmesh addresses (1 TiB): beyond it chunk lists and bitfields stop being small.
pub const MAX_BLOB_SIZE: u64 = 1 << 40;
/// Upper bound on the chunk count of any valid layout, for decoders sizing bitfields and lists.
pub const MAX_CHUNKS: u32 = (MAX_BLOB_SIZE / MAX_CHUNK_SIZE as u64) as u32;

/// The BLAKE3 hash of a whole blob, its only name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlobId(pub [u8; 32]);

/// The BLAKE3 chaining value of one chunk's subtree (the root hash for a one-chunk blob).
pub type ChunkHash = [u8; 32];

impl BlobId {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 12 hex digits: enough to tell blobs apart in tables and logs.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({})", self.short())
    }
}

impl FromStr for BlobId {
    type Err = BlobError;

    fn from_str(text: &str) -> Result<Self, BlobError> {
        let mut bytes = [0u8; 32];
        if text.len() != 64 {
            return Err(BlobError::BadId {
                text: truncate(text),
            });
        }
        hex::decode_to_slice(text, &mut bytes).map_err(|_| BlobError::BadId {
            text: truncate(text),
        })?;
        Ok(BlobId(bytes))
    }
}

fn truncate(text: &str) -> String {
    text.chars().take(80).collect()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    #[error("blob id {text:?} is not 64 hex digits")]
    BadId { text: String },
    #[error("blob of {size} bytes is over the {MAX_BLOB_SIZE}-byte limit")]
    TooLarge { size: u64 },
    #[error("chunk hash list for blob {id} has {got} entries, the layout needs {expected}")]
    HashCountMismatch { id: BlobId, expected: u32, got: u64 },
    #[error("chunk hash list does not add up to blob {id} (it gives {computed})")]
    RootMismatch { id: BlobId, computed: BlobId },
    #[error("blob {id} should be {expected} bytes, the data was {got} bytes")]
    SizeMismatch { id: BlobId, expected: u64, got: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk {index} is out of range: the blob has {count} chunks")]
    OutOfRange { index: u32, count: u32 },
    #[error("chunk {index} should be {expected} bytes, got {got}")]
    WrongLength { index: u32, expected: u32, got: u64 },
    #[error("chunk {index} failed verification against the blob's chunk hash")]
    HashMismatch { index: u32 },
}

/// How a blob of a given size splits into chunks. A pure function of the size, so every node
/// and the seed agree on it without being told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkLayout {
    size: u64,
    chunk_size: u32,
}

impl ChunkLayout {
    pub fn for_size(size: u64) -> Result<Self, BlobError> {
        if size > MAX_BLOB_SIZE {
            return Err(BlobError::TooLarge { size });
        }
        let wanted = size.div_ceil(TARGET_MAX_CHUNKS).max(1).next_power_of_two();
        let chunk_size = wanted.clamp(MIN_CHUNK_SIZE as u64, MAX_CHUNK_SIZE as u64) as u32;
        Ok(ChunkLayout { size, chunk_size })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// An empty blob still has one (empty) chunk, so every blob has something to verify.
    pub fn chunk_count(&self) -> u32 {
        self.size.div_ceil(self.chunk_size as u64).max(1) as u32
    }

    pub fn chunk_offset(&self, index: u32) -> u64 {
        index as u64 * self.chunk_size as u64
    }

    pub fn chunk_len(&self, index: u32) -> Result<u32, ChunkError> {
        let count = self.chunk_count();
        if index >= count {
            return Err(ChunkError::OutOfRange { index, count });
        }
        let remaining = self.size - self.chunk_offset(index);
        Ok(remaining.min(self.chunk_size as u64) as u32)
    }

    /// Which chunk holds byte `offset` of the blob.
    pub fn chunk_of(&self, offset: u64) -> u32 {
        (offset / self.chunk_size as u64) as u32
    }
}

/// A blob's verified list of chunk hashes. Holding one means the list adds up to the blob id,
/// so a chunk that matches its entry is a correct piece of that blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkHashes {
    id: BlobId,
    layout: ChunkLayout,
    hashes: Vec<ChunkHash>,
}

impl ChunkHashes {
    /// Checks an untrusted list (from a peer, the seed or disk) against the blob id and size.
    pub fn verify(id: BlobId, size: u64, hashes: Vec<ChunkHash>) -> Result<Self, BlobError> {
        let layout = ChunkLayout::for_size(size)?;
        if hashes.len() as u64 != layout.chunk_count() as u64 {
            return Err(BlobError::HashCountMismatch {
                id,
                expected: layout.chunk_count(),
                got: hashes.len() as u64,
            });
        }
        let computed = BlobId(root_of(&hashes));
        if computed != id {
            return Err(BlobError::RootMismatch { id, computed });
        }
        Ok(ChunkHashes { id, layout, hashes })
    }

    /// Same as [`ChunkHashes::verify`] for the packed form that travels and is stored.
    pub fn verify_packed(id: BlobId, size: u64, packed: &[u8]) -> Result<Self, BlobError> {
        let layout = ChunkLayout::for_size(size)?;
        if !packed.len().is_multiple_of(32)
            || packed.len() as u64 / 32 != layout.chunk_count() as u64
        {
            return Err(BlobError::HashCountMismatch {
                id,
                expected: layout.chunk_count(),
                got: packed.len() as u64 / 32,
            });
        }
        let hashes = packed
            .chunks_exact(32)
            .map(|c| {
                let mut h = [0u8; 32];
                h.copy_from_slice(c);
                h
            })
            .collect();
        Self::verify(id, size, hashes)
    }

    pub fn id(&self) -> BlobId {
        self.id
    }

    pub fn layout(&self) -> ChunkLayout {
        self.layout
    }

    pub fn hashes(&self) -> &[ChunkHash] {
        &self.hashes
    }

    /// The list as consecutive 32-byte hashes.
    pub fn to_packed(&self) -> Vec<u8> {
        self.hashes.concat()
    }

    /// Verifies a whole chunk held in memory.
    pub fn verify_chunk(&self, index: u32, data: &[u8]) -> Result<(), ChunkError> {
        let mut verifier = self.chunk_verifier(index)?;
        verifier.update(data)?;
        verifier.finish()
    }

    /// A streaming verifier, so a chunk can go from socket to disk without being held whole.
    pub fn chunk_verifier(&self, index: u32) -> Result<ChunkVerifier, ChunkError> {
        let expected_len = self.layout.chunk_len(index)?;
        Ok(ChunkVerifier {
            hasher: chunk_hasher(&self.layout, index),
            is_root: self.layout.chunk_count() == 1,
            expected: self.hashes[index as usize],
            index,
            expected_len,
            seen: 0,
        })
    }
}

/// Hashes one chunk as it streams past and checks it at the end.
pub struct ChunkVerifier {
    hasher: blake3::Hasher,
    is_root: bool,
    expected: ChunkHash,
    index: u32,
    expected_len: u32,
    seen: u64,
}

impl ChunkVerifier {
    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn expected_len(&self) -> u32 {
        self.expected_len
    }

    /// Refuses bytes beyond the chunk's length at once, so an over-long sender is caught early.
    pub fn update(&mut self, data: &[u8]) -> Result<(), ChunkError> {
        self.seen += data.len() as u64;
        if self.seen > self.expected_len as u64 {
            return Err(ChunkError::WrongLength {
                index: self.index,
                expected: self.expected_len,
                got: self.seen,
            });
        }
        self.hasher.update(data);
        Ok(())
    }

    pub fn finish(self) -> Result<(), ChunkError> {
        if self.seen != self.expected_len as u64 {
            return Err(ChunkError::WrongLength {
                index: self.index,
                expected: self.expected_len,
                got: self.seen,
            });
        }
        if chunk_hash_of(&self.hasher, self.is_root) != self.expected {
            return Err(ChunkError::HashMismatch { index: self.index });
        }
        Ok(())
    }
}

fn chunk_hasher(layout: &ChunkLayout, index: u32) -> blake3::Hasher {
    let mut hasher = blake3::Hasher::new();
    if index > 0 {
        hasher.set_input_offset(layout.chunk_offset(index));
    }
    hasher
}

fn chunk_hash_of(hasher: &blake3::Hasher, is_root: bool) -> ChunkHash {
    if is_root {
        *hasher.finalize().as_bytes()
    } else {
        hasher.finalize_non_root()
    }
}

/// Merges chunk hashes up BLAKE3's tree. BLAKE3 gives the left subtree the largest power of two
/// of its chunks that leaves at least one byte on the right; with power-of-two chunks aligned to
/// the file that is the largest power of two of our chunks below the count.
fn root_of(hashes: &[ChunkHash]) -> [u8; 32] {
    match hashes {
        [] => *blake3::hash(&[]).as_bytes(),
        [only] => *only,
        _ => {
            let (left, right) = split_subtrees(hashes);
            *merge_subtrees_root(&subtree_of(left), &subtree_of(right), Mode::Hash).as_bytes()
        }
    }
}

fn subtree_of(hashes: &[ChunkHash]) -> ChunkHash {
    if hashes.len() == 1 {
        return hashes[0];
    }
    let (left, right) = split_subtrees(hashes);
    merge_subtrees_non_root(&subtree_of(left), &subtree_of(right), Mode::Hash)
}

fn split_subtrees(hashes: &[ChunkHash]) -> (&[ChunkHash], &[ChunkHash]) {
    let below = (hashes.len() - 1) as u64;
    let left = 1usize << (63 - below.leading_zeros());
    hashes.split_at(left)
}

/// Hashes a blob as it streams past, in constant memory: the blob id and every chunk hash in
/// one pass. The size must be known up front because it fixes the chunk size.
pub struct BlobHasher {
    layout: ChunkLayout,
    current: blake3::Hasher,
    current_index: u32,
    current_len: u64,
    seen: u64,
    hashes: Vec<ChunkHash>,
}

impl BlobHasher {
    pub fn new(size: u64) -> Result<Self, BlobError> {
        let layout = ChunkLayout::for_size(size)?;
        Ok(BlobHasher {
            layout,
            current: chunk_hasher(&layout, 0),
            current_index: 0,
            current_len: 0,
            seen: 0,
            hashes: Vec::with_capacity(layout.chunk_count() as usize),
        })
    }

    pub fn layout(&self) -> ChunkLayout {
        self.layout
    }

    pub fn update(&mut self, mut data: &[u8]) {
        let chunk_size = self.layout.chunk_size() as u64;
        while !data.is_empty() {
            if self.current_len == chunk_size {
                self.close_chunk();
            }
            let room = (chunk_size - self.current_len) as usize;
            let (now, rest) = data.split_at(room.min(data.len()));
            self.current.update(now);
            self.current_len += now.len() as u64;
            self.seen += now.len() as u64;
            data = rest;
        }
    }

    fn close_chunk(&mut self) {
        let is_root = self.layout.chunk_count() == 1;
        self.hashes.push(chunk_hash_of(&self.current, is_root));
        self.current_index += 1;
        self.current = chunk_hasher(&self.layout, self.current_index);
        self.current_len = 0;
    }

    /// Ends the blob; fails if the bytes seen differ from the size promised to [`BlobHasher::new`].
    pub fn finish(mut self) -> Result<ChunkHashes, BlobError> {
        let is_root = self.layout.chunk_count() == 1;
        self.hashes.push(chunk_hash_of(&self.current, is_root));
        let id = BlobId(root_of(&self.hashes));
        if self.seen != self.layout.size() {
            return Err(BlobError::SizeMismatch {
                id,
                expected: self.layout.size(),
                got: self.seen,
            });
        }
        Ok(ChunkHashes {
            id,
            layout: self.layout,
            hashes: self.hashes,
        })
    }
}

/// Why hashing a stream failed: the stream itself, or it was not the size it claimed.
#[derive(Debug, thiserror::Error)]
pub enum HashStreamError {
    #[error("reading the blob: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Blob(#[from] BlobError),
}

/// Buffer for streaming reads: large enough for BLAKE3's SIMD paths, small enough to be noise.
pub const HASH_BUFFER: usize = 256 * 1024;
/// Buffers in flight between the reading thread and the hashing thread.
const HASH_PIPELINE_DEPTH: usize = 4;

/// Hashes `size` bytes from `reader` in constant memory.
pub fn hash_reader(reader: impl Read + Send, size: u64) -> Result<ChunkHashes, HashStreamError> {
    hash_reader_with(reader, size, |_| {})
}

/// Hashes `size` bytes from `reader` in constant memory, handing every piece to `also` as
/// well (a SHA-256, a copy to disk). Reading runs on its own thread so that the copy out of the
/// page cache overlaps with hashing, which then runs at BLAKE3's single-thread speed.
pub fn hash_reader_with(
    reader: impl Read + Send,
    size: u64,
    mut also: impl FnMut(&[u8]),
) -> Result<ChunkHashes, HashStreamError> {
    let mut hasher = BlobHasher::new(size)?;
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(Vec<u8>, usize)>(HASH_PIPELINE_DEPTH);
    let (empty_tx, empty_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(HASH_PIPELINE_DEPTH);
    for _ in 0..HASH_PIPELINE_DEPTH {
        // Cannot fail: the channel has room for every buffer and its receiver is alive.
        let _ = empty_tx.send(vec![0u8; HASH_BUFFER]);
    }
    let read_result = std::thread::scope(|scope| {
        let reading = scope.spawn(move || -> io::Result<()> {
            // One byte past the size is read on purpose, so a stream that grew is caught.
            let mut limited = reader.take(size.saturating_add(1));
            while let Ok(mut buffer) = empty_rx.recv() {
                let n = loop {
                    match limited.read(&mut buffer) {
                        Ok(n) => break n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    }
                };
                if n == 0 || full_tx.send((buffer, n)).is_err() {
                    break;
                }
            }
            Ok(())
        });
        while let Ok((buffer, n)) = full_rx.recv() {
            hasher.update(&buffer[..n]);
            also(&buffer[..n]);
            // The reader may already be done while full buffers are still queued here: a
            // failed hand-back must not end this loop.
            let _ = empty_tx.send(buffer);
        }
        drop(empty_tx);
        reading
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the reading thread panicked")))
    });
    read_result?;
    Ok(hasher.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[3] ^ seed)
            .collect()
    }

    fn hash_all(bytes: &[u8]) -> ChunkHashes {
        hash_reader(bytes, bytes.len() as u64).unwrap()
    }

    #[test]
    fn blob_id_is_plain_blake3_of_the_file_for_every_shape_of_tree() {
        let c = MIN_CHUNK_SIZE as usize;
        for len in [
            0,
            1,
            1023,
            1024,
            c - 1,
            c,
            c + 1,
            2 * c,
            3 * c - 7,
            5 * c,
            7 * c + 1,
        ] {
            let bytes = data(len, 7);
            let hashes = hash_all(&bytes);
            assert_eq!(hashes.id().0, *blake3::hash(&bytes).as_bytes(), "len {len}");
            assert_eq!(
                hashes.hashes().len(),
                hashes.layout().chunk_count() as usize
            );
        }
    }

    #[test]
    fn layout_keeps_chunks_a_power_of_two_and_counts_bounded() {
        for size in [
            0u64,
            1,
            1 << 20,
            100 << 20,
            1 << 30,
            4 << 30,
            100 << 30,
            MAX_BLOB_SIZE,
        ] {
            let layout = ChunkLayout::for_size(size).unwrap();
            assert!(layout.chunk_size().is_power_of_two());
            assert!(layout.chunk_size() >= MIN_CHUNK_SIZE);
            assert!(layout.chunk_count() as u64 <= TARGET_MAX_CHUNKS.max(MAX_CHUNKS as u64));
            if size <= TARGET_MAX_CHUNKS * MAX_CHUNK_SIZE as u64 {
                assert!(
                    layout.chunk_count() as u64 <= TARGET_MAX_CHUNKS,
                    "size {size}"
                );
            }
        }
        assert_eq!(
            ChunkLayout::for_size(1 << 30).unwrap().chunk_size(),
            512 * 1024
        );
        assert!(matches!(
            ChunkLayout::for_size(MAX_BLOB_SIZE + 1),
            Err(BlobError::TooLarge { .. })
        ));
    }

    #[test]
    fn chunk_lengths_cover_the_blob_exactly() {
        let layout = ChunkLayout::for_size(3 * MIN_CHUNK_SIZE as u64 + 5).unwrap();
        assert_eq!(layout.chunk_count(), 4);
        let total: u64 = (0..4).map(|i| layout.chunk_len(i).unwrap() as u64).sum();
        assert_eq!(total, layout.size());
        assert_eq!(layout.chunk_len(3).unwrap(), 5);
        assert!(matches!(
            layout.chunk_len(4),
            Err(ChunkError::OutOfRange { index: 4, count: 4 })
        ));
    }

    #[test]
    fn a_tampered_hash_list_is_refused() {
        let bytes = data(3 * MIN_CHUNK_SIZE as usize + 10, 1);
        let good = hash_all(&bytes);
        let mut list = good.hashes().to_vec();
        list[1][0] ^= 1;
        assert!(matches!(
            ChunkHashes::verify(good.id(), bytes.len() as u64, list),
            Err(BlobError::RootMismatch { .. })
        ));
        let short = good.hashes()[..3].to_vec();
        assert!(matches!(
            ChunkHashes::verify(good.id(), bytes.len() as u64, short),
            Err(BlobError::HashCountMismatch { .. })
        ));
        // A size claim that changes the chunk count cannot match the list.
        let other = bytes.len() as u64 + MIN_CHUNK_SIZE as u64;
        assert!(ChunkHashes::verify(good.id(), other, good.hashes().to_vec()).is_err());
        // One that keeps the count passes the list (the list commits to content, not to the
        // claim), but then the last chunk can never verify at the claimed length: a wrong size
        // stalls a download, it never lets a wrong byte in.
        let claimed = bytes.len() as u64 + 1;
        let liar = ChunkHashes::verify(good.id(), claimed, good.hashes().to_vec()).unwrap();
        let last = liar.layout().chunk_count() - 1;
        let start = liar.layout().chunk_offset(last) as usize;
        let mut padded = bytes[start..].to_vec();
        padded.push(0);
        assert!(liar.verify_chunk(last, &padded).is_err());
        let packed = good.to_packed();
        let again = ChunkHashes::verify_packed(good.id(), bytes.len() as u64, &packed).unwrap();
        assert_eq!(again, good);
        assert!(ChunkHashes::verify_packed(good.id(), bytes.len() as u64, &packed[1..]).is_err());
    }

    #[test]
    fn short_long_and_foreign_chunks_are_refused() {
        let bytes = data(2 * MIN_CHUNK_SIZE as usize + 100, 3);
        let hashes = hash_all(&bytes);
        let c = MIN_CHUNK_SIZE as usize;
        assert!(matches!(
            hashes.verify_chunk(0, &bytes[..c - 1]),
            Err(ChunkError::WrongLength { index: 0, .. })
        ));
        assert!(matches!(
            hashes.verify_chunk(2, &bytes[2 * c - 1..]),
            Err(ChunkError::WrongLength { index: 2, .. })
        ));
        // Chunk 0's bytes offered as chunk 1: same length, wrong place in the tree.
        assert!(matches!(
            hashes.verify_chunk(1, &bytes[..c]),
            Err(ChunkError::HashMismatch { index: 1 })
        ));
        assert!(matches!(
            hashes.verify_chunk(9, &bytes[..c]),
            Err(ChunkError::OutOfRange { .. })
        ));
    }

    #[test]
    fn a_stream_of_the_wrong_size_is_refused() {
        let bytes = data(1000, 0);
        assert!(matches!(
            hash_reader(&bytes[..], 999),
            Err(HashStreamError::Blob(BlobError::SizeMismatch { .. }))
        ));
        assert!(matches!(
            hash_reader(&bytes[..], 1001),
            Err(HashStreamError::Blob(BlobError::SizeMismatch { .. }))
        ));
    }

    /// Hands out at most `step` bytes per read, like a socket or a pipe.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = self.step.min(out.len()).min(self.data.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn the_reading_thread_hands_over_every_byte_in_order() {
        let bytes = data(3 * HASH_BUFFER * HASH_PIPELINE_DEPTH + 12345, 9);
        let expected = *blake3::hash(&bytes).as_bytes();
        for step in [HASH_BUFFER, 4096, 100_003, 7] {
            for _ in 0..(if step < 100 { 1 } else { 10 }) {
                let mut copy = Vec::new();
                let reader = Trickle { data: &bytes, step };
                let hashes =
                    hash_reader_with(reader, bytes.len() as u64, |b| copy.extend_from_slice(b))
                        .unwrap();
                assert_eq!(hashes.id().0, expected, "step {step}");
                assert!(copy == bytes, "step {step}: the side copy differs");
            }
        }
    }

    #[test]
    fn a_failing_reader_is_an_error_not_a_hash() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        assert!(matches!(
            hash_reader(Broken, 10),
            Err(HashStreamError::Io(e)) if e.to_string().contains("disk on fire")
        ));
    }

    #[test]
    fn blob_id_parses_and_prints_as_hex() {
        let id = hash_all(b"hello").id();
        assert_eq!(id.to_string().parse::<BlobId>().unwrap(), id);
        assert_eq!(id.to_string().to_uppercase().parse::<BlobId>().unwrap(), id);
        assert!("abc".parse::<BlobId>().is_err());
        assert!("zz".repeat(32).parse::<BlobId>().is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn every_intact_chunk_passes_and_any_flipped_bit_fails(
            len in 0usize..(4 * MIN_CHUNK_SIZE as usize + 3000),
            seed in any::<u8>(),
            flip in any::<u64>(),
            split in any::<u64>(),
        ) {
            let bytes = data(len, seed);
            let hashes = hash_all(&bytes);
            prop_assert_eq!(hashes.id().0, *blake3::hash(&bytes).as_bytes());
            let layout = hashes.layout();
            for index in 0..layout.chunk_count() {
                let start = layout.chunk_offset(index) as usize;
                let chunk = &bytes[start..start + layout.chunk_len(index).unwrap() as usize];
                prop_assert!(hashes.verify_chunk(index, chunk).is_ok());
                // Streamed in two pieces at an arbitrary split gives the same answer.
                let at = if chunk.is_empty() { 0 } else { (split as usize) % chunk.len() };
                let mut verifier = hashes.chunk_verifier(index).unwrap();
                verifier.update(&chunk[..at]).unwrap();
                verifier.update(&chunk[at..]).unwrap();
                prop_assert!(verifier.finish().is_ok());
                if !chunk.is_empty() {
                    let mut bad = chunk.to_vec();
                    let bit = (flip as usize) % (bad.len() * 8);
                    bad[bit / 8] ^= 1 << (bit % 8);
                    prop_assert_eq!(
                        hashes.verify_chunk(index, &bad),
                        Err(ChunkError::HashMismatch { index })
                    );
                }
            }
        }
    }
}
