//! Blobs and action results across replicas, with no shared storage.
//!
//! # The design: fetch-through with hints
//!
//! Every replica owns its CAS and action cache ([`Cas`], [`ActionCache`]) and keeps whatever it
//! stored or used. Nothing is placed or replicated ahead of need. When a replica needs a blob
//! it lacks, it finds it on a peer and fetches a copy (which it then keeps, like any other
//! blob):
//!
//! 1. **Hints first.** The node most likely to have the blob is asked directly, before anyone
//!    else: for an action's inputs the node that forwarded the `Execute` (clients upload inputs
//!    to the replica they talk to, which is the one that forwards); for outputs the replica
//!    that ran the action (`ExecutedActionMetadata.worker`); and any node remembered from a
//!    recent action result or fetch (a bounded location cache). A hinted peer is asked for the
//!    blobs themselves (`BatchReadBlobs` for small ones, `ByteStream.Read` for large ones): in
//!    the common case one round trip, no lookup.
//! 2. **Then everyone.** Whatever is still missing is looked up with one batched
//!    `FindMissingBlobs` per live peer, in parallel, and fetched from a peer that has it.
//! 3. **One hop.** Every peer call carries `x-mesh-forwarded-by`, and a replica answering such
//!    a call answers from its own stores only, so a lookup never fans out further and can
//!    never loop.
//!
//! The action cache works the same way: a local miss asks every live peer's action cache in
//! parallel (`GetActionResult`, answered locally by each), keeps the first hit, and remembers
//! where its outputs are (the answering peer and the worker) so reading them is a hinted
//! fetch. Before a result is served as a hit by the replica the client talks to, its outputs
//! are checked to exist somewhere in the cluster (the files of output directories included), so
//! a result whose outputs were evicted everywhere is a miss and the action runs again, rather
//! than a hit the client cannot download.
//!
//! # Why this design, and what it costs
//!
//! * **No placement.** Rendezvous placement (each blob stored on the top-k replicas by
//!   `hash(digest, node)`, as Buildbarn's sharded CAS does) finds any blob in one hop, but it
//!   copies every blob at write time whether or not anyone needs it elsewhere, and every
//!   membership change moves ownership (and must move data, or miss). Build traffic is
//!   local: inputs are uploaded where they are used, outputs are mostly read through the
//!   replica that produced them or the one the client talks to. Fetch-through moves only the
//!   blobs that are actually needed elsewhere, and a replica joining or leaving changes
//!   nothing for the others.
//! * **The cost** is the lookup when no hint is right: one `FindMissingBlobs` per live peer
//!   (parallel, bounded by [`PeerConfig::call_timeout`]), and for the action cache one
//!   `GetActionResult` per live peer on every local miss. That is fine for clusters of a
//!   handful to a few dozen replicas on one network; for hundreds, rendezvous placement of
//!   action-cache entries would bound it and can be added behind the same interface.
//! * **Durability** is per replica: a blob lives as long as some replica keeps it. If the only
//!   copy is evicted or its replica dies, the client gets `FAILED_PRECONDITION` with the
//!   missing digests (Bazel re-uploads and retries) or an action-cache miss (the action runs
//!   again). No shared directory is needed; a replica's data dir may live on any file system
//!   (a network mount included), but two replicas never share one: each indexes and evicts
//!   its own.
//! * Concurrent requests on one replica that need the same missing blob fetch it once: the
//!   first claims it, the others wait for that fetch (and try themselves only if it failed).

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
};

use bazel_remote_apis::build::bazel::remote::execution::v2::{ActionResult, Directory, Tree};
use bytes::Bytes;
use futures::{StreamExt as _, stream::FuturesUnordered};
use mesh::Node;
use mesh_core::{NodeId, PeerStatus};
use tokio::sync::watch;
use tonic::metadata::MetadataMap;

use crate::{
    ActionCache, ActionCacheError, Cas, CasError, Digest,
    peers::{PeerConfig, Peers},
    stats::Counters,
};

/// How many blob locations the location cache remembers.
const LOCATION_CACHE_ENTRIES: usize = 65_536;

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

/// Where to look for blobs and action results: this replica first, then its peers.
#[derive(Debug, Clone)]
pub struct ClusterCas {
    cas: Cas,
    action_cache: ActionCache,
    node: Node,
    config: PeerConfig,
    locations: Arc<Mutex<Locations>>,
    fetching: Arc<Mutex<Fetching>>,
    counters: Arc<Counters>,
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

/// Which node recently had which blob (bounded, oldest forgotten first).
#[derive(Debug, Default)]
struct Locations {
    by_digest: HashMap<Digest, NodeId>,
    order: VecDeque<Digest>,
}

impl Locations {
    fn record(&mut self, digest: Digest, node: &NodeId) {
        if self.by_digest.insert(digest, node.clone()).is_none() {
            self.order.push_back(digest);
            while self.order.len() > LOCATION_CACHE_ENTRIES {
                if let Some(old) = self.order.pop_front() {
                    self.by_digest.remove(&old);
                }
            }
        }
    }
}

impl ClusterCas {
    /// Local stores plus the mesh `node` to reach peers through.
    pub(crate) fn new(
        cas: Cas,
        action_cache: ActionCache,
        node: Node,
        config: PeerConfig,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            cas,
            action_cache,
            node,
            config,
            locations: Arc::default(),
            fetching: Arc::default(),
            counters,
        }
    }

    /// The local CAS.
    pub fn local(&self) -> &Cas {
        &self.cas
    }

    /// The local action cache.
    pub fn local_action_cache(&self) -> &ActionCache {
        &self.action_cache
    }

    fn locations(&self) -> MutexGuard<'_, Locations> {
        self.locations
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Remembers that `node` has these blobs (for example the outputs of an action it ran).
    pub fn record_locations(&self, node: &NodeId, digests: impl IntoIterator<Item = Digest>) {
        if node == self.node.node_id() {
            return;
        }
        let mut locations = self.locations();
        for digest in digests {
            locations.record(digest, node);
        }
    }

    /// Live peers with a gRPC endpoint, in node id order.
    fn live_peers(&self) -> Vec<NodeId> {
        self.node
            .view()
            .peers()
            .iter()
            .filter(|peer| peer.status() == PeerStatus::Alive)
            .filter(|peer| {
                peer.state()
                    .is_some_and(|state| state.grpc_endpoint.is_some())
            })
            .map(|peer| peer.node_id().clone())
            .collect()
    }

    fn peers<'a>(&'a self, metadata: &'a MetadataMap) -> Peers<'a> {
        Peers {
            router: self.node.router(),
            metadata,
            config: self.config,
        }
    }

    /// Hinted nodes in order: the explicit ones, then remembered locations of `digests`;
    /// only live peers, each once.
    fn hinted(&self, hints: &[NodeId], digests: &[Digest], live: &[NodeId]) -> Vec<NodeId> {
        let mut order: Vec<NodeId> = Vec::new();
        let remembered: Vec<NodeId> = {
            let locations = self.locations();
            digests
                .iter()
                .filter_map(|d| locations.by_digest.get(d).cloned())
                .collect()
        };
        for node in hints.iter().cloned().chain(remembered) {
            if live.contains(&node) && !order.contains(&node) {
                order.push(node);
            }
        }
        order
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

    /// Fetches `missing` from peers (hinted nodes first, then whoever has them); returns
    /// what no peer could provide.
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
        let hinted = self.hinted(hints, &missing, &live);
        for node in &hinted {
            let fetched = peers.fetch(node, &missing, &self.cas).await;
            self.count_fetched(&fetched);
            missing.retain(|d| !fetched.contains(d));
            if missing.is_empty() {
                return missing;
            }
        }
        let others: Vec<&NodeId> = live.iter().filter(|n| !hinted.contains(n)).collect();
        let holders = self.find_holders(&peers, &others, &missing).await;
        let mut by_node: HashMap<NodeId, Vec<Digest>> = HashMap::new();
        for digest in &missing {
            if let Some(node) = holders.get(digest) {
                by_node.entry(node.clone()).or_default().push(*digest);
            }
        }
        let fetches: FuturesUnordered<_> = by_node
            .iter()
            .map(|(node, digests)| peers.fetch(node, digests, &self.cas))
            .collect();
        let fetched: Vec<Vec<Digest>> = fetches.collect().await;
        for fetched in fetched {
            self.count_fetched(&fetched);
            missing.retain(|d| !fetched.contains(d));
        }
        missing
    }

    fn count_fetched(&self, fetched: &[Digest]) {
        if fetched.is_empty() {
            return;
        }
        let bytes: u64 = fetched.iter().map(Digest::size).sum();
        self.counters.fetched(fetched.len() as u64, bytes);
        metrics::counter!("mesh_reapi_blobs_fetched_total").increment(fetched.len() as u64);
        metrics::counter!("mesh_reapi_bytes_fetched_total").increment(bytes);
    }

    /// For each of `digests`, the first of `nodes` (asked in parallel) that has it.
    async fn find_holders(
        &self,
        peers: &Peers<'_>,
        nodes: &[&NodeId],
        digests: &[Digest],
    ) -> HashMap<Digest, NodeId> {
        let asks: FuturesUnordered<_> = nodes
            .iter()
            .map(|node| async move { ((*node).clone(), peers.has(node, digests).await) })
            .collect();
        let answers: Vec<_> = asks.collect().await;
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

    /// Which of `digests` exist nowhere in the cluster (local CAS, then hinted peers, then
    /// every live peer), without fetching them.
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
        let peers = self.peers(metadata);
        let hinted = self.hinted(hints, &missing, &live);
        for node in &hinted {
            match peers.has(node, &missing).await {
                Ok(present) => {
                    self.record_locations(node, present.iter().copied());
                    missing.retain(|d| !present.contains(d));
                }
                Err(error) => tracing::debug!(peer = %node, %error, "blob lookup on a peer failed"),
            }
            if missing.is_empty() {
                return missing;
            }
        }
        let others: Vec<&NodeId> = live.iter().filter(|n| !hinted.contains(n)).collect();
        let holders = self.find_holders(&peers, &others, &missing).await;
        for (digest, node) in &holders {
            self.record_locations(node, [*digest]);
        }
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
    /// from the first peer that has one, which is then kept locally.
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
            if local_only || self.outputs_available(&result, &[], metadata).await? {
                return Ok(Some(result));
            }
            // A peer may hold a newer result whose outputs still exist.
            tracing::info!(%action, "a cached result's outputs are gone; asking peers");
        }
        if local_only {
            return Ok(None);
        }
        let live = self.live_peers();
        if live.is_empty() {
            return Ok(None);
        }
        let peers = self.peers(metadata);
        let mut asks: FuturesUnordered<_> = live
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
                    if !self.outputs_available(&result, &hints, metadata).await? {
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

    /// Whether every output of `result` exists somewhere in the cluster. Output directories'
    /// `Tree`s are read (fetched if needed) so the files inside them are checked too; where
    /// blobs were found is remembered, so reading them later is a hinted fetch.
    async fn outputs_available(
        &self,
        result: &ActionResult,
        hints: &[NodeId],
        metadata: &MetadataMap,
    ) -> Result<bool, ClusterError> {
        let mut hints = hints.to_vec();
        if let Some(worker) = worker_of(result)
            && !hints.contains(&worker)
        {
            hints.push(worker);
        }
        let mut digests = match result_digests(result) {
            Ok(digests) => digests,
            Err(_) => return Ok(false),
        };
        for directory in &result.output_directories {
            let Some(tree) = directory
                .tree_digest
                .as_ref()
                .and_then(|d| Digest::from_proto(d, "tree_digest").ok())
            else {
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
            match tree_file_digests(&tree) {
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

/// The replica that ran the action, as recorded in its result.
pub(crate) fn worker_of(result: &ActionResult) -> Option<NodeId> {
    result
        .execution_metadata
        .as_ref()
        .and_then(|m| NodeId::new(&m.worker).ok())
}

/// Every blob an action result names directly: output files, trees, stdout and stderr.
pub(crate) fn result_digests(result: &ActionResult) -> Result<Vec<Digest>, crate::DigestError> {
    let mut digests = Vec::new();
    for file in &result.output_files {
        digests.push(Digest::from_required(
            file.digest.as_ref(),
            "output_files.digest",
        )?);
    }
    for directory in &result.output_directories {
        digests.push(Digest::from_required(
            directory.tree_digest.as_ref(),
            "output_directories.tree_digest",
        )?);
    }
    for (digest, field) in [
        (&result.stdout_digest, "stdout_digest"),
        (&result.stderr_digest, "stderr_digest"),
    ] {
        if let Some(digest) = digest {
            digests.push(Digest::from_proto(digest, field)?);
        }
    }
    Ok(digests)
}

/// Every file blob in a `Tree`.
pub(crate) fn tree_file_digests(tree: &Tree) -> Result<Vec<Digest>, crate::DigestError> {
    let mut digests = Vec::new();
    let directories: Vec<&Directory> = tree.root.iter().chain(tree.children.iter()).collect();
    for directory in directories {
        for file in &directory.files {
            digests.push(Digest::from_required(file.digest.as_ref(), "files.digest")?);
        }
    }
    let unique: HashSet<Digest> = digests.drain(..).collect();
    Ok(unique.into_iter().collect())
}
