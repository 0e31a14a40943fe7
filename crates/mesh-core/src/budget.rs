//! A byte budget for the gossip datagrams that carry node states.
//!
//! foca fills every datagram it sends (probes, acks, gossip rounds) first with membership
//! updates, then with as many custom broadcasts (our node states) as fit. While states change
//! faster than they can be disseminated, every gossip round is a full datagram: at 1,000 busy
//! nodes that was 23.5 KB/s per node of foca traffic (BENCHMARKS.md), whatever the states were
//! worth to the receivers. memberlist has the same ceiling built in (`GossipNodes` full packets
//! per `GossipInterval`).
//!
//! [`GossipBudget`] is a token bucket of bytes (one second of burst) consulted through foca's
//! [`should_add_broadcast_data`](foca::BroadcastHandler::should_add_broadcast_data) hook: a
//! datagram may carry states only while the bucket is not empty. A datagram that was allowed
//! to is charged when foca hands it to the runtime (foca composes and sends one datagram at a
//! time, so the charge follows the permission it belongs to): all its bytes except its
//! membership updates, which are read back with foca's own codec, as the receiver will. So
//! the states and the header that carries them are charged, and membership updates never
//! are: after a cold start they fill most of each datagram for seconds, and charging them
//! would starve the states. Over the budget, datagrams still go out with membership updates
//! only, and a gossip round that would carry nothing else is skipped (`agent/mod.rs`); the
//! states wait in foca's queue, where newer versions replace older ones, so what is held back
//! is mostly news about to be superseded. Direct pushes, relays and refreshes are not
//! counted: their fan-outs and intervals bound them.

use std::{
    num::NonZeroU32,
    sync::{Arc, Mutex, MutexGuard},
};

use foca::{Codec, PostcardCodec};
use tokio::time::Instant;

use crate::Identity;

/// Shared between foca's broadcast handler (which asks) and the runtime (which charges).
#[derive(Debug, Clone, Default)]
pub(crate) struct GossipBudget(Option<Arc<Mutex<Bucket>>>);

#[derive(Debug)]
struct Bucket {
    /// Bytes per second, and the most the bucket holds.
    rate: f64,
    tokens: f64,
    refilled: Instant,
    /// The datagram foca is composing was allowed to carry states.
    armed: bool,
}

impl Bucket {
    fn refill(&mut self) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.refilled = now;
    }
}

impl GossipBudget {
    /// `bytes_per_second` of state-carrying datagrams; `None`: unlimited.
    pub(crate) fn new(bytes_per_second: Option<NonZeroU32>) -> Self {
        Self(bytes_per_second.map(|rate| {
            let rate = f64::from(rate.get());
            Arc::new(Mutex::new(Bucket {
                rate,
                tokens: rate,
                refilled: Instant::now(),
                armed: false,
            }))
        }))
    }

    fn bucket(&self) -> Option<MutexGuard<'_, Bucket>> {
        // A poisoned lock only means a panic elsewhere; the numbers are still usable.
        self.0
            .as_ref()
            .map(|bucket| bucket.lock().unwrap_or_else(|poison| poison.into_inner()))
    }

    /// May the datagram foca is about to fill carry states?
    pub(crate) fn may_carry_states(&self) -> bool {
        let Some(mut bucket) = self.bucket() else {
            return true;
        };
        bucket.refill();
        bucket.armed = bucket.tokens > 0.0;
        bucket.armed
    }

    /// No datagram may carry states now: a gossip round with nothing else to send can wait.
    pub(crate) fn is_spent(&self) -> bool {
        self.bucket().is_some_and(|mut bucket| {
            bucket.refill();
            bucket.tokens <= 0.0
        })
    }

    /// foca sent `datagram`: charge it if it was allowed to carry states.
    pub(crate) fn sent(&self, datagram: &[u8]) {
        if let Some(mut bucket) = self.bucket()
            && std::mem::take(&mut bucket.armed)
        {
            bucket.tokens -= charged_bytes(datagram) as f64;
        }
    }
}

/// The bytes of a foca datagram that are not membership updates: its header, the update
/// count and the custom broadcasts (states) after the updates. The whole datagram if it
/// cannot be read (never the case for what foca itself just encoded).
fn charged_bytes(datagram: &[u8]) -> usize {
    let mut rest = datagram;
    let Ok(header) = Codec::<Identity>::decode_header(&mut PostcardCodec, &mut rest) else {
        return datagram.len();
    };
    if header.message == foca::Message::Broadcast {
        // States only: no update count, no membership updates.
        return datagram.len();
    }
    // foca writes a big-endian u16 count of membership updates, then the updates, whenever
    // at least two bytes are left (`Foca::send_message`); custom broadcasts follow.
    let Some((count, mut updates)) = rest.split_first_chunk::<2>() else {
        return datagram.len();
    };
    let before = updates.len();
    for _ in 0..u16::from_be_bytes(*count) {
        if Codec::<Identity>::decode_member(&mut PostcardCodec, &mut updates).is_err() {
            return datagram.len();
        }
    }
    datagram.len() - (before - updates.len())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn budget(rate: u32) -> GossipBudget {
        GossipBudget::new(NonZeroU32::new(rate))
    }

    /// A foca datagram as foca lays it out: header, update count, updates, then `states`
    /// length-prefixed custom broadcasts of `state_len` bytes each.
    fn datagram(updates: u16, states: usize, state_len: usize) -> Vec<u8> {
        let id = |n: &str| {
            Identity::new(
                crate::NodeId::new(n).unwrap(),
                "127.0.0.1:7946".parse().unwrap(),
                1,
            )
        };
        let header = foca::Header {
            src: id("a"),
            src_incarnation: 0,
            dst: id("b"),
            message: foca::Message::Gossip,
        };
        let mut buf = Vec::new();
        Codec::<Identity>::encode_header(&mut PostcardCodec, &header, &mut buf).unwrap();
        buf.extend_from_slice(&updates.to_be_bytes());
        for k in 0..updates {
            let member = foca::Member::alive(id(&format!("m{k}")));
            Codec::<Identity>::encode_member(&mut PostcardCodec, &member, &mut buf).unwrap();
        }
        for _ in 0..states {
            buf.extend_from_slice(&(state_len as u16).to_be_bytes());
            buf.extend(std::iter::repeat_n(7_u8, state_len));
        }
        buf
    }

    /// Charges a datagram of `bytes` with no membership update.
    fn send(budget: &GossipBudget, bytes: usize) {
        let empty = datagram(0, 0, 0).len();
        budget.sent(&datagram(0, 1, bytes - empty - 2));
    }

    #[test]
    fn membership_updates_are_not_charged() {
        let header = datagram(0, 0, 0).len();
        assert_eq!(charged_bytes(&datagram(5, 3, 40)), header + 3 * 42);
        assert_eq!(charged_bytes(&datagram(5, 0, 0)), header);
        assert_eq!(charged_bytes(&datagram(0, 2, 10)), header + 24);
        assert_eq!(charged_bytes(b"garbage"), 7, "unreadable: charged in full");
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_always_carries() {
        let budget = GossipBudget::new(None);
        for _ in 0..1000 {
            assert!(budget.may_carry_states());
            assert!(!budget.is_spent());
            send(&budget, 1400);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_of_budget_then_none_until_it_refills() {
        let budget = budget(14_000);
        for datagram in 0..10 {
            assert!(budget.may_carry_states(), "datagram {datagram}");
            send(&budget, 1400);
        }
        // 14,000 bytes charged: the eleventh full datagram waits.
        assert!(budget.is_spent());
        assert!(!budget.may_carry_states());
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(budget.may_carry_states(), "100 ms refill 1,400 bytes");
        send(&budget, 1400);
        assert!(!budget.may_carry_states());
    }

    #[tokio::test(start_paused = true)]
    async fn only_datagrams_allowed_to_carry_states_are_charged() {
        let budget = budget(1000);
        assert!(budget.may_carry_states());
        send(&budget, 1400);
        assert!(
            !budget.may_carry_states(),
            "in debt after one large datagram"
        );
        // Datagrams foca sent without states (not armed) cost nothing.
        for _ in 0..100 {
            send(&budget, 1400);
        }
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(
            budget.may_carry_states(),
            "400 bytes of debt repaid in 0.4 s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_budget_holds_at_most_one_second() {
        let budget = budget(1000);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(budget.may_carry_states());
        send(&budget, 1000);
        assert!(!budget.may_carry_states(), "no more than a second of burst");
    }
}
