//! What this node knows its cached blobs to be: blob → the package versions and manifest files
//! that name it, so `pkgmesh cache ls` can say "pkgmesh-sample 1.0.0" instead of a hash.
//!
//! Owns: the in-memory map and its file `<data>/blob-names.json` (written whole: temp file,
//! fsync, rename). Names are learned when this node resolves a package (fetch, install,
//! preheat) and, for blobs it got otherwise (deployments), from the seed's catalog on demand.
//! Does not own: the cache; a name is a label and never decides what is fetched or trusted.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use pkgmesh_protocol::blob::BlobId;
use serde::{Deserialize, Serialize};

/// Most names kept for one blob (the same ZIP published under several versions).
const MAX_NAMES_PER_BLOB: usize = 8;
/// Most blobs remembered; past it, names of blobs no longer cached are dropped first.
const MAX_BLOBS: usize = 65_536;
/// Largest file read back (65,536 blobs of a few names fit with room to spare).
const MAX_FILE_BYTES: u64 = 64 << 20;

/// One package version file that is this blob.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PackageRef {
    pub name: String,
    pub version: String,
    pub file: String,
}

/// Blob (hex) → names. Cheap to clone; clones share the map.
#[derive(Clone)]
pub struct BlobNames {
    path: PathBuf,
    map: Arc<Mutex<BTreeMap<String, Vec<PackageRef>>>>,
    /// One save at a time: saves share the temp file.
    saving: Arc<Mutex<()>>,
}

impl BlobNames {
    /// Loads `<data>/blob-names.json`. A missing or unreadable file starts empty: names are
    /// labels and are learned again.
    pub fn open(data: &Path) -> BlobNames {
        let path = data.join("blob-names.json");
        let map = match read(&path) {
            Ok(map) => map,
            Err(error) => {
                if path.exists() {
                    tracing::warn!(file = %path.display(), error = format!("{error:#}"), "blob names not loaded; they will be learned again");
                }
                BTreeMap::new()
            }
        };
        BlobNames {
            path,
            map: Arc::new(Mutex::new(map)),
            saving: Arc::new(Mutex::new(())),
        }
    }

    /// Records that `blob` is `package`. Returns true if that was news (then [`Self::save`]).
    pub fn remember(&self, blob: &BlobId, package: PackageRef) -> bool {
        let mut map = self.lock();
        let names = map.entry(blob.to_hex()).or_default();
        if names.contains(&package) {
            return false;
        }
        if names.len() >= MAX_NAMES_PER_BLOB {
            names.remove(0);
        }
        names.push(package);
        names.sort();
        true
    }

    /// What `blob` is known to be (empty when unknown).
    pub fn get(&self, blob: &BlobId) -> Vec<PackageRef> {
        self.lock().get(&blob.to_hex()).cloned().unwrap_or_default()
    }

    /// Those of `blobs` with no name yet.
    pub fn unknown(&self, blobs: &[BlobId]) -> Vec<BlobId> {
        let map = self.lock();
        blobs
            .iter()
            .filter(|b| !map.contains_key(&b.to_hex()))
            .copied()
            .collect()
    }

    /// Over the limit, forgets blobs that are not in `cached`. Returns true if anything went.
    pub fn trim(&self, cached: &[BlobId]) -> bool {
        let mut map = self.lock();
        if map.len() <= MAX_BLOBS {
            return false;
        }
        let keep: std::collections::HashSet<String> = cached.iter().map(|b| b.to_hex()).collect();
        let before = map.len();
        map.retain(|blob, _| keep.contains(blob));
        map.len() != before
    }

    /// Writes the map to its file (blocking: call from `spawn_blocking`).
    pub fn save(&self) -> anyhow::Result<()> {
        let _one_at_a_time = self
            .saving
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Serialized under the save lock, so the last save to finish wrote the newest map.
        let bytes = serde_json::to_vec(&*self.lock())?;
        let dir = self
            .path
            .parent()
            .context("the blob names file has no directory")?;
        let temp = dir.join(format!(".blob-names.{}.tmp", std::process::id()));
        let written = (|| -> std::io::Result<()> {
            let mut file = std::fs::File::create(&temp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&temp, &self.path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        written.with_context(|| format!("cannot write {}", self.path.display()))
    }

    /// Saves in the background; a failure is logged (names are learned again).
    pub fn save_later(&self) {
        let names = self.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(error) = names.save() {
                tracing::warn!(error = format!("{error:#}"), "blob names not saved");
            }
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<PackageRef>>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn read(path: &Path) -> anyhow::Result<BTreeMap<String, Vec<PackageRef>>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES).read_to_end(&mut bytes)?;
    Ok(serde_json::from_slice(&bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn package(version: &str) -> PackageRef {
        PackageRef {
            name: "pkg".into(),
            version: version.into(),
            file: "pkg.zip".into(),
        }
    }

    #[test]
    fn names_survive_a_restart_and_a_damaged_file_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let blob = BlobId([3; 32]);
        let names = BlobNames::open(dir.path());
        assert!(names.remember(&blob, package("1.0")));
        assert!(!names.remember(&blob, package("1.0")), "not news twice");
        assert!(names.remember(&blob, package("1.1")));
        names.save().unwrap();
        let again = BlobNames::open(dir.path());
        assert_eq!(again.get(&blob), vec![package("1.0"), package("1.1")]);
        assert_eq!(
            again.unknown(&[blob, BlobId([4; 32])]),
            vec![BlobId([4; 32])]
        );

        std::fs::write(dir.path().join("blob-names.json"), b"{not json").unwrap();
        assert!(BlobNames::open(dir.path()).get(&blob).is_empty());
    }

    #[test]
    fn one_blob_keeps_a_bounded_list_of_names() {
        let dir = tempfile::tempdir().unwrap();
        let names = BlobNames::open(dir.path());
        let blob = BlobId([5; 32]);
        for i in 0..20 {
            names.remember(&blob, package(&format!("{i:02}")));
        }
        assert_eq!(names.get(&blob).len(), MAX_NAMES_PER_BLOB);
    }
}
