//! The admin gRPC service every node serves: list members, watch events, drain.

use std::pin::Pin;

use futures::Stream;
use mesh_core::{LocalStatus, Member, Membership, MeshEvent, NodeState, PeerStatus};
use mesh_proto::admin::v1::{
    DrainRequest, DrainResponse, ListMembersRequest, ListMembersResponse, MemberEvent, MemberInfo,
    NodeStateInfo, WatchEventsRequest, mesh_admin_server,
};
use tokio::sync::broadcast;
use tonic::{Request, Response, Status};

/// `mesh.admin.v1.MeshAdmin` over one node's membership.
#[derive(Debug, Clone)]
pub struct AdminService {
    membership: Membership,
}

impl AdminService {
    /// Serves `membership`.
    pub fn new(membership: Membership) -> Self {
        Self { membership }
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

fn member_info(member: &Member) -> MemberInfo {
    MemberInfo {
        node_id: member.node_id().to_string(),
        gossip_addr: member.identity().addr().to_string(),
        generation: member.identity().generation(),
        status: match member.status() {
            PeerStatus::Alive => "alive",
            PeerStatus::Suspect => "suspect",
        }
        .to_owned(),
        local: member.is_local(),
        state: member.state().map(|s| state_info(s)),
        state_age_ms: member
            .age()
            .map_or(0, |age| u64::try_from(age.as_millis()).unwrap_or(u64::MAX)),
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
        _ => message.kind = "other".to_owned(),
    }
    message
}

type EventStream = Pin<Box<dyn Stream<Item = Result<MemberEvent, Status>> + Send>>;

#[tonic::async_trait]
impl mesh_admin_server::MeshAdmin for AdminService {
    async fn list_members(
        &self,
        _request: Request<ListMembersRequest>,
    ) -> Result<Response<ListMembersResponse>, Status> {
        let view = self.membership.view();
        let mut members: Vec<MemberInfo> = view.members().map(member_info).collect();
        members.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        Ok(Response::new(ListMembersResponse {
            local_node_id: view.local().node_id().to_string(),
            local_status: status_name(view.status()).to_owned(),
            members,
        }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        _request: Request<WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let events = self.membership.events();
        let stream = futures::stream::unfold(events, |mut events| async move {
            match events.recv().await {
                Ok(event) => Some((Ok(event_message(event)), events)),
                // A gap must not pass silently: the client re-lists and watches again.
                Err(broadcast::error::RecvError::Lagged(missed)) => Some((
                    Err(Status::data_loss(format!(
                        "the watcher fell {missed} events behind; list members and watch again"
                    ))),
                    events,
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
}
