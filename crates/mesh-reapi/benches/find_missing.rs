//! `FindMissingBlobs` across a cluster whose blobs each have `R` = 2 owners (rendezvous
//! hashing over the live membership, see `mesh_reapi::cluster`).
//!
//! Per cluster size N (3, 10 and 30 by default), in one process on 127.0.0.1:
//!
//! 1. N replicas `r0`…`r{N-1}` (mesh nodes with `Timing::local()`, joined through `r0`, each
//!    with its own data directory), until every replica sees every other with its gRPC
//!    endpoint;
//! 2. 10,000 distinct 100-byte blobs uploaded with `BatchUpdateBlobs`, 500 per call, the calls
//!    spread over all replicas, so every blob is placed on its owners;
//! 3. a tonic client asks replica `r1` (not the seed) about 10,000 digests: 5,000 of the
//!    uploaded blobs and 5,000 that were never uploaded, interleaved — a build asks about its
//!    inputs, and many of them are new. Every answer is checked: the missing list must be
//!    exactly the 5,000 absent digests, or the bench exits non-zero. First 10 calls right after
//!    the cluster formed ("formed": the placements of its joins are still asked, see
//!    `mesh_reapi::placement::FORMER_RING_GRACE`); then, once every replica's handoff is done
//!    and that grace has passed, 5 warm-up calls and 50 timed ones, sequential: p50, p90, p99.
//!
//! Where `r1`'s own time goes is printed below the table: the owners of the 10,000 digests
//! computed from `r1`'s membership (`ClusterCas::owners`), `r1`'s CAS lookup, and
//! `ClusterCas::find_missing_in_cluster` called in process (no client connection).
//!
//! ```text
//! cargo bench -p tonic-mesh-reapi --bench find_missing [-- --replicas 3,10,30] [--iterations 50]
//!     [--warmups 5] [--blobs 10000]
//! ```
//!
//! `FIND_MISSING_REPLICAS=3,10` works as `--replicas`.

use std::{collections::HashSet, process::ExitCode, time::Duration};

use futures::StreamExt as _;
use mesh::Timing;
use mesh_reapi::{
    Digest, ReapiConfig, ReapiServer,
    proto::build::bazel::remote::execution::v2::{
        BatchUpdateBlobsRequest, FindMissingBlobsRequest, batch_update_blobs_request,
        content_addressable_storage_client::ContentAddressableStorageClient,
    },
};
use tokio::time::Instant;
use tonic::{metadata::MetadataMap, transport::Channel};

/// Bytes per blob.
const BLOB_SIZE: usize = 100;
/// Blobs per `BatchUpdateBlobs` call.
const UPLOAD_BATCH: usize = 500;
/// Upload calls in flight at once.
const UPLOADS_IN_FLIGHT: usize = 4;
/// Upper bound for the cluster to form; not an expectation.
const FORM_BOUND: Duration = Duration::from_secs(60);

struct Options {
    replicas: Vec<usize>,
    iterations: usize,
    warmups: usize,
    blobs: usize,
}

impl Options {
    fn parse() -> Result<Self, String> {
        let args: Vec<String> = std::env::args().collect();
        let value = |name: &str| {
            args.iter()
                .position(|a| a == name)
                .and_then(|i| args.get(i + 1))
                .cloned()
        };
        let number = |name: &str, default: usize| -> Result<usize, String> {
            value(name).map_or(Ok(default), |v| {
                v.parse().map_err(|_| format!("{name}: not a number: {v}"))
            })
        };
        let replicas = value("--replicas")
            .or_else(|| std::env::var("FIND_MISSING_REPLICAS").ok())
            .unwrap_or_else(|| "3,10,30".to_owned());
        let replicas = replicas
            .split(',')
            .map(|n| match n.trim().parse::<usize>() {
                Ok(n) if n >= 2 => Ok(n),
                _ => Err(format!(
                    "--replicas: {n:?} is not a cluster size of at least 2"
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let options = Self {
            replicas,
            iterations: number("--iterations", 50)?,
            warmups: number("--warmups", 5)?,
            blobs: number("--blobs", 10_000)?,
        };
        if options.iterations == 0 || options.blobs < 2 {
            return Err("--iterations must be at least 1 and --blobs at least 2".to_owned());
        }
        Ok(options)
    }
}

/// A distinct blob of [`BLOB_SIZE`] bytes.
fn blob(kind: &str, i: usize) -> Vec<u8> {
    let mut data = format!("find-missing bench {kind} blob {i} ").into_bytes();
    data.resize(BLOB_SIZE, b'.');
    data
}

/// `n` replicas `r0`…, joined through `r0`, each seeing every other with its endpoint.
async fn start(n: usize) -> Result<(Vec<ReapiServer>, Vec<tempfile::TempDir>), String> {
    let mut replicas: Vec<ReapiServer> = Vec::with_capacity(n);
    let mut dirs = Vec::with_capacity(n);
    for i in 0..n {
        let dir = tempfile::tempdir().map_err(|e| format!("data directory: {e}"))?;
        // As the integration tests configure their replicas.
        let mut config = ReapiConfig::new(dir.path());
        config.max_concurrency = 4;
        config.cas_max_bytes = 256 << 20;
        config.replication.handoff_delay = Duration::from_millis(100);
        let mut builder = mesh::Node::builder()
            .node_id(format!("r{i}"))
            .map_err(|e| e.to_string())?
            .gossip_bind("127.0.0.1:0".parse().expect("an address"))
            .timing(Timing::local());
        if let Some(first) = replicas.first() {
            builder = builder.seeds([first.node().gossip_addr()]);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("listener: {e}"))?;
        let replica = ReapiServer::start(builder, config, listener)
            .await
            .map_err(|e| format!("replica r{i}: {e}"))?;
        replicas.push(replica);
        dirs.push(dir);
    }
    for replica in &replicas {
        tokio::time::timeout(
            FORM_BOUND,
            replica.node().membership().wait_until(|view| {
                view.len() == n
                    && view
                        .peers()
                        .iter()
                        .all(|p| p.state().is_some_and(|s| s.grpc_endpoint.is_some()))
            }),
        )
        .await
        .map_err(|_| {
            format!(
                "{} did not see all {n} replicas within {FORM_BOUND:?}",
                replica.node().node_id()
            )
        })?;
    }
    Ok((replicas, dirs))
}

async fn client(replica: &ReapiServer) -> Result<ContentAddressableStorageClient<Channel>, String> {
    let channel = Channel::from_shared(format!("http://{}", replica.addr()))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connecting to {}: {e}", replica.node().node_id()))?;
    Ok(ContentAddressableStorageClient::new(channel)
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20))
}

/// Uploads `blobs` in batches of [`UPLOAD_BATCH`], batch `k` through replica `k % N`.
async fn upload(replicas: &[ReapiServer], blobs: &[(Digest, Vec<u8>)]) -> Result<(), String> {
    let mut clients = Vec::with_capacity(replicas.len());
    for replica in replicas {
        clients.push(client(replica).await?);
    }
    let results: Vec<Result<(), String>> =
        futures::stream::iter(blobs.chunks(UPLOAD_BATCH).enumerate())
            .map(|(k, batch)| {
                let mut client = clients[k % clients.len()].clone();
                async move {
                    let response = client
                        .batch_update_blobs(BatchUpdateBlobsRequest {
                            instance_name: String::new(),
                            requests: batch
                                .iter()
                                .map(|(digest, data)| batch_update_blobs_request::Request {
                                    digest: Some(digest.to_proto()),
                                    data: data.clone(),
                                    compressor: 0,
                                })
                                .collect(),
                            digest_function: 0,
                        })
                        .await
                        .map_err(|e| format!("BatchUpdateBlobs: {e}"))?
                        .into_inner();
                    for blob in response.responses {
                        let status = blob.status.unwrap_or_default();
                        if status.code != 0 {
                            return Err(format!("an upload failed: {}", status.message));
                        }
                    }
                    Ok(())
                }
            })
            .buffer_unordered(UPLOADS_IN_FLIGHT)
            .collect()
            .await;
    results.into_iter().collect()
}

async fn find_missing(
    client: &mut ContentAddressableStorageClient<Channel>,
    request: &FindMissingBlobsRequest,
) -> Result<Vec<Digest>, String> {
    let response = client
        .find_missing_blobs(request.clone())
        .await
        .map_err(|e| format!("FindMissingBlobs: {e}"))?
        .into_inner();
    response
        .missing_blob_digests
        .iter()
        .map(|d| {
            Digest::from_proto(
                d,
                "missing_blob_digests",
                mesh_reapi::DigestFunction::Sha256,
            )
            .map_err(|e| e.to_string())
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

/// One row of the table, and the in-process breakdown.
struct Row {
    n: usize,
    form: Duration,
    upload: Duration,
    first: Duration,
    p50: Duration,
    p90: Duration,
    p99: Duration,
    owners: Duration,
    local: Duration,
    in_process: Duration,
}

async fn run(n: usize, options: &Options) -> Result<Row, String> {
    let started = Instant::now();
    let (replicas, dirs) = start(n).await?;
    let form = started.elapsed();

    let uploaded: Vec<(Digest, Vec<u8>)> = (0..options.blobs)
        .map(|i| {
            let data = blob("uploaded", i);
            (Digest::of(&data), data)
        })
        .collect();
    let started = Instant::now();
    upload(&replicas, &uploaded).await?;
    let upload_time = started.elapsed();

    // Half present, half never uploaded, interleaved.
    let half = options.blobs / 2;
    let absent: Vec<Digest> = (0..options.blobs - half)
        .map(|i| Digest::of(&blob("absent", i)))
        .collect();
    let mut asked = Vec::with_capacity(options.blobs);
    for i in 0..absent.len() {
        if i < half {
            asked.push(uploaded[i].0);
        }
        asked.push(absent[i]);
    }
    let request = FindMissingBlobsRequest {
        instance_name: String::new(),
        blob_digests: asked.iter().map(Digest::to_proto).collect(),
        digest_function: 0,
    };

    let entry = &replicas[1];
    let mut client = client(entry).await?;
    let expected: HashSet<Digest> = absent.iter().copied().collect();

    // Right after the cluster formed (29 joins): the former placements are still asked.
    let mut fresh = Vec::new();
    for _ in 0..options.iterations.div_ceil(5) {
        let started = Instant::now();
        let missing = find_missing(&mut client, &request).await?;
        fresh.push(started.elapsed());
        let got: HashSet<Digest> = missing.iter().copied().collect();
        if got != expected || missing.len() != expected.len() {
            let reported_present = got.difference(&expected).count();
            let not_reported = expected.difference(&got).count();
            return Err(format!(
                "N={n}: FindMissingBlobs through r1 listed {} digests ({} distinct); \
                 {reported_present} of them were uploaded, and {not_reported} of the {} absent \
                 ones were not listed",
                missing.len(),
                got.len(),
                expected.len(),
            ));
        }
    }
    fresh.sort();
    let first = percentile(&fresh, 0.5);

    // Settled: every replica handed off, and the former placements are no longer asked.
    while replicas
        .iter()
        .any(|r| r.reapi().cluster().handoff_pending())
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(mesh_reapi::placement::FORMER_RING_GRACE + Duration::from_millis(500)).await;

    for _ in 0..options.warmups {
        find_missing(&mut client, &request).await?;
    }
    let mut times = Vec::with_capacity(options.iterations);
    for _ in 0..options.iterations {
        let started = Instant::now();
        let missing = find_missing(&mut client, &request).await?;
        times.push(started.elapsed());
        if missing.len() != expected.len() {
            return Err(format!(
                "N={n}: a later FindMissingBlobs listed {} digests, not {}",
                missing.len(),
                expected.len()
            ));
        }
    }
    times.sort();

    // Where r1's own time goes, measured in process.
    let cluster = entry.reapi().cluster();
    let started = Instant::now();
    let owned: usize = asked.iter().map(|d| cluster.owners(d).len()).sum();
    let owners = started.elapsed();
    std::hint::black_box(owned);
    let started = Instant::now();
    let local_missing = cluster.local().find_missing(&asked);
    let local = started.elapsed();
    std::hint::black_box(local_missing);
    let fetch = mesh_reapi::Fetch::answering(&MetadataMap::new());
    let mut in_process = Vec::new();
    for _ in 0..options.iterations.min(10) {
        let started = Instant::now();
        let missing = cluster.find_missing_in_cluster(&asked, &fetch).await;
        in_process.push(started.elapsed());
        if missing.len() != expected.len() {
            return Err(format!(
                "N={n}: find_missing_in_cluster listed {} digests, not {}",
                missing.len(),
                expected.len()
            ));
        }
    }
    in_process.sort();

    futures::future::join_all(replicas.into_iter().map(ReapiServer::shutdown)).await;
    drop(dirs);
    Ok(Row {
        n,
        form,
        upload: upload_time,
        first,
        p50: percentile(&times, 0.5),
        p90: percentile(&times, 0.9),
        p99: percentile(&times, 0.99),
        owners,
        local,
        in_process: percentile(&in_process, 0.5),
    })
}

fn main() -> ExitCode {
    let options = match Options::parse() {
        Ok(options) => options,
        Err(error) => {
            eprintln!("find_missing: {error}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let result: Result<(Vec<Row>, Duration), String> = runtime.block_on(async {
        let started = Instant::now();
        let mut rows = Vec::new();
        for &n in &options.replicas {
            rows.push(run(n, &options).await?);
        }
        Ok((rows, started.elapsed()))
    });
    let (rows, total) = match result {
        Ok(done) => done,
        Err(error) => {
            eprintln!("find_missing: FAILED: {error}");
            return ExitCode::FAILURE;
        }
    };
    let half = options.blobs / 2;
    println!(
        "FindMissingBlobs of {} digests through r1: {half} present (of {} uploaded, {BLOB_SIZE} \
         bytes each, R = 2) + {} absent; {} sequential calls after {} warm-ups; one process \
         on 127.0.0.1, {} CPUs",
        options.blobs,
        options.blobs,
        options.blobs - half,
        options.iterations,
        options.warmups,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    println!(
        "{:>3} {:>8} {:>9} {:>11} {:>9} {:>9} {:>9}",
        "N", "form s", "upload s", "formed ms", "p50 ms", "p90 ms", "p99 ms"
    );
    for row in &rows {
        println!(
            "{:>3} {:>8.2} {:>9.2} {:>11} {:>9} {:>9} {:>9}",
            row.n,
            row.form.as_secs_f64(),
            row.upload.as_secs_f64(),
            ms(row.first),
            ms(row.p50),
            ms(row.p90),
            ms(row.p99),
        );
    }
    println!(
        "formed: p50 of the calls made right after the cluster formed, while the placements of \
         its joins are still asked; p50/p90/p99: once it settled (handoff done, {} s later)",
        mesh_reapi::placement::FORMER_RING_GRACE.as_secs()
    );
    println!("\nin r1, for the same digests (ms):");
    println!(
        "{:>3} {:>14} {:>11} {:>26}",
        "N", "owners (all)", "local CAS", "find_missing_in_cluster p50"
    );
    for row in &rows {
        println!(
            "{:>3} {:>14} {:>11} {:>26}",
            row.n,
            ms(row.owners),
            ms(row.local),
            ms(row.in_process),
        );
    }
    println!(
        "\ncorrect: every call listed exactly the {} absent digests; total {:.1} s",
        options.blobs - half,
        total.as_secs_f64()
    );
    ExitCode::SUCCESS
}
