//! The chunk bitfield lives in `pkgmesh-protocol` because it travels on the wire; the cache
//! re-exports it so its callers need not care.

pub use pkgmesh_protocol::bitfield::{Bitfield, BitfieldError};
