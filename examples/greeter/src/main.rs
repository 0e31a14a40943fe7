//! A gRPC greeter whose replicas form one cluster: a call sent to any replica runs on the one
//! with the most room. Everything the mesh needs is in [`main`]: start a [`mesh::Node`], put a
//! [`RouteLayer`] in front of the services, serve the admin and health services, and drain on
//! SIGTERM (finish the calls running, then leave the cluster).
//!
//! Three replicas on one machine, each in its own terminal:
//!
//! ```text
//! cargo run -p greeter -- --node-id a --grpc 127.0.0.1:50051 --gossip 127.0.0.1:7946
//! cargo run -p greeter -- --node-id b --grpc 127.0.0.1:50052 --gossip 127.0.0.1:7947 --seed 127.0.0.1:7946
//! cargo run -p greeter -- --node-id c --grpc 127.0.0.1:50053 --gossip 127.0.0.1:7948 --seed 127.0.0.1:7946
//! ```
//!
//! Then call any of them (`served_by` names the replica that answered; send a few at once and
//! they spread), and list the members:
//!
//! ```text
//! grpcurl -plaintext -import-path examples/greeter/proto -proto greeter/v1/greeter.proto \
//!     -d '{"name": "world", "hold_ms": 2000}' 127.0.0.1:50051 greeter.v1.Greeter/SayHello
//! cargo run --bin meshctl -- --addr http://127.0.0.1:50051 members
//! ```
//!
//! Logs go to stderr (`RUST_LOG`, default `info`); stdout carries one line per bound address.

use std::{io::Write, net::SocketAddr, pin::Pin, time::Duration};

use clap::Parser;
use futures::{Stream, StreamExt};
use mesh::{
    admin::AdminService,
    health::NodeHealth,
    route::{
        Decision, RouteRequest,
        layer::{RouteLayer, Rule},
    },
};
use tokio::{net::TcpListener, sync::oneshot};
use tonic::{
    Request, Response, Status,
    transport::{Server, server::TcpIncoming},
};

/// The code generated from `proto/greeter/v1/greeter.proto` (see `build.rs`).
mod proto {
    #![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
    tonic::include_proto!("greeter.v1");
}

use proto::{
    CountdownRequest, HelloReply, HelloRequest, Tick,
    greeter_server::{self, GreeterServer},
};

/// How long running calls may take to finish when the replica stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// One replica of the greeter.
#[derive(Parser, Debug)]
#[command(about = "A greeter server; replicas started with --seed form one cluster")]
struct Args {
    /// This replica's id, unique in the cluster: 1-63 characters of [A-Za-z0-9._-].
    #[arg(long)]
    node_id: String,
    /// Where the gRPC server listens. Peers forward calls to this address, so it must be one
    /// they can reach (not 0.0.0.0). Port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:50051")]
    grpc: SocketAddr,
    /// Where the gossip (UDP) socket binds. Port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:7946")]
    gossip: SocketAddr,
    /// The gossip address of a replica to join through (repeatable).
    #[arg(long)]
    seed: Vec<SocketAddr>,
    /// Calls this replica runs at once; the router sends the rest to peers.
    #[arg(long, default_value_t = 4)]
    max_concurrency: u32,
}

/// The service. It never routes: the route layer in front of it decides where each call runs.
#[derive(Debug, Clone)]
struct Greeter {
    /// The replica's node id, reported in every reply.
    node_id: String,
}

#[tonic::async_trait]
impl greeter_server::Greeter for Greeter {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        let HelloRequest { name, hold_ms } = request.into_inner();
        if let Some(hold_ms) = hold_ms {
            tokio::time::sleep(Duration::from_millis(hold_ms.into())).await;
        }
        Ok(Response::new(HelloReply {
            message: format!("Hello, {name}!"),
            served_by: self.node_id.clone(),
        }))
    }

    type CountdownStream = Pin<Box<dyn Stream<Item = Result<Tick, Status>> + Send>>;

    async fn countdown(
        &self,
        request: Request<CountdownRequest>,
    ) -> Result<Response<Self::CountdownStream>, Status> {
        let CountdownRequest { from, interval_ms } = request.into_inner();
        let served_by = self.node_id.clone();
        let interval = Duration::from_millis(interval_ms.into());
        let ticks = futures::stream::iter((0..=from).rev()).then(move |value| {
            let served_by = served_by.clone();
            async move {
                if value != from {
                    tokio::time::sleep(interval).await;
                }
                Ok(Tick { value, served_by })
            }
        });
        Ok(Response::new(Box::pin(ticks)))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    // Listened for from the start: a SIGTERM that comes while the node starts is answered
    // with a drain once it is up, instead of killing the process mid-start.
    let shutdown = shutdown_signal();

    // Bind first, so the node can advertise the real port (with --grpc 127.0.0.1:0 too).
    let listener = TcpListener::bind(args.grpc).await?;
    let grpc_addr = listener.local_addr()?;
    println!("grpc listening on {grpc_addr}");

    let node = mesh::Node::builder()
        .node_id(&args.node_id)?
        .gossip_bind(args.gossip)
        .seeds(args.seed)
        .grpc_endpoint(format!("http://{grpc_addr}"))
        .max_concurrency(args.max_concurrency)
        .start()
        .await?;
    println!("gossip listening on {}", node.gossip_addr());
    std::io::stdout().flush()?;

    // Where each method's calls run. Paths without a rule (admin, health) are served here.
    let layer = RouteLayer::new(node.router().clone())
        // A new greeting goes to the least loaded replica, this one included.
        .rule(
            "/greeter.v1.Greeter/SayHello",
            Rule::spread(|_: HelloRequest, _| async { Ok(Decision::Route(RouteRequest::new())) }),
        )?
        // A countdown has no side effects, so if its replica dies mid-stream the layer runs it
        // again elsewhere (the client's stream then continues with the new replica's ticks,
        // from the top); once the last tick has been relayed there is nothing to redo.
        .rule(
            "/greeter.v1.Greeter/Countdown",
            Rule::spread(|_: CountdownRequest, _| async {
                Ok(Decision::Route(RouteRequest::new()))
            })
            .idempotent()
            .final_message(|tick: &Tick| tick.value == 0),
        )?;

    let greeter = GreeterServer::new(Greeter {
        node_id: node.node_id().to_string(),
    });
    let admin = AdminService::for_node(&node)
        .route_layer(layer.clone())
        .into_server();
    let health = NodeHealth::builder(node.membership().clone()).start().await;
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(
        Server::builder()
            .layer(layer.clone())
            .add_service(greeter)
            .add_service(admin)
            .add_service(health)
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = stopped.await;
                },
            ),
    );
    tracing::info!(node = %node.node_id(), %grpc_addr, "serving");

    shutdown.await;
    // Drain: readiness off and no new work routed here, GOAWAY so clients go elsewhere, the
    // calls running finish (up to the grace period, then they are cut), then leave: peers
    // see "left", not "failed".
    let stop_accepting = move || {
        let _ = stop.send(());
    };
    let drained = mesh::drain::drain(
        &node,
        SHUTDOWN_GRACE,
        &layer,
        stop_accepting,
        server,
        std::future::ready(()),
    )
    .await;
    tracing::info!(finished = drained.finished, took = ?drained.took, "drained and left");
    Ok(())
}

/// Ctrl-C, or SIGTERM (what Kubernetes sends before it kills a pod), listened for from the
/// moment this is called.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let signals = {
        use tokio::signal::unix::{SignalKind, signal};
        signal(SignalKind::interrupt())
            .and_then(|interrupt| Ok((interrupt, signal(SignalKind::terminate())?)))
            .ok()
    };
    async move {
        #[cfg(unix)]
        if let Some((mut interrupt, mut terminate)) = signals {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}
