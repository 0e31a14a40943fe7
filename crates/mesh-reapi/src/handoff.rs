//! Handoff: when the placement members change, every replica copies what it holds to the
//! digests' new owners.
//!
//! Rendezvous placement ([`crate::placement`]) moves little when the membership changes: a
//! replica that leaves gives each digest it owned one new owner, one that joins takes over a
//! share. Each replica runs one background task that waits until the placement members have
//! stayed the same for [`ReplicationConfig::handoff_delay`](crate::ReplicationConfig), then
//! walks its CAS and action cache once:
//!
//! * for every blob it holds, the owners under the new placement that were not owners under
//!   the placement of its last completed pass (all owners on the first pass after start) are
//!   asked what they lack (`FindMissingBlobs`, batched per owner) and sent it — so a replica
//!   that comes back on its data directory receives nothing it already holds;
//! * every action result it holds is sent to the new owners of its action.
//!
//! Every replica holding a copy does this, so a blob reaches its new owner as long as one copy
//! survived; several replicas may send the same blob at once (the receiver keeps one). The
//! pass is what BuildBuddy calls hinted handoff, driven here by the membership instead of a
//! hint log. While it runs, lookups also ask the former owners ([`crate::cluster`]).
//!
//! A replica that drains to come back (a rolling update) sends nothing: it owns its blobs again
//! when it returns. One that leaves for good ([`crate::DrainConfig::hand_off`]) sends
//! everything it holds to every owner without it that lacks it, before it goes.

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures::{StreamExt as _, stream::FuturesUnordered};
use mesh_core::NodeId;
use tokio::task::JoinHandle;
use tonic::metadata::MetadataMap;

use crate::{ClusterCas, Digest, placement::Ring};

/// Digests per push during handoff (each push first asks the owner what it lacks).
const HANDOFF_BATCH: usize = 4096;
/// Owners sent to at once during handoff.
const HANDOFF_PARALLEL: usize = 4;

/// Starts the handoff task of `cluster`; abort the handle to stop it.
pub(crate) fn spawn(cluster: ClusterCas) -> JoinHandle<()> {
    tokio::spawn(run(cluster))
}

async fn run(cluster: ClusterCas) {
    let delay = cluster.replication().handoff_delay;
    // The first pass compares against no placement: every owner is new.
    let mut done: Option<Arc<Ring>> = None;
    loop {
        // Wait for a placement the last pass did not cover, then for it to settle.
        let ring = loop {
            let current = cluster.rings().current();
            if done.as_deref() != Some(&*current) {
                break current;
            }
            if !placement_changes(&cluster, &current).await {
                return;
            }
        };
        tokio::time::sleep(delay).await;
        if *cluster.rings().current() != *ring {
            continue;
        }
        if ring.len() <= 1 && done.is_none() {
            // Alone: nobody to hand anything to yet; the first pass waits for the first peer.
            cluster.rings().handed_off(ring.clone());
            if !placement_changes(&cluster, &ring).await {
                return;
            }
            continue;
        }
        let draining = cluster
            .node()
            .view()
            .local()
            .state()
            .is_some_and(|state| state.draining);
        if draining && !cluster.leaving() {
            // Draining to come back (a restart): it owns its blobs again when it returns, and
            // everything it holds has another owner meanwhile. Nothing to send.
            if !placement_changes(&cluster, &ring).await {
                return;
            }
            continue;
        }
        // Leaving for good: every owner is asked what it lacks, not only the new ones (an
        // owner may have evicted its copy; this may be the last one).
        let before = if draining { None } else { done.as_deref() };
        if pass(&cluster, before, &ring).await {
            cluster.counters().handoff_pass();
            cluster.rings().handed_off(ring.clone());
            done = Some(ring);
        } else {
            // A new owner could not be reached: try the whole pass again a little later
            // (what the owners already hold is asked about, not sent again).
            tokio::time::sleep(delay.max(Duration::from_secs(1)) * 5).await;
        }
    }
}

/// Waits until the placement members differ from `ring`; `false` when they never will: the
/// node left the cluster, or its membership task stopped (then `wait_until` returns at once,
/// every time, and waiting again would spin).
async fn placement_changes(cluster: &ClusterCas, ring: &Ring) -> bool {
    let view = cluster
        .node()
        .membership()
        .wait_until(|view| Ring::of(view) != *ring)
        .await;
    view.status() != mesh_core::LocalStatus::Left && Ring::of(&view) != *ring
}

/// One handoff pass from `before` (the placement of the last pass) to `now`; whether every
/// new owner got what it lacked.
async fn pass(cluster: &ClusterCas, before: Option<&Ring>, now: &Ring) -> bool {
    let local = cluster.node().node_id().clone();
    let factor = cluster.replication().factor;
    let new_owners = |digest: &Digest| -> Vec<NodeId> {
        let previous: Vec<&NodeId> = before
            .map(|ring| ring.owners(digest, factor))
            .unwrap_or_default();
        now.owners(digest, factor)
            .into_iter()
            .filter(|node| **node != local && !previous.contains(node))
            .cloned()
            .collect()
    };
    let mut blobs: HashMap<NodeId, Vec<Digest>> = HashMap::new();
    for digest in cluster.local().digests() {
        if digest.size() == 0 {
            continue;
        }
        for node in new_owners(&digest) {
            blobs.entry(node).or_default().push(digest);
        }
    }
    let mut results: HashMap<NodeId, Vec<Digest>> = HashMap::new();
    for action in cluster.local_action_cache().actions() {
        for node in new_owners(&action) {
            results.entry(node).or_default().push(action);
        }
    }
    if blobs.is_empty() && results.is_empty() {
        return true;
    }
    tracing::info!(
        owners = blobs.len().max(results.len()),
        blobs = blobs.values().map(Vec::len).sum::<usize>(),
        results = results.values().map(Vec::len).sum::<usize>(),
        "handing blobs and results to their new owners"
    );
    let metadata = MetadataMap::new();
    let peers = cluster.peers(&metadata);
    let mut sends: FuturesUnordered<_> = FuturesUnordered::new();
    let mut queue: Vec<(NodeId, Vec<Digest>)> = blobs.into_iter().collect();
    let mut complete = true;
    let send = |node: NodeId, digests: Vec<Digest>| async move {
        let mut sent = 0u64;
        let mut bytes = 0u64;
        let mut complete = true;
        for batch in digests.chunks(HANDOFF_BATCH) {
            match peers.push(&node, batch, cluster.local()).await {
                Ok(pushed) => {
                    sent += pushed.sent;
                    bytes += pushed.bytes;
                }
                Err(error) => {
                    tracing::warn!(peer = %node, %error, "handoff to a new owner failed; the pass is retried");
                    complete = false;
                    break;
                }
            }
        }
        (sent, bytes, complete)
    };
    while !queue.is_empty() || !sends.is_empty() {
        while sends.len() < HANDOFF_PARALLEL {
            let Some((node, digests)) = queue.pop() else {
                break;
            };
            sends.push(send(node, digests));
        }
        if let Some((sent, bytes, sent_all)) = sends.next().await {
            cluster.counters().handed_off(sent, bytes);
            complete &= sent_all;
        }
    }
    for (node, actions) in results {
        for action in actions {
            let Ok(Some(result)) = cluster.local_action_cache().get(&action).await else {
                continue;
            };
            if let Err(error) = peers.put_action_result(&node, &action, &result).await {
                tracing::warn!(peer = %node, %error, "handing an action result to its new owner failed");
                complete = false;
                break;
            }
        }
    }
    complete
}
