//! `build.bazel.remote.execution.v2.ActionCache`: a thin adapter onto [`ClusterCas`].
//!
//! * `GetActionResult` looks in this replica's action cache, then (unless the call came from a
//!   peer) in those of the action's owners; a result is served only if its outputs exist somewhere
//!   in the cluster (see [`crate::cluster`]). `NOT_FOUND` is a plain miss. Inlining of stdout,
//!   stderr or output files is not done (REAPI allows ignoring those fields; Bazel reads everything
//!   by digest).
//! * `UpdateActionResult` (clients that ran an action themselves) checks the digests in the
//!   result and that the blobs it names exist in the cluster (`FAILED_PRECONDITION` with the
//!   missing ones otherwise), then stores it here and on the action's owners. A call from a
//!   peer (a result being placed) is stored here as it is: the peer checked it.

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    ActionResult, GetActionResultRequest, UpdateActionResultRequest,
    action_cache_server::{ActionCache, ActionCacheServer},
};
use tonic::{Request, Response, Status};

use crate::{
    ClusterCas, Digest, DigestFunction, Fetch, MissingBlobs, action_key, cluster::result_digests,
    error::invalid, stats::ReapiCounters,
};

/// The `ActionCache` service.
#[derive(Debug, Clone)]
pub struct ActionCacheService {
    cluster: ClusterCas,
    counters: std::sync::Arc<ReapiCounters>,
}

impl ActionCacheService {
    pub(crate) fn new(cluster: ClusterCas, counters: std::sync::Arc<ReapiCounters>) -> Self {
        Self { cluster, counters }
    }

    /// The tonic service.
    pub fn into_server(self) -> ActionCacheServer<Self> {
        ActionCacheServer::new(self)
    }
}

#[tonic::async_trait]
impl ActionCache for ActionCacheService {
    async fn get_action_result(
        &self,
        request: Request<GetActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let fetch = Fetch::answering(request.metadata());
        let local_only = fetch.is_local();
        let function = DigestFunction::from_request(request.get_ref().digest_function)?;
        let action = Digest::from_required(
            request.get_ref().action_digest.as_ref(),
            "action_digest",
            function,
        )?;
        // A peer asks by key (see [`crate::action_cache`]); a client by instance and action.
        let key = if local_only {
            action
        } else {
            action_key(&request.get_ref().instance_name, &action)
        };
        match self.cluster.action_result(&key, &fetch).await? {
            Some(result) => {
                if !local_only {
                    self.counters.cache_hit("GetActionResult");
                }
                Ok(Response::new(result))
            }
            None => {
                if !local_only {
                    self.counters.cache_miss("GetActionResult");
                }
                Err(Status::not_found(format!(
                    "no cached result for action {action}"
                )))
            }
        }
    }

    async fn update_action_result(
        &self,
        request: Request<UpdateActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let fetch = Fetch::answering(request.metadata());
        let request = request.into_inner();
        let function = DigestFunction::from_request(request.digest_function)?;
        let action =
            Digest::from_required(request.action_digest.as_ref(), "action_digest", function)?;
        let result = request
            .action_result
            .ok_or_else(|| invalid("action_result is required"))?;
        let digests = result_digests(&result, function)?;
        if fetch.is_local() {
            // A peer's copy (a write reaching its owner, or handoff): `action` is the key.
            self.cluster
                .local_action_cache()
                .put(action, &result)
                .await?;
            return Ok(Response::new(result));
        }
        let key = action_key(&request.instance_name, &action);
        let missing = self.cluster.find_missing_in_cluster(&digests, &fetch).await;
        if !missing.is_empty() {
            return Err(MissingBlobs(missing).into());
        }
        self.cluster
            .store_result(key, &result, fetch.metadata())
            .await?;
        Ok(Response::new(result))
    }
}
