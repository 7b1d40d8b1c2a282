//! Arbitrary bytes as a request payload, as a seed or node reads it after the frame prefix.
//! The body is shared with the stable corpus replay test: see `bodies/src/lib.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = pkgmesh_fuzz_bodies::request_decoder(data);
});
