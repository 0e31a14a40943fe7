//! Forwarding calls to peers: one hop, metadata and deadlines propagated, retried on another
//! node only when the chosen peer could not even be connected to.
//!
//! * A client interceptor stamps `x-mesh-forwarded-by: <node>` on every forwarded call. A node
//!   that receives a call carrying it always runs the call itself ([`forwarded_by`]), so a call
//!   crosses at most one hop and can never loop, whatever the nodes' views.
//! * The caller's metadata (authorization, `grpc-timeout`, custom headers) travels with the
//!   call; transport headers that belong to one connection do not.
//! * If connecting to the chosen peer fails — refused, timed out, TLS handshake failed, this
//!   node's client certificate refused (see [`crate::tls`]) — the peer never saw the call, so it
//!   is safe to choose again (that peer excluded) or run locally. Once the peer answered, a
//!   failure is the client's to see: the call is never sent twice.
//! * Server-streaming responses are relayed; if the peer fails mid-stream, the relay ends with
//!   `UNAVAILABLE` as soon as the failure detector says so, instead of hanging.

use std::{error::Error as _, future::Future};

use futures::Stream;
use mesh_core::NodeId;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Request, Response, Status, Streaming,
    metadata::{AsciiMetadataValue, MetadataMap},
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

use crate::{OperationId, PeerTarget, Route, RouteError, RouteRequest, Router};

/// The header that marks a forwarded call, carrying the forwarding node's id.
pub const FORWARDED_BY: &str = "x-mesh-forwarded-by";

/// The response header by which a node that took a forwarded call says from which version of
/// its gossiped state the call is counted, as `{generation}:{version}` (see
/// `mesh_core::Membership::version_counting_current_load`). The forwarding router counts the
/// call against the node until that version arrives, and removes the header before relaying
/// the response. The route layer sets it on the calls it serves for a peer.
pub const COUNTED_FROM: &str = "x-mesh-counted-from";

/// The `(generation, version)` a [`COUNTED_FROM`] header carries, if it is there and well formed.
pub(crate) fn counted_from(headers: &http::HeaderMap) -> Option<(u64, u64)> {
    let text = headers.get(COUNTED_FROM)?.to_str().ok()?;
    let (generation, version) = text.split_once(':')?;
    Some((generation.parse().ok()?, version.parse().ok()?))
}

/// Headers that describe one HTTP/2 connection or one encoding, not the call: never copied.
const HOP_BY_HOP: [&str; 9] = [
    "te",
    "content-type",
    "content-length",
    "user-agent",
    "host",
    "connection",
    "grpc-encoding",
    "grpc-accept-encoding",
    FORWARDED_BY,
];

/// The node a call was forwarded by, if it was. Such a call must run locally.
pub fn forwarded_by(metadata: &MetadataMap) -> Option<NodeId> {
    metadata
        .get(FORWARDED_BY)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| NodeId::new(value).ok())
}

/// Client interceptor stamping [`FORWARDED_BY`] (and the cluster's
/// [`PeerCredential`](crate::PeerCredential), when the channels have one).
#[derive(Debug, Clone)]
pub struct ForwardedBy {
    value: AsciiMetadataValue,
    credential: Option<crate::PeerCredential>,
}

impl ForwardedBy {
    /// Stamps calls with `node`.
    pub fn new(node: &NodeId) -> Self {
        // A node id is `[A-Za-z0-9._-]`, always a valid header value.
        let value = AsciiMetadataValue::try_from(node.as_str())
            .unwrap_or_else(|_| AsciiMetadataValue::from_static("invalid"));
        Self {
            value,
            credential: None,
        }
    }

    /// Also stamps calls with `credential`.
    pub(crate) fn with_credential(mut self, credential: Option<crate::PeerCredential>) -> Self {
        self.credential = credential;
        self
    }

    /// Stamps an outgoing request's headers: [`FORWARDED_BY`] and the credential.
    pub(crate) fn stamp(&self, headers: &mut http::HeaderMap) {
        headers.insert(FORWARDED_BY, self.header());
        if let Some(credential) = &self.credential {
            credential.stamp(headers);
        }
    }
}

impl ForwardedBy {
    /// The header value: this node's id.
    pub(crate) fn header(&self) -> http::HeaderValue {
        // A node id is `[A-Za-z0-9._-]`, always a valid header value.
        http::HeaderValue::from_str(self.value.to_str().unwrap_or("invalid"))
            .unwrap_or_else(|_| http::HeaderValue::from_static("invalid"))
    }
}

impl Interceptor for ForwardedBy {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert(FORWARDED_BY, self.value.clone());
        if let Some(credential) = &self.credential {
            let mut headers = std::mem::take(request.metadata_mut()).into_headers();
            credential.stamp(&mut headers);
            *request.metadata_mut() = MetadataMap::from_headers(headers);
        }
        Ok(request)
    }
}

/// The channel type forwarded calls go through.
pub type ForwardChannel = InterceptedService<Channel, ForwardedBy>;

/// Everything needed to make one forwarded call to one peer.
#[derive(Debug, Clone)]
pub struct PeerCall {
    target: PeerTarget,
    channel: ForwardChannel,
    metadata: MetadataMap,
}

impl PeerCall {
    /// The peer.
    pub fn target(&self) -> &PeerTarget {
        &self.target
    }

    /// A channel to the peer that stamps [`FORWARDED_BY`]; give it to a generated client.
    pub fn channel(&self) -> ForwardChannel {
        self.channel.clone()
    }

    /// Wraps `message` in a request carrying the caller's metadata.
    pub fn request<T>(&self, message: T) -> Request<T> {
        Request::from_parts(self.metadata.clone(), Default::default(), message)
    }
}

/// The outcome of [`Router::forward`].
#[derive(Debug)]
pub enum Forwarded<R> {
    /// Run the call here.
    Local,
    /// A peer accepted the call; relay its response.
    Remote {
        /// The peer that accepted it.
        node: NodeId,
        /// Its response.
        response: Response<R>,
    },
}

/// Whether a failed call provably never reached the peer (so retrying elsewhere is safe):
/// only connection failures qualify, which with TLS include a failed handshake and the peer
/// refusing this node's client certificate.
pub fn failed_before_accept(status: &Status) -> bool {
    status.source().is_some_and(never_reached)
}

/// Whether `error`, or anything that caused it, is a failure to connect.
pub(crate) fn never_reached(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error.is::<tonic::ConnectError>() {
            return true;
        }
        cause = error.source();
    }
    false
}

/// The caller's metadata with its [`REQUEST_ID`](crate::layer::REQUEST_ID), a new one if it
/// had none, recorded in the current span.
fn with_request_id(metadata: &MetadataMap) -> MetadataMap {
    let mut metadata = metadata.clone();
    let id = match metadata
        .get(crate::layer::REQUEST_ID)
        .and_then(|id| id.to_str().ok())
    {
        Some(id) => id.to_owned(),
        None => {
            let id = uuid::Uuid::now_v7().to_string();
            if let Ok(value) = AsciiMetadataValue::try_from(id.as_str()) {
                metadata.insert(crate::layer::REQUEST_ID, value);
            }
            id
        }
    };
    tracing::Span::current().record("request_id", tracing::field::display(&id));
    metadata
}

fn propagated(metadata: &MetadataMap) -> MetadataMap {
    let mut headers = metadata.clone().into_headers();
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    MetadataMap::from_headers(headers)
}

impl Router {
    fn peer_call(
        &self,
        target: &PeerTarget,
        metadata: &MetadataMap,
    ) -> Result<PeerCall, RouteError> {
        let channel = self.inner.channels.get(target)?;
        Ok(PeerCall {
            target: target.clone(),
            channel: InterceptedService::new(channel, self.inner.forwarded_by.clone()),
            metadata: propagated(metadata),
        })
    }

    /// A call to one chosen peer, for the embedder's own peer-to-peer requests (fetching a
    /// blob from the replica that holds it, asking a peer what it has). The channel stamps
    /// [`FORWARDED_BY`], so the peer answers from what it has itself and never passes the call
    /// on; `metadata` is propagated like a forwarded call's.
    ///
    /// Fails with [`RouteError::NotAPeer`] when `node` is this node or not a live member, and
    /// with [`RouteError::OwnerUnreachable`] when it has no usable gRPC endpoint yet.
    pub fn peer(&self, node: &NodeId, metadata: &MetadataMap) -> Result<PeerCall, RouteError> {
        let target = self.peer_target(node)?;
        self.peer_call(&target, metadata)
    }

    /// Routes a call and, if a peer should run it, makes it there with `call`.
    ///
    /// Returns [`Forwarded::Local`] when the call should run here: because this node was
    /// chosen, because the call was already forwarded once (it carries [`FORWARDED_BY`]), or
    /// because every chosen peer was unreachable and this node can take it. `call` may be
    /// invoked several times, on different peers, but only when the previous peer could not be
    /// connected to. Under [`crate::WhenFull::Wait`] the call first waits for a free slot.
    ///
    /// ```no_run
    /// # use mesh_route::{Forwarded, RouteRequest, Router};
    /// # async fn demo(router: Router, request: tonic::Request<String>) -> Result<(), tonic::Status> {
    /// let route = RouteRequest::new();
    /// match router.forward(&route, request.metadata(), |peer| async move {
    ///     // e.g. ExecutionClient::new(peer.channel()).execute(peer.request(message)).await
    ///     Ok::<_, tonic::Status>(tonic::Response::new(()))
    /// }).await? {
    ///     Forwarded::Local => { /* execute here */ }
    ///     Forwarded::Remote { node, response } => { /* relay response from node */ }
    /// }
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(
        name = "forward",
        skip_all,
        fields(node = %self.inner.membership.node_id(), request_id, peer)
    )]
    pub async fn forward<R, F, Fut>(
        &self,
        request: &RouteRequest,
        metadata: &MetadataMap,
        mut call: F,
    ) -> Result<Forwarded<R>, Status>
    where
        F: FnMut(PeerCall) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        if forwarded_by(metadata).is_some() {
            return Ok(Forwarded::Local);
        }
        let metadata = &with_request_id(metadata);
        let mut unreachable: Vec<NodeId> = Vec::new();
        loop {
            let placement = self.route_when_available(request, &unreachable).await?;
            let target = match placement.route() {
                Route::Local => return Ok(Forwarded::Local),
                Route::Peer(target) => target.clone(),
            };
            let peer = match self.peer_call(&target, metadata) {
                Ok(peer) => peer,
                Err(error) => {
                    tracing::warn!(%error, "skipping a peer with an unusable endpoint");
                    self.unrecord_forward(&target);
                    unreachable.push(target.node_id().clone());
                    continue;
                }
            };
            metrics::counter!("mesh_route_forwarded_total").increment(1);
            tracing::Span::current().record("peer", tracing::field::display(target.node_id()));
            tracing::debug!(endpoint = target.endpoint(), "forwarding the call");
            match call(peer).await {
                Ok(mut response) => {
                    let stamp = counted_from(response.metadata().as_ref());
                    response.metadata_mut().remove(COUNTED_FROM);
                    self.forward_answered(&target, stamp);
                    return Ok(Forwarded::Remote {
                        node: target.node_id().clone(),
                        response,
                    });
                }
                Err(status) if failed_before_accept(&status) => {
                    self.unrecord_forward(&target);
                    metrics::counter!("mesh_route_retries_total").increment(1);
                    tracing::warn!(
                        peer = %target.node_id(),
                        endpoint = target.endpoint(),
                        error = %status.message(),
                        "peer unreachable; choosing again"
                    );
                    unreachable.push(target.node_id().clone());
                }
                Err(status) => {
                    self.forward_answered(&target, None);
                    return Err(lost_connection(target.node_id(), status));
                }
            }
        }
    }

    /// Sends a call about an existing operation to the node that owns it.
    ///
    /// [`Forwarded::Local`] when this node owns it (or the call was already forwarded);
    /// `NOT_FOUND` when the owner is not a member; `UNAVAILABLE` when it cannot be reached.
    #[tracing::instrument(
        name = "forward",
        skip_all,
        fields(node = %self.inner.membership.node_id(), %operation, request_id, peer)
    )]
    pub async fn forward_to_owner<R, F, Fut>(
        &self,
        operation: &OperationId,
        metadata: &MetadataMap,
        call: F,
    ) -> Result<Forwarded<R>, Status>
    where
        F: FnOnce(PeerCall) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        if forwarded_by(metadata).is_some() {
            return Ok(Forwarded::Local);
        }
        let target = match self.owner(operation)? {
            Route::Local => return Ok(Forwarded::Local),
            Route::Peer(target) => target,
        };
        let metadata = &with_request_id(metadata);
        tracing::Span::current().record("peer", tracing::field::display(target.node_id()));
        tracing::debug!(
            endpoint = target.endpoint(),
            "forwarding the call to its owner"
        );
        let peer = self.peer_call(&target, metadata)?;
        match call(peer).await {
            Ok(response) => Ok(Forwarded::Remote {
                node: target.node_id().clone(),
                response,
            }),
            Err(status) if failed_before_accept(&status) => Err(RouteError::OwnerUnreachable {
                node: target.node_id().clone(),
                endpoint: target.endpoint().to_owned(),
                message: status.message().to_owned(),
            }
            .into()),
            Err(status) => Err(lost_connection(target.node_id(), status)),
        }
    }

    /// Relays a peer's response stream, ending it with `UNAVAILABLE` if the peer fails or
    /// leaves before the stream ends. Dropping the returned stream cancels the upstream call.
    pub fn relay<T: Send + 'static>(
        &self,
        node: NodeId,
        mut upstream: Streaming<T>,
    ) -> impl Stream<Item = Result<T, Status>> + Send + 'static {
        let (tx, rx) = mpsc::channel(16);
        // The peer may have gone between the call and now.
        let departed = self
            .inner
            .membership
            .view()
            .get(node.as_str())
            .and_then(|peer| {
                self.inner
                    .departures
                    .watch(&node, peer.identity().generation())
            });
        tokio::spawn(async move {
            let Some(mut departed) = departed else {
                let _ = tx.send(Err(peer_lost(&node))).await;
                return;
            };
            loop {
                tokio::select! {
                    message = upstream.message() => match message {
                        Ok(Some(message)) => {
                            if tx.send(Ok(message)).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => return,
                        Err(status) => {
                            let _ = tx.send(Err(lost_connection(&node, status))).await;
                            return;
                        }
                    },
                    // Only the end of the peer's life is ever signalled.
                    _ = departed.changed() => {
                        let _ = tx.send(Err(peer_lost(&node))).await;
                        return;
                    }
                    () = tx.closed() => return,
                }
            }
        });
        ReceiverStream::new(rx)
    }
}

/// A status the peer sent is passed on as it is. One that our own transport produced (the
/// connection broke, was reset or cancelled under the call) says so as `UNAVAILABLE`, the code
/// clients retry on, instead of leaking `CANCELLED` or `UNKNOWN` from HTTP/2 internals.
pub(crate) fn lost_connection(node: &NodeId, status: Status) -> Status {
    if status.source().is_none() {
        return status;
    }
    Status::unavailable(format!(
        "the connection to node {node} broke during the call: {}",
        status.message()
    ))
}

pub(crate) fn peer_lost(node: &NodeId) -> Status {
    Status::unavailable(format!(
        "node {node} failed while relaying its response; the operation is lost with it, retry"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_by_is_read_back() {
        let mut metadata = MetadataMap::new();
        assert_eq!(forwarded_by(&metadata), None);
        let mut request = Request::new(());
        ForwardedBy::new(&NodeId::new("node-3").unwrap())
            .call(Request::new(()))
            .map(|r| *request.metadata_mut() = r.metadata().clone())
            .unwrap();
        assert_eq!(forwarded_by(request.metadata()).unwrap().as_str(), "node-3");
        metadata.insert(FORWARDED_BY, AsciiMetadataValue::from_static("bad:id"));
        assert_eq!(forwarded_by(&metadata), None, "invalid ids are ignored");
    }

    #[test]
    fn propagation_keeps_call_metadata_and_drops_transport_headers() {
        let mut metadata = MetadataMap::new();
        metadata.insert("authorization", "Bearer t".parse().unwrap());
        metadata.insert("grpc-timeout", "5S".parse().unwrap());
        metadata.insert("x-request-id", "abc".parse().unwrap());
        metadata.insert("grpc-encoding", "gzip".parse().unwrap());
        metadata.insert("content-type", "application/grpc".parse().unwrap());
        metadata.insert(FORWARDED_BY, "evil".parse().unwrap());
        let out = propagated(&metadata);
        assert_eq!(out.get("authorization").unwrap(), "Bearer t");
        assert_eq!(out.get("grpc-timeout").unwrap(), "5S");
        assert_eq!(out.get("x-request-id").unwrap(), "abc");
        assert!(out.get("grpc-encoding").is_none());
        assert!(out.get("content-type").is_none());
        assert!(out.get(FORWARDED_BY).is_none());
    }

    #[test]
    fn transport_failures_become_unavailable_but_peer_statuses_pass_through() {
        let node = NodeId::new("b").unwrap();
        let sent_by_peer = Status::not_found("no such operation");
        assert_eq!(
            lost_connection(&node, sent_by_peer).code(),
            tonic::Code::NotFound
        );
        let reset = Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        )));
        let mapped = lost_connection(&node, reset);
        assert_eq!(mapped.code(), tonic::Code::Unavailable);
        assert!(mapped.message().contains("node b"), "{}", mapped.message());
    }

    #[test]
    fn a_forwarded_call_keeps_its_request_id_or_gets_one() {
        let mut metadata = MetadataMap::new();
        metadata.insert(crate::layer::REQUEST_ID, "req-7".parse().unwrap());
        let kept = with_request_id(&metadata);
        assert_eq!(kept.get(crate::layer::REQUEST_ID).unwrap(), "req-7");
        let fresh = with_request_id(&MetadataMap::new());
        let id = fresh
            .get(crate::layer::REQUEST_ID)
            .unwrap()
            .to_str()
            .unwrap();
        assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 7);
        // A forwarded call carries it: it is not hop-by-hop.
        assert_eq!(
            propagated(&fresh).get(crate::layer::REQUEST_ID),
            fresh.get(crate::layer::REQUEST_ID)
        );
    }

    #[test]
    fn only_connection_failures_allow_a_retry() {
        assert!(!failed_before_accept(&Status::unavailable("peer said so")));
        assert!(!failed_before_accept(&Status::internal("boom")));
        let connect = tonic::ConnectError(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        )));
        let status = Status::from_error(Box::new(connect));
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(failed_before_accept(&status));
    }
}
