//! `tracker`: K simulated nodes against one real seed, announcing and asking for peers (and, with
//! `--with-manifests`, for the package's manifest) over real QUIC with mutual TLS.
//!
//! ```text
//! cargo run --release -p pkgmesh-benches --bin tracker -- --nodes 10000 --duration-s 60 --rate 0.2
//! cargo run --release -p pkgmesh-benches --bin tracker -- --nodes 1000 --duration-s 300 --with-manifests
//! ```
//!
//! The seed is a separate process of the real `pkgmesh` binary with one package published, so
//! there is a blob to announce. The tracker keys everything by the name in the caller's
//! certificate, so every simulated node gets its own identity, issued in-process with the
//! product's own `pki::issue` into the working directory (on `/dev/shm` when it exists, so that
//! issuing 10,000 identities costs key generation, not 40,000 fsyncs). The nodes share a few
//! client UDP endpoints (`--endpoints`); each node dials with its own certificate through
//! pkgmesh's own `transport::connect` (handshake, role check, `Hello`) and keeps its connection,
//! as a real node keeps its seed connection.
//!
//! Each node announces once (a full announcement of a random part of the blob) while the fleet
//! connects; then, for `--duration-s`, sends `--rate` requests a second on a fixed schedule with
//! a random phase, cycling Announce (full, one more chunk held each time, as a node making
//! progress would), GetPeers (32 peers, what a node asks for) and, with `--with-manifests`,
//! GetManifest. Latency is measured from opening the request's stream to decoding the answer.
//! A node whose schedule slipped (the client or the seed could not keep up) sends at once and
//! counts a late start, so the offered rate is kept and saturation shows.
//!
//! While it runs, the seed's resident memory is sampled from `/proc/<pid>/status`; the result is
//! one JSON line with the request rate, per-type p50/p99/max latency, errors, and the seed's RSS
//! at the start of the load, its peak (`VmHWM`) and at the end. The seed's CPU time per request
//! (`seed_cpu_ms_per_request`) is its own service cost, apart from queueing in the client or on
//! a busy machine; `client_cpu_per_s` and `late_starts` show when the client is the limit.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use pkgmesh_benches::procs::{self, round3};
use pkgmesh_node::pki::{self, Identity, Role};
use pkgmesh_node::transport::{self, PeerConnection};
use pkgmesh_protocol::bitfield::Bitfield;
use pkgmesh_protocol::blob::{BlobId, ChunkLayout};
use pkgmesh_protocol::wire::{Announcement, Holding, Request, Response};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const PACKAGE: &str = "trackerbench";
/// What a real node asks for (`node::peer::fetch::PEERS_PER_ASK`).
const PEERS_PER_ASK: u32 = 32;
/// Waiting for a handshake or an answer; a request slower than this is an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Waiting for the seed's ready line and for the fleet to connect.
const SEED_START_TIMEOUT: Duration = Duration::from_secs(60);
/// A request that starts this long after its slot counts as a late start.
const LATE_AFTER: Duration = Duration::from_millis(10);

#[derive(Parser, Debug)]
#[command(about = "Simulated nodes announcing and asking for peers against a real seed")]
struct Args {
    /// Simulated nodes, each with its own certificate and connection.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Seconds of load after every node has connected and announced once.
    #[arg(long, default_value_t = 30)]
    duration_s: u64,
    /// Requests per node per second, cycling through the request types.
    #[arg(long, default_value_t = 0.5)]
    rate: f64,
    /// Add GetManifest (the package's default version) to the cycle.
    #[arg(long)]
    with_manifests: bool,
    /// Send only this request type (announce, get-peers, get-manifest, ping) after the first
    /// announcement: to find which request a cost or a leak belongs to.
    #[arg(long, value_enum)]
    only: Option<Kind>,
    /// Client UDP endpoints the nodes share. 0: one per 1,000 nodes, at least 2.
    #[arg(long, default_value_t = 0)]
    endpoints: usize,
    /// Handshakes in flight while the fleet connects.
    #[arg(long, default_value_t = 32)]
    connect_parallel: usize,
    /// Size of the published package's payload in MiB (4 chunks a MiB), which sizes every
    /// bitfield.
    #[arg(long, default_value_t = 4)]
    size_mib: u64,
    /// Seconds between samples of the seed's memory.
    #[arg(long, default_value_t = 5)]
    sample_s: u64,
    /// Seed of the random phases and holdings.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The pkgmesh binary. Default: `pkgmesh` next to this binary, built first with
    /// `cargo build --release -p pkgmesh-cli` so it is never stale.
    #[arg(long)]
    pkgmesh: Option<PathBuf>,
    /// Do not run `cargo build` for the pkgmesh binary.
    #[arg(long)]
    no_build: bool,
    /// Working directory (CA, identities, package, seed data and log). Default: a fresh
    /// directory on /dev/shm (else the system temp dir), removed at the end.
    #[arg(long)]
    work: Option<PathBuf>,
    /// Keep the working directory.
    #[arg(long)]
    keep: bool,
    /// Progress on stderr.
    #[arg(long)]
    verbose: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tracker: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    if args.nodes == 0 || args.duration_s == 0 {
        bail!("--nodes and --duration-s must be at least 1");
    }
    if !(args.rate > 0.0 && args.rate.is_finite()) {
        bail!("--rate must be a positive number of requests per node per second");
    }
    if args.size_mib == 0 || args.connect_parallel == 0 || args.sample_s == 0 {
        bail!("--size-mib, --connect-parallel and --sample-s must be at least 1");
    }
    let pkgmesh = procs::pkgmesh_binary(args.pkgmesh.as_deref(), args.no_build)?;
    let (work, remove_work) = match &args.work {
        Some(dir) => (dir.clone(), false),
        None => {
            let shm = Path::new("/dev/shm");
            let base = if shm.is_dir() {
                shm.to_path_buf()
            } else {
                std::env::temp_dir()
            };
            (
                base.join(format!("pkgmesh-tracker-{}", std::process::id())),
                !args.keep,
            )
        }
    };
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let result = measure(args, &pkgmesh, &work);
    if remove_work {
        let _ = std::fs::remove_dir_all(&work);
    }
    println!("{}", result?);
    Ok(())
}

fn measure(args: &Args, pkgmesh: &Path, work: &Path) -> anyhow::Result<serde_json::Value> {
    let started = Instant::now();
    let ca = work.join("ca");
    if !ca.join(pki::CA_CERT_FILE).exists() {
        pki::init_ca(&ca, "tracker bench fleet")?;
    }
    for (name, role) in [("seed", Role::Seed), ("publisher", Role::Publisher)] {
        if !work.join(name).join(pki::CERT_FILE).exists() {
            pki::issue(&ca, name, &[role], 2, &work.join(name))?;
        }
    }
    let identities = issue_nodes(&ca, &work.join("nodes"), args.nodes)?;
    let issue_s = started.elapsed().as_secs_f64();
    if args.verbose {
        eprintln!("tracker: {} node identities in {issue_s:.1} s", args.nodes);
    }
    let package = work.join("package");
    procs::build_package(&package, PACKAGE, args.size_mib, 1)?;
    let (seed, seed_addr) = start_seed(pkgmesh, work, &package)?;
    let seed_pid = seed.child.id();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let drops_before = udp_rcvbuf_errors_now();
    let load = runtime.block_on(drive(args, seed_addr, seed_pid, identities))?;
    let udp_rcvbuf_errors = drops_before.zip(udp_rcvbuf_errors_now());
    drop(runtime);
    let refused_at_limit = count_in_file(&work.join("seed.log"), "at the connection limit");
    drop(seed);

    let mut line = serde_json::json!({
        "bench": "tracker",
        "nodes": args.nodes,
        "duration_s": args.duration_s,
        "rate_per_node": args.rate,
        "offered_rps": round1(args.nodes as f64 * args.rate),
        "with_manifests": args.with_manifests,
        "endpoints": load.endpoints,
        "udp_rcvbuf_errors": udp_rcvbuf_errors.map(|(before, after)| after.saturating_sub(before)),
        "size_mib": args.size_mib,
        "identities_s": round1(issue_s),
        "seed_refused_at_connection_limit": refused_at_limit,
    });
    if let (Some(line), serde_json::Value::Object(figures)) = (line.as_object_mut(), load.json) {
        line.extend(figures);
    }
    Ok(line)
}

/// One identity per simulated node, issued on both cores (key generation dominates).
fn issue_nodes(ca: &Path, dir: &Path, count: usize) -> anyhow::Result<Vec<Identity>> {
    std::fs::create_dir_all(dir)?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let next = AtomicU64::new(0);
    let issued: Mutex<Vec<(usize, Identity)>> = Mutex::new(Vec::with_capacity(count));
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        if i >= count {
                            return Ok(());
                        }
                        let name = node_name(i);
                        let out = dir.join(&name);
                        if !out.join(pki::CERT_FILE).exists() {
                            pki::issue(ca, &name, &[Role::Node], 2, &out)
                                .with_context(|| format!("issuing {name}"))?;
                        }
                        let identity = Identity::load(&out)
                            .with_context(|| format!("loading {}", out.display()))?;
                        issued
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push((i, identity));
                    }
                })
            })
            .collect();
        for worker in workers {
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("an identity worker panicked"))??;
        }
        Ok::<(), anyhow::Error>(())
    })?;
    let mut issued = issued
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    issued.sort_by_key(|(i, _)| *i);
    Ok(issued.into_iter().map(|(_, identity)| identity).collect())
}

fn node_name(i: usize) -> String {
    format!("sim-{i:05}")
}

/// Starts `pkgmesh seed` (log in `<work>/seed.log`) and publishes the package through the real
/// `pkgmesh package publish`.
fn start_seed(
    pkgmesh: &Path,
    work: &Path,
    package: &Path,
) -> anyhow::Result<(procs::Daemon, SocketAddr)> {
    let data = work.join("seed-data");
    let _ = std::fs::remove_dir_all(&data);
    let mut command = Command::new(pkgmesh);
    command
        .args(["seed", "--listen", "127.0.0.1:0", "--json", "--data"])
        .arg(&data)
        .arg("--identity")
        .arg(work.join("seed"));
    let seed = procs::Daemon::start(
        "the seed",
        command,
        &work.join("seed.log"),
        SEED_START_TIMEOUT,
    )?;
    let addr: SocketAddr = seed
        .ready_field("listening")?
        .parse()
        .context("the seed's `listening` is not an address")?;
    let mut publish = Command::new(pkgmesh);
    publish
        .args(["package", "publish", "--json", "--name", PACKAGE])
        .arg("--seed")
        .arg(addr.to_string())
        .arg("--identity")
        .arg(work.join("publisher"))
        .arg("--manifest")
        .arg(package.join("manifest.json"))
        .arg("--dir")
        .arg(package);
    procs::run_with_timeout("pkgmesh package publish", publish, SEED_START_TIMEOUT)?;
    Ok((seed, addr))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
enum Kind {
    Announce,
    GetPeers,
    GetManifest,
    Ping,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Announce => "announce",
            Kind::GetPeers => "get_peers",
            Kind::GetManifest => "get_manifest",
            Kind::Ping => "ping",
        }
    }
}

/// What the simulated nodes share: the blob, the seed, and the counters.
struct Shared {
    seed: SocketAddr,
    blob: BlobId,
    size: u64,
    chunks: u32,
    kinds: Vec<Kind>,
    errors: Mutex<ErrorLog>,
    reconnects: AtomicU64,
    late_starts: AtomicU64,
    /// Total peers named in GetPeers answers, to check the tracker answers with holders.
    peers_named: AtomicU64,
    empty_peer_answers: AtomicU64,
}

#[derive(Default)]
struct ErrorLog {
    by_kind: BTreeMap<String, u64>,
    /// The first message of each kind.
    samples: BTreeMap<String, String>,
}

impl Shared {
    fn error(&self, what: &str, message: String) {
        let mut log = self
            .errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *log.by_kind.entry(what.to_string()).or_default() += 1;
        log.samples.entry(what.to_string()).or_insert(message);
    }
}

/// One simulated node's state.
struct SimNode {
    index: usize,
    handle: quinn::Endpoint,
    conn: PeerConnection,
    held: Bitfield,
    rng: StdRng,
}

/// Per-type latencies in microseconds, merged from every node at the end.
type Latencies = BTreeMap<Kind, Vec<u32>>;

struct LoadResult {
    endpoints: usize,
    json: serde_json::Value,
}

async fn drive(
    args: &Args,
    seed: SocketAddr,
    seed_pid: u32,
    identities: Vec<Identity>,
) -> anyhow::Result<LoadResult> {
    transport::install_crypto_provider();
    let endpoint_count = if args.endpoints == 0 {
        args.nodes.div_ceil(1000).max(2)
    } else {
        args.endpoints
    }
    .min(args.nodes);
    let mut endpoints = Vec::with_capacity(endpoint_count);
    for _ in 0..endpoint_count {
        let bind: SocketAddr = "127.0.0.1:0".parse()?;
        endpoints.push(client_endpoint(bind)?);
    }

    // The blob to announce, as a node learns it: from the manifest.
    let first = dial(&endpoints[0], &identities[0], seed).await?;
    let (blob, size) = match request(&first, &manifest_request()).await? {
        Response::Manifest(reply) => {
            let file = reply
                .files
                .first()
                .context("the published manifest has no files")?;
            (file.blob, file.size)
        }
        other => bail!("GetManifest answered {other:?}"),
    };
    first.connection.close(0u32.into(), b"done");
    let chunks = ChunkLayout::for_size(size)?.chunk_count();
    let mut kinds = vec![Kind::Announce, Kind::GetPeers];
    if args.with_manifests {
        kinds.push(Kind::GetManifest);
    }
    if let Some(only) = args.only {
        kinds = vec![only];
    }
    let shared = Arc::new(Shared {
        seed,
        blob,
        size,
        chunks,
        kinds,
        errors: Mutex::new(ErrorLog::default()),
        reconnects: AtomicU64::new(0),
        late_starts: AtomicU64::new(0),
        peers_named: AtomicU64::new(0),
        empty_peer_answers: AtomicU64::new(0),
    });

    let sampler = RssSampler::start(seed_pid, Duration::from_secs(args.sample_s));
    let rss_before_connect = sampler.latest();

    // Connect the fleet and announce once, `connect_parallel` at a time.
    let connect_started = Instant::now();
    let identities = Arc::new(identities);
    let semaphore = Arc::new(tokio::sync::Semaphore::new(args.connect_parallel));
    let mut joins = Vec::with_capacity(args.nodes);
    for index in 0..args.nodes {
        let endpoint = endpoints[index % endpoint_count].clone();
        let identities = identities.clone();
        let shared = shared.clone();
        let semaphore = semaphore.clone();
        let seed_rng = args.seed;
        joins.push(tokio::spawn(async move {
            let _permit = semaphore.acquire_owned().await.ok();
            join_fleet(index, endpoint, &identities[index], &shared, seed_rng).await
        }));
    }
    let mut nodes = Vec::with_capacity(args.nodes);
    let mut connect_failures = 0u64;
    for join in joins {
        match tokio::time::timeout(SEED_START_TIMEOUT + REQUEST_TIMEOUT, join).await {
            Ok(Ok(Ok(node))) => nodes.push(node),
            Ok(Ok(Err(e))) => {
                connect_failures += 1;
                shared.error("connect", format!("{e:#}"));
            }
            Ok(Err(e)) => bail!("a node task failed: {e}"),
            Err(_) => bail!("a node did not connect within {SEED_START_TIMEOUT:?}"),
        }
    }
    let connect_s = connect_started.elapsed().as_secs_f64();
    if args.verbose {
        eprintln!(
            "tracker: {} nodes connected and announced in {connect_s:.1} s ({connect_failures} failed)",
            nodes.len()
        );
    }
    let rss_start = sampler.latest();
    let cpu_start = process_cpu_s(seed_pid);
    let self_cpu_start = self_cpu_s();

    // The load.
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let load_started = tokio::time::Instant::now();
    let end = load_started + Duration::from_secs(args.duration_s);
    let mut tasks = Vec::with_capacity(nodes.len());
    for mut node in nodes {
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move {
            let phase = Duration::from_secs_f64(node.rng.random::<f64>() * interval.as_secs_f64());
            let first = node.rng.random_range(0..shared.kinds.len());
            run_node(
                &mut node,
                &shared,
                load_started + phase,
                interval,
                end,
                first,
            )
            .await
        }));
    }
    let progress = if args.verbose {
        let shared = shared.clone();
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            tick.tick().await;
            loop {
                tick.tick().await;
                let errors: u64 = shared
                    .errors
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .by_kind
                    .values()
                    .sum();
                let first = shared
                    .errors
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .samples
                    .iter()
                    .filter(|(kind, _)| kind.as_str() != "connect")
                    .map(|(kind, message)| format!("[{kind}: {message}]"))
                    .collect::<Vec<_>>()
                    .join(" ");
                eprintln!(
                    "tracker: {:.0} s, errors {errors} {first}, late starts {}",
                    load_started.elapsed().as_secs_f64(),
                    shared.late_starts.load(Ordering::Relaxed)
                );
            }
        }))
    } else {
        None
    };
    let mut latencies: Latencies = BTreeMap::new();
    // A node stuck in a request or a redial gets this long past the end; then it is stopped and
    // counted, and the report goes out without its latencies.
    let drain = end + REQUEST_TIMEOUT * 3;
    let mut unfinished = 0u64;
    for mut task in tasks {
        let left = drain.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, &mut task).await {
            Ok(Ok(node_latencies)) => {
                for (kind, mut values) in node_latencies {
                    latencies.entry(kind).or_default().append(&mut values);
                }
            }
            Ok(Err(e)) => bail!("a node task failed: {e}"),
            Err(_) => {
                task.abort();
                unfinished += 1;
            }
        }
    }
    let load_s = load_started.elapsed().as_secs_f64();
    if let Some(progress) = progress {
        progress.abort();
    }
    let cpu_end = process_cpu_s(seed_pid);
    let self_cpu_end = self_cpu_s();
    let rss_end = sampler.latest();
    let hwm = sampler.hwm();
    let samples = sampler.stop();
    let client_ports: Vec<u16> = endpoints
        .iter()
        .filter_map(|endpoint| endpoint.local_addr().ok())
        .map(|addr| addr.port())
        .collect();
    let seed_socket_drops = udp_socket_drops(&[seed.port()]);
    let client_socket_drops = udp_socket_drops(&client_ports);
    for endpoint in &endpoints {
        endpoint.close(0u32.into(), b"bench over");
    }

    let total: usize = latencies.values().map(Vec::len).sum();
    let mut per_type = serde_json::Map::new();
    let mut all = Vec::with_capacity(total);
    for (kind, values) in &mut latencies {
        per_type.insert(kind.name().to_string(), latency_json(values, load_s));
        all.extend_from_slice(values);
    }
    let errors = shared
        .errors
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let error_total: u64 = errors.by_kind.values().sum();
    let peers_answers = latencies.get(&Kind::GetPeers).map_or(0, Vec::len) as f64;
    let json = serde_json::json!({
        "connected": args.nodes as u64 - connect_failures,
        "connect_s": round1(connect_s),
        "handshakes_per_s": round1((args.nodes as u64 - connect_failures) as f64 / connect_s),
        "requests": total,
        "rps": round1(total as f64 / load_s),
        "all": latency_json(&mut all, load_s),
        "types": per_type,
        "errors": error_total,
        "errors_by_kind": errors.by_kind,
        "error_samples": errors.samples,
        "reconnects": shared.reconnects.load(Ordering::Relaxed),
        "unfinished_nodes": unfinished,
        "late_starts": shared.late_starts.load(Ordering::Relaxed),
        "mean_peers_per_answer": round1(shared.peers_named.load(Ordering::Relaxed) as f64 / peers_answers.max(1.0)),
        "empty_peer_answers": shared.empty_peer_answers.load(Ordering::Relaxed),
        "seed_cpu_s": round1(cpu_end - cpu_start),
        "seed_socket_drops": seed_socket_drops,
        "client_socket_drops": client_socket_drops,
        "seed_cpu_per_s": round3((cpu_end - cpu_start) / load_s),
        // The seed's own cost of a request (CPU time, whatever the client or the machine's
        // other jobs add to the latency), and what each connection holds at the start.
        "seed_cpu_ms_per_request": round3((cpu_end - cpu_start) * 1000.0 / (total.max(1) as f64)),
        "seed_kib_per_connection": round1(
            rss_start.saturating_sub(rss_before_connect) as f64
                / (args.nodes as u64 - connect_failures).max(1) as f64
        ),
        "client_cpu_per_s": round3((self_cpu_end - self_cpu_start) / load_s),
        "seed_rss_mib": {
            "before_connect": mib(rss_before_connect),
            "start": mib(rss_start),
            "end": mib(rss_end),
            "peak": mib(hwm),
        },
        "seed_rss_samples_mib": samples.iter().map(|(t, kib)| serde_json::json!([round1(*t), mib(*kib)])).collect::<Vec<_>>(),
    });
    Ok(LoadResult {
        endpoints: endpoint_count,
        json,
    })
}

/// Bytes of socket buffer asked for on each client endpoint: a thousand connections' keep-alives
/// and answers overflow the kernel's default (about 200 KiB) whenever the process is not
/// scheduled for a few milliseconds, and a dropped datagram costs a retransmission timeout. The
/// kernel caps it at `net.core.rmem_max`/`wmem_max`.
const CLIENT_SOCKET_BUFFER: libc::c_int = 8 << 20;

/// A client endpoint on its own UDP socket with enlarged buffers.
fn client_endpoint(bind: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    use std::os::fd::AsRawFd;
    let socket = std::net::UdpSocket::bind(bind).context("binding a client UDP socket")?;
    // As root the FORCE options pass `net.core.rmem_max` (4 MiB on the bench machine), as the
    // seed's endpoint does; otherwise the plain ones, capped there.
    for (force, option) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        let set = |option: libc::c_int| {
            // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int and its
            // size.
            unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    (&CLIENT_SOCKET_BUFFER as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        if set(force) != 0 && set(option) != 0 {
            bail!(
                "setting a client socket buffer: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    let runtime = quinn::default_runtime().context("no async runtime for quinn")?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)
        .context("starting a client endpoint")
}

/// Dials the seed as node `identity` on a handle of the shared endpoint: the client certificate
/// belongs to the handle, so each node gets its own handle.
async fn dial(
    endpoint: &quinn::Endpoint,
    identity: &Identity,
    seed: SocketAddr,
) -> anyhow::Result<PeerConnection> {
    let mut handle = endpoint.clone();
    handle.set_default_client_config(transport::client_config(identity)?);
    Ok(transport::connect(&handle, seed, Role::Seed, REQUEST_TIMEOUT).await?)
}

async fn dial_handle(handle: &quinn::Endpoint, seed: SocketAddr) -> anyhow::Result<PeerConnection> {
    Ok(transport::connect(handle, seed, Role::Seed, REQUEST_TIMEOUT).await?)
}

async fn request(conn: &PeerConnection, request: &Request) -> anyhow::Result<Response> {
    let (response, _send, _recv) = transport::request(conn, request, REQUEST_TIMEOUT).await?;
    Ok(response)
}

fn manifest_request() -> Request {
    Request::GetManifest {
        name: PACKAGE.to_string(),
        version: None,
    }
}

/// Connects node `index` and announces a random part of the blob (at least one chunk, so every
/// node is a holder the tracker can name).
async fn join_fleet(
    index: usize,
    endpoint: quinn::Endpoint,
    identity: &Identity,
    shared: &Shared,
    seed: u64,
) -> anyhow::Result<SimNode> {
    let mut handle = endpoint.clone();
    handle.set_default_client_config(transport::client_config(identity)?);
    let conn = dial_handle(&handle, shared.seed).await?;
    let mut rng = StdRng::seed_from_u64(seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut held = Bitfield::new(shared.chunks)?;
    for chunk in 0..shared.chunks {
        if rng.random_bool(0.5) {
            held.set(chunk, true);
        }
    }
    held.set(rng.random_range(0..shared.chunks), true);
    let node = SimNode {
        index,
        handle,
        conn,
        held,
        rng,
    };
    match request(&node.conn, &announce(&node, shared)).await? {
        Response::Announced { .. } => Ok(node),
        other => {
            node.conn.connection.close(0u32.into(), b"refused");
            bail!("the first Announce was answered {other:?}")
        }
    }
}

fn announce(node: &SimNode, shared: &Shared) -> Request {
    Request::Announce(Announcement {
        listen: format!("127.0.0.1:{}", 20_000 + node.index),
        site: format!("site-{}", node.index % 4),
        tags: vec![("role".into(), "bench".into())],
        full: true,
        holdings: vec![Holding {
            blob: shared.blob,
            size: shared.size,
            chunks: node.held.clone(),
        }],
    })
}

/// One node's requests on its schedule until `end`; returns its latencies.
async fn run_node(
    node: &mut SimNode,
    shared: &Shared,
    first_slot: tokio::time::Instant,
    interval: Duration,
    end: tokio::time::Instant,
    first_kind: usize,
) -> Latencies {
    let mut latencies: Latencies = BTreeMap::new();
    let mut slot = first_slot;
    let mut turn = first_kind;
    while slot < end {
        tokio::time::sleep_until(slot).await;
        if tokio::time::Instant::now().saturating_duration_since(slot) > LATE_AFTER {
            shared.late_starts.fetch_add(1, Ordering::Relaxed);
        }
        let kind = shared.kinds[turn % shared.kinds.len()];
        turn += 1;
        slot += interval;
        let message = match kind {
            Kind::Announce => {
                // Progress: one more chunk held, until the node holds the whole blob.
                let missing: Vec<u32> = (0..shared.chunks).filter(|&c| !node.held.get(c)).collect();
                if !missing.is_empty() {
                    let pick = missing[node.rng.random_range(0..missing.len())];
                    node.held.set(pick, true);
                }
                announce(node, shared)
            }
            Kind::GetPeers => Request::GetPeers {
                blob: shared.blob,
                size: shared.size,
                max: PEERS_PER_ASK,
            },
            Kind::GetManifest => manifest_request(),
            Kind::Ping => Request::Ping {
                nonce: node.rng.random(),
            },
        };
        let sent = Instant::now();
        let result = transport::request(&node.conn, &message, REQUEST_TIMEOUT).await;
        let micros = u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX);
        match result {
            Ok((response, _send, _recv)) => match (kind, response) {
                (Kind::Announce, Response::Announced { .. })
                | (Kind::GetManifest, Response::Manifest(_))
                | (Kind::Ping, Response::Pong { .. }) => {
                    latencies.entry(kind).or_default().push(micros);
                }
                (Kind::GetPeers, Response::Peers(peers)) => {
                    latencies.entry(kind).or_default().push(micros);
                    if peers.is_empty() {
                        shared.empty_peer_answers.fetch_add(1, Ordering::Relaxed);
                    }
                    shared
                        .peers_named
                        .fetch_add(peers.len() as u64, Ordering::Relaxed);
                }
                (kind, other) => shared.error(kind.name(), format!("answered {other:?}")),
            },
            Err(e) => {
                let lost = e.is_connection_lost();
                shared.error(kind.name(), e.to_string());
                if lost && tokio::time::Instant::now() < end {
                    // A real node dials its seed again; so do we, counting it.
                    shared.reconnects.fetch_add(1, Ordering::Relaxed);
                    match dial_handle(&node.handle, shared.seed).await {
                        Ok(conn) => node.conn = conn,
                        Err(e) => shared.error("reconnect", format!("{e:#}")),
                    }
                }
            }
        }
    }
    node.conn.connection.close(0u32.into(), b"bench over");
    latencies
}

fn latency_json(values: &mut [u32], seconds: f64) -> serde_json::Value {
    values.sort_unstable();
    let ms = |q: f64| -> f64 {
        if values.is_empty() {
            return f64::NAN;
        }
        let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
        round3(f64::from(values[rank - 1]) / 1000.0)
    };
    serde_json::json!({
        "count": values.len(),
        "rps": round1(values.len() as f64 / seconds),
        "p50_ms": ms(0.50),
        "p99_ms": ms(0.99),
        "p999_ms": ms(0.999),
        "max_ms": ms(1.0),
    })
}

/// Samples a process's `VmRSS` on a thread until stopped; `VmHWM` gives the peak between
/// samples.
struct RssSampler {
    pid: u32,
    stop: Arc<AtomicBool>,
    latest_kib: Arc<AtomicU64>,
    samples: Arc<Mutex<Vec<(f64, u64)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32, every: Duration) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let latest_kib = Arc::new(AtomicU64::new(status_kib(pid, "VmRSS:").unwrap_or(0)));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, latest_kib, samples) = (stop.clone(), latest_kib.clone(), samples.clone());
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut next = started;
                while !stop.load(Ordering::Relaxed) {
                    if Instant::now() >= next {
                        if let Some(kib) = status_kib(pid, "VmRSS:") {
                            latest_kib.store(kib, Ordering::Relaxed);
                            samples
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .push((started.elapsed().as_secs_f64(), kib));
                        }
                        next += every;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        RssSampler {
            pid,
            stop,
            latest_kib,
            samples,
            thread: Some(thread),
        }
    }

    /// RSS now (read fresh, falling back to the last sample).
    fn latest(&self) -> u64 {
        status_kib(self.pid, "VmRSS:").unwrap_or_else(|| self.latest_kib.load(Ordering::Relaxed))
    }

    fn hwm(&self) -> u64 {
        status_kib(self.pid, "VmHWM:").unwrap_or(0)
    }

    fn stop(mut self) -> Vec<(f64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        std::mem::take(
            &mut *self
                .samples
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// A `kB` field of `/proc/<pid>/status`.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// User plus system CPU seconds of a process, from `/proc/<pid>/stat`.
fn process_cpu_s(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return f64::NAN;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

fn self_cpu_s() -> f64 {
    process_cpu_s(std::process::id())
}

/// Datagrams the kernel dropped on the UDP sockets bound to `ports` (the `drops` column of
/// `/proc/net/udp`), read while they are open: unlike `RcvbufErrors`, this tells the seed's
/// socket from the client's.
fn udp_socket_drops(ports: &[u16]) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/udp").ok()?;
    let mut drops = 0;
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let port = fields
            .get(1)
            .and_then(|local| local.rsplit_once(':'))
            .and_then(|(_, port)| u16::from_str_radix(port, 16).ok());
        if port.is_some_and(|port| ports.contains(&port)) {
            drops += fields.last()?.parse::<u64>().ok()?;
        }
    }
    Some(drops)
}

/// The host's count of UDP datagrams dropped for a full socket buffer (`RcvbufErrors` in
/// `/proc/net/snmp`): host-wide, so other processes' drops are included.
fn udp_rcvbuf_errors_now() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|line| line.starts_with("Udp:"));
    let names: Vec<&str> = udp.next()?.split_whitespace().collect();
    let values: Vec<&str> = udp.next()?.split_whitespace().collect();
    let at = names.iter().position(|name| *name == "RcvbufErrors")?;
    values.get(at)?.parse().ok()
}

fn count_in_file(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .map(|text| text.matches(needle).count())
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    round1(kib as f64 / 1024.0)
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
