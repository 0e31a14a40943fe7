//! Running one action for real: inputs materialised, the command run, outputs captured.
//!
//! For each action (REAPI v2 `Action`/`Command` semantics):
//!
//! 1. **Inputs**: the `Command` and the input root's `Directory` tree are read from the CAS,
//!    level by level, fetching what is missing from peers ([`ClusterCas::ensure_local`]); then
//!    every input file. Names are checked (no `/`, `.`, `..`, duplicates). The files are pinned
//!    against eviction and **copied** into a fresh directory of the action's own
//!    (`{data_dir}/work/{uuid}/root`), so nothing the action does can change the CAS.
//! 2. **Run**: parents of every output path are created (REAPI: the server creates them),
//!    then `arguments` are run in `working_directory` with exactly the command's environment
//!    (`env_clear` + its variables), stdin closed and stdout/stderr to files. The process
//!    leads a process group of its own; on timeout the whole group is killed (`SIGKILL`), and
//!    after a normal exit the group is killed too so no stray child outlives its action.
//! 3. **Outputs**: output files are copied into the CAS (hashed while copying); output
//!    directories become `Tree` messages (and their `Directory` messages are stored too, for
//!    `GetTree` and `root_directory_digest`); symlinks are reported as symlinks; stdout and
//!    stderr are stored as blobs. Outputs that do not exist are simply absent (REAPI).
//! 4. **Clean up**: the action's directory is removed, also after a failure.
//!
//! Errors are typed ([`ExecError`]) and become the `status` of the `ExecuteResponse`: missing
//! blobs are `FAILED_PRECONDITION` with their digests (so Bazel re-uploads), malformed commands
//! or trees `INVALID_ARGUMENT`, a timeout `DEADLINE_EXCEEDED` (with the partial result).

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    os::unix::{
        fs::{MetadataExt as _, PermissionsExt as _},
        process::ExitStatusExt as _,
    },
    path::{Component, Path, PathBuf},
    process::Stdio,
    time::{Duration, SystemTime},
};

use bazel_remote_apis::{
    build::bazel::remote::execution::v2::{
        ActionResult, Command, Directory, DirectoryNode, ExecutedActionMetadata, FileNode,
        OutputDirectory, OutputFile, OutputSymlink, SymlinkNode, Tree,
    },
    google::protobuf::Timestamp,
};
use mesh_core::NodeId;
use prost::Message as _;
use tonic::metadata::MetadataMap;

use crate::{ClusterCas, ClusterError, Digest, MissingBlobs, cluster::MAX_MESSAGE_SIZE};

/// A validated action, ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionSpec {
    /// The action's digest.
    pub action_digest: Digest,
    /// Its `Command`.
    pub command_digest: Digest,
    /// Its input root `Directory`.
    pub input_root_digest: Digest,
    /// How long the command may run.
    pub timeout: Duration,
    /// Whether the result must stay out of the action cache.
    pub do_not_cache: bool,
}

/// Running an action failed before it produced a result.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecError {
    /// Inputs (or the command) are on no replica: `FAILED_PRECONDITION` with a `MISSING`
    /// violation per blob.
    #[error(transparent)]
    Missing(#[from] MissingBlobs),
    /// The command or input tree is malformed: `INVALID_ARGUMENT`.
    #[error("{0}")]
    Invalid(String),
    /// An output exists with the wrong type: `FAILED_PRECONDITION`.
    #[error("{0}")]
    OutputType(String),
    /// This server failed (file system, process spawning): `INTERNAL`.
    #[error("{0}")]
    Internal(String),
}

impl From<ClusterError> for ExecError {
    fn from(error: ClusterError) -> Self {
        match error {
            ClusterError::Missing(missing) => ExecError::Missing(missing),
            ClusterError::Malformed { .. } | ClusterError::MessageTooLarge { .. } => {
                ExecError::Invalid(error.to_string())
            }
            other => ExecError::Internal(other.to_string()),
        }
    }
}

fn internal(context: impl std::fmt::Display) -> impl FnOnce(io::Error) -> ExecError {
    move |error| ExecError::Internal(format!("{context}: {error}"))
}

/// What running an action produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Executed {
    /// The result (also when the command failed or timed out).
    pub result: ActionResult,
    /// Whether the command was killed for running past its timeout.
    pub timed_out: bool,
}

/// Runs actions in directories under `work_dir`, reading and writing blobs through `cluster`.
#[derive(Debug, Clone)]
pub(crate) struct Executor {
    cluster: ClusterCas,
    work_dir: PathBuf,
    node_id: NodeId,
}

/// One input file to materialise.
struct InputFile {
    path: PathBuf,
    digest: Digest,
    executable: bool,
}

/// The input tree, flattened.
#[derive(Default)]
struct Inputs {
    directories: Vec<PathBuf>,
    files: Vec<InputFile>,
    symlinks: Vec<(PathBuf, String)>,
}

impl Executor {
    pub(crate) fn new(cluster: ClusterCas, work_dir: PathBuf, node_id: NodeId) -> Self {
        Self {
            cluster,
            work_dir,
            node_id,
        }
    }

    /// Runs `spec`. `queued_at` is when the action was accepted; `hints` are nodes likely to
    /// hold its inputs (the node that forwarded it).
    pub(crate) async fn run(
        &self,
        spec: &ActionSpec,
        queued_at: SystemTime,
        hints: &[NodeId],
        metadata: &MetadataMap,
    ) -> Result<Executed, ExecError> {
        let scratch = self.work_dir.join(uuid::Uuid::now_v7().to_string());
        let outcome = self
            .run_in(spec, queued_at, hints, metadata, &scratch)
            .await;
        let cleanup = scratch.clone();
        let removed = tokio::task::spawn_blocking(move || remove_tree(&cleanup)).await;
        if let Ok(Err(error)) = removed {
            tracing::warn!(dir = %scratch.display(), %error, "could not remove an action's directory");
        }
        outcome
    }

    async fn run_in(
        &self,
        spec: &ActionSpec,
        queued_at: SystemTime,
        hints: &[NodeId],
        metadata: &MetadataMap,
        scratch: &Path,
    ) -> Result<Executed, ExecError> {
        let mut timing = ExecutedActionMetadata {
            worker: self.node_id.to_string(),
            queued_timestamp: Some(timestamp(queued_at)),
            worker_start_timestamp: Some(now()),
            input_fetch_start_timestamp: Some(now()),
            ..Default::default()
        };
        let command: Command = self
            .cluster
            .read_message(&spec.command_digest, "Command", hints, metadata, false)
            .await?;
        let command = CommandSpec::parse(&command)?;
        let inputs = self
            .collect_inputs(&spec.input_root_digest, hints, metadata)
            .await?;
        let file_digests: Vec<Digest> = inputs.files.iter().map(|f| f.digest).collect();
        let pins = self.pin_inputs(&file_digests, hints, metadata).await?;
        let root = scratch.join("root");
        let cas = self.cluster.local().clone();
        let materialise_root = root.clone();
        let outputs_to_prepare = command.output_parents();
        let working_directory = command.working_directory.clone();
        tokio::task::spawn_blocking(move || {
            materialise(&cas, &materialise_root, &inputs)?;
            let cwd = materialise_root.join(&working_directory);
            fs::create_dir_all(&cwd).map_err(internal("creating the working directory"))?;
            for parent in outputs_to_prepare {
                fs::create_dir_all(cwd.join(parent))
                    .map_err(internal("creating the parent of an output"))?;
            }
            Ok::<_, ExecError>(())
        })
        .await
        .map_err(|e| ExecError::Internal(format!("materialising inputs: {e}")))??;
        drop(pins);
        timing.input_fetch_completed_timestamp = Some(now());

        timing.execution_start_timestamp = Some(now());
        let stdout_path = scratch.join("stdout");
        let stderr_path = scratch.join("stderr");
        let run = run_command(&command, &root, &stdout_path, &stderr_path, spec.timeout).await?;
        timing.execution_completed_timestamp = Some(now());

        timing.output_upload_start_timestamp = Some(now());
        let cas = self.cluster.local().clone();
        let cwd = root.join(&command.working_directory);
        let mut result = tokio::task::spawn_blocking(move || {
            let mut result = collect_outputs(&cas, &command, &cwd)?;
            let stdout = cas
                .store_file(&stdout_path)
                .map_err(|e| ExecError::Internal(e.to_string()))?;
            let stderr = cas
                .store_file(&stderr_path)
                .map_err(|e| ExecError::Internal(e.to_string()))?;
            result.stdout_digest = Some(stdout.to_proto());
            result.stderr_digest = Some(stderr.to_proto());
            Ok::<_, ExecError>(result)
        })
        .await
        .map_err(|e| ExecError::Internal(format!("collecting outputs: {e}")))??;
        result.exit_code = run.exit_code;
        timing.output_upload_completed_timestamp = Some(now());
        timing.worker_completed_timestamp = Some(now());
        result.execution_metadata = Some(timing);
        Ok(Executed {
            result,
            timed_out: run.timed_out,
        })
    }

    /// Reads the input tree level by level (fetching missing directories in one go per
    /// level) and flattens it, checking names.
    async fn collect_inputs(
        &self,
        root: &Digest,
        hints: &[NodeId],
        metadata: &MetadataMap,
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
            self.cluster
                .ensure_local(&wanted, hints, metadata, false)
                .await?;
            for digest in wanted {
                if decoded.contains_key(&digest) {
                    continue;
                }
                let bytes = self
                    .cluster
                    .local()
                    .read(&digest)
                    .await
                    .map_err(|e| ExecError::Internal(e.to_string()))?
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
                    let digest = Digest::from_required(file.digest.as_ref(), "FileNode.digest")
                        .map_err(|e| ExecError::Invalid(e.to_string()))?;
                    inputs.files.push(InputFile {
                        path: check(&file.name)?,
                        digest,
                        executable: file.is_executable,
                    });
                }
                for child in &directory.directories {
                    let digest =
                        Digest::from_required(child.digest.as_ref(), "DirectoryNode.digest")
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
    async fn pin_inputs(
        &self,
        digests: &[Digest],
        hints: &[NodeId],
        metadata: &MetadataMap,
    ) -> Result<crate::store::Pins, ExecError> {
        let mut attempts = 0;
        loop {
            self.cluster
                .ensure_local(digests, hints, metadata, false)
                .await?;
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

/// A relative path inside the input root: no absolute paths, no `.`/`..`, no empty
/// components.
fn relative_path(text: &str, what: &str, allow_empty: bool) -> Result<PathBuf, ExecError> {
    let invalid = |rule: &str| ExecError::Invalid(format!("{what} {text:?} is invalid: {rule}"));
    if text.is_empty() {
        return if allow_empty {
            Ok(PathBuf::new())
        } else {
            Err(invalid("it must not be empty"))
        };
    }
    if text.contains('\0') {
        return Err(invalid("it contains a NUL byte"));
    }
    if text.starts_with('/') {
        return Err(invalid("it must be relative"));
    }
    if text.ends_with('/') || text.contains("//") {
        return Err(invalid("it must not have empty components"));
    }
    let path = PathBuf::from(text);
    if path
        .components()
        .any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(invalid("it must not contain '.' or '..' components"));
    }
    Ok(path)
}

/// A `Command`, checked.
#[derive(Debug, Clone)]
struct CommandSpec {
    arguments: Vec<String>,
    environment: Vec<(String, String)>,
    working_directory: PathBuf,
    outputs: Outputs,
}

/// Which outputs to collect.
#[derive(Debug, Clone)]
enum Outputs {
    /// REAPI v2.0: typed lists (Bazel 4.2.3).
    Typed {
        files: Vec<(String, PathBuf)>,
        directories: Vec<(String, PathBuf)>,
    },
    /// REAPI v2.1: untyped paths, typed when collected.
    Paths(Vec<(String, PathBuf)>),
}

impl CommandSpec {
    #[allow(deprecated)] // output_files and output_directories: what Bazel 4.2.3 sends.
    fn parse(command: &Command) -> Result<Self, ExecError> {
        if command.arguments.is_empty() || command.arguments[0].is_empty() {
            return Err(ExecError::Invalid(
                "the command has no arguments; the first argument must name the program to run"
                    .to_owned(),
            ));
        }
        let mut environment = Vec::with_capacity(command.environment_variables.len());
        for variable in &command.environment_variables {
            if variable.name.is_empty()
                || variable.name.contains('=')
                || variable.name.contains('\0')
            {
                return Err(ExecError::Invalid(format!(
                    "environment variable name {:?} is invalid: it must be non-empty, without '=' or NUL",
                    variable.name
                )));
            }
            environment.push((variable.name.clone(), variable.value.clone()));
        }
        let working_directory =
            relative_path(&command.working_directory, "the working directory", true)?;
        let parse_all =
            |paths: &[String], what: &str| -> Result<Vec<(String, PathBuf)>, ExecError> {
                paths
                    .iter()
                    .map(|p| Ok((p.clone(), relative_path(p, what, false)?)))
                    .collect()
            };
        let outputs = if command.output_paths.is_empty() {
            Outputs::Typed {
                files: parse_all(&command.output_files, "output file")?,
                directories: parse_all(&command.output_directories, "output directory")?,
            }
        } else {
            Outputs::Paths(parse_all(&command.output_paths, "output path")?)
        };
        Ok(Self {
            arguments: command.arguments.clone(),
            environment,
            working_directory,
            outputs,
        })
    }

    /// Parents of every output, relative to the working directory.
    fn output_parents(&self) -> Vec<PathBuf> {
        let paths: Vec<&PathBuf> = match &self.outputs {
            Outputs::Typed { files, directories } => files
                .iter()
                .chain(directories.iter())
                .map(|(_, p)| p)
                .collect(),
            Outputs::Paths(paths) => paths.iter().map(|(_, p)| p).collect(),
        };
        paths
            .into_iter()
            .filter_map(|p| p.parent().map(Path::to_path_buf))
            .filter(|p| !p.as_os_str().is_empty())
            .collect()
    }
}

/// Creates the input tree under `root`. Blocking.
fn materialise(cas: &crate::Cas, root: &Path, inputs: &Inputs) -> Result<(), ExecError> {
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
            .map_err(|e| ExecError::Internal(e.to_string()))?;
        if !copied {
            return Err(MissingBlobs(vec![file.digest]).into());
        }
    }
    for (path, target) in &inputs.symlinks {
        std::os::unix::fs::symlink(target, root.join(path)).map_err(internal(format!(
            "creating input symlink {}",
            path.display()
        )))?;
    }
    Ok(())
}

/// How a command ended.
struct Run {
    exit_code: i32,
    timed_out: bool,
}

async fn run_command(
    command: &CommandSpec,
    root: &Path,
    stdout: &Path,
    stderr: &Path,
    timeout: Duration,
) -> Result<Run, ExecError> {
    let program = &command.arguments[0];
    // REAPI: a relative program path is relative to the input root; a bare name is looked
    // up in the command's PATH.
    let program_path = if program.contains('/') && !program.starts_with('/') {
        root.join(program)
    } else {
        PathBuf::from(program)
    };
    let stdout_file = fs::File::create(stdout).map_err(internal("creating the stdout file"))?;
    let stderr_file = fs::File::create(stderr).map_err(internal("creating the stderr file"))?;
    let mut process = tokio::process::Command::new(&program_path);
    process
        .args(&command.arguments[1..])
        .env_clear()
        .envs(command.environment.iter().map(|(k, v)| (k, v)))
        .current_dir(root.join(&command.working_directory))
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout_file))
        .stderr(Stdio::from(stderr_file))
        .process_group(0)
        .kill_on_drop(true);
    let mut child = process.spawn().map_err(|error| {
        let message = format!("the command's program {program:?} could not be started: {error}");
        match error.kind() {
            // The action's fault: it names something that cannot run.
            io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied => {
                ExecError::Invalid(message)
            }
            // Ours (too many processes or open files): worth a retry.
            _ => ExecError::Internal(message),
        }
    })?;
    let group = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(rustix::process::Pid::from_raw);
    let waited = tokio::time::timeout(timeout, child.wait()).await;
    let kill_group = || {
        if let Some(group) = group {
            // ESRCH (the group is already gone) is the common case after a normal exit.
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
    };
    let (status, timed_out) = match waited {
        Ok(status) => {
            kill_group();
            (status.map_err(internal("waiting for the command"))?, false)
        }
        Err(_) => {
            kill_group();
            let status = child
                .wait()
                .await
                .map_err(internal("waiting for the killed command"))?;
            (status, true)
        }
    };
    let exit_code = status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(-1);
    Ok(Run {
        exit_code,
        timed_out,
    })
}

/// Stores the outputs that exist and describes them. Blocking.
fn collect_outputs(
    cas: &crate::Cas,
    command: &CommandSpec,
    cwd: &Path,
) -> Result<ActionResult, ExecError> {
    let mut result = ActionResult::default();
    match &command.outputs {
        Outputs::Typed { files, directories } => {
            for (name, path) in files {
                match output_kind(&cwd.join(path))? {
                    None => {}
                    Some(Kind::File) => {
                        result
                            .output_files
                            .push(output_file(cas, name, &cwd.join(path))?)
                    }
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
                match output_kind(&cwd.join(path))? {
                    None => {}
                    Some(Kind::Directory) => result.output_directories.push(output_directory(
                        cas,
                        name,
                        &cwd.join(path),
                    )?),
                    Some(Kind::Symlink(target)) => {
                        #[allow(deprecated)] // REAPI v2.0 clients (Bazel 4) read this list
                        result
                            .output_directory_symlinks
                            .push(output_symlink(name, target));
                    }
                    Some(Kind::File) => {
                        return Err(ExecError::OutputType(format!(
                            "output directory {name:?} is a regular file; list it as an output file"
                        )));
                    }
                }
            }
        }
        Outputs::Paths(paths) => {
            for (name, path) in paths {
                match output_kind(&cwd.join(path))? {
                    None => {}
                    Some(Kind::File) => {
                        result
                            .output_files
                            .push(output_file(cas, name, &cwd.join(path))?)
                    }
                    Some(Kind::Directory) => result.output_directories.push(output_directory(
                        cas,
                        name,
                        &cwd.join(path),
                    )?),
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

enum Kind {
    File,
    Directory,
    Symlink(String),
}

fn output_kind(path: &Path) -> Result<Option<Kind>, ExecError> {
    let metadata = match fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(internal(format!("inspecting output {}", path.display()))(e)),
    };
    let kind = metadata.file_type();
    if kind.is_symlink() {
        let target = fs::read_link(path).map_err(internal(format!(
            "reading output symlink {}",
            path.display()
        )))?;
        Ok(Some(Kind::Symlink(target.to_string_lossy().into_owned())))
    } else if kind.is_dir() {
        Ok(Some(Kind::Directory))
    } else if kind.is_file() {
        Ok(Some(Kind::File))
    } else {
        Err(ExecError::OutputType(format!(
            "output {} is neither a file, a directory nor a symlink",
            path.display()
        )))
    }
}

fn is_executable(path: &Path) -> Result<bool, ExecError> {
    let metadata =
        fs::metadata(path).map_err(internal(format!("inspecting output {}", path.display())))?;
    Ok(metadata.permissions().mode() & 0o100 != 0)
}

fn store(cas: &crate::Cas, path: &Path) -> Result<Digest, ExecError> {
    cas.store_file(path)
        .map_err(|e| ExecError::Internal(e.to_string()))
}

fn store_message(cas: &crate::Cas, message: &impl prost::Message) -> Result<Digest, ExecError> {
    cas.store_bytes_blocking(&message.encode_to_vec())
        .map_err(|e| ExecError::Internal(e.to_string()))
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

fn output_file(cas: &crate::Cas, name: &str, path: &Path) -> Result<OutputFile, ExecError> {
    Ok(OutputFile {
        path: name.to_owned(),
        digest: Some(store(cas, path)?.to_proto()),
        is_executable: is_executable(path)?,
        contents: Vec::new(),
        node_properties: None,
    })
}

/// Stores a directory's files and builds its `Tree` (root plus every distinct descendant).
fn output_directory(
    cas: &crate::Cas,
    name: &str,
    path: &Path,
) -> Result<OutputDirectory, ExecError> {
    let mut children: Vec<Directory> = Vec::new();
    let mut seen: HashSet<Digest> = HashSet::new();
    let root = directory_message(cas, path, &mut children, &mut seen)?;
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

/// The `Directory` message of `path` (entries sorted by name, as REAPI requires), storing
/// its files and every descendant `Directory` on the way.
fn directory_message(
    cas: &crate::Cas,
    path: &Path,
    children: &mut Vec<Directory>,
    seen: &mut HashSet<Digest>,
) -> Result<Directory, ExecError> {
    let mut entries: Vec<(String, fs::DirEntry)> = Vec::new();
    for entry in
        fs::read_dir(path).map_err(internal(format!("listing output {}", path.display())))?
    {
        let entry = entry.map_err(internal(format!("listing output {}", path.display())))?;
        let name = entry.file_name().into_string().map_err(|name| {
            ExecError::OutputType(format!(
                "output {} contains a name that is not UTF-8: {name:?}",
                path.display()
            ))
        })?;
        entries.push((name, entry));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut directory = Directory::default();
    for (name, entry) in entries {
        let entry_path = entry.path();
        match output_kind(&entry_path)? {
            None => {}
            Some(Kind::File) => directory.files.push(FileNode {
                name,
                digest: Some(store(cas, &entry_path)?.to_proto()),
                is_executable: is_executable(&entry_path)?,
                node_properties: None,
            }),
            Some(Kind::Directory) => {
                let child = directory_message(cas, &entry_path, children, seen)?;
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

/// Removes a directory tree, making read-only directories writable if that is what stops
/// it (an action may leave its outputs read-only).
fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            make_writable(path);
            fs::remove_dir_all(path)
        }
    }
}

fn make_writable(path: &Path) {
    let Ok(metadata) = fs::symlink_metadata(path) else {
        return;
    };
    if metadata.is_dir() {
        let _ = fs::set_permissions(path, fs::Permissions::from_mode(metadata.mode() | 0o700));
        if let Ok(entries) = fs::read_dir(path) {
            for entry in entries.flatten() {
                make_writable(&entry.path());
            }
        }
    }
}

fn timestamp(time: SystemTime) -> Timestamp {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
    }
}

/// The wall-clock time now, as a protocol timestamp (REAPI timestamps are wall-clock).
pub(crate) fn now() -> Timestamp {
    timestamp(SystemTime::now())
}

/// Decodes stored bytes, for tests.
#[cfg(test)]
fn decode<M: prost::Message + Default>(bytes: bytes::Bytes) -> M {
    M::decode(bytes).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_stay_inside_the_root() {
        for (path, rule) in [
            ("/etc/passwd", "must be relative"),
            ("a/../../b", "'.' or '..'"),
            ("./a", "'.' or '..'"),
            ("a//b", "empty components"),
            ("a/", "empty components"),
            ("", "must not be empty"),
        ] {
            let error = relative_path(path, "output file", false)
                .unwrap_err()
                .to_string();
            assert!(error.contains(rule), "{path}: {error}");
            assert!(error.contains(&format!("{path:?}")), "{error}");
        }
        assert_eq!(
            relative_path("bazel-out/k8/bin/x", "output file", false).unwrap(),
            PathBuf::from("bazel-out/k8/bin/x")
        );
        assert_eq!(relative_path("", "wd", true).unwrap(), PathBuf::new());
    }

    #[test]
    fn entry_names_are_single_components() {
        for name in ["", ".", "..", "a/b"] {
            let error = check_name(name, Path::new("dir")).unwrap_err().to_string();
            assert!(error.contains("one non-empty path component"), "{error}");
        }
        check_name("file.txt", Path::new("")).unwrap();
    }

    #[test]
    fn commands_are_checked() {
        let error = CommandSpec::parse(&Command::default())
            .unwrap_err()
            .to_string();
        assert!(error.contains("no arguments"), "{error}");
        let command = Command {
            arguments: vec!["/bin/true".to_owned()],
            environment_variables: vec![
                bazel_remote_apis::build::bazel::remote::execution::v2::command::EnvironmentVariable {
                    name: "A=B".to_owned(),
                    value: String::new(),
                },
            ],
            ..Default::default()
        };
        let error = CommandSpec::parse(&command).unwrap_err().to_string();
        assert!(error.contains("\"A=B\""), "{error}");
    }

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
        let output = output_directory(&cas, "out", &out).unwrap();
        let tree_digest = Digest::from_proto(output.tree_digest.as_ref().unwrap(), "t").unwrap();
        let bytes = cas.path_of(&tree_digest);
        let tree: Tree = decode(bytes::Bytes::from(fs::read(bytes).unwrap()));
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
        let root_digest =
            Digest::from_proto(output.root_directory_digest.as_ref().unwrap(), "r").unwrap();
        assert!(cas.contains(&root_digest));
    }
}
