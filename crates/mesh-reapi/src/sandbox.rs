//! Actions are untrusted: each runs in a sandbox of its own.
//!
//! The sandbox is [bubblewrap](https://github.com/containers/bubblewrap) (`bwrap`, Debian's
//! `bubblewrap` package), the runner Flatpak uses, set up the way Bazel's own `linux-sandbox`
//! isolates a local action:
//!
//! * **Namespaces**: user, mount, pid, ipc, uts, cgroup and network (`--unshare-all`), every
//!   capability dropped (`--cap-drop ALL`), a new session (no terminal to inject into).
//! * **File system**: the host's `/` mounted read-only, so the tools actions name
//!   (`/usr/bin/gcc`, `/bin/bash`) are there as they are; a fresh `/dev` and `/proc`; a private,
//!   empty, writable `/tmp`; the replica's data directory (CAS, action cache, other actions'
//!   directories) covered by an empty file system, so an action can neither read nor poison a
//!   stored blob; and the action's own directory, mounted writable at the same path.
//! * **Network**: none (a loopback interface of its own only) unless the action's platform sets
//!   [`NETWORK_PROPERTY`] to `on`.
//! * **Lifetime**: every process of the action lives in its pid namespace, so all of them end
//!   when the action's first process does, when the action is killed at its timeout, and when
//!   the replica itself dies, even by `kill -9` (`--die-with-parent`, `PR_SET_PDEATHSIG`).
//!
//! [`SandboxMode::Auto`] (the default) uses the sandbox where it can be set up and says
//! clearly, once, when it cannot; [`SandboxMode::Required`] refuses to start without it;
//! [`SandboxMode::Off`] runs actions as plain child processes of the replica (each in a process
//! group of its own, killed as a group), for machines where the replica itself is the sandbox.
//! Memory and process-count limits come from control groups ([`crate::cgroups`]), in either
//! mode, where the machine lets the replica make them.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Stdio,
};

use crate::cgroups::{ActionGroup, Cgroups, ResourceLimits};

/// The platform property that lets an action reach the network: `network=on`. Any other value
/// (or none) keeps it off. The server interprets it itself: it is not a routing tag.
pub const NETWORK_PROPERTY: &str = "network";

/// Whether actions run sandboxed (`auto`, `required`, `off` in configuration files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum SandboxMode {
    /// Sandboxed where `bwrap` is installed and works; otherwise a warning at start and plain
    /// processes.
    #[default]
    Auto,
    /// Sandboxed, or the replica does not start.
    #[serde(alias = "on")]
    Required,
    /// Plain processes (the replica's own isolation is all there is).
    Off,
}

impl std::str::FromStr for SandboxMode {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "auto" => Ok(Self::Auto),
            "required" | "on" => Ok(Self::Required),
            "off" => Ok(Self::Off),
            other => Err(format!(
                "sandbox mode {other:?} is not one of auto, required (or on), off"
            )),
        }
    }
}

/// The sandbox could not be set up while [`SandboxMode::Required`].
#[derive(Debug, thiserror::Error)]
#[error(
    "actions must run sandboxed (sandbox = required), but the sandbox cannot be set up: {reason}"
)]
pub struct SandboxError {
    reason: String,
}

/// One action's process: `program` and `arguments` with exactly `environment`, in `cwd`, with
/// `root` (the action's directory, holding `cwd`) writable and nothing else; `network` shares
/// the host's network; `group` is the action's control groups, which its first process is in
/// before it runs anything (born there, or moved by the wrapper this command then starts with;
/// spawn it with [`ActionGroup::spawn_inside`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Launch<'a> {
    pub(crate) program: &'a Path,
    pub(crate) arguments: &'a [String],
    pub(crate) environment: &'a [(String, String)],
    pub(crate) root: &'a Path,
    pub(crate) cwd: &'a Path,
    pub(crate) network: bool,
    pub(crate) group: Option<&'a ActionGroup>,
}

/// How this replica runs action processes.
#[derive(Debug, Clone)]
pub(crate) struct Sandbox {
    /// `bwrap`, when actions are sandboxed.
    runner: Option<PathBuf>,
    /// Hidden from actions (the data directory).
    hidden: PathBuf,
    /// Where actions get their memory and process limits, if anywhere.
    cgroups: Option<Cgroups>,
}

impl Sandbox {
    /// Sets up the sandbox for a replica whose data lives in `data_dir`: finds `bwrap` and
    /// checks it can create the namespaces here, and prepares control groups named `name` for
    /// `limits`. Blocking (runs `bwrap` once).
    pub(crate) fn prepare(
        mode: SandboxMode,
        data_dir: &Path,
        limits: ResourceLimits,
        name: &str,
    ) -> Result<Self, SandboxError> {
        let hidden = data_dir
            .canonicalize()
            .unwrap_or_else(|_| data_dir.to_path_buf());
        let cgroups = match Cgroups::prepare(limits, name) {
            Ok(cgroups) => cgroups,
            Err(reason) => {
                tracing::warn!("actions run without memory and process limits: {reason}");
                None
            }
        };
        let runner = choose_runner(mode, probe)?;
        Ok(Self {
            runner,
            hidden,
            cgroups,
        })
    }

    /// The control groups of a new action (`id` unique among running actions), if actions
    /// get limits here.
    pub(crate) fn action_group(&self, id: &str) -> std::io::Result<Option<ActionGroup>> {
        self.cgroups.as_ref().map(|c| c.action(id)).transpose()
    }

    /// Whether actions get memory and process limits.
    pub(crate) fn limits_resources(&self) -> bool {
        self.cgroups.is_some()
    }

    /// Whether actions run sandboxed.
    pub(crate) fn is_on(&self) -> bool {
        self.runner.is_some()
    }

    /// The process that runs `launch`.
    pub(crate) fn command(&self, launch: &Launch<'_>) -> tokio::process::Command {
        let Launch {
            program,
            arguments,
            environment,
            root,
            cwd,
            network,
            group,
        } = *launch;
        let mut argv: Vec<OsString> = match &self.runner {
            None => std::iter::once(program.as_os_str().to_owned())
                .chain(arguments.iter().map(OsString::from))
                .collect(),
            Some(bwrap) => std::iter::once(bwrap.as_os_str().to_owned())
                .chain(sandbox_arguments(
                    &self.hidden,
                    root,
                    cwd,
                    network,
                    program,
                    arguments,
                ))
                .collect(),
        };
        let procs = group.map(ActionGroup::procs).unwrap_or_default();
        if !procs.is_empty() {
            // `sh -c 'echo $$ > "$1" && … && shift N && exec "$@"' sh FILES… ARGV…`: the
            // first process joins the groups, then becomes the action (or its sandbox).
            let mut script = String::new();
            for i in 1..=procs.len() {
                script.push_str(&format!("echo $$ > \"${i}\" && "));
            }
            script.push_str(&format!("shift {} && exec \"$@\"", procs.len()));
            let mut wrapped: Vec<OsString> =
                vec!["/bin/sh".into(), "-c".into(), script.into(), "sh".into()];
            wrapped.extend(procs.into_iter().map(OsString::from));
            wrapped.append(&mut argv);
            argv = wrapped;
        }
        let mut command = tokio::process::Command::new(&argv[0]);
        command.args(&argv[1..]);
        // Sandboxed, the action's working directory is set inside; unsandboxed, here.
        command.current_dir(if self.runner.is_some() {
            Path::new("/")
        } else {
            cwd
        });
        command
            .env_clear()
            .envs(environment.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        command
    }
}

fn sandbox_arguments(
    hidden: &Path,
    root: &Path,
    cwd: &Path,
    network: bool,
    program: &Path,
    arguments: &[String],
) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        "--die-with-parent",
        "--new-session",
        "--unshare-all",
        "--cap-drop",
        "ALL",
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--tmpfs",
        "/tmp",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    if network {
        args.push("--share-net".into());
    }
    args.push("--tmpfs".into());
    args.push(hidden.into());
    args.push("--bind".into());
    args.push(root.into());
    args.push(root.into());
    args.push("--chdir".into());
    args.push(cwd.into());
    args.push("--".into());
    args.push(program.into());
    args.extend(arguments.iter().map(OsString::from));
    args
}

/// Finds `bwrap` on the `PATH` and runs `true` in a sandbox like an action's.
/// The `bwrap` to run actions under for `mode`, given how probing for it goes: none when the
/// sandbox is off, or (with a warning) when it cannot be set up and is not required.
fn choose_runner(
    mode: SandboxMode,
    probe: impl FnOnce() -> Result<PathBuf, String>,
) -> Result<Option<PathBuf>, SandboxError> {
    match mode {
        SandboxMode::Off => Ok(None),
        _ => match probe() {
            Ok(runner) => Ok(Some(runner)),
            Err(reason) if mode == SandboxMode::Required => Err(SandboxError { reason }),
            Err(reason) => {
                tracing::warn!(
                    "actions run WITHOUT a sandbox: {reason}. Install bubblewrap (apt-get install bubblewrap) to isolate them, or set the sandbox to off to say this is intended"
                );
                Ok(None)
            }
        },
    }
}

fn probe() -> Result<PathBuf, String> {
    let bwrap = find_on_path("bwrap", std::env::var_os("PATH").as_deref())
        .ok_or_else(|| "bwrap (bubblewrap) is not installed (not on PATH)".to_owned())?;
    let scratch = tempfile::tempdir().map_err(|e| format!("creating a probe directory: {e}"))?;
    let truth =
        find_on_path("true", Some(std::ffi::OsStr::new("/usr/bin:/bin"))).ok_or_else(|| {
            "no `true` program in /usr/bin or /bin to probe the sandbox with".to_owned()
        })?;
    let output = std::process::Command::new(&bwrap)
        .args(sandbox_arguments(
            scratch.path(),
            scratch.path(),
            scratch.path(),
            false,
            &truth,
            &[],
        ))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", bwrap.display()))?;
    if output.status.success() {
        Ok(bwrap)
    } else {
        Err(format!(
            "{} cannot create namespaces here ({}): {}",
            bwrap.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// `name` in the directories of `path` (a `PATH` value), if it is an executable file there.
pub(crate) fn find_on_path(name: &str, path: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    std::env::split_paths(path?)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_refuses_to_start_without_a_sandbox_and_auto_warns_and_runs_without() {
        let missing = || Err("bwrap (bubblewrap) is not installed (not on PATH)".to_owned());
        let error = choose_runner(SandboxMode::Required, missing).unwrap_err();
        assert_eq!(
            error.to_string(),
            "actions must run sandboxed (sandbox = required), but the sandbox cannot be set up: \
             bwrap (bubblewrap) is not installed (not on PATH)"
        );
        assert_eq!(choose_runner(SandboxMode::Auto, missing).unwrap(), None);
        let bwrap = || Ok(PathBuf::from("/usr/bin/bwrap"));
        for mode in [SandboxMode::Auto, SandboxMode::Required] {
            assert_eq!(
                choose_runner(mode, bwrap).unwrap(),
                Some(PathBuf::from("/usr/bin/bwrap"))
            );
        }
        let never =
            || -> Result<PathBuf, String> { panic!("the sandbox is off: nothing to probe") };
        assert_eq!(choose_runner(SandboxMode::Off, never).unwrap(), None);
    }

    #[test]
    fn modes_parse_with_a_clear_error() {
        assert_eq!("auto".parse::<SandboxMode>(), Ok(SandboxMode::Auto));
        assert_eq!("on".parse::<SandboxMode>(), Ok(SandboxMode::Required));
        assert_eq!("off".parse::<SandboxMode>(), Ok(SandboxMode::Off));
        let error = "maybe".parse::<SandboxMode>().unwrap_err();
        assert!(
            error.contains("\"maybe\"") && error.contains("auto, required"),
            "{error}"
        );
    }

    #[test]
    fn the_data_directory_is_hidden_after_the_root_tmp_and_before_the_action() {
        let args = sandbox_arguments(
            Path::new("/data"),
            Path::new("/data/work/1/root"),
            Path::new("/data/work/1/root/wd"),
            false,
            Path::new("/bin/sh"),
            &["-c".to_owned(), "true".to_owned()],
        );
        let text: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let at = |needle: &[&str]| {
            text.windows(needle.len())
                .position(|w| w == needle)
                .unwrap_or_else(|| panic!("{needle:?} in {text:?}"))
        };
        assert!(at(&["--ro-bind", "/", "/"]) < at(&["--tmpfs", "/data"]));
        assert!(
            at(&["--tmpfs", "/data"]) < at(&["--bind", "/data/work/1/root", "/data/work/1/root"])
        );
        assert!(!text.contains(&"--share-net".to_owned()));
        assert_eq!(&text[text.len() - 4..], ["--", "/bin/sh", "-c", "true"]);
    }
}
