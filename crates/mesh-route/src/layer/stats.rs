//! What a route layer counts: its totals ([`LayerStats`], read from the live `LayerCounters`) and
//! how forwarded calls ended, per peer and direction ([`PeerForwards`]). The data only: the
//! layer, the call task and the outcome recorder write to it, and it depends on none of them.
//!
//! A forwarded call ends in one of five ways ([`ForwardOutcome`]), told apart by what the
//! response carried: a `grpc-status` of 0 (in trailers, or in the head of a trailers-only
//! response) is `ok`, any other status `error`; a body that failed or ended without a status
//! is `broken`; one dropped before its end (the client went away, or the membership declared
//! the peer down mid-relay) is `cancelled`; a peer that was never reached is `unreachable`.
//! Calls this node forwarded are counted under the peer that ran them (`outbound`), calls
//! peers forwarded here under the peer that sent them (`inbound`, from `x-mesh-forwarded-by`).

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use mesh_core::NodeId;

/// How one forwarded call ended: told apart by the `grpc-status` the response carried (0 is
/// `Ok`), by a body that failed or ended without one (`Broken`), or was dropped before its end
/// (`Cancelled`); a peer never reached is `Unreachable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ForwardOutcome {
    /// It ended with status OK.
    Ok,
    /// It ended with another gRPC status.
    Error,
    /// Its response failed or ended without a status (the connection broke, the peer died).
    Broken,
    /// It was dropped before its end: the client went away, or the peer was declared down
    /// while its response was relayed.
    Cancelled,
    /// The peer could not be reached; it never saw the call (outbound only).
    Unreachable,
}

impl ForwardOutcome {
    /// Every outcome, in the order stats list them.
    pub const ALL: [ForwardOutcome; 5] = [
        ForwardOutcome::Ok,
        ForwardOutcome::Error,
        ForwardOutcome::Broken,
        ForwardOutcome::Cancelled,
        ForwardOutcome::Unreachable,
    ];

    /// Its lower-case name, as metrics and the admin API label it.
    pub fn name(self) -> &'static str {
        match self {
            ForwardOutcome::Ok => "ok",
            ForwardOutcome::Error => "error",
            ForwardOutcome::Broken => "broken",
            ForwardOutcome::Cancelled => "cancelled",
            ForwardOutcome::Unreachable => "unreachable",
        }
    }

    /// From a `grpc-status` value: OK or an error.
    pub(crate) fn of_status(status: &http::HeaderValue) -> Self {
        if status.as_bytes() == b"0" {
            ForwardOutcome::Ok
        } else {
            ForwardOutcome::Error
        }
    }
}

/// Forwarded calls that ended each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ForwardCounts {
    /// Ended OK.
    pub ok: u64,
    /// Ended with another status.
    pub error: u64,
    /// Broke before their status.
    pub broken: u64,
    /// Dropped before their end.
    pub cancelled: u64,
    /// Never reached the peer.
    pub unreachable: u64,
}

impl ForwardCounts {
    /// The count of one outcome.
    pub fn get(&self, outcome: ForwardOutcome) -> u64 {
        match outcome {
            ForwardOutcome::Ok => self.ok,
            ForwardOutcome::Error => self.error,
            ForwardOutcome::Broken => self.broken,
            ForwardOutcome::Cancelled => self.cancelled,
            ForwardOutcome::Unreachable => self.unreachable,
        }
    }

    /// Every call counted, whatever its outcome.
    pub fn total(&self) -> u64 {
        ForwardOutcome::ALL.iter().map(|o| self.get(*o)).sum()
    }

    fn add(&mut self, outcome: ForwardOutcome) {
        let counter = match outcome {
            ForwardOutcome::Ok => &mut self.ok,
            ForwardOutcome::Error => &mut self.error,
            ForwardOutcome::Broken => &mut self.broken,
            ForwardOutcome::Cancelled => &mut self.cancelled,
            ForwardOutcome::Unreachable => &mut self.unreachable,
        };
        *counter += 1;
    }
}

/// The calls exchanged with one peer ([`RouteLayer::peer_stats`](super::RouteLayer::peer_stats)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerForwards {
    /// Calls this node forwarded to the peer, by how they ended.
    pub outbound: ForwardCounts,
    /// Calls the peer forwarded to this node, by how they ended.
    pub inbound: ForwardCounts,
}

/// Which way a call crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// We sent it to the peer.
    Outbound,
    /// The peer sent it to us.
    Inbound,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Outbound => "out",
            Direction::Inbound => "in",
        }
    }
}

/// Per-peer counts, behind a lock taken once per finished call.
#[derive(Debug, Default)]
pub(crate) struct PeerCounters(Mutex<BTreeMap<NodeId, PeerForwards>>);

impl PeerCounters {
    pub(crate) fn record(&self, peer: &NodeId, direction: Direction, outcome: ForwardOutcome) {
        {
            let mut peers = self.0.lock().unwrap_or_else(|p| p.into_inner());
            let counts = peers.entry(peer.clone()).or_default();
            match direction {
                Direction::Outbound => counts.outbound.add(outcome),
                Direction::Inbound => counts.inbound.add(outcome),
            }
        }
        metrics::counter!(
            "mesh_route_forwards_total",
            "peer" => peer.to_string(),
            "direction" => direction.name(),
            "outcome" => outcome.name(),
        )
        .increment(1);
    }

    pub(crate) fn snapshot(&self) -> BTreeMap<NodeId, PeerForwards> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Records how one forwarded call ends, exactly once.
/// Counts of what a [`RouteLayer`](super::RouteLayer) did with the calls that have a rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LayerStats {
    /// Calls with a rule served here: the rule said so, this node was chosen, or the call
    /// arrived forwarded by a peer.
    pub local: u64,
    /// Of those, calls that arrived forwarded by a peer.
    pub forwarded_in: u64,
    /// Spread calls sent to a peer that accepted them.
    pub forwarded_out: u64,
    /// Calls sent to the peer that owns their operation.
    pub to_owner: u64,
    /// Idempotent calls routed again because their peer died before completing them.
    pub rerouted: u64,
    /// Peers skipped because they could not be connected to (the call went elsewhere).
    pub unreachable: u64,
    /// Relays cut short: the peer died or the connection broke, and the call was not
    /// re-routed (the client saw `UNAVAILABLE`).
    pub relays_broken: u64,
    /// Calls answered with an error by the layer itself (bad request, no node, deadline).
    pub refused: u64,
    /// Calls of spread rules running here now, each counted as one pending task of the node
    /// until its response ends (see [`CallTask`](super::CallTask)): with no other work
    /// counted, the node's [`LoadTracker::pending`](mesh_core::LoadTracker::pending) equals
    /// this.
    pub running: u64,
}

#[derive(Debug, Default)]
pub(crate) struct LayerCounters {
    pub(crate) local: AtomicU64,
    pub(crate) forwarded_in: AtomicU64,
    pub(crate) forwarded_out: AtomicU64,
    pub(crate) to_owner: AtomicU64,
    pub(crate) rerouted: AtomicU64,
    pub(crate) unreachable: AtomicU64,
    pub(crate) relays_broken: AtomicU64,
    pub(crate) refused: AtomicU64,
    /// A gauge: calls counted here whose response has not ended.
    pub(crate) running: AtomicU64,
    /// Forwarded calls by peer, direction and outcome.
    pub(crate) peers: PeerCounters,
}

impl LayerCounters {
    pub(crate) fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> LayerStats {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        LayerStats {
            local: read(&self.local),
            forwarded_in: read(&self.forwarded_in),
            forwarded_out: read(&self.forwarded_out),
            to_owner: read(&self.to_owner),
            rerouted: read(&self.rerouted),
            unreachable: read(&self.unreachable),
            relays_broken: read(&self.relays_broken),
            refused: read(&self.refused),
            running: read(&self.running),
        }
    }
}
