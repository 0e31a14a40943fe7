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
//! # Compared with
//!
//! Buildbarn places blobs by rendezvous hashing over a static shard list and mirrors pairs;
//! BuildBuddy uses a consistent-hash ring with a replication factor and hinted handoff, its
//! peers known through Redis or a static list; NativeLink's shard store does not rebalance.
//! Here the placement follows the live membership, which heals itself.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use bazel_remote_apis::build::bazel::remote::execution::v2::{ActionResult, Directory, Tree};
use bytes::Bytes;
use futures::{StreamExt as _, stream::FuturesUnordered};
use mesh::Node;
use mesh_core::NodeId;
use tokio::sync::watch;
use tonic::metadata::MetadataMap;

use crate::{
    ActionCache, ActionCacheError, Cas, CasError, Digest, DigestFunction,
    peers::{PeerConfig, Peers},
    placement::{Ring, Rings},
    stats::Counters,
};

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
    fetching: Arc<Mutex<Fetching>>,
    counters: Arc<Counters>,
    /// The replica leaves for good (a drain with handoff): its handoff then sends what it
    /// holds to every owner that lacks it.
    leaving: Arc<std::sync::atomic::AtomicBool>,
    /// How often each peer was asked for blobs this replica lacked.
    fetch_asks: Arc<Mutex<std::collections::BTreeMap<NodeId, u64>>>,
}

/// Blobs being fetched from peers right now, so concurrent requests fetch each once.
#[derive(Debug, Default)]
struct Fetching {
    next_id: u64,
    /// Digest → (the claim fetching it, a receiver whose sender that claim drops when done).
    by_digest: HashMap<Digest, (u64, watch::Receiver<()>)>,
}

/// The digests one request fetches; dropping it (done, failed or cancelled) releases them
/// and wakes whoever waits.
struct FetchClaim {
    fetching: Arc<Mutex<Fetching>>,
    id: u64,
    digests: Vec<Digest>,
    _done: watch::Sender<()>,
}

impl Drop for FetchClaim {
    fn drop(&mut self) {
        let mut fetching = self
            .fetching
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for digest in &self.digests {
            if fetching
                .by_digest
                .get(digest)
                .is_some_and(|(id, _)| *id == self.id)
            {
                fetching.by_digest.remove(digest);
            }
        }
    }
}

/// Fetches of other requests to wait for.
#[derive(Default)]
struct OtherFetches {
    digests: Vec<Digest>,
    waits: Vec<watch::Receiver<()>>,
}

impl ClusterCas {
    /// Local stores plus the mesh `node` to reach peers through.
    pub(crate) fn new(
        cas: Cas,
        action_cache: ActionCache,
        node: Node,
        config: PeerConfig,
        replication: ReplicationConfig,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            cas,
            action_cache,
            rings: Rings::new(node.clone()),
            leaving: Arc::default(),
            fetch_asks: Arc::default(),
            node,
            config,
            replication,
            fetching: Arc::default(),
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

    /// How often each peer was asked for blobs this replica lacked (a fetch, or asking who
    /// holds them), since start: where reads went — the hinted holder first, then the owners,
    /// every peer only as a last resort.
    pub fn fetch_asks(&self) -> std::collections::BTreeMap<NodeId, u64> {
        self.fetch_asks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn count_ask(&self, node: &NodeId) {
        *self
            .fetch_asks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(node.clone())
            .or_default() += 1;
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

    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
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
    async fn ask_holders(
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

    /// Makes every blob of `digests` present in the local CAS, fetching the missing ones
    /// from peers (hinted nodes first, see the module docs). With `local_only` (the call was
    /// forwarded by a peer) nothing is fetched.
    pub async fn ensure_local(
        &self,
        digests: &[Digest],
        hints: &[NodeId],
        metadata: &MetadataMap,
        local_only: bool,
    ) -> Result<(), MissingBlobs> {
        let missing = self.cas.find_missing(digests);
        if missing.is_empty() {
            return Ok(());
        }
        if local_only {
            return Err(MissingBlobs(missing));
        }
        // Blobs another request of this replica is already fetching are waited for, not
        // fetched twice.
        let (claim, mut others) = self.claim(&missing);
        let mut still_missing = self
            .fetch_missing(claim.digests.clone(), hints, metadata)
            .await;
        drop(claim);
        for wait in &mut others.waits {
            // The sender is dropped when that fetch ends, whatever its outcome.
            let _ = wait.changed().await;
        }
        let not_fetched = self.cas.find_missing(&others.digests);
        if !not_fetched.is_empty() {
            // That fetch failed (its hints may have been worse than ours): try once more.
            still_missing.extend(self.fetch_missing(not_fetched, hints, metadata).await);
        }
        if still_missing.is_empty() {
            Ok(())
        } else {
            Err(MissingBlobs(still_missing))
        }
    }

    /// Claims the fetch of every digest of `missing` that no other request is fetching;
    /// returns the claim and the fetches to wait for.
    fn claim(&self, missing: &[Digest]) -> (FetchClaim, OtherFetches) {
        let mut fetching = self
            .fetching
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        fetching.next_id += 1;
        let id = fetching.next_id;
        let (sender, receiver) = watch::channel(());
        let mut mine = Vec::new();
        let mut others = OtherFetches::default();
        for digest in missing {
            match fetching.by_digest.get(digest) {
                Some((_, wait)) => {
                    others.digests.push(*digest);
                    others.waits.push(wait.clone());
                }
                None => {
                    fetching.by_digest.insert(*digest, (id, receiver.clone()));
                    mine.push(*digest);
                }
            }
        }
        (
            FetchClaim {
                fetching: self.fetching.clone(),
                id,
                digests: mine,
                _done: sender,
            },
            others,
        )
    }

    /// Fetches `missing` from peers — hinted nodes first, then the owners rank by rank, then
    /// whoever has them — and returns what no peer could provide.
    async fn fetch_missing(
        &self,
        mut missing: Vec<Digest>,
        hints: &[NodeId],
        metadata: &MetadataMap,
    ) -> Vec<Digest> {
        if missing.is_empty() {
            return missing;
        }
        let live = self.live_peers();
        let peers = self.peers(metadata);
        let hinted = self.hinted(hints, &live);
        for node in &hinted {
            self.count_ask(node);
            let fetched = peers.fetch(node, &missing, &self.cas).await;
            self.count_fetched(&fetched);
            missing.retain(|d| !fetched.contains(d));
            if missing.is_empty() {
                return missing;
            }
        }
        // The owners: every digest's best owner first, all owners of one rank in parallel.
        let mut owners: HashMap<Digest, Vec<NodeId>> = missing
            .iter()
            .copied()
            .zip(self.owners_to_ask(&missing, &live))
            .collect();
        let mut asked: HashMap<Digest, Vec<NodeId>> = HashMap::new();
        loop {
            let mut by_node: HashMap<NodeId, Vec<Digest>> = HashMap::new();
            for digest in &missing {
                let candidates = owners.entry(*digest).or_default();
                let tried = asked.entry(*digest).or_default();
                while let Some(node) = (!candidates.is_empty()).then(|| candidates.remove(0)) {
                    if !hinted.contains(&node) && !tried.contains(&node) {
                        tried.push(node.clone());
                        by_node.entry(node).or_default().push(*digest);
                        break;
                    }
                }
            }
            if by_node.is_empty() {
                break;
            }
            self.fetch_from(&peers, &by_node, &mut missing).await;
            if missing.is_empty() {
                return missing;
            }
        }
        // Last resort (placement disturbed, e.g. several replicas lost at once): every live
        // peer not asked yet is asked what it has.
        let mut by_node: HashMap<NodeId, Vec<Digest>> = HashMap::new();
        for node in live.iter().filter(|n| !hinted.contains(n)) {
            let digests: Vec<Digest> = missing
                .iter()
                .filter(|d| !asked.get(d).is_some_and(|tried| tried.contains(node)))
                .copied()
                .collect();
            if !digests.is_empty() {
                by_node.insert(node.clone(), digests);
            }
        }
        for node in by_node.keys() {
            self.count_ask(node);
        }
        let holders = self.ask_holders(&peers, by_node).await;
        let mut by_holder: HashMap<NodeId, Vec<Digest>> = HashMap::new();
        for digest in &missing {
            if let Some(node) = holders.get(digest) {
                by_holder.entry(node.clone()).or_default().push(*digest);
            }
        }
        self.fetch_from(&peers, &by_holder, &mut missing).await;
        missing
    }

    /// Fetches each peer's share of `by_node`, all peers in parallel, and takes what arrived
    /// out of `missing`.
    async fn fetch_from(
        &self,
        peers: &Peers<'_>,
        by_node: &HashMap<NodeId, Vec<Digest>>,
        missing: &mut Vec<Digest>,
    ) {
        let fetches: FuturesUnordered<_> = by_node
            .iter()
            .map(|(node, digests)| {
                self.count_ask(node);
                peers.fetch(node, digests, &self.cas)
            })
            .collect();
        let fetched: Vec<Vec<Digest>> = fetches.collect().await;
        for fetched in fetched {
            self.count_fetched(&fetched);
            missing.retain(|d| !fetched.contains(d));
        }
    }

    /// Counts blobs sent to a client (`api`: `ByteStream` or `BatchReadBlobs`).
    pub(crate) fn served(&self, api: &'static str, blobs: u64, bytes: u64) {
        self.counters.served(api, blobs, bytes);
    }

    fn count_fetched(&self, fetched: &[Digest]) {
        if fetched.is_empty() {
            return;
        }
        let bytes: u64 = fetched.iter().map(Digest::size).sum();
        self.counters.fetched(fetched.len() as u64, bytes);
    }

    /// Which of `digests` exist nowhere in the cluster, without fetching them: this
    /// replica's CAS, then — in one parallel round, one call per peer — the hinted nodes and
    /// the owners (current and recent) of whatever is not here. Never asks every peer: its
    /// cost does not grow with the cluster.
    pub async fn find_missing_in_cluster(
        &self,
        digests: &[Digest],
        hints: &[NodeId],
        metadata: &MetadataMap,
    ) -> Vec<Digest> {
        let mut missing = self.cas.find_missing(digests);
        if missing.is_empty() {
            return missing;
        }
        let live = self.live_peers();
        let hinted = self.hinted(hints, &live);
        let mut asks: HashMap<NodeId, Vec<Digest>> = HashMap::new();
        for node in &hinted {
            asks.insert(node.clone(), missing.clone());
        }
        let former = self.rings.former();
        if former.is_empty() {
            // The settled case, on the path of every FindMissingBlobs: owners by position in
            // the current ring, no per-digest allocation (its members are the live ones).
            let ring = self.rings.current();
            let me = ring.position(self.node.node_id());
            let mut by_member: Vec<Vec<Digest>> = vec![Vec::new(); ring.len()];
            let mut best = Vec::with_capacity(self.replication.factor + 1);
            for digest in &missing {
                ring.owner_positions(digest, self.replication.factor, &mut best);
                for &(_, position) in &best {
                    if Some(position) != me {
                        by_member[position].push(*digest);
                    }
                }
            }
            for (position, digests) in by_member.into_iter().enumerate() {
                let node = ring.member(position);
                if !digests.is_empty() && !hinted.contains(node) {
                    asks.entry(node.clone()).or_default().extend(digests);
                }
            }
        } else {
            for (digest, owners) in missing.iter().zip(self.owners_to_ask(&missing, &live)) {
                for node in owners {
                    if !hinted.contains(&node) {
                        asks.entry(node).or_default().push(*digest);
                    }
                }
            }
        }
        let peers = self.peers(metadata);
        let holders = self.ask_holders(&peers, asks).await;
        missing.retain(|d| !holders.contains_key(d));
        missing
    }

    /// A whole blob, fetched from a peer if it is not here (unless `local_only`).
    pub async fn read(
        &self,
        digest: &Digest,
        hints: &[NodeId],
        metadata: &MetadataMap,
        local_only: bool,
    ) -> Result<Bytes, ClusterError> {
        if let Some(bytes) = self.cas.read(digest).await? {
            return Ok(bytes);
        }
        self.ensure_local(&[*digest], hints, metadata, local_only)
            .await?;
        self.cas
            .read(digest)
            .await?
            .ok_or_else(|| MissingBlobs(vec![*digest]).into())
    }

    /// A blob decoded as the protobuf message `M` (`kind` names it in errors).
    pub async fn read_message<M: prost::Message + Default>(
        &self,
        digest: &Digest,
        kind: &'static str,
        hints: &[NodeId],
        metadata: &MetadataMap,
        local_only: bool,
    ) -> Result<M, ClusterError> {
        if digest.size() > MAX_MESSAGE_SIZE {
            return Err(ClusterError::MessageTooLarge {
                digest: *digest,
                kind,
            });
        }
        let bytes = self.read(digest, hints, metadata, local_only).await?;
        M::decode(bytes).map_err(|source| ClusterError::Malformed {
            digest: *digest,
            kind,
            source,
        })
    }

    /// The cached result of `action`: from the local action cache, or (unless `local_only`)
    /// from the action's owners, asked in parallel; a result found there is kept locally.
    ///
    /// Unless `local_only`, a hit is served only if all its outputs exist somewhere in the
    /// cluster; one whose outputs are gone is a miss. With `local_only` (a peer asking) the
    /// local entry is returned as it is and the asking replica checks.
    pub async fn action_result(
        &self,
        action: &Digest,
        metadata: &MetadataMap,
        local_only: bool,
    ) -> Result<Option<ActionResult>, ClusterError> {
        if let Some(result) = self.action_cache.get(action).await? {
            if local_only
                || self
                    .outputs_available(&result, action.function(), &[], metadata)
                    .await?
            {
                return Ok(Some(result));
            }
            // An owner may hold a newer result whose outputs still exist.
            tracing::info!(%action, "a cached result's outputs are gone; asking its owners");
        }
        if local_only {
            return Ok(None);
        }
        let live = self.live_peers();
        let owners = self
            .owners_to_ask(std::slice::from_ref(action), &live)
            .pop()
            .unwrap_or_default();
        if owners.is_empty() {
            return Ok(None);
        }
        let peers = self.peers(metadata);
        let mut asks: FuturesUnordered<_> = owners
            .iter()
            .map(|node| async move { (node, peers.action_result(node, action).await) })
            .collect();
        while let Some((node, answer)) = asks.next().await {
            match answer {
                Ok(Some(result)) => {
                    let mut hints = vec![node.clone()];
                    if let Some(worker) = worker_of(&result) {
                        hints.insert(0, worker);
                    }
                    if !self
                        .outputs_available(&result, action.function(), &hints, metadata)
                        .await?
                    {
                        continue;
                    }
                    self.action_cache.put(*action, &result).await?;
                    self.counters.peer_cache_hit();
                    return Ok(Some(result));
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::debug!(peer = %node, %error, "action cache lookup on a peer failed");
                }
            }
        }
        Ok(None)
    }

    /// Copies `digests` (all present here) to their placement: for each, the first `R`
    /// replicas of its ranking other than this one, each asked first what it has. A replica
    /// that cannot be reached is replaced by the next in the ranking. Returns the digests
    /// that got fewer than `R` copies elsewhere (all of them on a replica with no peers).
    pub async fn replicate(&self, digests: &[Digest], metadata: &MetadataMap) -> Vec<Digest> {
        let ring = self.rings.current();
        let mut plans: Vec<Plan> = Vec::new();
        let mut seen = HashSet::new();
        for digest in digests {
            if digest.size() == 0 || !seen.insert(*digest) {
                continue;
            }
            plans.push(Plan::new(
                *digest,
                &ring,
                self.node.node_id(),
                self.replication.factor,
            ));
        }
        let peers = self.peers(metadata);
        let mut failed: HashSet<NodeId> = HashSet::new();
        loop {
            let mut by_node: HashMap<NodeId, Vec<usize>> = HashMap::new();
            // Each round sends every digest to as many candidates as it still needs, in
            // parallel; a failure is made up for with the next candidates in the next round.
            for (index, plan) in plans.iter_mut().enumerate() {
                let mut assigned = 0;
                while assigned < plan.needed {
                    let Some(node) = plan.next_candidate() else {
                        break;
                    };
                    if failed.contains(&node) {
                        continue;
                    }
                    by_node.entry(node).or_default().push(index);
                    assigned += 1;
                }
            }
            if by_node.is_empty() {
                break;
            }
            let pushes: FuturesUnordered<_> = by_node
                .into_iter()
                .map(|(node, indices)| {
                    let digests: Vec<Digest> = indices.iter().map(|i| plans[*i].digest).collect();
                    let peers = &peers;
                    async move {
                        let result = peers.push(&node, &digests, &self.cas).await;
                        (node, indices, result)
                    }
                })
                .collect();
            let results: Vec<_> = pushes.collect().await;
            for (node, indices, result) in results {
                match result {
                    Ok(pushed) => {
                        self.counters.replicated(pushed.sent, pushed.bytes);
                        for index in indices {
                            if pushed.held.contains(&plans[index].digest) {
                                plans[index].needed -= 1;
                            }
                        }
                    }
                    Err(error) => {
                        tracing::warn!(peer = %node, %error, "could not place blobs on a peer; trying the next in their ranking");
                        failed.insert(node);
                    }
                }
            }
        }
        let short: Vec<Digest> = plans
            .iter()
            .filter(|plan| plan.needed > 0 && plan.possible)
            .map(|plan| plan.digest)
            .collect();
        if !short.is_empty() {
            tracing::warn!(
                blobs = short.len(),
                "fewer copies than the replication factor: handoff will retry"
            );
        }
        short
    }

    /// Stores `result` for `action` here and on the action's placement (the first `R`
    /// replicas of its ranking other than this one).
    pub async fn store_result(
        &self,
        action: Digest,
        result: &ActionResult,
        metadata: &MetadataMap,
    ) -> Result<(), ClusterError> {
        self.action_cache.put(action, result).await?;
        let ring = self.rings.current();
        let mut plan = Plan::new(action, &ring, self.node.node_id(), self.replication.factor);
        let peers = self.peers(metadata);
        while plan.needed > 0 {
            let Some(node) = plan.next_candidate() else {
                break;
            };
            match peers.put_action_result(&node, &action, result).await {
                Ok(()) => plan.needed -= 1,
                Err(error) => {
                    tracing::warn!(peer = %node, %action, %error, "could not place an action result on a peer; trying the next");
                }
            }
        }
        Ok(())
    }

    /// Copies every blob an action result names (output files, the trees of output
    /// directories and every file in them, stdout, stderr) to its placement. The trees are
    /// read here: the replica that ran the action holds them. The result's digests are of
    /// `function`, the action's.
    pub async fn replicate_outputs(
        &self,
        result: &ActionResult,
        function: DigestFunction,
        metadata: &MetadataMap,
    ) {
        let Ok(mut digests) = result_digests(result, function) else {
            return;
        };
        for directory in &result.output_directories {
            let Some(tree) = tree_of(directory, function) else {
                continue;
            };
            if let Ok(Some(bytes)) = self.cas.read(&tree).await
                && let Ok(tree) = <Tree as prost::Message>::decode(bytes)
                && let Ok(mut files) = tree_file_digests(&tree, function)
            {
                digests.append(&mut files);
            }
        }
        self.replicate(&digests, metadata).await;
    }

    /// Whether every output of `result` exists somewhere in the cluster. Output directories'
    /// `Tree`s are read (fetched if needed) so the files inside them are checked too. The
    /// result's digests are of `function`.
    async fn outputs_available(
        &self,
        result: &ActionResult,
        function: DigestFunction,
        hints: &[NodeId],
        metadata: &MetadataMap,
    ) -> Result<bool, ClusterError> {
        let mut hints = hints.to_vec();
        if let Some(worker) = worker_of(result)
            && !hints.contains(&worker)
        {
            hints.push(worker);
        }
        let mut digests = match result_digests(result, function) {
            Ok(digests) => digests,
            Err(_) => return Ok(false),
        };
        for directory in &result.output_directories {
            let Some(tree) = tree_of(directory, function) else {
                return Ok(false);
            };
            let tree: Tree = match self
                .read_message(&tree, "Tree", &hints, metadata, false)
                .await
            {
                Ok(tree) => tree,
                Err(
                    ClusterError::Missing(_)
                    | ClusterError::Malformed { .. }
                    | ClusterError::MessageTooLarge { .. },
                ) => return Ok(false),
                Err(other) => return Err(other),
            };
            match tree_file_digests(&tree, function) {
                Ok(mut files) => digests.append(&mut files),
                Err(_) => return Ok(false),
            }
        }
        Ok(self
            .find_missing_in_cluster(&digests, &hints, metadata)
            .await
            .is_empty())
    }
}

/// Where one digest's copies go: down its ranking, skipping this replica, until `R` peers
/// hold it.
struct Plan {
    digest: Digest,
    candidates: VecDeque<NodeId>,
    needed: usize,
    /// Whether the ranking had `R` peers at all (a smaller cluster keeps what it can).
    possible: bool,
}

impl Plan {
    fn new(digest: Digest, ring: &Ring, local: &NodeId, factor: usize) -> Self {
        let candidates: VecDeque<NodeId> = ring
            .ranked(&digest)
            .into_iter()
            .filter(|node| *node != local)
            .cloned()
            .collect();
        let needed = factor.min(candidates.len());
        Self {
            digest,
            possible: candidates.len() >= factor,
            candidates,
            needed,
        }
    }

    fn next_candidate(&mut self) -> Option<NodeId> {
        self.candidates.pop_front()
    }
}

/// The digest of an output directory's `Tree`, if it names a valid one.
fn tree_of(
    directory: &bazel_remote_apis::build::bazel::remote::execution::v2::OutputDirectory,
    function: DigestFunction,
) -> Option<Digest> {
    directory
        .tree_digest
        .as_ref()
        .and_then(|d| Digest::from_proto(d, "tree_digest", function).ok())
}

/// The replica that ran the action, as recorded in its result.
pub(crate) fn worker_of(result: &ActionResult) -> Option<NodeId> {
    result
        .execution_metadata
        .as_ref()
        .and_then(|m| NodeId::new(&m.worker).ok())
}

/// Every blob an action result names directly: output files, trees, stdout and stderr; its
/// digests are of `function`, the action's.
pub(crate) fn result_digests(
    result: &ActionResult,
    function: DigestFunction,
) -> Result<Vec<Digest>, crate::DigestError> {
    let mut digests = Vec::new();
    for file in &result.output_files {
        digests.push(Digest::from_required(
            file.digest.as_ref(),
            "output_files.digest",
            function,
        )?);
    }
    for directory in &result.output_directories {
        digests.push(Digest::from_required(
            directory.tree_digest.as_ref(),
            "output_directories.tree_digest",
            function,
        )?);
    }
    for (digest, field) in [
        (&result.stdout_digest, "stdout_digest"),
        (&result.stderr_digest, "stderr_digest"),
    ] {
        if let Some(digest) = digest {
            digests.push(Digest::from_proto(digest, field, function)?);
        }
    }
    Ok(digests)
}

/// Every file blob in a `Tree` whose digests are of `function`.
pub(crate) fn tree_file_digests(
    tree: &Tree,
    function: DigestFunction,
) -> Result<Vec<Digest>, crate::DigestError> {
    let mut digests = Vec::new();
    let directories: Vec<&Directory> = tree.root.iter().chain(tree.children.iter()).collect();
    for directory in directories {
        for file in &directory.files {
            digests.push(Digest::from_required(
                file.digest.as_ref(),
                "files.digest",
                function,
            )?);
        }
    }
    let unique: HashSet<Digest> = digests.drain(..).collect();
    Ok(unique.into_iter().collect())
}
