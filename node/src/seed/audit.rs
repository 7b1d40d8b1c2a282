//! The audit log of a seed or a node: one JSON line per change or refusal, appended and fsynced
//! before the caller hears the outcome, so a record is never lost to a crash after the fact.
//!
//! Owns: writing and reading `<data>/audit.log`. Does not own: deciding what is audited (the
//! seed's request handlers and the node's admin API do).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use pkgmesh_protocol::wire::AuditRecord;

/// Longest line read back: a record is a few hundred bytes; anything longer is damage.
const MAX_LINE_BYTES: usize = 64 * 1024;

pub struct AuditLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl AuditLog {
    pub fn open(path: &Path) -> std::io::Result<AuditLog> {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)?;
        // A crash mid-append leaves a torn last line; end it so the next record starts clean.
        let len = file.metadata()?.len();
        if len > 0 {
            use std::io::{Seek, SeekFrom};
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(len - 1))?;
            file.read_exact(&mut last)?;
            if last[0] != b'\n' {
                file.write_all(b"\n")?;
                file.sync_data()?;
            }
        }
        Ok(AuditLog {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        })
    }

    /// Appends a record durably. A failure is logged and returned: the caller decides whether
    /// the change may still go ahead (the seed refuses changes it cannot audit).
    pub fn append(&self, record: &AuditRecord) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let result = file.write_all(&line).and_then(|()| file.sync_data());
        if let Err(error) = &result {
            tracing::error!(path = %self.path.display(), %error, "audit record not written");
        }
        result
    }

    /// Records at or after `since` (unix seconds), oldest first, at most `limit`. Lines that do
    /// not parse (a torn last line after a crash) are skipped.
    pub fn read(&self, since: Option<u64>, limit: usize) -> std::io::Result<Vec<AuditRecord>> {
        let file = File::open(&self.path)?;
        let mut reader = BufReader::new(file);
        let mut records = Vec::new();
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = (&mut reader)
                .take(MAX_LINE_BYTES as u64 + 1)
                .read_until(b'\n', &mut line)?;
            if n == 0 {
                break;
            }
            if line.len() > MAX_LINE_BYTES {
                // Skip the rest of an overlong line.
                let mut rest = Vec::new();
                reader.read_until(b'\n', &mut rest)?;
                continue;
            }
            let Ok(record) = serde_json::from_slice::<AuditRecord>(&line) else {
                continue;
            };
            if since.is_some_and(|t| record.time < t) {
                continue;
            }
            records.push(record);
            if records.len() >= limit {
                break;
            }
        }
        Ok(records)
    }
}

use std::io::Read as _;

#[cfg(test)]
mod tests {
    use super::*;

    fn record(time: u64, action: &str) -> AuditRecord {
        AuditRecord {
            time,
            caller: "alice".into(),
            roles: vec!["publisher".into()],
            action: action.into(),
            target: "pkg@1".into(),
            outcome: "ok".into(),
        }
    }

    #[test]
    fn records_survive_reopen_and_filter_by_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        log.append(&record(10, "publish")).unwrap();
        log.append(&record(20, "set-default")).unwrap();
        drop(log);
        // A torn line from a crash is skipped, not fatal.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"time\": 3")
            .unwrap();
        let log = AuditLog::open(&path).unwrap();
        log.append(&record(30, "delete")).unwrap();
        let all = log.read(None, 100).unwrap();
        assert_eq!(
            all.iter().map(|r| r.action.as_str()).collect::<Vec<_>>(),
            ["publish", "set-default", "delete"]
        );
        let since = log.read(Some(20), 100).unwrap();
        assert_eq!(since.len(), 2);
        assert_eq!(log.read(None, 1).unwrap().len(), 1);
    }
}
