//! The router: candidates from the membership view, a strategy's choice, optimistic
//! accounting, and channel housekeeping driven by membership events.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use mesh_core::{
    Member, Membership, MembershipView, MeshEvent, NodeId, NodeState, PeerStatus, Tags,
};
use tokio::{
    sync::{broadcast, watch},
    task::JoinHandle,
};
use tonic::metadata::MetadataMap;

use crate::{
    Candidate, ChannelConfig, LeastLoaded, OperationId, PeerChannels, RouteError, RouteRequest,
    Strategy,
    headers::ForwardedBy,
    peer::{PeerCall, PeerTarget},
};

/// Where a call should run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Here.
    Local,
    /// On a peer.
    Peer(PeerTarget),
}

/// What the router does when every candidate is at its concurrency limit.
///
/// The difference is large for bursts: 600 actions sent to one of five nodes finish in 1.17×
/// the ideal time with `Wait` and 8.7× with `RunLocally`, which leaves 95% of the burst queued
/// on the entry node (see BENCHMARKS.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WhenFull {
    /// Hold the call at the router, in arrival order, until a node anywhere has a free slot,
    /// then route it (late binding). A burst then drains across the whole cluster at the
    /// speed capacity frees. The call's deadline still applies.
    #[default]
    Wait,
    /// Run the call locally (the seed server's rule): it queues in the local executor and the
    /// client feels the backpressure there. Simple, but a burst that arrives while the cluster
    /// is full stays on the entry node even after peers free up.
    RunLocally,
}

/// A call placed by [`Router::route_when_available`]: where it runs, counted against that
/// node until the call counts itself.
///
/// For a peer, the count lasts until the peer's next state version (optimistic accounting);
/// if the call then never reaches the peer, the router takes the count back itself when the
/// route layer fails to connect to the peer. For this node, the
/// count lasts as long as the `Placement`: keep it until the call has started (holds its task
/// guard), so calls placed meanwhile do not take the same slot.
#[derive(Debug)]
#[must_use = "dropping a placement frees the slot it holds on this node"]
pub struct Placement {
    route: Route,
    _local: Option<LocalClaim>,
}

impl Placement {
    /// Where the call runs.
    pub fn route(&self) -> &Route {
        &self.route
    }
}

/// A slot of this node claimed by a placed call that has not started yet.
#[derive(Debug)]
struct LocalClaim(Arc<AtomicU32>);

impl Drop for LocalClaim {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Chooses where calls run and forwards them. Cheap to clone.
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
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) membership: Membership,
    strategy: Arc<dyn Strategy>,
    /// Fixed by the builder, or `None` for the default that scales with the cluster.
    max_state_age: Option<Duration>,
    in_flight: InFlight,
    pub(crate) departures: Departures,
    pub(crate) channels: PeerChannels,
    pub(crate) forwarded_by: ForwardedBy,
    when_full: WhenFull,
    /// Calls waiting for capacity under [`WhenFull::Wait`], queued per class of requirements.
    held: HeldCalls,
    /// Calls placed here that have not yet started (see [`Placement`]).
    local_claims: Arc<AtomicU32>,
    decisions: Decisions,
    housekeeping: JoinHandle<()>,
}

/// Routing decisions by outcome ([`Router::stats`]); each call's final decision counts once,
/// however often a held call was re-checked. Also exported as
/// `mesh_route_decisions_total{outcome}` and `mesh_route_held_total`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RouterStats {
    /// Calls routed to this node.
    pub local: u64,
    /// Calls routed to a peer.
    pub peer: u64,
    /// Calls refused because no member has the required tags.
    pub no_matching_node: u64,
    /// Calls refused because every matching member was draining, stale or excluded.
    pub no_available_node: u64,
    /// Calls held under [`WhenFull::Wait`] because every candidate was full.
    pub held: u64,
}

impl RouterStats {
    /// The decision outcomes with their metric label, in a stable order (`held` is not an
    /// outcome: a held call is counted again when it is routed).
    pub fn outcomes(&self) -> [(&'static str, u64); 4] {
        [
            ("local", self.local),
            ("peer", self.peer),
            ("no_matching_node", self.no_matching_node),
            ("no_available_node", self.no_available_node),
        ]
    }
}

#[derive(Debug, Default)]
struct Decisions {
    local: AtomicU64,
    peer: AtomicU64,
    no_matching_node: AtomicU64,
    no_available_node: AtomicU64,
    held: AtomicU64,
}

impl Decisions {
    fn count(&self, route: Result<&Route, &RouteError>) {
        let (counter, outcome) = match route {
            Ok(Route::Local) => (&self.local, "local"),
            Ok(Route::Peer(_)) => (&self.peer, "peer"),
            Err(RouteError::NoMatchingNode { .. }) => (&self.no_matching_node, "no_matching_node"),
            Err(_) => (&self.no_available_node, "no_available_node"),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("mesh_route_decisions_total", "outcome" => outcome).increment(1);
    }

    fn snapshot(&self) -> RouterStats {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        RouterStats {
            local: read(&self.local),
            peer: read(&self.peer),
            no_matching_node: read(&self.no_matching_node),
            no_available_node: read(&self.no_available_node),
            held: read(&self.held),
        }
    }
}

/// Calls held under [`WhenFull::Wait`], one queue per class of requirements (the required
/// tags): arrival order within a class, and no blocking across classes, so a call only a busy
/// `pool=gpu` node can take never holds back a call an idle linux node could run now.
#[derive(Debug, Default)]
struct HeldCalls {
    /// Calls held in every class; lets the common case (nobody waiting) skip the map.
    total: AtomicUsize,
    classes: Mutex<HashMap<Tags, HeldClass>>,
}

#[derive(Debug, Default)]
struct HeldClass {
    /// Calls of this class held now (entered and not yet routed or cancelled).
    waiting: usize,
    /// tokio's mutex is fair: waiters get their turn in arrival order.
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl HeldCalls {
    fn lock(&self) -> MutexGuard<'_, HashMap<Tags, HeldClass>> {
        self.classes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether calls of this class are held (they go first).
    fn any_waiting(&self, class: &Tags) -> bool {
        self.total.load(Ordering::Acquire) != 0 && self.lock().contains_key(class)
    }

    /// Joins the queue of `class`; the ticket leaves it when dropped (also on cancellation).
    fn enter<'a>(&'a self, class: &Tags) -> HeldTicket<'a> {
        let mut classes = self.lock();
        let held = classes.entry(class.clone()).or_default();
        held.waiting += 1;
        let turn = held.turn.clone();
        self.total.fetch_add(1, Ordering::AcqRel);
        HeldTicket {
            calls: self,
            class: class.clone(),
            turn,
        }
    }
}

/// A held call's place in its class's queue.
struct HeldTicket<'a> {
    calls: &'a HeldCalls,
    class: Tags,
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for HeldTicket<'_> {
    fn drop(&mut self) {
        let mut classes = self.calls.lock();
        if let Some(held) = classes.get_mut(&self.class) {
            held.waiting -= 1;
            if held.waiting == 0 {
                classes.remove(&self.class);
            }
        }
        self.calls.total.fetch_sub(1, Ordering::AcqRel);
    }
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
        let max_state_age = self.max_state_age;
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
                strategy: self.strategy,
                max_state_age,
                in_flight,
                departures,
                channels,
                when_full: self.when_full,
                held: HeldCalls::default(),
                local_claims: Arc::default(),
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
        &*self.inner.strategy
    }

    /// Calls held now under [`WhenFull::Wait`], waiting for a free slot.
    pub fn held_calls(&self) -> usize {
        self.inner.held.total.load(Ordering::Acquire)
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
        // Fast path, unless calls of the same class are already held (they go first).
        if !inner.held.any_waiting(class) {
            let (route, has_capacity) = self.decide(request, excluded)?;
            if has_capacity {
                return Ok(self.claim(route));
            }
        }
        inner.decisions.held.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("mesh_route_held_total").increment(1);
        let ticket = inner.held.enter(class);
        let _turn = ticket.turn.lock().await;
        let membership = &inner.membership;
        let mut freed_here = membership.load().slot_freed();
        let recheck = membership
            .timing()
            .state_publish_interval
            .max(Duration::from_millis(10));
        loop {
            let seen = membership.view().epoch();
            freed_here.mark_unchanged();
            let (route, has_capacity) = self.decide(request, excluded)?;
            if has_capacity {
                return Ok(self.claim(route));
            }
            // A slot frees when a peer's new state arrives or a local task ends (at once,
            // without waiting for our own state to be published); re-check on a timer as
            // well, for forwarded calls whose accounting we hold.
            let _ = tokio::time::timeout(recheck, async {
                tokio::select! {
                    _ = membership.wait_until(|v| v.epoch() != seen) => {}
                    _ = freed_here.changed() => {}
                }
            })
            .await;
        }
    }

    /// Counts a routing decision against its node (see [`Router::route_when_available`]).
    fn claim(&self, route: Route) -> Placement {
        let local = match &route {
            Route::Local => {
                self.inner.local_claims.fetch_add(1, Ordering::AcqRel);
                Some(LocalClaim(Arc::clone(&self.inner.local_claims)))
            }
            Route::Peer(target) => {
                self.record_forward(target);
                None
            }
        };
        Placement {
            route,
            _local: local,
        }
    }

    /// The route and whether the chosen node has a free slot.
    fn decide(
        &self,
        request: &RouteRequest,
        excluded: &[NodeId],
    ) -> Result<(Route, bool), RouteError> {
        let inner = &*self.inner;
        let view = inner.membership.view();
        let load = inner.membership.load();
        let local_fallback;
        let local_state: &NodeState = match view.local().state() {
            Some(state) => state,
            None => {
                local_fallback = NodeState::new(view.local().node_id().clone(), 0, 0);
                &local_fallback
            }
        };
        let max_state_age = inner
            .max_state_age
            .unwrap_or_else(|| default_max_state_age(inner.membership.timing(), view.len()));
        let in_flight = inner.in_flight.lock();
        let mut candidates: Vec<Candidate<'_>> = Vec::with_capacity(view.len());
        let local_matches = request.is_satisfied_by(local_state);
        let mut any_match = local_matches;
        for peer in view.peers() {
            // A peer that has the tags but cannot take calls now (suspect, stale) still
            // matches: the call gets UNAVAILABLE (retry), not FAILED_PRECONDITION.
            if !peer
                .state()
                .is_some_and(|state| request.is_satisfied_by(state))
            {
                continue;
            }
            any_match = true;
            let Some(state) = usable_state(peer, max_state_age) else {
                continue;
            };
            if state.draining || excluded.contains(peer.node_id()) {
                continue;
            }
            candidates.push(Candidate {
                node_id: peer.node_id(),
                local: false,
                pending: state.pending.saturating_add(in_flight.extra(state)),
                max_concurrency: state.max_concurrency,
                state,
            });
        }
        drop(in_flight);
        if local_matches && !local_state.draining {
            // Peers come sorted by node id from the view; keep the order strategies rely on.
            let local_id = view.local().node_id();
            let at = candidates.partition_point(|c| c.node_id < local_id);
            candidates.insert(
                at,
                Candidate {
                    node_id: local_id,
                    local: true,
                    pending: load
                        .pending()
                        .saturating_add(inner.local_claims.load(Ordering::Acquire)),
                    max_concurrency: load.max_concurrency(),
                    state: local_state,
                },
            );
        }
        if candidates.is_empty() {
            return Err(if any_match {
                RouteError::NoAvailableNode {
                    tried: excluded.to_vec(),
                }
            } else {
                RouteError::NoMatchingNode {
                    required: request.required_tags().clone(),
                }
            });
        }
        let index = inner.strategy.pick(&candidates, request);
        let chosen = candidates.get(index).unwrap_or(&candidates[0]);
        tracing::debug!(
            strategy = inner.strategy.name(),
            chosen = %chosen.node_id,
            local = chosen.local,
            pending = chosen.pending,
            max = chosen.max_concurrency,
            candidates = candidates.len(),
            "routing decision"
        );
        let has_capacity = chosen.has_capacity();
        if chosen.local {
            return Ok((Route::Local, has_capacity));
        }
        let member =
            view.get(chosen.node_id.as_str())
                .ok_or_else(|| RouteError::NoAvailableNode {
                    tried: excluded.to_vec(),
                })?;
        PeerTarget::from_member(member, chosen.state)
            .map(|target| (Route::Peer(target), has_capacity))
            .ok_or_else(|| RouteError::NoAvailableNode {
                tried: excluded.to_vec(),
            })
    }

    /// Counts a call placed on `target` against it (see [`InFlight`]).
    pub(crate) fn record_forward(&self, target: &PeerTarget) {
        let view = self.inner.membership.view();
        if let Some(state) = view.get(target.node_id().as_str()).and_then(Member::state) {
            self.inner.in_flight.lock().record(state);
        }
    }

    /// `target` answered a call placed on it (its response head arrived), or the call ended
    /// without an answer. With `counted_from` (the peer's `(generation, version)` from
    /// [`COUNTED_FROM`](crate::COUNTED_FROM)) the call counts until that version of the peer's
    /// state; without it, until a version newer than the one we have now.
    pub(crate) fn forward_answered(&self, target: &PeerTarget, counted_from: Option<(u64, u64)>) {
        let view = self.inner.membership.view();
        if let Some(state) = view.get(target.node_id().as_str()).and_then(Member::state) {
            self.inner.in_flight.lock().answered(state, counted_from);
        }
    }

    /// Takes back a [`Router::record_forward`] for a call that never reached the peer.
    pub(crate) fn unrecord_forward(&self, target: &PeerTarget) {
        self.inner.in_flight.lock().release(target.node_id());
    }

    /// The live peer `node` as a forwarding target.
    pub(crate) fn peer_target(&self, node: &NodeId) -> Result<PeerTarget, RouteError> {
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

/// Four refresh rounds: a node re-sends its state to `state_push_fanout` peers per
/// `state_refresh_interval`, in turn, so one round reaches every peer of `members`.
fn default_max_state_age(timing: &mesh_core::Timing, members: usize) -> Duration {
    let peers = members.saturating_sub(1).max(1);
    let rounds = peers.div_ceil(timing.state_push_fanout.get());
    timing.state_refresh_interval * 4 * u32::try_from(rounds).unwrap_or(u32::MAX)
}

/// The state of a peer we may route to: alive, known, fresh, reachable.
fn usable_state(peer: &Member, max_age: Duration) -> Option<&NodeState> {
    if peer.status() != PeerStatus::Alive {
        return None;
    }
    let state = peer.state()?;
    state.grpc_endpoint.as_ref()?;
    if peer.age().is_none_or(|age| age > max_age) {
        return None;
    }
    Some(state)
}

/// Calls placed on each peer that its gossiped state may not count yet (optimistic
/// accounting).
///
/// Between two gossip updates every router sees the same "least loaded" peer; without this,
/// a burst arriving at one node would all go to that peer. A call counts against its peer from
/// the moment it is placed:
///
/// * until the peer answers it (its response head arrives: the peer has taken the call and
///   counts it in its own load) and then until a state version *newer than the one we had
///   when it answered* arrives, which includes it;
/// * but a call still unanswered stops counting once the peer has published two versions
///   since it was placed (a long unary call answers only when it ends, and by then the peer's
///   state has long included it).
///
/// Counting only "until the peer's next version" (the first version of this rule) let a
/// version published while calls were still on the wire wipe them out, and a peer then got
/// more calls than it had slots.
#[derive(Debug, Clone, Default)]
struct InFlight(Arc<Mutex<HashMap<NodeId, Outstanding>>>);

#[derive(Debug, Default)]
struct Outstanding {
    generation: u64,
    /// For each call not answered yet: the peer's version when it was placed.
    unanswered: Vec<u64>,
    /// For each answered call: the peer's newest version we knew when it answered.
    answered: Vec<u64>,
}

impl Outstanding {
    fn counted(&self, version: u64) -> u32 {
        let unanswered = self
            .unanswered
            .iter()
            .filter(|&&placed| version <= placed.saturating_add(1));
        let answered = self.answered.iter().filter(|&&seen| version <= seen);
        u32::try_from(unanswered.count() + answered.count()).unwrap_or(u32::MAX)
    }

    /// Forgets calls the peer's state at `version` already includes.
    fn prune(&mut self, version: u64) {
        self.unanswered
            .retain(|&placed| version <= placed.saturating_add(1));
        self.answered.retain(|&seen| version <= seen);
    }
}

struct InFlightGuard<'a>(MutexGuard<'a, HashMap<NodeId, Outstanding>>);

impl InFlight {
    fn lock(&self) -> InFlightGuard<'_> {
        InFlightGuard(self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl InFlightGuard<'_> {
    fn extra(&self, state: &NodeState) -> u32 {
        self.0
            .get(&state.node_id)
            .filter(|o| o.generation == state.generation)
            .map_or(0, |o| o.counted(state.version))
    }

    /// The entry of `state`'s peer life, pruned to what its `state` may not include.
    fn entry(&mut self, state: &NodeState) -> &mut Outstanding {
        let entry = self.0.entry(state.node_id.clone()).or_default();
        if entry.generation != state.generation {
            *entry = Outstanding {
                generation: state.generation,
                ..Outstanding::default()
            };
        }
        entry.prune(state.version);
        entry
    }

    fn record(&mut self, state: &NodeState) {
        self.entry(state).unanswered.push(state.version);
    }

    /// The peer answered a call (or the call ended without a word): its state counts it from
    /// the version the peer named (`counted_from`, same generation), or else from the next
    /// version on.
    fn answered(&mut self, state: &NodeState, counted_from: Option<(u64, u64)>) {
        let last_uncounted = match counted_from {
            Some((generation, version)) if generation == state.generation => {
                version.saturating_sub(1)
            }
            _ => state.version,
        };
        let entry = self.entry(state);
        if !entry.unanswered.is_empty() {
            entry.unanswered.remove(0);
        }
        entry.answered.push(last_uncounted);
    }

    /// A call that never reached the peer.
    fn release(&mut self, node: &NodeId) {
        if let Some(entry) = self.0.get_mut(node)
            && !entry.unanswered.is_empty()
        {
            entry.unanswered.remove(0);
        }
    }

    fn forget(&mut self, node: &NodeId) {
        self.0.remove(node);
    }
}

/// Evicts channels and accounting of peers that failed, left, were replaced or moved.
async fn housekeeping(
    mut events: broadcast::Receiver<MeshEvent>,
    membership: Membership,
    channels: PeerChannels,
    in_flight: InFlight,
    departures: Departures,
) {
    loop {
        match events.recv().await {
            Ok(
                MeshEvent::Failed(gone)
                | MeshEvent::Left(gone)
                | MeshEvent::Rejoined { previous: gone, .. },
            ) => {
                if channels.evict_life(gone.node_id(), gone.generation()) {
                    tracing::debug!(peer = %gone, "dropped the channel of a departed peer life");
                }
                in_flight.lock().forget(gone.node_id());
                departures.depart(gone.node_id(), gone.generation());
            }
            Ok(MeshEvent::Updated(state)) => {
                channels.evict_if_moved(&state.node_id, state.grpc_endpoint.as_deref());
            }
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                // Events were lost: fall back to the view, which is always authoritative.
                tracing::debug!(
                    missed,
                    "router housekeeping lagged; resyncing with the view"
                );
                let view = membership.view();
                resync(&view, &channels);
                departures.resync(&view);
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Tells whoever relays a peer's responses when that peer life ends, without each relay
/// reading the whole event stream (every load update of the cluster) to find out.
#[derive(Debug, Clone, Default)]
pub(crate) struct Departures(Arc<Mutex<DeparturesInner>>);

#[derive(Debug, Default)]
struct DeparturesInner {
    /// One sender per watched node, for the generation being watched; dropping it is the
    /// signal.
    watched: HashMap<NodeId, (u64, watch::Sender<()>)>,
    /// The newest generation of each node known to have ended, so a watch started just after
    /// the departure is not missed.
    ended: HashMap<NodeId, u64>,
}

impl Departures {
    fn lock(&self) -> MutexGuard<'_, DeparturesInner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A receiver whose `changed()` fails once the life `generation` of `node` has ended;
    /// `None` if it already has.
    pub(crate) fn watch(&self, node: &NodeId, generation: u64) -> Option<watch::Receiver<()>> {
        let mut inner = self.lock();
        if inner
            .ended
            .get(node)
            .is_some_and(|&ended| ended >= generation)
        {
            return None;
        }
        let (watched, sender) = inner
            .watched
            .entry(node.clone())
            .or_insert_with(|| (generation, watch::channel(()).0));
        if *watched < generation {
            *watched = generation;
        }
        Some(sender.subscribe())
    }

    fn depart(&self, node: &NodeId, generation: u64) {
        let mut inner = self.lock();
        let ended = inner.ended.entry(node.clone()).or_insert(generation);
        *ended = (*ended).max(generation);
        if inner
            .watched
            .get(node)
            .is_some_and(|(watched, _)| *watched <= generation)
        {
            inner.watched.remove(node);
        }
    }

    /// After lost events: every watched node missing from the view has departed.
    fn resync(&self, view: &MembershipView) {
        self.lock()
            .watched
            .retain(|node, _| view.get(node.as_str()).is_some());
    }
}

fn resync(view: &MembershipView, channels: &PeerChannels) {
    channels.retain(|node| view.get(node.as_str()).is_some_and(|m| !m.is_local()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(node: &str, version: u64) -> NodeState {
        NodeState::new(NodeId::new(node).unwrap(), 1, version)
    }

    #[tokio::test]
    async fn departures_signal_the_end_of_one_life_only() {
        let departures = Departures::default();
        let node = NodeId::new("b").unwrap();
        let mut watching = departures.watch(&node, 5).unwrap();
        // The end of an older life does not end this one.
        departures.depart(&node, 4);
        assert!(watching.has_changed().is_ok(), "still alive");
        departures.depart(&node, 5);
        assert!(
            watching.changed().await.is_err(),
            "the watch ends with the life"
        );
        // Watching a life that already ended is refused; a newer life can be watched.
        assert!(departures.watch(&node, 5).is_none());
        assert!(departures.watch(&node, 6).is_some());
    }

    #[test]
    fn the_default_staleness_limit_grows_with_the_refresh_round() {
        let lan = mesh_core::Timing::lan();
        let refresh = lan.state_refresh_interval;
        assert_eq!(lan.state_push_fanout.get(), 64);
        assert_eq!(default_max_state_age(&lan, 1), refresh * 4);
        assert_eq!(default_max_state_age(&lan, 65), refresh * 4);
        assert_eq!(default_max_state_age(&lan, 66), refresh * 8);
        assert_eq!(default_max_state_age(&lan, 1_000), refresh * 4 * 16);
    }

    #[test]
    fn a_call_counts_until_a_version_after_its_answer() {
        let in_flight = InFlight::default();
        let v1 = state("b", 1);
        in_flight.lock().record(&v1);
        in_flight.lock().record(&v1);
        assert_eq!(in_flight.lock().extra(&v1), 2);
        // A version published while the calls were on the wire does not count them yet.
        let v2 = state("b", 2);
        assert_eq!(in_flight.lock().extra(&v2), 2);
        // The peer answers one at v2: a version after v2 includes it.
        in_flight.lock().answered(&v2, None);
        assert_eq!(in_flight.lock().extra(&v2), 2);
        let v3 = state("b", 3);
        assert_eq!(
            in_flight.lock().extra(&v3),
            0,
            "answered and included; the unanswered one has seen two versions"
        );
        // A call that never reached the peer is taken back.
        in_flight.lock().record(&v3);
        assert_eq!(in_flight.lock().extra(&v3), 1);
        in_flight.lock().release(&v3.node_id);
        assert_eq!(in_flight.lock().extra(&v3), 0);
        // A new life starts from nothing.
        in_flight.lock().record(&v3);
        let reborn = NodeState::new(NodeId::new("b").unwrap(), 2, 1);
        assert_eq!(in_flight.lock().extra(&reborn), 0);
        in_flight.lock().forget(&v3.node_id);
        assert_eq!(in_flight.lock().0.len(), 0);
    }

    #[test]
    fn an_answered_call_counts_until_the_version_its_peer_named() {
        // The burst's first call made the peer publish v2 at once (pending 1); the rest were
        // answered while we still had v1. v2 does not include them: the peer said v4 would.
        let in_flight = InFlight::default();
        let v1 = state("b", 1);
        for _ in 0..3 {
            in_flight.lock().record(&v1);
        }
        for _ in 0..3 {
            in_flight.lock().answered(&v1, Some((v1.generation, 4)));
        }
        assert_eq!(in_flight.lock().extra(&state("b", 2)), 3);
        assert_eq!(in_flight.lock().extra(&state("b", 3)), 3);
        assert_eq!(
            in_flight.lock().extra(&state("b", 4)),
            0,
            "v4 counts them itself"
        );
        // A stamp from another life of the peer is ignored: the next version counts the call.
        let v5 = state("b", 5);
        in_flight.lock().record(&v5);
        in_flight
            .lock()
            .answered(&v5, Some((v5.generation + 1, 50)));
        assert_eq!(in_flight.lock().extra(&v5), 1);
        assert_eq!(in_flight.lock().extra(&state("b", 6)), 0);
    }
}
