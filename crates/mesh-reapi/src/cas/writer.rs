//! Streaming a new blob into the CAS: written to a temporary file and hashed as it comes,
//! visible only once [`BlobWriter::commit`] finds the digest it was promised.

use std::{fs, io};

use tempfile::TempPath;
use tokio::io::AsyncWriteExt as _;

use super::{Cas, CasError};
use crate::{Digest, digest::Hasher};

/// Writes one blob in pieces; nothing is visible until [`BlobWriter::commit`] checks the
/// digest. Dropping the writer discards what was written.
#[derive(Debug)]
pub struct BlobWriter {
    cas: Cas,
    expected: Digest,
    file: tokio::fs::File,
    path: TempPath,
    hasher: Hasher,
}

impl BlobWriter {
    /// Appends `data`; more bytes than the digest's size is an error.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), CasError> {
        let received = self.hasher.size().saturating_add(data.len() as u64);
        if received > self.expected.size() {
            return Err(CasError::TooMuchData {
                expected: self.expected,
                received,
            });
        }
        self.hasher.update(data);
        self.file
            .write_all(data)
            .await
            .map_err(CasError::io(format!("writing blob {}", self.expected)))
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.hasher.size()
    }

    /// The digest this blob must have.
    pub fn expected(&self) -> Digest {
        self.expected
    }

    /// Checks the digest and makes the blob visible.
    pub async fn commit(mut self) -> Result<(), CasError> {
        self.file
            .flush()
            .await
            .map_err(CasError::io(format!("writing blob {}", self.expected)))?;
        let actual = self.hasher.finish();
        if actual != self.expected {
            return Err(CasError::DigestMismatch {
                expected: self.expected,
                actual,
            });
        }
        drop(self.file);
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
            file: tokio::fs::File::from_std(file),
            path,
            hasher: Hasher::for_function(expected.function()),
        }
    }
}
