//! Calls from this replica to one peer: what it has, its blobs, its action results.
//!
//! Every call goes through [`mesh_route::Router::peer`], whose channel stamps
//! `x-mesh-forwarded-by`, so the peer answers from its own stores and never asks further
//! (one hop, no loops). Each call has a deadline ([`PeerConfig`]): a peer that hangs costs a
//! bounded wait, never a hang, and its silence counts as "does not have it".

use std::time::Duration;

use bazel_remote_apis::{
    build::bazel::remote::execution::v2::{
        ActionResult, BatchReadBlobsRequest, FindMissingBlobsRequest, GetActionResultRequest,
        action_cache_client::ActionCacheClient,
        content_addressable_storage_client::ContentAddressableStorageClient,
    },
    google::bytestream::{ReadRequest, byte_stream_client::ByteStreamClient},
};
use mesh_core::NodeId;
use mesh_route::{PeerCall, RouteError, Router};
use tonic::{Code, metadata::MetadataMap};

use crate::{BlobWriter, CasError, Digest};

/// The largest total of blob bytes asked for in one `BatchReadBlobs` to a peer, and the limit
/// this server advertises for batches: 4 MiB minus room for the message framing, so a whole
/// batch answer stays under the 4 MiB message limit of common clients.
pub const MAX_BATCH_TOTAL_SIZE: u64 = 4 * 1024 * 1024 - 64 * 1024;

/// Blobs up to this size are fetched from peers in batches; larger ones are streamed.
const BATCHED_BLOB_MAX: u64 = 1024 * 1024;

/// Digests per `FindMissingBlobs` sent to a peer (keeps each request far below 4 MiB).
const FIND_MISSING_CHUNK: usize = 8192;

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

    /// Which of `digests` the peer has.
    pub(crate) async fn has(
        &self,
        node: &NodeId,
        digests: &[Digest],
    ) -> Result<Vec<Digest>, PeerError> {
        let mut present = Vec::new();
        for chunk in digests.chunks(FIND_MISSING_CHUNK) {
            let call = self.call(node)?;
            let mut client = ContentAddressableStorageClient::new(call.channel());
            let request = call.request(FindMissingBlobsRequest {
                instance_name: String::new(),
                blob_digests: chunk.iter().map(Digest::to_proto).collect(),
                digest_function: 0,
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
                .filter_map(|d| Digest::from_proto(d, "missing_blob_digests").ok())
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
        for batch in batches(&small) {
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
        let request = call.request(BatchReadBlobsRequest {
            instance_name: String::new(),
            digests: digests.iter().map(Digest::to_proto).collect(),
            acceptable_compressors: Vec::new(),
            digest_function: 0,
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
                .and_then(|d| Digest::from_proto(d, "digest").ok())
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
        let mut writer: BlobWriter = cas.writer(digest).map_err(store_error)?;
        let call = self.call(node)?;
        let mut client = ByteStreamClient::new(call.channel());
        let request = call.request(ReadRequest {
            resource_name: format!("blobs/{digest}"),
            read_offset: 0,
            read_limit: 0,
        });
        let mut stream = match self
            .bounded(node, self.config.call_timeout, client.read(request))
            .await
        {
            Ok(response) => response.into_inner(),
            Err(PeerError::Status {
                code: Code::NotFound,
                ..
            }) => return Ok(false),
            Err(error) => return Err(error),
        };
        loop {
            let message = self
                .bounded(node, self.config.stream_idle_timeout, stream.message())
                .await;
            match message {
                Ok(Some(chunk)) => writer.write(&chunk.data).await.map_err(store_error)?,
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
            digest_function: 0,
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
