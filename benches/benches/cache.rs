//! Chunk store micro-benchmarks: put and get throughput of 256 KiB chunks (the chunk size of
//! every blob up to 512 MiB), a baseline doing the same file work without the store (so the
//! index's share of a put shows as a ratio), reading a whole blob, and opening a store that
//! holds 100,000 chunks.
//!
//! Run: `cargo bench -p pkgmesh-benches --bench cache`. The 100,000-chunk store is built once
//! under `target/bench-fixtures/` and reused by later runs. Before the criterion groups, store
//! puts and bare file puts are timed alternately and their medians printed, because on a shared
//! disk fsync latency drifts more between two criterion runs than the index costs.

use std::fs::{self, File};
use std::hint::black_box;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pkgmesh_cache::{CacheConfig, ChunkStore};
use pkgmesh_protocol::blob::{hash_reader, ChunkHashes, MIN_CHUNK_SIZE};

const CHUNK: usize = MIN_CHUNK_SIZE as usize;
const BLOB_CHUNKS: usize = 256;
const OPEN_CHUNKS: u32 = 100_000;

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

struct Blob {
    bytes: Vec<u8>,
    hashes: ChunkHashes,
}

impl Blob {
    fn new(len: usize, seed: u64) -> Blob {
        let bytes = pseudo_random(len, seed);
        let hashes = hash_reader(&bytes[..], len as u64).unwrap();
        Blob { bytes, hashes }
    }

    fn chunk(&self, index: u32) -> &[u8] {
        let layout = self.hashes.layout();
        let start = layout.chunk_offset(index) as usize;
        &self.bytes[start..start + layout.chunk_len(index).unwrap() as usize]
    }
}

/// Scratch space on the real disk (not tmpfs), so fsync costs what it costs.
fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in(target_dir()).unwrap()
}

fn target_dir() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn open(dir: &Path, budget_bytes: u64) -> ChunkStore {
    ChunkStore::open(CacheConfig {
        dir: dir.to_path_buf(),
        budget_bytes,
    })
    .unwrap()
}

fn bench_put(c: &mut Criterion) {
    put_versus_baseline_interleaved();
    let blob = Blob::new(BLOB_CHUNKS * CHUNK, 1);
    let id = blob.hashes.id();
    let mut group = c.benchmark_group("cache_put");
    group.throughput(Throughput::Bytes(CHUNK as u64));
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(8));

    // Puts cycle through the blob's chunks; when all are held the blob is evicted, untimed.
    let timed_puts = |store: &ChunkStore, iters: u64, put: &dyn Fn(&ChunkStore, u32)| {
        let mut total = Duration::ZERO;
        for i in 0..iters {
            let index = (i % BLOB_CHUNKS as u64) as u32;
            if index == 0 && store.bitfield(&id).is_some_and(|b| b.count_ones() > 0) {
                store.evict_blob(&id).unwrap();
                store.register_blob(&blob.hashes).unwrap();
            }
            let started = Instant::now();
            put(store, index);
            total += started.elapsed();
        }
        total
    };

    let dir = scratch();
    let store = open(dir.path(), 1 << 30);
    store.register_blob(&blob.hashes).unwrap();
    group.bench_function("put_chunk_256KiB", |b| {
        b.iter_custom(|iters| {
            timed_puts(&store, iters, &|store, index| {
                store.put_chunk(&id, index, blob.chunk(index)).unwrap()
            })
        })
    });
    group.bench_function("chunk_writer_256KiB_in_64KiB_writes", |b| {
        b.iter_custom(|iters| {
            timed_puts(&store, iters, &|store, index| {
                let mut writer = store.chunk_writer(&id, index).unwrap();
                for piece in blob.chunk(index).chunks(64 * 1024) {
                    writer.write_all(piece).unwrap();
                }
                writer.commit().unwrap();
            })
        })
    });
    drop(store);

    let mut baseline = Baseline::new();
    group.bench_function("baseline_verify_write_fsync_rename_256KiB", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for i in 0..iters {
                total += baseline.put(&blob, (i % BLOB_CHUNKS as u64) as u32);
            }
            total
        })
    });
    group.finish();
}

/// The file work of a put with no store around it: verify, temp file, fsync, rename, directory
/// fsync. Like the store's bench loop, files pile up and are deleted 256 at a time, untimed.
struct Baseline {
    root: tempfile::TempDir,
    puts: u64,
}

impl Baseline {
    fn new() -> Baseline {
        let root = scratch();
        fs::create_dir_all(root.path().join("tmp")).unwrap();
        fs::create_dir_all(root.path().join("chunks")).unwrap();
        Baseline { root, puts: 0 }
    }

    fn put(&mut self, blob: &Blob, index: u32) -> Duration {
        let chunks = self.root.path().join("chunks");
        if index == 0 && self.puts > 0 {
            fs::remove_dir_all(&chunks).unwrap();
            fs::create_dir_all(&chunks).unwrap();
        }
        self.puts += 1;
        let started = Instant::now();
        blob.hashes.verify_chunk(index, blob.chunk(index)).unwrap();
        let tmp_path = self
            .root
            .path()
            .join("tmp")
            .join(format!("{}.part", self.puts));
        let mut file = File::create_new(&tmp_path).unwrap();
        file.write_all(blob.chunk(index)).unwrap();
        file.sync_data().unwrap();
        drop(file);
        fs::rename(&tmp_path, chunks.join(index.to_string())).unwrap();
        File::open(&chunks).unwrap().sync_all().unwrap();
        started.elapsed()
    }
}

/// Store puts and bare file puts measured alternately, so that whatever else the disk is doing
/// at the moment hits both alike; prints the medians and their ratio.
fn put_versus_baseline_interleaved() {
    const ROUNDS: usize = 4 * BLOB_CHUNKS;
    let blob = Blob::new(BLOB_CHUNKS * CHUNK, 3);
    let id = blob.hashes.id();
    let dir = scratch();
    let store = open(dir.path(), 1 << 30);
    store.register_blob(&blob.hashes).unwrap();
    let mut baseline = Baseline::new();
    let (mut stored, mut bare) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let index = (round % BLOB_CHUNKS) as u32;
        if index == 0 && round > 0 {
            store.evict_blob(&id).unwrap();
            store.register_blob(&blob.hashes).unwrap();
        }
        let started = Instant::now();
        store.put_chunk(&id, index, blob.chunk(index)).unwrap();
        stored.push(started.elapsed());
        bare.push(baseline.put(&blob, index));
    }
    let median = |times: &mut Vec<Duration>| {
        times.sort();
        times[times.len() / 2]
    };
    let (stored, bare) = (median(&mut stored), median(&mut bare));
    let mib_s = |t: Duration| CHUNK as f64 / (1 << 20) as f64 / t.as_secs_f64();
    eprintln!(
        "interleaved, {ROUNDS} rounds of 256 KiB: store put_chunk median {:.0} us ({:.0} MiB/s), \
         bare verify+write+fsync+rename+dir fsync median {:.0} us ({:.0} MiB/s), ratio {:.2}",
        stored.as_secs_f64() * 1e6,
        mib_s(stored),
        bare.as_secs_f64() * 1e6,
        mib_s(bare),
        stored.as_secs_f64() / bare.as_secs_f64()
    );
}

fn bench_get(c: &mut Criterion) {
    let blob = Blob::new(BLOB_CHUNKS * CHUNK, 2);
    let id = blob.hashes.id();
    let dir = scratch();
    let store = open(dir.path(), 1 << 30);
    let file = dir.path().join("blob");
    fs::write(&file, &blob.bytes).unwrap();
    store.import_file(&file).unwrap();

    let mut group = c.benchmark_group("cache_get");
    group.throughput(Throughput::Bytes(CHUNK as u64));
    let mut next = 0u32;
    group.bench_function("get_chunk_256KiB_verified", |b| {
        b.iter(|| {
            next = (next + 1) % BLOB_CHUNKS as u32;
            black_box(store.get_chunk(&id, next).unwrap().unwrap())
        })
    });
    let mut buffer = vec![0u8; 64 * 1024];
    group.bench_function("open_chunk_256KiB_streamed_verified", |b| {
        b.iter(|| {
            next = (next + 1) % BLOB_CHUNKS as u32;
            let mut reader = store.open_chunk(&id, next).unwrap().unwrap();
            while reader.read(&mut buffer).unwrap() > 0 {}
        })
    });
    group.throughput(Throughput::Bytes(blob.bytes.len() as u64));
    group.sample_size(20);
    group.bench_function("open_blob_64MiB_read_verified", |b| {
        b.iter(|| {
            let mut reader = store.open_blob(&id).unwrap();
            while reader.read(&mut buffer).unwrap() > 0 {}
        })
    });
    group.finish();
}

/// A store of 100,000 one-chunk blobs: the most index rows and directories per chunk, so the
/// worst case for open. Built once on tmpfs (where fsync is free, so it takes seconds rather
/// than many minutes), copied to the real disk under the target directory, and kept there.
fn open_fixture() -> PathBuf {
    let dir = target_dir().join("bench-fixtures").join("cache-open-100k");
    let done = dir.join("complete");
    if done.exists() {
        return dir.join("store");
    }
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let started = Instant::now();
    let build = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| scratch());
    let store = open(&build.path().join("store"), 1 << 40);
    for seed in 0..OPEN_CHUNKS {
        let bytes = pseudo_random(512, 1_000_000 + seed as u64);
        black_box(store.import_reader(&bytes[..], 512).unwrap());
    }
    assert_eq!(store.stats().chunks, OPEN_CHUNKS as u64);
    drop(store);
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(build.path().join("store"))
        .arg(dir.join("store"))
        .status()
        .unwrap();
    assert!(copied.success());
    eprintln!(
        "built the {OPEN_CHUNKS}-chunk store in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    fs::write(done, b"").unwrap();
    dir.join("store")
}

fn bench_open(c: &mut Criterion) {
    let store_dir = open_fixture();
    let mut group = c.benchmark_group("cache_open");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(15));
    group.bench_function("open_store_holding_100000_chunks", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let started = Instant::now();
                let store = open(&store_dir, 1 << 40);
                total += started.elapsed();
                assert_eq!(store.stats().chunks, OPEN_CHUNKS as u64);
                drop(store);
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, bench_put, bench_get, bench_open);
criterion_main!(benches);
