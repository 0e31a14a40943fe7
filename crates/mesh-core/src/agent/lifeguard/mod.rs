//! Lifeguard ("Lifeguard: Local Health Awareness for More Accurate Failure Detection",
//! Dadgar, Phillips and Currey, 2018), on top of foca's SWIM ("SWIM: Scalable
//! Weakly-consistent Infection-style Process Group Membership Protocol", Das, Gupta and
//! Motivala, 2002).
//!
//! SWIM declares a member down when one node's probes of it fail and nobody refutes in time.
//! Lifeguard observes that most false failures come from the *prober*: a node that is slow,
//! overloaded or losing packets suspects healthy members. It adds three pieces:
//!
//! * **Local health awareness** ([`LocalHealth`](health::LocalHealth), the paper's
//!   LHA-Probe): a score from 0 to
//!   [`Timing::max_health_multiplier`](crate::Timing::max_health_multiplier) that grows when
//!   one of our probes fails or we have to refute a suspicion of ourselves, and shrinks with
//!   every successful probe. Our probe period and probe timeout are stretched by
//!   `1 + score`, so a struggling node probes less often and waits longer for acks instead of
//!   accusing healthy members. foca refuses to change `probe_period` and `probe_rtt` at run
//!   time (`Config::allow_replace`), so the stretching is done where foca's timers are
//!   delivered: `Timer::ProbeRandomMember` and `Timer::SendIndirectProbe` are scheduled
//!   `1 + score` times later than foca asked ([`Guard`](guard::Guard)).
//! * **Dynamic suspicion** ([`Suspicions`](suspicion::Suspicions), LHA-Suspicion): a
//!   suspicion starts with a long timeout (`max`) that shrinks towards the nominal one (`min`)
//!   as independent confirmations arrive, `max − (max − min) · ln(c + 1) / ln(k + 1)` after
//!   `c` of the `k` expected confirmations (memberlist's `remainingSuspicionTime`). A crashed
//!   member is confirmed by everyone who looks and goes down after `min`; a healthy member
//!   suspected by one confused node gets `max` to refute. foca's suspicion is a single timer
//!   (`Timer::ChangeSuspectToDown`, `Config::suspect_to_down_after`) and its suspect updates
//!   carry no originator, so confirmations cannot come from its gossip: the suspecting node
//!   asks `k` random members (*witnesses*) to check the suspect, and each witness that cannot
//!   reach it either confirms ([`Checks`] is the witness's side). The timer
//!   is intercepted where foca submits it ([`Guard`](guard::Guard)) and delivered at the
//!   dynamic deadline, and only if the member is still suspected at that incarnation.
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
//! * **Told before the period ends** ([`ProbeWatch`](probe_watch::ProbeWatch)): SWIM raises a
//!   suspicion only at the end of the probe period, though the outcome is settled well
//!   before: once the direct probe timed out and the indirect probes had a quarter of the rest
//!   of the period without an answer, the target is told, and the suspicion foca raises at
//!   the end of the period is timed from that notice. The suspect has as long to refute as
//!   before, counted from when it was first told, and a crash is declared
//!   `(probe_period − probe_rtt) × 3/4` sooner.
//! * **Down, told directly**: the node whose suspicion times out tells every other member
//!   that the member is down, so a crash reaches the last node one network hop after the
//!   first instead of gossip rounds later. SWIM and memberlist spread a confirmed failure by
//!   gossip only, which at 100 nodes took 0.8 s from the first node to report a crash to the
//!   last (BENCHMARKS.md). foca's gossip still carries the same update, so a lost `Down` is
//!   repaired the usual way.
//!
//! Lifeguard's nacks (an indirect prober telling the requester that it got no answer either,
//! so that *missing* nacks measure the requester's own health) need a message inside foca's
//! indirect probe cycle, which is private to foca (`Message::PingReq`/`IndirectPing` have no
//! hook and there is no `Nack` message); the witnesses above play the nack's other role,
//! independent evidence about the suspect.
//!
//! # Messages
//!
//! Five messages ([`Notice`]) travel in [`Kind::Lifeguard`] datagrams, each about one member
//! at one incarnation; the first four are answered to the datagram's source address:
//!
//! | message | from → to | reaction |
//! |---|---|---|
//! | `Suspected` | prober whose probe went unanswered (before the period ends), suspecting node (every half probe timeout while the suspicion runs) or witness (twice) → suspect | the suspect refutes (foca bumps its incarnation) and answers `Alive` |
//! | `Check` | suspecting node → witness | the witness sends the suspect `Suspected` (twice), then answers `Alive` if it heard back, `Confirm` if not |
//! | `Alive` | suspect → asker, witness → suspecting node | the member is alive at a newer incarnation: applied to foca, which ends the suspicion everywhere it spreads |
//! | `Confirm` | witness → suspecting node | one more independent confirmation: the suspicion's deadline moves closer |
//! | `Down` | suspecting node → every other member, once its suspicion timed out | applied to foca as if gossiped: the member is down at once everywhere instead of a few gossip rounds later |
//!
//! # Where each piece lives
//!
//! | file | piece |
//! |---|---|
//! | `mod.rs` | [`Lifeguard`]: the messages above, Lifeguard's timers, and foca's probe timers passing through |
//! | [`guard`] | [`Guard`](guard::Guard): what foca's runtime carries, where foca's timers are stretched and held back |
//! | [`health`] | the local health score |
//! | [`suspicion`] | dynamic suspicion timeouts and the suspicions we raised |
//! | [`probe_watch`] | the running probe, watched for answers, and early notices |
//! | [`checks`] | checks we run as a witness for others |
//! | [`notice`] | the messages' wire form |
//! | [`tick`] | Lifeguard's own timers |

mod checks;
pub(super) mod guard;
mod health;
pub(crate) mod notice;
mod probe_watch;
pub(super) mod suspicion;
pub(super) mod tick;

use std::net::SocketAddr;

use tokio::time::Instant;

use self::{checks::Checks, notice::Notice, tick::LifeguardTick};
use super::{context::Context, timers::Tick};
use crate::{Identity, transport::Transport, wire::Kind};

/// Lifeguard's part of the membership task: the messages it sends and answers, its timers,
/// and the probe cycle seen from outside foca. The state foca's own calls touch (health,
/// suspicions, the probe watch) is the [`Guard`](guard::Guard) that foca's runtime carries
/// (`cx.io.guard`); the rest is here.
#[derive(Debug, Default)]
pub(super) struct Lifeguard {
    /// Checks we run as a witness for others.
    checks: Checks,
    /// The highest incarnation of ours we were told is suspected (Lifeguard counts each
    /// suspicion of us once against our health, however many tell us).
    refuted_up_to: Option<u16>,
}

impl Lifeguard {
    /// Hands foca one of its timers, watching the probe cycle: the outcome of the previous
    /// probe moves the health score, and a probe reaching its indirect stage may mean its
    /// target is told early.
    pub(super) fn deliver_foca_timer<T: Transport>(
        &mut self,
        cx: &mut Context<T>,
        timer: foca::Timer<Identity>,
    ) {
        let cycle = matches!(timer, foca::Timer::ProbeRandomMember(_));
        let indirect = matches!(timer, foca::Timer::SendIndirectProbe { .. });
        if cycle {
            cx.io.guard.begin_cycle();
        }
        if let Err(error) = cx.foca.handle_timer(timer, cx.io.runtime(cx.now)) {
            tracing::debug!(%error, "foca timer error");
        }
        if cycle {
            cx.io.guard.end_cycle();
        }
        if indirect {
            self.indirect_stage_started(cx);
        }
    }

    /// One of Lifeguard's own timers is due.
    pub(super) fn on_tick<T: Transport>(&mut self, cx: &mut Context<T>, tick: LifeguardTick) {
        match tick {
            LifeguardTick::Suspicion(id) => self.suspicion_due(cx, id),
            LifeguardTick::TellEarly(probe) => self.tell_early(cx, probe),
            LifeguardTick::SuspectAgain(id) => self.suspect_again(cx, id),
            LifeguardTick::CheckRetry(id) => self.check_retry(cx, id),
            LifeguardTick::CheckDue(id) => self.check_due(cx, id),
        }
    }

    /// A datagram for foca arrived: it may answer the running probe.
    pub(super) fn foca_datagram<T: Transport>(&mut self, cx: &mut Context<T>, packet: &[u8]) {
        cx.io.guard.watch.received_datagram(packet, cx.now);
    }

    /// Sets the health-score counter to the current local health score.
    pub(super) fn report_health<T>(&self, cx: &Context<T>) {
        cx.shared
            .counters
            .set_health_score(cx.io.guard.health.score());
    }

    /// Our identity was renewed: its incarnations count from zero again.
    pub(super) fn identity_renewed(&mut self) {
        self.refuted_up_to = None;
    }

    /// Suspicions foca raised during the last call: tell each suspect (buddy system) and ask
    /// witnesses to check it.
    pub(super) fn tell_about_suspicions<T: Transport>(&mut self, cx: &mut Context<T>) {
        let raised = std::mem::take(&mut cx.io.guard.raised);
        for (member, incarnation) in raised {
            cx.shared.counters.suspicion_raised();
            tell_suspect(cx, member.clone(), incarnation);
            if let Some(id) = cx.io.guard.suspicions.id_of(&member, incarnation) {
                let again = cx.now + cx.timing.probe_rtt / 2;
                schedule(cx, again, LifeguardTick::SuspectAgain(id));
            }
            let witnesses = cx.timing.suspicion_confirmations as usize;
            if witnesses == 0 {
                continue;
            }
            let candidates: Vec<SocketAddr> = cx
                .foca
                .iter_members()
                .filter(|m| m.id() != &member && m.state() == foca::State::Alive)
                .map(|m| m.id().addr())
                .collect();
            let check = Notice::Check {
                member: member.clone(),
                incarnation,
            };
            for witness in cx.choose_peers(&candidates, witnesses) {
                send_notice(cx, &check, witness);
            }
        }
    }

    /// A Lifeguard message from `from`.
    pub(super) fn on_notice<T: Transport>(
        &mut self,
        cx: &mut Context<T>,
        notice: Notice,
        from: SocketAddr,
    ) {
        match notice {
            Notice::Suspected {
                member,
                incarnation,
            } => self.suspected(cx, member, incarnation, from),
            Notice::Check {
                member,
                incarnation,
            } => self.check(cx, member, incarnation, from),
            Notice::Alive {
                member,
                incarnation,
            } => self.alive(cx, member, incarnation),
            Notice::Down {
                member,
                incarnation,
            } => told_down(cx, member, incarnation),
            Notice::Confirm {
                member,
                incarnation,
            } => {
                let guard = &mut cx.io.guard;
                let first = guard.suspicions.confirmations(&member) == Some(0);
                if let Some(due) = guard.suspicions.confirm(&member, incarnation, from) {
                    schedule(cx, due.at, LifeguardTick::Suspicion(due.id));
                    if first {
                        // Like Lifeguard's nacks: someone else cannot reach the suspect either,
                        // so our failed probe says nothing about our own health.
                        cx.io.guard.health.better();
                    }
                }
            }
        }
    }

    /// Someone suspects us: refute through foca (which bumps our incarnation and gossips it),
    /// count it against our health once per incarnation, and answer directly.
    fn suspected<T: Transport>(
        &mut self,
        cx: &mut Context<T>,
        member: Identity,
        incarnation: u16,
        from: SocketAddr,
    ) {
        if member != *cx.foca.identity() {
            return; // About a previous life of ours, or not about us at all.
        }
        if self.refuted_up_to.is_none_or(|done| done < incarnation) {
            self.refuted_up_to = Some(incarnation);
            cx.io.guard.health.worse();
            cx.shared.counters.refuted_self();
            let us = foca::Member::new(member.clone(), incarnation, foca::State::Suspect);
            if let Err(error) = cx
                .foca
                .apply_many(std::iter::once(us), true, cx.io.runtime(cx.now))
            {
                tracing::debug!(%error, "refuting a suspicion failed");
            }
        }
        send_notice(
            cx,
            &Notice::Alive {
                member,
                incarnation,
            },
            from,
        );
    }

    /// We are a witness: ask the suspect ourselves, and answer the asker once we know.
    fn check<T: Transport>(
        &mut self,
        cx: &mut Context<T>,
        member: Identity,
        incarnation: u16,
        from: SocketAddr,
    ) {
        if member == *cx.foca.identity() {
            // Asked about ourselves: we are evidently alive.
            self.suspected(cx, member, incarnation, from);
            return;
        }
        let Some(id) = self.checks.ask(&member, incarnation, from) else {
            return;
        };
        tell_suspect(cx, member, incarnation);
        let (now, rtt) = (cx.now, cx.timing.probe_rtt);
        schedule(cx, now + rtt / 2, LifeguardTick::CheckRetry(id));
        schedule(cx, now + rtt, LifeguardTick::CheckDue(id));
    }

    /// `member` proved it is alive above `incarnation`: apply that (ending any suspicion of
    /// it, ours and, through foca's gossip, everyone's) and pass it on to whoever asked us.
    fn alive<T: Transport>(&mut self, cx: &mut Context<T>, member: Identity, incarnation: u16) {
        let active = cx
            .foca
            .iter_members()
            .any(|m| *m.id() == member && m.incarnation() <= incarnation);
        if active && member.addr() != cx.foca.identity().addr() {
            // The suspect bumped its incarnation past `incarnation` before answering.
            let refuted = foca::Member::new(
                member.clone(),
                incarnation.saturating_add(1),
                foca::State::Alive,
            );
            if let Err(error) =
                cx.foca
                    .apply_many(std::iter::once(refuted), true, cx.io.runtime(cx.now))
            {
                tracing::debug!(%error, "applying a refutation failed");
            }
        }
        if cx.io.guard.suspicions.end(&member, incarnation) {
            cx.shared.counters.suspicion_refuted();
        }
        for (asked, asker) in self.checks.answered(&member, incarnation) {
            send_notice(
                cx,
                &Notice::Alive {
                    member: member.clone(),
                    incarnation: asked,
                },
                asker,
            );
        }
    }

    /// A suspicion we raised may be due: hand foca its timer if the member is still suspected
    /// at that incarnation. (foca itself would also deliver it after a refutation, and then
    /// sends the refuted member `TurnUndead`, which makes a healthy node renew its identity.)
    fn suspicion_due<T: Transport>(&mut self, cx: &mut Context<T>, id: u64) {
        let Some((member, incarnation, timer)) = cx.io.guard.suspicions.expire(id, cx.now) else {
            return;
        };
        let still_suspected = cx.foca.iter_members().any(|m| {
            *m.id() == member && m.state() == foca::State::Suspect && m.incarnation() == incarnation
        });
        if !still_suspected {
            return;
        }
        if let Err(error) = cx.foca.handle_timer(timer, cx.io.runtime(cx.now)) {
            tracing::debug!(%error, "foca suspicion timer error");
        }
        if cx.foca.iter_members().all(|m| *m.id() != member) {
            tell_everyone_down(cx, member, incarnation);
        }
    }

    /// Our suspicion `id` is still running: tell the suspect again, and again half a probe
    /// timeout later. Under loss the first notice or its answer is often lost; without
    /// retries a fifth of the suspicions at 30% loss waited for the refutation to arrive by
    /// gossip, which takes longer the larger the cluster. Every half probe timeout rather than
    /// every probe timeout since the suspect is told before the suspicion is raised and the
    /// timeout counts from then: with the longer spacing, 100 nodes at 30% loss declared
    /// about one healthy node down per 100 s (BENCHMARKS.md).
    fn suspect_again<T: Transport>(&mut self, cx: &mut Context<T>, id: u64) {
        let Some((member, incarnation)) = cx.io.guard.suspicions.running(id) else {
            return;
        };
        tell_suspect(cx, member, incarnation);
        let again = cx.now + cx.timing.probe_rtt / 2;
        schedule(cx, again, LifeguardTick::SuspectAgain(id));
    }

    /// foca just reached the indirect stage of a probe: if the direct probe went unanswered,
    /// tell the target early once the indirect probes have had a quarter of the rest of the
    /// period (`probe_watch.rs`).
    fn indirect_stage_started<T: Transport>(&mut self, cx: &mut Context<T>) {
        let watch = &cx.io.guard.watch;
        let probe = watch.current();
        if watch.to_tell(probe, cx.now).is_none() {
            return;
        }
        let share = cx.timing.probe_period.saturating_sub(cx.timing.probe_rtt) / 4;
        let at = cx.now + cx.io.guard.health.scale(share);
        schedule(cx, at, LifeguardTick::TellEarly(probe));
    }

    /// Neither the direct nor the indirect probes of `probe`'s target were answered in time:
    /// tell it now that it is about to be suspected. A suspicion foca raises at the end of the
    /// period counts from this notice; an answer before then averts it.
    fn tell_early<T: Transport>(&mut self, cx: &mut Context<T>, probe: u64) {
        let Some(target) = cx.io.guard.watch.to_tell(probe, cx.now).cloned() else {
            return;
        };
        let Some(incarnation) = cx
            .foca
            .iter_members()
            .find(|m| *m.id() == target)
            .map(foca::Member::incarnation)
        else {
            return;
        };
        tell_suspect(cx, target.clone(), incarnation);
        cx.io.guard.watch.told(target, incarnation, cx.now);
    }

    /// Half the wait has passed without an answer: ask the suspect once more.
    fn check_retry<T: Transport>(&mut self, cx: &mut Context<T>, id: u64) {
        if let Some((member, incarnation)) = self.checks.is_waiting(id) {
            tell_suspect(cx, member, incarnation);
        }
    }

    /// The suspect never answered us either: confirm to everyone who asked.
    fn check_due<T: Transport>(&mut self, cx: &mut Context<T>, id: u64) {
        if let Some((member, incarnation, askers)) = self.checks.timed_out(id) {
            let confirm = Notice::Confirm {
                member,
                incarnation,
            };
            for asker in askers {
                send_notice(cx, &confirm, asker);
            }
        }
    }
}

/// We declared `member` down: tell every other active member directly, so they all drop it
/// one network hop from now instead of after gossip rounds.
fn tell_everyone_down<T: Transport>(cx: &mut Context<T>, member: Identity, incarnation: u16) {
    let down = Notice::Down {
        member,
        incarnation,
    };
    for addr in cx.member_addrs() {
        send_notice(cx, &down, addr);
    }
}

/// A member told us it declared `member` down: apply it like the same update arriving by
/// gossip (foca ignores it if it already knows, and a `Down` about ourselves makes foca
/// renew our identity, as gossip would).
fn told_down<T: Transport>(cx: &mut Context<T>, member: Identity, incarnation: u16) {
    let down = foca::Member::new(member, incarnation, foca::State::Down);
    if let Err(error) = cx
        .foca
        .apply_many(std::iter::once(down), true, cx.io.runtime(cx.now))
    {
        tracing::debug!(%error, "applying a down notice failed");
    }
}

/// Tells `member` that it is suspected at `incarnation` (it refutes and answers).
fn tell_suspect<T: Transport>(cx: &mut Context<T>, member: Identity, incarnation: u16) {
    let addr = member.addr();
    send_notice(
        cx,
        &Notice::Suspected {
            member,
            incarnation,
        },
        addr,
    );
}

fn send_notice<T: Transport>(cx: &mut Context<T>, notice: &Notice, to: SocketAddr) {
    match postcard::to_allocvec(notice) {
        Ok(body) => cx.io.out.send(Kind::Lifeguard, &body, to),
        Err(error) => tracing::debug!(%error, "encoding a lifeguard message failed"),
    }
}

/// Schedules one of Lifeguard's timers in the task's ordered queue.
fn schedule<T>(cx: &mut Context<T>, at: Instant, tick: LifeguardTick) {
    cx.io.timers.schedule(at, Tick::Lifeguard(tick));
}
