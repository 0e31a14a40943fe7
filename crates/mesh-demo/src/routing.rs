//! The two rules that make the demo service a cluster.

use mesh::{
    Router,
    route::{
        Decision, RouteRequest,
        layer::{InvalidPath, RouteLayer, Rule},
    },
};

use crate::{
    proto::demo::v1::{ExecuteRequest, Operation, WaitExecutionRequest},
    service::validate,
};

/// The route layer for `mesh.demo.v1.Execution`:
///
/// * `Execute` is spread by load among the nodes carrying the action's platform as tags, with
///   the input root digest as the affinity key (for affinity strategies), and is idempotent:
///   if the node running it dies before the operation is done, it runs again elsewhere and
///   the client's stream goes on.
///   An invalid action is refused before it is routed anywhere.
/// * `WaitExecution` goes to the node named in the operation name.
pub fn execution_layer(router: Router) -> Result<RouteLayer, InvalidPath> {
    let execute = Rule::spread(|request: ExecuteRequest, _| async move {
        let action = validate(request.action.as_ref())?;
        let mut route =
            RouteRequest::new().with_required_tags(action.platform.clone().into_iter().collect());
        if !action.input_root_digest.is_empty() {
            route = route.with_affinity_key(action.input_root_digest.as_bytes());
        }
        Ok(Decision::Route(route))
    })
    .idempotent()
    .final_message(|operation: &Operation| operation.done);
    let wait = Rule::to_owner(|request: &WaitExecutionRequest| request.name.clone());
    RouteLayer::new(router)
        .rule("/mesh.demo.v1.Execution/Execute", execute)?
        .rule("/mesh.demo.v1.Execution/WaitExecution", wait)
}
