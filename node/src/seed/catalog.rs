//! The seed's catalog: packages, their versions, default versions and where every blob lives.
//!
//! Kept in redb (one file in the seed's data dir) and committed durably: publishing is rare and
//! must survive a crash the moment the publisher is told it succeeded. Records are JSON inside
//! redb so an operator can read them with any redb tool. Owns: the records and the rules on
//! them (immutable versions, newest-is-default). Does not own: bytes (the origin and the chunk
//! cache hold those) or deployments.

use std::path::Path;

use pkgmesh_protocol::blob::{BlobId, ChunkHashes};
use pkgmesh_protocol::wire::{FileBlob, PackageSummary};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// Package name → [`PackageRecord`] as JSON.
const PACKAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("packages");
/// Blob id → [`BlobRecord`] as JSON.
const BLOBS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("blobs");

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog store {path}: {message}")]
    Store { path: String, message: String },
    #[error("package {name:?} is not in the catalog")]
    NoSuchPackage { name: String },
    #[error("package {name:?} has no version {version:?} (it has: {available})")]
    NoSuchVersion {
        name: String,
        version: String,
        available: String,
    },
    #[error(
        "package {name:?} version {version:?} is already published with different content; \
         versions are immutable: publish under a new version"
    )]
    VersionConflict { name: String, version: String },
    #[error("catalog record for {what} is damaged: {message}")]
    Damaged { what: String, message: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageRecord {
    pub name: String,
    /// `None`: the newest version is the default.
    pub default_version: Option<String>,
    /// In publish order, oldest first.
    pub versions: Vec<VersionRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub version: String,
    pub manifest_json: String,
    pub files: Vec<FileRecord>,
    pub published_at: u64,
    pub published_by: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub file: String,
    pub blob: String,
    pub size: u64,
    pub sha256: String,
    pub origin_key: String,
}

/// Where a blob's bytes are in the origin, and its verified chunk-hash list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct BlobRecord {
    size: u64,
    origin_key: String,
    chunk_hashes: String,
}

impl PackageRecord {
    pub fn default_version(&self) -> Option<&VersionRecord> {
        match &self.default_version {
            Some(v) => self.versions.iter().find(|r| &r.version == v),
            None => self.versions.last(),
        }
    }

    pub fn version(&self, version: &str) -> Option<&VersionRecord> {
        self.versions.iter().find(|r| r.version == version)
    }

    pub fn summary(&self) -> PackageSummary {
        PackageSummary {
            name: self.name.clone(),
            default_version: self.default_version().map(|v| v.version.clone()),
            versions: self.versions.iter().map(|v| v.version.clone()).collect(),
        }
    }

    fn available(&self) -> String {
        let list: Vec<&str> = self.versions.iter().map(|v| v.version.as_str()).collect();
        if list.is_empty() {
            "none".into()
        } else {
            list.join(", ")
        }
    }
}

impl VersionRecord {
    /// Two publishes are the same when the manifest says the same thing and every file has the
    /// same bytes; whitespace in the JSON does not matter.
    pub fn same_content(&self, other: &VersionRecord) -> bool {
        let manifest = |text: &str| serde_json::from_str::<serde_json::Value>(text).ok();
        let files = |r: &VersionRecord| {
            let mut list: Vec<(String, String)> = r
                .files
                .iter()
                .map(|f| (f.file.clone(), f.sha256.clone()))
                .collect();
            list.sort();
            list
        };
        manifest(&self.manifest_json) == manifest(&other.manifest_json)
            && files(self) == files(other)
    }

    pub fn file_blobs(&self) -> Vec<FileBlob> {
        self.files
            .iter()
            .filter_map(|f| {
                let blob = f.blob.parse::<BlobId>().ok()?;
                let mut sha256 = [0u8; 32];
                hex::decode_to_slice(&f.sha256, &mut sha256).ok()?;
                Some(FileBlob {
                    file: f.file.clone(),
                    blob,
                    size: f.size,
                    sha256,
                })
            })
            .collect()
    }
}

/// What a publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishResult {
    Added,
    Unchanged,
}

pub struct Catalog {
    db: Database,
    path: String,
}

impl Catalog {
    pub fn open(path: &Path) -> Result<Catalog, CatalogError> {
        let display = path.display().to_string();
        let db = Database::create(path).map_err(|e| CatalogError::Store {
            path: display.clone(),
            message: e.to_string(),
        })?;
        let catalog = Catalog { db, path: display };
        catalog.write(|txn| {
            txn.open_table(PACKAGES)?;
            txn.open_table(BLOBS)?;
            Ok(())
        })?;
        Ok(catalog)
    }

    fn store_error(&self, error: impl std::fmt::Display) -> CatalogError {
        CatalogError::Store {
            path: self.path.clone(),
            message: error.to_string(),
        }
    }

    fn write<T>(
        &self,
        body: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, CatalogError> {
        let run = || -> Result<T, redb::Error> {
            let mut txn = self.db.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            let value = body(&txn)?;
            txn.commit()?;
            Ok(value)
        };
        run().map_err(|e| self.store_error(e))
    }

    pub fn package(&self, name: &str) -> Result<Option<PackageRecord>, CatalogError> {
        let read = || -> Result<Option<Vec<u8>>, redb::Error> {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(PACKAGES)?;
            Ok(table.get(name)?.map(|v| v.value().to_vec()))
        };
        match read().map_err(|e| self.store_error(e))? {
            None => Ok(None),
            Some(bytes) => decode(&bytes, name).map(Some),
        }
    }

    /// A version, or the default when `version` is `None`; with whether it is the default.
    pub fn version(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<(VersionRecord, bool), CatalogError> {
        let package = self
            .package(name)?
            .ok_or_else(|| CatalogError::NoSuchPackage { name: name.into() })?;
        let default = package.default_version().map(|v| v.version.clone());
        let record = match version {
            Some(v) => package.version(v),
            None => package.default_version(),
        };
        match record {
            Some(record) => {
                let is_default = default.as_deref() == Some(record.version.as_str());
                Ok((record.clone(), is_default))
            }
            None => Err(CatalogError::NoSuchVersion {
                name: name.into(),
                version: version.unwrap_or("(default)").into(),
                available: package.available(),
            }),
        }
    }

    /// Every package row, undecoded: name and JSON.
    fn package_rows(&self) -> Result<Vec<(String, Vec<u8>)>, CatalogError> {
        let read = || -> Result<Vec<(String, Vec<u8>)>, redb::Error> {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(PACKAGES)?;
            let mut rows = Vec::new();
            for row in table.iter()? {
                let (key, value) = row?;
                rows.push((key.value().to_string(), value.value().to_vec()));
            }
            Ok(rows)
        };
        read().map_err(|e| self.store_error(e))
    }

    pub fn list(&self) -> Result<Vec<PackageSummary>, CatalogError> {
        let rows = self.package_rows()?;
        rows.iter()
            .map(|(name, bytes)| decode::<PackageRecord>(bytes, name).map(|p| p.summary()))
            .collect()
    }

    /// Whether this version can be published: `Ok(Some(Unchanged))` when the identical version
    /// exists, `Ok(None)` when it is new, and a conflict error when it differs.
    pub fn check_publish(
        &self,
        name: &str,
        candidate: &VersionRecord,
    ) -> Result<Option<PublishResult>, CatalogError> {
        let Some(package) = self.package(name)? else {
            return Ok(None);
        };
        match package.version(&candidate.version) {
            None => Ok(None),
            Some(existing) if existing.same_content(candidate) => {
                Ok(Some(PublishResult::Unchanged))
            }
            Some(_) => Err(CatalogError::VersionConflict {
                name: name.into(),
                version: candidate.version.clone(),
            }),
        }
    }

    /// Records a version and its blobs in one transaction.
    pub fn publish(
        &self,
        name: &str,
        record: VersionRecord,
        hashes: &[ChunkHashes],
    ) -> Result<PublishResult, CatalogError> {
        let name_owned = name.to_string();
        let outcome = self.write(move |txn| {
            let mut packages = txn.open_table(PACKAGES)?;
            let existing = packages
                .get(name_owned.as_str())?
                .map(|v| v.value().to_vec());
            let mut package = match existing {
                Some(bytes) => match serde_json::from_slice::<PackageRecord>(&bytes) {
                    Ok(p) => p,
                    Err(e) => return Ok(Err(damaged(&name_owned, e))),
                },
                None => PackageRecord {
                    name: name_owned.clone(),
                    default_version: None,
                    versions: Vec::new(),
                },
            };
            if let Some(old) = package.version(&record.version) {
                return Ok(if old.same_content(&record) {
                    Ok(PublishResult::Unchanged)
                } else {
                    Err(CatalogError::VersionConflict {
                        name: name_owned.clone(),
                        version: record.version.clone(),
                    })
                });
            }
            let mut blobs = txn.open_table(BLOBS)?;
            for file in &record.files {
                let Some(hashes) = hashes.iter().find(|h| h.id().to_hex() == file.blob) else {
                    continue;
                };
                if blobs.get(hashes.id().0.as_slice())?.is_some() {
                    continue;
                }
                let blob = BlobRecord {
                    size: file.size,
                    origin_key: file.origin_key.clone(),
                    chunk_hashes: hex::encode(hashes.to_packed()),
                };
                let bytes = serde_json::to_vec(&blob).map_err(|e| storage_error(e.to_string()))?;
                blobs.insert(hashes.id().0.as_slice(), bytes.as_slice())?;
            }
            package.versions.push(record);
            let bytes = serde_json::to_vec(&package).map_err(|e| storage_error(e.to_string()))?;
            packages.insert(name_owned.as_str(), bytes.as_slice())?;
            Ok(Ok(PublishResult::Added))
        })?;
        outcome
    }

    pub fn set_default(&self, name: &str, version: &str) -> Result<(), CatalogError> {
        let mut package = self
            .package(name)?
            .ok_or_else(|| CatalogError::NoSuchPackage { name: name.into() })?;
        if package.version(version).is_none() {
            return Err(CatalogError::NoSuchVersion {
                name: name.into(),
                version: version.into(),
                available: package.available(),
            });
        }
        package.default_version = Some(version.to_string());
        self.put_package(&package)
    }

    fn put_package(&self, package: &PackageRecord) -> Result<(), CatalogError> {
        let bytes = serde_json::to_vec(package).map_err(|e| self.store_error(e))?;
        self.write(|txn| {
            txn.open_table(PACKAGES)?
                .insert(package.name.as_str(), bytes.as_slice())?;
            Ok(())
        })
    }

    /// Removes one version or the whole package; returns the removed versions. Blob records
    /// stay while any remaining version names the blob; the caller deletes origin objects of
    /// the returned files whose blobs [`Catalog::blob_location`] no longer knows.
    pub fn delete(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Vec<VersionRecord>, CatalogError> {
        let mut package = self
            .package(name)?
            .ok_or_else(|| CatalogError::NoSuchPackage { name: name.into() })?;
        let removed: Vec<VersionRecord> = match version {
            Some(v) => {
                let Some(at) = package.versions.iter().position(|r| r.version == v) else {
                    return Err(CatalogError::NoSuchVersion {
                        name: name.into(),
                        version: v.into(),
                        available: package.available(),
                    });
                };
                vec![package.versions.remove(at)]
            }
            None => std::mem::take(&mut package.versions),
        };
        if package
            .default_version
            .as_ref()
            .is_some_and(|d| package.version(d).is_none())
        {
            package.default_version = None;
        }
        let still_used = self.blobs_in_use(name, &package)?;
        let orphaned: Vec<Vec<u8>> = removed
            .iter()
            .flat_map(|r| r.files.iter())
            .filter(|f| !still_used.contains(&f.blob))
            .filter_map(|f| f.blob.parse::<BlobId>().ok())
            .map(|b| b.0.to_vec())
            .collect();
        let package_bytes = serde_json::to_vec(&package).map_err(|e| self.store_error(e))?;
        self.write(|txn| {
            let mut packages = txn.open_table(PACKAGES)?;
            if package.versions.is_empty() {
                packages.remove(name)?;
            } else {
                packages.insert(name, package_bytes.as_slice())?;
            }
            let mut blobs = txn.open_table(BLOBS)?;
            for blob in &orphaned {
                blobs.remove(blob.as_slice())?;
            }
            Ok(())
        })?;
        Ok(removed)
    }

    /// Blob ids (hex) named by any version of any package, with `name` as given.
    fn blobs_in_use(
        &self,
        name: &str,
        replacement: &PackageRecord,
    ) -> Result<std::collections::HashSet<String>, CatalogError> {
        let mut used = std::collections::HashSet::new();
        for (other, bytes) in self.package_rows()? {
            let package = if other == name {
                replacement.clone()
            } else {
                decode::<PackageRecord>(&bytes, &other)?
            };
            for version in &package.versions {
                used.extend(version.files.iter().map(|f| f.blob.clone()));
            }
        }
        Ok(used)
    }

    /// The size, origin key and verified chunk-hash list of a blob the catalog knows.
    pub fn blob_location(
        &self,
        blob: &BlobId,
    ) -> Result<Option<(u64, String, ChunkHashes)>, CatalogError> {
        let read = || -> Result<Option<Vec<u8>>, redb::Error> {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(BLOBS)?;
            Ok(table.get(blob.0.as_slice())?.map(|v| v.value().to_vec()))
        };
        let Some(bytes) = read().map_err(|e| self.store_error(e))? else {
            return Ok(None);
        };
        let what = format!("blob {blob}");
        let record: BlobRecord = decode(&bytes, &what)?;
        let packed = hex::decode(&record.chunk_hashes).map_err(|e| CatalogError::Damaged {
            what: what.clone(),
            message: e.to_string(),
        })?;
        let hashes = ChunkHashes::verify_packed(*blob, record.size, &packed).map_err(|e| {
            CatalogError::Damaged {
                what,
                message: e.to_string(),
            }
        })?;
        Ok(Some((record.size, record.origin_key, hashes)))
    }
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, CatalogError> {
    serde_json::from_slice(bytes).map_err(|e| damaged(what, e))
}

fn damaged(what: &str, error: impl std::fmt::Display) -> CatalogError {
    CatalogError::Damaged {
        what: what.into(),
        message: error.to_string(),
    }
}

fn storage_error(message: String) -> redb::Error {
    redb::Error::Io(std::io::Error::other(message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pkgmesh_protocol::blob::hash_reader;

    fn record(version: &str, bytes: &[u8]) -> (VersionRecord, ChunkHashes) {
        use sha2::Digest;
        let hashes = hash_reader(bytes, bytes.len() as u64).unwrap();
        let record = VersionRecord {
            version: version.into(),
            manifest_json: format!("{{\"version\": \"{version}\"}}"),
            files: vec![FileRecord {
                file: "a.zip".into(),
                blob: hashes.id().to_hex(),
                size: bytes.len() as u64,
                sha256: hex::encode(sha2::Sha256::digest(bytes)),
                origin_key: format!("packages/p/{version}/a.zip"),
            }],
            published_at: 1,
            published_by: "tester".into(),
        };
        (record, hashes)
    }

    #[test]
    fn versions_are_immutable_and_the_newest_is_default_until_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.redb");
        let catalog = Catalog::open(&path).unwrap();
        let (v1, h1) = record("1.0", b"one");
        let (v2, h2) = record("2.0", b"two");
        assert_eq!(
            catalog
                .publish("pkg", v1.clone(), std::slice::from_ref(&h1))
                .unwrap(),
            PublishResult::Added
        );
        assert_eq!(
            catalog
                .publish("pkg", v1.clone(), std::slice::from_ref(&h1))
                .unwrap(),
            PublishResult::Unchanged
        );
        let (mut other, other_hashes) = record("1.0", b"different bytes");
        other.published_by = "someone".into();
        assert!(matches!(
            catalog.publish("pkg", other.clone(), &[other_hashes]),
            Err(CatalogError::VersionConflict { .. })
        ));
        assert!(matches!(
            catalog.check_publish("pkg", &other),
            Err(CatalogError::VersionConflict { .. })
        ));
        catalog
            .publish("pkg", v2, std::slice::from_ref(&h2))
            .unwrap();
        assert_eq!(catalog.version("pkg", None).unwrap().0.version, "2.0");
        catalog.set_default("pkg", "1.0").unwrap();
        drop(catalog);

        // Everything survives a reopen.
        let catalog = Catalog::open(&path).unwrap();
        let (default, is_default) = catalog.version("pkg", None).unwrap();
        assert_eq!((default.version.as_str(), is_default), ("1.0", true));
        assert!(!catalog.version("pkg", Some("2.0")).unwrap().1);
        let (size, key, hashes) = catalog.blob_location(&h2.id()).unwrap().unwrap();
        assert_eq!((size, key.as_str()), (3, "packages/p/2.0/a.zip"));
        assert_eq!(hashes, h2);
        assert!(matches!(
            catalog.set_default("pkg", "9.9"),
            Err(CatalogError::NoSuchVersion { .. })
        ));

        // Deleting the default version falls back to the newest; its blob is forgotten.
        let removed = catalog.delete("pkg", Some("1.0")).unwrap();
        assert_eq!(removed.len(), 1);
        assert_eq!(catalog.version("pkg", None).unwrap().0.version, "2.0");
        assert!(catalog.blob_location(&h1.id()).unwrap().is_none());
        catalog.delete("pkg", None).unwrap();
        assert!(catalog.list().unwrap().is_empty());
        assert!(matches!(
            catalog.version("pkg", None),
            Err(CatalogError::NoSuchPackage { .. })
        ));
    }

    #[test]
    fn a_blob_shared_by_two_versions_outlives_one_of_them() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(&dir.path().join("c.redb")).unwrap();
        let (v1, h) = record("1.0", b"same zip");
        let (mut v2, _) = record("2.0", b"same zip");
        v2.files[0].origin_key = v1.files[0].origin_key.clone();
        catalog
            .publish("pkg", v1, std::slice::from_ref(&h))
            .unwrap();
        catalog
            .publish("pkg", v2, std::slice::from_ref(&h))
            .unwrap();
        catalog.delete("pkg", Some("1.0")).unwrap();
        assert!(catalog.blob_location(&h.id()).unwrap().is_some());
        let summary = catalog.list().unwrap();
        assert_eq!(summary[0].versions, vec!["2.0".to_string()]);
    }
}
