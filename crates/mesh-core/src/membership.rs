//! The handle embedders hold, and the builder that starts the membership task.
//!
//! Starting a node spawns three tasks around one [`Shared`] state: the receive task
//! ([`crate::receive`]), the discovery task ([`crate::discovery`]) and the membership task
//! ([`crate::agent`]), which owns foca. Handles talk to the membership task through the
//! [`Input`] channel and read the view from [`Shared`] without locks.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh_discovery::DynDiscover;
use tokio::{
    sync::{broadcast, mpsc, oneshot, watch},
    task::JoinHandle,
};
use tracing::Instrument;

use crate::{
    Identity, KeyFingerprint, Keyring, KeyringError, LoadTracker, MeshEvent, MeshStats, NodeId,
    SecretKey, StateError, Tags, Timing, TimingError,
    agent::{Agent, AgentParts, snapshot},
    discovery::discovery_loop,
    handle_state::{LocalFields, Shared},
    identity::generation_now,
    input::Input,
    keyring::SharedKeyring,
    receive::receive_loop,
    transport::{Transport, UdpTransport},
    view::MembershipView,
    wire::{ClusterLabel, Envelope, MAX_CLUSTER_LABEL_LEN},
};

/// Capacity of the event channel; slower receivers lose the oldest events.
const EVENT_CAPACITY: usize = 1024;
/// Datagrams queued between the receive task and the membership task before new ones are
/// dropped (counted as overload).
const INPUT_CAPACITY: usize = 1024;

/// The concurrency limit a node starts with unless told otherwise (tasks it runs at once), the
/// value the configuration documents.
pub const DEFAULT_MAX_CONCURRENCY: u32 = 16;

/// A running member of the mesh.
///
/// Cheap to clone; every clone controls the same node. The membership task stops when
/// [`Membership::leave`] or [`Membership::shutdown`] is called, or when the last clone is
/// dropped.
///
/// ```no_run
/// use mesh_core::{Membership, NodeId, Timing};
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let node = Membership::builder(NodeId::new("worker-1")?)
///     .bind_addr("127.0.0.1:0".parse()?)
///     .seeds(["127.0.0.1:7946".parse()?])
///     .timing(Timing::local())
///     .max_concurrency(8)
///     .start()
///     .await?;
///
/// let task = node.load().begin_task(); // peers see one more pending task
/// for peer in node.view().peers() {
///     println!("{} ratio {:?}", peer.node_id(), peer.state().map(|s| s.load_ratio()));
/// }
/// drop(task);
/// node.leave().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Membership {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    inputs: mpsc::Sender<Input>,
    shutdown: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
    local_addr: SocketAddr,
    node_id: NodeId,
    timing: Timing,
    /// The live keyring, shared with the receive task and the membership task.
    keyring: Option<Arc<SharedKeyring>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

impl Membership {
    /// Starts configuring a node with the given id.
    pub fn builder(node_id: NodeId) -> MembershipBuilder {
        MembershipBuilder::default().node_id(node_id)
    }

    /// The current membership snapshot. Lock-free; never waits on the membership task.
    pub fn view(&self) -> Arc<MembershipView> {
        self.inner.shared.view()
    }

    /// Waits until `condition` holds for the membership view, and returns that view.
    ///
    /// Wrap it in [`tokio::time::timeout`] to bound the wait. Returns the last view if the
    /// membership task stops first.
    pub async fn wait_until(
        &self,
        mut condition: impl FnMut(&MembershipView) -> bool,
    ) -> Arc<MembershipView> {
        let mut epochs = self.inner.shared.view_epochs();
        loop {
            let view = self.view();
            if condition(&view) || epochs.changed().await.is_err() {
                return view;
            }
        }
    }

    /// A receiver of membership events from now on.
    pub fn events(&self) -> broadcast::Receiver<MeshEvent> {
        self.inner.shared.events.subscribe()
    }

    /// This node's load tracker: hand out task guards from it.
    pub fn load(&self) -> &LoadTracker {
        &self.inner.shared.load
    }

    /// The first version of this node's gossiped state sure to count every task begun before
    /// this call, as `(generation, version)`: the next version after the last published one
    /// (a publication in progress is waited for, since it may have read the load before the
    /// task began).
    ///
    /// A node that takes a forwarded call tells the caller (mesh-route's layer sends it as
    /// `x-mesh-counted-from`), so the caller counts the call against this node exactly until
    /// a state that includes it arrives — not until any newer version, which may have been
    /// published while the call was still on the wire.
    pub fn version_counting_current_load(&self) -> (u64, u64) {
        let (generation, version) = *self
            .inner
            .shared
            .published
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (generation, version.saturating_add(1))
    }

    /// This node's current identity (its generation changes if it had to rejoin).
    pub fn identity(&self) -> Identity {
        self.view().local().identity().clone()
    }

    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        &self.inner.node_id
    }

    /// The address the gossip socket is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// The timing this node runs with.
    pub fn timing(&self) -> &Timing {
        &self.inner.timing
    }

    /// Gossip counters.
    pub fn stats(&self) -> MeshStats {
        self.inner.shared.counters.snapshot()
    }

    /// Replaces this node's tags. Refused, leaving the old tags in place, if a tag breaks a rule
    /// or the state would exceed [`crate::MAX_STATE_SIZE`].
    pub fn set_tags(&self, tags: Tags) -> Result<(), StateError> {
        self.update_local(|fields| fields.tags = tags)
    }

    /// Sets or clears the gRPC endpoint peers forward calls to.
    pub fn set_grpc_endpoint(&self, endpoint: Option<String>) -> Result<(), StateError> {
        self.update_local(|fields| fields.grpc_endpoint = endpoint)
    }

    /// Marks the node draining (a member that takes no new work) or not.
    pub fn set_draining(&self, draining: bool) -> Result<(), StateError> {
        self.update_local(|fields| fields.draining = draining)
    }

    /// Shorthand for [`LoadTracker::set_max_concurrency`].
    pub fn set_max_concurrency(&self, max_concurrency: u32) {
        self.load().set_max_concurrency(max_concurrency);
    }

    /// Installs `key` for decrypting gossip, at once for this node's receive and send paths (it
    /// does not become primary). Installing an installed key changes nothing. The first step
    /// of a rotation: see [`crate::keyring`].
    ///
    /// Fails with [`KeyringError::NoKeyring`] if the node was started without a keyring.
    pub fn install_key(&self, key: SecretKey) -> Result<(), KeyringError> {
        let fingerprint = key.fingerprint();
        let installed = self.update_keyring(|keyring| Ok(keyring.install(key)))?;
        if installed {
            tracing::info!(key = %fingerprint, "installed a gossip key");
        }
        Ok(())
    }

    /// Makes an installed key the primary: every datagram sent from now on is encrypted with
    /// it. Switch the primary on every node only after the key is installed on every node.
    pub fn use_primary_key(&self, key: &SecretKey) -> Result<(), KeyringError> {
        self.update_keyring(|keyring| keyring.use_primary(key))?;
        tracing::info!(key = %key.fingerprint(), "switched the primary gossip key");
        Ok(())
    }

    /// Removes an installed key that is not the primary: datagrams encrypted with it are
    /// refused from now on. Remove a key only after no node uses it as primary any more.
    pub fn remove_key(&self, key: &SecretKey) -> Result<(), KeyringError> {
        self.update_keyring(|keyring| keyring.remove(key))?;
        tracing::info!(key = %key.fingerprint(), "removed a gossip key");
        Ok(())
    }

    /// Fingerprints of the installed keys, primary first; empty if the node runs without a
    /// keyring.
    pub fn key_fingerprints(&self) -> Vec<KeyFingerprint> {
        self.inner
            .keyring
            .as_ref()
            .map_or_else(Vec::new, |keyring| keyring.load().keys())
    }

    fn update_keyring<T>(
        &self,
        change: impl FnOnce(&mut Keyring) -> Result<T, KeyringError>,
    ) -> Result<T, KeyringError> {
        self.inner
            .keyring
            .as_ref()
            .ok_or(KeyringError::NoKeyring)?
            .update(change)
    }

    fn update_local(&self, change: impl FnOnce(&mut LocalFields)) -> Result<(), StateError> {
        if self.is_stopped() {
            return Err(StateError::Stopped);
        }
        let shared = &self.inner.shared;
        let mut fields = shared.lock_local();
        let mut candidate = fields.clone();
        change(&mut candidate);
        candidate.validate(&self.inner.node_id)?;
        *fields = candidate;
        drop(fields);
        shared.local_changed.notify_one();
        Ok(())
    }

    /// Announces this node to `addrs` now (they are also remembered and re-announced to while
    /// the node is isolated).
    pub async fn join(
        &self,
        addrs: impl IntoIterator<Item = SocketAddr>,
    ) -> Result<(), StoppedError> {
        self.inner
            .inputs
            .send(Input::Join(addrs.into_iter().collect()))
            .await
            .map_err(|_| StoppedError)
    }

    /// Leaves the cluster gracefully and stops: marks the node draining, tells every member it
    /// is leaving (they report it as left, not failed), and returns within
    /// [`Timing::leave_timeout`].
    pub async fn leave(&self) -> Result<(), LeaveError> {
        let (reply, done) = oneshot::channel();
        if self.inner.inputs.send(Input::Leave(reply)).await.is_err() {
            return Err(LeaveError::Stopped);
        }
        let timeout = self.inner.timing.leave_timeout;
        let result = match tokio::time::timeout(timeout, done).await {
            Ok(_) => Ok(()),
            Err(_) => Err(LeaveError::Timeout { after: timeout }),
        };
        self.shutdown().await;
        result
    }

    /// Stops the node at once, without telling anyone: peers will detect it as failed.
    pub async fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        let task = self
            .inner
            .task
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    fn is_stopped(&self) -> bool {
        *self.inner.shutdown.borrow() || self.inner.inputs.is_closed()
    }
}

/// The membership task has stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the mesh has stopped")]
pub struct StoppedError;

/// [`Membership::leave`] did not complete cleanly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LeaveError {
    /// The node had already stopped.
    #[error("the mesh had already stopped")]
    Stopped,
    /// The leave did not finish in time; the node stopped anyway.
    #[error("leaving did not finish within {after:?}; the node stopped anyway")]
    Timeout {
        /// The bound that passed.
        after: Duration,
    },
}

/// A node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Binding the gossip socket failed.
    #[error("binding the gossip socket to {addr} failed: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The transport could not report its address.
    #[error("reading the gossip socket's local address failed: {0}")]
    LocalAddr(#[source] std::io::Error),
    /// Bound to `0.0.0.0`/`::` with no advertise address: peers would not know where to reach
    /// us.
    #[error(
        "the gossip socket is bound to {bind}, which peers cannot reach; set an advertise address"
    )]
    AdvertiseRequired {
        /// The bound address.
        bind: SocketAddr,
    },
    /// The timing is invalid.
    #[error(transparent)]
    Timing(#[from] TimingError),
    /// The initial state is invalid (tags, endpoint or size).
    #[error(transparent)]
    State(#[from] StateError),
    /// The cluster label is too long.
    #[error(
        "the cluster label is {len} bytes; a cluster label is at most {MAX_CLUSTER_LABEL_LEN} bytes"
    )]
    ClusterLabelTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// A cluster label was set without a keyring.
    #[error(
        "a cluster label needs a keyring: the label is authenticated as part of the encryption, \
         and plain datagrams do not carry it"
    )]
    ClusterLabelWithoutKeyring,
    /// No node id was given ([`MembershipBuilder::node_id`]).
    #[error("a node id is required (MembershipBuilder::node_id)")]
    MissingNodeId,
}

/// Configures and starts a [`Membership`].
///
/// Made by [`Membership::builder`], or empty with [`MembershipBuilder::default`] (then a node
/// id must be set before starting).
#[derive(Clone)]
#[must_use = "a builder does nothing until started"]
pub struct MembershipBuilder {
    node_id: Option<NodeId>,
    bind_addr: SocketAddr,
    advertise_addr: Option<SocketAddr>,
    timing: Timing,
    seeds: Vec<SocketAddr>,
    discovery: Option<Arc<dyn DynDiscover>>,
    fields: LocalFields,
    load: Option<LoadTracker>,
    max_concurrency: u32,
    generation: Option<u64>,
    rng_seed: Option<u64>,
    keyring: Option<Keyring>,
    cluster_label: String,
}

impl std::fmt::Debug for MembershipBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MembershipBuilder")
            .field("node_id", &self.node_id)
            .field("bind_addr", &self.bind_addr)
            .field("advertise_addr", &self.advertise_addr)
            .field("seeds", &self.seeds)
            .field("discovery", &self.discovery.is_some())
            .field("keyring", &self.keyring)
            .field("cluster_label", &self.cluster_label)
            .finish_non_exhaustive()
    }
}

/// The default gossip port (memberlist's).
pub const DEFAULT_GOSSIP_PORT: u16 = 7946;

impl Default for MembershipBuilder {
    fn default() -> Self {
        Self {
            node_id: None,
            bind_addr: SocketAddr::from(([0, 0, 0, 0], DEFAULT_GOSSIP_PORT)),
            advertise_addr: None,
            timing: Timing::lan(),
            seeds: Vec::new(),
            discovery: None,
            fields: LocalFields::default(),
            load: None,
            max_concurrency: DEFAULT_MAX_CONCURRENCY,
            generation: None,
            rng_seed: None,
            keyring: None,
            cluster_label: String::new(),
        }
    }
}

impl MembershipBuilder {
    /// The node's id (required; [`Membership::builder`] sets it).
    pub fn node_id(mut self, node_id: NodeId) -> Self {
        self.node_id = Some(node_id);
        self
    }

    /// Where the gossip socket binds. Default `0.0.0.0:7946`; use port 0 for an ephemeral port.
    pub fn bind_addr(mut self, addr: SocketAddr) -> Self {
        self.bind_addr = addr;
        self
    }

    /// The address peers reach us at, when it differs from the bound one (containers, NAT).
    /// Required when binding to an unspecified address such as `0.0.0.0`. Port 0 means the
    /// port the socket is bound to.
    pub fn advertise_addr(mut self, addr: SocketAddr) -> Self {
        self.advertise_addr = Some(addr);
        self
    }

    /// The IP peers reach this node at, if one is configured: the advertise address, else the
    /// bind address, unless it is unspecified (`0.0.0.0`, `::`).
    pub fn reachable_ip(&self) -> Option<IpAddr> {
        let ip = self.advertise_addr.unwrap_or(self.bind_addr).ip();
        (!ip.is_unspecified()).then_some(ip)
    }

    /// Timing preset; default [`Timing::lan`].
    pub fn timing(mut self, timing: Timing) -> Self {
        self.timing = timing;
        self
    }

    /// Gossip addresses to announce to at start and whenever the node is isolated.
    pub fn seeds(mut self, seeds: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.seeds.extend(seeds);
        self
    }

    /// A discovery source asked every [`Timing::discovery_interval`] (and more often while the
    /// node is isolated); every address that is not a member is announced to.
    pub fn discovery(self, discovery: impl DynDiscover) -> Self {
        self.discovery_dyn(Arc::new(discovery))
    }

    /// Like [`MembershipBuilder::discovery`], for a source chosen at run time.
    pub fn discovery_dyn(mut self, discovery: Arc<dyn DynDiscover>) -> Self {
        self.discovery = Some(discovery);
        self
    }

    /// The gRPC endpoint peers should forward calls to.
    pub fn grpc_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.fields.grpc_endpoint = Some(endpoint.into());
        self
    }

    /// Sets the gRPC endpoint only if none was set (for servers that learn their port late).
    pub fn default_grpc_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.fields
            .grpc_endpoint
            .get_or_insert_with(|| endpoint.into());
        self
    }

    /// Initial tags.
    pub fn tags(mut self, tags: Tags) -> Self {
        self.fields.tags = tags;
        self
    }

    /// Initial concurrency limit (default [`DEFAULT_MAX_CONCURRENCY`], 16); zero means the node
    /// takes no work from peers until it is raised.
    pub fn max_concurrency(mut self, max_concurrency: u32) -> Self {
        self.max_concurrency = max_concurrency;
        self
    }

    /// Start draining.
    pub fn draining(mut self, draining: bool) -> Self {
        self.fields.draining = draining;
        self
    }

    /// Use an existing load tracker (its concurrency limit wins over
    /// [`MembershipBuilder::max_concurrency`]).
    pub fn load_tracker(mut self, load: LoadTracker) -> Self {
        self.load = Some(load);
        self
    }

    /// Fix the identity generation instead of taking the wall clock (tests, simulations).
    pub fn generation(mut self, generation: u64) -> Self {
        self.generation = Some(generation);
        self
    }

    /// Seed every random choice (probe order, gossip targets) for reproducible simulations.
    pub fn rng_seed(mut self, seed: u64) -> Self {
        self.rng_seed = Some(seed);
        self
    }

    /// Encrypt and authenticate all gossip with `keyring` (see [`crate::keyring`]). Every
    /// member of a cluster needs a key in common and the same cluster label; a node with
    /// another key, or without one, cannot join, and its datagrams are counted in
    /// [`MeshStats::dropped_unauthenticated`]. Keys can be rotated while the node runs
    /// ([`Membership::install_key`]).
    pub fn keyring(mut self, keyring: Keyring) -> Self {
        self.keyring = Some(keyring);
        self
    }

    /// The cluster label, at most [`MAX_CLUSTER_LABEL_LEN`] bytes (default empty). It is
    /// authenticated with every datagram, never sent: nodes with different labels cannot
    /// talk even when they share a key, so one key can serve several clusters without them
    /// merging by mistake. Needs a [`MembershipBuilder::keyring`]; both are checked at start.
    pub fn cluster_label(mut self, label: impl Into<String>) -> Self {
        self.cluster_label = label.into();
        self
    }

    /// Binds a UDP socket and starts the node.
    pub async fn start(self) -> Result<Membership, StartError> {
        let addr = self.bind_addr;
        let socket = UdpTransport::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        self.start_with_transport(socket).await
    }

    /// Starts the node on a transport of your own (a simulated network, a pre-bound socket).
    pub async fn start_with_transport<T: Transport>(
        self,
        transport: T,
    ) -> Result<Membership, StartError> {
        let node_id = self.node_id.ok_or(StartError::MissingNodeId)?;
        self.timing.validate()?;
        self.fields.validate(&node_id)?;
        let label =
            ClusterLabel::new(&self.cluster_label).ok_or(StartError::ClusterLabelTooLong {
                len: self.cluster_label.len(),
            })?;
        if self.keyring.is_none() && !self.cluster_label.is_empty() {
            return Err(StartError::ClusterLabelWithoutKeyring);
        }
        let local_addr = transport.local_addr().map_err(StartError::LocalAddr)?;
        let advertise = match self.advertise_addr {
            Some(addr) if addr.port() == 0 => SocketAddr::new(addr.ip(), local_addr.port()),
            Some(addr) => addr,
            None if local_addr.ip().is_unspecified() => {
                return Err(StartError::AdvertiseRequired { bind: local_addr });
            }
            None => local_addr,
        };
        let identity = Identity::new(
            node_id.clone(),
            advertise,
            self.generation.unwrap_or_else(generation_now),
        );
        let load = self
            .load
            .unwrap_or_else(|| LoadTracker::new(self.max_concurrency));
        let shared = Arc::new(Shared::new(
            snapshot::initial(&identity),
            self.fields,
            load,
            EVENT_CAPACITY,
        ));
        let (inputs_tx, inputs_rx) = mpsc::channel(INPUT_CAPACITY);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let transport = Arc::new(transport);
        let keyring = self
            .keyring
            .map(|keyring| Arc::new(SharedKeyring::new(keyring)));
        let envelope = match &keyring {
            Some(keyring) => Envelope::encrypted(Arc::clone(keyring), label),
            None => Envelope::default(),
        };

        // Everything the node's tasks log carries its node id.
        let span = tracing::info_span!("mesh", node = %node_id);
        let receiver = tokio::spawn(
            receive_loop(
                Arc::clone(&transport),
                envelope.clone(),
                inputs_tx.clone(),
                Arc::clone(&shared),
            )
            .instrument(span.clone()),
        );
        let discovery = self.discovery.map(|discovery| {
            tokio::spawn(
                discovery_loop(
                    discovery,
                    self.timing.discovery_interval,
                    inputs_tx.clone(),
                    Arc::clone(&shared),
                )
                .instrument(span.clone()),
            )
        });

        let agent = Agent::new(AgentParts {
            identity,
            transport,
            local_addr,
            envelope,
            shared: Arc::clone(&shared),
            timing: self.timing.clone(),
            seeds: self.seeds,
            rng_seed: self.rng_seed,
        });
        let task = tokio::spawn(
            async move {
                agent.run(inputs_rx, shutdown_rx).await;
                receiver.abort();
                if let Some(discovery) = discovery {
                    discovery.abort();
                }
            }
            .instrument(span),
        );
        Ok(Membership {
            inner: Arc::new(Inner {
                shared,
                inputs: inputs_tx,
                shutdown: shutdown_tx,
                task: Mutex::new(Some(task)),
                local_addr,
                node_id,
                timing: self.timing,
                keyring,
            }),
        })
    }
}
