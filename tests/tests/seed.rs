//! The seed end to end: real `pkgmesh seed` and CLI processes over QUIC on 127.0.0.1, a fleet CA
//! made by `pkgmesh ca`, the sample package built by the `zip` command.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use pkgmesh_tests::{build_sample_package, run_pkgmesh, stdout_json, Daemon, Fleet};

fn args(parts: &[&dyn AsRef<OsStr>]) -> Vec<OsString> {
    parts.iter().map(|p| p.as_ref().to_os_string()).collect()
}

struct Seed {
    daemon: Option<Daemon>,
    addr: String,
    data: PathBuf,
    identity: PathBuf,
}

impl Seed {
    fn start(data: &Path, identity: &Path) -> Seed {
        let daemon = Daemon::start(args(&[
            &"seed",
            &"--listen",
            &"127.0.0.1:0",
            &"--data",
            &data,
            &"--identity",
            &identity,
            &"--json",
        ]));
        let addr = daemon.listening();
        Seed {
            daemon: Some(daemon),
            addr,
            data: data.to_path_buf(),
            identity: identity.to_path_buf(),
        }
    }

    fn restart(&mut self) {
        if let Some(daemon) = self.daemon.take() {
            assert!(
                daemon.stop().success(),
                "seed did not stop cleanly on SIGTERM"
            );
        }
        *self = Seed::start(&self.data.clone(), &self.identity.clone());
    }

    /// Runs `pkgmesh <command...> --seed ADDR --identity ID [rest]`.
    fn run(&self, identity: &Path, command: &[&dyn AsRef<OsStr>]) -> Output {
        let mut all = args(command);
        all.extend(args(&[&"--seed", &self.addr, &"--identity", &identity]));
        run_pkgmesh(all)
    }
}

fn publish(seed: &Seed, identity: &Path, name: &str, dir: &Path) -> Output {
    seed.run(
        identity,
        &[
            &"package",
            &"publish",
            &"--name",
            &name,
            &"--manifest",
            &dir.join("manifest.json"),
            &"--dir",
            &dir,
            &"--json",
        ],
    )
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Every file under `dir`, relative, sorted: to show the origin did not change.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(base, &path, out);
            } else {
                out.push(path.strip_prefix(base).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Writes a ZIP with Python's zipfile, which (unlike the zip command) can store hostile names.
fn python_zip(path: &Path, entries: &[(&str, &str)]) {
    let mut script = String::from("import sys, zipfile\nz = zipfile.ZipFile(sys.argv[1], 'w')\n");
    for (name, body) in entries {
        script.push_str(&format!("z.writestr({name:?}, {body:?})\n"));
    }
    script.push_str("z.close()\n");
    let status = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(path)
        .status()
        .expect("python3");
    assert!(status.success());
}

/// Rewrites `manifest.json` in `dir` so its checksum for `file` matches the file on disk.
fn refresh_checksum(dir: &Path, file: &str) {
    use sha2::Digest;
    let path = dir.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let bytes = std::fs::read(dir.join(file)).unwrap();
    manifest["files"][file]["checksums"]["sha256"] =
        hex::encode(sha2::Sha256::digest(&bytes)).into();
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
}

#[test]
fn publish_show_refusals_audit_and_restart() {
    let work = tempfile::tempdir().unwrap();
    let fleet = Fleet::new(work.path());
    let seed_id = fleet.identity("seed-1", "seed");
    let publisher = fleet.identity("alice", "publisher");
    let node = fleet.identity("node-1", "node");
    let admin = fleet.identity("root", "admin");
    let operator = fleet.identity("ops", "operator");
    let stranger_fleet = Fleet::new(&work.path().join("other"));
    let stranger = stranger_fleet.identity("mallory", "publisher,admin");

    let mut seed = Seed::start(&work.path().join("seed-data"), &seed_id);
    let origin_dir = work.path().join("seed-data/origin");

    // Publish the sample package built with the zip command.
    let package = work.path().join("pkg-1.0.0");
    build_sample_package(&package, "1.0.0");
    let output = publish(&seed, &publisher, "pkgmesh-sample", &package);
    assert!(output.status.success(), "{}", stderr(&output));
    let outcome = stdout_json(&output);
    assert_eq!(outcome["unchanged"], false);
    assert_eq!(outcome["files_uploaded"], 7);
    // The same content again is a no-op.
    let again = stdout_json(&publish(&seed, &publisher, "pkgmesh-sample", &package));
    assert_eq!(again["unchanged"], true);

    let show = seed.run(
        &operator,
        &[&"package", &"show", &"pkgmesh-sample", &"--json"],
    );
    assert!(show.status.success(), "{}", stderr(&show));
    let show = stdout_json(&show);
    assert_eq!(show["version"], "1.0.0");
    assert_eq!(show["is_default"], true);
    assert_eq!(show["published_by"], "alice");
    assert_eq!(show["files"].as_array().unwrap().len(), 7);
    let text = seed.run(&operator, &[&"package", &"show", &"pkgmesh-sample"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("sample-redhat9.zip") && text.contains("(default)"),
        "{text}"
    );

    // A node certificate may not publish.
    let refused = publish(&seed, &node, "pkgmesh-sample", &package);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains("publisher"),
        "{}",
        stderr(&refused)
    );
    // A certificate from another CA does not get through the handshake.
    let stranger_out = seed.run(&stranger, &[&"package", &"list"]);
    assert_eq!(stranger_out.status.code(), Some(1));
    assert!(
        stderr(&stranger_out).contains("cannot reach the seed"),
        "{}",
        stderr(&stranger_out)
    );
    // A publisher may not read the audit log.
    let audit_refused = seed.run(&publisher, &[&"audit"]);
    assert_eq!(audit_refused.status.code(), Some(1));
    assert!(
        stderr(&audit_refused).contains("admin"),
        "{}",
        stderr(&audit_refused)
    );

    // Failed publishes leave the catalog and the origin as they were.
    let origin_before = tree(&origin_dir);
    let catalog_before = stdout_json(&seed.run(&operator, &[&"package", &"list", &"--json"]));

    let bad_sha = work.path().join("bad-sha");
    build_sample_package(&bad_sha, "2.0.0");
    std::fs::write(
        bad_sha.join("sample-redhat9.zip"),
        b"not the bytes the manifest names",
    )
    .unwrap();
    let out = publish(&seed, &publisher, "pkgmesh-sample", &bad_sha);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("SHA-256"), "{}", stderr(&out));

    let traversal = work.path().join("traversal");
    build_sample_package(&traversal, "2.0.1");
    python_zip(
        &traversal.join("sample-redhat9.zip"),
        &[
            ("install.sh", "true"),
            ("uninstall.sh", "true"),
            ("../evil", "x"),
        ],
    );
    refresh_checksum(&traversal, "sample-redhat9.zip");
    let out = publish(&seed, &publisher, "pkgmesh-sample", &traversal);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("evil"), "{}", stderr(&out));

    let no_install = work.path().join("no-install");
    build_sample_package(&no_install, "2.0.2");
    python_zip(
        &no_install.join("sample-amazon2.zip"),
        &[("uninstall.sh", "true"), ("payload.txt", "x")],
    );
    refresh_checksum(&no_install, "sample-amazon2.zip");
    let out = publish(&seed, &publisher, "pkgmesh-sample", &no_install);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("install"), "{}", stderr(&out));

    let missing = work.path().join("missing-file");
    build_sample_package(&missing, "2.0.3");
    std::fs::remove_file(missing.join("sample-windows.zip")).unwrap();
    let out = publish(&seed, &publisher, "pkgmesh-sample", &missing);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("sample-windows.zip"),
        "{}",
        stderr(&out)
    );

    assert_eq!(tree(&origin_dir), origin_before);
    assert_eq!(
        stdout_json(&seed.run(&operator, &[&"package", &"list", &"--json"])),
        catalog_before
    );

    // A second version, made the default explicitly, then everything survives a restart.
    let v2 = work.path().join("pkg-2.0.0");
    build_sample_package(&v2, "2.0.0");
    assert!(publish(&seed, &publisher, "pkgmesh-sample", &v2)
        .status
        .success());
    let set = seed.run(
        &publisher,
        &[&"package", &"set-default", &"pkgmesh-sample", &"1.0.0"],
    );
    assert!(set.status.success(), "{}", stderr(&set));
    seed.restart();
    let list = stdout_json(&seed.run(&operator, &[&"package", &"list", &"--json"]));
    assert_eq!(
        list["packages"][0]["versions"],
        serde_json::json!(["1.0.0", "2.0.0"])
    );
    assert_eq!(list["packages"][0]["default_version"], "1.0.0");

    // Every refusal, and the changes, are in the audit log, which survived the restart.
    let audit = seed.run(&admin, &[&"audit", &"--json"]);
    assert!(audit.status.success(), "{}", stderr(&audit));
    let records = stdout_json(&audit)["records"].as_array().unwrap().clone();
    let has = |caller: &str, action: &str, outcome: &str| {
        records.iter().any(|r| {
            r["caller"].as_str().unwrap_or("").contains(caller)
                && r["action"] == action
                && r["outcome"].as_str().unwrap_or("").starts_with(outcome)
        })
    };
    assert!(has("alice", "publish", "ok"), "{records:#?}");
    assert!(has("node-1", "publish", "refused"), "{records:#?}");
    assert!(has("alice", "audit", "refused"), "{records:#?}");
    assert!(has("unauthenticated", "connect", "refused"), "{records:#?}");
    assert!(has("alice", "set-default", "ok"), "{records:#?}");

    // Deleting a version removes it from the catalog and its files from the origin.
    let delete = seed.run(
        &publisher,
        &[
            &"package",
            &"delete",
            &"pkgmesh-sample",
            &"--version",
            &"2.0.0",
        ],
    );
    assert!(delete.status.success(), "{}", stderr(&delete));
    assert!(!tree(&origin_dir).iter().any(|f| f.contains("2.0.0")));
    let show = seed.run(
        &operator,
        &[
            &"package",
            &"show",
            &"pkgmesh-sample",
            &"--version",
            &"2.0.0",
        ],
    );
    assert_eq!(show.status.code(), Some(1));
    assert!(stderr(&show).contains("no version"), "{}", stderr(&show));
}
