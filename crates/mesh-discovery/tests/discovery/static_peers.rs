//! `Static` discovery through the operating system's resolver.

use std::{net::SocketAddr, time::Duration};

use mesh_discovery::{Discover, DiscoveryError, Static};

/// Every test is bounded: a hang is a failure, not a stuck CI job.
const BOUND: Duration = Duration::from_secs(10);

async fn discover(peers: &Static) -> Result<Vec<SocketAddr>, DiscoveryError> {
    tokio::time::timeout(BOUND, peers.discover())
        .await
        .expect("discover finishes in time")
}

#[tokio::test]
async fn one_unresolvable_host_does_not_hide_the_others() {
    let peers = Static::new(["nonexistent.invalid:1", "localhost:1234", "10.0.0.9:7946"])
        .unwrap()
        .lookup_timeout(Duration::from_secs(3));

    let addrs = discover(&peers).await.unwrap();
    let (local, rest) = addrs.split_at(addrs.len() - 1);
    assert!(!local.is_empty(), "localhost resolved: {addrs:?}");
    assert!(
        local
            .iter()
            .all(|a| a.ip().is_loopback() && a.port() == 1234),
        "{addrs:?}"
    );
    assert_eq!(
        rest,
        ["10.0.0.9:7946".parse().unwrap()],
        "list order is kept"
    );
}

#[tokio::test]
async fn when_nothing_resolves_the_error_names_every_host() {
    let peers = Static::new(["nonexistent.invalid:1", "also-missing.invalid:2"])
        .unwrap()
        .lookup_timeout(Duration::from_secs(3));

    let error = discover(&peers).await.unwrap_err();
    let DiscoveryError::NothingResolved { names, source, .. } = &error else {
        panic!("expected NothingResolved, got {error:?}");
    };
    assert_eq!(names, &["nonexistent.invalid:1", "also-missing.invalid:2"]);
    assert!(
        source.to_string().contains("nonexistent.invalid"),
        "{source}"
    );
    let message = error.to_string();
    assert!(
        message.contains("nonexistent.invalid:1") && message.contains("also-missing.invalid:2"),
        "{message}"
    );
}

#[test]
fn validation_errors_name_the_value_and_the_rule() {
    let cases = [
        ("node-1", "missing port: expected host:port"),
        ("node-1:99999", "port must be a number from 1 to 65535"),
        (":7946", "empty host: expected host:port"),
        (
            "fd00::1:7946",
            "an ipv6 address must be in brackets, as in [::1]:7946",
        ),
    ];
    for (value, rule) in cases {
        let error = Static::new(["ok:1", value]).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("invalid peer address {value:?}: {rule}")
        );
    }
}

#[tokio::test]
async fn ipv6_literals_in_brackets_need_no_lookup() {
    let peers = Static::new(["[::1]:7946", "127.0.0.1:7946"]).unwrap();
    assert_eq!(
        discover(&peers).await.unwrap(),
        [
            "[::1]:7946".parse::<SocketAddr>().unwrap(),
            "127.0.0.1:7946".parse().unwrap()
        ]
    );
}
