//! zstd on the wire: `compressed-blobs/zstd/…` ByteStream reads and writes and the batch
//! calls' compressors, with the digest always of the uncompressed bytes and checked.

use mesh_reapi::{
    Digest,
    proto::build::bazel::remote::execution::v2::{
        BatchReadBlobsRequest, BatchUpdateBlobsRequest, GetCapabilitiesRequest,
        batch_update_blobs_request, capabilities_client::CapabilitiesClient, compressor,
    },
    proto::google::bytestream::ReadRequest,
};
use tonic::Code;

use crate::support::{Cluster, missing_on, read, write};

/// Build-output-like bytes that compress well but not trivially: text lines with numbers.
fn compressible(len: usize) -> Vec<u8> {
    let mut data = Vec::with_capacity(len + 64);
    let mut i = 0u64;
    while data.len() < len {
        data.extend_from_slice(
            format!(
                "obj/{:x}.o: symbol_{} at 0x{:08x}\n",
                i % 977,
                i,
                i * 2654435761 % (1 << 32)
            )
            .as_bytes(),
        );
        i += 1;
    }
    data.truncate(len);
    data
}

/// Reads `compressed-blobs/zstd/{digest}` whole: the bytes received and what they inflate to.
async fn read_compressed(cluster: &Cluster, i: usize, digest: &Digest) -> (usize, Vec<u8>) {
    let mut stream = cluster
        .bytestream(i)
        .await
        .read(ReadRequest {
            resource_name: format!("compressed-blobs/zstd/{digest}"),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut wire = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        assert!(
            chunk.data.len() <= 4 << 20,
            "a message over the 4 MiB limit"
        );
        wire.extend_from_slice(&chunk.data);
    }
    let data = zstd::stream::decode_all(wire.as_slice()).unwrap();
    (wire.len(), data)
}

/// A 50 MiB blob written compressed through one replica is stored as its uncompressed digest,
/// read back compressed through the other (fetched from its owner), and travels in less than
/// half its size both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mib_blob_round_trips_compressed_in_under_half_its_bytes() {
    let cluster = Cluster::start(2, |_, _| {}).await;
    let data = compressible(50 << 20);
    let digest = Digest::of(&data);
    let wire = zstd::bulk::compress(&data, 3).unwrap();
    assert!(
        wire.len() * 2 < data.len(),
        "{} bytes compressed",
        wire.len()
    );
    let committed = write(
        &mut cluster.bytestream(0).await,
        format!("uploads/1/compressed-blobs/zstd/{digest}"),
        &wire,
        1 << 20,
    )
    .await
    .unwrap();
    assert_eq!(
        committed,
        wire.len() as i64,
        "committed: the compressed bytes received"
    );
    assert!(missing_on(&cluster, 1, &[digest]).await.is_empty());

    let (received, back) = read_compressed(&cluster, 1, &digest).await;
    assert!(
        received * 2 < data.len(),
        "{received} bytes read compressed"
    );
    assert!(back == data, "the compressed read inflates to the blob");
    let (plain, _) = read(&mut cluster.bytestream(0).await, &digest)
        .await
        .unwrap();
    assert!(plain == data, "stored uncompressed, as its digest names");

    // Written again, compressed: already there, committed -1 as REAPI says.
    let again = write(
        &mut cluster.bytestream(1).await,
        format!("uploads/2/compressed-blobs/zstd/{digest}"),
        &wire,
        1 << 20,
    )
    .await
    .unwrap();
    assert_eq!(again, -1);
    cluster.shutdown().await;
}

/// Compressed uploads that lie are refused and store nothing: bytes that inflate to another
/// blob, past the size (a bomb), short of it, or that are not zstd; compressed reads with a
/// limit and compressors the server does not offer are refused naming the rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_uploads_that_lie_are_refused_and_store_nothing() {
    let cluster = Cluster::start(1, |_, _| {}).await;
    let mut bytestream = cluster.bytestream(0).await;
    let data = compressible(300_000);
    let digest = Digest::of(&data);
    let other = compressible(300_001)[1..].to_vec();
    let bomb = vec![0u8; 64 << 20];
    let cases: [(&str, Vec<u8>, &str); 4] = [
        (
            "another blob",
            zstd::bulk::compress(&other, 3).unwrap(),
            "digest mismatch",
        ),
        (
            "a bomb",
            zstd::bulk::compress(&bomb, 3).unwrap(),
            "inflates past the 300000 bytes its digest names",
        ),
        (
            "too short",
            zstd::bulk::compress(&data[..1000], 3).unwrap(),
            "inflates to 1000 bytes, but its digest names 300000",
        ),
        ("not zstd", b"plain text".to_vec(), "not valid zstd"),
    ];
    for (what, wire, rule) in cases {
        let error = write(
            &mut bytestream,
            format!("uploads/x/compressed-blobs/zstd/{digest}"),
            &wire,
            64 * 1024,
        )
        .await
        .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{what}: {error:?}");
        assert!(
            error.message().contains(rule),
            "{what}: {}",
            error.message()
        );
        assert_eq!(
            missing_on(&cluster, 0, &[digest]).await,
            vec![digest],
            "{what}"
        );
    }

    let error = bytestream
        .read(ReadRequest {
            resource_name: format!("compressed-blobs/zstd/{}", Digest::EMPTY),
            read_offset: 0,
            read_limit: 10,
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains("read_limit 10 must be 0"),
        "{}",
        error.message()
    );
    let error = bytestream
        .read(ReadRequest {
            resource_name: format!("compressed-blobs/brotli/{digest}"),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .unwrap_err();
    assert!(
        error
            .message()
            .contains("\"brotli\" is not supported: this server offers zstd only"),
        "{}",
        error.message()
    );
    cluster.shutdown().await;
}

/// Batch uploads with the zstd compressor are inflated and checked; batch reads that accept
/// zstd get it; Capabilities offers it for both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_carry_zstd_both_ways_and_capabilities_offer_it() {
    let cluster = Cluster::start(2, |_, _| {}).await;
    let blobs: Vec<Vec<u8>> = (0..4).map(|i| compressible(20_000 + i)).collect();
    let digests: Vec<Digest> = blobs.iter().map(|b| Digest::of(b)).collect();
    let mut requests: Vec<batch_update_blobs_request::Request> = blobs
        .iter()
        .zip(&digests)
        .map(|(data, digest)| batch_update_blobs_request::Request {
            digest: Some(digest.to_proto()),
            data: zstd::bulk::compress(data, 3).unwrap(),
            compressor: compressor::Value::Zstd as i32,
        })
        .collect();
    // One that lies: it inflates to the first blob but names the second's digest.
    requests.push(batch_update_blobs_request::Request {
        digest: Some(Digest::of(b"something else").to_proto()),
        data: zstd::bulk::compress(&blobs[0], 3).unwrap(),
        compressor: compressor::Value::Zstd as i32,
    });
    let responses = cluster
        .cas(0)
        .await
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .responses;
    let codes: Vec<i32> = responses
        .iter()
        .map(|r| r.status.clone().unwrap().code)
        .collect();
    assert_eq!(
        codes,
        [0, 0, 0, 0, Code::InvalidArgument as i32],
        "{responses:?}"
    );

    let read = cluster
        .cas(1)
        .await
        .batch_read_blobs(BatchReadBlobsRequest {
            digests: digests.iter().map(Digest::to_proto).collect(),
            acceptable_compressors: vec![compressor::Value::Zstd as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for (response, data) in read.responses.iter().zip(&blobs) {
        assert_eq!(response.compressor, compressor::Value::Zstd as i32);
        assert!(response.data.len() * 2 < data.len());
        assert_eq!(
            &zstd::stream::decode_all(response.data.as_slice()).unwrap(),
            data
        );
    }

    let capabilities = CapabilitiesClient::connect(cluster.url(0))
        .await
        .unwrap()
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .cache_capabilities
        .unwrap();
    let zstd = compressor::Value::Zstd as i32;
    assert_eq!(capabilities.supported_compressors, [zstd]);
    assert_eq!(capabilities.supported_batch_update_compressors, [zstd]);
    cluster.shutdown().await;
}
