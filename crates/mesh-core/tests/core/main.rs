//! mesh-core's tests, one binary with a module per concern (the workspace's convention):
//! `cluster` (a cluster's life on real UDP and on simulated time), `encryption` (keys, labels,
//! tampering, rotation), `faults` (turmoil scenarios: partitions, crashes, loss, slow nodes;
//! run alone with `cargo test -p tonic-mesh-core --test core faults:: -- --test-threads 1`),
//! `gossip_budget` (states within the byte budget), `hostile_input` (decoders against any
//! input), `lifeguard` (failure detection on the simulator), `partition` (halves merging
//! back), `transport_conformance` (what every `Transport` must do).
#![allow(missing_docs, unreachable_pub)]

mod support;
mod udp;

mod cluster;
mod encryption;
mod faults;
mod gossip_budget;
mod hostile_input;
mod lifeguard;
mod partition;
mod transport_conformance;
