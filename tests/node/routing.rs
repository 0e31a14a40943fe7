//! Routing through real gRPC servers on 127.0.0.1: forwarding, operation ownership, retries,
//! channel eviction and herding.

use crate::support;

use std::collections::HashMap;

use futures::StreamExt;
use mesh::{OperationId, WhenFull, route::FORWARDED_BY};
use mesh_demo::{
    finish,
    proto::demo::v1::{Stage, WaitExecutionRequest},
};
use support::{Spec, TestNode, action, bounded, cluster};
use tonic::{Code, Request};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_node_forwards_and_the_operation_names_the_executor() {
    let nodes = cluster(vec![
        Spec::new("entry", 1),
        Spec::new("worker-a", 4),
        Spec::new("worker-b", 4),
    ])
    .await;
    let _busy = nodes[0].node.load().begin_task(); // entry is full: 1/1

    let mut request = Request::new(action(50));
    request
        .metadata_mut()
        .insert("x-request-id", "req-42".parse().unwrap());
    request
        .metadata_mut()
        .insert("authorization", "Bearer secret".parse().unwrap());
    let done = nodes[0].execute(request).await;

    let response = done.response.unwrap();
    assert_ne!(response.executed_by, "entry");
    let owner: OperationId = done.name.parse().unwrap();
    assert_eq!(
        owner.node().as_str(),
        response.executed_by,
        "the name names the executor"
    );
    assert_eq!(response.forwarded_by, "entry");
    assert_eq!(
        response.request_id, "req-42",
        "metadata travels with the forwarded call"
    );
    assert_eq!(nodes[0].stats().forwarded_out, 1);
    let executor = nodes
        .iter()
        .find(|n| n.name() == response.executed_by)
        .unwrap();
    assert_eq!(executor.stats().forwarded_in, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_entry_node_runs_the_action_itself() {
    let nodes = cluster(vec![Spec::new("entry", 4), Spec::new("peer", 4)]).await;
    let done = nodes[0].execute(action(10)).await;
    assert_eq!(
        done.response.unwrap().executed_by,
        "entry",
        "local wins ties"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_execution_on_a_third_node_streams_the_owners_updates_to_completion() {
    let nodes = cluster(vec![
        Spec::new("entry", 1),
        Spec::new("owner", 4),
        Spec::new("third", 0),
    ])
    .await;
    let _busy = nodes[0].node.load().begin_task();

    let mut request = action(400);
    request.instance_name = "main".to_owned();
    let mut execute = nodes[0]
        .client()
        .await
        .execute(request)
        .await
        .unwrap()
        .into_inner();
    let first = execute.next().await.unwrap().unwrap();
    assert!(
        first.name.starts_with("main/operations/owner:"),
        "{}",
        first.name
    );
    assert!(!first.done);

    let mut wait = nodes[2]
        .client()
        .await
        .wait_execution(WaitExecutionRequest {
            name: first.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut stages = Vec::new();
    let mut last = None;
    while let Some(update) = wait.next().await {
        let update = update.unwrap();
        stages.push(update.stage);
        last = Some(update);
    }
    let last = last.unwrap();
    assert!(last.done);
    assert_eq!(last.name, first.name);
    assert_eq!(last.stage, Stage::Completed as i32);
    assert_eq!(last.response.unwrap().executed_by, "owner");
    assert!(
        stages.windows(2).all(|w| w[0] <= w[1]),
        "stages only advance: {stages:?}"
    );
    assert_eq!(nodes[2].stats().waits_relayed, 1);
    // The original Execute stream completes too.
    finish(execute).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_request_is_never_forwarded_again() {
    let nodes = cluster(vec![Spec::new("busy", 1), Spec::new("idle", 8)]).await;
    let _busy = nodes[0].node.load().begin_task();

    // Arrives at a full node but marked as forwarded: it must run there anyway.
    let mut request = Request::new(action(10));
    request
        .metadata_mut()
        .insert(FORWARDED_BY, "idle".parse().unwrap());
    let response = nodes[0].execute(request).await.response.unwrap();
    assert_eq!(response.executed_by, "busy");
    assert_eq!(response.forwarded_by, "idle");
    assert_eq!(nodes[0].stats().forwarded_out, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_owner_gives_not_found() {
    let mut nodes = cluster(vec![Spec::new("entry", 1), Spec::new("doomed", 4)]).await;
    let _busy = nodes[0].node.load().begin_task();
    let done = nodes[0].execute(action(10)).await;
    assert!(done.name.starts_with("doomed:"));

    nodes.pop().unwrap().kill().await;
    // The view, not the event stream: a stream that lagged would lose the event (and the old
    // loop stopped silently on a lag, as if the event had come).
    bounded(
        "the owner to be declared failed",
        nodes[0]
            .node
            .membership()
            .wait_until(|v| v.get("doomed").is_none()),
    )
    .await;

    let status = nodes[0]
        .client()
        .await
        .wait_execution(WaitExecutionRequest {
            name: done.name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(
        status.message().contains("owner doomed is not a member"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_operation_on_a_live_owner_gives_not_found() {
    let nodes = cluster(vec![Spec::new("a", 1), Spec::new("b", 1)]).await;
    let name = format!("b:{}", uuid::Uuid::now_v7());
    let status = nodes[0]
        .client()
        .await
        .wait_execution(WaitExecutionRequest { name })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(
        status.message().contains("not known to its owner b"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_operation_name_gives_invalid_argument() {
    let nodes = cluster(vec![Spec::new("a", 1)]).await;
    for name in [
        "",
        "no-separator",
        "node:not-a-uuid",
        "bad node:0190b6c4-6f1c-7cc0-9d5e-3f6b8a2e4d10",
    ] {
        let status = nodes[0]
            .client()
            .await
            .wait_execution(WaitExecutionRequest {
                name: name.to_owned(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{name:?}: {status:?}");
        assert!(
            status.message().contains("expected \"{node_id}:{uuid}\""),
            "{name:?}: {}",
            status.message()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_chosen_peer_is_retried_elsewhere() {
    // A port with nothing listening: bind, note, release.
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let entry = TestNode::start(Spec::new("entry", 1), &[]).await;
    let seed = [entry.node.gossip_addr()];
    // The most attractive peer (0/100) advertises an endpoint nobody answers on.
    let ghost = TestNode::start_advertising(
        Spec::new("ghost", 100),
        &seed,
        Some(format!("http://127.0.0.1:{dead_port}")),
    )
    .await;
    let worker = TestNode::start(Spec::new("worker", 4), &seed).await;
    let nodes = vec![entry, ghost, worker];
    support::converge(&nodes).await;
    let _busy = nodes[0].node.load().begin_task();

    for _ in 0..3 {
        let done = nodes[0].execute(action(10)).await;
        let response = done.response.unwrap();
        assert_eq!(response.executed_by, "worker");
    }
    assert_eq!(nodes[2].stats().forwarded_in, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_peer_is_unreachable_the_entry_node_runs_the_action() {
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let entry = TestNode::start(Spec::new("entry", 2), &[]).await;
    let ghost = TestNode::start_advertising(
        Spec::new("ghost", 100),
        &[entry.node.gossip_addr()],
        Some(format!("http://127.0.0.1:{dead_port}")),
    )
    .await;
    let nodes = vec![entry, ghost];
    support::converge(&nodes).await;
    let _busy = nodes[0].node.load().begin_task(); // 1/2: the ghost (0/100) looks better
    let done = nodes[0].execute(action(10)).await;
    assert_eq!(done.response.unwrap().executed_by, "entry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_channel_to_a_failed_peer_is_dropped() {
    let mut nodes = cluster(vec![Spec::new("entry", 1), Spec::new("peer", 4)]).await;
    let _busy = nodes[0].node.load().begin_task();
    nodes[0].execute(action(10)).await;
    let channels = nodes[0].node.router().channels().clone();
    assert!(channels.contains("peer"));

    nodes.pop().unwrap().kill().await;
    bounded("the channel to be evicted", async {
        while channels.contains("peer") {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(channels.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_tags_route_to_a_matching_node_or_fail_precondition() {
    let nodes = cluster(vec![
        Spec::new("entry", 8).tag("os", "linux"),
        Spec::new("gpu", 8).tag("os", "linux").tag("pool", "gpu"),
    ])
    .await;
    let mut request = action(10);
    request
        .action
        .as_mut()
        .unwrap()
        .platform
        .insert("pool".into(), "gpu".into());
    let done = nodes[0].execute(request).await;
    assert_eq!(done.response.unwrap().executed_by, "gpu");

    let mut impossible = action(10);
    impossible
        .action
        .as_mut()
        .unwrap()
        .platform
        .insert("os".into(), "windows".into());
    let status = nodes[0]
        .client()
        .await
        .execute(impossible)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(
        status.message(),
        "no node in the cluster has the required tags [os=windows]"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_cluster_is_full_a_waiting_router_sends_the_call_to_the_first_free_slot() {
    let nodes = cluster(vec![
        Spec::new("entry", 1).when_full(WhenFull::Wait),
        Spec::new("worker", 1),
    ])
    .await;
    let _entry_busy = nodes[0].node.load().begin_task(); // never frees during the test
    let worker_busy = nodes[1]
        .client()
        .await
        .execute(action(300))
        .await
        .unwrap()
        .into_inner();
    bounded(
        "the entry to see the worker full",
        nodes[0].node.membership().wait_until(|v| {
            v.get("worker")
                .and_then(|m| m.state())
                .is_some_and(|s| s.pending == 1)
        }),
    )
    .await;

    // Everyone is full: the call is held, not queued on the entry (whose slot never frees),
    // and runs on the worker once its slot frees.
    let response = bounded("the held call to complete", nodes[0].execute(action(10)))
        .await
        .response
        .unwrap();
    assert_eq!(response.executed_by, "worker");
    // It was held at the router, not sent to the full worker to queue there: the worker
    // never had more than its one slot's worth of work.
    assert_eq!(nodes[1].node.load().peak_pending(), 1);
    assert_eq!(nodes[0].stats().executed, 0);
    finish(worker_busy).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_nodes_with_stale_state_spread_a_burst_instead_of_herding() {
    // Workers publish their state once and then not again for a minute: during the burst every
    // entry node sees all workers idle. Only optimistic accounting can spread the load.
    let mut stale = support::patient();
    stale.state_publish_interval = std::time::Duration::from_secs(60);
    let mut specs = vec![
        Spec::new("entry-0", 0),
        Spec::new("entry-1", 0),
        Spec::new("entry-2", 0),
    ];
    for name in ["worker-0", "worker-1", "worker-2", "worker-3"] {
        specs.push(Spec::new(name, 4).timing(stale.clone()));
    }
    let nodes = cluster(specs).await;

    let per_entry = 12;
    let mut firsts = Vec::new();
    for entry in &nodes[..3] {
        for _ in 0..per_entry {
            let mut client = entry.client().await;
            firsts.push(tokio::spawn(async move {
                let mut stream = client.execute(action(2_000)).await.unwrap().into_inner();
                let first = stream.next().await.unwrap().unwrap();
                first
                    .name
                    .parse::<OperationId>()
                    .unwrap()
                    .node()
                    .to_string()
            }));
        }
    }
    let mut per_worker: HashMap<String, usize> = HashMap::new();
    for first in firsts {
        *per_worker.entry(first.await.unwrap()).or_default() += 1;
    }
    let total = 3 * per_entry;
    assert_eq!(per_worker.values().sum::<usize>(), total);
    assert_eq!(per_worker.len(), 4, "every worker got work: {per_worker:?}");
    let most = per_worker.values().copied().max().unwrap();
    assert!(
        most <= total / 4 + 3,
        "no worker may get much more than its share of {}: {per_worker:?}",
        total / 4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_are_forwarded_too() {
    use mesh::{
        admin::AdminService,
        proto::admin::v1::{
            ListMembersRequest, mesh_admin_client::MeshAdminClient,
            mesh_admin_server::MeshAdminServer,
        },
        route::{
            Decision,
            layer::{RouteLayer, Rule},
        },
    };

    let nodes = cluster(vec![Spec::new("entry", 1), Spec::new("peer", 4)]).await;
    let _busy = nodes[0].node.load().begin_task();
    // The entry's own admin service behind a route layer that spreads ListMembers, called
    // through the layer as a server would be.
    let layer = RouteLayer::new(nodes[0].node.router().clone())
        .rule(
            "/mesh.admin.v1.MeshAdmin/ListMembers",
            Rule::spread(|_: ListMembersRequest, _| async {
                Ok(Decision::Route(mesh::RouteRequest::new()))
            }),
        )
        .unwrap();
    let entry = tower::Layer::layer(
        &layer,
        MeshAdminServer::new(AdminService::for_node(&nodes[0].node)),
    );
    let mut request = Request::new(ListMembersRequest {});
    request
        .metadata_mut()
        .insert("x-request-id", "unary-1".parse().unwrap());
    let response = MeshAdminClient::new(entry)
        .list_members(request)
        .await
        .unwrap();
    assert_eq!(
        layer.stats().forwarded_out,
        1,
        "a full entry node must forward"
    );
    let forwarded_to: Vec<String> = layer.peer_stats().keys().map(|n| n.to_string()).collect();
    assert_eq!(forwarded_to, ["peer"]);
    // The answer is the peer's own: it lists the cluster as the peer sees it.
    assert_eq!(response.into_inner().local_node_id, "peer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_execute_whose_node_dies_mid_stream_completes_on_another_node() {
    // Execute is idempotent (its rule says so): the work of a dead node runs again elsewhere
    // and the client's stream goes on, as every REAPI server requeues a dead worker's work.
    let mut nodes = cluster(vec![Spec::new("entry", 1), Spec::new("doomed", 4)]).await;
    let busy = nodes[0].node.load().begin_task();
    let mut stream = nodes[0]
        .client()
        .await
        .execute(action(1_500))
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.name.starts_with("doomed:"), "{}", first.name);

    nodes.pop().unwrap().kill().await;
    drop(busy); // the entry has room for the re-routed action
    let done = bounded("the re-routed action to complete", finish(stream))
        .await
        .unwrap();
    let response = done.response.unwrap();
    assert_eq!(response.executed_by, "entry");
    assert!(done.name.starts_with("entry:"), "{}", done.name);
    assert_eq!(nodes[0].stats().rerouted, 1);
    assert_eq!(nodes[0].stats().executed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chosen_peer_answers_calls_addressed_to_it_and_strangers_are_refused() {
    use mesh::proto::admin::v1::{ListMembersRequest, mesh_admin_client::MeshAdminClient};

    let nodes = cluster(vec![Spec::new("a", 1), Spec::new("b", 1)]).await;
    let router = nodes[0].node.router();
    let metadata = tonic::metadata::MetadataMap::new();
    let peer = router
        .peer(&mesh::NodeId::new("b").unwrap(), &metadata)
        .unwrap();
    assert_eq!(peer.target().node_id().as_str(), "b");
    let answer = MeshAdminClient::new(peer.channel())
        .list_members(peer.request(ListMembersRequest {}))
        .await
        .unwrap();
    assert_eq!(answer.into_inner().local_node_id, "b");

    for stranger in ["a", "nobody"] {
        let error = router
            .peer(&mesh::NodeId::new(stranger).unwrap(), &metadata)
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("node {stranger} is not a live peer of this node")
        );
        assert_eq!(error.code(), Code::Unavailable);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_gpu_call_does_not_delay_a_call_a_free_linux_node_can_take() {
    let nodes = cluster(vec![
        Spec::new("entry", 1)
            .tag("os", "linux")
            .when_full(WhenFull::Wait),
        Spec::new("gpu", 1).tag("os", "linux").tag("pool", "gpu"),
        Spec::new("linux", 1).tag("os", "linux"),
    ])
    .await;
    let _entry_busy = nodes[0].node.load().begin_task();
    let _gpu_busy = nodes[1].node.load().begin_task(); // every pool=gpu slot is busy
    bounded(
        "the entry to see the gpu node full",
        nodes[0].node.membership().wait_until(|v| {
            v.get("gpu")
                .and_then(|m| m.state())
                .is_some_and(|s| s.pending == 1)
        }),
    )
    .await;

    let mut gpu_request = action(10);
    gpu_request
        .action
        .as_mut()
        .unwrap()
        .platform
        .insert("pool".into(), "gpu".into());
    let mut gpu_client = nodes[0].client().await;
    let held = tokio::spawn(async move { gpu_client.execute(gpu_request).await });
    // The gpu call is held at the entry's router before the linux call arrives.
    let router = nodes[0].node.router().clone();
    bounded("the gpu call to be held", async {
        while router.held_calls() == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;

    let response = bounded("the linux call", nodes[0].execute(action(10)))
        .await
        .response
        .unwrap();
    assert_eq!(response.executed_by, "linux");
    assert!(
        !held.is_finished(),
        "the gpu call waits for a gpu slot, and only it waits"
    );
    assert_eq!(router.held_calls(), 1);
    assert_eq!(nodes[1].stats().forwarded_in, 0);
    held.abort();
}
