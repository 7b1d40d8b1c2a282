//! pkgmesh-node: the running services of a seed and a node.
//!
//! Owns: the fleet PKI and the QUIC transport with mutual TLS ([`pki`], [`transport`]), the
//! origin store backends ([`origin`]), ZIP layout checks ([`ziplayout`]), the seed (catalog,
//! publishing, tracker, origin admission, audit: [`seed`]), the peer swarm and the installer.
//! Does not own: wire formats and package rules (`pkgmesh-protocol`), the chunk store
//! (`pkgmesh-cache`), argument parsing and printing (`pkgmesh-cli`).

pub mod admin;
pub mod client;
pub mod config;
pub mod install;
pub mod metrics;
pub mod origin;
pub mod peer;
pub mod pki;
pub mod seed;
pub mod swarm;
pub mod transport;
pub mod ziplayout;
