//! [`MeshConfig`]: the mesh section of a server's configuration, with the seed server's keys.
//!
//! Loaded from TOML or YAML (by file extension), either at the top level or under a `mesh`
//! section, then overridden by `MESH_*` environment variables, then validated. Every error names
//! the key (or variable), the offending value and the rule.
//!
//! ```toml
//! [mesh]
//! enabled = true
//! node_id = "build-0"              # default: the hostname (the pod name on Kubernetes)
//! bind_addr = "0.0.0.0"
//! bind_port = 7946
//! advertise_addr = ""              # default: the address of the default route (the pod IP)
//! discovery_mode = "dns"           # "list" or "dns"
//! join_peers = []                  # list mode: "host:port" entries
//! dns_service_name = "mesh.build.svc.cluster.local"
//! dns_srv = false                  # ports from SRV records (_gossip._udp.<name>) instead of bind_port
//! discovery_interval = "30s"
//! timing = "lan"                   # "lan", "wan" or "local"
//! grpc_advertise_addr = ""         # host:port peers forward calls to; default advertise_addr:grpc_port
//! grpc_port = 50051
//! max_concurrency = 16
//! tls_cert_file = ""               # PEM certificate (chain) of the gRPC server; setting the three
//! tls_key_file = ""                # tls_*_file keys turns TLS on for the server and for
//! tls_ca_file = ""                 # forwarding (peers must advertise https://, and do)
//! tls_client_auth = false          # mutual TLS: require client certificates from tls_ca_file,
//!                                  # and present this node's own certificate to peers
//! tls_domain = ""                  # verify peers' certificates for this name instead of their address
//! gossip_keys_file = ""            # encrypt gossip: one 32-byte key per line (base64 or hex), first is primary
//! gossip_keys_env = ""             # or: the name of a variable holding comma-separated keys
//! cluster_label = ""               # authenticated with the keys: clusters with other labels cannot talk
//! ```
//!
//! TLS material is read and checked by [`MeshConfig::resolve`]: a file that cannot be read, a
//! key that does not belong to its certificate, or a missing companion key is reported under
//! its key name. See [`crate::tls`] for what TLS protects.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, ToSocketAddrs},
    path::{Path, PathBuf},
    time::Duration,
};

use mesh_core::{DEFAULT_GOSSIP_PORT, Keyring, MAX_CLUSTER_LABEL_LEN, NodeId, Tags, Timing};
use mesh_discovery::{Dns, Static};
use mesh_route::{
    Affinity, ChannelConfig, LeastLoaded, PowerOfTwoChoices, Random, RoundRobin, WeightedCapacity,
    WhenFull,
};
use serde::Deserialize;

use crate::{
    NodeBuilder,
    tls::{CaBundle, PeerTls, ServerTls, TlsError, TlsIdentity, TlsMaterial},
};

/// How a node finds its peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DiscoveryMode {
    /// A static `join_peers` list.
    #[default]
    List,
    /// The A/AAAA (or SRV) records of `dns_service_name`.
    Dns,
}

/// The mesh configuration, with the seed server's keys. Every field has a default, so an empty
/// file is a valid (single-node, list-mode) configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct MeshConfig {
    /// Whether the server should join a mesh at all.
    pub enabled: bool,
    /// This node's id; empty means the hostname.
    pub node_id: String,
    /// IP the gossip socket binds to.
    pub bind_addr: String,
    /// Gossip port (UDP). 0 picks an ephemeral port.
    pub bind_port: u16,
    /// IP peers reach us at; empty means the bind address, or the address of the default route
    /// when binding to `0.0.0.0`.
    pub advertise_addr: String,
    /// Port peers reach us at; 0 means `bind_port`.
    pub advertise_port: u16,
    /// `list` or `dns`.
    pub discovery_mode: DiscoveryMode,
    /// `host:port` entries to join through (list mode).
    pub join_peers: Vec<String>,
    /// The name to resolve (dns mode), e.g. a Kubernetes headless service.
    pub dns_service_name: String,
    /// Take ports from SRV records (`_gossip._udp.<name>`) instead of `bind_port`.
    pub dns_srv: bool,
    /// An explicit nameserver `ip:port` (default: the system's resolver).
    pub dns_nameserver: String,
    /// How often discovery runs again, e.g. `"30s"`.
    pub discovery_interval: String,
    /// Timing preset: `lan`, `wan` or `local`.
    pub timing: String,
    /// `host:port` peers forward gRPC calls to; empty means `advertise_addr:grpc_port`.
    pub grpc_advertise_addr: String,
    /// The port of this server's gRPC API.
    pub grpc_port: u16,
    /// Tasks this node runs at once.
    pub max_concurrency: u32,
    /// Platform properties advertised to routers.
    pub tags: BTreeMap<String, String>,
    /// Routing strategy: `least-loaded`, `power-of-two`, `round-robin`, `random`, `weighted`
    /// or `affinity`.
    pub strategy: String,
    /// When every node is full: `wait` (hold the call until a slot frees anywhere, the
    /// default) or `run-locally` (queue it here, the seed server's rule).
    pub when_full: String,
    /// PEM certificate chain of this node's gRPC server. With `tls_key_file` and `tls_ca_file`
    /// it turns TLS on; empty (the default) means plaintext.
    pub tls_cert_file: String,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: String,
    /// PEM CA certificate(s) that peers' certificates must chain to.
    pub tls_ca_file: String,
    /// Mutual TLS: the server requires client certificates from `tls_ca_file`, and the node
    /// presents its own certificate when it forwards. Needs the `tls_*_file` keys.
    pub tls_client_auth: bool,
    /// A name to verify peers' certificates for instead of the address they advertise (a DNS
    /// name or an IP address); empty means the address. Needs the `tls_*_file` keys.
    pub tls_domain: String,
    /// A file of gossip keys (one per line, base64 or hex, the first is the primary): encrypts
    /// and authenticates all gossip. See [`mesh_core::keyring`].
    pub gossip_keys_file: String,
    /// The name of an environment variable holding comma-separated gossip keys (for example
    /// one filled from a Kubernetes Secret). Not both this and `gossip_keys_file`.
    pub gossip_keys_env: String,
    /// A label authenticated with every datagram: nodes with another label cannot talk even
    /// with the same key. Needs gossip keys.
    pub cluster_label: String,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            node_id: String::new(),
            bind_addr: "0.0.0.0".to_owned(),
            bind_port: DEFAULT_GOSSIP_PORT,
            advertise_addr: String::new(),
            advertise_port: 0,
            discovery_mode: DiscoveryMode::List,
            join_peers: Vec::new(),
            dns_service_name: String::new(),
            dns_srv: false,
            dns_nameserver: String::new(),
            discovery_interval: "30s".to_owned(),
            timing: "lan".to_owned(),
            grpc_advertise_addr: String::new(),
            grpc_port: 50051,
            max_concurrency: 0,
            tags: BTreeMap::new(),
            strategy: "least-loaded".to_owned(),
            when_full: "wait".to_owned(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            tls_ca_file: String::new(),
            tls_client_auth: false,
            tls_domain: String::new(),
            gossip_keys_file: String::new(),
            gossip_keys_env: String::new(),
            cluster_label: String::new(),
        }
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
#[derive(Debug, Clone)]
pub struct ResolvedTls {
    /// The gRPC server's TLS ([`ServerTls::server_config`] is what
    /// `tonic::transport::Server::tls_config` takes).
    pub server: ServerTls,
    /// How forwarding channels connect to peers ([`MeshConfig::node_builder`] applies it).
    pub peers: PeerTls,
}

impl MeshConfig {
    /// Reads a TOML (`.toml`) or YAML (`.yaml`, `.yml`) file. The mesh keys may be at the top
    /// level or under a `mesh` section.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let parse_error = |message: String| ConfigError::Parse {
            path: path.to_owned(),
            message,
        };
        match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => Self::from_toml_str(&text).map_err(parse_error),
            Some("yaml" | "yml") => Self::from_yaml_str(&text).map_err(parse_error),
            _ => Err(ConfigError::UnknownFormat {
                path: path.to_owned(),
            }),
        }
    }

    /// Parses TOML text (top level or `[mesh]` section).
    pub fn from_toml_str(text: &str) -> Result<Self, String> {
        let value: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        let section = match value.get("mesh") {
            Some(toml::Value::Table(section)) if value.len() == 1 => section.clone(),
            _ => value,
        };
        section
            .try_into()
            .map_err(|e: toml::de::Error| e.to_string())
    }

    /// Parses YAML text (top level or `mesh:` section).
    pub fn from_yaml_str(text: &str) -> Result<Self, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Sectioned {
            mesh: MeshConfig,
        }
        // Look at the shape first, then parse the text itself again so errors keep their
        // key path and line.
        let value: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        match &value {
            serde_yaml_ng::Value::Null => Ok(Self::default()),
            serde_yaml_ng::Value::Mapping(map) if map.len() == 1 && map.contains_key("mesh") => {
                serde_yaml_ng::from_str::<Sectioned>(text)
                    .map(|s| s.mesh)
                    .map_err(|e| e.to_string())
            }
            _ => serde_yaml_ng::from_str(text).map_err(|e| e.to_string()),
        }
    }

    /// Overrides keys from `MESH_<KEY>` environment variables (`MESH_NODE_ID`,
    /// `MESH_BIND_PORT`, `MESH_JOIN_PEERS` comma-separated, `MESH_TAGS` as `k=v,k=v`, …).
    pub fn apply_env(&mut self) -> Result<(), ConfigError> {
        self.apply_vars(std::env::vars())
    }

    /// [`MeshConfig::apply_env`] over an explicit list of variables (for tests).
    pub fn apply_vars(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        for (name, value) in vars {
            let Some(key) = name.strip_prefix("MESH_") else {
                continue;
            };
            let key = key.to_ascii_lowercase();
            self.set(&key, &value)
                .map_err(|rule| invalid(&name, value.clone(), rule))?;
        }
        Ok(())
    }

    /// Sets one key from text, as an environment variable or a command-line flag would.
    /// Unknown keys are an error too, so a misspelled variable does not pass silently.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        fn parse<T: std::str::FromStr>(value: &str, what: &str) -> Result<T, String> {
            value.trim().parse().map_err(|_| format!("must be {what}"))
        }
        fn list(value: &str) -> Vec<String> {
            value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        }
        match key {
            "enabled" => self.enabled = parse(value, "true or false")?,
            "node_id" => self.node_id = value.to_owned(),
            "bind_addr" => self.bind_addr = value.to_owned(),
            "bind_port" => self.bind_port = parse(value, "a port number (0-65535)")?,
            "advertise_addr" => self.advertise_addr = value.to_owned(),
            "advertise_port" => self.advertise_port = parse(value, "a port number (0-65535)")?,
            "discovery_mode" => {
                self.discovery_mode = match value.trim() {
                    "list" => DiscoveryMode::List,
                    "dns" => DiscoveryMode::Dns,
                    _ => return Err("must be \"list\" or \"dns\"".to_owned()),
                }
            }
            "join_peers" => self.join_peers = list(value),
            "dns_service_name" => self.dns_service_name = value.to_owned(),
            "dns_srv" => self.dns_srv = parse(value, "true or false")?,
            "dns_nameserver" => self.dns_nameserver = value.to_owned(),
            "discovery_interval" => self.discovery_interval = value.to_owned(),
            "timing" => self.timing = value.to_owned(),
            "grpc_advertise_addr" => self.grpc_advertise_addr = value.to_owned(),
            "grpc_port" => self.grpc_port = parse(value, "a port number (0-65535)")?,
            "max_concurrency" => self.max_concurrency = parse(value, "a whole number")?,
            "tags" => {
                self.tags = list(value)
                    .into_iter()
                    .map(|pair| {
                        pair.split_once('=')
                            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                            .ok_or_else(|| format!("tag {pair:?} must be key=value"))
                    })
                    .collect::<Result<_, _>>()?;
            }
            "strategy" => self.strategy = value.to_owned(),
            "when_full" => self.when_full = value.to_owned(),
            "tls_cert_file" => self.tls_cert_file = value.to_owned(),
            "tls_key_file" => self.tls_key_file = value.to_owned(),
            "tls_ca_file" => self.tls_ca_file = value.to_owned(),
            "tls_client_auth" => self.tls_client_auth = parse(value, "true or false")?,
            "tls_domain" => self.tls_domain = value.to_owned(),
            "gossip_keys_file" => self.gossip_keys_file = value.to_owned(),
            "gossip_keys_env" => self.gossip_keys_env = value.to_owned(),
            "cluster_label" => self.cluster_label = value.to_owned(),
            _ => return Err("is not a mesh configuration key".to_owned()),
        }
        Ok(())
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
        let mut timing = match self.timing.as_str() {
            "lan" => Timing::lan(),
            "wan" => Timing::wan(),
            "local" => Timing::local(),
            other => {
                return Err(invalid(
                    "timing",
                    other,
                    "must be \"lan\", \"wan\" or \"local\"",
                ));
            }
        };
        timing.discovery_interval = parse_duration(&self.discovery_interval).ok_or_else(|| {
            invalid(
                "discovery_interval",
                self.discovery_interval.clone(),
                "must be a positive duration such as \"500ms\", \"30s\", \"5m\" or \"1h\"",
            )
        })?;
        match self.discovery_mode {
            DiscoveryMode::List => {
                for peer in &self.join_peers {
                    check_host_port("join_peers", peer)?;
                }
            }
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
        self.strategy_builder()?;
        self.when_full()?;
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

    /// Reads and checks the TLS material named by the `tls_*` keys.
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

    fn when_full(&self) -> Result<WhenFull, ConfigError> {
        match self.when_full.as_str() {
            "run-locally" => Ok(WhenFull::RunLocally),
            "wait" => Ok(WhenFull::Wait),
            other => Err(invalid(
                "when_full",
                other,
                "must be \"run-locally\" or \"wait\"",
            )),
        }
    }

    fn strategy_builder(&self) -> Result<fn(NodeBuilder) -> NodeBuilder, ConfigError> {
        Ok(match self.strategy.as_str() {
            "least-loaded" => |b: NodeBuilder| b.strategy(LeastLoaded::new()),
            "power-of-two" => |b: NodeBuilder| b.strategy(PowerOfTwoChoices::new()),
            "round-robin" => |b: NodeBuilder| b.strategy(RoundRobin::new()),
            "random" => |b: NodeBuilder| b.strategy(Random::new()),
            "weighted" => |b: NodeBuilder| b.strategy(WeightedCapacity::new()),
            "affinity" => |b: NodeBuilder| b.strategy(Affinity::new()),
            other => {
                return Err(invalid(
                    "strategy",
                    other,
                    "must be one of least-loaded, power-of-two, round-robin, random, weighted, affinity",
                ));
            }
        })
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
            .when_full(self.when_full()?);
        if let Some(endpoint) = &resolved.grpc_endpoint {
            builder = builder.grpc_endpoint(endpoint.clone());
        }
        if let Some(tls) = &resolved.tls {
            builder = builder.channel_config(ChannelConfig::default().tls(tls.peers.clone()));
        }
        if let Some(keyring) = &resolved.keyring {
            builder = builder
                .keyring(keyring.clone())
                .cluster_label(self.cluster_label.clone());
        }
        builder = (self.strategy_builder()?)(builder);
        builder = match self.discovery_mode {
            DiscoveryMode::List => {
                let peers = Static::new(&self.join_peers)
                    .map_err(|e| invalid("join_peers", self.join_peers.join(","), e.to_string()))?;
                builder.discovery(peers)
            }
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

/// `"500ms"`, `"30s"`, `"5m"`, `"1h"` (a bare number is seconds). Zero is refused.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let seconds = match unit.trim() {
        "ms" => number / 1000.0,
        "" | "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return None,
    };
    (seconds.is_finite() && seconds > 0.0 && seconds < 1e9)
        .then(|| Duration::from_secs_f64(seconds))
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

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        for bad in ["", "0s", "-1s", "10 parsecs", "s", "1e400s", "NaNs"] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }
}
