//! `pkgmesh platform`: what this machine reports to Distributor's platform selection.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use pkgmesh_protocol::platform::{detect_platform, detect_platform_from, local_arch};
use pkgmesh_protocol::select::Platform;

use crate::output::print_json;

/// Where the platform comes from: the os-release file, with any part overridden by a flag.
#[derive(Args, Clone, Default)]
pub struct PlatformSource {
    /// Read this os-release file instead of /etc/os-release (then /usr/lib/os-release).
    #[arg(long, value_name = "PATH")]
    os_release: Option<PathBuf>,
    /// Platform name to use instead of the detected one (e.g. amazon, ubuntu, windows).
    #[arg(long, value_name = "NAME")]
    platform: Option<String>,
    /// Platform version to use instead of the detected one (e.g. 2023, 22.04, 10.0.14393nano).
    #[arg(long, value_name = "VERSION")]
    platform_version: Option<String>,
    /// Architecture to use instead of this binary's (x86_64, arm64, 386).
    #[arg(long, value_name = "ARCH")]
    arch: Option<String>,
}

impl PlatformSource {
    /// Fills what no flag gave from a config file's values.
    pub fn or_config(
        mut self,
        platform: Option<String>,
        platform_version: Option<String>,
        arch: Option<String>,
    ) -> Self {
        self.platform = self.platform.or(platform);
        self.platform_version = self.platform_version.or(platform_version);
        self.arch = self.arch.or(arch);
        self
    }

    /// Whether anything was given, so that there is something to resolve now rather than
    /// detecting later.
    pub fn is_given(&self) -> bool {
        self.os_release.is_some()
            || self.platform.is_some()
            || self.platform_version.is_some()
            || self.arch.is_some()
    }

    /// Detection runs only when a flag leaves something open, so a fully specified platform
    /// works on machines with no os-release at all.
    pub fn resolve(&self) -> anyhow::Result<Platform> {
        let arch = self
            .arch
            .clone()
            .unwrap_or_else(|| local_arch().to_string());
        let (name, version) = match (&self.platform, &self.platform_version) {
            (Some(name), Some(version)) => (name.clone(), version.clone()),
            _ => {
                let detected = match &self.os_release {
                    Some(path) => detect_platform_from(&[Path::new(path)], &arch),
                    None => detect_platform(),
                }
                .context("cannot detect the platform (give --platform and --platform-version)")?;
                (
                    self.platform.clone().unwrap_or(detected.name),
                    self.platform_version.clone().unwrap_or(detected.version),
                )
            }
        };
        Ok(Platform {
            name,
            version,
            arch,
        })
    }
}

#[derive(Args)]
pub struct PlatformArgs {
    #[command(flatten)]
    source: PlatformSource,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: PlatformArgs) -> anyhow::Result<ExitCode> {
    let platform = args.source.resolve()?;
    if args.json {
        print_json(&platform)?;
    } else {
        println!("platform      {}", platform.name);
        println!("version       {}", platform.version);
        println!("architecture  {}", platform.arch);
    }
    Ok(ExitCode::SUCCESS)
}
