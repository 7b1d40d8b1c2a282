//! pkgmesh-node: the running services of a seed and a node.
//!
//! Owns: the QUIC transport with mutual TLS, the seed (catalog, origin, tracker, admission), the
//! peer swarm driver, the installer and the admin API.
//! Does not own: wire formats and package rules (`pkgmesh-protocol`) or the chunk store
//! (`pkgmesh-cache`); argument parsing and printing belong to `pkgmesh-cli`.
