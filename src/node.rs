//! [`Node`]: one member of the mesh, started from code.

use std::{net::SocketAddr, sync::Arc};

use mesh_core::{
    Keyring, LeaveError, LoadTracker, Membership, MembershipBuilder, MembershipView, MeshEvent,
    NodeId, NodeIdError, StartError, Tags, Timing, Transport,
};
use mesh_discovery::DynDiscover;
use mesh_route::{ChannelConfig, Router, Strategy, WhenFull};
use tokio::sync::broadcast;

/// One member of the mesh: membership, load gossip, discovery and the router, started
/// together.
///
/// Cheap to clone. Built with [`Node::builder`].
#[derive(Debug, Clone)]
pub struct Node {
    membership: Membership,
    router: Router,
}

impl Node {
    /// Starts configuring a node.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    /// The membership handle: view, events, load, state setters.
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// The router: where calls should run, forwarding, operation owners.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        self.membership.node_id()
    }

    /// The address the gossip socket is bound to.
    pub fn gossip_addr(&self) -> SocketAddr {
        self.membership.local_addr()
    }

    /// The current membership snapshot (lock-free).
    pub fn view(&self) -> Arc<MembershipView> {
        self.membership.view()
    }

    /// Membership events from now on.
    pub fn events(&self) -> broadcast::Receiver<MeshEvent> {
        self.membership.events()
    }

    /// The load tracker whose task guards drive the gossiped load.
    pub fn load(&self) -> &LoadTracker {
        self.membership.load()
    }

    /// Leaves the cluster gracefully (peers report "left", not "failed") and stops.
    pub async fn leave(&self) -> Result<(), LeaveError> {
        self.membership.leave().await
    }

    /// Stops at once without telling peers.
    pub async fn shutdown(&self) {
        self.membership.shutdown().await;
    }
}

/// Configures a [`Node`]. Setters that can fail return `Result<Self, _>` so a bad value is
/// reported where it is set.
#[derive(Default)]
#[must_use = "a builder does nothing until started"]
pub struct NodeBuilder {
    node_id: Option<NodeId>,
    gossip_bind: Option<SocketAddr>,
    gossip_advertise: Option<SocketAddr>,
    grpc_endpoint: Option<String>,
    seeds: Vec<SocketAddr>,
    discovery: Option<Arc<dyn DynDiscover>>,
    timing: Option<Timing>,
    max_concurrency: u32,
    tags: Tags,
    load: Option<LoadTracker>,
    rng_seed: Option<u64>,
    keyring: Option<Keyring>,
    cluster_label: String,
    strategy: Option<Arc<dyn Strategy>>,
    channel_config: Option<ChannelConfig>,
    max_state_age: Option<std::time::Duration>,
    when_full: WhenFull,
}

impl std::fmt::Debug for NodeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeBuilder")
            .field("node_id", &self.node_id)
            .field("gossip_bind", &self.gossip_bind)
            .field("gossip_advertise", &self.gossip_advertise)
            .field("grpc_endpoint", &self.grpc_endpoint)
            .field("seeds", &self.seeds)
            .finish_non_exhaustive()
    }
}

impl NodeBuilder {
    /// The node's id: 1-63 characters of `[A-Za-z0-9._-]`. Required.
    pub fn node_id(mut self, node_id: impl AsRef<str>) -> Result<Self, NodeIdError> {
        self.node_id = Some(NodeId::new(node_id)?);
        Ok(self)
    }

    /// Where the gossip socket binds (default `0.0.0.0:7946`).
    pub fn gossip_bind(mut self, addr: SocketAddr) -> Self {
        self.gossip_bind = Some(addr);
        self
    }

    /// The gossip address peers use, when it differs from the bound one. A port of 0 means
    /// the port the socket is bound to.
    pub fn gossip_advertise(mut self, addr: SocketAddr) -> Self {
        self.gossip_advertise = Some(addr);
        self
    }

    /// The gRPC endpoint peers forward calls to, e.g. `http://10.0.0.7:50051`.
    pub fn grpc_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.grpc_endpoint = Some(endpoint.into());
        self
    }

    /// The IP peers reach this node at, if one is configured (the gossip advertise address,
    /// else the bind address unless it is unspecified): a server that binds its gRPC port on
    /// `0.0.0.0` advertises this IP with its port.
    pub fn reachable_ip(&self) -> Option<std::net::IpAddr> {
        self.gossip_advertise
            .or(self.gossip_bind)
            .map(|addr| addr.ip())
            .filter(|ip| !ip.is_unspecified())
    }

    /// Sets the gRPC endpoint only if none was set (used by servers that learn their port late).
    pub fn default_grpc_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        if self.grpc_endpoint.is_none() {
            self.grpc_endpoint = Some(endpoint.into());
        }
        self
    }

    /// Gossip addresses to join through.
    pub fn seeds(mut self, seeds: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.seeds.extend(seeds);
        self
    }

    /// A discovery source (static list, DNS) polled for the node's whole life.
    pub fn discovery(mut self, discovery: impl DynDiscover) -> Self {
        self.discovery = Some(Arc::new(discovery));
        self
    }

    /// Timing preset (default [`Timing::lan`]).
    pub fn timing(mut self, timing: Timing) -> Self {
        self.timing = Some(timing);
        self
    }

    /// How many tasks this node runs at once.
    pub fn max_concurrency(mut self, max_concurrency: u32) -> Self {
        self.max_concurrency = max_concurrency;
        self
    }

    /// Platform properties advertised to routers.
    pub fn tags(mut self, tags: Tags) -> Self {
        self.tags = tags;
        self
    }

    /// Share an existing load tracker (for example one the executor already holds).
    pub fn load_tracker(mut self, load: LoadTracker) -> Self {
        self.load = Some(load);
        self
    }

    /// Seed every random choice (gossip targets, probe order, and the default strategy's tie
    /// breaks), for reproducible simulations.
    pub fn rng_seed(mut self, seed: u64) -> Self {
        self.rng_seed = Some(seed);
        self
    }

    /// Encrypt and authenticate all gossip with `keyring` (see [`mesh_core::keyring`]): nodes
    /// without a key in common cannot join, read or inject.
    pub fn keyring(mut self, keyring: Keyring) -> Self {
        self.keyring = Some(keyring);
        self
    }

    /// A label authenticated with every datagram (needs a keyring): clusters with different
    /// labels cannot talk even when they share a key.
    pub fn cluster_label(mut self, label: impl Into<String>) -> Self {
        self.cluster_label = label.into();
        self
    }

    /// The routing strategy (default [`mesh_route::LeastLoaded`]).
    pub fn strategy(mut self, strategy: impl Strategy) -> Self {
        self.strategy = Some(Arc::new(strategy));
        self
    }

    /// How forwarding channels to peers connect.
    pub fn channel_config(mut self, config: ChannelConfig) -> Self {
        self.channel_config = Some(config);
        self
    }

    /// Peers whose state is older than this are not routed to (default: four state refresh
    /// intervals).
    pub fn max_state_age(mut self, age: std::time::Duration) -> Self {
        self.max_state_age = Some(age);
        self
    }

    /// What the router does when every node is full (default [`WhenFull::Wait`]).
    pub fn when_full(mut self, when_full: WhenFull) -> Self {
        self.when_full = when_full;
        self
    }

    /// Starts the node: binds the gossip socket, starts membership, discovery and the router.
    pub async fn start(self) -> Result<Node, NodeError> {
        let (membership, router) = self.split()?;
        let membership = membership.start().await?;
        Ok(router.finish(membership))
    }

    /// Starts the node on a datagram transport of your own instead of binding a UDP socket
    /// (a simulated network, a pre-bound socket); [`NodeBuilder::gossip_bind`] is then unused.
    pub async fn start_with_transport<T: Transport>(self, transport: T) -> Result<Node, NodeError> {
        let (membership, router) = self.split()?;
        let membership = membership.start_with_transport(transport).await?;
        Ok(router.finish(membership))
    }

    /// The membership half of the configuration, and what the router needs once it runs.
    fn split(self) -> Result<(MembershipBuilder, RouterParts), NodeError> {
        let node_id = self.node_id.ok_or(NodeError::MissingNodeId)?;
        let mut builder = Membership::builder(node_id)
            .timing(self.timing.unwrap_or_default())
            .seeds(self.seeds)
            .max_concurrency(self.max_concurrency)
            .tags(self.tags);
        if let Some(addr) = self.gossip_bind {
            builder = builder.bind_addr(addr);
        }
        if let Some(addr) = self.gossip_advertise {
            builder = builder.advertise_addr(addr);
        }
        if let Some(endpoint) = self.grpc_endpoint {
            builder = builder.grpc_endpoint(endpoint);
        }
        if let Some(discovery) = self.discovery {
            builder = builder.discovery_dyn(discovery);
        }
        if let Some(load) = self.load {
            builder = builder.load_tracker(load);
        }
        if let Some(seed) = self.rng_seed {
            builder = builder.rng_seed(seed);
        }
        if let Some(keyring) = self.keyring {
            builder = builder.keyring(keyring);
        }
        if !self.cluster_label.is_empty() {
            builder = builder.cluster_label(self.cluster_label);
        }
        let strategy = match (self.strategy, self.rng_seed) {
            (Some(strategy), _) => Some(strategy),
            // A seeded node makes seeded routing decisions too.
            (None, Some(seed)) => {
                Some(Arc::new(mesh_route::LeastLoaded::with_seed(seed)) as Arc<dyn Strategy>)
            }
            (None, None) => None,
        };
        Ok((
            builder,
            RouterParts {
                strategy,
                channel_config: self.channel_config,
                max_state_age: self.max_state_age,
                when_full: self.when_full,
            },
        ))
    }
}

/// The router's part of a [`NodeBuilder`], applied once the membership runs.
struct RouterParts {
    strategy: Option<Arc<dyn Strategy>>,
    channel_config: Option<ChannelConfig>,
    max_state_age: Option<std::time::Duration>,
    when_full: WhenFull,
}

impl RouterParts {
    fn finish(self, membership: Membership) -> Node {
        let mut router = Router::builder(membership.clone()).when_full(self.when_full);
        if let Some(strategy) = self.strategy {
            router = router.strategy_arc(strategy);
        }
        if let Some(config) = self.channel_config {
            router = router.channel_config(config);
        }
        if let Some(age) = self.max_state_age {
            router = router.max_state_age(age);
        }
        Node {
            router: router.build(),
            membership,
        }
    }
}

/// A [`Node`] could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// No node id was given.
    #[error("a node id is required (NodeBuilder::node_id)")]
    MissingNodeId,
    /// The membership layer could not start.
    #[error(transparent)]
    Start(#[from] StartError),
}
