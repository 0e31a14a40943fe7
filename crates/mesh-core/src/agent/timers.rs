//! Timer dispatch: one scheduler for every timer of the membership task, delivering in
//! deadline order, and the ticks it delivers.
//!
//! Spawning a sleep per timer lets the runtime wake them in any order once they are due
//! together, which confuses foca's probe cycle (foca issue #26). Keeping them in one heap,
//! ordered by deadline and then by submission, delivers them exactly in order.

use std::{cmp::Ordering, collections::BinaryHeap, time::Duration};

use tokio::time::Instant;

use super::lifeguard::tick::LifeguardTick;
use crate::{Identity, Timing};

/// Timers of the membership task; foca's own are one kind among them.
#[derive(Debug)]
pub(crate) enum Tick {
    Foca(foca::Timer<Identity>),
    /// Publish our state now (a coalesced change whose rate limit has passed).
    Publish,
    /// Second round of leave notices, then stop.
    FinishLeave,
    /// Work that comes back on its own period.
    Every(Periodic),
    /// Publish the coalesced view.
    View,
    /// One of Lifeguard's own timers (`lifeguard/`).
    Lifeguard(LifeguardTick),
}

/// The periodic work of the membership task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Periodic {
    /// Announce to discovered addresses if we are not part of a cluster.
    Rejoin,
    /// Suspect detection, pruning.
    Maintenance,
    /// Re-send our current state (anti-entropy).
    Refresh,
}

impl Periodic {
    /// In the order they are first scheduled.
    pub(crate) const ALL: [Periodic; 3] =
        [Periodic::Rejoin, Periodic::Maintenance, Periodic::Refresh];

    /// How long after it ran it runs again.
    pub(crate) fn period(self, timing: &Timing) -> Duration {
        match self {
            Periodic::Rejoin => timing.rejoin_interval,
            Periodic::Maintenance => timing.probe_period,
            Periodic::Refresh => timing.state_refresh_interval,
        }
    }

    /// When it first runs after a start at `now`: rejoining at once, the rest after a period.
    pub(crate) fn first_run(self, now: Instant, timing: &Timing) -> Instant {
        match self {
            Periodic::Rejoin => now,
            other => now + other.period(timing),
        }
    }
}

pub(crate) struct TimerQueue<E> {
    heap: BinaryHeap<Scheduled<E>>,
    next_seq: u64,
}

struct Scheduled<E> {
    at: Instant,
    seq: u64,
    event: E,
}

impl<E> PartialEq for Scheduled<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl<E> Eq for Scheduled<E> {}

impl<E> PartialOrd for Scheduled<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<E> Ord for Scheduled<E> {
    // Reversed: BinaryHeap is a max-heap and we want the earliest deadline first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

impl<E> TimerQueue<E> {
    pub(crate) fn new() -> Self {
        Self {
            heap: BinaryHeap::new(),
            next_seq: 0,
        }
    }

    pub(crate) fn schedule(&mut self, at: Instant, event: E) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.heap.push(Scheduled { at, seq, event });
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|s| s.at)
    }

    /// The earliest event due at `now`, if any.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<E> {
        if self.heap.peek()?.at <= now {
            self.heap.pop().map(|s| s.event)
        } else {
            None
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periodic_work_starts_in_order_and_rejoins_at_once() {
        let timing = Timing::local();
        let t0 = Instant::now();
        let mut q = TimerQueue::new();
        for work in Periodic::ALL {
            q.schedule(work.first_run(t0, &timing), Tick::Every(work));
        }
        assert_eq!(q.next_deadline(), Some(t0));
        let due: Vec<_> = std::iter::from_fn(|| q.pop_due(t0 + Duration::from_secs(60)))
            .map(|tick| match tick {
                Tick::Every(work) => work,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        // Probe period (200 ms) before state refresh (500 ms) in the local preset.
        assert_eq!(
            due,
            [Periodic::Rejoin, Periodic::Maintenance, Periodic::Refresh]
        );
        assert_eq!(
            Periodic::Refresh.period(&timing),
            timing.state_refresh_interval
        );
    }

    #[tokio::test(start_paused = true)]
    async fn delivers_by_deadline_then_submission_order() {
        let mut q = TimerQueue::new();
        let t0 = Instant::now();
        q.schedule(t0 + Duration::from_millis(30), "c");
        q.schedule(t0 + Duration::from_millis(10), "a");
        q.schedule(t0 + Duration::from_millis(30), "d");
        q.schedule(t0 + Duration::from_millis(20), "b");
        assert_eq!(q.next_deadline(), Some(t0 + Duration::from_millis(10)));
        assert_eq!(q.pop_due(t0), None);
        let later = t0 + Duration::from_millis(100);
        let order: Vec<_> = std::iter::from_fn(|| q.pop_due(later)).collect();
        assert_eq!(order, ["a", "b", "c", "d"]);
        assert_eq!(q.len(), 0);
    }
}
