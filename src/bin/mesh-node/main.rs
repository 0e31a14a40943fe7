//! `mesh-node`, the server: one replica as a process, a mesh node serving the Remote
//! Execution API (`--api reapi`, what Bazel builds through) or the demo execution API (the
//! default), with the admin API (`meshctl`) and the gRPC health service. `cargo install --path .`
//! installs it next to `meshctl`.
//!
//! Configuration comes from, lowest precedence first: defaults, a TOML/YAML file (`--config`,
//! with `[mesh]` and `[reapi]` sections), `MESH_*` and `MESH_REAPI_*` environment variables,
//! and flags. Runs until Ctrl-C or SIGTERM, then leaves the
//! cluster gracefully. `--metrics-addr` serves Prometheus metrics at `/metrics`; logs go to
//! stderr, and `RUST_LOG=info,mesh_route=debug` logs every forwarded call with its request id
//! on both nodes.
//!
//! ```text
//! # three processes on one machine
//! cargo run --bin mesh-node -- --node-id a --bind-addr 127.0.0.1 --bind-port 7946 --grpc-port 50051 --timing local --metrics-addr 127.0.0.1:9100
//! cargo run --bin mesh-node -- --node-id b --bind-addr 127.0.0.1 --bind-port 7947 --grpc-port 50052 --timing local --join 127.0.0.1:7946
//! cargo run --bin mesh-node -- --node-id c --bind-addr 127.0.0.1 --bind-port 7948 --grpc-port 50053 --timing local --join 127.0.0.1:7946
//! cargo run --bin meshctl -- --addr http://127.0.0.1:50052 members
//! cargo run --example loadgen -- --target http://127.0.0.1:50051 --actions 200
//! cargo run --bin meshctl -- --addr http://127.0.0.1:50051 stats
//! curl -s http://127.0.0.1:9100/metrics
//!
//! # one REAPI replica per process (Bazel: --remote_executor=grpc://127.0.0.1:50061), or
//! # everything from a file: mesh-node --api reapi --config mesh-node.toml
//! cargo run --bin mesh-node -- --api reapi --data-dir /tmp/reapi-r0 --node-id r0 --bind-addr 127.0.0.1 --bind-port 7956 --grpc-port 50061 --timing local
//! ```

// The flags' doc comments are clap's help text, read on a terminal: `<node id>` there is a
// placeholder, not HTML.
#![allow(rustdoc::invalid_html_tags)]

mod metrics_endpoint;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, ValueEnum};
use mesh::{MeshConfig, MeshEvent, Node};
use mesh_demo::DemoNode;
use mesh_reapi::{ReapiServer, ReapiSettings};

/// What the replica serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Api {
    /// The demo execution API (`mesh.demo.v1.Execution`), simulated work.
    Demo,
    /// The Remote Execution API v2, running actions for real (`mesh_reapi::ReapiServer`).
    Reapi,
}

#[derive(Parser, Debug)]
#[command(
    about = "Run one mesh replica serving the demo execution API or the Remote Execution API"
)]
struct Args {
    /// What to serve.
    #[arg(long, value_enum, default_value_t = Api::Demo)]
    api: Api,
    /// With --api reapi: where the replica keeps its CAS, action cache and work directories
    /// (`[reapi] data_dir`; default: mesh-reapi-<node id> in the system's temporary directory).
    #[arg(long)]
    data_dir: Option<String>,
    /// With --api reapi: whether actions run in the sandbox (bubblewrap): auto (the default:
    /// where it works, with a warning where it does not), required, off (`[reapi] sandbox`).
    #[arg(long)]
    sandbox: Option<String>,
    /// Serve Prometheus metrics at http://<this address>/metrics (port 0: any free port).
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// A TOML or YAML configuration file: `[mesh]` and `[reapi]` sections (or the mesh keys
    /// at the top level).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Node id (default: the hostname).
    #[arg(long)]
    node_id: Option<String>,
    /// IP the gossip socket and the gRPC server bind to.
    #[arg(long)]
    bind_addr: Option<String>,
    /// Gossip port (UDP).
    #[arg(long)]
    bind_port: Option<String>,
    /// IP peers reach this node at.
    #[arg(long)]
    advertise_addr: Option<String>,
    /// A peer to join through, host:port (repeatable); selects list discovery.
    #[arg(long)]
    join: Vec<String>,
    /// A DNS name whose records are the peers (e.g. a headless service); selects DNS discovery.
    #[arg(long)]
    dns: Option<String>,
    /// Take gossip ports from SRV records (_gossip._udp.<name>).
    #[arg(long)]
    dns_srv: bool,
    /// gRPC port of this replica.
    #[arg(long)]
    grpc_port: Option<String>,
    /// Tasks this replica runs at once (default 16; with `--api reapi`, one action per CPU
    /// unless this, `[mesh]` or `[reapi] max_concurrency` says otherwise).
    #[arg(long)]
    max_concurrency: Option<String>,
    /// Timing preset: lan (default), wan or local.
    #[arg(long)]
    timing: Option<String>,
    /// A platform tag, key=value (repeatable).
    #[arg(long)]
    tag: Vec<String>,
    /// Routing strategy.
    #[arg(long)]
    strategy: Option<String>,
    /// When every node is full: wait (default) or run-locally.
    #[arg(long)]
    when_full: Option<String>,
    /// Encrypt gossip with the keys in this file (one per line, base64 or hex; first is primary).
    #[arg(long)]
    gossip_keys_file: Option<String>,
    /// Cluster label authenticated with the gossip keys.
    #[arg(long)]
    cluster_label: Option<String>,
    /// PEM certificate of the gRPC server; with --tls-key and --tls-ca, turns TLS on.
    #[arg(long)]
    tls_cert: Option<String>,
    /// PEM private key of --tls-cert.
    #[arg(long)]
    tls_key: Option<String>,
    /// PEM CA certificate(s) peers' certificates must chain to.
    #[arg(long)]
    tls_ca: Option<String>,
    /// Mutual TLS: require client certificates from --tls-ca, and present ours to peers.
    #[arg(long)]
    tls_client_auth: bool,
    /// `--api reapi`: the bearer tokens clients must present, one per line (name, rights,
    /// SHA-256 of the token; see mesh_reapi::auth). Needs --cluster-token-file.
    #[arg(long)]
    tokens_file: Option<String>,
    /// `--api reapi`: the cluster token replicas authenticate to each other with (first line
    /// sent, every line accepted). Needs --tokens-file.
    #[arg(long)]
    cluster_token_file: Option<String>,
    /// On SIGTERM: how long running calls may take to finish (e.g. "20s"; below the
    /// orchestrator's own grace period).
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    drain_grace: std::time::Duration,
    /// `--api reapi`, on SIGTERM: this replica leaves for good (a scale-down): hand every blob
    /// and result it holds to their other owners before exiting.
    #[arg(long)]
    hand_off_on_exit: bool,
}

impl Args {
    /// Flag values as configuration keys, to apply after the file and the environment.
    fn overrides(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let mut put = |key, value: &Option<String>| {
            if let Some(value) = value {
                out.push((key, value.clone()));
            }
        };
        put("node_id", &self.node_id);
        put("bind_addr", &self.bind_addr);
        put("bind_port", &self.bind_port);
        put("advertise_addr", &self.advertise_addr);
        put("grpc_port", &self.grpc_port);
        put("max_concurrency", &self.max_concurrency);
        put("timing", &self.timing);
        put("strategy", &self.strategy);
        put("when_full", &self.when_full);
        put("gossip_keys_file", &self.gossip_keys_file);
        put("cluster_label", &self.cluster_label);
        put("tls_cert_file", &self.tls_cert);
        put("tls_key_file", &self.tls_key);
        put("tls_ca_file", &self.tls_ca);
        if self.tls_client_auth {
            out.push(("tls_client_auth", "true".to_owned()));
        }
        if !self.join.is_empty() {
            out.push(("discovery_mode", "list".to_owned()));
            out.push(("join_peers", self.join.join(",")));
        }
        if let Some(name) = &self.dns {
            out.push(("discovery_mode", "dns".to_owned()));
            out.push(("dns_service_name", name.clone()));
        }
        if self.dns_srv {
            out.push(("dns_srv", "true".to_owned()));
        }
        if !self.tag.is_empty() {
            out.push(("tags", self.tag.join(",")));
        }
        out
    }

    /// Flag values as `[reapi]` keys, to apply after the file and the environment.
    fn reapi_overrides(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        for (key, value) in [
            ("data_dir", &self.data_dir),
            ("sandbox", &self.sandbox),
            ("tokens_file", &self.tokens_file),
            ("cluster_token_file", &self.cluster_token_file),
        ] {
            if let Some(value) = value {
                out.push((key, value.clone()));
            }
        }
        out
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    // Logs go to stderr (stdout carries the node's own lines), in color only on a terminal.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("mesh-node: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // Registered before anything starts: a SIGTERM that comes while the node starts (a
    // rollout that changes its mind) is answered with a drain as soon as it has, instead of
    // killing the process mid-start.
    let shutdown = ShutdownSignal::register();
    let (mut config, mut reapi_settings) = match &args.config {
        Some(path) => (
            MeshConfig::from_file(path)?,
            ReapiSettings::from_file(path)?,
        ),
        None => (MeshConfig::default(), ReapiSettings::default()),
    };
    config.apply_env()?;
    reapi_settings.apply_env()?;
    for (key, value) in args.overrides() {
        config
            .set(key, &value)
            .map_err(|rule| format!("invalid --{} {value:?}: {rule}", key.replace('_', "-")))?;
    }
    for (key, value) in args.reapi_overrides() {
        reapi_settings
            .set(key, &value)
            .map_err(|rule| format!("invalid --{} {value:?}: {rule}", key.replace('_', "-")))?;
    }
    if !config.enabled {
        println!("mesh disabled (enabled = false): serving as a cluster of one");
        config.join_peers.clear();
        config.discovery_mode = mesh::DiscoveryMode::List;
    }
    let (builder, resolved) = config.node_builder()?;
    // Before the node starts, so its first counters are recorded.
    let metrics = match args.metrics_addr {
        Some(addr) => Some(metrics_endpoint::serve(addr).await?),
        None => None,
    };
    let over_tls = if resolved.tls.is_some() {
        " over TLS"
    } else {
        ""
    };
    let replica = match args.api {
        Api::Demo => Replica::Demo(match resolved.tls {
            Some(tls) => DemoNode::start_with_tls(builder, resolved.grpc_bind, tls.server).await?,
            None => DemoNode::start(builder, resolved.grpc_bind).await?,
        }),
        Api::Reapi => {
            // `[mesh] max_concurrency` sets how many actions run only where it is set (file,
            // environment or flag); otherwise `[reapi]` decides, one per CPU by default.
            let mesh_set = args.max_concurrency.is_some()
                || std::env::var_os("MESH_MAX_CONCURRENCY").is_some()
                || match &args.config {
                    Some(path) => {
                        mesh::config::sets_in_file::<MeshConfig>(path, "max_concurrency")?
                    }
                    None => false,
                };
            let mut reapi = reapi_settings.reapi_config(
                resolved.node_id.as_str(),
                mesh_set.then_some(config.max_concurrency),
            )?;
            let data_dir = reapi.data_dir.clone();
            reapi.tls = resolved.tls.map(|tls| tls.server);
            if reapi.authorization.is_some() {
                println!(
                    "clients need a bearer token (from {})",
                    reapi_settings.tokens_file
                );
            }
            let listener = tokio::net::TcpListener::bind(resolved.grpc_bind)
                .await
                .map_err(|e| format!("binding the grpc listener to {}: {e}", resolved.grpc_bind))?;
            println!("reapi data in {}", data_dir.display());
            let server = ReapiServer::start(builder, reapi, listener).await?;
            println!(
                "actions run {}, {} at once",
                if server.reapi().sandboxed() {
                    "sandboxed"
                } else {
                    "WITHOUT a sandbox"
                },
                server.node().load().max_concurrency()
            );
            Replica::Reapi(server)
        }
    };
    let node = replica.node().clone();
    println!(
        "node {} gossiping at {} (advertised {}), grpc at {}{over_tls}, {} discovery, {} slots",
        node.node_id(),
        node.gossip_addr(),
        node.view().local().identity().addr(),
        replica.grpc_addr(),
        match config.discovery_mode {
            mesh::DiscoveryMode::List => "list",
            mesh::DiscoveryMode::Dns => "dns",
        },
        node.load().max_concurrency()
    );
    if let Some(metrics) = metrics {
        println!("metrics at http://{metrics}/metrics");
    }

    let mut events = node.events();
    let printer = tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            match event {
                MeshEvent::Updated(_) => {}
                other => println!("event: {other:?}"),
            }
        }
    });

    shutdown.wait().await;
    println!(
        "draining: no new work, clients told to go elsewhere, up to {} for running calls",
        humantime::format_duration(args.drain_grace)
    );
    printer.abort();
    let drained = match replica {
        Replica::Demo(demo) => demo.drain(args.drain_grace).await,
        Replica::Reapi(reapi) => {
            let mut config = mesh_reapi::DrainConfig::default();
            config.grace = args.drain_grace;
            config.hand_off = args.hand_off_on_exit;
            let report = reapi.drain(config).await;
            if !report.handed_off {
                println!(
                    "handoff unfinished: {} blobs ({} bytes) may lack a copy on their new owners",
                    report.blobs_held, report.bytes_held
                );
            }
            Some(report.drained)
        }
    };
    match drained {
        Some(drained) if drained.finished => {
            println!(
                "drained in {} ms, left the cluster",
                drained.took.as_millis()
            );
        }
        Some(drained) => println!(
            "grace period over after {} ms with {} tasks still running: cut; left the cluster",
            drained.took.as_millis(),
            drained.pending
        ),
        None => println!("left the cluster"),
    }
    Ok(())
}

/// The replica this process runs.
enum Replica {
    Demo(DemoNode),
    Reapi(ReapiServer),
}

impl Replica {
    fn node(&self) -> &Node {
        match self {
            Replica::Demo(demo) => demo.node(),
            Replica::Reapi(reapi) => reapi.node(),
        }
    }

    fn grpc_addr(&self) -> SocketAddr {
        match self {
            Replica::Demo(demo) => demo.grpc_addr(),
            Replica::Reapi(reapi) => reapi.addr(),
        }
    }
}

/// Ctrl-C, or SIGTERM (what Kubernetes sends before killing a pod), listened for from the
/// moment it is made: a signal that arrives before [`ShutdownSignal::wait`] is not lost.
struct ShutdownSignal {
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignal {
    fn register() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Self {
                interrupt: signal(SignalKind::interrupt()).ok(),
                terminate: signal(SignalKind::terminate()).ok(),
            }
        }
        #[cfg(not(unix))]
        {
            Self {}
        }
    }

    /// Waits for either signal.
    async fn wait(self) {
        #[cfg(unix)]
        {
            let Self {
                interrupt,
                terminate,
            } = self;
            let recv = |signal: Option<tokio::signal::unix::Signal>| async move {
                match signal {
                    Some(mut signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            if interrupt.is_none() && terminate.is_none() {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
            tokio::select! {
                () = recv(interrupt) => {}
                () = recv(terminate) => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
