//! pkgmesh-cli: the `pkgmesh` binary.
fn main() {}
