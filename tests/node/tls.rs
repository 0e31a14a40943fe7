//! TLS and mutual TLS between real gRPC servers on 127.0.0.1, with certificates generated here:
//! forwarding over TLS, clients and peers without a cluster certificate rejected, and plaintext
//! peers refused by a TLS node.

use crate::support;

#[path = "support/pki.rs"]
mod pki;

use mesh::{
    OperationId,
    tls::{PeerTls, ServerTls},
};
use mesh_demo::{finish, proto::demo::v1::WaitExecutionRequest};
use pki::Pki;
use support::{NodeTls, Spec, TestNode, action, cluster, converge};
use tonic::Code;

/// TLS for a cluster member, made by the test's [`Pki`].
trait NodeTlsOf {
    fn node(&self, name: &str, mutual: bool) -> NodeTls;
}

/// With `mutual`, its server requires client certificates from this CA and it presents its
/// own to peers; the test's client then has one too.
impl NodeTlsOf for Pki {
    fn node(&self, name: &str, mutual: bool) -> NodeTls {
        let identity = self.identity(name);
        let mut server = ServerTls::new(identity.clone());
        let mut peers = PeerTls::new(self.ca());
        let mut client = PeerTls::new(self.ca());
        if mutual {
            server = server.require_client_certificates(self.ca());
            peers = peers.identity(identity);
            client = client.identity(self.identity("operator"));
        }
        NodeTls {
            server,
            peers,
            client,
        }
    }
}

/// An `Execute` through `node` with `client_tls`; the error and its causes as text.
async fn execute_with(node: &TestNode, client_tls: &PeerTls) -> Result<String, String> {
    let chain = |error: &dyn std::error::Error| {
        let mut text = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            text = format!("{text}: {cause}");
            source = cause.source();
        }
        text
    };
    let mut client = node
        .client_with_tls(client_tls)
        .await
        .map_err(|e| chain(&e))?;
    let stream = client
        .execute(action(10))
        .await
        .map_err(|e| chain(&e))?
        .into_inner();
    let done = finish(stream).await.map_err(|e| chain(&e))?;
    Ok(done.response.unwrap().executed_by)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_node_forwards_over_tls_and_the_operation_names_the_executor() {
    let pki = Pki::new("cluster-ca");
    let nodes = cluster(vec![
        Spec::new("entry", 1).tls(pki.node("entry", false)),
        Spec::new("worker-a", 4).tls(pki.node("worker-a", false)),
        Spec::new("worker-b", 4).tls(pki.node("worker-b", false)),
    ])
    .await;
    let view = nodes[0].node.view();
    for peer in &nodes[1..] {
        let endpoint = view
            .get(peer.name())
            .unwrap()
            .state()
            .unwrap()
            .grpc_endpoint
            .clone();
        assert_eq!(endpoint, Some(format!("https://{}", peer.grpc_addr)));
    }
    let _busy = nodes[0].node.load().begin_task(); // entry is full: 1/1

    let done = nodes[0].execute(action(50)).await;
    let response = done.response.unwrap();
    assert_ne!(response.executed_by, "entry");
    let owner: OperationId = done.name.parse().unwrap();
    assert_eq!(owner.node().as_str(), response.executed_by);
    assert_eq!(response.forwarded_by, "entry");
    assert_eq!(nodes[0].stats().forwarded_out, 1);
    let executor = nodes
        .iter()
        .find(|n| n.name() == response.executed_by)
        .unwrap();
    assert_eq!(executor.stats().forwarded_in, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_advertising_addresses_are_verified_for_the_configured_domain() {
    let pki = Pki::new("cluster-ca");
    // Certificates name the service, not the addresses the nodes advertise.
    let node = |name: &str| {
        let peers = PeerTls::new(pki.ca()).domain("mesh.test").unwrap();
        NodeTls {
            server: ServerTls::new(pki.identity_for(name, &["mesh.test"])),
            client: peers.clone(),
            peers,
        }
    };
    let nodes = cluster(vec![
        Spec::new("entry", 1).tls(node("entry")),
        Spec::new("worker", 4).tls(node("worker")),
    ])
    .await;
    let _busy = nodes[0].node.load().begin_task();
    let executed_by = execute_with(
        &nodes[0],
        &PeerTls::new(pki.ca()).domain("mesh.test").unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(executed_by, "worker");
    assert_eq!(nodes[1].stats().forwarded_in, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mutual_tls_cluster_members_forward_and_clients_without_a_certificate_are_rejected() {
    let pki = Pki::new("cluster-ca");
    let nodes = cluster(vec![
        Spec::new("entry", 1).tls(pki.node("entry", true)),
        Spec::new("worker", 4).tls(pki.node("worker", true)),
    ])
    .await;
    let _busy = nodes[0].node.load().begin_task();

    let response = nodes[0].execute(action(10)).await.response.unwrap();
    assert_eq!(response.executed_by, "worker");
    assert_eq!(response.forwarded_by, "entry");
    assert_eq!(nodes[1].stats().forwarded_in, 1);

    // The server refuses the handshake of a client without a certificate, or with one from
    // another CA, and of a plaintext client: no call reaches the service. (A plain tonic
    // client learns of the refusal at its first call, as an alert or as a closed connection.)
    let anonymous = PeerTls::new(pki.ca());
    let stranger = PeerTls::new(pki.ca()).identity(Pki::new("other-ca").identity("stranger"));
    for (who, tls) in [("anonymous", &anonymous), ("stranger", &stranger)] {
        let refused = execute_with(&nodes[1], tls).await;
        assert!(refused.is_err(), "{who}: {refused:?}");
    }
    let plaintext = async {
        let mut client = nodes[1].plaintext_client().await?;
        Ok::<_, Box<dyn std::error::Error>>(client.execute(action(10)).await?)
    }
    .await;
    assert!(plaintext.is_err());
    let stats = nodes[1].stats();
    assert_eq!(stats.executed, 1, "only the forwarded call ran: {stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_certificate_is_from_another_ca_is_refused_before_accept_and_retries_elsewhere()
 {
    let pki = Pki::new("cluster-ca");
    let rogue_pki = Pki::new("rogue-ca");
    // The rogue's server is fine (so the test can call it), but the client certificate it
    // presents to peers comes from a CA the cluster does not trust.
    let rogue = NodeTls {
        server: ServerTls::new(pki.identity("rogue")),
        peers: PeerTls::new(pki.ca()).identity(rogue_pki.identity("rogue")),
        client: PeerTls::new(pki.ca()),
    };
    let nodes = cluster(vec![
        Spec::new("rogue", 1).tls(rogue),
        // The most attractive peer requires client certificates from the cluster CA.
        Spec::new("strict", 100).tls(pki.node("strict", true)),
        // The next one asks for none.
        Spec::new("lenient", 4).tls(pki.node("lenient", false)),
    ])
    .await;
    let _busy = nodes[0].node.load().begin_task();
    let _lenient_busy = nodes[2].node.load().begin_task(); // 1/4: strict (0/100) looks better
    support::bounded(
        "the rogue to see lenient's load",
        nodes[0].node.membership().wait_until(|v| {
            v.get("lenient")
                .and_then(|m| m.state())
                .is_some_and(|s| s.pending == 1)
        }),
    )
    .await;

    let executed_by = execute_with(&nodes[0], &PeerTls::new(pki.ca()))
        .await
        .unwrap();
    assert_eq!(
        executed_by, "lenient",
        "strict refused the handshake; retried elsewhere"
    );
    assert_eq!(nodes[1].stats().forwarded_in, 0);
    assert_eq!(nodes[1].stats().executed, 0);
    assert_eq!(nodes[2].stats().forwarded_in, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_certificate_is_from_another_ca_runs_the_call_locally_when_nobody_accepts_it()
{
    let pki = Pki::new("cluster-ca");
    let rogue = NodeTls {
        server: ServerTls::new(pki.identity("rogue")),
        peers: PeerTls::new(pki.ca()).identity(Pki::new("rogue-ca").identity("rogue")),
        client: PeerTls::new(pki.ca()),
    };
    let nodes = cluster(vec![
        Spec::new("rogue", 2).tls(rogue),
        Spec::new("strict", 100).tls(pki.node("strict", true)),
    ])
    .await;
    let _busy = nodes[0].node.load().begin_task(); // 1/2: strict (0/100) looks better

    for _ in 0..3 {
        let executed_by = execute_with(&nodes[0], &PeerTls::new(pki.ca()))
            .await
            .unwrap();
        assert_eq!(executed_by, "rogue");
    }
    assert_eq!(nodes[1].stats().executed, 0);
    assert_eq!(nodes[0].stats().forwarded_out, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_peer_is_refused_by_a_tls_node() {
    let pki = Pki::new("cluster-ca");
    let entry = TestNode::start(Spec::new("entry", 1).tls(pki.node("entry", false)), &[]).await;
    let plain = TestNode::start(Spec::new("plain", 100), &[entry.node.gossip_addr()]).await;
    let nodes = vec![entry, plain];
    converge(&nodes).await;
    let _busy = nodes[0].node.load().begin_task(); // plain (0/100) looks better

    let response = nodes[0].execute(action(10)).await.response.unwrap();
    assert_eq!(
        response.executed_by, "entry",
        "never forwarded in plaintext"
    );
    assert_eq!(nodes[1].stats().forwarded_in, 0);

    // Calls that must go to that peer fail, and say why.
    let status = nodes[0]
        .client()
        .await
        .wait_execution(WaitExecutionRequest {
            name: format!("plain:{}", uuid::Uuid::now_v7()),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        status.message(),
        format!(
            "peer plain advertises an invalid grpc endpoint \"http://{}\": peer channels require \
             TLS (ChannelConfig::tls is set), so endpoints must be https://; refusing to forward \
             in plaintext",
            nodes[1].grpc_addr
        )
    );
}
