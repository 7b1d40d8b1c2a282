//! Fault injection, part 1 (issue #9): hostile peers and slow consumers.
//!
//! Honest nodes are real `pkgmesh node` processes under a real `pkgmesh seed`; the attackers run
//! in this test process on pkgmesh's own transport, with valid node certificates from the fleet
//! CA, because a stolen certificate is exactly what a hostile fleet member holds. They lie to the
//! tracker (a full bitfield for a blob they do not hold) and answer chunk requests with flipped
//! bits, short chunks, another blob's bytes, a frame over the limit, or nothing at all. A second
//! attacker asks a node and the seed for a gigabyte of chunks and never reads them (or reads one
//! byte a second), to show that a server's memory does not follow what it is asked for and that
//! it keeps serving everyone else.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pkgmesh_node::client::SeedClient;
use pkgmesh_node::pki::{Identity, Role};
use pkgmesh_node::transport::{self, PeerConnection, RequestContext, RequestHandler};
use pkgmesh_protocol::bitfield::Bitfield;
use pkgmesh_protocol::blob::{BlobId, ChunkLayout};
use pkgmesh_protocol::wire::{
    Announcement, ErrorCode, Holding, Request, Response, MAX_FRAME_BYTES,
};
use pkgmesh_tests::{build_sample_package_sized, pkgmesh, run_pkgmesh, stdout_json, Daemon, Fleet};
use quinn::{RecvStream, SendStream, VarInt};
use sha2::{Digest, Sha256};

const PACKAGE: &str = "pkgmesh-sample";

/// The ZIP an Ubuntu node on this machine's architecture selects from the sample package.
fn ubuntu_file() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        "sample-ubuntu-arm64.zip"
    } else {
        "sample-ubuntu-x86_64.zip"
    }
}

/// A blob as the test knows it: its bytes, id and chunk layout.
struct Blob {
    id: BlobId,
    bytes: Vec<u8>,
    layout: ChunkLayout,
}

impl Blob {
    fn read(path: &Path) -> Blob {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let id = BlobId(*blake3::hash(&bytes).as_bytes());
        let layout = ChunkLayout::for_size(bytes.len() as u64).expect("a sane blob size");
        Blob { id, bytes, layout }
    }

    fn chunk(&self, index: u32) -> Option<&[u8]> {
        let len = self.layout.chunk_len(index).ok()? as usize;
        let offset = usize::try_from(self.layout.chunk_offset(index)).ok()?;
        self.bytes.get(offset..offset + len)
    }
}

/// A seed with the sample package published, and the honest node processes of the test.
struct Mesh {
    work: tempfile::TempDir,
    fleet: Fleet,
    _seed: Daemon,
    seed_addr: String,
    package: PathBuf,
}

impl Mesh {
    fn start(payload_kib: u64) -> Mesh {
        let work = tempfile::tempdir().expect("temp dir");
        let fleet = Fleet::new(work.path());
        let seed_id = fleet.identity("seed-1", "seed");
        let seed = Daemon::start([
            "seed".as_ref(),
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--data".as_ref(),
            work.path().join("seed-data").as_os_str(),
            "--identity".as_ref(),
            seed_id.as_os_str(),
            "--json".as_ref(),
        ]);
        let seed_addr = seed.listening();
        let package = work.path().join("package");
        build_sample_package_sized(&package, "1.0.0", payload_kib);
        let publisher = fleet.identity("alice", "publisher");
        let published = run_pkgmesh([
            "package".as_ref(),
            "publish".as_ref(),
            "--seed".as_ref(),
            seed_addr.as_ref(),
            "--identity".as_ref(),
            publisher.as_os_str(),
            "--name".as_ref(),
            PACKAGE.as_ref(),
            "--manifest".as_ref(),
            package.join("manifest.json").as_os_str(),
            "--dir".as_ref(),
            package.as_os_str(),
        ]);
        assert!(
            published.status.success(),
            "publish: {}",
            stderr(&published)
        );
        Mesh {
            work,
            fleet,
            _seed: seed,
            seed_addr,
            package,
        }
    }

    fn seed_addr(&self) -> SocketAddr {
        self.seed_addr.parse().expect("the seed prints ip:port")
    }

    fn blob(&self, file: &str) -> Blob {
        Blob::read(&self.package.join(file))
    }

    /// A node identity loaded for use in this process.
    fn identity(&self, name: &str) -> Identity {
        let dir = self.fleet.identity(name, "node");
        Identity::load(&dir).unwrap_or_else(|e| panic!("identity {name}: {e}"))
    }

    fn data(&self, name: &str) -> PathBuf {
        self.work.path().join(format!("data-{name}"))
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.data(name).join("admin.sock")
    }

    /// A `pkgmesh node` process named `name`, an Ubuntu 22.04 machine.
    fn node(&self, name: &str) -> Daemon {
        let identity = self.fleet.identity(name, "node");
        Daemon::start([
            "node".as_ref(),
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--seed".as_ref(),
            self.seed_addr.as_ref(),
            "--data".as_ref(),
            self.data(name).as_os_str(),
            "--identity".as_ref(),
            identity.as_os_str(),
            "--platform".as_ref(),
            "ubuntu".as_ref(),
            "--platform-version".as_ref(),
            "22.04".as_ref(),
            "--json".as_ref(),
        ])
    }

    /// Starts `pkgmesh fetch` through each named node at once and waits for all of them.
    fn fetch_all(&self, names: &[String], within: Duration) -> Vec<(String, PathBuf, Output)> {
        let mut running = Vec::new();
        for name in names {
            let out = self.work.path().join(format!("{name}.zip"));
            let child = Command::new(pkgmesh())
                .args(["fetch", PACKAGE, "--json", "--node"])
                .arg(self.socket(name))
                .arg("--out")
                .arg(&out)
                .env_remove("PKGMESH_SEED")
                .env_remove("PKGMESH_DATA")
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start pkgmesh fetch");
            running.push((name.clone(), out, child));
        }
        let deadline = Instant::now() + within;
        let mut done = Vec::new();
        while !running.is_empty() {
            let mut still = Vec::new();
            for (name, out, mut child) in running {
                match child.try_wait().expect("poll pkgmesh fetch") {
                    Some(_) => {
                        let output = child.wait_with_output().expect("collect pkgmesh fetch");
                        done.push((name, out, output));
                    }
                    None if Instant::now() > deadline => {
                        let _ = child.kill();
                        let output = child.wait_with_output().expect("collect pkgmesh fetch");
                        panic!(
                            "fetch through {name} did not finish within {within:?} (hung?): {}",
                            stderr(&output)
                        );
                    }
                    None => still.push((name, out, child)),
                }
            }
            running = still;
            std::thread::sleep(Duration::from_millis(100));
        }
        done
    }

    /// `pkgmesh <args> --node <socket of name> --json`, parsed.
    fn ask_node(&self, name: &str, args: &[&str]) -> serde_json::Value {
        let mut all: Vec<std::ffi::OsString> = args.iter().map(|a| a.into()).collect();
        all.push("--node".into());
        all.push(self.socket(name).into());
        all.push("--json".into());
        let output = run_pkgmesh(&all);
        assert!(
            output.status.success(),
            "pkgmesh {args:?} on {name}: {}",
            stderr(&output)
        );
        stdout_json(&output)
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// One lie per hostile peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// The right chunk with one bit flipped.
    FlipBits,
    /// A header with the right length, then half the bytes and the end of the stream.
    ShortChunk,
    /// The right header, then the bytes at the same place in another blob.
    OtherBlob,
    /// A frame whose length prefix is over the wire limit.
    OversizedFrame,
    /// Never answers; holds the stream open until the asker gives up on it.
    Stall,
}

impl Behaviour {
    const ALL: [Behaviour; 5] = [
        Behaviour::FlipBits,
        Behaviour::ShortChunk,
        Behaviour::OtherBlob,
        Behaviour::OversizedFrame,
        Behaviour::Stall,
    ];

    fn name(self) -> &'static str {
        match self {
            Behaviour::FlipBits => "hostile-flip",
            Behaviour::ShortChunk => "hostile-short",
            Behaviour::OtherBlob => "hostile-other",
            Behaviour::OversizedFrame => "hostile-oversized",
            Behaviour::Stall => "hostile-stall",
        }
    }

    /// The ban reason an honest node gives, as `pkgmesh peers` prints it.
    fn ban_reason(self) -> Option<&'static str> {
        match self {
            Behaviour::FlipBits | Behaviour::OtherBlob => {
                Some("sent a chunk that failed verification")
            }
            Behaviour::ShortChunk => Some("sent a chunk of the wrong length"),
            Behaviour::OversizedFrame => Some("sent a frame over the size limit"),
            Behaviour::Stall => None,
        }
    }

    /// The reason a node gives if it bans this peer: a staller may be banned too (after
    /// timeouts in a row), but need not be before the download ends.
    fn reason_if_banned(self) -> &'static str {
        self.ban_reason().unwrap_or("stopped answering requests")
    }
}

/// A hostile fleet member: serves lies about `target` on pkgmesh's own transport.
struct Hostile {
    behaviour: Behaviour,
    target: Arc<Blob>,
    other: Arc<Blob>,
    /// Chunk requests it got.
    asked: AtomicU64,
    /// Stalled requests the asker gave up on (stopped the stream or closed the connection).
    abandoned: AtomicU64,
}

impl RequestHandler for Hostile {
    async fn handle(
        &self,
        _ctx: RequestContext,
        request: Request,
        mut send: SendStream,
        _recv: RecvStream,
    ) {
        match request {
            Request::GetChunk { blob, index, .. } if blob == self.target.id => {
                self.asked.fetch_add(1, Ordering::Relaxed);
                self.lie(index, &mut send).await;
            }
            Request::GetBitfield { blob } if blob == self.target.id => {
                let chunks = Bitfield::full(self.target.layout.chunk_count()).ok();
                let _ =
                    transport::write_frame(&mut send, &Response::Bitfield { blob, chunks }).await;
                let _ = send.finish();
            }
            _ => transport::reply_error(&mut send, ErrorCode::NotFound, "not here").await,
        }
    }
}

impl Hostile {
    async fn lie(&self, index: u32, send: &mut SendStream) {
        let blob = self.target.id;
        let Some(real) = self.target.chunk(index) else {
            transport::reply_error(send, ErrorCode::NotFound, "no such chunk").await;
            return;
        };
        let len = real.len();
        let header = Response::Chunk {
            blob,
            index,
            len: len as u32,
        };
        match self.behaviour {
            Behaviour::FlipBits => {
                let mut bytes = real.to_vec();
                bytes[len / 2] ^= 0x10;
                let _ = transport::send_chunk(send, blob, index, &bytes).await;
            }
            Behaviour::ShortChunk => {
                let _ = transport::write_frame(send, &header).await;
                let _ = send.write_all(&real[..len / 2]).await;
                let _ = send.finish();
            }
            Behaviour::OtherBlob => {
                let offset = self.target.layout.chunk_offset(index) as usize;
                let bytes: Vec<u8> = self
                    .other
                    .bytes
                    .iter()
                    .cycle()
                    .skip(offset)
                    .take(len)
                    .copied()
                    .collect();
                let _ = transport::send_chunk(send, blob, index, &bytes).await;
            }
            Behaviour::OversizedFrame => {
                let claimed = (MAX_FRAME_BYTES as u32 + 1).to_be_bytes();
                let _ = send.write_all(&claimed).await;
                let _ = send.write_all(&[0xA5; 64 * 1024]).await;
                let _ = send.finish();
            }
            Behaviour::Stall => {
                // Resolves when the asker stops the stream (it gave up on the request) or the
                // connection goes; until then the request is simply left hanging.
                let _ = send.stopped().await;
                self.abandoned.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Starts a hostile peer named after its behaviour and has it claim every chunk of `target`.
async fn start_hostile(
    identity: Identity,
    behaviour: Behaviour,
    target: Arc<Blob>,
    other: Arc<Blob>,
    seed: SocketAddr,
) -> (Arc<Hostile>, quinn::Endpoint) {
    transport::install_crypto_provider();
    let bind: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
    let endpoint = transport::make_endpoint(bind, &identity).expect("hostile endpoint");
    let listen = endpoint.local_addr().expect("bound address");
    let hostile = Arc::new(Hostile {
        behaviour,
        target: target.clone(),
        other,
        asked: AtomicU64::new(0),
        abandoned: AtomicU64::new(0),
    });
    tokio::spawn(transport::serve(endpoint.clone(), hostile.clone()));
    let seed_client = SeedClient::connect(seed, &identity)
        .await
        .expect("a hostile peer reaches the seed");
    let lie = Announcement {
        listen: listen.to_string(),
        site: "default".into(),
        tags: Vec::new(),
        full: true,
        holdings: vec![Holding {
            blob: target.id,
            size: target.layout.size(),
            chunks: Bitfield::full(target.layout.chunk_count()).expect("bitfield"),
        }],
    };
    let answer = seed_client
        .call(&Request::Announce(lie))
        .await
        .expect("the tracker takes the announcement");
    assert!(
        matches!(answer, Response::Announced { .. }),
        "announce answered {answer:?}"
    );
    seed_client.close().await;
    (hostile, endpoint)
}

/// The node names the tracker gives a node asking for peers of `blob`.
async fn tracker_names(identity: &Identity, seed: SocketAddr, blob: &Blob) -> Vec<String> {
    let client = SeedClient::connect(seed, identity)
        .await
        .expect("reach the seed");
    let answer = client
        .call(&Request::GetPeers {
            blob: blob.id,
            size: blob.layout.size(),
            max: 64,
        })
        .await
        .expect("GetPeers");
    client.close().await;
    match answer {
        Response::Peers(peers) => peers.into_iter().map(|p| p.node).collect(),
        other => panic!("GetPeers answered {other:?}"),
    }
}

#[test]
fn a_third_of_the_peers_are_hostile_and_every_honest_node_gets_the_right_bytes() {
    let mesh = Mesh::start(6 * 1024);
    let target = Arc::new(mesh.blob(ubuntu_file()));
    let other = Arc::new(mesh.blob("sample-redhat9.zip"));
    assert_ne!(target.id, other.id);
    assert!(
        target.layout.chunk_count() >= 16,
        "the package should span many chunks, has {}",
        target.layout.chunk_count()
    );
    let expected_sha = sha256_hex(&target.bytes);
    let seed = mesh.seed_addr();

    // Five hostile peers, one per lie, announced before any honest node looks for peers.
    let rt = runtime();
    let hostiles: Vec<(Arc<Hostile>, quinn::Endpoint)> = Behaviour::ALL
        .iter()
        .map(|&behaviour| {
            let identity = mesh.identity(behaviour.name());
            rt.block_on(start_hostile(
                identity,
                behaviour,
                target.clone(),
                other.clone(),
                seed,
            ))
        })
        .collect();
    let observer = mesh.identity("observer");
    let named = rt.block_on(tracker_names(&observer, seed, &target));
    for behaviour in Behaviour::ALL {
        assert!(
            named.iter().any(|n| n == behaviour.name()),
            "the tracker should name {} before the fetch: {named:?}",
            behaviour.name()
        );
    }

    // Ten honest node processes: two thirds of the fifteen peers.
    let honest: Vec<String> = (1..=10).map(|i| format!("honest-{i:02}")).collect();
    let _daemons: Vec<Daemon> = honest.iter().map(|name| mesh.node(name)).collect();
    let fetched = mesh.fetch_all(&honest, Duration::from_secs(120));

    // Every honest node completes with the right bytes.
    for (name, out, output) in &fetched {
        assert!(
            output.status.success(),
            "fetch through {name} failed: {}",
            stderr(output)
        );
        let summary = stdout_json(output);
        assert_eq!(
            summary["sha256"],
            expected_sha.as_str(),
            "{name}: {summary}"
        );
        let bytes = std::fs::read(out).expect("the fetched ZIP");
        assert_eq!(sha256_hex(&bytes), expected_sha, "{name} wrote other bytes");
    }

    // Nothing hostile is cached: every chunk every node holds verifies, none was dropped, and
    // none came from a hostile peer.
    let mut banned_by: std::collections::HashMap<&str, Vec<String>> = Default::default();
    for name in &honest {
        let report = mesh.ask_node(name, &["cache", "verify"]);
        assert_eq!(
            report["rotted"].as_array().map(Vec::len),
            Some(0),
            "{name}: {report}"
        );
        assert!(
            report["chunks_checked"].as_u64() >= Some(target.layout.chunk_count() as u64),
            "{name} should hold the whole blob: {report}"
        );
        let peers = mesh.ask_node(name, &["peers"]);
        let rows = peers["peers"]
            .as_array()
            .expect("peers --json has a peers list");
        for behaviour in Behaviour::ALL {
            let Some(row) = rows.iter().find(|r| r["node"] == behaviour.name()) else {
                continue;
            };
            assert_eq!(
                row["chunks_received"],
                0,
                "{name} took a chunk from {}: {row}",
                behaviour.name()
            );
            if let Some(reason) = row["banned"].as_str() {
                assert_eq!(
                    reason,
                    behaviour.reason_if_banned(),
                    "{name} banned {} for the wrong reason: {row}",
                    behaviour.name()
                );
                assert_eq!(row["banned_blob"], target.id.to_hex().as_str(), "{row}");
                banned_by
                    .entry(behaviour.name())
                    .or_default()
                    .push(name.clone());
            }
        }
    }

    // Every lie was told, and every liar that answered was banned by at least two nodes (the
    // tracker's threshold for believing a ban report).
    for (hostile, _) in &hostiles {
        let name = hostile.behaviour.name();
        assert!(
            hostile.asked.load(Ordering::Relaxed) > 0,
            "nobody asked {name} for a chunk: the test tested nothing"
        );
        if hostile.behaviour.ban_reason().is_some() {
            let by = banned_by.get(name).map(Vec::len).unwrap_or(0);
            assert!(by >= 2, "{name} was banned by {by} nodes: {banned_by:?}");
        }
    }

    // The staller was abandoned: every request it held was given up on by its asker, and its
    // chunks came from elsewhere (every node completed above).
    let staller = hostiles
        .iter()
        .map(|(h, _)| h)
        .find(|h| h.behaviour == Behaviour::Stall)
        .expect("a staller");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let asked = staller.asked.load(Ordering::Relaxed);
        let abandoned = staller.abandoned.load(Ordering::Relaxed);
        if abandoned == asked {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the staller still holds {} of {asked} requests 30 s after every fetch ended",
            asked - abandoned
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The tracker took the ban reports: it names no banned liar any more, but still names the
    // honest nodes.
    let named = rt.block_on(tracker_names(&observer, seed, &target));
    for behaviour in Behaviour::ALL {
        if behaviour.ban_reason().is_some() {
            assert!(
                !named.iter().any(|n| n == behaviour.name()),
                "the tracker still names {} after ban reports: {named:?}",
                behaviour.name()
            );
        }
    }
    let honest_named = named.iter().filter(|n| n.starts_with("honest-")).count();
    assert_eq!(honest_named, honest.len(), "{named:?}");
    drop(hostiles);
}

/// Resident memory of a process, from `/proc/<pid>/status`.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"));
    kib * 1024
}

/// A client endpoint with tiny receive windows, so that what it does not read stays on the
/// server (the point of the attack) and not in this process.
fn greedy_endpoint(identity: &Identity) -> quinn::Endpoint {
    let mut client = transport::client_config(identity).expect("client config");
    let mut tuning = transport::transport_config();
    tuning
        .stream_receive_window(VarInt::from_u32(16 * 1024))
        .receive_window(VarInt::from_u32(64 * 1024));
    client.transport_config(Arc::new(tuning));
    let bind: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
    let mut endpoint = quinn::Endpoint::client(bind).expect("client endpoint");
    endpoint.set_default_client_config(client);
    endpoint
}

/// Streams a greedy client holds: chunk requests it never reads, and one it reads a byte a
/// second.
struct Hoard {
    _connections: Vec<PeerConnection>,
    _unread: Vec<RecvStream>,
    _sends: Vec<SendStream>,
    requested_bytes: u64,
}

/// Asks `server` for `target_bytes` worth of chunks of `blob` over as many connections as it
/// takes (a connection carries at most the server's stream limit of open requests: 64 on the
/// seed, 256 on a node), reading none of them but the first,
/// which it reads one byte a second.
async fn hoard(
    endpoint: &quinn::Endpoint,
    server: SocketAddr,
    role: Role,
    blob: &Blob,
    target_bytes: u64,
) -> Hoard {
    let mut hoard = Hoard {
        _connections: Vec::new(),
        _unread: Vec::new(),
        _sends: Vec::new(),
        requested_bytes: 0,
    };
    let count = blob.layout.chunk_count();
    let mut next = 0u32;
    while hoard.requested_bytes < target_bytes && hoard._connections.len() < 256 {
        let conn = transport::connect(endpoint, server, role, Duration::from_secs(10))
            .await
            .expect("the greedy client connects");
        while hoard.requested_bytes < target_bytes {
            // Opening blocks once the server's stream limit for this connection is reached.
            let opened =
                tokio::time::timeout(Duration::from_secs(1), conn.connection.open_bi()).await;
            let Ok(Ok((mut send, recv))) = opened else {
                break;
            };
            let index = next % count;
            next += 1;
            let request = Request::GetChunk {
                blob: blob.id,
                index,
                after_peer_failure: true,
            };
            transport::write_frame(&mut send, &request)
                .await
                .expect("send a chunk request");
            let _ = send.finish();
            hoard._sends.push(send);
            hoard.requested_bytes +=
                u64::from(blob.layout.chunk_len(index).expect("index in range"));
            if next == 1 {
                // The slow reader: one byte a second, for as long as the server keeps sending.
                tokio::spawn(async move {
                    let mut recv = recv;
                    let mut byte = [0u8; 1];
                    while let Ok(Some(_)) = recv.read(&mut byte).await {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                });
            } else {
                hoard._unread.push(recv);
            }
        }
        hoard._connections.push(conn);
    }
    hoard
}

/// Asks `server` for chunk `index` as an ordinary client would, until it is served (a busy
/// answer is retried), and returns the bytes.
async fn fetch_one_chunk(
    identity: &Identity,
    server: SocketAddr,
    role: Role,
    blob: &Blob,
    index: u32,
    within: Duration,
) -> Vec<u8> {
    let bind: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
    let endpoint = transport::make_endpoint(bind, identity).expect("endpoint");
    let deadline = Instant::now() + within;
    let mut last = String::new();
    while Instant::now() < deadline {
        let attempt = async {
            let conn = transport::connect(&endpoint, server, role, Duration::from_secs(10)).await?;
            let request = Request::GetChunk {
                blob: blob.id,
                index,
                after_peer_failure: true,
            };
            let (response, _send, mut recv) =
                transport::request(&conn, &request, Duration::from_secs(10)).await?;
            match response {
                Response::Chunk { len, .. } => {
                    let mut bytes = vec![0u8; len as usize];
                    tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut bytes))
                        .await
                        .map_err(|_| anyhow_like("the chunk's bytes timed out"))?
                        .map_err(|e| anyhow_like(&format!("reading the chunk: {e}")))?;
                    Ok(bytes)
                }
                other => Err(anyhow_like(&format!("answered {other:?}"))),
            }
        };
        match attempt.await {
            Ok(bytes) => return bytes,
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{server} served no other client within {within:?}; last answer: {last}");
}

fn anyhow_like(message: &str) -> transport::TransportError {
    transport::TransportError::UnexpectedResponse(message.to_string())
}

/// The largest of a few VmRSS readings over about two seconds: the server's footprint once it
/// has taken in what it was asked.
fn settled_rss(pid: u32) -> u64 {
    let mut peak = 0;
    for _ in 0..10 {
        peak = peak.max(rss_bytes(pid));
        std::thread::sleep(Duration::from_millis(200));
    }
    peak
}

#[test]
fn a_client_that_never_reads_leaves_server_memory_bounded_and_others_served() {
    const ASKED: u64 = 1024 * 1024 * 1024;
    const BOUND: u64 = 64 * 1024 * 1024;
    let mesh = Mesh::start(4 * 1024);
    let target = mesh.blob(ubuntu_file());
    let expected_sha = sha256_hex(&target.bytes);
    let seed = mesh.seed_addr();

    // A node holding the whole blob.
    let holder = mesh.node("holder");
    let holder_addr: SocketAddr = holder.listening().parse().expect("node prints ip:port");
    let fetched = mesh.fetch_all(&["holder".to_string()], Duration::from_secs(60));
    assert!(fetched[0].2.status.success(), "{}", stderr(&fetched[0].2));
    let seed_pid = mesh._seed.child.id();
    let holder_pid = holder.child.id();
    let seed_before = settled_rss(seed_pid);
    let holder_before = settled_rss(holder_pid);

    // The greedy client asks each server for a gigabyte of chunks and reads none of it.
    let rt = runtime();
    let greedy = mesh.identity("greedy");
    let endpoint = {
        let _guard = rt.enter();
        greedy_endpoint(&greedy)
    };
    let (at_seed, at_node) = rt.block_on(async {
        let at_seed = hoard(&endpoint, seed, Role::Seed, &target, ASKED).await;
        let at_node = hoard(&endpoint, holder_addr, Role::Node, &target, ASKED).await;
        (at_seed, at_node)
    });
    assert!(
        at_seed.requested_bytes >= ASKED,
        "{}",
        at_seed.requested_bytes
    );
    assert!(
        at_node.requested_bytes >= ASKED,
        "{}",
        at_node.requested_bytes
    );

    // Both servers keep serving others meanwhile: a chunk asked directly, and a whole fetch by
    // a new node (from the holder and the seed).
    let other = mesh.identity("other");
    let last = target.layout.chunk_count() - 1;
    for (server, role) in [(seed, Role::Seed), (holder_addr, Role::Node)] {
        let bytes = rt.block_on(fetch_one_chunk(
            &other,
            server,
            role,
            &target,
            last,
            Duration::from_secs(60),
        ));
        assert_eq!(
            Some(&bytes[..]),
            target.chunk(last),
            "{server} served other bytes"
        );
    }
    let _late = mesh.node("late");
    let fetched = mesh.fetch_all(&["late".to_string()], Duration::from_secs(90));
    let (_, out, output) = &fetched[0];
    assert!(
        output.status.success(),
        "fetch during the attack: {}",
        stderr(output)
    );
    assert_eq!(sha256_hex(&std::fs::read(out).expect("zip")), expected_sha);

    // Memory did not follow what was asked.
    let seed_after = settled_rss(seed_pid);
    let holder_after = settled_rss(holder_pid);
    let grew = |before: u64, after: u64| after.saturating_sub(before);
    eprintln!(
        "asked the seed for {} MiB and the node for {} MiB unread; seed RSS {} -> {} MiB, node RSS {} -> {} MiB",
        at_seed.requested_bytes >> 20,
        at_node.requested_bytes >> 20,
        seed_before >> 20,
        seed_after >> 20,
        holder_before >> 20,
        holder_after >> 20
    );
    assert!(
        grew(seed_before, seed_after) < BOUND,
        "the seed grew by {} MiB while a client left {} MiB unread",
        grew(seed_before, seed_after) >> 20,
        at_seed.requested_bytes >> 20
    );
    assert!(
        grew(holder_before, holder_after) < BOUND,
        "the node grew by {} MiB while a client left {} MiB unread",
        grew(holder_before, holder_after) >> 20,
        at_node.requested_bytes >> 20
    );
    drop((at_seed, at_node));
    drop(holder);
}
