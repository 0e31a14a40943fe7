//! Routing for the mesh: choose the node that should run a call, name operations after the node
//! that owns them, and forward gRPC calls to peers.
#![forbid(unsafe_code)]

mod operation;
pub mod select;

pub use operation::{OperationId, OperationIdError, OperationIdReason};
pub use select::{Candidate, LeastLoaded, RouteRequest, Strategy, backpressure};
