//! [`WeightedCapacity`]: a random candidate, weighted by its free slots.

use rand::RngExt;

use super::shared::{SharedRng, traced_backpressure};
use super::{Candidate, RouteRequest, Strategy};

/// A random candidate, chosen with probability proportional to its free slots
/// (`max_concurrency - pending`).
///
/// Calls flow to where the room is — a node with 30 free slots gets three times the calls of one
/// with 10 — so heterogeneous nodes fill at similar rates, while the randomness keeps routers
/// that share a stale view from all choosing the same node. Full nodes have no free slots and are
/// never chosen; when nobody has a free slot the choice is [`backpressure`](super::backpressure).
///
/// ```
/// # use mesh_core::{NodeId, NodeState};
/// # use mesh_route::select::{Candidate, RouteRequest, Strategy};
/// use mesh_route::select::WeightedCapacity;
///
/// # let ids: Vec<NodeId> = ["a", "b"].iter().map(|n| n.parse()).collect::<Result<_, _>>()?;
/// # let states: Vec<_> = ids.iter().map(|id| NodeState::new(id.clone(), 1, 1)).collect();
/// # let candidate = |i: usize, pending, max_concurrency| Candidate {
/// #     node_id: &ids[i], local: false, pending, max_concurrency, state: &states[i],
/// # };
/// // a has 3 free slots, b has 1: a gets about three calls in four.
/// let candidates = [candidate(0, 1, 4), candidate(1, 3, 4)];
/// let weighted = WeightedCapacity::with_seed(7);
/// let to_a = (0..1000)
///     .filter(|_| weighted.pick(&candidates, &RouteRequest::new()) == 0)
///     .count();
/// assert!((700..800).contains(&to_a));
/// # Ok::<(), mesh_core::NodeIdError>(())
/// ```
#[derive(Debug)]
pub struct WeightedCapacity {
    rng: SharedRng,
}

seeded_constructors!(WeightedCapacity);

impl Strategy for WeightedCapacity {
    fn name(&self) -> &'static str {
        "weighted-capacity"
    }

    fn pick(&self, candidates: &[Candidate<'_>], _request: &RouteRequest) -> usize {
        let total_free: u64 = candidates.iter().map(|c| u64::from(c.free_slots())).sum();
        // A ticket in `0..total_free` falls in the stretch of exactly one candidate's free slots.
        let ticket = (total_free > 0).then(|| self.rng.draw(|rng| rng.random_range(0..total_free)));
        let chosen = ticket.and_then(|mut ticket| {
            candidates.iter().position(|c| {
                let free = u64::from(c.free_slots());
                if ticket < free {
                    return true;
                }
                ticket -= free;
                false
            })
        });
        let Some(chosen) = chosen else {
            return traced_backpressure(self.name(), candidates);
        };
        let c = &candidates[chosen];
        tracing::trace!(
            strategy = self.name(),
            chosen = %c.node_id,
            free_slots = c.free_slots(),
            total_free,
            "a random candidate weighted by free slots"
        );
        chosen
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::testing::{Fixture, tally};

    #[test]
    fn frequencies_follow_free_slots() {
        // Free slots 1, 3, 0, 6, 0 (over the limit), 0 (no capacity at all): 10 in total.
        let f = Fixture::new(&[
            ("a", 3, 4, false),
            ("b", 1, 4, true),
            ("c", 8, 8, false),
            ("d", 10, 16, false),
            ("e", 9, 4, false),
            ("f", 0, 0, false),
        ]);
        let picks = 10_000;
        let counts = tally(&f, &WeightedCapacity::with_seed(9), picks);
        assert_eq!(
            counts[2] + counts[4] + counts[5],
            0,
            "full nodes were chosen: {counts:?}"
        );
        for (i, weight) in [(0, 0.1), (1, 0.3), (3, 0.6)] {
            let share = counts[i] as f64 / picks as f64;
            assert!((share - weight).abs() < 0.02, "{counts:?}");
        }
    }

    #[test]
    fn huge_limits_do_not_overflow() {
        let f = Fixture::new(&[
            ("a", 0, u32::MAX, false),
            ("b", 0, u32::MAX, false),
            ("c", u32::MAX - 1, u32::MAX, false),
        ]);
        let counts = tally(&f, &WeightedCapacity::with_seed(3), 1000);
        assert!(counts[0] > 400 && counts[1] > 400, "{counts:?}");
    }
}
