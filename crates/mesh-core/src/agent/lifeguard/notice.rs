//! Lifeguard's messages as they travel in [`Kind::Lifeguard`](crate::wire::Kind) datagrams
//! (what each one asks and who sends it: [`super`]). In a file of their own because the
//! membership task's input ([`crate::input`]) carries them too, and it must not depend on the
//! agent that reads it.

use serde::{Deserialize, Serialize};

use crate::Identity;

/// A Lifeguard message about `member` at `incarnation`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Notice {
    /// You are suspected: refute.
    Suspected { member: Identity, incarnation: u16 },
    /// Please check whether `member` answers.
    Check { member: Identity, incarnation: u16 },
    /// `member` answered: it is alive at an incarnation above `incarnation`.
    Alive { member: Identity, incarnation: u16 },
    /// `member` did not answer the witness either.
    Confirm { member: Identity, incarnation: u16 },
    /// Our suspicion of `member` at `incarnation` timed out: it is down.
    Down { member: Identity, incarnation: u16 },
}
