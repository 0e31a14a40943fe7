//! The local content-addressable storage of one replica: blobs on disk, bounded in bytes,
//! least recently used evicted first.
//!
//! Every blob is written to a temporary file, its SHA-256 and size are checked against the
//! digest it claims, and only then is it renamed into place ([`crate::lru_dir`] explains the
//! directory layout and the eviction rules). A blob that fails the check never becomes
//! visible, and a write that is abandoned halfway (the client went away, the stream broke)
//! leaves nothing behind.
//!
//! Executions never work on CAS files directly: inputs are *copied* into the action's own
//! directory and outputs are *copied* (and hashed while copying) into the CAS, so an action
//! that rewrites its inputs, or a stray process that keeps writing to its outputs, cannot
//! change a stored blob.
//!
//! # A blob served is the blob stored
//!
//! Blob files are read-only (`0o444`) in directories only the server's user may change
//! ([`crate::lru_dir`]). That stops stray writes, not a process of the server's own user, which
//! may `chmod` first: the protection against actions is the executor's sandbox, in which the
//! data directory is not visible at all. Whatever gets past both (an action run with the
//! sandbox switched off, an operator's mistake, a failing disk) is caught on the way out:
//! **every way a blob leaves this store hashes the very bytes that leave, every time**:
//!
//! * [`Cas::read`] hashes what it read into memory before returning it;
//! * [`BlobReader`] (`ByteStream.Read`, blobs pushed to peers) hashes the file as it hands it
//!   out in pieces, and returns the piece that completes the requested range only once the
//!   whole file has been hashed and matched: a caller that received every piece has served the
//!   blob as it was stored, and a blob that fits in one piece is checked before anything of it
//!   is sent;
//! * `Cas::copy_out` (inputs copied into an action's directory) hashes as it copies.
//!
//! A blob that does not match (other bytes, or another size) is removed, entry and file, and
//! counted ([`Cas::corrupt_blobs_dropped`], the `reapi_corrupt_blobs_total` counter),
//! logged with its digest, and reported as missing, so the cluster fetches a good copy from
//! another replica ([`crate::ClusterCas`] does when a read finds nothing here).
//!
//! **The cost, and why every time rather than once.** Measured on the development machine (a
//! 2-core Xeon VM whose CPU has the SHA extensions, which `sha2` uses; release build; best of
//! five runs while other builds shared the machine; the ignored test `verification_cost` in
//! this module reproduces the figures), per GiB:
//!
//! | | unchecked | checked |
//! |---|---|---|
//! | SHA-256 over bytes in memory | — | 0.75 s |
//! | read in 1 MiB pieces from the page cache ([`BlobReader`]) | 0.11 s | 0.89 s |
//! | read whole into memory ([`Cas::read`]) | 0.50 s | 1.24 s |
//! | copied into an action (`fs::copy` / `copy_out`) | 0.62 s | 1.43 s |
//! | 10,000 blobs of 10 KiB (98 MiB) copied into actions | 0.24 s | 0.33 s |
//!
//! So the check costs about 0.75 s of one core per GiB served or copied (SHA-256 runs at
//! about 1.3 GiB/s here), and about 9 µs per small input. Checking each blob once per process
//! life and remembering it, the alternative the design allows, would make later reads nearly
//! free, but a remembered check says nothing about the file *now*: a process of the server's
//! user can rewrite a blob after it was checked, and neither the mode bits nor the file's
//! change time prove it did not (a writable shared mapping taken while the file was writable
//! keeps writing after `chmod 444`, and a dirty page is rewritten without touching either
//! time). With the sandbox switched off, or for a disk that fails after the first read, a
//! remembered check would serve the other bytes. Checking the whole file before streaming it
//! would read it twice, delay the first byte by 0.89 s per GiB, and still leave a window
//! between the check and the send. Hashing the bytes that leave has no such window and needs
//! no second pass: the hash runs as the bytes are read, on the blocking pool rather than the
//! async workers. Its one price: a blob of several pieces found corrupt ends its stream with
//! an error after its first pieces went out (a client discards an incomplete read; Bazel also
//! checks the digest of what it downloads). So this store checks every time, and pays about
//! 0.75 s of CPU per GiB for it. (The empty blob is served from memory: there is nothing on
//! disk to check.)
//!
//! This store knows nothing of gRPC or of peers; [`crate::ClusterCas`] adds fetching from
//! peers on top.

use std::{
    fs,
    io::{self, Read as _, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use tempfile::TempPath;

use crate::{
    Digest, DigestFunction,
    digest::Hasher,
    lru_dir::{InsertError, LruDir, Pins, StoreUsage},
};

/// The largest blob [`Cas::store_reader`] reads into memory before storing it.
const SMALL_BLOB: usize = 64 * 1024;

/// The piece size of copies and checked reads.
pub(super) const COPY_BUFFER: usize = 256 * 1024;

mod reader;
mod writer;

pub use reader::BlobReader;
pub use writer::BlobWriter;

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
    /// Blobs found not to match their digest and removed, since start.
    corrupt_dropped: Arc<AtomicU64>,
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
    /// A stored blob did not match its digest while it was being read; it has been removed
    /// (see the module docs), and reading it again fetches a good copy or finds it missing.
    #[error(
        "blob {digest} on this replica did not match its digest and has been dropped; read it again"
    )]
    Corrupt {
        /// The blob.
        digest: Digest,
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
        let store = LruDir::open("cas", &dir.join("blobs"), &tmp, max_bytes).map_err(
            CasError::io(format!("opening the CAS in {}", dir.display())),
        )?;
        // The empty blob under every digest function.
        let empties = DigestFunction::ALL.map(DigestFunction::empty);
        for empty in empties {
            let (file, path) = store
                .temp_file()
                .map_err(CasError::io("creating the empty blob"))?;
            drop(file);
            store
                .commit(empty, path, 0)
                .map_err(|e| CasError::insert(empty, e))?;
        }
        let (pins, _) = store.pin(empties);
        Ok(Self {
            dir: store,
            _empty: Arc::new(pins),
            corrupt_dropped: Arc::default(),
        })
    }

    /// Blobs found not to match their digest when read, and removed, since this CAS was
    /// opened.
    pub fn corrupt_blobs_dropped(&self) -> u64 {
        self.corrupt_dropped.load(Ordering::Relaxed)
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

    /// Whether each of `digests` is here, in order; a hit counts as a use.
    pub fn present(&self, digests: &[Digest]) -> Vec<bool> {
        self.dir.present(digests)
    }

    /// The digests of `digests` that are not here, in order, each once.
    pub fn find_missing(&self, digests: &[Digest]) -> Vec<Digest> {
        let mut seen = std::collections::HashSet::with_capacity(digests.len());
        let unique: Vec<Digest> = digests
            .iter()
            .filter(|d| seen.insert(**d))
            .copied()
            .collect();
        self.dir.missing(&unique)
    }

    /// The whole blob, if it is here and matches its digest. Meant for small blobs (actions,
    /// commands, directories, batch reads); stream large ones with [`Cas::open_reader`].
    ///
    /// The bytes read are hashed before they are returned; a blob that does not match is
    /// removed and reported as missing (`Ok(None)`), see the module docs.
    pub async fn read(&self, digest: &Digest) -> Result<Option<Bytes>, CasError> {
        if !self.dir.touch(digest) {
            return Ok(None);
        }
        let cas = self.clone();
        let digest = *digest;
        blocking(digest, move || cas.read_blocking(&digest)).await
    }

    fn read_blocking(&self, digest: &Digest) -> Result<Option<Bytes>, CasError> {
        if digest.is_empty() {
            // Always present, and nothing on disk can change it.
            return Ok(Some(Bytes::new()));
        }
        let Some((file, metadata)) = self.open_stored(digest)? else {
            return Ok(None);
        };
        let mut data = Vec::with_capacity(usize::try_from(digest.size()).unwrap_or(0));
        // Through a reference: the file stays open until it is dropped if corrupt.
        (&file)
            .take(digest.size().saturating_add(1))
            .read_to_end(&mut data)
            .map_err(CasError::io(format!("reading blob {digest}")))?;
        let actual = Digest::of_with(digest.function(), &data);
        if actual != *digest {
            self.drop_corrupt(
                digest,
                &metadata,
                &format!("its bytes have digest {actual}"),
            );
            return Ok(None);
        }
        Ok(Some(Bytes::from(data)))
    }

    /// Opens a stored blob's file, if it is there and has the digest's size; a file of
    /// another size is dropped as corrupt.
    fn open_stored(&self, digest: &Digest) -> Result<Option<(fs::File, fs::Metadata)>, CasError> {
        let file = match fs::File::open(self.dir.path(digest)) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.dir.remove(digest);
                return Ok(None);
            }
            Err(e) => return Err(CasError::io(format!("opening blob {digest}"))(e)),
        };
        let metadata = file.metadata().map_err(CasError::io(format!(
            "reading the metadata of blob {digest}"
        )))?;
        if metadata.len() != digest.size() {
            self.drop_corrupt(
                digest,
                &metadata,
                &format!("its file is {} bytes long", metadata.len()),
            );
            return Ok(None);
        }
        Ok(Some((file, metadata)))
    }

    /// Removes a blob found not to match its digest (unless a new file replaced it
    /// meanwhile), and counts and logs it.
    pub(super) fn drop_corrupt(&self, digest: &Digest, file: &fs::Metadata, found: &str) {
        if self.dir.remove_if_file(digest, file) {
            self.corrupt_dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("reapi_corrupt_blobs_total").increment(1);
            tracing::warn!(
                %digest,
                found,
                "a stored blob does not match its digest; it was dropped and is missing here now"
            );
        }
    }

    /// A reader of the blob, if it is here (see [`BlobReader`]: the bytes it hands out are
    /// checked against the digest). The open file stays readable even if the blob is evicted
    /// meanwhile. A file of the wrong size is dropped at once and reported as missing.
    pub async fn open_reader(&self, digest: &Digest) -> Result<Option<BlobReader>, CasError> {
        if !self.dir.touch(digest) {
            return Ok(None);
        }
        if digest.is_empty() {
            return Ok(Some(BlobReader::new(self.clone(), *digest, None)));
        }
        let cas = self.clone();
        let target = *digest;
        let opened = blocking(target, move || cas.open_stored(&target)).await?;
        Ok(opened
            .map(|(file, metadata)| BlobReader::new(self.clone(), target, Some((file, metadata)))))
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
            let actual = Digest::of_with(expected.function(), &data);
            return if actual == expected {
                Ok(())
            } else {
                Err(CasError::DigestMismatch { expected, actual })
            };
        }
        self.check_size(expected)?;
        // Checked, written and committed on the blocking pool: creating a file is file-system
        // work (and the replica's runtime may be a single thread).
        let cas = self.clone();
        blocking(expected, move || {
            let actual = Digest::of_with(expected.function(), &data);
            if actual != expected {
                return Err(CasError::DigestMismatch { expected, actual });
            }
            cas.store_checked_blocking(expected, &data)
        })
        .await
    }

    /// A streaming writer for a blob that must turn out to be `expected`.
    pub async fn writer(&self, expected: Digest) -> Result<BlobWriter, CasError> {
        self.check_size(expected)?;
        let dir = self.dir.clone();
        let (file, path) = blocking(expected, move || {
            dir.temp_file()
                .map_err(CasError::io("creating a temporary file"))
        })
        .await?;
        Ok(BlobWriter::new(self.clone(), expected, file, path))
    }

    /// A blob larger than the whole store is refused before anything is written.
    fn check_size(&self, digest: Digest) -> Result<(), CasError> {
        let max = self.dir.max_bytes();
        if digest.size() > max {
            return Err(CasError::TooLarge { digest, max });
        }
        Ok(())
    }

    /// Copies everything `input` yields into the CAS, hashing while copying, and returns its
    /// digest (`context` names it in errors). Blocking: call from a blocking thread.
    pub(crate) fn store_reader(
        &self,
        input: &mut impl io::Read,
        context: &str,
        function: DigestFunction,
    ) -> Result<Digest, CasError> {
        // A small blob (most outputs, and an action's stdout and stderr) is read into memory
        // first, so one that is empty or already here costs no temporary file: creating and
        // deleting files is most of what an action's bookkeeping costs the file system.
        let mut head = Vec::new();
        input
            .take(SMALL_BLOB as u64 + 1)
            .read_to_end(&mut head)
            .map_err(CasError::io(context.to_owned()))?;
        if head.len() <= SMALL_BLOB {
            return self.store_bytes_blocking(&head, function);
        }
        let context = || context.to_owned();
        let (mut output, path) = self
            .dir
            .temp_file()
            .map_err(CasError::io("creating a temporary file"))?;
        let mut hasher = Hasher::for_function(function);
        hasher.update(&head);
        output.write_all(&head).map_err(CasError::io(context()))?;
        let digest = copy_hashing(input, &mut output, COPY_BUFFER, &context, hasher)?;
        drop(output);
        self.commit_temp(digest, path)?;
        Ok(digest)
    }

    /// Stores `data` (already in memory) under its digest by `function`, from a blocking
    /// thread.
    pub(crate) fn store_bytes_blocking(
        &self,
        data: &[u8],
        function: DigestFunction,
    ) -> Result<Digest, CasError> {
        let digest = Digest::of_with(function, data);
        self.store_checked_blocking(digest, data)?;
        Ok(digest)
    }

    /// Stores `data`, known to match `digest`, unless it is here already; blocking.
    fn store_checked_blocking(&self, digest: Digest, data: &[u8]) -> Result<(), CasError> {
        if self.dir.touch(&digest) {
            return Ok(());
        }
        let (mut output, path) = self
            .dir
            .temp_file()
            .map_err(CasError::io("creating a temporary file"))?;
        output
            .write_all(data)
            .map_err(CasError::io(format!("writing blob {digest}")))?;
        drop(output);
        self.commit_temp(digest, path)
    }

    pub(super) fn commit_temp(&self, digest: Digest, path: TempPath) -> Result<(), CasError> {
        self.dir
            .commit(digest, path, digest.size())
            .map_err(|e| CasError::insert(digest, e))
    }

    /// Copies a blob to `dest` (a new file) with the given executable bit, hashing as it
    /// copies. Blocking. Returns `Ok(false)` if the blob is not here, or if what was copied
    /// does not match its digest: then the copy is deleted and the blob dropped from the CAS
    /// (see the module docs), so the caller treats it as missing.
    pub(crate) fn copy_out(
        &self,
        digest: &Digest,
        dest: &Path,
        executable: bool,
    ) -> Result<bool, CasError> {
        let context = || format!("copying blob {digest} to {}", dest.display());
        let source = if digest.is_empty() {
            None
        } else {
            match self.open_stored(digest)? {
                Some(source) => Some(source),
                None => return Ok(false),
            }
        };
        let mut output = fs::File::create(dest).map_err(CasError::io(context()))?;
        if let Some((input, metadata)) = source {
            let mut input = input.take(digest.size().saturating_add(1));
            let buffer = COPY_BUFFER.min(usize::try_from(digest.size()).unwrap_or(COPY_BUFFER));
            let actual = copy_hashing(
                &mut input,
                &mut output,
                buffer,
                &context,
                Hasher::for_function(digest.function()),
            )?;
            if actual != *digest {
                drop(output);
                fs::remove_file(dest).map_err(CasError::io(format!(
                    "deleting the corrupt copy of blob {digest} at {}",
                    dest.display()
                )))?;
                self.drop_corrupt(
                    digest,
                    &metadata,
                    &format!("its bytes have digest {actual}"),
                );
                return Ok(false);
            }
        }
        drop(output);
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

/// Copies `input` to `output` in pieces of `buffer` bytes, hashing what passes with `hasher`
/// (which may have hashed a first part already), and returns the digest (`context` names the
/// copy in errors). Blocking.
fn copy_hashing(
    input: &mut impl io::Read,
    output: &mut impl io::Write,
    buffer: usize,
    context: &dyn Fn() -> String,
    mut hasher: Hasher,
) -> Result<Digest, CasError> {
    let mut buffer = vec![0u8; buffer.max(1)];
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
    Ok(hasher.finish())
}

/// Runs blocking file work for `digest` on the blocking pool.
async fn blocking<T: Send + 'static>(
    digest: Digest,
    work: impl FnOnce() -> Result<T, CasError> + Send + 'static,
) -> Result<T, CasError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| CasError::Io {
            context: format!("file work on blob {digest}"),
            source: io::Error::other(e),
        })?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cas(max: u64) -> (tempfile::TempDir, Cas) {
        let dir = tempfile::tempdir().unwrap();
        let cas = Cas::open(dir.path(), max).unwrap();
        (dir, cas)
    }

    const READ_PIECE: usize = 1 << 20;

    fn tmp_files(dir: &Path) -> usize {
        fs::read_dir(dir.join("tmp")).unwrap().count()
    }

    #[tokio::test]
    async fn stored_readers_of_every_size_around_the_in_memory_limit_keep_their_bytes() {
        let (dir, cas) = cas(1 << 24);
        for size in [
            0,
            1,
            SMALL_BLOB - 1,
            SMALL_BLOB,
            SMALL_BLOB + 1,
            3 * SMALL_BLOB + 7,
        ] {
            let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            for function in [DigestFunction::Sha256, DigestFunction::Blake3] {
                let digest = cas
                    .store_reader(&mut &data[..], "a test output", function)
                    .unwrap();
                assert_eq!(digest, Digest::of_with(function, &data), "{size} bytes");
                assert_eq!(cas.read(&digest).await.unwrap().unwrap(), data, "{size}");
                // Stored again: the same digest, nothing left behind.
                let again = cas
                    .store_reader(&mut &data[..], "a test output", function)
                    .unwrap();
                assert_eq!(again, digest);
                assert_eq!(tmp_files(dir.path()), 0, "{size} bytes");
            }
        }
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
        let mut writer = cas.writer(digest).await.unwrap();
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
        let mut writer = cas.writer(claimed).await.unwrap();
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
        let mut writer = cas.writer(digest).await.unwrap();
        writer.write(b"ab").await.unwrap();
        let error = writer.write(b"cd").await.unwrap_err();
        assert!(error.to_string().contains("at least 4 bytes"), "{error}");
        drop(writer);
        assert_eq!(tmp_files(dir.path()), 0);
        assert!(!cas.contains(&digest));
    }

    #[tokio::test]
    async fn a_piece_that_cannot_be_written_fails_the_blob_and_stores_nothing() {
        let (dir, cas) = cas(1 << 20);
        let data = b"written behind".to_vec();
        let digest = Digest::of(&data);
        // The temporary file opened read-only: the write of the first piece fails.
        let (_file, path) = cas.dir.temp_file().unwrap();
        let read_only = fs::File::open(&path).unwrap();
        let mut writer = BlobWriter::new(cas.clone(), digest, read_only, path);
        writer.write(&data[..5]).await.unwrap();
        let error = writer.write(&data[5..]).await.unwrap_err();
        assert!(
            error
                .to_string()
                .contains(&format!("writing blob {digest}")),
            "{error}"
        );
        let error = writer.commit().await.unwrap_err();
        assert!(error.to_string().contains("an earlier piece"), "{error}");
        assert!(!cas.contains(&digest));
        assert_eq!(tmp_files(dir.path()), 0);
    }

    #[tokio::test]
    async fn blobs_larger_than_the_bound_are_refused_up_front() {
        let (_dir, cas) = cas(4);
        let digest = Digest::of(b"too large");
        let error = cas.writer(digest).await.unwrap_err();
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
        let digest = cas
            .store_reader(
                &mut fs::File::open(&source).unwrap(),
                "output",
                DigestFunction::Sha256,
            )
            .unwrap();
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

    /// Overwrites a stored blob's file in place with as many other bytes, as a process of the
    /// server's user could (it makes the file writable first).
    fn tamper(cas: &Cas, digest: &Digest) {
        let path = cas.path_of(digest);
        let mut bytes = fs::read(&path).unwrap();
        for byte in &mut bytes {
            *byte = byte.wrapping_add(1);
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&path, &bytes).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), digest.size());
    }

    /// The blob is gone: from the index, from the disk, and counted.
    fn assert_dropped(cas: &Cas, digest: &Digest, dropped: u64) {
        assert!(!cas.contains(digest), "still indexed");
        assert!(!cas.path_of(digest).exists(), "its file is still there");
        assert_eq!(cas.corrupt_blobs_dropped(), dropped);
    }

    /// Every piece of `[offset, end)` of the blob, `max` bytes at a time.
    async fn read_range(
        cas: &Cas,
        digest: &Digest,
        offset: u64,
        end: u64,
        max: usize,
    ) -> Result<Vec<Vec<u8>>, CasError> {
        let mut reader = cas.open_reader(digest).await?.unwrap().range(offset, end);
        let mut pieces = Vec::new();
        while let Some(piece) = reader.next_chunk(max).await? {
            pieces.push(piece);
        }
        Ok(pieces)
    }

    #[tokio::test]
    async fn a_tampered_blob_is_missing_to_read_and_removed() {
        let (_dir, cas) = cas(1 << 20);
        let data = Bytes::from(b"stored bytes".repeat(10));
        let digest = cas.put(data.clone()).await.unwrap();
        assert_eq!(cas.read(&digest).await.unwrap(), Some(data.clone()));
        tamper(&cas, &digest);
        assert_eq!(
            cas.read(&digest).await.unwrap(),
            None,
            "never the other bytes"
        );
        assert_dropped(&cas, &digest, 1);
        // Stored again (a good copy fetched from a peer), it is served again.
        cas.put(data.clone()).await.unwrap();
        assert_eq!(cas.read(&digest).await.unwrap(), Some(data));
        assert_eq!(cas.corrupt_blobs_dropped(), 1);
    }

    #[tokio::test]
    async fn a_blob_file_of_another_size_is_missing_and_removed() {
        let (_dir, cas) = cas(1 << 20);
        let digest = cas.put(Bytes::from_static(b"twelve bytes")).await.unwrap();
        let path = cas.path_of(&digest);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&path, b"short").unwrap();
        assert!(cas.open_reader(&digest).await.unwrap().is_none());
        assert_dropped(&cas, &digest, 1);
    }

    #[tokio::test]
    async fn the_reader_serves_ranges_of_the_stored_bytes() {
        let (_dir, cas) = cas(1 << 20);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let digest = cas.put(Bytes::from(data.clone())).await.unwrap();
        let whole = read_range(&cas, &digest, 0, u64::MAX, 4096).await.unwrap();
        assert_eq!(
            whole.iter().map(Vec::len).collect::<Vec<_>>(),
            [4096, 4096, 1808]
        );
        assert_eq!(whole.concat(), data);
        let part = read_range(&cas, &digest, 5000, 7000, 4096).await.unwrap();
        assert_eq!(part.concat(), &data[5000..7000]);
        assert!(
            read_range(&cas, &digest, 10_000, 10_000, 4096)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            read_range(&cas, &Digest::EMPTY, 0, 0, 4096)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(cas.corrupt_blobs_dropped(), 0);
    }

    #[tokio::test]
    async fn the_reader_never_completes_a_tampered_blob() {
        let (_dir, cas) = cas(1 << 20);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let digest = cas.put(Bytes::from(data.clone())).await.unwrap();
        tamper(&cas, &digest);
        // In pieces: the ones before the last may go out, the last never does.
        let mut reader = cas.open_reader(&digest).await.unwrap().unwrap();
        assert_eq!(reader.next_chunk(4096).await.unwrap().unwrap().len(), 4096);
        assert_eq!(reader.next_chunk(4096).await.unwrap().unwrap().len(), 4096);
        // (Lengths only in a failure message: the bytes would fill the screen.)
        let last = reader.next_chunk(4096).await.map(|p| p.map(|p| p.len()));
        assert!(
            matches!(last, Err(CasError::Corrupt { digest: d }) if d == digest),
            "{last:?}"
        );
        assert!(
            reader.next_chunk(4096).await.unwrap().is_none(),
            "nothing after that"
        );
        assert_dropped(&cas, &digest, 1);

        // In one piece: nothing at all goes out.
        let digest = cas.put(Bytes::from(data.clone())).await.unwrap();
        tamper(&cas, &digest);
        let pieces = read_range(&cas, &digest, 0, u64::MAX, 1 << 20).await;
        let pieces = pieces.map(|p| p.len());
        assert!(
            matches!(pieces, Err(CasError::Corrupt { .. })),
            "{pieces:?}"
        );
        assert_dropped(&cas, &digest, 2);

        // A range whose own bytes are intact is refused too: the whole blob is checked.
        let digest = cas.put(Bytes::from(data.clone())).await.unwrap();
        let path = cas.path_of(&digest);
        let mut bytes = fs::read(&path).unwrap();
        bytes[9_999] ^= 1;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&path, &bytes).unwrap();
        let pieces = read_range(&cas, &digest, 100, 200, 4096).await;
        let pieces = pieces.map(|p| p.len());
        assert!(
            matches!(pieces, Err(CasError::Corrupt { .. })),
            "{pieces:?}"
        );
        assert_dropped(&cas, &digest, 3);
    }

    #[tokio::test]
    async fn copy_out_never_copies_a_tampered_blob() {
        let (dir, cas) = cas(1 << 20);
        let data = Bytes::from(b"an input".repeat(100_000));
        let digest = cas.put(data.clone()).await.unwrap();
        let copy = dir.path().join("input");
        assert!(cas.copy_out(&digest, &copy, false).unwrap());
        assert_eq!(fs::read(&copy).unwrap(), data);
        fs::remove_file(&copy).unwrap();
        tamper(&cas, &digest);
        assert!(
            !cas.copy_out(&digest, &copy, false).unwrap(),
            "reported missing"
        );
        assert!(!copy.exists(), "the copy is deleted");
        assert_dropped(&cas, &digest, 1);
    }

    #[tokio::test]
    async fn the_empty_blob_is_served_whatever_its_file_holds() {
        let (dir, cas) = cas(1 << 20);
        let path = cas.path_of(&Digest::EMPTY);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&path, b"not empty").unwrap();
        assert_eq!(cas.read(&Digest::EMPTY).await.unwrap(), Some(Bytes::new()));
        let copy = dir.path().join("empty");
        assert!(cas.copy_out(&Digest::EMPTY, &copy, false).unwrap());
        assert_eq!(fs::read(&copy).unwrap(), b"");
        assert!(cas.contains(&Digest::EMPTY));
    }

    /// The figures in the module docs: each way a blob leaves the CAS, unchecked and checked,
    /// the best of five alternating runs (the best, because other work on the machine only
    /// ever adds time). Run with
    /// `cargo test --release -p tonic-mesh-reapi --lib verification_cost -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement (1 GiB on disk, about a minute), not a check"]
    async fn verification_cost() {
        const GIB: usize = 1 << 30;
        const RUNS: usize = 5;
        async fn best<A: AsyncFnMut(), B: AsyncFnMut()>(
            what: &str,
            unchecked: &str,
            mut a: A,
            checked: &str,
            mut b: B,
        ) {
            let (mut best_a, mut best_b) = (f64::MAX, f64::MAX);
            for _ in 0..RUNS {
                let start = tokio::time::Instant::now();
                a().await;
                best_a = best_a.min(start.elapsed().as_secs_f64());
                let start = tokio::time::Instant::now();
                b().await;
                best_b = best_b.min(start.elapsed().as_secs_f64());
            }
            println!("{what}: {best_a:.2} s {unchecked}, {best_b:.2} s {checked}");
        }
        let (dir, cas) = cas(4 * GIB as u64);
        let mut data = vec![0u8; GIB];
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        for word in data.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        let data = Bytes::from(data);
        let digest = cas.put(data.clone()).await.unwrap();
        let path = cas.path_of(&digest);
        let copy = dir.path().join("copy");
        let mut hash = f64::MAX;
        for _ in 0..RUNS {
            let start = tokio::time::Instant::now();
            assert_eq!(Digest::of(&data), digest);
            hash = hash.min(start.elapsed().as_secs_f64());
        }
        println!("SHA-256 of 1 GiB in memory: {hash:.2} s");
        best(
            "1 GiB read in 1 MiB pieces (page cache)",
            "unchecked",
            async || {
                let mut file = fs::File::open(&path).unwrap();
                let mut buffer = vec![0u8; READ_PIECE];
                while file.read(&mut buffer).unwrap() > 0 {}
            },
            "with BlobReader",
            async || {
                let mut reader = cas.open_reader(&digest).await.unwrap().unwrap();
                while reader.next_chunk(READ_PIECE).await.unwrap().is_some() {}
            },
        )
        .await;
        best(
            "1 GiB read whole into memory",
            "with fs::read",
            async || assert_eq!(fs::read(&path).unwrap().len(), GIB),
            "with Cas::read",
            async || assert!(cas.read(&digest).await.unwrap().is_some()),
        )
        .await;
        best(
            "1 GiB copied out",
            "with fs::copy",
            async || {
                let _ = fs::remove_file(&copy);
                fs::copy(&path, &copy).unwrap();
            },
            "with copy_out",
            async || {
                let _ = fs::remove_file(&copy);
                assert!(cas.copy_out(&digest, &copy, false).unwrap());
            },
        )
        .await;
        let _ = fs::remove_file(&copy);
        let small: Vec<Digest> = futures::future::join_all(
            data.chunks(10 * 1024)
                .take(10_000)
                .map(|piece| cas.put(Bytes::copy_from_slice(piece))),
        )
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
        let copies = dir.path().join("copies");
        fs::create_dir(&copies).unwrap();
        best(
            "10,000 blobs of 10 KiB copied out",
            "with fs::copy",
            async || {
                for (i, digest) in small.iter().enumerate() {
                    let dest = copies.join(i.to_string());
                    let _ = fs::remove_file(&dest);
                    fs::copy(cas.path_of(digest), &dest).unwrap();
                }
            },
            "with copy_out",
            async || {
                for (i, digest) in small.iter().enumerate() {
                    let dest = copies.join(i.to_string());
                    let _ = fs::remove_file(&dest);
                    assert!(cas.copy_out(digest, &dest, false).unwrap());
                }
            },
        )
        .await;
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
