//! An authoritative DNS server for tests (feature `test-server`): hickory-server on 127.0.0.1
//! (UDP and TCP on one ephemeral port), serving one in-memory zone whose records can change
//! while it runs. Use it to test discovery the way Kubernetes serves a headless service,
//! without a cluster:
//!
//! ```
//! use mesh_discovery::{Discover, Dns, testing::TestDns};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dns = TestDns::start("cluster.test.").await;
//! dns.add_a("mesh.cluster.test.", [127, 0, 0, 1].into()).await;
//! let discovery = Dns::builder("mesh.cluster.test.")
//!     .nameserver(dns.addr())
//!     .port(7946)
//!     .build()?;
//! assert_eq!(discovery.discover().await?, ["127.0.0.1:7946".parse()?]);
//! dns.stop().await;
//! # Ok(()) }
//! ```
//!
//! Set-up failures (no free port, an invalid name) panic with a message: this is test support.
#![allow(clippy::missing_panics_doc)]

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

pub use hickory_server::proto::rr::RData;

use hickory_server::{
    Server,
    proto::rr::{
        LowerName, Name, Record, RrKey,
        rdata::{A, AAAA, SOA, SRV},
    },
    store::in_memory::InMemoryZoneHandler,
    zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType},
};
use tokio::net::{TcpListener, UdpSocket};

/// Records are served with a long TTL, so a resolver that cached them would miss changes.
const TTL: u32 = 300;
const SERIAL: u32 = 1;

/// A running test nameserver, authoritative for one zone.
#[allow(missing_debug_implementations)]
pub struct TestDns {
    addr: SocketAddr,
    zone: Arc<InMemoryZoneHandler>,
    server: Server<Catalog>,
}

impl TestDns {
    /// Starts a server authoritative for `origin` (for example `cluster.test.`).
    pub async fn start(origin: &str) -> Self {
        Self::start_at(origin, IpAddr::V4(Ipv4Addr::LOCALHOST)).await
    }

    /// Like [`TestDns::start`], listening on `ip` (an ephemeral port), e.g. a bridge address
    /// that network namespaces reach.
    pub async fn start_at(origin: &str, ip: IpAddr) -> Self {
        let origin = name(origin);
        let mut zone =
            InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
        let soa = SOA::new(
            name("ns.invalid."),
            name("hostmaster.invalid."),
            SERIAL,
            3600,
            600,
            86_400,
            TTL,
        );
        assert!(zone.upsert_mut(
            Record::from_rdata(origin.clone(), TTL, RData::SOA(soa)),
            SERIAL
        ));
        let zone = Arc::new(zone);

        let mut catalog = Catalog::new();
        catalog.upsert(
            LowerName::new(&origin),
            vec![zone.clone() as Arc<dyn ZoneHandler>],
        );

        let (udp, tcp) = bind_udp_and_tcp(ip).await;
        let addr = udp.local_addr().expect("bound socket has an address");
        let mut server = Server::new(catalog);
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 32);
        Self { addr, zone, server }
    }

    /// Where the server listens (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Adds one record to `owner`'s record set of that type.
    pub async fn add(&self, owner: &str, data: RData) {
        let record = Record::from_rdata(name(owner), TTL, data);
        assert!(
            self.zone.upsert(record, SERIAL).await,
            "record was not added"
        );
    }

    /// Removes one record; the record set goes away with its last record.
    pub async fn remove(&self, owner: &str, data: RData) {
        let record = Record::from_rdata(name(owner), TTL, data);
        let key = RrKey::new(LowerName::new(&record.name), record.record_type());
        let mut records = self.zone.records_mut().await;
        let set = records.get_mut(&key).expect("no such record set");
        assert!(Arc::make_mut(set).remove(&record, SERIAL), "no such record");
        if set.is_empty() {
            records.remove(&key);
        }
    }

    /// Adds an A record.
    pub async fn add_a(&self, owner: &str, ip: Ipv4Addr) {
        self.add(owner, RData::A(A(ip))).await;
    }

    /// Adds an AAAA record.
    pub async fn add_aaaa(&self, owner: &str, ip: Ipv6Addr) {
        self.add(owner, RData::AAAA(AAAA(ip))).await;
    }

    /// Adds an SRV record at `owner` (e.g. `_gossip._udp.mesh.cluster.test.`) pointing at
    /// `target:port`.
    pub async fn add_srv(&self, owner: &str, target: &str, port: u16) {
        self.add(owner, RData::SRV(SRV::new(0, 0, port, name(target))))
            .await;
    }

    /// Removes an SRV record added with [`TestDns::add_srv`].
    pub async fn remove_srv(&self, owner: &str, target: &str, port: u16) {
        self.remove(owner, RData::SRV(SRV::new(0, 0, port, name(target))))
            .await;
    }

    /// Stops answering: after this returns, the port is closed and queries go unanswered.
    pub async fn stop(mut self) {
        tokio::time::timeout(Duration::from_secs(5), self.server.shutdown_gracefully())
            .await
            .expect("server stops within 5 s")
            .expect("server stops cleanly");
    }
}

fn name(name: &str) -> Name {
    Name::from_str(name).expect("valid test name")
}

/// UDP and TCP on the same ephemeral port, as a real nameserver has; retried because the TCP
/// port may be taken by someone else.
async fn bind_udp_and_tcp(ip: IpAddr) -> (UdpSocket, TcpListener) {
    for _ in 0..20 {
        let udp = UdpSocket::bind((ip, 0)).await.expect("bind udp");
        let addr = udp.local_addr().expect("bound socket has an address");
        if let Ok(tcp) = TcpListener::bind(addr).await {
            return (udp, tcp);
        }
    }
    panic!("no port free for both udp and tcp on {ip}");
}
