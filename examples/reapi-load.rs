//! Drives a running REAPI cluster and reports what its data path sustains, each figure beside
//! the limit the same machine sets for it, measured in the same run:
//!
//! | phase | what it does | its limit |
//! |---|---|---|
//! | `write` | one large blob streamed with `ByteStream.Write` to `--target` | SHA-256 of the bytes plus a file write, in this process |
//! | `read` | the same blob read back from `--target` (it holds it) | the same |
//! | `peer-read` | the same blob read through each `--peer`: a fetch from a peer where that replica lacks it (handed on while it is fetched) | the same |
//! | `batch` | `--small-blobs` small blobs uploaded with `BatchUpdateBlobs` | — |
//! | `find-missing` | `FindMissingBlobs` of those plus as many absent ones, 10,000 digests a call | — |
//! | `execute` | `--actions` no-op actions (`true`, each with a unique digest, so no cache hit), `--concurrency` in flight | spawning `true` in a loop, in this process |
//!
//! Each limit is measured twice, before its phases and after them, and the faster measure is
//! the one a result is divided by (the slower is printed beside it): on a shared host a slow
//! moment during one measure would otherwise flatter the ratio. Reads also report when their
//! first piece arrived. `execute` also reports where an action's time went, by the timestamps
//! of its result's `ExecutedActionMetadata`: outside its replica's queue and worker (held by
//! the route layer, routed and forwarded before; its result placed and the answer on its way
//! back after), queued for a slot, and in the worker. Every read is checked against its
//! digest, and every action must exit 0: any error stops the run with a message naming it and
//! a non-zero exit. Progress goes to stderr every second.
//!
//! ```text
//! # a cluster to drive (four replicas in one process; it prints their endpoints)
//! cargo run --release --example reapi-cluster -- --sandbox off --nodes 4
//! cargo run --release --example reapi-load -- --target http://127.0.0.1:P0 \
//!     --peer http://127.0.0.1:P1 --peer http://127.0.0.1:P2 --peer http://127.0.0.1:P3
//! ```
//!
//! A written blob is held by the replica it was written to and by its two owners (`R` = 2),
//! so among three replicas every one holds it and `peer-read` reads a local copy. With four,
//! one replica lacks each new blob, and which one changes with the blob (a new one each run):
//! name all three others as `--peer`, and the `peer-read` whose first piece comes last is the
//! real fetch.

use std::{
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use clap::Parser;
use mesh_reapi::{
    Digest,
    proto::{
        build::bazel::remote::execution::v2::{
            Action, BatchUpdateBlobsRequest, Command, ExecuteRequest, FindMissingBlobsRequest,
            batch_update_blobs_request, command::EnvironmentVariable,
            content_addressable_storage_client::ContentAddressableStorageClient,
            execution_client::ExecutionClient,
        },
        google::{
            bytestream::{ReadRequest, WriteRequest, byte_stream_client::ByteStreamClient},
            longrunning::operation,
        },
    },
};
use prost::Message as _;
use rand::{RngExt as _, SeedableRng as _, rngs::StdRng};
use tokio::{sync::Semaphore, task::JoinSet, time::Instant};
use tonic::transport::{Channel, Endpoint};

#[derive(Parser, Debug)]
#[command(
    about = "Drive a running REAPI cluster: blob throughput, batches, FindMissingBlobs and \
                   Execute rate, each beside its limit on this machine"
)]
struct Args {
    /// The replica to drive.
    #[arg(long)]
    target: String,
    /// Another replica of the same cluster, to read the large blob through (a fetch from a
    /// peer where it lacks the blob: among three replicas every one holds it). Repeat it to
    /// read through each of several.
    #[arg(long)]
    peer: Vec<String>,
    /// Size of the large blob, in MiB.
    #[arg(long, default_value_t = 200, value_parser = at_least_one::<u64>)]
    blob_mib: u64,
    /// Number of small blobs (1 KiB each) for the batch and FindMissingBlobs phases.
    #[arg(long, default_value_t = 10_000, value_parser = at_least_one::<usize>)]
    small_blobs: usize,
    /// Number of no-op actions to execute.
    #[arg(long, default_value_t = 300, value_parser = at_least_one::<usize>)]
    actions: usize,
    /// Actions in flight at once.
    #[arg(long, default_value_t = 32, value_parser = at_least_one::<usize>)]
    concurrency: usize,
    /// Phases to run, comma-separated (default: all).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "write,read,peer-read,batch,find-missing,execute"
    )]
    phases: Vec<String>,
}

/// A count or size that must be at least 1 (clap names the flag and the value it refuses).
fn at_least_one<T: std::str::FromStr + PartialOrd + From<u8>>(value: &str) -> Result<T, String> {
    match value.parse::<T>() {
        Ok(n) if n >= T::from(1) => Ok(n),
        Ok(_) => Err("it must be at least 1".to_owned()),
        Err(_) => Err("it must be a whole number, at least 1".to_owned()),
    }
}

/// Bytes per `ByteStream.Write` message.
const CHUNK: usize = 1 << 20;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("reapi-load: {error}");
            ExitCode::FAILURE
        }
    }
}

type Error = Box<dyn std::error::Error>;

async fn connect(url: &str) -> Result<Channel, Error> {
    Ok(Endpoint::from_shared(url.to_owned())
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("connecting to {url}: {e}"))?)
}

async fn run(args: &Args) -> Result<(), Error> {
    let known = [
        "write",
        "read",
        "peer-read",
        "batch",
        "find-missing",
        "execute",
    ];
    if let Some(phase) = args.phases.iter().find(|p| !known.contains(&p.as_str())) {
        return Err(format!(
            "unknown phase {phase:?}: the phases are {}",
            known.join(", ")
        )
        .into());
    }
    let wants = |phase: &str| args.phases.iter().any(|p| p == phase);
    let target = connect(&args.target).await?;
    println!(
        "{:<14} {:>14} {:>16}  limit on this machine",
        "phase", "result", "rate"
    );

    let size = args.blob_mib << 20;
    let mut rng = StdRng::seed_from_u64(u64::from(std::process::id()));
    let blob: Vec<u8> = (0..size).map(|_| rng.random()).collect();
    let digest = Digest::of(&blob);
    if wants("write") || wants("read") || wants("peer-read") {
        // The limit is measured before the phases and again after them; the faster of the
        // two is the one reported (and the ratio is taken against it), so a moment the host
        // was slow cannot flatter a result.
        let before = hash_and_write_limit(&blob)?;
        let mut rows: Vec<(&str, Duration, String)> = Vec::new();
        if wants("write") {
            let took = write_blob(target.clone(), digest, &blob).await?;
            rows.push(("write", took, String::new()));
        }
        if wants("read") {
            let (took, first) = read_blob(target.clone(), digest).await?;
            rows.push((
                "read",
                took,
                format!("; first piece after {} ms", first.as_millis()),
            ));
        }
        if wants("peer-read") {
            if args.peer.is_empty() {
                println!("{:<14} skipped: no --peer", "peer-read");
            }
            for peer in &args.peer {
                let (took, first) = read_blob(connect(peer).await?, digest).await?;
                rows.push((
                    "peer-read",
                    took,
                    format!(
                        "; first piece after {} ms; through {peer}",
                        first.as_millis()
                    ),
                ));
            }
        }
        let after = hash_and_write_limit(&blob)?;
        let (best, worst) = (before.min(after), before.max(after));
        let limit = mib_per_s(size, best);
        for (phase, took, extra) in rows {
            let rate = mib_per_s(size, took);
            report(
                phase,
                &human_mib(size),
                rate,
                "MiB/s",
                &format!(
                    "{:.2} of SHA-256 + file write {limit:.0} MiB/s (slower measure {:.0}){extra}",
                    rate / limit,
                    mib_per_s(size, worst),
                ),
            );
        }
    }
    drop(blob);

    let small: Vec<Vec<u8>> = (0..args.small_blobs)
        .map(|i| {
            let mut data = vec![0u8; 1024];
            data[..8].copy_from_slice(&(i as u64).to_le_bytes());
            data[8..16].copy_from_slice(&rng.random::<u64>().to_le_bytes());
            data
        })
        .collect();
    let small_digests: Vec<Digest> = small.iter().map(|d| Digest::of(d)).collect();
    if wants("batch") {
        let started = Instant::now();
        upload(target.clone(), &small_digests, &small).await?;
        let took = started.elapsed();
        report(
            "batch",
            &format!("{} blobs", small.len()),
            small.len() as f64 / took.as_secs_f64(),
            "blobs/s",
            "",
        );
    }
    if wants("find-missing") {
        find_missing(target.clone(), &small_digests, wants("batch")).await?;
    }
    if wants("execute") {
        execute(target.clone(), args.actions, args.concurrency).await?;
    }
    Ok(())
}

fn report(phase: &str, result: &str, rate: f64, unit: &str, limit: &str) {
    println!("{phase:<14} {result:>14} {:>10.0} {unit:<6}  {limit}", rate);
}

fn mib_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / (1u64 << 20) as f64 / took.as_secs_f64()
}

fn human_mib(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}

/// What this machine does with the same bytes in one process: SHA-256 them and write them to a
/// file (in the temporary directory), as a replica must for a blob it stores. Like a replica,
/// it does not wait for the disk (no `fsync`: a replica's blob is safe once its owners hold
/// it, not once a disk does), so the limit is not the disk's speed.
fn hash_and_write_limit(blob: &[u8]) -> Result<Duration, Error> {
    use std::io::Write as _;
    let file = tempfile::NamedTempFile::new()?;
    let started = Instant::now();
    let mut hasher = mesh_reapi::Hasher::new();
    let mut out = std::io::BufWriter::with_capacity(CHUNK, file.as_file());
    for chunk in blob.chunks(CHUNK) {
        hasher.update(chunk);
        out.write_all(chunk)?;
    }
    out.flush()?;
    drop(out);
    let _ = hasher.finish();
    Ok(started.elapsed())
}

async fn write_blob(channel: Channel, digest: Digest, blob: &[u8]) -> Result<Duration, Error> {
    let name = format!("uploads/{}/blobs/{digest}", uuid::Uuid::now_v7());
    let started = Instant::now();
    let progress = Progress::start("write", blob.len() as u64, "bytes");
    let counter = progress.counter();
    let messages: Vec<WriteRequest> = blob
        .chunks(CHUNK)
        .enumerate()
        .map(|(i, chunk)| WriteRequest {
            resource_name: if i == 0 { name.clone() } else { String::new() },
            write_offset: (i * CHUNK) as i64,
            finish_write: (i + 1) * CHUNK >= blob.len(),
            data: chunk.to_vec(),
        })
        .collect();
    let stream = futures::StreamExt::map(futures::stream::iter(messages), move |m| {
        counter.fetch_add(m.data.len() as u64, Ordering::Relaxed);
        m
    });
    let committed = ByteStreamClient::new(channel)
        .write(stream)
        .await
        .map_err(|e| format!("ByteStream.Write of {digest}: {e}"))?
        .into_inner()
        .committed_size;
    progress.stop();
    if committed != blob.len() as i64 {
        return Err(format!("ByteStream.Write of {digest}: committed {committed} bytes").into());
    }
    Ok(started.elapsed())
}

/// Reads the blob whole and checks its digest; returns how long that took and how long the
/// first piece took to arrive.
async fn read_blob(channel: Channel, digest: Digest) -> Result<(Duration, Duration), Error> {
    let started = Instant::now();
    let progress = Progress::start("read", digest.size(), "bytes");
    let counter = progress.counter();
    let mut stream = ByteStreamClient::new(channel)
        .max_decoding_message_size(8 << 20)
        .read(ReadRequest {
            resource_name: format!("blobs/{digest}"),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .map_err(|e| format!("ByteStream.Read of {digest}: {e}"))?
        .into_inner();
    let mut hasher = mesh_reapi::Hasher::new();
    let mut first = None;
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|e| format!("ByteStream.Read of {digest}: {e}"))?
    {
        first.get_or_insert_with(|| started.elapsed());
        hasher.update(&chunk.data);
        counter.fetch_add(chunk.data.len() as u64, Ordering::Relaxed);
    }
    progress.stop();
    let took = started.elapsed();
    let read = hasher.finish();
    if read != digest {
        return Err(format!("ByteStream.Read of {digest} returned {read}").into());
    }
    Ok((took, first.unwrap_or(took)))
}

/// Uploads blobs in batches of at most 2 MiB.
async fn upload(channel: Channel, digests: &[Digest], blobs: &[Vec<u8>]) -> Result<(), Error> {
    let mut client = ContentAddressableStorageClient::new(channel);
    let mut batch = Vec::new();
    let mut bytes = 0;
    for (i, (digest, data)) in digests.iter().zip(blobs).enumerate() {
        batch.push(batch_update_blobs_request::Request {
            digest: Some(digest.to_proto()),
            data: data.clone(),
            compressor: 0,
        });
        bytes += data.len();
        if bytes >= 2 << 20 || i + 1 == blobs.len() {
            let responses = client
                .batch_update_blobs(BatchUpdateBlobsRequest {
                    requests: std::mem::take(&mut batch),
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("BatchUpdateBlobs: {e}"))?
                .into_inner()
                .responses;
            if let Some(failed) = responses
                .iter()
                .find(|r| r.status.as_ref().is_some_and(|s| s.code != 0))
            {
                return Err(format!("BatchUpdateBlobs refused a blob: {failed:?}").into());
            }
            bytes = 0;
        }
    }
    Ok(())
}

/// `FindMissingBlobs` of the small blobs (present if `uploaded`) interleaved with as many
/// absent ones, 10,000 digests a call; every answer is checked.
async fn find_missing(channel: Channel, present: &[Digest], uploaded: bool) -> Result<(), Error> {
    let mut client = ContentAddressableStorageClient::new(channel);
    let absent: Vec<Digest> = (0..present.len())
        .map(|i| Digest::of(format!("absent {i} {}", std::process::id()).as_bytes()))
        .collect();
    let absent_set: std::collections::HashSet<Digest> = absent.iter().copied().collect();
    let asked: Vec<Digest> = present
        .iter()
        .zip(&absent)
        .flat_map(|(p, a)| [*p, *a])
        .collect();
    let mut times = Vec::new();
    for chunk in asked.chunks(10_000) {
        let started = Instant::now();
        let missing = client
            .find_missing_blobs(FindMissingBlobsRequest {
                blob_digests: chunk.iter().map(Digest::to_proto).collect(),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("FindMissingBlobs: {e}"))?
            .into_inner()
            .missing_blob_digests;
        times.push(started.elapsed());
        let expected = chunk
            .iter()
            .filter(|d| !uploaded || absent_set.contains(d))
            .count();
        if missing.len() != expected {
            return Err(format!(
                "FindMissingBlobs listed {} of {} digests missing, expected {expected}",
                missing.len(),
                chunk.len()
            )
            .into());
        }
    }
    times.sort();
    let total: Duration = times.iter().sum();
    report(
        "find-missing",
        &format!("{} digests", asked.len()),
        asked.len() as f64 / total.as_secs_f64(),
        "dig/s",
        &format!(
            "p50 {} µs, p99 {} µs a call",
            percentile(&times, 0.5).as_micros(),
            percentile(&times, 0.99).as_micros()
        ),
    );
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted
        .get(((sorted.len().max(1) - 1) as f64 * p).round() as usize)
        .copied()
        .unwrap_or_default()
}

/// `actions` no-op actions, each with a unique digest (a unique argument to `true`), with
/// `concurrency` in flight; every one must exit 0.
async fn execute(channel: Channel, actions: usize, concurrency: usize) -> Result<(), Error> {
    let run = uuid::Uuid::now_v7();
    let mut digests = Vec::with_capacity(actions);
    let mut blobs = Vec::with_capacity(actions * 2);
    let mut blob_digests = Vec::with_capacity(actions * 2);
    for i in 0..actions {
        #[allow(deprecated)]
        let command = Command {
            arguments: vec!["/bin/true".into(), format!("{run}-{i}")],
            environment_variables: vec![EnvironmentVariable {
                name: "PATH".into(),
                value: "/bin:/usr/bin".into(),
            }],
            ..Default::default()
        }
        .encode_to_vec();
        let action = Action {
            command_digest: Some(Digest::of(&command).to_proto()),
            input_root_digest: Some(Digest::EMPTY.to_proto()),
            ..Default::default()
        }
        .encode_to_vec();
        digests.push(Digest::of(&action));
        blob_digests.push(Digest::of(&command));
        blob_digests.push(Digest::of(&action));
        blobs.push(command);
        blobs.push(action);
    }
    upload(channel.clone(), &blob_digests, &blobs).await?;

    // Measured before and after the phase; the faster is reported (see the blob phases).
    let spawn_before = spawn_limit(actions.min(500)).await?;
    let progress = Progress::start("execute", actions as u64, "actions");
    let counter = progress.counter();
    let slots = Arc::new(Semaphore::new(concurrency.max(1)));
    let started = Instant::now();
    let mut calls = JoinSet::new();
    for digest in digests {
        let permit = slots.clone().acquire_owned().await?;
        let mut client = ExecutionClient::new(channel.clone());
        let counter = counter.clone();
        calls.spawn(async move {
            let _permit = permit;
            let began = Instant::now();
            let mut stream = client
                .execute(ExecuteRequest {
                    action_digest: Some(digest.to_proto()),
                    skip_cache_lookup: true,
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("Execute of {digest}: {e}"))?
                .into_inner();
            let mut last = None;
            while let Some(operation) = stream
                .message()
                .await
                .map_err(|e| format!("Execute of {digest}: {e}"))?
            {
                last = Some(operation);
            }
            let result = match last.and_then(|o| o.result) {
                Some(operation::Result::Response(any)) => {
                    mesh_reapi::proto::build::bazel::remote::execution::v2::ExecuteResponse::decode(
                        any.value.as_slice(),
                    )
                    .map_err(|e| format!("Execute of {digest}: a bad response: {e}"))?
                    .result
                }
                other => return Err(format!("Execute of {digest} ended with {other:?}")),
            };
            let exit = result.as_ref().map(|r| r.exit_code);
            if exit != Some(0) {
                return Err(format!("Execute of {digest}: exit code {exit:?}"));
            }
            counter.fetch_add(1, Ordering::Relaxed);
            let total = began.elapsed();
            Ok::<_, String>((
                total,
                Stages::of(total, result.and_then(|r| r.execution_metadata)),
            ))
        });
    }
    let mut times = Vec::with_capacity(actions);
    let mut stages = Vec::with_capacity(actions);
    while let Some(done) = calls.join_next().await {
        let (total, stage) = done??;
        times.push(total);
        stages.extend(stage);
    }
    let took = started.elapsed();
    progress.stop();
    let spawn_after = spawn_limit(actions.min(500)).await?;
    let (best, worst) = (spawn_before.max(spawn_after), spawn_before.min(spawn_after));
    times.sort();
    let rate = actions as f64 / took.as_secs_f64();
    report(
        "execute",
        &format!("{actions} actions"),
        rate,
        "act/s",
        &format!(
            "{:.2} of spawning `true` {best:.0}/s (slower measure {worst:.0}); p50 {} ms, p99 {} ms an action",
            rate / best,
            percentile(&times, 0.5).as_millis(),
            percentile(&times, 0.99).as_millis()
        ),
    );
    if !stages.is_empty() {
        let median = |pick: fn(&Stages) -> Duration| {
            let mut values: Vec<Duration> = stages.iter().map(pick).collect();
            values.sort();
            percentile(&values, 0.5).as_secs_f64() * 1e3
        };
        println!(
            "{:<14} medians an action, from its result's metadata: {:.1} ms outside its \
             replica's queue and worker (held and routed before, its result placed after), \
             {:.1} ms queued for a slot, {:.1} ms in the worker (inputs, command, outputs)",
            "",
            median(|s| s.outside),
            median(|s| s.queued),
            median(|s| s.worker),
        );
    }
    Ok(())
}

/// Where one action's time went, by the timestamps of its `ExecutedActionMetadata`.
struct Stages {
    /// The client's whole call, less the time from queued to worker completed.
    outside: Duration,
    /// From queued to worker started.
    queued: Duration,
    /// From worker started to worker completed.
    worker: Duration,
}

impl Stages {
    fn of(
        total: Duration,
        metadata: Option<
            mesh_reapi::proto::build::bazel::remote::execution::v2::ExecutedActionMetadata,
        >,
    ) -> Option<Self> {
        let metadata = metadata?;
        let at = |t: Option<mesh_reapi::proto::google::protobuf::Timestamp>| {
            t.map(|t| t.seconds as f64 + f64::from(t.nanos) * 1e-9)
        };
        let queued = at(metadata.queued_timestamp)?;
        let started = at(metadata.worker_start_timestamp)?;
        let completed = at(metadata.worker_completed_timestamp)?;
        let seconds = |s: f64| Duration::from_secs_f64(s.max(0.0));
        Some(Self {
            outside: total.saturating_sub(seconds(completed - queued)),
            queued: seconds(started - queued),
            worker: seconds(completed - started),
        })
    }
}

/// How many `true` processes this machine spawns and waits for per second, one at a time.
async fn spawn_limit(count: usize) -> Result<f64, Error> {
    let started = Instant::now();
    for _ in 0..count {
        let status = tokio::process::Command::new("/bin/true").status().await?;
        if !status.success() {
            return Err("spawning /bin/true failed".into());
        }
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Prints `done/total` to stderr every second while a phase runs.
struct Progress {
    counter: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    fn start(phase: &'static str, total: u64, unit: &'static str) -> Self {
        let counter = Arc::new(AtomicU64::new(0));
        let seen = counter.clone();
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            every.tick().await;
            loop {
                every.tick().await;
                eprintln!(
                    "  {phase}: {} of {total} {unit}",
                    seen.load(Ordering::Relaxed)
                );
            }
        });
        Self { counter, task }
    }

    fn counter(&self) -> Arc<AtomicU64> {
        self.counter.clone()
    }

    fn stop(self) {
        self.task.abort();
    }
}
