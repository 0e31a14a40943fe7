//! The body of a relayed response, and the framing that keeps it whole across a re-route.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;
use tonic::Status;

use super::grpc::whole_messages_len;

/// The relay: the future that reads the upstream's frames and feeds them to the body.
type Relay = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A response body fed by the relay: the peer's frames as they arrive, then its trailers (or
/// trailers carrying the status that ended the relay). The body drives the relay itself, in
/// the task of the connection that polls it, as a plain proxy's body polls its upstream: no
/// task of its own, so a frame costs no extra wake-up. Dropping the body drops the relay and,
/// with it, the call upstream.
pub struct RelayBody {
    frames: mpsc::Receiver<Frame<Bytes>>,
    relay: Option<Relay>,
    ended: bool,
}

impl fmt::Debug for RelayBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayBody")
            .field("relaying", &self.relay.is_some())
            .field("ended", &self.ended)
            .finish()
    }
}

impl RelayBody {
    /// The body of `frames`, which `relay` sends; the body polls `relay` whenever it has no
    /// frame to hand out.
    pub(crate) fn new(
        frames: mpsc::Receiver<Frame<Bytes>>,
        relay: impl Future<Output = ()> + Send + 'static,
    ) -> Self {
        Self {
            frames,
            relay: Some(Box::pin(relay)),
            ended: false,
        }
    }
}

impl Body for RelayBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        // Frames already sent first; then the relay runs until it sends one or waits.
        if let Poll::Ready(Some(frame)) = self.frames.poll_recv(cx) {
            if frame.is_trailers() {
                self.ended = true;
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(relay) = self.relay.as_mut()
            && relay.as_mut().poll(cx).is_ready()
        {
            // Done: its last frame (trailers) is in the channel, and the sender is gone.
            self.relay = None;
        }
        match self.frames.poll_recv(cx) {
            Poll::Ready(Some(frame)) => {
                if frame.is_trailers() {
                    self.ended = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            // The relay task always ends with trailers; if it vanished (its runtime shut
            // down), say so instead of ending the stream without a status.
            Poll::Ready(None) => {
                self.ended = true;
                let status = Status::unavailable("the relay of this call stopped");
                Poll::Ready(Some(Ok(Frame::trailers(super::grpc::trailers_of(&status)))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Passes on only whole gRPC messages, holding back a message cut across data frames until its
/// last byte arrives. If the upstream dies mid-message, the held part is dropped, so a stream
/// continued from another node never carries a torn message. Bytes are never re-encoded: a
/// frame made of whole messages is passed on as it is.
#[derive(Debug, Default)]
pub(crate) struct MessageFramer {
    partial: BytesMut,
}

impl MessageFramer {
    /// Takes a data frame; returns the whole messages it completes (possibly none).
    pub(crate) fn push(&mut self, mut chunk: Bytes) -> Option<Bytes> {
        if self.partial.is_empty() {
            let whole = whole_messages_len(&chunk);
            if whole == chunk.len() {
                return (!chunk.is_empty()).then_some(chunk);
            }
            let messages = chunk.split_to(whole);
            self.partial.extend_from_slice(&chunk);
            return (!messages.is_empty()).then_some(messages);
        }
        self.partial.extend_from_slice(&chunk);
        let whole = whole_messages_len(&self.partial);
        (whole > 0).then(|| self.partial.split_to(whole).freeze())
    }

    /// Drops a message cut short by a failed upstream.
    pub(crate) fn discard_partial(&mut self) {
        self.partial.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn whole_frames_pass_as_they_are_and_torn_messages_wait() {
        let mut framer = MessageFramer::default();
        let one = Bytes::from(message(b"first"));
        assert_eq!(framer.push(one.clone()).unwrap(), one);

        let two = message(b"second message");
        let (head, tail) = two.split_at(7);
        assert_eq!(framer.push(Bytes::copy_from_slice(head)), None);
        let mut rest = tail.to_vec();
        let three = message(b"3");
        rest.extend_from_slice(&three[..2]);
        assert_eq!(framer.push(Bytes::from(rest)).unwrap(), Bytes::from(two));
        assert_eq!(
            framer.push(Bytes::copy_from_slice(&three[2..])).unwrap(),
            Bytes::from(three)
        );
        assert_eq!(framer.push(Bytes::new()), None);
    }

    #[test]
    fn a_torn_message_is_dropped_when_the_upstream_dies() {
        let mut framer = MessageFramer::default();
        let torn = message(b"never finished");
        assert_eq!(framer.push(Bytes::copy_from_slice(&torn[..9])), None);
        framer.discard_partial();
        let next = Bytes::from(message(b"from another node"));
        assert_eq!(framer.push(next.clone()).unwrap(), next);
    }

    /// The body runs the relay itself (nothing else polls it here), hands out what it sends,
    /// and ends with trailers even if the relay ends without sending any.
    #[tokio::test]
    async fn the_body_drives_its_relay_and_ends_with_trailers_even_if_the_relay_sends_none() {
        use http_body_util::BodyExt;
        let (tx, rx) = mpsc::channel(4);
        let relay = async move {
            for piece in [&b"a"[..], b"bc"] {
                tokio::task::yield_now().await;
                tx.send(Frame::data(Bytes::from_static(piece)))
                    .await
                    .unwrap();
            }
        };
        let body = RelayBody::new(rx, relay).collect();
        let collected = tokio::time::timeout(std::time::Duration::from_secs(30), body)
            .await
            .expect("the body ran its relay to the end")
            .unwrap();
        let trailers = collected.trailers().unwrap().clone();
        assert_eq!(collected.to_bytes(), Bytes::from_static(b"abc"));
        assert_eq!(trailers.get("grpc-status").unwrap(), "14");
    }
}
