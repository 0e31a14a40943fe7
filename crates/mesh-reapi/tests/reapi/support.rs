//! Replicas on 127.0.0.1 (ephemeral ports), a Rust client from the same bindings, and
//! builders for actions.

use std::{collections::BTreeMap, future::Future, time::Duration};

use futures::StreamExt as _;
use mesh::Timing;
use mesh_reapi::{
    Digest, ReapiConfig, ReapiServer,
    proto::{
        build::bazel::remote::execution::v2::{
            Action, BatchUpdateBlobsRequest, Command, Directory, DirectoryNode, ExecuteRequest,
            ExecuteResponse, FileNode, FindMissingBlobsRequest, Platform, WaitExecutionRequest,
            action_cache_client::ActionCacheClient, batch_update_blobs_request,
            command::EnvironmentVariable,
            content_addressable_storage_client::ContentAddressableStorageClient,
            execution_client::ExecutionClient, platform,
        },
        google::{
            bytestream::{ReadRequest, WriteRequest, byte_stream_client::ByteStreamClient},
            longrunning::{Operation, operation},
            protobuf,
        },
    },
};
use prost::Message as _;
use tonic::{Status, transport::Channel};

/// Upper bound for any wait on a loaded CI machine; not an expectation.
pub const BOUND: Duration = Duration::from_secs(30);

pub async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {BOUND:?} waiting for {what}"))
}

/// Polls `condition` until it holds, within [`BOUND`].
pub async fn eventually(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    bounded(what, async {
        while !condition().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

pub struct Cluster {
    pub replicas: Vec<ReapiServer>,
    /// Each replica's data directory, by node index (`r{i}`).
    pub dirs: Vec<tempfile::TempDir>,
}

/// A replica's data directory: outside `/tmp`, as a deployment's is (`/var/lib/…`), so the
/// sandbox's private `/tmp` is not what hides it from actions.
pub fn data_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

/// The configuration every test replica starts from.
pub fn test_config(dir: &std::path::Path) -> ReapiConfig {
    let mut config = ReapiConfig::new(dir);
    config.max_concurrency = 4;
    config.cas_max_bytes = 256 << 20;
    config.replication.handoff_delay = Duration::from_millis(100);
    config
}

impl Cluster {
    /// `n` replicas named `r0`…, joined through the first, each seeing every other with its
    /// gRPC endpoint before this returns.
    pub async fn start(n: usize, configure: impl Fn(usize, &mut ReapiConfig)) -> Self {
        Self::start_with(n, configure, |_, node| node).await
    }

    /// [`Cluster::start`], with each replica's node builder passed through `node` (e.g. for
    /// TLS between replicas).
    pub async fn start_with(
        n: usize,
        configure: impl Fn(usize, &mut ReapiConfig),
        node: impl Fn(usize, mesh::NodeBuilder) -> mesh::NodeBuilder,
    ) -> Self {
        let mut replicas: Vec<ReapiServer> = Vec::new();
        let mut dirs = Vec::new();
        for i in 0..n {
            let dir = data_dir();
            let mut config = test_config(dir.path());
            configure(i, &mut config);
            let mut builder = mesh::Node::builder()
                .node_id(format!("r{i}"))
                .unwrap()
                .gossip_bind("127.0.0.1:0".parse().unwrap())
                .timing(Timing::local());
            if let Some(first) = replicas.first() {
                builder = builder.seeds([first.node().gossip_addr()]);
            }
            builder = node(i, builder);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            replicas.push(ReapiServer::start(builder, config, listener).await.unwrap());
            dirs.push(dir);
        }
        let cluster = Self { replicas, dirs };
        cluster.converge().await;
        cluster
    }

    /// Starts replica `r{index}` again on its data directory, joined through replica 0 of
    /// `self.replicas`, and waits until every replica sees every other.
    /// (An index one past the last data directory starts a new replica on a new one.)
    pub async fn restart(&mut self, index: usize, configure: impl Fn(&mut ReapiConfig)) {
        if index == self.dirs.len() {
            self.dirs.push(data_dir());
        }
        let mut config = test_config(self.dirs[index].path());
        configure(&mut config);
        let builder = mesh::Node::builder()
            .node_id(format!("r{index}"))
            .unwrap()
            .gossip_bind("127.0.0.1:0".parse().unwrap())
            .timing(Timing::local())
            .seeds([self.replicas[0].node().gossip_addr()]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.replicas
            .push(ReapiServer::start(builder, config, listener).await.unwrap());
        self.converge().await;
    }

    /// Starts a mesh node `name` that is not a replica but advertises `grpc_addr` as its
    /// endpoint (a fake or broken peer), joined through replica 0, and waits until every
    /// replica sees it.
    pub async fn join_member(&self, name: &str, grpc_addr: std::net::SocketAddr) -> mesh::Node {
        let node = mesh::Node::builder()
            .node_id(name)
            .unwrap()
            .gossip_bind("127.0.0.1:0".parse().unwrap())
            .timing(Timing::local())
            .grpc_endpoint(format!("http://{grpc_addr}"))
            .seeds([self.replicas[0].node().gossip_addr()])
            .start()
            .await
            .unwrap();
        self.converge_to(self.replicas.len() + 1).await;
        node
    }

    /// Serves `routes` (a fake or misbehaving peer) on 127.0.0.1 and joins it to the mesh as
    /// member `name` ([`Cluster::join_member`]).
    pub async fn join_fake(&self, name: &str, routes: tonic::service::Routes) -> FakeMember {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_routes(routes)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let node = self.join_member(name, addr).await;
        FakeMember { node, server }
    }

    /// Waits until every replica sees every other (and only them) with its endpoint.
    pub async fn converge(&self) {
        self.converge_to(self.replicas.len()).await;
    }

    /// Waits until every replica sees `n` members, each peer with its endpoint.
    async fn converge_to(&self, n: usize) {
        for replica in &self.replicas {
            bounded(
                "every replica to see every other with its endpoint",
                replica.node().membership().wait_until(|view| {
                    view.len() == n
                        && view
                            .peers()
                            .iter()
                            .all(|p| p.state().is_some_and(|s| s.grpc_endpoint.is_some()))
                }),
            )
            .await;
        }
    }

    /// Stops the replica at `position` in `self.replicas` (it leaves the mesh) and waits
    /// until the others see it gone.
    pub async fn stop(&mut self, position: usize) {
        let replica = self.replicas.remove(position);
        replica.shutdown().await;
        self.converge().await;
    }

    /// The position in `self.replicas` of node `name`.
    pub fn position(&self, name: &str) -> usize {
        self.replicas
            .iter()
            .position(|r| r.node().node_id().as_str() == name)
            .unwrap_or_else(|| panic!("no replica {name}"))
    }

    /// Waits until no replica has blobs left to hand to new owners.
    pub async fn handoff_settled(&self) {
        eventually("every replica's handoff to settle", async || {
            self.replicas
                .iter()
                .all(|r| !r.reapi().cluster().handoff_pending())
        })
        .await;
    }

    /// Whether every current owner of `digest` (as replica 0 sees them) holds it.
    pub fn owners_hold(&self, digest: &Digest) -> bool {
        self.replicas[0]
            .reapi()
            .cluster()
            .owners(digest)
            .iter()
            .all(|owner| self.holds(self.position(owner.as_str()), digest))
    }

    /// Whether the replica at `position` holds `digest` in its own CAS.
    pub fn holds(&self, position: usize, digest: &Digest) -> bool {
        self.replicas[position]
            .reapi()
            .cluster()
            .local()
            .contains(digest)
    }

    /// Stores a blob on the replica at `position` only, as if every other copy had been
    /// evicted (no placement). It first waits for every handoff pass to settle, so no pass
    /// still walking this replica's store (one started by a member that just joined) copies
    /// the blob to its owners after all.
    pub async fn put_only_on(&self, position: usize, data: &[u8]) -> Digest {
        self.handoff_settled().await;
        self.replicas[position]
            .reapi()
            .cluster()
            .local()
            .put(bytes::Bytes::copy_from_slice(data))
            .await
            .unwrap()
    }

    pub fn url(&self, i: usize) -> String {
        format!("http://{}", self.replicas[i].addr())
    }

    pub async fn channel(&self, i: usize) -> Channel {
        Channel::from_shared(self.url(i))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn cas(&self, i: usize) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.channel(i).await)
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(64 << 20)
    }

    pub async fn bytestream(&self, i: usize) -> ByteStreamClient<Channel> {
        ByteStreamClient::new(self.channel(i).await)
    }

    pub async fn exec(&self, i: usize) -> ExecutionClient<Channel> {
        ExecutionClient::new(self.channel(i).await)
    }

    pub async fn ac(&self, i: usize) -> ActionCacheClient<Channel> {
        ActionCacheClient::new(self.channel(i).await)
    }

    pub fn node_id(&self, i: usize) -> String {
        self.replicas[i].node().node_id().to_string()
    }

    pub async fn shutdown(self) {
        for replica in self.replicas {
            replica.shutdown().await;
        }
    }
}

/// What `FindMissingBlobs` through the replica at `position` reports missing of `digests`.
pub async fn missing_on(cluster: &Cluster, position: usize, digests: &[Digest]) -> Vec<Digest> {
    cluster
        .cas(position)
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
        .map(|d| Digest::from_proto(d, "d", mesh_reapi::DigestFunction::Sha256).unwrap())
        .collect()
}

/// A blob of `len` bytes (one pattern, varied by a salt) whose digest `wanted` accepts: a test
/// picks one whose owners are the replicas it needs.
pub fn blob_where(len: u32, wanted: impl Fn(&Digest) -> bool) -> (Vec<u8>, Digest) {
    (0u8..=u8::MAX)
        .map(|salt| {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ salt).collect();
            let digest = Digest::of(&data);
            (data, digest)
        })
        .find(|(_, digest)| wanted(digest))
        .expect("one of 256 salts gives a blob the test wants")
}

/// Uploads small blobs with `BatchUpdateBlobs`, checking every blob's status.
pub async fn upload(cluster: &Cluster, i: usize, blobs: &[(Digest, Vec<u8>)]) {
    upload_with(&mut cluster.cas(i).await, blobs).await;
}

/// [`upload`] through a client of the caller's (a replica outside a [`Cluster`]).
pub async fn upload_with(
    client: &mut ContentAddressableStorageClient<Channel>,
    blobs: &[(Digest, Vec<u8>)],
) {
    let response = client
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: String::new(),
            requests: blobs
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
        .unwrap()
        .into_inner();
    for blob in response.responses {
        let status = blob.status.unwrap_or_default();
        assert_eq!(status.code, 0, "upload failed: {}", status.message);
    }
}

/// Streams `data` to `ByteStream.Write` in `chunk`-sized pieces.
pub async fn write(
    client: &mut ByteStreamClient<Channel>,
    resource_name: String,
    data: &[u8],
    chunk: usize,
) -> Result<i64, Status> {
    let mut requests = Vec::new();
    let mut offset = 0usize;
    loop {
        let end = (offset + chunk).min(data.len());
        requests.push(WriteRequest {
            resource_name: if offset == 0 {
                resource_name.clone()
            } else {
                String::new()
            },
            write_offset: offset as i64,
            finish_write: end == data.len(),
            data: data[offset..end].to_vec(),
        });
        offset = end;
        if offset == data.len() {
            break;
        }
    }
    Ok(client
        .write(futures::stream::iter(requests))
        .await?
        .into_inner()
        .committed_size)
}

/// Reads a whole blob with `ByteStream.Read`; also returns the largest chunk received.
pub async fn read(
    client: &mut ByteStreamClient<Channel>,
    digest: &Digest,
) -> Result<(Vec<u8>, usize), Status> {
    let mut stream = client
        .read(ReadRequest {
            resource_name: format!("blobs/{digest}"),
            read_offset: 0,
            read_limit: 0,
        })
        .await?
        .into_inner();
    let mut data = Vec::new();
    let mut largest = 0;
    while let Some(chunk) = stream.message().await? {
        largest = largest.max(chunk.data.len());
        data.extend_from_slice(&chunk.data);
    }
    Ok((data, largest))
}

/// An action to build: a command, its inputs, its outputs.
#[derive(Debug, Clone, Default)]
pub struct TestAction {
    pub arguments: Vec<String>,
    pub environment: Vec<(String, String)>,
    pub working_directory: String,
    pub output_files: Vec<String>,
    pub output_directories: Vec<String>,
    pub output_paths: Vec<String>,
    /// path → (content, executable)
    pub inputs: BTreeMap<String, (Vec<u8>, bool)>,
    pub timeout: Option<Duration>,
    pub do_not_cache: bool,
    pub salt: Vec<u8>,
    /// Platform properties, set where Bazel 4.2.3 sets them: in the `Command`.
    pub platform: Vec<(String, String)>,
}

/// The blobs of a built action and its digest.
pub struct Built {
    pub action: Digest,
    pub blobs: Vec<(Digest, Vec<u8>)>,
}

impl Built {
    /// Only the blobs that are not `skip`.
    pub fn blobs_except(&self, skip: &[Digest]) -> Vec<(Digest, Vec<u8>)> {
        self.blobs
            .iter()
            .filter(|(d, _)| !skip.contains(d))
            .cloned()
            .collect()
    }
}

pub fn shell(script: &str) -> TestAction {
    TestAction {
        arguments: vec!["/bin/sh".into(), "-c".into(), script.into()],
        environment: vec![("PATH".into(), "/bin:/usr/bin".into())],
        ..Default::default()
    }
}

impl TestAction {
    pub fn input(mut self, path: &str, content: &[u8]) -> Self {
        self.inputs
            .insert(path.to_owned(), (content.to_vec(), false));
        self
    }

    pub fn output_file(mut self, path: &str) -> Self {
        self.output_files.push(path.to_owned());
        self
    }

    pub fn output_directory(mut self, path: &str) -> Self {
        self.output_directories.push(path.to_owned());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub fn salt(mut self, salt: &str) -> Self {
        self.salt = salt.as_bytes().to_vec();
        self
    }

    pub fn build(&self) -> Built {
        self.build_with(|add| build_tree(&self.inputs, "", add))
    }

    /// Builds the action over an input root of the caller's making: `root` stores the
    /// messages and contents it needs with `add` and returns the root `Directory`'s digest
    /// (for input trees the builder would refuse to make, such as bad names).
    #[allow(deprecated)]
    pub fn build_with(
        &self,
        root: impl FnOnce(&mut dyn FnMut(Vec<u8>) -> Digest) -> Digest,
    ) -> Built {
        let mut blobs = Vec::new();
        let mut add = |data: Vec<u8>| {
            let digest = Digest::of(&data);
            if !blobs.iter().any(|(d, _)| *d == digest) {
                blobs.push((digest, data));
            }
            digest
        };
        let input_root = root(&mut add);
        let command = Command {
            arguments: self.arguments.clone(),
            environment_variables: self
                .environment
                .iter()
                .map(|(name, value)| EnvironmentVariable {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
            output_files: self.output_files.clone(),
            output_directories: self.output_directories.clone(),
            output_paths: self.output_paths.clone(),
            working_directory: self.working_directory.clone(),
            platform: (!self.platform.is_empty()).then(|| Platform {
                properties: self
                    .platform
                    .iter()
                    .map(|(name, value)| platform::Property {
                        name: name.clone(),
                        value: value.clone(),
                    })
                    .collect(),
            }),
            ..Default::default()
        };
        let command = add(command.encode_to_vec());
        let action = Action {
            command_digest: Some(command.to_proto()),
            input_root_digest: Some(input_root.to_proto()),
            timeout: self.timeout.map(|t| protobuf::Duration {
                seconds: t.as_secs() as i64,
                nanos: t.subsec_nanos() as i32,
            }),
            do_not_cache: self.do_not_cache,
            salt: self.salt.clone(),
            platform: None,
        };
        let action = add(action.encode_to_vec());
        Built { action, blobs }
    }
}

/// The `Directory` for the inputs under `prefix`, children first.
fn build_tree(
    inputs: &BTreeMap<String, (Vec<u8>, bool)>,
    prefix: &str,
    add: &mut dyn FnMut(Vec<u8>) -> Digest,
) -> Digest {
    let mut directory = Directory::default();
    let mut subdirs: Vec<String> = Vec::new();
    for (path, (content, executable)) in inputs {
        let Some(rest) = path.strip_prefix(prefix) else {
            continue;
        };
        match rest.split_once('/') {
            None => directory.files.push(FileNode {
                name: rest.to_owned(),
                digest: Some(add(content.clone()).to_proto()),
                is_executable: *executable,
                node_properties: None,
            }),
            Some((dir, _)) => {
                if !subdirs.iter().any(|d| d == dir) {
                    subdirs.push(dir.to_owned());
                }
            }
        }
    }
    for dir in subdirs {
        let digest = build_tree(inputs, &format!("{prefix}{dir}/"), add);
        directory.directories.push(DirectoryNode {
            name: dir,
            digest: Some(digest.to_proto()),
        });
    }
    add(directory.encode_to_vec())
}

pub fn execute_request(action: Digest, skip_cache_lookup: bool) -> ExecuteRequest {
    ExecuteRequest {
        action_digest: Some(action.to_proto()),
        skip_cache_lookup,
        ..Default::default()
    }
}

/// Every operation message of an `Execute` call, until the stream ends.
pub async fn execute(
    client: &mut ExecutionClient<Channel>,
    request: impl tonic::IntoRequest<ExecuteRequest>,
) -> Result<Vec<Operation>, Status> {
    let stream = client.execute(request).await?.into_inner();
    collect(stream).await
}

pub async fn wait_execution(
    client: &mut ExecutionClient<Channel>,
    name: &str,
) -> Result<Vec<Operation>, Status> {
    let stream = client
        .wait_execution(WaitExecutionRequest {
            name: name.to_owned(),
        })
        .await?
        .into_inner();
    collect(stream).await
}

async fn collect(mut stream: tonic::Streaming<Operation>) -> Result<Vec<Operation>, Status> {
    let mut operations = Vec::new();
    bounded("the operation stream to end", async {
        while let Some(operation) = stream.next().await {
            operations.push(operation?);
        }
        Ok::<_, Status>(())
    })
    .await?;
    Ok(operations)
}

/// The `ExecuteResponse` of a finished operation (panics if it has none).
pub fn response(operation: &Operation) -> ExecuteResponse {
    assert!(operation.done, "the operation is not done: {operation:?}");
    match &operation.result {
        Some(operation::Result::Response(any)) => {
            assert!(
                any.type_url.ends_with("ExecuteResponse"),
                "{}",
                any.type_url
            );
            ExecuteResponse::decode(any.value.as_slice()).unwrap()
        }
        other => panic!("a finished operation must carry a response, got {other:?}"),
    }
}

/// The final response of an `Execute` stream.
pub fn finished(operations: &[Operation]) -> ExecuteResponse {
    let last = operations.last().expect("at least one operation message");
    response(last)
}

/// A file an action waits for, so a test decides when the action finishes instead of
/// guessing with sleeps.
pub struct Gate {
    dir: tempfile::TempDir,
}

impl Gate {
    /// In the target directory, not in `/tmp`: a sandboxed action has a private `/tmp` but
    /// sees the rest of the host read-only, which is all a gate needs.
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap(),
        }
    }

    fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("open")
    }

    /// Shell that blocks until [`Gate::open`].
    pub fn wait(&self) -> String {
        format!(
            "while [ ! -e '{}' ]; do sleep 0.01; done",
            self.path().display()
        )
    }

    pub fn open(&self) {
        std::fs::write(self.path(), b"").unwrap();
    }
}

/// A token unique to one test run, to find an action's processes by: `sleep {token}` sleeps
/// about 30 s and shows the token in its command line, whatever pid namespace it is in.
pub fn sleep_token() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("30.{}{:04}", std::process::id(), n)
}

/// The host processes whose command line contains `token` (zombies excluded).
pub fn processes_with(token: &str) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let zombie = std::fs::read_to_string(entry.path().join("stat"))
            .map(|stat| stat.contains(") Z "))
            .unwrap_or(true);
        if !zombie && String::from_utf8_lossy(&cmdline).contains(token) {
            found.push(pid);
        }
    }
    found
}

/// A fake peer joined with [`Cluster::join_fake`]: its mesh node and its gRPC server.
pub struct FakeMember {
    node: mesh::Node,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl FakeMember {
    /// Stops serving and leaves the mesh.
    pub async fn shutdown(self) {
        self.server.abort();
        self.node.shutdown().await;
    }
}
