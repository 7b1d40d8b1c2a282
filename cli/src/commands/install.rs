//! `pkgmesh install | uninstall | installed`: the local node's installs, through its admin
//! socket. `install` streams the download and each script step and ends with the result.

use std::process::ExitCode;

use anyhow::bail;
use clap::Args;
use pkgmesh_node::admin::UninstallOrder;
use pkgmesh_node::install::InstallRecord;
use pkgmesh_node::peer::agent::{InstallEvent, InstallOrder, InstallSummary};
use pkgmesh_protocol::deploy::parse_argument;
use pkgmesh_protocol::units::HumanBytes;

use super::local::NodeTarget;
use crate::mesh::runtime;
use crate::output::{print_json, print_table};

#[derive(Args)]
pub struct InstallArgs {
    /// Package name.
    name: String,
    /// Version to install; the default version when left out.
    #[arg(long)]
    version: Option<String>,
    /// Upgrade with the new version's `update` script instead of uninstall-and-reinstall.
    #[arg(long)]
    in_place: bool,
    /// An additional argument SSM_KEY=VALUE for the scripts (repeatable), passed as an
    /// environment variable.
    #[arg(long = "arg", value_name = "SSM_K=V")]
    args: Vec<String>,
    /// Seconds each script may run before its process group is killed (default 3600).
    #[arg(long, value_name = "SECS")]
    timeout: Option<u32>,
    #[command(flatten)]
    target: NodeTarget,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct UninstallArgs {
    /// Package name.
    name: String,
    #[command(flatten)]
    target: NodeTarget,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct InstalledArgs {
    #[command(flatten)]
    target: NodeTarget,
    #[arg(long)]
    json: bool,
}

pub fn run_install(args: InstallArgs) -> anyhow::Result<ExitCode> {
    let mut pairs = Vec::new();
    for arg in &args.args {
        pairs.push(parse_argument(arg).map_err(|e| crate::UsageError(e.to_string()))?);
    }
    let client = args.target.client()?;
    let order = InstallOrder {
        name: args.name.clone(),
        version: args.version.clone(),
        in_place: args.in_place,
        args: pairs,
        timeout_secs: args.timeout,
    };
    let json = args.json;
    let mut end: Option<Result<InstallSummary, String>> = None;
    let mut last_percent = None;
    runtime()?.block_on(
        client.post_lines("/v1/install", &order, |event: InstallEvent| {
            match event {
                InstallEvent::Resolved(package) if !json => {
                    eprintln!(
                        "{} {}: {} ({})",
                        package.name,
                        package.version,
                        package.file,
                        HumanBytes(package.size)
                    );
                }
                InstallEvent::Download(status) if !json && status.size > 0 => {
                    let percent = status.bytes_held() * 100 / status.size;
                    if last_percent != Some(percent / 25) {
                        last_percent = Some(percent / 25);
                        eprintln!(
                            "downloading: {percent}% ({} from peers, {} from the seed)",
                            HumanBytes(
                                status.bytes_from_local_peers + status.bytes_from_remote_peers
                            ),
                            HumanBytes(status.bytes_from_seed)
                        );
                    }
                }
                InstallEvent::Step { message } if !json => eprintln!("{message}"),
                InstallEvent::Done(summary) => end = Some(Ok(summary)),
                InstallEvent::Failed { message } => end = Some(Err(message)),
                _ => {}
            }
            Ok(())
        }),
    )?;
    let summary = match end {
        Some(Ok(summary)) => summary,
        Some(Err(message)) => bail!("{message}"),
        None => bail!("the node ended the install without a result"),
    };
    print_summary(&summary, json)?;
    Ok(if summary.succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_summary(summary: &InstallSummary, json: bool) -> anyhow::Result<()> {
    if json {
        print_json(summary)?;
    } else {
        println!(
            "{} {}: {}{}{}",
            summary.name,
            summary.version,
            summary.message,
            summary
                .exit_code
                .map(|c| format!(" (exit {c})"))
                .unwrap_or_default(),
            if summary.reboot_required {
                "; a reboot is required"
            } else {
                ""
            }
        );
        if !summary.succeeded && !summary.log_tail.is_empty() {
            println!("--- end of the script's output ---\n{}", summary.log_tail);
        }
    }
    Ok(())
}

pub fn run_uninstall(args: UninstallArgs) -> anyhow::Result<ExitCode> {
    let client = args.target.client()?;
    let summary: InstallSummary = runtime()?.block_on(client.post(
        "/v1/uninstall",
        &UninstallOrder {
            name: args.name.clone(),
        },
    ))?;
    print_summary(&summary, args.json)?;
    Ok(if summary.succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn run_installed(args: InstalledArgs) -> anyhow::Result<ExitCode> {
    let client = args.target.client()?;
    let records: Vec<InstallRecord> = runtime()?.block_on(client.get("/v1/installed"))?;
    if args.json {
        print_json(&records)?;
    } else if records.is_empty() {
        println!("nothing installed by pkgmesh on this node");
    } else {
        let rows: Vec<Vec<String>> = records
            .iter()
            .map(|r| {
                vec![
                    r.name.clone(),
                    r.installed_version.clone().unwrap_or_else(|| "-".into()),
                    r.state.to_string(),
                    r.previous_version.clone().unwrap_or_else(|| "-".into()),
                    r.last_exit_code
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "-".into()),
                    if r.reboot_required { "yes" } else { "no" }.into(),
                    crate::output::rfc3339(r.updated_at),
                ]
            })
            .collect();
        print_table(
            &[
                "PACKAGE", "VERSION", "STATE", "PREVIOUS", "EXIT", "REBOOT", "UPDATED",
            ],
            &rows,
        );
    }
    Ok(ExitCode::SUCCESS)
}
