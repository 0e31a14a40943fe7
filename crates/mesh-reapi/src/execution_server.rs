//! `build.bazel.remote.execution.v2.Execution`: runs here whatever reaches it.
//!
//! This service never routes. It is meant to sit behind the mesh's route layer
//! (`mesh_route::layer`), which decides per call where it runs, and it gives that layer what it
//! needs to decide:
//!
//! * [`ExecutionService::cached_result`]: the action-cache check made *before* routing, so a
//!   hit never costs a forward (honours `skip_cache_lookup`);
//! * [`ExecutionService::route_request`]: the `Action`'s platform properties as the tags a
//!   replica must carry, and its input root digest as an affinity key;
//! * operation names `{instance}/operations/{node}:{uuid}` ([`mesh_route::OperationId`]), so
//!   `WaitExecution` can be sent to the owner named in the name.
//!
//! `Execute`: checks this replica's action cache (unless `skip_cache_lookup`; the route layer's
//! rule consulted the whole cluster's before routing the call, see [`crate::routing`]), reads
//! and checks the
//! `Action` (fetching it from the forwarding node if needed: `FAILED_PRECONDITION` with a
//! `MISSING` violation if it is nowhere), and hands it to the [`crate::scheduler`], which merges
//! it with an identical action in flight. The stream sends the operation's current state, then
//! every change, and ends with the finished operation carrying its `ExecuteResponse`.
//!
//! `WaitExecution`: follows an operation this replica owns and still retains; `NOT_FOUND`
//! otherwise (REAPI: the client then sends `Execute` again). `INVALID_ARGUMENT` for a name that
//! is not `…{node}:{uuid}`.

use std::pin::Pin;

use bazel_remote_apis::{
    build::bazel::remote::execution::v2::{
        Action, ActionResult, Command, ExecuteRequest, WaitExecutionRequest,
        execution_server::{Execution, ExecutionServer},
    },
    google::longrunning::Operation,
};
use futures::Stream;
use mesh_core::NodeId;
use mesh_route::{OperationId, RouteRequest, forwarded_by, layer::CallTask};
use tonic::{Request, Response, Status, metadata::MetadataMap};

use crate::{
    ActionLimits, ClusterCas, ClusterError, Digest, DigestFunction, Fetch,
    action::ActionSpec,
    action_key,
    error::invalid,
    platform_tags,
    scheduler::{Scheduler, follow},
    stats::ReapiCounters,
};

/// The stream of operation updates both methods return.
pub type OperationStream = Pin<Box<dyn Stream<Item = Result<Operation, Status>> + Send>>;

/// The `Execution` service.
#[derive(Debug, Clone)]
pub struct ExecutionService {
    node_id: NodeId,
    cluster: ClusterCas,
    scheduler: Scheduler,
    limits: ActionLimits,
    retention: std::time::Duration,
    counters: std::sync::Arc<ReapiCounters>,
}

impl ExecutionService {
    pub(crate) fn new(
        node_id: NodeId,
        cluster: ClusterCas,
        scheduler: Scheduler,
        limits: ActionLimits,
        retention: std::time::Duration,
        counters: std::sync::Arc<ReapiCounters>,
    ) -> Self {
        Self {
            node_id,
            cluster,
            scheduler,
            limits,
            retention,
            counters,
        }
    }

    /// The tonic service.
    pub fn into_server(self) -> ExecutionServer<Self> {
        ExecutionServer::new(self)
    }

    /// The action-cache check to make before routing an `Execute`: `None` when
    /// `skip_cache_lookup` is set or nothing is cached; otherwise the result, found in this
    /// replica's cache or a peer's (its outputs checked to exist in the cluster). A call that
    /// carries `x-mesh-forwarded-by` is checked locally only.
    ///
    /// On `Some`, the route layer should let this replica answer the `Execute` (it finds the
    /// entry again, now locally, and answers from the cache at once).
    pub async fn cached_result(
        &self,
        request: &ExecuteRequest,
        metadata: &MetadataMap,
    ) -> Result<Option<ActionResult>, Status> {
        if request.skip_cache_lookup {
            return Ok(None);
        }
        let function = DigestFunction::from_request(request.digest_function)?;
        let action =
            Digest::from_required(request.action_digest.as_ref(), "action_digest", function)?;
        Ok(self
            .cluster
            .action_result(
                &action_key(&request.instance_name, &action),
                &Fetch::answering(metadata),
            )
            .await?)
    }

    /// Where an `Execute` may run: the tags a replica must carry (the action's platform
    /// properties; Bazel 4.2.3 puts them in the `Command`, which is read then) and the input
    /// root digest as the affinity key. Reads the `Action` (and `Command`) from the CAS,
    /// fetching them from peers if needed.
    pub async fn route_request(
        &self,
        request: &ExecuteRequest,
        metadata: &MetadataMap,
    ) -> Result<RouteRequest, Status> {
        let function = DigestFunction::from_request(request.digest_function)?;
        let digest =
            Digest::from_required(request.action_digest.as_ref(), "action_digest", function)?;
        let fetch = Fetch::working_for(metadata);
        let action = self.read_action(&digest, &fetch).await?;
        let spec = ActionSpec::parse(digest, &action, &self.limits).map_err(invalid)?;
        let command = if action
            .platform
            .as_ref()
            .is_some_and(|p| !p.properties.is_empty())
        {
            None
        } else {
            Some(
                self.cluster
                    .read_message::<Command>(&spec.command_digest, "Command", &fetch)
                    .await
                    .map_err(Status::from)?,
            )
        };
        let tags = platform_tags(&action, command.as_ref()).map_err(invalid)?;
        Ok(RouteRequest::new()
            .with_required_tags(tags)
            .with_affinity_key(spec.input_root_digest.hash().to_vec()))
    }

    /// Reads and decodes an `Action` (a missing one is `FAILED_PRECONDITION` naming it).
    pub async fn read_action(&self, digest: &Digest, fetch: &Fetch) -> Result<Action, Status> {
        self.cluster
            .read_message::<Action>(digest, "Action", fetch)
            .await
            .map_err(|error| match error {
                ClusterError::Malformed { .. } | ClusterError::MessageTooLarge { .. } => {
                    invalid(error)
                }
                other => other.into(),
            })
    }
}

#[tonic::async_trait]
impl Execution for ExecutionService {
    type ExecuteStream = OperationStream;
    type WaitExecutionStream = OperationStream;

    async fn execute(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<Response<OperationStream>, Status> {
        if forwarded_by(request.metadata()).is_some() {
            self.counters.forwarded_in();
        }
        let fetch = Fetch::working_for(request.metadata());
        // The route layer counts this call as one task of the node: a new action keeps that
        // count until it is done; a cache hit or a merged action ends it with the call.
        let call_task = request
            .extensions()
            .get::<CallTask>()
            .and_then(CallTask::take);
        let request = request.into_inner();
        let function = DigestFunction::from_request(request.digest_function)?;
        let digest =
            Digest::from_required(request.action_digest.as_ref(), "action_digest", function)?;
        // The cluster was consulted before routing; an entry found on a peer was kept here.
        let cached = if request.skip_cache_lookup {
            None
        } else {
            let key = action_key(&request.instance_name, &digest);
            self.cluster
                .action_result(&key, &Fetch::local(fetch.metadata()))
                .await?
        };
        if !request.skip_cache_lookup && cached.is_none() {
            self.counters.cache_miss("Execute");
        }
        if let Some(result) = cached {
            self.counters.cache_hit("Execute");
            let updates = self
                .scheduler
                .cached(&request.instance_name, digest, result);
            return Ok(Response::new(Box::pin(follow(updates))));
        }
        let action = self.read_action(&digest, &fetch).await?;
        let spec = ActionSpec::parse(digest, &action, &self.limits).map_err(invalid)?;
        let submitted = self.scheduler.submit(
            &request.instance_name,
            spec,
            fetch,
            !request.skip_cache_lookup,
            call_task,
        );
        if submitted.merged {
            tracing::debug!(action = %digest, "joined an identical action in flight");
        }
        Ok(Response::new(Box::pin(follow(submitted.updates))))
    }

    async fn wait_execution(
        &self,
        request: Request<WaitExecutionRequest>,
    ) -> Result<Response<OperationStream>, Status> {
        let name = &request.get_ref().name;
        let id: OperationId = name.parse().map_err(invalid)?;
        if id.node() != &self.node_id {
            return Err(Status::not_found(format!(
                "operation {name} is owned by node {}, not by this replica ({}); send WaitExecution to its owner, or Execute again",
                id.node(),
                self.node_id
            )));
        }
        let updates = self.scheduler.follow(&id).ok_or_else(|| {
            Status::not_found(format!(
                "operation {name} is not known here: it finished more than {:?} ago, or this replica restarted since; Execute again",
                self.retention
            ))
        })?;
        Ok(Response::new(Box::pin(follow(updates))))
    }
}
