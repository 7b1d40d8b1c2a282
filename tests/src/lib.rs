//! pkgmesh-tests: end-to-end tests that drive the real `pkgmesh` binary, real files and ZIPs
//! made by the `zip` command.
//!
//! Owns: helpers to build and locate the binary, build the sample package and run commands.
//! Does not own: unit tests, which live next to the code they test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The repository root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_path_buf()
}

/// The `pkgmesh` binary of the same profile as this test, built once per test process.
///
/// A test crate cannot depend on another package's binary, so it asks cargo to build it: a
/// no-op when it is fresh, and never a stale binary when it is not.
pub fn pkgmesh() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let exe = std::env::current_exe().expect("test binary path");
        // target/<profile>/deps/<test> → target/<profile>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in target/<profile>/deps");
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build.current_dir(workspace_root()).args([
            "build",
            "--quiet",
            "-p",
            "pkgmesh-cli",
            "--bin",
            "pkgmesh",
        ]);
        if release {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "cargo build of pkgmesh failed");
        let binary = profile_dir.join("pkgmesh");
        assert!(binary.exists(), "{} was not built", binary.display());
        binary
    })
}

/// Runs `pkgmesh ARGS` and returns its output.
pub fn run_pkgmesh<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let args: Vec<std::ffi::OsString> = args
        .into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect();
    let started = std::time::Instant::now();
    let output = Command::new(pkgmesh())
        .args(&args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run pkgmesh");
    if started.elapsed() > std::time::Duration::from_secs(2) {
        eprintln!("slow pkgmesh {:?}: {:?}", args, started.elapsed());
    }
    output
}

/// Parses the single JSON object a `--json` command prints.
pub fn stdout_json(output: &Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {text}\nstderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// Builds the sample multi-platform package with `examples/sample-package/build.sh` (which uses
/// the `zip` command) into `dir` and returns the manifest path.
pub fn build_sample_package(dir: &Path, version: &str) -> PathBuf {
    build_sample_package_sized(dir, version, 64)
}

/// [`build_sample_package`] with a payload of about `payload_kib` KiB of random text per ZIP.
pub fn build_sample_package_sized(dir: &Path, version: &str, payload_kib: u64) -> PathBuf {
    let status = Command::new("bash")
        .arg(workspace_root().join("examples/sample-package/build.sh"))
        .arg(dir)
        .arg(version)
        .arg(payload_kib.to_string())
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run build.sh");
    assert!(status.success(), "examples/sample-package/build.sh failed");
    dir.join("manifest.json")
}

/// A child process that is killed when the test lets go of it, pass or fail.
pub struct Daemon {
    pub child: std::process::Child,
    /// The first line the daemon printed on stdout (its ready line).
    pub ready_line: String,
    stdout: Option<std::io::BufReader<std::process::ChildStdout>>,
}

impl Daemon {
    /// Starts `pkgmesh ARGS` and waits (up to 60 s) for its first stdout line.
    pub fn start<I, S>(args: I) -> Daemon
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut command = Command::new(pkgmesh());
        command.args(args);
        Daemon::spawn(command)
    }

    /// Starts a prepared `pkgmesh` command as a daemon and waits for its ready line.
    pub fn spawn(mut command: Command) -> Daemon {
        use std::io::BufRead;
        let mut child = command
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start pkgmesh daemon");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = std::io::BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send((line, reader));
        });
        let (line, reader) = match rx.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(got) => got,
            Err(_) => {
                let _ = child.kill();
                panic!("daemon printed no ready line within 60 s");
            }
        };
        assert!(!line.is_empty(), "daemon exited before it was ready");
        Daemon {
            child,
            ready_line: line.trim().to_string(),
            stdout: Some(reader),
        }
    }

    /// The `listening` address of a daemon started with `--json`.
    pub fn listening(&self) -> String {
        let value: serde_json::Value = serde_json::from_str(&self.ready_line)
            .unwrap_or_else(|e| panic!("ready line is not JSON ({e}): {}", self.ready_line));
        value["listening"]
            .as_str()
            .expect("ready line names the listening address")
            .to_string()
    }

    /// Stops the daemon with SIGTERM and waits for it to exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let status = self.child.wait().expect("wait for daemon");
        self.stdout.take();
        status
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fleet CA with identities issued by the real `pkgmesh ca` commands.
pub struct Fleet {
    pub dir: PathBuf,
}

impl Fleet {
    pub fn new(dir: &Path) -> Fleet {
        let ca = dir.join("ca");
        let output = run_pkgmesh([
            "ca".as_ref(),
            "init".as_ref(),
            "--dir".as_ref(),
            ca.as_os_str(),
        ]);
        assert!(output.status.success(), "ca init: {output:?}");
        Fleet {
            dir: dir.to_path_buf(),
        }
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    /// Issues an identity named `name` with `roles` (comma-separated) and returns its directory.
    pub fn identity(&self, name: &str, roles: &str) -> PathBuf {
        let out = self.dir.join(format!("id-{name}"));
        let ca = self.ca_dir();
        let output = run_pkgmesh([
            "ca".as_ref(),
            "issue".as_ref(),
            "--dir".as_ref(),
            ca.as_os_str(),
            "--name".as_ref(),
            name.as_ref(),
            "--role".as_ref(),
            roles.as_ref(),
            "--out".as_ref(),
            out.as_os_str(),
        ]);
        assert!(output.status.success(), "ca issue {name}: {output:?}");
        out
    }
}
