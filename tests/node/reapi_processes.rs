//! A REAPI replica as a real process (`node --api reapi`), killed with SIGKILL while it runs
//! an action: the sandbox takes every process of the action with it, so nothing is left
//! running on the host. Skips with a message where the replica runs actions without a
//! sandbox (no bubblewrap), unless `SANDBOX_TEST_REQUIRED=1`.

use crate::cluster_processes;

use cluster_processes::{NodeProcess, NodeSpec, poll, upload_shell_action};
use mesh_reapi::proto::build::bazel::remote::execution::v2::{
    ExecuteRequest, execution_client::ExecutionClient,
};

/// Host processes whose command line contains `token` (zombies excluded).
fn processes_with(token: &str) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .filter(|entry| {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let zombie = std::fs::read_to_string(entry.path().join("stat"))
                .map(|stat| stat.contains(") Z "))
                .unwrap_or(true);
            !zombie && String::from_utf8_lossy(&cmdline).contains(token)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_with_sigkill_leaves_no_action_process() {
    let data = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let spec = NodeSpec::local("sandboxed")
        .arg("--api", "reapi")
        .arg("--data-dir", data.path().display());
    let mut node = NodeProcess::start(spec).await;
    if node.stderr.find(&["WITHOUT a sandbox"]).is_some() {
        assert!(
            std::env::var_os("SANDBOX_TEST_REQUIRED").is_none_or(|v| v != "1"),
            "the sandbox is required (SANDBOX_TEST_REQUIRED=1) but the replica runs without it"
        );
        eprintln!("skipped: the replica runs actions without a sandbox here (install bubblewrap)");
        node.kill9().await;
        return;
    }
    // `sleep` with a duration no other process has (longer than any wait here, so only the
    // sandbox can end it in time): how the action is found on the host.
    let token = format!("300.{}", std::process::id());
    let action_digest =
        upload_shell_action(&node.url(), &format!("sleep {token} & sleep {token}")).await;
    let mut execution = ExecutionClient::connect(node.url()).await.unwrap();
    let running = tokio::spawn(async move {
        let mut stream = execution
            .execute(ExecuteRequest {
                action_digest: Some(action_digest.to_proto()),
                skip_cache_lookup: true,
                ..Default::default()
            })
            .await?
            .into_inner();
        while stream.message().await?.is_some() {}
        Ok::<_, tonic::Status>(())
    });
    poll("the action's processes to run", || {
        let token = token.clone();
        async move { (processes_with(&token) >= 2).then_some(()) }
    })
    .await;
    node.kill9().await;
    poll("every process of the action to be gone", || {
        let token = token.clone();
        async move { (processes_with(&token) == 0).then_some(()) }
    })
    .await;
    assert!(
        running.await.unwrap().is_err(),
        "the client saw the replica go"
    );
}
