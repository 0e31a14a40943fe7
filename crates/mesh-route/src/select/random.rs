//! [`Random`]: a uniform choice among the candidates with capacity, the baseline.

use rand::RngExt;

use super::shared::{SharedRng, indices_with_capacity, traced_backpressure};
use super::{Candidate, RouteRequest, Strategy};

/// A candidate drawn uniformly at random among those with capacity.
///
/// Load is ignored beyond the capacity rule, so this is a baseline to compare the other
/// strategies against, and a way to spread calls in tests. With no candidate with capacity, the
/// choice is [`backpressure`](super::backpressure).
///
/// ```
/// # use mesh_core::{NodeId, NodeState};
/// # use mesh_route::select::{Candidate, RouteRequest, Strategy};
/// use mesh_route::select::Random;
///
/// # let ids: Vec<NodeId> = ["a", "b"].iter().map(|n| n.parse()).collect::<Result<_, _>>()?;
/// # let states: Vec<_> = ids.iter().map(|id| NodeState::new(id.clone(), 1, 1)).collect();
/// # let candidate = |i: usize, pending| Candidate {
/// #     node_id: &ids[i], local: false, pending, max_concurrency: 4, state: &states[i],
/// # };
/// // a is full, b has room.
/// let candidates = [candidate(0, 4), candidate(1, 2)];
/// assert_eq!(Random::with_seed(7).pick(&candidates, &RouteRequest::new()), 1);
/// # Ok::<(), mesh_core::NodeIdError>(())
/// ```
#[derive(Debug)]
pub struct Random {
    rng: SharedRng,
}

seeded_constructors!(Random);

impl Strategy for Random {
    fn name(&self) -> &'static str {
        "random"
    }

    fn pick(&self, candidates: &[Candidate<'_>], _request: &RouteRequest) -> usize {
        let roomy: Vec<usize> = indices_with_capacity(candidates).collect();
        if roomy.is_empty() {
            return traced_backpressure(self.name(), candidates);
        }
        let chosen = roomy[self.rng.draw(|rng| rng.random_range(0..roomy.len()))];
        let c = &candidates[chosen];
        tracing::trace!(
            strategy = self.name(),
            chosen = %c.node_id,
            ratio = c.load_ratio(),
            with_capacity = roomy.len(),
            "a uniformly random candidate"
        );
        chosen
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::testing::{Fixture, tally};

    #[test]
    fn choices_are_uniform_among_nodes_with_capacity() {
        let f = Fixture::new(&[
            ("a", 3, 4, false),
            ("b", 0, 64, false),
            ("c", 4, 4, true),
            ("d", 1, 2, false),
            ("e", 0, 0, false),
            ("f", 7, 8, false),
        ]);
        let picks = 10_000;
        let counts = tally(&f, &Random::with_seed(5), picks);
        assert_eq!(
            counts[2] + counts[4],
            0,
            "full nodes were chosen: {counts:?}"
        );
        for i in [0, 1, 3, 5] {
            let share = counts[i] as f64 / picks as f64;
            assert!((share - 0.25).abs() < 0.02, "{counts:?}");
        }
    }
}
