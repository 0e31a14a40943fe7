//! One store for the whole cluster: every replica answers for every blob, a blob outlives its
//! writer, membership changes move data to the new owners, and identical actions run once.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use futures::StreamExt as _;
use mesh_reapi::{Digest, proto::build::bazel::remote::execution::v2::ExecuteResponse};

use mesh_demo::{Replica, Served};
use mesh_reapi::{
    Reapi, ReapiServer,
    proto::build::bazel::remote::execution::v2::{
        ExecuteOperationMetadata,
        content_addressable_storage_client::ContentAddressableStorageClient,
        execution_client::ExecutionClient, execution_stage::Value as Stage,
    },
};
use prost::Message as _;

use crate::support::{
    Cluster, Gate, blob_where, bounded, data_dir, eventually, execute_request, finished,
    missing_on, read, response, shell, test_config, upload, upload_with, write,
};

/// `n` small blobs and their digests.
fn blobs(n: usize, tag: &str) -> Vec<(Digest, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let data = format!("{tag} blob {i}").into_bytes();
            (Digest::of(&data), data)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_missing_blobs_answers_for_the_cluster_through_every_replica() {
    let cluster = Cluster::start(5, |_, _| {}).await;
    let small = blobs(40, "find");
    upload(&cluster, 0, &small).await;
    let large: Vec<u8> = (0..2 * 1024 * 1024 + 7)
        .map(|i: u32| (i % 249) as u8)
        .collect();
    let large_digest = Digest::of(&large);
    write(
        &mut cluster.bytestream(0).await,
        format!("uploads/u/blobs/{large_digest}"),
        &large,
        256 * 1024,
    )
    .await
    .unwrap();
    let absent = Digest::of(b"uploaded nowhere");
    let mut asked: Vec<Digest> = small.iter().map(|(d, _)| *d).collect();
    asked.push(large_digest);
    asked.push(absent);
    for position in 0..5 {
        assert_eq!(
            missing_on(&cluster, position, &asked).await,
            vec![absent],
            "through replica {position}: only the blob nobody uploaded is missing"
        );
    }
    // Every blob is on its owners, and no replica holds everything (R = 2 of 5, plus the
    // writer's own copy).
    for digest in &asked[..asked.len() - 1] {
        assert!(cluster.owners_hold(digest), "{digest} is on its owners");
    }
    for position in 1..5 {
        let held = asked.iter().filter(|d| cluster.holds(position, d)).count();
        assert!(
            held < asked.len() - 1,
            "replica {position} holds all {held}"
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_survives_its_writer_and_one_more_replica() {
    let mut cluster = Cluster::start(4, |_, _| {}).await;
    let small = blobs(30, "durable");
    upload(&cluster, 0, &small).await;
    let large: Vec<u8> = (0..3 * 1024 * 1024).map(|i: u32| (i % 241) as u8).collect();
    let large_digest = Digest::of(&large);
    write(
        &mut cluster.bytestream(0).await,
        format!("uploads/d/blobs/{large_digest}"),
        &large,
        1024 * 1024,
    )
    .await
    .unwrap();
    // The worst second loss: a replica that holds a copy of the large blob.
    let victim = (1..4)
        .find(|p| cluster.holds(*p, &large_digest))
        .expect("a copy beside the writer's");
    let victim_name = cluster.node_id(victim);
    cluster.stop(cluster.position(&victim_name)).await;
    cluster.stop(cluster.position("r0")).await;
    assert_eq!(cluster.replicas.len(), 2);
    for position in 0..2 {
        let (data, _) = read(&mut cluster.bytestream(position).await, &large_digest)
            .await
            .unwrap_or_else(|e| panic!("the large blob through replica {position}: {e}"));
        assert!(data == large);
        for (digest, data) in &small {
            let (read_back, _) = read(&mut cluster.bytestream(position).await, digest)
                .await
                .unwrap_or_else(|e| panic!("{digest} through replica {position}: {e}"));
            assert_eq!(&read_back, data);
        }
    }
    cluster.shutdown().await;
}

/// A large upload is passed on to its owners while it arrives. An owner that cannot take it
/// (its store is too small) is made up for by the next replica of the ranking before the
/// write is answered; and an upload whose bytes do not match its digest is stored nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_upload_reaches_its_owners_as_it_arrives_and_a_refusing_owner_is_replaced() {
    // r1 can hold nothing over 1 MiB.
    let mut cluster = Cluster::start(4, |i, config| {
        if i == 1 {
            config.cas_max_bytes = 1 << 20;
        }
    })
    .await;
    // A blob whose owners are r1 and another replica, not the writer r0: r1 is passed the
    // upload and refuses it.
    let (data, digest) = blob_where(3 * 1024 * 1024 + 17, |digest| {
        let owners = cluster.replicas[0].reapi().cluster().owners(digest);
        owners.iter().any(|o| o.as_str() == "r1") && owners.iter().all(|o| o.as_str() != "r0")
    });
    let committed = write(
        &mut cluster.bytestream(0).await,
        format!("uploads/t/blobs/{digest}"),
        &data,
        1024 * 1024,
    )
    .await
    .unwrap();
    assert_eq!(committed, data.len() as i64);
    // Answered: the writer and two more replicas hold it, r1 not among them.
    let holders: Vec<String> = (0..4)
        .filter(|p| cluster.holds(*p, &digest))
        .map(|p| cluster.node_id(p))
        .collect();
    assert_eq!(holders.len(), 3, "the writer and two others: {holders:?}");
    assert!(holders.iter().all(|h| h != "r1"), "{holders:?}");
    // Passed on to the owner that took it; copied to its replacement once stored.
    let stats = cluster.replicas[0].stats();
    assert_eq!(stats.bytes_replicated, 2 * data.len() as u64, "{stats:?}");
    assert_eq!(stats.blobs_passed_on, 1, "{stats:?}");

    // The same size with one byte changed: refused, and on no replica under either digest.
    let mut lie = data.clone();
    lie[2 * 1024 * 1024 + 5] ^= 1;
    let claimed: Digest = format!("{}/{}", Digest::of(&lie[1..]).hex(), lie.len())
        .parse()
        .unwrap();
    let error = write(
        &mut cluster.bytestream(0).await,
        format!("uploads/u/blobs/{claimed}"),
        &lie,
        1024 * 1024,
    )
    .await
    .unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
    let actual = Digest::of(&lie);
    for position in 0..4 {
        for digest in [claimed, actual] {
            assert!(
                !cluster.holds(position, &digest),
                "{} holds {digest}",
                cluster.node_id(position)
            );
        }
    }
    cluster.stop(0).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_replica_receives_its_share() {
    let mut cluster = Cluster::start(2, |_, _| {}).await;
    let stored = blobs(60, "join");
    upload(&cluster, 0, &stored).await;
    cluster.restart(2, |_| {}).await;
    cluster.handoff_settled().await;
    let newcomer = cluster.position("r2");
    let share = stored
        .iter()
        .filter(|(d, _)| {
            cluster.replicas[0]
                .reapi()
                .cluster()
                .owners(d)
                .iter()
                .any(|n| n.as_str() == "r2")
        })
        .count();
    assert!(share > 0, "r2 owns some of 60 blobs");
    for (digest, _) in &stored {
        assert!(cluster.owners_hold(digest), "{digest} on its owners");
    }
    let held = stored
        .iter()
        .filter(|(d, _)| cluster.holds(newcomer, d))
        .count();
    assert_eq!(held, share, "r2 received exactly its share");
    let handed: u64 = cluster
        .replicas
        .iter()
        .map(|r| r.stats().blobs_handed_off)
        .sum();
    assert!(handed >= share as u64, "sent by handoff: {handed}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_departure_hands_its_share_to_the_next_owners_and_a_restart_keeps_its_data() {
    let mut cluster = Cluster::start(4, |_, _| {}).await;
    let stored = blobs(80, "leave");
    upload(&cluster, 0, &stored).await;
    cluster.handoff_settled().await;
    let r1_held: Vec<Digest> = stored
        .iter()
        .map(|(d, _)| *d)
        .filter(|d| cluster.holds(cluster.position("r1"), d))
        .collect();
    assert!(!r1_held.is_empty());

    cluster.stop(cluster.position("r1")).await;
    cluster.handoff_settled().await;
    for (digest, _) in &stored {
        assert!(
            cluster.owners_hold(digest),
            "{digest} on its owners without r1"
        );
    }

    // r1 comes back on its data directory: it owns what it owned and holds it already, so
    // nothing is sent to it.
    let before: Vec<u64> = cluster
        .replicas
        .iter()
        .map(|r| r.stats().bytes_handed_off)
        .collect();
    cluster.restart(1, |_| {}).await;
    cluster.handoff_settled().await;
    let back = cluster.position("r1");
    for digest in &r1_held {
        assert!(
            cluster.holds(back, digest),
            "{digest} kept across the restart"
        );
    }
    for (position, bytes) in before.iter().enumerate() {
        assert_eq!(
            cluster.replicas[position].stats().bytes_handed_off,
            *bytes,
            "replica {position} sent nothing to the restarted r1"
        );
    }
    for (digest, _) in &stored {
        assert!(cluster.owners_hold(digest));
    }
    assert!(missing_on(&cluster, back, &r1_held).await.is_empty());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_executes_spread_over_the_cluster_run_once() {
    let cluster = Cluster::start(3, |_, _| {}).await;
    let gate = Gate::new();
    let action = shell(&format!("{}; echo merged > out", gate.wait()))
        .output_file("out")
        .build();
    upload(&cluster, 0, &action.blobs).await;
    let accepted = Arc::new(AtomicUsize::new(0));
    let mut calls = Vec::new();
    for i in 0..100 {
        let mut client = cluster.exec(i % 3).await;
        let accepted = accepted.clone();
        let request = execute_request(action.action, false);
        calls.push(tokio::spawn(async move {
            let mut stream = client.execute(request).await?.into_inner();
            let mut last = None;
            let mut first = true;
            while let Some(operation) = stream.next().await {
                if first {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    first = false;
                }
                last = Some(operation?);
            }
            Ok::<_, tonic::Status>(last.expect("at least one operation"))
        }));
    }
    eventually("all 100 Executes to be accepted", async || {
        accepted.load(Ordering::SeqCst) == 100
    })
    .await;
    gate.open();
    let mut results: Vec<ExecuteResponse> = Vec::new();
    for call in calls {
        let operation = bounded("an Execute to finish", call)
            .await
            .unwrap()
            .unwrap();
        results.push(response(&operation));
    }
    for response in &results {
        let result = response.result.as_ref().expect("a result");
        assert_eq!(result.exit_code, 0, "{response:?}");
        assert_eq!(result, results[0].result.as_ref().unwrap());
    }
    let executed: u64 = cluster.replicas.iter().map(|r| r.stats().executed).sum();
    assert_eq!(
        executed, 1,
        "100 identical Executes ran once in the cluster"
    );
    let merged: u64 = cluster.replicas.iter().map(|r| r.stats().merged).sum();
    let hits: u64 = cluster.replicas.iter().map(|r| r.stats().cache_hits).sum();
    assert_eq!(merged + hits, 99, "merged {merged}, cache hits {hits}");
    cluster.shutdown().await;
}

/// An `Execute` that runs where it lands (as the route layer sends it on: marked forwarded).
fn landing_here(
    action: Digest,
    from: &str,
) -> tonic::Request<mesh_reapi::proto::build::bazel::remote::execution::v2::ExecuteRequest> {
    let mut request = tonic::Request::new(execute_request(action, false));
    request.metadata_mut().insert(
        mesh_route::FORWARDED_BY,
        tonic::metadata::AsciiMetadataValue::try_from(from).unwrap(),
    );
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_whose_runner_crashes_runs_the_action_itself() {
    // r0 on a runtime of its own, so it can crash for real; r1 as usual.
    let (mut r0, r1, _dirs) = crashable_pair().await;
    let connect = |addr: std::net::SocketAddr| async move {
        ExecutionClient::connect(format!("http://{addr}"))
            .await
            .unwrap()
    };
    let gate = Gate::new();
    let action = shell(&format!("{}; echo done > out", gate.wait()))
        .output_file("out")
        .build();
    let mut cas = ContentAddressableStorageClient::connect(format!("http://{}", r1.addr()))
        .await
        .unwrap();
    upload_with(&mut cas, &action.blobs).await;

    // r0 runs it (held on the gate); r1, asked for the same action, follows r0's operation.
    let mut runner = connect(r0.grpc_addr())
        .await
        .execute(landing_here(action.action, "r1"))
        .await
        .unwrap()
        .into_inner();
    // EXECUTING: r0 claimed the action (a claim precedes the wait for a slot) and runs it.
    bounded("r0 to run the action", async {
        loop {
            let operation = runner
                .message()
                .await
                .unwrap()
                .expect("r0's stream goes on");
            let metadata = ExecuteOperationMetadata::decode(
                operation.metadata.as_ref().unwrap().value.as_slice(),
            )
            .unwrap();
            if metadata.stage == Stage::Executing as i32 {
                break;
            }
        }
    })
    .await;
    let mut on_r1 = connect(r1.addr()).await;
    let follower = tokio::spawn(async move {
        let mut stream = on_r1
            .execute(landing_here(action.action, "r0"))
            .await?
            .into_inner();
        let mut operations = Vec::new();
        while let Some(operation) = stream.message().await? {
            operations.push(operation);
        }
        Ok::<_, tonic::Status>(operations)
    });
    // Following holds no slot: r1's load is 0 while its operation exists.
    eventually("r1 to follow r0's operation", async || {
        r1.reapi().known_operations() == 1 && r1.node().load().pending() == 0
    })
    .await;

    // r0 crashes mid-action: r1 finds the operation gone, claims the action anew, runs it.
    r0.crash().await;
    drop(runner);
    gate.open();
    let operations = bounded("the follower's stream to end", follower)
        .await
        .unwrap()
        .expect("no error reaches the client");
    let result = finished(&operations).result.expect("a result");
    assert_eq!(result.exit_code, 0, "{result:?}");
    assert_eq!(result.execution_metadata.unwrap().worker, "r1");
    let stats = r1.stats();
    assert_eq!((stats.executed, stats.merged), (1, 0), "{stats:?}");
    r1.shutdown().await;
}

/// The replica running a forwarded action dies mid-action: the entry routes the `Execute`
/// again (its rule is idempotent) and the client's stream ends with the result. No
/// `UNAVAILABLE` reaches the client, and the re-route is counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_action_whose_replica_dies_is_routed_again_and_the_client_never_notices() {
    // r0, the worker, on a runtime of its own so it can crash for real; r1, the entry.
    let (mut r0, r1, _dirs) = crashable_pair().await;
    let gate = Gate::new();
    let action = shell(&format!("{}; echo done > out", gate.wait()))
        .output_file("out")
        .build();
    let mut cas = ContentAddressableStorageClient::connect(format!("http://{}", r1.addr()))
        .await
        .unwrap();
    upload_with(&mut cas, &action.blobs).await;

    // r1 is full: the Execute sent to it runs on r0, held there on the gate.
    let max = r1.node().load().max_concurrency();
    let busy: Vec<_> = (0..max).map(|_| r1.node().load().begin_task()).collect();
    let mut client = ExecutionClient::connect(format!("http://{}", r1.addr()))
        .await
        .unwrap();
    let call = tokio::spawn(async move {
        let mut stream = client
            .execute(execute_request(action.action, true))
            .await?
            .into_inner();
        let mut operations = Vec::new();
        while let Some(operation) = stream.message().await? {
            operations.push(operation);
        }
        Ok::<_, tonic::Status>(operations)
    });
    let r0_load = r0.node().load().clone();
    eventually("r0 to run the forwarded action", async || {
        r0_load.pending() == 1
    })
    .await;

    // r0 dies mid-action; r1 has room again; the action may now finish wherever it runs.
    r0.crash().await;
    drop(busy);
    gate.open();
    let operations = bounded("the client's stream to end", call)
        .await
        .unwrap()
        .expect("no error reaches the client");
    let result = finished(&operations).result.expect("a result");
    assert_eq!(result.exit_code, 0, "{result:?}");
    assert_eq!(result.execution_metadata.unwrap().worker, "r1");
    let stats = r1.stats();
    assert_eq!(stats.rerouted, 1, "{stats:?}");
    assert_eq!(stats.executed, 1, "{stats:?}");
    r1.shutdown().await;
}

/// Two replicas that see each other: `r0` on a runtime of its own, so it can crash for real,
/// and `r1` as usual; with their data directories (keep them alive).
async fn crashable_pair() -> (Replica<Reapi>, ReapiServer, [tempfile::TempDir; 2]) {
    let dir0 = data_dir();
    let config0 = test_config(dir0.path());
    let r0 = Replica::start(
        mesh::Node::builder()
            .node_id("r0")
            .unwrap()
            .gossip_bind("127.0.0.1:0".parse().unwrap())
            .timing(mesh::Timing::local()),
        "127.0.0.1:0".parse().unwrap(),
        None,
        move |node| {
            let reapi = Reapi::open(node.clone(), &config0)
                .map_err(|e| mesh_demo::ReplicaError::Serve(e.to_string()))?;
            Ok(Served {
                layer: reapi.layer(),
                routes: reapi.routes(),
                parts: reapi,
            })
        },
    )
    .await
    .unwrap();
    let dir1 = data_dir();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let r1 = ReapiServer::start(
        mesh::Node::builder()
            .node_id("r1")
            .unwrap()
            .gossip_bind("127.0.0.1:0".parse().unwrap())
            .timing(mesh::Timing::local())
            .seeds([r0.node().gossip_addr()]),
        test_config(dir1.path()),
        listener,
    )
    .await
    .unwrap();
    for node in [r0.node(), r1.node()] {
        bounded(
            "both replicas to see each other",
            node.membership().wait_until(|view| {
                view.len() == 2
                    && view
                        .peers()
                        .iter()
                        .all(|p| p.state().is_some_and(|s| s.grpc_endpoint.is_some()))
            }),
        )
        .await;
    }
    (r0, r1, [dir0, dir1])
}
