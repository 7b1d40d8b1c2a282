//! `swarm`: one seed and N nodes as separate processes of the real `pkgmesh` binary on
//! 127.0.0.1, every one capped at the same rate, all fetching one package at the same moment
//! (issue #8).
//!
//! ```text
//! cargo run --release -p pkgmesh-benches --bin swarm -- --nodes 16 --size-mib 32 --rate-mbit 32
//! ```
//!
//! The seed runs with `--upload-limit R` and each node with `--upload-limit R --download-limit
//! R` (their own token buckets on chunk payloads). The package is S MiB of random bytes stored
//! in a ZIP. Once every node is up and connected to the seed, the bench spawns one `pkgmesh
//! fetch --node SOCKET --json` per node in a burst, and times each from the burst to its exit
//! (which includes the node handing the verified ZIP back over its admin socket and the SHA-256
//! check: what an operator waits for).
//!
//! `ideal_s` is S ÷ R, the time one node needs at its own download rate: no node can beat it,
//! and with the seed capped at R too, the seed alone needs that long to send one copy, so the
//! swarm can only come close to it by relaying each chunk onwards as it arrives.
//! `origin_tx_ratio` is the chunk payload the seed sent (its `pkgmesh_seed_served_bytes`
//! counter, read from its Prometheus endpoint before and after) ÷ the package's size.
//!
//! Prints one JSON line. Process logs (stderr, with `--log` as RUST_LOG) stay in the working
//! directory with `--keep`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use pkgmesh_benches::procs::{self, median, round3, Daemon, Package};
use pkgmesh_node::pki::{self, Role};

const PACKAGE: &str = "swarm-bench";
/// The seed's counter of chunk payload bytes sent.
const SEED_SERVED: &str = "pkgmesh_seed_served_bytes_total";
const MIB: u64 = 1 << 20;
/// Longest a daemon may take to print its ready line or reach the seed.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest one short command (publish, status, transfers) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Parser, Debug)]
#[command(about = "N capped nodes (real processes) fetching one package at the same moment")]
struct Args {
    /// Number of nodes.
    #[arg(long, default_value_t = 16)]
    nodes: usize,
    /// Package size in MiB (random payload inside a stored ZIP).
    #[arg(long, default_value_t = 32)]
    size_mib: u64,
    /// Upload and download cap of every node, and upload cap of the seed, in Mbit/s (10^6
    /// bits per second).
    #[arg(long, default_value_t = 32)]
    rate_mbit: u64,
    /// Give up on fetches still running after this many seconds. Default: 10 × ideal, at
    /// least 60.
    #[arg(long)]
    timeout_s: Option<u64>,
    /// The pkgmesh binary. Default: `pkgmesh` next to this binary, built first with
    /// `cargo build --release -p pkgmesh-cli` so it is never stale.
    #[arg(long)]
    pkgmesh: Option<PathBuf>,
    /// Do not run `cargo build` for the pkgmesh binary.
    #[arg(long)]
    no_build: bool,
    /// Working directory (CA, package, seed and node data, logs). Default: a fresh directory
    /// in the system temp dir, removed at the end unless --keep.
    #[arg(long)]
    work: Option<PathBuf>,
    /// Keep the working directory (logs, caches, transfers snapshots).
    #[arg(long)]
    keep: bool,
    /// RUST_LOG for the seed and the nodes (their stderr goes to `<work>/logs/`).
    #[arg(long, default_value = "warn")]
    log: String,
    /// Seed of the package's random bytes.
    #[arg(long, default_value_t = 1)]
    random_seed: u64,
    /// Print each node's figures to stderr, and snapshot every node's transfers each second
    /// into `<work>/transfers.jsonl`.
    #[arg(long)]
    verbose: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("swarm: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<serde_json::Value> {
    if args.nodes == 0 || args.size_mib == 0 || args.rate_mbit == 0 {
        bail!("--nodes, --size-mib and --rate-mbit must be at least 1");
    }
    let pkgmesh = procs::pkgmesh_binary(args.pkgmesh.as_deref(), args.no_build)?;
    let (work, remove) = match &args.work {
        Some(dir) => (dir.clone(), false),
        None => (
            std::env::temp_dir().join(format!("pkgmesh-swarm-{}", std::process::id())),
            !args.keep,
        ),
    };
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("logs"))
        .with_context(|| format!("creating {}", work.display()))?;
    let result = measure(args, &pkgmesh, &work);
    if remove {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        eprintln!("swarm: working directory kept at {}", work.display());
    }
    result
}

/// One node's outcome.
struct Fetched {
    wall_s: f64,
    transfer_s: f64,
    from_seed: u64,
    from_peers: u64,
}

fn measure(args: &Args, pkgmesh: &Path, work: &Path) -> anyhow::Result<serde_json::Value> {
    let rate = format!("{}Mbit", args.rate_mbit);
    let rate_bytes_per_s = args.rate_mbit as f64 * 1e6 / 8.0;
    let ideal_s = (args.size_mib * MIB) as f64 / rate_bytes_per_s;
    let timeout = Duration::from_secs(
        args.timeout_s
            .unwrap_or_else(|| ((ideal_s * 10.0).ceil() as u64).max(60)),
    );

    let ca = work.join("ca");
    pki::init_ca(&ca, "swarm bench fleet")?;
    pki::issue(&ca, "seed", &[Role::Seed], 2, &work.join("id-seed"))?;
    pki::issue(
        &ca,
        "publisher",
        &[Role::Publisher],
        2,
        &work.join("id-pub"),
    )?;
    let names: Vec<String> = (0..args.nodes).map(|i| format!("node-{i:03}")).collect();
    for name in &names {
        pki::issue(
            &ca,
            name,
            &[Role::Node],
            2,
            &work.join(format!("id-{name}")),
        )?;
    }
    let package = procs::build_package(
        &work.join("package"),
        PACKAGE,
        args.size_mib,
        args.random_seed,
    )?;

    let mut seed_command = Command::new(pkgmesh);
    seed_command
        .args(["seed", "--listen", "127.0.0.1:0", "--json"])
        .args(["--metrics-listen", "127.0.0.1:0", "--upload-limit", &rate])
        .arg("--data")
        .arg(work.join("seed-data"))
        .arg("--identity")
        .arg(work.join("id-seed"))
        .env("RUST_LOG", &args.log);
    let seed = Daemon::start(
        "the seed",
        seed_command,
        &work.join("logs/seed.log"),
        START_TIMEOUT,
    )?;
    let seed_addr = seed.ready_field("listening")?;
    let metrics: SocketAddr = seed
        .ready_field("metrics")?
        .parse()
        .context("the seed's metrics address")?;
    publish(pkgmesh, work, &seed_addr, &package)?;

    let mut nodes = Vec::new();
    for name in &names {
        let mut command = Command::new(pkgmesh);
        command
            .args([
                "node",
                "--listen",
                "127.0.0.1:0",
                "--json",
                "--seed",
                &seed_addr,
            ])
            .args(["--upload-limit", &rate, "--download-limit", &rate])
            .args(["--platform", "ubuntu", "--platform-version", "22.04"])
            .arg("--data")
            .arg(work.join(format!("data-{name}")))
            .arg("--identity")
            .arg(work.join(format!("id-{name}")))
            .env("RUST_LOG", &args.log);
        nodes.push(Daemon::start(
            name,
            command,
            &work.join(format!("logs/{name}.log")),
            START_TIMEOUT,
        )?);
    }
    for name in &names {
        wait_for_seed(pkgmesh, &socket(work, name), name)?;
    }

    let pids: Vec<u32> = std::iter::once(&seed)
        .chain(&nodes)
        .map(|d| d.child.id())
        .collect();
    let load_before = procs::load_average();
    let cpu_before: f64 = pids.iter().map(|&pid| procs::process_cpu_s(pid)).sum();
    let served_before = procs::metric(metrics, SEED_SERVED, COMMAND_TIMEOUT)?;
    let fetched = fetch_all(args, pkgmesh, work, &names, &package, metrics, timeout)?;
    let served_after = procs::metric(metrics, SEED_SERVED, COMMAND_TIMEOUT)?;
    let cpu_s = pids
        .iter()
        .map(|&pid| procs::process_cpu_s(pid))
        .sum::<f64>()
        - cpu_before;
    let redirects = procs::metric(
        metrics,
        "pkgmesh_seed_admission_decisions_total{decision=\"redirected\"}",
        COMMAND_TIMEOUT,
    )
    .unwrap_or(f64::NAN);

    for node in nodes {
        node.stop(Duration::from_secs(5));
    }
    seed.stop(Duration::from_secs(5));

    let done: Vec<&Fetched> = fetched.iter().flatten().collect();
    let walls: Vec<f64> = done.iter().map(|f| f.wall_s).collect();
    let transfers: Vec<f64> = done.iter().map(|f| f.transfer_s).collect();
    let max_s = if done.len() == args.nodes {
        walls.iter().copied().fold(0.0, f64::max)
    } else {
        // A node that never finished took at least the timeout.
        timeout.as_secs_f64()
    };
    let seed_tx = served_after - served_before;
    let mut sorted = walls.clone();
    sorted.sort_by(f64::total_cmp);
    if args.verbose {
        for (name, got) in names.iter().zip(&fetched) {
            match got {
                Some(f) => eprintln!(
                    "{name}: {:.3} s wall, {:.3} s transfer, {:.2} MiB from the seed, {:.2} MiB from peers",
                    f.wall_s,
                    f.transfer_s,
                    f.from_seed as f64 / MIB as f64,
                    f.from_peers as f64 / MIB as f64
                ),
                None => eprintln!("{name}: did not finish"),
            }
        }
    }
    Ok(serde_json::json!({
        "system": "pkgmesh",
        "nodes": args.nodes,
        "done": done.len(),
        "size_mib": args.size_mib,
        "rate_mbit": args.rate_mbit,
        "ideal_s": round3(ideal_s),
        "p50_s": round3(median(&walls)),
        "max_s": round3(max_s),
        "max_vs_ideal": round3(max_s / ideal_s),
        "origin_tx_ratio": round3(seed_tx / package.zip_bytes as f64),
        "min_s": round3(sorted.first().copied().unwrap_or(0.0)),
        "transfer_p50_s": round3(median(&transfers)),
        "transfer_max_s": round3(transfers.iter().copied().fold(0.0, f64::max)),
        "seed_tx_bytes": seed_tx as u64,
        "package_bytes": package.zip_bytes,
        "seed_redirects": redirects,
        "cpu_s": round3(cpu_s),
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "load_average_before": load_before,
        "nodes_from_seed_mib": done
            .iter()
            .map(|f| round3(f.from_seed as f64 / MIB as f64))
            .collect::<Vec<_>>(),
        "wall_s": sorted.iter().map(|s| round3(*s)).collect::<Vec<_>>(),
    }))
}

fn socket(work: &Path, name: &str) -> PathBuf {
    work.join(format!("data-{name}")).join("admin.sock")
}

fn publish(pkgmesh: &Path, work: &Path, seed: &str, package: &Package) -> anyhow::Result<()> {
    let mut command = Command::new(pkgmesh);
    command
        .args([
            "package", "publish", "--json", "--name", PACKAGE, "--seed", seed,
        ])
        .arg("--identity")
        .arg(work.join("id-pub"))
        .arg("--manifest")
        .arg(package.dir.join("manifest.json"))
        .arg("--dir")
        .arg(&package.dir);
    procs::run_with_timeout("pkgmesh package publish", command, COMMAND_TIMEOUT)?;
    Ok(())
}

/// Polls the node's status until it has reached the seed, so the burst starts with every node
/// announced and able to ask.
fn wait_for_seed(pkgmesh: &Path, socket: &Path, name: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let mut command = Command::new(pkgmesh);
        command.args(["status", "--json", "--node"]).arg(socket);
        if let Ok(text) = procs::run_with_timeout("pkgmesh status", command, COMMAND_TIMEOUT) {
            let status: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_default();
            if status["seed_connected"] == true {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "{name} did not reach the seed within {} s",
                START_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Spawns every fetch in one burst and waits for all of them (up to `timeout`); `None` for a
/// node that failed or did not finish.
fn fetch_all(
    args: &Args,
    pkgmesh: &Path,
    work: &Path,
    names: &[String],
    package: &Package,
    metrics: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<Vec<Option<Fetched>>> {
    let outs = work.join("out");
    std::fs::create_dir_all(&outs)?;
    let mut commands = Vec::new();
    for name in names {
        let mut command = Command::new(pkgmesh);
        command
            .args(["fetch", PACKAGE, "--json", "--node"])
            .arg(socket(work, name))
            .arg("--out")
            .arg(outs.join(format!("{name}.zip")))
            .env_remove("PKGMESH_SEED")
            .env_remove("PKGMESH_DATA")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(outs.join(format!("{name}.json")))?)
            .stderr(std::fs::File::create(outs.join(format!("{name}.err")))?);
        commands.push(command);
    }
    let started = Instant::now();
    let mut children = Vec::new();
    for (name, command) in names.iter().zip(commands.iter_mut()) {
        children.push(
            command
                .spawn()
                .with_context(|| format!("starting the fetch of {name}"))?,
        );
    }
    let mut finished: Vec<Option<(f64, bool)>> = vec![None; names.len()];
    let mut next_snapshot = started;
    let snapshots = work.join("transfers.jsonl");
    loop {
        for (i, child) in children.iter_mut().enumerate() {
            if finished[i].is_none() {
                if let Some(status) = child.try_wait()? {
                    finished[i] = Some((started.elapsed().as_secs_f64(), status.success()));
                }
            }
        }
        if finished.iter().all(Option::is_some) || started.elapsed() > timeout {
            break;
        }
        if args.verbose && Instant::now() >= next_snapshot {
            snapshot(pkgmesh, work, names, started, metrics, &snapshots);
            next_snapshot += Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    for (i, child) in children.iter_mut().enumerate() {
        if finished[i].is_none() {
            eprintln!(
                "swarm: {} did not finish within {} s",
                names[i],
                timeout.as_secs()
            );
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    let mut results = Vec::new();
    for (name, finished) in names.iter().zip(finished) {
        let Some((wall_s, success)) = finished else {
            results.push(None);
            continue;
        };
        let text = std::fs::read_to_string(outs.join(format!("{name}.json"))).unwrap_or_default();
        let report: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_default();
        let size = std::fs::metadata(outs.join(format!("{name}.zip")))
            .map(|m| m.len())
            .unwrap_or(0);
        if !success
            || report["state"] != "done"
            || report["sha256"] != package.sha256.as_str()
            || size != package.zip_bytes
        {
            let error =
                std::fs::read_to_string(outs.join(format!("{name}.err"))).unwrap_or_default();
            eprintln!(
                "swarm: {name}'s fetch failed (wrote {size} of {} bytes): {} {}",
                package.zip_bytes,
                text.trim(),
                error.trim()
            );
            results.push(None);
            continue;
        }
        let field = |key: &str| report[key].as_u64().unwrap_or(0);
        results.push(Some(Fetched {
            wall_s,
            transfer_s: report["seconds"].as_f64().unwrap_or(f64::NAN),
            from_seed: field("bytes_from_seed"),
            from_peers: field("bytes_from_local_peers") + field("bytes_from_remote_peers"),
        }));
        let _ = std::fs::remove_file(outs.join(format!("{name}.zip")));
    }
    Ok(results)
}

/// Appends every node's transfers view (`pkgmesh transfers --json`) at this moment to `path`,
/// one JSON line per node (how far each node is and where its bytes came from, over time),
/// after one line with the seed's payload counter.
fn snapshot(
    pkgmesh: &Path,
    work: &Path,
    names: &[String],
    started: Instant,
    metrics: SocketAddr,
    path: &Path,
) {
    use std::io::Write;
    let at = started.elapsed().as_secs_f64();
    let served = procs::metric(metrics, SEED_SERVED, Duration::from_secs(5)).unwrap_or(f64::NAN);
    let mut lines =
        serde_json::json!({ "at_s": round3(at), "seed_served_bytes": served }).to_string();
    lines.push('\n');
    for name in names {
        let mut command = Command::new(pkgmesh);
        command
            .args(["transfers", "--json", "--node"])
            .arg(socket(work, name));
        let text = procs::run_with_timeout("pkgmesh transfers", command, Duration::from_secs(5))
            .unwrap_or_default();
        let transfers: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_default();
        lines.push_str(
            &serde_json::json!({ "at_s": round3(at), "node": name, "transfers": transfers })
                .to_string(),
        );
        lines.push('\n');
    }
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = file.write_all(lines.as_bytes());
    }
}
