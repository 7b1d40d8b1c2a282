//! The seed corpus: real, valid inputs for every target (encoded real messages, real manifests,
//! ZIPs made by the `zip` command, the example config files), from which the fuzzer and the
//! replay test's mutations start. Written to `fuzz/corpus/<target>/seed-*` by the ignored test
//! `write_seed_corpus` in `tests/tests/fuzz_corpus.rs`; the files are committed so a run needs
//! neither the `zip` command nor this code's output to stay the same (ZIPs carry timestamps).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use pkgmesh_protocol::bitfield::Bitfield;
use pkgmesh_protocol::blob::{hash_reader, BlobId};
use pkgmesh_protocol::deploy::{
    Assignment, DeploymentInfo, DeploymentSpec, DeploymentState, DesiredState, InstallReport,
    InstallType, Limit, NodeDeployState, NodeDeployStatus, Schedule, Target, VersionSpec,
};
use pkgmesh_protocol::wire::{
    encode, Announcement, AuditRecord, BlobName, ErrorCode, ErrorReply, FileBlob, Hello,
    HolderInfo, Holding, ManifestReply, NodeSummary, PackageSummary, PeerInfo, PreheatReply,
    PublishFile, PublishOutcome, PublishRequest, Request, Response, WhereQuery, FRAME_PREFIX_BYTES,
};

/// One corpus file: the target's directory, a file name (without the `seed-` prefix) and bytes.
pub struct Seed {
    pub target: &'static str,
    pub name: String,
    pub bytes: Vec<u8>,
}

fn seed(target: &'static str, name: impl Into<String>, bytes: impl Into<Vec<u8>>) -> Seed {
    Seed {
        target,
        name: name.into(),
        bytes: bytes.into(),
    }
}

/// Every seed. `repo` is the repository root (for `examples/`); ZIPs are built in `scratch`
/// with the `zip` command.
pub fn all(repo: &Path, scratch: &Path) -> Vec<Seed> {
    let mut seeds = Vec::new();
    wire_seeds(&mut seeds);
    bitfield_seeds(&mut seeds);
    chunk_hash_seeds(&mut seeds);
    deploy_seeds(&mut seeds);
    names_seeds(&mut seeds);
    manifest_seeds(repo, &mut seeds);
    zip_seeds(repo, scratch, &mut seeds);
    config_seeds(repo, &mut seeds);
    seeds
}

fn blob(byte: u8) -> BlobId {
    BlobId([byte; 32])
}

fn bitfield(len: u32, every: u32) -> Bitfield {
    let mut field = Bitfield::new(len).expect("a small bitfield");
    for i in (0..len).step_by(every.max(1) as usize) {
        field.set(i, true);
    }
    field
}

fn spec() -> DeploymentSpec {
    DeploymentSpec {
        package: "ExampleAgent".into(),
        version: VersionSpec::Exact("1.2.0".into()),
        targets: vec![
            Target::Tag {
                key: "role".into(),
                value: "web".into(),
            },
            Target::Site("eu-west-1a".into()),
            Target::Node("node-7".into()),
        ],
        schedule: Schedule::Every { secs: 3600 },
        max_concurrency: Limit::Percent(25),
        max_errors: Limit::Count(2),
        args: vec![("SSM_MODE".into(), "fast".into())],
        install_type: InstallType::InPlace,
        timeout_secs: 600,
    }
}

fn node_status() -> NodeDeployStatus {
    NodeDeployStatus {
        node: "node-7".into(),
        state: NodeDeployState::Failed,
        version: "1.2.0".into(),
        exit_code: Some(3),
        reboot_required: false,
        message: "failed and rolled back to 1.1.0".into(),
        log_tail: "install.sh: disk full\n".into(),
        updated_at: 1_764_000_000,
    }
}

fn deployment() -> DeploymentInfo {
    DeploymentInfo {
        id: 42,
        spec: spec(),
        state: DeploymentState::Active,
        reason: None,
        created_by: "deployer-1".into(),
        created_at: 1_764_000_000,
        run: 2,
        version: Some("1.2.0".into()),
        targeted: vec!["node-7".into(), "node-8".into()],
        nodes: BTreeMap::from([("node-7".into(), node_status())]),
    }
}

fn requests() -> Vec<(&'static str, Request)> {
    vec![
        ("hello", Request::Hello(Hello::ours())),
        ("ping", Request::Ping { nonce: 7 }),
        (
            "get-chunk-hashes",
            Request::GetChunkHashes {
                blob: blob(1),
                size: 5 << 20,
            },
        ),
        (
            "get-chunk",
            Request::GetChunk {
                blob: blob(2),
                index: 3,
                after_peer_failure: true,
            },
        ),
        (
            "get-manifest",
            Request::GetManifest {
                name: "ExampleAgent".into(),
                version: Some("1.2.0".into()),
            },
        ),
        (
            "publish",
            Request::Publish(PublishRequest {
                name: "ExampleAgent".into(),
                manifest_json: EXAMPLE_MANIFEST.into(),
                files: vec![PublishFile {
                    file: "agent-linux.zip".into(),
                    size: 123_456,
                    sha256: [9; 32],
                    blob: blob(3),
                }],
            }),
        ),
        ("list-packages", Request::ListPackages),
        (
            "set-default",
            Request::SetDefault {
                name: "ExampleAgent".into(),
                version: "1.2.0".into(),
            },
        ),
        (
            "delete-package",
            Request::DeletePackage {
                name: "ExampleAgent".into(),
                version: None,
                force: true,
            },
        ),
        (
            "announce",
            Request::Announce(Announcement {
                listen: "10.0.0.7:7401".into(),
                site: "eu-west-1a".into(),
                tags: vec![("role".into(), "web".into())],
                full: true,
                holdings: vec![Holding {
                    blob: blob(4),
                    size: 3 << 20,
                    chunks: bitfield(12, 3),
                }],
            }),
        ),
        (
            "get-peers",
            Request::GetPeers {
                blob: blob(5),
                size: 1 << 30,
                max: 30,
            },
        ),
        ("where-blob", Request::Where(WhereQuery::Blob(blob(6)))),
        (
            "where-package",
            Request::Where(WhereQuery::Package {
                name: "ExampleAgent".into(),
                version: None,
            }),
        ),
        (
            "audit",
            Request::Audit {
                since: Some(1_764_000_000),
                limit: 100,
            },
        ),
        ("get-bitfield", Request::GetBitfield { blob: blob(7) }),
        (
            "report-ban",
            Request::ReportBan {
                blob: blob(8),
                peer: "node-9".into(),
                reason: "bad hash on chunk 4".into(),
            },
        ),
        ("create-deployment", Request::CreateDeployment(spec())),
        ("list-deployments", Request::ListDeployments),
        ("get-deployment", Request::GetDeployment { id: 42 }),
        ("cancel-deployment", Request::CancelDeployment { id: 42 }),
        (
            "get-desired-state",
            Request::GetDesiredState {
                generation: 3,
                wait_secs: 20,
            },
        ),
        (
            "report-install",
            Request::ReportInstall(InstallReport {
                deployment: 42,
                run: 2,
                version: "1.2.0".into(),
                state: NodeDeployState::Succeeded,
                exit_code: Some(194),
                reboot_required: true,
                message: "installed".into(),
                log_tail: "ok\n".into(),
            }),
        ),
        ("list-nodes", Request::ListNodes),
        (
            "preheat",
            Request::Preheat {
                name: "ExampleAgent".into(),
                version: None,
            },
        ),
        (
            "describe-blobs",
            Request::DescribeBlobs {
                blobs: vec![blob(1), blob(2)],
            },
        ),
    ]
}

fn responses() -> Vec<(&'static str, Response)> {
    let peer = PeerInfo {
        node: "node-8".into(),
        listen: "10.0.0.8:7401".into(),
        site: "eu-west-1a".into(),
        chunks: Some(bitfield(20, 2)),
    };
    vec![
        ("hello", Response::Hello(Hello::ours())),
        ("pong", Response::Pong { nonce: 7 }),
        (
            "error",
            Response::Error(ErrorReply {
                code: ErrorCode::Forbidden,
                message: "needs role publisher".into(),
            }),
        ),
        (
            "chunk-hashes",
            Response::ChunkHashes {
                blob: blob(1),
                packed: [[1u8; 32], [2u8; 32]].concat(),
            },
        ),
        (
            "chunk",
            Response::Chunk {
                blob: blob(2),
                index: 3,
                len: 262_144,
            },
        ),
        (
            "try-peers",
            Response::TryPeers {
                blob: blob(2),
                index: 3,
                peers: vec![peer.clone()],
            },
        ),
        (
            "manifest",
            Response::Manifest(ManifestReply {
                name: "ExampleAgent".into(),
                version: "1.2.0".into(),
                is_default: true,
                manifest_json: EXAMPLE_MANIFEST.into(),
                files: vec![FileBlob {
                    file: "agent-linux.zip".into(),
                    blob: blob(3),
                    size: 123_456,
                    sha256: [9; 32],
                }],
                published_at: 1_764_000_000,
                published_by: "publisher-1".into(),
            }),
        ),
        (
            "publish-ready",
            Response::PublishReady {
                upload: vec!["agent-linux.zip".into()],
            },
        ),
        (
            "published",
            Response::Published(PublishOutcome {
                name: "ExampleAgent".into(),
                version: "1.2.0".into(),
                unchanged: false,
                files_uploaded: 1,
                bytes_uploaded: 123_456,
            }),
        ),
        (
            "packages",
            Response::Packages(vec![PackageSummary {
                name: "ExampleAgent".into(),
                default_version: Some("1.2.0".into()),
                versions: vec!["1.1.0".into(), "1.2.0".into()],
            }]),
        ),
        (
            "done",
            Response::Done {
                message: "default set".into(),
            },
        ),
        ("announced", Response::Announced { refresh_secs: 20 }),
        ("peers", Response::Peers(vec![peer.clone()])),
        (
            "holders",
            Response::Holders(vec![HolderInfo {
                node: "node-8".into(),
                listen: "10.0.0.8:7401".into(),
                site: "eu-west-1a".into(),
                blob: blob(2),
                chunks_held: 10,
                chunks_total: 20,
                last_seen_secs_ago: 4,
            }]),
        ),
        (
            "audit-records",
            Response::AuditRecords(vec![AuditRecord {
                time: 1_764_000_000,
                caller: "admin-1".into(),
                roles: vec!["admin".into()],
                action: "publish".into(),
                target: "ExampleAgent@1.2.0".into(),
                outcome: "ok".into(),
            }]),
        ),
        (
            "bitfield",
            Response::Bitfield {
                blob: blob(2),
                chunks: Some(bitfield(2048, 5)),
            },
        ),
        ("deployment", Response::Deployment(Box::new(deployment()))),
        ("deployments", Response::Deployments(vec![deployment()])),
        (
            "desired-state",
            Response::DesiredState(DesiredState {
                generation: 4,
                assignments: vec![Assignment {
                    deployment: 42,
                    run: 2,
                    package: "ExampleAgent".into(),
                    version: "1.2.0".into(),
                    args: vec![("SSM_MODE".into(), "fast".into())],
                    install_type: InstallType::UninstallAndReinstall,
                    timeout_secs: 3600,
                }],
            }),
        ),
        (
            "nodes",
            Response::Nodes(vec![NodeSummary {
                node: "node-8".into(),
                listen: "10.0.0.8:7401".into(),
                site: "eu-west-1a".into(),
                tags: vec![("role".into(), "web".into())],
                last_seen_secs_ago: 3,
                blobs: 2,
                complete_blobs: 1,
                chunks_held: 30,
                bytes_held: 30 << 18,
            }]),
        ),
        (
            "preheating",
            Response::Preheating(PreheatReply {
                node: "node-8".into(),
                name: "ExampleAgent".into(),
                version: "1.2.0".into(),
                file: "agent-linux.zip".into(),
                blob: blob(3),
                size: 123_456,
                chunks: 1,
                chunks_held: 0,
            }),
        ),
        (
            "blob-names",
            Response::BlobNames(vec![BlobName {
                blob: blob(3),
                name: "ExampleAgent".into(),
                version: "1.2.0".into(),
                file: "agent-linux.zip".into(),
            }]),
        ),
    ]
}

const EXAMPLE_MANIFEST: &str = r#"{
  "schemaVersion": "2.0",
  "version": "1.2.0",
  "publisher": "Example Corp",
  "packages": {
    "amazon": { "_any": { "x86_64": { "file": "agent-linux.zip" } } },
    "ubuntu": { "22.*": { "_any": { "file": "agent-linux.zip" } } },
    "windows": { "_any": { "x86_64": { "file": "agent-windows.zip" } } }
  },
  "files": {
    "agent-linux.zip": { "checksums": { "sha256": "0bd8a1a8a0e1f9b5b1e0d8c2e7e0b0a4f6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1" } },
    "agent-windows.zip": { "checksums": { "sha256": "1bd8a1a8a0e1f9b5b1e0d8c2e7e0b0a4f6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1" } }
  }
}"#;

fn wire_seeds(seeds: &mut Vec<Seed>) {
    let mut stream = Vec::new();
    for (name, request) in requests() {
        let frame = encode(&request).expect("a seed request encodes");
        if stream.len() < 4096 {
            stream.extend_from_slice(&frame);
        }
        seeds.push(seed(
            "request_decoder",
            name,
            frame[FRAME_PREFIX_BYTES..].to_vec(),
        ));
        seeds.push(seed("frame_decoder", format!("request-{name}"), frame));
    }
    for (name, response) in responses() {
        let frame = encode(&response).expect("a seed response encodes");
        seeds.push(seed(
            "response_decoder",
            name,
            frame[FRAME_PREFIX_BYTES..].to_vec(),
        ));
        seeds.push(seed("frame_decoder", format!("response-{name}"), frame));
    }
    seeds.push(seed("frame_decoder", "request-stream", stream));
    // A prefix over the limit: the decoder must refuse it before reading further.
    seeds.push(seed("frame_decoder", "over-limit", vec![0, 0x10, 0, 1, 0]));
}

fn bitfield_seeds(seeds: &mut Vec<Seed>) {
    for (len, every) in [(0, 1), (1, 1), (10, 3), (64, 1), (2048, 7), (16_384, 1000)] {
        let field = bitfield(len, every);
        let frame = encode(&field).expect("a bitfield encodes");
        seeds.push(seed(
            "bitfield_decoder",
            format!("wire-{len}"),
            frame[FRAME_PREFIX_BYTES..].to_vec(),
        ));
        let mut packed = len.to_le_bytes().to_vec();
        packed.extend_from_slice(field.as_bytes());
        seeds.push(seed("bitfield_decoder", format!("packed-{len}"), packed));
    }
}

fn chunk_hash_seeds(seeds: &mut Vec<Seed>) {
    // Sizes around the chunk boundaries: empty, one partial chunk, one whole, several.
    for size in [
        0usize,
        1000,
        256 * 1024,
        256 * 1024 + 1,
        3 * 256 * 1024 + 17,
    ] {
        let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
        let list = hash_reader(&data[..], size as u64).expect("a seed blob hashes");
        let mut bytes = list.id().0.to_vec();
        bytes.extend_from_slice(&(size as u64).to_le_bytes());
        bytes.extend_from_slice(&list.to_packed());
        seeds.push(seed("chunk_hashes", format!("list-{size}"), bytes));
        if size == 1000 {
            seeds.push(seed("chunk_hashes", "id-text", list.id().to_hex()));
        }
    }
}

fn deploy_seeds(seeds: &mut Vec<Seed>) {
    seeds.push(seed(
        "deploy_spec",
        "fields",
        "tag:role=web\nsite:eu-west-1a\nnode:node-7\nonce\nevery:6h\non-default-change\n\
         25%\n3\n90m\nSSM_MODE=fast\nSSM_URL=https://example.com/a?b=c\n",
    ));
    let frame = encode(&spec()).expect("a spec encodes");
    seeds.push(seed(
        "deploy_spec",
        "spec",
        frame[FRAME_PREFIX_BYTES..].to_vec(),
    ));
    let mut default_version = spec();
    default_version.version = VersionSpec::Default;
    default_version.schedule = Schedule::OnDefaultChange;
    let frame = encode(&default_version).expect("a spec encodes");
    seeds.push(seed(
        "deploy_spec",
        "spec-default",
        frame[FRAME_PREFIX_BYTES..].to_vec(),
    ));
}

fn names_seeds(seeds: &mut Vec<Seed>) {
    seeds.push(seed(
        "names_and_units",
        "names",
        "ExampleAgent\n1.2.0\nagent-linux.zip\nAWSPVDriver\n2.0.0-beta_1\n",
    ));
    seeds.push(seed(
        "names_and_units",
        "units",
        "64MiB\n4MiB\n1.5GiB\n200Mbit\n1Gbit/s\n0\n512KB\n10 MB\n",
    ));
    for (name, text) in [
        (
            "os-release-ubuntu",
            "NAME=\"Ubuntu\"\nVERSION_ID=\"22.04\"\nID=ubuntu\nID_LIKE=debian\n",
        ),
        (
            "os-release-amazon",
            "NAME=\"Amazon Linux\"\nVERSION=\"2023\"\nID=\"amzn\"\nVERSION_ID=\"2023\"\n",
        ),
        (
            "os-release-leap",
            "NAME=\"openSUSE Leap\"\nVERSION=\"15.5\"\nID=\"opensuse-leap\"\nVERSION_ID='15.5'\n",
        ),
        ("os-release-arch", "NAME=\"Arch Linux\"\nID=arch\n"),
    ] {
        seeds.push(seed("names_and_units", name, text));
    }
    if let Ok(text) = std::fs::read("/etc/os-release") {
        seeds.push(seed("names_and_units", "os-release-this-machine", text));
    }
}

fn manifest_seeds(repo: &Path, seeds: &mut Vec<Seed>) {
    seeds.push(seed(
        "manifest_parser",
        "example-corp.json",
        EXAMPLE_MANIFEST,
    ));
    let example = std::fs::read(repo.join("examples/manifest.example.json"))
        .expect("examples/manifest.example.json is readable");
    seeds.push(seed("manifest_parser", "examples-manifest.json", example));
    seeds.push(seed(
        "manifest_parser",
        "wildcards.json",
        r#"{"schemaVersion":"2.0","version":"7","packages":{
            "_any":{"_any":{"_any":{"file":"any.zip"}}},
            "redhat":{"9.*":{"x86_64":{"file":"rh9.zip"}},"*":{"_any":{"file":"rh.zip"}}},
            "windows":{"10.0.*nano":{"x86_64":{"file":"nano.zip"}}}},
          "files":{"any.zip":{"checksums":{"sha256":"AA00000000000000000000000000000000000000000000000000000000000000"}},
            "rh9.zip":{"checksums":{"sha256":"bb00000000000000000000000000000000000000000000000000000000000000"}},
            "rh.zip":{"checksums":{"sha256":"cc00000000000000000000000000000000000000000000000000000000000000"}},
            "nano.zip":{"checksums":{"sha256":"dd00000000000000000000000000000000000000000000000000000000000000"}}}}"#,
    ));
}

/// Runs `zip` in `dir` with `args`; the seeds come from the real archiver, as the issue asks.
fn zip_command(dir: &Path, args: &[&str]) {
    let status = Command::new("zip")
        .args(args)
        .current_dir(dir)
        .status()
        .expect("the zip command runs (apt-get install zip)");
    assert!(status.success(), "zip {args:?} failed in {}", dir.display());
}

fn zip_seeds(repo: &Path, scratch: &Path, seeds: &mut Vec<Seed>) {
    let package = scratch.join("package");
    std::fs::create_dir_all(package.join("bin")).expect("a scratch package directory");
    for script in ["install.sh", "uninstall.sh", "update.sh", "validate.sh"] {
        let text = std::fs::read(repo.join("examples/sample-package/linux").join(script))
            .expect("a sample script is readable");
        std::fs::write(package.join(script), text).expect("a script copied");
    }
    std::fs::write(package.join("VERSION"), "1.2.0\n").expect("VERSION written");
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 256) as u8).collect();
    std::fs::write(package.join("bin/agent"), payload).expect("payload written");
    for (name, args) in [
        (
            "deflate.zip",
            &["-q", "-X", "-r", "../deflate.zip", "."][..],
        ),
        (
            "stored.zip",
            &["-q", "-X", "-0", "-r", "../stored.zip", "."][..],
        ),
        (
            "no-dirs.zip",
            &["-q", "-D", "-r", "../no-dirs.zip", "."][..],
        ),
        (
            "scripts-only.zip",
            &["-q", "../scripts-only.zip", "install.sh", "uninstall.sh"][..],
        ),
    ] {
        zip_command(&package, args);
        let bytes = std::fs::read(scratch.join(name)).expect("the ZIP zip wrote");
        seeds.push(seed("zip_checker", name, bytes));
    }
    // One the checker refuses (a symlink stored with -y), so mutations start on that path too.
    std::os::unix::fs::symlink("/etc/passwd", package.join("passwd")).expect("a symlink");
    zip_command(&package, &["-q", "-y", "-r", "../symlink.zip", "."]);
    let bytes = std::fs::read(scratch.join("symlink.zip")).expect("the ZIP zip wrote");
    seeds.push(seed("zip_checker", "symlink.zip", bytes));
}

fn config_seeds(repo: &Path, seeds: &mut Vec<Seed>) {
    for file in ["seed.toml", "node.toml"] {
        let text = std::fs::read(repo.join("examples").join(file)).expect("an example config");
        seeds.push(seed("config_parser", format!("examples-{file}"), text));
    }
    seeds.push(seed(
        "config_parser",
        "seed-sites.toml",
        "listen = \"127.0.0.1:7400\"\norigin = \"s3://bucket/prefix\"\ncache_budget = \"8GiB\"\n\
         [origin_settings]\ns3_endpoint = \"http://127.0.0.1:9000\"\nallow_http = true\n\
         max_in_flight = 8\n[sites.store-042]\nwan_fetchers = 2\n[sites.\"edge b\"]\n",
    ));
    seeds.push(seed(
        "config_parser",
        "node-tags.toml",
        "seed = \"10.0.0.1:7400\"\nupload_limit = \"0\"\ndownload_limit = \"50MiB\"\n\
         platform = \"ubuntu\"\nplatform_version = \"22.04\"\narch = \"arm64\"\n\
         tags = { role = \"web\", env = \"prod\" }\n",
    ));
}
