//! The probe foca is running, watched from outside foca: whom it probes and whether an
//! answer came back, so that a target whose probe went unanswered is told early that it is
//! about to be suspected (beyond Lifeguard; see [`ProbeWatch`]).

use std::{collections::HashMap, time::Duration};

use tokio::time::Instant;

use crate::Identity;

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
