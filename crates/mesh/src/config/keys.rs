//! The mesh section's keys and their defaults: each key written once, in the
//! [`config_section!`](crate::config_section) list, with the choices some of them take.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use mesh_core::{DEFAULT_GOSSIP_PORT, DEFAULT_MAX_CONCURRENCY, Timing};
use mesh_route::{
    Affinity, LeastLoaded, PowerOfTwoChoices, Random, RoundRobin, Strategy, WeightedCapacity,
    WhenFull,
};
use serde::Deserialize;

use super::{Choice, choice};

impl Choice for DiscoveryMode {}
impl Choice for TimingPreset {}
impl Choice for StrategyKind {}
impl Choice for WhenFullMode {}

/// How a node finds its peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DiscoveryMode {
    /// A static `join_peers` list.
    #[default]
    List,
    /// The A/AAAA (or SRV) records of `dns_service_name`.
    Dns,
}

/// A [`Timing`] preset by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TimingPreset {
    /// [`Timing::lan`]: probes every 0.8 s, for a data-centre network.
    #[default]
    Lan,
    /// [`Timing::wan`]: five-second probes, for links between regions.
    Wan,
    /// [`Timing::local`]: everything within a second or two, for one machine (tests, demos).
    Local,
}

impl TimingPreset {
    /// The preset's timing.
    pub fn timing(self) -> Timing {
        match self {
            TimingPreset::Lan => Timing::lan(),
            TimingPreset::Wan => Timing::wan(),
            TimingPreset::Local => Timing::local(),
        }
    }
}

/// A built-in routing strategy by name (see [`mesh_route::select`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyKind {
    /// [`LeastLoaded`].
    #[default]
    LeastLoaded,
    /// [`PowerOfTwoChoices`].
    PowerOfTwo,
    /// [`RoundRobin`].
    RoundRobin,
    /// [`Random`].
    Random,
    /// [`WeightedCapacity`].
    Weighted,
    /// [`Affinity`].
    Affinity,
}

impl StrategyKind {
    /// A new instance of the strategy, seeded from the operating system.
    pub fn strategy(self) -> Arc<dyn Strategy> {
        match self {
            StrategyKind::LeastLoaded => Arc::new(LeastLoaded::new()),
            StrategyKind::PowerOfTwo => Arc::new(PowerOfTwoChoices::new()),
            StrategyKind::RoundRobin => Arc::new(RoundRobin::new()),
            StrategyKind::Random => Arc::new(Random::new()),
            StrategyKind::Weighted => Arc::new(WeightedCapacity::new()),
            StrategyKind::Affinity => Arc::new(Affinity::new()),
        }
    }
}

/// What the router does when every node is full, by name (see [`WhenFull`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFullMode {
    /// [`WhenFull::RunLocally`]: queue the call on the node it arrived at.
    RunLocally,
    /// [`WhenFull::Wait`]: hold the call until a slot frees anywhere.
    #[default]
    Wait,
}

impl From<WhenFullMode> for WhenFull {
    fn from(mode: WhenFullMode) -> Self {
        match mode {
            WhenFullMode::RunLocally => WhenFull::RunLocally,
            WhenFullMode::Wait => WhenFull::Wait,
        }
    }
}

crate::config_section! {
    /// The mesh configuration, with the seed server's keys. Every key has a default, so an
    /// empty file is a valid (single-node, list-mode) configuration.
    #[derive(Debug, Clone, PartialEq, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    #[non_exhaustive]
    pub struct MeshConfig in "mesh" {
        /// Whether the server should join a mesh at all. Default `true`.
        enabled: bool = true,
        /// This node's id; empty (the default) means the hostname.
        node_id: String = String::new(),
        /// IP the gossip socket binds to. Default `0.0.0.0`.
        bind_addr: String = "0.0.0.0".to_owned(),
        /// Gossip port (UDP). 0 picks an ephemeral port. Default 7946.
        bind_port: u16 = DEFAULT_GOSSIP_PORT,
        /// IP peers reach us at; empty (the default) means the bind address, or the address of
        /// the default route when binding to `0.0.0.0`.
        advertise_addr: String = String::new(),
        /// Port peers reach us at; 0 (the default) means `bind_port`.
        advertise_port: u16 = 0,
        /// `list` (the default) or `dns`.
        #[serde(deserialize_with = "choice")]
        discovery_mode: DiscoveryMode = DiscoveryMode::List,
        /// `host:port` entries to join through (list mode). Default none.
        join_peers: Vec<String> = Vec::new(),
        /// The name to resolve (dns mode), e.g. a Kubernetes headless service.
        dns_service_name: String = String::new(),
        /// Take ports from SRV records (`_gossip._udp.<name>`) instead of `bind_port`.
        dns_srv: bool = false,
        /// An explicit nameserver `ip:port`; empty (the default) means the system's resolver.
        dns_nameserver: String = String::new(),
        /// How often discovery runs again, e.g. `"30s"` (the default) or `"1m 30s"`.
        #[serde(with = "humantime_serde")]
        discovery_interval: Duration = Duration::from_secs(30),
        /// Timing preset: `lan` (the default), `wan` or `local`.
        #[serde(deserialize_with = "choice")]
        timing: TimingPreset = TimingPreset::Lan,
        /// `host:port` peers forward gRPC calls to; empty (the default) means
        /// `advertise_addr:grpc_port`.
        grpc_advertise_addr: String = String::new(),
        /// The port of this server's gRPC API. Default 50051.
        grpc_port: u16 = 50051,
        /// Tasks this node runs at once. Default 16 ([`DEFAULT_MAX_CONCURRENCY`]).
        max_concurrency: u32 = DEFAULT_MAX_CONCURRENCY,
        /// Platform properties advertised to routers. Default none.
        tags: BTreeMap<String, String> = BTreeMap::new(),
        /// Routing strategy: `least-loaded` (the default), `power-of-two`, `round-robin`,
        /// `random`, `weighted` or `affinity`.
        #[serde(deserialize_with = "choice")]
        strategy: StrategyKind = StrategyKind::LeastLoaded,
        /// When every node is full: `wait` (hold the call until a slot frees anywhere, the
        /// default) or `run-locally` (queue it here, the seed server's rule).
        #[serde(deserialize_with = "choice")]
        when_full: WhenFullMode = WhenFullMode::Wait,
        /// PEM certificate chain of this node's gRPC server. With `tls_key_file` and
        /// `tls_ca_file` it turns TLS on; empty (the default) means plaintext.
        tls_cert_file: String = String::new(),
        /// PEM private key of `tls_cert_file`.
        tls_key_file: String = String::new(),
        /// PEM CA certificate(s) that peers' certificates must chain to.
        tls_ca_file: String = String::new(),
        /// Mutual TLS: the server requires client certificates from `tls_ca_file`, and the node
        /// presents its own certificate when it forwards. Needs the `tls_*_file` keys.
        tls_client_auth: bool = false,
        /// A name to verify peers' certificates for instead of the address they advertise (a
        /// DNS name or an IP address); empty means the address. Needs the `tls_*_file` keys.
        tls_domain: String = String::new(),
        /// A file of gossip keys (one per line, base64 or hex, the first is the primary):
        /// encrypts and authenticates all gossip. See [`mesh_core::keyring`].
        gossip_keys_file: String = String::new(),
        /// The name of an environment variable holding comma-separated gossip keys (for
        /// example one filled from a Kubernetes Secret). Not both this and `gossip_keys_file`.
        gossip_keys_env: String = String::new(),
        /// A label authenticated with every datagram: nodes with another label cannot talk even
        /// with the same key. Needs gossip keys.
        cluster_label: String = String::new(),
    }
}
