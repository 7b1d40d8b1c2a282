//! Choosing the file of a manifest for one instance's platform, exactly as the SSM Agent does
//! (`agent/plugins/configurepackage/birdwatcher/birdwatcherservice/birdwatcherservice.go`,
//! `extractPackageInfo` and the three `matchPackageSelector*` functions).
//!
//! Three levels, each chosen once and never revisited (no backtracking):
//!
//! 1. platform: the exact key, else `_any`;
//! 2. platform version: the exact key, else the longest wildcard key `A.*`, `A.B.*`, ... whose
//!    components equal the instance version's leading components, else `_any`, else `*`;
//! 3. architecture: the exact key, else `_any`.
//!
//! Facts taken from the agent that a reader might not expect:
//!
//! - Every comparison is case-sensitive (Go map lookups and `==`): `Amazon` is not `amazon`.
//! - Wildcard components are compared whole, as strings: `7.*` matches `7.9` and `7.10` but not
//!   `77.1`, and `7.09` is not `7.9`.
//! - A wildcard key matches a version with exactly as many components as its prefix: `7.*`
//!   matches `7`, and `7.9.*` matches `7.9`. A key with more prefix components than the version
//!   has never matches (`7.9.*` does not match `7`).
//! - Windows Nano versions end in `nano` (`10.0.14393nano`). For wildcard matching a nano
//!   version only considers keys ending in `nano` (with the `nano` removed from the key before
//!   matching, so `10.*nano` matches `10.0.14393nano`), and a non-nano version skips them. An
//!   exact key, `_any` and `*` are not subject to this rule: `_any` matches a nano version.
//! - The agent then looks the chosen file up in `files` and fails if it is missing; here that is
//!   [`SelectLevel::File`] (unreachable for a manifest from [`crate::manifest::parse_manifest`],
//!   which refuses dangling references).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::manifest::Manifest;
use crate::names::quote_for_message;

/// The key that matches any platform, platform version or architecture.
pub const ANY_KEY: &str = "_any";
/// The platform-version key of last resort, consulted after [`ANY_KEY`].
pub const STAR_KEY: &str = "*";
/// The suffix that makes a platform-version key a prefix wildcard.
pub const WILDCARD_SUFFIX: &str = ".*";
/// The suffix the agent appends to Windows Nano Server versions.
pub const NANO_SUFFIX: &str = "nano";

/// Most manifest entries listed in a [`SelectError`] message; the rest are counted.
const MAX_OFFERED_IN_MESSAGE: usize = 40;

/// The platform an instance presents for selection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Platform {
    /// e.g. `amazon`, `ubuntu`, `redhat`, `windows`.
    pub name: String,
    /// e.g. `2023`, `22.04`, `10.0.14393nano`; may be empty when the OS does not say.
    pub version: String,
    /// e.g. `x86_64`, `arm64`, `386`.
    pub arch: String,
}

impl Platform {
    pub fn new(
        name: impl Into<String>,
        version: impl Into<String>,
        arch: impl Into<String>,
    ) -> Self {
        Platform {
            name: name.into(),
            version: version.into(),
            arch: arch.into(),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "platform {} version {} architecture {}",
            quote_for_message(&self.name),
            quote_for_message(&self.version),
            quote_for_message(&self.arch)
        )
    }
}

/// The keys chosen at each level and the file they lead to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Selection {
    pub platform_key: String,
    pub version_key: String,
    pub arch_key: String,
    pub file: String,
}

/// The level at which selection failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectLevel {
    /// Neither the platform name nor `_any` is a key of `packages`.
    Platform,
    /// The chosen platform has no version key that matches.
    Version,
    /// The chosen platform version has neither the architecture nor `_any`.
    Architecture,
    /// The chosen entry names a file that `files` does not list.
    File,
}

impl fmt::Display for SelectLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SelectLevel::Platform => "platform",
            SelectLevel::Version => "platform version",
            SelectLevel::Architecture => "architecture",
            SelectLevel::File => "file",
        })
    }
}

/// Why no file of a manifest fits a platform. `Display` names the platform, version and
/// architecture looked for, the level that failed (and the keys chosen above it), and what the
/// manifest offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SelectError {
    /// What was looked for.
    pub wanted: Platform,
    /// Where it failed.
    pub level: SelectLevel,
    /// The platform key chosen, when the failure is below the platform level.
    pub platform_key: Option<String>,
    /// The version key chosen, when the failure is below the version level.
    pub version_key: Option<String>,
    /// The architecture key chosen, when the failure is at the file level.
    pub arch_key: Option<String>,
    /// The file named by the chosen entry, when the failure is at the file level.
    pub file: Option<String>,
    /// Every `(platform, version key, architecture)` the manifest offers, sorted.
    pub offered: Vec<(String, String, String)>,
}

impl fmt::Display for SelectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let q = |text: &str| quote_for_message(text);
        let or_blank = |key: &Option<String>| key.as_deref().map(q).unwrap_or_default();
        write!(f, "no package file for {}: ", self.wanted)?;
        match self.level {
            SelectLevel::Platform => write!(
                f,
                "the manifest has no platform {} and no {ANY_KEY:?} platform",
                q(&self.wanted.name)
            )?,
            SelectLevel::Version => write!(
                f,
                "platform key {} was chosen, and none of its version keys matches {} \
                 (tried the exact key, \"N.*\" prefixes, {ANY_KEY:?} and {STAR_KEY:?}; \
                 selection does not go back to try another platform key)",
                or_blank(&self.platform_key),
                q(&self.wanted.version)
            )?,
            SelectLevel::Architecture => write!(
                f,
                "platform key {} and version key {} were chosen, and neither architecture {} \
                 nor {ANY_KEY:?} is listed under them (selection does not go back to try \
                 another key)",
                or_blank(&self.platform_key),
                or_blank(&self.version_key),
                q(&self.wanted.arch)
            )?,
            SelectLevel::File => write!(
                f,
                "packages[{}][{}][{}] names file {}, which the manifest's files do not list",
                or_blank(&self.platform_key),
                or_blank(&self.version_key),
                or_blank(&self.arch_key),
                or_blank(&self.file)
            )?,
        }
        if self.offered.is_empty() {
            return f.write_str("; the manifest offers nothing");
        }
        f.write_str("; the manifest offers ")?;
        for (index, (platform, version, arch)) in
            self.offered.iter().take(MAX_OFFERED_IN_MESSAGE).enumerate()
        {
            if index > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}/{}/{}", q(platform), q(version), q(arch))?;
        }
        if self.offered.len() > MAX_OFFERED_IN_MESSAGE {
            write!(
                f,
                " and {} more",
                self.offered.len() - MAX_OFFERED_IN_MESSAGE
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for SelectError {}

/// Chooses the file of `manifest` for `platform` with the SSM Agent's rules (see the module
/// documentation).
// The error is large (it carries what was wanted and what is offered so it can explain itself),
// but it is built once per failed selection, never in a loop, and callers rely on this exact
// signature, so boxing it would cost clarity for no measurable gain.
#[allow(clippy::result_large_err)]
pub fn select(manifest: &Manifest, platform: &Platform) -> Result<Selection, SelectError> {
    let fail = |level, platform_key: Option<&str>, version_key: Option<&str>| SelectError {
        wanted: platform.clone(),
        level,
        platform_key: platform_key.map(str::to_owned),
        version_key: version_key.map(str::to_owned),
        arch_key: None,
        file: None,
        offered: offered_triples(manifest),
    };

    let Some((platform_key, versions)) = exact_or_any(&manifest.packages, &platform.name) else {
        return Err(fail(SelectLevel::Platform, None, None));
    };
    let Some(version_key) = match_version_key(&platform.version, versions.keys()) else {
        return Err(fail(SelectLevel::Version, Some(platform_key), None));
    };
    let Some(architectures) = versions.get(version_key) else {
        // match_version_key only returns keys it was given, so this cannot happen; failing
        // at the version level keeps the function total all the same.
        return Err(fail(SelectLevel::Version, Some(platform_key), None));
    };
    let Some((arch_key, file_ref)) = exact_or_any(architectures, &platform.arch) else {
        return Err(fail(
            SelectLevel::Architecture,
            Some(platform_key),
            Some(version_key),
        ));
    };
    if !manifest.files.contains_key(&file_ref.file) {
        return Err(SelectError {
            arch_key: Some(arch_key.to_owned()),
            file: Some(file_ref.file.clone()),
            ..fail(SelectLevel::File, Some(platform_key), Some(version_key))
        });
    }
    Ok(Selection {
        platform_key: platform_key.to_owned(),
        version_key: version_key.to_owned(),
        arch_key: arch_key.to_owned(),
        file: file_ref.file.clone(),
    })
}

/// The platform and architecture rule: the exact key, else `_any`.
fn exact_or_any<'m, V>(map: &'m BTreeMap<String, V>, wanted: &str) -> Option<(&'m str, &'m V)> {
    map.get_key_value(wanted)
        .or_else(|| map.get_key_value(ANY_KEY))
        .map(|(key, value)| (key.as_str(), value))
}

/// The platform-version rule: among `keys`, the one the SSM Agent would choose for `version`.
///
/// In order: the exact key; else the wildcard key (`A.*`, `A.B.*`, ...) with the most prefix
/// components that all equal the version's leading components, never more components than the
/// version has, with Windows Nano keys and versions only matching each other; else `_any`;
/// else `*`.
pub fn match_version_key<'k, I, K>(version: &str, keys: I) -> Option<&'k str>
where
    I: IntoIterator<Item = &'k K>,
    K: AsRef<str> + ?Sized + 'k,
{
    let mut best_wildcard: Option<(usize, &'k str)> = None;
    let mut any_key = None;
    let mut star_key = None;
    for key in keys {
        let key = key.as_ref();
        if key == version {
            return Some(key);
        }
        if key == ANY_KEY {
            any_key = Some(key);
        } else if key == STAR_KEY {
            star_key = Some(key);
        }
        if let Some(components) = wildcard_match_components(key, version) {
            // Strictly longer wins; two distinct keys cannot match with the same number of
            // components (their prefixes would be equal), so iteration order never decides.
            if best_wildcard.is_none_or(|(best, _)| components > best) {
                best_wildcard = Some((components, key));
            }
        }
    }
    best_wildcard.map(|(_, key)| key).or(any_key).or(star_key)
}

/// How many leading components of `version` the wildcard `key` matches, or `None` when `key`
/// is not a wildcard or does not match.
fn wildcard_match_components(key: &str, version: &str) -> Option<usize> {
    let version_is_nano = version.ends_with(NANO_SUFFIX);
    let key = match (version_is_nano, key.strip_suffix(NANO_SUFFIX)) {
        (true, Some(without_nano)) => without_nano,
        (false, None) => key,
        // A nano version never takes a non-nano wildcard, and the other way round.
        _ => return None,
    };
    let prefix = key.strip_suffix(WILDCARD_SUFFIX)?;
    // As in the agent, the version keeps its `nano` suffix here: it stays on the last
    // component, which a prefix shorter than the version never compares.
    let mut version_components = version.split('.');
    let mut matched = 0;
    for prefix_component in prefix.split('.') {
        if version_components.next() != Some(prefix_component) {
            return None;
        }
        matched += 1;
    }
    Some(matched)
}

fn offered_triples(manifest: &Manifest) -> Vec<(String, String, String)> {
    manifest
        .platforms()
        .into_iter()
        .map(|(platform, version, arch, _file)| (platform, version, arch))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{parse_manifest, FileEntry, FileRef};

    type Entry = (&'static str, &'static str, &'static str);

    const DIGEST: &str = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

    /// A manifest offering each `(platform, version key, arch)` with its own file, built as JSON
    /// and read through `parse_manifest` so the table exercises the real path.
    fn manifest_offering(entries: &[Entry]) -> Manifest {
        let mut packages = serde_json::Map::new();
        let mut files = serde_json::Map::new();
        for (index, (platform, version, arch)) in entries.iter().enumerate() {
            let file = file_for(index);
            files.insert(
                file.clone(),
                serde_json::json!({"checksums": {"sha256": DIGEST}}),
            );
            let versions = packages
                .entry(platform.to_string())
                .or_insert_with(|| serde_json::json!({}));
            versions[*version][*arch] = serde_json::json!({ "file": file });
        }
        let document = serde_json::json!({
            "schemaVersion": "2.0",
            "version": "1.0.0",
            "packages": packages,
            "files": files,
        });
        parse_manifest(document.to_string().as_bytes()).unwrap()
    }

    fn file_for(index: usize) -> String {
        format!("file{index}.zip")
    }

    const COMMON: &[Entry] = &[
        ("amazon", "2", "x86_64"),
        ("amazon", "2", "arm64"),
        ("amazon", "2023", "x86_64"),
        ("amazon", "2023", "arm64"),
        ("redhat", "8.*", "x86_64"),
        ("redhat", "9.*", "x86_64"),
        ("redhat", "9.4", "x86_64"),
        ("ubuntu", "_any", "x86_64"),
        ("ubuntu", "_any", "arm64"),
        ("windows", "_any", "_any"),
        ("_any", "_any", "x86_64"),
    ];
    const NO_ANY_PLATFORM: &[Entry] = &[("amazon", "2", "x86_64"), ("ubuntu", "_any", "_any")];
    const NESTED: &[Entry] = &[
        ("centos", "7.*", "x86_64"),
        ("centos", "7.9.*", "x86_64"),
        ("centos", "7.9.2009", "x86_64"),
        ("centos", "8", "x86_64"),
        ("centos", "*", "x86_64"),
    ];
    const LONGER_ONLY: &[Entry] = &[("suse", "15.5.1.*", "x86_64")];
    const LONGER_AND_SHORTER: &[Entry] =
        &[("suse", "15.5.1.*", "x86_64"), ("suse", "15.*", "x86_64")];
    const ANY_AND_STAR: &[Entry] = &[("debian", "_any", "x86_64"), ("debian", "*", "arm64")];
    const STAR_ONLY: &[Entry] = &[("debian", "*", "x86_64")];
    const WILDCARD_THEN_ANY: &[Entry] = &[("redhat", "9.*", "x86_64"), ("redhat", "_any", "arm64")];
    const WINDOWS: &[Entry] = &[
        ("windows", "10.0.14393", "x86_64"),
        ("windows", "10.0.14393nano", "x86_64"),
        ("windows", "10.*", "x86_64"),
        ("windows", "10.0.*nano", "x86_64"),
        ("windows", "6.*nano", "x86_64"),
    ];
    const WINDOWS_PLAIN_WILDCARD_AND_ANY: &[Entry] =
        &[("windows", "10.*", "x86_64"), ("windows", "_any", "x86_64")];
    const WINDOWS_NANO_WILDCARD_ONLY: &[Entry] = &[("windows", "10.*nano", "x86_64")];
    const WINDOWS_PLAIN_WILDCARD_ONLY: &[Entry] = &[("windows", "10.*", "x86_64")];
    const ARCHITECTURES: &[Entry] = &[("amazon", "2", "x86_64"), ("amazon", "2", "_any")];
    const EMPTY_VERSION_ANY: &[Entry] = &[("arch", "_any", "x86_64")];
    const EMPTY_PREFIX_WILDCARD: &[Entry] = &[("arch", "_any", "x86_64"), ("arch", ".*", "arm64")];
    const ONE_WILDCARD: &[Entry] = &[("centos", "7.*", "x86_64")];

    const UPPERCASE_HEX: &str = r#"{
        "schemaVersion": "2.0", "version": "1.0",
        "packages": { "amazon": { "2023": { "x86_64": { "file": "a.zip" } } } },
        "files": { "a.zip": { "checksums": {
            "sha256": "2C26B46B68FFC68FF99B453C1D30413413422D706483BFA0F98A5E886266E7AE" } } }
    }"#;
    const MIXED_CASE_HEX: &str = r#"{
        "schemaVersion": "2.0", "version": "1.0",
        "packages": { "_any": { "_any": { "_any": { "file": "a.zip" } } } },
        "files": { "a.zip": { "checksums": {
            "sha256": "2c26B46b68ffc68FF99b453c1d30413413422d706483bfa0f98a5e886266E7AE" } } }
    }"#;
    const MISSING_FILE_REFERENCE: &str = r#"{
        "schemaVersion": "2.0", "version": "1.0",
        "packages": { "amazon": { "2023": {
            "x86_64": { "file": "a.zip" }, "arm64": { "file": "b.zip" } } } },
        "files": { "a.zip": { "checksums": {
            "sha256": "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae" } } }
    }"#;

    enum Source {
        Entries(&'static [Entry]),
        Json(&'static str),
    }

    enum Expect {
        /// The chosen platform, version and architecture keys.
        Picks(&'static str, &'static str, &'static str),
        FailsAt(SelectLevel),
        /// The manifest itself is refused, with an error at this path.
        ParseErrorAt(&'static str),
    }

    struct Case {
        name: &'static str,
        source: Source,
        wanted: (&'static str, &'static str, &'static str),
        expect: Expect,
    }

    fn case(
        name: &'static str,
        source: Source,
        wanted: (&'static str, &'static str, &'static str),
        expect: Expect,
    ) -> Case {
        Case {
            name,
            source,
            wanted,
            expect,
        }
    }

    fn selection_cases() -> Vec<Case> {
        use Expect::{FailsAt, ParseErrorAt, Picks};
        use SelectLevel::{Architecture, Platform as PlatformLevel, Version};
        use Source::{Entries, Json};
        vec![
            // Exact keys at every level.
            case(
                "exact amazon 2 x86_64",
                Entries(COMMON),
                ("amazon", "2", "x86_64"),
                Picks("amazon", "2", "x86_64"),
            ),
            case(
                "exact amazon 2 arm64",
                Entries(COMMON),
                ("amazon", "2", "arm64"),
                Picks("amazon", "2", "arm64"),
            ),
            case(
                "exact amazon 2023 arm64",
                Entries(COMMON),
                ("amazon", "2023", "arm64"),
                Picks("amazon", "2023", "arm64"),
            ),
            case(
                "exact version beats a matching wildcard",
                Entries(COMMON),
                ("redhat", "9.4", "x86_64"),
                Picks("redhat", "9.4", "x86_64"),
            ),
            // `_any` at the platform level.
            case(
                "_any platform for an unlisted platform",
                Entries(COMMON),
                ("debian", "12", "x86_64"),
                Picks("_any", "_any", "x86_64"),
            ),
            case(
                "exact platform beats _any platform",
                Entries(COMMON),
                ("ubuntu", "22.04", "x86_64"),
                Picks("ubuntu", "_any", "x86_64"),
            ),
            case(
                "platform keys are case-sensitive, so Amazon takes _any",
                Entries(COMMON),
                ("Amazon", "2", "x86_64"),
                Picks("_any", "_any", "x86_64"),
            ),
            case(
                "no platform and no _any platform",
                Entries(NO_ANY_PLATFORM),
                ("debian", "12", "x86_64"),
                FailsAt(PlatformLevel),
            ),
            case(
                "case-sensitive platform without _any fails",
                Entries(NO_ANY_PLATFORM),
                ("AMAZON", "2", "x86_64"),
                FailsAt(PlatformLevel),
            ),
            case(
                "empty platform name takes _any",
                Entries(COMMON),
                ("", "1", "x86_64"),
                Picks("_any", "_any", "x86_64"),
            ),
            // `_any` at the version level.
            case(
                "_any version for ubuntu 22.04",
                Entries(COMMON),
                ("ubuntu", "22.04", "arm64"),
                Picks("ubuntu", "_any", "arm64"),
            ),
            case(
                "_any version for ubuntu 24.04",
                Entries(COMMON),
                ("ubuntu", "24.04", "x86_64"),
                Picks("ubuntu", "_any", "x86_64"),
            ),
            case(
                "_any beats * at the version level",
                Entries(ANY_AND_STAR),
                ("debian", "12", "x86_64"),
                Picks("debian", "_any", "x86_64"),
            ),
            case(
                "empty version takes _any",
                Entries(EMPTY_VERSION_ANY),
                ("arch", "", "x86_64"),
                Picks("arch", "_any", "x86_64"),
            ),
            // `_any` at the architecture level.
            case(
                "_any architecture under windows",
                Entries(COMMON),
                ("windows", "10.0.20348", "arm64"),
                Picks("windows", "_any", "_any"),
            ),
            case(
                "exact architecture beats _any",
                Entries(ARCHITECTURES),
                ("amazon", "2", "x86_64"),
                Picks("amazon", "2", "x86_64"),
            ),
            case(
                "_any architecture for arm64",
                Entries(ARCHITECTURES),
                ("amazon", "2", "arm64"),
                Picks("amazon", "2", "_any"),
            ),
            case(
                "architecture keys are case-sensitive",
                Entries(ARCHITECTURES),
                ("amazon", "2", "X86_64"),
                Picks("amazon", "2", "_any"),
            ),
            case(
                "no architecture and no _any",
                Entries(COMMON),
                ("redhat", "8.9", "arm64"),
                FailsAt(Architecture),
            ),
            // `*` at the version level.
            case(
                "* when nothing else matches",
                Entries(STAR_ONLY),
                ("debian", "12", "x86_64"),
                Picks("debian", "*", "x86_64"),
            ),
            case(
                "* matches an empty version",
                Entries(STAR_ONLY),
                ("debian", "", "x86_64"),
                Picks("debian", "*", "x86_64"),
            ),
            case(
                "* after no wildcard matches",
                Entries(NESTED),
                ("centos", "6.10", "x86_64"),
                Picks("centos", "*", "x86_64"),
            ),
            case(
                "a non-wildcard key is not a prefix: 8 does not match 8.1",
                Entries(NESTED),
                ("centos", "8.1", "x86_64"),
                Picks("centos", "*", "x86_64"),
            ),
            // Wildcard prefixes, nested.
            case(
                "wildcard 8.* for 8.9",
                Entries(COMMON),
                ("redhat", "8.9", "x86_64"),
                Picks("redhat", "8.*", "x86_64"),
            ),
            case(
                "wildcard 9.* for 9.2",
                Entries(COMMON),
                ("redhat", "9.2", "x86_64"),
                Picks("redhat", "9.*", "x86_64"),
            ),
            case(
                "wildcard 9.* matches bare 9",
                Entries(COMMON),
                ("redhat", "9", "x86_64"),
                Picks("redhat", "9.*", "x86_64"),
            ),
            case(
                "wildcard 9.* for three components",
                Entries(COMMON),
                ("redhat", "9.3.1", "x86_64"),
                Picks("redhat", "9.*", "x86_64"),
            ),
            case(
                "exact key among nested wildcards",
                Entries(NESTED),
                ("centos", "7.9.2009", "x86_64"),
                Picks("centos", "7.9.2009", "x86_64"),
            ),
            case(
                "7.9.* beats 7.* for 7.9.1",
                Entries(NESTED),
                ("centos", "7.9.1", "x86_64"),
                Picks("centos", "7.9.*", "x86_64"),
            ),
            case(
                "7.9.* matches 7.9 itself",
                Entries(NESTED),
                ("centos", "7.9", "x86_64"),
                Picks("centos", "7.9.*", "x86_64"),
            ),
            case(
                "7.* for 7.8",
                Entries(NESTED),
                ("centos", "7.8", "x86_64"),
                Picks("centos", "7.*", "x86_64"),
            ),
            case(
                "7.* matches bare 7",
                Entries(NESTED),
                ("centos", "7", "x86_64"),
                Picks("centos", "7.*", "x86_64"),
            ),
            case(
                "7.* for 7.10 (components, not characters)",
                Entries(NESTED),
                ("centos", "7.10", "x86_64"),
                Picks("centos", "7.*", "x86_64"),
            ),
            case(
                "7.09 is not 7.9",
                Entries(NESTED),
                ("centos", "7.09.1", "x86_64"),
                Picks("centos", "7.*", "x86_64"),
            ),
            case(
                "7.* does not match 77.1",
                Entries(NESTED),
                ("centos", "77.1", "x86_64"),
                Picks("centos", "*", "x86_64"),
            ),
            case(
                "7.* does not match 17",
                Entries(ONE_WILDCARD),
                ("centos", "17", "x86_64"),
                FailsAt(Version),
            ),
            case(
                "7.* matches a trailing dot",
                Entries(ONE_WILDCARD),
                ("centos", "7.", "x86_64"),
                Picks("centos", "7.*", "x86_64"),
            ),
            case(
                "exact 8 for 8",
                Entries(NESTED),
                ("centos", "8", "x86_64"),
                Picks("centos", "8", "x86_64"),
            ),
            // A key with more components than the version never matches.
            case(
                "longer key never matches",
                Entries(LONGER_ONLY),
                ("suse", "15.5", "x86_64"),
                FailsAt(Version),
            ),
            case(
                "longer key never matches a bare major",
                Entries(LONGER_ONLY),
                ("suse", "15", "x86_64"),
                FailsAt(Version),
            ),
            case(
                "longer key skipped, shorter one taken",
                Entries(LONGER_AND_SHORTER),
                ("suse", "15.5", "x86_64"),
                Picks("suse", "15.*", "x86_64"),
            ),
            case(
                "longer key taken once the version is long enough",
                Entries(LONGER_AND_SHORTER),
                ("suse", "15.5.1.3", "x86_64"),
                Picks("suse", "15.5.1.*", "x86_64"),
            ),
            case(
                "9.* never matches version 8",
                Entries(COMMON),
                ("redhat", "7.9", "x86_64"),
                FailsAt(Version),
            ),
            // No backtracking.
            case(
                "no backtracking from a platform to _any platform (version)",
                Entries(COMMON),
                ("amazon", "2018.03", "x86_64"),
                FailsAt(Version),
            ),
            case(
                "no backtracking from a platform to _any platform (arch)",
                Entries(COMMON),
                ("amazon", "2", "386"),
                FailsAt(Architecture),
            ),
            case(
                "no backtracking from _any version to *",
                Entries(ANY_AND_STAR),
                ("debian", "12", "arm64"),
                FailsAt(Architecture),
            ),
            case(
                "no backtracking from a wildcard to _any version",
                Entries(WILDCARD_THEN_ANY),
                ("redhat", "9.4", "arm64"),
                FailsAt(Architecture),
            ),
            case(
                "_any platform chosen, its arch missing",
                Entries(COMMON),
                ("debian", "12", "arm64"),
                FailsAt(Architecture),
            ),
            case(
                "no backtracking from .* to _any for an empty version",
                Entries(EMPTY_PREFIX_WILDCARD),
                ("arch", "", "x86_64"),
                FailsAt(Architecture),
            ),
            case(
                ".* matches an empty version (agent quirk)",
                Entries(EMPTY_PREFIX_WILDCARD),
                ("arch", "", "arm64"),
                Picks("arch", ".*", "arm64"),
            ),
            // Windows Nano.
            case(
                "nano exact key",
                Entries(WINDOWS),
                ("windows", "10.0.14393nano", "x86_64"),
                Picks("windows", "10.0.14393nano", "x86_64"),
            ),
            case(
                "non-nano exact key",
                Entries(WINDOWS),
                ("windows", "10.0.14393", "x86_64"),
                Picks("windows", "10.0.14393", "x86_64"),
            ),
            case(
                "non-nano takes 10.*, skipping the longer nano key",
                Entries(WINDOWS),
                ("windows", "10.0.17763", "x86_64"),
                Picks("windows", "10.*", "x86_64"),
            ),
            case(
                "nano takes the nano wildcard, skipping 10.*",
                Entries(WINDOWS),
                ("windows", "10.0.17763nano", "x86_64"),
                Picks("windows", "10.0.*nano", "x86_64"),
            ),
            case(
                "nano 6.3 takes 6.*nano",
                Entries(WINDOWS),
                ("windows", "6.3.9600nano", "x86_64"),
                Picks("windows", "6.*nano", "x86_64"),
            ),
            case(
                "non-nano never takes a nano wildcard",
                Entries(WINDOWS),
                ("windows", "6.3.9600", "x86_64"),
                FailsAt(Version),
            ),
            case(
                "nano skips plain wildcards but still takes _any",
                Entries(WINDOWS_PLAIN_WILDCARD_AND_ANY),
                ("windows", "10.0.14393nano", "x86_64"),
                Picks("windows", "_any", "x86_64"),
            ),
            case(
                "nano with only a plain wildcard fails",
                Entries(WINDOWS_PLAIN_WILDCARD_ONLY),
                ("windows", "10.0.14393nano", "x86_64"),
                FailsAt(Version),
            ),
            case(
                "nano wildcard 10.*nano",
                Entries(WINDOWS_NANO_WILDCARD_ONLY),
                ("windows", "10.0.14393nano", "x86_64"),
                Picks("windows", "10.*nano", "x86_64"),
            ),
            case(
                "non-nano with only a nano wildcard fails",
                Entries(WINDOWS_NANO_WILDCARD_ONLY),
                ("windows", "10.0.17763", "x86_64"),
                FailsAt(Version),
            ),
            case(
                "nano takes windows _any/_any",
                Entries(COMMON),
                ("windows", "10.0.14393nano", "x86_64"),
                Picks("windows", "_any", "_any"),
            ),
            // The manifest's own rules, as selection meets them.
            case(
                "missing file reference is a parse error",
                Json(MISSING_FILE_REFERENCE),
                ("amazon", "2023", "arm64"),
                ParseErrorAt("$.packages[\"amazon\"][\"2023\"][\"arm64\"].file"),
            ),
            case(
                "uppercase hex digest is accepted",
                Json(UPPERCASE_HEX),
                ("amazon", "2023", "x86_64"),
                Picks("amazon", "2023", "x86_64"),
            ),
            case(
                "mixed-case hex digest is accepted",
                Json(MIXED_CASE_HEX),
                ("rocky", "9.3", "arm64"),
                Picks("_any", "_any", "_any"),
            ),
        ]
    }

    #[test]
    fn selection_table() {
        let cases = selection_cases();
        assert!(cases.len() >= 45, "only {} cases", cases.len());
        for Case {
            name,
            source,
            wanted,
            expect,
        } in cases
        {
            let platform = Platform::new(wanted.0, wanted.1, wanted.2);
            let (manifest, entries) = match source {
                Source::Entries(entries) => (manifest_offering(entries), entries),
                Source::Json(json) => match (parse_manifest(json.as_bytes()), &expect) {
                    (Ok(manifest), _) => (manifest, &[][..]),
                    (Err(errors), Expect::ParseErrorAt(path)) => {
                        assert!(
                            errors.at(path).next().is_some(),
                            "{name}: no error at {path}:\n{errors}"
                        );
                        continue;
                    }
                    (Err(errors), _) => panic!("{name}: manifest refused:\n{errors}"),
                },
            };
            let result = select(&manifest, &platform);
            match expect {
                Expect::Picks(platform_key, version_key, arch_key) => {
                    let selection = result.unwrap_or_else(|error| panic!("{name}: {error}"));
                    assert_eq!(
                        (
                            selection.platform_key.as_str(),
                            selection.version_key.as_str(),
                            selection.arch_key.as_str()
                        ),
                        (platform_key, version_key, arch_key),
                        "{name}"
                    );
                    if let Some(index) = entries
                        .iter()
                        .position(|entry| *entry == (platform_key, version_key, arch_key))
                    {
                        assert_eq!(selection.file, file_for(index), "{name}");
                    }
                    let digest = manifest.sha256_of(&selection.file).unwrap();
                    assert_eq!(hex::encode(digest), DIGEST, "{name}");
                }
                Expect::FailsAt(level) => {
                    let error = result.expect_err(name);
                    assert_eq!(error.level, level, "{name}: {error}");
                    assert_eq!(error.wanted, platform, "{name}");
                }
                Expect::ParseErrorAt(path) => {
                    panic!("{name}: expected a parse error at {path}, the manifest parsed")
                }
            }
        }
    }

    #[test]
    fn error_names_what_was_wanted_where_it_failed_and_what_is_offered() {
        let manifest = manifest_offering(COMMON);
        let error = select(&manifest, &Platform::new("amazon", "2018.03", "x86_64")).unwrap_err();
        let message = error.to_string();
        for part in [
            "platform \"amazon\"",
            "version \"2018.03\"",
            "architecture \"x86_64\"",
            "platform key \"amazon\" was chosen",
            "version keys",
            "\"amazon\"/\"2\"/\"x86_64\"",
            "\"_any\"/\"_any\"/\"x86_64\"",
            "\"windows\"/\"_any\"/\"_any\"",
        ] {
            assert!(message.contains(part), "{part:?} missing from {message}");
        }
        assert_eq!(error.platform_key.as_deref(), Some("amazon"));
        assert_eq!(error.offered.len(), COMMON.len());

        let error = select(&manifest, &Platform::new("amazon", "2", "386")).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("version key \"2\""), "{message}");
        assert!(message.contains("architecture \"386\""), "{message}");

        let manifest = manifest_offering(NO_ANY_PLATFORM);
        let message = select(&manifest, &Platform::new("debian", "12", "arm64"))
            .unwrap_err()
            .to_string();
        assert!(message.contains("no platform \"debian\""), "{message}");
        assert!(message.contains("\"_any\" platform"), "{message}");
    }

    #[test]
    fn error_lists_at_most_a_screenful_of_offers() {
        let mut manifest = manifest_offering(&[("amazon", "2", "x86_64")]);
        let file_ref = FileRef { file: file_for(0) };
        for index in 0..100 {
            manifest
                .packages
                .entry(format!("platform{index}"))
                .or_default()
                .entry("1".into())
                .or_default()
                .insert("x86_64".into(), file_ref.clone());
        }
        let error = select(&manifest, &Platform::new("debian", "12", "x86_64")).unwrap_err();
        assert_eq!(error.offered.len(), 101);
        assert!(error.to_string().contains("and 61 more"), "{error}");
    }

    #[test]
    fn a_dangling_file_reference_fails_at_the_file_level() {
        // parse_manifest refuses such a manifest; one built in code can still hold it.
        let mut manifest = manifest_offering(&[("amazon", "2", "x86_64")]);
        manifest.files.clear();
        let error = select(&manifest, &Platform::new("amazon", "2", "x86_64")).unwrap_err();
        assert_eq!(error.level, SelectLevel::File);
        assert_eq!(error.file.as_deref(), Some("file0.zip"));
        assert!(
            error.to_string().contains("names file \"file0.zip\""),
            "{error}"
        );
        manifest.files.insert(
            "file0.zip".into(),
            FileEntry {
                checksums: crate::manifest::Checksums {
                    sha256: DIGEST.into(),
                },
            },
        );
        select(&manifest, &Platform::new("amazon", "2", "x86_64")).unwrap();
    }

    #[test]
    fn an_empty_manifest_offers_nothing() {
        let manifest = Manifest {
            schema_version: "2.0".into(),
            version: "1".into(),
            publisher: None,
            packages: BTreeMap::new(),
            files: BTreeMap::new(),
        };
        let error = select(&manifest, &Platform::new("amazon", "2", "x86_64")).unwrap_err();
        assert_eq!(error.level, SelectLevel::Platform);
        assert!(
            error.to_string().ends_with("the manifest offers nothing"),
            "{error}"
        );
    }

    #[test]
    fn match_version_key_works_on_plain_key_lists() {
        assert_eq!(match_version_key("7.9", ["7.*", "_any"]), Some("7.*"));
        assert_eq!(match_version_key("7.9", ["8.*", "_any", "*"]), Some("_any"));
        assert_eq!(match_version_key("7.9", ["8.*"]), None);
        assert_eq!(match_version_key("7.9", Vec::<String>::new().iter()), None);
        let owned = vec!["7.9.*".to_owned(), "7.*".to_owned()];
        assert_eq!(match_version_key("7.9.3", &owned), Some("7.9.*"));
    }

    #[test]
    fn platform_displays_its_three_parts() {
        assert_eq!(
            Platform::new("amazon", "2023", "arm64").to_string(),
            "platform \"amazon\" version \"2023\" architecture \"arm64\""
        );
    }

    proptest::proptest! {
        /// Whatever the keys, selection never panics, and a selection it makes follows the
        /// rules: exact-or-_any platform and architecture, and a version key that matches.
        #[test]
        fn selection_is_total_and_consistent(
            keys in proptest::collection::vec(
                (
                    "(amazon|ubuntu|_any|windows)",
                    "(_any|\\*|1|1\\.2|1\\.\\*|1\\.2\\.\\*|2\\.\\*|1\\.\\*nano|\\.\\*|1\\.2nano)",
                    "(x86_64|arm64|_any)",
                ),
                1..12,
            ),
            wanted in (
                "(amazon|ubuntu|debian|windows)",
                "(|1|1\\.2|1\\.2\\.3|2|1\\.2nano|1\\.2\\.3nano|10)",
                "(x86_64|arm64|386)",
            ),
        ) {
            let mut packages: BTreeMap<String, BTreeMap<String, BTreeMap<String, FileRef>>> =
                BTreeMap::new();
            for (platform, version, arch) in &keys {
                packages
                    .entry(platform.clone())
                    .or_default()
                    .entry(version.clone())
                    .or_default()
                    .insert(arch.clone(), FileRef { file: "f.zip".into() });
            }
            let mut files = BTreeMap::new();
            files.insert(
                "f.zip".to_owned(),
                FileEntry { checksums: crate::manifest::Checksums { sha256: DIGEST.into() } },
            );
            let manifest = Manifest {
                schema_version: "2.0".into(),
                version: "1".into(),
                publisher: None,
                packages,
                files,
            };
            let platform = Platform::new(wanted.0, wanted.1, wanted.2);
            match select(&manifest, &platform) {
                Ok(selection) => {
                    let platform_ok = selection.platform_key == platform.name
                        || (selection.platform_key == ANY_KEY
                            && !manifest.packages.contains_key(&platform.name));
                    proptest::prop_assert!(platform_ok);
                    let versions = &manifest.packages[&selection.platform_key];
                    let version_key = selection.version_key.as_str();
                    let version_ok = version_key == platform.version
                        || wildcard_match_components(version_key, &platform.version).is_some()
                        || version_key == ANY_KEY
                        || version_key == STAR_KEY;
                    proptest::prop_assert!(version_ok);
                    let architectures = &versions[version_key];
                    let arch_ok = selection.arch_key == platform.arch
                        || (selection.arch_key == ANY_KEY
                            && !architectures.contains_key(&platform.arch));
                    proptest::prop_assert!(arch_ok);
                }
                Err(error) => {
                    proptest::prop_assert_eq!(&error.wanted, &platform);
                    proptest::prop_assert!(!error.to_string().is_empty());
                }
            }
        }
    }
}
