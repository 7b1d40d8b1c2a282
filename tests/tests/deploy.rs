//! Deployments end to end: a seed and six node processes in two sites with different tags,
//! packages whose scripts (run by a real shell, from ZIPs made by the `zip` command) record
//! what they did and how many ran at once.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use pkgmesh_tests::{pkgmesh, run_pkgmesh, stdout_json, Daemon, Fleet};
use sha2::{Digest, Sha256};

struct Fixture {
    work: tempfile::TempDir,
    fleet: Fleet,
    _seed: Daemon,
    seed_addr: String,
    deployer: PathBuf,
    /// Where the scripts of every node write what they did.
    shared: PathBuf,
}

const INSTALL: &str = r#"#!/bin/sh
set -eu
mkdir -p "$SHARED/active"
touch "$SHARED/active/$NODE"
ls "$SHARED/active" | wc -l >> "$SHARED/concurrency"
sleep "${INSTALL_SECS:-1}"
echo "$NODE $(cat VERSION) $BWS_ACTION_NAME $BWS_PLATFORM_NAME $BWS_PLATFORM_VERSION" >> "$SHARED/log"
touch "$SHARED/installed-$NODE-$(cat VERSION)"
rm -f "$SHARED/active/$NODE"
echo "installed $(cat VERSION) on $NODE"
"#;

const FAILING_INSTALL: &str = r#"#!/bin/sh
echo "cannot install on $NODE: disk says no" >&2
touch "$SHARED/attempted-$NODE"
exit 3
"#;

/// First run on a node: sleeps long enough to be killed. Later runs succeed at once.
const SLOW_FIRST_INSTALL: &str = r#"#!/bin/sh
if [ ! -e "$SHARED/first-$NODE" ]; then
  touch "$SHARED/first-$NODE"
  sleep 20
fi
touch "$SHARED/installed-$NODE-$(cat VERSION)"
"#;

const UNINSTALL: &str = r#"#!/bin/sh
echo "$NODE $(cat VERSION) uninstall" >> "$SHARED/log"
"#;

impl Fixture {
    fn start() -> Fixture {
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
        let deployer = fleet.identity("ops", "publisher,deployer,operator");
        let shared = work.path().join("shared");
        std::fs::create_dir_all(&shared).unwrap();
        Fixture {
            work,
            fleet,
            _seed: seed,
            seed_addr,
            deployer,
            shared,
        }
    }

    /// Builds `name` `version` with the `zip` command around `install`, and publishes it.
    fn publish(&self, name: &str, version: &str, install: &str) {
        let dir = self.work.path().join(format!("pkg-{name}-{version}"));
        let src = dir.join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("install.sh"), install).unwrap();
        std::fs::write(src.join("uninstall.sh"), UNINSTALL).unwrap();
        std::fs::write(src.join("VERSION"), version).unwrap();
        let zip = dir.join(format!("{name}.zip"));
        let status = Command::new("zip")
            .args(["-q", "-X", "-r"])
            .arg(&zip)
            .arg(".")
            .current_dir(&src)
            .status()
            .expect("the zip command");
        assert!(status.success());
        let sha = hex::encode(Sha256::digest(std::fs::read(&zip).unwrap()));
        let manifest = serde_json::json!({
            "schemaVersion": "2.0",
            "version": version,
            "packages": { "_any": { "_any": { "_any": { "file": format!("{name}.zip") } } } },
            "files": { format!("{name}.zip"): { "checksums": { "sha256": sha } } }
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
    }

    fn seed_command(&self, args: &[&str]) -> Output {
        Command::new(pkgmesh())
            .args(args)
            .arg("--seed")
            .arg(&self.seed_addr)
            .arg("--identity")
            .arg(&self.deployer)
            .output()
            .unwrap()
    }

    fn data(&self, name: &str) -> PathBuf {
        self.work.path().join(format!("data-{name}"))
    }

    fn node(&self, name: &str, site: &str, tag: &str) -> Daemon {
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
            .args(["--site", site, "--tag", tag])
            .args([
                "--platform",
                "ubuntu",
                "--platform-version",
                "22.04",
                "--json",
            ])
            .env("NODE", name)
            .env("SHARED", &self.shared);
        Daemon::spawn(command)
    }

    /// Polls `deploy status ID --json` until `done` says so (90 s at most).
    fn wait_for(
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

    fn marker(&self, name: &str) -> bool {
        self.shared.join(name).exists()
    }

    fn max_concurrency_seen(&self) -> u64 {
        std::fs::read_to_string(self.shared.join("concurrency"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .max()
            .unwrap_or(0)
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn node_states(status: &serde_json::Value) -> Vec<(String, String, String)> {
    status["nodes"]
        .as_object()
        .map(|nodes| {
            nodes
                .iter()
                .map(|(name, s)| {
                    (
                        name.clone(),
                        s["state"].as_str().unwrap_or("").to_string(),
                        s["version"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn count_in(status: &serde_json::Value, state: &str, version: &str) -> usize {
    node_states(status)
        .iter()
        .filter(|(_, s, v)| s == state && v == version)
        .count()
}

fn created_id(output: &Output) -> u64 {
    assert!(output.status.success(), "deploy create: {}", stderr(output));
    stdout_json(output)["id"].as_u64().unwrap()
}

#[test]
fn deployments_reach_their_targets_within_concurrency_stop_on_errors_and_follow_the_default() {
    let fx = Fixture::start();
    fx.publish("webapp", "1.0.0", INSTALL);
    fx.publish("broken", "1.0.0", FAILING_INSTALL);
    let layout = [
        ("east-1", "east", "role=web"),
        ("east-2", "east", "role=web"),
        ("east-3", "east", "role=db"),
        ("west-1", "west", "role=web"),
        ("west-2", "west", "role=web"),
        ("west-3", "west", "role=db"),
    ];
    let _nodes: Vec<Daemon> = layout
        .iter()
        .map(|(name, site, tag)| fx.node(name, site, tag))
        .collect();
    let web = ["east-1", "east-2", "west-1", "west-2"];

    // To one tag, two at a time, following the default version.
    let id = created_id(&fx.seed_command(&[
        "deploy",
        "create",
        "--package",
        "webapp",
        "--target",
        "tag:role=web",
        "--max-concurrency",
        "2",
        "--json",
    ]));
    let status = fx.wait_for(id, "4 nodes succeeded", |s| {
        count_in(s, "succeeded", "1.0.0") == 4
    });
    let mut targeted: Vec<&str> = status["targeted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    targeted.sort();
    assert_eq!(targeted, web);
    for (name, _, tag) in layout {
        assert_eq!(
            fx.marker(&format!("installed-{name}-1.0.0")),
            tag == "role=web",
            "{name}"
        );
    }
    let most = fx.max_concurrency_seen();
    assert!((1..=2).contains(&most), "{most} installs ran at once");
    let log = std::fs::read_to_string(fx.shared.join("log")).unwrap();
    assert!(log.contains("east-1 1.0.0 install ubuntu 22.04"), "{log}");

    // A package failing everywhere stops once max-errors is exceeded.
    let broken = created_id(&fx.seed_command(&[
        "deploy",
        "create",
        "--package",
        "broken",
        "--target",
        "site:east",
        "--max-concurrency",
        "1",
        "--max-errors",
        "1",
        "--json",
    ]));
    let stopped = fx.wait_for(broken, "stopped", |s| s["state"] == "stopped");
    let states = node_states(&stopped);
    assert_eq!(states.len(), 2, "only two nodes were started: {stopped:#}");
    assert!(states.iter().all(|(_, s, _)| s == "failed"), "{states:?}");
    for node in stopped["nodes"].as_object().unwrap().values() {
        assert_eq!(node["exit_code"], 3, "{node}");
        assert!(
            node["log_tail"].as_str().unwrap().contains("disk says no"),
            "{node}"
        );
    }
    let attempted = ["east-1", "east-2", "east-3"]
        .iter()
        .filter(|n| fx.marker(&format!("attempted-{n}")))
        .count();
    assert_eq!(attempted, 2);
    let table = fx.seed_command(&["deploy", "status", &broken.to_string()]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("stopped") && table.contains("waiting"),
        "{table}"
    );

    // A new default version upgrades the default-following deployment's nodes.
    fx.publish("webapp", "2.0.0", INSTALL);
    let output = fx.seed_command(&["package", "set-default", "webapp", "2.0.0"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let upgraded = fx.wait_for(id, "4 nodes on 2.0.0", |s| {
        count_in(s, "succeeded", "2.0.0") == 4
    });
    assert_eq!(upgraded["run"], 2);
    for name in web {
        assert!(fx.marker(&format!("installed-{name}-2.0.0")), "{name}");
    }
    let most = fx.max_concurrency_seen();
    assert!((1..=2).contains(&most), "{most} installs ran at once");
    let installed = run_pkgmesh([
        "installed".as_ref(),
        "--data".as_ref(),
        fx.data("west-2").as_os_str(),
        "--json".as_ref(),
    ]);
    assert!(installed.status.success(), "{}", stderr(&installed));
    let records = stdout_json(&installed);
    let webapp = records
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "webapp")
        .unwrap();
    assert_eq!(webapp["installed_version"], "2.0.0");
    assert_eq!(webapp["previous_version"], "1.0.0");
    assert_eq!(webapp["state"], "installed");
    // Uninstall-and-reinstall: 1.0.0's uninstall ran before 2.0.0's install on that node.
    let log = std::fs::read_to_string(fx.shared.join("log")).unwrap();
    let uninstall_old = log.find("west-2 1.0.0 uninstall").unwrap();
    let install_new = log.find("west-2 2.0.0 install").unwrap();
    assert!(uninstall_old < install_new, "{log}");
    assert!(
        !fx.marker("installed-east-3-2.0.0") && !fx.marker("installed-west-3-2.0.0"),
        "db nodes were never targeted"
    );
}

#[test]
fn a_node_killed_during_an_install_comes_back_to_a_known_state_and_reports_it() {
    let fx = Fixture::start();
    fx.publish("slowpkg", "1.0.0", SLOW_FIRST_INSTALL);
    let mut node = fx.node("solo", "east", "role=web");
    let id = created_id(&fx.seed_command(&[
        "deploy",
        "create",
        "--package",
        "slowpkg",
        "--target",
        "node:solo",
        "--json",
    ]));
    fx.wait_for(id, "installing", |s| {
        node_states(s)
            .iter()
            .any(|(_, state, _)| state == "installing")
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fx.marker("first-solo") {
        assert!(Instant::now() < deadline, "the first install never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    node.child.kill().unwrap(); // SIGKILL mid-script
    node.child.wait().unwrap();

    let _node = fx.node("solo", "east", "role=web");
    let status = fx.wait_for(id, "succeeded", |s| count_in(s, "succeeded", "1.0.0") == 1);
    assert_eq!(status["nodes"]["solo"]["exit_code"], 0);
    assert!(fx.marker("installed-solo-1.0.0"));
    let installed = run_pkgmesh([
        "installed".as_ref(),
        "--data".as_ref(),
        fx.data("solo").as_os_str(),
        "--json".as_ref(),
    ]);
    let records = stdout_json(&installed);
    assert_eq!(records[0]["name"], "slowpkg");
    assert_eq!(records[0]["state"], "installed");
    assert_eq!(records[0]["installed_version"], "1.0.0");
}
