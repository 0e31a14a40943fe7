//! The router: where each call should run, from the membership view and a strategy's choice.
//!
//! A [`Router`] is a few components, each in a file of its own and owning its state, which the
//! router calls with what each needs (the membership, the accounting):
//!
//! * `placement` — the candidates, their effective load and the strategy's pick; the choice is
//!   counted against its node at once ([`Placement`]);
//! * `in_flight` — optimistic accounting: calls placed on a peer that its gossiped state may
//!   not count yet;
//! * `held` — calls waiting while every node is full ([`WhenFull::Wait`], late binding);
//! * `departures` — tells a relay when the peer life it relays from ends;
//! * `housekeeping` — a task that follows membership events and lets go of departed peers'
//!   channels and accounting;
//! * `stats` — the decisions by outcome ([`RouterStats`]).
//!
//! The route layer ([`crate::layer`]) forwards the calls the router places on peers and tells
//! it how they went (answered, or never arrived), through the crate-private methods here.

mod departures;
mod held;
mod housekeeping;
mod in_flight;
mod placement;
mod stats;

pub(crate) use in_flight::Answered;

use std::{sync::Arc, time::Duration};

use mesh_core::{Membership, NodeId};
use tokio::{sync::watch, task::JoinHandle};
use tonic::metadata::MetadataMap;

pub use held::WhenFull;
pub use placement::{Placement, Route};
pub use stats::RouterStats;

use self::{
    departures::Departures, held::HeldCalls, housekeeping::housekeeping, in_flight::InFlight,
    placement::Placer, stats::Decisions,
};
use crate::{
    channels::{ChannelConfig, PeerChannels},
    error::RouteError,
    headers::ForwardedBy,
    operation::OperationId,
    peer::{PeerCall, PeerTarget},
    select::{LeastLoaded, RouteRequest, Strategy},
};

/// Chooses where calls run; the [route layer](crate::layer) forwards them. Cheap to clone.
///
/// ```no_run
/// use mesh_route::{Route, RouteRequest, Router};
///
/// # fn demo(membership: mesh_core::Membership) -> Result<(), mesh_route::RouteError> {
/// let router = Router::builder(membership)
///     .strategy(mesh_route::LeastLoaded::new())
///     .build();
/// match router.route(&RouteRequest::new().require_tag("os", "linux"))? {
///     Route::Local => { /* run it here */ }
///     Route::Peer(peer) => println!("forward to {} at {}", peer.node_id(), peer.endpoint()),
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    membership: Membership,
    /// The strategy and the calls placed here that have not started yet.
    placer: Placer,
    in_flight: InFlight,
    departures: Departures,
    channels: PeerChannels,
    /// Stamps every call to a peer (forwarded by the layer, or made through [`Router::peer`]).
    forwarded_by: ForwardedBy,
    when_full: WhenFull,
    /// Calls waiting for capacity under [`WhenFull::Wait`], queued per class of requirements.
    held: HeldCalls,
    decisions: Decisions,
    housekeeping: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.housekeeping.abort();
    }
}

/// Configures a [`Router`].
#[derive(Debug)]
#[must_use = "a builder does nothing until built"]
pub struct RouterBuilder {
    membership: Membership,
    strategy: Arc<dyn Strategy>,
    max_state_age: Option<Duration>,
    channels: ChannelConfig,
    when_full: WhenFull,
}

impl RouterBuilder {
    /// What to do when every candidate is full (default [`WhenFull::Wait`]).
    pub fn when_full(mut self, when_full: WhenFull) -> Self {
        self.when_full = when_full;
        self
    }

    /// The selection strategy (default [`LeastLoaded`]).
    pub fn strategy(mut self, strategy: impl Strategy) -> Self {
        self.strategy = Arc::new(strategy);
        self
    }

    /// The selection strategy, shared.
    pub fn strategy_arc(mut self, strategy: Arc<dyn Strategy>) -> Self {
        self.strategy = strategy;
        self
    }

    /// Peers whose state has not been confirmed for longer than this are not routed to.
    /// Default: four refresh rounds — four times the time a node's anti-entropy refresh takes
    /// to reach every peer (`state_refresh_interval × ceil((members − 1) / state_push_fanout)`),
    /// so the limit grows with the cluster instead of declaring idle peers of a large cluster
    /// stale.
    pub fn max_state_age(mut self, age: Duration) -> Self {
        self.max_state_age = Some(age);
        self
    }

    /// How peer channels connect.
    pub fn channel_config(mut self, config: ChannelConfig) -> Self {
        self.channels = config;
        self
    }

    /// Builds the router and starts its housekeeping task (channel eviction), which stops when
    /// the router is dropped. Must be called inside a tokio runtime.
    pub fn build(self) -> Router {
        let channels = PeerChannels::new(self.channels);
        let in_flight = InFlight::default();
        let departures = Departures::default();
        let housekeeping = tokio::spawn(housekeeping(
            self.membership.events(),
            self.membership.clone(),
            channels.clone(),
            in_flight.clone(),
            departures.clone(),
        ));
        Router {
            inner: Arc::new(Inner {
                forwarded_by: ForwardedBy::new(self.membership.node_id())
                    .with_credential(channels.credential().cloned()),
                membership: self.membership,
                placer: Placer::new(self.strategy, self.max_state_age),
                in_flight,
                departures,
                channels,
                when_full: self.when_full,
                held: HeldCalls::default(),
                decisions: Decisions::default(),
                housekeeping,
            }),
        }
    }
}

impl Router {
    /// Starts configuring a router over `membership`.
    pub fn builder(membership: Membership) -> RouterBuilder {
        RouterBuilder {
            membership,
            strategy: Arc::new(LeastLoaded::new()),
            max_state_age: None,
            channels: ChannelConfig::default(),
            when_full: WhenFull::default(),
        }
    }

    /// The membership this router reads.
    pub fn membership(&self) -> &Membership {
        &self.inner.membership
    }

    /// The peer channel cache.
    pub fn channels(&self) -> &PeerChannels {
        &self.inner.channels
    }

    /// The strategy in use.
    pub fn strategy(&self) -> &dyn Strategy {
        self.inner.placer.strategy()
    }

    /// Calls held now under [`WhenFull::Wait`], waiting for a free slot.
    pub fn held_calls(&self) -> usize {
        self.inner.held.total()
    }

    /// A new operation owned by this node.
    pub fn new_operation(&self) -> OperationId {
        OperationId::new(self.inner.membership.node_id().clone())
    }

    /// Where a call with these requirements should run now.
    pub fn route(&self, request: &RouteRequest) -> Result<Route, RouteError> {
        self.route_excluding(request, &[])
    }

    /// Like [`Router::route`], never choosing a node in `excluded`.
    pub fn route_excluding(
        &self,
        request: &RouteRequest,
        excluded: &[NodeId],
    ) -> Result<Route, RouteError> {
        let route = self.decide(request, excluded).map(|(route, _)| route);
        self.inner.decisions.count(route.as_ref());
        route
    }

    /// The routing decisions made so far, by outcome.
    pub fn stats(&self) -> RouterStats {
        self.inner.decisions.snapshot()
    }

    /// Places a call: routes it like [`Router::route_excluding`] and counts it against the
    /// chosen node at once, so the calls placed after it see that slot taken (a peer's count
    /// lasts until its next state version, which includes the call; a local one lasts as long
    /// as the returned [`Placement`], which the caller keeps until the call has started and
    /// counts itself).
    ///
    /// Under [`WhenFull::Wait`] the call is held while every candidate is full, until a slot
    /// frees somewhere. Held calls are served in arrival order within their class of
    /// requirements (the required tags); a class never waits behind another.
    pub async fn route_when_available(
        &self,
        request: &RouteRequest,
        excluded: &[NodeId],
    ) -> Result<Placement, RouteError> {
        let inner = &*self.inner;
        let placement = if inner.when_full == WhenFull::RunLocally {
            self.decide(request, excluded)
                .map(|(route, _)| self.claim(route))
        } else {
            self.hold_until_available(request, excluded).await
        };
        inner
            .decisions
            .count(placement.as_ref().map(Placement::route));
        placement
    }

    /// [`Router::route_when_available`]'s wait, uncounted.
    async fn hold_until_available(
        &self,
        request: &RouteRequest,
        excluded: &[NodeId],
    ) -> Result<Placement, RouteError> {
        let inner = &*self.inner;
        let class = request.required_tags();
        let attempt = || {
            let (route, has_capacity) = self.decide(request, excluded)?;
            Ok(has_capacity.then(|| self.claim(route)))
        };
        // Fast path, unless calls of the same class are already held (they go first).
        if !inner.held.any_waiting(class)
            && let Some(placement) = attempt()?
        {
            return Ok(placement);
        }
        inner.decisions.count_held();
        inner.held.hold(class, &inner.membership, attempt).await
    }

    /// The route and whether the chosen node has a free slot.
    fn decide(
        &self,
        request: &RouteRequest,
        excluded: &[NodeId],
    ) -> Result<(Route, bool), RouteError> {
        let inner = &*self.inner;
        inner
            .placer
            .decide(&inner.membership, &inner.in_flight, request, excluded)
    }

    /// Counts a routing decision against its node (see [`Router::route_when_available`]).
    fn claim(&self, route: Route) -> Placement {
        let inner = &*self.inner;
        inner
            .placer
            .claim(&inner.membership, &inner.in_flight, route)
    }

    /// `target` answered a call placed on it (its response head arrived), or the call ended
    /// without an answer. With `counted_from` (the peer's `(generation, version)` from
    /// [`COUNTED_FROM`](crate::COUNTED_FROM)) the call counts until that version of the peer's
    /// state; without it, until a version newer than the one we have now.
    pub(crate) fn forward_answered(
        &self,
        target: &PeerTarget,
        counted_from: Option<(u64, u64)>,
    ) -> Option<Answered> {
        let inner = &*self.inner;
        inner
            .in_flight
            .answered(&inner.membership.view(), target, counted_from)
    }

    /// A call forwarded to `target` that answered as `answered` has ended, and the peer's
    /// state no longer counts it from `counted_until` on (its
    /// [`COUNTED_UNTIL`](crate::COUNTED_UNTIL) trailer): the versions before that stop
    /// counting it here too.
    pub(crate) fn forward_ended(
        &self,
        target: &PeerTarget,
        answered: Answered,
        counted_until: (u64, u64),
    ) {
        let inner = &*self.inner;
        inner
            .in_flight
            .ended(&inner.membership.view(), target, answered, counted_until);
    }

    /// Takes back the count of a call placed on `target` that never reached the peer.
    pub(crate) fn unrecord_forward(&self, target: &PeerTarget) {
        self.inner.in_flight.never_arrived(target);
    }

    /// Stamps every call to a peer: [`FORWARDED_BY`](crate::FORWARDED_BY) and the cluster's
    /// credential.
    pub(crate) fn forwarded_by(&self) -> &ForwardedBy {
        &self.inner.forwarded_by
    }

    /// A receiver whose `changed()` fails once the life of `target` has ended; `None` if it
    /// already has.
    pub(crate) fn watch_departure(&self, target: &PeerTarget) -> Option<watch::Receiver<()>> {
        self.inner
            .departures
            .watch(target.node_id(), target.generation())
    }

    /// The live peer `node` as a forwarding target.
    fn peer_target(&self, node: &NodeId) -> Result<PeerTarget, RouteError> {
        let view = self.inner.membership.view();
        let not_a_peer = || RouteError::NotAPeer { node: node.clone() };
        let member = view
            .get(node.as_str())
            .filter(|member| !member.is_local())
            .ok_or_else(not_a_peer)?;
        let unreachable = |message: &str| RouteError::OwnerUnreachable {
            node: node.clone(),
            endpoint: String::new(),
            message: message.to_owned(),
        };
        let state = member
            .state()
            .ok_or_else(|| unreachable("its state has not arrived yet"))?;
        PeerTarget::from_member(member, state)
            .ok_or_else(|| unreachable("it advertises no grpc endpoint"))
    }

    /// A call to one chosen peer, for the embedder's own peer-to-peer requests (fetching a
    /// blob from the replica that holds it, asking a peer what it has). The channel stamps
    /// [`FORWARDED_BY`](crate::FORWARDED_BY), so the peer answers from what it has itself and
    /// never passes the call on; `metadata` is propagated like a forwarded call's.
    ///
    /// Fails with [`RouteError::NotAPeer`] when `node` is this node or not a live member, and
    /// with [`RouteError::OwnerUnreachable`] when it has no usable gRPC endpoint yet.
    pub fn peer(&self, node: &NodeId, metadata: &MetadataMap) -> Result<PeerCall, RouteError> {
        let target = self.peer_target(node)?;
        let channel = self.inner.channels.get(&target)?;
        Ok(PeerCall::new(
            target,
            channel,
            self.inner.forwarded_by.clone(),
            metadata,
        ))
    }

    /// Who owns an operation: this node, or a reachable peer. `NOT_FOUND` (as a
    /// [`RouteError::UnknownOwner`]) when the owner is not a member.
    pub fn owner(&self, operation: &OperationId) -> Result<Route, RouteError> {
        if operation.node() == self.inner.membership.node_id() {
            return Ok(Route::Local);
        }
        self.peer_target(operation.node())
            .map(Route::Peer)
            .map_err(|error| match error {
                RouteError::NotAPeer { .. } => RouteError::UnknownOwner {
                    operation: operation.clone(),
                },
                other => other,
            })
    }
}
