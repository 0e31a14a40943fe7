//! One conformance suite for every [`Strategy`]: what the router may rely on whichever strategy
//! it runs (after chitchat's transport suite, run against every transport).
//!
//! Every strategy, keyless and keyed requests alike:
//! - picks an index in range, for any candidates;
//! - never picks a full node while another has room (a strategy that caps loads, such as
//!   [`Affinity`], may instead fall back to backpressure);
//! - falls back to [`backpressure`] when nobody has capacity;
//! - is reproducible: the same seed (or the same generator) gives the same choices, and the
//!   seed matters to every strategy that draws.
//!
//! A new strategy joins the suite by getting a row in [`every_strategy`].

use std::collections::HashSet;

use rand::{RngExt, SeedableRng, rngs::StdRng};

use super::{
    Affinity, Candidate, LeastLoaded, PowerOfTwoChoices, Random, RoundRobin, RouteRequest,
    Strategy, WeightedCapacity, backpressure, testing::Fixture,
};

/// Candidates as `(name, pending, max_concurrency, local)`, as [`Fixture::new`] takes them.
type Spec = &'static [(&'static str, u32, u32, bool)];
/// Makes a strategy from a shared simulation generator.
type FromRng = fn(&mut StdRng) -> Box<dyn Strategy>;

/// How a strategy uses its seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seeded {
    /// Every choice is a draw: two seeds give different sequences.
    Draws,
    /// The seed only orders or breaks ties: some seeds differ.
    Salt,
}

/// One strategy under test.
struct Row {
    name: &'static str,
    with_seed: fn(u64) -> Box<dyn Strategy>,
    /// For strategies that can share one simulation generator.
    from_rng: Option<FromRng>,
    seeded: Seeded,
    /// Whether it always uses free capacity when there is some (load caps may say otherwise).
    fills_free_capacity: bool,
}

fn every_strategy() -> Vec<Row> {
    vec![
        Row {
            name: "least-loaded",
            with_seed: |seed| Box::new(LeastLoaded::with_seed(seed)),
            from_rng: None,
            seeded: Seeded::Salt,
            fills_free_capacity: true,
        },
        Row {
            name: "power-of-two-choices",
            with_seed: |seed| Box::new(PowerOfTwoChoices::with_seed(seed)),
            from_rng: Some(|rng| Box::new(PowerOfTwoChoices::from_rng(rng))),
            seeded: Seeded::Draws,
            fills_free_capacity: true,
        },
        Row {
            name: "round-robin",
            with_seed: |seed| Box::new(RoundRobin::with_seed(seed)),
            from_rng: None,
            seeded: Seeded::Salt,
            fills_free_capacity: true,
        },
        Row {
            name: "random",
            with_seed: |seed| Box::new(Random::with_seed(seed)),
            from_rng: Some(|rng| Box::new(Random::from_rng(rng))),
            seeded: Seeded::Draws,
            fills_free_capacity: true,
        },
        Row {
            name: "weighted-capacity",
            with_seed: |seed| Box::new(WeightedCapacity::with_seed(seed)),
            from_rng: Some(|rng| Box::new(WeightedCapacity::from_rng(rng))),
            seeded: Seeded::Draws,
            fills_free_capacity: true,
        },
        Row {
            name: "affinity",
            with_seed: |seed| {
                Box::new(Affinity::new().with_keyless_strategy(LeastLoaded::with_seed(seed)))
            },
            from_rng: None,
            seeded: Seeded::Salt,
            fills_free_capacity: false,
        },
    ]
}

/// The `i`-th request of a run: keyless, or keyed with one of a few keys.
fn request(keyed: bool, i: usize) -> RouteRequest {
    if keyed {
        RouteRequest::new().with_affinity_key(format!("key-{}", i % 7))
    } else {
        RouteRequest::new()
    }
}

/// `picks` choices of `strategy` among `f`'s candidates.
fn choices(strategy: &dyn Strategy, f: &Fixture, keyed: bool, picks: usize) -> Vec<usize> {
    let candidates = f.candidates();
    (0..picks)
        .map(|i| strategy.pick(&candidates, &request(keyed, i)))
        .collect()
}

#[test]
fn every_built_in_strategy_is_in_the_suite_under_its_name() {
    let rows = every_strategy();
    for row in &rows {
        assert_eq!((row.with_seed)(1).name(), row.name);
    }
    let names: HashSet<&str> = rows.iter().map(|row| row.name).collect();
    assert_eq!(names.len(), 6);
}

#[test]
fn nobody_with_capacity_falls_back_to_backpressure() {
    // (candidates, who takes every call)
    let cases: [(Spec, &str); 5] = [
        (&[("a", 4, 4, false), ("local", 6, 4, true)], "local"),
        (
            &[
                ("a", 4, 4, false),
                ("b", 5, 4, false),
                ("local", 6, 4, true),
            ],
            "local",
        ),
        (
            &[
                ("a", 4, 4, false),
                ("b", 0, 0, false),
                ("local", 6, 4, true),
            ],
            "local",
        ),
        (&[("a", 8, 4, false), ("b", 5, 4, false)], "b"),
        (
            &[("a", 8, 4, false), ("b", 5, 4, false), ("c", 0, 0, false)],
            "b",
        ),
    ];
    for row in every_strategy() {
        for (spec, expected) in cases {
            let f = Fixture::new(spec);
            assert_eq!(f.name(backpressure(&f.candidates())), expected);
            for keyed in [false, true] {
                let strategy = (row.with_seed)(3);
                let names: Vec<&str> = choices(&*strategy, &f, keyed, 50)
                    .into_iter()
                    .map(|i| f.name(i))
                    .collect();
                assert!(
                    names.iter().all(|n| *n == expected),
                    "{} (keyed: {keyed}) on {spec:?}: {names:?}",
                    row.name
                );
            }
        }
    }
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
    for row in every_strategy() {
        for keyed in [false, true] {
            let strategy = (row.with_seed)(2);
            for chosen in choices(&*strategy, &f, keyed, 1000) {
                assert!(
                    ["b", "e"].contains(&f.name(chosen)),
                    "{} chose {}",
                    row.name,
                    f.name(chosen)
                );
            }
        }
    }
}

#[test]
fn the_only_node_with_room_takes_every_call() {
    let f = Fixture::new(&[("a", 4, 4, true), ("b", 0, 0, false), ("c", 31, 32, false)]);
    for row in every_strategy() {
        for keyed in [false, true] {
            let strategy = (row.with_seed)(1);
            assert_eq!(
                choices(&*strategy, &f, keyed, 100),
                [2; 100],
                "{} (keyed: {keyed})",
                row.name
            );
        }
    }
}

#[test]
fn picks_stay_in_range_and_use_free_capacity_for_any_candidates() {
    let mut shapes = StdRng::seed_from_u64(12);
    let values = [0, 1, 2, 3, 4, 8, 64, u32::MAX - 1, u32::MAX];
    let names = ["a", "b", "c", "d", "e", "f", "g", "h"];
    for round in 0..300 {
        let n = shapes.random_range(1..=names.len());
        let local = shapes.random_range(0..=n); // n: no local candidate
        let spec: Vec<(&str, u32, u32, bool)> = (0..n)
            .map(|i| {
                let pending = values[shapes.random_range(0..values.len())];
                let max = values[shapes.random_range(0..values.len())];
                (names[i], pending, max, i == local)
            })
            .collect();
        let f = Fixture::new(&spec);
        let candidates: Vec<Candidate<'_>> = f.candidates();
        let any_room = candidates.iter().any(Candidate::has_capacity);
        for row in every_strategy() {
            let strategy = (row.with_seed)(round);
            for keyed in [false, true] {
                for chosen in choices(&*strategy, &f, keyed, 8) {
                    assert!(chosen < n, "{}: {chosen} of {n} on {spec:?}", row.name);
                    if any_room && row.fills_free_capacity {
                        assert!(
                            candidates[chosen].has_capacity(),
                            "{} chose a full node on {spec:?}",
                            row.name
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn the_same_seed_gives_the_same_choices_and_the_seed_matters() {
    // Fixtures and seed pairs the strategies were first tested with, one each.
    let fixtures: [(Spec, u64); 3] = [
        (
            &[
                ("a", 0, 4, false),
                ("b", 0, 4, false),
                ("c", 0, 4, false),
                ("d", 0, 4, false),
            ],
            11,
        ),
        (
            &[("a", 0, 4, false), ("b", 0, 4, false), ("c", 0, 4, false)],
            21,
        ),
        (
            &[("a", 0, 4, false), ("b", 1, 8, false), ("c", 2, 4, false)],
            31,
        ),
    ];
    for row in every_strategy() {
        for (spec, seed) in fixtures {
            let f = Fixture::new(spec);
            for keyed in [false, true] {
                let run = |seed| choices(&*(row.with_seed)(seed), &f, keyed, 64);
                let once = run(seed);
                assert_eq!(once, run(seed), "{} (keyed: {keyed})", row.name);
                let affinity_keyed = row.name == "affinity" && keyed;
                if affinity_keyed {
                    // Keys are placed by hashing alone: the same on every router.
                    assert!((0..16).all(|other| run(other) == once));
                } else if row.seeded == Seeded::Draws {
                    assert_ne!(once, run(seed + 1), "{} (keyed: {keyed})", row.name);
                } else if spec.iter().all(|node| node.1 == 0) {
                    // A salt only orders nodes or breaks ties: all-idle nodes are all tied.
                    let sequences: HashSet<Vec<usize>> = (0..16).map(run).collect();
                    assert!(sequences.len() > 1, "{} ignores its seed", row.name);
                }
            }
        }
    }
}

#[test]
fn routers_seeded_from_one_generator_are_reproducible() {
    let f = Fixture::new(&[("a", 0, 4, false), ("b", 0, 4, false), ("c", 0, 4, false)]);
    for row in every_strategy() {
        let Some(from_rng) = row.from_rng else {
            continue;
        };
        let run = |seed| -> Vec<usize> {
            let mut simulation = StdRng::seed_from_u64(seed);
            let routers: Vec<_> = (0..3).map(|_| from_rng(&mut simulation)).collect();
            routers
                .iter()
                .flat_map(|router| choices(&**router, &f, false, 16))
                .collect()
        };
        assert_eq!(run(8), run(8), "{}", row.name);
        assert_ne!(run(8), run(9), "{}", row.name);
    }
}
