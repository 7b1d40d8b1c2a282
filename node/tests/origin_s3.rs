//! The origin store against real backends: an S3-protocol server (`moto_server`, started here
//! as a child process), a local directory, and a plain HTTP server (started here, in-process)
//! for the read-only HTTP backend.

use std::net::{TcpListener as StdListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pkgmesh_node::origin::{Origin, OriginError, OriginOptions, PART_SIZE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BUCKET: &str = "pkgmesh-test";

fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Deterministic incompressible bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------------------------
// moto_server

struct Moto {
    child: Child,
    endpoint: String,
    _log: tempfile::TempDir,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// One blocking HTTP/1.1 exchange; returns the status line and headers.
fn http_head(port: u16, request: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(request.as_bytes())?;
    let mut buf = vec![0u8; 8192];
    let mut got = 0;
    while got < buf.len() {
        let n = s.read(&mut buf[got..])?;
        if n == 0 {
            break;
        }
        got += n;
        if buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&buf[..got]).into_owned();
    Ok(text.split("\r\n\r\n").next().unwrap_or("").to_string())
}

fn http_status(port: u16, request: &str) -> std::io::Result<String> {
    Ok(http_head(port, request)?
        .lines()
        .next()
        .unwrap_or("")
        .to_string())
}

fn start_moto() -> Moto {
    let exe = find_on_path("moto_server").unwrap_or_else(|| {
        panic!(
            "moto_server is not installed: run `pip install \"moto[server]\"` \
             (CI installs it; the S3 origin tests need a real S3-protocol server)"
        )
    });
    let port = free_port();
    let log = tempfile::tempdir().unwrap();
    let out = std::fs::File::create(log.path().join("moto.log")).unwrap();
    let child = Command::new(exe)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .expect("start moto_server");
    let moto = Moto {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
        _log: log,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let probe = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        if let Ok(status) = http_status(port, probe) {
            if status.starts_with("HTTP/1.") {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "moto_server did not answer on port {port} within 60 s; log:\n{}",
            std::fs::read_to_string(moto._log.path().join("moto.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Create the bucket with a plain PUT (moto does not check signatures).
    let put = format!(
        "PUT /{BUCKET} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let status = http_status(port, &put).unwrap();
    assert!(status.contains(" 200"), "bucket creation: {status}");
    moto
}

fn s3_options(endpoint: &str) -> OriginOptions {
    OriginOptions {
        s3_endpoint: Some(endpoint.to_string()),
        s3_region: Some("us-east-1".into()),
        s3_access_key_id: Some("testing".into()),
        s3_secret_access_key: Some("testing".into()),
        allow_http: true,
        ..OriginOptions::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Shared assertions for writable origins

const BIG_KEY: &str = "packages/demo/1.0.0/demo-linux.zip";

/// Uploads a file bigger than two multipart parts plus small and empty ones, then reads
/// ranges back and checks missing objects, existence, deletes and key validation.
async fn exercise_writable(origin: &Origin, scratch: &Path) -> Vec<u8> {
    assert!(!origin.is_read_only());
    let big = noise(2 * PART_SIZE + 3 * 1024 * 1024 + 12_345, 7);
    let big_path = scratch.join("big.zip");
    std::fs::write(&big_path, &big).unwrap();
    origin.put_file(BIG_KEY, &big_path).await.unwrap();

    assert_eq!(origin.size(BIG_KEY).await.unwrap(), big.len() as u64);
    assert!(origin.exists(BIG_KEY).await.unwrap());
    let len = big.len() as u64;
    let ranges = [
        0..100,                                       // first bytes
        PART_SIZE as u64 - 10..PART_SIZE as u64 + 10, // across a part boundary
        5_000_000..5_000_000 + 262_144,               // a chunk in the middle
        len - (len % 262_144)..len,                   // the last, partial chunk
        len - 1..len,                                 // the very last byte
    ];
    for r in ranges {
        let got = origin.get_range(BIG_KEY, r.clone()).await.unwrap();
        assert!(
            got[..] == big[r.start as usize..r.end as usize],
            "range {r:?} differs"
        );
    }
    assert!(origin.get_range(BIG_KEY, 10..10).await.unwrap().is_empty());
    // Past the end is an error, never a silently short chunk.
    assert!(origin.get_range(BIG_KEY, len - 10..len + 10).await.is_err());

    // Small (one PUT) and empty files; overwriting replaces.
    let small_path = scratch.join("small.zip");
    std::fs::write(&small_path, b"small zip").unwrap();
    origin
        .put_file("packages/demo/1.0.0/small.zip", &small_path)
        .await
        .unwrap();
    assert_eq!(
        origin
            .get_range("packages/demo/1.0.0/small.zip", 0..9)
            .await
            .unwrap(),
        &b"small zip"[..]
    );
    std::fs::write(&small_path, b"replaced!!").unwrap();
    origin
        .put_file("packages/demo/1.0.0/small.zip", &small_path)
        .await
        .unwrap();
    assert_eq!(
        origin.size("packages/demo/1.0.0/small.zip").await.unwrap(),
        10
    );
    let empty_path = scratch.join("empty.zip");
    std::fs::write(&empty_path, b"").unwrap();
    origin.put_file("empty.zip", &empty_path).await.unwrap();
    assert_eq!(origin.size("empty.zip").await.unwrap(), 0);

    // A missing object: NotFound naming the key and the origin, from every read.
    let missing = "packages/demo/9.9.9/missing.zip";
    match origin.size(missing).await {
        Err(e @ OriginError::NotFound { .. }) => {
            let message = e.to_string();
            assert!(message.contains(missing), "{message}");
            assert!(message.contains(origin.url()), "{message}");
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(matches!(
        origin.get_range(missing, 0..10).await,
        Err(OriginError::NotFound { .. })
    ));
    assert!(!origin.exists(missing).await.unwrap());
    // A missing local file to upload names the file.
    let err = origin
        .put_file("x.zip", &scratch.join("no-such-file"))
        .await
        .unwrap_err();
    assert!(matches!(err, OriginError::Io { .. }), "{err:?}");

    // Keys are relative paths without tricks.
    for bad in [
        "",
        "/abs.zip",
        "../up.zip",
        "a/../b.zip",
        "a//b.zip",
        "a/./b",
        "dir/",
        "a\\b",
        "a#1",
    ] {
        match origin.size(bad).await {
            Err(OriginError::BadKey { .. }) => {}
            other => panic!("key {bad:?}: expected BadKey, got {other:?}"),
        }
        assert!(matches!(
            origin.put_file(bad, &small_path).await,
            Err(OriginError::BadKey { .. })
        ));
    }

    // Delete, and deleting again is harmless.
    origin.delete("empty.zip").await.unwrap();
    assert!(!origin.exists("empty.zip").await.unwrap());
    origin.delete("empty.zip").await.unwrap();
    big
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_origin_against_moto_server() {
    install_crypto();
    let moto = start_moto();
    let scratch = tempfile::tempdir().unwrap();
    let url = format!("s3://{BUCKET}/fleet/origin");
    let origin = Origin::from_url(&url, &s3_options(&moto.endpoint)).unwrap();
    assert_eq!(origin.url(), url);
    let big = exercise_writable(&origin, scratch.path()).await;

    // The big file went up as a multipart upload: S3 gives those an ETag ending in "-<parts>".
    let port: u16 = moto.endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let head = http_head(
        port,
        &format!(
            "HEAD /{BUCKET}/fleet/origin/{BIG_KEY} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
             Connection: close\r\n\r\n"
        ),
    )
    .unwrap();
    let etag = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("etag:")
                .map(str::to_string)
        })
        .unwrap_or_default();
    assert!(
        etag.trim().trim_matches('"').ends_with("-3"),
        "not multipart: {head}"
    );

    // The prefix really is a prefix inside the bucket.
    let whole = Origin::from_url(&format!("s3://{BUCKET}"), &s3_options(&moto.endpoint)).unwrap();
    let full_key = format!("fleet/origin/{BIG_KEY}");
    assert_eq!(whole.size(&full_key).await.unwrap(), big.len() as u64);
    assert!(!whole.exists(BIG_KEY).await.unwrap());

    // A bucket that does not exist: a clear error naming the origin, not a hang or a panic.
    let nobucket = Origin::from_url("s3://no-such-bucket", &s3_options(&moto.endpoint)).unwrap();
    let err = nobucket.size(BIG_KEY).await.unwrap_err();
    assert!(err.to_string().contains("s3://no-such-bucket"), "{err}");

    // Plain http endpoints need allow_http.
    let strict = OriginOptions {
        allow_http: false,
        ..s3_options(&moto.endpoint)
    };
    assert!(matches!(
        Origin::from_url(&url, &strict),
        Err(OriginError::BadUrl { .. })
    ));
    drop(moto);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_directory_origin() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("origin/store");
    let origin = Origin::local(&dir).unwrap();
    assert!(dir.is_dir(), "local() creates the directory");
    assert_eq!(origin.url(), format!("file://{}", dir.display()));
    let work = scratch.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let big = exercise_writable(&origin, &work).await;

    // The object is a plain file at the key's path, and no staged upload is left behind.
    assert_eq!(std::fs::read(dir.join(BIG_KEY)).unwrap(), big);
    let mut leftovers = Vec::new();
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().contains('#') {
                leftovers.push(p);
            }
        }
    }
    assert!(leftovers.is_empty(), "staged uploads left: {leftovers:?}");

    // The same directory through a file:// URL.
    let by_url = Origin::from_url(
        &format!("file://{}", dir.display()),
        &OriginOptions::default(),
    )
    .unwrap();
    assert_eq!(by_url.size(BIG_KEY).await.unwrap(), big.len() as u64);

    for bad in [
        "file://relative/dir",
        "ftp://host/x",
        "no-scheme",
        "s3://",
        "s3://UPPER",
        "http://127.0.0.1:1/x",
    ] {
        match Origin::from_url(bad, &OriginOptions::default()) {
            Err(e @ OriginError::BadUrl { .. }) => {
                assert!(e.to_string().contains(bad), "{e}");
            }
            other => panic!("{bad}: expected BadUrl, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A tiny HTTP/1.1 file server with range support, counting requests in flight.

#[derive(Default)]
struct Stats {
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    requests: AtomicUsize,
}

async fn serve(listener: tokio::net::TcpListener, root: PathBuf, stats: Arc<Stats>) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(handle(sock, root.clone(), stats.clone()));
    }
}

async fn handle(mut sock: tokio::net::TcpStream, root: PathBuf, stats: Arc<Stats>) {
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
        if req.len() > 16 * 1024 {
            return;
        }
    }
    let now = stats.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    stats.max_in_flight.fetch_max(now, Ordering::SeqCst);
    stats.requests.fetch_add(1, Ordering::SeqCst);
    // Hold the request open a little so concurrent requests overlap if the client lets them.
    tokio::time::sleep(Duration::from_millis(40)).await;

    let text = String::from_utf8_lossy(&req).into_owned();
    let mut lines = text.lines();
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let method = first.next().unwrap_or("").to_string();
    let target = first.next().unwrap_or("").to_string();
    let range = lines.find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if !k.eq_ignore_ascii_case("range") {
            return None;
        }
        let (a, b) = v.trim().strip_prefix("bytes=")?.split_once('-')?;
        Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?))
    });
    let rel = target.strip_prefix("/base/").unwrap_or("");
    let file = if rel.is_empty() || rel.split('/').any(|c| c == ".." || c.is_empty()) {
        None
    } else {
        std::fs::read(root.join(rel)).ok()
    };
    let response: Vec<u8> = match (file, method.as_str()) {
        (None, _) => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            .to_vec(),
        (Some(body), "HEAD") => format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes(),
        (Some(body), "GET") => match range {
            Some((a, b)) if a < body.len() as u64 => {
                let b = b.min(body.len() as u64 - 1);
                let mut r = format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/{}\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len(),
                    b - a + 1
                )
                .into_bytes();
                r.extend_from_slice(&body[a as usize..=b as usize]);
                r
            }
            Some(_) => b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                .to_vec(),
            None => {
                let mut r = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                r.extend_from_slice(&body);
                r
            }
        },
        _ => b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            .to_vec(),
    };
    // Counted from the request received to just before the response leaves: strictly inside
    // the time the client holds its permit, so the count never exceeds the client's cap.
    stats.in_flight.fetch_sub(1, Ordering::SeqCst);
    let _ = sock.write_all(&response).await;
    let _ = sock.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_origin_is_read_only_and_capped() {
    install_crypto();
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path().join("www");
    let content = noise(1_000_000, 3);
    let key = "packages/demo/1.0.0/demo.zip";
    std::fs::create_dir_all(root.join("packages/demo/1.0.0")).unwrap();
    std::fs::write(root.join(key), &content).unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stats = Arc::new(Stats::default());
    let server = tokio::spawn(serve(listener, root.clone(), stats.clone()));

    let options = OriginOptions {
        allow_http: true,
        max_in_flight: Some(2),
        ..OriginOptions::default()
    };
    // A trailing slash on the base URL must not double the slash before keys.
    let origin = Origin::from_url(&format!("http://127.0.0.1:{port}/base/"), &options).unwrap();
    assert!(origin.is_read_only());
    assert_eq!(origin.size(key).await.unwrap(), content.len() as u64);
    assert!(origin.exists(key).await.unwrap());
    let got = origin.get_range(key, 1000..263_144).await.unwrap();
    assert!(got[..] == content[1000..263_144]);
    let tail = origin.get_range(key, 999_990..1_000_000).await.unwrap();
    assert!(tail[..] == content[999_990..]);
    assert!(matches!(
        origin.size("packages/none.zip").await,
        Err(OriginError::NotFound { .. })
    ));
    assert!(!origin.exists("packages/none.zip").await.unwrap());

    // Writes are refused before any request is made.
    let before = stats.requests.load(Ordering::SeqCst);
    let local = scratch.path().join("upload.zip");
    std::fs::write(&local, b"x").unwrap();
    match origin.put_file("packages/new.zip", &local).await {
        Err(e @ OriginError::ReadOnly { .. }) => {
            assert!(e.to_string().contains("packages/new.zip"), "{e}");
            assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
        }
        other => panic!("expected ReadOnly, got {other:?}"),
    }
    assert!(matches!(
        origin.delete(key).await,
        Err(OriginError::ReadOnly { .. })
    ));
    assert_eq!(stats.requests.load(Ordering::SeqCst), before);

    // Twelve chunk reads at once through a cap of two: the server never sees more than two.
    stats.max_in_flight.store(0, Ordering::SeqCst);
    let reads = (0..12u64).map(|i| {
        let origin = origin.clone();
        async move { origin.get_range(key, i * 50_000..i * 50_000 + 50_000).await }
    });
    for (i, r) in futures::future::join_all(reads)
        .await
        .into_iter()
        .enumerate()
    {
        let i = i as u64;
        assert!(r.unwrap()[..] == content[(i * 50_000) as usize..(i * 50_000 + 50_000) as usize]);
    }
    let max = stats.max_in_flight.load(Ordering::SeqCst);
    assert!((1..=2).contains(&max), "max in flight {max}");

    // Plain http needs allow_http.
    assert!(matches!(
        Origin::from_url(
            &format!("http://127.0.0.1:{port}/base"),
            &OriginOptions::default()
        ),
        Err(OriginError::BadUrl { .. })
    ));
    server.abort();
}
