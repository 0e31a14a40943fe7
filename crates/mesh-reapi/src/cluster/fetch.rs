//! Reads through: making blobs present on this replica, fetched from the peers that hold
//! them.
//!
//! The order follows where a blob most likely is: the hinted replicas first (the one that
//! forwarded the request, to which the client uploaded, and the worker named in a result),
//! then the digest's owners rank by rank (all owners of one rank in parallel), and as a last
//! resort every live peer is asked what it holds. A blob several requests of this replica
//! need at once is fetched once: the first request claims it, the others wait for that claim
//! to end and then check the store (and fetch what that claim could not).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, PoisonError},
};

use bytes::Bytes;
use futures::{StreamExt as _, stream::FuturesUnordered};
use mesh_core::NodeId;
use tokio::sync::watch;

use super::{ClusterCas, ClusterError, Fetch, MAX_MESSAGE_SIZE, MissingBlobs};
use crate::{Digest, peers::Peers};

/// What this replica is fetching now, and whom it asked since start.
#[derive(Debug, Clone, Default)]
pub(super) struct InFlightFetches {
    claims: Arc<Mutex<Claims>>,
    /// How often each peer was asked for blobs this replica lacked.
    asks: Arc<Mutex<BTreeMap<NodeId, u64>>>,
}

/// Blobs being fetched from peers right now, so concurrent requests fetch each once.
#[derive(Debug, Default)]
struct Claims {
    next_id: u64,
    /// Digest → (the claim fetching it, a receiver whose sender that claim drops when done).
    by_digest: HashMap<Digest, (u64, watch::Receiver<()>)>,
}

/// The digests one request fetches; dropping it (done, failed or cancelled) releases them
/// and wakes whoever waits.
struct FetchClaim {
    claims: Arc<Mutex<Claims>>,
    id: u64,
    digests: Vec<Digest>,
    _done: watch::Sender<()>,
}

impl Drop for FetchClaim {
    fn drop(&mut self) {
        let mut claims = self.claims.lock().unwrap_or_else(PoisonError::into_inner);
        for digest in &self.digests {
            if claims
                .by_digest
                .get(digest)
                .is_some_and(|(id, _)| *id == self.id)
            {
                claims.by_digest.remove(digest);
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

impl InFlightFetches {
    /// Claims the fetch of every digest of `missing` that no other request is fetching;
    /// returns the claim and the fetches to wait for.
    fn claim(&self, missing: &[Digest]) -> (FetchClaim, OtherFetches) {
        let mut claims = self.claims.lock().unwrap_or_else(PoisonError::into_inner);
        claims.next_id += 1;
        let id = claims.next_id;
        let (sender, receiver) = watch::channel(());
        let mut mine = Vec::new();
        let mut others = OtherFetches::default();
        for digest in missing {
            match claims.by_digest.get(digest) {
                Some((_, wait)) => {
                    others.digests.push(*digest);
                    others.waits.push(wait.clone());
                }
                None => {
                    claims.by_digest.insert(*digest, (id, receiver.clone()));
                    mine.push(*digest);
                }
            }
        }
        (
            FetchClaim {
                claims: self.claims.clone(),
                id,
                digests: mine,
                _done: sender,
            },
            others,
        )
    }

    pub(super) fn count_ask(&self, node: &NodeId) {
        *self
            .asks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(node.clone())
            .or_default() += 1;
    }

    fn asks(&self) -> BTreeMap<NodeId, u64> {
        self.asks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl ClusterCas {
    /// How often each peer was asked for blobs this replica lacked (a fetch, or asking who
    /// holds them), since start: where reads went — the hinted holder first, then the owners,
    /// every peer only as a last resort.
    pub fn fetch_asks(&self) -> BTreeMap<NodeId, u64> {
        self.fetching.asks()
    }

    /// Makes every blob of `digests` present in the local CAS, fetching the missing ones
    /// from peers (hinted nodes first, see the module docs). With a local `fetch` (the call
    /// was forwarded by a peer) nothing is fetched.
    pub async fn ensure_local(
        &self,
        digests: &[Digest],
        fetch: &Fetch,
    ) -> Result<(), MissingBlobs> {
        let missing = self.cas.find_missing(digests);
        if missing.is_empty() {
            return Ok(());
        }
        if fetch.is_local() {
            return Err(MissingBlobs(missing));
        }
        // Blobs another request of this replica is already fetching are waited for, not
        // fetched twice.
        let (claim, mut others) = self.fetching.claim(&missing);
        let mut still_missing = self.fetch_missing(claim.digests.clone(), fetch).await;
        drop(claim);
        for wait in &mut others.waits {
            // The sender is dropped when that fetch ends, whatever its outcome.
            let _ = wait.changed().await;
        }
        let not_fetched = self.cas.find_missing(&others.digests);
        if !not_fetched.is_empty() {
            // That fetch failed (its hints may have been worse than ours): try once more.
            still_missing.extend(self.fetch_missing(not_fetched, fetch).await);
        }
        if still_missing.is_empty() {
            Ok(())
        } else {
            Err(MissingBlobs(still_missing))
        }
    }

    /// Fetches `missing` from peers — hinted nodes first, then the owners rank by rank, then
    /// whoever has them — and returns what no peer could provide.
    async fn fetch_missing(&self, mut missing: Vec<Digest>, fetch: &Fetch) -> Vec<Digest> {
        if missing.is_empty() {
            return missing;
        }
        let live = self.live_peers();
        let peers = self.peers(fetch.metadata());
        let hinted = self.hinted(fetch.hints(), &live);
        for node in &hinted {
            self.fetching.count_ask(node);
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
            self.fetching.count_ask(node);
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
                self.fetching.count_ask(node);
                peers.fetch(node, digests, &self.cas)
            })
            .collect();
        let fetched: Vec<Vec<Digest>> = fetches.collect().await;
        for fetched in fetched {
            self.count_fetched(&fetched);
            missing.retain(|d| !fetched.contains(d));
        }
    }

    fn count_fetched(&self, fetched: &[Digest]) {
        if fetched.is_empty() {
            return;
        }
        let bytes: u64 = fetched.iter().map(Digest::size).sum();
        self.counters.fetched(fetched.len() as u64, bytes);
    }

    /// A whole blob, fetched from a peer if it is not here (unless `fetch` is local).
    pub async fn read(&self, digest: &Digest, fetch: &Fetch) -> Result<Bytes, ClusterError> {
        if let Some(bytes) = self.cas.read(digest).await? {
            return Ok(bytes);
        }
        self.ensure_local(&[*digest], fetch).await?;
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
        fetch: &Fetch,
    ) -> Result<M, ClusterError> {
        if digest.size() > MAX_MESSAGE_SIZE {
            return Err(ClusterError::MessageTooLarge {
                digest: *digest,
                kind,
            });
        }
        let bytes = self.read(digest, fetch).await?;
        M::decode(bytes).map_err(|source| ClusterError::Malformed {
            digest: *digest,
            kind,
            source,
        })
    }
}
