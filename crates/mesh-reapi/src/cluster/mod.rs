//! One CAS and one action cache for the whole cluster, with no shared storage and no
//! external store.
//!
//! # Placement
//!
//! Every digest (a blob's, or an action's for its cached result) has `R` **owners**: the first
//! `R` replicas of its rendezvous ranking over the live, non-draining members
//! ([`crate::placement`]; `R` is [`ReplicationConfig::factor`], 2 by default). Nothing
//! is looked up in a directory: every replica computes the same owners from its own view of
//! the membership, which SWIM keeps converged.
//!
//! * **Writes are placed before they are acknowledged.** A blob uploaded to a replica
//!   (`ByteStream.Write`, `BatchUpdateBlobs`) and the outputs of an action a replica ran are
//!   stored there *and* copied to the first `R` replicas of the digest's ranking other than the
//!   writer itself, before the upload is answered or the `ExecuteResponse` sent. An action
//!   result goes to its action's owners the same way. So the `R` owners hold every blob, and a
//!   writer that is an owner itself leaves one copy more: a blob the cluster acknowledged
//!   survives the loss of its writer and any one more replica (`R` = 2). A peer that cannot
//!   take a copy is replaced by the next replica of the ranking.
//! * **Lookups ask the owners only.** `FindMissingBlobs` (and the check that a cached result's
//!   outputs exist) asks this replica's own store, then the owners of what it lacks: one
//!   batched call per owner, all in parallel (`mesh.reapi.v1.Presence/Has`, packed digests and
//!   a bitmap back: [`crate::presence`]), so its cost is `O(R)` per digest whatever the size
//!   of the cluster. `GetActionResult` asks the action's owners.
//! * **Membership changes move data in the background** ([`crate::handoff`]): when the
//!   placement members change, every replica copies the blobs and results it holds to their
//!   new owners that lack them. Until that is done, lookups also ask the owners under the
//!   placements of the last minutes ("former owners"), so nothing is reported missing
//!   meanwhile. A replica that comes back on its data directory is an owner again and already
//!   holds its share: handoff asks before it copies, so nothing is sent twice.
//! * **Reads fetch through.** A replica that needs a blob it lacks (to run an action, or to
//!   serve a read) asks hinted nodes first — the replica that forwarded the `Execute` (clients
//!   upload where they talk) and the worker named in a result — then the owners, and as a last
//!   resort every live peer; the copy it fetched stays (LRU-evicted like any other blob).
//! * **One hop.** Every call between replicas carries `x-mesh-forwarded-by`, and a replica
//!   answering such a call uses its own stores only: a push is stored and not pushed further, a
//!   lookup never fans out, and nothing can loop.
//!
//! # What a client may rely on
//!
//! A blob that an upload acknowledged, that `FindMissingBlobs` did not list, or that an action
//! result names stays readable through every live replica after any one replica crashes, as
//! long as no replica evicts it: eviction is per replica (least recently used under its bound),
//! so size each replica's CAS for the blobs a build needs for its life (Bazel 7 assumes
//! `--experimental_remote_cache_ttl`, 3 hours by default). An action-cache entry is served only
//! while every blob it names exists somewhere in the cluster; one whose outputs are gone is a
//! miss, and the action runs again.
//!
//! # Where each part is
//!
//! One value, [`Fetch`], says how far a request may reach (this replica, or the cluster) and
//! whom to ask first; the store decides local against cluster from it. Reads that fetch
//! through are in `cluster/fetch.rs`, lookups (`FindMissingBlobs`, cached results) in
//! `cluster/lookup.rs`, placed writes in `cluster/replicate.rs`, and what an `ActionResult`
//! names in `cluster/results.rs`; this file holds the store, its owners and its peers.
//!
//! # Compared with
//!
//! Buildbarn places blobs by rendezvous hashing over a static shard list and mirrors pairs;
//! BuildBuddy uses a consistent-hash ring with a replication factor and hinted handoff, its
//! peers known through Redis or a static list; NativeLink's shard store does not rebalance.
//! Here the placement follows the live membership, which heals itself.

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures::{StreamExt as _, stream::FuturesUnordered};

use mesh::Node;
use mesh_core::NodeId;
use mesh_route::forwarded_by;
use tonic::metadata::MetadataMap;

use crate::{
    ActionCache, ActionCacheError, Cas, CasError, Digest,
    peers::{PeerConfig, Peers},
    placement::Rings,
    stats::ReapiCounters,
};

mod fetch;
mod lookup;
mod replicate;
mod results;

use fetch::InFlightFetches;
pub(crate) use fetch::{STREAMED_FETCH_MIN, StreamedFetch};
pub(crate) use replicate::{TEE_MIN, Tee};
pub(crate) use results::result_digests;

/// How far one request's reads and lookups may reach, and on whose behalf: the request's
/// metadata (its credentials go with every call to a peer), the replicas likely to hold what
/// it needs (asked first), and whether peers may be asked at all.
///
/// The cluster store decides local against cluster from this one value: a call a peer
/// forwarded (`x-mesh-forwarded-by`) is answered from this replica's stores only, so no call
/// between replicas makes another ("one hop", see the module docs).
#[derive(Debug, Clone, Default)]
pub struct Fetch {
    metadata: MetadataMap,
    hints: Vec<NodeId>,
    local_only: bool,
}

impl Fetch {
    /// For answering a client's call on the CAS or the action cache: the whole cluster, or
    /// only this replica when a peer forwarded the call.
    pub fn answering(metadata: &MetadataMap) -> Self {
        Self {
            metadata: metadata.clone(),
            hints: Vec::new(),
            local_only: forwarded_by(metadata).is_some(),
        }
    }

    /// For work this replica does on a request's behalf (reading an `Action`, running it):
    /// always the whole cluster, and the replica that forwarded the request is asked first,
    /// since clients upload where they talk.
    pub fn working_for(metadata: &MetadataMap) -> Self {
        Self {
            metadata: metadata.clone(),
            hints: forwarded_by(metadata).into_iter().collect(),
            local_only: false,
        }
    }

    /// This replica's stores only.
    pub fn local(metadata: &MetadataMap) -> Self {
        Self {
            metadata: metadata.clone(),
            hints: Vec::new(),
            local_only: true,
        }
    }

    /// The same, with `nodes` asked before the owners (after the hints already named).
    #[must_use]
    pub fn hinting(mut self, nodes: impl IntoIterator<Item = NodeId>) -> Self {
        for node in nodes {
            if !self.hints.contains(&node) {
                self.hints.push(node);
            }
        }
        self
    }

    /// Whether only this replica's stores answer.
    pub fn is_local(&self) -> bool {
        self.local_only
    }

    /// The request's metadata, passed on to peers.
    pub fn metadata(&self) -> &MetadataMap {
        &self.metadata
    }

    /// The replicas asked first, in order.
    pub fn hints(&self) -> &[NodeId] {
        &self.hints
    }
}

/// How many copies the cluster keeps and how it moves them when the membership changes.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct ReplicationConfig {
    /// `R`: how many replicas own each blob and each action result (see the module docs).
    /// At least 1; 1 keeps a single owner copy (plus the writer's own), so a crash can lose
    /// blobs. Default 2.
    pub factor: usize,
    /// How long the placement members must stay unchanged before handoff copies blobs to
    /// their new owners (a burst of joins moves data once). Default 1 s.
    pub handoff_delay: Duration,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            factor: 2,
            handoff_delay: Duration::from_secs(1),
        }
    }
}

/// Blobs that are on no live replica (REAPI: `FAILED_PRECONDITION` with a `MISSING`
/// violation per digest).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} blob(s) are missing from every replica: {}", .0.len(), list(.0))]
pub struct MissingBlobs(pub Vec<Digest>);

fn list(digests: &[Digest]) -> String {
    const SHOWN: usize = 5;
    let mut names: Vec<String> = digests.iter().take(SHOWN).map(Digest::to_string).collect();
    if digests.len() > SHOWN {
        names.push(format!("and {} more", digests.len() - SHOWN));
    }
    names.join(", ")
}

/// A cluster-wide blob or action cache operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// Blobs are nowhere.
    #[error(transparent)]
    Missing(#[from] MissingBlobs),
    /// The local CAS failed.
    #[error(transparent)]
    Cas(#[from] CasError),
    /// The local action cache failed.
    #[error(transparent)]
    ActionCache(#[from] ActionCacheError),
    /// A stored message (Directory, Tree, Action, Command) does not decode.
    #[error("blob {digest} is not a valid {kind} message: {source}")]
    Malformed {
        /// The blob.
        digest: Digest,
        /// The message type expected.
        kind: &'static str,
        /// The decoding error.
        #[source]
        source: prost::DecodeError,
    },
    /// A blob named as a message (Action, Command, Directory, Tree) is too large to be one.
    #[error(
        "blob {digest} is named as a {kind} message, but its {} bytes exceed the {MAX_MESSAGE_SIZE} bytes a message may have here",
        digest.size()
    )]
    MessageTooLarge {
        /// The blob.
        digest: Digest,
        /// The message type expected.
        kind: &'static str,
    },
}

/// The largest blob read into memory as a protobuf message (an Action, Command, Directory or
/// Tree): larger ones are refused rather than loaded.
pub const MAX_MESSAGE_SIZE: u64 = 64 * 1024 * 1024;

/// The cluster's CAS and action cache as seen from one replica: its own stores, and its peers
/// reached through the mesh (see the module docs).
#[derive(Debug, Clone)]
pub struct ClusterCas {
    cas: Cas,
    action_cache: ActionCache,
    node: Node,
    config: PeerConfig,
    replication: ReplicationConfig,
    rings: Rings,
    fetching: InFlightFetches,
    counters: Arc<ReapiCounters>,
    /// The replica leaves for good (a drain with handoff): its handoff then sends what it
    /// holds to every owner that lacks it.
    leaving: Arc<std::sync::atomic::AtomicBool>,
}

impl ClusterCas {
    /// Local stores plus the mesh `node` to reach peers through.
    pub(crate) fn new(
        cas: Cas,
        action_cache: ActionCache,
        node: Node,
        config: PeerConfig,
        replication: ReplicationConfig,
        counters: Arc<ReapiCounters>,
    ) -> Self {
        Self {
            cas,
            action_cache,
            rings: Rings::new(node.clone()),
            leaving: Arc::default(),
            node,
            config,
            replication,
            fetching: InFlightFetches::default(),
            counters,
        }
    }

    /// Whether this replica still has to hand blobs to new owners: the placement members
    /// changed since its last completed handoff pass ([`crate::handoff`]).
    pub fn handoff_pending(&self) -> bool {
        self.rings.handoff_pending()
    }

    /// Whether this replica is still in the current placement (a draining one leaves it once
    /// its draining state reaches its own view).
    pub(crate) fn placed_here(&self) -> bool {
        self.rings.current().position(self.node.node_id()).is_some()
    }

    /// The local CAS.
    pub fn local(&self) -> &Cas {
        &self.cas
    }

    /// The local action cache.
    pub fn local_action_cache(&self) -> &ActionCache {
        &self.action_cache
    }

    /// How many copies are kept.
    pub fn replication(&self) -> ReplicationConfig {
        self.replication
    }

    pub(crate) fn node(&self) -> &Node {
        &self.node
    }

    pub(crate) fn rings(&self) -> &Rings {
        &self.rings
    }

    /// Marks the replica as leaving for good: while it drains, its handoff sends everything
    /// it holds to whichever owner lacks it ([`crate::handoff`]); a replica that drains to
    /// come back (a restart) hands nothing over.
    pub(crate) fn set_leaving(&self) {
        self.leaving
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether [`ClusterCas::set_leaving`] was called.
    pub(crate) fn leaving(&self) -> bool {
        self.leaving.load(std::sync::atomic::Ordering::Acquire)
    }

    pub(crate) fn counters(&self) -> &ReapiCounters {
        &self.counters
    }

    /// Counts blobs sent to a client (`api`: `ByteStream` or `BatchReadBlobs`).
    pub(crate) fn served(&self, api: &'static str, blobs: u64, bytes: u64) {
        self.counters.served(api, blobs, bytes);
    }

    /// The replicas that own `digest` now (its first `R` by rendezvous ranking), best first.
    pub fn owners(&self, digest: &Digest) -> Vec<NodeId> {
        self.rings
            .current()
            .owners(digest, self.replication.factor)
            .into_iter()
            .cloned()
            .collect()
    }

    fn is_self(&self, node: &NodeId) -> bool {
        node == self.node.node_id()
    }

    /// Live peers with a gRPC endpoint, in node id order.
    fn live_peers(&self) -> Vec<NodeId> {
        let mut peers: Vec<NodeId> = self
            .node
            .view()
            .peers()
            .iter()
            .filter(|peer| peer.state().is_some_and(|s| s.grpc_endpoint.is_some()))
            .map(|peer| peer.node_id().clone())
            .collect();
        peers.sort();
        peers
    }

    pub(crate) fn peers<'a>(&'a self, metadata: &'a MetadataMap) -> Peers<'a> {
        Peers {
            router: self.node.router(),
            metadata,
            config: self.config,
        }
    }

    /// The hinted nodes that are live peers, in order, each once.
    fn hinted(&self, hints: &[NodeId], live: &[NodeId]) -> Vec<NodeId> {
        let mut order: Vec<NodeId> = Vec::new();
        for node in hints {
            if live.binary_search(node).is_ok() && !order.contains(node) {
                order.push(node.clone());
            }
        }
        order
    }

    /// For each digest, the peers to ask for it: its owners under the current placement, then
    /// those under the placements of the last minutes (while handoff moves data), only live
    /// peers, never this replica.
    fn owners_to_ask(&self, digests: &[Digest], live: &[NodeId]) -> Vec<Vec<NodeId>> {
        let current = self.rings.current();
        let former = self.rings.former();
        let r = self.replication.factor;
        digests
            .iter()
            .map(|digest| {
                let mut owners: Vec<NodeId> = Vec::with_capacity(r);
                for ring in std::iter::once(&current).chain(former.iter()) {
                    for node in ring.owners(digest, r) {
                        if !self.is_self(node)
                            && !owners.contains(node)
                            && live.binary_search(node).is_ok()
                        {
                            owners.push(node.clone());
                        }
                    }
                }
                owners
            })
            .collect()
    }

    /// Which of `digests` the given peers hold, asking each peer once for all the digests it
    /// is asked about, all peers in parallel.
    pub(super) async fn ask_holders(
        &self,
        peers: &Peers<'_>,
        asks: HashMap<NodeId, Vec<Digest>>,
    ) -> HashMap<Digest, NodeId> {
        let calls: FuturesUnordered<_> = asks
            .into_iter()
            .map(|(node, digests)| async move {
                let answer = peers.has(&node, &digests).await;
                (node, answer)
            })
            .collect();
        let answers: Vec<_> = calls.collect().await;
        let mut holders = HashMap::new();
        for (node, answer) in answers {
            match answer {
                Ok(present) => {
                    for digest in present {
                        holders.entry(digest).or_insert_with(|| node.clone());
                    }
                }
                Err(error) => tracing::debug!(peer = %node, %error, "blob lookup on a peer failed"),
            }
        }
        holders
    }
}
