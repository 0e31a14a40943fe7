//! View assembly: the immutable [`MembershipView`] readers get, built from foca's members and
//! the state table after every change.
//!
//! A peer appears when foca counts it active (alive or suspect), with the state of *that* life
//! if we hold one (a state of another generation is not attached), and how long ago it was
//! refreshed. Our own node id is ours alone, and if two lives of one node id are both active for
//! a moment (a restart at a new address), only the newest appears: the router never sees two
//! owners of a name.

use std::sync::Arc;

use tokio::time::Instant;

use crate::{
    Identity, LocalStatus, NodeState,
    store::StateStore,
    view::{Member, MembershipView, PeerStatus},
};

/// The view before any peer is known.
pub(crate) fn initial(identity: &Identity) -> MembershipView {
    MembershipView {
        local: local_member(identity.clone(), None, None),
        peers: Vec::new(),
        status: LocalStatus::Joining,
        epoch: 0,
    }
}

fn local_member(
    identity: Identity,
    state: Option<Arc<NodeState>>,
    refreshed_at: Option<Instant>,
) -> Member {
    Member {
        identity,
        status: PeerStatus::Alive,
        state,
        refreshed_at,
        local: true,
    }
}

/// Whether the view is out of date, and the epoch of the next one.
#[derive(Debug)]
pub(crate) struct Snapshots {
    epoch: u64,
    dirty: bool,
}

/// What a view is assembled from.
pub(crate) struct Sources<'a, M> {
    /// Our identity and our published state.
    pub(crate) local: &'a Identity,
    pub(crate) local_state: Option<Arc<NodeState>>,
    /// foca's active members with their SWIM state.
    pub(crate) members: M,
    pub(crate) store: &'a StateStore,
    pub(crate) status: LocalStatus,
}

impl Snapshots {
    /// Out of date from the start: the first view is published at once.
    pub(crate) fn new() -> Self {
        Self {
            epoch: 0,
            dirty: true,
        }
    }

    /// Something readers can see changed.
    pub(crate) fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// Whether a new view is due; clears the mark.
    pub(crate) fn take_dirty(&mut self) -> bool {
        std::mem::replace(&mut self.dirty, false)
    }

    /// The next view, as of `now`.
    pub(crate) fn assemble<'a, M>(
        &mut self,
        sources: Sources<'a, M>,
        now: Instant,
    ) -> MembershipView
    where
        M: Iterator<Item = (&'a Identity, foca::State)>,
    {
        let Sources {
            local,
            local_state,
            members,
            store,
            status,
        } = sources;
        let mut peers: Vec<Member> = members
            // Never two owners of one name: our own id is ours.
            .filter(|(id, _)| id.node_id() != local.node_id())
            .map(|(id, swim)| {
                let entry = store
                    .get(id.node_id())
                    .filter(|e| e.state.generation == id.generation());
                Member {
                    identity: id.clone(),
                    status: match swim {
                        foca::State::Suspect => PeerStatus::Suspect,
                        _ => PeerStatus::Alive,
                    },
                    state: entry.map(|e| Arc::clone(&e.state)),
                    refreshed_at: entry.map(|e| e.refreshed_at),
                    local: false,
                }
            })
            .collect();
        // If two lives of one node id are momentarily both active, keep the newest.
        peers.sort_by(|a, b| {
            a.node_id()
                .cmp(b.node_id())
                .then(b.identity.generation().cmp(&a.identity.generation()))
        });
        peers.dedup_by(|later, first| later.node_id() == first.node_id());
        self.epoch += 1;
        MembershipView {
            local: local_member(local.clone(), local_state, Some(now)),
            peers,
            status,
            epoch: self.epoch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::runtime::testing::identity as id;
    use super::*;
    use crate::NodeId;

    fn state(name: &str, generation: u64, pending: u32) -> Arc<NodeState> {
        let mut state = NodeState::new(NodeId::new(name).unwrap(), generation, 1);
        state.max_concurrency = 4;
        state.pending = pending;
        Arc::new(state)
    }

    fn assemble(
        snapshots: &mut Snapshots,
        members: &[(Identity, foca::State)],
        store: &StateStore,
        now: Instant,
    ) -> MembershipView {
        let me = id("me", 1, 10);
        snapshots.assemble(
            Sources {
                local: &me,
                local_state: Some(state("me", 10, 2)),
                members: members.iter().map(|(id, s)| (id, *s)),
                store,
                status: LocalStatus::Active,
            },
            now,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn peers_are_sorted_with_their_current_state_and_our_id_is_ours() {
        let now = Instant::now();
        let mut store = StateStore::default();
        store.apply(state("b", 1, 3), now, false);
        // A state of another life of c: not c's current one.
        store.apply(state("c", 5, 1), now, false);
        let members = [
            (id("c", 4, 6), foca::State::Alive),
            (id("b", 3, 1), foca::State::Suspect),
            (id("me", 9, 3), foca::State::Alive),
        ];
        let mut snapshots = Snapshots::new();
        let view = assemble(&mut snapshots, &members, &store, now);
        let names: Vec<&str> = view.peers().iter().map(|m| m.node_id().as_str()).collect();
        assert_eq!(names, ["b", "c"]);
        let b = view.get("b").unwrap();
        assert_eq!(b.status(), PeerStatus::Suspect);
        assert_eq!(b.state().map(|s| s.pending), Some(3));
        assert_eq!(b.refreshed_at(), Some(now));
        let c = view.get("c").unwrap();
        assert_eq!(c.status(), PeerStatus::Alive);
        assert!(c.state().is_none() && c.refreshed_at().is_none());
        // The local member is the one holding the view, with its published state.
        let local = view.local();
        assert!(local.is_local());
        assert_eq!(local.identity().generation(), 10);
        assert_eq!(local.state().map(|s| s.pending), Some(2));
        assert_eq!(view.status(), LocalStatus::Active);
    }

    #[tokio::test(start_paused = true)]
    async fn of_two_active_lives_only_the_newest_appears() {
        let now = Instant::now();
        let store = StateStore::default();
        let members = [
            (id("a", 2, 1), foca::State::Alive),
            (id("a", 3, 7), foca::State::Suspect),
            (id("a", 4, 5), foca::State::Alive),
        ];
        let view = assemble(&mut Snapshots::new(), &members, &store, now);
        assert_eq!(view.peers().len(), 1);
        assert_eq!(view.get("a").unwrap().identity().generation(), 7);
        assert_eq!(view.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn every_view_has_a_new_epoch_and_dirt_is_taken_once() {
        let now = Instant::now();
        let store = StateStore::default();
        let mut snapshots = Snapshots::new();
        assert!(snapshots.take_dirty());
        assert!(!snapshots.take_dirty());
        snapshots.mark_dirty();
        assert!(snapshots.take_dirty());
        let first = assemble(&mut snapshots, &[], &store, now);
        let second = assemble(&mut snapshots, &[], &store, now);
        assert_eq!((first.epoch(), second.epoch()), (1, 2));
        assert_eq!(initial(&id("me", 1, 10)).epoch(), 0);
        assert_eq!(initial(&id("me", 1, 10)).status(), LocalStatus::Joining);
    }
}
