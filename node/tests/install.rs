//! The installer against real ZIPs made by the `zip` command, whose scripts run in a real `sh`,
//! append to an event file (`<version> <action>`) and dump their environment and working
//! directory, so each test can assert exactly what ran, in which order, where and with what.

use std::collections::BTreeMap;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use pkgmesh_node::install::{
    read_log_tail, Action, ArgsError, InstallError, InstallOutcome, InstallRecord, InstallRequest,
    InstallState, InstallType, Installer, InstallerOptions, OutcomeStatus, Progress, ScriptArgs,
    ScriptStatus, UninstallRequest,
};
use pkgmesh_node::ziplayout::ZipError;
use pkgmesh_protocol::select::Platform;
use tempfile::TempDir;

const PKG: &str = "acme-agent";

fn platform() -> Platform {
    Platform::new("ubuntu", "22.04", "x86_64")
}

/// A data dir, a folder the scripts write their marks into, and a folder of ZIPs.
struct Env {
    _tmp: TempDir,
    root: PathBuf,
    data: PathBuf,
    marks: PathBuf,
    zips: PathBuf,
    counter: AtomicU32,
}

impl Env {
    fn new() -> Env {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().canonicalize().expect("canonical tempdir");
        let env = Env {
            data: root.join("data"),
            marks: root.join("marks"),
            zips: root.join("zips"),
            root,
            _tmp: tmp,
            counter: AtomicU32::new(0),
        };
        for dir in [&env.data, &env.marks, &env.zips] {
            std::fs::create_dir_all(dir).expect("mkdir");
        }
        env
    }

    fn installer(&self) -> Installer {
        self.installer_with(InstallerOptions::default())
    }

    fn installer_with(&self, options: InstallerOptions) -> Installer {
        // Reopening right after a drop can meet the database's file lock still held for an
        // instant by a child another test thread is spawning (it inherits descriptors until
        // exec); try again briefly before failing.
        let mut tries = 0;
        loop {
            match Installer::open(&self.data, platform(), options.clone()) {
                Ok(installer) => return installer,
                Err(e) if tries < 50 => {
                    tries += 1;
                    eprintln!("open installer: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("open installer: {e}"),
            }
        }
    }

    fn mark(&self, name: &str) -> PathBuf {
        self.marks.join(name)
    }

    /// The script for `action` of `version`: records itself, then runs `extra`.
    fn script(&self, version: &str, action: &str, extra: &str) -> String {
        let marks = self.marks.display();
        format!(
            "echo \"{version} {action}\" >> '{marks}/events'\n\
             env > '{marks}/{version}-{action}.env'\n\
             pwd > '{marks}/{version}-{action}.pwd'\n\
             echo \"{action} of {version} says hello\"\n\
             {extra}\n"
        )
    }

    /// A package folder with `install` and `uninstall` (always) and whatever else `scripts`
    /// names, each `(action, extra shell code)`.
    fn package_dir(&self, version: &str, scripts: &[(&str, &str)]) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let dir = self.root.join(format!("src-{version}-{n}"));
        std::fs::create_dir_all(dir.join("bin")).expect("mkdir");
        let mut actions: BTreeMap<&str, &str> = [("install", ""), ("uninstall", "")].into();
        actions.extend(scripts.iter().copied());
        for (action, extra) in actions {
            let path = dir.join(format!("{action}.sh"));
            std::fs::write(&path, self.script(version, action, extra)).expect("write script");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        std::fs::write(dir.join("VERSION"), format!("{version}\n")).expect("write");
        std::fs::write(dir.join("bin/tool"), "#!/bin/sh\necho tool\n").expect("write");
        dir
    }

    /// Zips a folder's contents with the real `zip` command (`extra` names more paths to add).
    fn zip_dir(&self, dir: &Path, args: &[&str], extra: &[&str]) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let out = self.zips.join(format!("pkg-{n}.zip"));
        let status = Command::new("zip")
            .current_dir(dir)
            .arg("-q")
            .args(args)
            .arg("-r")
            .arg(&out)
            .arg(".")
            .args(extra)
            .status()
            .expect("the `zip` command is needed (apt-get install zip)");
        assert!(status.success(), "zip failed");
        out
    }

    fn package(&self, version: &str, scripts: &[(&str, &str)]) -> PathBuf {
        let dir = self.package_dir(version, scripts);
        self.zip_dir(&dir, &[], &[])
    }

    fn events(&self) -> Vec<String> {
        match std::fs::read_to_string(self.mark("events")) {
            Ok(text) => text.lines().map(str::to_string).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => panic!("events: {e}"),
        }
    }

    /// The environment a script saw.
    fn env_of(&self, version: &str, action: &str) -> BTreeMap<String, String> {
        let text = std::fs::read_to_string(self.mark(&format!("{version}-{action}.env")))
            .expect("script env dump");
        text.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pwd_of(&self, version: &str, action: &str) -> PathBuf {
        let text = std::fs::read_to_string(self.mark(&format!("{version}-{action}.pwd")))
            .expect("script pwd dump");
        PathBuf::from(text.trim_end())
    }

    fn version_dir(&self, version: &str) -> PathBuf {
        self.data.join("packages").join(PKG).join(version)
    }

    /// The version folders of the package, sorted.
    fn versions_on_disk(&self) -> Vec<String> {
        let dir = self.data.join("packages").join(PKG);
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn staging_entries(&self) -> usize {
        std::fs::read_dir(self.data.join("packages/.staging"))
            .expect("staging dir")
            .count()
    }

    /// Every path under the test's root, relative to it.
    fn all_paths(&self) -> Vec<String> {
        fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).expect("read_dir") {
                let entry = entry.expect("entry");
                let path = entry.path();
                out.push(
                    path.strip_prefix(root)
                        .expect("under root")
                        .display()
                        .to_string(),
                );
                if entry.file_type().expect("type").is_dir() {
                    walk(&path, root, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root, &self.root, &mut out);
        out.sort();
        out
    }
}

fn request(version: &str, zip: &Path) -> InstallRequest {
    InstallRequest::new(PKG, version, zip)
}

async fn install(installer: &Installer, req: InstallRequest) -> InstallOutcome {
    installer.install(req, |_| {}).await.expect("install runs")
}

fn record(installer: &Installer) -> InstallRecord {
    installer
        .record(PKG)
        .expect("read record")
        .expect("record exists")
}

fn statuses(outcome: &InstallOutcome) -> Vec<(Action, String, ScriptStatus)> {
    outcome
        .actions
        .iter()
        .map(|a| (a.action, a.version.clone(), a.status.clone()))
        .collect()
}

fn ok(action: Action, version: &str) -> (Action, String, ScriptStatus) {
    (action, version.to_string(), ScriptStatus::Succeeded)
}

/// True once `pid` is gone (or a zombie: dead, waiting for a parent that may never reap it).
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
    }
}

async fn wait_for_file(path: &Path) {
    while !path.exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn fresh_install_runs_install_in_the_version_folder_with_the_agent_environment() {
    let env = Env::new();
    let installer = env.installer();
    assert!(installer.recover().await.expect("recover").is_empty());
    let zip = env.package("1.0", &[]);
    let mut progress = Vec::new();
    let outcome = installer
        .install(request("1.0", &zip), |p| progress.push(p))
        .await
        .expect("install");

    assert_eq!(outcome.status, OutcomeStatus::Installed);
    assert!(outcome.succeeded());
    assert_eq!(outcome.installed_version.as_deref(), Some("1.0"));
    assert_eq!(outcome.exit_code, Some(0));
    assert!(!outcome.reboot_required);
    assert_eq!(statuses(&outcome), [ok(Action::Install, "1.0")]);
    assert_eq!(env.events(), ["1.0 install"]);

    // Ran from the extracted folder, which holds exactly the ZIP's files.
    let dir = env.version_dir("1.0");
    assert_eq!(env.pwd_of("1.0", "install"), dir);
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("version dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["VERSION", "bin", "install.sh", "uninstall.sh"]);
    assert_eq!(
        std::fs::read_to_string(dir.join("VERSION")).expect("VERSION"),
        "1.0\n"
    );
    assert_eq!(env.staging_entries(), 0);

    // The node's environment plus the four BWS_ variables.
    let seen = env.env_of("1.0", "install");
    assert_eq!(seen["BWS_ACTION_NAME"], "install");
    assert_eq!(seen["BWS_PLATFORM_NAME"], "ubuntu");
    assert_eq!(seen["BWS_PLATFORM_VERSION"], "22.04");
    assert_eq!(seen["BWS_ARCHITECTURE"], "x86_64");
    assert_eq!(
        seen.get("PATH").map(String::as_str),
        std::env::var("PATH").ok().as_deref()
    );
    assert!(!seen.keys().any(|k| k.starts_with("SSM_")), "{seen:?}");

    let rec = record(&installer);
    assert_eq!(rec.state, InstallState::Installed);
    assert_eq!(rec.installed_version.as_deref(), Some("1.0"));
    assert_eq!(rec.target_version.as_deref(), Some("1.0"));
    assert_eq!(rec.previous_version, None);
    assert_eq!(rec.install_type, InstallType::UninstallAndReinstall);
    assert_eq!(rec.last_action, Some(Action::Install));
    assert_eq!(rec.last_exit_code, Some(0));
    assert!(!rec.reboot_required);
    assert_eq!(rec.message, None);
    assert!(rec.updated_at > 0);

    // The log is kept with the record and readable as a tail.
    let log = rec.log_path.clone().expect("log path");
    assert!(log.starts_with(env.data.join("installs/logs").join(PKG).join("1.0")));
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(
        text.starts_with("[pkgmesh] running sh install.sh in "),
        "{text}"
    );
    assert!(text.contains("install of 1.0 says hello\n"), "{text}");
    assert_eq!(
        read_log_tail(&log, 200).expect("tail").lines().last(),
        Some("[pkgmesh] install succeeded (exit code 0)")
    );

    assert_eq!(
        progress,
        [
            Progress::Extracting {
                name: PKG.into(),
                version: "1.0".into()
            },
            Progress::Running {
                action: Action::Install,
                version: "1.0".into(),
                log: log.clone()
            },
            Progress::Finished {
                action: Action::Install,
                version: "1.0".into(),
                status: ScriptStatus::Succeeded
            },
        ]
    );
    assert_eq!(installer.installed().expect("installed"), [rec]);
}

#[tokio::test]
async fn same_version_again_runs_nothing() {
    let env = Env::new();
    let installer = env.installer();
    let zip = env.package("1.0", &[]);
    install(&installer, request("1.0", &zip)).await;
    let before = record(&installer);

    let mut progress = Vec::new();
    let again = installer
        .install(request("1.0", &zip), |p| progress.push(p))
        .await
        .expect("install");
    assert_eq!(again.status, OutcomeStatus::AlreadyInstalled);
    assert!(again.actions.is_empty());
    assert!(progress.is_empty(), "{progress:?}");
    assert_eq!(env.events(), ["1.0 install"]);
    assert_eq!(record(&installer), before);
}

#[tokio::test]
async fn same_version_with_passing_validate_runs_only_validate() {
    let env = Env::new();
    let installer = env.installer();
    let healthy = env.mark("healthy");
    let zip = env.package(
        "1.0",
        &[
            ("install", &format!("touch '{}'", healthy.display())),
            ("validate", &format!("test -e '{}'", healthy.display())),
        ],
    );
    let first = install(&installer, request("1.0", &zip)).await;
    assert_eq!(
        statuses(&first),
        [ok(Action::Install, "1.0"), ok(Action::Validate, "1.0")]
    );
    let before = record(&installer);

    let again = install(&installer, request("1.0", &zip)).await;
    assert_eq!(again.status, OutcomeStatus::AlreadyInstalled);
    assert_eq!(statuses(&again), [ok(Action::Validate, "1.0")]);
    assert_eq!(
        env.events(),
        ["1.0 install", "1.0 validate", "1.0 validate"]
    );
    assert_eq!(record(&installer), before);

    // Broken installation: validate fails, so the same version is reinstalled.
    std::fs::remove_file(&healthy).expect("rm");
    let repaired = install(&installer, request("1.0", &zip)).await;
    assert_eq!(repaired.status, OutcomeStatus::Installed);
    assert_eq!(
        statuses(&repaired),
        [
            (
                Action::Validate,
                "1.0".to_string(),
                ScriptStatus::Failed { code: 1 }
            ),
            ok(Action::Uninstall, "1.0"),
            ok(Action::Install, "1.0"),
            ok(Action::Validate, "1.0"),
        ]
    );
    assert_eq!(
        env.events()[3..],
        [
            "1.0 validate",
            "1.0 uninstall",
            "1.0 install",
            "1.0 validate"
        ]
    );
    let rec = record(&installer);
    assert_eq!(rec.state, InstallState::Installed);
    assert_eq!(rec.installed_version.as_deref(), Some("1.0"));
    assert_eq!(rec.previous_version.as_deref(), Some("1.0"));
    assert_eq!(env.versions_on_disk(), ["1.0"]);
    assert!(healthy.exists());
}

#[tokio::test]
async fn upgrade_uninstalls_the_old_version_then_installs_the_new() {
    let env = Env::new();
    let installer = env.installer();
    install(&installer, request("1.0", &env.package("1.0", &[]))).await;
    let outcome = install(&installer, request("2.0", &env.package("2.0", &[]))).await;

    assert_eq!(outcome.status, OutcomeStatus::Installed);
    assert_eq!(
        statuses(&outcome),
        [ok(Action::Uninstall, "1.0"), ok(Action::Install, "2.0")]
    );
    assert_eq!(
        env.events(),
        ["1.0 install", "1.0 uninstall", "2.0 install"]
    );
    // The old uninstall ran from the old folder, the new install from the new one.
    assert_eq!(env.pwd_of("1.0", "uninstall"), env.version_dir("1.0"));
    assert_eq!(env.pwd_of("2.0", "install"), env.version_dir("2.0"));
    assert_eq!(
        env.env_of("1.0", "uninstall")["BWS_ACTION_NAME"],
        "uninstall"
    );
    // The old folder is gone once the upgrade succeeded.
    assert_eq!(env.versions_on_disk(), ["2.0"]);
    assert_eq!(env.staging_entries(), 0);

    let rec = record(&installer);
    assert_eq!(rec.state, InstallState::Installed);
    assert_eq!(rec.installed_version.as_deref(), Some("2.0"));
    assert_eq!(rec.previous_version.as_deref(), Some("1.0"));
    assert_eq!(rec.last_action, Some(Action::Install));
}

#[tokio::test]
async fn in_place_update_runs_only_the_new_update_script() {
    let env = Env::new();
    let installer = env.installer();
    install(&installer, request("1.0", &env.package("1.0", &[]))).await;

    // No update script: refused before anything runs or is written.
    let mut req = request("2.0", &env.package("2.0", &[]));
    req.install_type = InstallType::InPlace;
    let before = record(&installer);
    let err = installer
        .install(req, |_| {})
        .await
        .expect_err("no update script");
    assert!(
        matches!(&err, InstallError::NoUpdateScript { name, version } if name == PKG && version == "2.0"),
        "{err}"
    );
    assert!(err.to_string().contains("update.sh"), "{err}");
    assert_eq!(env.events(), ["1.0 install"]);
    assert_eq!(record(&installer), before);
    assert_eq!(env.versions_on_disk(), ["1.0"]);
    assert_eq!(env.staging_entries(), 0);

    let mut req = request("2.0", &env.package("2.0", &[("update", "")]));
    req.install_type = InstallType::InPlace;
    let outcome = install(&installer, req).await;
    assert_eq!(outcome.status, OutcomeStatus::Installed);
    assert_eq!(statuses(&outcome), [ok(Action::Update, "2.0")]);
    assert_eq!(env.events(), ["1.0 install", "2.0 update"]);
    assert_eq!(env.env_of("2.0", "update")["BWS_ACTION_NAME"], "update");
    assert_eq!(env.pwd_of("2.0", "update"), env.version_dir("2.0"));
    assert_eq!(env.versions_on_disk(), ["2.0"]);
    let rec = record(&installer);
    assert_eq!(rec.state, InstallState::Installed);
    assert_eq!(rec.install_type, InstallType::InPlace);
    assert_eq!(rec.installed_version.as_deref(), Some("2.0"));
    assert_eq!(rec.previous_version.as_deref(), Some("1.0"));
    assert_eq!(rec.last_action, Some(Action::Update));
}

#[tokio::test]
async fn failed_install_rolls_back_to_the_previous_version() {
    let env = Env::new();
    let installer = env.installer();
    install(&installer, request("1.0", &env.package("1.0", &[]))).await;
    let mut progress = Vec::new();
    let outcome = installer
        .install(
            request("2.0", &env.package("2.0", &[("install", "exit 3")])),
            |p| progress.push(p),
        )
        .await
        .expect("install runs");

    assert_eq!(outcome.status, OutcomeStatus::RolledBack);
    assert!(!outcome.succeeded());
    assert_eq!(outcome.failed_action, Some(Action::Install));
    assert_eq!(outcome.exit_code, Some(3));
    assert_eq!(outcome.installed_version.as_deref(), Some("1.0"));
    assert_eq!(
        statuses(&outcome),
        [
            ok(Action::Uninstall, "1.0"),
            (
                Action::Install,
                "2.0".to_string(),
                ScriptStatus::Failed { code: 3 }
            ),
            ok(Action::Uninstall, "2.0"),
            ok(Action::Install, "1.0"),
        ]
    );
    assert_eq!(
        env.events(),
        [
            "1.0 install",
            "1.0 uninstall",
            "2.0 install",
            "2.0 uninstall",
            "1.0 install"
        ]
    );
    assert!(progress.iter().any(|p| matches!(
        p,
        Progress::RollingBack { version, .. } if version == "2.0"
    )));
    // The failed version's folder is gone; the previous one is in place.
    assert_eq!(env.versions_on_disk(), ["1.0"]);
    assert_eq!(env.staging_entries(), 0);

    let rec = record(&installer);
    assert_eq!(rec.state, InstallState::RolledBack);
    assert_eq!(rec.installed_version.as_deref(), Some("1.0"));
    assert_eq!(rec.target_version.as_deref(), Some("2.0"));
    assert_eq!(rec.previous_version.as_deref(), Some("1.0"));
    assert_eq!(rec.last_action, Some(Action::Install));
    assert_eq!(rec.last_exit_code, Some(3));
    let message = rec.message.clone().expect("message");
    assert!(
        message.contains("install of acme-agent 2.0 failed with exit code 3"),
        "{message}"
    );
    // The record points at the failed script's log.
    let log = rec.log_path.clone().expect("log");
    assert!(read_log_tail(&log, 4096)
        .expect("tail")
        .contains("[pkgmesh] install failed with exit code 3"));

    // Rolled back to 1.0 counts as 1.0 installed.
    let again = install(&installer, request("1.0", &env.package("1.0", &[]))).await;
    assert_eq!(again.status, OutcomeStatus::AlreadyInstalled);
}

#[tokio::test]
async fn failing_validate_rolls_back() {
    let env = Env::new();
    let installer = env.installer();
    install(&installer, request("1.0", &env.package("1.0", &[]))).await;
    let outcome = install(
        &installer,
        request("2.0", &env.package("2.0", &[("validate", "exit 1")])),
    )
    .await;

    assert_eq!(outcome.status, OutcomeStatus::RolledBack);
    assert_eq!(outcome.failed_action, Some(Action::Validate));
    assert_eq!(outcome.exit_code, Some(1));
    assert_eq!(
        env.events(),
        [
            "1.0 install",
            "1.0 uninstall",
            "2.0 install",
            "2.0 validate",
            "2.0 uninstall",
            "1.0 install"
        ]
    );
    assert_eq!(env.env_of("2.0", "validate")["BWS_ACTION_NAME"], "validate");
    assert_eq!(env.versions_on_disk(), ["1.0"]);
    let rec = record(&installer);
    assert_eq!(rec.state, InstallState::RolledBack);
    assert_eq!(rec.installed_version.as_deref(), Some("1.0"));
    assert_eq!(rec.last_action, Some(Action::Validate));
    assert_eq!(rec.last_exit_code, Some(1));
}

#[tokio::test]
async fn failed_first_install_has_nothing_to_roll_back_to() {
    let env = Env::new();
    let installer = env.installer();
    let outcome = install(
        &installer,
        request("1.0", &env.package("1.0", &[("install", "exit 42")])),
    )
    .await;
    assert_eq!(outcome.status, OutcomeStatus::Failed);
    assert_eq!(outcome.exit_code, Some(42));
    assert_eq!(outcome.installed_version, None);
    assert_eq!(env.events(), ["1.0 install", "1.0 uninstall"]);
    assert!(env.versions_on_disk().is_empty());
    let rec = record(&installer);
    assert_eq!(rec.state, InstallState::Failed);
    assert_eq!(rec.installed_version, None);
    assert_eq!(rec.target_version.as_deref(), Some("1.0"));
    assert_eq!(rec.last_exit_code, Some(42));
}

#[tokio::test]
async fn timeout_kills_the_script_and_the_children_it_spawned() {
    let env = Env::new();
    let installer = env.installer();
    let pid_file = env.mark("child.pid");
    let zip = env.package(
        "1.0",
        &[(
            "install",
            &format!(
                "sleep 600 &\necho $! > '{}.tmp'\nmv '{0}.tmp' '{0}'\nwait",
                pid_file.display()
            ),
        )],
    );
    let mut req = request("1.0", &zip);
    req.timeout = Some(Duration::from_secs(1));
    let outcome = install(&installer, req).await;

    assert_eq!(outcome.status, OutcomeStatus::Failed);
    assert_eq!(outcome.failed_action, Some(Action::Install));
    assert_eq!(outcome.exit_code, None);
    assert_eq!(
        statuses(&outcome),
        [
            (
                Action::Install,
                "1.0".to_string(),
                ScriptStatus::TimedOut { after_secs: 1 }
            ),
            ok(Action::Uninstall, "1.0"),
        ]
    );
    let child: u32 = std::fs::read_to_string(&pid_file)
        .expect("child pid")
        .trim()
        .parse()
        .expect("pid");
    // SIGKILL was sent to the whole group before install() returned; give the kernel a
    // moment to finish tearing the process down.
    for _ in 0..500 {
        if process_gone(child) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        process_gone(child),
        "child sleep {child} survived the timeout"
    );

    let rec = record(&installer);
    assert_eq!(rec.state, InstallState::Failed);
    assert_eq!(rec.last_exit_code, None);
    let message = rec.message.expect("message");
    assert!(message.contains("timed out after 1 s"), "{message}");
    let log = rec.log_path.expect("log");
    assert!(read_log_tail(&log, 4096)
        .expect("tail")
        .contains("[pkgmesh] install timed out after 1 s"));
}

#[tokio::test]
async fn exit_194_is_success_with_reboot_required() {
    let env = Env::new();
    let installer = env.installer();
    let outcome = install(
        &installer,
        request("1.0", &env.package("1.0", &[("install", "exit 194")])),
    )
    .await;
    assert_eq!(outcome.status, OutcomeStatus::Installed);
    assert!(outcome.reboot_required);
    assert_eq!(outcome.exit_code, Some(194));
    assert_eq!(
        statuses(&outcome),
        [(
            Action::Install,
            "1.0".to_string(),
            ScriptStatus::RebootRequired { code: 194 }
        )]
    );
    let rec = record(&installer);
    assert_eq!(rec.state, InstallState::Installed);
    assert_eq!(rec.installed_version.as_deref(), Some("1.0"));
    assert!(rec.reboot_required);
    assert_eq!(rec.last_exit_code, Some(194));
    assert_eq!(env.events(), ["1.0 install"]);
}

#[tokio::test]
async fn ssm_arguments_reach_the_script_as_environment_variables() {
    let env = Env::new();
    let installer = env.installer();
    let pwned = env.mark("pwned");
    let tricky = format!(
        "a b; touch '{}' $(touch '{0}') `touch '{0}'`",
        pwned.display()
    );
    let mut req = request("1.0", &env.package("1.0", &[]));
    req.args = ScriptArgs::parse(&[
        "SSM_REGION=eu-west-1".to_string(),
        format!("SSM_TRICKY={tricky}"),
        "SSM_EMPTY=".to_string(),
    ])
    .expect("args");
    install(&installer, req).await;

    let seen = env.env_of("1.0", "install");
    let ssm: BTreeMap<&str, &str> = seen
        .iter()
        .filter(|(k, _)| k.starts_with("SSM_"))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        ssm,
        BTreeMap::from([
            ("SSM_EMPTY", ""),
            ("SSM_REGION", "eu-west-1"),
            ("SSM_TRICKY", tricky.as_str()),
        ])
    );
    // Never seen by a shell as code.
    assert!(!pwned.exists());
    // Arguments are not stored with the record (they may be secrets).
    let json = format!("{:?}", record(&installer));
    assert!(!json.contains("eu-west-1"), "{json}");

    // A key without the prefix, and too many characters, are refused with clear errors.
    let err = ScriptArgs::parse(&["REGION=eu-west-1"]).expect_err("no prefix");
    assert_eq!(
        err,
        ArgsError::MissingPrefix {
            key: "REGION".into()
        }
    );
    assert!(
        err.to_string().contains("\"REGION\"") && err.to_string().contains("SSM_"),
        "{err}"
    );
    let long = format!("SSM_BIG={}", "x".repeat(4096));
    let err = ScriptArgs::parse(&[long]).expect_err("too long");
    assert_eq!(err, ArgsError::TooLong { total: 4096 + 7 });
    assert!(err.to_string().contains("4096"), "{err}");
    // Exactly 4096 characters is allowed.
    assert!(ScriptArgs::parse(&[format!("SSM_BIG={}", "x".repeat(4096 - 7))]).is_ok());
}

/// Installs `zip`, expecting extraction to refuse it; checks nothing ran and nothing stayed.
async fn assert_refused(env: &Env, zip: &Path) -> ZipError {
    let installer = env.installer();
    let before = env.all_paths();
    let err = installer
        .install(request("1.0", zip), |_| {})
        .await
        .expect_err("refused");
    let InstallError::Zip {
        name,
        version,
        source,
    } = err
    else {
        panic!("expected a ZIP error, got {err}");
    };
    assert_eq!((name.as_str(), version.as_str()), (PKG, "1.0"));
    assert!(env.events().is_empty());
    assert_eq!(installer.record(PKG).expect("record"), None);
    assert!(env.versions_on_disk().is_empty());
    assert_eq!(env.staging_entries(), 0);
    // Nothing new anywhere but the lock file.
    let after: Vec<String> = env
        .all_paths()
        .into_iter()
        .filter(|p| !p.ends_with(&format!("{PKG}.lock")))
        .collect();
    assert_eq!(after, before);
    *source
}

#[tokio::test]
async fn zip_with_parent_directory_entries_is_refused() {
    let env = Env::new();
    let dir = env.package_dir("1.0", &[]);
    std::fs::write(env.root.join("evil"), "outside").expect("write");
    // Run in the package folder, naming a file one level up: zip stores it as "../evil".
    let zip = env.zip_dir(&dir, &[], &["../evil"]);
    // Open the installer first so its folders count as "before".
    drop(env.installer());
    let err = assert_refused(&env, &zip).await;
    assert!(
        matches!(err, ZipError::PathTraversal { ref entry, .. } if entry == "../evil"),
        "{err}"
    );
    assert!(!env.data.join("packages/evil").exists());
    assert!(!env.data.join("evil").exists());
}

#[tokio::test]
async fn zip_with_a_symlink_entry_is_refused() {
    let env = Env::new();
    let dir = env.package_dir("1.0", &[]);
    symlink("/etc/passwd", dir.join("passwd")).expect("symlink");
    let zip = env.zip_dir(&dir, &["--symlinks"], &[]);
    drop(env.installer());
    let err = assert_refused(&env, &zip).await;
    assert!(
        matches!(err, ZipError::Symlink { ref entry, .. } if entry == "passwd"),
        "{err}"
    );
}

#[tokio::test]
async fn compression_bomb_is_refused() {
    let env = Env::new();
    let dir = env.package_dir("1.0", &[]);
    // 200 MiB of zeros (a sparse file, so the test does not write it), about 200 KiB zipped.
    std::fs::File::create(dir.join("bomb.bin"))
        .and_then(|f| f.set_len(200 * 1024 * 1024))
        .expect("bomb");
    let zip = env.zip_dir(&dir, &[], &[]);
    std::fs::remove_file(dir.join("bomb.bin")).expect("rm");
    assert!(std::fs::metadata(&zip).expect("zip").len() < 2 * 1024 * 1024);
    drop(env.installer());
    let err = assert_refused(&env, &zip).await;
    assert!(
        matches!(err, ZipError::RatioExceeded { ref entry, .. } if entry == "bomb.bin"),
        "{err}"
    );
}

#[tokio::test]
async fn state_survives_reopening() {
    let env = Env::new();
    let rec = {
        let installer = env.installer();
        install(&installer, request("1.0", &env.package("1.0", &[]))).await;
        record(&installer)
    };
    let installer = env.installer();
    assert!(installer.recover().await.expect("recover").is_empty());
    assert_eq!(record(&installer), rec);
    assert_eq!(installer.installed().expect("list"), [rec]);
    assert_eq!(env.versions_on_disk(), ["1.0"]);
    let again = install(&installer, request("1.0", &env.package("1.0", &[]))).await;
    assert_eq!(again.status, OutcomeStatus::AlreadyInstalled);
}

#[tokio::test]
async fn recover_rolls_back_an_install_interrupted_by_a_restart() {
    let env = Env::new();
    let started = env.mark("started");
    let zip2 = env.package(
        "2.0",
        &[(
            "install",
            &format!("touch '{}'\nsleep 600", started.display()),
        )],
    );
    {
        let installer = env.installer();
        install(&installer, request("1.0", &env.package("1.0", &[]))).await;
        // The node "dies" while 2.0's install script runs: the install future is dropped.
        let interrupted = installer.install(request("2.0", &zip2), |_| {});
        tokio::select! {
            result = interrupted => panic!("install finished: {result:?}"),
            () = wait_for_file(&started) => {}
        }
        let rec = record(&installer);
        assert_eq!(rec.state, InstallState::Installing);
        assert_eq!(rec.installed_version.as_deref(), Some("1.0"));
        assert_eq!(rec.target_version.as_deref(), Some("2.0"));
    }
    assert_eq!(env.versions_on_disk(), ["1.0", "2.0"]);

    let installer = env.installer();
    let recovered = installer.recover().await.expect("recover");
    assert_eq!(recovered.len(), 1);
    let rec = record(&installer);
    assert_eq!(recovered[0], rec);
    assert_eq!(rec.state, InstallState::RolledBack);
    assert_eq!(rec.installed_version.as_deref(), Some("1.0"));
    assert_eq!(rec.target_version.as_deref(), Some("2.0"));
    assert_eq!(rec.previous_version.as_deref(), Some("1.0"));
    let message = rec.message.clone().expect("message");
    assert!(
        message.contains("the node stopped during an install of 2.0"),
        "{message}"
    );
    assert_eq!(
        env.events(),
        [
            "1.0 install",
            "1.0 uninstall",
            "2.0 install",
            "2.0 uninstall",
            "1.0 install"
        ]
    );
    assert_eq!(env.versions_on_disk(), ["1.0"]);
    assert_eq!(env.staging_entries(), 0);
    // Known state now: a second recovery has nothing to do.
    assert!(installer.recover().await.expect("recover").is_empty());
    assert_eq!(record(&installer), rec);
}

#[tokio::test]
async fn recover_finishes_an_interrupted_uninstall() {
    let env = Env::new();
    let block = env.mark("block");
    let started = env.mark("started");
    let zip = env.package(
        "1.0",
        &[(
            "uninstall",
            &format!(
                "if [ -e '{}' ]; then touch '{}'; sleep 600; fi",
                block.display(),
                started.display()
            ),
        )],
    );
    {
        let installer = env.installer();
        install(&installer, request("1.0", &zip)).await;
        std::fs::write(&block, "").expect("write");
        let interrupted = installer.uninstall(UninstallRequest::new(PKG), |_| {});
        tokio::select! {
            result = interrupted => panic!("uninstall finished: {result:?}"),
            () = wait_for_file(&started) => {}
        }
        assert_eq!(record(&installer).state, InstallState::Uninstalling);
    }
    std::fs::remove_file(&block).expect("rm");
    let installer = env.installer();
    let recovered = installer.recover().await.expect("recover");
    assert_eq!(recovered.len(), 1);
    let rec = record(&installer);
    assert_eq!(rec.state, InstallState::Uninstalled);
    assert_eq!(rec.installed_version, None);
    assert!(rec
        .message
        .as_deref()
        .unwrap_or_default()
        .contains("the node stopped during an uninstall of 1.0"));
    assert_eq!(
        env.events(),
        ["1.0 install", "1.0 uninstall", "1.0 uninstall"]
    );
    assert!(env.versions_on_disk().is_empty());
}

#[tokio::test]
async fn uninstall_runs_the_installed_versions_script_and_removes_its_folder() {
    let env = Env::new();
    let installer = env.installer();
    install(&installer, request("1.0", &env.package("1.0", &[]))).await;
    let outcome = installer
        .uninstall(UninstallRequest::new(PKG), |_| {})
        .await
        .expect("uninstall");
    assert_eq!(outcome.status, OutcomeStatus::Uninstalled);
    assert_eq!(outcome.version, "1.0");
    assert_eq!(outcome.installed_version, None);
    assert_eq!(statuses(&outcome), [ok(Action::Uninstall, "1.0")]);
    assert_eq!(env.events(), ["1.0 install", "1.0 uninstall"]);
    assert_eq!(env.pwd_of("1.0", "uninstall"), env.version_dir("1.0"));
    assert!(env.versions_on_disk().is_empty());
    let rec = record(&installer);
    assert_eq!(rec.state, InstallState::Uninstalled);
    assert_eq!(rec.installed_version, None);
    assert_eq!(rec.last_action, Some(Action::Uninstall));
    assert_eq!(rec.last_exit_code, Some(0));
    // The log outlives the folder.
    assert!(rec.log_path.expect("log").is_file());

    let err = installer
        .uninstall(UninstallRequest::new(PKG), |_| {})
        .await
        .expect_err("nothing installed");
    assert!(matches!(err, InstallError::NotInstalled { .. }), "{err}");
}

#[tokio::test]
async fn failing_uninstall_keeps_the_version_installed_and_failed() {
    let env = Env::new();
    let installer = env.installer();
    install(
        &installer,
        request("1.0", &env.package("1.0", &[("uninstall", "exit 5")])),
    )
    .await;
    let outcome = installer
        .uninstall(UninstallRequest::new(PKG), |_| {})
        .await
        .expect("uninstall");
    assert_eq!(outcome.status, OutcomeStatus::Failed);
    assert_eq!(outcome.failed_action, Some(Action::Uninstall));
    assert_eq!(outcome.exit_code, Some(5));
    assert_eq!(outcome.installed_version.as_deref(), Some("1.0"));
    let rec = record(&installer);
    assert_eq!(rec.state, InstallState::Failed);
    assert_eq!(rec.installed_version.as_deref(), Some("1.0"));
    assert_eq!(env.versions_on_disk(), ["1.0"]);
}

#[tokio::test]
async fn a_second_action_on_a_busy_package_is_refused() {
    let env = Env::new();
    let installer = env.installer();
    let (started, go) = (env.mark("started"), env.mark("go"));
    let zip = env.package(
        "1.0",
        &[(
            "install",
            &format!(
                "touch '{}'\nwhile [ ! -e '{}' ]; do sleep 0.05; done",
                started.display(),
                go.display()
            ),
        )],
    );
    let first = installer.install(request("1.0", &zip), |_| {});
    tokio::pin!(first);
    tokio::select! {
        result = &mut first => panic!("install finished early: {result:?}"),
        () = wait_for_file(&started) => {}
    }
    let err = installer
        .install(request("1.0", &zip), |_| {})
        .await
        .expect_err("busy");
    assert!(
        matches!(&err, InstallError::Busy { name, .. } if name == PKG),
        "{err}"
    );
    assert!(err.to_string().contains("busy"), "{err}");
    let err = installer
        .uninstall(UninstallRequest::new(PKG), |_| {})
        .await
        .expect_err("busy");
    assert!(matches!(err, InstallError::Busy { .. }), "{err}");
    // Recovery leaves a package alone while it is busy.
    assert!(installer.recover().await.expect("recover").is_empty());

    std::fs::write(&go, "").expect("write");
    let outcome = first.await.expect("install");
    assert_eq!(outcome.status, OutcomeStatus::Installed);
    assert_eq!(env.events(), ["1.0 install"]);
    // The lock was released with the first action.
    let again = install(&installer, request("1.0", &zip)).await;
    assert_eq!(again.status, OutcomeStatus::AlreadyInstalled);
}

#[tokio::test]
async fn a_chatty_script_cannot_grow_its_log_past_the_cap() {
    let env = Env::new();
    let cap = 64 * 1024;
    let installer = env.installer_with(InstallerOptions {
        log_cap: cap,
        ..InstallerOptions::default()
    });
    // About 2 MB of output.
    let outcome = install(
        &installer,
        request("1.0", &env.package("1.0", &[("install", "seq 1 300000")])),
    )
    .await;
    assert_eq!(outcome.status, OutcomeStatus::Installed);
    let log = record(&installer).log_path.expect("log");
    let size = std::fs::metadata(&log).expect("log").len();
    assert!(size <= cap + 1024, "log is {size} bytes");
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(text.contains("\n1\n2\n3\n"), "head kept");
    assert!(text.contains("[pkgmesh] log truncated: "), "marker");
    // The end of the output, where errors are, is kept.
    let tail = read_log_tail(&log, 100).expect("tail");
    assert!(
        tail.ends_with("299999\n300000\n[pkgmesh] install succeeded (exit code 0)\n"),
        "{tail}"
    );
}

#[tokio::test]
async fn bad_names_are_refused_before_anything_happens() {
    let env = Env::new();
    let installer = env.installer();
    let zip = env.package("1.0", &[]);
    for (name, version) in [
        ("a/b", "1.0"),
        ("acme", ".."),
        (".staging", "1.0"),
        ("ab", "1"),
    ] {
        let err = installer
            .install(InstallRequest::new(name, version, &zip), |_| {})
            .await
            .expect_err("bad name");
        assert!(
            matches!(
                err,
                InstallError::InvalidName(_)
                    | InstallError::UnusableVersion { .. }
                    | InstallError::ReservedName { .. }
            ),
            "{name} {version}: {err}"
        );
    }
    assert!(env.events().is_empty());
    assert!(installer.installed().expect("list").is_empty());
}

#[tokio::test]
async fn an_interrupted_install_is_settled_before_the_next_action() {
    let env = Env::new();
    let started = env.mark("started");
    let hanging = env.package(
        "2.0",
        &[(
            "install",
            &format!("touch '{}'\nsleep 600", started.display()),
        )],
    );
    {
        let installer = env.installer();
        install(&installer, request("1.0", &env.package("1.0", &[]))).await;
        let interrupted = installer.install(request("2.0", &hanging), |_| {});
        tokio::select! {
            result = interrupted => panic!("install finished: {result:?}"),
            () = wait_for_file(&started) => {}
        }
    }
    // Restarted without calling recover(): the next install still starts from a known state.
    let installer = env.installer();
    let outcome = install(&installer, request("2.0", &env.package("2.0", &[]))).await;
    assert_eq!(outcome.status, OutcomeStatus::Installed);
    assert_eq!(
        env.events(),
        [
            "1.0 install",
            "1.0 uninstall",
            "2.0 install",
            // Settling the interrupted install: rolled back to 1.0 ...
            "2.0 uninstall",
            "1.0 install",
            // ... then the new request, from 1.0.
            "1.0 uninstall",
            "2.0 install"
        ]
    );
    let rec = record(&installer);
    assert_eq!(rec.state, InstallState::Installed);
    assert_eq!(rec.installed_version.as_deref(), Some("2.0"));
    assert_eq!(rec.previous_version.as_deref(), Some("1.0"));
    assert_eq!(env.versions_on_disk(), ["2.0"]);
}

#[tokio::test]
async fn a_background_process_started_by_install_keeps_running_and_does_not_block() {
    let env = Env::new();
    let installer = env.installer();
    let pid_file = env.mark("service.pid");
    // A "service" that inherits the script's output pipes and outlives the script.
    let zip = env.package(
        "1.0",
        &[(
            "install",
            &format!(
                "sleep 600 &\necho $! > '{}'\necho service started",
                pid_file.display()
            ),
        )],
    );
    let outcome = install(&installer, request("1.0", &zip)).await;
    assert_eq!(outcome.status, OutcomeStatus::Installed);
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .expect("pid")
        .trim()
        .parse()
        .expect("pid");
    let alive = !process_gone(pid);
    // Clean up before asserting, so a failure does not leave the process behind.
    let _ = Command::new("kill").arg(pid.to_string()).status();
    assert!(alive, "the service started by install.sh was killed");
    let log = record(&installer).log_path.expect("log");
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(text.contains("service started\n"), "{text}");
    assert!(
        text.ends_with("[pkgmesh] install succeeded (exit code 0)\n"),
        "{text}"
    );
}
