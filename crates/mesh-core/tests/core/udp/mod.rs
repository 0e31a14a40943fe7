//! Helpers for tests on real UDP (127.0.0.1, ephemeral ports): builders, bounded waits, and
//! cluster formation through one seed.
#![allow(dead_code, unreachable_pub)] // Each test binary uses a different subset.

use std::{future::Future, net::SocketAddr, time::Duration};

use mesh_core::{Membership, MembershipBuilder, NodeId, Timing};

/// Generous: an upper bound for a loaded CI machine, not an expectation.
pub const BOUND: Duration = Duration::from_secs(30);

/// Waits for `fut`, failing the test with `what` after [`BOUND`].
pub async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {BOUND:?} waiting for {what}"))
}

/// A node on 127.0.0.1 with an ephemeral port, local timing and 4 slots.
pub fn builder(name: &str, seeds: &[SocketAddr]) -> MembershipBuilder {
    Membership::builder(NodeId::new(name).unwrap())
        .bind_addr("127.0.0.1:0".parse().unwrap())
        .seeds(seeds.iter().copied())
        .timing(Timing::local())
        .max_concurrency(4)
}

/// Starts `n` nodes named `{prefix}-{i}` from `start(name, seeds)`, all seeded with the first,
/// and waits until every node sees all of them.
pub async fn cluster<F, Fut>(prefix: &str, n: usize, mut start: F) -> Vec<Membership>
where
    F: FnMut(String, Vec<SocketAddr>) -> Fut,
    Fut: Future<Output = Membership>,
{
    let seed = start(format!("{prefix}-0"), Vec::new()).await;
    let seeds = vec![seed.local_addr()];
    let mut nodes = vec![seed];
    for i in 1..n {
        nodes.push(start(format!("{prefix}-{i}"), seeds.clone()).await);
    }
    for member in &nodes {
        bounded(
            "every node to see the whole cluster",
            member.wait_until(|v| v.len() == n),
        )
        .await;
    }
    nodes
}
