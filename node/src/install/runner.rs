//! The script runner: runs one package script (`install`, `uninstall`, `update`, `validate`) the
//! way the SSM Agent's AWS-ConfigureAWSPackage does, and captures its output to a capped log.
//!
//! Owns: the command line (`sh <action>.sh`, or PowerShell for `.ps1`), the working directory
//! and environment (`BWS_*` plus the `SSM_` additional arguments), the exit-code rules (0
//! succeeds, 194 / 3010 succeeds and asks for a reboot, anything else fails), the timeout that
//! kills the script's whole process group, and the per-action log file.
//!
//! Does not own: which scripts run in which order, rollback, or the install record (the
//! installer in [`super`]).
//!
//! Choices, and why:
//! - The script is its own process group (`process_group(0)`), so a timeout can kill everything
//!   it started with one `killpg`, not just the shell. On a normal exit the group is left alone:
//!   install scripts legitimately start services in the background. A process that leaves the
//!   group (`setsid`, a daemon double-fork) is out of reach, as it is for the agent.
//! - Output goes through pipes, not straight into the log file, so the log can be capped: the
//!   first half of the cap is written as it comes, the last half is kept in memory and written at
//!   the end, with a marker saying how much was left out between them. The end of the output is
//!   where errors usually are, so it is never the part dropped.
//! - A background process the script started may keep the pipes open after the script exits.
//!   The log is finished after a short grace period anyway, and the pipes are drained (and the
//!   output discarded) for as long as that process lives: closing them would kill it with
//!   SIGPIPE at its next write.
//! - Additional arguments are environment variables set on the child directly, never text in a
//!   shell command, so no value can be interpreted by a shell.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use pkgmesh_protocol::select::Platform;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use tracing::{debug, warn};

use crate::ziplayout::ScriptKind;

/// Exit code of a shell script that succeeded and needs a reboot (the agent's convention).
pub const REBOOT_EXIT_SHELL: i32 = 194;
/// Exit code of a PowerShell script that succeeded and needs a reboot (Windows'
/// ERROR_SUCCESS_REBOOT_REQUIRED).
pub const REBOOT_EXIT_POWERSHELL: i32 = 3010;
/// Additional arguments must start with this.
pub const ARG_PREFIX: &str = "SSM_";
/// Most characters in all additional arguments together, keys and values.
pub const MAX_ARGS_CHARS: usize = 4096;
/// How long a script may run unless the request says otherwise (the agent's default).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);
/// Most bytes of script output kept in one log file (plus a few lines of our own).
pub const DEFAULT_LOG_CAP: u64 = 1024 * 1024;
/// How long to wait, after the script exited, for the rest of its output.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// A package script's action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Install,
    Uninstall,
    Update,
    Validate,
}

impl Action {
    /// The script's base name and the value of `BWS_ACTION_NAME` (lowercase, as the agent
    /// passes it).
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Install => "install",
            Action::Uninstall => "uninstall",
            Action::Update => "update",
            Action::Validate => "validate",
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why additional arguments were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgsError {
    #[error(
        "additional argument {key:?} does not start with {ARG_PREFIX}: package scripts only \
         receive {ARG_PREFIX}-prefixed arguments"
    )]
    MissingPrefix { key: String },
    #[error("additional argument {key:?}: the {part} contains {found}, which an environment variable cannot hold")]
    BadCharacter {
        key: String,
        part: &'static str,
        found: &'static str,
    },
    #[error("additional argument {key:?} is given more than once")]
    Duplicate { key: String },
    #[error(
        "additional arguments total {total} characters (keys and values), more than the limit \
         of {MAX_ARGS_CHARS}"
    )]
    TooLong { total: usize },
    #[error("additional argument {given:?} is not KEY=VALUE")]
    NotAPair { given: String },
}

/// Additional arguments for package scripts, checked: every key starts with `SSM_`, no key or
/// value holds what an environment variable cannot, at most [`MAX_ARGS_CHARS`] characters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScriptArgs(BTreeMap<String, String>);

impl ScriptArgs {
    /// No arguments.
    pub fn none() -> ScriptArgs {
        ScriptArgs::default()
    }

    /// Checks and collects `(key, value)` pairs.
    pub fn new<I, K, V>(pairs: I) -> Result<ScriptArgs, ArgsError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let mut map = BTreeMap::new();
        let mut total = 0usize;
        for (key, value) in pairs {
            let (key, value) = (key.into(), value.into());
            if !key.starts_with(ARG_PREFIX) {
                return Err(ArgsError::MissingPrefix { key });
            }
            let bad = |part, found| ArgsError::BadCharacter {
                key: key.clone(),
                part,
                found,
            };
            if key.contains('=') {
                return Err(bad("key", "'='"));
            }
            if key.contains('\0') {
                return Err(bad("key", "a NUL character"));
            }
            if value.contains('\0') {
                return Err(bad("value", "a NUL character"));
            }
            total = total
                .saturating_add(key.chars().count())
                .saturating_add(value.chars().count());
            if map.contains_key(&key) {
                return Err(ArgsError::Duplicate { key });
            }
            map.insert(key, value);
        }
        if total > MAX_ARGS_CHARS {
            return Err(ArgsError::TooLong { total });
        }
        Ok(ScriptArgs(map))
    }

    /// Parses `KEY=VALUE` strings (as given on a command line) and checks them.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<ScriptArgs, ArgsError> {
        let mut pairs = Vec::with_capacity(items.len());
        for item in items {
            let item = item.as_ref();
            let (key, value) = item.split_once('=').ok_or_else(|| ArgsError::NotAPair {
                given: item.to_string(),
            })?;
            pairs.push((key.to_string(), value.to_string()));
        }
        ScriptArgs::new(pairs)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// How a script run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ScriptStatus {
    /// Exit code 0.
    Succeeded,
    /// Exit code 194 (3010 for PowerShell): succeeded, and the machine needs a reboot.
    RebootRequired { code: i32 },
    /// Any other exit code.
    Failed { code: i32 },
    /// Died of a signal nobody here sent.
    Killed { signal: i32 },
    /// Ran past its timeout; its process group was killed.
    TimedOut { after_secs: u64 },
    /// Could not be started (no script, no shell, no log file).
    CouldNotRun { reason: String },
}

impl ScriptStatus {
    pub fn succeeded(&self) -> bool {
        matches!(
            self,
            ScriptStatus::Succeeded | ScriptStatus::RebootRequired { .. }
        )
    }

    pub fn reboot_required(&self) -> bool {
        matches!(self, ScriptStatus::RebootRequired { .. })
    }

    /// The process's exit code, when it exited by itself.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            ScriptStatus::Succeeded => Some(0),
            ScriptStatus::RebootRequired { code } | ScriptStatus::Failed { code } => Some(*code),
            _ => None,
        }
    }

    fn from_exit(kind: ScriptKind, status: std::process::ExitStatus) -> ScriptStatus {
        let reboot = match kind {
            ScriptKind::Shell => REBOOT_EXIT_SHELL,
            ScriptKind::PowerShell => REBOOT_EXIT_POWERSHELL,
        };
        match status.code() {
            Some(0) => ScriptStatus::Succeeded,
            Some(code) if code == reboot => ScriptStatus::RebootRequired { code },
            Some(code) => ScriptStatus::Failed { code },
            None => ScriptStatus::Killed {
                signal: exit_signal(&status).unwrap_or(-1),
            },
        }
    }
}

impl std::fmt::Display for ScriptStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScriptStatus::Succeeded => f.write_str("succeeded (exit code 0)"),
            ScriptStatus::RebootRequired { code } => {
                write!(f, "succeeded, reboot required (exit code {code})")
            }
            ScriptStatus::Failed { code } => write!(f, "failed with exit code {code}"),
            ScriptStatus::Killed { signal } => write!(f, "killed by signal {signal}"),
            ScriptStatus::TimedOut { after_secs } => {
                write!(
                    f,
                    "timed out after {after_secs} s; its process group was killed"
                )
            }
            ScriptStatus::CouldNotRun { reason } => write!(f, "could not run: {reason}"),
        }
    }
}

#[cfg(unix)]
fn exit_signal(status: &std::process::ExitStatus) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    status.signal()
}

#[cfg(not(unix))]
fn exit_signal(_status: &std::process::ExitStatus) -> Option<i32> {
    None
}

/// One script to run.
#[derive(Debug, Clone)]
pub struct ScriptSpec<'a> {
    /// The extracted version folder; the script runs from here.
    pub dir: &'a Path,
    pub kind: ScriptKind,
    pub action: Action,
    pub platform: &'a Platform,
    pub args: &'a ScriptArgs,
    pub timeout: Duration,
    /// Created new; must not exist.
    pub log_path: &'a Path,
    /// Most bytes of script output kept in the log.
    pub log_cap: u64,
}

/// What a run produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptResult {
    pub status: ScriptStatus,
    pub log: PathBuf,
    /// Some output was left out of the log to keep it under the cap.
    pub log_truncated: bool,
}

/// Why a script could not be run at all (as opposed to running and failing).
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("no {} script: {} is missing", action, path.display())]
    MissingScript { action: Action, path: PathBuf },
    #[error("cannot create log file {}: {source}", path.display())]
    Log { path: PathBuf, source: io::Error },
    #[error("cannot start `{program}` for {action} in {}: {source}", dir.display())]
    Spawn {
        program: String,
        action: Action,
        dir: PathBuf,
        source: io::Error,
    },
    #[error("lost track of the {action} script: {source}")]
    Wait { action: Action, source: io::Error },
}

/// The program and arguments that run `action`'s script of this kind.
fn command_line(kind: ScriptKind, action: Action) -> (&'static str, Vec<String>) {
    let file = kind.file_name(action.as_str());
    match kind {
        // Relative to the working directory, as the agent runs it.
        ScriptKind::Shell => ("sh", vec![file]),
        ScriptKind::PowerShell => (
            "powershell",
            [
                "-NoProfile",
                "-NonInteractive",
                "-ExecutionPolicy",
                "Unrestricted",
                "-File",
            ]
            .iter()
            .map(|s| s.to_string())
            .chain(std::iter::once(file))
            .collect(),
        ),
    }
}

/// Runs one script to completion (or timeout), with its output in `spec.log_path`.
pub async fn run_script(spec: &ScriptSpec<'_>) -> Result<ScriptResult, RunnerError> {
    let script = spec.dir.join(spec.kind.file_name(spec.action.as_str()));
    if !script.is_file() {
        return Err(RunnerError::MissingScript {
            action: spec.action,
            path: script,
        });
    }
    let (program, args) = command_line(spec.kind, spec.action);
    let log_file = open_log(spec.log_path).map_err(|source| RunnerError::Log {
        path: spec.log_path.to_path_buf(),
        source,
    })?;
    let sink = Arc::new(Mutex::new(LogSink::new(
        log_file,
        spec.log_path.to_path_buf(),
        spec.log_cap,
    )));
    lock_sink(&sink).header(&format!(
        "{program} {} in {} (timeout {} s)",
        args.join(" "),
        spec.dir.display(),
        spec.timeout.as_secs()
    ));

    let mut command = tokio::process::Command::new(program);
    command
        .args(&args)
        .current_dir(spec.dir)
        .env("BWS_ACTION_NAME", spec.action.as_str())
        .env("BWS_PLATFORM_NAME", &spec.platform.name)
        .env("BWS_PLATFORM_VERSION", &spec.platform.version)
        .env("BWS_ARCHITECTURE", &spec.platform.arch)
        .envs(spec.args.iter())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    #[cfg(unix)]
    command.process_group(0);
    // Without process groups, at least the script itself must not outlive a dropped run.
    #[cfg(not(unix))]
    command.kill_on_drop(true);

    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(source) => {
            let error = RunnerError::Spawn {
                program: program.to_string(),
                action: spec.action,
                dir: spec.dir.to_path_buf(),
                source,
            };
            lock_sink(&sink).finish(&format!("not started: {error}"));
            return Err(error);
        }
    };
    // Armed until the script has exited: if this future is dropped (the node shuts down, the
    // caller gives up), the whole group goes with it rather than running on unsupervised.
    let mut guard = GroupGuard::new(child.id());
    debug!(
        action = %spec.action,
        dir = %spec.dir.display(),
        pid = ?child.id(),
        "script started"
    );

    let mut pumps = Vec::with_capacity(2);
    if let Some(out) = child.stdout.take() {
        pumps.push(tokio::spawn(pump(out, Arc::clone(&sink))));
    }
    if let Some(err) = child.stderr.take() {
        pumps.push(tokio::spawn(pump(err, Arc::clone(&sink))));
    }

    let status = match tokio::time::timeout(spec.timeout, child.wait()).await {
        Ok(Ok(exit)) => {
            guard.disarm();
            ScriptStatus::from_exit(spec.kind, exit)
        }
        Ok(Err(source)) => {
            // The guard kills the group on the way out.
            let error = RunnerError::Wait {
                action: spec.action,
                source,
            };
            lock_sink(&sink).finish(&format!("lost: {error}"));
            return Err(error);
        }
        Err(_) => {
            warn!(
                action = %spec.action,
                dir = %spec.dir.display(),
                timeout_secs = spec.timeout.as_secs(),
                "script timed out; killing its process group"
            );
            guard.kill();
            #[cfg(not(unix))]
            let _ = child.start_kill();
            // Reap it; after SIGKILL this does not wait long.
            if let Err(e) = child.wait().await {
                warn!(action = %spec.action, error = %e, "cannot reap a killed script");
            }
            guard.disarm();
            ScriptStatus::TimedOut {
                after_secs: spec.timeout.as_secs(),
            }
        }
    };

    // The rest of the output, unless a background process holds the pipes open.
    let drained = tokio::time::timeout(DRAIN_GRACE, futures::future::join_all(&mut pumps)).await;
    if drained.is_err() {
        debug!(
            action = %spec.action,
            "script's output pipes still open after it exited (a background process); \
             finishing the log without them"
        );
    }
    let truncated = {
        let mut sink = lock_sink(&sink);
        sink.finish(&format!("{} {status}", spec.action));
        sink.truncated()
    };
    debug!(action = %spec.action, %status, log = %spec.log_path.display(), "script finished");
    Ok(ScriptResult {
        status,
        log: spec.log_path.to_path_buf(),
        log_truncated: truncated,
    })
}

fn open_log(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Scripts print what they are given, additional arguments included.
        options.mode(0o600);
    }
    options.open(path)
}

/// Copies one pipe into the log until end of file.
async fn pump(mut pipe: impl AsyncRead + Unpin, sink: Arc<Mutex<LogSink>>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => lock_sink(&sink).write(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                debug!(error = %e, "script output pipe failed");
                return;
            }
        }
    }
}

fn lock_sink(sink: &Mutex<LogSink>) -> std::sync::MutexGuard<'_, LogSink> {
    // A panic while holding the lock leaves a log that is at worst missing a chunk.
    sink.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A log file that keeps the first and the last half of the cap.
struct LogSink {
    file: File,
    path: PathBuf,
    head_cap: u64,
    head_written: u64,
    tail: VecDeque<u8>,
    tail_cap: usize,
    /// Bytes dropped between the head and the tail.
    omitted: u64,
    /// The log is finished; anything still arriving is discarded.
    closed: bool,
    /// A write failed (disk full?); stop trying, keep draining.
    failed: bool,
}

impl LogSink {
    fn new(file: File, path: PathBuf, cap: u64) -> LogSink {
        let head_cap = cap / 2;
        LogSink {
            file,
            path,
            head_cap,
            head_written: 0,
            tail: VecDeque::new(),
            tail_cap: usize::try_from(cap - head_cap).unwrap_or(usize::MAX),
            omitted: 0,
            closed: false,
            failed: false,
        }
    }

    fn header(&mut self, line: &str) {
        self.raw(format!("[pkgmesh] running {line}\n").as_bytes());
    }

    fn write(&mut self, mut data: &[u8]) {
        if self.closed {
            return;
        }
        if self.head_written < self.head_cap {
            let room = usize::try_from(self.head_cap - self.head_written).unwrap_or(usize::MAX);
            let now = data.len().min(room);
            self.raw(&data[..now]);
            self.head_written += now as u64;
            data = &data[now..];
        }
        if data.is_empty() {
            return;
        }
        self.tail.extend(data);
        let excess = self.tail.len().saturating_sub(self.tail_cap);
        if excess > 0 {
            self.tail.drain(..excess);
            self.omitted += excess as u64;
        }
    }

    fn truncated(&self) -> bool {
        self.omitted > 0
    }

    /// Writes the kept tail and a closing line; later output is discarded.
    fn finish(&mut self, line: &str) {
        if self.closed {
            return;
        }
        if self.omitted > 0 {
            let marker = format!(
                "\n[pkgmesh] log truncated: {} bytes of output left out here (the log keeps the \
                 first and last {} bytes)\n",
                self.omitted, self.head_cap
            );
            self.raw(marker.as_bytes());
        }
        let tail: Vec<u8> = self.tail.drain(..).collect();
        self.raw(&tail);
        if !tail.is_empty() && tail.last() != Some(&b'\n') {
            self.raw(b"\n");
        }
        self.raw(format!("[pkgmesh] {line}\n").as_bytes());
        if !self.failed {
            if let Err(e) = self.file.sync_data() {
                warn!(log = %self.path.display(), error = %e, "cannot sync script log");
            }
        }
        self.closed = true;
    }

    fn raw(&mut self, bytes: &[u8]) {
        if self.failed || bytes.is_empty() {
            return;
        }
        // Small appends to the page cache; not worth a trip to a blocking thread.
        if let Err(e) = self.file.write_all(bytes) {
            warn!(log = %self.path.display(), error = %e, "cannot write script log; discarding further output");
            self.failed = true;
        }
    }
}

/// Kills the script's process group when dropped while armed.
struct GroupGuard {
    pgid: Option<i32>,
}

impl GroupGuard {
    fn new(pid: Option<u32>) -> GroupGuard {
        // The child leads its own group, so its pid is the group id. Never 0 or 1: killpg on
        // those would hit our own group or init's.
        GroupGuard {
            pgid: pid.and_then(|p| i32::try_from(p).ok()).filter(|&p| p > 1),
        }
    }

    fn disarm(&mut self) {
        self.pgid = None;
    }

    /// SIGKILL to the whole group. Only called before the leader is reaped: its zombie keeps
    /// the group id from being reused.
    fn kill(&mut self) {
        #[cfg(unix)]
        if let Some(pgid) = self.pgid {
            // SAFETY: killpg has no memory-safety preconditions; pgid > 1.
            let rc = unsafe { libc::killpg(pgid, libc::SIGKILL) };
            if rc != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::ESRCH) {
                    warn!(pgid, error = %e, "cannot kill script process group");
                }
            }
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.pgid.is_some() {
            self.kill();
        }
    }
}

/// The last `max_bytes` of a log, as text (invalid UTF-8 replaced). When the log is longer, the
/// first partial line is dropped so the tail starts at a line boundary.
pub fn read_log_tail(path: &Path, max_bytes: u64) -> io::Result<String> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let start = len.saturating_sub(max_bytes);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::with_capacity(usize::try_from(len - start).unwrap_or(0));
    file.take(max_bytes).read_to_end(&mut bytes)?;
    if start > 0 {
        if let Some(newline) = bytes.iter().position(|&b| b == b'\n') {
            bytes.drain(..=newline);
        }
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_rules() {
        assert!(ScriptArgs::new([("SSM_A", "1"), ("SSM_B", "two words")]).is_ok());
        assert_eq!(
            ScriptArgs::new([("PATH", "/x")]),
            Err(ArgsError::MissingPrefix { key: "PATH".into() })
        );
        assert!(matches!(
            ScriptArgs::new([("SSM_A=B", "1")]),
            Err(ArgsError::BadCharacter { part: "key", .. })
        ));
        assert!(matches!(
            ScriptArgs::new([("SSM_A", "1\0")]),
            Err(ArgsError::BadCharacter { part: "value", .. })
        ));
        assert_eq!(
            ScriptArgs::parse(&["SSM_A=1", "SSM_A=2"]),
            Err(ArgsError::Duplicate {
                key: "SSM_A".into()
            })
        );
        assert_eq!(
            ScriptArgs::parse(&["SSM_A"]),
            Err(ArgsError::NotAPair {
                given: "SSM_A".into()
            })
        );
        // Exactly at the limit passes; one more character fails.
        let value = "v".repeat(MAX_ARGS_CHARS - 5);
        assert!(ScriptArgs::new([("SSM_A", value.clone())]).is_ok());
        assert_eq!(
            ScriptArgs::new([("SSM_AB", value)]),
            Err(ArgsError::TooLong {
                total: MAX_ARGS_CHARS + 1
            })
        );
    }

    #[cfg(unix)]
    #[test]
    fn exit_codes() {
        use std::os::unix::process::ExitStatusExt;
        let exit = |code: i32| std::process::ExitStatus::from_raw(code << 8);
        assert_eq!(
            ScriptStatus::from_exit(ScriptKind::Shell, exit(0)),
            ScriptStatus::Succeeded
        );
        assert_eq!(
            ScriptStatus::from_exit(ScriptKind::Shell, exit(194)),
            ScriptStatus::RebootRequired { code: 194 }
        );
        // 3010 is the PowerShell convention only; a shell cannot even exit with it (it wraps
        // to 194, which is why the agent picked 194).
        assert_eq!(
            ScriptStatus::from_exit(ScriptKind::PowerShell, exit(194)),
            ScriptStatus::Failed { code: 194 }
        );
        assert_eq!(
            ScriptStatus::from_exit(ScriptKind::Shell, exit(1)),
            ScriptStatus::Failed { code: 1 }
        );
        assert_eq!(
            ScriptStatus::from_exit(ScriptKind::Shell, std::process::ExitStatus::from_raw(9)),
            ScriptStatus::Killed { signal: 9 }
        );
    }

    #[test]
    fn log_sink_keeps_head_and_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.log");
        let file = open_log(&path).expect("log");
        let mut sink = LogSink::new(file, path.clone(), 10);
        sink.write(b"abcdefgh");
        sink.write(b"ijklmnop");
        assert!(sink.truncated());
        sink.finish("done");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(
            text.starts_with("abcde\n[pkgmesh] log truncated: 6 bytes"),
            "{text}"
        );
        assert!(text.ends_with("\nlmnop\n[pkgmesh] done\n"), "{text}");
        // Under the cap nothing is left out and the order is kept.
        let path = dir.path().join("b.log");
        let mut sink = LogSink::new(open_log(&path).expect("log"), path.clone(), 10);
        sink.write(b"12345678");
        sink.finish("done");
        assert!(!sink.truncated());
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "12345678\n[pkgmesh] done\n"
        );
    }

    #[test]
    fn log_tail_starts_at_a_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.log");
        std::fs::write(&path, "first line\nsecond line\nthird\n").expect("write");
        assert_eq!(read_log_tail(&path, 14).expect("tail"), "third\n");
        assert_eq!(
            read_log_tail(&path, 1000).expect("tail"),
            "first line\nsecond line\nthird\n"
        );
    }
}
