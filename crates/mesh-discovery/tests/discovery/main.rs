//! Peer discovery against real resolvers: `dns` (`Dns` discovery against a DNS server running
//! in the test process), `names` (every peer entry and DNS name accepted exactly when it
//! follows the documented rule), `static_peers` (`Static` discovery through the operating
//! system's resolver).
//!
//! One test binary with a module per concern, as in every crate of the workspace.
#![allow(missing_docs, unreachable_pub)]

mod dns;
mod names;
mod static_peers;
