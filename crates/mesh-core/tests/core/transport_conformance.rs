//! What every [`Transport`] must do, checked against each implementation: the real UDP socket,
//! turmoil's simulated one (which the fault tests run on), and the one-host test socket the
//! simulated-time cluster tests run on (turmoil's, with cuttable links).

use crate::support;

use std::{future::Future, net::SocketAddr, time::Duration};

use mesh_core::{Transport, UdpTransport, wire::MAX_DATAGRAM};

/// A socket and the address others reach it at.
struct Bound<T> {
    socket: T,
    addr: SocketAddr,
}

async fn delivers_intact_with_the_source_address<T: Transport>(a: &Bound<T>, b: &Bound<T>) {
    let (a, to, b) = (&a.socket, b.addr, &b.socket);
    let payload = b"ms\x01\x01hello";
    assert_eq!(a.try_send_to(payload, to).unwrap(), payload.len());
    let mut buf = vec![0; MAX_DATAGRAM + 1];
    let (len, from) = b.recv_from(&mut buf).await.unwrap();
    assert_eq!(&buf[..len], payload);
    assert_eq!(from.port(), a.local_addr().unwrap().port());
}

async fn an_oversized_datagram_is_seen_as_oversized<T: Transport>(a: &Bound<T>, b: &Bound<T>) {
    // The receive buffer is one byte over the budget, so an oversized datagram shows as such.
    let big = vec![7u8; MAX_DATAGRAM + 1];
    a.socket.try_send_to(&big, b.addr).unwrap();
    let b = &b.socket;
    let mut buf = vec![0; MAX_DATAGRAM + 1];
    let (len, _) = b.recv_from(&mut buf).await.unwrap();
    assert_eq!(len, MAX_DATAGRAM + 1);
}

async fn receiving_is_cancel_safe<T: Transport>(a: &Bound<T>, b: &Bound<T>) {
    let mut buf = vec![0; MAX_DATAGRAM + 1];
    // A receive abandoned before anything arrived must not swallow the next datagram.
    let abandoned =
        tokio::time::timeout(Duration::from_millis(5), b.socket.recv_from(&mut buf)).await;
    assert!(abandoned.is_err());
    a.socket.try_send_to(b"after", b.addr).unwrap();
    let (len, _) = b.socket.recv_from(&mut buf).await.unwrap();
    assert_eq!(&buf[..len], b"after");
}

async fn sending_into_the_void_neither_blocks_nor_breaks_the_socket<T: Transport>(
    a: &Bound<T>,
    b: &Bound<T>,
    nobody: SocketAddr,
) {
    for _ in 0..100 {
        // Ok or an error, but immediately, and the socket keeps working.
        let _ = a.socket.try_send_to(b"lost", nobody);
    }
    delivers_intact_with_the_source_address(a, b).await;
}

async fn conformance<T: Transport, F>(bind: impl Fn(u16) -> F, nobody: SocketAddr)
where
    F: Future<Output = Bound<T>>,
{
    let a = bind(0).await;
    let b = bind(1).await;
    assert_eq!(
        a.socket.local_addr().unwrap().port(),
        a.addr.port(),
        "local_addr reports the bound port"
    );
    delivers_intact_with_the_source_address(&a, &b).await;
    an_oversized_datagram_is_seen_as_oversized(&a, &b).await;
    receiving_is_cancel_safe(&a, &b).await;
    sending_into_the_void_neither_blocks_nor_breaks_the_socket(&a, &b, nobody).await;
}

#[tokio::test]
async fn tokio_udp_conforms() {
    // A port with nothing bound: bind, note, release.
    let nobody = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    conformance(
        |_| async {
            let socket = UdpTransport::bind("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap();
            let addr = socket.local_addr().unwrap();
            Bound { socket, addr }
        },
        nobody,
    )
    .await;
}

#[test]
fn turmoil_udp_conforms() {
    let mut sim = turmoil::Builder::new().build();
    sim.client("conformance", async {
        conformance(
            |i| async move {
                let port = 7000 + i;
                let socket = turmoil::net::UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], port)))
                    .await
                    .unwrap();
                Bound {
                    socket,
                    addr: SocketAddr::new(turmoil::lookup("conformance"), port),
                }
            },
            SocketAddr::from((turmoil::lookup("conformance"), 9999)),
        )
        .await;
        Ok(())
    });
    sim.run().unwrap();
}

#[test]
fn the_one_host_test_socket_conforms() {
    support::one_host::simulate(1, async {
        let links = support::one_host::Links::default();
        conformance(
            |_| async {
                let socket = support::one_host::SimSocket::bind(&links).await;
                let addr = socket.local_addr().unwrap();
                Bound { socket, addr }
            },
            "127.0.0.1:9".parse().unwrap(),
        )
        .await;
    });
}
