//! `build.bazel.remote.execution.v2.ContentAddressableStorage`: a thin adapter onto
//! [`ClusterCas`].
//!
//! * `FindMissingBlobs` answers for the whole cluster: what this replica lacks is looked up on
//!   the digests' owners (one batched call per owner, in parallel; see [`crate::cluster`]), so
//!   a blob any replica acknowledged is never reported missing through another — what Bazel's
//!   Build without the Bytes relies on. Peers use the same call, marked as theirs, to ask what
//!   this replica holds itself.
//! * `BatchUpdateBlobs` / `BatchReadBlobs` enforce [`MAX_BATCH_TOTAL_SIZE`] on the whole batch
//!   (`INVALID_ARGUMENT` naming the limit) and report each blob's own status; stored blobs are
//!   copied to their owners before the batch is answered, and a read of a blob this replica
//!   lacks fetches it from a peer first (unless the call came from a peer).
//! * `GetTree` walks the tree breadth first and streams it in pages; directories missing
//!   everywhere are left out (REAPI: "the server will return the portion present").
//! * Blob splitting and splicing (v2.12+) are not offered (`split_blob_support = false`) and
//!   answer `UNIMPLEMENTED`.

use std::{collections::HashSet, pin::Pin};

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    BatchReadBlobsRequest, BatchReadBlobsResponse, BatchUpdateBlobsRequest,
    BatchUpdateBlobsResponse, Directory, FindMissingBlobsRequest, FindMissingBlobsResponse,
    GetChunkMappingRequest, GetChunkMappingResponse, GetTreeRequest, GetTreeResponse,
    RegisterChunkMappingRequest, RegisterChunkMappingResponse, SpliceBlobRequest,
    SpliceBlobResponse, SplitBlobRequest, SplitBlobResponse, batch_read_blobs_response,
    batch_update_blobs_response, compressor,
    content_addressable_storage_server::{
        ContentAddressableStorage, ContentAddressableStorageServer,
    },
};
use bytes::Bytes;
use futures::Stream;
use prost::Message as _;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::{
    ClusterCas, ClusterError, Digest, DigestFunction, Fetch, compression,
    error::{invalid, rpc_status},
    peers::MAX_BATCH_TOTAL_SIZE,
};

/// Directories per `GetTree` page when the client does not say.
const DEFAULT_TREE_PAGE: usize = 1000;
/// Encoded bytes per `GetTree` response, far below the 4 MiB message limit.
const TREE_PAGE_BYTES: usize = 2 * 1024 * 1024;

/// The `ContentAddressableStorage` service.
#[derive(Debug, Clone)]
pub struct CasService {
    cluster: ClusterCas,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl CasService {
    /// The service over `cluster`.
    pub fn new(cluster: ClusterCas) -> Self {
        Self { cluster }
    }

    /// The tonic service; it accepts requests up to four times the batch limit so an
    /// oversized batch gets a clear `INVALID_ARGUMENT` instead of a transport error.
    pub fn into_server(self) -> ContentAddressableStorageServer<Self> {
        ContentAddressableStorageServer::new(self)
            .max_decoding_message_size(4 * MAX_BATCH_TOTAL_SIZE as usize)
    }

    /// A blob of a batch read, after the batch's fetch: from the local CAS, which checks it
    /// against its digest. One that was here but is dropped on reading (found corrupt, or
    /// evicted just then) is fetched once more from the cluster (unless `fetch` is local).
    async fn read_local(&self, digest: &Digest, fetch: &Fetch) -> Result<Option<Bytes>, Status> {
        let present = self.cluster.local().contains(digest);
        match self.cluster.local().read(digest).await? {
            Some(data) => Ok(Some(data)),
            None if present && !fetch.is_local() => match self.cluster.read(digest, fetch).await {
                Ok(data) => Ok(Some(data)),
                Err(ClusterError::Missing(_)) => Ok(None),
                Err(error) => Err(error.into()),
            },
            None => Ok(None),
        }
    }
}

fn unimplemented_splitting() -> Status {
    Status::unimplemented(
        "blob splitting and splicing are not offered by this server (Capabilities: split_blob_support = false, splice_blob_support = false)",
    )
}

#[tonic::async_trait]
impl ContentAddressableStorage for CasService {
    async fn find_missing_blobs(
        &self,
        request: Request<FindMissingBlobsRequest>,
    ) -> Result<Response<FindMissingBlobsResponse>, Status> {
        let fetch = Fetch::answering(request.metadata());
        let request = request.into_inner();
        let function = DigestFunction::from_request(request.digest_function)?;
        let digests = request
            .blob_digests
            .iter()
            .map(|d| Digest::from_proto(d, "blob_digests", function))
            .collect::<Result<Vec<_>, _>>()?;
        let missing = self.cluster.find_missing_in_cluster(&digests, &fetch).await;
        Ok(Response::new(FindMissingBlobsResponse {
            missing_blob_digests: missing.iter().map(Digest::to_proto).collect(),
        }))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<BatchUpdateBlobsRequest>,
    ) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
        let fetch = Fetch::answering(request.metadata());
        let request = request.into_inner();
        let function = DigestFunction::from_request(request.digest_function)?;
        let total: u64 = request.requests.iter().map(|r| r.data.len() as u64).sum();
        if total > MAX_BATCH_TOTAL_SIZE {
            return Err(Status::invalid_argument(format!(
                "the batch holds {total} bytes of blobs, over the limit of {MAX_BATCH_TOTAL_SIZE} bytes (Capabilities: max_batch_total_size_bytes); upload large blobs with ByteStream.Write"
            )));
        }
        let mut responses = Vec::with_capacity(request.requests.len());
        for blob in request.requests {
            let prepared = match Digest::from_required(
                blob.digest.as_ref(),
                "requests.digest",
                function,
            ) {
                Err(error) => Err(rpc_status(Code::InvalidArgument, error.to_string())),
                Ok(digest) => match compressor::Value::try_from(blob.compressor) {
                    Ok(compressor::Value::Identity) => Ok((digest, blob.data)),
                    Ok(compressor::Value::Zstd) => {
                        compression::decompress_exact(&blob.data, digest.size())
                            .map(|data| (digest, data))
                            .map_err(|rule| {
                                rpc_status(
                                    Code::InvalidArgument,
                                    format!("zstd-compressed blob {digest}: {rule}"),
                                )
                            })
                    }
                    other => Err(rpc_status(
                        Code::InvalidArgument,
                        format!(
                            "compressor {} is not supported: this server offers zstd (Capabilities: supported_batch_update_compressors)",
                            other
                                .map(|c| c.as_str_name().to_owned())
                                .unwrap_or_else(|_| blob.compressor.to_string())
                        ),
                    )),
                },
            };
            let status = match prepared {
                Err(status) => status,
                Ok((digest, data)) => match self
                    .cluster
                    .local()
                    .put_expecting(digest, data.into())
                    .await
                {
                    Ok(()) => rpc_status(Code::Ok, ""),
                    Err(error) => {
                        let status = Status::from(error);
                        rpc_status(status.code(), status.message())
                    }
                },
            };
            responses.push(batch_update_blobs_response::Response {
                digest: blob.digest,
                status: Some(status),
            });
        }
        if !fetch.is_local() {
            // Answered only once the owners hold what was stored (a peer's push is not
            // passed on).
            let stored: Vec<Digest> = responses
                .iter()
                .filter(|r| r.status.as_ref().is_some_and(|s| s.code == 0))
                .filter_map(|r| r.digest.as_ref())
                .filter_map(|d| Digest::from_proto(d, "digest", function).ok())
                .collect();
            self.cluster.replicate(&stored, fetch.metadata()).await;
        }
        Ok(Response::new(BatchUpdateBlobsResponse { responses }))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> Result<Response<BatchReadBlobsResponse>, Status> {
        let fetch = Fetch::answering(request.metadata());
        let request = request.into_inner();
        let function = DigestFunction::from_request(request.digest_function)?;
        let parsed: Vec<Result<Digest, _>> = request
            .digests
            .iter()
            .map(|d| Digest::from_proto(d, "digests", function))
            .collect();
        let total: u64 = parsed.iter().flatten().map(Digest::size).sum();
        if total > MAX_BATCH_TOTAL_SIZE {
            return Err(Status::invalid_argument(format!(
                "the batch asks for {total} bytes of blobs, over the limit of {MAX_BATCH_TOTAL_SIZE} bytes (Capabilities: max_batch_total_size_bytes); read large blobs with ByteStream.Read"
            )));
        }
        let valid: Vec<Digest> = parsed.iter().flatten().copied().collect();
        // Blobs go back zstd-compressed when the client accepts it.
        let zstd = request
            .acceptable_compressors
            .contains(&(compressor::Value::Zstd as i32));
        // One fetch for the whole batch; what stays missing is reported per blob.
        let _ = self.cluster.ensure_local(&valid, &fetch).await;
        let mut responses = Vec::with_capacity(parsed.len());
        for (proto, digest) in request.digests.into_iter().zip(parsed) {
            let (data, status) = match digest {
                Err(error) => (
                    Vec::new(),
                    rpc_status(Code::InvalidArgument, error.to_string()),
                ),
                Ok(digest) => match self.read_local(&digest, &fetch).await {
                    Ok(Some(data)) if zstd => match compression::compress(&data) {
                        Ok(compressed) => (compressed, rpc_status(Code::Ok, "")),
                        Err(error) => (
                            Vec::new(),
                            rpc_status(Code::Internal, format!("zstd compression failed: {error}")),
                        ),
                    },
                    Ok(Some(data)) => (data.to_vec(), rpc_status(Code::Ok, "")),
                    Ok(None) => (
                        Vec::new(),
                        rpc_status(Code::NotFound, format!("blob {digest} is on no replica")),
                    ),
                    Err(status) => (Vec::new(), rpc_status(status.code(), status.message())),
                },
            };
            let compressor = if zstd && status.code == Code::Ok as i32 {
                compressor::Value::Zstd
            } else {
                compressor::Value::Identity
            };
            responses.push(batch_read_blobs_response::Response {
                digest: Some(proto),
                data,
                compressor: compressor as i32,
                status: Some(status),
            });
        }
        let (blobs, bytes) = responses
            .iter()
            .filter(|r| r.status.as_ref().is_some_and(|s| s.code == Code::Ok as i32))
            .fold((0, 0), |(n, b), r| (n + 1, b + r.data.len() as u64));
        self.cluster.served("BatchReadBlobs", blobs, bytes);
        Ok(Response::new(BatchReadBlobsResponse { responses }))
    }

    type GetTreeStream = BoxStream<GetTreeResponse>;

    async fn get_tree(
        &self,
        request: Request<GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        let fetch = Fetch::answering(request.metadata());
        let request = request.into_inner();
        let function = DigestFunction::from_request(request.digest_function)?;
        let root = Digest::from_required(request.root_digest.as_ref(), "root_digest", function)?;
        let page_size = match usize::try_from(request.page_size) {
            Ok(0) => DEFAULT_TREE_PAGE,
            Ok(size) => size,
            Err(_) => {
                return Err(invalid(format!(
                    "page_size {} must not be negative",
                    request.page_size
                )));
            }
        };
        let offset: usize = if request.page_token.is_empty() {
            0
        } else {
            request.page_token.parse().map_err(|_| {
                invalid(format!(
                    "page_token {:?} is not one this server issued (a decimal offset)",
                    crate::digest::abbreviate(&request.page_token)
                ))
            })?
        };
        // Breadth first, each distinct directory once; missing ones are left out.
        let mut directories: Vec<Directory> = Vec::new();
        let mut seen: HashSet<Digest> = HashSet::from([root]);
        let mut level = vec![root];
        while !level.is_empty() {
            let _ = self.cluster.ensure_local(&level, &fetch).await;
            let mut next = Vec::new();
            for digest in level {
                if digest.size() > crate::cluster::MAX_MESSAGE_SIZE {
                    return Err(ClusterError::MessageTooLarge {
                        digest,
                        kind: "Directory",
                    }
                    .into());
                }
                let Some(bytes) = self.cluster.local().read(&digest).await? else {
                    continue;
                };
                let directory = Directory::decode(bytes).map_err(|e| {
                    invalid(format!(
                        "blob {digest} is not a valid Directory message: {e}"
                    ))
                })?;
                for child in &directory.directories {
                    let child = Digest::from_required(
                        child.digest.as_ref(),
                        "DirectoryNode.digest",
                        root.function(),
                    )?;
                    if seen.insert(child) {
                        next.push(child);
                    }
                }
                directories.push(directory);
            }
            level = next;
        }
        if offset > directories.len() {
            return Err(invalid(format!(
                "page_token {offset} is past the end of the tree ({} directories)",
                directories.len()
            )));
        }
        let mut pages = Vec::new();
        let mut start = offset;
        loop {
            let mut end = start;
            let mut bytes = 0;
            while end < directories.len() && end - start < page_size {
                let size = directories[end].encoded_len();
                if end > start && bytes + size > TREE_PAGE_BYTES {
                    break;
                }
                bytes += size;
                end += 1;
            }
            let next_page_token = if end < directories.len() {
                end.to_string()
            } else {
                String::new()
            };
            pages.push(Ok(GetTreeResponse {
                directories: directories[start..end].to_vec(),
                next_page_token,
            }));
            if end >= directories.len() {
                break;
            }
            start = end;
        }
        Ok(Response::new(Box::pin(futures::stream::iter(pages))))
    }

    async fn split_blob(
        &self,
        _request: Request<SplitBlobRequest>,
    ) -> Result<Response<SplitBlobResponse>, Status> {
        Err(unimplemented_splitting())
    }

    type GetChunkMappingStream = BoxStream<GetChunkMappingResponse>;

    async fn get_chunk_mapping(
        &self,
        _request: Request<GetChunkMappingRequest>,
    ) -> Result<Response<Self::GetChunkMappingStream>, Status> {
        Err(unimplemented_splitting())
    }

    async fn splice_blob(
        &self,
        _request: Request<SpliceBlobRequest>,
    ) -> Result<Response<SpliceBlobResponse>, Status> {
        Err(unimplemented_splitting())
    }

    async fn register_chunk_mapping(
        &self,
        _request: Request<Streaming<RegisterChunkMappingRequest>>,
    ) -> Result<Response<RegisterChunkMappingResponse>, Status> {
        Err(unimplemented_splitting())
    }
}
