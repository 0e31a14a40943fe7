//! Housekeeping: a task that follows the membership's events and lets go of what belonged to
//! a peer life that ended — its channel, the calls counted against it, and the relays that
//! watch it — and drops the channel of a peer that moved to another endpoint.
//!
//! The seed server kept a connection per peer forever, so a cluster with pod churn slowly
//! filled with connections to dead addresses. Events can be lost when the task lags; it then
//! resynchronises with the view, which is always authoritative.

use mesh_core::{Membership, MembershipView, MeshEvent};
use tokio::sync::broadcast;

use super::{departures::Departures, in_flight::InFlight};
use crate::channels::PeerChannels;

/// Evicts channels and accounting of peers that failed, left, were replaced or moved.
pub(super) async fn housekeeping(
    mut events: broadcast::Receiver<MeshEvent>,
    membership: Membership,
    channels: PeerChannels,
    in_flight: InFlight,
    departures: Departures,
) {
    loop {
        match events.recv().await {
            Ok(
                MeshEvent::Failed(gone)
                | MeshEvent::Left(gone)
                | MeshEvent::Rejoined { previous: gone, .. },
            ) => {
                if channels.evict_life(gone.node_id(), gone.generation()) {
                    tracing::debug!(peer = %gone, "dropped the channel of a departed peer life");
                }
                in_flight.forget(gone.node_id());
                departures.depart(gone.node_id(), gone.generation());
            }
            Ok(MeshEvent::Updated(state)) => {
                channels.evict_if_moved(&state.node_id, state.grpc_endpoint.as_deref());
            }
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                // Events were lost: fall back to the view, which is always authoritative.
                tracing::debug!(
                    missed,
                    "router housekeeping lagged; resyncing with the view"
                );
                let view = membership.view();
                resync(&view, &channels);
                departures.resync(&view);
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// After lost events: keeps only the channels of nodes the view still has as peers.
fn resync(view: &MembershipView, channels: &PeerChannels) {
    channels.retain(|node| view.get(node.as_str()).is_some_and(|m| !m.is_local()));
}
