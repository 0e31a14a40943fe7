//! What a route layer and every service it wraps share: the router, the rules per method, the
//! request size limit, the check every call passes, the counters and the cut-off switch.
//!
//! The layer ([`RouteLayer`](super::RouteLayer)) builds it and hands a clone to each service
//! it makes, as a tower layer hands its configuration to its service; the service routes each
//! call by it. Everything in it is shared (`Arc`) or small, so a clone is cheap.

use std::{collections::HashMap, fmt, sync::Arc};

use mesh_core::TaskGuard;

use super::{
    cutoff::Cutoff,
    rule::Rule,
    stats::LayerCounters,
    task::{CallTask, Running},
};
use crate::router::Router;

/// A check every call passes before anything else (see
/// [`RouteLayer::check_calls`](super::RouteLayer::check_calls)).
pub(crate) type CheckFn =
    Arc<dyn Fn(&str, &mut http::HeaderMap) -> Result<(), tonic::Status> + Send + Sync>;

/// The router, the rules and the live state a route layer and its services share.
#[derive(Clone)]
pub(crate) struct Routing {
    pub(crate) router: Router,
    pub(crate) rules: Arc<HashMap<String, Rule>>,
    pub(crate) max_request_bytes: usize,
    pub(crate) counters: Arc<LayerCounters>,
    pub(crate) check: Option<CheckFn>,
    pub(crate) cutoff: Arc<Cutoff>,
}

impl Routing {
    /// No rules yet, the default limit, no check.
    pub(crate) fn new(router: Router, max_request_bytes: usize) -> Self {
        Self {
            router,
            rules: Arc::default(),
            max_request_bytes,
            counters: Arc::default(),
            check: None,
            cutoff: Arc::default(),
        }
    }

    /// Counts one call run here as a pending task of this node.
    pub(crate) fn begin_task(&self) -> TaskGuard {
        self.router.membership().load().begin_task()
    }

    /// Hands a counted call's guard to the inner service through the request's extensions
    /// (see [`CallTask`]); the layer ends it with the response unless the service takes it.
    pub(crate) fn hand_over(&self, task: TaskGuard, extensions: &mut http::Extensions) -> CallTask {
        let task = CallTask::new(task, Running::start(&self.counters));
        extensions.insert(task.clone());
        task
    }

    /// The span a call with a rule runs in: this node, the method, the request id, and the
    /// peer it came `from` (a forwarded call) or, once chosen, the `peer` it went to.
    pub(crate) fn call_span(
        &self,
        path: &str,
        request_id: Option<&str>,
        from: Option<&str>,
    ) -> tracing::Span {
        let span = tracing::info_span!(
            "call",
            node = %self.router.membership().node_id(),
            path = %path,
            request_id = tracing::field::Empty,
            from = tracing::field::Empty,
            peer = tracing::field::Empty,
        );
        // Plain text, not quoted: `request_id=0199…` is what an operator greps for.
        if let Some(id) = request_id {
            span.record("request_id", tracing::field::display(id));
        }
        if let Some(from) = from {
            span.record("from", tracing::field::display(from));
        }
        span
    }

    /// Writes the fields worth showing (the check only as set or not) under `name`.
    pub(crate) fn debug_as(&self, name: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct(name)
            .field("router", &self.router)
            .field("rules", &self.rules)
            .field("max_request_bytes", &self.max_request_bytes)
            .field("counters", &self.counters)
            .field("check", &CheckDebug(&self.check))
            .finish()
    }
}

impl fmt::Debug for Routing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.debug_as("Routing", f)
    }
}

/// Shows whether a check is set, not the check.
struct CheckDebug<'a>(&'a Option<CheckFn>);

impl fmt::Debug for CheckDebug<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "Some(..)" } else { "None" })
    }
}
