//! Choosing the node that runs a call.
//!
//! The router turns the membership view into [`Candidate`]s — the local node and every peer that
//! passes the filters (required tags, not draining, state fresh enough, alive, reachable) — each
//! with its *effective* load: the gossiped pending count plus the calls this node forwarded to it
//! since that state was published (optimistic accounting, see [`crate::Router`]). A [`Strategy`]
//! picks one of them.
//!
//! | strategy | rule | good for |
//! |---|---|---|
//! | [`LeastLoaded`] | lowest `pending / max_concurrency` among nodes below 1; local wins ties; local when nobody has capacity | the default: fills the cluster by capacity, queues locally under overload (backpressure) |
//! | [`PowerOfTwoChoices`] | the less loaded of two random nodes with capacity | many entry nodes with stale views: avoids herding (Mitzenmacher 2001) |
//! | [`RoundRobin`] | next node with capacity in turn | uniform work on uniform nodes |
//! | [`Random`] | a uniformly random node with capacity | baselines, tests |
//! | [`WeightedCapacity`] | random, weighted by free slots | heterogeneous nodes without herding |
//! | [`Affinity`] | rendezvous hashing of a request key, skipping nodes over a bounded load | cache locality (the same input root on the same node) without hot spots (Mirrokni et al. 2018) |
//!
//! Every strategy that draws random numbers has a seeded constructor, so tests and simulations
//! are reproducible.

use std::fmt;

use mesh_core::{NodeId, NodeState, Tags};

// First: the strategies below use its macro.
#[macro_use]
mod shared;

mod affinity;
#[cfg(test)]
mod conformance;
mod least_loaded;
mod power_of_two_choices;
mod random;
mod round_robin;
mod weighted_capacity;

pub use affinity::{Affinity, LoadFactorError};
pub use least_loaded::LeastLoaded;
pub use power_of_two_choices::PowerOfTwoChoices;
pub use random::Random;
pub use round_robin::RoundRobin;
pub use weighted_capacity::WeightedCapacity;

/// What a call needs from the node that runs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteRequest {
    required_tags: Tags,
    affinity_key: Option<Vec<u8>>,
}

impl RouteRequest {
    /// A request with no requirements.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only nodes carrying every one of these tags may run the call.
    pub fn with_required_tags(mut self, tags: Tags) -> Self {
        self.required_tags = tags;
        self
    }

    /// Adds one required tag.
    pub fn require_tag(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.required_tags.insert(key.into(), value.into());
        self
    }

    /// A key for affinity strategies (for example the action's input root digest).
    pub fn with_affinity_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.affinity_key = Some(key.into());
        self
    }

    /// The required tags.
    pub fn required_tags(&self) -> &Tags {
        &self.required_tags
    }

    /// The affinity key, if any.
    pub fn affinity_key(&self) -> Option<&[u8]> {
        self.affinity_key.as_deref()
    }

    /// Whether `state` carries every required tag.
    pub fn is_satisfied_by(&self, state: &NodeState) -> bool {
        self.required_tags
            .iter()
            .all(|(k, v)| state.tags.get(k) == Some(v))
    }
}

/// A node that may run the call, with its effective load.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// The node.
    pub node_id: &'a NodeId,
    /// Whether it is the node doing the routing.
    pub local: bool,
    /// Pending tasks: gossiped (live for the local node) plus calls forwarded to it since its
    /// last state version.
    pub pending: u32,
    /// Its concurrency limit.
    pub max_concurrency: u32,
    /// Its full gossiped state (tags, endpoint, version).
    pub state: &'a NodeState,
}

impl Candidate<'_> {
    /// `pending / max_concurrency`; infinite when the limit is zero.
    pub fn load_ratio(&self) -> f64 {
        mesh_core::load_ratio(self.pending, self.max_concurrency)
    }

    /// Whether it is below its limit (ratio < 1).
    pub fn has_capacity(&self) -> bool {
        self.pending < self.max_concurrency
    }

    /// Free slots: `max_concurrency - pending`, zero when full.
    pub fn free_slots(&self) -> u32 {
        self.max_concurrency.saturating_sub(self.pending)
    }
}

/// A rule for choosing among candidates.
pub trait Strategy: Send + Sync + fmt::Debug + 'static {
    /// A short, stable name for logs and metrics.
    fn name(&self) -> &'static str;

    /// Returns the index of the candidate that should run the call.
    ///
    /// `candidates` is never empty, is sorted by node id, and holds at most one local
    /// candidate. When no candidate has capacity, strategies fall back to [`backpressure`].
    fn pick(&self, candidates: &[Candidate<'_>], request: &RouteRequest) -> usize;
}

/// The choice when nobody has capacity: the local node if it is a candidate (the call queues
/// where it arrived, which pushes back on the client instead of piling onto a peer), otherwise
/// the least loaded candidate.
pub fn backpressure(candidates: &[Candidate<'_>]) -> usize {
    candidates
        .iter()
        .position(|c| c.local)
        .unwrap_or_else(|| least_ratio(candidates.iter().enumerate()).unwrap_or(0))
}

/// Index of the lowest load ratio among `candidates` (first on ties).
fn least_ratio<'c, 'a: 'c>(
    candidates: impl Iterator<Item = (usize, &'c Candidate<'a>)>,
) -> Option<usize> {
    candidates
        .min_by(|(_, a), (_, b)| a.load_ratio().total_cmp(&b.load_ratio()))
        .map(|(i, _)| i)
}

/// A stable 64-bit hash (FNV-1a followed by a SplitMix64 finaliser): the same on every node
/// and every build, unlike `std`'s `DefaultHasher`.
pub(crate) fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in *part {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separate parts so ("ab", "c") and ("a", "bc") differ.
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

#[cfg(test)]
pub(crate) mod testing {
    //! Building candidates for strategy tests.
    use mesh_core::{NodeId, NodeState};

    use super::{Candidate, RouteRequest, Strategy};

    /// Owns the ids and states candidates borrow.
    pub(crate) struct Fixture {
        pub(crate) nodes: Vec<(NodeId, NodeState, bool)>,
    }

    impl Fixture {
        /// `(name, pending, max, local)` per node; sorted by name like the router does.
        pub(crate) fn new(spec: &[(&str, u32, u32, bool)]) -> Self {
            let mut nodes: Vec<_> = spec
                .iter()
                .map(|&(name, pending, max, local)| {
                    let id = NodeId::new(name).unwrap();
                    let mut state = NodeState::new(id.clone(), 1, 1);
                    state.pending = pending;
                    state.max_concurrency = max;
                    (id, state, local)
                })
                .collect();
            nodes.sort_by(|a, b| a.0.cmp(&b.0));
            Self { nodes }
        }

        pub(crate) fn candidates(&self) -> Vec<Candidate<'_>> {
            self.nodes
                .iter()
                .map(|(id, state, local)| Candidate {
                    node_id: id,
                    local: *local,
                    pending: state.pending,
                    max_concurrency: state.max_concurrency,
                    state,
                })
                .collect()
        }

        pub(crate) fn name(&self, index: usize) -> &str {
            self.nodes[index].0.as_str()
        }
    }

    /// How often each candidate of `f` is picked in `picks` keyless picks.
    pub(crate) fn tally(f: &Fixture, strategy: &dyn Strategy, picks: usize) -> Vec<usize> {
        let candidates = f.candidates();
        let mut counts = vec![0; candidates.len()];
        for _ in 0..picks {
            counts[strategy.pick(&candidates, &RouteRequest::new())] += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::{testing::Fixture, *};

    #[test]
    fn backpressure_prefers_local_then_least_ratio() {
        let f = Fixture::new(&[("a", 9, 4, false), ("b", 5, 4, true), ("c", 4, 4, false)]);
        assert_eq!(f.name(backpressure(&f.candidates())), "b");
        let f = Fixture::new(&[("a", 9, 4, false), ("c", 4, 4, false)]);
        assert_eq!(f.name(backpressure(&f.candidates())), "c");
    }

    #[test]
    fn request_tags_must_all_match() {
        let mut state = NodeState::new(NodeId::new("a").unwrap(), 1, 1);
        state.tags.insert("os".into(), "linux".into());
        state.tags.insert("arch".into(), "x86_64".into());
        assert!(RouteRequest::new().is_satisfied_by(&state));
        assert!(
            RouteRequest::new()
                .require_tag("os", "linux")
                .is_satisfied_by(&state)
        );
        assert!(
            !RouteRequest::new()
                .require_tag("os", "linux")
                .require_tag("pool", "gpu")
                .is_satisfied_by(&state)
        );
        assert!(
            !RouteRequest::new()
                .require_tag("os", "windows")
                .is_satisfied_by(&state)
        );
    }

    #[test]
    fn stable_hash_is_stable_and_separates_parts() {
        assert_eq!(
            stable_hash(&[b"node-1", b"key"]),
            stable_hash(&[b"node-1", b"key"])
        );
        assert_ne!(stable_hash(&[b"ab", b"c"]), stable_hash(&[b"a", b"bc"]));
        // Pinned: routing must agree across nodes and releases.
        assert_eq!(stable_hash(&[b"node-1", b"key"]), 0x2960_4423_ad6a_caec);
    }
}
