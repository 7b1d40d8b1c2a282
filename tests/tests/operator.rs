//! The operator's commands against a running fleet of real processes (a seed and nodes in three
//! sites): `cache ls|stats|verify|evict|pin|unpin`, `peers`, `install-log`, `nodes`,
//! `preheat`, each in `--json` and as a table, with their figures checked against what the
//! test made happen (bytes by source, chunk counts, pins), and `/metrics` of nodes (admin
//! socket and TCP) and the seed parsed strictly as Prometheus text and checked against the
//! admin API's figures.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use pkgmesh_tests::{build_sample_package_sized, run_pkgmesh, stdout_json, Daemon, Fleet};
use serde_json::Value;

const PACKAGE: &str = "pkgmesh-sample";

struct Fixture {
    work: tempfile::TempDir,
    fleet: Fleet,
    _seed: Daemon,
    seed_addr: String,
    seed_metrics: String,
    operator: PathBuf,
    deployer: PathBuf,
    publisher: PathBuf,
}

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
            "--metrics-listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--json".as_ref(),
        ]);
        let seed_addr = seed.listening();
        let ready: Value = serde_json::from_str(&seed.ready_line).unwrap();
        let seed_metrics = ready["metrics"]
            .as_str()
            .expect("the seed's ready line names its metrics address")
            .to_string();
        let package = work.path().join("package");
        // About 1.5 MiB per ZIP: several 256 KiB chunks.
        build_sample_package_sized(&package, "1.0.0", 2048);
        let publisher = fleet.identity("alice", "publisher");
        let published = run_pkgmesh([
            "package".as_ref(),
            "publish".as_ref(),
            "--seed".as_ref(),
            seed_addr.as_ref(),
            "--identity".as_ref(),
            publisher.as_os_str(),
            "--name".as_ref(),
            PACKAGE.as_ref(),
            "--manifest".as_ref(),
            package.join("manifest.json").as_os_str(),
            "--dir".as_ref(),
            package.as_os_str(),
        ]);
        assert!(published.status.success(), "{}", stderr(&published));
        let operator = fleet.identity("ops", "operator");
        let deployer = fleet.identity("dep", "deployer");
        Fixture {
            work,
            fleet,
            _seed: seed,
            seed_addr,
            seed_metrics,
            operator,
            deployer,
            publisher,
        }
    }

    fn data(&self, name: &str) -> PathBuf {
        self.work.path().join(format!("data-{name}"))
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.data(name).join("admin.sock")
    }

    /// A node daemon on Ubuntu 22.04 in `site`, with `extra` flags.
    fn node(&self, name: &str, site: &str, extra: &[&str]) -> Daemon {
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
            "--site".into(),
            site.into(),
            "--platform".into(),
            "ubuntu".into(),
            "--platform-version".into(),
            "22.04".into(),
            "--json".into(),
        ];
        args.extend(extra.iter().map(|a| a.into()));
        Daemon::start(args)
    }

    /// `pkgmesh ARGS --node <socket of node>`.
    fn ask(&self, node: &str, args: &[&str]) -> Output {
        let mut all: Vec<std::ffi::OsString> = args.iter().map(|a| a.into()).collect();
        all.push("--node".into());
        all.push(self.socket(node).into());
        run_pkgmesh(all)
    }

    /// `pkgmesh ARGS --json --node <socket>`, which must succeed; its JSON.
    fn ask_json(&self, node: &str, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let output = self.ask(node, &all);
        assert!(
            output.status.success(),
            "{args:?} on {node}: {}",
            stderr(&output)
        );
        stdout_json(&output)
    }

    /// `pkgmesh ARGS --seed ADDR --identity ID`.
    fn ask_seed(&self, identity: &Path, args: &[&str]) -> Output {
        let mut all: Vec<std::ffi::OsString> = args.iter().map(|a| a.into()).collect();
        all.extend([
            "--seed".into(),
            self.seed_addr.clone().into(),
            "--identity".into(),
            identity.as_os_str().to_os_string(),
        ]);
        run_pkgmesh(all)
    }

    fn fetch(&self, node: &str) -> Value {
        let out = self.work.path().join(format!("{node}.zip"));
        let summary = self.ask_json(node, &["fetch", PACKAGE, "--out", out.to_str().unwrap()]);
        self.wait_idle(node);
        summary
    }

    /// Waits until the node has no transfer in flight: its counters are then final (a
    /// transfer leaves the list only after adding its figures).
    fn wait_idle(&self, node: &str) {
        wait_for(&format!("{node} idle"), || {
            self.ask_json(node, &["status"])["transfers_in_flight"] == 0
        });
    }

    /// Waits until the seed's tracker lists `node` holding every chunk of `blob`.
    fn wait_announced(&self, node: &str, blob: &str) {
        wait_for(&format!("{node} announced"), || {
            let output = self.ask_seed(&self.operator, &["where", blob, "--json"]);
            assert!(output.status.success(), "{}", stderr(&output));
            let holders = stdout_json(&output)["holders"].clone();
            holders
                .as_array()
                .unwrap()
                .iter()
                .any(|h| h["node"] == node && h["chunks_held"] == h["chunks_total"])
        });
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Polls `ready` until it holds; a deadline only turns a hang into a failure.
fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !ready() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn u(value: &Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("not a count: {value}"))
}

// ---------------------------------------------------------------------------------------------
// A strict reader of the Prometheus text format (version 0.0.4).

/// One sample: its labels and value.
type Samples = Vec<(BTreeMap<String, String>, f64)>;

/// Parses an exposition, refusing anything the format does not allow: malformed names, labels
/// or values, a sample before its family's TYPE, a TYPE given twice, a family split in two, a
/// series given twice. Returns sample name → samples.
fn parse_prometheus(text: &str) -> BTreeMap<String, Samples> {
    fn is_name(s: &str, colons: bool) -> bool {
        let mut chars = s.chars();
        let first_ok = |c: char| c.is_ascii_alphabetic() || c == '_' || (colons && c == ':');
        chars.next().is_some_and(first_ok) && chars.all(|c| first_ok(c) || c.is_ascii_digit())
    }
    fn value(s: &str) -> f64 {
        match s {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            _ => s
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("bad sample value {s:?}")),
        }
    }
    assert!(text.ends_with('\n'), "an exposition ends with a newline");
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: HashMap<String, String> = HashMap::new();
    let mut samples: BTreeMap<String, Samples> = BTreeMap::new();
    let mut finished_families: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let mut parts = rest.trim_start().splitn(3, ' ');
            let keyword = parts.next().unwrap_or("");
            match keyword {
                "HELP" | "TYPE" => {
                    let name = parts.next().expect("a metric name after HELP/TYPE");
                    assert!(is_name(name, true), "bad metric name {name:?}");
                    let rest = parts.next().unwrap_or("");
                    if keyword == "TYPE" {
                        assert!(
                            ["counter", "gauge", "histogram", "summary", "untyped"].contains(&rest),
                            "bad type {rest:?} for {name}"
                        );
                        assert!(
                            types.insert(name.to_string(), rest.to_string()).is_none(),
                            "TYPE of {name} given twice"
                        );
                        assert!(
                            !samples.contains_key(name),
                            "TYPE of {name} after its samples"
                        );
                    } else {
                        assert!(
                            helps.insert(name.to_string(), rest.to_string()).is_none(),
                            "HELP of {name} given twice"
                        );
                    }
                }
                _ => {} // A comment.
            }
            continue;
        }
        // name{labels} value [timestamp]
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => panic!("a sample without a value: {line:?}"),
        };
        assert!(is_name(name, true), "bad metric name {name:?}");
        let family = types
            .keys()
            .filter(|f| {
                name == f.as_str()
                    || ["_sum", "_count", "_bucket"]
                        .iter()
                        .any(|s| name.strip_suffix(s) == Some(f.as_str()))
            })
            .max_by_key(|f| f.len())
            .cloned()
            .unwrap_or_else(|| panic!("sample {name} has no TYPE before it"));
        if current.as_deref() != Some(family.as_str()) {
            assert!(
                !finished_families.contains(&family),
                "family {family} is split in two"
            );
            if let Some(previous) = current.replace(family.clone()) {
                finished_families.push(previous);
            }
        }
        let mut labels = BTreeMap::new();
        let rest = if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            let end;
            loop {
                // label name
                let start = chars.peek().map(|(i, _)| *i).expect("unterminated labels");
                if body[start..].starts_with('}') {
                    end = start + 1;
                    break;
                }
                let eq = body[start..].find('=').expect("a label without '='") + start;
                let label = &body[start..eq];
                assert!(is_name(label, false), "bad label name {label:?}");
                assert!(body[eq + 1..].starts_with('"'), "label value not quoted");
                let mut value = String::new();
                let mut i = eq + 2;
                let bytes = body.as_bytes();
                loop {
                    match bytes.get(i).copied() {
                        Some(b'\\') => {
                            match bytes.get(i + 1).copied() {
                                Some(b'\\') => value.push('\\'),
                                Some(b'"') => value.push('"'),
                                Some(b'n') => value.push('\n'),
                                other => panic!("bad escape {other:?} in {line:?}"),
                            }
                            i += 2;
                        }
                        Some(b'"') => break,
                        Some(_) => {
                            let c = body[i..].chars().next().unwrap();
                            value.push(c);
                            i += c.len_utf8();
                        }
                        None => panic!("unterminated label value in {line:?}"),
                    }
                }
                assert!(
                    labels.insert(label.to_string(), value).is_none(),
                    "label {label} twice in {line:?}"
                );
                i += 1; // the closing quote
                match bytes.get(i).copied() {
                    Some(b',') => i += 1,
                    Some(b'}') => {}
                    other => panic!("bad label separator {other:?} in {line:?}"),
                }
                while chars.peek().is_some_and(|(j, _)| *j < i) {
                    chars.next();
                }
            }
            &body[end..]
        } else {
            rest
        };
        let mut fields = rest.split_whitespace();
        let v = value(fields.next().expect("a sample value"));
        if let Some(timestamp) = fields.next() {
            timestamp
                .parse::<i64>()
                .unwrap_or_else(|_| panic!("bad timestamp in {line:?}"));
        }
        assert!(fields.next().is_none(), "trailing text in {line:?}");
        if types[&family] == "counter" {
            assert!(v >= 0.0, "negative counter in {line:?}");
        }
        let series = samples.entry(name.to_string()).or_default();
        assert!(
            series.iter().all(|(l, _)| l != &labels),
            "series given twice: {line:?}"
        );
        series.push((labels, v));
    }
    samples
}

#[test]
fn the_strict_reader_refuses_what_prometheus_would() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\"} 3\n\
                # TYPE b gauge\nb 4.5\n";
    let parsed = parse_prometheus(good);
    assert_eq!(parsed["a_total"][0].1, 3.0);
    assert_eq!(parsed["a_total"][0].0["y"], "q\"");
    assert_eq!(parsed["b"][0].1, 4.5);
    for bad in [
        "a 1\n",                                                    // no TYPE
        "# TYPE a gauge\na one\n",                                  // bad value
        "# TYPE a gauge\na{1x=\"1\"} 1\n",                          // bad label name
        "# TYPE a gauge\na{x=1} 1\n",                               // unquoted
        "# TYPE a gauge\n# TYPE a gauge\na 1\n",                    // TYPE twice
        "# TYPE a gauge\na 1\na 2\n",                               // series twice
        "# TYPE a gauge\n# TYPE b gauge\na 1\nb 1\na{x=\"1\"} 1\n", // family split
        "# TYPE a counter\na -1\n",                                 // negative counter
    ] {
        assert!(
            std::panic::catch_unwind(|| parse_prometheus(bad)).is_err(),
            "accepted {bad:?}"
        );
    }
}

/// The one value of sample `name` with `labels`.
fn sample(metrics: &BTreeMap<String, Samples>, name: &str, labels: &[(&str, &str)]) -> u64 {
    let series = metrics
        .get(name)
        .unwrap_or_else(|| panic!("no metric {name}"));
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let (_, value) = series
        .iter()
        .find(|(l, _)| l == &want)
        .unwrap_or_else(|| panic!("no {name} with {labels:?}: {series:?}"));
    assert!(value.fract() == 0.0 && *value >= 0.0, "{name} = {value}");
    *value as u64
}

/// `GET /metrics` over a stream with HTTP/1.1; the body, after checking status and type.
fn http_get_metrics(mut stream: impl Read + Write) -> String {
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).expect("a text answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let mut lines = head.lines();
    let status = lines.next().unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    assert!(
        headers["content-type"].starts_with("text/plain; version=0.0.4"),
        "{headers:?}"
    );
    if headers.get("transfer-encoding").map(String::as_str) == Some("chunked") {
        let mut out = String::new();
        let mut rest = body;
        loop {
            let (size, after) = rest.split_once("\r\n").expect("a chunk size");
            let size = usize::from_str_radix(size.trim(), 16).expect("a hex chunk size");
            if size == 0 {
                return out;
            }
            out.push_str(&after[..size]);
            rest = &after[size + 2..];
        }
    }
    body.to_string()
}

fn node_metrics(socket: &Path) -> BTreeMap<String, Samples> {
    let stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    parse_prometheus(&http_get_metrics(stream))
}

fn tcp_metrics(addr: &str) -> BTreeMap<String, Samples> {
    let stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    parse_prometheus(&http_get_metrics(stream))
}

/// A node's `/metrics` byte and chunk counters equal its `cache stats` figures.
fn assert_metrics_match_stats(metrics: &BTreeMap<String, Samples>, stats: &Value, node: &str) {
    let received = "pkgmesh_node_received_bytes_total";
    for (source, field) in [
        ("seed", "bytes_from_seed"),
        ("peer_same_site", "bytes_from_same_site_peers"),
        ("peer_other_site", "bytes_from_other_site_peers"),
    ] {
        assert_eq!(
            sample(metrics, received, &[("source", source)]),
            u(&stats[field]),
            "{node}: {source}"
        );
    }
    for (metric, field) in [
        ("pkgmesh_node_served_bytes_total", "bytes_served"),
        ("pkgmesh_node_served_chunks_total", "chunks_served"),
        ("pkgmesh_node_chunks_verified_total", "chunks_received"),
        ("pkgmesh_node_chunk_failures_total", "chunk_failures"),
        (
            "pkgmesh_node_transfers_completed_total",
            "transfers_completed",
        ),
        ("pkgmesh_node_cache_used_bytes", "used_bytes"),
        ("pkgmesh_node_cache_budget_bytes", "budget_bytes"),
        ("pkgmesh_node_cache_pinned_bytes", "pinned_bytes"),
        ("pkgmesh_node_cache_blobs", "blobs"),
        ("pkgmesh_node_cache_evicted_bytes_total", "evicted_bytes"),
        ("pkgmesh_node_cache_rotted_chunks_total", "rotted_chunks"),
    ] {
        assert_eq!(
            sample(metrics, metric, &[]),
            u(&stats[field]),
            "{node}: {metric}"
        );
    }
}

// ---------------------------------------------------------------------------------------------

#[test]
fn operator_commands_agree_with_what_happened() {
    let fx = Fixture::start();
    let _a = fx.node("node-a", "east", &["--tag", "role=web"]);
    let mut b = fx.node("node-b", "east", &[]);
    let c = fx.node("node-c", "west", &["--metrics-listen", "127.0.0.1:0"]);
    let c_ready: Value = serde_json::from_str(&c.ready_line).unwrap();
    let c_metrics = c_ready["metrics"].as_str().unwrap().to_string();

    // node-a, alone: every byte from the seed.
    let first = fx.fetch("node-a");
    let blob = first["blob"].as_str().unwrap().to_string();
    let file = first["file"].as_str().unwrap().to_string();
    let size = u(&first["size"]);
    let chunks = u(&first["chunks"]);
    assert!(
        chunks >= 4,
        "the package should span several chunks: {first}"
    );
    let a = fx.ask_json("node-a", &["cache", "stats"]);
    assert_eq!(u(&a["bytes_from_seed"]), size, "{a}");
    assert_eq!(u(&a["bytes_from_same_site_peers"]), 0, "{a}");
    assert_eq!(u(&a["bytes_from_other_site_peers"]), 0, "{a}");
    assert_eq!(u(&a["chunks_received"]), chunks, "{a}");
    assert_eq!(u(&a["transfers_completed"]), 1, "{a}");
    assert_eq!(u(&a["used_bytes"]), size, "{a}");
    let seed = tcp_metrics(&fx.seed_metrics);
    assert_eq!(sample(&seed, "pkgmesh_seed_served_bytes_total", &[]), size);
    assert_eq!(
        sample(
            &seed,
            "pkgmesh_seed_admission_decisions_total",
            &[("decision", "served")]
        ),
        chunks
    );

    // node-b, same site: everything from node-a, nothing from the seed.
    fx.wait_announced("node-a", &blob);
    fx.fetch("node-b");
    let b_stats = fx.ask_json("node-b", &["cache", "stats"]);
    assert_eq!(u(&b_stats["bytes_from_same_site_peers"]), size, "{b_stats}");
    assert_eq!(u(&b_stats["bytes_from_seed"]), 0, "{b_stats}");
    assert_eq!(u(&b_stats["bytes_from_other_site_peers"]), 0, "{b_stats}");
    assert_eq!(u(&b_stats["bytes_from_peers"]), size, "{b_stats}");
    let a = fx.ask_json("node-a", &["cache", "stats"]);
    assert_eq!(u(&a["bytes_served"]), size, "{a}");
    assert_eq!(u(&a["chunks_served"]), chunks, "{a}");
    // The peer tables of both ends agree with each other and with the byte counters.
    let b_peers = fx.ask_json("node-b", &["peers"]);
    let from_a = b_peers["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"] == "node-a")
        .unwrap_or_else(|| panic!("node-b does not list node-a: {b_peers}"))
        .clone();
    assert_eq!(u(&from_a["chunks_received"]), chunks, "{from_a}");
    assert_eq!(u(&from_a["bytes_received"]), size, "{from_a}");
    assert_eq!(from_a["same_site"], true, "{from_a}");
    assert_eq!(from_a["site"], "east", "{from_a}");
    assert_eq!(from_a["banned"], Value::Null, "{from_a}");
    let a_peers = fx.ask_json("node-a", &["peers"]);
    let to_b = a_peers["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"] == "node-b")
        .unwrap_or_else(|| panic!("node-a does not list node-b: {a_peers}"))
        .clone();
    assert_eq!(u(&to_b["chunks_sent"]), chunks, "{to_b}");
    assert_eq!(u(&to_b["bytes_sent"]), size, "{to_b}");
    let table = fx.ask("node-b", &["peers"]);
    assert!(table.status.success(), "{}", stderr(&table));
    let text = stdout(&table);
    assert!(
        text.starts_with("PEER") && text.contains("node-a") && text.contains("east"),
        "{text}"
    );

    // node-c, another site: everything from the east site's peers.
    fx.wait_announced("node-b", &blob);
    fx.fetch("node-c");
    let c_stats = fx.ask_json("node-c", &["cache", "stats"]);
    assert_eq!(
        u(&c_stats["bytes_from_other_site_peers"]),
        size,
        "{c_stats}"
    );
    assert_eq!(u(&c_stats["bytes_from_same_site_peers"]), 0, "{c_stats}");
    assert_eq!(u(&c_stats["bytes_from_seed"]), 0, "{c_stats}");
    let c_peers = fx.ask_json("node-c", &["peers"]);
    let east: Vec<&Value> = c_peers["peers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["site"] == "east")
        .collect();
    assert!(east.iter().all(|p| p["same_site"] == false), "{c_peers}");
    let got_from_east: u64 = east.iter().map(|p| u(&p["bytes_received"])).sum();
    // Endgame may ask two peers for one chunk: at least the blob, never less.
    assert!(got_from_east >= size, "{c_peers}");
    let served: u64 = ["node-a", "node-b"]
        .iter()
        .map(|n| u(&fx.ask_json(n, &["cache", "stats"])["bytes_served"]))
        .sum();
    assert!(
        served >= 2 * size,
        "east served {served} for two fetches of {size}"
    );

    // /metrics of every node (admin socket; node-c also over TCP) equals its cache stats, and
    // the seed sent exactly node-a's bytes, all from its cache (warmed at publish).
    for node in ["node-a", "node-b", "node-c"] {
        let stats = fx.ask_json(node, &["cache", "stats"]);
        let metrics = node_metrics(&fx.socket(node));
        assert_metrics_match_stats(&metrics, &stats, node);
        assert_eq!(
            sample(&metrics, "pkgmesh_node_transfers_in_flight", &[]),
            0,
            "{node}"
        );
        assert!(metrics.contains_key("pkgmesh_node_packages"), "{node}");
    }
    let c_stats = fx.ask_json("node-c", &["cache", "stats"]);
    assert_metrics_match_stats(&tcp_metrics(&c_metrics), &c_stats, "node-c over TCP");
    let info = node_metrics(&fx.socket("node-c"));
    assert_eq!(
        sample(
            &info,
            "pkgmesh_node_info",
            &[("node", "node-c"), ("site", "west")]
        ),
        1
    );
    let seed = tcp_metrics(&fx.seed_metrics);
    let from_seed: u64 = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|n| u(&fx.ask_json(n, &["cache", "stats"])["bytes_from_seed"]))
        .sum();
    assert_eq!(
        sample(&seed, "pkgmesh_seed_served_bytes_total", &[]),
        from_seed
    );
    assert_eq!(sample(&seed, "pkgmesh_seed_origin_reads_total", &[]), 0);
    assert_eq!(sample(&seed, "pkgmesh_seed_nodes", &[("site", "east")]), 2);
    assert_eq!(sample(&seed, "pkgmesh_seed_nodes", &[("site", "west")]), 1);
    assert!(
        sample(
            &seed,
            "pkgmesh_seed_admission_decisions_total",
            &[("decision", "redirected")]
        ) <= 2 * chunks
    );
    assert_eq!(
        sample(&seed, "pkgmesh_seed_deployments", &[("state", "active")]),
        0
    );

    // cache ls: the blob, named, whole, unpinned; as JSON and as a table.
    let ls = fx.ask_json("node-a", &["cache", "ls"]);
    let blobs = ls["blobs"].as_array().unwrap();
    assert_eq!(blobs.len(), 1, "{ls}");
    let entry = &blobs[0];
    assert_eq!(entry["blob"], blob.as_str());
    assert_eq!(entry["packages"][0]["name"], PACKAGE);
    assert_eq!(entry["packages"][0]["version"], "1.0.0");
    assert_eq!(entry["packages"][0]["file"], file.as_str());
    assert_eq!(u(&entry["size"]), size);
    assert_eq!(u(&entry["chunks_held"]), chunks);
    assert_eq!(u(&entry["chunks_total"]), chunks);
    assert_eq!(entry["complete"], true);
    assert_eq!(entry["pins"], serde_json::json!([]));
    assert!(entry["last_access"].as_u64().is_some(), "{entry}");
    let table = fx.ask("node-a", &["cache", "ls"]);
    let text = stdout(&table);
    assert!(table.status.success(), "{}", stderr(&table));
    assert!(
        text.starts_with("BLOB")
            && text.contains(&blob[..16])
            && text.contains("pkgmesh-sample 1.0.0")
            && text.contains(&format!("{chunks}/{chunks}")),
        "{text}"
    );

    // Names survive without the local file: a restarted node-b learns them from the seed.
    b.stop();
    std::fs::remove_file(fx.data("node-b").join("blob-names.json")).unwrap();
    b = fx.node("node-b", "east", &[]);
    let ls = fx.ask_json("node-b", &["cache", "ls"]);
    assert_eq!(ls["blobs"][0]["packages"][0]["name"], PACKAGE, "{ls}");
    assert_eq!(ls["blobs"][0]["packages"][0]["file"], file.as_str(), "{ls}");

    // pin / unpin, by prefix, with and without a reason; eviction refused while pinned.
    let prefix = &blob[..10];
    let pinned = fx.ask_json(
        "node-a",
        &["cache", "pin", prefix, "--reason", "keep-for-demo"],
    );
    assert_eq!(
        pinned["pins"],
        serde_json::json!(["keep-for-demo"]),
        "{pinned}"
    );
    let ls = fx.ask_json("node-a", &["cache", "ls"]);
    assert_eq!(ls["blobs"][0]["pins"], serde_json::json!(["keep-for-demo"]));
    let stats = fx.ask_json("node-a", &["cache", "stats"]);
    assert_eq!(u(&stats["pinned_bytes"]), size, "{stats}");
    assert_eq!(
        sample(
            &node_metrics(&fx.socket("node-a")),
            "pkgmesh_node_cache_pinned_bytes",
            &[]
        ),
        size
    );
    let table = fx.ask("node-a", &["cache", "pin", prefix]);
    assert!(table.status.success(), "{}", stderr(&table));
    assert!(stdout(&table).contains("pinned"), "{}", stdout(&table));
    assert!(
        stdout(&table).contains("keep-for-demo, operator"),
        "{}",
        stdout(&table)
    );
    let refused = fx.ask("node-a", &["cache", "evict", &blob]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr(&refused).contains("pinned"), "{}", stderr(&refused));
    let unpinned = fx.ask_json("node-a", &["cache", "unpin", prefix]);
    assert_eq!(unpinned["pins"], serde_json::json!(["keep-for-demo"]));
    let wrong = fx.ask("node-a", &["cache", "unpin", prefix]);
    assert_eq!(wrong.status.code(), Some(1));
    assert!(
        stderr(&wrong).contains("keep-for-demo") && stderr(&wrong).contains("--reason"),
        "{}",
        stderr(&wrong)
    );
    let table = fx.ask(
        "node-a",
        &["cache", "unpin", prefix, "--reason", "keep-for-demo"],
    );
    assert!(table.status.success(), "{}", stderr(&table));
    assert!(
        stdout(&table).contains("no pins left"),
        "{}",
        stdout(&table)
    );
    let ls = fx.ask_json("node-a", &["cache", "ls"]);
    assert_eq!(ls["blobs"][0]["pins"], serde_json::json!([]));
    let reserved = fx.ask(
        "node-a",
        &["cache", "pin", prefix, "--reason", "download in progress"],
    );
    assert_eq!(reserved.status.code(), Some(1), "{}", stderr(&reserved));
    // Usage errors exit 2, failures 1, each saying what to do.
    let bad = fx.ask("node-a", &["cache", "evict", "not-a-blob"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    let other = if blob.starts_with("0000") {
        "ffff"
    } else {
        "0000"
    };
    let none = fx.ask("node-a", &["cache", "evict", other]);
    assert_eq!(none.status.code(), Some(1));
    assert!(stderr(&none).contains("cache ls"), "{}", stderr(&none));
    let no_node = run_pkgmesh(["cache", "ls"]);
    assert_eq!(no_node.status.code(), Some(2), "{}", stderr(&no_node));

    // verify: a chunk rotted on disk is found, listed (exit 1) and dropped.
    let clean = fx.ask_json("node-b", &["cache", "verify"]);
    assert_eq!(u(&clean["chunks_checked"]), chunks, "{clean}");
    assert_eq!(clean["rotted"], serde_json::json!([]));
    let chunk_file = fx
        .data("node-b")
        .join("cache/chunks")
        .join(&blob[..2])
        .join(format!("{blob}.1"));
    let mut bytes = std::fs::read(&chunk_file).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&chunk_file, &bytes).unwrap();
    let rotted = fx.ask("node-b", &["cache", "verify", prefix, "--json"]);
    assert_eq!(rotted.status.code(), Some(1), "{}", stderr(&rotted));
    let report = stdout_json(&rotted);
    assert_eq!(report["rotted"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(report["rotted"][0]["index"], 1, "{report}");
    assert_eq!(report["rotted"][0]["id"], blob.as_str(), "{report}");
    let ls = fx.ask_json("node-b", &["cache", "ls"]);
    assert_eq!(u(&ls["blobs"][0]["chunks_held"]), chunks - 1, "{ls}");
    assert_eq!(ls["blobs"][0]["complete"], false, "{ls}");
    let again = fx.ask("node-b", &["cache", "verify"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        stdout(&again).contains("every chunk is intact"),
        "{}",
        stdout(&again)
    );
    let stats = fx.ask_json("node-b", &["cache", "stats"]);
    assert_eq!(u(&stats["rotted_chunks"]), 1, "{stats}");

    // evict on node-c: the cache is empty afterwards.
    let evicted = fx.ask_json("node-c", &["cache", "evict", &blob]);
    assert_eq!(u(&evicted["freed_bytes"]), size, "{evicted}");
    let ls = fx.ask_json("node-c", &["cache", "ls"]);
    assert_eq!(ls["blobs"], serde_json::json!([]));
    let stats = fx.ask_json("node-c", &["cache", "stats"]);
    assert_eq!(u(&stats["used_bytes"]), 0, "{stats}");
    let table = fx.ask("node-c", &["cache", "ls"]);
    assert!(stdout(&table).contains("empty"), "{}", stdout(&table));
    let table = fx.ask("node-c", &["cache", "stats"]);
    assert!(table.status.success(), "{}", stderr(&table));
    assert!(
        stdout(&table).contains(&format!("({size} bytes)")),
        "{}",
        stdout(&table)
    );

    // nodes: every node with its site, tags and cache use as the tracker sees it.
    wait_for("the tracker sees node-c's eviction", || {
        let output = fx.ask_seed(&fx.operator, &["nodes", "--json"]);
        assert!(output.status.success(), "{}", stderr(&output));
        let nodes = stdout_json(&output);
        let held = |name: &str| {
            nodes["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["node"] == name)
                .map(|n| u(&n["bytes_held"]))
        };
        held("node-c") == Some(0) && held("node-a") == Some(size)
    });
    let output = fx.ask_seed(&fx.operator, &["nodes", "--json"]);
    let nodes = stdout_json(&output);
    let list = nodes["nodes"].as_array().unwrap();
    assert_eq!(list.len(), 3, "{nodes}");
    let a_row = list.iter().find(|n| n["node"] == "node-a").unwrap();
    assert_eq!(a_row["site"], "east");
    assert_eq!(a_row["tags"], serde_json::json!([["role", "web"]]));
    assert_eq!(u(&a_row["complete_blobs"]), 1);
    assert_eq!(u(&a_row["chunks_held"]), chunks);
    let table = fx.ask_seed(&fx.operator, &["nodes"]);
    assert!(table.status.success(), "{}", stderr(&table));
    let text = stdout(&table);
    assert!(
        text.starts_with("NODE") && text.contains("role=web") && text.contains("west"),
        "{text}"
    );
    let refused = fx.ask_seed(&fx.publisher, &["nodes"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains("operator"),
        "{}",
        stderr(&refused)
    );

    // preheat: node-d in a new site fetches before anything asks it to install.
    let _d = fx.node("node-d", "north", &[]);
    wait_for("node-d known to the tracker", || {
        let output = fx.ask_seed(&fx.operator, &["nodes", "--json"]);
        stdout_json(&output)["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["node"] == "node-d")
    });
    let output = fx.ask_seed(
        &fx.deployer,
        &["preheat", PACKAGE, "--site", "north", "--wait", "--json"],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let preheat = stdout_json(&output);
    let chosen = preheat["nodes"].as_array().unwrap();
    assert_eq!(chosen.len(), 1, "{preheat}");
    assert_eq!(chosen[0]["node"], "node-d");
    assert_eq!(chosen[0]["state"], "complete", "{preheat}");
    assert_eq!(chosen[0]["reply"]["file"], file.as_str());
    assert_eq!(u(&chosen[0]["reply"]["size"]), size);
    fx.wait_idle("node-d");
    let ls = fx.ask_json("node-d", &["cache", "ls"]);
    assert_eq!(ls["blobs"][0]["blob"], blob.as_str(), "{ls}");
    assert_eq!(ls["blobs"][0]["complete"], true, "{ls}");
    assert_eq!(ls["blobs"][0]["packages"][0]["name"], PACKAGE, "{ls}");
    // A preheated package is pinned until it is installed, so eviction cannot undo it.
    wait_for("node-d's preheat pin", || {
        fx.ask_json("node-d", &["cache", "ls"])["blobs"][0]["pins"]
            == serde_json::json!(["preheat"])
    });
    // The preheat is in node-d's audit log, with the deployer who asked.
    let audit = fx.ask_json("node-d", &["node-audit"]);
    let records = audit["records"].as_array().unwrap();
    assert!(
        records.iter().any(|r| r["action"] == "preheat"
            && r["target"] == PACKAGE
            && r["outcome"] == "ok"
            && r["roles"]
                .as_array()
                .unwrap()
                .contains(&serde_json::json!("deployer"))),
        "{audit}"
    );
    let d_stats = fx.ask_json("node-d", &["cache", "stats"]);
    assert_eq!(
        u(&d_stats["bytes_from_seed"])
            + u(&d_stats["bytes_from_same_site_peers"])
            + u(&d_stats["bytes_from_other_site_peers"]),
        size,
        "{d_stats}"
    );
    assert_eq!(u(&d_stats["bytes_from_same_site_peers"]), 0, "{d_stats}");
    // One node per site by default, as a table.
    let table = fx.ask_seed(&fx.operator, &["preheat", &format!("{PACKAGE}@1.0.0")]);
    assert!(table.status.success(), "{}", stderr(&table));
    let text = stdout(&table);
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("node-")).collect();
    assert_eq!(rows.len(), 3, "one node per site: {text}");
    // node-a and node-d hold it all; node-c evicted it and starts again.
    for (row, node) in rows.iter().zip(["node-a", "node-d", "node-c"]) {
        assert!(row.starts_with(node), "{text}");
    }
    assert!(
        rows[0].contains("complete") && rows[1].contains("complete"),
        "{text}"
    );
    assert!(
        rows[2].contains("started") || rows[2].contains("complete"),
        "{text}"
    );
    let nowhere = fx.ask_seed(&fx.operator, &["preheat", PACKAGE, "--site", "nowhere"]);
    assert_eq!(nowhere.status.code(), Some(1));
    assert!(stderr(&nowhere).contains("north"), "{}", stderr(&nowhere));
    let missing = fx.ask_seed(
        &fx.operator,
        &["preheat", "no-such-package", "--site", "north"],
    );
    assert_eq!(missing.status.code(), Some(1));
    assert!(stdout(&missing).contains("failed"), "{}", stdout(&missing));
    let usage = fx.ask_seed(&fx.operator, &["preheat", "@1.0.0"]);
    assert_eq!(usage.status.code(), Some(2), "{}", stderr(&usage));

    // install-log: the last action's scripts and their output.
    let install = fx.ask_json("node-a", &["install", PACKAGE]);
    assert_eq!(install["succeeded"], true, "{install}");
    // node-a was preheated above; installing used it up and took its pin away.
    let ls = fx.ask_json("node-a", &["cache", "ls"]);
    assert_eq!(ls["blobs"][0]["pins"], serde_json::json!([]), "{ls}");
    // Every change made through node-a's admin socket is in its audit log, by uid.
    let audit = fx.ask_json("node-a", &["node-audit"]);
    let records = audit["records"].as_array().unwrap();
    for action in [
        "fetch",
        "cache-pin",
        "cache-unpin",
        "cache-evict",
        "install",
    ] {
        assert!(
            records.iter().any(|r| r["action"] == action
                && r["caller"].as_str().unwrap().starts_with("uid ")),
            "no {action} record in {audit}"
        );
    }
    assert!(
        records.iter().any(|r| r["action"] == "cache-evict"
            && r["outcome"].as_str().unwrap().starts_with("failed")),
        "the refused eviction of a pinned blob is audited: {audit}"
    );
    let table = fx.ask("node-a", &["node-audit"]);
    assert!(
        stdout(&table).contains("OUTCOME") && stdout(&table).contains("cache-pin"),
        "{}",
        stdout(&table)
    );
    let log = fx.ask_json("node-a", &["install-log", PACKAGE]);
    assert_eq!(log["record"]["state"], "installed", "{log}");
    let actions = log["actions"].as_array().unwrap();
    assert_eq!(actions[0]["action"], "install", "{log}");
    assert!(
        actions[0]["log"]
            .as_str()
            .unwrap()
            .contains("installed into"),
        "{log}"
    );
    let table = fx.ask("node-a", &["install-log", PACKAGE]);
    assert!(table.status.success(), "{}", stderr(&table));
    let text = stdout(&table);
    assert!(
        text.contains("--- install 1.0.0") && text.contains("installed into"),
        "{text}"
    );
    let unknown = fx.ask("node-a", &["install-log", "never-installed"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        stderr(&unknown).contains("pkgmesh installed"),
        "{}",
        stderr(&unknown)
    );
    let metrics = node_metrics(&fx.socket("node-a"));
    assert_eq!(
        sample(&metrics, "pkgmesh_node_packages", &[("state", "installed")]),
        1
    );
    drop(b);
}
