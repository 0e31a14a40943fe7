//! Who a node is on the wire: its node id, its gossip address and its generation.

use std::{
    fmt,
    net::SocketAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::NodeId;

/// The identity a node gossips under.
///
/// * `node_id` names the node for users and for operation ownership.
/// * `addr` is its gossip socket address. It is foca's [`foca::Identity::Addr`]: members are
///   keyed by address, so a seed can be announced to by address alone, and when two identities
///   claim one address the one with the higher generation wins.
/// * `generation` is the wall-clock time the process started, in nanoseconds since the Unix
///   epoch, so a restarted node always outranks its previous life. [`foca::Identity::renew`]
///   adds one, which lets a node that was wrongly declared down rejoin at once without ever
///   outranking a process that started later.
///
/// Node ids must be unique in a cluster. When two live identities claim one node id (a
/// Kubernetes pod restarted with a new IP but the same name), the mesh keeps the higher
/// generation and declares the other down, so there is never more than one owner of a name.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identity {
    node_id: NodeId,
    addr: SocketAddr,
    generation: u64,
}

impl Identity {
    /// An identity with an explicit generation.
    pub fn new(node_id: NodeId, addr: SocketAddr, generation: u64) -> Self {
        Self {
            node_id,
            addr,
            generation,
        }
    }

    /// An identity whose generation is the current wall-clock time.
    pub fn starting_now(node_id: NodeId, addr: SocketAddr) -> Self {
        Self::new(node_id, addr, generation_now())
    }

    /// The node's id.
    pub fn node_id(&self) -> &NodeId {
        &self.node_id
    }

    /// The node's gossip socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The node's generation: higher is newer.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether `self` is a newer life of the same node than `other`.
    pub fn supersedes(&self, other: &Identity) -> bool {
        self.node_id == other.node_id && self.rank() > other.rank()
    }

    /// Total order used to settle conflicts: generation first, then address and node id so that
    /// two different identities never tie.
    fn rank(&self) -> (u64, SocketAddr, &str) {
        (self.generation, self.addr, self.node_id.as_str())
    }
}

/// Nanoseconds since the Unix epoch; a clock before 1970 counts as zero.
pub(crate) fn generation_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl foca::Identity for Identity {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(Self {
            node_id: self.node_id.clone(),
            addr: self.addr,
            generation: self.generation.checked_add(1)?,
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.rank() > adversary.rank()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}#{}", self.node_id, self.addr, self.generation)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use foca::Identity as _;

    use super::*;

    fn id(name: &str, port: u16, generation: u64) -> Identity {
        Identity::new(
            NodeId::new(name).unwrap(),
            SocketAddr::from(([127, 0, 0, 1], port)),
            generation,
        )
    }

    #[test]
    fn renew_bumps_generation_and_wins_the_address() {
        let old = id("a", 1, 10);
        let new = old.renew().unwrap();
        assert_eq!(new.generation(), 11);
        assert!(new.win_addr_conflict(&old));
        assert!(!old.win_addr_conflict(&new));
        assert!(new.supersedes(&old));
        assert!(id("a", 1, u64::MAX).renew().is_none());
    }

    #[test]
    fn restart_outranks_any_renewal_of_the_previous_life() {
        let first =
            Identity::starting_now(NodeId::new("a").unwrap(), "127.0.0.1:1".parse().unwrap());
        let renewed = first.renew().unwrap().renew().unwrap();
        let restarted = id("a", 2, renewed.generation() + 1_000_000);
        assert!(restarted.supersedes(&renewed));
    }

    #[test]
    fn conflicts_never_tie() {
        let a = id("a", 1, 5);
        let b = id("b", 1, 5);
        assert_ne!(a.win_addr_conflict(&b), b.win_addr_conflict(&a));
        assert!(
            !a.supersedes(&b),
            "different nodes never supersede each other"
        );
    }

    #[test]
    fn wire_roundtrip() {
        let original = id("node-7", 7946, 1_700_000_000_000_000_000);
        let bytes = postcard::to_allocvec(&original).unwrap();
        assert_eq!(postcard::from_bytes::<Identity>(&bytes).unwrap(), original);
    }
}
