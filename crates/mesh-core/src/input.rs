//! What reaches the membership task: datagrams, already opened and decoded by the receive
//! task, and requests from handles and the discovery task.
//!
//! Each datagram body is decoded exactly once, here, off the membership task: a SWIM packet is
//! left whole for foca, a pushed [`NodeState`] and a leave notice become typed values. A body
//! that does not decode never reaches the membership task.

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::{
    Identity, NodeState, StateError, agent::lifeguard::notice::Notice, counters::Dropped,
    wire::Kind,
};

/// A datagram's message, decoded.
#[derive(Debug)]
pub(crate) enum Message {
    /// A foca SWIM packet, which foca decodes itself.
    Foca(Bytes),
    /// A node pushing its own state: the decoded state, and its bytes for foca to
    /// re-disseminate unchanged.
    StatePush { state: Arc<NodeState>, bytes: Bytes },
    /// A node announcing that it is leaving.
    Leave(Identity),
    /// A Lifeguard suspicion message.
    Lifeguard(Notice),
}

/// Why a well-enveloped datagram's body was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("malformed leave notice: {0}")]
    Leave(#[source] postcard::Error),
    #[error("malformed lifeguard message: {0}")]
    Lifeguard(#[source] postcard::Error),
}

impl BodyError {
    /// The counter it is dropped under.
    pub(crate) fn dropped(&self) -> Dropped {
        match self {
            BodyError::State(_) => Dropped::StateRejected,
            BodyError::Leave(_) => Dropped::Malformed("leave_body"),
            BodyError::Lifeguard(_) => Dropped::Malformed("lifeguard_body"),
        }
    }
}

impl Message {
    /// Decodes the body of a datagram of `kind`.
    pub(crate) fn decode(kind: Kind, body: &[u8]) -> Result<Self, BodyError> {
        Ok(match kind {
            Kind::Foca => Message::Foca(Bytes::copy_from_slice(body)),
            Kind::StatePush => Message::StatePush {
                state: Arc::new(NodeState::decode(body)?),
                bytes: Bytes::copy_from_slice(body),
            },
            Kind::Leave => Message::Leave(postcard::from_bytes(body).map_err(BodyError::Leave)?),
            Kind::Lifeguard => {
                Message::Lifeguard(postcard::from_bytes(body).map_err(BodyError::Lifeguard)?)
            }
        })
    }
}

/// What the receive task, the discovery task and the handles send to the membership task.
#[derive(Debug)]
pub(crate) enum Input {
    Datagram { message: Message, from: SocketAddr },
    Join(Vec<SocketAddr>),
    Discovered(Vec<SocketAddr>),
    Leave(oneshot::Sender<()>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeId;

    #[test]
    fn each_kind_decodes_to_its_message() {
        let mut state = NodeState::new(NodeId::new("a").unwrap(), 3, 9);
        state.max_concurrency = 4;
        let bytes = state.encode().unwrap();
        match Message::decode(Kind::StatePush, &bytes).unwrap() {
            Message::StatePush {
                state: decoded,
                bytes: kept,
            } => {
                assert_eq!(*decoded, state);
                assert_eq!(&kept[..], &bytes[..]);
            }
            other => panic!("expected a state push, got {other:?}"),
        }

        let identity = Identity::new(NodeId::new("b").unwrap(), "127.0.0.1:9".parse().unwrap(), 5);
        let notice = postcard::to_allocvec(&identity).unwrap();
        assert!(matches!(
            Message::decode(Kind::Leave, &notice).unwrap(),
            Message::Leave(left) if left == identity
        ));

        assert!(matches!(
            Message::decode(Kind::Foca, b"anything").unwrap(),
            Message::Foca(packet) if &packet[..] == b"anything"
        ));
    }

    #[test]
    fn bodies_that_do_not_decode_are_refused_with_their_counter() {
        let error = Message::decode(Kind::StatePush, b"\xff\xff").unwrap_err();
        assert!(matches!(error.dropped(), Dropped::StateRejected), "{error}");
        let error = Message::decode(Kind::Leave, b"").unwrap_err();
        assert!(
            matches!(error.dropped(), Dropped::Malformed("leave_body")),
            "{error}"
        );
    }
}
