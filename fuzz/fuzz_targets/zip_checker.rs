//! Arbitrary bytes as a package ZIP, through the publish-time checker and the installer's extractor.
//! The body is shared with the stable corpus replay test: see `bodies/src/lib.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = pkgmesh_fuzz_bodies::zip_checker(data);
});
