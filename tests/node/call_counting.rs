//! How the route layer counts the calls it runs here: once, for exactly as long as they run, for
//! unary and streaming calls alike, with a service that counts nothing itself (as a server that
//! only adds the layer is written). The handlers here block until the test releases them, so
//! every check waits for a condition, never for a time.

use crate::support;

use std::sync::{
    Arc,
    atomic::{AtomicU32, Ordering},
};

use futures::StreamExt;
use mesh::{
    Node, WhenFull,
    route::{
        Decision, RouteRequest,
        layer::{CallTask, RouteLayer, Rule},
    },
};
use mesh_demo::{
    Replica, Served,
    echo::TickStream,
    proto::test::v1::{
        CountRequest, EchoReply, EchoRequest, LookupRequest, Tick, echo_client::EchoClient,
        echo_server,
    },
};
use support::{bounded, form, node_builder, patient};
use tokio::sync::{Notify, Semaphore};
use tonic::{Request, Response, Status, service::Routes, transport::Channel};

/// An echo service whose calls wait for a permit from the test, and which counts how many run
/// at once. It never touches the node's load tracker.
#[derive(Clone)]
struct Gated {
    gate: Arc<Semaphore>,
    running: Arc<AtomicU32>,
    most_running: Arc<AtomicU32>,
    changed: Arc<Notify>,
    /// `Echo` takes the layer's guard and keeps it here (work that outlives the call).
    kept: Arc<std::sync::Mutex<Vec<mesh::TaskGuard>>>,
}

impl Gated {
    fn new() -> Self {
        Self {
            gate: Arc::new(Semaphore::new(0)),
            running: Arc::default(),
            most_running: Arc::default(),
            changed: Arc::default(),
            kept: Arc::default(),
        }
    }

    async fn run(&self) {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_running.fetch_max(now, Ordering::SeqCst);
        self.changed.notify_waiters();
        self.gate.acquire().await.unwrap().forget();
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Waits until `check` holds, re-checking whenever a call starts or ends.
    async fn until(&self, what: &str, check: impl Fn() -> bool) {
        bounded(what, async {
            loop {
                let changed = self.changed.notified();
                if check() {
                    return;
                }
                // Conditions on the node's counters change without a notification: re-check
                // on a short timer as well.
                let _ = tokio::time::timeout(std::time::Duration::from_millis(20), changed).await;
            }
        })
        .await;
    }
}

#[tonic::async_trait]
impl echo_server::Echo for Gated {
    type CountStream = TickStream;

    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        if request.get_ref().keep_local {
            // The flag marks work that outlives the call: keep the call's count with it.
            if let Some(guard) = request
                .extensions()
                .get::<CallTask>()
                .and_then(CallTask::take)
            {
                self.kept.lock().unwrap().push(guard);
            }
        }
        self.run().await;
        Ok(Response::new(EchoReply {
            payload: request.into_inner().payload,
            served_by: String::new(),
        }))
    }

    async fn count(&self, request: Request<CountRequest>) -> Result<Response<TickStream>, Status> {
        let count = request.get_ref().count;
        let this = self.clone();
        // The stream's work happens after the response head: while it is polled.
        let ticks = futures::stream::once(async move {
            this.run().await;
            Ok(Tick {
                index: 0,
                served_by: String::new(),
                payload: Vec::new(),
                last: count == 1,
            })
        });
        Ok(Response::new(Box::pin(ticks) as TickStream))
    }

    async fn lookup(&self, _: Request<LookupRequest>) -> Result<Response<EchoReply>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

fn layer(node: &Node) -> RouteLayer {
    let spread =
        || Rule::spread(|_: EchoRequest, _| async { Ok(Decision::Route(RouteRequest::new())) });
    let stream =
        Rule::spread(|_: CountRequest, _| async { Ok(Decision::Route(RouteRequest::new())) });
    RouteLayer::new(node.router().clone())
        .rule("/mesh.test.v1.Echo/Echo", spread())
        .and_then(|layer| layer.rule("/mesh.test.v1.Echo/Count", stream))
        .unwrap()
}

struct GatedNode {
    replica: Replica<(RouteLayer, Gated)>,
}

impl GatedNode {
    async fn start(name: &str, slots: u32, seeds: &[std::net::SocketAddr]) -> Self {
        let builder = node_builder(name, seeds, patient(), slots).when_full(WhenFull::Wait);
        let replica = Replica::start(builder, "127.0.0.1:0".parse().unwrap(), None, |node| {
            let layer = layer(node);
            let service = Gated::new();
            Ok(Served {
                layer: layer.clone(),
                routes: Routes::new(echo_server::EchoServer::new(service.clone())),
                parts: (layer, service),
            })
        })
        .await
        .unwrap();
        Self { replica }
    }

    fn node(&self) -> &Node {
        self.replica.node()
    }

    fn layer(&self) -> &RouteLayer {
        &self.replica.parts().0
    }

    fn service(&self) -> &Gated {
        &self.replica.parts().1
    }

    async fn client(&self) -> EchoClient<Channel> {
        EchoClient::new(self.replica.channel().await.unwrap())
    }
}

impl support::HasNode for GatedNode {
    fn mesh_node(&self) -> &Node {
        self.node()
    }
}

fn echo(keep: bool) -> EchoRequest {
    EchoRequest {
        keep_local: keep,
        ..EchoRequest::default()
    }
}

/// The bug this guards against: the entry node held the call's placement until a unary
/// response, on top of the call's own count, so a node with N slots ran about N/2 calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_n_slots_runs_n_unary_calls_at_once() {
    const SLOTS: u32 = 4;
    const CALLS: u32 = 16;
    let entry = GatedNode::start("entry", SLOTS, &[]).await;
    let service = entry.service().clone();
    let load = entry.node().load().clone();
    let client = entry.client().await;
    let calls: Vec<_> = (0..CALLS)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move { client.echo(echo(false)).await })
        })
        .collect();

    // Every slot taken and every other call held at the router, waiting for one.
    let router = entry.node().router().clone();
    service
        .until("N calls running and the rest held", || {
            service.running.load(Ordering::SeqCst) == SLOTS
                && router.stats().held == u64::from(CALLS - SLOTS)
        })
        .await;
    assert_eq!(load.pending(), SLOTS, "each running call counts once");
    assert_eq!(entry.layer().stats().running, u64::from(SLOTS));

    service.gate.add_permits(CALLS as usize);
    for call in calls {
        call.await.unwrap().expect("the call succeeds");
    }
    assert_eq!(service.most_running.load(Ordering::SeqCst), SLOTS);
    assert_eq!(
        load.peak_pending(),
        SLOTS,
        "never counted past the calls running"
    );
    let layer = entry.layer().clone();
    service
        .until("every call's count to end", || {
            load.pending() == 0 && layer.stats().running == 0
        })
        .await;
    assert_eq!(entry.layer().stats().local, u64::from(CALLS));
}

/// A streaming call is counted while its stream runs, on the node that runs it, also when a
/// peer forwarded it; the entry that forwarded it does not count it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_stream_counts_on_the_node_that_runs_it() {
    let nodes: Vec<GatedNode> = form(2, |i, seeds| async move {
        GatedNode::start(["entry", "worker"][i], 1, &seeds).await
    })
    .await;
    let (entry, worker) = (&nodes[0], &nodes[1]);
    let _full = entry.node().load().begin_task(); // the entry has no room: calls go to the worker
    let mut client = entry.client().await;
    let stream = tokio::spawn(async move {
        let request = CountRequest {
            count: 1,
            ..CountRequest::default()
        };
        let mut ticks = client.count(request).await?.into_inner();
        let mut seen = 0;
        while let Some(tick) = ticks.next().await {
            tick?;
            seen += 1;
        }
        Ok::<_, Status>(seen)
    });
    let running = worker.service().clone();
    running
        .until("the stream to run on the worker", || {
            running.running.load(Ordering::SeqCst) == 1
        })
        .await;
    assert_eq!(worker.node().load().pending(), 1);
    assert_eq!(worker.layer().stats().running, 1);
    assert_eq!(worker.layer().stats().forwarded_in, 1);
    assert_eq!(
        entry.node().load().pending(),
        1,
        "only the entry's own task"
    );
    assert_eq!(entry.layer().stats().running, 0);

    running.gate.add_permits(1);
    assert_eq!(stream.await.unwrap().unwrap(), 1);
    let (load, layer) = (worker.node().load().clone(), worker.layer().clone());
    running
        .until("the stream's count to end", || {
            load.pending() == 0 && layer.stats().running == 0
        })
        .await;
}

/// A service that takes the call's guard keeps the call counted past its response; one that
/// leaves it there is counted until the response ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_can_keep_the_count_of_work_that_outlives_the_call() {
    let node = GatedNode::start("keeper", 4, &[]).await;
    let service = node.service().clone();
    service.gate.add_permits(2);
    let mut client = node.client().await;
    client.echo(echo(true)).await.unwrap();
    client.echo(echo(false)).await.unwrap();
    let load = node.node().load().clone();
    let layer = node.layer().clone();
    service
        .until("the call left with the layer to end", || {
            layer.stats().running == 0 && load.pending() == 1
        })
        .await;
    drop(service.kept.lock().unwrap().drain(..));
    assert_eq!(load.pending(), 0, "the kept count ends with the work");
}
