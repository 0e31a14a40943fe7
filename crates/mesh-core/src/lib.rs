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
//! unless it refutes the suspicion in time. On top of foca, Lifeguard ("Lifeguard: Local Health
//! Awareness for More Accurate Failure Detection", Dadgar, Phillips and Currey, 2018; as in
//! memberlist) decides how much time: the suspecting node asks witnesses to check the suspect,
//! and the timeout shrinks from `suspicion_max_multiplier` times the nominal
//! `suspicion_multiplier × max(1, log10(n) − 1) × probe_period` down to the nominal one as
//! they confirm (dynamic suspicion); the suspect is told directly, again every half probe
//! timeout, and refutes in one round trip (buddy system); and a node whose own probes keep
//! failing stretches its probe period and timeout (local health awareness). `agent/lifeguard/`
//! holds all of it and explains what is built where foca has no hook. Beyond Lifeguard, a
//! probe target that answers neither directly nor through others is told before the probe
//! period ends and its time to refute counts from then, and the node whose suspicion timed
//! out tells every other member directly that the member is down, rather than leaving it to
//! gossip (`agent/lifeguard/` too).
//! Members announce themselves to nodes they consider down, and to every address the discovery
//! source returns that is not a member, which is what merges the two sides of a healed
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
//!    being disseminated, within a byte budget per node ([`Timing::state_gossip_budget`],
//!    `budget.rs`); foca fills each datagram with membership updates first, so while those
//!    are queued (after a cold start) the states left waiting go out in datagrams of their
//!    own;
//! 2. pushed directly by its owner to up to [`Timing::state_push_fanout`] peers whenever it
//!    changes (coalesced to at most one version per [`Timing::state_publish_interval`]), and to
//!    every newly seen member (join sync; at most 16 first states a second that arrived this
//!    way are gossiped on, so a cold start does not fill every node's queue with them);
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
//! # Architecture
//!
//! Three tasks per node share one `Shared` state: the *receive task* reads the socket, the
//! *membership task* owns foca, and the optional *discovery task* asks the discovery source
//! for peers. Readers never wait on any of them. In the order the files are read:
//!
//! **A datagram, from the socket to the router.**
//! 1. `transport.rs`: the [`Transport`] (a UDP socket, or turmoil's simulated one) receives
//!    it on the receive task (`receive.rs`).
//! 2. `wire.rs`: [`wire::Envelope::open`] checks magic, version and kind and, with a
//!    [`Keyring`] (`keyring/`), decrypts and authenticates it. Failures are counted
//!    (`counters.rs`) and dropped here.
//! 3. `input.rs`: the body is decoded once: a SWIM packet stays bytes for foca, a pushed
//!    [`NodeState`] (`node_state.rs`) and a leave notice become values. The result goes to the
//!    membership task over a bounded channel (full: counted as overload, dropped).
//! 4. `agent/mod.rs`: the membership task takes one step per input, and dispatches it to its
//!    components (Lifeguard, lineage, publication, announcements), each handed the step
//!    context of `agent/context.rs`. A SWIM packet goes to foca with `agent/runtime.rs` as its
//!    runtime: replies are sealed and sent at once, and timers go into the ordered queue of
//!    `agent/timers.rs`, past Lifeguard's guard (`agent/lifeguard/guard.rs`), which stretches
//!    probe timers and holds suspicions back. A Lifeguard message goes to
//!    `agent/lifeguard/`. States piggybacked on a SWIM packet reach `state_table.rs`, whose
//!    broadcast handler keeps a state only if it is newer. A pushed state is handed to the
//!    same handler already decoded, and foca re-gossips it if it was new to us.
//! 5. foca's notifications become events in `agent/lineage.rs` ([`MeshEvent`], `events.rs`):
//!    joined, rejoined, failed, left, one owner per node id; `agent/announce.rs` introduces us
//!    to strangers that pushed us a state.
//! 6. `agent/snapshot.rs` assembles a new [`MembershipView`] (`view.rs`) from foca's members
//!    and the state table (at most one per 50 µs per member, so large clusters stay cheap);
//!    `handle_state.rs` publishes it (an `ArcSwap`) and wakes waiters, then the events it
//!    explains.
//! 7. `membership.rs`: the router (`mesh_route`) reads [`Membership::view`] for every decision,
//!    lock-free, and compares peers by [`load_ratio`].
//!
//! **A state change, from a task guard to a peer's router.**
//! 1. `load.rs`: a [`TaskGuard`] changes the pending count and wakes the membership task
//!    (as do [`Membership::set_tags`] and the other setters, through `handle_state.rs`).
//! 2. `agent/publication.rs`: the change is coalesced (one version per
//!    [`Timing::state_publish_interval`]), assembled from the local fields and the load,
//!    encoded, queued in foca's broadcasts and pushed to up to
//!    [`Timing::state_push_fanout`] peers through `agent/runtime.rs` and `wire.rs`.
//! 3. On each peer it takes the datagram's path above, from step 1, and the peer's router
//!    sees the new load in its next view.
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
mod budget;
mod counters;
mod discovery;
mod events;
mod handle_state;
mod identity;
mod input;
pub mod keyring;
mod load;
mod membership;
mod node_id;
mod node_state;
mod receive;
#[cfg(feature = "sim")]
pub mod sim;
mod state_table;
mod timing;
mod transport;
mod view;
pub mod wire;

pub use counters::MeshStats;
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
pub use node_state::{
    MAX_ENDPOINT_LEN, MAX_STATE_SIZE, MAX_TAG_KEY_LEN, MAX_TAG_VALUE_LEN, NodeState, StateError,
    Tags, load_ratio,
};
pub use timing::{Timing, TimingError};
pub use transport::{Transport, UdpTransport};
pub use view::{DepartedMember, Departure, LocalStatus, Member, MembershipView, PeerStatus};
pub use wire::{MAX_CLUSTER_LABEL_LEN, WireError};
