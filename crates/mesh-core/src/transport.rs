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

/// A UDP socket: tokio receives, and sends go straight to a non-blocking clone of the socket.
///
/// Why not tokio's own `try_send_to`: it refuses to even try until the reactor has reported the
/// socket writable, so the first datagrams after binding (the announce to the seeds) would be
/// dropped. The plain non-blocking send fails only when the kernel's buffer is really full.
#[derive(Debug)]
pub struct UdpTransport {
    socket: tokio::net::UdpSocket,
    sender: std::net::UdpSocket,
}

impl UdpTransport {
    /// Binds a UDP socket. Must be called inside a tokio runtime.
    pub async fn bind(addr: SocketAddr) -> io::Result<Self> {
        Self::from_tokio(tokio::net::UdpSocket::bind(addr).await?)
    }

    /// Wraps an already bound socket (for example one inherited from a supervisor).
    pub fn from_tokio(socket: tokio::net::UdpSocket) -> io::Result<Self> {
        let std = socket.into_std()?;
        let sender = std.try_clone()?;
        sender.set_nonblocking(true)?;
        Ok(Self {
            socket: tokio::net::UdpSocket::from_std(std)?,
            sender,
        })
    }
}

impl Transport for UdpTransport {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    fn recv_from<'a>(
        &'a self,
        buf: &'a mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr)>> + Send + 'a {
        self.socket.recv_from(buf)
    }

    fn try_send_to(&self, datagram: &[u8], target: SocketAddr) -> io::Result<usize> {
        self.sender.send_to(datagram, target)
    }
}

/// The simulated network of [turmoil](https://docs.rs/turmoil): the same membership code runs
/// on it, on simulated time, with partitions, loss, latency, crashes and restarts injected
/// deterministically from a seed.
#[cfg(feature = "turmoil")]
impl Transport for turmoil::net::UdpSocket {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        turmoil::net::UdpSocket::local_addr(self)
    }

    fn recv_from<'a>(
        &'a self,
        buf: &'a mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr)>> + Send + 'a {
        turmoil::net::UdpSocket::recv_from(self, buf)
    }

    fn try_send_to(&self, datagram: &[u8], target: SocketAddr) -> io::Result<usize> {
        turmoil::net::UdpSocket::try_send_to(self, datagram, target)
    }
}
