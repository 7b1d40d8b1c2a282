//! One action per package at a time: an exclusive lock on `<data>/installs/<name>.lock`, plus
//! a set of the packages this process is working on.
//!
//! Owns: taking and releasing that lock. Does not own: what runs under it, or how long to wait
//! for it (the installer).
//!
//! The file lock is `flock(LOCK_EX | LOCK_NB)` (through `std::fs::File::try_lock`, which is
//! `flock` on Unix and `LockFileEx` on Windows). It belongs to the open file, not to a record on
//! disk, so the kernel releases it when the file is closed, including when the process dies: a
//! crash cannot leave it stuck. The file is opened close-on-exec (std always does), so a script
//! or a daemon it starts never inherits it.
//!
//! Why the in-process set as well: between `fork` and `exec`, a child being spawned by any
//! thread of this process holds a copy of every open descriptor, the lock file's included, so
//! for that instant the file lock outlives its release. Telling "busy in this process" (the set;
//! certain) apart from "the file lock is held" (another process, or such a passing copy) lets the
//! caller answer the first at once and give the second a moment before calling it busy.

use std::collections::HashSet;
use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

/// The packages this process holds locks for.
#[derive(Debug, Default)]
pub(crate) struct Locks {
    held: Arc<Mutex<HashSet<String>>>,
}

/// The answer to one attempt.
#[derive(Debug)]
pub(crate) enum Attempt {
    Acquired(PackageLock),
    /// Another task of this process holds it.
    HeldHere,
    /// The file lock is held: by another process, or for an instant by a child being spawned.
    HeldElsewhere,
}

impl Locks {
    /// One attempt at `name`'s lock, whose file is `path`.
    pub(crate) fn try_lock(&self, name: &str, path: &Path) -> io::Result<Attempt> {
        {
            let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
            if !held.insert(name.to_string()) {
                return Ok(Attempt::HeldHere);
            }
        }
        // From here on the name is ours; give it back on every way out but success.
        let release = || {
            self.held
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(name);
        };
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
        {
            Ok(file) => file,
            Err(e) => {
                release();
                return Err(e);
            }
        };
        match file.try_lock() {
            Ok(()) => Ok(Attempt::Acquired(PackageLock {
                file: Some(file),
                name: name.to_string(),
                path: path.to_path_buf(),
                held: Arc::clone(&self.held),
            })),
            Err(TryLockError::WouldBlock) => {
                release();
                Ok(Attempt::HeldElsewhere)
            }
            Err(TryLockError::Error(e)) => {
                release();
                Err(e)
            }
        }
    }
}

/// Held while an action on one package runs; dropping it releases the lock.
#[derive(Debug)]
pub(crate) struct PackageLock {
    file: Option<File>,
    name: String,
    path: PathBuf,
    held: Arc<Mutex<HashSet<String>>>,
}

impl PackageLock {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PackageLock {
    fn drop(&mut self) {
        // File first, so that whoever sees the name free also finds the file lock free.
        drop(self.file.take());
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pkg.lock");
        let locks = Locks::default();
        let Attempt::Acquired(first) = locks.try_lock("pkg", &path).expect("lock") else {
            panic!("lock is free");
        };
        assert_eq!(first.path(), path);
        assert!(matches!(
            locks.try_lock("pkg", &path).expect("lock"),
            Attempt::HeldHere
        ));
        // Another process (another `Locks`, same file) sees the file lock.
        let other = Locks::default();
        assert!(matches!(
            other.try_lock("pkg", &path).expect("lock"),
            Attempt::HeldElsewhere
        ));
        drop(first);
        assert!(matches!(
            locks.try_lock("pkg", &path).expect("lock"),
            Attempt::Acquired(_)
        ));
        // A failed attempt does not leave the name marked as held.
        assert!(matches!(
            other.try_lock("pkg", &path).expect("lock"),
            Attempt::Acquired(_)
        ));
    }
}
