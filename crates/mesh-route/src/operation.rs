//! Operation names that say which node owns them: `{node_id}:{uuid}`.
//!
//! The Remote Execution API lets a client follow an operation with `WaitExecution(name)` on any
//! connection, and a load balancer may send that call to any replica. Putting the owner in the
//! name lets every replica route the call without shared storage. Node ids never contain `:` or
//! `/` ([`NodeId`]), so the name always splits back unambiguously, also behind a path prefix
//! such as `operations/` or `{instance}/operations/` (everything up to the last `/` is ignored).

use std::{fmt, str::FromStr};

use mesh_core::{NodeId, NodeIdError, abbreviate};
use uuid::Uuid;

/// An operation owned by one node.
///
/// ```
/// use mesh_route::OperationId;
///
/// let id: OperationId = "main/operations/worker-3:0190b6c4-6f1c-7cc0-9d5e-3f6b8a2e4d10".parse()?;
/// assert_eq!(id.node().as_str(), "worker-3");
/// assert_eq!(id.to_string(), "worker-3:0190b6c4-6f1c-7cc0-9d5e-3f6b8a2e4d10");
/// # Ok::<(), mesh_route::OperationIdError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OperationId {
    node: NodeId,
    id: Uuid,
}

impl OperationId {
    /// A new operation owned by `node`, with a time-ordered (v7) UUID.
    pub fn new(node: NodeId) -> Self {
        Self {
            node,
            id: Uuid::now_v7(),
        }
    }

    /// An operation id from its parts.
    pub fn from_parts(node: NodeId, id: Uuid) -> Self {
        Self { node, id }
    }

    /// The owning node.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// The operation's UUID.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The name with a prefix, e.g. `"main/operations/"` → `main/operations/{node}:{uuid}`.
    pub fn with_prefix(&self, prefix: &str) -> String {
        format!("{prefix}{self}")
    }
}

impl fmt::Display for OperationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.node, self.id.hyphenated())
    }
}

impl FromStr for OperationId {
    type Err = OperationIdError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        let error = |reason| OperationIdError {
            name: abbreviate(name),
            reason,
        };
        let last = name.rsplit('/').next().unwrap_or(name);
        let Some((node, id)) = last.split_once(':') else {
            return Err(error(OperationIdReason::MissingSeparator));
        };
        let node = NodeId::new(node).map_err(|e| error(OperationIdReason::BadNodeId(e)))?;
        // Only the hyphenated form (36 characters), so every operation has one spelling.
        let id = Uuid::try_parse(id)
            .ok()
            .filter(|_| id.len() == 36)
            .ok_or_else(|| error(OperationIdReason::BadUuid))?;
        Ok(Self { node, id })
    }
}

/// An operation name could not be parsed. The message names the value and the expected form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid operation name {name:?}: {reason}; expected \"{{node_id}}:{{uuid}}\", optionally after a path prefix such as \"operations/\""
)]
pub struct OperationIdError {
    name: String,
    reason: OperationIdReason,
}

impl OperationIdError {
    /// The rejected name (abbreviated when very long).
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// What was wrong with an operation name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OperationIdReason {
    /// No `:` between node id and UUID.
    #[error("there is no ':' between a node id and a uuid")]
    MissingSeparator,
    /// The part before `:` is not a valid node id.
    #[error("{0}")]
    BadNodeId(NodeIdError),
    /// The part after `:` is not a hyphenated UUID.
    #[error("the part after ':' is not a uuid in its hyphenated form")]
    BadUuid,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_roundtrip() {
        let id = OperationId::new(NodeId::new("node-1").unwrap());
        let parsed: OperationId = id.to_string().parse().unwrap();
        assert_eq!(parsed, id);
        assert_eq!(id.id().get_version_num(), 7);
    }

    #[test]
    fn prefixes_are_accepted() {
        let id = OperationId::new(NodeId::new("n").unwrap());
        for prefix in ["operations/", "main/operations/", "a/b/c/operations/", "/"] {
            let parsed: OperationId = id.with_prefix(prefix).parse().unwrap();
            assert_eq!(parsed, id, "{prefix}");
        }
    }

    #[test]
    fn malformed_names_say_what_is_wrong_and_what_is_expected() {
        let cases = [
            ("", "there is no ':'"),
            ("operations/abc", "there is no ':'"),
            ("node:not-a-uuid", "the part after ':' is not a uuid"),
            (
                ":0190b6c4-6f1c-7cc0-9d5e-3f6b8a2e4d10",
                "invalid node id \"\"",
            ),
            (
                "bad node:0190b6c4-6f1c-7cc0-9d5e-3f6b8a2e4d10",
                "outside [A-Za-z0-9._-]",
            ),
            ("operations/n:", "not a uuid"),
            ("n:0190b6c46f1c7cc09d5e3f6b8a2e4d10", "hyphenated form"),
            (
                "n:urn:uuid:0190b6c4-6f1c-7cc0-9d5e-3f6b8a2e4d10",
                "not a uuid",
            ),
        ];
        for (name, reason) in cases {
            let error = name.parse::<OperationId>().unwrap_err();
            let message = error.to_string();
            assert!(message.contains(reason), "{name:?}: {message}");
            assert!(
                message.contains("expected \"{node_id}:{uuid}\""),
                "{message}"
            );
            assert_eq!(error.name(), name);
        }
    }

    #[test]
    fn huge_names_give_bounded_errors() {
        let name = "x".repeat(1 << 20);
        assert!(name.parse::<OperationId>().unwrap_err().to_string().len() < 600);
    }
}
