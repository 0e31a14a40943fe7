//! The seam between the membership task and the network.
//!
//! The protocol core is sans-IO (foca); everything that touches sockets goes through
//! [`Transport`], so the same code runs over a real UDP socket and over a simulated network
//! (turmoil) in fault tests.

use std::{future::Future, io, net::SocketAddr};

/// A datagram socket.
pub trait Transport: Send + Sync + 'static {
    /// The address the socket is bound to.
    fn local_addr(&self) -> io::Result<SocketAddr>;

    /// Receives one datagram. Must be cancel-safe.
    fn recv_from<'a>(
        &'a self,
        buf: &'a mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr)>> + Send + 'a;

    /// Sends one datagram without waiting: if the socket cannot take it now, fail (gossip
    /// tolerates loss, the membership task must never block on the network).
    fn try_send_to(&self, datagram: &[u8], target: SocketAddr) -> io::Result<usize>;
}

impl Transport for tokio::net::UdpSocket {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        tokio::net::UdpSocket::local_addr(self)
    }

    fn recv_from<'a>(
        &'a self,
        buf: &'a mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr)>> + Send + 'a {
        tokio::net::UdpSocket::recv_from(self, buf)
    }

    fn try_send_to(&self, datagram: &[u8], target: SocketAddr) -> io::Result<usize> {
        tokio::net::UdpSocket::try_send_to(self, datagram, target)
    }
}
