//! The route layer's rules for REAPI: what makes replicas one cluster.
//!
//! * `Execute` is *spread*. Before routing, the action cache is consulted — here, then on the
//!   action's owners (see [`crate::cluster`]) — unless `skip_cache_lookup` is set: a hit is
//!   answered by this replica and never costs a forward. A miss is routed by load among the
//!   replicas that carry the action's platform properties as tags (its input root digest is the
//!   affinity key, for the `Affinity` strategy), so the work of a burst sent to one replica spreads
//!   over the cluster and a replica with `pool=gpu` only gets work that asks for it. The rule is
//!   *idempotent* (an action digest names its work): if the replica running an action dies before
//!   the operation is done, the layer runs it again on another replica and the client's stream goes
//!   on — what Buildfarm and Buildbarn do with the work of a lost worker, here with no scheduler
//!   and no queue outside the replicas.
//! * `WaitExecution` goes *to the owner* named in the operation name
//!   (`{instance}/operations/{node}:{uuid}`), as Buildbarn's demultiplexing build queue routes
//!   by the name's prefix: `NOT_FOUND` when the owner is gone, and REAPI clients then send
//!   `Execute` again.
//! * Every other method (CAS, ByteStream, ActionCache, Capabilities) is served by the replica
//!   that receives it, for the whole cluster: lookups ask the owners of what it lacks, uploads
//!   are placed on their owners before they are answered ([`crate::cluster`]). An identical
//!   action already running on another replica is followed, not run again ([`crate::claims`]).

use bazel_remote_apis::{
    build::bazel::remote::execution::v2::{
        ExecuteRequest, WaitExecutionRequest, execution_server::SERVICE_NAME,
    },
    google::longrunning::Operation,
};
use mesh_route::{
    Decision, Router,
    layer::{InvalidPath, RouteLayer, Rule},
};

use crate::ExecutionService;

/// The route layer for a replica whose `Execution` service is `execution`.
pub(crate) fn layer(
    router: Router,
    execution: &ExecutionService,
) -> Result<RouteLayer, InvalidPath> {
    let executions = execution.clone();
    let execute = Rule::spread(move |request: ExecuteRequest, metadata| {
        let execution = executions.clone();
        async move {
            if execution
                .cached_result(&request, &metadata)
                .await?
                .is_some()
            {
                return Ok(Decision::Local);
            }
            Ok(Decision::Route(
                execution.route_request(&request, &metadata).await?,
            ))
        }
    })
    .idempotent()
    .final_message(|operation: &Operation| operation.done);
    let wait = Rule::to_owner(|request: &WaitExecutionRequest| request.name.clone());
    RouteLayer::new(router)
        .rule(&format!("/{SERVICE_NAME}/Execute"), execute)?
        .rule(&format!("/{SERVICE_NAME}/WaitExecution"), wait)
}
