//! Bringing your own connections: a [`Dialer`] opens the byte stream a peer channel runs
//! HTTP/2 over. The default is a TCP connection; a dialer lets the router run over a simulated
//! network (turmoil in the fault tests), a Unix socket, or a proxy.

use std::{
    fmt,
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tonic::{codegen::Service, transport::Uri};

/// A connection a [`Dialer`] returns.
pub trait PeerStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> PeerStream for T {}

/// What a [`Dialer`] returns.
pub type DialFuture = Pin<Box<dyn Future<Output = io::Result<Box<dyn PeerStream>>> + Send>>;

/// Opens connections to peers, given their endpoint URI (plaintext channels only).
///
/// A failure here means the peer never saw the call, so the router retries elsewhere.
///
/// ```
/// use mesh_route::{ChannelConfig, Dialer, PeerStream};
///
/// // The default behaviour, spelled out: a TCP connection to the endpoint's host and port.
/// let dialer = Dialer::new(|uri| {
///     let address = format!("{}:{}", uri.host().unwrap_or_default(), uri.port_u16().unwrap_or(80));
///     Box::pin(async move {
///         let stream = tokio::net::TcpStream::connect(address).await?;
///         Ok(Box::new(stream) as Box<dyn PeerStream>)
///     })
/// });
/// let config = ChannelConfig::default().dialer(dialer);
/// ```
#[derive(Clone)]
pub struct Dialer(Arc<dyn Fn(&Uri) -> DialFuture + Send + Sync>);

impl Dialer {
    /// A dialer from a function of the peer's endpoint.
    pub fn new(dial: impl Fn(&Uri) -> DialFuture + Send + Sync + 'static) -> Self {
        Self(Arc::new(dial))
    }
}

impl fmt::Debug for Dialer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Dialer")
    }
}

/// The dialer as the connector tonic expects.
#[derive(Clone)]
pub(crate) struct DialerService(pub(crate) Dialer);

impl Service<Uri> for DialerService {
    type Response = TokioIo<Box<dyn PeerStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let dialing = (self.0.0)(&uri);
        Box::pin(async move { dialing.await.map(TokioIo::new) })
    }
}
