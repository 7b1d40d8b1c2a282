//! ZIP layout checks and safe extraction, against ZIPs made by the real `zip` command, by
//! Python's zipfile, by the zip crate's writer, and hostile ZIPs whose bytes are written here.

use std::collections::BTreeMap;
use std::io::{Cursor, Read, Write};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use pkgmesh_node::ziplayout::{
    check_zip_layout, extract_zip, ScriptKind, ZipError, ZipLimits, ZipReport,
};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipArchive, ZipWriter};

// ---------------------------------------------------------------------------------------------
// Helpers

fn write(path: &Path, contents: &[u8], mode: u32) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, contents).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs the real `zip` command in `dir` with `args`, producing `out`.
fn zip_cmd(dir: &Path, out: &Path, args: &[&str]) {
    let status = Command::new("zip")
        .current_dir(dir)
        .arg("-q")
        .args(args)
        .arg(out)
        .arg(".")
        .status()
        .expect("the `zip` command is needed (apt-get install zip)");
    assert!(status.success(), "zip {args:?} failed");
}

/// Deterministic incompressible bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// One entry of a hand-built ZIP: every header field is ours to choose, so it can lie.
#[derive(Clone)]
struct Raw {
    name: Vec<u8>,
    data: Vec<u8>,
    method: u16,
    crc: u32,
    size: u64,
    /// Unix mode (type and permissions); 0 means "made on MS-DOS", no unix mode.
    unix_mode: u32,
    /// General-purpose flags (bit 0: encrypted).
    flags: u16,
}

impl Raw {
    fn stored(name: &str, data: &[u8], unix_mode: u32) -> Raw {
        Raw {
            name: name.as_bytes().to_vec(),
            data: data.to_vec(),
            method: 0,
            crc: crc32(data),
            size: data.len() as u64,
            unix_mode,
            flags: 0,
        }
    }
    fn file(name: &str, data: &[u8]) -> Raw {
        Raw::stored(name, data, 0o100644)
    }
}

fn scripts() -> Vec<Raw> {
    vec![
        Raw::stored("install.sh", b"echo install\n", 0o100755),
        Raw::file("uninstall.sh", b"echo uninstall\n"),
    ]
}

/// Writes a ZIP from raw entries (zip64 extra fields for sizes over 4 GiB).
fn build_zip(entries: &[Raw]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for e in entries {
        let offset = out.len() as u32;
        let zip64 = e.size > u64::from(u32::MAX);
        let (csize32, size32) = if zip64 {
            (u32::MAX, u32::MAX)
        } else {
            (e.data.len() as u32, e.size as u32)
        };
        let mut extra = Vec::new();
        if zip64 {
            extra.extend_from_slice(&1u16.to_le_bytes());
            extra.extend_from_slice(&16u16.to_le_bytes());
            extra.extend_from_slice(&e.size.to_le_bytes());
            extra.extend_from_slice(&(e.data.len() as u64).to_le_bytes());
        }
        let needed: u16 = if zip64 { 45 } else { 20 };
        // Local header.
        out.extend_from_slice(b"PK\x03\x04");
        out.extend_from_slice(&needed.to_le_bytes());
        out.extend_from_slice(&e.flags.to_le_bytes());
        out.extend_from_slice(&e.method.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes()); // time
        out.extend_from_slice(&0x21u16.to_le_bytes()); // date 1980-01-01
        out.extend_from_slice(&e.crc.to_le_bytes());
        out.extend_from_slice(&csize32.to_le_bytes());
        out.extend_from_slice(&size32.to_le_bytes());
        out.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
        out.extend_from_slice(&(extra.len() as u16).to_le_bytes());
        out.extend_from_slice(&e.name);
        out.extend_from_slice(&extra);
        out.extend_from_slice(&e.data);
        // Central header.
        let (made_by, external) = if e.unix_mode == 0 {
            (20u16, 0u32)
        } else {
            ((3u16 << 8) | 30, e.unix_mode << 16)
        };
        central.extend_from_slice(b"PK\x01\x02");
        central.extend_from_slice(&made_by.to_le_bytes());
        central.extend_from_slice(&needed.to_le_bytes());
        central.extend_from_slice(&e.flags.to_le_bytes());
        central.extend_from_slice(&e.method.to_le_bytes());
        central.extend_from_slice(&0u16.to_le_bytes());
        central.extend_from_slice(&0x21u16.to_le_bytes());
        central.extend_from_slice(&e.crc.to_le_bytes());
        central.extend_from_slice(&csize32.to_le_bytes());
        central.extend_from_slice(&size32.to_le_bytes());
        central.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
        central.extend_from_slice(&(extra.len() as u16).to_le_bytes());
        central.extend_from_slice(&0u16.to_le_bytes()); // comment
        central.extend_from_slice(&0u16.to_le_bytes()); // disk
        central.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
        central.extend_from_slice(&external.to_le_bytes());
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(&e.name);
        central.extend_from_slice(&extra);
    }
    let cd_offset = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(b"PK\x05\x06");
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

/// A deflate stream of `len` zeros (made by the zip crate's writer, lifted out raw), its CRC.
fn deflated_zeros(len: usize) -> (Vec<u8>, u32) {
    let mut w = ZipWriter::new(Cursor::new(Vec::new()));
    let opts = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
    w.start_file("z", opts).unwrap();
    let block = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(block.len());
        w.write_all(&block[..n]).unwrap();
        left -= n;
    }
    let bytes = w.finish().unwrap().into_inner();
    let mut archive = ZipArchive::new(Cursor::new(bytes)).unwrap();
    let mut raw = archive.by_index_raw(0).unwrap();
    let crc = raw.crc32();
    let mut data = Vec::new();
    raw.read_to_end(&mut data).unwrap();
    (data, crc)
}

/// A scratch area: `parent/` holds the ZIP's neighbours and an empty `parent/staging/`.
struct Scratch {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        std::fs::create_dir_all(root.join("parent/staging")).unwrap();
        write(&root.join("parent/neighbour.txt"), b"untouched", 0o644);
        Scratch { _tmp: tmp, root }
    }
    fn parent(&self) -> PathBuf {
        self.root.join("parent")
    }
    fn staging(&self) -> PathBuf {
        self.root.join("parent/staging")
    }
    fn zip_path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
    fn save(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.zip_path(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

/// Every path under `dir` (not following symlinks) with its size and mode.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, u32)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let meta = std::fs::symlink_metadata(entry.path()).unwrap();
            out.insert(
                entry.path().strip_prefix(dir).unwrap().to_path_buf(),
                (
                    if meta.is_dir() { 0 } else { meta.len() },
                    meta.permissions().mode(),
                ),
            );
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    out
}

/// Checks and extracts `zip`, expecting both to fail with `expect`; afterwards nothing under
/// the scratch root changed and staging is empty.
fn refused(s: &Scratch, zip: &Path, limits: &ZipLimits, expect: fn(&ZipError) -> bool) -> String {
    let before = snapshot(&s.root);
    let checked = check_zip_layout(zip, limits).expect_err("check_zip_layout accepted it");
    assert!(
        expect(&checked),
        "check_zip_layout: unexpected error {checked:?}"
    );
    let extracted = extract_zip(zip, &s.staging(), limits).expect_err("extract_zip accepted it");
    assert!(
        expect(&extracted),
        "extract_zip: unexpected error {extracted:?}"
    );
    assert_eq!(snapshot(&s.root), before, "the file system changed");
    assert_eq!(std::fs::read_dir(s.staging()).unwrap().count(), 0);
    let message = checked.to_string();
    assert!(
        message.contains(&zip.display().to_string()),
        "message does not name the ZIP: {message}"
    );
    message
}

fn hostile(entries: Vec<Raw>, expect: fn(&ZipError) -> bool, entry: &str) {
    let s = Scratch::new();
    let mut all = scripts();
    all.extend(entries);
    let zip = s.save("hostile.zip", &build_zip(&all));
    let message = refused(&s, &zip, &ZipLimits::default(), expect);
    assert!(
        message.contains(entry),
        "message does not name {entry:?}: {message}"
    );
}

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

// ---------------------------------------------------------------------------------------------
// Good ZIPs

/// A package tree with scripts, a setuid binary, a world-writable file, a big incompressible file,
/// an empty file and an empty directory.
fn make_package(dir: &Path) -> BTreeMap<&'static str, Vec<u8>> {
    let mut files = BTreeMap::new();
    files.insert("install.sh", b"#!/bin/sh\necho installed\n".to_vec());
    files.insert("uninstall.sh", b"#!/bin/sh\necho removed\n".to_vec());
    files.insert("validate.sh", b"#!/bin/sh\nexit 0\n".to_vec());
    files.insert("bin/tool", noise(70_000, 1));
    files.insert("data/readme.txt", b"hello\n".repeat(1000));
    files.insert("data/big.bin", noise(3 * 1024 * 1024 + 17, 2));
    files.insert("data/empty", Vec::new());
    for (name, contents) in &files {
        write(&dir.join(name), contents, 0o644);
    }
    std::fs::set_permissions(
        dir.join("install.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(
        dir.join("bin/tool"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    std::fs::set_permissions(
        dir.join("data/readme.txt"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("empty-dir")).unwrap();
    files
}

fn assert_package_extracted(staging: &Path, files: &BTreeMap<&str, Vec<u8>>) {
    for (name, contents) in files {
        let got = std::fs::read(staging.join(name)).unwrap();
        assert!(got == *contents, "{name}: contents differ");
    }
    assert_eq!(mode_of(&staging.join("install.sh")), 0o755, "exec bit kept");
    assert_eq!(mode_of(&staging.join("uninstall.sh")), 0o644);
    assert_eq!(mode_of(&staging.join("bin/tool")), 0o755, "setuid dropped");
    assert_eq!(
        mode_of(&staging.join("data/readme.txt")),
        0o644,
        "group/world write dropped"
    );
    assert_eq!(mode_of(&staging.join("bin")), 0o755);
    assert!(staging.join("empty-dir").is_dir());
    assert_eq!(mode_of(&staging.join("empty-dir")), 0o755);
}

fn expected_report(report: &ZipReport) {
    assert_eq!(report.install, ScriptKind::Shell);
    assert_eq!(report.uninstall, ScriptKind::Shell);
    assert_eq!(report.validate, Some(ScriptKind::Shell));
    assert_eq!(report.update, None);
}

#[test]
fn zip_command_package_checks_and_extracts_with_safe_modes() {
    for (label, args) in [("plain", vec!["-r"]), ("zip64 forced", vec!["-r", "-fz"])] {
        let s = Scratch::new();
        let src = s.root.join("src");
        let files = make_package(&src);
        let zip = s.zip_path("pkg.zip");
        zip_cmd(&src, &zip, &args);

        let report = check_zip_layout(&zip, &ZipLimits::default()).unwrap();
        expected_report(&report);
        let total: u64 = files.values().map(|c| c.len() as u64).sum();
        assert_eq!(report.total_uncompressed, total, "{label}");
        // 7 files + bin/, data/, empty-dir/ as directory entries.
        assert_eq!(report.entries, 10, "{label}");

        let before = snapshot(&s.parent());
        let extracted = extract_zip(&zip, &s.staging(), &ZipLimits::default()).unwrap();
        assert_eq!(extracted, report);
        assert_package_extracted(&s.staging(), &files);
        let after = snapshot(&s.parent());
        let outside: Vec<_> = after.keys().filter(|p| !p.starts_with("staging")).collect();
        assert_eq!(
            outside,
            before
                .keys()
                .filter(|p| !p.starts_with("staging"))
                .collect::<Vec<_>>(),
            "{label}: something was written outside staging"
        );
    }
}

#[test]
fn zip_made_by_python_zipfile_and_by_the_zip_crate_extract() {
    let s = Scratch::new();
    let py = s.zip_path("py.zip");
    let script = format!(
        "import zipfile\n\
         with zipfile.ZipFile({:?}, 'w', zipfile.ZIP_DEFLATED) as z:\n\
         \x20   i = zipfile.ZipInfo('install.ps1'); i.external_attr = 0o100644 << 16; i.create_system = 3\n\
         \x20   z.writestr(i, 'Write-Host hi')\n\
         \x20   z.writestr('uninstall.ps1', 'Write-Host bye')\n\
         \x20   z.writestr('update.ps1', 'Write-Host up')\n\
         \x20   z.writestr('payload/app.exe', b'MZ' * 5000)\n",
        py.display().to_string()
    );
    let status = Command::new("python3")
        .arg("-c")
        .arg(script)
        .status()
        .unwrap();
    assert!(status.success());
    let report = extract_zip(&py, &s.staging(), &ZipLimits::default()).unwrap();
    assert_eq!(report.install, ScriptKind::PowerShell);
    assert_eq!(report.uninstall, ScriptKind::PowerShell);
    assert_eq!(report.update, Some(ScriptKind::PowerShell));
    assert_eq!(report.validate, None);
    assert_eq!(
        std::fs::read(s.staging().join("payload/app.exe")).unwrap(),
        b"MZ".repeat(5000)
    );
    // Python's writestr(name) stores mode 0600 with no file-type bits: a regular file.
    assert_eq!(mode_of(&s.staging().join("uninstall.ps1")), 0o600);
    assert_eq!(mode_of(&s.staging().join("install.ps1")), 0o644);

    let s = Scratch::new();
    let mut w = ZipWriter::new(Cursor::new(Vec::new()));
    let opts = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
    w.start_file("install.sh", opts.unix_permissions(0o755))
        .unwrap();
    w.write_all(b"echo hi\n").unwrap();
    w.start_file("uninstall.sh", opts).unwrap();
    w.write_all(b"echo bye\n").unwrap();
    w.add_directory("lib/", opts).unwrap();
    w.start_file("lib/x.so", opts.large_file(true)).unwrap();
    w.write_all(&noise(100_000, 3)).unwrap();
    let zip = s.save("crate.zip", &w.finish().unwrap().into_inner());
    let report = extract_zip(&zip, &s.staging(), &ZipLimits::default()).unwrap();
    assert_eq!(report.entries, 4);
    assert_eq!(
        std::fs::read(s.staging().join("lib/x.so")).unwrap(),
        noise(100_000, 3)
    );
    assert_eq!(mode_of(&s.staging().join("install.sh")), 0o755);
}

#[test]
fn more_than_65535_entries_use_zip64_and_hit_the_entry_cap() {
    let s = Scratch::new();
    let mut w = ZipWriter::new(Cursor::new(Vec::new()));
    let opts = SimpleFileOptions::default().compression_method(CompressionMethod::Stored);
    w.start_file("install.sh", opts).unwrap();
    w.start_file("uninstall.sh", opts).unwrap();
    for i in 0..100_000u32 {
        w.start_file(format!("f/{i}"), opts).unwrap();
    }
    let zip = s.save("many.zip", &w.finish().unwrap().into_inner());

    let message = refused(&s, &zip, &ZipLimits::default(), |e| {
        matches!(
            e,
            ZipError::TooManyEntries {
                count: 100_002,
                max: 10_000,
                ..
            }
        )
    });
    assert!(message.contains("100002"), "{message}");

    // The same archive within a raised cap: the zip64 end record is read correctly.
    let roomy = ZipLimits {
        max_entries: 200_000,
        ..ZipLimits::default()
    };
    let report = check_zip_layout(&zip, &roomy).unwrap();
    assert_eq!(report.entries, 100_002);
}

// ---------------------------------------------------------------------------------------------
// Script rules

#[test]
fn script_rules() {
    let s = Scratch::new();
    let zip = s.save(
        "noinstall.zip",
        &build_zip(&[Raw::file("uninstall.sh", b"x"), Raw::file("a.txt", b"y")]),
    );
    let m = refused(&s, &zip, &ZipLimits::default(), |e| {
        matches!(
            e,
            ZipError::MissingScript {
                action: "install",
                ..
            }
        )
    });
    assert!(m.contains("install"), "{m}");

    let zip = s.save(
        "both.zip",
        &build_zip(&[
            Raw::file("install.sh", b"x"),
            Raw::file("install.ps1", b"x"),
            Raw::file("uninstall.sh", b"x"),
        ]),
    );
    refused(&s, &zip, &ZipLimits::default(), |e| {
        matches!(
            e,
            ZipError::AmbiguousScript {
                action: "install",
                ..
            }
        )
    });

    // Zipping the folder instead of its contents: the scripts sit one level down.
    let src = s.root.join("folder");
    write(&src.join("pkg/install.sh"), b"x", 0o755);
    write(&src.join("pkg/uninstall.sh"), b"x", 0o644);
    let zip = s.zip_path("nested.zip");
    zip_cmd(&src, &zip, &["-r"]);
    let m = refused(&s, &zip, &ZipLimits::default(), |e| {
        matches!(
            e,
            ZipError::MissingScript {
                action: "install",
                ..
            }
        )
    });
    assert!(m.contains("pkg/install.sh") && m.contains("root"), "{m}");

    // A script that is a directory does not count.
    let zip = s.save(
        "dirscript.zip",
        &build_zip(&[
            Raw::stored("install.sh/", b"", 0o040755),
            Raw::file("uninstall.sh", b"x"),
        ]),
    );
    refused(&s, &zip, &ZipLimits::default(), |e| {
        matches!(
            e,
            ZipError::MissingScript {
                action: "install",
                ..
            }
        )
    });
}

// ---------------------------------------------------------------------------------------------
// Hostile names

#[test]
fn path_traversal_in_every_form_is_refused() {
    let traversal: [&str; 5] = [
        "../evil",
        "a/../../evil",
        "a/../b",
        "..\\evil",
        "a\\..\\..\\evil",
    ];
    for name in traversal {
        hostile(
            vec![Raw::file(name, b"pwned")],
            |e| matches!(e, ZipError::PathTraversal { .. }),
            name.split(['/', '\\']).next_back().unwrap(),
        );
    }
    for name in [
        "/etc/evil",
        "C:\\evil",
        "c:evil",
        "\\\\server\\share\\evil",
        "\\evil",
    ] {
        hostile(
            vec![Raw::file(name, b"pwned")],
            |e| matches!(e, ZipError::AbsolutePath { .. }),
            "evil",
        );
    }
    for name in [
        "dir\\evil",
        "a/./b",
        "a//b",
        "./a",
        "evil\0.txt",
        "new\nline",
        "tab\there",
    ] {
        hostile(
            vec![Raw::file(name, b"pwned")],
            |e| matches!(e, ZipError::BadName { .. }),
            "",
        );
    }
    let long = "x".repeat(300);
    hostile(
        vec![Raw::file(&long, b"x")],
        |e| matches!(e, ZipError::BadName { .. }),
        "255",
    );
    let deep = "d/".repeat(600) + "f";
    hostile(
        vec![Raw::file(&deep, b"x")],
        |e| matches!(e, ZipError::PathTooLong { .. }),
        "1024",
    );
    hostile(
        vec![Raw::file("", b"x")],
        |e| matches!(e, ZipError::EmptyName { .. }),
        "#2",
    );
}

#[test]
fn duplicate_and_conflicting_names_are_refused() {
    hostile(
        vec![Raw::file("a.txt", b"one"), Raw::file("a.txt", b"two")],
        |e| matches!(e, ZipError::DuplicateName { .. }),
        "a.txt",
    );
    hostile(
        vec![Raw::file("Install.sh", b"shadow")],
        |e| matches!(e, ZipError::DuplicateName { .. }),
        "Install.sh",
    );
    hostile(
        vec![Raw::file("Lib/a", b"1"), Raw::file("lib/b", b"2")],
        |e| matches!(e, ZipError::DuplicateName { .. }),
        "lib/b",
    );
    hostile(
        vec![Raw::file("a", b"file"), Raw::file("a/b", b"under a file")],
        |e| matches!(e, ZipError::PathConflict { .. }),
        "a/b",
    );
    hostile(
        vec![Raw::file("a/b", b"1"), Raw::file("a", b"file over a dir")],
        |e| matches!(e, ZipError::PathConflict { .. }),
        "\"a\"",
    );
    hostile(
        vec![
            Raw::stored("d/", b"", 0o040755),
            Raw::stored("d/", b"", 0o040755),
        ],
        |e| matches!(e, ZipError::DuplicateName { .. }),
        "d",
    );
    // A directory entry after the files it holds is fine (some archivers write it last).
    let s = Scratch::new();
    let mut all = scripts();
    all.push(Raw::file("d/x", b"1"));
    all.push(Raw::stored("d/", b"", 0o040755));
    let zip = s.save("dirlast.zip", &build_zip(&all));
    extract_zip(&zip, &s.staging(), &ZipLimits::default()).unwrap();
    assert_eq!(std::fs::read(s.staging().join("d/x")).unwrap(), b"1");
}

// ---------------------------------------------------------------------------------------------
// Hostile entry types

/// ZIP has no hard-link entry type. The real `zip` command stores a hard-linked file as a second
/// regular entry, and PKWARE's Unix extra field (0x000d) can carry a link target that some
/// extractors act on: ours never reads it, so every entry becomes a new regular file holding its
/// own bytes, and nothing outside staging is linked or touched.
#[test]
fn hard_links_come_out_as_separate_regular_files_never_as_links() {
    use std::os::unix::fs::MetadataExt;

    let s = Scratch::new();
    let src = s.root.join("src");
    write(&src.join("install.sh"), b"echo in\n", 0o755);
    write(&src.join("uninstall.sh"), b"echo out\n", 0o644);
    write(&src.join("data/original"), b"shared bytes", 0o644);
    std::fs::hard_link(src.join("data/original"), src.join("data/linked")).unwrap();
    let zip = s.zip_path("hardlink.zip");
    zip_cmd(&src, &zip, &["-r"]);
    extract_zip(&zip, &s.staging(), &ZipLimits::default()).unwrap();
    for name in ["data/original", "data/linked"] {
        let meta = std::fs::symlink_metadata(s.staging().join(name)).unwrap();
        assert!(meta.file_type().is_file(), "{name}");
        assert_eq!(meta.nlink(), 1, "{name} came out linked");
        assert_eq!(
            std::fs::read(s.staging().join(name)).unwrap(),
            b"shared bytes"
        );
    }

    // A regular-mode entry whose PKWARE Unix extra field (atime, mtime, uid, gid, then the
    // link target) names a file outside staging, written by Python's zipfile (the zip crate
    // refuses to write that reserved field).
    let s = Scratch::new();
    let target = s.root.join("parent/neighbour.txt");
    let zip = s.zip_path("extra-field.zip");
    let script = format!(
        "import struct, zipfile\n\
         with zipfile.ZipFile({:?}, 'w') as z:\n\
         \x20   z.writestr(zipfile.ZipInfo('install.sh'), 'echo in')\n\
         \x20   z.writestr(zipfile.ZipInfo('uninstall.sh'), 'echo out')\n\
         \x20   i = zipfile.ZipInfo('hardlink'); i.external_attr = 0o100644 << 16; i.create_system = 3\n\
         \x20   link = {:?}.encode()\n\
         \x20   i.extra = struct.pack('<HHIIHH', 0x000d, 12 + len(link), 0, 0, 0, 0) + link\n\
         \x20   z.writestr(i, \"the entry's own bytes\")\n",
        zip.display().to_string(),
        target.display().to_string()
    );
    let status = Command::new("python3")
        .arg("-c")
        .arg(script)
        .status()
        .unwrap();
    assert!(status.success());
    let raw = std::fs::read(&zip).unwrap();
    let link = target.to_str().unwrap().as_bytes();
    assert!(
        raw.windows(link.len()).any(|w| w == link),
        "the extra field was not written"
    );
    let outside_staging = || -> BTreeMap<PathBuf, (u64, u32)> {
        snapshot(&s.parent())
            .into_iter()
            .filter(|(path, _)| !path.starts_with("staging"))
            .collect()
    };
    let before = outside_staging();
    extract_zip(&zip, &s.staging(), &ZipLimits::default()).unwrap();
    let meta = std::fs::symlink_metadata(s.staging().join("hardlink")).unwrap();
    assert!(meta.file_type().is_file());
    assert_eq!(meta.nlink(), 1);
    assert_eq!(
        std::fs::read(s.staging().join("hardlink")).unwrap(),
        b"the entry's own bytes"
    );
    assert_eq!(std::fs::read(&target).unwrap(), b"untouched");
    assert_eq!(std::fs::metadata(&target).unwrap().nlink(), 1);
    assert_eq!(
        before,
        outside_staging(),
        "something outside staging changed"
    );
}

#[test]
fn symlinks_devices_fifos_and_sockets_are_refused() {
    // A symlink stored by the real zip command.
    let s = Scratch::new();
    let src = s.root.join("src");
    write(&src.join("install.sh"), b"x", 0o755);
    write(&src.join("uninstall.sh"), b"x", 0o644);
    symlink("/etc/passwd", src.join("passwd")).unwrap();
    let zip = s.zip_path("symlink.zip");
    zip_cmd(&src, &zip, &["-r", "-y"]);
    let m = refused(&s, &zip, &ZipLimits::default(), |e| {
        matches!(e, ZipError::Symlink { .. })
    });
    assert!(m.contains("passwd"), "{m}");

    hostile(
        vec![
            Raw::stored("link", b"/etc", 0o120777),
            Raw::file("link/evil", b"x"),
        ],
        |e| matches!(e, ZipError::Symlink { .. }),
        "link",
    );
    for (mode, kind) in [
        (0o020644, "character device"),
        (0o060644, "block device"),
        (0o010644, "FIFO"),
        (0o140755, "socket"),
        (0o170644, "unknown type"),
    ] {
        let s = Scratch::new();
        let mut all = scripts();
        all.push(Raw::stored("dev", b"", mode));
        let zip = s.save("special.zip", &build_zip(&all));
        let m = refused(&s, &zip, &ZipLimits::default(), |e| {
            matches!(e, ZipError::SpecialFile { .. })
        });
        assert!(m.contains(kind) && m.contains("dev"), "{m}");
    }
}

// ---------------------------------------------------------------------------------------------
// Size caps, bombs, lies and corruption

#[test]
fn compression_bombs_and_size_caps() {
    // An honest but extreme entry: 16 MiB of zeros deflates about 1000:1.
    let (zeros, crc) = deflated_zeros(16 << 20);
    let bomb = Raw {
        name: b"bomb.bin".to_vec(),
        data: zeros.clone(),
        method: 8,
        crc,
        size: 16 << 20,
        unix_mode: 0o100644,
        flags: 0,
    };
    hostile(
        vec![bomb.clone()],
        |e| matches!(e, ZipError::RatioExceeded { .. }),
        "bomb.bin",
    );

    // "10 GB" declared, tiny on disk.
    let declared = Raw {
        size: 10_000_000_000,
        ..bomb.clone()
    };
    hostile(
        vec![declared.clone()],
        |e| matches!(e, ZipError::RatioExceeded { .. }),
        "bomb.bin",
    );

    // With the ratio cap lifted, the total cap stops the same archive.
    let s = Scratch::new();
    let mut all = scripts();
    all.push(declared.clone());
    let zip = s.save("declared.zip", &build_zip(&all));
    let no_ratio = ZipLimits {
        max_ratio: u64::MAX,
        max_total_uncompressed: 8_000_000_000,
        ..ZipLimits::default()
    };
    refused(&s, &zip, &no_ratio, |e| {
        matches!(e, ZipError::TotalTooLarge { .. })
    });

    // With every cap lifted, extraction counts the bytes: 16 MiB is not the 10 GB declared.
    let lax = ZipLimits {
        max_ratio: u64::MAX,
        max_total_uncompressed: u64::MAX,
        ..ZipLimits::default()
    };
    check_zip_layout(&zip, &lax).unwrap();
    let before = snapshot(&s.root);
    let err = extract_zip(&zip, &s.staging(), &lax).unwrap_err();
    assert!(
        matches!(
            err,
            ZipError::SizeMismatch {
                declared: 10_000_000_000,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(snapshot(&s.root), before);

    // A header that understates: 1000 bytes declared, 16 MiB inside. Stopped one byte past the
    // declared size by the decoder or by our counter, whichever sees it first.
    let s = Scratch::new();
    let mut all = scripts();
    all.push(Raw {
        size: 1000,
        ..bomb.clone()
    });
    let zip = s.save("liar.zip", &build_zip(&all));
    check_zip_layout(&zip, &ZipLimits::default()).unwrap();
    let before = snapshot(&s.root);
    let err = extract_zip(&zip, &s.staging(), &ZipLimits::default()).unwrap_err();
    assert!(
        matches!(
            err,
            ZipError::SizeMismatch { .. } | ZipError::Corrupt { .. }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("bomb.bin"), "{err}");
    assert_eq!(snapshot(&s.root), before);

    // Total cap on an ordinary archive.
    let s = Scratch::new();
    let mut all = scripts();
    all.push(Raw::file("a.bin", &noise(600_000, 4)));
    all.push(Raw::file("b.bin", &noise(600_000, 5)));
    let zip = s.save("total.zip", &build_zip(&all));
    let small = ZipLimits {
        max_total_uncompressed: 1_000_000,
        ..ZipLimits::default()
    };
    let m = refused(&s, &zip, &small, |e| {
        matches!(e, ZipError::TotalTooLarge { .. })
    });
    assert!(m.contains("b.bin"), "{m}");
}

#[test]
fn a_wrong_crc_is_refused_on_extraction() {
    let s = Scratch::new();
    let src = s.root.join("src");
    write(&src.join("install.sh"), b"echo hi\n", 0o755);
    write(&src.join("uninstall.sh"), b"echo bye\n", 0o644);
    let marker = b"MARKER-0123456789-this-is-the-stored-payload";
    write(&src.join("payload.txt"), marker, 0o644);
    let zip = s.zip_path("crc.zip");
    zip_cmd(&src, &zip, &["-r", "-0"]);
    let mut bytes = std::fs::read(&zip).unwrap();
    let at = bytes
        .windows(marker.len())
        .position(|w| w == marker)
        .expect("stored payload found");
    bytes[at + 7] ^= 0x01;
    std::fs::write(&zip, &bytes).unwrap();

    // The central directory is intact, so the layout check passes...
    check_zip_layout(&zip, &ZipLimits::default()).unwrap();
    // ...and extraction, which reads every byte, refuses it and leaves nothing behind.
    let before = snapshot(&s.root);
    let err = extract_zip(&zip, &s.staging(), &ZipLimits::default()).unwrap_err();
    match &err {
        ZipError::Corrupt { entry, reason, .. } => {
            assert_eq!(entry, "payload.txt");
            assert!(reason.to_lowercase().contains("checksum"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(snapshot(&s.root), before);
}

#[test]
fn malformed_archives_encryption_and_staging_rules() {
    let s = Scratch::new();
    let junk = s.save("junk.zip", &noise(5000, 9));
    refused(&s, &junk, &ZipLimits::default(), |e| {
        matches!(e, ZipError::Malformed { .. })
    });
    let empty = s.save("empty.zip", b"");
    refused(&s, &empty, &ZipLimits::default(), |e| {
        matches!(e, ZipError::Malformed { .. })
    });
    let missing = s.zip_path("missing.zip");
    assert!(matches!(
        check_zip_layout(&missing, &ZipLimits::default()),
        Err(ZipError::Io { .. })
    ));

    // Compression method 12 (bzip2) is not one we decode.
    hostile(
        vec![Raw {
            method: 12,
            ..Raw::file("x.bz2", b"data")
        }],
        |e| matches!(e, ZipError::UnsupportedCompression { .. }),
        "x.bz2",
    );

    hostile(
        vec![Raw {
            flags: 1,
            ..Raw::file("secret.txt", b"data")
        }],
        |e| matches!(e, ZipError::Encrypted { .. }),
        "secret.txt",
    );

    // Staging must be an empty real directory.
    let s = Scratch::new();
    let good = s.save("good.zip", &build_zip(&scripts()));
    write(&s.staging().join("leftover"), b"x", 0o644);
    assert!(matches!(
        extract_zip(&good, &s.staging(), &ZipLimits::default()),
        Err(ZipError::Staging { .. })
    ));
    let link = s.root.join("link-staging");
    std::fs::create_dir(s.root.join("elsewhere")).unwrap();
    symlink(s.root.join("elsewhere"), &link).unwrap();
    assert!(matches!(
        extract_zip(&good, &link, &ZipLimits::default()),
        Err(ZipError::Staging { .. })
    ));
    assert_eq!(
        std::fs::read_dir(s.root.join("elsewhere")).unwrap().count(),
        0
    );
    // A missing staging directory is created.
    let fresh = s.root.join("fresh");
    extract_zip(&good, &fresh, &ZipLimits::default()).unwrap();
    assert_eq!(
        std::fs::read(fresh.join("install.sh")).unwrap(),
        b"echo install\n"
    );
    assert_eq!(mode_of(&fresh), 0o755);
}
