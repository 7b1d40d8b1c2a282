//! Hostile manifests, one family per test: a wrong schema, huge fields, repeated keys, deep
//! nesting, platforms nobody has, file names that are paths, broken checksums and oversize
//! documents. Each must be refused with an error that says where the problem is and what it is,
//! never a panic and never a manifest that means something other than what its bytes say.
//! (The field-by-field rules have their own unit tests in `src/manifest.rs`; these are the
//! attacks.)

use pkgmesh_protocol::manifest::{
    parse_manifest, ManifestErrors, MAX_MANIFEST_BYTES, MAX_NESTING_DEPTH,
};
use pkgmesh_protocol::names::quote_for_message;
use pkgmesh_protocol::select::{select, Platform};

const SHA_A: &str = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";
const SHA_B: &str = "fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9";

/// A valid manifest with `packages` and `files` given as raw JSON text, so tests can write what
/// `serde_json::Value` could not hold (repeated keys).
fn manifest(packages: &str, files: &str) -> String {
    format!(
        r#"{{
  "schemaVersion": "2.0",
  "version": "1.0.0",
  "packages": {packages},
  "files": {files}
}}"#
    )
}

fn valid() -> String {
    manifest(
        r#"{ "ubuntu": { "22.04": { "x86_64": { "file": "a.zip" } } } }"#,
        &format!(r#"{{ "a.zip": {{ "checksums": {{ "sha256": "{SHA_A}" }} }} }}"#),
    )
}

fn refused(text: &str) -> ManifestErrors {
    match parse_manifest(text.as_bytes()) {
        Ok(m) => panic!("accepted a hostile manifest as {m:?}:\n{text}"),
        Err(errors) => {
            assert!(!errors.is_empty());
            errors
        }
    }
}

/// Asserts one error sits at `path` and its message (with the value shown) holds every one of
/// `words`.
fn assert_error(errors: &ManifestErrors, path: &str, words: &[&str]) {
    let found: Vec<String> = errors.at(path).map(|e| e.to_string()).collect();
    assert!(
        found
            .iter()
            .any(|message| words.iter().all(|w| message.contains(w))),
        "no error at {path} containing {words:?}; errors were:\n{errors}"
    );
}

#[test]
fn the_valid_baseline_parses() {
    parse_manifest(valid().as_bytes()).expect("the baseline is valid");
}

#[test]
fn a_wrong_schema_version_is_refused_naming_the_one_supported() {
    for (value, shown) in [
        ("\"1.0\"", "\"1.0\""),
        ("\"2.1\"", "\"2.1\""),
        ("\"2.0 \"", "\"2.0 \""),
        ("\"\"", "\"\""),
    ] {
        let text = valid().replace("\"2.0\"", value);
        let errors = refused(&text);
        assert_error(&errors, "$.schemaVersion", &["must be \"2.0\"", shown]);
    }
    let errors = refused(&valid().replace("\"2.0\"", "2.0"));
    assert_error(&errors, "$.schemaVersion", &["expected a string", "number"]);
    let errors = refused(&valid().replace("\"schemaVersion\": \"2.0\",", ""));
    assert_error(&errors, "$.schemaVersion", &["missing"]);
}

#[test]
fn huge_fields_are_refused_or_bounded_by_the_document_limit() {
    // Names have Distributor's limits.
    let errors = refused(&valid().replace("\"1.0.0\"", &format!("\"{}\"", "9".repeat(5000))));
    assert_error(&errors, "$.version", &["5000 characters long"]);
    let long_file = format!("{}.zip", "f".repeat(300));
    let errors = refused(&valid().replace("a.zip", &long_file));
    assert!(
        errors
            .iter()
            .any(|e| e.path.starts_with("$.files[") && e.message.contains("304 bytes")),
        "{errors}"
    );
    // Free text (publisher, unknown fields) is bounded by the document: 60 KiB fits...
    let big = "p".repeat(60 * 1024);
    let text = valid().replace(
        "\"version\"",
        &format!("\"publisher\": \"{big}\", \"version\""),
    );
    let parsed = parse_manifest(text.as_bytes()).expect("a big publisher within 64 KiB");
    assert_eq!(parsed.publisher.as_deref().map(str::len), Some(big.len()));
    // ...70 KiB does not, and the error says so rather than anything about the content.
    let big = "p".repeat(70 * 1024);
    let text = valid().replace(
        "\"version\"",
        &format!("\"publisher\": \"{big}\", \"version\""),
    );
    let errors = refused(&text);
    assert_eq!(errors.len(), 1, "{errors}");
    assert_error(&errors, "$", &["over the limit", "65536"]);
    // A shown value is cut short, so a huge field cannot flood a terminal or a log.
    let errors = refused(&valid().replace("\"1.0.0\"", &format!("\"{}\"", "x ".repeat(20_000))));
    for error in &errors {
        assert!(error.to_string().len() < 1024, "{error}");
    }
}

#[test]
fn a_repeated_key_is_refused_naming_the_key() {
    // The same file twice with two checksums: which one would be checked?
    let twice = format!(
        r#"{{ "a.zip": {{ "checksums": {{ "sha256": "{SHA_A}" }} }},
             "a.zip": {{ "checksums": {{ "sha256": "{SHA_B}" }} }} }}"#
    );
    let text = manifest(
        r#"{ "ubuntu": { "22.04": { "x86_64": { "file": "a.zip" } } } }"#,
        &twice,
    );
    let errors = refused(&text);
    assert_error(&errors, "$", &["\"a.zip\" appears twice", "line 6"]);

    // One platform twice, pointing at different files.
    let text = manifest(
        r#"{ "ubuntu": { "_any": { "_any": { "file": "a.zip" } } },
             "ubuntu": { "_any": { "_any": { "file": "b.zip" } } } }"#,
        &format!(
            r#"{{ "a.zip": {{ "checksums": {{ "sha256": "{SHA_A}" }} }},
                 "b.zip": {{ "checksums": {{ "sha256": "{SHA_B}" }} }} }}"#
        ),
    );
    assert_error(&refused(&text), "$", &["\"ubuntu\" appears twice"]);

    // A top-level field, a checksum and the file reference itself.
    let text = valid().replace(
        "\"version\": \"1.0.0\",",
        "\"version\": \"1.0.0\", \"version\": \"6.6.6\",",
    );
    assert_error(&refused(&text), "$", &["\"version\" appears twice"]);
    let text = valid().replace(
        &format!("\"sha256\": \"{SHA_A}\""),
        &format!("\"sha256\": \"{SHA_A}\", \"sha256\": \"{SHA_B}\""),
    );
    assert_error(&refused(&text), "$", &["\"sha256\" appears twice"]);
    let text = valid().replace(
        "{ \"file\": \"a.zip\" }",
        "{ \"file\": \"a.zip\", \"file\": \"evil.zip\" }",
    );
    assert_error(&refused(&text), "$", &["\"file\" appears twice"]);

    // Keys that only look alike are different keys, as in every JSON reader.
    let text = valid().replace(
        "\"ubuntu\":",
        "\"Ubuntu\": { \"_any\": { \"_any\": { \"file\": \"a.zip\" } } }, \"ubuntu\":",
    );
    parse_manifest(text.as_bytes()).expect("keys differing in case are distinct");
}

#[test]
fn deep_nesting_is_refused_before_the_parser_recurses() {
    for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
        let depth = MAX_NESTING_DEPTH + 1;
        let text = valid().replace(
            "\"version\"",
            &format!(
                "\"deep\": {}0{}, \"version\"",
                open.repeat(depth),
                close.repeat(depth)
            ),
        );
        let errors = refused(&text);
        assert_eq!(errors.len(), 1, "{errors}");
        assert_error(&errors, "$", &["levels deep", "line 3"]);
    }
    // Unclosed openers to the size limit, the worst case for a recursive parser.
    let errors = refused(&"{\"a\":".repeat(MAX_MANIFEST_BYTES / 5));
    assert_error(&errors, "$", &["levels deep"]);
}

#[test]
fn unknown_platforms_parse_but_select_nothing_and_say_why() {
    // Distributor does not restrict platform names (new distributions appear all the time), so
    // the manifest is valid; an instance that is not one of them gets an error naming what it
    // is and what the manifest offers.
    let text = valid().replace("\"ubuntu\"", "\"plan9\"");
    let parsed = parse_manifest(text.as_bytes()).expect("an unknown platform name is allowed");
    let wanted = Platform {
        name: "ubuntu".into(),
        version: "22.04".into(),
        arch: "x86_64".into(),
    };
    let error = select(&parsed, &wanted).expect_err("nothing for ubuntu");
    let message = error.to_string();
    for word in ["ubuntu", "22.04", "x86_64", "no platform", "plan9"] {
        assert!(message.contains(word), "{message}");
    }
    // Keys with control characters are shown escaped, never raw.
    let text = valid().replace("\"ubuntu\"", "\"\\u001b[31mred\"");
    let parsed = parse_manifest(text.as_bytes()).expect("a strange key is just a key");
    let message = select(&parsed, &wanted).expect_err("no match").to_string();
    assert!(!message.contains('\u{1b}'), "{message}");
    // An empty key can never match anything and is refused where it is.
    let errors = refused(&valid().replace("\"ubuntu\"", "\"\""));
    assert_error(&errors, "$.packages[\"\"]", &["must not be empty"]);
}

#[test]
fn file_names_that_are_paths_are_refused_where_they_appear() {
    for (name, json_name, problem) in [
        ("../a.zip", "../a.zip", "'/' at character 2"),
        ("/etc/passwd", "/etc/passwd", "'/' at character 0"),
        ("dir/a.zip", "dir/a.zip", "'/' at character 3"),
        ("..\\a.zip", "..\\\\a.zip", "'\\' at character 2"),
        ("C:\\a.zip", "C:\\\\a.zip", "'\\' at character 2"),
        ("..", "..", "names a directory"),
        (".", ".", "names a directory"),
        ("a\0.zip", "a\\u0000.zip", "U+0000 at character 1"),
        ("a\n.zip", "a\\n.zip", "U+000A at character 1"),
        ("", "", "is empty"),
    ] {
        // Named in `files`, and referenced from `packages`: both places are refused.
        let text = valid().replace("a.zip", json_name);
        let errors = refused(&text);
        let files_path = format!("$.files[{}]", quote_for_message(name));
        assert!(
            errors.at(&files_path).next().is_some(),
            "{name:?}: nothing at {files_path}: {errors}"
        );
        let reference = "$.packages[\"ubuntu\"][\"22.04\"][\"x86_64\"].file";
        assert!(
            errors
                .at(reference)
                .any(|e| e.message.contains("file name") && e.to_string().contains(problem)),
            "{name:?}: no file-name error at {reference} mentioning {problem}: {errors}"
        );
    }
}

#[test]
fn bad_checksums_are_refused_naming_the_problem() {
    let path = "$.files[\"a.zip\"].checksums.sha256";
    for (digest, words) in [
        (&SHA_A[..63], &["64 hexadecimal digits", "has 63"][..]),
        (&format!("{SHA_A}0")[..], &["has 65"][..]),
        ("", &["has 0"][..]),
        (
            &format!("{}g", &SHA_A[..63])[..],
            &["'g'", "character 63"][..],
        ),
        (&format!(" {}", &SHA_A[..63])[..], &["character 0"][..]),
        (
            &format!("0x{}", &SHA_A[..62])[..],
            &["'x'", "character 1"][..],
        ),
    ] {
        let text = valid().replace(SHA_A, digest);
        assert_error(&refused(&text), path, words);
    }
    let text = valid().replace(&format!("\"{SHA_A}\""), "1234");
    assert_error(&refused(&text), path, &["expected a string", "number"]);
    let text = valid().replace(
        &format!("\"sha256\": \"{SHA_A}\""),
        &format!("\"md5\": \"{}\"", &SHA_A[..32]),
    );
    assert_error(&refused(&text), path, &["missing"]);
}

#[test]
fn oversize_documents_are_refused_for_their_size_alone() {
    for size in [MAX_MANIFEST_BYTES + 1, 10 * 1024 * 1024] {
        let mut bytes = valid().into_bytes();
        bytes.resize(size, b' ');
        let errors = parse_manifest(&bytes).expect_err("too big");
        assert_eq!(errors.len(), 1, "{errors}");
        assert_error(&errors, "$", &[&format!("{size} bytes"), "over the limit"]);
    }
}
