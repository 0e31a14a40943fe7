//! Encrypted gossip: who can join whom, what happens to tampered and forged datagrams, and
//! key rotation on a running cluster. Every test draws its own keys, so datagrams that stray
//! between tests can never be accepted.
//!
//! One cluster runs on real UDP on 127.0.0.1 (ephemeral ports), asserting only conditions it
//! waits for. The rest runs on simulated time ([`support::one_host`]): those tests assert what
//! never happens (an outsider never joins, rotation never breaks membership), which on real
//! sockets a loaded machine could fake by delaying a probe answer past its 100 ms timeout.

use crate::support;
use crate::udp;

use std::{net::SocketAddr, time::Duration};

use mesh_core::{
    Keyring, KeyringError, LocalStatus, Membership, MeshEvent, MeshStats, SecretKey, StartError,
    TaskGuard,
};
use support::one_host::{self, Links, simulate};
use tokio::sync::broadcast;
use udp::{bounded, builder};

fn new_key() -> SecretKey {
    SecretKey::generate().expect("the operating system's random source")
}

/// `builder` with `keyring` (if any) and `label`.
fn keyed(
    builder: mesh_core::MembershipBuilder,
    keyring: Option<&Keyring>,
    label: &str,
) -> mesh_core::MembershipBuilder {
    let builder = builder.cluster_label(label);
    match keyring {
        Some(keyring) => builder.keyring(keyring.clone()),
        None => builder,
    }
}

/// A member on simulated time.
async fn node(
    links: &Links,
    name: &str,
    seeds: &[SocketAddr],
    keyring: Option<&Keyring>,
    label: &str,
) -> Membership {
    one_host::start(keyed(one_host::builder(name, seeds), keyring, label), links).await
}

/// Polls `node`'s counters until `condition` holds.
async fn stats_until(
    what: &str,
    node: &Membership,
    mut condition: impl FnMut(&MeshStats) -> bool,
) -> MeshStats {
    bounded(what, async {
        loop {
            let stats = node.stats();
            if condition(&stats) {
                return stats;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// Starts `n` members named `{prefix}-{i}` on simulated time, all seeded with the first, and
/// waits until every member sees all of them.
async fn cluster(
    links: &Links,
    prefix: &str,
    n: usize,
    keyring: Option<&Keyring>,
    label: &str,
) -> Vec<Membership> {
    one_host::cluster(prefix, n, links, |b| keyed(b, keyring, label)).await
}

/// Starts one more task on `nodes[from]` (held in `tasks`) and waits until every other node
/// sees its new pending count, and the whole cluster: state is flowing, over every path, with
/// the keys in force now.
async fn load_flows(nodes: &[Membership], from: usize, tasks: &mut Vec<TaskGuard>) {
    tasks.push(nodes[from].load().begin_task());
    let pending = nodes[from].load().pending();
    let name = nodes[from].node_id().to_string();
    for (i, other) in nodes.iter().enumerate().filter(|(i, _)| *i != from) {
        bounded(
            &format!("node {i} to see {name} at {pending} pending"),
            other.wait_until(|v| {
                v.get(&name)
                    .and_then(|m| m.state())
                    .is_some_and(|s| s.pending == pending)
            }),
        )
        .await;
    }
    for member in nodes {
        bounded(
            &format!("{} to see the whole cluster", member.node_id()),
            member.wait_until(|v| v.len() == nodes.len()),
        )
        .await;
    }
}

/// Waits until `outsider`'s datagrams have been dropped by `member` a few times (several
/// announce rounds), then checks that neither side let the other in.
async fn assert_kept_apart(members: &[Membership], outsider: &Membership) {
    let before = members[0].stats().dropped_unauthenticated;
    stats_until(
        "the outsider's announces to be dropped as unauthenticated",
        &members[0],
        |s| s.dropped_unauthenticated >= before + 3,
    )
    .await;
    let view = outsider.view();
    assert_eq!(view.len(), 1, "the outsider stays alone");
    assert_eq!(view.status(), LocalStatus::Joining);
    for member in members {
        let view = member.view();
        assert_eq!(view.len(), members.len(), "on {}", member.node_id());
        assert!(view.get(outsider.node_id().as_str()).is_none());
    }
}

/// Checks that no member was reported failed or left so far.
fn no_failures(events: &mut [broadcast::Receiver<MeshEvent>]) {
    for receiver in events {
        for event in one_host::drain(receiver) {
            assert!(
                !matches!(event, MeshEvent::Failed(_) | MeshEvent::Left(_)),
                "membership broke: {event:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_sharing_a_key_form_a_cluster_and_gossip_load() {
    let key = new_key();
    let keyring = Keyring::new(key.clone());
    // On real UDP: the keys work over a real socket.
    let nodes = udp::cluster("shared", 3, |name, seeds| {
        let builder = keyed(builder(&name, &seeds), Some(&keyring), "prod");
        async move { builder.start().await.unwrap() }
    })
    .await;
    let mut tasks = Vec::new();
    load_flows(&nodes, 2, &mut tasks).await;
    load_flows(&nodes, 2, &mut tasks).await;
    for member in &nodes {
        assert_eq!(member.key_fingerprints(), [key.fingerprint()]);
        let view = member.view();
        assert!(view.peers().iter().all(|p| p.state().is_some()));
        assert_eq!(member.stats().seal_failures, 0);
    }
}

#[test]
fn a_node_with_another_key_cannot_join() {
    simulate(21, async {
        let links = Links::default();
        let keyring = Keyring::new(new_key());
        let nodes = cluster(&links, "keyed", 2, Some(&keyring), "").await;
        let outsider = node(
            &links,
            "other-key",
            &[nodes[0].local_addr()],
            Some(&Keyring::new(new_key())),
            "",
        )
        .await;
        assert_kept_apart(&nodes, &outsider).await;
    });
}

#[test]
fn a_node_without_a_key_cannot_join_an_encrypted_cluster() {
    simulate(22, async {
        let links = Links::default();
        let keyring = Keyring::new(new_key());
        let nodes = cluster(&links, "encrypted", 2, Some(&keyring), "").await;
        let plain = node(&links, "plain", &[nodes[0].local_addr()], None, "").await;
        assert_kept_apart(&nodes, &plain).await;

        // The encrypted side reaching out is refused by the plain node too.
        let before = plain.stats().dropped_unauthenticated;
        nodes[0].join([plain.local_addr()]).await.unwrap();
        stats_until("the plain node to drop encrypted datagrams", &plain, |s| {
            s.dropped_unauthenticated > before
        })
        .await;
        assert_eq!(plain.view().len(), 1);

        // Keys cannot be added to a node that started without a keyring.
        assert!(plain.key_fingerprints().is_empty());
        assert_eq!(plain.install_key(new_key()), Err(KeyringError::NoKeyring));
    });
}

#[test]
fn a_plain_cluster_drops_an_encrypted_node_datagrams() {
    simulate(23, async {
        let links = Links::default();
        let nodes = cluster(&links, "unencrypted", 2, None, "").await;
        let encrypted = node(
            &links,
            "with-key",
            &[nodes[0].local_addr()],
            Some(&Keyring::new(new_key())),
            "",
        )
        .await;
        assert_kept_apart(&nodes, &encrypted).await;
    });
}

#[test]
fn another_cluster_label_with_the_same_key_cannot_join() {
    simulate(24, async {
        let links = Links::default();
        let keyring = Keyring::new(new_key());
        let nodes = cluster(&links, "labelled", 2, Some(&keyring), "prod").await;
        let outsider = node(
            &links,
            "staging",
            &[nodes[0].local_addr()],
            Some(&keyring),
            "staging",
        )
        .await;
        assert_kept_apart(&nodes, &outsider).await;
    });
}

#[tokio::test]
async fn cluster_label_rules_are_checked_at_start() {
    let too_long = builder("long-label", &[])
        .keyring(Keyring::new(new_key()))
        .cluster_label("x".repeat(256))
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(too_long, StartError::ClusterLabelTooLong { len: 256 }),
        "{too_long}"
    );
    assert_eq!(
        too_long.to_string(),
        "the cluster label is 256 bytes; a cluster label is at most 255 bytes"
    );

    let unkeyed = builder("unkeyed-label", &[])
        .cluster_label("prod")
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(unkeyed, StartError::ClusterLabelWithoutKeyring),
        "{unkeyed}"
    );
    assert!(unkeyed.to_string().contains("needs a keyring"), "{unkeyed}");

    let longest = builder("longest-label", &[])
        .keyring(Keyring::new(new_key()))
        .cluster_label("x".repeat(255))
        .start()
        .await
        .unwrap();
    longest.shutdown().await;
}

#[test]
fn tampered_and_forged_datagrams_are_dropped_and_counted_while_the_cluster_keeps_working() {
    simulate(25, async {
        let links = Links::default();
        let keyring = Keyring::new(new_key());
        let nodes = cluster(&links, "target", 3, Some(&keyring), "").await;

        // Capture a genuine datagram: node 0 announces to the attacker when told to join it.
        let attacker = turmoil::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        nodes[0]
            .join([attacker.local_addr().unwrap()])
            .await
            .unwrap();
        let mut buf = [0u8; 2048];
        let (len, from) = bounded("a datagram from node 0", attacker.recv_from(&mut buf))
            .await
            .unwrap();
        assert_eq!(from, nodes[0].local_addr());
        let captured = buf[..len].to_vec();
        assert_eq!(captured[..3], *b"ms\x01");
        assert_eq!(captured[3], 0x81, "an encrypted foca packet");
        assert!(
            len > 4 + 24 + 16,
            "a nonce, a tag and a non-empty ciphertext"
        );

        let flip = |at: usize, bits: u8| {
            let mut datagram = captured.clone();
            datagram[at] ^= bits;
            datagram
        };
        let mut forged = b"ms\x01\x81".to_vec();
        forged.extend((0u8..120).map(|i| i.wrapping_mul(37)));
        let attacks = [
            flip(3, 0x03),                        // relabelled as a state push, still encrypted
            flip(3, 0x80),                        // passed off as plain
            flip(4, 0x01),                        // nonce
            flip(4 + 24, 0x01),                   // first ciphertext byte
            flip(len - 17, 0x80),                 // last ciphertext byte
            flip(len - 1, 0x01),                  // tag
            captured[..len - 1].to_vec(),         // truncated
            [captured.as_slice(), &[0]].concat(), // extended
            forged,                               // made up from nothing
        ];
        let before = nodes[1].stats();
        for datagram in &attacks {
            attacker
                .send_to(datagram, nodes[1].local_addr())
                .await
                .unwrap();
        }
        let stats = stats_until("every attack to be counted", &nodes[1], |s| {
            s.dropped_unauthenticated >= before.dropped_unauthenticated + attacks.len() as u64
        })
        .await;
        assert_eq!(
            stats.foca_rejected, before.foca_rejected,
            "nothing reached foca"
        );
        assert_eq!(stats.states_rejected, before.states_rejected);

        // The cluster did not notice.
        load_flows(&nodes, 1, &mut Vec::new()).await;
    });
}

#[test]
fn keys_rotate_on_a_running_cluster_without_breaking_membership() {
    simulate(26, async {
        let links = Links::default();
        let old = new_key();
        let new = new_key();
        let keyring = Keyring::new(old.clone());
        let nodes = cluster(&links, "rotating", 3, Some(&keyring), "prod").await;
        let mut events: Vec<_> = nodes.iter().map(Membership::events).collect();
        let mut tasks = Vec::new();
        load_flows(&nodes, 0, &mut tasks).await;

        // 1. Install the new key everywhere: readable, not yet written.
        for member in &nodes {
            member.install_key(new.clone()).unwrap();
            assert_eq!(
                member.key_fingerprints(),
                [old.fingerprint(), new.fingerprint()]
            );
        }
        for from in 0..nodes.len() {
            load_flows(&nodes, from, &mut tasks).await;
        }

        // 2. Switch the primary everywhere, one node after the other: both keys stay readable.
        for member in &nodes {
            member.use_primary_key(&new).unwrap();
            assert_eq!(
                member.key_fingerprints(),
                [new.fingerprint(), old.fingerprint()]
            );
            for from in 0..nodes.len() {
                load_flows(&nodes, from, &mut tasks).await;
            }
        }

        // 3. Remove the old key everywhere: only the new one is left, and it carries everything.
        for member in &nodes {
            assert_eq!(
                member.remove_key(&new),
                Err(KeyringError::RemovePrimary {
                    fingerprint: new.fingerprint()
                })
            );
            member.remove_key(&old).unwrap();
            assert_eq!(member.key_fingerprints(), [new.fingerprint()]);
            assert!(matches!(
                member.use_primary_key(&old),
                Err(KeyringError::NotInstalled { .. })
            ));
        }
        for from in 0..nodes.len() {
            load_flows(&nodes, from, &mut tasks).await;
        }
        no_failures(&mut events);

        // A node that only knows the old key is locked out.
        let stale = node(
            &links,
            "stale",
            &[nodes[0].local_addr()],
            Some(&Keyring::new(old)),
            "prod",
        )
        .await;
        assert_kept_apart(&nodes, &stale).await;
        no_failures(&mut events);
    });
}
