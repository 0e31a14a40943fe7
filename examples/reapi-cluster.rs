//! N Remote Execution API replicas in one process, for Bazel.
//!
//! Starts `--nodes` replicas (default 3) on 127.0.0.1 with ephemeral ports, each a mesh node
//! with its own CAS and action cache under `--data-dir` (default: a fresh directory in the
//! system's temporary directory, removed on exit), joined into one cluster. Prints each
//! replica's endpoint on a line of its own (`grpc://127.0.0.1:PORT`), then the Bazel flags to
//! use, then `ready`. On Ctrl-C or SIGTERM it prints who did what — actions executed, cache
//! hits, blobs fetched from peers, `Execute` calls forwarded in and out — and exits.
//!
//! ```text
//! cargo run --example reapi-cluster
//! cargo run --example reapi-cluster -- --nodes 5 --max-concurrency 4 --data-dir /tmp/reapi
//! ```

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use mesh::Timing;
use mesh_reapi::{ReapiConfig, ReapiServer};

#[derive(Parser, Debug)]
#[command(about = "Run N Remote Execution API replicas in one process, for Bazel")]
struct Args {
    /// Number of replicas.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    nodes: u16,
    /// Where the replicas keep their data (one subdirectory each). Default: a new temporary
    /// directory, removed on exit.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Each replica's CAS bound, in MiB.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    cas_max_mib: u64,
    /// Actions each replica runs at once (default: the number of CPUs).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_concurrency: Option<u32>,
    /// The `--jobs` value suggested in the printed Bazel flags.
    #[arg(long, default_value_t = 32)]
    jobs: u32,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("reapi-cluster: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let (data_dir, temporary) = match &args.data_dir {
        Some(dir) => (dir.clone(), false),
        None => (
            std::env::temp_dir().join(format!("reapi-cluster-{}", std::process::id())),
            true,
        ),
    };
    let result = serve(&args, &data_dir).await;
    if temporary {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    result
}

async fn serve(args: &Args, data_dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let mut replicas: Vec<ReapiServer> = Vec::new();
    for i in 0..args.nodes {
        let mut config = ReapiConfig::new(data_dir.join(format!("r{i}")));
        config.cas_max_bytes = args.cas_max_mib << 20;
        if let Some(max) = args.max_concurrency {
            config.max_concurrency = max;
        }
        let mut node = mesh::Node::builder()
            .node_id(format!("r{i}"))?
            .gossip_bind("127.0.0.1:0".parse()?)
            .timing(Timing::local());
        if let Some(first) = replicas.first() {
            node = node.seeds([first.node().gossip_addr()]);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        replicas.push(ReapiServer::start(node, config, listener).await?);
    }
    let expected = replicas.len();
    for replica in &replicas {
        let formed = replica.node().membership().wait_until(|view| {
            view.len() == expected
                && view
                    .peers()
                    .iter()
                    .all(|p| p.state().is_some_and(|s| s.grpc_endpoint.is_some()))
        });
        tokio::time::timeout(Duration::from_secs(30), formed)
            .await
            .map_err(|_| "the replicas did not form one cluster within 30 s")?;
    }
    println!(
        "{} replicas in one cluster, data in {}",
        replicas.len(),
        data_dir.display()
    );
    for replica in &replicas {
        println!("{}", replica.endpoint());
    }
    println!(
        "bazel flags: --remote_executor={} --spawn_strategy=remote --noremote_local_fallback --jobs={}",
        replicas[0].endpoint(),
        args.jobs
    );
    println!("ready");

    wait_for_signal().await?;

    println!();
    println!(
        "{:<6} {:<24} {:>9} {:>7} {:>11} {:>10} {:>14} {:>14} {:>13} {:>14}",
        "node",
        "endpoint",
        "executed",
        "merged",
        "cache hits",
        "peer hits",
        "blobs fetched",
        "bytes fetched",
        "forwarded in",
        "forwarded out"
    );
    for replica in &replicas {
        let stats = replica.stats();
        println!(
            "{:<6} {:<24} {:>9} {:>7} {:>11} {:>10} {:>14} {:>14} {:>13} {:>14}",
            replica.node().node_id().as_str(),
            replica.endpoint(),
            stats.executed,
            stats.merged,
            stats.cache_hits,
            stats.peer_cache_hits,
            stats.blobs_fetched,
            stats.bytes_fetched,
            stats.forwarded_in,
            stats.forwarded_out
        );
    }
    for replica in replicas {
        replica.shutdown().await;
    }
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn wait_for_signal() -> std::io::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result,
        _ = terminate.recv() => Ok(()),
    }
}
