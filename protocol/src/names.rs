//! Package and version names: the character-set and length rules Distributor applies to them
//! (`^[a-zA-Z0-9_\-.]{3,128}$` for packages, `^[a-zA-Z0-9_\-.]{1,128}$` for versions), checked
//! by hand so the crate needs no regex engine, plus the quoting helpers every error message in
//! this crate uses to show a hostile value without letting it reach a terminal raw.

use std::fmt;

/// Longest package or version name Distributor accepts, in characters.
pub const MAX_NAME_CHARS: usize = 128;
/// Shortest package name Distributor accepts, in characters.
pub const MIN_PACKAGE_NAME_CHARS: usize = 3;
/// Shortest version name Distributor accepts, in characters.
pub const MIN_VERSION_NAME_CHARS: usize = 1;

/// Longest rendering of an offending value inside an error message. Values beyond it are cut,
/// so a 64 KiB string cannot flood a log line.
pub const MAX_SHOWN_VALUE_CHARS: usize = 80;

/// Which kind of name a [`NameError`] is about; its `Display` reads naturally inside a sentence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NameKind {
    Package,
    Version,
}

impl NameKind {
    fn min_chars(self) -> usize {
        match self {
            NameKind::Package => MIN_PACKAGE_NAME_CHARS,
            NameKind::Version => MIN_VERSION_NAME_CHARS,
        }
    }
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::Package => "package name",
            NameKind::Version => "version name",
        })
    }
}

/// Why a package or version name was refused. `Display` names the kind of name, shows the value
/// (quoted, escaped and truncated) and says what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameError {
    ForbiddenCharacter {
        kind: NameKind,
        value: String,
        character: char,
        /// Zero-based index of the first forbidden character, counted in characters.
        position: usize,
    },
    WrongLength {
        kind: NameKind,
        value: String,
        length: usize,
        min: usize,
        max: usize,
    },
}

impl NameError {
    /// What is wrong, without naming the kind or the value: for messages that already show them
    /// elsewhere (a manifest error carries the value and the JSON path separately).
    pub fn problem(&self) -> String {
        match self {
            NameError::ForbiddenCharacter {
                character,
                position,
                ..
            } => format!(
                "contains {} at character {position} (allowed: letters, digits, '_', '-', '.')",
                describe_char(*character)
            ),
            NameError::WrongLength {
                length, min, max, ..
            } => format!("is {length} characters long (allowed: {min} to {max})"),
        }
    }

    /// The name that was refused.
    pub fn value(&self) -> &str {
        match self {
            NameError::ForbiddenCharacter { value, .. } | NameError::WrongLength { value, .. } => {
                value
            }
        }
    }

    /// Which kind of name was refused.
    pub fn kind(&self) -> NameKind {
        match self {
            NameError::ForbiddenCharacter { kind, .. } | NameError::WrongLength { kind, .. } => {
                *kind
            }
        }
    }
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {}",
            self.kind(),
            quote_for_message(self.value()),
            self.problem()
        )
    }
}

impl std::error::Error for NameError {}

/// Checks a package name against Distributor's `^[a-zA-Z0-9_\-.]{3,128}$`.
pub fn validate_package_name(name: &str) -> Result<(), NameError> {
    validate_name(NameKind::Package, name)
}

/// Checks a version name against Distributor's `^[a-zA-Z0-9_\-.]{1,128}$`.
pub fn validate_version_name(v: &str) -> Result<(), NameError> {
    validate_name(NameKind::Version, v)
}

/// True for the characters both name rules allow: ASCII letters, digits, `_`, `-` and `.`.
pub fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

fn validate_name(kind: NameKind, value: &str) -> Result<(), NameError> {
    // The character set is checked first: a name with a '/' in it is wrong whatever its length,
    // and saying so is more useful than a length complaint.
    if let Some((position, character)) = value.chars().enumerate().find(|(_, c)| !is_name_char(*c))
    {
        return Err(NameError::ForbiddenCharacter {
            kind,
            value: value.to_owned(),
            character,
            position,
        });
    }
    // Every allowed character is one ASCII byte, so bytes and characters agree here.
    let length = value.len();
    if length < kind.min_chars() || length > MAX_NAME_CHARS {
        return Err(NameError::WrongLength {
            kind,
            value: value.to_owned(),
            length,
            min: kind.min_chars(),
            max: MAX_NAME_CHARS,
        });
    }
    Ok(())
}

/// Longest file name a manifest may list, in bytes: the common file-system limit for one path
/// component.
pub const MAX_FILE_NAME_BYTES: usize = 255;

/// Why a file name listed in a manifest was refused.
///
/// Distributor itself only needs file names to be S3 object names, but pkgmesh writes these
/// files into directories on seeds and nodes, so a name must be one plain path component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileNameError {
    Empty,
    TooLong {
        value: String,
        bytes: usize,
    },
    /// `.` or `..`, which name directories rather than files.
    DirectoryAlias {
        value: String,
    },
    ForbiddenCharacter {
        value: String,
        character: char,
        position: usize,
    },
}

impl FileNameError {
    /// What is wrong, without the value (see [`NameError::problem`]).
    pub fn problem(&self) -> String {
        match self {
            FileNameError::Empty => "is empty".to_owned(),
            FileNameError::TooLong { bytes, .. } => {
                format!("is {bytes} bytes long (allowed: at most {MAX_FILE_NAME_BYTES})")
            }
            FileNameError::DirectoryAlias { .. } => "names a directory, not a file".to_owned(),
            FileNameError::ForbiddenCharacter {
                character,
                position,
                ..
            } => format!(
                "contains {} at character {position} (a file name must be a single path \
                 component: no '/', '\\' or control characters)",
                describe_char(*character)
            ),
        }
    }
}

impl fmt::Display for FileNameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = match self {
            FileNameError::Empty => "",
            FileNameError::TooLong { value, .. }
            | FileNameError::DirectoryAlias { value }
            | FileNameError::ForbiddenCharacter { value, .. } => value,
        };
        write!(
            f,
            "file name {} {}",
            quote_for_message(value),
            self.problem()
        )
    }
}

impl std::error::Error for FileNameError {}

/// Checks that a manifest's file name is one plain path component that is safe to join onto a
/// directory: not empty, not `.` or `..`, at most [`MAX_FILE_NAME_BYTES`] bytes, and free of
/// `/`, `\` and control characters.
pub fn validate_file_name(name: &str) -> Result<(), FileNameError> {
    if name.is_empty() {
        return Err(FileNameError::Empty);
    }
    if let Some((position, character)) = name
        .chars()
        .enumerate()
        .find(|(_, c)| matches!(c, '/' | '\\') || c.is_control())
    {
        return Err(FileNameError::ForbiddenCharacter {
            value: name.to_owned(),
            character,
            position,
        });
    }
    if name == "." || name == ".." {
        return Err(FileNameError::DirectoryAlias {
            value: name.to_owned(),
        });
    }
    if name.len() > MAX_FILE_NAME_BYTES {
        return Err(FileNameError::TooLong {
            value: name.to_owned(),
            bytes: name.len(),
        });
    }
    Ok(())
}

/// Renders a string for an error message: in double quotes, with quotes, backslashes and every
/// control character escaped (so a value cannot move the cursor or recolour a terminal), and cut
/// to [`MAX_SHOWN_VALUE_CHARS`] characters with a trailing `…` when longer.
pub fn quote_for_message(value: &str) -> String {
    let mut quoted = String::with_capacity(value.len().min(MAX_SHOWN_VALUE_CHARS * 2) + 2);
    quoted.push('"');
    push_escaped(&mut quoted, value, MAX_SHOWN_VALUE_CHARS);
    quoted.push('"');
    quoted
}

fn push_escaped(out: &mut String, value: &str, max_chars: usize) {
    for (index, c) in value.chars().enumerate() {
        if index == max_chars {
            out.push('…');
            return;
        }
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            // C1 controls (U+0080..U+009F) are included: some terminals treat U+009B as CSI.
            c if c.is_control() => out.push_str(&format!("\\u{{{:04x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
}

/// Names a single character for an error message: printable ones in single quotes, others by
/// their code point, so the reader can see exactly which character was refused.
pub fn describe_char(c: char) -> String {
    match c {
        ' ' => "a space".to_owned(),
        '\'' => "'\\''".to_owned(),
        c if c.is_control() || c.is_whitespace() => format!("U+{:04X}", u32::from(c)),
        c => format!("'{c}'"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_every_allowed_character() {
        let all: String = ('a'..='z')
            .chain('A'..='Z')
            .chain('0'..='9')
            .chain(['_', '-', '.'])
            .collect();
        assert!(all.len() <= MAX_NAME_CHARS);
        validate_package_name(&all).unwrap();
        validate_version_name(&all).unwrap();
    }

    #[test]
    fn package_name_length_bounds() {
        validate_package_name("abc").unwrap();
        validate_package_name(&"a".repeat(128)).unwrap();
        for bad in ["", "a", "ab"] {
            let err = validate_package_name(bad).unwrap_err();
            assert!(
                matches!(err, NameError::WrongLength { length, min: 3, max: 128, .. } if length == bad.len()),
                "{err:?}"
            );
        }
        let err = validate_package_name(&"a".repeat(129)).unwrap_err();
        assert!(matches!(err, NameError::WrongLength { length: 129, .. }));
    }

    #[test]
    fn version_name_length_bounds() {
        validate_version_name("1").unwrap();
        validate_version_name(".").unwrap();
        validate_version_name(&"9".repeat(128)).unwrap();
        assert!(matches!(
            validate_version_name("").unwrap_err(),
            NameError::WrongLength {
                length: 0,
                min: 1,
                ..
            }
        ));
        assert!(matches!(
            validate_version_name(&"9".repeat(129)).unwrap_err(),
            NameError::WrongLength { length: 129, .. }
        ));
    }

    #[test]
    fn forbidden_characters_are_named_with_their_position() {
        let cases: &[(&str, char, usize)] = &[
            ("a/b", '/', 1),
            ("1.0 beta", ' ', 3),
            ("pkg+x", '+', 3),
            ("ver\u{0}", '\u{0}', 3),
            ("caf\u{e9}s", '\u{e9}', 3),
            ("a\nb", '\n', 1),
            ("..\\evil", '\\', 2),
            ("*", '*', 0),
        ];
        for &(value, character, position) in cases {
            let err = validate_version_name(value).unwrap_err();
            assert_eq!(
                err,
                NameError::ForbiddenCharacter {
                    kind: NameKind::Version,
                    value: value.to_owned(),
                    character,
                    position
                }
            );
        }
    }

    #[test]
    fn character_set_is_checked_before_length() {
        let err = validate_package_name("a/").unwrap_err();
        assert!(matches!(
            err,
            NameError::ForbiddenCharacter { character: '/', .. }
        ));
    }

    #[test]
    fn display_says_what_is_wrong_with_which_value() {
        let err = validate_package_name("a/b").unwrap_err();
        assert_eq!(
            err.to_string(),
            "package name \"a/b\" contains '/' at character 1 (allowed: letters, digits, '_', '-', '.')"
        );
        let err = validate_package_name("ab").unwrap_err();
        assert_eq!(
            err.to_string(),
            "package name \"ab\" is 2 characters long (allowed: 3 to 128)"
        );
        let err = validate_version_name("").unwrap_err();
        assert_eq!(
            err.to_string(),
            "version name \"\" is 0 characters long (allowed: 1 to 128)"
        );
        let err = validate_version_name("1 0").unwrap_err();
        assert!(err.to_string().contains("contains a space"), "{err}");
    }

    #[test]
    fn display_escapes_terminal_control_characters_and_truncates() {
        let hostile = format!("\u{1b}[31mred\u{9b}{}", "x".repeat(500));
        let message = validate_version_name(&hostile).unwrap_err().to_string();
        assert!(!message.contains('\u{1b}'));
        assert!(!message.contains('\u{9b}'));
        assert!(message.contains("\\u{001b}[31mred\\u{009b}"), "{message}");
        assert!(message.contains('…'));
        assert!(message.len() < 250, "{message}");
        assert!(message.contains("U+001B"), "{message}");
    }

    #[test]
    fn quoting_escapes_quotes_and_backslashes() {
        assert_eq!(quote_for_message(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(
            quote_for_message(&"y".repeat(200)).chars().count(),
            MAX_SHOWN_VALUE_CHARS + 3
        );
    }

    #[test]
    fn file_names_must_be_one_plain_path_component() {
        for good in [
            "pkg.zip",
            "a",
            "amazon-2-x86_64.zip",
            "..zip",
            "caf\u{e9}.zip",
            "a b.zip",
        ] {
            validate_file_name(good).unwrap();
        }
        validate_file_name(&"f".repeat(MAX_FILE_NAME_BYTES)).unwrap();
        assert_eq!(validate_file_name(""), Err(FileNameError::Empty));
        assert!(matches!(
            validate_file_name(".."),
            Err(FileNameError::DirectoryAlias { .. })
        ));
        assert!(matches!(
            validate_file_name("."),
            Err(FileNameError::DirectoryAlias { .. })
        ));
        assert!(matches!(
            validate_file_name("../etc/passwd"),
            Err(FileNameError::ForbiddenCharacter {
                character: '/',
                position: 2,
                ..
            })
        ));
        assert!(matches!(
            validate_file_name("..\\win.zip"),
            Err(FileNameError::ForbiddenCharacter {
                character: '\\',
                ..
            })
        ));
        assert!(matches!(
            validate_file_name("a\u{0}.zip"),
            Err(FileNameError::ForbiddenCharacter {
                character: '\u{0}',
                ..
            })
        ));
        assert!(matches!(
            validate_file_name(&"f".repeat(MAX_FILE_NAME_BYTES + 1)),
            Err(FileNameError::TooLong { bytes: 256, .. })
        ));
        let message = validate_file_name("a/b.zip").unwrap_err().to_string();
        assert!(
            message.starts_with("file name \"a/b.zip\" contains '/'"),
            "{message}"
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_agrees_with_the_regex(value in "\\PC{0,140}|[a-zA-Z0-9_.-]{0,140}") {
            let by_rule = value.chars().all(is_name_char);
            let len = value.chars().count();
            proptest::prop_assert_eq!(
                validate_package_name(&value).is_ok(),
                by_rule && (3..=128).contains(&len)
            );
            proptest::prop_assert_eq!(
                validate_version_name(&value).is_ok(),
                by_rule && (1..=128).contains(&len)
            );
        }
    }
}
