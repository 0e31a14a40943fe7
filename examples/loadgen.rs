//! Submits simulated actions to a node and reports who ran them, latencies and failures.
//!
//! ```text
//! cargo run --example loadgen -- --target http://127.0.0.1:50051 --actions 500 --concurrency 100
//! ```
//!
//! Before sending anything it asks the node's admin API whether any member can take the work
//! (a live member with the platform's tags, not draining, with at least one slot), and stops
//! with a message naming the address if none can. While it runs it prints progress every
//! second; if no action finishes for `--stall-timeout` beyond the longest action (`--max-ms`)
//! it stops and says what the cluster looks like, and each action gives up after `--timeout`. It never waits forever, and exits
//! non-zero if any action failed.

use std::{
    collections::{BTreeMap, HashMap},
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

// Wall-clock measurement, through tokio's clock like the rest of the project (clippy.toml).
use tokio::time::Instant;

use clap::Parser;

#[path = "../src/bin/meshctl/client.rs"]
mod client;
use mesh::proto::admin::v1::{ListMembersRequest, mesh_admin_client::MeshAdminClient};
use mesh_demo::{
    finish,
    proto::demo::v1::{Action, ExecuteRequest, execution_client::ExecutionClient},
};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use tokio::{sync::Semaphore, task::JoinSet};
use tonic::transport::Channel;

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
    /// Give up on one action after this long (its deadline, also sent to the node).
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Stop when no action has finished for this long beyond the longest action (--max-ms).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    stall_timeout: Duration,
    /// Print no progress lines, only the summary.
    #[arg(long)]
    quiet: bool,
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

/// What the actions did so far.
#[derive(Default)]
struct Progress {
    ok: AtomicU32,
    failed: AtomicU32,
}

impl Progress {
    fn done(&self) -> u32 {
        self.ok.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed)
    }
}

type Outcome = (Duration, Result<String, tonic::Status>);

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
        .collect::<Result<HashMap<_, _>, _>>()?;
    let channel = client::connect(&args.target, &args.tls).await?;
    check_capacity(&channel, &args.target, &platform).await?;
    let client = ExecutionClient::new(channel.clone());
    let mut rng = StdRng::seed_from_u64(args.seed);
    let slots = Arc::new(Semaphore::new(args.concurrency));
    let progress = Arc::new(Progress::default());
    let started = Instant::now();
    let mut tasks: JoinSet<Outcome> = JoinSet::new();
    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut submitted = 0;
    let mut ticker =
        tokio::time::interval_at(started + Duration::from_secs(1), Duration::from_secs(1));
    let mut last_progress = (0, Instant::now());
    while outcomes.len() < args.actions as usize {
        tokio::select! {
            permit = Arc::clone(&slots).acquire_owned(), if submitted < args.actions => {
                let permit = permit?;
                let mut client = client.clone();
                let mut request = tonic::Request::new(ExecuteRequest {
                    instance_name: String::new(),
                    action: Some(Action {
                        input_root_digest: format!("digest-{submitted}"),
                        duration_ms: rng.random_range(args.min_ms..=args.max_ms),
                        platform: platform.clone(),
                        exit_code: 0,
                    }),
                });
                request.set_timeout(args.timeout);
                let progress = Arc::clone(&progress);
                let timeout = args.timeout;
                tasks.spawn(async move {
                    let begun = Instant::now();
                    let call = async {
                        let response = client.execute(request).await?;
                        let operation = finish(response.into_inner()).await?;
                        Ok(operation.response.map(|r| r.executed_by).unwrap_or_default())
                    };
                    let result = match tokio::time::timeout(timeout, call).await {
                        Ok(result) => result,
                        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                            "no answer within --timeout {}",
                            humantime::format_duration(timeout)
                        ))),
                    };
                    let counter = if result.is_ok() { &progress.ok } else { &progress.failed };
                    counter.fetch_add(1, Ordering::Relaxed);
                    drop(permit);
                    (begun.elapsed(), result)
                });
                submitted += 1;
            }
            Some(joined) = tasks.join_next() => outcomes.push(joined?),
            _ = ticker.tick() => {
                let done = progress.done();
                if done != last_progress.0 {
                    last_progress = (done, Instant::now());
                }
                if !args.quiet {
                    println!(
                        "{:>6.1}s  {done}/{} done ({} ok, {} failed), {} in flight",
                        started.elapsed().as_secs_f64(),
                        args.actions,
                        progress.ok.load(Ordering::Relaxed),
                        progress.failed.load(Ordering::Relaxed),
                        submitted - done,
                    );
                }
                // An action may legitimately take --max-ms, so that much silence is not a stall.
                let stall = args.stall_timeout + Duration::from_millis(args.max_ms);
                if last_progress.1.elapsed() >= stall {
                    tasks.abort_all();
                    let cluster = describe_cluster(&channel, &args.target, &platform).await;
                    return Err(format!(
                        "no action finished in the last {} ({done} of {} done, {} in flight) \
                         through {}: {cluster}",
                        humantime::format_duration(stall),
                        args.actions,
                        submitted - done,
                        args.target,
                    )
                    .into());
                }
            }
        }
    }
    report(&args, started.elapsed(), outcomes)
}

/// The summary: counts, latencies, who ran what, and why actions failed.
fn report(
    args: &Args,
    elapsed: Duration,
    outcomes: Vec<Outcome>,
) -> Result<bool, Box<dyn std::error::Error>> {
    let mut by_node: BTreeMap<String, u32> = BTreeMap::new();
    let mut latencies: Vec<Duration> = Vec::new();
    let mut failures: BTreeMap<String, u32> = BTreeMap::new();
    for (latency, result) in outcomes {
        match result {
            Ok(node) => {
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
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    println!(
        "{} actions in {:.2?} through {}: {} ok, {} failed",
        args.actions,
        elapsed,
        args.target,
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

/// A member that could take an action with `platform`: its name, and why not if it cannot.
struct Candidate {
    node: String,
    refusal: Option<String>,
}

/// The live members and whether each can take the work, from the node's admin API; `None`
/// when the node does not serve it.
async fn candidates(
    channel: &Channel,
    target: &str,
    platform: &HashMap<String, String>,
) -> Result<Option<Vec<Candidate>>, String> {
    let mut admin = MeshAdminClient::new(channel.clone());
    let members = match admin.list_members(ListMembersRequest {}).await {
        Ok(members) => members.into_inner(),
        Err(status) if status.code() == tonic::Code::Unimplemented => return Ok(None),
        Err(status) => {
            return Err(client::call_failed(
                target,
                "the admin API (ListMembers)",
                &status,
            ));
        }
    };
    let live = members
        .members
        .into_iter()
        .filter(|m| matches!(m.status.as_str(), "alive" | "suspect"));
    Ok(Some(
        live.map(|m| {
            let refusal = match &m.state {
                None => Some("its state has not arrived".to_owned()),
                Some(state) => {
                    let missing: Vec<String> = platform
                        .iter()
                        .filter(|(k, v)| state.tags.get(*k) != Some(*v))
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    if !missing.is_empty() {
                        Some(format!("lacks {}", missing.join(",")))
                    } else if state.draining {
                        Some("draining".to_owned())
                    } else if state.max_concurrency == 0 {
                        Some("max_concurrency 0".to_owned())
                    } else {
                        None
                    }
                }
            };
            Candidate {
                node: m.node_id,
                refusal,
            }
        })
        .collect(),
    ))
}

/// Fails, naming the address, when no member of the cluster can take the work.
async fn check_capacity(
    channel: &Channel,
    target: &str,
    platform: &HashMap<String, String>,
) -> Result<(), String> {
    let Some(members) = candidates(channel, target, platform).await? else {
        eprintln!("loadgen: {target} serves no admin API; sending without checking capacity");
        return Ok(());
    };
    if members.iter().any(|m| m.refusal.is_none()) {
        return Ok(());
    }
    let why: Vec<String> = members
        .iter()
        .map(|m| format!("{}: {}", m.node, m.refusal.as_deref().unwrap_or("")))
        .collect();
    Err(format!(
        "the cluster behind {target} has no slot for this work{}: {} \
         (raise max_concurrency, undrain a node, or add one with the platform)",
        if platform.is_empty() {
            String::new()
        } else {
            let mut tags: Vec<String> = platform.iter().map(|(k, v)| format!("{k}={v}")).collect();
            tags.sort();
            format!(" (platform {})", tags.join(","))
        },
        why.join("; ")
    ))
}

/// The cluster's capacity for the work as the admin API tells it, for a stall report.
async fn describe_cluster(
    channel: &Channel,
    target: &str,
    platform: &HashMap<String, String>,
) -> String {
    match candidates(channel, target, platform).await {
        Ok(Some(members)) => {
            let able: Vec<&str> = members
                .iter()
                .filter(|m| m.refusal.is_none())
                .map(|m| m.node.as_str())
                .collect();
            if able.is_empty() {
                "no live member can take the work any more (see meshctl members)".to_owned()
            } else {
                format!(
                    "members that can take it: {} (see meshctl members and meshctl stats)",
                    able.join(", ")
                )
            }
        }
        Ok(None) => "the node serves no admin API to ask why".to_owned(),
        Err(error) => error,
    }
}
