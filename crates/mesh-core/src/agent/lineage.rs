//! Identity lineage: the lives of every node id, turned into serf-like events.
//!
//! foca tracks *identities* (`{node_id, addr, generation}`); users care about *nodes*. A node
//! that restarts comes back under a newer identity, possibly at another address (a Kubernetes
//! pod keeps its name and gets a new IP), and both lives may be active for a moment. The mesh
//! keeps one owner per node id (DESIGN.md, "Identity"): the newer life wins, the older one is
//! declared down cluster-wide (foca's `apply_many` with `Member::down`), and the change is one
//! `Rejoined` event instead of a `Joined` and a `Failed`. [`Lineage`] makes these decisions,
//! and its step methods (`member_up`, `member_down`, …, given the membership task's step
//! context) carry them out on foca, the state table and the events.
//!
//! SWIM's suspicion is not a foca notification; it is observed by diffing the suspect members
//! on every maintenance tick ([`Lineage::observe_suspects`]).
//!
//! The lineage also remembers, for operators, when each life's status last changed and how
//! the lives that ended did end (failed or left), until they are reaped
//! ([`Lineage::forget_down`]): views list them as departed members. A life that failed and
//! whose node then came back is a *flap*, counted in the stats.

use std::collections::{HashMap, HashSet};

use tokio::time::Instant;

use super::context::Context;
use crate::{Identity, LocalStatus, MeshEvent, NodeId, transport::Transport, view::Departure};

/// The latest life of one node id.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Life {
    identity: Identity,
    /// When its current status began: up, suspected, refuted, or down.
    since: Instant,
    /// How it ended, if it did.
    down: Option<Departure>,
}

/// What the lives of every node id say, and what we know about their ends.
#[derive(Debug, Default)]
pub(crate) struct Lineage {
    /// The latest life seen of every node id, and how it ended (if it did): a newer life
    /// showing up is a `Rejoined`, not a `Joined`, even if we saw the old one fail first.
    lives: HashMap<NodeId, Life>,
    /// Peers that told us they are leaving: their going down is a `Left`, not a `Failed`.
    leaving: HashSet<Identity>,
    /// Lives we declared down because a newer life of their node id appeared: their going
    /// down was already reported as that `Rejoined`.
    replaced: HashSet<Identity>,
    /// Members currently suspected.
    suspects: HashSet<Identity>,
    /// A newer process that claims our own node id.
    superseded_by: Option<Identity>,
}

/// What a member coming up means.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Arrival {
    /// Lives to declare down cluster-wide, in order: older lives of a node id.
    pub(crate) declare_down: Vec<Identity>,
    pub(crate) outcome: Outcome,
    /// The node's previous life had failed: it failed and came back (a flap).
    pub(crate) flapped: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A node id we did not know.
    Joined(Identity),
    /// A newer life of a node id we knew.
    Rejoined {
        previous: Identity,
        current: Identity,
    },
    /// Another process claims our node id with a newer generation.
    Superseded(Identity),
    /// Nothing to report: an older life, already declared down.
    Nothing,
}

impl Lineage {
    /// Member `id` came up at `now`; `local` is our identity and `active` every active member
    /// (foca's view, `id` included).
    pub(crate) fn arrived<'a>(
        &mut self,
        id: Identity,
        local: &Identity,
        active: impl Iterator<Item = &'a Identity>,
        now: Instant,
    ) -> Arrival {
        let mut declare_down = Vec::new();
        if id.node_id() == local.node_id() {
            let outcome = if !id.supersedes(local) {
                tracing::warn!(stale = %id, %local, "an older life of this node is gossiping; declaring it down");
                self.replaced.insert(id.clone());
                declare_down.push(id);
                Outcome::Nothing
            } else if self.superseded_by.is_none() {
                self.superseded_by = Some(id.clone());
                Outcome::Superseded(id)
            } else {
                Outcome::Nothing
            };
            return Arrival {
                declare_down,
                outcome,
                flapped: false,
            };
        }
        // Another live identity with the same node id: keep only the newest life.
        let rivals: Vec<Identity> = active
            .filter(|other| other.node_id() == id.node_id() && **other != id)
            .cloned()
            .collect();
        let known = self
            .lives
            .get(id.node_id())
            .filter(|life| id.supersedes(&life.identity));
        let flapped = known.is_some_and(|life| life.down == Some(Departure::Failed));
        let mut previous = known.map(|life| life.identity.clone());
        for rival in rivals {
            if id.supersedes(&rival) {
                tracing::info!(old = %rival, new = %id, "node id reappeared with a newer generation; replacing the old life");
                self.replaced.insert(rival.clone());
                declare_down.push(rival.clone());
                previous = Some(rival);
            } else {
                tracing::info!(old = %id, new = %rival, "ignoring an older life of a node id");
                self.replaced.insert(id.clone());
                declare_down.push(id);
                return Arrival {
                    declare_down,
                    outcome: Outcome::Nothing,
                    flapped: false,
                };
            }
        }
        self.lives.insert(
            id.node_id().clone(),
            Life {
                identity: id.clone(),
                since: now,
                down: None,
            },
        );
        let outcome = match previous {
            Some(previous) => Outcome::Rejoined {
                previous,
                current: id,
            },
            None => Outcome::Joined(id),
        };
        Arrival {
            declare_down,
            outcome,
            flapped,
        }
    }

    /// Member `id` went down at `now`: `Failed`, `Left`, or nothing if it was replaced.
    pub(crate) fn departed(&mut self, id: Identity, now: Instant) -> Option<MeshEvent> {
        self.suspects.remove(&id);
        let replaced = self.replaced.remove(&id);
        let departure = if self.leaving.remove(&id) {
            Departure::Left
        } else {
            Departure::Failed
        };
        if let Some(life) = self.lives.get_mut(id.node_id())
            && life.identity == id
            && life.down.is_none()
        {
            life.down = Some(departure);
            life.since = now;
        }
        if replaced {
            return None; // Reported as Rejoined when its replacement appeared.
        }
        Some(match departure {
            Departure::Left => MeshEvent::Left(id),
            Departure::Failed => MeshEvent::Failed(id),
        })
    }

    /// foca replaced `old` with the newer `new` at the same address. If the old life was down,
    /// a member-up of the new one follows and reports the rejoin; if both were active, none
    /// follows, so it is reported here.
    pub(crate) fn renamed(
        &mut self,
        old: Identity,
        new: Identity,
        new_is_active: bool,
        now: Instant,
    ) -> Option<MeshEvent> {
        let old_was_active = self
            .lives
            .get(old.node_id())
            .is_some_and(|life| life.identity == old && life.down.is_none());
        if !(old_was_active && new_is_active) {
            return None;
        }
        self.lives.insert(
            new.node_id().clone(),
            Life {
                identity: new.clone(),
                since: now,
                down: None,
            },
        );
        Some(MeshEvent::Rejoined {
            previous: old,
            current: new,
        })
    }

    /// `id` told us it is leaving: its going down will be a `Left`.
    pub(crate) fn leaving(&mut self, id: Identity) {
        self.leaving.insert(id);
    }

    /// Updates the suspects from the members foca currently suspects at `now`; returns
    /// whether the set changed and the newly suspected, in the order given. A suspicion that
    /// begins or is refuted changes the member's status.
    pub(crate) fn observe_suspects(
        &mut self,
        suspects: impl Iterator<Item = Identity>,
        now: Instant,
    ) -> (bool, Vec<Identity>) {
        let mut current = HashSet::new();
        let mut newly = Vec::new();
        for id in suspects {
            if !self.suspects.contains(&id) {
                newly.push(id.clone());
            }
            current.insert(id);
        }
        let changed = current != self.suspects;
        for id in current.symmetric_difference(&self.suspects) {
            if let Some(life) = self.lives.get_mut(id.node_id())
                && life.identity == *id
                && life.down.is_none()
            {
                life.since = now;
            }
        }
        self.suspects = current;
        (changed, newly)
    }

    /// Forgets (reaps) lives that have been down for `after` or longer: they leave the
    /// departed members, and a later life of their node id is a `Joined` again. Returns
    /// whether any was forgotten.
    pub(crate) fn forget_down(&mut self, now: Instant, after: std::time::Duration) -> bool {
        let before = self.lives.len();
        self.lives
            .retain(|_, life| life.down.is_none() || now.duration_since(life.since) < after);
        self.lives.len() != before
    }

    /// Whether a live identity of `node_id` is known.
    pub(crate) fn knows_live(&self, node_id: &NodeId) -> bool {
        self.lives
            .get(node_id)
            .is_some_and(|life| life.down.is_none())
    }

    /// When the status of the live `id` last changed, if we saw it.
    pub(crate) fn status_since(&self, id: &Identity) -> Option<Instant> {
        self.lives
            .get(id.node_id())
            .filter(|life| life.identity == *id && life.down.is_none())
            .map(|life| life.since)
    }

    /// The lives that ended and are not reaped yet: identity, how, and since when.
    pub(crate) fn departed_lives(&self) -> impl Iterator<Item = (&Identity, Departure, Instant)> {
        self.lives
            .values()
            .filter_map(|life| Some((&life.identity, life.down?, life.since)))
    }

    /// The gossip address of the live identity of `node_id`, if one is known.
    pub(crate) fn live_addr(&self, node_id: &NodeId) -> Option<std::net::SocketAddr> {
        self.lives
            .get(node_id)
            .filter(|life| life.down.is_none())
            .map(|life| life.identity.addr())
    }

    /// Whether another process took over our node id.
    pub(crate) fn is_superseded(&self) -> bool {
        self.superseded_by.is_some()
    }
}

/// The task's steps: lineage decisions carried out on foca, the state table and the events.
impl Lineage {
    /// foca reports member `id` up. Returns the member if it is a node id we did not know or a
    /// newer life of one: it gets our state now (join sync).
    pub(super) fn member_up<T: Transport>(
        &mut self,
        cx: &mut Context<T>,
        id: Identity,
    ) -> Option<Identity> {
        let local = cx.foca.identity().clone();
        // Borrowed, not collected: a cold start of n nodes makes n member-ups on every node.
        let active = cx.foca.iter_members().map(|m| m.id());
        let arrival = self.arrived(id, &local, active, cx.now);
        for older in arrival.declare_down {
            declare_down(cx, older);
        }
        if arrival.flapped {
            cx.shared.counters.flapped();
        }
        match arrival.outcome {
            Outcome::Joined(id) => {
                cx.emit(MeshEvent::Joined(id.clone()));
                Some(id)
            }
            Outcome::Rejoined { previous, current } => {
                cx.store.lock().bury(&previous, cx.now);
                cx.emit(MeshEvent::Rejoined {
                    previous,
                    current: current.clone(),
                });
                Some(current)
            }
            Outcome::Superseded(newer) => {
                superseded(cx, local, newer);
                None
            }
            Outcome::Nothing => None,
        }
    }

    /// foca reports member `id` down: its state goes, and its end is reported.
    pub(super) fn member_down<T: Transport>(&mut self, cx: &mut Context<T>, id: Identity) {
        cx.store.lock().bury(&id, cx.now);
        if let Some(event) = self.departed(id, cx.now) {
            cx.emit(event);
        }
    }

    /// foca replaced `old` with `new` at the same address. Returns the new life if the rename
    /// is a rejoin: it gets our state now (join sync).
    pub(super) fn member_renamed<T: Transport>(
        &mut self,
        cx: &mut Context<T>,
        old: Identity,
        new: Identity,
    ) -> Option<Identity> {
        let new_is_active = cx.foca.iter_members().any(|m| *m.id() == new);
        let event = self.renamed(old.clone(), new.clone(), new_is_active, cx.now)?;
        cx.store.lock().bury(&old, cx.now);
        cx.emit(event);
        Some(new)
    }

    /// A peer's leave notice: if it is a member, it is down now, and reported as left.
    pub(super) fn leave_notice<T: Transport>(&mut self, cx: &mut Context<T>, identity: Identity) {
        if !cx.foca.iter_members().any(|m| *m.id() == identity) {
            return;
        }
        self.leaving(identity.clone());
        declare_down(cx, identity);
    }

    /// foca gave up on us (declared down and it could not renew on its own): take a new
    /// generation, unless we left or were superseded. Returns the new identity.
    pub(super) fn renew_identity<T: Transport>(&mut self, cx: &mut Context<T>) -> Option<Identity> {
        if cx.status() == LocalStatus::Left || self.is_superseded() {
            return None;
        }
        let Some(renewed) = foca::Identity::renew(cx.foca.identity()) else {
            cx.set_status(LocalStatus::Defunct);
            return None;
        };
        tracing::warn!(new = %renewed, "declared down by the cluster; rejoining with a new generation");
        if let Err(error) = cx
            .foca
            .change_identity(renewed.clone(), cx.io.runtime(cx.now))
        {
            tracing::warn!(%error, "changing identity failed");
            cx.set_status(LocalStatus::Defunct);
            return None;
        }
        Some(renewed)
    }

    /// Reports members that became suspect since the last look.
    pub(super) fn report_suspects<T: Transport>(&mut self, cx: &mut Context<T>) {
        let suspects = cx
            .foca
            .iter_members()
            .filter(|m| m.state() == foca::State::Suspect)
            .map(|m| m.id().clone());
        let (changed, newly) = self.observe_suspects(suspects, cx.now);
        if changed {
            cx.view_changed();
        }
        for id in newly {
            cx.shared.counters.suspected();
            cx.emit(MeshEvent::Suspect(id));
        }
    }
}

/// Declares a life down so the whole cluster drops it.
fn declare_down<T: Transport>(cx: &mut Context<T>, id: Identity) {
    let down = std::iter::once(foca::Member::down(id));
    if let Err(error) = cx.foca.apply_many(down, true, cx.io.runtime(cx.now)) {
        tracing::debug!(%error, "declaring a member down failed");
    }
}

/// Another process took over our node id: leave the cluster to it.
fn superseded<T: Transport>(cx: &mut Context<T>, local: Identity, newer: Identity) {
    tracing::error!(
        %local, %newer,
        "another process claims this node id with a newer generation; leaving the cluster to it"
    );
    cx.emit(MeshEvent::Superseded { local, newer });
    if let Err(error) = cx.foca.leave_cluster(cx.io.runtime(cx.now)) {
        tracing::debug!(%error, "leaving after being superseded failed");
    }
    cx.set_status(LocalStatus::Defunct);
}

#[cfg(test)]
mod tests {
    use super::super::runtime::testing::identity as id;
    use std::time::Duration;

    use super::*;

    fn local() -> Identity {
        id("me", 1, 100)
    }

    /// `id` arrives while `active` are the active members.
    fn arrive(lineage: &mut Lineage, new: &Identity, active: &[&Identity]) -> Arrival {
        lineage.arrived(
            new.clone(),
            &local(),
            active.iter().copied(),
            Instant::now(),
        )
    }

    #[test]
    fn a_first_life_joins_and_its_end_is_a_failure() {
        let mut lineage = Lineage::default();
        let a = id("a", 2, 1);
        assert_eq!(
            arrive(&mut lineage, &a, &[&a]),
            Arrival {
                declare_down: vec![],
                outcome: Outcome::Joined(a.clone()),
                flapped: false,
            }
        );
        assert!(lineage.knows_live(a.node_id()));
        assert_eq!(
            lineage.departed(a.clone(), Instant::now()),
            Some(MeshEvent::Failed(a.clone()))
        );
        assert!(!lineage.knows_live(a.node_id()));
    }

    #[test]
    fn a_peer_that_said_goodbye_has_left() {
        let mut lineage = Lineage::default();
        let a = id("a", 2, 1);
        arrive(&mut lineage, &a, &[&a]);
        lineage.leaving(a.clone());
        assert_eq!(
            lineage.departed(a.clone(), Instant::now()),
            Some(MeshEvent::Left(a))
        );
    }

    #[test]
    fn a_newer_life_after_a_failure_is_a_rejoin_until_the_old_one_is_forgotten() {
        let mut lineage = Lineage::default();
        let t0 = Instant::now();
        let old = id("a", 2, 1);
        let new = id("a", 3, 2);
        arrive(&mut lineage, &old, &[&old]);
        lineage.departed(old.clone(), t0);
        assert_eq!(
            arrive(&mut lineage, &new, &[&new]).outcome,
            Outcome::Rejoined {
                previous: old.clone(),
                current: new.clone()
            }
        );

        // Forgotten after `remove_down_after`: a later life is news again.
        let newest = id("a", 4, 3);
        lineage.departed(new.clone(), t0);
        lineage.forget_down(t0 + Duration::from_secs(9), Duration::from_secs(10));
        assert!(matches!(
            arrive(&mut lineage, &newest, &[&newest]).outcome,
            Outcome::Rejoined { .. }
        ));
        lineage.departed(newest.clone(), t0);
        lineage.forget_down(t0 + Duration::from_secs(10), Duration::from_secs(10));
        let fourth = id("a", 5, 4);
        assert_eq!(
            arrive(&mut lineage, &fourth, &[&fourth]).outcome,
            Outcome::Joined(fourth)
        );
    }

    #[test]
    fn two_active_lives_keep_the_newest_and_silence_the_older_ones_end() {
        let mut lineage = Lineage::default();
        let old = id("a", 2, 1);
        let new = id("a", 3, 2);
        arrive(&mut lineage, &old, &[&old]);
        // The restarted pod shows up while its previous life is still active.
        assert_eq!(
            arrive(&mut lineage, &new, &[&old, &new]),
            Arrival {
                declare_down: vec![old.clone()],
                outcome: Outcome::Rejoined {
                    previous: old.clone(),
                    current: new.clone()
                },
                flapped: false,
            }
        );
        // Its declared end was reported by the rejoin.
        assert_eq!(lineage.departed(old, Instant::now()), None);
    }

    #[test]
    fn an_older_life_showing_up_late_is_declared_down_without_an_event() {
        let mut lineage = Lineage::default();
        let old = id("a", 2, 1);
        let new = id("a", 3, 2);
        arrive(&mut lineage, &new, &[&new]);
        assert_eq!(
            arrive(&mut lineage, &old, &[&new, &old]),
            Arrival {
                declare_down: vec![old.clone()],
                outcome: Outcome::Nothing,
                flapped: false,
            }
        );
        assert_eq!(lineage.departed(old, Instant::now()), None);
        assert!(lineage.knows_live(new.node_id()));
    }

    #[test]
    fn our_own_node_id_elsewhere_supersedes_us_once_or_is_declared_down() {
        let mut lineage = Lineage::default();
        let older_self = id("me", 9, 50);
        assert_eq!(
            arrive(&mut lineage, &older_self, &[&older_self]),
            Arrival {
                declare_down: vec![older_self.clone()],
                outcome: Outcome::Nothing,
                flapped: false,
            }
        );
        assert_eq!(lineage.departed(older_self, Instant::now()), None);

        let newer_self = id("me", 9, 500);
        assert_eq!(
            arrive(&mut lineage, &newer_self, &[&newer_self]).outcome,
            Outcome::Superseded(newer_self.clone())
        );
        assert!(lineage.is_superseded());
        assert_eq!(
            arrive(&mut lineage, &newer_self, &[&newer_self]).outcome,
            Outcome::Nothing
        );
    }

    #[test]
    fn a_rename_between_active_lives_is_a_rejoin() {
        let mut lineage = Lineage::default();
        let old = id("a", 2, 1);
        let new = id("a", 2, 2);
        arrive(&mut lineage, &old, &[&old]);
        assert_eq!(
            lineage.renamed(old.clone(), new.clone(), false, Instant::now()),
            None
        );
        assert_eq!(
            lineage.renamed(old.clone(), new.clone(), true, Instant::now()),
            Some(MeshEvent::Rejoined {
                previous: old.clone(),
                current: new.clone()
            })
        );
        // A rename of a life that was already down is reported by the member-up that follows.
        let mut lineage = Lineage::default();
        arrive(&mut lineage, &old, &[&old]);
        lineage.departed(old.clone(), Instant::now());
        assert_eq!(lineage.renamed(old, new, true, Instant::now()), None);
    }

    #[test]
    fn suspects_are_reported_once_per_suspicion() {
        let mut lineage = Lineage::default();
        let (a, b) = (id("a", 2, 1), id("b", 3, 1));
        assert_eq!(
            lineage.observe_suspects([a.clone()].into_iter(), Instant::now()),
            (true, vec![a.clone()])
        );
        assert_eq!(
            lineage.observe_suspects([a.clone(), b.clone()].into_iter(), Instant::now()),
            (true, vec![b.clone()])
        );
        assert_eq!(
            lineage.observe_suspects([b.clone(), a.clone()].into_iter(), Instant::now()),
            (false, vec![])
        );
        // Refuted, then suspected again: a new suspicion.
        assert_eq!(
            lineage.observe_suspects(std::iter::empty(), Instant::now()),
            (true, vec![])
        );
        assert_eq!(
            lineage.observe_suspects([a.clone()].into_iter(), Instant::now()),
            (true, vec![a.clone()])
        );
        // Going down ends the suspicion.
        lineage.departed(a.clone(), Instant::now());
        assert_eq!(
            lineage.observe_suspects(std::iter::empty(), Instant::now()),
            (false, vec![])
        );
    }

    #[test]
    fn ends_are_remembered_with_how_and_when_until_reaped() {
        let mut lineage = Lineage::default();
        let t0 = Instant::now();
        let (a, b) = (id("a", 2, 1), id("b", 3, 1));
        lineage.arrived(a.clone(), &local(), [&a].into_iter(), t0);
        lineage.arrived(b.clone(), &local(), [&b].into_iter(), t0);
        assert_eq!(lineage.status_since(&a), Some(t0));
        assert_eq!(lineage.departed_lives().count(), 0);

        let t1 = t0 + Duration::from_secs(1);
        lineage.departed(a.clone(), t1);
        lineage.leaving(b.clone());
        lineage.departed(b.clone(), t1);
        let mut ended: Vec<_> = lineage
            .departed_lives()
            .map(|(id, how, since)| (id.clone(), how, since))
            .collect();
        ended.sort_by(|x, y| x.0.node_id().cmp(y.0.node_id()));
        assert_eq!(
            ended,
            [
                (a.clone(), Departure::Failed, t1),
                (b.clone(), Departure::Left, t1)
            ]
        );
        assert_eq!(lineage.status_since(&a), None, "a is not live");

        // Reaped after `remove_down_after`, and not before.
        let after = Duration::from_secs(30);
        assert!(!lineage.forget_down(t1 + Duration::from_secs(29), after));
        assert!(lineage.forget_down(t1 + after, after));
        assert_eq!(lineage.departed_lives().count(), 0);
    }

    #[test]
    fn a_suspicion_and_its_refutation_change_the_status_time() {
        let mut lineage = Lineage::default();
        let t0 = Instant::now();
        let a = id("a", 2, 1);
        lineage.arrived(a.clone(), &local(), [&a].into_iter(), t0);
        let t1 = t0 + Duration::from_secs(1);
        lineage.observe_suspects([a.clone()].into_iter(), t1);
        assert_eq!(lineage.status_since(&a), Some(t1));
        // Still suspected: no change.
        lineage.observe_suspects([a.clone()].into_iter(), t1 + Duration::from_secs(1));
        assert_eq!(lineage.status_since(&a), Some(t1));
        let t3 = t0 + Duration::from_secs(3);
        lineage.observe_suspects(std::iter::empty(), t3);
        assert_eq!(lineage.status_since(&a), Some(t3), "refuted: alive again");
    }

    #[test]
    fn a_node_that_failed_and_came_back_flapped_but_one_that_left_did_not() {
        let mut lineage = Lineage::default();
        let t0 = Instant::now();
        let a1 = id("a", 2, 1);
        let a2 = id("a", 2, 2);
        let a3 = id("a", 2, 3);
        assert!(!arrive(&mut lineage, &a1, &[&a1]).flapped);
        lineage.departed(a1, t0);
        let back = arrive(&mut lineage, &a2, &[&a2]);
        assert!(back.flapped);
        assert!(matches!(back.outcome, Outcome::Rejoined { .. }));
        lineage.leaving(a2.clone());
        lineage.departed(a2, t0);
        assert!(!arrive(&mut lineage, &a3, &[&a3]).flapped);
    }
}
