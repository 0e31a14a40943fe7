//! Lifeguard's own timers, delivered in order with every other timer of the membership task
//! (`timers.rs` wraps them in its `Tick`) and handled by [`Lifeguard`](super::Lifeguard).

/// A Lifeguard timer that came due.
#[derive(Debug)]
pub(crate) enum LifeguardTick {
    /// A suspicion we raised may have reached its (dynamic) deadline.
    Suspicion(u64),
    /// The direct probe with this number timed out: tell its target early unless an answer
    /// came since (`probe_watch.rs`).
    TellEarly(u64),
    /// A suspicion we raised is still running: tell the suspect again.
    SuspectAgain(u64),
    /// A check we run as a witness: ask the suspect again.
    CheckRetry(u64),
    /// A check we run as a witness: the suspect had its chance.
    CheckDue(u64),
}
