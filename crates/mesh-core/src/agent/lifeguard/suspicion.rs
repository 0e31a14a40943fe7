//! Dynamic suspicion (Lifeguard's LHA-Suspicion, Dadgar, Phillips and Currey, 2018): the
//! suspicions this node raised, each with a timeout that shrinks from `max` to the nominal
//! `min` as independent witnesses confirm it, `max − (max − min) · ln(c + 1) / ln(k + 1)`
//! after `c` of the `k` expected confirmations (memberlist's `remainingSuspicionTime`).
//!
//! foca submits one timer per suspicion (`Timer::ChangeSuspectToDown`); the
//! [`Guard`](super::guard::Guard) holds it here and the membership task hands it back to foca
//! at the dynamic deadline, and only if the member is still suspected at that incarnation.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    time::Duration,
};

use tokio::time::Instant;

use crate::{Identity, Timing};

/// The timeouts of a suspicion in a cluster of a given size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SuspicionTimeouts {
    /// With every expected confirmation.
    pub(crate) min: Duration,
    /// Without any.
    pub(crate) max: Duration,
    /// Confirmations that bring the timeout down to `min`; 0: `min` from the start.
    pub(crate) expected: u32,
}

impl SuspicionTimeouts {
    /// memberlist's rule: `k` confirmations expected, none if the cluster is too small to give
    /// them (the suspect and ourselves do not count).
    pub(crate) fn new(timing: &Timing, cluster_size: u32) -> Self {
        let min = timing.suspicion_timeout(cluster_size);
        let expected = if cluster_size.saturating_sub(2) < timing.suspicion_confirmations {
            0
        } else {
            timing.suspicion_confirmations
        };
        Self {
            min,
            max: min.mul_f64(timing.suspicion_max_multiplier),
            expected,
        }
    }

    /// The timeout after `confirmations` independent confirmations.
    pub(crate) fn after(&self, confirmations: usize) -> Duration {
        if self.expected == 0 || self.max <= self.min {
            return self.min;
        }
        let fraction = ((confirmations as f64) + 1.0).ln() / (f64::from(self.expected) + 1.0).ln();
        let shrunk = self.max.as_secs_f64() - fraction * (self.max - self.min).as_secs_f64();
        Duration::from_secs_f64(shrunk.max(self.min.as_secs_f64()))
    }
}

/// A suspicion this node raised: its foca timer, held back until the dynamic deadline.
#[derive(Debug)]
struct Suspicion {
    incarnation: u16,
    timer: foca::Timer<Identity>,
    /// When the suspect was first told: the suspicion's timeouts count from here.
    started: Instant,
    deadline: Instant,
    timeouts: SuspicionTimeouts,
    /// Addresses of the witnesses that confirmed.
    confirmed_by: HashSet<SocketAddr>,
    id: u64,
}

/// The suspicions this node raised, by member.
#[derive(Debug, Default)]
pub(crate) struct Suspicions {
    by_member: HashMap<Identity, Suspicion>,
    next_id: u64,
}

/// A suspicion to schedule: the tick id and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Due {
    pub(crate) id: u64,
    pub(crate) at: Instant,
}

impl Suspicions {
    /// foca suspects `member` at `incarnation` and submitted `timer` to declare it down; the
    /// suspect was first told at `since` (now, or earlier in the probe, see
    /// [`ProbeWatch`](super::probe_watch::ProbeWatch)), and its time to refute counts from
    /// then. Returns when to look again, or `None` if this suspicion is already running (foca
    /// submits a timer for every failed probe of a member that is still suspect).
    pub(crate) fn start(
        &mut self,
        member: &Identity,
        incarnation: u16,
        timer: foca::Timer<Identity>,
        since: Instant,
        timeouts: SuspicionTimeouts,
    ) -> Option<Due> {
        if let Some(running) = self.by_member.get(member)
            && running.incarnation >= incarnation
        {
            return None;
        }
        self.next_id += 1;
        let id = self.next_id;
        let deadline = since + timeouts.after(0);
        self.by_member.insert(
            member.clone(),
            Suspicion {
                incarnation,
                timer,
                started: since,
                deadline,
                timeouts,
                confirmed_by: HashSet::new(),
                id,
            },
        );
        Some(Due { id, at: deadline })
    }

    /// Witness `by` confirms that `member` did not answer at `incarnation` either. Returns the
    /// new, earlier deadline if there is one.
    pub(crate) fn confirm(
        &mut self,
        member: &Identity,
        incarnation: u16,
        by: SocketAddr,
    ) -> Option<Due> {
        let suspicion = self.by_member.get_mut(member)?;
        if suspicion.incarnation != incarnation || !suspicion.confirmed_by.insert(by) {
            return None;
        }
        let deadline = suspicion.started + suspicion.timeouts.after(suspicion.confirmed_by.len());
        if deadline < suspicion.deadline {
            suspicion.deadline = deadline;
            return Some(Due {
                id: suspicion.id,
                at: deadline,
            });
        }
        None
    }

    /// The member and incarnation of the running suspicion with tick id `id`.
    pub(crate) fn running(&self, id: u64) -> Option<(Identity, u16)> {
        self.by_member
            .iter()
            .find(|(_, s)| s.id == id)
            .map(|(member, s)| (member.clone(), s.incarnation))
    }

    /// The tick id of the running suspicion of `member` at `incarnation`.
    pub(crate) fn id_of(&self, member: &Identity, incarnation: u16) -> Option<u64> {
        self.by_member
            .get(member)
            .filter(|s| s.incarnation == incarnation)
            .map(|s| s.id)
    }

    /// How many witnesses confirmed the running suspicion of `member`.
    pub(crate) fn confirmations(&self, member: &Identity) -> Option<usize> {
        self.by_member.get(member).map(|s| s.confirmed_by.len())
    }

    /// The suspicion of `member` at `incarnation` or earlier is over (refuted, or the member
    /// went down some other way). Whether one was running.
    pub(crate) fn end(&mut self, member: &Identity, incarnation: u16) -> bool {
        if self
            .by_member
            .get(member)
            .is_some_and(|s| s.incarnation <= incarnation)
        {
            self.by_member.remove(member);
            return true;
        }
        false
    }

    /// The tick `id` is due at `now`: the member, incarnation and foca timer to deliver if its
    /// deadline has come (the tick of a deadline that moved earlier is stale and ignored).
    pub(crate) fn expire(
        &mut self,
        id: u64,
        now: Instant,
    ) -> Option<(Identity, u16, foca::Timer<Identity>)> {
        let member = self
            .by_member
            .iter()
            .find(|(_, s)| s.id == id && s.deadline <= now)
            .map(|(member, _)| member.clone())?;
        let suspicion = self.by_member.remove(&member)?;
        Some((member, suspicion.incarnation, suspicion.timer))
    }

    /// Whether a suspicion of `member` is running.
    #[cfg(test)]
    pub(crate) fn is_running(&self, member: &Identity) -> bool {
        self.by_member.contains_key(member)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::runtime::testing::identity as id;

    fn timeouts(expected: u32) -> SuspicionTimeouts {
        SuspicionTimeouts {
            min: Duration::from_secs(2),
            max: Duration::from_secs(12),
            expected,
        }
    }

    fn timer(member: &Identity, incarnation: u16) -> foca::Timer<Identity> {
        foca::Timer::ChangeSuspectToDown {
            member_id: member.clone(),
            incarnation,
            token: 0,
        }
    }

    #[test]
    fn the_timeout_shrinks_from_max_to_min_with_confirmations() {
        let t = timeouts(2);
        assert_eq!(t.after(0), Duration::from_secs(12));
        // memberlist: max − (max − min) · ln 2 / ln 3 = 12 − 10 · 0.63.
        let one = t.after(1).as_secs_f64();
        assert!(
            (one - (12.0 - 10.0 * 2f64.ln() / 3f64.ln())).abs() < 1e-9,
            "{one}"
        );
        assert_eq!(t.after(2), Duration::from_secs(2));
        assert_eq!(t.after(7), Duration::from_secs(2));
        // Nobody to confirm: the nominal timeout from the start.
        assert_eq!(timeouts(0).after(0), Duration::from_secs(2));
    }

    #[test]
    fn expected_confirmations_follow_the_cluster_size() {
        let mut timing = Timing::lan();
        timing.suspicion_confirmations = 2;
        assert_eq!(SuspicionTimeouts::new(&timing, 3).expected, 0);
        assert_eq!(SuspicionTimeouts::new(&timing, 4).expected, 2);
        let t = SuspicionTimeouts::new(&timing, 100);
        assert_eq!(t.min, timing.suspicion_timeout(100));
        assert_eq!(t.max, t.min.mul_f64(timing.suspicion_max_multiplier));
    }

    #[tokio::test(start_paused = true)]
    async fn confirmations_bring_the_deadline_forward_once_per_witness() {
        let mut suspicions = Suspicions::default();
        let x = id("x", 9, 1);
        let t0 = Instant::now();
        let due = suspicions
            .start(&x, 3, timer(&x, 3), t0, timeouts(2))
            .unwrap();
        assert_eq!(due.at, t0 + Duration::from_secs(12));
        // A second failed probe of the same suspicion does not restart it.
        assert!(
            suspicions
                .start(&x, 3, timer(&x, 3), t0, timeouts(2))
                .is_none()
        );
        let w1: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let w2: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let first = suspicions.confirm(&x, 3, w1).unwrap();
        assert!(first.at < due.at);
        assert!(
            suspicions.confirm(&x, 3, w1).is_none(),
            "one confirmation per witness"
        );
        assert!(
            suspicions.confirm(&x, 2, w2).is_none(),
            "another incarnation"
        );
        let second = suspicions.confirm(&x, 3, w2).unwrap();
        assert_eq!(second.at, t0 + Duration::from_secs(2));
        // Stale ticks are ignored; the due one hands foca's timer over once.
        assert!(
            suspicions
                .expire(due.id, t0 + Duration::from_secs(1))
                .is_none()
        );
        let (member, incarnation, _) = suspicions.expire(second.id, second.at).unwrap();
        assert_eq!((member, incarnation), (x.clone(), 3));
        assert!(suspicions.expire(due.id, due.at).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_refuted_suspicion_is_never_handed_to_foca() {
        let mut suspicions = Suspicions::default();
        let x = id("x", 9, 1);
        let t0 = Instant::now();
        let due = suspicions
            .start(&x, 3, timer(&x, 3), t0, timeouts(0))
            .unwrap();
        assert!(!suspicions.end(&x, 2));
        assert!(
            suspicions.is_running(&x),
            "an older incarnation's refutation"
        );
        assert!(suspicions.end(&x, 3));
        assert!(suspicions.expire(due.id, due.at).is_none());
    }
}
