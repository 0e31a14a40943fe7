//! The layer: a tiny clone of the rules and the router ([`Routing`]), wrapped around a
//! service.

use std::{collections::BTreeMap, sync::Arc};

use mesh_core::NodeId;
use tower::Layer;

use super::{
    routing::Routing,
    rule::Rule,
    service::RouteService,
    stats::{LayerStats, PeerForwards},
};
use crate::router::Router;

/// Requests larger than this are refused by default (tonic's default limit for a decoded
/// message is the same 4 MiB).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// A tower [`Layer`] that routes the calls of a tonic server through the mesh; see the
/// [module docs](super).
///
/// ```
/// # #[derive(Clone, PartialEq, prost::Message)]
/// # struct ExecuteRequest { #[prost(string, tag = "1")] os: String }
/// # #[derive(Clone, PartialEq, prost::Message)]
/// # struct WaitExecutionRequest { #[prost(string, tag = "1")] name: String }
/// use mesh_route::{Decision, RouteRequest, Router, layer::{RouteLayer, Rule}};
///
/// # fn demo(router: Router) -> Result<(), mesh_route::layer::InvalidPath> {
/// let layer = RouteLayer::new(router)
///     .rule("/example.v1.Execution/Execute", Rule::spread(|request: ExecuteRequest, _| async move {
///         Ok(Decision::Route(RouteRequest::new().require_tag("os", request.os)))
///     }).idempotent())?
///     .rule("/example.v1.Execution/WaitExecution",
///           Rule::to_owner(|request: &WaitExecutionRequest| request.name.clone()))?;
/// // tonic::transport::Server::builder().layer(layer).add_service(...)
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RouteLayer {
    routing: Routing,
}

/// A gRPC method path that is not of the form `/{package.Service}/{Method}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid grpc method path {path:?}: expected \"/{{package.Service}}/{{Method}}\", e.g. \
     \"/build.bazel.remote.execution.v2.Execution/Execute\""
)]
pub struct InvalidPath {
    /// The path given.
    pub path: String,
}

impl RouteLayer {
    /// A layer with no rules yet: every call goes to the inner service.
    pub fn new(router: Router) -> Self {
        Self {
            routing: Routing::new(router, DEFAULT_MAX_REQUEST_BYTES),
        }
    }

    /// Checks every call — with a rule or not — before the layer does anything else with it:
    /// `check` gets the method path and the request headers (it may remove a header, e.g. a
    /// client's credential once verified, so it never travels to a peer), and a call it
    /// refuses is answered at once with its status, never routed or forwarded. This is where a
    /// server authenticates and authorizes its clients.
    pub fn check_calls(
        mut self,
        check: impl Fn(&str, &mut http::HeaderMap) -> Result<(), tonic::Status> + Send + Sync + 'static,
    ) -> Self {
        self.routing.check = Some(Arc::new(check));
        self
    }

    /// Routes the calls of the method at `path` (`/{package.Service}/{Method}`) by `rule`.
    pub fn rule(mut self, path: &str, rule: Rule) -> Result<Self, InvalidPath> {
        check_path(path)?;
        Arc::make_mut(&mut self.routing.rules).insert(path.to_owned(), rule);
        Ok(self)
    }

    /// The largest request body a routed call may have (default
    /// [`DEFAULT_MAX_REQUEST_BYTES`]); larger ones are refused with `RESOURCE_EXHAUSTED`. The
    /// layer holds the request until the call completes, so an idempotent call can be sent
    /// again.
    pub fn max_request_bytes(mut self, limit: usize) -> Self {
        self.routing.max_request_bytes = limit;
        self
    }

    /// Ends every response this layer (and each of its clones) still streams, now and from now
    /// on: for a server that must stop before its calls are done (a drain whose grace period
    /// ran out, see `mesh::drain`). A call a peer forwarded here ends with a reset stream, so
    /// that peer routes it again if its rule is idempotent, as if this node had died; a
    /// client's own call ends with `UNAVAILABLE`, which gRPC clients retry.
    pub fn cut_running_calls(&self) {
        self.routing.cutoff.cut();
    }

    /// The router the layer routes with.
    pub fn router(&self) -> &Router {
        &self.routing.router
    }

    /// What the layer has done so far.
    pub fn stats(&self) -> LayerStats {
        self.routing.counters.snapshot()
    }

    /// The calls exchanged with each peer so far, by direction and by how they ended (see
    /// [`ForwardOutcome`](super::ForwardOutcome)); also exported as the
    /// `mesh_route_forwards_total{peer, direction, outcome}` counter.
    pub fn peer_stats(&self) -> BTreeMap<NodeId, PeerForwards> {
        self.routing.counters.peers.snapshot()
    }
}

fn check_path(path: &str) -> Result<(), InvalidPath> {
    let valid = path
        .strip_prefix('/')
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(service, method)| {
            !service.is_empty() && !method.is_empty() && !method.contains('/')
        });
    if valid {
        Ok(())
    } else {
        Err(InvalidPath {
            path: path.to_owned(),
        })
    }
}

impl std::fmt::Debug for RouteLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.routing.debug_as("RouteLayer", f)
    }
}

impl<S> Layer<S> for RouteLayer {
    type Service = RouteService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RouteService::new(inner, self.routing.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_name_a_service_and_a_method() {
        for bad in [
            "",
            "/",
            "Execute",
            "/pkg.Service",
            "/pkg.Service/",
            "//Execute",
            "/pkg.Service/Execute/more",
        ] {
            let error = check_path(bad).unwrap_err();
            assert_eq!(error.path, bad);
            assert!(error.to_string().contains("expected"), "{error}");
        }
        check_path("/build.bazel.remote.execution.v2.Execution/Execute").unwrap();
    }
}
