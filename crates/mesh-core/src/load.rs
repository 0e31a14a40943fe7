//! Counting the work a node has in hand, so its load can be gossiped without embedders doing
//! arithmetic by hand.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
};

use tokio::sync::{Notify, watch};

tokio::task_local! {
    /// Set while a call that something else already counts runs (see
    /// [`LoadTracker::already_counted`]).
    static ALREADY_COUNTED: ();
}

/// Whether the double-count warning was logged (once per process).
static WARNED_DOUBLE_COUNT: AtomicBool = AtomicBool::new(false);

/// Tracks pending tasks (queued plus executing) and the node's concurrency limit.
///
/// Every change wakes the membership task, which publishes a new [`crate::NodeState`] version
/// (coalesced and rate-limited, so a burst of task starts costs one update, not thousands).
/// Cloning is cheap; all clones share the counters.
///
/// ```
/// use mesh_core::LoadTracker;
///
/// let load = LoadTracker::new(2);
/// let first = load.begin_task();
/// let second = load.try_begin_task().expect("one slot left");
/// assert!(load.try_begin_task().is_none(), "full");
/// assert_eq!(load.pending(), 2);
/// drop((first, second));
/// assert_eq!(load.pending(), 0);
/// assert_eq!(load.peak_pending(), 2);
/// ```
#[derive(Debug, Clone)]
pub struct LoadTracker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pending: AtomicU32,
    peak: AtomicU32,
    max_concurrency: AtomicU32,
    changed: Notify,
    /// Counts slots freed (a task ended, or the limit rose), for whoever waits for room here.
    freed: watch::Sender<u64>,
}

impl LoadTracker {
    /// A tracker with no pending tasks and the given concurrency limit.
    pub fn new(max_concurrency: u32) -> Self {
        Self {
            inner: Arc::new(Inner {
                pending: AtomicU32::new(0),
                peak: AtomicU32::new(0),
                max_concurrency: AtomicU32::new(max_concurrency),
                changed: Notify::new(),
                freed: watch::Sender::new(0),
            }),
        }
    }

    /// Counts one more pending task until the returned guard is dropped.
    ///
    /// Always succeeds, even over the limit: queued work counts as load too.
    ///
    /// Inside a call that is already counted (the route layer counts every call it runs
    /// here, see [`LoadTracker::already_counted`]) this counts the call a second time, which
    /// halves what the node appears able to take: the first time that happens, a warning
    /// says so.
    pub fn begin_task(&self) -> TaskGuard {
        warn_if_already_counted();
        let now = self
            .inner
            .pending
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        self.inner.peak.fetch_max(now, Ordering::AcqRel);
        self.inner.changed.notify_one();
        TaskGuard {
            tracker: self.clone(),
        }
    }

    /// Like [`LoadTracker::begin_task`], but only while fewer than `max_concurrency` tasks
    /// are pending.
    pub fn try_begin_task(&self) -> Option<TaskGuard> {
        warn_if_already_counted();
        let max = self.inner.max_concurrency.load(Ordering::Acquire);
        let mut current = self.inner.pending.load(Ordering::Acquire);
        loop {
            if current >= max {
                return None;
            }
            match self.inner.pending.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        self.inner.peak.fetch_max(current + 1, Ordering::AcqRel);
        self.inner.changed.notify_one();
        Some(TaskGuard {
            tracker: self.clone(),
        })
    }

    /// Runs `future` as a call that its caller already counts with a [`TaskGuard`] of its
    /// own. The route layer runs every call it counts this way, so that a handler which
    /// also calls [`LoadTracker::begin_task`] for the same call (counting it twice) is
    /// reported with a warning, once per process. Work a handler spawns as a task of its own
    /// is outside the scope.
    pub fn already_counted<F: Future>(future: F) -> impl Future<Output = F::Output> {
        ALREADY_COUNTED.scope((), future)
    }

    /// Tasks currently pending.
    pub fn pending(&self) -> u32 {
        self.inner.pending.load(Ordering::Acquire)
    }

    /// The most tasks ever pending at once.
    pub fn peak_pending(&self) -> u32 {
        self.inner.peak.load(Ordering::Acquire)
    }

    /// The concurrency limit.
    pub fn max_concurrency(&self) -> u32 {
        self.inner.max_concurrency.load(Ordering::Acquire)
    }

    /// Changes the concurrency limit; peers learn it with the next state update.
    pub fn set_max_concurrency(&self, max_concurrency: u32) {
        let previous = self
            .inner
            .max_concurrency
            .swap(max_concurrency, Ordering::AcqRel);
        if previous != max_concurrency {
            self.inner.changed.notify_one();
        }
        if max_concurrency > previous {
            self.inner.freed.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// A receiver that sees a change every time a slot frees here (a task ends, or the limit
    /// rises): a router holding calls for a free slot wakes at once instead of waiting for
    /// the next published state.
    pub fn slot_freed(&self) -> watch::Receiver<u64> {
        self.inner.freed.subscribe()
    }

    /// `pending / max_concurrency`, infinite when the limit is zero.
    pub fn load_ratio(&self) -> f64 {
        crate::load_ratio(self.pending(), self.max_concurrency())
    }

    /// Resolves after the next change (used by the membership task).
    pub(crate) async fn changed(&self) {
        self.inner.changed.notified().await;
    }

    fn end_task(&self) {
        // Saturating: a guard can only exist after an increment, so this never underflows,
        // but a saturating update keeps that true even if a future change breaks the pairing.
        let _ = self
            .inner
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                Some(p.saturating_sub(1))
            });
        self.inner.changed.notify_one();
        self.inner.freed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

fn warn_if_already_counted() {
    if ALREADY_COUNTED.try_with(|()| ()).is_ok()
        && !WARNED_DOUBLE_COUNT.swap(true, Ordering::Relaxed)
    {
        tracing::warn!(
            "LoadTracker::begin_task was called inside a call the route layer already counts: \
             the call is counted twice and the node looks twice as busy as it is. Take the \
             layer's guard instead (mesh_route::layer::CallTask in the request's extensions) \
             or drop the begin_task call (this warning is logged once)"
        );
    }
}

/// One pending task; dropping it ends the task.
#[derive(Debug)]
#[must_use = "the task ends as soon as the guard is dropped"]
pub struct TaskGuard {
    tracker: LoadTracker,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.tracker.end_task();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_count_and_uncount() {
        let load = LoadTracker::new(4);
        let guards: Vec<_> = (0..6).map(|_| load.begin_task()).collect();
        assert_eq!(load.pending(), 6);
        assert_eq!(load.load_ratio(), 1.5);
        drop(guards);
        assert_eq!(load.pending(), 0);
        assert_eq!(load.peak_pending(), 6);
    }

    #[test]
    fn try_begin_respects_the_limit_under_contention() {
        let load = LoadTracker::new(50);
        let guards = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..100 {
                        if let Some(g) = load.try_begin_task() {
                            guards.lock().unwrap().push(g);
                        }
                    }
                });
            }
        });
        assert_eq!(guards.lock().unwrap().len(), 50);
        assert_eq!(load.pending(), 50);
    }

    /// A writer the test's log subscriber appends to.
    #[derive(Clone, Default)]
    struct Log(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Log {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn counting_a_counted_call_again_is_reported_once() {
        let log = Log::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        tracing::subscriber::with_default(subscriber, || {
            let load = LoadTracker::new(4);
            let outside = load.begin_task();
            let logged = |log: &Log| String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
            assert_eq!(logged(&log), "", "a task outside a counted call is fine");
            runtime.block_on(LoadTracker::already_counted(async {
                let _twice = load.begin_task();
                let _again = load.try_begin_task();
            }));
            let text = logged(&log);
            assert!(text.contains("counted twice"), "{text}");
            assert_eq!(text.matches("WARN").count(), 1, "once: {text}");
            drop(outside);
        });
    }

    #[tokio::test]
    async fn a_freed_slot_is_signalled() {
        let load = LoadTracker::new(1);
        let mut freed = load.slot_freed();
        let task = load.begin_task();
        assert!(!freed.has_changed().unwrap(), "starting work frees nothing");
        drop(task);
        assert!(freed.has_changed().unwrap());
        freed.mark_unchanged();
        load.set_max_concurrency(0);
        assert!(!freed.has_changed().unwrap(), "a lower limit frees nothing");
        load.set_max_concurrency(2);
        assert!(freed.has_changed().unwrap());
    }

    #[tokio::test]
    async fn changes_wake_the_publisher() {
        let load = LoadTracker::new(1);
        let waiter = {
            let load = load.clone();
            tokio::spawn(async move { load.changed().await })
        };
        tokio::task::yield_now().await;
        load.set_max_concurrency(3);
        waiter.await.unwrap();
        assert_eq!(load.max_concurrency(), 3);
    }
}
