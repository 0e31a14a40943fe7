//! How forwarded calls ended, per peer: the layer's per-peer counters and the body wrapper that
//! sees a call's end.
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
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use mesh_core::NodeId;

use super::layer::Counters;

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
    fn of_status(status: &http::HeaderValue) -> Self {
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
#[derive(Debug)]
pub(crate) struct OutcomeRecorder {
    counters: Arc<Counters>,
    peer: NodeId,
    direction: Direction,
    done: bool,
}

impl OutcomeRecorder {
    pub(crate) fn new(counters: Arc<Counters>, peer: NodeId, direction: Direction) -> Self {
        Self {
            counters,
            peer,
            direction,
            done: false,
        }
    }

    pub(crate) fn finish(mut self, outcome: ForwardOutcome) {
        self.record(outcome);
    }

    fn record(&mut self, outcome: ForwardOutcome) {
        if !std::mem::replace(&mut self.done, true) {
            self.counters
                .peers
                .record(&self.peer, self.direction, outcome);
        }
    }

    /// Wraps a response: a trailers-only response is recorded at once, any other when its
    /// body ends (or is dropped).
    pub(crate) fn observe(
        self,
        response: http::Response<tonic::body::Body>,
    ) -> http::Response<tonic::body::Body> {
        if let Some(status) = response.headers().get("grpc-status") {
            let outcome = ForwardOutcome::of_status(status);
            self.finish(outcome);
            return response;
        }
        response.map(|body| {
            tonic::body::Body::new(ObservedBody {
                inner: body,
                recorder: self,
            })
        })
    }
}

impl Drop for OutcomeRecorder {
    fn drop(&mut self) {
        self.record(ForwardOutcome::Cancelled);
    }
}

/// A response body that tells its [`OutcomeRecorder`] how it ended; frames pass unchanged.
struct ObservedBody {
    inner: tonic::body::Body,
    recorder: OutcomeRecorder,
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.recorder.record(outcome_of_trailers(trailers));
                }
            }
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => {
                // An error, or an end without trailers (a finished call has both).
                this.recorder.record(ForwardOutcome::Broken);
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn outcome_of_trailers(trailers: &HeaderMap) -> ForwardOutcome {
    trailers
        .get("grpc-status")
        .map_or(ForwardOutcome::Broken, ForwardOutcome::of_status)
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    fn recorder(counters: &Arc<Counters>) -> OutcomeRecorder {
        OutcomeRecorder::new(
            Arc::clone(counters),
            NodeId::new("b").unwrap(),
            Direction::Outbound,
        )
    }

    fn outbound(counters: &Counters) -> ForwardCounts {
        counters.peers.snapshot()[&NodeId::new("b").unwrap()].outbound
    }

    fn streamed(trailers: Option<&'static str>) -> http::Response<tonic::body::Body> {
        let mut frames = vec![Ok::<_, tonic::Status>(Frame::data(Bytes::from_static(
            b"\0\0\0\0\0",
        )))];
        if let Some(status) = trailers {
            let mut map = HeaderMap::new();
            map.insert("grpc-status", status.parse().unwrap());
            frames.push(Ok(Frame::trailers(map)));
        }
        let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
        http::Response::new(tonic::body::Body::new(body))
    }

    #[tokio::test]
    async fn a_call_is_counted_once_by_how_it_ended() {
        let counters = Arc::new(Counters::default());
        // Trailers-only: at once.
        let response = http::Response::builder()
            .header("grpc-status", "5")
            .body(tonic::body::Body::empty())
            .unwrap();
        let _ = recorder(&counters).observe(response);
        assert_eq!(outbound(&counters).error, 1);

        for (trailers, expect) in [(Some("0"), 1), (Some("14"), 2)] {
            let body = recorder(&counters).observe(streamed(trailers)).into_body();
            let collected = body.collect().await;
            assert!(collected.is_ok());
            assert_eq!(outbound(&counters).ok, 1);
            assert_eq!(outbound(&counters).error, expect);
        }

        // Ended without a status.
        let _ = recorder(&counters)
            .observe(streamed(None))
            .into_body()
            .collect()
            .await;
        assert_eq!(outbound(&counters).broken, 1);

        // Dropped before its end.
        drop(recorder(&counters).observe(streamed(Some("0"))));
        assert_eq!(outbound(&counters).cancelled, 1);
        recorder(&counters).finish(ForwardOutcome::Unreachable);
        let counts = outbound(&counters);
        assert_eq!((counts.unreachable, counts.total()), (1, 6));
    }
}
