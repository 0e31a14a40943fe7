//! The membership task: the one owner of the foca state machine.
//!
//! Everything reaches it as an [`Input`] (datagrams decoded by the receive task, commands from
//! handles, discovery answers), as a wake-up from the load tracker or the local fields, or as a
//! [`Tick`] from its own ordered scheduler; it never waits on anything else. Each of these is
//! one *step*, taken at one instant (the clock is read once per step, so a simulation can drive
//! the steps with its own). After each step it *settles*: it handles the notifications foca
//! produced (which may produce more), reports new peer states, and publishes a new view if
//! anything readers can see changed.
//!
//! The loop only dispatches. Each concern of the task is a component that owns its state, in
//! a file of its own, so a field's type says which file to open; for every call it is handed
//! the *step context* ([`Context`]: foca and what its runtime writes to, the instant of the
//! step, the timing, the state table, our status, the events). A component's step never
//! calls another component: what it means for another (a newcomer gets our state, a renewed
//! identity restarts our versions and Lifeguard's count of refutations, a leave publishes
//! our draining state before the notices) comes back to the loop, which makes the next call.
//!
//! | field of [`Agent`] | type | file | concern |
//! |---|---|---|---|
//! | `cx` | [`Context`] | [`context`] | what every component works with during a step |
//! | `lifeguard` | [`Lifeguard`] | [`lifeguard`] | Lifeguard (Dadgar, Phillips and Currey, 2018) on foca's SWIM: local health, dynamic suspicion, buddy and down notices, witnesses |
//! | `lineage` | [`Lineage`] | [`lineage`] | identity lives turned into events: joined, rejoined, failed, left, superseded |
//! | `publisher` | [`Publisher`] | [`publication`] | our own state: versions, coalescing, pushes, relays, refreshes |
//! | `announcer` | [`Announcer`] | [`announce`] | announcing to seeds and discovered peers, introductions, leaving |
//! | `snapshots` | [`Snapshots`] | [`snapshot`] | assembling the immutable view readers get |
//!
//! Beneath them, in the order a datagram meets them: [`runtime`] is foca's runtime (sealing
//! and sending datagrams, scheduling timers, collecting notifications; it carries Lifeguard's
//! guard, through which foca's timers pass), and [`timers`] the ordered timer queue and the
//! ticks it delivers.

mod announce;
mod context;
pub(crate) mod lifeguard;
mod lineage;
mod publication;
mod runtime;
pub(crate) mod snapshot;
mod timers;

use std::{net::SocketAddr, sync::Arc};

use foca::{Foca, OwnedNotification, PostcardCodec};
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::Instant,
};

use self::{
    announce::Announcer,
    context::Context,
    lifeguard::{Lifeguard, guard::Guard},
    lineage::Lineage,
    publication::Publisher,
    runtime::{Io, Outbound},
    snapshot::{Snapshots, Sources},
    timers::{Periodic, Tick},
};
use crate::{
    Identity, LocalStatus, MeshEvent, NodeState,
    budget::GossipBudget,
    counters::Dropped,
    handle_state::Shared,
    input::{Input, Message},
    state_table::{SharedStore, StateGossip},
    timing::Timing,
    transport::Transport,
};

/// What a membership task is made of.
pub(crate) struct AgentParts<T> {
    pub(crate) identity: Identity,
    pub(crate) transport: Arc<T>,
    pub(crate) local_addr: SocketAddr,
    pub(crate) envelope: crate::wire::Envelope,
    pub(crate) shared: Arc<Shared>,
    pub(crate) timing: Timing,
    pub(crate) seeds: Vec<SocketAddr>,
    pub(crate) rng_seed: Option<u64>,
}

/// The membership task: the step context, the components, and the view's timing.
pub(crate) struct Agent<T> {
    /// What every component works with during a step (`context.rs`).
    cx: Context<T>,
    /// Bytes of foca payload per datagram, and the cluster size foca is configured for.
    max_payload: usize,
    configured_size: u32,
    /// Lifeguard's messages, timers and probe cycle (`lifeguard/`).
    lifeguard: Lifeguard,
    /// The lives of every node id, and the events they make (`lineage.rs`).
    lineage: Lineage,
    /// Versions and publications of our own state (`publication.rs`).
    publisher: Publisher,
    /// Seeds, discovered addresses and introductions (`announce.rs`).
    announcer: Announcer,
    /// The epoch and local status of the views readers get (`snapshot.rs`).
    snapshots: Snapshots,
    leave_reply: Option<oneshot::Sender<()>>,
    stopped: bool,
    /// When the last view was published, and whether a coalesced one is scheduled.
    last_view: Option<Instant>,
    view_scheduled: bool,
}

impl<T: Transport> Agent<T> {
    pub(crate) fn new(parts: AgentParts<T>) -> Self {
        let AgentParts {
            identity,
            transport,
            local_addr,
            envelope,
            shared,
            timing,
            seeds,
            rng_seed,
        } = parts;
        let (foca_rng, push_rng) = runtime::generators(rng_seed);
        let out = Outbound::new(transport, envelope, Arc::clone(&shared));
        let max_payload = out.max_payload();
        let store = SharedStore::default();
        let budget = GossipBudget::new(timing.state_gossip_budget);
        let local = identity.node_id().clone();
        let foca = Foca::with_custom_broadcast(
            identity,
            timing.foca_config(1, max_payload),
            foca_rng,
            PostcardCodec,
            StateGossip::new(store.clone(), budget.clone(), local),
        );
        let io = Io::new(out, Guard::with_timing(&timing), budget);
        Self {
            cx: Context::new(foca, io, store, shared, timing, push_rng, Instant::now()),
            max_payload,
            configured_size: 1,
            lifeguard: Lifeguard::default(),
            lineage: Lineage::default(),
            publisher: Publisher::default(),
            announcer: Announcer::new(local_addr, seeds),
            snapshots: Snapshots::new(),
            leave_reply: None,
            stopped: false,
            last_view: None,
            view_scheduled: false,
        }
    }

    /// Runs until shut down, left, or every handle is gone.
    pub(crate) async fn run(
        mut self,
        mut inputs: mpsc::Receiver<Input>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        self.start(Instant::now());
        let load = self.cx.shared.load.clone();
        let shared = Arc::clone(&self.cx.shared);
        while !self.stopped {
            let deadline = self.next_deadline();
            tokio::select! {
                biased;
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
                () = sleep_until(deadline) => self.on_timers(Instant::now()),
                input = inputs.recv() => match input {
                    Some(input) => self.on_input(input, Instant::now()),
                    None => break,
                },
                () = load.changed() => self.on_local_change(Instant::now()),
                () = shared.local_changed.notified() => self.on_local_change(Instant::now()),
            }
        }
        // Whatever changed last is published before the task ends.
        self.flush_view();
        if let Some(reply) = self.leave_reply.take() {
            let _ = reply.send(());
        }
        tracing::debug!(identity = %self.cx.foca.identity(), "membership task stopped");
    }

    /// First step: publish our state, start the periodic work.
    pub(crate) fn start(&mut self, now: Instant) {
        self.cx.now = now;
        self.publisher.publish(&mut self.cx, true);
        for work in Periodic::ALL {
            self.cx
                .io
                .timers
                .schedule(work.first_run(now, &self.cx.timing), Tick::Every(work));
        }
        self.settle();
    }

    /// A step: the timers due at `now`, each settled before the next.
    pub(crate) fn on_timers(&mut self, now: Instant) {
        self.cx.now = now;
        while let Some(tick) = self.cx.io.timers.pop_due(now) {
            match tick {
                Tick::Foca(foca::Timer::PeriodicGossip(token)) => self.gossip_round(token),
                Tick::Foca(timer) => self.lifeguard.deliver_foca_timer(&mut self.cx, timer),
                Tick::Lifeguard(tick) => self.lifeguard.on_tick(&mut self.cx, tick),
                Tick::View => self.view_scheduled = false,
                Tick::Publish => self.publisher.publish_scheduled(&mut self.cx),
                Tick::FinishLeave => {
                    self.announcer.send_leave_notices(&mut self.cx);
                    self.stopped = true;
                }
                Tick::Every(work) => {
                    self.periodic(work);
                    let next = now + work.period(&self.cx.timing);
                    self.cx.io.timers.schedule(next, Tick::Every(work));
                }
            }
            // Timers may produce notifications that schedule more work; handle them in order.
            self.settle();
        }
    }

    /// A step: one input.
    pub(crate) fn on_input(&mut self, input: Input, now: Instant) {
        self.cx.now = now;
        match input {
            Input::Datagram { message, from } => self.on_message(message, from),
            Input::Join(addrs) => {
                self.announcer.add_seeds(addrs);
                self.announce_to_known(true);
            }
            Input::Discovered(addrs) => {
                self.announcer.set_discovered(addrs);
                self.announce_to_known(true);
            }
            Input::Leave(reply) => self.leave(reply),
        }
        self.settle();
    }

    /// A step: our load or local fields changed.
    pub(crate) fn on_local_change(&mut self, now: Instant) {
        self.cx.now = now;
        self.publisher.state_changed(&mut self.cx);
        self.settle();
    }

    /// When the next timer is due.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.cx.io.timers.next_deadline()
    }

    fn periodic(&mut self, work: Periodic) {
        match work {
            Periodic::Refresh => self.publisher.refresh(&mut self.cx),
            Periodic::Rejoin => {
                if matches!(
                    self.cx.status(),
                    LocalStatus::Joining | LocalStatus::Isolated
                ) {
                    self.announce_to_known(false);
                    self.cx.shared.discovery_wanted.notify_one();
                }
            }
            Periodic::Maintenance => self.maintain(),
        }
    }

    fn on_message(&mut self, message: Message, from: SocketAddr) {
        if self.cx.status() == LocalStatus::Left || self.lineage.is_superseded() {
            return;
        }
        match message {
            Message::Foca(packet) => {
                self.lifeguard.foca_datagram(&mut self.cx, &packet);
                if let Err(error) = self
                    .cx
                    .foca
                    .handle_data(&packet, self.cx.io.runtime(self.cx.now))
                {
                    self.cx.shared.counters.dropped(Dropped::FocaRejected);
                    tracing::debug!(%error, "foca rejected a datagram");
                }
                self.announcer
                    .answer_for_an_earlier_life(&mut self.cx, &packet, from);
            }
            Message::StatePush { state, bytes } => self.pushed_state(state, &bytes, from),
            Message::Leave(identity) => self.lineage.leave_notice(&mut self.cx, identity),
            Message::Lifeguard(notice) => self.lifeguard.on_notice(&mut self.cx, notice, from),
        }
    }

    /// A state pushed by its owner goes through foca's broadcast queue: a state that is new to
    /// us is both stored and passed on by gossip, so the peers the owner did not push to learn
    /// it within a few gossip rounds instead of waiting for the owner's own retransmissions.
    fn pushed_state(&mut self, state: Arc<NodeState>, bytes: &[u8], from: SocketAddr) {
        let had_older = self.cx.store.lock().get(&state.node_id).is_some();
        let foca = &mut self.cx.foca;
        match self
            .cx
            .store
            .with_staged(Arc::clone(&state), || foca.add_broadcast(bytes))
        {
            // `queued`: the handler (`state_table.rs`) queued it for gossip: a newer version than
            // ours, or a first state within the share of pushed first states passed on.
            Ok(queued) => {
                if queued && had_older && self.lineage.live_addr(&state.node_id) == Some(from) {
                    self.publisher.relay(&mut self.cx, &state, bytes, from);
                }
                // New to us or not: gossip often brings a state before its owner's join sync
                // does, and the owner is still a stranger then.
                if !self.lineage.knows_live(&state.node_id) {
                    self.announcer
                        .introduce_to_stranger(&mut self.cx, &state.node_id, from);
                }
            }
            Err(error) => {
                self.cx.shared.counters.dropped(Dropped::StateRejected);
                tracing::debug!(%error, "rejected a pushed node state");
            }
        }
    }

    /// One periodic gossip round, where the gossip budget (`budget.rs`) meets foca's way of
    /// filling datagrams: membership updates first, states after them.
    /// - Only states are waiting and their budget is spent: foca would send datagrams with
    ///   nothing but a header, so the round is skipped (foca's timer comes back next round).
    /// - Membership updates are queued (after a cold start of a large cluster, for seconds):
    ///   the round foca just sent may have had no room left for states, so the states still
    ///   waiting go out in datagrams of their own (foca's `Broadcast` messages, which carry no
    ///   membership update), within the budget.
    fn gossip_round(&mut self, token: foca::TimerToken) {
        let round = foca::Timer::PeriodicGossip(token);
        if self.cx.foca.updates_backlog() == 0 && self.cx.io.budget.is_spent() {
            let next = self.cx.now + self.cx.timing.gossip_interval;
            self.cx.io.timers.schedule(next, Tick::Foca(round));
            return;
        }
        if let Err(error) = self
            .cx
            .foca
            .handle_timer(round, self.cx.io.runtime(self.cx.now))
        {
            tracing::debug!(%error, "foca gossip timer error");
        }
        if self.cx.foca.updates_backlog() > 0
            && self.cx.foca.custom_broadcast_backlog() > 0
            && !self.cx.io.budget.is_spent()
            && let Err(error) = self.cx.foca.broadcast(self.cx.io.runtime(self.cx.now))
        {
            tracing::debug!(%error, "broadcasting states failed");
        }
    }

    /// Handles foca's notifications (which may cause more), then reports new peer states and
    /// publishes the view if anything readers see changed.
    fn settle(&mut self) {
        loop {
            self.lifeguard.tell_about_suspicions(&mut self.cx);
            let notes = self.cx.io.take_notes();
            if notes.is_empty() {
                break;
            }
            for note in notes {
                self.on_notification(note);
            }
        }
        self.lifeguard.report_health(&self.cx);
        // Views are coalesced (see `view_interval`); their events wait with them.
        let due = self
            .last_view
            .is_none_or(|at| self.cx.now >= at + self.view_interval());
        if due {
            self.flush_view();
        } else if !self.view_scheduled && self.view_pending() {
            self.view_scheduled = true;
            let at = self.last_view.unwrap_or(self.cx.now) + self.view_interval();
            self.cx.io.timers.schedule(at, Tick::View);
        }
    }

    /// Publishes what changed since the last view, then the events that describe it: an event
    /// is never ahead of the view.
    fn flush_view(&mut self) {
        let accepted = self.cx.store.lock().take_accepted();
        let local = self.cx.foca.identity().node_id().clone();
        for state in accepted {
            if state.node_id != local {
                self.snapshots.mark_dirty();
                self.cx.emit(MeshEvent::Updated(state));
            }
        }
        if self.cx.store.lock().take_dirty() {
            self.snapshots.mark_dirty();
        }
        if self.take_view_dirty() {
            self.publish_view();
            self.last_view = Some(self.cx.now);
        }
        self.cx.deliver_events();
    }

    /// The least time between two views: 50 µs per member, at most 50 ms. Assembling a view
    /// costs time in proportion to the members (about 0.3 ms for a thousand), and a node of a
    /// busy large cluster receives a state every few milliseconds, or a member every few during
    /// a cold start (n views of n members each: cubic work for the cluster); this keeps views
    /// to a small, constant share of a core at any size (a thousand members: at most 20 views
    /// a second), while a small cluster sees every change within a millisecond. Events wait
    /// with their view, so an event is never ahead of the view.
    fn view_interval(&self) -> std::time::Duration {
        (std::time::Duration::from_micros(50) * self.configured_size)
            .min(std::time::Duration::from_millis(50))
    }

    /// Whether the view is out of date, because the loop or a component changed something
    /// readers see; clears the mark.
    fn take_view_dirty(&mut self) -> bool {
        let changed = self.cx.take_view_changed();
        self.snapshots.take_dirty() || changed
    }

    /// Whether anything waits to be published in a view.
    fn view_pending(&mut self) -> bool {
        let dirty = self.take_view_dirty();
        if dirty {
            self.snapshots.mark_dirty();
        }
        dirty || self.cx.has_events() || self.cx.store.lock().has_pending()
    }

    fn on_notification(&mut self, note: OwnedNotification<Identity>) {
        match note {
            OwnedNotification::MemberUp(id) => {
                self.resize();
                if let Some(newcomer) = self.lineage.member_up(&mut self.cx, id) {
                    self.publisher.join_sync(&mut self.cx, newcomer.addr());
                }
            }
            OwnedNotification::MemberDown(id) => {
                self.resize();
                self.lineage.member_down(&mut self.cx, id);
            }
            OwnedNotification::Rename(old, new) => {
                if let Some(rejoined) = self.lineage.member_renamed(&mut self.cx, old, new) {
                    self.publisher.join_sync(&mut self.cx, rejoined.addr());
                }
            }
            OwnedNotification::Active => self.cx.set_status(LocalStatus::Active),
            OwnedNotification::Idle => {
                if self.cx.status() != LocalStatus::Left {
                    self.cx.set_status(LocalStatus::Isolated);
                    self.announce_to_known(false);
                    self.cx.shared.discovery_wanted.notify_one();
                }
            }
            OwnedNotification::Defunct => {
                if let Some(renewed) = self.lineage.renew_identity(&mut self.cx) {
                    self.identity_renewed(renewed);
                    self.announce_to_known(false);
                }
            }
            OwnedNotification::Rejoin(id) => self.identity_renewed(id),
        }
        self.snapshots.mark_dirty();
    }

    /// Our identity changed (foca renewed it after we were declared down): our state's
    /// generation follows it, and Lifeguard counts our incarnations from zero again.
    fn identity_renewed(&mut self, id: Identity) {
        if self.lineage.is_superseded() {
            return;
        }
        tracing::info!(identity = %id, "rejoining under a renewed identity");
        self.publisher.restart();
        self.lifeguard.identity_renewed();
        self.cx.set_status(LocalStatus::Joining);
        self.publisher.publish(&mut self.cx, true);
    }

    /// Suspicion, and forgetting what is too old to matter.
    fn maintain(&mut self) {
        self.lineage.report_suspects(&mut self.cx);
        let now = self.cx.now;
        self.announcer
            .forget_introductions(now, self.cx.timing.rejoin_interval);
        if self
            .lineage
            .forget_down(now, self.cx.timing.remove_down_after)
        {
            self.snapshots.mark_dirty(); // reaped departed members leave the view
        }
        snapshot::record_gauges(&self.cx.shared.view());
        let members: std::collections::HashSet<(crate::NodeId, u64)> = self
            .cx
            .foca
            .iter_members()
            .map(|m| (m.id().node_id().clone(), m.id().generation()))
            .collect();
        let local = self.cx.foca.identity().clone();
        let keep = self.cx.timing.state_refresh_interval * 10;
        self.cx.store.lock().prune(
            |id, generation| {
                members.contains(&(id.clone(), generation))
                    || (id == local.node_id() && generation == local.generation())
            },
            now,
            keep,
        );
    }

    fn publish_view(&mut self) {
        let store = self.cx.store.lock();
        let view = self.snapshots.assemble(
            Sources {
                local: self.cx.foca.identity(),
                local_state: self.publisher.current().map(|p| Arc::clone(&p.state)),
                members: self.cx.foca.iter_members().map(|m| (m.id(), m.state())),
                store: &store,
                status: self.cx.status(),
                lineage: &self.lineage,
            },
            self.cx.now,
        );
        drop(store);
        self.cx.shared.publish_view(view);
    }

    /// Announces to seeds and discovered addresses (see `announce.rs`), unless another process
    /// took over our node id.
    fn announce_to_known(&mut self, only_strangers: bool) {
        if !self.lineage.is_superseded() {
            self.announcer
                .announce_to_known(&mut self.cx, only_strangers);
        }
    }

    /// Leaving (memberlist's graceful leave): our state, marked draining, goes to every member
    /// before the leave notices; `reply` is answered when the task stops.
    fn leave(&mut self, reply: oneshot::Sender<()>) {
        if self.cx.status() == LocalStatus::Left {
            let _ = reply.send(());
            return;
        }
        self.cx.shared.lock_local().draining = true;
        self.publisher.publish(&mut self.cx, true);
        self.publisher.push(&mut self.cx, usize::MAX);
        self.announcer.leave_cluster(&mut self.cx);
        self.leave_reply = Some(reply);
    }

    /// Re-sizes foca's configuration (suspicion timeout, retransmissions) to the cluster.
    fn resize(&mut self) {
        let size = u32::try_from(self.cx.foca.num_members() + 1).unwrap_or(u32::MAX);
        if size == self.configured_size {
            return;
        }
        let config = self.cx.timing.foca_config(size, self.max_payload);
        match self.cx.foca.set_config(config) {
            Ok(()) => {
                self.configured_size = size;
                self.cx.io.guard.resized(&self.cx.timing, size);
            }
            Err(error) => tracing::warn!(%error, size, "resizing foca config failed"),
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    //! The loop driven step by step over a recording transport, without sockets or a task.
    use std::time::Duration;

    use super::{runtime::testing::Recorder, *};
    use crate::{NodeId, wire::Envelope, wire::Kind};

    fn agent(transport: &Arc<Recorder>) -> (Agent<Recorder>, Arc<Shared>) {
        let identity = Identity::new(
            NodeId::new("me").unwrap(),
            "127.0.0.1:1".parse().unwrap(),
            9,
        );
        let shared = runtime::testing::shared(snapshot::initial(&identity));
        let agent = Agent::new(AgentParts {
            identity,
            transport: Arc::clone(transport),
            local_addr: "127.0.0.1:1".parse().unwrap(),
            envelope: Envelope::plain(),
            shared: Arc::clone(&shared),
            timing: Timing::local(),
            seeds: vec!["127.0.0.1:2".parse().unwrap()],
            rng_seed: Some(1),
        });
        (agent, shared)
    }

    /// An agent over a recording transport, started now: the agent, the recorder, its shared
    /// state, and when it started.
    fn started() -> (Agent<Recorder>, Arc<Recorder>, Arc<Shared>, Instant) {
        let transport = Arc::new(Recorder::default());
        let (mut agent, shared) = agent(&transport);
        let t0 = Instant::now();
        agent.start(t0);
        (agent, transport, shared, t0)
    }

    #[tokio::test(start_paused = true)]
    async fn starting_publishes_our_state_and_announces_to_the_seeds() {
        let (mut agent, transport, shared, t0) = started();
        let view = shared.view();
        assert_eq!(view.epoch(), 1);
        let local = view.local().state().unwrap();
        assert_eq!((local.version, local.max_concurrency), (1, 4));
        // Rejoining is due at once: the seed is announced to.
        assert_eq!(agent.next_deadline(), Some(t0));
        agent.on_timers(t0);
        let sent = transport.opened();
        assert!(
            sent.iter()
                .any(|(kind, _, to)| *kind == Kind::Foca && *to == "127.0.0.1:2".parse().unwrap()),
            "{sent:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_pushed_state_from_a_stranger_is_stored_reported_and_answered() {
        let transport = Arc::new(Recorder::default());
        let (mut agent, shared) = agent(&transport);
        let mut events = shared.events.subscribe();
        let t0 = Instant::now();
        agent.start(t0);
        let mut state = NodeState::new(NodeId::new("peer").unwrap(), 3, 1);
        state.max_concurrency = 2;
        let bytes = state.encode().unwrap();
        let from: SocketAddr = "127.0.0.1:7".parse().unwrap();
        let message = Message::decode(Kind::StatePush, &bytes).unwrap();
        agent.on_input(Input::Datagram { message, from }, t0);
        // The view (and its events) follow within the view interval.
        assert!(events.try_recv().is_err());
        agent.on_timers(t0 + agent.view_interval());
        assert!(matches!(
            events.try_recv(),
            Ok(MeshEvent::Updated(updated)) if *updated == state
        ));
        // We introduce ourselves to the stranger, once per rejoin interval.
        let announces = |t: &Recorder| t.opened().iter().filter(|(_, _, to)| *to == from).count();
        assert_eq!(announces(&transport), 1);
        let mut newer = state.clone();
        newer.version = 2;
        let message = Message::decode(Kind::StatePush, &newer.encode().unwrap()).unwrap();
        agent.on_input(
            Input::Datagram { message, from },
            t0 + Duration::from_millis(10),
        );
        assert_eq!(announces(&transport), 1);
        assert_eq!(shared.counters.snapshot().states_rejected, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stranger_pushing_a_state_we_already_hold_is_still_answered() {
        // After a cold start of 1,000 nodes, a member's join update sometimes runs out of
        // retransmissions before reaching a node, while its state reached that node another
        // way (by gossip; here, pushed by a relayer). The member's join sync then brings
        // nothing new, yet it is the only sign that the member exists and knows us.
        let (mut agent, transport, _shared, t0) = started();
        let state = NodeState::new(NodeId::new("peer").unwrap(), 3, 1);
        let push = |from: SocketAddr| Input::Datagram {
            message: Message::decode(Kind::StatePush, &state.encode().unwrap()).unwrap(),
            from,
        };
        let relayer: SocketAddr = "127.0.0.1:8".parse().unwrap();
        let owner: SocketAddr = "127.0.0.1:7".parse().unwrap();
        agent.on_input(push(relayer), t0);
        agent.on_input(push(owner), t0 + Duration::from_millis(10));
        let announces = transport
            .opened()
            .iter()
            .filter(|(kind, body, to)| {
                *kind == Kind::Foca
                    && *to == owner
                    && matches!(foca_message(body), Some(foca::Message::Announce))
            })
            .count();
        assert_eq!(announces, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_load_change_is_published_once_per_interval() {
        let (mut agent, _transport, shared, t0) = started();
        let version = |shared: &Shared| shared.view().local().state().unwrap().version;
        let _task = shared.load.begin_task();
        agent.on_local_change(t0 + Duration::from_millis(1));
        let _another = shared.load.begin_task();
        agent.on_local_change(t0 + Duration::from_millis(2));
        assert_eq!(
            version(&shared),
            1,
            "coalesced until the interval has passed"
        );
        let due = t0 + Timing::local().state_publish_interval;
        agent.on_timers(due);
        let view = shared.view();
        let local = view.local().state().unwrap();
        assert_eq!((local.version, local.pending), (2, 2));
    }

    /// A foca datagram from `from` to `to`, as the loop receives it.
    fn foca_input(from: &Identity, to: &Identity, message: foca::Message<Identity>) -> Input {
        use foca::Codec;
        let header = foca::Header {
            src: from.clone(),
            src_incarnation: 0,
            dst: to.clone(),
            message,
        };
        let mut body = Vec::new();
        foca::PostcardCodec
            .encode_header(&header, &mut body)
            .unwrap();
        Input::Datagram {
            message: Message::decode(Kind::Foca, &body).unwrap(),
            from: from.addr(),
        }
    }

    /// The foca message a datagram body carries.
    fn foca_message(body: &[u8]) -> Option<foca::Message<Identity>> {
        use foca::Codec;
        let mut body = body;
        Codec::<Identity>::decode_header(&mut foca::PostcardCodec, &mut body)
            .ok()
            .map(|h| h.message)
    }

    /// The probe numbers of the pings sent to `to`, in order.
    fn pings_to(transport: &Recorder, to: &Identity) -> Vec<foca::ProbeNumber> {
        transport
            .opened()
            .iter()
            .filter(|(kind, _, addr)| *kind == Kind::Foca && *addr == to.addr())
            .filter_map(|(_, body, _)| match foca_message(body) {
                Some(foca::Message::Ping(number)) => Some(number),
                _ => None,
            })
            .collect()
    }

    /// How many Lifeguard notices were sent to `to`.
    fn notices_to(transport: &Recorder, to: &Identity) -> usize {
        transport
            .opened()
            .iter()
            .filter(|(kind, _, addr)| *kind == Kind::Lifeguard && *addr == to.addr())
            .count()
    }

    /// Steps `agent` through its timers from `now` until `done` holds: the time it first
    /// held.
    fn step_until(
        agent: &mut Agent<Recorder>,
        mut now: Instant,
        done: impl Fn(&Agent<Recorder>) -> bool,
    ) -> Instant {
        let limit = now + Duration::from_secs(30);
        while !done(agent) {
            now = agent.next_deadline().unwrap();
            assert!(now < limit, "not within 30 s");
            agent.on_timers(now);
        }
        now
    }

    /// An agent with one peer, `x`, stepped through its timers until foca pings `x`: the
    /// agent, the recorder, `x`, and when the ping left.
    fn probing_a_peer() -> (Agent<Recorder>, Arc<Recorder>, Identity, Instant) {
        let (mut agent, transport, _shared, t0) = started();
        let x = Identity::new(NodeId::new("x").unwrap(), "127.0.0.1:2".parse().unwrap(), 1);
        let me = agent.cx.foca.identity().clone();
        agent.on_input(foca_input(&x, &me, foca::Message::Announce), t0);
        let pinged = step_until(&mut agent, t0, |_| !pings_to(&transport, &x).is_empty());
        (agent, transport, x, pinged)
    }

    /// Whether foca holds `x` in `state`.
    fn holds(agent: &Agent<Recorder>, x: &Identity, state: foca::State) -> bool {
        agent
            .cx
            .foca
            .iter_members()
            .any(|m| m.id() == x && m.state() == state)
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_probe_target_is_told_early_and_its_suspicion_counts_from_then() {
        let (mut agent, transport, x, pinged) = probing_a_peer();
        let timing = Timing::local();
        let told = step_until(&mut agent, pinged, |_| notices_to(&transport, &x) > 0);
        // Told once the probe timed out and the indirect stage had a quarter of the rest of
        // the period, not at the end of the period.
        let share = (timing.probe_period - timing.probe_rtt) / 4;
        assert_eq!(told - pinged, timing.probe_rtt + share);
        // foca raises the suspicion at the end of the period; x is declared down one
        // suspicion timeout after it was told, not after the suspicion was raised.
        let down = step_until(&mut agent, told, |a| {
            !holds(a, &x, foca::State::Alive) && !holds(a, &x, foca::State::Suspect)
        });
        assert_eq!(down - told, timing.suspicion_timeout(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_target_that_answers_is_not_told() {
        let (mut agent, transport, x, pinged) = probing_a_peer();
        let timing = Timing::local();
        let me = agent.cx.foca.identity().clone();
        let number = pings_to(&transport, &x)[0];
        // x answers late: after the direct probe timed out, before the early notice was due.
        let timed_out = pinged + timing.probe_rtt;
        let now = step_until(&mut agent, pinged, |a| a.cx.now >= timed_out);
        agent.on_input(foca_input(&x, &me, foca::Message::Ack(number)), now);
        let period_end = pinged + timing.probe_period;
        step_until(&mut agent, now, |a| a.cx.now >= period_end);
        assert!(
            holds(&agent, &x, foca::State::Alive),
            "foca took the late answer"
        );
        assert_eq!(
            notices_to(&transport, &x),
            0,
            "a probe target that answered was told it is suspected"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_target_that_answers_after_its_early_notice_is_not_told_early_again() {
        let (mut agent, transport, x, pinged) = probing_a_peer();
        let timing = Timing::local();
        let me = agent.cx.foca.identity().clone();
        let told = step_until(&mut agent, pinged, |_| notices_to(&transport, &x) > 0);
        // x's ack comes after the early notice, still inside the period: foca takes it.
        let number = pings_to(&transport, &x)[0];
        agent.on_input(foca_input(&x, &me, foca::Message::Ack(number)), told);
        // The next probe of x goes unanswered: x hears of it only when foca raises the
        // suspicion at the end of that period, not early.
        let second = step_until(&mut agent, told, |_| pings_to(&transport, &x).len() == 2);
        let told_again = step_until(&mut agent, second, |_| notices_to(&transport, &x) > 1);
        assert_eq!(told_again - second, timing.probe_period);
    }
}
