//! Sizes and rates as people write them on command lines and in config files.
//!
//! A size is a number with an optional unit: `4096`, `64KiB`, `8MiB`, `2GiB`, `1TiB` (powers of
//! 1024) or `64KB`, `8MB`, `2GB` (powers of 1000); `k`/`K`, `M`, `G`, `T` alone mean the binary
//! units. A rate is a size per second (`4MiB` means 4 MiB/s) or a bit rate (`32Mbit`, `1Gbit`,
//! `500kbit`, powers of 1000 as networks count). Owns: parsing and printing. Does not own:
//! enforcing a rate (the node's token buckets do).

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {text:?} is not valid: {reason} (examples: {examples})")]
pub struct UnitError {
    what: &'static str,
    text: String,
    reason: String,
    examples: &'static str,
}

const SIZE_EXAMPLES: &str = "4096, 64KiB, 8MiB, 2GiB, 500MB";
const RATE_EXAMPLES: &str = "4MiB (per second), 32Mbit, 1Gbit, 0 for unlimited";

fn split_number(text: &str) -> (&str, &str) {
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    (&text[..end], text[end..].trim())
}

fn scaled(number: &str, multiplier: f64) -> Option<u64> {
    if number.is_empty() || number.matches('.').count() > 1 {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    let bytes = (value * multiplier).round();
    (bytes.is_finite() && bytes >= 0.0 && bytes <= u64::MAX as f64).then_some(bytes as u64)
}

/// Parses a size in bytes.
pub fn parse_size(text: &str) -> Result<u64, UnitError> {
    let error = |reason: &str| UnitError {
        what: "size",
        text: text.chars().take(40).collect(),
        reason: reason.into(),
        examples: SIZE_EXAMPLES,
    };
    let (number, unit) = split_number(text.trim());
    let multiplier = match unit {
        "" | "B" | "b" => 1.0,
        "k" | "K" | "KiB" | "kiB" => 1024.0,
        "M" | "MiB" => 1024.0 * 1024.0,
        "G" | "GiB" => 1024.0 * 1024.0 * 1024.0,
        "T" | "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        other => return Err(error(&format!("unknown unit {other:?}"))),
    };
    scaled(number, multiplier).ok_or_else(|| error("not a non-negative number"))
}

/// Parses a rate in bytes per second; `0` means unlimited to the callers that allow it.
pub fn parse_rate(text: &str) -> Result<u64, UnitError> {
    let trimmed = text.trim();
    let (number, unit) = split_number(trimmed);
    let unit = unit.strip_suffix("/s").unwrap_or(unit);
    let bits = match unit {
        "bit" | "bps" => Some(1.0),
        "kbit" | "Kbit" | "kbps" => Some(1e3),
        "Mbit" | "mbit" | "Mbps" => Some(1e6),
        "Gbit" | "gbit" | "Gbps" => Some(1e9),
        _ => None,
    };
    match bits {
        Some(multiplier) => scaled(number, multiplier / 8.0).ok_or_else(|| UnitError {
            what: "rate",
            text: trimmed.chars().take(40).collect(),
            reason: "not a non-negative number".into(),
            examples: RATE_EXAMPLES,
        }),
        None => parse_size(&format!("{number}{unit}")).map_err(|e| UnitError {
            what: "rate",
            examples: RATE_EXAMPLES,
            text: trimmed.chars().take(40).collect(),
            ..e
        }),
    }
}

/// A size for people: `1536` → `1.5 KiB`.
pub struct HumanBytes(pub u64);

impl fmt::Display for HumanBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
        let mut value = self.0 as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        if unit == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{value:.1} {}", UNITS[unit])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_and_decimal_units() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("8MiB").unwrap(), 8 << 20);
        assert_eq!(parse_size("8M").unwrap(), 8 << 20);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size(" 2 GiB ").unwrap(), 2 << 30);
        for bad in ["", "MiB", "-1MiB", "1.2.3", "12 parsecs", "1e9"] {
            let error = parse_size(bad).unwrap_err().to_string();
            assert!(error.contains("size"), "{bad}: {error}");
        }
    }

    #[test]
    fn rates_parse_as_bytes_per_second() {
        assert_eq!(parse_rate("4MiB").unwrap(), 4 << 20);
        assert_eq!(parse_rate("4MiB/s").unwrap(), 4 << 20);
        assert_eq!(parse_rate("32Mbit").unwrap(), 4_000_000);
        assert_eq!(parse_rate("1Gbit").unwrap(), 125_000_000);
        assert_eq!(parse_rate("0").unwrap(), 0);
        let error = parse_rate("fast").unwrap_err().to_string();
        assert!(error.contains("rate") && error.contains("Mbit"), "{error}");
    }

    #[test]
    fn human_bytes_reads_naturally() {
        assert_eq!(HumanBytes(512).to_string(), "512 B");
        assert_eq!(HumanBytes(1536).to_string(), "1.5 KiB");
        assert_eq!(HumanBytes(3 << 30).to_string(), "3.0 GiB");
    }
}
