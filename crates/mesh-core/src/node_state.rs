//! The state every node gossips about itself, and its size-capped encoding.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{NodeId, node_id::abbreviate};

/// The largest encoded [`NodeState`] accepted, in bytes.
///
/// It keeps a state, the envelope and a foca header inside one 1400-byte datagram. A state
/// that would be larger is refused when it is set ([`StateError::TooLarge`]) instead of being
/// silently dropped by every receiver.
pub const MAX_STATE_SIZE: usize = 1024;

/// The longest tag key, in bytes.
pub const MAX_TAG_KEY_LEN: usize = 128;
/// The longest tag value, in bytes.
pub const MAX_TAG_VALUE_LEN: usize = 512;
/// The longest gRPC endpoint, in bytes.
pub const MAX_ENDPOINT_LEN: usize = 255;

/// Platform properties of a node (`os=linux`, `arch=x86_64`, `pool=gpu`), matched by routers
/// against the requirements of a request.
pub type Tags = BTreeMap<String, String>;

/// What one node tells the cluster about itself.
///
/// A newer `(generation, version)` replaces an older one; receivers drop stale versions.
/// `generation` is the owner's [`crate::Identity::generation`], `version` counts changes within
/// one generation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NodeState {
    /// The node this state describes.
    pub node_id: NodeId,
    /// The owner's identity generation when it published this state.
    pub generation: u64,
    /// Increases with every change published within one generation.
    pub version: u64,
    /// Where the node serves gRPC (for example `http://10.0.0.7:50051`), if it does.
    pub grpc_endpoint: Option<String>,
    /// Tasks queued or executing on the node.
    pub pending: u32,
    /// How many tasks the node runs at once. Zero means it accepts none.
    pub max_concurrency: u32,
    /// A draining node stays a member but takes no new work.
    pub draining: bool,
    /// Platform properties.
    pub tags: Tags,
}

impl NodeState {
    /// An empty state for `node_id` at the given generation and version.
    pub fn new(node_id: NodeId, generation: u64, version: u64) -> Self {
        Self {
            node_id,
            generation,
            version,
            grpc_endpoint: None,
            pending: 0,
            max_concurrency: 0,
            draining: false,
            tags: Tags::new(),
        }
    }

    /// `pending / max_concurrency`; infinite when the node has no capacity at all.
    pub fn load_ratio(&self) -> f64 {
        load_ratio(self.pending, self.max_concurrency)
    }

    /// Whether `self` is newer than `other` (both about the same node).
    pub fn is_newer_than(&self, other: &NodeState) -> bool {
        (self.generation, self.version) > (other.generation, other.version)
    }

    /// Whether the node advertises every `key=value` in `required`.
    pub fn has_tags<'a>(&self, required: impl IntoIterator<Item = (&'a str, &'a str)>) -> bool {
        required
            .into_iter()
            .all(|(k, v)| self.tags.get(k).is_some_and(|have| have == v))
    }

    /// Encodes the state, refusing one over [`MAX_STATE_SIZE`].
    pub fn encode(&self) -> Result<Vec<u8>, StateError> {
        let bytes = postcard::to_allocvec(self).map_err(StateError::Encode)?;
        if bytes.len() > MAX_STATE_SIZE {
            return Err(StateError::TooLarge {
                size: bytes.len(),
                limit: MAX_STATE_SIZE,
            });
        }
        Ok(bytes)
    }

    /// Decodes and validates a state received from the network.
    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        if bytes.len() > MAX_STATE_SIZE {
            return Err(StateError::TooLarge {
                size: bytes.len(),
                limit: MAX_STATE_SIZE,
            });
        }
        let (state, rest): (Self, _) =
            postcard::take_from_bytes(bytes).map_err(|source| StateError::Malformed {
                len: bytes.len(),
                source,
            })?;
        if !rest.is_empty() {
            return Err(StateError::TrailingBytes { extra: rest.len() });
        }
        validate_tags(&state.tags)?;
        if let Some(endpoint) = &state.grpc_endpoint {
            validate_endpoint(endpoint)?;
        }
        Ok(state)
    }

    /// Checks that this state, with its counters at their largest possible values, still
    /// encodes within [`MAX_STATE_SIZE`]: a state that passes can never outgrow the cap later
    /// because its version or load grew.
    pub(crate) fn check_worst_case_size(&self) -> Result<(), StateError> {
        let mut widest = self.clone();
        widest.generation = u64::MAX;
        widest.version = u64::MAX;
        widest.pending = u32::MAX;
        widest.max_concurrency = u32::MAX;
        widest.encode().map(drop)
    }
}

/// A node's load: `pending / max_concurrency`, infinite when `max_concurrency` is zero (a node
/// that takes no work is never less loaded than one that does). The one definition the
/// gossiped state, the load tracker and the router's candidates share.
pub fn load_ratio(pending: u32, max_concurrency: u32) -> f64 {
    if max_concurrency == 0 {
        f64::INFINITY
    } else {
        f64::from(pending) / f64::from(max_concurrency)
    }
}

/// Validates tag keys and values (the overall size is checked separately).
pub(crate) fn validate_tags(tags: &Tags) -> Result<(), StateError> {
    for (key, value) in tags {
        let reason = if key.is_empty() {
            Some("the key is empty")
        } else if key.len() > MAX_TAG_KEY_LEN {
            Some("the key is longer than 128 bytes")
        } else if key.chars().any(|c| c.is_control() || c == '=') {
            Some("the key contains '=' or a control character")
        } else if value.len() > MAX_TAG_VALUE_LEN {
            Some("the value is longer than 512 bytes")
        } else if value.chars().any(char::is_control) {
            Some("the value contains a control character")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(StateError::InvalidTag {
                key: abbreviate(key),
                reason,
            });
        }
    }
    Ok(())
}

/// Validates a gRPC endpoint string (mesh-core does not parse it; the router does).
pub(crate) fn validate_endpoint(endpoint: &str) -> Result<(), StateError> {
    let reason = if endpoint.is_empty() {
        "it is empty"
    } else if endpoint.len() > MAX_ENDPOINT_LEN {
        "it is longer than 255 bytes"
    } else if endpoint
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        "it contains whitespace or a control character"
    } else {
        return Ok(());
    };
    Err(StateError::InvalidEndpoint {
        value: abbreviate(endpoint),
        reason,
    })
}

/// A node state could not be set, encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The encoded state is over the cap.
    #[error(
        "node state is {size} bytes encoded, over the {limit}-byte limit; use fewer or shorter tags"
    )]
    TooLarge {
        /// Encoded size in bytes (with counters at their widest).
        size: usize,
        /// The limit, [`MAX_STATE_SIZE`].
        limit: usize,
    },
    /// A tag broke a rule.
    #[error("invalid tag {key:?}: {reason}")]
    InvalidTag {
        /// The tag's key (abbreviated when very long).
        key: String,
        /// The rule it broke.
        reason: &'static str,
    },
    /// The gRPC endpoint broke a rule.
    #[error("invalid grpc endpoint {value:?}: {reason}")]
    InvalidEndpoint {
        /// The endpoint (abbreviated when very long).
        value: String,
        /// The rule it broke.
        reason: &'static str,
    },
    /// Bytes from the network are not a node state.
    #[error("malformed node state ({len} bytes): {source}")]
    Malformed {
        /// Length of the rejected input.
        len: usize,
        /// What the decoder found.
        #[source]
        source: postcard::Error,
    },
    /// A node state was followed by unexpected bytes.
    #[error("node state followed by {extra} unexpected bytes")]
    TrailingBytes {
        /// How many bytes were left over.
        extra: usize,
    },
    /// Encoding failed (should not happen for a valid state).
    #[error("encoding node state failed: {0}")]
    Encode(#[source] postcard::Error),
    /// The membership task has stopped, so the state can no longer be changed.
    #[error("the mesh has stopped; node state can no longer be changed")]
    Stopped,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NodeState {
        let mut s = NodeState::new(NodeId::new("n1").unwrap(), 42, 7);
        s.grpc_endpoint = Some("http://127.0.0.1:50051".into());
        s.pending = 3;
        s.max_concurrency = 8;
        s.tags.insert("os".into(), "linux".into());
        s
    }

    #[test]
    fn roundtrip() {
        let s = sample();
        assert_eq!(NodeState::decode(&s.encode().unwrap()).unwrap(), s);
    }

    #[test]
    fn load_ratio_and_tags() {
        let s = sample();
        assert_eq!(s.load_ratio(), 3.0 / 8.0);
        assert!(s.has_tags([("os", "linux")]));
        assert!(!s.has_tags([("os", "linux"), ("arch", "arm64")]));
        let mut none = s.clone();
        none.max_concurrency = 0;
        assert!(none.load_ratio().is_infinite());
    }

    #[test]
    fn oversized_state_is_refused_with_size_and_limit() {
        let mut s = sample();
        for i in 0..40 {
            s.tags.insert(format!("key-{i}"), "v".repeat(30));
        }
        let err = s.check_worst_case_size().unwrap_err();
        let StateError::TooLarge { size, limit } = err else {
            panic!("expected TooLarge, got {err:?}");
        };
        assert!(size > limit);
        assert_eq!(limit, MAX_STATE_SIZE);
        let message = StateError::TooLarge { size, limit }.to_string();
        assert!(
            message.contains(&size.to_string()) && message.contains("1024"),
            "{message}"
        );
    }

    #[test]
    fn worst_case_check_leaves_room_for_counters() {
        // Find a state that fits now but would not with wide counters.
        let mut s = NodeState::new(NodeId::new("n").unwrap(), 0, 0);
        let mut filler = 0;
        while s.encode().is_ok() {
            filler += 1;
            s.tags.insert("k".into(), "v".repeat(filler));
        }
        s.tags.insert("k".into(), "v".repeat(filler - 1));
        assert!(s.encode().is_ok());
        assert!(s.check_worst_case_size().is_err());
    }

    #[test]
    fn decode_rejects_garbage_without_panicking() {
        for input in [&b""[..], b"\xff\xff\xff", &[0u8; 2000][..], b"\x02ab\x00"] {
            assert!(NodeState::decode(input).is_err(), "{input:?}");
        }
        let mut bytes = sample().encode().unwrap();
        bytes.push(0);
        assert!(matches!(
            NodeState::decode(&bytes),
            Err(StateError::TrailingBytes { extra: 1 })
        ));
    }

    #[test]
    fn decode_rejects_invalid_tags_from_the_network() {
        let mut s = sample();
        s.tags.insert(String::new(), "x".into());
        let bytes = postcard::to_allocvec(&s).unwrap();
        assert!(matches!(
            NodeState::decode(&bytes),
            Err(StateError::InvalidTag { .. })
        ));
    }

    #[test]
    fn endpoint_rules() {
        assert!(validate_endpoint("http://10.0.0.1:50051").is_ok());
        for bad in ["", "http://a b", &"h".repeat(300)] {
            let err = validate_endpoint(bad).unwrap_err();
            assert!(
                err.to_string().starts_with("invalid grpc endpoint"),
                "{err}"
            );
        }
    }
}
