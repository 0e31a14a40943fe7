//! Draining a replica: no new work, clients told to go elsewhere, running calls finish, the
//! replica leaves within the grace period; and what a too short grace period cuts.

use std::time::Duration;

use mesh_reapi::{
    DrainConfig, proto::build::bazel::remote::execution::v2::FindMissingBlobsRequest,
};

use crate::support::{Cluster, bounded, execute, execute_request, finished, shell, upload};

/// An action running on a replica that drains finishes there, and its client sees no error;
/// the replica is not ready while it drains, leaves within the grace period, and its peer sees
/// it leave, not fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_replica_finishes_its_running_calls_and_leaves() {
    let mut cluster = Cluster::start(2, |_, _| {}).await;
    let action = shell("sleep 1; echo done > out").output_file("out").build();
    upload(&cluster, 0, &action.blobs).await;
    // A client connection that stays open and idle (Bazel keeps its connections): it must
    // not hold the drain up.
    let mut idle = cluster.cas(0).await;
    idle.find_missing_blobs(FindMissingBlobsRequest::default())
        .await
        .unwrap();
    let mut client = cluster.exec(0).await;
    let call =
        tokio::spawn(
            async move { execute(&mut client, execute_request(action.action, true)).await },
        );
    // The action runs on r0 (the least loaded; local wins ties).
    let load = cluster.replicas[0].node().load().clone();
    bounded("the action to run on r0", async {
        while load.pending() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let mut events = cluster.replicas[1].node().events();
    let r0_url = cluster.url(0);
    let r0 = cluster.replicas.remove(0);
    let r0_id = r0.node().node_id().clone();
    let membership = r0.node().membership().clone();
    let mut config = DrainConfig::default();
    config.grace = Duration::from_secs(20);
    let drain = tokio::spawn(r0.drain(config));
    bounded("r0 to be marked draining", async {
        membership
            .wait_until(|view| view.local().state().is_some_and(|s| s.draining))
            .await
    })
    .await;

    // No new connection: clients go elsewhere while the running call goes on.
    let refused = tonic::transport::Endpoint::from_shared(r0_url)
        .unwrap()
        .connect()
        .await;
    assert!(
        refused.is_err(),
        "a draining replica accepted a new connection"
    );

    let operations = call
        .await
        .unwrap()
        .expect("the call ran to its end with no error");
    assert_eq!(finished(&operations).result.unwrap().exit_code, 0);
    let report = drain.await.unwrap();
    assert!(report.drained.finished, "{report:?}");
    assert!(
        report.drained.took < Duration::from_secs(10),
        "an idle connection held the drain up: {report:?}"
    );
    drop(idle);
    assert_eq!(report.drained.pending, 0);
    bounded("r1 to see r0 leave (not fail)", async {
        loop {
            match events.recv().await.unwrap() {
                mesh::MeshEvent::Left(member) if member.node_id() == &r0_id => return,
                mesh::MeshEvent::Failed(member) if member.node_id() == &r0_id => {
                    panic!("r0 failed instead of leaving")
                }
                _ => {}
            }
        }
    })
    .await;
    cluster.shutdown().await;
}

/// With a grace period shorter than the running action, the drain ends on time and says what
/// it cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grace_period_that_runs_out_cuts_and_says_so() {
    let mut cluster = Cluster::start(1, |_, _| {}).await;
    let action = shell("sleep 30").build();
    upload(&cluster, 0, &action.blobs).await;
    let mut client = cluster.exec(0).await;
    let call =
        tokio::spawn(
            async move { execute(&mut client, execute_request(action.action, true)).await },
        );
    let load = cluster.replicas[0].node().load().clone();
    bounded("the action to run", async {
        while load.pending() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let mut config = DrainConfig::default();
    config.grace = Duration::from_millis(300);
    let report = cluster.replicas.remove(0).drain(config).await;
    assert!(!report.drained.finished, "{report:?}");
    assert_eq!(report.drained.pending, 1, "the action still ran");
    assert!(report.drained.took < Duration::from_secs(5), "{report:?}");
    let outcome = bounded("the cut call to end", call).await.unwrap();
    assert!(
        outcome.is_err(),
        "the client of a cut call sees an error: {outcome:?}"
    );
}

/// A replica that leaves for good hands what it holds to the other owners before it goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_leaving_for_good_hands_its_blobs_over_first() {
    let mut cluster = Cluster::start(3, |_, _| {}).await;
    cluster.handoff_settled().await;
    // Blobs only r0 holds (their other copies evicted, say): without a handoff they would be
    // lost with it.
    let mut held = Vec::new();
    for i in 0..40 {
        held.push(
            cluster
                .put_only_on(0, format!("blob {i} to keep").as_bytes())
                .await,
        );
    }
    let mut config = DrainConfig::default();
    config.hand_off = true;
    let report = cluster.replicas.remove(0).drain(config).await;
    assert!(report.handed_off && report.drained.finished, "{report:?}");
    cluster.converge().await;
    // Two replicas left with two copies of everything: each holds every blob r0 held.
    for digest in &held {
        for position in 0..2 {
            assert!(
                cluster.holds(position, digest),
                "{digest} missing on {position}"
            );
        }
    }
    cluster.shutdown().await;
}
