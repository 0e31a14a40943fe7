//! The body wrapper that sees how a forwarded call ends, and records it in the layer's
//! per-peer counters ([`super::stats`], where the five outcomes are explained).

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use mesh_core::NodeId;

use super::stats::{Direction, ForwardOutcome, LayerCounters};

/// What the forwarding side does with a forwarded call's trailers before they are relayed
/// (read and remove the peer's [`COUNTED_UNTIL`](crate::COUNTED_UNTIL)).
pub(crate) type TrailersHook = Box<dyn FnOnce(&mut HeaderMap) + Send>;

#[derive(Debug)]
pub(crate) struct OutcomeRecorder {
    counters: Arc<LayerCounters>,
    peer: NodeId,
    direction: Direction,
    done: bool,
}

impl OutcomeRecorder {
    pub(crate) fn new(counters: Arc<LayerCounters>, peer: NodeId, direction: Direction) -> Self {
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
        self.observe_with(response, None)
    }

    /// [`OutcomeRecorder::observe`], with `hook` run on the trailers before they pass on.
    pub(crate) fn observe_with(
        self,
        response: http::Response<tonic::body::Body>,
        hook: Option<TrailersHook>,
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
                hook,
            })
        })
    }
}

impl Drop for OutcomeRecorder {
    fn drop(&mut self) {
        self.record(ForwardOutcome::Cancelled);
    }
}

/// A response body that tells its [`OutcomeRecorder`] how it ended; frames pass unchanged,
/// but for what its hook takes out of the trailers.
struct ObservedBody {
    inner: tonic::body::Body,
    recorder: OutcomeRecorder,
    hook: Option<TrailersHook>,
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        let mut polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &mut polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_mut() {
                    if let Some(hook) = this.hook.take() {
                        hook(trailers);
                    }
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
    use crate::layer::stats::ForwardCounts;

    fn recorder(counters: &Arc<LayerCounters>) -> OutcomeRecorder {
        OutcomeRecorder::new(
            Arc::clone(counters),
            NodeId::new("b").unwrap(),
            Direction::Outbound,
        )
    }

    fn outbound(counters: &LayerCounters) -> ForwardCounts {
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
        let counters = Arc::new(LayerCounters::default());
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
