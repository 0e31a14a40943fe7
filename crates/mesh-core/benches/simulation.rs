//! The cluster simulator at 10 to 1,000 nodes: every node runs the real membership code
//! (`mesh_core::sim`) over an in-memory network with 1–5 ms per datagram, on tokio's paused
//! clock, lan timing unless told otherwise. Prints a markdown table for BENCHMARKS.md.
//!
//! ```text
//! cargo bench -p tonic-mesh-core --bench simulation [-- 10 100 1000] [--changes 20] [--crashes 5]
//!     [--push-fanout N] [--relay-fanout N] [--gossip-budget BYTES (0: none)] [--refresh 8s]
//!     [--probe-period 1s] [--probe-rtt 500ms] [--suspicion-mult X] [--suspicion-max X]
//!     [--confirmations K] [--health-max N]
//!     [--loss 0.1] [--seed 1] [--no-traffic]
//! cargo bench -p tonic-mesh-core --bench simulation -- 10 100 --soak 100 [--loss 0.3] [--slow 700]
//! ```
//!
//! With `--soak SECONDS` it runs only the false-failure soak instead: per size and for three
//! seeds, that long under the loss (and with the last node `--slow` milliseconds away each
//! way), counting failure reports and forced rejoins about healthy nodes, suspicions raised
//! and suspicions refuted directly. `--no-traffic` skips phase 3 below, for a quicker look at
//! cold starts and changes.
//!
//! Per cluster size, in order:
//! 1. cold start: all nodes started at once, each seeded with `node-0`; the time until every
//!    node sees every member, and until it also holds every member's state;
//! 2. propagation: one load change made as soon as the cold start converged, while its
//!    membership updates are still being gossiped (reported below the table); then, once 5 s
//!    have passed since the start, `--changes` load changes on different nodes, one at a
//!    time; for each, the time until 50%, 99% and 100% of the other nodes see it;
//! 3. traffic: datagrams and bytes sent per node per second, idle (40 s, no change: a whole
//!    number of lan refresh intervals) and busy
//!    (30 s, 10% of the nodes changing load every 500 ms: 0.2 changes per node per second);
//!    under busy load, how many of the other nodes hold each change 500 ms after it was made
//!    (just before the next changes);
//! 4. crashes: `--crashes` nodes crashed one at a time; for each, when the first and the last
//!    survivor report it failed; then it restarts, and the time until every node holds its
//!    new life and that life's state is reported below the table;
//! 5. false failures: failure reports, over the whole run, about nodes that were not crashed;
//! 6. memory: growth of the process's resident set per node once the cluster has formed.

#[allow(
    clippy::disallowed_types,
    reason = "the report's wall time is the real time a simulation takes, never the simulated clock"
)]
use std::time::Instant as WallClock;
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh_core::{MeshEvent, Timing, sim::SimCluster};
use tokio::time::Instant;

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

#[derive(Debug, Clone)]
struct Options {
    sizes: Vec<usize>,
    changes: usize,
    crashes: usize,
    seed: u64,
    loss: f64,
    timing: Timing,
    /// Instead of the full run: this long under `loss` (and one slow node), counting false
    /// failures.
    soak: Option<Duration>,
    slow: Option<Duration>,
    /// Skip the idle and busy traffic phases (a quicker look at cold starts and changes).
    no_traffic: bool,
}

fn options() -> Options {
    let mut options = Options {
        sizes: Vec::new(),
        changes: 20,
        crashes: 5,
        seed: 1,
        loss: 0.0,
        timing: Timing::lan(),
        soak: None,
        slow: None,
        no_traffic: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_default();
        match arg.as_str() {
            "--changes" => options.changes = value().parse().expect("--changes N"),
            "--crashes" => options.crashes = value().parse().expect("--crashes N"),
            "--no-traffic" => options.no_traffic = true,
            "--seed" => options.seed = value().parse().expect("--seed N"),
            "--loss" => options.loss = value().parse().expect("--loss FRACTION"),
            "--push-fanout" => {
                options.timing.state_push_fanout = value().parse().expect("--push-fanout N");
            }
            "--relay-fanout" => {
                options.timing.state_relay_fanout = value().parse().expect("--relay-fanout N");
            }
            "--suspicion-mult" => {
                options.timing.suspicion_multiplier = value().parse().expect("--suspicion-mult X");
            }
            "--suspicion-max" => {
                options.timing.suspicion_max_multiplier =
                    value().parse().expect("--suspicion-max X");
            }
            "--confirmations" => {
                options.timing.suspicion_confirmations =
                    value().parse().expect("--confirmations K");
            }
            "--health-max" => {
                options.timing.max_health_multiplier = value().parse().expect("--health-max N");
            }
            "--soak" => {
                options.soak = Some(Duration::from_secs(
                    value().parse().expect("--soak SECONDS"),
                ))
            }
            "--slow" => {
                options.slow = Some(Duration::from_millis(value().parse().expect("--slow MS")))
            }
            "--gossip-budget" => {
                let bytes: u32 = value().parse().expect("--gossip-budget BYTES (0: none)");
                options.timing.state_gossip_budget = std::num::NonZeroU32::new(bytes);
            }
            "--probe-period" => options.timing.probe_period = humantime(&value()),
            "--probe-rtt" => options.timing.probe_rtt = humantime(&value()),
            "--refresh" => {
                options.timing.state_refresh_interval = humantime(&value());
            }
            other => {
                if let Ok(n) = other.parse() {
                    options.sizes.push(n);
                }
            }
        }
    }
    if options.sizes.is_empty() {
        options.sizes = vec![10, 100, 1000];
    }
    options
}

/// A duration flag's value, such as `750ms` or `8s`.
fn humantime(s: &str) -> Duration {
    humantime::parse_duration(s).expect("a duration such as 750ms or 8s")
}

/// Quantile of sorted samples by the nearest-rank method.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64) * q).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    quantile(samples, 0.5)
}

fn max(samples: &[Duration]) -> Duration {
    samples.iter().copied().max().unwrap_or_default()
}

#[derive(Debug, Default)]
struct Report {
    n: usize,
    members: Duration,
    states: Duration,
    /// Per change: time until 50%, 99%, 100% of the others saw it.
    spread: Vec<[Duration; 3]>,
    /// A change made right after the cold start: time until 50%, 99%, 100% saw it.
    change_in_cold_start: [Option<Duration>; 3],
    changes_incomplete: usize,
    idle: (f64, f64),
    busy: (f64, f64),
    /// Busy: the fraction of (changed node, other node) pairs where the other node held the
    /// change 500 ms after it was made.
    busy_fresh: f64,
    /// Per crash: first and last report.
    detection: Vec<[Duration; 2]>,
    /// Per crash: from the restart until every node held the new life and its state.
    rejoined: Vec<Duration>,
    false_failures: usize,
    memory_per_node: usize,
    wall: Duration,
}

async fn cold_start(cluster: &SimCluster, n: usize) -> (Duration, Duration) {
    let start = Instant::now();
    let members = Arc::new(Mutex::new(Vec::new()));
    let states = Arc::new(Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for i in 0..n {
        let membership = cluster.membership(i).expect("running").clone();
        let (members, states) = (Arc::clone(&members), Arc::clone(&states));
        waiters.push(tokio::spawn(async move {
            membership.wait_until(|v| v.len() == n).await;
            members.lock().unwrap().push(start.elapsed());
            membership
                .wait_until(|v| v.len() == n && v.peers().iter().all(|p| p.state().is_some()))
                .await;
            states.lock().unwrap().push(start.elapsed());
        }));
    }
    let limit = Duration::from_secs(120);
    let all = cluster
        .run_until(limit, Duration::from_millis(50), |_| {
            states.lock().unwrap().len() == n
        })
        .await;
    for waiter in waiters {
        waiter.abort();
    }
    assert!(all.is_some(), "{n} nodes did not converge within {limit:?}");
    let members = max(&members.lock().unwrap());
    let states = max(&states.lock().unwrap());
    (members, states)
}

/// One load change on `source`; the time until 50/99/100% of the other running nodes see it,
/// `None` for the fractions not reached within 30 s.
async fn propagate(
    cluster: &SimCluster,
    source: usize,
    guards: &mut Vec<mesh_core::TaskGuard>,
) -> [Option<Duration>; 3] {
    let others = cluster.running().len() - 1;
    cluster.track_updates(source);
    let load = cluster.membership(source).expect("running").load().clone();
    let from = cluster.logged();
    let started = cluster.elapsed();
    guards.push(load.begin_task());
    let want = load.pending();
    let id = cluster.node_id(source).clone();
    let seen = |c: &SimCluster| -> Vec<Duration> {
        let mut first: HashMap<usize, Duration> = HashMap::new();
        for l in c.events_from(
            from,
            |l| matches!(&l.event, MeshEvent::Updated(s) if s.node_id == id && s.pending == want),
        ) {
            first.entry(l.observer).or_insert(l.at - started);
        }
        let mut times: Vec<Duration> = first.into_values().collect();
        times.sort();
        times
    };
    cluster
        .run_until(Duration::from_secs(30), Duration::from_millis(20), |c| {
            seen(c).len() >= others
        })
        .await;
    cluster.untrack_updates(source);
    let times = seen(cluster);
    let at = |fraction: f64| {
        let needed = ((others as f64) * fraction).ceil() as usize;
        times.get(needed.max(1) - 1).copied()
    };
    [at(0.5), at(0.99), at(1.0)]
}

/// Datagrams and bytes sent per node per second over `span`, with `changing` driving load.
async fn traffic(
    cluster: &SimCluster,
    n: usize,
    span: Duration,
    busy: bool,
    guards: &mut HashMap<usize, Vec<mesh_core::TaskGuard>>,
) -> (f64, f64, f64) {
    let before = cluster.total_stats();
    let (mut fresh, mut pairs) = (0_usize, 0_usize);
    let net_before = cluster.network().stats();
    let ticks = (span.as_millis() / 500) as usize;
    for tick in 0..ticks {
        let mut changed = Vec::new();
        if busy {
            for k in 0..n.div_ceil(10) {
                let i = (tick * 13 + k * 7) % n;
                changed.push(i);
                let Some(membership) = cluster.membership(i) else {
                    continue;
                };
                let held = guards.entry(i).or_default();
                if held.is_empty() || tick % 2 == 0 {
                    held.push(membership.load().begin_task());
                } else {
                    held.pop();
                }
            }
        }
        cluster.run_for(Duration::from_millis(500)).await;
        let (f, p) = held_by_others(cluster, &changed);
        fresh += f;
        pairs += p;
    }
    let after = cluster.total_stats();
    let node_seconds = span.as_secs_f64() * n as f64;
    let net_after = cluster.network().stats();
    let names = ["other", "foca", "state push", "leave", "lifeguard"];
    let split: Vec<String> = (0..5)
        .filter(|k| net_after.datagrams_by_kind[*k] > net_before.datagrams_by_kind[*k])
        .map(|k| {
            format!(
                "{} {:.1} datagrams, {:.0} B",
                names[k],
                (net_after.datagrams_by_kind[k] - net_before.datagrams_by_kind[k]) as f64
                    / node_seconds,
                (net_after.bytes_by_kind[k] - net_before.bytes_by_kind[k]) as f64 / node_seconds
            )
        })
        .collect();
    eprintln!(
        "{n} nodes, {}: per node per second: {}",
        if busy { "busy" } else { "idle" },
        split.join("; ")
    );
    (
        (after.datagrams_sent - before.datagrams_sent) as f64 / node_seconds,
        (after.bytes_sent - before.bytes_sent) as f64 / node_seconds,
        fresh as f64 / pairs.max(1) as f64,
    )
}

/// For each node in `changed`, how many other running nodes hold its current load (and how
/// many were asked).
fn held_by_others(cluster: &SimCluster, changed: &[usize]) -> (usize, usize) {
    let current: HashMap<String, u32> = changed
        .iter()
        .filter_map(|&i| {
            let membership = cluster.membership(i)?;
            Some((
                membership.node_id().to_string(),
                membership.load().pending(),
            ))
        })
        .collect();
    let (mut fresh, mut pairs) = (0, 0);
    for observer in cluster.running() {
        let Some(view) = cluster.view(observer) else {
            continue;
        };
        for (name, pending) in &current {
            if name == cluster.node_id(observer).as_str() {
                continue;
            }
            pairs += 1;
            if view
                .get(name)
                .and_then(|peer| peer.state())
                .is_some_and(|state| state.pending == *pending)
            {
                fresh += 1;
            }
        }
    }
    (fresh, pairs)
}

/// How long the crash phase waits for a restarted node and its state to reach every node.
const REJOIN_LIMIT: Duration = Duration::from_secs(60);

async fn run(n: usize, options: &Options) -> Report {
    #[allow(
        clippy::disallowed_types,
        reason = "wall time of the simulation, as above"
    )]
    let wall = WallClock::now();
    let memory_before = resident_bytes();
    let mut cluster = SimCluster::start(options.seed, n, options.timing.clone())
        .await
        .expect("cluster starts");
    let mut report = Report {
        n,
        ..Report::default()
    };
    (report.members, report.states) = cold_start(&cluster, n).await;
    report.memory_per_node = resident_bytes().saturating_sub(memory_before) / n;
    cluster.network().set_loss(options.loss);

    let mut guards = Vec::new();
    // One change made at once, while the cold start's membership updates are still being
    // gossiped; then the others in a formed cluster, from when the cold start's 5 s target
    // has passed.
    report.change_in_cold_start = propagate(&cluster, n / 2, &mut guards).await;
    cluster
        .run_for(Duration::from_secs(5).saturating_sub(cluster.elapsed()))
        .await;
    for round in 0..options.changes {
        let source = (round * 7919 + 3) % n;
        let times = propagate(&cluster, source, &mut guards).await;
        if times.iter().any(Option::is_none) {
            report.changes_incomplete += 1;
        }
        report
            .spread
            .push(times.map(|t| t.unwrap_or(Duration::from_secs(30))));
        cluster.run_for(Duration::from_millis(300)).await;
    }
    drop(guards);

    if !options.no_traffic {
        let mut held = HashMap::new();
        cluster.run_for(Duration::from_secs(5)).await;
        let (datagrams, bytes, _) =
            traffic(&cluster, n, Duration::from_secs(40), false, &mut held).await;
        report.idle = (datagrams, bytes);
        let (datagrams, bytes, fresh) =
            traffic(&cluster, n, Duration::from_secs(30), true, &mut held).await;
        report.busy = (datagrams, bytes);
        report.busy_fresh = fresh;
        drop(held);
    }

    let mut crashed: HashSet<(String, u64)> = HashSet::new();
    for k in 0..options.crashes {
        let victim = n - 1 - (k * 3) % n;
        let identity = cluster.membership(victim).expect("running").identity();
        crashed.insert((identity.node_id().to_string(), identity.generation()));
        let crashed_at = cluster.elapsed();
        let from = cluster.logged();
        cluster.crash(victim).await;
        let survivors = n - 1;
        let reports = |c: &SimCluster| {
            let mut at: Vec<Duration> = c
                .events_from(from, |l| l.event == MeshEvent::Failed(identity.clone()))
                .iter()
                .map(|l| l.at - crashed_at)
                .collect();
            at.sort();
            at
        };
        cluster
            .run_until(Duration::from_secs(60), Duration::from_millis(20), |c| {
                reports(c).len() >= survivors
            })
            .await;
        let at = reports(&cluster);
        report.detection.push([
            at.first().copied().unwrap_or(Duration::from_secs(60)),
            if at.len() >= survivors {
                *at.last().unwrap()
            } else {
                Duration::from_secs(60)
            },
        ]);
        cluster.restart(victim).await.expect("restart");
        let name = cluster.node_id(victim).to_string();
        let held = cluster
            .run_until(REJOIN_LIMIT, Duration::from_millis(20), |c| {
                (0..n).all(|i| {
                    c.view(i).is_some_and(|v| {
                        v.len() == n
                            && v.get(&name).is_some_and(|m| {
                                m.identity().generation() > identity.generation()
                                    && m.state()
                                        .is_some_and(|s| s.generation == m.identity().generation())
                            })
                    })
                })
            })
            .await;
        report.rejoined.push(held.unwrap_or(REJOIN_LIMIT));
    }
    report.false_failures = cluster
        .events(|l| match &l.event {
            MeshEvent::Failed(id) => {
                !crashed.contains(&(id.node_id().to_string(), id.generation()))
            }
            _ => false,
        })
        .len();
    cluster.shutdown().await;
    report.wall = wall.elapsed();
    report
}

/// `span` of simulated time under loss (and a slow node): failure reports and forced
/// rejoins about healthy nodes, suspicions raised and refuted directly. Several seeds.
async fn soak(n: usize, seed: u64, options: &Options, span: Duration) -> (usize, usize, u64, u64) {
    let mut cluster = SimCluster::start(seed, n, options.timing.clone())
        .await
        .expect("cluster starts");
    let all: Vec<usize> = (0..n).collect();
    cluster
        .run_until(Duration::from_secs(60), Duration::from_millis(50), |c| {
            c.sees_exactly(&all)
        })
        .await
        .expect("formed");
    let before = cluster.total_stats();
    let since = cluster.logged();
    cluster.network().set_loss(options.loss);
    if let Some(slow) = options.slow {
        cluster.network().set_slow(SimCluster::addr_of(n - 1), slow);
    }
    cluster.run_for(span).await;
    let failed = cluster
        .events_from(since, |l| matches!(l.event, MeshEvent::Failed(_)))
        .len();
    let rejoined = cluster
        .events_from(since, |l| matches!(l.event, MeshEvent::Rejoined { .. }))
        .len();
    let after = cluster.total_stats();
    cluster.shutdown().await;
    (
        failed,
        rejoined,
        after.suspicions_raised - before.suspicions_raised,
        after.suspicions_refuted - before.suspicions_refuted,
    )
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

fn main() {
    let options = options();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    println!(
        "timing: probe {:?}, suspicion ×{}, push fan-out {}, relay fan-out {}, gossip budget {:?} B/s, loss {}, seed {}",
        options.timing.probe_period,
        options.timing.suspicion_multiplier,
        options.timing.state_push_fanout,
        options.timing.state_relay_fanout,
        options.timing.state_gossip_budget,
        options.loss,
        options.seed,
    );
    if let Some(span) = options.soak {
        println!(
            "| nodes | loss | slow node | seed | false failure reports | forced rejoins | suspicions raised | refuted directly |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
        for &n in &options.sizes {
            for seed in options.seed..options.seed + 3 {
                let (failed, rejoined, raised, refuted) =
                    runtime.block_on(soak(n, seed, &options, span));
                println!(
                    "| {n} | {:.0}% | {} | {seed} | {failed} | {rejoined} | {raised} | {refuted} |",
                    options.loss * 100.0,
                    options
                        .slow
                        .map_or("none".to_owned(), |d| format!("{d:?} each way")),
                );
            }
        }
        return;
    }
    let mut reports = Vec::new();
    for &n in &options.sizes {
        let report = runtime.block_on(run(n, &options));
        eprintln!("{report:?}");
        reports.push(report);
    }
    println!();
    println!(
        "| nodes | cold start: all members / all states | change seen by 50% / 99% / 100%: median (max) over changes | crash seen by first / last node: median, p90 (max) | false failures | idle: datagrams, bytes per node/s | busy: datagrams, bytes per node/s | busy: changes held by others after 0.5 s | memory per node | wall time |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &reports {
        let column = |k: usize| {
            let mut samples: Vec<Duration> = r.spread.iter().map(|s| s[k]).collect();
            let max = max(&samples);
            format!("{} ({})", ms(median(&mut samples)), ms(max))
        };
        let detection = |k: usize| {
            let mut samples: Vec<Duration> = r.detection.iter().map(|s| s[k]).collect();
            let max = max(&samples);
            let median = median(&mut samples);
            format!(
                "{}, {} ({})",
                secs(median),
                secs(quantile(&samples, 0.9)),
                secs(max)
            )
        };
        println!(
            "| {} | {} / {} s | {} / {} / {} ms ({} changes{}) | {} / {} s ({} crashes) | {} | {:.1}, {:.0} B | {:.1}, {:.0} B | {:.1}% | {:.0} KiB | {:.0} s |",
            r.n,
            secs(r.members),
            secs(r.states),
            column(0),
            column(1),
            column(2),
            r.spread.len(),
            if r.changes_incomplete > 0 {
                format!(", {} not seen by all in 30 s", r.changes_incomplete)
            } else {
                String::new()
            },
            detection(0),
            detection(1),
            r.detection.len(),
            r.false_failures,
            r.idle.0,
            r.idle.1,
            r.busy.0,
            r.busy.1,
            r.busy_fresh * 100.0,
            r.memory_per_node as f64 / 1024.0,
            r.wall.as_secs_f64(),
        );
    }
    println!();
    for r in reports.iter().filter(|r| !r.rejoined.is_empty()) {
        let mut rejoined = r.rejoined.clone();
        let late = rejoined.iter().filter(|t| **t >= REJOIN_LIMIT).count();
        let max = if late > 0 {
            format!("{late} not within {} s", REJOIN_LIMIT.as_secs())
        } else {
            format!("{} s max", secs(max(&rejoined)))
        };
        println!(
            "{} nodes: a restarted node and its state were held by every node after {} s, \
             median ({max}) over {} restarts",
            r.n,
            secs(median(&mut rejoined)),
            rejoined.len()
        );
    }
    for r in &reports {
        let [half, most, all] = r
            .change_in_cold_start
            .map(|t| t.map_or_else(|| "over 30 s".to_owned(), |t| format!("{} ms", ms(t))));
        println!(
            "{} nodes: a change made as soon as the cold start converged was seen by 50% / 99% / \
             100% after {half} / {most} / {all}",
            r.n
        );
    }
}
