//! Lifeguard's local health score (the paper's LHA-Probe, "Lifeguard: Local Health Awareness
//! for More Accurate Failure Detection", Dadgar, Phillips and Currey, 2018): how much this node
//! distrusts its own view of others.
//!
//! The score grows when one of our probes fails or we have to refute a suspicion of ourselves,
//! and shrinks with every successful probe; our probe timers run `1 + score` times as long
//! (the [`Guard`](super::guard::Guard) stretches them where foca submits them), so a
//! struggling node probes less often and waits longer for acks instead of accusing healthy
//! members.

use std::time::Duration;

/// Lifeguard's local health score: how much this node distrusts its own view of others.
#[derive(Debug, Default)]
pub(crate) struct LocalHealth {
    score: u8,
    max: u8,
}

impl LocalHealth {
    /// A healthy node whose score may grow to `max` (0 turns local health awareness off).
    pub(crate) fn new(max: u8) -> Self {
        Self { score: 0, max }
    }

    /// The current score.
    pub(crate) fn score(&self) -> u8 {
        self.score
    }

    /// How much longer probe timers run: `1 + score`.
    pub(crate) fn scale(&self, after: Duration) -> Duration {
        after * (u32::from(self.score) + 1)
    }

    /// One of our probes failed, or we had to refute a suspicion of ourselves.
    pub(crate) fn worse(&mut self) {
        self.score = self.score.saturating_add(1).min(self.max);
    }

    /// One of our probes succeeded.
    pub(crate) fn better(&mut self) {
        self.score = self.score.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_health_stretches_probes_up_to_its_maximum() {
        let mut health = LocalHealth::new(3);
        let period = Duration::from_secs(1);
        assert_eq!(health.scale(period), period);
        for _ in 0..5 {
            health.worse();
        }
        assert_eq!(health.score(), 3);
        assert_eq!(health.scale(period), Duration::from_secs(4));
        health.better();
        assert_eq!(health.scale(period), Duration::from_secs(3));
        let mut off = LocalHealth::new(0);
        off.worse();
        assert_eq!(off.scale(period), period);
    }
}
