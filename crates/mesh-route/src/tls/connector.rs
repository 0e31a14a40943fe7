//! Dials a peer over TLS and hands the connection to HTTP/2 only once the peer has accepted
//! the session (see "How a connection is made" in [`crate::tls`]).
//!
//! Nothing of a call is written before [`PeerConnector`] returns, so every error it reports —
//! refused, timed out, handshake failed, client certificate rejected — means the peer never
//! saw the call. tonic wraps these errors in `tonic::ConnectError`, which is what
//! [`crate::failed_before_accept`] recognises.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{TlsConnector, client::TlsStream};
use tonic::{codegen::Service, transport::Uri};

use super::PeerTls;

/// The ALPN protocol id of HTTP/2.
pub(crate) const ALPN_H2: &[u8] = b"h2";

/// Enough for a server's first HTTP/2 frames (SETTINGS, perhaps WINDOW_UPDATE).
const FIRST_READ: usize = 4096;

/// Why a TLS connection to a peer could not be made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectFailure {
    #[error("the endpoint {0} has no host")]
    NoHost(Uri),
    #[error("{host:?} is not a valid TLS server name; set PeerTls::domain")]
    ServerName { host: String },
    #[error("connecting to {address} failed: {source}")]
    Tcp {
        address: String,
        #[source]
        source: io::Error,
    },
    #[error("the TLS handshake with {address} failed: {source}")]
    Handshake {
        address: String,
        #[source]
        source: io::Error,
    },
    #[error("{address} did not negotiate HTTP/2 (ALPN h2) over TLS")]
    NoHttp2 { address: String },
    #[error("{address} refused the TLS session: {source}")]
    Refused {
        address: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "{address} closed the connection after the TLS handshake; it may require a client \
         certificate this node does not present"
    )]
    Closed { address: String },
    #[error("connecting to {address} over TLS timed out after {timeout:?}")]
    TimedOut { address: String, timeout: Duration },
}

/// A tonic connector for `https://` peers.
#[derive(Clone)]
pub(crate) struct PeerConnector {
    tls: TlsConnector,
    server_name: Option<ServerName<'static>>,
    timeout: Duration,
}

impl PeerConnector {
    /// Connects with `tls`; `timeout` bounds TCP, the handshake and the peer's verdict together.
    pub(crate) fn new(tls: &PeerTls, timeout: Duration) -> Result<Self, rustls::Error> {
        Ok(Self {
            tls: TlsConnector::from(Arc::new(tls.rustls_config()?)),
            server_name: tls.domain.clone(),
            timeout,
        })
    }

    async fn connect(self, uri: Uri) -> Result<Accepted, ConnectFailure> {
        let authority_host = uri
            .host()
            .ok_or_else(|| ConnectFailure::NoHost(uri.clone()))?;
        let port = uri.port_u16().unwrap_or(443);
        let address = format!("{authority_host}:{port}");
        // An IPv6 host comes in brackets.
        let host = authority_host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(authority_host)
            .to_owned();
        let server_name = match self.server_name.clone() {
            Some(name) => name,
            None => ServerName::try_from(host.clone())
                .map_err(|_| ConnectFailure::ServerName { host: host.clone() })?,
        };
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.establish(&host, port, server_name, &address))
            .await
            .map_err(|_| ConnectFailure::TimedOut {
                address: address.clone(),
                timeout,
            })?
    }

    async fn establish(
        &self,
        host: &str,
        port: u16,
        server_name: ServerName<'static>,
        address: &str,
    ) -> Result<Accepted, ConnectFailure> {
        let tcp_failed = |source| ConnectFailure::Tcp {
            address: address.to_owned(),
            source,
        };
        let tcp = TcpStream::connect((host, port)).await.map_err(tcp_failed)?;
        tcp.set_nodelay(true).map_err(tcp_failed)?;
        let mut stream = self.tls.connect(server_name, tcp).await.map_err(|source| {
            ConnectFailure::Handshake {
                address: address.to_owned(),
                source,
            }
        })?;
        if stream.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
            return Err(ConnectFailure::NoHttp2 {
                address: address.to_owned(),
            });
        }
        // The peer's verdict on our certificate: its first HTTP/2 bytes, or an alert.
        let mut early = vec![0; FIRST_READ];
        let read = stream
            .read(&mut early)
            .await
            .map_err(|source| ConnectFailure::Refused {
                address: address.to_owned(),
                source,
            })?;
        if read == 0 {
            return Err(ConnectFailure::Closed {
                address: address.to_owned(),
            });
        }
        early.truncate(read);
        Ok(Accepted {
            early,
            offset: 0,
            stream,
        })
    }
}

impl Service<Uri> for PeerConnector {
    type Response = TokioIo<Accepted>;
    type Error = ConnectFailure;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connector = self.clone();
        Box::pin(async move { connector.connect(uri).await.map(TokioIo::new) })
    }
}

/// A TLS connection the peer accepted, replaying the bytes read to learn that.
pub(crate) struct Accepted {
    early: Vec<u8>,
    offset: usize,
    stream: TlsStream<TcpStream>,
}

impl AsyncRead for Accepted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(rest) = this
            .early
            .get(this.offset..)
            .filter(|rest| !rest.is_empty())
        {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.offset += n;
            if this.offset == this.early.len() {
                this.early = Vec::new();
                this.offset = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use rustls::{
        RootCertStore, ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        server::WebPkiClientVerifier,
    };
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };
    use tokio_rustls::TlsAcceptor;

    use super::*;
    use crate::tls::{CaBundle, TlsIdentity, testing::TestCa};

    /// A TLS server on 127.0.0.1 with a certificate from `ca`, requiring client certificates
    /// from `client_ca` if given, offering `alpn`, writing `greeting` once the session is up.
    async fn server(ca: &TestCa, client_ca: Option<&TestCa>, alpn: Option<&[u8]>) -> SocketAddr {
        let (cert, key) = ca.leaf();
        let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            Some(client_ca) => {
                let mut roots = RootCertStore::empty();
                roots
                    .add(CertificateDer::from_pem_slice(client_ca.pem.as_bytes()).unwrap())
                    .unwrap();
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key).unwrap();
        config.alpn_protocols = alpn.map(|p| p.to_vec()).into_iter().collect();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        let _ = tls.write_all(GREETING).await;
                        let _ = tls.read_to_end(&mut Vec::new()).await;
                    }
                });
            }
        });
        addr
    }

    const GREETING: &[u8] = b"server settings";

    fn connector(ca: &TestCa, identity_from: Option<&TestCa>) -> PeerConnector {
        let mut tls = PeerTls::new(CaBundle::from_pem(&ca.pem).unwrap());
        if let Some(issuer) = identity_from {
            let (cert, key) = issuer.leaf();
            tls = tls.identity(TlsIdentity::from_pem(cert, key).unwrap());
        }
        PeerConnector::new(&tls, Duration::from_secs(10)).unwrap()
    }

    fn uri(addr: SocketAddr) -> Uri {
        format!("http://{addr}").parse().unwrap()
    }

    #[tokio::test]
    async fn an_accepted_session_replays_the_peers_first_bytes() {
        let ca = TestCa::new("cluster");
        let addr = server(&ca, Some(&ca), Some(ALPN_H2)).await;
        let mut accepted = connector(&ca, Some(&ca)).connect(uri(addr)).await.unwrap();
        let mut first = vec![0; GREETING.len()];
        accepted.read_exact(&mut first).await.unwrap();
        assert_eq!(first, GREETING);
    }

    #[tokio::test]
    async fn a_refused_client_certificate_fails_the_connection() {
        let ca = TestCa::new("cluster");
        let addr = server(&ca, Some(&ca), Some(ALPN_H2)).await;
        let rogue = TestCa::new("rogue");
        for identity_from in [Some(&rogue), None] {
            let error = connector(&ca, identity_from)
                .connect(uri(addr))
                .await
                .err()
                .unwrap();
            assert!(
                matches!(
                    error,
                    ConnectFailure::Refused { .. } | ConnectFailure::Closed { .. }
                ),
                "{error}"
            );
            assert!(error.to_string().starts_with(&addr.to_string()), "{error}");
        }
    }

    #[tokio::test]
    async fn an_untrusted_server_fails_the_handshake() {
        let addr = server(&TestCa::new("elsewhere"), None, Some(ALPN_H2)).await;
        let error = connector(&TestCa::new("cluster"), None)
            .connect(uri(addr))
            .await
            .err()
            .unwrap();
        assert!(matches!(error, ConnectFailure::Handshake { .. }), "{error}");
        assert!(error.to_string().contains("UnknownIssuer"), "{error}");
    }

    #[tokio::test]
    async fn a_server_certificate_for_another_name_fails_the_handshake() {
        let ca = TestCa::new("cluster");
        let addr = server(&ca, None, Some(ALPN_H2)).await;
        let tls = PeerTls::new(CaBundle::from_pem(&ca.pem).unwrap())
            .domain("other.test")
            .unwrap();
        let error = PeerConnector::new(&tls, Duration::from_secs(10))
            .unwrap()
            .connect(uri(addr))
            .await
            .err()
            .unwrap();
        assert!(matches!(error, ConnectFailure::Handshake { .. }), "{error}");
        assert!(
            error
                .to_string()
                .contains("certificate not valid for name \"other.test\""),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_server_without_http2_is_refused() {
        let ca = TestCa::new("cluster");
        let addr = server(&ca, None, None).await;
        let error = connector(&ca, None).connect(uri(addr)).await.err().unwrap();
        assert_eq!(
            error.to_string(),
            format!("{addr} did not negotiate HTTP/2 (ALPN h2) over TLS")
        );
    }

    #[tokio::test]
    async fn a_peer_that_never_completes_the_handshake_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = tokio::spawn(async move { listener.accept().await });
        let ca = TestCa::new("cluster");
        let tls = PeerTls::new(CaBundle::from_pem(&ca.pem).unwrap());
        let error = PeerConnector::new(&tls, Duration::from_millis(100))
            .unwrap()
            .connect(uri(addr))
            .await
            .err()
            .unwrap();
        assert_eq!(
            error.to_string(),
            format!("connecting to {addr} over TLS timed out after 100ms")
        );
        held.abort();
    }
}
