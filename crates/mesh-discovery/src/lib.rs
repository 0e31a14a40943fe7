//! Peer discovery for the mesh.
//!
//! A [`Discover`] implementation answers one question: "which gossip socket addresses might
//! belong to my cluster right now?". The membership layer (`mesh-core`) asks it at start-up and
//! again on an interval (30 s by default), and announces itself to every address that is not
//! already a member. That loop is what makes a fresh pod find its peers and what merges the two
//! halves of a healed partition without anyone acting.
//!
//! # Sources
//!
//! * [`Static`] — a fixed `host:port` list; hostnames are resolved on every call.
//! * [`Dns`] — the A/AAAA records of a name, with a configured port or with ports from SRV
//!   records; an explicit nameserver can be given.
//! * [`LastKnownGood`] wraps either and keeps the last good answer, so a DNS outage or a
//!   rollout that briefly empties a service never leaves the node with no one to announce to.
//!
//! A source chosen at run time can be boxed as `Box<dyn DynDiscover>`, which is itself a
//! [`Discover`].
//!
//! # Where this comes from
//!
//! memberlist's `Join(existing []string)` resolves every entry (a name may return many
//! addresses; memberlist asks over TCP first so that a large answer arrives whole), contacts
//! each address, and succeeds if any one answered. serf and Consul wrap it in
//! `retry_join`, which repeats the join on an interval until it succeeds once. Here discovery
//! runs for the node's whole life instead: every refresh re-resolves, and the mesh announces to
//! whatever is new, so pods added by a scale-up and the far side of a partition are found the
//! same way as the first peers were.
//!
//! # Kubernetes headless services
//!
//! A Service with `clusterIP: None` (a *headless* service) gets no virtual IP. Instead the
//! cluster DNS answers for `<service>.<namespace>.svc.<cluster-domain>` with one A (or AAAA)
//! record per endpoint, which is what [`Dns`] asks for: every pod's IP, with the gossip port
//! from configuration.
//!
//! * Only **ready** pods are published by default. A gossip mesh wants its pods found before
//!   they are ready (a node that must join to become ready could otherwise never be found), so
//!   set `publishNotReadyAddresses: true` on the service; failure detection is SWIM's job, not
//!   the readiness probe's.
//! * For every **named port**, the DNS also serves SRV records at
//!   `_<port-name>._<protocol>.<service>.<namespace>.svc.<cluster-domain>`, one per endpoint,
//!   whose target is the pod's own DNS name (`<pod>.<service>…` for StatefulSet pods) and
//!   whose port is the container port. CoreDNS adds the targets' A/AAAA records to the
//!   additional section, so one query gives addresses and ports. Name the gossip port `gossip`
//!   with protocol UDP and [`DnsBuilder::srv`] finds it at `_gossip._udp.<name>`.
//! * Write the name fully qualified, with a trailing dot: pods get `ndots:5` in `resolv.conf`,
//!   so a shorter name is first tried against every search domain.
//! * A big service does not fit in a UDP answer; [`Dns`] repeats a truncated answer over TCP.
//!   (This relies on the server setting the truncation bit, as CoreDNS does; memberlist asks
//!   over TCP first because some servers trim answers silently.)
//!
//! # Example
//!
//! ```
//! use mesh_discovery::{Discover, LastKnownGood, Static};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), mesh_discovery::DiscoveryError> {
//! let seeds = Static::new(["10.0.0.1:7946", "[fd00::2]:7946", "10.0.0.1:7946"])?;
//! let addrs = seeds.discover().await?;
//! assert_eq!(addrs, ["10.0.0.1:7946".parse().unwrap(), "[fd00::2]:7946".parse().unwrap()]);
//!
//! // What the mesh does on every refresh interval.
//! let discovery = LastKnownGood::new(seeds);
//! let refresh = discovery.refresh().await;
//! assert!(refresh.is_fresh());
//! assert_eq!(refresh.addrs.len(), 2);
//!
//! // Entries are checked up front.
//! let error = Static::new(["10.0.0.1"]).unwrap_err();
//! assert_eq!(
//!     error.to_string(),
//!     r#"invalid peer address "10.0.0.1": missing port: expected host:port"#
//! );
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc};

#[cfg(feature = "dns")]
mod dns;
mod error;
mod last_known_good;
mod static_peers;
#[cfg(feature = "test-server")]
pub mod testing;

#[cfg(feature = "dns")]
pub use dns::{Dns, DnsBuilder};
pub use error::DiscoveryError;
pub use last_known_good::{LastKnownGood, Refresh, RefreshOutcome};
pub use static_peers::Static;

/// A source of candidate peer addresses.
///
/// Implementations should be cheap to call repeatedly: the mesh calls [`Discover::discover`] on
/// every refresh interval. An answer may include the caller's own address; the mesh filters it.
pub trait Discover: Send + Sync + 'static {
    /// Resolves the current set of candidate gossip addresses.
    fn discover(&self) -> impl Future<Output = Result<Vec<SocketAddr>, DiscoveryError>> + Send;
}

/// The boxed future returned by [`DynDiscover::discover_boxed`].
pub type DiscoverFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<SocketAddr>, DiscoveryError>> + Send + 'a>>;

/// Object-safe form of [`Discover`], so a discovery method can be chosen at run time
/// (`Box<dyn DynDiscover>`). Every [`Discover`] implements it, and `Box<dyn DynDiscover>` and
/// `Arc<dyn DynDiscover>` implement [`Discover`] again, so they can be wrapped in
/// [`LastKnownGood`].
pub trait DynDiscover: Send + Sync + 'static {
    /// Same as [`Discover::discover`], boxed.
    fn discover_boxed(&self) -> DiscoverFuture<'_>;
}

impl<D: Discover> DynDiscover for D {
    fn discover_boxed(&self) -> DiscoverFuture<'_> {
        Box::pin(self.discover())
    }
}

impl Discover for Box<dyn DynDiscover> {
    fn discover(&self) -> impl Future<Output = Result<Vec<SocketAddr>, DiscoveryError>> + Send {
        // Through the trait object: `self.discover_boxed()` would pick the blanket impl for the
        // box and call back into this method forever.
        (**self).discover_boxed()
    }
}

impl Discover for Arc<dyn DynDiscover> {
    fn discover(&self) -> impl Future<Output = Result<Vec<SocketAddr>, DiscoveryError>> + Send {
        (**self).discover_boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn boxed_sources_are_sources() {
        let boxed: Box<dyn DynDiscover> = Box::new(Static::new(["10.0.0.1:7946"]).unwrap());
        let shared: Arc<dyn DynDiscover> = Arc::new(Static::new(["10.0.0.2:7946"]).unwrap());
        let expected = |a: &str| vec![a.parse::<SocketAddr>().unwrap()];
        assert_eq!(
            LastKnownGood::new(boxed).refresh().await.addrs.to_vec(),
            expected("10.0.0.1:7946")
        );
        assert_eq!(shared.discover().await.unwrap(), expected("10.0.0.2:7946"));
    }
}
