//! Stopping a node without cutting a call: the graceful drain of a rolling update.
//!
//! Kubernetes stops a pod by taking it out of its Service's endpoints, sending SIGTERM, and
//! killing it after the termination grace period (30 s by default). gRPC's graceful stop sends
//! HTTP/2 GOAWAY and lets the calls in flight finish; Envoy drains a listener the same way.
//! [`drain`] puts the two together for a mesh node:
//!
//! 1. the node is marked draining in the mesh at once: its readiness (`grpc.health.v1`, see
//!    [`crate::health`]) goes `NOT_SERVING`, and no router — its own included — sends it new
//!    work;
//! 2. the gRPC server stops accepting connections and sends GOAWAY on the open ones, so clients
//!    open their next calls elsewhere, while the calls already running go on;
//! 3. the node waits, up to the grace period, until those calls have ended and its load is
//!    zero (work queued or running that no call waits for, such as an action whose client went
//!    away, counts too);
//!    When the grace period runs out first, the calls still open are cut: a call that reached
//!    this node through a peer's route layer is routed again by that peer if its rule is
//!    idempotent, as if the node had died, and a client's own call ends `UNAVAILABLE`, which
//!    gRPC clients retry;
//! 4. what the caller still has to do before the node goes — `settle`, e.g. a REAPI replica
//!    leaving for good hands its blobs to their new owners — gets what is left of the grace
//!    period;
//! 5. it leaves the mesh (peers see "left", not "failed") and returns; work still running
//!    (an action no call waits for) ends when the caller drops the node's runtime.

use std::{future::Future, time::Duration};

use tokio::time::Instant;

use crate::Node;

/// The default grace period: below Kubernetes' default termination grace period (30 s), so a
/// drain ends before the kubelet kills the pod.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(20);

/// How a drain went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Drained {
    /// Every call ended and no work was left before the grace period ran out.
    pub finished: bool,
    /// The node's pending tasks when the drain ended (0 when `finished`).
    pub pending: u32,
    /// How long the drain took, up to leaving the mesh.
    pub took: Duration,
}

/// How long the calls cut at the end of the grace period get to end before the node leaves.
const AFTER_CUT: Duration = Duration::from_secs(1);

/// Drains `node` (see the [module docs](self)): marks it draining, calls `stop_accepting` (which
/// should start the gRPC server's graceful shutdown: GOAWAY, no new connections), waits up to
/// `grace` for `server` (the server's task, ending once every connection closed), for the
/// node's load to reach zero and for `settle`, then leaves the mesh. If calls are still open
/// when the grace period ends, `layer` cuts them
/// ([`RouteLayer::cut_running_calls`](crate::route::layer::RouteLayer::cut_running_calls))
/// and the server gets a moment more to close its connections.
pub async fn drain<S: Future>(
    node: &Node,
    grace: Duration,
    layer: &crate::route::layer::RouteLayer,
    stop_accepting: impl FnOnce(),
    server: S,
    settle: impl Future<Output = ()>,
) -> Drained {
    let started = Instant::now();
    let deadline = started + grace;
    if let Err(error) = node.membership().set_draining(true) {
        tracing::warn!(%error, "marking the node draining failed; stopping anyway");
    }
    stop_accepting();
    let mut server = std::pin::pin!(server);
    let served = tokio::time::timeout_at(deadline, &mut server).await.is_ok();
    if !served {
        layer.cut_running_calls();
        let _ = tokio::time::timeout(AFTER_CUT, &mut server).await;
    }
    let load = node.load();
    let mut freed = load.slot_freed();
    let idle = tokio::time::timeout_at(deadline, async {
        while load.pending() > 0 {
            if freed.changed().await.is_err() {
                break;
            }
        }
    })
    .await
    .is_ok();
    let pending = load.pending();
    let settled = tokio::time::timeout_at(deadline, settle).await.is_ok();
    let took = started.elapsed();
    if let Err(error) = node.leave().await {
        tracing::warn!(%error, "leaving the mesh after the drain failed");
    }
    let finished = served && idle && settled && pending == 0;
    if finished {
        tracing::info!(?took, "drained: every call finished");
    } else {
        tracing::warn!(
            ?took,
            pending,
            calls_open = !served,
            settled,
            "the grace period ran out: what still runs is cut"
        );
    }
    Drained {
        finished,
        pending,
        took,
    }
}
