//! `google.bytestream.ByteStream` for CAS blobs (REAPI v2 "ByteStream API"): a thin adapter
//! onto [`ClusterCas`].
//!
//! * `Read` of `{instance/}blobs/{hash}/{size}` streams the blob in [`READ_CHUNK`] pieces, so
//!   no response comes near the 4 MiB message limit Bazel enforces. A blob this replica lacks
//!   is fetched from a peer first (and kept), unless the call came from a peer. What is sent
//!   is checked against the digest as it is read ([`crate::BlobReader`]): a blob found corrupt
//!   before anything was sent is dropped and fetched again from a peer; one found corrupt
//!   at its last piece ends the stream with `NOT_FOUND` instead of that piece (it is dropped,
//!   and the next read fetches a good copy). A whole blob over 4 MiB that this replica
//!   lacks is handed on while it is fetched from a peer and stored (`ClusterCas::stream_fetch`),
//!   its last piece only once the whole matched its digest; a peer that fails or lies part-way
//!   ends the stream with `UNAVAILABLE` (nothing of that copy is kept, and the retry reads the
//!   blob fetched whole and checked). A stream that ends without error carried the blob as
//!   its digest names it.
//! * `Write` of `{instance/}uploads/{uuid}/blobs/{hash}/{size}` streams into a temporary file,
//!   checking offsets as it goes; only when `finish_write` arrives and the SHA-256 and size
//!   match is the blob renamed into the CAS; it is answered only once its owners hold it
//!   too. A blob over 1 MiB is passed on to its owners as it arrives (`ClusterCas::tee`:
//!   they hash and store it while this replica does, and get `finish_write` once this
//!   replica has checked it); a smaller one, or one an owner failed to take, is copied after
//!   it is stored ([`ClusterCas::replicate`]). A blob already present ends the
//!   call at once with its full `committed_size` (REAPI allows this; Bazel stops sending). A
//!   write from a peer (a copy being placed) is stored and not passed on.
//! * `QueryWriteStatus`: complete for a blob that is present; otherwise nothing is committed
//!   (partial uploads are not kept, so a client resumes from 0).
//! * Compressed: `compressed-blobs/zstd/…` for either call ([`crate::compression`]). A read
//!   compresses the checked pieces as they leave the store (`read_offset` counts uncompressed
//!   bytes; a `read_limit` is refused, as REAPI says); a write inflates each message into
//!   bounded pieces that go through the same checked writer, and its offsets count the
//!   compressed bytes received. The digest is always that of the uncompressed blob.
//! * BLAKE3: `blobs/blake3/…` (and `compressed-blobs/zstd/blake3/…`) name a BLAKE3 digest,
//!   verified with BLAKE3 ([`crate::DigestFunction`]).

use std::pin::Pin;

use bazel_remote_apis::google::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest,
    WriteResponse,
    byte_stream_server::{ByteStream, ByteStreamServer},
};
use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    BlobReader, BlobWriter, CasError, ClusterCas, Fetch, ResourceName,
    cluster::{STREAMED_FETCH_MIN, StreamedFetch, TEE_MIN, Tee},
    compression::{Deflater, Inflater},
    error::invalid,
    resource::Compressor,
};

/// The size of each `ReadResponse`'s data: 1 MiB, a quarter of the 4 MiB message limit.
pub const READ_CHUNK: usize = 1024 * 1024;

/// The `ByteStream` service.
#[derive(Debug, Clone)]
pub struct ByteStreamService {
    cluster: ClusterCas,
}

impl ByteStreamService {
    /// The service over `cluster`.
    pub fn new(cluster: ClusterCas) -> Self {
        Self { cluster }
    }

    /// The tonic service.
    pub fn into_server(self) -> ByteStreamServer<Self> {
        ByteStreamServer::new(self)
    }
}

type ReadStream = Pin<Box<dyn Stream<Item = Result<ReadResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = ReadStream;

    async fn read(
        &self,
        request: Request<ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let fetch = Fetch::answering(request.metadata());
        let request = request.into_inner();
        let name = ResourceName::parse_read(&request.resource_name)?;
        let digest = name.digest;
        if name.compressor == Compressor::Zstd && request.read_limit != 0 {
            // remote_execution.proto: "Servers MUST return INVALID_ARGUMENT if
            // ReadRequest.read_limit is non-zero" for compressed reads.
            return Err(invalid(format!(
                "read_limit {} must be 0 for a compressed read (read_offset counts uncompressed bytes)",
                request.read_limit
            )));
        }
        // bytestream.proto: a negative offset, like one past the end, is OUT_OF_RANGE.
        let offset = u64::try_from(request.read_offset).map_err(|_| {
            Status::out_of_range(format!(
                "read_offset {} must not be negative",
                request.read_offset
            ))
        })?;
        let limit = u64::try_from(request.read_limit).map_err(|_| {
            invalid(format!(
                "read_limit {} must not be negative (0 means no limit)",
                request.read_limit
            ))
        })?;
        if offset > digest.size() {
            return Err(Status::out_of_range(format!(
                "read_offset {offset} is past the end of blob {digest}"
            )));
        }
        let end = if limit == 0 {
            digest.size()
        } else {
            digest.size().min(offset.saturating_add(limit))
        };
        // A whole large blob this replica lacks: handed on as it is fetched.
        if name.compressor == Compressor::Identity
            && offset == 0
            && end == digest.size()
            && digest.size() > STREAMED_FETCH_MIN
            && let Some(streamed) = self.cluster.stream_fetch(digest, &fetch).await
        {
            self.cluster.served("ByteStream", 1, digest.size());
            return Ok(Response::new(Box::pin(streamed_read(digest, streamed))));
        }
        // A blob dropped on the way (evicted, or found corrupt) is fetched once more.
        let mut attempts = 0;
        loop {
            attempts += 1;
            self.cluster
                .ensure_local(&[digest], &fetch)
                .await
                .map_err(|_| {
                    Status::not_found(format!(
                        "blob {digest} is not in the CAS of {}",
                        if fetch.is_local() {
                            "this replica"
                        } else {
                            "any replica"
                        }
                    ))
                })?;
            let Some(reader) = self.cluster.local().open_reader(&digest).await? else {
                if attempts < 2 {
                    continue;
                }
                return Err(Status::not_found(format!(
                    "blob {digest} was evicted; retry"
                )));
            };
            let mut reader = reader.range(offset, end);
            // The first piece is read before the call is answered, so a blob that fits in
            // one piece and is found corrupt is fetched again instead of failing the call.
            let first = match reader.next_chunk(READ_CHUNK).await {
                Ok(first) => first,
                Err(CasError::Corrupt { .. }) if attempts < 2 => continue,
                Err(error) => return Err(error.into()),
            };
            self.cluster
                .served("ByteStream", 1, end.saturating_sub(offset));
            return Ok(Response::new(match name.compressor {
                Compressor::Zstd => Box::pin(compressed(read_chunks(first, reader))?),
                _ => Box::pin(read_chunks(first, reader)),
            }));
        }
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        let fetch = Fetch::answering(request.metadata());
        let mut stream = request.into_inner();
        let Some(first) = stream.message().await? else {
            return Err(invalid(
                "the write stream is empty; the first message must name the resource",
            ));
        };
        let name = ResourceName::parse_write(&first.resource_name)?;
        let digest = name.digest;
        let committed = |size: u64| {
            Response::new(WriteResponse {
                committed_size: i64::try_from(size).unwrap_or(i64::MAX),
            })
        };
        if self.cluster.local().contains(&digest) {
            if !fetch.is_local() {
                // Held here already (perhaps only as a copy this replica fetched): make sure
                // its owners hold it too before acknowledging (they are asked first).
                self.cluster.replicate(&[digest], fetch.metadata()).await;
            }
            // remote_execution.proto: the full size, or -1 for a compressed upload.
            return Ok(match name.compressor {
                Compressor::Zstd => Response::new(WriteResponse { committed_size: -1 }),
                _ => committed(digest.size()),
            });
        }
        let mut writer = self.cluster.local().writer(digest).await?;
        // A large upload from a client is passed on to its owners as it arrives.
        let mut tee = (!fetch.is_local() && digest.size() > TEE_MIN)
            .then(|| self.cluster.tee(digest, fetch.metadata()));
        // A compressed upload: offsets count the compressed bytes received (after a first
        // offset of 0), and what they inflate to is written, checked against the size as it
        // comes.
        let mut inflater = match name.compressor {
            Compressor::Zstd => Some(
                Inflater::new(digest.size())
                    .map_err(|e| Status::internal(format!("starting a zstd stream: {e}")))?,
            ),
            _ => None,
        };
        let mut received: u64 = 0;
        let mut message = first;
        loop {
            if !message.resource_name.is_empty()
                && ResourceName::parse_write(&message.resource_name)
                    .map(|n| n.digest != digest)
                    .unwrap_or(true)
            {
                return Err(invalid(format!(
                    "resource_name {:?} changed within one write of blob {digest}",
                    crate::digest::abbreviate_long(&message.resource_name)
                )));
            }
            if u64::try_from(message.write_offset).ok() != Some(received) {
                return Err(invalid(format!(
                    "write_offset {} does not follow the {received} bytes received so far for blob {digest}",
                    message.write_offset,
                )));
            }
            received += message.data.len() as u64;
            match inflater.as_mut() {
                None => write_piece(&mut writer, tee.as_mut(), message.data).await?,
                Some(inflater) => {
                    let mut input = &message.data[..];
                    while let Some(piece) = inflater.step(&mut input).map_err(|rule| {
                        invalid(format!("compressed upload of blob {digest}: {rule}"))
                    })? {
                        write_piece(&mut writer, tee.as_mut(), piece.to_vec()).await?;
                    }
                }
            }
            if message.finish_write {
                break;
            }
            message = match stream.message().await? {
                Some(message) => message,
                None => {
                    return Err(invalid(format!(
                        "the write stream of blob {digest} ended after {} of {} bytes without finish_write; nothing was stored",
                        writer.written(),
                        digest.size()
                    )));
                }
            };
        }
        if let Some(inflater) = &inflater {
            inflater
                .finish()
                .map_err(|rule| invalid(format!("compressed upload of blob {digest}: {rule}")))?;
        }
        if writer.written() != digest.size() {
            return Err(invalid(format!(
                "blob {digest} is {} bytes long, but the write finished after {} bytes; nothing was stored",
                digest.size(),
                writer.written()
            )));
        }
        writer.commit().await?;
        if !fetch.is_local() {
            // Acknowledged only once its owners hold it (a peer's push is stored, not passed
            // on): those it was passed on to, or, where that fell short, the usual placement.
            let placed = match tee {
                Some(tee) => tee.finish().await,
                None => false,
            };
            if !placed {
                self.cluster.replicate(&[digest], fetch.metadata()).await;
            }
        }
        Ok(committed(received))
    }

    async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let name = ResourceName::parse_write(&request.get_ref().resource_name)?;
        let complete = self.cluster.local().contains(&name.digest);
        Ok(Response::new(QueryWriteStatusResponse {
            committed_size: if complete {
                i64::try_from(name.digest.size()).unwrap_or(i64::MAX)
            } else {
                0
            },
            complete,
        }))
    }
}

/// The pieces of a blob fetched from a peer for this read, as they arrive; the last comes
/// only once the whole blob matched its digest and is stored.
fn streamed_read(
    digest: crate::Digest,
    streamed: StreamedFetch,
) -> impl Stream<Item = Result<ReadResponse, Status>> + Send {
    futures::stream::unfold(streamed, move |mut streamed| async move {
        let item = match streamed.next().await? {
            Ok(data) => Ok(ReadResponse { data }),
            Err(error) => Err(Status::unavailable(format!(
                "blob {digest} was being fetched from peer {} for this read and the fetch failed part-way: {error}; nothing of that copy was kept, and a retry reads another",
                streamed.peer()
            ))),
        };
        Some((item, streamed))
    })
}

/// Writes one piece of an upload here and passes it on to the owners at the same time.
async fn write_piece(
    writer: &mut BlobWriter,
    tee: Option<&mut Tee>,
    piece: Vec<u8>,
) -> Result<(), CasError> {
    match tee {
        None => writer.write_owned(piece).await,
        Some(tee) => tokio::join!(writer.write_owned(piece.clone()), tee.write(&piece)).0,
    }
}

/// The rest of a blob's range in [`READ_CHUNK`] pieces after `first`. A blob found corrupt
/// on the way ends the stream with `NOT_FOUND` instead of its last piece (it has been dropped;
/// reading it again fetches a good copy), so a stream that ends without an error carried the
/// blob as stored.
fn read_chunks(
    first: Option<Vec<u8>>,
    reader: BlobReader,
) -> impl Stream<Item = Result<ReadResponse, Status>> + Send {
    futures::stream::unfold((first, Some(reader)), move |(pending, reader)| async move {
        if let Some(data) = pending {
            return Some((Ok(ReadResponse { data }), (None, reader)));
        }
        let mut reader = reader?;
        match reader.next_chunk(READ_CHUNK).await {
            Ok(Some(data)) => Some((Ok(ReadResponse { data }), (None, Some(reader)))),
            Ok(None) => None,
            Err(error) => {
                let digest = reader.digest();
                let status = match error {
                    CasError::Corrupt { .. } => Status::not_found(error.to_string()),
                    error => Status::data_loss(format!("blob {digest} could not be read: {error}")),
                };
                Some((Err(status), (None, None)))
            }
        }
    })
}

/// `chunks` (a blob's range as it is read and checked) as one zstd frame. The frame is ended
/// only after the last chunk arrived without error: a stream cut by an error never looks like
/// a complete blob to the client.
fn compressed(
    chunks: impl Stream<Item = Result<ReadResponse, Status>> + Send + 'static,
) -> Result<impl Stream<Item = Result<ReadResponse, Status>> + Send, Status> {
    use futures::StreamExt as _;

    let deflater =
        Deflater::new().map_err(|e| Status::internal(format!("starting a zstd stream: {e}")))?;
    let state = (Box::pin(chunks), Some(deflater));
    Ok(futures::stream::unfold(
        state,
        |(mut chunks, mut deflater)| async move {
            loop {
                let active = deflater.as_mut()?;
                let (data, done) = match chunks.next().await {
                    Some(Ok(chunk)) => (active.compress(&chunk.data), false),
                    Some(Err(status)) => return Some((Err(status), (chunks, None))),
                    None => (active.finish(), true),
                };
                let next = if done { None } else { deflater };
                match data {
                    Ok(data) if data.is_empty() && !done => deflater = next,
                    Ok(data) if data.is_empty() => return None,
                    Ok(data) => return Some((Ok(ReadResponse { data }), (chunks, next))),
                    Err(error) => {
                        let status = Status::internal(format!("zstd compression failed: {error}"));
                        return Some((Err(status), (chunks, None)));
                    }
                }
            }
        },
    ))
}
