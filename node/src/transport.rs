//! The QUIC transport: endpoints with mutual TLS under the fleet CA, the `Hello` exchange,
//! framed request/response I/O with limits and timeouts, and the accept loop that hands each
//! request to a service.
//!
//! Every connection is mutual TLS 1.3 (rustls with the ring provider only, ALPN `pkgmesh/1`):
//! the server requires a client certificate chaining to the fleet CA and not on its CRLs; the
//! client checks the server the same way and then checks that the server carries the role it
//! meant to reach. Names and roles come from the certificates (see [`crate::pki`]). A request is
//! one bidirectional stream: one frame each way, then for a chunk the raw bytes after the
//! response header. The client sends `Hello` on the first stream and waits for the answer before
//! anything else; the server answers `Hello` itself on whichever stream it arrives.
//!
//! TLS session resumption is off on both sides: a resumed session would skip the certificate
//! checks, so a revoked or expired certificate could keep getting in on an old ticket. A full
//! ECDSA handshake costs well under a millisecond. Checks happen at the handshake only: a
//! connection that is up when its certificate expires or is revoked lives until it closes
//! (idle timeout 30 s, or the server restarting with the new CRL).
//!
//! Owns: rustls/quinn configuration, transport tuning, frame I/O, the Hello exchange, the
//! server accept loop and its bounds. Does not own: what a request means or which role it needs
//! (each service's [`RequestHandler`]), message shapes and limits (`pkgmesh_protocol::wire`),
//! certificates (`pki`).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Once, OnceLock};
use std::time::Duration;

use pkgmesh_protocol::wire::{
    self, ErrorCode, ErrorReply, Hello, Request, Response, WireError, FRAME_PREFIX_BYTES,
};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, IdleTimeout, RecvStream, SendStream, TransportConfig, VarInt};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::pki::{self, roles_list, Identity, PeerIdentity, Role};

/// The TLS server name every client asks for; every fleet certificate carries it.
pub const SERVER_NAME: &str = pki::FLEET_DNS_NAME;
/// Per-stream flow-control window: one 4 MiB chunk plus headroom in flight per stream.
pub const STREAM_RECEIVE_WINDOW: u32 = 8 * 1024 * 1024;
/// Per-connection flow-control window: several chunks in flight from one peer at LAN speed.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 32 * 1024 * 1024;
/// Bytes we keep unacknowledged per connection, to match what peers let us send.
pub const SEND_WINDOW: u64 = CONNECTION_RECEIVE_WINDOW as u64;
/// Concurrent requests a peer may have open on one connection.
///
/// This is also memory a connection keeps: quinn reserves state for every stream the peer may
/// open next (two hash-map entries each), and it parks the receive state of each finished
/// stream (about 450 bytes with its reassembly buffer) in the slot of a future stream instead
/// of freeing it. So after this many requests a connection holds about this many parked
/// receive states, for as long as it lives: about 115 KiB a connection at 256. Servers with
/// thousands of long-lived connections (the seed) use a lower limit.
pub const MAX_CONCURRENT_BIDI_STREAMS: u32 = 256;
/// Keep-alive, well under the idle timeout so idle but wanted connections survive.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// A connection with no traffic (not even keep-alives) for this long is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a server waits for the request frame on a fresh stream.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a server waits for a handshake to complete.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections one server holds at once; more are refused until some close.
pub const MAX_CONNECTIONS: usize = 4096;
/// Request-frame bytes one server buffers at once across all streams: a frame may claim up to
/// 1 MiB, and 256 streams on each of thousands of connections could otherwise make a server
/// hold gigabytes of half-received requests. Streams wait (within their timeout) for room.
pub const MAX_REQUEST_BYTES_IN_FLIGHT: usize = 64 * 1024 * 1024;
/// Connection attempts quinn buffers before the accept loop takes them.
const MAX_INCOMING: usize = 1024;

/// Application close codes, so a peer can tell why we hung up.
pub mod close_code {
    pub const NORMAL: u32 = 0;
    pub const WRONG_ROLE: u32 = 1;
    pub const VERSION_MISMATCH: u32 = 2;
    pub const NO_IDENTITY: u32 = 3;
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("cannot dial {addr}: {source}")]
    Dial {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectError,
    },
    /// The handshake failed or the connection dropped: a refused certificate shows up here, on
    /// whichever side noticed (TLS 1.3 lets the client finish before the server rejects it).
    #[error("connection to {addr} failed: {source}")]
    Connection {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: &'static str, after: Duration },
    #[error("the peer presented no usable certificate: {reason}")]
    NoPeerIdentity { reason: String },
    #[error("{peer} at {addr} is not a {expected}; check the address, or issue it a certificate with that role")]
    WrongRole {
        addr: SocketAddr,
        peer: PeerIdentity,
        expected: Role,
    },
    #[error("no protocol version in common: {detail}; upgrade the older side")]
    VersionMismatch { detail: String },
    #[error("the peer refused: {message} ({code:?})")]
    Refused { code: ErrorCode, message: String },
    #[error("unexpected response from the peer: {0}")]
    UnexpectedResponse(String),
    #[error(transparent)]
    Frame(#[from] WireError),
    #[error("the peer closed the stream {what}")]
    StreamClosed { what: &'static str },
    #[error("reading from the peer: {0}")]
    Read(#[source] quinn::ReadError),
    #[error("writing to the peer: {0}")]
    Write(#[source] quinn::WriteError),
}

impl TransportError {
    /// Whether the connection itself is gone (as opposed to one request failing).
    pub fn is_connection_lost(&self) -> bool {
        matches!(
            self,
            TransportError::Connection { .. }
                | TransportError::Read(quinn::ReadError::ConnectionLost(_))
                | TransportError::Write(quinn::WriteError::ConnectionLost(_))
        )
    }
}

/// Installs rustls's ring provider as the process default, once. Everything in pkgmesh passes
/// the provider explicitly anyway; this covers libraries that ask for the default (reqwest in
/// the origin client). Another provider installed first is left alone.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if rustls::crypto::ring::default_provider()
            .install_default()
            .is_err()
        {
            tracing::debug!("a rustls crypto provider was already installed");
        }
    });
}

/// The one provider every config is built with.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Flow control and liveness tuned for bulk chunk transfer on a LAN.
pub fn transport_config() -> TransportConfig {
    let mut config = TransportConfig::default();
    config
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW))
        .send_window(SEND_WINDOW)
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_CONCURRENT_BIDI_STREAMS))
        // pkgmesh uses bidirectional streams only; refusing the rest shrinks what a peer can open.
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .datagram_receive_buffer_size(None)
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
        // 30 s always fits an IdleTimeout (limit 2^62 ms); None would mean "never time out".
        .max_idle_timeout(IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    config
}

fn roots(identity: &Identity) -> Result<Arc<RootCertStore>, TransportError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(identity.ca_der().clone())
        .map_err(|e| TransportError::Tls(format!("fleet CA certificate: {e}")))?;
    Ok(Arc::new(roots))
}

/// The server half: TLS 1.3, ALPN `pkgmesh/1`, a client certificate under the fleet CA required.
pub fn server_config(identity: &Identity) -> Result<quinn::ServerConfig, TransportError> {
    server_config_with(identity, transport_config())
}

/// [`server_config`] with its own flow-control and stream limits for the connections it
/// accepts (the seed's, see `seed::seed_transport_config`).
pub fn server_config_with(
    identity: &Identity,
    transport: TransportConfig,
) -> Result<quinn::ServerConfig, TransportError> {
    let tls = |e: &dyn std::fmt::Display| TransportError::Tls(e.to_string());
    let provider = crypto_provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(identity)?, provider.clone())
        .with_crls(identity.crls().iter().cloned())
        .build()
        .map_err(|e| tls(&e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![identity.cert_der().clone()],
            identity.key_der().clone_key(),
        )
        .map_err(|e| tls(&e))?;
    config.alpn_protocols = vec![wire::ALPN.to_vec()];
    // No resumption: see the module doc.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(config).map_err(|e| tls(&e))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server
        .transport_config(Arc::new(transport))
        .max_incoming(MAX_INCOMING);
    Ok(server)
}

/// The client half: the server must chain to the fleet CA and not be revoked; we present our
/// own certificate.
pub fn client_config(identity: &Identity) -> Result<quinn::ClientConfig, TransportError> {
    let tls = |e: &dyn std::fmt::Display| TransportError::Tls(e.to_string());
    let provider = crypto_provider();
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(identity)?, provider.clone())
        .with_crls(identity.crls().iter().cloned())
        .build()
        .map_err(|e| tls(&e))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls(&e))?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(
            vec![identity.cert_der().clone()],
            identity.key_der().clone_key(),
        )
        .map_err(|e| tls(&e))?;
    config.alpn_protocols = vec![wire::ALPN.to_vec()];
    config.resumption = Resumption::disabled();
    config.enable_early_data = false;
    let crypto = QuicClientConfig::try_from(config).map_err(|e| tls(&e))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(transport_config()));
    Ok(client)
}

/// One UDP endpoint that both serves (hand it to [`serve`]) and dials ([`connect`]) under
/// `identity`. Must be called inside a tokio runtime.
pub fn make_endpoint(bind: SocketAddr, identity: &Identity) -> Result<Endpoint, TransportError> {
    make_endpoint_with(bind, identity, transport_config())
}

/// [`make_endpoint`] whose server side gives accepted connections `server_transport` instead
/// of [`transport_config`]; dialling out still uses [`transport_config`].
pub fn make_endpoint_with(
    bind: SocketAddr,
    identity: &Identity,
    server_transport: TransportConfig,
) -> Result<Endpoint, TransportError> {
    let server = server_config_with(identity, server_transport)?;
    let client = client_config(identity)?;
    let socket = std::net::UdpSocket::bind(bind)
        .map_err(|source| TransportError::Bind { addr: bind, source })?;
    socket
        .set_nonblocking(true)
        .map_err(|source| TransportError::Bind { addr: bind, source })?;
    enlarge_socket_buffers(&socket);
    let runtime = quinn::default_runtime().ok_or_else(|| TransportError::Bind {
        addr: bind,
        source: std::io::Error::other("no async runtime for QUIC"),
    })?;
    let mut endpoint = Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        runtime,
    )
    .map_err(|source| TransportError::Bind { addr: bind, source })?;
    endpoint.set_default_client_config(client);
    tracing::debug!(
        local = ?endpoint.local_addr().ok(),
        name = identity.name(),
        roles = %roles_list(identity.roles()),
        "QUIC endpoint up"
    );
    Ok(endpoint)
}

/// Receive and send buffer asked of the kernel for an endpoint's UDP socket.
const SOCKET_BUFFER_BYTES: libc::c_int = 8 << 20;

/// Asks for larger UDP buffers than the kernel's default (about 208 KiB): one socket carries
/// every connection of a seed, and with thousands of nodes a burst overflowed the default, each
/// dropped datagram costing a retransmission timeout (seen at 5,000 simulated nodes). As root
/// the FORCE options pass `net.core.rmem_max`; otherwise the kernel caps the size there. Best
/// effort: a refusal only leaves the default.
fn enlarge_socket_buffers(socket: &std::net::UdpSocket) {
    use std::os::fd::AsRawFd;
    let fd = socket.as_raw_fd();
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        let size = SOCKET_BUFFER_BYTES;
        let set = |option: libc::c_int| {
            // SAFETY: `fd` is an open socket for the duration of the call and `size` lives on
            // the stack with the length passed.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    option,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        if set(force) != 0 && set(plain) != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "cannot enlarge a UDP socket buffer"
            );
        }
    }
}

/// Switches `endpoint` to a reloaded identity (a new certificate or CRL). The server side is
/// shared by every clone of the endpoint and applies to new handshakes at once; the client
/// side is per handle, so only dials through this handle use the new certificate.
pub fn reload_identity(endpoint: &mut Endpoint, identity: &Identity) -> Result<(), TransportError> {
    let server = server_config(identity)?;
    let client = client_config(identity)?;
    endpoint.set_server_config(Some(server));
    endpoint.set_default_client_config(client);
    Ok(())
}

/// A connection whose peer passed the certificate, role and Hello checks.
#[derive(Debug, Clone)]
pub struct PeerConnection {
    pub connection: Connection,
    pub peer: PeerIdentity,
    pub protocol_version: u16,
}

/// The identity a connection's peer presented in the handshake.
pub fn peer_identity(connection: &Connection) -> Result<PeerIdentity, TransportError> {
    let no_identity = |reason: &str| TransportError::NoPeerIdentity {
        reason: reason.to_string(),
    };
    let any = connection
        .peer_identity()
        .ok_or_else(|| no_identity("it sent no certificate"))?;
    let chain = any
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| no_identity("the TLS layer reported an unknown identity type"))?;
    let leaf = chain
        .first()
        .ok_or_else(|| no_identity("its certificate chain is empty"))?;
    pki::peer_identity_from_der(leaf.as_ref()).map_err(|e| TransportError::NoPeerIdentity {
        reason: e.to_string(),
    })
}

/// Dials `addr`, completes the TLS handshake, checks the server carries `expected_role`, and
/// exchanges `Hello`, all within `timeout`.
pub async fn connect(
    endpoint: &Endpoint,
    addr: SocketAddr,
    expected_role: Role,
    timeout: Duration,
) -> Result<PeerConnection, TransportError> {
    match tokio::time::timeout(timeout, connect_inner(endpoint, addr, expected_role)).await {
        Ok(result) => result,
        Err(_) => Err(TransportError::Timeout {
            what: "the handshake and Hello",
            after: timeout,
        }),
    }
}

async fn connect_inner(
    endpoint: &Endpoint,
    addr: SocketAddr,
    expected_role: Role,
) -> Result<PeerConnection, TransportError> {
    let connecting = endpoint
        .connect(addr, SERVER_NAME)
        .map_err(|source| TransportError::Dial { addr, source })?;
    let connection = connecting
        .await
        .map_err(|source| TransportError::Connection { addr, source })?;
    let peer = match peer_identity(&connection) {
        Ok(peer) => peer,
        Err(e) => {
            connection.close(VarInt::from_u32(close_code::NO_IDENTITY), b"no identity");
            return Err(e);
        }
    };
    if !peer.has_role(expected_role) {
        let reason = format!("expected a {expected_role}");
        connection.close(VarInt::from_u32(close_code::WRONG_ROLE), reason.as_bytes());
        return Err(TransportError::WrongRole {
            addr,
            peer,
            expected: expected_role,
        });
    }
    let lost = |e: TransportError| match e {
        TransportError::Read(quinn::ReadError::ConnectionLost(source))
        | TransportError::Write(quinn::WriteError::ConnectionLost(source)) => {
            TransportError::Connection { addr, source }
        }
        other => other,
    };
    let (mut send, mut recv) = connection
        .open_bi()
        .await
        .map_err(|source| TransportError::Connection { addr, source })?;
    let ours = Hello::ours();
    write_frame(&mut send, &Request::Hello(ours.clone()))
        .await
        .map_err(lost)?;
    let _ = send.finish();
    let response: Response = read_frame_unbounded(&mut recv).await.map_err(lost)?;
    let protocol_version = match response {
        Response::Hello(theirs) => match ours.negotiate(&theirs) {
            Some(version) => version,
            None => {
                connection.close(
                    VarInt::from_u32(close_code::VERSION_MISMATCH),
                    b"no common protocol version",
                );
                return Err(TransportError::VersionMismatch {
                    detail: version_detail(&ours, &theirs),
                });
            }
        },
        Response::Error(ErrorReply {
            code: ErrorCode::VersionMismatch,
            message,
        }) => return Err(TransportError::VersionMismatch { detail: message }),
        Response::Error(ErrorReply { code, message }) => {
            return Err(TransportError::Refused { code, message })
        }
        other => {
            return Err(TransportError::UnexpectedResponse(format!(
                "{other:?} in answer to Hello"
            )))
        }
    };
    tracing::debug!(%addr, %peer, protocol_version, "connected");
    Ok(PeerConnection {
        connection,
        peer,
        protocol_version,
    })
}

fn version_detail(ours: &Hello, theirs: &Hello) -> String {
    format!(
        "we speak {}..={} ({}), the peer speaks {}..={} ({})",
        ours.min_protocol_version,
        ours.protocol_version,
        ours.agent,
        theirs.min_protocol_version,
        theirs.protocol_version,
        theirs.agent
    )
}

/// Writes `message` as one frame. Refuses (without writing) a message over the frame limit.
pub async fn write_frame<T: Serialize>(
    send: &mut SendStream,
    message: &T,
) -> Result<(), TransportError> {
    let frame = wire::encode(message)?;
    send.write_all(&frame).await.map_err(TransportError::Write)
}

/// Reads one frame within `timeout`: the length prefix is checked against the limit before
/// anything is allocated, then exactly that many bytes are read and decoded.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut RecvStream,
    timeout: Duration,
) -> Result<T, TransportError> {
    match tokio::time::timeout(timeout, read_frame_unbounded(recv)).await {
        Ok(result) => result,
        Err(_) => Err(TransportError::Timeout {
            what: "a frame",
            after: timeout,
        }),
    }
}

/// [`read_frame`] without its own timeout, for callers that bound a larger operation.
async fn read_frame_unbounded<T: DeserializeOwned>(
    recv: &mut RecvStream,
) -> Result<T, TransportError> {
    let mut prefix = [0u8; FRAME_PREFIX_BYTES];
    recv.read_exact(&mut prefix)
        .await
        .map_err(|e| read_exact_error(e, "before a frame's length"))?;
    let len = wire::payload_len(prefix)?;
    let mut payload = vec![0u8; len];
    recv.read_exact(&mut payload)
        .await
        .map_err(|e| read_exact_error(e, "in the middle of a frame"))?;
    Ok(wire::decode_payload(&payload)?)
}

fn read_exact_error(error: quinn::ReadExactError, what: &'static str) -> TransportError {
    match error {
        quinn::ReadExactError::FinishedEarly(_) => TransportError::StreamClosed { what },
        quinn::ReadExactError::ReadError(e) => TransportError::Read(e),
    }
}

/// Sends `request` on a fresh stream and reads the response frame, all within `timeout`. The
/// streams are handed back: for a chunk, the raw bytes follow on `RecvStream`; the send side is
/// left open for requests that upload after the frame (dropping it finishes it).
pub async fn request(
    conn: &PeerConnection,
    request: &Request,
    timeout: Duration,
) -> Result<(Response, SendStream, RecvStream), TransportError> {
    let exchange = async {
        let (mut send, mut recv) =
            conn.connection
                .open_bi()
                .await
                .map_err(|source| TransportError::Connection {
                    addr: conn.connection.remote_address(),
                    source,
                })?;
        write_frame(&mut send, request).await?;
        let response = read_frame_unbounded(&mut recv).await?;
        Ok((response, send, recv))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(TransportError::Timeout {
            what: "a response",
            after: timeout,
        }),
    }
}

/// Who is asking, for a [`RequestHandler`].
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub peer: PeerIdentity,
    pub remote: SocketAddr,
    pub connection: Connection,
}

/// A service behind [`serve`]. `handle` gets every request except `Hello` (which `serve`
/// answers), already decoded, with the stream to answer on; it owns the streams from then on.
/// Implement it with `async fn handle(...)`; the future must be `Send`.
pub trait RequestHandler: Send + Sync + 'static {
    fn handle(
        &self,
        ctx: RequestContext,
        request: Request,
        send: SendStream,
        recv: RecvStream,
    ) -> impl Future<Output = ()> + Send;

    /// A connection was refused at the handshake (no certificate, another CA, expired, revoked,
    /// or the peer refused ours). Called from the accept loop: keep it quick.
    fn handshake_refused(&self, remote: SocketAddr, reason: String) {
        let _ = (remote, reason);
    }
}

/// Bounds for [`serve_with`].
#[derive(Debug, Clone)]
pub struct ServeLimits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub request_timeout: Duration,
    /// Bytes of request frames buffered at once, over all connections.
    pub max_request_bytes_in_flight: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            max_connections: MAX_CONNECTIONS,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            request_timeout: REQUEST_TIMEOUT,
            max_request_bytes_in_flight: MAX_REQUEST_BYTES_IN_FLIGHT,
        }
    }
}

/// Accepts connections on `endpoint` until it is closed, with the default [`ServeLimits`].
pub async fn serve<H: RequestHandler>(endpoint: Endpoint, handler: Arc<H>) {
    serve_with(endpoint, handler, ServeLimits::default()).await
}

/// Accepts connections until the endpoint is closed. Each connection must present a fleet
/// certificate; each stream carries one request, read within `request_timeout`, then handed to
/// `handler` on its own task. Concurrency is bounded: `max_connections` connections, the
/// server's stream limit per connection ([`MAX_CONCURRENT_BIDI_STREAMS`] unless the endpoint
/// was made with another, enforced by QUIC flow control), and `max_request_bytes_in_flight`
/// bytes of request frames being received.
pub async fn serve_with<H: RequestHandler>(
    endpoint: Endpoint,
    handler: Arc<H>,
    limits: ServeLimits,
) {
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let state = Arc::new(ServeState {
        frame_budget: Semaphore::new(
            limits
                .max_request_bytes_in_flight
                .clamp(wire::MAX_FRAME_BYTES, Semaphore::MAX_PERMITS),
        ),
        limits,
    });
    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(%remote, max = state.limits.max_connections, "connection refused: at the connection limit");
            incoming.refuse();
            continue;
        };
        let handler = handler.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            serve_connection(incoming, remote, handler, state).await;
        });
    }
    tracing::debug!("endpoint closed; accept loop ends");
}

/// What every connection task of one `serve_with` shares.
struct ServeState {
    limits: ServeLimits,
    frame_budget: Semaphore,
}

async fn serve_connection<H: RequestHandler>(
    incoming: quinn::Incoming,
    remote: SocketAddr,
    handler: Arc<H>,
    state: Arc<ServeState>,
) {
    let limits = &state.limits;
    let refused = |reason: String| {
        tracing::info!(%remote, %reason, "handshake refused");
        handler.handshake_refused(remote, reason);
    };
    let connecting = match incoming.accept() {
        Ok(connecting) => connecting,
        Err(e) => return refused(handshake_failure(&e)),
    };
    let connection = match tokio::time::timeout(limits.handshake_timeout, connecting).await {
        Err(_) => {
            return refused(format!(
                "TLS handshake did not complete within {:?}",
                limits.handshake_timeout
            ))
        }
        Ok(Err(e)) => return refused(handshake_failure(&e)),
        Ok(Ok(connection)) => connection,
    };
    let peer = match peer_identity(&connection) {
        Ok(peer) => peer,
        Err(e) => {
            connection.close(VarInt::from_u32(close_code::NO_IDENTITY), b"no identity");
            return refused(e.to_string());
        }
    };
    tracing::debug!(%remote, %peer, "connection accepted");
    loop {
        let (send, recv) = match connection.accept_bi().await {
            Ok(streams) => streams,
            Err(e) => {
                tracing::debug!(%remote, %peer, reason = %e, "connection closed");
                break;
            }
        };
        let ctx = RequestContext {
            peer: peer.clone(),
            remote,
            connection: connection.clone(),
        };
        let handler = handler.clone();
        let state = state.clone();
        tokio::spawn(async move {
            serve_stream(handler, ctx, send, recv, state).await;
        });
    }
}

/// Reads one request frame, waiting for room in the server's frame budget before allocating.
async fn read_request(
    recv: &mut RecvStream,
    budget: &Semaphore,
) -> Result<Request, TransportError> {
    let mut prefix = [0u8; FRAME_PREFIX_BYTES];
    recv.read_exact(&mut prefix)
        .await
        .map_err(|e| read_exact_error(e, "before a frame's length"))?;
    let len = wire::payload_len(prefix)?;
    // `len` is at most MAX_FRAME_BYTES (1 MiB), so it fits a u32 and the budget.
    let permits = u32::try_from(len).unwrap_or(u32::MAX);
    let _room = budget
        .acquire_many(permits)
        .await
        .map_err(|_| TransportError::StreamClosed {
            what: "while the server was shutting down",
        })?;
    let mut payload = vec![0u8; len];
    recv.read_exact(&mut payload)
        .await
        .map_err(|e| read_exact_error(e, "in the middle of a frame"))?;
    Ok(wire::decode_payload(&payload)?)
}

/// A reason for the audit log: who refused whom, with rustls's own words (`UnknownIssuer`,
/// `Revoked`, `certificate expired`, `peer sent no certificates`, ...).
fn handshake_failure(error: &quinn::ConnectionError) -> String {
    match error {
        quinn::ConnectionError::TransportError(e) => {
            format!("TLS handshake refused: {e}")
        }
        quinn::ConnectionError::ConnectionClosed(_) => {
            format!("TLS handshake abandoned by the peer (does it trust this fleet CA?): {error}")
        }
        other => format!("TLS handshake failed: {other}"),
    }
}

async fn serve_stream<H: RequestHandler>(
    handler: Arc<H>,
    ctx: RequestContext,
    mut send: SendStream,
    mut recv: RecvStream,
    state: Arc<ServeState>,
) {
    let timeout = state.limits.request_timeout;
    let read = read_request(&mut recv, &state.frame_budget);
    let request = match tokio::time::timeout(timeout, read).await {
        Ok(result) => result,
        Err(_) => Err(TransportError::Timeout {
            what: "the request",
            after: timeout,
        }),
    };
    let request: Request = match request {
        Ok(request) => request,
        Err(
            e @ (TransportError::Frame(_)
            | TransportError::Timeout { .. }
            | TransportError::StreamClosed { .. }),
        ) => {
            tracing::debug!(remote = %ctx.remote, peer = %ctx.peer, error = %e, "bad request");
            reply_error(
                &mut send,
                ErrorCode::BadRequest,
                format!("bad request: {e}"),
            )
            .await;
            // Stop the peer sending the rest of whatever it was sending.
            let _ = recv.stop(VarInt::from_u32(0));
            return;
        }
        Err(e) => {
            tracing::debug!(remote = %ctx.remote, peer = %ctx.peer, error = %e, "stream failed before its request");
            return;
        }
    };
    match request {
        Request::Hello(theirs) => {
            let ours = Hello::ours();
            let response = match ours.negotiate(&theirs) {
                Some(_) => Response::Hello(ours),
                None => Response::Error(ErrorReply {
                    code: ErrorCode::VersionMismatch,
                    message: version_detail(&ours, &theirs),
                }),
            };
            if let Err(e) = write_frame(&mut send, &response).await {
                tracing::debug!(remote = %ctx.remote, error = %e, "could not answer Hello");
            }
            let _ = send.finish();
        }
        request => handler.handle(ctx, request, send, recv).await,
    }
}

/// Answers a chunk request: the `Response::Chunk` header, then exactly the chunk's bytes, then
/// the end of the stream. The bytes must have been verified by the caller (the cache does).
///
/// A caller that stops reading would otherwise hold this send (its chunk buffer, and the
/// server's upload slot) for as long as keep-alives hold the connection: forever. So each piece
/// must find room in the caller's flow-control window within [`SEND_STALL_TIMEOUT`], or the
/// stream is reset and the send fails. A slow but moving reader is never cut off.
pub async fn send_chunk(
    send: &mut SendStream,
    blob: pkgmesh_protocol::blob::BlobId,
    index: u32,
    bytes: &[u8],
) -> Result<(), TransportError> {
    let header = Response::Chunk {
        blob,
        index,
        len: bytes.len() as u32,
    };
    let stalled = |send: &mut SendStream| {
        let _ = send.reset(VarInt::from_u32(close_code::NORMAL));
        TransportError::Timeout {
            what: "the peer to read a chunk",
            after: SEND_STALL_TIMEOUT,
        }
    };
    match tokio::time::timeout(SEND_STALL_TIMEOUT, write_frame(send, &header)).await {
        Ok(written) => written?,
        Err(_) => return Err(stalled(send)),
    }
    for piece in bytes.chunks(SEND_PIECE_BYTES) {
        match tokio::time::timeout(SEND_STALL_TIMEOUT, send.write_all(piece)).await {
            Ok(written) => written.map_err(TransportError::Write)?,
            Err(_) => return Err(stalled(send)),
        }
    }
    let _ = send.finish();
    Ok(())
}

/// Longest a chunk send waits for the reader to make room for the next piece.
pub const SEND_STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of a chunk handed to QUIC at a time: the unit of progress [`send_chunk`] waits for.
const SEND_PIECE_BYTES: usize = 64 * 1024;

/// Answers a request with `Response::Error` and finishes the stream. Failures to write are only
/// logged: the peer has gone, and there is no one left to tell.
pub async fn reply_error(send: &mut SendStream, code: ErrorCode, message: impl Into<String>) {
    let response = Response::Error(ErrorReply {
        code,
        message: message.into(),
    });
    if let Err(e) = write_frame(send, &response).await {
        tracing::debug!(error = %e, "could not send an error reply");
    }
    let _ = send.finish();
}

/// Checks the caller holds at least one of `roles`. The error names the caller, its roles and
/// the roles needed; send it with `Response::Error`. Roles do not imply each other: list
/// every role a request accepts (`admin` included where it should be).
pub fn require_role(ctx: &RequestContext, roles: &[Role]) -> Result<(), ErrorReply> {
    if ctx.peer.has_any_role(roles) {
        return Ok(());
    }
    Err(ErrorReply {
        code: ErrorCode::Forbidden,
        message: format!(
            "`{}` has roles [{}] but this request needs one of [{}]",
            ctx.peer.name,
            roles_list(&ctx.peer.roles),
            roles_list(roles)
        ),
    })
}
