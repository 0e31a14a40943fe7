//! Real `mesh-node`, `meshctl` and `loadgen` processes, as an operator runs them: the
//! binaries and the example built in this test's profile, their output captured for
//! assertions.
#![allow(dead_code, unreachable_pub)] // Each test binary uses a different subset.

use std::{
    collections::HashMap,
    future::Future,
    path::{Path, PathBuf},
    process::{Output, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader},
    process::{Child, Command},
};

/// Upper bound for any wait on a loaded CI machine; not an expectation.
pub const BOUND: Duration = Duration::from_secs(60);

pub async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {BOUND:?} waiting for {what}"))
}

/// Polls `check` every 100 ms until it returns `Some`, within [`BOUND`].
pub async fn poll<T, F: Future<Output = Option<T>>>(what: &str, mut check: impl FnMut() -> F) -> T {
    bounded(what, async {
        loop {
            if let Some(value) = check().await {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

/// The directory of the examples built in the same profile as this test (built here if this
/// test runs on its own).
pub fn examples() -> PathBuf {
    // `--workspace` resolves features as `cargo test --workspace` does, so after that command
    // this build has nothing to do (a package-only build would compile everything again).
    let mut cargo = std::process::Command::new(env!("CARGO"));
    // The variables cargo sets for this test (CARGO_PKG_NAME, …) would reach build scripts
    // that watch them and make this build compile again what `cargo test` compiled.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy().into_owned();
        if name.starts_with("CARGO_") && !matches!(name.as_str(), "CARGO_HOME" | "CARGO_TARGET_DIR")
        {
            cargo.env_remove(name);
        }
    }
    let status = cargo
        .args(["build", "--quiet", "--workspace"])
        .args(["--example", "loadgen", "--example", "reapi-load"])
        .args(["--example", "reapi-cluster"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the examples failed");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/examples
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("examples")
}

/// Lines a process printed, kept as they come.
#[derive(Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn collect(&self, stream: impl AsyncRead + Unpin + Send + 'static) {
        let lines = self.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stream).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                lines.0.lock().unwrap().push(line);
            }
        });
    }

    pub fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// The first line containing every one of `needles`.
    pub fn find(&self, needles: &[&str]) -> Option<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .find(|line| needles.iter().all(|n| line.contains(n)))
            .cloned()
    }
}

/// How to start a `mesh-node` process.
pub struct NodeSpec {
    pub name: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The command to run it with, e.g. `ip netns exec ns1` (none: directly).
    pub wrapper: Vec<String>,
}

impl NodeSpec {
    /// A node on 127.0.0.1 with ephemeral ports and the `local` timing.
    pub fn local(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            args: [
                "--node-id",
                name,
                "--bind-addr",
                "127.0.0.1",
                "--bind-port",
                "0",
            ]
            .into_iter()
            .chain(["--grpc-port", "0", "--timing", "local"])
            .map(str::to_owned)
            .collect(),
            env: Vec::new(),
            wrapper: Vec::new(),
        }
    }

    pub fn arg(mut self, flag: &str, value: impl ToString) -> Self {
        self.args.push(flag.to_owned());
        self.args.push(value.to_string());
        self
    }

    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }
}

/// A running `mesh-node` and the addresses it printed.
pub struct NodeProcess {
    pub name: String,
    pub child: Child,
    /// Where the gossip socket is bound, and the address it advertises.
    pub gossip: String,
    pub advertised: String,
    pub grpc: String,
    pub metrics: Option<String>,
    pub stdout: Lines,
    pub stderr: Lines,
}

impl NodeProcess {
    pub async fn start(spec: NodeSpec) -> Self {
        // mesh-node is a binary of the package (what `cargo install` installs).
        let node = PathBuf::from(env!("CARGO_BIN_EXE_mesh-node"));
        let mut command = match spec.wrapper.split_first() {
            Some((program, rest)) => {
                let mut command = Command::new(program);
                command.args(rest).arg(&node);
                command
            }
            None => Command::new(&node),
        };
        command
            .args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("mesh-node starts");
        let stdout = Lines::default();
        let stderr = Lines::default();
        stdout.collect(child.stdout.take().unwrap());
        stderr.collect(child.stderr.take().unwrap());
        let wants_metrics = spec.args.iter().any(|a| a == "--metrics-addr");
        // "node a gossiping at 127.0.0.1:P (advertised ...), grpc at 127.0.0.1:Q, ..."
        let name = spec.name.clone();
        let (first, metrics) = poll(&format!("node {name} to print its addresses"), || {
            let stdout = stdout.clone();
            let stderr = stderr.clone();
            let name = name.clone();
            async move {
                let first = stdout.find(&["gossiping at "]);
                let metrics = stdout.find(&["metrics at "]);
                if first.is_none()
                    && stdout.all().is_empty()
                    && let Some(error) = stderr.find(&["node: "])
                {
                    panic!("node {name} failed to start: {error}");
                }
                match (first, metrics) {
                    (Some(first), metrics) if metrics.is_some() || !wants_metrics => {
                        Some((first, metrics))
                    }
                    _ => None,
                }
            }
        })
        .await;
        let field = |line: &str, after: &str| {
            line.split_once(after)
                .and_then(|(_, rest)| rest.split([' ', ',']).next())
                .unwrap_or_else(|| panic!("no {after:?} in {line:?}"))
                .trim_end_matches(')')
                .to_owned()
        };
        Self {
            gossip: field(&first, "gossiping at "),
            advertised: field(&first, "(advertised "),
            grpc: field(&first, "grpc at "),
            // "metrics at http://127.0.0.1:P/metrics"
            metrics: metrics.map(|line| {
                field(&line, "metrics at http://")
                    .trim_end_matches("/metrics")
                    .to_owned()
            }),
            name: spec.name,
            child,
            stdout,
            stderr,
        }
    }

    /// The address tools connect to.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the node is running")
    }

    /// Whether the process has not exited.
    pub fn child_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM (a graceful leave), and wait for the process to exit.
    pub async fn terminate(&mut self) {
        sigterm(&self.child);
        let exit = bounded(&format!("node {} to exit", self.name), self.child.wait())
            .await
            .unwrap();
        assert!(exit.success(), "node {} exited with {exit}", self.name);
    }

    /// SIGKILL, and wait for the process to be gone.
    pub async fn kill9(&mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }
}

/// Sends SIGTERM to `child`.
pub fn sigterm(child: &Child) {
    let pid = child.id().expect("the process is running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success(), "kill -TERM {pid}");
}

/// A process started from `command` that is sent SIGTERM as soon as it prints its first line
/// (for a program that must answer a signal that comes while it starts).
pub struct SignalledAtStart {
    /// Its first line, printed before the signal was sent.
    pub first: String,
    /// Every line it printed after that.
    pub rest: Vec<String>,
    /// How it exited.
    pub exit: std::process::ExitStatus,
}

impl SignalledAtStart {
    /// Starts `command` (its stdout read here, its stderr dropped), sends SIGTERM once it has
    /// printed a line, and waits for it to exit, each within [`BOUND`].
    pub async fn run(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the program starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = bounded("its first line", lines.next_line())
            .await
            .unwrap()
            .expect("a first line");
        sigterm(&child);
        let (rest, exit) = bounded("it to exit after SIGTERM", async {
            let mut rest = Vec::new();
            while let Some(line) = lines.next_line().await.unwrap() {
                rest.push(line);
            }
            (rest, child.wait().await.unwrap())
        })
        .await;
        Self { first, rest, exit }
    }
}

/// Runs an example to completion (within [`BOUND`]).
pub async fn run(bin: &Path, example: &str, args: &[&str]) -> Output {
    run_wrapped(bin, &[], example, args).await
}

/// Runs an example under `wrapper` (e.g. `ip netns exec ns1`) to completion.
pub async fn run_wrapped(bin: &Path, wrapper: &[&str], example: &str, args: &[&str]) -> Output {
    // meshctl is a binary of the package (what `cargo install` installs), not an example.
    let program = match example {
        "meshctl" => PathBuf::from(env!("CARGO_BIN_EXE_meshctl")),
        example => bin.join(example),
    };
    let mut command = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut command = Command::new(first);
            command.args(rest).arg(&program);
            command
        }
        None => Command::new(&program),
    };
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    bounded(&format!("{example} {}", args.join(" ")), command.output())
        .await
        .unwrap()
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `meshctl --addr <url> <command> --json`, parsed; panics with its output if it failed.
pub async fn meshctl_json(bin: &Path, url: &str, command: &str) -> serde_json::Value {
    let output = run(bin, "meshctl", &["--addr", url, command, "--json"]).await;
    assert!(
        output.status.success(),
        "meshctl {command} failed: {}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "meshctl {command} --json printed no JSON ({e}): {}",
            text(&output.stdout)
        )
    })
}

/// The members of a `meshctl members --json` answer, by node id.
pub fn members_by_id(members: &serde_json::Value) -> HashMap<String, serde_json::Value> {
    members["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["node_id"].as_str().unwrap().to_owned(), m.clone()))
        .collect()
}

/// Runs `loadgen` with `args` (which include `--actions N`), asserts that it succeeded with all
/// N actions ok, and returns its report and who ran how many.
pub async fn loadgen_all_ok(bin: &Path, args: &[&str]) -> (String, HashMap<String, u64>) {
    let actions = args
        .iter()
        .position(|a| *a == "--actions")
        .and_then(|i| args.get(i + 1))
        .expect("loadgen_all_ok needs --actions N");
    let output = run(bin, "loadgen", args).await;
    let report = text(&output.stdout);
    assert!(
        output.status.success(),
        "loadgen failed:\n{report}{}",
        text(&output.stderr)
    );
    assert!(
        report.contains(&format!("{actions} ok, 0 failed")),
        "{report}"
    );
    let ran = executed_by(&report);
    (report, ran)
}

/// Per-node counts from a loadgen report ("  b                    20").
pub fn executed_by(report: &str) -> HashMap<String, u64> {
    report
        .lines()
        .filter(|line| line.starts_with("  ") && !line.trim_start().starts_with("failed"))
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let node = words.next()?;
            let count = words.next()?.parse().ok()?;
            Some((node.to_owned(), count))
        })
        .collect()
}

/// `GET http://{addr}{path}` over HTTP/1.0: the body.
pub async fn http_get(addr: &str, path: &str) -> String {
    let mut stream = bounded(
        "connecting to the metrics endpoint",
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    bounded("the metrics response", stream.read_to_string(&mut response))
        .await
        .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.to_owned()
}

/// The samples of a Prometheus text exposition: `name{labels}` -> value.
pub fn samples(exposition: &str) -> HashMap<String, f64> {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Uploads a REAPI action running `/bin/sh -c script` (PATH set, empty input root) to the
/// replica at `url`, checking every blob was stored; returns the action's digest.
pub async fn upload_shell_action(url: &str, script: &str) -> mesh_reapi::Digest {
    use mesh_reapi::{
        Digest,
        proto::build::bazel::remote::execution::v2::{
            Action, BatchUpdateBlobsRequest, Command, batch_update_blobs_request,
            command::EnvironmentVariable,
            content_addressable_storage_client::ContentAddressableStorageClient,
        },
    };
    use prost::Message as _;

    #[allow(deprecated)]
    let command = Command {
        arguments: vec!["/bin/sh".into(), "-c".into(), script.into()],
        environment_variables: vec![EnvironmentVariable {
            name: "PATH".into(),
            value: "/bin:/usr/bin".into(),
        }],
        ..Default::default()
    }
    .encode_to_vec();
    let command_digest = Digest::of(&command);
    let action = Action {
        command_digest: Some(command_digest.to_proto()),
        input_root_digest: Some(Digest::EMPTY.to_proto()),
        ..Default::default()
    }
    .encode_to_vec();
    let action_digest = Digest::of(&action);
    let uploaded = ContentAddressableStorageClient::connect(url.to_owned())
        .await
        .unwrap()
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: [(command_digest, command), (action_digest, action)]
                .into_iter()
                .map(|(digest, data)| batch_update_blobs_request::Request {
                    digest: Some(digest.to_proto()),
                    data,
                    compressor: 0,
                })
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        uploaded
            .responses
            .iter()
            .all(|r| r.status.as_ref().is_none_or(|s| s.code == 0)),
        "{uploaded:?}"
    );
    action_digest
}
