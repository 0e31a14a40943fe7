//! [`RouteError`]: why a call could not be routed, and the gRPC status each reason becomes —
//! `UNAVAILABLE` for what a retry may fix, `NOT_FOUND` for an operation whose owner is gone (the
//! Remote Execution API tells clients to run `Execute` again), `FAILED_PRECONDITION` when no
//! node could ever run it.

use mesh_core::{NodeId, Tags};
use tonic::{Code, Status};

use crate::operation::{OperationId, OperationIdError};

/// Why a call could not be routed. Converts into the gRPC status a client should see.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// No member carries the required tags (`FAILED_PRECONDITION`: the request can never run
    /// on this cluster as it is).
    #[error(
        "no node in the cluster has the required tags {}",
        format_tags(required)
    )]
    NoMatchingNode {
        /// The tags asked for.
        required: Tags,
    },
    /// Nodes match, but none can take the call now: the local node is draining and no peer is
    /// usable, or every peer tried was unreachable (`UNAVAILABLE`: retry later).
    #[error("no node can take the call now{}", format_tried(tried))]
    NoAvailableNode {
        /// Peers tried and found unreachable, in order.
        tried: Vec<NodeId>,
    },
    /// The operation name is malformed (`INVALID_ARGUMENT`).
    #[error(transparent)]
    InvalidOperationName(#[from] OperationIdError),
    /// The node that owns the operation is not a member, or left (`NOT_FOUND`: the Remote
    /// Execution API tells clients to retry `Execute`).
    #[error("operation {operation} is unknown: its owner {} is not a member of the cluster", operation.node())]
    UnknownOwner {
        /// The operation.
        operation: OperationId,
    },
    /// The owner of an operation is a member but could not be reached (`UNAVAILABLE`).
    #[error("the owner {node} of the operation could not be reached at {endpoint}: {message}")]
    OwnerUnreachable {
        /// The owner.
        node: NodeId,
        /// Where it was tried.
        endpoint: String,
        /// What failed.
        message: String,
    },
    /// A call was addressed to a node that is not a live peer: this node itself, or a node
    /// id that is not (or no longer) a member (`UNAVAILABLE`).
    #[error("node {node} is not a live peer of this node")]
    NotAPeer {
        /// The node asked for.
        node: NodeId,
    },
    /// A peer gossips an endpoint that is not a valid URI (`UNAVAILABLE`).
    #[error("peer {node} advertises an invalid grpc endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        /// The peer.
        node: NodeId,
        /// The endpoint it advertises.
        endpoint: String,
        /// Why it is invalid.
        reason: String,
    },
}

fn format_tags(tags: &Tags) -> String {
    let pairs: Vec<String> = tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("[{}]", pairs.join(", "))
}

fn format_tried(tried: &[NodeId]) -> String {
    if tried.is_empty() {
        String::new()
    } else {
        let names: Vec<&str> = tried.iter().map(NodeId::as_str).collect();
        format!(" (unreachable: {})", names.join(", "))
    }
}

impl RouteError {
    /// The gRPC code for this error.
    pub fn code(&self) -> Code {
        match self {
            RouteError::NoMatchingNode { .. } => Code::FailedPrecondition,
            RouteError::NoAvailableNode { .. }
            | RouteError::OwnerUnreachable { .. }
            | RouteError::NotAPeer { .. }
            | RouteError::InvalidEndpoint { .. } => Code::Unavailable,
            RouteError::InvalidOperationName(_) => Code::InvalidArgument,
            RouteError::UnknownOwner { .. } => Code::NotFound,
        }
    }
}

impl From<RouteError> for Status {
    fn from(error: RouteError) -> Self {
        Status::new(error.code(), error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_remote_execution_api() {
        let op: OperationId = "gone:0190b6c4-6f1c-7cc0-9d5e-3f6b8a2e4d10".parse().unwrap();
        let status = Status::from(RouteError::UnknownOwner { operation: op });
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().contains("owner gone is not a member"));

        let bad = "nope".parse::<OperationId>().unwrap_err();
        let status = Status::from(RouteError::from(bad));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("expected \"{node_id}:{uuid}\""));

        let required = Tags::from([("os".to_owned(), "windows".to_owned())]);
        let status = Status::from(RouteError::NoMatchingNode { required });
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            "no node in the cluster has the required tags [os=windows]"
        );

        let tried = vec![NodeId::new("b").unwrap(), NodeId::new("c").unwrap()];
        let status = Status::from(RouteError::NoAvailableNode { tried });
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            status.message(),
            "no node can take the call now (unreachable: b, c)"
        );
    }
}
