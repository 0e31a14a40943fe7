//! Nodes that know only a DNS name: an in-process nameserver on 127.0.0.1 serves the records,
//! like a Kubernetes headless service. All nodes share 127.0.0.1, so their distinct gossip
//! ports come from SRV records.

use std::{net::SocketAddr, time::Duration};

use mesh::{Node, Timing, discovery::Dns};
use mesh_discovery::testing::TestDns;

const BOUND: Duration = Duration::from_secs(30);
const ZONE: &str = "cluster.test.";
const SERVICE: &str = "mesh.cluster.test.";
const SRV: &str = "_gossip._udp.mesh.cluster.test.";

fn dns_discovery(dns: &TestDns) -> Dns {
    Dns::builder(SERVICE)
        .srv()
        .nameserver(dns.addr())
        .query_timeout(Duration::from_millis(200))
        .build()
        .unwrap()
}

async fn node(name: &str, discovery: Option<Dns>, bind: SocketAddr) -> Node {
    let mut builder = Node::builder()
        .node_id(name)
        .unwrap()
        .gossip_bind(bind)
        .timing(Timing::local())
        .max_concurrency(2);
    if let Some(discovery) = discovery {
        builder = builder.discovery(discovery);
    }
    builder.start().await.unwrap()
}

/// Publishes a node the way a headless service does: an SRV record per pod pointing at the
/// pod's own name, and an A record for that name.
async fn publish(dns: &TestDns, node: &Node) {
    let target = format!("{}.{SERVICE}", node.node_id());
    dns.add_a(&target, [127, 0, 0, 1].into()).await;
    dns.add_srv(SRV, &target, node.gossip_addr().port()).await;
}

async fn wait_for_members(node: &Node, n: usize) {
    tokio::time::timeout(BOUND, node.membership().wait_until(|v| v.len() == n))
        .await
        .unwrap_or_else(|_| panic!("{} never saw {n} members", node.node_id()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_that_know_only_the_dns_name_form_one_cluster() {
    let dns = TestDns::start(ZONE).await;
    let mut nodes = Vec::new();
    for name in ["pod-0", "pod-1", "pod-2"] {
        let node = node(
            name,
            Some(dns_discovery(&dns)),
            "127.0.0.1:0".parse().unwrap(),
        )
        .await;
        publish(&dns, &node).await;
        nodes.push(node);
    }
    for node in &nodes {
        wait_for_members(node, 3).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_added_later_is_found_by_the_cluster() {
    let dns = TestDns::start(ZONE).await;
    let mut nodes = Vec::new();
    for name in ["pod-0", "pod-1"] {
        let node = node(
            name,
            Some(dns_discovery(&dns)),
            "127.0.0.1:0".parse().unwrap(),
        )
        .await;
        publish(&dns, &node).await;
        nodes.push(node);
    }
    for node in &nodes {
        wait_for_members(node, 2).await;
    }
    // A new pod that does not search by itself: only the cluster's periodic re-resolution can
    // find it.
    let newcomer = node("pod-2", None, "127.0.0.1:0".parse().unwrap()).await;
    publish(&dns, &newcomer).await;
    wait_for_members(&newcomer, 3).await;
    for node in &nodes {
        wait_for_members(node, 3).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_dns_goes_away_the_last_good_answer_keeps_the_cluster_together() {
    let dns = TestDns::start(ZONE).await;
    // pod-b is published before pod-a starts, so pod-a's very first answer includes it.
    let b = node("pod-b", None, "127.0.0.1:0".parse().unwrap()).await;
    publish(&dns, &b).await;
    let a = node(
        "pod-a",
        Some(dns_discovery(&dns)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await;
    publish(&dns, &a).await;
    wait_for_members(&a, 2).await;
    let failures_before = a.membership().stats().discovery_failures;

    // The nameserver dies, then pod-b crashes and comes back at the same address (a pod
    // restarted in place). pod-a, now alone, can only find it through the remembered answer.
    dns.stop().await;
    let b_addr = b.gossip_addr();
    b.shutdown().await;
    tokio::time::timeout(
        BOUND,
        a.membership()
            .wait_until(|v| v.len() == 1 && v.status() == mesh::LocalStatus::Isolated),
    )
    .await
    .expect("pod-a to notice it is alone");
    let restarted = node("pod-b", None, b_addr).await;
    wait_for_members(&a, 2).await;
    wait_for_members(&restarted, 2).await;

    // And the failed lookups are reported, not hidden.
    tokio::time::timeout(BOUND, async {
        while a.membership().stats().discovery_failures == failures_before {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("discovery failures to be counted");
}
