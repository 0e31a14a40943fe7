//! Connecting the command-line tools to a node, in plaintext or over (mutual) TLS, with errors
//! that name the address and say why.

use std::time::Duration;

use mesh::tls::{CaBundle, PeerTls, TlsIdentity};
use tonic::transport::{Channel, Endpoint};

/// How long connecting to a node may take before the tool gives up.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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

/// A channel to `address`, over TLS when `--tls-ca` is given. Fails within
/// [`CONNECT_TIMEOUT`], with a message naming the address and the cause.
pub(crate) async fn connect(
    address: &str,
    tls: &TlsArgs,
) -> Result<Channel, Box<dyn std::error::Error>> {
    let mut endpoint = Endpoint::from_shared(address.to_owned())
        .map_err(|e| {
            format!("invalid address {address:?}: {e} (expected e.g. http://127.0.0.1:50051)")
        })?
        .connect_timeout(CONNECT_TIMEOUT);
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
    Ok(endpoint.connect().await.map_err(|e| {
        format!(
            "cannot reach the node at {address}: {} (is it running, and is this its grpc port?)",
            error_chain(&e)
        )
    })?)
}

/// A failed call to the node at `address`, said plainly.
pub(crate) fn call_failed(address: &str, what: &str, status: &tonic::Status) -> String {
    match status.code() {
        tonic::Code::Unimplemented => {
            format!("the node at {address} does not serve {what}")
        }
        tonic::Code::Unavailable => format!(
            "the node at {address} is unavailable: {} ({})",
            status.message(),
            source_chain(status)
        ),
        code => format!("{what} at {address} failed: {code:?}: {}", status.message()),
    }
}

/// An error and its causes, on one line (tonic's transport errors say little at the top).
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        // Layers often repeat their cause's words.
        if parts.last() != Some(&part) {
            parts.push(part);
        }
        source = cause.source();
    }
    parts.join(": ")
}

fn source_chain(status: &tonic::Status) -> String {
    match std::error::Error::source(status) {
        Some(source) => error_chain(source),
        None => "no further detail".to_owned(),
    }
}
