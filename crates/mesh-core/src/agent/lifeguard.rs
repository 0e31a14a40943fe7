//! Lifeguard's messages: telling a suspect it is suspected (buddy system), asking witnesses
//! to check it, carrying refutations and confirmations back, and telling every member when a
//! suspect was declared down (see `health.rs` for the algorithm and what foca does not
//! offer).
//!
//! Five messages travel in [`Kind::Lifeguard`] datagrams, each about one member at one
//! incarnation; the first four are answered to the datagram's source address:
//!
//! | message | from → to | reaction |
//! |---|---|---|
//! | `Suspected` | prober whose probe went unanswered (before the period ends), suspecting node (every half probe timeout while the suspicion runs) or witness (twice) → suspect | the suspect refutes (foca bumps its incarnation) and answers `Alive` |
//! | `Check` | suspecting node → witness | the witness sends the suspect `Suspected` (twice), then answers `Alive` if it heard back, `Confirm` if not |
//! | `Alive` | suspect → asker, witness → suspecting node | the member is alive at a newer incarnation: applied to foca, which ends the suspicion everywhere it spreads |
//! | `Confirm` | witness → suspecting node | one more independent confirmation: the suspicion's deadline moves closer |
//! | `Down` | suspecting node → every other member, once its suspicion timed out | applied to foca as if gossiped: the member is down at once everywhere instead of a few gossip rounds later |
//!
//! `Down` is not Lifeguard's: SWIM and memberlist spread a confirmed failure by gossip only,
//! which at 100 nodes took 0.8 s from the first node to report a crash to the last
//! (BENCHMARKS.md). One datagram per member per declared crash, sent by the one node that
//! declared it, makes that one network hop. foca's gossip still carries the same update, so a
//! lost `Down` is repaired the usual way.
use std::net::SocketAddr;

use super::{Agent, notice::Notice, timers::Tick};
use crate::{Identity, transport::Transport, wire::Kind};

impl<T: Transport> Agent<T> {
    fn send_notice(&mut self, notice: &Notice, to: SocketAddr) {
        match postcard::to_allocvec(notice) {
            Ok(body) => self.cx.io.out.send(Kind::Lifeguard, &body, to),
            Err(error) => tracing::debug!(%error, "encoding a lifeguard message failed"),
        }
    }

    /// Tells `member` that it is suspected at `incarnation` (it refutes and answers).
    fn tell_suspect(&mut self, member: Identity, incarnation: u16) {
        let addr = member.addr();
        self.send_notice(
            &Notice::Suspected {
                member,
                incarnation,
            },
            addr,
        );
    }

    /// Suspicions foca raised during the last call: tell each suspect (buddy system) and ask
    /// witnesses to check it.
    pub(super) fn tell_about_suspicions(&mut self) {
        let raised = std::mem::take(&mut self.cx.io.guard.raised);
        for (member, incarnation) in raised {
            self.cx.shared.counters.suspicion_raised();
            self.tell_suspect(member.clone(), incarnation);
            if let Some(id) = self.cx.io.guard.suspicions.id_of(&member, incarnation) {
                let again = self.cx.now + self.cx.timing.probe_rtt / 2;
                self.cx.io.timers.schedule(again, Tick::SuspectAgain(id));
            }
            let witnesses = self.cx.timing.suspicion_confirmations as usize;
            if witnesses == 0 {
                continue;
            }
            let candidates: Vec<SocketAddr> = self
                .cx
                .foca
                .iter_members()
                .filter(|m| m.id() != &member && m.state() == foca::State::Alive)
                .map(|m| m.id().addr())
                .collect();
            let check = Notice::Check {
                member: member.clone(),
                incarnation,
            };
            for witness in self.cx.choose_peers(&candidates, witnesses) {
                self.send_notice(&check, witness);
            }
        }
    }

    pub(super) fn on_notice(&mut self, notice: Notice, from: SocketAddr) {
        match notice {
            Notice::Suspected {
                member,
                incarnation,
            } => self.suspected(member, incarnation, from),
            Notice::Check {
                member,
                incarnation,
            } => self.check(member, incarnation, from),
            Notice::Alive {
                member,
                incarnation,
            } => self.alive(member, incarnation),
            Notice::Down {
                member,
                incarnation,
            } => self.told_down(member, incarnation),
            Notice::Confirm {
                member,
                incarnation,
            } => {
                let first = self.cx.io.guard.suspicions.confirmations(&member) == Some(0);
                if let Some(due) = self
                    .cx
                    .io
                    .guard
                    .suspicions
                    .confirm(&member, incarnation, from)
                {
                    self.cx.io.timers.schedule(due.at, Tick::Suspicion(due.id));
                    if first {
                        // Like Lifeguard's nacks: someone else cannot reach the suspect either,
                        // so our failed probe says nothing about our own health.
                        self.cx.io.guard.health.better();
                    }
                }
            }
        }
    }

    /// Someone suspects us: refute through foca (which bumps our incarnation and gossips it),
    /// count it against our health once per incarnation, and answer directly.
    fn suspected(&mut self, member: Identity, incarnation: u16, from: SocketAddr) {
        if member != *self.cx.foca.identity() {
            return; // About a previous life of ours, or not about us at all.
        }
        if self.refuted_up_to.is_none_or(|done| done < incarnation) {
            self.refuted_up_to = Some(incarnation);
            self.cx.io.guard.health.worse();
            self.cx.shared.counters.refuted_self();
            let us = foca::Member::new(member.clone(), incarnation, foca::State::Suspect);
            if let Err(error) =
                self.cx
                    .foca
                    .apply_many(std::iter::once(us), true, self.cx.io.runtime(self.cx.now))
            {
                tracing::debug!(%error, "refuting a suspicion failed");
            }
        }
        self.send_notice(
            &Notice::Alive {
                member,
                incarnation,
            },
            from,
        );
    }

    /// We are a witness: ask the suspect ourselves, and answer the asker once we know.
    fn check(&mut self, member: Identity, incarnation: u16, from: SocketAddr) {
        if member == *self.cx.foca.identity() {
            // Asked about ourselves: we are evidently alive.
            self.suspected(member, incarnation, from);
            return;
        }
        let Some(id) = self.cx.io.guard.checks.ask(&member, incarnation, from) else {
            return;
        };
        self.tell_suspect(member, incarnation);
        let rtt = self.cx.timing.probe_rtt;
        self.cx
            .io
            .timers
            .schedule(self.cx.now + rtt / 2, Tick::CheckRetry(id));
        self.cx
            .io
            .timers
            .schedule(self.cx.now + rtt, Tick::CheckDue(id));
    }

    /// `member` proved it is alive above `incarnation`: apply that (ending any suspicion of
    /// it, ours and, through foca's gossip, everyone's) and pass it on to whoever asked us.
    fn alive(&mut self, member: Identity, incarnation: u16) {
        let active = self
            .cx
            .foca
            .iter_members()
            .any(|m| *m.id() == member && m.incarnation() <= incarnation);
        if active && member.addr() != self.cx.foca.identity().addr() {
            // The suspect bumped its incarnation past `incarnation` before answering.
            let refuted = foca::Member::new(
                member.clone(),
                incarnation.saturating_add(1),
                foca::State::Alive,
            );
            if let Err(error) = self.cx.foca.apply_many(
                std::iter::once(refuted),
                true,
                self.cx.io.runtime(self.cx.now),
            ) {
                tracing::debug!(%error, "applying a refutation failed");
            }
        }
        if self.cx.io.guard.suspicions.end(&member, incarnation) {
            self.cx.shared.counters.suspicion_refuted();
        }
        for (asked, asker) in self.cx.io.guard.checks.answered(&member, incarnation) {
            self.send_notice(
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
    pub(super) fn suspicion_due(&mut self, id: u64) {
        let Some((member, incarnation, timer)) =
            self.cx.io.guard.suspicions.expire(id, self.cx.now)
        else {
            return;
        };
        let still_suspected = self.cx.foca.iter_members().any(|m| {
            *m.id() == member && m.state() == foca::State::Suspect && m.incarnation() == incarnation
        });
        if !still_suspected {
            return;
        }
        if let Err(error) = self
            .cx
            .foca
            .handle_timer(timer, self.cx.io.runtime(self.cx.now))
        {
            tracing::debug!(%error, "foca suspicion timer error");
        }
        if self.cx.foca.iter_members().all(|m| *m.id() != member) {
            self.tell_everyone_down(member, incarnation);
        }
    }

    /// We declared `member` down: tell every other active member directly, so they all drop it
    /// one network hop from now instead of after gossip rounds.
    fn tell_everyone_down(&mut self, member: Identity, incarnation: u16) {
        let down = Notice::Down {
            member,
            incarnation,
        };
        let members = self.cx.member_addrs();
        for addr in members {
            self.send_notice(&down, addr);
        }
    }

    /// A member told us it declared `member` down: apply it like the same update arriving by
    /// gossip (foca ignores it if it already knows, and a `Down` about ourselves makes foca
    /// renew our identity, as gossip would).
    fn told_down(&mut self, member: Identity, incarnation: u16) {
        let down = foca::Member::new(member, incarnation, foca::State::Down);
        if let Err(error) =
            self.cx
                .foca
                .apply_many(std::iter::once(down), true, self.cx.io.runtime(self.cx.now))
        {
            tracing::debug!(%error, "applying a down notice failed");
        }
    }

    /// Our suspicion `id` is still running: tell the suspect again, and again half a probe
    /// timeout later. Under loss the first notice or its answer is often lost; without
    /// retries a fifth of the suspicions at 30% loss waited for the refutation to arrive by
    /// gossip, which takes longer the larger the cluster. Every half probe timeout rather than
    /// every probe timeout since the suspect is told before the suspicion is raised and the
    /// timeout counts from then: with the longer spacing, 100 nodes at 30% loss declared
    /// about one healthy node down per 100 s (BENCHMARKS.md).
    pub(super) fn suspect_again(&mut self, id: u64) {
        let Some((member, incarnation)) = self.cx.io.guard.suspicions.running(id) else {
            return;
        };
        self.tell_suspect(member, incarnation);
        let again = self.cx.now + self.cx.timing.probe_rtt / 2;
        self.cx.io.timers.schedule(again, Tick::SuspectAgain(id));
    }

    /// foca just reached the indirect stage of a probe: if the direct probe went unanswered,
    /// tell the target early once the indirect probes have had a quarter of the rest of the
    /// period (`health::ProbeWatch`).
    pub(super) fn indirect_stage_started(&mut self) {
        let watch = &self.cx.io.guard.watch;
        let probe = watch.current();
        if watch.to_tell(probe, self.cx.now).is_none() {
            return;
        }
        let share = self
            .cx
            .timing
            .probe_period
            .saturating_sub(self.cx.timing.probe_rtt)
            / 4;
        let at = self.cx.now + self.cx.io.guard.health.scale(share);
        self.cx.io.timers.schedule(at, Tick::TellEarly(probe));
    }

    /// Neither the direct nor the indirect probes of `probe`'s target were answered in time:
    /// tell it now that it is about to be suspected. A suspicion foca raises at the end of the
    /// period counts from this notice; an answer before then averts it.
    pub(super) fn tell_early(&mut self, probe: u64) {
        let Some(target) = self.cx.io.guard.watch.to_tell(probe, self.cx.now).cloned() else {
            return;
        };
        let Some(incarnation) = self
            .cx
            .foca
            .iter_members()
            .find(|m| *m.id() == target)
            .map(foca::Member::incarnation)
        else {
            return;
        };
        self.tell_suspect(target.clone(), incarnation);
        self.cx
            .io
            .guard
            .watch
            .told(target, incarnation, self.cx.now);
    }

    /// Half the wait has passed without an answer: ask the suspect once more.
    pub(super) fn check_retry(&mut self, id: u64) {
        if let Some((member, incarnation)) = self.cx.io.guard.checks.is_waiting(id) {
            self.tell_suspect(member, incarnation);
        }
    }

    /// The suspect never answered us either: confirm to everyone who asked.
    pub(super) fn check_due(&mut self, id: u64) {
        if let Some((member, incarnation, askers)) = self.cx.io.guard.checks.timed_out(id) {
            let confirm = Notice::Confirm {
                member,
                incarnation,
            };
            for asker in askers {
                self.send_notice(&confirm, asker);
            }
        }
    }
}
