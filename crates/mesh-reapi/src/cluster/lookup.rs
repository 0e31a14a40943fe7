//! Lookups: which blobs exist somewhere in the cluster, and an action's cached result.
//!
//! Both ask the owners only (plus hinted replicas), never every peer, so a lookup costs
//! `O(R)` calls whatever the cluster's size: one batched `Presence/Has` per owner, all in
//! parallel. While handoff moves data after a membership change, the owners under the
//! placements of the last minutes are asked too. A cached result counts only while every
//! blob it names exists somewhere: one whose outputs were evicted is a miss, so the action
//! runs again rather than Bazel failing on a missing output.

use std::collections::HashMap;

use bazel_remote_apis::build::bazel::remote::execution::v2::{ActionResult, Tree};
use futures::{StreamExt as _, stream::FuturesUnordered};
use mesh_core::NodeId;

use super::{
    ClusterCas, ClusterError, Fetch,
    results::{result_digests, tree_file_digests, tree_of, worker_of},
};
use crate::{Digest, DigestFunction};

impl ClusterCas {
    /// Which of `digests` exist nowhere in the cluster, without fetching them: this
    /// replica's CAS, then — in one parallel round, one call per peer — the hinted nodes and
    /// the owners (current and recent) of whatever is not here. Never asks every peer: its
    /// cost does not grow with the cluster. A local `fetch` asks this replica only.
    pub async fn find_missing_in_cluster(&self, digests: &[Digest], fetch: &Fetch) -> Vec<Digest> {
        let mut missing = self.cas.find_missing(digests);
        if missing.is_empty() || fetch.is_local() {
            return missing;
        }
        let live = self.live_peers();
        let hinted = self.hinted(fetch.hints(), &live);
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
        let peers = self.peers(fetch.metadata());
        let holders = self.ask_holders(&peers, asks).await;
        missing.retain(|d| !holders.contains_key(d));
        missing
    }

    /// The cached result of `action`: from the local action cache, or (unless `fetch` is
    /// local) from the action's owners, asked in parallel; a result found there is kept
    /// locally.
    ///
    /// Unless `fetch` is local, a hit is served only if all its outputs exist somewhere in the
    /// cluster; one whose outputs are gone is a miss. With a local `fetch` (a peer asking) the
    /// local entry is returned as it is and the asking replica checks.
    pub async fn action_result(
        &self,
        action: &Digest,
        fetch: &Fetch,
    ) -> Result<Option<ActionResult>, ClusterError> {
        if let Some(result) = self.action_cache.get(action).await? {
            if fetch.is_local()
                || self
                    .outputs_available(&result, action.function(), fetch)
                    .await?
            {
                return Ok(Some(result));
            }
            // An owner may hold a newer result whose outputs still exist.
            tracing::info!(%action, "a cached result's outputs are gone; asking its owners");
        }
        if fetch.is_local() {
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
        let peers = self.peers(fetch.metadata());
        let mut asks: FuturesUnordered<_> = owners
            .iter()
            .map(|node| async move { (node, peers.action_result(node, action).await) })
            .collect();
        while let Some((node, answer)) = asks.next().await {
            match answer {
                Ok(Some(result)) => {
                    // The worker that ran it, then the owner that answered, hold its outputs.
                    let holders = fetch
                        .clone()
                        .hinting(worker_of(&result))
                        .hinting([node.clone()]);
                    if !self
                        .outputs_available(&result, action.function(), &holders)
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

    /// Whether every output of `result` exists somewhere in the cluster (`fetch` is not
    /// local). Output directories' `Tree`s are read (fetched if needed) so the files inside
    /// them are checked too. The result's digests are of `function`.
    async fn outputs_available(
        &self,
        result: &ActionResult,
        function: DigestFunction,
        fetch: &Fetch,
    ) -> Result<bool, ClusterError> {
        let fetch = fetch.clone().hinting(worker_of(result));
        let mut digests = match result_digests(result, function) {
            Ok(digests) => digests,
            Err(_) => return Ok(false),
        };
        for directory in &result.output_directories {
            let Some(tree) = tree_of(directory, function) else {
                return Ok(false);
            };
            let tree: Tree = match self.read_message(&tree, "Tree", &fetch).await {
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
            .find_missing_in_cluster(&digests, &fetch)
            .await
            .is_empty())
    }
}
