//! `mesh-node`, the binary `cargo install --path .` installs, as an operator deploys it: one
//! configuration file (`[mesh]` and `[reapi]`), an environment variable over it, and nothing
//! else on the command line. It serves REAPI from that file, runs an action, and reports it in
//! its `reapi_*` Prometheus series and in `meshctl stats`; a bad value is refused naming its
//! key.

use crate::cluster_processes;

use std::path::Path;

use cluster_processes::{
    NodeProcess, NodeSpec, SignalledAtStart, bounded, examples, http_get, meshctl_json, run,
    samples, text, upload_shell_action,
};
use mesh_reapi::{
    Digest,
    proto::build::bazel::remote::execution::v2::{
        ExecuteRequest, GetActionResultRequest, action_cache_client::ActionCacheClient,
        execution_client::ExecutionClient,
    },
};

/// A configuration file with every setting of the replica in it.
fn config_file(dir: &Path, data_dir: &Path) -> std::path::PathBuf {
    let path = dir.join("mesh-node.toml");
    std::fs::write(
        &path,
        format!(
            r#"[mesh]
node_id = "from-file"
bind_addr = "127.0.0.1"
bind_port = 0
grpc_port = 0
timing = "local"
max_concurrency = 3

[reapi]
data_dir = "{}"
sandbox = "off"
cas_max_bytes = "1GiB"
"#,
            data_dir.display()
        ),
    )
    .unwrap();
    path
}

/// A spec with only what an operator passes: the API, the file, the metrics address.
fn from_file(config: &Path) -> NodeSpec {
    let mut spec = NodeSpec::local("from-file");
    spec.args = ["--api", "reapi", "--config"]
        .into_iter()
        .map(str::to_owned)
        .chain([config.display().to_string()])
        .chain(["--metrics-addr".to_owned(), "127.0.0.1:0".to_owned()])
        .collect();
    spec
}

/// Without `max_concurrency` in `[mesh]` or `[reapi]`, a REAPI replica runs one action per
/// CPU (not the mesh's default of 16 tasks): actions are mostly compilers, and more at once
/// than CPUs makes each slower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reapi_replica_runs_one_action_per_cpu_unless_told_otherwise() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let config = config_file(dir.path(), &dir.path().join("data"));
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("max_concurrency = 3\n", "")).unwrap();
    let node = NodeProcess::start(from_file(&config)).await;
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert!(
        node.stdout
            .find(&[&format!("actions run WITHOUT a sandbox, {cpus} at once")])
            .is_some(),
        "{:?}",
        node.stdout.all()
    );
    assert!(
        node.stdout.find(&[&format!(", {cpus} slots")]).is_some(),
        "gossiped as the node's capacity: {:?}",
        node.stdout.all()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_node_serves_reapi_from_one_file_and_reports_what_it_did() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let data = dir.path().join("data");
    let config = config_file(dir.path(), &data);
    let spec = from_file(&config).env("MESH_REAPI_ACTION_CACHE_MAX_BYTES", "32MiB");
    let mut node = NodeProcess::start(spec).await;
    assert!(
        node.stdout
            .find(&["node from-file gossiping at 127.0.0.1:", "3 slots"])
            .is_some(),
        "{:?}",
        node.stdout.all()
    );
    assert!(
        data.join("cas").is_dir(),
        "the CAS lives in the file's data_dir"
    );

    // `echo hello`, uploaded and executed, then looked up in the action cache.
    let action_digest = upload_shell_action(&node.url(), "echo hello").await;
    let mut execution = ExecutionClient::connect(node.url()).await.unwrap();
    let mut stream = execution
        .execute(ExecuteRequest {
            action_digest: Some(action_digest.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(operation) = stream.message().await.unwrap() {
        last = Some(operation);
    }
    let operation = last.expect("the stream ends with the operation");
    assert!(operation.done, "{operation:?}");
    let mut action_cache = ActionCacheClient::connect(node.url()).await.unwrap();
    let cached = action_cache
        .get_action_result(GetActionResultRequest {
            action_digest: Some(action_digest.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cached.exit_code, 0);
    assert_eq!(
        cached.stdout_digest,
        Some(Digest::of(b"hello\n").to_proto()),
        "the action ran the file's way and printed hello"
    );

    // The REAPI series, from the metrics endpoint.
    let metrics = node.metrics.clone().expect("--metrics-addr is served");
    let series = samples(&http_get(&metrics, "/metrics").await);
    let value = |name: &str| series.get(name).copied().unwrap_or(0.0);
    assert_eq!(
        value(r#"reapi_executions_total{outcome="exit_zero"}"#),
        1.0,
        "{series:#?}"
    );
    assert_eq!(
        value(r#"reapi_action_cache_misses_total{api="Execute"}"#),
        1.0
    );
    assert_eq!(
        value(r#"reapi_action_cache_hits_total{api="GetActionResult"}"#),
        1.0
    );
    assert_eq!(value("reapi_execution_seconds_count"), 1.0);
    assert_eq!(value("reapi_queue_seconds_count"), 1.0);
    assert!(
        value(r#"reapi_store_bytes{store="cas"}"#) > 0.0,
        "{series:#?}"
    );
    assert!(value(r#"reapi_store_entries{store="action_cache"}"#) >= 1.0);

    // The same counters through the admin API, and the variable's bound over the file's.
    let stats = meshctl_json(Path::new(""), &node.url(), "stats").await;
    let server = &stats["server"];
    assert_eq!(server["executed"], 1, "{stats:#}");
    assert_eq!(server["cache_hits"], 1, "{stats:#}");
    assert_eq!(server["cas_max_bytes"], 1u64 << 30, "{stats:#}");
    assert_eq!(server["action_cache_max_bytes"], 32u64 << 20, "{stats:#}");
    node.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_reapi_value_is_refused_naming_its_key_value_and_rule() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let config = config_file(dir.path(), &dir.path().join("data"));
    for (variable, value, expected) in [
        (
            "MESH_REAPI_SANDBOX",
            "maybe",
            r#"mesh-node: invalid MESH_REAPI_SANDBOX "maybe": must be one of auto, on, required, off"#,
        ),
        (
            "MESH_REAPI_REPLICATION_FACTOR",
            "0",
            r#"mesh-node: invalid reapi.replication_factor "0": must be at least 1"#,
        ),
    ] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_mesh-node"))
            .args(["--api", "reapi", "--config"])
            .arg(&config)
            .env(variable, value)
            .output()
            .await
            .unwrap();
        assert!(!output.status.success(), "{variable}={value} was accepted");
        let stderr = text(&output.stderr);
        assert!(stderr.starts_with(expected), "{stderr}");
    }
}

/// `reapi-load` (the load generator of BENCHMARKS.md) drives a replica through every phase and
/// exits 0 with a line per phase; pointed at an address where nothing listens, it exits
/// non-zero naming the address, and a count of zero is refused naming its flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_drives_every_phase_and_fails_loudly() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let config = config_file(dir.path(), &dir.path().join("data"));
    let mut node = NodeProcess::start(from_file(&config)).await;
    let bin = examples();
    let url = node.url();
    let small = [
        "--target",
        &url,
        "--peer",
        &url,
        "--blob-mib",
        "2",
        "--small-blobs",
        "200",
        "--actions",
        "6",
        "--concurrency",
        "3",
    ];
    let output = run(&bin, "reapi-load", &small).await;
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", text(&output.stderr));
    for phase in [
        "write",
        "read",
        "peer-read",
        "batch",
        "find-missing",
        "execute",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(&format!("{phase} "))),
            "no {phase} line in {stdout}"
        );
    }
    assert!(stdout.contains("6 actions"), "{stdout}");
    // Each figure is printed as a share of its limit on this machine.
    for (phase, limit) in [
        ("write", "SHA-256 + file write"),
        ("execute", "spawning `true`"),
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("{phase} ")))
            .unwrap();
        assert!(line.contains(&format!(" of {limit} ")), "{line}");
    }
    assert!(stdout.contains("ms in the worker"), "{stdout}");
    node.terminate().await;

    let output = run(
        &bin,
        "reapi-load",
        &["--target", &url, "--phases", "execute"],
    )
    .await;
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(stderr.contains(&url), "{stderr}");

    // A count of zero would measure nothing (and divide by it): refused, naming the flag.
    for flag in ["--blob-mib", "--small-blobs", "--actions", "--concurrency"] {
        let output = run(&bin, "reapi-load", &["--target", &url, flag, "0"]).await;
        assert!(!output.status.success(), "{flag} 0 was accepted");
        let stderr = text(&output.stderr);
        assert!(
            stderr.contains(flag) && stderr.contains("at least 1"),
            "{stderr}"
        );
    }
}

/// `reapi-cluster` stopped with SIGTERM while its replicas are still starting (as a
/// supervisor or a script may) shuts down cleanly once they have: exit 0, its report printed,
/// and the temporary data directory it made removed. Its signal handlers are in place before
/// it prints anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reapi_cluster_example_stops_cleanly_on_sigterm_while_it_starts() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut command = tokio::process::Command::new(examples().join("reapi-cluster"));
    command
        .args(["--nodes", "3", "--sandbox", "off"])
        // Its default data directory is made in the temporary directory.
        .env("TMPDIR", tmp.path());
    // SIGTERM at its first line: the replicas are still starting.
    let run = SignalledAtStart::run(command).await;
    let (_, dir) = run
        .first
        .split_once("data in ")
        .unwrap_or_else(|| panic!("the first line names the data directory: {:?}", run.first));
    let data_dir = std::path::PathBuf::from(dir);
    assert!(data_dir.starts_with(tmp.path()), "{}", data_dir.display());
    assert!(
        run.exit.success(),
        "exited with {}; printed {:?}",
        run.exit,
        run.rest
    );
    assert!(
        run.rest.iter().any(|line| line.starts_with("r2 ")),
        "no report line for r2 in {:?}",
        run.rest
    );
    assert!(!data_dir.exists(), "{} was left behind", data_dir.display());
}

/// `mesh-node` told to stop while it starts (a SIGTERM at its first line, before its server
/// is up) finishes starting, drains and leaves: exit 0 and the drain's lines, not a process
/// killed mid-start. Its handlers are in place before it prints anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_node_drains_on_a_sigterm_that_comes_while_it_starts() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let config = config_file(dir.path(), &dir.path().join("data"));
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_mesh-node"));
    command.args(["--api", "reapi", "--config"]).arg(&config);
    let run = SignalledAtStart::run(command).await;
    assert!(run.first.starts_with("reapi data in "), "{}", run.first);
    assert!(
        run.exit.success(),
        "exited with {}; printed {:?}",
        run.exit,
        run.rest
    );
    assert!(
        run.rest.iter().any(|line| line.starts_with("draining: "))
            && run
                .rest
                .iter()
                .any(|line| line.contains("left the cluster")),
        "{:?}",
        run.rest
    );
}

/// Two `mesh-node`s pointed at one data directory: the second is refused before it touches
/// anything there, naming the directory and the process that holds it; once the first has
/// exited the directory is free again (the kernel drops the lock with the process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_mesh_node_on_the_same_data_directory_is_refused() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let data_dir = dir.path().join("data");
    let config = config_file(dir.path(), &data_dir);
    let mut first = NodeProcess::start(from_file(&config)).await;
    let first_pid = first.pid();

    let second = bounded(
        "the second node to exit",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_mesh-node"))
            .args(["--api", "reapi", "--config"])
            .arg(&config)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    assert!(!second.status.success(), "the second node started");
    let stderr = text(&second.stderr);
    assert!(
        stderr.contains(&format!("data directory {} is in use", data_dir.display()))
            && stderr.contains(&format!("process {first_pid} holds")),
        "{stderr}"
    );
    // The first never noticed: it still serves.
    assert!(first.child_running(), "the first node exited");
    first.terminate().await;

    let mut again = NodeProcess::start(from_file(&config)).await;
    again.terminate().await;
}
