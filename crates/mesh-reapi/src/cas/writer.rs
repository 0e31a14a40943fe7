//! Streaming a new blob into the CAS: written to a temporary file and hashed as it comes,
//! visible only once [`BlobWriter::commit`] finds the digest it was promised.
//!
//! Each piece is hashed and written on the blocking pool, behind the caller: a write returns
//! once the piece before it is done and this one has started, so the next piece is received
//! while this one is hashed and written (as `tokio::fs::File` writes behind), and hashing a
//! piece never holds up the caller's runtime thread.

use std::{
    fs,
    io::{self, Write as _},
};

use tempfile::TempPath;
use tokio::task::JoinHandle;

use super::{Cas, CasError};
use crate::{Digest, digest::Hasher};

/// Writes one blob in pieces; nothing is visible until [`BlobWriter::commit`] checks the
/// digest. Dropping the writer discards what was written.
#[derive(Debug)]
pub struct BlobWriter {
    cas: Cas,
    expected: Digest,
    path: TempPath,
    /// Bytes accepted so far, the piece being written included.
    accepted: u64,
    /// The file and the hash of what was written to it: here between pieces, or with the
    /// piece being written.
    state: Pending,
}

/// Where the file and its hash are.
#[derive(Debug)]
enum Pending {
    Idle(Box<(fs::File, Hasher)>),
    Writing(JoinHandle<(fs::File, Hasher, io::Result<()>)>),
    /// A piece failed; the error was returned, and the writer takes no more.
    Failed,
}

impl BlobWriter {
    /// Appends `data`; more bytes than the digest's size is an error.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), CasError> {
        self.write_owned(data.to_vec()).await
    }

    /// Appends `data`, taking it (no copy); more bytes than the digest's size is an error.
    /// Returns once the previous piece is written and this one is on its way; an error
    /// writing this one is returned by the next call (or by [`BlobWriter::commit`]).
    pub async fn write_owned(&mut self, data: Vec<u8>) -> Result<(), CasError> {
        let received = self.accepted.saturating_add(data.len() as u64);
        if received > self.expected.size() {
            return Err(CasError::TooMuchData {
                expected: self.expected,
                received,
            });
        }
        let (mut file, mut hasher) = self.settle().await?;
        self.accepted = received;
        self.state = Pending::Writing(tokio::task::spawn_blocking(move || {
            hasher.update(&data);
            let written = file.write_all(&data);
            (file, hasher, written)
        }));
        Ok(())
    }

    /// Waits for the piece being written, and takes the file and its hash.
    async fn settle(&mut self) -> Result<(fs::File, Hasher), CasError> {
        let context = || format!("writing blob {}", self.expected);
        match std::mem::replace(&mut self.state, Pending::Failed) {
            Pending::Idle(state) => Ok(*state),
            Pending::Writing(task) => match task.await {
                Ok((file, hasher, Ok(()))) => Ok((file, hasher)),
                Ok((_, _, Err(error))) => Err(CasError::io(context())(error)),
                Err(error) => Err(CasError::io(context())(io::Error::other(error))),
            },
            Pending::Failed => Err(CasError::io(context())(io::Error::other(
                "an earlier piece of this blob failed to be written",
            ))),
        }
    }

    /// Bytes taken so far, the piece still being written included.
    pub fn written(&self) -> u64 {
        self.accepted
    }

    /// The digest this blob must have.
    pub fn expected(&self) -> Digest {
        self.expected
    }

    /// Checks the digest and makes the blob visible.
    pub async fn commit(mut self) -> Result<(), CasError> {
        let (file, hasher) = self.settle().await?;
        let actual = hasher.finish();
        if actual != self.expected {
            return Err(CasError::DigestMismatch {
                expected: self.expected,
                actual,
            });
        }
        drop(file);
        let cas = self.cas;
        let path = self.path;
        let expected = self.expected;
        // The rename (and any eviction it triggers) touches the file system.
        tokio::task::spawn_blocking(move || cas.commit_temp(expected, path))
            .await
            .map_err(|e| CasError::Io {
                context: format!("storing blob {expected}"),
                source: io::Error::other(e),
            })?
    }
}

impl BlobWriter {
    /// A writer into `file` (at `path`, in the store's `tmp` directory) for `expected`.
    pub(super) fn new(cas: Cas, expected: Digest, file: fs::File, path: TempPath) -> Self {
        Self {
            cas,
            expected,
            path,
            accepted: 0,
            state: Pending::Idle(Box::new((file, Hasher::for_function(expected.function())))),
        }
    }
}
