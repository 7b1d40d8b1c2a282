//! pkgmesh-tests: end-to-end tests that drive the real `pkgmesh` binary and real files.
//!
//! Owns: helpers to locate the built binary, build ZIPs with the `zip` command and run commands.
//! Does not own: unit tests, which live next to the code they test.
