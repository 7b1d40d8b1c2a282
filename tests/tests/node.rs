//! Nodes as separate processes of the real binary: fetching through a node's admin socket (in a
//! pipe and on a terminal), a node killed mid-download resuming, and nodes finishing from each
//! other after the seed stopped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use pkgmesh_tests::{build_sample_package_sized, pkgmesh, run_pkgmesh, stdout_json, Daemon, Fleet};
use sha2::{Digest, Sha256};

struct Mesh {
    work: tempfile::TempDir,
    fleet: Fleet,
    seed: Option<Daemon>,
    seed_addr: String,
    package: PathBuf,
}

impl Mesh {
    /// A seed with the sample package (payload of `payload_kib` per ZIP) published.
    fn start(payload_kib: u64) -> Mesh {
        let work = tempfile::tempdir().unwrap();
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
            "pkgmesh-sample".as_ref(),
            "--manifest".as_ref(),
            package.join("manifest.json").as_os_str(),
            "--dir".as_ref(),
            package.as_os_str(),
        ]);
        assert!(published.status.success(), "{}", stderr(&published));
        Mesh {
            work,
            fleet,
            seed: Some(seed),
            seed_addr,
            package,
        }
    }

    fn data(&self, name: &str) -> PathBuf {
        self.work.path().join(format!("data-{name}"))
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.data(name).join("admin.sock")
    }

    /// A node daemon named `name` on Ubuntu 22.04, with `extra` flags.
    fn node(&self, name: &str, extra: &[&str]) -> Daemon {
        let identity = self.work.path().join(format!("id-{name}"));
        if !identity.exists() {
            self.fleet.identity(name, "node");
        }
        let mut args: Vec<std::ffi::OsString> = vec![
            "node".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--seed".into(),
            self.seed_addr.clone().into(),
            "--data".into(),
            self.data(name).into(),
            "--identity".into(),
            identity.into(),
            "--platform".into(),
            "ubuntu".into(),
            "--platform-version".into(),
            "22.04".into(),
            "--json".into(),
        ];
        args.extend(extra.iter().map(|a| a.into()));
        Daemon::start(args)
    }

    fn out(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    /// `pkgmesh fetch` through node `name`'s admin socket, as a child process.
    fn fetch_command(&self, name: &str, out: &Path, json: bool) -> Command {
        let mut command = Command::new(pkgmesh());
        command
            .args(["fetch", "pkgmesh-sample", "--node"])
            .arg(self.socket(name))
            .arg("--out")
            .arg(out)
            .env_remove("PKGMESH_SEED")
            .env_remove("PKGMESH_DATA")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if json {
            command.arg("--json");
        }
        command
    }

    fn fetch(&self, name: &str, out: &Path) -> serde_json::Value {
        let output = self.fetch_command(name, out, true).output().unwrap();
        assert!(output.status.success(), "fetch: {}", stderr(&output));
        stdout_json(&output)
    }

    /// The ZIP the package has for Ubuntu 22.04 on this machine's architecture.
    fn expected_zip(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.package.join(file)).unwrap()
    }

    /// Polls node `name`'s transfers until one has at least `chunks` chunks held.
    fn wait_for_chunks(&self, name: &str, chunks: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let output = run_pkgmesh([
                "transfers".as_ref(),
                "--node".as_ref(),
                self.socket(name).as_os_str(),
                "--json".as_ref(),
            ]);
            if output.status.success() {
                let list = stdout_json(&output);
                if let Some(held) = list
                    .as_array()
                    .and_then(|l| l.first())
                    .and_then(|t| t["chunks_held"].as_u64())
                {
                    if held >= chunks {
                        return held;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "node {name} never held {chunks} chunks"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn has_control_characters(bytes: &[u8]) -> bool {
    bytes.iter().any(|&b| b == 0x1b || b == b'\r')
}

#[test]
fn fetch_through_the_admin_socket_in_a_pipe_and_on_a_terminal() {
    let mesh = Mesh::start(2048);
    let _node = mesh.node("node-a", &[]);

    // In a pipe: the summary line and nothing else, no control characters anywhere.
    let out = mesh.out("first.zip");
    let output = mesh.fetch_command("node-a", &out, false).output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        !has_control_characters(&output.stdout),
        "{:?}",
        output.stdout
    );
    assert!(
        !has_control_characters(&output.stderr),
        "{}",
        stderr(&output)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("pkgmesh-sample 1.0.0"), "{text}");

    // The JSON summary agrees with the file; a second fetch is served from the cache.
    let again = mesh.out("again.zip");
    let summary = mesh.fetch("node-a", &again);
    let file = summary["file"].as_str().unwrap().to_string();
    assert!(file.starts_with("sample-ubuntu-"), "{summary}");
    let expected = mesh.expected_zip(&file);
    assert_eq!(std::fs::read(&out).unwrap(), expected);
    assert_eq!(std::fs::read(&again).unwrap(), expected);
    assert_eq!(summary["sha256"], sha256_hex(&expected));
    assert_eq!(summary["via"], "node");
    assert_eq!(summary["size"], expected.len() as u64);
    assert_eq!(summary["chunks_already_held"], summary["chunks"]);
    assert_eq!(summary["bytes_from_seed"], 0);

    // The node's status and transfers agree.
    let status = run_pkgmesh([
        "status".as_ref(),
        "--node".as_ref(),
        mesh.socket("node-a").as_os_str(),
        "--json".as_ref(),
    ]);
    assert!(status.status.success(), "{}", stderr(&status));
    let status = stdout_json(&status);
    assert_eq!(status["node"], "node-a");
    assert_eq!(status["cache_blobs"], 1);
    assert_eq!(status["seed_connected"], true);
    assert_eq!(status["transfers_in_flight"], 0);

    // On a terminal (a pty from `script`): a progress bar is drawn.
    let _slow = mesh.node("node-b", &["--download-limit", "1MiB"]);
    let on_tty = mesh.out("tty.zip");
    let command = format!(
        "{} fetch pkgmesh-sample --node {} --out {}",
        pkgmesh().display(),
        mesh.socket("node-b").display(),
        on_tty.display()
    );
    let output = Command::new("script")
        .args(["-q", "-e", "-c", &command, "/dev/null"])
        .env_remove("PKGMESH_SEED")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let shown = String::from_utf8_lossy(&output.stdout);
    assert!(shown.contains('\u{1b}'), "no terminal drawing: {shown}");
    assert!(
        shown.contains("pkgmesh-sample 1.0.0 [") && shown.contains("from peers"),
        "no progress bar: {shown}"
    );
    assert_eq!(std::fs::read(&on_tty).unwrap(), expected);

    // Errors name what is wrong.
    let missing = Command::new(pkgmesh())
        .args(["fetch", "no-such-package", "--node"])
        .arg(mesh.socket("node-a"))
        .arg("--out")
        .arg(mesh.out("none.zip"))
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("not in the catalog"),
        "{}",
        stderr(&missing)
    );
    assert!(!mesh.out("none.zip").exists());
    let no_node = Command::new(pkgmesh())
        .args(["fetch", "pkgmesh-sample", "--node"])
        .arg(mesh.work.path().join("nowhere.sock"))
        .arg("--out")
        .arg(mesh.out("none.zip"))
        .output()
        .unwrap();
    assert_eq!(no_node.status.code(), Some(1));
    assert!(
        stderr(&no_node).contains("cannot reach the node's admin socket"),
        "{}",
        stderr(&no_node)
    );
}

#[test]
fn a_node_killed_mid_download_resumes_from_its_verified_chunks() {
    let mesh = Mesh::start(6144);
    let mut node = mesh.node("node-a", &["--download-limit", "1MiB"]);
    let out = mesh.out("resumed.zip");
    let mut first = mesh.fetch_command("node-a", &out, true).spawn().unwrap();
    let held_before_kill = mesh.wait_for_chunks("node-a", 6);

    node.child.kill().unwrap(); // SIGKILL
    node.child.wait().unwrap();
    let first = first.wait().unwrap();
    assert!(
        !first.success(),
        "the fetch cannot succeed without its node"
    );
    assert!(!out.exists());

    let _node = mesh.node("node-a", &[]);
    let summary = mesh.fetch("node-a", &out);
    let chunks = summary["chunks"].as_u64().unwrap();
    let already = summary["chunks_already_held"].as_u64().unwrap();
    assert!(
        already >= held_before_kill && already < chunks,
        "{already} chunks kept of {held_before_kill} seen verified: {summary}"
    );
    // Exactly the missing chunks crossed the network again: none it had verified.
    let size = summary["size"].as_u64().unwrap();
    let chunk_size = size.div_ceil(chunks).next_power_of_two();
    let last_chunk = size - chunk_size * (chunks - 1);
    let received = summary["bytes_from_seed"].as_u64().unwrap()
        + summary["bytes_from_peers"].as_u64().unwrap();
    let missing = chunks - already;
    assert!(
        received == missing * chunk_size || received == (missing - 1) * chunk_size + last_chunk,
        "received {received} bytes for {missing} missing chunks of {chunk_size}: {summary}"
    );
    let file = summary["file"].as_str().unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), mesh.expected_zip(file));
}

#[test]
fn nodes_finish_from_each_other_after_the_seed_stops() {
    let mut mesh = Mesh::start(3072);
    let _holder = mesh.node("node-a", &[]);
    let full = mesh.fetch("node-a", &mesh.out("a.zip"));
    let file = full["file"].as_str().unwrap().to_string();
    let expected = mesh.expected_zip(&file);

    let names = ["node-b", "node-c", "node-d"];
    let _nodes: Vec<Daemon> = names
        .iter()
        .map(|name| mesh.node(name, &["--download-limit", "512KiB"]))
        .collect();
    let fetches: Vec<_> = names
        .iter()
        .map(|name| {
            mesh.fetch_command(name, &mesh.out(&format!("{name}.zip")), true)
                .spawn()
                .unwrap()
        })
        .collect();
    for name in names {
        mesh.wait_for_chunks(name, 1);
    }
    let mut seed = mesh.seed.take().unwrap();
    seed.child.kill().unwrap(); // SIGKILL: no goodbye
    seed.child.wait().unwrap();

    for (name, fetch) in names.iter().zip(fetches) {
        let output = fetch.wait_with_output().unwrap();
        assert!(output.status.success(), "{name}: {}", stderr(&output));
        let summary = stdout_json(&output);
        assert_eq!(
            std::fs::read(mesh.out(&format!("{name}.zip"))).unwrap(),
            expected,
            "{name}"
        );
        assert_eq!(summary["bytes_from_seed"], 0, "{name}: {summary}");
    }

    // A node that never saw the manifest cannot start without the seed, and says why.
    let _late = mesh.node("node-e", &[]);
    let late = mesh
        .fetch_command("node-e", &mesh.out("e.zip"), false)
        .output()
        .unwrap();
    assert_eq!(late.status.code(), Some(1));
    assert!(stderr(&late).contains("seed"), "{}", stderr(&late));
}
