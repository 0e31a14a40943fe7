//! Where a blob or an action result lives: rendezvous hashing over the live membership.
//!
//! Every digest ranks every *placement member* by `score(digest, node)`, a hash that is the
//! same on every replica and release, highest first (rendezvous or highest-random-weight
//! hashing: Thaler & Ravishankar, *Using Name-Based Mappings to Increase Hit Rates*,
//! IEEE/ACM ToN 6(1), 1998; Buildbarn's sharded CAS places blobs the same way over a static
//! shard list). The first `R` of the ranking are the digest's **owners**.
//!
//! Placement members are the local node and every live peer (alive or suspect) that gossips a
//! gRPC endpoint and is not draining: a suspect stays a member so that a suspicion seen by one
//! replica only does not make replicas disagree on owners; calls to it may fail, and the next
//! in the ranking stands in. The ranking has the property that makes membership changes cheap:
//! when a member leaves, only the digests it owned get one new owner each (the next in their
//! ranking); when one joins, only the digests it now owns change, each losing its last owner.
//!
//! A `Ring` is one set of placement members; `Rings` keeps the current one and the recent
//! former ones, so lookups made while handoff copies blobs to their new owners also ask the
//! owners under the former sets ("reads fall back to former owners").

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh::Node;
use mesh_core::{MembershipView, NodeId};
use tokio::time::Instant;

use crate::Digest;

/// Former rings are asked for at most this long after they stopped being current.
const FORMER_RING_WINDOW: Duration = Duration::from_secs(300);
/// Former placements are asked for no longer than this after this replica's handoff to the
/// current one completed (every replica starts its handoff when it sees the same change,
/// after the same delay). Until then a lookup of a digest nobody holds asks the owners under
/// each recent placement too: a cluster just formed by many joins answers more slowly for
/// these seconds.
pub const FORMER_RING_GRACE: Duration = Duration::from_secs(10);
/// At most this many former rings are kept.
const FORMER_RINGS: usize = 8;

/// One set of placement members, with each member's hash seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ring {
    /// Sorted by node id.
    members: Vec<(NodeId, u64)>,
}

impl Ring {
    /// The placement members of `view`: the local node (unless it is draining) and every live
    /// peer with a gRPC endpoint that is not draining.
    pub(crate) fn of(view: &MembershipView) -> Self {
        let mut members: Vec<(NodeId, u64)> = view
            .members()
            .filter(|member| {
                let state = member.state();
                let draining = state.is_some_and(|s| s.draining);
                let reachable =
                    member.is_local() || state.is_some_and(|s| s.grpc_endpoint.is_some());
                reachable && !draining
            })
            .map(|member| (member.node_id().clone(), seed(member.node_id())))
            .collect();
        members.sort_by(|a, b| a.0.cmp(&b.0));
        Self { members }
    }

    /// A ring of exactly these nodes (tests and benchmarks).
    #[cfg(test)]
    pub(crate) fn of_nodes(nodes: impl IntoIterator<Item = NodeId>) -> Self {
        let mut members: Vec<(NodeId, u64)> = nodes
            .into_iter()
            .map(|node| {
                let s = seed(&node);
                (node, s)
            })
            .collect();
        members.sort_by(|a, b| a.0.cmp(&b.0));
        members.dedup_by(|a, b| a.0 == b.0);
        Self { members }
    }

    /// Every member, best first for `digest`.
    pub(crate) fn ranked(&self, digest: &Digest) -> Vec<&NodeId> {
        let key = key(digest);
        let mut scored: Vec<(u64, &NodeId)> = self
            .members
            .iter()
            .map(|(node, seed)| (score(key, *seed), node))
            .collect();
        scored.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        scored.into_iter().map(|(_, node)| node).collect()
    }

    /// The first `r` members of the ranking of `digest`, best first: one pass over the
    /// members keeping the best `r` (no sort of the whole ranking).
    pub(crate) fn owners(&self, digest: &Digest, r: usize) -> Vec<&NodeId> {
        let key = key(digest);
        let mut best: Vec<(u64, &NodeId)> = Vec::with_capacity(r + 1);
        for (node, seed) in &self.members {
            let entry = (score(key, *seed), node);
            let better =
                |a: &(u64, &NodeId), b: &(u64, &NodeId)| a.0 > b.0 || (a.0 == b.0 && a.1 < b.1);
            if best.len() == r && best.last().is_some_and(|last| !better(&entry, last)) {
                continue;
            }
            let at = best
                .iter()
                .position(|b| better(&entry, b))
                .unwrap_or(best.len());
            best.insert(at, entry);
            best.truncate(r);
        }
        best.into_iter().map(|(_, node)| node).collect()
    }

    /// The positions (in [`Ring::member`] order) of the first `r` members of the ranking of
    /// `digest`, best first, written into `best` (cleared first): the allocation-free form of
    /// [`Ring::owners`] for a lookup of thousands of digests.
    pub(crate) fn owner_positions(&self, digest: &Digest, r: usize, best: &mut Vec<(u64, usize)>) {
        best.clear();
        let key = key(digest);
        for (position, (node, seed)) in self.members.iter().enumerate() {
            let score = score(key, *seed);
            let better =
                |b: &(u64, usize)| score > b.0 || (score == b.0 && node < &self.members[b.1].0);
            if best.len() == r && best.last().is_some_and(|last| !better(last)) {
                continue;
            }
            let at = best.iter().position(better).unwrap_or(best.len());
            best.insert(at, (score, position));
            best.truncate(r);
        }
    }

    /// The member at `position` (members are in node id order).
    pub(crate) fn member(&self, position: usize) -> &NodeId {
        &self.members[position].0
    }

    /// The position of `node`, if it is a member.
    pub(crate) fn position(&self, node: &NodeId) -> Option<usize> {
        self.members
            .binary_search_by(|(member, _)| member.cmp(node))
            .ok()
    }

    /// How many members.
    pub(crate) fn len(&self) -> usize {
        self.members.len()
    }
}

/// The digest's own hash is uniform (SHA-256 or BLAKE3): its first eight bytes are the key.
fn key(digest: &Digest) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest.hash()[..8]);
    u64::from_le_bytes(bytes)
}

/// FNV-1a of the node id: the same on every replica and release.
fn seed(node: &NodeId) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in node.as_str().bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// splitmix64's finaliser over key and seed: every bit of both moves the score.
fn score(key: u64, seed: u64) -> u64 {
    let mut z = key ^ seed.rotate_left(32);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The current ring of a node's membership, and the former ones of the last minutes.
#[derive(Debug, Clone)]
pub(crate) struct Rings {
    node: Node,
    state: Arc<Mutex<RingState>>,
}

#[derive(Debug)]
struct RingState {
    /// The view epoch `current` was computed from.
    epoch: u64,
    current: Arc<Ring>,
    /// Rings that were current before, newest first, with when they stopped being current.
    former: VecDeque<(Instant, Arc<Ring>)>,
    /// The ring the last completed handoff pass covered, and when it completed.
    handed_off: Option<(Arc<Ring>, Instant)>,
}

impl Rings {
    pub(crate) fn new(node: Node) -> Self {
        let view = node.view();
        let current = Arc::new(Ring::of(&view));
        Self {
            node,
            state: Arc::new(Mutex::new(RingState {
                epoch: view.epoch(),
                current,
                former: VecDeque::new(),
                handed_off: None,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RingState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The ring of the current view (recomputed only when the view changed).
    pub(crate) fn current(&self) -> Arc<Ring> {
        let view = self.node.view();
        let mut state = self.lock();
        if state.epoch != view.epoch() {
            state.epoch = view.epoch();
            let ring = Ring::of(&view);
            if ring != *state.current {
                let previous = std::mem::replace(&mut state.current, Arc::new(ring));
                state.former.push_front((Instant::now(), previous));
                state.former.truncate(FORMER_RINGS);
            }
        }
        state.current.clone()
    }

    /// The former rings still asked: those that stopped being current within the last
    /// minutes, until this replica's handoff to the current ring is some seconds old.
    pub(crate) fn former(&self) -> Vec<Arc<Ring>> {
        let current = self.current();
        let mut state = self.lock();
        let now = Instant::now();
        let settled = state.handed_off.as_ref().is_some_and(|(ring, at)| {
            **ring == *current && now.duration_since(*at) > FORMER_RING_GRACE
        });
        if settled {
            state.former.clear();
        }
        while state
            .former
            .back()
            .is_some_and(|(since, _)| now.duration_since(*since) > FORMER_RING_WINDOW)
        {
            state.former.pop_back();
        }
        state.former.iter().map(|(_, ring)| ring.clone()).collect()
    }

    /// Records that a handoff pass to `ring` completed.
    pub(crate) fn handed_off(&self, ring: Arc<Ring>) {
        self.lock().handed_off = Some((ring, Instant::now()));
    }

    /// Whether the placement changed since the last completed handoff pass.
    pub(crate) fn handoff_pending(&self) -> bool {
        let current = self.current();
        self.lock()
            .handed_off
            .as_ref()
            .is_none_or(|(ring, _)| **ring != *current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    fn digests(n: u32) -> Vec<Digest> {
        (0..n).map(|i| Digest::of(&i.to_le_bytes())).collect()
    }

    #[test]
    fn owners_are_the_same_whatever_order_members_come_in() {
        let a = Ring::of_nodes(["r0", "r1", "r2", "r3"].map(node));
        let b = Ring::of_nodes(["r3", "r1", "r0", "r2"].map(node));
        for digest in digests(100) {
            assert_eq!(a.owners(&digest, 2), b.owners(&digest, 2));
            for r in 1..=5 {
                let prefix = a.ranked(&digest).into_iter().take(r).collect::<Vec<_>>();
                assert_eq!(a.owners(&digest, r), prefix, "the first {r} of the ranking");
                let mut best = Vec::new();
                a.owner_positions(&digest, r, &mut best);
                let by_position: Vec<&NodeId> = best.iter().map(|(_, p)| a.member(*p)).collect();
                assert_eq!(by_position, prefix, "positions name the same owners");
            }
        }
    }

    #[test]
    fn the_mapping_is_pinned_across_releases() {
        // Replicas of different releases must agree on owners during a rolling update.
        let ring = Ring::of_nodes(["r0", "r1", "r2"].map(node));
        let owners: Vec<String> = digests(6)
            .iter()
            .map(|d| ring.owners(d, 1)[0].to_string())
            .collect();
        assert_eq!(owners, ["r0", "r1", "r0", "r1", "r1", "r1"]);
    }

    #[test]
    fn blobs_spread_evenly_over_the_members() {
        let names: Vec<NodeId> = (0..10).map(|i| node(&format!("r{i}"))).collect();
        let ring = Ring::of_nodes(names.clone());
        let mut counts = std::collections::HashMap::new();
        for digest in digests(20_000) {
            for owner in ring.owners(&digest, 2) {
                *counts.entry(owner.clone()).or_insert(0u32) += 1;
            }
        }
        // 4,000 each on average; a fair hash stays well within ±15 %.
        for name in &names {
            let count = counts[name];
            assert!((3_400..=4_600).contains(&count), "{name}: {count}");
        }
    }

    #[test]
    fn a_departure_moves_only_the_departed_members_share() {
        let names: Vec<NodeId> = (0..8).map(|i| node(&format!("r{i}"))).collect();
        let before = Ring::of_nodes(names.clone());
        let after = Ring::of_nodes(names.iter().filter(|n| n.as_str() != "r3").cloned());
        for digest in digests(5_000) {
            let old = before.owners(&digest, 2);
            let new = after.owners(&digest, 2);
            if old.iter().any(|n| n.as_str() == "r3") {
                // The survivor keeps its place; the next in the ranking replaces r3.
                let survivor = old.iter().find(|n| n.as_str() != "r3").unwrap();
                assert!(new.contains(survivor));
                assert_eq!(
                    new,
                    before
                        .ranked(&digest)
                        .into_iter()
                        .filter(|n| n.as_str() != "r3")
                        .take(2)
                        .collect::<Vec<_>>()
                );
            } else {
                assert_eq!(old, new, "{digest}: owners moved though r3 did not own it");
            }
        }
    }
}
