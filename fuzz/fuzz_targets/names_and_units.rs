//! Arbitrary bytes as package, version and file names, sizes, rates and os-release contents.
//! The body is shared with the stable corpus replay test: see `bodies/src/lib.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = pkgmesh_fuzz_bodies::names_and_units(data);
});
