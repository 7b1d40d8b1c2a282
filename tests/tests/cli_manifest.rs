//! `pkgmesh manifest check|select` and `pkgmesh platform` through the real binary, on manifests
//! and ZIPs built by the `zip` command.

use std::path::Path;

use pkgmesh_tests::{build_sample_package, run_pkgmesh, stdout_json, workspace_root};
use serde_json::json;
use sha2::{Digest, Sha256};

fn sha(byte: u8) -> String {
    hex::encode([byte; 32])
}

/// A manifest exercising every level of selection. Each file name says where it sits.
fn selection_manifest() -> serde_json::Value {
    let files = [
        "a2-x86.zip",
        "a2-arm.zip",
        "a2023.zip",
        "a-any.zip",
        "rh8.zip",
        "rh9.zip",
        "rh94.zip",
        "rh941.zip",
        "rh-star.zip",
        "u-x86.zip",
        "u-arm.zip",
        "u-star.zip",
        "c7.zip",
        "c7long.zip",
        "win-nano.zip",
        "win10.zip",
        "win-any.zip",
        "d12arm.zip",
        "any-any.zip",
        "s15arm.zip",
        "s-any.zip",
        "ora-star.zip",
    ];
    let files: serde_json::Map<String, serde_json::Value> = files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            (
                f.to_string(),
                json!({ "checksums": { "sha256": sha(i as u8) } }),
            )
        })
        .collect();
    json!({
        "schemaVersion": "2.0",
        "version": "1.2.3",
        "packages": {
            "amazon": {
                "2": { "x86_64": { "file": "a2-x86.zip" }, "arm64": { "file": "a2-arm.zip" } },
                "2023": { "_any": { "file": "a2023.zip" } },
                "_any": { "x86_64": { "file": "a-any.zip" } }
            },
            "redhat": {
                "8.*": { "x86_64": { "file": "rh8.zip" } },
                "9.*": { "_any": { "file": "rh9.zip" } },
                "9.4.*": { "x86_64": { "file": "rh94.zip" } },
                "9.4.1": { "x86_64": { "file": "rh941.zip" } },
                "*": { "x86_64": { "file": "rh-star.zip" } }
            },
            "ubuntu": {
                "_any": { "x86_64": { "file": "u-x86.zip" }, "arm64": { "file": "u-arm.zip" } },
                "*": { "_any": { "file": "u-star.zip" } }
            },
            "centos": {
                "7.*": { "x86_64": { "file": "c7.zip" } },
                "7.9.2009.*": { "x86_64": { "file": "c7long.zip" } }
            },
            "windows": {
                "10.*nano": { "_any": { "file": "win-nano.zip" } },
                "10.*": { "_any": { "file": "win10.zip" } },
                "_any": { "_any": { "file": "win-any.zip" } }
            },
            "debian": { "12": { "arm64": { "file": "d12arm.zip" } } },
            "suse": {
                "15.*": { "arm64": { "file": "s15arm.zip" } },
                "_any": { "x86_64": { "file": "s-any.zip" } }
            },
            "oracle": { "*": { "_any": { "file": "ora-star.zip" } } },
            "_any": { "_any": { "x86_64": { "file": "any-any.zip" } } }
        },
        "files": files
    })
}

/// (platform, version, arch, the SSM Agent's answer: a file, or None for "no match").
const SELECTION_CASES: &[(&str, &str, &str, Option<&str>)] = &[
    ("amazon", "2", "x86_64", Some("a2-x86.zip")),
    ("amazon", "2", "arm64", Some("a2-arm.zip")),
    ("amazon", "2", "386", None), // version "2" chosen, no arch 386 and no _any: no backtracking
    ("amazon", "2023", "x86_64", Some("a2023.zip")),
    ("amazon", "2023", "arm64", Some("a2023.zip")),
    ("amazon", "2018.03", "x86_64", Some("a-any.zip")),
    ("amazon", "2018.03", "arm64", None),
    ("amazon", "2", "X86_64", None), // comparisons are case-sensitive
    ("Amazon", "2", "x86_64", Some("any-any.zip")),
    ("redhat", "8.6", "x86_64", Some("rh8.zip")),
    ("redhat", "8", "x86_64", Some("rh8.zip")), // `8.*` matches the bare `8`
    ("redhat", "8.6", "arm64", None),
    ("redhat", "9.2", "arm64", Some("rh9.zip")),
    ("redhat", "9.4", "x86_64", Some("rh94.zip")), // `9.4.*` beats `9.*`
    ("redhat", "9.4.2", "x86_64", Some("rh94.zip")),
    ("redhat", "9.4.1", "x86_64", Some("rh941.zip")), // exact beats any wildcard
    ("redhat", "9.4.2", "arm64", None),               // `9.4.*` chosen; `9.*` is not tried again
    ("redhat", "9", "x86_64", Some("rh9.zip")),       // `9.4.*` is longer than `9`: never matches
    ("redhat", "9.04", "x86_64", Some("rh9.zip")),    // components compare as strings
    ("redhat", "94.1", "x86_64", Some("rh-star.zip")), // `9.*` is not a text prefix of `94.1`
    ("redhat", "7.9", "x86_64", Some("rh-star.zip")),
    ("redhat", "7.9", "arm64", None),
    ("redhat", "99", "x86_64", Some("rh-star.zip")),
    ("ubuntu", "22.04", "x86_64", Some("u-x86.zip")),
    ("ubuntu", "22.04", "arm64", Some("u-arm.zip")),
    ("ubuntu", "20.04", "386", None), // `_any` wins over `*`, then arch fails
    ("centos", "7.9", "x86_64", Some("c7.zip")),
    ("centos", "7.9.2009", "x86_64", Some("c7long.zip")),
    ("centos", "7.9.2009.1", "x86_64", Some("c7long.zip")),
    ("centos", "8", "x86_64", None), // no `_any` and no `*` version
    ("windows", "10.0.14393nano", "x86_64", Some("win-nano.zip")),
    ("windows", "10.0.14393nano", "arm64", Some("win-nano.zip")),
    ("windows", "10.0.17763", "x86_64", Some("win10.zip")), // non-nano skips nano keys
    ("windows", "6.3.9600", "x86_64", Some("win-any.zip")),
    ("windows", "6.3nano", "x86_64", Some("win-any.zip")), // `_any` is not subject to nano
    ("debian", "12", "arm64", Some("d12arm.zip")),
    ("debian", "12", "x86_64", None), // platform debian chosen; `_any` platform not tried
    ("debian", "11", "arm64", None),
    ("fedora", "39", "x86_64", Some("any-any.zip")),
    ("fedora", "39", "arm64", None),
    ("suse", "15.5", "arm64", Some("s15arm.zip")),
    ("suse", "15.5", "x86_64", None), // `15.*` chosen; version `_any` not tried again
    ("suse", "12", "x86_64", Some("s-any.zip")),
    ("oracle", "8.9", "arm64", Some("ora-star.zip")),
    ("oracle", "", "x86_64", Some("ora-star.zip")),
];

#[test]
fn manifest_select_gives_the_ssm_agents_answer() {
    assert!(SELECTION_CASES.len() >= 40);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("manifest.json");
    let manifest = selection_manifest();
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    let check = run_pkgmesh(["manifest".as_ref(), "check".as_ref(), path.as_os_str()]);
    assert!(check.status.success(), "{check:?}");

    for &(platform, version, arch, expected) in SELECTION_CASES {
        let output = run_pkgmesh([
            "manifest".as_ref(),
            "select".as_ref(),
            path.as_os_str(),
            "--platform".as_ref(),
            platform.as_ref(),
            "--platform-version".as_ref(),
            version.as_ref(),
            "--arch".as_ref(),
            arch.as_ref(),
            "--json".as_ref(),
        ]);
        let case = format!("{platform}/{version}/{arch}");
        match expected {
            Some(file) => {
                assert!(output.status.success(), "{case}: {output:?}");
                let report = stdout_json(&output);
                assert_eq!(report["file"], file, "{case}");
                let sha = &manifest["files"][file]["checksums"]["sha256"];
                assert_eq!(&report["sha256"], sha, "{case}");
            }
            None => {
                assert_eq!(output.status.code(), Some(1), "{case}: {output:?}");
                let stderr = String::from_utf8_lossy(&output.stderr);
                // The error names what was looked for.
                assert!(
                    stderr.contains(&format!("{platform:?}")),
                    "{case}: {stderr}"
                );
                assert!(stderr.contains(&format!("{arch:?}")), "{case}: {stderr}");
                assert!(output.stdout.is_empty(), "{case}");
            }
        }
    }
}

#[test]
fn the_sample_package_built_with_zip_checks_and_selects() {
    let dir = tempfile::tempdir().unwrap();
    let manifest_path = build_sample_package(dir.path(), "2.1.0");
    let output = run_pkgmesh([
        "manifest".as_ref(),
        "check".as_ref(),
        manifest_path.as_os_str(),
        "--name".as_ref(),
        "pkgmesh-sample".as_ref(),
        "--json".as_ref(),
    ]);
    assert!(output.status.success(), "{output:?}");
    let report = stdout_json(&output);
    assert_eq!(report["ok"], true);
    assert_eq!(report["version"], "2.1.0");
    let files = report["files"].as_array().unwrap();
    assert_eq!(files.len(), 7);
    // The checksums the manifest records are those of the ZIPs the zip command wrote.
    for file in files {
        let name = file["name"].as_str().unwrap();
        let bytes = std::fs::read(dir.path().join(name)).unwrap();
        assert_eq!(
            file["sha256"],
            hex::encode(Sha256::digest(&bytes)),
            "{name}"
        );
    }
    for (platform, version, arch, file) in [
        ("windows", "10.0.20348", "x86_64", "sample-windows.zip"),
        ("amazon", "2", "arm64", "sample-amazon2.zip"),
        ("amazon", "2023", "arm64", "sample-amazon2023.zip"),
        ("ubuntu", "24.04", "arm64", "sample-ubuntu-arm64.zip"),
        ("ubuntu", "22.04", "x86_64", "sample-ubuntu-x86_64.zip"),
        ("redhat", "8.10", "x86_64", "sample-redhat8.zip"),
        ("redhat", "9.4", "arm64", "sample-redhat9.zip"),
    ] {
        let output = run_pkgmesh([
            "manifest".as_ref(),
            "select".as_ref(),
            manifest_path.as_os_str(),
            "--platform".as_ref(),
            platform.as_ref(),
            "--platform-version".as_ref(),
            version.as_ref(),
            "--arch".as_ref(),
            arch.as_ref(),
        ]);
        assert!(output.status.success(), "{platform}: {output:?}");
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), file);
    }
}

#[test]
fn the_committed_example_manifest_is_valid() {
    let path = workspace_root().join("examples/manifest.example.json");
    let output = run_pkgmesh(["manifest".as_ref(), "check".as_ref(), path.as_os_str()]);
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("redhat    9.*"), "{text}");
}

/// (what is wrong, the manifest text, a JSON path the error must name).
fn malformed_manifests() -> Vec<(&'static str, String, &'static str)> {
    let good = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut m = json!({
            "schemaVersion": "2.0",
            "version": "1.0",
            "packages": { "amazon": { "2": { "x86_64": { "file": "a.zip" } } } },
            "files": { "a.zip": { "checksums": { "sha256": sha(1) } } }
        });
        f(&mut m);
        m.to_string()
    };
    vec![
        (
            "wrong schema",
            good(&|m| m["schemaVersion"] = json!("1.0")),
            "$.schemaVersion",
        ),
        (
            "schema missing",
            good(&|m| {
                m.as_object_mut().unwrap().remove("schemaVersion");
            }),
            "$.schemaVersion",
        ),
        (
            "bad version",
            good(&|m| m["version"] = json!("1.0/../x")),
            "$.version",
        ),
        (
            "version too long",
            good(&|m| m["version"] = json!("v".repeat(129))),
            "$.version",
        ),
        (
            "version a number",
            good(&|m| m["version"] = json!(1.0)),
            "$.version",
        ),
        (
            "publisher not text",
            good(&|m| m["publisher"] = json!(["x"])),
            "$.publisher",
        ),
        (
            "packages not an object",
            good(&|m| m["packages"] = json!([])),
            "$.packages",
        ),
        (
            "dangling file",
            good(&|m| m["packages"]["amazon"]["2"]["x86_64"]["file"] = json!("b.zip")),
            "$.packages[\"amazon\"][\"2\"][\"x86_64\"].file",
        ),
        (
            "short checksum",
            good(&|m| m["files"]["a.zip"]["checksums"]["sha256"] = json!("abc")),
            "$.files[\"a.zip\"].checksums.sha256",
        ),
        (
            "non-hex checksum",
            good(&|m| m["files"]["a.zip"]["checksums"]["sha256"] = json!("g".repeat(64))),
            "$.files[\"a.zip\"].checksums.sha256",
        ),
        (
            "checksum missing",
            good(&|m| m["files"]["a.zip"]["checksums"] = json!({})),
            "$.files[\"a.zip\"].checksums.sha256",
        ),
        (
            "arch entry not an object",
            good(&|m| m["packages"]["amazon"]["2"]["x86_64"] = json!("a.zip")),
            "$.packages[\"amazon\"][\"2\"][\"x86_64\"]",
        ),
        ("not JSON", "{\"schemaVersion\": \"2.0\",".to_string(), "$"),
        (
            "over 64 KiB",
            format!("{{\"publisher\":\"{}\"}}", "x".repeat(70_000)),
            "$",
        ),
    ]
}

#[test]
fn malformed_manifests_fail_with_every_error_named() {
    let dir = tempfile::tempdir().unwrap();
    let cases = malformed_manifests();
    assert!(cases.len() >= 10);
    for (what, text, path) in cases {
        let file = dir.path().join("m.json");
        std::fs::write(&file, &text).unwrap();
        for json_flag in [false, true] {
            let mut args = vec!["manifest".as_ref(), "check".as_ref(), file.as_os_str()];
            if json_flag {
                args.push("--json".as_ref());
            }
            let output = run_pkgmesh(args);
            assert_eq!(output.status.code(), Some(1), "{what}: {output:?}");
            if json_flag {
                let report = stdout_json(&output);
                assert_eq!(report["ok"], false, "{what}");
                let errors = report["errors"].as_array().unwrap();
                assert!(
                    errors.iter().any(|e| e["path"].as_str() == Some(path)),
                    "{what}: no error at {path}: {errors:?}"
                );
            } else {
                let stderr = String::from_utf8_lossy(&output.stderr);
                assert!(stderr.contains(path), "{what}: {stderr}");
            }
        }
    }
}

#[test]
fn all_errors_of_a_manifest_come_together() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.json");
    let text = json!({
        "schemaVersion": "3.0",
        "version": "bad version",
        "packages": { "amazon": { "2": { "x86_64": { "file": "missing.zip" } } } },
        "files": { "a.zip": { "checksums": { "sha256": "12" } } }
    });
    std::fs::write(&file, text.to_string()).unwrap();
    let output = run_pkgmesh([
        "manifest".as_ref(),
        "check".as_ref(),
        file.as_os_str(),
        "--json".as_ref(),
    ]);
    let report = stdout_json(&output);
    let paths: Vec<&str> = report["errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["path"].as_str())
        .collect();
    for expected in [
        "$.schemaVersion",
        "$.version",
        "$.packages[\"amazon\"][\"2\"][\"x86_64\"].file",
        "$.files[\"a.zip\"].checksums.sha256",
    ] {
        assert!(
            paths.contains(&expected),
            "{expected} missing from {paths:?}"
        );
    }
}

#[test]
fn platform_reads_the_os_release_file_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("os-release");
    std::fs::write(
        &path,
        "NAME=\"Red Hat Enterprise Linux\"\nID=\"rhel\"\nVERSION_ID=\"9.4\"\n",
    )
    .unwrap();
    let output = run_pkgmesh([
        "platform".as_ref(),
        "--os-release".as_ref(),
        path.as_os_str(),
        "--arch".as_ref(),
        "arm64".as_ref(),
        "--json".as_ref(),
    ]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        stdout_json(&output),
        json!({ "name": "redhat", "version": "9.4", "arch": "arm64" })
    );
    let missing = run_pkgmesh([
        "platform".as_ref(),
        "--os-release".as_ref(),
        Path::new("/nonexistent/os-release").as_os_str(),
    ]);
    assert_eq!(missing.status.code(), Some(1));
}
