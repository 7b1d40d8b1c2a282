//! Which platform this machine is, in the SSM Agent's words: the platform name and version
//! from an os-release file, and the architecture of the running binary.
//!
//! Follows `agent/plugins/configurepackage/envdetect/osdetect/osdetect_unix.go` (Linux) and
//! `.../osdetect/osdetect.go` (architecture) of github.com/aws/amazon-ssm-agent:
//!
//! - `/etc/os-release` is read, else `/usr/lib/os-release`; of its lines only `ID=`,
//!   `VERSION_ID=` and `NAME=` matter, each starting at the beginning of the line, with one
//!   leading and one trailing quote (single or double) removed, and the last occurrence winning.
//! - `ID` is renamed: `rhel`→`redhat`, `ol`→`oracle`, `amzn`→`amazon`, `sles`/`suse`→`suse`,
//!   `opensuse`/`opensuse-leap`→`opensuseleap` when `NAME` contains "leap" in any case. Every
//!   other ID (`ubuntu`, `debian`, `centos`, `rocky`, `almalinux`, `opensuse-tumbleweed`, ...)
//!   passes through unchanged, and, as in the agent, is *not* lowercased (os-release requires
//!   IDs to be lowercase already).
//! - A missing `VERSION_ID` is not an error: the version is empty, so only `_any` or `*`
//!   version keys can match. Rolling distributions (Arch, Gentoo, Debian testing) have no
//!   `VERSION_ID`, and the agent serves them this way.
//! - A missing `ID` is an error (in the agent it fails later, as an unknown platform).
//! - Architecture is Go's `GOARCH` name with `amd64` spelled `x86_64`: `x86_64`, `arm64`, `386`.
//!
//! pkgmesh differs from the agent in three small ways, each noted where it happens: trailing
//! whitespace around a value is trimmed, `ID=""` reads as a missing ID, and IDs the agent does
//! not know (the agent refuses to install anything there) are passed through.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::select::Platform;

/// Where the platform is read from, in order: the first readable file wins.
pub const DEFAULT_OS_RELEASE_PATHS: [&str; 2] = ["/etc/os-release", "/usr/lib/os-release"];

/// Most bytes read from an os-release file; real ones are well under 2 KiB, and a bigger file
/// is not what it claims to be.
pub const MAX_OS_RELEASE_BYTES: u64 = 64 * 1024;

/// A platform name and version as an os-release file gives them, before the architecture is
/// added.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OsPlatform {
    /// The agent's platform name (`amazon`, `redhat`, `ubuntu`, ...).
    pub name: String,
    /// `VERSION_ID` as written (`2023`, `22.04`, `9.4`), empty when the file has none.
    pub version: String,
}

impl OsPlatform {
    /// The full [`Platform`] once the architecture is known.
    pub fn with_arch(self, arch: &str) -> Platform {
        Platform {
            name: self.name,
            version: self.version,
            arch: arch.to_owned(),
        }
    }
}

/// The three os-release fields the agent reads, unquoted, as they appear in the file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OsReleaseFields {
    pub id: Option<String>,
    pub version_id: Option<String>,
    pub name: Option<String>,
}

/// Why the platform could not be detected.
#[derive(Debug)]
pub enum PlatformError {
    /// The os-release contents have no usable `ID=` line.
    MissingId { origin: String },
    /// An os-release file is bigger than [`MAX_OS_RELEASE_BYTES`].
    TooLarge { path: PathBuf, limit: u64 },
    /// None of the paths could be read; one entry per path tried.
    NoReadableFile {
        attempts: Vec<(PathBuf, std::io::Error)>,
    },
    /// This operating system has no os-release file to read.
    UnsupportedOs { os: &'static str },
}

impl fmt::Display for PlatformError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlatformError::MissingId { origin } => write!(
                f,
                "{origin} has no ID= line, so the platform name is unknown \
                 (set the platform in the node config to override detection)"
            ),
            PlatformError::TooLarge { path, limit } => write!(
                f,
                "{} is larger than {limit} bytes, which no os-release file is",
                path.display()
            ),
            PlatformError::NoReadableFile { attempts } => {
                f.write_str("no os-release file could be read")?;
                if attempts.is_empty() {
                    return f.write_str(" (no paths were given)");
                }
                for (index, (path, error)) in attempts.iter().enumerate() {
                    let separator = if index == 0 { ": " } else { "; " };
                    write!(f, "{separator}{}: {error}", path.display())?;
                }
                Ok(())
            }
            PlatformError::UnsupportedOs { os } => write!(
                f,
                "platform detection reads os-release, which {os} does not have \
                 (set the platform in the node config)"
            ),
        }
    }
}

impl std::error::Error for PlatformError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PlatformError::NoReadableFile { attempts } => attempts
                .first()
                .map(|(_, error)| error as &(dyn std::error::Error + 'static)),
            _ => None,
        }
    }
}

/// Reads `ID`, `VERSION_ID` and `NAME` from os-release contents. Comments, blank lines, other
/// keys and indented lines are ignored; the last occurrence of a key wins.
pub fn read_os_release_fields(contents: &str) -> OsReleaseFields {
    let mut fields = OsReleaseFields::default();
    for line in contents.lines() {
        // Anchored at the start of the line, like the agent's `^ID=` patterns: an indented or
        // commented-out assignment is not an assignment.
        let Some((key, raw_value)) = line.split_once('=') else {
            continue;
        };
        let slot = match key {
            "ID" => &mut fields.id,
            "VERSION_ID" => &mut fields.version_id,
            "NAME" => &mut fields.name,
            _ => continue,
        };
        let value = unquote(raw_value);
        // The agent's patterns need at least one character, so an empty value leaves the
        // previous one in place.
        if !value.is_empty() {
            *slot = Some(value.to_owned());
        }
    }
    fields
}

/// Removes one leading and one trailing quote, each single or double, as the agent's
/// `["']?(.+?)["']?` does. Surrounding whitespace is trimmed first, which the agent does not do
/// (it would keep `9.4" ` from `VERSION_ID="9.4" `); no real file has it, and keeping it would
/// only make selection fail.
fn unquote(raw: &str) -> &str {
    let trimmed = raw.trim();
    let without_leading = trimmed.strip_prefix(['"', '\'']).unwrap_or(trimmed);
    without_leading
        .strip_suffix(['"', '\''])
        .unwrap_or(without_leading)
}

/// The agent's platform name for an os-release `ID` (and `NAME`, which tells openSUSE Leap
/// apart).
pub fn platform_name_for(id: &str, name: Option<&str>) -> String {
    match id {
        "rhel" => "redhat".to_owned(),
        "ol" => "oracle".to_owned(),
        "amzn" => "amazon".to_owned(),
        "sles" | "suse" => "suse".to_owned(),
        "opensuse" | "opensuse-leap"
            if name.is_some_and(|name| name.to_lowercase().contains("leap")) =>
        {
            "opensuseleap".to_owned()
        }
        other => other.to_owned(),
    }
}

/// The platform name and version from os-release contents.
pub fn parse_os_release(contents: &str) -> Result<OsPlatform, PlatformError> {
    parse_os_release_from(contents, "the os-release contents")
}

fn parse_os_release_from(contents: &str, origin: &str) -> Result<OsPlatform, PlatformError> {
    let fields = read_os_release_fields(contents);
    let Some(id) = fields.id else {
        return Err(PlatformError::MissingId {
            origin: origin.to_owned(),
        });
    };
    Ok(OsPlatform {
        name: platform_name_for(&id, fields.name.as_deref()),
        version: fields.version_id.unwrap_or_default(),
    })
}

/// Detects the platform from the first of `paths` that can be read, with architecture `arch`.
/// A file that exists but cannot be read (permissions, a directory) is skipped like a missing
/// one; a file that is read but has no `ID` is an error naming it, not a reason to try the next.
pub fn detect_platform_from(paths: &[&Path], arch: &str) -> Result<Platform, PlatformError> {
    let mut attempts = Vec::new();
    for path in paths {
        match read_capped(path) {
            Ok(bytes) => {
                if bytes.len() as u64 > MAX_OS_RELEASE_BYTES {
                    return Err(PlatformError::TooLarge {
                        path: path.to_path_buf(),
                        limit: MAX_OS_RELEASE_BYTES,
                    });
                }
                // os-release is meant to be UTF-8; a stray byte in PRETTY_NAME should not stop
                // detection, so decode leniently.
                let contents = String::from_utf8_lossy(&bytes);
                let origin = path.display().to_string();
                return parse_os_release_from(&contents, &origin).map(|os| os.with_arch(arch));
            }
            Err(error) => attempts.push((path.to_path_buf(), error)),
        }
    }
    Err(PlatformError::NoReadableFile { attempts })
}

/// Reads at most one byte more than [`MAX_OS_RELEASE_BYTES`], enough to tell an oversized file.
fn read_capped(path: &Path) -> std::io::Result<Vec<u8>> {
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_OS_RELEASE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Detects this machine's platform from [`DEFAULT_OS_RELEASE_PATHS`] and [`local_arch`].
pub fn detect_platform() -> Result<Platform, PlatformError> {
    if cfg!(any(target_os = "windows", target_os = "macos")) {
        // The agent asks WMI (Windows) or sw_vers (macOS) here; pkgmesh's node takes the
        // platform from its config on those systems instead.
        return Err(PlatformError::UnsupportedOs {
            os: std::env::consts::OS,
        });
    }
    let paths: Vec<&Path> = DEFAULT_OS_RELEASE_PATHS.iter().map(Path::new).collect();
    detect_platform_from(&paths, local_arch())
}

/// The architecture of the running binary in the agent's words: Go's `GOARCH` names, except
/// that `amd64` is `x86_64`.
pub fn local_arch() -> &'static str {
    arch_name_for(std::env::consts::ARCH)
}

/// Maps a Rust `target_arch` name to the agent's architecture name. Names Go spells the same
/// way as Rust pass through.
pub fn arch_name_for(rust_arch: &'static str) -> &'static str {
    match rust_arch {
        "x86_64" => "x86_64",
        "aarch64" => "arm64",
        "x86" => "386",
        "loongarch64" => "loong64",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "powerpc64" => "ppc64",
        "mips64" if cfg!(target_endian = "little") => "mips64le",
        "mips" if cfg!(target_endian = "little") => "mipsle",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata/os-release")
            .join(name)
    }

    fn detect_fixture(name: &str) -> Platform {
        let path = fixture(name);
        detect_platform_from(&[path.as_path()], "x86_64")
            .unwrap_or_else(|error| panic!("{name}: {error}"))
    }

    #[test]
    fn real_os_release_files_give_the_agents_names() {
        let cases = [
            ("amazon-linux-2", "amazon", "2"),
            ("amazon-linux-2023", "amazon", "2023"),
            ("amazon-linux-ami-2018.03", "amazon", "2018.03"),
            ("ubuntu-22.04", "ubuntu", "22.04"),
            ("ubuntu-24.04", "ubuntu", "24.04"),
            ("rhel-9.4", "redhat", "9.4"),
            ("rhel-8.10", "redhat", "8.10"),
            ("oracle-linux-8.9", "oracle", "8.9"),
            ("sles-15-sp5", "suse", "15.5"),
            ("opensuse-leap-15.5", "opensuseleap", "15.5"),
            ("opensuse-leap-42.3", "opensuseleap", "42.3"),
            ("opensuse-tumbleweed", "opensuse-tumbleweed", "20240521"),
            ("debian-12", "debian", "12"),
            ("debian-testing", "debian", ""),
            ("centos-7", "centos", "7"),
            ("centos-stream-9", "centos", "9"),
            ("rocky-9.3", "rocky", "9.3"),
            ("almalinux-9.4", "almalinux", "9.4"),
            ("alpine-3.19", "alpine", "3.19.1"),
            ("fedora-40", "fedora", "40"),
            ("arch", "arch", ""),
        ];
        for (file, name, version) in cases {
            assert_eq!(
                detect_fixture(file),
                Platform::new(name, version, "x86_64"),
                "{file}"
            );
        }
    }

    #[test]
    fn first_readable_path_wins() {
        let missing = fixture("does-not-exist");
        let directory = fixture("");
        let ubuntu = fixture("ubuntu-22.04");
        let amazon = fixture("amazon-linux-2023");
        let platform = detect_platform_from(
            &[
                missing.as_path(),
                directory.as_path(),
                ubuntu.as_path(),
                amazon.as_path(),
            ],
            "arm64",
        )
        .unwrap();
        assert_eq!(platform, Platform::new("ubuntu", "22.04", "arm64"));
    }

    #[test]
    fn no_readable_path_names_every_path_tried() {
        let first = fixture("missing-one");
        let second = fixture("missing-two");
        let error =
            detect_platform_from(&[first.as_path(), second.as_path()], "x86_64").unwrap_err();
        assert!(
            matches!(&error, PlatformError::NoReadableFile { attempts } if attempts.len() == 2)
        );
        let message = error.to_string();
        assert!(message.contains("missing-one"), "{message}");
        assert!(message.contains("missing-two"), "{message}");
        assert!(detect_platform_from(&[], "x86_64").is_err());
    }

    #[test]
    fn a_file_without_id_is_an_error_naming_it() {
        let path = fixture("no-id");
        let error = detect_platform_from(&[path.as_path()], "x86_64").unwrap_err();
        assert!(matches!(error, PlatformError::MissingId { .. }));
        assert!(
            error.to_string().contains("testdata/os-release/no-id"),
            "{error}"
        );
        assert!(error.to_string().contains("no ID= line"), "{error}");
    }

    #[test]
    fn an_oversized_file_is_refused() {
        let directory =
            std::env::temp_dir().join(format!("pkgmesh-platform-test-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let path = directory.join("os-release");
        let mut contents = "ID=ubuntu\nVERSION_ID=22.04\n".to_owned();
        contents.push_str(&"#".repeat(MAX_OS_RELEASE_BYTES as usize));
        std::fs::write(&path, contents).unwrap();
        let result = detect_platform_from(&[path.as_path()], "x86_64");
        std::fs::remove_dir_all(&directory).unwrap();
        let error = result.unwrap_err();
        assert!(matches!(error, PlatformError::TooLarge { .. }), "{error}");
        assert!(error.to_string().contains("65536"), "{error}");
    }

    #[test]
    fn quotes_comments_and_odd_lines() {
        let contents = "\
# ID=commented
  ID=indented
ID_LIKE=\"rhel fedora\"
ID='ol'
VERSION_ID=\"8.9\"   \r
NAME=\"Oracle Linux Server\"

garbage line without equals
";
        let fields = read_os_release_fields(contents);
        assert_eq!(fields.id.as_deref(), Some("ol"));
        assert_eq!(fields.version_id.as_deref(), Some("8.9"));
        assert_eq!(fields.name.as_deref(), Some("Oracle Linux Server"));
        assert_eq!(
            parse_os_release(contents).unwrap(),
            OsPlatform {
                name: "oracle".into(),
                version: "8.9".into()
            }
        );
    }

    #[test]
    fn last_occurrence_wins_and_empty_values_do_not_erase() {
        let fields =
            read_os_release_fields("ID=debian\nID=ubuntu\nVERSION_ID=1\nVERSION_ID=\"\"\n");
        assert_eq!(fields.id.as_deref(), Some("ubuntu"));
        assert_eq!(fields.version_id.as_deref(), Some("1"));
    }

    #[test]
    fn missing_or_empty_id_is_an_error() {
        for contents in [
            "",
            "VERSION_ID=2\n",
            "ID=\nVERSION_ID=2\n",
            "ID=\"\"\n",
            "id=amzn\n",
        ] {
            let error = parse_os_release(contents).unwrap_err();
            assert!(
                matches!(error, PlatformError::MissingId { .. }),
                "{contents:?}"
            );
        }
    }

    #[test]
    fn missing_version_id_gives_an_empty_version_as_the_agent_does() {
        assert_eq!(
            parse_os_release("ID=arch\n").unwrap(),
            OsPlatform {
                name: "arch".into(),
                version: String::new()
            }
        );
    }

    #[test]
    fn renames_follow_the_agent() {
        let cases: &[(&str, Option<&str>, &str)] = &[
            ("rhel", None, "redhat"),
            ("ol", None, "oracle"),
            ("amzn", None, "amazon"),
            ("sles", None, "suse"),
            ("suse", None, "suse"),
            ("opensuse-leap", Some("openSUSE Leap"), "opensuseleap"),
            ("opensuse", Some("openSUSE Leap"), "opensuseleap"),
            ("opensuse", Some("OPENSUSE LEAP"), "opensuseleap"),
            ("opensuse", Some("openSUSE"), "opensuse"),
            ("opensuse-leap", None, "opensuse-leap"),
            (
                "opensuse-tumbleweed",
                Some("openSUSE Tumbleweed"),
                "opensuse-tumbleweed",
            ),
            ("ubuntu", Some("Ubuntu"), "ubuntu"),
            ("debian", None, "debian"),
            ("centos", None, "centos"),
            ("rocky", None, "rocky"),
            // The agent does not lowercase os-release IDs, so neither does pkgmesh.
            ("Ubuntu", None, "Ubuntu"),
            ("RHEL", None, "RHEL"),
        ];
        for &(id, name, expected) in cases {
            assert_eq!(platform_name_for(id, name), expected, "{id} {name:?}");
        }
    }

    #[test]
    fn architecture_names_are_gos() {
        assert_eq!(arch_name_for("x86_64"), "x86_64");
        assert_eq!(arch_name_for("aarch64"), "arm64");
        assert_eq!(arch_name_for("x86"), "386");
        assert_eq!(arch_name_for("s390x"), "s390x");
        assert_eq!(arch_name_for("riscv64"), "riscv64");
        let local = local_arch();
        assert!(!local.is_empty());
        if cfg!(target_arch = "x86_64") {
            assert_eq!(local, "x86_64");
        }
        if cfg!(target_arch = "aarch64") {
            assert_eq!(local, "arm64");
        }
    }

    #[test]
    fn detect_platform_on_this_machine_does_not_panic() {
        // The test machine may be anything (or a container without os-release); the call must
        // return either a platform with this binary's architecture or an error.
        if let Ok(platform) = detect_platform() {
            assert_eq!(platform.arch, local_arch());
        }
    }

    proptest::proptest! {
        #[test]
        fn parsing_arbitrary_text_never_panics(contents in "\\PC{0,400}") {
            let _ = parse_os_release(&contents);
        }

        #[test]
        fn parsing_os_release_shaped_text_never_panics(
            lines in proptest::collection::vec(
                "(ID|VERSION_ID|NAME|#ID| ID)=[\"']{0,2}[a-zA-Z0-9. \"'\\-]{0,12}",
                0..8,
            )
        ) {
            let contents = lines.join("\n");
            let _ = parse_os_release(&contents);
        }
    }
}
