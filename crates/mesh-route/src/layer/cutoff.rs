//! Ending the calls a server still streams when it must stop now (a drain's grace period ran
//! out): each response ends at once, in the way that lets its caller carry on.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures::StreamExt as _;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tonic::{Status, body::Body};

use super::grpc;

/// The switch shared by a layer and every response body it wraps.
#[derive(Debug)]
pub(crate) struct Cutoff {
    cut: watch::Sender<bool>,
}

impl Default for Cutoff {
    fn default() -> Self {
        Self {
            cut: watch::Sender::new(false),
        }
    }
}

impl Cutoff {
    pub(crate) fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// `body`, ended when the switch is thrown. A call a peer forwarded here ends with an
    /// error (the stream is reset), which the peer's relay takes for a dead node and, for an
    /// idempotent rule, routes the call again; a client's own call ends with `UNAVAILABLE`,
    /// which gRPC clients (Bazel included) retry.
    pub(crate) fn wrap(&self, body: Body, forwarded: bool) -> Body {
        Body::new(CutBody {
            inner: body,
            cut: WatchStream::new(self.cut.subscribe()),
            forwarded,
            ended: false,
        })
    }
}

struct CutBody {
    inner: Body,
    cut: WatchStream<bool>,
    forwarded: bool,
    ended: bool,
}

impl HttpBody for CutBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        while let Poll::Ready(Some(cut)) = self.cut.poll_next_unpin(cx) {
            if cut {
                self.ended = true;
                let status = Status::unavailable(
                    "the server is shutting down and its grace period ran out: call again",
                );
                return Poll::Ready(Some(if self.forwarded {
                    Err(status)
                } else {
                    Ok(Frame::trailers(grpc::trailers_of(&status)))
                }));
            }
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
