//! The seed's upload cap (`pkgmesh seed --upload-limit`, `upload_limit` in its config): a bad
//! rate is refused with a message naming the setting, and a capped seed still serves every
//! chunk of a package exactly once to a node that fetches it. The cap's rate itself is the
//! token bucket's, unit-tested in `node/src/swarm/ratelimit.rs` and measured by the `swarm`
//! benchmark; tests assert no timings.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pkgmesh_tests::{build_sample_package_sized, pkgmesh, run_pkgmesh, stdout_json, Daemon, Fleet};

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_bad_seed_upload_limit_is_refused_naming_the_setting() {
    let work = tempfile::tempdir().unwrap();
    let fleet = Fleet::new(work.path());
    let identity = fleet.identity("seed-1", "seed");
    let flag = run_pkgmesh([
        "seed".as_ref(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--data".as_ref(),
        work.path().join("seed-data").as_os_str(),
        "--identity".as_ref(),
        identity.as_os_str(),
        "--upload-limit".as_ref(),
        "fast".as_ref(),
    ]);
    assert_eq!(flag.status.code(), Some(1), "{}", stderr(&flag));
    assert!(stderr(&flag).contains("upload limit"), "{}", stderr(&flag));

    let config = work.path().join("seed.toml");
    std::fs::write(&config, "upload_limit = \"lots\"\n").unwrap();
    let file = run_pkgmesh([
        "seed".as_ref(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--data".as_ref(),
        work.path().join("seed-data").as_os_str(),
        "--identity".as_ref(),
        identity.as_os_str(),
        "--config".as_ref(),
        config.as_os_str(),
    ]);
    assert_eq!(file.status.code(), Some(1), "{}", stderr(&file));
    assert!(stderr(&file).contains("upload limit"), "{}", stderr(&file));
}

#[test]
fn a_capped_seed_serves_every_chunk_once() {
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
        "--upload-limit".as_ref(),
        "16MiB".as_ref(),
        "--metrics-listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--json".as_ref(),
    ]);
    let seed_addr = seed.listening();
    let ready: serde_json::Value = serde_json::from_str(&seed.ready_line).unwrap();
    let metrics: std::net::SocketAddr = ready["metrics"]
        .as_str()
        .expect("the ready line names the metrics address")
        .parse()
        .unwrap();

    // About 3 MiB per ZIP: a dozen chunks, several turns at the capped uplink.
    let package = work.path().join("package");
    build_sample_package_sized(&package, "1.0.0", 3072);
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

    let node = fleet.identity("node-a", "node");
    let out = work.path().join("fetched.zip");
    let mut fetch = Command::new(pkgmesh())
        .args([
            "fetch",
            "pkgmesh-sample",
            "--json",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--platform", "ubuntu", "--platform-version", "22.04"])
        .arg("--seed")
        .arg(&seed_addr)
        .arg("--identity")
        .arg(&node)
        .arg("--out")
        .arg(&out)
        .env("RUST_LOG", "warn")
        .env_remove("PKGMESH_DATA")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while fetch.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = fetch.kill();
            panic!("a fetch from a seed capped at 16 MiB/s did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = fetch.wait_with_output().unwrap();
    assert!(output.status.success(), "fetch: {}", stderr(&output));
    let summary = stdout_json(&output);
    let file = summary["file"]
        .as_str()
        .expect("the summary names the file");
    let expected = std::fs::read(package.join(file)).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), expected);
    assert_eq!(
        summary["bytes_from_seed"],
        expected.len() as u64,
        "{summary}"
    );

    // Every byte it sent was a chunk the node needed: the cap lost nothing and sent nothing
    // twice.
    let served = seed_counter(metrics, "pkgmesh_seed_served_bytes_total");
    assert_eq!(served, expected.len() as u64);
    drop(seed);
}

/// One unlabelled counter of the seed's `/metrics`.
fn seed_counter(addr: std::net::SocketAddr, name: &str) -> u64 {
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: seed\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read /metrics");
    text.lines()
        .find_map(|line| {
            let (key, value) = line.split_once(' ')?;
            (key == name).then(|| value.trim().parse().ok()).flatten()
        })
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}
