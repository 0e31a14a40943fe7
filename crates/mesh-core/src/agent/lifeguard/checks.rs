//! The witness's side of Lifeguard's dynamic suspicion (Dadgar, Phillips and Currey, 2018):
//! checks this node runs for members that suspect someone. A witness tells the suspect it is
//! suspected, twice, and answers every asker `Alive` if the suspect answered, `Confirm` if it
//! did not (the messages: `mod.rs`).

use std::{collections::HashMap, net::SocketAddr};

use crate::Identity;

/// Checks this node runs as a witness for others: who asked, and until when the suspect may
/// answer.
#[derive(Debug, Default)]
pub(crate) struct Checks {
    by_member: HashMap<(Identity, u16), Check>,
    next_id: u64,
}

#[derive(Debug)]
struct Check {
    askers: Vec<SocketAddr>,
    id: u64,
}

impl Checks {
    /// `asker` wants `member` checked at `incarnation`. Returns the id of a new check to time
    /// out, `None` if one is already running (the asker is added to it).
    pub(crate) fn ask(
        &mut self,
        member: &Identity,
        incarnation: u16,
        asker: SocketAddr,
    ) -> Option<u64> {
        let key = (member.clone(), incarnation);
        if let Some(check) = self.by_member.get_mut(&key) {
            if !check.askers.contains(&asker) {
                check.askers.push(asker);
            }
            return None;
        }
        self.next_id += 1;
        self.by_member.insert(
            key,
            Check {
                askers: vec![asker],
                id: self.next_id,
            },
        );
        Some(self.next_id)
    }

    /// `member` answered: the askers of every check of it at `incarnation` or earlier, who
    /// should hear so.
    pub(crate) fn answered(
        &mut self,
        member: &Identity,
        incarnation: u16,
    ) -> Vec<(u16, SocketAddr)> {
        let keys: Vec<(Identity, u16)> = self
            .by_member
            .keys()
            .filter(|(m, i)| m == member && *i <= incarnation)
            .cloned()
            .collect();
        let mut askers = Vec::new();
        for key in keys {
            if let Some(check) = self.by_member.remove(&key) {
                askers.extend(check.askers.into_iter().map(|a| (key.1, a)));
            }
        }
        askers
    }

    /// Check `id` timed out without an answer: the member, incarnation and askers to confirm
    /// to.
    pub(crate) fn timed_out(&mut self, id: u64) -> Option<(Identity, u16, Vec<SocketAddr>)> {
        let key = self
            .by_member
            .iter()
            .find(|(_, c)| c.id == id)
            .map(|(k, _)| k.clone())?;
        let check = self.by_member.remove(&key)?;
        Some((key.0, key.1, check.askers))
    }

    /// Whether check `id` still waits for an answer.
    pub(crate) fn is_waiting(&self, id: u64) -> Option<(Identity, u16)> {
        self.by_member
            .iter()
            .find(|(_, c)| c.id == id)
            .map(|(k, _)| k.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::runtime::testing::identity as id;

    #[test]
    fn a_witness_answers_every_asker_once() {
        let mut checks = Checks::default();
        let x = id("x", 9, 1);
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let first = checks.ask(&x, 3, a).unwrap();
        assert!(checks.ask(&x, 3, b).is_none());
        assert!(checks.ask(&x, 3, a).is_none());
        assert_eq!(checks.is_waiting(first), Some((x.clone(), 3)));
        let other = checks.ask(&x, 4, a).unwrap();
        assert_eq!(checks.answered(&x, 3), [(3, a), (3, b)]);
        assert!(checks.is_waiting(first).is_none());
        assert_eq!(checks.timed_out(other), Some((x, 4, vec![a])));
    }
}
