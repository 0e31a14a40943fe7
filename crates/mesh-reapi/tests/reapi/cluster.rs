//! Blobs and action results across replicas: nothing shared, everything found.

use mesh_reapi::{
    Digest,
    proto::{
        build::bazel::remote::execution::v2::{
            ActionResult, BatchReadBlobsRequest, Directory, FindMissingBlobsRequest,
            GetActionResultRequest, GetTreeRequest, OutputFile, Tree, UpdateActionResultRequest,
            WaitExecutionRequest,
        },
        google::bytestream::ReadRequest,
    },
};
use prost::Message as _;
use tonic::{Code, metadata::AsciiMetadataValue};

use crate::support::{
    Cluster, Gate, blob_where, execute, execute_request, finished, missing_on, read, shell, upload,
    wait_execution,
};

/// The action most tests run: reads an input, writes an output file and an output directory.
fn produce() -> crate::support::TestAction {
    shell("tr a-z A-Z < in/source.txt > out/result.txt; mkdir -p tree/sub; printf leaf > tree/sub/leaf; printf top > tree/top")
        .input("in/source.txt", b"from the client")
        .output_file("out/result.txt")
        .output_directory("tree")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_uploaded_to_one_replica_run_on_another_and_outputs_are_read_everywhere() {
    let cluster = Cluster::start(3, |_, _| {}).await;
    let action = produce().build();
    upload(&cluster, 0, &action.blobs).await;
    let uploaded: Vec<Digest> = action.blobs.iter().map(|(d, _)| *d).collect();
    for replica in 0..3 {
        assert!(
            missing_on(&cluster, replica, &uploaded).await.is_empty(),
            "replica {replica}: the cluster is one CAS"
        );
    }

    // Execute on B: B finds the Action, Command, tree and input (placed on it, or on A).
    let operations = execute(
        &mut cluster.exec(1).await,
        execute_request(action.action, false),
    )
    .await
    .unwrap();
    let response = finished(&operations);
    assert!(
        response.status.as_ref().is_none_or(|s| s.code == 0),
        "{response:?}"
    );
    assert!(!response.cached_result);
    let result = response.result.expect("a result");
    assert_eq!(result.exit_code, 0);
    let metadata = result.execution_metadata.clone().unwrap();
    assert_eq!(
        metadata.worker,
        cluster.node_id(1),
        "ExecutedActionMetadata.worker"
    );
    // In the order the stages happen.
    let stamps = [
        ("queued", metadata.queued_timestamp),
        ("worker_start", metadata.worker_start_timestamp),
        ("input_fetch_start", metadata.input_fetch_start_timestamp),
        (
            "input_fetch_completed",
            metadata.input_fetch_completed_timestamp,
        ),
        ("execution_start", metadata.execution_start_timestamp),
        (
            "execution_completed",
            metadata.execution_completed_timestamp,
        ),
        (
            "output_upload_start",
            metadata.output_upload_start_timestamp,
        ),
        (
            "output_upload_completed",
            metadata.output_upload_completed_timestamp,
        ),
        ("worker_completed", metadata.worker_completed_timestamp),
    ];
    let mut previous: Option<(&str, (i64, i32))> = None;
    for (name, stamp) in stamps {
        let stamp = stamp.unwrap_or_else(|| panic!("{name} timestamp missing"));
        assert!(stamp.seconds > 0, "{name} timestamp");
        let at = (stamp.seconds, stamp.nanos);
        if let Some((before, then)) = previous {
            assert!(then <= at, "{before} ({then:?}) after {name} ({at:?})");
        }
        previous = Some((name, at));
    }
    let worker = cluster.replicas[1].stats();
    assert_eq!(worker.executed, 1);
    // Outputs (file, tree, the tree's two files) placed on the two other replicas before
    // the response was sent.
    assert!(worker.blobs_replicated >= 2 * 4, "{worker:?}");

    // The output file, read from A and from C.
    let output = &result.output_files[0];
    assert_eq!(output.path, "out/result.txt");
    let output_digest = Digest::from_proto(
        output.digest.as_ref().unwrap(),
        "d",
        mesh_reapi::DigestFunction::Sha256,
    )
    .unwrap();
    for reader in [0, 2] {
        let (data, _) = read(&mut cluster.bytestream(reader).await, &output_digest)
            .await
            .unwrap();
        assert_eq!(data, b"FROM THE CLIENT");
        assert!(cluster.holds(reader, &output_digest), "placed on {reader}");
    }

    // The output directory: its Tree, read on C, names the files, which C can read too.
    let tree_digest = Digest::from_proto(
        result.output_directories[0].tree_digest.as_ref().unwrap(),
        "t",
        mesh_reapi::DigestFunction::Sha256,
    )
    .unwrap();
    let (tree_bytes, _) = read(&mut cluster.bytestream(2).await, &tree_digest)
        .await
        .unwrap();
    let tree = Tree::decode(tree_bytes.as_slice()).unwrap();
    let root = tree.root.clone().unwrap();
    assert_eq!(root.files[0].name, "top");
    assert_eq!(root.directories[0].name, "sub");
    let leaf = &tree.children[0].files[0];
    let leaf_digest = Digest::from_proto(
        leaf.digest.as_ref().unwrap(),
        "l",
        mesh_reapi::DigestFunction::Sha256,
    )
    .unwrap();
    let (leaf_data, _) = read(&mut cluster.bytestream(2).await, &leaf_digest)
        .await
        .unwrap();
    assert_eq!(leaf_data, b"leaf");

    // GetTree through A walks the directories stored by B.
    let root_digest = result.output_directories[0]
        .root_directory_digest
        .clone()
        .unwrap();
    let mut pages = cluster
        .cas(0)
        .await
        .get_tree(GetTreeRequest {
            root_digest: Some(root_digest),
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut directories: Vec<Directory> = Vec::new();
    let mut tokens = Vec::new();
    while let Some(page) = pages.message().await.unwrap() {
        directories.extend(page.directories);
        tokens.push(page.next_page_token);
    }
    assert_eq!(directories.len(), 2, "root and sub");
    assert_eq!(tokens, ["1", ""], "one directory per page");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarding_node_is_asked_first() {
    let cluster = Cluster::start(3, |_, _| {}).await;
    // Enough inputs that some have A as their first owner: a fetch that ignored the hint
    // would ask A for them.
    let mut action = produce().salt("forwarded");
    for i in 0..12 {
        action = action.input(&format!("in/extra{i}.txt"), format!("extra {i}").as_bytes());
    }
    let action = action.build();
    // The inputs are on C only (as if every other copy had been evicted).
    for (_, data) in &action.blobs {
        cluster.put_only_on(2, data).await;
    }
    // As the route layer will send it: forwarded by C, where the client uploaded.
    let mut request = tonic::Request::new(execute_request(action.action, false));
    request.metadata_mut().insert(
        mesh_route::FORWARDED_BY,
        AsciiMetadataValue::try_from(cluster.node_id(2)).unwrap(),
    );
    let operations = execute(&mut cluster.exec(1).await, request).await.unwrap();
    assert_eq!(finished(&operations).result.unwrap().exit_code, 0);
    let stats = cluster.replicas[1].stats();
    assert_eq!(stats.forwarded_in, 1);
    assert!(stats.blobs_fetched >= 5, "{stats:?}");
    // B asked C, which had everything, and nobody else.
    let asks = cluster.replicas[1].reapi().cluster().fetch_asks();
    let (a, c) = (
        cluster.replicas[0].node().node_id(),
        cluster.replicas[2].node().node_id(),
    );
    assert!(asks.get(c).is_some_and(|n| *n >= 1), "{asks:?}");
    assert_eq!(
        asks.get(a),
        None,
        "A was asked although C, the hint, had it all: {asks:?}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_is_a_cache_hit_whichever_replica_is_asked() {
    let cluster = Cluster::start(3, |_, _| {}).await;
    let action = produce().salt("repeat").build();
    upload(&cluster, 0, &action.blobs).await;
    let first = finished(
        &execute(
            &mut cluster.exec(1).await,
            execute_request(action.action, false),
        )
        .await
        .unwrap(),
    );
    assert!(!first.cached_result);

    // Asked again on B, and on C, which never saw the action: hits, no second execution.
    for replica in [1, 2] {
        let again = finished(
            &execute(
                &mut cluster.exec(replica).await,
                execute_request(action.action, false),
            )
            .await
            .unwrap(),
        );
        assert!(again.cached_result, "replica {replica}");
        assert_eq!(again.result, first.result);
    }
    // GetActionResult on A finds B's entry too, and A can read its outputs.
    let hit = cluster
        .ac(0)
        .await
        .get_action_result(GetActionResultRequest {
            action_digest: Some(action.action.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(Some(hit.clone()), first.result);
    let output = Digest::from_proto(
        hit.output_files[0].digest.as_ref().unwrap(),
        "o",
        mesh_reapi::DigestFunction::Sha256,
    )
    .unwrap();
    let (data, _) = read(&mut cluster.bytestream(0).await, &output)
        .await
        .unwrap();
    assert_eq!(data, b"FROM THE CLIENT");

    let executed: u64 = cluster.replicas.iter().map(|r| r.stats().executed).sum();
    assert_eq!(executed, 1, "one execution in the whole cluster");
    assert!(cluster.replicas[2].stats().cache_hits >= 1);
    assert_eq!(cluster.replicas[0].stats().cache_hits, 1);

    // skip_cache_lookup runs it again.
    let fresh = finished(
        &execute(
            &mut cluster.exec(2).await,
            execute_request(action.action, true),
        )
        .await
        .unwrap(),
    );
    assert!(!fresh.cached_result);
    assert_eq!(cluster.replicas[2].stats().executed, 1);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_execution_follows_the_owner_and_others_say_not_found() {
    let cluster = Cluster::start(2, |_, _| {}).await;
    let gate = Gate::new();
    let action = shell(&format!("{}; echo waited", gate.wait()))
        .salt("wait")
        .build();
    upload(&cluster, 1, &action.blobs).await;
    let mut client = cluster.exec(1).await;
    let mut stream = client
        .execute(execute_request(action.action, false))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(!first.done);
    let name = first.name.clone();
    assert!(
        name.starts_with(&format!("operations/{}:", cluster.node_id(1))),
        "{name}"
    );
    drop(stream);
    // The owner follows it to the end.
    let mut client = cluster.exec(1).await;
    let name_for_wait = name.clone();
    let waiting = tokio::spawn(async move { wait_execution(&mut client, &name_for_wait).await });
    gate.open();
    let followed = waiting.await.unwrap().unwrap();
    let response = finished(&followed);
    assert_eq!(response.result.unwrap().exit_code, 0);
    assert!(followed.iter().all(|op| op.name == name));
    // And still knows it once finished.
    let again = wait_execution(&mut cluster.exec(1).await, &name)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert!(again[0].done);
    // Through another replica: its route layer sends the call to the owner.
    let through = wait_execution(&mut cluster.exec(0).await, &name)
        .await
        .unwrap();
    assert_eq!(through.len(), 1);
    assert!(through[0].done && through[0].name == name);
    assert_eq!(cluster.replicas[0].stats().waits_relayed, 1);
    // A replica asked directly (as a peer, past its route layer) about an operation it does
    // not own says NOT_FOUND naming the owner.
    let mut request = tonic::Request::new(WaitExecutionRequest { name: name.clone() });
    request.metadata_mut().insert(
        mesh_route::FORWARDED_BY,
        cluster.node_id(1).parse().unwrap(),
    );
    let error = cluster
        .exec(0)
        .await
        .wait_execution(request)
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    assert!(
        error
            .message()
            .contains(&format!("owned by node {}", cluster.node_id(1))),
        "{}",
        error.message()
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn action_results_uploaded_by_clients_are_checked_and_shared() {
    let cluster = Cluster::start(2, |_, _| {}).await;
    let output = b"built locally".to_vec();
    let output_digest = Digest::of(&output);
    let action = Digest::of(b"an action run by the client");
    let result = ActionResult {
        output_files: vec![OutputFile {
            path: "out".into(),
            digest: Some(output_digest.to_proto()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let update = |result: ActionResult| UpdateActionResultRequest {
        action_digest: Some(action.to_proto()),
        action_result: Some(result),
        ..Default::default()
    };
    // The output was never uploaded: refused, naming it.
    let error = cluster
        .ac(0)
        .await
        .update_action_result(update(result.clone()))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert!(
        error.message().contains(&output_digest.to_string()),
        "{}",
        error.message()
    );
    upload(&cluster, 0, &[(output_digest, output)]).await;
    cluster
        .ac(0)
        .await
        .update_action_result(update(result.clone()))
        .await
        .unwrap();
    let hit = cluster
        .ac(1)
        .await
        .get_action_result(GetActionResultRequest {
            action_digest: Some(action.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hit, result);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_whose_outputs_are_gone_everywhere_is_a_miss() {
    // Tiny CASes: B's outputs are evicted by later uploads.
    let cluster = Cluster::start(2, |_, config| config.cas_max_bytes = 64 * 1024).await;
    let action = shell("head -c 20000 /dev/zero > big")
        .output_file("big")
        .build();
    upload(&cluster, 1, &action.blobs).await;
    let first = finished(
        &execute(
            &mut cluster.exec(1).await,
            execute_request(action.action, false),
        )
        .await
        .unwrap(),
    );
    assert_eq!(first.result.unwrap().exit_code, 0);
    // Push the output out of B's CAS.
    let filler: Vec<(Digest, Vec<u8>)> = (0..8u8)
        .map(|i| {
            let data = vec![i; 16 * 1024];
            (Digest::of(&data), data)
        })
        .collect();
    for blob in &filler {
        upload(&cluster, 1, std::slice::from_ref(blob)).await;
    }
    let lookup = cluster
        .ac(0)
        .await
        .get_action_result(GetActionResultRequest {
            action_digest: Some(action.action.to_proto()),
            ..Default::default()
        })
        .await;
    assert_eq!(
        lookup.unwrap_err().code(),
        Code::NotFound,
        "a hit nobody could download"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_reads_fetch_from_peers_and_report_each_blob() {
    let cluster = Cluster::start(2, |_, _| {}).await;
    let blobs: Vec<(Digest, Vec<u8>)> = (0..3u8)
        .map(|i| {
            let data = vec![i; 1000 + usize::from(i)];
            (Digest::of(&data), data)
        })
        .collect();
    for (_, data) in &blobs {
        cluster.put_only_on(0, data).await;
    }
    let absent = Digest::of(b"on no replica");
    let mut wanted: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();
    wanted.push(absent);
    let response = cluster
        .cas(1)
        .await
        .batch_read_blobs(BatchReadBlobsRequest {
            digests: wanted.iter().map(Digest::to_proto).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.responses.len(), 4);
    for ((digest, data), answer) in blobs.iter().zip(&response.responses) {
        assert_eq!(answer.status.as_ref().unwrap().code, 0, "{digest}");
        assert_eq!(&answer.data, data);
    }
    let last = &response.responses[3];
    assert_eq!(last.status.as_ref().unwrap().code, Code::NotFound as i32);
    assert_eq!(last.digest.as_ref().unwrap(), &absent.to_proto());
    let stats = cluster.replicas[1].stats();
    assert_eq!(
        stats.blobs_fetched, 3,
        "one batched fetch from A: {stats:?}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_from_peers_are_answered_from_local_stores_only() {
    let cluster = Cluster::start(3, |_, _| {}).await;
    let data = b"only on A".to_vec();
    let digest = cluster.put_only_on(0, &data).await;
    // A result only A holds, for an action A owns (so C's lookup, asked directly, asks A).
    let owner_a = cluster.replicas[0].reapi().cluster();
    let action = (0..)
        .map(|i: u32| Digest::of(format!("action {i}").as_bytes()))
        .find(|d| owner_a.owners(d).iter().any(|n| n.as_str() == "r0"))
        .unwrap();
    let result = ActionResult {
        output_files: vec![OutputFile {
            path: "only".into(),
            digest: Some(digest.to_proto()),
            ..Default::default()
        }],
        ..Default::default()
    };
    owner_a
        .local_action_cache()
        .put(action, &result)
        .await
        .unwrap();
    struct Built {
        action: Digest,
    }
    let action = Built { action };
    let from_b = || {
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert(
            mesh_route::FORWARDED_BY,
            AsciiMetadataValue::try_from(cluster.node_id(1)).unwrap(),
        );
        metadata
    };
    // C is asked on B's behalf: it answers from what it has, never asks A.
    let mut request = tonic::Request::new(ReadRequest {
        resource_name: format!("blobs/{digest}"),
        read_offset: 0,
        read_limit: 0,
    });
    *request.metadata_mut() = from_b();
    let error = cluster.bytestream(2).await.read(request).await.unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    // Asked which blobs are missing on B's behalf, C answers for its own store: missing.
    let mut request = tonic::Request::new(FindMissingBlobsRequest {
        blob_digests: vec![digest.to_proto()],
        ..Default::default()
    });
    *request.metadata_mut() = from_b();
    let missing = cluster
        .cas(2)
        .await
        .find_missing_blobs(request)
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests;
    assert_eq!(missing, [digest.to_proto()], "C answers from its own store");
    let mut request = tonic::Request::new(GetActionResultRequest {
        action_digest: Some(action.action.to_proto()),
        ..Default::default()
    });
    *request.metadata_mut() = from_b();
    let error = cluster
        .ac(2)
        .await
        .get_action_result(request)
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    let stats = cluster.replicas[2].stats();
    assert_eq!(
        (stats.blobs_fetched, stats.peer_cache_hits),
        (0, 0),
        "{stats:?}"
    );
    // Asked directly, C finds both on A.
    assert!(missing_on(&cluster, 2, &[digest]).await.is_empty());
    let (read_back, _) = read(&mut cluster.bytestream(2).await, &digest)
        .await
        .unwrap();
    assert_eq!(read_back, data);
    cluster
        .ac(2)
        .await
        .get_action_result(GetActionResultRequest {
            action_digest: Some(action.action.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_can_embed_a_node_started_elsewhere() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node = mesh::Node::builder()
        .node_id("embedded")
        .unwrap()
        .gossip_bind("127.0.0.1:0".parse().unwrap())
        .grpc_endpoint(format!("http://{}", listener.local_addr().unwrap()))
        .timing(mesh::Timing::local())
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = mesh_reapi::ReapiConfig::new(dir.path());
    config.max_concurrency = 3;
    let server = mesh_reapi::ReapiServer::start(node.clone(), config, listener)
        .await
        .unwrap();
    assert_eq!(
        node.load().max_concurrency(),
        3,
        "the replica's concurrency is gossiped"
    );
    assert_eq!(server.endpoint(), format!("grpc://{}", server.addr()));
    let mut client = mesh_reapi::proto::build::bazel::remote::execution::v2::execution_client::ExecutionClient::connect(
        format!("http://{}", server.addr()),
    )
    .await
    .unwrap();
    let built = shell("true").build();
    let error = execute(&mut client, execute_request(built.action, false))
        .await
        .unwrap_err();
    assert_eq!(
        error.code(),
        Code::FailedPrecondition,
        "served: the Action was never uploaded"
    );
    server.shutdown().await;
}

/// A peer that accepts connections and never answers (a hung process) costs each lookup at
/// most the configured call timeout: the replicas still find and read every blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_answers_costs_a_timeout_not_a_hang() {
    let timeout = std::time::Duration::from_millis(500);
    let cluster = Cluster::start(2, |_, config| config.peers.call_timeout = timeout).await;
    // The hung peer: a member whose gRPC port accepts TCP and then says nothing.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_addr = hung.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = hung.accept().await {
            open.push(socket);
        }
    });
    let liar = cluster.join_member("hung", hung_addr).await;
    let blobs: Vec<(Digest, Vec<u8>)> = (0..12)
        .map(|i| {
            let data = format!("blob {i} beside a hung peer").into_bytes();
            (Digest::of(&data), data)
        })
        .collect();
    // Some of these have the hung peer as an owner: each lookup there ends at the call
    // timeout. Without it the hung connection would hold the upload until HTTP/2's keepalive
    // gave up on it (15 s): allow ten timeouts, far more than the lookups need.
    tokio::time::timeout(timeout * 10, upload(&cluster, 0, &blobs))
        .await
        .expect("the upload waited on the hung peer past its call timeout");
    let digests: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();
    let missing = crate::support::bounded(
        "FindMissingBlobs through r1",
        missing_on(&cluster, 1, &digests),
    )
    .await;
    assert!(missing.is_empty(), "{missing:?}");
    for (digest, data) in &blobs {
        let (read_back, _) = crate::support::bounded(
            "a read through r1",
            read(&mut cluster.bytestream(1).await, digest),
        )
        .await
        .unwrap();
        assert_eq!(&read_back, data);
    }
    held.abort();
    liar.shutdown().await;
    cluster.shutdown().await;
}

/// A peer that answers with bytes that do not match what was asked: a fake replica that claims
/// to hold every blob and serves garbage.
mod liar {
    use mesh_proto::reapi::v1::{
        HasRequest, HasResponse,
        presence_server::{Presence, PresenceServer},
    };
    use mesh_reapi::proto::{
        build::bazel::remote::execution::v2::{
            BatchReadBlobsRequest, BatchReadBlobsResponse, BatchUpdateBlobsRequest,
            BatchUpdateBlobsResponse, FindMissingBlobsRequest, FindMissingBlobsResponse,
            GetChunkMappingRequest, GetChunkMappingResponse, GetTreeRequest, GetTreeResponse,
            RegisterChunkMappingRequest, RegisterChunkMappingResponse, SpliceBlobRequest,
            SpliceBlobResponse, SplitBlobRequest, SplitBlobResponse, batch_read_blobs_response,
            content_addressable_storage_server::{
                ContentAddressableStorage, ContentAddressableStorageServer,
            },
        },
        google::{
            bytestream::{
                QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse,
                WriteRequest, WriteResponse,
                byte_stream_server::{ByteStream, ByteStreamServer},
            },
            rpc,
        },
    };
    use tonic::{Request, Response, Status, Streaming};

    #[derive(Clone, Copy)]
    pub(super) struct Liar;

    impl Liar {
        pub(super) fn routes() -> tonic::service::Routes {
            tonic::service::Routes::new(ContentAddressableStorageServer::new(Liar))
                .add_service(PresenceServer::new(Liar))
                .add_service(ByteStreamServer::new(Liar))
        }
    }

    #[tonic::async_trait]
    impl ByteStream for Liar {
        type ReadStream = futures::stream::Iter<std::vec::IntoIter<Result<ReadResponse, Status>>>;

        /// Any blob "found": pieces of 1 MiB of the right total length and the wrong content.
        async fn read(
            &self,
            request: Request<ReadRequest>,
        ) -> Result<Response<Self::ReadStream>, Status> {
            let name = request.into_inner().resource_name;
            let size: usize = name
                .rsplit('/')
                .next()
                .and_then(|size| size.parse().ok())
                .ok_or_else(|| Status::invalid_argument("no size"))?;
            let pieces: Vec<_> = (0..size)
                .step_by(1 << 20)
                .map(|start| {
                    Ok(ReadResponse {
                        data: vec![b'!'; (size - start).min(1 << 20)],
                    })
                })
                .collect();
            Ok(Response::new(futures::stream::iter(pieces)))
        }

        async fn write(
            &self,
            _: Request<Streaming<WriteRequest>>,
        ) -> Result<Response<WriteResponse>, Status> {
            Err(Status::unimplemented("a liar stores nothing"))
        }

        async fn query_write_status(
            &self,
            _: Request<QueryWriteStatusRequest>,
        ) -> Result<Response<QueryWriteStatusResponse>, Status> {
            Err(Status::unimplemented("a liar stores nothing"))
        }
    }

    #[tonic::async_trait]
    impl Presence for Liar {
        async fn has(&self, request: Request<HasRequest>) -> Result<Response<HasResponse>, Status> {
            let count = request.get_ref().digests.len() / 40;
            Ok(Response::new(HasResponse {
                present: vec![0xff; count.div_ceil(8)],
            }))
        }
    }

    #[tonic::async_trait]
    impl ContentAddressableStorage for Liar {
        type GetTreeStream = futures::stream::Empty<Result<GetTreeResponse, Status>>;
        type GetChunkMappingStream =
            futures::stream::Empty<Result<GetChunkMappingResponse, Status>>;

        async fn split_blob(
            &self,
            _: Request<SplitBlobRequest>,
        ) -> Result<Response<SplitBlobResponse>, Status> {
            Err(Status::unimplemented("no splitting"))
        }

        async fn get_chunk_mapping(
            &self,
            _: Request<GetChunkMappingRequest>,
        ) -> Result<Response<Self::GetChunkMappingStream>, Status> {
            Err(Status::unimplemented("no splitting"))
        }

        async fn splice_blob(
            &self,
            _: Request<SpliceBlobRequest>,
        ) -> Result<Response<SpliceBlobResponse>, Status> {
            Err(Status::unimplemented("no splitting"))
        }

        async fn register_chunk_mapping(
            &self,
            _: Request<Streaming<RegisterChunkMappingRequest>>,
        ) -> Result<Response<RegisterChunkMappingResponse>, Status> {
            Err(Status::unimplemented("no splitting"))
        }

        async fn find_missing_blobs(
            &self,
            _: Request<FindMissingBlobsRequest>,
        ) -> Result<Response<FindMissingBlobsResponse>, Status> {
            Ok(Response::new(FindMissingBlobsResponse::default()))
        }

        async fn batch_update_blobs(
            &self,
            _: Request<BatchUpdateBlobsRequest>,
        ) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
            Err(Status::unimplemented("a liar stores nothing"))
        }

        async fn batch_read_blobs(
            &self,
            request: Request<BatchReadBlobsRequest>,
        ) -> Result<Response<BatchReadBlobsResponse>, Status> {
            // Every blob "found", each with bytes of the right length and the wrong content.
            let responses = request
                .into_inner()
                .digests
                .into_iter()
                .map(|digest| batch_read_blobs_response::Response {
                    data: vec![b'!'; usize::try_from(digest.size_bytes).unwrap_or(0)],
                    digest: Some(digest),
                    status: Some(rpc::Status::default()),
                    compressor: 0,
                })
                .collect();
            Ok(Response::new(BatchReadBlobsResponse { responses }))
        }

        async fn get_tree(
            &self,
            _: Request<GetTreeRequest>,
        ) -> Result<Response<Self::GetTreeStream>, Status> {
            Err(Status::unimplemented("a liar has no trees"))
        }
    }
}

/// A peer that serves bytes that do not match their digest is not believed: the replica
/// fetching from it (it is the hint: the call came through it) rejects them and fetches the
/// real blobs from the replica that holds them; the action sees the real inputs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_serving_bytes_that_do_not_match_their_digest_is_not_believed() {
    let cluster = Cluster::start(2, |_, _| {}).await;
    let liar = cluster.join_fake("liar", liar::Liar::routes()).await;
    let action = shell("cat in/source.txt > out/result.txt")
        .input("in/source.txt", b"the real input")
        .output_file("out/result.txt")
        .salt("liar")
        .build();
    // The real blobs are on r1 only.
    for (_, data) in &action.blobs {
        cluster.put_only_on(1, data).await;
    }
    // The call came through the liar: r0 asks it first.
    let mut request = tonic::Request::new(execute_request(action.action, false));
    request.metadata_mut().insert(
        mesh_route::FORWARDED_BY,
        AsciiMetadataValue::try_from("liar").unwrap(),
    );
    let operations = execute(&mut cluster.exec(0).await, request).await.unwrap();
    let result = finished(&operations).result.unwrap();
    assert_eq!(result.exit_code, 0, "{result:?}");
    let output = Digest::from_proto(
        result.output_files[0].digest.as_ref().unwrap(),
        "out",
        mesh_reapi::DigestFunction::Sha256,
    )
    .unwrap();
    let (data, _) = read(&mut cluster.bytestream(0).await, &output)
        .await
        .unwrap();
    assert_eq!(data, b"the real input", "the action saw the liar's bytes");
    let asks = cluster.replicas[0].reapi().cluster().fetch_asks();
    assert!(
        asks.keys().any(|node| node.as_str() == "liar"),
        "the liar was never asked, so the test shows nothing: {asks:?}"
    );
    liar.shutdown().await;
    cluster.shutdown().await;
}

/// A large blob read through a replica that lacks it is handed on while it is fetched: the
/// first piece reaches the client before the replica holds the whole blob, and when the read
/// ends the replica holds it, checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_blob_read_through_a_replica_that_lacks_it_streams_while_it_is_fetched() {
    let cluster = Cluster::start(2, |_, _| {}).await;
    let data: Vec<u8> = (0..16 * 1024 * 1024 + 3)
        .map(|i: u32| (i % 253) as u8)
        .collect();
    let digest = cluster.put_only_on(1, &data).await;
    let mut stream = cluster
        .bytestream(0)
        .await
        .read(ReadRequest {
            resource_name: format!("blobs/{digest}"),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut received = stream.message().await.unwrap().expect("a first piece").data;
    // The client has read one piece and flow control holds the rest: r0 cannot have
    // fetched and stored all 16 MiB.
    assert!(
        !cluster.holds(0, &digest),
        "r0 held the whole blob before it sent the first piece: it was not streamed"
    );
    while let Some(piece) = stream.message().await.unwrap() {
        received.extend_from_slice(&piece.data);
    }
    assert!(received == data, "the blob as written");
    assert!(cluster.holds(0, &digest), "r0 keeps the fetched copy");
    let asks = cluster.replicas[0].reapi().cluster().fetch_asks();
    assert!(asks.keys().any(|node| node.as_str() == "r1"), "{asks:?}");
    cluster.shutdown().await;
}

/// A peer that lies about a large blob while it is streamed to a client: the client's read
/// ends with `UNAVAILABLE` naming the peer (never with the wrong bytes as a whole blob),
/// nothing of that copy is kept, and the client's retry reads the real blob, fetched whole
/// and checked before anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_lying_about_a_streamed_blob_fails_that_read_only_and_the_retry_reads_the_real_one()
{
    let cluster = Cluster::start(2, |_, _| {}).await;
    let liar = cluster.join_fake("liar", liar::Liar::routes()).await;
    // A blob on r1 only, whose best owner after r0 is the liar: r0 asks the liar first.
    let r0 = cluster.replicas[0].reapi().cluster();
    let (data, digest) = blob_where(6 * 1024 * 1024, |digest| {
        r0.owners(digest)
            .iter()
            .find(|node| node.as_str() != "r0")
            .is_some_and(|node| node.as_str() == "liar")
    });
    assert_eq!(cluster.put_only_on(1, &data).await, digest);

    let error = read(&mut cluster.bytestream(0).await, &digest)
        .await
        .expect_err("the liar's bytes are not a blob");
    assert_eq!(error.code(), Code::Unavailable, "{error:?}");
    assert!(
        error.message().contains("liar") && error.message().contains("retry"),
        "{error:?}"
    );
    assert!(
        !cluster.holds(0, &digest),
        "nothing of the liar's copy is kept"
    );

    let (again, _) = read(&mut cluster.bytestream(0).await, &digest)
        .await
        .expect("the retry reads the real blob");
    assert!(again == data, "the real bytes");
    assert!(cluster.holds(0, &digest));
    liar.shutdown().await;
    cluster.shutdown().await;
}
