//! The standard gRPC health service (`grpc.health.v1.Health`, from the `tonic-health` crate),
//! driven by the membership, so load balancers and Kubernetes probes see what the mesh knows.
//!
//! # The rule
//!
//! The overall status (service `""`, what `grpc_health_probe` and a Kubernetes `grpc` probe ask
//! without a service name) and every service given to [`HealthBuilder::service`] are
//! `SERVING` exactly when the node is in the cluster and takes work ([`readiness`]):
//!
//! | the node is | status |
//! |---|---|
//! | joining (no peer answered yet), for less than the join grace | `NOT_SERVING` |
//! | joining for longer than the join grace: alone (a cluster of one, or no peer reachable) | `SERVING` |
//! | active, or isolated (it lost every peer, and still runs its own work) | `SERVING` |
//! | draining (its gossiped state says so, e.g. after `meshctl drain`) | `NOT_SERVING` |
//! | left or defunct | `NOT_SERVING` |
//!
//! The join grace (default five rejoin intervals of the node's timing: 10 s with `lan`, 1.5 s
//! with `local`) keeps a replica that has nobody to join, such as a single-replica deployment,
//! from never becoming ready.
//!
//! `mesh.admin.v1.MeshAdmin` ([`LIVENESS_SERVICE`]) is `SERVING` for as long as the service is
//! served, draining or not: point liveness probes at it, readiness probes at `""`, so that a
//! draining or joining node is taken out of load balancing but not restarted.
//!
//! `Watch` streams end once the node has left (after telling `NOT_SERVING`), so a watcher never
//! holds up a graceful shutdown.
//!
//! ```no_run
//! # async fn demo(node: mesh::Node) -> Result<(), Box<dyn std::error::Error>> {
//! let health = mesh::health::NodeHealth::builder(node.membership().clone())
//!     .start()
//!     .await;
//! tonic::transport::Server::builder()
//!     .add_service(health)
//!     .add_service(mesh::admin::AdminService::for_node(&node).into_server())
//!     .serve("0.0.0.0:50051".parse()?)
//!     .await?;
//! # Ok(()) }
//! ```

use std::{pin::Pin, time::Duration};

use futures::{Stream, StreamExt};
use mesh_core::{LocalStatus, Membership, MembershipView};
use tokio::{sync::watch, task::JoinHandle, time::Instant};
use tonic::{Request, Response, Status, server::NamedService};
use tonic_health::{
    pb::{
        HealthCheckRequest, HealthCheckResponse, health_check_response,
        health_server::{Health, HealthServer},
    },
    server::{HealthReporter, HealthService, WatchStream},
};

pub use tonic_health::ServingStatus;

/// The service whose status is `SERVING` whenever the health service is served: for liveness
/// probes (the admin service every node serves).
pub const LIVENESS_SERVICE: &str = <mesh_proto::admin::v1::mesh_admin_server::MeshAdminServer<
    crate::admin::AdminService,
> as NamedService>::NAME;

/// Whether a node whose view is `view` should be in load balancing, having been joining for
/// `joining_for` (see the [module docs](self) for the rule).
pub fn readiness(
    view: &MembershipView,
    joining_for: Duration,
    join_grace: Duration,
) -> ServingStatus {
    let draining = view.local().state().is_some_and(|state| state.draining);
    let ready = match view.status() {
        _ if draining => false,
        LocalStatus::Active | LocalStatus::Isolated => true,
        LocalStatus::Joining => joining_for >= join_grace,
        LocalStatus::Left | LocalStatus::Defunct => false,
    };
    if ready {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// Configures the health service of one node. Made by [`NodeHealth::builder`].
#[derive(Debug)]
#[must_use = "a builder does nothing until started"]
pub struct HealthBuilder {
    membership: Membership,
    services: Vec<String>,
    join_grace: Duration,
}

impl HealthBuilder {
    /// Another service whose status follows the node's readiness (besides the overall status,
    /// `""`), e.g. `build.bazel.remote.execution.v2.Execution`.
    pub fn service(mut self, name: impl Into<String>) -> Self {
        self.services.push(name.into());
        self
    }

    /// How long a node may stay joining (no peer answered) before it serves alone. Default:
    /// five rejoin intervals of its timing.
    pub fn join_grace(mut self, grace: Duration) -> Self {
        self.join_grace = grace;
        self
    }

    /// Sets the statuses from the current view and starts keeping them up to date (a task
    /// on the current tokio runtime that ends when the returned service is dropped).
    pub async fn start(self) -> HealthServer<NodeHealth> {
        let reporter = HealthReporter::new();
        reporter
            .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
            .await;
        let (left_tx, left) = watch::channel(false);
        let mut driver = Driver {
            membership: self.membership,
            reporter: reporter.clone(),
            services: self.services,
            join_grace: self.join_grace,
            joining_since: Instant::now(),
            left: left_tx,
        };
        driver.update(&driver.membership.view()).await;
        let task = tokio::spawn(driver.run());
        HealthServer::new(NodeHealth {
            inner: HealthService::from_health_reporter(reporter),
            driver: task,
            left,
        })
    }
}

/// `grpc.health.v1.Health` for one node, kept up to date from its membership (see the
/// [module docs](self)). Serve it with `HealthServer` (what [`HealthBuilder::start`] returns).
#[derive(Debug)]
pub struct NodeHealth {
    inner: HealthService,
    driver: JoinHandle<()>,
    /// Becomes true once the node has left (or was declared defunct): watches end.
    left: watch::Receiver<bool>,
}

/// A `Watch` answer: the statuses of one service, until the node leaves.
pub type HealthWatchStream =
    Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send + 'static>>;

impl NodeHealth {
    /// Starts configuring the health service of the node `membership` belongs to.
    pub fn builder(membership: Membership) -> HealthBuilder {
        let join_grace = membership.timing().rejoin_interval * 5;
        HealthBuilder {
            membership,
            services: Vec::new(),
            join_grace,
        }
    }
}

impl Drop for NodeHealth {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

#[tonic::async_trait]
impl Health for NodeHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = HealthWatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthWatchStream>, Status> {
        let statuses: WatchStream = self.inner.watch(request).await?.into_inner();
        let state = (statuses, self.left.clone(), false);
        let stream = futures::stream::unfold(state, |(mut statuses, mut left, ended)| async move {
            if ended {
                return None;
            }
            let next = tokio::select! {
                biased;
                status = statuses.next() => Some(status),
                _ = left.wait_for(|left| *left) => None,
            };
            match next {
                Some(Some(status)) => Some((status, (statuses, left, false))),
                Some(None) => None,
                // Gone: one last word, then the end.
                None => {
                    let last = HealthCheckResponse {
                        status: health_check_response::ServingStatus::NotServing as i32,
                    };
                    Some((Ok(last), (statuses, left, true)))
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Follows the view and sets the statuses.
struct Driver {
    membership: Membership,
    reporter: HealthReporter,
    services: Vec<String>,
    join_grace: Duration,
    /// When the node was last seen to start joining.
    joining_since: Instant,
    left: watch::Sender<bool>,
}

impl Driver {
    async fn run(mut self) {
        let mut last = self.membership.view();
        let mut last_status = last.status();
        loop {
            let seen = last.epoch();
            let changed = self.membership.wait_until(|view| view.epoch() != seen);
            let grace_ends = self.joining_since + self.join_grace;
            let view = if last.status() == LocalStatus::Joining && Instant::now() < grace_ends {
                // Wake when the grace ends, too.
                match tokio::time::timeout_at(grace_ends, changed).await {
                    Ok(view) => view,
                    Err(_) => self.membership.view(),
                }
            } else {
                changed.await
            };
            if view.status() == LocalStatus::Joining && last_status != LocalStatus::Joining {
                // Rejoining under a renewed identity: a new grace.
                self.joining_since = Instant::now();
            }
            last_status = view.status();
            self.update(&view).await;
            last = view;
        }
    }

    async fn update(&mut self, view: &MembershipView) {
        let status = readiness(view, self.joining_since.elapsed(), self.join_grace);
        for service in std::iter::once("").chain(self.services.iter().map(String::as_str)) {
            self.reporter.set_service_status(service, status).await;
        }
        if matches!(view.status(), LocalStatus::Left | LocalStatus::Defunct) {
            self.left.send_replace(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use mesh_core::{NodeId, Timing};

    use super::*;

    #[tokio::test]
    async fn joining_nodes_wait_for_the_grace_and_draining_nodes_stop_serving() {
        let membership = Membership::builder(NodeId::new("h").unwrap())
            .bind_addr("127.0.0.1:0".parse().unwrap())
            .timing(Timing::local())
            .start()
            .await
            .unwrap();
        let grace = Duration::from_secs(10);
        let view = membership.view();
        assert_eq!(view.status(), LocalStatus::Joining);
        assert_eq!(
            readiness(&view, Duration::ZERO, grace),
            ServingStatus::NotServing
        );
        assert_eq!(readiness(&view, grace, grace), ServingStatus::Serving);

        membership.set_draining(true).unwrap();
        let draining = tokio::time::timeout(
            Duration::from_secs(10),
            membership.wait_until(|v| v.local().state().is_some_and(|s| s.draining)),
        )
        .await
        .unwrap();
        assert_eq!(
            readiness(&draining, grace, grace),
            ServingStatus::NotServing
        );
        membership.shutdown().await;
    }
}
