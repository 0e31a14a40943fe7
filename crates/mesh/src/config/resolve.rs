//! From the keys to a node: every value checked, the machine-dependent defaults resolved
//! (hostname, advertise address), and a [`NodeBuilder`](crate::NodeBuilder) filled in.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use mesh_core::{Keyring, NodeId, Tags, Timing};
#[cfg(feature = "dns")]
use mesh_discovery::Dns;
use mesh_discovery::Static;
#[cfg(feature = "tls")]
use mesh_route::ChannelConfig;

use super::{ConfigError, DiscoveryMode, MeshConfig, invalid, text::DURATION_RULE};
use crate::NodeBuilder;
#[cfg(feature = "tls")]
use crate::tls::{PeerTls, ServerTls};

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
