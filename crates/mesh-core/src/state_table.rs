//! The table of every node's latest state, and the foca broadcast handler that feeds it.
//!
//! Node states travel three ways (see the crate docs): piggybacked on SWIM messages as foca
//! custom broadcasts, pushed directly by their owner, and refreshed periodically. All three end
//! here, where a state is kept only if its `(generation, version)` is newer than what we hold.
//! Foca re-disseminates exactly the states that [`StateGossip`]'s
//! [`receive_item`](foca::BroadcastHandler::receive_item) reports as new, so a stale copy
//! still circulating dies out instead of undoing a newer one.
//!
//! A state that is already decoded (our own, or one its owner pushed to us, which the receive
//! task decoded) is *staged* before it is handed to foca's broadcast queue, and the handler
//! takes it as is: every state is decoded once.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::time::Instant;

use crate::{Identity, NodeId, NodeState, StateError, budget::GossipBudget};

/// What applying a received state did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Applied {
    /// A newer version replaced ours (or it is the first we hold).
    New,
    /// The same version as ours arrived directly from its owner: it is still current.
    Refreshed,
    /// Older than ours, or about a life of the node that is known to be over.
    Stale,
}

#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) state: Arc<NodeState>,
    pub(crate) refreshed_at: Instant,
}

/// Latest state per node, plus the generations known to be dead.
#[derive(Debug, Default)]
pub(crate) struct StateStore {
    entries: HashMap<NodeId, Entry>,
    /// Highest generation of each node id that went down, so late copies of its last state
    /// (still piggybacked somewhere) are not resurrected.
    buried: HashMap<NodeId, (u64, Instant)>,
    /// States accepted since the owner last drained them; they become `Updated` events.
    accepted: Vec<Arc<NodeState>>,
    /// Set when anything readers can see changed (new state, refreshed age).
    dirty: bool,
    /// A decoded state about to be offered to foca ([`SharedStore::with_staged`]).
    staged: Option<Arc<NodeState>>,
}

impl StateStore {
    pub(crate) fn apply(&mut self, state: Arc<NodeState>, now: Instant, direct: bool) -> Applied {
        if self
            .buried
            .get(&state.node_id)
            .is_some_and(|(generation, _)| state.generation <= *generation)
        {
            return Applied::Stale;
        }
        if let Some(entry) = self.entries.get_mut(&state.node_id)
            && !state.is_newer_than(&entry.state)
        {
            if direct && entry.state == state {
                entry.refreshed_at = now;
                self.dirty = true;
                return Applied::Refreshed;
            }
            return Applied::Stale;
        }
        self.accepted.push(Arc::clone(&state));
        self.entries.insert(
            state.node_id.clone(),
            Entry {
                state,
                refreshed_at: now,
            },
        );
        self.dirty = true;
        Applied::New
    }

    /// Forgets the state of a life that ended, and refuses it from now on.
    pub(crate) fn bury(&mut self, identity: &Identity, now: Instant) {
        let node_id = identity.node_id();
        if self
            .entries
            .get(node_id)
            .is_some_and(|e| e.state.generation <= identity.generation())
        {
            self.entries.remove(node_id);
            self.dirty = true;
        }
        let tomb = self
            .buried
            .entry(node_id.clone())
            .or_insert((identity.generation(), now));
        if identity.generation() >= tomb.0 {
            *tomb = (identity.generation(), now);
        }
    }

    pub(crate) fn get(&self, node_id: &NodeId) -> Option<&Entry> {
        self.entries.get(node_id)
    }

    /// Drops states that belong to no current member and tombstones older than `keep`.
    pub(crate) fn prune(
        &mut self,
        is_member: impl Fn(&NodeId, u64) -> bool,
        now: Instant,
        keep: std::time::Duration,
    ) {
        let before = self.entries.len();
        self.entries.retain(|id, e| {
            is_member(id, e.state.generation) || now.duration_since(e.refreshed_at) < keep
        });
        if self.entries.len() != before {
            self.dirty = true;
        }
        self.buried
            .retain(|_, (_, since)| now.duration_since(*since) < keep);
    }

    pub(crate) fn take_accepted(&mut self) -> Vec<Arc<NodeState>> {
        std::mem::take(&mut self.accepted)
    }

    /// Whether accepted states or changes wait to be published.
    pub(crate) fn has_pending(&self) -> bool {
        self.dirty || !self.accepted.is_empty()
    }

    pub(crate) fn take_dirty(&mut self) -> bool {
        std::mem::replace(&mut self.dirty, false)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Shared between the foca broadcast handler and the task that owns foca. Only that one task
/// ever locks it, so the lock is never contended; it exists because foca owns its handler.
#[derive(Debug, Clone, Default)]
pub(crate) struct SharedStore(Arc<Mutex<StateStore>>);

impl SharedStore {
    pub(crate) fn lock(&self) -> MutexGuard<'_, StateStore> {
        // A poisoned lock means a panic elsewhere in this task; the data is still consistent
        // (every mutation is a single insert/remove), so keep going.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `add` (foca's [`add_broadcast`](foca::Foca::add_broadcast) of `state`'s bytes)
    /// with `state` staged: the handler takes it instead of decoding the bytes again.
    pub(crate) fn with_staged<R>(&self, state: Arc<NodeState>, add: impl FnOnce() -> R) -> R {
        self.lock().staged = Some(state);
        let added = add();
        // Normally taken by the handler; not if foca refused the bytes before asking it.
        self.lock().staged = None;
        added
    }
}

/// The key foca uses to replace an older state of a node that is still being disseminated.
#[derive(Debug, Clone)]
pub(crate) struct StateKey {
    node_id: NodeId,
    rank: (u64, u64),
}

impl foca::Invalidates for StateKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.node_id == other.node_id && self.rank > other.rank
    }
}

/// foca's custom-broadcast handler for node states.
pub(crate) struct StateGossip {
    store: SharedStore,
    budget: GossipBudget,
    /// Our own node: its states are always gossiped.
    local: NodeId,
    /// First states pushed to us that were queued for gossip in the current second, and when
    /// that second began.
    first_pushes: (Instant, u32),
}

impl StateGossip {
    /// The most first states pushed to us that are queued for gossip per second: a new version
    /// enters foca's queue level with at most this many unsent first states, so it goes out in
    /// one of the next two datagrams. Nodes joining or restarting one at a time, or up to this
    /// many a second, are passed on by everyone who hears from them; a cold start's burst of
    /// first states is not.
    const FIRST_PUSHES_PER_SECOND: u32 = 16;

    pub(crate) fn new(store: SharedStore, budget: GossipBudget, local: NodeId) -> Self {
        Self {
            store,
            budget,
            local,
            first_pushes: (Instant::now(), 0),
        }
    }

    /// Whether a first state pushed to us at `now` may still be queued for gossip this second.
    fn admit_first_push(&mut self, now: Instant) -> bool {
        let (since, admitted) = &mut self.first_pushes;
        if now.duration_since(*since) >= std::time::Duration::from_secs(1) {
            (*since, *admitted) = (now, 0);
        }
        *admitted += 1;
        *admitted <= Self::FIRST_PUSHES_PER_SECOND
    }
}

impl foca::BroadcastHandler<Identity> for StateGossip {
    type Key = StateKey;
    type Error = StateError;

    /// `sender` is `None` for states we add ourselves: our own, and states pushed to us
    /// directly (which also refresh an unchanged state's age). Only a state that is new to us
    /// goes on to be gossiped, and of the first states of nodes that came in a push only
    /// [`Self::FIRST_PUSHES_PER_SECOND`]: their owners push them to every member they see
    /// (join sync), and a burst of them only fills the queue. After a cold start of 1,000
    /// nodes every node queued 999 such states, each to be sent `max_transmissions` times,
    /// and a load change made in the next seconds waited behind them: one node saw it 7.5 s
    /// late. Not gossiping any pushed first state was tried and is worse under loss: at 100
    /// nodes and 30% loss a restarted node's state then took 20 s (median of 10 restarts) to
    /// reach every node instead of 1 s, since only the nodes its push missed passed it on. A
    /// first state that came by gossip is always passed on, and so is every newer version.
    fn receive_item(
        &mut self,
        data: &[u8],
        sender: Option<&Identity>,
    ) -> Result<Option<StateKey>, StateError> {
        let direct = sender.is_none();
        // States we add ourselves are staged decoded; only gossiped ones are decoded here.
        let staged = if direct {
            self.store.lock().staged.take()
        } else {
            None
        };
        let state = match staged {
            Some(state) => state,
            None => Arc::new(NodeState::decode(data)?),
        };
        let key = StateKey {
            node_id: state.node_id.clone(),
            rank: (state.generation, state.version),
        };
        let now = Instant::now();
        let (applied, pushed_first) = {
            let mut store = self.store.lock();
            let pushed_first =
                direct && state.node_id != self.local && store.get(&key.node_id).is_none();
            (store.apply(state, now, direct), pushed_first)
        };
        match applied {
            Applied::New if !pushed_first || self.admit_first_push(now) => Ok(Some(key)),
            Applied::New | Applied::Refreshed | Applied::Stale => Ok(None),
        }
    }

    /// States ride along only within the gossip byte budget (`budget.rs`).
    fn should_add_broadcast_data(&self, _member: &Identity) -> bool {
        self.budget.may_carry_states()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use foca::{BroadcastHandler, Invalidates};

    use super::*;

    fn state(node: &str, generation: u64, version: u64) -> Arc<NodeState> {
        let mut s = NodeState::new(NodeId::new(node).unwrap(), generation, version);
        s.max_concurrency = 4;
        Arc::new(s)
    }

    #[tokio::test(start_paused = true)]
    async fn newer_replaces_older_and_stale_is_dropped() {
        let mut store = StateStore::default();
        let now = Instant::now();
        assert_eq!(store.apply(state("a", 1, 1), now, false), Applied::New);
        assert_eq!(store.apply(state("a", 1, 3), now, false), Applied::New);
        assert_eq!(store.apply(state("a", 1, 2), now, false), Applied::Stale);
        assert_eq!(store.apply(state("a", 1, 3), now, false), Applied::Stale);
        assert_eq!(store.apply(state("a", 2, 1), now, false), Applied::New);
        assert_eq!(
            store.get(&NodeId::new("a").unwrap()).unwrap().state.version,
            1
        );
        assert_eq!(store.take_accepted().len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn direct_push_of_the_same_version_refreshes_age() {
        let mut store = StateStore::default();
        let t0 = Instant::now();
        store.apply(state("a", 1, 1), t0, false);
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(store.apply(state("a", 1, 1), t1, false), Applied::Stale);
        assert_eq!(store.apply(state("a", 1, 1), t1, true), Applied::Refreshed);
        assert_eq!(
            store.get(&NodeId::new("a").unwrap()).unwrap().refreshed_at,
            t1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn buried_lives_stay_buried_but_a_restart_is_accepted() {
        let mut store = StateStore::default();
        let now = Instant::now();
        store.apply(state("a", 5, 9), now, false);
        let dead = Identity::new(NodeId::new("a").unwrap(), "127.0.0.1:1".parse().unwrap(), 5);
        store.bury(&dead, now);
        assert_eq!(store.len(), 0);
        assert_eq!(store.apply(state("a", 5, 10), now, false), Applied::Stale);
        assert_eq!(store.apply(state("a", 6, 1), now, false), Applied::New);
    }

    #[tokio::test(start_paused = true)]
    async fn prune_drops_non_members_after_grace() {
        let mut store = StateStore::default();
        let now = Instant::now();
        store.apply(state("a", 1, 1), now, false);
        store.apply(state("b", 1, 1), now, false);
        let later = now + Duration::from_secs(60);
        store.prune(|id, _| id.as_str() == "a", later, Duration::from_secs(30));
        assert_eq!(store.len(), 1);
    }

    /// The gossip handler of node `me` over `store`, without a byte budget.
    fn gossip_as_me(store: &SharedStore) -> StateGossip {
        StateGossip::new(
            store.clone(),
            GossipBudget::default(),
            NodeId::new("me").unwrap(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn handler_reports_only_new_states_for_dissemination() {
        let store = SharedStore::default();
        let mut gossip = gossip_as_me(&store);
        let bytes = state("a", 1, 1).encode().unwrap();
        let sender = Identity::new(NodeId::new("b").unwrap(), "127.0.0.1:2".parse().unwrap(), 1);
        assert!(
            gossip
                .receive_item(&bytes, Some(&sender))
                .unwrap()
                .is_some()
        );
        assert!(
            gossip
                .receive_item(&bytes, Some(&sender))
                .unwrap()
                .is_none()
        );
        // A direct push of the same version refreshes it, but is not gossiped again.
        assert!(gossip.receive_item(&bytes, None).unwrap().is_none());
        let newer = state("a", 1, 2).encode().unwrap();
        assert!(gossip.receive_item(&newer, None).unwrap().is_some());
        assert!(gossip.receive_item(b"\xff\xff", None).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_first_states_pushed_to_us_is_held_but_only_partly_gossiped() {
        let store = SharedStore::default();
        let mut gossip = gossip_as_me(&store);
        let per_second = StateGossip::FIRST_PUSHES_PER_SECOND as usize;
        let push_first = |gossip: &mut StateGossip, node: &str| {
            let first = state(node, 1, 1).encode().unwrap();
            gossip.receive_item(&first, None).unwrap().is_some()
        };
        // A cold start: many nodes' join syncs at once. All are held, a second's worth is
        // passed on.
        let queued = (0..3 * per_second)
            .filter(|i| push_first(&mut gossip, &format!("n{i}")))
            .count();
        assert_eq!(queued, per_second);
        assert_eq!(store.lock().len(), 3 * per_second);
        // Newer versions are always news to pass on, pushed or gossiped, and so are our own.
        let newer = state("n40", 1, 2).encode().unwrap();
        assert!(gossip.receive_item(&newer, None).unwrap().is_some());
        let own = state("me", 1, 1).encode().unwrap();
        assert!(gossip.receive_item(&own, None).unwrap().is_some());
        // A first state that came by gossip is passed on whatever the burst.
        let sender = Identity::new(NodeId::new("b").unwrap(), "127.0.0.1:2".parse().unwrap(), 1);
        let gossiped = state("g", 1, 1).encode().unwrap();
        assert!(
            gossip
                .receive_item(&gossiped, Some(&sender))
                .unwrap()
                .is_some()
        );
        // A second later, a node that joins or restarts on its own is passed on again.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(push_first(&mut gossip, "late"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_staged_state_is_taken_as_is_instead_of_decoding_again() {
        let store = SharedStore::default();
        let mut gossip = gossip_as_me(&store);
        // Bytes that do not decode: only the staged state can make this succeed.
        let added = store.with_staged(state("me", 1, 1), || gossip.receive_item(b"\xff", None));
        assert!(added.unwrap().is_some());
        assert_eq!(
            store
                .lock()
                .get(&NodeId::new("me").unwrap())
                .unwrap()
                .state
                .version,
            1
        );
        // Nothing stays staged for the next call, and gossiped states are always decoded.
        assert!(gossip.receive_item(b"\xff", None).is_err());
        let sender = Identity::new(NodeId::new("b").unwrap(), "127.0.0.1:2".parse().unwrap(), 1);
        let staged_but_gossiped = store.with_staged(state("me", 1, 2), || {
            gossip.receive_item(b"\xff", Some(&sender))
        });
        assert!(staged_but_gossiped.is_err());
    }

    #[test]
    fn keys_invalidate_older_versions_of_the_same_node_only() {
        let key = |n: &str, g, v| StateKey {
            node_id: NodeId::new(n).unwrap(),
            rank: (g, v),
        };
        assert!(key("a", 1, 2).invalidates(&key("a", 1, 1)));
        assert!(key("a", 2, 0).invalidates(&key("a", 1, 9)));
        assert!(!key("a", 1, 1).invalidates(&key("a", 1, 2)));
        assert!(!key("a", 1, 1).invalidates(&key("a", 1, 1)));
        assert!(!key("b", 9, 9).invalidates(&key("a", 1, 1)));
    }
}
