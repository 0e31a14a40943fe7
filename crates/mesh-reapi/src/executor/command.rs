//! Stage 2: the command, checked, and run beneath the action's directory, sandboxed.

use std::{
    fs, io,
    os::unix::process::ExitStatusExt as _,
    path::{Component, Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use bazel_remote_apis::build::bazel::remote::execution::v2::Command;

use super::{ExecError, internal};
use crate::sandbox::{Launch, Sandbox, find_on_path};

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
pub(crate) struct CommandSpec {
    pub(super) arguments: Vec<String>,
    pub(super) environment: Vec<(String, String)>,
    pub(super) working_directory: PathBuf,
    pub(super) outputs: Outputs,
}

/// Which outputs to collect.
#[derive(Debug, Clone)]
pub(crate) enum Outputs {
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
    pub(crate) fn parse(command: &Command) -> Result<Self, ExecError> {
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

    /// Creates the working directory and the parent of every output beneath `root`, through a
    /// handle on it: a path that leads out of it through an input symlink is refused
    /// (`INVALID_ARGUMENT` naming it), never followed. Blocking.
    pub(crate) fn prepare_directories(&self, root: &Path) -> Result<(), ExecError> {
        let root_dir = super::open_root(root)?;
        let create = |path: &Path, what: &str| {
            root_dir.create_dir_all(path).map_err(|error| {
                if super::escapes(&error) {
                    ExecError::Invalid(format!(
                        "{what} {:?} leads out of the action's input root through a symlink",
                        path.display().to_string()
                    ))
                } else {
                    internal(format!("creating {what} {}", path.display()))(error)
                }
            })
        };
        if !self.working_directory.as_os_str().is_empty() {
            create(&self.working_directory, "the working directory")?;
        }
        for parent in self.output_parents() {
            create(
                &self.working_directory.join(parent),
                "the parent of an output",
            )?;
        }
        Ok(())
    }
}

/// How a command ended.
pub(crate) struct Run {
    pub(crate) exit_code: i32,
    pub(crate) timed_out: bool,
}

/// Runs the command beneath `place.root` (in the sandbox unless it is off), its stdout and
/// stderr to `output`'s two files, for at most `timeout`.
pub(crate) async fn run(
    sandbox: &Sandbox,
    command: &CommandSpec,
    place: &super::Place,
    output: [&fs::File; 2],
    timeout: Duration,
    network: bool,
) -> Result<Run, ExecError> {
    let program = &command.arguments[0];
    let root = place.root.as_path();
    // REAPI: a relative program path is relative to the input root; a bare name is looked
    // up in the command's PATH. Checked here, so a program that is not there is the action's
    // error (INVALID_ARGUMENT), with the sandbox as without.
    let program_path = if program.contains('/') {
        let path = if program.starts_with('/') {
            PathBuf::from(program)
        } else {
            root.join(program)
        };
        if !path.is_file() {
            return Err(ExecError::Invalid(format!(
                "the command's program {program:?} could not be started: it is not a file"
            )));
        }
        path
    } else {
        // The command's own PATH, or (as a process started without one would) the server's.
        let path = command
            .environment
            .iter()
            .find(|(name, _)| name == "PATH")
            .map(|(_, value)| std::ffi::OsString::from(value))
            .or_else(|| std::env::var_os("PATH"));
        find_on_path(program, path.as_deref()).ok_or_else(|| {
            ExecError::Invalid(format!(
                "the command's program {program:?} could not be started: it is not on the command's PATH"
            ))
        })?
    };
    let [stdout_file, stderr_file] = output;
    let stdout_file = stdout_file
        .try_clone()
        .map_err(internal("handing the stdout file to the command"))?;
    let stderr_file = stderr_file
        .try_clone()
        .map_err(internal("handing the stderr file to the command"))?;
    let cwd = root.join(&command.working_directory);
    // Kept until the action's processes are gone; dropping it removes the groups.
    let group = sandbox
        .action_group(&place.id)
        .map_err(internal("making the action's control groups"))?;
    let mut process = sandbox.command(&Launch {
        program: &program_path,
        arguments: &command.arguments[1..],
        environment: &command.environment,
        root,
        cwd: &cwd,
        network,
        group: group.as_ref(),
    });
    process
        .stdout(Stdio::from(stdout_file))
        .stderr(Stdio::from(stderr_file));
    let spawned = match &group {
        // Born in its control groups where they allow it, else moved by a wrapper.
        Some(group) => group.spawn_inside(|| process.spawn()),
        None => process.spawn(),
    };
    let mut child = spawned.map_err(|error| {
        let context = format!("the command's program {program:?} could not be started");
        match error.kind() {
            // The action's fault: it names something that cannot run.
            io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied => {
                ExecError::Invalid(format!("{context}: {error}"))
            }
            // Ours (too many processes or open files): worth a retry.
            _ => internal(context)(error),
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
}
