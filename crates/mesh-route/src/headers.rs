//! The headers the mesh reads and writes on gRPC calls, and which of a caller's headers travel
//! with a call to a peer.
//!
//! * [`FORWARDED_BY`] marks a call one node sent to another, naming the sender. A node that
//!   receives a call carrying it always runs the call itself ([`forwarded_by`]), so a call
//!   crosses at most one hop and can never loop, whatever the nodes' views.
//! * [`COUNTED_FROM`] is the answer of the node that took a forwarded call: from which version
//!   of its gossiped state the call is counted (optimistic accounting, see
//!   [`Router`](crate::Router)).
//! * [`REQUEST_ID`] names a call across nodes for the logs.
//! * A [`PeerCredential`], when the cluster has one, proves that a call comes from a replica.
//!
//! [`ForwardedBy`] stamps the first and the last on every call this node makes to a peer. The
//! caller's own metadata (authorization, `grpc-timeout`, custom headers) travels with the call;
//! headers that belong to one HTTP/2 connection (RFC 9113, §8.2.2) or one message encoding do
//! not.

use mesh_core::NodeId;
use tonic::{
    Request, Status,
    metadata::{AsciiMetadataValue, MetadataMap},
    service::Interceptor,
};

/// The header that marks a forwarded call, carrying the forwarding node's id.
pub const FORWARDED_BY: &str = "x-mesh-forwarded-by";

/// The response header by which a node that took a forwarded call says from which version of
/// its gossiped state the call is counted, as `{generation}:{version}` (see
/// `mesh_core::Membership::version_counting_current_load`). The forwarding router counts the
/// call against the node until that version arrives, and removes the header before relaying
/// the response. The route layer sets it on the calls it serves for a peer.
pub const COUNTED_FROM: &str = "x-mesh-counted-from";

/// The trailer by which a node that took a forwarded call says, as the call ends, from which
/// version of its gossiped state the call is no longer counted, as `{generation}:{version}`.
/// The forwarding router then knows that the peer's versions from [`COUNTED_FROM`] up to
/// this one count a call that has ended, and subtracts it from them: a peer that runs short
/// calls gets its next ones as soon as they end, not a publication interval later. gRPC's
/// ORCA reports load in trailers the same way. The route layer sets it on the calls it serves
/// for a peer, and the forwarding router removes it before relaying the trailers.
pub const COUNTED_UNTIL: &str = "x-mesh-counted-until";

/// The header naming a call across nodes: kept if the client sent one, otherwise generated
/// (a UUIDv7) by the node the call arrived at, and forwarded with the call. Every node that
/// handles the call logs it in the `call` span's `request_id` field, so one grep of the logs of
/// every node follows the call.
pub const REQUEST_ID: &str = "x-request-id";

/// Headers of a caller's metadata that describe one HTTP/2 connection or one encoding, not the
/// call: a call made anew to a peer ([`PeerCall`](crate::PeerCall)) leaves them behind, and
/// its client sets its own.
const NOT_PROPAGATED: [&str; 9] = [
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

/// Headers of this node's server connection that a request relayed as it is (the route layer)
/// leaves behind: the peer's channel sets its own. The message encoding headers stay, as the
/// body bytes stay.
pub(crate) const NOT_RELAYED: [http::HeaderName; 3] = [
    http::header::HOST,
    http::header::CONNECTION,
    http::header::CONTENT_LENGTH,
];

/// The node a call was forwarded by, if it was. Such a call must run locally.
pub fn forwarded_by(metadata: &MetadataMap) -> Option<NodeId> {
    metadata
        .get(FORWARDED_BY)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| NodeId::new(value).ok())
}

/// The `(generation, version)` a [`COUNTED_FROM`] header carries, if it is there and well formed.
pub(crate) fn counted_from(headers: &http::HeaderMap) -> Option<(u64, u64)> {
    state_version(headers, COUNTED_FROM)
}

/// The `(generation, version)` a [`COUNTED_UNTIL`] trailer carries, if it is there and well
/// formed.
pub(crate) fn counted_until(trailers: &http::HeaderMap) -> Option<(u64, u64)> {
    state_version(trailers, COUNTED_UNTIL)
}

fn state_version(headers: &http::HeaderMap, name: &str) -> Option<(u64, u64)> {
    let text = headers.get(name)?.to_str().ok()?;
    let (generation, version) = text.split_once(':')?;
    Some((generation.parse().ok()?, version.parse().ok()?))
}

/// `(generation, version)` as a [`COUNTED_FROM`] or [`COUNTED_UNTIL`] value, in the form
/// [`counted_from`] and [`counted_until`] read. Digits and a colon are always a valid header
/// value; the fallback only keeps this free of `unwrap`.
pub(crate) fn state_version_value((generation, version): (u64, u64)) -> http::HeaderValue {
    http::HeaderValue::from_str(&format!("{generation}:{version}"))
        .unwrap_or_else(|_| http::HeaderValue::from_static("0:0"))
}

/// The caller's metadata a call made anew to a peer carries (see [`NOT_PROPAGATED`]).
pub(crate) fn propagated(metadata: &MetadataMap) -> MetadataMap {
    let mut headers = metadata.clone().into_headers();
    for name in NOT_PROPAGATED {
        headers.remove(name);
    }
    MetadataMap::from_headers(headers)
}

/// A header that proves a call comes from a replica of the cluster (see
/// [`ChannelConfig::credential`](crate::ChannelConfig::credential)). Its value is marked
/// sensitive, so HTTP/2 never indexes it and `Debug` never shows it.
#[derive(Clone)]
pub struct PeerCredential {
    name: http::HeaderName,
    value: http::HeaderValue,
}

impl PeerCredential {
    /// The header `name` with the value `secret`; `None` when either is not a valid header
    /// name or value.
    pub fn new(name: &str, secret: &str) -> Option<Self> {
        let name = http::HeaderName::from_bytes(name.as_bytes()).ok()?;
        let mut value = http::HeaderValue::from_str(secret).ok()?;
        value.set_sensitive(true);
        Some(Self { name, value })
    }

    /// The header's name.
    pub fn name(&self) -> &http::HeaderName {
        &self.name
    }

    pub(crate) fn stamp(&self, headers: &mut http::HeaderMap) {
        headers.insert(self.name.clone(), self.value.clone());
    }
}

impl std::fmt::Debug for PeerCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerCredential")
            .field("name", &self.name)
            .field("value", &"<redacted>")
            .finish()
    }
}

/// Client interceptor stamping [`FORWARDED_BY`] (and the cluster's [`PeerCredential`], when
/// the channels have one).
#[derive(Debug, Clone)]
pub struct ForwardedBy {
    value: AsciiMetadataValue,
    credential: Option<PeerCredential>,
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
    pub(crate) fn with_credential(mut self, credential: Option<PeerCredential>) -> Self {
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

    /// The header value: this node's id.
    fn header(&self) -> http::HeaderValue {
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
}
