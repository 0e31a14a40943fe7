//! Connecting the command-line tools to a node, in plaintext or over (mutual) TLS.

use mesh::tls::{CaBundle, PeerTls, TlsIdentity};
use tonic::transport::{Channel, Endpoint};

/// TLS flags shared by `meshctl` and `loadgen`.
#[derive(clap::Args, Debug, Clone, Default)]
pub(crate) struct TlsArgs {
    /// Trust this CA (PEM) and connect over TLS (use an https:// address).
    #[arg(long)]
    pub(crate) tls_ca: Option<String>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, requires = "tls_key")]
    pub(crate) tls_cert: Option<String>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long, requires = "tls_cert")]
    pub(crate) tls_key: Option<String>,
    /// Verify the server's certificate for this name instead of the address's host.
    #[arg(long)]
    pub(crate) tls_domain: Option<String>,
}

/// A channel to `address`, over TLS when `--tls-ca` is given.
pub(crate) async fn connect(
    address: &str,
    tls: &TlsArgs,
) -> Result<Channel, Box<dyn std::error::Error>> {
    let mut endpoint = Endpoint::from_shared(address.to_owned())
        .map_err(|e| format!("invalid address {address:?}: {e}"))?;
    if let Some(ca) = &tls.tls_ca {
        let mut peer = PeerTls::new(CaBundle::from_file(ca)?);
        if let (Some(cert), Some(key)) = (&tls.tls_cert, &tls.tls_key) {
            peer = peer.identity(TlsIdentity::from_files(cert, key)?);
        }
        if let Some(domain) = &tls.tls_domain {
            peer = peer.domain(domain.clone())?;
        }
        endpoint = endpoint.tls_config(peer.client_config())?;
    }
    Ok(endpoint
        .connect()
        .await
        .map_err(|e| format!("connecting to {address}: {e}"))?)
}
