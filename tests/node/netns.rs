//! Five hosts that are really apart: each `mesh-node` process runs in a Linux network namespace of
//! its own, joined to the others by a bridge and veth pairs, with addresses in 198.18.0.0/15
//! (the range RFC 2544 sets aside for tests). The nodes find each other through a DNS server on
//! the bridge, and advertise the address of their default route (no `--advertise-addr`), as pods
//! do. On that network: a load burst through one node, a partition (a link taken down) and its
//! healing, a `kill -9` and a restart, a rolling restart (SIGTERM, leave, start, wait for
//! readiness), and a last burst.
//!
//! The test creates and removes everything itself, also when it fails. It needs root (or
//! CAP_NET_ADMIN) and `ip` (iproute2); where the machine does not allow network namespaces it
//! says why and skips, unless `NETNS_TEST_REQUIRED=1` (set by `.ci/run` where namespaces work),
//! which makes a skip a failure.

use crate::cluster_processes;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    process::Command,
};

use cluster_processes::{
    NodeProcess, NodeSpec, bounded, examples, loadgen_all_ok, members_by_id, meshctl_json, poll,
};
use mesh_discovery::testing::TestDns;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const NODES: usize = 5;
const SERVICE: &str = "mesh.netns.test.";

/// Runs `ip` with `args`; the error says what failed.
fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Why this machine cannot run the test, if it cannot.
fn unavailable() -> Option<String> {
    if !cfg!(target_os = "linux") {
        return Some("network namespaces are a Linux feature".to_owned());
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .unwrap_or("?");
    if uid != "0" {
        return Some(format!("it needs root (effective uid {uid})"));
    }
    match Command::new("ip").arg("-V").output() {
        Ok(output) if output.status.success() => {}
        _ => return Some("the `ip` command (iproute2) is not installed".to_owned()),
    }
    let probe = format!("mesh-probe-{}", std::process::id());
    if let Err(error) = ip(&["netns", "add", &probe]) {
        return Some(format!(
            "network namespaces cannot be created here (no CAP_NET_ADMIN?): {error}"
        ));
    }
    let _ = ip(&["netns", "del", &probe]);
    let bridge = format!("mshp{}", std::process::id() % 100_000);
    if let Err(error) = ip(&["link", "add", &bridge, "type", "bridge"]) {
        return Some(format!("bridges cannot be created here: {error}"));
    }
    let _ = ip(&["link", "del", &bridge]);
    None
}

/// The namespaces, their veth pairs and the bridge; removed when dropped.
struct Network {
    bridge: String,
    /// The third octet of 198.18.x.0/24.
    subnet: u8,
    namespaces: Vec<String>,
    host_links: Vec<String>,
}

impl Network {
    /// A bridge at 198.18.x.1 and `NODES` namespaces at 198.18.x.11, .12, …, each with a
    /// default route through the bridge.
    fn create() -> Self {
        let id = std::process::id() % 100_000;
        let mut network = Network {
            bridge: format!("mshbr{id}"),
            subnet: free_subnet(id),
            namespaces: Vec::new(),
            host_links: Vec::new(),
        };
        let gateway = format!("{}/24", network.gateway());
        let setup = || -> Result<(), String> {
            ip(&["link", "add", &network.bridge, "type", "bridge"])?;
            ip(&["addr", "add", &gateway, "dev", &network.bridge])?;
            ip(&["link", "set", &network.bridge, "up"])?;
            Ok(())
        };
        if let Err(error) = setup() {
            panic!("setting up the bridge: {error}");
        }
        for i in 1..=NODES {
            let namespace = format!("mesh-test-{id}-n{i}");
            let host = format!("mshv{id}n{i}");
            network.namespaces.push(namespace.clone());
            network.host_links.push(host.clone());
            let address = format!("{}/24", network.node_ip(i));
            let gateway = network.gateway().to_string();
            let steps: [&[&str]; 8] = [
                &["netns", "add", &namespace],
                &[
                    "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns",
                    &namespace,
                ],
                &["link", "set", &host, "master", &network.bridge],
                &["link", "set", &host, "up"],
                &["-n", &namespace, "addr", "add", &address, "dev", "eth0"],
                &["-n", &namespace, "link", "set", "eth0", "up"],
                &["-n", &namespace, "link", "set", "lo", "up"],
                &["-n", &namespace, "route", "add", "default", "via", &gateway],
            ];
            for step in steps {
                if let Err(error) = ip(step) {
                    panic!("setting up {namespace}: {error}");
                }
            }
        }
        network
    }

    fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.subnet, 1)
    }

    /// Node `i` (from 1).
    fn node_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.subnet, 10 + i as u8)
    }

    fn url(&self, i: usize) -> String {
        format!("http://{}:50051", self.node_ip(i))
    }

    /// Takes node `i`'s link to the bridge down (a partition) or up again.
    fn set_link(&self, i: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["link", "set", &self.host_links[i - 1], state]).unwrap();
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both.
        for link in &self.host_links {
            let _ = ip(&["link", "del", link]);
        }
        for namespace in &self.namespaces {
            let _ = ip(&["netns", "del", namespace]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// A 198.18.x.0/24 no interface of this host uses, starting from one chosen by `id`.
fn free_subnet(id: u32) -> u8 {
    let used = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    (0..254)
        .map(|offset| ((id + offset) % 254 + 1) as u8)
        .find(|x| !used.contains(&format!(" 198.18.{x}.")))
        .expect("a free 198.18.x.0/24")
}

/// Starts node `i` in its namespace: DNS discovery through the bridge, defaults otherwise
/// (gossip on 0.0.0.0:7946, advertising its default route's address, gRPC on 50051).
async fn start_node(network: &Network, dns: SocketAddr, i: usize) -> NodeProcess {
    let name = format!("n{i}");
    let spec = NodeSpec {
        name: name.clone(),
        args: ["--node-id", &name, "--timing", "local", "--dns", SERVICE]
            .into_iter()
            .map(str::to_owned)
            .collect(),
        env: vec![
            ("MESH_DNS_NAMESERVER".to_owned(), dns.to_string()),
            ("MESH_DISCOVERY_INTERVAL".to_owned(), "1s".to_owned()),
            ("RUST_LOG".to_owned(), "warn".to_owned()),
        ],
        wrapper: ["ip", "netns", "exec", &network.namespaces[i - 1]]
            .into_iter()
            .map(str::to_owned)
            .collect(),
    };
    let node = NodeProcess::start(spec).await;
    // The address of the default route, found by the node itself.
    assert_eq!(
        node.advertised,
        format!("{}:7946", network.node_ip(i)),
        "node {name} advertises its default route's address"
    );
    node
}

/// Waits until node `observer` lists every node in `alive` as alive with a state, and returns
/// its answer.
async fn wait_alive(
    bin: &Path,
    network: &Network,
    observer: usize,
    alive: &[usize],
) -> serde_json::Value {
    let url = &network.url(observer);
    let what = format!("n{observer} to see {alive:?} alive");
    poll(&what, move || async move {
        let answer = meshctl_json(bin, url, "members").await;
        let members = members_by_id(&answer);
        alive
            .iter()
            .all(|i| {
                members
                    .get(&format!("n{i}"))
                    .is_some_and(|m| m["status"] == "alive" && m["state"].is_object())
            })
            .then_some(answer)
    })
    .await
}

/// Waits until node `observer` lists node `i` with `status` (failed, left).
async fn wait_status(bin: &Path, network: &Network, observer: usize, i: usize, status: &str) {
    let url = &network.url(observer);
    let name = &format!("n{i}");
    let what = format!("n{observer} to list {name} as {status}");
    poll(&what, move || async move {
        let members = members_by_id(&meshctl_json(bin, url, "members").await);
        members
            .get(name)
            .filter(|m| m["status"] == status && m["status_age_ms"].is_u64())
            .map(|_| ())
    })
    .await;
}

/// Waits until node `i`'s gRPC health service reports SERVING (what a readiness probe asks).
async fn wait_ready(network: &Network, i: usize) {
    let url = network.url(i);
    poll(&format!("n{i} to be ready"), move || {
        let url = url.clone();
        async move {
            let channel = tonic::transport::Endpoint::from_shared(url)
                .ok()?
                .connect()
                .await
                .ok()?;
            let status = HealthClient::new(channel)
                .check(HealthCheckRequest::default())
                .await
                .ok()?
                .into_inner()
                .status;
            (status == ServingStatus::Serving as i32).then_some(())
        }
    })
    .await;
}

/// A burst of actions through node 1; returns who ran them.
async fn burst(bin: &Path, network: &Network) -> std::collections::HashMap<String, u64> {
    loadgen_all_ok(
        bin,
        &["--target", &network.url(1), "--actions", "150", "--quiet"],
    )
    .await
    .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hosts_in_namespaces_survive_a_partition_a_kill_and_a_rolling_restart() {
    if let Some(reason) = unavailable() {
        assert!(
            std::env::var("NETNS_TEST_REQUIRED").is_err(),
            "NETNS_TEST_REQUIRED is set, but {reason}"
        );
        eprintln!("skipping the network-namespace test: {reason}");
        return;
    }
    let bin = &examples();
    // Declared first, dropped last: the processes go before their namespaces.
    let network = &Network::create();
    let dns = TestDns::start_at("netns.test.", IpAddr::V4(network.gateway())).await;
    for i in 1..=NODES {
        dns.add_a("mesh.netns.test.", network.node_ip(i)).await;
    }
    let mut nodes: Vec<NodeProcess> = Vec::new();
    for i in 1..=NODES {
        nodes.push(start_node(network, dns.addr(), i).await);
    }
    let everyone: Vec<usize> = (1..=NODES).collect();

    // One cluster, found through DNS, every node at its own address.
    let answer = wait_alive(bin, network, 1, &everyone).await;
    let members = members_by_id(&answer);
    for i in 1..=NODES {
        let member = &members[&format!("n{i}")];
        assert_eq!(
            member["gossip_addr"],
            format!("{}:7946", network.node_ip(i))
        );
        assert_eq!(member["state"]["grpc_endpoint"], network.url(i));
    }

    // A burst through n1 spreads over the hosts.
    let ran = burst(bin, network).await;
    assert!(
        ran.len() >= 3,
        "the work spread over several hosts: {ran:?}"
    );

    // A partition: n5's link goes down. The others declare it failed; when the link comes
    // back, it is a member again and sees everyone.
    network.set_link(5, false);
    wait_status(bin, network, 1, 5, "failed").await;
    network.set_link(5, true);
    wait_alive(bin, network, 1, &everyone).await;
    wait_alive(bin, network, 5, &everyone).await;

    // kill -9: failed, then back after a restart in the same namespace.
    nodes[3].kill9().await;
    wait_status(bin, network, 1, 4, "failed").await;
    nodes[3] = start_node(network, dns.addr(), 4).await;
    wait_alive(bin, network, 1, &everyone).await;

    // A rolling restart, one host at a time, as Kubernetes does it: SIGTERM (the node leaves),
    // a new process, and the next one only once it is ready.
    for i in 1..=NODES {
        let observer = i % NODES + 1;
        nodes[i - 1].terminate().await;
        wait_status(bin, network, observer, i, "left").await;
        nodes[i - 1] = start_node(network, dns.addr(), i).await;
        wait_ready(network, i).await;
        wait_alive(bin, network, observer, &everyone).await;
    }

    // Every host sees all five and names the same coordinator.
    let mut coordinators = Vec::new();
    for i in 1..=NODES {
        let answer = wait_alive(bin, network, i, &everyone).await;
        coordinators.push(answer["coordinator"].as_str().unwrap().to_owned());
    }
    assert!(
        coordinators
            .iter()
            .all(|c| *c == coordinators[0] && !c.is_empty()),
        "{coordinators:?}"
    );

    // And the cluster still takes a burst through one node.
    let ran = burst(bin, network).await;
    assert!(
        ran.len() >= 3,
        "the work spread over several hosts: {ran:?}"
    );

    drop(nodes);
    bounded("the DNS server to stop", dns.stop()).await;
}
