//! Install state: one record per package in a redb database (`<data>/installs.redb`).
//!
//! Owns: the record format and its durable storage. Every write is its own transaction with
//! immediate durability, so what a record says has reached the disk before the next script
//! runs; a node that restarts finds exactly the last state written. Records are JSON inside
//! redb, so they stay readable with any redb tool and new fields can be added with defaults.
//!
//! Does not own: what the states mean for the next action (the installer in [`super`]).

use std::path::{Path, PathBuf};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::runner::{Action, ScriptStatus};
use super::InstallError;

/// Package name → [`InstallRecord`] as JSON.
const INSTALLS: TableDefinition<&str, &[u8]> = TableDefinition::new("installs");

/// Where a package stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstallState {
    /// An install or update is running (or was, when the node stopped).
    Installing,
    /// `installed_version` is installed and its scripts succeeded.
    Installed,
    /// The last action failed and no earlier version could be restored; `installed_version`
    /// says what is (probably) still there, if anything.
    Failed,
    /// An install failed and its rollback is running (or was, when the node stopped).
    RollingBack,
    /// An install failed and the previous version was restored: `installed_version` is that
    /// previous version.
    RolledBack,
    /// An uninstall is running (or was, when the node stopped).
    Uninstalling,
    /// Nothing is installed; the package was uninstalled.
    Uninstalled,
}

impl InstallState {
    /// True while an action is under way: seen at startup, it means the node stopped mid-way.
    pub fn in_progress(self) -> bool {
        matches!(
            self,
            InstallState::Installing | InstallState::RollingBack | InstallState::Uninstalling
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            InstallState::Installing => "installing",
            InstallState::Installed => "installed",
            InstallState::Failed => "failed",
            InstallState::RollingBack => "rolling_back",
            InstallState::RolledBack => "rolled_back",
            InstallState::Uninstalling => "uninstalling",
            InstallState::Uninstalled => "uninstalled",
        }
    }
}

impl std::fmt::Display for InstallState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Distributor's installation types.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstallType {
    /// The previous version's `uninstall`, then the new `install` (and `validate`).
    #[default]
    UninstallAndReinstall,
    /// The new version's `update` (and `validate`), with the previous version left in place.
    InPlace,
}

/// One script run, as kept in the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionRecord {
    pub action: Action,
    /// The version whose script ran.
    pub version: String,
    pub status: ScriptStatus,
    /// Its output, when a log could be created.
    pub log: Option<PathBuf>,
    /// Unix seconds when it finished.
    pub finished_at: u64,
}

/// Everything the node knows about one package's installation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallRecord {
    pub name: String,
    pub state: InstallState,
    /// What is installed now (during an action: what was installed before it).
    #[serde(default)]
    pub installed_version: Option<String>,
    /// The version the last action was about (being installed, or uninstalled).
    #[serde(default)]
    pub target_version: Option<String>,
    /// The version installed before the last action started.
    #[serde(default)]
    pub previous_version: Option<String>,
    #[serde(default)]
    pub install_type: InstallType,
    /// Unix seconds of the last change.
    pub updated_at: u64,
    /// The action that decided the result: the one that failed, else the last one that ran.
    #[serde(default)]
    pub last_action: Option<Action>,
    /// That action's exit code (none when it timed out, was killed or could not start).
    #[serde(default)]
    pub last_exit_code: Option<i32>,
    /// A script of the last operation exited with the reboot code (194, or 3010 for
    /// PowerShell). Cleared when the next operation starts; the node does not reboot by itself.
    #[serde(default)]
    pub reboot_required: bool,
    /// The log of [`InstallRecord::last_action`].
    #[serde(default)]
    pub log_path: Option<PathBuf>,
    /// Every script the last operation ran, in order (rollback included).
    #[serde(default)]
    pub actions: Vec<ActionRecord>,
    /// Why the last operation failed, or what recovery did.
    #[serde(default)]
    pub message: Option<String>,
}

/// The redb database of install records.
pub(crate) struct InstallStore {
    db: Database,
    path: PathBuf,
}

impl InstallStore {
    pub(crate) fn open(path: &Path) -> Result<InstallStore, InstallError> {
        let db = Database::create(path).map_err(|e| store_error(path, e))?;
        let store = InstallStore {
            db,
            path: path.to_path_buf(),
        };
        store.write(|txn| {
            txn.open_table(INSTALLS)?;
            Ok(())
        })?;
        Ok(store)
    }

    fn write(
        &self,
        body: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), InstallError> {
        let run = || -> Result<(), redb::Error> {
            let mut txn = self.db.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            body(&txn)?;
            txn.commit()?;
            Ok(())
        };
        run().map_err(|e| store_error(&self.path, e))
    }

    pub(crate) fn put(&self, record: &InstallRecord) -> Result<(), InstallError> {
        let json = serde_json::to_vec(record).map_err(|e| InstallError::Store {
            path: self.path.clone(),
            message: format!("cannot encode the record of {:?}: {e}", record.name),
        })?;
        self.write(|txn| {
            let mut table = txn.open_table(INSTALLS)?;
            table.insert(record.name.as_str(), json.as_slice())?;
            Ok(())
        })
    }

    pub(crate) fn get(&self, name: &str) -> Result<Option<InstallRecord>, InstallError> {
        let read = || -> Result<Option<Vec<u8>>, redb::Error> {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(INSTALLS)?;
            Ok(table.get(name)?.map(|v| v.value().to_vec()))
        };
        match read().map_err(|e| store_error(&self.path, e))? {
            None => Ok(None),
            Some(bytes) => decode(name, &bytes).map(Some),
        }
    }

    /// Every record, in name order.
    pub(crate) fn list(&self) -> Result<Vec<InstallRecord>, InstallError> {
        let read = || -> Result<Vec<(String, Vec<u8>)>, redb::Error> {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(INSTALLS)?;
            let mut rows = Vec::new();
            for row in table.iter()? {
                let (key, value) = row?;
                rows.push((key.value().to_string(), value.value().to_vec()));
            }
            Ok(rows)
        };
        let rows = read().map_err(|e| store_error(&self.path, e))?;
        rows.iter()
            .map(|(name, bytes)| decode(name, bytes))
            .collect()
    }
}

fn decode(name: &str, bytes: &[u8]) -> Result<InstallRecord, InstallError> {
    serde_json::from_slice(bytes).map_err(|e| InstallError::Damaged {
        name: name.to_string(),
        message: e.to_string(),
    })
}

fn store_error(path: &Path, error: impl std::fmt::Display) -> InstallError {
    InstallError::Store {
        path: path.to_path_buf(),
        message: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> InstallRecord {
        InstallRecord {
            name: name.into(),
            state: InstallState::Installed,
            installed_version: Some("1.0".into()),
            target_version: Some("1.0".into()),
            previous_version: None,
            install_type: InstallType::UninstallAndReinstall,
            updated_at: 1_700_000_000,
            last_action: Some(Action::Install),
            last_exit_code: Some(0),
            reboot_required: false,
            log_path: None,
            actions: vec![ActionRecord {
                action: Action::Install,
                version: "1.0".into(),
                status: ScriptStatus::Succeeded,
                log: Some("/x/install.log".into()),
                finished_at: 1_700_000_000,
            }],
            message: None,
        }
    }

    #[test]
    fn records_round_trip_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("installs.redb");
        {
            let store = InstallStore::open(&path).expect("open");
            store.put(&record("bbb")).expect("put");
            store.put(&record("aaa")).expect("put");
            let mut changed = record("aaa");
            changed.state = InstallState::Failed;
            store.put(&changed).expect("put");
        }
        let store = InstallStore::open(&path).expect("reopen");
        let list = store.list().expect("list");
        assert_eq!(
            list.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["aaa", "bbb"]
        );
        assert_eq!(list[0].state, InstallState::Failed);
        assert_eq!(store.get("bbb").expect("get"), Some(record("bbb")));
        assert_eq!(store.get("ccc").expect("get"), None);
    }

    #[test]
    fn old_records_without_new_fields_still_decode() {
        let json = br#"{"name":"pkg","state":"installed","updated_at":5}"#;
        let rec = decode("pkg", json).expect("decode");
        assert_eq!(rec.installed_version, None);
        assert_eq!(rec.install_type, InstallType::UninstallAndReinstall);
        assert!(decode("pkg", b"{").is_err());
    }
}
