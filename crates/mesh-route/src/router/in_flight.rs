//! Optimistic accounting: the calls this node placed on each peer that the peer's gossiped
//! state may not count yet.
//!
//! Gossip tells every router a peer's load a little late, and every router then sees the same
//! "least loaded" peer until the next version arrives: a burst arriving at one node would all go
//! to that peer (the herd behaviour Mitzenmacher describes for stale load information, "How
//! Useful Is Old Information?", IEEE TPDS 2000). So a call counts against its peer from the
//! moment it is placed until a version of the peer's state that includes it arrives; the
//! placement adds these calls to each candidate's gossiped pending tasks.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
};

use mesh_core::{Member, MembershipView, NodeId, NodeState};

use crate::peer::PeerTarget;

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
pub(super) struct InFlight(Arc<Mutex<HashMap<NodeId, Outstanding>>>);

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

pub(super) struct InFlightGuard<'a>(MutexGuard<'a, HashMap<NodeId, Outstanding>>);

impl InFlight {
    pub(super) fn lock(&self) -> InFlightGuard<'_> {
        InFlightGuard(self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Counts a call placed on `target` against it.
    pub(super) fn placed(&self, view: &MembershipView, target: &PeerTarget) {
        if let Some(state) = view.get(target.node_id().as_str()).and_then(Member::state) {
            self.lock().record(state);
        }
    }

    /// `target` answered a call placed on it, or the call ended without an answer (see
    /// [`InFlightGuard::answered`]).
    pub(super) fn answered(
        &self,
        view: &MembershipView,
        target: &PeerTarget,
        counted_from: Option<(u64, u64)>,
    ) {
        if let Some(state) = view.get(target.node_id().as_str()).and_then(Member::state) {
            self.lock().answered(state, counted_from);
        }
    }

    /// Takes back a call placed on `target` that never reached it.
    pub(super) fn never_arrived(&self, target: &PeerTarget) {
        self.lock().release(target.node_id());
    }

    /// Forgets every call counted against `node`, whose life ended.
    pub(super) fn forget(&self, node: &NodeId) {
        self.lock().forget(node);
    }
}

impl InFlightGuard<'_> {
    /// The calls counted against `state`'s peer that `state` may not include yet.
    pub(super) fn extra(&self, state: &NodeState) -> u32 {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn state(node: &str, version: u64) -> NodeState {
        NodeState::new(NodeId::new(node).unwrap(), 1, version)
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
