//! Immutable snapshots of the membership, for readers that must never wait on the gossip task.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

use crate::{Identity, NodeId, NodeState};

/// How the local failure detector currently sees a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerStatus {
    /// Answering probes.
    Alive,
    /// Missed a probe; it is declared down unless it refutes the suspicion in time (SWIM's
    /// suspicion mechanism).
    Suspect,
}

/// Where the local node stands in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LocalStatus {
    /// Started, no peer has answered yet.
    Joining,
    /// At least one peer knows us.
    Active,
    /// We had peers and lost them all; we keep announcing to discovered addresses.
    Isolated,
    /// The cluster declared us down and we could not rejoin (for example because a newer
    /// process claims our node id).
    Defunct,
    /// We left the cluster.
    Left,
}

/// One member as seen in a [`MembershipView`].
#[derive(Debug, Clone)]
pub struct Member {
    pub(crate) identity: Identity,
    pub(crate) status: PeerStatus,
    pub(crate) state: Option<Arc<NodeState>>,
    pub(crate) refreshed_at: Option<Instant>,
    pub(crate) local: bool,
}

impl Member {
    /// Its identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Its node id.
    pub fn node_id(&self) -> &NodeId {
        self.identity.node_id()
    }

    /// Alive or suspect.
    pub fn status(&self) -> PeerStatus {
        self.status
    }

    /// Its latest gossiped state; `None` until the first one arrives.
    pub fn state(&self) -> Option<&Arc<NodeState>> {
        self.state.as_ref()
    }

    /// When its state was last refreshed (a new version, or its owner re-sending the same one).
    pub fn refreshed_at(&self) -> Option<Instant> {
        self.refreshed_at
    }

    /// How long ago its state was last refreshed; zero for the local node.
    ///
    /// Routers use this to distrust a load figure that has not been confirmed for a while.
    pub fn age(&self) -> Option<Duration> {
        if self.local {
            return Some(Duration::ZERO);
        }
        self.refreshed_at.map(|at| at.elapsed())
    }

    /// Whether this is the node holding the view.
    pub fn is_local(&self) -> bool {
        self.local
    }
}

/// A consistent snapshot of the cluster as this node sees it.
///
/// Holds at most one member per node id: if two live identities claim one id, only the newer
/// generation appears (and the mesh declares the other down). Cheap to clone and never changes;
/// a new snapshot is published after every change.
#[derive(Debug, Clone)]
pub struct MembershipView {
    pub(crate) local: Member,
    /// Sorted by node id, local node excluded.
    pub(crate) peers: Vec<Member>,
    pub(crate) status: LocalStatus,
    pub(crate) epoch: u64,
}

impl MembershipView {
    /// The local node.
    pub fn local(&self) -> &Member {
        &self.local
    }

    /// Every live peer (alive or suspect), sorted by node id, local node excluded.
    pub fn peers(&self) -> &[Member] {
        &self.peers
    }

    /// The local node followed by every peer.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        std::iter::once(&self.local).chain(self.peers.iter())
    }

    /// The member with this node id, local node included.
    pub fn get(&self, node_id: &str) -> Option<&Member> {
        if self.local.node_id().as_str() == node_id {
            return Some(&self.local);
        }
        self.peers
            .binary_search_by(|m| m.node_id().as_str().cmp(node_id))
            .ok()
            .map(|i| &self.peers[i])
    }

    /// Number of members, local node included.
    pub fn len(&self) -> usize {
        self.peers.len() + 1
    }

    /// Always false: the local node is a member of its own view.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Where the local node stands.
    pub fn status(&self) -> LocalStatus {
        self.status
    }

    /// Increases with every published snapshot.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}
