use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::time::Instant;

use crate::{Discover, DiscoveryError};

/// Wraps a [`Discover`] source and remembers its last good answer, so a refresh that fails never
/// takes away peers the mesh could still announce to.
///
/// [`refresh`](Self::refresh) asks the source and returns a [`Refresh`]: the addresses to use,
/// how old they are, and what went wrong if they are not fresh.
///
/// * **Success** with at least one address: that answer is used and remembered.
/// * **Failure** (nameserver down, timeout, NXDOMAIN): the last good answer is used and the
///   error reported. A failure never empties a list that was good before.
/// * **Success with no addresses**: also treated as suspect when a non-empty answer is
///   remembered. During a rollout, or while a DNS server restarts, a headless service can
///   briefly have zero ready endpoints; forgetting every peer then would leave this node unable
///   to re-join until the next refresh. The last good answer is kept and the empty answer
///   reported ([`RefreshOutcome::EmptyIgnored`]). With nothing remembered, an empty answer is
///   simply the answer.
///
/// The remembered answer never expires: announcing to an address that has gone away costs one
/// datagram, while forgetting the only live peer costs the cluster. [`Refresh::age`] says how
/// old it is, for callers that want to warn or to stop trusting it.
///
/// Ages are measured with [`tokio::time::Instant`], so paused-time tests control them.
#[derive(Debug)]
pub struct LastKnownGood<D> {
    source: D,
    last_good: Mutex<Option<Answer>>,
}

#[derive(Clone, Debug)]
struct Answer {
    addrs: Arc<[SocketAddr]>,
    /// When the `discover` call that produced this answer started; a slower, older call that
    /// finishes later must not overwrite a newer answer.
    started: Instant,
    obtained: Instant,
}

/// The result of [`LastKnownGood::refresh`].
#[derive(Debug)]
#[non_exhaustive]
pub struct Refresh {
    /// The addresses to announce to: the fresh answer, or the last good one.
    ///
    /// Empty only when no refresh has ever produced an address.
    pub addrs: Arc<[SocketAddr]>,
    /// How long ago `addrs` were obtained (zero for a fresh answer, and when there is no
    /// answer at all).
    pub age: Duration,
    /// Whether `addrs` come from this refresh, and if not, why.
    pub outcome: RefreshOutcome,
}

/// Whether a [`Refresh`] carries a fresh answer.
#[derive(Debug)]
#[non_exhaustive]
pub enum RefreshOutcome {
    /// The source answered; `addrs` is its answer.
    Fresh,
    /// The source failed; `addrs` is the last good answer (empty if there never was one).
    Failed(DiscoveryError),
    /// The source answered with no addresses; `addrs` is the last good, non-empty answer.
    EmptyIgnored,
}

impl Refresh {
    /// Whether `addrs` is the answer of this refresh.
    pub fn is_fresh(&self) -> bool {
        matches!(self.outcome, RefreshOutcome::Fresh)
    }

    /// The error of this refresh, if it failed.
    pub fn error(&self) -> Option<&DiscoveryError> {
        match &self.outcome {
            RefreshOutcome::Failed(error) => Some(error),
            RefreshOutcome::Fresh | RefreshOutcome::EmptyIgnored => None,
        }
    }
}

impl<D: Discover> LastKnownGood<D> {
    /// Wraps `source`; nothing is remembered until the first [`refresh`](Self::refresh).
    pub fn new(source: D) -> Self {
        Self {
            source,
            last_good: Mutex::new(None),
        }
    }

    /// The wrapped source.
    pub fn source(&self) -> &D {
        &self.source
    }

    /// The remembered answer and its age, without asking the source.
    pub fn last_good(&self) -> Option<(Arc<[SocketAddr]>, Duration)> {
        self.lock()
            .as_ref()
            .map(|answer| (answer.addrs.clone(), answer.obtained.elapsed()))
    }

    /// Asks the source once and decides which addresses to use; see the type docs.
    pub async fn refresh(&self) -> Refresh {
        let started = Instant::now();
        let result = self.source.discover().await;
        let now = Instant::now();

        let mut last_good = self.lock();
        match result {
            Err(error) => {
                tracing::warn!(%error, "discovery refresh failed; keeping the last good answer");
                stale(last_good.as_ref(), now, RefreshOutcome::Failed(error))
            }
            Ok(addrs) if addrs.is_empty() => match last_good.as_ref() {
                Some(answer) => {
                    tracing::warn!(
                        kept = answer.addrs.len(),
                        "discovery answered with no addresses; keeping the last good answer"
                    );
                    stale(Some(answer), now, RefreshOutcome::EmptyIgnored)
                }
                None => stale(None, now, RefreshOutcome::Fresh),
            },
            Ok(addrs) => {
                let addrs: Arc<[SocketAddr]> = addrs.into();
                if last_good
                    .as_ref()
                    .is_none_or(|answer| answer.started <= started)
                {
                    *last_good = Some(Answer {
                        addrs: addrs.clone(),
                        started,
                        obtained: now,
                    });
                }
                Refresh {
                    addrs,
                    age: Duration::ZERO,
                    outcome: RefreshOutcome::Fresh,
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Answer>> {
        // The guarded value is replaced whole, so a panic elsewhere cannot leave it half-written.
        self.last_good
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A refresh that did not produce a new non-empty answer: use what is remembered.
fn stale(last_good: Option<&Answer>, now: Instant, outcome: RefreshOutcome) -> Refresh {
    match last_good {
        Some(answer) => Refresh {
            addrs: answer.addrs.clone(),
            age: now.saturating_duration_since(answer.obtained),
            outcome,
        },
        None => Refresh {
            addrs: Arc::from([]),
            age: Duration::ZERO,
            outcome,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// Answers from a script, one per call.
    struct Scripted(Mutex<VecDeque<Result<Vec<SocketAddr>, DiscoveryError>>>);

    impl Scripted {
        fn new(script: impl IntoIterator<Item = Result<Vec<SocketAddr>, DiscoveryError>>) -> Self {
            Self(Mutex::new(script.into_iter().collect()))
        }
    }

    impl Discover for Scripted {
        async fn discover(&self) -> Result<Vec<SocketAddr>, DiscoveryError> {
            self.0
                .lock()
                .unwrap()
                .pop_front()
                .expect("script exhausted")
        }
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    fn timeout() -> DiscoveryError {
        DiscoveryError::Timeout {
            name: "mesh".into(),
            server: None,
            timeout: Duration::from_millis(200),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_the_last_good_answer_through_failures_and_empty_answers() {
        let refreshing = LastKnownGood::new(Scripted::new([
            Err(timeout()),
            Ok(addrs(&["10.0.0.1:7946", "10.0.0.2:7946"])),
            Err(timeout()),
            Ok(vec![]),
            Ok(addrs(&["10.0.0.3:7946"])),
        ]));

        let first = refreshing.refresh().await;
        assert!(first.addrs.is_empty(), "nothing to fall back to yet");
        assert!(matches!(
            first.error(),
            Some(DiscoveryError::Timeout { .. })
        ));
        assert!(refreshing.last_good().is_none());

        let good = refreshing.refresh().await;
        assert!(good.is_fresh());
        assert_eq!(
            &*good.addrs,
            &addrs(&["10.0.0.1:7946", "10.0.0.2:7946"])[..]
        );
        assert_eq!(good.age, Duration::ZERO);

        tokio::time::advance(Duration::from_secs(30)).await;
        let failed = refreshing.refresh().await;
        assert_eq!(
            failed.addrs, good.addrs,
            "a failure keeps the last good answer"
        );
        assert_eq!(failed.age, Duration::from_secs(30));
        assert!(matches!(
            failed.error(),
            Some(DiscoveryError::Timeout { .. })
        ));

        tokio::time::advance(Duration::from_secs(30)).await;
        let empty = refreshing.refresh().await;
        assert_eq!(
            empty.addrs, good.addrs,
            "an empty answer keeps the last good answer"
        );
        assert_eq!(empty.age, Duration::from_secs(60));
        assert!(matches!(empty.outcome, RefreshOutcome::EmptyIgnored));
        assert!(empty.error().is_none());

        let replaced = refreshing.refresh().await;
        assert!(replaced.is_fresh());
        assert_eq!(&*replaced.addrs, &addrs(&["10.0.0.3:7946"])[..]);
        let (remembered, age) = refreshing.last_good().unwrap();
        assert_eq!(remembered, replaced.addrs);
        assert_eq!(age, Duration::ZERO);
    }

    #[tokio::test]
    async fn an_empty_answer_with_nothing_remembered_is_the_answer() {
        let refreshing = LastKnownGood::new(Scripted::new([
            Ok(vec![]),
            Ok(vec![]),
            Ok(addrs(&["10.0.0.1:7946"])),
        ]));
        for _ in 0..2 {
            let refresh = refreshing.refresh().await;
            assert!(refresh.is_fresh());
            assert!(refresh.addrs.is_empty());
            assert!(
                refreshing.last_good().is_none(),
                "empty answers are not remembered"
            );
        }
        assert!(refreshing.refresh().await.is_fresh());
        assert!(refreshing.last_good().is_some());
    }
}
