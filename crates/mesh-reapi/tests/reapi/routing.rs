//! Routing through the layer: the action-cache check before routing, the route request built
//! from the action, and a whole walk through a routed cluster.

use tonic::metadata::MetadataMap;

use mesh_reapi::Digest;

use crate::support::{
    Cluster, Gate, bounded, execute, execute_request, finished, read, shell, upload, wait_execution,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_requests_carry_the_platform_as_required_tags() {
    let cluster = Cluster::start(2, |_, _| {}).await;
    let mut action = shell("true").input("src/a.c", b"int a;");
    action.platform = vec![
        ("OSFamily".into(), "Linux".into()),
        ("pool".into(), "default".into()),
    ];
    let built = action.build();
    upload(&cluster, 0, &built.blobs).await;
    // Asked on B, which has to fetch the Action and Command from A.
    let execution = cluster.replicas[1].reapi().execution().clone();
    let route = execution
        .route_request(&execute_request(built.action, false), &MetadataMap::new())
        .await
        .unwrap();
    let tags: Vec<(&str, &str)> = route
        .required_tags()
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(tags, [("OSFamily", "Linux"), ("pool", "default")]);
    let affinity = route.affinity_key().expect("the input root digest");
    let action = built
        .blobs
        .iter()
        .find(|(digest, _)| *digest == built.action)
        .map(|(_, data)| {
            <mesh_reapi::proto::build::bazel::remote::execution::v2::Action as prost::Message>::decode(
                data.as_slice(),
            )
            .unwrap()
        })
        .unwrap();
    let root = mesh_reapi::Digest::from_proto(
        action.input_root_digest.as_ref().unwrap(),
        "root",
        mesh_reapi::DigestFunction::Sha256,
    )
    .unwrap();
    assert_eq!(
        affinity,
        root.hash(),
        "the affinity key is the input root digest"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_check_before_routing_honours_skip_cache_lookup() {
    let cluster = Cluster::start(2, |_, _| {}).await;
    let built = shell("echo cached").build();
    upload(&cluster, 0, &built.blobs).await;
    let execution = cluster.replicas[1].reapi().execution().clone();
    let metadata = MetadataMap::new();
    assert!(
        execution
            .cached_result(&execute_request(built.action, false), &metadata)
            .await
            .unwrap()
            .is_none(),
        "nothing cached yet"
    );
    let ran = finished(
        &execute(
            &mut cluster.exec(0).await,
            execute_request(built.action, false),
        )
        .await
        .unwrap(),
    );
    // B finds A's result before any routing decision; skip_cache_lookup means "don't".
    let hit = execution
        .cached_result(&execute_request(built.action, false), &metadata)
        .await
        .unwrap();
    assert_eq!(hit, ran.result);
    assert!(
        execution
            .cached_result(&execute_request(built.action, true), &metadata)
            .await
            .unwrap()
            .is_none()
    );
    // Bad input is refused here too.
    let mut bad = execute_request(built.action, false);
    bad.action_digest.as_mut().unwrap().hash = "nope".into();
    let error = execution.cached_result(&bad, &metadata).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    cluster.shutdown().await;
}

/// The walk through the routed cluster: inputs uploaded to A, `Execute` on a saturated
/// A runs on B, the outputs are read back from A and from C, `WaitExecution` through C, a
/// repeat is a cache hit, and a gone owner answers `NOT_FOUND`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_on_a_saturated_replica_runs_on_a_peer_and_every_replica_serves_the_result() {
    let cluster = Cluster::start(3, |_, config| config.max_concurrency = 2).await;
    let (a, b, c) = (0, 1, 2);
    // A is full, and so is C (A must have heard it): only B has room.
    let _a_busy: Vec<_> = (0..2)
        .map(|_| cluster.replicas[a].node().load().begin_task())
        .collect();
    let _c_busy: Vec<_> = (0..2)
        .map(|_| cluster.replicas[c].node().load().begin_task())
        .collect();
    let c_id = cluster.node_id(c);
    bounded(
        "A to see C full",
        cluster.replicas[a].node().membership().wait_until(|view| {
            view.get(&c_id)
                .and_then(|m| m.state())
                .is_some_and(|s| s.pending == 2)
        }),
    )
    .await;

    let gate = Gate::new();
    let action = shell(&format!(
        "{}; tr a-z A-Z < in/source.txt > out/result.txt",
        gate.wait()
    ))
    .input("in/source.txt", b"routed")
    .output_file("out/result.txt")
    .build();
    upload(&cluster, a, &action.blobs).await;
    let mut stream = cluster
        .exec(a)
        .await
        .execute(execute_request(action.action, false))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let b_id = cluster.node_id(b);
    assert!(
        first.name.starts_with(&format!("operations/{b_id}:")),
        "the operation is B's: {}",
        first.name
    );
    // Followed through C, which routes WaitExecution to the owner.
    let mut through_c = cluster.exec(c).await;
    let name = first.name.clone();
    let waiting = tokio::spawn(async move { wait_execution(&mut through_c, &name).await });
    gate.open();
    let followed = bounded("WaitExecution through C", waiting)
        .await
        .unwrap()
        .unwrap();
    let response = finished(&followed);
    let result = response.result.clone().expect("a result");
    assert_eq!(result.execution_metadata.unwrap().worker, b_id);
    assert_eq!(
        finished(&collect(stream).await),
        response,
        "both streams agree"
    );
    assert_eq!(cluster.replicas[a].stats().forwarded_out, 1);
    assert_eq!(cluster.replicas[c].stats().waits_relayed, 1);
    assert_eq!(cluster.replicas[b].stats().executed, 1);

    // The output, read back from A and from C.
    let output = Digest::from_proto(
        result.output_files[0].digest.as_ref().unwrap(),
        "d",
        mesh_reapi::DigestFunction::Sha256,
    )
    .unwrap();
    for reader in [a, c] {
        let (data, _) = read(&mut cluster.bytestream(reader).await, &output)
            .await
            .unwrap();
        assert_eq!(data, b"ROUTED");
    }

    // A repeat through A is a cache hit, answered by A without a forward.
    let repeat = finished(
        &execute(
            &mut cluster.exec(a).await,
            execute_request(action.action, false),
        )
        .await
        .unwrap(),
    );
    assert!(repeat.cached_result);
    assert_eq!(repeat.result, response.result);
    assert_eq!(
        cluster.replicas[a].stats().forwarded_out,
        1,
        "no new forward"
    );
    assert_eq!(cluster.replicas[b].stats().executed, 1, "no new execution");

    // B leaves: its operations are gone, and any replica says so.
    let mut cluster = cluster;
    let gone = cluster.replicas.remove(b);
    gone.shutdown().await;
    let a_node = cluster.replicas[a].node().clone();
    bounded(
        "A to see B gone",
        a_node
            .membership()
            .wait_until(|view| view.get(&b_id).is_none()),
    )
    .await;
    let error = wait_execution(&mut cluster.exec(a).await, &first.name)
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::NotFound, "{error:?}");
    assert!(
        error
            .message()
            .contains(&format!("owner {b_id} is not a member")),
        "{}",
        error.message()
    );
    cluster.shutdown().await;
}

async fn collect(
    mut stream: tonic::Streaming<mesh_reapi::proto::google::longrunning::Operation>,
) -> Vec<mesh_reapi::proto::google::longrunning::Operation> {
    let mut operations = Vec::new();
    while let Some(operation) = stream.message().await.unwrap() {
        operations.push(operation);
    }
    operations
}
