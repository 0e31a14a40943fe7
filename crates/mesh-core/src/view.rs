//! Immutable snapshots of the membership, for readers that must never wait on the gossip task.
//!
//! A view holds the live members (alive or suspect) that routers choose from, and, for
//! operators, the members that failed or left recently ([`MembershipView::departed`]), each
//! with how long ago its status last changed. A departed member stays listed until it is
//! *reaped*, [`crate::Timing::remove_down_after`] after it went down (15 minutes with the `lan`
//! preset, 30 minutes `wan`, 30 seconds `local`), the counterpart of serf's
//! `reconnect_timeout` and `tombstone_timeout` (24 hours by default in serf, which also keeps
//! reconnecting to failed members that long). A newer life of the same node id replaces it at
//! once. Every view also names an advisory coordinator ([`MembershipView::coordinator`]).

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

/// Why a member is no longer live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Departure {
    /// Declared down by the failure detector, without a goodbye.
    Failed,
    /// Left gracefully.
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
    /// When its status last changed (joined, suspected, refuted a suspicion; for the local
    /// node, its [`LocalStatus`]).
    pub(crate) status_since: Option<Instant>,
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

    /// When its status last changed: when it joined, was suspected, or refuted a suspicion
    /// (for the local node, when its [`LocalStatus`] last changed). `None` if this node has
    /// not seen the change itself.
    pub fn status_since(&self) -> Option<Instant> {
        self.status_since
    }

    /// How long ago its status last changed ([`Member::status_since`]).
    pub fn status_age(&self) -> Option<Duration> {
        self.status_since.map(|at| at.elapsed())
    }
}

/// A member that failed or left, listed until it is reaped
/// ([`crate::Timing::remove_down_after`] after it went down) or a newer life of its node id
/// joins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DepartedMember {
    pub(crate) identity: Identity,
    pub(crate) departure: Departure,
    pub(crate) since: Instant,
}

impl DepartedMember {
    /// The identity of the life that ended.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Its node id.
    pub fn node_id(&self) -> &NodeId {
        self.identity.node_id()
    }

    /// Failed or left.
    pub fn departure(&self) -> Departure {
        self.departure
    }

    /// When it went down.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// How long ago it went down.
    pub fn age(&self) -> Duration {
        self.since.elapsed()
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
    /// Failed and left members not yet reaped, sorted by node id; none of them is live.
    pub(crate) departed: Vec<DepartedMember>,
    pub(crate) coordinator: Option<Identity>,
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

    /// Members that failed or left and are not reaped yet, sorted by node id. None of them is
    /// live: a node id in [`MembershipView::peers`] never appears here.
    pub fn departed(&self) -> &[DepartedMember] {
        &self.departed
    }

    /// The advisory coordinator: the **oldest** active member — the lowest identity generation (generations are start times, so the member that has run
    /// longest), ties broken by the lower node id — among the local node and every live peer
    /// (alive or suspect), leaving out members whose gossiped state says they are draining, and
    /// the local node once it has left the cluster or was declared defunct. Suspects count, so a
    /// suspicion seen by one node only does not make the nodes disagree; a member stops counting
    /// when it is declared down, which every node learns. The oldest member is chosen, as Akka's
    /// cluster singleton does, rather than the lowest node id, so a restarted node (a new, younger
    /// generation) does not take the role back: a rolling restart moves it once per restart of
    /// the coordinator, not twice. `None` when no member qualifies (every member is draining,
    /// or the local node has left and no live peer qualifies).
    ///
    /// The coordinator is a *hint* for housekeeping that one node should do (compaction, cleanup,
    /// reports), never a lock: during a partition each side has its own, and while news of a
    /// change spreads two nodes can both believe they are it. Work done under it must be safe to
    /// do twice. A change is announced as [`crate::MeshEvent::CoordinatorChanged`].
    pub fn coordinator(&self) -> Option<&Member> {
        let coordinator = self.coordinator.as_ref()?;
        self.get(coordinator.node_id().as_str())
            .filter(|m| m.identity() == coordinator)
    }

    /// Whether the local node is the coordinator.
    pub fn is_coordinator(&self) -> bool {
        self.coordinator.as_ref() == Some(self.local.identity())
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

/// The coordinator among `local` (standing `status`) and the live `peers`: the lowest
/// `(generation, node id)` of the members that are not draining, the local node only while it
/// is in the cluster.
pub(crate) fn choose_coordinator<'a>(
    local: &'a Member,
    status: LocalStatus,
    peers: &'a [Member],
) -> Option<&'a Identity> {
    let local_counts = !matches!(status, LocalStatus::Left | LocalStatus::Defunct);
    let draining = |m: &Member| m.state().is_some_and(|s| s.draining);
    local_counts
        .then_some(local)
        .into_iter()
        .chain(peers.iter())
        .filter(|m| !draining(m))
        .map(Member::identity)
        .min_by(|a, b| {
            a.generation()
                .cmp(&b.generation())
                .then_with(|| a.node_id().cmp(b.node_id()))
        })
}
