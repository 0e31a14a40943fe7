//! Operations on one replica: queueing, concurrency, merging identical actions, and keeping
//! finished operations followable for a while.
//!
//! * **Load**: every accepted action takes a [`mesh_core::TaskGuard`] at once and holds it
//!   until it gives back its slot, so the load the mesh gossips is exactly the actions that
//!   wait for a slot here or hold one. The guard is the `Execute` call's own, which the route
//!   layer counted when it placed the call here ([`mesh_route::layer::CallTask`]), so the
//!   call and its action count once. Placing the outputs and the result on their owners
//!   afterwards is calls to peers, and is not counted: the route layer sends this replica
//!   its next action meanwhile (counted, it made the replica look full while its slots were
//!   free). A drain still waits for it (`Scheduler::placing_operations`). Past four
//!   placements a slot, an action stays load until its own placement is done: slow owners
//!   then slow the route layer down, and finished actions do not pile up here.
//!   At most `max_concurrency` actions execute at a time (a fair semaphore: first come, first
//!   run); the rest wait in order. A slot covers only what uses this machine: copying the
//!   inputs in, the command, collecting the outputs. Inputs are fetched from peers (and pinned
//!   against eviction) before a slot is taken, and the outputs and the result are placed on
//!   their owners after it is given back, so a slot never waits on the network. Pins held by
//!   waiting actions may take the CAS over its bound for a while; eviction catches up when
//!   they run.
//! * **Merging**: an `Execute` of an action already queued or running here (same instance,
//!   same action digest) does not run it again: the caller follows the running operation, under
//!   its name (Buildfarm and NativeLink merge the same way). Across replicas, the first
//!   `Execute` of an action here claims it at the action's owner ([`crate::claims`]); if
//!   another replica already runs it, this replica's operation follows that one
//!   (`WaitExecution` on the replica that runs it) instead of running it again, and gives up
//!   its load slot while it does.
//! * **Placement before the answer**: once an action ran, its outputs are copied to their
//!   owners and its result stored on the action's owners ([`crate::cluster`]) *before* the
//!   operation is published as done, so whatever the `ExecuteResponse` names outlives this
//!   replica.
//! * **Names**: `{instance}/operations/{node}:{uuid}` ([`mesh_route::OperationId`]), so any
//!   replica — or the route layer in front of it — can tell the owner from the name.
//! * **Retention**: a finished operation stays followable with `WaitExecution` for
//!   [`SchedulerConfig::retention`] (and at most [`MAX_RETAINED_OPERATIONS`] of them); a
//!   background sweep enforces it on an idle replica too. After that, `NOT_FOUND`, which REAPI
//!   clients answer by sending `Execute` again.
//! * **Always a result**: a finished operation always carries an `ExecuteResponse`; if an
//!   execution task ends without one (it panicked, or the runtime is shutting down) its
//!   followers get an `INTERNAL` status instead of a stream that never ends.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex, MutexGuard, Weak,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use bazel_remote_apis::{
    build::bazel::remote::execution::v2::{
        ActionResult, ExecuteOperationMetadata, ExecuteResponse, digest_function,
        execution_stage::Value as Stage,
    },
    google::{
        longrunning::{Operation, operation},
        protobuf::Any,
    },
};
use futures::Stream;
use mesh_core::{LoadTracker, NodeId, TaskGuard};
use mesh_route::OperationId;
use prost::Message as _;
use tokio::{
    sync::{Semaphore, watch},
    time::Instant,
};
use tonic::{Code, Status};

use crate::{
    ClusterCas, Digest, Fetch,
    action::ActionSpec,
    action_key,
    claims::{self, ClaimTable, Claimed},
    error::{exec_rpc_status, rpc_status},
    executor::Executor,
    stats::{Outcome, ReapiCounters},
};

mod follow;

use follow::{Followed, follow_elsewhere};

/// How often an operation claims an action (and follows another replica's operation) before
/// it runs the action itself.
const FOLLOW_ATTEMPTS: usize = 3;
/// How often a broken connection to a followed operation's replica, still a member, is
/// followed again before the operation counts as gone.
const FOLLOW_RETRIES: u32 = 5;
/// The wait before following again grows by this much each time.
const FOLLOW_BACKOFF: Duration = Duration::from_millis(50);

/// The most finished operations kept followable at once, whatever the retention.
pub const MAX_RETAINED_OPERATIONS: usize = 100_000;

/// How the scheduler keeps operations.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct SchedulerConfig {
    /// How long a finished operation can still be followed with `WaitExecution`.
    /// Default 10 minutes.
    pub retention: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(600),
        }
    }
}

/// One operation's state, as its followers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct OperationState {
    /// The operation's full name.
    pub name: String,
    /// The action it runs.
    pub action_digest: Digest,
    /// Where it is.
    pub stage: Stage,
    /// The outcome, once done.
    pub response: Option<ExecuteResponse>,
}

impl OperationState {
    /// Whether the operation is finished.
    pub fn is_done(&self) -> bool {
        self.response.is_some()
    }

    /// The `google.longrunning.Operation` message for this state: `metadata` is an
    /// `ExecuteOperationMetadata`, and a finished operation's `result` is its
    /// `ExecuteResponse`.
    pub fn to_operation(&self) -> Operation {
        let metadata = ExecuteOperationMetadata {
            stage: self.stage as i32,
            action_digest: Some(self.action_digest.to_proto()),
            digest_function: digest_function::Value::Sha256 as i32,
            ..Default::default()
        };
        Operation {
            name: self.name.clone(),
            metadata: Some(Any {
                type_url:
                    "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteOperationMetadata"
                        .to_owned(),
                value: metadata.encode_to_vec(),
            }),
            done: self.is_done(),
            result: self.response.as_ref().map(|response| {
                operation::Result::Response(Any {
                    type_url: "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteResponse"
                        .to_owned(),
                    value: response.encode_to_vec(),
                })
            }),
        }
    }
}

/// The operation name for `id` under `instance_name`.
pub fn operation_name(instance_name: &str, id: &OperationId) -> String {
    if instance_name.is_empty() {
        id.with_prefix("operations/")
    } else {
        id.with_prefix(&format!("{instance_name}/operations/"))
    }
}

/// Accepts actions, runs them on a bounded number of slots, and tracks their operations.
#[derive(Debug, Clone)]
pub(crate) struct Scheduler {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    node_id: NodeId,
    executor: Executor,
    cluster: ClusterCas,
    load: LoadTracker,
    slots: Semaphore,
    /// Operations that gave back their slot and are placing their outputs and result.
    placing: AtomicUsize,
    /// How many of those are not load: `PLACING_PER_SLOT` a slot.
    placing_max: usize,
    config: SchedulerConfig,
    counters: Arc<ReapiCounters>,
    claims: ClaimTable,
    registry: Mutex<Registry>,
}

#[derive(Debug, Default)]
struct Registry {
    operations: HashMap<OperationId, Tracked>,
    /// Actions queued or running, by (instance, action digest).
    in_flight: HashMap<(String, Digest), OperationId>,
    /// Finished operations, oldest first.
    finished: VecDeque<(Instant, OperationId)>,
}

#[derive(Debug)]
struct Tracked {
    updates: watch::Receiver<OperationState>,
}

/// What [`Scheduler::submit`] did.
#[derive(Debug)]
pub(crate) struct Submitted {
    pub(crate) updates: watch::Receiver<OperationState>,
    pub(crate) merged: bool,
}

impl Scheduler {
    /// A scheduler for the node of `cluster` (its id names the operations, its load tracker
    /// counts them).
    pub(crate) fn new(
        executor: Executor,
        cluster: ClusterCas,
        max_concurrency: usize,
        config: SchedulerConfig,
        counters: Arc<ReapiCounters>,
        claims: ClaimTable,
    ) -> Self {
        let inner = Arc::new(Inner {
            node_id: cluster.node().node_id().clone(),
            load: cluster.node().load().clone(),
            executor,
            cluster,
            slots: Semaphore::new(max_concurrency.clamp(1, Semaphore::MAX_PERMITS)),
            placing: AtomicUsize::new(0),
            placing_max: max_concurrency.max(1).saturating_mul(PLACING_PER_SLOT),
            config,
            counters,
            claims,
            registry: Mutex::default(),
        });
        tokio::spawn(sweep(Arc::downgrade(&inner)));
        Self { inner }
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        lock(&self.inner)
    }

    /// Accepts `spec` (or joins the identical action already in flight). `fetch` names the
    /// nodes likely to hold its inputs and carries the caller's metadata, for peers;
    /// `accept_cached` is false when the client asked to skip the cache (an identical action
    /// that just finished elsewhere is then not followed: this one runs).
    pub(crate) fn submit(
        &self,
        instance_name: &str,
        spec: ActionSpec,
        fetch: Fetch,
        accept_cached: bool,
        call_task: Option<TaskGuard>,
    ) -> Submitted {
        let key = (instance_name.to_owned(), spec.action_digest);
        let mut registry = self.registry();
        if let Some(updates) = registry
            .in_flight
            .get(&key)
            .and_then(|id| registry.operations.get(id))
            .map(|tracked| tracked.updates.clone())
        {
            self.inner.counters.merged();
            return Submitted {
                updates,
                merged: true,
            };
        }
        // The call's own count (the route layer's) becomes the action's, queued and running;
        // a call that joined an action in flight above added no work and drops it.
        let guard = call_task.unwrap_or_else(|| self.inner.load.begin_task());
        let id = OperationId::new(self.inner.node_id.clone());
        let name = operation_name(instance_name, &id);
        let (sender, updates) = watch::channel(OperationState {
            name,
            action_digest: spec.action_digest,
            stage: Stage::Queued,
            response: None,
        });
        registry.operations.insert(
            id.clone(),
            Tracked {
                updates: updates.clone(),
            },
        );
        registry.in_flight.insert(key.clone(), id.clone());
        drop(registry);
        let completion = Completion {
            inner: self.inner.clone(),
            id,
            key: Some(key.clone()),
            sender,
            done: false,
        };
        let queued_at = SystemTime::now();
        tokio::spawn(run(
            self.inner.clone(),
            key.0,
            accept_cached,
            spec,
            fetch,
            queued_at,
            guard,
            completion,
        ));
        Submitted {
            updates,
            merged: false,
        }
    }

    /// Registers an operation answered from the action cache: done at once, followable like
    /// any other.
    pub(crate) fn cached(
        &self,
        instance_name: &str,
        action_digest: Digest,
        result: ActionResult,
    ) -> watch::Receiver<OperationState> {
        let id = OperationId::new(self.inner.node_id.clone());
        let (_sender, updates) = watch::channel(OperationState {
            name: operation_name(instance_name, &id),
            action_digest,
            stage: Stage::Completed,
            response: Some(ExecuteResponse {
                result: Some(result),
                cached_result: true,
                status: None,
                server_logs: HashMap::new(),
                message: String::new(),
            }),
        });
        let mut registry = self.registry();
        registry.operations.insert(
            id.clone(),
            Tracked {
                updates: updates.clone(),
            },
        );
        registry.finished.push_back((Instant::now(), id));
        updates
    }

    /// The updates of an operation this replica knows.
    pub(crate) fn follow(&self, id: &OperationId) -> Option<watch::Receiver<OperationState>> {
        self.registry()
            .operations
            .get(id)
            .map(|tracked| tracked.updates.clone())
    }

    /// Operations known (queued, running, or finished and retained).
    pub(crate) fn known_operations(&self) -> usize {
        self.registry().operations.len()
    }

    /// Operations that ran here and are placing what they produced on its owners (their
    /// outcome not published yet). Operations following an identical action elsewhere are
    /// not counted.
    pub(crate) fn placing_operations(&self) -> usize {
        self.inner.placing.load(Ordering::SeqCst)
    }
}

fn lock(inner: &Inner) -> MutexGuard<'_, Registry> {
    inner
        .registry
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One action's life: claim it cluster-wide (or follow whoever runs it), wait for a slot,
/// run, place the outputs and the result, publish the outcome.
#[allow(clippy::too_many_arguments)]
async fn run(
    inner: Arc<Inner>,
    instance: String,
    accept_cached: bool,
    spec: ActionSpec,
    fetch: Fetch,
    queued_at: SystemTime,
    guard: TaskGuard,
    completion: Completion,
) {
    let name = completion.sender.borrow().name.clone();
    let mut guard = Some(guard);
    let mut stale = String::new();
    for _ in 0..FOLLOW_ATTEMPTS {
        let claimed = claims::claim(
            &inner.cluster,
            &inner.claims,
            &instance,
            spec.action_digest,
            &name,
            &stale,
            accept_cached,
            fetch.metadata(),
        )
        .await;
        let Claimed::Follow(other) = claimed else {
            break;
        };
        // Another replica runs it: follow that operation, holding no slot meanwhile. A
        // connection that breaks while its replica is still a member is followed again (a
        // moment later); an operation that is gone is claimed anew.
        guard = None;
        let mut broken = 0;
        loop {
            match follow_elsewhere(&inner, &other, fetch.metadata(), &completion.sender).await {
                Followed::Done(response) => {
                    inner.counters.merged();
                    tracing::debug!(action = %spec.action_digest, operation = %other, "followed an identical action running elsewhere");
                    completion.finish(*response);
                    return;
                }
                Followed::Broke if broken < FOLLOW_RETRIES => {
                    broken += 1;
                    tokio::time::sleep(FOLLOW_BACKOFF * broken).await;
                }
                Followed::Broke | Followed::Gone => break,
            }
        }
        stale = other;
    }
    let guard = guard.unwrap_or_else(|| inner.load.begin_task());
    // Inputs are fetched before a slot is taken: that waits on peers, not on this machine.
    let fetched = inner.executor.fetch_inputs(&spec, queued_at, &fetch).await;
    let Ok(slot) = inner.slots.acquire().await else {
        return;
    };
    completion
        .sender
        .send_modify(|state| state.stage = Stage::Executing);
    let queued = SystemTime::now()
        .duration_since(queued_at)
        .unwrap_or_default();
    let started = tokio::time::Instant::now();
    let outcome = match fetched {
        Ok(fetched) => inner.executor.run(&spec, fetched).await,
        Err(error) => Err(error),
    };
    // The slot bounds what runs on this machine; placing the outputs and the result, and
    // releasing the claim, are calls to peers, and the next action may run meanwhile.
    drop(slot);
    // Nor is this action load any more: what is left is calls to peers (see the module docs).
    // It counts as placing until its outcome is published (counted before the load drops, so
    // a drain never sees it in neither).
    let (_placing, placing) = Placing::start(&inner.placing);
    // Back-pressure: past `PLACING_PER_SLOT` placements a slot, an action stays load until
    // its own placement is done, so slow owners slow the route layer down instead of letting
    // finished actions pile up here.
    let _guard = (placing > inner.placing_max).then_some(guard);
    let ran = started.elapsed();
    let mut cached = false;
    let response = match outcome {
        Ok(executed) => {
            let status = executed.timed_out.then(|| {
                rpc_status(
                    Code::DeadlineExceeded,
                    format!(
                        "the command ran past its timeout of {:?} and was killed",
                        spec.timeout
                    ),
                )
            });
            let cacheable =
                !spec.do_not_cache && !executed.timed_out && executed.result.exit_code == 0;
            // What the response names must outlive this replica: placed before it is sent.
            inner
                .cluster
                .replicate_outputs(
                    &executed.result,
                    spec.action_digest.function(),
                    fetch.metadata(),
                )
                .await;
            if cacheable
                && let Err(error) = inner
                    .cluster
                    .store_result(
                        action_key(&instance, &spec.action_digest),
                        &executed.result,
                        fetch.metadata(),
                    )
                    .await
            {
                tracing::warn!(action = %spec.action_digest, %error, "could not cache an action result");
            } else {
                cached = cacheable;
            }
            inner.counters.executed(
                if executed.timed_out {
                    Outcome::TimedOut
                } else if executed.result.exit_code == 0 {
                    Outcome::ExitZero
                } else {
                    Outcome::ExitNonzero
                },
                queued,
                ran,
            );
            ExecuteResponse {
                result: Some(executed.result),
                cached_result: false,
                status,
                server_logs: HashMap::new(),
                message: String::new(),
            }
        }
        Err(error) => {
            tracing::info!(action = %spec.action_digest, %error, "action failed before producing a result");
            inner.counters.executed(Outcome::Failed, queued, ran);
            ExecuteResponse {
                result: None,
                cached_result: false,
                status: Some(exec_rpc_status(&error)),
                server_logs: HashMap::new(),
                message: error.to_string(),
            }
        }
    };
    claims::release(
        &inner.cluster,
        &inner.claims,
        &instance,
        spec.action_digest,
        &name,
        cached,
    )
    .await;
    completion.finish(response);
}

/// Placements a slot may have going at once before the actions placing count as load again
/// (see `run`).
const PLACING_PER_SLOT: usize = 4;

/// One operation in [`Inner::placing`] while it lives.
struct Placing<'a>(&'a AtomicUsize);

impl<'a> Placing<'a> {
    /// Counts one more, and says how many there are with it.
    fn start(count: &'a AtomicUsize) -> (Self, usize) {
        let now = count.fetch_add(1, Ordering::SeqCst) + 1;
        (Self(count), now)
    }
}

impl Drop for Placing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Publishes an operation's outcome exactly once, and removes it from the in-flight set; if
/// dropped before that (the task panicked or was cancelled), publishes an `INTERNAL` error so
/// followers never wait forever.
#[derive(Debug)]
struct Completion {
    inner: Arc<Inner>,
    id: OperationId,
    key: Option<(String, Digest)>,
    sender: watch::Sender<OperationState>,
    done: bool,
}

impl Completion {
    fn finish(mut self, response: ExecuteResponse) {
        self.publish(response);
    }

    fn publish(&mut self, response: ExecuteResponse) {
        if self.done {
            return;
        }
        self.done = true;
        {
            let mut registry = lock(&self.inner);
            if let Some(key) = self.key.take()
                && registry.in_flight.get(&key) == Some(&self.id)
            {
                registry.in_flight.remove(&key);
            }
            registry
                .finished
                .push_back((Instant::now(), self.id.clone()));
        }
        self.sender.send_modify(|state| {
            state.stage = Stage::Completed;
            state.response = Some(response);
        });
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if !self.done {
            self.publish(ExecuteResponse {
                result: None,
                cached_result: false,
                status: Some(rpc_status(
                    Code::Internal,
                    "the replica stopped before the action finished; retry",
                )),
                server_logs: HashMap::new(),
                message: String::new(),
            });
        }
    }
}

/// Forgets finished operations past their retention (or over the count bound), on a timer,
/// so an idle replica forgets them too. Ends when the scheduler is dropped.
async fn sweep(inner: Weak<Inner>) {
    let period = match inner.upgrade() {
        Some(inner) => {
            (inner.config.retention / 4).clamp(Duration::from_millis(10), Duration::from_secs(30))
        }
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let now = Instant::now();
        let mut registry = lock(&inner);
        while let Some((finished_at, id)) = registry.finished.front().cloned() {
            let expired = now.duration_since(finished_at) >= inner.config.retention;
            if !expired && registry.finished.len() <= MAX_RETAINED_OPERATIONS {
                break;
            }
            registry.finished.pop_front();
            registry.operations.remove(&id);
        }
    }
}

/// Streams an operation: its current state first, then every change, ending after the
/// finished state (REAPI `Execute`/`WaitExecution` semantics).
pub(crate) fn follow(
    updates: watch::Receiver<OperationState>,
) -> impl Stream<Item = Result<Operation, Status>> + Send + 'static {
    futures::stream::unfold(
        (updates, false, true),
        |(mut updates, finished, first)| async move {
            if finished {
                return None;
            }
            if !first && updates.changed().await.is_err() {
                // The sender is gone without a final state: only possible if the process is
                // going down (Completion publishes one otherwise).
                let state = updates.borrow().clone();
                if !state.is_done() {
                    return Some((
                        Err(Status::internal(
                            "the replica stopped before the operation finished; retry",
                        )),
                        (updates, true, false),
                    ));
                }
            }
            let state = updates.borrow_and_update().clone();
            let done = state.is_done();
            Some((Ok(state.to_operation()), (updates, done, false)))
        },
    )
}
