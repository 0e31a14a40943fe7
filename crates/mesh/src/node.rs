//! [`Node`]: one member of the mesh, started from code.
//!
//! # Addresses, by one name each
//!
//! A node has two sockets, and every layer names them the same way: *gossip* (UDP, the
//! membership) and *gRPC* (the server the route layer forwards to), each with a *bind* address
//! (where the socket listens) and an *advertise* address (where peers reach it):
//!
//! | socket | `[mesh]` keys | [`NodeBuilder`] | running |
//! |---|---|---|---|
//! | gossip bind | `bind_addr`, `bind_port` | `gossip_bind` | [`Node::gossip_addr`] |
//! | gossip advertise | `advertise_addr`, `advertise_port` | `gossip_advertise` | its identity |
//! | gRPC bind | `bind_addr`, `grpc_port` | (the server's own) | |
//! | gRPC advertise | `grpc_advertise_addr` | `grpc_endpoint` | gossiped `grpc_endpoint` |
//!
//! The unprefixed configuration keys are the gossip socket's, as in memberlist and serf
//! (`BindAddr`, `AdvertiseAddr`); the configuration resolves them into
//! [`ResolvedConfig::gossip_bind`](crate::config::ResolvedConfig::gossip_bind) and
//! `gossip_advertise`. Below the facade, `mesh_core::MembershipBuilder` *is* the gossip layer,
//! so its setters drop the prefix (`bind_addr`, `advertise_addr`) and the running membership
//! reports its bound socket as `local_addr`, as a socket does.

use std::{net::SocketAddr, sync::Arc, time::Duration};

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
///
/// The membership half is a [`MembershipBuilder`] (its setters are passed straight through, or
/// start from one with [`NodeBuilder::from_membership`]); the rest configures the router.
#[derive(Default)]
#[must_use = "a builder does nothing until started"]
pub struct NodeBuilder {
    membership: MembershipBuilder,
    rng_seed: Option<u64>,
    strategy: Option<Arc<dyn Strategy>>,
    channel_config: Option<ChannelConfig>,
    max_state_age: Option<Duration>,
    when_full: WhenFull,
}

impl std::fmt::Debug for NodeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeBuilder")
            .field("membership", &self.membership)
            .field("strategy", &self.strategy)
            .field("when_full", &self.when_full)
            .finish_non_exhaustive()
    }
}

/// Setters that hand their value to the inner [`MembershipBuilder`]'s setter of the same name
/// (see there for the details of each).
macro_rules! membership_setters {
    ($( $(#[$doc:meta])* $name:ident => $inner:ident($value:ident: $ty:ty); )*) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, $value: $ty) -> Self {
                self.membership = self.membership.$inner($value);
                self
            }
        )*
    };
}

impl NodeBuilder {
    /// A node whose membership is configured by `membership` (with its node id, or set one
    /// with [`NodeBuilder::node_id`]).
    pub fn from_membership(membership: MembershipBuilder) -> Self {
        Self {
            membership,
            ..Self::default()
        }
    }

    /// The node's id: 1-63 characters of `[A-Za-z0-9._-]`. Required.
    pub fn node_id(mut self, node_id: impl AsRef<str>) -> Result<Self, NodeIdError> {
        self.membership = self.membership.node_id(NodeId::new(node_id)?);
        Ok(self)
    }

    membership_setters! {
        /// Where the gossip socket binds (default `0.0.0.0:7946`).
        gossip_bind => bind_addr(addr: SocketAddr);
        /// The gossip address peers use, when it differs from the bound one. A port of 0 means
        /// the port the socket is bound to.
        gossip_advertise => advertise_addr(addr: SocketAddr);
        /// The gRPC endpoint peers forward calls to, e.g. `http://10.0.0.7:50051`.
        grpc_endpoint => grpc_endpoint(endpoint: impl Into<String>);
        /// Sets the gRPC endpoint only if none was set (used by servers that learn their port
        /// late).
        default_grpc_endpoint => default_grpc_endpoint(endpoint: impl Into<String>);
        /// Gossip addresses to join through.
        seeds => seeds(seeds: impl IntoIterator<Item = SocketAddr>);
        /// A discovery source (static list, DNS) polled for the node's whole life.
        discovery => discovery(discovery: impl DynDiscover);
        /// Timing preset (default [`Timing::lan`]).
        timing => timing(timing: Timing);
        /// How many tasks this node runs at once (default
        /// [`mesh_core::DEFAULT_MAX_CONCURRENCY`], 16).
        max_concurrency => max_concurrency(max_concurrency: u32);
        /// Platform properties advertised to routers.
        tags => tags(tags: Tags);
        /// Share an existing load tracker (for example one the executor already holds).
        load_tracker => load_tracker(load: LoadTracker);
        /// Encrypt and authenticate all gossip with `keyring` (see [`mesh_core::keyring`]):
        /// nodes without a key in common cannot join, read or inject.
        keyring => keyring(keyring: Keyring);
        /// A label authenticated with every datagram (needs a keyring): clusters with different
        /// labels cannot talk even when they share a key.
        cluster_label => cluster_label(label: impl Into<String>);
    }

    /// Seed every random choice (gossip targets, probe order, and the default strategy's tie
    /// breaks), for reproducible simulations.
    pub fn rng_seed(mut self, seed: u64) -> Self {
        self.membership = self.membership.rng_seed(seed);
        self.rng_seed = Some(seed);
        self
    }

    /// The IP peers reach this node at, if one is configured (the gossip advertise address,
    /// else the bind address unless it is unspecified): a server that binds its gRPC port on
    /// `0.0.0.0` advertises this IP with its port.
    pub fn reachable_ip(&self) -> Option<std::net::IpAddr> {
        self.membership.reachable_ip()
    }

    /// The routing strategy (default [`mesh_route::LeastLoaded`]).
    pub fn strategy(self, strategy: impl Strategy) -> Self {
        self.strategy_arc(Arc::new(strategy))
    }

    /// Like [`NodeBuilder::strategy`], for a strategy chosen at run time.
    pub fn strategy_arc(mut self, strategy: Arc<dyn Strategy>) -> Self {
        self.strategy = Some(strategy);
        self
    }

    /// How forwarding channels to peers connect.
    pub fn channel_config(mut self, config: ChannelConfig) -> Self {
        self.channel_config = Some(config);
        self
    }

    /// Stamps every call to a peer with `credential` (see [`ChannelConfig::credential`]),
    /// keeping the rest of the channel configuration. Call it after
    /// [`NodeBuilder::channel_config`], which replaces the whole configuration.
    pub fn peer_credential(mut self, credential: mesh_route::PeerCredential) -> Self {
        let config = self.channel_config.take().unwrap_or_default();
        self.channel_config = Some(config.credential(credential));
        self
    }

    /// Peers whose state is older than this are not routed to (default: four state refresh
    /// intervals).
    pub fn max_state_age(mut self, age: Duration) -> Self {
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
        let (membership, router) = self.split();
        Ok(router.finish(membership.start().await?))
    }

    /// Starts the node on a datagram transport of your own instead of binding a UDP socket
    /// (a simulated network, a pre-bound socket); [`NodeBuilder::gossip_bind`] is then unused.
    pub async fn start_with_transport<T: Transport>(self, transport: T) -> Result<Node, NodeError> {
        let (membership, router) = self.split();
        Ok(router.finish(membership.start_with_transport(transport).await?))
    }

    /// The membership half of the configuration, and what the router needs once it runs.
    fn split(self) -> (MembershipBuilder, RouterParts) {
        let strategy = match (self.strategy, self.rng_seed) {
            (Some(strategy), _) => Some(strategy),
            // A seeded node makes seeded routing decisions too.
            (None, Some(seed)) => {
                Some(Arc::new(mesh_route::LeastLoaded::with_seed(seed)) as Arc<dyn Strategy>)
            }
            (None, None) => None,
        };
        (
            self.membership,
            RouterParts {
                strategy,
                channel_config: self.channel_config,
                max_state_age: self.max_state_age,
                when_full: self.when_full,
            },
        )
    }
}

/// The router's part of a [`NodeBuilder`], applied once the membership runs.
struct RouterParts {
    strategy: Option<Arc<dyn Strategy>>,
    channel_config: Option<ChannelConfig>,
    max_state_age: Option<Duration>,
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
    Start(StartError),
}

impl From<StartError> for NodeError {
    fn from(error: StartError) -> Self {
        match error {
            StartError::MissingNodeId => NodeError::MissingNodeId,
            other => NodeError::Start(other),
        }
    }
}
