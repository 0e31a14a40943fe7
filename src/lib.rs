//! Turn any gRPC server into a cluster: SWIM membership with load gossip ([`mesh_core`]), peer
//! discovery from a list or DNS ([`mesh_discovery`]), wired together by [`Node`].
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
pub mod config;
pub mod health;
mod node;
pub mod tls;

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

/// The membership layer, re-exported whole.
pub use mesh_core as core;
/// Peer discovery, re-exported whole.
pub use mesh_discovery as discovery;
/// Generated gRPC code (the admin API), re-exported whole.
pub use mesh_proto as proto;
/// Routing and forwarding, re-exported whole.
pub use mesh_route as route;

/// Compiles and runs the examples in `README.md`, so the README cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
