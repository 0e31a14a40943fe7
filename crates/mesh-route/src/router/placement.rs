//! Placement: the node a call should run on, counted against that node at once.
//!
//! `Placer::decide` builds the candidates from the lock-free membership view: this node and
//! every peer that carries the required tags, is alive, not draining, not excluded, advertises
//! a gRPC endpoint and whose state was confirmed recently (a stale entry is distrusted). Each
//! candidate's load is *effective*: a peer's gossiped pending tasks plus the calls this node
//! placed on it that its state may not count yet (see `in_flight`), this node's pending tasks
//! plus the calls placed here that have not started. The [`Strategy`] then picks one — least
//! loaded, power of two choices (Mitzenmacher, "The Power of Two Choices in Randomized Load
//! Balancing", 2001), rendezvous hashing with bounded load, … (see [`crate::select`]).
//!
//! `Placer::claim` counts the choice against its node before the call leaves, so the calls
//! placed after it see the slot taken.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use mesh_core::{Member, Membership, NodeId, NodeState, PeerStatus};

use super::in_flight::InFlight;
use crate::{
    error::RouteError,
    peer::PeerTarget,
    select::{Candidate, RouteRequest, Strategy},
};

/// Where a call should run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Here.
    Local,
    /// On a peer.
    Peer(PeerTarget),
}

/// A call placed by [`Router::route_when_available`](crate::Router::route_when_available):
/// where it runs, counted against that node until the call counts itself.
///
/// For a peer, the count lasts until the peer's next state version (optimistic accounting);
/// if the call then never reaches the peer, the router takes the count back itself when the
/// route layer fails to connect to the peer. For this node, the count lasts as long as the
/// `Placement`: keep it until the call has started (holds its task guard), so calls placed
/// meanwhile do not take the same slot.
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

/// Chooses the node for a call and claims its slot; holds the strategy and the calls placed
/// here that have not started yet.
#[derive(Debug)]
pub(super) struct Placer {
    strategy: Arc<dyn Strategy>,
    /// Fixed by the builder, or `None` for the default that scales with the cluster.
    max_state_age: Option<Duration>,
    /// Calls placed here that have not yet started (see [`Placement`]).
    local_claims: Arc<AtomicU32>,
}

impl Placer {
    pub(super) fn new(strategy: Arc<dyn Strategy>, max_state_age: Option<Duration>) -> Self {
        Self {
            strategy,
            max_state_age,
            local_claims: Arc::default(),
        }
    }

    /// The strategy in use.
    pub(super) fn strategy(&self) -> &dyn Strategy {
        &*self.strategy
    }

    /// The route and whether the chosen node has a free slot.
    pub(super) fn decide(
        &self,
        membership: &Membership,
        in_flight: &InFlight,
        request: &RouteRequest,
        excluded: &[NodeId],
    ) -> Result<(Route, bool), RouteError> {
        let view = membership.view();
        let load = membership.load();
        let local_fallback;
        let local_state: &NodeState = match view.local().state() {
            Some(state) => state,
            None => {
                local_fallback = NodeState::new(view.local().node_id().clone(), 0, 0);
                &local_fallback
            }
        };
        let max_state_age = self
            .max_state_age
            .unwrap_or_else(|| default_max_state_age(membership.timing(), view.len()));
        let in_flight = in_flight.lock();
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
                pending: in_flight.pending(state),
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
                        .saturating_add(self.local_claims.load(Ordering::Acquire)),
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
        let index = self.strategy.pick(&candidates, request);
        let chosen = candidates.get(index).unwrap_or(&candidates[0]);
        tracing::debug!(
            strategy = self.strategy.name(),
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

    /// Counts a routing decision against its node (see [`Placement`]).
    pub(super) fn claim(
        &self,
        membership: &Membership,
        in_flight: &InFlight,
        route: Route,
    ) -> Placement {
        let local = match &route {
            Route::Local => {
                self.local_claims.fetch_add(1, Ordering::AcqRel);
                Some(LocalClaim(Arc::clone(&self.local_claims)))
            }
            Route::Peer(target) => {
                in_flight.placed(&membership.view(), target);
                None
            }
        };
        Placement {
            route,
            _local: local,
        }
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
