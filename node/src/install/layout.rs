//! Where the installer keeps things under the node's data directory, and the file moves it
//! makes there.
//!
//! ```text
//! <data>/installs.redb                          install records
//! <data>/installs/<name>.lock                   one action per package at a time
//! <data>/installs/logs/<name>/<version>/<action>-<time>-<n>.log
//! <data>/packages/<name>/<version>/             extracted version folders
//! <data>/packages/.staging/<instance>-<n>-...   extraction in progress, and trash
//! ```
//!
//! Logs live under `installs/logs/` rather than `installs/<name>/` because a package may be
//! called `foo.lock`, whose folder would then collide with the lock file of package `foo`.
//! Staging and trash sit inside `packages/` so that every move into or out of place is a
//! `rename` within one file system, which is atomic. Names are prefixed with a random id of this
//! installer instance, so that cleaning up after a crash never touches what a live extraction
//! is writing.
//!
//! Owns: paths, placing a staged folder, removing a folder, cleaning staging, pruning logs.
//! Does not own: extraction (`ziplayout`) or deciding what to keep (the installer).

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{debug, warn};

use super::runner::Action;
use crate::ziplayout::ScriptKind;

/// The staging folder's name; reserved, so no package may be called this.
pub(crate) const STAGING: &str = ".staging";

#[derive(Debug)]
pub(crate) struct Layout {
    pub(crate) data: PathBuf,
    packages: PathBuf,
    staging: PathBuf,
    installs: PathBuf,
    logs: PathBuf,
    /// Random per instance: marks this instance's staging entries.
    instance: String,
    counter: AtomicU64,
}

impl Layout {
    /// Creates the folders that must exist.
    pub(crate) fn create(data: &Path) -> io::Result<Layout> {
        let packages = data.join("packages");
        let installs = data.join("installs");
        let layout = Layout {
            data: data.to_path_buf(),
            staging: packages.join(STAGING),
            logs: installs.join("logs"),
            packages,
            installs,
            instance: format!("{:016x}", rand::random::<u64>()),
            counter: AtomicU64::new(0),
        };
        for dir in [&layout.staging, &layout.logs] {
            fs::create_dir_all(dir)?;
        }
        Ok(layout)
    }

    pub(crate) fn db_path(&self) -> PathBuf {
        self.data.join("installs.redb")
    }

    pub(crate) fn lock_path(&self, name: &str) -> PathBuf {
        self.installs.join(format!("{name}.lock"))
    }

    pub(crate) fn package_dir(&self, name: &str) -> PathBuf {
        self.packages.join(name)
    }

    pub(crate) fn version_dir(&self, name: &str, version: &str) -> PathBuf {
        self.packages.join(name).join(version)
    }

    fn unique(&self, what: &str) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}-{what}", self.instance)
    }

    /// A path for a new staging folder (not created: extraction creates it).
    pub(crate) fn new_staging(&self, name: &str, version: &str) -> PathBuf {
        self.staging.join(self.unique(&format!("{name}-{version}")))
    }

    /// A new, unused log file path for one script run; its folder is created.
    pub(crate) fn new_log_path(
        &self,
        name: &str,
        version: &str,
        action: Action,
    ) -> io::Result<PathBuf> {
        let dir = self.logs.join(name).join(version);
        fs::create_dir_all(&dir)?;
        let now = time::OffsetDateTime::now_utc();
        let stamp = format!(
            "{:04}{:02}{:02}T{:02}{:02}{:02}.{:03}Z",
            now.year(),
            u8::from(now.month()),
            now.day(),
            now.hour(),
            now.minute(),
            now.second(),
            now.millisecond()
        );
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        Ok(dir.join(format!("{action}-{stamp}-{n}.log")))
    }

    pub(crate) fn package_logs(&self, name: &str) -> PathBuf {
        self.logs.join(name)
    }

    /// Moves `staged` to `dest`. An existing `dest` (a leftover, or the same version being
    /// reinstalled) is first moved aside and removed, so `dest` is only ever absent or
    /// complete, never half-replaced.
    pub(crate) fn place(&self, staged: &Path, dest: &Path) -> io::Result<()> {
        let parent = dest
            .parent()
            .ok_or_else(|| io::Error::other("version folder has no parent"))?;
        fs::create_dir_all(parent)?;
        match fs::symlink_metadata(dest) {
            Ok(_) => self.remove(dest)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        fs::rename(staged, dest)?;
        sync_dir(parent)
    }

    /// Removes a folder: renamed into staging first (atomic), then deleted. A failure to delete
    /// is logged, not returned: the folder is already out of the way, and the next startup
    /// cleans staging.
    pub(crate) fn remove(&self, path: &Path) -> io::Result<()> {
        let trash = self.staging.join(self.unique("trash"));
        match fs::rename(path, &trash) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        if let Some(parent) = path.parent() {
            sync_dir(parent)?;
        }
        remove_any(&trash);
        Ok(())
    }

    /// Removes every staging entry not made by this instance: what a crashed process left.
    pub(crate) fn clean_staging(&self) -> io::Result<()> {
        let own = format!("{}-", self.instance);
        for entry in fs::read_dir(&self.staging)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(&own) {
                continue;
            }
            debug!(path = %entry.path().display(), "removing staging leftover");
            remove_any(&entry.path());
        }
        Ok(())
    }

    /// Removes `packages/<name>/*` except `keep`.
    pub(crate) fn remove_other_versions(&self, name: &str, keep: Option<&str>) -> io::Result<()> {
        let dir = self.package_dir(name);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            if Some(entry.file_name().to_string_lossy().as_ref()) == keep {
                continue;
            }
            debug!(path = %entry.path().display(), "removing a version folder no record needs");
            self.remove(&entry.path())?;
        }
        Ok(())
    }

    /// Keeps the newest `keep` log files of a package (and every file in `referenced`),
    /// removes the rest, and removes version folders left empty.
    pub(crate) fn prune_logs(&self, name: &str, keep: usize, referenced: &HashSet<PathBuf>) {
        let root = self.package_logs(name);
        let Ok(versions) = fs::read_dir(&root) else {
            return;
        };
        let mut files = Vec::new();
        let mut dirs = Vec::new();
        for version in versions.flatten() {
            let dir = version.path();
            if let Ok(entries) = fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    let modified = entry.metadata().and_then(|m| m.modified()).ok();
                    files.push((modified, entry.path()));
                }
            }
            dirs.push(dir);
        }
        // Newest first; the file name breaks ties (same modification time).
        files.sort_by(|a, b| b.cmp(a));
        for (_, path) in files.into_iter().skip(keep) {
            if referenced.contains(&path) {
                continue;
            }
            if let Err(e) = fs::remove_file(&path) {
                warn!(log = %path.display(), error = %e, "cannot remove an old script log");
            }
        }
        for dir in dirs {
            // Fails, as intended, when the folder still holds logs.
            let _ = fs::remove_dir(&dir);
        }
    }
}

/// Whether `dir` holds `action`'s script of this kind.
pub(crate) fn has_script(dir: &Path, kind: ScriptKind, action: Action) -> bool {
    dir.join(kind.file_name(action.as_str())).is_file()
}

fn remove_any(path: &Path) {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        warn!(path = %path.display(), error = %e, "cannot remove; it stays until the next startup");
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        fs::File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn place_replaces_and_cleanup_spares_own_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = Layout::create(dir.path()).expect("layout");
        let dest = layout.version_dir("pkg", "1.0");
        for content in ["old", "new"] {
            let staged = layout.new_staging("pkg", "1.0");
            fs::create_dir(&staged).expect("mkdir");
            fs::write(staged.join("f"), content).expect("write");
            layout.place(&staged, &dest).expect("place");
        }
        assert_eq!(fs::read_to_string(dest.join("f")).expect("read"), "new");

        let mine = layout.new_staging("pkg", "2.0");
        fs::create_dir(&mine).expect("mkdir");
        let theirs = layout.staging.join("0000000000000000-3-pkg-2.0");
        fs::create_dir(&theirs).expect("mkdir");
        layout.clean_staging().expect("clean");
        assert!(mine.is_dir());
        assert!(!theirs.exists());
        // Nothing but our own live entry is left: the replaced folder went to the trash.
        assert_eq!(fs::read_dir(&layout.staging).expect("ls").count(), 1);
    }
}
