//! [`PowerOfTwoChoices`]: the less loaded of two random candidates with capacity
//! (Mitzenmacher, 2001; the rule of tower's `balance::p2c`).

use std::cmp::Ordering;

use rand::RngExt;

use super::shared::{SharedRng, indices_with_capacity, traced_backpressure};
use super::{Candidate, RouteRequest, Strategy};

/// The less loaded of two distinct candidates drawn at random among those with capacity; the
/// local node wins ties.
///
/// This is the "power of two choices" (Mitzenmacher, *The Power of Two Choices in Randomized
/// Load Balancing*, IEEE TPDS 12(10), 2001), the rule behind tower's `balance::p2c`. Placing `n`
/// calls on `n` nodes, one random choice leaves the busiest node with about
/// `ln n / ln ln n` calls; the better of two random choices brings that down to
/// `ln ln n / ln 2 + O(1)`. And unlike always taking the global minimum, routers working from
/// the same stale view do not all herd onto the same node.
///
/// A consequence worth knowing: a node more loaded than every other node with capacity is never
/// chosen, since whichever node it is drawn with beats it. With one candidate
/// with capacity that one is chosen; with none, the choice is [`backpressure`](super::backpressure).
///
/// ```
/// # use mesh_core::{NodeId, NodeState};
/// # use mesh_route::select::{Candidate, RouteRequest, Strategy};
/// use mesh_route::select::PowerOfTwoChoices;
///
/// # let ids: Vec<NodeId> = ["a", "b", "c"].iter().map(|n| n.parse()).collect::<Result<_, _>>()?;
/// # let states: Vec<_> = ids.iter().map(|id| NodeState::new(id.clone(), 1, 1)).collect();
/// # let candidate = |i: usize, pending| Candidate {
/// #     node_id: &ids[i], local: false, pending, max_concurrency: 4, state: &states[i],
/// # };
/// // a: 1 of 4 busy, b: full, c: 3 of 4 busy.
/// let candidates = [candidate(0, 1), candidate(1, 4), candidate(2, 3)];
/// let p2c = PowerOfTwoChoices::with_seed(7);
/// // b is full and c loses to a whenever both are drawn.
/// assert_eq!(p2c.pick(&candidates, &RouteRequest::new()), 0);
/// # Ok::<(), mesh_core::NodeIdError>(())
/// ```
#[derive(Debug)]
pub struct PowerOfTwoChoices {
    rng: SharedRng,
}

seeded_constructors!(PowerOfTwoChoices);

impl Strategy for PowerOfTwoChoices {
    fn name(&self) -> &'static str {
        "power-of-two-choices"
    }

    fn pick(&self, candidates: &[Candidate<'_>], _request: &RouteRequest) -> usize {
        let roomy: Vec<usize> = indices_with_capacity(candidates).collect();
        let (first, second) = match roomy.as_slice() {
            [] => return traced_backpressure(self.name(), candidates),
            [only] => {
                tracing::trace!(
                    strategy = self.name(),
                    chosen = %candidates[*only].node_id,
                    "the only candidate with capacity"
                );
                return *only;
            }
            _ => self.rng.draw(|rng| {
                // Two distinct positions, uniformly: draw the second among the others.
                let first = rng.random_range(0..roomy.len());
                let second = rng.random_range(0..roomy.len() - 1);
                let second = if second >= first { second + 1 } else { second };
                (roomy[first], roomy[second])
            }),
        };
        let (a, b) = (&candidates[first], &candidates[second]);
        let chosen = match a.load_ratio().total_cmp(&b.load_ratio()) {
            Ordering::Less => first,
            Ordering::Greater => second,
            Ordering::Equal if b.local => second,
            Ordering::Equal => first,
        };
        let (winner, loser) = if chosen == first { (a, b) } else { (b, a) };
        tracing::trace!(
            strategy = self.name(),
            chosen = %winner.node_id,
            ratio = winner.load_ratio(),
            other = %loser.node_id,
            other_ratio = loser.load_ratio(),
            "the less loaded of two random candidates"
        );
        chosen
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::testing::{Fixture, tally};

    #[test]
    fn the_less_loaded_of_two_wins_and_local_wins_ties() {
        let p2c = PowerOfTwoChoices::with_seed(1);
        // With exactly two candidates both are always drawn.
        let f = Fixture::new(&[("a", 3, 4, false), ("b", 1, 4, false)]);
        assert_eq!(tally(&f, &p2c, 100), [0, 100]);
        let f = Fixture::new(&[("a", 2, 4, false), ("local", 1, 2, true)]);
        assert_eq!(tally(&f, &p2c, 100), [0, 100]);
        // Ties between peers go either way.
        let f = Fixture::new(&[("a", 1, 4, false), ("b", 1, 4, false)]);
        assert!(tally(&f, &p2c, 100).iter().all(|&n| n > 20));
    }

    #[test]
    fn full_nodes_are_never_chosen_while_another_has_room() {
        let f = Fixture::new(&[
            ("a", 0, 0, false),
            ("b", 2, 4, false),
            ("c", 4, 4, true),
            ("d", 9, 4, false),
            ("e", 3, 4, false),
        ]);
        assert_eq!(f.name(1), "b");
        let counts = tally(&f, &PowerOfTwoChoices::with_seed(2), 1000);
        assert_eq!(counts[0] + counts[2] + counts[3], 0, "{counts:?}");
        // b beats e whenever both are drawn, and they are the only two with room.
        assert_eq!(counts[1], 1000);

        let f = Fixture::new(&[("a", 4, 4, true), ("b", 3, 4, false), ("c", 8, 4, false)]);
        assert_eq!(
            tally(&f, &PowerOfTwoChoices::with_seed(2), 100),
            [0, 100, 0]
        );
    }

    #[test]
    fn choices_follow_the_two_choice_distribution() {
        // Three nodes with room and distinct loads: of the three equally likely pairs, the least
        // loaded wins two and the middle one wins one; the most loaded never wins.
        let f = Fixture::new(&[("a", 1, 8, false), ("b", 2, 8, false), ("c", 3, 8, false)]);
        let picks = 10_000;
        let counts = tally(&f, &PowerOfTwoChoices::with_seed(4), picks);
        let share = |n: usize| n as f64 / picks as f64;
        assert!((share(counts[0]) - 2.0 / 3.0).abs() < 0.02, "{counts:?}");
        assert!((share(counts[1]) - 1.0 / 3.0).abs() < 0.02, "{counts:?}");
        assert_eq!(counts[2], 0);

        // With n nodes the least loaded is in the drawn pair with probability 2/n.
        let f = Fixture::new(&[
            ("a", 5, 8, false),
            ("b", 4, 8, false),
            ("c", 0, 8, false),
            ("d", 6, 8, false),
            ("e", 7, 8, false),
        ]);
        let counts = tally(&f, &PowerOfTwoChoices::with_seed(5), picks);
        assert!((share(counts[2]) - 2.0 / 5.0).abs() < 0.02, "{counts:?}");
        assert_eq!(counts[4], 0);
    }
}
