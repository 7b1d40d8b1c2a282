//! The swarm over real QUIC on 127.0.0.1: a seed and several nodes in one process (each with
//! its own endpoint, identity and cache) fetching one package at the same moment.

use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use pkgmesh_node::client::SeedClient;
use pkgmesh_node::peer::{self, fetch::fetch_blob, NodeSettings, RunningNode};
use pkgmesh_node::pki::{self, Identity, Role};
use pkgmesh_node::seed::{self, RunningSeed, SeedSettings};
use pkgmesh_node::transport::{self, reply_error, RequestContext, RequestHandler};
use pkgmesh_protocol::bitfield::Bitfield;
use pkgmesh_protocol::blob::ChunkLayout;
use pkgmesh_protocol::wire::{Announcement, ErrorCode, FileBlob, Holding, Request, Response};
use sha2::{Digest, Sha256};

struct Swarm {
    _work: tempfile::TempDir,
    dir: PathBuf,
    seed: RunningSeed,
    file: FileBlob,
}

fn pseudo_random(len: usize, mut state: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A seed with one published package whose ZIP (made by the `zip` command) is about `size`.
async fn swarm(size: usize) -> Swarm {
    swarm_with(size, |_| {}).await
}

/// [`swarm`] with the seed's settings adjusted by `configure`.
async fn swarm_with(size: usize, configure: impl FnOnce(&mut SeedSettings)) -> Swarm {
    transport::install_crypto_provider();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().to_path_buf();
    let ca = dir.join("ca");
    pki::init_ca(&ca, "swarm fleet").unwrap();
    pki::issue(&ca, "seed", &[Role::Seed], 1, &dir.join("seed")).unwrap();
    pki::issue(
        &ca,
        "publisher",
        &[Role::Publisher],
        1,
        &dir.join("publisher"),
    )
    .unwrap();
    let mut settings = SeedSettings::new(
        "127.0.0.1:0".parse().unwrap(),
        dir.join("seed-data"),
        Identity::load(&dir.join("seed")).unwrap(),
    );
    configure(&mut settings);
    let seed = seed::start(settings).await.unwrap();

    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("install.sh"), "echo install\n").unwrap();
    std::fs::write(src.join("uninstall.sh"), "echo uninstall\n").unwrap();
    std::fs::write(
        src.join("payload.bin"),
        pseudo_random(size, 0x9e3779b97f4a7c15),
    )
    .unwrap();
    let package = dir.join("package");
    std::fs::create_dir_all(&package).unwrap();
    let status = std::process::Command::new("zip")
        .args(["-q", "-X", "-r"])
        .arg(package.join("swarm.zip"))
        .arg(".")
        .current_dir(&src)
        .status()
        .expect("the zip command");
    assert!(status.success());
    let zip = std::fs::read(package.join("swarm.zip")).unwrap();
    let manifest = serde_json::json!({
        "schemaVersion": "2.0",
        "version": "1.0.0",
        "packages": { "_any": { "_any": { "_any": { "file": "swarm.zip" } } } },
        "files": { "swarm.zip": { "checksums": { "sha256": hex::encode(Sha256::digest(&zip)) } } }
    });
    std::fs::write(package.join("manifest.json"), manifest.to_string()).unwrap();
    let publisher = SeedClient::connect(
        seed.local_addr,
        &Identity::load(&dir.join("publisher")).unwrap(),
    )
    .await
    .unwrap();
    publisher
        .publish(
            "swarm",
            &package.join("manifest.json"),
            &package,
            &|_, _| {},
        )
        .await
        .unwrap();
    let Response::Manifest(reply) = publisher
        .call(&Request::GetManifest {
            name: "swarm".into(),
            version: None,
        })
        .await
        .unwrap()
    else {
        panic!("no manifest");
    };
    publisher.close().await;
    Swarm {
        _work: work,
        dir,
        file: reply.files[0].clone(),
        seed,
    }
}

impl Swarm {
    fn identity(&self, name: &str) -> Identity {
        let out = self.dir.join(format!("id-{name}"));
        pki::issue(&self.dir.join("ca"), name, &[Role::Node], 1, &out).unwrap();
        Identity::load(&out).unwrap()
    }

    async fn node(&self, name: &str, site: &str) -> RunningNode {
        self.node_with_budget(name, site, 1 << 30).await
    }

    async fn node_with_budget(&self, name: &str, site: &str, budget: u64) -> RunningNode {
        self.node_with(name, site, |settings| settings.cache_budget = budget)
            .await
    }

    async fn node_with(
        &self,
        name: &str,
        site: &str,
        configure: impl FnOnce(&mut NodeSettings),
    ) -> RunningNode {
        let mut settings = NodeSettings::new(
            "127.0.0.1:0".parse().unwrap(),
            self.seed.local_addr,
            self.dir.join(format!("data-{name}")),
            self.identity(name),
        );
        settings.site = site.into();
        settings.cache_budget = 1 << 30;
        configure(&mut settings);
        peer::start(settings).await.unwrap()
    }

    /// Waits until the tracker knows every node named (their first announcement arrived).
    async fn until_tracked(&self, names: &[String]) {
        for _ in 0..500 {
            let known = {
                let tracker = self.seed.state.tracker.lock().unwrap();
                names.iter().all(|n| tracker.node(n).is_some())
            };
            if known {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("the tracker never heard of {names:?}");
    }

    fn payload_bytes_from_seed(&self) -> u64 {
        self.seed
            .state
            .counters
            .chunk_bytes_served
            .load(Ordering::Relaxed)
    }
}

/// The blob as a node's cache holds it, read whole (each chunk verified as it is read).
fn cached_sha256(node: &RunningNode, file: &FileBlob) -> [u8; 32] {
    let mut reader = node.state.cache.open_blob(&file.blob).unwrap();
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes).unwrap();
    assert_eq!(bytes.len() as u64, file.size);
    Sha256::digest(&bytes).into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_nodes_at_once_get_identical_bytes_and_the_seed_sends_about_one_copy() {
    let swarm = swarm(6 << 20).await;
    let mut nodes = Vec::new();
    for i in 0..8 {
        let site = if i % 2 == 0 { "east" } else { "west" };
        nodes.push(swarm.node(&format!("node-{i}"), site).await);
    }
    let fetches = nodes.iter().map(|node| {
        let state = node.state.clone();
        let file = swarm.file.clone();
        tokio::spawn(async move { fetch_blob(state, file.blob, file.size).await })
    });
    let reports: Vec<_> = futures::future::join_all(fetches).await;
    for report in &reports {
        let report = report.as_ref().unwrap().as_ref().unwrap();
        assert_eq!(report.size, swarm.file.size);
    }
    for node in &nodes {
        assert_eq!(cached_sha256(node, &swarm.file), swarm.file.sha256);
    }
    let from_peers: u64 = reports
        .iter()
        .map(|r| {
            let r = r.as_ref().unwrap().as_ref().unwrap();
            r.bytes_from_local_peers + r.bytes_from_remote_peers
        })
        .sum();
    let seed_copies = swarm.payload_bytes_from_seed() as f64 / swarm.file.size as f64;
    eprintln!("seed sent {seed_copies:.3} copies; peers sent {from_peers} bytes");
    assert!(
        seed_copies <= 1.5,
        "the seed sent {seed_copies:.2} copies of the package to 8 nodes"
    );
    assert!(from_peers > 0);
    for node in nodes {
        node.shutdown().await;
    }
    swarm.seed.shutdown().await;
}

/// A node that claims every chunk and answers every request with bytes of the right length
/// that are not the chunk.
struct Corrupter {
    layout: ChunkLayout,
}

impl RequestHandler for Corrupter {
    async fn handle(
        &self,
        _ctx: RequestContext,
        request: Request,
        mut send: quinn::SendStream,
        _recv: quinn::RecvStream,
    ) {
        match request {
            Request::GetChunk { blob, index, .. } => {
                let len = self.layout.chunk_len(index).unwrap_or(0);
                let header = Response::Chunk { blob, index, len };
                let _ = transport::write_frame(&mut send, &header).await;
                let _ = send
                    .write_all(&pseudo_random(len as usize, index as u64 + 1))
                    .await;
                let _ = send.finish();
            }
            _ => reply_error(&mut send, ErrorCode::NotFound, "nothing here").await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_serving_corrupt_chunks_is_banned_and_nothing_corrupt_is_cached() {
    let swarm = swarm(3 << 20).await;
    let layout = ChunkLayout::for_size(swarm.file.size).unwrap();
    let evil_identity = swarm.identity("evil");
    let endpoint =
        transport::make_endpoint("127.0.0.1:0".parse().unwrap(), &evil_identity).unwrap();
    let evil_addr = endpoint.local_addr().unwrap();
    let serving = tokio::spawn(transport::serve(
        endpoint.clone(),
        Arc::new(Corrupter { layout }),
    ));
    let evil_seed = SeedClient::connect_on(endpoint.clone(), swarm.seed.local_addr)
        .await
        .unwrap();
    let announced = evil_seed
        .call(&Request::Announce(Announcement {
            listen: evil_addr.to_string(),
            site: "east".into(),
            tags: Vec::new(),
            full: true,
            holdings: vec![Holding {
                blob: swarm.file.blob,
                size: swarm.file.size,
                chunks: Bitfield::full(layout.chunk_count()).unwrap(),
            }],
        }))
        .await
        .unwrap();
    assert!(matches!(announced, Response::Announced { .. }));

    let mut nodes = Vec::new();
    for i in 0..4 {
        nodes.push(swarm.node(&format!("honest-{i}"), "east").await);
    }
    let fetches = nodes.iter().map(|node| {
        let state = node.state.clone();
        let file = swarm.file.clone();
        tokio::spawn(async move { fetch_blob(state, file.blob, file.size).await })
    });
    let reports: Vec<_> = futures::future::join_all(fetches).await;
    let mut banned_by = 0;
    for report in reports {
        let report = report.unwrap().unwrap();
        if report.peers_banned.iter().any(|b| b.starts_with("evil")) {
            banned_by += 1;
        }
    }
    assert!(banned_by >= 1, "nobody banned the corrupting peer");
    // Every ban reached the tracker (reports are sent in the background).
    let mut reporters = 0;
    for _ in 0..250 {
        reporters = swarm
            .seed
            .state
            .tracker
            .lock()
            .unwrap()
            .reporters(&swarm.file.blob, "evil");
        if reporters >= banned_by {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(reporters, banned_by, "bans reported to the tracker");
    for node in &nodes {
        assert_eq!(cached_sha256(node, &swarm.file), swarm.file.sha256);
        let verify = node.state.cache.verify(None).unwrap();
        assert!(verify.rotted.is_empty(), "{verify:?}");
    }
    for node in nodes {
        node.shutdown().await;
    }
    evil_seed.close().await;
    endpoint.close(0u32.into(), b"done");
    serving.abort();
    swarm.seed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_resumes_from_the_chunks_already_verified() {
    let swarm = swarm(3 << 20).await;
    let first = swarm.node("first", "east").await;
    fetch_blob(first.state.clone(), swarm.file.blob, swarm.file.size)
        .await
        .unwrap();
    // A second node that had verified the first half of the chunks before it went down.
    let second = swarm.node("second", "east").await;
    let hashes = first.state.cache.chunk_hashes(&swarm.file.blob).unwrap();
    second.state.cache.register_blob(&hashes).unwrap();
    let count = hashes.layout().chunk_count();
    let mut held_bytes = 0;
    for index in 0..count / 2 {
        let bytes = first
            .state
            .cache
            .get_chunk(&swarm.file.blob, index)
            .unwrap()
            .unwrap();
        held_bytes += bytes.len() as u64;
        second
            .state
            .cache
            .put_chunk(&swarm.file.blob, index, &bytes)
            .unwrap();
    }
    let report = fetch_blob(second.state.clone(), swarm.file.blob, swarm.file.size)
        .await
        .unwrap();
    assert_eq!(report.chunks_already_held, count / 2);
    let fetched =
        report.bytes_from_seed + report.bytes_from_local_peers + report.bytes_from_remote_peers;
    assert_eq!(fetched, swarm.file.size - held_bytes);
    assert_eq!(cached_sha256(&second, &swarm.file), swarm.file.sha256);
    first.shutdown().await;
    second.shutdown().await;
    swarm.seed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_larger_than_the_cache_fails_clearly_instead_of_evicting_itself() {
    let swarm = swarm(3 << 20).await;
    let small = swarm.node_with_budget("small", "east", 1 << 20).await;
    let error = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        fetch_blob(small.state.clone(), swarm.file.blob, swarm.file.size),
    )
    .await
    .expect("the fetch ends instead of looping")
    .unwrap_err()
    .to_string();
    assert!(error.contains("pinned"), "{error}");
    small.shutdown().await;
    swarm.seed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_site_sends_one_node_across_its_wan_link() {
    let swarm = swarm_with(4 << 20, |settings| {
        settings.wan_fetchers = vec![("edge".into(), 1)];
    })
    .await;
    let names: Vec<String> = (0..4).map(|i| format!("edge-{i}")).collect();
    let mut nodes = Vec::new();
    for name in &names {
        nodes.push(swarm.node(name, "edge").await);
    }
    swarm.until_tracked(&names).await;
    let fetches = nodes.iter().map(|node| {
        let state = node.state.clone();
        let file = swarm.file.clone();
        tokio::spawn(async move { fetch_blob(state, file.blob, file.size).await })
    });
    let reports: Vec<_> = futures::future::join_all(fetches)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    for node in &nodes {
        assert_eq!(cached_sha256(node, &swarm.file), swarm.file.sha256);
    }
    let across_wan: Vec<u64> = reports
        .iter()
        .map(|r| r.bytes_from_seed + r.bytes_from_remote_peers)
        .collect();
    let fetchers = across_wan.iter().filter(|&&b| b > 0).count();
    assert_eq!(fetchers, 1, "bytes across the WAN per node: {across_wan:?}");
    let wan_copies = across_wan.iter().sum::<u64>() as f64 / swarm.file.size as f64;
    assert!(
        wan_copies <= 1.1,
        "the edge link carried {wan_copies:.2} copies: {across_wan:?}"
    );
    for node in nodes {
        node.shutdown().await;
    }
    swarm.seed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_at_its_upload_cap_turns_askers_away_and_everyone_completes() {
    let swarm = swarm(3 << 20).await;
    let holder = swarm
        .node_with("holder", "east", |s| s.max_uploads = 1)
        .await;
    fetch_blob(holder.state.clone(), swarm.file.blob, swarm.file.size)
        .await
        .unwrap();
    let mut nodes = Vec::new();
    for i in 0..4 {
        nodes.push(swarm.node(&format!("asker-{i}"), "east").await);
    }
    let fetches = nodes.iter().map(|node| {
        let state = node.state.clone();
        let file = swarm.file.clone();
        tokio::spawn(async move { fetch_blob(state, file.blob, file.size).await })
    });
    for report in futures::future::join_all(fetches).await {
        let report = report.unwrap().unwrap();
        // Turned away for a while is not misbehaving: the capped holder is never banned.
        assert!(report.peers_banned.is_empty(), "{:?}", report.peers_banned);
    }
    for node in &nodes {
        assert_eq!(cached_sha256(node, &swarm.file), swarm.file.sha256);
    }
    assert_eq!(holder.state.uploads.available_permits(), 1);
    let refused = holder.state.served.uploads_refused.load(Ordering::Relaxed);
    let served = holder.state.served.chunks_served.load(Ordering::Relaxed);
    eprintln!("the capped holder served {served} chunks and turned away {refused} requests");
    assert!(refused > 0, "four askers never found the holder busy");
    assert!(served > 0);
    for node in nodes {
        node.shutdown().await;
    }
    holder.shutdown().await;
    swarm.seed.shutdown().await;
}
