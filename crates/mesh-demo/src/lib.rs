//! The demo the examples and tests run — not part of the library: a miniature remote-execution
//! server built the way a real one embeds the mesh, a harness that runs replicas as if they
//! were processes, and a service the route layer has never seen, for its tests.
//!
//! * [`ExecutionService`] serves `mesh.demo.v1.Execution`, a miniature of the Remote Execution
//!   API's `Execution` service, on a [`DemoExecutor`] that simulates work. It knows nothing of
//!   routing: [`execution_layer`] declares the two rules that make it a cluster — `Execute`
//!   spread by load with the action's platform as required tags (idempotent: re-routed if its
//!   node dies), `WaitExecution` to the operation's owner.
//! * [`Replica`] runs a node and a gRPC server on a thread and runtime of their own, so
//!   [`Replica::kill`] is a real crash; [`DemoNode`] is a replica serving the demo.
//! * [`echo`] is the test service.
#![forbid(unsafe_code)]

pub mod echo;
mod executor;
mod replica;
mod routing;
mod service;

pub use executor::{COMPLETED_RETENTION, DemoExecutor, MAX_ACTION_DURATION};
pub use replica::{DemoNode, Replica, ReplicaError, Served};
pub use routing::execution_layer;
pub use service::{ExecutionService, OperationStream, ServiceStats, finish};

/// Generated code for the demo and test APIs (`proto/mesh/demo`, `proto/mesh/test`).
pub mod proto {
    /// The demo execution API.
    pub mod demo {
        /// Version 1.
        pub mod v1 {
            #![allow(missing_docs, unreachable_pub, missing_debug_implementations)]
            #![allow(clippy::all, clippy::pedantic)]
            tonic::include_proto!("mesh.demo.v1");
        }
    }

    /// The route layer's test API.
    pub mod test {
        /// Version 1.
        pub mod v1 {
            #![allow(missing_docs, unreachable_pub, missing_debug_implementations)]
            #![allow(clippy::all, clippy::pedantic)]
            tonic::include_proto!("mesh.test.v1");
        }
    }
}
