//! Arbitrary bytes as a stream of length-prefixed frames, as requests and as responses.
//! The body is shared with the stable corpus replay test: see `bodies/src/lib.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = pkgmesh_fuzz_bodies::frame_decoder(data);
});
