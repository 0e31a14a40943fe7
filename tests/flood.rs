//! A live node flooded with random datagrams on its gossip port keeps its membership and keeps
//! routing: garbage is counted and dropped before it reaches foca, and the input queue is
//! bounded, so memory is too.

mod support;

use std::time::Duration;

use mesh::{MeshEvent, Timing};
use mesh_demo::finish;
use rand::{RngExt, SeedableRng, rngs::StdRng};
use support::{Spec, action, bounded, cluster};

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
    let _busy = nodes[0].node.load().begin_task(); // the target forwards everything

    let flood = tokio::spawn(async move {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut rng = StdRng::seed_from_u64(42);
        let mut sent = 0u64;
        for i in 0..20_000u32 {
            let len = rng.random_range(0..1500);
            let mut datagram: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            // A third carry a valid envelope header, so the garbage reaches the decoders
            // behind it (foca, node state, leave notices).
            if i % 3 == 0 && datagram.len() >= 4 {
                datagram[..4].copy_from_slice(&[b'm', b's', 1, 1 + (i % 9 / 3) as u8]);
            }
            if socket.send_to(&datagram, target).await.is_ok() {
                sent += 1;
            }
            if i % 256 == 0 {
                tokio::task::yield_now().await;
            }
        }
        sent
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
    let sent = flood.await.unwrap();

    let stats = bounded("the flood to be accounted for", async {
        loop {
            let s = nodes[0].node.membership().stats();
            let dropped = s.dropped_malformed
                + s.dropped_unauthenticated
                + s.dropped_overload
                + s.foca_rejected
                + s.states_rejected;
            if dropped >= sent * 9 / 10 {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    println!("flood: {sent} datagrams sent; {stats:?}");
    assert!(stats.dropped_malformed > 0 && stats.foca_rejected > 0 && stats.states_rejected > 0);

    // Nobody was declared failed and the target still sees everyone.
    for (i, receiver) in events.iter_mut().enumerate() {
        while let Ok(event) = receiver.try_recv() {
            assert!(
                !matches!(event, MeshEvent::Failed(_) | MeshEvent::Left(_)),
                "{}: {event:?} during the flood",
                nodes[i].name()
            );
        }
    }
    assert_eq!(nodes[0].node.view().len(), 3);
}
