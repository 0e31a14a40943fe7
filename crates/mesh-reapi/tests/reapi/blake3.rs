//! BLAKE3 digests (`digest_function = BLAKE3`, Bazel's `--digest_function=blake3`): an action
//! whose every digest is BLAKE3 runs end to end through two replicas, its outputs come back
//! with BLAKE3 digests, and a BLAKE3 blob is never the SHA-256 blob with the same hash.

use mesh_reapi::{
    Digest, DigestFunction,
    proto::build::bazel::remote::execution::v2::{
        Action, BatchUpdateBlobsRequest, Command, Directory, FileNode, FindMissingBlobsRequest,
        GetActionResultRequest, GetCapabilitiesRequest, batch_update_blobs_request,
        capabilities_client::CapabilitiesClient, command::EnvironmentVariable,
    },
    proto::google::bytestream::ReadRequest,
};
use prost::Message as _;
use tonic::Code;

use crate::support::{Cluster, execute, execute_request, finished};

const BLAKE3: DigestFunction = DigestFunction::Blake3;

fn blake3(data: &[u8]) -> Digest {
    Digest::of_with(BLAKE3, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blake3_action_runs_end_to_end_and_its_outputs_are_blake3() {
    let cluster = Cluster::start(2, |_, _| {}).await;
    let input = b"hashed with blake3\n".to_vec();
    let root = Directory {
        files: vec![FileNode {
            name: "in.txt".into(),
            digest: Some(blake3(&input).to_proto()),
            is_executable: false,
            node_properties: None,
        }],
        ..Default::default()
    }
    .encode_to_vec();
    #[allow(deprecated)]
    let command = Command {
        arguments: vec![
            "/bin/sh".into(),
            "-c".into(),
            "tr a-z A-Z < in.txt > out.txt && echo done".into(),
        ],
        environment_variables: vec![EnvironmentVariable {
            name: "PATH".into(),
            value: "/bin:/usr/bin".into(),
        }],
        output_files: vec!["out.txt".into()],
        ..Default::default()
    }
    .encode_to_vec();
    let action = Action {
        command_digest: Some(blake3(&command).to_proto()),
        input_root_digest: Some(blake3(&root).to_proto()),
        ..Default::default()
    }
    .encode_to_vec();
    let action_digest = blake3(&action);
    let blobs = [input.clone(), root, command, action];

    // Uploaded through r0 as BLAKE3; a digest that lies about its function is refused.
    let upload = |blobs: Vec<(Digest, Vec<u8>)>| BatchUpdateBlobsRequest {
        requests: blobs
            .into_iter()
            .map(|(digest, data)| batch_update_blobs_request::Request {
                digest: Some(digest.to_proto()),
                data,
                compressor: 0,
            })
            .collect(),
        digest_function: BLAKE3.to_proto(),
        ..Default::default()
    };
    let mut cas = cluster.cas(0).await;
    let responses = cas
        .batch_update_blobs(upload(
            blobs.iter().map(|b| (blake3(b), b.clone())).collect(),
        ))
        .await
        .unwrap()
        .into_inner()
        .responses;
    assert!(
        responses
            .iter()
            .all(|r| r.status.as_ref().unwrap().code == 0)
    );
    let lie = cas
        .batch_update_blobs(upload(vec![(Digest::of(b"sha"), b"sha".to_vec())]))
        .await
        .unwrap()
        .into_inner()
        .responses;
    assert_eq!(
        lie[0].status.as_ref().unwrap().code,
        Code::InvalidArgument as i32,
        "a SHA-256 hash uploaded as BLAKE3 must not verify"
    );

    // Executed through r1: it fetches the BLAKE3 inputs from r0.
    let mut request = execute_request(action_digest, false);
    request.digest_function = BLAKE3.to_proto();
    let response = finished(&execute(&mut cluster.exec(1).await, request).await.unwrap());
    let result = response.result.unwrap();
    assert_eq!(result.exit_code, 0, "{:?}", response.status);
    let output = result.output_files[0].digest.clone().unwrap();
    assert_eq!(
        Digest::from_proto(&output, "out", BLAKE3).unwrap(),
        blake3(b"HASHED WITH BLAKE3\n"),
        "the output's digest is its BLAKE3"
    );
    assert_eq!(result.stdout_digest, Some(blake3(b"done\n").to_proto()));

    // The output, read through r0 by its BLAKE3 resource name.
    let mut stream = cluster
        .bytestream(0)
        .await
        .read(ReadRequest {
            resource_name: format!("blobs/blake3/{}/{}", output.hash, output.size_bytes),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut read = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        read.extend_from_slice(&chunk.data);
    }
    assert_eq!(read, b"HASHED WITH BLAKE3\n");

    // Cached as BLAKE3; the same hash asked as SHA-256 names another action and other blobs.
    let lookup = |function: DigestFunction| GetActionResultRequest {
        action_digest: Some(action_digest.to_proto()),
        digest_function: function.to_proto(),
        ..Default::default()
    };
    let mut ac = cluster.ac(0).await;
    assert_eq!(
        ac.get_action_result(lookup(BLAKE3))
            .await
            .unwrap()
            .into_inner(),
        result
    );
    assert_eq!(
        ac.get_action_result(lookup(DigestFunction::Sha256))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let asked: Vec<_> = blobs.iter().map(|b| blake3(b).to_proto()).collect();
    let missing = |function: DigestFunction| FindMissingBlobsRequest {
        blob_digests: asked.clone(),
        digest_function: function.to_proto(),
        ..Default::default()
    };
    let mut cas = cluster.cas(1).await;
    let none = cas
        .find_missing_blobs(missing(BLAKE3))
        .await
        .unwrap()
        .into_inner();
    assert!(none.missing_blob_digests.is_empty());
    let all = cas
        .find_missing_blobs(missing(DigestFunction::Sha256))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.missing_blob_digests.len(), blobs.len());

    let capabilities = CapabilitiesClient::connect(cluster.url(0))
        .await
        .unwrap()
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let offered = [DigestFunction::Sha256.to_proto(), BLAKE3.to_proto()];
    assert_eq!(
        capabilities.cache_capabilities.unwrap().digest_functions,
        offered
    );
    assert_eq!(
        capabilities
            .execution_capabilities
            .unwrap()
            .digest_functions,
        offered
    );
    cluster.shutdown().await;
}
