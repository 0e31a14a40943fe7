//! One lazily connected gRPC channel per peer.
//!
//! The seed server opened a connection per peer and never closed it, so a cluster with pod churn
//! slowly filled with connections to dead addresses. Here a channel lives exactly as long as the
//! peer life it was made for: the router evicts it when the peer fails, leaves, is replaced by
//! a newer life, or gossips a different endpoint.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use mesh_core::{NodeId, abbreviate};
use tonic::transport::{Channel, Endpoint};

use crate::{PeerTarget, RouteError};

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
}

impl Default for ChannelConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            request_timeout: None,
            keep_alive_interval: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(5),
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
        let mut endpoint = Endpoint::from_shared(target.endpoint().to_owned())
            .map_err(|e| invalid(e.to_string()))?
            .connect_timeout(self.config.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(self.config.keep_alive_interval)
            .keep_alive_timeout(self.config.keep_alive_timeout);
        if let Some(timeout) = self.config.request_timeout {
            endpoint = endpoint.timeout(timeout);
        }
        Ok(endpoint.connect_lazy())
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
