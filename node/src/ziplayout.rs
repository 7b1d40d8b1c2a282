//! ZIP layout checks (for publishing) and safe extraction (for the installer).
//!
//! Owns: the rules a Distributor package ZIP must follow (an `install` and an `uninstall` script
//! at the root, not both `.sh` and `.ps1` for one action, optional `update` and `validate`), the
//! rules every entry must follow (a plain relative path that stays inside the root, a regular file
//! or directory, no duplicate), the caps on entry count, total size and compression ratio, and
//! extracting a ZIP into an empty staging directory without ever writing outside it.
//!
//! Does not own: the SHA-256/BLAKE3 checks of the ZIP as a whole (done before either function
//! runs), moving the staging directory into place, or running scripts (the installer).
//!
//! Both entry points run the same checks first, so anything the installer would refuse is
//! already refused at publish time; [`extract_zip`] then also catches what only reading the data
//! can reveal (a wrong CRC, a size header that lies).
//!
//! Choices, and why:
//! - Names are refused rather than normalised: `..` anywhere (even `a/../b`), `.` and empty
//!   components, backslashes, control characters. No archiver writes these for honest content,
//!   and refusing is simpler to get right than a normaliser whose output an attacker can aim at.
//! - Duplicates are compared ignoring case: a package is extracted on case-insensitive file
//!   systems too (NTFS, APFS, ext4 with casefold), where `Install.sh` and `install.sh` would
//!   overwrite each other and the result would depend on entry order. A file whose path is also
//!   used as a directory (`a` and `a/b`) is refused for the same reason.
//! - Only regular files and directories: symlinks, hard links, devices, FIFOs and sockets are
//!   refused wherever the unix mode says so. Standard ZIP has no hard-link entry; an archiver
//!   that marks one uses a non-regular mode, which is refused.
//! - Modes: directories 0755; files keep their permission bits minus setuid/setgid/sticky and
//!   group/world write, always owner read-write (so the node can read and remove what it
//!   extracted), 0644 when the ZIP carries no unix mode.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use tracing::{debug, warn};
use zip::read::ZipReadOptions;
use zip::{CompressionMethod, System, ZipArchive};

/// Entries over this size are held to [`ZipLimits::max_ratio`]; smaller ones can compress as
/// well as they like (a tiny file of zeros is not a bomb).
pub const RATIO_MIN_SIZE: u64 = 1024 * 1024;

/// Longest single path component (NAME_MAX on Linux and most file systems).
const MAX_COMPONENT_LEN: usize = 255;

const S_IFMT: u32 = 0o170_000;
const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
const S_IFBLK: u32 = 0o060_000;
const S_IFIFO: u32 = 0o010_000;
const S_IFSOCK: u32 = 0o140_000;

/// Caps that keep a hostile ZIP from exhausting memory or disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZipLimits {
    /// Entries in the central directory (files and directories).
    pub max_entries: u64,
    /// Sum of the uncompressed sizes, declared and actually written.
    pub max_total_uncompressed: u64,
    /// Uncompressed / compressed size of one entry, for entries over [`RATIO_MIN_SIZE`]. Deflate
    /// tops out near 1032:1; real packages (binaries, text) stay well under 20:1.
    pub max_ratio: u64,
    /// Bytes in an entry's name.
    pub max_path_len: usize,
}

impl Default for ZipLimits {
    fn default() -> Self {
        ZipLimits {
            max_entries: 10_000,
            max_total_uncompressed: 16 * 1024 * 1024 * 1024,
            max_ratio: 200,
            max_path_len: 1024,
        }
    }
}

/// The language of a package script.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScriptKind {
    /// `<action>.sh`, run as `sh <action>.sh`.
    Shell,
    /// `<action>.ps1`, run by PowerShell.
    PowerShell,
}

impl ScriptKind {
    /// The file extension, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            ScriptKind::Shell => "sh",
            ScriptKind::PowerShell => "ps1",
        }
    }

    /// The script's file name for `action`, e.g. `install.sh`.
    pub fn file_name(self, action: &str) -> String {
        format!("{action}.{}", self.extension())
    }
}

/// What a ZIP that passed the checks holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZipReport {
    /// Entries (files and directories).
    pub entries: u64,
    /// Sum of the files' uncompressed sizes.
    pub total_uncompressed: u64,
    pub install: ScriptKind,
    pub uninstall: ScriptKind,
    pub update: Option<ScriptKind>,
    pub validate: Option<ScriptKind>,
}

/// Why a ZIP was refused. Every message names the ZIP, the entry where there is one, and the
/// rule it broke.
#[derive(Debug, thiserror::Error)]
pub enum ZipError {
    #[error("{}: cannot read: {source}", zip.display())]
    Io { zip: PathBuf, source: io::Error },
    #[error("{}: not a valid ZIP archive: {reason}", zip.display())]
    Malformed { zip: PathBuf, reason: String },
    #[error("{}: {count} entries, more than the limit of {max}", zip.display())]
    TooManyEntries { zip: PathBuf, count: u64, max: u64 },
    #[error("{}: entry #{index} has an empty name", zip.display())]
    EmptyName { zip: PathBuf, index: u64 },
    #[error("{}: entry {entry:?}: name is {len} bytes, longer than the limit of {max}", zip.display())]
    PathTooLong {
        zip: PathBuf,
        entry: String,
        len: usize,
        max: usize,
    },
    #[error("{}: entry {entry:?}: {reason}", zip.display())]
    BadName {
        zip: PathBuf,
        entry: String,
        reason: &'static str,
    },
    #[error("{}: entry {entry:?}: absolute path; entries must be relative to the package root", zip.display())]
    AbsolutePath { zip: PathBuf, entry: String },
    #[error("{}: entry {entry:?}: '..' component; entries must stay inside the package root", zip.display())]
    PathTraversal { zip: PathBuf, entry: String },
    #[error("{}: entry {entry:?} duplicates {other:?}; names must be unique, ignoring case", zip.display())]
    DuplicateName {
        zip: PathBuf,
        entry: String,
        other: String,
    },
    #[error("{}: entry {entry:?} makes {other:?} both a file and a directory", zip.display())]
    PathConflict {
        zip: PathBuf,
        entry: String,
        other: String,
    },
    #[error("{}: entry {entry:?} is a symbolic link; only regular files and directories are allowed", zip.display())]
    Symlink { zip: PathBuf, entry: String },
    #[error("{}: entry {entry:?} is a {kind}; only regular files and directories are allowed", zip.display())]
    SpecialFile {
        zip: PathBuf,
        entry: String,
        kind: String,
    },
    #[error("{}: entry {entry:?} is encrypted; encrypted entries are not supported", zip.display())]
    Encrypted { zip: PathBuf, entry: String },
    #[error("{}: entry {entry:?} uses compression {method}; only stored and deflate are supported", zip.display())]
    UnsupportedCompression {
        zip: PathBuf,
        entry: String,
        method: String,
    },
    #[error("{}: entry {entry:?} brings the uncompressed total to {total} bytes, over the limit of {max}", zip.display())]
    TotalTooLarge {
        zip: PathBuf,
        entry: String,
        total: u64,
        max: u64,
    },
    #[error("{}: entry {entry:?} expands {size} bytes from {compressed}, a ratio over the limit of {max_ratio}:1", zip.display())]
    RatioExceeded {
        zip: PathBuf,
        entry: String,
        size: u64,
        compressed: u64,
        max_ratio: u64,
    },
    #[error("{}: entry {entry:?} declares {declared} bytes but holds {actual}", zip.display())]
    SizeMismatch {
        zip: PathBuf,
        entry: String,
        declared: u64,
        actual: String,
    },
    #[error("{}: entry {entry:?}: corrupt data: {reason}", zip.display())]
    Corrupt {
        zip: PathBuf,
        entry: String,
        reason: String,
    },
    #[error("{}: no {action} script ({action}.sh or {action}.ps1) at the ZIP root{hint}", zip.display())]
    MissingScript {
        zip: PathBuf,
        action: &'static str,
        hint: String,
    },
    #[error("{}: both {action}.sh and {action}.ps1 at the root; a package has one per action", zip.display())]
    AmbiguousScript { zip: PathBuf, action: &'static str },
    #[error("staging directory {}: {reason}", staging.display())]
    Staging { staging: PathBuf, reason: String },
    #[error("{}: entry {entry:?}: cannot write {}: {source}", zip.display(), path.display())]
    Write {
        zip: PathBuf,
        entry: String,
        path: PathBuf,
        source: io::Error,
    },
}

/// Checks a ZIP for publishing: every rule above, from the central directory and the local
/// headers (a few bytes per entry; memory grows only with per-entry metadata, which
/// `max_entries` bounds). No entry is decompressed.
pub fn check_zip_layout(path: &Path, limits: &ZipLimits) -> Result<ZipReport, ZipError> {
    let (_, report, _) = open_checked(path, limits)?;
    debug!(
        zip = %path.display(),
        entries = report.entries,
        total = report.total_uncompressed,
        "ZIP layout ok"
    );
    Ok(report)
}

/// Extracts a ZIP into `staging_dir`, which must be empty (it is created if missing; its
/// parent must exist). Runs every check of [`check_zip_layout`] first, then streams each entry to
/// disk counting bytes against its declared size, checks its CRC, fsyncs it, and finally fsyncs
/// the directories. Nothing is written outside `staging_dir`. On error, whatever was extracted is
/// removed again so the staging directory is left empty.
pub fn extract_zip(
    path: &Path,
    staging_dir: &Path,
    limits: &ZipLimits,
) -> Result<ZipReport, ZipError> {
    prepare_staging(staging_dir)?;
    let (mut archive, report, plan) = open_checked(path, limits)?;
    let mut writer = Extractor {
        zip: path,
        staging: staging_dir,
        limits,
        made_dirs: HashSet::new(),
        dirs_in_order: Vec::new(),
        buf: vec![0u8; 64 * 1024],
        written: 0,
    };
    match writer.run(&mut archive, &plan) {
        Ok(()) => {
            debug!(
                zip = %path.display(),
                staging = %staging_dir.display(),
                entries = report.entries,
                "ZIP extracted"
            );
            Ok(report)
        }
        Err(e) => {
            empty_staging(staging_dir);
            Err(e)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File { mode: u32 },
    Dir,
}

/// One entry that passed the checks, with its path as validated components.
#[derive(Debug)]
struct Planned {
    index: usize,
    name: String,
    components: Vec<String>,
    kind: Kind,
    size: u64,
}

type Archive = ZipArchive<BufReader<File>>;

fn open_checked(
    path: &Path,
    limits: &ZipLimits,
) -> Result<(Archive, ZipReport, Vec<Planned>), ZipError> {
    let zip = path.to_path_buf();
    let io_err = |source| ZipError::Io {
        zip: zip.clone(),
        source,
    };
    let mut file = File::open(path).map_err(io_err)?;
    // Refuse an oversized central directory before the zip crate allocates metadata for it.
    if let Some(count) = declared_entry_count(&mut file).map_err(io_err)? {
        if count > limits.max_entries {
            return Err(ZipError::TooManyEntries {
                zip,
                count,
                max: limits.max_entries,
            });
        }
    }
    file.seek(SeekFrom::Start(0)).map_err(io_err)?;
    let mut archive = ZipArchive::new(BufReader::new(file)).map_err(|e| malformed(path, e))?;
    let count = archive.len() as u64;
    if count > limits.max_entries {
        return Err(ZipError::TooManyEntries {
            zip,
            count,
            max: limits.max_entries,
        });
    }
    if archive.has_duplicate_names() {
        // The zip crate keeps one entry per exact name; find which name came twice.
        let name = File::open(path)
            .map(BufReader::new)
            .and_then(|mut r| {
                find_duplicate_raw_name(
                    &mut r,
                    archive.central_directory_start(),
                    archive.offset(),
                    limits.max_entries,
                )
            })
            .ok()
            .flatten()
            .map(|n| for_message(&n))
            .unwrap_or_else(|| "(unknown)".into());
        return Err(ZipError::DuplicateName {
            zip,
            entry: name.clone(),
            other: name,
        });
    }
    let (report, plan) = check_entries(&archive, path, limits)?;
    // Local headers must agree with the central directory, entries must not overlap (the
    // "overlapping files" bomb) and no data may hide between them.
    archive
        .validate_header_consistency()
        .map_err(|e| malformed(path, e))?;
    Ok((archive, report, plan))
}

/// An entry name fit for an error message: lossy UTF-8, cut short if absurdly long.
fn for_message(raw: &[u8]) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(raw);
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.into_owned(),
    }
}

fn malformed(path: &Path, e: zip::result::ZipError) -> ZipError {
    match e {
        zip::result::ZipError::Io(source) => ZipError::Io {
            zip: path.to_path_buf(),
            source,
        },
        other => ZipError::Malformed {
            zip: path.to_path_buf(),
            reason: other.to_string(),
        },
    }
}

fn check_entries(
    archive: &Archive,
    path: &Path,
    limits: &ZipLimits,
) -> Result<(ZipReport, Vec<Planned>), ZipError> {
    let zip = || path.to_path_buf();
    let mut plan = Vec::with_capacity(archive.len());
    let mut total: u64 = 0;
    // Lower-cased path → (path as written, is a directory, was listed as an entry).
    let mut seen: HashMap<String, (String, bool, bool)> = HashMap::with_capacity(archive.len());
    let mut scripts = Scripts::default();

    for index in 0..archive.len() {
        let entry = archive
            .by_index_data(index)
            .map_err(|e| malformed(path, e))?;
        let raw = entry.name_raw();
        let shown = for_message(raw);
        let components = check_name(raw, &shown, index as u64, path, limits)?;
        let name = entry
            .name()
            .map_err(|e| malformed(path, e))?
            .trim_end_matches('/')
            .to_string();
        if name.chars().any(char::is_control) {
            return Err(ZipError::BadName {
                zip: zip(),
                entry: shown,
                reason: "control character in the decoded name",
            });
        }
        // The decoded name (UTF-8, or CP437 turned into UTF-8) is what gets written; it must split
        // into the same number of components as the raw bytes that were checked.
        let decoded: Vec<String> = name.split('/').map(str::to_string).collect();
        if decoded.len() != components.len() {
            return Err(ZipError::Malformed {
                zip: zip(),
                reason: format!("entry {shown:?}: decoded name {name:?} has a different shape"),
            });
        }
        let components = decoded;

        if entry.encrypted() {
            return Err(ZipError::Encrypted {
                zip: zip(),
                entry: name,
            });
        }
        let method = entry.compression();
        if !matches!(
            method,
            CompressionMethod::Stored | CompressionMethod::Deflated
        ) {
            return Err(ZipError::UnsupportedCompression {
                zip: zip(),
                entry: name,
                method: format!("{method:?}"),
            });
        }

        let kind = entry_kind(
            entry.system(),
            entry.external_attributes(),
            raw.ends_with(b"/"),
        )
        .map_err(|k| match k {
            BadKind::Symlink => ZipError::Symlink {
                zip: zip(),
                entry: name.clone(),
            },
            BadKind::Special(kind) => ZipError::SpecialFile {
                zip: zip(),
                entry: name.clone(),
                kind,
            },
        })?;

        let size = entry.size();
        let compressed = entry.compressed_size();
        if kind == Kind::Dir && size != 0 {
            return Err(ZipError::SpecialFile {
                zip: zip(),
                entry: name,
                kind: "directory that carries data".into(),
            });
        }
        if method == CompressionMethod::Stored && compressed != size {
            return Err(ZipError::Corrupt {
                zip: zip(),
                entry: name,
                reason: format!("stored entry with compressed size {compressed} != size {size}"),
            });
        }
        total = match total.checked_add(size) {
            Some(t) if t <= limits.max_total_uncompressed => t,
            _ => {
                return Err(ZipError::TotalTooLarge {
                    zip: zip(),
                    entry: name,
                    total: total.saturating_add(size),
                    max: limits.max_total_uncompressed,
                });
            }
        };
        if size > RATIO_MIN_SIZE && size > compressed.saturating_mul(limits.max_ratio) {
            return Err(ZipError::RatioExceeded {
                zip: zip(),
                entry: name,
                size,
                compressed,
                max_ratio: limits.max_ratio,
            });
        }

        check_tree(&mut seen, &components, &name, kind, path)?;
        if let Kind::File { .. } = kind {
            scripts.note(&components, &name, path)?;
        }
        plan.push(Planned {
            index,
            name,
            components,
            kind,
            size,
        });
    }

    let report = scripts.into_report(path, plan.len() as u64, total)?;
    Ok((report, plan))
}

/// Checks an entry's raw name and returns its components (without a trailing `/`).
fn check_name(
    raw: &[u8],
    shown: &str,
    index: u64,
    zip: &Path,
    limits: &ZipLimits,
) -> Result<Vec<String>, ZipError> {
    let bad = |reason| ZipError::BadName {
        zip: zip.to_path_buf(),
        entry: shown.to_string(),
        reason,
    };
    if raw.is_empty() {
        return Err(ZipError::EmptyName {
            zip: zip.to_path_buf(),
            index,
        });
    }
    if raw.len() > limits.max_path_len {
        return Err(ZipError::PathTooLong {
            zip: zip.to_path_buf(),
            entry: shown.to_string(),
            len: raw.len(),
            max: limits.max_path_len,
        });
    }
    if raw.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err(bad("control character (NUL, newline, ...) in the name"));
    }
    // `/x`, `\x`, `\\server\x`, `C:\x`, `C:x` are all absolute or drive-relative somewhere.
    let drive = raw.len() >= 2 && raw[0].is_ascii_alphabetic() && raw[1] == b':';
    if raw[0] == b'/' || raw[0] == b'\\' || drive {
        return Err(ZipError::AbsolutePath {
            zip: zip.to_path_buf(),
            entry: shown.to_string(),
        });
    }
    // Windows treats `\` as a separator, so `..\x` escapes there: split on both.
    if raw.split(|&b| b == b'/' || b == b'\\').any(|c| c == b"..") {
        return Err(ZipError::PathTraversal {
            zip: zip.to_path_buf(),
            entry: shown.to_string(),
        });
    }
    if raw.contains(&b'\\') {
        return Err(bad("backslash in the name; ZIP paths use '/'"));
    }
    let body = raw.strip_suffix(b"/").unwrap_or(raw);
    let mut components = Vec::new();
    for c in body.split(|&b| b == b'/') {
        if c.is_empty() {
            return Err(bad("empty path component ('//' or a lone '/')"));
        }
        if c == b"." {
            return Err(bad("'.' path component"));
        }
        if c.len() > MAX_COMPONENT_LEN {
            return Err(bad("path component longer than 255 bytes"));
        }
        components.push(String::from_utf8_lossy(c).into_owned());
    }
    Ok(components)
}

enum BadKind {
    Symlink,
    Special(String),
}

/// The entry's type from its unix mode (when the ZIP was made on unix) or its name.
fn entry_kind(system: System, external: u32, slash: bool) -> Result<Kind, BadKind> {
    let unix = if system == System::Unix {
        external >> 16
    } else {
        0
    };
    let default_file = Kind::File { mode: 0o644 };
    if unix == 0 {
        // No unix mode: MS-DOS attributes (0x10 = directory) and the trailing slash decide.
        let dos_dir = system == System::Dos && external & 0x10 != 0;
        return Ok(if slash || dos_dir {
            Kind::Dir
        } else {
            default_file
        });
    }
    let kind = match unix & S_IFMT {
        S_IFDIR => Kind::Dir,
        // Some archivers leave the type bits at zero for plain files.
        0 | S_IFREG if !slash => Kind::File {
            mode: safe_mode(unix),
        },
        0 | S_IFREG => Kind::Dir,
        S_IFLNK => return Err(BadKind::Symlink),
        S_IFCHR => return Err(BadKind::Special("character device".into())),
        S_IFBLK => return Err(BadKind::Special("block device".into())),
        S_IFIFO => return Err(BadKind::Special("FIFO".into())),
        S_IFSOCK => return Err(BadKind::Special("socket".into())),
        other => return Err(BadKind::Special(format!("file of unknown type {other:#o}"))),
    };
    if slash && kind != Kind::Dir {
        return Err(BadKind::Special(
            "regular file named like a directory".into(),
        ));
    }
    Ok(kind)
}

/// Keeps read and execute bits, drops setuid/setgid/sticky and group/world write, and always
/// grants the owner read-write.
fn safe_mode(unix: u32) -> u32 {
    (unix & 0o755) | 0o600
}

/// Records `components` in the tree of paths seen so far, refusing duplicates (ignoring case)
/// and paths used both as a file and as a directory.
fn check_tree(
    seen: &mut HashMap<String, (String, bool, bool)>,
    components: &[String],
    name: &str,
    kind: Kind,
    zip: &Path,
) -> Result<(), ZipError> {
    let dup = |other: &str| ZipError::DuplicateName {
        zip: zip.to_path_buf(),
        entry: name.to_string(),
        other: other.to_string(),
    };
    let conflict = |other: &str| ZipError::PathConflict {
        zip: zip.to_path_buf(),
        entry: name.to_string(),
        other: other.to_string(),
    };
    let mut exact = String::new();
    for (i, component) in components.iter().enumerate() {
        if i > 0 {
            exact.push('/');
        }
        exact.push_str(component);
        let last = i + 1 == components.len();
        let is_dir = !last || kind == Kind::Dir;
        match seen.entry(exact.to_lowercase()) {
            Entry::Vacant(v) => {
                v.insert((exact.clone(), is_dir, last));
            }
            Entry::Occupied(mut o) => {
                let (other, other_dir, listed) = o.get().clone();
                if other != exact {
                    return Err(dup(&other));
                }
                if other_dir != is_dir {
                    return Err(conflict(&other));
                }
                if last {
                    // A directory implied by earlier files may be listed once; anything else
                    // listed twice is a duplicate.
                    if listed || !is_dir {
                        return Err(dup(&other));
                    }
                    o.get_mut().2 = true;
                }
            }
        }
    }
    Ok(())
}

const ACTIONS: [&str; 4] = ["install", "uninstall", "update", "validate"];

#[derive(Default)]
struct Scripts {
    found: [Option<ScriptKind>; 4],
    /// A script found below the root, for the hint when the root has none.
    nested: [Option<String>; 4],
}

impl Scripts {
    fn note(&mut self, components: &[String], name: &str, zip: &Path) -> Result<(), ZipError> {
        let Some(file) = components.last() else {
            return Ok(());
        };
        for (i, action) in ACTIONS.iter().enumerate() {
            for kind in [ScriptKind::Shell, ScriptKind::PowerShell] {
                if *file != kind.file_name(action) {
                    continue;
                }
                if components.len() > 1 {
                    self.nested[i].get_or_insert_with(|| name.to_string());
                    continue;
                }
                match self.found[i] {
                    Some(existing) if existing != kind => {
                        return Err(ZipError::AmbiguousScript {
                            zip: zip.to_path_buf(),
                            action,
                        });
                    }
                    _ => self.found[i] = Some(kind),
                }
            }
        }
        Ok(())
    }

    fn into_report(self, zip: &Path, entries: u64, total: u64) -> Result<ZipReport, ZipError> {
        let required = |i: usize| {
            self.found[i].ok_or_else(|| ZipError::MissingScript {
                zip: zip.to_path_buf(),
                action: ACTIONS[i],
                hint: match &self.nested[i] {
                    Some(n) => format!(
                        "; found {n:?}, but scripts must be at the ZIP root (zip the folder's \
                         contents, not the folder)"
                    ),
                    None => String::new(),
                },
            })
        };
        Ok(ZipReport {
            entries,
            total_uncompressed: total,
            install: required(0)?,
            uninstall: required(1)?,
            update: self.found[2],
            validate: self.found[3],
        })
    }
}

/// The entry count the end-of-central-directory record(s) declare, when the record sits where
/// it should (at the very end of the file). Takes the larger of the classic and the zip64 count,
/// since readers trust the zip64 one.
fn declared_entry_count(file: &mut File) -> io::Result<Option<u64>> {
    const EOCD: &[u8; 4] = b"PK\x05\x06";
    const LOCATOR: &[u8; 4] = b"PK\x06\x07";
    const EOCD64: &[u8; 4] = b"PK\x06\x06";
    let len = file.seek(SeekFrom::End(0))?;
    let tail_len = len.min(22 + 65_535);
    let tail_start = len - tail_len;
    file.seek(SeekFrom::Start(tail_start))?;
    let mut tail = vec![0u8; tail_len as usize];
    file.read_exact(&mut tail)?;
    let u16_at = |b: &[u8], i: usize| u64::from(u16::from_le_bytes([b[i], b[i + 1]]));
    let Some(p) = (0..tail.len().saturating_sub(21)).rev().find(|&p| {
        &tail[p..p + 4] == EOCD && p + 22 + u16_at(&tail, p + 20) as usize == tail.len()
    }) else {
        return Ok(None);
    };
    let mut count = u16_at(&tail, p + 10).max(u16_at(&tail, p + 8));
    let locator = (tail_start + p as u64).checked_sub(20);
    if let Some(locator) = locator {
        let mut loc = [0u8; 20];
        file.seek(SeekFrom::Start(locator))?;
        file.read_exact(&mut loc)?;
        if &loc[..4] == LOCATOR {
            let mut off = [0u8; 8];
            off.copy_from_slice(&loc[8..16]);
            let eocd64_at = u64::from_le_bytes(off);
            let mut rec = [0u8; 40];
            if eocd64_at.checked_add(40).is_some_and(|end| end <= len) {
                file.seek(SeekFrom::Start(eocd64_at))?;
                file.read_exact(&mut rec)?;
                if &rec[..4] == EOCD64 {
                    let mut n = [0u8; 8];
                    n.copy_from_slice(&rec[32..40]);
                    count = count.max(u64::from_le_bytes(n));
                }
            }
        }
    }
    Ok(Some(count))
}

/// Walks the raw central directory for the first name listed twice (error path only).
fn find_duplicate_raw_name(
    reader: &mut (impl Read + Seek),
    start: u64,
    offset: u64,
    max_entries: u64,
) -> io::Result<Option<Vec<u8>>> {
    for base in [start, start.saturating_add(offset)] {
        reader.seek(SeekFrom::Start(base))?;
        let mut names = HashSet::new();
        let mut header = [0u8; 46];
        for _ in 0..=max_entries.saturating_mul(2) {
            if reader.read_exact(&mut header).is_err() || &header[..4] != b"PK\x01\x02" {
                break;
            }
            let u16_at = |i: usize| i64::from(u16::from_le_bytes([header[i], header[i + 1]]));
            let mut name = vec![0u8; u16_at(28) as usize];
            reader.read_exact(&mut name)?;
            reader.seek(SeekFrom::Current(u16_at(30) + u16_at(32)))?;
            if !names.insert(name.clone()) {
                return Ok(Some(name));
            }
        }
    }
    Ok(None)
}

fn prepare_staging(staging: &Path) -> Result<(), ZipError> {
    let err = |reason: String| ZipError::Staging {
        staging: staging.to_path_buf(),
        reason,
    };
    match std::fs::symlink_metadata(staging) {
        Ok(meta) if meta.file_type().is_symlink() => Err(err("is a symbolic link".into())),
        Ok(meta) if !meta.is_dir() => Err(err("exists and is not a directory".into())),
        Ok(_) => {
            let mut entries = std::fs::read_dir(staging).map_err(|e| err(e.to_string()))?;
            if entries.next().is_some() {
                return Err(err("is not empty".into()));
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            make_dir(staging).map_err(|e| err(format!("cannot create: {e}")))
        }
        Err(e) => Err(err(e.to_string())),
    }
}

/// Removes everything under `staging` after a failed extraction. The directory was empty when
/// we started, so all of it is ours; `remove_dir_all` does not follow symlinks.
fn empty_staging(staging: &Path) {
    let Ok(entries) = std::fs::read_dir(staging) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let result = match entry.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
        if let Err(e) = result {
            warn!(path = %path.display(), error = %e, "cannot clean up after a failed extraction");
        }
    }
}

fn make_dir(path: &Path) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o755);
    }
    builder.create(path)?;
    // The umask may have taken bits away; directories are 0755 whatever it is.
    set_mode(path, 0o755)
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_path: &Path, _mode: u32) -> io::Result<()> {
    Ok(())
}

struct Extractor<'a> {
    zip: &'a Path,
    staging: &'a Path,
    limits: &'a ZipLimits,
    /// Relative directories this extraction created, so every other existing path is a sign
    /// that something else is writing into the staging directory.
    made_dirs: HashSet<Vec<String>>,
    dirs_in_order: Vec<PathBuf>,
    buf: Vec<u8>,
    written: u64,
}

impl Extractor<'_> {
    fn run(&mut self, archive: &mut Archive, plan: &[Planned]) -> Result<(), ZipError> {
        for item in plan {
            match item.kind {
                Kind::Dir => self.ensure_dirs(&item.components, &item.name)?,
                Kind::File { mode } => {
                    let parent = &item.components[..item.components.len() - 1];
                    self.ensure_dirs(parent, &item.name)?;
                    self.write_file(archive, item, mode)?;
                }
            }
        }
        // Directory entries must be durable too, or a crash could lose files that were synced.
        for dir in self
            .dirs_in_order
            .iter()
            .rev()
            .chain(std::iter::once(&self.staging.to_path_buf()))
        {
            sync_dir(dir).map_err(|source| self.write_err("(directory)", dir, source))?;
        }
        Ok(())
    }

    fn target(&self, components: &[String]) -> PathBuf {
        let mut path = self.staging.to_path_buf();
        path.extend(components);
        path
    }

    fn write_err(&self, entry: &str, path: &Path, source: io::Error) -> ZipError {
        ZipError::Write {
            zip: self.zip.to_path_buf(),
            entry: entry.to_string(),
            path: path.to_path_buf(),
            source,
        }
    }

    fn ensure_dirs(&mut self, components: &[String], entry: &str) -> Result<(), ZipError> {
        for i in 1..=components.len() {
            let rel = &components[..i];
            if self.made_dirs.contains(rel) {
                continue;
            }
            let path = self.target(rel);
            // `create` fails on anything already there, a symlink included, so we never descend
            // into a directory we did not make.
            make_dir(&path).map_err(|e| self.write_err(entry, &path, e))?;
            self.made_dirs.insert(rel.to_vec());
            self.dirs_in_order.push(path);
        }
        Ok(())
    }

    fn write_file(
        &mut self,
        archive: &mut Archive,
        item: &Planned,
        mode: u32,
    ) -> Result<(), ZipError> {
        let target = self.target(&item.components);
        let corrupt = |reason: String| ZipError::Corrupt {
            zip: self.zip.to_path_buf(),
            entry: item.name.clone(),
            reason,
        };
        let mut entry = archive
            .by_index_with_options(
                item.index,
                ZipReadOptions::new().enforce_header_consistency(true),
            )
            .map_err(|e| corrupt(e.to_string()))?;

        let mut options = OpenOptions::new();
        // create_new: O_CREAT|O_EXCL, which fails on any existing path and never follows a
        // symlink, so a planted link cannot redirect the write.
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut out = options
            .open(&target)
            .map_err(|e| self.write_err(&item.name, &target, e))?;

        // Read at most one byte past the declared size: enough to catch a header that lies,
        // never enough to fill the disk. Reading until the reader returns 0 is what makes the
        // zip crate compare the CRC.
        let mut limited = (&mut entry).take(item.size.saturating_add(1));
        let mut count: u64 = 0;
        loop {
            let n = match limited.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(corrupt(e.to_string())),
            };
            count += n as u64;
            if count > item.size {
                return Err(ZipError::SizeMismatch {
                    zip: self.zip.to_path_buf(),
                    entry: item.name.clone(),
                    declared: item.size,
                    actual: format!("more than {}", item.size),
                });
            }
            out.write_all(&self.buf[..n])
                .map_err(|e| self.write_err(&item.name, &target, e))?;
        }
        if count != item.size {
            return Err(ZipError::SizeMismatch {
                zip: self.zip.to_path_buf(),
                entry: item.name.clone(),
                declared: item.size,
                actual: count.to_string(),
            });
        }
        self.written = self.written.saturating_add(count);
        if self.written > self.limits.max_total_uncompressed {
            return Err(ZipError::TotalTooLarge {
                zip: self.zip.to_path_buf(),
                entry: item.name.clone(),
                total: self.written,
                max: self.limits.max_total_uncompressed,
            });
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            out.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(|e| self.write_err(&item.name, &target, e))?;
        }
        #[cfg(not(unix))]
        let _ = mode;
        out.sync_all()
            .map_err(|e| self.write_err(&item.name, &target, e))?;
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}
