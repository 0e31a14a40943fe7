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

use std::future::Future;

use futures::Stream;
use mesh_core::NodeId;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Response, Status, Streaming,
    metadata::{AsciiMetadataValue, MetadataMap},
};

use crate::{
    OperationId, Route, RouteError, RouteRequest, Router,
    headers::{COUNTED_FROM, REQUEST_ID, counted_from, forwarded_by},
    peer::{PeerCall, PeerTarget, failed_before_accept, lost_connection, peer_lost},
};

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

/// The caller's metadata with its [`REQUEST_ID`], a new one if it
/// had none, recorded in the current span.
fn with_request_id(metadata: &MetadataMap) -> MetadataMap {
    let mut metadata = metadata.clone();
    let id = match metadata.get(REQUEST_ID).and_then(|id| id.to_str().ok()) {
        Some(id) => id.to_owned(),
        None => {
            let id = uuid::Uuid::now_v7().to_string();
            if let Ok(value) = AsciiMetadataValue::try_from(id.as_str()) {
                metadata.insert(REQUEST_ID, value);
            }
            id
        }
    };
    tracing::Span::current().record("request_id", tracing::field::display(&id));
    metadata
}

impl Router {
    fn peer_call(
        &self,
        target: &PeerTarget,
        metadata: &MetadataMap,
    ) -> Result<PeerCall, RouteError> {
        let channel = self.inner.channels.get(target)?;
        Ok(PeerCall::new(
            target.clone(),
            channel,
            self.inner.forwarded_by.clone(),
            metadata,
        ))
    }

    /// A call to one chosen peer, for the embedder's own peer-to-peer requests (fetching a
    /// blob from the replica that holds it, asking a peer what it has). The channel stamps
    /// [`FORWARDED_BY`](crate::FORWARDED_BY), so the peer answers from what it has itself and
    /// never passes the call on; `metadata` is propagated like a forwarded call's.
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
    /// chosen, because the call was already forwarded once (it carries
    /// [`FORWARDED_BY`](crate::FORWARDED_BY)), or because every chosen peer was unreachable and
    /// this node can take it. `call` may be
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::propagated;

    #[test]
    fn a_forwarded_call_keeps_its_request_id_or_gets_one() {
        let mut metadata = MetadataMap::new();
        metadata.insert(REQUEST_ID, "req-7".parse().unwrap());
        let kept = with_request_id(&metadata);
        assert_eq!(kept.get(REQUEST_ID).unwrap(), "req-7");
        let fresh = with_request_id(&MetadataMap::new());
        let id = fresh.get(REQUEST_ID).unwrap().to_str().unwrap();
        assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 7);
        // A forwarded call carries it: it is not hop-by-hop.
        assert_eq!(propagated(&fresh).get(REQUEST_ID), fresh.get(REQUEST_ID));
    }
}
