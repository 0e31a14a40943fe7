//! Publishing our own state: versions, coalescing, and the direct pushes that make a change
//! reach every peer in one datagram instead of several gossip rounds.
//!
//! A state travels three ways (see the crate docs): foca's broadcast queue (piggybacked and
//! gossiped, memberlist-style `retransmit_multiplier × ⌈log10(n + 1)⌉` times), a direct push to
//! up to [`Timing::state_push_fanout`](crate::Timing::state_push_fanout) random members on
//! every new version and to every newcomer (join sync), and a periodic re-send (anti-entropy).
//! Piggybacking alone converges slowly (foca issues #3 and #5), hence the pushes.
//!
//! Load changes arrive in bursts (a task guard per request), so a new version is published at
//! most once per [`Timing::state_publish_interval`](crate::Timing::state_publish_interval): a
//! change inside that window schedules one publication at its end, which carries whatever the
//! state is by then. [`Publisher`] keeps that bookkeeping, and its step methods (given the
//! membership task's step context) hand the result to foca and the socket.

use std::{
    net::SocketAddr,
    sync::{Arc, PoisonError},
    time::Duration,
};

use tokio::time::Instant;

use super::{context::Context, timers::Tick};
use crate::{LocalStatus, NodeState, transport::Transport, wire::Kind};

/// The version of our state last published, and when.
#[derive(Debug)]
pub(crate) struct Published {
    pub(crate) at: Instant,
    pub(crate) state: Arc<NodeState>,
    pub(crate) bytes: Vec<u8>,
}

/// Versions and coalescing of our own state, and where refreshes of it go next.
#[derive(Debug, Default)]
pub(crate) struct Publisher {
    version: u64,
    published: Option<Published>,
    scheduled: bool,
    /// Where the next anti-entropy refresh starts in the sorted member list.
    refresh_cursor: usize,
    /// Our load or local fields changed since the last publication.
    changed: bool,
}

/// What to do about a change of our state.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Request {
    /// Publish now: the last publication is at least an interval old.
    Now,
    /// Publish at this time (schedule it): the rate limit has not passed yet.
    At(Instant),
    /// Nothing: a publication is already scheduled and will carry this change.
    Scheduled,
}

impl Publisher {
    /// Our state changed at `now`; at most one version per `interval` is published.
    pub(crate) fn request(&mut self, now: Instant, interval: Duration) -> Request {
        self.changed = true;
        if self.scheduled {
            return Request::Scheduled;
        }
        let earliest = self.published.as_ref().map_or(now, |p| p.at + interval);
        if earliest <= now {
            Request::Now
        } else {
            self.scheduled = true;
            Request::At(earliest)
        }
    }

    /// The scheduled publication is due.
    pub(crate) fn fired(&mut self) {
        self.scheduled = false;
    }

    /// Publishes `candidate` (whose version is ignored) as the next version if it differs from
    /// the published state in anything but the version, if a change was
    /// [requested](Self::request) since the last publication, or if `force`. `None` if nothing
    /// was published.
    ///
    /// A requested change is published even when the state came back to what was published
    /// (a task that began and ended within one interval): routers count a call they placed on
    /// us until a version newer than the one they had when we answered it, so a call that came
    /// and went between two versions must still produce the next one, or they would count it
    /// against us until some later change (mesh-route's optimistic accounting).
    pub(crate) fn next_version(
        &mut self,
        mut candidate: NodeState,
        now: Instant,
        force: bool,
    ) -> Option<&Published> {
        let changed = std::mem::take(&mut self.changed);
        if let Some(previous) = &self.published {
            candidate.version = previous.state.version;
            if candidate == *previous.state && !force && !changed {
                return None;
            }
        }
        self.version += 1;
        candidate.version = self.version;
        let bytes = match candidate.encode() {
            Ok(bytes) => bytes,
            Err(error) => {
                // Setters check the worst-case size, so this means a bug; keep the old state.
                tracing::error!(%error, "could not encode our own state");
                return None;
            }
        };
        self.published = Some(Published {
            at: now,
            state: Arc::new(candidate),
            bytes,
        });
        self.published.as_ref()
    }

    /// A new generation starts: versions count from 1 again.
    pub(crate) fn restart(&mut self) {
        self.version = 0;
    }

    /// The last published version.
    pub(crate) fn current(&self) -> Option<&Published> {
        self.published.as_ref()
    }

    /// The next `fanout` of `members` in address order, continuing where the previous refresh
    /// stopped: every member is refreshed once every `ceil(members / fanout)` refreshes (a
    /// random choice would leave some peer unrefreshed for many intervals at scale, and
    /// routers would take its state for stale).
    pub(crate) fn refresh_targets(
        &mut self,
        members: &mut [SocketAddr],
        fanout: usize,
    ) -> Vec<SocketAddr> {
        if members.is_empty() || fanout == 0 {
            return Vec::new();
        }
        members.sort_unstable();
        let start = self.refresh_cursor % members.len();
        let take = fanout.min(members.len());
        self.refresh_cursor = (start + take) % members.len();
        members
            .iter()
            .cycle()
            .skip(start)
            .take(take)
            .copied()
            .collect()
    }
}

/// The task's steps: publications handed to foca and the socket.
impl Publisher {
    /// Our state changed (load or local fields): publish now or schedule it.
    pub(super) fn state_changed<T: Transport>(&mut self, cx: &mut Context<T>) {
        let interval = cx.timing.state_publish_interval;
        match self.request(cx.now, interval) {
            Request::Now => self.publish(cx, false),
            Request::At(at) => cx.io.timers.schedule(at, Tick::Publish),
            Request::Scheduled => {}
        }
    }

    /// The scheduled publication is due: it carries whatever our state is by now.
    pub(super) fn publish_scheduled<T: Transport>(&mut self, cx: &mut Context<T>) {
        self.fired();
        self.publish(cx, false);
    }

    /// Publishes a new version of our state if it changed (or `force`): into foca's broadcast
    /// queue and pushed directly to a bounded set of peers.
    pub(super) fn publish<T: Transport>(&mut self, cx: &mut Context<T>, force: bool) {
        if cx.status() == LocalStatus::Left && !force {
            return;
        }
        let identity = cx.foca.identity();
        // Held from reading the load to recording the new version, so that a task begun
        // before `Membership::version_counting_current_load` reads the version is counted by
        // the version it names (mesh-route's accounting of forwarded calls relies on it).
        let shared = Arc::clone(&cx.shared);
        let mut last_published = shared
            .published
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut candidate = shared
            .lock_local()
            .node_state(identity.node_id().clone(), identity.generation());
        candidate.pending = shared.load.pending();
        candidate.max_concurrency = shared.load.max_concurrency();
        let Some(published) = self.next_version(candidate, cx.now, force) else {
            return;
        };
        let (state, bytes) = (Arc::clone(&published.state), published.bytes.clone());
        *last_published = (state.generation, state.version);
        drop(last_published);
        let foca = &mut cx.foca;
        if let Err(error) = cx.store.with_staged(state, || foca.add_broadcast(&bytes)) {
            tracing::warn!(%error, "could not queue our state for gossip");
        }
        let fanout = cx.timing.state_push_fanout.get();
        self.push(cx, fanout);
        cx.view_changed();
    }

    /// Sends our current state directly to up to `fanout` random active members.
    pub(super) fn push<T: Transport>(&mut self, cx: &mut Context<T>, fanout: usize) {
        let Some(published) = self.current() else {
            return;
        };
        let bytes = published.bytes.clone();
        let members = cx.member_addrs();
        for addr in cx.choose_peers(&members, fanout) {
            cx.io.out.send(Kind::StatePush, &bytes, addr);
        }
    }

    /// Anti-entropy: re-send our state while we are part of a cluster.
    pub(super) fn refresh<T: Transport>(&mut self, cx: &mut Context<T>) {
        if matches!(cx.status(), LocalStatus::Left | LocalStatus::Defunct) {
            return;
        }
        let Some(published) = self.current() else {
            return;
        };
        let bytes = published.bytes.clone();
        let mut members = cx.member_addrs();
        let fanout = cx.timing.state_push_fanout.get();
        for addr in self.refresh_targets(&mut members, fanout) {
            cx.io.out.send(Kind::StatePush, &bytes, addr);
        }
    }

    /// Relay (one hop): a new version of a peer's state, pushed to us by its owner, goes on to
    /// up to [`Timing::state_relay_fanout`](crate::Timing::state_relay_fanout) random members
    /// other than the owner. Only updates are relayed, never a first sighting (a join sync or
    /// a cold start would otherwise multiply by the fan-out), and only once: receivers of a
    /// relay, which comes from someone other than the owner, do not relay it again. Each
    /// version is relayed at most once per node because only a version new to us gets here.
    pub(super) fn relay<T: Transport>(
        &mut self,
        cx: &mut Context<T>,
        state: &NodeState,
        bytes: &[u8],
        owner: SocketAddr,
    ) {
        let fanout = cx.timing.state_relay_fanout;
        // Up to the push fan-out the owner pushed to every member: nothing to relay.
        if fanout == 0 || cx.foca.num_members() <= cx.timing.state_push_fanout.get() {
            return;
        }
        let own = cx.foca.identity().addr();
        let members: Vec<SocketAddr> = cx
            .foca
            .iter_members()
            .map(|m| m.id().addr())
            .filter(|a| *a != owner && *a != own)
            .collect();
        for addr in cx.choose_peers(&members, fanout) {
            cx.io.out.send(Kind::StatePush, bytes, addr);
        }
        tracing::trace!(node = %state.node_id, version = state.version, "relayed a state");
    }

    /// Join sync: a newcomer gets our state now instead of waiting for gossip.
    pub(super) fn join_sync<T: Transport>(&mut self, cx: &mut Context<T>, to: SocketAddr) {
        if let Some(published) = self.current() {
            let bytes = published.bytes.clone();
            cx.io.out.send(Kind::StatePush, &bytes, to);
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};

    use super::{super::context::choose, *};
    use crate::NodeId;

    fn state(pending: u32) -> NodeState {
        let mut state = NodeState::new(NodeId::new("a").unwrap(), 7, 0);
        state.max_concurrency = 4;
        state.pending = pending;
        state
    }

    fn publisher() -> Publisher {
        Publisher::default()
    }

    #[test]
    fn versions_count_changes_only() {
        let mut publisher = publisher();
        let now = Instant::now();
        let first = publisher.next_version(state(0), now, false).unwrap();
        assert_eq!(first.state.version, 1);
        assert_eq!(NodeState::decode(&first.bytes).unwrap(), *first.state);
        // The same state again (whatever version it claims) publishes nothing.
        let mut same = state(0);
        same.version = 99;
        assert!(publisher.next_version(same, now, false).is_none());
        assert_eq!(publisher.current().unwrap().state.version, 1);
        // A change is the next version; forcing republishes an unchanged state.
        assert_eq!(
            publisher
                .next_version(state(1), now, false)
                .unwrap()
                .state
                .version,
            2
        );
        assert_eq!(
            publisher
                .next_version(state(1), now, true)
                .unwrap()
                .state
                .version,
            3
        );
        assert_eq!(publisher.current().unwrap().state.pending, 1);
    }

    #[test]
    fn a_change_that_came_back_within_the_interval_is_still_a_new_version() {
        let mut publisher = publisher();
        let now = Instant::now();
        let interval = Duration::from_millis(20);
        publisher.request(now, interval);
        assert_eq!(
            publisher
                .next_version(state(0), now, false)
                .unwrap()
                .state
                .version,
            1
        );
        // A task began and ended before the next publication: the load is back at 0, but a
        // router that placed that task on us waits for a newer version to stop counting it.
        publisher.request(now, interval);
        publisher.request(now, interval);
        publisher.fired();
        assert_eq!(
            publisher
                .next_version(state(0), now + interval, false)
                .unwrap()
                .state
                .version,
            2
        );
        // Without a requested change nothing is published.
        assert!(
            publisher
                .next_version(state(0), now + interval, false)
                .is_none()
        );
    }

    #[test]
    fn a_new_generation_counts_from_one_again() {
        let mut publisher = publisher();
        let now = Instant::now();
        publisher.next_version(state(0), now, false);
        publisher.next_version(state(1), now, false);
        publisher.restart();
        let mut renewed = state(1);
        renewed.generation = 8;
        let published = publisher.next_version(renewed, now, true).unwrap();
        assert_eq!(
            (published.state.generation, published.state.version),
            (8, 1)
        );
    }

    #[test]
    fn a_state_that_cannot_be_encoded_keeps_the_previous_one() {
        let mut publisher = publisher();
        let now = Instant::now();
        publisher.next_version(state(0), now, false);
        let mut huge = state(0);
        for i in 0..40 {
            huge.tags.insert(format!("key-{i}"), "v".repeat(30));
        }
        assert!(publisher.next_version(huge, now, false).is_none());
        assert!(publisher.current().unwrap().state.tags.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn changes_within_the_interval_are_coalesced_into_one_publication() {
        let mut publisher = publisher();
        let interval = Duration::from_millis(100);
        let t0 = Instant::now();
        // Nothing published yet: at once.
        assert_eq!(publisher.request(t0, interval), Request::Now);
        publisher.next_version(state(0), t0, false);
        // Within the interval: one publication at its end, and later changes ride along.
        let t1 = t0 + Duration::from_millis(30);
        assert_eq!(publisher.request(t1, interval), Request::At(t0 + interval));
        assert_eq!(publisher.request(t1, interval), Request::Scheduled);
        assert_eq!(
            publisher.request(t0 + Duration::from_millis(200), interval),
            Request::Scheduled
        );
        publisher.fired();
        let t2 = t0 + interval;
        publisher.next_version(state(3), t2, false);
        // After the interval, a change is published at once.
        assert_eq!(publisher.request(t2 + interval, interval), Request::Now);
    }

    #[test]
    fn pushes_go_to_at_most_fanout_distinct_members() {
        let mut publisher = publisher();
        let mut rng = StdRng::seed_from_u64(1);
        let members: Vec<SocketAddr> = (1..=10)
            .map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
            .collect();
        let targets = choose(&mut rng, &members, 3);
        assert_eq!(targets.len(), 3);
        let distinct: std::collections::HashSet<_> = targets.iter().collect();
        assert_eq!(distinct.len(), 3);
        assert!(targets.iter().all(|t| members.contains(t)));
        assert_eq!(choose(&mut rng, &members, usize::MAX).len(), 10);
        // Refreshes go round: every member within ceil(10 / 4) = 3 refreshes.
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3 {
            let mut shuffled = members.clone();
            shuffled.reverse();
            for target in publisher.refresh_targets(&mut shuffled, 4) {
                seen.insert(target);
            }
        }
        assert_eq!(seen.len(), 10, "every member refreshed within three rounds");
        assert!(publisher.refresh_targets(&mut [], 4).is_empty());
        assert!(choose(&mut rng, &[], 3).is_empty());
        // Seeded: the same seed chooses the same peers.
        assert_eq!(
            choose(&mut StdRng::seed_from_u64(9), &members, 4),
            choose(&mut StdRng::seed_from_u64(9), &members, 4)
        );
    }
}
