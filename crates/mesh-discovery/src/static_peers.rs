use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use crate::{Discover, DiscoveryError};

/// A fixed list of `host:port` peers, like memberlist's `Join([]string)` or serf's
/// `-join` / `retry_join` list.
///
/// Entries are validated once, by [`Static::new`]. IP literals (`10.0.0.7:7946`,
/// `[fd00::7]:7946`) are used as they are; hostnames are resolved by the operating system's
/// resolver (`getaddrinfo`, through [`tokio::net::lookup_host`]) on every
/// [`discover`](Discover::discover), so a name that moves to a new address is followed.
///
/// One unresolvable host does not hide the others: `discover` returns every address that did
/// resolve, in list order without duplicates, and fails only when entries exist and none of them
/// produced an address. An empty list is valid and discovers nothing (a first, lone node).
#[derive(Clone, Debug)]
pub struct Static {
    entries: Vec<Entry>,
    lookup_timeout: Duration,
}

#[derive(Clone, Debug)]
enum Entry {
    Addr(SocketAddr),
    Host { host: String, port: u16 },
}

impl Static {
    /// How long one hostname lookup may take before it counts as failed, unless changed with
    /// [`Static::lookup_timeout`].
    pub const DEFAULT_LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

    /// Validates `host:port` entries.
    ///
    /// `host` is a DNS name, an IPv4 address, or an IPv6 address in brackets (`[::1]:7946`);
    /// `port` is 1–65535. Surrounding whitespace is ignored. The first bad entry is reported as
    /// [`DiscoveryError::InvalidAddress`] naming the entry and the rule it broke.
    pub fn new<I>(peers: I) -> Result<Self, DiscoveryError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let entries = peers
            .into_iter()
            .map(|peer| parse_entry(peer.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            entries,
            lookup_timeout: Self::DEFAULT_LOOKUP_TIMEOUT,
        })
    }

    /// A list of socket addresses, which need no validation and no lookup.
    pub fn from_addrs(addrs: impl IntoIterator<Item = SocketAddr>) -> Self {
        Self {
            entries: addrs.into_iter().map(Entry::Addr).collect(),
            lookup_timeout: Self::DEFAULT_LOOKUP_TIMEOUT,
        }
    }

    /// Sets how long one hostname lookup may take (default
    /// [`DEFAULT_LOOKUP_TIMEOUT`](Self::DEFAULT_LOOKUP_TIMEOUT)). A lookup that takes longer
    /// counts as failed for this [`discover`](Discover::discover) call.
    pub fn lookup_timeout(mut self, timeout: Duration) -> Self {
        self.lookup_timeout = timeout;
        self
    }
}

impl Discover for Static {
    async fn discover(&self) -> Result<Vec<SocketAddr>, DiscoveryError> {
        let lookups = self.entries.iter().map(|entry| async move {
            match entry {
                Entry::Addr(addr) => Ok(vec![*addr]),
                Entry::Host { host, port } => lookup(host, *port, self.lookup_timeout).await,
            }
        });
        let results = futures::future::join_all(lookups).await;

        let mut seen = HashSet::new();
        let mut addrs = Vec::new();
        let mut failures = Vec::new();
        for (entry, result) in self.entries.iter().zip(results) {
            match result {
                Ok(resolved) => addrs.extend(resolved.into_iter().filter(|a| seen.insert(*a))),
                Err(error) => {
                    tracing::warn!(%error, "static peer did not resolve");
                    if let Entry::Host { host, port } = entry {
                        failures.push((format!("{host}:{port}"), error));
                    }
                }
            }
        }

        if addrs.is_empty() && !failures.is_empty() {
            let names = failures.iter().map(|(name, _)| name.clone()).collect();
            let (_, first) = failures.swap_remove(0);
            return Err(DiscoveryError::NothingResolved {
                names,
                server: None,
                source: Box::new(first),
            });
        }
        Ok(addrs)
    }
}

async fn lookup(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<Vec<SocketAddr>, DiscoveryError> {
    let resolved = tokio::time::timeout(timeout, tokio::net::lookup_host((host, port)))
        .await
        .map_err(|_| DiscoveryError::Timeout {
            name: host.to_owned(),
            server: None,
            timeout,
        })?
        .map_err(|error| DiscoveryError::Resolve {
            name: host.to_owned(),
            server: None,
            source: Box::new(error),
        })?;
    let addrs: Vec<_> = resolved.collect();
    if addrs.is_empty() {
        return Err(DiscoveryError::NoRecords {
            name: host.to_owned(),
            record_types: "A/AAAA",
            server: None,
            name_exists: true,
        });
    }
    Ok(addrs)
}

fn parse_entry(raw: &str) -> Result<Entry, DiscoveryError> {
    let value = raw.trim();
    let invalid = |reason| DiscoveryError::InvalidAddress {
        value: raw.to_owned(),
        reason,
    };
    if value.is_empty() {
        return Err(invalid("empty entry: expected host:port"));
    }

    let (host, port) = if let Some(rest) = value.strip_prefix('[') {
        let (ip, after) = rest
            .split_once(']')
            .ok_or_else(|| invalid("unclosed '[': expected [ipv6]:port"))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| invalid("missing port: expected [ipv6]:port"))?;
        let ip = ip
            .parse::<std::net::Ipv6Addr>()
            .map_err(|_| invalid("only an ipv6 address may appear in brackets"))?;
        (Host::Ip(IpAddr::V6(ip)), port)
    } else {
        let (host, port) = value
            .rsplit_once(':')
            .ok_or_else(|| invalid("missing port: expected host:port"))?;
        if host.contains(':') {
            return Err(invalid(
                "an ipv6 address must be in brackets, as in [::1]:7946",
            ));
        }
        if host.is_empty() {
            return Err(invalid("empty host: expected host:port"));
        }
        match host.parse::<IpAddr>() {
            Ok(ip) => (Host::Ip(ip), port),
            Err(_) if is_dns_name(host) => (Host::Name(host), port),
            Err(_) => {
                return Err(invalid(
                    "host must be a dns name (letters, digits, '-', '_', '.') or an ip address",
                ));
            }
        }
    };

    let port = match port.parse::<u16>() {
        Ok(0) | Err(_) => return Err(invalid("port must be a number from 1 to 65535")),
        Ok(port) => port,
    };
    Ok(match host {
        Host::Ip(ip) => Entry::Addr(SocketAddr::new(ip, port)),
        Host::Name(host) => Entry::Host {
            host: host.to_owned(),
            port,
        },
    })
}

enum Host<'a> {
    Ip(IpAddr),
    Name(&'a str),
}

/// RFC 1123 host names, relaxed to allow `_` (seen in Kubernetes and SRV-style names) and an
/// optional trailing dot.
fn is_dns_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(value: &str) -> &'static str {
        match Static::new([value]) {
            Err(DiscoveryError::InvalidAddress { value: v, reason }) => {
                assert_eq!(v, value, "the error names the entry as given");
                reason
            }
            other => panic!("{value:?} should be rejected, got {other:?}"),
        }
    }

    #[test]
    fn rejects_malformed_entries_naming_the_rule() {
        assert!(reason("").starts_with("empty entry"));
        assert!(reason("node-1").starts_with("missing port"));
        assert!(reason(":7946").starts_with("empty host"));
        assert!(reason("node-1:").starts_with("port must be"));
        assert!(reason("node-1:0").starts_with("port must be"));
        assert!(reason("node-1:65536").starts_with("port must be"));
        assert!(reason("node-1:http").starts_with("port must be"));
        assert!(reason("::1:7946").contains("in brackets"));
        assert!(reason("[::1]").starts_with("missing port"));
        assert!(reason("[::1:7946").starts_with("unclosed"));
        assert!(reason("[10.0.0.1]:7946").contains("ipv6"));
        assert!(reason("no spaces:7946").starts_with("host must be a dns name"));
        assert!(reason("-bad.example:7946").starts_with("host must be a dns name"));
        assert!(reason("a..b:7946").starts_with("host must be a dns name"));
    }

    #[test]
    fn accepts_names_and_ip_literals() {
        let peers = Static::new([
            " node-1.mesh.default.svc.cluster.local:7946 ",
            "fqdn.example.:1",
            "10.0.0.1:7946",
            "[fd00::1]:7946",
            "[::ffff:10.0.0.2]:7946",
        ])
        .expect("all entries are valid");
        assert_eq!(peers.entries.len(), 5);
        assert!(
            matches!(&peers.entries[0], Entry::Host { host, port: 7946 } if host == "node-1.mesh.default.svc.cluster.local")
        );
        assert!(
            matches!(&peers.entries[1], Entry::Host { host, port: 1 } if host == "fqdn.example.")
        );
        assert!(
            matches!(peers.entries[3], Entry::Addr(a) if a == "[fd00::1]:7946".parse().unwrap())
        );
    }

    #[tokio::test]
    async fn ip_literals_need_no_lookup_and_are_deduplicated_in_order() {
        let peers = Static::new([
            "10.0.0.2:7946",
            "[fd00::1]:7946",
            "10.0.0.1:7946",
            "10.0.0.2:7946",
        ])
        .unwrap();
        let addrs = peers.discover().await.unwrap();
        let expected: Vec<SocketAddr> = ["10.0.0.2:7946", "[fd00::1]:7946", "10.0.0.1:7946"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(addrs, expected);

        let from_addrs = Static::from_addrs(expected.iter().copied().chain([expected[0]]));
        assert_eq!(from_addrs.discover().await.unwrap(), expected);
    }

    #[tokio::test]
    async fn an_empty_list_discovers_nothing() {
        let peers = Static::new(Vec::<String>::new()).unwrap();
        assert!(peers.discover().await.unwrap().is_empty());
    }
}
