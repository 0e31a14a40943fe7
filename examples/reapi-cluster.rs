//! N Remote Execution API replicas in one process, for Bazel.
//!
//! Starts `--nodes` replicas (default 3) on 127.0.0.1 with ephemeral ports, each a mesh node
//! with its own CAS and action cache under `--data-dir` (default: a fresh directory in the
//! system's temporary directory, removed on exit), joined into one cluster. Prints where its
//! data is as it starts; once the cluster has formed, each replica's endpoint on a line of
//! its own (`grpc://127.0.0.1:PORT`), whether actions run sandboxed (`--sandbox
//! auto|required|off`; auto uses bubblewrap where it works), the Bazel flags to use, then
//! `ready`. On Ctrl-C or SIGTERM (even one that comes while it starts) it prints who did what
//! — actions executed, cache hits, bytes fetched from peers, bytes it placed on the owners of
//! what it stored, bytes it handed to new owners after a replica left, `Execute` calls
//! forwarded in and out and re-routed — and exits.
//!
//! Each replica runs on a thread and runtime of its own, as if it were a process: `SIGUSR1`
//! crashes the last replica the next time it is running an action (no goodbye, every socket
//! dropped), to show that a replica lost in the middle of a build costs Bazel nothing; `SIGUSR2`
//! restarts every replica in turn on its port and data directory, draining it first
//! (`mesh::drain`), as a rolling update does.
//!
//! With `--tls-cert`, `--tls-key` and `--tls-ca` (one certificate for 127.0.0.1, used by every
//! replica) clients and replicas speak TLS (`grpcs://`; `--tls-client-auth` for mutual TLS),
//! and with `--tokens-file` and `--cluster-token-file` clients need a bearer token
//! (`mesh_reapi::auth`).
//!
//! ```text
//! cargo run --example reapi-cluster
//! cargo run --example reapi-cluster -- --nodes 5 --max-concurrency 4 --data-dir /tmp/reapi
//! ```

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use mesh::{
    Timing,
    route::ChannelConfig,
    tls::{CaBundle, PeerTls, ServerTls, TlsIdentity},
};
use mesh_demo::{Replica, Served};
use mesh_reapi::{Authorization, Reapi, ReapiConfig};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser, Debug)]
#[command(about = "Run N Remote Execution API replicas in one process, for Bazel")]
struct Args {
    /// Number of replicas.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    nodes: u16,
    /// Where the replicas keep their data (one subdirectory each). Default: a new temporary
    /// directory, removed on exit.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Each replica's CAS bound, in MiB.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    cas_max_mib: u64,
    /// Actions each replica runs at once (default: the number of CPUs).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_concurrency: Option<u32>,
    /// The `--jobs` value suggested in the printed Bazel flags.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    jobs: u32,
    /// Whether actions run in the sandbox (bubblewrap): auto (where it works), required, off.
    #[arg(long, default_value = "auto")]
    sandbox: mesh_reapi::SandboxMode,
    /// PEM certificate every replica serves (valid for 127.0.0.1); with --tls-key and
    /// --tls-ca, turns TLS on for clients and between replicas.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) the replicas' (and, with --tls-client-auth, the clients')
    /// certificates chain to.
    #[arg(long, requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// Mutual TLS: clients must present a certificate from --tls-ca.
    #[arg(long, requires = "tls_cert")]
    tls_client_auth: bool,
    /// Bearer tokens clients must present (see mesh_reapi::auth). Needs --cluster-token-file.
    #[arg(long, requires = "cluster_token_file")]
    tokens_file: Option<PathBuf>,
    /// The token replicas authenticate to each other with. Needs --tokens-file.
    #[arg(long, requires = "tokens_file")]
    cluster_token_file: Option<PathBuf>,
    /// In a rolling restart (SIGUSR2), how long each replica's running calls may take to
    /// finish before it restarts.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    drain_grace: Duration,
}

/// TLS for one replica: its server, and how it connects to its peers.
fn tls(args: &Args) -> Result<Option<(ServerTls, PeerTls)>, Box<dyn std::error::Error>> {
    let (Some(cert), Some(key), Some(ca)) = (&args.tls_cert, &args.tls_key, &args.tls_ca) else {
        return Ok(None);
    };
    let identity = TlsIdentity::from_files(cert, key)?;
    let ca = CaBundle::from_file(ca)?;
    let mut server = ServerTls::new(identity.clone());
    let mut peers = PeerTls::new(ca.clone());
    if args.tls_client_auth {
        server = server.require_client_certificates(ca);
        peers = peers.identity(identity);
    }
    Ok(Some((server, peers)))
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("reapi-cluster: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let (data_dir, temporary) = match &args.data_dir {
        Some(dir) => (dir.clone(), false),
        None => (
            std::env::temp_dir().join(format!("reapi-cluster-{}", std::process::id())),
            true,
        ),
    };
    // Removed however `serve` ends, a panic included (printing to a closed pipe panics).
    let _cleanup = temporary.then(|| RemoveOnDrop(data_dir.clone()));
    serve(&args, &data_dir).await
}

/// Removes a temporary data directory when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What every replica of this process shares.
struct Setup<'a> {
    args: &'a Args,
    data_dir: &'a std::path::Path,
    tls: Option<(ServerTls, PeerTls)>,
    authorization: Option<Authorization>,
}

impl Setup<'_> {
    /// Starts replica `r{i}` on its data directory, listening on `grpc_bind`, joining through
    /// `seed`.
    async fn start(
        &self,
        i: usize,
        grpc_bind: std::net::SocketAddr,
        seed: Option<std::net::SocketAddr>,
    ) -> Result<Replica<Reapi>, Box<dyn std::error::Error>> {
        let args = self.args;
        let mut config = ReapiConfig::new(self.data_dir.join(format!("r{i}")));
        config.cas_max_bytes = args.cas_max_mib << 20;
        if let Some(max) = args.max_concurrency {
            config.max_concurrency = max;
        }
        config.sandbox = args.sandbox;
        config.authorization = self.authorization.clone();
        let mut node = mesh::Node::builder()
            .node_id(format!("r{i}"))?
            .gossip_bind("127.0.0.1:0".parse()?)
            .timing(Timing::local())
            .max_concurrency(config.max_concurrency)
            .seeds(seed);
        if let Some((_, peers)) = &self.tls {
            node = node.channel_config(ChannelConfig::default().tls(peers.clone()));
        }
        if let Some(authorization) = &self.authorization {
            node = node.peer_credential(authorization.peer_credential());
        }
        let server_tls = self.tls.as_ref().map(|(server, _)| server.clone());
        let replica = Replica::start(node, grpc_bind, server_tls, move |node| {
            let reapi = Reapi::open(node.clone(), &config)
                .map_err(|error| mesh_demo::ReplicaError::Serve(error.to_string()))?;
            Ok(Served {
                layer: reapi.layer(),
                routes: reapi.routes(),
                parts: reapi,
            })
        })
        .await?;
        Ok(replica)
    }
}

async fn serve(args: &Args, data_dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    // Registered before anything starts: a SIGTERM that comes while the replicas start (or
    // right after `ready`) stops the cluster cleanly instead of killing the process with its
    // data directory left behind.
    let mut signals = Signals::new()?;
    println!(
        "starting {} replicas, data in {}",
        args.nodes,
        data_dir.display()
    );
    let setup = Setup {
        args,
        data_dir,
        tls: tls(args)?,
        authorization: match (&args.tokens_file, &args.cluster_token_file) {
            (Some(tokens), Some(cluster)) => Some(Authorization::from_files(tokens, cluster)?),
            _ => None,
        },
    };
    let mut replicas: Vec<Replica<Reapi>> = Vec::new();
    for i in 0..usize::from(args.nodes) {
        let seed = replicas.first().map(|first| first.node().gossip_addr());
        replicas.push(setup.start(i, "127.0.0.1:0".parse()?, seed).await?);
    }
    let expected = replicas.len();
    for replica in &replicas {
        let formed = replica.node().membership().wait_until(|view| {
            view.len() == expected
                && view
                    .peers()
                    .iter()
                    .all(|p| p.state().is_some_and(|s| s.grpc_endpoint.is_some()))
        });
        tokio::time::timeout(Duration::from_secs(30), formed)
            .await
            .map_err(|_| "the replicas did not form one cluster within 30 s")?;
    }
    let scheme = if setup.tls.is_some() { "grpcs" } else { "grpc" };
    let endpoint = |replica: &Replica<Reapi>| format!("{scheme}://{}", replica.grpc_addr());
    println!("{} replicas in one cluster", replicas.len());
    for replica in &replicas {
        println!("{}", endpoint(replica));
    }
    let sandboxed = replicas.iter().all(|replica| replica.parts().sandboxed());
    println!(
        "actions run {}",
        if sandboxed {
            "sandboxed"
        } else {
            "WITHOUT a sandbox"
        }
    );
    println!(
        "bazel flags: --remote_executor={} --spawn_strategy=remote --noremote_local_fallback --jobs={}",
        endpoint(&replicas[0]),
        args.jobs
    );
    println!("ready");

    let crashed = run_until_stopped(&setup, &mut replicas, &mut signals).await?;

    println!();
    println!(
        "{:<6} {:<24} {:>9} {:>7} {:>11} {:>14} {:>13} {:>17} {:>13} {:>14} {:>9}",
        "node",
        "endpoint",
        "executed",
        "merged",
        "cache hits",
        "bytes fetched",
        "bytes placed",
        "bytes handed off",
        "forwarded in",
        "forwarded out",
        "rerouted"
    );
    let rows = replicas
        .iter()
        .map(|replica| (replica, false))
        .chain(crashed.iter().map(|replica| (replica, true)));
    for (replica, crashed) in rows {
        let stats = replica.parts().stats();
        println!(
            "{:<6} {:<24} {:>9} {:>7} {:>11} {:>14} {:>13} {:>17} {:>13} {:>14} {:>9}{}",
            replica.node().node_id().as_str(),
            endpoint(replica),
            stats.executed,
            stats.merged,
            stats.cache_hits,
            stats.bytes_fetched,
            stats.bytes_replicated,
            stats.bytes_handed_off,
            stats.forwarded_in,
            stats.forwarded_out,
            stats.rerouted,
            if crashed { "  (crashed)" } else { "" }
        );
    }
    for replica in replicas {
        replica.shutdown_gracefully().await?;
    }
    Ok(())
}

/// Restarts every replica in turn, as a StatefulSet's rolling update does: drains it (see
/// `mesh::drain`), starts it again on the same port and data directory, and waits until every
/// other replica sees it serving before the next one.
async fn rolling_restart(
    setup: &Setup<'_>,
    replicas: &mut Vec<Replica<Reapi>>,
) -> Result<(), Box<dyn std::error::Error>> {
    println!("rolling restart of {} replicas", replicas.len());
    for i in 0..replicas.len() {
        let stopping = replicas.remove(i);
        let grpc_bind = stopping.grpc_addr();
        let name = stopping.node().node_id().to_string();
        let index: usize = name.trim_start_matches('r').parse()?;
        let seed = replicas.first().map(|other| other.node().gossip_addr());
        let reapi = stopping.parts().clone();
        let started = tokio::time::Instant::now();
        let drained = stopping.drain(setup.args.drain_grace).await;
        let executed = reapi.stats().executed;
        // The last handle on the stopped replica: its data directory is free once it goes.
        drop(reapi);
        let drained_ms = started.elapsed().as_millis();
        let restarted = setup.start(index, grpc_bind, seed).await?;
        let expected = replicas.len() + 1;
        let joined = restarted.node().membership().wait_until(|view| {
            view.len() == expected
                && view
                    .peers()
                    .iter()
                    .all(|p| p.state().is_some_and(|s| s.grpc_endpoint.is_some()))
        });
        tokio::time::timeout(Duration::from_secs(30), joined)
            .await
            .map_err(|_| format!("{name} did not rejoin within 30 s"))?;
        println!(
            "restarted {name}: executed {executed} before it restarted, drained in {drained_ms} \
             ms ({}), serving again {} ms after the drain began",
            match drained {
                Some(drained) if drained.finished => "every call finished",
                Some(_) => "grace period over: calls cut",
                None => "it had stopped",
            },
            started.elapsed().as_millis()
        );
        replicas.insert(i, restarted);
    }
    println!("rolling restart done");
    Ok(())
}

/// The signals the cluster answers, registered once at its start.
struct Signals {
    /// Ctrl-C.
    interrupt: tokio::signal::unix::Signal,
    /// SIGTERM.
    terminate: tokio::signal::unix::Signal,
    /// SIGUSR1: crash the last replica.
    crash: tokio::signal::unix::Signal,
    /// SIGUSR2: a rolling restart.
    roll: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            crash: signal(SignalKind::user_defined1())?,
            roll: signal(SignalKind::user_defined2())?,
        })
    }
}

/// Serves until Ctrl-C or SIGTERM; on SIGUSR1, crashes the last replica as soon as it is
/// running an action; on SIGUSR2, restarts every replica in turn (a rolling update). Returns
/// the crashed replicas (still readable: their counters outlive them).
async fn run_until_stopped(
    setup: &Setup<'_>,
    replicas: &mut Vec<Replica<Reapi>>,
    signals: &mut Signals,
) -> Result<Vec<Replica<Reapi>>, Box<dyn std::error::Error>> {
    let Signals {
        interrupt,
        terminate,
        crash,
        roll,
    } = signals;
    let mut crashed = Vec::new();
    let mut armed = false;
    let mut poll = tokio::time::interval(Duration::from_millis(5));
    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            _ = roll.recv() => rolling_restart(setup, replicas).await?,
            _ = crash.recv() => {
                armed = replicas.len() > 1;
                println!("armed: the last replica crashes when it next runs an action");
            }
            _ = poll.tick(), if armed => {
                let busy = replicas.last().is_some_and(|r| r.node().load().pending() > 0);
                if busy && let Some(mut victim) = replicas.pop() {
                    println!("crashing {} while it runs an action", victim.node().node_id());
                    victim.crash().await;
                    crashed.push(victim);
                    armed = false;
                }
            }
        }
    }
    Ok(crashed)
}
