//! The main job: a cluster of build-execution replicas in one process, sharing a burst of work.
//!
//! Starts `--nodes` replicas on 127.0.0.1 (ephemeral ports, capacities 4, 8, 12, 4, 8, …), each
//! a mesh node with a gRPC server, sends `--actions` simulated actions to the first one, follows
//! some of them with `WaitExecution` through other nodes, and prints who ran what, the makespan
//! and the ideal. With `--kill-node`, the last node is killed mid-run: the entry node's route
//! layer runs the `Execute` calls lost with it again elsewhere (the rule marks `Execute`
//! idempotent), and the client retries what still fails — operations it was following with
//! `WaitExecution` on the dead owner — as a Remote Execution API client does on
//! `UNAVAILABLE`/`NOT_FOUND`.
//!
//! Exits non-zero if any action did not complete.
//!
//! ```text
//! cargo run --release --example local-cluster
//! cargo run --release --example local-cluster -- --nodes 8 --actions 1000 --kill-node
//! ```

use std::{
    collections::BTreeMap,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

// Wall-clock measurement, through tokio's clock like the rest of the project (clippy.toml).
use tokio::time::Instant;

use clap::{Parser, ValueEnum};
use futures::StreamExt;
use mesh::{
    Affinity, LeastLoaded, Node, OperationId, PowerOfTwoChoices, RoundRobin, Strategy, Timing,
    WeightedCapacity, WhenFull,
};
use mesh_demo::{
    DemoNode, finish,
    proto::demo::v1::{Action, ExecuteRequest, Operation, WaitExecutionRequest},
};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use tokio::sync::Notify;
use tonic::Code;

#[derive(Parser, Debug)]
#[command(about = "Run a local mesh cluster and share a burst of simulated actions across it")]
struct Args {
    /// Number of replicas.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(2..=64))]
    nodes: u16,
    /// Number of actions in the burst.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    actions: u32,
    /// Shortest simulated action, in milliseconds.
    #[arg(long, default_value_t = 20)]
    min_ms: u64,
    /// Longest simulated action, in milliseconds.
    #[arg(long, default_value_t = 200)]
    max_ms: u64,
    /// Follow every Nth action with WaitExecution on another node instead of its Execute
    /// stream (0: never).
    #[arg(long, default_value_t = 4)]
    wait_every: u32,
    /// Kill the last node once a third of the actions have completed.
    #[arg(long)]
    kill_node: bool,
    /// How the entry node picks where each action runs.
    #[arg(long, value_enum, default_value_t = StrategyArg::LeastLoaded)]
    strategy: StrategyArg,
    /// What the entry node does when every node is full: hold the call until a slot frees
    /// anywhere (wait), or queue it locally (run-locally, the seed server's rule).
    #[arg(long, value_enum, default_value_t = WhenFullArg::Wait)]
    when_full: WhenFullArg,
    /// Seed for action durations.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum WhenFullArg {
    Wait,
    RunLocally,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum StrategyArg {
    LeastLoaded,
    PowerOfTwo,
    RoundRobin,
    Weighted,
    Affinity,
}

impl StrategyArg {
    fn build(self) -> Box<dyn FnOnce(mesh::NodeBuilder) -> mesh::NodeBuilder> {
        fn with(s: impl Strategy) -> Box<dyn FnOnce(mesh::NodeBuilder) -> mesh::NodeBuilder> {
            Box::new(move |b| b.strategy(s))
        }
        match self {
            StrategyArg::LeastLoaded => with(LeastLoaded::new()),
            StrategyArg::PowerOfTwo => with(PowerOfTwoChoices::new()),
            StrategyArg::RoundRobin => with(RoundRobin::new()),
            StrategyArg::Weighted => with(WeightedCapacity::new()),
            StrategyArg::Affinity => with(Affinity::new()),
        }
    }
}

/// Attempts per action before it counts as failed.
const MAX_ATTEMPTS: u32 = 5;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .init();
    let args = Args::parse();
    if args.min_ms > args.max_ms {
        eprintln!(
            "--min-ms {} is greater than --max-ms {}",
            args.min_ms, args.max_ms
        );
        return ExitCode::FAILURE;
    }
    match tokio::time::timeout(Duration::from_secs(args.timeout_secs), run(&args)).await {
        Ok(Ok(true)) => ExitCode::SUCCESS,
        Ok(Ok(false)) => ExitCode::FAILURE,
        Ok(Err(error)) => {
            eprintln!("local-cluster failed: {error}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("local-cluster did not finish within {}s", args.timeout_secs);
            ExitCode::FAILURE
        }
    }
}

/// What happened to one action.
struct Outcome {
    executed_by: Option<String>,
    attempts: u32,
    error: Option<String>,
}

async fn run(args: &Args) -> Result<bool, Box<dyn std::error::Error>> {
    let n = usize::from(args.nodes);
    let capacity = |i: usize| 4 * (1 + (i as u32 % 3));

    // Replicas.
    let mut replicas: Vec<DemoNode> = Vec::with_capacity(n);
    for i in 0..n {
        let mut builder = Node::builder()
            .node_id(format!("node-{i}"))?
            .gossip_bind("127.0.0.1:0".parse()?)
            .timing(Timing::local())
            .max_concurrency(capacity(i))
            .when_full(match args.when_full {
                WhenFullArg::Wait => WhenFull::Wait,
                WhenFullArg::RunLocally => WhenFull::RunLocally,
            });
        builder = (args.strategy.build())(builder);
        if let Some(seed) = replicas.first() {
            builder = builder.seeds([seed.node().gossip_addr()]);
        }
        replicas.push(DemoNode::start(builder, "127.0.0.1:0".parse()?).await?);
    }
    let started = Instant::now();
    for replica in &replicas {
        replica
            .node()
            .membership()
            .wait_until(|v| v.len() == n && v.peers().iter().all(|p| p.state().is_some()))
            .await;
    }
    let total_capacity: u32 = (0..n).map(capacity).sum();
    println!(
        "{n} replicas on 127.0.0.1, {total_capacity} slots in all; converged in {:.0?}",
        started.elapsed()
    );

    // The burst.
    let mut rng = StdRng::seed_from_u64(args.seed);
    let durations: Vec<u64> = (0..args.actions)
        .map(|_| rng.random_range(args.min_ms..=args.max_ms))
        .collect();
    let work_ms: u64 = durations.iter().sum();
    let longest = durations.iter().copied().max().unwrap_or(0);
    println!(
        "sending {} actions ({:.1}s of work, {}-{} ms each) to node-0, strategy {:?}, when full {:?}{}",
        args.actions,
        work_ms as f64 / 1000.0,
        args.min_ms,
        args.max_ms,
        args.strategy,
        args.when_full,
        if args.kill_node {
            format!("; node-{} will be killed mid-run", n - 1)
        } else {
            String::new()
        }
    );

    let entry = replicas[0].client().await?;
    let mut followers = Vec::with_capacity(n);
    for replica in &replicas {
        followers.push(replica.client().await?);
    }
    let completed = Arc::new(AtomicU64::new(0));
    let third_done = Arc::new(Notify::new());
    let burst_started = Instant::now();
    let mut tasks = Vec::with_capacity(durations.len());
    for (i, duration_ms) in durations.iter().copied().enumerate() {
        let mut entry = entry.clone();
        // Followers are nodes that stay up: a client's load balancer would not send a call to
        // a node that is gone.
        let stable = if args.kill_node { n - 2 } else { n - 1 };
        let follow_on =
            (args.wait_every > 0 && stable > 0 && (i as u32).is_multiple_of(args.wait_every))
                .then(|| followers[1 + (i / args.wait_every as usize) % stable].clone());
        let completed = Arc::clone(&completed);
        let third_done = Arc::clone(&third_done);
        let third = u64::from(args.actions).div_ceil(3);
        tasks.push(tokio::spawn(async move {
            let request = ExecuteRequest {
                instance_name: "main".to_owned(),
                action: Some(Action {
                    input_root_digest: format!("digest-{}", i % 50),
                    duration_ms,
                    platform: Default::default(),
                    exit_code: 0,
                }),
            };
            let mut outcome = Outcome {
                executed_by: None,
                attempts: 0,
                error: None,
            };
            while outcome.attempts < MAX_ATTEMPTS {
                outcome.attempts += 1;
                match execute_once(&mut entry, request.clone(), follow_on.clone()).await {
                    Ok(done) => {
                        outcome.executed_by = done.response.map(|r| r.executed_by);
                        outcome.error = None;
                        break;
                    }
                    // The Remote Execution API's advice: retry Execute when the operation is
                    // lost with its node.
                    Err(status)
                        if matches!(
                            status.code(),
                            Code::Unavailable | Code::NotFound | Code::Aborted
                        ) =>
                    {
                        outcome.error = Some(status.message().to_owned());
                    }
                    Err(status) => {
                        outcome.error = Some(format!("{:?}: {}", status.code(), status.message()));
                        break;
                    }
                }
            }
            if completed.fetch_add(1, Ordering::AcqRel) + 1 == third {
                third_done.notify_one();
            }
            outcome
        }));
    }

    let mut killed = None;
    if args.kill_node {
        third_done.notified().await;
        let victim = replicas.pop().ok_or("no replica to kill")?;
        let stats = victim.stats();
        let peak = victim.node().load().peak_pending();
        let name = victim.node().node_id().to_string();
        victim.kill().await;
        println!(
            "killed {name} after {:.0?} ({} of {} actions done)",
            burst_started.elapsed(),
            completed.load(Ordering::Acquire),
            args.actions
        );
        killed = Some((name, stats, peak));
    }

    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        outcomes.push(task.await?);
    }
    let makespan = burst_started.elapsed();

    // Report.
    let mut executed_by: BTreeMap<String, u64> = BTreeMap::new();
    let mut failed = 0;
    let mut retried = 0;
    for outcome in &outcomes {
        if outcome.attempts > 1 {
            retried += 1;
        }
        match (&outcome.executed_by, &outcome.error) {
            (Some(node), None) => *executed_by.entry(node.clone()).or_default() += 1,
            (_, error) => {
                failed += 1;
                eprintln!(
                    "action failed after {} attempts: {}",
                    outcome.attempts,
                    error.as_deref().unwrap_or("no result")
                );
            }
        }
    }

    println!();
    println!(
        "{:>8} {:>9} {:>9} {:>7} {:>8} {:>9} {:>10} {:>8} {:>6}",
        "node", "capacity", "executed", "share", "cap.share", "fwd in", "fwd out", "waits", "peak"
    );
    let mut rows: Vec<(String, u32, mesh_demo::ServiceStats, u32, bool)> = replicas
        .iter()
        .enumerate()
        .map(|(i, r)| {
            (
                r.node().node_id().to_string(),
                capacity(i),
                r.stats(),
                r.node().load().peak_pending(),
                false,
            )
        })
        .collect();
    if let Some((name, stats, peak)) = killed {
        rows.push((name, capacity(n - 1), stats, peak, true));
    }
    let completed_total: u64 = executed_by.values().sum();
    for (name, cap, stats, peak, dead) in &rows {
        let ran = executed_by.get(name).copied().unwrap_or(0);
        println!(
            "{:>8} {:>9} {:>9} {:>6.1}% {:>8.1}% {:>9} {:>10} {:>8} {:>6}{}",
            name,
            cap,
            ran,
            100.0 * ran as f64 / completed_total.max(1) as f64,
            100.0 * f64::from(*cap) / f64::from(total_capacity),
            stats.forwarded_in,
            stats.forwarded_out,
            stats.waits_relayed,
            peak,
            if *dead { "  (killed)" } else { "" }
        );
    }

    let ideal_ms = (work_ms as f64 / f64::from(total_capacity)).max(longest as f64);
    println!();
    println!(
        "makespan {:.2}s, ideal {:.2}s (work / slots, at least the longest action): {:.2}x",
        makespan.as_secs_f64(),
        ideal_ms / 1000.0,
        makespan.as_secs_f64() * 1000.0 / ideal_ms
    );
    let rerouted: u64 = rows.iter().map(|(_, _, stats, _, _)| stats.rerouted).sum();
    println!(
        "{} of {} actions completed, {} re-routed by the mesh after their node died, {} retried \
         by the client, {} failed",
        completed_total, args.actions, rerouted, retried, failed
    );

    for replica in replicas {
        replica.shutdown_gracefully().await?;
    }
    Ok(failed == 0 && completed_total == u64::from(args.actions))
}

/// One attempt: Execute on the entry node; for some actions, follow the operation by name on
/// another node instead of the Execute stream. Checks that the name names the executor.
async fn execute_once(
    entry: &mut mesh_demo::proto::demo::v1::execution_client::ExecutionClient<
        tonic::transport::Channel,
    >,
    request: ExecuteRequest,
    follow_on: Option<
        mesh_demo::proto::demo::v1::execution_client::ExecutionClient<tonic::transport::Channel>,
    >,
) -> Result<Operation, tonic::Status> {
    let mut stream = entry.execute(request).await?.into_inner();
    let done = match follow_on {
        None => finish(stream).await?,
        Some(mut other) => {
            let first = stream
                .next()
                .await
                .ok_or_else(|| tonic::Status::aborted("empty Execute stream"))??;
            drop(stream);
            let waited = other
                .wait_execution(WaitExecutionRequest {
                    name: first.name.clone(),
                })
                .await?
                .into_inner();
            finish(waited).await?
        }
    };
    let owner: OperationId = done
        .name
        .parse()
        .map_err(|e: mesh::route::OperationIdError| tonic::Status::internal(e.to_string()))?;
    let executed_by = done.response.as_ref().map(|r| r.executed_by.as_str());
    if executed_by != Some(owner.node().as_str()) {
        return Err(tonic::Status::internal(format!(
            "operation {} was executed by {executed_by:?}, not by the node it names",
            done.name
        )));
    }
    Ok(done)
}
