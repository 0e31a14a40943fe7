//! Simulated work on a bounded pool of worker slots.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use mesh::{LoadTracker, NodeId, OperationId, TaskGuard};
use tokio::{
    sync::{Semaphore, watch},
    time::Instant,
};

use crate::proto::demo::v1::{Action, ExecuteResponse, Operation, Stage};

/// The longest simulated action accepted.
pub const MAX_ACTION_DURATION: Duration = Duration::from_secs(3600);
/// How long a completed operation can still be followed with `WaitExecution`.
pub const COMPLETED_RETENTION: Duration = Duration::from_secs(300);

/// Runs simulated actions on a bounded pool of worker slots, reporting into a
/// [`LoadTracker`]: every accepted action holds a task guard from queueing to completion, so
/// the gossiped load is exact without any bookkeeping by hand.
#[derive(Debug, Clone)]
pub struct DemoExecutor {
    inner: Arc<ExecutorInner>,
}

#[derive(Debug)]
struct ExecutorInner {
    node_id: NodeId,
    load: LoadTracker,
    slots: Semaphore,
    operations: Mutex<Operations>,
    executed: AtomicU64,
}

/// The operations this node can still be asked about: every one not yet completed, and the
/// completed ones for [`COMPLETED_RETENTION`].
#[derive(Debug, Default)]
struct Operations {
    by_id: HashMap<OperationId, watch::Receiver<Operation>>,
    /// Completed operations in the order they completed, which is the order they expire in:
    /// pruning pops from the front and stops at the first one still retained, so it costs
    /// only what it removes (a scan of the whole table on every call made the node slower
    /// with every operation it had run).
    completed: VecDeque<(Instant, OperationId)>,
}

impl Operations {
    fn prune(&mut self, now: Instant) {
        while let Some((at, _)) = self.completed.front() {
            if now.duration_since(*at) < COMPLETED_RETENTION {
                break;
            }
            if let Some((_, id)) = self.completed.pop_front() {
                self.by_id.remove(&id);
            }
        }
    }
}

impl DemoExecutor {
    /// An executor for `node_id` with as many worker slots as `load`'s concurrency limit.
    pub fn new(node_id: NodeId, load: LoadTracker) -> Self {
        let slots = usize::try_from(load.max_concurrency()).unwrap_or(usize::MAX);
        Self {
            inner: Arc::new(ExecutorInner {
                node_id,
                load,
                slots: Semaphore::new(slots.min(Semaphore::MAX_PERMITS)),
                operations: Mutex::new(Operations::default()),
                executed: AtomicU64::new(0),
            }),
        }
    }

    /// The operations still followable; completed ones past [`COMPLETED_RETENTION`] are
    /// forgotten on every access, so retention holds on an idle node too.
    fn operations(&self) -> MutexGuard<'_, Operations> {
        let mut operations = self
            .inner
            .operations
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        operations.prune(Instant::now());
        operations
    }

    /// Accepts an action: it is queued at once (counted as pending), runs when a slot frees,
    /// and completes after its duration. Returns the operation's updates.
    ///
    /// `call_task` is the `Execute` call's count, taken from the route layer
    /// ([`mesh::route::layer::CallTask`]): the action keeps it until it is done, so the call
    /// and its action count once. Without one (a call that did not come through the layer)
    /// the action counts itself.
    pub fn submit(
        &self,
        id: OperationId,
        name: String,
        action: Action,
        forwarded_by: Option<NodeId>,
        request_id: String,
        call_task: Option<TaskGuard>,
    ) -> watch::Receiver<Operation> {
        let guard = call_task.unwrap_or_else(|| self.inner.load.begin_task());
        let (updates, receiver) = watch::channel(Operation {
            name,
            stage: Stage::Queued as i32,
            done: false,
            response: None,
        });
        self.operations().by_id.insert(id.clone(), receiver.clone());
        let executor = self.clone();
        tokio::spawn(async move {
            let queued_at = Instant::now();
            let Ok(_slot) = executor.inner.slots.acquire().await else {
                return;
            };
            updates.send_modify(|op| op.stage = Stage::Executing as i32);
            let started_at = Instant::now();
            if action.duration_ms > 0 {
                // Not for 0: tokio's timer would round it up to its next 1 ms tick.
                tokio::time::sleep(Duration::from_millis(action.duration_ms)).await;
            }
            let response = ExecuteResponse {
                executed_by: executor.inner.node_id.to_string(),
                exit_code: action.exit_code,
                queued_ms: millis(started_at - queued_at),
                execution_ms: millis(started_at.elapsed()),
                forwarded_by: forwarded_by.map(|n| n.to_string()).unwrap_or_default(),
                request_id,
            };
            executor.inner.executed.fetch_add(1, Ordering::Relaxed);
            executor
                .operations()
                .completed
                .push_back((Instant::now(), id.clone()));
            updates.send_modify(|op| {
                op.stage = Stage::Completed as i32;
                op.done = true;
                op.response = Some(response);
            });
            drop(guard);
        });
        receiver
    }

    /// The updates of an operation this node owns, if it still knows it.
    pub fn watch(&self, id: &OperationId) -> Option<watch::Receiver<Operation>> {
        self.operations().by_id.get(id).cloned()
    }

    /// The node this executor runs on.
    pub fn node_id(&self) -> &NodeId {
        &self.inner.node_id
    }

    /// Actions this executor completed.
    pub fn executed(&self) -> u64 {
        self.inner.executed.load(Ordering::Relaxed)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run_one(executor: &DemoExecutor, node: &NodeId) -> OperationId {
        let id = OperationId::new(node.clone());
        let mut updates = executor.submit(
            id.clone(),
            id.to_string(),
            Action::default(),
            None,
            String::new(),
            None,
        );
        while !updates.borrow_and_update().done {
            updates.changed().await.unwrap();
        }
        id
    }

    #[tokio::test(start_paused = true)]
    async fn each_operation_is_kept_for_the_retention_after_its_own_completion() {
        let node = NodeId::new("n").unwrap();
        let executor = DemoExecutor::new(node.clone(), LoadTracker::new(4));
        let first = run_one(&executor, &node).await;
        tokio::time::sleep(Duration::from_secs(100)).await;
        let second = run_one(&executor, &node).await;
        let third = run_one(&executor, &node).await;
        tokio::time::sleep(COMPLETED_RETENTION - Duration::from_secs(50)).await;
        assert!(
            executor.watch(&first).is_none(),
            "first: past its retention"
        );
        assert!(executor.watch(&second).is_some(), "second: 50 s left");
        assert!(executor.watch(&third).is_some(), "third: 50 s left");
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(executor.watch(&second).is_none() && executor.watch(&third).is_none());
        assert!(executor.operations().completed.is_empty());
        assert!(executor.operations().by_id.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn completed_operations_are_forgotten_after_the_retention_even_when_idle() {
        let node = NodeId::new("n").unwrap();
        let load = LoadTracker::new(1);
        let executor = DemoExecutor::new(node.clone(), load);
        let id = OperationId::new(node);
        let action = Action {
            duration_ms: 10,
            ..Action::default()
        };
        let mut updates = executor.submit(
            id.clone(),
            id.to_string(),
            action,
            None,
            String::new(),
            None,
        );
        while !updates.borrow_and_update().done {
            updates.changed().await.unwrap();
        }
        tokio::time::sleep(COMPLETED_RETENTION - Duration::from_secs(1)).await;
        assert!(executor.watch(&id).is_some(), "still within the retention");
        // Nothing else happens on this node: no new work prunes the table.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            executor.watch(&id).is_none(),
            "forgotten after the retention"
        );
    }
}
