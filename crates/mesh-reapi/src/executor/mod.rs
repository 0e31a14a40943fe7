//! Running one action for real: inputs materialised, the command run in a sandbox, outputs
//! captured — each stage in a module of its own.
//!
//! For each action (REAPI v2 `Action`/`Command` semantics):
//!
//! 1. **Inputs** (`executor/inputs.rs`): the `Command` and the input root's `Directory` tree
//!    are read from the CAS, level by level, fetching what is missing from peers
//!    ([`ClusterCas::ensure_local`]); then every input file. Names are checked (no `/`, `.`,
//!    `..`, empty, duplicates). The files are pinned against eviction and **copied** into a
//!    fresh directory of the action's own, its input root (`{data_dir}/work/{uuid}`), so nothing
//!    the action does can change the CAS. Its stdout and stderr go to unnamed temporary files
//!    (`O_TMPFILE`) in `work/`, outside the tree the sandbox shows it. That is one directory
//!    per action and no other name: on ext4 a `mkdir`, and every name added to or removed
//!    from `work/` (its lock is shared by all running actions), cost more than the rest of a
//!    no-op action's bookkeeping.
//! 2. **Run** (`executor/command.rs`): parents of every output path and the working directory
//!    are created (REAPI: the server creates them) beneath the action's directory, never through a
//!    link out of it; then `arguments` run in `working_directory` with exactly the command's
//!    environment, stdin closed and stdout/stderr to files, in the [`crate::sandbox`] (or, with
//!    the sandbox off, as a process group of its own). On timeout every process of the action
//!    is killed (`SIGKILL`), and after a normal exit too, so nothing outlives its action.
//! 3. **Outputs** (`executor/outputs.rs`): read beneath the action's directory only, through a
//!    directory handle (`cap-std`'s `Dir`: a path that leads out through a symlink is refused,
//!    never followed); output files are copied into the CAS (hashed while copying); output
//!    directories become `Tree` messages (and their `Directory` messages are stored too, for
//!    `GetTree` and `root_directory_digest`); a symlink is reported as a symlink, never followed
//!    to collect what it points at; stdout and stderr are stored as blobs. Outputs that do not
//!    exist are simply absent (REAPI).
//! 4. **Clean up**: the action's directory is removed, also after a failure or timeout.
//!
//! Errors are typed ([`ExecError`]) and become the `status` of the `ExecuteResponse`: missing
//! blobs are `FAILED_PRECONDITION` with their digests (so Bazel re-uploads), malformed commands
//! or trees `INVALID_ARGUMENT`, a timeout `DEADLINE_EXCEEDED` (with the partial result).

use std::{
    fs,
    io::{self, Seek as _},
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::SystemTime,
};

use bazel_remote_apis::{
    build::bazel::remote::execution::v2::{ActionResult, Command, ExecutedActionMetadata},
    google::protobuf::Timestamp,
};
use mesh_core::NodeId;

use crate::{
    ClusterCas, ClusterError, Digest, Fetch, MissingBlobs,
    action::{ActionSpec, wants_network},
    cluster::MAX_MESSAGE_SIZE,
    sandbox::Sandbox,
};

pub(crate) mod command;
pub(crate) mod inputs;
pub(crate) mod outputs;

use command::CommandSpec;

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
    /// This server failed (file system, process spawning, the local store): `INTERNAL`.
    /// `context` says what it was doing; `source` is the cause, kept typed (an
    /// [`std::io::Error`]'s kind tells a full disk from a missing file).
    #[error("{context}: {source}")]
    Internal {
        /// What this server was doing, naming the path or blob.
        context: String,
        /// Why it failed.
        #[source]
        source: InternalCause,
    },
}

/// The cause of an [`ExecError::Internal`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InternalCause {
    /// A file system or process call failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The local CAS failed (boxed, as is the next: a result stays small).
    #[error(transparent)]
    Cas(Box<crate::CasError>),
    /// The cluster store failed for another reason than missing or malformed blobs.
    #[error(transparent)]
    Cluster(Box<ClusterError>),
    /// A blocking task of this action panicked or was cancelled.
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
}

impl From<crate::CasError> for InternalCause {
    fn from(error: crate::CasError) -> Self {
        Self::Cas(Box::new(error))
    }
}

impl From<ClusterError> for InternalCause {
    fn from(error: ClusterError) -> Self {
        Self::Cluster(Box::new(error))
    }
}

impl From<ClusterError> for ExecError {
    fn from(error: ClusterError) -> Self {
        match error {
            ClusterError::Missing(missing) => ExecError::Missing(missing),
            ClusterError::Malformed { .. } | ClusterError::MessageTooLarge { .. } => {
                ExecError::Invalid(error.to_string())
            }
            other => internal("using the cluster store")(other),
        }
    }
}

/// Turns a cause into an [`ExecError::Internal`] saying what this server was doing.
pub(crate) fn internal<E: Into<InternalCause>>(
    context: impl std::fmt::Display,
) -> impl FnOnce(E) -> ExecError {
    move |error| ExecError::Internal {
        context: context.to_string(),
        source: error.into(),
    }
}

/// What running an action produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Executed {
    /// The result (also when the command failed or timed out).
    pub result: ActionResult,
    /// Whether the command was killed for running past its timeout.
    pub timed_out: bool,
}

/// An action's inputs, present on this replica and pinned until they are copied into its
/// directory ([`Executor::fetch_inputs`]).
pub(crate) struct Fetched {
    command: CommandSpec,
    network: bool,
    inputs: inputs::Inputs,
    pins: crate::lru_dir::Pins,
    timing: ExecutedActionMetadata,
}

/// Runs actions in directories under `work_dir`, reading and writing blobs through `cluster`.
#[derive(Debug, Clone)]
pub(crate) struct Executor {
    cluster: ClusterCas,
    work_dir: PathBuf,
    node_id: NodeId,
    sandbox: Sandbox,
}

impl Executor {
    pub(crate) fn new(
        cluster: ClusterCas,
        work_dir: PathBuf,
        node_id: NodeId,
        sandbox: Sandbox,
    ) -> Self {
        Self {
            cluster,
            work_dir,
            node_id,
            sandbox,
        }
    }

    /// Makes the inputs of `spec` present here and pins them against eviction: the `Command`
    /// and the input tree read (fetched from peers where missing; `fetch` names the nodes
    /// likely to hold them, the node that forwarded the action first, and carries the caller's
    /// metadata), every input file fetched. No slot is needed for this: it waits on peers, not
    /// on this machine. `queued_at` is when the action was accepted.
    pub(crate) async fn fetch_inputs(
        &self,
        spec: &ActionSpec,
        queued_at: SystemTime,
        fetch: &Fetch,
    ) -> Result<Fetched, ExecError> {
        let timing = ExecutedActionMetadata {
            worker: self.node_id.to_string(),
            queued_timestamp: Some(timestamp(queued_at)),
            worker_start_timestamp: Some(now()),
            input_fetch_start_timestamp: Some(now()),
            ..Default::default()
        };
        // The command and the input root's top directory in one round to peers (a forwarded
        // action finds them on the replica that forwarded it); what is still missing or
        // malformed is reported by the reads below.
        let first: Vec<Digest> = [spec.command_digest, spec.input_root_digest]
            .into_iter()
            .filter(|digest| digest.size() <= MAX_MESSAGE_SIZE)
            .collect();
        let _ = self.cluster.ensure_local(&first, fetch).await;
        let command: Command = self
            .cluster
            .read_message(&spec.command_digest, "Command", fetch)
            .await?;
        #[allow(deprecated)] // Command.platform: what Bazel 4.2.3 sets.
        let network = spec.network || command.platform.as_ref().is_some_and(wants_network);
        let command = CommandSpec::parse(&command)?;
        let inputs = self.collect_inputs(&spec.input_root_digest, fetch).await?;
        let file_digests: Vec<Digest> = inputs.files.iter().map(|f| f.digest).collect();
        let pins = self.pin_inputs(&file_digests, fetch).await?;
        Ok(Fetched {
            command,
            network,
            inputs,
            pins,
            timing,
        })
    }

    /// Runs `spec` with its `fetched` inputs, in a directory of its own that is removed
    /// afterwards.
    pub(crate) async fn run(
        &self,
        spec: &ActionSpec,
        fetched: Fetched,
    ) -> Result<Executed, ExecError> {
        let id = uuid::Uuid::now_v7().to_string();
        let place = Place {
            root: self.work_dir.join(&id),
            id,
        };
        let outcome = self.run_in(spec, fetched, &place).await;
        let removed = tokio::task::spawn_blocking(move || {
            remove_tree(&place.root).map_err(|error| (place.root, error))
        })
        .await;
        if let Ok(Err((root, error))) = removed {
            tracing::warn!(dir = %root.display(), %error, "could not remove an action's directory");
        }
        outcome
    }

    async fn run_in(
        &self,
        spec: &ActionSpec,
        fetched: Fetched,
        place: &Place,
    ) -> Result<Executed, ExecError> {
        let Fetched {
            command,
            network,
            inputs,
            pins,
            mut timing,
        } = fetched;
        let root = place.root.clone();
        let cas = self.cluster.local().clone();
        let materialise_root = root.clone();
        let prepared = command.clone();
        let work_dir = self.work_dir.clone();
        let (stdout, stderr) = tokio::task::spawn_blocking(move || {
            inputs::materialise(&cas, &materialise_root, &inputs)?;
            prepared.prepare_directories(&materialise_root)?;
            // Unnamed (`O_TMPFILE` where the file system has it): gone when closed.
            let output = || {
                tempfile::tempfile_in(&work_dir)
                    .map_err(internal("creating a file for the action's output"))
            };
            Ok::<_, ExecError>((output()?, output()?))
        })
        .await
        .map_err(internal("materialising inputs"))??;
        drop(pins);
        timing.input_fetch_completed_timestamp = Some(now());

        timing.execution_start_timestamp = Some(now());
        let run = command::run(
            &self.sandbox,
            &command,
            place,
            [&stdout, &stderr],
            spec.timeout,
            network,
        )
        .await?;

        timing.execution_completed_timestamp = Some(now());

        timing.output_upload_start_timestamp = Some(now());
        let cas = self.cluster.local().clone();
        let function = spec.action_digest.function();
        let mut result = tokio::task::spawn_blocking(move || {
            let mut result = outputs::collect(&cas, function, &command, &root)?;
            let store = |mut file: fs::File, what: &str| {
                file.seek(io::SeekFrom::Start(0))
                    .map(|_| cas.store_reader(&mut file, what, function))
                    .map_err(internal(format!("reading {what}")))?
                    .map_err(internal(format!("storing {what}")))
            };
            let stdout = store(stdout, "the action's stdout")?;
            let stderr = store(stderr, "the action's stderr")?;
            result.stdout_digest = Some(stdout.to_proto());
            result.stderr_digest = Some(stderr.to_proto());
            Ok::<_, ExecError>(result)
        })
        .await
        .map_err(internal("collecting outputs"))??;
        result.exit_code = run.exit_code;
        timing.output_upload_completed_timestamp = Some(now());
        timing.worker_completed_timestamp = Some(now());
        result.execution_metadata = Some(timing);
        Ok(Executed {
            result,
            timed_out: run.timed_out,
        })
    }
}

/// Where one action runs: its input root, a directory of its own. `id` is unique among
/// actions (it names the directory and the action's control groups).
pub(crate) struct Place {
    pub(crate) id: String,
    pub(crate) root: PathBuf,
}

/// A handle on the action's directory: every path opened through it stays beneath it (a
/// symlink leading out is refused, never followed).
pub(crate) fn open_root(root: &Path) -> Result<cap_std::fs::Dir, ExecError> {
    cap_std::fs::Dir::open_ambient_dir(root, cap_std::ambient_authority())
        .map_err(internal("opening the action's directory"))
}

/// Whether an I/O error is cap-std refusing a path that leads out of the directory.
pub(crate) fn escapes(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::PermissionDenied
        && error.to_string().contains("outside of the filesystem")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_internal_failure_names_what_failed_and_keeps_its_cause_typed() {
        let error = internal("storing output out/a")(io::Error::from(io::ErrorKind::StorageFull));
        assert!(
            error.to_string().starts_with("storing output out/a: "),
            "{error}"
        );
        let cause = std::error::Error::source(&error).expect("a source");
        let cause = cause
            .downcast_ref::<InternalCause>()
            .expect("the cause is an InternalCause");
        assert!(
            matches!(cause, InternalCause::Io(io) if io.kind() == io::ErrorKind::StorageFull),
            "{cause:?}"
        );
        let status = crate::error::exec_rpc_status(&error);
        assert_eq!(status.code, tonic::Code::Internal as i32);
        assert_eq!(status.message, error.to_string());
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
}
