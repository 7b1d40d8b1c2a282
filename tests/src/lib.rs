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
    Command::new(pkgmesh())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run pkgmesh")
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
    let status = Command::new("bash")
        .arg(workspace_root().join("examples/sample-package/build.sh"))
        .arg(dir)
        .arg(version)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run build.sh");
    assert!(status.success(), "examples/sample-package/build.sh failed");
    dir.join("manifest.json")
}
