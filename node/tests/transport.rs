//! The QUIC transport with mutual TLS, over real UDP on 127.0.0.1: who gets in, who is refused
//! and where, the Hello exchange, framing limits and timeouts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pkgmesh_node::pki::{self, Identity, PeerIdentity, Role};
use pkgmesh_node::transport::{
    self, connect, make_endpoint, read_frame, reload_identity, reply_error, request, require_role,
    serve, serve_with, write_frame, PeerConnection, RequestContext, RequestHandler, ServeLimits,
    TransportError,
};
use pkgmesh_protocol::wire::{self, ErrorCode, Hello, Request, Response, PROTOCOL_VERSION};
use quinn::{Endpoint, RecvStream, SendStream};
use time::OffsetDateTime;

/// A Ping with this nonce is never answered: the handler holds the stream open.
const STALL: u64 = u64::MAX;
/// Generous: only failures wait this long.
const PATIENCE: Duration = Duration::from_secs(10);

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    transport::install_crypto_provider();
}

/// A fleet CA in a temporary directory, issuing identities on demand.
struct Fleet {
    dir: tempfile::TempDir,
}

impl Fleet {
    fn new(name: &str) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        pki::init_ca(&dir.path().join("ca"), name).unwrap();
        Fleet { dir }
    }

    fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    fn issue_dir(&self, name: &str, roles: &[Role]) -> PathBuf {
        let out = self.dir.path().join(name);
        pki::issue(&self.ca_dir(), name, roles, 30, &out).unwrap();
        out
    }

    fn identity(&self, name: &str, roles: &[Role]) -> Identity {
        Identity::load(&self.issue_dir(name, roles)).unwrap()
    }
}

#[derive(Default)]
struct TestHandler {
    refused: Mutex<Vec<(SocketAddr, String)>>,
    callers: Mutex<Vec<PeerIdentity>>,
}

impl RequestHandler for TestHandler {
    async fn handle(
        &self,
        ctx: RequestContext,
        request: Request,
        mut send: SendStream,
        _recv: RecvStream,
    ) {
        self.callers.lock().unwrap().push(ctx.peer.clone());
        match request {
            Request::Ping { nonce: STALL } => {
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            Request::Ping { nonce } => {
                if let Err(reply) = require_role(&ctx, &[Role::Node, Role::Publisher]) {
                    reply_error(&mut send, reply.code, reply.message).await;
                    return;
                }
                write_frame(&mut send, &Response::Pong { nonce })
                    .await
                    .unwrap();
                send.finish().unwrap();
            }
            other => {
                reply_error(&mut send, ErrorCode::NotFound, format!("{other:?}")).await;
            }
        }
    }

    fn handshake_refused(&self, remote: SocketAddr, reason: String) {
        self.refused.lock().unwrap().push((remote, reason));
    }
}

impl TestHandler {
    /// Waits (bounded) for the server to report a refused handshake and returns its reason.
    async fn wait_refused(&self) -> String {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some((_, reason)) = self.refused.lock().unwrap().first() {
                return reason.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the server never reported the refused handshake"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

struct Server {
    endpoint: Endpoint,
    addr: SocketAddr,
    handler: Arc<TestHandler>,
}

fn start_server(identity: &Identity) -> Server {
    start_server_with(identity, ServeLimits::default())
}

fn start_server_with(identity: &Identity, limits: ServeLimits) -> Server {
    let endpoint = make_endpoint(localhost(), identity).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let handler = Arc::new(TestHandler::default());
    let serving = endpoint.clone();
    let serving_handler = handler.clone();
    if limits.request_timeout == transport::REQUEST_TIMEOUT {
        tokio::spawn(serve(serving, serving_handler));
    } else {
        tokio::spawn(serve_with(serving, serving_handler, limits));
    }
    Server {
        endpoint,
        addr,
        handler,
    }
}

async fn ping(conn: &PeerConnection, nonce: u64) -> Response {
    let (response, _send, _recv) = request(conn, &Request::Ping { nonce }, PATIENCE)
        .await
        .unwrap();
    response
}

#[tokio::test]
async fn mutual_tls_hello_and_a_round_trip() {
    init_tracing();
    let fleet = Fleet::new("fleet");
    let server = start_server(&fleet.identity("seed-1", &[Role::Seed]));
    let client_identity = fleet.identity("node-1", &[Role::Node]);
    let client = make_endpoint(localhost(), &client_identity).unwrap();

    let conn = connect(&client, server.addr, Role::Seed, PATIENCE)
        .await
        .unwrap();
    assert_eq!(conn.protocol_version, PROTOCOL_VERSION);
    assert_eq!(conn.peer.name, "seed-1");
    assert_eq!(conn.peer.roles, vec![Role::Seed]);

    for nonce in [1, 2, 3] {
        assert_eq!(ping(&conn, nonce).await, Response::Pong { nonce });
    }
    let callers = server.handler.callers.lock().unwrap().clone();
    assert_eq!(callers.len(), 3);
    assert_eq!(callers[0], client_identity.peer_identity());
    assert!(server.handler.refused.lock().unwrap().is_empty());

    // The endpoint that serves also dials: the server reaches the client's endpoint too.
    let client_handler = Arc::new(TestHandler::default());
    tokio::spawn(serve(client.clone(), client_handler));
    let back = connect(
        &server.endpoint,
        client.local_addr().unwrap(),
        Role::Node,
        PATIENCE,
    )
    .await
    .unwrap();
    assert_eq!(back.peer.name, "node-1");
}

#[tokio::test]
async fn roles_round_trip_through_the_certificate_and_gate_requests() {
    init_tracing();
    let fleet = Fleet::new("fleet");
    let server = start_server(&fleet.identity("seed-1", &[Role::Seed, Role::Node]));

    let identity = fleet.identity("release-bot", &[Role::Deployer, Role::Publisher]);
    assert_eq!(identity.roles(), &[Role::Publisher, Role::Deployer]);
    let client = make_endpoint(localhost(), &identity).unwrap();
    let conn = connect(&client, server.addr, Role::Node, PATIENCE)
        .await
        .unwrap();
    assert_eq!(conn.peer.roles, vec![Role::Seed, Role::Node]);
    assert_eq!(ping(&conn, 7).await, Response::Pong { nonce: 7 });
    let seen = server.handler.callers.lock().unwrap()[0].clone();
    assert_eq!(seen.name, "release-bot");
    assert_eq!(seen.roles, vec![Role::Publisher, Role::Deployer]);
    assert_eq!(seen.serial, identity.serial());

    // An operator may not ping this handler: the refusal names caller, roles and need.
    let operator = make_endpoint(localhost(), &fleet.identity("ops", &[Role::Operator])).unwrap();
    let conn = connect(&operator, server.addr, Role::Seed, PATIENCE)
        .await
        .unwrap();
    match ping(&conn, 8).await {
        Response::Error(reply) => {
            assert_eq!(reply.code, ErrorCode::Forbidden);
            assert!(reply.message.contains("`ops`"), "{}", reply.message);
            assert!(reply.message.contains("operator"), "{}", reply.message);
            assert!(
                reply.message.contains("node, publisher"),
                "{}",
                reply.message
            );
        }
        other => panic!("expected Forbidden, got {other:?}"),
    }
}

#[tokio::test]
async fn connect_refuses_a_server_without_the_expected_role() {
    init_tracing();
    let fleet = Fleet::new("fleet");
    let server = start_server(&fleet.identity("node-9", &[Role::Node]));
    let client = make_endpoint(localhost(), &fleet.identity("node-1", &[Role::Node])).unwrap();
    let error = connect(&client, server.addr, Role::Seed, PATIENCE)
        .await
        .unwrap_err();
    match &error {
        TransportError::WrongRole { peer, expected, .. } => {
            assert_eq!(peer.name, "node-9");
            assert_eq!(*expected, Role::Seed);
        }
        other => panic!("expected WrongRole, got {other:?}"),
    }
    assert!(error.to_string().contains("node-9"), "{error}");
}

#[tokio::test]
async fn a_client_from_another_ca_is_refused_at_the_handshake() {
    init_tracing();
    let fleet = Fleet::new("fleet");
    let server = start_server(&fleet.identity("seed-1", &[Role::Seed]));
    let other = Fleet::new("other fleet");
    let client = make_endpoint(localhost(), &other.identity("intruder", &[Role::Admin])).unwrap();

    // The client cannot even accept the server (other CA), so it gives up first; the server
    // sees the handshake end and reports it.
    assert!(connect(&client, server.addr, Role::Seed, PATIENCE)
        .await
        .is_err());
    let reason = server.handler.wait_refused().await;
    assert!(reason.contains("handshake"), "{reason}");
    assert!(server.handler.callers.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused_by_the_server() {
    init_tracing();
    let fleet = Fleet::new("fleet");
    let server = start_server(&fleet.identity("seed-1", &[Role::Seed]));
    // The intruder trusts our CA (it knows ca.pem, which is public) but its own certificate was
    // signed by another CA: only the server's verification stops it.
    let other = Fleet::new("other fleet");
    let intruder_dir = other.issue_dir("intruder", &[Role::Admin]);
    std::fs::copy(
        fleet.ca_dir().join(pki::CA_CERT_FILE),
        intruder_dir.join(pki::CA_CERT_FILE),
    )
    .unwrap();
    let config = client_config_with_foreign_cert(&fleet.ca_dir(), &intruder_dir);
    let mut client = Endpoint::client(localhost()).unwrap();
    client.set_default_client_config(config);

    let error = connect(&client, server.addr, Role::Seed, PATIENCE)
        .await
        .unwrap_err();
    // The client is told why, not only that the connection went.
    assert!(
        error.to_string().to_lowercase().contains("unknownissuer"),
        "{error}"
    );
    let reason = server.handler.wait_refused().await;
    assert!(reason.contains("UnknownIssuer"), "{reason}");
    assert!(server.handler.callers.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    init_tracing();
    let fleet = Fleet::new("fleet");
    let server = start_server(&fleet.identity("seed-1", &[Role::Seed]));
    let mut client = Endpoint::client(localhost()).unwrap();
    client.set_default_client_config(client_config_without_cert(&fleet.ca_dir()));

    let error = connect(&client, server.addr, Role::Seed, PATIENCE)
        .await
        .unwrap_err();
    // The client is told why, not only that the connection went.
    assert!(
        error.to_string().to_lowercase().contains("certificate"),
        "{error}"
    );
    let reason = server.handler.wait_refused().await;
    assert!(reason.contains("certificate"), "{reason}");
    assert!(server.handler.callers.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_server_from_another_ca_is_refused_by_the_client() {
    init_tracing();
    let other = Fleet::new("other fleet");
    let server = start_server(&other.identity("fake-seed", &[Role::Seed]));
    let fleet = Fleet::new("fleet");
    let client = make_endpoint(localhost(), &fleet.identity("node-1", &[Role::Node])).unwrap();
    let error = connect(&client, server.addr, Role::Seed, PATIENCE)
        .await
        .unwrap_err();
    assert!(
        matches!(error, TransportError::Connection { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("UnknownIssuer"), "{error}");
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    init_tracing();
    let fleet = Fleet::new("fleet");
    let server = start_server(&fleet.identity("seed-1", &[Role::Seed]));
    let dir = fleet.dir.path().join("old-node");
    let now = OffsetDateTime::now_utc();
    pki::issue_with_validity(
        &fleet.ca_dir(),
        "old-node",
        &[Role::Node],
        now - time::Duration::days(30),
        now - time::Duration::days(1),
        &dir,
    )
    .unwrap();
    assert!(matches!(
        Identity::load(&dir),
        Err(pki::PkiError::Expired { .. })
    ));
    let client = make_endpoint(localhost(), &Identity::load_unchecked(&dir).unwrap()).unwrap();

    let error = connect(&client, server.addr, Role::Seed, PATIENCE)
        .await
        .unwrap_err();
    // The client is told why, not only that the connection went.
    assert!(
        error.to_string().to_lowercase().contains("expired"),
        "{error}"
    );
    let reason = server.handler.wait_refused().await;
    assert!(reason.to_lowercase().contains("expired"), "{reason}");
    assert!(server.handler.callers.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_revoked_certificate_is_refused_after_revoke_and_reload() {
    init_tracing();
    let fleet = Fleet::new("fleet");
    let server_dir = fleet.issue_dir("seed-1", &[Role::Seed]);
    let server = start_server(&Identity::load(&server_dir).unwrap());
    let node_dir = fleet.issue_dir("stolen-node", &[Role::Node]);
    let client = make_endpoint(localhost(), &Identity::load(&node_dir).unwrap()).unwrap();
    let before = connect(&client, server.addr, Role::Seed, PATIENCE)
        .await
        .unwrap();
    assert_eq!(ping(&before, 1).await, Response::Pong { nonce: 1 });
    before.connection.close(0u32.into(), b"done");

    let revoked = pki::revoke(&fleet.ca_dir(), &node_dir.join(pki::CERT_FILE)).unwrap();
    assert_eq!(revoked.name, "stolen-node");
    // Reload the server with the CA's new CRL (as `--crl FILE` would).
    let mut reloaded = Identity::load(&server_dir).unwrap();
    reloaded
        .load_crl(&fleet.ca_dir().join(pki::CRL_FILE))
        .unwrap();
    let mut endpoint = server.endpoint.clone();
    reload_identity(&mut endpoint, &reloaded).unwrap();

    let error = connect(&client, server.addr, Role::Seed, PATIENCE)
        .await
        .unwrap_err();
    // The client learns why too: the server's TLS alert travels in the close frame.
    assert!(error.is_connection_lost(), "{error:?}");
    assert!(
        error.to_string().to_lowercase().contains("revoked"),
        "{error}"
    );
    let reason = server.handler.wait_refused().await;
    assert!(reason.to_lowercase().contains("revoked"), "{reason}");
    assert_eq!(server.handler.callers.lock().unwrap().len(), 1);

    // Another node still gets in under the reloaded server.
    let good = make_endpoint(localhost(), &fleet.identity("node-2", &[Role::Node])).unwrap();
    let conn = connect(&good, server.addr, Role::Seed, PATIENCE)
        .await
        .unwrap();
    assert_eq!(ping(&conn, 2).await, Response::Pong { nonce: 2 });
}

#[tokio::test]
async fn an_oversized_frame_gets_bad_request_and_the_server_keeps_serving() {
    init_tracing();
    let fleet = Fleet::new("fleet");
    let server = start_server(&fleet.identity("seed-1", &[Role::Seed]));
    let client = make_endpoint(localhost(), &fleet.identity("node-1", &[Role::Node])).unwrap();
    let conn = connect(&client, server.addr, Role::Seed, PATIENCE)
        .await
        .unwrap();

    let bad_frames: [&[u8]; 3] = [
        // Claims 4 GiB: refused on the prefix alone, nothing allocated.
        &u32::MAX.to_be_bytes(),
        // One byte over the limit.
        &((wire::MAX_FRAME_BYTES as u32 + 1).to_be_bytes()),
        // A well-sized frame holding garbage (an unknown variant).
        &[0, 0, 0, 1, 200],
    ];
    for frame in bad_frames {
        let (mut send, mut recv) = conn.connection.open_bi().await.unwrap();
        send.write_all(frame).await.unwrap();
        match read_frame::<Response>(&mut recv, PATIENCE).await.unwrap() {
            Response::Error(reply) => {
                assert_eq!(reply.code, ErrorCode::BadRequest);
                assert!(reply.message.contains("frame"), "{}", reply.message);
            }
            other => panic!("expected BadRequest, got {other:?}"),
        }
    }
    // Same connection, and a new one, still work.
    assert_eq!(ping(&conn, 5).await, Response::Pong { nonce: 5 });
    let again = connect(&client, server.addr, Role::Seed, PATIENCE)
        .await
        .unwrap();
    assert_eq!(ping(&again, 6).await, Response::Pong { nonce: 6 });
    assert!(server.handler.refused.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_request_that_never_arrives_gets_bad_request_after_the_server_timeout() {
    init_tracing();
    let fleet = Fleet::new("fleet");
    let limits = ServeLimits {
        request_timeout: Duration::from_millis(200),
        ..ServeLimits::default()
    };
    let server = start_server_with(&fleet.identity("seed-1", &[Role::Seed]), limits);
    let client = make_endpoint(localhost(), &fleet.identity("node-1", &[Role::Node])).unwrap();
    let conn = connect(&client, server.addr, Role::Seed, PATIENCE)
        .await
        .unwrap();

    // Half a length prefix, then silence.
    let (mut send, mut recv) = conn.connection.open_bi().await.unwrap();
    send.write_all(&[0, 0]).await.unwrap();
    match read_frame::<Response>(&mut recv, PATIENCE).await.unwrap() {
        Response::Error(reply) => assert_eq!(reply.code, ErrorCode::BadRequest),
        other => panic!("expected BadRequest, got {other:?}"),
    }
    assert_eq!(ping(&conn, 9).await, Response::Pong { nonce: 9 });
}

#[tokio::test]
async fn read_frame_times_out_on_a_silent_peer() {
    init_tracing();
    let fleet = Fleet::new("fleet");
    let server = start_server(&fleet.identity("seed-1", &[Role::Seed]));
    let client = make_endpoint(localhost(), &fleet.identity("node-1", &[Role::Node])).unwrap();
    let conn = connect(&client, server.addr, Role::Seed, PATIENCE)
        .await
        .unwrap();

    let (mut send, mut recv) = conn.connection.open_bi().await.unwrap();
    write_frame(&mut send, &Request::Ping { nonce: STALL })
        .await
        .unwrap();
    let error = read_frame::<Response>(&mut recv, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(error, TransportError::Timeout { .. }), "{error:?}");

    // `request` bounds the whole exchange the same way.
    let error = request(
        &conn,
        &Request::Ping { nonce: STALL },
        Duration::from_millis(200),
    )
    .await
    .unwrap_err();
    assert!(matches!(error, TransportError::Timeout { .. }), "{error:?}");
}

#[tokio::test]
async fn a_hello_with_no_common_version_is_answered_with_version_mismatch() {
    init_tracing();
    let fleet = Fleet::new("fleet");
    let server = start_server(&fleet.identity("seed-1", &[Role::Seed]));
    let client = make_endpoint(localhost(), &fleet.identity("node-1", &[Role::Node])).unwrap();
    let conn = connect(&client, server.addr, Role::Seed, PATIENCE)
        .await
        .unwrap();
    let future = Hello {
        protocol_version: PROTOCOL_VERSION + 10,
        min_protocol_version: PROTOCOL_VERSION + 5,
        agent: "pkgmesh/9.0".into(),
    };
    let (response, _, _) = request(&conn, &Request::Hello(future), PATIENCE)
        .await
        .unwrap();
    match response {
        Response::Error(reply) => {
            assert_eq!(reply.code, ErrorCode::VersionMismatch);
            assert!(reply.message.contains("pkgmesh/9.0"), "{}", reply.message);
        }
        other => panic!("expected VersionMismatch, got {other:?}"),
    }
}

/// A client that trusts the fleet CA but presents no certificate.
fn client_config_without_cert(ca_dir: &Path) -> quinn::ClientConfig {
    let mut config = rustls::ClientConfig::builder_with_provider(transport::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(ca_dir))
        .with_no_client_auth();
    config.alpn_protocols = vec![wire::ALPN.to_vec()];
    quic_client(config)
}

/// A client that trusts the fleet CA but presents a certificate from `identity_dir`'s own CA.
fn client_config_with_foreign_cert(ca_dir: &Path, identity_dir: &Path) -> quinn::ClientConfig {
    use rustls_pki_types::pem::PemObject;
    let cert =
        rustls_pki_types::CertificateDer::from_pem_file(identity_dir.join(pki::CERT_FILE)).unwrap();
    let key =
        rustls_pki_types::PrivateKeyDer::from_pem_file(identity_dir.join(pki::KEY_FILE)).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(transport::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(ca_dir))
        .with_client_auth_cert(vec![cert], key)
        .unwrap();
    config.alpn_protocols = vec![wire::ALPN.to_vec()];
    quic_client(config)
}

fn roots(ca_dir: &Path) -> rustls::RootCertStore {
    use rustls_pki_types::pem::PemObject;
    let ca =
        rustls_pki_types::CertificateDer::from_pem_file(ca_dir.join(pki::CA_CERT_FILE)).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    roots
}

fn quic_client(config: rustls::ClientConfig) -> quinn::ClientConfig {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(config).unwrap();
    quinn::ClientConfig::new(Arc::new(crypto))
}
