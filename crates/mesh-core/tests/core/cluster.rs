//! A cluster's life: joining, load gossip, failures, leaves, restarts, isolation.
//!
//! What needs real sockets runs on real UDP on 127.0.0.1 with ephemeral ports, and asserts
//! only conditions it waits for (bounded polls on the view, never fixed sleeps), so a loaded
//! machine makes it slower, not wrong. What is about failure detection (a crash, a restart
//! before anyone noticed, isolation) or about events that a false failure would change (a
//! graceful leave) runs on simulated time ([`support::one_host`]), where a 100 ms probe
//! timeout is 100 ms whatever the machine's load.

use crate::support;
use crate::udp;

use std::{
    collections::{BTreeMap, VecDeque},
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh_core::{
    LocalStatus, Membership, MembershipView, MeshEvent, NodeId, StartError, StateError, Timing,
    Transport,
};
use support::one_host::{self, Links, SimSocket, simulate};
use tokio::{
    net::UdpSocket,
    sync::{Notify, broadcast},
};
use udp::{bounded, builder};

async fn node(name: &str, seeds: &[SocketAddr]) -> Membership {
    builder(name, seeds)
        .grpc_endpoint(format!("http://{name}.test:50051"))
        .start()
        .await
        .unwrap()
}

/// Starts `n` nodes, all seeded with the first one only.
async fn cluster(n: usize) -> Vec<Membership> {
    udp::cluster(
        "node",
        n,
        |name, seeds| async move { node(&name, &seeds).await },
    )
    .await
}

/// The next event that `wanted` accepts. Fails loudly if the stream lagged: the event may
/// have been among those lost.
async fn next_event_about(
    events: &mut broadcast::Receiver<MeshEvent>,
    node: &str,
    mut wanted: impl FnMut(&MeshEvent) -> bool,
) -> MeshEvent {
    bounded(&format!("an event about {node}"), async {
        loop {
            match events.recv().await {
                Ok(event) if wanted(&event) => return event,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    panic!("the event stream lagged ({missed} lost) waiting for {node}")
                }
                Err(broadcast::error::RecvError::Closed) => panic!("event stream closed"),
            }
        }
    })
    .await
}

fn ids(view: &MembershipView) -> Vec<String> {
    view.members().map(|m| m.node_id().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_joined_through_one_seed_all_see_five_members() {
    let nodes = cluster(5).await;
    for member in &nodes {
        // Every node also gets every peer's state (join sync), with its endpoint.
        let view = bounded(
            "all five, active, with every peer's state",
            member.wait_until(|v| {
                v.len() == 5
                    && v.status() == LocalStatus::Active
                    && v.peers().iter().all(|p| p.state().is_some())
            }),
        )
        .await;
        let mut seen = ids(&view);
        seen.sort();
        assert_eq!(seen, ["node-0", "node-1", "node-2", "node-3", "node-4"]);
        for peer in view.peers() {
            let state = peer.state().unwrap();
            assert_eq!(
                state.grpc_endpoint.as_deref(),
                Some(format!("http://{}.test:50051", peer.node_id()).as_str())
            );
            assert_eq!(state.max_concurrency, 4);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_change_on_one_node_is_seen_by_all_others() {
    let nodes = cluster(5).await;
    let busy = &nodes[3];
    let guards: Vec<_> = (0..3).map(|_| busy.load().begin_task()).collect();
    busy.set_max_concurrency(6);
    busy.set_tags(BTreeMap::from([("pool".to_owned(), "gpu".to_owned())]))
        .unwrap();
    for other in nodes.iter().filter(|n| n.node_id() != busy.node_id()) {
        let view = bounded(
            "the load change to reach every node",
            other.wait_until(|v| {
                v.get("node-3").and_then(|m| m.state()).is_some_and(|s| {
                    s.pending == 3 && s.max_concurrency == 6 && s.tags.contains_key("pool")
                })
            }),
        )
        .await;
        let state = view.get("node-3").unwrap().state().unwrap();
        assert_eq!(state.load_ratio(), 0.5);
        assert_eq!(state.tags.get("pool").map(String::as_str), Some("gpu"));
        assert!(view.get("node-3").unwrap().age().is_some());
    }
    drop(guards);
    for other in &nodes {
        bounded(
            "the load to drop back to zero everywhere",
            other.wait_until(|v| {
                v.get("node-3")
                    .and_then(|m| m.state())
                    .is_some_and(|s| s.pending == 0)
            }),
        )
        .await;
    }
}

/// Five members on simulated time, seeded with the first.
async fn sim_cluster(links: &Links) -> Vec<Membership> {
    one_host::cluster("node", 5, links, |b| b).await
}

#[test]
fn a_node_dropped_without_leaving_is_reported_failed_by_every_other_node() {
    simulate(11, async {
        let links = Links::default();
        let nodes = sim_cluster(&links).await;
        let mut events: Vec<_> = nodes.iter().map(Membership::events).collect();
        let victim = nodes[2].identity();
        nodes[2].shutdown().await;
        for (i, member) in nodes.iter().enumerate() {
            if i == 2 {
                continue;
            }
            let event = next_event_about(&mut events[i], "node-2", |e| {
                matches!(e, MeshEvent::Failed(id) | MeshEvent::Left(id) if id.node_id().as_str() == "node-2")
            })
            .await;
            assert_eq!(
                event,
                MeshEvent::Failed(victim.clone()),
                "on {}",
                member.node_id()
            );
            let view = bounded(
                "node-2 to leave the view",
                member.wait_until(|v| v.len() == 4),
            )
            .await;
            assert!(view.get("node-2").is_none());
        }
        // Nobody else was reported failed or left on the way.
        for (i, receiver) in events.iter_mut().enumerate() {
            for event in one_host::drain(receiver) {
                assert!(
                    !matches!(&event, MeshEvent::Failed(id) | MeshEvent::Left(id) if id.node_id().as_str() != "node-2"),
                    "on node-{i}: {event:?}"
                );
            }
        }
    });
}

#[test]
fn a_graceful_leave_is_reported_as_left() {
    simulate(12, async {
        let links = Links::default();
        let nodes = sim_cluster(&links).await;
        let mut events: Vec<_> = nodes.iter().map(Membership::events).collect();
        let leaver = nodes[4].identity();
        bounded("leave to return", nodes[4].leave()).await.unwrap();
        for (i, member) in nodes.iter().enumerate().take(4) {
            let event = next_event_about(&mut events[i], "node-4", |e| {
                matches!(e, MeshEvent::Failed(id) | MeshEvent::Left(id) if id.node_id().as_str() == "node-4")
            })
            .await;
            assert_eq!(
                event,
                MeshEvent::Left(leaver.clone()),
                "on {}",
                member.node_id()
            );
            assert!(member.view().get("node-4").is_none());
        }
        // Leaving is final for the handle.
        assert!(matches!(
            nodes[4].set_draining(false),
            Err(StateError::Stopped)
        ));
    });
}

#[test]
fn a_restart_with_the_same_node_id_replaces_the_old_entry() {
    simulate(13, async {
        let links = Links::default();
        let mut nodes = one_host::cluster("node", 4, &links, |b| b).await;
        let old = nodes[1].identity();
        let seed_addr = nodes[0].local_addr();
        let mut watchers: Vec<_> = nodes.iter().map(Membership::events).collect();

        // The process dies without a word and comes back at once on a new port with the same
        // id, before the failure detector could notice.
        nodes[1].shutdown().await;
        let restarted = one_host::start(one_host::builder("node-1", &[seed_addr]), &links).await;
        let new = restarted.identity();
        assert_ne!(new.addr(), old.addr());
        assert!(new.generation() > old.generation());
        nodes[1] = restarted;

        for (i, member) in nodes.iter().enumerate() {
            if i == 1 {
                continue;
            }
            let view = bounded(
                "the new life to replace the old one",
                member.wait_until(|v| v.get("node-1").is_some_and(|m| m.identity() == &new)),
            )
            .await;
            assert_eq!(
                view.len(),
                4,
                "never two entries for node-1: {:?}",
                ids(&view)
            );
            let event = next_event_about(&mut watchers[i], "node-1", |e| {
                matches!(e, MeshEvent::Rejoined { current, .. } if current == &new)
                    || matches!(e, MeshEvent::Joined(id) if id == &new)
            })
            .await;
            assert_eq!(
                event,
                MeshEvent::Rejoined {
                    previous: old.clone(),
                    current: new.clone()
                }
            );
        }
        // Over the next probe periods, no view ever shows the old life again.
        let until = tokio::time::Instant::now() + Timing::local().probe_period * 10;
        while tokio::time::Instant::now() < until {
            for member in &nodes {
                let view = member.view();
                let lives: Vec<_> = view
                    .members()
                    .filter(|m| m.node_id().as_str() == "node-1")
                    .collect();
                assert_eq!(lives.len(), 1, "on {}", member.node_id());
                assert_eq!(lives[0].identity(), &new);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_state_is_refused_with_size_and_limit_and_the_node_keeps_working() {
    let nodes = cluster(2).await;
    let big: BTreeMap<String, String> = (0..40)
        .map(|i| (format!("property-{i}"), "x".repeat(40)))
        .collect();
    let error = nodes[0].set_tags(big).unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(error, StateError::TooLarge { limit: 1024, .. }),
        "{error:?}"
    );
    assert!(message.contains("over the 1024-byte limit"), "{message}");

    let bad_tag = BTreeMap::from([(String::new(), "x".to_owned())]);
    let error = nodes[0].set_tags(bad_tag).unwrap_err();
    assert_eq!(error.to_string(), "invalid tag \"\": the key is empty");

    let error = nodes[0]
        .set_grpc_endpoint(Some("http://has space:1".into()))
        .unwrap_err();
    assert!(error.to_string().contains("whitespace"), "{error}");

    // The previous state stays in force and changes still flow.
    nodes[0]
        .set_tags(BTreeMap::from([("os".to_owned(), "linux".to_owned())]))
        .unwrap();
    bounded(
        "the valid change to arrive",
        nodes[1].wait_until(|v| {
            v.get("node-0")
                .and_then(|m| m.state())
                .is_some_and(|s| s.tags.get("os").is_some_and(|os| os == "linux"))
        }),
    )
    .await;
}

#[tokio::test]
async fn bad_node_ids_are_rejected_with_the_value_and_the_rule() {
    let error = NodeId::new("worker:1").unwrap_err();
    assert_eq!(
        error.to_string(),
        "invalid node id \"worker:1\": it contains a character outside [A-Za-z0-9._-]; \
         a node id is 1-63 characters of [A-Za-z0-9._-] (a DNS label)"
    );
    assert!(NodeId::new("").is_err());
    assert!(NodeId::new("a".repeat(64)).is_err());
}

#[tokio::test]
async fn binding_to_an_unspecified_address_needs_an_advertise_address() {
    let error = Membership::builder(NodeId::new("a").unwrap())
        .bind_addr("0.0.0.0:0".parse().unwrap())
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(error, StartError::AdvertiseRequired { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("set an advertise address"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_are_dropped_and_counted_while_the_node_keeps_working() {
    let nodes = cluster(3).await;
    let target = nodes[0].local_addr();
    let attacker = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let garbage: Vec<Vec<u8>> = vec![
        vec![],
        b"hello".to_vec(),
        b"ms".to_vec(),
        b"ms\x02\x01".to_vec(),                 // unknown envelope version
        b"ms\x01\x55payload".to_vec(),          // unknown kind
        b"ms\x01\x81ciphertext".to_vec(),       // encrypted, but we have no key
        vec![0xAB; 1500],                       // over the datagram budget
        b"ms\x01\x01\xff\xff\xff\xff".to_vec(), // valid envelope, garbage foca packet
        b"ms\x01\x02\x00\x01".to_vec(),         // valid envelope, garbage node state
        b"ms\x01\x03\x09".to_vec(),             // valid envelope, garbage leave notice
    ];
    // Counted from before the first send: the receive task may count them all before the
    // last send returns.
    let before = nodes[0].stats();
    for datagram in &garbage {
        attacker.send_to(datagram, target).await.unwrap();
    }
    let dropped = |s: &mesh_core::MeshStats| {
        s.dropped_malformed + s.dropped_unauthenticated + s.foca_rejected + s.states_rejected
    };
    let stats = bounded("every garbage datagram to be counted", async {
        loop {
            let s = nodes[0].stats();
            if dropped(&s) >= dropped(&before) + garbage.len() as u64 {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        stats.dropped_malformed - before.dropped_malformed >= 6,
        "{stats:?}"
    );
    assert!(
        stats.dropped_unauthenticated - before.dropped_unauthenticated >= 1,
        "{stats:?}"
    );
    assert!(stats.foca_rejected - before.foca_rejected >= 1, "{stats:?}");
    assert!(
        stats.states_rejected - before.states_rejected >= 1,
        "{stats:?}"
    );
    assert!(stats.datagrams_received - before.datagrams_received >= garbage.len() as u64);

    // Still a healthy member that gossips load.
    let _task = nodes[0].load().begin_task();
    for other in &nodes[1..] {
        bounded(
            "load from the attacked node",
            other.wait_until(|v| {
                v.get("node-0")
                    .and_then(|m| m.state())
                    .is_some_and(|s| s.pending == 1)
            }),
        )
        .await;
    }
    // (Waited for, not read once: on real sockets a loaded machine may delay a probe answer;
    // that is not what the garbage did.)
    bounded(
        "the attacked node to see the whole cluster",
        nodes[0].wait_until(|v| v.len() == 3),
    )
    .await;
}

/// Datagrams the test hands to a node's socket all at once: the receive task reads them
/// back to back, faster than any membership task could take them.
#[derive(Default)]
struct Burst {
    datagrams: Mutex<VecDeque<(Vec<u8>, SocketAddr)>>,
    arrived: Notify,
}

/// A simulated socket that delivers a [`Burst`] before anything else.
struct BurstySocket {
    socket: SimSocket,
    burst: Arc<Burst>,
}

impl Transport for BurstySocket {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        loop {
            if let Some((datagram, from)) = self.burst.datagrams.lock().unwrap().pop_front() {
                buf[..datagram.len()].copy_from_slice(&datagram);
                return Ok((datagram.len(), from));
            }
            tokio::select! {
                received = self.socket.recv_from(buf) => return received,
                () = self.burst.arrived.notified() => {}
            }
        }
    }

    fn try_send_to(&self, datagram: &[u8], target: SocketAddr) -> io::Result<usize> {
        self.socket.try_send_to(datagram, target)
    }
}

#[test]
fn a_burst_beyond_the_input_queue_is_dropped_and_counted_while_the_node_keeps_working() {
    simulate(15, async {
        let links = Links::default();
        let burst = Arc::new(Burst::default());
        let target = one_host::start_on(
            one_host::builder("target", &[]),
            BurstySocket {
                socket: SimSocket::bind(&links).await,
                burst: Arc::clone(&burst),
            },
        )
        .await;
        let peer = one_host::start(one_host::builder("peer", &[target.local_addr()]), &links).await;
        for member in [&target, &peer] {
            one_host::until("both members", member, |v| v.len() == 2).await;
        }
        let mut events = [target.events(), peer.events()];

        // Well-enveloped SWIM packets: the receive task cannot tell them from real ones, so
        // each must go through the queue to the membership task (where foca rejects it).
        const SENT: u64 = 5_000;
        let garbage = b"ms\x01\x01\xff\xff\xff\xff\xff\xff".to_vec();
        let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let before = target.stats();
        burst
            .datagrams
            .lock()
            .unwrap()
            .extend((0..SENT).map(|_| (garbage.clone(), from)));
        burst.arrived.notify_one();
        let after = bounded("every datagram of the burst to be accounted for", async {
            loop {
                let s = target.stats();
                let accounted = (s.dropped_overload - before.dropped_overload)
                    + (s.foca_rejected - before.foca_rejected);
                if accounted >= SENT {
                    return s;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        let dropped = after.dropped_overload - before.dropped_overload;
        let taken = after.foca_rejected - before.foca_rejected;
        assert_eq!(dropped + taken, SENT, "{after:?}");
        assert!(
            (1..=1024).contains(&taken),
            "the queue takes what it holds (1024 datagrams), no more: took {taken}"
        );
        assert!(
            dropped >= SENT - 1024,
            "the rest is dropped and counted: {dropped}"
        );
        assert!(after.datagrams_received - before.datagrams_received >= SENT);

        // The node is still a member that gossips its load, and nobody noticed the burst.
        let _task = target.load().begin_task();
        one_host::until("the target's new load", &peer, |v| {
            v.get("target")
                .and_then(|m| m.state())
                .is_some_and(|s| s.pending == 1)
        })
        .await;
        for receiver in &mut events {
            for event in one_host::drain(receiver) {
                assert!(
                    !matches!(event, MeshEvent::Failed(_) | MeshEvent::Left(_)),
                    "{event:?}"
                );
            }
        }
        assert_eq!(target.view().len(), 2);
        assert_eq!(peer.view().len(), 2);
    });
}

/// A discovery source whose answer the test changes while the node runs.
#[derive(Clone, Default)]
struct Settable(std::sync::Arc<std::sync::Mutex<Vec<SocketAddr>>>);

impl mesh_discovery::Discover for Settable {
    async fn discover(&self) -> Result<Vec<SocketAddr>, mesh_discovery::DiscoveryError> {
        Ok(self.0.lock().unwrap().clone())
    }
}

#[test]
fn an_isolated_node_keeps_announcing_to_discovery_results() {
    simulate(14, async {
        let links = Links::default();
        let discovery = Settable::default();
        let lonely = one_host::start(
            one_host::builder("lonely", &[]).discovery(discovery.clone()),
            &links,
        )
        .await;
        assert_eq!(lonely.view().status(), LocalStatus::Joining);

        // Peers appear in discovery only later, as pods of a scale-up would.
        let others = one_host::cluster("other", 2, &links, |b| b).await;
        discovery
            .0
            .lock()
            .unwrap()
            .extend([others[1].local_addr(), lonely.local_addr()]);
        let view = bounded(
            "the lonely node to find the cluster",
            lonely.wait_until(|v| v.len() == 3),
        )
        .await;
        assert_eq!(view.status(), LocalStatus::Active);

        // Losing every peer makes it isolated; a new peer in discovery brings it back.
        for other in &others {
            other.shutdown().await;
        }
        bounded(
            "isolation",
            lonely.wait_until(|v| v.status() == LocalStatus::Isolated),
        )
        .await;
        let rescuer = one_host::start(one_host::builder("rescuer", &[]), &links).await;
        *discovery.0.lock().unwrap() = vec![rescuer.local_addr()];
        bounded(
            "the isolated node to rejoin through discovery",
            lonely.wait_until(|v| v.status() == LocalStatus::Active && v.get("rescuer").is_some()),
        )
        .await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_is_gossiped_and_the_node_stays_a_member() {
    let nodes = cluster(3).await;
    nodes[1].set_draining(true).unwrap();
    for other in [&nodes[0], &nodes[2]] {
        let view = bounded(
            "draining to be seen",
            other.wait_until(|v| {
                v.len() == 3
                    && v.get("node-1")
                        .and_then(|m| m.state())
                        .is_some_and(|s| s.draining)
            }),
        )
        .await;
        assert!(
            view.get("node-1").is_some(),
            "a draining node is still a member"
        );
    }
}
