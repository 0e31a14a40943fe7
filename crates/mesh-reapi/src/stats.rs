//! What one replica did: counters behind [`ReapiStats`], and the same events as `reapi_*`
//! series of the [`metrics`] facade (a server that installs a Prometheus recorder, as
//! `mesh-node --metrics-addr` does, exports them):
//!
//! | series | kind | labels |
//! |---|---|---|
//! | `reapi_executions_total` | counter | `outcome`: `exit_zero`, `exit_nonzero`, `timed_out`, `failed` (no result), `cache_hit`, `merged` |
//! | `reapi_queue_seconds` | histogram | time from `Execute` until the action gets a slot (its inputs are fetched from peers meanwhile) |
//! | `reapi_execution_seconds` | histogram | time the action held its slot (inputs copied in, command, outputs collected) |
//! | `reapi_action_cache_hits_total`, `reapi_action_cache_misses_total` | counter | `api`: `GetActionResult`, `Execute` |
//! | `reapi_action_cache_peer_hits_total` | counter | entries found on a peer and copied here |
//! | `reapi_store_bytes`, `reapi_store_entries` | gauge | `store`: `cas`, `action_cache` |
//! | `reapi_store_evicted_total`, `reapi_store_evicted_bytes_total` | counter | `store` |
//! | `reapi_peer_blobs_fetched_total`, `reapi_peer_bytes_fetched_total` | counter | |
//! | `reapi_blobs_served_total`, `reapi_bytes_served_total` | counter | `api`: `ByteStream`, `BatchReadBlobs` |
//! | `reapi_blobs_replicated_total`, `reapi_bytes_replicated_total` | counter | copies to owners |
//! | `reapi_blobs_passed_on_total` | counter | of those, uploads passed on while they arrived |
//! | `reapi_blobs_handed_off_total`, `reapi_bytes_handed_off_total` | counter | handoff copies |
//! | `reapi_corrupt_blobs_total` | counter | blobs found not to match their digest |

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

/// How an `Execute` ended, as the `outcome` label of `reapi_executions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The command ran and exited 0.
    ExitZero,
    /// The command ran and exited with another code.
    ExitNonzero,
    /// The command ran past its timeout and was killed.
    TimedOut,
    /// The action failed before producing a result (missing inputs, a command that could
    /// not start, …).
    Failed,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::ExitZero => "exit_zero",
            Outcome::ExitNonzero => "exit_nonzero",
            Outcome::TimedOut => "timed_out",
            Outcome::Failed => "failed",
        }
    }
}

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
    /// Of those copies, uploads passed on to their owners while they arrived (the others
    /// were copied once stored).
    pub blobs_passed_on: u64,
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
    /// (see [`crate::Cas::corrupt_blobs_dropped`]; the `reapi_corrupt_blobs_total`
    /// counter).
    pub corrupt_blobs_dropped: u64,
}

impl ReapiStats {
    /// Every field by name, in declaration order.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("executed", self.executed),
            ("merged", self.merged),
            ("cache_hits", self.cache_hits),
            ("peer_cache_hits", self.peer_cache_hits),
            ("blobs_fetched", self.blobs_fetched),
            ("bytes_fetched", self.bytes_fetched),
            ("blobs_replicated", self.blobs_replicated),
            ("bytes_replicated", self.bytes_replicated),
            ("blobs_passed_on", self.blobs_passed_on),
            ("blobs_handed_off", self.blobs_handed_off),
            ("bytes_handed_off", self.bytes_handed_off),
            ("handoff_passes", self.handoff_passes),
            ("forwarded_in", self.forwarded_in),
            ("forwarded_out", self.forwarded_out),
            ("rerouted", self.rerouted),
            ("waits_relayed", self.waits_relayed),
            ("corrupt_blobs_dropped", self.corrupt_blobs_dropped),
        ]
    }
}

/// The live counters.
#[derive(Debug, Default)]
pub(crate) struct ReapiCounters {
    executed: AtomicU64,
    merged: AtomicU64,
    cache_hits: AtomicU64,
    peer_cache_hits: AtomicU64,
    blobs_fetched: AtomicU64,
    bytes_fetched: AtomicU64,
    blobs_replicated: AtomicU64,
    bytes_replicated: AtomicU64,
    blobs_passed_on: AtomicU64,
    blobs_handed_off: AtomicU64,
    bytes_handed_off: AtomicU64,
    handoff_passes: AtomicU64,
    forwarded_in: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl ReapiCounters {
    /// An action this replica ran (or tried to): `queued` from `Execute` to its start,
    /// `ran` from its start to its end.
    pub(crate) fn executed(&self, outcome: Outcome, queued: Duration, ran: Duration) {
        if outcome != Outcome::Failed {
            add(&self.executed, 1);
        }
        metrics::counter!("reapi_executions_total", "outcome" => outcome.label()).increment(1);
        metrics::histogram!("reapi_queue_seconds").record(queued.as_secs_f64());
        metrics::histogram!("reapi_execution_seconds").record(ran.as_secs_f64());
    }

    pub(crate) fn merged(&self) {
        add(&self.merged, 1);
        metrics::counter!("reapi_executions_total", "outcome" => "merged").increment(1);
    }

    /// A client's lookup (`api`: `GetActionResult` or `Execute`) found a result.
    pub(crate) fn cache_hit(&self, api: &'static str) {
        add(&self.cache_hits, 1);
        metrics::counter!("reapi_action_cache_hits_total", "api" => api).increment(1);
        if api == "Execute" {
            metrics::counter!("reapi_executions_total", "outcome" => "cache_hit").increment(1);
        }
    }

    /// A client's lookup found no result.
    pub(crate) fn cache_miss(&self, api: &'static str) {
        metrics::counter!("reapi_action_cache_misses_total", "api" => api).increment(1);
    }

    pub(crate) fn peer_cache_hit(&self) {
        add(&self.peer_cache_hits, 1);
        metrics::counter!("reapi_action_cache_peer_hits_total").increment(1);
    }

    pub(crate) fn fetched(&self, blobs: u64, bytes: u64) {
        add(&self.blobs_fetched, blobs);
        add(&self.bytes_fetched, bytes);
        metrics::counter!("reapi_peer_blobs_fetched_total").increment(blobs);
        metrics::counter!("reapi_peer_bytes_fetched_total").increment(bytes);
    }

    /// Blobs sent to a client (`api`: `ByteStream` or `BatchReadBlobs`).
    pub(crate) fn served(&self, api: &'static str, blobs: u64, bytes: u64) {
        metrics::counter!("reapi_blobs_served_total", "api" => api).increment(blobs);
        metrics::counter!("reapi_bytes_served_total", "api" => api).increment(bytes);
    }

    pub(crate) fn replicated(&self, blobs: u64, bytes: u64) {
        add(&self.blobs_replicated, blobs);
        add(&self.bytes_replicated, bytes);
        metrics::counter!("reapi_blobs_replicated_total").increment(blobs);
        metrics::counter!("reapi_bytes_replicated_total").increment(bytes);
    }

    /// Copies to owners of an upload, passed on while it arrived.
    pub(crate) fn passed_on(&self, blobs: u64, bytes: u64) {
        self.replicated(blobs, bytes);
        add(&self.blobs_passed_on, blobs);
        metrics::counter!("reapi_blobs_passed_on_total").increment(blobs);
    }

    pub(crate) fn handed_off(&self, blobs: u64, bytes: u64) {
        add(&self.blobs_handed_off, blobs);
        add(&self.bytes_handed_off, bytes);
        metrics::counter!("reapi_blobs_handed_off_total").increment(blobs);
        metrics::counter!("reapi_bytes_handed_off_total").increment(bytes);
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
            blobs_passed_on: get(&self.blobs_passed_on),
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
