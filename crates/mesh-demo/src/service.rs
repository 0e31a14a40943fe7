//! `mesh.demo.v1.Execution`, served on this node: the service knows nothing of routing (the
//! route layer in front of it decides where each call runs).

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::{Stream, StreamExt};
use mesh::{
    OperationId,
    route::{forwarded_by, layer::CallTask},
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::{
    DemoExecutor,
    executor::{COMPLETED_RETENTION, MAX_ACTION_DURATION},
    proto::demo::v1::{Action, ExecuteRequest, Operation, WaitExecutionRequest, execution_server},
};

/// The stream type of both methods.
pub type OperationStream = Pin<Box<dyn Stream<Item = Result<Operation, Status>> + Send>>;

/// What a demo replica did with calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Actions completed on this node.
    pub executed: u64,
    /// `Execute` calls that arrived forwarded by a peer.
    pub forwarded_in: u64,
    /// `Execute` calls this node's route layer sent to a peer.
    pub forwarded_out: u64,
    /// `WaitExecution` calls this node's route layer sent to the owning peer.
    pub waits_relayed: u64,
    /// `Execute` calls routed again because the peer running them died.
    pub rerouted: u64,
}

/// The `mesh.demo.v1.Execution` service, executing here whatever reaches it.
///
/// * `Execute` submits the action to the executor and streams its operation, named
///   `{node}:{uuid}` after this node (behind `{instance}/operations/` when an instance name
///   is given), so a `WaitExecution` on any node can be routed here by the name.
/// * `WaitExecution` follows an operation this node owns; `NOT_FOUND` when it is unknown.
#[derive(Debug, Clone)]
pub struct ExecutionService {
    executor: DemoExecutor,
    forwarded_in: Arc<AtomicU64>,
}

impl ExecutionService {
    /// A service executing on `executor`.
    pub fn new(executor: DemoExecutor) -> Self {
        Self {
            executor,
            forwarded_in: Arc::default(),
        }
    }

    /// The tonic server wrapper for this service.
    pub fn into_server(self) -> execution_server::ExecutionServer<Self> {
        execution_server::ExecutionServer::new(self)
    }

    /// The executor behind the service.
    pub fn executor(&self) -> &DemoExecutor {
        &self.executor
    }

    /// `Execute` calls that arrived forwarded by a peer.
    pub fn forwarded_in(&self) -> u64 {
        self.forwarded_in.load(Ordering::Relaxed)
    }
}

/// Checks an `ExecuteRequest`'s action: present, and not longer than the limit.
pub(crate) fn validate(action: Option<&Action>) -> Result<&Action, Status> {
    let action =
        action.ok_or_else(|| Status::invalid_argument("ExecuteRequest.action is required"))?;
    if Duration::from_millis(action.duration_ms) > MAX_ACTION_DURATION {
        return Err(Status::invalid_argument(format!(
            "action.duration_ms {} exceeds the limit of {} ms",
            action.duration_ms,
            MAX_ACTION_DURATION.as_millis()
        )));
    }
    Ok(action)
}

fn operation_prefix(instance_name: &str) -> String {
    if instance_name.is_empty() {
        String::new()
    } else {
        format!("{instance_name}/operations/")
    }
}

#[tonic::async_trait]
impl execution_server::Execution for ExecutionService {
    type ExecuteStream = OperationStream;
    type WaitExecutionStream = OperationStream;

    async fn execute(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<Response<OperationStream>, Status> {
        let message = request.get_ref();
        let action = validate(message.action.as_ref())?.clone();
        let from = forwarded_by(request.metadata());
        if from.is_some() {
            self.forwarded_in.fetch_add(1, Ordering::Relaxed);
        }
        let request_id = request
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let node = self.executor.node_id().clone();
        let id = OperationId::new(node);
        let name = id.with_prefix(&operation_prefix(&message.instance_name));
        let call_task = request
            .extensions()
            .get::<CallTask>()
            .and_then(CallTask::take);
        let updates = self
            .executor
            .submit(id, name, action, from, request_id, call_task);
        Ok(Response::new(follow(updates)))
    }

    async fn wait_execution(
        &self,
        request: Request<WaitExecutionRequest>,
    ) -> Result<Response<OperationStream>, Status> {
        let name = &request.get_ref().name;
        let id: OperationId = name
            .parse()
            .map_err(|e: mesh::route::OperationIdError| Status::invalid_argument(e.to_string()))?;
        let updates = self.executor.watch(&id).ok_or_else(|| {
            Status::not_found(format!(
                "operation {name} is not known to its owner {}: it completed more than {} s ago \
                 or the node restarted; retry Execute",
                id.node(),
                COMPLETED_RETENTION.as_secs()
            ))
        })?;
        Ok(Response::new(follow(updates)))
    }
}

/// Streams an operation's updates until it is done (latest state first, as the Remote
/// Execution API does).
fn follow(updates: watch::Receiver<Operation>) -> OperationStream {
    Box::pin(futures::stream::unfold(
        (updates, false, true),
        |(mut updates, finished, first)| async move {
            if finished {
                return None;
            }
            if !first && updates.changed().await.is_err() {
                return Some((
                    Err(Status::aborted(
                        "the executor stopped before the operation completed",
                    )),
                    (updates, true, false),
                ));
            }
            let operation = updates.borrow_and_update().clone();
            let done = operation.done;
            Some((Ok(operation), (updates, done, false)))
        },
    ))
}

/// Reads an operation stream to its end and returns the final operation.
///
/// Reads past the `done` message to the trailers, so an error status sent after it is seen
/// and the call ends cleanly: dropping a response stream early resets it, and an HTTP/2
/// client that resets too many streams on one connection is sent away
/// (`too_many_internal_resets`).
pub async fn finish(
    mut stream: impl Stream<Item = Result<Operation, Status>> + Unpin,
) -> Result<Operation, Status> {
    let mut last: Option<Operation> = None;
    while let Some(operation) = stream.next().await {
        let operation = operation?;
        if last.as_ref().is_some_and(|op| op.done) {
            return Err(Status::internal(format!(
                "operation {} sent an update after it was done",
                operation.name
            )));
        }
        last = Some(operation);
    }
    last.filter(|op| op.done)
        .ok_or_else(|| Status::aborted("the operation stream ended before completion"))
}
