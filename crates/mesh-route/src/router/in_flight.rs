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
///   state has long included it);
/// * and once a call has ended at the peer (its trailers name the first version that no
///   longer counts it, [`COUNTED_UNTIL`](crate::COUNTED_UNTIL)), it stops counting at once,
///   and is *taken off* the versions that still count it, from its
///   [`COUNTED_FROM`](crate::COUNTED_FROM) version up to that one. Without this, a call much
///   shorter than the peer's publication interval kept a slot of the peer for that interval
///   after it ended, and a peer with 8 slots publishing every 20 ms could take at most 400
///   calls a second from one router, idle most of the time.
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
    /// For each ended call: the versions that count it although it has ended, `[from,
    /// until)`.
    ended: Vec<(u64, u64)>,
}

/// How a call that answered is counted: what [`InFlight::ended`] needs to take it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Answered {
    generation: u64,
    /// The last version of the peer's state that does not count the call (the peer named the
    /// next one in [`COUNTED_FROM`](crate::COUNTED_FROM)).
    last_uncounted: u64,
}

impl Outstanding {
    /// Calls the peer's state at `version` does not count yet, less ended calls it still
    /// counts.
    fn counted(&self, version: u64) -> i64 {
        let unanswered = self
            .unanswered
            .iter()
            .filter(|&&placed| version <= placed.saturating_add(1));
        let answered = self.answered.iter().filter(|&&seen| version <= seen);
        let ended = self
            .ended
            .iter()
            .filter(|&&(from, until)| from <= version && version < until);
        let plus = i64::try_from(unanswered.count() + answered.count()).unwrap_or(i64::MAX);
        let minus = i64::try_from(ended.count()).unwrap_or(i64::MAX);
        plus - minus
    }

    /// Forgets calls the peer's state at `version` already includes, and ended calls it no
    /// longer counts.
    fn prune(&mut self, version: u64) {
        self.unanswered
            .retain(|&placed| version <= placed.saturating_add(1));
        self.answered.retain(|&seen| version <= seen);
        self.ended.retain(|&(_, until)| version < until);
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
    /// [`InFlightGuard::answered`]). With the peer's `counted_from`, returns what
    /// [`InFlight::ended`] takes when the call ends.
    pub(super) fn answered(
        &self,
        view: &MembershipView,
        target: &PeerTarget,
        counted_from: Option<(u64, u64)>,
    ) -> Option<Answered> {
        let state = view
            .get(target.node_id().as_str())
            .and_then(Member::state)?;
        self.lock().answered(state, counted_from)
    }

    /// A call that answered as `answered` has ended at `target`, whose state no longer counts
    /// it from `counted_until` on (the peer's [`COUNTED_UNTIL`](crate::COUNTED_UNTIL)).
    pub(super) fn ended(
        &self,
        view: &MembershipView,
        target: &PeerTarget,
        answered: Answered,
        counted_until: (u64, u64),
    ) {
        if let Some(state) = view.get(target.node_id().as_str()).and_then(Member::state) {
            self.lock().ended(state, answered, counted_until);
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
    /// The calls counted against `state`'s peer that `state` may not include yet, less the
    /// ended calls it still counts: what to add to its pending tasks (never below zero in
    /// all, see [`InFlightGuard::pending`]).
    pub(super) fn extra(&self, state: &NodeState) -> i64 {
        self.0
            .get(&state.node_id)
            .filter(|o| o.generation == state.generation)
            .map_or(0, |o| o.counted(state.version))
    }

    /// `state`'s pending tasks with the calls this router knows of added and taken off.
    pub(super) fn pending(&self, state: &NodeState) -> u32 {
        let pending = i64::from(state.pending).saturating_add(self.extra(state));
        u32::try_from(pending.max(0)).unwrap_or(u32::MAX)
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
    fn answered(
        &mut self,
        state: &NodeState,
        counted_from: Option<(u64, u64)>,
    ) -> Option<Answered> {
        let (last_uncounted, stamped) = match counted_from {
            Some((generation, version)) if generation == state.generation => {
                (version.saturating_sub(1), true)
            }
            _ => (state.version, false),
        };
        let entry = self.entry(state);
        if !entry.unanswered.is_empty() {
            entry.unanswered.remove(0);
        }
        entry.answered.push(last_uncounted);
        stamped.then_some(Answered {
            generation: state.generation,
            last_uncounted,
        })
    }

    /// The call that answered as `answered` ended; the peer's state counts it up to, not
    /// including, `counted_until`.
    fn ended(&mut self, state: &NodeState, answered: Answered, counted_until: (u64, u64)) {
        let (generation, until) = counted_until;
        if generation != state.generation || answered.generation != state.generation {
            return;
        }
        let entry = self.entry(state);
        if let Some(index) = entry
            .answered
            .iter()
            .position(|&seen| seen == answered.last_uncounted)
        {
            entry.answered.swap_remove(index);
        }
        let from = answered.last_uncounted.saturating_add(1);
        if from < until && state.version < until {
            entry.ended.push((from, until));
        }
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

    fn with_pending(node: &str, version: u64, pending: u32) -> NodeState {
        let mut state = state(node, version);
        state.pending = pending;
        state
    }

    #[test]
    fn an_ended_call_is_taken_off_the_versions_that_still_count_it() {
        // Two short calls: the peer counts them from v4 and, once they end, no longer from v6.
        let in_flight = InFlight::default();
        let v3 = with_pending("b", 3, 0);
        let mut answers = Vec::new();
        for _ in 0..2 {
            in_flight.lock().record(&v3);
            answers.push(
                in_flight
                    .lock()
                    .answered(&v3, Some((v3.generation, 4)))
                    .expect("a stamped answer"),
            );
        }
        assert_eq!(in_flight.lock().pending(&v3), 2, "running, not in v3");
        in_flight.lock().ended(&v3, answers[0], (v3.generation, 6));
        assert_eq!(in_flight.lock().pending(&v3), 1, "one ended, one runs");
        // v4 and v5 count both calls; one of them has ended.
        assert_eq!(in_flight.lock().pending(&with_pending("b", 4, 2)), 1);
        assert_eq!(in_flight.lock().pending(&with_pending("b", 5, 2)), 1);
        // v6 no longer counts the ended call: nothing to take off.
        assert_eq!(in_flight.lock().pending(&with_pending("b", 6, 1)), 1);
        // Never below zero, whatever the states say.
        in_flight.lock().ended(&v3, answers[1], (v3.generation, 9));
        assert_eq!(in_flight.lock().pending(&with_pending("b", 7, 0)), 0);
        // A stamp of another life changes nothing.
        let before = in_flight.lock().extra(&with_pending("b", 7, 0));
        in_flight
            .lock()
            .ended(&v3, answers[1], (v3.generation + 1, 20));
        assert_eq!(in_flight.lock().extra(&with_pending("b", 7, 0)), before);
    }

    #[test]
    fn an_answer_without_a_stamp_cannot_be_taken_back_early() {
        let in_flight = InFlight::default();
        let v3 = state("b", 3);
        in_flight.lock().record(&v3);
        assert_eq!(in_flight.lock().answered(&v3, None), None);
        assert_eq!(in_flight.lock().extra(&v3), 1);
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
