//! TLS for a node's gRPC server and for the channels it forwards calls through.
//!
//! Two halves, usually configured together on every node of a cluster:
//!
//! * [`ServerTls`]: the server's certificate and key, and optionally the CA whose client
//!   certificates it requires (mutual TLS), for `tonic::transport::Server::tls_config`; the
//!   node then gossips an `https://` endpoint.
//! * [`PeerTls`] in [`crate::route::ChannelConfig::tls`] (via
//!   [`crate::NodeBuilder::channel_config`]): how the router connects to peers — the CA their
//!   server certificates must chain to, and the node's client identity for mutual TLS.
//!
//! With TLS configured, a node refuses peers that advertise `http://` endpoints, and without it
//! refuses `https://` ones: it never downgrades silently. [`mesh_route::tls`] lists what this
//! protects (confidentiality and integrity of forwarded calls, peer authentication with
//! mutual TLS) and what it does not (gossip, binding certificates to node ids, revocation).
//!
//! ```no_run
//! use mesh::{
//!     route::ChannelConfig,
//!     tls::{CaBundle, PeerTls, ServerTls, TlsIdentity},
//! };
//!
//! # async fn demo(routes: tonic::service::Routes) -> Result<(), Box<dyn std::error::Error>> {
//! let ca = CaBundle::from_file("/etc/mesh/ca.pem")?;
//! // One certificate per node, valid for the address it advertises, used as server and client.
//! let identity = TlsIdentity::from_files("/etc/mesh/node.pem", "/etc/mesh/node.key")?;
//! let node = mesh::Node::builder()
//!     .node_id("build-0")?
//!     .grpc_endpoint("https://10.0.0.7:50051")
//!     .channel_config(ChannelConfig::default().tls(PeerTls::new(ca.clone()).identity(identity.clone())))
//!     .start()
//!     .await?;
//! let server = ServerTls::new(identity).require_client_certificates(ca);
//! tonic::transport::Server::builder()
//!     .tls_config(server.server_config())?
//!     .layer(mesh::route::layer::RouteLayer::new(node.router().clone()))
//!     .add_routes(routes)
//!     .serve("0.0.0.0:50051".parse()?)
//!     .await?;
//! # Ok(()) }
//! ```

use std::time::Duration;

pub use mesh_route::tls::{CaBundle, PeerTls, TlsError, TlsIdentity, TlsMaterial};
use tonic::transport::ServerTlsConfig;

/// TLS for a node's gRPC server.
#[derive(Debug, Clone)]
pub struct ServerTls {
    identity: TlsIdentity,
    client_ca: Option<CaBundle>,
    handshake_timeout: Duration,
}

impl ServerTls {
    /// Serves with `identity` (certificate chain and key); clients are not asked for
    /// certificates. The handshake timeout defaults to 10 s.
    pub fn new(identity: TlsIdentity) -> Self {
        Self {
            identity,
            client_ca: None,
            handshake_timeout: Duration::from_secs(10),
        }
    }

    /// Requires every client to present a certificate chaining to `ca` (mutual TLS): clients
    /// without one, or with one from another CA, fail the handshake and never reach a service.
    pub fn require_client_certificates(mut self, ca: CaBundle) -> Self {
        self.client_ca = Some(ca);
        self
    }

    /// How long a client may take to complete the handshake before it is disconnected.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// The server's identity.
    pub fn identity(&self) -> &TlsIdentity {
        &self.identity
    }

    /// The CA client certificates must chain to, when mutual TLS is required.
    pub fn client_ca(&self) -> Option<&CaBundle> {
        self.client_ca.as_ref()
    }

    /// The tonic server configuration, for `tonic::transport::Server::tls_config`.
    pub fn server_config(&self) -> ServerTlsConfig {
        let mut config = ServerTlsConfig::new()
            .identity(self.identity.to_tonic())
            .timeout(self.handshake_timeout);
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(ca.to_tonic());
        }
        config
    }
}
