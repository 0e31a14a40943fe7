//! Turn any gRPC server into a cluster: SWIM membership with load gossip ([`core`]), peer
//! discovery from a list or DNS ([`discovery`]), wired together by [`Node`]; load-aware
//! routing and forwarding ([`route`]), with the [`RouteLayer`](route::layer::RouteLayer) and
//! its [`Rule`](route::layer::Rule)s that put a tonic server in the cluster.
//!
//! # Where to start
//!
//! * [`Node`]: one member of the cluster (membership, discovery, the router).
//! * [`route::layer`]: the tower layer a server adds, with a rule per method; it counts the
//!   calls it runs here ([`CallTask`](route::layer::CallTask)).
//! * [`admin`] and `health`: the admin API (`meshctl`) and `grpc.health.v1`.
//! * `config`: the TOML, YAML and environment loader.
//!
//! # Features
//!
//! All on by default: `dns` (DNS discovery, hickory-resolver), `config` (the loader),
//! `health` (tonic-health), `tls` (rustls with ring, for the server and the forwarding
//! channels).
//!
//! ```
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let first = mesh::Node::builder()
//!     .node_id("build-0")?
//!     .gossip_bind("127.0.0.1:0".parse()?)
//!     .timing(mesh::Timing::local())
//!     .max_concurrency(8)
//!     .start()
//!     .await?;
//! let second = mesh::Node::builder()
//!     .node_id("build-1")?
//!     .gossip_bind("127.0.0.1:0".parse()?)
//!     .seeds([first.gossip_addr()])
//!     .timing(mesh::Timing::local())
//!     .max_concurrency(8)
//!     .start()
//!     .await?;
//!
//! tokio::time::timeout(Duration::from_secs(10), first.membership().wait_until(|v| v.len() == 2))
//!     .await?;
//! second.leave().await?;
//! first.shutdown().await;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod admin;
#[cfg(feature = "config")]
pub mod config;
pub mod drain;
#[cfg(feature = "health")]
pub mod health;
mod node;
#[cfg(feature = "tls")]
pub mod tls;

#[cfg(feature = "config")]
pub use config::{ConfigError, DiscoveryMode, MeshConfig};
pub use mesh_core::{
    Identity, LoadTracker, LocalStatus, Member, MembershipView, MeshEvent, NodeId, NodeIdError,
    NodeState, PeerStatus, Tags, TaskGuard, Timing,
};
pub use node::{Node, NodeBuilder, NodeError};

pub use mesh_route::{
    Affinity, LeastLoaded, OperationId, PowerOfTwoChoices, Random, RoundRobin, RouteRequest,
    Router, Strategy, WeightedCapacity, WhenFull,
};

#[doc(inline)]
pub use mesh_core as core;
#[doc(inline)]
pub use mesh_discovery as discovery;
#[doc(inline)]
pub use mesh_proto as proto;
#[doc(inline)]
pub use mesh_route as route;

/// Compiles and runs the examples in `README.md`, so the README cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
