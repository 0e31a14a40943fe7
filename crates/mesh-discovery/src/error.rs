use std::{error::Error, net::SocketAddr, time::Duration};

/// Why a discovery attempt failed, or why a discovery source was rejected when it was built.
///
/// Every variant names what was being resolved and, for DNS, the nameserver that was asked when
/// one was configured explicitly (`server: None` means the system configuration was used).
/// Causes are kept as [`source`](std::error::Error::source) so a log line can print the chain.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// A static entry is not of the form `host:port`.
    #[error("invalid peer address {value:?}: {reason}")]
    InvalidAddress {
        /// The entry as given.
        value: String,
        /// The rule it broke.
        reason: &'static str,
    },

    /// A DNS discovery configuration was rejected when it was built.
    #[error("invalid dns discovery configuration for {name:?}: {reason}")]
    InvalidConfig {
        /// The name that was configured.
        name: String,
        /// The rule it broke.
        reason: &'static str,
        /// The underlying cause, when there is one.
        #[source]
        source: Option<Box<dyn Error + Send + Sync>>,
    },

    /// The system DNS configuration (`/etc/resolv.conf`) could not be read.
    #[error("cannot resolve {name:?}: reading the system dns configuration failed: {source}")]
    SystemConfig {
        /// The name that was to be resolved.
        name: String,
        /// The underlying cause.
        #[source]
        source: Box<dyn Error + Send + Sync>,
    },

    /// A name could not be resolved.
    #[error("resolving {name:?}{} failed: {source}", via(server))]
    Resolve {
        /// The name that was looked up.
        name: String,
        /// The nameserver asked, when one was configured explicitly.
        server: Option<SocketAddr>,
        /// The underlying cause.
        #[source]
        source: Box<dyn Error + Send + Sync>,
    },

    /// The nameserver did not answer in time (a nameserver that is down looks like this over
    /// UDP).
    #[error(
        "resolving {name:?}{} timed out: no answer within {timeout:?} per query",
        via(server)
    )]
    Timeout {
        /// The name that was looked up.
        name: String,
        /// The nameserver asked, when one was configured explicitly.
        server: Option<SocketAddr>,
        /// The per-query timeout that expired.
        timeout: Duration,
    },

    /// The nameserver could not be reached (a socket error, not a DNS answer).
    #[error(
        "resolving {name:?}{} failed: the nameserver cannot be reached: {source}",
        via(server)
    )]
    Unreachable {
        /// The name that was looked up.
        name: String,
        /// The nameserver asked, when one was configured explicitly.
        server: Option<SocketAddr>,
        /// The underlying cause.
        #[source]
        source: Box<dyn Error + Send + Sync>,
    },

    /// The nameserver answered, but the name has no records of the wanted types.
    ///
    /// For a Kubernetes headless service this means the service does not exist
    /// (`name_exists == false`) or has no endpoints yet.
    #[error(
        "no {record_types} records for {name:?}{}: {}",
        via(server),
        if *name_exists { "the name exists but has no such records" } else { "the name does not exist (nxdomain)" }
    )]
    NoRecords {
        /// The name that was looked up.
        name: String,
        /// The record types asked for, such as `"A/AAAA"` or `"SRV"`.
        record_types: &'static str,
        /// The nameserver asked, when one was configured explicitly.
        server: Option<SocketAddr>,
        /// `false` when the answer was NXDOMAIN (the name does not exist at all).
        name_exists: bool,
    },

    /// Several names had to be resolved (static peers, SRV targets) and none of them resolved.
    ///
    /// The cause is the failure of the first name; the others are logged with `tracing`.
    #[error("none of {names:?} resolved{}: {source}", via(server))]
    NothingResolved {
        /// The names that were tried, in order.
        names: Vec<String>,
        /// The nameserver asked, when one was configured explicitly.
        server: Option<SocketAddr>,
        /// Why the first name failed.
        #[source]
        source: Box<DiscoveryError>,
    },
}

fn via(server: &Option<SocketAddr>) -> String {
    server.map(|s| format!(" via {s}")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_name_the_server_and_the_cause() {
        let server: SocketAddr = "127.0.0.1:5353".parse().unwrap();
        let timeout = DiscoveryError::Timeout {
            name: "mesh.default.svc.cluster.local".into(),
            server: Some(server),
            timeout: Duration::from_millis(200),
        };
        assert_eq!(
            timeout.to_string(),
            "resolving \"mesh.default.svc.cluster.local\" via 127.0.0.1:5353 timed out: \
             no answer within 200ms per query"
        );

        let missing = DiscoveryError::NoRecords {
            name: "mesh".into(),
            record_types: "A/AAAA",
            server: None,
            name_exists: false,
        };
        assert_eq!(
            missing.to_string(),
            "no A/AAAA records for \"mesh\": the name does not exist (nxdomain)"
        );

        let nothing = DiscoveryError::NothingResolved {
            names: vec!["a.invalid".into(), "b.invalid".into()],
            server: None,
            source: Box::new(missing),
        };
        assert!(
            nothing
                .to_string()
                .starts_with("none of [\"a.invalid\", \"b.invalid\"] resolved: no A/AAAA")
        );
        let source = Error::source(&nothing).expect("the first failure is the source");
        assert!(source.to_string().contains("\"mesh\""));
    }
}
