//! The discovery task: asks the discovery source for peers on an interval, or sooner when the
//! membership task wants it (isolated), and hands every answer to the membership task, which
//! announces to the addresses that are not members. A failed or empty answer keeps the last
//! good one in use ([`LastKnownGood`]).

use std::{sync::Arc, time::Duration};

use mesh_discovery::{DynDiscover, LastKnownGood};
use tokio::sync::mpsc;

use crate::{handle_state::Shared, input::Input};

pub(crate) async fn discovery_loop(
    discovery: Arc<dyn DynDiscover>,
    interval: Duration,
    inputs: mpsc::Sender<Input>,
    shared: Arc<Shared>,
) {
    let discovery = LastKnownGood::new(discovery);
    loop {
        // Boxed as `Send` here, where the source type is concrete: proving it through the
        // generic `refresh` future trips a higher-ranked lifetime limitation of rustc.
        let refreshing: std::pin::Pin<Box<dyn Future<Output = _> + Send + '_>> =
            Box::pin(discovery.refresh());
        let refresh = refreshing.await;
        if let Some(error) = refresh.error() {
            shared.counters.discovery_failed();
            tracing::warn!(%error, age = ?refresh.age, "peer discovery failed; keeping the last good answer");
        }
        if inputs
            .send(Input::Discovered(refresh.addrs.to_vec()))
            .await
            .is_err()
        {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shared.discovery_wanted.notified() => {}
        }
    }
}
