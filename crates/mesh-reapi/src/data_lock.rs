//! One replica per data directory.
//!
//! A replica takes an exclusive `flock(2)` on `{data_dir}/lock` before it opens anything
//! under the directory, and holds it for as long as its stores are open. A second replica
//! pointed at the same directory (two pods on one volume, a process started before the old
//! one exited) is refused with an error that names the directory and the process holding
//! it, before it can touch the first one's files: opening a replica clears its work
//! directory, which holds the running actions' trees, and both would evict from one CAS.
//! The kernel drops the lock with the process, so a replica that crashed never blocks its
//! own restart. The directory's file system must support `flock` (local ones and NFS do);
//! on one that does not, the replica refuses to start, naming the directory and the
//! system's error, rather than run unguarded. PostgreSQL guards its data directory with
//! `postmaster.pid`, whose process id it must check for staleness; a lock the kernel
//! releases needs no such check.

use std::{
    fs,
    io::{self, Read as _, Seek as _, Write as _},
    path::{Path, PathBuf},
};

use rustix::fs::FlockOperation;

/// The lock on a data directory; released when dropped.
#[derive(Debug)]
pub(crate) struct DataDirLock {
    _file: fs::File,
}

/// A data directory could not be locked for this replica.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataDirError {
    /// Another replica holds it.
    #[error(
        "data directory {dir} is in use by another replica (process {holder} holds {dir}/lock): \
         two replicas must not share a data directory"
    )]
    InUse {
        /// The directory.
        dir: PathBuf,
        /// What the lock file says of its holder (its process id), or `unknown`.
        holder: String,
    },
    /// The directory or its lock file could not be made, or the lock taken.
    #[error("{what} the data directory {dir}: {source}")]
    Io {
        /// What failed: `creating` or `locking`.
        what: &'static str,
        /// The directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl DataDirLock {
    /// Creates `dir` if needed and locks it for this replica, writing this process's id into
    /// the lock file for whoever is refused next.
    pub(crate) fn acquire(dir: &Path) -> Result<Self, DataDirError> {
        let error = |what| {
            move |source| DataDirError::Io {
                what,
                dir: dir.to_owned(),
                source,
            }
        };
        let io_error = error("locking");
        fs::create_dir_all(dir).map_err(error("creating"))?;
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("lock"))
            .map_err(io_error)?;
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(DataDirError::InUse {
                    dir: dir.to_owned(),
                    holder: if holder.is_empty() {
                        "unknown".to_owned()
                    } else {
                        holder.to_owned()
                    },
                });
            }
            Err(errno) => return Err(io_error(io::Error::from(errno))),
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .map_err(io_error)?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_a_directory_is_refused_naming_it_and_freed_with_the_first() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("data");
        let first = DataDirLock::acquire(&dir).expect("a fresh directory is made and locked");
        // A second open file description conflicts, in this process as in another.
        let error = DataDirLock::acquire(&dir).unwrap_err();
        let text = error.to_string();
        assert!(
            matches!(&error, DataDirError::InUse { holder, .. } if *holder == std::process::id().to_string()),
            "{error:?}"
        );
        assert!(
            text.contains(&dir.display().to_string()) && text.contains("must not share"),
            "{text}"
        );
        drop(first);
        DataDirLock::acquire(&dir).expect("free again once the first is dropped");
    }

    #[test]
    fn a_directory_that_cannot_be_made_is_named_with_the_cause() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("a-file");
        fs::write(&file, b"").unwrap();
        let dir = file.join("data");
        let text = DataDirLock::acquire(&dir).unwrap_err().to_string();
        assert!(
            text.starts_with(&format!("creating the data directory {}: ", dir.display())),
            "{text}"
        );
    }
}
