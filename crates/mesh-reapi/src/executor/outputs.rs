//! Stage 3: outputs, read beneath the action's directory through a directory handle.

use std::{
    collections::HashSet,
    io,
    path::{Path, PathBuf},
};

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    ActionResult, Directory, DirectoryNode, FileNode, OutputDirectory, OutputFile, OutputSymlink,
    SymlinkNode, Tree,
};
use cap_std::fs::Dir;

use super::{
    ExecError,
    command::{CommandSpec, Outputs},
    internal,
};
use crate::{Digest, DigestFunction};

/// Where outputs go: the CAS, with the action's digest function (an action sent with BLAKE3
/// gets BLAKE3 digests for its outputs, trees and logs).
#[derive(Clone, Copy)]
pub(crate) struct Sink<'a> {
    cas: &'a crate::Cas,
    function: DigestFunction,
}

/// Stores the outputs that exist beneath `root` and describes them. Blocking.
pub(crate) fn collect(
    cas: &crate::Cas,
    function: DigestFunction,
    command: &CommandSpec,
    root: &Path,
) -> Result<ActionResult, ExecError> {
    let cas = Sink { cas, function };
    let root_dir = super::open_root(root)?;
    let cwd = if command.working_directory.as_os_str().is_empty() {
        root_dir
    } else {
        root_dir
            .open_dir(&command.working_directory)
            .map_err(|error| {
                escaped_or(&command.working_directory, "the working directory", error)
            })?
    };
    let cwd = &cwd;
    let mut result = ActionResult::default();
    match &command.outputs {
        Outputs::Typed { files, directories } => {
            for (name, path) in files {
                match output_kind(cwd, path)? {
                    None => {}
                    Some(Kind::File(executable)) => result
                        .output_files
                        .push(output_file(cas, cwd, name, path, executable)?),
                    Some(Kind::Symlink(target)) => {
                        #[allow(deprecated)] // REAPI v2.0 clients (Bazel 4) read this list
                        result
                            .output_file_symlinks
                            .push(output_symlink(name, target));
                    }
                    Some(Kind::Directory) => {
                        return Err(ExecError::OutputType(format!(
                            "output file {name:?} is a directory; list it as an output directory"
                        )));
                    }
                }
            }
            for (name, path) in directories {
                match output_kind(cwd, path)? {
                    None => {}
                    Some(Kind::Directory) => result
                        .output_directories
                        .push(output_directory(cas, cwd, name, path)?),
                    Some(Kind::Symlink(target)) => {
                        #[allow(deprecated)] // REAPI v2.0 clients (Bazel 4) read this list
                        result
                            .output_directory_symlinks
                            .push(output_symlink(name, target));
                    }
                    Some(Kind::File(_)) => {
                        return Err(ExecError::OutputType(format!(
                            "output directory {name:?} is a regular file; list it as an output file"
                        )));
                    }
                }
            }
        }
        Outputs::Paths(paths) => {
            for (name, path) in paths {
                match output_kind(cwd, path)? {
                    None => {}
                    Some(Kind::File(executable)) => result
                        .output_files
                        .push(output_file(cas, cwd, name, path, executable)?),
                    Some(Kind::Directory) => result
                        .output_directories
                        .push(output_directory(cas, cwd, name, path)?),
                    Some(Kind::Symlink(target)) => result.output_symlinks.push(OutputSymlink {
                        path: name.clone(),
                        target,
                        node_properties: None,
                    }),
                }
            }
        }
    }
    Ok(result)
}

/// What an output path holds. A symlink is never followed.
enum Kind {
    /// A regular file, and whether it is executable.
    File(bool),
    Directory,
    Symlink(String),
}

/// An error for `path` (an output, or the working directory): the action's fault when the
/// path leads out of its directory through a symlink, ours otherwise.
fn escaped_or(path: &Path, what: &str, error: io::Error) -> ExecError {
    if super::escapes(&error) {
        ExecError::OutputType(format!(
            "{what} {:?} leads out of the action's directory through a symlink; it is not collected",
            path.display().to_string()
        ))
    } else {
        internal(format!("inspecting {what} {}", path.display()))(error)
    }
}

fn output_kind(dir: &Dir, path: &Path) -> Result<Option<Kind>, ExecError> {
    use cap_std::fs::PermissionsExt as _;
    let metadata = match dir.symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(escaped_or(path, "output", e)),
    };
    let kind = metadata.file_type();
    if kind.is_symlink() {
        let target = dir
            .read_link_contents(path)
            .map_err(|e| escaped_or(path, "output symlink", e))?;
        Ok(Some(Kind::Symlink(target.to_string_lossy().into_owned())))
    } else if kind.is_dir() {
        Ok(Some(Kind::Directory))
    } else if kind.is_file() {
        Ok(Some(Kind::File(metadata.permissions().mode() & 0o100 != 0)))
    } else {
        Err(ExecError::OutputType(format!(
            "output {} is neither a file, a directory nor a symlink",
            path.display()
        )))
    }
}

/// Copies the regular file at `path` (beneath `dir`) into the CAS.
fn store(cas: Sink<'_>, dir: &Dir, path: &Path) -> Result<Digest, ExecError> {
    let mut file = dir
        .open(path)
        .map_err(|e| escaped_or(path, "output", e))?
        .into_std();
    cas.cas
        .store_reader(
            &mut file,
            &format!("storing output {}", path.display()),
            cas.function,
        )
        .map_err(internal(format!("storing output {}", path.display())))
}

fn store_message(cas: Sink<'_>, message: &impl prost::Message) -> Result<Digest, ExecError> {
    cas.cas
        .store_bytes_blocking(&message.encode_to_vec(), cas.function)
        .map_err(internal("storing an output directory's message"))
}

/// An output that is a symbolic link, kept as a link (REAPI v2.0 clients read these fields).
fn output_symlink(name: &str, target: String) -> OutputSymlink {
    #[allow(deprecated)]
    OutputSymlink {
        path: name.to_owned(),
        target,
        node_properties: None,
    }
}

fn output_file(
    cas: Sink<'_>,
    dir: &Dir,
    name: &str,
    path: &Path,
    is_executable: bool,
) -> Result<OutputFile, ExecError> {
    Ok(OutputFile {
        path: name.to_owned(),
        digest: Some(store(cas, dir, path)?.to_proto()),
        is_executable,
        contents: Vec::new(),
        node_properties: None,
    })
}

/// Stores a directory's files and builds its `Tree` (root plus every distinct descendant).
pub(crate) fn output_directory(
    cas: Sink<'_>,
    parent: &Dir,
    name: &str,
    path: &Path,
) -> Result<OutputDirectory, ExecError> {
    let dir = parent
        .open_dir(path)
        .map_err(|e| escaped_or(path, "output directory", e))?;
    let mut children: Vec<Directory> = Vec::new();
    let mut seen: HashSet<Digest> = HashSet::new();
    let root = directory_message(cas, &dir, &PathBuf::from(path), &mut children, &mut seen)?;
    let root_digest = store_message(cas, &root)?;
    let tree = Tree {
        root: Some(root),
        children,
    };
    let tree_digest = store_message(cas, &tree)?;
    Ok(OutputDirectory {
        path: name.to_owned(),
        tree_digest: Some(tree_digest.to_proto()),
        is_topologically_sorted: false,
        root_directory_digest: Some(root_digest.to_proto()),
    })
}

/// The `Directory` message of `dir` (entries sorted by name, as REAPI requires), storing its
/// files and every descendant `Directory` on the way; `shown` names it in errors.
fn directory_message(
    cas: Sink<'_>,
    dir: &Dir,
    shown: &Path,
    children: &mut Vec<Directory>,
    seen: &mut HashSet<Digest>,
) -> Result<Directory, ExecError> {
    let listing = |e: io::Error| internal(format!("listing output {}", shown.display()))(e);
    let mut names: Vec<String> = Vec::new();
    for entry in dir.entries().map_err(listing)? {
        let entry = entry.map_err(listing)?;
        let name = entry.file_name().into_string().map_err(|name| {
            ExecError::OutputType(format!(
                "output {} contains a name that is not UTF-8: {name:?}",
                shown.display()
            ))
        })?;
        names.push(name);
    }
    names.sort();
    let mut directory = Directory::default();
    for name in names {
        let entry = Path::new(&name);
        match output_kind(dir, entry)? {
            None => {}
            Some(Kind::File(is_executable)) => directory.files.push(FileNode {
                digest: Some(store(cas, dir, entry)?.to_proto()),
                name,
                is_executable,
                node_properties: None,
            }),
            Some(Kind::Directory) => {
                let sub = dir
                    .open_dir(entry)
                    .map_err(|e| escaped_or(&shown.join(entry), "output directory", e))?;
                let child = directory_message(cas, &sub, &shown.join(entry), children, seen)?;
                let digest = store_message(cas, &child)?;
                if seen.insert(digest) {
                    children.push(child);
                }
                directory.directories.push(DirectoryNode {
                    name,
                    digest: Some(digest.to_proto()),
                });
            }
            Some(Kind::Symlink(target)) => directory.symlinks.push(SymlinkNode {
                name,
                target,
                node_properties: None,
            }),
        }
    }
    Ok(directory)
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::PermissionsExt as _};

    use prost::Message as _;

    use super::*;

    #[test]
    fn output_directories_become_trees() {
        let dir = tempfile::tempdir().unwrap();
        let cas = crate::Cas::open(&dir.path().join("cas"), 1 << 20).unwrap();
        let out = dir.path().join("out");
        fs::create_dir_all(out.join("sub/deeper")).unwrap();
        fs::create_dir_all(out.join("same")).unwrap();
        fs::write(out.join("b.txt"), b"b").unwrap();
        fs::write(out.join("a.sh"), b"#!/bin/sh").unwrap();
        fs::set_permissions(out.join("a.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(out.join("sub/deeper/c"), b"c").unwrap();
        std::os::unix::fs::symlink("b.txt", out.join("link")).unwrap();
        let parent = super::super::open_root(dir.path()).unwrap();
        let sink = Sink {
            cas: &cas,
            function: DigestFunction::Sha256,
        };
        let output = output_directory(sink, &parent, "out", Path::new("out")).unwrap();
        let tree_digest = Digest::from_proto(
            output.tree_digest.as_ref().unwrap(),
            "t",
            DigestFunction::Sha256,
        )
        .unwrap();
        let tree = Tree::decode(fs::read(cas.path_of(&tree_digest)).unwrap().as_slice()).unwrap();
        let root = tree.root.unwrap();
        let names: Vec<&str> = root.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["a.sh", "b.txt"], "sorted by name");
        assert!(root.files[0].is_executable);
        assert!(!root.files[1].is_executable);
        let dirs: Vec<&str> = root.directories.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(dirs, ["same", "sub"]);
        assert_eq!(root.symlinks[0].target, "b.txt");
        // sub, sub/deeper and the empty "same" directory, each once.
        assert_eq!(tree.children.len(), 3);
        for file in [&b"b"[..], b"#!/bin/sh", b"c"] {
            assert!(cas.contains(&Digest::of(file)));
        }
        let root_digest = Digest::from_proto(
            output.root_directory_digest.as_ref().unwrap(),
            "r",
            DigestFunction::Sha256,
        )
        .unwrap();
        assert!(cas.contains(&root_digest));
    }

    #[test]
    fn outputs_behind_a_symlink_out_of_the_directory_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cas = crate::Cas::open(&dir.path().join("cas"), 1 << 20).unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret.txt"), b"host file").unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(&root).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("d")).unwrap();
        let root_dir = super::super::open_root(&root).unwrap();
        for path in ["d/secret.txt", "d"] {
            match output_kind(&root_dir, Path::new(path)) {
                Err(ExecError::OutputType(message)) => {
                    assert!(message.contains("leads out"), "{message}")
                }
                Ok(Some(Kind::Symlink(target))) if path == "d" => {
                    assert_eq!(target, outside.path().display().to_string())
                }
                other => panic!("{path}: {:?}", other.map(|k| k.is_some())),
            }
        }
        assert!(!cas.contains(&Digest::of(b"host file")));
    }
}
