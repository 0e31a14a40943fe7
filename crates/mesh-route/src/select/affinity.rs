//! [`Affinity`]: the same key to the same node — rendezvous hashing (Thaler & Ravishankar,
//! 1998) — unless that node is over a bounded share of the load (Mirrokni, Thorup &
//! Zadimoghaddam, 2018). The type's documentation gives the algorithm.

use super::shared::traced_backpressure;
use super::{Candidate, LeastLoaded, RouteRequest, Strategy, stable_hash};

/// Sends calls with the same affinity key to the same node, unless that node is over a bounded
/// share of the load.
///
/// **Rendezvous hashing** (highest random weight; Thaler & Ravishankar, *Using Name-Based
/// Mappings to Increase Hit Rates*, IEEE/ACM ToN 6(1), 1998): every candidate scores
/// `hash(key, node id)` with a hash that is the same on every node and release, and the highest
/// score wins. Hence:
///
/// - every router that sees the same candidates with the same loads sends a key to the same
///   node, whichever router the call arrived at (the local flag plays no part);
/// - when a node joins, the only keys that move are those it now wins; when a node leaves, only
///   the keys it held move, each to its runner-up. Every other key stays where it was, so caches
///   stay warm through membership changes. (Keys that had spilled because of the load cap below
///   may also move, as the caps change with the cluster's capacity.)
///
/// **Bounded loads** (Mirrokni, Thorup & Zadimoghaddam, *Consistent Hashing with Bounded
/// Loads*, SODA 2018): a hot key must not bury its node. With `m` the total load including this
/// call (the candidates' pending calls plus one) and a load factor `c > 1`, a candidate may hold
/// at most `ceil(c · m · max_concurrency / Σ max_concurrency)` calls: its capacity-weighted share
/// of the load, with `c - 1` of slack. The call goes to the highest-scoring candidate whose
/// pending count is below its cap and that has capacity, so a key spills to its runner-up (the
/// same node on every router) only while its first choice is overloaded. The caps add up to at
/// least `c · m`, more than the `m - 1` pending calls, so some candidate is always under its cap;
/// if none of those has capacity, the choice is [`backpressure`](super::backpressure).
///
/// The cap is relative to the current load: on an idle cluster (`m` small) a node that already
/// runs a call or two may be over its cap, and keys then spill to their runner-up. A larger load
/// factor trades balance for stickiness.
///
/// Requests without an affinity key go to a keyless strategy, [`LeastLoaded`] by default.
///
/// ```
/// # use mesh_core::{NodeId, NodeState};
/// # use mesh_route::select::{Candidate, Strategy};
/// use mesh_route::select::{Affinity, RouteRequest};
///
/// # let ids: Vec<NodeId> = ["a", "b", "c"].iter().map(|n| n.parse()).collect::<Result<_, _>>()?;
/// # let states: Vec<_> = ids.iter().map(|id| NodeState::new(id.clone(), 1, 1)).collect();
/// # let candidate = |i: usize, local| Candidate {
/// #     node_id: &ids[i], local, pending: 0, max_concurrency: 4, state: &states[i],
/// # };
/// let affinity = Affinity::new().with_load_factor(1.5)?;
/// let request = RouteRequest::new().with_affinity_key(b"input-root-digest".to_vec());
/// // Router a and router c see the same nodes, each as local itself: they agree.
/// let on_a = affinity.pick(&[candidate(0, true), candidate(1, false), candidate(2, false)], &request);
/// let on_c = affinity.pick(&[candidate(0, false), candidate(1, false), candidate(2, true)], &request);
/// assert_eq!(on_a, on_c);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Affinity {
    load_factor: f64,
    keyless: Box<dyn Strategy>,
}

impl Affinity {
    /// The load factor `c` of [`Affinity::new`]: a node may take 25% more than its
    /// capacity-weighted share of the load before its keys spill.
    pub const DEFAULT_LOAD_FACTOR: f64 = 1.25;

    /// Load factor [`Affinity::DEFAULT_LOAD_FACTOR`]; requests without a key go to
    /// [`LeastLoaded::new`].
    pub fn new() -> Self {
        Self {
            load_factor: Self::DEFAULT_LOAD_FACTOR,
            keyless: Box::new(LeastLoaded::new()),
        }
    }

    /// Sets the load factor `c`: a node may hold up to `c` times its capacity-weighted share of
    /// the load (rounded up) before its keys spill to their runner-up.
    ///
    /// `c` must be finite and greater than 1. The slack `c - 1` is what lets a key stay on its
    /// first choice while loads fluctuate: as it shrinks, placements follow every change in load
    /// and keys lose their locality (the paper's bounds on how far a key searches and how many
    /// keys move grow as `c` approaches 1).
    pub fn with_load_factor(mut self, load_factor: f64) -> Result<Self, LoadFactorError> {
        if !(load_factor.is_finite() && load_factor > 1.0) {
            return Err(LoadFactorError { value: load_factor });
        }
        self.load_factor = load_factor;
        Ok(self)
    }

    /// Sets the strategy for requests without an affinity key.
    pub fn with_keyless_strategy(mut self, strategy: impl Strategy) -> Self {
        self.keyless = Box::new(strategy);
        self
    }

    /// The load factor `c`.
    pub fn load_factor(&self) -> f64 {
        self.load_factor
    }
}

impl Default for Affinity {
    fn default() -> Self {
        Self::new()
    }
}

impl Strategy for Affinity {
    fn name(&self) -> &'static str {
        "affinity"
    }

    fn pick(&self, candidates: &[Candidate<'_>], request: &RouteRequest) -> usize {
        let Some(key) = request.affinity_key() else {
            return self.keyless.pick(candidates, request);
        };
        let score = |c: &Candidate<'_>| stable_hash(&[key, c.node_id.as_str().as_bytes()]);
        // Totals in f64: exact (sums of u32 stay far below 2^53) and no overflow.
        let load = candidates.iter().map(|c| f64::from(c.pending)).sum::<f64>() + 1.0;
        let capacity: f64 = candidates
            .iter()
            .map(|c| f64::from(c.max_concurrency))
            .sum();
        let cap = |c: &Candidate<'_>| {
            (self.load_factor * load * f64::from(c.max_concurrency) / capacity).ceil()
        };
        // Having capacity implies a non-zero total capacity, so `cap` divides by a positive
        // number whenever it is called.
        let eligible = |c: &Candidate<'_>| c.has_capacity() && f64::from(c.pending) < cap(c);
        let chosen = candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| eligible(c))
            .max_by_key(|(_, c)| score(c));
        let Some((chosen, c)) = chosen else {
            return traced_backpressure(self.name(), candidates);
        };
        tracing::trace!(
            strategy = self.name(),
            chosen = %c.node_id,
            pending = c.pending,
            cap = cap(c),
            // Whether the key's first choice was passed over (only computed when traced).
            spilled = candidates.iter().map(score).max() != Some(score(c)),
            "the highest-scoring candidate under its load cap"
        );
        chosen
    }
}

/// The load factor given to [`Affinity::with_load_factor`] was not finite and greater than 1.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error(
    "invalid affinity load factor {value}: it must be a finite number greater than 1 \
     (1.25 lets a node take 25% more than its share of the load)"
)]
pub struct LoadFactorError {
    value: f64,
}

impl LoadFactorError {
    /// The rejected value.
    pub fn value(&self) -> f64 {
        self.value
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::select::{RoundRobin, testing::Fixture};

    fn keyed(key: impl Into<Vec<u8>>) -> RouteRequest {
        RouteRequest::new().with_affinity_key(key)
    }

    fn idle(names: &[&str]) -> Fixture {
        Fixture::new(&names.iter().map(|&n| (n, 0, 8, false)).collect::<Vec<_>>())
    }

    /// Where each of `keys` keys goes, by node name.
    fn placement(affinity: &Affinity, f: &Fixture, keys: usize) -> Vec<String> {
        (0..keys)
            .map(|k| {
                let chosen = affinity.pick(&f.candidates(), &keyed(format!("key-{k}")));
                f.name(chosen).to_owned()
            })
            .collect()
    }

    #[test]
    fn the_same_key_goes_to_the_same_node_on_every_router() {
        let names = ["n0", "n1", "n2", "n3", "n4"];
        // Each router sees itself as the local candidate.
        let views: Vec<Fixture> = names
            .iter()
            .map(|&me| {
                Fixture::new(
                    &names
                        .iter()
                        .map(|&n| (n, 1, 8, n == me))
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        let routers: Vec<Affinity> = (0..5)
            .map(|seed| Affinity::new().with_keyless_strategy(LeastLoaded::with_seed(seed)))
            .collect();
        let first = placement(&routers[0], &views[0], 500);
        for (router, view) in routers.iter().zip(&views) {
            assert_eq!(placement(router, view, 500), first);
        }
        // And repeated calls stick.
        assert_eq!(placement(&routers[0], &views[0], 500), first);
    }

    #[test]
    fn keys_spread_over_the_nodes() {
        let f = idle(&["n0", "n1", "n2", "n3"]);
        let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
        for node in placement(&Affinity::new(), &f, 4000) {
            *per_node.entry(node).or_default() += 1;
        }
        assert_eq!(per_node.len(), 4);
        assert!(
            per_node.values().all(|&n| (850..1150).contains(&n)),
            "{per_node:?}"
        );
    }

    #[test]
    fn the_mapping_is_pinned_across_releases() {
        // Routers on different releases must agree during a rolling upgrade.
        let f = idle(&["n0", "n1", "n2", "n3"]);
        let placed = placement(&Affinity::new(), &f, 8);
        assert_eq!(placed, ["n3", "n0", "n1", "n1", "n0", "n2", "n0", "n1"]);
    }

    #[test]
    fn membership_changes_only_move_the_keys_of_the_changed_node() {
        let affinity = Affinity::new();
        let keys = 3000;
        let before = placement(&affinity, &idle(&["n0", "n1", "n2", "n3", "n4"]), keys);

        // n2 leaves: exactly its keys move.
        let without = placement(&affinity, &idle(&["n0", "n1", "n3", "n4"]), keys);
        for (old, new) in before.iter().zip(&without) {
            if old == "n2" {
                assert_ne!(new, "n2");
            } else {
                assert_eq!(old, new);
            }
        }

        // n5 joins: keys either stay or move to n5, about a sixth of them.
        let with = placement(
            &affinity,
            &idle(&["n0", "n1", "n2", "n3", "n4", "n5"]),
            keys,
        );
        let mut moved = 0;
        for (old, new) in before.iter().zip(&with) {
            if old != new {
                assert_eq!(new, "n5");
                moved += 1;
            }
        }
        assert!((400..600).contains(&moved), "{moved} of {keys} keys moved");
    }

    #[test]
    fn a_hot_key_spills_off_an_overloaded_node_to_its_runner_up() {
        let names = ["n0", "n1", "n2", "n3"];
        let affinity = Affinity::new();
        let request = keyed("hot");
        let home = affinity.pick(&idle(&names).candidates(), &request);
        let runner_up = {
            let others: Vec<&str> = names
                .iter()
                .copied()
                .filter(|&n| n != names[home])
                .collect();
            let f = idle(&others);
            f.name(affinity.pick(&f.candidates(), &request)).to_owned()
        };

        // Home runs 4 of 8, the others are idle: m = 5, cap = ceil(1.25 · 5 · 8 / 32) = 2.
        let mut f = idle(&names);
        f.nodes[home].1.pending = 4;
        assert_eq!(f.name(affinity.pick(&f.candidates(), &request)), runner_up);

        // With a load factor of 4, home's cap is ceil(4 · 5 · 8 / 32) = 5: the key stays.
        let tolerant = Affinity::new().with_load_factor(4.0).unwrap();
        assert_eq!(tolerant.pick(&f.candidates(), &request), home);

        // Once everyone is as busy as home, the key comes back.
        for node in &mut f.nodes {
            node.1.pending = 4;
        }
        assert_eq!(affinity.pick(&f.candidates(), &request), home);

        // But never onto a full node, whatever the load factor.
        f.nodes[home].1.pending = 8;
        assert_ne!(tolerant.pick(&f.candidates(), &request), home);
    }

    #[test]
    fn a_burst_of_one_key_stays_under_the_caps() {
        // Capacities 10, 10, 20, 40 (total 80); 60 calls of one key, none completing.
        let mut f = Fixture::new(&[
            ("a", 0, 10, false),
            ("b", 0, 10, false),
            ("c", 0, 20, false),
            ("d", 0, 40, false),
        ]);
        let affinity = Affinity::new();
        let request = keyed("burst");
        let home = affinity.pick(&f.candidates(), &request);
        for call in 0..60u32 {
            let chosen = affinity.pick(&f.candidates(), &request);
            let m = f64::from(call + 1);
            let node = &mut f.nodes[chosen].1;
            let cap = (1.25 * m * f64::from(node.max_concurrency) / 80.0).ceil();
            node.pending += 1;
            assert!(
                f64::from(node.pending) <= cap,
                "call {call} put {} over its cap {cap}",
                node.node_id
            );
        }
        let loads: Vec<u32> = f.nodes.iter().map(|n| n.1.pending).collect();
        // The key spilled, but its home still took about as many calls as its cap allows.
        assert!(loads[home] < 60, "{loads:?}");
        let home_cap = (1.25 * 60.0 * f64::from(f.nodes[home].1.max_concurrency) / 80.0).ceil();
        assert!(
            f64::from(loads[home]) >= home_cap - 1.0,
            "{loads:?}, home {home}"
        );
    }

    #[test]
    fn full_nodes_are_never_chosen_and_nobody_with_capacity_means_backpressure() {
        let affinity = Affinity::new().with_load_factor(100.0).unwrap();
        let f = Fixture::new(&[
            ("a", 4, 4, false),
            ("b", 0, 0, false),
            ("c", 1, 4, false),
            ("local", 9, 4, true),
        ]);
        let placed = placement(&affinity, &f, 200);
        assert!(placed.iter().all(|n| n == "c"), "{placed:?}");

        let f = Fixture::new(&[("a", 4, 4, false), ("local", 9, 4, true)]);
        assert!(placement(&affinity, &f, 20).iter().all(|n| n == "local"));
        let f = Fixture::new(&[("a", 6, 4, false), ("b", 5, 4, false), ("c", 0, 0, false)]);
        assert!(placement(&affinity, &f, 20).iter().all(|n| n == "b"));
    }

    #[test]
    fn requests_without_a_key_go_to_the_keyless_strategy() {
        let f = idle(&["a", "b", "c"]);
        let affinity = Affinity::new().with_keyless_strategy(RoundRobin::with_seed(1));
        let mut chosen: Vec<usize> = (0..3)
            .map(|_| affinity.pick(&f.candidates(), &RouteRequest::new()))
            .collect();
        chosen.sort();
        assert_eq!(chosen, [0, 1, 2]);

        // The default sends keyless calls to the least loaded node.
        let f = Fixture::new(&[("a", 3, 4, false), ("b", 1, 4, false), ("c", 2, 4, false)]);
        assert_eq!(
            Affinity::new().pick(&f.candidates(), &RouteRequest::new()),
            1
        );
    }

    #[test]
    fn load_factors_must_be_finite_and_above_one() {
        for bad in [1.0, 0.5, 0.0, -2.0, f64::NAN, f64::INFINITY] {
            let error = Affinity::new().with_load_factor(bad).unwrap_err();
            assert!(error.value().to_bits() == bad.to_bits());
            let message = error.to_string();
            assert!(message.contains(&bad.to_string()), "{message}");
            assert!(message.contains("greater than 1"), "{message}");
        }
        let affinity = Affinity::new().with_load_factor(1.01).unwrap();
        assert_eq!(affinity.load_factor(), 1.01);
        assert_eq!(Affinity::new().load_factor(), Affinity::DEFAULT_LOAD_FACTOR);
    }
}
