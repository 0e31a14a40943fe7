//! `Dns` discovery against a real DNS server running in the test process.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
    time::Duration,
};

use hickory_server::proto::rr::{
    Name, RData,
    rdata::{A, AAAA, SRV, TXT},
};
use mesh_discovery::testing::TestDns;
use mesh_discovery::{Discover, DiscoveryError, Dns, DnsBuilder, LastKnownGood, RefreshOutcome};

const ZONE: &str = "cluster.test.";
const SERVICE: &str = "mesh.default.svc.cluster.test.";

/// Every test is bounded: a hang is a failure, not a stuck CI job.
const BOUND: Duration = Duration::from_secs(10);

fn a(ip: [u8; 4]) -> RData {
    RData::A(A(Ipv4Addr::from(ip)))
}

fn aaaa(ip: &str) -> RData {
    RData::AAAA(AAAA(Ipv6Addr::from_str(ip).unwrap()))
}

fn srv(port: u16, target: &str) -> RData {
    RData::SRV(SRV::new(0, 50, port, Name::from_str(target).unwrap()))
}

fn addrs(list: &[&str]) -> Vec<SocketAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

fn builder(server: &TestDns, name: &str) -> DnsBuilder {
    Dns::builder(name)
        .nameserver(server.addr())
        .query_timeout(Duration::from_millis(500))
}

async fn discover(dns: &Dns) -> Result<Vec<SocketAddr>, DiscoveryError> {
    tokio::time::timeout(BOUND, dns.discover())
        .await
        .expect("discover finishes in time")
}

#[tokio::test]
async fn a_records_of_a_headless_service_resolve_to_every_pod_with_the_configured_port() {
    let server = TestDns::start(ZONE).await;
    for ip in [[10, 0, 0, 3], [10, 0, 0, 1], [10, 0, 0, 2]] {
        server.add(SERVICE, a(ip)).await;
    }
    let dns = builder(&server, SERVICE).port(7946).build().unwrap();

    assert_eq!(
        discover(&dns).await.unwrap(),
        addrs(&["10.0.0.1:7946", "10.0.0.2:7946", "10.0.0.3:7946"]),
        "every pod, sorted, with the configured port"
    );
}

#[tokio::test]
async fn aaaa_records_resolve_alone_and_alongside_a_records() {
    let server = TestDns::start(ZONE).await;
    let v6_only = "v6.default.svc.cluster.test.";
    server.add(v6_only, aaaa("fd00::2")).await;
    server.add(v6_only, aaaa("fd00::1")).await;
    let dual = "dual.default.svc.cluster.test.";
    server.add(dual, a([10, 0, 0, 1])).await;
    server.add(dual, aaaa("fd00::1")).await;

    let dns_v6 = builder(&server, v6_only).port(7000).build().unwrap();
    assert_eq!(
        discover(&dns_v6).await.unwrap(),
        addrs(&["[fd00::1]:7000", "[fd00::2]:7000"])
    );
    let dns_dual = builder(&server, dual).port(7000).build().unwrap();
    assert_eq!(
        discover(&dns_dual).await.unwrap(),
        addrs(&["10.0.0.1:7000", "[fd00::1]:7000"])
    );
}

#[tokio::test]
async fn srv_records_give_each_target_its_own_port() {
    let server = TestDns::start(ZONE).await;
    let srv_name = format!("_gossip._udp.{SERVICE}");
    // StatefulSet pods: the SRV target is the pod's own name. hickory's in-memory zone sends
    // glue for the first target only, so both the additional section and the follow-up
    // lookups of targets are exercised.
    let pods = [
        (
            "mesh-0.mesh.default.svc.cluster.test.",
            7946,
            a([10, 0, 0, 1]),
        ),
        (
            "mesh-1.mesh.default.svc.cluster.test.",
            7947,
            a([10, 0, 0, 2]),
        ),
        (
            "mesh-2.mesh.default.svc.cluster.test.",
            7948,
            aaaa("fd00::3"),
        ),
    ];
    for (target, port, ip) in pods {
        server.add(&srv_name, srv(port, target)).await;
        server.add(target, ip).await;
    }
    // The port configured for A records plays no part in SRV mode.
    server.add(SERVICE, a([10, 9, 9, 9])).await;

    let dns = builder(&server, SERVICE).srv().build().unwrap();
    assert_eq!(dns.srv_name(), Some(srv_name.as_str()));
    assert_eq!(
        discover(&dns).await.unwrap(),
        addrs(&["10.0.0.1:7946", "10.0.0.2:7947", "[fd00::3]:7948"])
    );
}

#[tokio::test]
async fn srv_name_can_be_overridden_and_unresolvable_targets_are_skipped() {
    let server = TestDns::start(ZONE).await;
    let srv_name = "_serf._tcp.custom.cluster.test.";
    server.add(srv_name, srv(8301, "live.cluster.test.")).await;
    server.add(srv_name, srv(8302, "gone.cluster.test.")).await;
    server.add("live.cluster.test.", a([10, 0, 1, 1])).await;

    let dns = builder(&server, SERVICE)
        .srv_name(srv_name)
        .build()
        .unwrap();
    assert_eq!(discover(&dns).await.unwrap(), addrs(&["10.0.1.1:8301"]));

    // With no target left, the error names the targets and the server.
    server.remove("live.cluster.test.", a([10, 0, 1, 1])).await;
    let error = discover(&dns).await.unwrap_err();
    match &error {
        DiscoveryError::NothingResolved {
            names, server: s, ..
        } => {
            assert_eq!(names, &["live.cluster.test.", "gone.cluster.test."]);
            assert_eq!(*s, Some(server.addr()));
        }
        other => panic!("expected NothingResolved, got {other:?}"),
    }
    let message = error.to_string();
    assert!(message.contains("gone.cluster.test."), "{message}");
    assert!(message.contains(&server.addr().to_string()), "{message}");
}

#[tokio::test]
async fn records_added_or_removed_later_show_on_the_next_discover() {
    let server = TestDns::start(ZONE).await;
    server.add(SERVICE, a([10, 0, 0, 1])).await;
    let dns = builder(&server, SERVICE).build().unwrap();
    assert_eq!(discover(&dns).await.unwrap(), addrs(&["10.0.0.1:7946"]));

    // A new pod is scheduled; the records carry a 300 s TTL, so only a resolver without a
    // cache sees it now.
    server.add(SERVICE, a([10, 0, 0, 2])).await;
    assert_eq!(
        discover(&dns).await.unwrap(),
        addrs(&["10.0.0.1:7946", "10.0.0.2:7946"])
    );

    server.remove(SERVICE, a([10, 0, 0, 1])).await;
    assert_eq!(discover(&dns).await.unwrap(), addrs(&["10.0.0.2:7946"]));
}

#[tokio::test]
async fn a_service_created_after_an_nxdomain_is_found_on_the_next_discover() {
    let server = TestDns::start(ZONE).await;
    let dns = builder(&server, SERVICE).build().unwrap();
    assert!(matches!(
        discover(&dns).await,
        Err(DiscoveryError::NoRecords {
            name_exists: false,
            ..
        })
    ));

    server.add(SERVICE, a([10, 0, 0, 1])).await;
    assert_eq!(
        discover(&dns).await.unwrap(),
        addrs(&["10.0.0.1:7946"]),
        "the negative answer was not cached"
    );
}

#[tokio::test]
async fn a_name_without_records_gives_an_error_naming_the_name_and_the_server() {
    let server = TestDns::start(ZONE).await;
    let missing = "nothing.default.svc.cluster.test.";
    let dns = builder(&server, missing).build().unwrap();
    let error = discover(&dns).await.unwrap_err();
    assert!(
        matches!(
            &error,
            DiscoveryError::NoRecords { name, record_types: "A/AAAA", server: Some(s), name_exists: false }
                if name == missing && *s == server.addr()
        ),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        format!(
            "no A/AAAA records for {missing:?} via {}: the name does not exist (nxdomain)",
            server.addr()
        )
    );

    // The name exists (it has a TXT record) but has no addresses: a service with no endpoints.
    server
        .add(missing, RData::TXT(TXT::new(vec!["x".into()])))
        .await;
    assert!(matches!(
        discover(&dns).await,
        Err(DiscoveryError::NoRecords {
            name_exists: true,
            ..
        })
    ));

    // SRV mode reports the SRV name.
    let dns = builder(&server, SERVICE).srv().build().unwrap();
    let error = discover(&dns).await.unwrap_err();
    assert!(
        matches!(&error, DiscoveryError::NoRecords { name, record_types: "SRV", .. } if name == &format!("_gossip._udp.{SERVICE}")),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_service_too_big_for_udp_is_read_over_tcp() {
    let server = TestDns::start(ZONE).await;
    // 200 A records are about 3 KiB, more than an EDNS UDP answer carries.
    let mut expected = Vec::new();
    for i in 0..200u8 {
        server.add(SERVICE, a([10, 1, 0, i])).await;
        expected.push(SocketAddr::from(([10, 1, 0, i], 7946)));
    }
    let dns = builder(&server, SERVICE).build().unwrap();
    assert_eq!(discover(&dns).await.unwrap(), expected);
}

#[tokio::test]
async fn a_nameserver_that_goes_away_fails_discovery_but_the_last_good_answer_is_kept() {
    let server = TestDns::start(ZONE).await;
    let server_addr = server.addr();
    server.add(SERVICE, a([10, 0, 0, 1])).await;
    server.add(SERVICE, a([10, 0, 0, 2])).await;
    let discovery = LastKnownGood::new(
        Dns::builder(SERVICE)
            .nameserver(server_addr)
            .query_timeout(Duration::from_millis(200))
            .retries(0)
            .build()
            .unwrap(),
    );
    let bounded = async || {
        tokio::time::timeout(BOUND, discovery.refresh())
            .await
            .expect("refresh finishes in time")
    };

    let good = bounded().await;
    assert!(good.is_fresh(), "{:?}", good.outcome);
    assert_eq!(
        good.addrs.to_vec(),
        addrs(&["10.0.0.1:7946", "10.0.0.2:7946"])
    );

    server.stop().await;

    let error = discover(discovery.source()).await.unwrap_err();
    assert!(
        matches!(&error, DiscoveryError::Timeout { name, server: Some(s), .. } if name == SERVICE && *s == server_addr),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains(SERVICE), "{message}");
    assert!(message.contains(&server_addr.to_string()), "{message}");

    let failed = bounded().await;
    assert_eq!(failed.addrs, good.addrs, "the last good answer is kept");
    match &failed.outcome {
        RefreshOutcome::Failed(DiscoveryError::Timeout {
            name,
            server: Some(s),
            ..
        }) => {
            assert_eq!(name, SERVICE);
            assert_eq!(*s, server_addr);
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
}
