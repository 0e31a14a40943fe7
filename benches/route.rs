//! One routing decision on a live cluster: building candidates from the membership view
//! (filters, optimistic accounting) plus the strategy's pick. 8 and 32 nodes on 127.0.0.1.

use std::{hint::black_box, time::Duration};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use mesh::{Node, RouteRequest, Timing};

fn cluster(runtime: &tokio::runtime::Runtime, n: usize) -> Vec<Node> {
    runtime.block_on(async {
        let mut nodes: Vec<Node> = Vec::new();
        for i in 0..n {
            let mut builder = Node::builder()
                .node_id(format!("node-{i}"))
                .unwrap()
                .gossip_bind("127.0.0.1:0".parse().unwrap())
                .grpc_endpoint(format!("http://127.0.0.1:{}", 50_000 + i))
                .timing(Timing::local())
                .max_concurrency(8)
                .tags([("os".to_owned(), "linux".to_owned())].into());
            if let Some(first) = nodes.first() {
                builder = builder.seeds([first.gossip_addr()]);
            }
            nodes.push(builder.start().await.unwrap());
        }
        for node in &nodes {
            tokio::time::timeout(
                Duration::from_secs(60),
                node.membership()
                    .wait_until(|v| v.len() == n && v.peers().iter().all(|p| p.state().is_some())),
            )
            .await
            .unwrap();
        }
        nodes
    })
}

fn route(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut group = c.benchmark_group("route");
    for n in [8, 32] {
        let nodes = cluster(&runtime, n);
        let _busy = nodes[0].load().begin_task();
        let router = nodes[0].router().clone();
        let plain = RouteRequest::new();
        let tagged = RouteRequest::new().require_tag("os", "linux");
        let _guard = runtime.enter();
        group.bench_with_input(BenchmarkId::new("least-loaded", n), &plain, |b, request| {
            b.iter(|| router.route(black_box(request)).unwrap());
        });
        group.bench_with_input(
            BenchmarkId::new("least-loaded-with-tags", n),
            &tagged,
            |b, request| b.iter(|| router.route(black_box(request)).unwrap()),
        );
        runtime.block_on(async {
            for node in &nodes {
                node.shutdown().await;
            }
        });
    }
    group.finish();
}

criterion_group!(benches, route);
criterion_main!(benches);
