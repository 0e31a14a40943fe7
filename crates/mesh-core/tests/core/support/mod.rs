//! A simulated cluster for fault tests: every node runs the real membership code over
//! turmoil's simulated network, on simulated time, driven step by step from the test. Same
//! seed, same run.
#![allow(dead_code, unreachable_pub)] // Each test binary uses a different subset.

pub mod one_host;

use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use mesh_core::{Membership, MembershipView, MeshEvent, NodeId, Timing, Transport};
use rand::{RngExt, SeedableRng, rngs::StdRng};

pub const GOSSIP_PORT: u16 = 7946;

/// An event as one node saw it, with the simulated time.
#[derive(Debug, Clone)]
pub struct Logged {
    pub at: Duration,
    pub observer: String,
    pub event: MeshEvent,
}

/// turmoil's UDP with per-datagram loss on top (turmoil's own `fail_rate` models links going
/// down for a while, not independent losses).
pub struct Lossy {
    socket: turmoil::net::UdpSocket,
    rng: Mutex<StdRng>,
    per_mille: Arc<AtomicU32>,
}

impl Transport for Lossy {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.socket.recv_from(buf).await
    }

    fn try_send_to(&self, datagram: &[u8], target: SocketAddr) -> io::Result<usize> {
        let loss = self.per_mille.load(Ordering::Relaxed);
        if loss > 0 && self.rng.lock().unwrap().random_range(0..1000) < loss {
            return Ok(datagram.len());
        }
        self.socket.try_send_to(datagram, target)
    }
}

pub struct Cluster {
    pub sim: turmoil::Sim<'static>,
    pub nodes: Arc<Mutex<BTreeMap<String, Membership>>>,
    pub log: Arc<Mutex<Vec<Logged>>>,
    /// Datagram loss on every node's sends, per mille.
    pub loss: Arc<AtomicU32>,
    pub names: Vec<String>,
    seed: u64,
    timing: Timing,
}

impl Cluster {
    /// `n` nodes named `node-0` … all joining through `node-0`, 1–5 ms of latency per
    /// datagram.
    pub fn new(seed: u64, n: usize, timing: Timing) -> Self {
        let sim = turmoil::Builder::new()
            .simulation_duration(Duration::from_secs(24 * 3600))
            .tick_duration(Duration::from_millis(1))
            .min_message_latency(Duration::from_millis(1))
            .max_message_latency(Duration::from_millis(5))
            // A socket receive buffer like a real one (Linux's default holds hundreds of
            // small datagrams), not turmoil's 64.
            .udp_capacity(1024)
            .rng_seed(seed)
            .build();
        let mut cluster = Self {
            sim,
            nodes: Arc::default(),
            log: Arc::default(),
            loss: Arc::default(),
            names: Vec::new(),
            seed,
            timing,
        };
        for i in 0..n {
            let seeds = if i == 0 {
                vec![]
            } else {
                vec!["node-0".to_owned()]
            };
            cluster.add(&format!("node-{i}"), seeds);
        }
        cluster
    }

    /// Registers a host running one member. A bounced host starts a new life with a higher
    /// generation.
    pub fn add(&mut self, name: &str, seeds: Vec<String>) {
        let boots = Arc::new(AtomicU64::new(0));
        let nodes = Arc::clone(&self.nodes);
        let log = Arc::clone(&self.log);
        let loss = Arc::clone(&self.loss);
        let timing = self.timing.clone();
        let seed = self.seed;
        let owned = name.to_owned();
        self.names.push(owned.clone());
        self.sim.host(name, move || {
            let (name, seeds, nodes, log, loss, timing) = (
                owned.clone(),
                seeds.clone(),
                Arc::clone(&nodes),
                Arc::clone(&log),
                Arc::clone(&loss),
                timing.clone(),
            );
            let boot = boots.fetch_add(1, Ordering::Relaxed);
            async move {
                let socket = turmoil::net::UdpSocket::bind(SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    GOSSIP_PORT,
                ))
                .await?;
                let node_seed = seed ^ hash(&name) ^ boot.wrapping_mul(0x9e37_79b9);
                let transport = Lossy {
                    socket,
                    rng: Mutex::new(StdRng::seed_from_u64(node_seed)),
                    per_mille: loss,
                };
                let membership = Membership::builder(NodeId::new(&name)?)
                    .advertise_addr(SocketAddr::new(turmoil::lookup(name.as_str()), GOSSIP_PORT))
                    .seeds(
                        seeds
                            .iter()
                            .map(|s| SocketAddr::new(turmoil::lookup(s.as_str()), GOSSIP_PORT)),
                    )
                    .timing(timing)
                    .max_concurrency(4)
                    .generation((boot + 1) * 1_000_000_000_000)
                    .rng_seed(node_seed)
                    .start_with_transport(transport)
                    .await?;
                let mut events = membership.events();
                nodes.lock().unwrap().insert(name.clone(), membership);
                loop {
                    match events.recv().await {
                        Ok(event) => log.lock().unwrap().push(Logged {
                            at: turmoil::sim_elapsed().unwrap_or_default(),
                            observer: name.clone(),
                            event,
                        }),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                            // The log is what fault tests count failures in: a gap would
                            // hide them, so it fails the simulation instead.
                            panic!("{name}'s event log lagged: {missed} events lost");
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                            return Ok(());
                        }
                    }
                }
            }
        });
    }

    pub fn now(&self) -> Duration {
        self.sim.elapsed()
    }

    /// Steps the simulation until `condition` holds, at most `limit` of simulated time.
    /// Returns how long it took.
    pub fn run_until(
        &mut self,
        what: &str,
        limit: Duration,
        mut condition: impl FnMut(&Self) -> bool,
    ) -> Duration {
        let start = self.now();
        while !condition(self) {
            assert!(
                self.now() - start <= limit,
                "{what}: not reached within {limit:?} of simulated time"
            );
            self.sim.step().expect("simulation step");
        }
        self.now() - start
    }

    /// Steps the simulation for `span` of simulated time.
    pub fn run_for(&mut self, span: Duration) {
        let end = self.now() + span;
        while self.now() < end {
            self.sim.step().expect("simulation step");
        }
    }

    /// Runs for `span`, checking `invariant` after every step.
    pub fn run_checking(&mut self, span: Duration, mut invariant: impl FnMut(&Self)) {
        let end = self.now() + span;
        while self.now() < end {
            self.sim.step().expect("simulation step");
            invariant(self);
        }
    }

    pub fn view(&self, name: &str) -> Option<Arc<MembershipView>> {
        self.nodes.lock().unwrap().get(name).map(Membership::view)
    }

    pub fn membership(&self, name: &str) -> Membership {
        self.nodes
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .expect("node started")
    }

    /// Whether every node in `group` sees exactly `group` as its members.
    pub fn sees_exactly(&self, group: &[&str]) -> bool {
        group.iter().all(|name| {
            self.view(name).is_some_and(|view| {
                view.len() == group.len() && group.iter().all(|other| view.get(other).is_some())
            })
        })
    }

    pub fn all(&self) -> Vec<&str> {
        self.names.iter().map(String::as_str).collect()
    }

    pub fn partition(&mut self, left: &[&str], right: &[&str]) {
        for a in left {
            for b in right {
                self.sim.partition(*a, *b);
            }
        }
    }

    pub fn repair(&mut self, left: &[&str], right: &[&str]) {
        for a in left {
            for b in right {
                self.sim.repair(*a, *b);
            }
        }
    }

    pub fn crash(&mut self, name: &str) {
        self.sim.crash(name);
        self.nodes.lock().unwrap().remove(name);
    }

    pub fn bounce(&mut self, name: &str) {
        self.sim.bounce(name);
        self.nodes.lock().unwrap().remove(name);
    }

    pub fn set_loss(&self, per_mille: u32) {
        self.loss.store(per_mille, Ordering::Relaxed);
    }

    /// Events seen so far, filtered.
    pub fn events(&self, mut keep: impl FnMut(&Logged) -> bool) -> Vec<Logged> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| keep(l))
            .cloned()
            .collect()
    }
}

fn hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The node id an event is about, for failure/leave/suspect events.
pub fn subject(event: &MeshEvent) -> Option<&str> {
    match event {
        MeshEvent::Failed(id)
        | MeshEvent::Left(id)
        | MeshEvent::Suspect(id)
        | MeshEvent::Joined(id) => Some(id.node_id().as_str()),
        MeshEvent::Rejoined { current, .. } => Some(current.node_id().as_str()),
        _ => None,
    }
}
