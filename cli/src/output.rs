//! Printing: one JSON object on stdout for `--json`, aligned tables for people.

use serde::Serialize;

/// Prints `value` as one JSON object on one line of stdout; a failed write is an error, not a
/// panic.
pub fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(value)?)
        .and_then(|()| out.flush())
        .context("cannot write to standard output")
}

/// A daemon's ready line: JSON for `--json`, else `text`. Whoever started the daemon may have
/// stopped reading; the daemon runs on and says so in its log instead of failing.
pub fn print_ready_line(json: bool, value: &serde_json::Value, text: &str) {
    use std::io::Write;
    let line = if json {
        value.to_string()
    } else {
        text.to_string()
    };
    let mut out = std::io::stdout().lock();
    if let Err(error) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        tracing::warn!(%error, "cannot print the ready line on standard output; running on");
    }
}

/// Prints rows as left-aligned columns under a header.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  "));
            }
        }
        println!("{}", text.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// One platform → file line of a manifest, as `manifest check` and `package show` print it.
#[derive(Serialize)]
pub struct PlatformRow {
    pub platform: String,
    pub version: String,
    pub arch: String,
    pub file: String,
}

pub fn platform_rows(manifest: &pkgmesh_protocol::manifest::Manifest) -> Vec<PlatformRow> {
    manifest
        .platforms()
        .into_iter()
        .map(|(platform, version, arch, file)| PlatformRow {
            platform,
            version,
            arch,
            file,
        })
        .collect()
}

pub fn print_platforms(rows: &[PlatformRow]) {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|p| {
            vec![
                p.platform.clone(),
                p.version.clone(),
                p.arch.clone(),
                p.file.clone(),
            ]
        })
        .collect();
    print_table(&["PLATFORM", "VERSION", "ARCH", "FILE"], &rows);
}

/// Unix seconds as RFC 3339 in UTC (`2026-11-26T10:00:00Z`), for tables.
pub fn rfc3339(unix_secs: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_secs.min(i64::MAX as u64) as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix_secs.to_string())
}
