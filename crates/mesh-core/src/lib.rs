//! Membership for the mesh: every node learns every other node, notices failures, heals
//! partitions, and knows each peer's load within a fraction of a second.
//!
//! # How it works
//!
//! **Membership** is SWIM ("SWIM: Scalable Weakly-consistent Infection-style Process Group
//! Membership Protocol", Das, Gupta and Motivala, DSN 2002) as implemented by the sans-IO
//! [`foca`] crate, with its suspicion mechanism, piggybacked dissemination and the periodic
//! gossip/announce extensions. Every probe period a node pings one member; a member that does
//! not answer directly or through `k` indirect probes becomes *suspect*, and is declared *down*
//! unless it refutes the suspicion within `suspicion_multiplier × log10(n) × probe_period`
//! (memberlist's scaling, the same idea as Lifeguard's dynamic suspicion timeouts, Dadgar et al.
//! 2018). Members announce themselves to nodes they consider down, and to every address the
//! discovery source returns that is not a member, which is what merges the two sides of a healed
//! partition without an operator.
//!
//! **Identity** is `{node_id, gossip_addr, generation}` ([`Identity`]). The generation is the
//! start time, so a restarted node always replaces its previous life, at the same address (foca
//! resolves the address conflict) or at a new one (this crate declares the older life of the
//! node id down, so a node id never has two owners).
//!
//! **Node state** ([`NodeState`]: gRPC endpoint, pending tasks, max concurrency, draining,
//! tags) travels three ways, because piggybacking alone is slow to converge (foca issues #3, #5):
//! 1. as a foca custom broadcast, versioned so a newer state invalidates an older one still
//!    being disseminated;
//! 2. pushed directly by its owner to up to [`Timing::state_push_fanout`] peers whenever it
//!    changes (coalesced to at most one version per [`Timing::state_publish_interval`]), and to
//!    every newly seen member (join sync);
//! 3. re-sent periodically (anti-entropy, [`Timing::state_refresh_interval`]), which also lets
//!    readers see how long ago a peer's state was confirmed ([`Member::age`]).
//!
//! **Security**: with a [`Keyring`], every datagram is encrypted and authenticated with
//! XChaCha20-Poly1305, bound to a cluster label, and keys rotate at run time without breaking
//! membership ([`keyring`] explains the construction, [`wire`] the layout).
//!
//! **Runtime**: one tokio task owns foca. Datagrams are read, their envelope checked and
//! decrypted by a separate receive task, so garbage never reaches foca; timers go to one
//! scheduler that delivers them in deadline order (foca issue #26). Readers get immutable
//! [`MembershipView`] snapshots through an `ArcSwap`, without locks.
//!
//! # Example
//!
//! ```
//! use mesh_core::{Membership, NodeId, Timing};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let seed = Membership::builder(NodeId::new("a")?)
//!     .bind_addr("127.0.0.1:0".parse()?)
//!     .timing(Timing::local())
//!     .max_concurrency(4)
//!     .start()
//!     .await?;
//! let joiner = Membership::builder(NodeId::new("b")?)
//!     .bind_addr("127.0.0.1:0".parse()?)
//!     .seeds([seed.local_addr()])
//!     .timing(Timing::local())
//!     .max_concurrency(4)
//!     .start()
//!     .await?;
//!
//! let _busy = joiner.load().begin_task();
//! let view = tokio::time::timeout(
//!     Duration::from_secs(10),
//!     seed.wait_until(|v| v.get("b").and_then(|m| m.state()).is_some_and(|s| s.pending == 1)),
//! )
//! .await?;
//! assert_eq!(view.len(), 2);
//! # joiner.leave().await?;
//! # seed.shutdown().await;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod agent;
mod discovery;
mod events;
mod identity;
mod input;
pub mod keyring;
mod load;
mod membership;
mod node_id;
mod receive;
mod shared;
mod state;
mod stats;
mod store;
mod timing;
mod transport;
mod view;
pub mod wire;

pub use events::MeshEvent;
pub use identity::Identity;
pub use keyring::{
    KEY_LEN, KeyError, KeyFingerprint, KeyOrigin, KeySource, Keyring, KeyringError,
    KeyringLoadError, SecretKey,
};
pub use load::{LoadTracker, TaskGuard};
pub use membership::{
    DEFAULT_GOSSIP_PORT, DEFAULT_MAX_CONCURRENCY, LeaveError, Membership, MembershipBuilder,
    StartError, StoppedError,
};
pub use node_id::{MAX_NODE_ID_LEN, NodeId, NodeIdError, abbreviate};
pub use state::{
    MAX_ENDPOINT_LEN, MAX_STATE_SIZE, MAX_TAG_KEY_LEN, MAX_TAG_VALUE_LEN, NodeState, StateError,
    Tags, load_ratio,
};
pub use stats::MeshStats;
pub use timing::{Timing, TimingError};
pub use transport::{Transport, UdpTransport};
pub use view::{LocalStatus, Member, MembershipView, PeerStatus};
pub use wire::{MAX_CLUSTER_LABEL_LEN, WireError};
