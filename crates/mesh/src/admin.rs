//! The admin gRPC service every node serves (`mesh.admin.v1.MeshAdmin`): list members, watch
//! events, drain, stats.
//!
//! * `ListMembers` lists the live members and, like `serf members`, those that failed or left,
//!   with how long ago each status changed, until they are reaped
//!   ([`mesh_core::Timing::remove_down_after`]); it names the advisory coordinator.
//! * `WatchEvents` streams membership events from the moment of the call, until the node
//!   leaves.
//! * `Drain` takes the node out of routing (it stays a member) or puts it back.
//! * `Stats` reports gossip traffic and drops by reason ([`mesh_core::MeshStats`]), routing
//!   decisions by outcome ([`mesh_route::RouterStats`]), the route layer's counts
//!   ([`mesh_route::layer::LayerStats`]), and for each peer how the calls forwarded to and from
//!   it ended ([`mesh_route::layer::RouteLayer::peer_stats`]) and how fresh its state is.
//!
//! `meshctl` (`src/bin/meshctl`, installed by `cargo install --path .`) is its command-line
//! client.

use std::{collections::BTreeMap, fmt, pin::Pin, sync::Arc, time::Duration};

use futures::Stream;
use mesh_core::{
    Departure, LocalStatus, Member, Membership, MeshEvent, MeshStats, NodeState, PeerStatus,
};
use mesh_proto::admin::v1::{
    DrainRequest, DrainResponse, GossipStats, ListMembersRequest, ListMembersResponse, MemberEvent,
    MemberInfo, NodeStateInfo, PeerStats, RoutingStats, StatsRequest, StatsResponse,
    WatchEventsRequest, mesh_admin_server,
};
use mesh_route::{
    Router,
    layer::{ForwardCounts, ForwardOutcome, RouteLayer},
};
use tokio::sync::broadcast;
use tonic::{Request, Response, Status};

use crate::Node;

/// `mesh.admin.v1.MeshAdmin` over one node.
///
/// Made from the membership alone ([`AdminService::new`]), `Stats` reports gossip only; give
/// it the node's router ([`AdminService::for_node`]) for routing decisions, the route layer
/// in front of the node's services ([`AdminService::route_layer`]) for forwarded calls, and
/// the server's own counters ([`AdminService::server_stats`]).
#[derive(Debug, Clone)]
pub struct AdminService {
    membership: Membership,
    router: Option<Router>,
    layer: Option<RouteLayer>,
    server_stats: Option<ServerStats>,
}

/// The server's own counters, read at each `Stats` call.
#[derive(Clone)]
struct ServerStats(Arc<dyn Fn() -> Vec<(String, u64)> + Send + Sync>);

impl fmt::Debug for ServerStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerStats")
    }
}

impl AdminService {
    /// Serves `membership`.
    pub fn new(membership: Membership) -> Self {
        Self {
            membership,
            router: None,
            layer: None,
            server_stats: None,
        }
    }

    /// Serves `node`: its membership and its router's decisions.
    pub fn for_node(node: &Node) -> Self {
        Self {
            membership: node.membership().clone(),
            router: Some(node.router().clone()),
            layer: None,
            server_stats: None,
        }
    }

    /// Reports what `layer` did with the node's calls (`Stats`).
    pub fn route_layer(mut self, layer: RouteLayer) -> Self {
        if self.router.is_none() {
            self.router = Some(layer.router().clone());
        }
        self.layer = Some(layer);
        self
    }

    /// Reports the server's own counters with `Stats` (`StatsResponse.server`; `meshctl stats`
    /// lists them): `read` is called at each `Stats` call and returns `(name, value)` pairs.
    pub fn server_stats(
        mut self,
        read: impl Fn() -> Vec<(String, u64)> + Send + Sync + 'static,
    ) -> Self {
        self.server_stats = Some(ServerStats(Arc::new(read)));
        self
    }

    /// The tonic server wrapper for this service.
    pub fn into_server(self) -> mesh_admin_server::MeshAdminServer<Self> {
        mesh_admin_server::MeshAdminServer::new(self)
    }
}

/// The lower-case name of a local status, as the admin API reports it.
pub fn status_name(status: LocalStatus) -> &'static str {
    match status {
        LocalStatus::Joining => "joining",
        LocalStatus::Active => "active",
        LocalStatus::Isolated => "isolated",
        LocalStatus::Defunct => "defunct",
        LocalStatus::Left => "left",
    }
}

/// The lower-case name of a live member's status.
fn peer_status_name(status: PeerStatus) -> &'static str {
    match status {
        PeerStatus::Alive => "alive",
        PeerStatus::Suspect => "suspect",
    }
}

/// The lower-case name of how a member departed.
fn departure_name(departure: Departure) -> &'static str {
    match departure {
        Departure::Failed => "failed",
        Departure::Left => "left",
        _ => "departed",
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn state_info(state: &NodeState) -> NodeStateInfo {
    NodeStateInfo {
        version: state.version,
        grpc_endpoint: state.grpc_endpoint.clone().unwrap_or_default(),
        pending: state.pending,
        max_concurrency: state.max_concurrency,
        draining: state.draining,
        tags: state.tags.clone().into_iter().collect(),
    }
}

fn member_info(member: &Member, coordinator: bool) -> MemberInfo {
    MemberInfo {
        node_id: member.node_id().to_string(),
        gossip_addr: member.identity().addr().to_string(),
        generation: member.identity().generation(),
        status: peer_status_name(member.status()).to_owned(),
        local: member.is_local(),
        state: member.state().map(|s| state_info(s)),
        state_age_ms: member.age().map_or(0, millis),
        status_age_ms: member.status_age().map(millis),
        coordinator,
    }
}

fn event_message(event: MeshEvent) -> MemberEvent {
    let mut message = MemberEvent::default();
    let mut identify = |kind: &str, id: &mesh_core::Identity| {
        message.kind = kind.to_owned();
        message.node_id = id.node_id().to_string();
        message.gossip_addr = id.addr().to_string();
        message.generation = id.generation();
    };
    match event {
        MeshEvent::Joined(id) => identify("joined", &id),
        MeshEvent::Suspect(id) => identify("suspect", &id),
        MeshEvent::Failed(id) => identify("failed", &id),
        MeshEvent::Left(id) => identify("left", &id),
        MeshEvent::Rejoined { previous, current } => {
            identify("rejoined", &current);
            message.previous_gossip_addr = previous.addr().to_string();
            message.previous_generation = previous.generation();
        }
        MeshEvent::Superseded { local, newer } => {
            identify("superseded", &newer);
            message.previous_gossip_addr = local.addr().to_string();
            message.previous_generation = local.generation();
        }
        MeshEvent::Updated(state) => {
            message.kind = "updated".to_owned();
            message.node_id = state.node_id.to_string();
            message.generation = state.generation;
            message.state = Some(state_info(&state));
        }
        MeshEvent::LocalStatus(status) => {
            message.kind = "local-status".to_owned();
            message.local_status = status_name(status).to_owned();
        }
        MeshEvent::CoordinatorChanged { previous, current } => {
            match &current {
                Some(current) => identify("coordinator", current),
                None => message.kind = "coordinator".to_owned(),
            }
            if let Some(previous) = previous {
                message.previous_node_id = previous.node_id().to_string();
                message.previous_gossip_addr = previous.addr().to_string();
                message.previous_generation = previous.generation();
            }
        }
        _ => message.kind = "other".to_owned(),
    }
    message
}

fn gossip_stats(stats: &MeshStats) -> GossipStats {
    let drops = [
        ("malformed", stats.dropped_malformed),
        ("unauthenticated", stats.dropped_unauthenticated),
        ("overload", stats.dropped_overload),
        ("foca_rejected", stats.foca_rejected),
        ("state_rejected", stats.states_rejected),
    ];
    GossipStats {
        datagrams_received: stats.datagrams_received,
        datagrams_sent: stats.datagrams_sent,
        bytes_received: stats.bytes_received,
        bytes_sent: stats.bytes_sent,
        send_failures: stats.send_failures + stats.seal_failures,
        drops: drops
            .into_iter()
            .map(|(reason, count)| (reason.to_owned(), count))
            .collect(),
        suspicions: stats.suspicions,
        flaps: stats.flaps,
        discovery_failures: stats.discovery_failures,
    }
}

fn outcome_counts(counts: &ForwardCounts) -> std::collections::HashMap<String, u64> {
    ForwardOutcome::ALL
        .iter()
        .map(|outcome| (outcome.name().to_owned(), counts.get(*outcome)))
        .collect()
}

impl AdminService {
    fn routing_stats(&self) -> RoutingStats {
        let mut routing = RoutingStats::default();
        if let Some(router) = &self.router {
            let stats = router.stats();
            routing.decisions = stats
                .outcomes()
                .into_iter()
                .map(|(outcome, count)| (outcome.to_owned(), count))
                .collect();
            routing.held = stats.held;
        }
        if let Some(layer) = &self.layer {
            let stats = layer.stats();
            routing.layer = true;
            routing.local = stats.local;
            routing.forwarded_in = stats.forwarded_in;
            routing.forwarded_out = stats.forwarded_out;
            routing.to_owner = stats.to_owner;
            routing.rerouted = stats.rerouted;
            routing.unreachable = stats.unreachable;
            routing.relays_broken = stats.relays_broken;
            routing.refused = stats.refused;
        }
        routing
    }

    fn peer_stats(&self) -> Vec<PeerStats> {
        let view = self.membership.view();
        // Every peer this node knows of, with its status and state age.
        let mut peers: BTreeMap<String, (&'static str, Option<u64>)> = BTreeMap::new();
        for peer in view.peers() {
            let age = peer.state().and(peer.age()).map(millis);
            peers.insert(
                peer.node_id().to_string(),
                (peer_status_name(peer.status()), age),
            );
        }
        for member in view.departed() {
            peers.insert(
                member.node_id().to_string(),
                (departure_name(member.departure()), None),
            );
        }
        let forwards = self
            .layer
            .as_ref()
            .map(RouteLayer::peer_stats)
            .unwrap_or_default();
        for node in forwards.keys() {
            peers.entry(node.to_string()).or_insert(("gone", None));
        }
        // The local node is not a peer.
        peers.remove(view.local().node_id().as_str());
        peers
            .into_iter()
            .map(|(node_id, (status, state_age_ms))| {
                let counts = mesh_core::NodeId::new(&node_id)
                    .ok()
                    .and_then(|id| forwards.get(&id).copied())
                    .unwrap_or_default();
                PeerStats {
                    status: status.to_owned(),
                    state_age_ms,
                    forwards_out: outcome_counts(&counts.outbound),
                    forwards_in: outcome_counts(&counts.inbound),
                    node_id,
                }
            })
            .collect()
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<MemberEvent, Status>> + Send>>;

#[tonic::async_trait]
impl mesh_admin_server::MeshAdmin for AdminService {
    async fn list_members(
        &self,
        _request: Request<ListMembersRequest>,
    ) -> Result<Response<ListMembersResponse>, Status> {
        let view = self.membership.view();
        let coordinator = view.coordinator().map(|m| m.identity().clone());
        let is_coordinator = |member: &Member| coordinator.as_ref() == Some(member.identity());
        let mut members: Vec<MemberInfo> = view
            .members()
            .map(|m| member_info(m, is_coordinator(m)))
            .collect();
        members.extend(view.departed().iter().map(|m| MemberInfo {
            node_id: m.node_id().to_string(),
            gossip_addr: m.identity().addr().to_string(),
            generation: m.identity().generation(),
            status: departure_name(m.departure()).to_owned(),
            status_age_ms: Some(millis(m.age())),
            ..MemberInfo::default()
        }));
        members.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        Ok(Response::new(ListMembersResponse {
            local_node_id: view.local().node_id().to_string(),
            local_status: status_name(view.status()).to_owned(),
            members,
            coordinator: coordinator
                .map(|id| id.node_id().to_string())
                .unwrap_or_default(),
        }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        _request: Request<WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let events = self.membership.events();
        // The stream ends after the node's own departure, so a watcher never holds up a
        // graceful shutdown.
        let stream = futures::stream::unfold((events, false), |(mut events, ended)| async move {
            if ended {
                return None;
            }
            match events.recv().await {
                Ok(event) => {
                    let last = matches!(
                        event,
                        MeshEvent::LocalStatus(LocalStatus::Left | LocalStatus::Defunct)
                    );
                    Some((Ok(event_message(event)), (events, last)))
                }
                // A gap must not pass silently: the client re-lists and watches again.
                Err(broadcast::error::RecvError::Lagged(missed)) => Some((
                    Err(Status::data_loss(format!(
                        "the watcher fell {missed} events behind; list members and watch again"
                    ))),
                    (events, false),
                )),
                Err(broadcast::error::RecvError::Closed) => None,
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn drain(
        &self,
        request: Request<DrainRequest>,
    ) -> Result<Response<DrainResponse>, Status> {
        let draining = request.get_ref().draining;
        self.membership
            .set_draining(draining)
            .map_err(|error| Status::failed_precondition(error.to_string()))?;
        Ok(Response::new(DrainResponse { draining }))
    }

    async fn stats(
        &self,
        _request: Request<StatsRequest>,
    ) -> Result<Response<StatsResponse>, Status> {
        Ok(Response::new(StatsResponse {
            local_node_id: self.membership.node_id().to_string(),
            gossip: Some(gossip_stats(&self.membership.stats())),
            routing: Some(self.routing_stats()),
            peers: self.peer_stats(),
            server: self
                .server_stats
                .as_ref()
                .map(|read| (read.0)().into_iter().collect())
                .unwrap_or_default(),
        }))
    }
}
