//! Departures: how whoever relays a peer's response learns that the peer's life has ended.
//!
//! The housekeeping task reads the membership's events; a relay only needs to know when the
//! one peer life it relays from ends (failed, left or replaced by a newer life). Each watched
//! life has one `watch` sender, dropped when the life ends, which wakes every receiver; a life
//! that ended before anyone watched it is remembered, so a watch started just after the
//! departure is refused instead of hanging.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
};

use mesh_core::{MembershipView, NodeId};
use tokio::sync::watch;

/// Tells whoever relays a peer's responses when that peer life ends, without each relay
/// reading the whole event stream (every load update of the cluster) to find out.
#[derive(Debug, Clone, Default)]
pub(super) struct Departures(Arc<Mutex<DeparturesInner>>);

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
    pub(super) fn watch(&self, node: &NodeId, generation: u64) -> Option<watch::Receiver<()>> {
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

    /// The life `generation` of `node` (and every older one) has ended.
    pub(super) fn depart(&self, node: &NodeId, generation: u64) {
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
    pub(super) fn resync(&self, view: &MembershipView) {
        self.lock()
            .watched
            .retain(|node, _| view.get(node.as_str()).is_some());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
