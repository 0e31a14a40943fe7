//! Replicas as if they were processes: a node and its gRPC server on a thread and runtime of
//! their own, so a kill is a real crash.

use std::net::SocketAddr;

use mesh::{
    Node, NodeBuilder, NodeError,
    admin::AdminService,
    core::LeaveError,
    drain::Drained,
    health::NodeHealth,
    route::layer::{InvalidPath, RouteLayer},
    tls::{PeerTls, ServerTls},
};
use tokio::{net::TcpListener, sync::oneshot};
use tonic::{
    service::Routes,
    transport::{Channel, server::TcpIncoming},
};

use crate::{
    DemoExecutor, ExecutionService, ServiceStats, execution_layer,
    proto::demo::v1::execution_client::ExecutionClient,
};

/// What a replica serves, made once its node runs: the route layer, the services behind it
/// (the admin service and the gRPC health service, `grpc.health.v1`, are added to every
/// replica), and whatever the caller wants back.
#[derive(Debug)]
pub struct Served<T> {
    /// The route layer in front of every service.
    pub layer: RouteLayer,
    /// The services.
    pub routes: Routes,
    /// Handed back through [`Replica::parts`].
    pub parts: T,
}

/// A node and a gRPC server serving what the caller's function builds, on a thread and tokio
/// runtime of their own, as if they were a process of their own.
#[derive(Debug)]
pub struct Replica<T> {
    node: Node,
    parts: T,
    grpc_addr: SocketAddr,
    control: Option<oneshot::Sender<Stop>>,
    stopped: Option<oneshot::Receiver<Result<Option<Drained>, LeaveError>>>,
}

/// How a replica's runtime ends.
#[derive(Debug)]
enum Stop {
    Gracefully,
    /// A drain ([`mesh::drain`]) with this grace period.
    Drain(std::time::Duration),
    Crash,
}

/// A [`Replica`] could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicaError {
    /// The gRPC listener could not be bound.
    #[error("binding the grpc listener to {addr} failed: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The replica's thread or runtime could not be created.
    #[error("starting the replica's runtime failed: {0}")]
    Runtime(#[source] std::io::Error),
    /// The node could not start.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The route layer was given an invalid method path.
    #[error(transparent)]
    Layer(#[from] InvalidPath),
    /// The serve function could not set up the replica's services.
    #[error("setting up the replica's services failed: {0}")]
    Serve(String),
    /// The gRPC server's TLS configuration was refused.
    #[error("configuring TLS for the grpc server failed: {message}")]
    Tls {
        /// What was wrong.
        message: String,
    },
}

type ServeFn<T> = Box<dyn FnOnce(&Node) -> Result<Served<T>, ReplicaError> + Send>;

impl<T: Clone + Send + 'static> Replica<T> {
    /// Binds the gRPC listener at `grpc_bind`, starts the node from `builder` (gossiping
    /// `http://{ip}:{bound port}` — `https://` with `tls` — as its endpoint unless the builder
    /// sets one, where the IP is the bound one or, when that is `0.0.0.0`, the node's
    /// advertise address), and serves what `serve` builds behind its route layer, all on a
    /// runtime of the replica's own.
    ///
    /// With `tls`, the server speaks only TLS; the node's forwarding channels are configured
    /// separately, on the builder (`NodeBuilder::channel_config` with a [`PeerTls`]).
    pub async fn start(
        builder: NodeBuilder,
        grpc_bind: SocketAddr,
        tls: Option<ServerTls>,
        serve: impl FnOnce(&Node) -> Result<Served<T>, ReplicaError> + Send + 'static,
    ) -> Result<Self, ReplicaError> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (control, control_rx) = oneshot::channel();
        let (stopped_tx, stopped) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ReplicaError::Runtime)?;
        let serve: ServeFn<T> = Box::new(serve);
        std::thread::Builder::new()
            .name("replica".to_owned())
            .spawn(move || {
                let result =
                    runtime.block_on(run(builder, grpc_bind, tls, serve, ready_tx, control_rx));
                // Dropping the runtime drops every task of the replica: a crash, unless `run`
                // already shut down gracefully.
                runtime.shutdown_background();
                let _ = stopped_tx.send(result);
            })
            .map_err(ReplicaError::Runtime)?;
        let (node, parts, grpc_addr) = ready_rx.await.map_err(|_| {
            ReplicaError::Runtime(std::io::Error::other("the replica thread ended early"))
        })??;
        Ok(Self {
            node,
            parts,
            grpc_addr,
            control: Some(control),
            stopped: Some(stopped),
        })
    }

    /// The mesh node.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// What the serve function handed back.
    pub fn parts(&self) -> &T {
        &self.parts
    }

    /// Where the gRPC server listens.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// A plaintext channel to the replica's gRPC server.
    pub async fn channel(&self) -> Result<Channel, tonic::transport::Error> {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.grpc_addr))?
            .connect()
            .await
    }

    /// A TLS channel to the replica's gRPC server, verifying it with `tls` and presenting its
    /// client identity, if it has one.
    pub async fn channel_with_tls(
        &self,
        tls: &PeerTls,
    ) -> Result<Channel, tonic::transport::Error> {
        tonic::transport::Endpoint::from_shared(format!("https://{}", self.grpc_addr))?
            .tls_config(tls.client_config())?
            .connect()
            .await
    }

    /// Leaves the cluster (peers report it as left), lets running calls finish, and stops.
    pub async fn shutdown_gracefully(mut self) -> Result<(), LeaveError> {
        self.stop(Stop::Gracefully).await
    }

    /// Drains the replica ([`mesh::drain`]): takes no new work, tells its clients to go
    /// elsewhere (GOAWAY), lets the calls running finish for up to `grace`, leaves, and stops.
    /// `None` if the replica had already stopped.
    pub async fn drain(mut self, grace: std::time::Duration) -> Option<Drained> {
        if let Some(control) = self.control.take() {
            let _ = control.send(Stop::Drain(grace));
        }
        match self.stopped.take() {
            Some(stopped) => stopped.await.ok().and_then(|r| r.ok()).flatten(),
            None => None,
        }
    }

    /// Crashes the replica: no goodbye to the cluster, every connection and task dropped.
    pub async fn kill(mut self) {
        self.crash().await;
    }

    /// Like [`Replica::kill`], keeping the value (its node handle and parts can still be read,
    /// e.g. counters, but the replica is gone).
    pub async fn crash(&mut self) {
        let _ = self.stop(Stop::Crash).await;
    }

    async fn stop(&mut self, how: Stop) -> Result<(), LeaveError> {
        if let Some(control) = self.control.take() {
            let _ = control.send(how);
        }
        match self.stopped.take() {
            Some(stopped) => stopped.await.unwrap_or(Ok(None)).map(|_| ()),
            None => Ok(()),
        }
    }
}

type Ready<T> = Result<(Node, T, SocketAddr), ReplicaError>;

/// The replica's life, on its own runtime.
async fn run<T>(
    builder: NodeBuilder,
    grpc_bind: SocketAddr,
    tls: Option<ServerTls>,
    serve: ServeFn<T>,
    ready: oneshot::Sender<Ready<T>>,
    control: oneshot::Receiver<Stop>,
) -> Result<Option<Drained>, LeaveError> {
    let started = start(builder, grpc_bind, tls, serve).await;
    let Started {
        node,
        parts,
        grpc_addr,
        server,
        drain,
        layer,
    } = match started {
        Ok(started) => started,
        Err(error) => {
            let _ = ready.send(Err(error));
            return Ok(None);
        }
    };
    if ready.send(Ok((node.clone(), parts, grpc_addr))).is_err() {
        return Ok(None);
    }
    match control.await {
        Ok(Stop::Gracefully) => {
            let left = node.leave().await;
            let _ = drain.send(());
            // Clients that keep their connections open (Bazel's server does) would hold a
            // graceful shutdown forever: give running calls a moment, then stop.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
            left.map(|()| None)
        }
        Ok(Stop::Drain(grace)) => {
            let stop = move || {
                let _ = drain.send(());
            };
            let settled = std::future::ready(());
            let drained = mesh::drain::drain(&node, grace, &layer, stop, server, settled).await;
            // Returning drops the runtime: whatever still runs is cut.
            Ok(Some(drained))
        }
        // A crash, or the replica was dropped: returning drops the runtime and all on it.
        Ok(Stop::Crash) | Err(_) => Ok(None),
    }
}

/// A started replica: its node, parts and address, its server's task, the sender that starts
/// the server's graceful shutdown, and the route layer (to cut calls at the end of a drain).
struct Started<T> {
    node: Node,
    parts: T,
    grpc_addr: SocketAddr,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    drain: oneshot::Sender<()>,
    layer: RouteLayer,
}

async fn start<T>(
    builder: NodeBuilder,
    grpc_bind: SocketAddr,
    tls: Option<ServerTls>,
    serve: ServeFn<T>,
) -> Result<Started<T>, ReplicaError> {
    let bind_error = |source| ReplicaError::Bind {
        addr: grpc_bind,
        source,
    };
    let listener = TcpListener::bind(grpc_bind).await.map_err(bind_error)?;
    let grpc_addr = listener.local_addr().map_err(bind_error)?;
    // Refuse a bad TLS configuration before the node joins the cluster.
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        server = server
            .tls_config(tls.server_config())
            .map_err(|error| ReplicaError::Tls {
                // The error and its causes, on one line (tonic's top error says little).
                message: std::iter::successors(
                    Some(&error as &(dyn std::error::Error + 'static)),
                    |error| error.source(),
                )
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(": "),
            })?;
    }
    // Peers cannot dial 0.0.0.0: advertise the node's reachable IP with the bound port.
    let advertised = match (grpc_addr.ip().is_unspecified(), builder.reachable_ip()) {
        (true, Some(ip)) => SocketAddr::new(ip, grpc_addr.port()),
        _ => grpc_addr,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let node = builder
        .default_grpc_endpoint(format!("{scheme}://{advertised}"))
        .start()
        .await?;
    let served = serve(&node)?;
    let health = NodeHealth::builder(node.membership().clone()).start().await;
    let routes = served
        .routes
        .add_service(
            AdminService::for_node(&node)
                .route_layer(served.layer.clone())
                .into_server(),
        )
        .add_service(health);
    let (drain, drained) = oneshot::channel::<()>();
    // Without TCP_NODELAY a small response waits for the client's delayed ACK (40 ms).
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let layer = served.layer.clone();
    let server = tokio::spawn(
        server
            .layer(served.layer)
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = drained.await;
            }),
    );
    Ok(Started {
        node,
        parts: served.parts,
        grpc_addr,
        server,
        drain,
        layer,
    })
}

/// What a demo replica hands back: its service and its route layer (for their counters).
#[derive(Debug, Clone)]
pub(crate) struct DemoParts {
    service: ExecutionService,
    layer: RouteLayer,
}

/// A replica serving the demo `Execution` service behind [`execution_layer`], and the admin
/// service. What a real server embedding the mesh looks like; the examples and tests run
/// clusters of these.
#[derive(Debug)]
pub struct DemoNode {
    replica: Replica<DemoParts>,
}

impl DemoNode {
    /// Starts a demo replica (see [`Replica::start`]), in plaintext.
    pub async fn start(builder: NodeBuilder, grpc_bind: SocketAddr) -> Result<Self, ReplicaError> {
        Self::launch(builder, grpc_bind, None).await
    }

    /// Starts a demo replica whose server speaks only TLS with `tls`.
    pub async fn start_with_tls(
        builder: NodeBuilder,
        grpc_bind: SocketAddr,
        tls: ServerTls,
    ) -> Result<Self, ReplicaError> {
        Self::launch(builder, grpc_bind, Some(tls)).await
    }

    async fn launch(
        builder: NodeBuilder,
        grpc_bind: SocketAddr,
        tls: Option<ServerTls>,
    ) -> Result<Self, ReplicaError> {
        let replica = Replica::start(builder, grpc_bind, tls, |node| {
            let executor = DemoExecutor::new(node.node_id().clone(), node.load().clone());
            let service = ExecutionService::new(executor);
            let layer = execution_layer(node.router().clone())?;
            Ok(Served {
                routes: Routes::new(service.clone().into_server()),
                parts: DemoParts {
                    service,
                    layer: layer.clone(),
                },
                layer,
            })
        })
        .await?;
        Ok(Self { replica })
    }

    /// The mesh node.
    pub fn node(&self) -> &Node {
        self.replica.node()
    }

    /// What the replica did so far.
    pub fn stats(&self) -> ServiceStats {
        let parts = self.replica.parts();
        let routed = parts.layer.stats();
        ServiceStats {
            executed: parts.service.executor().executed(),
            forwarded_in: parts.service.forwarded_in(),
            forwarded_out: routed.forwarded_out,
            waits_relayed: routed.to_owner,
            rerouted: routed.rerouted,
        }
    }

    /// Where the gRPC server listens.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.replica.grpc_addr()
    }

    /// A plaintext client of the replica's execution service.
    pub async fn client(&self) -> Result<ExecutionClient<Channel>, tonic::transport::Error> {
        Ok(ExecutionClient::new(self.replica.channel().await?))
    }

    /// A TLS client of the replica's execution service (see [`Replica::channel_with_tls`]).
    pub async fn client_with_tls(
        &self,
        tls: &PeerTls,
    ) -> Result<ExecutionClient<Channel>, tonic::transport::Error> {
        Ok(ExecutionClient::new(
            self.replica.channel_with_tls(tls).await?,
        ))
    }

    /// Drains the replica (see [`Replica::drain`]).
    pub async fn drain(self, grace: std::time::Duration) -> Option<Drained> {
        self.replica.drain(grace).await
    }

    /// Leaves the cluster, lets running calls finish, and stops.
    pub async fn shutdown_gracefully(self) -> Result<(), LeaveError> {
        self.replica.shutdown_gracefully().await
    }

    /// Crashes the replica.
    pub async fn kill(self) {
        self.replica.kill().await;
    }
}
