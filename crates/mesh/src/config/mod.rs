//! [`MeshConfig`]: the mesh section of a server's configuration, with the seed server's keys.
//!
//! Loaded from TOML or YAML (by file extension), either at the top level or under a `mesh`
//! section, then overridden by `MESH_*` environment variables, then validated. Every error names
//! the key (or variable), the offending value and the rule.
//!
//! Each key is written once, in the [`config_section!`](crate::config_section) list below: its
//! documentation, its type and its default. The struct, its `Default`, [`MeshConfig::KEYS`] and
//! the text setter behind the environment overlay ([`MeshConfig::set`]) all come from that list,
//! and the text of a value is read by its type ([`FromText`]): numbers, booleans,
//! comma-separated lists, `k=v` maps, durations (`humantime`, as in files), sizes, and the enums
//! by their serde names, so a variant is spelled in one place too.
//!
//! Other parts of a server declare their own sections the same way and read them from the same
//! file ([`Section`], [`from_file`]): `mesh-reapi`'s `[reapi]` is one. A file with a known
//! section name ([`SECTIONS`]) at its top level is read by section, and any other top-level
//! key is refused with the list of sections; a file without sections holds the mesh keys at its
//! top level (the seed server's flat files). Variables are `MESH_<KEY>` for `[mesh]` and
//! `MESH_<SECTION>_<KEY>` for the others.
//!
//! A configuration for a Kubernetes StatefulSet behind a headless service (every other key at
//! its default; the README lists the defaults):
//!
//! ```toml
//! [mesh]
//! discovery_mode = "dns"           # "list" (the default: join_peers) or "dns"
//! dns_service_name = "mesh.build.svc.cluster.local."
//! timing = "lan"                   # "lan", "wan" or "local"
//! max_concurrency = 16
//! tls_cert_file = "/tls/tls.crt"   # the three tls_*_file keys turn TLS on for the server and
//! tls_key_file = "/tls/tls.key"    # for forwarding (peers must advertise https://, and do)
//! tls_ca_file = "/tls/ca.crt"
//! gossip_keys_env = "MESH_GOSSIP_KEYS"  # encrypt gossip with the keys in this variable
//! cluster_label = "build"
//! ```
//!
//! TLS material is read and checked by [`MeshConfig::resolve`]: a file that cannot be read, a
//! key that does not belong to its certificate, or a missing companion key is reported under
//! its key name. See [`crate::tls`] for what TLS protects.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, ToSocketAddrs},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use mesh_core::{
    DEFAULT_GOSSIP_PORT, DEFAULT_MAX_CONCURRENCY, Keyring, MAX_CLUSTER_LABEL_LEN, NodeId, Tags,
    Timing,
};
#[cfg(feature = "dns")]
use mesh_discovery::Dns;
use mesh_discovery::Static;
#[cfg(feature = "tls")]
use mesh_route::ChannelConfig;
use mesh_route::{
    Affinity, LeastLoaded, PowerOfTwoChoices, Random, RoundRobin, Strategy, WeightedCapacity,
    WhenFull,
};
use serde::Deserialize;

mod section;
mod text;

pub use section::{SECTIONS, Section, apply_vars, from_file, from_toml_str, from_yaml_str};
use text::DURATION_RULE;
pub use text::{ByteSize, Choice, FromText, choice, size};

use crate::NodeBuilder;
#[cfg(feature = "tls")]
use crate::tls::{CaBundle, PeerTls, ServerTls, TlsError, TlsIdentity, TlsMaterial};

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

/// A configuration could not be loaded or is invalid.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML/YAML for this schema (the message names the key and line).
    #[error("parsing {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// The file's extension is neither TOML nor YAML.
    #[error("{path}: unknown configuration format; use a .toml, .yaml or .yml file")]
    UnknownFormat {
        /// The file.
        path: PathBuf,
    },
    /// A value breaks a rule.
    #[error("invalid {key} {value:?}: {rule}")]
    Invalid {
        /// The key (or environment variable) that holds it.
        key: String,
        /// The value.
        value: String,
        /// The rule.
        rule: String,
    },
}

fn invalid(key: &str, value: impl Into<String>, rule: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        value: mesh_core::abbreviate(&value.into()),
        rule: rule.into(),
    }
}

/// A configuration whose values have been checked and resolved (hostname, advertise address).
#[derive(Debug, Clone)]
pub struct ResolvedConfig {
    /// The node id.
    pub node_id: NodeId,
    /// Gossip bind address.
    pub gossip_bind: SocketAddr,
    /// Gossip advertise address.
    pub gossip_advertise: SocketAddr,
    /// The gRPC endpoint peers forward to (`https://` with TLS); `None` when `grpc_port` is 0
    /// (ephemeral) and no `grpc_advertise_addr` is set: the server fills it in once its port
    /// is known.
    pub grpc_endpoint: Option<String>,
    /// Where the gRPC server binds (`bind_addr:grpc_port`).
    pub grpc_bind: SocketAddr,
    /// The timing preset, with the discovery interval applied.
    pub timing: Timing,
    /// TLS for the gRPC server and the forwarding channels, if the `tls_*` keys are set.
    pub tls: Option<ResolvedTls>,
    /// The gossip keyring, if gossip is encrypted (its `Debug` shows fingerprints only).
    pub keyring: Option<Keyring>,
}

/// TLS read from the `tls_*` keys, for both sides of a node.
#[cfg(feature = "tls")]
#[derive(Debug, Clone)]
pub struct ResolvedTls {
    /// The gRPC server's TLS ([`ServerTls::server_config`] is what
    /// `tonic::transport::Server::tls_config` takes).
    pub server: ServerTls,
    /// How forwarding channels connect to peers ([`MeshConfig::node_builder`] applies it).
    pub peers: PeerTls,
}

/// TLS read from the `tls_*` keys: never made in a build without the `tls` feature, where
/// [`ResolvedConfig::tls`] is always `None` and a `tls_*` key is refused.
#[cfg(not(feature = "tls"))]
#[derive(Debug, Clone)]
pub struct ResolvedTls {
    _never: std::convert::Infallible,
}

impl MeshConfig {
    /// Reads a TOML (`.toml`) or YAML (`.yaml`, `.yml`) file. The mesh keys may be at the top
    /// level or under a `mesh` section, beside the other sections ([`SECTIONS`]).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        section::from_file(path)
    }

    /// Parses TOML text (top level or `[mesh]` section).
    pub fn from_toml_str(text: &str) -> Result<Self, String> {
        section::from_toml_str(text)
    }

    /// Parses YAML text (top level or `mesh:` section).
    pub fn from_yaml_str(text: &str) -> Result<Self, String> {
        section::from_yaml_str(text)
    }

    /// Overrides keys from `MESH_<KEY>` environment variables (`MESH_NODE_ID`,
    /// `MESH_BIND_PORT`, `MESH_JOIN_PEERS` comma-separated, `MESH_TAGS` as `k=v,k=v`, …).
    /// Variables of the other sections (`MESH_REAPI_*`) are theirs.
    pub fn apply_env(&mut self) -> Result<(), ConfigError> {
        self.apply_vars(std::env::vars())
    }

    /// [`MeshConfig::apply_env`] over an explicit list of variables (for tests).
    pub fn apply_vars(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        section::apply_vars(self, vars)
    }

    /// Checks every value and resolves the defaults that depend on the machine (hostname,
    /// advertise address). Errors name the key, the value and the rule.
    pub fn resolve(&self) -> Result<ResolvedConfig, ConfigError> {
        let node_id = if self.node_id.is_empty() {
            let hostname = hostname().ok_or_else(|| {
                invalid(
                    "node_id",
                    "",
                    "is empty and the hostname could not be read; set node_id",
                )
            })?;
            NodeId::new(&hostname).map_err(|e| {
                invalid(
                    "node_id",
                    hostname.clone(),
                    format!(
                        "defaults to the hostname, which is not a valid node id: {}",
                        e.reason()
                    ),
                )
            })?
        } else {
            NodeId::new(&self.node_id)
                .map_err(|e| invalid("node_id", self.node_id.clone(), e.to_string()))?
        };
        let bind_ip: IpAddr = self
            .bind_addr
            .parse()
            .map_err(|_| invalid("bind_addr", self.bind_addr.clone(), "must be an IP address"))?;
        let gossip_bind = SocketAddr::new(bind_ip, self.bind_port);
        let advertise_ip = if self.advertise_addr.is_empty() {
            if bind_ip.is_unspecified() {
                default_route_ip(bind_ip).ok_or_else(|| {
                    invalid(
                        "advertise_addr",
                        "",
                        "is empty and no routable address was found to advertise; set advertise_addr",
                    )
                })?
            } else {
                bind_ip
            }
        } else {
            self.advertise_addr.parse().map_err(|_| {
                invalid(
                    "advertise_addr",
                    self.advertise_addr.clone(),
                    "must be an IP address",
                )
            })?
        };
        if advertise_ip.is_unspecified() {
            return Err(invalid(
                "advertise_addr",
                advertise_ip.to_string(),
                "must be an address peers can reach, not an unspecified one",
            ));
        }
        let advertise_port = if self.advertise_port == 0 {
            self.bind_port
        } else {
            self.advertise_port
        };
        let gossip_advertise = SocketAddr::new(advertise_ip, advertise_port);
        let tls = self.tls()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let grpc_endpoint = if !self.grpc_advertise_addr.is_empty() {
            check_host_port("grpc_advertise_addr", &self.grpc_advertise_addr)?;
            Some(format!("{scheme}://{}", self.grpc_advertise_addr))
        } else if self.grpc_port != 0 {
            Some(format!(
                "{scheme}://{}",
                SocketAddr::new(advertise_ip, self.grpc_port)
            ))
        } else {
            None
        };
        let mut timing = self.timing.timing();
        if self.discovery_interval.is_zero() {
            return Err(invalid(
                "discovery_interval",
                humantime::format_duration(self.discovery_interval).to_string(),
                DURATION_RULE,
            ));
        }
        timing.discovery_interval = self.discovery_interval;
        match self.discovery_mode {
            DiscoveryMode::List => {
                for peer in &self.join_peers {
                    check_host_port("join_peers", peer)?;
                }
            }
            DiscoveryMode::Dns if !cfg!(feature = "dns") => return Err(without_dns()),
            DiscoveryMode::Dns => {
                if self.dns_service_name.trim().is_empty() {
                    return Err(invalid(
                        "dns_service_name",
                        "",
                        "is required when discovery_mode is \"dns\"",
                    ));
                }
            }
        }
        if !self.dns_nameserver.is_empty() {
            self.dns_nameserver.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "dns_nameserver",
                    self.dns_nameserver.clone(),
                    "must be an ip:port address",
                )
            })?;
        }
        let keyring = self.keyring()?;
        Ok(ResolvedConfig {
            node_id,
            gossip_bind,
            gossip_advertise,
            grpc_endpoint,
            grpc_bind: SocketAddr::new(bind_ip, self.grpc_port),
            timing,
            tls,
            keyring,
        })
    }

    /// The gossip keyring from `gossip_keys_file` or `gossip_keys_env`, and the label check.
    /// Errors name the key and the file or variable, never a key.
    fn keyring(&self) -> Result<Option<Keyring>, ConfigError> {
        let keyring = match (
            self.gossip_keys_file.is_empty(),
            self.gossip_keys_env.is_empty(),
        ) {
            (true, true) => None,
            (false, false) => {
                return Err(invalid(
                    "gossip_keys_env",
                    self.gossip_keys_env.clone(),
                    "cannot be set together with gossip_keys_file; keep one",
                ));
            }
            (false, true) => Some(Keyring::from_file(&self.gossip_keys_file).map_err(|e| {
                invalid(
                    "gossip_keys_file",
                    self.gossip_keys_file.clone(),
                    e.to_string(),
                )
            })?),
            (true, false) => Some(Keyring::from_env(&self.gossip_keys_env).map_err(|e| {
                invalid(
                    "gossip_keys_env",
                    self.gossip_keys_env.clone(),
                    e.to_string(),
                )
            })?),
        };
        if !self.cluster_label.is_empty() {
            if keyring.is_none() {
                return Err(invalid(
                    "cluster_label",
                    self.cluster_label.clone(),
                    "needs gossip keys (gossip_keys_file or gossip_keys_env): the label is authenticated by them",
                ));
            }
            if self.cluster_label.len() > MAX_CLUSTER_LABEL_LEN {
                return Err(invalid(
                    "cluster_label",
                    self.cluster_label.clone(),
                    format!("is longer than {MAX_CLUSTER_LABEL_LEN} bytes"),
                ));
            }
        }
        Ok(keyring)
    }

    /// Refuses the `tls_*` keys in a build without TLS.
    #[cfg(not(feature = "tls"))]
    fn tls(&self) -> Result<Option<ResolvedTls>, ConfigError> {
        let rule = "needs TLS, which this build of mesh leaves out (its `tls` feature)";
        for (key, value) in [
            ("tls_cert_file", self.tls_cert_file.trim()),
            ("tls_key_file", self.tls_key_file.trim()),
            ("tls_ca_file", self.tls_ca_file.trim()),
            ("tls_domain", self.tls_domain.trim()),
            (
                "tls_client_auth",
                if self.tls_client_auth { "true" } else { "" },
            ),
        ] {
            if !value.is_empty() {
                return Err(invalid(key, value, rule));
            }
        }
        Ok(None)
    }

    /// Reads and checks the TLS material named by the `tls_*` keys.
    #[cfg(feature = "tls")]
    fn tls(&self) -> Result<Option<ResolvedTls>, ConfigError> {
        let files = [
            ("tls_cert_file", &self.tls_cert_file),
            ("tls_key_file", &self.tls_key_file),
            ("tls_ca_file", &self.tls_ca_file),
        ];
        let domain = self.tls_domain.trim();
        if files.iter().all(|(_, path)| path.trim().is_empty()) {
            let needs_files = "needs tls_cert_file, tls_key_file and tls_ca_file";
            if self.tls_client_auth {
                return Err(invalid("tls_client_auth", "true", needs_files));
            }
            if !domain.is_empty() {
                return Err(invalid("tls_domain", domain, needs_files));
            }
            return Ok(None);
        }
        for (key, path) in files {
            if path.trim().is_empty() {
                return Err(invalid(
                    key,
                    "",
                    "is required when any of tls_cert_file, tls_key_file and tls_ca_file is set",
                ));
            }
        }
        let ca = CaBundle::from_file(self.tls_ca_file.trim()).map_err(|e| self.tls_error(e))?;
        let identity = TlsIdentity::from_files(self.tls_cert_file.trim(), self.tls_key_file.trim())
            .map_err(|e| self.tls_error(e))?;
        let mut server = ServerTls::new(identity.clone());
        let mut peers = PeerTls::new(ca.clone());
        if self.tls_client_auth {
            server = server.require_client_certificates(ca);
            peers = peers.identity(identity);
        }
        if !domain.is_empty() {
            peers = peers.domain(domain).map_err(|_| {
                invalid("tls_domain", domain, "must be a DNS name or an IP address")
            })?;
        }
        Ok(Some(ResolvedTls { server, peers }))
    }

    /// A TLS error under the key that names the file at fault.
    #[cfg(feature = "tls")]
    fn tls_error(&self, error: TlsError) -> ConfigError {
        let (what, rule) = match &error {
            TlsError::Read { what, source, .. } => {
                (Some(*what), format!("cannot be read: {source}"))
            }
            TlsError::Invalid { what, reason, .. } => (Some(*what), reason.clone()),
            other => (None, other.to_string()),
        };
        let (key, path) = match what {
            Some(TlsMaterial::CaCertificate) => ("tls_ca_file", &self.tls_ca_file),
            Some(TlsMaterial::PrivateKey) => ("tls_key_file", &self.tls_key_file),
            Some(TlsMaterial::Certificate) | None => ("tls_cert_file", &self.tls_cert_file),
        };
        invalid(key, path.trim(), rule)
    }

    /// A [`NodeBuilder`] for this configuration, with discovery, timing, strategy, the gossip
    /// and gRPC addresses and the forwarding channels' TLS filled in. Check
    /// [`MeshConfig::enabled`] first; serve with [`ResolvedConfig::tls`]'s server half.
    pub fn node_builder(&self) -> Result<(NodeBuilder, ResolvedConfig), ConfigError> {
        let resolved = self.resolve()?;
        let mut builder = crate::Node::builder()
            .node_id(resolved.node_id.as_str())
            .map_err(|e| invalid("node_id", resolved.node_id.to_string(), e.to_string()))?
            .gossip_bind(resolved.gossip_bind)
            .gossip_advertise(resolved.gossip_advertise)
            .timing(resolved.timing.clone())
            .max_concurrency(self.max_concurrency)
            .tags(Tags::from_iter(self.tags.clone()))
            .strategy_arc(self.strategy.strategy())
            .when_full(self.when_full.into());
        if let Some(endpoint) = &resolved.grpc_endpoint {
            builder = builder.grpc_endpoint(endpoint.clone());
        }
        #[cfg(feature = "tls")]
        if let Some(tls) = &resolved.tls {
            builder = builder.channel_config(ChannelConfig::default().tls(tls.peers.clone()));
        }
        if let Some(keyring) = &resolved.keyring {
            builder = builder
                .keyring(keyring.clone())
                .cluster_label(self.cluster_label.clone());
        }
        builder = match self.discovery_mode {
            DiscoveryMode::List => {
                let peers = Static::new(&self.join_peers)
                    .map_err(|e| invalid("join_peers", self.join_peers.join(","), e.to_string()))?;
                builder.discovery(peers)
            }
            #[cfg(not(feature = "dns"))]
            DiscoveryMode::Dns => return Err(without_dns()),
            #[cfg(feature = "dns")]
            DiscoveryMode::Dns => {
                let mut dns = Dns::builder(self.dns_service_name.trim())
                    .port(resolved.gossip_advertise.port());
                if self.dns_srv {
                    dns = dns.srv();
                }
                if let Ok(server) = self.dns_nameserver.parse::<SocketAddr>() {
                    dns = dns.nameserver(server);
                }
                let dns = dns.build().map_err(|e| {
                    invalid(
                        "dns_service_name",
                        self.dns_service_name.clone(),
                        e.to_string(),
                    )
                })?;
                builder.discovery(dns)
            }
        };
        Ok((builder, resolved))
    }
}

/// `discovery_mode = "dns"` in a build without the `dns` feature.
fn without_dns() -> ConfigError {
    invalid(
        "discovery_mode",
        "dns",
        "needs DNS discovery, which this build of mesh leaves out (its `dns` feature)",
    )
}

fn check_host_port(key: &str, value: &str) -> Result<(), ConfigError> {
    let rule = "must be host:port with a port number";
    let (host, port) = value
        .rsplit_once(':')
        .ok_or_else(|| invalid(key, value, rule))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(invalid(key, value, rule));
    }
    Ok(())
}

/// The machine's hostname: `$HOSTNAME` (set in every Kubernetes pod), else the kernel's.
fn hostname() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

/// The local address of the default route (a pod's IP), found by "connecting" a UDP socket,
/// which sends nothing.
fn default_route_ip(bind: IpAddr) -> Option<IpAddr> {
    let (local, probe) = if bind.is_ipv6() {
        ("[::]:0", "[2001:db8::1]:9")
    } else {
        ("0.0.0.0:0", "192.0.2.1:9")
    };
    let socket = std::net::UdpSocket::bind(local).ok()?;
    let target = probe.to_socket_addrs().ok()?.next()?;
    socket.connect(target).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::text::one_of;

    #[test]
    fn durations_read_as_in_files() {
        let read = |text: &str| Duration::from_text(text);
        assert_eq!(read("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(read(" 30s "), Ok(Duration::from_secs(30)));
        assert_eq!(read("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(read("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(read("1m 30s"), Ok(Duration::from_secs(90)));
        for bad in ["", "-1s", "10 parsecs", "s", "1e400s", "NaNs", "30"] {
            assert_eq!(read(bad), Err(DURATION_RULE.to_owned()), "{bad:?}");
        }
        // Zero reads, and is refused by `resolve` under its key.
        let mut config = MeshConfig {
            node_id: "n".to_owned(),
            bind_addr: "127.0.0.1".to_owned(),
            ..MeshConfig::default()
        };
        config.set("discovery_interval", "0s").unwrap();
        let error = config.resolve().unwrap_err().to_string();
        assert_eq!(
            error,
            format!("invalid discovery_interval \"0s\": {DURATION_RULE}")
        );
    }

    #[test]
    fn choices_are_read_by_their_serde_names() {
        assert_eq!(TimingPreset::from_text(" wan"), Ok(TimingPreset::Wan));
        assert_eq!(
            StrategyKind::from_text("power-of-two"),
            Ok(StrategyKind::PowerOfTwo)
        );
        assert_eq!(
            WhenFullMode::from_text("run-locally"),
            Ok(WhenFullMode::RunLocally)
        );
        assert_eq!(DiscoveryMode::from_text("dns"), Ok(DiscoveryMode::Dns));
        assert_eq!(
            TimingPreset::from_text("Lan"),
            Err("must be \"lan\", \"wan\" or \"local\"".to_owned())
        );
        assert_eq!(
            StrategyKind::from_text("weighted").map(|k| k.strategy().name()),
            Ok("weighted-capacity")
        );
        assert_eq!(WhenFull::from(WhenFullMode::default()), WhenFull::Wait);
        assert_eq!(TimingPreset::Local.timing(), Timing::local());
    }

    #[test]
    fn lists_maps_and_numbers_from_text() {
        assert_eq!(
            Vec::<String>::from_text(" a:1, ,b:2,"),
            Ok(vec!["a:1".to_owned(), "b:2".to_owned()])
        );
        let tags = BTreeMap::<String, String>::from_text("os = linux,pool=gpu").unwrap();
        assert_eq!(tags.get("os").map(String::as_str), Some("linux"));
        assert_eq!(tags.len(), 2);
        assert_eq!(
            u16::from_text("70000"),
            Err("must be a port number (0-65535)".to_owned())
        );
        assert_eq!(u32::from_text(" 16 "), Ok(16));
        assert_eq!(
            bool::from_text("yes"),
            Err("must be true or false".to_owned())
        );
    }

    #[test]
    fn every_key_can_be_set_from_text() {
        let mut config = MeshConfig::default();
        for key in MeshConfig::KEYS {
            // Text every type accepts except the enums, which get their first name.
            let text = match *key {
                "discovery_mode" => "dns",
                "timing" => "local",
                "strategy" => "random",
                "when_full" => "run-locally",
                "enabled" | "dns_srv" | "tls_client_auth" => "true",
                "discovery_interval" => "1s",
                "tags" => "k=v",
                _ if matches!(
                    *key,
                    "bind_port" | "advertise_port" | "grpc_port" | "max_concurrency"
                ) =>
                {
                    "1"
                }
                _ => "x",
            };
            config
                .set(key, text)
                .unwrap_or_else(|rule| panic!("{key}: {rule}"));
        }
        assert_eq!(
            config.set("nope", "1"),
            Err("is not a key of the [mesh] section".to_owned())
        );
        assert_eq!(MeshConfig::KEYS.first(), Some(&"enabled"));
    }

    #[test]
    fn short_lists_are_spelled_out_and_long_ones_listed() {
        assert_eq!(one_of(&["a", "b"]), "\"a\" or \"b\"");
        assert_eq!(one_of(&["a", "b", "c"]), "\"a\", \"b\" or \"c\"");
        assert_eq!(one_of(&["a", "b", "c", "d"]), "one of a, b, c, d");
    }
}
