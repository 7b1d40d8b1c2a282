//! Arbitrary bytes as a bitfield, in its wire shape and in its packed form.
//! The body is shared with the stable corpus replay test: see `bodies/src/lib.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = pkgmesh_fuzz_bodies::bitfield_decoder(data);
});
