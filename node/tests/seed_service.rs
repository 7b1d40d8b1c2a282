//! The seed's services over real QUIC, in-process: it does not trust the publisher's client,
//! and it serves chunks with origin admission, from its cache or (once) from the origin.

use std::path::Path;
use std::process::Command;

use pkgmesh_node::client::SeedClient;
use pkgmesh_node::pki::{self, Identity, Role};
use pkgmesh_node::seed::{self, SeedSettings};
use pkgmesh_node::transport;
use pkgmesh_protocol::blob::hash_reader;
use pkgmesh_protocol::wire::{PublishFile, PublishRequest, Request, Response};
use sha2::{Digest, Sha256};

fn zip_with_scripts(dir: &Path, name: &str, payload: impl AsRef<[u8]>) -> Vec<u8> {
    let src = dir.join(format!("src-{name}"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("install.sh"), "echo install\n").unwrap();
    std::fs::write(src.join("uninstall.sh"), "echo uninstall\n").unwrap();
    std::fs::write(src.join("payload.txt"), payload).unwrap();
    let zip = dir.join(name);
    let status = Command::new("zip")
        .args(["-q", "-X", "-r"])
        .arg(&zip)
        .arg(".")
        .current_dir(&src)
        .status()
        .expect("the zip command");
    assert!(status.success());
    std::fs::read(zip).unwrap()
}

fn manifest(file: &str, sha256: &[u8; 32]) -> String {
    serde_json::json!({
        "schemaVersion": "2.0",
        "version": "1.0.0",
        "packages": { "_any": { "_any": { "_any": { "file": file } } } },
        "files": { file: { "checksums": { "sha256": hex::encode(sha256) } } }
    })
    .to_string()
}

/// Sends a publish request claiming `claimed`, then uploads `sent` instead.
async fn lying_publish(
    client: &SeedClient,
    claimed: &[u8],
    claimed_blob_of: &[u8],
    sent: &[u8],
) -> String {
    let sha256: [u8; 32] = Sha256::digest(claimed).into();
    let blob = hash_reader(claimed_blob_of, claimed_blob_of.len() as u64)
        .unwrap()
        .id();
    let request = Request::Publish(PublishRequest {
        name: "liar-package".into(),
        manifest_json: manifest("a.zip", &sha256),
        files: vec![PublishFile {
            file: "a.zip".into(),
            size: claimed.len() as u64,
            sha256,
            blob,
        }],
    });
    let (response, mut send, mut recv) = transport::request(
        client.connection(),
        &request,
        std::time::Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert!(
        matches!(response, Response::PublishReady { .. }),
        "{response:?}"
    );
    send.write_all(sent).await.unwrap();
    let _ = send.finish();
    match transport::read_frame::<Response>(&mut recv, std::time::Duration::from_secs(30))
        .await
        .unwrap()
    {
        Response::Error(reply) => reply.message,
        other => panic!("a lying upload was accepted: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_that_differ_from_the_claims_are_refused() {
    transport::install_crypto_provider();
    let work = tempfile::tempdir().unwrap();
    let ca = work.path().join("ca");
    pki::init_ca(&ca, "test fleet").unwrap();
    pki::issue(&ca, "seed", &[Role::Seed], 1, &work.path().join("seed-id")).unwrap();
    pki::issue(
        &ca,
        "eve",
        &[Role::Publisher, Role::Operator],
        1,
        &work.path().join("eve"),
    )
    .unwrap();
    let data = work.path().join("seed-data");
    let settings = SeedSettings::new(
        "127.0.0.1:0".parse().unwrap(),
        data.clone(),
        Identity::load(&work.path().join("seed-id")).unwrap(),
    );
    let running = seed::start(settings).await.unwrap();
    let client = SeedClient::connect(
        running.local_addr,
        &Identity::load(&work.path().join("eve")).unwrap(),
    )
    .await
    .unwrap();

    let honest = zip_with_scripts(work.path(), "honest.zip", "the real payload");
    let mut swapped = zip_with_scripts(work.path(), "swapped.zip", "a different payload!");
    swapped.resize(honest.len(), 0);

    // Other bytes than the SHA-256 in the manifest.
    let message = lying_publish(&client, &honest, &honest, &swapped).await;
    assert!(message.contains("SHA-256"), "{message}");
    // The right bytes, but a false blob id.
    let message = lying_publish(&client, &honest, &swapped, &honest).await;
    assert!(message.contains("blob"), "{message}");

    let Response::Packages(packages) = client.call(&Request::ListPackages).await.unwrap() else {
        panic!("no package list");
    };
    assert!(packages.is_empty(), "{packages:?}");
    let origin_files = walk(&data.join("origin"));
    assert!(origin_files.is_empty(), "{origin_files:?}");
    let spooled = std::fs::read_dir(data.join("tmp")).unwrap().count();
    assert_eq!(spooled, 0, "upload spools were left behind");
    client.close().await;
    running.shutdown().await;
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.path().is_dir() {
                out.extend(walk(&entry.path()));
            } else {
                out.push(entry.path().display().to_string());
            }
        }
    }
    out
}

struct Fleet {
    _work: tempfile::TempDir,
    dir: std::path::PathBuf,
    running: seed::RunningSeed,
}

async fn fleet(identities: &[(&str, &[Role])]) -> Fleet {
    transport::install_crypto_provider();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().to_path_buf();
    let ca = dir.join("ca");
    pki::init_ca(&ca, "test fleet").unwrap();
    pki::issue(&ca, "seed", &[Role::Seed], 1, &dir.join("seed")).unwrap();
    for (name, roles) in identities {
        pki::issue(&ca, name, roles, 1, &dir.join(name)).unwrap();
    }
    let settings = SeedSettings::new(
        "127.0.0.1:0".parse().unwrap(),
        dir.join("seed-data"),
        Identity::load(&dir.join("seed")).unwrap(),
    );
    let running = seed::start(settings).await.unwrap();
    Fleet {
        _work: work,
        dir,
        running,
    }
}

impl Fleet {
    async fn client(&self, name: &str) -> SeedClient {
        SeedClient::connect(
            self.running.local_addr,
            &Identity::load(&self.dir.join(name)).unwrap(),
        )
        .await
        .unwrap()
    }
}

async fn get_chunk(
    client: &SeedClient,
    blob: pkgmesh_protocol::blob::BlobId,
    index: u32,
    after_peer_failure: bool,
) -> Result<Vec<u8>, Vec<String>> {
    let request = Request::GetChunk {
        blob,
        index,
        after_peer_failure,
    };
    let (response, _send, mut recv) = transport::request(
        client.connection(),
        &request,
        std::time::Duration::from_secs(10),
    )
    .await
    .unwrap();
    match response {
        Response::Chunk { len, .. } => {
            let mut bytes = vec![0u8; len as usize];
            recv.read_exact(&mut bytes).await.unwrap();
            Ok(bytes)
        }
        Response::TryPeers { peers, .. } => Err(peers.into_iter().map(|p| p.node).collect()),
        other => panic!("unexpected answer to GetChunk: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_are_served_once_then_redirected_and_read_from_the_origin_once() {
    use std::sync::atomic::Ordering;
    let fleet = fleet(&[
        ("publisher", &[Role::Publisher]),
        ("node-a", &[Role::Node]),
        ("node-b", &[Role::Node]),
    ])
    .await;
    // An incompressible payload, so the ZIP spans several chunks.
    let mut state = 88172645463325252u64;
    let payload: Vec<u8> = (0..700_000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let zip = zip_with_scripts(&fleet.dir, "pkg.zip", &payload);
    let package = fleet.dir.join("package");
    std::fs::create_dir_all(&package).unwrap();
    std::fs::write(package.join("a.zip"), &zip).unwrap();
    let sha: [u8; 32] = Sha256::digest(&zip).into();
    std::fs::write(package.join("manifest.json"), manifest("a.zip", &sha)).unwrap();
    let publisher = fleet.client("publisher").await;
    publisher
        .publish(
            "served-package",
            &package.join("manifest.json"),
            &package,
            &|_, _| {},
        )
        .await
        .unwrap();

    let node_a = fleet.client("node-a").await;
    let node_b = fleet.client("node-b").await;
    let Response::Manifest(reply) = node_a
        .call(&Request::GetManifest {
            name: "served-package".into(),
            version: None,
        })
        .await
        .unwrap()
    else {
        panic!("no manifest");
    };
    let file = &reply.files[0];
    let Response::ChunkHashes { packed, .. } = node_a
        .call(&Request::GetChunkHashes {
            blob: file.blob,
            size: file.size,
        })
        .await
        .unwrap()
    else {
        panic!("no chunk hashes");
    };
    let hashes =
        pkgmesh_protocol::blob::ChunkHashes::verify_packed(file.blob, file.size, &packed).unwrap();
    assert!(hashes.layout().chunk_count() >= 3);

    // Node A tells the tracker where it listens (holding nothing yet).
    let announced = node_a
        .call(&Request::Announce(pkgmesh_protocol::wire::Announcement {
            listen: "127.0.0.1:9".into(),
            site: "east".into(),
            tags: Vec::new(),
            full: true,
            holdings: Vec::new(),
        }))
        .await
        .unwrap();
    assert!(
        matches!(announced, Response::Announced { .. }),
        "{announced:?}"
    );
    // The first asker gets the bytes; the next is sent to it; after a peer failure, served.
    let chunk0 = get_chunk(&node_a, file.blob, 0, false).await.unwrap();
    hashes.verify_chunk(0, &chunk0).unwrap();
    assert_eq!(
        get_chunk(&node_b, file.blob, 0, false).await.unwrap_err(),
        vec!["node-a".to_string()]
    );
    let again = get_chunk(&node_b, file.blob, 0, true).await.unwrap();
    assert_eq!(again, chunk0);

    // With the seed's cache emptied, a chunk comes from the origin, verified, exactly once.
    let state = &fleet.running.state;
    state.cache.evict_blob(&file.blob).unwrap();
    let reads_before = state.counters.origin_reads.load(Ordering::Relaxed);
    let chunk1 = get_chunk(&node_a, file.blob, 1, false).await.unwrap();
    hashes.verify_chunk(1, &chunk1).unwrap();
    let chunk1_again = get_chunk(&node_b, file.blob, 1, true).await.unwrap();
    assert_eq!(chunk1, chunk1_again);
    assert_eq!(
        state.counters.origin_reads.load(Ordering::Relaxed) - reads_before,
        1
    );

    // A publisher may not fetch chunks.
    let refused = transport::request(
        publisher.connection(),
        &Request::GetChunk {
            blob: file.blob,
            index: 0,
            after_peer_failure: true,
        },
        std::time::Duration::from_secs(10),
    )
    .await
    .unwrap()
    .0;
    assert!(
        matches!(refused, Response::Error(ref e) if e.message.contains("node")),
        "{refused:?}"
    );

    for client in [publisher, node_a, node_b] {
        client.close().await;
    }
    fleet.running.shutdown().await;
}
