//! Writes are placed before they are acknowledged: copies to a digest's owners.
//!
//! Each digest goes down its rendezvous ranking ([`crate::placement`]), skipping this
//! replica, until `R` peers hold it: every round sends each digest to as many candidates as
//! it still needs, one batched push per peer and all peers in parallel; a peer that fails is
//! replaced by the next of the ranking in the next round. A push asks first what the peer
//! has, so nothing is sent twice.
//!
//! A large upload does not wait to be stored before it is placed: [`ClusterCas::tee`] passes
//! it on to its owners as it arrives (GFS's pipelined write, without the chain: the receiving
//! replica sends to each owner), and only the owners that fail to take it are made up for
//! afterwards, as above.

use std::collections::{HashMap, HashSet, VecDeque};

use bazel_remote_apis::build::bazel::remote::execution::v2::{ActionResult, Tree};
use futures::{StreamExt as _, stream::FuturesUnordered};
use mesh_core::NodeId;
use tonic::metadata::MetadataMap;

use super::{
    ClusterCas, ClusterError,
    results::{result_digests, tree_file_digests, tree_of},
};
use crate::{
    Digest, DigestFunction,
    peers::{Finished, PeerWrite},
    placement::Ring,
};

impl ClusterCas {
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
        // Each round writes to as many candidates as are still needed, in parallel; a peer
        // that fails is replaced by the next of the ranking in the next round.
        while plan.needed > 0 {
            let needed = plan.needed;
            let round: Vec<NodeId> = std::iter::from_fn(|| plan.next_candidate())
                .take(needed)
                .collect();
            if round.is_empty() {
                break;
            }
            let puts: FuturesUnordered<_> = round
                .iter()
                .map(|node| {
                    let peers = &peers;
                    async move { (node, peers.put_action_result(node, &action, result).await) }
                })
                .collect();
            for (node, put) in puts.collect::<Vec<_>>().await {
                match put {
                    Ok(()) => plan.needed -= 1,
                    Err(error) => {
                        tracing::warn!(peer = %node, %action, %error, "could not place an action result on a peer; trying the next");
                    }
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
}

/// Blobs larger than this are passed on to their owners while they are received
/// ([`ClusterCas::tee`]); smaller ones go in batches once stored ([`ClusterCas::replicate`]).
pub(crate) const TEE_MIN: u64 = 1024 * 1024;

impl ClusterCas {
    /// Starts passing a blob that is being uploaded here on to its owners: a write opened to
    /// each of the first `R` replicas of its ranking, fed each piece as it arrives
    /// ([`Tee::write`]). The owners hash and store while this replica does, instead of after
    /// it, from a copy it would read back; the blob is sent once, not read again. The last
    /// message (`finish_write`) goes only once this replica has checked the whole blob
    /// ([`Tee::finish`]); a tee dropped before that leaves nothing on the owners.
    pub(crate) fn tee(&self, digest: Digest, metadata: &MetadataMap) -> Tee {
        let ring = self.rings.current();
        let plan = Plan::new(digest, &ring, self.node.node_id(), self.replication.factor);
        let peers = self.peers(metadata);
        let writes = plan
            .candidates
            .iter()
            .take(plan.needed)
            .filter_map(|node| match peers.open_write(node, digest) {
                Ok(write) => Some(write),
                Err(error) => {
                    tracing::warn!(peer = %node, %digest, %error, "could not pass an upload on to an owner; it is placed after it is stored");
                    None
                }
            })
            .collect();
        Tee {
            digest,
            writes,
            complete: plan.possible,
            needed: plan.needed,
            counters: self.counters.clone(),
        }
    }
}

/// An upload passed on to its owners as it arrives ([`ClusterCas::tee`]).
#[derive(Debug)]
pub(crate) struct Tee {
    digest: Digest,
    writes: Vec<PeerWrite>,
    /// How many owners the blob needs, and whether the ranking had that many.
    needed: usize,
    complete: bool,
    counters: std::sync::Arc<crate::stats::ReapiCounters>,
}

impl Tee {
    /// Passes the next piece on to every owner still taking it; one that fails is dropped
    /// (the blob is placed on another after it is stored).
    pub(crate) async fn write(&mut self, data: &[u8]) {
        let sends = self
            .writes
            .iter_mut()
            .map(|write| write.send(data.to_vec()));
        let results = futures::future::join_all(sends).await;
        let mut results = results.into_iter();
        let digest = self.digest;
        self.writes.retain(|write| match results.next() {
            Some(Err(error)) => {
                tracing::warn!(peer = %write.node(), %digest, %error, "an owner stopped taking an upload; it is placed after it is stored");
                false
            }
            _ => true,
        });
    }

    /// Ends every owner's write, once this replica has stored and checked the blob. Returns
    /// whether its placement is complete: every owner it needs now holds it. When not, the
    /// caller places it the usual way ([`ClusterCas::replicate`]).
    pub(crate) async fn finish(self) -> bool {
        let digest = self.digest;
        let ends = self.writes.into_iter().map(|write| async move {
            let node = write.node().clone();
            (node, write.finish().await)
        });
        let (mut held, mut sent) = (0, 0);
        for (node, end) in futures::future::join_all(ends).await {
            match end {
                Ok(Finished::Stored) => {
                    held += 1;
                    sent += 1;
                }
                Ok(Finished::AlreadyHeld) => held += 1,
                Ok(Finished::Refused) => {
                    tracing::warn!(peer = %node, %digest, "an owner did not store a passed-on upload");
                }
                Err(error) => {
                    tracing::warn!(peer = %node, %digest, %error, "an owner did not store a passed-on upload");
                }
            }
        }
        self.counters.passed_on(sent, sent * digest.size());
        self.complete && held >= self.needed
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
