//! The CAS's bound, large blobs through ByteStream, and blobs tampered with on disk.

use std::{fs, os::unix::fs::PermissionsExt as _};

use mesh_reapi::{
    Digest, proto::build::bazel::remote::execution::v2::BatchReadBlobsRequest,
    proto::google::bytestream::ReadRequest,
};
use tonic::{Code, metadata::MetadataMap};

use crate::support::{Cluster, missing_on, read, upload, write};

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
    let missing = missing_on(&cluster, 0, &digests).await;
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

/// Overwrites replica `position`'s file of `digest` with as many other bytes, as a process of
/// the server's user could (making the read-only file writable first).
fn tamper(cluster: &Cluster, position: usize, digest: &Digest) {
    let path = cluster.replicas[position]
        .reapi()
        .cluster()
        .local()
        .path_of(digest);
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o444, "blob files are stored read-only");
    let mut bytes = fs::read(&path).unwrap();
    for byte in &mut bytes {
        *byte = byte.wrapping_add(1);
    }
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&path, &bytes).unwrap();
}

/// What replica `position`'s own file of `digest` holds now.
fn stored(cluster: &Cluster, position: usize, digest: &Digest) -> Vec<u8> {
    fs::read(
        cluster.replicas[position]
            .reapi()
            .cluster()
            .local()
            .path_of(digest),
    )
    .unwrap()
}

fn corrupt_dropped(cluster: &Cluster, position: usize) -> u64 {
    cluster.replicas[position].stats().corrupt_blobs_dropped
}

fn bytes(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(seed) % 251) as u8)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytestream_never_serves_a_tampered_blob_and_fetches_a_good_copy() {
    let cluster = Cluster::start(2, |_, _| {}).await;
    // Blobs put on one replica only stay there (no handoff pass after this).
    cluster.handoff_settled().await;
    let mut bytestream = cluster.bytestream(0).await;

    // One piece, on both replicas: replica 0 finds its copy corrupt before sending anything,
    // drops it and serves the copy it fetches from replica 1.
    let small = bytes(100_000, 7);
    let digest = Digest::of(&small);
    upload(&cluster, 0, &[(digest, small.clone())]).await;
    assert!(cluster.holds(0, &digest) && cluster.holds(1, &digest));
    tamper(&cluster, 0, &digest);
    let (read_back, _) = read(&mut bytestream, &digest).await.unwrap();
    assert!(read_back == small, "replica 0 served the tampered bytes");
    assert_eq!(corrupt_dropped(&cluster, 0), 1);
    assert!(cluster.holds(0, &digest), "fetched again");
    assert!(stored(&cluster, 0, &digest) == small, "and stored again");
    assert_eq!(cluster.replicas[0].stats().blobs_fetched, 1);

    // Several pieces: the stream ends with NOT_FOUND instead of its last piece, and the
    // next read gets the good copy.
    let large = bytes(3 * 1024 * 1024 + 5, 11);
    let digest = Digest::of(&large);
    write(
        &mut bytestream,
        format!("uploads/l/blobs/{digest}"),
        &large,
        1 << 20,
    )
    .await
    .unwrap();
    assert!(cluster.holds(1, &digest));
    tamper(&cluster, 0, &digest);
    match read(&mut bytestream, &digest).await {
        Err(status) => assert_eq!(status.code(), Code::NotFound, "{status}"),
        Ok((read_back, _)) => assert!(read_back == large, "a complete stream of other bytes"),
    }
    assert_eq!(corrupt_dropped(&cluster, 0), 2);
    let (read_back, _) = read(&mut bytestream, &digest).await.unwrap();
    assert!(read_back == large);

    // No good copy anywhere: NOT_FOUND, through the replica that had it and through its peer.
    for (position, reader) in [(0, 0), (0, 1)] {
        let lonely = cluster
            .put_only_on(position, &bytes(50_000, 13 + reader as u32))
            .await;
        tamper(&cluster, position, &lonely);
        let status = read(&mut cluster.bytestream(reader).await, &lonely)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status}");
        assert!(!cluster.holds(0, &lonely) && !cluster.holds(1, &lonely));
    }
    assert_eq!(corrupt_dropped(&cluster, 0), 4);
    assert_eq!(corrupt_dropped(&cluster, 1), 0);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_read_blobs_never_serves_a_tampered_blob() {
    let cluster = Cluster::start(2, |_, _| {}).await;
    // Blobs put on one replica only stay there (no handoff pass after this).
    cluster.handoff_settled().await;
    let replicated = bytes(20_000, 17);
    let digest = Digest::of(&replicated);
    upload(&cluster, 0, &[(digest, replicated.clone())]).await;
    assert!(cluster.holds(1, &digest));
    let lonely = cluster.put_only_on(0, &bytes(20_000, 19)).await;
    let intact = cluster.put_only_on(0, &bytes(20_000, 23)).await;
    tamper(&cluster, 0, &digest);
    tamper(&cluster, 0, &lonely);
    let responses = cluster
        .cas(0)
        .await
        .batch_read_blobs(BatchReadBlobsRequest {
            digests: [digest, lonely, intact]
                .iter()
                .map(Digest::to_proto)
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .responses;
    let code = |i: usize| responses[i].status.as_ref().map_or(0, |s| s.code);
    // The tampered copy is dropped and the good one on replica 1 served instead.
    assert_eq!(code(0), Code::Ok as i32, "{:?}", responses[0].status);
    assert!(
        responses[0].data == replicated,
        "replica 0 served the tampered bytes"
    );
    assert!(stored(&cluster, 0, &digest) == replicated);
    // No good copy anywhere: NOT_FOUND, no bytes.
    assert_eq!(code(1), Code::NotFound as i32, "{:?}", responses[1].status);
    assert!(responses[1].data.is_empty());
    assert!(!cluster.holds(0, &lonely));
    assert_eq!(code(2), Code::Ok as i32);
    assert!(responses[2].data == bytes(20_000, 23));
    assert_eq!(corrupt_dropped(&cluster, 0), 2);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_blob_is_not_pushed_to_peers() {
    let cluster = Cluster::start(2, |_, _| {}).await;
    // Blobs put on one replica only stay there (no handoff pass after this).
    cluster.handoff_settled().await;
    // Small blobs go in a batch, large ones (over 1 MiB) are streamed.
    let blobs = [
        bytes(10_000, 29),
        bytes(10_000, 31),
        bytes(2 * 1024 * 1024 + 7, 37),
        bytes(2 * 1024 * 1024 + 7, 41),
    ];
    let mut digests = Vec::new();
    for data in &blobs {
        digests.push(cluster.put_only_on(0, data).await);
    }
    let [good_small, bad_small, good_large, bad_large] = digests[..] else {
        unreachable!()
    };
    tamper(&cluster, 0, &bad_small);
    tamper(&cluster, 0, &bad_large);
    cluster.replicas[0]
        .reapi()
        .cluster()
        .replicate(&digests, &MetadataMap::new())
        .await;
    // The push goes on past the tampered blobs: the intact ones are placed and counted.
    let placed = cluster.replicas[0].stats();
    assert_eq!(
        (placed.blobs_replicated, placed.bytes_replicated),
        (2, good_small.size() + good_large.size()),
        "{placed:?}"
    );
    for digest in [good_small, good_large] {
        assert!(cluster.holds(1, &digest), "the intact blobs are placed");
    }
    for digest in [bad_small, bad_large] {
        assert!(
            !cluster.holds(1, &digest),
            "a tampered blob reached the peer"
        );
        assert!(
            !cluster.holds(0, &digest),
            "and it is dropped where it was found"
        );
    }
    assert_eq!(corrupt_dropped(&cluster, 0), 2);
    cluster.shutdown().await;
}
