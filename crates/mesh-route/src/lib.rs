//! Routing for the mesh: choose the node that should run a call, name operations after the node
//! that owns them, and forward gRPC calls to peers.
//!
//! # The pieces
//!
//! * [`Router::route`] builds candidates from the lock-free membership view — the local node
//!   and every peer that is alive, not draining, carries the required tags, advertises an
//!   endpoint and whose state was confirmed recently — and asks a [`Strategy`] to pick one.
//!   Each candidate's load is *effective*: gossiped pending tasks plus the calls this node sent
//!   it since that state version (optimistic accounting), which keeps routers from herding onto
//!   the peer that looked least loaded at the last gossip round.
//! * [`OperationId`] names operations `{node_id}:{uuid}` so that [`Router::owner`] can send
//!   `WaitExecution` from any node to the owner, and answer `NOT_FOUND` when the owner is gone.
//! * [`PeerChannels`] keeps one lazily connected channel per peer life and drops it when the
//!   peer fails, leaves, restarts or moves.
//! * [`layer::RouteLayer`] is how a server embeds all of this, and the one way calls are
//!   forwarded: a tower layer around a tonic server with a [`layer::Rule`] per method (spread
//!   by load, to the owner, idempotent). It sends the original HTTP/2 request to the chosen
//!   peer marked [`FORWARDED_BY`] (one hop, never loops), tries elsewhere only when the peer
//!   could not be connected to — never once it accepted the call, unless the rule is
//!   idempotent — and relays the response as it is, cut short if the peer fails.
//! * [`Router::peer`] gives an embedder a [`PeerCall`] for its own call to one chosen peer
//!   (fetching a blob from the replica that holds it), stamped like a forwarded call.
//! * [`PeerTls`] makes peer channels TLS only (optionally mutual TLS); [`tls`] says what that
//!   protects and what it does not.
#![forbid(unsafe_code)]

mod channels;
mod dialer;
mod error;
mod headers;
pub mod layer;
mod operation;
mod peer;
mod router;
pub mod select;
#[cfg(feature = "tls")]
pub mod tls;

pub use channels::{ChannelConfig, PeerChannels};
pub use dialer::{DialFuture, Dialer, PeerStream};
pub use error::RouteError;
pub use headers::{
    COUNTED_FROM, COUNTED_UNTIL, FORWARDED_BY, ForwardedBy, PeerCredential, REQUEST_ID,
    forwarded_by,
};
pub use layer::Decision;
pub use operation::{OperationId, OperationIdError, OperationIdReason};
pub use peer::{ForwardChannel, PeerCall, PeerTarget, failed_before_accept};
pub use router::{Placement, Route, Router, RouterBuilder, RouterStats, WhenFull};
pub use select::{
    Affinity, Candidate, LeastLoaded, LoadFactorError, PowerOfTwoChoices, Random, RoundRobin,
    RouteRequest, Strategy, WeightedCapacity, backpressure,
};
#[cfg(feature = "tls")]
pub use tls::{CaBundle, PeerTls, TlsError, TlsIdentity, TlsMaterial};
