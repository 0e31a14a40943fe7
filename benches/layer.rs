//! What the route layer costs and carries, on real gRPC servers on 127.0.0.1:
//!
//! 1. **Added latency**: a unary `Echo` call sent straight to a node; the same call through a
//!    plain pass-through proxy (a hyper HTTP/2 server handing every request to a tonic
//!    `Channel` to the worker: one hop, no routing), the reference for what any hop costs; and
//!    through a full node whose route layer forwards it (decode the first message, route,
//!    forward the original request, relay the response). p50 / p99 over the stated samples.
//! 2. **Routing throughput**: demo actions sent to one node of a five-node cluster, 64 in
//!    flight, every one routed by the layer: actions completed per second. Zero-length actions
//!    end at once, so the entry node has a free slot for most of them and keeps them (what a
//!    routing decision alone costs); 1 ms actions keep its 8 slots full, so most are forwarded
//!    (what a forwarded call costs); and unary `Echo` calls holding a slot for 1 ms, which
//!    the layer counts itself and whose trailers free the peer's slot for the router as soon
//!    as they end.
//!
//! `cargo bench --bench layer` (run with `-- --samples N --actions M` to change the sizes).

use std::{net::SocketAddr, time::Duration};

use futures::StreamExt;
use mesh::{
    Node, Timing, WhenFull,
    route::{
        Decision, RouteRequest,
        layer::{RouteLayer, Rule},
    },
};
use mesh_demo::{
    DemoNode, Replica, Served,
    echo::EchoService,
    finish,
    proto::{
        demo::v1::{Action, ExecuteRequest},
        test::v1::{EchoRequest, echo_client::EchoClient},
    },
};
use tokio::time::Instant;
use tonic::service::Routes;

fn builder(name: &str, slots: u32, seed: Option<SocketAddr>) -> mesh::NodeBuilder {
    Node::builder()
        .node_id(name)
        .unwrap()
        .gossip_bind("127.0.0.1:0".parse().unwrap())
        .seeds(seed)
        .timing(Timing::local())
        .max_concurrency(slots)
}

async fn echo_replica(name: &str, slots: u32, seed: Option<SocketAddr>) -> Replica<()> {
    echo_replica_when_full(name, slots, seed, WhenFull::RunLocally).await
}

async fn echo_replica_when_full(
    name: &str,
    slots: u32,
    seed: Option<SocketAddr>,
    when_full: WhenFull,
) -> Replica<()> {
    Replica::start(
        builder(name, slots, seed).when_full(when_full),
        "127.0.0.1:0".parse().unwrap(),
        None,
        |node| {
            let layer = RouteLayer::new(node.router().clone()).rule(
                "/mesh.test.v1.Echo/Echo",
                Rule::spread(|_: EchoRequest, _| async {
                    Ok(Decision::Route(RouteRequest::new()))
                }),
            )?;
            let service = EchoService::new(node.node_id().clone());
            Ok(Served {
                layer,
                routes: Routes::new(service.into_server()),
                parts: (),
            })
        },
    )
    .await
    .unwrap()
}

async fn converge(nodes: &[&Node]) {
    for node in nodes {
        tokio::time::timeout(
            Duration::from_secs(60),
            node.membership().wait_until(|v| {
                v.len() == nodes.len() && v.peers().iter().all(|p| p.state().is_some())
            }),
        )
        .await
        .expect("the cluster formed");
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn latency(samples: usize) {
    let entry = echo_replica("entry", 1, None).await;
    let worker = echo_replica("worker", 1_000, Some(entry.node().gossip_addr())).await;
    converge(&[entry.node(), worker.node()]).await;
    let _full = entry.node().load().begin_task(); // every call through the entry is forwarded

    let request = EchoRequest {
        payload: vec![7; 256],
        ..EchoRequest::default()
    };
    let proxy = plain_proxy(worker.channel().await.unwrap()).await;
    let proxy = tonic::transport::Endpoint::from_shared(format!("http://{proxy}"))
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap();
    let paths = [
        ("direct to the worker", worker.channel().await.unwrap()),
        ("through a plain proxy", proxy),
        ("through the layer", entry.channel().await.unwrap()),
    ];
    let mut clients: Vec<_> = paths
        .iter()
        .map(|(_, channel)| EchoClient::new(channel.clone()))
        .collect();
    for client in &mut clients {
        for _ in 0..200 {
            client.echo(request.clone()).await.unwrap(); // warm up connections
        }
    }
    // The paths take turns, one call each, so a slower moment of the machine falls on all
    // three alike instead of on whichever ran then.
    let mut times = vec![Vec::with_capacity(samples); paths.len()];
    for _ in 0..samples {
        for (client, times) in clients.iter_mut().zip(&mut times) {
            let started = Instant::now();
            let reply = client.echo(request.clone()).await.unwrap();
            times.push(started.elapsed());
            assert_eq!(reply.get_ref().served_by, "worker");
        }
    }
    let rows: Vec<(&str, Duration, Duration)> = paths
        .iter()
        .zip(&mut times)
        .map(|((label, _), times)| {
            times.sort();
            (*label, percentile(times, 0.5), percentile(times, 0.99))
        })
        .collect();
    println!("unary call, 256-byte payload, {samples} sequential samples per path, paths in turn");
    let us = |d: Duration| format!("{} µs", d.as_micros());
    println!("{:<22} {:>10} {:>10}", "", "p50", "p99");
    for (label, p50, p99) in &rows {
        println!("{label:<22} {:>10} {:>10}", us(*p50), us(*p99));
    }
    let added = |row: usize, p: fn(&(&str, Duration, Duration)) -> Duration| {
        let (hop, direct) = (p(&rows[row]), p(&rows[0]));
        if hop >= direct {
            format!("{} µs", (hop - direct).as_micros())
        } else {
            format!("-{} µs", (direct - hop).as_micros())
        }
    };
    for (row, label) in [(1, "added by a plain hop:"), (2, "added by the layer:")] {
        println!(
            "{label:<22} {:>10} {:>10}",
            added(row, |r| r.1),
            added(row, |r| r.2)
        );
    }
}

/// A plain gRPC pass-through proxy: an HTTP/2 server that hands every request, untouched, to
/// `worker` (a tonic `Channel`) and relays the response. What one hop costs with no routing:
/// the reference the layer's hop is measured against.
async fn plain_proxy(worker: tonic::transport::Channel) -> SocketAddr {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tower::ServiceExt as _;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            stream.set_nodelay(true).unwrap();
            let worker = worker.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: http::Request<hyper::body::Incoming>| {
                        worker.clone().oneshot(request.map(tonic::body::Body::new))
                    },
                );
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

async fn throughput(actions: usize, duration_ms: u64, strategy: &str) {
    let mut nodes: Vec<DemoNode> = Vec::new();
    for (i, slots) in [8, 8, 8, 8, 8].into_iter().enumerate() {
        let seed = nodes.first().map(|n| n.node().gossip_addr());
        let mut builder = builder(&format!("node-{i}"), slots, seed);
        if strategy == "round-robin" {
            builder = builder.strategy(mesh::RoundRobin::new());
        }
        let node = DemoNode::start(builder, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        nodes.push(node);
    }
    let members: Vec<&Node> = nodes.iter().map(DemoNode::node).collect();
    converge(&members).await;
    let client = nodes[0].client().await.unwrap();
    let request = ExecuteRequest {
        instance_name: String::new(),
        action: Some(Action {
            duration_ms,
            ..Action::default()
        }),
    };
    let started = Instant::now();
    let done = futures::stream::iter(0..actions)
        .map(|_| {
            let mut client = client.clone();
            let request = request.clone();
            async move {
                let stream = client.execute(request).await.unwrap().into_inner();
                finish(stream).await.unwrap();
            }
        })
        .buffer_unordered(64)
        .count()
        .await;
    let elapsed = started.elapsed();
    println!(
        "\n{strategy}: {done} actions of {duration_ms} ms through node-0 of 5 (8 slots each), \
         64 in flight: {:.2?}, {:.0} actions/s",
        elapsed,
        done as f64 / elapsed.as_secs_f64()
    );
    for node in &nodes {
        let stats = node.stats();
        println!(
            "  {:<8} executed {:>6}  forwarded in {:>6}  out {:>6}",
            node.node().node_id(),
            stats.executed,
            stats.forwarded_in,
            stats.forwarded_out
        );
    }
}

/// Unary `Echo` calls holding a slot for `hold_ms` each, sent to `node-0` of five nodes with 8
/// slots each, 64 in flight: the layer counts each call itself (its task ends with the
/// response), so each answer's trailers tell the entry node when the peer stopped counting it.
async fn unary_throughput(calls: usize, hold_ms: u64) {
    let mut replicas: Vec<Replica<()>> = Vec::new();
    for i in 0..5 {
        let seed = replicas.first().map(|r| r.node().gossip_addr());
        replicas.push(echo_replica_when_full(&format!("node-{i}"), 8, seed, WhenFull::Wait).await);
    }
    let members: Vec<&Node> = replicas.iter().map(Replica::node).collect();
    converge(&members).await;
    let client = EchoClient::new(replicas[0].channel().await.unwrap());
    let request = EchoRequest {
        payload: vec![7; 64],
        hold_ms,
        ..EchoRequest::default()
    };
    let started = Instant::now();
    let forwarded = futures::stream::iter(0..calls)
        .map(|_| {
            let mut client = client.clone();
            let request = request.clone();
            async move { client.echo(request).await.unwrap().into_inner().served_by != "node-0" }
        })
        .buffer_unordered(64)
        .filter(|forwarded| std::future::ready(*forwarded))
        .count()
        .await;
    let elapsed = started.elapsed();
    println!(
        "\nunary Echo holding {hold_ms} ms through node-0 of 5 (8 slots each), 64 in flight: \
         {:.2?}, {:.0} calls/s, {forwarded} of {calls} forwarded",
        elapsed,
        calls as f64 / elapsed.as_secs_f64()
    );
    for replica in &replicas {
        replica.node().shutdown().await;
    }
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        latency(arg("--samples", 5_000)).await;
        // With 64 in flight and 8 slots, the entry node is full most of the time: what it
        // cannot run goes to peers, whose room is known from their gossiped state and the
        // calls counted against them since (optimistic accounting).
        for duration_ms in [0, 1] {
            throughput(arg("--actions", 20_000), duration_ms, "least-loaded").await;
            throughput(arg("--actions", 20_000), duration_ms, "round-robin").await;
        }
        unary_throughput(arg("--actions", 20_000), 1).await;
    });
}
