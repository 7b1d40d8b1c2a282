//! Arbitrary bytes as a response payload, as a client reads it after the frame prefix.
//! The body is shared with the stable corpus replay test: see `bodies/src/lib.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = pkgmesh_fuzz_bodies::response_decoder(data);
});
