//! Operating a cluster as a person does at 3 a.m.: `meshctl`, `loadgen` and `mesh-node` processes,
//! the Prometheus endpoint and the logs (real processes on 127.0.0.1, ephemeral ports); the
//! gRPC health service of in-process replicas; and the advisory coordinator on simulated time.

use crate::cluster_processes;

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use cluster_processes::{
    NodeProcess, NodeSpec, bounded, examples, http_get, loadgen_all_ok, members_by_id,
    meshctl_json, poll, run, samples, text,
};
use mesh::{
    Identity, MeshEvent, Timing,
    core::Membership,
    health::{LIVENESS_SERVICE, NodeHealth},
    proto::admin::v1::{DrainRequest, mesh_admin_client::MeshAdminClient},
};
use mesh_demo::DemoNode;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// The members of `node` as `meshctl members --json` lists them, once every node in `names`
/// is alive with a state.
async fn wait_for_members(
    bin: &std::path::Path,
    node: &NodeProcess,
    names: &[&str],
) -> HashMap<String, serde_json::Value> {
    poll("every node alive with a state", move || async move {
        let members = members_by_id(&meshctl_json(bin, &node.url(), "members").await);
        let ready = names.iter().all(|name| {
            members
                .get(*name)
                .is_some_and(|m| m["status"] == "alive" && m["state"].is_object())
        });
        ready.then_some(members)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_follows_a_burst_and_a_crash_with_meshctl_metrics_and_logs() {
    let bin = &examples();
    // a forwards most of the burst: it has the fewest slots.
    let a = NodeProcess::start(
        NodeSpec::local("a")
            .arg("--max-concurrency", 2)
            .arg("--metrics-addr", "127.0.0.1:0")
            .env("RUST_LOG", "info,mesh_route=debug,mesh_core=debug"),
    )
    .await;
    let b = NodeProcess::start(
        NodeSpec::local("b")
            .arg("--max-concurrency", 4)
            .arg("--join", &a.gossip)
            .env("RUST_LOG", "info,mesh_route=debug"),
    )
    .await;
    let mut c = NodeProcess::start(
        NodeSpec::local("c")
            .arg("--max-concurrency", 6)
            .arg("--join", &a.gossip),
    )
    .await;

    // All three, with their load, and one coordinator all agree on.
    let members = wait_for_members(bin, &a, &["a", "b", "c"]).await;
    assert_eq!(members.len(), 3, "{members:?}");
    for (name, slots) in [("a", 2), ("b", 4), ("c", 6)] {
        let member = &members[name];
        assert_eq!(member["state"]["max_concurrency"], slots, "{member}");
        assert_eq!(member["state"]["pending"], 0, "{member}");
        assert!(member["status_age_ms"].as_u64().is_some(), "{member}");
        assert_eq!(member["local"], name == "a", "{member}");
    }
    let mut coordinators = Vec::new();
    for node in [&a, &b, &c] {
        let listed = poll("the coordinator to settle", move || async move {
            let answer = meshctl_json(bin, &node.url(), "members").await;
            let flagged: Vec<String> = answer["members"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| m["coordinator"] == true)
                .map(|m| m["node_id"].as_str().unwrap().to_owned())
                .collect();
            (answer["members"].as_array().unwrap().len() == 3
                && flagged == [answer["coordinator"].as_str().unwrap()])
            .then(|| flagged[0].clone())
        })
        .await;
        coordinators.push(listed);
    }
    assert!(
        coordinators.iter().all(|c| *c == coordinators[0]),
        "every node names the same coordinator: {coordinators:?}"
    );

    // A burst through a: loadgen says who ran what; the stats of a and b count the same.
    let (report, ran) = loadgen_all_ok(
        bin,
        &[
            "--target",
            &a.url(),
            "--actions",
            "60",
            "--min-ms",
            "30",
            "--max-ms",
            "120",
        ],
    )
    .await;
    let (on_a, on_b, on_c) = (ran["a"], ran["b"], ran["c"]);
    assert_eq!(on_a + on_b + on_c, 60, "{report}");
    assert!(on_b > 0 && on_c > 0, "a forwards work: {report}");

    let stats = meshctl_json(bin, &a.url(), "stats").await;
    let peers: HashMap<&str, &serde_json::Value> = stats["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["node_id"].as_str().unwrap(), p))
        .collect();
    assert_eq!(peers["b"]["forwards_out"]["ok"], on_b, "{stats}");
    assert_eq!(peers["c"]["forwards_out"]["ok"], on_c, "{stats}");
    for peer in ["b", "c"] {
        for outcome in ["error", "broken", "cancelled", "unreachable"] {
            assert_eq!(peers[peer]["forwards_out"][outcome], 0, "{stats}");
        }
        assert!(peers[peer]["state_age_ms"].as_u64().is_some(), "{stats}");
        assert_eq!(peers[peer]["status"], "alive");
    }
    let routing = &stats["routing"];
    assert_eq!(routing["decisions"]["peer"], on_b + on_c, "{stats}");
    assert_eq!(routing["decisions"]["local"], on_a, "{stats}");
    assert_eq!(routing["forwarded_out"], on_b + on_c, "{stats}");
    let gossip = &stats["gossip"];
    assert!(
        gossip["datagrams_received"].as_u64().unwrap() > 0,
        "{stats}"
    );
    assert!(gossip["bytes_sent"].as_u64().unwrap() > 0, "{stats}");
    let stats_b = meshctl_json(bin, &b.url(), "stats").await;
    let from_a = stats_b["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node_id"] == "a")
        .unwrap();
    assert_eq!(from_a["forwards_in"]["ok"], on_b, "{stats_b}");
    assert_eq!(stats_b["routing"]["forwarded_in"], on_b, "{stats_b}");

    // One grep follows a forwarded call: b logs the request id a forwarded it with.
    let b_log = &b.stderr;
    let served = poll("b to log a forwarded call", move || async move {
        b_log.find(&["serving a call forwarded by a peer"])
    })
    .await;
    let request_id = served
        .split("request_id=")
        .nth(1)
        .and_then(|rest| rest.split([' ', '}', ':']).next())
        .unwrap_or_else(|| panic!("no request id in {served:?}"))
        .to_owned();
    assert!(
        served.contains("node=b") && served.contains("from=a"),
        "{served}"
    );
    let forwarded = a
        .stderr
        .find(&[&format!("request_id={request_id}"), "forwarding the call"])
        .unwrap_or_else(|| {
            panic!(
                "a never logged request {request_id}:\n{:#?}",
                a.stderr.all()
            )
        });
    assert!(
        forwarded.contains("node=a") && forwarded.contains("peer=b"),
        "{forwarded}"
    );

    // meshctl drains b and puts it back; a sees both.
    for (command, draining) in [("drain", true), ("undrain", false)] {
        let answer = meshctl_json(bin, &b.url(), command).await;
        assert_eq!(answer["draining"], draining, "{answer}");
        let a_url = &a.url();
        poll(&format!("a to see b {command}ed"), move || async move {
            let members = members_by_id(&meshctl_json(bin, a_url, "members").await);
            (members["b"]["state"]["draining"] == draining).then_some(())
        })
        .await;
    }

    // A datagram that is not gossip is counted as dropped, with its reason.
    let garbage = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    garbage.send_to(b"not a mesh datagram", &a.gossip).unwrap();

    // c crashes: a lists it as failed, with how long ago.
    c.kill9().await;
    let a_url = &a.url();
    let failed = poll("a to list c as failed", move || async move {
        let members = members_by_id(&meshctl_json(bin, a_url, "members").await);
        members
            .get("c")
            .filter(|m| m["status"] == "failed")
            .cloned()
    })
    .await;
    let age = failed["status_age_ms"]
        .as_u64()
        .expect("a failed member has an age");
    assert!(age < 60_000, "{failed}");
    assert!(
        failed["state"].is_null() && failed["coordinator"] == false,
        "{failed}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later = members_by_id(&meshctl_json(bin, &a.url(), "members").await);
    assert!(
        later["c"]["status_age_ms"].as_u64().unwrap() > age,
        "the age grows: {age} then {}",
        later["c"]["status_age_ms"]
    );
    // The table says the same, aligned.
    let table = text(
        &run(bin, "meshctl", &["--addr", &a.url(), "members"])
            .await
            .stdout,
    );
    let row = table
        .lines()
        .find(|line| line.starts_with("c "))
        .unwrap_or_else(|| panic!("no row for c:\n{table}"));
    assert!(row.contains("failed"), "{table}");
    assert!(
        table.contains("2 live members, 1 failed or left"),
        "{table}"
    );
    // The membership task logs in a span naming its node.
    let a_log = &a.stderr;
    let event = poll("a to log c's failure", move || async move {
        a_log.find(&["mesh event", "Failed(c@"])
    })
    .await;
    assert!(event.contains("mesh{node=a}"), "{event}");

    // It comes back: a flap.
    let c2 = NodeProcess::start(
        NodeSpec::local("c")
            .arg("--max-concurrency", 6)
            .arg("--join", &a.gossip),
    )
    .await;
    wait_for_members(bin, &a, &["a", "b", "c"]).await;

    // The metrics endpoint serves the named series, counted from real traffic.
    let metrics = a.metrics.clone().expect("a serves metrics");
    let exposition = http_get(&metrics, "/metrics").await;
    let series = samples(&exposition);
    let value = |name: &str| {
        *series
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in:\n{exposition}"))
    };
    for counter in [
        "mesh_datagrams_received_total",
        "mesh_datagrams_sent_total",
        "mesh_bytes_received_total",
        "mesh_bytes_sent_total",
        "mesh_suspicions_total",
        "mesh_member_flaps_total",
    ] {
        assert!(value(counter) > 0.0, "{counter} in:\n{exposition}");
    }
    assert_eq!(
        value(r#"mesh_route_decisions_total{outcome="peer"}"#),
        (on_b + on_c) as f64
    );
    assert_eq!(
        value(r#"mesh_route_decisions_total{outcome="local"}"#),
        on_a as f64
    );
    assert_eq!(
        value(r#"mesh_route_forwards_total{peer="b",direction="out",outcome="ok"}"#),
        on_b as f64
    );
    assert!(
        series
            .iter()
            .any(|(name, v)| name.starts_with("mesh_datagrams_dropped_total{reason=") && *v > 0.0),
        "a dropped datagram by reason in:\n{exposition}"
    );
    let metrics = &metrics;
    let members_gauges = poll("the member gauges to catch up", move || async move {
        let series = samples(&http_get(metrics, "/metrics").await);
        let alive = series.get(r#"mesh_members{status="alive"}"#).copied();
        (alive == Some(3.0)).then_some(series)
    })
    .await;
    assert!(members_gauges.contains_key("mesh_state_age_max_seconds"));
    assert!(members_gauges.contains_key("mesh_is_coordinator"));
    drop(c2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_and_meshctl_fail_fast_naming_the_address_instead_of_hanging() {
    let bin = &examples();
    // As mesh-node's own doc comment starts it: the documented 16 slots.
    let fine = NodeProcess::start(NodeSpec::local("fine")).await;
    let members = wait_for_members(bin, &fine, &["fine"]).await;
    assert_eq!(members["fine"]["state"]["max_concurrency"], 16);
    let output = run(
        bin,
        "loadgen",
        &[
            "--target",
            &fine.url(),
            "--actions",
            "4",
            "--min-ms",
            "1300",
            "--max-ms",
            "1300",
        ],
    )
    .await;
    let report = text(&output.stdout);
    assert!(output.status.success(), "{}", text(&output.stderr));
    // Progress every second, then the summary.
    assert!(
        report.contains("0/4 done (0 ok, 0 failed), 4 in flight"),
        "{report}"
    );
    assert!(report.contains("4 ok, 0 failed"), "{report}");

    // Nobody has the platform.
    let output = run(
        bin,
        "loadgen",
        &[
            "--target",
            &fine.url(),
            "--actions",
            "5",
            "--platform",
            "os=plan9",
        ],
    )
    .await;
    let error = text(&output.stderr);
    assert!(!output.status.success());
    assert!(
        error.contains(&fine.url())
            && error.contains("no slot")
            && error.contains("lacks os=plan9"),
        "{error}"
    );

    // Every node has max_concurrency 0.
    let empty = NodeProcess::start(NodeSpec::local("empty").arg("--max-concurrency", 0)).await;
    wait_for_members(bin, &empty, &["empty"]).await;
    let output = run(
        bin,
        "loadgen",
        &["--target", &empty.url(), "--actions", "5"],
    )
    .await;
    let error = text(&output.stderr);
    assert!(!output.status.success());
    assert!(
        error.contains(&empty.url()) && error.contains("max_concurrency 0"),
        "{error}"
    );

    // Nothing listens there.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let output = run(bin, "loadgen", &["--target", &closed, "--actions", "5"]).await;
    let error = text(&output.stderr);
    assert!(!output.status.success());
    assert!(
        error.contains(&closed) && error.contains("cannot reach"),
        "{error}"
    );
    for command in ["members", "stats", "watch", "drain", "undrain"] {
        let output = run(bin, "meshctl", &["--addr", &closed, command]).await;
        let error = text(&output.stderr);
        assert!(!output.status.success(), "meshctl {command}");
        assert!(
            error.contains(&closed) && error.contains("cannot reach"),
            "{error}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_example_runs_one_reapi_replica_per_process() {
    use bazel_remote_apis::build::bazel::remote::execution::v2::{
        GetCapabilitiesRequest, capabilities_client::CapabilitiesClient,
    };
    let bin = &examples();
    let data = tempfile::tempdir().unwrap();
    let reapi = |name: &str| {
        NodeSpec::local(name)
            .arg("--api", "reapi")
            .arg("--data-dir", data.path().join(name).display())
    };
    let r0 = NodeProcess::start(reapi("r0")).await;
    let r1 = NodeProcess::start(reapi("r1").arg("--join", &r0.gossip)).await;
    // One cluster, seen through the admin API every replica serves.
    let members = wait_for_members(bin, &r1, &["r0", "r1"]).await;
    // No max_concurrency given: one action per CPU, gossiped as the replica's capacity.
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(members["r0"]["state"]["max_concurrency"], cpus);
    for replica in [&r0, &r1] {
        let mut client = CapabilitiesClient::connect(replica.url()).await.unwrap();
        let capabilities = client
            .get_capabilities(GetCapabilitiesRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(capabilities.execution_capabilities.unwrap().exec_enabled);
        poll_health(
            &health_client(replica.grpc.parse().unwrap()).await,
            "",
            ServingStatus::Serving,
        )
        .await;
        assert!(data.path().join(&replica.name).join("cas").is_dir());
    }
}

async fn health_of(client: &mut HealthClient<tonic::transport::Channel>, service: &str) -> i32 {
    client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

async fn health_client(addr: SocketAddr) -> HealthClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
}

fn local_node(name: &str) -> mesh::NodeBuilder {
    mesh::Node::builder()
        .node_id(name)
        .unwrap()
        .gossip_bind("127.0.0.1:0".parse().unwrap())
        .timing(Timing::local())
}

async fn poll_health(
    health: &HealthClient<tonic::transport::Channel>,
    service: &str,
    want: ServingStatus,
) {
    let what = format!("service {service:?} to be {want:?}");
    poll(&what, move || {
        let mut health = health.clone();
        async move { (health_of(&mut health, service).await == want as i32).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_while_joining() {
    let lone = local_node("j1").start().await.unwrap();
    // A grace longer than the test: joining means not serving until a peer answers.
    let health = NodeHealth::builder(lone.membership().clone())
        .join_grace(Duration::from_secs(3600))
        .start()
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut health = health_client(addr).await;
    assert_eq!(
        health_of(&mut health, "").await,
        ServingStatus::NotServing as i32
    );
    assert_eq!(
        health_of(&mut health, LIVENESS_SERVICE).await,
        ServingStatus::Serving as i32
    );

    let peer = local_node("j2")
        .seeds([lone.gossip_addr()])
        .start()
        .await
        .unwrap();
    poll_health(&health, "", ServingStatus::Serving).await;
    peer.shutdown().await;
    lone.shutdown().await;
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_flips_to_not_serving_on_drain_and_back_on_undrain() {
    let first = DemoNode::start(local_node("h1"), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let second = DemoNode::start(
        local_node("h2").seeds([first.node().gossip_addr()]),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let mut health = health_client(second.grpc_addr()).await;
    poll_health(&health, "", ServingStatus::Serving).await;

    // Drained through the admin API: not serving, yet alive; undrained: serving again.
    let mut admin = MeshAdminClient::connect(format!("http://{}", second.grpc_addr()))
        .await
        .unwrap();
    admin.drain(DrainRequest { draining: true }).await.unwrap();
    poll_health(&health, "", ServingStatus::NotServing).await;
    assert_eq!(
        health_of(&mut health, LIVENESS_SERVICE).await,
        ServingStatus::Serving as i32
    );
    admin.drain(DrainRequest { draining: false }).await.unwrap();
    poll_health(&health, "", ServingStatus::Serving).await;

    // Leaving: not serving before the server stops.
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    let leaving = tokio::spawn(second.shutdown_gracefully());
    let next = watch
        .message()
        .await
        .unwrap()
        .expect("a status before the stream ends");
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    // The watch ends with the node's departure: it does not hold the shutdown up.
    while let Some(status) = watch.message().await.unwrap() {
        assert_eq!(status.status, ServingStatus::NotServing as i32);
    }
    bounded("a graceful shutdown", leaving)
        .await
        .unwrap()
        .unwrap();
    first.shutdown_gracefully().await.unwrap();
}

/// What one simulated node saw: its coordinator now, and the coordinators its events named.
#[derive(Default, Clone)]
struct Seen {
    coordinator: Option<String>,
    announced: Vec<Option<String>>,
}

#[test]
fn every_node_agrees_on_the_coordinator_after_the_coordinator_fails() {
    const GOSSIP: u16 = 7946;
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(120))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(5))
        .rng_seed(7)
        .build();
    let seen: Arc<Mutex<HashMap<&'static str, Seen>>> = Arc::default();
    // Generations fix who is oldest: n1, then n2.
    let nodes = [("n1", 10), ("n2", 20), ("n3", 30), ("n4", 40)];
    for (name, generation) in nodes {
        let seen = Arc::clone(&seen);
        sim.host(name, move || {
            let seen = Arc::clone(&seen);
            async move {
                let udp =
                    turmoil::net::UdpSocket::bind((IpAddr::V4(Ipv4Addr::UNSPECIFIED), GOSSIP))
                        .await?;
                let mut builder = Membership::builder(mesh::NodeId::new(name)?)
                    .advertise_addr(SocketAddr::new(turmoil::lookup(name), GOSSIP))
                    .timing(Timing::local())
                    .generation(generation)
                    .rng_seed(generation);
                if name != "n1" {
                    builder = builder.seeds([SocketAddr::new(turmoil::lookup("n1"), GOSSIP)]);
                }
                let membership = builder.start_with_transport(udp).await?;
                let mut events = membership.events();
                loop {
                    let coordinator = membership
                        .view()
                        .coordinator()
                        .map(|m| m.node_id().to_string());
                    seen.lock().unwrap().entry(name).or_default().coordinator = coordinator;
                    match tokio::time::timeout(Duration::from_millis(50), events.recv()).await {
                        Ok(Ok(MeshEvent::CoordinatorChanged { current, .. })) => {
                            let current = current
                                .as_ref()
                                .map(Identity::node_id)
                                .map(|n| n.to_string());
                            seen.lock()
                                .unwrap()
                                .entry(name)
                                .or_default()
                                .announced
                                .push(current);
                        }
                        Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => return Ok(()),
                        _ => {}
                    }
                }
            }
        });
    }
    // The observer checks; the test body crashes n1 when it asks.
    let crash = Arc::new(Mutex::new((false, false))); // (asked, done)
    let observer_crash = Arc::clone(&crash);
    let observer_seen = Arc::clone(&seen);
    sim.client("observer", async move {
        let agree = |names: &[&str], on: &str| {
            let seen = observer_seen.lock().unwrap();
            names
                .iter()
                .all(|n| seen.get(n).and_then(|s| s.coordinator.as_deref()) == Some(on))
        };
        let announced = |name: &str| observer_seen.lock().unwrap()[name].announced.clone();
        while !agree(&["n1", "n2", "n3", "n4"], "n1") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Every node but n1 itself was told when n1 became its coordinator.
        for name in ["n2", "n3", "n4"] {
            assert_eq!(
                announced(name).last(),
                Some(&Some("n1".to_owned())),
                "{name}"
            );
        }

        observer_crash.lock().unwrap().0 = true;
        while !observer_crash.lock().unwrap().1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let survivors = ["n2", "n3", "n4"];
        while !agree(&survivors, "n2") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Each survivor was told, n2 included.
        for name in survivors {
            assert_eq!(
                announced(name).last(),
                Some(&Some("n2".to_owned())),
                "{name}"
            );
        }
        // Agreement holds: nobody moves on.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(agree(&survivors, "n2"));
        for name in survivors {
            assert_eq!(
                announced(name).last(),
                Some(&Some("n2".to_owned())),
                "{name}"
            );
        }
        Ok(())
    });
    loop {
        let asked = {
            let mut crash = crash.lock().unwrap();
            let asked = crash.0 && !crash.1;
            crash.1 |= asked;
            asked
        };
        if asked {
            sim.crash("n1");
        }
        if sim.step().unwrap() {
            break;
        }
    }
}
