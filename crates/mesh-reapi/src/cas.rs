//! The local content-addressable storage of one replica: blobs on disk, bounded in bytes,
//! least recently used evicted first.
//!
//! Every blob is written to a temporary file, its SHA-256 and size are checked against the
//! digest it claims, and only then is it renamed into place ([`crate::store`] explains the
//! directory layout and the eviction rules). A blob that fails the check never becomes
//! visible, and a write that is abandoned halfway (the client went away, the stream broke)
//! leaves nothing behind.
//!
//! Executions never work on CAS files directly: inputs are *copied* into the action's own
//! directory and outputs are *copied* (and hashed while copying) into the CAS, so an action
//! that rewrites its inputs, or a stray process that keeps writing to its outputs, cannot
//! change a stored blob.
//!
//! This store knows nothing of gRPC or of peers; [`crate::ClusterCas`] adds fetching from
//! peers on top.

use std::{
    fs,
    io::{self, Read as _, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use bytes::Bytes;
use tempfile::TempPath;
use tokio::io::AsyncWriteExt as _;

use crate::{
    Digest,
    digest::Hasher,
    store::{InsertError, LruDir, Pins, StoreUsage},
};

const COPY_BUFFER: usize = 256 * 1024;

/// One replica's blobs on disk. Cheap to clone.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use mesh_reapi::{Cas, Digest};
///
/// let dir = tempfile::tempdir()?;
/// let cas = Cas::open(dir.path(), 1 << 20)?;
/// let digest = cas.put(bytes::Bytes::from_static(b"hello")).await?;
/// assert_eq!(digest, Digest::of(b"hello"));
/// assert_eq!(cas.read(&digest).await?.as_deref(), Some(&b"hello"[..]));
/// assert_eq!(cas.find_missing(&[digest, Digest::of(b"other")]), vec![Digest::of(b"other")]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Cas {
    dir: LruDir,
    /// The empty blob is always present.
    _empty: Arc<Pins>,
}

/// A CAS operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CasError {
    /// The blob's content does not match the digest it was stored under.
    #[error("digest mismatch: the data uploaded as {expected} has digest {actual}")]
    DigestMismatch {
        /// The digest the client named.
        expected: Digest,
        /// The digest of the bytes received.
        actual: Digest,
    },
    /// More bytes arrived than the digest's size.
    #[error("blob {expected} is {size} bytes long, but more data was sent (at least {received} bytes)", size = expected.size())]
    TooMuchData {
        /// The digest the client named.
        expected: Digest,
        /// Bytes received so far.
        received: u64,
    },
    /// The blob is larger than this whole CAS.
    #[error("blob {digest} is larger than this replica's CAS bound of {max} bytes")]
    TooLarge {
        /// The blob.
        digest: Digest,
        /// The bound.
        max: u64,
    },
    /// The file system failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl CasError {
    fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> CasError {
        let context = context.into();
        move |source| CasError::Io { context, source }
    }

    fn insert(digest: Digest, error: InsertError) -> CasError {
        match error {
            InsertError::TooLarge { max, .. } => CasError::TooLarge { digest, max },
            InsertError::Io(source) => CasError::Io {
                context: format!("storing blob {digest}"),
                source,
            },
        }
    }
}

impl Cas {
    /// Opens (creating if needed) the CAS in `dir` (blobs in `dir/blobs`, temporary files in
    /// `dir/tmp`), bounded to `max_bytes`, and indexes the blobs a previous run left.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, CasError> {
        let tmp = dir.join("tmp");
        // Temporary files of a previous run were never committed: drop them.
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(CasError::io(format!(
                "clearing the temporary directory {}",
                tmp.display()
            )))?;
        }
        let store = LruDir::open(&dir.join("blobs"), &tmp, max_bytes).map_err(CasError::io(
            format!("opening the CAS in {}", dir.display()),
        ))?;
        let (file, path) = store
            .temp_file()
            .map_err(CasError::io("creating the empty blob"))?;
        drop(file);
        store
            .commit(Digest::EMPTY, path, 0)
            .map_err(|e| CasError::insert(Digest::EMPTY, e))?;
        let (pins, _) = store.pin([Digest::EMPTY]);
        Ok(Self {
            dir: store,
            _empty: Arc::new(pins),
        })
    }

    /// Whether the blob is here; a hit counts as a use (REAPI: `FindMissingBlobs` extends a
    /// blob's life).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.dir.touch(digest)
    }

    /// Every blob here now (a snapshot; handoff walks it).
    pub(crate) fn digests(&self) -> Vec<Digest> {
        self.dir.keys()
    }

    /// The digests of `digests` that are not here, in order, each once.
    pub fn find_missing(&self, digests: &[Digest]) -> Vec<Digest> {
        let mut seen = std::collections::HashSet::new();
        digests
            .iter()
            .filter(|d| seen.insert(**d) && !self.contains(d))
            .copied()
            .collect()
    }

    /// The whole blob, if it is here. Meant for small blobs (actions, commands, directories,
    /// batch reads); stream large ones with [`Cas::open_reader`].
    pub async fn read(&self, digest: &Digest) -> Result<Option<Bytes>, CasError> {
        if !self.dir.touch(digest) {
            return Ok(None);
        }
        match tokio::fs::read(self.dir.path(digest)).await {
            Ok(data) if data.len() as u64 == digest.size() => Ok(Some(Bytes::from(data))),
            Ok(_) => {
                tracing::warn!(%digest, "a CAS file has the wrong size; dropping it");
                self.dir.remove(digest);
                Ok(None)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.dir.remove(digest);
                Ok(None)
            }
            Err(e) => Err(CasError::io(format!("reading blob {digest}"))(e)),
        }
    }

    /// An open file with the blob's bytes, if it is here. The handle stays readable even if
    /// the blob is evicted meanwhile.
    pub async fn open_reader(&self, digest: &Digest) -> Result<Option<tokio::fs::File>, CasError> {
        if !self.dir.touch(digest) {
            return Ok(None);
        }
        match tokio::fs::File::open(self.dir.path(digest)).await {
            Ok(file) => Ok(Some(file)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.dir.remove(digest);
                Ok(None)
            }
            Err(e) => Err(CasError::io(format!("opening blob {digest}"))(e)),
        }
    }

    /// Stores `data` under its own digest and returns the digest.
    pub async fn put(&self, data: Bytes) -> Result<Digest, CasError> {
        let digest = Digest::of(&data);
        self.put_expecting(digest, data).await?;
        Ok(digest)
    }

    /// Stores `data` if it matches `expected`; a mismatch is refused and nothing is stored.
    pub async fn put_expecting(&self, expected: Digest, data: Bytes) -> Result<(), CasError> {
        if self.dir.touch(&expected) {
            // Still check what the client sent, so a bad upload is reported, not hidden.
            let actual = Digest::of(&data);
            return if actual == expected {
                Ok(())
            } else {
                Err(CasError::DigestMismatch { expected, actual })
            };
        }
        let mut writer = self.writer(expected)?;
        writer.write(&data).await?;
        writer.commit().await
    }

    /// A streaming writer for a blob that must turn out to be `expected`.
    pub fn writer(&self, expected: Digest) -> Result<BlobWriter, CasError> {
        let max = self.dir.max_bytes();
        if expected.size() > max {
            return Err(CasError::TooLarge {
                digest: expected,
                max,
            });
        }
        let (file, path) = self
            .dir
            .temp_file()
            .map_err(CasError::io("creating a temporary file"))?;
        Ok(BlobWriter {
            cas: self.clone(),
            expected,
            file: tokio::fs::File::from_std(file),
            path,
            hasher: Hasher::new(),
        })
    }

    /// Copies the file at `source` into the CAS, hashing while copying, and returns its
    /// digest. Blocking: call from a blocking thread.
    pub(crate) fn store_file(&self, source: &Path) -> Result<Digest, CasError> {
        let context = || format!("storing output {}", source.display());
        let mut input = fs::File::open(source).map_err(CasError::io(context()))?;
        let (mut output, path) = self
            .dir
            .temp_file()
            .map_err(CasError::io("creating a temporary file"))?;
        let mut hasher = Hasher::new();
        let mut buffer = vec![0u8; COPY_BUFFER];
        loop {
            let n = match input.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(CasError::io(context())(e)),
            };
            hasher.update(&buffer[..n]);
            output
                .write_all(&buffer[..n])
                .map_err(CasError::io(context()))?;
        }
        drop(output);
        let digest = hasher.finish();
        self.commit_temp(digest, path)?;
        Ok(digest)
    }

    /// Stores `data` (already in memory) from a blocking thread.
    pub(crate) fn store_bytes_blocking(&self, data: &[u8]) -> Result<Digest, CasError> {
        let digest = Digest::of(data);
        if self.dir.touch(&digest) {
            return Ok(digest);
        }
        let (mut output, path) = self
            .dir
            .temp_file()
            .map_err(CasError::io("creating a temporary file"))?;
        output
            .write_all(data)
            .map_err(CasError::io(format!("writing blob {digest}")))?;
        drop(output);
        self.commit_temp(digest, path)?;
        Ok(digest)
    }

    fn commit_temp(&self, digest: Digest, path: TempPath) -> Result<(), CasError> {
        self.dir
            .commit(digest, path, digest.size())
            .map_err(|e| CasError::insert(digest, e))
    }

    /// Copies a blob to `dest` (a new file) with the given executable bit. Blocking.
    /// Returns `Ok(false)` if the blob is not here.
    pub(crate) fn copy_out(
        &self,
        digest: &Digest,
        dest: &Path,
        executable: bool,
    ) -> Result<bool, CasError> {
        let source = self.dir.path(digest);
        match fs::copy(&source, dest) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound && !source.exists() => {
                self.dir.remove(digest);
                return Ok(false);
            }
            Err(e) => {
                return Err(CasError::io(format!(
                    "copying blob {digest} to {}",
                    dest.display()
                ))(e));
            }
        }
        let mode = if executable { 0o755 } else { 0o644 };
        fs::set_permissions(dest, fs::Permissions::from_mode(mode)).map_err(CasError::io(
            format!("setting the mode of {}", dest.display()),
        ))?;
        Ok(true)
    }

    /// Pins present blobs against eviction; returns the guard and the digests not present.
    pub(crate) fn pin(&self, digests: impl IntoIterator<Item = Digest>) -> (Pins, Vec<Digest>) {
        self.dir.pin(digests)
    }

    /// The path a blob is stored at (tests use it to check that nothing else is).
    pub fn path_of(&self, digest: &Digest) -> PathBuf {
        self.dir.path(digest)
    }

    /// The bound in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.dir.max_bytes()
    }

    /// Current usage.
    pub fn usage(&self) -> StoreUsage {
        self.dir.usage()
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn cas(max: u64) -> (tempfile::TempDir, Cas) {
        let dir = tempfile::tempdir().unwrap();
        let cas = Cas::open(dir.path(), max).unwrap();
        (dir, cas)
    }

    fn tmp_files(dir: &Path) -> usize {
        fs::read_dir(dir.join("tmp")).unwrap().count()
    }

    #[tokio::test]
    async fn the_empty_blob_is_always_present() {
        let (_dir, cas) = cas(10);
        assert!(cas.contains(&Digest::EMPTY));
        assert_eq!(cas.read(&Digest::EMPTY).await.unwrap().unwrap().len(), 0);
        for i in 0..5u8 {
            cas.put(Bytes::from(vec![i; 10])).await.unwrap();
        }
        assert!(cas.contains(&Digest::EMPTY), "pinned: never evicted");
    }

    #[tokio::test]
    async fn streamed_writes_are_checked_before_they_are_visible() {
        let (dir, cas) = cas(1 << 20);
        let data = b"hello, world".repeat(100);
        let digest = Digest::of(&data);
        let mut writer = cas.writer(digest).unwrap();
        for chunk in data.chunks(7) {
            writer.write(chunk).await.unwrap();
            assert!(!cas.contains(&digest), "nothing visible before commit");
        }
        writer.commit().await.unwrap();
        assert_eq!(cas.read(&digest).await.unwrap().unwrap(), data);
        assert_eq!(tmp_files(dir.path()), 0);
    }

    #[tokio::test]
    async fn a_digest_mismatch_names_both_digests_and_stores_nothing() {
        let (dir, cas) = cas(1 << 20);
        let claimed = Digest::of(b"hello");
        let mut writer = cas.writer(claimed).unwrap();
        writer.write(b"HELLO").await.unwrap();
        let error = writer.commit().await.unwrap_err();
        let message = error.to_string();
        assert!(message.contains(&claimed.to_string()), "{message}");
        assert!(
            message.contains(&Digest::of(b"HELLO").to_string()),
            "{message}"
        );
        assert!(!cas.contains(&claimed));
        assert!(!cas.contains(&Digest::of(b"HELLO")));
        assert_eq!(tmp_files(dir.path()), 0, "the temporary file is gone");
        // The same through put_expecting.
        let error = cas
            .put_expecting(claimed, Bytes::from_static(b"HELLO"))
            .await
            .unwrap_err();
        assert!(matches!(error, CasError::DigestMismatch { .. }), "{error}");
    }

    #[tokio::test]
    async fn extra_data_is_refused_and_abandoned_writes_leave_nothing() {
        let (dir, cas) = cas(1 << 20);
        let digest = Digest::of(b"abc");
        let mut writer = cas.writer(digest).unwrap();
        writer.write(b"ab").await.unwrap();
        let error = writer.write(b"cd").await.unwrap_err();
        assert!(error.to_string().contains("at least 4 bytes"), "{error}");
        drop(writer);
        assert_eq!(tmp_files(dir.path()), 0);
        assert!(!cas.contains(&digest));
    }

    #[tokio::test]
    async fn blobs_larger_than_the_bound_are_refused_up_front() {
        let (_dir, cas) = cas(4);
        let digest = Digest::of(b"too large");
        let error = cas.writer(digest).unwrap_err();
        assert!(error.to_string().contains("bound of 4 bytes"), "{error}");
    }

    #[tokio::test]
    async fn eviction_keeps_the_cas_within_its_bound() {
        let (_dir, cas) = cas(100);
        let mut digests = Vec::new();
        for i in 0..10u8 {
            digests.push(cas.put(Bytes::from(vec![i; 30])).await.unwrap());
        }
        let usage = cas.usage();
        assert!(usage.bytes <= 100, "{usage:?}");
        assert_eq!(usage.evictions, 7);
        // The most recent three survive; the oldest are gone, files included.
        for (i, digest) in digests.iter().enumerate() {
            assert_eq!(cas.contains(digest), i >= 7, "blob {i}");
            assert_eq!(cas.path_of(digest).exists(), i >= 7, "file {i}");
        }
    }

    #[tokio::test]
    async fn stored_files_and_copies_are_independent() {
        let (dir, cas) = cas(1 << 20);
        let source = dir.path().join("output");
        fs::write(&source, b"produced").unwrap();
        let digest = cas.store_file(&source).unwrap();
        assert_eq!(digest, Digest::of(b"produced"));
        // Rewriting the source afterwards does not change the blob.
        fs::write(&source, b"tampered").unwrap();
        assert_eq!(cas.read(&digest).await.unwrap().unwrap(), &b"produced"[..]);
        let copy = dir.path().join("input");
        assert!(cas.copy_out(&digest, &copy, true).unwrap());
        assert_eq!(
            fs::metadata(&copy).unwrap().permissions().mode() & 0o777,
            0o755
        );
        fs::write(&copy, b"tampered too").unwrap();
        assert_eq!(cas.read(&digest).await.unwrap().unwrap(), &b"produced"[..]);
        assert!(
            !cas.copy_out(&Digest::of(b"absent"), &copy, false)
                .unwrap_or(true)
        );
    }

    #[tokio::test]
    async fn reopening_keeps_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let digest = {
            let cas = Cas::open(dir.path(), 1 << 20).unwrap();
            cas.put(Bytes::from_static(b"persisted")).await.unwrap()
        };
        let cas = Cas::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(cas.read(&digest).await.unwrap().unwrap(), &b"persisted"[..]);
    }
}
