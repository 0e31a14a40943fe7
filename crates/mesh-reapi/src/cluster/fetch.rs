//! Reads through: making blobs present on this replica, fetched from the peers that hold
//! them.
//!
//! The order follows where a blob most likely is: the hinted replicas first (the one that
//! forwarded the request, to which the client uploaded, and the worker named in a result),
//! then the digest's owners rank by rank (all owners of one rank in parallel), and as a last
//! resort every live peer is asked what it holds. A blob several requests of this replica
//! need at once is fetched once: the first request claims it, the others wait for that claim
//! to end and then check the store (and fetch what that claim could not).
//!
//! A client's read of a large blob this replica lacks does not wait for the whole fetch: the
//! blob is streamed to the client while it is fetched and stored ([`StreamedFetch`]), and
//! the last piece is handed on only once the whole blob matched its digest and is stored.
//! A read that ends without error therefore carried the blob as its digest names it. The
//! price: a peer that fails or lies after the first piece went out can no longer be replaced
//! behind the client's back; the client's stream ends with `UNAVAILABLE`, nothing of that
//! copy is kept, and its retry is served from another replica. Smaller blobs, and every
//! fetch for an action, are fetched whole and checked before anything is served.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, PoisonError},
};

use bytes::Bytes;
use futures::{StreamExt as _, stream::FuturesUnordered};
use mesh_core::NodeId;
use tokio::sync::watch;

use super::{ClusterCas, ClusterError, Fetch, MAX_MESSAGE_SIZE, MissingBlobs};
use crate::{
    BlobWriter, CasError, Digest,
    peers::{PeerError, PeerRead, Peers},
};

/// Blobs larger than this, read by a client from a replica that lacks them, are streamed to
/// the client as they are fetched ([`ClusterCas::stream_fetch`]).
pub(crate) const STREAMED_FETCH_MIN: u64 = 4 * 1024 * 1024;

/// What this replica is fetching now, and whom it asked since start.
#[derive(Debug, Clone, Default)]
pub(super) struct InFlightFetches {
    claims: Arc<Mutex<Claims>>,
    /// How often each peer was asked for blobs this replica lacked.
    asks: Arc<Mutex<BTreeMap<NodeId, u64>>>,
    /// Blobs whose streamed fetch failed part-way: read the checked way from then on, so a
    /// lying peer cannot fail a client's retries too.
    not_streamed: Arc<Mutex<std::collections::HashSet<Digest>>>,
}

/// How many blobs [`InFlightFetches::not_streamed`] remembers before it starts over.
const NOT_STREAMED_MAX: usize = 4096;

/// Blobs being fetched from peers right now, so concurrent requests fetch each once.
#[derive(Debug, Default)]
struct Claims {
    next_id: u64,
    /// Digest → (the claim fetching it, a receiver whose sender that claim drops when done,
    /// whether it is a streamed fetch: one a client's reading paces).
    by_digest: HashMap<Digest, (u64, watch::Receiver<()>, bool)>,
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
                .is_some_and(|(id, _, _)| *id == self.id)
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
    /// Each with whether it is a streamed fetch.
    waits: Vec<(watch::Receiver<()>, bool)>,
}

impl InFlightFetches {
    /// Claims the fetch of every digest of `missing` that no other request is fetching
    /// (`streamed`: for a [`StreamedFetch`]); returns the claim and the fetches to wait for.
    fn claim(&self, missing: &[Digest], streamed: bool) -> (FetchClaim, OtherFetches) {
        let mut claims = self.claims.lock().unwrap_or_else(PoisonError::into_inner);
        claims.next_id += 1;
        let id = claims.next_id;
        let (sender, receiver) = watch::channel(());
        let mut mine = Vec::new();
        let mut others = OtherFetches::default();
        for digest in missing {
            match claims.by_digest.get(digest) {
                Some((_, wait, streamed)) => {
                    others.digests.push(*digest);
                    others.waits.push((wait.clone(), *streamed));
                }
                None => {
                    claims
                        .by_digest
                        .insert(*digest, (id, receiver.clone(), streamed));
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

    fn streams(&self, digest: &Digest) -> bool {
        !self
            .not_streamed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(digest)
    }

    fn stream_failed(&self, digest: Digest) {
        let mut not_streamed = self
            .not_streamed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if not_streamed.len() >= NOT_STREAMED_MAX {
            not_streamed.clear();
        }
        not_streamed.insert(digest);
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
        let (claim, mut others) = self.fetching.claim(&missing, false);
        let mut still_missing = self.fetch_missing(claim.digests.clone(), fetch).await;
        drop(claim);
        for (wait, streamed) in &mut others.waits {
            // The sender is dropped when that fetch ends, whatever its outcome. A streamed
            // fetch goes at its client's pace: waited for a bounded time, then fetched here
            // too rather than wait on a slow client.
            if *streamed {
                let _ = tokio::time::timeout(self.config.stream_idle_timeout, wait.changed()).await;
            } else {
                let _ = wait.changed().await;
            }
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

    /// Starts fetching `digest` from a peer to hand it on as it arrives (see the module docs):
    /// the hinted replicas first, then its owners, until one serves its first piece. `None`:
    /// it is here already, `fetch` is local, another request of this replica is fetching it,
    /// a streamed fetch of it failed before, or no peer served it; the caller reads it the
    /// usual way then ([`Self::ensure_local`]).
    pub(crate) async fn stream_fetch(
        &self,
        digest: Digest,
        fetch: &Fetch,
    ) -> Option<StreamedFetch> {
        if fetch.is_local() || self.cas.contains(&digest) || !self.fetching.streams(&digest) {
            return None;
        }
        // Another request of this replica fetching it: wait for that, the usual way. Requests
        // that come while this one streams wait for it, for a bounded time (a slow client
        // paces it).
        let (claim, _others) = self.fetching.claim(&[digest], true);
        if claim.digests.is_empty() {
            return None;
        }
        let live = self.live_peers();
        let peers = self.peers(fetch.metadata());
        let mut candidates = self.hinted(fetch.hints(), &live);
        for owner in self.owners_to_ask(&[digest], &live).into_iter().flatten() {
            if !candidates.contains(&owner) {
                candidates.push(owner);
            }
        }
        for node in candidates {
            self.fetching.count_ask(&node);
            let read = match peers.open_read(&node, digest).await {
                Ok(Some(read)) => read,
                Ok(None) => continue,
                Err(error) => {
                    tracing::debug!(peer = %node, %digest, %error, "a peer did not serve a streamed fetch");
                    continue;
                }
            };
            let writer = self.cas.writer(digest).await.ok()?;
            let mut streamed = StreamedFetch {
                cluster: self.clone(),
                digest,
                read,
                writer: Some(writer),
                held: None,
                _claim: claim,
            };
            // The first piece arrives before anything is promised to the client: a peer that
            // fails at once is passed over for the usual read.
            return match streamed.fill().await {
                Ok(true) => Some(streamed),
                Ok(false) | Err(_) => None,
            };
        }
        None
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

/// Why a streamed fetch ended early. Nothing of the blob was kept.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StreamedFetchError {
    /// The peer failed, or went silent, part-way.
    #[error(transparent)]
    Peer(#[from] PeerError),
    /// Storing it here failed, or the whole did not match its digest (the peer lied).
    #[error(transparent)]
    Store(#[from] CasError),
}

/// A blob streamed from a peer into this replica's CAS and handed on piece by piece
/// ([`ClusterCas::stream_fetch`]). One piece is always held back, so the last is handed on
/// only once the blob is checked and stored.
pub(crate) struct StreamedFetch {
    cluster: ClusterCas,
    digest: Digest,
    read: PeerRead,
    writer: Option<BlobWriter>,
    /// The piece received last, not handed on yet.
    held: Option<Vec<u8>>,
    /// Other requests of this replica wait for this fetch rather than start their own.
    _claim: FetchClaim,
}

impl std::fmt::Debug for StreamedFetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamedFetch")
            .field("digest", &self.digest)
            .field("peer", self.read.node())
            .finish_non_exhaustive()
    }
}

impl StreamedFetch {
    /// The peer it is fetched from.
    pub(crate) fn peer(&self) -> &NodeId {
        self.read.node()
    }

    /// The next piece to hand on; `None` once the last was. After an error there is none.
    pub(crate) async fn next(&mut self) -> Option<Result<Vec<u8>, StreamedFetchError>> {
        let previous = self.held.take()?;
        match self.fill().await {
            Ok(_) => Some(Ok(previous)),
            Err(error) => Some(Err(error)),
        }
    }

    /// Receives and stores the next piece into `held`. `Ok(false)`: the peer's stream ended
    /// and the blob is stored (or the writer is gone); its last piece stays in `held`.
    async fn fill(&mut self) -> Result<bool, StreamedFetchError> {
        let result = self.receive().await;
        if result.is_err() {
            // Nothing more is handed on; the writer's temporary file is dropped, and the
            // next read of this blob is fetched whole and checked before it is served.
            self.held = None;
            self.writer = None;
            self.cluster.fetching.stream_failed(self.digest);
        }
        result
    }

    async fn receive(&mut self) -> Result<bool, StreamedFetchError> {
        let Some(writer) = self.writer.as_mut() else {
            return Ok(false);
        };
        loop {
            match self.read.next().await? {
                Some(piece) if piece.is_empty() => continue,
                Some(piece) => {
                    writer.write(&piece).await?;
                    self.held = Some(piece);
                    return Ok(true);
                }
                None => {
                    if let Some(writer) = self.writer.take() {
                        writer.commit().await?;
                        self.cluster.count_fetched(&[self.digest]);
                    }
                    return Ok(false);
                }
            }
        }
    }
}
