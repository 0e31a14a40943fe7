//! REAPI replicas on 127.0.0.1, driven by a Rust client built from the same bindings.
//!
//! One test binary (one link) for all of them: `cluster` (blobs and results across replicas),
//! `execution` (the executor and the scheduler on one replica), `errors` (bad input),
//! `storage` (eviction, ByteStream chunking), `routing` (what the route layer will call),
//! `placement` (one store for the cluster: owners, durability, handoff, merging anywhere),
//! `confinement` (actions touch only their own tree; the sandbox).
#![allow(missing_docs, unreachable_pub)]

mod blake3;
mod cluster;
mod compression;
mod confinement;
mod drain;
mod errors;
mod execution;
mod placement;
mod routing;
mod security;
mod storage;
mod support;
