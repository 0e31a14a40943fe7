//! Identical actions in flight anywhere run once: claims at the action's owner.
//!
//! Each action has one owner among the replicas: the first of the rendezvous ranking
//! ([`crate::placement`]) of its [`crate::action_key`], the placement its cached result also
//! gets. The owner keeps the cluster's table of actions in flight, `(instance, action digest)
//! → operation name`. A
//! replica about to run an action — after merging with an identical one in flight on itself
//! ([`crate::scheduler`]) — claims it at the owner first (`mesh.reapi.v1.Claims/Claim`):
//!
//! * granted (no entry, or the entry's operation belongs to a replica that is no longer a
//!   member, or the caller reports it gone): the caller runs the action and releases the
//!   claim once its outputs and result are placed;
//! * held: the caller follows the named operation on the replica that runs it
//!   (`WaitExecution`) and its own callers get that outcome.
//!
//! A released claim stays for [`FINISHED_CLAIM_TTL`] as *finished*: a caller that raced with
//! the end of the run (its `Execute` passed the cache check just before the result was stored)
//! follows the finished operation and gets its outcome at once, rather than running the action
//! a second time; a caller that asked to skip the cache is granted a new run.
//!
//! The table is advice, never a lock: an owner that cannot be reached means the action runs
//! here; an owner that dies takes its table with it, and the next `Execute` of each action
//! claims at the new owner (at most one duplicate run per action); a claim whose release was
//! lost is replaced as soon as a follower finds its operation gone. REAPI allows a duplicate
//! run; it never allows a lost or hung operation, and no path here waits on the owner for
//! longer than one bounded call. Buildfarm merges actions with `SET NX` in Redis and
//! BuildBuddy through Redis as well; here the membership places the table.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh_core::NodeId;
use mesh_proto::reapi::v1::{
    ClaimRequest, ClaimResponse, ReleaseRequest, ReleaseResponse,
    claims_server::{Claims, ClaimsServer},
};
use mesh_route::OperationId;
use tokio::time::Instant;
use tonic::{Request, Response, Status, metadata::MetadataMap};

use crate::{ClusterCas, Digest, error::invalid};

/// The most claims an owner holds; beyond it the oldest are dropped (a dropped claim costs at
/// most a duplicate run).
const MAX_CLAIMS: usize = 1 << 20;

/// How long a finished claim is followed by callers that accept a finished outcome.
pub const FINISHED_CLAIM_TTL: Duration = Duration::from_secs(60);

/// What a claim decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Claimed {
    /// Run the action here.
    Run,
    /// Another operation runs it: follow that one.
    Follow(String),
}

/// The claims this replica holds as an owner.
#[derive(Debug, Clone, Default)]
pub(crate) struct ClaimTable {
    inner: Arc<Mutex<Table>>,
}

#[derive(Debug, Default)]
struct Table {
    by_action: HashMap<(String, Digest), Held>,
    next: u64,
}

#[derive(Debug)]
struct Held {
    /// Order of arrival, to drop the oldest first when full.
    seq: u64,
    operation: String,
    /// When its run ended (its result placed), if it did.
    finished: Option<Instant>,
}

impl ClaimTable {
    /// Grants `operation` the claim on `(instance, action)`, or returns the operation that
    /// holds it. A claim held by `stale`, or by a node `is_member` rejects, is replaced; so is
    /// a finished one, unless `accept_finished` and it finished within [`FINISHED_CLAIM_TTL`].
    fn claim(
        &self,
        instance: &str,
        action: Digest,
        operation: &str,
        stale: &str,
        accept_finished: bool,
        is_member: impl Fn(&NodeId) -> bool,
    ) -> String {
        let mut table = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let key = (instance.to_owned(), action);
        if let Some(held) = table.by_action.get(&key) {
            let alive = held
                .operation
                .parse::<OperationId>()
                .is_ok_and(|id| is_member(id.node()));
            let current = match held.finished {
                None => true,
                Some(at) => accept_finished && at.elapsed() < FINISHED_CLAIM_TTL,
            };
            if alive && current && held.operation != stale {
                return held.operation.clone();
            }
        }
        if table.by_action.len() >= MAX_CLAIMS {
            // Forget finished claims past their time, then, if still full, the oldest.
            table.by_action.retain(|_, held| {
                held.finished
                    .is_none_or(|at| at.elapsed() < FINISHED_CLAIM_TTL)
            });
            if table.by_action.len() >= MAX_CLAIMS
                && let Some(oldest) = table
                    .by_action
                    .iter()
                    .min_by_key(|(_, held)| held.seq)
                    .map(|(key, _)| key.clone())
            {
                table.by_action.remove(&oldest);
            }
        }
        table.next += 1;
        let seq = table.next;
        table.by_action.insert(
            key,
            Held {
                seq,
                operation: operation.to_owned(),
                finished: None,
            },
        );
        operation.to_owned()
    }

    /// Ends the claim on `(instance, action)` if `operation` holds it: kept as finished if
    /// its result was `cached`, dropped otherwise.
    fn release(&self, instance: &str, action: Digest, operation: &str, cached: bool) {
        let mut table = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let key = (instance.to_owned(), action);
        if table
            .by_action
            .get(&key)
            .is_some_and(|held| held.operation == operation)
        {
            if cached {
                if let Some(held) = table.by_action.get_mut(&key) {
                    held.finished = Some(Instant::now());
                }
            } else {
                table.by_action.remove(&key);
            }
        }
    }

    /// Claims held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_action
            .len()
    }
}

/// Claims an action for this replica's `operation` at the action's owner (itself, or a peer
/// asked with one bounded call). Any failure to reach the owner means: run it here.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn claim(
    cluster: &ClusterCas,
    table: &ClaimTable,
    instance: &str,
    action: Digest,
    operation: &str,
    stale: &str,
    accept_finished: bool,
    metadata: &MetadataMap,
) -> Claimed {
    let Some(owner) = cluster
        .owners(&crate::action_key(instance, &action))
        .into_iter()
        .next()
    else {
        return Claimed::Run;
    };
    let holder = if &owner == cluster.node().node_id() {
        table.claim(
            instance,
            action,
            operation,
            stale,
            accept_finished,
            |node| is_member(cluster, node),
        )
    } else {
        let request = ClaimRequest {
            instance_name: instance.to_owned(),
            action_digest: action.to_string(),
            operation: operation.to_owned(),
            stale_operation: stale.to_owned(),
            accept_finished,
        };
        match cluster.peers(metadata).claim(&owner, request).await {
            Ok(holder) => holder,
            Err(error) => {
                tracing::info!(%action, %owner, %error, "the action's owner could not be asked; running it here");
                return Claimed::Run;
            }
        }
    };
    if holder == operation {
        Claimed::Run
    } else {
        Claimed::Follow(holder)
    }
}

/// Ends this replica's claim on an action; `cached` says whether its result was cached
/// (best effort: a lost release is replaced when a follower finds the operation gone).
pub(crate) async fn release(
    cluster: &ClusterCas,
    table: &ClaimTable,
    instance: &str,
    action: Digest,
    operation: &str,
    cached: bool,
) {
    let Some(owner) = cluster
        .owners(&crate::action_key(instance, &action))
        .into_iter()
        .next()
    else {
        return;
    };
    if &owner == cluster.node().node_id() {
        table.release(instance, action, operation, cached);
        return;
    }
    let request = ReleaseRequest {
        instance_name: instance.to_owned(),
        action_digest: action.to_string(),
        operation: operation.to_owned(),
        cached,
    };
    let metadata = MetadataMap::new();
    if let Err(error) = cluster.peers(&metadata).release(&owner, request).await {
        tracing::debug!(%action, %owner, %error, "releasing a claim failed");
    }
}

fn is_member(cluster: &ClusterCas, node: &NodeId) -> bool {
    node == cluster.node().node_id() || cluster.node().view().get(node.as_str()).is_some()
}

/// The `mesh.reapi.v1.Claims` service: the claim table of the actions this replica owns.
#[derive(Debug, Clone)]
pub struct ClaimsService {
    cluster: ClusterCas,
    table: ClaimTable,
}

impl ClaimsService {
    pub(crate) fn new(cluster: ClusterCas, table: ClaimTable) -> Self {
        Self { cluster, table }
    }

    /// The tonic service.
    pub fn into_server(self) -> ClaimsServer<Self> {
        ClaimsServer::new(self)
    }
}

fn parse_action(value: &str) -> Result<Digest, Status> {
    value.parse::<Digest>().map_err(|error| {
        invalid(format!(
            "action_digest {:?} is not `{{hash}}/{{size}}`: {error}",
            crate::digest::abbreviate(value)
        ))
    })
}

#[tonic::async_trait]
impl Claims for ClaimsService {
    async fn claim(
        &self,
        request: Request<ClaimRequest>,
    ) -> Result<Response<ClaimResponse>, Status> {
        let request = request.into_inner();
        let action = parse_action(&request.action_digest)?;
        request.operation.parse::<OperationId>().map_err(invalid)?;
        let operation = self.table.claim(
            &request.instance_name,
            action,
            &request.operation,
            &request.stale_operation,
            request.accept_finished,
            |node| is_member(&self.cluster, node),
        );
        Ok(Response::new(ClaimResponse { operation }))
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        let request = request.into_inner();
        let action = parse_action(&request.action_digest)?;
        self.table.release(
            &request.instance_name,
            action,
            &request.operation,
            request.cached,
        );
        Ok(Response::new(ReleaseResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(node: &str) -> String {
        OperationId::new(NodeId::new(node).unwrap()).to_string()
    }

    #[test]
    fn the_first_claim_wins_and_a_finished_one_is_followed_only_by_those_who_accept_it() {
        let table = ClaimTable::default();
        let action = Digest::of(b"action");
        let (a, b, c) = (op("r0"), op("r1"), op("r2"));
        assert_eq!(table.claim("", action, &a, "", true, |_| true), a);
        assert_eq!(
            table.claim("", action, &b, "", true, |_| true),
            a,
            "held by a"
        );
        assert_eq!(
            table.claim("", action, &b, "", false, |_| true),
            a,
            "running: always followed"
        );
        assert_eq!(
            table.claim("other", action, &b, "", true, |_| true),
            b,
            "instances are apart"
        );
        table.release("", action, &b, true);
        assert_eq!(
            table.claim("", action, &b, "", true, |_| true),
            a,
            "only the holder releases"
        );
        table.release("", action, &a, true);
        assert_eq!(
            table.claim("", action, &b, "", true, |_| true),
            a,
            "finished a moment ago"
        );
        assert_eq!(
            table.claim("", action, &c, "", false, |_| true),
            c,
            "skip_cache_lookup runs again"
        );
        assert_eq!(table.len(), 2);
        // A run whose result was not cached (it failed, or do_not_cache) is not followed.
        table.release("", action, &c, false);
        assert_eq!(table.claim("", action, &a, "", true, |_| true), a);
    }

    #[tokio::test(start_paused = true)]
    async fn a_finished_claim_is_followed_only_for_a_while() {
        let table = ClaimTable::default();
        let action = Digest::of(b"action");
        let (a, b) = (op("r0"), op("r1"));
        table.claim("", action, &a, "", true, |_| true);
        table.release("", action, &a, true);
        tokio::time::advance(FINISHED_CLAIM_TTL + Duration::from_millis(1)).await;
        assert_eq!(table.claim("", action, &b, "", true, |_| true), b);
    }

    #[test]
    fn claims_of_departed_or_reported_gone_operations_are_replaced() {
        let table = ClaimTable::default();
        let action = Digest::of(b"action");
        let (a, b, c) = (op("r0"), op("r1"), op("r2"));
        table.claim("", action, &a, "", true, |_| true);
        assert_eq!(
            table.claim("", action, &b, "", true, |node| node.as_str() != "r0"),
            b,
            "r0 is no longer a member"
        );
        assert_eq!(
            table.claim("", action, &c, &b, true, |_| true),
            c,
            "b reported gone"
        );
        assert_eq!(
            table.claim("", action, &a, &b, true, |_| true),
            c,
            "a stale report of b is not c"
        );
    }
}
