//! An authoritative DNS server for tests: hickory-server on 127.0.0.1 (UDP and TCP on one
//! ephemeral port), serving one in-memory zone whose records can change while it runs.

use std::{net::SocketAddr, str::FromStr, sync::Arc, time::Duration};

use hickory_server::{
    Server,
    proto::rr::{LowerName, Name, RData, Record, RrKey, rdata::SOA},
    store::in_memory::InMemoryZoneHandler,
    zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType},
};
use tokio::net::{TcpListener, UdpSocket};

/// Records are served with a long TTL, so a resolver that cached them would miss changes.
const TTL: u32 = 300;
const SERIAL: u32 = 1;

pub(crate) struct TestDns {
    addr: SocketAddr,
    zone: Arc<InMemoryZoneHandler>,
    server: Server<Catalog>,
}

impl TestDns {
    /// Starts a server authoritative for `origin` (for example `cluster.test.`).
    pub(crate) async fn start(origin: &str) -> Self {
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

        let (udp, tcp) = bind_udp_and_tcp().await;
        let addr = udp.local_addr().expect("bound socket has an address");
        let mut server = Server::new(catalog);
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 32);
        Self { addr, zone, server }
    }

    /// Where the server listens (UDP and TCP).
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Adds one record to `owner`'s record set of that type.
    pub(crate) async fn add(&self, owner: &str, data: RData) {
        let record = Record::from_rdata(name(owner), TTL, data);
        assert!(
            self.zone.upsert(record, SERIAL).await,
            "record was not added"
        );
    }

    /// Removes one record; the record set goes away with its last record.
    pub(crate) async fn remove(&self, owner: &str, data: RData) {
        let record = Record::from_rdata(name(owner), TTL, data);
        let key = RrKey::new(LowerName::new(&record.name), record.record_type());
        let mut records = self.zone.records_mut().await;
        let set = records.get_mut(&key).expect("no such record set");
        assert!(Arc::make_mut(set).remove(&record, SERIAL), "no such record");
        if set.is_empty() {
            records.remove(&key);
        }
    }

    /// Stops answering: after this returns, the port is closed and queries go unanswered.
    pub(crate) async fn stop(mut self) {
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
async fn bind_udp_and_tcp() -> (UdpSocket, TcpListener) {
    for _ in 0..20 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
        let addr = udp.local_addr().expect("bound socket has an address");
        if let Ok(tcp) = TcpListener::bind(addr).await {
            return (udp, tcp);
        }
    }
    panic!("no port free for both udp and tcp on 127.0.0.1");
}
