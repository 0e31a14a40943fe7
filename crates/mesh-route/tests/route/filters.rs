//! What the router never routes to, through real routing decisions on a live membership: a
//! draining peer, a peer whose state is stale (older than the router's `max_state_age`), and
//! a suspect peer. Each test first shows the peer chosen, then kept out while the condition
//! holds, then chosen again once it clears, so it is the filter, and nothing else, that keeps
//! the peer out.
//!
//! On simulated time (turmoil), so state ages and suspicion are exact, not a loaded
//! machine's scheduling.

#[path = "../../../mesh-core/tests/core/support/one_host.rs"]
mod one_host;

use std::time::Duration;

use mesh_core::{Membership, PeerStatus, Timing};
use mesh_route::{Route, RouteError, RouteRequest, Router};
use one_host::{Links, builder, simulate, start, until};

/// An entry node with one slot and a peer with four, the peer with `peer_timing` and the tag
/// `pool=gpu`; returns once the entry has the peer's state.
async fn entry_and_peer(links: &Links, peer_timing: Timing) -> (Membership, Membership) {
    let entry = start(
        builder("entry", &[])
            .max_concurrency(1)
            .grpc_endpoint("http://entry.test:50051"),
        links,
    )
    .await;
    let peer = start(
        builder("peer", &[entry.local_addr()])
            .timing(peer_timing)
            .grpc_endpoint("http://peer.test:50051")
            .tags([("pool".to_owned(), "gpu".to_owned())].into()),
        links,
    )
    .await;
    until("the peer's state", &entry, |v| {
        v.get("peer").is_some_and(|m| m.state().is_some())
    })
    .await;
    (entry, peer)
}

/// Where `router` sends a call with `request` now: "local", a peer's name, or the error.
fn decision(router: &Router, request: &RouteRequest) -> String {
    match router.route(request) {
        Ok(Route::Local) => "local".to_owned(),
        Ok(Route::Peer(peer)) => peer.node_id().to_string(),
        Err(error) => format!("error: {error}"),
    }
}

fn any() -> RouteRequest {
    RouteRequest::new()
}

fn gpu() -> RouteRequest {
    RouteRequest::new().require_tag("pool", "gpu")
}

#[test]
fn a_draining_peer_is_kept_out_of_routing_and_comes_back_when_it_stops_draining() {
    simulate(1, async {
        let links = Links::default();
        let (entry, peer) = entry_and_peer(&links, Timing::local()).await;
        let _busy = entry.load().begin_task(); // the entry is full: 1/1
        let router = Router::builder(entry.clone()).build();
        assert_eq!(decision(&router, &any()), "peer");
        assert_eq!(decision(&router, &gpu()), "peer");

        peer.set_draining(true).unwrap();
        until("the peer draining", &entry, |v| {
            v.get("peer")
                .and_then(|m| m.state())
                .is_some_and(|s| s.draining)
        })
        .await;
        assert_eq!(
            decision(&router, &any()),
            "local",
            "a full entry keeps the call rather than give it to a draining peer"
        );
        // The only node with the tags is draining: there is a match, but nobody available.
        assert!(
            matches!(
                router.route(&gpu()),
                Err(RouteError::NoAvailableNode { .. })
            ),
            "{}",
            decision(&router, &gpu())
        );
        assert!(
            entry.view().get("peer").is_some(),
            "a draining peer is still a member"
        );

        peer.set_draining(false).unwrap();
        until("the peer back", &entry, |v| {
            v.get("peer")
                .and_then(|m| m.state())
                .is_some_and(|s| !s.draining)
        })
        .await;
        assert_eq!(decision(&router, &any()), "peer");
    });
}

#[test]
fn a_peer_whose_state_is_older_than_max_state_age_is_kept_out_until_it_is_refreshed() {
    simulate(2, async {
        let links = Links::default();
        // The peer re-sends its state once a minute: between changes, its state ages.
        let mut quiet = Timing::local();
        quiet.state_refresh_interval = Duration::from_secs(60);
        let (entry, peer) = entry_and_peer(&links, quiet).await;
        let _busy = entry.load().begin_task();
        // The default: four of the entry's refresh intervals (4 × 500 ms).
        let router = Router::builder(entry.clone()).build();
        let default_age = Timing::local().state_refresh_interval * 4;
        let patient = Router::builder(entry.clone())
            .max_state_age(Duration::from_secs(30))
            .build();
        assert_eq!(decision(&router, &any()), "peer");

        tokio::time::sleep(default_age + Duration::from_millis(500)).await;
        let age = entry.view().get("peer").unwrap().age().unwrap();
        assert!(age > default_age, "the state is {age:?} old");
        assert_eq!(
            decision(&router, &any()),
            "local",
            "a state {age:?} old is older than {default_age:?}"
        );
        assert!(matches!(
            router.route(&gpu()),
            Err(RouteError::NoAvailableNode { .. })
        ));
        assert_eq!(
            decision(&patient, &any()),
            "peer",
            "a router that allows 30 s still trusts it"
        );

        // A new version of the peer's state is fresh again.
        let _work = peer.load().begin_task();
        until("the peer's new state", &entry, |v| {
            v.get("peer")
                .and_then(|m| m.state())
                .is_some_and(|s| s.pending == 1)
        })
        .await;
        assert_eq!(decision(&router, &any()), "peer");
    });
}

#[test]
fn a_suspect_peer_is_kept_out_of_routing_until_it_refutes_the_suspicion() {
    simulate(3, async {
        let links = Links::default();
        let (entry, peer) = entry_and_peer(&links, Timing::local()).await;
        let _busy = entry.load().begin_task();
        // Ages are not what this test is about: allow any.
        let router = Router::builder(entry.clone())
            .max_state_age(Duration::from_secs(3600))
            .build();
        assert_eq!(decision(&router, &any()), "peer");

        // The peer stops answering probes.
        links.cut(&[&entry], &[&peer]);
        until("the peer suspect", &entry, |v| {
            v.get("peer")
                .is_some_and(|m| m.status() == PeerStatus::Suspect)
        })
        .await;
        // Nothing runs between the wait and this decision: the view is the same.
        assert_eq!(decision(&router, &any()), "local");
        assert!(matches!(
            router.route(&gpu()),
            Err(RouteError::NoAvailableNode { .. })
        ));

        // It answers again and refutes the suspicion before it is declared down.
        links.heal();
        until("the peer alive again", &entry, |v| {
            v.get("peer")
                .is_some_and(|m| m.status() == PeerStatus::Alive && m.state().is_some())
        })
        .await;
        assert_eq!(decision(&router, &any()), "peer");
    });
}
