//! One replica, assembled: [`Reapi`] (stores, scheduler, services) and [`ReapiServer`] (all
//! services served on a listener, with the mesh node started alongside).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use mesh::{Node, NodeBuilder, NodeError};
use mesh_route::layer::RouteLayer;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{service::Routes, transport::server::TcpIncoming};

use crate::{
    ActionCache, ActionCacheError, ActionCacheService, ActionLimits, Authorization,
    ByteStreamService, CapabilitiesService, Cas, CasError, CasService, ClaimsService, ClusterCas,
    ExecutionService, PeerConfig, PresenceService, ReapiStats, ReplicationConfig, ResourceLimits,
    SandboxError, SandboxMode, SchedulerConfig, claims::ClaimTable, executor::Executor, handoff,
    routing, sandbox::Sandbox, scheduler::Scheduler, stats::ReapiCounters,
};

/// How one replica stores and runs things.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ReapiConfig {
    /// Where the replica keeps its CAS (`cas/`), action cache (`ac/`) and the directories
    /// actions run in (`work/`, emptied at start).
    pub data_dir: PathBuf,
    /// The CAS's bound in bytes; least recently used blobs are evicted beyond it.
    /// Default 10 GiB.
    pub cas_max_bytes: u64,
    /// The action cache's bound in bytes. Default 256 MiB.
    pub action_cache_max_bytes: u64,
    /// How many actions run at once (also gossiped as the node's `max_concurrency`).
    /// Default: the number of CPUs.
    pub max_concurrency: u32,
    /// Action timeouts.
    pub limits: ActionLimits,
    /// Operation retention.
    pub scheduler: SchedulerConfig,
    /// Deadlines of calls to peers.
    pub peers: PeerConfig,
    /// How many copies of each blob and result the cluster keeps, and handoff.
    pub replication: ReplicationConfig,
    /// Whether actions run sandboxed ([`crate::sandbox`]). Default [`SandboxMode::Auto`].
    pub sandbox: SandboxMode,
    /// Each action's process and memory limits ([`crate::cgroups`]), where the machine allows.
    pub resources: ResourceLimits,
    /// TLS for clients (Bazel's `grpcs://`), and mutual TLS when it requires client
    /// certificates. Calls to peers use the node's channel configuration
    /// ([`mesh::NodeBuilder::channel_config`] with a [`mesh::tls::PeerTls`]). `None`: plaintext.
    pub tls: Option<mesh::tls::ServerTls>,
    /// Bearer tokens checked on every call ([`crate::auth`]). `None`: every client may do
    /// everything.
    pub authorization: Option<Authorization>,
}

impl ReapiConfig {
    /// Defaults, with data in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            cas_max_bytes: 10 << 30,
            action_cache_max_bytes: 256 << 20,
            max_concurrency: std::thread::available_parallelism()
                .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
                .unwrap_or(1),
            limits: ActionLimits::default(),
            scheduler: SchedulerConfig::default(),
            peers: PeerConfig::default(),
            replication: ReplicationConfig::default(),
            sandbox: SandboxMode::default(),
            resources: ResourceLimits::default(),
            tls: None,
            authorization: None,
        }
    }
}

/// A replica could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReapiError {
    /// A setting is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The data directory is another replica's, or could not be locked.
    #[error(transparent)]
    DataDir(#[from] crate::DataDirError),
    /// The CAS could not be opened.
    #[error(transparent)]
    Cas(#[from] CasError),
    /// The action cache could not be opened.
    #[error(transparent)]
    ActionCache(#[from] ActionCacheError),
    /// The work directory could not be prepared.
    #[error("preparing the work directory {path}: {source}")]
    WorkDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The listener's address could not be read.
    #[error("reading the listener's address: {0}")]
    Listener(#[source] std::io::Error),
    /// The mesh node could not start.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// Actions must run sandboxed ([`SandboxMode::Required`]) and cannot.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The server's TLS configuration was refused.
    #[error("configuring TLS for the grpc server failed: {0}")]
    Tls(#[source] tonic::transport::Error),
}

/// One replica's REAPI state — stores, scheduler, services — over a started mesh [`Node`].
/// Cheap to clone.
///
/// [`ReapiServer`] serves it; [`Reapi::routes`] gives the services for a server of your own
/// (for example one with the route layer in front).
#[derive(Debug, Clone)]
pub struct Reapi {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    node: Node,
    cluster: ClusterCas,
    execution: ExecutionService,
    action_cache: ActionCacheService,
    scheduler: Scheduler,
    counters: Arc<ReapiCounters>,
    cas_max_bytes: u64,
    layer: RouteLayer,
    claims: ClaimTable,
    handoff: JoinHandle<()>,
    sandboxed: bool,
    limits_resources: bool,
    /// This replica's hold on its data directory, released with the last clone.
    _lock: crate::data_lock::DataDirLock,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.handoff.abort();
    }
}

impl Reapi {
    /// Opens the replica's stores under `config.data_dir` and sets the node's concurrency
    /// limit to `config.max_concurrency`. Must be called inside a tokio runtime.
    ///
    /// The directory is this replica's alone while any clone of the returned `Reapi` lives
    /// (an exclusive `flock` on `{data_dir}/lock`): opening it again, in this process or
    /// another, fails with [`ReapiError::DataDir`] until every handle on the first is dropped.
    pub fn open(node: Node, config: &ReapiConfig) -> Result<Self, ReapiError> {
        if config.max_concurrency == 0 {
            return Err(ReapiError::Config(
                "max_concurrency must be at least 1".to_owned(),
            ));
        }
        if config.replication.factor == 0 {
            return Err(ReapiError::Config(
                "replication.factor 0 is invalid: it must be at least 1 (2 keeps every blob through the loss of a replica)".to_owned(),
            ));
        }
        // Before anything under the directory is touched: the work directory is cleared below.
        let lock = crate::data_lock::DataDirLock::acquire(&config.data_dir)?;
        node.load().set_max_concurrency(config.max_concurrency);
        let counters = Arc::new(ReapiCounters::default());
        let cas = Cas::open(&config.data_dir.join("cas"), config.cas_max_bytes)?;
        let action_cache =
            ActionCache::open(&config.data_dir.join("ac"), config.action_cache_max_bytes)?;
        let work_dir = prepare_work_dir(&config.data_dir)?;
        let sandbox = Sandbox::prepare(
            config.sandbox,
            &config.data_dir,
            config.resources,
            &format!("mesh-reapi-{}", node.node_id()),
        )?;
        let sandboxed = sandbox.is_on();
        let limits_resources = sandbox.limits_resources();
        let cluster = ClusterCas::new(
            cas,
            action_cache,
            node.clone(),
            config.peers,
            config.replication,
            counters.clone(),
        );
        let claims = ClaimTable::default();
        let executor = Executor::new(cluster.clone(), work_dir, node.node_id().clone(), sandbox);
        let scheduler = Scheduler::new(
            executor,
            cluster.clone(),
            usize::try_from(config.max_concurrency).unwrap_or(usize::MAX),
            config.scheduler,
            counters.clone(),
            claims.clone(),
        );
        let execution = ExecutionService::new(
            node.node_id().clone(),
            cluster.clone(),
            scheduler.clone(),
            config.limits,
            config.scheduler.retention,
            counters.clone(),
        );
        let action_cache = ActionCacheService::new(cluster.clone(), counters.clone());
        let mut layer = routing::layer(node.router().clone(), &execution)
            .map_err(|error| ReapiError::Config(error.to_string()))?;
        if let Some(auth) = config.authorization.clone() {
            // Checked before anything else: a refused call never reaches a peer.
            auth.watch();
            layer = layer.check_calls(move |path, headers| auth.check(path, headers));
        }
        let handoff = handoff::spawn(cluster.clone());
        Ok(Self {
            inner: Arc::new(Inner {
                node,
                cluster: cluster.clone(),
                execution,
                action_cache,
                scheduler,
                counters,
                cas_max_bytes: config.cas_max_bytes,
                layer,
                claims,
                handoff,
                sandboxed,
                limits_resources,
                _lock: lock,
            }),
        })
    }

    /// The mesh node.
    pub fn node(&self) -> &Node {
        &self.inner.node
    }

    /// Blobs and action results, here and on peers.
    pub fn cluster(&self) -> &ClusterCas {
        &self.inner.cluster
    }

    /// The `Execution` service, with what the route layer's rules call
    /// ([`ExecutionService::cached_result`], [`ExecutionService::route_request`]).
    pub fn execution(&self) -> &ExecutionService {
        &self.inner.execution
    }

    /// What this replica did so far.
    pub fn stats(&self) -> ReapiStats {
        self.inner
            .counters
            .snapshot(self.inner.layer.stats(), self.inner.cluster.local())
    }

    /// [`Reapi::stats`] and the stores' usage as named counters, as the admin API's `Stats`
    /// reports them (`meshctl stats`).
    pub fn counters(&self) -> Vec<(String, u64)> {
        let mut counters: Vec<(String, u64)> = self
            .stats()
            .counters()
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value))
            .collect();
        for (store, usage) in [
            ("cas", self.inner.cluster.local().usage()),
            (
                "action_cache",
                self.inner.cluster.local_action_cache().usage(),
            ),
        ] {
            counters.push((format!("{store}_bytes"), usage.bytes));
            counters.push((format!("{store}_entries"), usage.entries));
            counters.push((format!("{store}_max_bytes"), usage.max_bytes));
            counters.push((format!("{store}_evictions"), usage.evictions));
        }
        counters
    }

    /// Whether this replica runs actions in the sandbox ([`crate::sandbox`]).
    pub fn sandboxed(&self) -> bool {
        self.inner.sandboxed
    }

    /// Whether this replica's actions get process and memory limits ([`crate::cgroups`]).
    pub fn limits_resources(&self) -> bool {
        self.inner.limits_resources
    }

    /// The route layer that makes the replicas one cluster: serve [`Reapi::routes`] behind it
    /// (`tonic::transport::Server::builder().layer(reapi.layer())`). See [`crate::routing`].
    pub fn layer(&self) -> RouteLayer {
        self.inner.layer.clone()
    }

    /// Operations this replica knows (queued, running, or finished and still retained).
    pub fn known_operations(&self) -> usize {
        self.inner.scheduler.known_operations()
    }

    /// All services (Capabilities, ContentAddressableStorage, ByteStream, ActionCache,
    /// Execution, and `mesh.reapi.v1.Claims` and `Presence`, which replicas call on each
    /// other), for `tonic::transport::Server::builder().add_routes(…)`, behind
    /// [`Reapi::layer`]: without it every replica runs only what it is sent and consults only
    /// its own action cache for `Execute`.
    pub fn routes(&self) -> Routes {
        let cluster = self.inner.cluster.clone();
        Routes::new(CapabilitiesService::new(self.inner.cas_max_bytes).into_server())
            .add_service(CasService::new(cluster.clone()).into_server())
            .add_service(ByteStreamService::new(cluster).into_server())
            .add_service(self.inner.action_cache.clone().into_server())
            .add_service(self.inner.execution.clone().into_server())
            .add_service(
                ClaimsService::new(self.inner.cluster.clone(), self.inner.claims.clone())
                    .into_server(),
            )
            .add_service(PresenceService::new(self.inner.cluster.local().clone()).into_server())
    }
}

fn prepare_work_dir(data_dir: &Path) -> Result<PathBuf, ReapiError> {
    let work = data_dir.join("work");
    let error = |source| ReapiError::WorkDir {
        path: work.clone(),
        source,
    };
    if work.exists() {
        // Directories of actions a previous run did not finish.
        std::fs::remove_dir_all(&work).map_err(error)?;
    }
    std::fs::create_dir_all(&work).map_err(error)?;
    // The sandbox mounts an action's directory at the same path: a canonical one.
    work.canonicalize().map_err(error)
}

/// How a replica stops ([`ReapiServer::drain`]).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct DrainConfig {
    /// How long running calls and actions may take to finish. Default
    /// [`mesh::drain::DEFAULT_GRACE`] (20 s, below Kubernetes' 30 s).
    pub grace: std::time::Duration,
    /// Whether the replica leaves for good (a scale-down): it then hands every blob and
    /// result it holds to their owners without it before it goes. A replica that comes back
    /// on its data directory (a rolling update) need not: it is an owner again when it
    /// returns. Default `false`.
    pub hand_off: bool,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self {
            grace: mesh::drain::DEFAULT_GRACE,
            hand_off: false,
        }
    }
}

/// How a drain went ([`ReapiServer::drain`]).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct DrainReport {
    /// The mesh's part: whether every call and action finished, and how long it took.
    pub drained: mesh::drain::Drained,
    /// Whether everything held here reached its owners (always `true` without
    /// [`DrainConfig::hand_off`]).
    pub handed_off: bool,
    /// When the handoff did not finish: the blobs held here, which may lack a copy elsewhere.
    pub blobs_held: u64,
    /// And their bytes.
    pub bytes_held: u64,
}

/// Where a replica's mesh node comes from.
#[derive(Debug)]
pub enum NodeSource {
    /// A node to start: it gossips `http://{listener address}` (`https://` with TLS) as its
    /// gRPC endpoint unless the builder sets one (set one when the listener is bound to
    /// `0.0.0.0`), and stamps its calls to peers with the cluster token when
    /// [`ReapiConfig::authorization`] is set.
    Builder(Box<NodeBuilder>),
    /// A node already started, whose gossiped gRPC endpoint already points at the listener.
    Started(Node),
}

impl From<NodeBuilder> for NodeSource {
    fn from(builder: NodeBuilder) -> Self {
        NodeSource::Builder(Box::new(builder))
    }
}

impl From<Node> for NodeSource {
    fn from(node: Node) -> Self {
        NodeSource::Started(node)
    }
}

/// One replica serving every REAPI service on a listener.
///
/// ```no_run
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use mesh_reapi::{ReapiConfig, ReapiServer};
///
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let node = mesh::Node::builder()
///     .node_id("reapi-0")?
///     .gossip_bind("127.0.0.1:0".parse()?);
/// let mut config = ReapiConfig::new("/var/lib/reapi-0");
/// config.cas_max_bytes = 1 << 30;
/// config.max_concurrency = 8;
/// let server = ReapiServer::start(node, config, listener).await?;
/// println!("bazel --remote_executor={}", server.endpoint());
/// server.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct ReapiServer {
    reapi: Reapi,
    addr: SocketAddr,
    tls: bool,
    stop: Option<oneshot::Sender<()>>,
    serving: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl ReapiServer {
    /// Starts the node (if given a builder), opens the stores, and serves every service on
    /// `listener` until [`ReapiServer::shutdown`].
    pub async fn start(
        node: impl Into<NodeSource>,
        config: ReapiConfig,
        listener: TcpListener,
    ) -> Result<Self, ReapiError> {
        let addr = listener.local_addr().map_err(ReapiError::Listener)?;
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let node = match node.into() {
            NodeSource::Started(node) => node,
            NodeSource::Builder(mut builder) => {
                if let Some(auth) = &config.authorization {
                    *builder = builder.peer_credential(auth.peer_credential());
                }
                builder
                    .default_grpc_endpoint(format!("{scheme}://{addr}"))
                    .max_concurrency(config.max_concurrency)
                    .start()
                    .await?
            }
        };
        let reapi = match Reapi::open(node.clone(), &config) {
            Ok(reapi) => reapi,
            Err(error) => {
                node.shutdown().await;
                return Err(error);
            }
        };
        // grpc.health.v1 (NOT_SERVING while the node joins or drains, see mesh::health) and
        // the admin API (meshctl), as every mesh node serves them.
        let health = mesh::health::NodeHealth::builder(node.membership().clone())
            .start()
            .await;
        let (stop, stopped) = oneshot::channel::<()>();
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let mut server = tonic::transport::Server::builder()
            // An Execute stream may stay silent for as long as its action runs: HTTP/2
            // pings keep the connection alive through middleboxes and notice dead clients.
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)));
        if let Some(tls) = &config.tls {
            server = match server.tls_config(tls.server_config()) {
                Ok(server) => server,
                Err(error) => {
                    node.shutdown().await;
                    return Err(ReapiError::Tls(error));
                }
            };
        }
        let serving = tokio::spawn(
            server
                .layer(reapi.layer())
                .add_routes(reapi.routes())
                .add_service(health)
                .add_service({
                    let counters = reapi.clone();
                    mesh::admin::AdminService::for_node(&node)
                        .route_layer(reapi.layer())
                        .server_stats(move || counters.counters())
                        .into_server()
                })
                // Without TCP_NODELAY small responses wait for the client's delayed ACK.
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                }),
        );
        Ok(Self {
            reapi,
            addr,
            tls: config.tls.is_some(),
            stop: Some(stop),
            serving: Some(serving),
        })
    }

    /// The replica's state and services.
    pub fn reapi(&self) -> &Reapi {
        &self.reapi
    }

    /// The mesh node.
    pub fn node(&self) -> &Node {
        self.reapi.node()
    }

    /// Where the gRPC server listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The endpoint to give Bazel: `grpc://{addr}`, or `grpcs://{addr}` with TLS (Bazel takes
    /// a bare address as TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls { "grpcs" } else { "grpc" };
        format!("{scheme}://{}", self.addr)
    }

    /// What the replica did so far.
    pub fn stats(&self) -> ReapiStats {
        self.reapi.stats()
    }

    /// Stops without cutting a call ([`mesh::drain`]): takes no new work, tells clients to go
    /// elsewhere (GOAWAY), lets running calls and actions finish for up to `config.grace`
    /// (an action that ran here also places its outputs and result on their owners, whether
    /// or not its client is still there; `Drained::pending` does not count those),
    /// with [`DrainConfig::hand_off`] hands every blob and result it holds to their owners
    /// without it, then leaves the mesh and stops. What still runs after the grace period is
    /// cut (a call forwarded here by a peer is then routed again by that peer).
    pub async fn drain(mut self, config: DrainConfig) -> DrainReport {
        let stop = self.stop.take();
        let serving = self.serving.take();
        let abort = serving.as_ref().map(JoinHandle::abort_handle);
        let server = async move {
            if let Some(serving) = serving {
                let _ = serving.await;
            }
        };
        let cluster = self.reapi.cluster().clone();
        let scheduler = self.reapi.inner.scheduler.clone();
        let hand_off = config.hand_off;
        if hand_off {
            cluster.set_leaving();
        }
        // An action stops counting as load when it gives back its slot; placing what it
        // produced on its owners still has to finish (its client may be gone).
        let placed = async move {
            while scheduler.placing_operations() > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        };
        let handoff_done = async move {
            if !hand_off {
                return;
            }
            // The node leaves the placement once its draining state is in its own view (a
            // moment after the drain began, longer on a busy machine): until then the last
            // placement counts as handed off, and waiting on that alone would end at once.
            while cluster.placed_here() {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            // Then its handoff task copies what it holds to the new owners once that
            // placement settled.
            while cluster.handoff_pending() {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        };
        let settle = async move {
            tokio::join!(placed, handoff_done);
        };
        let stop_accepting = move || {
            if let Some(stop) = stop {
                let _ = stop.send(());
            }
        };
        let layer = self.reapi.layer();
        let node = self.reapi.node().clone();
        let drained =
            mesh::drain::drain(&node, config.grace, &layer, stop_accepting, server, settle).await;
        if let Some(abort) = abort {
            abort.abort();
        }
        let handed_off = !hand_off || !self.reapi.cluster().handoff_pending();
        let (blobs_held, bytes_held) = if handed_off {
            (0, 0)
        } else {
            let usage = self.reapi.cluster().local().usage();
            (usage.entries, usage.bytes)
        };
        if !handed_off {
            tracing::warn!(
                blobs = blobs_held,
                bytes = bytes_held,
                "the handoff did not finish within the grace period: these blobs may have no \
                 copy on their new owners"
            );
        }
        DrainReport {
            drained,
            handed_off,
            blobs_held,
            bytes_held,
        }
    }

    /// Leaves the mesh (peers see it as left, not failed), stops accepting calls and waits
    /// for the server to stop.
    pub async fn shutdown(mut self) {
        if let Err(error) = self.reapi.node().leave().await {
            tracing::warn!(%error, "leaving the mesh failed");
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(serving) = self.serving.take() {
            // Streams still open (an Execute followed to its end) would hold the server up;
            // they end with their connections.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), serving).await;
        }
    }
}

impl Drop for ReapiServer {
    fn drop(&mut self) {
        if let Some(serving) = self.serving.take() {
            serving.abort();
        }
    }
}
