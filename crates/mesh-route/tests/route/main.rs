//! mesh-route's tests, one binary with a module per concern (the workspace's convention):
//! `filters` (what the router never routes to: draining, stale and suspect peers, on a live
//! membership) and `operation_names` (every client-supplied operation name parsed by the
//! documented rule, never a panic).
#![allow(missing_docs, unreachable_pub)]

mod filters;
mod operation_names;
