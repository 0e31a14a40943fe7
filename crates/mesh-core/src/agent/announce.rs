//! Announcing and leaving: how a node gets into a cluster, back into it, and out of it.
//!
//! A node announces itself (foca's `announce`, SWIM's join) to its seeds and to every address
//! the discovery source returns: at start, and again every
//! [`Timing::rejoin_interval`](crate::Timing::rejoin_interval) while it is joining or isolated,
//! which is what merges the sides of a healed partition. Discovery answers and `join` calls
//! announce only to addresses that are not members yet. A node that pushes us its state
//! without being known to us gets an announce too (an *introduction*, at most one per address
//! and rejoin interval), so one-sided knowledge after a burst of joins does not wait for a full
//! probe round.
//!
//! Leaving (memberlist's graceful leave) marks the node draining, publishes that, tells every
//! member with a leave notice (they report it as left, not failed), and repeats the notices once
//! a little later so a single lost datagram is harmless.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    time::Duration,
};

use foca::{Codec, PostcardCodec};
use tokio::time::Instant;

use super::{context::Context, timers::Tick};
use crate::{Identity, LocalStatus, NodeId, transport::Transport, wire::Kind};

/// The addresses a node announces to, and whom it introduced itself to lately.
#[derive(Debug)]
pub(crate) struct Announcer {
    /// The address our socket is bound to (never announced to, like our advertised one).
    local_addr: SocketAddr,
    seeds: Vec<SocketAddr>,
    discovered: Vec<SocketAddr>,
    /// When we last introduced ourselves to an address that pushed us a state.
    introduced: HashMap<SocketAddr, Instant>,
}

impl Announcer {
    pub(crate) fn new(local_addr: SocketAddr, seeds: Vec<SocketAddr>) -> Self {
        Self {
            local_addr,
            seeds,
            discovered: Vec::new(),
            introduced: HashMap::new(),
        }
    }

    /// Remembers more seeds (each once).
    pub(crate) fn add_seeds(&mut self, addrs: impl IntoIterator<Item = SocketAddr>) {
        for addr in addrs {
            if !self.seeds.contains(&addr) {
                self.seeds.push(addr);
            }
        }
    }

    /// The discovery source's latest answer.
    pub(crate) fn set_discovered(&mut self, addrs: Vec<SocketAddr>) {
        self.discovered = addrs;
    }

    /// Seeds and discovered addresses, sorted and without repeats, never our own (`own` is our
    /// advertised address); with `only_strangers`, not those of `members` either.
    pub(crate) fn targets(
        &self,
        own: SocketAddr,
        members: &HashSet<SocketAddr>,
        only_strangers: bool,
    ) -> Vec<SocketAddr> {
        let mut targets: Vec<SocketAddr> = self
            .seeds
            .iter()
            .chain(self.discovered.iter())
            .copied()
            .filter(|a| *a != own && *a != self.local_addr)
            .filter(|a| !(only_strangers && members.contains(a)))
            .collect();
        targets.sort_unstable();
        targets.dedup();
        targets
    }

    /// Whether to introduce ourselves to `from` at `now`: not if we did so within `interval`.
    /// A yes is remembered.
    pub(crate) fn should_introduce(
        &mut self,
        from: SocketAddr,
        now: Instant,
        interval: Duration,
    ) -> bool {
        let recently = self
            .introduced
            .get(&from)
            .is_some_and(|at| now.duration_since(*at) < interval);
        if !recently {
            self.introduced.insert(from, now);
        }
        !recently
    }

    /// Forgets introductions older than `interval`.
    pub(crate) fn forget_introductions(&mut self, now: Instant, interval: Duration) {
        self.introduced
            .retain(|_, at| now.duration_since(*at) < interval);
    }
}

/// A stand-in identity for announcing to an address whose node we do not know yet: foca
/// accepts an announce addressed to any identity with the receiver's address.
pub(crate) fn announce_target(addr: SocketAddr) -> Identity {
    Identity::new(NodeId::placeholder(), addr, 0)
}

/// The task's steps: announcing and leaving through foca and the socket.
impl Announcer {
    /// Announces to seeds and discovered addresses, unless we left; with `only_strangers`,
    /// skips addresses of live members.
    pub(super) fn announce_to_known<T: Transport>(
        &mut self,
        cx: &mut Context<T>,
        only_strangers: bool,
    ) {
        if matches!(cx.status(), LocalStatus::Left) {
            return;
        }
        let own = cx.foca.identity().addr();
        let members: HashSet<SocketAddr> = cx.foca.iter_members().map(|m| m.id().addr()).collect();
        for addr in self.targets(own, &members, only_strangers) {
            if let Err(error) = cx
                .foca
                .announce(announce_target(addr), cx.io.runtime(cx.now))
            {
                tracing::debug!(%error, %addr, "announce failed");
            }
        }
    }

    /// A node we do not know (`node_id` is not a live member's) pushed us its state from
    /// `from`, so it knows us: announce ourselves to it so its reply teaches us who it is.
    /// Without this, knowledge that is one-sided after a burst of joins (gossip
    /// retransmissions exhausted) waits for the other node to probe us, which can take a full
    /// probe round (n probe periods): 90 s in a 100-node cold start. Called whether or not the
    /// state was new to us: the owner's join sync often arrives after gossip brought the same
    /// state (a 1,000-node cold start waited 3 s for such a member).
    pub(super) fn introduce_to_stranger<T: Transport>(
        &mut self,
        cx: &mut Context<T>,
        node_id: &NodeId,
        from: SocketAddr,
    ) {
        if *node_id == *cx.foca.identity().node_id() {
            return;
        }
        let interval = cx.timing.rejoin_interval;
        if !self.should_introduce(from, cx.now, interval) {
            return;
        }
        if let Err(error) = cx
            .foca
            .announce(announce_target(from), cx.io.runtime(cx.now))
        {
            tracing::debug!(%error, %from, "introduction failed");
        }
    }

    /// A foca datagram addressed to an earlier life of ours: its sender still probes the node
    /// we were before a restart at this address, and foca drops what is not addressed to our
    /// current identity. Announce ourselves to the sender (at most once per rejoin interval),
    /// so it learns the new life at once — the restart is a rename, not a failure — instead of
    /// when its next state refresh happens to reach us; a node without seeds has no other way
    /// back in.
    pub(super) fn answer_for_an_earlier_life<T: Transport>(
        &mut self,
        cx: &mut Context<T>,
        packet: &[u8],
        from: SocketAddr,
    ) {
        let Ok(header) = Codec::<Identity>::decode_header(&mut PostcardCodec, &mut &packet[..])
        else {
            return;
        };
        let own = cx.foca.identity();
        if header.dst.node_id() != own.node_id()
            || header.dst.generation() >= own.generation()
            || header.src.addr() != from
        {
            return;
        }
        let interval = cx.timing.rejoin_interval;
        if !self.should_introduce(from, cx.now, interval) {
            return;
        }
        if let Err(error) = cx.foca.announce(header.src, cx.io.runtime(cx.now)) {
            tracing::debug!(%error, %from, "answering for an earlier life failed");
        }
    }

    /// Leaves the cluster once our draining state is published: tells every member, leaves
    /// foca, and schedules the second round of notices, after which the task stops.
    pub(super) fn leave_cluster<T: Transport>(&mut self, cx: &mut Context<T>) {
        self.send_leave_notices(cx);
        if let Err(error) = cx.foca.leave_cluster(cx.io.runtime(cx.now)) {
            tracing::debug!(%error, "foca leave failed");
        }
        cx.set_status(LocalStatus::Left);
        // A second round shortly after makes a single lost datagram harmless.
        let linger = cx.timing.probe_rtt.min(cx.timing.leave_timeout / 2);
        cx.io.timers.schedule(cx.now + linger, Tick::FinishLeave);
    }

    /// Tells every member we are leaving.
    pub(super) fn send_leave_notices<T: Transport>(&mut self, cx: &mut Context<T>) {
        let Ok(body) = postcard::to_allocvec(cx.foca.identity()) else {
            return;
        };
        for addr in cx.member_addrs() {
            cx.io.out.send(Kind::Leave, &body, addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn targets_are_seeds_and_discoveries_without_ourselves_or_repeats() {
        let mut announcer = Announcer::new(addr(1), vec![addr(5), addr(3), addr(1)]);
        announcer.add_seeds([addr(3), addr(4)]);
        announcer.set_discovered(vec![addr(4), addr(2), addr(9)]);
        let members: HashSet<SocketAddr> = [addr(3), addr(4)].into();
        // Neither the bound address (1) nor the advertised one (9).
        assert_eq!(
            announcer.targets(addr(9), &members, false),
            [addr(2), addr(3), addr(4), addr(5)]
        );
        assert_eq!(
            announcer.targets(addr(9), &members, true),
            [addr(2), addr(5)]
        );
        // A new discovery answer replaces the old one; seeds stay.
        announcer.set_discovered(vec![]);
        assert_eq!(
            announcer.targets(addr(9), &HashSet::new(), false),
            [addr(3), addr(4), addr(5)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn introductions_are_rate_limited_per_address() {
        let mut announcer = Announcer::new(addr(1), vec![]);
        let interval = Duration::from_secs(2);
        let t0 = Instant::now();
        assert!(announcer.should_introduce(addr(7), t0, interval));
        assert!(!announcer.should_introduce(addr(7), t0 + Duration::from_secs(1), interval));
        assert!(announcer.should_introduce(addr(8), t0 + Duration::from_secs(1), interval));
        assert!(announcer.should_introduce(addr(7), t0 + interval, interval));
        // Forgotten ones are welcome again at once.
        let t1 = t0 + Duration::from_secs(3);
        assert!(announcer.should_introduce(addr(9), t1, interval));
        assert_eq!(announcer.introduced.len(), 3);
        announcer.forget_introductions(t1 + Duration::from_millis(1500), interval);
        assert_eq!(announcer.introduced.keys().collect::<Vec<_>>(), [&addr(9)]);
    }

    #[test]
    fn an_announce_target_is_addressed_by_address_alone() {
        let target = announce_target(addr(4));
        assert_eq!(target.addr(), addr(4));
        assert_eq!(target.generation(), 0);
    }
}
