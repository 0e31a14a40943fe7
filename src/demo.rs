//! A miniature remote-execution server, to show (and test) how a real one embeds the mesh.
//!
//! [`DemoExecutor`] simulates work: each action sleeps for its `duration_ms` on a bounded pool
//! of worker slots, and every accepted action holds a [`mesh_core::TaskGuard`] from queueing to
//! completion, so the gossiped load is exact without any bookkeeping by hand.
//! [`ExecutionService`] serves the `mesh.demo.v1.Execution` API the way a Remote Execution API
//! server would use the router:
//!
//! * `Execute` asks [`Router::forward`] where to run; locally it submits to the executor,
//!   otherwise it relays the peer's stream. Operation names are `{node}:{uuid}` of the node
//!   that executes, behind `{instance}/operations/` when an instance name is given.
//! * `WaitExecution` parses the name, and follows it here or on its owner
//!   ([`Router::forward_to_owner`]); `NOT_FOUND` when the owner is gone, `INVALID_ARGUMENT`
//!   when the name is malformed.

use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::{Stream, StreamExt};
use mesh_core::{LeaveError, LoadTracker, NodeId};
use mesh_proto::demo::v1::{
    Action, ExecuteRequest, ExecuteResponse, Operation, Stage, WaitExecutionRequest,
    execution_client::ExecutionClient, execution_server,
};
use mesh_route::{Forwarded, OperationId, RouteError, RouteRequest, Router, forwarded_by};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, oneshot, watch},
    time::Instant,
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use crate::{
    Node, NodeBuilder, NodeError,
    admin::AdminService,
    tls::{PeerTls, ServerTls},
};

/// The longest simulated action accepted.
pub const MAX_ACTION_DURATION: Duration = Duration::from_secs(3600);
/// How long a completed operation can still be followed with `WaitExecution`.
pub const COMPLETED_RETENTION: Duration = Duration::from_secs(300);

/// Runs simulated actions on a bounded pool of worker slots, reporting into a
/// [`LoadTracker`].
#[derive(Debug, Clone)]
pub struct DemoExecutor {
    inner: Arc<ExecutorInner>,
}

#[derive(Debug)]
struct ExecutorInner {
    node_id: NodeId,
    load: LoadTracker,
    slots: Semaphore,
    operations: Mutex<HashMap<OperationId, Tracked>>,
    executed: AtomicU64,
}

#[derive(Debug)]
struct Tracked {
    updates: watch::Receiver<Operation>,
    completed_at: Option<Instant>,
}

impl DemoExecutor {
    /// An executor for `node_id` with as many worker slots as `load`'s concurrency limit.
    pub fn new(node_id: NodeId, load: LoadTracker) -> Self {
        let slots = usize::try_from(load.max_concurrency()).unwrap_or(usize::MAX);
        Self {
            inner: Arc::new(ExecutorInner {
                node_id,
                load,
                slots: Semaphore::new(slots.min(Semaphore::MAX_PERMITS)),
                operations: Mutex::new(HashMap::new()),
                executed: AtomicU64::new(0),
            }),
        }
    }

    fn operations(&self) -> MutexGuard<'_, HashMap<OperationId, Tracked>> {
        self.inner
            .operations
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Accepts an action: it is queued at once (counted as pending), runs when a slot frees,
    /// and completes after its duration. Returns the operation's updates.
    pub fn submit(
        &self,
        id: OperationId,
        name: String,
        action: Action,
        forwarded_by: Option<NodeId>,
        request_id: String,
    ) -> watch::Receiver<Operation> {
        let guard = self.inner.load.begin_task();
        let (updates, receiver) = watch::channel(Operation {
            name,
            stage: Stage::Queued as i32,
            done: false,
            response: None,
        });
        {
            let mut operations = self.operations();
            let now = Instant::now();
            operations.retain(|_, tracked| {
                tracked
                    .completed_at
                    .is_none_or(|at| now.duration_since(at) < COMPLETED_RETENTION)
            });
            operations.insert(
                id.clone(),
                Tracked {
                    updates: receiver.clone(),
                    completed_at: None,
                },
            );
        }
        let executor = self.clone();
        tokio::spawn(async move {
            let queued_at = Instant::now();
            let Ok(_slot) = executor.inner.slots.acquire().await else {
                return;
            };
            updates.send_modify(|op| op.stage = Stage::Executing as i32);
            let started_at = Instant::now();
            tokio::time::sleep(Duration::from_millis(action.duration_ms)).await;
            let response = ExecuteResponse {
                executed_by: executor.inner.node_id.to_string(),
                exit_code: action.exit_code,
                queued_ms: millis(started_at - queued_at),
                execution_ms: millis(started_at.elapsed()),
                forwarded_by: forwarded_by.map(|n| n.to_string()).unwrap_or_default(),
                request_id,
            };
            executor.inner.executed.fetch_add(1, Ordering::Relaxed);
            if let Some(tracked) = executor.operations().get_mut(&id) {
                tracked.completed_at = Some(Instant::now());
            }
            updates.send_modify(|op| {
                op.stage = Stage::Completed as i32;
                op.done = true;
                op.response = Some(response);
            });
            drop(guard);
        });
        receiver
    }

    /// The updates of an operation this node owns, if it still knows it.
    pub fn watch(&self, id: &OperationId) -> Option<watch::Receiver<Operation>> {
        self.operations().get(id).map(|t| t.updates.clone())
    }

    /// Actions this executor completed.
    pub fn executed(&self) -> u64 {
        self.inner.executed.load(Ordering::Relaxed)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Streams an operation's updates until it is done (latest state first, as the Remote
/// Execution API does).
fn follow(updates: watch::Receiver<Operation>) -> OperationStream {
    Box::pin(futures::stream::unfold(
        (updates, false, true),
        |(mut updates, finished, first)| async move {
            if finished {
                return None;
            }
            if !first && updates.changed().await.is_err() {
                return Some((
                    Err(Status::aborted(
                        "the executor stopped before the operation completed",
                    )),
                    (updates, true, false),
                ));
            }
            let operation = updates.borrow_and_update().clone();
            let done = operation.done;
            Some((Ok(operation), (updates, done, false)))
        },
    ))
}

/// The stream type of both methods.
pub type OperationStream = Pin<Box<dyn Stream<Item = Result<Operation, Status>> + Send>>;

/// Counters of what the service did with calls.
#[derive(Debug, Default)]
struct ServiceCounters {
    forwarded_in: AtomicU64,
    forwarded_out: AtomicU64,
    waits_relayed: AtomicU64,
}

/// A snapshot of [`ExecutionService`]'s counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Actions completed on this node.
    pub executed: u64,
    /// `Execute` calls that arrived forwarded by a peer.
    pub forwarded_in: u64,
    /// `Execute` calls this node forwarded to a peer.
    pub forwarded_out: u64,
    /// `WaitExecution` calls this node relayed to the owning peer.
    pub waits_relayed: u64,
}

/// The `mesh.demo.v1.Execution` service, routed through the mesh.
#[derive(Debug, Clone)]
pub struct ExecutionService {
    router: Router,
    executor: DemoExecutor,
    counters: Arc<ServiceCounters>,
}

impl ExecutionService {
    /// A service executing on `executor` and routing with `router`.
    pub fn new(router: Router, executor: DemoExecutor) -> Self {
        Self {
            router,
            executor,
            counters: Arc::default(),
        }
    }

    /// The tonic server wrapper for this service.
    pub fn into_server(self) -> execution_server::ExecutionServer<Self> {
        execution_server::ExecutionServer::new(self)
    }

    /// What the service did so far.
    pub fn stats(&self) -> ServiceStats {
        ServiceStats {
            executed: self.executor.executed(),
            forwarded_in: self.counters.forwarded_in.load(Ordering::Relaxed),
            forwarded_out: self.counters.forwarded_out.load(Ordering::Relaxed),
            waits_relayed: self.counters.waits_relayed.load(Ordering::Relaxed),
        }
    }

    /// The executor behind the service.
    pub fn executor(&self) -> &DemoExecutor {
        &self.executor
    }
}

fn validate(action: Option<&Action>) -> Result<&Action, Status> {
    let action =
        action.ok_or_else(|| Status::invalid_argument("ExecuteRequest.action is required"))?;
    if Duration::from_millis(action.duration_ms) > MAX_ACTION_DURATION {
        return Err(Status::invalid_argument(format!(
            "action.duration_ms {} exceeds the limit of {} ms",
            action.duration_ms,
            MAX_ACTION_DURATION.as_millis()
        )));
    }
    Ok(action)
}

fn operation_prefix(instance_name: &str) -> String {
    if instance_name.is_empty() {
        String::new()
    } else {
        format!("{instance_name}/operations/")
    }
}

#[tonic::async_trait]
impl execution_server::Execution for ExecutionService {
    type ExecuteStream = OperationStream;
    type WaitExecutionStream = OperationStream;

    async fn execute(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<Response<OperationStream>, Status> {
        let message = request.get_ref();
        let action = validate(message.action.as_ref())?;
        let mut route =
            RouteRequest::new().with_required_tags(action.platform.clone().into_iter().collect());
        if !action.input_root_digest.is_empty() {
            route = route.with_affinity_key(action.input_root_digest.as_bytes());
        }
        let forwarded = self
            .router
            .forward(&route, request.metadata(), |peer| {
                let message = message.clone();
                async move {
                    ExecutionClient::new(peer.channel())
                        .execute(peer.request(message))
                        .await
                }
            })
            .await?;
        match forwarded {
            Forwarded::Local => {
                let from = forwarded_by(request.metadata());
                if from.is_some() {
                    self.counters.forwarded_in.fetch_add(1, Ordering::Relaxed);
                }
                let request_id = request
                    .metadata()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let id = self.router.new_operation();
                let name = id.with_prefix(&operation_prefix(&message.instance_name));
                let updates = self
                    .executor
                    .submit(id, name, action.clone(), from, request_id);
                Ok(Response::new(follow(updates)))
            }
            Forwarded::Remote { node, response } => {
                self.counters.forwarded_out.fetch_add(1, Ordering::Relaxed);
                Ok(Response::new(Box::pin(
                    self.router.relay(node, response.into_inner()),
                )))
            }
        }
    }

    async fn wait_execution(
        &self,
        request: Request<WaitExecutionRequest>,
    ) -> Result<Response<OperationStream>, Status> {
        let name = request.get_ref().name.clone();
        let id: OperationId = name.parse().map_err(RouteError::from)?;
        let forwarded = self
            .router
            .forward_to_owner(&id, request.metadata(), |peer| {
                let message = request.get_ref().clone();
                async move {
                    ExecutionClient::new(peer.channel())
                        .wait_execution(peer.request(message))
                        .await
                }
            })
            .await?;
        match forwarded {
            Forwarded::Local => {
                let updates = self.executor.watch(&id).ok_or_else(|| {
                    Status::not_found(format!(
                        "operation {name} is not known to its owner {}: it completed more than {} s ago or the node restarted; retry Execute",
                        id.node(),
                        COMPLETED_RETENTION.as_secs()
                    ))
                })?;
                Ok(Response::new(follow(updates)))
            }
            Forwarded::Remote { node, response } => {
                self.counters.waits_relayed.fetch_add(1, Ordering::Relaxed);
                Ok(Response::new(Box::pin(
                    self.router.relay(node, response.into_inner()),
                )))
            }
        }
    }
}

/// Reads an operation stream to its end and returns the final operation.
pub async fn finish(
    mut stream: impl Stream<Item = Result<Operation, Status>> + Unpin,
) -> Result<Operation, Status> {
    let mut last = None;
    while let Some(operation) = stream.next().await {
        let operation = operation?;
        let done = operation.done;
        last = Some(operation);
        if done {
            break;
        }
    }
    last.filter(|op| op.done)
        .ok_or_else(|| Status::aborted("the operation stream ended before completion"))
}

/// A complete demo replica: a [`Node`] plus a gRPC server on its own port serving the demo
/// `Execution` service and the admin service, in plaintext ([`DemoNode::start`]) or over TLS
/// ([`DemoNode::start_with_tls`]). What a real server embedding the mesh looks like, in one
/// value; the examples and tests run clusters of these.
///
/// Each replica runs on its own thread and tokio runtime, as if it were its own process, so
/// [`DemoNode::kill`] is a real crash: every task, socket and connection of the replica is
/// dropped at once.
#[derive(Debug)]
pub struct DemoNode {
    node: Node,
    service: ExecutionService,
    grpc_addr: SocketAddr,
    control: Option<oneshot::Sender<Stop>>,
    stopped: Option<oneshot::Receiver<Result<(), LeaveError>>>,
}

/// How a replica's runtime ends.
#[derive(Debug)]
enum Stop {
    Gracefully,
    Crash,
}

/// A [`DemoNode`] could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoNodeError {
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
    /// The gRPC server's TLS configuration was refused.
    #[error("configuring TLS for the grpc server failed: {message}")]
    Tls {
        /// What was wrong.
        message: String,
    },
}

impl DemoNode {
    /// Binds the gRPC listener at `grpc_bind`, starts the node from `builder` (gossiping
    /// `http://{ip}:{bound port}` as its endpoint unless the builder sets one, where the IP is
    /// the bound one or, when that is `0.0.0.0`, the node's advertise address), and
    /// serves the demo and admin services, all on a runtime of the replica's own.
    pub async fn start(builder: NodeBuilder, grpc_bind: SocketAddr) -> Result<Self, DemoNodeError> {
        Self::launch(builder, grpc_bind, None).await
    }

    /// Like [`DemoNode::start`], but the gRPC server (demo and admin services, one port) speaks
    /// only TLS with `tls`, and the default endpoint gossiped is `https://{ip}:{port}`.
    ///
    /// The node's forwarding channels are configured separately, on the builder
    /// ([`NodeBuilder::channel_config`] with a [`PeerTls`]); a node whose channels lack TLS
    /// refuses the `https://` endpoints of its peers. See [`crate::tls`].
    pub async fn start_with_tls(
        builder: NodeBuilder,
        grpc_bind: SocketAddr,
        tls: ServerTls,
    ) -> Result<Self, DemoNodeError> {
        Self::launch(builder, grpc_bind, Some(tls)).await
    }

    async fn launch(
        builder: NodeBuilder,
        grpc_bind: SocketAddr,
        tls: Option<ServerTls>,
    ) -> Result<Self, DemoNodeError> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (control, control_rx) = oneshot::channel();
        let (stopped_tx, stopped) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(DemoNodeError::Runtime)?;
        std::thread::Builder::new()
            .name("demo-replica".to_owned())
            .spawn(move || {
                let result = runtime.block_on(serve(builder, grpc_bind, tls, ready_tx, control_rx));
                // Dropping the runtime drops every task of the replica: a crash, unless `serve`
                // already shut down gracefully.
                runtime.shutdown_background();
                let _ = stopped_tx.send(result);
            })
            .map_err(DemoNodeError::Runtime)?;
        let (node, service, grpc_addr) = ready_rx.await.map_err(|_| {
            DemoNodeError::Runtime(std::io::Error::other("the replica thread ended early"))
        })??;
        Ok(Self {
            node,
            service,
            grpc_addr,
            control: Some(control),
            stopped: Some(stopped),
        })
    }

    /// The mesh node.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The execution service (its counters).
    pub fn service(&self) -> &ExecutionService {
        &self.service
    }

    /// Where the gRPC server listens.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// A plaintext client of this node's execution service (for a node started with
    /// [`DemoNode::start`]).
    pub async fn client(
        &self,
    ) -> Result<ExecutionClient<tonic::transport::Channel>, tonic::transport::Error> {
        ExecutionClient::connect(format!("http://{}", self.grpc_addr)).await
    }

    /// A TLS client of this node's execution service (for a node started with
    /// [`DemoNode::start_with_tls`]), verifying the server with `tls` and presenting its client
    /// identity, if it has one.
    pub async fn client_with_tls(
        &self,
        tls: &PeerTls,
    ) -> Result<ExecutionClient<tonic::transport::Channel>, tonic::transport::Error> {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("https://{}", self.grpc_addr))?
                .tls_config(tls.client_config())?
                .connect()
                .await?;
        Ok(ExecutionClient::new(channel))
    }

    /// Leaves the cluster (peers report it as left), lets running calls finish, and stops.
    pub async fn shutdown_gracefully(mut self) -> Result<(), LeaveError> {
        self.stop(Stop::Gracefully).await
    }

    /// Crashes the replica: no goodbye to the cluster, every connection and task dropped.
    pub async fn kill(mut self) {
        let _ = self.stop(Stop::Crash).await;
    }

    async fn stop(&mut self, how: Stop) -> Result<(), LeaveError> {
        if let Some(control) = self.control.take() {
            let _ = control.send(how);
        }
        match self.stopped.take() {
            Some(stopped) => stopped.await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    }
}

type Ready = Result<(Node, ExecutionService, SocketAddr), DemoNodeError>;

/// The replica's life, on its own runtime.
async fn serve(
    builder: NodeBuilder,
    grpc_bind: SocketAddr,
    tls: Option<ServerTls>,
    ready: oneshot::Sender<Ready>,
    control: oneshot::Receiver<Stop>,
) -> Result<(), LeaveError> {
    let bind_error = |source| DemoNodeError::Bind {
        addr: grpc_bind,
        source,
    };
    let listener = match TcpListener::bind(grpc_bind).await {
        Ok(listener) => listener,
        Err(error) => {
            let _ = ready.send(Err(bind_error(error)));
            return Ok(());
        }
    };
    let grpc_addr = match listener.local_addr() {
        Ok(addr) => addr,
        Err(error) => {
            let _ = ready.send(Err(bind_error(error)));
            return Ok(());
        }
    };
    // Refuse a bad TLS configuration before the node joins the cluster.
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        server = match server.tls_config(tls.server_config()) {
            Ok(server) => server,
            Err(error) => {
                let message = error_chain(&error);
                let _ = ready.send(Err(DemoNodeError::Tls { message }));
                return Ok(());
            }
        };
    }
    // Peers cannot dial 0.0.0.0: advertise the node's reachable IP with the bound port.
    let advertised = match (grpc_addr.ip().is_unspecified(), builder.reachable_ip()) {
        (true, Some(ip)) => SocketAddr::new(ip, grpc_addr.port()),
        _ => grpc_addr,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let node = match builder
        .default_grpc_endpoint(format!("{scheme}://{advertised}"))
        .start()
        .await
    {
        Ok(node) => node,
        Err(error) => {
            let _ = ready.send(Err(error.into()));
            return Ok(());
        }
    };
    let executor = DemoExecutor::new(node.node_id().clone(), node.load().clone());
    let service = ExecutionService::new(node.router().clone(), executor);
    let (drain, drained) = oneshot::channel::<()>();
    let server = tokio::spawn(
        server
            .add_service(service.clone().into_server())
            .add_service(AdminService::new(node.membership().clone()).into_server())
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = drained.await;
            }),
    );
    if ready.send(Ok((node.clone(), service, grpc_addr))).is_err() {
        return Ok(());
    }
    match control.await {
        Ok(Stop::Gracefully) => {
            let left = node.leave().await;
            let _ = drain.send(());
            let _ = server.await;
            left
        }
        // A crash, or the DemoNode was dropped: returning drops the runtime and everything on it.
        Ok(Stop::Crash) | Err(_) => Ok(()),
    }
}

/// An error and its causes, on one line (tonic's transport errors say little at the top).
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
