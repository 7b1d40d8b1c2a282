//! The bodies of pkgmesh's fuzz targets: every decoder that reads bytes from outside the process
//! (frames, wire messages, bitfields, chunk-hash lists, deployment specs, names and sizes,
//! manifests, ZIPs, config files), each as a plain function from bytes to a [`Verdict`].
//!
//! Why a crate of plain functions: cargo-fuzz needs nightly and sanitizer flags, which CI cannot
//! afford on every run, while a regression caught by a corpus input should fail the ordinary
//! `cargo test --workspace`. So the `fuzz_targets/*.rs` binaries are one-line wrappers around
//! [`TARGETS`], and the main workspace's `tests/tests/fuzz_corpus.rs` replays the corpus (and
//! deterministic mutations of it) through the very same functions on stable.
//!
//! A body panics only when the product breaks a promise (a decoded value that does not
//! re-encode to itself, a parser accepting what it must refuse, a ZIP extracted outside its
//! staging directory); a refusal is the expected outcome for garbage, and its message must say
//! something.

use std::fs;
use std::path::{Path, PathBuf};

use pkgmesh_node::config::{self, NodeFile, SeedFile};
use pkgmesh_node::ziplayout::{check_zip_layout, extract_zip, ZipLimits};
use pkgmesh_protocol::bitfield::Bitfield;
use pkgmesh_protocol::blob::{BlobId, ChunkHashes, ChunkLayout, MAX_CHUNKS, MIN_CHUNK_SIZE};
use pkgmesh_protocol::deploy::{
    parse_argument, parse_duration_secs, DeploymentSpec, Limit, Schedule, Target as DeployTarget,
};
use pkgmesh_protocol::manifest::{parse_manifest, MAX_REPORTED_ERRORS};
use pkgmesh_protocol::names::{
    quote_for_message, validate_file_name, validate_package_name, validate_version_name,
    MAX_SHOWN_VALUE_CHARS,
};
use pkgmesh_protocol::platform::parse_os_release;
use pkgmesh_protocol::select::{select, Platform};
use pkgmesh_protocol::units::{parse_rate, parse_size};
use pkgmesh_protocol::wire::{
    decode_frame, decode_payload, encode, Request, Response, FRAME_PREFIX_BYTES, MAX_FRAME_BYTES,
};

pub mod seeds;

/// What a decoder made of an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    /// Refused, with the decoder's own message.
    Refused(String),
}

impl Verdict {
    fn refused(message: impl ToString) -> Verdict {
        let message = message.to_string();
        assert!(
            !message.trim().is_empty(),
            "a refusal must say what is wrong"
        );
        Verdict::Refused(message)
    }

    fn from_result<T, E: ToString>(result: Result<T, E>) -> Verdict {
        match result {
            Ok(_) => Verdict::Accepted,
            Err(e) => Verdict::refused(e),
        }
    }

    /// Accepted when either part accepted: targets that try one input several ways.
    fn or(self, other: Verdict) -> Verdict {
        match (self, other) {
            (Verdict::Refused(a), Verdict::Refused(_)) => Verdict::Refused(a),
            _ => Verdict::Accepted,
        }
    }
}

/// One fuzz target: its cargo-fuzz binary name (also its corpus directory) and its body.
pub struct FuzzTarget {
    pub name: &'static str,
    pub run: fn(&[u8]) -> Verdict,
    /// Whether the input is a whole file read from disk (ZIP) rather than a message in memory:
    /// such targets are slower, and the replay test gives them fewer mutations.
    pub touches_disk: bool,
}

/// Every target, in the order the long runs go through them.
pub const TARGETS: &[FuzzTarget] = &[
    FuzzTarget {
        name: "frame_decoder",
        run: frame_decoder,
        touches_disk: false,
    },
    FuzzTarget {
        name: "request_decoder",
        run: request_decoder,
        touches_disk: false,
    },
    FuzzTarget {
        name: "response_decoder",
        run: response_decoder,
        touches_disk: false,
    },
    FuzzTarget {
        name: "bitfield_decoder",
        run: bitfield_decoder,
        touches_disk: false,
    },
    FuzzTarget {
        name: "chunk_hashes",
        run: chunk_hashes,
        touches_disk: false,
    },
    FuzzTarget {
        name: "deploy_spec",
        run: deploy_spec,
        touches_disk: false,
    },
    FuzzTarget {
        name: "names_and_units",
        run: names_and_units,
        touches_disk: false,
    },
    FuzzTarget {
        name: "manifest_parser",
        run: manifest_parser,
        touches_disk: false,
    },
    FuzzTarget {
        name: "zip_checker",
        run: zip_checker,
        touches_disk: true,
    },
    FuzzTarget {
        name: "config_parser",
        run: config_parser,
        touches_disk: false,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static FuzzTarget> {
    TARGETS.iter().find(|t| t.name == name)
}

/// Bytes as a stream of frames, both directions: every frame consumes at least its prefix, so
/// the loop ends; a decoded message must re-encode and decode to itself.
pub fn frame_decoder(data: &[u8]) -> Verdict {
    let requests = frames::<Request>(data);
    let responses = frames::<Response>(data);
    requests.or(responses)
}

fn frames<T>(data: &[u8]) -> Verdict
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let mut rest = data;
    let mut decoded = 0usize;
    loop {
        match decode_frame::<T>(rest) {
            Ok(Some((message, used))) => {
                assert!(
                    (FRAME_PREFIX_BYTES..=FRAME_PREFIX_BYTES + MAX_FRAME_BYTES).contains(&used)
                        && used <= rest.len(),
                    "a frame claims {used} bytes of a {}-byte buffer",
                    rest.len()
                );
                round_trips(&message);
                decoded += 1;
                rest = &rest[used..];
            }
            Ok(None) if decoded > 0 && rest.is_empty() => return Verdict::Accepted,
            Ok(None) => {
                return Verdict::refused(format!(
                    "incomplete frame: {} bytes after {decoded} whole frames",
                    rest.len()
                ))
            }
            Err(e) => return Verdict::refused(e),
        }
    }
}

/// A decoded message encodes and decodes back to itself. Not to the same bytes: bincode's
/// varints accept non-minimal encodings, which are harmless.
fn round_trips<T>(message: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let again = encode(message).expect("a decoded message encodes");
    let (back, used) = decode_frame::<T>(&again)
        .expect("a re-encoded message decodes")
        .expect("a re-encoded message is whole");
    assert_eq!(used, again.len());
    assert_eq!(
        &back, message,
        "a message changed through encode and decode"
    );
}

/// A request payload, as a server reads it after the length prefix, then what the server does
/// first with the parts that carry their own rules.
pub fn request_decoder(data: &[u8]) -> Verdict {
    let request = match decode_payload::<Request>(data) {
        Ok(request) => request,
        Err(e) => return Verdict::refused(e),
    };
    round_trips(&request);
    match &request {
        Request::CreateDeployment(spec) => {
            let _ = spec.check();
        }
        Request::Publish(publish) => {
            let _ = validate_package_name(&publish.name);
            let _ = parse_manifest(publish.manifest_json.as_bytes());
            for file in &publish.files {
                let _ = validate_file_name(&file.file);
                let _ = ChunkLayout::for_size(file.size);
            }
        }
        Request::Announce(announcement) => {
            for holding in &announcement.holdings {
                if let Ok(layout) = ChunkLayout::for_size(holding.size) {
                    // The tracker compares the two; neither may be trusted to fit the other.
                    let _ = layout.chunk_count() == holding.chunks.len();
                }
            }
        }
        Request::GetChunkHashes { size, .. } | Request::GetPeers { size, .. } => {
            let _ = ChunkLayout::for_size(*size);
        }
        Request::GetManifest { name, version } | Request::Preheat { name, version } => {
            let _ = validate_package_name(name);
            if let Some(version) = version {
                let _ = validate_version_name(version);
            }
        }
        _ => {}
    }
    Verdict::Accepted
}

/// A response payload, as a client reads it, then the checks a node runs on what it got.
pub fn response_decoder(data: &[u8]) -> Verdict {
    let response = match decode_payload::<Response>(data) {
        Ok(response) => response,
        Err(e) => return Verdict::refused(e),
    };
    round_trips(&response);
    match &response {
        Response::ChunkHashes { blob, packed } => {
            let chunks = (packed.len() / 32) as u64;
            let _ = ChunkHashes::verify_packed(*blob, chunks * MIN_CHUNK_SIZE as u64, packed);
        }
        Response::Manifest(reply) => {
            let _ = parse_manifest(reply.manifest_json.as_bytes());
            let _ = validate_version_name(&reply.version);
        }
        Response::Chunk { len, index, .. } => {
            let _ = (*index as u64).checked_mul(*len as u64);
        }
        _ => {}
    }
    Verdict::Accepted
}

/// A bitfield, both as the wire shape a peer sends (`len` then bytes, through serde) and as the
/// packed form read from the cache: `u32` length (little-endian) then the bytes.
pub fn bitfield_decoder(data: &[u8]) -> Verdict {
    let wire = match decode_payload::<Bitfield>(data) {
        Ok(field) => {
            check_bitfield(&field);
            round_trips(&field);
            Verdict::Accepted
        }
        Err(e) => Verdict::refused(e),
    };
    let packed = match data.split_first_chunk::<4>() {
        Some((len, bytes)) => match Bitfield::from_bytes(u32::from_le_bytes(*len), bytes) {
            Ok(field) => {
                check_bitfield(&field);
                assert_eq!(field.as_bytes(), bytes);
                Verdict::Accepted
            }
            Err(e) => Verdict::refused(e),
        },
        None => Verdict::refused("shorter than a bitfield's length"),
    };
    wire.or(packed)
}

fn check_bitfield(field: &Bitfield) {
    assert!(field.len() <= MAX_CHUNKS);
    let ones: Vec<u32> = field.iter_ones().collect();
    assert_eq!(ones.len() as u32, field.count_ones());
    assert!(ones.iter().all(|&i| i < field.len() && field.get(i)));
    assert!(!field.get(field.len()), "a bit past the end reads as set");
    assert_eq!(field.is_full(), field.count_ones() == field.len());
    let again = Bitfield::from_bytes(field.len(), &field.to_bytes()).expect("own bytes decode");
    assert_eq!(&again, field);
}

/// A chunk-hash list as a node checks one from a peer: 32 bytes of blob id, the size as a
/// little-endian `u64`, then the packed hashes. Also the blob id's text form, when the input is
/// text.
pub fn chunk_hashes(data: &[u8]) -> Verdict {
    let text = match std::str::from_utf8(data) {
        Ok(text) => match text.trim().parse::<BlobId>() {
            Ok(id) => {
                assert_eq!(id.to_hex().parse::<BlobId>().ok(), Some(id));
                Verdict::Accepted
            }
            Err(e) => Verdict::refused(e),
        },
        Err(e) => Verdict::refused(e),
    };
    let Some((id, rest)) = data.split_first_chunk::<32>() else {
        return text.or(Verdict::refused("shorter than a blob id"));
    };
    let Some((size, packed)) = rest.split_first_chunk::<8>() else {
        return text.or(Verdict::refused("no size after the blob id"));
    };
    let size = u64::from_le_bytes(*size);
    let list = match ChunkHashes::verify_packed(BlobId(*id), size, packed) {
        Ok(list) => {
            let layout = list.layout();
            assert_eq!(list.to_packed(), packed);
            assert_eq!(layout.size(), size);
            assert_eq!(list.hashes().len() as u64, layout.chunk_count() as u64);
            // Indices are the peer's to choose: past the end is an error, not a panic.
            assert!(list.chunk_verifier(layout.chunk_count()).is_err());
            assert!(list.verify_chunk(u32::MAX, b"").is_err());
            let first_len = layout.chunk_len(0).unwrap_or(0) as usize;
            let wrong = vec![0u8; first_len.min(4096) + 1];
            if first_len != wrong.len() {
                assert!(list.verify_chunk(0, &wrong).is_err());
            }
            Verdict::Accepted
        }
        Err(e) => Verdict::refused(e),
    };
    text.or(list)
}

/// Every text parser of a deployment, on every line: targets, schedules, limits, durations and
/// `SSM_` arguments, each of which must print back to something that parses to itself; and the
/// whole input as a bincode [`DeploymentSpec`], which the seed checks after decoding.
pub fn deploy_spec(data: &[u8]) -> Verdict {
    let text = String::from_utf8_lossy(data);
    let mut verdict = Verdict::refused("no line parsed as any deployment field");
    for line in text.lines() {
        if let Ok(target) = DeployTarget::parse(line) {
            assert_eq!(DeployTarget::parse(&target.to_string()).ok(), Some(target));
            verdict = Verdict::Accepted;
        }
        if let Ok(schedule) = Schedule::parse(line) {
            assert_eq!(Schedule::parse(&schedule.to_string()).ok(), Some(schedule));
            verdict = Verdict::Accepted;
        }
        if let Ok(limit) = Limit::parse(line) {
            assert_eq!(Limit::parse(&limit.to_string()).ok(), Some(limit));
            let _ = (
                limit.concurrency(usize::MAX / 200),
                limit.errors(usize::MAX / 200),
            );
            verdict = Verdict::Accepted;
        }
        if parse_duration_secs(line).is_ok() {
            verdict = Verdict::Accepted;
        }
        if let Ok((key, value)) = parse_argument(line) {
            assert!(key.starts_with("SSM_") && !value.contains('\0'));
            verdict = Verdict::Accepted;
        }
    }
    let spec = match decode_payload::<DeploymentSpec>(data) {
        Ok(spec) => {
            round_trips(&spec);
            Verdict::from_result(spec.check())
        }
        Err(e) => Verdict::refused(e),
    };
    verdict.or(spec)
}

/// Names, sizes, rates and os-release contents: the small text fields that arrive in requests,
/// flags and files.
pub fn names_and_units(data: &[u8]) -> Verdict {
    let text = String::from_utf8_lossy(data);
    let mut verdict = Verdict::refused("no line is a valid name, size, rate or os-release");
    for line in text.lines() {
        for result in [
            validate_package_name(line).map_err(|e| e.to_string()),
            validate_version_name(line).map_err(|e| e.to_string()),
        ] {
            verdict = verdict.or(Verdict::from_result(result));
        }
        // Checked for panics, not counted as acceptance: almost any line of text without a
        // slash or control character is a valid file name, so it would make all garbage count.
        if let Err(error) = validate_file_name(line) {
            assert!(!error.to_string().trim().is_empty());
        }
        let quoted = quote_for_message(line);
        // Quoted for a terminal: bounded whatever the input, and no raw control character.
        assert!(quoted.chars().count() <= MAX_SHOWN_VALUE_CHARS * 12 + 3);
        assert!(!quoted.chars().any(|c| c.is_control()));
        if let Ok(bytes) = parse_size(line) {
            let _ = pkgmesh_protocol::units::HumanBytes(bytes).to_string();
            verdict = Verdict::Accepted;
        }
        verdict = verdict.or(Verdict::from_result(parse_rate(line)));
    }
    if let Ok(found) = parse_os_release(&text) {
        let platform = Platform {
            name: found.name,
            version: found.version,
            arch: "x86_64".into(),
        };
        let _ = platform.to_string();
        verdict = Verdict::Accepted;
    }
    verdict
}

/// A manifest, and when it parses, its own JSON form and platform selection.
pub fn manifest_parser(data: &[u8]) -> Verdict {
    let manifest = match parse_manifest(data) {
        Ok(manifest) => manifest,
        Err(errors) => {
            assert!(!errors.is_empty(), "a refused manifest has an error");
            assert!(errors.len() <= MAX_REPORTED_ERRORS + 1);
            for error in &errors {
                assert!(!error.to_string().trim().is_empty());
            }
            return Verdict::refused(errors);
        }
    };
    let again = parse_manifest(manifest.to_json_pretty().as_bytes()).expect("own JSON parses");
    assert_eq!(again, manifest);
    let mut platforms: Vec<Platform> = [
        ("amazon", "2023", "x86_64"),
        ("ubuntu", "22.04", "arm64"),
        ("redhat", "9.4", "x86_64"),
        ("windows", "10.0.14393nano", "x86_64"),
    ]
    .iter()
    .map(|(name, version, arch)| Platform {
        name: (*name).into(),
        version: (*version).into(),
        arch: (*arch).into(),
    })
    .collect();
    // And every platform the manifest names itself, keys taken literally.
    for (name, version, arch, _) in manifest.platforms().into_iter().take(16) {
        platforms.push(Platform {
            name,
            version,
            arch,
        });
    }
    for platform in &platforms {
        if let Ok(selection) = select(&manifest, platform) {
            assert!(manifest.files.contains_key(&selection.file));
            assert!(manifest.sha256_of(&selection.file).is_some());
        }
    }
    Verdict::Accepted
}

/// A ZIP as the publisher checks it and the installer extracts it, under the default limits.
/// Checking and extraction must agree, extraction must write only regular files and directories
/// and only inside its staging directory, and a failed extraction leaves staging empty.
///
/// Each input gets its own temporary directory, removed when the call returns, so concurrent
/// callers (the replay test's threads) never share files and no run leaves one behind. (A
/// process-wide directory kept in a static was never removed: statics are not dropped, and
/// libFuzzer ends with `exit`, so every run left an empty `/tmp/pkgmesh-fuzz-zip*`.)
pub fn zip_checker(data: &[u8]) -> Verdict {
    let scratch = tempfile::Builder::new()
        .prefix("pkgmesh-fuzz-zip")
        .tempdir()
        .expect("a temporary directory for one ZIP");
    let work = scratch.path();
    let zip = work.join("package.zip");
    fs::write(&zip, data).expect("the ZIP written to scratch");
    let staging = work.join("staging");
    let limits = ZipLimits::default();

    let checked = check_zip_layout(&zip, &limits);
    let extracted = extract_zip(&zip, &staging, &limits);
    let verdict = match (&checked, &extracted) {
        (Err(e), Ok(_)) => panic!("the checker refused a ZIP the extractor took: {e}"),
        (Ok(report), Ok(again)) => {
            assert_eq!(report, again, "checker and extractor report differently");
            assert!(report.entries <= limits.max_entries);
            let written = walk(&staging);
            assert!(written.len() as u64 <= report.entries + 1);
            Verdict::Accepted
        }
        (_, Err(e)) => {
            assert!(
                walk(&staging).is_empty(),
                "a failed extraction left files in staging: {e}"
            );
            Verdict::refused(e)
        }
    };
    let mut names: Vec<_> = fs::read_dir(work)
        .expect("the work directory lists")
        .map(|e| e.expect("a work directory entry").file_name())
        .collect();
    names.sort();
    let mut expected = vec![std::ffi::OsString::from("package.zip")];
    if staging.exists() {
        expected.push("staging".into());
    }
    assert_eq!(
        names, expected,
        "extraction wrote outside its staging directory"
    );
    scratch.close().expect("the work directory is removed");
    verdict
}

/// Every path under `dir`, asserting each is a regular file or a directory.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(next) = stack.pop() {
        let Ok(entries) = fs::read_dir(&next) else {
            continue;
        };
        for entry in entries {
            let entry = entry.expect("a staging entry");
            let kind = entry.file_type().expect("a staging entry's type");
            assert!(
                kind.is_file() || kind.is_dir(),
                "extraction made {:?}, neither file nor directory",
                entry.path()
            );
            if kind.is_dir() {
                stack.push(entry.path());
            }
            found.push(entry.path());
        }
    }
    found
}

/// A seed and a node config file, and the size and rate settings in them.
pub fn config_parser(data: &[u8]) -> Verdict {
    let Ok(text) = std::str::from_utf8(data) else {
        // `config::load` reads into a String, which refuses invalid UTF-8 the same way.
        return Verdict::refused("config file is not UTF-8");
    };
    let seed = match config::parse::<SeedFile>(text) {
        Ok(seed) => {
            for (what, value) in [
                ("cache_budget", &seed.cache_budget),
                ("max_upload", &seed.max_upload),
            ] {
                let _ = config::size_setting(what, None, value.as_deref(), 0);
            }
            let _ = config::rate_setting("upload_limit", None, seed.upload_limit.as_deref());
            Verdict::Accepted
        }
        Err(e) => Verdict::refused(e),
    };
    let node = match config::parse::<NodeFile>(text) {
        Ok(node) => {
            let _ = config::size_setting("cache_budget", None, node.cache_budget.as_deref(), 0);
            let _ = config::rate_setting("upload_limit", None, node.upload_limit.as_deref());
            let _ = config::rate_setting("download_limit", None, node.download_limit.as_deref());
            Verdict::Accepted
        }
        Err(e) => Verdict::refused(e),
    };
    seed.or(node)
}
