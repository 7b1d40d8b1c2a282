//! pkgmesh-benches: the benchmark harness (swarm, throughput, tracker, simulation) and the
//! criterion micro-benchmarks.
//!
//! Owns: measuring. Does not own: any behaviour of the product itself.

pub mod procs;
pub mod sim;
