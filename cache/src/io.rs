//! Streaming access to chunks: a verifying writer, a verifying chunk reader, and a reader over a
//! whole blob. Each holds a guard so what it works on is not evicted underneath it.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;

use pkgmesh_protocol::blob::{BlobId, ChunkHashes, ChunkVerifier};

use crate::error::CacheError;
use crate::store::{
    chunk_failure_detail, read_some, BlobGuard, ChunkGuard, Inner, Reservation, TmpFile,
};

/// Buffer for draining and skipping: large enough for BLAKE3's SIMD paths.
const STREAM_BUFFER: usize = 256 * 1024;

pub(crate) enum StreamFailure {
    Io(io::Error),
    /// The bytes on disk are not the chunk: the detail says how.
    Rotted(String),
}

/// Reads one chunk file, hashing as it goes. The read that delivers the chunk's last bytes also
/// checks the hash, and on a mismatch returns the failure instead of those bytes, so a reader
/// that stops at the expected length still never ends up with a whole rotted chunk.
pub(crate) struct VerifiedChunkStream {
    file: File,
    id: BlobId,
    index: u32,
    len: u64,
    remaining: u64,
    verifier: Option<ChunkVerifier>,
    failed: Option<String>,
}

impl VerifiedChunkStream {
    pub fn open(path: &Path, hashes: &ChunkHashes, index: u32) -> io::Result<Self> {
        let verifier = hashes
            .chunk_verifier(index)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let len = verifier.expected_len() as u64;
        Ok(VerifiedChunkStream {
            file: File::open(path)?,
            id: hashes.id(),
            index,
            len,
            remaining: len,
            verifier: Some(verifier),
            failed: None,
        })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn read(&mut self, buffer: &mut [u8]) -> Result<usize, StreamFailure> {
        if let Some(detail) = &self.failed {
            return Err(StreamFailure::Rotted(detail.clone()));
        }
        if self.remaining == 0 {
            self.finish()?;
            return Ok(0);
        }
        if buffer.is_empty() {
            return Ok(0);
        }
        let want = (buffer.len() as u64).min(self.remaining) as usize;
        let n = read_some(&mut self.file, &mut buffer[..want]).map_err(StreamFailure::Io)?;
        if n == 0 {
            let detail = format!(
                "chunk {} of blob {} failed verification: its file is {} bytes, the chunk {}",
                self.index,
                self.id,
                self.len - self.remaining,
                self.len
            );
            return Err(self.fail(detail));
        }
        if let Some(verifier) = self.verifier.as_mut() {
            if let Err(error) = verifier.update(&buffer[..n]) {
                let detail = chunk_failure_detail(self.id, error);
                return Err(self.fail(detail));
            }
        }
        self.remaining -= n as u64;
        if self.remaining == 0 {
            self.finish()?;
        }
        Ok(n)
    }

    /// Reads the rest of the chunk, only to check it.
    pub fn drain(&mut self) -> Result<(), StreamFailure> {
        self.skip(self.remaining)?;
        self.finish()
    }

    /// Reads and discards `count` bytes (they still go through the hash).
    pub fn skip(&mut self, mut count: u64) -> Result<(), StreamFailure> {
        let mut buffer = vec![0u8; STREAM_BUFFER.min(count as usize)];
        while count > 0 {
            let want = (buffer.len() as u64).min(count) as usize;
            let n = self.read(&mut buffer[..want])?;
            if n == 0 {
                break;
            }
            count -= n as u64;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), StreamFailure> {
        match self.verifier.take() {
            Some(verifier) => verifier.finish().map_err(|error| {
                let detail = chunk_failure_detail(self.id, error);
                self.fail(detail)
            }),
            None => match &self.failed {
                Some(detail) => Err(StreamFailure::Rotted(detail.clone())),
                None => Ok(()),
            },
        }
    }

    fn fail(&mut self, detail: String) -> StreamFailure {
        self.verifier = None;
        self.failed = Some(detail.clone());
        StreamFailure::Rotted(detail)
    }
}

fn rotted_io_error(detail: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, detail)
}

/// A streaming put, from [`ChunkStore::chunk_writer`](crate::ChunkStore::chunk_writer). Bytes are
/// hashed as they arrive and refused as soon as there are too many; the chunk becomes visible
/// only when [`ChunkWriter::commit`] finds the hash right. Dropped uncommitted, it deletes its
/// temp file and gives back its share of the budget.
pub struct ChunkWriter {
    inner: Arc<Inner>,
    guard: ChunkGuard,
    reservation: Option<Reservation>,
    tmp: Option<TmpFile>,
    verifier: Option<ChunkVerifier>,
    written: u64,
    failed: bool,
}

impl ChunkWriter {
    pub(crate) fn new(
        inner: Arc<Inner>,
        guard: ChunkGuard,
        reservation: Reservation,
        tmp: TmpFile,
        verifier: ChunkVerifier,
    ) -> Self {
        ChunkWriter {
            inner,
            guard,
            reservation: Some(reservation),
            tmp: Some(tmp),
            verifier: Some(verifier),
            written: 0,
            failed: false,
        }
    }

    pub fn blob_id(&self) -> BlobId {
        self.guard.key().0
    }

    pub fn index(&self) -> u32 {
        self.guard.key().1
    }

    /// The length the chunk must have.
    pub fn expected_len(&self) -> u64 {
        self.verifier
            .as_ref()
            .map(|v| v.expected_len() as u64)
            .unwrap_or(0)
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends bytes. Fails at once if they run past the chunk's length or the disk is full;
    /// after a failure the writer refuses everything and should be dropped.
    pub fn write(&mut self, data: &[u8]) -> Result<(), CacheError> {
        let (id, index) = self.guard.key();
        let (Some(verifier), Some(tmp), false) =
            (self.verifier.as_mut(), self.tmp.as_mut(), self.failed)
        else {
            return Err(CacheError::WriterFailed { id, index });
        };
        if let Err(error) = verifier.update(data) {
            self.failed = true;
            return Err(CacheError::from_chunk(id, error));
        }
        if let Err(error) = tmp.write_all(&self.inner, data) {
            self.failed = true;
            return Err(error);
        }
        self.written += data.len() as u64;
        Ok(())
    }

    /// Checks the hash and, if right, makes the chunk visible. Like
    /// [`ChunkStore::put_chunk`](crate::ChunkStore::put_chunk), the chunk then survives a crash
    /// of the process, and a power loss once the next sync round (or a `flush`) has run.
    pub fn commit(mut self) -> Result<(), CacheError> {
        let (id, index) = self.guard.key();
        let (Some(verifier), Some(tmp), Some(reservation), false) = (
            self.verifier.take(),
            self.tmp.take(),
            self.reservation.take(),
            self.failed,
        ) else {
            return Err(CacheError::WriterFailed { id, index });
        };
        verifier
            .finish()
            .map_err(|error| CacheError::from_chunk(id, error))?;
        self.inner.install((id, index), tmp, reservation)
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        ChunkWriter::write(self, buffer)
            .map(|()| buffer.len())
            .map_err(CacheError::into_io)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Visibility comes with commit and durability with the sync round after it; there is
        // nothing useful to do before commit.
        Ok(())
    }
}

/// One chunk as a stream, from [`ChunkStore::open_chunk`](crate::ChunkStore::open_chunk).
/// Verified as it is read: a rotted chunk ends in an `InvalidData` error rather than EOF, and is
/// dropped from the store. The chunk is not evicted while the reader is open.
pub struct ChunkReader {
    inner: Arc<Inner>,
    guard: ChunkGuard,
    stream: VerifiedChunkStream,
}

impl ChunkReader {
    pub(crate) fn new(inner: Arc<Inner>, guard: ChunkGuard, stream: VerifiedChunkStream) -> Self {
        ChunkReader {
            inner,
            guard,
            stream,
        }
    }

    pub fn blob_id(&self) -> BlobId {
        self.guard.key().0
    }

    pub fn index(&self) -> u32 {
        self.guard.key().1
    }

    /// The chunk's length in bytes.
    pub fn len(&self) -> u64 {
        self.stream.len()
    }

    pub fn is_empty(&self) -> bool {
        self.stream.len() == 0
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        match self.stream.read(buffer) {
            Ok(n) => Ok(n),
            Err(StreamFailure::Io(error)) => Err(error),
            Err(StreamFailure::Rotted(detail)) => {
                self.inner.rotted(self.guard.key(), &detail);
                Err(rotted_io_error(detail))
            }
        }
    }
}

/// A whole blob as one stream, from [`ChunkStore::open_blob`](crate::ChunkStore::open_blob).
/// Each chunk is verified as it is read (as [`ChunkReader`]); seeking is cheap (it re-hashes at
/// most one chunk's prefix). No chunk of the blob is evicted while the reader is open.
pub struct BlobReader {
    inner: Arc<Inner>,
    _guard: BlobGuard,
    hashes: Arc<ChunkHashes>,
    position: u64,
    current: Option<(ChunkGuard, VerifiedChunkStream)>,
}

impl BlobReader {
    pub(crate) fn new(inner: Arc<Inner>, guard: BlobGuard, hashes: Arc<ChunkHashes>) -> Self {
        BlobReader {
            inner,
            _guard: guard,
            hashes,
            position: 0,
            current: None,
        }
    }

    pub fn blob_id(&self) -> BlobId {
        self.hashes.id()
    }

    /// The blob's size in bytes.
    pub fn len(&self) -> u64 {
        self.hashes.layout().size()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn open_current(&mut self) -> io::Result<()> {
        let layout = self.hashes.layout();
        let index = layout.chunk_of(self.position);
        let key = (self.hashes.id(), index);
        let guard = self.inner.guard_if_held(key).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "chunk {index} of blob {} is no longer held (it failed verification)",
                    key.0
                ),
            )
        })?;
        self.inner.touch(&key);
        let path = self.inner.paths.chunk_path(&key);
        let mut stream = VerifiedChunkStream::open(&path, &self.hashes, index)?;
        let skip = self.position - layout.chunk_offset(index);
        if let Err(failure) = stream.skip(skip) {
            return Err(self.failure(key, failure));
        }
        self.current = Some((guard, stream));
        Ok(())
    }

    fn failure(&mut self, key: (BlobId, u32), failure: StreamFailure) -> io::Error {
        self.current = None;
        match failure {
            StreamFailure::Io(error) => error,
            StreamFailure::Rotted(detail) => {
                self.inner.rotted(key, &detail);
                rotted_io_error(detail)
            }
        }
    }
}

impl Read for BlobReader {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        if buffer.is_empty() {
            return Ok(0);
        }
        loop {
            if self.current.is_none() {
                if self.position >= self.len() {
                    return Ok(0);
                }
                self.open_current()?;
            }
            let Some((guard, stream)) = self.current.as_mut() else {
                continue;
            };
            let key = guard.key();
            match stream.read(buffer) {
                // The chunk ended, verified: go on to the next.
                Ok(0) => self.current = None,
                Ok(n) => {
                    self.position += n as u64;
                    return Ok(n);
                }
                Err(failure) => return Err(self.failure(key, failure)),
            }
        }
    }
}

impl Seek for BlobReader {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(offset) => Some(offset),
            SeekFrom::End(delta) => self.len().checked_add_signed(delta),
            SeekFrom::Current(delta) => self.position.checked_add_signed(delta),
        }
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek to a negative or overflowing position",
            )
        })?;
        if target != self.position {
            self.current = None;
            self.position = target;
        }
        Ok(self.position)
    }
}
