//! The blobs an `ActionResult` names (REAPI v2): output files, the `Tree` of each output
//! directory and the files in it, stdout and stderr; and the replica that ran it.

use std::collections::HashSet;

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    ActionResult, Directory, OutputDirectory, Tree,
};
use mesh_core::NodeId;

use crate::{Digest, DigestFunction};

pub(super) fn tree_of(directory: &OutputDirectory, function: DigestFunction) -> Option<Digest> {
    directory
        .tree_digest
        .as_ref()
        .and_then(|d| Digest::from_proto(d, "tree_digest", function).ok())
}

/// The replica that ran the action, as recorded in its result.
pub(crate) fn worker_of(result: &ActionResult) -> Option<NodeId> {
    result
        .execution_metadata
        .as_ref()
        .and_then(|m| NodeId::new(&m.worker).ok())
}

/// Every blob an action result names directly: output files, trees, stdout and stderr; its
/// digests are of `function`, the action's.
pub(crate) fn result_digests(
    result: &ActionResult,
    function: DigestFunction,
) -> Result<Vec<Digest>, crate::DigestError> {
    let mut digests = Vec::new();
    for file in &result.output_files {
        digests.push(Digest::from_required(
            file.digest.as_ref(),
            "output_files.digest",
            function,
        )?);
    }
    for directory in &result.output_directories {
        digests.push(Digest::from_required(
            directory.tree_digest.as_ref(),
            "output_directories.tree_digest",
            function,
        )?);
    }
    for (digest, field) in [
        (&result.stdout_digest, "stdout_digest"),
        (&result.stderr_digest, "stderr_digest"),
    ] {
        if let Some(digest) = digest {
            digests.push(Digest::from_proto(digest, field, function)?);
        }
    }
    Ok(digests)
}

/// Every file blob in a `Tree` whose digests are of `function`.
pub(crate) fn tree_file_digests(
    tree: &Tree,
    function: DigestFunction,
) -> Result<Vec<Digest>, crate::DigestError> {
    let mut digests = Vec::new();
    let directories: Vec<&Directory> = tree.root.iter().chain(tree.children.iter()).collect();
    for directory in directories {
        for file in &directory.files {
            digests.push(Digest::from_required(
                file.digest.as_ref(),
                "files.digest",
                function,
            )?);
        }
    }
    let unique: HashSet<Digest> = digests.drain(..).collect();
    Ok(unique.into_iter().collect())
}
