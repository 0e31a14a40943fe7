//! The route layer: give any tonic server load routing, owner routing and safe re-routing by
//! wrapping it in one tower [`Layer`](tower::Layer).
//!
//! ```no_run
//! # #[derive(Clone, PartialEq, prost::Message)]
//! # struct ExecuteRequest { #[prost(string, tag = "1")] os: String }
//! # #[derive(Clone, PartialEq, prost::Message)]
//! # struct WaitExecutionRequest { #[prost(string, tag = "1")] name: String }
//! use mesh_route::{Decision, RouteRequest, Router, layer::{RouteLayer, Rule}};
//!
//! # async fn serve(router: Router, routes: tonic::service::Routes) -> Result<(), Box<dyn std::error::Error>> {
//! let layer = RouteLayer::new(router)
//!     .rule("/example.v1.Execution/Execute", Rule::spread(|request: ExecuteRequest, _| async move {
//!         Ok(Decision::Route(RouteRequest::new().require_tag("os", request.os)))
//!     }).idempotent())?
//!     .rule("/example.v1.Execution/WaitExecution",
//!           Rule::to_owner(|request: &WaitExecutionRequest| request.name.clone()))?;
//! tonic::transport::Server::builder()
//!     .layer(layer)
//!     .add_routes(routes)
//!     .serve("0.0.0.0:50051".parse()?)
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! # What happens to a call
//!
//! A call whose path has no [`Rule`], or that carries `x-mesh-forwarded-by` (a peer already
//! routed it: one hop, never a loop), goes straight to the inner service. For the others the
//! layer reads the request body (one message: rules are for unary and server-streaming
//! methods), decodes the first message with prost only to decide, and then:
//!
//! * **spread** ([`Rule::spread`]): the rule's function answers [`Decision::Local`] (serve it
//!   here — an action-cache hit never costs a forward) or [`Decision::Route`]; the
//!   [`Router`](crate::Router) then picks a node by its strategy, holding the call while every
//!   node is full under [`WhenFull::Wait`](crate::WhenFull) — late binding as in Sparrow
//!   (Ousterhout et al., SOSP 2013) — and never past the call's `grpc-timeout`;
//! * **to owner** ([`Rule::to_owner`]): the operation name (`{node_id}:{uuid}` behind any
//!   prefix, see [`OperationId`](crate::OperationId)) names the node that holds the operation,
//!   as Buildbarn's demultiplexing build queue routes by an operation name's prefix;
//!   `NOT_FOUND` when that node is gone, `INVALID_ARGUMENT` when the name is malformed.
//!
//! A call routed to a peer is sent as the original HTTP/2 request — the same path, headers
//! and body bytes — through the peer's channel, stamped `x-mesh-forwarded-by` and with the
//! deadline that is left; its response head is returned to the client at once and its frames
//! and trailers are relayed as they are (no re-encoding, any message type). The relay holds
//! back a message cut across frames until it is whole, so a stream never carries a torn
//! message.
//!
//! # When things fail
//!
//! * A peer that cannot be connected to never saw the call: the next choice is tried (or this
//!   node), for every rule.
//! * A peer that accepted the call and then died — its connection broke, or the membership
//!   declared it down (which catches connections that stay half-open to a dead host) — ends a
//!   relay with `UNAVAILABLE`, *unless* the rule is [`Rule::idempotent`]: then the same request
//!   is routed again, that peer excluded, and the new node's messages continue the client's
//!   stream (REAPI's `Execute` names its work by the action digest, so running it twice is
//!   harmless — every REAPI server requeues the work of a dead worker).
//! * Bad input is answered by the layer with a status that names the problem: an undecodable
//!   request `INVALID_ARGUMENT`, a request over [`RouteLayer::max_request_bytes`]
//!   `RESOURCE_EXHAUSTED`, a deadline that passes while the call is held `DEADLINE_EXCEEDED`,
//!   no node with the required tags `FAILED_PRECONDITION` ([`RouteError`](crate::RouteError)
//!   has the full mapping).
//!
//! # Observing calls
//!
//! Every call with a rule runs in a `call` span carrying this node's id (`node`), the method
//! (`path`), the call's `x-request-id` ([`REQUEST_ID`]: the client's, or one generated here and
//! forwarded with the call) and the `peer` it was forwarded to — or, on the node that serves a
//! forwarded call, the node it came `from`. With `RUST_LOG=mesh_route=debug` each node logs
//! "forwarding the call" and "serving a call forwarded by a peer", so one grep for a request id
//! over every node's log follows the call. [`RouteLayer::stats`] counts what the layer did and
//! [`RouteLayer::peer_stats`] how the calls exchanged with each peer ended
//! ([`ForwardOutcome`]).
//!
//! Forwarding assumes the replicas serve the same methods with the same message encoding; a
//! compressed request message is served where it arrived (the layer does not decompress).
//! This is the crate's one forwarding implementation; for a call an embedder makes itself to
//! one chosen peer, [`Router::peer`](crate::Router::peer) gives a channel stamped the same way.

mod body;
mod cutoff;
mod grpc;
#[allow(clippy::module_inception)]
mod layer;
mod outcome;
mod routing;
mod rule;
mod service;
mod stats;
mod task;

pub use crate::headers::REQUEST_ID;
pub use body::RelayBody;
pub use layer::{DEFAULT_MAX_REQUEST_BYTES, InvalidPath, RouteLayer};
pub use rule::{Decision, Rule};
pub use service::RouteService;
pub use stats::{ForwardCounts, ForwardOutcome, LayerStats, PeerForwards};
pub use task::CallTask;
