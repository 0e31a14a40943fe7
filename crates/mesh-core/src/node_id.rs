//! Node identifiers: DNS labels, so they survive in pod names, operation names and URLs.

use std::{borrow::Borrow, fmt, str::FromStr, sync::Arc};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest node id accepted, in bytes (the length limit of a DNS label).
pub const MAX_NODE_ID_LEN: usize = 63;

/// The name of a node, unique within a cluster.
///
/// A node id is 1 to [`MAX_NODE_ID_LEN`] characters of `[A-Za-z0-9._-]`: the character set of a
/// Kubernetes pod name, so `metadata.name` can be used as is. Because `:` and `/` can never
/// appear, an operation name `{node_id}:{uuid}` (possibly behind a `…/operations/` prefix) can
/// always be split back into its owner and its id.
///
/// Cloning is cheap (the text is shared).
///
/// ```
/// use mesh_core::NodeId;
///
/// let id: NodeId = "worker-0.build.svc".parse()?;
/// assert_eq!(id.as_str(), "worker-0.build.svc");
/// assert!("worker:0".parse::<NodeId>().is_err());
/// # Ok::<(), mesh_core::NodeIdError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(Arc<str>);

impl NodeId {
    /// Validates `value` and makes a node id of it.
    pub fn new(value: impl AsRef<str>) -> Result<Self, NodeIdError> {
        let value = value.as_ref();
        validate(value)?;
        Ok(Self(Arc::from(value)))
    }

    /// A valid id standing for a node whose id is not known yet (announce targets).
    pub(crate) fn placeholder() -> Self {
        Self(Arc::from("unknown"))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn validate(value: &str) -> Result<(), NodeIdError> {
    let reason = if value.is_empty() {
        "it is empty"
    } else if value.len() > MAX_NODE_ID_LEN {
        "it is longer than 63 bytes"
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        "it contains a character outside [A-Za-z0-9._-]"
    } else {
        return Ok(());
    };
    Err(NodeIdError {
        value: abbreviate(value),
        reason,
    })
}

/// Shortens `value` for an error message, so a huge rejected input gives a bounded message:
/// the first 80 bytes (cut at a character boundary) and the total length.
///
/// ```
/// assert_eq!(mesh_core::abbreviate("short"), "short");
/// assert_eq!(mesh_core::abbreviate(&"x".repeat(100)), format!("{}… (100 bytes)", "x".repeat(80)));
/// ```
pub fn abbreviate(value: &str) -> String {
    const SHOWN: usize = 80;
    if value.len() <= SHOWN {
        return value.to_owned();
    }
    let mut end = SHOWN;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &value[..end], value.len())
}

/// A node id was rejected. The message names the value and the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid node id {value:?}: {reason}; a node id is 1-63 characters of [A-Za-z0-9._-] (a DNS label)"
)]
pub struct NodeIdError {
    value: String,
    reason: &'static str,
}

impl NodeIdError {
    /// The rejected value (abbreviated when very long).
    pub fn value(&self) -> &str {
        &self.value
    }

    /// The rule the value broke.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

impl FromStr for NodeId {
    type Err = NodeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for NodeId {
    type Error = NodeIdError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        validate(&value)?;
        Ok(Self(Arc::from(value)))
    }
}

impl TryFrom<&str> for NodeId {
    type Error = NodeIdError;

    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl AsRef<str> for NodeId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for NodeId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl Serialize for NodeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        NodeId::new(&*text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels_and_pod_names() {
        for ok in ["a", "node-1", "build_worker.2", "A9", &"x".repeat(63)] {
            assert_eq!(NodeId::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_with_the_value_and_the_rule() {
        let cases = [
            ("", "it is empty"),
            ("a:b", "it contains a character outside [A-Za-z0-9._-]"),
            ("ops/1", "it contains a character outside [A-Za-z0-9._-]"),
            (
                "caf\u{e9}",
                "it contains a character outside [A-Za-z0-9._-]",
            ),
            (
                "has space",
                "it contains a character outside [A-Za-z0-9._-]",
            ),
        ];
        for (bad, reason) in cases {
            let err = NodeId::new(bad).unwrap_err();
            assert_eq!(err.reason(), reason, "{bad:?}");
            assert_eq!(err.value(), bad);
            let message = err.to_string();
            assert!(message.contains(&format!("{bad:?}")), "{message}");
            assert!(message.contains("[A-Za-z0-9._-]"), "{message}");
        }
        let long = "y".repeat(64);
        assert_eq!(
            NodeId::new(&long).unwrap_err().reason(),
            "it is longer than 63 bytes"
        );
    }

    #[test]
    fn huge_input_gives_a_bounded_message() {
        let err = NodeId::new("é".repeat(100_000)).unwrap_err();
        assert!(err.to_string().len() < 300);
        assert!(err.value().ends_with("(200000 bytes)"));
    }

    #[test]
    fn deserializing_validates() {
        let bytes = postcard::to_allocvec("bad:id").unwrap();
        assert!(postcard::from_bytes::<NodeId>(&bytes).is_err());
        let bytes = postcard::to_allocvec("good").unwrap();
        assert_eq!(
            postcard::from_bytes::<NodeId>(&bytes).unwrap().as_str(),
            "good"
        );
    }
}
