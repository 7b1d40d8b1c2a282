//! pkgmesh-protocol: the pure rules and data of pkgmesh. No I/O beyond what a caller hands in,
//! no async runtime, no sockets.
//!
//! Owns:
//! - the AWS Systems Manager Distributor package model: manifest parsing and validation
//!   ([`manifest`]), platform selection with the SSM Agent's exact rules ([`select`]) and local
//!   platform detection from an os-release file ([`platform`]);
//! - blob and chunk addressing: a blob is named by the BLAKE3 hash of the whole file, and every
//!   chunk verifies on its own against that name ([`blob`]); which chunks a node holds
//!   ([`bitfield`]);
//! - the wire: message types, framing and decoder limits ([`wire`]);
//! - sizes and rates as people write them, `64MiB`, `32Mbit` ([`units`]).
//!
//! Does not own: the chunk store (`pkgmesh-cache`), networking and services (`pkgmesh-node`),
//! or argument parsing and printing (`pkgmesh-cli`).

pub mod bitfield;
pub mod blob;
pub mod deploy;
pub mod manifest;
pub mod names;
pub mod platform;
pub mod select;
pub mod units;
pub mod wire;
