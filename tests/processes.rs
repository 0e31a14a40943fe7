//! Real processes: five `node` replicas and `loadgen`, as an operator runs them, with a
//! worker killed with SIGKILL in the middle of a burst. Every action must still complete:
//! `Execute` is idempotent, so the route layer runs the dead worker's actions again elsewhere.
//!
//! The binaries are the `node` and `loadgen` examples, built by `cargo test` (and built here
//! if this test runs on its own).

mod support;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use mesh::proto::admin::v1::{ListMembersRequest, mesh_admin_client::MeshAdminClient};
use support::bounded;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

/// The examples built in the same profile as this test.
fn examples() -> PathBuf {
    let status = std::process::Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "--example",
            "node",
            "--example",
            "loadgen",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo runs");
    assert!(
        status.success(),
        "building the node and loadgen examples failed"
    );
    // target/<profile>/deps/processes-<hash> -> target/<profile>/examples
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("examples")
}

/// A `node` process and the addresses it printed.
struct NodeProcess {
    child: Child,
    gossip: String,
    grpc: String,
}

impl NodeProcess {
    async fn start(bin: &Path, name: &str, slots: u32, join: Option<&str>) -> Self {
        let mut command = Command::new(bin.join("node"));
        command
            .args([
                "--node-id",
                name,
                "--bind-addr",
                "127.0.0.1",
                "--bind-port",
                "0",
            ])
            .args(["--grpc-port", "0", "--timing", "local"])
            .args(["--max-concurrency", &slots.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some(seed) = join {
            command.args(["--join", seed]);
        }
        let mut child = command.spawn().expect("the node example starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // "node a gossiping at 127.0.0.1:P (advertised ...), grpc at 127.0.0.1:Q, ..."
        let first = bounded("the node to print its addresses", lines.next_line())
            .await
            .unwrap()
            .expect("the node printed a line");
        let field = |after: &str| {
            first
                .split_once(after)
                .and_then(|(_, rest)| rest.split([' ', ',']).next())
                .unwrap_or_else(|| panic!("no {after:?} in {first:?}"))
                .to_owned()
        };
        let gossip = field("gossiping at ");
        let grpc = field("grpc at ");
        // Keep reading, so the node never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            child,
            gossip,
            grpc,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_survives_a_worker_killed_with_sigkill() {
    let bin = examples();
    let entry = NodeProcess::start(&bin, "entry", 4, None).await;
    let mut nodes = vec![entry];
    for (name, slots) in [("w1", 4), ("w2", 8), ("w3", 4), ("w4", 8)] {
        let node = NodeProcess::start(&bin, name, slots, Some(&nodes[0].gossip)).await;
        nodes.push(node);
    }
    let mut admin = MeshAdminClient::connect(format!("http://{}", nodes[0].grpc))
        .await
        .unwrap();
    bounded("the cluster to form", async {
        loop {
            let members = admin
                .list_members(ListMembersRequest {})
                .await
                .unwrap()
                .into_inner()
                .members;
            if members.len() == 5 && members.iter().all(|m| m.state.is_some()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    // 400 actions of 50-300 ms on 28 slots: a few seconds of work.
    let mut loadgen = Command::new(bin.join("loadgen"))
        .args(["--target", &format!("http://{}", nodes[0].grpc)])
        .args(["--actions", "400", "--concurrency", "64"])
        .args(["--min-ms", "50", "--max-ms", "300"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(
        loadgen.try_wait().unwrap().is_none(),
        "the worker must die in the middle of the burst"
    );
    let victim = &mut nodes[2].child; // w2: 8 slots, busy
    victim.start_kill().unwrap(); // SIGKILL
    victim.wait().await.unwrap();

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
