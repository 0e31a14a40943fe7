//! What the router decided, by outcome: the counters behind [`RouterStats`], also exported
//! through the `metrics` facade.

use std::sync::atomic::{AtomicU64, Ordering};

use super::placement::Route;
use crate::error::RouteError;

/// Routing decisions by outcome ([`Router::stats`](crate::Router::stats)); each call's final decision counts once,
/// however often a held call was re-checked. Also exported as
/// `mesh_route_decisions_total{outcome}` and `mesh_route_held_total`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RouterStats {
    /// Calls routed to this node.
    pub local: u64,
    /// Calls routed to a peer.
    pub peer: u64,
    /// Calls refused because no member has the required tags.
    pub no_matching_node: u64,
    /// Calls refused because every matching member was draining, stale or excluded.
    pub no_available_node: u64,
    /// Calls held under [`WhenFull::Wait`](crate::WhenFull::Wait) because every candidate was full.
    pub held: u64,
}

impl RouterStats {
    /// The decision outcomes with their metric label, in a stable order (`held` is not an
    /// outcome: a held call is counted again when it is routed).
    pub fn outcomes(&self) -> [(&'static str, u64); 4] {
        [
            ("local", self.local),
            ("peer", self.peer),
            ("no_matching_node", self.no_matching_node),
            ("no_available_node", self.no_available_node),
        ]
    }
}

/// The live counters behind [`RouterStats`].
#[derive(Debug, Default)]
pub(super) struct Decisions {
    local: AtomicU64,
    peer: AtomicU64,
    no_matching_node: AtomicU64,
    no_available_node: AtomicU64,
    held: AtomicU64,
}

impl Decisions {
    /// Counts a call's final decision.
    pub(super) fn count(&self, route: Result<&Route, &RouteError>) {
        let (counter, outcome) = match route {
            Ok(Route::Local) => (&self.local, "local"),
            Ok(Route::Peer(_)) => (&self.peer, "peer"),
            Err(RouteError::NoMatchingNode { .. }) => (&self.no_matching_node, "no_matching_node"),
            Err(_) => (&self.no_available_node, "no_available_node"),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("mesh_route_decisions_total", "outcome" => outcome).increment(1);
    }

    /// Counts a call held because every candidate was full.
    pub(super) fn count_held(&self) {
        self.held.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("mesh_route_held_total").increment(1);
    }

    pub(super) fn snapshot(&self) -> RouterStats {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        RouterStats {
            local: read(&self.local),
            peer: read(&self.peer),
            no_matching_node: read(&self.no_matching_node),
            no_available_node: read(&self.no_available_node),
            held: read(&self.held),
        }
    }
}
