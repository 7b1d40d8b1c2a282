//! The wire: message types and their framing.
//!
//! Every control message travels as one frame: a big-endian `u32` payload length, then the
//! payload encoded with serde + bincode 2 (standard config, varint integers). The length is
//! checked against [`MAX_FRAME_BYTES`] before any buffer is allocated, and bincode is given the
//! same limit, so no frame can make a decoder allocate more than that whatever its bytes claim.
//! Chunk payloads are not framed messages: a [`Response::Chunk`] header is followed on the same
//! QUIC stream by exactly `len` raw bytes, which the receiver streams through a verifier.
//!
//! Compatibility: enum variants are only ever appended, never reordered or removed, and the
//! [`Hello`] exchange picks the highest protocol version both ends speak.
//!
//! Owns: message shapes, limits, encode/decode. Does not own: sockets, streams or timeouts.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::bitfield::Bitfield;
use crate::blob::BlobId;
use crate::deploy::{DeploymentInfo, DeploymentSpec, DesiredState, InstallReport};

/// ALPN protocol id of pkgmesh over QUIC.
pub const ALPN: &[u8] = b"pkgmesh/1";
/// The protocol version this build speaks best.
pub const PROTOCOL_VERSION: u16 = 1;
/// The oldest protocol version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// Largest control frame payload. A full chunk-hash list of the largest blob (16,384 × 32 bytes)
/// fits with room to spare; chunk payloads never travel inside frames.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;
/// Bytes of the length prefix in front of every frame.
pub const FRAME_PREFIX_BYTES: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {len} bytes is over the {limit}-byte limit")]
    FrameTooLarge { len: u64, limit: usize },
    #[error("frame is malformed: {reason}")]
    Malformed { reason: String },
    #[error("frame has {extra} bytes after its message")]
    TrailingBytes { extra: usize },
    #[error("message could not be encoded: {reason}")]
    Encode { reason: String },
}

/// The first message on a connection, in both directions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u16,
    pub min_protocol_version: u16,
    /// Free text such as `pkgmesh/0.1.0`, for logs only.
    pub agent: String,
}

impl Hello {
    pub fn ours() -> Self {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            min_protocol_version: MIN_PROTOCOL_VERSION,
            agent: format!("pkgmesh/{}", env!("CARGO_PKG_VERSION")),
        }
    }

    /// The highest version both ends speak, or `None` when their ranges do not meet.
    pub fn negotiate(&self, theirs: &Hello) -> Option<u16> {
        let high = self.protocol_version.min(theirs.protocol_version);
        let low = self.min_protocol_version.max(theirs.min_protocol_version);
        (low <= high).then_some(high)
    }
}

/// What a caller asks on a fresh bidirectional stream: one request, one response (plus raw
/// payload bytes for a chunk). Append new variants at the end only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    Hello(Hello),
    Ping {
        nonce: u64,
    },
    /// The chunk-hash list of a blob, which the asker verifies against the blob id.
    GetChunkHashes {
        blob: BlobId,
        size: u64,
    },
    /// One chunk's bytes. To the seed, `after_peer_failure` says the asker tried the peers the
    /// seed pointed it to and they failed, so origin admission lets the request through.
    GetChunk {
        blob: BlobId,
        index: u32,
        after_peer_failure: bool,
    },
    /// A package version's manifest and the blob of every file (role node, or any operator role).
    GetManifest {
        name: String,
        /// `None` asks for the default version.
        version: Option<String>,
    },
    /// Publish a version (role publisher). The seed answers [`Response::PublishReady`] naming
    /// the files it still needs; the caller then sends exactly those files' bytes, in that order,
    /// on the same stream, and the seed answers [`Response::Published`].
    Publish(PublishRequest),
    ListPackages,
    SetDefault {
        name: String,
        version: String,
    },
    DeletePackage {
        name: String,
        /// `None` deletes every version.
        version: Option<String>,
        force: bool,
    },
    /// A node tells the tracker where it listens and which chunks it holds (role node).
    Announce(Announcement),
    /// Peers holding chunks of a blob, same-site first (role node).
    GetPeers {
        blob: BlobId,
        size: u64,
        max: u32,
    },
    /// Which nodes hold a blob, or the blobs of a package version (role operator).
    Where(WhereQuery),
    /// Audit records (role admin), oldest first, from `since` (unix seconds).
    Audit {
        since: Option<u64>,
        limit: u32,
    },
    /// Which chunks of a blob a peer holds now (role node). Lets nodes keep sharing, and learn
    /// what their peers gained, while the seed's tracker is out of reach.
    GetBitfield {
        blob: BlobId,
    },
    /// A node dropped `peer` for `blob` because it misbehaved (role node). The tracker stops
    /// naming a peer that several nodes reported.
    ReportBan {
        blob: BlobId,
        peer: String,
        reason: String,
    },
    /// Start a deployment (role deployer); answered with [`Response::Deployment`].
    CreateDeployment(DeploymentSpec),
    /// Every deployment, newest first, without per-node detail (role deployer or operator).
    ListDeployments,
    /// One deployment with its nodes (role deployer or operator).
    GetDeployment {
        id: u64,
    },
    CancelDeployment {
        id: u64,
    },
    /// The installs this node should carry out (role node). Answered at once when the seed's
    /// generation differs from `generation`, else when it changes or after `wait_secs`.
    GetDesiredState {
        generation: u64,
        wait_secs: u32,
    },
    /// How an assignment went on this node (role node).
    ReportInstall(InstallReport),
    /// Every node the tracker knows, with how much it holds (role operator or deployer).
    ListNodes,
    /// Asked of a node, not the seed (role operator or deployer): fetch this package version's
    /// file for the node's platform into its cache now, ahead of a deployment. Answered at once
    /// with [`Response::Preheating`]; the download goes on in the background.
    Preheat {
        name: String,
        /// `None` preheats the default version.
        version: Option<String>,
    },
    /// The package versions and files that name these blobs in the catalog (role node or
    /// operator), so a node can say what its cached blobs are. At most [`MAX_DESCRIBE_BLOBS`].
    DescribeBlobs {
        blobs: Vec<BlobId>,
    },
}

/// Most blobs one [`Request::DescribeBlobs`] may name.
pub const MAX_DESCRIBE_BLOBS: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishRequest {
    pub name: String,
    /// The manifest exactly as the publisher wrote it; the seed validates it again.
    pub manifest_json: String,
    pub files: Vec<PublishFile>,
}

/// What the publisher computed for one ZIP; the seed recomputes all of it from the bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishFile {
    pub file: String,
    pub size: u64,
    pub sha256: [u8; 32],
    pub blob: BlobId,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// The address other nodes dial, as the node sees it (`ip:port`).
    pub listen: String,
    pub site: String,
    pub tags: Vec<(String, String)>,
    /// `true` replaces everything the tracker knew of this node; `false` updates the blobs named.
    pub full: bool,
    pub holdings: Vec<Holding>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holding {
    pub blob: BlobId,
    pub size: u64,
    pub chunks: Bitfield,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WhereQuery {
    Blob(BlobId),
    Package {
        name: String,
        version: Option<String>,
    },
}

/// Append new variants at the end only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Hello(Hello),
    Pong {
        nonce: u64,
    },
    Error(ErrorReply),
    /// Consecutive 32-byte chunk hashes.
    ChunkHashes {
        blob: BlobId,
        packed: Vec<u8>,
    },
    /// Header of a chunk: exactly `len` raw bytes follow on the stream.
    Chunk {
        blob: BlobId,
        index: u32,
        len: u32,
    },
    /// Origin admission: these peers hold the chunk (or soon will); ask them first.
    TryPeers {
        blob: BlobId,
        index: u32,
        peers: Vec<PeerInfo>,
    },
    Manifest(ManifestReply),
    PublishReady {
        upload: Vec<String>,
    },
    Published(PublishOutcome),
    Packages(Vec<PackageSummary>),
    Done {
        message: String,
    },
    Announced {
        refresh_secs: u32,
    },
    Peers(Vec<PeerInfo>),
    Holders(Vec<HolderInfo>),
    AuditRecords(Vec<AuditRecord>),
    /// The chunks of `blob` held, `None` when the blob is not held at all.
    Bitfield {
        blob: BlobId,
        chunks: Option<Bitfield>,
    },
    Deployment(Box<DeploymentInfo>),
    Deployments(Vec<DeploymentInfo>),
    DesiredState(DesiredState),
    Nodes(Vec<NodeSummary>),
    Preheating(PreheatReply),
    BlobNames(Vec<BlobName>),
}

/// A node as the tracker knows it, for `pkgmesh nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSummary {
    pub node: String,
    pub listen: String,
    pub site: String,
    pub tags: Vec<(String, String)>,
    pub last_seen_secs_ago: u64,
    /// Catalog blobs it announced holding chunks of.
    pub blobs: u32,
    /// Of those, the ones it holds whole.
    pub complete_blobs: u32,
    pub chunks_held: u64,
    /// Bytes of those chunks: the node's cache use as far as the catalog's blobs go.
    pub bytes_held: u64,
}

/// A node's answer to [`Request::Preheat`]: what it is fetching and how much it holds. Asking
/// again joins the download in flight, so a caller can poll with the same request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreheatReply {
    pub node: String,
    pub name: String,
    pub version: String,
    pub file: String,
    pub blob: BlobId,
    pub size: u64,
    pub chunks: u32,
    /// Chunks verified in the node's cache when it answered.
    pub chunks_held: u32,
}

/// One place a blob appears in the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobName {
    pub blob: BlobId,
    pub name: String,
    pub version: String,
    pub file: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestReply {
    pub name: String,
    pub version: String,
    pub is_default: bool,
    pub manifest_json: String,
    pub files: Vec<FileBlob>,
    /// Unix seconds.
    pub published_at: u64,
    pub published_by: String,
}

/// A manifest file as the mesh knows it: the blob to fetch and the checksum to install.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileBlob {
    pub file: String,
    pub blob: BlobId,
    pub size: u64,
    pub sha256: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishOutcome {
    pub name: String,
    pub version: String,
    /// `true` when this exact version was already published: nothing changed.
    pub unchanged: bool,
    pub files_uploaded: u32,
    pub bytes_uploaded: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageSummary {
    pub name: String,
    pub default_version: Option<String>,
    /// Oldest first.
    pub versions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub node: String,
    pub listen: String,
    pub site: String,
    pub chunks: Option<Bitfield>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderInfo {
    pub node: String,
    pub listen: String,
    pub site: String,
    pub blob: BlobId,
    pub chunks_held: u32,
    pub chunks_total: u32,
    pub last_seen_secs_ago: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Unix seconds.
    pub time: u64,
    pub caller: String,
    pub roles: Vec<String>,
    pub action: String,
    pub target: String,
    pub outcome: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
}

/// Append new variants at the end only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    BadRequest,
    /// The caller's certificate does not carry a role this request needs.
    Forbidden,
    NotFound,
    /// The server cannot serve now (busy, shutting down, origin down); try later or elsewhere.
    Unavailable,
    VersionMismatch,
    Internal,
    /// The server is at its limit of uploads in progress: the request may be retried later,
    /// and says nothing about whether the server holds or can get what was asked.
    Busy,
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME_BYTES>()
}

/// Encodes `message` as one frame (prefix and payload) appended to `out`.
pub fn encode_frame<T: Serialize>(message: &T, out: &mut Vec<u8>) -> Result<(), WireError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_PREFIX_BYTES]);
    let written = bincode::serde::encode_into_std_write(message, out, config()).map_err(|e| {
        WireError::Encode {
            reason: e.to_string(),
        }
    });
    let written = match written {
        Ok(n) => n,
        Err(e) => {
            out.truncate(start);
            return Err(e);
        }
    };
    if written > MAX_FRAME_BYTES {
        out.truncate(start);
        return Err(WireError::FrameTooLarge {
            len: written as u64,
            limit: MAX_FRAME_BYTES,
        });
    }
    out[start..start + FRAME_PREFIX_BYTES].copy_from_slice(&(written as u32).to_be_bytes());
    Ok(())
}

/// Encodes `message` as one frame in a fresh buffer.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::new();
    encode_frame(message, &mut out)?;
    Ok(out)
}

/// Reads a frame's length prefix and checks it against the limit, before anything is allocated.
pub fn payload_len(prefix: [u8; FRAME_PREFIX_BYTES]) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(WireError::FrameTooLarge {
            len: len as u64,
            limit: MAX_FRAME_BYTES,
        });
    }
    Ok(len)
}

/// Decodes one payload (the bytes after the prefix). Every byte must belong to the message.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, WireError> {
    if payload.len() > MAX_FRAME_BYTES {
        return Err(WireError::FrameTooLarge {
            len: payload.len() as u64,
            limit: MAX_FRAME_BYTES,
        });
    }
    let (message, used) =
        bincode::serde::decode_from_slice(payload, config()).map_err(|e| WireError::Malformed {
            reason: e.to_string(),
        })?;
    if used != payload.len() {
        return Err(WireError::TrailingBytes {
            extra: payload.len() - used,
        });
    }
    Ok(message)
}

/// Decodes the first frame in `buffer`: `Ok(None)` when more bytes are needed, otherwise the
/// message and how many bytes of `buffer` it took.
pub fn decode_frame<T: DeserializeOwned>(buffer: &[u8]) -> Result<Option<(T, usize)>, WireError> {
    let Some(prefix) = buffer.first_chunk::<FRAME_PREFIX_BYTES>() else {
        return Ok(None);
    };
    let len = payload_len(*prefix)?;
    let end = FRAME_PREFIX_BYTES + len;
    if buffer.len() < end {
        return Ok(None);
    }
    let message = decode_payload(&buffer[FRAME_PREFIX_BYTES..end])?;
    Ok(Some((message, end)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn blob_id() -> impl Strategy<Value = BlobId> {
        any::<[u8; 32]>().prop_map(BlobId)
    }

    fn hello() -> impl Strategy<Value = Hello> {
        (any::<u16>(), any::<u16>(), ".{0,40}").prop_map(|(protocol_version, min, agent)| Hello {
            protocol_version,
            min_protocol_version: min,
            agent,
        })
    }

    fn error_code() -> impl Strategy<Value = ErrorCode> {
        prop_oneof![
            Just(ErrorCode::BadRequest),
            Just(ErrorCode::Forbidden),
            Just(ErrorCode::NotFound),
            Just(ErrorCode::Unavailable),
            Just(ErrorCode::VersionMismatch),
            Just(ErrorCode::Internal),
            Just(ErrorCode::Busy),
        ]
    }

    fn text() -> impl Strategy<Value = String> {
        ".{0,24}"
    }

    fn bitfield() -> impl Strategy<Value = Bitfield> {
        (0u32..300, any::<u64>()).prop_map(|(len, seed)| {
            let mut field = Bitfield::new(len).unwrap();
            for i in 0..len {
                if (seed.rotate_left(i % 64) ^ i as u64) & 1 == 1 {
                    field.set(i, true);
                }
            }
            field
        })
    }

    fn publish_file() -> impl Strategy<Value = PublishFile> {
        (text(), any::<u64>(), any::<[u8; 32]>(), blob_id()).prop_map(
            |(file, size, sha256, blob)| PublishFile {
                file,
                size,
                sha256,
                blob,
            },
        )
    }

    fn holding() -> impl Strategy<Value = Holding> {
        (blob_id(), any::<u64>(), bitfield()).prop_map(|(blob, size, chunks)| Holding {
            blob,
            size,
            chunks,
        })
    }

    fn request() -> impl Strategy<Value = Request> {
        prop_oneof![
            hello().prop_map(Request::Hello),
            any::<u64>().prop_map(|nonce| Request::Ping { nonce }),
            (blob_id(), any::<u64>())
                .prop_map(|(blob, size)| Request::GetChunkHashes { blob, size }),
            (blob_id(), any::<u32>(), any::<bool>()).prop_map(
                |(blob, index, after_peer_failure)| {
                    Request::GetChunk {
                        blob,
                        index,
                        after_peer_failure,
                    }
                }
            ),
            (text(), proptest::option::of(text()))
                .prop_map(|(name, version)| Request::GetManifest { name, version }),
            (
                text(),
                ".{0,200}",
                proptest::collection::vec(publish_file(), 0..4)
            )
                .prop_map(|(name, manifest_json, files)| Request::Publish(
                    PublishRequest {
                        name,
                        manifest_json,
                        files
                    }
                )),
            Just(Request::ListPackages),
            (text(), text()).prop_map(|(name, version)| Request::SetDefault { name, version }),
            (text(), proptest::option::of(text()), any::<bool>()).prop_map(
                |(name, version, force)| Request::DeletePackage {
                    name,
                    version,
                    force
                }
            ),
            (
                text(),
                text(),
                proptest::collection::vec((text(), text()), 0..3),
                any::<bool>(),
                proptest::collection::vec(holding(), 0..3)
            )
                .prop_map(|(listen, site, tags, full, holdings)| {
                    Request::Announce(Announcement {
                        listen,
                        site,
                        tags,
                        full,
                        holdings,
                    })
                }),
            (blob_id(), any::<u64>(), any::<u32>())
                .prop_map(|(blob, size, max)| Request::GetPeers { blob, size, max }),
            blob_id().prop_map(|blob| Request::Where(WhereQuery::Blob(blob))),
            (text(), proptest::option::of(text()))
                .prop_map(|(name, version)| Request::Where(WhereQuery::Package { name, version })),
            (proptest::option::of(any::<u64>()), any::<u32>())
                .prop_map(|(since, limit)| Request::Audit { since, limit }),
            blob_id().prop_map(|blob| Request::GetBitfield { blob }),
            (blob_id(), text(), text()).prop_map(|(blob, peer, reason)| Request::ReportBan {
                blob,
                peer,
                reason
            }),
            Just(Request::ListNodes),
            (text(), proptest::option::of(text()))
                .prop_map(|(name, version)| Request::Preheat { name, version }),
            proptest::collection::vec(blob_id(), 0..4)
                .prop_map(|blobs| Request::DescribeBlobs { blobs }),
        ]
    }

    fn peer_info() -> impl Strategy<Value = PeerInfo> {
        (text(), text(), text(), proptest::option::of(bitfield())).prop_map(
            |(node, listen, site, chunks)| PeerInfo {
                node,
                listen,
                site,
                chunks,
            },
        )
    }

    fn response() -> impl Strategy<Value = Response> {
        prop_oneof![
            hello().prop_map(Response::Hello),
            (blob_id(), proptest::option::of(bitfield()))
                .prop_map(|(blob, chunks)| Response::Bitfield { blob, chunks }),
            any::<u64>().prop_map(|nonce| Response::Pong { nonce }),
            (error_code(), ".{0,200}")
                .prop_map(|(code, message)| Response::Error(ErrorReply { code, message })),
            (blob_id(), proptest::collection::vec(any::<u8>(), 0..4096))
                .prop_map(|(blob, packed)| Response::ChunkHashes { blob, packed }),
            (blob_id(), any::<u32>(), any::<u32>())
                .prop_map(|(blob, index, len)| Response::Chunk { blob, index, len }),
            (
                blob_id(),
                any::<u32>(),
                proptest::collection::vec(peer_info(), 0..4)
            )
                .prop_map(|(blob, index, peers)| Response::TryPeers {
                    blob,
                    index,
                    peers
                }),
            (
                text(),
                text(),
                any::<bool>(),
                ".{0,200}",
                proptest::collection::vec(publish_file(), 0..3),
                any::<u64>(),
                text()
            )
                .prop_map(
                    |(
                        name,
                        version,
                        is_default,
                        manifest_json,
                        files,
                        published_at,
                        published_by,
                    )| {
                        Response::Manifest(ManifestReply {
                            name,
                            version,
                            is_default,
                            manifest_json,
                            files: files
                                .into_iter()
                                .map(|f| FileBlob {
                                    file: f.file,
                                    blob: f.blob,
                                    size: f.size,
                                    sha256: f.sha256,
                                })
                                .collect(),
                            published_at,
                            published_by,
                        })
                    }
                ),
            proptest::collection::vec(text(), 0..4)
                .prop_map(|upload| Response::PublishReady { upload }),
            (text(), text(), any::<bool>(), any::<u32>(), any::<u64>()).prop_map(
                |(name, version, unchanged, files_uploaded, bytes_uploaded)| {
                    Response::Published(PublishOutcome {
                        name,
                        version,
                        unchanged,
                        files_uploaded,
                        bytes_uploaded,
                    })
                }
            ),
            proptest::collection::vec(
                (
                    text(),
                    proptest::option::of(text()),
                    proptest::collection::vec(text(), 0..3)
                ),
                0..3
            )
            .prop_map(|list| Response::Packages(
                list.into_iter()
                    .map(|(name, default_version, versions)| PackageSummary {
                        name,
                        default_version,
                        versions
                    })
                    .collect()
            )),
            text().prop_map(|message| Response::Done { message }),
            any::<u32>().prop_map(|refresh_secs| Response::Announced { refresh_secs }),
            proptest::collection::vec(peer_info(), 0..4).prop_map(Response::Peers),
            proptest::collection::vec(
                (
                    text(),
                    text(),
                    text(),
                    blob_id(),
                    any::<u32>(),
                    any::<u32>(),
                    any::<u64>()
                ),
                0..3
            )
            .prop_map(|list| Response::Holders(
                list.into_iter()
                    .map(|(node, listen, site, blob, held, total, ago)| HolderInfo {
                        node,
                        listen,
                        site,
                        blob,
                        chunks_held: held,
                        chunks_total: total,
                        last_seen_secs_ago: ago
                    })
                    .collect()
            )),
            proptest::collection::vec(
                (
                    any::<u64>(),
                    text(),
                    proptest::collection::vec(text(), 0..3),
                    text(),
                    text(),
                    text()
                ),
                0..3
            )
            .prop_map(|list| Response::AuditRecords(
                list.into_iter()
                    .map(
                        |(time, caller, roles, action, target, outcome)| AuditRecord {
                            time,
                            caller,
                            roles,
                            action,
                            target,
                            outcome
                        }
                    )
                    .collect()
            )),
            proptest::collection::vec(
                (
                    (text(), text(), text()),
                    proptest::collection::vec((text(), text()), 0..3),
                    (any::<u64>(), any::<u32>(), any::<u32>()),
                    (any::<u64>(), any::<u64>())
                ),
                0..3
            )
            .prop_map(|list| Response::Nodes(
                list.into_iter()
                    .map(
                        |(
                            (node, listen, site),
                            tags,
                            (last_seen_secs_ago, blobs, complete_blobs),
                            (chunks_held, bytes_held),
                        )| NodeSummary {
                            node,
                            listen,
                            site,
                            tags,
                            last_seen_secs_ago,
                            blobs,
                            complete_blobs,
                            chunks_held,
                            bytes_held
                        }
                    )
                    .collect()
            )),
            (
                (text(), text(), text(), text()),
                blob_id(),
                (any::<u64>(), any::<u32>(), any::<u32>())
            )
                .prop_map(
                    |((node, name, version, file), blob, (size, chunks, held))| {
                        Response::Preheating(PreheatReply {
                            node,
                            name,
                            version,
                            file,
                            blob,
                            size,
                            chunks,
                            chunks_held: held,
                        })
                    }
                ),
            proptest::collection::vec((blob_id(), text(), text(), text()), 0..3).prop_map(|list| {
                Response::BlobNames(
                    list.into_iter()
                        .map(|(blob, name, version, file)| BlobName {
                            blob,
                            name,
                            version,
                            file,
                        })
                        .collect(),
                )
            }),
        ]
    }

    proptest! {
        #[test]
        fn every_request_round_trips(message in request()) {
            let frame = encode(&message).unwrap();
            let (back, used) = decode_frame::<Request>(&frame).unwrap().unwrap();
            prop_assert_eq!(back, message);
            prop_assert_eq!(used, frame.len());
        }

        #[test]
        fn every_response_round_trips(message in response()) {
            let frame = encode(&message).unwrap();
            let (back, used) = decode_frame::<Response>(&frame).unwrap().unwrap();
            prop_assert_eq!(back, message);
            prop_assert_eq!(used, frame.len());
        }

        #[test]
        fn a_truncated_frame_asks_for_more(message in request(), cut in any::<usize>()) {
            let frame = encode(&message).unwrap();
            let cut = cut % frame.len();
            prop_assert_eq!(decode_frame::<Request>(&frame[..cut]).unwrap(), None);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame::<Request>(&bytes);
            let _ = decode_frame::<Response>(&bytes);
        }
    }

    #[test]
    fn an_oversized_length_prefix_is_refused_before_reading_on() {
        let mut frame = (MAX_FRAME_BYTES as u32 + 1).to_be_bytes().to_vec();
        frame.push(0);
        assert!(matches!(
            decode_frame::<Request>(&frame),
            Err(WireError::FrameTooLarge { .. })
        ));
        assert!(payload_len(u32::MAX.to_be_bytes()).is_err());
    }

    #[test]
    fn a_huge_declared_vector_inside_a_small_frame_is_refused() {
        // Response::ChunkHashes (variant 3) claiming a 2^40-byte vector in a 40-byte frame.
        let mut payload = vec![3u8];
        payload.extend_from_slice(&[7u8; 32]);
        payload.push(253); // bincode varint tag for a u64 follows
        payload.extend_from_slice(&(1u64 << 40).to_le_bytes());
        let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&payload);
        assert!(matches!(
            decode_frame::<Response>(&frame),
            Err(WireError::Malformed { .. })
        ));
    }

    #[test]
    fn trailing_bytes_in_a_frame_are_refused() {
        let mut frame = encode(&Request::Ping { nonce: 9 }).unwrap();
        frame.push(0);
        let len = (frame.len() - FRAME_PREFIX_BYTES) as u32;
        frame[..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(
            decode_frame::<Request>(&frame),
            Err(WireError::TrailingBytes { extra: 1 })
        );
    }

    #[test]
    fn an_unknown_variant_is_a_clear_error() {
        let frame = [0, 0, 0, 1, 200];
        assert!(matches!(
            decode_frame::<Request>(&frame),
            Err(WireError::Malformed { .. })
        ));
    }

    #[test]
    fn a_message_too_big_to_send_is_refused_by_the_encoder() {
        let message = Response::ChunkHashes {
            blob: BlobId([0; 32]),
            packed: vec![0; MAX_FRAME_BYTES + 1],
        };
        let mut out = vec![1, 2, 3];
        assert!(encode_frame(&message, &mut out).is_err());
        assert_eq!(out, vec![1, 2, 3]);
    }

    #[test]
    fn hello_negotiates_the_highest_common_version() {
        let ours = Hello::ours();
        let newer = Hello {
            protocol_version: PROTOCOL_VERSION + 3,
            min_protocol_version: MIN_PROTOCOL_VERSION,
            agent: "future".into(),
        };
        assert_eq!(ours.negotiate(&newer), Some(PROTOCOL_VERSION));
        let disjoint = Hello {
            protocol_version: PROTOCOL_VERSION + 3,
            min_protocol_version: PROTOCOL_VERSION + 1,
            agent: "far future".into(),
        };
        assert_eq!(ours.negotiate(&disjoint), None);
    }
}
