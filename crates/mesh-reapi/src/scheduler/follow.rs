//! Following an operation to its end: another replica's (the one that won the claim on an
//! identical action, [`crate::claims`]) through `WaitExecution`, or one of this replica's
//! own, mirroring its stage into the follower's operation.

use std::collections::HashMap;

use bazel_remote_apis::{
    build::bazel::remote::execution::v2::ExecuteResponse, google::longrunning::operation,
};
use mesh_route::OperationId;
use prost::Message as _;
use tokio::sync::watch;
use tonic::{Code, metadata::MetadataMap};

use super::{Inner, OperationState, Stage, lock};

/// How following another operation ended.
pub(super) enum Followed {
    /// With its outcome.
    Done(Box<ExecuteResponse>),
    /// The operation is gone: its replica is no longer a member, or no longer knows it.
    Gone,
    /// The connection broke (or could not be made) while its replica is still a member.
    Broke,
}

/// Follows operation `name` (another replica's, or this one's) to its end, mirroring its
/// stage into `sender`.
pub(super) async fn follow_elsewhere(
    inner: &Inner,
    name: &str,
    metadata: &MetadataMap,
    sender: &watch::Sender<OperationState>,
) -> Followed {
    use bazel_remote_apis::build::bazel::remote::execution::v2::{
        WaitExecutionRequest, execution_client::ExecutionClient,
    };
    let Ok(id) = name.parse::<OperationId>() else {
        return Followed::Gone;
    };
    if id.node() == &inner.node_id {
        let Some(mut updates) = lock(inner).operations.get(&id).map(|t| t.updates.clone()) else {
            return Followed::Gone;
        };
        loop {
            let state = updates.borrow_and_update().clone();
            sender.send_modify(|mine| mine.stage = state.stage);
            if let Some(response) = state.response {
                return Followed::Done(Box::new(response));
            }
            if updates.changed().await.is_err() {
                return Followed::Gone;
            }
        }
    }
    let member = || {
        inner
            .cluster
            .node()
            .view()
            .get(id.node().as_str())
            .is_some()
    };
    let broke = || {
        if member() {
            Followed::Broke
        } else {
            Followed::Gone
        }
    };
    let call = match inner.cluster.node().router().peer(id.node(), metadata) {
        Ok(call) => call,
        Err(error) => {
            tracing::debug!(operation = %name, %error, "cannot follow an operation elsewhere");
            return broke();
        }
    };
    let mut client = ExecutionClient::new(call.channel());
    let mut stream = match client
        .wait_execution(call.request(WaitExecutionRequest {
            name: name.to_owned(),
        }))
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) if status.code() == Code::NotFound => return Followed::Gone,
        Err(_) => return broke(),
    };
    loop {
        let operation = match stream.message().await {
            Ok(Some(operation)) => operation,
            Ok(None) => return broke(),
            Err(status) if status.code() == Code::NotFound => return Followed::Gone,
            Err(_) => return broke(),
        };
        if let Some(metadata) = operation.metadata.as_ref().and_then(|any| {
            bazel_remote_apis::build::bazel::remote::execution::v2::ExecuteOperationMetadata::decode(
                any.value.as_slice(),
            )
            .ok()
        }) && let Ok(stage) = Stage::try_from(metadata.stage)
        {
            sender.send_modify(|mine| mine.stage = stage);
        }
        if operation.done {
            return match operation.result {
                Some(operation::Result::Response(any)) => {
                    match ExecuteResponse::decode(any.value.as_slice()) {
                        Ok(response) => Followed::Done(Box::new(response)),
                        Err(_) => Followed::Gone,
                    }
                }
                Some(operation::Result::Error(status)) => {
                    Followed::Done(Box::new(ExecuteResponse {
                        result: None,
                        cached_result: false,
                        status: Some(status),
                        server_logs: HashMap::new(),
                        message: String::new(),
                    }))
                }
                None => Followed::Gone,
            };
        }
    }
}
