//! `sim`: the real swarm scheduler and origin admission driven by a discrete-event model of the
//! network, for fleets of up to tens of thousands of nodes (issue #8). The model is described in
//! `pkgmesh_benches::sim`.
//!
//! ```text
//! cargo run --release -p pkgmesh-benches --bin sim -- --nodes 10000 --size-mib 1024 --sites 20 --seed 1
//! ```
//!
//! Prints one JSON line. Deterministic for a given set of flags: only `wall_s` varies.

use std::time::{Duration, Instant};

use clap::Parser;
use pkgmesh_benches::sim::{self, Config, HoldersOrder};

#[derive(Parser, Debug)]
#[command(about = "Simulate a fleet fetching one package with the real scheduler and admission")]
struct Args {
    /// Nodes fetching the package at once.
    #[arg(long, default_value_t = 10_000)]
    nodes: u32,
    /// Package size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Sites, each behind its own WAN link (node i is in site i mod sites).
    #[arg(long, default_value_t = 20)]
    sites: u32,
    /// Every node's upload and download rate, Mbit/s.
    #[arg(long, default_value_t = 100.0)]
    rate_mbit: f64,
    /// Each site's WAN link, per direction, Mbit/s (0: unlimited).
    #[arg(long, default_value_t = 1000.0)]
    wan_mbit: f64,
    /// The seed's upload, Mbit/s (0: unlimited).
    #[arg(long, default_value_t = 1000.0)]
    seed_rate_mbit: f64,
    /// One-way latency within a site, ms.
    #[arg(long, default_value_t = 1.0)]
    latency_ms: f64,
    /// Extra one-way latency across a WAN link (between sites, to the seed), ms.
    #[arg(long, default_value_t = 20.0)]
    wan_latency_ms: f64,
    /// Nodes start uniformly within this many seconds (0: all at once).
    #[arg(long, default_value_t = 0.0)]
    start_spread_s: f64,
    /// Stop after this much simulated time, seconds.
    #[arg(long, default_value_t = 3600.0)]
    max_sim_s: f64,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print progress to stderr every this many simulated seconds.
    #[arg(long)]
    progress_s: Option<f64>,
    /// Check the scheduler's invariants after every step (slow).
    #[arg(long)]
    check_invariants: bool,
    /// Order of a chunk's holders handed to admission: "hash" (the real tracker's HashMap
    /// order, the same for every asker) or "random" (a fresh sample per request).
    #[arg(long, default_value = "hash")]
    holders_order: String,
    /// Nodes per site that may fetch from outside it (the seed's per-site `wan_fetchers`,
    /// applied to every site); 0: no limit.
    #[arg(long, default_value_t = 0)]
    wan_fetchers: u32,
    /// Chunk uploads a node has in progress at most; more are refused as busy (0: no limit).
    #[arg(long, default_value_t = pkgmesh_node::peer::NodeSettings::DEFAULT_MAX_UPLOADS)]
    max_uploads: usize,
    /// Admission's recent-serve window and the scheduler's redirect patience, seconds.
    #[arg(long)]
    recent_window_s: Option<f64>,
    /// Scheduler experiments (defaults are `SchedulerConfig::default()`, what the node runs).
    #[arg(long)]
    ask_for_peers_interval_s: Option<f64>,
    #[arg(long)]
    remote_holdings_interval_s: Option<f64>,
    #[arg(long)]
    min_useful_peers: Option<usize>,
    #[arg(long)]
    max_peers_in_use: Option<usize>,
    #[arg(long)]
    seed_max_in_flight: Option<u32>,
    #[arg(long)]
    max_redirects_waiting: Option<u32>,
    #[arg(long)]
    give_up_after_refusals: Option<u32>,
    #[arg(long)]
    refused_backoff_s: Option<f64>,
    #[arg(long)]
    endgame_threshold: Option<u32>,
    #[arg(long)]
    not_yet_retry_s: Option<f64>,
}

fn main() {
    let args = Args::parse();
    let mut scheduler = pkgmesh_node::swarm::scheduler::SchedulerConfig::default();
    if let Some(s) = args.ask_for_peers_interval_s {
        scheduler.ask_for_peers_interval = Duration::from_secs_f64(s);
    }
    if let Some(s) = args.remote_holdings_interval_s {
        scheduler.remote_holdings_interval = Duration::from_secs_f64(s);
    }
    if let Some(n) = args.min_useful_peers {
        scheduler.min_useful_peers = n;
    }
    if let Some(n) = args.max_peers_in_use {
        scheduler.max_peers_in_use = n;
    }
    if let Some(w) = args.recent_window_s {
        scheduler.seed.redirect_patience = Duration::from_secs_f64(w);
    }
    if let Some(s) = args.refused_backoff_s {
        scheduler.refused_backoff = Duration::from_secs_f64(s);
    }
    if let Some(n) = args.endgame_threshold {
        scheduler.endgame_threshold = n;
    }
    if let Some(s) = args.not_yet_retry_s {
        scheduler.seed.not_yet_retry = Duration::from_secs_f64(s);
    }
    if let Some(n) = args.give_up_after_refusals {
        scheduler.give_up_after_refusals = n;
    }
    if let Some(n) = args.max_redirects_waiting {
        scheduler.seed.max_redirects_waiting = n;
    }
    if let Some(n) = args.seed_max_in_flight {
        scheduler.seed.max_in_flight = n;
    }
    let holders_order = match args.holders_order.as_str() {
        "hash" => HoldersOrder::Hash,
        "random" => HoldersOrder::Random,
        other => {
            eprintln!("--holders-order must be hash or random, not {other:?}");
            std::process::exit(2);
        }
    };
    let config = Config {
        holders_order,
        wan_fetchers: args.wan_fetchers,
        recent_window: args.recent_window_s.map_or(
            pkgmesh_node::swarm::admission::DEFAULT_RECENT_WINDOW,
            Duration::from_secs_f64,
        ),
        max_uploads: args.max_uploads,
        scheduler,
        nodes: args.nodes,
        size_bytes: args.size_mib << 20,
        sites: args.sites.max(1),
        rate_mbit: args.rate_mbit,
        wan_mbit: args.wan_mbit,
        seed_rate_mbit: args.seed_rate_mbit,
        latency: Duration::from_secs_f64(args.latency_ms / 1e3),
        wan_latency: Duration::from_secs_f64(args.wan_latency_ms / 1e3),
        seed: args.seed,
        start_spread: Duration::from_secs_f64(args.start_spread_s),
        max_time: Duration::from_secs_f64(args.max_sim_s),
        check_invariants: args.check_invariants,
        progress_every: args.progress_s.map(Duration::from_secs_f64),
    };
    let wall = Instant::now();
    let r = sim::run(config);
    let wall_s = wall.elapsed().as_secs_f64();
    let round = |x: f64| (x * 1000.0).round() / 1000.0;
    let fields: Vec<(&str, serde_json::Value)> = vec![
        ("system", serde_json::json!("pkgmesh-sim")),
        ("nodes", serde_json::json!(r.nodes)),
        ("done", serde_json::json!(r.done)),
        ("size_mib", serde_json::json!(args.size_mib)),
        ("chunk_kib", serde_json::json!(r.chunk_bytes / 1024)),
        ("chunks", serde_json::json!(r.chunks)),
        ("sites", serde_json::json!(args.sites)),
        ("rate_mbit", serde_json::json!(args.rate_mbit)),
        ("wan_mbit", serde_json::json!(args.wan_mbit)),
        ("seed_rate_mbit", serde_json::json!(args.seed_rate_mbit)),
        ("latency_ms", serde_json::json!(args.latency_ms)),
        ("wan_latency_ms", serde_json::json!(args.wan_latency_ms)),
        ("seed", serde_json::json!(args.seed)),
        ("holders_order", serde_json::json!(args.holders_order)),
        ("wan_fetchers", serde_json::json!(args.wan_fetchers)),
        (
            "peers_known_mean",
            serde_json::json!(round(r.peers_known_mean)),
        ),
        (
            "remote_after_redirect_ratio",
            serde_json::json!(round(r.remote_after_redirect_ratio)),
        ),
        (
            "remote_fresh_ratio",
            serde_json::json!(round(r.remote_fresh_ratio)),
        ),
        (
            "upload_busy_max",
            serde_json::json!(round(r.upload_busy_max)),
        ),
        (
            "upload_busy_mean",
            serde_json::json!(round(r.upload_busy_mean)),
        ),
        ("ideal_s", serde_json::json!(round(r.ideal_s))),
        ("min_s", serde_json::json!(round(r.min_s))),
        ("p50_s", serde_json::json!(round(r.p50_s))),
        ("p90_s", serde_json::json!(round(r.p90_s))),
        ("p99_s", serde_json::json!(round(r.p99_s))),
        ("max_s", serde_json::json!(round(r.max_s))),
        ("max_vs_ideal", serde_json::json!(round(r.max_vs_ideal()))),
        (
            "origin_tx_ratio",
            serde_json::json!(round(r.origin_tx_ratio)),
        ),
        (
            "wan_per_site_max",
            serde_json::json!(round(r.wan_per_site_max)),
        ),
        (
            "wan_per_site_mean",
            serde_json::json!(round(r.wan_per_site_mean)),
        ),
        ("seed_served", serde_json::json!(r.seed_served)),
        (
            "seed_served_after_peer_failure",
            serde_json::json!(r.seed_served_after_peer_failure),
        ),
        ("seed_redirected", serde_json::json!(r.seed_redirected)),
        ("requests", serde_json::json!(r.requests)),
        ("not_held", serde_json::json!(r.not_held)),
        ("refused", serde_json::json!(r.refused)),
        ("max_uploads", serde_json::json!(args.max_uploads)),
        ("cancels", serde_json::json!(r.cancels)),
        ("bans", serde_json::json!(r.bans)),
        ("get_peers", serde_json::json!(r.get_peers)),
        (
            "from_seed_ratio",
            serde_json::json!(round(r.from_seed_ratio)),
        ),
        (
            "from_local_ratio",
            serde_json::json!(round(r.from_local_ratio)),
        ),
        (
            "from_remote_ratio",
            serde_json::json!(round(r.from_remote_ratio)),
        ),
        (
            "duplicate_ratio",
            serde_json::json!(round(r.duplicate_ratio)),
        ),
        ("events", serde_json::json!(r.events)),
        ("sim_s", serde_json::json!(round(r.sim_s))),
        ("wall_s", serde_json::json!(round(wall_s))),
    ];
    let line: serde_json::Map<String, serde_json::Value> = fields
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let line = serde_json::Value::Object(line);
    println!("{line}");
}
