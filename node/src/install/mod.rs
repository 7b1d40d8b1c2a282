//! The node's local installer: takes a package ZIP that was already verified and installs it
//! the way the SSM Agent's AWS-ConfigureAWSPackage does.
//!
//! Owns: extracting into a fresh staging folder and moving it into
//! `<data>/packages/<name>/<version>/` (`layout`), running the package scripts ([`runner`]),
//! the order of actions for both install types, rollback, the "already installed" check, the
//! one-action-per-package lock (`lock`), the install records ([`state`]) and bringing a
//! package whose action was interrupted by a restart back to a known state ([`Installer::recover`]).
//!
//! Does not own: fetching or verifying the ZIP (its SHA-256 and BLAKE3 are checked before it is
//! handed over), the ZIP entry rules ([`crate::ziplayout`]), choosing which version to install
//! (deployments), or printing (the CLI; it gets [`Progress`] events).
//!
//! Semantics, and the choices made where Distributor leaves room:
//! - **Already installed**: the same version is `installed` (or `rolled_back` to it), its folder
//!   is there and its `validate` (if any) passes: nothing else runs and the record is unchanged.
//!   If validate fails, the version is reinstalled like any other.
//! - **Uninstall and reinstall** (default): the installed version's `uninstall`, the new
//!   `install`, then `validate` if there is one. **In-place update**: the new `update`, then
//!   `validate`; a ZIP without an `update` script is refused before anything runs.
//! - **Rollback**, when any of those fails: the new version's `uninstall` (if its folder was put
//!   in place), then the previous version's `install`. Reported as rolled back, with the exit
//!   code of the action that failed. With no different previous version (a first install, or a
//!   reinstall of the same version) there is nothing to restore: the state is `failed`.
//! - **Folders**: the previous version's folder is kept until the new one succeeded (rollback
//!   needs its scripts), then removed. A failed version's folder is removed after its rollback.
//!   If the installed version's folder has gone missing, its uninstall is skipped with a note
//!   in the record rather than blocking every future install.
//! - **Lock**: a second action on a package that is busy waits up to
//!   [`InstallerOptions::lock_wait`] (zero by default) and then fails with
//!   [`InstallError::Busy`]. Deployments retry; an operator gets an immediate answer. (A lock
//!   held by another process gets at least a second, for the reason given in `lock`.)
//! - **Timeouts** apply to each script run separately, as the agent's do.
//! - **Recovery** rolls back an interrupted install (the new version's uninstall if its folder
//!   exists, then the previous version's install) and finishes an interrupted uninstall. It
//!   runs from [`Installer::recover`] at startup, and also before the next action on a package
//!   whose record still says an action is under way (holding the free lock proves nothing is
//!   running), so an install never starts from a half-done state. The additional arguments are
//!   not stored (they may hold secrets), so recovery runs scripts without them.
//! - **Logs**: one file per script run, under `<data>/installs/logs/`; the newest
//!   [`InstallerOptions::logs_kept`] per package are kept, and always those the record names.

pub(crate) mod layout;
mod lock;
pub mod runner;
pub mod state;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pkgmesh_protocol::names::{validate_package_name, validate_version_name, NameError};
use pkgmesh_protocol::select::Platform;
use tracing::{info, warn};

use crate::ziplayout::{extract_zip, ScriptKind, ZipError, ZipLimits, ZipReport};
use layout::{has_script, Layout};
use lock::PackageLock;
pub use runner::{
    read_log_tail, run_script, Action, ArgsError, RunnerError, ScriptArgs, ScriptResult,
    ScriptSpec, ScriptStatus, ARG_PREFIX, DEFAULT_LOG_CAP, DEFAULT_TIMEOUT, MAX_ARGS_CHARS,
    REBOOT_EXIT_POWERSHELL, REBOOT_EXIT_SHELL,
};
use state::InstallStore;
pub use state::{ActionRecord, InstallRecord, InstallState, InstallType};

/// How long to sleep between attempts at a busy package lock.
const LOCK_POLL: Duration = Duration::from_millis(20);
/// Least time given to a package lock file held outside this process's own actions before
/// calling the package busy (see the `lock` module: a child being spawned holds it briefly).
const LOCK_GRACE: Duration = Duration::from_secs(1);

/// Settings of an [`Installer`].
#[derive(Debug, Clone)]
pub struct InstallerOptions {
    /// Timeout of each script run when a request gives none.
    pub default_timeout: Duration,
    /// Most bytes of script output kept per log file.
    pub log_cap: u64,
    /// Log files kept per package (those the record names are always kept).
    pub logs_kept: usize,
    /// How long an action waits for a busy package before failing with [`InstallError::Busy`].
    pub lock_wait: Duration,
    pub zip_limits: ZipLimits,
}

impl Default for InstallerOptions {
    fn default() -> Self {
        InstallerOptions {
            default_timeout: DEFAULT_TIMEOUT,
            log_cap: DEFAULT_LOG_CAP,
            logs_kept: 20,
            lock_wait: Duration::ZERO,
            zip_limits: ZipLimits::default(),
        }
    }
}

/// Install one version of a package from its verified ZIP.
#[derive(Debug, Clone)]
pub struct InstallRequest {
    pub name: String,
    pub version: String,
    /// The ZIP for this node's platform, already checked against the manifest.
    pub zip: PathBuf,
    pub install_type: InstallType,
    pub args: ScriptArgs,
    /// Per script run; `None` for [`InstallerOptions::default_timeout`].
    pub timeout: Option<Duration>,
}

impl InstallRequest {
    /// Uninstall-and-reinstall, no arguments, the default timeout.
    pub fn new(
        name: impl Into<String>,
        version: impl Into<String>,
        zip: impl Into<PathBuf>,
    ) -> Self {
        InstallRequest {
            name: name.into(),
            version: version.into(),
            zip: zip.into(),
            install_type: InstallType::default(),
            args: ScriptArgs::none(),
            timeout: None,
        }
    }
}

/// Uninstall whatever version of a package is installed.
#[derive(Debug, Clone)]
pub struct UninstallRequest {
    pub name: String,
    pub args: ScriptArgs,
    pub timeout: Option<Duration>,
}

impl UninstallRequest {
    pub fn new(name: impl Into<String>) -> Self {
        UninstallRequest {
            name: name.into(),
            args: ScriptArgs::none(),
            timeout: None,
        }
    }
}

/// What is happening, for a caller that shows progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    Extracting {
        name: String,
        version: String,
    },
    Running {
        action: Action,
        version: String,
        log: PathBuf,
    },
    Finished {
        action: Action,
        version: String,
        status: ScriptStatus,
    },
    RollingBack {
        name: String,
        version: String,
        reason: String,
    },
}

/// How an install or uninstall ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutcomeStatus {
    Installed,
    /// The same version was installed and valid; nothing ran but `validate`.
    AlreadyInstalled,
    Uninstalled,
    /// Failed, and the previous version was restored.
    RolledBack,
    /// Failed, and restoring the previous version failed too.
    RollbackFailed,
    /// Failed with nothing to roll back to (or an uninstall failed).
    Failed,
}

impl OutcomeStatus {
    pub fn succeeded(self) -> bool {
        matches!(
            self,
            OutcomeStatus::Installed | OutcomeStatus::AlreadyInstalled | OutcomeStatus::Uninstalled
        )
    }
}

/// The result of [`Installer::install`] or [`Installer::uninstall`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallOutcome {
    pub name: String,
    /// The version the request was about.
    pub version: String,
    pub status: OutcomeStatus,
    /// What is installed now.
    pub installed_version: Option<String>,
    /// The action that failed, on failure.
    pub failed_action: Option<Action>,
    /// The failed action's exit code on failure, else the last action's.
    pub exit_code: Option<i32>,
    pub reboot_required: bool,
    /// Every script that ran, in order.
    pub actions: Vec<ActionRecord>,
    pub message: Option<String>,
}

impl InstallOutcome {
    pub fn succeeded(&self) -> bool {
        self.status.succeeded()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("install state store {}: {message}", path.display())]
    Store { path: PathBuf, message: String },
    #[error("install record of package {name:?} is damaged: {message}")]
    Damaged { name: String, message: String },
    #[error("{0}")]
    InvalidName(#[from] NameError),
    #[error("package name {name:?} is reserved by the installer")]
    ReservedName { name: String },
    #[error("version {version:?} cannot be installed: it is not usable as a folder name")]
    UnusableVersion { version: String },
    #[error(
        "package {name:?} is busy: another install or uninstall of it is running (lock {})",
        lock.display()
    )]
    Busy { name: String, lock: PathBuf },
    #[error(transparent)]
    Args(#[from] ArgsError),
    #[error("package {name:?} version {version:?}: {source}")]
    Zip {
        name: String,
        version: String,
        /// Boxed: ZIP errors are large and this error travels through every `Result` here.
        #[source]
        source: Box<ZipError>,
    },
    #[error(
        "package {name:?} version {version:?}: its {action} script is {file}, but platform \
         {platform:?} runs {expected} scripts"
    )]
    WrongScriptKind {
        name: String,
        version: String,
        action: Action,
        file: String,
        platform: String,
        expected: &'static str,
    },
    #[error(
        "package {name:?} version {version:?} has no update script (update.sh or update.ps1), \
         which an in-place update needs; install it with uninstall-and-reinstall instead"
    )]
    NoUpdateScript { name: String, version: String },
    #[error("package {name:?} is not installed")]
    NotInstalled { name: String },
    #[error(
        "package {name:?} version {version:?}: its folder {} is missing, so its uninstall \
         script cannot run; install the same version again to restore it",
        dir.display()
    )]
    MissingFolder {
        name: String,
        version: String,
        dir: PathBuf,
    },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("installer task stopped: {message}")]
    Task { message: String },
}

fn io_error(what: impl Into<String>, path: &Path) -> impl FnOnce(std::io::Error) -> InstallError {
    let (what, path) = (what.into(), path.to_path_buf());
    move |source| InstallError::Io { what, path, source }
}

/// The node's installer. Cheap to share behind an `Arc`; actions on different packages run
/// concurrently, actions on one package are serialised by its lock.
pub struct Installer {
    layout: Arc<Layout>,
    platform: Platform,
    options: InstallerOptions,
    store: Arc<InstallStore>,
    locks: lock::Locks,
}

impl std::fmt::Debug for Installer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Installer")
            .field("data", &self.layout.data)
            .field("platform", &self.platform)
            .finish_non_exhaustive()
    }
}

impl Installer {
    /// Opens (creating if needed) the installer's folders and records under `data_dir`. Call
    /// [`Installer::recover`] before the first action.
    pub fn open(
        data_dir: &Path,
        platform: Platform,
        options: InstallerOptions,
    ) -> Result<Installer, InstallError> {
        let layout = Layout::create(data_dir)
            .map_err(io_error("cannot create installer folders in", data_dir))?;
        let store = InstallStore::open(&layout.db_path())?;
        Ok(Installer {
            layout: Arc::new(layout),
            platform,
            options,
            store: Arc::new(store),
            locks: lock::Locks::default(),
        })
    }

    pub fn platform(&self) -> &Platform {
        &self.platform
    }

    /// Where a version's extracted folder is (whether or not it exists).
    pub fn version_dir(&self, name: &str, version: &str) -> PathBuf {
        self.layout.version_dir(name, version)
    }

    /// Every package with a record, uninstalled and failed ones included, in name order.
    /// Reads the store directly (a short blocking read).
    pub fn installed(&self) -> Result<Vec<InstallRecord>, InstallError> {
        self.store.list()
    }

    /// One package's record (a short blocking read).
    pub fn record(&self, name: &str) -> Result<Option<InstallRecord>, InstallError> {
        self.store.get(name)
    }

    /// Installs `request.version` of `request.name`. A script that fails is not an error: the
    /// outcome says what failed and what was rolled back. Errors are for requests that cannot
    /// start (bad names, busy package, refused ZIP, no update script) and for a failing store.
    pub async fn install<P>(
        &self,
        request: InstallRequest,
        mut progress: P,
    ) -> Result<InstallOutcome, InstallError>
    where
        P: FnMut(Progress) + Send,
    {
        let InstallRequest {
            name,
            version,
            zip,
            install_type,
            args,
            timeout,
        } = request;
        check_names(&name, &version)?;
        let lock = self.lock(&name).await?;
        let before = self.load_settled(&name).await?;
        let previous = before.as_ref().and_then(|r| r.installed_version.clone());
        let mut op = Op::new(
            self,
            &name,
            &args,
            timeout.unwrap_or(self.options.default_timeout),
            &mut progress,
        );

        if let Some(record) = &before {
            let same = previous.as_deref() == Some(version.as_str());
            let settled = matches!(
                record.state,
                InstallState::Installed | InstallState::RolledBack
            );
            if same && settled && self.layout.version_dir(&name, &version).is_dir() {
                match op.run(&version, Action::Validate, false).await {
                    None => return Ok(op.already_installed(&version)),
                    Some(status) if status.succeeded() => return Ok(op.already_installed(&version)),
                    Some(status) => info!(
                        package = %name,
                        %version,
                        %status,
                        "installed version does not validate; reinstalling it"
                    ),
                }
            }
        }

        (op.progress)(Progress::Extracting {
            name: name.clone(),
            version: version.clone(),
        });
        let staging = self.layout.new_staging(&name, &version);
        let prepared = self
            .extract(&name, &version, &zip, &staging)
            .await
            .and_then(|report| self.check_report(&name, &version, install_type, &report));
        if let Err(e) = prepared {
            self.discard(&staging).await;
            return Err(e);
        }

        let mut record = InstallRecord {
            name: name.clone(),
            state: InstallState::Installing,
            installed_version: previous.clone(),
            target_version: Some(version.clone()),
            previous_version: previous.clone(),
            install_type,
            updated_at: now(),
            last_action: None,
            last_exit_code: None,
            reboot_required: false,
            log_path: None,
            actions: op.actions.clone(),
            message: None,
        };
        if let Err(e) = self.save(&record).await {
            self.discard(&staging).await;
            return Err(e);
        }
        info!(package = %name, %version, previous = ?previous, ?install_type, "installing");

        let mut notes = Vec::new();
        let mut placed = false;
        let failure = self
            .run_steps(
                &mut op,
                &version,
                previous.as_deref(),
                install_type,
                &staging,
                &mut placed,
                &mut notes,
            )
            .await;
        if !placed {
            self.discard(&staging).await;
        }

        let outcome = match failure {
            None => {
                let last = op.actions.last().cloned();
                record.state = InstallState::Installed;
                record.installed_version = Some(version.clone());
                record.last_action = last.as_ref().map(|a| a.action);
                record.last_exit_code = last.as_ref().and_then(|a| a.status.exit_code());
                record.log_path = last.as_ref().and_then(|a| a.log.clone());
                record.reboot_required = op.reboot_required();
                record.actions = op.actions.clone();
                record.message = join_notes(&notes);
                record.updated_at = now();
                self.save(&record).await?;
                if let Some(old) = previous.as_deref().filter(|old| *old != version) {
                    self.remove_version(&name, old).await;
                }
                info!(package = %name, %version, reboot = record.reboot_required, "installed");
                InstallOutcome {
                    name: name.clone(),
                    version: version.clone(),
                    status: OutcomeStatus::Installed,
                    installed_version: Some(version.clone()),
                    failed_action: None,
                    exit_code: record.last_exit_code,
                    reboot_required: record.reboot_required,
                    actions: op.actions.clone(),
                    message: record.message.clone(),
                }
            }
            Some(failure) => {
                warn!(package = %name, %version, reason = %failure.message, "install failed; rolling back");
                (op.progress)(Progress::RollingBack {
                    name: name.clone(),
                    version: version.clone(),
                    reason: failure.message.clone(),
                });
                notes.insert(0, failure.message.clone());
                record.state = InstallState::RollingBack;
                record.last_action = failure.action;
                record.last_exit_code = failure.exit_code;
                record.log_path = failure.log.clone();
                record.actions = op.actions.clone();
                record.message = join_notes(&notes);
                record.updated_at = now();
                self.save(&record).await?;
                let rolled = self
                    .rollback(&mut op, &version, previous.as_deref(), placed, &mut notes)
                    .await;
                self.finish_rollback(&mut op, &mut record, &version, rolled, &failure, notes)
                    .await?
            }
        };
        self.prune_logs(&name, &record).await;
        drop(lock);
        Ok(outcome)
    }

    /// Uninstalls the installed version of `request.name`: its `uninstall` script, then its
    /// folder. A failing script leaves the folder and the installed version in place, with the
    /// state `failed`.
    pub async fn uninstall<P>(
        &self,
        request: UninstallRequest,
        mut progress: P,
    ) -> Result<InstallOutcome, InstallError>
    where
        P: FnMut(Progress) + Send,
    {
        validate_package_name(&request.name)?;
        let lock = self.lock(&request.name).await?;
        let record = self
            .load_settled(&request.name)
            .await?
            .filter(|r| r.installed_version.is_some())
            .ok_or_else(|| InstallError::NotInstalled {
                name: request.name.clone(),
            })?;
        let mut op = Op::new(
            self,
            &request.name,
            &request.args,
            request.timeout.unwrap_or(self.options.default_timeout),
            &mut progress,
        );
        let outcome = self.uninstall_locked(&mut op, record, None).await;
        drop(lock);
        outcome
    }

    /// Brings every package whose action was interrupted (the record says installing, rolling
    /// back or uninstalling, and nobody holds its lock) to a known state, and removes staging
    /// leftovers and version folders no record needs. Returns the records it changed. Meant
    /// for startup, before the node takes requests; a package busy in another task or process
    /// is left alone.
    pub async fn recover(&self) -> Result<Vec<InstallRecord>, InstallError> {
        let layout = Arc::clone(&self.layout);
        blocking(move || layout.clean_staging())
            .await?
            .map_err(io_error(
                "cannot clean the staging folder in",
                &self.layout.data,
            ))?;
        let mut recovered = Vec::new();
        for listed in self.load_all().await? {
            let Some(lock) = self.acquire(&listed.name, Duration::ZERO).await? else {
                info!(package = %listed.name, "busy; not recovering it");
                continue;
            };
            // Read again under the lock: it may have changed since the listing.
            let Some(record) = self.load(&listed.name).await? else {
                continue;
            };
            let record = if record.state.in_progress() {
                let changed = self.recover_one(record).await?;
                recovered.push(changed.clone());
                changed
            } else {
                record
            };
            let layout = Arc::clone(&self.layout);
            let keep = record.installed_version.clone();
            let name = record.name.clone();
            if let Err(e) =
                blocking(move || layout.remove_other_versions(&name, keep.as_deref())).await?
            {
                warn!(package = %record.name, error = %e, "cannot remove unneeded version folders");
            }
            drop(lock);
        }
        Ok(recovered)
    }

    async fn recover_one(&self, mut record: InstallRecord) -> Result<InstallRecord, InstallError> {
        let name = record.name.clone();
        let interrupted = record.state;
        let args = ScriptArgs::none();
        let mut ignore = |_: Progress| {};
        let mut op = Op::new(
            self,
            &name,
            &args,
            self.options.default_timeout,
            &mut ignore,
        );
        warn!(package = %name, state = %interrupted, target = ?record.target_version, "node stopped during an action; recovering");

        if interrupted == InstallState::Uninstalling {
            let version = record
                .installed_version
                .clone()
                .or_else(|| record.target_version.clone());
            let shown = version.as_deref().unwrap_or("(unknown version)");
            let note = format!(
                "the node stopped during an uninstall of {shown}; it was run again on recovery"
            );
            match version {
                Some(v) if self.layout.version_dir(&name, &v).is_dir() => {
                    record.installed_version = Some(v);
                    self.uninstall_locked(&mut op, record, Some(note)).await?;
                }
                _ => {
                    // No folder: the uninstall got as far as removing it.
                    record.state = InstallState::Uninstalled;
                    record.installed_version = None;
                    record.message = Some(format!("{note}; its folder was already removed"));
                    record.updated_at = now();
                    self.save(&record).await?;
                }
            }
            return self.load(&name).await?.ok_or(InstallError::Damaged {
                name,
                message: "record vanished during recovery".into(),
            });
        }

        let Some(version) = record.target_version.clone() else {
            record.state = InstallState::Failed;
            record.message =
                Some("the node stopped during an install of an unknown version".into());
            record.updated_at = now();
            self.save(&record).await?;
            return Ok(record);
        };
        let what = if interrupted == InstallState::RollingBack {
            "the rollback of"
        } else {
            "an install of"
        };
        let failure = Failure {
            action: record.last_action,
            exit_code: record.last_exit_code,
            log: record.log_path.clone(),
            message: format!("the node stopped during {what} {version}; rolled back on recovery"),
        };
        let mut notes = vec![failure.message.clone()];
        op.actions = record.actions.clone();
        record.state = InstallState::RollingBack;
        record.updated_at = now();
        self.save(&record).await?;
        let placed = self.layout.version_dir(&name, &version).is_dir();
        let previous = record.previous_version.clone();
        let rolled = self
            .rollback(&mut op, &version, previous.as_deref(), placed, &mut notes)
            .await;
        self.finish_rollback(&mut op, &mut record, &version, rolled, &failure, notes)
            .await?;
        self.prune_logs(&name, &record).await;
        Ok(record)
    }

    /// The steps of an install after extraction; `None` when all succeeded.
    #[allow(clippy::too_many_arguments)]
    async fn run_steps(
        &self,
        op: &mut Op<'_>,
        version: &str,
        previous: Option<&str>,
        install_type: InstallType,
        staging: &Path,
        placed: &mut bool,
        notes: &mut Vec<String>,
    ) -> Option<Failure> {
        let name = op.name;
        if install_type == InstallType::UninstallAndReinstall {
            if let Some(old) = previous {
                if self.layout.version_dir(name, old).is_dir() {
                    if let Some(failure) = op.run_checked(old, Action::Uninstall, true).await {
                        return Some(failure);
                    }
                } else {
                    warn!(package = %name, version = %old, "installed version's folder is missing; skipping its uninstall");
                    notes.push(format!(
                        "the folder of the installed version {old} was missing, so its \
                         uninstall script did not run"
                    ));
                }
            }
        }

        let dest = self.layout.version_dir(name, version);
        let (layout, from, to) = (
            Arc::clone(&self.layout),
            staging.to_path_buf(),
            dest.clone(),
        );
        let moved = blocking(move || layout.place(&from, &to))
            .await
            .and_then(|r| r.map_err(io_error("cannot move the extracted package to", &dest)));
        if let Err(e) = moved {
            return Some(Failure {
                action: None,
                exit_code: None,
                log: None,
                message: e.to_string(),
            });
        }
        *placed = true;

        let main = match install_type {
            InstallType::UninstallAndReinstall => Action::Install,
            InstallType::InPlace => Action::Update,
        };
        if let Some(failure) = op.run_checked(version, main, true).await {
            return Some(failure);
        }
        op.run_checked(version, Action::Validate, false).await
    }

    /// Undoes a failed install: the new version's uninstall (when its folder was put in place)
    /// and the previous version's install.
    async fn rollback(
        &self,
        op: &mut Op<'_>,
        version: &str,
        previous: Option<&str>,
        placed: bool,
        notes: &mut Vec<String>,
    ) -> Rolled {
        let name = op.name;
        if placed {
            if let Some(failure) = op.run_checked(version, Action::Uninstall, true).await {
                notes.push(format!("rollback: {}", failure.message));
            }
            self.remove_version(name, version).await;
        }
        let Some(old) = previous.filter(|old| *old != version) else {
            return Rolled::NothingToRestore;
        };
        if !self.layout.version_dir(name, old).is_dir() {
            notes.push(format!(
                "rollback: the folder of the previous version {old} is missing, so it cannot be \
                 reinstalled"
            ));
            return Rolled::RestoreFailed { folder: false };
        }
        match op.run_checked(old, Action::Install, true).await {
            None => Rolled::Restored,
            Some(failure) => {
                notes.push(format!("rollback: {}", failure.message));
                Rolled::RestoreFailed { folder: true }
            }
        }
    }

    /// Writes the final record after a rollback and builds the outcome.
    async fn finish_rollback(
        &self,
        op: &mut Op<'_>,
        record: &mut InstallRecord,
        version: &str,
        rolled: Rolled,
        failure: &Failure,
        notes: Vec<String>,
    ) -> Result<InstallOutcome, InstallError> {
        let previous = record.previous_version.clone();
        let (state, installed, status) = match rolled {
            Rolled::Restored => (
                InstallState::RolledBack,
                previous.clone(),
                OutcomeStatus::RolledBack,
            ),
            // The previous version's files are still there and its uninstall can still run,
            // so it stays the installed version, in a failed state.
            Rolled::RestoreFailed { folder: true } => (
                InstallState::Failed,
                previous.clone(),
                OutcomeStatus::RollbackFailed,
            ),
            Rolled::RestoreFailed { folder: false } => {
                (InstallState::Failed, None, OutcomeStatus::RollbackFailed)
            }
            Rolled::NothingToRestore => (InstallState::Failed, None, OutcomeStatus::Failed),
        };
        record.state = state;
        record.installed_version = installed.clone();
        record.last_action = failure.action;
        record.last_exit_code = failure.exit_code;
        record.log_path = failure.log.clone();
        record.reboot_required = op.reboot_required();
        record.actions = op.actions.clone();
        record.message = join_notes(&notes);
        record.updated_at = now();
        self.save(record).await?;
        warn!(package = %record.name, %version, state = %state, installed = ?installed, "rollback finished");
        Ok(InstallOutcome {
            name: record.name.clone(),
            version: version.to_string(),
            status,
            installed_version: installed,
            failed_action: failure.action,
            exit_code: failure.exit_code,
            reboot_required: record.reboot_required,
            actions: op.actions.clone(),
            message: record.message.clone(),
        })
    }

    /// Runs the installed version's uninstall and records the result; the lock is held.
    async fn uninstall_locked(
        &self,
        op: &mut Op<'_>,
        mut record: InstallRecord,
        note: Option<String>,
    ) -> Result<InstallOutcome, InstallError> {
        let name = record.name.clone();
        let Some(version) = record.installed_version.clone() else {
            return Err(InstallError::NotInstalled { name });
        };
        let dir = self.layout.version_dir(&name, &version);
        if !dir.is_dir() {
            return Err(InstallError::MissingFolder { name, version, dir });
        }
        record.state = InstallState::Uninstalling;
        record.target_version = Some(version.clone());
        record.previous_version = Some(version.clone());
        record.reboot_required = false;
        record.actions = op.actions.clone();
        record.message = note.clone();
        record.updated_at = now();
        self.save(&record).await?;
        info!(package = %name, %version, "uninstalling");

        let failure = op.run_checked(&version, Action::Uninstall, true).await;
        let last = op.actions.last().cloned();
        record.last_action = Some(Action::Uninstall);
        record.last_exit_code = last.as_ref().and_then(|a| a.status.exit_code());
        record.log_path = last.as_ref().and_then(|a| a.log.clone());
        record.reboot_required = op.reboot_required();
        record.actions = op.actions.clone();
        record.updated_at = now();
        let mut notes: Vec<String> = note.into_iter().collect();
        let status = match &failure {
            None => {
                record.state = InstallState::Uninstalled;
                record.installed_version = None;
                record.message = join_notes(&notes);
                self.save(&record).await?;
                self.remove_version(&name, &version).await;
                info!(package = %name, %version, "uninstalled");
                OutcomeStatus::Uninstalled
            }
            Some(failure) => {
                notes.push(failure.message.clone());
                record.state = InstallState::Failed;
                record.message = join_notes(&notes);
                self.save(&record).await?;
                warn!(package = %name, %version, reason = %failure.message, "uninstall failed");
                OutcomeStatus::Failed
            }
        };
        self.prune_logs(&name, &record).await;
        Ok(InstallOutcome {
            name,
            version,
            status,
            installed_version: record.installed_version.clone(),
            failed_action: failure.as_ref().and_then(|f| f.action),
            exit_code: record.last_exit_code,
            reboot_required: record.reboot_required,
            actions: op.actions.clone(),
            message: record.message.clone(),
        })
    }

    async fn extract(
        &self,
        name: &str,
        version: &str,
        zip: &Path,
        staging: &Path,
    ) -> Result<ZipReport, InstallError> {
        let (zip_path, staging_path) = (zip.to_path_buf(), staging.to_path_buf());
        let limits = self.options.zip_limits.clone();
        blocking(move || extract_zip(&zip_path, &staging_path, &limits))
            .await?
            .map_err(|source| InstallError::Zip {
                name: name.to_string(),
                version: version.to_string(),
                source: Box::new(source),
            })
    }

    /// The scripts must be of the kind this platform runs; an in-place update needs `update`.
    fn check_report(
        &self,
        name: &str,
        version: &str,
        install_type: InstallType,
        report: &ZipReport,
    ) -> Result<(), InstallError> {
        let expected = self.script_kind();
        let scripts = [
            (Action::Install, Some(report.install)),
            (Action::Uninstall, Some(report.uninstall)),
            (Action::Update, report.update),
            (Action::Validate, report.validate),
        ];
        for (action, kind) in scripts {
            if let Some(kind) = kind.filter(|k| *k != expected) {
                return Err(InstallError::WrongScriptKind {
                    name: name.to_string(),
                    version: version.to_string(),
                    action,
                    file: kind.file_name(action.as_str()),
                    platform: self.platform.name.clone(),
                    expected: match expected {
                        ScriptKind::Shell => "shell (.sh)",
                        ScriptKind::PowerShell => "PowerShell (.ps1)",
                    },
                });
            }
        }
        if install_type == InstallType::InPlace && report.update.is_none() {
            return Err(InstallError::NoUpdateScript {
                name: name.to_string(),
                version: version.to_string(),
            });
        }
        Ok(())
    }

    /// Windows runs PowerShell scripts; every other platform runs `sh`.
    fn script_kind(&self) -> ScriptKind {
        if self.platform.name.eq_ignore_ascii_case("windows") {
            ScriptKind::PowerShell
        } else {
            ScriptKind::Shell
        }
    }

    async fn lock(&self, name: &str) -> Result<PackageLock, InstallError> {
        self.acquire(name, self.options.lock_wait)
            .await?
            .ok_or_else(|| InstallError::Busy {
                name: name.to_string(),
                lock: self.layout.lock_path(name),
            })
    }

    /// The package's lock, or `None` when it is still busy after `wait`. A file lock held
    /// outside this process's own actions gets at least [`LOCK_GRACE`], since it may be a
    /// child being spawned that has not closed its inherited copy yet.
    async fn acquire(
        &self,
        name: &str,
        wait: Duration,
    ) -> Result<Option<PackageLock>, InstallError> {
        let path = self.layout.lock_path(name);
        let started = Instant::now();
        loop {
            let attempt = self
                .locks
                .try_lock(name, &path)
                .map_err(io_error("cannot take package lock", &path))?;
            let patience = match attempt {
                lock::Attempt::Acquired(lock) => {
                    tracing::debug!(package = %name, lock = %lock.path().display(), "package locked");
                    return Ok(Some(lock));
                }
                lock::Attempt::HeldHere => wait,
                lock::Attempt::HeldElsewhere => wait.max(LOCK_GRACE),
            };
            let left = patience.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Ok(None);
            }
            tokio::time::sleep(left.min(LOCK_POLL)).await;
        }
    }

    /// The record, after recovering it if it says an action is under way: the caller holds
    /// the lock, so that action is not running any more (the node stopped mid-way and
    /// [`Installer::recover`] has not run yet).
    async fn load_settled(&self, name: &str) -> Result<Option<InstallRecord>, InstallError> {
        match self.load(name).await? {
            Some(record) if record.state.in_progress() => Ok(Some(self.recover_one(record).await?)),
            other => Ok(other),
        }
    }

    async fn load(&self, name: &str) -> Result<Option<InstallRecord>, InstallError> {
        let (store, name) = (Arc::clone(&self.store), name.to_string());
        blocking(move || store.get(&name)).await?
    }

    async fn load_all(&self) -> Result<Vec<InstallRecord>, InstallError> {
        let store = Arc::clone(&self.store);
        blocking(move || store.list()).await?
    }

    async fn save(&self, record: &InstallRecord) -> Result<(), InstallError> {
        let (store, record) = (Arc::clone(&self.store), record.clone());
        blocking(move || store.put(&record)).await?
    }

    /// Removes a version folder; a failure is logged (the next startup retries).
    async fn remove_version(&self, name: &str, version: &str) {
        let layout = Arc::clone(&self.layout);
        let dir = self.layout.version_dir(name, version);
        let target = dir.clone();
        match blocking(move || layout.remove(&target)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(dir = %dir.display(), error = %e, "cannot remove version folder"),
            Err(e) => warn!(dir = %dir.display(), error = %e, "cannot remove version folder"),
        }
    }

    /// Removes a staging folder that was not placed.
    async fn discard(&self, staging: &Path) {
        let layout = Arc::clone(&self.layout);
        let path = staging.to_path_buf();
        if let Ok(Err(e)) = blocking(move || layout.remove(&path)).await {
            warn!(staging = %staging.display(), error = %e, "cannot remove staging folder");
        }
    }

    async fn prune_logs(&self, name: &str, record: &InstallRecord) {
        let layout = Arc::clone(&self.layout);
        let keep = self.options.logs_kept;
        let name = name.to_string();
        let referenced: HashSet<PathBuf> = record
            .actions
            .iter()
            .filter_map(|a| a.log.clone())
            .chain(record.log_path.clone())
            .collect();
        if let Err(e) = blocking(move || layout.prune_logs(&name, keep, &referenced)).await {
            warn!(error = %e, "cannot prune script logs");
        }
    }
}

/// How a rollback went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rolled {
    Restored,
    RestoreFailed { folder: bool },
    NothingToRestore,
}

/// Why an install step failed.
#[derive(Debug, Clone)]
struct Failure {
    action: Option<Action>,
    exit_code: Option<i32>,
    log: Option<PathBuf>,
    message: String,
}

/// One operation's script runs on one package: what ran, for the record and the outcome.
struct Op<'a> {
    installer: &'a Installer,
    name: &'a str,
    args: &'a ScriptArgs,
    timeout: Duration,
    progress: &'a mut (dyn FnMut(Progress) + Send),
    actions: Vec<ActionRecord>,
}

impl<'a> Op<'a> {
    fn new(
        installer: &'a Installer,
        name: &'a str,
        args: &'a ScriptArgs,
        timeout: Duration,
        progress: &'a mut (dyn FnMut(Progress) + Send),
    ) -> Op<'a> {
        Op {
            installer,
            name,
            args,
            timeout,
            progress,
            actions: Vec::new(),
        }
    }

    fn reboot_required(&self) -> bool {
        self.actions.iter().any(|a| a.status.reboot_required())
    }

    /// Runs `version`'s `action` script. A missing script is skipped (`None`) unless
    /// `required`, when it counts as a script that could not run.
    async fn run(&mut self, version: &str, action: Action, required: bool) -> Option<ScriptStatus> {
        let installer = self.installer;
        let kind = installer.script_kind();
        let dir = installer.layout.version_dir(self.name, version);
        if !has_script(&dir, kind, action) {
            if !required {
                return None;
            }
            let status = ScriptStatus::CouldNotRun {
                reason: format!(
                    "{} has no {}",
                    dir.display(),
                    kind.file_name(action.as_str())
                ),
            };
            self.record(action, version, status.clone(), None);
            return Some(status);
        }
        let log = match installer.layout.new_log_path(self.name, version, action) {
            Ok(log) => log,
            Err(e) => {
                let status = ScriptStatus::CouldNotRun {
                    reason: format!("cannot create its log file: {e}"),
                };
                self.record(action, version, status.clone(), None);
                return Some(status);
            }
        };
        (self.progress)(Progress::Running {
            action,
            version: version.to_string(),
            log: log.clone(),
        });
        let spec = ScriptSpec {
            dir: &dir,
            kind,
            action,
            platform: &installer.platform,
            args: self.args,
            timeout: self.timeout,
            log_path: &log,
            log_cap: installer.options.log_cap,
        };
        let (status, log) = match run_script(&spec).await {
            Ok(result) => (result.status, Some(result.log)),
            Err(e) => {
                let exists = log.is_file();
                (
                    ScriptStatus::CouldNotRun {
                        reason: e.to_string(),
                    },
                    exists.then_some(log),
                )
            }
        };
        self.record(action, version, status.clone(), log);
        Some(status)
    }

    /// Like [`Op::run`], returning the failure when the script did not succeed.
    async fn run_checked(
        &mut self,
        version: &str,
        action: Action,
        required: bool,
    ) -> Option<Failure> {
        let status = self.run(version, action, required).await?;
        if status.succeeded() {
            return None;
        }
        Some(Failure {
            action: Some(action),
            exit_code: status.exit_code(),
            log: self.actions.last().and_then(|a| a.log.clone()),
            message: format!("{action} of {} {version} {status}", self.name),
        })
    }

    fn record(
        &mut self,
        action: Action,
        version: &str,
        status: ScriptStatus,
        log: Option<PathBuf>,
    ) {
        (self.progress)(Progress::Finished {
            action,
            version: version.to_string(),
            status: status.clone(),
        });
        self.actions.push(ActionRecord {
            action,
            version: version.to_string(),
            status,
            log,
            finished_at: now(),
        });
    }

    fn already_installed(&self, version: &str) -> InstallOutcome {
        info!(package = %self.name, %version, "already installed");
        InstallOutcome {
            name: self.name.to_string(),
            version: version.to_string(),
            status: OutcomeStatus::AlreadyInstalled,
            installed_version: Some(version.to_string()),
            failed_action: None,
            exit_code: self.actions.last().and_then(|a| a.status.exit_code()),
            reboot_required: self.reboot_required(),
            actions: self.actions.clone(),
            message: None,
        }
    }
}

fn check_names(name: &str, version: &str) -> Result<(), InstallError> {
    validate_package_name(name)?;
    if name == layout::STAGING {
        return Err(InstallError::ReservedName {
            name: name.to_string(),
        });
    }
    validate_version_name(version)?;
    // The name rules allow these, but as folder names they mean "here" and "up".
    if version == "." || version == ".." {
        return Err(InstallError::UnusableVersion {
            version: version.to_string(),
        });
    }
    Ok(())
}

fn join_notes(notes: &[String]) -> Option<String> {
    (!notes.is_empty()).then(|| notes.join("; "))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, InstallError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| InstallError::Task {
            message: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_would_escape_or_collide_are_refused() {
        assert!(check_names("pkg", "1.0").is_ok());
        assert!(matches!(
            check_names("pkg", ".."),
            Err(InstallError::UnusableVersion { .. })
        ));
        assert!(matches!(
            check_names("pkg", "."),
            Err(InstallError::UnusableVersion { .. })
        ));
        assert!(matches!(
            check_names(".staging", "1"),
            Err(InstallError::ReservedName { .. })
        ));
        assert!(matches!(
            check_names("a/b", "1"),
            Err(InstallError::InvalidName(_))
        ));
        assert!(matches!(
            check_names("pkg", "1/../2"),
            Err(InstallError::InvalidName(_))
        ));
    }
}
