//! Deployments: what the seed tells nodes to install, and the rollout rules, as pure data and
//! functions (State Manager's associations and rate controls, pulled by nodes instead of pushed).
//!
//! Owns: the deployment spec and how its command-line forms parse (`tag:K=V`, `site:S`,
//! `node:ID`; `once`, `every:DURATION`, `on-default-change`; `N` or `P%`), which nodes a
//! deployment targets, which deployment wins when two target one node for the same package, and
//! the rollout step: whom to start next under max-concurrency, and when max-errors stops it.
//! Does not own: storing deployments, the clock, or installing (the seed and the node do).
//!
//! Rules, and where they come from:
//! - Targets are ORed: a node matches when any target matches (State Manager's targets).
//! - Max errors follows SSM: with max errors N the rollout stops when the (N+1)th node fails, so
//!   0 stops at the first failure. Installs already running finish and are reported.
//! - Percentages are of the nodes targeted when the step runs; concurrency rounds up and is at
//!   least 1, errors round down.
//! - Two active deployments of one package targeting one node: a pinned version beats
//!   "the default version", and between equals the newer deployment wins. That is how a group
//!   is held at another version than the rest of the fleet.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest list of targets, arguments, and characters in one argument string.
pub const MAX_TARGETS: usize = 64;
/// Distributor's limit on additional arguments: 4096 characters in all (keys and values).
pub const MAX_ARGUMENT_CHARS: usize = 4096;
/// Longest time a script may be given, and the default.
pub const MAX_TIMEOUT_SECS: u32 = 48 * 3600;
pub const DEFAULT_TIMEOUT_SECS: u32 = 3600;
/// Longest log tail a node reports per install.
pub const MAX_LOG_TAIL: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DeployError(pub String);

fn bad(message: impl Into<String>) -> DeployError {
    DeployError(message.into())
}

/// Which nodes a deployment is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    Tag { key: String, value: String },
    Site(String),
    Node(String),
}

impl Target {
    /// Parses `tag:KEY=VALUE`, `site:SITE` or `node:NAME`.
    pub fn parse(text: &str) -> Result<Target, DeployError> {
        let (kind, rest) = text.split_once(':').ok_or_else(|| {
            bad(format!(
                "target {text:?} is not tag:KEY=VALUE, site:SITE or node:NAME"
            ))
        })?;
        let nonempty = |what: &str, value: &str| {
            if value.is_empty() || value.chars().any(char::is_control) || value.len() > 256 {
                Err(bad(format!(
                    "target {text:?}: the {what} is empty or malformed"
                )))
            } else {
                Ok(value.to_string())
            }
        };
        match kind {
            "tag" => {
                let (key, value) = rest.split_once('=').ok_or_else(|| {
                    bad(format!("target {text:?}: a tag target is tag:KEY=VALUE"))
                })?;
                Ok(Target::Tag {
                    key: nonempty("tag key", key)?,
                    value: nonempty("tag value", value)?,
                })
            }
            "site" => Ok(Target::Site(nonempty("site", rest)?)),
            "node" => Ok(Target::Node(nonempty("node name", rest)?)),
            other => Err(bad(format!(
                "target {text:?}: unknown kind {other:?} (use tag:, site: or node:)"
            ))),
        }
    }

    pub fn matches(&self, node: &NodeView<'_>) -> bool {
        match self {
            Target::Tag { key, value } => node.tags.iter().any(|(k, v)| k == key && v == value),
            Target::Site(site) => node.site == site,
            Target::Node(name) => node.name == name,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tag { key, value } => write!(f, "tag:{key}={value}"),
            Target::Site(site) => write!(f, "site:{site}"),
            Target::Node(name) => write!(f, "node:{name}"),
        }
    }
}

/// What a deployment needs to know of a node.
#[derive(Debug, Clone, Copy)]
pub struct NodeView<'a> {
    pub name: &'a str,
    pub site: &'a str,
    pub tags: &'a [(String, String)],
}

/// The version a deployment installs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VersionSpec {
    /// The package's default version, followed when it changes.
    Default,
    Exact(String),
}

impl fmt::Display for VersionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VersionSpec::Default => f.write_str("default"),
            VersionSpec::Exact(v) => f.write_str(v),
        }
    }
}

/// When a deployment runs on its nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Schedule {
    /// Once per node (and on nodes that match later).
    Once,
    /// Again on every node every `secs` seconds (an already-installed package whose validate
    /// passes is left alone, so this re-checks and repairs).
    Every { secs: u64 },
    /// Once, and again whenever the package's default version changes.
    OnDefaultChange,
}

impl Schedule {
    /// Parses `once`, `every:DURATION` (`30s`, `15m`, `6h`, `1d`) or `on-default-change`.
    pub fn parse(text: &str) -> Result<Schedule, DeployError> {
        match text {
            "once" => Ok(Schedule::Once),
            "on-default-change" => Ok(Schedule::OnDefaultChange),
            _ => {
                let duration = text.strip_prefix("every:").ok_or_else(|| {
                    bad(format!(
                        "schedule {text:?} is not once, every:DURATION or on-default-change"
                    ))
                })?;
                let secs = parse_duration_secs(duration)?;
                if secs < 10 {
                    return Err(bad(format!(
                        "schedule {text:?}: repeat at most every 10 seconds"
                    )));
                }
                Ok(Schedule::Every { secs })
            }
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Once => f.write_str("once"),
            Schedule::Every { secs } => write!(f, "every:{secs}s"),
            Schedule::OnDefaultChange => f.write_str("on-default-change"),
        }
    }
}

/// `90`, `90s`, `15m`, `6h`, `1d` as seconds.
pub fn parse_duration_secs(text: &str) -> Result<u64, DeployError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let value: u64 = digits
        .parse()
        .map_err(|_| bad(format!("duration {text:?} does not start with a number")))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        other => {
            return Err(bad(format!(
                "duration {text:?}: unknown unit {other:?} (s, m, h, d)"
            )))
        }
    };
    value
        .checked_mul(scale)
        .ok_or_else(|| bad(format!("duration {text:?} is too long")))
}

/// A count of nodes, or a percentage of those targeted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Limit {
    Count(u32),
    Percent(u8),
}

impl Limit {
    /// Parses `N` or `P%` (P from 0 to 100).
    pub fn parse(text: &str) -> Result<Limit, DeployError> {
        if let Some(percent) = text.strip_suffix('%') {
            let p: u8 = percent
                .parse()
                .map_err(|_| bad(format!("{text:?} is not a percentage")))?;
            if p > 100 {
                return Err(bad(format!("{text:?} is over 100%")));
            }
            Ok(Limit::Percent(p))
        } else {
            text.parse()
                .map(Limit::Count)
                .map_err(|_| bad(format!("{text:?} is not a number of nodes or a percentage")))
        }
    }

    /// Concurrency: percentages round up, and at least one node runs.
    pub fn concurrency(self, targeted: usize) -> usize {
        match self {
            Limit::Count(n) => (n as usize).max(1),
            Limit::Percent(p) => (targeted * p as usize).div_ceil(100).max(1),
        }
    }

    /// Errors tolerated: percentages round down.
    pub fn errors(self, targeted: usize) -> usize {
        match self {
            Limit::Count(n) => n as usize,
            Limit::Percent(p) => targeted * p as usize / 100,
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Count(n) => write!(f, "{n}"),
            Limit::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// How an upgrade runs (Distributor's installationType).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum InstallType {
    /// Uninstall the old version, install the new one.
    #[default]
    UninstallAndReinstall,
    /// Run the new version's `update` script.
    InPlace,
}

/// Checks additional arguments as Distributor does: keys start with `SSM_`, at most
/// [`MAX_ARGUMENT_CHARS`] characters of keys and values in all, and no NUL (they become
/// environment variables).
pub fn check_arguments(args: &[(String, String)]) -> Result<(), DeployError> {
    let mut total = 0;
    for (key, value) in args {
        if !key.starts_with("SSM_") {
            return Err(bad(format!(
                "argument {key:?}: additional argument names must start with SSM_"
            )));
        }
        if key.len() == 4 || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(bad(format!(
                "argument {key:?}: a name is SSM_ followed by letters, digits and underscores"
            )));
        }
        if value.contains('\0') {
            return Err(bad(format!(
                "argument {key:?}: the value contains a NUL byte"
            )));
        }
        total += key.chars().count() + value.chars().count();
    }
    if total > MAX_ARGUMENT_CHARS {
        return Err(bad(format!(
            "additional arguments are {total} characters, more than the limit of {MAX_ARGUMENT_CHARS}"
        )));
    }
    Ok(())
}

/// Parses `SSM_KEY=VALUE`.
pub fn parse_argument(text: &str) -> Result<(String, String), DeployError> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| bad(format!("argument {text:?} is not SSM_KEY=VALUE")))?;
    let pair = (key.to_string(), value.to_string());
    check_arguments(std::slice::from_ref(&pair))?;
    Ok(pair)
}

/// What `pkgmesh deploy create` asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentSpec {
    pub package: String,
    pub version: VersionSpec,
    pub targets: Vec<Target>,
    pub schedule: Schedule,
    pub max_concurrency: Limit,
    pub max_errors: Limit,
    pub args: Vec<(String, String)>,
    pub install_type: InstallType,
    pub timeout_secs: u32,
}

impl DeploymentSpec {
    /// Everything about the spec that can be checked without the catalog.
    pub fn check(&self) -> Result<(), DeployError> {
        crate::names::validate_package_name(&self.package).map_err(|e| bad(e.to_string()))?;
        if self.targets.is_empty() {
            return Err(bad("a deployment needs at least one target"));
        }
        if self.targets.len() > MAX_TARGETS {
            return Err(bad(format!(
                "{} targets, the limit is {MAX_TARGETS}",
                self.targets.len()
            )));
        }
        if self.timeout_secs == 0 || self.timeout_secs > MAX_TIMEOUT_SECS {
            return Err(bad(format!(
                "timeout {} s is outside 1..={MAX_TIMEOUT_SECS}",
                self.timeout_secs
            )));
        }
        check_arguments(&self.args)
    }

    pub fn targets_node(&self, node: &NodeView<'_>) -> bool {
        self.targets.iter().any(|t| t.matches(node))
    }
}

/// Which of two deployments of the same package applies to a node they both target: a pinned
/// version beats the default, then the newer one (higher id) wins.
pub fn takes_precedence(a: (&DeploymentSpec, u64), b: (&DeploymentSpec, u64)) -> bool {
    let pinned = |spec: &DeploymentSpec| matches!(spec.version, VersionSpec::Exact(_));
    match (pinned(a.0), pinned(b.0)) {
        (true, false) => true,
        (false, true) => false,
        _ => a.1 > b.1,
    }
}

/// Where one node stands in one deployment's current run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeDeployState {
    /// Told to install, not yet started.
    Pending,
    Downloading,
    Installing,
    Succeeded,
    Failed,
}

impl NodeDeployState {
    pub fn in_progress(self) -> bool {
        matches!(
            self,
            NodeDeployState::Pending | NodeDeployState::Downloading | NodeDeployState::Installing
        )
    }
}

impl fmt::Display for NodeDeployState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeDeployState::Pending => "pending",
            NodeDeployState::Downloading => "downloading",
            NodeDeployState::Installing => "installing",
            NodeDeployState::Succeeded => "succeeded",
            NodeDeployState::Failed => "failed",
        })
    }
}

/// One node in a deployment, as the seed records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDeployStatus {
    pub node: String,
    pub state: NodeDeployState,
    /// The version being (or last) installed.
    pub version: String,
    pub exit_code: Option<i32>,
    pub reboot_required: bool,
    /// What happened, in a line (e.g. "installed", "failed and rolled back to 1.0.0").
    pub message: String,
    /// The end of the script's output.
    pub log_tail: String,
    /// Unix seconds of the last change.
    pub updated_at: u64,
}

/// Where a deployment stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentState {
    /// Starting installs on targeted nodes (and on nodes that match later).
    Active,
    /// Stopped by max-errors: nothing new starts.
    Stopped,
    Cancelled,
}

impl fmt::Display for DeploymentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeploymentState::Active => "active",
            DeploymentState::Stopped => "stopped",
            DeploymentState::Cancelled => "cancelled",
        })
    }
}

/// A deployment as `deploy status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentInfo {
    pub id: u64,
    pub spec: DeploymentSpec,
    pub state: DeploymentState,
    /// Why it stopped, when it did.
    pub reason: Option<String>,
    pub created_by: String,
    pub created_at: u64,
    /// Runs so far (a new run starts on every default change or repeat).
    pub run: u64,
    /// The version the current run installs.
    pub version: Option<String>,
    /// Nodes targeted now.
    pub targeted: Vec<String>,
    /// Nodes of the current run that were started, by name.
    pub nodes: BTreeMap<String, NodeDeployStatus>,
}

impl DeploymentInfo {
    pub fn count(&self, state: NodeDeployState) -> usize {
        self.nodes.values().filter(|s| s.state == state).count()
    }
}

/// One install a node should carry out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub deployment: u64,
    pub run: u64,
    pub package: String,
    pub version: String,
    pub args: Vec<(String, String)>,
    pub install_type: InstallType,
    pub timeout_secs: u32,
}

/// A node's desired state: the installs it should carry out now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    /// Changes whenever any assignment changes; the node long-polls with the one it has.
    pub generation: u64,
    pub assignments: Vec<Assignment>,
}

/// A node's report on one assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallReport {
    pub deployment: u64,
    pub run: u64,
    pub version: String,
    pub state: NodeDeployState,
    pub exit_code: Option<i32>,
    pub reboot_required: bool,
    pub message: String,
    pub log_tail: String,
}

/// What one rollout step decided for one deployment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RolloutStep {
    /// Nodes to start now, in order.
    pub start: Vec<String>,
    /// Max errors was exceeded: stop starting nodes.
    pub stop: Option<String>,
}

/// The rollout rule: given the nodes targeted now (sorted) and the states of those started in
/// the current run, which to start next. Nodes in progress count against max-concurrency.
pub fn rollout_step(
    spec: &DeploymentSpec,
    targeted: &[String],
    started: &BTreeMap<String, NodeDeployStatus>,
) -> RolloutStep {
    let failed = started
        .values()
        .filter(|s| s.state == NodeDeployState::Failed)
        .count();
    let tolerated = spec.max_errors.errors(targeted.len());
    if failed > tolerated {
        return RolloutStep {
            start: Vec::new(),
            stop: Some(format!(
                "{failed} nodes failed, more than max-errors {} allows ({tolerated})",
                spec.max_errors
            )),
        };
    }
    let running = started.values().filter(|s| s.state.in_progress()).count();
    let slots = spec
        .max_concurrency
        .concurrency(targeted.len())
        .saturating_sub(running);
    RolloutStep {
        start: targeted
            .iter()
            .filter(|name| !started.contains_key(*name))
            .take(slots)
            .cloned()
            .collect(),
        stop: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(concurrency: &str, errors: &str) -> DeploymentSpec {
        DeploymentSpec {
            package: "pkg".into(),
            version: VersionSpec::Default,
            targets: vec![Target::parse("tag:env=prod").unwrap()],
            schedule: Schedule::Once,
            max_concurrency: Limit::parse(concurrency).unwrap(),
            max_errors: Limit::parse(errors).unwrap(),
            args: Vec::new(),
            install_type: InstallType::default(),
            timeout_secs: DEFAULT_TIMEOUT_SECS,
        }
    }

    fn status(node: &str, state: NodeDeployState) -> (String, NodeDeployStatus) {
        (
            node.to_string(),
            NodeDeployStatus {
                node: node.into(),
                state,
                version: "1".into(),
                exit_code: None,
                reboot_required: false,
                message: String::new(),
                log_tail: String::new(),
                updated_at: 0,
            },
        )
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("n{i}")).collect()
    }

    #[test]
    fn forms_parse_and_print_back() {
        for text in ["tag:env=prod", "site:edge-1", "node:web-7"] {
            assert_eq!(Target::parse(text).unwrap().to_string(), text);
        }
        for bad in [
            "env=prod",
            "tag:env",
            "tag:=x",
            "rack:1",
            "site:",
            "node:a\u{7}",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Schedule::parse("every:15m").unwrap(),
            Schedule::Every { secs: 900 }
        );
        assert_eq!(Schedule::parse("once").unwrap(), Schedule::Once);
        assert!(Schedule::parse("every:5s").is_err());
        assert!(Schedule::parse("every:5y").is_err());
        assert!(Schedule::parse("daily").is_err());
        assert_eq!(Limit::parse("25%").unwrap(), Limit::Percent(25));
        assert!(Limit::parse("101%").is_err());
        assert!(Limit::parse("-1").is_err());
        assert_eq!(Limit::Percent(25).concurrency(10), 3);
        assert_eq!(Limit::Percent(1).concurrency(10), 1);
        assert_eq!(Limit::Percent(25).errors(10), 2);
        assert_eq!(Limit::Count(0).concurrency(10), 1);
    }

    #[test]
    fn arguments_follow_distributor() {
        assert!(parse_argument("SSM_TOKEN=abc").is_ok());
        let error = parse_argument("TOKEN=abc").unwrap_err();
        assert!(error.0.contains("SSM_"), "{error}");
        assert!(parse_argument("SSM_=x").is_err());
        assert!(parse_argument("SSM_A B=x").is_err());
        let long = vec![("SSM_BIG".to_string(), "x".repeat(4090))];
        assert!(check_arguments(&long).unwrap_err().0.contains("4096"));
        let fits = vec![("SSM_BIG".to_string(), "x".repeat(4089))];
        assert!(check_arguments(&fits).is_ok());
    }

    #[test]
    fn rollout_keeps_to_max_concurrency() {
        let spec = spec("2", "0");
        let targeted = names(5);
        let step = rollout_step(&spec, &targeted, &BTreeMap::new());
        assert_eq!(step.start, vec!["n0", "n1"]);
        let started: BTreeMap<_, _> = [
            status("n0", NodeDeployState::Succeeded),
            status("n1", NodeDeployState::Installing),
        ]
        .into();
        let step = rollout_step(&spec, &targeted, &started);
        assert_eq!(step.start, vec!["n2"]);
        assert!(step.stop.is_none());
    }

    #[test]
    fn rollout_stops_when_failures_exceed_max_errors() {
        let spec = spec("10", "1");
        let targeted = names(5);
        let one_failure: BTreeMap<_, _> = [status("n0", NodeDeployState::Failed)].into();
        assert!(rollout_step(&spec, &targeted, &one_failure).stop.is_none());
        let two: BTreeMap<_, _> = [
            status("n0", NodeDeployState::Failed),
            status("n1", NodeDeployState::Failed),
        ]
        .into();
        let step = rollout_step(&spec, &targeted, &two);
        assert!(step.start.is_empty());
        assert!(step.stop.unwrap().contains("max-errors"));
    }

    #[test]
    fn a_pinned_version_holds_a_group_against_the_default() {
        let mut pinned = spec("1", "0");
        pinned.version = VersionSpec::Exact("1.0.0".into());
        let following = spec("1", "0");
        assert!(takes_precedence((&pinned, 1), (&following, 2)));
        assert!(!takes_precedence((&following, 2), (&pinned, 1)));
        assert!(takes_precedence((&following, 3), (&following, 2)));
        let node = NodeView {
            name: "a",
            site: "s",
            tags: &[("env".into(), "prod".into())],
        };
        assert!(following.targets_node(&node));
    }
}
