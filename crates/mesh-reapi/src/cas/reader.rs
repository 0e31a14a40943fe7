//! Reading a stored blob in pieces, hashing the very bytes that leave (see the `cas` module
//! docs: a blob served is the blob stored).

use std::{
    fs,
    io::{self, Read as _},
};

use super::{COPY_BUFFER, Cas, CasError};
use crate::{Digest, digest::Hasher};

/// A stored blob read in pieces, checked against its digest on the way (from
/// [`Cas::open_reader`]).
///
/// The file is read from its start and hashed as it goes, also where the requested range
/// ([`BlobReader::range`]) starts later; the piece that completes the range is returned only
/// once the whole file has been hashed and matched. So a caller that received every piece
/// has served the blob exactly as it was stored, and one that gets
/// [`CasError::Corrupt`] instead of the last piece must not use what it got: the blob has
/// been dropped from the CAS by then. A range that fits in one piece is checked before
/// anything of it is returned.
#[derive(Debug)]
pub struct BlobReader {
    cas: Cas,
    digest: Digest,
    /// The open file; `None` for the empty blob, while a piece is being read, and after the
    /// end or an error.
    state: Option<ReadState>,
    /// The offset of the next byte to return.
    next: u64,
    /// The end of the range (exclusive).
    end: u64,
}

#[derive(Debug)]
struct ReadState {
    file: fs::File,
    metadata: fs::Metadata,
    /// Everything read so far, from offset 0.
    hasher: Hasher,
}

/// Why reading a piece failed.
enum ReadFault {
    /// The file does not match the digest; what was found instead.
    Corrupt(String),
    Io(io::Error),
}

impl BlobReader {
    /// A reader of `digest` from its open file and the file's metadata (`None` for the empty
    /// blob).
    pub(super) fn new(cas: Cas, digest: Digest, opened: Option<(fs::File, fs::Metadata)>) -> Self {
        Self {
            cas,
            digest,
            state: opened.map(|(file, metadata)| ReadState {
                file,
                metadata,
                hasher: Hasher::for_function(digest.function()),
            }),
            next: 0,
            end: digest.size(),
        }
    }

    /// The blob being read.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// Returns only `[offset, end)` of the blob (both clamped to its size); the whole blob is
    /// still read and checked. Call before the first [`BlobReader::next_chunk`].
    pub fn range(mut self, offset: u64, end: u64) -> Self {
        self.end = end.min(self.digest.size());
        self.next = offset.min(self.end);
        self
    }

    /// The next piece of the range, at most `max` bytes long (at least 1); `Ok(None)` once the
    /// range is done (at once for an empty range, which checks nothing) or after an error.
    pub async fn next_chunk(&mut self, max: usize) -> Result<Option<Vec<u8>>, CasError> {
        if self.next >= self.end {
            return Ok(None);
        }
        let Some(mut state) = self.state.take() else {
            return Ok(None);
        };
        let (start, end, digest) = (self.next, self.end, self.digest);
        let want = usize::try_from(end - start)
            .unwrap_or(usize::MAX)
            .min(max.max(1));
        let (state, piece) = tokio::task::spawn_blocking(move || {
            let piece = state.read_piece(&digest, start, want, end);
            (state, piece)
        })
        .await
        .map_err(|e| CasError::Io {
            context: format!("reading blob {digest}"),
            source: io::Error::other(e),
        })?;
        match piece {
            Ok(piece) => {
                self.next = start + piece.len() as u64;
                if self.next < self.end {
                    self.state = Some(state);
                }
                Ok(Some(piece))
            }
            Err(ReadFault::Corrupt(found)) => {
                let cas = self.cas.clone();
                // The file stays open until it is dropped (see `LruDir::remove_if_file`).
                tokio::task::spawn_blocking(move || {
                    cas.drop_corrupt(&digest, &state.metadata, &found);
                    drop(state);
                })
                .await
                .map_err(|e| CasError::Io {
                    context: format!("dropping blob {digest}"),
                    source: io::Error::other(e),
                })?;
                Err(CasError::Corrupt { digest })
            }
            Err(ReadFault::Io(error)) => Err(CasError::io(format!("reading blob {digest}"))(error)),
        }
    }
}

impl ReadState {
    /// Reads `want` bytes at `start` (hashing whatever lies before it first); if they end the
    /// range at `end`, hashes the rest of the file and checks it against `digest`. Blocking.
    fn read_piece(
        &mut self,
        digest: &Digest,
        start: u64,
        want: usize,
        end: u64,
    ) -> Result<Vec<u8>, ReadFault> {
        if self.hasher.size() < start {
            // The range starts later: the bytes before it are part of the check.
            let mut buffer = vec![0u8; COPY_BUFFER];
            while self.hasher.size() < start {
                let n = usize::try_from(start - self.hasher.size())
                    .unwrap_or(COPY_BUFFER)
                    .min(COPY_BUFFER);
                self.fill(&mut buffer[..n])?;
                self.hasher.update(&buffer[..n]);
            }
        }
        debug_assert_eq!(self.hasher.size(), start);
        let mut piece = vec![0u8; want];
        self.fill(&mut piece)?;
        self.hasher.update(&piece);
        if start + want as u64 == end {
            // The last piece of the range: nothing of it leaves before the whole file matched.
            let mut buffer = vec![0u8; COPY_BUFFER];
            loop {
                let n = match self.file.read(&mut buffer) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(ReadFault::Io(e)),
                };
                self.hasher.update(&buffer[..n]);
                if self.hasher.size() > digest.size() {
                    return Err(ReadFault::Corrupt(format!(
                        "its file is longer than {} bytes",
                        digest.size()
                    )));
                }
            }
            if self.hasher.size() < digest.size() {
                return Err(ReadFault::Corrupt(format!(
                    "its file ends after {} bytes",
                    self.hasher.size()
                )));
            }
            let actual = std::mem::take(&mut self.hasher).finish();
            if actual != *digest {
                return Err(ReadFault::Corrupt(format!(
                    "its bytes have digest {actual}"
                )));
            }
        }
        Ok(piece)
    }

    /// Fills `buffer` from the file; a file that ends first is corrupt (it has the digest's
    /// size when opened, so it changed).
    fn fill(&mut self, buffer: &mut [u8]) -> Result<(), ReadFault> {
        let at = self.hasher.size();
        self.file.read_exact(buffer).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                ReadFault::Corrupt(format!(
                    "its file ends before {} bytes",
                    at + buffer.len() as u64
                ))
            } else {
                ReadFault::Io(e)
            }
        })
    }
}
