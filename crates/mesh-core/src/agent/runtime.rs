//! foca's door to the world ([`foca::Runtime`]): datagrams are sealed in the envelope and
//! written without blocking, timers go to the ordered queue, and notifications are collected for
//! the loop to handle once foca returns.
//!
//! Everything foca writes to lives in [`Io`], apart from foca itself, so the two can be borrowed
//! side by side (`self.foca.handle_data(body, self.io.runtime(now))`). This follows foca's own
//! UDP example (`examples/foca_insecure_udp_agent.rs`), with the sends done directly instead of
//! through a channel.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use foca::{Foca, OwnedNotification, PostcardCodec};
use rand::{SeedableRng, rngs::StdRng};
use tokio::time::Instant;

use super::{
    lifeguard::guard::Guard,
    timers::{Tick, TimerQueue},
};
use crate::{
    Identity,
    budget::GossipBudget,
    handle_state::Shared,
    state_table::StateGossip,
    transport::Transport,
    wire::{Envelope, Kind, MAX_DATAGRAM},
};

/// The foca the membership task runs: our identity, postcard on the wire, node states as
/// custom broadcasts.
pub(crate) type FocaInstance = Foca<Identity, PostcardCodec, StdRng, StateGossip>;

/// Sends datagrams: seals them in the envelope and writes without blocking.
pub(crate) struct Outbound<T> {
    transport: Arc<T>,
    envelope: Envelope,
    buf: Vec<u8>,
    shared: Arc<Shared>,
    /// The last datagram could not be sealed: warn once per failing stretch, not per datagram.
    sealing_failed: bool,
}

impl<T: Transport> Outbound<T> {
    pub(crate) fn new(transport: Arc<T>, envelope: Envelope, shared: Arc<Shared>) -> Self {
        Self {
            transport,
            envelope,
            buf: Vec::with_capacity(MAX_DATAGRAM),
            shared,
            sealing_failed: false,
        }
    }

    /// Bytes of foca payload that fit in one datagram with this envelope.
    pub(crate) fn max_payload(&self) -> usize {
        MAX_DATAGRAM - self.envelope.overhead()
    }

    pub(crate) fn send(&mut self, kind: Kind, body: &[u8], to: SocketAddr) {
        if let Err(error) = self.envelope.seal(kind, body, &mut self.buf) {
            self.shared.counters.seal_failed();
            if !self.sealing_failed {
                tracing::warn!(%error, "cannot seal datagrams; dropping them until this recovers");
            }
            self.sealing_failed = true;
            return;
        }
        if self.sealing_failed {
            tracing::info!("sealing datagrams works again");
            self.sealing_failed = false;
        }
        match self.transport.try_send_to(&self.buf, to) {
            Ok(len) => self.shared.counters.sent(Some(len)),
            Err(error) => {
                self.shared.counters.sent(None);
                tracing::debug!(%to, %kind, %error, "datagram not sent");
            }
        }
    }
}

/// What foca's runtime writes to: the outbound socket, the timer queue, Lifeguard's guard and
/// the notifications waiting to be handled.
pub(crate) struct Io<T> {
    pub(crate) out: Outbound<T>,
    /// Charged for every foca datagram that was allowed to carry states.
    pub(crate) budget: GossipBudget,
    pub(crate) timers: TimerQueue<Tick>,
    /// Lifeguard's state that foca's timers pass through (`lifeguard/guard.rs`).
    pub(crate) guard: Guard,
    notes: Vec<OwnedNotification<Identity>>,
}

impl<T: Transport> Io<T> {
    pub(crate) fn new(out: Outbound<T>, guard: Guard, budget: GossipBudget) -> Self {
        Self {
            out,
            budget,
            timers: TimerQueue::new(),
            guard,
            notes: Vec::new(),
        }
    }

    /// foca's runtime for one call made at `now`.
    pub(crate) fn runtime(&mut self, now: Instant) -> Effects<'_, T> {
        Effects { now, io: self }
    }

    /// The notifications foca produced since the last call, in order.
    pub(crate) fn take_notes(&mut self) -> Vec<OwnedNotification<Identity>> {
        std::mem::take(&mut self.notes)
    }
}

/// foca's [`foca::Runtime`] for one call: sends directly, schedules into the ordered queue, and
/// collects notifications for processing once foca returns.
pub(crate) struct Effects<'a, T> {
    now: Instant,
    io: &'a mut Io<T>,
}

impl<T: Transport> foca::Runtime<Identity> for Effects<'_, T> {
    fn notify(&mut self, notification: foca::Notification<'_, Identity>) {
        self.io.notes.push(notification.to_owned());
    }

    fn send_to(&mut self, to: Identity, data: &[u8]) {
        self.io.budget.sent(data);
        self.io.out.send(Kind::Foca, data, to.addr());
    }

    /// Lifeguard sits here: probe timers are stretched by the local health score, and
    /// suspicion timers are held back until their dynamic deadline (`lifeguard/guard.rs`).
    fn submit_after(&mut self, event: foca::Timer<Identity>, after: Duration) {
        let io = &mut *self.io;
        io.guard.submit(event, after, self.now, &mut io.timers);
    }
}

/// Two independent generators (foca's, and ours for push targets) from `seed`, or from the
/// operating system.
pub(crate) fn generators(seed: Option<u64>) -> (StdRng, StdRng) {
    match seed {
        Some(seed) => (
            StdRng::seed_from_u64(seed),
            StdRng::seed_from_u64(seed.wrapping_add(0x9e37_79b9_7f4a_7c15)),
        ),
        None => (os_seeded(), os_seeded()),
    }
}

/// A generator seeded by the operating system, or by the clock if that fails: gossip needs
/// spread, not secrecy, and starting must not panic.
fn os_seeded() -> StdRng {
    StdRng::try_from_rng(&mut rand::rngs::SysRng).unwrap_or_else(|error| {
        tracing::warn!(%error, "the operating system's random source failed; seeding from the clock");
        StdRng::seed_from_u64(crate::identity::generation_now() ^ u64::from(std::process::id()))
    })
}

#[cfg(test)]
pub(crate) mod testing {
    //! A transport that records what is sent, for driving the membership task's parts
    //! without sockets.
    use std::{
        io,
        net::SocketAddr,
        sync::{Arc, Mutex},
    };

    use crate::{
        LoadTracker,
        handle_state::{LocalFields, Shared},
        transport::Transport,
        view::MembershipView,
        wire::{Envelope, Kind, MAX_DATAGRAM},
    };

    /// Every datagram handed to it, in order; receives nothing.
    #[derive(Debug, Default)]
    pub(crate) struct Recorder {
        pub(crate) sent: Mutex<Vec<(Vec<u8>, SocketAddr)>>,
    }

    impl Recorder {
        /// The opened datagrams sent so far: (kind, body, to).
        pub(crate) fn opened(&self) -> Vec<(Kind, Vec<u8>, SocketAddr)> {
            let mut scratch = [0; MAX_DATAGRAM];
            let sent = self.sent.lock().unwrap();
            sent.iter()
                .map(|(datagram, to)| {
                    let (kind, body) = Envelope::plain().open(datagram, &mut scratch).unwrap();
                    (kind, body.to_vec(), *to)
                })
                .collect()
        }
    }

    impl Transport for Recorder {
        fn local_addr(&self) -> io::Result<SocketAddr> {
            Ok(SocketAddr::from(([127, 0, 0, 1], 1)))
        }

        async fn recv_from(&self, _buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
            std::future::pending().await
        }

        fn try_send_to(&self, datagram: &[u8], target: SocketAddr) -> io::Result<usize> {
            self.sent.lock().unwrap().push((datagram.to_vec(), target));
            Ok(datagram.len())
        }
    }

    /// `name`'s identity at 127.0.0.1:`port`.
    pub(crate) fn identity(name: &str, port: u16, generation: u64) -> crate::Identity {
        crate::Identity::new(
            crate::NodeId::new(name).unwrap(),
            SocketAddr::from(([127, 0, 0, 1], port)),
            generation,
        )
    }

    /// Shared state for a node that is not running.
    pub(crate) fn shared(view: MembershipView) -> Arc<Shared> {
        Arc::new(Shared::new(
            view,
            LocalFields::default(),
            LoadTracker::new(4),
            16,
        ))
    }
}

#[cfg(test)]
mod tests {
    use foca::Runtime;

    use super::{testing::Recorder, *};
    use crate::{
        NodeId,
        agent::{
            lifeguard::{suspicion::SuspicionTimeouts, tick::LifeguardTick},
            snapshot,
        },
    };

    #[tokio::test(start_paused = true)]
    async fn the_runtime_seals_sends_and_schedules_in_order() {
        let transport = Arc::new(Recorder::default());
        let id = Identity::new(NodeId::new("a").unwrap(), "127.0.0.1:7".parse().unwrap(), 1);
        let shared = testing::shared(snapshot::initial(&id));
        let out = Outbound::new(
            Arc::clone(&transport),
            Envelope::plain(),
            Arc::clone(&shared),
        );
        assert_eq!(out.max_payload(), MAX_DATAGRAM - 4);
        let mut io = Io::new(out, guard(), GossipBudget::default());
        let now = Instant::now();
        let mut runtime = io.runtime(now);
        runtime.send_to(id.clone(), b"swim");
        runtime.submit_after(foca::Timer::ProbeRandomMember(0), Duration::from_millis(30));
        runtime.submit_after(foca::Timer::PeriodicGossip(0), Duration::from_millis(10));
        runtime.notify(foca::Notification::Active);

        assert_eq!(
            transport.opened(),
            [(Kind::Foca, b"swim".to_vec(), id.addr())]
        );
        assert_eq!(shared.counters.snapshot().datagrams_sent, 1);
        assert_eq!(
            io.timers.next_deadline(),
            Some(now + Duration::from_millis(10))
        );
        let later = now + Duration::from_secs(1);
        assert!(matches!(
            io.timers.pop_due(later),
            Some(Tick::Foca(foca::Timer::PeriodicGossip(0)))
        ));
        assert!(matches!(
            io.timers.pop_due(later),
            Some(Tick::Foca(foca::Timer::ProbeRandomMember(0)))
        ));
        assert_eq!(io.take_notes().len(), 1);
        assert!(io.take_notes().is_empty());
    }

    fn guard() -> Guard {
        Guard::new(
            8,
            SuspicionTimeouts {
                min: Duration::from_secs(2),
                max: Duration::from_secs(12),
                expected: 2,
            },
            Duration::from_secs(1),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn probe_timers_stretch_with_local_health_and_suspicions_wait_for_their_deadline() {
        let transport = Arc::new(Recorder::default());
        let id = Identity::new(NodeId::new("a").unwrap(), "127.0.0.1:7".parse().unwrap(), 1);
        let suspect = Identity::new(NodeId::new("x").unwrap(), "127.0.0.1:8".parse().unwrap(), 1);
        let shared = testing::shared(snapshot::initial(&id));
        let out = Outbound::new(Arc::clone(&transport), Envelope::plain(), shared);
        let mut io = Io::new(out, guard(), GossipBudget::default());
        let now = Instant::now();
        // A probe starts, and the next cycle finds it failed: the score goes up by one.
        io.guard.begin_cycle();
        io.runtime(now).submit_after(
            foca::Timer::SendIndirectProbe {
                probed_id: suspect.clone(),
                token: 0,
            },
            Duration::from_millis(500),
        );
        io.guard.end_cycle();
        io.guard.begin_cycle();
        let suspicion = foca::Timer::ChangeSuspectToDown {
            member_id: suspect.clone(),
            incarnation: 4,
            token: 0,
        };
        io.runtime(now)
            .submit_after(suspicion, Duration::from_secs(12));
        io.runtime(now).submit_after(
            foca::Timer::SendIndirectProbe {
                probed_id: id.clone(),
                token: 0,
            },
            Duration::from_millis(500),
        );
        io.guard.end_cycle();
        assert_eq!(io.guard.health.score(), 1);
        assert_eq!(io.guard.raised, [(suspect.clone(), 4)]);
        // Probe timers now run twice as long: a probe asked for in 1 s is not due at 1.5 s,
        // and is at 2 s.
        io.runtime(now)
            .submit_after(foca::Timer::ProbeRandomMember(0), Duration::from_secs(1));
        let early: Vec<Tick> =
            std::iter::from_fn(|| io.timers.pop_due(now + Duration::from_millis(1500))).collect();
        assert!(
            matches!(
                early.as_slice(),
                [
                    Tick::Foca(foca::Timer::SendIndirectProbe { .. }),
                    Tick::Foca(foca::Timer::SendIndirectProbe { .. }),
                ]
            ),
            "the probe was not stretched: {early:?}"
        );
        let due: Vec<Tick> =
            std::iter::from_fn(|| io.timers.pop_due(now + Duration::from_secs(2))).collect();
        assert!(
            matches!(
                due.as_slice(),
                [Tick::Foca(foca::Timer::ProbeRandomMember(0))]
            ),
            "{due:?}"
        );
        // The suspicion is held back until its unconfirmed deadline, as our own tick.
        assert_eq!(
            io.timers.next_deadline(),
            Some(now + Duration::from_secs(12))
        );
        assert!(matches!(
            io.timers.pop_due(now + Duration::from_secs(12)),
            Some(Tick::Lifeguard(LifeguardTick::Suspicion(_)))
        ));
        // A cycle whose probe was answered brings the score back down.
        io.guard.begin_cycle();
        io.guard.end_cycle();
        assert_eq!(io.guard.health.score(), 0);
    }

    #[test]
    fn seeded_generators_repeat_and_differ_from_each_other() {
        use rand::RngExt;
        let draw = |rng: &mut StdRng| rng.random_range(0..u64::MAX);
        let (mut a1, mut b1) = generators(Some(5));
        let (mut a2, mut b2) = generators(Some(5));
        let (x1, y1) = (draw(&mut a1), draw(&mut b1));
        assert_eq!((x1, y1), (draw(&mut a2), draw(&mut b2)));
        assert_ne!(x1, y1);
    }
}
