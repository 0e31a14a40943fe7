//! The server package's tests: the facade (`mesh`) embedded in real gRPC servers on 127.0.0.1,
//! and the `mesh-node` and `meshctl` binaries run as processes.
//!
//! One test binary (one link) with a module per concern, the convention every crate of the
//! workspace follows (`crates/<crate>/tests/<name>/main.rs`): `routing` and `route_layer`
//! (forwarding through the layer), `call_counting` (load), `operations` (names that reach their
//! owner), `tls`, `config` and `config_fuzz`, `deploy` (the manifests), `dns_discovery`,
//! `flood` (hostile datagrams), `sim_restart` (simulated crashes), and the process tests:
//! `processes`, `mesh_node`, `reapi_processes`, `netns` (hosts in network namespaces).
#![allow(missing_docs, unreachable_pub)]

mod cluster_processes;
mod support;

mod call_counting;
mod config;
mod config_fuzz;
mod deploy;
mod dns_discovery;
mod flood;
mod mesh_node;
mod netns;
mod operations;
mod processes;
mod reapi_processes;
mod route_layer;
mod routing;
mod sim_restart;
mod tls;
