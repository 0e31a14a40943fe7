//! A network partition on simulated time: every datagram between the two halves is dropped,
//! long enough for each side to declare the other failed, then traffic flows again. The halves
//! must merge back on their own, members and node state alike.
//!
//! The local timing preset (100 ms probe timeout) on simulated time: the failures are the
//! partition's, never a loaded machine's.

use crate::support;

use mesh_core::MeshEvent;
use support::one_host::{Links, cluster, drain, simulate, until};

#[test]
fn two_halves_declared_failed_merge_back_once_traffic_flows() {
    simulate(3, async {
        let links = Links::default();
        let nodes = cluster("node", 6, &links, |b| b).await;
        let mut events: Vec<_> = nodes.iter().map(|n| n.events()).collect();

        // Cut every link between {0,1,2} and {3,4,5}, both ways.
        let (left, right) = nodes.split_at(3);
        let left: Vec<_> = left.iter().collect();
        let right: Vec<_> = right.iter().collect();
        links.cut(&left, &right);
        for member in &nodes {
            until("its half alone", member, |v| v.len() == 3).await;
        }
        for (i, member) in nodes.iter().enumerate() {
            let half = if i < 3 { 0..3 } else { 3..6 };
            let view = member.view();
            assert!(
                view.members().all(|m| {
                    half.clone()
                        .any(|j| m.node_id().as_str() == format!("node-{j}"))
                }),
                "{} sees only its half",
                member.node_id()
            );
            // The other half was declared failed (not left), each of its members.
            let mut failed: Vec<String> = drain(&mut events[i])
                .into_iter()
                .filter_map(|event| match event {
                    MeshEvent::Failed(id) => Some(id.node_id().to_string()),
                    _ => None,
                })
                .collect();
            failed.sort();
            failed.dedup();
            let other: Vec<String> = (0..6)
                .filter(|j| !half.contains(j))
                .map(|j| format!("node-{j}"))
                .collect();
            assert_eq!(failed, other, "on {}", member.node_id());
        }

        // Load changes during the partition must arrive after the merge.
        let _guards: Vec<_> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                (0..i as u32)
                    .map(|_| n.load().begin_task())
                    .collect::<Vec<_>>()
            })
            .collect();

        links.heal();
        for member in &nodes {
            until(
                "the merged cluster with everyone's current load",
                member,
                |v| {
                    v.len() == 6
                        && (0..6).all(|i| {
                            v.get(&format!("node-{i}"))
                                .and_then(|m| m.state())
                                .is_some_and(|s| s.pending == i as u32)
                        })
                },
            )
            .await;
        }
    });
}
