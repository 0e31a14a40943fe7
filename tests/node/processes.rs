//! Real processes: five `mesh-node` replicas and `loadgen`, as an operator runs them, with a
//! worker killed with SIGKILL in the middle of a burst. Every action must still complete:
//! `Execute` is idempotent, so the route layer runs the dead worker's actions again elsewhere.

use crate::cluster_processes;

use std::process::Stdio;

use cluster_processes::{NodeProcess, NodeSpec, bounded, examples, poll};
use mesh::proto::admin::v1::{ListMembersRequest, mesh_admin_client::MeshAdminClient};
use tokio::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_survives_a_worker_killed_with_sigkill() {
    let bin = examples();
    let entry = NodeProcess::start(NodeSpec::local("entry").arg("--max-concurrency", 4)).await;
    let mut nodes = vec![entry];
    for (name, slots) in [("w1", 4), ("w2", 8), ("w3", 4), ("w4", 8)] {
        let spec = NodeSpec::local(name)
            .arg("--max-concurrency", slots)
            .arg("--join", &nodes[0].gossip);
        nodes.push(NodeProcess::start(spec).await);
    }
    let url = nodes[0].url();
    let admin = MeshAdminClient::connect(url.clone()).await.unwrap();
    poll("the cluster to form", || {
        let mut admin = admin.clone();
        async move {
            let members = admin
                .list_members(ListMembersRequest {})
                .await
                .ok()?
                .into_inner()
                .members;
            let live = members.iter().filter(|m| m.state.is_some()).count();
            (live == 5).then_some(())
        }
    })
    .await;

    // 400 actions of 50-300 ms on 28 slots: a few seconds of work.
    let mut loadgen = Command::new(bin.join("loadgen"))
        .args(["--target", &url])
        .args(["--actions", "400", "--concurrency", "64"])
        .args(["--min-ms", "50", "--max-ms", "300"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // w2 (8 slots) dies while it runs actions: wait until the entry sees it busy.
    poll("w2 to run actions", || {
        let mut admin = admin.clone();
        async move {
            let members = admin
                .list_members(ListMembersRequest {})
                .await
                .ok()?
                .into_inner()
                .members;
            let w2 = members.iter().find(|m| m.node_id == "w2")?;
            (w2.state.as_ref()?.pending > 0).then_some(())
        }
    })
    .await;
    assert!(
        loadgen.try_wait().unwrap().is_none(),
        "the worker must die in the middle of the burst"
    );
    nodes[2].kill9().await; // w2: 8 slots, busy

    let output = bounded("loadgen to finish", loadgen.wait_with_output())
        .await
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "loadgen failed:\n{report}");
    assert!(
        report.contains("400 actions") && report.contains("400 ok, 0 failed"),
        "{report}"
    );
}
