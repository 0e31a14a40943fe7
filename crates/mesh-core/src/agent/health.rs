//! Lifeguard ("Lifeguard: Local Health Awareness for More Accurate Failure Detection",
//! Dadgar, Phillips and Currey, 2018), on top of foca.
//!
//! SWIM declares a member down when one node's probes of it fail and nobody refutes in time.
//! Lifeguard observes that most false failures come from the *prober*: a node that is slow,
//! overloaded or losing packets suspects healthy members. It adds three pieces; this module
//! holds their state, `lifeguard.rs` their messages:
//!
//! * **Local health awareness** ([`LocalHealth`], the paper's LHA-Probe): a score from 0 to
//!   [`Timing::max_health_multiplier`](crate::Timing::max_health_multiplier) that grows when
//!   one of our probes fails or we have to refute a suspicion of ourselves, and shrinks with
//!   every successful probe. Our probe period and probe timeout are stretched by
//!   `1 + score`, so a struggling node probes less often and waits longer for acks instead of
//!   accusing healthy members. foca refuses to change `probe_period` and `probe_rtt` at run
//!   time (`Config::allow_replace`), so the stretching is done where foca's timers are
//!   delivered: `Timer::ProbeRandomMember` and `Timer::SendIndirectProbe` are scheduled
//!   `1 + score` times later than foca asked.
//! * **Dynamic suspicion** ([`Suspicions`], LHA-Suspicion): a suspicion starts with a long
//!   timeout (`max`) that shrinks towards the nominal one (`min`) as independent
//!   confirmations arrive, `max − (max − min) · ln(c + 1) / ln(k + 1)` after `c` of the `k`
//!   expected confirmations (memberlist's `remainingSuspicionTime`). A crashed member is
//!   confirmed by everyone who looks and goes down after `min`; a healthy member suspected by
//!   one confused node gets `max` to refute. foca's suspicion is a single timer
//!   (`Timer::ChangeSuspectToDown`, `Config::suspect_to_down_after`) and its suspect updates
//!   carry no originator, so confirmations cannot come from its gossip: the suspecting node
//!   asks `k` random members (*witnesses*) to check the suspect, and each witness that cannot
//!   reach it either confirms. The timer is intercepted where foca submits it and delivered
//!   at the dynamic deadline, and only if the member is still suspected at that incarnation.
//! * **Buddy system**: the suspect is told at once, directly, that it is suspected, and again
//!   every half probe timeout while the suspicion runs; it refutes (foca bumps its
//!   incarnation) and answers the suspecting node, which applies the refutation: one round
//!   trip instead of waiting for gossip to reach the suspect and back. Because refutations
//!   come back directly, the nominal timeout grows with the cluster far less than
//!   memberlist's `4 × log10(n)`
//!   ([`Timing::suspicion_multiplier`](crate::Timing::suspicion_multiplier) explains why).
//!
//! Beyond Lifeguard:
//!
//! * **Told before the period ends** ([`ProbeWatch`]): SWIM raises a suspicion only at the end
//!   of the probe period, though the outcome is settled well before: once the direct probe
//!   timed out and the indirect probes had a quarter of the rest of the period without an
//!   answer, the target is told, and the suspicion foca raises at the end of the period is
//!   timed from that notice. The suspect has as long to refute as before, counted from when
//!   it was first told, and a crash is declared `(probe_period − probe_rtt) × 3/4` sooner.
//! * **Down, told directly**: the node whose suspicion times out tells every other member
//!   that the member is down (`lifeguard.rs`), so a crash reaches the last node one network
//!   hop after the first instead of gossip rounds later.
//!
//! Lifeguard's nacks (an indirect prober telling the requester that it got no answer either,
//! so that *missing* nacks measure the requester's own health) need a message inside foca's
//! indirect probe cycle, which is private to foca (`Message::PingReq`/`IndirectPing` have no
//! hook and there is no `Nack` message); the witnesses above play the nack's other role,
//! independent evidence about the suspect.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    time::Duration,
};

use tokio::time::Instant;

use crate::{Identity, Timing};

/// Lifeguard's local health score: how much this node distrusts its own view of others.
#[derive(Debug, Default)]
pub(crate) struct LocalHealth {
    score: u8,
    max: u8,
}

impl LocalHealth {
    /// A healthy node whose score may grow to `max` (0 turns local health awareness off).
    pub(crate) fn new(max: u8) -> Self {
        Self { score: 0, max }
    }

    /// The current score.
    pub(crate) fn score(&self) -> u8 {
        self.score
    }

    /// How much longer probe timers run: `1 + score`.
    pub(crate) fn scale(&self, after: Duration) -> Duration {
        after * (u32::from(self.score) + 1)
    }

    /// One of our probes failed, or we had to refute a suspicion of ourselves.
    pub(crate) fn worse(&mut self) {
        self.score = self.score.saturating_add(1).min(self.max);
    }

    /// One of our probes succeeded.
    pub(crate) fn better(&mut self) {
        self.score = self.score.saturating_sub(1);
    }
}

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
    /// suspect was first told at `since` (now, or earlier in the probe, see [`ProbeWatch`]),
    /// and its time to refute counts from then. Returns when to look again, or `None` if this
    /// suspicion is already running (foca submits a timer for every failed probe of a member
    /// that is still suspect).
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

/// The probe foca is running, watched from outside (foca keeps its probe state private): whom
/// it probes and whether an answer came back, directly (`Ack`) or through another member
/// (`ForwardedAck`), read from the headers of the datagrams foca receives.
///
/// SWIM raises a suspicion at the end of the probe period, and the suspect's time to refute
/// (the suspicion timeout) only starts then. Once the direct probe has timed out and the
/// indirect probes have had a quarter of what is left of the period (a few network round
/// trips on a LAN) without an answer, the outcome is all but settled: the suspect is told
/// then, and a suspicion foca raises at the end of the period is timed from that notice. The
/// suspect gets the same time to refute as before, counted from when it was first told; a
/// crashed member is declared down `(probe_period − probe_rtt) × 3/4` sooner (0.225 s with
/// lan timing, 0.375 s with 1 s probes); a member that answers the notice before the period
/// ends is never suspected at all, because its refutation raises its incarnation above the
/// one foca's failed probe would suspect.
///
/// A member whose answers are late but still inside the period (a round trip between the
/// probe timeout and the period) would be told needlessly at every probe, refute every time
/// and see its health score pinned at the maximum. So a member that answers after being told
/// early is not told early again for [`ProbeWatch::LATE_FOR`] probe periods: its suspicions
/// run the SWIM way, from the end of the period. (In the simulator, a node 450 ms away each
/// way refuted 62 times in 100 s, its health score at 8, without this memory, against never
/// before the early notice existed.)
#[derive(Debug)]
pub(crate) struct ProbeWatch {
    /// Counts probes, so that a late tick of an earlier probe is recognised.
    probe: u64,
    target: Option<Identity>,
    answered: bool,
    /// The member told early in the current probe, at which incarnation and when.
    told: Option<(Identity, u16, Instant)>,
    /// Members that answered after being told early, and until when they are not told early.
    late: HashMap<Identity, Instant>,
    /// How long a late answer is remembered.
    late_for: Duration,
}

impl ProbeWatch {
    /// Probe periods for which a member that answered after an early notice gets none.
    pub(crate) const LATE_FOR: u32 = 100;

    /// A watch for probes run every `probe_period`.
    pub(crate) fn new(probe_period: Duration) -> Self {
        Self {
            probe: 0,
            target: None,
            answered: false,
            told: None,
            late: HashMap::new(),
            late_for: probe_period * Self::LATE_FOR,
        }
    }

    /// foca started probing `target` at `now`.
    pub(crate) fn started(&mut self, target: Identity, now: Instant) {
        self.probe += 1;
        self.target = Some(target);
        self.answered = false;
        self.told = None;
        self.late.retain(|_, until| *until > now);
    }

    /// A datagram for foca arrived: an answer to the running probe? (Its header is read here
    /// and again by foca, but only while the probe waits for an answer, which on a LAN is
    /// the first millisecond or so of each period; one that cannot be read is foca's to
    /// reject.)
    pub(crate) fn received_datagram(&mut self, mut datagram: &[u8], now: Instant) {
        if self.target.is_none() || self.answered {
            return;
        }
        if let Ok(header) =
            foca::Codec::<Identity>::decode_header(&mut foca::PostcardCodec, &mut datagram)
        {
            self.received(&header, now);
        }
    }

    /// An answer is any `Ack` from the target or `ForwardedAck` about it: a little more than
    /// foca accepts (it also checks the probe number and who forwards), so that we never tell
    /// a target whose probe foca considers answered.
    fn received(&mut self, header: &foca::Header<Identity>, now: Instant) {
        let Some(target) = &self.target else {
            return;
        };
        let answer = match &header.message {
            foca::Message::Ack(_) => header.src == *target,
            foca::Message::ForwardedAck { origin, .. } => origin == target,
            _ => false,
        };
        if !answer {
            return;
        }
        self.answered = true;
        if self.told.as_ref().is_some_and(|(m, _, _)| m == target) {
            self.late.insert(target.clone(), now + self.late_for);
        }
    }

    /// The target of probe number `probe`, to be told early: that probe is still running,
    /// nothing answered it yet, and the target has not answered late recently.
    pub(crate) fn to_tell(&self, probe: u64, now: Instant) -> Option<&Identity> {
        self.target.as_ref().filter(|target| {
            self.probe == probe
                && !self.answered
                && self.late.get(*target).is_none_or(|until| *until <= now)
        })
    }

    /// The number of the running probe.
    pub(crate) fn current(&self) -> u64 {
        self.probe
    }

    /// We told `member` at `incarnation`, at `at`, that it is about to be suspected.
    pub(crate) fn told(&mut self, member: Identity, incarnation: u16, at: Instant) {
        self.told = Some((member, incarnation, at));
    }

    /// When `member` was told early of the suspicion foca now raises at `incarnation`, if it
    /// was, in this probe.
    pub(crate) fn told_at(&mut self, member: &Identity, incarnation: u16) -> Option<Instant> {
        self.told
            .take_if(|(m, i, _)| m == member && *i == incarnation)
            .map(|(_, _, at)| at)
    }
}

/// Checks this node runs as a witness for others: who asked, and until when the suspect may
/// answer.
#[derive(Debug, Default)]
pub(crate) struct Checks {
    by_member: HashMap<(Identity, u16), Check>,
    next_id: u64,
}

#[derive(Debug)]
struct Check {
    askers: Vec<SocketAddr>,
    id: u64,
}

impl Checks {
    /// `asker` wants `member` checked at `incarnation`. Returns the id of a new check to time
    /// out, `None` if one is already running (the asker is added to it).
    pub(crate) fn ask(
        &mut self,
        member: &Identity,
        incarnation: u16,
        asker: SocketAddr,
    ) -> Option<u64> {
        let key = (member.clone(), incarnation);
        if let Some(check) = self.by_member.get_mut(&key) {
            if !check.askers.contains(&asker) {
                check.askers.push(asker);
            }
            return None;
        }
        self.next_id += 1;
        self.by_member.insert(
            key,
            Check {
                askers: vec![asker],
                id: self.next_id,
            },
        );
        Some(self.next_id)
    }

    /// `member` answered: the askers of every check of it at `incarnation` or earlier, who
    /// should hear so.
    pub(crate) fn answered(
        &mut self,
        member: &Identity,
        incarnation: u16,
    ) -> Vec<(u16, SocketAddr)> {
        let keys: Vec<(Identity, u16)> = self
            .by_member
            .keys()
            .filter(|(m, i)| m == member && *i <= incarnation)
            .cloned()
            .collect();
        let mut askers = Vec::new();
        for key in keys {
            if let Some(check) = self.by_member.remove(&key) {
                askers.extend(check.askers.into_iter().map(|a| (key.1, a)));
            }
        }
        askers
    }

    /// Check `id` timed out without an answer: the member, incarnation and askers to confirm
    /// to.
    pub(crate) fn timed_out(&mut self, id: u64) -> Option<(Identity, u16, Vec<SocketAddr>)> {
        let key = self
            .by_member
            .iter()
            .find(|(_, c)| c.id == id)
            .map(|(k, _)| k.clone())?;
        let check = self.by_member.remove(&key)?;
        Some((key.0, key.1, check.askers))
    }

    /// Whether check `id` still waits for an answer.
    pub(crate) fn is_waiting(&self, id: u64) -> Option<(Identity, u16)> {
        self.by_member
            .iter()
            .find(|(_, c)| c.id == id)
            .map(|(k, _)| k.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::super::runtime::testing::identity as id;
    use super::*;

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
    fn local_health_stretches_probes_up_to_its_maximum() {
        let mut health = LocalHealth::new(3);
        let period = Duration::from_secs(1);
        assert_eq!(health.scale(period), period);
        for _ in 0..5 {
            health.worse();
        }
        assert_eq!(health.score(), 3);
        assert_eq!(health.scale(period), Duration::from_secs(4));
        health.better();
        assert_eq!(health.scale(period), Duration::from_secs(3));
        let mut off = LocalHealth::new(0);
        off.worse();
        assert_eq!(off.scale(period), period);
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

    #[test]
    fn a_witness_answers_every_asker_once() {
        let mut checks = Checks::default();
        let x = id("x", 9, 1);
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let first = checks.ask(&x, 3, a).unwrap();
        assert!(checks.ask(&x, 3, b).is_none());
        assert!(checks.ask(&x, 3, a).is_none());
        assert_eq!(checks.is_waiting(first), Some((x.clone(), 3)));
        let other = checks.ask(&x, 4, a).unwrap();
        assert_eq!(checks.answered(&x, 3), [(3, a), (3, b)]);
        assert!(checks.is_waiting(first).is_none());
        assert_eq!(checks.timed_out(other), Some((x, 4, vec![a])));
    }
}
