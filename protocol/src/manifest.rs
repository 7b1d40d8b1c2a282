//! The Distributor package manifest (schema 2.0): its data model, and the parser that turns
//! untrusted bytes into a validated [`Manifest`] or into *every* problem the bytes have, each
//! with a JSON path, the offending value and a plain message.
//!
//! The parser reads the bytes into a `serde_json::Value` first and walks it by hand rather than
//! deriving `Deserialize`, because serde stops at the first problem and an operator fixing a
//! manifest wants all of them at once. Unknown fields are ignored wherever they appear, as the
//! SSM Agent's `encoding/json` decoding ignores them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::names::{quote_for_message, validate_file_name, validate_version_name};

/// Largest manifest accepted, in bytes; larger input is refused before it is parsed.
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024;

/// Deepest nesting of arrays and objects accepted. A valid manifest nests six levels deep
/// (`$.packages[p][v][a].file`); the limit leaves room for unknown fields while refusing
/// hostile input long before serde_json's own recursion limit of 128 or the stack.
pub const MAX_NESTING_DEPTH: usize = 64;

/// Most errors reported for one manifest; beyond it a final entry says how many were left out,
/// so a hostile manifest cannot make a report of thousands of lines.
pub const MAX_REPORTED_ERRORS: usize = 100;

/// The only manifest schema Distributor (and so pkgmesh) reads.
pub const SCHEMA_VERSION: &str = "2.0";

/// Length of a SHA-256 digest written in hex.
pub const SHA256_HEX_CHARS: usize = 64;

/// Platform name → platform version key → architecture key → the file to install there: the
/// shape of [`Manifest::packages`].
pub type PackageTree = BTreeMap<String, BTreeMap<String, BTreeMap<String, FileRef>>>;

/// A validated Distributor manifest. Serialises to (and deserialises from) Distributor's JSON
/// shape with camelCase keys. Deserialising it directly skips validation: untrusted bytes go
/// through [`parse_manifest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always [`SCHEMA_VERSION`] once validated.
    pub schema_version: String,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publisher: Option<String>,
    /// Platform name → platform version key → architecture key → the file to install there.
    pub packages: BTreeMap<String, BTreeMap<String, BTreeMap<String, FileRef>>>,
    /// File name → its checksums.
    pub files: BTreeMap<String, FileEntry>,
}

/// Points from a platform/version/architecture triple to an entry of [`Manifest::files`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileRef {
    pub file: String,
}

/// One file (a ZIP) of the package version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub checksums: Checksums,
}

/// The checksums Distributor records for a file; pkgmesh needs only SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checksums {
    /// 64 lowercase hex characters once validated (the input may use either case).
    pub sha256: String,
}

impl Manifest {
    /// The SHA-256 digest recorded for `file`, or `None` when the manifest does not list it (or,
    /// for a manifest built without [`parse_manifest`], when its checksum is not valid hex).
    pub fn sha256_of(&self, file: &str) -> Option<[u8; 32]> {
        let entry = self.files.get(file)?;
        let mut digest = [0u8; 32];
        hex::decode_to_slice(&entry.checksums.sha256, &mut digest).ok()?;
        Some(digest)
    }

    /// Every `(platform, version key, architecture, file)` the manifest offers, flattened and
    /// sorted.
    pub fn platforms(&self) -> Vec<(String, String, String, String)> {
        // BTreeMap iteration is already ordered, so the flattened list comes out sorted.
        let mut flattened = Vec::new();
        for (platform, versions) in &self.packages {
            for (version, architectures) in versions {
                for (architecture, file_ref) in architectures {
                    flattened.push((
                        platform.clone(),
                        version.clone(),
                        architecture.clone(),
                        file_ref.file.clone(),
                    ));
                }
            }
        }
        flattened
    }

    /// The manifest in Distributor's JSON shape, pretty-printed.
    pub fn to_json_pretty(&self) -> String {
        // Serialising maps with string keys into a String has no failure path; the fallback only
        // keeps this function total.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// One problem with a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ManifestError {
    /// Where the problem is, as a JSON path such as `$.files["a.zip"].checksums.sha256`. Problems
    /// with the input as a whole (size, encoding, syntax) are at `$`.
    pub path: String,
    /// The offending value rendered as JSON (strings in double quotes) with control characters
    /// escaped and cut to about 80 characters; `None` when the value is missing or too big to
    /// show.
    pub value: Option<String>,
    /// What is wrong, in plain words.
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)?;
        if let Some(value) = &self.value {
            write!(f, " (got {value})")?;
        }
        Ok(())
    }
}

/// Every problem found in a manifest: the top-level fields in schema order, then references to
/// files that `files` does not list. Never empty when returned as an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ManifestErrors(pub Vec<ManifestError>);

impl ManifestErrors {
    /// The errors, in the order they were found.
    pub fn iter(&self) -> std::slice::Iter<'_, ManifestError> {
        self.0.iter()
    }

    /// Number of errors held.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when no error is held (never the case for an error returned by [`parse_manifest`]).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The errors whose path is exactly `path`.
    pub fn at<'a>(&'a self, path: &'a str) -> impl Iterator<Item = &'a ManifestError> + 'a {
        self.0.iter().filter(move |error| error.path == path)
    }

    fn single(path: &str, message: String) -> Self {
        ManifestErrors(vec![ManifestError {
            path: path.to_owned(),
            value: None,
            message,
        }])
    }
}

impl fmt::Display for ManifestErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, error) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ManifestErrors {}

impl<'a> IntoIterator for &'a ManifestErrors {
    type Item = &'a ManifestError;
    type IntoIter = std::slice::Iter<'a, ManifestError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// Parses and validates a schema 2.0 manifest from untrusted bytes.
///
/// Refuses input over [`MAX_MANIFEST_BYTES`] before looking at it; reports bad UTF-8 and bad
/// JSON as a single error with line and column; otherwise reports every rule the document
/// breaks. Never panics.
pub fn parse_manifest(bytes: &[u8]) -> Result<Manifest, ManifestErrors> {
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestErrors::single(
            ROOT,
            format!(
                "manifest is {} bytes, over the limit of {MAX_MANIFEST_BYTES} bytes (64 KiB)",
                bytes.len()
            ),
        ));
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(error) => {
            let (line, column) = line_and_column(bytes, error.valid_up_to());
            return Err(ManifestErrors::single(
                ROOT,
                format!(
                    "manifest is not valid UTF-8: bad byte at line {line}, column {column} \
                     (byte offset {})",
                    error.valid_up_to()
                ),
            ));
        }
    };
    // Editors on Windows like to start files with a byte-order mark, which JSON forbids but
    // which says nothing about the content; skipping it spares users a baffling syntax error.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    check_nesting_depth(text)?;
    let UniqueKeys(document) = serde_json::from_str(text).map_err(|error| {
        ManifestErrors::single(ROOT, format!("manifest is not valid JSON: {error}"))
    })?;
    ManifestWalker::default().walk(&document)
}

/// A JSON document in which no object repeats a key. serde_json (like Go's `encoding/json`)
/// silently keeps the last of two equal keys, so a manifest listing one file twice with two
/// checksums, or one platform twice, would mean one thing to a reader that keeps the first and
/// another here; a repeated key is refused instead, naming the key and where it is.
struct UniqueKeys(Value);

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(UniqueKeysVisitor)
            .map(UniqueKeys)
    }
}

struct UniqueKeysVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueKeysVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(UniqueKeys(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format!(
                    "key {} appears twice in one object",
                    quote_for_message(&key)
                )));
            }
            let UniqueKeys(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

const ROOT: &str = "$";

/// 1-based line and column (in characters) of byte `offset`, for messages about raw input.
fn line_and_column(bytes: &[u8], offset: usize) -> (usize, usize) {
    let before = &bytes[..offset.min(bytes.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |newline| newline + 1);
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, column)
}

/// Refuses documents nested deeper than [`MAX_NESTING_DEPTH`] with a clear message, before the
/// JSON parser recurses into them. Brackets inside strings do not count.
fn check_nesting_depth(text: &str) -> Result<(), ManifestErrors> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (offset, byte) in text.bytes().enumerate() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_NESTING_DEPTH {
                    let (line, column) = line_and_column(text.as_bytes(), offset);
                    return Err(ManifestErrors::single(
                        ROOT,
                        format!(
                            "manifest nests arrays and objects more than {MAX_NESTING_DEPTH} \
                             levels deep (at line {line}, column {column})"
                        ),
                    ));
                }
            }
            // Unbalanced closers are left for the JSON parser to report with its own position.
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// A JSON path under construction, e.g. `$.packages["amazon"]["2"]`.
#[derive(Clone)]
struct JsonPath(String);

impl JsonPath {
    fn root() -> Self {
        JsonPath(ROOT.to_owned())
    }

    /// A fixed field of the schema; its name is a plain identifier.
    fn field(&self, name: &str) -> Self {
        JsonPath(format!("{}.{name}", self.0))
    }

    /// A key chosen by the manifest's author, quoted and escaped because it may hold anything.
    fn key(&self, key: &str) -> Self {
        JsonPath(format!("{}[{}]", self.0, quote_for_message(key)))
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Longest rendering of a non-string value kept in an error, in characters.
const MAX_RENDERED_VALUE_CHARS: usize = 80;

/// The value as it should appear in an error: strings quoted and escaped, other values as
/// compact JSON, control characters escaped, everything cut to about 80 characters.
fn render_value(value: &Value) -> String {
    match value {
        Value::String(text) => quote_for_message(text),
        other => {
            let json = serde_json::to_string(other).unwrap_or_default();
            let mut rendered = String::new();
            for (index, c) in json.chars().enumerate() {
                if index == MAX_RENDERED_VALUE_CHARS {
                    rendered.push('…');
                    break;
                }
                if c.is_control() {
                    rendered.push_str(&format!("\\u{{{:04x}}}", u32::from(c)));
                } else {
                    rendered.push(c);
                }
            }
            rendered
        }
    }
}

#[derive(Default)]
struct FilesSection {
    names: BTreeSet<String>,
    entries: BTreeMap<String, FileEntry>,
}

/// A `file` named under `packages`, remembered until `files` has been read.
struct FileReference {
    path: JsonPath,
    file: String,
}

#[derive(Default)]
struct ManifestWalker {
    errors: Vec<ManifestError>,
    errors_left_out: usize,
}

impl ManifestWalker {
    fn report(&mut self, path: &JsonPath, value: Option<&Value>, message: impl Into<String>) {
        if self.errors.len() >= MAX_REPORTED_ERRORS {
            self.errors_left_out += 1;
            return;
        }
        self.errors.push(ManifestError {
            path: path.0.clone(),
            value: value.map(render_value),
            message: message.into(),
        });
    }

    fn report_missing(&mut self, path: &JsonPath, expected: &str) {
        self.report(
            path,
            None,
            format!("required field is missing (expected {expected})"),
        );
    }

    fn report_wrong_type(&mut self, path: &JsonPath, value: &Value, expected: &str) {
        self.report(
            path,
            Some(value),
            format!("expected {expected}, found {}", type_name(value)),
        );
    }

    /// The object at `path`, or `None` after reporting why it is not one.
    fn expect_object<'v>(
        &mut self,
        path: &JsonPath,
        value: &'v Value,
    ) -> Option<&'v Map<String, Value>> {
        match value {
            Value::Object(object) => Some(object),
            other => {
                self.report_wrong_type(path, other, "an object");
                None
            }
        }
    }

    /// The required string field `name` of `object`, or `None` after reporting its absence or
    /// wrong type.
    fn required_string<'v>(
        &mut self,
        object: &'v Map<String, Value>,
        parent: &JsonPath,
        name: &str,
    ) -> Option<(&'v str, &'v Value)> {
        let path = parent.field(name);
        match object.get(name) {
            None => {
                self.report_missing(&path, "a string");
                None
            }
            Some(value @ Value::String(text)) => Some((text.as_str(), value)),
            Some(other) => {
                self.report_wrong_type(&path, other, "a string");
                None
            }
        }
    }

    /// The required object field `name` of `object`, or `None` after reporting why not.
    fn required_object<'v>(
        &mut self,
        object: &'v Map<String, Value>,
        parent: &JsonPath,
        name: &str,
    ) -> Option<&'v Map<String, Value>> {
        let path = parent.field(name);
        match object.get(name) {
            None => {
                self.report_missing(&path, "an object");
                None
            }
            Some(value) => self.expect_object(&path, value),
        }
    }

    fn walk(mut self, document: &Value) -> Result<Manifest, ManifestErrors> {
        let root = JsonPath::root();
        let Some(top) = self.expect_object(&root, document) else {
            return Err(self.finish());
        };

        let schema_version = self.schema_version(top, &root);
        let version = self.version(top, &root);
        let publisher = self.publisher(top, &root);
        let mut references = Vec::new();
        let packages = self.packages(top, &root, &mut references);
        let files = self.files(top, &root);

        // Only check references against a `files` that was itself readable: when `files` is
        // missing every reference would fail too, and repeating that adds nothing.
        if let Some(files) = &files {
            for reference in &references {
                if !files.names.contains(&reference.file) {
                    self.report(
                        &reference.path,
                        Some(&Value::String(reference.file.clone())),
                        "names a file that is not listed under $.files",
                    );
                }
            }
        }

        match (schema_version, version, publisher, packages, files) {
            (Some(schema_version), Some(version), Some(publisher), Some(packages), Some(files))
                if self.errors.is_empty() =>
            {
                Ok(Manifest {
                    schema_version,
                    version,
                    publisher,
                    packages,
                    files: files.entries,
                })
            }
            _ => Err(self.finish()),
        }
    }

    fn finish(mut self) -> ManifestErrors {
        if self.errors_left_out > 0 {
            self.errors.push(ManifestError {
                path: ROOT.to_owned(),
                value: None,
                message: format!(
                    "{} more errors not shown (only the first {MAX_REPORTED_ERRORS} are reported)",
                    self.errors_left_out
                ),
            });
        }
        ManifestErrors(self.errors)
    }

    fn schema_version(&mut self, top: &Map<String, Value>, root: &JsonPath) -> Option<String> {
        let (text, value) = self.required_string(top, root, "schemaVersion")?;
        if text != SCHEMA_VERSION {
            self.report(
                &root.field("schemaVersion"),
                Some(value),
                format!("must be \"{SCHEMA_VERSION}\", the only manifest schema Distributor reads"),
            );
            return None;
        }
        Some(text.to_owned())
    }

    fn version(&mut self, top: &Map<String, Value>, root: &JsonPath) -> Option<String> {
        let (text, value) = self.required_string(top, root, "version")?;
        if let Err(error) = validate_version_name(text) {
            self.report(
                &root.field("version"),
                Some(value),
                format!("version name {}", error.problem()),
            );
            return None;
        }
        Some(text.to_owned())
    }

    /// `Some(None)` when there is no publisher, `None` when the field is unusable.
    fn publisher(&mut self, top: &Map<String, Value>, root: &JsonPath) -> Option<Option<String>> {
        match top.get("publisher") {
            // An explicit null reads as "no publisher", as Go's decoder in the agent reads it.
            None | Some(Value::Null) => Some(None),
            Some(Value::String(text)) => Some(Some(text.clone())),
            Some(other) => {
                self.report_wrong_type(&root.field("publisher"), other, "a string");
                None
            }
        }
    }

    /// A map level under `packages` must be an object with at least one entry; `what` names
    /// the entries for the message ("platform", "version", "architecture").
    fn nonempty_level<'v>(
        &mut self,
        path: &JsonPath,
        value: &'v Value,
        what: &str,
    ) -> Option<&'v Map<String, Value>> {
        let object = self.expect_object(path, value)?;
        if object.is_empty() {
            self.report(path, Some(value), format!("must name at least one {what}"));
            return None;
        }
        Some(object)
    }

    /// Keys under `packages` are matched against the instance's platform, so an empty one can
    /// never be meant.
    fn check_selector_key(&mut self, path: &JsonPath, key: &str, what: &str) -> bool {
        if key.is_empty() {
            self.report(path, None, format!("{what} key must not be empty"));
            return false;
        }
        true
    }

    /// The `packages` tree. Entries with problems are reported and left out; the caller builds
    /// no manifest once anything has been reported, so a partial tree never escapes.
    fn packages(
        &mut self,
        top: &Map<String, Value>,
        root: &JsonPath,
        references: &mut Vec<FileReference>,
    ) -> Option<PackageTree> {
        let packages_path = root.field("packages");
        let platforms = match top.get("packages") {
            None => {
                self.report_missing(&packages_path, "an object of platforms");
                return None;
            }
            Some(value) => self.nonempty_level(&packages_path, value, "platform")?,
        };

        let mut packages = BTreeMap::new();
        for (platform_key, platform_value) in platforms {
            let platform_path = packages_path.key(platform_key);
            self.check_selector_key(&platform_path, platform_key, "platform");
            let Some(versions) =
                self.nonempty_level(&platform_path, platform_value, "platform version")
            else {
                continue;
            };
            let mut version_map = BTreeMap::new();
            for (version_key, version_value) in versions {
                let version_path = platform_path.key(version_key);
                self.check_selector_key(&version_path, version_key, "platform version");
                let Some(architectures) =
                    self.nonempty_level(&version_path, version_value, "architecture")
                else {
                    continue;
                };
                let mut architecture_map = BTreeMap::new();
                for (architecture_key, architecture_value) in architectures {
                    let architecture_path = version_path.key(architecture_key);
                    self.check_selector_key(&architecture_path, architecture_key, "architecture");
                    if let Some(file_ref) =
                        self.file_ref(&architecture_path, architecture_value, references)
                    {
                        architecture_map.insert(architecture_key.clone(), file_ref);
                    }
                }
                version_map.insert(version_key.clone(), architecture_map);
            }
            packages.insert(platform_key.clone(), version_map);
        }
        Some(packages)
    }

    fn file_ref(
        &mut self,
        path: &JsonPath,
        value: &Value,
        references: &mut Vec<FileReference>,
    ) -> Option<FileRef> {
        let object = self.expect_object(path, value)?;
        let (file, file_value) = self.required_string(object, path, "file")?;
        let file_path = path.field("file");
        if let Err(error) = validate_file_name(file) {
            self.report(
                &file_path,
                Some(file_value),
                format!("file name {}", error.problem()),
            );
            return None;
        }
        references.push(FileReference {
            path: file_path,
            file: file.to_owned(),
        });
        Some(FileRef {
            file: file.to_owned(),
        })
    }

    /// The `files` section: every listed name (usable or not, so that a reference to a file
    /// whose entry is broken is not also reported as "not listed") and the usable entries.
    fn files(&mut self, top: &Map<String, Value>, root: &JsonPath) -> Option<FilesSection> {
        let files = self.required_object(top, root, "files")?;
        let files_path = root.field("files");
        let mut section = FilesSection::default();
        for (name, entry_value) in files {
            section.names.insert(name.clone());
            let entry_path = files_path.key(name);
            if let Err(error) = validate_file_name(name) {
                self.report(&entry_path, None, format!("file name {}", error.problem()));
            }
            if let Some(entry) = self.file_entry(&entry_path, entry_value) {
                section.entries.insert(name.clone(), entry);
            }
        }
        Some(section)
    }

    fn file_entry(&mut self, path: &JsonPath, value: &Value) -> Option<FileEntry> {
        let object = self.expect_object(path, value)?;
        let checksums = self.required_object(object, path, "checksums")?;
        let checksums_path = path.field("checksums");
        let (digest, digest_value) = self.required_string(checksums, &checksums_path, "sha256")?;
        let digest_path = checksums_path.field("sha256");
        if let Some(problem) = sha256_problem(digest) {
            self.report(&digest_path, Some(digest_value), problem);
            return None;
        }
        Some(FileEntry {
            checksums: Checksums {
                sha256: digest.to_ascii_lowercase(),
            },
        })
    }
}

/// What is wrong with a SHA-256 hex digest, or `None` when it is 64 hex digits of either case.
fn sha256_problem(digest: &str) -> Option<String> {
    if let Some((position, character)) = digest
        .chars()
        .enumerate()
        .find(|(_, c)| !c.is_ascii_hexdigit())
    {
        return Some(format!(
            "a SHA-256 digest is {SHA256_HEX_CHARS} hexadecimal digits, but this contains {} \
             at character {position}",
            crate::names::describe_char(character)
        ));
    }
    if digest.len() != SHA256_HEX_CHARS {
        return Some(format!(
            "a SHA-256 digest is {SHA256_HEX_CHARS} hexadecimal digits, but this has {}",
            digest.len()
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA_A: &str = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";
    const SHA_B: &str = "fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9";

    fn valid_json() -> String {
        format!(
            r#"{{
  "schemaVersion": "2.0",
  "version": "1.2.3",
  "publisher": "Example Corp",
  "packages": {{
    "amazon": {{
      "2": {{ "x86_64": {{ "file": "amazon-2.zip" }}, "arm64": {{ "file": "amazon-2.zip" }} }},
      "2023": {{ "x86_64": {{ "file": "amazon-2023.zip" }} }}
    }},
    "windows": {{ "_any": {{ "_any": {{ "file": "windows.zip" }} }} }}
  }},
  "files": {{
    "amazon-2.zip": {{ "checksums": {{ "sha256": "{SHA_A}" }} }},
    "amazon-2023.zip": {{ "checksums": {{ "sha256": "{SHA_B}" }} }},
    "windows.zip": {{ "checksums": {{ "sha256": "{SHA_A}" }} }}
  }}
}}"#
        )
    }

    /// The valid manifest with `edit` applied to its JSON value.
    fn edited(edit: impl FnOnce(&mut Value)) -> Vec<u8> {
        let mut document: Value = serde_json::from_str(&valid_json()).unwrap();
        edit(&mut document);
        serde_json::to_vec(&document).unwrap()
    }

    fn errors_of(bytes: &[u8]) -> ManifestErrors {
        match parse_manifest(bytes) {
            Ok(manifest) => panic!("expected errors, parsed {manifest:?}"),
            Err(errors) => {
                assert!(!errors.is_empty());
                errors
            }
        }
    }

    #[test]
    fn parses_a_valid_manifest() {
        let manifest = parse_manifest(valid_json().as_bytes()).unwrap();
        assert_eq!(manifest.schema_version, "2.0");
        assert_eq!(manifest.version, "1.2.3");
        assert_eq!(manifest.publisher.as_deref(), Some("Example Corp"));
        assert_eq!(manifest.packages.len(), 2);
        assert_eq!(manifest.files.len(), 3);
        assert_eq!(
            manifest.platforms(),
            vec![
                (
                    "amazon".into(),
                    "2".into(),
                    "arm64".into(),
                    "amazon-2.zip".into()
                ),
                (
                    "amazon".into(),
                    "2".into(),
                    "x86_64".into(),
                    "amazon-2.zip".into()
                ),
                (
                    "amazon".into(),
                    "2023".into(),
                    "x86_64".into(),
                    "amazon-2023.zip".into()
                ),
                (
                    "windows".into(),
                    "_any".into(),
                    "_any".into(),
                    "windows.zip".into()
                ),
            ]
        );
        let digest = manifest.sha256_of("amazon-2023.zip").unwrap();
        assert_eq!(hex::encode(digest), SHA_B);
        assert_eq!(manifest.sha256_of("nope.zip"), None);
    }

    #[test]
    fn publisher_is_optional_and_null_means_absent() {
        let without = edited(|d| {
            d.as_object_mut().unwrap().remove("publisher");
        });
        assert_eq!(parse_manifest(&without).unwrap().publisher, None);
        let null = edited(|d| d["publisher"] = Value::Null);
        assert_eq!(parse_manifest(&null).unwrap().publisher, None);
    }

    #[test]
    fn unknown_fields_are_ignored_everywhere() {
        let bytes = edited(|d| {
            d["packageArn"] = "arn:aws:ssm:::package/x".into();
            d["packages"]["amazon"]["2"]["x86_64"]["extra"] = 1.into();
            d["files"]["windows.zip"]["size"] = 1234.into();
            d["files"]["windows.zip"]["downloadLocation"] = "s3://bucket/windows.zip".into();
            d["files"]["windows.zip"]["checksums"]["md5"] = "not checked".into();
            d["nested"] = serde_json::json!({"a": [[[{"b": null}]]]});
        });
        let with_extras = parse_manifest(&bytes).unwrap();
        assert_eq!(
            with_extras,
            parse_manifest(valid_json().as_bytes()).unwrap()
        );
    }

    #[test]
    fn checksums_are_normalised_to_lowercase() {
        let upper = SHA_A.to_ascii_uppercase();
        let mixed: String = SHA_B
            .chars()
            .enumerate()
            .map(|(i, c)| {
                if i % 2 == 0 {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect();
        let bytes = edited(|d| {
            d["files"]["amazon-2.zip"]["checksums"]["sha256"] = upper.clone().into();
            d["files"]["amazon-2023.zip"]["checksums"]["sha256"] = mixed.clone().into();
        });
        let manifest = parse_manifest(&bytes).unwrap();
        assert_eq!(manifest.files["amazon-2.zip"].checksums.sha256, SHA_A);
        assert_eq!(manifest.files["amazon-2023.zip"].checksums.sha256, SHA_B);
        assert!(!manifest.to_json_pretty().contains(&upper));
    }

    #[test]
    fn to_json_pretty_uses_distributors_shape_and_round_trips() {
        let manifest = parse_manifest(valid_json().as_bytes()).unwrap();
        let json = manifest.to_json_pretty();
        for key in [
            "\"schemaVersion\"",
            "\"version\"",
            "\"publisher\"",
            "\"packages\"",
            "\"files\"",
            "\"checksums\"",
            "\"sha256\"",
            "\"file\"",
        ] {
            assert!(json.contains(key), "{key} missing from {json}");
        }
        assert!(!json.contains("schema_version"));
        assert_eq!(parse_manifest(json.as_bytes()).unwrap(), manifest);
        let without_publisher = Manifest {
            publisher: None,
            ..manifest
        };
        assert!(!without_publisher.to_json_pretty().contains("publisher"));
    }

    #[test]
    fn a_byte_order_mark_is_skipped() {
        let mut bytes = "\u{feff}".as_bytes().to_vec();
        bytes.extend_from_slice(valid_json().as_bytes());
        parse_manifest(&bytes).unwrap();
    }

    /// Malformed manifests: each must be refused with an error at the given JSON path whose
    /// message contains the given words (and, where given, showing the offending value).
    #[test]
    fn malformed_manifests_name_the_field() {
        type Edit = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(&str, Edit, &str, &str, Option<&str>)> = vec![
            (
                "schemaVersion not 2.0",
                Box::new(|d| d["schemaVersion"] = "1.2".into()),
                "$.schemaVersion",
                "must be \"2.0\"",
                Some("\"1.2\""),
            ),
            (
                "schemaVersion a number",
                Box::new(|d| d["schemaVersion"] = serde_json::json!(2.0)),
                "$.schemaVersion",
                "expected a string, found a number",
                Some("2.0"),
            ),
            (
                "schemaVersion missing",
                Box::new(|d| {
                    d.as_object_mut().unwrap().remove("schemaVersion");
                }),
                "$.schemaVersion",
                "required field is missing",
                None,
            ),
            (
                "version missing",
                Box::new(|d| {
                    d.as_object_mut().unwrap().remove("version");
                }),
                "$.version",
                "required field is missing",
                None,
            ),
            (
                "version with a space",
                Box::new(|d| d["version"] = "1.0 beta".into()),
                "$.version",
                "contains a space",
                Some("\"1.0 beta\""),
            ),
            (
                "version too long",
                Box::new(|d| d["version"] = "1".repeat(129).into()),
                "$.version",
                "129 characters long",
                None,
            ),
            (
                "version empty",
                Box::new(|d| d["version"] = "".into()),
                "$.version",
                "0 characters long",
                Some("\"\""),
            ),
            (
                "version null",
                Box::new(|d| d["version"] = Value::Null),
                "$.version",
                "expected a string, found null",
                Some("null"),
            ),
            (
                "publisher a number",
                Box::new(|d| d["publisher"] = 42.into()),
                "$.publisher",
                "expected a string, found a number",
                Some("42"),
            ),
            (
                "packages missing",
                Box::new(|d| {
                    d.as_object_mut().unwrap().remove("packages");
                }),
                "$.packages",
                "required field is missing",
                None,
            ),
            (
                "packages empty",
                Box::new(|d| d["packages"] = serde_json::json!({})),
                "$.packages",
                "at least one platform",
                Some("{}"),
            ),
            (
                "packages an array",
                Box::new(|d| d["packages"] = serde_json::json!(["amazon"])),
                "$.packages",
                "expected an object, found an array",
                Some("[\"amazon\"]"),
            ),
            (
                "platform with no versions",
                Box::new(|d| d["packages"]["amazon"] = serde_json::json!({})),
                "$.packages[\"amazon\"]",
                "at least one platform version",
                None,
            ),
            (
                "platform version with no architectures",
                Box::new(|d| d["packages"]["amazon"]["2"] = serde_json::json!({})),
                "$.packages[\"amazon\"][\"2\"]",
                "at least one architecture",
                None,
            ),
            (
                "architecture entry a string",
                Box::new(|d| d["packages"]["amazon"]["2"]["x86_64"] = "amazon-2.zip".into()),
                "$.packages[\"amazon\"][\"2\"][\"x86_64\"]",
                "expected an object, found a string",
                Some("\"amazon-2.zip\""),
            ),
            (
                "architecture entry without file",
                Box::new(|d| d["packages"]["amazon"]["2"]["x86_64"] = serde_json::json!({})),
                "$.packages[\"amazon\"][\"2\"][\"x86_64\"].file",
                "required field is missing",
                None,
            ),
            (
                "file not a string",
                Box::new(|d| d["packages"]["amazon"]["2"]["x86_64"]["file"] = true.into()),
                "$.packages[\"amazon\"][\"2\"][\"x86_64\"].file",
                "expected a string, found a boolean",
                Some("true"),
            ),
            (
                "file not listed under files",
                Box::new(|d| d["packages"]["amazon"]["2023"]["x86_64"]["file"] = "gone.zip".into()),
                "$.packages[\"amazon\"][\"2023\"][\"x86_64\"].file",
                "not listed under $.files",
                Some("\"gone.zip\""),
            ),
            (
                "file reference escaping its directory",
                Box::new(|d| {
                    d["packages"]["amazon"]["2023"]["x86_64"]["file"] = "../../etc/passwd".into()
                }),
                "$.packages[\"amazon\"][\"2023\"][\"x86_64\"].file",
                "contains '/'",
                Some("\"../../etc/passwd\""),
            ),
            (
                "empty platform key",
                Box::new(|d| {
                    d["packages"][""] =
                        serde_json::json!({"1": {"x86_64": {"file": "windows.zip"}}})
                }),
                "$.packages[\"\"]",
                "platform key must not be empty",
                None,
            ),
            (
                "files missing",
                Box::new(|d| {
                    d.as_object_mut().unwrap().remove("files");
                }),
                "$.files",
                "required field is missing",
                None,
            ),
            (
                "files an array",
                Box::new(|d| d["files"] = serde_json::json!([])),
                "$.files",
                "expected an object, found an array",
                Some("[]"),
            ),
            (
                "file entry without checksums",
                Box::new(|d| d["files"]["windows.zip"] = serde_json::json!({"size": 1})),
                "$.files[\"windows.zip\"].checksums",
                "required field is missing",
                None,
            ),
            (
                "checksums without sha256",
                Box::new(|d| {
                    d["files"]["windows.zip"]["checksums"] = serde_json::json!({"md5": "x"})
                }),
                "$.files[\"windows.zip\"].checksums.sha256",
                "required field is missing",
                None,
            ),
            (
                "sha256 one digit short",
                Box::new(|d| d["files"]["windows.zip"]["checksums"]["sha256"] = SHA_A[1..].into()),
                "$.files[\"windows.zip\"].checksums.sha256",
                "this has 63",
                None,
            ),
            (
                "sha256 one digit long",
                Box::new(|d| {
                    d["files"]["windows.zip"]["checksums"]["sha256"] = format!("{SHA_A}0").into()
                }),
                "$.files[\"windows.zip\"].checksums.sha256",
                "this has 65",
                None,
            ),
            (
                "sha256 not hex",
                Box::new(|d| {
                    d["files"]["windows.zip"]["checksums"]["sha256"] =
                        format!("g{}", &SHA_A[1..]).into()
                }),
                "$.files[\"windows.zip\"].checksums.sha256",
                "contains 'g' at character 0",
                None,
            ),
            (
                "sha256 a number",
                Box::new(|d| d["files"]["windows.zip"]["checksums"]["sha256"] = 12345.into()),
                "$.files[\"windows.zip\"].checksums.sha256",
                "expected a string, found a number",
                Some("12345"),
            ),
            (
                "file name with a slash",
                Box::new(|d| {
                    d["files"]["dir/evil.zip"] = serde_json::json!({"checksums": {"sha256": SHA_A}})
                }),
                "$.files[\"dir/evil.zip\"]",
                "contains '/'",
                None,
            ),
            (
                "root an array",
                Box::new(|d| *d = serde_json::json!([1, 2])),
                "$",
                "expected an object, found an array",
                Some("[1,2]"),
            ),
        ];
        assert!(cases.len() >= 12);
        for (name, edit, path, words, value) in cases {
            let errors = errors_of(&edited(edit));
            let matching: Vec<_> = errors.at(path).collect();
            assert!(
                !matching.is_empty(),
                "{name}: no error at {path}; got:\n{errors}"
            );
            assert!(
                matching.iter().any(|e| e.message.contains(words)),
                "{name}: no error at {path} says {words:?}; got:\n{errors}"
            );
            if let Some(value) = value {
                assert!(
                    matching.iter().any(|e| e.value.as_deref() == Some(value)),
                    "{name}: no error at {path} shows value {value}; got:\n{errors}"
                );
            }
            let display = errors.to_string();
            assert!(display.contains(&format!("{path}: ")), "{name}: {display}");
        }
    }

    #[test]
    fn every_error_of_a_manifest_is_reported_together() {
        let bytes = edited(|d| {
            d["schemaVersion"] = "3.0".into();
            d["version"] = "v 1".into();
            d["publisher"] = serde_json::json!(["x"]);
            d["packages"]["amazon"]["2"]["x86_64"]["file"] = "missing.zip".into();
            d["packages"]["windows"] = serde_json::json!({});
            d["files"]["windows.zip"]["checksums"]["sha256"] = "abc".into();
            d["files"]["amazon-2023.zip"] = Value::Null;
        });
        let errors = errors_of(&bytes);
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        for expected in [
            "$.schemaVersion",
            "$.version",
            "$.publisher",
            "$.packages[\"amazon\"][\"2\"][\"x86_64\"].file",
            "$.packages[\"windows\"]",
            "$.files[\"windows.zip\"].checksums.sha256",
            "$.files[\"amazon-2023.zip\"]",
        ] {
            assert!(paths.contains(&expected), "{expected} not in {paths:#?}");
        }
        assert_eq!(errors.len(), 7, "{errors}");
        // One line per error, "PATH: MESSAGE (got VALUE)".
        let display = errors.to_string();
        assert_eq!(display.lines().count(), 7);
        assert!(
            display.contains("$.schemaVersion: must be \"2.0\", the only manifest schema Distributor reads (got \"3.0\")"),
            "{display}"
        );
    }

    #[test]
    fn a_reference_to_a_listed_but_broken_file_is_not_reported_twice() {
        let bytes = edited(|d| d["files"]["amazon-2023.zip"]["checksums"]["sha256"] = "zz".into());
        let errors = errors_of(&bytes);
        assert_eq!(errors.len(), 1, "{errors}");
        assert_eq!(
            errors.0[0].path,
            "$.files[\"amazon-2023.zip\"].checksums.sha256"
        );
    }

    #[test]
    fn oversized_input_is_refused_before_parsing() {
        let mut bytes = valid_json().into_bytes();
        bytes.resize(MAX_MANIFEST_BYTES + 1, b' ');
        let errors = errors_of(&bytes);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors.0[0].path, "$");
        assert!(errors.0[0].message.contains("65537 bytes"), "{errors}");
        assert!(errors.0[0].message.contains("65536"), "{errors}");
        // Exactly at the limit is fine (trailing whitespace is valid JSON).
        bytes.truncate(MAX_MANIFEST_BYTES);
        parse_manifest(&bytes).unwrap();
        // Garbage over the limit is refused for its size, not its syntax.
        let errors = errors_of(&vec![0xff; MAX_MANIFEST_BYTES + 1]);
        assert!(errors.0[0].message.contains("over the limit"), "{errors}");
    }

    #[test]
    fn invalid_utf8_gives_one_error_with_line_and_column() {
        let mut bytes = b"{\n  \"schemaVersion\": \"2.0\",\n  \"version\": \"1".to_vec();
        bytes.push(0xc3); // a lone lead byte
        bytes.extend_from_slice(b"\"\n}");
        let errors = errors_of(&bytes);
        assert_eq!(errors.len(), 1, "{errors}");
        assert_eq!(errors.0[0].path, "$");
        assert!(errors.0[0].message.contains("not valid UTF-8"), "{errors}");
        assert!(
            errors.0[0].message.contains("line 3, column 16"),
            "{errors}"
        );
    }

    #[test]
    fn invalid_json_gives_one_error_with_line_and_column() {
        let errors = errors_of(b"{\n  \"schemaVersion\": \"2.0\"\n  \"version\": \"1\"\n}");
        assert_eq!(errors.len(), 1, "{errors}");
        assert_eq!(errors.0[0].path, "$");
        assert!(errors.0[0].message.contains("not valid JSON"), "{errors}");
        assert!(errors.0[0].message.contains("line 3 column 3"), "{errors}");
        for garbage in [
            &b""[..],
            b"   ",
            b"{",
            b"}",
            b"nul",
            b"{\"a\":}",
            b"[1,]",
            b"\"x\"x",
        ] {
            let errors = errors_of(garbage);
            assert_eq!(errors.len(), 1, "{garbage:?}: {errors}");
        }
    }

    #[test]
    fn a_scalar_document_is_refused_at_the_root() {
        for document in [&b"42"[..], b"\"2.0\"", b"null", b"true"] {
            let errors = errors_of(document);
            assert_eq!(errors.0[0].path, "$");
            assert!(
                errors.0[0].message.starts_with("expected an object"),
                "{errors}"
            );
        }
    }

    #[test]
    fn deep_nesting_is_refused_with_a_clear_message() {
        let depth = MAX_NESTING_DEPTH + 1;
        let hostile = format!("{{\"x\":{}{}}}", "[".repeat(depth), "]".repeat(depth));
        let errors = errors_of(hostile.as_bytes());
        assert_eq!(errors.len(), 1);
        assert!(errors.0[0].message.contains("levels deep"), "{errors}");
        // Brackets inside strings are not nesting.
        let bytes = edited(|d| d["note"] = "[".repeat(10_000).into());
        parse_manifest(&bytes).unwrap();
        // Nesting within the limit inside an unknown field is fine.
        let inner = MAX_NESTING_DEPTH - 2;
        let bytes = edited(|d| {
            let mut nested = Value::Null;
            for _ in 0..inner {
                nested = Value::Array(vec![nested]);
            }
            d["deep"] = nested;
        });
        parse_manifest(&bytes).unwrap();
        // A whole 64 KiB of openers is refused quickly and without overflowing the stack.
        let errors = errors_of("[".repeat(MAX_MANIFEST_BYTES).as_bytes());
        assert!(errors.0[0].message.contains("levels deep"), "{errors}");
    }

    #[test]
    fn hostile_values_are_escaped_and_truncated_in_errors() {
        let hostile = format!("\u{1b}]0;pwned\u{7}{}", "A".repeat(10_000));
        let bytes = edited(|d| {
            d["version"] = hostile.clone().into();
            d["files"][hostile.as_str()] = serde_json::json!({"checksums": {"sha256": SHA_A}});
        });
        let errors = errors_of(&bytes);
        let display = errors.to_string();
        assert!(!display.contains('\u{1b}'), "{display}");
        assert!(!display.contains('\u{7}'), "{display}");
        for error in &errors {
            assert!(error.path.chars().count() < 120, "{}", error.path);
            if let Some(value) = &error.value {
                assert!(value.chars().count() <= 120, "{value}");
            }
        }
    }

    #[test]
    fn error_count_is_capped() {
        let bytes = edited(|d| {
            for i in 0..300 {
                d["files"][format!("f{i}.zip")] = serde_json::json!({"checksums": {"sha256": "x"}});
            }
        });
        let errors = errors_of(&bytes);
        assert_eq!(errors.len(), MAX_REPORTED_ERRORS + 1);
        let last = errors.0.last().unwrap();
        assert!(last.message.contains("200 more errors not shown"), "{last}");
    }

    #[test]
    fn manifest_errors_serialise_for_json_output() {
        let errors = errors_of(&edited(|d| d["version"] = "a b".into()));
        let json = serde_json::to_value(&errors).unwrap();
        assert_eq!(json[0]["path"], "$.version");
        assert_eq!(json[0]["value"], "\"a b\"");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = parse_manifest(&bytes);
        }

        #[test]
        fn json_shaped_noise_never_panics(text in "[\\[\\]{}\":,a-z0-9._\\- ]{0,300}") {
            if let Err(errors) = parse_manifest(text.as_bytes()) {
                proptest::prop_assert!(!errors.is_empty());
            }
        }

        #[test]
        fn generated_manifests_round_trip(
            version in "[a-zA-Z0-9_.-]{1,20}",
            entries in proptest::collection::btree_map(
                ("[a-z_]{1,8}", "[0-9.*_]{1,6}", "[a-z0-9_]{1,8}"),
                "[a-z]{1,6}\\.zip",
                1..8,
            ),
            upper in proptest::bool::ANY,
        ) {
            let mut packages = serde_json::Map::new();
            let mut files = serde_json::Map::new();
            for ((platform, platform_version, arch), file) in &entries {
                let digest = if upper { SHA_A.to_ascii_uppercase() } else { SHA_A.to_owned() };
                files.insert(file.clone(), serde_json::json!({"checksums": {"sha256": digest}}));
                let versions = packages
                    .entry(platform.clone())
                    .or_insert_with(|| serde_json::json!({}));
                let architectures = versions
                    .as_object_mut()
                    .unwrap()
                    .entry(platform_version.clone())
                    .or_insert_with(|| serde_json::json!({}));
                architectures[arch.as_str()] = serde_json::json!({"file": file});
            }
            let document = serde_json::json!({
                "schemaVersion": "2.0",
                "version": version,
                "packages": packages,
                "files": files,
            });
            let manifest = parse_manifest(document.to_string().as_bytes()).unwrap();
            let again = parse_manifest(manifest.to_json_pretty().as_bytes()).unwrap();
            proptest::prop_assert_eq!(&again, &manifest);
            proptest::prop_assert_eq!(manifest.platforms().len(), entries.len());
            for (_, _, _, file) in manifest.platforms() {
                proptest::prop_assert_eq!(manifest.sha256_of(&file).map(hex::encode), Some(SHA_A.to_owned()));
            }
        }
    }
}
