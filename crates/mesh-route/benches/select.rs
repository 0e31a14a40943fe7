//! What one routing decision costs in the strategies, for clusters of 10, 100 and 1000
//! candidates.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use mesh_core::{NodeId, NodeState};
use mesh_route::{
    Affinity, Candidate, LeastLoaded, PowerOfTwoChoices, Random, RoundRobin, RouteRequest,
    Strategy, WeightedCapacity,
};

fn fixture(n: usize) -> Vec<(NodeId, NodeState)> {
    (0..n)
        .map(|i| {
            let id = NodeId::new(format!("node-{i:04}")).unwrap();
            let mut state = NodeState::new(id.clone(), 1, 1);
            state.max_concurrency = 8 + (i as u32 % 3) * 8;
            state.pending = (i as u32 * 7) % state.max_concurrency;
            (id, state)
        })
        .collect()
}

fn candidates(nodes: &[(NodeId, NodeState)]) -> Vec<Candidate<'_>> {
    nodes
        .iter()
        .enumerate()
        .map(|(i, (id, state))| Candidate {
            node_id: id,
            local: i == 0,
            pending: state.pending,
            max_concurrency: state.max_concurrency,
            state,
        })
        .collect()
}

fn strategies(c: &mut Criterion) {
    let all: Vec<(&str, Box<dyn Strategy>)> = vec![
        ("least-loaded", Box::new(LeastLoaded::with_seed(1))),
        ("power-of-two", Box::new(PowerOfTwoChoices::with_seed(1))),
        ("round-robin", Box::new(RoundRobin::with_seed(1))),
        ("random", Box::new(Random::with_seed(1))),
        ("weighted", Box::new(WeightedCapacity::with_seed(1))),
        ("affinity", Box::new(Affinity::new())),
    ];
    let request = RouteRequest::new().with_affinity_key(b"sha256:0123456789abcdef".to_vec());
    let mut group = c.benchmark_group("pick");
    for n in [10, 100, 1000] {
        let nodes = fixture(n);
        let candidates = candidates(&nodes);
        for (name, strategy) in &all {
            group.bench_with_input(BenchmarkId::new(*name, n), &candidates, |b, candidates| {
                b.iter(|| strategy.pick(black_box(candidates), &request));
            });
        }
    }
    group.finish();
}

criterion_group!(benches, strategies);
criterion_main!(benches);
