//! Fault injection with the real binary on 127.0.0.1: nodes SIGKILLed at random moments of a
//! fleet download and restarted, the seed SIGKILLed and restarted in the middle of a
//! deployment, the origin store gone while the fleet still holds some blobs, and a node's disk
//! filling up under a download (a tmpfs, as root).
//!
//! Randomness comes from one PRNG seeded per run; the seed is printed, and
//! `PKGMESH_FAULT_SEED=N` replays a run's kill schedule.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use pkgmesh_tests::{pkgmesh, run_pkgmesh, stdout_json, Daemon, Fleet};
use sha2::{Digest, Sha256};

/// The chunk size of every blob in this file (all are far below 512 MiB).
const CHUNK: u64 = 256 * 1024;

/// SplitMix64: a small deterministic generator, so a failing kill schedule can be replayed.
struct Rng(u64);

impl Rng {
    fn from_env(test: &str) -> Rng {
        let seed = std::env::var("PKGMESH_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(9)
            });
        eprintln!("{test}: PKGMESH_FAULT_SEED={seed}");
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn fill(&mut self, bytes: &mut [u8]) {
        for piece in bytes.chunks_mut(8) {
            let word = self.next().to_le_bytes();
            piece.copy_from_slice(&word[..piece.len()]);
        }
    }
}

/// A fleet CA, a seed process, and the packages and nodes a test adds.
struct Lab {
    work: tempfile::TempDir,
    fleet: Fleet,
    seed: Option<Daemon>,
    seed_addr: String,
    seed_args: Vec<String>,
    ops: PathBuf,
    /// Where the install scripts of every node leave their marks.
    shared: PathBuf,
}

const INSTALL: &str = r#"#!/bin/sh
set -eu
cmp -s payload.bin payload.bin
touch "$SHARED/installed-$NODE-$(cat VERSION)"
"#;

impl Lab {
    /// A seed started with `seed_extra` flags.
    fn start(seed_extra: &[&str]) -> Lab {
        let work = tempfile::tempdir().unwrap();
        let fleet = Fleet::new(work.path());
        let seed_id = fleet.identity("seed-1", "seed");
        let ops = fleet.identity("ops", "publisher,deployer,operator");
        let shared = work.path().join("shared");
        std::fs::create_dir_all(&shared).unwrap();
        let mut seed_args: Vec<String> = vec![
            "seed".into(),
            "--data".into(),
            work.path().join("seed-data").display().to_string(),
            "--identity".into(),
            seed_id.display().to_string(),
            "--json".into(),
        ];
        seed_args.extend(seed_extra.iter().map(|s| s.to_string()));
        let mut first = seed_args.clone();
        first.extend(["--listen".to_string(), "127.0.0.1:0".to_string()]);
        let seed = Daemon::start(&first);
        let seed_addr = seed.listening();
        Lab {
            work,
            fleet,
            seed: Some(seed),
            seed_addr,
            seed_args,
            ops,
            shared,
        }
    }

    /// SIGKILLs the seed: no goodbye to anyone, nothing flushed that was not already.
    fn kill_seed(&mut self) {
        let mut seed = self.seed.take().expect("the seed is running");
        seed.child.kill().unwrap();
        seed.child.wait().unwrap();
    }

    /// Starts the seed again on the same address, data and identity.
    fn restart_seed(&mut self) {
        assert!(self.seed.is_none(), "the seed is still running");
        let mut args = self.seed_args.clone();
        args.extend(["--listen".to_string(), self.seed_addr.clone()]);
        let seed = Daemon::start(&args);
        assert_eq!(seed.listening(), self.seed_addr, "the seed moved");
        self.seed = Some(seed);
    }

    /// Publishes `name` `version`: one ZIP for every platform, holding `payload` (random
    /// bytes, so the ZIP is about as large), the install script and a VERSION file. Returns
    /// the ZIP's bytes.
    fn publish(&self, name: &str, version: &str, payload: &[u8]) -> Vec<u8> {
        let dir = self.work.path().join(format!("pkg-{name}-{version}"));
        let src = dir.join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("install.sh"), INSTALL).unwrap();
        std::fs::write(src.join("uninstall.sh"), "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::write(src.join("VERSION"), version).unwrap();
        std::fs::write(src.join("payload.bin"), payload).unwrap();
        let zip = dir.join(format!("{name}.zip"));
        let status = Command::new("zip")
            .args(["-q", "-X", "-r"])
            .arg(&zip)
            .arg(".")
            .current_dir(&src)
            .status()
            .expect("the zip command");
        assert!(status.success(), "zip failed");
        let bytes = std::fs::read(&zip).unwrap();
        let manifest = serde_json::json!({
            "schemaVersion": "2.0",
            "version": version,
            "packages": { "_any": { "_any": { "_any": { "file": format!("{name}.zip") } } } },
            "files": { format!("{name}.zip"): { "checksums": { "sha256": sha256_hex(&bytes) } } }
        });
        std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
        let output = self.seed_command(&[
            "package",
            "publish",
            "--name",
            name,
            "--manifest",
            dir.join("manifest.json").to_str().unwrap(),
            "--dir",
            dir.to_str().unwrap(),
        ]);
        assert!(output.status.success(), "publish: {}", stderr(&output));
        bytes
    }

    /// `pkgmesh ARGS --seed SEED --identity OPS`.
    fn seed_command(&self, args: &[&str]) -> Output {
        Command::new(pkgmesh())
            .args(args)
            .arg("--seed")
            .arg(&self.seed_addr)
            .arg("--identity")
            .arg(&self.ops)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    }

    fn data(&self, name: &str) -> PathBuf {
        self.work.path().join(format!("data-{name}"))
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.data(name).join("admin.sock")
    }

    fn out(&self, file: &str) -> PathBuf {
        self.work.path().join(file)
    }

    /// A node daemon `name` (Ubuntu 22.04), its identity issued on first use.
    fn node(&self, name: &str, extra: &[&str]) -> Daemon {
        let identity = self.work.path().join(format!("id-{name}"));
        if !identity.exists() {
            self.fleet.identity(name, "node");
        }
        let mut command = Command::new(pkgmesh());
        command
            .args(["node", "--listen", "127.0.0.1:0", "--seed", &self.seed_addr])
            .arg("--data")
            .arg(self.data(name))
            .arg("--identity")
            .arg(&identity)
            .args([
                "--platform",
                "ubuntu",
                "--platform-version",
                "22.04",
                "--json",
            ])
            .args(extra)
            .env("NODE", name)
            .env("SHARED", &self.shared);
        Daemon::spawn(command)
    }

    /// `pkgmesh fetch PACKAGE --node <name's socket> --out OUT --json`, started.
    fn spawn_fetch(&self, node: &str, package: &str, out: &Path) -> Child {
        Command::new(pkgmesh())
            .args(["fetch", package, "--json", "--node"])
            .arg(self.socket(node))
            .arg("--out")
            .arg(out)
            .env_remove("PKGMESH_SEED")
            .env_remove("PKGMESH_DATA")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// A fetch through node `node` that must succeed: its JSON summary.
    fn fetch(&self, node: &str, package: &str, out: &Path) -> serde_json::Value {
        let child = self.spawn_fetch(node, package, out);
        let output = finish(child, &format!("fetch of {package} by {node}"), 60);
        assert!(
            output.status.success(),
            "fetch of {package} by {node}: {}",
            stderr(&output)
        );
        stdout_json(&output)
    }

    /// `pkgmesh COMMAND --node <name's socket> --json`, which must succeed.
    fn ask(&self, node: &str, command: &[&str]) -> serde_json::Value {
        let output = self.ask_raw(node, command);
        assert!(
            output.status.success(),
            "{command:?} on {node}: {}",
            stderr(&output)
        );
        stdout_json(&output)
    }

    fn ask_raw(&self, node: &str, command: &[&str]) -> Output {
        let mut args: Vec<std::ffi::OsString> = command.iter().map(|a| a.into()).collect();
        args.push("--node".into());
        args.push(self.socket(node).into());
        args.push("--json".into());
        run_pkgmesh(args)
    }

    /// The node's one transfer in flight, if it has one and answers.
    fn transfer(&self, node: &str) -> Option<serde_json::Value> {
        let output = self.ask_raw(node, &["transfers"]);
        if !output.status.success() {
            return None;
        }
        stdout_json(&output)
            .as_array()
            .and_then(|list| list.first().cloned())
    }

    /// Re-hashes every chunk node `node` holds: none may be bad. Returns the chunks checked.
    fn verify_cache(&self, node: &str) -> u64 {
        let output = self.ask_raw(node, &["cache", "verify"]);
        assert!(
            output.status.success(),
            "cache verify on {node}: {}\n{}",
            stderr(&output),
            String::from_utf8_lossy(&output.stdout)
        );
        let report = stdout_json(&output);
        assert_eq!(
            report["rotted"].as_array().map(Vec::len),
            Some(0),
            "{node}: {report}"
        );
        report["chunks_checked"].as_u64().unwrap()
    }

    /// Polls `deploy status ID --json` until `done` holds (90 s at most).
    fn wait_for_deployment(
        &self,
        id: u64,
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let output = self.seed_command(&["deploy", "status", &id.to_string(), "--json"]);
            assert!(output.status.success(), "{}", stderr(&output));
            let status = stdout_json(&output);
            if done(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "deployment {id} never reached {what}: {status:#}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Waits for `child` (up to `secs`), killing it and failing the test if it does not end.
fn finish(child: Child, what: &str, secs: u64) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(output) => output.expect("wait for a pkgmesh command"),
        Err(_) => {
            // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
            panic!("{what} did not end within {secs} s");
        }
    }
}

/// Payload bytes of the chunks a blob of `size` bytes lacks, `missing` of `chunks`, when the
/// last chunk is or is not among them: the only two amounts an exact download may total.
fn exact_amounts(size: u64, chunks: u64, missing: u64) -> [u64; 2] {
    let last = size - CHUNK * (chunks - 1);
    let without_last = missing * CHUNK;
    let with_last = missing.saturating_sub(1) * CHUNK + if missing > 0 { last } else { 0 };
    [without_last, with_last]
}

/// What one life of a node showed just before it was killed.
#[derive(Debug, Clone, Copy)]
struct Snapshot {
    already: u64,
    held: u64,
    received: u64,
}

fn snapshot(transfer: &serde_json::Value) -> Snapshot {
    let n = |k: &str| transfer[k].as_u64().unwrap_or(0);
    Snapshot {
        already: n("chunks_already_held"),
        held: n("chunks_held"),
        received: n("bytes_from_seed") + n("bytes_from_local_peers") + n("bytes_from_remote_peers"),
    }
}

/// What one node went through in the kill test.
#[derive(Debug, Default)]
struct KillFigures {
    kills: u64,
    /// Chunks the node had verified when it was killed, summed over its kills.
    chunks_held_at_kills: u64,
    /// Chunks it found in its cache at restarts, summed (never fewer than the line above).
    chunks_kept_at_restarts: u64,
    duplicate_bytes: u64,
}

#[test]
fn nodes_killed_at_random_moments_finish_with_the_right_bytes_and_refetch_nothing_verified() {
    let mut rng = Rng::from_env("kills");
    let lab = Lab::start(&[]);
    let mut payload = vec![0u8; 3 * 1024 * 1024];
    rng.fill(&mut payload);
    let zip = lab.publish("fleetpkg", "1.0.0", &payload);
    let size = zip.len() as u64;
    let chunks = size.div_ceil(CHUNK);

    let names: Vec<String> = (1..=6).map(|i| format!("node-{i}")).collect();
    for name in &names {
        // Issued one at a time: `ca issue` runs are not meant to race on one CA directory.
        lab.fleet.identity(name, "node");
    }
    let schedules: Vec<(Vec<u64>, u64)> = names
        .iter()
        .map(|_| {
            let kills = rng.between(2, 3);
            let delays = (0..kills).map(|_| rng.between(100, 1500)).collect();
            (delays, rng.next())
        })
        .collect();
    let limit = ["--download-limit", "1MiB"];

    let figures: Vec<KillFigures> = std::thread::scope(|scope| {
        let workers: Vec<_> = names
            .iter()
            .zip(&schedules)
            .map(|(name, (delays, _))| {
                let lab = &lab;
                let zip = &zip;
                scope.spawn(move || {
                    let mut figures = KillFigures::default();
                    let out = lab.out(&format!("{name}.zip"));
                    // What the previous life had verified, seen just before it was killed.
                    let mut verified_before: Option<Snapshot> = None;
                    for (life, delay) in delays.iter().enumerate() {
                        let mut node = lab.node(name, &limit);
                        let fetch = lab.spawn_fetch(name, "fleetpkg", &out);
                        std::thread::sleep(Duration::from_millis(*delay));
                        let seen = lab.transfer(name).map(|t| snapshot(&t));
                        node.child.kill().unwrap(); // SIGKILL, at whatever it was doing
                        node.child.wait().unwrap();
                        figures.kills += 1;
                        let ended = finish(fetch, &format!("{name}'s killed fetch"), 30);
                        if let Some(seen) = seen {
                            if let Some(before) = verified_before {
                                assert!(
                                    seen.already >= before.held,
                                    "{name} life {life}: restarted with {} chunks after \
                                     {} were verified",
                                    seen.already,
                                    before.held
                                );
                            }
                            figures.chunks_kept_at_restarts += seen.already;
                            figures.chunks_held_at_kills += seen.held;
                            // In flight, a life counts exactly the chunks it verified itself.
                            let amounts = exact_amounts(size, chunks, seen.held - seen.already);
                            assert!(
                                amounts.contains(&seen.received),
                                "{name} life {life}: {} bytes for {} new chunks",
                                seen.received,
                                seen.held - seen.already
                            );
                            verified_before = Some(seen);
                        } else if ended.status.success() {
                            // It finished before the kill: everything is verified.
                            verified_before = Some(Snapshot {
                                already: chunks,
                                held: chunks,
                                received: 0,
                            });
                        }
                    }

                    // The last life runs to the end.
                    let _node = lab.node(name, &limit);
                    let summary = lab.fetch(name, "fleetpkg", &out);
                    assert_eq!(&std::fs::read(&out).unwrap(), zip, "{name}: wrong bytes");
                    assert_eq!(summary["chunks"], chunks, "{summary}");
                    let already = summary["chunks_already_held"].as_u64().unwrap();
                    if let Some(before) = verified_before {
                        assert!(
                            already >= before.held,
                            "{name}: restarted with {already} chunks after {} were verified",
                            before.held
                        );
                    }
                    figures.chunks_kept_at_restarts += already;
                    // No chunk it had verified crossed the network again: exactly the chunks
                    // it lacked at this start were received (endgame copies are counted apart).
                    let received = summary["bytes_from_seed"].as_u64().unwrap()
                        + summary["bytes_from_peers"].as_u64().unwrap();
                    assert!(
                        exact_amounts(size, chunks, chunks - already).contains(&received),
                        "{name}: received {received} bytes for {} missing chunks: {summary}",
                        chunks - already
                    );
                    let stats = lab.ask(name, &["cache", "stats"]);
                    figures.duplicate_bytes = stats["duplicate_bytes"].as_u64().unwrap();
                    // Duplicates come only from endgame (at most the last 16 chunks, 3 asks
                    // each) and each is a verified copy, never stored twice.
                    assert!(figures.duplicate_bytes <= 2 * 16 * CHUNK, "{name}: {stats}");
                    assert_eq!(lab.verify_cache(name), chunks, "{name}");
                    figures
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });

    let kills: u64 = figures.iter().map(|f| f.kills).sum();
    let held: u64 = figures.iter().map(|f| f.chunks_held_at_kills).sum();
    let kept: u64 = figures.iter().map(|f| f.chunks_kept_at_restarts).sum();
    let duplicates: u64 = figures.iter().map(|f| f.duplicate_bytes).sum();
    eprintln!(
        "kills: {kills} SIGKILLs over 6 nodes, {chunks} chunks of {size} bytes; {held} chunks \
         verified at the kills, {kept} found again at the restarts; {duplicates} endgame \
         duplicate bytes; all 6 complete with the right bytes, cache verify clean"
    );
    assert!(kills >= 12);
}

/// Sums `chunks_held` over the nodes' transfers in flight (nodes with none count 0).
fn chunks_held(lab: &Lab, names: &[&str]) -> Vec<u64> {
    names
        .iter()
        .map(|name| {
            lab.transfer(name)
                .and_then(|t| t["chunks_held"].as_u64())
                .unwrap_or(0)
        })
        .collect()
}

fn node_states(status: &serde_json::Value) -> Vec<(String, String)> {
    status["nodes"]
        .as_object()
        .map(|nodes| {
            nodes
                .iter()
                .map(|(name, s)| (name.clone(), s["state"].as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_seed_killed_mid_deployment_comes_back_and_the_deployment_finishes() {
    let mut rng = Rng::from_env("seed-restart");
    let mut lab = Lab::start(&[]);
    let mut payload = vec![0u8; 3 * 1024 * 1024];
    rng.fill(&mut payload);
    let zip = lab.publish("webpkg", "1.0.0", &payload);
    let size = zip.len() as u64;
    let chunks = size.div_ceil(CHUNK);
    let names = ["web-1", "web-2", "web-3", "web-4"];
    let _nodes: Vec<Daemon> = names
        .iter()
        .map(|name| lab.node(name, &["--download-limit", "512KiB", "--tag", "role=web"]))
        .collect();

    let created = lab.seed_command(&[
        "deploy",
        "create",
        "--package",
        "webpkg",
        "--version",
        "1.0.0",
        "--target",
        "tag:role=web",
        "--max-concurrency",
        "100%",
        "--json",
    ]);
    assert!(created.status.success(), "{}", stderr(&created));
    let id = stdout_json(&created)["id"].as_u64().unwrap();

    // Every node is downloading when the seed dies.
    let deadline = Instant::now() + Duration::from_secs(60);
    let at_kill = loop {
        let held = chunks_held(&lab, &names);
        if held.iter().all(|&h| h >= 1) {
            break held;
        }
        assert!(
            Instant::now() < deadline,
            "the nodes never all started downloading: {held:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    lab.kill_seed();
    let killed_at: u64 = at_kill.iter().sum();
    assert!(
        killed_at < chunks * names.len() as u64,
        "the download was over before the seed was killed: {at_kill:?}"
    );

    // With no seed, the nodes keep taking chunks from each other.
    let deadline = Instant::now() + Duration::from_secs(30);
    let while_down = loop {
        let held = chunks_held(&lab, &names);
        if held.iter().sum::<u64>() > killed_at {
            break held;
        }
        assert!(
            Instant::now() < deadline,
            "no node verified a chunk while the seed was down: {held:?} (at the kill {at_kill:?})"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_millis(rng.between(200, 1500)));
    lab.restart_seed();

    let status = lab.wait_for_deployment(id, "4 nodes succeeded", |s| {
        let states = node_states(s);
        states.len() == names.len() && states.iter().all(|(_, state)| state == "succeeded")
    });
    assert_eq!(status["state"], "active", "{status:#}");
    for name in names {
        let node = &status["nodes"][name];
        assert_eq!(node["version"], "1.0.0", "{name}: {node}");
        assert_eq!(node["exit_code"], 0, "{name}: {node}");
        assert!(
            lab.shared.join(format!("installed-{name}-1.0.0")).exists(),
            "{name} never ran its install script"
        );
        // Each node's one download went on where it was: every chunk crossed the network once.
        let stats = lab.ask(name, &["cache", "stats"]);
        let received = stats["bytes_from_seed"].as_u64().unwrap()
            + stats["bytes_from_peers"].as_u64().unwrap();
        assert_eq!(received, size, "{name}: {stats}");
        assert_eq!(lab.verify_cache(name), chunks, "{name}");
    }
    eprintln!(
        "seed-restart: seed SIGKILLed with {killed_at} of {} chunks held ({at_kill:?}); \
         {while_down:?} while it was down; deployment {id} finished with 4 of 4 succeeded",
        chunks * names.len() as u64
    );
}

#[test]
fn with_the_origin_gone_nodes_finish_from_peers_and_fail_clearly_where_nobody_holds_the_chunks() {
    let mut rng = Rng::from_env("origin-down");
    // A seed cache far smaller than a blob: it holds at most a chunk or two of its own, so with
    // the origin gone it cannot serve what the fleet lacks.
    let lab = Lab::start(&["--cache-budget", "512KiB"]);
    let mut payload = vec![0u8; 2 * 1024 * 1024];
    rng.fill(&mut payload);
    let alpha = lab.publish("alpha", "1.0.0", &payload);
    rng.fill(&mut payload);
    lab.publish("beta", "1.0.0", &payload);

    let _holder = lab.node("holder", &[]);
    let held = lab.fetch("holder", "alpha", &lab.out("holder-alpha.zip"));
    assert_eq!(held["chunks_already_held"], 0, "{held}");

    // The origin store goes away under the running seed.
    let origin = lab.work.path().join("seed-data").join("origin");
    assert!(origin.is_dir(), "no origin at {}", origin.display());
    std::fs::remove_dir_all(&origin).unwrap();

    let _late = lab.node("late", &[]);
    let out = lab.out("late-alpha.zip");
    let summary = lab.fetch("late", "alpha", &out);
    assert_eq!(std::fs::read(&out).unwrap(), alpha);
    assert_eq!(summary["bytes_from_seed"], 0, "{summary}");
    assert_eq!(summary["bytes_from_peers"], alpha.len() as u64, "{summary}");

    // Nobody holds beta: the fetch ends, naming the origin and the chunk it cannot get.
    let out = lab.out("late-beta.zip");
    let failed = finish(
        lab.spawn_fetch("late", "beta", &out),
        "the fetch of a blob only the origin had",
        60,
    );
    let text = stderr(&failed);
    assert_eq!(failed.status.code(), Some(1), "{text}");
    assert!(
        text.contains("origin") && text.contains("chunk") && text.contains("no reachable peer"),
        "{text}"
    );
    assert!(!out.exists());
    // The node is still up and its cache clean.
    let status = lab.ask("late", &["status"]);
    assert_eq!(status["node"], "late");
    lab.verify_cache("late");
    eprintln!(
        "origin-down: alpha completed from the fleet, beta refused with: {}",
        text.trim()
    );
}

/// A tmpfs mounted over a directory, unmounted when dropped.
struct Mounted(PathBuf);

impl Mounted {
    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success(), "remount of {} failed", self.0.display());
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount_tmpfs(dir: &Path, size: &str) -> Result<Mounted, String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root, so no tmpfs can be mounted".into());
    }
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .map_err(|e| format!("could not run mount: {e}"))?;
    if !status.success() {
        return Err(format!("mount -t tmpfs failed ({status})"));
    }
    Ok(Mounted(dir.to_path_buf()))
}

#[test]
fn a_node_whose_disk_fills_fails_clearly_stays_consistent_and_recovers() {
    let mut rng = Rng::from_env("disk-full");
    let lab = Lab::start(&[]);
    let mut payload = vec![0u8; 3 * 1024 * 1024];
    rng.fill(&mut payload);
    let zip = lab.publish("bigpkg", "1.0.0", &payload);
    let chunks = (zip.len() as u64).div_ceil(CHUNK);

    let mount = match mount_tmpfs(&lab.data("tight"), "2m") {
        Ok(mount) => mount,
        Err(reason) => {
            eprintln!("skipped: {reason}");
            return;
        }
    };
    let mut node = lab.node("tight", &[]);
    let out = lab.out("tight.zip");
    let failed = finish(
        lab.spawn_fetch("tight", "bigpkg", &out),
        "a fetch onto a full disk",
        60,
    );
    let text = stderr(&failed);
    assert_eq!(failed.status.code(), Some(1), "{text}");
    assert!(
        text.contains("cannot store blob") && text.contains("space"),
        "{text}"
    );
    assert!(!out.exists());
    assert!(
        node.child.try_wait().unwrap().is_none(),
        "the node died of a full disk"
    );
    let checked = lab.verify_cache("tight");
    assert!(checked < chunks, "{checked} chunks fit on a 2 MiB disk?");

    // Space comes back: the same node finishes, keeping what it had verified.
    mount.resize("64m");
    let summary = lab.fetch("tight", "bigpkg", &out);
    assert_eq!(std::fs::read(&out).unwrap(), zip);
    let already = summary["chunks_already_held"].as_u64().unwrap();
    assert_eq!(already, checked, "{summary}");
    assert_eq!(lab.verify_cache("tight"), chunks);
    eprintln!(
        "disk-full: refused with: {}; {checked} of {chunks} chunks kept and verified, completed \
         after the remount",
        text.trim()
    );
    drop(node);
    drop(mount);
}
