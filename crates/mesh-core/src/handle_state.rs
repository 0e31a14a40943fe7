//! What the handles and the membership task share: the published view, the event channel, the
//! fields of our own state that embedders set, the load tracker and the counters.
//!
//! The membership task is the only writer of the view; handles read it without locks
//! (`ArcSwap`), and wait for changes through a `watch` channel of view epochs.

use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use tokio::sync::{Notify, broadcast, watch};

use crate::{
    LoadTracker, MeshEvent, NodeId, NodeState, StateError, Tags,
    counters::MeshCounters,
    node_state::{validate_endpoint, validate_tags},
    view::MembershipView,
};

/// The fields of our state that embedders set (load comes from the [`LoadTracker`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct LocalFields {
    pub(crate) grpc_endpoint: Option<String>,
    pub(crate) tags: Tags,
    pub(crate) draining: bool,
}

impl LocalFields {
    /// Our state as these fields describe it, with no load yet: the one place a [`NodeState`]
    /// is assembled from what embedders set.
    pub(crate) fn node_state(&self, node_id: NodeId, generation: u64) -> NodeState {
        let mut state = NodeState::new(node_id, generation, 0);
        state.grpc_endpoint = self.grpc_endpoint.clone();
        state.tags = self.tags.clone();
        state.draining = self.draining;
        state
    }

    /// Checks every rule, and that the state stays within the size cap whatever its counters
    /// grow to.
    pub(crate) fn validate(&self, node_id: &NodeId) -> Result<(), StateError> {
        validate_tags(&self.tags)?;
        if let Some(endpoint) = &self.grpc_endpoint {
            validate_endpoint(endpoint)?;
        }
        self.node_state(node_id.clone(), 0).check_worst_case_size()
    }
}

/// State shared by handles and the membership task.
#[derive(Debug)]
pub(crate) struct Shared {
    view: ArcSwap<MembershipView>,
    view_epoch: watch::Sender<u64>,
    pub(crate) events: broadcast::Sender<MeshEvent>,
    local: Mutex<LocalFields>,
    /// Woken when embedders change [`LocalFields`].
    pub(crate) local_changed: Notify,
    /// Woken when the membership task wants the discovery source asked again (isolated).
    pub(crate) discovery_wanted: Notify,
    pub(crate) load: LoadTracker,
    pub(crate) counters: MeshCounters,
    /// The generation and version of our last published state (`(0, 0)`: none yet).
    pub(crate) published: Mutex<(u64, u64)>,
}

impl Shared {
    pub(crate) fn new(
        view: MembershipView,
        fields: LocalFields,
        load: LoadTracker,
        event_capacity: usize,
    ) -> Self {
        let (events, _) = broadcast::channel(event_capacity);
        let (view_epoch, _) = watch::channel(view.epoch);
        Self {
            view: ArcSwap::from_pointee(view),
            view_epoch,
            events,
            local: Mutex::new(fields),
            local_changed: Notify::new(),
            discovery_wanted: Notify::new(),
            load,
            counters: MeshCounters::default(),
            published: Mutex::new((0, 0)),
        }
    }

    pub(crate) fn lock_local(&self) -> MutexGuard<'_, LocalFields> {
        // Every change is a whole-value replacement, so a poisoned lock still holds valid data.
        self.local
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The current snapshot.
    pub(crate) fn view(&self) -> Arc<MembershipView> {
        self.view.load_full()
    }

    /// A receiver that changes whenever a new snapshot is published.
    pub(crate) fn view_epochs(&self) -> watch::Receiver<u64> {
        self.view_epoch.subscribe()
    }

    /// Publishes `view`, then announces a change of coordinator if it names another one.
    pub(crate) fn publish_view(&self, view: MembershipView) {
        let epoch = view.epoch;
        let current = view.coordinator.clone();
        let previous = self.view.swap(Arc::new(view)).coordinator.clone();
        self.view_epoch.send_replace(epoch);
        if previous != current {
            tracing::info!(
                previous = previous.as_ref().map(|id| id.node_id().as_str()),
                current = current.as_ref().map(|id| id.node_id().as_str()),
                "the advisory coordinator changed"
            );
            self.emit(MeshEvent::CoordinatorChanged { previous, current });
        }
    }

    /// Sends an event to whoever listens; no receivers is fine, events are optional.
    pub(crate) fn emit(&self, event: MeshEvent) {
        tracing::debug!(?event, "mesh event");
        let _ = self.events.send(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_state_carries_every_local_field() {
        let mut fields = LocalFields {
            grpc_endpoint: Some("http://10.0.0.1:50051".into()),
            draining: true,
            ..LocalFields::default()
        };
        fields.tags.insert("os".into(), "linux".into());
        let id = NodeId::new("a").unwrap();
        let state = fields.node_state(id.clone(), 7);
        assert_eq!(
            (state.node_id.as_str(), state.generation, state.version),
            ("a", 7, 0)
        );
        assert_eq!(state.grpc_endpoint, fields.grpc_endpoint);
        assert_eq!(state.tags, fields.tags);
        assert!(state.draining);
        assert_eq!((state.pending, state.max_concurrency), (0, 0));
        fields.validate(&id).unwrap();
    }

    #[test]
    fn validation_names_the_broken_rule() {
        let id = NodeId::new("a").unwrap();
        let bad_endpoint = LocalFields {
            grpc_endpoint: Some("http://a b".into()),
            ..LocalFields::default()
        };
        assert!(matches!(
            bad_endpoint.validate(&id),
            Err(StateError::InvalidEndpoint { .. })
        ));
        let mut too_large = LocalFields::default();
        for i in 0..40 {
            too_large.tags.insert(format!("key-{i}"), "v".repeat(30));
        }
        assert!(matches!(
            too_large.validate(&id),
            Err(StateError::TooLarge { .. })
        ));
    }
}
