//! `throughput`: one seed to one node on 127.0.0.1, no caps, against a plain quinn stream in the
//! same run (issue #8).
//!
//! ```text
//! cargo run --release -p pkgmesh-benches --bin throughput -- --size-mib 1024 --repeats 3
//! ```
//!
//! Builds a package of `--size-mib` MiB of random bytes (a ZIP stored with `zip -0`, a manifest
//! with `_any` platform keys), starts a real `pkgmesh seed` process, publishes the package with
//! `pkgmesh package publish`, and then alternates, `--repeats` times after one warm-up of each:
//!
//! - **pkgmesh**: a fresh `pkgmesh node` daemon (empty data directory) and
//!   `pkgmesh fetch NAME --node SOCKET --out FILE --json`, the path an operator takes: every
//!   chunk streamed from QUIC into the node's chunk cache and verified, then the blob streamed
//!   over the admin socket to the fetch process, which checks its SHA-256 and writes FILE. The
//!   time is the fetch process's, spawn to exit (the node is started before, untimed). The
//!   node's peak RSS is its `VmHWM` from /proc, read after the fetch and before it is stopped;
//!   a fresh node per run keeps one run's high-water mark out of the next.
//! - **quinn**: the same number of bytes on one bidirectional stream between two plain quinn
//!   endpoints built with pkgmesh's own `make_endpoint` (same rustls provider, mutual TLS with
//!   fleet certificates, same transport config), the server in a second process (this binary
//!   re-executed) as the seed is. The client takes the bytes with `read_chunk` and drops them:
//!   what QUIC alone can move here, the yardstick.
//!
//! Alternating the two and taking the ratio per round keeps the machine's drift (the cores are
//! shared) out of the ratio. Between runs the bench calls `sync()` (untimed) so one run's
//! writeback does not land in the next. The node's cache and the out file live under `--work`
//! (default a fresh directory in the system temp dir), so put it on the disk you mean to measure.
//!
//! Prints one JSON line: medians over the repeats (`peak_rss_mib` is the largest), and every
//! run's figures. CPU seconds (`node_cpu_s`, `seed_cpu_s`, `fetch_cpu_s`, and `quinn_cpu_s` for
//! client and server together) say where the work goes when the cores are shared.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use pkgmesh_node::pki::{self, Identity, Role};
use pkgmesh_node::transport;
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;
const PACKAGE: &str = "throughput";
/// Longest a daemon may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest one fetch may take: generous for 1 GiB on a loaded machine, but never a hang.
const FETCH_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(Parser, Debug)]
#[command(about = "Seed-to-node throughput of the real binary against a plain quinn stream")]
struct Args {
    /// Package size in MiB (the random payload inside the ZIP).
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Measured runs of each system, alternated (after one warm-up of each).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// The pkgmesh binary. Default: `pkgmesh` next to this binary, built first with
    /// `cargo build --release -p pkgmesh-cli` so it is never stale.
    #[arg(long)]
    pkgmesh: Option<PathBuf>,
    /// Do not run `cargo build` for the pkgmesh binary.
    #[arg(long)]
    no_build: bool,
    /// Working directory (package, seed data, node caches, out files). Default: a fresh
    /// directory in the system temp dir, removed at the end.
    #[arg(long)]
    work: Option<PathBuf>,
    /// Keep the working directory.
    #[arg(long)]
    keep: bool,
    /// Print each run to stderr as it finishes.
    #[arg(long)]
    verbose: bool,
    /// Before each measured fetch, print the node's pid to stderr and wait this many seconds
    /// (so `perf record -p PID` can attach to it).
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pause_for_profiler: u64,
    /// Internal: run the plain quinn server (identity directory), print its address, serve
    /// until stdin closes.
    #[arg(long, hide = true)]
    quinn_server: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match &args.quinn_server {
        Some(identity) => quinn_server(identity),
        None => run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("throughput: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// A child process with its ready line read, killed and reaped when dropped.
struct Daemon {
    child: Child,
    ready: String,
}

impl Daemon {
    /// Spawns `command` with stdout piped and waits (bounded) for its first line.
    fn spawn(mut command: Command, what: &str) -> anyhow::Result<Daemon> {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting the {what}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = mpsc::channel();
        // The reader keeps the pipe open after the first line, so a daemon that prints more
        // never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            let mut sink = String::new();
            while reader.read_line(&mut sink).is_ok_and(|n| n > 0) {
                sink.clear();
            }
        });
        let ready = match rx.recv_timeout(READY_TIMEOUT) {
            Ok(line) if !line.is_empty() => line,
            Ok(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the {what} exited before printing its ready line");
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the {what} printed no ready line within {} s",
                    READY_TIMEOUT.as_secs()
                );
            }
        };
        Ok(Daemon { child, ready })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The `listening` address from a `--json` ready line.
    fn listening(&self) -> anyhow::Result<String> {
        let ready: serde_json::Value = serde_json::from_str(self.ready.trim())
            .with_context(|| format!("the ready line is not JSON: {:?}", self.ready))?;
        Ok(ready["listening"]
            .as_str()
            .context("no `listening` in the ready line")?
            .to_string())
    }

    /// SIGTERM, then a bounded wait; SIGKILL if it does not exit.
    fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("throughput: a daemon ignored SIGTERM for 20 s; killing it");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

struct PkgmeshRun {
    wall_s: f64,
    fetch_s: f64,
    rss_mib: f64,
    node_cpu_s: f64,
    fetch_cpu_s: f64,
    seed_cpu_s: f64,
}

fn run(args: &Args) -> anyhow::Result<()> {
    if args.size_mib == 0 || args.repeats == 0 {
        bail!("--size-mib and --repeats must be at least 1");
    }
    let pkgmesh = pkgmesh_binary(args)?;
    let (work, remove_work) = match &args.work {
        Some(dir) => (dir.clone(), false),
        None => (
            std::env::temp_dir().join(format!("pkgmesh-throughput-{}", std::process::id())),
            !args.keep,
        ),
    };
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let result = measure(args, &pkgmesh, &work);
    if remove_work {
        let _ = std::fs::remove_dir_all(&work);
    }
    let line = result?;
    println!("{line}");
    Ok(())
}

fn measure(args: &Args, pkgmesh: &Path, work: &Path) -> anyhow::Result<serde_json::Value> {
    let size = args.size_mib * MIB;
    let ca = work.join("ca");
    if !ca.join("ca.pem").exists() {
        pki::init_ca(&ca, "throughput fleet")?;
    }
    for (name, role) in [
        ("seed", Role::Seed),
        ("publisher", Role::Publisher),
        ("node", Role::Node),
        ("quinn-server", Role::Node),
        ("quinn-client", Role::Node),
    ] {
        if !work.join(name).join("cert.pem").exists() {
            pki::issue(&ca, name, &[role], 2, &work.join(name))?;
        }
    }
    let package = work.join("package");
    let zip_bytes = build_package(&package, size)?;
    let seed = start_seed(pkgmesh, work, &package)?;
    let seed_addr = seed.listening()?;

    // The plain quinn server, in its own process as the seed is.
    let mut quinn_command = Command::new(std::env::current_exe()?);
    quinn_command
        .arg("--quinn-server")
        .arg(work.join("quinn-server"))
        .stdin(Stdio::piped());
    let mut quinn = Daemon::spawn(quinn_command, "quinn server")?;
    let quinn_addr: SocketAddr = quinn
        .ready
        .trim()
        .parse()
        .context("the quinn server's address")?;
    let runtime = tokio::runtime::Runtime::new()?;
    let client_identity = Identity::load(&work.join("quinn-client"))?;
    let client = runtime.block_on(async {
        transport::install_crypto_provider();
        transport::make_endpoint("127.0.0.1:0".parse()?, &client_identity)
            .map_err(anyhow::Error::from)
    })?;

    let mut runs = Vec::new();
    let mut quinn_runs = Vec::new();
    let mut quinn_cpu = Vec::new();
    for round in 0..=args.repeats {
        let warm_up = round == 0;
        let label = if warm_up { "warm-up" } else { "run" };
        let seed_before = process_cpu_s(seed.pid());
        let mut fetched = fetch_once(args, pkgmesh, work, &seed_addr, zip_bytes, warm_up)?;
        fetched.seed_cpu_s = process_cpu_s(seed.pid()) - seed_before;
        sync();
        if args.verbose {
            eprintln!(
                "{label} pkgmesh: wall {:.3} s ({:.0} MiB/s), fetch {:.3} s, node rss {:.1} MiB, cpu node {:.2} s, fetch {:.2} s, seed {:.2} s",
                fetched.wall_s,
                args.size_mib as f64 / fetched.wall_s,
                fetched.fetch_s,
                fetched.rss_mib,
                fetched.node_cpu_s,
                fetched.fetch_cpu_s,
                fetched.seed_cpu_s,
            );
        }
        if !warm_up {
            runs.push(fetched);
        }
        let cpu_before = self_cpu_s() + process_cpu_s(quinn.pid());
        let quinn_s = runtime.block_on(async {
            tokio::time::timeout(FETCH_TIMEOUT, quinn_once(&client, quinn_addr, size))
                .await
                .context("the plain quinn transfer timed out")?
        })?;
        let quinn_cpu_s = self_cpu_s() + process_cpu_s(quinn.pid()) - cpu_before;
        sync();
        if args.verbose {
            eprintln!(
                "{label} quinn: {quinn_s:.3} s ({:.0} MiB/s), cpu {quinn_cpu_s:.2} s",
                args.size_mib as f64 / quinn_s,
            );
        }
        if !warm_up {
            quinn_runs.push(quinn_s);
            quinn_cpu.push(quinn_cpu_s);
        }
    }
    client.close(0u32.into(), b"done");
    drop(quinn.child.stdin.take());
    runtime.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(5), client.wait_idle()).await;
    });
    quinn.stop();
    seed.stop();

    // Rates use the payload size for both systems (the ZIP adds a few hundred bytes); the ratio
    // is taken per round (each pkgmesh run against the quinn run of the same round), then the
    // median.
    let s = args.size_mib as f64;
    let wall = median(runs.iter().map(|r| r.wall_s));
    let quinn_s = median(quinn_runs.iter().copied());
    Ok(serde_json::json!({
        "system": "pkgmesh",
        "size_mib": args.size_mib,
        "repeats": args.repeats,
        "mib_per_s": round1(s / wall),
        "quinn_mib_per_s": round1(s / quinn_s),
        "ratio_vs_quinn": round3(median(runs.iter().zip(&quinn_runs).map(|(p, q)| q / p.wall_s))),
        "peak_rss_mib": round1(runs.iter().map(|r| r.rss_mib).fold(0.0, f64::max)),
        "wall_s": round3(wall),
        "fetch_s": round3(median(runs.iter().map(|r| r.fetch_s))),
        "quinn_s": round3(quinn_s),
        "node_cpu_s": round3(median(runs.iter().map(|r| r.node_cpu_s))),
        "fetch_cpu_s": round3(median(runs.iter().map(|r| r.fetch_cpu_s))),
        "seed_cpu_s": round3(median(runs.iter().map(|r| r.seed_cpu_s))),
        "quinn_cpu_s": round3(median(quinn_cpu.iter().copied())),
        "runs": {
            "wall_s": runs.iter().map(|r| round3(r.wall_s)).collect::<Vec<_>>(),
            "rss_mib": runs.iter().map(|r| round1(r.rss_mib)).collect::<Vec<_>>(),
            "quinn_s": quinn_runs.iter().map(|q| round3(*q)).collect::<Vec<_>>(),
        },
    }))
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// A `pkgmesh seed` process on a fresh data directory, holding the package.
fn start_seed(pkgmesh: &Path, work: &Path, package: &Path) -> anyhow::Result<Daemon> {
    let seed_data = work.join("seed-data");
    let _ = std::fs::remove_dir_all(&seed_data);
    let mut command = Command::new(pkgmesh);
    command
        .args(["seed", "--listen", "127.0.0.1:0", "--json", "--data"])
        .arg(&seed_data)
        .arg("--identity")
        .arg(work.join("seed"))
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    let seed = Daemon::spawn(command, "seed")?;
    let seed_addr = seed.listening()?;
    let published = Command::new(pkgmesh)
        .args(["package", "publish", "--json", "--name", PACKAGE])
        .args(["--seed", &seed_addr, "--identity"])
        .arg(work.join("publisher"))
        .arg("--manifest")
        .arg(package.join("manifest.json"))
        .arg("--dir")
        .arg(package)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .context("running pkgmesh package publish")?;
    if !published.success() {
        bail!("publish failed ({published})");
    }
    Ok(seed)
}

/// A fresh node daemon, then one `pkgmesh fetch --node SOCKET` through it, timed from the
/// fetch's spawn to its exit.
fn fetch_once(
    args: &Args,
    pkgmesh: &Path,
    work: &Path,
    seed: &str,
    zip_bytes: u64,
    warm_up: bool,
) -> anyhow::Result<PkgmeshRun> {
    let data = work.join("node-data");
    let _ = std::fs::remove_dir_all(&data);
    let mut command = Command::new(pkgmesh);
    command
        .args(["node", "--listen", "127.0.0.1:0", "--json", "--seed", seed])
        .arg("--data")
        .arg(&data)
        .arg("--identity")
        .arg(work.join("node"))
        .env_remove("RUST_LOG")
        .env_remove("PKGMESH_CONFIG")
        .stdin(Stdio::null());
    let node = Daemon::spawn(command, "node")?;
    let socket = data.join("admin.sock");
    if !socket.exists() {
        bail!("the node is ready but {} does not exist", socket.display());
    }
    if args.pause_for_profiler > 0 && !warm_up {
        eprintln!(
            "node pid {}: fetch starts in {} s",
            node.pid(),
            args.pause_for_profiler
        );
        std::thread::sleep(Duration::from_secs(args.pause_for_profiler));
    }
    let node_cpu_before = process_cpu_s(node.pid());
    let out = work.join("out.zip");
    let _ = std::fs::remove_file(&out);
    let stdout_path = work.join("fetch.json");
    let stdout = std::fs::File::create(&stdout_path)?;
    let started = Instant::now();
    let child = Command::new(pkgmesh)
        .args(["fetch", PACKAGE, "--json", "--node"])
        .arg(&socket)
        .arg("--out")
        .arg(&out)
        .env_remove("RUST_LOG")
        .env_remove("PKGMESH_SEED")
        .env_remove("PKGMESH_DATA")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting pkgmesh fetch")?;
    let (status, usage) = wait_bounded(child, FETCH_TIMEOUT)?;
    let wall_s = started.elapsed().as_secs_f64();
    let node_cpu_s = process_cpu_s(node.pid()) - node_cpu_before;
    let rss_mib = vm_hwm_mib(node.pid())?;
    node.stop();
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("pkgmesh fetch failed (wait status {status})");
    }
    let text = std::fs::read_to_string(&stdout_path)?;
    let report: serde_json::Value = serde_json::from_str(text.trim())
        .with_context(|| format!("fetch printed no JSON: {text:?}"))?;
    let fetch_s = report["seconds"]
        .as_f64()
        .context("no `seconds` in the fetch JSON")?;
    let got = std::fs::metadata(&out)?.len();
    if got != zip_bytes || report["state"] != "done" || report["via"] != "node" {
        bail!("fetch wrote {got} bytes of {zip_bytes}: {text}");
    }
    std::fs::remove_file(&out)?;
    std::fs::remove_dir_all(&data)?;
    let timeval = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(PkgmeshRun {
        wall_s,
        fetch_s,
        rss_mib,
        node_cpu_s,
        fetch_cpu_s: timeval(usage.ru_utime) + timeval(usage.ru_stime),
        seed_cpu_s: 0.0,
    })
}

/// The peak resident set of a running process (`VmHWM`), in MiB.
fn vm_hwm_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/PID/status")?;
    Ok(kib / 1024.0)
}

/// Waits for `child` (polling, so the wait is bounded; killed past `timeout`), returning its
/// wait status and resource usage.
fn wait_bounded(child: Child, timeout: Duration) -> anyhow::Result<(i32, libc::rusage)> {
    let pid = child.id() as libc::pid_t;
    let deadline = Instant::now() + timeout;
    let mut status = 0;
    // SAFETY: rusage is plain data; zeroed is a valid value and wait4 fills it in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: pid is our child, not yet reaped; status and usage are valid for writes.
        let got = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if got == pid {
            return Ok((status, usage));
        }
        if got < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() != std::io::ErrorKind::Interrupted {
                return Err(error).context("waiting for pkgmesh fetch");
            }
        }
        if Instant::now() > deadline {
            // SAFETY: as above; the child is ours and unreaped.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::wait4(pid, &mut status, 0, &mut usage);
            }
            bail!(
                "pkgmesh fetch did not finish within {} s",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The pkgmesh binary: given, or next to this one (rebuilt unless `--no-build`).
fn pkgmesh_binary(args: &Args) -> anyhow::Result<PathBuf> {
    if let Some(path) = &args.pkgmesh {
        return Ok(path.clone());
    }
    if !args.no_build {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--release", "--quiet", "-p", "pkgmesh-cli"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .status()
            .context("running cargo build --release -p pkgmesh-cli")?;
        if !status.success() {
            bail!("cargo build --release -p pkgmesh-cli failed");
        }
    }
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .context("this binary has no directory")?
        .join("pkgmesh");
    if !path.exists() {
        bail!(
            "no pkgmesh binary at {}: build it with `cargo build --release -p pkgmesh-cli` or pass --pkgmesh",
            path.display()
        );
    }
    Ok(path)
}

/// Writes `<dir>/throughput.zip` (install.sh, uninstall.sh and `size` random bytes, stored) and
/// `<dir>/manifest.json`. Returns the ZIP's size.
fn build_package(dir: &Path, size: u64) -> anyhow::Result<u64> {
    let src = dir.join("src");
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("install.sh"), "echo install\n")?;
    std::fs::write(src.join("uninstall.sh"), "echo uninstall\n")?;
    let mut payload = std::io::BufWriter::new(std::fs::File::create(src.join("payload.bin"))?);
    let mut rng = rand::rngs::StdRng::seed_from_u64(size);
    let mut buffer = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        let n = left.min(MIB) as usize;
        rng.fill_bytes(&mut buffer[..n]);
        payload.write_all(&buffer[..n])?;
        left -= n as u64;
    }
    payload.flush()?;
    drop(payload);
    let zip = dir.join(format!("{PACKAGE}.zip"));
    let status = Command::new("zip")
        .args(["-q", "-0", "-X", "-r"])
        .arg(&zip)
        .arg(".")
        .current_dir(&src)
        .status()
        .context("running the zip command")?;
    if !status.success() {
        bail!("zip failed ({status})");
    }
    std::fs::remove_dir_all(&src)?;
    let mut sha = Sha256::new();
    let mut file = std::fs::File::open(&zip)?;
    std::io::copy(&mut file, &mut sha)?;
    let manifest = serde_json::json!({
        "schemaVersion": "2.0",
        "version": "1.0.0",
        "packages": { "_any": { "_any": { "_any": { "file": format!("{PACKAGE}.zip") } } } },
        "files": { format!("{PACKAGE}.zip"): { "checksums": { "sha256": hex::encode(sha.finalize()) } } }
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string())?;
    Ok(std::fs::metadata(&zip)?.len())
}

/// User + system CPU seconds of a running process, from /proc (0 if unreadable).
fn process_cpu_s(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rfind(')').map(|at| &stat[at + 2..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz.max(1.0)
}

/// User + system CPU seconds of this process so far.
fn self_cpu_s() -> f64 {
    // SAFETY: rusage is plain data; zeroed is a valid value and getrusage fills it in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: usage is valid for writes.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let timeval = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    timeval(usage.ru_utime) + timeval(usage.ru_stime)
}

fn sync() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// One connection, one stream, `size` bytes from the server; seconds from dialling to the
/// last byte.
async fn quinn_once(
    client: &quinn::Endpoint,
    server: SocketAddr,
    size: u64,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let connection = client.connect(server, transport::SERVER_NAME)?.await?;
    let (mut send, mut recv) = connection.open_bi().await?;
    send.write_all(&size.to_be_bytes()).await?;
    send.finish()?;
    let mut got = 0u64;
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
        got += chunk.bytes.len() as u64;
    }
    let seconds = started.elapsed().as_secs_f64();
    connection.close(0u32.into(), b"done");
    if got != size {
        bail!("the quinn server sent {got} bytes of {size}");
    }
    Ok(seconds)
}

/// The plain quinn server: each stream asks for a byte count (u64 big-endian) and gets that many
/// bytes from a random 4 MiB buffer held in memory. Runs until stdin closes.
fn quinn_server(identity_dir: &Path) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        transport::install_crypto_provider();
        let identity = Identity::load(identity_dir)?;
        let endpoint = transport::make_endpoint("127.0.0.1:0".parse()?, &identity)?;
        println!("{}", endpoint.local_addr()?);
        std::io::stdout().flush()?;
        let mut block = vec![0u8; 4 * MIB as usize];
        rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut block);
        let block = Bytes::from(block);
        let stdin_closed = tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
        });
        let accept = async {
            while let Some(incoming) = endpoint.accept().await {
                let block = block.clone();
                tokio::spawn(async move {
                    let Ok(connection) = incoming.await else {
                        return;
                    };
                    while let Ok((mut send, mut recv)) = connection.accept_bi().await {
                        let block = block.clone();
                        tokio::spawn(async move {
                            let mut size = [0u8; 8];
                            if recv.read_exact(&mut size).await.is_err() {
                                return;
                            }
                            let mut left = u64::from_be_bytes(size);
                            while left > 0 {
                                let n = left.min(block.len() as u64) as usize;
                                if send.write_chunk(block.slice(..n)).await.is_err() {
                                    return;
                                }
                                left -= n as u64;
                            }
                            let _ = send.finish();
                            let _ = send.stopped().await;
                        });
                    }
                });
            }
        };
        tokio::select! {
            _ = accept => {}
            _ = stdin_closed => {}
        }
        endpoint.close(0u32.into(), b"bye");
        tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle())
            .await
            .ok();
        Ok(())
    })
}
