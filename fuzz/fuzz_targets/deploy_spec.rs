//! Arbitrary bytes as deployment fields (targets, schedules, limits, arguments) and as a spec.
//! The body is shared with the stable corpus replay test: see `bodies/src/lib.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = pkgmesh_fuzz_bodies::deploy_spec(data);
});
