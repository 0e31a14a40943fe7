//! Lifeguard's behaviour on the cluster simulator (`mesh_core::sim`), on tokio's paused
//! clock: what a slow node, lossy links and a crash do to failure detection. Figures live in
//! BENCHMARKS.md; these tests assert what users rely on.

use std::time::Duration;

use mesh_core::{MeshEvent, Timing, sim::SimCluster};

const MS: Duration = Duration::from_millis(1);

async fn formed(seed: u64, n: usize, timing: Timing) -> SimCluster {
    let cluster = SimCluster::start(seed, n, timing)
        .await
        .expect("cluster starts");
    let all: Vec<usize> = (0..n).collect();
    let formed = cluster
        .run_until(Duration::from_secs(30), 10 * MS, |c| c.sees_exactly(&all))
        .await;
    assert!(formed.is_some(), "{n} nodes did not form a cluster");
    cluster
}

/// Failure reports (and forced rejoins) about any node in `healthy`, seen from `since`.
fn churn_of(cluster: &SimCluster, since: usize, healthy: &[usize]) -> Vec<String> {
    let names: Vec<String> = healthy
        .iter()
        .map(|i| cluster.node_id(*i).to_string())
        .collect();
    cluster
        .events_from(since, |l| match &l.event {
            MeshEvent::Failed(id) => names.iter().any(|n| n == id.node_id().as_str()),
            MeshEvent::Rejoined { current, .. } => {
                names.iter().any(|n| n == current.node_id().as_str())
            }
            _ => false,
        })
        .iter()
        .map(|l| {
            format!(
                "{} at {:?}: {:?}",
                cluster.node_id(l.observer),
                l.at,
                l.event
            )
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_slow_node_gets_no_healthy_node_declared_down_and_slows_its_own_probes() {
    let mut cluster = formed(3, 8, Timing::lan()).await;
    let slow = 7;
    let since = cluster.logged();
    // 700 ms each way: every probe the slow node sends times out (1.4 s round trip against a
    // 0.5 s probe timeout and a 0.8 s probe period), and so does every probe of it.
    cluster
        .network()
        .set_slow(SimCluster::addr_of(slow), Duration::from_millis(700));
    let mut highest = 0;
    for _ in 0..120 {
        cluster.run_for(Duration::from_secs(1)).await;
        let stats = cluster.membership(slow).unwrap().stats();
        highest = highest.max(stats.health_score);
    }
    let healthy: Vec<usize> = (0..7).collect();
    let churn = churn_of(&cluster, since, &healthy);
    assert!(
        churn.is_empty(),
        "healthy nodes were declared down or forced to rejoin: {churn:#?}"
    );
    assert!(
        highest > 0,
        "the slow node's local health never registered its failing probes"
    );
    // Once it is fast again, its probes succeed and its health recovers.
    cluster
        .network()
        .set_slow(SimCluster::addr_of(slow), Duration::ZERO);
    let recovered = cluster
        .run_until(Duration::from_secs(120), 100 * MS, |c| {
            c.membership(slow).unwrap().stats().health_score == 0
        })
        .await;
    assert!(recovered.is_some(), "local health never recovered");
    let all: Vec<usize> = (0..8).collect();
    assert!(cluster.sees_exactly(&all));
    cluster.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn ten_percent_loss_gives_no_false_failure_and_suspects_refute_directly() {
    let mut cluster = formed(5, 10, Timing::lan()).await;
    let since = cluster.logged();
    cluster.network().set_loss(0.10);
    cluster.run_for(Duration::from_secs(100)).await;
    let all: Vec<usize> = (0..10).collect();
    let churn = churn_of(&cluster, since, &all);
    assert!(
        churn.is_empty(),
        "false failures under 10% loss: {churn:#?}"
    );
    let total = cluster.total_stats();
    let refuted_self: u64 = all
        .iter()
        .map(|i| cluster.membership(*i).unwrap().stats().refuted_self)
        .sum();
    // 10% loss makes probes fail now and then (the seed is fixed: this run raises
    // suspicions), and the buddy system makes suspects learn of them directly and answer.
    assert!(
        total.suspicions_raised > 0,
        "no suspicion at all: the scenario tests nothing"
    );
    assert!(
        refuted_self > 0,
        "no suspect heard of its suspicion directly"
    );
    cluster.network().set_loss(0.0);
    let back = cluster
        .run_until(Duration::from_secs(30), 10 * MS, |c| c.sees_exactly(&all))
        .await;
    assert!(back.is_some());
    cluster.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_crash_is_confirmed_by_witnesses_and_every_survivor_is_told_at_once() {
    let timing = Timing::lan();
    let n = 10;
    let mut cluster = formed(9, n, timing.clone()).await;
    let victim = 4;
    let identity = cluster.membership(victim).unwrap().identity();
    let since = cluster.logged();
    let crashed_at = cluster.elapsed();
    cluster.crash(victim).await;
    let survivors = n - 1;
    let reported =
        |c: &SimCluster| c.events_from(since, |l| l.event == MeshEvent::Failed(identity.clone()));
    let detected = cluster
        .run_until(Duration::from_secs(120), 10 * MS, |c| {
            reported(c).len() == survivors
        })
        .await;
    assert!(detected.is_some(), "not every survivor reported the crash");
    // The first report came well before an unconfirmed suspicion could have expired: the
    // witnesses confirmed. (Probe round and gossip add at most a few probe periods.)
    let times: Vec<Duration> = reported(&cluster)
        .iter()
        .map(|l| l.at - crashed_at)
        .collect();
    let first = *times.iter().min().unwrap();
    let last = *times.iter().max().unwrap();
    let unconfirmed = timing
        .suspicion_timeout(n as u32)
        .mul_f64(timing.suspicion_max_multiplier);
    assert!(
        first < unconfirmed,
        "first report after {first:?}: the suspicion was never confirmed (unconfirmed timeout {unconfirmed:?})"
    );
    // The node that declared it down told every other member directly: the last survivor
    // knew one network hop (1–5 ms here) after the first, before any gossip round could
    // have carried it to the 8 others.
    assert!(
        last - first < timing.gossip_interval,
        "the last survivor reported the crash {:?} after the first: it waited for gossip",
        last - first
    );
    let others: Vec<usize> = (0..n).filter(|i| *i != victim).collect();
    assert!(churn_of(&cluster, since, &others).is_empty());
    cluster.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn under_heavy_loss_a_suspect_is_told_until_it_answers() {
    let mut cluster = formed(11, 10, Timing::lan()).await;
    let before = cluster.total_stats();
    cluster.network().set_loss(0.30);
    cluster.run_for(Duration::from_secs(100)).await;
    let after = cluster.total_stats();
    let raised = after.suspicions_raised - before.suspicions_raised;
    let refuted = after.suspicions_refuted - before.suspicions_refuted;
    println!("30% loss, 100 s, 10 nodes: {raised} suspicions raised, {refuted} refuted directly");
    assert!(
        raised >= 50,
        "too few suspicions for the ratio to mean anything: {raised}"
    );
    // One notice and its answer both get through about half the time at 30% loss; a notice
    // every probe timeout until the suspect answers makes a direct refutation the rule, so
    // that no suspicion has to wait for the refutation to arrive by gossip.
    assert!(
        refuted * 100 >= raised * 95,
        "only {refuted} of {raised} suspicions were refuted directly"
    );
    let all: Vec<usize> = (0..10).collect();
    let churn = churn_of(&cluster, 0, &all);
    assert!(
        churn.is_empty(),
        "false failures under 30% loss: {churn:#?}"
    );
    cluster.shutdown().await;
}
