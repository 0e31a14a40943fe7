//! Generated gRPC code for the `.proto` files under `proto/`.
//!
//! * [`admin::v1`] — the mesh admin API every node serves: list members, watch events, drain,
//!   stats. Every message derives `serde::Serialize`, so tools can print it as JSON.
//! * [`reapi::v1`] — calls between the replicas of a `mesh-reapi` cluster: the claims that
//!   make identical actions in flight anywhere run once.
//!
//! The code is generated at build time by `protox` (pure Rust), so no `protoc` is needed.
#![forbid(unsafe_code)]

/// The mesh admin API.
pub mod admin {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, unreachable_pub, missing_debug_implementations)]
        #![allow(clippy::all, clippy::pedantic)]
        tonic::include_proto!("mesh.admin.v1");
    }
}

/// Calls between the replicas of a `mesh-reapi` cluster.
pub mod reapi {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, unreachable_pub, missing_debug_implementations)]
        #![allow(clippy::all, clippy::pedantic)]
        tonic::include_proto!("mesh.reapi.v1");
    }
}
