//! `pkgmesh deploy create | list | status | cancel`: deployments on the seed (role deployer;
//! operators may read them).

use std::process::ExitCode;

use anyhow::bail;
use clap::{Args, Subcommand};
use pkgmesh_protocol::deploy::{
    parse_argument, DeploymentInfo, DeploymentSpec, InstallType, Limit, NodeDeployState, Schedule,
    Target, VersionSpec, DEFAULT_TIMEOUT_SECS,
};
use pkgmesh_protocol::wire::{Request, Response};

use crate::mesh::{runtime, SeedArgs};
use crate::output::{print_json, print_table, rfc3339};
use crate::UsageError;

#[derive(Subcommand)]
pub enum DeployCommand {
    /// Deploy a package version to the nodes matching the targets (role deployer).
    Create(CreateArgs),
    /// Every deployment, newest first, with counts per state.
    List(ListArgs),
    /// One deployment, node by node, with exit codes and the end of each script's output.
    Status(StatusArgs),
    /// Stop a deployment: nothing new starts; installs under way finish (role deployer).
    Cancel(StatusArgs),
}

#[derive(Args)]
pub struct CreateArgs {
    #[command(flatten)]
    seed: SeedArgs,
    /// Package name.
    #[arg(long)]
    package: String,
    /// A version, or `default` to follow the package's default version.
    #[arg(long, default_value = "default")]
    version: String,
    /// tag:KEY=VALUE, site:SITE or node:NAME (repeatable; a node matching any is targeted).
    #[arg(long = "target", value_name = "TARGET", required = true)]
    targets: Vec<String>,
    /// once, every:DURATION (e.g. every:6h) or on-default-change. Default: on-default-change
    /// when following the default version, once otherwise.
    #[arg(long)]
    schedule: Option<String>,
    /// Installs at once: a number of nodes or a percentage of those targeted.
    #[arg(long, default_value = "50%")]
    max_concurrency: String,
    /// Failures tolerated before the rollout stops (SSM semantics: N allows N, the next one
    /// stops it): a number or a percentage.
    #[arg(long, default_value = "0")]
    max_errors: String,
    /// An additional argument SSM_KEY=VALUE for the scripts (repeatable).
    #[arg(long = "arg", value_name = "SSM_K=V")]
    args: Vec<String>,
    /// Upgrade with the `update` script instead of uninstall-and-reinstall.
    #[arg(long)]
    in_place: bool,
    /// Seconds each script may run (default 3600).
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_TIMEOUT_SECS)]
    timeout: u32,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    seed: SeedArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    seed: SeedArgs,
    /// Deployment id (from `deploy create` or `deploy list`).
    id: u64,
    #[arg(long)]
    json: bool,
}

pub fn run(command: DeployCommand) -> anyhow::Result<ExitCode> {
    match command {
        DeployCommand::Create(args) => create(args),
        DeployCommand::List(args) => {
            let json = args.json;
            match call(&args.seed, Request::ListDeployments)? {
                Response::Deployments(list) => {
                    if json {
                        print_json(&serde_json::json!({ "deployments": list }))?;
                    } else {
                        print_list(&list);
                    }
                    Ok(ExitCode::SUCCESS)
                }
                other => bail!("the seed answered with {other:?}"),
            }
        }
        DeployCommand::Status(args) => show(
            &args.seed,
            Request::GetDeployment { id: args.id },
            args.json,
        ),
        DeployCommand::Cancel(args) => show(
            &args.seed,
            Request::CancelDeployment { id: args.id },
            args.json,
        ),
    }
}

fn usage<E: std::fmt::Display>(e: E) -> anyhow::Error {
    UsageError(e.to_string()).into()
}

fn create(args: CreateArgs) -> anyhow::Result<ExitCode> {
    let version = match args.version.as_str() {
        "default" => VersionSpec::Default,
        v => VersionSpec::Exact(v.to_string()),
    };
    let schedule = match &args.schedule {
        Some(text) => Schedule::parse(text).map_err(usage)?,
        None if version == VersionSpec::Default => Schedule::OnDefaultChange,
        None => Schedule::Once,
    };
    let spec = DeploymentSpec {
        package: args.package.clone(),
        version,
        targets: args
            .targets
            .iter()
            .map(|t| Target::parse(t))
            .collect::<Result<_, _>>()
            .map_err(usage)?,
        schedule,
        max_concurrency: Limit::parse(&args.max_concurrency).map_err(usage)?,
        max_errors: Limit::parse(&args.max_errors).map_err(usage)?,
        args: args
            .args
            .iter()
            .map(|a| parse_argument(a))
            .collect::<Result<_, _>>()
            .map_err(usage)?,
        install_type: if args.in_place {
            InstallType::InPlace
        } else {
            InstallType::UninstallAndReinstall
        },
        timeout_secs: args.timeout,
    };
    spec.check().map_err(usage)?;
    show(&args.seed, Request::CreateDeployment(spec), args.json)
}

fn call(seed: &SeedArgs, request: Request) -> anyhow::Result<Response> {
    runtime()?.block_on(async {
        let client = seed.connect().await?;
        let response = client.call(&request).await;
        client.close().await;
        response
    })
}

fn show(seed: &SeedArgs, request: Request, json: bool) -> anyhow::Result<ExitCode> {
    let Response::Deployment(info) = call(seed, request)? else {
        bail!("the seed answered with something other than a deployment");
    };
    if json {
        print_json(&info)?;
        return Ok(ExitCode::SUCCESS);
    }
    let spec = &info.spec;
    println!(
        "deployment {}: {} {} -> {} ({}, {}), created by {} at {}",
        info.id,
        spec.package,
        info.version.as_deref().unwrap_or(&spec.version.to_string()),
        spec.targets
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        spec.schedule,
        info.state,
        info.created_by,
        rfc3339(info.created_at),
    );
    println!(
        "max concurrency {}, max errors {}, run {}, {} nodes targeted{}",
        spec.max_concurrency,
        spec.max_errors,
        info.run,
        info.targeted.len(),
        info.reason
            .as_ref()
            .map(|r| format!("; {r}"))
            .unwrap_or_default()
    );
    let mut rows: Vec<Vec<String>> = info
        .targeted
        .iter()
        .filter(|node| !info.nodes.contains_key(*node))
        .map(|node| {
            vec![
                node.clone(),
                "waiting".into(),
                "-".into(),
                "-".into(),
                String::new(),
            ]
        })
        .collect();
    for status in info.nodes.values() {
        let last_line = status
            .log_tail
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .chars()
            .take(60)
            .collect::<String>();
        rows.push(vec![
            status.node.clone(),
            status.state.to_string(),
            status.version.clone(),
            status
                .exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            if status.message.is_empty() {
                last_line
            } else {
                status.message.chars().take(80).collect()
            },
        ]);
    }
    rows.sort();
    if !rows.is_empty() {
        print_table(&["NODE", "STATE", "VERSION", "EXIT", "DETAIL"], &rows);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_list(list: &[DeploymentInfo]) {
    if list.is_empty() {
        println!("no deployments (create one with `pkgmesh deploy create`)");
        return;
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|d| {
            let in_progress = d.nodes.values().filter(|s| s.state.in_progress()).count();
            vec![
                d.id.to_string(),
                d.spec.package.clone(),
                d.version
                    .clone()
                    .unwrap_or_else(|| d.spec.version.to_string()),
                d.state.to_string(),
                d.targeted.len().to_string(),
                in_progress.to_string(),
                d.count(NodeDeployState::Succeeded).to_string(),
                d.count(NodeDeployState::Failed).to_string(),
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "PACKAGE",
            "VERSION",
            "STATE",
            "TARGETED",
            "RUNNING",
            "SUCCEEDED",
            "FAILED",
        ],
        &rows,
    );
}
