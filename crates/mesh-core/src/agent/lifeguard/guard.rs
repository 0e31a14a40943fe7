//! The guard: Lifeguard's state that foca's own calls reach, and the hook where every timer foca
//! submits passes through it.
//!
//! foca has no hook for Lifeguard (Dadgar, Phillips and Currey, 2018), but it asks its runtime
//! for every timer. The runtime (`runtime.rs`) carries the [`Guard`] and hands it each timer
//! ([`Guard::submit`]): probe timers are stretched by the local health score (LHA-Probe), a
//! probe reaching its indirect stage starts the [`ProbeWatch`], and a suspicion timer is held
//! back as one of Lifeguard's own ticks until its dynamic deadline (LHA-Suspicion). The
//! probe cycle is bracketed by [`Guard::begin_cycle`] and [`Guard::end_cycle`], which read the
//! previous probe's outcome into the health score.

use std::time::Duration;

use tokio::time::Instant;

use super::{
    health::LocalHealth, probe_watch::ProbeWatch, suspicion::SuspicionTimeouts,
    suspicion::Suspicions, tick::LifeguardTick,
};
use crate::{
    Identity, Timing,
    agent::timers::{Tick, TimerQueue},
};

/// Lifeguard's state that foca's timers pass through.
#[derive(Debug)]
pub(crate) struct Guard {
    pub(crate) health: LocalHealth,
    pub(crate) suspicions: Suspicions,
    /// The timeouts of a suspicion raised now, for the cluster's current size.
    timeouts: SuspicionTimeouts,
    /// The probe foca is running: its target, and whether it was answered.
    pub(crate) watch: ProbeWatch,
    /// Suspicions foca raised since the loop last looked: their suspects and witnesses are
    /// told once foca returns.
    pub(crate) raised: Vec<(Identity, u16)>,
    /// A probe was started in the previous probe cycle and its outcome is still unknown.
    probe_in_flight: bool,
    /// Within the current call: foca started a probe, or declared the previous one failed.
    probe_started: bool,
    probe_failed: bool,
}

impl Guard {
    pub(crate) fn new(max_health: u8, timeouts: SuspicionTimeouts, probe_period: Duration) -> Self {
        Self {
            health: LocalHealth::new(max_health),
            suspicions: Suspicions::default(),
            timeouts,
            watch: ProbeWatch::new(probe_period),
            raised: Vec::new(),
            probe_in_flight: false,
            probe_started: false,
            probe_failed: false,
        }
    }

    /// A guard for a node alone in its cluster, with `timing`.
    pub(crate) fn with_timing(timing: &Timing) -> Self {
        Self::new(
            timing.max_health_multiplier,
            SuspicionTimeouts::new(timing, 1),
            timing.probe_period,
        )
    }

    /// The cluster now has `size` nodes: suspicions raised from now on time out accordingly.
    pub(crate) fn resized(&mut self, timing: &Timing, size: u32) {
        self.timeouts = SuspicionTimeouts::new(timing, size);
    }

    /// foca is about to run a probe cycle (`Timer::ProbeRandomMember`).
    pub(crate) fn begin_cycle(&mut self) {
        self.probe_started = false;
        self.probe_failed = false;
    }

    /// The probe cycle ran: the previous probe's outcome moves the health score (foca reports a
    /// failure by submitting `Timer::ChangeSuspectToDown` during the cycle, and nothing on
    /// success).
    pub(crate) fn end_cycle(&mut self) {
        if self.probe_in_flight {
            if self.probe_failed {
                self.health.worse();
            } else {
                self.health.better();
            }
        }
        self.probe_in_flight = self.probe_started;
    }

    /// foca submitted `event` at `now`, to run `after` from then: it goes into `timers`,
    /// stretched by the health score if it is a probe timer, or held back until the
    /// suspicion's dynamic deadline if it declares a suspect down.
    pub(crate) fn submit(
        &mut self,
        event: foca::Timer<Identity>,
        after: Duration,
        now: Instant,
        timers: &mut TimerQueue<Tick>,
    ) {
        let after = match &event {
            foca::Timer::ProbeRandomMember(_) => self.health.scale(after),
            foca::Timer::SendIndirectProbe { probed_id, .. } => {
                self.probe_started = true;
                self.watch.started(probed_id.clone(), now);
                self.health.scale(after)
            }
            foca::Timer::ChangeSuspectToDown {
                member_id,
                incarnation,
                ..
            } => {
                self.probe_failed = true;
                let (member, incarnation) = (member_id.clone(), *incarnation);
                let timeouts = self.timeouts;
                let since = self.watch.told_at(&member, incarnation).unwrap_or(now);
                if let Some(due) =
                    self.suspicions
                        .start(&member, incarnation, event, since, timeouts)
                {
                    self.raised.push((member, incarnation));
                    let tick = Tick::Lifeguard(LifeguardTick::Suspicion(due.id));
                    timers.schedule(due.at, tick);
                }
                return;
            }
            _ => after,
        };
        timers.schedule(now + after, Tick::Foca(event));
    }
}
