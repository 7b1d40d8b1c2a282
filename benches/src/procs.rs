//! Real `pkgmesh` processes for the process-level benchmarks: finding (and building) the
//! release binary, daemons that are killed when dropped, ready lines read with a deadline, a
//! random stored package, and the seed's Prometheus counters.
//!
//! Owns: starting and reading processes. Does not own: what a benchmark measures with them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context};
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;

/// The `pkgmesh` binary next to the running benchmark (both land in `target/release`), built
/// first unless `no_build`: a bench measuring a stale binary would report figures for code that
/// is no longer there.
pub fn pkgmesh_binary(given: Option<&Path>, no_build: bool) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        if !path.exists() {
            bail!("no pkgmesh binary at {}", path.display());
        }
        return Ok(path.to_path_buf());
    }
    if !no_build {
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

/// A daemon process: its first stdout line (the ready line) and a child that is killed and
/// reaped when dropped, so a failed benchmark leaves no process behind.
pub struct Daemon {
    pub name: String,
    pub child: Child,
    pub ready: serde_json::Value,
}

impl Daemon {
    /// Spawns `command` (stdout piped, stderr to `log`) and waits up to `timeout` for one JSON
    /// ready line. The rest of stdout is drained on a thread so a chatty daemon never blocks on
    /// a full pipe.
    pub fn start(
        name: &str,
        mut command: Command,
        log: &Path,
        timeout: Duration,
    ) -> anyhow::Result<Daemon> {
        let stderr = std::fs::File::create(log)
            .with_context(|| format!("creating the log file {}", log.display()))?;
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stdout = child.stdout.take().context("stdout is piped")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let mut daemon = Daemon {
            name: name.to_string(),
            child,
            ready: serde_json::Value::Null,
        };
        let line = match rx.recv_timeout(timeout) {
            Ok(line) => line,
            Err(_) => bail!(
                "{name} printed no ready line within {} s (log: {})",
                timeout.as_secs(),
                log.display()
            ),
        };
        if line.trim().is_empty() {
            bail!("{name} exited before it was ready (log: {})", log.display());
        }
        daemon.ready = serde_json::from_str(line.trim())
            .with_context(|| format!("{name}'s ready line is not JSON: {line:?}"))?;
        Ok(daemon)
    }

    /// A string field of the ready line, e.g. `listening`.
    pub fn ready_field(&self, field: &str) -> anyhow::Result<String> {
        self.ready[field]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("no `{field}` in {}'s ready line: {}", self.name, self.ready))
    }

    /// SIGTERM, then up to `grace` for a clean exit, then SIGKILL.
    pub fn stop(mut self, grace: Duration) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Drop kills and reaps.
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A package on disk: `<dir>/<name>.zip` (stored, not deflated, so its size is the payload's)
/// and `<dir>/manifest.json` with `_any` keys so every node picks the same file.
pub struct Package {
    pub dir: PathBuf,
    pub zip_bytes: u64,
    pub sha256: String,
}

/// Writes a package whose payload is `size_mib` MiB of random bytes from `seed` (random, so
/// nothing compresses and no two chunks are alike).
pub fn build_package(dir: &Path, name: &str, size_mib: u64, seed: u64) -> anyhow::Result<Package> {
    let src = dir.join("src");
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
    std::fs::write(src.join("install.sh"), "echo install\n")?;
    std::fs::write(src.join("uninstall.sh"), "echo uninstall\n")?;
    let mut payload = std::io::BufWriter::new(std::fs::File::create(src.join("payload.bin"))?);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut buffer = vec![0u8; MIB as usize];
    for _ in 0..size_mib {
        rng.fill_bytes(&mut buffer);
        payload.write_all(&buffer)?;
    }
    payload.flush()?;
    drop(payload);
    let file = format!("{name}.zip");
    let zip = dir.join(&file);
    let status = Command::new("zip")
        .args(["-q", "-0", "-X", "-r"])
        .arg(&zip)
        .arg(".")
        .current_dir(&src)
        .status()
        .context("running the zip command (is `zip` installed?)")?;
    if !status.success() {
        bail!("zip failed ({status})");
    }
    std::fs::remove_dir_all(&src)?;
    let mut sha = Sha256::new();
    std::io::copy(&mut std::fs::File::open(&zip)?, &mut sha)?;
    let sha256 = hex::encode(sha.finalize());
    let manifest = serde_json::json!({
        "schemaVersion": "2.0",
        "version": "1.0.0",
        "packages": { "_any": { "_any": { "_any": { "file": file } } } },
        "files": { file: { "checksums": { "sha256": sha256 } } }
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string())?;
    Ok(Package {
        dir: dir.to_path_buf(),
        zip_bytes: std::fs::metadata(&zip)?.len(),
        sha256,
    })
}

/// Runs `command` to completion with a deadline; its stdout, or an error with its stderr.
pub fn run_with_timeout(
    what: &str,
    mut command: Command,
    timeout: Duration,
) -> anyhow::Result<String> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {} s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The value of one unlabelled counter from a Prometheus `/metrics` endpoint.
pub fn metric(addr: SocketAddr, name: &str, timeout: Duration) -> anyhow::Result<f64> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to the metrics endpoint {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")?;
    let mut body = Vec::new();
    stream
        .take(16 * MIB)
        .read_to_end(&mut body)
        .with_context(|| format!("reading {addr}/metrics"))?;
    let text = String::from_utf8_lossy(&body);
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        if parts.next() == Some(name) {
            if let Some(value) = parts.next() {
                return value
                    .parse()
                    .with_context(|| format!("{name} is not a number: {line:?}"));
            }
        }
    }
    bail!("no {name} in {addr}/metrics")
}

/// The median of `values` (the mean of the middle two for an even count); 0 for none.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Rounds to three decimals, for JSON lines people read.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// User + system CPU seconds a process has used so far, from `/proc/PID/stat` (0 when it
/// cannot be read: the process is gone).
pub fn process_cpu_s(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name may hold spaces and parentheses: fields are counted after the last ')'.
    let Some(rest) = stat.rfind(')').map(|at| &stat[at + 1..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf has no memory-safety preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / per_second
}

/// The one-minute load average, from `/proc/loadavg` (how busy the shared machine was).
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}
