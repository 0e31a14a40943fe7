//! A directory of files keyed by digest, bounded in bytes, evicting the least recently used.
//!
//! Both the CAS ([`crate::Cas`]) and the action cache ([`crate::ActionCache`]) keep their
//! entries here. Files live at `{root}/{first two hex digits}/{hash}-{size}`; the index (size,
//! recency, pins) is in memory and rebuilt from the directory at start, ordered by modification
//! time (the recency of a previous run is approximated by write time).
//!
//! **Nothing half-written is visible**: a new entry is written to a temporary file in the
//! store's `tmp` directory (same file system), checked by the caller, and only then renamed
//! into place; a temporary file that is dropped before that is deleted. Every change to the
//! directory's names (rename in, unlink on eviction) happens under the index lock, so the
//! index and the directory never disagree; readers open files outside the lock, and a file
//! evicted while open stays readable through its handle (POSIX unlink semantics).
//!
//! **Pins** keep entries an execution is about to copy from being evicted under it; the bound
//! may be exceeded while pins are held, and eviction catches up when they are released.
//!
//! **Files are read-only, directories writable by their owner only**: an entry is made
//! `0o444` before it is renamed into place, the store's directories are `0o755` (the `tmp`
//! directory `0o700`), and opening a store left by an older version tightens what it finds.
//! This keeps a stray write (a tool that opens the wrong path, an action running as another
//! user) from changing an entry; it does not stop a process of the server's own user, which
//! may `chmod` first. Against those, the CAS checks what it reads ([`crate::Cas`]) and the
//! executor's sandbox keeps the data directory out of actions' sight.

use std::{
    collections::{BTreeMap, HashMap},
    fs, io,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::SystemTime,
};

use tempfile::TempPath;

use crate::{Digest, DigestFunction};

/// The mode of every entry's file: readable, writable by nobody.
const FILE_MODE: u32 = 0o444;
/// The mode of the store's root and shard directories: only the owner adds or removes names.
const DIR_MODE: u32 = 0o755;
/// The mode of the temporary directory: entries being written are the owner's alone.
const TMP_MODE: u32 = 0o700;

/// The file name prefix of BLAKE3 keys.
const BLAKE3_PREFIX: &str = "b3-";

/// The key a file name (see [`LruDir::path`]) stands for.
fn key_of_file_name(name: &str) -> Option<Digest> {
    let (function, name) = match name.strip_prefix(BLAKE3_PREFIX) {
        Some(rest) => (DigestFunction::Blake3, rest),
        None => (DigestFunction::Sha256, name),
    };
    let (hash, size) = name.rsplit_once('-')?;
    let digest = format!("{hash}/{size}").parse::<Digest>().ok()?;
    Some(Digest::with_function(
        *digest.hash(),
        digest.size(),
        function,
    ))
}

/// An on-disk, size-bounded, least-recently-used set of files keyed by digest.
#[derive(Debug, Clone)]
pub(crate) struct LruDir {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// What the store holds (`cas`, `action_cache`): the `store` label of its metrics.
    name: &'static str,
    root: PathBuf,
    tmp: PathBuf,
    max_bytes: u64,
    index: Mutex<Index>,
}

#[derive(Debug, Default)]
struct Index {
    entries: HashMap<Digest, Entry>,
    /// Recency order: tick → key, oldest first.
    order: BTreeMap<u64, Digest>,
    next_tick: u64,
    total_bytes: u64,
    evictions: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    size: u64,
    tick: u64,
    pins: u32,
}

/// Usage figures of one store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreUsage {
    /// Entries held.
    pub entries: u64,
    /// Bytes held.
    pub bytes: u64,
    /// The bound.
    pub max_bytes: u64,
    /// Entries evicted since start.
    pub evictions: u64,
}

/// An entry could not be stored.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InsertError {
    /// Larger than the whole store.
    #[error("{size} bytes exceed the store's bound of {max} bytes")]
    TooLarge { size: u64, max: u64 },
    /// The file system refused.
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl Index {
    fn touch(&mut self, key: &Digest) -> Option<Entry> {
        let tick = self.next_tick;
        let entry = self.entries.get_mut(key)?;
        self.order.remove(&entry.tick);
        entry.tick = tick;
        self.order.insert(tick, *key);
        self.next_tick += 1;
        Some(*entry)
    }

    fn insert(&mut self, key: Digest, size: u64) {
        let tick = self.next_tick;
        self.next_tick += 1;
        if let Some(old) = self.entries.insert(
            key,
            Entry {
                size,
                tick,
                pins: 0,
            },
        ) {
            self.order.remove(&old.tick);
            self.total_bytes = self.total_bytes.saturating_sub(old.size);
            if let Some(entry) = self.entries.get_mut(&key) {
                entry.pins = old.pins;
            }
        }
        self.order.insert(tick, key);
        self.total_bytes = self.total_bytes.saturating_add(size);
    }

    fn remove(&mut self, key: &Digest) -> Option<Entry> {
        let entry = self.entries.remove(key)?;
        self.order.remove(&entry.tick);
        self.total_bytes = self.total_bytes.saturating_sub(entry.size);
        Some(entry)
    }
}

impl LruDir {
    /// Opens (creating if needed) the store at `root`, with temporary files in `tmp` (which
    /// must be on the same file system), and indexes what a previous run left there.
    /// `name` labels its metrics (`reapi_store_bytes{store="cas"}`).
    pub(crate) fn open(
        name: &'static str,
        root: &Path,
        tmp: &Path,
        max_bytes: u64,
    ) -> io::Result<Self> {
        create_dir(root, DIR_MODE)?;
        create_dir(tmp, TMP_MODE)?;
        // Every shard made now, so that storing an entry costs no `mkdir` (and no wait on
        // the root directory's lock behind other writers' `mkdir`s).
        for shard in 0..=u8::MAX {
            create_dir(&root.join(format!("{shard:02x}")), DIR_MODE)?;
        }
        let mut found: Vec<(SystemTime, Digest, u64)> = Vec::new();
        for shard in fs::read_dir(root)? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            restrict(&shard.path(), DIR_MODE)?;
            for file in fs::read_dir(shard.path())? {
                let file = file?;
                let metadata = file.metadata()?;
                let key = file.file_name().to_str().and_then(key_of_file_name);
                match key {
                    Some(key) if metadata.is_file() => {
                        if metadata.mode() & 0o7777 != FILE_MODE {
                            // Written by a version that left entries writable.
                            fs::set_permissions(
                                file.path(),
                                fs::Permissions::from_mode(FILE_MODE),
                            )?;
                        }
                        found.push((
                            metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                            key,
                            metadata.len(),
                        ));
                    }
                    // Not ours (or a leftover of an interrupted rename): remove it.
                    _ => {
                        let _ = fs::remove_file(file.path());
                    }
                }
            }
        }
        found.sort();
        let mut index = Index::default();
        for (_, key, size) in found {
            index.insert(key, size);
        }
        let store = Self {
            inner: Arc::new(Inner {
                name,
                root: root.to_owned(),
                tmp: tmp.to_owned(),
                max_bytes,
                index: Mutex::new(index),
            }),
        };
        store.evict(&mut store.lock());
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        self.inner
            .index
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Where `key`'s file lives (whether or not it is present): `{hash}-{size}` for a
    /// SHA-256 key, `b3-{hash}-{size}` for a BLAKE3 one, in a directory named after the hash's
    /// first two digits.
    pub(crate) fn path(&self, key: &Digest) -> PathBuf {
        let hex = key.hex();
        let prefix = match key.function() {
            DigestFunction::Sha256 => "",
            DigestFunction::Blake3 => BLAKE3_PREFIX,
        };
        self.inner
            .root
            .join(&hex[..2])
            .join(format!("{prefix}{hex}-{}", key.size()))
    }

    /// The bound in bytes.
    pub(crate) fn max_bytes(&self) -> u64 {
        self.inner.max_bytes
    }

    /// A new temporary file, deleted unless committed with [`LruDir::commit`].
    pub(crate) fn temp_file(&self) -> io::Result<(fs::File, TempPath)> {
        // Read-only from its creation (the handle returned may still write): no moment where
        // it is both visible in the store and writable, and no `chmod` when it is committed.
        Ok(tempfile::Builder::new()
            .prefix("incoming-")
            .permissions(fs::Permissions::from_mode(FILE_MODE))
            .tempfile_in(&self.inner.tmp)?
            .into_parts())
    }

    /// Whether `key` is present; a hit counts as a use.
    pub(crate) fn touch(&self, key: &Digest) -> bool {
        self.lock().touch(key).is_some()
    }

    /// Whether each of `keys` is present, in order; present ones count as used. One lock for
    /// the whole list (a peer's presence query of thousands of digests).
    pub(crate) fn present(&self, keys: &[Digest]) -> Vec<bool> {
        let mut index = self.lock();
        keys.iter().map(|key| index.touch(key).is_some()).collect()
    }

    /// The keys of `keys` that are not present, in order; present ones count as used. One
    /// lock for the whole list (a `FindMissingBlobs` of thousands of digests).
    pub(crate) fn missing(&self, keys: &[Digest]) -> Vec<Digest> {
        let mut index = self.lock();
        keys.iter()
            .filter(|key| index.touch(key).is_none())
            .copied()
            .collect()
    }

    /// Every key present now (a snapshot, in no particular order).
    pub(crate) fn keys(&self) -> Vec<Digest> {
        self.lock().entries.keys().copied().collect()
    }

    /// Whether `key` is present, without counting it as a use.
    #[cfg(test)]
    pub(crate) fn contains(&self, key: &Digest) -> bool {
        self.lock().entries.contains_key(key)
    }

    /// Moves a checked temporary file into place as `key` and evicts down to the bound.
    pub(crate) fn commit(&self, key: Digest, file: TempPath, size: u64) -> Result<(), InsertError> {
        let max = self.inner.max_bytes;
        if size > max {
            return Err(InsertError::TooLarge { size, max });
        }
        let path = self.path(&key);
        // `file` is read-only already ([`LruDir::temp_file`]).
        let mut index = self.lock();
        if index.entries.contains_key(&key) && path.exists() {
            // Someone stored the same entry first; ours is dropped (and deleted).
            index.touch(&key);
            return Ok(());
        }
        // The shard directories are made at open; one removed since is made again.
        let file = match file.persist(&path) {
            Ok(()) => None,
            Err(error) if error.error.kind() == io::ErrorKind::NotFound => Some(error.path),
            Err(error) => return Err(InsertError::Io(error.error)),
        };
        if let Some(file) = file {
            if let Some(parent) = path.parent() {
                create_dir(parent, DIR_MODE)?;
            }
            file.persist(&path).map_err(|e| InsertError::Io(e.error))?;
        }
        index.insert(key, size);
        self.evict(&mut index);
        Ok(())
    }

    /// Forgets `key` and deletes its file (a corrupt entry, or one replaced).
    pub(crate) fn remove(&self, key: &Digest) {
        let mut index = self.lock();
        if index.remove(key).is_some() {
            let _ = fs::remove_file(self.path(key));
            self.publish(&index);
        }
    }

    /// Forgets `key` and deletes its file if that file is still `file` (the one a reader found
    /// corrupt), identified by device and inode; the reader must still hold it open, so its
    /// inode cannot have been reused. Returns whether the entry was removed: `false` if it was
    /// gone already, or replaced meanwhile by a new file (a good copy fetched by another
    /// caller), which stays.
    pub(crate) fn remove_if_file(&self, key: &Digest, file: &fs::Metadata) -> bool {
        let path = self.path(key);
        let mut index = self.lock();
        if !index.entries.contains_key(key) {
            return false;
        }
        let removed = match fs::symlink_metadata(&path) {
            Ok(current) if (current.dev(), current.ino()) != (file.dev(), file.ino()) => false,
            Ok(_) => {
                index.remove(key);
                if let Err(error) = fs::remove_file(&path)
                    && error.kind() != io::ErrorKind::NotFound
                {
                    tracing::warn!(%key, %error, "could not delete a corrupt file");
                }
                true
            }
            Err(_) => {
                index.remove(key);
                true
            }
        };
        if removed {
            self.publish(&index);
        }
        removed
    }

    /// Pins every present key of `keys` against eviction until the guard is dropped.
    /// Returns the guard and the keys that were not present.
    pub(crate) fn pin(&self, keys: impl IntoIterator<Item = Digest>) -> (Pins, Vec<Digest>) {
        let mut index = self.lock();
        let mut pinned = Vec::new();
        let mut missing = Vec::new();
        for key in keys {
            if index.touch(&key).is_some() {
                if let Some(entry) = index.entries.get_mut(&key) {
                    entry.pins = entry.pins.saturating_add(1);
                }
                pinned.push(key);
            } else {
                missing.push(key);
            }
        }
        (
            Pins {
                store: self.clone(),
                keys: pinned,
            },
            missing,
        )
    }

    fn unpin(&self, keys: &[Digest]) {
        let mut index = self.lock();
        for key in keys {
            if let Some(entry) = index.entries.get_mut(key) {
                entry.pins = entry.pins.saturating_sub(1);
            }
        }
        self.evict(&mut index);
    }

    /// Evicts least recently used, unpinned entries until the total is within the bound.
    fn evict(&self, index: &mut Index) {
        if index.total_bytes > self.inner.max_bytes {
            self.evict_over_bound(index);
        }
        self.publish(index);
    }

    /// The store's size as gauges: `reapi_store_bytes` and `reapi_store_entries`.
    fn publish(&self, index: &Index) {
        let store = self.inner.name;
        metrics::gauge!("reapi_store_bytes", "store" => store).set(index.total_bytes as f64);
        metrics::gauge!("reapi_store_entries", "store" => store).set(index.entries.len() as f64);
    }

    fn evict_over_bound(&self, index: &mut Index) {
        let victims: Vec<Digest> = {
            let mut over = index.total_bytes - self.inner.max_bytes;
            let mut victims = Vec::new();
            for key in index.order.values() {
                if over == 0 {
                    break;
                }
                let Some(entry) = index.entries.get(key) else {
                    continue;
                };
                if entry.pins > 0 {
                    continue;
                }
                over = over.saturating_sub(entry.size);
                victims.push(*key);
            }
            victims
        };
        let store = self.inner.name;
        for key in victims {
            let size = index.remove(&key).map_or(0, |entry| entry.size);
            index.evictions += 1;
            metrics::counter!("reapi_store_evicted_bytes_total", "store" => store).increment(size);
            if let Err(error) = fs::remove_file(self.path(&key))
                && error.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(%key, %error, "could not delete an evicted file");
            }
            metrics::counter!("reapi_store_evicted_total", "store" => store).increment(1);
        }
    }

    /// Current usage.
    pub(crate) fn usage(&self) -> StoreUsage {
        let index = self.lock();
        StoreUsage {
            entries: index.entries.len() as u64,
            bytes: index.total_bytes,
            max_bytes: self.inner.max_bytes,
            evictions: index.evictions,
        }
    }
}

/// Creates `dir` and its missing parents with `mode` (narrowed by the umask), and narrows an
/// existing `dir` to `mode` if others could write to it.
fn create_dir(dir: &Path, mode: u32) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)?;
    restrict(dir, mode)
}

/// Narrows `dir`'s mode to `mode` if it grants more.
fn restrict(dir: &Path, mode: u32) -> io::Result<()> {
    let current = fs::metadata(dir)?.permissions().mode() & 0o7777;
    if current & !mode != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(current & mode))?;
    }
    Ok(())
}

/// Keeps entries pinned (see [`LruDir::pin`]).
#[derive(Debug)]
pub(crate) struct Pins {
    store: LruDir,
    keys: Vec<Digest>,
}

impl Drop for Pins {
    fn drop(&mut self) {
        if !self.keys.is_empty() {
            self.store.unpin(&self.keys);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn store(dir: &Path, max: u64) -> LruDir {
        LruDir::open("test", &dir.join("files"), &dir.join("tmp"), max).unwrap()
    }

    fn add(store: &LruDir, data: &[u8]) -> Digest {
        let key = Digest::of(data);
        let (mut file, path) = store.temp_file().unwrap();
        file.write_all(data).unwrap();
        store.commit(key, path, data.len() as u64).unwrap();
        key
    }

    #[test]
    fn evicts_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), 30);
        let a = add(&store, &[b'a'; 10]);
        let b = add(&store, &[b'b'; 10]);
        let c = add(&store, &[b'c'; 10]);
        assert!(store.touch(&a), "a is now the most recent");
        let d = add(&store, &[b'd'; 10]);
        assert!(!store.contains(&b), "b was the least recently used");
        assert!(!store.path(&b).exists(), "its file is gone too");
        for key in [a, c, d] {
            assert!(store.contains(&key));
            assert!(store.path(&key).exists());
        }
        let usage = store.usage();
        assert_eq!((usage.entries, usage.bytes, usage.evictions), (3, 30, 1));
    }

    #[test]
    fn pinned_entries_survive_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), 20);
        let a = add(&store, &[b'a'; 10]);
        let (pins, missing) = store.pin([a, Digest::of(b"absent")]);
        assert_eq!(missing, vec![Digest::of(b"absent")]);
        let b = add(&store, &[b'b'; 10]);
        let c = add(&store, &[b'c'; 10]);
        assert!(store.contains(&a), "pinned");
        assert!(
            !store.contains(&b),
            "the oldest unpinned entry went instead"
        );
        assert!(store.contains(&c));
        drop(pins);
        let _d = add(&store, &[b'd'; 10]);
        assert!(!store.contains(&a), "evictable again once unpinned");
    }

    #[test]
    fn too_large_entries_are_refused_and_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), 5);
        let data = [b'x'; 10];
        let (mut file, path) = store.temp_file().unwrap();
        file.write_all(&data).unwrap();
        let error = store
            .commit(Digest::of(&data), path, data.len() as u64)
            .unwrap_err();
        assert!(error.to_string().contains("bound of 5 bytes"), "{error}");
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert_eq!(store.usage().entries, 0);
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn entries_are_read_only_in_directories_only_the_owner_writes() {
        let dir = tempfile::tempdir().unwrap();
        // Left by an older version or a permissive umask: writable by everyone.
        let root = dir.path().join("files");
        fs::create_dir_all(root.join("2c")).unwrap();
        for path in [&root, &root.join("2c")] {
            fs::set_permissions(path, fs::Permissions::from_mode(0o777)).unwrap();
        }
        let key = Digest::of(b"hello");
        let old = store(dir.path(), 100).path(&key);
        fs::write(&old, b"hello").unwrap();
        assert_eq!(mode(&old), 0o644);
        let store = store(dir.path(), 100);
        assert!(store.contains(&key));
        assert_eq!(mode(&old), FILE_MODE, "tightened on opening");
        assert_eq!(mode(&root), DIR_MODE);
        assert_eq!(mode(&root.join("2c")), DIR_MODE);
        assert_eq!(mode(&dir.path().join("tmp")), TMP_MODE);
        // Every shard is made at open, with the store's mode.
        for shard in ["00", "7f", "ff"] {
            assert_eq!(mode(&root.join(shard)), DIR_MODE, "{shard}");
        }
        // A new entry, in a shard made at open and in one removed since (made again).
        let a = add(&store, b"a");
        let shard = store.path(&Digest::of(b"b")).parent().unwrap().to_owned();
        fs::remove_dir(&shard).unwrap();
        let b = add(&store, b"b");
        for key in [a, b] {
            let path = store.path(&key);
            assert_eq!(mode(&path), FILE_MODE, "{}", path.display());
            assert_eq!(mode(path.parent().unwrap()), DIR_MODE);
        }
    }

    #[test]
    fn only_the_file_found_corrupt_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), 100);
        let key = add(&store, b"hello");
        // Held open, as a reader does, so its inode cannot be reused.
        let open = fs::File::open(store.path(&key)).unwrap();
        let found = open.metadata().unwrap();
        // Replaced meanwhile (dropped and stored again by another caller): the new file stays.
        store.remove(&key);
        add(&store, b"hello");
        assert!(!store.remove_if_file(&key, &found));
        assert!(store.contains(&key) && store.path(&key).exists());
        // The file found is still the one there: removed, once.
        let open = fs::File::open(store.path(&key)).unwrap();
        let found = open.metadata().unwrap();
        assert!(store.remove_if_file(&key, &found));
        assert!(!store.contains(&key) && !store.path(&key).exists());
        assert!(!store.remove_if_file(&key, &found));
        assert_eq!(store.usage().bytes, 0);
    }

    #[test]
    fn reopening_finds_previous_entries_and_drops_strangers() {
        let dir = tempfile::tempdir().unwrap();
        let first = store(dir.path(), 100);
        let a = add(&first, b"hello");
        // The same bytes under BLAKE3: another key, another file, found again as BLAKE3.
        let b3 = Digest::of_with(DigestFunction::Blake3, b"hello");
        let (mut file, path) = first.temp_file().unwrap();
        file.write_all(b"hello").unwrap();
        first.commit(b3, path, 5).unwrap();
        fs::create_dir_all(dir.path().join("files/zz")).unwrap();
        fs::write(dir.path().join("files/zz/not-a-digest"), b"?").unwrap();
        drop(first);
        let second = store(dir.path(), 100);
        assert!(second.contains(&a));
        assert!(second.contains(&b3));
        let as_sha256 = Digest::new(*b3.hash(), 5);
        assert!(
            !second.contains(&as_sha256),
            "a BLAKE3 file is not a SHA-256 blob"
        );
        assert_eq!(second.usage().bytes, 10);
        assert!(!dir.path().join("files/zz/not-a-digest").exists());
        // A smaller bound on reopening evicts at once.
        drop(second);
        let third = store(dir.path(), 1);
        assert!(!third.contains(&a));
    }
}
