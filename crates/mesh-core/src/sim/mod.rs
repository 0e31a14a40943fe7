//! A cluster simulator: the real membership code, many nodes, one thread, simulated time.
//!
//! Every simulated node is a complete [`Membership`](crate::Membership) (receive task,
//! membership task with foca, timers, state gossip) started with
//! [`start_with_transport`](crate::MembershipBuilder::start_with_transport) on a
//! [`SimSocket`]; nothing about the protocol is modelled. What is simulated is the rest of the
//! world:
//!
//! * **the network** ([`SimNetwork`]): per-datagram latency, independent loss, slow hosts,
//!   partitions and one-way links, bounded receive buffers, all from one seeded generator;
//! * **time**: run the cluster in a tokio runtime whose clock is paused (`start_paused`).
//!   When every task is waiting, tokio jumps the clock straight to the next timer, so a
//!   simulated minute costs only the CPU the nodes actually use: no polling of idle hosts,
//!   no fixed tick. This is what makes a thousand nodes fit on two cores, where a
//!   per-host-runtime simulator such as turmoil polls every host on every tick (turmoil stays
//!   the tool for the fault suite, where its per-link controls and host bounces serve);
//! * **crashes and restarts** ([`SimCluster::crash`], [`SimCluster::restart`]): a crashed node
//!   stops without a word and its address drops everything; a restarted one comes back at the
//!   same address with a newer generation.
//!
//! The approach is the one of deterministic simulation testing (FoundationDB's simulator,
//! turmoil): one thread, one clock, seeded randomness, so a run can be repeated. Runs with the
//! same seed make the same random choices; the order in which tokio polls tasks woken at the
//! same instant is not part of that promise, so figures are compared as distributions.
//!
//! `cargo bench -p tonic-mesh-core --bench simulation` reports convergence, propagation, failure
//! detection, traffic and memory for 10 to 1,000 nodes with it (BENCHMARKS.md).
//!
//! ```
//! use std::time::Duration;
//! use mesh_core::{Timing, sim::SimCluster};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut cluster = SimCluster::start(1, 5, Timing::lan()).await?;
//! let all: Vec<usize> = (0..5).collect();
//! let formed = cluster.run_until(Duration::from_secs(10), Duration::from_millis(10), |c| {
//!     c.sees_exactly(&all)
//! });
//! assert!(formed.await.is_some());
//!
//! cluster.network().set_loss(0.1);
//! cluster.crash(4).await;
//! let detected = cluster.run_until(Duration::from_secs(30), Duration::from_millis(10), |c| {
//!     c.sees_exactly(&[0, 1, 2, 3])
//! });
//! assert!(detected.await.is_some());
//! # cluster.shutdown().await;
//! # Ok(()) }
//! ```

mod cluster;
mod network;

pub use cluster::{Logged, SimCluster};
pub use network::{LinkConfig, NetworkStats, SimNetwork, SimSocket};
