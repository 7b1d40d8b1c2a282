//! `pkgmesh blob hash` and the CLI's exit-code contract, through the real binary.

use std::io::Write;

use pkgmesh_protocol::blob::ChunkLayout;
use pkgmesh_tests::{run_pkgmesh, stdout_json};

#[test]
fn blob_hash_reports_the_blake3_id_and_layout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("payload.bin");
    let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&bytes)
        .unwrap();

    let output = run_pkgmesh([
        "blob".as_ref(),
        "hash".as_ref(),
        "--json".as_ref(),
        "--sha256".as_ref(),
        path.as_os_str(),
    ]);
    assert!(output.status.success(), "{output:?}");
    let report = stdout_json(&output);
    let layout = ChunkLayout::for_size(bytes.len() as u64).unwrap();
    assert_eq!(report["blob"], blake3::hash(&bytes).to_hex().as_str());
    assert_eq!(report["size"], bytes.len() as u64);
    assert_eq!(report["chunk_size"], layout.chunk_size());
    assert_eq!(report["chunks"], layout.chunk_count());
    assert_eq!(report["chunks"], 12);
    use sha2::Digest;
    assert_eq!(report["sha256"], hex::encode(sha2::Sha256::digest(&bytes)));

    // One flipped bit is another blob.
    let mut flipped = bytes.clone();
    flipped[1_234_567] ^= 0x10;
    std::fs::write(&path, &flipped).unwrap();
    let again = stdout_json(&run_pkgmesh([
        "blob".as_ref(),
        "hash".as_ref(),
        "--json".as_ref(),
        path.as_os_str(),
    ]));
    assert_eq!(again["blob"], blake3::hash(&flipped).to_hex().as_str());
    assert_ne!(again["blob"], report["blob"]);
}

#[test]
fn blob_hash_prints_text_for_people() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.zip");
    std::fs::write(&path, b"").unwrap();
    let output = run_pkgmesh(["blob".as_ref(), "hash".as_ref(), path.as_os_str()]);
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        text.contains(&blake3::hash(b"").to_hex().to_string()),
        "{text}"
    );
    assert!(text.contains("chunks      1"), "{text}");
}

#[test]
fn a_missing_file_fails_with_exit_1_and_names_it() {
    let output = run_pkgmesh(["blob", "hash", "/nonexistent/pkgmesh-test.zip"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/pkgmesh-test.zip"), "{stderr}");
    assert!(output.stdout.is_empty());
}

#[test]
fn bad_usage_exits_2() {
    assert_eq!(run_pkgmesh(["blob", "hash"]).status.code(), Some(2));
    assert_eq!(run_pkgmesh(["no-such-command"]).status.code(), Some(2));
    assert_eq!(
        run_pkgmesh(["blob", "hash", "--no-such-flag", "x"])
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn demo_runs_a_fleet_and_installs_everywhere_with_origin_offload() {
    let output = run_pkgmesh(["demo", "--json"]);
    assert!(output.status.success(), "{output:?}");
    let report = stdout_json(&output);
    assert_eq!(report["all_installed"], true, "{report:#}");
    let nodes = report["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 6);
    for node in nodes {
        assert_eq!(node["install"], "succeeded", "{node}");
        assert!(
            node["message"].as_str().unwrap().contains("installed"),
            "{node}"
        );
    }
    let sites: std::collections::BTreeSet<&str> =
        nodes.iter().map(|n| n["site"].as_str().unwrap()).collect();
    assert_eq!(sites.len(), 2);
    // Each node received the package once; the seed sent less than all of that.
    let package = report["package_bytes"].as_u64().unwrap();
    let received = report["nodes_received_bytes"].as_u64().unwrap();
    assert_eq!(received, 6 * package, "{report:#}");
    let ratio = report["origin_ratio"].as_f64().unwrap();
    assert!(ratio < 1.0, "no offload at all: {report:#}");
    let from_peers: u64 = nodes
        .iter()
        .map(|n| n["bytes_from_peers"].as_u64().unwrap())
        .sum();
    assert!(from_peers > 0, "{report:#}");
}

/// `pkgmesh blob hash [--json] PATH` with standard output going to `stdout`.
fn blob_hash_into(
    stdout: impl Into<std::process::Stdio>,
    json: bool,
    path: &std::path::Path,
) -> std::process::Output {
    let mut command = std::process::Command::new(pkgmesh_tests::pkgmesh());
    command.args(["blob", "hash"]);
    if json {
        command.arg("--json");
    }
    command
        .arg(path)
        .stdin(std::process::Stdio::null())
        .stdout(stdout)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap()
}

/// Standard output that cannot be written: a reader that went away (`pkgmesh ... | head`) ends
/// the command by SIGPIPE, as Unix tools end, and a full device is an error naming stdout.
/// Neither is a panic.
#[test]
fn an_unwritable_stdout_ends_the_command_without_a_panic() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("payload.bin");
    std::fs::write(&path, b"some bytes").unwrap();

    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = blob_hash_into(writer, false, &path);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(output.status.signal(), Some(libc::SIGPIPE), "{output:?}");

    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let output = blob_hash_into(full, true, &path);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot write to standard output"),
        "{stderr}"
    );
}
