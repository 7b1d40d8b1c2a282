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
fn demo_selects_verifies_and_refuses_a_tampered_chunk() {
    let output = run_pkgmesh(["demo", "--json"]);
    assert!(output.status.success(), "{output:?}");
    let report = stdout_json(&output);
    assert_eq!(report["chunks_verified"], report["chunks"]);
    assert_eq!(report["tampered_chunk_refused"], true);
    let rows = report["selections"].as_array().unwrap();
    let file_for = |platform: &str| {
        rows.iter()
            .find(|r| r["platform"] == platform)
            .map(|r| r["file"].clone())
            .unwrap()
    };
    assert_eq!(file_for("windows"), "sample-windows.zip");
    assert_eq!(file_for("debian"), serde_json::Value::Null);
}
