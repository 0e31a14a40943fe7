//! View assembly: the immutable [`MembershipView`] readers get, built from foca's members and
//! the state table after every change.
//!
//! A peer appears when foca counts it active (alive or suspect), with the state of *that* life
//! if we hold one (a state of another generation is not attached), and how long ago it was
//! refreshed. Our own node id is ours alone, and if two lives of one node id are both active for
//! a moment (a restart at a new address), only the newest appears: the router never sees two
//! owners of a name.
//!
//! Members that failed or left come from the [`Lineage`] until they are reaped, each node id
//! once and only while no life of it is live; every member carries when its status last
//! changed, and the view names the coordinator ([`crate::view`] has the rule).

use std::sync::Arc;

use tokio::time::Instant;

use super::lineage::Lineage;
use crate::{
    Identity, LocalStatus, NodeState,
    state_table::StateStore,
    view::{DepartedMember, Departure, Member, MembershipView, PeerStatus, choose_coordinator},
};

/// The view before any peer is known.
pub(crate) fn initial(identity: &Identity) -> MembershipView {
    let local = local_member(identity.clone(), None, None, None);
    let coordinator = choose_coordinator(&local, LocalStatus::Joining, &[]).cloned();
    MembershipView {
        local,
        peers: Vec::new(),
        departed: Vec::new(),
        coordinator,
        status: LocalStatus::Joining,
        epoch: 0,
    }
}

fn local_member(
    identity: Identity,
    state: Option<Arc<NodeState>>,
    refreshed_at: Option<Instant>,
    status_since: Option<Instant>,
) -> Member {
    Member {
        identity,
        status: PeerStatus::Alive,
        state,
        refreshed_at,
        local: true,
        status_since,
    }
}

/// Whether the view is out of date, and the epoch of the next one.
#[derive(Debug)]
pub(crate) struct Snapshots {
    epoch: u64,
    dirty: bool,
    /// The local status of the last view, and since when it holds.
    local_status: Option<(LocalStatus, Instant)>,
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
    /// When statuses changed, and the members that failed or left.
    pub(crate) lineage: &'a Lineage,
}

impl Snapshots {
    /// Out of date from the start: the first view is published at once.
    pub(crate) fn new() -> Self {
        Self {
            epoch: 0,
            dirty: true,
            local_status: None,
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
            lineage,
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
                    status_since: lineage.status_since(id),
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
        let is_live = |id: &Identity| {
            id.node_id() == local.node_id()
                || peers
                    .binary_search_by(|m| m.node_id().cmp(id.node_id()))
                    .is_ok()
        };
        let mut departed: Vec<DepartedMember> = lineage
            .departed_lives()
            .filter(|(id, _, _)| !is_live(id))
            .map(|(id, departure, since)| DepartedMember {
                identity: id.clone(),
                departure,
                since,
            })
            .collect();
        departed.sort_by(|a, b| a.node_id().cmp(b.node_id()));
        let status_since = match self.local_status {
            Some((last, since)) if last == status => since,
            _ => now,
        };
        self.local_status = Some((status, status_since));
        let local = local_member(local.clone(), local_state, Some(now), Some(status_since));
        let coordinator = choose_coordinator(&local, status, &peers).cloned();
        self.epoch += 1;
        MembershipView {
            local,
            peers,
            departed,
            coordinator,
            status,
            epoch: self.epoch,
        }
    }
}

/// Sets the membership gauges from `view` (see [`crate::counters`] for the list). Constant work
/// per call whatever the cluster's size, bar one pass over the members.
pub(crate) fn record_gauges(view: &MembershipView) {
    let (mut alive, mut suspect) = (1_u32, 0_u32); // the local node is alive
    let mut oldest_state = std::time::Duration::ZERO;
    for peer in view.peers() {
        match peer.status() {
            PeerStatus::Alive => alive += 1,
            PeerStatus::Suspect => suspect += 1,
        }
        if let Some(age) = peer.age() {
            oldest_state = oldest_state.max(age);
        }
    }
    let (mut failed, mut left) = (0_u32, 0_u32);
    for member in view.departed() {
        match member.departure() {
            Departure::Failed => failed += 1,
            Departure::Left => left += 1,
        }
    }
    for (status, count) in [
        ("alive", alive),
        ("suspect", suspect),
        ("failed", failed),
        ("left", left),
    ] {
        metrics::gauge!("mesh_members", "status" => status).set(f64::from(count));
    }
    metrics::gauge!("mesh_state_age_max_seconds").set(oldest_state.as_secs_f64());
    metrics::gauge!("mesh_is_coordinator").set(if view.is_coordinator() { 1.0 } else { 0.0 });
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
        assemble_with(snapshots, members, store, &Lineage::default(), now)
    }

    fn assemble_with(
        snapshots: &mut Snapshots,
        members: &[(Identity, foca::State)],
        store: &StateStore,
        lineage: &Lineage,
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
                lineage,
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

    #[tokio::test(start_paused = true)]
    async fn departed_members_are_listed_once_and_never_beside_a_live_life() {
        let t0 = Instant::now();
        let store = StateStore::default();
        let mut lineage = Lineage::default();
        let me = id("me", 1, 10);
        let (a, b, c) = (id("a", 2, 1), id("b", 3, 1), id("c", 4, 1));
        for peer in [&a, &b, &c] {
            lineage.arrived(peer.clone(), &me, [peer].into_iter(), t0);
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        let t1 = Instant::now();
        lineage.departed(a.clone(), t1);
        lineage.leaving(c.clone());
        lineage.departed(c.clone(), t1);
        let members = [(b.clone(), foca::State::Alive)];
        let view = assemble_with(&mut Snapshots::new(), &members, &store, &lineage, t1);
        let departed: Vec<(&str, Departure)> = view
            .departed()
            .iter()
            .map(|m| (m.node_id().as_str(), m.departure()))
            .collect();
        assert_eq!(departed, [("a", Departure::Failed), ("c", Departure::Left)]);
        assert_eq!(view.departed()[0].since(), t1);
        assert_eq!(view.get("b").unwrap().status_since(), Some(t0));
        assert!(view.get("a").is_none(), "departed members are not peers");

        // c comes back: listed as live only.
        let c2 = id("c", 4, 2);
        lineage.arrived(c2.clone(), &me, [&c2].into_iter(), t1);
        let members = [(b, foca::State::Alive), (c2, foca::State::Alive)];
        let view = assemble_with(&mut Snapshots::new(), &members, &store, &lineage, t1);
        let departed: Vec<&str> = view
            .departed()
            .iter()
            .map(|m| m.node_id().as_str())
            .collect();
        assert_eq!(departed, ["a"]);
        assert!(view.get("c").is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn the_local_status_age_runs_from_its_last_change() {
        let store = StateStore::default();
        let lineage = Lineage::default();
        let mut snapshots = Snapshots::new();
        let t0 = Instant::now();
        let view = assemble(&mut snapshots, &[], &store, t0);
        assert_eq!(view.local().status_since(), Some(t0));
        let t1 = t0 + Duration::from_secs(5);
        let view = assemble_with(&mut snapshots, &[], &store, &lineage, t1);
        assert_eq!(view.local().status_since(), Some(t0), "still active");
    }

    #[test]
    fn the_coordinator_is_the_oldest_member_that_is_not_draining() {
        let member = |name: &str, generation: u64, draining: Option<bool>| Member {
            identity: id(name, 1, generation),
            status: PeerStatus::Alive,
            state: draining.map(|draining| {
                let mut state = NodeState::new(NodeId::new(name).unwrap(), generation, 1);
                state.draining = draining;
                Arc::new(state)
            }),
            refreshed_at: None,
            local: false,
            status_since: None,
        };
        let local = Member {
            local: true,
            ..member("me", 50, Some(false))
        };
        let pick = |peers: &[Member], status| {
            choose_coordinator(&local, status, peers).map(|id| id.node_id().as_str().to_owned())
        };
        let peers = [
            member("a", 70, Some(false)),
            member("b", 40, None),
            member("c", 40, Some(false)),
        ];
        // Oldest generation wins; the lower node id breaks the tie; an unknown state counts.
        assert_eq!(pick(&peers, LocalStatus::Active).as_deref(), Some("b"));
        let peers = [member("b", 40, Some(true)), member("c", 60, Some(false))];
        assert_eq!(pick(&peers, LocalStatus::Active).as_deref(), Some("me"));
        assert_eq!(pick(&peers, LocalStatus::Left).as_deref(), Some("c"));
        assert_eq!(pick(&[], LocalStatus::Defunct), None);
        let all_draining = [member("b", 40, Some(true))];
        let draining_local = Member {
            local: true,
            ..member("me", 50, Some(true))
        };
        assert_eq!(
            choose_coordinator(&draining_local, LocalStatus::Active, &all_draining),
            None
        );
    }
}
