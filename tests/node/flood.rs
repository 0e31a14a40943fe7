//! A live node flooded with random datagrams on its gossip port keeps its membership and keeps
//! routing: garbage is counted and dropped before it reaches foca (only datagrams whose header
//! says "SWIM packet" go on to foca, which rejects them), and nothing is dropped for overload.
//!
//! The flood is seeded, so the test knows what each datagram is and asserts the exact count of
//! every kind of drop. It is sent as fast as the node accounts for it, 32 datagrams at a time:
//! that keeps the kernel's socket buffer from overflowing (a datagram lost there is counted
//! nowhere), so the counts are exact on any machine, however loaded. Overflowing the node's
//! own input queue is tested apart, on simulated time (mesh-core's `cluster.rs`).

use crate::support;

use std::{sync::Arc, time::Duration};

use mesh::{
    Timing,
    core::{Identity, MeshStats, NodeState},
};
use mesh_demo::finish;
use rand::{RngExt, SeedableRng, rngs::StdRng};
use support::{Spec, action, bounded, cluster, drain_events};

/// Datagrams in flight at once: well within a socket buffer (208 KiB by default on Linux).
const ROUND: usize = 32;

/// What the node does with a datagram, by the wire rules.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Expected {
    malformed: u64,
    unauthenticated: u64,
    foca: u64,
    states_rejected: u64,
    /// Decoded and used (a random body that happens to be a valid state or leave notice).
    accepted: u64,
}

impl Expected {
    /// The envelope rules written out here (DESIGN.md's wire format), not taken from the code
    /// under test; the bodies go through the real decoders.
    fn add(&mut self, datagram: &[u8]) {
        let header_ok = (4..=1400).contains(&datagram.len())
            && datagram[..3] == [b'm', b's', 1]
            && (1..=4).contains(&(datagram[3] & 0x7f));
        if !header_ok {
            self.malformed += 1;
            return;
        }
        let body = &datagram[4..];
        match datagram[3] {
            kind if kind & 0x80 != 0 => self.unauthenticated += 1,
            1 => self.foca += 1,
            2 if NodeState::decode(body).is_err() => self.states_rejected += 1,
            3 if postcard::from_bytes::<Identity>(body).is_err() => self.malformed += 1,
            // Lifeguard's messages are the crate's own; the seeded flood never makes one.
            4 => panic!("the flood made a lifeguard datagram: write its rule here first"),
            _ => self.accepted += 1,
        }
    }

    /// Datagrams that end in a drop counter.
    fn counted(&self) -> u64 {
        self.malformed + self.unauthenticated + self.foca + self.states_rejected
    }
}

fn counted(stats: &MeshStats) -> u64 {
    stats.dropped_malformed
        + stats.dropped_unauthenticated
        + stats.dropped_overload
        + stats.foca_rejected
        + stats.states_rejected
}

/// 20 000 random datagrams of 0–1499 bytes; a third carry a valid envelope header (kinds foca,
/// state push and leave in turn), so the garbage reaches the decoders behind it.
fn flood() -> Vec<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(42);
    (0..20_000u32)
        .map(|i| {
            let len = rng.random_range(0..1500);
            let mut datagram: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            if i % 3 == 0 && datagram.len() >= 4 {
                datagram[..4].copy_from_slice(&[b'm', b's', 1, 1 + (i % 9 / 3) as u8]);
            }
            datagram
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_random_datagrams_changes_nothing_that_matters() {
    // The lan preset: the flood competes with the cluster for the machine's two cores, and
    // the point is what the garbage does, not how a starved scheduler delays probes.
    let nodes = cluster(vec![
        Spec::new("target", 1).timing(Timing::lan()),
        Spec::new("worker-a", 4).timing(Timing::lan()),
        Spec::new("worker-b", 4).timing(Timing::lan()),
    ])
    .await;
    let mut events: Vec<_> = nodes.iter().map(|n| n.node.events()).collect();
    let target = nodes[0].node.gossip_addr();
    let membership = nodes[0].node.membership().clone();
    let _busy = nodes[0].node.load().begin_task(); // the target forwards everything

    let datagrams = Arc::new(flood());
    let mut expected = Expected::default();
    for datagram in datagrams.iter() {
        expected.add(datagram);
    }
    let before = membership.stats();
    let flooding = tokio::spawn({
        let datagrams = Arc::clone(&datagrams);
        async move {
            let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let mut so_far = Expected::default();
            for round in datagrams.chunks(ROUND) {
                for datagram in round {
                    socket.send_to(datagram, target).await.unwrap();
                    so_far.add(datagram);
                }
                // The next round once this one is accounted for.
                let goal = counted(&before) + so_far.counted();
                bounded("a round of the flood to be accounted for", async {
                    while counted(&membership.stats()) < goal {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                })
                .await;
            }
            membership.stats()
        }
    });

    // Routing through the flooded node keeps working meanwhile.
    for _ in 0..10 {
        let stream = nodes[0]
            .client()
            .await
            .execute(action(20))
            .await
            .unwrap()
            .into_inner();
        let response = finish(stream).await.unwrap().response.unwrap();
        assert_ne!(response.executed_by, "target");
    }
    let after = flooding.await.unwrap();
    let delta = |f: fn(&MeshStats) -> u64| f(&after) - f(&before);
    println!(
        "flood: {} datagrams sent; expected {expected:?}; {after:?}",
        datagrams.len()
    );
    assert_eq!(delta(|s| s.dropped_malformed), expected.malformed);
    assert_eq!(
        delta(|s| s.dropped_unauthenticated),
        expected.unauthenticated
    );
    assert_eq!(delta(|s| s.states_rejected), expected.states_rejected);
    // Foca may also reject a stray datagram of the cluster's own (a late ack, say).
    assert!(delta(|s| s.foca_rejected) >= expected.foca, "{after:?}");
    assert_eq!(delta(|s| s.dropped_overload), 0, "no overload drops");
    assert!(expected.malformed > 0 && expected.foca > 0 && expected.states_rejected > 0);

    // Nobody was declared failed and the target still sees everyone.
    for (i, receiver) in events.iter_mut().enumerate() {
        for event in drain_events(receiver) {
            assert!(
                !matches!(event, mesh::MeshEvent::Failed(_) | mesh::MeshEvent::Left(_)),
                "{}: {event:?} during the flood",
                nodes[i].name()
            );
        }
    }
    assert_eq!(nodes[0].node.view().len(), 3);
}
