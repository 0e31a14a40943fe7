//! One lazily connected gRPC channel per peer.
//!
//! The seed server opened a connection per peer and never closed it, so a cluster with pod churn
//! slowly filled with connections to dead addresses. Here a channel lives exactly as long as the
//! peer life it was made for: the router evicts it when the peer fails, leaves, is replaced by
//! a newer life, or gossips a different endpoint.
//!
//! With [`ChannelConfig::tls`] set, channels are TLS only, and the scheme of a peer's endpoint
//! must agree with the configuration (see [`crate::tls`]): `https://` with TLS, anything else
//! without. A mismatch is refused, never downgraded.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use http::{
    Uri,
    uri::{InvalidUri, Scheme},
};
use mesh_core::{NodeId, abbreviate};
use tonic::transport::{Channel, Endpoint};

#[cfg(feature = "tls")]
use crate::tls::{PeerConnector, PeerTls};
use crate::{
    dialer::{Dialer, DialerService},
    error::RouteError,
    headers::PeerCredential,
    peer::PeerTarget,
};

/// Why an `https://` endpoint is refused when peer channels have no TLS.
#[cfg(feature = "tls")]
const NO_TLS: &str = "the endpoint is https:// but peer channels have no TLS configured \
                      (ChannelConfig::tls); refusing to guess trust roots";
#[cfg(not(feature = "tls"))]
const NO_TLS: &str = "the endpoint is https:// but this build leaves TLS out (the `tls` feature \
                      of tonic-mesh-route); refusing to forward in plaintext";

/// How peer channels connect.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ChannelConfig {
    /// Longest wait for a TCP (and TLS) connection; a peer that does not answer in time is
    /// skipped and the call goes to the next choice. Default 2 s.
    pub connect_timeout: Duration,
    /// Longest wait for a forwarded call's response headers (not for a stream's whole life).
    /// `None` (the default) leaves deadlines to the client's `grpc-timeout`, which is
    /// propagated.
    pub request_timeout: Option<Duration>,
    /// HTTP/2 keep-alive ping interval, so a peer that vanishes mid-stream is noticed even if
    /// the failure detector has not caught up yet. Default 10 s.
    pub keep_alive_interval: Duration,
    /// How long a keep-alive ping may go unanswered. Default 5 s.
    pub keep_alive_timeout: Duration,
    /// TLS for every peer channel; peers must then advertise `https://` endpoints. `None`
    /// (the default) connects in plaintext HTTP/2 and refuses `https://` endpoints.
    #[cfg(feature = "tls")]
    pub tls: Option<PeerTls>,
    /// Opens plaintext connections instead of TCP (a simulated network, a proxy). Not
    /// combined with TLS.
    pub dialer: Option<Dialer>,
    /// A header every call to a peer carries (forwarded calls and [`crate::Router::peer`]
    /// calls alike), so a peer can tell the cluster's own calls from clients' — e.g. a
    /// cluster token that a server's authorization checks. `None` by default.
    pub credential: Option<PeerCredential>,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            request_timeout: None,
            keep_alive_interval: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(5),
            #[cfg(feature = "tls")]
            tls: None,
            dialer: None,
            credential: None,
        }
    }
}

impl ChannelConfig {
    /// Sets [`ChannelConfig::connect_timeout`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`ChannelConfig::request_timeout`].
    pub fn request_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets [`ChannelConfig::credential`].
    pub fn credential(mut self, credential: PeerCredential) -> Self {
        self.credential = Some(credential);
        self
    }

    /// Sets [`ChannelConfig::dialer`].
    pub fn dialer(mut self, dialer: Dialer) -> Self {
        self.dialer = Some(dialer);
        self
    }

    /// Sets [`ChannelConfig::tls`]: peer channels use TLS, and only TLS.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: PeerTls) -> Self {
        self.tls = Some(tls);
        self
    }
}

/// The channel cache ([`crate::Router::channels`]).
#[derive(Debug, Clone)]
pub struct PeerChannels {
    inner: Arc<Mutex<HashMap<NodeId, Cached>>>,
    config: ChannelConfig,
}

#[derive(Debug)]
struct Cached {
    endpoint: String,
    generation: u64,
    channel: Channel,
}

impl PeerChannels {
    pub(crate) fn new(config: ChannelConfig) -> Self {
        Self {
            inner: Arc::default(),
            config,
        }
    }

    /// The header every call to a peer carries, if any.
    pub(crate) fn credential(&self) -> Option<&PeerCredential> {
        self.config.credential.as_ref()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<NodeId, Cached>> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The channel for this peer life, created (without connecting yet) if needed.
    pub(crate) fn get(&self, target: &PeerTarget) -> Result<Channel, RouteError> {
        let mut channels = self.lock();
        if let Some(cached) = channels.get(target.node_id())
            && cached.endpoint == target.endpoint()
            && cached.generation == target.generation()
        {
            return Ok(cached.channel.clone());
        }
        let channel = self.connect_lazy(target)?;
        channels.insert(
            target.node_id().clone(),
            Cached {
                endpoint: target.endpoint().to_owned(),
                generation: target.generation(),
                channel: channel.clone(),
            },
        );
        Ok(channel)
    }

    fn connect_lazy(&self, target: &PeerTarget) -> Result<Channel, RouteError> {
        let invalid = |reason: String| RouteError::InvalidEndpoint {
            node: target.node_id().clone(),
            endpoint: abbreviate(target.endpoint()),
            reason,
        };
        let uri: Uri = target
            .endpoint()
            .parse()
            .map_err(|e: InvalidUri| invalid(e.to_string()))?;
        let https = uri.scheme() == Some(&Scheme::HTTPS);
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.config.tls {
            if !https {
                return Err(invalid(
                    "peer channels require TLS (ChannelConfig::tls is set), so endpoints must be \
                     https://; refusing to forward in plaintext"
                        .to_owned(),
                ));
            }
            if self.config.dialer.is_some() {
                return Err(invalid(
                    "a custom dialer cannot be combined with TLS (ChannelConfig::dialer and ::tls \
                     are both set)"
                        .to_owned(),
                ));
            }
            let connector = PeerConnector::new(tls, self.config.connect_timeout)
                .map_err(|e| invalid(format!("the peer TLS configuration is unusable: {e}")))?;
            // Given an https:// address, tonic would run its own TLS over ours: hand it the
            // address as http:// and keep https:// as the origin calls are made to. The
            // connector bounds the connection time itself (tonic's bound would hide that the
            // peer never saw the call).
            let mut parts = uri.clone().into_parts();
            parts.scheme = Some(Scheme::HTTP);
            let address = Uri::from_parts(parts).map_err(|e| invalid(e.to_string()))?;
            return Ok(self
                .endpoint(address)
                .origin(uri)
                .connect_with_connector_lazy(connector));
        }
        if https {
            return Err(invalid(NO_TLS.to_owned()));
        }
        let endpoint = self
            .endpoint(uri)
            .connect_timeout(self.config.connect_timeout);
        Ok(match &self.config.dialer {
            Some(dialer) => endpoint.connect_with_connector_lazy(DialerService(dialer.clone())),
            None => endpoint.connect_lazy(),
        })
    }

    fn endpoint(&self, uri: Uri) -> Endpoint {
        let endpoint = Endpoint::from(uri)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(self.config.keep_alive_interval)
            .keep_alive_timeout(self.config.keep_alive_timeout);
        match self.config.request_timeout {
            Some(timeout) => endpoint.timeout(timeout),
            None => endpoint,
        }
    }

    /// Drops the channel of `node` (all lives). Calls already running on it finish or fail on
    /// their own; new calls get a fresh channel.
    pub fn evict(&self, node: &NodeId) -> bool {
        self.lock().remove(node).is_some()
    }

    /// Drops the channel of `node` if it was made for `generation` or an older life.
    pub(crate) fn evict_life(&self, node: &NodeId, generation: u64) -> bool {
        let mut channels = self.lock();
        if channels
            .get(node)
            .is_some_and(|cached| cached.generation <= generation)
        {
            channels.remove(node);
            return true;
        }
        false
    }

    /// Drops the channel of `node` if the peer now advertises a different endpoint.
    pub(crate) fn evict_if_moved(&self, node: &NodeId, endpoint: Option<&str>) -> bool {
        let mut channels = self.lock();
        if channels
            .get(node)
            .is_some_and(|cached| Some(cached.endpoint.as_str()) != endpoint)
        {
            channels.remove(node);
            return true;
        }
        false
    }

    /// Keeps only the channels of nodes for which `keep` is true.
    pub(crate) fn retain(&self, mut keep: impl FnMut(&NodeId) -> bool) {
        self.lock().retain(|node, _| keep(node));
    }

    /// Whether a channel to `node` is cached.
    pub fn contains(&self, node: &str) -> bool {
        self.lock().contains_key(node)
    }

    /// Number of cached channels.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no channel is cached.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

#[cfg(all(test, feature = "tls"))]
mod tests {
    use super::*;
    use crate::tls::{CaBundle, testing::TestCa};

    fn target(endpoint: &str) -> PeerTarget {
        PeerTarget::new(NodeId::new("peer-1").unwrap(), endpoint.to_owned(), 1)
    }

    fn tls() -> PeerTls {
        PeerTls::new(CaBundle::from_pem(TestCa::new("ca").pem).unwrap())
    }

    #[tokio::test]
    async fn tls_channels_refuse_endpoints_that_are_not_https() {
        let channels = PeerChannels::new(ChannelConfig::default().tls(tls()));
        for endpoint in ["http://10.0.0.7:50051", "10.0.0.7:50051"] {
            let error = channels.get(&target(endpoint)).unwrap_err();
            assert_eq!(error.code(), tonic::Code::Unavailable);
            assert_eq!(
                error.to_string(),
                format!(
                    "peer peer-1 advertises an invalid grpc endpoint {endpoint:?}: peer channels \
                     require TLS (ChannelConfig::tls is set), so endpoints must be https://; \
                     refusing to forward in plaintext"
                )
            );
        }
        assert!(channels.is_empty());
        channels.get(&target("https://10.0.0.7:50051")).unwrap();
        assert!(channels.contains("peer-1"));
    }

    #[tokio::test]
    async fn plaintext_channels_refuse_https_endpoints() {
        let channels = PeerChannels::new(ChannelConfig::default());
        let error = channels.get(&target("https://10.0.0.7:50051")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "peer peer-1 advertises an invalid grpc endpoint \"https://10.0.0.7:50051\": the \
             endpoint is https:// but peer channels have no TLS configured (ChannelConfig::tls); \
             refusing to guess trust roots"
        );
        assert!(channels.is_empty());
        channels.get(&target("http://10.0.0.7:50051")).unwrap();
        assert!(channels.contains("peer-1"));
    }
}
