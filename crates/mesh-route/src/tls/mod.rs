//! TLS for the channels that forward calls to peers, and the material (CA certificates, a
//! certificate with its key) that the servers of the mesh use too.
//!
//! With [`crate::ChannelConfig::tls`] set to a [`PeerTls`], a node connects to its peers only
//! over TLS, verifying each peer's certificate against the configured CA; with a client
//! [`TlsIdentity`] it also proves its own identity to peers whose servers require client
//! certificates (mutual TLS).
//!
//! # The rule for endpoints
//!
//! A node never guesses. With TLS configured, a peer must advertise an `https://` endpoint;
//! one that advertises `http://` (or no scheme) is refused with
//! [`crate::RouteError::InvalidEndpoint`] naming the peer, the endpoint and the rule, and calls
//! go to another node or run locally. Without TLS, an `https://` endpoint is refused likewise,
//! rather than connecting with trust roots nobody chose. A mixed cluster therefore splits
//! visibly into nodes that do not forward to each other; it never downgrades silently.
//!
//! # What is protected
//!
//! * **Confidentiality and integrity** of forwarded calls: requests, their metadata (such as
//!   `authorization` headers, which are propagated to the peer) and the relayed responses.
//! * **Peer authentication**: a node forwards only to a server whose certificate chains to the
//!   configured CA and is valid for the name dialled (the host of the peer's endpoint, or
//!   [`PeerTls::domain`] when peers advertise addresses their certificates do not name).
//! * With **mutual TLS** (servers requiring client certificates from the same CA, and every
//!   node holding a client [`TlsIdentity`]), only holders of a cluster certificate can call a
//!   node's gRPC services at all, so only they can mark calls as forwarded.
//!
//! # What is not
//!
//! * **Gossip** (UDP) is not covered: encrypting it is the gossip keyring's job
//!   (`mesh-core`). Endpoints are learned through gossip, so without the keyring anyone on the
//!   network can announce members and endpoints; TLS still refuses to forward to a server
//!   without a certificate from the cluster CA.
//! * **Node identity** is not bound to certificates: any holder of a certificate from the
//!   cluster CA can serve or claim any node id. Authorisation beyond "is a cluster member" is
//!   the embedding server's job.
//! * **Revocation** (CRLs, OCSP) is not checked, and certificates are read once: rotating them
//!   means restarting the node (or building a new router).
//! * Keys are held in memory as given and are not zeroised on drop; traffic volume and timing
//!   remain visible; availability is not protected.
//!
//! # How a connection is made
//!
//! TCP, then the TLS handshake (ALPN `h2` required), then one more step: the node waits for
//! the peer's first HTTP/2 bytes before it sends anything. In TLS 1.3 a client finishes its
//! handshake *before* the server has checked the client's certificate, so a peer refusing
//! this node's certificate would otherwise look like a connection broken in the middle of a
//! call — which the router must not retry, since it cannot tell that the peer never saw it.
//! Waiting turns every refusal (no certificate, a certificate from another CA) into a failed
//! connection: the call was never accepted and goes to the next choice or runs locally. It
//! costs one round trip per new connection, and relies on the peer sending its HTTP/2
//! settings first, as tonic (h2), grpc-go and Netty servers do. The connect timeout
//! ([`crate::ChannelConfig::connect_timeout`]) bounds all three steps.
//!
//! Certificates and keys are never logged: the `Debug` output of these types shows counts,
//! never material.

mod connector;

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    ClientConfig, RootCertStore,
    crypto::CryptoProvider,
    pki_types::{
        CertificateDer, PrivateKeyDer, ServerName,
        pem::{self, PemObject},
    },
    sign::{CertifiedKey, SingleCertAndKey},
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

pub(crate) use connector::PeerConnector;

/// The kinds of TLS material, as named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMaterial {
    /// A CA certificate to trust ([`CaBundle`]).
    CaCertificate,
    /// A certificate chain of a [`TlsIdentity`].
    Certificate,
    /// The private key of a [`TlsIdentity`].
    PrivateKey,
}

impl fmt::Display for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsMaterial::CaCertificate => "CA certificate",
            TlsMaterial::Certificate => "certificate",
            TlsMaterial::PrivateKey => "private key",
        })
    }
}

/// TLS material could not be read or used. Messages name the file (or say the material was
/// given as PEM data) and the cause; they never contain key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading the {what} file {}: {source}", path.display())]
    Read {
        /// What the file should hold.
        what: TlsMaterial,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The material is malformed, or unusable for TLS.
    #[error("invalid {what} in {origin}: {reason}")]
    Invalid {
        /// What is invalid.
        what: TlsMaterial,
        /// Where it came from: `file <path>` or `PEM data`.
        origin: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// A verification name is neither a DNS name nor an IP address.
    #[error("invalid TLS domain name {domain:?}: it must be a DNS name or an IP address")]
    InvalidDomain {
        /// The name.
        domain: String,
    },
}

/// Where PEM material came from, for error messages.
#[derive(Debug, Clone)]
enum Origin {
    Data,
    File(PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Data => f.write_str("PEM data"),
            Origin::File(path) => write!(f, "file {}", path.display()),
        }
    }
}

impl Origin {
    fn invalid(&self, what: TlsMaterial, reason: impl Into<String>) -> TlsError {
        TlsError::Invalid {
            what,
            origin: self.to_string(),
            reason: reason.into(),
        }
    }
}

fn read(what: TlsMaterial, path: &Path) -> Result<(Vec<u8>, Origin), TlsError> {
    std::fs::read(path)
        .map(|bytes| (bytes, Origin::File(path.to_owned())))
        .map_err(|source| TlsError::Read {
            what,
            path: path.to_owned(),
            source,
        })
}

/// Describes a PEM parse error without quoting the input, which may be a key.
fn pem_problem(error: &pem::Error) -> &'static str {
    match error {
        pem::Error::MissingSectionEnd { .. } => "a PEM section has no END line",
        pem::Error::IllegalSectionStart { .. } => "a PEM BEGIN line is malformed",
        pem::Error::Base64Decode(_) => "a PEM section is not valid base64",
        pem::Error::SectionTooLarge => "a PEM section is too large",
        _ => "the PEM data is malformed",
    }
}

fn certificates(
    pem: &[u8],
    origin: &Origin,
    what: TlsMaterial,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| origin.invalid(what, pem_problem(&e)))?;
    if certificates.is_empty() {
        return Err(origin.invalid(
            what,
            "no PEM certificate found (expected \"-----BEGIN CERTIFICATE-----\")",
        ));
    }
    Ok(certificates)
}

/// The crypto provider TLS connections use: the process default if one is installed, else
/// ring (what tonic does too), so validation here agrees with the connections later.
fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// The CA certificates that peers' (or clients') certificates must chain to.
#[derive(Clone)]
pub struct CaBundle {
    pem: Vec<u8>,
    roots: Arc<RootCertStore>,
}

impl fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaBundle")
            .field("certificates", &self.roots.len())
            .finish()
    }
}

impl CaBundle {
    /// One or more PEM certificates (`-----BEGIN CERTIFICATE-----`), each usable as a trust
    /// anchor.
    pub fn from_pem(pem: impl AsRef<[u8]>) -> Result<Self, TlsError> {
        Self::parse(pem.as_ref().to_vec(), &Origin::Data)
    }

    /// Reads [`CaBundle::from_pem`] from a file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TlsError> {
        let (pem, origin) = read(TlsMaterial::CaCertificate, path.as_ref())?;
        Self::parse(pem, &origin)
    }

    fn parse(pem: Vec<u8>, origin: &Origin) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for certificate in certificates(&pem, origin, TlsMaterial::CaCertificate)? {
            roots
                .add(certificate)
                .map_err(|e| origin.invalid(TlsMaterial::CaCertificate, e.to_string()))?;
        }
        Ok(Self {
            pem,
            roots: Arc::new(roots),
        })
    }

    /// The bundle for tonic (for example for a server's `client_ca_root`).
    pub fn to_tonic(&self) -> Certificate {
        Certificate::from_pem(&self.pem)
    }
}

/// A certificate chain (leaf first) and its private key: a server's identity, or a client's
/// for mutual TLS.
#[derive(Clone)]
pub struct TlsIdentity {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    certified: Arc<CertifiedKey>,
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("certificates", &self.certified.cert.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl TlsIdentity {
    /// A PEM certificate chain (leaf first) and a PEM private key (PKCS#8, PKCS#1 or SEC1).
    /// The key must belong to the leaf certificate.
    pub fn from_pem(
        cert_pem: impl AsRef<[u8]>,
        key_pem: impl AsRef<[u8]>,
    ) -> Result<Self, TlsError> {
        Self::parse(
            (cert_pem.as_ref().to_vec(), Origin::Data),
            (key_pem.as_ref().to_vec(), Origin::Data),
        )
    }

    /// Reads [`TlsIdentity::from_pem`] from a certificate file and a key file.
    pub fn from_files(
        cert_path: impl AsRef<Path>,
        key_path: impl AsRef<Path>,
    ) -> Result<Self, TlsError> {
        let cert = read(TlsMaterial::Certificate, cert_path.as_ref())?;
        let key = read(TlsMaterial::PrivateKey, key_path.as_ref())?;
        Self::parse(cert, key)
    }

    fn parse(
        (cert_pem, cert_origin): (Vec<u8>, Origin),
        (key_pem, key_origin): (Vec<u8>, Origin),
    ) -> Result<Self, TlsError> {
        let chain = certificates(&cert_pem, &cert_origin, TlsMaterial::Certificate)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
            pem::Error::NoItemsFound => key_origin.invalid(
                TlsMaterial::PrivateKey,
                "no PEM private key found (expected PKCS#8, PKCS#1 or SEC1)",
            ),
            other => key_origin.invalid(TlsMaterial::PrivateKey, pem_problem(&other)),
        })?;
        let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => key_origin.invalid(
                TlsMaterial::PrivateKey,
                format!("it does not belong to the certificate in {cert_origin}"),
            ),
            other => key_origin.invalid(TlsMaterial::PrivateKey, other.to_string()),
        })?;
        Ok(Self {
            cert_pem,
            key_pem,
            certified: Arc::new(certified),
        })
    }

    /// The identity for tonic (for example for a server's TLS configuration). Careful: tonic's
    /// `Identity` prints the key in its `Debug` output.
    pub fn to_tonic(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, &self.key_pem)
    }
}

/// How a node connects to its peers over TLS: the CA their certificates must chain to, the
/// node's own client identity for mutual TLS, and optionally the name to verify instead of the
/// endpoint's host.
///
/// ```no_run
/// use mesh_route::{CaBundle, ChannelConfig, PeerTls, TlsIdentity};
///
/// # fn demo() -> Result<(), mesh_route::TlsError> {
/// let tls = PeerTls::new(CaBundle::from_file("/etc/mesh/ca.pem")?)
///     .identity(TlsIdentity::from_files("/etc/mesh/node.pem", "/etc/mesh/node.key")?)
///     .domain("mesh.build.svc")?;
/// let channels = ChannelConfig::default().tls(tls);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PeerTls {
    ca: CaBundle,
    identity: Option<TlsIdentity>,
    domain: Option<ServerName<'static>>,
}

impl PeerTls {
    /// Trusts peers whose certificates chain to `ca`; presents no client certificate.
    pub fn new(ca: CaBundle) -> Self {
        Self {
            ca,
            identity: None,
            domain: None,
        }
    }

    /// Presents `identity` to peers that ask for a client certificate (mutual TLS).
    pub fn identity(mut self, identity: TlsIdentity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Verifies every peer's certificate for `name` instead of the host of its endpoint. Useful
    /// when peers advertise IP addresses and their certificates name the service.
    pub fn domain(mut self, name: impl Into<String>) -> Result<Self, TlsError> {
        let name = name.into();
        let server_name = ServerName::try_from(name.clone())
            .map_err(|_| TlsError::InvalidDomain { domain: name })?;
        self.domain = Some(server_name);
        Ok(self)
    }

    /// The trusted CA certificates.
    pub fn ca(&self) -> &CaBundle {
        &self.ca
    }

    /// The client identity, if mutual TLS is configured.
    pub fn client_identity(&self) -> Option<&TlsIdentity> {
        self.identity.as_ref()
    }

    /// The verification name override, if any.
    pub fn domain_name(&self) -> Option<String> {
        self.domain.as_ref().map(|name| name.to_str().into_owned())
    }

    /// The equivalent tonic client configuration, for clients of the mesh's servers.
    pub fn client_config(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new().ca_certificate(self.ca.to_tonic());
        if let Some(identity) = &self.identity {
            config = config.identity(identity.to_tonic());
        }
        if let Some(domain) = self.domain_name() {
            config = config.domain_name(domain);
        }
        config
    }

    /// The rustls configuration of peer channels: these roots, this client certificate, h2.
    fn rustls_config(&self) -> Result<ClientConfig, rustls::Error> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(Arc::clone(&self.ca.roots));
        let mut config = match &self.identity {
            Some(identity) => builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(
                Arc::clone(&identity.certified),
            ))),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![connector::ALPN_H2.to_vec()];
        Ok(config)
    }
}

/// Certificates made up for tests.
#[cfg(test)]
pub(crate) mod testing {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };

    /// A CA that signs certificates for 127.0.0.1 and localhost.
    pub(crate) struct TestCa {
        issuer: Issuer<'static, KeyPair>,
        pub(crate) pem: String,
    }

    impl TestCa {
        pub(crate) fn new(name: &str) -> Self {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            let key = KeyPair::generate().unwrap();
            let pem = params.self_signed(&key).unwrap().pem();
            Self {
                issuer: Issuer::new(params, key),
                pem,
            }
        }

        /// A leaf certificate and its key, as PEM.
        pub(crate) fn leaf(&self) -> (String, String) {
            let params =
                CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                    .unwrap();
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{testing::TestCa, *};

    #[test]
    fn a_ca_bundle_needs_a_usable_certificate() {
        let error = CaBundle::from_pem("not pem at all").unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid CA certificate in PEM data: no PEM certificate found (expected \
             \"-----BEGIN CERTIFICATE-----\")"
        );
        let (_, key) = TestCa::new("ca").leaf();
        assert!(
            CaBundle::from_pem(key).is_err(),
            "a key is not a certificate"
        );
        let ca = TestCa::new("ca");
        let bundle = CaBundle::from_pem(format!("{}{}", ca.pem, TestCa::new("other").pem));
        assert_eq!(
            format!("{:?}", bundle.unwrap()),
            "CaBundle { certificates: 2 }"
        );
    }

    #[test]
    fn errors_name_the_file_and_the_cause() {
        let missing = Path::new("/nonexistent/mesh-tls/ca.pem");
        let error = CaBundle::from_file(missing).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("reading the CA certificate file /nonexistent/mesh-tls/ca.pem: "),
            "{error}"
        );

        let path = std::env::temp_dir().join(format!(
            "mesh-route-tls-test-{}-{}.pem",
            std::process::id(),
            uuid::Uuid::now_v7()
        ));
        std::fs::write(&path, "garbage").unwrap();
        let error = CaBundle::from_file(&path).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            error.to_string(),
            format!(
                "invalid CA certificate in file {}: no PEM certificate found (expected \
                 \"-----BEGIN CERTIFICATE-----\")",
                path.display()
            )
        );

        let error = TlsIdentity::from_files(missing, missing).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("reading the certificate file /nonexistent/mesh-tls/ca.pem: "),
            "{error}"
        );
    }

    #[test]
    fn a_key_must_be_present_well_formed_and_belong_to_its_certificate() {
        let ca = TestCa::new("ca");
        let (cert, key) = ca.leaf();
        let (_, other_key) = ca.leaf();
        assert!(TlsIdentity::from_pem(&cert, &key).is_ok());
        assert_eq!(
            TlsIdentity::from_pem(&cert, &other_key)
                .unwrap_err()
                .to_string(),
            "invalid private key in PEM data: it does not belong to the certificate in PEM data"
        );
        assert_eq!(
            TlsIdentity::from_pem(&cert, &cert).unwrap_err().to_string(),
            "invalid private key in PEM data: no PEM private key found (expected PKCS#8, \
             PKCS#1 or SEC1)"
        );
        let broken = "-----BEGIN PRIVATE KEY-----\nsecret-material!\n-----END PRIVATE KEY-----\n";
        let error = TlsIdentity::from_pem(&cert, broken)
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "invalid private key in PEM data: a PEM section is not valid base64"
        );
    }

    #[test]
    fn debug_output_never_shows_certificates_or_keys() {
        let ca = TestCa::new("ca");
        let (cert, key) = ca.leaf();
        let identity = TlsIdentity::from_pem(&cert, &key).unwrap();
        let tls = PeerTls::new(CaBundle::from_pem(&ca.pem).unwrap()).identity(identity);
        let debug = format!("{tls:?}");
        assert_eq!(
            debug,
            "PeerTls { ca: CaBundle { certificates: 1 }, identity: Some(TlsIdentity { \
             certificates: 1, key: \"<redacted>\" }), domain: None }"
        );
    }

    #[test]
    fn domain_overrides_must_be_names_or_addresses() {
        let ca = CaBundle::from_pem(TestCa::new("ca").pem).unwrap();
        let tls = PeerTls::new(ca.clone()).domain("mesh.build.svc").unwrap();
        assert_eq!(tls.domain_name().as_deref(), Some("mesh.build.svc"));
        assert!(PeerTls::new(ca.clone()).domain("10.0.0.7").is_ok());
        assert_eq!(
            PeerTls::new(ca)
                .domain("not a name")
                .unwrap_err()
                .to_string(),
            "invalid TLS domain name \"not a name\": it must be a DNS name or an IP address"
        );
    }
}
