use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    str::FromStr,
    time::Duration,
};

use hickory_resolver::{
    TokioResolver,
    config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig},
    lookup::Lookup,
    net::{DnsError, NetError, NoRecords, runtime::TokioRuntimeProvider},
    proto::{
        op::ResponseCode,
        rr::{Name, RData, RecordType},
    },
};

use crate::{Discover, DiscoveryError};

/// Peers from DNS: the A/AAAA records of a name (a Kubernetes headless service), with a fixed
/// port or with ports from SRV records.
///
/// Built with [`Dns::builder`]. Every [`discover`](Discover::discover) asks the nameserver
/// again: the resolver's cache is disabled, so a pod that became ready since the last refresh is
/// seen at once. The answer is sorted and free of duplicates, so two refreshes of an unchanged
/// service compare equal.
///
/// A and AAAA are asked in parallel. A name with records of only one family is normal; if one
/// family answers and the other fails for another reason (a timeout), the answer that arrived
/// is used and the failure is logged.
///
/// ```no_run
/// # async fn run() -> Result<(), mesh_discovery::DiscoveryError> {
/// use mesh_discovery::{Discover, Dns};
///
/// // Headless service, gossip port fixed by configuration.
/// let by_port = Dns::builder("mesh.default.svc.cluster.local.").port(7946).build()?;
/// // Ports from `_gossip._udp.mesh.default.svc.cluster.local.` SRV records.
/// let by_srv = Dns::builder("mesh.default.svc.cluster.local.").srv().build()?;
/// let peers = by_srv.discover().await?;
/// # let _ = (by_port, peers);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Dns {
    resolver: TokioResolver,
    name: String,
    query: Name,
    ports: Ports,
    server: Option<SocketAddr>,
    query_timeout: Duration,
}

#[derive(Clone, Debug)]
enum Ports {
    Fixed(u16),
    Srv { name: String, query: Name },
}

/// [`Ports`] before validation: the SRV name may still be the default.
#[derive(Clone, Debug)]
enum PortsConfig {
    Fixed(u16),
    Srv { name: Option<String> },
}

/// Configures a [`Dns`] discovery source. Created by [`Dns::builder`].
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct DnsBuilder {
    name: String,
    ports: PortsConfig,
    nameserver: Option<SocketAddr>,
    query_timeout: Duration,
    retries: usize,
}

impl Dns {
    /// The gossip port used with A/AAAA records unless [`DnsBuilder::port`] says otherwise
    /// (memberlist's and serf's default).
    pub const DEFAULT_PORT: u16 = 7946;
    /// How long one DNS query may take, unless [`DnsBuilder::query_timeout`] says otherwise.
    pub const DEFAULT_QUERY_TIMEOUT: Duration = Duration::from_secs(2);
    /// How often a query that timed out or failed to send is repeated, unless
    /// [`DnsBuilder::retries`] says otherwise.
    pub const DEFAULT_RETRIES: usize = 2;

    /// Starts configuring discovery of `name`, such as `mesh.default.svc.cluster.local.`.
    ///
    /// A name without a trailing dot goes through the resolver's search list (with the system
    /// configuration); in a Kubernetes pod, whose `resolv.conf` says `ndots:5`, that costs a few
    /// NXDOMAIN round trips per refresh. Write the full name with a trailing dot to avoid them.
    pub fn builder(name: impl Into<String>) -> DnsBuilder {
        DnsBuilder {
            name: name.into(),
            ports: PortsConfig::Fixed(Self::DEFAULT_PORT),
            nameserver: None,
            query_timeout: Self::DEFAULT_QUERY_TIMEOUT,
            retries: Self::DEFAULT_RETRIES,
        }
    }

    /// The configured name: the one whose A/AAAA records are used, or in SRV mode the service
    /// the SRV records belong to.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The SRV name asked, when ports come from SRV records.
    pub fn srv_name(&self) -> Option<&str> {
        match &self.ports {
            Ports::Fixed(_) => None,
            Ports::Srv { name, .. } => Some(name),
        }
    }

    /// The explicitly configured nameserver; `None` means the system configuration.
    pub fn nameserver(&self) -> Option<SocketAddr> {
        self.server
    }
}

impl DnsBuilder {
    /// Uses A/AAAA records of the name with this port (default [`Dns::DEFAULT_PORT`]).
    /// Turns SRV mode off.
    pub fn port(mut self, port: u16) -> Self {
        self.ports = PortsConfig::Fixed(port);
        self
    }

    /// Takes ports (and targets) from the SRV records of `_gossip._udp.<name>`, the name
    /// Kubernetes publishes for a headless-service port named `gossip` with protocol UDP.
    pub fn srv(mut self) -> Self {
        self.ports = PortsConfig::Srv { name: None };
        self
    }

    /// Takes ports (and targets) from the SRV records of `srv_name`, such as
    /// `_serf._udp.mesh.default.svc.cluster.local.`.
    pub fn srv_name(mut self, srv_name: impl Into<String>) -> Self {
        self.ports = PortsConfig::Srv {
            name: Some(srv_name.into()),
        };
        self
    }

    /// Asks this nameserver (UDP, falling back to TCP on the same port for answers too large
    /// for a datagram) instead of the system configuration. For tests and for clusters whose
    /// service discovery has its own DNS server.
    pub fn nameserver(mut self, server: SocketAddr) -> Self {
        self.nameserver = Some(server);
        self
    }

    /// How long one DNS query may take (default [`Dns::DEFAULT_QUERY_TIMEOUT`]). A `discover`
    /// call can take up to `(retries + 1) × query_timeout` per lookup step (A and AAAA run in
    /// parallel; SRV targets without glue records add one step).
    pub fn query_timeout(mut self, timeout: Duration) -> Self {
        self.query_timeout = timeout;
        self
    }

    /// How often a query that timed out or could not be sent is repeated (default
    /// [`Dns::DEFAULT_RETRIES`]). Negative answers (no such name) are never repeated.
    pub fn retries(mut self, retries: usize) -> Self {
        self.retries = retries;
        self
    }

    /// Validates the configuration and creates the resolver.
    ///
    /// Fails with [`DiscoveryError::InvalidConfig`] for an empty name, an IP address given as
    /// the name, a name that is not a valid DNS name, port 0, or a zero query timeout; and with
    /// [`DiscoveryError::SystemConfig`] when no nameserver was given and the system
    /// configuration cannot be read.
    pub fn build(self) -> Result<Dns, DiscoveryError> {
        let query = parse_name(&self.name)?;
        let ports = match self.ports {
            PortsConfig::Fixed(0) => return Err(invalid(&self.name, "port must not be 0", None)),
            PortsConfig::Fixed(port) => Ports::Fixed(port),
            PortsConfig::Srv { name } => {
                let name = name.unwrap_or_else(|| format!("_gossip._udp.{}", self.name));
                let query = parse_name(&name)?;
                Ports::Srv { name, query }
            }
        };
        if self.query_timeout.is_zero() {
            return Err(invalid(&self.name, "query timeout must not be zero", None));
        }

        let mut builder = match self.nameserver {
            Some(server) => {
                let connection = |mut config: ConnectionConfig| {
                    config.port = server.port();
                    config
                };
                let nameserver = NameServerConfig::new(
                    server.ip(),
                    true,
                    vec![
                        connection(ConnectionConfig::udp()),
                        connection(ConnectionConfig::tcp()),
                    ],
                );
                let mut builder = TokioResolver::builder_with_config(
                    ResolverConfig::from_name_servers(vec![nameserver]),
                    TokioRuntimeProvider::default(),
                );
                // The explicit server is the whole truth; /etc/hosts is not consulted.
                builder.options_mut().use_hosts_file = ResolveHosts::Never;
                builder
            }
            None => TokioResolver::builder_tokio().map_err(|e| DiscoveryError::SystemConfig {
                name: self.name.clone(),
                source: Box::new(e),
            })?,
        };

        let options = builder.options_mut();
        options.timeout = self.query_timeout;
        options.attempts = self.retries;
        // The mesh re-resolves to find pods that appeared since the last refresh; a cached
        // answer (positive or NXDOMAIN) would hide them for up to the record's TTL.
        options.cache_size = 0;
        options.positive_max_ttl = Some(Duration::ZERO);
        options.negative_max_ttl = Some(Duration::ZERO);

        let resolver = builder.build().map_err(|e| {
            invalid(
                &self.name,
                "the resolver could not be created",
                Some(Box::new(e)),
            )
        })?;
        Ok(Dns {
            resolver,
            name: self.name,
            query,
            ports,
            server: self.nameserver,
            query_timeout: self.query_timeout,
        })
    }
}

impl Discover for Dns {
    async fn discover(&self) -> Result<Vec<SocketAddr>, DiscoveryError> {
        let addrs: BTreeSet<SocketAddr> = match &self.ports {
            Ports::Fixed(port) => self
                .lookup_ips(&self.query, &self.name)
                .await?
                .into_iter()
                .map(|ip| SocketAddr::new(ip, *port))
                .collect(),
            Ports::Srv { name, query } => self.lookup_srv(query, name).await?,
        };
        tracing::debug!(name = %self.name, count = addrs.len(), "dns discovery answered");
        Ok(addrs.into_iter().collect())
    }
}

impl Dns {
    /// A and AAAA records of `query`, asked in parallel.
    async fn lookup_ips(&self, query: &Name, name: &str) -> Result<Vec<IpAddr>, DiscoveryError> {
        let (v4, v6) = futures::future::join(
            self.resolver.lookup(query.clone(), RecordType::A),
            self.resolver.lookup(query.clone(), RecordType::AAAA),
        )
        .await;

        let (ips, failure) = match (v4, v6) {
            (Ok(v4), Ok(v6)) => (ips_of(&v4).chain(ips_of(&v6)).collect::<Vec<_>>(), None),
            (Ok(found), Err(e)) | (Err(e), Ok(found)) => (ips_of(&found).collect(), Some(e)),
            (Err(e4), Err(e6)) => {
                // Report the failure that says the most: a timeout on one family matters more
                // than "no records" on the other.
                let e = if e4.is_no_records_found() { e6 } else { e4 };
                return Err(self.error(e, name, "A/AAAA"));
            }
        };
        match failure {
            Some(e) if !e.is_no_records_found() => {
                let error = self.error(e, name, "A/AAAA");
                tracing::warn!(%error, "one address family failed; using the other");
            }
            _ => {}
        }
        if ips.is_empty() {
            return Err(DiscoveryError::NoRecords {
                name: name.to_owned(),
                record_types: "A/AAAA",
                server: self.server,
                name_exists: true,
            });
        }
        Ok(ips)
    }

    /// SRV records of `query`; each target's addresses come from the additional section when
    /// the server sent them (Kubernetes does), otherwise from an A/AAAA lookup of the target.
    async fn lookup_srv(
        &self,
        query: &Name,
        name: &str,
    ) -> Result<BTreeSet<SocketAddr>, DiscoveryError> {
        let lookup = self
            .resolver
            .lookup(query.clone(), RecordType::SRV)
            .await
            .map_err(|e| self.error(e, name, "SRV"))?;

        // RFC 2782: a target of "." means the service is decidedly not available there.
        let targets: Vec<(Name, u16)> = lookup
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                RData::SRV(srv) if !srv.target.is_root() && srv.port != 0 => {
                    Some((srv.target.clone(), srv.port))
                }
                _ => None,
            })
            .collect();
        if targets.is_empty() {
            return Err(DiscoveryError::NoRecords {
                name: name.to_owned(),
                record_types: "SRV",
                server: self.server,
                name_exists: true,
            });
        }

        let lookup = &lookup;
        let resolved = futures::future::join_all(targets.iter().map(|(target, _)| async move {
            let glue: Vec<IpAddr> = lookup
                .additionals()
                .iter()
                .filter(|record| record.name == *target)
                .filter_map(|record| ip_of(&record.data))
                .collect();
            if glue.is_empty() {
                self.lookup_ips(target, &target.to_string()).await
            } else {
                Ok(glue)
            }
        }))
        .await;

        let mut addrs = BTreeSet::new();
        let mut failures = Vec::new();
        for ((target, port), result) in targets.iter().zip(resolved) {
            match result {
                Ok(ips) => addrs.extend(ips.into_iter().map(|ip| SocketAddr::new(ip, *port))),
                Err(error) => {
                    tracing::warn!(%error, srv = name, "srv target did not resolve");
                    failures.push((target.to_string(), error));
                }
            }
        }
        if addrs.is_empty() {
            let names = failures.iter().map(|(name, _)| name.clone()).collect();
            let (_, first) = failures.swap_remove(0);
            return Err(DiscoveryError::NothingResolved {
                names,
                server: self.server,
                source: Box::new(first),
            });
        }
        Ok(addrs)
    }

    fn error(&self, error: NetError, name: &str, record_types: &'static str) -> DiscoveryError {
        let name = name.to_owned();
        let server = self.server;
        match error {
            NetError::Dns(DnsError::NoRecordsFound(NoRecords { response_code, .. })) => {
                DiscoveryError::NoRecords {
                    name,
                    record_types,
                    server,
                    name_exists: response_code != ResponseCode::NXDomain,
                }
            }
            NetError::Timeout => DiscoveryError::Timeout {
                name,
                server,
                timeout: self.query_timeout,
            },
            NetError::Io(_) => DiscoveryError::Unreachable {
                name,
                server,
                source: Box::new(error),
            },
            error => DiscoveryError::Resolve {
                name,
                server,
                source: Box::new(error),
            },
        }
    }
}

fn ips_of(lookup: &Lookup) -> impl Iterator<Item = IpAddr> + '_ {
    lookup
        .answers()
        .iter()
        .filter_map(|record| ip_of(&record.data))
}

fn ip_of(data: &RData) -> Option<IpAddr> {
    match data {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
        _ => None,
    }
}

fn parse_name(name: &str) -> Result<Name, DiscoveryError> {
    if name.trim().is_empty() {
        return Err(invalid(name, "the name is empty", None));
    }
    if name.parse::<IpAddr>().is_ok() {
        return Err(invalid(
            name,
            "an ip address is not a dns name; use static discovery for addresses",
            None,
        ));
    }
    Name::from_str(name).map_err(|e| invalid(name, "not a valid dns name", Some(Box::new(e))))
}

fn invalid(
    name: &str,
    reason: &'static str,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
) -> DiscoveryError {
    DiscoveryError::InvalidConfig {
        name: name.to_owned(),
        reason,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn explicit(name: &str) -> DnsBuilder {
        Dns::builder(name).nameserver("127.0.0.1:53".parse().unwrap())
    }

    fn reason(builder: DnsBuilder) -> &'static str {
        match builder.build() {
            Err(DiscoveryError::InvalidConfig { reason, .. }) => reason,
            other => panic!("expected an invalid configuration, got {other:?}"),
        }
    }

    #[test]
    fn rejects_bad_configuration() {
        assert_eq!(reason(explicit("")), "the name is empty");
        assert!(reason(explicit("10.0.0.1")).starts_with("an ip address is not a dns name"));
        assert_eq!(reason(explicit("mesh").port(0)), "port must not be 0");
        assert_eq!(
            reason(explicit("mesh").query_timeout(Duration::ZERO)),
            "query timeout must not be zero"
        );
        assert_eq!(reason(explicit("a..b")), "not a valid dns name");
    }

    #[test]
    fn srv_name_defaults_to_the_gossip_udp_port_name() {
        let dns = explicit("mesh.default.svc.cluster.local.")
            .srv()
            .build()
            .unwrap();
        assert_eq!(
            dns.srv_name(),
            Some("_gossip._udp.mesh.default.svc.cluster.local.")
        );
        let dns = explicit("mesh.")
            .srv_name("_serf._udp.mesh.")
            .build()
            .unwrap();
        assert_eq!(dns.srv_name(), Some("_serf._udp.mesh."));
        // `port` after `srv` switches back to A/AAAA records.
        let dns = explicit("mesh.").srv().port(7000).build().unwrap();
        assert_eq!(dns.srv_name(), None);
    }
}
