//! Three real greeter processes form a cluster: a burst of calls sent to one replica is served
//! by all three, a countdown streams through, and SIGTERM makes a replica leave gracefully.

use std::{collections::BTreeMap, future::Future, net::SocketAddr, process::Stdio, time::Duration};

use mesh::proto::admin::v1::{ListMembersRequest, mesh_admin_client::MeshAdminClient};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

/// The greeter's generated client.
mod proto {
    #![allow(
        missing_docs,
        unreachable_pub,
        dead_code,
        clippy::all,
        clippy::pedantic
    )]
    tonic::include_proto!("greeter.v1");
}

use proto::{CountdownRequest, HelloRequest, greeter_client::GreeterClient};

/// Upper bound for any wait on a loaded machine; not an expectation.
const BOUND: Duration = Duration::from_secs(60);

/// `fut`, or a panic naming `what` after [`BOUND`].
async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {BOUND:?} waiting for {what}"))
}

/// One greeter process and the addresses it printed. Killed when dropped (`kill_on_drop`), so
/// a failing test leaves no process behind.
struct Replica {
    /// Its node id.
    node_id: String,
    /// The process.
    child: Child,
    /// Its gRPC address.
    grpc: SocketAddr,
    /// Its gossip address.
    gossip: SocketAddr,
}

impl Replica {
    /// Starts `greeter --node-id <node_id>` on free ports, joining through `seed`, and reads
    /// the addresses it prints.
    async fn start(node_id: &str, seed: Option<SocketAddr>) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_greeter"));
        command
            .args(["--node-id", node_id, "--max-concurrency", "4"])
            .args(["--grpc", "127.0.0.1:0", "--gossip", "127.0.0.1:0"])
            .args(
                seed.iter()
                    .flat_map(|seed| ["--seed".to_owned(), seed.to_string()]),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "warn");
        }
        let mut child = command.spawn().expect("the greeter binary starts");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
        let (grpc, gossip) = bounded(&format!("{node_id} to print its addresses"), async {
            let (mut grpc, mut gossip) = (None, None);
            while grpc.is_none() || gossip.is_none() {
                let line = lines
                    .next_line()
                    .await
                    .expect("stdout is readable")
                    .unwrap_or_else(|| panic!("{node_id} exited before printing its addresses"));
                let addr = |prefix| line.strip_prefix(prefix).map(|a| a.parse().expect(prefix));
                grpc = grpc.or_else(|| addr("grpc listening on "));
                gossip = gossip.or_else(|| addr("gossip listening on "));
            }
            (grpc.unwrap(), gossip.unwrap())
        })
        .await;
        // Keep reading, so the process never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            node_id: node_id.to_owned(),
            child,
            grpc,
            gossip,
        }
    }

    /// The URL clients connect to.
    fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }
}

/// The members `replica` lists, by node id: `(status, has gossiped state)`.
async fn members(replica: &Replica) -> Option<BTreeMap<String, (String, bool)>> {
    let mut admin = MeshAdminClient::connect(replica.url()).await.ok()?;
    let members = admin.list_members(ListMembersRequest {}).await.ok()?;
    Some(
        members
            .into_inner()
            .members
            .into_iter()
            .map(|m| (m.node_id, (m.status, m.state.is_some())))
            .collect(),
    )
}

/// Polls `check` every 100 ms until it holds, within [`BOUND`].
async fn wait_until<F: Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    bounded(what, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_to_one_replica_spread_over_the_cluster() {
    let a = Replica::start("greeter-a", None).await;
    let b = Replica::start("greeter-b", Some(a.gossip)).await;
    let mut c = Replica::start("greeter-c", Some(a.gossip)).await;
    let ids: Vec<String> = [&a, &b, &c].iter().map(|r| r.node_id.clone()).collect();

    // Formed: the first replica sees all three alive, each with its state (load, endpoint).
    wait_until(
        "the first replica to see all three alive with state",
        || async {
            members(&a).await.is_some_and(|members| {
                ids.iter().all(|id| {
                    members
                        .get(id)
                        .is_some_and(|(status, state)| status == "alive" && *state)
                })
            })
        },
    )
    .await;

    // 24 calls of 300 ms at once, all to the first replica, which runs 4 at a time.
    let client = GreeterClient::connect(a.url()).await.expect("connects");
    let calls = (0..24).map(|i| {
        let mut client = client.clone();
        async move {
            let request = HelloRequest {
                name: format!("caller {i}"),
                hold_ms: Some(300),
            };
            let reply = client.say_hello(request).await.expect("SayHello succeeds");
            reply.into_inner()
        }
    });
    let replies = bounded("the burst", futures::future::join_all(calls)).await;
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    for reply in &replies {
        assert!(reply.message.starts_with("Hello, caller "), "{reply:?}");
        *served.entry(reply.served_by.clone()).or_default() += 1;
    }
    println!("served by: {served:?}");
    assert_eq!(
        served.keys().cloned().collect::<Vec<_>>(),
        ids,
        "every replica serves part of a burst sent to the first: {served:?}"
    );

    // A server stream through the first replica: every tick, in order, from one replica.
    let mut stream = client
        .clone()
        .countdown(CountdownRequest {
            from: 5,
            interval_ms: 20,
        })
        .await
        .expect("Countdown starts")
        .into_inner();
    let mut ticks = Vec::new();
    while let Some(tick) = bounded("a tick", stream.message()).await.expect("a tick") {
        ticks.push(tick);
    }
    let values: Vec<u32> = ticks.iter().map(|tick| tick.value).collect();
    assert_eq!(values, [5, 4, 3, 2, 1, 0]);
    assert!(ids.contains(&ticks[0].served_by), "{ticks:?}");
    assert!(
        ticks
            .iter()
            .all(|tick| tick.served_by == ticks[0].served_by),
        "{ticks:?}"
    );

    // SIGTERM: the replica leaves (its peers see "left", not "failed") and exits cleanly.
    let pid = c.child.id().expect("running").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(killed.success(), "kill -TERM {pid}");
    let exit = bounded("the replica to exit after SIGTERM", c.child.wait())
        .await
        .expect("waits");
    assert!(exit.success(), "{} exited with {exit}", c.node_id);
    wait_until("the first replica to see the third one as left", || async {
        members(&a)
            .await
            .and_then(|members| members.get(&c.node_id).cloned())
            .is_some_and(|(status, _)| status == "left")
    })
    .await;
}

/// The README shows the greeter whole: its code there is this crate's code, byte for byte.
#[test]
fn the_readme_shows_the_greeter_as_it_is() {
    let crate_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(crate_dir.join("../../README.md")).unwrap();
    for file in ["src/main.rs", "build.rs", "proto/greeter/v1/greeter.proto"] {
        let text = std::fs::read_to_string(crate_dir.join(file)).unwrap();
        assert!(
            readme.contains(&text),
            "README.md's embedding section no longer shows examples/greeter/{file} as it is"
        );
    }
}
