//! Timing presets and how they map onto foca's SWIM configuration.

use std::{
    num::{NonZeroU8, NonZeroU32, NonZeroUsize},
    time::Duration,
};

/// Every interval the mesh runs on. Start from a preset ([`Timing::lan`], [`Timing::wan`],
/// [`Timing::local`]) and adjust fields as needed; all nodes of a cluster should agree.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Timing {
    /// How often each node probes one member (SWIM protocol period).
    pub probe_period: Duration,
    /// How long a direct probe waits for its ack before asking others to probe indirectly.
    /// Must be shorter than `probe_period`.
    pub probe_rtt: Duration,
    /// The nominal suspicion timeout is
    /// `suspicion_multiplier × max(1, log10(cluster size) − 1) × probe_period`: the timeout of
    /// a suspicion that independent witnesses confirmed (Lifeguard's dynamic suspicion, see
    /// `suspicion_max_multiplier`), counted from when the suspect is first told, which is
    /// before the probe period ends. memberlist multiplies by `log10(cluster size)`, because
    /// there a refutation travels by gossip. Here only the suspecting node can declare the
    /// suspect down, it tells the suspect directly, again every half probe timeout, and the
    /// suspect answers it directly, which takes no longer in a larger cluster; only the rare
    /// refutation that still has to come by gossip (under 1% of suspicions at 30% loss) needs
    /// time that grows with the cluster. So the timeout stays at its floor up to 100 members
    /// and doubles at 1,000 (BENCHMARKS.md: no false failure at 30% loss at 10, 100 and 1,000
    /// nodes, where a constant 1.5 s declared two healthy nodes down in a minute).
    pub suspicion_multiplier: f64,
    /// An unconfirmed suspicion waits `suspicion_max_multiplier` times the nominal timeout;
    /// each confirmation shrinks it, down to the nominal timeout after
    /// `suspicion_confirmations` of them (Lifeguard; memberlist's `SuspicionMaxTimeoutMult`,
    /// 6). At least 1 (1: no dynamic suspicion).
    pub suspicion_max_multiplier: f64,
    /// Independent confirmations after which a suspicion times out at the nominal timeout
    /// (memberlist: `SuspicionMult − 2`). Also the number of random members asked to check
    /// the suspect (witnesses). 0 turns confirmations off: the nominal timeout applies from
    /// the start.
    pub suspicion_confirmations: u32,
    /// Lifeguard's local health awareness: the most this node's probe period and probe
    /// timeout are stretched (`1 +` the health score, which grows with failed probes and
    /// refuted suspicions of this node and shrinks with successful probes). memberlist's
    /// `AwarenessMaxMultiplier`, 8. 0 turns it off.
    pub max_health_multiplier: u8,
    /// How often membership updates are gossiped, and to how many members, besides
    /// piggybacking on probes.
    pub gossip_interval: Duration,
    /// Members gossiped to every `gossip_interval`.
    pub gossip_fanout: NonZeroUsize,
    /// Each membership update or state is sent `retransmit_multiplier × ⌈log10(n + 1)⌉`
    /// times (memberlist's `RetransmitMult`, 4). The ceiling matters: without it a node alone
    /// at start-up sends news once, and a cluster starting at once takes seconds to converge.
    pub retransmit_multiplier: NonZeroU8,
    /// How often a member asks a random peer for its member list (finds the full roster sooner
    /// after joining a large cluster).
    pub announce_interval: Duration,
    /// How often a member announces itself to members it considers down: this is how the two
    /// sides of a healed partition find each other again.
    pub announce_to_down_interval: Duration,
    /// How long a down member is remembered (its address keeps being announced to).
    pub remove_down_after: Duration,
    /// While isolated or joining, how often to announce to every discovered address.
    pub rejoin_interval: Duration,
    /// How often the discovery source is asked again for peers.
    pub discovery_interval: Duration,
    /// Minimum time between two published versions of our own state: load changes within
    /// it are coalesced into one update.
    pub state_publish_interval: Duration,
    /// How often our current state is re-sent to peers even if unchanged (anti-entropy); a peer
    /// whose state has not been refreshed for several of these is stale. 10 s for lan: at 16
    /// nodes that keeps an idle node's whole traffic (membership and freshness) under serf's,
    /// measured side by side on loopback; the cost is that a lost update is repaired, and a
    /// silent peer distrusted, later (BENCHMARKS.md, "Where the idle bytes go").
    pub state_refresh_interval: Duration,
    /// The most peers a state change is pushed to directly; the rest learn it by gossip, a
    /// gossip interval or more later. 64 for lan and local (every peer of clusters up to 65
    /// nodes), 32 for wan. Each change costs one datagram per pushed peer.
    pub state_push_fanout: NonZeroUsize,
    /// How many random peers a node relays a state to when that state reached it by a direct
    /// push from its owner and is a new version to it (0: no relay; 2 in every preset). Only
    /// in clusters larger than `state_push_fanout + 1`, where the owner's push cannot reach
    /// everyone: relays carry a change past the push fan-out in one more network hop instead
    /// of gossip rounds (100 nodes: 99% of nodes see a change in 0.08–0.1 s instead of 0.28 s,
    /// median over 30 changes on two simulator seeds of three, for 9% more bytes;
    /// BENCHMARKS.md).
    pub state_relay_fanout: usize,
    /// The most bytes per second of foca datagrams that may carry piggybacked states (a token
    /// bucket with one second of burst, membership updates not counted; `None`: no limit).
    /// Beyond it, datagrams carry membership updates only until the budget refills, and the
    /// states wait in foca's queue, where newer versions replace older ones. Reached only
    /// when states change faster than gossip can spread them: 16 KB/s for lan and wan, which
    /// a 1,000-node cluster with 0.2 changes per node per second reaches and 100 such nodes
    /// do not (all their foca traffic is 6 KB/s). The trade-off, bytes against how many nodes
    /// hold a change half a second after it, is measured in BENCHMARKS.md.
    pub state_gossip_budget: Option<NonZeroU32>,
    /// The longest [`crate::Membership::leave`] takes.
    pub leave_timeout: Duration,
}

impl Timing {
    /// For a data-centre network: probes every 0.8 s with memberlist's 0.5 s probe timeout, and
    /// a nominal suspicion timeout of 1.5 s up to 100 members, 3 s at 1,000 (memberlist:
    /// 1 s probes, `4 × log10(n)` s, 8 s at 100): a confirmed crash is reported sooner, while
    /// an unconfirmed suspicion still waits six times as long for a refutation, and a member
    /// 1.4 s of round trip away is kept (see BENCHMARKS.md for the false-failure
    /// measurements). 0.8 s rather than memberlist's 1 s because about one crash in ten waits
    /// two probe periods before any member happens to probe it: with 1 s probes that tenth
    /// took over 4 s to be reported everywhere in a 10-node cluster, with 0.8 s under 4 s. The
    /// extra probes are paid for by the 10 s state refresh (BENCHMARKS.md, "The probe period
    /// and the crash-detection tail").
    pub fn lan() -> Self {
        Self {
            probe_period: Duration::from_millis(800),
            probe_rtt: Duration::from_millis(500),
            suspicion_multiplier: 1.875,
            suspicion_max_multiplier: 6.0,
            suspicion_confirmations: 2,
            max_health_multiplier: 8,
            gossip_interval: Duration::from_millis(200),
            gossip_fanout: nz(3),
            retransmit_multiplier: NonZeroU8::new(4).unwrap_or(NonZeroU8::MIN),
            announce_interval: Duration::from_secs(30),
            announce_to_down_interval: Duration::from_secs(5),
            remove_down_after: Duration::from_secs(15 * 60),
            rejoin_interval: Duration::from_secs(2),
            discovery_interval: Duration::from_secs(30),
            state_publish_interval: Duration::from_millis(100),
            state_refresh_interval: Duration::from_secs(10),
            state_push_fanout: nz(64),
            state_relay_fanout: 2,
            state_gossip_budget: NonZeroU32::new(16_000),
            leave_timeout: Duration::from_secs(5),
        }
    }

    /// For links between regions: five-second probes, like memberlist's `DefaultWANConfig`.
    pub fn wan() -> Self {
        Self {
            probe_period: Duration::from_secs(5),
            probe_rtt: Duration::from_secs(3),
            suspicion_multiplier: 6.0,
            suspicion_max_multiplier: 6.0,
            suspicion_confirmations: 2,
            max_health_multiplier: 8,
            gossip_interval: Duration::from_millis(500),
            gossip_fanout: nz(4),
            retransmit_multiplier: NonZeroU8::new(4).unwrap_or(NonZeroU8::MIN),
            announce_interval: Duration::from_secs(60),
            announce_to_down_interval: Duration::from_secs(30),
            remove_down_after: Duration::from_secs(30 * 60),
            rejoin_interval: Duration::from_secs(10),
            discovery_interval: Duration::from_secs(60),
            state_publish_interval: Duration::from_millis(500),
            state_refresh_interval: Duration::from_secs(10),
            state_push_fanout: nz(32),
            state_relay_fanout: 2,
            state_gossip_budget: NonZeroU32::new(16_000),
            leave_timeout: Duration::from_secs(10),
        }
    }

    /// For nodes on one machine (tests, the demo): everything within a second or two.
    pub fn local() -> Self {
        Self {
            probe_period: Duration::from_millis(200),
            probe_rtt: Duration::from_millis(100),
            suspicion_multiplier: 5.0,
            suspicion_max_multiplier: 6.0,
            suspicion_confirmations: 2,
            max_health_multiplier: 8,
            gossip_interval: Duration::from_millis(50),
            gossip_fanout: nz(3),
            retransmit_multiplier: NonZeroU8::new(4).unwrap_or(NonZeroU8::MIN),
            announce_interval: Duration::from_secs(1),
            announce_to_down_interval: Duration::from_secs(1),
            remove_down_after: Duration::from_secs(30),
            rejoin_interval: Duration::from_millis(300),
            discovery_interval: Duration::from_secs(1),
            state_publish_interval: Duration::from_millis(20),
            state_refresh_interval: Duration::from_millis(500),
            state_push_fanout: nz(64),
            state_relay_fanout: 2,
            state_gossip_budget: None,
            leave_timeout: Duration::from_secs(1),
        }
    }

    /// Checks the relations foca relies on; the error names the field and the rule.
    pub fn validate(&self) -> Result<(), TimingError> {
        let positive = [
            ("probe_period", self.probe_period),
            ("probe_rtt", self.probe_rtt),
            ("gossip_interval", self.gossip_interval),
            ("announce_interval", self.announce_interval),
            ("announce_to_down_interval", self.announce_to_down_interval),
            ("rejoin_interval", self.rejoin_interval),
            ("discovery_interval", self.discovery_interval),
            ("state_refresh_interval", self.state_refresh_interval),
            ("leave_timeout", self.leave_timeout),
        ];
        for (field, value) in positive {
            if value.is_zero() {
                return Err(TimingError {
                    field,
                    rule: "must be greater than zero",
                });
            }
        }
        if self.probe_rtt >= self.probe_period {
            return Err(TimingError {
                field: "probe_rtt",
                rule: "must be shorter than probe_period",
            });
        }
        if !(self.suspicion_multiplier.is_finite() && self.suspicion_multiplier >= 1.0) {
            return Err(TimingError {
                field: "suspicion_multiplier",
                rule: "must be a finite number of at least 1",
            });
        }
        if !(self.suspicion_max_multiplier.is_finite() && self.suspicion_max_multiplier >= 1.0) {
            return Err(TimingError {
                field: "suspicion_max_multiplier",
                rule: "must be a finite number of at least 1",
            });
        }
        if self
            .suspicion_timeout(u32::MAX)
            .mul_f64(self.suspicion_max_multiplier)
            > Duration::from_secs(24 * 3600)
        {
            return Err(TimingError {
                field: "suspicion_multiplier",
                rule: "gives a suspicion timeout over a day",
            });
        }
        Ok(())
    }

    /// How many times each update is sent in a cluster of `cluster_size` members.
    pub fn max_transmissions(&self, cluster_size: u32) -> NonZeroU8 {
        let rounds = f64::from(cluster_size.saturating_add(1))
            .log10()
            .ceil()
            .max(1.0);
        let times = (rounds * f64::from(self.retransmit_multiplier.get())).min(255.0);
        // `times` is in 1..=255.
        NonZeroU8::new(times as u8).unwrap_or(NonZeroU8::MAX)
    }

    /// The nominal suspicion timeout for a cluster of `cluster_size` members:
    /// `suspicion_multiplier × max(1, log10(cluster_size) − 1) × probe_period`.
    pub fn suspicion_timeout(&self, cluster_size: u32) -> Duration {
        let scale = f64::max(1.0, f64::from(cluster_size.max(1)).log10() - 1.0);
        self.probe_period.mul_f64(scale * self.suspicion_multiplier)
    }

    /// The foca configuration for a cluster of `cluster_size` members and datagrams of at most
    /// `max_packet_size` bytes of foca payload: what the membership task runs with, re-sized as
    /// the cluster grows. Public so simulations and tools can run foca exactly as a node does.
    pub fn foca_config(&self, cluster_size: u32, max_packet_size: usize) -> foca::Config {
        let size = NonZeroU32::new(cluster_size.max(1)).unwrap_or(NonZeroU32::MIN);
        let mut config = foca::Config::new_lan(size);
        config.probe_period = self.probe_period;
        config.probe_rtt = self.probe_rtt;
        // The longest a suspicion may wait (unconfirmed). The membership task holds foca's
        // suspicion timer back until the dynamic deadline instead (agent/lifeguard/).
        config.suspect_to_down_after = self
            .suspicion_timeout(size.get())
            .mul_f64(self.suspicion_max_multiplier);
        config.max_transmissions = self.max_transmissions(size.get());
        config.remove_down_after = Some(self.remove_down_after);
        config.max_packet_size = NonZeroUsize::new(max_packet_size).unwrap_or(NonZeroUsize::MIN);
        config.notify_down_members = true;
        config.periodic_announce = Some(foca::PeriodicParams {
            frequency: self.announce_interval,
            num_members: nz(1),
        });
        config.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: self.announce_to_down_interval,
            num_members: nz(2),
        });
        config.periodic_gossip = Some(foca::PeriodicParams {
            frequency: self.gossip_interval,
            num_members: self.gossip_fanout,
        });
        config
    }
}

impl Default for Timing {
    fn default() -> Self {
        Self::lan()
    }
}

const fn nz(n: usize) -> NonZeroUsize {
    match NonZeroUsize::new(n) {
        Some(n) => n,
        None => NonZeroUsize::MIN,
    }
}

/// A [`Timing`] field broke a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid timing: {field} {rule}")]
pub struct TimingError {
    /// The field.
    pub field: &'static str,
    /// The rule it broke.
    pub rule: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid() {
        for timing in [Timing::lan(), Timing::wan(), Timing::local()] {
            timing.validate().unwrap();
        }
    }

    #[test]
    fn suspicion_grows_with_cluster_size_beyond_a_hundred() {
        let t = Timing::lan();
        assert_eq!(t.suspicion_timeout(5), Duration::from_millis(1500));
        assert_eq!(t.suspicion_timeout(100), Duration::from_millis(1500));
        assert_eq!(t.suspicion_timeout(1000), Duration::from_secs(3));
        let small = t.foca_config(3, 1396);
        let large = t.foca_config(1000, 1396);
        // Unconfirmed: six times the nominal timeout.
        assert_eq!(small.suspect_to_down_after, Duration::from_secs(9));
        assert_eq!(large.suspect_to_down_after, Duration::from_secs(18));
        assert!(large.max_transmissions > small.max_transmissions);
        assert_eq!(small.max_packet_size.get(), 1396);
    }

    #[test]
    fn retransmissions_follow_memberlist() {
        let t = Timing::lan();
        // 4 × ⌈log10(n + 1)⌉, never less than 4.
        assert_eq!(t.max_transmissions(1).get(), 4);
        assert_eq!(t.max_transmissions(9).get(), 4);
        assert_eq!(t.max_transmissions(10).get(), 8);
        assert_eq!(t.max_transmissions(100).get(), 12);
        assert_eq!(t.max_transmissions(u32::MAX).get(), 40);
    }

    #[test]
    fn invalid_timing_names_the_field() {
        let mut t = Timing::local();
        t.probe_rtt = t.probe_period;
        assert_eq!(
            t.validate().unwrap_err().to_string(),
            "invalid timing: probe_rtt must be shorter than probe_period"
        );
        let mut t = Timing::local();
        t.gossip_interval = Duration::ZERO;
        assert_eq!(t.validate().unwrap_err().field, "gossip_interval");
    }
}
