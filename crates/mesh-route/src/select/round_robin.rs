//! [`RoundRobin`]: the next candidate with capacity on a ring of node ids salted per router.

use std::sync::{Mutex, PoisonError};

use mesh_core::NodeId;

use super::shared::{os_seed, traced_backpressure};
use super::{Candidate, RouteRequest, Strategy, stable_hash};

/// The next candidate with capacity, in turn.
///
/// Nodes sit on a ring, ordered by a hash of their id salted per router, and each call goes to
/// the first node with capacity after the one chosen last, wrapping around. The position is the
/// last chosen node's *id* (behind a mutex), not a counter taken modulo the number of
/// candidates: when nodes join, leave or fill up between calls, a counter modulo a changing
/// count skips some nodes and repeats others, while "the next id after the last one" still visits
/// every node once per lap. So between two turns of a node that has room all along, no other node
/// gets more than one call, whatever else joins or leaves. A node that joins gets its turn when
/// the rotation reaches it, within one lap.
///
/// The salt gives every router its own order, so routers started together do not walk the
/// cluster in lockstep. With no candidate with capacity, the choice is
/// [`backpressure`](super::backpressure) and the rotation does not move.
///
/// ```
/// # use mesh_core::{NodeId, NodeState};
/// # use mesh_route::select::{Candidate, RouteRequest, Strategy};
/// use mesh_route::select::RoundRobin;
///
/// # let ids: Vec<NodeId> = ["a", "b", "c"].iter().map(|n| n.parse()).collect::<Result<_, _>>()?;
/// # let states: Vec<_> = ids.iter().map(|id| NodeState::new(id.clone(), 1, 1)).collect();
/// # let candidate = |i: usize| Candidate {
/// #     node_id: &ids[i], local: false, pending: 0, max_concurrency: 4, state: &states[i],
/// # };
/// let candidates = [candidate(0), candidate(1), candidate(2)];
/// let round_robin = RoundRobin::with_seed(7);
/// let mut lap: Vec<usize> = (0..3)
///     .map(|_| round_robin.pick(&candidates, &RouteRequest::new()))
///     .collect();
/// lap.sort();
/// assert_eq!(lap, [0, 1, 2]);
/// # Ok::<(), mesh_core::NodeIdError>(())
/// ```
#[derive(Debug)]
pub struct RoundRobin {
    salt: [u8; 8],
    last: Mutex<Option<(u64, NodeId)>>,
}

impl RoundRobin {
    /// A ring order salted by the operating system's random source.
    pub fn new() -> Self {
        Self::with_seed(os_seed())
    }

    /// A ring order salted with `seed` (reproducible: the same seed gives the same rotation).
    pub fn with_seed(seed: u64) -> Self {
        Self {
            salt: seed.to_le_bytes(),
            last: Mutex::new(None),
        }
    }

    /// Where `node` sits on this router's ring; the id breaks (unlikely) hash ties.
    fn position<'n>(&self, node: &'n NodeId) -> (u64, &'n NodeId) {
        (stable_hash(&[&self.salt, node.as_str().as_bytes()]), node)
    }
}

impl Default for RoundRobin {
    fn default() -> Self {
        Self::new()
    }
}

impl Strategy for RoundRobin {
    fn name(&self) -> &'static str {
        "round-robin"
    }

    fn pick(&self, candidates: &[Candidate<'_>], _request: &RouteRequest) -> usize {
        // A panic cannot leave the position half-written; a poisoned lock is simply taken over.
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let roomy = candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| c.has_capacity())
            .map(|(i, c)| (self.position(c.node_id), i));
        let after_last = |position: &(u64, &NodeId)| {
            last.as_ref()
                .is_none_or(|(hash, node)| *position > (*hash, node))
        };
        let next = roomy
            .clone()
            .filter(|(position, _)| after_last(position))
            .min()
            .or_else(|| roomy.min());
        let Some(((hash, node), chosen)) = next else {
            return traced_backpressure(self.name(), candidates);
        };
        *last = Some((hash, node.clone()));
        let c = &candidates[chosen];
        tracing::trace!(
            strategy = self.name(),
            chosen = %c.node_id,
            ratio = c.load_ratio(),
            "the next candidate with capacity in turn"
        );
        chosen
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};

    use rand::{RngExt, SeedableRng, rngs::StdRng};

    use super::*;
    use crate::select::testing::Fixture;

    fn pick_name(strategy: &RoundRobin, f: &Fixture) -> String {
        f.name(strategy.pick(&f.candidates(), &RouteRequest::new()))
            .to_owned()
    }

    #[test]
    fn every_lap_visits_every_node_once_in_the_same_order() {
        let f = Fixture::new(&[
            ("a", 0, 4, false),
            ("b", 3, 4, true),
            ("c", 0, 1, false),
            ("d", 2, 8, false),
            ("e", 0, 4, false),
        ]);
        let round_robin = RoundRobin::with_seed(1);
        let laps: Vec<Vec<String>> = (0..4)
            .map(|_| (0..5).map(|_| pick_name(&round_robin, &f)).collect())
            .collect();
        let mut first = laps[0].clone();
        assert!(laps.iter().all(|lap| *lap == first), "{laps:?}");
        first.sort();
        assert_eq!(first, ["a", "b", "c", "d", "e"]);

        let again = RoundRobin::with_seed(1);
        assert_eq!(pick_name(&again, &f), laps[0][0]);
    }

    #[test]
    fn routers_with_different_seeds_rotate_in_different_orders() {
        let f = Fixture::new(&[
            ("a", 0, 4, false),
            ("b", 0, 4, false),
            ("c", 0, 4, false),
            ("d", 0, 4, false),
            ("e", 0, 4, false),
        ]);
        let orders: HashSet<Vec<String>> = (0..16)
            .map(|seed| {
                let round_robin = RoundRobin::with_seed(seed);
                (0..5).map(|_| pick_name(&round_robin, &f)).collect()
            })
            .collect();
        assert!(orders.len() > 8, "{orders:?}");
    }

    #[test]
    fn full_nodes_are_skipped_and_nobody_with_capacity_means_backpressure() {
        let round_robin = RoundRobin::with_seed(2);
        let f = Fixture::new(&[
            ("a", 4, 4, false),
            ("b", 0, 4, false),
            ("c", 0, 0, false),
            ("d", 1, 4, false),
            ("local", 5, 4, true),
        ]);
        let names: Vec<String> = (0..10).map(|_| pick_name(&round_robin, &f)).collect();
        assert!(names.iter().all(|n| n == "b" || n == "d"), "{names:?}");
        assert!(names.windows(2).all(|pair| pair[0] != pair[1]), "{names:?}");

        let full = Fixture::new(&[("a", 4, 4, false), ("local", 5, 4, true)]);
        assert_eq!(pick_name(&round_robin, &full), "local");
        let full = Fixture::new(&[("a", 6, 4, false), ("b", 5, 4, false)]);
        assert_eq!(pick_name(&round_robin, &full), "b");

        // Backpressure did not move the rotation: it carries on from where it was.
        let after = pick_name(&round_robin, &f);
        assert_ne!(&after, names.last().unwrap());
    }

    #[test]
    fn rotation_stays_fair_while_the_candidate_set_changes() {
        // Three nodes are always there; three others come and go at random between calls.
        let stable = ["s1", "s2", "s3"];
        let flapping = ["f1", "f2", "f3"];
        let mut membership = StdRng::seed_from_u64(3);
        let round_robin = RoundRobin::with_seed(4);
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..3000 {
            let mut spec: Vec<(&str, u32, u32, bool)> =
                stable.iter().map(|&name| (name, 0, 4, false)).collect();
            for &name in &flapping {
                // Present but full is as good as absent.
                match membership.random_range(0..3) {
                    0 => spec.push((name, 0, 4, false)),
                    1 => spec.push((name, 4, 4, false)),
                    _ => {}
                }
            }
            let f = Fixture::new(&spec);
            *counts.entry(pick_name(&round_robin, &f)).or_default() += 1;
        }
        // Between two turns of a node that had room all along, every node gets at most one turn.
        let least_stable = stable.iter().map(|name| counts[*name]).min().unwrap();
        let most_stable = stable.iter().map(|name| counts[*name]).max().unwrap();
        assert!(most_stable - least_stable <= 1, "{counts:?}");
        assert!(
            counts.values().all(|&n| n <= least_stable + 1),
            "{counts:?}"
        );
        // The flapping nodes were not starved either: each is passed once a lap (about 750 laps)
        // and has room then a third of the time.
        assert!(
            flapping.iter().all(|name| counts[*name] > 150),
            "{counts:?}"
        );
    }

    #[test]
    fn a_node_that_joins_gets_its_turn_within_one_lap() {
        let round_robin = RoundRobin::with_seed(5);
        let before = Fixture::new(&[("a", 0, 4, false), ("b", 0, 4, false), ("c", 0, 4, false)]);
        for _ in 0..4 {
            pick_name(&round_robin, &before);
        }
        let after = Fixture::new(&[
            ("a", 0, 4, false),
            ("b", 0, 4, false),
            ("c", 0, 4, false),
            ("new", 0, 4, false),
        ]);
        let lap: Vec<String> = (0..4).map(|_| pick_name(&round_robin, &after)).collect();
        assert!(lap.iter().any(|n| n == "new"), "{lap:?}");
    }

    #[test]
    fn concurrent_callers_share_one_rotation() {
        let f = Fixture::new(&[
            ("a", 0, 4, false),
            ("b", 0, 4, false),
            ("c", 0, 4, false),
            ("d", 0, 4, false),
        ]);
        let round_robin = RoundRobin::with_seed(6);
        let counts = std::sync::Mutex::new([0usize; 4]);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..250 {
                        let chosen = round_robin.pick(&f.candidates(), &RouteRequest::new());
                        counts.lock().unwrap()[chosen] += 1;
                    }
                });
            }
        });
        assert_eq!(counts.into_inner().unwrap(), [250; 4]);
    }
}
