//! Submits simulated actions to a node and reports who ran them, latencies and failures.
//!
//! ```text
//! cargo run --example loadgen -- --target http://127.0.0.1:50051 --actions 500 --concurrency 100
//! ```

use std::{collections::BTreeMap, process::ExitCode, sync::Arc, time::Duration};

// Wall-clock measurement, through tokio's clock like the rest of the project (clippy.toml).
use tokio::time::Instant;

use clap::Parser;

#[path = "support/client.rs"]
mod client;
use mesh_demo::{
    finish,
    proto::demo::v1::{Action, ExecuteRequest, execution_client::ExecutionClient},
};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use tokio::sync::Semaphore;

#[derive(Parser, Debug)]
#[command(about = "Drive a mesh node with simulated actions")]
struct Args {
    /// The node to send Execute calls to (https:// with --tls-ca).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    target: String,
    #[command(flatten)]
    tls: client::TlsArgs,
    /// Number of actions.
    #[arg(long, default_value_t = 200)]
    actions: u32,
    /// Actions in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Shortest action, ms.
    #[arg(long, default_value_t = 20)]
    min_ms: u64,
    /// Longest action, ms.
    #[arg(long, default_value_t = 200)]
    max_ms: u64,
    /// A required platform property, key=value (repeatable).
    #[arg(long)]
    platform: Vec<String>,
    /// Seed for durations.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("loadgen: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<bool, Box<dyn std::error::Error>> {
    if args.min_ms > args.max_ms || args.concurrency == 0 {
        return Err("need --min-ms <= --max-ms and --concurrency > 0".into());
    }
    let platform = args
        .platform
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| format!("--platform {p:?} must be key=value"))
        })
        .collect::<Result<std::collections::HashMap<_, _>, _>>()?;
    let client = ExecutionClient::new(client::connect(&args.target, &args.tls).await?);
    let mut rng = StdRng::seed_from_u64(args.seed);
    let slots = Arc::new(Semaphore::new(args.concurrency));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..args.actions {
        let permit = Arc::clone(&slots).acquire_owned().await?;
        let mut client = client.clone();
        let request = ExecuteRequest {
            instance_name: String::new(),
            action: Some(Action {
                input_root_digest: format!("digest-{i}"),
                duration_ms: rng.random_range(args.min_ms..=args.max_ms),
                platform: platform.clone(),
                exit_code: 0,
            }),
        };
        tasks.push(tokio::spawn(async move {
            let begun = Instant::now();
            let result = match client.execute(request).await {
                Ok(response) => finish(response.into_inner()).await,
                Err(status) => Err(status),
            };
            drop(permit);
            (begun.elapsed(), result)
        }));
    }
    let mut by_node: BTreeMap<String, u32> = BTreeMap::new();
    let mut latencies: Vec<Duration> = Vec::new();
    let mut failures: BTreeMap<String, u32> = BTreeMap::new();
    for task in tasks {
        let (latency, result) = task.await?;
        match result {
            Ok(op) => {
                let node = op.response.map(|r| r.executed_by).unwrap_or_default();
                *by_node.entry(node).or_default() += 1;
                latencies.push(latency);
            }
            Err(status) => {
                *failures
                    .entry(format!("{:?}: {}", status.code(), status.message()))
                    .or_default() += 1;
            }
        }
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    println!(
        "{} actions in {:.2?}: {} ok, {} failed",
        args.actions,
        elapsed,
        latencies.len(),
        args.actions as usize - latencies.len()
    );
    println!(
        "latency p50 {:.0?}  p90 {:.0?}  p99 {:.0?}  max {:.0?}",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
    for (node, count) in &by_node {
        println!("  {node:<20} {count}");
    }
    for (failure, count) in &failures {
        println!("  failed x{count}: {failure}");
    }
    Ok(failures.is_empty())
}
