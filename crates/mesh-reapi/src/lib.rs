//! A Remote Execution API v2 server whose replicas form a mesh, with no shared storage and
//! no external store.
//!
//! Each replica embeds a [`mesh::Node`] (SWIM membership and load gossip) and serves the
//! services Bazel and other REAPI clients use, from the published `bazel-remote-apis`
//! bindings: `Capabilities`, `ContentAddressableStorage`, `ByteStream`, `ActionCache` and
//! `Execution`. (`google.longrunning.Operations` is not served: REAPI clients follow operations
//! with `WaitExecution`, and none of the clients this targets calls it.)
//!
//! # The pieces
//!
//! * **Edge** — one service per file, each a thin adapter from the generated trait onto a
//!   store or the scheduler (the layout of NativeLink's `nativelink-service`):
//!   [`capabilities_server`], [`cas_server`], [`bytestream_server`], [`ac_server`],
//!   [`execution_server`]. Digests ([`Digest`]) and resource names ([`ResourceName`]) are
//!   parsed and checked there, once; errors follow REAPI (`FAILED_PRECONDITION` with `MISSING`
//!   violations for missing blobs, `INVALID_ARGUMENT` naming the value and the rule for
//!   malformed input). Each instance name has its own action cache and operations
//!   ([`action_key`]); the CAS, named by content, is shared.
//! * **Stores** — [`Cas`] and [`ActionCache`]: one replica's blobs and results on disk,
//!   bounded, least recently used evicted, nothing half-written ever visible.
//! * **Cluster** — [`ClusterCas`]: the replicas answer as one CAS and one action cache. Every
//!   blob and result has `R` owners by rendezvous hashing over the live membership
//!   ([`placement`]); writes reach their owners before they are acknowledged, lookups ask the
//!   owners only, and membership changes move data in the background ([`handoff`]). The
//!   [`cluster`] module explains the design and what a client may rely on.
//! * **Execution** — the [`scheduler`] queues, bounds and merges actions and keeps their
//!   operations (identical actions in flight anywhere run once: [`claims`]); the [`executor`]
//!   runs each one for real in a directory of its own, in a [`sandbox`] (namespaces: the host
//!   read-only, the data directory invisible, no network, every process ending with the
//!   action and with the replica).
//! * **Assembly** — [`Reapi`] (all of the above over a started node) and [`ReapiServer`]
//!   (served on a listener).
//!
//! # Routing
//!
//! The `Execution` service runs whatever reaches it. Sharing work between replicas is the
//! route layer's job (`mesh_route::layer`), put in front of the services: `Execute` spread by
//! load over replicas whose tags match the action's platform
//! ([`ExecutionService::route_request`]), after the action cache was checked
//! ([`ExecutionService::cached_result`]), and marked idempotent (the action digest names the
//! work); `WaitExecution` to the owner named in the operation name. Calls between replicas
//! carry `x-mesh-forwarded-by`; a replica answering such a call uses only what it has itself.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use bazel_remote_apis::build::bazel::remote::execution::v2::{
//!     GetCapabilitiesRequest, capabilities_client::CapabilitiesClient,
//! };
//! use mesh_reapi::{ReapiConfig, ReapiServer};
//!
//! let data = tempfile::tempdir()?;
//! let node = mesh::Node::builder()
//!     .node_id("reapi-0")?
//!     .gossip_bind("127.0.0.1:0".parse()?)
//!     .timing(mesh::Timing::local());
//! let mut config = ReapiConfig::new(data.path());
//! config.max_concurrency = 2;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let server = ReapiServer::start(node, config, listener).await?;
//!
//! let mut client = CapabilitiesClient::connect(format!("http://{}", server.addr())).await?;
//! let capabilities = client
//!     .get_capabilities(GetCapabilitiesRequest::default())
//!     .await?
//!     .into_inner();
//! assert!(capabilities.execution_capabilities.unwrap().exec_enabled);
//! server.shutdown().await;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod ac_server;
mod action;
mod action_cache;
pub mod auth;
pub mod bytestream_server;
pub mod capabilities_server;
mod cas;
pub mod cas_server;
pub mod cgroups;
pub mod claims;
pub mod cluster;
pub mod compression;
pub mod config;
mod data_lock;
mod digest;
mod error;
pub mod execution_server;
pub mod executor;
pub mod handoff;
mod lru_dir;
mod peers;
pub mod placement;
pub mod presence;
mod resource;
pub mod routing;
pub mod sandbox;
pub mod scheduler;
mod server;
pub mod stats;

pub use ac_server::ActionCacheService;
pub use action::{ActionLimits, ActionSpec, InvalidAction, PlatformError, platform_tags};
pub use action_cache::{ActionCache, ActionCacheError, action_key};
pub use auth::{AuthError, Authorization, Right};
pub use bytestream_server::ByteStreamService;
pub use capabilities_server::CapabilitiesService;
pub use cas::{BlobReader, BlobWriter, Cas, CasError};
pub use cas_server::CasService;
pub use cgroups::ResourceLimits;
pub use claims::ClaimsService;
pub use cluster::{ClusterCas, ClusterError, Fetch, MissingBlobs, ReplicationConfig};
pub use config::ReapiSettings;
pub use data_lock::DataDirError;
pub use digest::{Digest, DigestError, DigestFunction, DigestRule, HASH_LEN, Hasher};
pub use execution_server::{ExecutionService, OperationStream};
pub use executor::{ExecError, Executed, InternalCause};
pub use lru_dir::StoreUsage;
pub use peers::{MAX_BATCH_TOTAL_SIZE, PeerConfig};
pub use presence::PresenceService;
pub use resource::{Compressor, ResourceName, ResourceNameError, ResourceRule};
pub use sandbox::{NETWORK_PROPERTY, SandboxError, SandboxMode};
pub use scheduler::{OperationState, SchedulerConfig};
pub use server::{
    DrainConfig, DrainReport, NodeSource, Reapi, ReapiConfig, ReapiError, ReapiServer,
};
pub use stats::ReapiStats;

/// The REAPI bindings this crate serves, re-exported for clients and tests.
pub use bazel_remote_apis as proto;
