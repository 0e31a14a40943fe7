//! The facade tests' shared fixtures: how a test node is set up (gossip on 127.0.0.1 with an
//! ephemeral port), demo nodes with a real gRPC server, cluster formation through one seed,
//! and bounded waits.
#![allow(dead_code, unreachable_pub)] // Each test binary uses a different subset; `pub` is for them.

use std::{future::Future, net::SocketAddr, time::Duration};

use mesh::{
    Node, NodeBuilder, Tags, Timing, WhenFull,
    route::ChannelConfig,
    tls::{PeerTls, ServerTls},
};
use mesh_demo::{
    DemoNode, ServiceStats,
    proto::demo::v1::{Action, ExecuteRequest, Operation, execution_client::ExecutionClient},
};
use tonic::transport::Channel;

/// mesh-core's simulated-time harness; here for its event helpers.
#[path = "../../../crates/mesh-core/tests/core/support/one_host.rs"]
pub mod one_host;
#[allow(unused_imports)] // Not every test binary drains events.
pub use one_host::drain as drain_events;

/// Upper bound for any wait on a loaded CI machine; not an expectation.
pub const BOUND: Duration = Duration::from_secs(30);

pub async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {BOUND:?} waiting for {what}"))
}

/// The local preset with the lan preset's failure detector (0.8 s probes, 500 ms to answer).
///
/// These tests run on real sockets on a machine that may be loaded: a thread can stall for
/// longer than the local preset's 100 ms probe timeout, and a peer suspected for that reason
/// is (rightly) kept out of routing, which is not what a routing test is about. Failure
/// detection itself is tested on simulated time (mesh-core's `cluster.rs` and `faults.rs`,
/// `sim_restart.rs`); the few tests here that wait for a crash to be noticed take a few
/// seconds longer.
pub fn patient() -> Timing {
    let lan = Timing::lan();
    let mut timing = Timing::local();
    timing.probe_period = lan.probe_period;
    timing.probe_rtt = lan.probe_rtt;
    timing
}

/// The set-up every test node starts from: `name`, gossip on 127.0.0.1 with an ephemeral
/// port, joining through `seeds`, with `timing` and `slots` tasks at once.
///
/// Routers trust peer states for [`BOUND`]: staleness is tested on simulated time
/// (mesh-route's `filters.rs`); here a stalled thread must not make a healthy peer look stale.
pub fn node_builder(name: &str, seeds: &[SocketAddr], timing: Timing, slots: u32) -> NodeBuilder {
    Node::builder()
        .node_id(name)
        .unwrap()
        .gossip_bind("127.0.0.1:0".parse().unwrap())
        .seeds(seeds.iter().copied())
        .timing(timing)
        .max_concurrency(slots)
        .max_state_age(BOUND)
}

/// Anything a test holds that runs a mesh node.
pub trait HasNode {
    fn mesh_node(&self) -> &Node;
}

impl HasNode for Node {
    fn mesh_node(&self) -> &Node {
        self
    }
}

impl HasNode for TestNode {
    fn mesh_node(&self) -> &Node {
        &self.node
    }
}

/// Starts `count` nodes with `start(i, seeds)`, the first one everyone's seed, and waits until
/// every node knows every other node's state.
pub async fn form<N, F, Fut>(count: usize, mut start: F) -> Vec<N>
where
    N: HasNode,
    F: FnMut(usize, Vec<SocketAddr>) -> Fut,
    Fut: Future<Output = N>,
{
    let mut nodes: Vec<N> = Vec::with_capacity(count);
    for i in 0..count {
        let seeds = nodes
            .first()
            .map(|n| n.mesh_node().gossip_addr())
            .into_iter()
            .collect();
        nodes.push(start(i, seeds).await);
    }
    converge(&nodes).await;
    nodes
}

pub struct Spec {
    pub name: &'static str,
    pub max_concurrency: u32,
    pub tags: Tags,
    pub timing: Timing,
    pub when_full: WhenFull,
    pub tls: Option<NodeTls>,
}

/// TLS for a test node: its server, its forwarding channels, and the test's own client of it.
pub struct NodeTls {
    pub server: ServerTls,
    pub peers: PeerTls,
    pub client: PeerTls,
}

impl Spec {
    pub fn new(name: &'static str, max_concurrency: u32) -> Self {
        Self {
            name,
            max_concurrency,
            tags: Tags::new(),
            timing: patient(),
            when_full: WhenFull::RunLocally,
            tls: None,
        }
    }

    pub fn tls(mut self, tls: NodeTls) -> Self {
        self.tls = Some(tls);
        self
    }

    pub fn tag(mut self, key: &str, value: &str) -> Self {
        self.tags.insert(key.to_owned(), value.to_owned());
        self
    }

    pub fn timing(mut self, timing: Timing) -> Self {
        self.timing = timing;
        self
    }

    pub fn when_full(mut self, when_full: WhenFull) -> Self {
        self.when_full = when_full;
        self
    }
}

pub struct TestNode {
    pub node: Node,
    pub grpc_addr: SocketAddr,
    demo: DemoNode,
    client_tls: Option<PeerTls>,
}

impl TestNode {
    pub async fn start(spec: Spec, seeds: &[SocketAddr]) -> Self {
        Self::start_advertising(spec, seeds, None).await
    }

    /// `advertise`: a gRPC endpoint to gossip instead of the real one (to simulate a peer that
    /// cannot be reached).
    pub async fn start_advertising(
        spec: Spec,
        seeds: &[SocketAddr],
        advertise: Option<String>,
    ) -> Self {
        let mut builder = node_builder(spec.name, seeds, spec.timing, spec.max_concurrency)
            .tags(spec.tags)
            .when_full(spec.when_full);
        if let Some(endpoint) = advertise {
            builder = builder.grpc_endpoint(endpoint);
        }
        let bind = "127.0.0.1:0".parse().unwrap();
        let (demo, client_tls) = match spec.tls {
            None => (DemoNode::start(builder, bind).await.unwrap(), None),
            Some(tls) => {
                builder = builder.channel_config(ChannelConfig::default().tls(tls.peers));
                let demo = DemoNode::start_with_tls(builder, bind, tls.server)
                    .await
                    .unwrap();
                (demo, Some(tls.client))
            }
        };
        Self {
            node: demo.node().clone(),
            grpc_addr: demo.grpc_addr(),
            demo,
            client_tls,
        }
    }

    /// What the replica did so far (its service's and its route layer's counters).
    pub fn stats(&self) -> ServiceStats {
        self.demo.stats()
    }

    pub fn name(&self) -> &str {
        self.node.node_id().as_str()
    }

    /// A client of the node, over TLS with the spec's client configuration if it has one.
    pub async fn client(&self) -> ExecutionClient<Channel> {
        match &self.client_tls {
            None => self.demo.client().await.unwrap(),
            Some(tls) => self.demo.client_with_tls(tls).await.unwrap(),
        }
    }

    /// A client of the node over TLS with `tls`, whatever the spec says.
    /// Executes `request` here and follows it to its end.
    pub async fn execute(&self, request: impl tonic::IntoRequest<ExecuteRequest>) -> Operation {
        let stream = self
            .client()
            .await
            .execute(request)
            .await
            .unwrap()
            .into_inner();
        mesh_demo::finish(stream).await.unwrap()
    }

    pub async fn client_with_tls(
        &self,
        tls: &PeerTls,
    ) -> Result<ExecutionClient<Channel>, tonic::transport::Error> {
        self.demo.client_with_tls(tls).await
    }

    /// A plaintext client of the node, whatever the spec says.
    pub async fn plaintext_client(
        &self,
    ) -> Result<ExecutionClient<Channel>, tonic::transport::Error> {
        self.demo.client().await
    }

    /// A crash: the gRPC server and the membership stop without a word.
    pub async fn kill(self) {
        self.demo.kill().await;
    }

    pub async fn stop_gracefully(self) {
        self.demo.shutdown_gracefully().await.unwrap();
    }
}

/// Starts the nodes (the first is everyone's seed) and waits until every node knows every
/// other node's state.
pub async fn cluster(specs: Vec<Spec>) -> Vec<TestNode> {
    let mut specs = specs.into_iter();
    form(specs.len(), |_, seeds| {
        let spec = specs.next().expect("one spec per node");
        async move { TestNode::start(spec, &seeds).await }
    })
    .await
}

/// Waits until every node knows every other node's state.
pub async fn converge<N: HasNode>(nodes: &[N]) {
    let n = nodes.len();
    for node in nodes {
        bounded(
            "every node to know every peer's state",
            node.mesh_node()
                .membership()
                .wait_until(|v| v.len() == n && v.peers().iter().all(|p| p.state().is_some())),
        )
        .await;
    }
}

pub fn action(duration_ms: u64) -> ExecuteRequest {
    ExecuteRequest {
        instance_name: String::new(),
        action: Some(Action {
            input_root_digest: String::new(),
            duration_ms,
            platform: Default::default(),
            exit_code: 0,
        }),
    }
}
