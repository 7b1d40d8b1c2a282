//! Behaviour of the chunk store through its public API: puts and gets, streaming, imports,
//! pins, eviction, persistence across reopen, rot, and reconciliation at open.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};

use common::*;
use pkgmesh_cache::{CacheError, ChunkStore};

const MIB: u64 = 1 << 20;

#[test]
fn put_then_get_returns_the_chunk_and_counts_hits_and_misses() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 16 * MIB);
    let blob = TestBlob::new(2 * CHUNK + 100, 1);
    store.register_blob(&blob.hashes).unwrap();
    assert_eq!(store.chunk_hashes(&blob.id()).unwrap(), blob.hashes);
    assert!(store.get_chunk(&blob.id(), 1).unwrap().is_none());
    store.put_chunk(&blob.id(), 1, blob.chunk(1)).unwrap();
    store.put_chunk(&blob.id(), 1, blob.chunk(1)).unwrap(); // again: a no-op
    assert_eq!(
        &store.get_chunk(&blob.id(), 1).unwrap().unwrap()[..],
        blob.chunk(1)
    );
    let bitfield = store.bitfield(&blob.id()).unwrap();
    assert_eq!(bitfield.iter_ones().collect::<Vec<_>>(), vec![1]);
    assert!(!store.is_complete(&blob.id()));
    let stats = store.stats();
    assert_eq!((stats.hits, stats.misses), (1, 1));
    assert_eq!(stats.used_bytes, CHUNK as u64);
    assert_eq!(stats.chunks, 1);
    assert!(tmp_files(dir.path()).is_empty());
    assert!(matches!(
        store.get_chunk(&blob.id(), 3),
        Err(CacheError::ChunkOutOfRange {
            index: 3,
            count: 3,
            ..
        })
    ));
}

#[test]
fn a_bad_chunk_is_refused_with_its_index_and_blob_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 16 * MIB);
    let blob = TestBlob::new(8 * CHUNK, 2);
    store.register_blob(&blob.hashes).unwrap();
    let mut bad = blob.chunk(7).to_vec();
    bad[100] ^= 1;
    let error = store.put_chunk(&blob.id(), 7, &bad).unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains(&format!(
            "chunk 7 of blob {} failed verification",
            blob.id()
        )),
        "{message}"
    );
    // Chunk 0's bytes offered as chunk 7: right length, wrong place.
    assert!(matches!(
        store.put_chunk(&blob.id(), 7, blob.chunk(0)),
        Err(CacheError::ChunkVerification { index: 7, .. })
    ));
    assert!(matches!(
        store.put_chunk(&blob.id(), 7, &blob.chunk(7)[1..]),
        Err(CacheError::ChunkVerification { index: 7, .. })
    ));
    assert!(store.bitfield(&blob.id()).unwrap().count_ones() == 0);
    assert_eq!(store.stats().used_bytes, 0);
    assert_eq!(store.stats().reserved_bytes, 0);
    assert!(tmp_files(dir.path()).is_empty());
    assert!(chunk_files(dir.path()).is_empty());

    let other = TestBlob::new(100, 3);
    let error = store.put_chunk(&other.id(), 0, other.chunk(0)).unwrap_err();
    assert!(matches!(error, CacheError::Unregistered { .. }));
    assert!(error.to_string().contains("not registered"), "{error}");
}

#[test]
fn streaming_writer_verifies_as_it_goes_and_only_commit_makes_it_visible() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 16 * MIB);
    let blob = TestBlob::new(3 * CHUNK, 4);
    store.register_blob(&blob.hashes).unwrap();

    // Written in odd pieces through io::Write, then committed.
    let mut writer = store.chunk_writer(&blob.id(), 0).unwrap();
    assert_eq!(writer.expected_len(), CHUNK as u64);
    for piece in blob.chunk(0).chunks(10_007) {
        writer.write_all(piece).unwrap();
    }
    assert!(store.get_chunk(&blob.id(), 0).unwrap().is_none());
    writer.commit().unwrap();
    assert_eq!(
        &store.get_chunk(&blob.id(), 0).unwrap().unwrap()[..],
        blob.chunk(0)
    );

    // Dropped without commit: nothing left, budget given back.
    let mut writer = store.chunk_writer(&blob.id(), 1).unwrap();
    writer.write(&blob.chunk(1)[..1000]).unwrap();
    assert_eq!(store.stats().reserved_bytes, CHUNK as u64);
    drop(writer);
    assert_eq!(store.stats().reserved_bytes, 0);
    assert!(tmp_files(dir.path()).is_empty());
    assert!(!store.bitfield(&blob.id()).unwrap().get(1));

    // Too many bytes are refused at once, and the writer stays refused.
    let mut writer = store.chunk_writer(&blob.id(), 2).unwrap();
    writer.write(blob.chunk(2)).unwrap();
    assert!(matches!(
        writer.write(b"x"),
        Err(CacheError::ChunkVerification { index: 2, .. })
    ));
    assert!(matches!(
        writer.commit(),
        Err(CacheError::WriterFailed { .. })
    ));

    // Wrong bytes fail at commit.
    let mut writer = store.chunk_writer(&blob.id(), 2).unwrap();
    writer.write(blob.chunk(1)).unwrap();
    let error = writer.commit().unwrap_err();
    assert!(error.to_string().contains("chunk 2 of blob"), "{error}");
    assert!(tmp_files(dir.path()).is_empty());
    assert_eq!(store.stats().used_bytes, CHUNK as u64);
}

#[test]
fn open_chunk_streams_and_open_blob_reads_and_seeks_the_whole_blob() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 16 * MIB);
    let blob = TestBlob::new(3 * CHUNK + 777, 5);
    store.register_blob(&blob.hashes).unwrap();
    for index in 0..blob.chunk_count() - 1 {
        store
            .put_chunk(&blob.id(), index, blob.chunk(index))
            .unwrap();
    }
    let error = store.open_blob(&blob.id()).err().unwrap();
    assert!(
        matches!(
            error,
            CacheError::Incomplete {
                held: 3,
                total: 4,
                ..
            }
        ),
        "{error}"
    );
    store.put_chunk(&blob.id(), 3, blob.chunk(3)).unwrap();
    assert!(store.is_complete(&blob.id()));

    let mut reader = store.open_chunk(&blob.id(), 3).unwrap().unwrap();
    assert_eq!(reader.len(), 777);
    let mut got = Vec::new();
    reader.read_to_end(&mut got).unwrap();
    assert_eq!(got, blob.chunk(3));
    assert!(store
        .open_chunk(&TestBlob::new(10, 9).id(), 0)
        .unwrap()
        .is_none());

    let mut whole = store.open_blob(&blob.id()).unwrap();
    let mut got = Vec::new();
    whole.read_to_end(&mut got).unwrap();
    assert!(got == blob.bytes);
    for offset in [
        0u64,
        1,
        CHUNK as u64 - 1,
        CHUNK as u64,
        2 * CHUNK as u64 + 5,
        blob.bytes.len() as u64 - 1,
    ] {
        whole.seek(SeekFrom::Start(offset)).unwrap();
        let mut piece = vec![0u8; 1000];
        let n = whole.read(&mut piece).unwrap();
        assert!(n > 0);
        assert_eq!(
            &piece[..n],
            &blob.bytes[offset as usize..offset as usize + n]
        );
    }
    assert_eq!(
        whole.seek(SeekFrom::End(0)).unwrap(),
        blob.bytes.len() as u64
    );
    assert_eq!(whole.read(&mut [0u8; 10]).unwrap(), 0);
    assert!(whole
        .seek(SeekFrom::Current(-(blob.bytes.len() as i64) - 1))
        .is_err());
}

#[test]
fn import_file_and_reader_store_every_chunk_and_refuse_a_wrong_size() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 16 * MIB);
    let blob = TestBlob::new(4 * CHUNK + 12_345, 6);
    let file = dir.path().join("package.zip");
    std::fs::write(&file, &blob.bytes).unwrap();
    let hashes = store.import_file(&file).unwrap();
    assert_eq!(hashes, blob.hashes);
    assert_eq!(hashes.id().0, *blake3::hash(&blob.bytes).as_bytes());
    assert!(store.is_complete(&blob.id()));
    let mut got = Vec::new();
    store
        .open_blob(&blob.id())
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    assert!(got == blob.bytes);

    let small = TestBlob::new(1000, 7);
    assert_eq!(
        store.import_reader(&small.bytes[..], 1000).unwrap(),
        small.hashes
    );
    let empty = TestBlob::new(0, 0);
    assert_eq!(store.import_reader(&[][..], 0).unwrap(), empty.hashes);
    assert!(store.is_complete(&empty.id()));
    assert_eq!(&store.get_chunk(&empty.id(), 0).unwrap().unwrap()[..], b"");

    let before = store.stats();
    let other = TestBlob::new(CHUNK + 10, 8);
    assert!(matches!(
        store.import_reader(&other.bytes[..], other.bytes.len() as u64 + 1),
        Err(CacheError::ImportSize { .. })
    ));
    assert!(matches!(
        store.import_reader(&other.bytes[..], other.bytes.len() as u64 - 1),
        Err(CacheError::ImportSize { .. })
    ));
    assert!(store.chunk_hashes(&other.id()).is_none());
    assert_eq!(store.stats().used_bytes, before.used_bytes);
    assert_eq!(store.stats().reserved_bytes, 0);
    assert!(tmp_files(dir.path()).is_empty());

    let huge = TestBlob::new(100, 9);
    let tight = open(&dir.path().join("tight"), 50);
    assert!(matches!(
        tight.import_reader(&huge.bytes[..], 100),
        Err(CacheError::TooLargeForBudget {
            size: 100,
            budget: 50,
            ..
        })
    ));
}

#[test]
fn the_least_recently_used_unpinned_chunks_go_first_and_the_budget_holds() {
    let dir = tempfile::tempdir().unwrap();
    // Room for exactly four 256 KiB chunks.
    let store = open(dir.path(), 4 * CHUNK as u64);
    let blob = TestBlob::new(8 * CHUNK, 10);
    store.register_blob(&blob.hashes).unwrap();
    for index in 0..4 {
        store
            .put_chunk(&blob.id(), index, blob.chunk(index))
            .unwrap();
    }
    // Touch 0, so 1 is now the oldest.
    store.get_chunk(&blob.id(), 0).unwrap().unwrap();
    store.put_chunk(&blob.id(), 4, blob.chunk(4)).unwrap();
    let held: Vec<u32> = store.bitfield(&blob.id()).unwrap().iter_ones().collect();
    assert_eq!(held, vec![0, 2, 3, 4]);
    let order: Vec<u32> = store.eviction_order().iter().map(|k| k.1).collect();
    assert_eq!(order, vec![2, 3, 0, 4]);
    // A chunk open in a reader is not evicted even when it is the oldest.
    let reader = store.open_chunk(&blob.id(), 2).unwrap().unwrap();
    store.put_chunk(&blob.id(), 5, blob.chunk(5)).unwrap();
    assert!(store.bitfield(&blob.id()).unwrap().get(2));
    assert!(!store.bitfield(&blob.id()).unwrap().get(3));
    drop(reader);
    let stats = store.stats();
    assert!(stats.used_bytes <= stats.budget_bytes);
    assert_eq!(stats.evicted_chunks, 2);
    assert_eq!(stats.evicted_bytes, 2 * CHUNK as u64);
    let on_disk: u64 = chunk_files(dir.path()).iter().map(|f| f.1).sum();
    assert_eq!(on_disk, stats.used_bytes);
}

#[test]
fn pins_protect_blobs_and_a_cache_full_of_pins_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 3 * CHUNK as u64);
    let pinned = TestBlob::new(2 * CHUNK, 11);
    let other = TestBlob::new(4 * CHUNK, 12);
    store.register_blob(&pinned.hashes).unwrap();
    store.register_blob(&other.hashes).unwrap();
    store.put_chunk(&pinned.id(), 0, pinned.chunk(0)).unwrap();
    store.pin(&pinned.id(), "installed").unwrap();
    store.pin(&pinned.id(), "deployment d-1").unwrap();
    store.put_chunk(&pinned.id(), 1, pinned.chunk(1)).unwrap();
    assert_eq!(store.stats().pinned_bytes, 2 * CHUNK as u64);
    store.put_chunk(&other.id(), 0, other.chunk(0)).unwrap();
    // The only evictable chunk goes; then nothing is left to evict.
    store.put_chunk(&other.id(), 1, other.chunk(1)).unwrap();
    assert!(!store.bitfield(&other.id()).unwrap().get(0));
    let error = store.put_chunk(&other.id(), 2, other.chunk(2));
    // other's chunk 1 is evictable, so this succeeds by evicting it...
    error.unwrap();
    // ...but pinned data alone plus a new chunk over the budget fails clearly.
    store.pin(&other.id(), "operator").unwrap();
    let error = store.put_chunk(&other.id(), 3, other.chunk(3)).unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains(&format!(
            "cache full of pinned data ({} bytes pinned, budget {})",
            3 * CHUNK,
            3 * CHUNK
        )),
        "{message}"
    );
    assert!(store.unpin(&other.id(), "operator").unwrap());
    assert!(!store.unpin(&other.id(), "operator").unwrap());

    let error = store.evict_blob(&pinned.id()).unwrap_err();
    assert!(
        error.to_string().contains("deployment d-1, installed"),
        "{error}"
    );
    assert!(store.unpin(&pinned.id(), "installed").unwrap());
    assert!(store.evict_blob(&pinned.id()).is_err());
    assert!(store.unpin(&pinned.id(), "deployment d-1").unwrap());
    assert_eq!(store.evict_blob(&pinned.id()).unwrap(), 2 * CHUNK as u64);
    assert!(store.chunk_hashes(&pinned.id()).is_none());
    assert!(matches!(
        store.pin(&pinned.id(), "x"),
        Err(CacheError::Unregistered { .. })
    ));
    assert!(matches!(
        store.pin(&other.id(), ""),
        Err(CacheError::BadPinReason { .. })
    ));
    assert!(matches!(
        store.pin(&other.id(), "a\nb"),
        Err(CacheError::BadPinReason { .. })
    ));
}

#[test]
fn chunks_pins_and_lru_order_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let a = TestBlob::new(3 * CHUNK, 13);
    let b = TestBlob::new(2 * CHUNK, 14);
    let (order, list) = {
        let store = open(dir.path(), 100 * MIB);
        store.register_blob(&a.hashes).unwrap();
        store.register_blob(&b.hashes).unwrap();
        for index in [2, 0, 1] {
            store.put_chunk(&a.id(), index, a.chunk(index)).unwrap();
        }
        store.put_chunk(&b.id(), 1, b.chunk(1)).unwrap();
        store.get_chunk(&a.id(), 2).unwrap().unwrap();
        store.pin(&b.id(), "installed").unwrap();
        (store.eviction_order(), store.list())
    };
    let store = open(dir.path(), 100 * MIB);
    assert_eq!(store.eviction_order(), order);
    assert_eq!(store.list(), list);
    assert_eq!(store.list()[0].pins.len() + store.list()[1].pins.len(), 1);
    assert_eq!(
        &store.get_chunk(&a.id(), 1).unwrap().unwrap()[..],
        a.chunk(1)
    );
    assert_eq!(store.stats().used_bytes, 4 * CHUNK as u64);
    assert_eq!(store.stats().pinned_bytes, CHUNK as u64);
    // A second handle on the same directory is refused while the first is open.
    assert!(ChunkStore::open(pkgmesh_cache::CacheConfig {
        dir: dir.path().to_path_buf(),
        budget_bytes: MIB
    })
    .is_err());
    drop(store);
    // A smaller budget at reopen evicts down to it, oldest first, keeping pins. The get of
    // chunk 1 above made it the most recent.
    let store = open(dir.path(), 2 * CHUNK as u64);
    assert_eq!(store.stats().used_bytes, 2 * CHUNK as u64);
    assert!(store.bitfield(&b.id()).unwrap().get(1));
    assert_eq!(
        store
            .bitfield(&a.id())
            .unwrap()
            .iter_ones()
            .collect::<Vec<_>>(),
        vec![1]
    );
}

#[test]
fn a_rotted_chunk_is_a_miss_for_get_and_is_dropped_and_reported_by_verify() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 16 * MIB);
    let blob = TestBlob::new(4 * CHUNK, 15);
    store.register_blob(&blob.hashes).unwrap();
    for index in 0..4 {
        store
            .put_chunk(&blob.id(), index, blob.chunk(index))
            .unwrap();
    }
    let flip = |index: u32, at: usize| {
        let path = chunk_path(dir.path(), &blob.id(), index);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[at] ^= 0x40;
        std::fs::write(&path, bytes).unwrap();
    };
    flip(1, 12_345);
    flip(2, CHUNK - 1);
    flip(3, 0);

    // get: a miss, and the chunk is gone.
    assert!(store.get_chunk(&blob.id(), 1).unwrap().is_none());
    assert!(!store.bitfield(&blob.id()).unwrap().get(1));
    assert!(!chunk_path(dir.path(), &blob.id(), 1).exists());

    // open_chunk: an InvalidData error instead of EOF, never the whole chunk.
    let mut reader = store.open_chunk(&blob.id(), 3).unwrap().unwrap();
    let mut got = Vec::new();
    let error = reader.read_to_end(&mut got).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
    assert!(error.to_string().contains("chunk 3 of blob"), "{error}");
    assert!(got.len() < CHUNK);
    drop(reader);
    assert!(!store.bitfield(&blob.id()).unwrap().get(3));

    // verify: reports and drops the rest.
    let report = store.verify(None).unwrap();
    assert_eq!(report.rotted.len(), 1);
    assert_eq!(report.rotted[0].index, 2);
    assert_eq!(report.rotted[0].id, blob.id());
    assert_eq!(report.chunks_checked, 2);
    assert!(!store.bitfield(&blob.id()).unwrap().get(2));
    assert_eq!(store.stats().rotted_chunks, 3);
    assert_eq!(store.stats().used_bytes, CHUNK as u64);
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["rotted"][0]["id"], blob.id().to_string());

    // A chunk file truncated behind the store's back is caught too.
    let path = chunk_path(dir.path(), &blob.id(), 0);
    std::fs::write(&path, &blob.chunk(0)[..10]).unwrap();
    let unknown = TestBlob::new(5, 99).id();
    let report = store.verify(Some(&[blob.id(), unknown])).unwrap();
    assert_eq!(report.rotted.len(), 1);
    assert_eq!(report.unknown, vec![unknown]);
    assert_eq!(store.stats().used_bytes, 0);

    // And a rotted chunk can be put again.
    store.put_chunk(&blob.id(), 2, blob.chunk(2)).unwrap();
    assert_eq!(
        &store.get_chunk(&blob.id(), 2).unwrap().unwrap()[..],
        blob.chunk(2)
    );
}

#[test]
fn a_rotted_chunk_inside_a_blob_read_fails_the_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 16 * MIB);
    let blob = TestBlob::new(2 * CHUNK + 1, 16);
    let file = dir.path().join("blob");
    std::fs::write(&file, &blob.bytes).unwrap();
    store.import_file(&file).unwrap();
    let path = chunk_path(dir.path(), &blob.id(), 1);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[5] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let mut reader = store.open_blob(&blob.id()).unwrap();
    let mut got = Vec::new();
    let error = reader.read_to_end(&mut got).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
    assert!(got.len() < 2 * CHUNK);
    assert!(!store.is_complete(&blob.id()));
}

#[test]
fn open_reconciles_files_rows_and_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    let blob = TestBlob::new(4 * CHUNK, 17);
    {
        let store = open(dir.path(), 16 * MIB);
        store.register_blob(&blob.hashes).unwrap();
        store.put_chunk(&blob.id(), 0, blob.chunk(0)).unwrap();
        store.put_chunk(&blob.id(), 1, blob.chunk(1)).unwrap();
    }
    // A torn temp file, a file without a row (good), one without a row (bad), a row without a
    // file, and strays.
    std::fs::write(dir.path().join("tmp").join("1-1.part"), b"torn").unwrap();
    std::fs::write(chunk_path(dir.path(), &blob.id(), 2), blob.chunk(2)).unwrap();
    std::fs::write(chunk_path(dir.path(), &blob.id(), 3), blob.chunk(1)).unwrap();
    std::fs::remove_file(chunk_path(dir.path(), &blob.id(), 1)).unwrap();
    let fanout = chunk_path(dir.path(), &blob.id(), 0)
        .parent()
        .unwrap()
        .to_path_buf();
    let hex = blob.id().to_hex();
    for stray in [
        format!("{hex}.007"),                // not canonical
        format!("{hex}.99"),                 // out of range
        format!("{hex}.x"),                  // not a number
        format!("{}.0", hex.to_uppercase()), // not canonical
        "junk".to_string(),
    ] {
        std::fs::write(fanout.join(stray), b"x").unwrap();
    }
    std::fs::create_dir(fanout.join(format!("{hex}.1"))).unwrap(); // a directory, not a file
    let unknown = dir.path().join("chunks").join("ff");
    std::fs::create_dir_all(&unknown).unwrap();
    std::fs::write(unknown.join(format!("{}.0", "f".repeat(64))), b"x").unwrap();
    std::fs::write(dir.path().join("chunks").join("zz"), b"x").unwrap();

    let store = open(dir.path(), 16 * MIB);
    assert_eq!(
        store
            .bitfield(&blob.id())
            .unwrap()
            .iter_ones()
            .collect::<Vec<_>>(),
        vec![0, 2]
    );
    assert!(tmp_files(dir.path()).is_empty());
    let files = chunk_files(dir.path());
    assert_eq!(files.len(), 2, "{files:?}");
    assert_eq!(store.stats().used_bytes, 2 * CHUNK as u64);
    assert_eq!(
        &store.get_chunk(&blob.id(), 2).unwrap().unwrap()[..],
        blob.chunk(2)
    );
}

#[test]
fn list_and_stats_serialize_for_the_operator() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 16 * MIB);
    let blob = TestBlob::new(CHUNK + 5, 18);
    store.register_blob(&blob.hashes).unwrap();
    store.put_chunk(&blob.id(), 1, blob.chunk(1)).unwrap();
    store.pin(&blob.id(), "installed").unwrap();
    let list = store.list();
    assert_eq!(list.len(), 1);
    let info = &list[0];
    assert_eq!(
        (info.chunks_held, info.chunks_total, info.bytes_held),
        (1, 2, 5)
    );
    assert_eq!(info.chunk_size, CHUNK as u32);
    assert!(info.last_access.is_some());
    let json = serde_json::to_value(&list).unwrap();
    assert_eq!(json[0]["id"], blob.id().to_string());
    assert_eq!(json[0]["pins"][0], "installed");
    let back: Vec<pkgmesh_cache::BlobInfo> = serde_json::from_value(json).unwrap();
    assert_eq!(back, list);
    let stats = serde_json::to_value(store.stats()).unwrap();
    assert_eq!(stats["pinned_bytes"], 5);
    assert_eq!(stats["budget_bytes"], 16 * MIB);
}

#[test]
fn many_threads_put_and_read_at_once_within_the_budget() {
    let dir = fast_tempdir();
    let budget = 6 * CHUNK as u64;
    let store = open(dir.path(), budget);
    let blobs: Vec<TestBlob> = (0..4)
        .map(|i| TestBlob::new(4 * CHUNK + 99, 100 + i))
        .collect();
    for blob in &blobs {
        store.register_blob(&blob.hashes).unwrap();
    }
    std::thread::scope(|scope| {
        for worker in 0..4u64 {
            let store = store.clone();
            let blobs = &blobs;
            scope.spawn(move || {
                for round in 0..40u64 {
                    let blob = &blobs[((worker + round) % 4) as usize];
                    let index = ((round * 7 + worker) % 5) as u32;
                    match store.put_chunk(&blob.id(), index, blob.chunk(index)) {
                        Ok(()) | Err(CacheError::FullInUse { .. }) => {}
                        Err(error) => panic!("{error}"),
                    }
                    if let Some(bytes) = store.get_chunk(&blob.id(), index).unwrap() {
                        assert_eq!(&bytes[..], blob.chunk(index));
                    }
                    if let Some(mut reader) = store.open_chunk(&blob.id(), (index + 1) % 5).unwrap()
                    {
                        let mut got = Vec::new();
                        reader.read_to_end(&mut got).unwrap();
                    }
                    let stats = store.stats();
                    assert!(stats.used_bytes + stats.reserved_bytes <= budget);
                }
            });
        }
    });
    let stats = store.stats();
    assert_eq!(stats.reserved_bytes, 0);
    let on_disk: u64 = chunk_files(dir.path()).iter().map(|f| f.1).sum();
    assert_eq!(on_disk, stats.used_bytes);
    assert!(on_disk <= budget);
}
