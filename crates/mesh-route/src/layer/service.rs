//! The service: calls without a rule pass through; the others are routed, forwarded as they
//! are, and relayed back.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use mesh_core::{LoadTracker, Membership, NodeId, TaskGuard};
use tokio::{sync::mpsc, time::Instant};
use tonic::{Status, body::Body, metadata::MetadataMap, transport::Channel};
use tower::{Service, ServiceExt};
use tracing::Instrument;

use super::{
    body::{MessageFramer, RelayBody},
    grpc,
    outcome::{OutcomeRecorder, TrailersHook},
    routing::Routing,
    rule::{Decision, Rule, RuleKind},
    stats::{Direction, ForwardOutcome, LayerCounters},
    task::{CallTask, CountedBody},
};
use crate::{
    error::RouteError,
    headers::{
        COUNTED_FROM, COUNTED_UNTIL, FORWARDED_BY, NOT_RELAYED, REQUEST_ID, counted_from,
        counted_until, state_version_value,
    },
    operation::OperationId,
    peer::{PeerTarget, lost_connection, never_reached, peer_lost},
    router::Route,
    select::RouteRequest,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The [`RouteLayer`](super::RouteLayer)'s service around `S` (a tonic server's routes, or any
/// service of `http::Request<tonic::body::Body>`).
#[derive(Debug, Clone)]
pub struct RouteService<S> {
    inner: S,
    routing: Routing,
}

impl<S> RouteService<S> {
    pub(crate) fn new(inner: S, routing: Routing) -> Self {
        Self { inner, routing }
    }
}

impl<S, B> Service<http::Request<Body>> for RouteService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        if let Some(check) = &self.routing.check {
            let path = request.uri().path().to_owned();
            if let Err(status) = check(&path, request.headers_mut()) {
                return Box::pin(std::future::ready(Ok(refuse(&self.routing, status))));
            }
        }
        let rule = self.routing.rules.get(request.uri().path()).cloned();
        let forwarded = request.headers().contains_key(FORWARDED_BY);
        if forwarded && rule.is_some() {
            LayerCounters::add(&self.routing.counters.local);
            LayerCounters::add(&self.routing.counters.forwarded_in);
        }
        match rule {
            // One hop only: a call a peer forwarded runs here, whatever this node thinks.
            Some(rule) if !forwarded => {
                let request_id = ensure_request_id(request.headers_mut());
                let span =
                    self.routing
                        .call_span(request.uri().path(), request_id.as_deref(), None);
                // The ready service serves this call; a fresh clone waits for the next one.
                let fresh = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, fresh);
                let routing = self.routing.clone();
                Box::pin(
                    async move {
                        let cutoff = Arc::clone(&routing.cutoff);
                        let response = Call::handle(routing, inner, rule, request).await;
                        Ok(response.map(|body| cutoff.wrap(body, false)))
                    }
                    .instrument(span),
                )
            }
            Some(rule) => {
                // Forwarded by a peer: served here, counted under that peer by how it ends.
                let headers = request.headers();
                let from = header_text(headers, FORWARDED_BY);
                let span = self.routing.call_span(
                    request.uri().path(),
                    header_text(headers, REQUEST_ID),
                    from,
                );
                let recorder = from.and_then(|from| NodeId::new(from).ok()).map(|from| {
                    OutcomeRecorder::new(
                        Arc::clone(&self.routing.counters),
                        from,
                        Direction::Inbound,
                    )
                });
                // New work is counted from now until its response ends; following an
                // operation adds none.
                let task = rule.spreads().then(|| {
                    let task = self.routing.begin_task();
                    self.routing.hand_over(task, request.extensions_mut())
                });
                let response = LoadTracker::already_counted(self.inner.call(request));
                let membership = self.routing.router.membership().clone();
                let cutoff = Arc::clone(&self.routing.cutoff);
                Box::pin(
                    async move {
                        tracing::debug!("serving a call forwarded by a peer");
                        let response = match response.await {
                            Ok(response) => {
                                // The call's task has begun: tell the caller which state
                                // version counts it.
                                let mut response = counted(
                                    response.map(Body::new),
                                    task,
                                    Some(membership.clone()),
                                );
                                response.headers_mut().insert(
                                    COUNTED_FROM,
                                    state_version_value(membership.version_counting_current_load()),
                                );
                                response
                            }
                            Err(error) => {
                                drop(task.and_then(|task| task.take()));
                                if let Some(recorder) = recorder {
                                    recorder.finish(ForwardOutcome::Broken);
                                }
                                return Err(error.into());
                            }
                        };
                        let response = match recorder {
                            Some(recorder) => recorder.observe(response),
                            None => response,
                        };
                        Ok(response.map(|body| cutoff.wrap(body, true)))
                    }
                    .instrument(span),
                )
            }
            None => {
                let forwarded = request.headers().contains_key(FORWARDED_BY);
                let response = self.inner.call(request);
                let cutoff = Arc::clone(&self.routing.cutoff);
                Box::pin(async move {
                    let response = response.await.map_err(Into::into)?;
                    Ok(response.map(|body| cutoff.wrap(Body::new(body), forwarded)))
                })
            }
        }
    }
}

/// One call with a rule, from its arrival to its last relayed frame. Holds the request, so
/// an idempotent call can be sent again.
struct Call<S> {
    routing: Routing,
    /// In a mutex only so that a call can be shared by reference across awaits (`S` need not
    /// be `Sync`); each use clones the service out.
    inner: std::sync::Mutex<S>,
    rule: Rule,
    head: http::request::Parts,
    body: Bytes,
    deadline: Option<Instant>,
}

/// Where a response comes from.
enum Upstream {
    /// The inner service, here.
    Here(http::Response<Body>),
    /// A peer that accepted the call.
    Peer(PeerTarget, http::Response<Body>),
}

/// Why sending a call to a peer failed.
enum Sent {
    /// The peer's endpoint cannot be used (invalid, or refused by the TLS policy).
    Unusable(RouteError),
    /// It never reached the peer: safe to send it elsewhere.
    Unreachable(String),
    /// The peer accepted it and the connection broke before the response head.
    Broke(Status),
}

/// How relaying one upstream ended.
enum Pumped {
    /// Its trailers went to the client.
    Finished,
    /// It failed after relaying the message that completes the call (see
    /// [`Rule::final_message`]): the client has its answer.
    FailedAfterFinal,
    /// The client went away; the upstream call is dropped (cancelled).
    ClientGone,
    /// The upstream failed before its trailers.
    Broke(Status),
}

impl<S, B> Call<S>
where
    S: Service<http::Request<Body>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    async fn handle(
        routing: Routing,
        inner: S,
        rule: Rule,
        request: http::Request<Body>,
    ) -> http::Response<Body> {
        let (head, body) = request.into_parts();
        let deadline = grpc::timeout(&head.headers).map(|timeout| Instant::now() + timeout);
        let body = match read_body(body, routing.max_request_bytes, head.uri.path()).await {
            Ok(body) => body,
            Err(status) => return refuse(&routing, status),
        };
        let call = Call {
            routing,
            inner: std::sync::Mutex::new(inner),
            rule,
            head,
            body,
            deadline,
        };
        let message = match grpc::first_message(&call.body) {
            Ok(message) => message,
            Err(reason) => {
                // Nothing to decide on (e.g. a compressed message): the inner service serves
                // it here and reports any problem in its own terms.
                tracing::debug!(path = call.head.uri.path(), reason, "serving a call here");
                let task = call.rule.spreads().then(|| call.routing.begin_task());
                return call.serve_here(task).await;
            }
        };
        match call.rule.kind.clone() {
            RuleKind::ToOwner(name) => match name(message) {
                Ok(name) => call.send_to_owner(&name).await,
                Err(status) => refuse(&call.routing, status),
            },
            RuleKind::Spread(decide) => {
                let metadata = MetadataMap::from_headers(call.head.headers.clone());
                match decide(message, metadata).await {
                    Ok(Decision::Local) => {
                        let task = call.routing.begin_task();
                        call.serve_here(Some(task)).await
                    }
                    Ok(Decision::Route(route)) => call.spread(route).await,
                    Err(status) => refuse(&call.routing, status),
                }
            }
        }
    }

    /// A call about an existing operation: to its owner, once.
    async fn send_to_owner(self, name: &str) -> http::Response<Body> {
        let operation: OperationId = match name.parse() {
            Ok(operation) => operation,
            Err(error) => return refuse(&self.routing, RouteError::from(error).into()),
        };
        let target = match self.routing.router.owner(&operation) {
            // Following an operation adds no work: not counted.
            Ok(Route::Local) => return self.serve_here(None).await,
            Ok(Route::Peer(target)) => target,
            Err(error) => return refuse(&self.routing, error.into()),
        };
        // Following an operation adds no work: the owner's load does not count it.
        match self.send(&target, false).await {
            Ok(response) => {
                LayerCounters::add(&self.routing.counters.to_owner);
                self.relay(Some(target), response, None)
            }
            Err(Sent::Unusable(error)) => refuse(&self.routing, error.into()),
            Err(Sent::Unreachable(message)) => {
                let error = RouteError::OwnerUnreachable {
                    node: target.node_id().clone(),
                    endpoint: target.endpoint().to_owned(),
                    message,
                };
                refuse(&self.routing, error.into())
            }
            Err(Sent::Broke(status)) => refuse(&self.routing, status),
        }
    }

    /// New work: wherever the router says, then relayed (and, if idempotent, re-routed when
    /// its peer dies).
    async fn spread(self, route: RouteRequest) -> http::Response<Body> {
        let mut excluded = Vec::new();
        match self.dispatch(&route, &mut excluded).await {
            Err(status) => refuse(&self.routing, status),
            Ok(Upstream::Here(response)) => response,
            Ok(Upstream::Peer(target, response)) => {
                let retry = self.rule.idempotent.then_some((route, excluded));
                self.relay(Some(target), response, retry)
            }
        }
    }

    /// Routes the call (holding it while the cluster is full, within its deadline) and makes
    /// it where it was routed, skipping peers that cannot be reached — and, for idempotent
    /// rules, peers that broke before answering.
    async fn dispatch(
        &self,
        route: &RouteRequest,
        excluded: &mut Vec<NodeId>,
    ) -> Result<Upstream, Status> {
        let router = &self.routing.router;
        let counters = &self.routing.counters;
        loop {
            let placed = router.route_when_available(route, excluded);
            let placement =
                match self.deadline {
                    Some(deadline) => tokio::time::timeout_at(deadline, placed).await.map_err(
                        |_| {
                            Status::deadline_exceeded(
                                "the call's deadline passed while it waited for a free slot in the \
                         cluster",
                            )
                        },
                    )?,
                    None => placed.await,
                }?;
            let target = match placement.route() {
                Route::Local => {
                    // The call's own task takes over the slot the placement held, before
                    // the placement lets it go: counted once, for as long as it runs.
                    let task = self.routing.begin_task();
                    drop(placement);
                    return Ok(Upstream::Here(self.serve_here(Some(task)).await));
                }
                Route::Peer(target) => target.clone(),
            };
            match self.send(&target, true).await {
                Ok(response) => {
                    LayerCounters::add(&counters.forwarded_out);
                    return Ok(Upstream::Peer(target, response));
                }
                Err(Sent::Unusable(_) | Sent::Unreachable(_)) => {
                    LayerCounters::add(&counters.unreachable);
                }
                Err(Sent::Broke(status)) if !self.rule.idempotent => return Err(status),
                Err(Sent::Broke(status)) => {
                    LayerCounters::add(&counters.rerouted);
                    tracing::info!(
                        peer = %target.node_id(),
                        error = %status.message(),
                        "the peer broke before answering an idempotent call; routing it again"
                    );
                }
            }
            excluded.push(target.node_id().clone());
        }
    }

    /// The inner service's answer, here. `task` counts the call (new work) until its
    /// response ends, unless the service takes it ([`CallTask`]).
    async fn serve_here(&self, task: Option<TaskGuard>) -> http::Response<Body> {
        LayerCounters::add(&self.routing.counters.local);
        let mut request =
            http::Request::from_parts(self.head.clone(), Body::new(Full::new(self.body.clone())));
        let task = task.map(|task| self.routing.hand_over(task, request.extensions_mut()));
        let inner = self
            .inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let response = match &task {
            Some(_) => LoadTracker::already_counted(inner.oneshot(request)).await,
            None => inner.oneshot(request).await,
        };
        match response {
            Ok(response) => counted(response.map(Body::new), task, None),
            Err(error) => {
                drop(task.and_then(|task| task.take()));
                Status::from_error(error.into()).into_http()
            }
        }
    }

    /// Sends the original request to `target`: same path, headers and body bytes, stamped as
    /// forwarded, with the deadline that is left.
    /// `placed`: the router placed the call on `target` and counts it against the peer until
    /// the peer's state does (new work); an operation's follow-up is not counted.
    async fn send(&self, target: &PeerTarget, placed: bool) -> Result<http::Response<Body>, Sent> {
        let router = &self.routing.router;
        let answered = |counted_from| {
            if placed {
                router.forward_answered(target, counted_from)
            } else {
                None
            }
        };
        let never_arrived = || {
            if placed {
                router.unrecord_forward(target);
            }
        };
        tracing::Span::current().record("peer", tracing::field::display(target.node_id()));
        let outcome = OutcomeRecorder::new(
            Arc::clone(&self.routing.counters),
            target.node_id().clone(),
            Direction::Outbound,
        );
        let channel: Channel = match router.channels().get(target) {
            Ok(channel) => channel,
            Err(error) => {
                tracing::warn!(%error, "skipping a peer with an unusable endpoint");
                never_arrived();
                outcome.finish(ForwardOutcome::Unreachable);
                return Err(Sent::Unusable(error));
            }
        };
        metrics::counter!("mesh_route_forwarded_total").increment(1);
        tracing::debug!(
            peer = %target.node_id(),
            endpoint = target.endpoint(),
            "forwarding the call"
        );
        match channel.oneshot(self.forward_request()).await {
            Ok(mut response) => {
                let stamp = counted_from(response.headers());
                response.headers_mut().remove(COUNTED_FROM);
                let answered = answered(stamp);
                // As the call ends, the peer names the first version of its state that no
                // longer counts it: the router takes it off the versions before that.
                let router = router.clone();
                let target = target.clone();
                let hook: TrailersHook = Box::new(move |trailers: &mut http::HeaderMap| {
                    let until = counted_until(trailers);
                    trailers.remove(COUNTED_UNTIL);
                    if let (Some(answered), Some(until)) = (answered, until) {
                        router.forward_ended(&target, answered, until);
                    }
                });
                Ok(outcome.observe_with(response, Some(hook)))
            }
            Err(error) if never_reached(&error) => {
                never_arrived();
                outcome.finish(ForwardOutcome::Unreachable);
                metrics::counter!("mesh_route_retries_total").increment(1);
                tracing::warn!(
                    peer = %target.node_id(),
                    endpoint = target.endpoint(),
                    %error,
                    "peer unreachable; choosing again"
                );
                Err(Sent::Unreachable(error_chain(&error)))
            }
            Err(error) => {
                let _ = answered(None);
                outcome.finish(ForwardOutcome::Broken);
                Err(Sent::Broke(lost_connection(
                    target.node_id(),
                    Status::from_error(Box::new(error)),
                )))
            }
        }
    }

    fn forward_request(&self) -> http::Request<Body> {
        let mut head = self.head.clone();
        // The peer's channel adds its own scheme and authority.
        if let Some(path) = head.uri.path_and_query() {
            head.uri = http::Uri::from(path.clone());
        }
        for hop in NOT_RELAYED {
            head.headers.remove(hop);
        }
        self.routing.router.forwarded_by().stamp(&mut head.headers);
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            head.headers
                .insert(grpc::GRPC_TIMEOUT, grpc::encode_timeout(left));
        }
        // Extensions describe this node's server connection, not the peer's.
        head.extensions = http::Extensions::new();
        http::Request::from_parts(head, Body::new(Full::new(self.body.clone())))
    }

    /// Answers with the upstream's response head at once and relays its body: the relay runs
    /// inside the response body ([`RelayBody`]), polled by the connection that sends it.
    /// `retry` (idempotent spread calls only) lets the relay route the call again when the
    /// peer dies mid-stream.
    fn relay(
        self,
        target: Option<PeerTarget>,
        response: http::Response<Body>,
        retry: Option<(RouteRequest, Vec<NodeId>)>,
    ) -> http::Response<Body> {
        if grpc::is_trailers_only(response.headers()) {
            return response;
        }
        let (head, body) = response.into_parts();
        let (tx, rx) = mpsc::channel(16);
        // The relay is part of the call: it logs in the call's span.
        let relay = self
            .relay_task(target, body, retry, tx)
            .instrument(tracing::Span::current());
        http::Response::from_parts(head, Body::new(RelayBody::new(rx, relay)))
    }

    async fn relay_task(
        self,
        mut target: Option<PeerTarget>,
        mut body: Body,
        mut retry: Option<(RouteRequest, Vec<NodeId>)>,
        tx: mpsc::Sender<http_body::Frame<Bytes>>,
    ) {
        let mut framer = MessageFramer::default();
        loop {
            let status = match self.pump(target.as_ref(), body, &mut framer, &tx).await {
                Pumped::Finished | Pumped::ClientGone => return,
                Pumped::FailedAfterFinal => {
                    let _ = tx.send(trailers(&Status::ok(""))).await;
                    return;
                }
                Pumped::Broke(status) => status,
            };
            // Whatever comes next, a torn message must not reach the client.
            framer.discard_partial();
            let (Some(dead), Some((route, excluded))) = (target.take(), retry.as_mut()) else {
                LayerCounters::add(&self.routing.counters.relays_broken);
                let _ = tx.send(trailers(&status)).await;
                return;
            };
            LayerCounters::add(&self.routing.counters.rerouted);
            tracing::info!(
                peer = %dead.node_id(),
                error = %status.message(),
                "the peer running an idempotent call failed; routing it again"
            );
            excluded.push(dead.node_id().clone());
            let next = tokio::select! {
                next = self.dispatch(route, excluded) => next,
                () = tx.closed() => return,
            };
            let response = match next {
                Ok(Upstream::Here(response)) => response,
                Ok(Upstream::Peer(peer, response)) => {
                    target = Some(peer);
                    response
                }
                Err(status) => {
                    let _ = tx.send(trailers(&status)).await;
                    return;
                }
            };
            // The client already has a response head: the new one's status, if it answered
            // at once with one, ends the stream; otherwise its messages continue it.
            if grpc::is_trailers_only(response.headers()) {
                let status = grpc::status_trailers(response.headers());
                let _ = tx.send(http_body::Frame::trailers(status)).await;
                return;
            }
            body = response.into_body();
        }
    }

    /// Relays one upstream's frames until its trailers, its failure, or the client leaving.
    /// A peer upstream also fails when the membership declares the peer down, which catches
    /// connections that hang open to a dead host.
    async fn pump(
        &self,
        target: Option<&PeerTarget>,
        mut body: Body,
        framer: &mut MessageFramer,
        tx: &mpsc::Sender<http_body::Frame<Bytes>>,
    ) -> Pumped {
        let mut departed = match target {
            Some(target) => match self.routing.router.watch_departure(target) {
                Some(watch) => Some(watch),
                None => return Pumped::Broke(peer_lost(target.node_id())),
            },
            None => None,
        };
        let mut completed = false;
        let lost = |status: Status, completed: bool| match target {
            _ if completed => Pumped::FailedAfterFinal,
            Some(target) => Pumped::Broke(lost_connection(target.node_id(), status)),
            None => Pumped::Broke(status),
        };
        loop {
            let departure = async {
                match departed.as_mut() {
                    // Only the end of the peer's life is ever signalled.
                    Some(watch) => {
                        let _ = watch.changed().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                frame = body.frame() => match frame {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => {
                            if let Some(messages) = framer.push(data) {
                                completed = completed || self.rule.completes(&messages);
                                if tx.send(http_body::Frame::data(messages)).await.is_err() {
                                    return Pumped::ClientGone;
                                }
                            }
                        }
                        Err(frame) => {
                            if let Ok(trailers) = frame.into_trailers() {
                                let _ = tx.send(http_body::Frame::trailers(trailers)).await;
                                return Pumped::Finished;
                            }
                        }
                    },
                    Some(Err(status)) => return lost(status, completed),
                    None => {
                        let status = Status::unavailable("the response ended without a grpc status");
                        return lost(status, completed);
                    }
                },
                () = departure => {
                    let node = target.map(PeerTarget::node_id);
                    let status = node.map_or_else(
                        || Status::unavailable("the call's node failed"),
                        peer_lost,
                    );
                    return lost(status, completed);
                }
                () = tx.closed() => return Pumped::ClientGone,
            }
        }
    }
}

/// `response`, ending `task` (if the call is counted) when it ends; with `stamp` (a call a
/// peer forwarded here), its trailers say from which version of this node's state it is no
/// longer counted.
fn counted(
    response: http::Response<Body>,
    task: Option<CallTask>,
    stamp: Option<Membership>,
) -> http::Response<Body> {
    match task {
        Some(task) => response.map(|body| Body::new(CountedBody::new(body, task, stamp))),
        None => response,
    }
}

/// The call's request id: the client's [`REQUEST_ID`] if it sent a usable one, otherwise a new
/// one, set on the request so the inner service and any peer it is forwarded to see it.
fn ensure_request_id(headers: &mut http::HeaderMap) -> Option<String> {
    if let Some(id) = header_text(headers, REQUEST_ID) {
        return Some(id.to_owned());
    }
    let id = uuid::Uuid::now_v7().to_string();
    let value = http::HeaderValue::from_str(&id).ok()?;
    headers.insert(REQUEST_ID, value);
    Some(id)
}

/// A header's value, if it is present and visible text.
fn header_text<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// Reads the whole request (a routed method takes one request message), up to `limit` bytes.
async fn read_body(body: Body, limit: usize, path: &str) -> Result<Bytes, Status> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            Err(Status::resource_exhausted(format!(
                "the request to {path} exceeds the route layer's limit of {limit} bytes \
                 (RouteLayer::max_request_bytes)"
            )))
        }
        Err(error) => Err(Status::from_error(error)),
    }
}

fn refuse(routing: &Routing, status: Status) -> http::Response<Body> {
    LayerCounters::add(&routing.counters.refused);
    status.into_http()
}

fn trailers(status: &Status) -> http_body::Frame<Bytes> {
    http_body::Frame::trailers(grpc::trailers_of(status))
}

/// An error and its causes, on one line.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::{NOT_RELAYED, propagated};

    #[test]
    fn a_call_keeps_its_request_id_or_gets_one() {
        let mut headers = http::HeaderMap::new();
        headers.insert(REQUEST_ID, "req-7".parse().unwrap());
        assert_eq!(ensure_request_id(&mut headers).as_deref(), Some("req-7"));
        assert_eq!(headers.get(REQUEST_ID).unwrap(), "req-7");
        let mut fresh = http::HeaderMap::new();
        let id = ensure_request_id(&mut fresh).unwrap();
        assert_eq!(fresh.get(REQUEST_ID).unwrap(), id.as_str());
        assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 7);
        // A forwarded call carries it: it is not hop-by-hop.
        assert!(!NOT_RELAYED.iter().any(|name| name == REQUEST_ID));
        let metadata = MetadataMap::from_headers(fresh);
        assert_eq!(
            propagated(&metadata).get(REQUEST_ID),
            metadata.get(REQUEST_ID)
        );
    }
}
