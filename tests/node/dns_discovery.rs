//! Nodes that know only a DNS name: an in-process nameserver on 127.0.0.1 serves the records,
//! like a Kubernetes headless service. All nodes share 127.0.0.1, so their distinct gossip
//! ports come from SRV records. Real sockets: every assertion is a condition waited for.

use crate::support;

use std::{net::SocketAddr, time::Duration};

use mesh::{LocalStatus, Node, core::UdpTransport, discovery::Dns};
use mesh_discovery::testing::TestDns;
use support::{bounded, converge, node_builder, patient};

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

/// A node that finds its peers through `dns`, or (`None`) only through those that find it.
async fn node(name: &str, dns: Option<&TestDns>) -> Node {
    let mut builder = node_builder(name, &[], patient(), 2);
    if let Some(dns) = dns {
        builder = builder.discovery(dns_discovery(dns));
    }
    builder.start().await.unwrap()
}

/// Publishes a pod at `addr` the way a headless service does: an SRV record pointing at the
/// pod's own name, and an A record for that name.
async fn publish(dns: &TestDns, pod: &str, addr: SocketAddr) {
    let target = format!("{pod}.{SERVICE}");
    dns.add_a(&target, [127, 0, 0, 1].into()).await;
    dns.add_srv(SRV, &target, addr.port()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_that_know_only_the_dns_name_form_one_cluster() {
    let dns = TestDns::start(ZONE).await;
    let mut nodes = Vec::new();
    for name in ["pod-0", "pod-1", "pod-2"] {
        let node = node(name, Some(&dns)).await;
        publish(&dns, name, node.gossip_addr()).await;
        nodes.push(node);
    }
    converge(&nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_added_later_is_found_by_the_cluster() {
    let dns = TestDns::start(ZONE).await;
    let mut nodes = Vec::new();
    for name in ["pod-0", "pod-1"] {
        let node = node(name, Some(&dns)).await;
        publish(&dns, name, node.gossip_addr()).await;
        nodes.push(node);
    }
    converge(&nodes).await;
    // A new pod that does not search by itself: only the cluster's periodic re-resolution can
    // find it.
    let newcomer = node("pod-2", None).await;
    publish(&dns, "pod-2", newcomer.gossip_addr()).await;
    nodes.push(newcomer);
    converge(&nodes).await;
}

/// The remembered answer is the only way the two pods can meet: pod-b is in the DNS answer
/// pod-a got before the nameserver died, but it starts only afterwards, it searches for no one,
/// and pod-a never knew it as a member (so SWIM's announcements to members it lost cannot find
/// it either). Without last-known-good, a failed lookup would leave pod-a nobody to announce to
/// and the two would stay apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_dns_goes_away_the_last_good_answer_still_finds_a_pod_that_starts_later() {
    let dns = TestDns::start(ZONE).await;
    // pod-b's socket exists (its address is in DNS, as a scheduled pod's is), its node not yet.
    let b_socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let b_addr = b_socket.local_addr().unwrap();
    publish(&dns, "pod-b", b_addr).await;
    let a = node("pod-a", Some(&dns)).await;
    publish(&dns, "pod-a", a.gossip_addr()).await;
    // pod-a has the answer: it announces to pod-b's address.
    let mut buf = [0u8; 1500];
    let (_, from) = bounded(
        "pod-a to announce to pod-b's address",
        b_socket.recv_from(&mut buf),
    )
    .await
    .unwrap();
    assert_eq!(from, a.gossip_addr());
    assert_eq!(a.view().status(), LocalStatus::Joining);

    // The nameserver dies; pod-a's lookups fail from now on (two in a row, to be sure the
    // answers of lookups that succeeded earlier have all been acted on).
    let failures = a.membership().stats().discovery_failures;
    dns.stop().await;
    bounded("two failed lookups", async {
        while a.membership().stats().discovery_failures < failures + 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Announcements sent while DNS still answered are not what this test is about.
    while b_socket.try_recv_from(&mut buf).is_ok() {}

    let b = node_builder("pod-b", &[], patient(), 2)
        .start_with_transport(UdpTransport::from_tokio(b_socket).unwrap())
        .await
        .unwrap();
    converge(&[a, b]).await;
}
