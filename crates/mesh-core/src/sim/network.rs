//! The in-memory network: datagrams between [`SimSocket`]s, delayed, dropped, partitioned and
//! cut off on the tokio clock.
//!
//! Every send is decided at once, under one lock, from one seeded generator: whether it is
//! lost (independent loss, a blocked link, an unknown or crashed destination, a full receive
//! buffer) and when it arrives (a uniform base latency plus any extra delay of either end).
//! A delivered datagram waits in the receiver's inbox, ordered by arrival time, until the
//! receiver's clock reaches it. Nothing is spawned per datagram, so the network costs one heap
//! push and pop per datagram whatever the cluster size.

use std::{
    cmp::Ordering,
    collections::{BinaryHeap, HashMap, HashSet},
    io,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use rand::{RngExt, SeedableRng, rngs::StdRng};
use tokio::{sync::Notify, time::Instant};

use crate::transport::Transport;

/// How datagrams travel between hosts unless told otherwise.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkConfig {
    /// Shortest one-way latency of a datagram.
    pub min_latency: Duration,
    /// Longest one-way latency; each datagram takes a uniform draw in between.
    pub max_latency: Duration,
    /// Datagrams a host's inbox holds before new ones are dropped (a socket receive buffer).
    pub inbox_capacity: usize,
}

impl Default for LinkConfig {
    /// 1–5 ms per datagram (a busy LAN), 1024 datagrams of receive buffer.
    fn default() -> Self {
        Self {
            min_latency: Duration::from_millis(1),
            max_latency: Duration::from_millis(5),
            inbox_capacity: 1024,
        }
    }
}

/// What the network did with datagrams, summed over every host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NetworkStats {
    /// Datagrams handed to the network.
    pub sent: u64,
    /// Datagrams put into a receiver's inbox.
    pub delivered: u64,
    /// Dropped by the random loss knob.
    pub lost: u64,
    /// Dropped because the link was blocked (a partition).
    pub blocked: u64,
    /// Dropped because nobody is bound at the destination (crashed or never started).
    pub unreachable: u64,
    /// Dropped because the receiver's inbox was full.
    pub overflowed: u64,
    /// Bytes handed to the network, by the envelope kind byte of the datagram (index 0:
    /// unknown; 1: foca; 2: state push; 3: leave; 4: lifeguard).
    pub bytes_by_kind: [u64; 5],
    /// Datagrams handed to the network, by kind (as `bytes_by_kind`).
    pub datagrams_by_kind: [u64; 5],
}

/// A simulated datagram network shared by every [`SimSocket`] bound on it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SimNetwork {
    inner: Arc<Mutex<Net>>,
}

#[derive(Debug)]
struct Net {
    config: LinkConfig,
    rng: StdRng,
    hosts: HashMap<SocketAddr, Arc<Inbox>>,
    /// Loss of every datagram, per million.
    loss_ppm: u32,
    /// Extra one-way delay of datagrams sent from or to a host.
    slow: HashMap<SocketAddr, Duration>,
    /// Directed links that drop everything: (from, to).
    blocked: HashSet<(SocketAddr, SocketAddr)>,
    stats: NetworkStats,
    seq: u64,
}

impl SimNetwork {
    /// An empty network whose random choices (loss, latency) all come from `seed`.
    pub fn new(seed: u64, config: LinkConfig) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Net {
                config,
                rng: StdRng::seed_from_u64(seed),
                hosts: HashMap::new(),
                loss_ppm: 0,
                slow: HashMap::new(),
                blocked: HashSet::new(),
                stats: NetworkStats::default(),
                seq: 0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Net> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Binds a socket at `addr`, replacing whatever was bound there (a restarted host gets a
    /// fresh, empty inbox; datagrams in flight to its previous life are lost with it).
    pub fn bind(&self, addr: SocketAddr) -> SimSocket {
        let inbox = Arc::new(Inbox::default());
        self.lock().hosts.insert(addr, Arc::clone(&inbox));
        SimSocket {
            addr,
            network: self.clone(),
            inbox,
        }
    }

    /// Takes the host at `addr` off the network: datagrams to it are dropped from now on,
    /// including those already in flight (a crash, or a host switched off).
    pub fn unbind(&self, addr: SocketAddr) {
        self.lock().hosts.remove(&addr);
    }

    /// Drops each datagram independently with probability `fraction` (0 to 1).
    pub fn set_loss(&self, fraction: f64) {
        let ppm = (fraction.clamp(0.0, 1.0) * 1_000_000.0).round() as u32;
        self.lock().loss_ppm = ppm;
    }

    /// Adds `delay` to every datagram sent from or to `addr` (a slow or far-away host); zero
    /// removes it.
    pub fn set_slow(&self, addr: SocketAddr, delay: Duration) {
        let mut net = self.lock();
        if delay.is_zero() {
            net.slow.remove(&addr);
        } else {
            net.slow.insert(addr, delay);
        }
    }

    /// Blocks both directions between every host of `left` and every host of `right`.
    pub fn partition(&self, left: &[SocketAddr], right: &[SocketAddr]) {
        let mut net = self.lock();
        for a in left {
            for b in right {
                net.blocked.insert((*a, *b));
                net.blocked.insert((*b, *a));
            }
        }
    }

    /// Blocks datagrams from `from` to `to` only.
    pub fn block_oneway(&self, from: SocketAddr, to: SocketAddr) {
        self.lock().blocked.insert((from, to));
    }

    /// Lifts every partition and blocked link.
    pub fn heal(&self) {
        self.lock().blocked.clear();
    }

    /// What the network did so far.
    pub fn stats(&self) -> NetworkStats {
        self.lock().stats
    }

    fn send(&self, from: SocketAddr, datagram: &[u8], to: SocketAddr) {
        let mut net = self.lock();
        net.stats.sent += 1;
        let kind = datagram.get(3).map_or(0, |k| usize::from(k & 0x7f)).min(4);
        net.stats.bytes_by_kind[kind] += datagram.len() as u64;
        net.stats.datagrams_by_kind[kind] += 1;
        if net.blocked.contains(&(from, to)) {
            net.stats.blocked += 1;
            return;
        }
        if net.loss_ppm > 0 && net.rng.random_range(0..1_000_000) < net.loss_ppm {
            net.stats.lost += 1;
            return;
        }
        let Some(inbox) = net.hosts.get(&to).cloned() else {
            net.stats.unreachable += 1;
            return;
        };
        let (min, max) = (net.config.min_latency, net.config.max_latency);
        let mut latency = if max > min {
            min + (max - min).mul_f64(net.rng.random_range(0.0..1.0))
        } else {
            min
        };
        latency += net.slow.get(&from).copied().unwrap_or_default();
        latency += net.slow.get(&to).copied().unwrap_or_default();
        let capacity = net.config.inbox_capacity;
        net.seq += 1;
        let seq = net.seq;
        let mut queue = inbox.queue.lock().unwrap_or_else(|p| p.into_inner());
        if queue.len() >= capacity {
            net.stats.overflowed += 1;
            return;
        }
        net.stats.delivered += 1;
        queue.push(InFlight {
            at: Instant::now() + latency,
            seq,
            from,
            datagram: datagram.to_vec(),
        });
        drop(queue);
        inbox.arrived.notify_one();
    }
}

/// A host's receive buffer: datagrams ordered by arrival time.
#[derive(Debug, Default)]
struct Inbox {
    queue: Mutex<BinaryHeap<InFlight>>,
    arrived: Notify,
}

#[derive(Debug)]
struct InFlight {
    at: Instant,
    seq: u64,
    from: SocketAddr,
    datagram: Vec<u8>,
}

impl PartialEq for InFlight {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for InFlight {}

impl PartialOrd for InFlight {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for InFlight {
    // Reversed: the earliest arrival is the heap's top.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// A datagram socket on a [`SimNetwork`]: the [`Transport`] simulated nodes run on.
#[derive(Debug)]
pub struct SimSocket {
    addr: SocketAddr,
    network: SimNetwork,
    inbox: Arc<Inbox>,
}

impl SimSocket {
    /// The earliest datagram that has arrived by `now`, if any; otherwise when the next one
    /// arrives.
    fn take_arrived(&self, now: Instant) -> Result<InFlight, Option<Instant>> {
        let mut queue = self.inbox.queue.lock().unwrap_or_else(|p| p.into_inner());
        match queue.peek() {
            Some(next) if next.at <= now => Ok(queue.pop().expect("peeked")),
            Some(next) => Err(Some(next.at)),
            None => Err(None),
        }
    }
}

impl Transport for SimSocket {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }

    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        loop {
            match self.take_arrived(Instant::now()) {
                // Taken synchronously, so dropping this future never loses a datagram.
                Ok(datagram) => {
                    let len = datagram.datagram.len().min(buf.len());
                    buf[..len].copy_from_slice(&datagram.datagram[..len]);
                    return Ok((len, datagram.from));
                }
                Err(Some(at)) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = self.inbox.arrived.notified() => {}
                    }
                }
                Err(None) => self.inbox.arrived.notified().await,
            }
        }
    }

    fn try_send_to(&self, datagram: &[u8], target: SocketAddr) -> io::Result<usize> {
        self.network.send(self.addr, datagram, target);
        Ok(datagram.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[tokio::test(start_paused = true)]
    async fn datagrams_arrive_after_their_latency_in_arrival_order() {
        let net = SimNetwork::new(
            1,
            LinkConfig {
                min_latency: Duration::from_millis(10),
                max_latency: Duration::from_millis(10),
                inbox_capacity: 8,
            },
        );
        let a = net.bind(addr(1));
        let b = net.bind(addr(2));
        net.set_slow(addr(1), Duration::from_millis(5));
        let start = Instant::now();
        a.try_send_to(b"slow", addr(2)).unwrap();
        net.set_slow(addr(1), Duration::ZERO);
        a.try_send_to(b"fast", addr(2)).unwrap();
        let mut buf = [0; 16];
        let (len, from) = b.recv_from(&mut buf).await.unwrap();
        assert_eq!((&buf[..len], from), (&b"fast"[..], addr(1)));
        assert_eq!(start.elapsed(), Duration::from_millis(10));
        let (len, _) = b.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..len], b"slow");
        assert_eq!(start.elapsed(), Duration::from_millis(15));
        assert_eq!(net.stats().delivered, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn partitions_loss_and_crashes_drop_datagrams() {
        let net = SimNetwork::new(2, LinkConfig::default());
        let a = net.bind(addr(1));
        let _b = net.bind(addr(2));
        net.partition(&[addr(1)], &[addr(2)]);
        a.try_send_to(b"x", addr(2)).unwrap();
        net.heal();
        net.block_oneway(addr(2), addr(1));
        a.try_send_to(b"x", addr(2)).unwrap();
        net.heal();
        net.unbind(addr(2));
        a.try_send_to(b"x", addr(2)).unwrap();
        let _b = net.bind(addr(2));
        net.set_loss(1.0);
        a.try_send_to(b"x", addr(2)).unwrap();
        let stats = net.stats();
        assert_eq!(
            (
                stats.sent,
                stats.blocked,
                stats.delivered,
                stats.unreachable,
                stats.lost
            ),
            (4, 1, 1, 1, 1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_inbox_drops_new_datagrams() {
        let net = SimNetwork::new(
            3,
            LinkConfig {
                inbox_capacity: 2,
                ..LinkConfig::default()
            },
        );
        let a = net.bind(addr(1));
        let _b = net.bind(addr(2));
        for _ in 0..3 {
            a.try_send_to(b"x", addr(2)).unwrap();
        }
        assert_eq!(net.stats().overflowed, 1);
    }
}
