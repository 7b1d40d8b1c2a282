//! Arbitrary bytes into the manifest parser and, when they parse, into platform selection.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pkgmesh_protocol::manifest::parse_manifest;
use pkgmesh_protocol::select::{select, Platform};

fuzz_target!(|data: &[u8]| {
    let Ok(manifest) = parse_manifest(data) else {
        return;
    };
    // A valid manifest round-trips through its own JSON form.
    let again = parse_manifest(manifest.to_json_pretty().as_bytes()).expect("own JSON parses");
    assert_eq!(again, manifest);
    for (platform, version, arch) in [
        ("amazon", "2023", "x86_64"),
        ("ubuntu", "22.04", "arm64"),
        ("redhat", "9.4", "x86_64"),
        ("windows", "10.0.14393nano", "x86_64"),
    ] {
        let platform = Platform {
            name: platform.into(),
            version: version.into(),
            arch: arch.into(),
        };
        if let Ok(selection) = select(&manifest, &platform) {
            assert!(manifest.files.contains_key(&selection.file));
        }
    }
});
