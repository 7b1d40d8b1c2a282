//! Daemon configuration files (TOML). Every key is optional in the file; command-line flags
//! override the file; what neither gives falls back to the defaults here. Unknown keys are an
//! error naming the key, so a typo never silently leaves a setting at its default.
//!
//! Owns: the file formats, their limits and parsing into typed settings. Does not own: flags
//! (the CLI merges them) or what the settings do.

use std::path::{Path, PathBuf};

use pkgmesh_protocol::units::{parse_rate, parse_size};
use serde::Deserialize;

use crate::origin::OriginOptions;

/// Largest config file read: a config is a few hundred bytes.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is {size} bytes, over the {MAX_CONFIG_BYTES}-byte limit")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("config file {path} is not valid: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// `pkgmesh seed --config FILE`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedFile {
    pub listen: Option<String>,
    pub data: Option<PathBuf>,
    pub identity: Option<PathBuf>,
    /// A CRL file to enforce in addition to the identity directory's `crl.pem`.
    pub crl: Option<PathBuf>,
    /// `file:///dir`, `s3://bucket/prefix` or `https://host/prefix`; default `<data>/origin`.
    pub origin: Option<String>,
    /// Endpoint, region, credentials and limits of the origin store.
    #[serde(default)]
    pub origin_settings: OriginOptions,
    /// Size of the seed's chunk cache, e.g. `8GiB`.
    pub cache_budget: Option<String>,
    /// Largest ZIP accepted by publish, e.g. `16GiB`.
    pub max_upload: Option<String>,
    /// Seconds a chunk the seed served counts as "soon held" by its receiver.
    pub admission_window_secs: Option<u64>,
    /// Most concurrent requests to the origin store.
    pub origin_concurrency: Option<usize>,
    /// Cap on chunk bytes the seed sends per second, e.g. `200Mbit`; unset or 0: none.
    pub upload_limit: Option<String>,
    /// Per-site settings, e.g. `[sites.store-042] wan_fetchers = 2`.
    #[serde(default)]
    pub sites: std::collections::BTreeMap<String, SiteFile>,
}

/// `[sites.NAME]` in the seed's config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteFile {
    /// How many of the site's nodes fetch each blob across its WAN link (from the seed or other
    /// sites); the rest take it from them. Unset: no limit.
    pub wan_fetchers: Option<usize>,
}

/// `pkgmesh node --config FILE`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    pub listen: Option<String>,
    pub seed: Option<String>,
    pub data: Option<PathBuf>,
    pub identity: Option<PathBuf>,
    pub crl: Option<PathBuf>,
    pub site: Option<String>,
    #[serde(default)]
    pub tags: std::collections::BTreeMap<String, String>,
    pub cache_budget: Option<String>,
    pub upload_limit: Option<String>,
    pub download_limit: Option<String>,
    /// Most chunk uploads to peers at once.
    pub max_uploads: Option<usize>,
    /// Overrides of the detected platform (tests and unusual images need them).
    pub platform: Option<String>,
    pub platform_version: Option<String>,
    pub arch: Option<String>,
}

/// Reads and parses a TOML config file.
pub fn load<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ConfigError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge {
            path: path.to_path_buf(),
            size: text.len() as u64,
        });
    }
    parse(&text).map_err(|message| ConfigError::Invalid {
        path: path.to_path_buf(),
        message,
    })
}

/// Parses TOML text; the error says where and what.
pub fn parse<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T, String> {
    toml::from_str(text).map_err(|e| e.to_string().trim().to_string())
}

/// A size setting: the flag wins over the file; `what` names it in errors.
pub fn size_setting(
    what: &str,
    flag: Option<&str>,
    file: Option<&str>,
    default: u64,
) -> Result<u64, String> {
    match flag.or(file) {
        Some(text) => parse_size(text).map_err(|e| format!("{what}: {e}")),
        None => Ok(default),
    }
}

/// A rate setting (bytes per second, 0 for unlimited): the flag wins over the file.
pub fn rate_setting(what: &str, flag: Option<&str>, file: Option<&str>) -> Result<u64, String> {
    match flag.or(file) {
        Some(text) => parse_rate(text).map_err(|e| format!("{what}: {e}")),
        None => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_file_parses_and_unknown_keys_are_named() {
        let file: SeedFile = parse(
            r#"
            listen = "0.0.0.0:7400"
            data = "/var/lib/pkgmesh-seed"
            origin = "s3://packages/prod"
            cache_budget = "8GiB"
            [origin_settings]
            s3_endpoint = "http://127.0.0.1:9000"
            s3_region = "us-east-1"
            allow_http = true
            "#,
        )
        .unwrap();
        assert_eq!(file.origin.as_deref(), Some("s3://packages/prod"));
        assert!(file.origin_settings.allow_http);
        let error = parse::<SeedFile>("[origin_settings]\nendpiont = \"x\"").unwrap_err();
        assert!(error.contains("endpiont"), "{error}");
        assert_eq!(
            size_setting("cache budget", None, file.cache_budget.as_deref(), 0).unwrap(),
            8 << 30
        );
        let error = parse::<SeedFile>("listne = \"x\"").unwrap_err();
        assert!(error.contains("listne"), "{error}");
        let error = parse::<NodeFile>("site = 3").unwrap_err();
        assert!(error.contains("site"), "{error}");
    }

    #[test]
    fn flags_override_files_and_bad_units_are_explained() {
        assert_eq!(
            size_setting("cache budget", Some("1GiB"), Some("8GiB"), 0).unwrap(),
            1 << 30
        );
        let error = rate_setting("upload limit", None, Some("fast")).unwrap_err();
        assert!(error.contains("upload limit"), "{error}");
        assert_eq!(rate_setting("x", Some("32Mbit"), None).unwrap(), 4_000_000);
    }

    #[test]
    fn the_example_configs_parse_with_every_setting_they_show() {
        let seed: SeedFile = parse(include_str!("../../examples/seed.toml")).unwrap();
        assert_eq!(seed.listen.as_deref(), Some("0.0.0.0:7400"));
        assert_eq!(seed.origin_settings.max_in_flight, Some(16));
        let node: NodeFile = parse(include_str!("../../examples/node.toml")).unwrap();
        assert_eq!(node.site.as_deref(), Some("eu-west-1a"));
        assert_eq!(node.max_uploads, Some(16));
        assert_eq!(node.tags.get("role").map(String::as_str), Some("web"));
        assert_eq!(
            rate_setting("upload limit", None, node.upload_limit.as_deref()).unwrap(),
            25_000_000
        );
        let capped: SeedFile = parse("upload_limit = \"32Mbit\"").unwrap();
        assert_eq!(
            rate_setting("upload limit", None, capped.upload_limit.as_deref()).unwrap(),
            4_000_000
        );
        let error = rate_setting("upload limit", Some("fast"), None).unwrap_err();
        assert!(error.contains("upload limit"), "{error}");
        let sites: SeedFile = parse("[sites.edge]\nwan_fetchers = 2").unwrap();
        assert_eq!(sites.sites["edge"].wan_fetchers, Some(2));
        assert!(parse::<SeedFile>("[sites.edge]\nfetchers = 2").is_err());
    }
}
