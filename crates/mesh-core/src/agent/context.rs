//! The step context: what the components of the membership task work with while it takes a
//! step, handed to each of them explicitly.
//!
//! The membership task (`mod.rs`) takes one step per input, timer or local change, all at one
//! instant. Its components own their state: Lifeguard (`lifeguard/`), the lineage of node
//! lives (`lineage.rs`), the publication of our own state (`publication.rs`) and
//! announcements (`announce.rs`). What they share is here, and a component gets it as
//! `&mut Context` for the call: foca and what its runtime writes to (the socket, the ordered
//! timers, Lifeguard's guard), the instant of the step, the timing, the table of peers'
//! states, what handles share with the task, our own status, the generator that chooses
//! peers, and what readers will learn with the next view (events, and whether it changed).
//! A component's step never calls another component; what it means for another, the task's
//! loop dispatches.
//!
//! The context owns what it holds rather than borrowing it from the task for each call: the
//! task (`mod.rs`) keeps it in one field beside its components, so `&mut self.cx` and
//! `&mut self.lifeguard` are borrowed side by side.

use std::{net::SocketAddr, sync::Arc};

use rand::{rngs::StdRng, seq::IndexedRandom};
use tokio::time::Instant;

use super::runtime::{FocaInstance, Io};
use crate::{
    LocalStatus, MeshEvent, handle_state::Shared, state_table::SharedStore, timing::Timing,
};

/// What every component of the membership task works with during a step.
pub(super) struct Context<T> {
    /// The instant of the step being taken: the clock is read once per step, so a simulation
    /// can drive the steps with its own.
    pub(super) now: Instant,
    pub(super) timing: Timing,
    pub(super) foca: FocaInstance,
    /// What foca's runtime writes to (`runtime.rs`): every foca call gets `io.runtime(now)`.
    pub(super) io: Io<T>,
    /// The latest state of every node (`state_table.rs`), shared with foca's broadcast
    /// handler.
    pub(super) store: SharedStore,
    /// What the handles share with the task: local fields, load, counters, wake-ups.
    pub(super) shared: Arc<Shared>,
    /// Chooses peers at random: push and relay targets, witnesses.
    peers_rng: StdRng,
    status: LocalStatus,
    /// Events waiting for the next view.
    events: Vec<MeshEvent>,
    /// Something readers see changed since the loop last looked.
    view_changed: bool,
}

impl<T> Context<T> {
    /// The context of a task that has not started: joining, as of `now`.
    pub(super) fn new(
        foca: FocaInstance,
        io: Io<T>,
        store: SharedStore,
        shared: Arc<Shared>,
        timing: Timing,
        peers_rng: StdRng,
        now: Instant,
    ) -> Self {
        Self {
            now,
            timing,
            foca,
            io,
            store,
            shared,
            peers_rng,
            status: LocalStatus::Joining,
            events: Vec::new(),
            view_changed: false,
        }
    }

    /// Our own status in the cluster.
    pub(super) fn status(&self) -> LocalStatus {
        self.status
    }

    /// Changes our status: readers see it in the next view, with an event.
    pub(super) fn set_status(&mut self, status: LocalStatus) {
        if self.status != status {
            self.status = status;
            self.view_changed();
            self.emit(MeshEvent::LocalStatus(status));
        }
    }

    /// Something readers see changed: a new view is due.
    pub(super) fn view_changed(&mut self) {
        self.view_changed = true;
    }

    /// Whether something readers see changed since the last call.
    pub(super) fn take_view_changed(&mut self) -> bool {
        std::mem::take(&mut self.view_changed)
    }

    /// An event, delivered with the next view.
    pub(super) fn emit(&mut self, event: MeshEvent) {
        self.events.push(event);
    }

    /// Whether events wait for the next view.
    pub(super) fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// Hands the waiting events to the handles' event channel, in order.
    pub(super) fn deliver_events(&mut self) {
        for event in self.events.drain(..) {
            self.shared.emit(event);
        }
    }

    /// Up to `fanout` of `members`, chosen at random.
    pub(super) fn choose_peers(
        &mut self,
        members: &[SocketAddr],
        fanout: usize,
    ) -> Vec<SocketAddr> {
        choose(&mut self.peers_rng, members, fanout)
    }

    /// The gossip addresses of foca's active members.
    pub(super) fn member_addrs(&self) -> Vec<SocketAddr> {
        self.foca.iter_members().map(|m| m.id().addr()).collect()
    }
}

/// Up to `fanout` of `members`, chosen at random by `rng`.
pub(super) fn choose(rng: &mut StdRng, members: &[SocketAddr], fanout: usize) -> Vec<SocketAddr> {
    members.sample(rng, fanout).copied().collect()
}
