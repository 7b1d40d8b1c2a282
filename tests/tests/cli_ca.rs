//! `pkgmesh ca init|issue|show|revoke` through the real binary: files, JSON output, exit codes.

use std::path::Path;

use pkgmesh_tests::{run_pkgmesh, stdout_json};

fn run(args: &[&dyn AsRef<std::ffi::OsStr>]) -> std::process::Output {
    run_pkgmesh(args.iter().map(|a| a.as_ref()))
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn init_issue_show_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let id = dir.path().join("publisher-1");

    let output = run(&[
        &"ca",
        &"init",
        &"--dir",
        &ca,
        &"--name",
        &"test fleet",
        &"--json",
    ]);
    assert!(output.status.success(), "{output:?}");
    let init = stdout_json(&output);
    assert_eq!(init["common_name"], "test fleet");
    assert!(ca.join("ca.pem").is_file());
    assert!(ca.join("ca-key.pem").is_file());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(ca.join("ca-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // A second init over the same CA fails (1) and says why, leaving the key alone.
    let key_before = std::fs::read(ca.join("ca-key.pem")).unwrap();
    let again = run(&[&"ca", &"init", &"--dir", &ca]);
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );
    assert_eq!(std::fs::read(ca.join("ca-key.pem")).unwrap(), key_before);

    let output = run(&[
        &"ca",
        &"issue",
        &"--dir",
        &ca,
        &"--name",
        &"publisher-1",
        &"--role",
        &"publisher,deployer",
        &"--days",
        &"30",
        &"--out",
        &id,
        &"--json",
    ]);
    assert!(output.status.success(), "{output:?}");
    let issued = stdout_json(&output);
    assert_eq!(issued["name"], "publisher-1");
    assert_eq!(
        issued["roles"],
        serde_json::json!(["publisher", "deployer"])
    );
    for file in ["cert.pem", "key.pem", "ca.pem"] {
        assert!(id.join(file).is_file(), "{file} missing");
    }

    let output = run(&[&"ca", &"show", &"--identity", &id, &"--json"]);
    assert!(output.status.success(), "{output:?}");
    let shown = stdout_json(&output);
    assert_eq!(shown["name"], "publisher-1");
    assert_eq!(shown["roles"], serde_json::json!(["publisher", "deployer"]));
    assert_eq!(shown["serial"], issued["serial"]);
    assert_eq!(shown["not_after"], issued["not_after"]);
    assert_eq!(shown["expired"], false);

    // Text output for people.
    let output = run(&[&"ca", &"show", &"--identity", &id]);
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        text.contains("publisher-1") && text.contains("publisher, deployer"),
        "{text}"
    );

    let output = run(&[
        &"ca",
        &"revoke",
        &"--dir",
        &ca,
        &"--cert",
        &id.join("cert.pem"),
        &"--json",
    ]);
    assert!(output.status.success(), "{output:?}");
    let revoked = stdout_json(&output);
    assert_eq!(revoked["serial"], issued["serial"]);
    assert_eq!(revoked["crl_number"], 1);
    assert_eq!(revoked["already_revoked"], false);
    assert!(ca.join("crl.pem").is_file());
    let text = std::fs::read_to_string(ca.join("crl.pem")).unwrap();
    assert!(text.starts_with("-----BEGIN X509 CRL-----"), "{text}");

    // Revoking again is not an error and changes nothing.
    let output = run(&[
        &"ca",
        &"revoke",
        &"--dir",
        &ca,
        &"--cert",
        &id.join("cert.pem"),
        &"--json",
    ]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(stdout_json(&output)["already_revoked"], true);

    // Identities issued from now on carry the CRL.
    let node = dir.path().join("node-1");
    let output = run(&[
        &"ca", &"issue", &"--dir", &ca, &"--name", &"node-1", &"--role", &"node", &"--out", &node,
        &"--json",
    ]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(stdout_json(&output)["crl_copied"], true);
    let shown = stdout_json(&run(&[&"ca", &"show", &"--identity", &node, &"--json"]));
    assert_eq!(shown["crls"], 1);
}

#[test]
fn bad_usage_exits_2_and_failures_exit_1_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let id = dir.path().join("id");

    // An unknown role is bad usage, and the message lists the valid roles.
    let output = run(&[
        &"ca", &"issue", &"--dir", &ca, &"--name", &"x", &"--role", &"root", &"--out", &id,
    ]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(
        stderr(&output).contains("seed, node, publisher, deployer, operator, admin"),
        "{}",
        stderr(&output)
    );
    // A missing --role is bad usage too.
    let output = run(&[
        &"ca", &"issue", &"--dir", &ca, &"--name", &"x", &"--out", &id,
    ]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");

    // Issuing from a CA that does not exist fails and says to run `ca init`.
    let output = run(&[
        &"ca", &"issue", &"--dir", &ca, &"--name", &"x", &"--role", &"node", &"--out", &id,
    ]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(
        stderr(&output).contains("pkgmesh ca init"),
        "{}",
        stderr(&output)
    );
    assert!(!id.exists());

    // A name with a control character is refused.
    assert!(run(&[&"ca", &"init", &"--dir", &ca]).status.success());
    let output = run(&[
        &"ca", &"issue", &"--dir", &ca, &"--name", &"a\u{7}b", &"--role", &"node", &"--out", &id,
    ]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(stderr(&output).contains("control"), "{}", stderr(&output));

    // Showing a directory that is not an identity names the missing file.
    let output = run(&[
        &"ca",
        &"show",
        &"--identity",
        &Path::new(&dir.path().join("nothing")),
    ]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(stderr(&output).contains("cert.pem"), "{}", stderr(&output));
}
