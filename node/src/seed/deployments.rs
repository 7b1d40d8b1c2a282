//! The seed's deployments: stored in redb, rolled out by the pure rule in
//! `pkgmesh_protocol::deploy`, and handed to nodes as desired state they long-poll for.
//!
//! Owns: the deployment records (`deployments.redb`), the rollout step over the nodes the
//! tracker knows, new runs when a default version changes or a repeat falls due, and the
//! generation counter nodes wait on. Does not own: the rules themselves (protocol), roles and
//! audit (the service), or installing (nodes).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use pkgmesh_protocol::deploy::{
    rollout_step, takes_precedence, Assignment, DeploymentInfo, DeploymentSpec, DeploymentState,
    DesiredState, InstallReport, NodeDeployState, NodeDeployStatus, NodeView, Schedule,
    VersionSpec, MAX_LOG_TAIL,
};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::watch;

use super::tracker::NodeMeta;

const DEPLOYMENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("deployments");
/// Most deployments kept; creating more asks the operator to cancel old ones first.
pub const MAX_DEPLOYMENTS: usize = 10_000;
/// Nodes listed per deployment in one answer (the counts cover all of them).
pub const MAX_NODES_PER_ANSWER: usize = 1000;
/// Characters of log tail per node in a status answer.
const LOG_TAIL_IN_STATUS: usize = 600;
/// An install in progress on a node the tracker has forgotten is failed after its timeout plus
/// this: a node that died does not hold a concurrency slot for ever.
const LOST_NODE_GRACE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum DeploymentError {
    #[error("deployment store {path}: {message}")]
    Store { path: String, message: String },
    #[error("no deployment {0}")]
    NoSuchDeployment(u64),
    #[error("{0}")]
    Refused(String),
}

/// What the rollout needs of the catalog: a package's default version and whether a version
/// exists.
pub trait VersionSource {
    fn default_version(&self, package: &str) -> Option<String>;
    fn has_version(&self, package: &str, version: &str) -> bool;
}

pub struct Deployments {
    db: redb::Database,
    path: String,
    inner: Mutex<BTreeMap<u64, Record>>,
    generation: watch::Sender<u64>,
}

/// A deployment and when its current run started.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Record {
    info: DeploymentInfo,
    run_started: u64,
}

impl Deployments {
    pub fn open(path: &Path) -> Result<Deployments, DeploymentError> {
        let store_error = |e: &dyn std::fmt::Display| DeploymentError::Store {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let db = redb::Database::create(path).map_err(|e| store_error(&e))?;
        let mut records = BTreeMap::new();
        {
            let write = db.begin_write().map_err(|e| store_error(&e))?;
            write.open_table(DEPLOYMENTS).map_err(|e| store_error(&e))?;
            write.commit().map_err(|e| store_error(&e))?;
            let read = db.begin_read().map_err(|e| store_error(&e))?;
            let table = read.open_table(DEPLOYMENTS).map_err(|e| store_error(&e))?;
            for row in table.iter().map_err(|e| store_error(&e))? {
                let (id, bytes) = row.map_err(|e| store_error(&e))?;
                let record: Record = serde_json::from_slice(bytes.value()).map_err(|e| {
                    store_error(&format!("deployment {} is damaged: {e}", id.value()))
                })?;
                records.insert(id.value(), record);
            }
        }
        let (generation, _) = watch::channel(1);
        Ok(Deployments {
            db,
            path: path.display().to_string(),
            inner: Mutex::new(records),
            generation,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Record>> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn persist(&self, records: &[&Record]) -> Result<(), DeploymentError> {
        let store_error = |e: &dyn std::fmt::Display| DeploymentError::Store {
            path: self.path.clone(),
            message: e.to_string(),
        };
        if records.is_empty() {
            return Ok(());
        }
        let write = self.db.begin_write().map_err(|e| store_error(&e))?;
        {
            let mut table = write.open_table(DEPLOYMENTS).map_err(|e| store_error(&e))?;
            for record in records {
                let bytes = serde_json::to_vec(record).map_err(|e| store_error(&e))?;
                table
                    .insert(record.info.id, bytes.as_slice())
                    .map_err(|e| store_error(&e))?;
            }
        }
        write.commit().map_err(|e| store_error(&e))
    }

    /// Watches the generation: it changes whenever any node's assignments may have changed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn create(
        &self,
        spec: DeploymentSpec,
        created_by: &str,
        versions: &impl VersionSource,
        now: u64,
    ) -> Result<DeploymentInfo, DeploymentError> {
        spec.check()
            .map_err(|e| DeploymentError::Refused(e.to_string()))?;
        match &spec.version {
            VersionSpec::Exact(version) => {
                if !versions.has_version(&spec.package, version) {
                    return Err(DeploymentError::Refused(format!(
                        "package {} has no version {version} in the catalog",
                        spec.package
                    )));
                }
            }
            VersionSpec::Default => {
                if versions.default_version(&spec.package).is_none() {
                    return Err(DeploymentError::Refused(format!(
                        "package {} is not in the catalog",
                        spec.package
                    )));
                }
            }
        }
        let mut records = self.lock();
        if records.len() >= MAX_DEPLOYMENTS {
            return Err(DeploymentError::Refused(format!(
                "{MAX_DEPLOYMENTS} deployments are stored; cancel old ones first"
            )));
        }
        let id = records.keys().next_back().map_or(1, |last| last + 1);
        let record = Record {
            info: DeploymentInfo {
                id,
                spec,
                state: DeploymentState::Active,
                reason: None,
                created_by: created_by.to_string(),
                created_at: now,
                run: 1,
                version: None,
                targeted: Vec::new(),
                nodes: BTreeMap::new(),
            },
            run_started: now,
        };
        self.persist(&[&record])?;
        let info = record.info.clone();
        records.insert(id, record);
        Ok(info)
    }

    pub fn cancel(&self, id: u64) -> Result<DeploymentInfo, DeploymentError> {
        let mut records = self.lock();
        let record = records
            .get_mut(&id)
            .ok_or(DeploymentError::NoSuchDeployment(id))?;
        record.info.state = DeploymentState::Cancelled;
        record.info.reason = Some("cancelled".into());
        let info = record.info.clone();
        self.persist(&[record])?;
        drop(records);
        self.bump();
        Ok(info)
    }

    /// Every deployment, newest first, without per-node detail.
    pub fn list(&self) -> Vec<DeploymentInfo> {
        self.lock()
            .values()
            .rev()
            .map(|record| {
                let mut info = record.info.clone();
                // Counts stay readable from the states; the detail is for `get`.
                for status in info.nodes.values_mut() {
                    status.log_tail.clear();
                    status.message.clear();
                }
                info.nodes = info.nodes.into_iter().take(MAX_NODES_PER_ANSWER).collect();
                info
            })
            .collect()
    }

    pub fn get(&self, id: u64) -> Result<DeploymentInfo, DeploymentError> {
        let records = self.lock();
        let record = records
            .get(&id)
            .ok_or(DeploymentError::NoSuchDeployment(id))?;
        let mut info = record.info.clone();
        info.nodes = info.nodes.into_iter().take(MAX_NODES_PER_ANSWER).collect();
        for status in info.nodes.values_mut() {
            status.log_tail = tail(&status.log_tail, LOG_TAIL_IN_STATUS);
        }
        Ok(info)
    }

    /// A node's report on its assignment. Reports for an old run or a deployment the node was
    /// not started in are ignored (a late report must not undo a newer run).
    pub fn report(
        &self,
        node: &str,
        report: InstallReport,
        now: u64,
    ) -> Result<(), DeploymentError> {
        let mut records = self.lock();
        let record = records
            .get_mut(&report.deployment)
            .ok_or(DeploymentError::NoSuchDeployment(report.deployment))?;
        if record.info.run != report.run {
            return Ok(());
        }
        let Some(status) = record.info.nodes.get_mut(node) else {
            return Ok(());
        };
        if !status.state.in_progress() {
            return Ok(());
        }
        status.state = report.state;
        status.version = report.version;
        status.exit_code = report.exit_code;
        status.reboot_required = report.reboot_required;
        status.message = report.message.chars().take(500).collect();
        status.log_tail = tail(&report.log_tail, MAX_LOG_TAIL);
        status.updated_at = now;
        self.persist(&[record])?;
        drop(records);
        self.bump();
        Ok(())
    }

    /// The installs `node` should carry out now.
    pub fn desired(&self, node: &str) -> DesiredState {
        let generation = *self.generation.borrow();
        let records = self.lock();
        let assignments = records
            .values()
            .filter(|r| r.info.state != DeploymentState::Cancelled)
            .filter_map(|record| {
                let info = &record.info;
                let status = info.nodes.get(node)?;
                if !status.state.in_progress() {
                    return None;
                }
                Some(Assignment {
                    deployment: info.id,
                    run: info.run,
                    package: info.spec.package.clone(),
                    version: status.version.clone(),
                    args: info.spec.args.clone(),
                    install_type: info.spec.install_type,
                    timeout_secs: info.spec.timeout_secs,
                })
            })
            .collect();
        DesiredState {
            generation,
            assignments,
        }
    }

    /// Whether any deployment is active, so that a rollout step has anything to do.
    pub fn any_active(&self) -> bool {
        self.lock()
            .values()
            .any(|r| r.info.state == DeploymentState::Active)
    }

    /// One rollout step over every active deployment: start new runs that fell due, fail
    /// installs on nodes that vanished, stop deployments over max-errors, and start nodes
    /// within max-concurrency. `nodes` are the nodes the tracker knows now.
    pub fn roll_out(
        &self,
        nodes: &[(String, NodeMeta)],
        versions: &impl VersionSource,
        now: u64,
    ) -> Result<(), DeploymentError> {
        let mut records = self.lock();
        let active: Vec<(u64, DeploymentSpec)> = records
            .values()
            .filter(|r| r.info.state == DeploymentState::Active)
            .map(|r| (r.info.id, r.info.spec.clone()))
            .collect();
        let mut changed = Vec::new();
        for record in records.values_mut() {
            if record.info.state != DeploymentState::Active {
                continue;
            }
            let before = record.info.clone();
            let id = record.info.id;
            let spec = record.info.spec.clone();
            let version = match &spec.version {
                VersionSpec::Exact(version) => Some(version.clone()),
                VersionSpec::Default => versions.default_version(&spec.package),
            };
            let Some(version) = version else {
                record.info.state = DeploymentState::Stopped;
                record.info.reason = Some(format!(
                    "package {} is no longer in the catalog",
                    spec.package
                ));
                changed.push(id);
                continue;
            };
            let new_run = match (&record.info.version, &spec.schedule) {
                (None, _) => false,
                (Some(current), Schedule::OnDefaultChange) => current != &version,
                (Some(_), Schedule::Every { secs }) => now >= record.run_started + secs,
                (Some(_), Schedule::Once) => false,
            };
            if new_run {
                record.info.run += 1;
                record.run_started = now;
                // Nodes mid-install finish their run's report into nothing; they are started
                // again in the new run like everyone else.
                record.info.nodes.clear();
            }
            record.info.version = Some(version.clone());
            let known: HashSet<&str> = nodes.iter().map(|(name, _)| name.as_str()).collect();
            let mut targeted: Vec<String> = nodes
                .iter()
                .filter(|(name, meta)| {
                    let view = NodeView {
                        name,
                        site: &meta.site,
                        tags: &meta.tags,
                    };
                    spec.targets_node(&view)
                        && !active.iter().any(|(other_id, other)| {
                            *other_id != id
                                && other.package == spec.package
                                && other.targets_node(&view)
                                && takes_precedence((other, *other_id), (&spec, id))
                        })
                })
                .map(|(name, _)| name.clone())
                .collect();
            targeted.sort();
            for (name, status) in record.info.nodes.iter_mut() {
                let known = known.contains(name.as_str());
                let overdue =
                    status.updated_at + spec.timeout_secs as u64 + LOST_NODE_GRACE.as_secs() < now;
                if status.state.in_progress() && !known && overdue {
                    status.state = NodeDeployState::Failed;
                    status.message = "the node stopped reporting".into();
                    status.updated_at = now;
                }
            }
            let step = rollout_step(&spec, &targeted, &record.info.nodes);
            if let Some(reason) = step.stop {
                record.info.state = DeploymentState::Stopped;
                record.info.reason = Some(reason);
            }
            for name in step.start {
                record.info.nodes.insert(
                    name.clone(),
                    NodeDeployStatus {
                        node: name,
                        state: NodeDeployState::Pending,
                        version: version.clone(),
                        exit_code: None,
                        reboot_required: false,
                        message: String::new(),
                        log_tail: String::new(),
                        updated_at: now,
                    },
                );
            }
            record.info.targeted = targeted;
            if record.info != before {
                changed.push(id);
            }
        }
        let to_store: Vec<&Record> = changed.iter().filter_map(|id| records.get(id)).collect();
        self.persist(&to_store)?;
        drop(records);
        if !changed.is_empty() {
            self.bump();
        }
        Ok(())
    }
}

/// The last `max` characters of `text`.
fn tail(text: &str, max: usize) -> String {
    let count = text.chars().count();
    text.chars().skip(count.saturating_sub(max)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pkgmesh_protocol::deploy::{InstallType, Limit, Target};
    use std::time::Instant;

    struct Catalog(Vec<(&'static str, &'static str)>, &'static str);

    impl VersionSource for Catalog {
        fn default_version(&self, package: &str) -> Option<String> {
            (package == "pkg").then(|| self.1.to_string())
        }
        fn has_version(&self, package: &str, version: &str) -> bool {
            self.0.iter().any(|(p, v)| *p == package && *v == version)
        }
    }

    fn spec(version: VersionSpec, target: &str, concurrency: u32) -> DeploymentSpec {
        DeploymentSpec {
            package: "pkg".into(),
            version,
            targets: vec![Target::parse(target).unwrap()],
            schedule: Schedule::OnDefaultChange,
            max_concurrency: Limit::Count(concurrency),
            max_errors: Limit::Count(0),
            args: Vec::new(),
            install_type: InstallType::UninstallAndReinstall,
            timeout_secs: 60,
        }
    }

    fn node(name: &str, ring: &str) -> (String, NodeMeta) {
        (
            name.to_string(),
            NodeMeta {
                listen: "127.0.0.1:1".into(),
                site: "s".into(),
                tags: vec![("ring".into(), ring.into())],
                last_seen: Instant::now(),
            },
        )
    }

    fn report(id: u64, run: u64, state: NodeDeployState) -> InstallReport {
        InstallReport {
            deployment: id,
            run,
            version: "1".into(),
            state,
            exit_code: Some(0),
            reboot_required: false,
            message: String::new(),
            log_tail: String::new(),
        }
    }

    #[test]
    fn rollout_starts_within_concurrency_and_follows_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let store = Deployments::open(&dir.path().join("d.redb")).unwrap();
        let nodes = vec![node("a", "prod"), node("b", "prod"), node("c", "dev")];
        let mut catalog = Catalog(vec![("pkg", "1"), ("pkg", "2")], "1");
        let d = store
            .create(
                spec(VersionSpec::Default, "tag:ring=prod", 1),
                "ops",
                &catalog,
                0,
            )
            .unwrap();
        store.roll_out(&nodes, &catalog, 1).unwrap();
        assert_eq!(store.desired("a").assignments.len(), 1);
        assert!(store.desired("b").assignments.is_empty(), "concurrency 1");
        assert!(store.desired("c").assignments.is_empty(), "not targeted");
        store
            .report("a", report(d.id, 1, NodeDeployState::Succeeded), 2)
            .unwrap();
        store.roll_out(&nodes, &catalog, 3).unwrap();
        assert!(store.desired("a").assignments.is_empty());
        assert_eq!(store.desired("b").assignments[0].version, "1");
        store
            .report("b", report(d.id, 1, NodeDeployState::Succeeded), 4)
            .unwrap();
        // The default moves: a new run installs version 2 everywhere, one node at a time.
        catalog.1 = "2";
        store.roll_out(&nodes, &catalog, 5).unwrap();
        let info = store.get(d.id).unwrap();
        assert_eq!(info.run, 2);
        assert_eq!(info.version.as_deref(), Some("2"));
        assert_eq!(store.desired("a").assignments[0].version, "2");
        // A late report of run 1 changes nothing.
        store
            .report("b", report(d.id, 1, NodeDeployState::Failed), 6)
            .unwrap();
        assert!(!store.get(d.id).unwrap().nodes.contains_key("b"));
        // Survives a restart.
        drop(store);
        let store = Deployments::open(&dir.path().join("d.redb")).unwrap();
        assert_eq!(store.get(d.id).unwrap().run, 2);
    }

    #[test]
    fn a_pinned_group_is_held_and_failures_stop_a_rollout() {
        let dir = tempfile::tempdir().unwrap();
        let store = Deployments::open(&dir.path().join("d.redb")).unwrap();
        let nodes = vec![node("a", "prod"), node("b", "canary"), node("c", "prod")];
        let catalog = Catalog(vec![("pkg", "1"), ("pkg", "2")], "2");
        let everyone = store
            .create(spec(VersionSpec::Default, "site:s", 10), "ops", &catalog, 0)
            .unwrap();
        let held = store
            .create(
                spec(VersionSpec::Exact("1".into()), "tag:ring=canary", 10),
                "ops",
                &catalog,
                0,
            )
            .unwrap();
        store.roll_out(&nodes, &catalog, 1).unwrap();
        assert_eq!(store.get(everyone.id).unwrap().targeted, vec!["a", "c"]);
        let b = store.desired("b").assignments;
        assert_eq!((b.len(), b[0].version.as_str()), (1, "1"));
        // Max errors 0: the first failure stops the rollout.
        store
            .report("a", report(everyone.id, 1, NodeDeployState::Failed), 2)
            .unwrap();
        store.roll_out(&nodes, &catalog, 3).unwrap();
        let info = store.get(everyone.id).unwrap();
        assert_eq!(info.state, DeploymentState::Stopped);
        assert!(info.reason.unwrap().contains("max-errors"));
        assert!(store
            .create(
                spec(VersionSpec::Exact("9".into()), "site:s", 1),
                "ops",
                &catalog,
                0
            )
            .is_err());
        store.cancel(held.id).unwrap();
        assert!(store.desired("b").assignments.is_empty());
    }

    #[test]
    fn a_repeating_deployment_starts_a_new_run_when_due() {
        let dir = tempfile::tempdir().unwrap();
        let store = Deployments::open(&dir.path().join("d.redb")).unwrap();
        let nodes = vec![node("a", "prod")];
        let catalog = Catalog(vec![("pkg", "1")], "1");
        let mut repeating = spec(VersionSpec::Exact("1".into()), "node:a", 1);
        repeating.schedule = Schedule::Every { secs: 60 };
        let d = store.create(repeating, "ops", &catalog, 0).unwrap();
        store.roll_out(&nodes, &catalog, 0).unwrap();
        store
            .report("a", report(d.id, 1, NodeDeployState::Succeeded), 1)
            .unwrap();
        store.roll_out(&nodes, &catalog, 59).unwrap();
        assert!(store.desired("a").assignments.is_empty(), "not due yet");
        let generation = store.desired("a").generation;
        store.roll_out(&nodes, &catalog, 60).unwrap();
        let desired = store.desired("a");
        assert_eq!(desired.assignments.len(), 1);
        assert_eq!(desired.assignments[0].run, 2);
        assert!(desired.generation > generation, "nodes are woken");
    }
}
