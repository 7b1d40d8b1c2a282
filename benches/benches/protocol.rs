//! Micro-benchmarks of the pure protocol: raw BLAKE3 as the yardstick, blob hashing, chunk
//! verification (whole, and streamed in the 64 KiB pieces a node receives), and frame
//! encode/decode of the messages on the chunk path.
//!
//! Run: `cargo bench -p pkgmesh-benches --bench protocol`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pkgmesh_protocol::blob::{BlobHasher, BlobId, ChunkHashes};
use pkgmesh_protocol::wire::{decode_frame, encode, Request, Response};

const MIB: usize = 1024 * 1024;

fn pseudo_random(len: usize) -> Vec<u8> {
    let mut state = 0x9e3779b97f4a7c15u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn hashing(c: &mut Criterion) {
    let data = pseudo_random(64 * MIB);
    let mut group = c.benchmark_group("hash_64MiB");
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.sample_size(20);
    group.bench_function("blake3_single_thread", |b| {
        b.iter(|| blake3::Hasher::new().update(&data).finalize())
    });
    group.bench_function("blob_hasher", |b| {
        b.iter(|| {
            let mut hasher = BlobHasher::new(data.len() as u64).unwrap();
            for piece in data.chunks(256 * 1024) {
                hasher.update(piece);
            }
            hasher.finish().unwrap()
        })
    });
    group.finish();

    let hashes = hash_all(&data);
    let chunk_len = hashes.layout().chunk_len(3).unwrap() as usize;
    let start = hashes.layout().chunk_offset(3) as usize;
    let chunk = &data[start..start + chunk_len];
    let mut group = c.benchmark_group("chunk");
    group.throughput(Throughput::Bytes(chunk_len as u64));
    group.bench_function(BenchmarkId::new("verify", chunk_len), |b| {
        b.iter(|| hashes.verify_chunk(3, chunk).unwrap())
    });
    // The receive path: a chunk verified as it streams in, a piece at a time, so the per-piece
    // cost shows against the whole-chunk figure above.
    group.bench_function(BenchmarkId::new("verify_streamed_64KiB", chunk_len), |b| {
        b.iter(|| {
            let mut verifier = hashes.chunk_verifier(3).unwrap();
            for piece in chunk.chunks(64 * 1024) {
                verifier.update(piece).unwrap();
            }
            verifier.finish().unwrap()
        })
    });
    group.finish();

    let packed = hashes.to_packed();
    c.bench_function("chunk_hashes_verify_list_256", |b| {
        b.iter(|| ChunkHashes::verify_packed(hashes.id(), data.len() as u64, &packed).unwrap())
    });
}

fn hash_all(data: &[u8]) -> ChunkHashes {
    let mut hasher = BlobHasher::new(data.len() as u64).unwrap();
    hasher.update(data);
    hasher.finish().unwrap()
}

fn frames(c: &mut Criterion) {
    let request = Request::GetChunk {
        blob: BlobId([7; 32]),
        index: 1234,
        after_peer_failure: false,
    };
    let response = Response::ChunkHashes {
        blob: BlobId([9; 32]),
        packed: vec![5; 2048 * 32],
    };
    // The header that precedes every chunk's bytes on its stream.
    let header = Response::Chunk {
        blob: BlobId([3; 32]),
        index: 1234,
        len: 512 * 1024,
    };
    let request_frame = encode(&request).unwrap();
    let response_frame = encode(&response).unwrap();
    let header_frame = encode(&header).unwrap();
    let mut group = c.benchmark_group("frame");
    group.bench_function("encode_get_chunk", |b| b.iter(|| encode(&request).unwrap()));
    group.bench_function("decode_get_chunk", |b| {
        b.iter(|| decode_frame::<Request>(&request_frame).unwrap().unwrap())
    });
    group.bench_function("encode_chunk_header", |b| {
        b.iter(|| encode(&header).unwrap())
    });
    group.bench_function("decode_chunk_header", |b| {
        b.iter(|| decode_frame::<Response>(&header_frame).unwrap().unwrap())
    });
    group.throughput(Throughput::Bytes(response_frame.len() as u64));
    group.bench_function("encode_chunk_hashes_2048", |b| {
        b.iter(|| encode(&response).unwrap())
    });
    group.bench_function("decode_chunk_hashes_2048", |b| {
        b.iter(|| decode_frame::<Response>(&response_frame).unwrap().unwrap())
    });
    group.finish();
}

criterion_group!(benches, hashing, frames);
criterion_main!(benches);
