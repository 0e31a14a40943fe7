//! Stage 1: the input tree, read from the cluster, checked, and materialised in the action's
//! directory.
//!
//! Every name is one path component (not empty, `.` or `..`, no `/`, no NUL) and appears once
//! per directory. Materialising creates directories and files first and input symlinks last,
//! in a directory this replica just created: no link exists in the tree while it is written,
//! so no write can be led out of it; symlinks are then created through a handle on the root
//! (`cap-std`), their targets stored as given (the action's to resolve, inside its sandbox).

use std::{
    collections::{HashMap, HashSet},
    fs,
    path::{Path, PathBuf},
};

use bazel_remote_apis::build::bazel::remote::execution::v2::Directory;
use prost::Message as _;

use super::{ExecError, Executor, internal};
use crate::{ClusterError, Digest, Fetch, MissingBlobs, cluster::MAX_MESSAGE_SIZE};

/// One input file to materialise.
pub(crate) struct InputFile {
    path: PathBuf,
    pub(super) digest: Digest,
    executable: bool,
}

/// The input tree, flattened.
#[derive(Default)]
pub(crate) struct Inputs {
    directories: Vec<PathBuf>,
    pub(super) files: Vec<InputFile>,
    symlinks: Vec<(PathBuf, String)>,
}

impl Executor {
    /// Reads the input tree level by level (fetching missing directories in one go per
    /// level) and flattens it, checking names.
    pub(super) async fn collect_inputs(
        &self,
        root: &Digest,
        fetch: &Fetch,
    ) -> Result<Inputs, ExecError> {
        let mut decoded: HashMap<Digest, Directory> = HashMap::new();
        let mut level: Vec<(PathBuf, Digest)> = vec![(PathBuf::new(), *root)];
        let mut inputs = Inputs::default();
        while !level.is_empty() {
            let wanted: Vec<Digest> = level
                .iter()
                .map(|(_, d)| *d)
                .filter(|d| !decoded.contains_key(d))
                .collect();
            if let Some(digest) = wanted.iter().find(|d| d.size() > MAX_MESSAGE_SIZE) {
                return Err(ClusterError::MessageTooLarge {
                    digest: *digest,
                    kind: "Directory",
                }
                .into());
            }
            self.cluster.ensure_local(&wanted, fetch).await?;
            for digest in wanted {
                if decoded.contains_key(&digest) {
                    continue;
                }
                let bytes = self
                    .cluster
                    .local()
                    .read(&digest)
                    .await
                    .map_err(internal(format!("reading input directory {digest}")))?
                    .ok_or_else(|| MissingBlobs(vec![digest]))?;
                let directory = Directory::decode(bytes).map_err(|e| {
                    ExecError::Invalid(format!(
                        "input directory {digest} is not a valid Directory message: {e}"
                    ))
                })?;
                decoded.insert(digest, directory);
            }
            let mut next = Vec::new();
            for (path, digest) in level {
                let Some(directory) = decoded.get(&digest) else {
                    continue;
                };
                inputs.directories.push(path.clone());
                let mut names = HashSet::new();
                let mut check = |name: &str| -> Result<PathBuf, ExecError> {
                    check_name(name, &path)?;
                    if !names.insert(name.to_owned()) {
                        return Err(ExecError::Invalid(format!(
                            "input directory {} names {name:?} twice",
                            display_dir(&path)
                        )));
                    }
                    Ok(path.join(name))
                };
                for file in &directory.files {
                    let digest = Digest::from_required(
                        file.digest.as_ref(),
                        "FileNode.digest",
                        digest.function(),
                    )
                    .map_err(|e| ExecError::Invalid(e.to_string()))?;
                    inputs.files.push(InputFile {
                        path: check(&file.name)?,
                        digest,
                        executable: file.is_executable,
                    });
                }
                for child in &directory.directories {
                    let digest = Digest::from_required(
                        child.digest.as_ref(),
                        "DirectoryNode.digest",
                        digest.function(),
                    )
                    .map_err(|e| ExecError::Invalid(e.to_string()))?;
                    next.push((check(&child.name)?, digest));
                }
                for symlink in &directory.symlinks {
                    if symlink.target.is_empty() {
                        return Err(ExecError::Invalid(format!(
                            "input symlink {} has an empty target",
                            path.join(&symlink.name).display()
                        )));
                    }
                    inputs
                        .symlinks
                        .push((check(&symlink.name)?, symlink.target.clone()));
                }
            }
            level = next;
        }
        Ok(inputs)
    }

    /// Makes every input file local and pins it until the copy is made. A blob evicted
    /// between fetching and pinning is fetched once more.
    pub(super) async fn pin_inputs(
        &self,
        digests: &[Digest],
        fetch: &Fetch,
    ) -> Result<crate::lru_dir::Pins, ExecError> {
        let mut attempts = 0;
        loop {
            self.cluster.ensure_local(digests, fetch).await?;
            let (pins, missing) = self.cluster.local().pin(digests.iter().copied());
            if missing.is_empty() {
                return Ok(pins);
            }
            attempts += 1;
            if attempts >= 2 {
                return Err(MissingBlobs(missing).into());
            }
        }
    }
}

fn display_dir(path: &Path) -> String {
    if path.as_os_str().is_empty() {
        "(the input root)".to_owned()
    } else {
        path.display().to_string()
    }
}

/// A name inside a `Directory`: one path component.
fn check_name(name: &str, parent: &Path) -> Result<(), ExecError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(ExecError::Invalid(format!(
            "input directory {} has an entry named {name:?}; names must be one non-empty path component (no '/', not '.' or '..')",
            display_dir(parent)
        )));
    }
    Ok(())
}

/// Creates the input tree in a new directory `root`: directories, then files, then symlinks
/// (see the module docs for why that order keeps every write inside). Blocking.
pub(crate) fn materialise(cas: &crate::Cas, root: &Path, inputs: &Inputs) -> Result<(), ExecError> {
    fs::create_dir_all(root).map_err(internal("creating the action's input root"))?;
    for directory in &inputs.directories {
        fs::create_dir_all(root.join(directory)).map_err(internal(format!(
            "creating input directory {}",
            directory.display()
        )))?;
    }
    for file in &inputs.files {
        let dest = root.join(&file.path);
        let copied = cas
            .copy_out(&file.digest, &dest, file.executable)
            .map_err(internal(format!(
                "copying input file {} into the action's directory",
                file.digest
            )))?;
        if !copied {
            return Err(MissingBlobs(vec![file.digest]).into());
        }
    }
    if !inputs.symlinks.is_empty() {
        let root_dir = super::open_root(root)?;
        for (path, target) in &inputs.symlinks {
            root_dir
                .symlink_contents(target, path)
                .map_err(internal(format!(
                    "creating input symlink {}",
                    path.display()
                )))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_are_single_components() {
        for name in ["", ".", "..", "a/b"] {
            let error = check_name(name, Path::new("dir")).unwrap_err().to_string();
            assert!(error.contains("one non-empty path component"), "{error}");
        }
        check_name("file.txt", Path::new("")).unwrap();
    }
}
