//! Bad input gets REAPI's error codes, with messages naming the value and the rule.

use mesh_reapi::{
    Digest, MAX_BATCH_TOTAL_SIZE,
    proto::{
        build::bazel::remote::execution::v2::{
            BatchReadBlobsRequest, BatchUpdateBlobsRequest, FindMissingBlobsRequest,
            GetCapabilitiesRequest, batch_update_blobs_request,
            capabilities_client::CapabilitiesClient, digest_function,
        },
        google::bytestream::{QueryWriteStatusRequest, ReadRequest},
    },
};
use prost::Message as _;
use tonic::Code;
use tonic_types::StatusExt as _;

use crate::support::{
    Cluster, execute, execute_request, finished, read, shell, upload, wait_execution, write,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_input_is_failed_precondition_naming_it() {
    let cluster = Cluster::start(2, |_, _| {}).await;
    let action = shell("cat input").input("input", b"never uploaded").build();
    let input = Digest::of(b"never uploaded");
    upload(&cluster, 0, &action.blobs_except(&[input])).await;
    let response = finished(
        &execute(
            &mut cluster.exec(1).await,
            execute_request(action.action, false),
        )
        .await
        .unwrap(),
    );
    let status = response.status.unwrap();
    assert_eq!(status.code, Code::FailedPrecondition as i32);
    assert_eq!(status.details.len(), 1);
    assert_eq!(
        status.details[0].type_url,
        "type.googleapis.com/google.rpc.PreconditionFailure"
    );
    let failure =
        tonic_types::pb::PreconditionFailure::decode(status.details[0].value.as_slice()).unwrap();
    assert_eq!(failure.violations.len(), 1);
    assert_eq!(failure.violations[0].r#type, "MISSING");
    assert_eq!(failure.violations[0].subject, format!("blobs/{input}"));
    assert!(
        status.message.contains(&input.to_string()),
        "{}",
        status.message
    );

    // A missing Action fails the call itself, the same way.
    let absent = Digest::of(b"no such action");
    let error = execute(&mut cluster.exec(1).await, execute_request(absent, false))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    let failure = error.get_details_precondition_failure().unwrap();
    assert_eq!(failure.violations[0].subject, format!("blobs/{absent}"));
    assert_eq!(failure.violations[0].r#type, "MISSING");

    // Once uploaded (Bazel's reaction), the same action runs.
    upload(&cluster, 0, &[(input, b"never uploaded".to_vec())]).await;
    let response = finished(
        &execute(
            &mut cluster.exec(1).await,
            execute_request(action.action, false),
        )
        .await
        .unwrap(),
    );
    assert_eq!(response.result.unwrap().exit_code, 0);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_malformed_operations() {
    let cluster = Cluster::start(1, |_, _| {}).await;
    let mut client = cluster.exec(0).await;
    let unknown = format!(
        "operations/{}:0190b6c4-6f1c-7cc0-9d5e-3f6b8a2e4d10",
        cluster.node_id(0)
    );
    let error = wait_execution(&mut client, &unknown).await.unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    assert!(error.message().contains(&unknown), "{}", error.message());
    let error = wait_execution(&mut client, "operations/not-an-operation")
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains("expected \"{node_id}:{uuid}\""),
        "{}",
        error.message()
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_digests_are_invalid_argument_naming_both() {
    let cluster = Cluster::start(1, |_, _| {}).await;
    let claimed = Digest::of(b"claimed");
    let sent = b"something else";
    let mut bytestream = cluster.bytestream(0).await;
    // Same size, other content.
    let same_size = Digest::new(*Digest::of(b"x").hash(), sent.len() as u64);
    let error = write(
        &mut bytestream,
        format!("uploads/u1/blobs/{same_size}"),
        sent,
        4,
    )
    .await
    .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains(&same_size.to_string()),
        "{}",
        error.message()
    );
    assert!(
        error.message().contains(&Digest::of(sent).to_string()),
        "{}",
        error.message()
    );
    // Too many bytes for the size.
    let error = write(
        &mut bytestream,
        format!("uploads/u2/blobs/{claimed}"),
        sent,
        4,
    )
    .await
    .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    // Nothing half-written entered the CAS.
    for digest in [claimed, same_size, Digest::of(sent)] {
        let status = bytestream
            .query_write_status(QueryWriteStatusRequest {
                resource_name: format!("uploads/q/blobs/{digest}"),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!status.complete, "{digest}");
    }
    // A complete upload is reported complete.
    let good_digest = Digest::of(b"good");
    write(
        &mut bytestream,
        format!("uploads/u3/blobs/{good_digest}"),
        b"good",
        4,
    )
    .await
    .unwrap();
    let status = bytestream
        .query_write_status(QueryWriteStatusRequest {
            resource_name: format!("uploads/u3/blobs/{good_digest}"),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(status.complete);
    assert_eq!(status.committed_size, 4);
    // In a batch, the wrong blob fails alone.
    let good = b"good".to_vec();
    let response = cluster
        .cas(0)
        .await
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: vec![
                batch_update_blobs_request::Request {
                    digest: Some(same_size.to_proto()),
                    data: sent.to_vec(),
                    compressor: 0,
                },
                batch_update_blobs_request::Request {
                    digest: Some(Digest::of(&good).to_proto()),
                    data: good.clone(),
                    compressor: 0,
                },
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<i32> = response
        .responses
        .iter()
        .map(|r| r.status.as_ref().unwrap().code)
        .collect();
    assert_eq!(codes, [Code::InvalidArgument as i32, 0]);
    let message = &response.responses[0].status.as_ref().unwrap().message;
    assert!(message.contains("digest mismatch"), "{message}");
    assert!(message.contains(&same_size.to_string()), "{message}");
    let (data, _) = read(&mut bytestream, &Digest::of(&good)).await.unwrap();
    assert_eq!(data, good);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_batches_are_invalid_argument_naming_the_limit() {
    let cluster = Cluster::start(1, |_, _| {}).await;
    let half = vec![7u8; (MAX_BATCH_TOTAL_SIZE / 2 + 1) as usize];
    let other = vec![8u8; half.len()];
    let error = cluster
        .cas(0)
        .await
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: [&half, &other]
                .iter()
                .map(|data| batch_update_blobs_request::Request {
                    digest: Some(Digest::of(data).to_proto()),
                    data: data.to_vec(),
                    compressor: 0,
                })
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains(&MAX_BATCH_TOTAL_SIZE.to_string()),
        "{}",
        error.message()
    );
    let error = cluster
        .cas(0)
        .await
        .batch_read_blobs(BatchReadBlobsRequest {
            digests: vec![Digest::of(&half).to_proto(), Digest::of(&other).to_proto()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains("max_batch_total_size_bytes"),
        "{}",
        error.message()
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_resource_names_and_digests_are_invalid_argument() {
    let cluster = Cluster::start(1, |_, _| {}).await;
    let mut bytestream = cluster.bytestream(0).await;
    let hello = Digest::of(b"hello");
    for name in [
        "blobs/xyz/5".to_owned(),
        format!("blobs/{}", hello.hex()),
        format!("compressed-blobs/deflate/{hello}"),
        format!("blobs/{}/-5", hello.hex()),
    ] {
        let error = bytestream
            .read(ReadRequest {
                resource_name: name.clone(),
                read_offset: 0,
                read_limit: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{name}");
        assert!(error.message().contains(&name), "{}", error.message());
        assert!(error.message().contains("expected"), "{}", error.message());
    }
    let error = write(&mut bytestream, format!("blobs/{hello}"), b"hello", 5)
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains("uploads/{uuid}/"),
        "{}",
        error.message()
    );
    // Out of range and negative offsets.
    upload(&cluster, 0, &[(hello, b"hello".to_vec())]).await;
    let error = bytestream
        .read(ReadRequest {
            resource_name: format!("blobs/{hello}"),
            read_offset: 6,
            read_limit: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::OutOfRange);
    let error = bytestream
        .read(ReadRequest {
            resource_name: format!("blobs/{hello}"),
            read_offset: -1,
            read_limit: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(
        error.code(),
        Code::OutOfRange,
        "bytestream.proto: negative is OUT_OF_RANGE"
    );
    assert!(
        error.message().contains("read_offset -1"),
        "{}",
        error.message()
    );
    // A missing blob is NOT_FOUND.
    let error = read(&mut bytestream, &Digest::of(b"absent"))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    // Digests in requests.
    let mut cas = cluster.cas(0).await;
    let error = cas
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: vec![
                mesh_reapi::proto::build::bazel::remote::execution::v2::Digest {
                    hash: "ABC".into(),
                    size_bytes: 3,
                },
            ],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().contains("\"ABC/3\""), "{}", error.message());
    assert!(
        error.message().contains("64 lowercase hexadecimal"),
        "{}",
        error.message()
    );
    let error = cas
        .find_missing_blobs(FindMissingBlobsRequest {
            digest_function: digest_function::Value::Md5 as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains(
            "\"MD5\": this digest function is not supported: this server offers SHA256 and BLAKE3"
        ),
        "{}",
        error.message()
    );
    // An "Action" too large to be one is refused before anything is read.
    let huge = Digest::new(*hello.hash(), 1 << 40);
    let error = execute(&mut cluster.exec(0).await, execute_request(huge, false))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains("Action message"),
        "{}",
        error.message()
    );
    let mut request = execute_request(hello, false);
    request.action_digest.as_mut().unwrap().size_bytes = -1;
    let error = execute(&mut cluster.exec(0).await, request)
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains("action_digest"),
        "{}",
        error.message()
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_are_what_bazel_needs() {
    let cluster = Cluster::start(1, |_, _| {}).await;
    let capabilities = CapabilitiesClient::new(cluster.channel(0).await)
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let low = capabilities.low_api_version.unwrap();
    let high = capabilities.high_api_version.unwrap();
    assert!((low.major, low.minor) <= (2, 0) && (2, 0) <= (high.major, high.minor));
    let execution = capabilities.execution_capabilities.unwrap();
    assert!(execution.exec_enabled);
    assert_eq!(
        execution.digest_function,
        digest_function::Value::Sha256 as i32
    );
    let cache = capabilities.cache_capabilities.unwrap();
    assert!(
        cache
            .digest_functions
            .contains(&(digest_function::Value::Sha256 as i32))
    );
    assert_eq!(
        cache.max_batch_total_size_bytes,
        MAX_BATCH_TOTAL_SIZE as i64
    );
    assert_eq!(cache.max_cas_blob_size_bytes, 256 << 20);
    cluster.shutdown().await;
}
