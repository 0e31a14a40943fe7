//! The CAS's bound, and large blobs through ByteStream.

use mesh_reapi::{
    Digest, proto::build::bazel::remote::execution::v2::FindMissingBlobsRequest,
    proto::google::bytestream::ReadRequest,
};

use crate::support::{Cluster, read, write};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cas_evicts_least_recently_used_blobs_to_stay_within_its_bound() {
    let bound = 64 * 1024;
    let cluster = Cluster::start(1, |_, config| config.cas_max_bytes = bound).await;
    let mut bytestream = cluster.bytestream(0).await;
    let mut digests = Vec::new();
    for i in 0..10u8 {
        let data = vec![i; 16 * 1024];
        let digest = Digest::of(&data);
        let committed = write(
            &mut bytestream,
            format!("uploads/{i}/blobs/{digest}"),
            &data,
            4096,
        )
        .await
        .unwrap();
        assert_eq!(committed, data.len() as i64);
        digests.push(digest);
        // Keep the first blob in use: it must survive.
        let _ = read(&mut bytestream, &digests[0]).await.unwrap();
    }
    let usage = cluster.replicas[0].reapi().cluster().local().usage();
    assert!(usage.bytes <= bound, "{usage:?}");
    assert!(usage.evictions >= 6, "{usage:?}");
    let missing: Vec<Digest> = cluster
        .cas(0)
        .await
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: digests.iter().map(Digest::to_proto).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests
        .iter()
        .map(|d| Digest::from_proto(d, "d").unwrap())
        .collect();
    assert!(!missing.contains(&digests[0]), "recently used");
    assert!(!missing.contains(&digests[9]), "just written");
    assert!(missing.contains(&digests[1]), "least recently used");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_blobs_are_read_in_chunks_below_the_message_limit_on_every_replica() {
    let cluster = Cluster::start(2, |_, _| {}).await;
    let data: Vec<u8> = (0..5 * 1024 * 1024 + 123)
        .map(|i: u32| (i % 251) as u8)
        .collect();
    let digest = Digest::of(&data);
    let mut bytestream = cluster.bytestream(0).await;
    let committed = write(
        &mut bytestream,
        format!("main/uploads/x/blobs/{digest}"),
        &data,
        64 * 1024,
    )
    .await
    .unwrap();
    assert_eq!(committed, data.len() as i64);
    // A repeat upload ends at once with the full size.
    let committed = write(
        &mut bytestream,
        format!("uploads/y/blobs/{digest}"),
        &data,
        64 * 1024,
    )
    .await
    .unwrap();
    assert_eq!(committed, data.len() as i64);
    for replica in [0, 1] {
        let (read_back, largest) = read(&mut cluster.bytestream(replica).await, &digest)
            .await
            .unwrap();
        assert!(read_back == data, "replica {replica} returned other bytes");
        assert!(largest <= 1024 * 1024, "a chunk of {largest} bytes");
    }
    // Placed on B by A's streamed push (ByteStream.Write in chunks) before the write was
    // answered: B never had to fetch it.
    let placed = cluster.replicas[0].stats();
    assert_eq!(
        (placed.blobs_replicated, placed.bytes_replicated),
        (1, data.len() as u64),
        "{placed:?}"
    );
    assert_eq!(cluster.replicas[1].stats().blobs_fetched, 0);
    // Offsets and limits.
    let mut stream = bytestream
        .read(ReadRequest {
            resource_name: format!("blobs/{digest}"),
            read_offset: 3 * 1024 * 1024,
            read_limit: 1500 * 1024,
        })
        .await
        .unwrap()
        .into_inner();
    let mut part = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        part.extend_from_slice(&chunk.data);
    }
    assert_eq!(part.len(), 1500 * 1024);
    assert!(part == data[3 * 1024 * 1024..3 * 1024 * 1024 + 1500 * 1024]);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_of_a_missing_blob_fetch_it_once() {
    let cluster = Cluster::start(2, |_, _| {}).await;
    let data: Vec<u8> = (0..8 * 1024 * 1024).map(|i: u32| (i % 253) as u8).collect();
    // On A only, as if B's copy had been evicted.
    let digest = cluster.put_only_on(0, &data).await;
    let mut readers = Vec::new();
    for _ in 0..4 {
        let mut client = cluster.bytestream(1).await;
        readers.push(tokio::spawn(
            async move { read(&mut client, &digest).await },
        ));
    }
    for reader in readers {
        let (read_back, _) = reader.await.unwrap().unwrap();
        assert!(read_back == data);
    }
    assert_eq!(cluster.replicas[1].stats().blobs_fetched, 1);
    cluster.shutdown().await;
}
