//! Membership events, after serf's event types.

use std::sync::Arc;

use crate::{Identity, LocalStatus, NodeState};

/// Something that happened in the cluster, as seen by this node.
///
/// Delivered in order on a broadcast channel ([`crate::Membership::events`]); a receiver that
/// falls more than the channel capacity behind loses the oldest events and is told how many.
/// The membership view is always authoritative; events say what changed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MeshEvent {
    /// A node we did not know joined.
    Joined(Identity),
    /// A peer published a new state.
    Updated(Arc<NodeState>),
    /// A peer missed a probe and is suspected to have failed.
    Suspect(Identity),
    /// A peer was declared down without having said goodbye.
    Failed(Identity),
    /// A peer left gracefully.
    Left(Identity),
    /// A node came back under a newer identity: a restart (same or new address) or an automatic
    /// rejoin after being wrongly declared down. The previous identity is gone.
    Rejoined {
        /// The identity that was replaced.
        previous: Identity,
        /// The identity now in the cluster.
        current: Identity,
    },
    /// Another process claims our node id with a newer generation. The cluster follows the
    /// newer one; this node should be stopped.
    Superseded {
        /// This node's identity.
        local: Identity,
        /// The newer claimant.
        newer: Identity,
    },
    /// The local node's standing changed.
    LocalStatus(LocalStatus),
    /// The advisory coordinator changed ([`crate::MembershipView::coordinator`]): a hint for
    /// housekeeping, not a lock. Sent after the view naming the new coordinator is published.
    CoordinatorChanged {
        /// The coordinator until now, if there was one.
        previous: Option<Identity>,
        /// The coordinator from now on, if any member qualifies.
        current: Option<Identity>,
    },
}
