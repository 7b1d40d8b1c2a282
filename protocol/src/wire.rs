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

use crate::blob::BlobId;

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
    /// One chunk's bytes.
    GetChunk {
        blob: BlobId,
        index: u32,
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
        ]
    }

    fn request() -> impl Strategy<Value = Request> {
        prop_oneof![
            hello().prop_map(Request::Hello),
            any::<u64>().prop_map(|nonce| Request::Ping { nonce }),
            (blob_id(), any::<u64>())
                .prop_map(|(blob, size)| Request::GetChunkHashes { blob, size }),
            (blob_id(), any::<u32>()).prop_map(|(blob, index)| Request::GetChunk { blob, index }),
        ]
    }

    fn response() -> impl Strategy<Value = Response> {
        prop_oneof![
            hello().prop_map(Response::Hello),
            any::<u64>().prop_map(|nonce| Response::Pong { nonce }),
            (error_code(), ".{0,200}")
                .prop_map(|(code, message)| Response::Error(ErrorReply { code, message })),
            (blob_id(), proptest::collection::vec(any::<u8>(), 0..4096))
                .prop_map(|(blob, packed)| Response::ChunkHashes { blob, packed }),
            (blob_id(), any::<u32>(), any::<u32>())
                .prop_map(|(blob, index, len)| Response::Chunk { blob, index, len }),
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
