//! How states ride foca's gossip, on the cluster simulator and tokio's paused clock: while
//! states change faster than gossip can spread them, the states piggybacked on foca's
//! datagrams stay within the byte budget (`Timing::state_gossip_budget`), and once the
//! changes stop every node still ends up with every node's latest state; and while foca
//! still has the membership updates of a cold start to send, states do not wait behind them.
//! Figures live in BENCHMARKS.md.

use std::{num::NonZeroU32, time::Duration};

use mesh_core::{TaskGuard, Timing, sim::SimCluster};

const NODES: usize = 30;
const CHURN: Duration = Duration::from_secs(20);

/// lan timing where gossip rounds, not pushes, carry the states: pushes reach one peer and
/// nobody relays.
fn gossip_only(budget: Option<u32>) -> Timing {
    let mut timing = Timing::lan();
    timing.state_push_fanout = 1.try_into().unwrap();
    timing.state_relay_fanout = 0;
    timing.state_gossip_budget = budget.and_then(NonZeroU32::new);
    timing
}

/// `n` nodes started at once (seed `seed`), once every node sees every other.
async fn formed(seed: u64, n: usize, timing: Timing) -> SimCluster {
    let cluster = SimCluster::start(seed, n, timing).await.unwrap();
    let all: Vec<usize> = (0..n).collect();
    let formed = cluster
        .run_until(Duration::from_secs(60), Duration::from_millis(10), |c| {
            c.sees_exactly(&all)
        })
        .await;
    assert!(formed.is_some(), "{n} nodes did not form a cluster");
    cluster
}

/// foca bytes sent per node per second while every node changes its load every 100 ms (as
/// fast as the lan publish interval allows), then whether every node converged on every
/// node's final load within 30 s of the end of the churn.
async fn churn(timing: Timing) -> (f64, bool) {
    let mut cluster = formed(5, NODES, timing).await;
    cluster.run_for(Duration::from_secs(10)).await;
    let foca = |c: &SimCluster| c.network().stats().bytes_by_kind[1];
    let before = foca(&cluster);

    let mut held: Vec<Vec<TaskGuard>> = (0..NODES).map(|_| Vec::new()).collect();
    let ticks = CHURN.as_millis() / 100;
    for tick in 0..ticks {
        for (i, guards) in held.iter_mut().enumerate() {
            let load = cluster.membership(i).unwrap().load();
            if (tick as usize + i).is_multiple_of(3) {
                guards.clear();
            } else {
                guards.push(load.begin_task());
            }
        }
        cluster.run_for(Duration::from_millis(100)).await;
    }
    let rate = (foca(&cluster) - before) as f64 / CHURN.as_secs_f64() / NODES as f64;

    let settled = |c: &SimCluster| {
        (0..NODES).all(|observer| {
            let view = c.view(observer).unwrap();
            (0..NODES).filter(|o| *o != observer).all(|owner| {
                let pending = c.membership(owner).unwrap().load().pending();
                view.get(c.node_id(owner).as_str())
                    .and_then(|peer| peer.state())
                    .is_some_and(|state| state.pending == pending)
            })
        })
    };
    let converged = cluster
        .run_until(Duration::from_secs(30), Duration::from_millis(50), settled)
        .await
        .is_some();
    drop(held);
    cluster.shutdown().await;
    (rate, converged)
}

#[tokio::test(start_paused = true)]
async fn states_gossip_within_the_budget_and_still_converge() {
    let (unlimited, converged) = churn(gossip_only(None)).await;
    assert!(converged, "without a budget the states did not converge");
    let (idle_foca, _) = {
        // What foca sends with no state to carry: probes, acks, membership gossip.
        let mut cluster = SimCluster::start(5, NODES, gossip_only(None))
            .await
            .unwrap();
        cluster.run_for(Duration::from_secs(20)).await;
        let before = cluster.network().stats().bytes_by_kind[1];
        cluster.run_for(CHURN).await;
        let rate = (cluster.network().stats().bytes_by_kind[1] - before) as f64
            / CHURN.as_secs_f64()
            / NODES as f64;
        cluster.shutdown().await;
        (rate, ())
    };
    let budget = 1_000.0;
    let (limited, converged) = churn(gossip_only(Some(budget as u32))).await;
    println!(
        "foca bytes per node per second under churn: unlimited {unlimited:.0}, budget {budget} \
         {limited:.0}, idle {idle_foca:.0}"
    );
    assert!(
        unlimited > idle_foca + 2.0 * budget,
        "the churn must load gossip well beyond the budget for this test to mean anything: \
         {unlimited:.0} B/s"
    );
    // The budget covers foca's payload; the envelope of each datagram and the bucket's first
    // second of burst (5% of the 20 s) come on top: a fifth of slack.
    assert!(
        limited <= idle_foca + budget * 1.2,
        "{limited:.0} B/s of foca traffic per node: more than membership ({idle_foca:.0}) plus \
         the {budget} B/s budget for states"
    );
    assert!(
        converged,
        "with the budget the states did not converge once the changes stopped"
    );
}

#[tokio::test(start_paused = true)]
async fn a_change_right_after_a_cold_start_does_not_wait_for_membership_gossip() {
    const N: usize = 300;
    // Pushes reach one peer and nobody relays: gossip rounds carry the change.
    let timing = gossip_only(Some(16_000));
    let cluster = formed(3, N, timing.clone()).await;
    // Every node still has hundreds of join updates to gossip several times each, and foca
    // puts them before states in every datagram. Sent in datagrams of their own, states
    // reach every node in 1.4 s here; waiting behind the join updates they took 3.6 s.
    let rounds = 10;
    let source = 7;
    let guard = cluster.membership(source).unwrap().load().begin_task();
    let name = cluster.node_id(source).to_string();
    let seen = cluster
        .run_until(
            timing.gossip_interval * rounds,
            Duration::from_millis(10),
            |c| {
                (0..N).filter(|o| *o != source).all(|observer| {
                    c.view(observer)
                        .and_then(|view| view.get(&name).and_then(|p| p.state().cloned()))
                        .is_some_and(|state| state.pending == 1)
                })
            },
        )
        .await;
    assert!(
        seen.is_some(),
        "the change did not reach every node within {rounds} gossip rounds: states waited \
         behind the membership updates of the cold start"
    );
    drop(guard);
}
