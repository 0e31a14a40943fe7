//! The route layer around a service it has never seen (`mesh.test.v1.Echo`, whose rules are
//! declared here alone), on real gRPC servers on 127.0.0.1: byte-for-byte forwarding of unary
//! and server-streaming calls, local decisions, one hop only, owner routing, relays cut by a
//! broken connection or by the membership, re-routing of idempotent calls, deadlines, and bad
//! input.

use crate::support;

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use futures::StreamExt;
use mesh::{
    Node, NodeId, OperationId, WhenFull,
    route::{
        COUNTED_FROM, COUNTED_UNTIL, Decision, FORWARDED_BY, RouteRequest,
        layer::{RouteLayer, Rule},
    },
};
use mesh_demo::{
    Replica, Served,
    echo::EchoService,
    proto::test::v1::{
        CountRequest, EchoReply, EchoRequest, LookupRequest, Tick, echo_client::EchoClient,
    },
};
use prost::Message;
use support::{HasNode, bounded, converge, form, node_builder, patient};
use tonic::{
    Code, Request, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    service::Routes,
    transport::Channel,
};

/// How the test's rules treat `Count`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Count {
    Idempotent,
    Once,
}

/// The rules a server author would write for the echo service.
fn echo_layer(node: &Node, count: Count) -> RouteLayer {
    let echo = Rule::spread(|request: EchoRequest, _| async move {
        if request.keep_local {
            return Ok(Decision::Local);
        }
        let tags = request.platform.into_iter().collect();
        Ok(Decision::Route(
            RouteRequest::new().with_required_tags(tags),
        ))
    });
    let mut count_rule = Rule::spread(|request: CountRequest, _| async move {
        let tags = request.platform.into_iter().collect();
        Ok(Decision::Route(
            RouteRequest::new().with_required_tags(tags),
        ))
    });
    if count == Count::Idempotent {
        count_rule = count_rule
            .idempotent()
            .final_message(|tick: &Tick| tick.last);
    }
    let lookup = Rule::to_owner(|request: &LookupRequest| request.name.clone());
    RouteLayer::new(node.router().clone())
        .max_request_bytes(64 * 1024)
        .rule("/mesh.test.v1.Echo/Echo", echo)
        .and_then(|layer| layer.rule("/mesh.test.v1.Echo/Count", count_rule))
        .and_then(|layer| layer.rule("/mesh.test.v1.Echo/Lookup", lookup))
        .unwrap()
}

struct EchoNode {
    replica: Replica<RouteLayer>,
}

impl EchoNode {
    async fn start(name: &str, slots: u32, seed: Option<&EchoNode>, count: Count) -> Self {
        Self::start_with(name, slots, seed, count, WhenFull::RunLocally).await
    }

    async fn start_with(
        name: &str,
        slots: u32,
        seed: Option<&EchoNode>,
        count: Count,
        when_full: WhenFull,
    ) -> Self {
        let seeds: Vec<_> = seed.map(|s| s.node().gossip_addr()).into_iter().collect();
        Self::start_seeded(name, slots, &seeds, count, when_full).await
    }

    async fn start_seeded(
        name: &str,
        slots: u32,
        seeds: &[std::net::SocketAddr],
        count: Count,
        when_full: WhenFull,
    ) -> Self {
        let builder = node_builder(name, seeds, patient(), slots).when_full(when_full);
        let replica = Replica::start(builder, "127.0.0.1:0".parse().unwrap(), None, move |node| {
            let layer = echo_layer(node, count);
            let service = EchoService::new(node.node_id().clone());
            Ok(Served {
                layer: layer.clone(),
                routes: Routes::new(service.into_server()),
                parts: layer,
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
        self.replica.parts()
    }

    async fn channel(&self) -> Channel {
        self.replica.channel().await.unwrap()
    }

    async fn client(&self) -> EchoClient<Channel> {
        EchoClient::new(self.channel().await)
    }
}

impl HasNode for EchoNode {
    fn mesh_node(&self) -> &Node {
        self.node()
    }
}

async fn echo_cluster(specs: &[(&str, u32)], count: Count) -> Vec<EchoNode> {
    form(specs.len(), |i, seeds| {
        let (name, slots) = specs[i];
        async move {
            EchoNode::start_seeded(name, slots, &seeds, count, WhenFull::RunLocally).await
        }
    })
    .await
}

/// A client codec that sends and receives message bytes untouched, to compare them.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

async fn raw_unary(channel: Channel, path: &'static str, message: Bytes) -> Result<Bytes, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static(path);
    grpc.unary(Request::new(message), path, RawCodec)
        .await
        .map(|response| response.into_inner())
}

async fn raw_stream(
    channel: Channel,
    path: &'static str,
    message: Bytes,
) -> Result<Vec<Bytes>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static(path);
    let mut stream = grpc
        .server_streaming(Request::new(message), path, RawCodec)
        .await?
        .into_inner();
    let mut messages = Vec::new();
    while let Some(message) = stream.next().await {
        messages.push(message?);
    }
    Ok(messages)
}

/// A message with a field no schema here knows (tag 99): it must survive the hop untouched.
fn with_unknown_field(message: &impl Message) -> Bytes {
    let mut bytes = message.encode_to_vec();
    prost::encoding::bytes::encode(99, &b"opaque to everyone".to_vec(), &mut bytes);
    Bytes::from(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_and_streaming_calls_of_an_unseen_service_are_forwarded_byte_for_byte() {
    let nodes = echo_cluster(&[("entry", 1), ("worker", 4)], Count::Once).await;
    let _busy = nodes[0].node().load().begin_task(); // every call leaves the entry

    let echo = with_unknown_field(&EchoRequest {
        payload: (0..=255u8).cycle().take(10_000).collect(),
        ..EchoRequest::default()
    });
    let path = "/mesh.test.v1.Echo/Echo";
    let direct = raw_unary(nodes[1].channel().await, path, echo.clone())
        .await
        .unwrap();
    let forwarded = raw_unary(nodes[0].channel().await, path, echo)
        .await
        .unwrap();
    assert_eq!(
        forwarded, direct,
        "the relayed reply is the worker's, byte for byte"
    );
    assert_eq!(EchoReply::decode(forwarded).unwrap().served_by, "worker");

    let count = with_unknown_field(&CountRequest {
        count: 20,
        payload: Bytes::from_static(&[0, 1, 2, 255]).to_vec(),
        ..CountRequest::default()
    });
    let path = "/mesh.test.v1.Echo/Count";
    let direct = raw_stream(nodes[1].channel().await, path, count.clone())
        .await
        .unwrap();
    let forwarded = raw_stream(nodes[0].channel().await, path, count)
        .await
        .unwrap();
    assert_eq!(forwarded.len(), 20);
    assert_eq!(
        forwarded, direct,
        "every streamed message arrives untouched"
    );
    assert_eq!(nodes[0].layer().stats().forwarded_out, 2);
    assert_eq!(nodes[1].layer().stats().forwarded_in, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_travels_and_the_forwarded_call_is_marked_once() {
    let nodes = echo_cluster(&[("entry", 1), ("worker", 4)], Count::Once).await;
    let _busy = nodes[0].node().load().begin_task();
    let mut request = Request::new(EchoRequest::default());
    request
        .metadata_mut()
        .insert("x-request-id", "req-7".parse().unwrap());
    request.set_timeout(Duration::from_secs(20));
    let response = nodes[0].client().await.echo(request).await.unwrap();
    assert_eq!(response.get_ref().served_by, "worker");
    assert_eq!(
        response.metadata().get("x-seen-forwarded-by").unwrap(),
        "entry"
    );
    // The deadline that is left travels with the call: never later than the caller's.
    let seen = response
        .metadata()
        .get("x-seen-grpc-timeout")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let (amount, unit) = seen.split_at(seen.len() - 1);
    let amount: u64 = amount.parse().unwrap();
    let left = match unit {
        "u" => Duration::from_micros(amount),
        "m" => Duration::from_millis(amount),
        "n" => Duration::from_nanos(amount),
        "S" => Duration::from_secs(amount),
        other => panic!("unexpected unit {other} in {seen}"),
    };
    assert!(left <= Duration::from_secs(20), "{seen}");
    assert!(left > Duration::ZERO, "{seen}");
    // The worker named the state versions that count the call, from its answer and until
    // its trailers; the entry node read both and passed neither on.
    assert!(response.metadata().get(COUNTED_FROM).is_none());
    assert!(response.metadata().get(COUNTED_UNTIL).is_none());

    // A call that says it was already forwarded runs where it lands, full or not.
    let mut request = Request::new(EchoRequest::default());
    request
        .metadata_mut()
        .insert(FORWARDED_BY, "worker".parse().unwrap());
    // What the entry node had published before the call: the version that counts the call
    // comes after it. (Read before, not after: by then the entry node may already have
    // published the counting version, which is what made this test flaky under load.)
    let before = nodes[0].node().view().local().state().unwrap().clone();
    let response = nodes[0].client().await.echo(request).await.unwrap();
    assert_eq!(response.get_ref().served_by, "entry");
    assert_eq!(nodes[0].layer().stats().forwarded_out, 1);
    // Serving a peer's call, the entry node names a version of its own state after every one
    // it had published: `{generation}:{version}`.
    let counted_from = response
        .metadata()
        .get(COUNTED_FROM)
        .unwrap()
        .to_str()
        .unwrap();
    let (generation, version) = counted_from.split_once(':').unwrap();
    assert_eq!(generation.parse::<u64>().unwrap(), before.generation);
    assert!(
        version.parse::<u64>().unwrap() > before.version,
        "{counted_from} after {}",
        before.version
    );
    // And as the call ended, the first version that no longer counts it: not before the one
    // that counts it.
    let counted_until = response
        .metadata()
        .get(COUNTED_UNTIL)
        .expect("the trailers name the version that no longer counts the call")
        .to_str()
        .unwrap();
    let (until_generation, until) = counted_until.split_once(':').unwrap();
    assert_eq!(until_generation.parse::<u64>().unwrap(), before.generation);
    assert!(
        until.parse::<u64>().unwrap() >= version.parse::<u64>().unwrap(),
        "{counted_until} before {counted_from}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_can_keep_a_call_here() {
    let nodes = echo_cluster(&[("entry", 1), ("worker", 4)], Count::Once).await;
    let _busy = nodes[0].node().load().begin_task();
    let request = EchoRequest {
        keep_local: true,
        ..EchoRequest::default()
    };
    let reply = nodes[0].client().await.echo(request).await.unwrap();
    assert_eq!(reply.get_ref().served_by, "entry");
    assert_eq!(
        reply.metadata().get("x-seen-forwarded-by").unwrap(),
        "",
        "never forwarded"
    );
    assert_eq!(nodes[0].layer().stats().forwarded_out, 0);
    assert_eq!(nodes[0].layer().stats().local, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn following_an_operation_does_not_count_against_its_owner() {
    let nodes = echo_cluster(&[("entry", 1), ("worker", 1)], Count::Once).await;
    let _busy = nodes[0].node().load().begin_task();
    let name = OperationId::new(NodeId::new("worker").unwrap()).to_string();
    for _ in 0..3 {
        let reply = nodes[0]
            .client()
            .await
            .lookup(LookupRequest { name: name.clone() })
            .await
            .unwrap();
        assert_eq!(reply.get_ref().served_by, "worker");
    }
    // The lookups added no work: the worker's one slot is free, so new work goes there at
    // once instead of waiting (the entry node is full) as if the lookups were running on it.
    let mut request = Request::new(EchoRequest::default());
    request.set_timeout(Duration::from_secs(10));
    let reply = nodes[0].client().await.echo(request).await.unwrap();
    assert_eq!(reply.get_ref().served_by, "worker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_about_an_operation_go_to_its_owner() {
    let nodes = echo_cluster(&[("a", 4), ("b", 4)], Count::Once).await;
    let name = format!(
        "main/operations/{}",
        OperationId::new(NodeId::new("b").unwrap())
    );
    let reply = nodes[0]
        .client()
        .await
        .lookup(LookupRequest { name: name.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.served_by, "b");
    assert_eq!(reply.payload, name.as_bytes());
    assert_eq!(nodes[0].layer().stats().to_owner, 1);

    let gone = format!("{}", OperationId::new(NodeId::new("gone").unwrap()));
    let status = nodes[0]
        .client()
        .await
        .lookup(LookupRequest { name: gone })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("owner gone is not a member"));

    let status = nodes[0]
        .client()
        .await
        .lookup(LookupRequest {
            name: "b:not-a-uuid".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("expected \"{node_id}:{uuid}\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_with_a_status_that_names_the_problem() {
    let nodes = echo_cluster(&[("a", 4)], Count::Once).await;
    // Not an EchoRequest: field 2 (the platform map) with a varint wire type.
    let garbage = Bytes::from_static(&[0x10, 0x01, 0xff]);
    let status = raw_unary(nodes[0].channel().await, "/mesh.test.v1.Echo/Echo", garbage)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("could not be decoded as")
            && status.message().contains("EchoRequest"),
        "{}",
        status.message()
    );

    let huge = EchoRequest {
        payload: vec![7; 100 * 1024],
        ..EchoRequest::default()
    };
    let status = nodes[0].client().await.echo(huge).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("limit of 65536 bytes"),
        "{}",
        status.message()
    );

    let impossible = EchoRequest {
        platform: [("os".to_owned(), "plan9".to_owned())].into(),
        ..EchoRequest::default()
    };
    let status = nodes[0].client().await.echo(impossible).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(nodes[0].layer().stats().refused, 3);
}

/// Reads ticks until `n` have arrived.
async fn take_ticks(stream: &mut tonic::Streaming<Tick>, n: usize) -> Vec<Tick> {
    let mut ticks = Vec::new();
    while ticks.len() < n {
        ticks.push(stream.next().await.unwrap().unwrap());
    }
    ticks
}

fn slow_count(count: u32) -> CountRequest {
    CountRequest {
        count,
        interval_ms: 50,
        ..CountRequest::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_is_not_idempotent_ends_unavailable_when_its_peer_is_killed() {
    let mut nodes = echo_cluster(&[("entry", 1), ("doomed", 4)], Count::Once).await;
    let _busy = nodes[0].node().load().begin_task();
    let mut stream = nodes[0]
        .client()
        .await
        .count(slow_count(1_000))
        .await
        .unwrap()
        .into_inner();
    let first = take_ticks(&mut stream, 2).await;
    assert_eq!(first[0].served_by, "doomed");

    nodes.pop().unwrap().replica.kill().await;
    let status = bounded("the relay to end", async {
        loop {
            match stream.next().await {
                Some(Ok(tick)) => assert_eq!(tick.served_by, "doomed"),
                Some(Err(status)) => return status,
                None => panic!("the stream ended without a status"),
            }
        }
    })
    .await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("doomed"), "{}", status.message());
    assert_eq!(nodes[0].layer().stats().rerouted, 0);
    assert_eq!(nodes[0].layer().stats().relays_broken, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_is_cut_by_the_membership_when_the_connection_stays_open() {
    // The peer's gRPC server keeps streaming, but the peer has left the mesh's view (its
    // membership stopped without a word, as a host cut off by a half-open connection would):
    // the relay must not wait on a connection that will never break.
    let nodes = echo_cluster(&[("entry", 1), ("silent", 4)], Count::Once).await;
    let _busy = nodes[0].node().load().begin_task();
    let mut stream = nodes[0]
        .client()
        .await
        .count(slow_count(10_000))
        .await
        .unwrap()
        .into_inner();
    take_ticks(&mut stream, 2).await;

    nodes[1].node().shutdown().await;
    let status = bounded("the relay to be cut", async {
        loop {
            match stream.next().await {
                Some(Ok(_)) => {}
                Some(Err(status)) => return status,
                None => panic!("the stream ended without a status"),
            }
        }
    })
    .await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status
            .message()
            .contains("node silent failed while relaying"),
        "cut by the failure detector, not by the connection: {}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_stream_whose_peer_dies_continues_from_another_node() {
    let mut nodes = echo_cluster(
        &[("entry", 1), ("a-doomed", 4), ("b-survivor", 4)],
        Count::Idempotent,
    )
    .await;
    // 5 s of ticks: the doomed node is killed long before its stream could end, even on a
    // loaded machine.
    const TICKS: u32 = 100;
    let _busy = nodes[0].node().load().begin_task();
    // 3/4 busy: the least-loaded strategy prefers the idle doomed node, but the survivor has
    // a free slot for the call when the doomed node is gone.
    let _survivor_busy: Vec<_> = (0..3)
        .map(|_| nodes[2].node().load().begin_task())
        .collect();
    bounded(
        "the entry to see the survivor's load",
        nodes[0].node().membership().wait_until(|v| {
            v.get("b-survivor")
                .and_then(|m| m.state())
                .is_some_and(|s| s.pending == 3)
        }),
    )
    .await;
    let mut stream = nodes[0]
        .client()
        .await
        .count(slow_count(TICKS))
        .await
        .unwrap()
        .into_inner();
    let before = take_ticks(&mut stream, 3).await;
    assert!(before.iter().all(|t| t.served_by == "a-doomed"));

    let doomed = nodes.remove(1);
    doomed.replica.kill().await;
    let mut after = Vec::new();
    bounded("the stream to complete elsewhere", async {
        while let Some(tick) = stream.next().await {
            after.push(tick.unwrap());
        }
    })
    .await;
    let last = after.last().unwrap();
    assert_eq!(last.served_by, "b-survivor");
    assert_eq!(
        last.index,
        TICKS - 1,
        "the survivor ran the whole call again"
    );
    let survivor: Vec<u32> = after
        .iter()
        .filter(|t| t.served_by == "b-survivor")
        .map(|t| t.index)
        .collect();
    assert_eq!(
        survivor,
        (0..TICKS).collect::<Vec<_>>(),
        "no tick lost or torn"
    );
    assert_eq!(nodes[0].layer().stats().rerouted, 1);
    assert_eq!(nodes[0].layer().stats().relays_broken, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_final_message_was_relayed_is_not_run_again_when_its_peer_dies() {
    let mut nodes = echo_cluster(
        &[("entry", 1), ("doomed", 4), ("other", 4)],
        Count::Idempotent,
    )
    .await;
    let _busy = nodes[0].node().load().begin_task();
    let request = CountRequest {
        count: 3,
        linger_ms: 60_000, // the last tick is sent, the trailers never are
        ..CountRequest::default()
    };
    let mut stream = nodes[0]
        .client()
        .await
        .count(request)
        .await
        .unwrap()
        .into_inner();
    let ticks = take_ticks(&mut stream, 3).await;
    assert!(ticks[2].last);
    let served_by = ticks[2].served_by.clone();
    let index = nodes
        .iter()
        .position(|n| n.node().node_id().as_str() == served_by)
        .unwrap();
    nodes.remove(index).replica.kill().await;

    let end = bounded("the stream to end", stream.next()).await;
    assert!(
        end.is_none(),
        "the call ended with OK, without running again: {end:?}"
    );
    assert_eq!(nodes[0].layer().stats().rerouted, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_call_ends_at_its_deadline_and_never_runs() {
    let entry = EchoNode::start_with("entry", 1, None, Count::Once, WhenFull::Wait).await;
    let worker = EchoNode::start("worker", 1, Some(&entry), Count::Once).await;
    let nodes = vec![entry, worker];
    converge(&nodes).await;
    let _entry_busy = nodes[0].node().load().begin_task();
    let _worker_busy = nodes[1].node().load().begin_task();
    bounded(
        "the entry to see the worker full",
        nodes[0].node().membership().wait_until(|v| {
            v.get("worker")
                .and_then(|m| m.state())
                .is_some_and(|s| s.pending == 1)
        }),
    )
    .await;

    let mut request = Request::new(EchoRequest::default());
    request.set_timeout(Duration::from_millis(300));
    let status = bounded(
        "the held call to end",
        nodes[0].client().await.echo(request),
    )
    .await
    .unwrap_err();
    // The layer says DEADLINE_EXCEEDED; tonic's server, which enforces the same deadline
    // around every service, says CANCELLED if its timer fires first.
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    assert_eq!(nodes[0].layer().stats().forwarded_out, 0);
    assert_eq!(nodes[0].layer().stats().local, 0);

    // The layer ends it by itself: called directly, with no tonic server (whose own deadline
    // would hide a layer that held the call forever) and an inner service that must not run.
    let layered = tower::Layer::layer(
        nodes[0].layer(),
        tower::service_fn(|_: http::Request<tonic::body::Body>| async {
            panic!("a held call ran after its deadline");
            #[allow(unreachable_code)]
            Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
        }),
    );
    let message = EchoRequest::default().encode_to_vec();
    let mut frame = vec![0];
    frame.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&message);
    let request = http::Request::post("/mesh.test.v1.Echo/Echo")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "300m")
        .body(tonic::body::Body::new(http_body_util::Full::new(
            Bytes::from(frame),
        )))
        .unwrap();
    let response = bounded(
        "the layer to end the held call",
        tower::ServiceExt::oneshot(layered, request),
    )
    .await
    .unwrap();
    let status = Status::from_header_map(response.headers()).expect("a trailers-only status");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(nodes[0].layer().stats().forwarded_out, 0);
    assert_eq!(nodes[0].layer().stats().local, 0);
}
