//! [`LeastLoaded`]: the seed server's rule — the lowest load ratio below 1, the local node
//! winning ties and keeping the call when nobody has capacity (backpressure).

use super::{Candidate, RouteRequest, Strategy, backpressure, shared::os_seed, stable_hash};

/// The lowest load ratio among nodes below their limit; the local node wins ties and is kept
/// when nobody has capacity.
///
/// This is the rule of the seed server: forward only to a peer that is strictly less loaded
/// than we are, and queue locally when the whole cluster is full, so overload pushes back on
/// clients instead of bouncing between nodes. Ties between peers are broken by a per-router
/// hash of the peer's id, so routers that see the same stale loads do not all pick the same
/// peer; combined with the router's optimistic accounting this spreads bursts.
///
/// ```
/// use mesh_route::{LeastLoaded, Strategy};
/// assert_eq!(LeastLoaded::with_seed(7).name(), "least-loaded");
/// ```
#[derive(Debug, Clone)]
pub struct LeastLoaded {
    tie_break: u64,
}

impl LeastLoaded {
    /// Ties between peers broken by a random per-router salt.
    pub fn new() -> Self {
        Self::with_seed(os_seed())
    }

    /// Ties between peers broken by `seed` (reproducible).
    pub fn with_seed(seed: u64) -> Self {
        Self { tie_break: seed }
    }
}

impl Default for LeastLoaded {
    fn default() -> Self {
        Self::new()
    }
}

impl Strategy for LeastLoaded {
    fn name(&self) -> &'static str {
        "least-loaded"
    }

    fn pick(&self, candidates: &[Candidate<'_>], _request: &RouteRequest) -> usize {
        let salt = self.tie_break.to_le_bytes();
        candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| c.has_capacity())
            .min_by(|(_, a), (_, b)| {
                a.load_ratio()
                    .total_cmp(&b.load_ratio())
                    .then(b.local.cmp(&a.local))
                    .then_with(|| {
                        stable_hash(&[&salt, a.node_id.as_str().as_bytes()])
                            .cmp(&stable_hash(&[&salt, b.node_id.as_str().as_bytes()]))
                    })
            })
            .map_or_else(|| backpressure(candidates), |(i, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::testing::Fixture;

    fn pick(spec: &[(&str, u32, u32, bool)]) -> String {
        let f = Fixture::new(spec);
        f.name(LeastLoaded::with_seed(1).pick(&f.candidates(), &RouteRequest::new()))
            .to_owned()
    }

    #[test]
    fn lowest_ratio_wins() {
        assert_eq!(
            pick(&[
                ("local", 3, 4, true),
                ("b", 1, 4, false),
                ("c", 2, 4, false)
            ]),
            "b"
        );
        // Ratio, not absolute pending: 4/16 beats 1/2.
        assert_eq!(
            pick(&[
                ("local", 3, 4, true),
                ("big", 4, 16, false),
                ("small", 1, 2, false)
            ]),
            "big"
        );
    }

    #[test]
    fn local_wins_ties() {
        assert_eq!(pick(&[("local", 1, 4, true), ("b", 2, 8, false)]), "local");
        assert_eq!(pick(&[("a", 0, 4, false), ("local", 0, 4, true)]), "local");
    }

    #[test]
    fn full_peers_are_never_chosen_and_local_is_kept_when_nobody_has_capacity() {
        assert_eq!(pick(&[("local", 9, 4, true), ("b", 4, 4, false)]), "local");
        assert_eq!(pick(&[("local", 4, 4, true), ("b", 3, 4, false)]), "b");
        // Zero capacity is never a choice while anyone has room.
        assert_eq!(pick(&[("local", 4, 4, true), ("z", 0, 0, false)]), "local");
    }

    #[test]
    fn without_a_local_candidate_the_least_loaded_peer_takes_the_overflow() {
        assert_eq!(pick(&[("a", 9, 4, false), ("b", 5, 4, false)]), "b");
    }

    #[test]
    fn peer_ties_depend_on_the_router_salt() {
        let f = Fixture::new(&[
            ("p0", 0, 4, false),
            ("p1", 0, 4, false),
            ("p2", 0, 4, false),
            ("p3", 0, 4, false),
        ]);
        let chosen: std::collections::HashSet<_> = (0..32)
            .map(|seed| LeastLoaded::with_seed(seed).pick(&f.candidates(), &RouteRequest::new()))
            .collect();
        assert!(
            chosen.len() > 1,
            "different routers should break ties differently"
        );
        let again = LeastLoaded::with_seed(5);
        let first = again.pick(&f.candidates(), &RouteRequest::new());
        assert_eq!(first, again.pick(&f.candidates(), &RouteRequest::new()));
    }
}
