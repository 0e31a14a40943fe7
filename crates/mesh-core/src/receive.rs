//! The receive task: reads datagrams, checks and decrypts their envelope, decodes their body,
//! and hands the result to the membership task.
//!
//! Garbage, unauthenticated datagrams and undecodable bodies are counted and dropped here, so
//! they cost the membership task nothing and never reach foca.

use std::{sync::Arc, time::Duration};

use tokio::sync::mpsc;

use crate::{
    WireError,
    counters::Dropped,
    handle_state::Shared,
    input::{Input, Message},
    transport::Transport,
    wire::{Envelope, MAX_DATAGRAM},
};

/// Read errors in a row after which the task pauses between reads, so a socket that keeps
/// failing is not spun on.
const ERRORS_BEFORE_BACKOFF: u32 = 8;
const BACKOFF: Duration = Duration::from_millis(50);

pub(crate) async fn receive_loop<T: Transport>(
    transport: Arc<T>,
    envelope: Envelope,
    inputs: mpsc::Sender<Input>,
    shared: Arc<Shared>,
) {
    // One byte more than the budget, so an oversized datagram is seen as such, not truncated.
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let mut plaintext = Box::new([0u8; MAX_DATAGRAM]);
    let mut consecutive_errors = 0u32;
    loop {
        let (len, from) = match transport.recv_from(&mut buf).await {
            Ok(received) => {
                consecutive_errors = 0;
                received
            }
            Err(error) => {
                // Some platforms report ICMP errors of earlier sends here; keep reading.
                consecutive_errors = consecutive_errors.saturating_add(1);
                tracing::debug!(%error, "gossip socket receive error");
                if consecutive_errors > ERRORS_BEFORE_BACKOFF {
                    tokio::time::sleep(BACKOFF).await;
                }
                continue;
            }
        };
        shared.counters.received(len);
        let (kind, body) = match envelope.open(&buf[..len], &mut plaintext) {
            Ok(opened) => opened,
            Err(error) => {
                shared.counters.dropped(envelope_drop(&error));
                tracing::debug!(%from, %error, "dropped datagram");
                continue;
            }
        };
        let message = match Message::decode(kind, body) {
            Ok(message) => message,
            Err(error) => {
                shared.counters.dropped(error.dropped());
                tracing::debug!(%from, %kind, %error, "dropped a datagram whose body does not decode");
                continue;
            }
        };
        match inputs.try_send(Input::Datagram { message, from }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => shared.counters.dropped(Dropped::Overload),
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

/// The counter an envelope failure is dropped under: authentication failures apart from
/// malformed datagrams.
fn envelope_drop(error: &WireError) -> Dropped {
    match error {
        WireError::Unauthenticated
        | WireError::MissingEncryption
        | WireError::UnexpectedEncryption => Dropped::Unauthenticated(error.label()),
        _ => Dropped::Malformed(error.label()),
    }
}
