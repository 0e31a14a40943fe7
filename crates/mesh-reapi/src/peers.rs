//! Calls from this replica to one peer: what it has, its blobs, its action results.
//!
//! Every call goes through [`mesh_route::Router::peer`], whose channel stamps
//! `x-mesh-forwarded-by`, so the peer answers from its own stores and never asks further
//! (one hop, no loops). Each call has a deadline ([`PeerConfig`]): a peer that hangs costs a
//! bounded wait, never a hang, and its silence counts as "does not have it".

use std::time::Duration;

use bazel_remote_apis::{
    build::bazel::remote::execution::v2::{
        ActionResult, BatchReadBlobsRequest, BatchUpdateBlobsRequest, FindMissingBlobsRequest,
        GetActionResultRequest, UpdateActionResultRequest, action_cache_client::ActionCacheClient,
        batch_update_blobs_request,
        content_addressable_storage_client::ContentAddressableStorageClient,
    },
    google::bytestream::{ReadRequest, WriteRequest, byte_stream_client::ByteStreamClient},
};
use mesh_core::NodeId;
use mesh_proto::reapi::v1::{
    ClaimRequest, HasRequest, ReleaseRequest, claims_client::ClaimsClient,
    presence_client::PresenceClient,
};
use mesh_route::{PeerCall, RouteError, Router};
use tonic::{Code, metadata::MetadataMap};

use crate::{BlobWriter, Cas, CasError, Digest, DigestFunction};

/// Bytes per `ByteStream.Write` message when pushing a blob to a peer.
const PUSH_CHUNK: usize = 1024 * 1024;

/// The largest total of blob bytes asked for in one `BatchReadBlobs` to a peer, and the limit
/// this server advertises for batches: 4 MiB minus room for the message framing, so a whole
/// batch answer stays under the 4 MiB message limit of common clients.
pub const MAX_BATCH_TOTAL_SIZE: u64 = 4 * 1024 * 1024 - 64 * 1024;

/// Blobs up to this size are fetched from peers in batches; larger ones are streamed.
const BATCHED_BLOB_MAX: u64 = 1024 * 1024;

/// Digests per `FindMissingBlobs` sent to a peer (keeps each request far below 4 MiB).
const FIND_MISSING_CHUNK: usize = 8192;

/// Digests per presence query sent to a peer: 2 MB of packed digests, half the 4 MiB limit.
const PRESENCE_CHUNK: usize = 50_000;

/// How calls to peers are bounded.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct PeerConfig {
    /// Deadline of a small call (`FindMissingBlobs`, `BatchReadBlobs`, `GetActionResult`).
    /// Default 10 s.
    pub call_timeout: Duration,
    /// Longest silence within a streamed blob read before it is abandoned. Default 30 s.
    pub stream_idle_timeout: Duration,
}

impl Default for PeerConfig {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_secs(10),
            stream_idle_timeout: Duration::from_secs(30),
        }
    }
}

/// A call to a peer failed (the peer then counts as not having what was asked).
#[derive(Debug, thiserror::Error)]
pub(crate) enum PeerError {
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("peer {node} answered {code:?}: {message}")]
    Status {
        node: NodeId,
        code: Code,
        message: String,
    },
    #[error("peer {node} did not answer within {timeout:?}")]
    Timeout { node: NodeId, timeout: Duration },
    #[error("storing a blob fetched from peer {node} failed: {source}")]
    Store {
        node: NodeId,
        #[source]
        source: CasError,
    },
    #[error("reading blob {digest} to push it to peer {node} failed: {source}")]
    Local {
        node: NodeId,
        digest: Digest,
        #[source]
        source: Box<CasError>,
    },
}

/// What [`Peers::push`] did.
#[derive(Debug)]
pub(crate) struct Pushed {
    /// The digests the peer holds now (it had them, or they were sent).
    pub(crate) held: Vec<Digest>,
    /// Blobs sent.
    pub(crate) sent: u64,
    /// Bytes sent.
    pub(crate) bytes: u64,
}

/// Calls to peers on behalf of one request (whose metadata they carry).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peers<'a> {
    pub(crate) router: &'a Router,
    pub(crate) metadata: &'a MetadataMap,
    pub(crate) config: PeerConfig,
}

impl Peers<'_> {
    fn call(&self, node: &NodeId) -> Result<PeerCall, PeerError> {
        Ok(self.router.peer(node, self.metadata)?)
    }

    async fn bounded<T>(
        &self,
        node: &NodeId,
        timeout: Duration,
        call: impl Future<Output = Result<T, tonic::Status>>,
    ) -> Result<T, PeerError> {
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(status)) => Err(PeerError::Status {
                node: node.clone(),
                code: status.code(),
                message: status.message().to_owned(),
            }),
            Err(_) => Err(PeerError::Timeout {
                node: node.clone(),
                timeout,
            }),
        }
    }

    /// Which of `digests` the peer has: asked with `mesh.reapi.v1.Presence/Has` (packed
    /// digests, a bitmap back), or with `FindMissingBlobs` if the peer does not serve it.
    pub(crate) async fn has(
        &self,
        node: &NodeId,
        digests: &[Digest],
    ) -> Result<Vec<Digest>, PeerError> {
        let mut present = Vec::new();
        for (function, group) in by_function(digests) {
            for chunk in group.chunks(PRESENCE_CHUNK) {
                present.extend(self.has_chunk(node, function, chunk).await?);
            }
        }
        Ok(present)
    }

    /// [`Peers::has`] for digests of one function, at most [`PRESENCE_CHUNK`] of them.
    async fn has_chunk(
        &self,
        node: &NodeId,
        function: DigestFunction,
        chunk: &[Digest],
    ) -> Result<Vec<Digest>, PeerError> {
        let call = self.call(node)?;
        let mut client = PresenceClient::new(call.channel());
        let request = call.request(HasRequest {
            digests: crate::presence::pack(chunk),
            digest_function: function.to_proto(),
        });
        match self
            .bounded(node, self.config.call_timeout, client.has(request))
            .await
        {
            Ok(response) => {
                let bitmap = response.into_inner().present;
                Ok(chunk
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| crate::presence::bit(&bitmap, *i))
                    .map(|(_, d)| *d)
                    .collect())
            }
            Err(PeerError::Status {
                code: Code::Unimplemented,
                ..
            }) => self.find_missing_has(node, chunk).await,
            Err(error) => Err(error),
        }
    }

    /// Which of `digests` the peer has, asked with REAPI's `FindMissingBlobs` (a peer of an
    /// older release).
    async fn find_missing_has(
        &self,
        node: &NodeId,
        digests: &[Digest],
    ) -> Result<Vec<Digest>, PeerError> {
        let mut present = Vec::new();
        for chunk in digests.chunks(FIND_MISSING_CHUNK) {
            let call = self.call(node)?;
            let mut client = ContentAddressableStorageClient::new(call.channel());
            let function = chunk[0].function();
            let request = call.request(FindMissingBlobsRequest {
                instance_name: String::new(),
                blob_digests: chunk.iter().map(Digest::to_proto).collect(),
                digest_function: function.to_proto(),
            });
            let response = self
                .bounded(
                    node,
                    self.config.call_timeout,
                    client.find_missing_blobs(request),
                )
                .await?
                .into_inner();
            let missing: std::collections::HashSet<Digest> = response
                .missing_blob_digests
                .iter()
                .filter_map(|d| Digest::from_proto(d, "missing_blob_digests", function).ok())
                .collect();
            present.extend(chunk.iter().filter(|d| !missing.contains(d)).copied());
        }
        Ok(present)
    }

    /// Fetches every blob of `digests` the peer has, storing each (verified) with `store`.
    /// Returns the digests fetched; the others the peer does not have (or failed to send).
    pub(crate) async fn fetch(
        &self,
        node: &NodeId,
        digests: &[Digest],
        cas: &crate::Cas,
    ) -> Vec<Digest> {
        let mut fetched = Vec::new();
        let (small, large): (Vec<Digest>, Vec<Digest>) =
            digests.iter().partition(|d| d.size() <= BATCHED_BLOB_MAX);
        for batch in by_function(&small)
            .into_iter()
            .flat_map(|(_, group)| batches(&group))
        {
            match self.batch_read(node, &batch, cas).await {
                Ok(mut got) => fetched.append(&mut got),
                Err(error) => {
                    tracing::debug!(peer = %node, %error, blobs = batch.len(), "batch fetch from a peer failed");
                }
            }
        }
        for digest in large {
            match self.stream_read(node, digest, cas).await {
                Ok(true) => fetched.push(digest),
                Ok(false) => {}
                Err(error) => {
                    tracing::debug!(peer = %node, %digest, %error, "streamed fetch from a peer failed");
                }
            }
        }
        fetched
    }

    async fn batch_read(
        &self,
        node: &NodeId,
        digests: &[Digest],
        cas: &crate::Cas,
    ) -> Result<Vec<Digest>, PeerError> {
        let call = self.call(node)?;
        let mut client = ContentAddressableStorageClient::new(call.channel())
            .max_decoding_message_size(2 * MAX_BATCH_TOTAL_SIZE as usize);
        let function = digests.first().map(Digest::function).unwrap_or_default();
        let request = call.request(BatchReadBlobsRequest {
            instance_name: String::new(),
            digests: digests.iter().map(Digest::to_proto).collect(),
            acceptable_compressors: Vec::new(),
            digest_function: function.to_proto(),
        });
        let response = self
            .bounded(
                node,
                self.config.call_timeout,
                client.batch_read_blobs(request),
            )
            .await?
            .into_inner();
        let mut fetched = Vec::new();
        for blob in response.responses {
            let ok = blob.status.as_ref().is_none_or(|s| s.code == 0);
            let Some(digest) = blob
                .digest
                .as_ref()
                .and_then(|d| Digest::from_proto(d, "digest", function).ok())
                .filter(|d| ok && digests.contains(d))
            else {
                continue;
            };
            match cas.put_expecting(digest, blob.data.into()).await {
                Ok(()) => fetched.push(digest),
                Err(source) => {
                    tracing::warn!(peer = %node, %digest, error = %source, "a peer sent a bad blob");
                }
            }
        }
        Ok(fetched)
    }

    /// Streams one blob from the peer into the CAS. `Ok(false)`: the peer does not have it.
    async fn stream_read(
        &self,
        node: &NodeId,
        digest: Digest,
        cas: &crate::Cas,
    ) -> Result<bool, PeerError> {
        let store_error = |source| PeerError::Store {
            node: node.clone(),
            source,
        };
        let mut writer: BlobWriter = cas.writer(digest).await.map_err(store_error)?;
        let Some(mut read) = self.open_read(node, digest).await? else {
            return Ok(false);
        };
        loop {
            match read.next().await {
                Ok(Some(piece)) => writer.write_owned(piece).await.map_err(store_error)?,
                Ok(None) => break,
                Err(PeerError::Status {
                    code: Code::NotFound,
                    ..
                }) => return Ok(false),
                Err(error) => return Err(error),
            }
        }
        writer.commit().await.map_err(store_error)?;
        Ok(true)
    }

    /// Opens a `ByteStream.Read` of the whole of `digest` on the peer. `Ok(None)`: the peer
    /// does not hold it.
    pub(crate) async fn open_read(
        &self,
        node: &NodeId,
        digest: Digest,
    ) -> Result<Option<PeerRead>, PeerError> {
        let call = self.call(node)?;
        let mut client = ByteStreamClient::new(call.channel());
        let request = call.request(ReadRequest {
            resource_name: format!("blobs/{digest}"),
            read_offset: 0,
            read_limit: 0,
        });
        match self
            .bounded(node, self.config.call_timeout, client.read(request))
            .await
        {
            Ok(response) => Ok(Some(PeerRead {
                node: node.clone(),
                stream: response.into_inner(),
                idle: self.config.stream_idle_timeout,
            })),
            Err(PeerError::Status {
                code: Code::NotFound,
                ..
            }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// The peer's own cached result for `action`, if it has one.
    pub(crate) async fn action_result(
        &self,
        node: &NodeId,
        action: &Digest,
    ) -> Result<Option<ActionResult>, PeerError> {
        let call = self.call(node)?;
        let mut client = ActionCacheClient::new(call.channel());
        let request = call.request(GetActionResultRequest {
            instance_name: String::new(),
            action_digest: Some(action.to_proto()),
            inline_stdout: false,
            inline_stderr: false,
            inline_output_files: Vec::new(),
            digest_function: action.function().to_proto(),
        });
        match self
            .bounded(
                node,
                self.config.call_timeout,
                client.get_action_result(request),
            )
            .await
        {
            Ok(response) => Ok(Some(response.into_inner())),
            Err(PeerError::Status {
                code: Code::NotFound,
                ..
            }) => Ok(None),
            Err(error) => Err(error),
        }
    }
}

impl Peers<'_> {
    /// Copies every blob of `digests` the peer lacks to it from the local `cas` (asking first
    /// what it has, so nothing it holds crosses the network). A blob no longer here is left
    /// out; a failed call fails the whole push (the caller picks another peer).
    pub(crate) async fn push(
        &self,
        node: &NodeId,
        digests: &[Digest],
        cas: &Cas,
    ) -> Result<Pushed, PeerError> {
        let present = self.has(node, digests).await?;
        let mut held: Vec<Digest> = present.clone();
        let lacking: Vec<Digest> = digests
            .iter()
            .filter(|d| !present.contains(d))
            .copied()
            .collect();
        let mut sent = 0;
        let mut bytes = 0;
        let (small, large): (Vec<Digest>, Vec<Digest>) =
            lacking.iter().partition(|d| d.size() <= BATCHED_BLOB_MAX);
        for batch in by_function(&small)
            .into_iter()
            .flat_map(|(_, group)| batches(&group))
        {
            let function = batch.first().map(Digest::function).unwrap_or_default();
            let mut requests = Vec::with_capacity(batch.len());
            for digest in &batch {
                let data = cas.read(digest).await.map_err(|source| PeerError::Local {
                    node: node.clone(),
                    digest: *digest,
                    source: Box::new(source),
                })?;
                if let Some(data) = data {
                    requests.push(batch_update_blobs_request::Request {
                        digest: Some(digest.to_proto()),
                        data: data.to_vec(),
                        compressor: 0,
                    });
                }
            }
            if requests.is_empty() {
                continue;
            }
            let call = self.call(node)?;
            let mut client = ContentAddressableStorageClient::new(call.channel())
                .max_encoding_message_size(2 * MAX_BATCH_TOTAL_SIZE as usize);
            let request = call.request(BatchUpdateBlobsRequest {
                instance_name: String::new(),
                requests,
                digest_function: function.to_proto(),
            });
            let response = self
                .bounded(
                    node,
                    self.config.call_timeout,
                    client.batch_update_blobs(request),
                )
                .await?
                .into_inner();
            for blob in response.responses {
                let ok = blob.status.as_ref().is_none_or(|s| s.code == 0);
                if let Some(digest) = blob
                    .digest
                    .as_ref()
                    .and_then(|d| Digest::from_proto(d, "digest", function).ok())
                    .filter(|_| ok)
                {
                    sent += 1;
                    bytes += digest.size();
                    held.push(digest);
                } else {
                    tracing::warn!(peer = %node, status = ?blob.status, "a peer refused a pushed blob");
                }
            }
        }
        for digest in large {
            if self.stream_write(node, digest, cas).await? {
                sent += 1;
                bytes += digest.size();
                held.push(digest);
            }
        }
        Ok(Pushed { held, sent, bytes })
    }

    /// Streams one local blob to the peer with `ByteStream.Write`. `Ok(false)`: it is no
    /// longer here, or it was found corrupt while being read (then the write is abandoned
    /// before `finish_write`, so the peer stores nothing, and the blob is dropped here).
    async fn stream_write(
        &self,
        node: &NodeId,
        digest: Digest,
        cas: &Cas,
    ) -> Result<bool, PeerError> {
        let local = |source| PeerError::Local {
            node: node.clone(),
            digest,
            source: Box::new(source),
        };
        let Some(mut blob) = cas.open_reader(&digest).await.map_err(local)? else {
            return Ok(false);
        };
        let resource_name = format!("uploads/{}/blobs/{digest}", uuid::Uuid::new_v4());
        let (sender, receiver) = tokio::sync::mpsc::channel::<WriteRequest>(2);
        let reader = async move {
            let mut offset = 0u64;
            let mut first = true;
            // The piece that ends the blob (sent with `finish_write`) comes only once the
            // whole blob matched its digest (`BlobReader`).
            while let Some(chunk) = blob.next_chunk(PUSH_CHUNK).await? {
                let finish_write = offset + chunk.len() as u64 >= digest.size();
                let message = WriteRequest {
                    resource_name: if first {
                        resource_name.clone()
                    } else {
                        String::new()
                    },
                    write_offset: i64::try_from(offset).unwrap_or(i64::MAX),
                    finish_write,
                    data: chunk,
                };
                first = false;
                offset += message.data.len() as u64;
                if sender.send(message).await.is_err() || finish_write {
                    break;
                }
            }
            Ok::<(), CasError>(())
        };
        let call = self.call(node)?;
        let mut client = ByteStreamClient::new(call.channel());
        let request = call.request(tokio_stream_of(receiver));
        let write = self.bounded(
            node,
            self.config
                .stream_idle_timeout
                .max(self.config.call_timeout),
            client.write(request),
        );
        let (read, written) = tokio::join!(reader, write);
        match read {
            Ok(()) => {}
            Err(CasError::Corrupt { .. }) => return Ok(false),
            Err(error) => return Err(local(error)),
        }
        let response = written?.into_inner();
        Ok(u64::try_from(response.committed_size).ok() == Some(digest.size()))
    }

    /// Opens a `ByteStream.Write` of `digest` to the peer before the blob is complete here:
    /// the bytes of an upload are passed on as they arrive ([`crate::cluster::Tee`]). The call
    /// runs in a task of its own; [`PeerWrite::send`] feeds it and [`PeerWrite::finish`]
    /// ends it.
    pub(crate) fn open_write(&self, node: &NodeId, digest: Digest) -> Result<PeerWrite, PeerError> {
        let call = self.call(node)?;
        let (sender, receiver) = tokio::sync::mpsc::channel::<WriteRequest>(2);
        let mut client = ByteStreamClient::new(call.channel());
        let request = call.request(tokio_stream_of(receiver));
        let peer = node.clone();
        let task = tokio::spawn(async move {
            client
                .write(request)
                .await
                .map(|response| response.into_inner().committed_size)
                .map_err(|status| PeerError::Status {
                    node: peer,
                    code: status.code(),
                    message: status.message().to_owned(),
                })
        });
        Ok(PeerWrite {
            node: node.clone(),
            digest,
            sender,
            task,
            sent: 0,
            named: false,
            held: false,
            config: self.config,
        })
    }

    /// Stores `result` as the peer's own action-cache entry for `action`.
    pub(crate) async fn put_action_result(
        &self,
        node: &NodeId,
        action: &Digest,
        result: &ActionResult,
    ) -> Result<(), PeerError> {
        let call = self.call(node)?;
        let mut client = ActionCacheClient::new(call.channel());
        let request = call.request(UpdateActionResultRequest {
            instance_name: String::new(),
            action_digest: Some(action.to_proto()),
            action_result: Some(result.clone()),
            results_cache_policy: None,
            digest_function: action.function().to_proto(),
        });
        self.bounded(
            node,
            self.config.call_timeout,
            client.update_action_result(request),
        )
        .await?;
        Ok(())
    }

    /// Claims `action` at its owner `node` (see `mesh.reapi.v1.Claims`): the operation that
    /// runs it.
    pub(crate) async fn claim(
        &self,
        node: &NodeId,
        request: ClaimRequest,
    ) -> Result<String, PeerError> {
        let call = self.call(node)?;
        let mut client = ClaimsClient::new(call.channel());
        let response = self
            .bounded(
                node,
                self.config.call_timeout,
                client.claim(call.request(request)),
            )
            .await?;
        Ok(response.into_inner().operation)
    }

    /// Releases a claim at `node`.
    pub(crate) async fn release(
        &self,
        node: &NodeId,
        request: ReleaseRequest,
    ) -> Result<(), PeerError> {
        let call = self.call(node)?;
        let mut client = ClaimsClient::new(call.channel());
        self.bounded(
            node,
            self.config.call_timeout,
            client.release(call.request(request)),
        )
        .await?;
        Ok(())
    }
}

/// A blob being read from a peer ([`Peers::open_read`]), piece by piece.
#[derive(Debug)]
pub(crate) struct PeerRead {
    node: NodeId,
    stream: tonic::Streaming<bazel_remote_apis::google::bytestream::ReadResponse>,
    idle: Duration,
}

impl PeerRead {
    /// The peer read from.
    pub(crate) fn node(&self) -> &NodeId {
        &self.node
    }

    /// The next piece, `Ok(None)` at the end. A peer silent for the stream idle timeout is an
    /// error.
    pub(crate) async fn next(&mut self) -> Result<Option<Vec<u8>>, PeerError> {
        match tokio::time::timeout(self.idle, self.stream.message()).await {
            Ok(Ok(message)) => Ok(message.map(|message| message.data)),
            Ok(Err(status)) => Err(PeerError::Status {
                node: self.node.clone(),
                code: status.code(),
                message: status.message().to_owned(),
            }),
            Err(_) => Err(PeerError::Timeout {
                node: self.node.clone(),
                timeout: self.idle,
            }),
        }
    }
}

/// A `ByteStream.Write` to a peer fed piece by piece ([`Peers::open_write`]). Dropped
/// before [`PeerWrite::finish`], its call is cancelled without `finish_write`, so the peer
/// stores nothing.
#[derive(Debug)]
pub(crate) struct PeerWrite {
    node: NodeId,
    digest: Digest,
    sender: tokio::sync::mpsc::Sender<WriteRequest>,
    task: tokio::task::JoinHandle<Result<i64, PeerError>>,
    sent: u64,
    /// Whether the first message (the one that names the resource) went.
    named: bool,
    /// Whether the peer answered early that it holds the blob already (REAPI lets a write
    /// end so): nothing more is sent.
    held: bool,
    config: PeerConfig,
}

impl PeerWrite {
    /// The peer written to.
    pub(crate) fn node(&self) -> &NodeId {
        &self.node
    }

    /// Sends the next piece (never the last message: that is [`PeerWrite::finish`]'s). A
    /// peer that takes no piece for the stream idle timeout, or whose call ended, is an
    /// error; the write is then abandoned (drop it).
    pub(crate) async fn send(&mut self, data: Vec<u8>) -> Result<(), PeerError> {
        if self.held {
            return Ok(());
        }
        let len = data.len() as u64;
        let message = self.message(data, false);
        self.deliver(message).await?;
        self.sent += len;
        Ok(())
    }

    /// Ends the write with `finish_write` and waits for the peer's answer: whether it stored
    /// the whole blob (it checks the digest itself) or held it already.
    pub(crate) async fn finish(mut self) -> Result<Finished, PeerError> {
        if self.held {
            return Ok(Finished::AlreadyHeld);
        }
        let message = self.message(Vec::new(), true);
        self.deliver(message).await?;
        if self.held {
            return Ok(Finished::AlreadyHeld);
        }
        let committed = self.answer().await?;
        Ok(
            if u64::try_from(committed).ok() == Some(self.digest.size()) {
                Finished::Stored
            } else {
                Finished::Refused
            },
        )
    }

    /// The peer's answer to the call (`committed_size`), waited for at most the call timeout.
    async fn answer(&mut self) -> Result<i64, PeerError> {
        let timeout = self.config.call_timeout;
        match tokio::time::timeout(timeout, &mut self.task).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) | Err(_) => Err(PeerError::Timeout {
                node: self.node.clone(),
                timeout,
            }),
        }
    }

    fn message(&mut self, data: Vec<u8>, finish_write: bool) -> WriteRequest {
        let first = !std::mem::replace(&mut self.named, true);
        WriteRequest {
            resource_name: if first {
                format!("uploads/{}/blobs/{}", uuid::Uuid::new_v4(), self.digest)
            } else {
                String::new()
            },
            write_offset: i64::try_from(self.sent).unwrap_or(i64::MAX),
            finish_write,
            data,
        }
    }

    async fn deliver(&mut self, message: WriteRequest) -> Result<(), PeerError> {
        let timeout = self.config.stream_idle_timeout;
        match tokio::time::timeout(timeout, self.sender.send(message)).await {
            Ok(Ok(())) => Ok(()),
            // The call ended: its answer says why (the peer may hold the blob already).
            Ok(Err(_)) => match self.answer().await? {
                committed if u64::try_from(committed).ok() == Some(self.digest.size()) => {
                    self.held = true;
                    Ok(())
                }
                _ => Err(PeerError::Status {
                    node: self.node.clone(),
                    code: Code::Aborted,
                    message: format!("the write of blob {} ended early", self.digest),
                }),
            },
            Err(_) => Err(PeerError::Timeout {
                node: self.node.clone(),
                timeout,
            }),
        }
    }
}

/// How a [`PeerWrite`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finished {
    /// The peer stored the blob it was sent.
    Stored,
    /// The peer held the blob already and ended the write early.
    AlreadyHeld,
    /// The peer answered without storing the whole blob.
    Refused,
}

impl Drop for PeerWrite {
    fn drop(&mut self) {
        // Unfinished: the call is cancelled (a no-op once it has ended).
        self.task.abort();
    }
}

/// The messages of `receiver` as a stream (a request stream for a client-streaming call).
fn tokio_stream_of<T: Send + 'static>(
    mut receiver: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

/// `digests` grouped by hash function, in the order the functions first appear: every call to
/// a peer names one function (`digest_function`).
fn by_function(digests: &[Digest]) -> Vec<(DigestFunction, Vec<Digest>)> {
    let mut groups: Vec<(DigestFunction, Vec<Digest>)> = Vec::new();
    for digest in digests {
        match groups.iter_mut().find(|(f, _)| *f == digest.function()) {
            Some((_, group)) => group.push(*digest),
            None => groups.push((digest.function(), vec![*digest])),
        }
    }
    groups
}

/// Groups small blobs into batches whose total stays within [`MAX_BATCH_TOTAL_SIZE`].
fn batches(digests: &[Digest]) -> Vec<Vec<Digest>> {
    let mut batches = Vec::new();
    let mut current = Vec::new();
    let mut total = 0u64;
    for digest in digests {
        if !current.is_empty() && total + digest.size() > MAX_BATCH_TOTAL_SIZE {
            batches.push(std::mem::take(&mut current));
            total = 0;
        }
        total += digest.size();
        current.push(*digest);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_the_limit() {
        let digests: Vec<Digest> = (0..10u8)
            .map(|i| Digest::new([i; 32], BATCHED_BLOB_MAX))
            .collect();
        let batches = batches(&digests);
        assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 10);
        for batch in &batches {
            let total: u64 = batch.iter().map(Digest::size).sum();
            assert!(total <= MAX_BATCH_TOTAL_SIZE, "{total}");
        }
        assert_eq!(batches.len(), 4, "three 1 MiB blobs per batch");
    }
}
