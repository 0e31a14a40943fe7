//! Starts a cluster of nodes in one process on 127.0.0.1 (ephemeral ports), shows them
//! converge, changes the load on some, and prints what every node sees of every other.
//!
//! ```text
//! cargo run --release --example local-cluster -- --nodes 5
//! ```

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::Parser;
use mesh::{MeshEvent, Node, Timing};

#[derive(Parser, Debug)]
#[command(about = "Run a local mesh cluster and show what every node sees")]
struct Args {
    /// Number of nodes to start.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(2..=64))]
    nodes: u16,
    /// Stop one node abruptly at the end and show every other node detect the failure.
    #[arg(long)]
    kill_node: bool,
    /// Give up on any step after this many seconds.
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("local-cluster failed: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let limit = Duration::from_secs(args.timeout_secs);
    let n = usize::from(args.nodes);
    let started = Instant::now();

    let mut nodes: Vec<Node> = Vec::with_capacity(n);
    for i in 0..n {
        let mut builder = Node::builder()
            .node_id(format!("node-{i}"))?
            .gossip_bind("127.0.0.1:0".parse()?)
            .grpc_endpoint(format!("http://127.0.0.1:{}", 50051 + i))
            .timing(Timing::local())
            .max_concurrency(4 * (1 + i as u32 % 3));
        if let Some(seed) = nodes.first() {
            builder = builder.seeds([seed.gossip_addr()]);
        }
        nodes.push(builder.start().await?);
    }
    println!(
        "started {n} nodes, all joining through {}",
        nodes[0].gossip_addr()
    );

    for node in &nodes {
        tokio::time::timeout(limit, node.membership().wait_until(|v| v.len() == n))
            .await
            .map_err(|_| {
                format!(
                    "{} did not see {n} members within {limit:?}",
                    node.node_id()
                )
            })?;
    }
    println!(
        "converged: every node sees {n} members after {:.0?}",
        started.elapsed()
    );

    // Load: node i has 2·i tasks in hand.
    let load_started = Instant::now();
    let guards: Vec<_> = nodes
        .iter()
        .enumerate()
        .flat_map(|(i, node)| {
            (0..2 * i)
                .map(|_| node.load().begin_task())
                .collect::<Vec<_>>()
        })
        .collect();
    for observer in &nodes {
        tokio::time::timeout(
            limit,
            observer.membership().wait_until(|v| {
                nodes.iter().all(|subject| {
                    v.get(subject.node_id().as_str())
                        .and_then(|m| m.state())
                        .is_some_and(|s| s.pending == subject.load().pending())
                })
            }),
        )
        .await
        .map_err(|_| {
            format!(
                "{} did not learn every load within {limit:?}",
                observer.node_id()
            )
        })?;
    }
    println!(
        "load changes reached every node after {:.0?}\n",
        load_started.elapsed()
    );
    print_matrix(&nodes);
    drop(guards);

    if args.kill_node {
        let victim = nodes.pop().ok_or("no node to kill")?;
        let mut events = nodes[0].events();
        let killed_at = Instant::now();
        victim.shutdown().await;
        tokio::time::timeout(limit, async {
            loop {
                if let Ok(MeshEvent::Failed(id)) = events.recv().await
                    && id.node_id() == victim.node_id()
                {
                    return;
                }
            }
        })
        .await
        .map_err(|_| {
            format!(
                "failure of {} not detected within {limit:?}",
                victim.node_id()
            )
        })?;
        println!(
            "\nkilled {}: {} reported it failed after {:.0?}",
            victim.node_id(),
            nodes[0].node_id(),
            killed_at.elapsed()
        );
    }

    for node in &nodes {
        node.leave().await?;
    }
    println!("\nall nodes left cleanly");
    Ok(())
}

/// Rows: the observing node. Columns: what it believes each node's `pending/max` is.
fn print_matrix(nodes: &[Node]) {
    print!("{:>10} |", "sees →");
    for subject in nodes {
        print!(" {:>8}", subject.node_id().as_str());
    }
    println!();
    println!("{}", "-".repeat(12 + 9 * nodes.len()));
    for observer in nodes {
        let view = observer.view();
        print!("{:>10} |", observer.node_id().as_str());
        for subject in nodes {
            let cell = view
                .get(subject.node_id().as_str())
                .and_then(|m| m.state())
                .map_or_else(
                    || "?".to_owned(),
                    |s| format!("{}/{}", s.pending, s.max_concurrency),
                );
            print!(" {cell:>8}");
        }
        println!();
    }
}
