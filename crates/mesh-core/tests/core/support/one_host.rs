//! Many members on one simulated host, on simulated time (turmoil).
//!
//! The test body is ordinary async code, as on real sockets, but it runs inside a turmoil
//! simulation: the clock moves only in turmoil's steps, so a 100 ms probe timeout is 100 ms
//! whatever the load of the machine running the test, and the same seed gives the same run.
//! Every member binds its own port on the one host and datagrams between them travel over
//! turmoil's loopback (one tick, 1 ms). [`Links`] cuts chosen links, as a partition would.
//!
//! Being one host also means one tokio clock: the membership views, the router and the test
//! read the same `Instant`s, so state ages are meaningful in assertions.
//!
//! Shared with mesh-route's routing tests through `#[path]`: it uses only public APIs.
#![allow(dead_code, unreachable_pub)] // Each test binary uses a different subset.

use std::{
    cell::Cell,
    collections::HashSet,
    future::Future,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh_core::{
    Membership, MembershipBuilder, MembershipView, MeshEvent, NodeId, Timing, Transport,
};
use tokio::sync::broadcast::{self, error::TryRecvError};

/// Upper bound of any wait, in simulated time. Simulated seconds cost little real time, so
/// this is generous; a test that needs it has found a bug.
pub const BOUND: Duration = Duration::from_secs(120);

thread_local! {
    /// Members started in this thread's simulation so far: their generations and seeds.
    static STARTED: Cell<u64> = const { Cell::new(0) };
}

/// Runs `test` to completion on a simulated host of its own, on simulated time. A panic in
/// the test fails the simulation, and so the calling test.
pub fn simulate<F>(seed: u64, test: F)
where
    F: Future<Output = ()> + 'static,
{
    STARTED.with(|started| started.set(0));
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(3600))
        .tick_duration(Duration::from_millis(1))
        // A socket receive buffer like a real one, not turmoil's 64 datagrams.
        .udp_capacity(1024)
        .rng_seed(seed)
        .build();
    sim.client("mesh", async move {
        test.await;
        Ok(())
    });
    sim.run().expect("the simulated test");
}

/// Waits for `fut`, failing the test with `what` after [`BOUND`] of simulated time.
pub async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, fut).await.unwrap_or_else(|_| {
        panic!("timed out after {BOUND:?} of simulated time waiting for {what}")
    })
}

/// Waits until `member`'s view satisfies `condition`.
pub async fn until(
    what: &str,
    member: &Membership,
    condition: impl FnMut(&MembershipView) -> bool,
) -> Arc<MembershipView> {
    let what = format!("{} to see {what}", member.node_id());
    bounded(&what, member.wait_until(condition)).await
}

/// Every event `receiver` holds now. Fails loudly if the stream lagged: an event lost there
/// could be the one a test asserts never happened.
pub fn drain(receiver: &mut broadcast::Receiver<MeshEvent>) -> Vec<MeshEvent> {
    let mut events = Vec::new();
    loop {
        match receiver.try_recv() {
            Ok(event) => events.push(event),
            Err(TryRecvError::Empty | TryRecvError::Closed) => return events,
            Err(TryRecvError::Lagged(missed)) => {
                panic!("the event stream lagged: {missed} events lost unseen")
            }
        }
    }
}

/// Which directed links between members are cut.
#[derive(Debug, Clone, Default)]
pub struct Links(Arc<Mutex<HashSet<(SocketAddr, SocketAddr)>>>);

impl Links {
    /// Cuts every link between a member of `left` and a member of `right`, both ways.
    pub fn cut(&self, left: &[&Membership], right: &[&Membership]) {
        let mut cut = self.0.lock().unwrap();
        for a in left {
            for b in right {
                cut.insert((a.local_addr(), b.local_addr()));
                cut.insert((b.local_addr(), a.local_addr()));
            }
        }
    }

    /// Lets every datagram through again.
    pub fn heal(&self) {
        self.0.lock().unwrap().clear();
    }

    fn is_cut(&self, from: SocketAddr, to: SocketAddr) -> bool {
        self.0.lock().unwrap().contains(&(from, to))
    }
}

/// turmoil's UDP socket, losing what crosses a cut link.
pub struct SimSocket {
    socket: turmoil::net::UdpSocket,
    addr: SocketAddr,
    links: Links,
}

impl SimSocket {
    /// A socket on a port of its own on the simulated host.
    pub async fn bind(links: &Links) -> Self {
        let socket = turmoil::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("a simulated port");
        let addr = socket.local_addr().expect("a bound socket");
        Self {
            socket,
            addr,
            links: links.clone(),
        }
    }
}

impl Transport for SimSocket {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }

    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        loop {
            let (len, from) = self.socket.recv_from(buf).await?;
            if !self.links.is_cut(from, self.addr) {
                return Ok((len, from));
            }
        }
    }

    fn try_send_to(&self, datagram: &[u8], target: SocketAddr) -> io::Result<usize> {
        if self.links.is_cut(self.addr, target) {
            return Ok(datagram.len()); // lost in the network
        }
        self.socket.try_send_to(datagram, target)
    }
}

/// A member named `name` with the local timing preset and 4 slots, joining through `seeds`.
pub fn builder(name: &str, seeds: &[SocketAddr]) -> MembershipBuilder {
    Membership::builder(NodeId::new(name).unwrap())
        .seeds(seeds.iter().copied())
        .timing(Timing::local())
        .max_concurrency(4)
}

/// Starts a member from `builder` on a new simulated socket. Generations and random seeds
/// come from the order members are started in, so a run is reproducible and a restart always
/// has a higher generation.
pub async fn start(builder: MembershipBuilder, links: &Links) -> Membership {
    start_on(builder, SimSocket::bind(links).await).await
}

/// [`start`] on a transport of the test's own (usually wrapping a [`SimSocket`]).
pub async fn start_on(builder: MembershipBuilder, transport: impl Transport) -> Membership {
    let n = STARTED.with(|started| {
        started.set(started.get() + 1);
        started.get()
    });
    builder
        .generation(n * 1_000_000_000)
        .rng_seed(0x5eed ^ n)
        .start_with_transport(transport)
        .await
        .expect("a member starts")
}

/// Starts `n` members named `{prefix}-{i}` from `configure(builder(name, seeds))`, all seeded
/// with the first, and waits until every member sees all of them.
pub async fn cluster(
    prefix: &str,
    n: usize,
    links: &Links,
    mut configure: impl FnMut(MembershipBuilder) -> MembershipBuilder,
) -> Vec<Membership> {
    let first = start(configure(builder(&format!("{prefix}-0"), &[])), links).await;
    let seeds = [first.local_addr()];
    let mut members = vec![first];
    for i in 1..n {
        let name = format!("{prefix}-{i}");
        members.push(start(configure(builder(&name, &seeds)), links).await);
    }
    for member in &members {
        until("the whole cluster", member, |v| v.len() == n).await;
    }
    members
}
