//! A cluster of real [`Membership`] nodes on one [`SimNetwork`], started, crashed and
//! restarted by a driver that reads their views and events.

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::{sync::broadcast::error::RecvError, task::JoinHandle, time::Instant};

use super::network::{LinkConfig, SimNetwork};
use crate::{Membership, MembershipView, MeshEvent, MeshStats, NodeId, StartError, Timing};

/// An event as one node saw it, and when (time since the cluster was created).
#[derive(Debug, Clone)]
pub struct Logged {
    /// Simulated time since [`SimCluster::new`].
    pub at: Duration,
    /// Index of the node that saw it.
    pub observer: usize,
    /// What it saw.
    pub event: MeshEvent,
}

/// Which events the cluster keeps. `Updated` events are kept only for tracked nodes: a busy
/// cluster of a thousand nodes sees hundreds of thousands of them per simulated second.
#[derive(Debug)]
struct EventLog {
    events: Vec<Logged>,
    tracked: HashSet<NodeId>,
    keep: fn(&MeshEvent) -> bool,
}

impl Default for EventLog {
    fn default() -> Self {
        Self {
            events: Vec::new(),
            tracked: HashSet::new(),
            keep: SimCluster::default_filter,
        }
    }
}

/// One host of the cluster.
#[derive(Debug)]
struct SimNode {
    id: NodeId,
    addr: SocketAddr,
    seeds: Vec<SocketAddr>,
    /// `None` while crashed.
    membership: Option<Membership>,
    logger: Option<JoinHandle<()>>,
    boots: u64,
}

/// A cluster of nodes running the real membership code over a [`SimNetwork`], on the tokio
/// clock. Create it inside a runtime with paused time (`start_paused`), so simulated time
/// jumps from one timer to the next instead of passing.
#[derive(Debug)]
pub struct SimCluster {
    network: SimNetwork,
    timing: Timing,
    seed: u64,
    nodes: Vec<SimNode>,
    log: Arc<Mutex<EventLog>>,
    epoch: Instant,
}

impl SimCluster {
    /// An empty cluster: nodes run `timing`, and every random choice of the network and the
    /// nodes derives from `seed`.
    pub fn new(seed: u64, timing: Timing, link: LinkConfig) -> Self {
        Self {
            network: SimNetwork::new(seed, link),
            timing,
            seed,
            nodes: Vec::new(),
            log: Arc::default(),
            epoch: Instant::now(),
        }
    }

    /// `n` nodes named `node-0` … `node-{n-1}`, started at the same instant, each seeded with
    /// `node-0` (which has no seed), on 1–5 ms links.
    pub async fn start(seed: u64, n: usize, timing: Timing) -> Result<Self, StartError> {
        let mut cluster = Self::new(seed, timing, LinkConfig::default());
        for i in 0..n {
            let seeds = if i == 0 {
                Vec::new()
            } else {
                vec![Self::addr_of(0)]
            };
            cluster.add(seeds).await?;
        }
        Ok(cluster)
    }

    /// The address of node `index`: 127.0.0.1 with a port of its own. Nothing is bound on the
    /// machine; the address only names the node on the simulated network.
    pub fn addr_of(index: usize) -> SocketAddr {
        let port = u16::try_from(index + 1).unwrap_or(u16::MAX);
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// Starts one more node, `node-{index}`, announcing to `seeds`. Returns its index.
    pub async fn add(&mut self, seeds: Vec<SocketAddr>) -> Result<usize, StartError> {
        let index = self.nodes.len();
        let id = NodeId::new(format!("node-{index}")).map_err(|_| StartError::MissingNodeId)?;
        self.nodes.push(SimNode {
            id,
            addr: Self::addr_of(index),
            seeds,
            membership: None,
            logger: None,
            boots: 0,
        });
        self.boot(index).await?;
        Ok(index)
    }

    async fn boot(&mut self, index: usize) -> Result<(), StartError> {
        let node = &mut self.nodes[index];
        let socket = self.network.bind(node.addr);
        let node_seed = self.seed
            ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ node.boots.wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
        let membership = Membership::builder(node.id.clone())
            .bind_addr(node.addr)
            .seeds(node.seeds.iter().copied())
            .timing(self.timing.clone())
            .max_concurrency(4)
            .generation((node.boots + 1) * 1_000_000_000_000)
            .rng_seed(node_seed)
            .start_with_transport(socket)
            .await?;
        node.boots += 1;
        let mut events = membership.events();
        let log = Arc::clone(&self.log);
        let epoch = self.epoch;
        node.logger = Some(tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(event) => {
                        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                        let keep = match &event {
                            MeshEvent::Updated(state) => log.tracked.contains(&state.node_id),
                            other => (log.keep)(other),
                        };
                        if !keep {
                            continue;
                        }
                        log.events.push(Logged {
                            at: epoch.elapsed(),
                            observer: index,
                            event,
                        });
                    }
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                }
            }
        }));
        node.membership = Some(membership);
        Ok(())
    }

    /// Stops node `index` without a word to anyone and takes it off the network.
    pub async fn crash(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        self.network.unbind(node.addr);
        if let Some(membership) = node.membership.take() {
            membership.shutdown().await;
        }
        if let Some(logger) = node.logger.take() {
            logger.abort();
        }
    }

    /// Crashes node `index` (if it runs) and starts it again at the same address with a newer
    /// generation.
    pub async fn restart(&mut self, index: usize) -> Result<(), StartError> {
        self.crash(index).await;
        self.boot(index).await
    }

    /// Lets `span` of simulated time pass.
    pub async fn run_for(&self, span: Duration) {
        tokio::time::sleep(span).await;
    }

    /// Lets time pass until `condition` holds, checking it every `every`; `None` if it did not
    /// within `limit`. Returns how long it took.
    pub async fn run_until(
        &self,
        limit: Duration,
        every: Duration,
        mut condition: impl FnMut(&Self) -> bool,
    ) -> Option<Duration> {
        let start = Instant::now();
        loop {
            if condition(self) {
                return Some(start.elapsed());
            }
            if start.elapsed() >= limit {
                return None;
            }
            tokio::time::sleep(every).await;
        }
    }

    /// The network, to inject loss, latency and partitions.
    pub fn network(&self) -> &SimNetwork {
        &self.network
    }

    /// Number of nodes, crashed ones included.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `index`'s id.
    pub fn node_id(&self, index: usize) -> &NodeId {
        &self.nodes[index].id
    }

    /// Node `index`'s handle, `None` while it is crashed.
    pub fn membership(&self, index: usize) -> Option<&Membership> {
        self.nodes[index].membership.as_ref()
    }

    /// Node `index`'s view, `None` while it is crashed.
    pub fn view(&self, index: usize) -> Option<Arc<MembershipView>> {
        self.membership(index).map(Membership::view)
    }

    /// Indices of the nodes that run.
    pub fn running(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].membership.is_some())
            .collect()
    }

    /// Whether every node of `group` runs and sees exactly the nodes of `group`.
    pub fn sees_exactly(&self, group: &[usize]) -> bool {
        group.iter().all(|observer| {
            self.view(*observer).is_some_and(|view| {
                view.len() == group.len()
                    && group
                        .iter()
                        .all(|i| view.get(self.nodes[*i].id.as_str()).is_some())
            })
        })
    }

    /// Keeps `Updated` events about node `index` in the log from now on.
    pub fn track_updates(&self, index: usize) {
        let id = self.nodes[index].id.clone();
        self.lock_log().tracked.insert(id);
    }

    /// Stops keeping `Updated` events about node `index`.
    pub fn untrack_updates(&self, index: usize) {
        let id = &self.nodes[index].id;
        self.lock_log().tracked.remove(id);
    }

    /// The events logged by default: everything but `Joined` and `LocalStatus`, of which a
    /// cold start of `n` nodes makes `n²` (`Updated` events are logged only for tracked nodes).
    pub fn default_filter(event: &MeshEvent) -> bool {
        !matches!(event, MeshEvent::Joined(_) | MeshEvent::LocalStatus(_))
    }

    /// Chooses which events (other than `Updated`) are logged from now on.
    pub fn set_event_filter(&self, keep: fn(&MeshEvent) -> bool) {
        self.lock_log().keep = keep;
    }

    /// The logged events that `keep` selects, in the order they were seen.
    pub fn events(&self, keep: impl FnMut(&Logged) -> bool) -> Vec<Logged> {
        self.events_from(0, keep)
    }

    /// Like [`SimCluster::events`], skipping the first `start` logged events.
    pub fn events_from(&self, start: usize, mut keep: impl FnMut(&Logged) -> bool) -> Vec<Logged> {
        let log = self.lock_log();
        log.events
            .get(start..)
            .unwrap_or_default()
            .iter()
            .filter(|l| keep(l))
            .cloned()
            .collect()
    }

    /// How many events have been logged so far.
    pub fn logged(&self) -> usize {
        self.lock_log().events.len()
    }

    /// Forgets the logged events (long runs keep memory bounded this way).
    pub fn clear_events(&self) {
        self.lock_log().events.clear();
    }

    /// Simulated time since the cluster was created.
    pub fn elapsed(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// The gossip counters of every running node, summed.
    pub fn total_stats(&self) -> MeshStats {
        let mut total = MeshStats::default();
        for node in &self.nodes {
            if let Some(m) = &node.membership {
                let s = m.stats();
                total.datagrams_sent += s.datagrams_sent;
                total.bytes_sent += s.bytes_sent;
                total.datagrams_received += s.datagrams_received;
                total.bytes_received += s.bytes_received;
                total.dropped_overload += s.dropped_overload;
                total.suspicions_raised += s.suspicions_raised;
                total.suspicions_refuted += s.suspicions_refuted;
                total.refuted_self += s.refuted_self;
            }
        }
        total
    }

    fn lock_log(&self) -> MutexGuard<'_, EventLog> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops every node.
    pub async fn shutdown(&mut self) {
        for index in 0..self.nodes.len() {
            self.crash(index).await;
        }
    }
}
