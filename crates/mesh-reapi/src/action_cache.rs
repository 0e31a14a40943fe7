//! The local action cache of one replica: `ActionResult`s keyed by action digest, on disk,
//! bounded in bytes, least recently used evicted first (the same store as the CAS, see
//! [`crate::lru_dir`]).
//!
//! Entries are the encoded `ActionResult` messages. Like CAS blobs they are written to a
//! temporary file and renamed into place, so a reader never sees a partial entry; an entry
//! that no longer decodes is dropped and reported as a miss. Finding entries written on other
//! replicas is [`crate::ClusterCas`]'s job.
//!
//! **Instances.** Each instance name has an action cache of its own: entries are keyed by
//! [`action_key`], which is the action digest itself for the default (empty) instance and a
//! SHA-256 of the instance name and the action digest for any other, so one instance can
//! neither read nor overwrite another's results (a CI and a developer with different
//! toolchains do not poison each other). The CAS is shared by every instance: a blob is named
//! by its content, so sharing it is safe and saves space. Replicas exchange entries by key
//! (the peer calls carry the key, marked as forwarded), so placement, handoff and lookups
//! need no instance name.

use std::{fs, io, io::Write as _, path::Path};

use bazel_remote_apis::build::bazel::remote::execution::v2::ActionResult;
use prost::Message as _;

use crate::{
    Digest,
    lru_dir::{InsertError, LruDir, StoreUsage},
};

/// The action cache key of `action` in instance `instance_name`: `action` itself for the
/// default instance (`""`), otherwise the hash (with the action digest's own function) of a
/// label, the instance name and the action digest, so no two instances share a key, and the
/// key's function is always the action's.
pub fn action_key(instance_name: &str, action: &Digest) -> Digest {
    if instance_name.is_empty() {
        *action
    } else {
        // Hashed with the action's own function: the key's function is the one its result's
        // digests are in.
        Digest::of_with(
            action.function(),
            format!("mesh-reapi action cache key\0{instance_name}\0{action}").as_bytes(),
        )
    }
}

/// One replica's action cache. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ActionCache {
    dir: LruDir,
}

/// An action cache operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ActionCacheError {
    /// The file system failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The entry is larger than the whole action cache.
    #[error(
        "the action result for {action} is {size} bytes, over the action cache's bound of {max} bytes"
    )]
    TooLarge {
        /// The action.
        action: Digest,
        /// Its encoded size.
        size: u64,
        /// The bound.
        max: u64,
    },
}

impl ActionCache {
    /// Opens (creating if needed) the action cache in `dir` (entries in `dir/entries`,
    /// temporary files in `dir/tmp`), bounded to `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, ActionCacheError> {
        let tmp = dir.join("tmp");
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|source| ActionCacheError::Io {
                context: format!("clearing the temporary directory {}", tmp.display()),
                source,
            })?;
        }
        let dir = LruDir::open("action_cache", &dir.join("entries"), &tmp, max_bytes).map_err(
            |source| ActionCacheError::Io {
                context: format!("opening the action cache in {}", dir.display()),
                source,
            },
        )?;
        Ok(Self { dir })
    }

    /// The cached result of `action`, if any.
    pub async fn get(&self, action: &Digest) -> Result<Option<ActionResult>, ActionCacheError> {
        if !self.dir.touch(action) {
            return Ok(None);
        }
        let bytes = match tokio::fs::read(self.dir.path(action)).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.dir.remove(action);
                return Ok(None);
            }
            Err(source) => {
                return Err(ActionCacheError::Io {
                    context: format!("reading the action result for {action}"),
                    source,
                });
            }
        };
        match ActionResult::decode(bytes.as_slice()) {
            Ok(result) => Ok(Some(result)),
            Err(error) => {
                tracing::warn!(%action, %error, "dropping an action cache entry that does not decode");
                self.dir.remove(action);
                Ok(None)
            }
        }
    }

    /// Stores (or replaces) the result of `action`.
    pub async fn put(&self, action: Digest, result: &ActionResult) -> Result<(), ActionCacheError> {
        let bytes = result.encode_to_vec();
        let store = self.dir.clone();
        let io_error = move |source| ActionCacheError::Io {
            context: format!("storing the action result for {action}"),
            source,
        };
        tokio::task::spawn_blocking(move || {
            let (mut file, path) = store.temp_file().map_err(io_error)?;
            file.write_all(&bytes).map_err(io_error)?;
            drop(file);
            // A newer result replaces the older one.
            store.remove(&action);
            store
                .commit(action, path, bytes.len() as u64)
                .map_err(|error| match error {
                    InsertError::TooLarge { size, max } => {
                        ActionCacheError::TooLarge { action, size, max }
                    }
                    InsertError::Io(source) => io_error(source),
                })
        })
        .await
        .map_err(|e| ActionCacheError::Io {
            context: format!("storing the action result for {action}"),
            source: io::Error::other(e),
        })?
    }

    /// Every action with a result here now (a snapshot; handoff walks it).
    pub(crate) fn actions(&self) -> Vec<Digest> {
        self.dir.keys()
    }

    /// Current usage.
    pub fn usage(&self) -> StoreUsage {
        self.dir.usage()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[tokio::test]
    async fn results_roundtrip_and_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ActionCache::open(dir.path(), 1 << 20).unwrap();
        let action = Digest::of(b"action");
        assert!(cache.get(&action).await.unwrap().is_none());
        let first = ActionResult {
            exit_code: 0,
            stdout_raw: b"one".to_vec(),
            ..Default::default()
        };
        cache.put(action, &first).await.unwrap();
        assert_eq!(cache.get(&action).await.unwrap(), Some(first));
        let second = ActionResult {
            exit_code: 0,
            stdout_raw: b"two".to_vec(),
            ..Default::default()
        };
        cache.put(action, &second).await.unwrap();
        assert_eq!(cache.get(&action).await.unwrap(), Some(second));
        assert_eq!(cache.usage().entries, 1);
        // Persisted across a reopen.
        drop(cache);
        let cache = ActionCache::open(dir.path(), 1 << 20).unwrap();
        assert!(cache.get(&action).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn corrupt_entries_are_misses() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ActionCache::open(dir.path(), 1 << 20).unwrap();
        let action = Digest::of(b"action");
        cache.put(action, &ActionResult::default()).await.unwrap();
        // Entries are read-only: made writable first, as anything rewriting one would.
        let path = cache.dir.path(&action);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&path, [0xff, 0xff, 0xff]).unwrap();
        assert!(cache.get(&action).await.unwrap().is_none());
        assert_eq!(cache.usage().entries, 0);
    }
}
