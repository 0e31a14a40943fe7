//! Pieces the built-in strategies share: a seedable generator that `pick(&self)` can draw from,
//! the candidates with room, and the traced fallback to [`backpressure`].

use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use rand::rngs::{StdRng, SysError, SysRng};
use rand::{Rng, SeedableRng, TryRng};

use super::{Candidate, backpressure, stable_hash};

/// `new` (seeded from the OS), `with_seed`, `from_rng` and `Default` for a strategy whose only
/// field is `rng: SharedRng`.
macro_rules! seeded_constructors {
    ($strategy:ident) => {
        impl $strategy {
            /// Draws seeded from the operating system.
            pub fn new() -> Self {
                Self {
                    rng: SharedRng::from_os(),
                }
            }

            /// Draws seeded with `seed`: the same seed gives the same choices for the same
            /// candidates (reproducible tests and simulations).
            pub fn with_seed(seed: u64) -> Self {
                Self {
                    rng: SharedRng::with_seed(seed),
                }
            }

            /// Draws seeded from `rng` (for example one simulation generator shared by many
            /// routers).
            pub fn from_rng<R: rand::Rng + ?Sized>(rng: &mut R) -> Self {
                Self {
                    rng: SharedRng::from_rng(rng),
                }
            }
        }

        impl Default for $strategy {
            fn default() -> Self {
                Self::new()
            }
        }
    };
}

/// A random generator behind a mutex, so strategies can draw through `&self`.
///
/// A panic while the lock is held cannot leave the generator in a state that matters (any state
/// is a valid generator), so a poisoned lock is simply taken over.
pub(super) struct SharedRng(Mutex<StdRng>);

impl SharedRng {
    /// Seeded from the operating system.
    pub(super) fn from_os() -> Self {
        let rng = StdRng::try_from_rng(&mut SysRng)
            .unwrap_or_else(|error| StdRng::seed_from_u64(fallback_seed(&error)));
        Self(Mutex::new(rng))
    }

    /// Seeded with `seed`: the same seed gives the same draws (with the same `rand` release).
    pub(super) fn with_seed(seed: u64) -> Self {
        Self(Mutex::new(StdRng::seed_from_u64(seed)))
    }

    /// Seeded from another generator.
    pub(super) fn from_rng<R: Rng + ?Sized>(rng: &mut R) -> Self {
        Self(Mutex::new(StdRng::from_rng(rng)))
    }

    /// Runs `draw` with exclusive access to the generator.
    pub(super) fn draw<T>(&self, draw: impl FnOnce(&mut StdRng) -> T) -> T {
        let mut rng = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        draw(&mut rng)
    }
}

impl fmt::Debug for SharedRng {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The generator's state is not worth printing (and is best kept out of logs).
        f.debug_struct("SharedRng").finish_non_exhaustive()
    }
}

/// A random `u64` from the operating system.
pub(super) fn os_seed() -> u64 {
    SysRng
        .try_next_u64()
        .unwrap_or_else(|error| fallback_seed(&error))
}

/// A seed for when the operating system's random source fails. Routing needs spread, not
/// secrecy, so the clock and the process id are good enough; this keeps construction infallible.
fn fallback_seed(error: &SysError) -> u64 {
    tracing::warn!(%error, "the operating system's random source failed; seeding from the clock");
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    stable_hash(&[&nanos.to_le_bytes(), &std::process::id().to_le_bytes()])
}

/// Indices of the candidates below their limit, in order.
pub(super) fn indices_with_capacity<'c>(
    candidates: &'c [Candidate<'_>],
) -> impl Iterator<Item = usize> + 'c {
    candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.has_capacity())
        .map(|(i, _)| i)
}

/// [`backpressure`], traced as `strategy`'s decision.
pub(super) fn traced_backpressure(strategy: &'static str, candidates: &[Candidate<'_>]) -> usize {
    let chosen = backpressure(candidates);
    if let Some(c) = candidates.get(chosen) {
        tracing::trace!(
            strategy,
            chosen = %c.node_id,
            local = c.local,
            ratio = c.load_ratio(),
            "no candidate has capacity: backpressure"
        );
    }
    chosen
}

#[cfg(test)]
mod tests {
    use rand::RngExt;

    use super::*;

    #[test]
    fn the_same_seed_draws_the_same_numbers() {
        let draws = |rng: &SharedRng| -> Vec<u32> {
            (0..16)
                .map(|_| rng.draw(|rng| rng.random_range(0..1000)))
                .collect()
        };
        assert_eq!(
            draws(&SharedRng::with_seed(3)),
            draws(&SharedRng::with_seed(3))
        );
        assert_ne!(
            draws(&SharedRng::with_seed(3)),
            draws(&SharedRng::with_seed(4))
        );
        assert_eq!(
            draws(&SharedRng::from_rng(&mut StdRng::seed_from_u64(9))),
            draws(&SharedRng::from_rng(&mut StdRng::seed_from_u64(9)))
        );
        assert_ne!(draws(&SharedRng::from_os()), draws(&SharedRng::from_os()));
    }

    #[test]
    fn a_poisoned_generator_keeps_working() {
        let rng = SharedRng::with_seed(1);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rng.draw(|_| panic!("poison the lock"))
        }));
        assert!(panicked.is_err());
        assert!(rng.0.is_poisoned());
        assert!(rng.draw(|rng| rng.random_range(0..10)) < 10);
    }

    #[test]
    fn debug_output_hides_the_generator_state() {
        assert_eq!(format!("{:?}", SharedRng::with_seed(1)), "SharedRng { .. }");
    }
}
