//! Counters of what the gossip layer did with datagrams and members, also exported through
//! the `metrics` facade.
//!
//! | metric | kind | labels | what |
//! |---|---|---|---|
//! | `mesh_datagrams_received_total`, `mesh_datagrams_sent_total` | counter | | datagrams in and out |
//! | `mesh_bytes_received_total`, `mesh_bytes_sent_total` | counter | | their bytes, envelope included |
//! | `mesh_datagrams_dropped_total` | counter | `reason` | datagrams dropped, by reason |
//! | `mesh_datagram_send_failures_total`, `mesh_datagram_seal_failures_total` | counter | | datagrams not sent |
//! | `mesh_discovery_failures_total` | counter | | discovery attempts that failed |
//! | `mesh_suspicions_total` | counter | | members this node began to suspect |
//! | `mesh_member_flaps_total` | counter | | members that failed and came back |
//! | `mesh_members` | gauge | `status` (`alive`, `suspect`, `failed`, `left`) | members by status, this node included |
//! | `mesh_state_age_max_seconds` | gauge | | how long ago the least recently confirmed live peer state was confirmed (staleness) |
//! | `mesh_is_coordinator` | gauge | | 1 while this node is the advisory coordinator |
//!
//! The gauges are set every maintenance tick (each probe period).

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of the gossip counters ([`crate::Membership::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MeshStats {
    /// Datagrams read from the socket.
    pub datagrams_received: u64,
    /// Datagrams handed to the socket.
    pub datagrams_sent: u64,
    /// Bytes read from the socket (whole datagrams, envelope included).
    pub bytes_received: u64,
    /// Bytes handed to the socket (whole datagrams, envelope included).
    pub bytes_sent: u64,
    /// Datagrams the socket refused (buffer full, unreachable): gossip tolerates loss.
    pub send_failures: u64,
    /// Datagrams not sent because they could not be encrypted (the operating system's random
    /// source failed to provide a nonce).
    pub seal_failures: u64,
    /// Datagrams dropped because their envelope was malformed (bad magic, version, kind, size).
    pub dropped_malformed: u64,
    /// Datagrams dropped because they failed authentication (wrong key, wrong cluster label,
    /// tampering), or were plain where encryption is required, or the other way round.
    pub dropped_unauthenticated: u64,
    /// Datagrams dropped because the membership task was too far behind to take them.
    pub dropped_overload: u64,
    /// Well-enveloped datagrams foca rejected (undecodable SWIM packet, data from ourselves…).
    pub foca_rejected: u64,
    /// Node states rejected as undecodable or invalid.
    pub states_rejected: u64,
    /// Discovery attempts that failed (the last good answer stayed in use).
    pub discovery_failures: u64,
    /// Members this node began to suspect (each suspicion once, refuted or not).
    pub suspicions: u64,
    /// Members that failed and then came back (a newer life of a node id this node had seen
    /// fail).
    pub flaps: u64,
    /// Suspicions this node raised (one of its probes failed and nobody vouched in time).
    pub suspicions_raised: u64,
    /// Suspicions this node raised that were refuted directly by the suspect or a witness
    /// (Lifeguard's buddy system).
    pub suspicions_refuted: u64,
    /// Times this node learnt directly that it was suspected, and refuted.
    pub refuted_self: u64,
    /// Lifeguard's local health score now (not a counter): 0 for a healthy node, up to
    /// [`crate::Timing::max_health_multiplier`]; probes run `1 +` this many times slower.
    pub health_score: u64,
}

#[derive(Debug, Default)]
pub(crate) struct MeshCounters {
    received: AtomicU64,
    sent: AtomicU64,
    bytes_received: AtomicU64,
    bytes_sent: AtomicU64,
    send_failures: AtomicU64,
    seal_failures: AtomicU64,
    malformed: AtomicU64,
    unauthenticated: AtomicU64,
    overload: AtomicU64,
    foca_rejected: AtomicU64,
    states_rejected: AtomicU64,
    discovery_failures: AtomicU64,
    suspicions: AtomicU64,
    flaps: AtomicU64,
    suspicions_raised: AtomicU64,
    suspicions_refuted: AtomicU64,
    refuted_self: AtomicU64,
    health_score: AtomicU64,
}

/// Why a datagram was dropped, for counting.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Dropped {
    Malformed(&'static str),
    Unauthenticated(&'static str),
    Overload,
    FocaRejected,
    StateRejected,
}

impl MeshCounters {
    pub(crate) fn received(&self, len: usize) {
        self.received.fetch_add(1, Ordering::Relaxed);
        self.bytes_received.fetch_add(len as u64, Ordering::Relaxed);
        metrics::counter!("mesh_datagrams_received_total").increment(1);
        metrics::counter!("mesh_bytes_received_total").increment(len as u64);
    }

    pub(crate) fn sent(&self, len: Option<usize>) {
        if let Some(len) = len {
            self.sent.fetch_add(1, Ordering::Relaxed);
            self.bytes_sent.fetch_add(len as u64, Ordering::Relaxed);
            metrics::counter!("mesh_datagrams_sent_total").increment(1);
            metrics::counter!("mesh_bytes_sent_total").increment(len as u64);
        } else {
            self.send_failures.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("mesh_datagram_send_failures_total").increment(1);
        }
    }

    pub(crate) fn seal_failed(&self) {
        self.seal_failures.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("mesh_datagram_seal_failures_total").increment(1);
    }

    pub(crate) fn dropped(&self, why: Dropped) {
        let (counter, reason) = match why {
            Dropped::Malformed(reason) => (&self.malformed, reason),
            Dropped::Unauthenticated(reason) => (&self.unauthenticated, reason),
            Dropped::Overload => (&self.overload, "overload"),
            Dropped::FocaRejected => (&self.foca_rejected, "foca_rejected"),
            Dropped::StateRejected => (&self.states_rejected, "state_rejected"),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("mesh_datagrams_dropped_total", "reason" => reason).increment(1);
    }

    pub(crate) fn discovery_failed(&self) {
        self.discovery_failures.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("mesh_discovery_failures_total").increment(1);
    }

    pub(crate) fn suspected(&self) {
        self.suspicions.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("mesh_suspicions_total").increment(1);
    }

    pub(crate) fn flapped(&self) {
        self.flaps.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("mesh_member_flaps_total").increment(1);
    }

    pub(crate) fn suspicion_raised(&self) {
        self.suspicions_raised.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("mesh_suspicions_raised_total").increment(1);
    }

    pub(crate) fn suspicion_refuted(&self) {
        self.suspicions_refuted.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("mesh_suspicions_refuted_total").increment(1);
    }

    pub(crate) fn refuted_self(&self) {
        self.refuted_self.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("mesh_self_suspicions_refuted_total").increment(1);
    }

    pub(crate) fn set_health_score(&self, score: u8) {
        let previous = self.health_score.swap(u64::from(score), Ordering::Relaxed);
        if previous != u64::from(score) {
            metrics::gauge!("mesh_health_score").set(f64::from(score));
        }
    }

    pub(crate) fn snapshot(&self) -> MeshStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MeshStats {
            datagrams_received: get(&self.received),
            datagrams_sent: get(&self.sent),
            bytes_received: get(&self.bytes_received),
            bytes_sent: get(&self.bytes_sent),
            send_failures: get(&self.send_failures),
            seal_failures: get(&self.seal_failures),
            dropped_malformed: get(&self.malformed),
            dropped_unauthenticated: get(&self.unauthenticated),
            dropped_overload: get(&self.overload),
            foca_rejected: get(&self.foca_rejected),
            states_rejected: get(&self.states_rejected),
            discovery_failures: get(&self.discovery_failures),
            suspicions: get(&self.suspicions),
            flaps: get(&self.flaps),
            suspicions_raised: get(&self.suspicions_raised),
            suspicions_refuted: get(&self.suspicions_refuted),
            refuted_self: get(&self.refuted_self),
            health_score: get(&self.health_score),
        }
    }
}
