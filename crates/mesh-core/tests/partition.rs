//! A network partition on real UDP: a transport wrapper drops every datagram between the two
//! halves, long enough for each side to declare the other failed, then lets traffic flow
//! again. The halves must merge back on their own, members and node state alike.

mod udp;

use std::{
    collections::HashSet,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use mesh_core::{Membership, Transport, UdpTransport};

/// Which directed links are cut.
#[derive(Clone, Default)]
struct Links(Arc<Mutex<HashSet<(SocketAddr, SocketAddr)>>>);

impl Links {
    fn cut(&self, from: SocketAddr, to: SocketAddr) -> bool {
        self.0.lock().unwrap().contains(&(from, to))
    }
}

struct Faulty {
    socket: UdpTransport,
    addr: SocketAddr,
    links: Links,
}

impl Transport for Faulty {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }

    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        loop {
            let (len, from) = self.socket.recv_from(buf).await?;
            if !self.links.cut(from, self.addr) {
                return Ok((len, from));
            }
        }
    }

    fn try_send_to(&self, datagram: &[u8], target: SocketAddr) -> io::Result<usize> {
        if self.links.cut(self.addr, target) {
            return Ok(datagram.len()); // lost in the network
        }
        self.socket.try_send_to(datagram, target)
    }
}

async fn node(name: &str, links: &Links, seeds: &[SocketAddr]) -> Membership {
    let socket = UdpTransport::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = socket.local_addr().unwrap();
    udp::builder(name, seeds)
        .start_with_transport(Faulty {
            socket,
            addr,
            links: links.clone(),
        })
        .await
        .unwrap()
}

async fn wait(
    what: &str,
    member: &Membership,
    condition: impl FnMut(&mesh_core::MembershipView) -> bool,
) {
    let what = format!("{} to see {what}", member.node_id());
    udp::bounded(&what, member.wait_until(condition)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_halves_declared_failed_merge_back_once_traffic_flows() {
    let links = Links::default();
    let first = node("node-0", &links, &[]).await;
    let seed = [first.local_addr()];
    let mut nodes = vec![first];
    for i in 1..6 {
        nodes.push(node(&format!("node-{i}"), &links, &seed).await);
    }
    for member in &nodes {
        wait("the full cluster", member, |v| v.len() == 6).await;
    }

    // Cut every link between {0,1,2} and {3,4,5}, both ways.
    let (left, right) = nodes.split_at(3);
    {
        let mut cut = links.0.lock().unwrap();
        for a in left {
            for b in right {
                cut.insert((a.local_addr(), b.local_addr()));
                cut.insert((b.local_addr(), a.local_addr()));
            }
        }
    }
    for member in &nodes {
        wait("its half alone", member, |v| v.len() == 3).await;
    }
    for member in left {
        let view = member.view();
        assert!(
            view.members()
                .all(|m| ["node-0", "node-1", "node-2"].contains(&m.node_id().as_str()))
        );
    }

    // Load changes during the partition must arrive after the merge.
    let _guards: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            (0..i as u32)
                .map(|_| n.load().begin_task())
                .collect::<Vec<_>>()
        })
        .collect();

    links.0.lock().unwrap().clear();
    for member in &nodes {
        wait(
            "the merged cluster with everyone's current load",
            member,
            |v| {
                v.len() == 6
                    && (0..6).all(|i| {
                        v.get(&format!("node-{i}"))
                            .and_then(|m| m.state())
                            .is_some_and(|s| s.pending == i as u32)
                    })
            },
        )
        .await;
    }
}
