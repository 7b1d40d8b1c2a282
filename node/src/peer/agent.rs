//! The node's installs: fetching a package version through the swarm and handing its verified
//! ZIP to the installer, for a local `pkgmesh install` and for the seed's deployments, whose
//! desired state this node long-polls and whose results it reports.
//!
//! Owns: the path from (package, version) to an install outcome, the desired-state loop with
//! its jitter, and reports that survive a seed outage (kept and sent again). Does not own: the
//! install semantics ([`crate::install`]) or the rollout ([`crate::seed::deployments`]).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use pkgmesh_protocol::deploy::{
    Assignment, InstallReport, InstallType as DeployInstallType, NodeDeployState, MAX_LOG_TAIL,
};
use pkgmesh_protocol::wire::{Request, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::fetch::start_fetch;
use super::package::{copy_verified, node_platform, resolve_package, PackageFile};
use super::transfers::{TransferState, TransferStatus};
use super::NodeState;
use crate::install::runner::read_log_tail;
use crate::install::{
    InstallOutcome, InstallRequest, InstallType, Installer, OutcomeStatus, Progress, ScriptArgs,
};

/// Longest a desired-state request waits at the seed.
const DESIRED_WAIT_SECS: u32 = 20;
/// Most random delay before acting on a change, so a fleet does not act in one instant.
const CHANGE_JITTER_MS: u64 = 800;
/// Pause after the seed could not be reached.
const SEED_RETRY: Duration = Duration::from_secs(2);

/// What a local install shows while it runs (one JSON line each on the admin API).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum InstallEvent {
    Resolved(PackageFile),
    Download(TransferStatus),
    /// A step of the installer: extracting, running a script, rolling back.
    Step {
        message: String,
    },
    Done(InstallSummary),
    Failed {
        message: String,
    },
}

/// How an install or uninstall ended, as the CLI and the seed see it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstallSummary {
    pub name: String,
    pub version: String,
    /// `installed`, `already_installed`, `uninstalled`, `rolled_back`, `rollback_failed`,
    /// `failed`.
    pub status: String,
    pub succeeded: bool,
    pub installed_version: Option<String>,
    pub exit_code: Option<i32>,
    pub reboot_required: bool,
    pub message: String,
    /// The end of the deciding script's output.
    pub log_tail: String,
}

fn status_name(status: OutcomeStatus) -> &'static str {
    match status {
        OutcomeStatus::Installed => "installed",
        OutcomeStatus::AlreadyInstalled => "already_installed",
        OutcomeStatus::Uninstalled => "uninstalled",
        OutcomeStatus::RolledBack => "rolled_back",
        OutcomeStatus::RollbackFailed => "rollback_failed",
        OutcomeStatus::Failed => "failed",
    }
}

/// A one-line account of an outcome.
fn describe(outcome: &InstallOutcome) -> String {
    let base = match outcome.status {
        OutcomeStatus::Installed => format!("installed {}", outcome.version),
        OutcomeStatus::AlreadyInstalled => format!("{} was already installed", outcome.version),
        OutcomeStatus::Uninstalled => format!("uninstalled {}", outcome.version),
        OutcomeStatus::RolledBack => format!(
            "failed{}; rolled back to {}",
            outcome
                .failed_action
                .map(|a| format!(" in {a}"))
                .unwrap_or_default(),
            outcome.installed_version.as_deref().unwrap_or("nothing")
        ),
        OutcomeStatus::RollbackFailed => "failed, and the rollback failed too".to_string(),
        OutcomeStatus::Failed => format!(
            "failed{}",
            outcome
                .failed_action
                .map(|a| format!(" in {a}"))
                .unwrap_or_default()
        ),
    };
    match &outcome.message {
        Some(message) if !message.is_empty() => format!("{base}: {message}"),
        _ => base,
    }
}

pub fn summarize(installer: &Installer, outcome: &InstallOutcome) -> InstallSummary {
    let log_tail = installer
        .record(&outcome.name)
        .ok()
        .flatten()
        .and_then(|record| record.log_path)
        .and_then(|log| read_log_tail(&log, MAX_LOG_TAIL as u64).ok())
        .unwrap_or_default();
    InstallSummary {
        name: outcome.name.clone(),
        version: outcome.version.clone(),
        status: status_name(outcome.status).into(),
        succeeded: outcome.succeeded(),
        installed_version: outcome.installed_version.clone(),
        exit_code: outcome.exit_code,
        reboot_required: outcome.reboot_required,
        message: describe(outcome),
        log_tail,
    }
}

fn step_message(progress: &Progress) -> String {
    match progress {
        Progress::Extracting { name, version } => format!("extracting {name} {version}"),
        Progress::Running {
            action, version, ..
        } => format!("running {action} of {version}"),
        Progress::Finished {
            action,
            version,
            status,
        } => format!("{action} of {version}: {status:?}"),
        Progress::RollingBack {
            version, reason, ..
        } => format!("rolling back {version}: {reason}"),
    }
}

/// What to install.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstallOrder {
    pub name: String,
    /// `None`: the default version.
    pub version: Option<String>,
    #[serde(default)]
    pub in_place: bool,
    #[serde(default)]
    pub args: Vec<(String, String)>,
    pub timeout_secs: Option<u32>,
}

/// Fetches the version's ZIP for this node's platform through the swarm, checks it against the
/// manifest, and installs it. `on_event` sees every step.
pub async fn fetch_and_install(
    state: &Arc<NodeState>,
    order: InstallOrder,
    mut on_event: impl FnMut(InstallEvent) + Send,
) -> anyhow::Result<InstallSummary> {
    let installer = state.installer()?;
    let args = ScriptArgs::new(order.args.iter().cloned())?;
    let platform = node_platform(state)?;
    let package = resolve_package(state, &order.name, order.version.as_deref(), &platform).await?;
    on_event(InstallEvent::Resolved(package.clone()));
    let expected = package.file_blob()?;
    let blob = expected.blob;
    let mut progress = start_fetch(state.clone(), expected.blob, expected.size);
    let report = loop {
        let status = progress.borrow_and_update().clone();
        match status.state {
            TransferState::Done => break status,
            TransferState::Failed => {
                bail!(status.error.unwrap_or_else(|| "the download failed".into()))
            }
            TransferState::Running => on_event(InstallEvent::Download(status)),
        }
        if let Ok(Err(_)) = tokio::time::timeout(Duration::from_secs(1), progress.changed()).await {
            let last = progress.borrow().clone();
            if last.state == TransferState::Done {
                break last;
            }
            bail!(last.error.unwrap_or_else(|| "the download stopped".into()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    on_event(InstallEvent::Download(report));
    let zips = state.settings.data.join("zips");
    tokio::fs::create_dir_all(&zips)
        .await
        .with_context(|| format!("cannot create {}", zips.display()))?;
    let zip = zips.join(format!(
        "{}-{}-{}.zip",
        package.name,
        package.version,
        rand::random::<u32>()
    ));
    let cache = state.cache.clone();
    let out = zip.clone();
    tokio::task::spawn_blocking(move || copy_verified(&cache, &expected, &out)).await??;
    let request = InstallRequest {
        name: package.name.clone(),
        version: package.version.clone(),
        zip: zip.clone(),
        install_type: if order.in_place {
            InstallType::InPlace
        } else {
            InstallType::UninstallAndReinstall
        },
        args,
        timeout: order
            .timeout_secs
            .map(|secs| Duration::from_secs(secs as u64)),
    };
    let (steps, mut step_events) = tokio::sync::mpsc::unbounded_channel();
    let installing = installer.install(request, move |p| {
        let _ = steps.send(step_message(&p));
    });
    tokio::pin!(installing);
    let outcome = loop {
        tokio::select! {
            outcome = &mut installing => break outcome,
            Some(message) = step_events.recv() => on_event(InstallEvent::Step { message }),
        }
    };
    while let Ok(message) = step_events.try_recv() {
        on_event(InstallEvent::Step { message });
    }
    let _ = tokio::fs::remove_file(&zip).await;
    let outcome = outcome?;
    // A preheat pin kept the package for this install; it has done its job.
    let cache = state.cache.clone();
    let _ =
        tokio::task::spawn_blocking(move || cache.unpin(&blob, crate::admin::PREHEAT_PIN)).await;
    Ok(summarize(&installer, &outcome))
}

/// Long-polls the seed for this node's assignments and carries them out, one task per
/// assignment; reports every step, keeping reports the seed could not take for later.
pub async fn desired_state_loop(state: Arc<NodeState>) {
    let running: Arc<Mutex<HashSet<(u64, u64)>>> = Arc::default();
    let unsent: Arc<Mutex<BTreeMap<(u64, u64), InstallReport>>> = Arc::default();
    let mut generation = 0u64;
    loop {
        flush_reports(&state, &unsent).await;
        let answer = async {
            let seed = state.seed().await?;
            let request = Request::GetDesiredState {
                generation,
                wait_secs: DESIRED_WAIT_SECS,
            };
            match seed.call(&request).await? {
                Response::DesiredState(desired) => Ok(desired),
                other => Err(anyhow!("the seed answered GetDesiredState with {other:?}")),
            }
        }
        .await;
        let desired = match answer {
            Ok(desired) => desired,
            Err(error) => {
                tracing::debug!(%error, "no desired state from the seed");
                tokio::time::sleep(SEED_RETRY).await;
                continue;
            }
        };
        let changed = desired.generation != generation;
        generation = desired.generation;
        if changed && !desired.assignments.is_empty() {
            tokio::time::sleep(Duration::from_millis(rand::random_range(
                0..=CHANGE_JITTER_MS,
            )))
            .await;
        }
        for assignment in desired.assignments {
            let key = (assignment.deployment, assignment.run);
            if !running.lock().await.insert(key) {
                continue;
            }
            let (state, running, unsent) = (state.clone(), running.clone(), unsent.clone());
            tokio::spawn(async move {
                carry_out(&state, assignment, &unsent).await;
                flush_reports(&state, &unsent).await;
                running.lock().await.remove(&key);
            });
        }
    }
}

async fn carry_out(
    state: &Arc<NodeState>,
    assignment: Assignment,
    unsent: &Mutex<BTreeMap<(u64, u64), InstallReport>>,
) {
    let report =
        |state: NodeDeployState, summary: Option<&InstallSummary>, message: String| InstallReport {
            deployment: assignment.deployment,
            run: assignment.run,
            version: assignment.version.clone(),
            state,
            exit_code: summary.and_then(|s| s.exit_code),
            reboot_required: summary.is_some_and(|s| s.reboot_required),
            message,
            log_tail: summary.map(|s| s.log_tail.clone()).unwrap_or_default(),
        };
    let key = (assignment.deployment, assignment.run);
    let first = report(NodeDeployState::Downloading, None, String::new());
    send_report(state, first, unsent).await;
    let order = InstallOrder {
        name: assignment.package.clone(),
        version: Some(assignment.version.clone()),
        in_place: assignment.install_type == DeployInstallType::InPlace,
        args: assignment.args.clone(),
        timeout_secs: Some(assignment.timeout_secs),
    };
    let mut installing_sent = false;
    let (steps, mut step_events) = tokio::sync::mpsc::unbounded_channel::<()>();
    let work = fetch_and_install(state, order, move |event| {
        if matches!(event, InstallEvent::Step { .. }) {
            let _ = steps.send(());
        }
    });
    tokio::pin!(work);
    let outcome = loop {
        tokio::select! {
            outcome = &mut work => break outcome,
            Some(()) = step_events.recv(), if !installing_sent => {
                installing_sent = true;
                let next = report(NodeDeployState::Installing, None, String::new());
                send_report(state, next, unsent).await;
            }
        }
    };
    let last = match outcome {
        Ok(summary) => report(
            if summary.succeeded {
                NodeDeployState::Succeeded
            } else {
                NodeDeployState::Failed
            },
            Some(&summary),
            summary.message.clone(),
        ),
        Err(error) => report(NodeDeployState::Failed, None, format!("{error:#}")),
    };
    tracing::info!(
        deployment = key.0,
        run = key.1,
        package = assignment.package,
        version = assignment.version,
        state = %last.state,
        message = last.message,
        "assignment finished"
    );
    send_report(state, last, unsent).await;
}

/// Sends a report, or keeps it (replacing an older one of the same assignment) for later.
async fn send_report(
    state: &NodeState,
    report: InstallReport,
    unsent: &Mutex<BTreeMap<(u64, u64), InstallReport>>,
) {
    let key = (report.deployment, report.run);
    if let Err(error) = deliver(state, &report).await {
        tracing::info!(%error, "install report kept until the seed is back");
        unsent.lock().await.insert(key, report);
    } else {
        unsent.lock().await.remove(&key);
    }
}

async fn flush_reports(state: &NodeState, unsent: &Mutex<BTreeMap<(u64, u64), InstallReport>>) {
    let pending: Vec<InstallReport> = unsent.lock().await.values().cloned().collect();
    for report in pending {
        if deliver(state, &report).await.is_ok() {
            let key = (report.deployment, report.run);
            let mut unsent = unsent.lock().await;
            if unsent.get(&key) == Some(&report) {
                unsent.remove(&key);
            }
        } else {
            return;
        }
    }
}

async fn deliver(state: &NodeState, report: &InstallReport) -> anyhow::Result<()> {
    let seed = state.seed().await?;
    match seed.call(&Request::ReportInstall(report.clone())).await? {
        Response::Done { .. } => Ok(()),
        other => Err(anyhow!("the seed answered a report with {other:?}")),
    }
}
