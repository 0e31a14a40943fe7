//! The project's own simulator: clusters of 10, 50 and 100 nodes on turmoil's simulated
//! network (lan timing, 1-5 ms per datagram), measured in simulated time. Prints a markdown
//! table for BENCHMARKS.md.
//!
//! `cargo bench -p mesh-core --bench simulation [-- 10 50 100]`

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;
#[allow(
    clippy::disallowed_types,
    reason = "the report's wall time is the real time a simulation takes, never the simulated clock"
)]
use std::time::Instant;

use mesh_core::{MeshEvent, MeshStats, Timing};
use support::Cluster;

/// Resident memory of this process in bytes (Linux), to report memory per node without an
/// allocator hook (the workspace forbids unsafe code, benches included).
fn resident_bytes() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

struct Report {
    n: usize,
    members: Duration,
    converge: Duration,
    propagation: Vec<Duration>,
    detection_median: Duration,
    detection_max: Duration,
    datagrams_per_node_s: f64,
    bytes_per_node_s: f64,
    memory_per_node: usize,
    wall: Duration,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn totals(cluster: &Cluster) -> MeshStats {
    let nodes = cluster.nodes.lock().unwrap();
    nodes.values().fold(MeshStats::default(), |mut acc, m| {
        let s = m.stats();
        acc.datagrams_sent += s.datagrams_sent;
        acc.bytes_sent += s.bytes_sent;
        acc
    })
}

fn run(n: usize) -> Report {
    #[allow(
        clippy::disallowed_types,
        reason = "wall time of the simulation, as above"
    )]
    let wall = Instant::now();
    let memory_before = resident_bytes();
    let mut cluster = Cluster::new(1, n, Timing::lan());
    let names: Vec<String> = cluster.all().iter().map(|s| s.to_string()).collect();
    let all: Vec<&str> = names.iter().map(String::as_str).collect();

    // 1. Cold start, everyone seeded with node-0: first the full member list, then every
    // peer's state too.
    let members = cluster.run_until("membership", Duration::from_secs(600), |c| {
        c.sees_exactly(&all)
    });
    let converge = members
        + cluster.run_until("convergence", Duration::from_secs(600), |c| {
            c.sees_exactly(&all)
                && all.iter().all(|o| {
                    c.view(o)
                        .is_some_and(|v| v.peers().iter().all(|p| p.state().is_some()))
                })
        });
    let memory_per_node = resident_bytes().saturating_sub(memory_before) / n;

    // 2. A load change on one node, until every other node sees it; twenty times.
    let mut propagation = Vec::new();
    let mut guards = Vec::new();
    for round in 0..20 {
        let source = &names[(round * 7) % n];
        let load = cluster.membership(source).load().clone();
        guards.push(load.begin_task());
        let want = load.pending();
        let elapsed = cluster.run_until("propagation", Duration::from_secs(60), |c| {
            all.iter().filter(|o| *o != source).all(|o| {
                c.view(o)
                    .and_then(|v| v.get(source).and_then(|m| m.state().map(|s| s.pending)))
                    == Some(want)
            })
        });
        propagation.push(elapsed);
        cluster.run_for(Duration::from_millis(500));
    }
    propagation.sort();

    // 3. Steady state traffic: 10% of nodes change load every 500 ms for 30 s.
    let before = totals(&cluster);
    let window = Duration::from_secs(30);
    let mut tick = 0usize;
    while tick < 60 {
        for k in 0..n.div_ceil(10) {
            let name = &names[(tick * 13 + k * 7) % n];
            let load = cluster.membership(name).load().clone();
            if tick.is_multiple_of(2) {
                guards.push(load.begin_task());
            } else {
                guards.pop();
            }
        }
        cluster.run_for(Duration::from_millis(500));
        tick += 1;
    }
    let after = totals(&cluster);
    let secs = window.as_secs_f64() * n as f64;
    let datagrams_per_node_s = (after.datagrams_sent - before.datagrams_sent) as f64 / secs;
    let bytes_per_node_s = (after.bytes_sent - before.bytes_sent) as f64 / secs;

    // 4. Crash one node; every survivor must report it failed.
    let victim = names[n - 1].clone();
    let crashed_at = cluster.now();
    cluster.crash(&victim);
    cluster.run_until("detection", Duration::from_secs(600), |c| {
        let failed = c.events(|l| {
            l.at >= crashed_at
                && matches!(&l.event, MeshEvent::Failed(id) if id.node_id().as_str() == victim)
        });
        failed.len() >= n - 1
    });
    let mut detections: Vec<Duration> = cluster
        .events(|l| {
            l.at >= crashed_at
                && matches!(&l.event, MeshEvent::Failed(id) if id.node_id().as_str() == victim)
        })
        .iter()
        .map(|l| l.at - crashed_at)
        .collect();
    detections.sort();
    drop(guards);
    Report {
        n,
        members,
        converge,
        detection_median: percentile(&detections, 0.5),
        detection_max: *detections.last().unwrap(),
        propagation,
        datagrams_per_node_s,
        bytes_per_node_s,
        memory_per_node,
        wall: wall.elapsed(),
    }
}

fn main() {
    // `cargo bench` passes `--bench`; numbers are cluster sizes.
    let mut sizes: Vec<usize> = std::env::args().filter_map(|a| a.parse().ok()).collect();
    if sizes.is_empty() {
        sizes = vec![10, 50, 100];
    }
    println!(
        "| nodes | cold start: all members / all states | state change seen by all: p50 / p99 / max | failure reported by all: median / last | gossip sent per node | resident memory per node | wall time |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for n in sizes {
        let r = run(n);
        println!(
            "| {} | {:.2} / {:.2} s | {:.0} / {:.0} / {:.0} ms | {:.1} / {:.1} s | {:.1} datagrams/s, {:.1} KiB/s | {:.0} KiB | {:.0} s |",
            r.n,
            r.members.as_secs_f64(),
            r.converge.as_secs_f64(),
            percentile(&r.propagation, 0.5).as_secs_f64() * 1000.0,
            percentile(&r.propagation, 0.99).as_secs_f64() * 1000.0,
            r.propagation.last().unwrap().as_secs_f64() * 1000.0,
            r.detection_median.as_secs_f64(),
            r.detection_max.as_secs_f64(),
            r.datagrams_per_node_s,
            r.bytes_per_node_s / 1024.0,
            r.memory_per_node as f64 / 1024.0,
            r.wall.as_secs_f64(),
        );
    }
}
