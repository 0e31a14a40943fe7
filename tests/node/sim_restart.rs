//! A crash and restart on simulated time, gRPC included: the router and the demo service run
//! over turmoil's simulated TCP, the membership over its simulated UDP.
//!
//! The owner of an operation crashes: it is reported failed and its operation answers
//! NOT_FOUND. It restarts with a new generation: new actions route to it, and the old
//! operation still answers NOT_FOUND (the new process never knew it).

use std::{
    future::Future,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use mesh::{
    Node, OperationId, Timing,
    route::{ChannelConfig, DialFuture, Dialer, PeerStream},
};
use mesh_demo::{
    DemoExecutor, ExecutionService, execution_layer, finish,
    proto::demo::v1::{
        Action, ExecuteRequest, WaitExecutionRequest, execution_client::ExecutionClient,
    },
};
use tonic::{
    Code,
    codegen::Service,
    transport::{Endpoint, Server, Uri, server::Connected},
};

const GOSSIP: u16 = 7946;
const GRPC: u16 = 50051;

/// turmoil's TCP stream as tonic's server wants it.
struct SimStream(turmoil::net::TcpStream);

impl Connected for SimStream {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl tokio::io::AsyncRead for SimStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SimStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

fn sim_dial(uri: &Uri) -> DialFuture {
    let address = format!(
        "{}:{}",
        uri.host().unwrap_or_default(),
        uri.port_u16().unwrap_or(80)
    );
    Box::pin(async move {
        let stream = turmoil::net::TcpStream::connect(address).await?;
        Ok(Box::new(stream) as Box<dyn PeerStream>)
    })
}

/// The client's connector (the router's own comes from `Dialer`).
#[derive(Clone)]
struct ClientConnector;

impl Service<Uri> for ClientConnector {
    type Response = hyper_util::rt::TokioIo<Box<dyn PeerStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, uri: Uri) -> Self::Future {
        let dialing = sim_dial(&uri);
        Box::pin(async move { dialing.await.map(hyper_util::rt::TokioIo::new) })
    }
}

/// One replica on a simulated host: membership on simulated UDP, gRPC on simulated TCP.
fn replica(
    sim: &mut turmoil::Sim<'_>,
    name: &'static str,
    max_concurrency: u32,
    entry_busy: Arc<Mutex<Vec<mesh::TaskGuard>>>,
) {
    sim.host(name, move || {
        let entry_busy = Arc::clone(&entry_busy);
        async move {
            let udp =
                turmoil::net::UdpSocket::bind((IpAddr::V4(Ipv4Addr::UNSPECIFIED), GOSSIP)).await?;
            let listener =
                turmoil::net::TcpListener::bind((IpAddr::V4(Ipv4Addr::UNSPECIFIED), GRPC)).await?;
            let mut builder = Node::builder()
                .node_id(name)?
                .gossip_advertise(SocketAddr::new(turmoil::lookup(name), GOSSIP))
                .grpc_endpoint(format!("http://{name}:{GRPC}"))
                .timing(Timing::local())
                .max_concurrency(max_concurrency)
                .rng_seed(11)
                .channel_config(ChannelConfig::default().dialer(Dialer::new(sim_dial)));
            if name != "entry" {
                builder = builder.seeds([SocketAddr::new(turmoil::lookup("entry"), GOSSIP)]);
            }
            let node = builder.start_with_transport(udp).await?;
            if name == "entry" {
                // The entry is full: every action is forwarded.
                entry_busy.lock().unwrap().push(node.load().begin_task());
            }
            let executor = DemoExecutor::new(node.node_id().clone(), node.load().clone());
            let service = ExecutionService::new(executor);
            let layer = execution_layer(node.router().clone())?;
            let incoming = futures::stream::unfold(listener, |listener| async move {
                let accepted = listener.accept().await.map(|(stream, _)| SimStream(stream));
                Some((accepted, listener))
            });
            Server::builder()
                .layer(layer)
                .add_service(service.into_server())
                .serve_with_incoming(incoming)
                .await?;
            Ok(())
        }
    });
}

fn action() -> ExecuteRequest {
    ExecuteRequest {
        instance_name: String::new(),
        action: Some(Action {
            input_root_digest: String::new(),
            duration_ms: 50,
            platform: Default::default(),
            exit_code: 0,
        }),
    }
}

/// What the test body must do to the simulation, asked for by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Run,
    CrashWorker,
    WorkerCrashed,
    RestartWorker,
    WorkerRestarted,
}

#[test]
fn a_crashed_owner_answers_not_found_and_its_restart_takes_new_work() {
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(300))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(5))
        .rng_seed(11)
        .build();
    let busy = Arc::new(Mutex::new(Vec::new()));
    replica(&mut sim, "entry", 1, Arc::clone(&busy));
    replica(&mut sim, "worker", 4, Arc::clone(&busy));

    let step = Arc::new(Mutex::new(Step::Run));
    let client_step = Arc::clone(&step);
    sim.client("client", async move {
        let set = |s| *client_step.lock().unwrap() = s;
        let wait_for = |s| {
            let step = Arc::clone(&client_step);
            async move {
                while *step.lock().unwrap() != s {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        let channel = Endpoint::from_static("http://entry:50051")
            .connect_with_connector(ClientConnector)
            .await?;
        let mut client = ExecutionClient::new(channel);

        // Until the worker's state has reached the entry, the entry runs actions itself (the
        // only node it knows); wait for the first one the worker takes.
        let first = loop {
            if let Ok(stream) = client.execute(action()).await {
                let done = finish(stream.into_inner()).await?;
                if done
                    .response
                    .as_ref()
                    .is_some_and(|r| r.executed_by == "worker")
                {
                    break done;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let old_name = first.name.clone();
        let owner: OperationId = old_name.parse()?;
        assert_eq!(owner.node().as_str(), "worker");
        assert_eq!(first.response.unwrap().executed_by, "worker");

        set(Step::CrashWorker);
        wait_for(Step::WorkerCrashed).await;
        // Once the crash is detected, the operation is unknown: NOT_FOUND, retry Execute.
        let status = loop {
            let status = client
                .wait_execution(WaitExecutionRequest {
                    name: old_name.clone(),
                })
                .await
                .unwrap_err();
            if status.code() == Code::NotFound {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            status.message().contains("owner worker is not a member"),
            "{}",
            status.message()
        );

        set(Step::RestartWorker);
        wait_for(Step::WorkerRestarted).await;
        // The new life takes new work (once the entry has its state)...
        let again = loop {
            if let Ok(stream) = client.execute(action()).await
                && let Ok(done) = finish(stream.into_inner()).await
                && done
                    .response
                    .as_ref()
                    .is_some_and(|r| r.executed_by == "worker")
            {
                break done;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_ne!(again.name, old_name);
        // ...and the old operation, routed to the new life, is unknown there.
        let status = client
            .wait_execution(WaitExecutionRequest { name: old_name })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        assert!(
            status.message().contains("not known to its owner worker"),
            "{}",
            status.message()
        );
        Ok(())
    });

    loop {
        let current = *step.lock().unwrap();
        match current {
            Step::CrashWorker => {
                sim.crash("worker");
                *step.lock().unwrap() = Step::WorkerCrashed;
            }
            Step::RestartWorker => {
                sim.bounce("worker");
                *step.lock().unwrap() = Step::WorkerRestarted;
            }
            _ => {}
        }
        if sim.step().unwrap() {
            break;
        }
    }
}
