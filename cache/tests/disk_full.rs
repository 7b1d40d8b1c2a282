//! Disk full: the store on a 2 MiB tmpfs with a budget far larger than the filesystem. Puts
//! and imports that run out of space fail with a clear error naming the cache directory, leave
//! nothing half-written, the store stays consistent, and it works again once space is freed.
//! Needs root (to mount); skipped with a printed reason otherwise.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use pkgmesh_cache::CacheError;

struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn mount_small_tmpfs(dir: &Path) -> Result<Mounted, String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root, so no tmpfs can be mounted".into());
    }
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(dir)
        .status()
        .map_err(|e| format!("could not run mount: {e}"))?;
    if !status.success() {
        return Err(format!("mount -t tmpfs failed ({status})"));
    }
    Ok(Mounted(dir.to_path_buf()))
}

#[test]
fn running_out_of_disk_is_a_clear_error_and_the_store_recovers() {
    let outer = tempfile::tempdir().unwrap();
    let mount_point = outer.path().join("small");
    std::fs::create_dir(&mount_point).unwrap();
    let _mounted = match mount_small_tmpfs(&mount_point) {
        Ok(mounted) => mounted,
        Err(reason) => {
            println!("skipping the disk-full test: {reason}");
            return;
        }
    };
    let dir = mount_point.join("cache");
    let budget = 64 << 20;
    let blobs: Vec<TestBlob> = (0..4).map(|i| TestBlob::new(4 * CHUNK, 700 + i)).collect();
    let store = open(&dir, budget);
    for blob in &blobs {
        store.register_blob(&blob.hashes).unwrap();
    }

    // Fill the disk with puts, through both put paths.
    let mut failed = None;
    'fill: for (b, blob) in blobs.iter().enumerate() {
        for index in 0..blob.chunk_count() {
            let result = if index % 2 == 0 {
                store.put_chunk(&blob.id(), index, blob.chunk(index))
            } else {
                let mut writer = store.chunk_writer(&blob.id(), index).unwrap();
                match writer.write(blob.chunk(index)) {
                    Ok(()) => writer.commit(),
                    Err(error) => Err(error),
                }
            };
            if let Err(error) = result {
                failed = Some((b, index, error));
                break 'fill;
            }
        }
    }
    let (b, index, error) = failed.expect("a 2 MiB filesystem should fill up");
    assert!(error.is_disk_full(), "{error}");
    let message = error.to_string();
    assert!(message.contains("disk full"), "{message}");
    assert!(message.contains(&dir.display().to_string()), "{message}");
    println!("disk-full error as reported: {message}");

    let small = TestBlob::new(1000, 801);
    let big = TestBlob::new(3 * CHUNK, 800);
    let check_consistent = |store: &pkgmesh_cache::ChunkStore| {
        assert!(tmp_files(&dir).is_empty(), "temp files left behind");
        let stats = store.stats();
        assert_eq!(stats.reserved_bytes, 0);
        let mut held = 0;
        for blob in blobs.iter().chain([&small, &big]) {
            if let Some(bitfield) = store.bitfield(&blob.id()) {
                for i in bitfield.iter_ones() {
                    let bytes = store.get_chunk(&blob.id(), i).unwrap().unwrap();
                    assert!(&bytes[..] == blob.chunk(i));
                    held += bytes.len() as u64;
                }
            }
        }
        assert_eq!(stats.used_bytes, held);
        let on_disk: u64 = chunk_files(&dir).iter().map(|f| f.1).sum();
        assert_eq!(on_disk, held);
    };
    check_consistent(&store);
    assert!(!store.bitfield(&blobs[b].id()).unwrap().get(index));

    // An import that cannot fit on disk fails the same way and leaves nothing.
    let error = store
        .import_reader(&big.bytes[..], big.bytes.len() as u64)
        .unwrap_err();
    assert!(matches!(error, CacheError::DiskFull { .. }), "{error}");
    check_consistent(&store);

    // Fill the last bytes with a file of our own, so index commits meet a full disk too: they
    // may fail (redb then refuses that handle until the store rebuilds it) but never panic.
    let filler = mount_point.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    while std::io::Write::write_all(&mut file, &[0u8; 4096]).is_ok() {}
    drop(file);
    let registered = store.register_blob(&small.hashes);
    println!("register with the disk full: {registered:?}");
    if let Err(error) = &registered {
        assert!(error.is_disk_full(), "{error}");
    }
    let pinned = store.pin(&blobs[1].id(), "installed");
    println!("pin with the disk full: {pinned:?}");
    if let Err(error) = pinned {
        assert!(error.is_disk_full(), "{error}");
    }
    std::fs::remove_file(&filler).unwrap();

    // Free space by evicting a blob; the failed put now succeeds, and so does the rest.
    store.unpin(&blobs[1].id(), "installed").unwrap();
    let evict = if b == 0 { 1 } else { 0 };
    assert!(store.evict_blob(&blobs[evict].id()).unwrap() > 0);
    store
        .put_chunk(&blobs[b].id(), index, blobs[b].chunk(index))
        .unwrap();
    store.register_blob(&small.hashes).unwrap();
    store.put_chunk(&small.id(), 0, small.chunk(0)).unwrap();
    store.pin(&small.id(), "installed").unwrap();
    check_consistent(&store);
    drop(store);

    // And it reopens consistent, with what was stored after the disk filled.
    let store = open(&dir, budget);
    check_consistent(&store);
    assert!(store.bitfield(&blobs[b].id()).unwrap().get(index));
    assert!(store.is_complete(&small.id()));
    assert_eq!(
        store
            .list()
            .iter()
            .find(|i| i.id == small.id())
            .unwrap()
            .pins,
        vec!["installed"]
    );
}
