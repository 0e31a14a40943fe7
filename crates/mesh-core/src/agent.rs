//! The membership task: the one owner of the foca state machine.
//!
//! Everything reaches it as an input (datagrams from the receive task, commands from handles,
//! wake-ups from the load tracker) or as a timer from its own ordered scheduler; it never waits
//! on anything else. After each input it drains what foca asked for: datagrams are sent with
//! non-blocking writes, timers go to the scheduler, notifications become events and a new
//! membership snapshot.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use foca::{Foca, OwnedNotification, PostcardCodec};
use rand::{SeedableRng, rngs::StdRng, seq::IndexedRandom};
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::Instant,
};

use crate::{
    Identity, LocalStatus, MeshEvent, NodeId, NodeState, PeerStatus,
    membership::Shared,
    stats::Dropped,
    store::{SharedStore, StateGossip},
    timers::TimerQueue,
    timing::Timing,
    transport::Transport,
    view::{Member, MembershipView},
    wire::{Envelope, Kind},
};

type FocaInstance = Foca<Identity, PostcardCodec, StdRng, StateGossip>;

/// What the receive task and the handles send to the membership task.
#[derive(Debug)]
pub(crate) enum Input {
    Datagram {
        kind: Kind,
        body: bytes::Bytes,
        from: SocketAddr,
    },
    Join(Vec<SocketAddr>),
    Discovered(Vec<SocketAddr>),
    Leave(oneshot::Sender<()>),
}

/// Timers of the membership task; foca's own are one kind among them.
#[derive(Debug)]
enum Tick {
    Foca(foca::Timer<Identity>),
    /// Publish our state now (a coalesced change whose rate limit has passed).
    Publish,
    /// Re-send our current state (anti-entropy).
    Refresh,
    /// Announce to discovered addresses if we are not part of a cluster.
    Rejoin,
    /// Suspect detection, pruning.
    Maintenance,
    /// Second round of leave notices, then stop.
    FinishLeave,
}

/// Sends datagrams: seals them in the envelope and writes without blocking.
struct Outbound<T> {
    transport: Arc<T>,
    envelope: Envelope,
    buf: Vec<u8>,
    shared: Arc<Shared>,
    /// The last datagram could not be sealed: warn once per failing stretch, not per datagram.
    sealing_failed: bool,
}

impl<T: Transport> Outbound<T> {
    fn send(&mut self, kind: Kind, body: &[u8], to: SocketAddr) {
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

/// foca's [`foca::Runtime`]: sends directly, schedules into the ordered queue, and collects
/// notifications for processing once foca returns.
struct Effects<'a, T> {
    now: Instant,
    out: &'a mut Outbound<T>,
    timers: &'a mut TimerQueue<Tick>,
    notes: &'a mut Vec<OwnedNotification<Identity>>,
}

impl<T: Transport> foca::Runtime<Identity> for Effects<'_, T> {
    fn notify(&mut self, notification: foca::Notification<'_, Identity>) {
        self.notes.push(notification.to_owned());
    }

    fn send_to(&mut self, to: Identity, data: &[u8]) {
        self.out.send(Kind::Foca, data, to.addr());
    }

    fn submit_after(&mut self, event: foca::Timer<Identity>, after: Duration) {
        self.timers.schedule(self.now + after, Tick::Foca(event));
    }
}

/// Builds an [`Effects`] from disjoint fields of the agent so foca can be borrowed alongside.
macro_rules! effects {
    ($agent:ident) => {
        Effects {
            now: Instant::now(),
            out: &mut $agent.out,
            timers: &mut $agent.timers,
            notes: &mut $agent.notes,
        }
    };
}

pub(crate) struct Agent<T> {
    foca: FocaInstance,
    store: SharedStore,
    timers: TimerQueue<Tick>,
    out: Outbound<T>,
    notes: Vec<OwnedNotification<Identity>>,
    shared: Arc<Shared>,
    timing: Timing,
    rng: StdRng,
    max_payload: usize,
    configured_size: u32,

    local_addr: SocketAddr,
    seeds: Vec<SocketAddr>,
    discovered: Vec<SocketAddr>,

    version: u64,
    published: Option<Published>,
    publish_scheduled: bool,

    status: LocalStatus,
    superseded_by: Option<Identity>,
    /// Peers that told us they are leaving: their `MemberDown` is a `Left`.
    leaving: HashSet<Identity>,
    /// Identities we declared down because a newer life of their node id appeared.
    replaced: HashSet<Identity>,
    /// The latest life seen of every node id, and since when it is down (if it is): a newer
    /// life showing up is a `Rejoined`, not a `Joined`, even if we saw the old one fail first.
    lives: HashMap<NodeId, (Identity, Option<Instant>)>,
    /// When we last introduced ourselves to an address that pushed us a state.
    introduced: HashMap<SocketAddr, Instant>,
    suspects: HashSet<Identity>,
    view_dirty: bool,
    epoch: u64,
    leave_reply: Option<oneshot::Sender<()>>,
    stopped: bool,
}

struct Published {
    at: Instant,
    state: Arc<NodeState>,
    bytes: Vec<u8>,
}

pub(crate) struct AgentParts<T> {
    pub(crate) identity: Identity,
    pub(crate) transport: Arc<T>,
    pub(crate) local_addr: SocketAddr,
    pub(crate) envelope: Envelope,
    pub(crate) shared: Arc<Shared>,
    pub(crate) timing: Timing,
    pub(crate) seeds: Vec<SocketAddr>,
    pub(crate) rng_seed: Option<u64>,
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
        let (foca_rng, rng) = match rng_seed {
            Some(seed) => (
                StdRng::seed_from_u64(seed),
                StdRng::seed_from_u64(seed.wrapping_add(0x9e37_79b9_7f4a_7c15)),
            ),
            None => (os_seeded(), os_seeded()),
        };
        let max_payload = crate::wire::MAX_DATAGRAM - envelope.overhead();
        let store = SharedStore::default();
        let foca = Foca::with_custom_broadcast(
            identity,
            timing.foca_config(1, max_payload),
            foca_rng,
            PostcardCodec,
            StateGossip::new(store.clone()),
        );
        Self {
            foca,
            store,
            timers: TimerQueue::new(),
            out: Outbound {
                transport,
                envelope,
                buf: Vec::with_capacity(crate::wire::MAX_DATAGRAM),
                shared: Arc::clone(&shared),
                sealing_failed: false,
            },
            notes: Vec::new(),
            shared,
            timing,
            rng,
            max_payload,
            configured_size: 1,
            local_addr,
            seeds,
            discovered: Vec::new(),
            version: 0,
            published: None,
            publish_scheduled: false,
            status: LocalStatus::Joining,
            superseded_by: None,
            leaving: HashSet::new(),
            replaced: HashSet::new(),
            lives: HashMap::new(),
            introduced: HashMap::new(),
            suspects: HashSet::new(),
            view_dirty: true,
            epoch: 0,
            leave_reply: None,
            stopped: false,
        }
    }

    pub(crate) async fn run(
        mut self,
        mut inputs: mpsc::Receiver<Input>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let now = Instant::now();
        self.publish(now, true);
        self.timers.schedule(now, Tick::Rejoin);
        self.timers
            .schedule(now + self.timing.probe_period, Tick::Maintenance);
        self.timers
            .schedule(now + self.timing.state_refresh_interval, Tick::Refresh);
        self.settle();

        let load = self.shared.load.clone();
        let shared = Arc::clone(&self.shared);
        while !self.stopped {
            let deadline = self.timers.next_deadline();
            tokio::select! {
                biased;
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
                () = sleep_until(deadline) => self.fire_due_timers(),
                input = inputs.recv() => match input {
                    Some(input) => self.handle_input(input),
                    None => break,
                },
                () = load.changed() => self.request_publish(),
                () = shared.local_changed.notified() => self.request_publish(),
            }
            self.settle();
        }
        if let Some(reply) = self.leave_reply.take() {
            let _ = reply.send(());
        }
        tracing::debug!(identity = %self.foca.identity(), "membership task stopped");
    }

    fn fire_due_timers(&mut self) {
        let now = Instant::now();
        while let Some(tick) = self.timers.pop_due(now) {
            match tick {
                Tick::Foca(timer) => {
                    if let Err(error) = self.foca.handle_timer(timer, &mut effects!(self)) {
                        tracing::debug!(%error, "foca timer error");
                    }
                }
                Tick::Publish => {
                    self.publish_scheduled = false;
                    self.publish(now, false);
                }
                Tick::Refresh => {
                    self.refresh_state();
                    self.timers
                        .schedule(now + self.timing.state_refresh_interval, Tick::Refresh);
                }
                Tick::Rejoin => {
                    if matches!(self.status, LocalStatus::Joining | LocalStatus::Isolated) {
                        self.announce_to_known(false);
                        self.shared.discovery_wanted.notify_one();
                    }
                    self.timers
                        .schedule(now + self.timing.rejoin_interval, Tick::Rejoin);
                }
                Tick::Maintenance => {
                    self.maintain(now);
                    self.timers
                        .schedule(now + self.timing.probe_period, Tick::Maintenance);
                }
                Tick::FinishLeave => {
                    self.send_leave_notices();
                    self.stopped = true;
                }
            }
            // Timers may produce notifications that schedule more work; handle them in order.
            self.settle();
        }
    }

    fn handle_input(&mut self, input: Input) {
        match input {
            Input::Datagram { kind, body, from } => self.handle_datagram(kind, &body, from),
            Input::Join(addrs) => {
                for addr in addrs {
                    if !self.seeds.contains(&addr) {
                        self.seeds.push(addr);
                    }
                }
                self.announce_to_known(true);
            }
            Input::Discovered(addrs) => {
                self.discovered = addrs;
                self.announce_to_known(true);
            }
            Input::Leave(reply) => self.leave(reply),
        }
    }

    fn handle_datagram(&mut self, kind: Kind, body: &[u8], from: SocketAddr) {
        if self.status == LocalStatus::Left || self.superseded_by.is_some() {
            return;
        }
        match kind {
            Kind::Foca => {
                if let Err(error) = self.foca.handle_data(body, &mut effects!(self)) {
                    self.shared.counters.dropped(Dropped::FocaRejected);
                    tracing::debug!(%error, "foca rejected a datagram");
                }
            }
            // Through foca's broadcast queue: a state that is new to us is both stored and
            // passed on by gossip, so the peers the owner did not push to learn it within a
            // few gossip rounds instead of waiting for the owner's own retransmissions.
            Kind::StatePush => match self.foca.add_broadcast(body) {
                // Only a state new to us can come from a stranger worth introducing ourselves
                // to; refreshes of known states skip the second decode.
                Ok(true) => self.introduce_to_stranger(body, from),
                Ok(false) => {}
                Err(error) => {
                    self.shared.counters.dropped(Dropped::StateRejected);
                    tracing::debug!(%error, "rejected a pushed node state");
                }
            },
            Kind::Leave => match postcard::from_bytes::<Identity>(body) {
                Ok(identity) => self.peer_leaving(identity),
                Err(error) => {
                    self.shared
                        .counters
                        .dropped(Dropped::Malformed("leave_body"));
                    tracing::debug!(%error, "malformed leave notice");
                }
            },
        }
    }

    /// A node that pushes us its state knows us; if we do not know it, announce ourselves to
    /// it so its reply teaches us who it is. Without this, knowledge that is one-sided after a
    /// burst of joins (gossip retransmissions exhausted) waits for the other node to probe us,
    /// which can take a full probe round (n probe periods): 90 s in a 100-node cold start.
    fn introduce_to_stranger(&mut self, body: &[u8], from: SocketAddr) {
        let Ok(state) = NodeState::decode(body) else {
            return;
        };
        let known = self
            .lives
            .get(&state.node_id)
            .is_some_and(|(_, down_since)| down_since.is_none());
        if known || state.node_id == *self.foca.identity().node_id() {
            return;
        }
        let now = Instant::now();
        let recently = self
            .introduced
            .get(&from)
            .is_some_and(|at| now.duration_since(*at) < self.timing.rejoin_interval);
        if recently {
            return;
        }
        self.introduced.insert(from, now);
        if let Err(error) = self
            .foca
            .announce(announce_target(from), &mut effects!(self))
        {
            tracing::debug!(%error, %from, "introduction failed");
        }
    }

    fn peer_leaving(&mut self, identity: Identity) {
        let known = self.foca.iter_members().any(|m| m.id() == &identity);
        if !known {
            return;
        }
        self.leaving.insert(identity.clone());
        let down = std::iter::once(foca::Member::down(identity));
        if let Err(error) = self.foca.apply_many(down, true, &mut effects!(self)) {
            tracing::debug!(%error, "applying a leave failed");
        }
    }

    /// Processes foca's notifications (which may cause more), then publishes events and view.
    fn settle(&mut self) {
        loop {
            let notes = std::mem::take(&mut self.notes);
            if notes.is_empty() {
                break;
            }
            for note in notes {
                self.on_notification(note);
            }
        }
        let accepted = self.store.lock().take_accepted();
        let local = self.foca.identity().node_id().clone();
        for state in accepted {
            if state.node_id != local {
                self.view_dirty = true;
                self.emit(MeshEvent::Updated(state));
            }
        }
        if self.store.lock().take_dirty() {
            self.view_dirty = true;
        }
        if self.view_dirty {
            self.publish_view();
        }
    }

    fn on_notification(&mut self, note: OwnedNotification<Identity>) {
        match note {
            OwnedNotification::MemberUp(id) => self.member_up(id),
            OwnedNotification::MemberDown(id) => self.member_down(id),
            OwnedNotification::Rename(old, new) => self.renamed(old, new),
            OwnedNotification::Active => {
                self.set_status(LocalStatus::Active);
            }
            OwnedNotification::Idle => {
                if self.status != LocalStatus::Left {
                    self.set_status(LocalStatus::Isolated);
                    self.announce_to_known(false);
                    self.shared.discovery_wanted.notify_one();
                }
            }
            OwnedNotification::Defunct => self.defunct(),
            OwnedNotification::Rejoin(id) => self.renewed(id),
        }
        self.view_dirty = true;
    }

    fn member_up(&mut self, id: Identity) {
        self.resize();
        let local = self.foca.identity().clone();
        if id.node_id() == local.node_id() {
            if id.supersedes(&local) {
                self.superseded(id);
            } else {
                tracing::warn!(stale = %id, %local, "an older life of this node is gossiping; declaring it down");
                self.declare_down(id.clone(), true);
            }
            return;
        }
        // Another live identity with the same node id: keep only the newest life.
        let rivals: Vec<Identity> = self
            .foca
            .iter_members()
            .map(|m| m.id().clone())
            .filter(|other| other.node_id() == id.node_id() && other != &id)
            .collect();
        let mut previous = self
            .lives
            .get(id.node_id())
            .map(|(life, _)| life)
            .filter(|life| id.supersedes(life))
            .cloned();
        for rival in rivals {
            if id.supersedes(&rival) {
                tracing::info!(old = %rival, new = %id, "node id reappeared with a newer generation; replacing the old life");
                self.declare_down(rival.clone(), true);
                previous = Some(rival);
            } else {
                tracing::info!(old = %id, new = %rival, "ignoring an older life of a node id");
                self.declare_down(id.clone(), true);
                return;
            }
        }
        self.lives.insert(id.node_id().clone(), (id.clone(), None));
        self.join_sync(id.addr());
        match previous {
            Some(previous) => {
                self.store.lock().bury(&previous, Instant::now());
                self.emit(MeshEvent::Rejoined {
                    previous,
                    current: id,
                });
            }
            None => self.emit(MeshEvent::Joined(id)),
        }
    }

    /// Join sync: a newcomer gets our state now instead of waiting for gossip.
    fn join_sync(&mut self, to: SocketAddr) {
        if let Some(published) = &self.published {
            let bytes = published.bytes.clone();
            self.out.send(Kind::StatePush, &bytes, to);
        }
    }

    /// A newer identity replaced an older one at the same address. If the old life was down,
    /// a `MemberUp` of the new one follows and reports the rejoin; if both were active, none
    /// follows, so report it here.
    fn renamed(&mut self, old: Identity, new: Identity) {
        let old_was_active = self
            .lives
            .get(old.node_id())
            .is_some_and(|(life, down_since)| *life == old && down_since.is_none());
        if old_was_active && self.is_active(&new) {
            self.join_sync(new.addr());
            self.lives
                .insert(new.node_id().clone(), (new.clone(), None));
            self.store.lock().bury(&old, Instant::now());
            self.emit(MeshEvent::Rejoined {
                previous: old,
                current: new,
            });
        }
    }

    fn member_down(&mut self, id: Identity) {
        self.resize();
        self.suspects.remove(&id);
        let now = Instant::now();
        self.store.lock().bury(&id, now);
        if let Some((life, down_since)) = self.lives.get_mut(id.node_id())
            && *life == id
        {
            *down_since = Some(now);
        }
        if self.replaced.remove(&id) {
            return; // Reported as Rejoined when its replacement appeared.
        }
        if self.leaving.remove(&id) {
            self.emit(MeshEvent::Left(id));
        } else {
            self.emit(MeshEvent::Failed(id));
        }
    }

    /// Declares a stale life down so the whole cluster drops it.
    fn declare_down(&mut self, id: Identity, replaced: bool) {
        if replaced {
            self.replaced.insert(id.clone());
        }
        let down = std::iter::once(foca::Member::down(id));
        if let Err(error) = self.foca.apply_many(down, true, &mut effects!(self)) {
            tracing::debug!(%error, "declaring a member down failed");
        }
    }

    fn superseded(&mut self, newer: Identity) {
        if self.superseded_by.is_some() {
            return;
        }
        let local = self.foca.identity().clone();
        tracing::error!(
            %local, %newer,
            "another process claims this node id with a newer generation; leaving the cluster to it"
        );
        self.superseded_by = Some(newer.clone());
        self.emit(MeshEvent::Superseded { local, newer });
        if let Err(error) = self.foca.leave_cluster(&mut effects!(self)) {
            tracing::debug!(%error, "leaving after being superseded failed");
        }
        self.set_status(LocalStatus::Defunct);
    }

    fn defunct(&mut self) {
        // After a leave, going defunct is the point; a superseded node is already defunct.
        if self.status == LocalStatus::Left || self.superseded_by.is_some() {
            return;
        }
        // Declared down and foca could not renew on its own: take a new generation and
        // announce again.
        let Some(renewed) = foca::Identity::renew(self.foca.identity()) else {
            self.set_status(LocalStatus::Defunct);
            return;
        };
        tracing::warn!(new = %renewed, "declared down by the cluster; rejoining with a new generation");
        if let Err(error) = self
            .foca
            .change_identity(renewed.clone(), &mut effects!(self))
        {
            tracing::warn!(%error, "changing identity failed");
            self.set_status(LocalStatus::Defunct);
            return;
        }
        self.renewed(renewed);
        self.announce_to_known(false);
    }

    /// Our identity changed (foca renewed it after we were declared down): our state's
    /// generation follows it.
    fn renewed(&mut self, id: Identity) {
        if self.superseded_by.is_some() {
            return;
        }
        tracing::info!(identity = %id, "rejoining under a renewed identity");
        self.version = 0;
        self.set_status(LocalStatus::Joining);
        self.publish(Instant::now(), true);
    }

    fn set_status(&mut self, status: LocalStatus) {
        if self.status != status {
            self.status = status;
            self.view_dirty = true;
            self.emit(MeshEvent::LocalStatus(status));
        }
    }

    fn emit(&self, event: MeshEvent) {
        tracing::debug!(?event, "mesh event");
        // No receivers is fine: events are optional for embedders.
        let _ = self.shared.events.send(event);
    }

    fn is_active(&self, id: &Identity) -> bool {
        self.foca.iter_members().any(|m| m.id() == id)
    }

    /// Re-sizes foca's configuration (suspicion timeout, retransmissions) to the cluster.
    fn resize(&mut self) {
        let size = u32::try_from(self.foca.num_members() + 1).unwrap_or(u32::MAX);
        if size == self.configured_size {
            return;
        }
        let config = self.timing.foca_config(size, self.max_payload);
        match self.foca.set_config(config) {
            Ok(()) => self.configured_size = size,
            Err(error) => tracing::warn!(%error, size, "resizing foca config failed"),
        }
    }

    fn request_publish(&mut self) {
        if self.publish_scheduled {
            return;
        }
        let now = Instant::now();
        let earliest = self
            .published
            .as_ref()
            .map_or(now, |p| p.at + self.timing.state_publish_interval);
        if earliest <= now {
            self.publish(now, false);
        } else {
            self.publish_scheduled = true;
            self.timers.schedule(earliest, Tick::Publish);
        }
    }

    /// Publishes a new version of our state if it changed (or `force`): into foca's broadcast
    /// queue (piggybacked and gossiped) and pushed directly to a bounded set of peers.
    fn publish(&mut self, now: Instant, force: bool) {
        if self.status == LocalStatus::Left && !force {
            return;
        }
        let identity = self.foca.identity().clone();
        let mut state = {
            let fields = self.shared.lock_local();
            let mut state = NodeState::new(identity.node_id().clone(), identity.generation(), 0);
            state.grpc_endpoint = fields.grpc_endpoint.clone();
            state.tags = fields.tags.clone();
            state.draining = fields.draining;
            state
        };
        state.pending = self.shared.load.pending();
        state.max_concurrency = self.shared.load.max_concurrency();
        if let Some(previous) = &self.published {
            // Compare everything but the version, which is all a new publication changes.
            state.version = previous.state.version;
            if state == *previous.state && !force {
                return;
            }
        }
        self.version += 1;
        state.version = self.version;
        let bytes = match state.encode() {
            Ok(bytes) => bytes,
            Err(error) => {
                // Setters check the worst-case size, so this means a bug; keep the old state.
                tracing::error!(%error, "could not encode our own state");
                return;
            }
        };
        if let Err(error) = self.foca.add_broadcast(&bytes) {
            tracing::warn!(%error, "could not queue our state for gossip");
        }
        let state = Arc::new(state);
        self.published = Some(Published {
            at: now,
            state,
            bytes,
        });
        self.push_state(self.timing.state_push_fanout.get());
        self.view_dirty = true;
    }

    /// Sends our current state directly to up to `fanout` random active members.
    fn push_state(&mut self, fanout: usize) {
        let Some(published) = &self.published else {
            return;
        };
        let bytes = published.bytes.clone();
        let members: Vec<SocketAddr> = self.foca.iter_members().map(|m| m.id().addr()).collect();
        for addr in members.sample(&mut self.rng, fanout) {
            self.out.send(Kind::StatePush, &bytes, *addr);
        }
    }

    fn refresh_state(&mut self) {
        if matches!(self.status, LocalStatus::Left | LocalStatus::Defunct) {
            return;
        }
        self.push_state(self.timing.state_push_fanout.get());
    }

    /// Announces to seeds and discovered addresses; with `only_strangers`, skips addresses of
    /// live members.
    fn announce_to_known(&mut self, only_strangers: bool) {
        if matches!(self.status, LocalStatus::Left) || self.superseded_by.is_some() {
            return;
        }
        let own = self.foca.identity().addr();
        let members: HashSet<SocketAddr> =
            self.foca.iter_members().map(|m| m.id().addr()).collect();
        let mut targets: Vec<SocketAddr> = self
            .seeds
            .iter()
            .chain(self.discovered.iter())
            .copied()
            .filter(|a| *a != own && *a != self.local_addr)
            .filter(|a| !(only_strangers && members.contains(a)))
            .collect();
        targets.sort_unstable();
        targets.dedup();
        for addr in targets {
            let target = announce_target(addr);
            if let Err(error) = self.foca.announce(target, &mut effects!(self)) {
                tracing::debug!(%error, %addr, "announce failed");
            }
        }
    }

    fn maintain(&mut self, now: Instant) {
        // Suspicion is not a foca notification; diff it here.
        let mut current = HashSet::new();
        let mut newly = Vec::new();
        for member in self.foca.iter_members() {
            if member.state() == foca::State::Suspect {
                if !self.suspects.contains(member.id()) {
                    newly.push(member.id().clone());
                }
                current.insert(member.id().clone());
            }
        }
        if current != self.suspects {
            self.view_dirty = true;
        }
        self.suspects = current;
        for id in newly {
            self.emit(MeshEvent::Suspect(id));
        }
        let members: HashSet<(NodeId, u64)> = self
            .foca
            .iter_members()
            .map(|m| (m.id().node_id().clone(), m.id().generation()))
            .collect();
        let rejoin = self.timing.rejoin_interval;
        self.introduced
            .retain(|_, at| now.duration_since(*at) < rejoin);
        let forget = self.timing.remove_down_after;
        self.lives.retain(|_, (_, down_since)| {
            down_since.is_none_or(|since| now.duration_since(since) < forget)
        });
        let local = self.foca.identity().clone();
        let keep = self.timing.state_refresh_interval * 10;
        self.store.lock().prune(
            |id, generation| {
                members.contains(&(id.clone(), generation))
                    || (id == local.node_id() && generation == local.generation())
            },
            now,
            keep,
        );
    }

    fn leave(&mut self, reply: oneshot::Sender<()>) {
        if self.status == LocalStatus::Left {
            let _ = reply.send(());
            return;
        }
        self.shared.lock_local().draining = true;
        let now = Instant::now();
        self.publish(now, true);
        self.push_state(usize::MAX);
        self.send_leave_notices();
        if let Err(error) = self.foca.leave_cluster(&mut effects!(self)) {
            tracing::debug!(%error, "foca leave failed");
        }
        self.set_status(LocalStatus::Left);
        self.leave_reply = Some(reply);
        // A second round shortly after makes a single lost datagram harmless.
        let linger = self.timing.probe_rtt.min(self.timing.leave_timeout / 2);
        self.timers.schedule(now + linger, Tick::FinishLeave);
    }

    fn send_leave_notices(&mut self) {
        let Ok(body) = postcard::to_allocvec(self.foca.identity()) else {
            return;
        };
        let members: Vec<SocketAddr> = self.foca.iter_members().map(|m| m.id().addr()).collect();
        for addr in members {
            self.out.send(Kind::Leave, &body, addr);
        }
    }

    fn publish_view(&mut self) {
        self.view_dirty = false;
        let now = Instant::now();
        let local_identity = self.foca.identity().clone();
        let store = self.store.lock();
        let mut peers: Vec<Member> = Vec::with_capacity(self.foca.num_members());
        for member in self.foca.iter_members() {
            let id = member.id();
            if id.node_id() == local_identity.node_id() {
                continue; // Never two owners of one name: our own id is ours.
            }
            let entry = store
                .get(id.node_id())
                .filter(|e| e.state.generation == id.generation());
            peers.push(Member {
                identity: id.clone(),
                status: match member.state() {
                    foca::State::Suspect => PeerStatus::Suspect,
                    _ => PeerStatus::Alive,
                },
                state: entry.map(|e| Arc::clone(&e.state)),
                refreshed_at: entry.map(|e| e.refreshed_at),
                local: false,
            });
        }
        drop(store);
        // If two lives of one node id are momentarily both active, keep the newest.
        peers.sort_by(|a, b| {
            a.node_id()
                .cmp(b.node_id())
                .then(b.identity.generation().cmp(&a.identity.generation()))
        });
        peers.dedup_by(|later, first| later.node_id() == first.node_id());
        self.epoch += 1;
        let view = MembershipView {
            local: Member {
                identity: local_identity,
                status: PeerStatus::Alive,
                state: self.published.as_ref().map(|p| Arc::clone(&p.state)),
                refreshed_at: Some(now),
                local: true,
            },
            peers,
            status: self.status,
            epoch: self.epoch,
        };
        self.shared.publish_view(view);
    }
}

/// A stand-in identity for announcing to an address whose node we do not know yet: foca
/// accepts an announce addressed to any identity with the receiver's address.
fn announce_target(addr: SocketAddr) -> Identity {
    Identity::new(NodeId::placeholder(), addr, 0)
}

/// A generator seeded by the operating system, or by the clock if that fails: gossip needs
/// spread, not secrecy, and starting must not panic.
fn os_seeded() -> StdRng {
    StdRng::try_from_rng(&mut rand::rngs::SysRng).unwrap_or_else(|error| {
        tracing::warn!(%error, "the operating system's random source failed; seeding from the clock");
        StdRng::seed_from_u64(crate::identity::generation_now() ^ u64::from(std::process::id()))
    })
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
