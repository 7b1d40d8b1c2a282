//! Arbitrary bytes as a blob id, size and chunk-hash list, as a node checks one from a peer.
//! The body is shared with the stable corpus replay test: see `bodies/src/lib.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = pkgmesh_fuzz_bodies::chunk_hashes(data);
});
