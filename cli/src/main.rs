//! pkgmesh-cli: the `pkgmesh` binary, the one tool operators, scripts and daemons start from.
//!
//! Owns: arguments (clap), human tables and `--json` output, exit codes (0 success, 1 a failure
//! it explains, 2 bad usage), progress display, and turning library errors into messages that
//! say what to do. Does not own: any rule or service; those live in `pkgmesh-protocol`,
//! `pkgmesh-cache` and `pkgmesh-node`.

mod commands;
mod mesh;
mod output;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "pkgmesh",
    version,
    about = "Peer-to-peer distribution of AWS Systems Manager Distributor packages"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a Distributor manifest, or pick the file a platform would install.
    #[command(subcommand)]
    Manifest(commands::manifest::ManifestCommand),
    /// Print the platform name, version and architecture this machine reports.
    Platform(commands::platform::PlatformArgs),
    /// Blob addressing: the BLAKE3 identity and chunk layout of a file.
    #[command(subcommand)]
    Blob(commands::blob::BlobCommand),
    /// Show pkgmesh working end to end on this machine, with no set-up.
    Demo(commands::demo::DemoArgs),
    /// The fleet CA: create it, issue and revoke certificates, show an identity.
    #[command(subcommand)]
    Ca(commands::ca::CaCommand),
    /// Run a seed: the catalog, the origin store, the tracker (a daemon).
    Seed(commands::seed::SeedArgs),
    /// Run a node: serve what it holds to peers and keep the tracker told (a daemon).
    Node(commands::node::NodeArgs),
    /// Fetch the ZIP for this platform through the swarm and write it to a file.
    Fetch(commands::fetch::FetchArgs),
    /// What a node is: identity, site, seed connection, cache use (asks the node).
    Status(commands::local::LocalArgs),
    /// A node's downloads in flight, with their progress (asks the node).
    Transfers(commands::local::LocalArgs),
    /// A node's chunk cache: list, stats, verify, evict, pin, unpin (asks the node).
    #[command(subcommand)]
    Cache(commands::cache::CacheCommand),
    /// The peers a node knows and exchanged chunks with: site, rates, bans (asks the node).
    Peers(commands::local::LocalArgs),
    /// The scripts the last action on a package ran, with their output (asks the node).
    InstallLog(commands::local::InstallLogArgs),
    /// Every node the seed's tracker knows: site, tags, last seen, cache use (role operator).
    Nodes(commands::fleet::NodesArgs),
    /// Make nodes (one per site by default) fetch a package version ahead of a deployment
    /// (role operator or deployer).
    Preheat(commands::fleet::PreheatArgs),
    /// Install a package version on this node: fetch it through the swarm, run its scripts
    /// with Distributor's semantics (asks the node).
    Install(commands::install::InstallArgs),
    /// Uninstall a package from this node (asks the node).
    Uninstall(commands::install::UninstallArgs),
    /// What this node has installed, with state, versions and exit codes (asks the node).
    Installed(commands::install::InstalledArgs),
    /// Deployments: install a package on the nodes matching targets, at a controlled pace.
    #[command(subcommand)]
    Deploy(commands::deploy::DeployCommand),
    /// Publish and manage packages in the seed's catalog.
    #[command(subcommand)]
    Package(commands::package::PackageCommand),
    /// Which nodes hold a blob or a package version (role operator).
    Where(commands::fleet::WhereArgs),
    /// Read the seed's audit log (role admin).
    Audit(commands::fleet::AuditArgs),
    /// Read a node's audit log: changes made through its admin socket or by operators over
    /// the mesh (asks the node).
    NodeAudit(commands::local::NodeAuditArgs),
}

/// Rust ignores SIGPIPE, so a write to a closed pipe (`pkgmesh cache ls | head -1`) fails and
/// `println!` panics. A one-shot command ends quietly instead, as Unix tools do. The daemons keep
/// ignoring it: a reader of their ready line going away must not stop a seed or a node.
fn die_quietly_on_closed_stdout() {
    #[cfg(unix)]
    // SAFETY: restoring a signal's default disposition before any thread is started has no
    // memory-safety preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    pkgmesh_node::transport::install_crypto_provider();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Seed(_) | Command::Node(_)) {
        die_quietly_on_closed_stdout();
    }
    init_logging();
    let result = match cli.command {
        Command::Manifest(command) => commands::manifest::run(command),
        Command::Platform(args) => commands::platform::run(args),
        Command::Blob(command) => commands::blob::run(command),
        Command::Demo(args) => commands::demo::run(args),
        Command::Seed(args) => commands::seed::run(args),
        Command::Node(args) => commands::node::run(args),
        Command::Fetch(args) => commands::fetch::run(args),
        Command::Status(args) => commands::local::run_status(args),
        Command::Install(args) => commands::install::run_install(args),
        Command::Uninstall(args) => commands::install::run_uninstall(args),
        Command::Installed(args) => commands::install::run_installed(args),
        Command::Deploy(command) => commands::deploy::run(command),
        Command::Transfers(args) => commands::local::run_transfers(args),
        Command::Cache(command) => commands::cache::run(command),
        Command::Peers(args) => commands::local::run_peers(args),
        Command::InstallLog(args) => commands::local::run_install_log(args),
        Command::Nodes(args) => commands::fleet::run_nodes(args),
        Command::Preheat(args) => commands::fleet::run_preheat(args),
        Command::Package(command) => commands::package::run(command),
        Command::Where(args) => commands::fleet::run_where(args),
        Command::Audit(args) => commands::fleet::run_audit(args),
        Command::NodeAudit(args) => commands::local::run_node_audit(args),
        Command::Ca(command) => commands::ca::run(command),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            if error.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Bad usage that clap cannot see (a choice between flags left open): exit code 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Logs go to stderr so that stdout stays clean for `--json`; `RUST_LOG` filters them.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
