//! What one replica did: counters behind [`ReapiStats`].

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of one replica's counters (see [`crate::Reapi::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReapiStats {
    /// Actions this replica ran to completion (merged callers count once).
    pub executed: u64,
    /// `Execute` calls that joined an identical action already in flight, here or (through
    /// the action's claim at its owner) on another replica.
    pub merged: u64,
    /// Action cache hits served to clients (`GetActionResult` hits and `Execute` answered
    /// from the cache), wherever the entry was found.
    pub cache_hits: u64,
    /// Of those entries, how many were found on a peer.
    pub peer_cache_hits: u64,
    /// Blobs fetched from peers.
    pub blobs_fetched: u64,
    /// Bytes fetched from peers.
    pub bytes_fetched: u64,
    /// Blobs this replica copied to their owners when it stored them (uploads it received,
    /// outputs of actions it ran).
    pub blobs_replicated: u64,
    /// Bytes of those copies.
    pub bytes_replicated: u64,
    /// Blobs this replica copied to new owners after membership changes (handoff).
    pub blobs_handed_off: u64,
    /// Bytes of those copies.
    pub bytes_handed_off: u64,
    /// Handoff passes completed (one per placement change this replica saw settle).
    pub handoff_passes: u64,
    /// `Execute` calls that arrived forwarded by a peer (they carry `x-mesh-forwarded-by`).
    pub forwarded_in: u64,
    /// `Execute` calls this replica's route layer sent to a peer.
    pub forwarded_out: u64,
    /// `Execute` calls run again elsewhere because the replica running them died.
    pub rerouted: u64,
    /// `WaitExecution` calls sent to the replica that owns the operation.
    pub waits_relayed: u64,
    /// Blobs of this replica's CAS found not to match their digest when read, and removed
    /// (see [`crate::Cas::corrupt_blobs_dropped`]; the `mesh_reapi_corrupt_blobs_total`
    /// counter).
    pub corrupt_blobs_dropped: u64,
}

/// The live counters.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    executed: AtomicU64,
    merged: AtomicU64,
    cache_hits: AtomicU64,
    peer_cache_hits: AtomicU64,
    blobs_fetched: AtomicU64,
    bytes_fetched: AtomicU64,
    blobs_replicated: AtomicU64,
    bytes_replicated: AtomicU64,
    blobs_handed_off: AtomicU64,
    bytes_handed_off: AtomicU64,
    handoff_passes: AtomicU64,
    forwarded_in: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn executed(&self) {
        add(&self.executed, 1);
        metrics::counter!("mesh_reapi_actions_executed_total").increment(1);
    }

    pub(crate) fn merged(&self) {
        add(&self.merged, 1);
        metrics::counter!("mesh_reapi_actions_merged_total").increment(1);
    }

    pub(crate) fn cache_hit(&self) {
        add(&self.cache_hits, 1);
        metrics::counter!("mesh_reapi_cache_hits_total").increment(1);
    }

    pub(crate) fn peer_cache_hit(&self) {
        add(&self.peer_cache_hits, 1);
    }

    pub(crate) fn fetched(&self, blobs: u64, bytes: u64) {
        add(&self.blobs_fetched, blobs);
        add(&self.bytes_fetched, bytes);
    }

    pub(crate) fn replicated(&self, blobs: u64, bytes: u64) {
        add(&self.blobs_replicated, blobs);
        add(&self.bytes_replicated, bytes);
        metrics::counter!("mesh_reapi_blobs_replicated_total").increment(blobs);
        metrics::counter!("mesh_reapi_bytes_replicated_total").increment(bytes);
    }

    pub(crate) fn handed_off(&self, blobs: u64, bytes: u64) {
        add(&self.blobs_handed_off, blobs);
        add(&self.bytes_handed_off, bytes);
        metrics::counter!("mesh_reapi_blobs_handed_off_total").increment(blobs);
        metrics::counter!("mesh_reapi_bytes_handed_off_total").increment(bytes);
    }

    pub(crate) fn handoff_pass(&self) {
        add(&self.handoff_passes, 1);
    }

    pub(crate) fn forwarded_in(&self) {
        add(&self.forwarded_in, 1);
    }

    /// The counters, with the route layer's and the local CAS's shares.
    pub(crate) fn snapshot(
        &self,
        routed: mesh_route::layer::LayerStats,
        cas: &crate::Cas,
    ) -> ReapiStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ReapiStats {
            executed: get(&self.executed),
            merged: get(&self.merged),
            cache_hits: get(&self.cache_hits),
            peer_cache_hits: get(&self.peer_cache_hits),
            blobs_fetched: get(&self.blobs_fetched),
            bytes_fetched: get(&self.bytes_fetched),
            blobs_replicated: get(&self.blobs_replicated),
            bytes_replicated: get(&self.bytes_replicated),
            blobs_handed_off: get(&self.blobs_handed_off),
            bytes_handed_off: get(&self.bytes_handed_off),
            handoff_passes: get(&self.handoff_passes),
            forwarded_in: get(&self.forwarded_in),
            forwarded_out: routed.forwarded_out,
            rerouted: routed.rerouted,
            waits_relayed: routed.to_owner,
            corrupt_blobs_dropped: cas.corrupt_blobs_dropped(),
        }
    }
}
