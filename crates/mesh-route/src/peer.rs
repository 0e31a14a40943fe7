//! A peer as the router addresses it, a call made to one, and what a failed call to a peer
//! means.
//!
//! A [`PeerTarget`] is one *life* of a peer: its node id, the endpoint it gossips and its
//! identity generation. A peer that restarts is a new target, so its channel and the calls
//! counted against it start over.
//!
//! How a call to a peer failed decides what may happen next:
//!
//! * it never reached the peer ([`failed_before_accept`]: refused, timed out, TLS handshake
//!   failed, this node's client certificate refused, see [`crate::tls`]) — the peer never saw
//!   the call, so it is safe to send it elsewhere;
//! * the connection broke once the peer had it, or the peer died while its response was
//!   relayed — the client sees `UNAVAILABLE`, the code gRPC
//!   clients retry on, and only a call known to be idempotent may be sent again.

use std::error::Error as _;

use mesh_core::{Member, NodeId, NodeState};
use tonic::{
    Request, Status, metadata::MetadataMap, service::interceptor::InterceptedService,
    transport::Channel,
};

use crate::headers::{ForwardedBy, propagated};

/// A peer life to forward to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTarget {
    node_id: NodeId,
    endpoint: String,
    generation: u64,
}

impl PeerTarget {
    pub(crate) fn new(node_id: NodeId, endpoint: String, generation: u64) -> Self {
        Self {
            node_id,
            endpoint,
            generation,
        }
    }

    pub(crate) fn from_member(member: &Member, state: &NodeState) -> Option<Self> {
        Some(Self::new(
            member.node_id().clone(),
            state.grpc_endpoint.clone()?,
            member.identity().generation(),
        ))
    }

    /// The peer's node id.
    pub fn node_id(&self) -> &NodeId {
        &self.node_id
    }

    /// Its gRPC endpoint.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Its identity generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

/// The channel type calls to a peer go through: it stamps
/// [`FORWARDED_BY`](crate::FORWARDED_BY) and the cluster's credential.
pub type ForwardChannel = InterceptedService<Channel, ForwardedBy>;

/// Everything needed to make one call to one peer ([`Router::peer`](crate::Router::peer)).
#[derive(Debug, Clone)]
pub struct PeerCall {
    target: PeerTarget,
    channel: ForwardChannel,
    metadata: MetadataMap,
}

impl PeerCall {
    /// A call to `target` over `channel`, stamped by `stamp`, carrying what of the caller's
    /// `metadata` travels with a call.
    pub(crate) fn new(
        target: PeerTarget,
        channel: Channel,
        stamp: ForwardedBy,
        metadata: &MetadataMap,
    ) -> Self {
        Self {
            target,
            channel: InterceptedService::new(channel, stamp),
            metadata: propagated(metadata),
        }
    }

    /// The peer.
    pub fn target(&self) -> &PeerTarget {
        &self.target
    }

    /// A channel to the peer that stamps [`FORWARDED_BY`](crate::FORWARDED_BY); give it to a
    /// generated client.
    pub fn channel(&self) -> ForwardChannel {
        self.channel.clone()
    }

    /// Wraps `message` in a request carrying the caller's metadata.
    pub fn request<T>(&self, message: T) -> Request<T> {
        Request::from_parts(self.metadata.clone(), Default::default(), message)
    }
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

/// The status of a call whose peer failed or left while its response was relayed.
pub(crate) fn peer_lost(node: &NodeId) -> Status {
    Status::unavailable(format!(
        "node {node} failed while relaying its response; the operation is lost with it, retry"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

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
