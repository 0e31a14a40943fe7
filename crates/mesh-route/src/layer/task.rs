//! Counting the calls the layer runs here: one task guard per call, for as long as it runs.

use std::{
    pin::Pin,
    sync::{Arc, Mutex, PoisonError, atomic::Ordering},
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use mesh_core::{Membership, TaskGuard};
use tonic::{Status, body::Body};

use super::stats::LayerCounters;
use crate::headers::{COUNTED_UNTIL, state_version_value};

/// The task guard of a call the route layer runs on this node, in the request's extensions.
///
/// The layer counts every call of a spread rule that runs here — placed here, decided
/// [`Local`](super::Decision::Local), or forwarded by a peer — as one pending task, from the
/// moment it is placed until its response ends (a unary call's answer, a stream's trailers, or
/// the client going away). A server that only adds the layer is therefore counted correctly:
/// its handlers must not call [`LoadTracker::begin_task`](mesh_core::LoadTracker::begin_task)
/// for the same call (that counts it twice; a warning says so once).
///
/// A handler whose work outlives the call (an operation that goes on after the client stops
/// watching it) takes the guard and keeps it with the work; one whose call adds no work (it
/// joins work already counted) takes it and drops it:
///
/// ```
/// use mesh_route::layer::CallTask;
///
/// fn work_of(request: &tonic::Request<()>) -> Option<mesh_core::TaskGuard> {
///     // `None` when the call did not come through the layer: count it yourself then.
///     request.extensions().get::<CallTask>().and_then(CallTask::take)
/// }
/// ```
#[derive(Debug, Clone)]
pub struct CallTask {
    guard: Arc<Mutex<Option<TaskGuard>>>,
    _running: Arc<Running>,
}

impl CallTask {
    pub(crate) fn new(guard: TaskGuard, running: Running) -> Self {
        Self {
            guard: Arc::new(Mutex::new(Some(guard))),
            _running: Arc::new(running),
        }
    }

    /// Takes the call's guard: the call stays counted for as long as the caller keeps it,
    /// and the layer no longer ends it with the response. `None` once taken.
    pub fn take(&self) -> Option<TaskGuard> {
        self.guard
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Whether the layer still holds the guard.
    pub fn is_held(&self) -> bool {
        self.guard
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }
}

/// One call in the layer's `running` gauge, until every handle of its [`CallTask`] is gone
/// (the response ended and the service let go of the request).
#[derive(Debug)]
pub(crate) struct Running(Arc<LayerCounters>);

impl Running {
    pub(crate) fn start(counters: &Arc<LayerCounters>) -> Self {
        counters.running.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(counters))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that ends its call's task when it ends: at its trailers, at its last
/// frame, or when it is dropped (the client went away).
///
/// For a call a peer forwarded here (`stamp`), the trailers also say from which version of
/// this node's state the call is no longer counted ([`COUNTED_UNTIL`]), read before the task
/// ends: every version before it was published while the call was still counted, so the
/// forwarding router never takes the call off a version that does not count it. A call whose
/// task the service took (its work goes on) gets no stamp.
#[derive(Debug)]
pub(crate) struct CountedBody {
    inner: Body,
    task: Option<CallTask>,
    stamp: Option<Membership>,
}

impl CountedBody {
    pub(crate) fn new(inner: Body, task: CallTask, stamp: Option<Membership>) -> Self {
        let mut body = Self {
            inner,
            task: Some(task),
            stamp,
        };
        // A trailers-only response (an error, or an empty answer) has nothing left to run.
        if body.inner.is_end_stream() {
            body.end();
        }
        body
    }

    fn end(&mut self) {
        if let Some(task) = self.task.take() {
            drop(task.take());
        }
    }
}

impl Drop for CountedBody {
    fn drop(&mut self) {
        self.end();
    }
}

impl HttpBody for CountedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let mut polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &mut polled
            && let Some(trailers) = frame.trailers_mut()
            && let Some(membership) = &self.stamp
            && self.task.as_ref().is_some_and(CallTask::is_held)
        {
            let until = membership.version_counting_current_load();
            trailers.insert(COUNTED_UNTIL, state_version_value(until));
        }
        match &polled {
            Poll::Ready(None | Some(Err(_))) => self.end(),
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => self.end(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.end(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
