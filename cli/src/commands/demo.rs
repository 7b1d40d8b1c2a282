//! `pkgmesh demo`: a whole fleet on this machine, with no set-up and no network beyond
//! 127.0.0.1: a temporary fleet CA, a seed on its embedded local-directory origin, a sample
//! multi-platform package, six nodes in two sites, a deployment, and the result per node with
//! the fleet's origin offload.
//!
//! Everything runs in this process (each node with its own QUIC endpoint, identity, cache and
//! admin socket), in a temporary directory removed at the end; `--keep` leaves the fleet up
//! and prints the commands to look at it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use pkgmesh_node::client::SeedClient;
use pkgmesh_node::peer::{self, NodeSettings, RunningNode};
use pkgmesh_node::pki::{self, Identity, Role};
use pkgmesh_node::seed::{self, SeedSettings};
use pkgmesh_protocol::deploy::{
    DeploymentSpec, InstallType, Limit, NodeDeployState, Schedule, Target, VersionSpec,
};
use pkgmesh_protocol::platform::local_arch;
use pkgmesh_protocol::select::Platform;
use pkgmesh_protocol::units::HumanBytes;
use pkgmesh_protocol::wire::{Request, Response};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::mesh::runtime;
use crate::output::{print_json, print_table};

const PACKAGE: &str = "pkgmesh-demo";
const SITES: [&str; 2] = ["east", "west"];
const NODES_PER_SITE: usize = 3;
/// Random payload per ZIP: big enough for the swarm to matter, small enough to be quick.
const PAYLOAD_BYTES: usize = 12 << 20;
const DEADLINE: Duration = Duration::from_secs(120);

#[derive(Args)]
pub struct DemoArgs {
    /// Leave the fleet running (until Ctrl-C) and print the commands to inspect it.
    #[arg(long)]
    keep: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct DemoReport {
    package: String,
    version: String,
    package_bytes: u64,
    nodes: Vec<NodeRow>,
    seed_payload_bytes: u64,
    nodes_received_bytes: u64,
    /// Bytes the seed sent ÷ bytes the nodes received: 1.0 is no offload at all.
    origin_ratio: f64,
    all_installed: bool,
    seconds: f64,
}

#[derive(Serialize)]
struct NodeRow {
    node: String,
    site: String,
    bytes_from_peers: u64,
    bytes_from_seed: u64,
    install: String,
    message: String,
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let work = std::env::temp_dir().join(format!("pkgmesh-demo-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let result = runtime()?.block_on(demo(&work, &args));
    let _ = std::fs::remove_dir_all(&work);
    let report = result?;
    if args.json {
        print_json(&report)?;
    }
    Ok(if report.all_installed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn say(args: &DemoArgs, text: impl AsRef<str>) {
    if !args.json {
        println!("{}", text.as_ref());
    }
}

async fn demo(work: &Path, args: &DemoArgs) -> anyhow::Result<DemoReport> {
    let started = Instant::now();
    let ca = work.join("ca");
    pki::init_ca(&ca, "pkgmesh demo fleet")?;
    pki::issue(&ca, "seed-1", &[Role::Seed], 1, &work.join("id-seed"))?;
    pki::issue(
        &ca,
        "ops",
        &[Role::Publisher, Role::Deployer, Role::Operator],
        1,
        &work.join("id-ops"),
    )?;
    say(
        args,
        format!("fleet CA and identities in {}", work.display()),
    );

    let seed = seed::start(SeedSettings::new(
        "127.0.0.1:0".parse()?,
        work.join("seed-data"),
        Identity::load(&work.join("id-seed"))?,
    ))
    .await?;
    say(
        args,
        format!(
            "seed on {} (origin: {})",
            seed.local_addr,
            seed.state.origin.url()
        ),
    );

    let package_dir = work.join("package");
    let package_bytes = tokio::task::spawn_blocking({
        let dir = package_dir.clone();
        move || build_package(&dir)
    })
    .await??;
    let ops = SeedClient::connect(seed.local_addr, &Identity::load(&work.join("id-ops"))?).await?;
    ops.publish(
        PACKAGE,
        &package_dir.join("manifest.json"),
        &package_dir,
        &|_, _| {},
    )
    .await?;
    say(
        args,
        format!(
            "published {PACKAGE} 1.0.0: ZIPs for Linux x86_64 and arm64 and Windows, {} each",
            HumanBytes(package_bytes)
        ),
    );

    let platform = Platform::new("ubuntu", "22.04", local_arch());
    let mut nodes: Vec<RunningNode> = Vec::new();
    for site in SITES {
        for i in 1..=NODES_PER_SITE {
            let name = format!("{site}-{i}");
            let id_dir = work.join(format!("id-{name}"));
            pki::issue(&ca, &name, &[Role::Node], 1, &id_dir)?;
            let data = work.join(format!("data-{name}"));
            let mut settings = NodeSettings::new(
                "127.0.0.1:0".parse()?,
                seed.local_addr,
                data.clone(),
                Identity::load(&id_dir)?,
            );
            settings.site = site.into();
            settings.tags = vec![("role".into(), "web".into())];
            settings.platform = Some(platform.clone());
            settings.admin_socket = Some(NodeSettings::admin_socket_in(&data));
            settings.follow_deployments = true;
            nodes.push(peer::start(settings).await?);
        }
    }
    say(
        args,
        format!(
            "{} nodes in sites {} (platform {} {} {})",
            nodes.len(),
            SITES.join(" and "),
            platform.name,
            platform.version,
            platform.arch
        ),
    );
    // Deploy once every node is known to the tracker, so the rollout sees the whole fleet.
    let names: Vec<String> = nodes
        .iter()
        .map(|n| n.state.settings.identity.name().to_string())
        .collect();
    let waiting = Instant::now();
    while !names.iter().all(|n| {
        seed.state
            .tracker
            .lock()
            .map(|t| t.node(n).is_some())
            .unwrap_or(false)
    }) {
        if waiting.elapsed() > Duration::from_secs(30) {
            bail!("the nodes did not announce themselves to the seed within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let spec = DeploymentSpec {
        package: PACKAGE.into(),
        version: VersionSpec::Default,
        targets: vec![Target::Tag {
            key: "role".into(),
            value: "web".into(),
        }],
        schedule: Schedule::OnDefaultChange,
        max_concurrency: Limit::Percent(100),
        max_errors: Limit::Count(0),
        args: vec![("SSM_GREETING".into(), "hello from the demo".into())],
        install_type: InstallType::UninstallAndReinstall,
        timeout_secs: 120,
    };
    let Response::Deployment(created) = ops.call(&Request::CreateDeployment(spec)).await? else {
        bail!("the seed did not create the deployment");
    };
    say(
        args,
        format!(
            "deployment {} of {PACKAGE} to tag:role=web; waiting for every node...",
            created.id
        ),
    );
    let deployment = loop {
        let Response::Deployment(info) =
            ops.call(&Request::GetDeployment { id: created.id }).await?
        else {
            bail!("the seed did not answer the deployment's status");
        };
        let finished = info
            .nodes
            .values()
            .filter(|s| !s.state.in_progress())
            .count();
        if finished == nodes.len() {
            break info;
        }
        if started.elapsed() > DEADLINE {
            bail!(
                "the deployment did not finish within {} s: {finished} of {} nodes done",
                DEADLINE.as_secs(),
                nodes.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let mut rows = Vec::new();
    for node in &nodes {
        let name = node.state.settings.identity.name().to_string();
        let status = deployment.nodes.get(&name);
        let received = &node.state.received;
        rows.push(NodeRow {
            node: name,
            site: node.state.settings.site.clone(),
            bytes_from_peers: received.from_local_peers.load(Ordering::Relaxed)
                + received.from_remote_peers.load(Ordering::Relaxed),
            bytes_from_seed: received.from_seed.load(Ordering::Relaxed),
            install: status.map_or("-".into(), |s| s.state.to_string()),
            message: status.map_or(String::new(), |s| s.message.clone()),
        });
    }
    let seed_payload_bytes = seed
        .state
        .counters
        .chunk_bytes_served
        .load(Ordering::Relaxed);
    let nodes_received_bytes: u64 = rows
        .iter()
        .map(|r| r.bytes_from_peers + r.bytes_from_seed)
        .sum();
    let report = DemoReport {
        package: PACKAGE.into(),
        version: deployment.version.clone().unwrap_or_default(),
        package_bytes,
        all_installed: deployment.nodes.len() == nodes.len()
            && deployment
                .nodes
                .values()
                .all(|s| s.state == NodeDeployState::Succeeded),
        origin_ratio: seed_payload_bytes as f64 / nodes_received_bytes.max(1) as f64,
        seed_payload_bytes,
        nodes_received_bytes,
        nodes: rows,
        seconds: started.elapsed().as_secs_f64(),
    };
    if !args.json {
        println!();
        let table: Vec<Vec<String>> = report
            .nodes
            .iter()
            .map(|r| {
                vec![
                    r.node.clone(),
                    r.site.clone(),
                    HumanBytes(r.bytes_from_peers).to_string(),
                    HumanBytes(r.bytes_from_seed).to_string(),
                    r.install.clone(),
                    r.message.clone(),
                ]
            })
            .collect();
        print_table(
            &[
                "NODE",
                "SITE",
                "FROM PEERS",
                "FROM SEED",
                "INSTALL",
                "DETAIL",
            ],
            &table,
        );
        println!();
        println!(
            "origin offload: the seed sent {} of chunk payload for {} the nodes received: {:.2} of the bytes ({:.1} copies of the package for {} nodes)",
            HumanBytes(report.seed_payload_bytes),
            HumanBytes(report.nodes_received_bytes),
            report.origin_ratio,
            report.seed_payload_bytes as f64 / package_bytes.max(1) as f64,
            nodes.len()
        );
        println!("done in {:.1} s", report.seconds);
    }

    if args.keep {
        print_keep_instructions(work, &seed.local_addr.to_string(), &names, created.id);
        crate::commands::seed::wait_for_shutdown_signal().await;
    }
    ops.close().await;
    for node in nodes {
        node.shutdown().await;
    }
    seed.shutdown().await;
    Ok(report)
}

fn print_keep_instructions(work: &Path, seed: &str, names: &[String], deployment: u64) {
    let binary = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "pkgmesh".into());
    let first = names.first().map(String::as_str).unwrap_or("east-1");
    let socket = work.join(format!("data-{first}")).join("admin.sock");
    let ops = work.join("id-ops");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "\nThe fleet keeps running until Ctrl-C. Try, in another terminal:\n\
         \n  export PKGMESH_SEED={seed} PKGMESH_IDENTITY={}\
         \n  {binary} deploy status {deployment}\
         \n  {binary} package list\
         \n  {binary} where {PACKAGE}@1.0.0\
         \n  {binary} status --node {}\
         \n  {binary} installed --node {}\
         \n  {binary} transfers --node {}\n",
        ops.display(),
        socket.display(),
        socket.display(),
        socket.display(),
    );
}

/// Writes the demo package: one ZIP per platform family (made with the `zip` crate, as a fresh
/// machine may lack the `zip` command) and its manifest. Returns the size of one ZIP.
fn build_package(dir: &Path) -> anyhow::Result<u64> {
    std::fs::create_dir_all(dir)?;
    let linux_install = "#!/bin/sh\nset -eu\n\
        echo \"$SSM_GREETING: $BWS_ACTION_NAME of pkgmesh-demo $(cat VERSION) on $BWS_PLATFORM_NAME $BWS_PLATFORM_VERSION $BWS_ARCHITECTURE\" > installed.txt\n\
        cat installed.txt\n";
    let linux_uninstall = "#!/bin/sh\nrm -f installed.txt\necho uninstalled\n";
    let linux_validate = "#!/bin/sh\ntest -s installed.txt\n";
    let windows_install = "Set-Content -Path installed.txt -Value \"installed\"\n";
    let windows_uninstall = "Remove-Item -Force installed.txt\n";
    let zips = [
        (
            "pkgmesh-demo-linux-x86_64.zip",
            "sh",
            [linux_install, linux_uninstall, linux_validate],
            1u64,
        ),
        (
            "pkgmesh-demo-linux-arm64.zip",
            "sh",
            [linux_install, linux_uninstall, linux_validate],
            2,
        ),
        (
            "pkgmesh-demo-windows.zip",
            "ps1",
            [windows_install, windows_uninstall, ""],
            3,
        ),
    ];
    let mut checksums = serde_json::Map::new();
    let mut size = 0;
    for (file, ext, scripts, seed) in zips {
        let path = dir.join(file);
        write_zip(&path, ext, &scripts, seed)?;
        let bytes = std::fs::read(&path)?;
        if file.contains("linux") {
            // Both Linux ZIPs have the same layout and size; a node fetches one of them.
            size = bytes.len() as u64;
        }
        checksums.insert(
            file.into(),
            serde_json::json!({ "checksums": { "sha256": hex::encode(Sha256::digest(&bytes)) } }),
        );
    }
    let linux = serde_json::json!({
        "_any": {
            "x86_64": { "file": "pkgmesh-demo-linux-x86_64.zip" },
            "arm64": { "file": "pkgmesh-demo-linux-arm64.zip" }
        }
    });
    let manifest = serde_json::json!({
        "schemaVersion": "2.0",
        "version": "1.0.0",
        "publisher": "pkgmesh demo",
        "packages": {
            "ubuntu": linux,
            "amazon": linux,
            "windows": { "_any": { "x86_64": { "file": "pkgmesh-demo-windows.zip" } } }
        },
        "files": checksums
    });
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest)?,
    )?;
    Ok(size)
}

fn write_zip(path: &PathBuf, ext: &str, scripts: &[&str; 3], seed: u64) -> anyhow::Result<()> {
    use zip::write::SimpleFileOptions;
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path)?);
    let text = SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .unix_permissions(0o755);
    for (action, body) in ["install", "uninstall", "validate"].iter().zip(scripts) {
        if body.is_empty() {
            continue;
        }
        zip.start_file(format!("{action}.{ext}"), text)?;
        zip.write_all(body.as_bytes())?;
    }
    zip.start_file("VERSION", text)?;
    zip.write_all(b"1.0.0\n")?;
    // Random bytes do not compress: store them.
    let stored = SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .unix_permissions(0o644)
        .large_file(false);
    zip.start_file("payload.bin", stored)?;
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ seed;
    let mut block = vec![0u8; 64 * 1024];
    for _ in 0..PAYLOAD_BYTES / block.len() {
        for byte in block.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *byte = state as u8;
        }
        zip.write_all(&block)?;
    }
    zip.finish()?;
    Ok(())
}
