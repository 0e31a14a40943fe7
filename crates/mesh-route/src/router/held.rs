//! Held calls: what the router does with a call while every node that could run it is full.
//!
//! Under [`WhenFull::Wait`] (the default) the call waits at the router and is bound to a node
//! only when a slot frees somewhere — late binding, as in Sparrow (Ousterhout et al., SOSP
//! 2013) — so a burst drains across the whole cluster at the speed capacity frees instead of
//! queueing on the node it arrived at. Held calls wait in arrival order within their class of
//! requirements (the required tags) and never behind another class.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use mesh_core::{Membership, Tags};

use super::placement::Placement;
use crate::error::RouteError;

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

/// Calls held under [`WhenFull::Wait`], one queue per class of requirements (the required
/// tags): arrival order within a class, and no blocking across classes, so a call only a busy
/// `pool=gpu` node can take never holds back a call an idle linux node could run now.
#[derive(Debug, Default)]
pub(super) struct HeldCalls {
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

    /// Calls held now, in every class.
    pub(super) fn total(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Whether calls of this class are held (they go first).
    pub(super) fn any_waiting(&self, class: &Tags) -> bool {
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

    /// Holds a call of `class` until `attempt` places it: joins the class's queue, waits for
    /// its turn (arrival order), then tries again whenever capacity may have freed — a peer's
    /// new state arrived or a local task ended (at once, without waiting for this node's own
    /// state to be published) — and on a timer as well, for forwarded calls whose accounting
    /// this node holds. `attempt` answers `None` while the chosen node is full.
    pub(super) async fn hold(
        &self,
        class: &Tags,
        membership: &Membership,
        mut attempt: impl FnMut() -> Result<Option<Placement>, RouteError>,
    ) -> Result<Placement, RouteError> {
        let ticket = self.enter(class);
        let _turn = ticket.turn.lock().await;
        let mut freed_here = membership.load().slot_freed();
        let recheck = membership
            .timing()
            .state_publish_interval
            .max(Duration::from_millis(10));
        loop {
            let seen = membership.view().epoch();
            freed_here.mark_unchanged();
            if let Some(placement) = attempt()? {
                return Ok(placement);
            }
            let _ = tokio::time::timeout(recheck, async {
                tokio::select! {
                    _ = membership.wait_until(|v| v.epoch() != seen) => {}
                    _ = freed_here.changed() => {}
                }
            })
            .await;
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
