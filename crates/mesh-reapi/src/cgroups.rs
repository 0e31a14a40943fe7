//! Memory and process limits for actions, through the kernel's control groups.
//!
//! Each action gets a control group of its own, made when it starts and removed when it
//! ends, under a group this replica makes for its actions. Its process limit (`pids.max`) stops
//! a fork bomb; its memory limit (`memory.max`, or `memory.limit_in_bytes` in version 1) has the
//! kernel kill the action's processes rather than the replica when an action allocates too much.
//! The action's first process is in the group before it runs anything, so every process it
//! starts is counted from the first fork on. It gets there in one of two ways:
//!
//! * **Born there** (cgroup v1, process limit only): cgroup v1 puts each *thread* in a group
//!   (its `tasks` file), and a child starts in the group of the thread that forked it. The
//!   thread that spawns the action writes its own thread id into the action's `tasks`, spawns,
//!   and writes it back into this replica's own `tasks`. The action costs one `exec`, its
//!   own. While the thread is inside, it counts as one of the action's processes, so this way
//!   is taken only for a limit of at least 2 (the action can never exceed its limit; for a few
//!   microseconds it has one process fewer). It is not taken with a memory limit: for those
//!   microseconds the kernel's OOM killer could pick the replica, which shares the group.
//! * **A wrapper** (cgroup v2, or a memory limit): a `/bin/sh` writes its own pid into
//!   `cgroup.procs`, then `exec`s the sandbox. Version 2 moves whole processes only, and the
//!   way to start a child inside a group there, `clone3` with `CLONE_INTO_CGROUP`, needs
//!   `unsafe` code this crate does not have.
//!
//! Where: the unified hierarchy (cgroup v2) when this replica's own group delegates the `pids`
//! and `memory` controllers to groups below it (`cgroup.subtree_control`, as systemd's
//! `Delegate=yes` arranges); otherwise the `pids` and `memory` hierarchies of cgroup v1 when they
//! are mounted and writable. Where neither is, actions run without these limits and the replica
//! says so once at start. Kubernetes usually mounts `/sys/fs/cgroup` read-only in a pod: there,
//! the pod's own limits bound all of the replica's actions together.

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::Arc,
};

/// How many processes and how much memory one action may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResourceLimits {
    /// The most processes (and threads) an action may have at once. Default 4,096.
    pub max_processes: Option<u64>,
    /// The most memory an action's processes may use together, in bytes. Default: no limit.
    pub max_memory_bytes: Option<u64>,
}

impl Default for ResourceLimits {
    fn default() -> Self {
        Self {
            max_processes: Some(4096),
            max_memory_bytes: None,
        }
    }
}

/// Where action groups are made: a group per controller (v1), or one (v2).
#[derive(Debug, Clone)]
pub(crate) struct Cgroups {
    /// (controller directory of this replica's action groups, file name of its limit, limit).
    limits: Vec<(PathBuf, &'static str, u64)>,
    /// Where the spawning thread goes back to, when actions are born in their groups (see
    /// the module docs): the `tasks` files of this replica's own groups. `None`: a wrapper
    /// moves the action's first process.
    home: Option<Arc<[PathBuf]>>,
}

/// The groups of one running action; dropping it removes them (they are empty by then: the
/// action's processes end with it).
#[derive(Debug)]
pub(crate) struct ActionGroup {
    dirs: Vec<PathBuf>,
    /// [`Cgroups::home`].
    home: Option<Arc<[PathBuf]>>,
}

impl ActionGroup {
    /// The `cgroup.procs` files the action's first process must write its pid into, through
    /// a wrapper; empty when [`ActionGroup::spawn_inside`] puts it there instead.
    pub(crate) fn procs(&self) -> Vec<PathBuf> {
        match self.home {
            Some(_) => Vec::new(),
            None => self
                .dirs
                .iter()
                .map(|dir| dir.join("cgroup.procs"))
                .collect(),
        }
    }

    /// Runs `spawn` (which starts the action's first process) so that the process is born in
    /// these groups, where they allow it (see the module docs); otherwise just runs it, and
    /// the wrapper of [`ActionGroup::procs`] moves the process.
    ///
    /// The calling thread is in the groups only while `spawn` runs; an error moving it in is
    /// returned without spawning anything.
    pub(crate) fn spawn_inside<T>(&self, spawn: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let Some(home) = &self.home else {
            return spawn();
        };
        let thread = rustix::thread::gettid().as_raw_nonzero().to_string();
        // Back home however this ends, a panic in `spawn` included.
        let _home = GoHome {
            home,
            thread: &thread,
        };
        for dir in &self.dirs {
            let tasks = dir.join("tasks");
            if let Err(error) = fs::write(&tasks, &thread) {
                // `Other`, whatever the cause: the replica's failure, never the action's (a
                // spawn's `NotFound` or `PermissionDenied` is read as the action's program).
                return Err(io::Error::other(format!(
                    "entering the action's control group {}: {error}",
                    tasks.display()
                )));
            }
        }
        spawn()
    }
}

/// Moves a thread back into this replica's own groups when dropped.
struct GoHome<'a> {
    home: &'a [PathBuf],
    thread: &'a str,
}

impl Drop for GoHome<'_> {
    fn drop(&mut self) {
        for tasks in self.home {
            if let Err(error) = fs::write(tasks, self.thread) {
                // Not expected: `Cgroups::prepare_in` checked these files take a thread. The
                // thread's next spawn moves it again, but the group stays until then.
                tracing::error!(
                    %error,
                    tasks = %tasks.display(),
                    "could not move a thread back out of an action's control group"
                );
            }
        }
    }
}

impl Drop for ActionGroup {
    fn drop(&mut self) {
        // A group is removed with rmdir once it has no processes left. The processes of a
        // killed sandbox may still be on their way out (reaped by the host's init): try
        // again, a little later, in a task of its own, for up to 10 s.
        let left: Vec<PathBuf> = self
            .dirs
            .drain(..)
            .filter(|dir| fs::remove_dir(dir).is_err() && dir.exists())
            .collect();
        if left.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            for _ in 0..100 {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                if left
                    .iter()
                    .all(|dir| fs::remove_dir(dir).is_ok() || !dir.exists())
                {
                    return;
                }
            }
            for dir in &left {
                tracing::warn!(group = %dir.display(), "an action's control group outlived it");
            }
        });
    }
}

impl Cgroups {
    /// Prepares groups for actions with `limits` under `/sys/fs/cgroup`, in a group named
    /// `name` (unique to this replica). `Ok(None)`: no limit is set, nothing to do.
    pub(crate) fn prepare(limits: ResourceLimits, name: &str) -> Result<Option<Self>, String> {
        Self::prepare_in(Path::new("/sys/fs/cgroup"), &own_groups()?, limits, name)
    }

    /// [`Cgroups::prepare`] with the cgroup mount at `root` and this process's groups as
    /// `/proc/self/cgroup` lists them (`(hierarchy controllers, path)`).
    fn prepare_in(
        root: &Path,
        own: &[(String, PathBuf)],
        limits: ResourceLimits,
        name: &str,
    ) -> Result<Option<Self>, String> {
        let wanted: Vec<(&str, u64)> = [
            ("pids", limits.max_processes),
            ("memory", limits.max_memory_bytes),
        ]
        .into_iter()
        .filter_map(|(controller, limit)| limit.map(|limit| (controller, limit)))
        .collect();
        if wanted.is_empty() {
            return Ok(None);
        }
        // v2: this process's group in the unified hierarchy delegates the controllers.
        let unified = own.iter().find(|(controllers, _)| controllers.is_empty());
        if let Some((_, path)) = unified {
            let mount = if root.join("cgroup.controllers").exists() {
                root.to_path_buf()
            } else {
                root.join("unified")
            };
            let group = mount.join(path.strip_prefix("/").unwrap_or(path));
            let delegated =
                fs::read_to_string(group.join("cgroup.subtree_control")).unwrap_or_default();
            let delegated: Vec<&str> = delegated.split_whitespace().collect();
            if wanted.iter().all(|(c, _)| delegated.contains(c)) {
                let base = group.join(name);
                make_group(&base, &wanted.iter().map(|(c, _)| *c).collect::<Vec<_>>())?;
                return Ok(Some(Self {
                    limits: wanted
                        .iter()
                        .map(|(controller, limit)| {
                            let file = if *controller == "pids" {
                                "pids.max"
                            } else {
                                "memory.max"
                            };
                            (base.clone(), file, *limit)
                        })
                        .collect(),
                    home: None,
                }));
            }
        }
        // v1: a hierarchy per controller.
        let mut limits_v1 = Vec::new();
        let mut home = Vec::new();
        for (controller, limit) in &wanted {
            let Some((_, path)) = own
                .iter()
                .find(|(controllers, _)| controllers.split(',').any(|c| c == *controller))
            else {
                return Err(format!(
                    "no {controller} controller: neither delegated in cgroup v2 nor mounted as cgroup v1"
                ));
            };
            let base = root
                .join(controller)
                .join(path.strip_prefix("/").unwrap_or(path))
                .join(name);
            make_group(&base, &[])?;
            let file = if *controller == "pids" {
                "pids.max"
            } else {
                "memory.limit_in_bytes"
            };
            home.push(base.with_file_name("tasks"));
            limits_v1.push((base, file, *limit));
        }
        // Born in the group: v1, only a process limit of at least 2 (see the module docs),
        // and a thread can go back home: this one is moved to where it already is.
        let thread = rustix::thread::gettid().as_raw_nonzero().to_string();
        let born_inside = wanted
            .iter()
            .all(|(controller, limit)| *controller == "pids" && *limit >= 2)
            && home.iter().all(|tasks| fs::write(tasks, &thread).is_ok());
        Ok(Some(Self {
            limits: limits_v1,
            home: born_inside.then(|| home.into()),
        }))
    }

    /// Makes the groups of one action (`id` unique among running actions) with their limits.
    pub(crate) fn action(&self, id: &str) -> io::Result<ActionGroup> {
        let mut group = ActionGroup {
            dirs: Vec::new(),
            home: self.home.clone(),
        };
        for (base, file, limit) in &self.limits {
            let dir = base.join(id);
            if !group.dirs.contains(&dir) {
                fs::create_dir(&dir)?;
                group.dirs.push(dir.clone());
            }
            fs::write(dir.join(file), limit.to_string())?;
        }
        Ok(group)
    }
}

/// This process's groups: `(controllers, path)` per line of `/proc/self/cgroup` (empty
/// controllers for the unified hierarchy).
fn own_groups() -> Result<Vec<(String, PathBuf)>, String> {
    let text = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?.to_owned();
            let path = PathBuf::from(parts.next()?);
            Some((controllers, path))
        })
        .collect())
}

/// Creates `dir` (a group) and, in v2, delegates `controllers` to its children.
fn make_group(dir: &Path, controllers: &[&str]) -> Result<(), String> {
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("creating the control group {}: {e}", dir.display())),
    }
    if !controllers.is_empty() {
        let enable: Vec<String> = controllers.iter().map(|c| format!("+{c}")).collect();
        fs::write(dir.join("cgroup.subtree_control"), enable.join(" ")).map_err(|e| {
            format!(
                "delegating {} to the groups below {}: {e}",
                controllers.join(", "),
                dir.display()
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own(lines: &[(&str, &str)]) -> Vec<(String, PathBuf)> {
        lines
            .iter()
            .map(|(c, p)| ((*c).to_owned(), PathBuf::from(p)))
            .collect()
    }

    #[test]
    fn no_limit_needs_no_group() {
        let root = tempfile::tempdir().unwrap();
        let limits = ResourceLimits {
            max_processes: None,
            max_memory_bytes: None,
        };
        let prepared = Cgroups::prepare_in(root.path(), &own(&[("", "/")]), limits, "r").unwrap();
        assert!(prepared.is_none());
    }

    #[test]
    fn cgroup_v2_is_used_where_the_controllers_are_delegated() {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        let group = root.path().join("svc");
        fs::create_dir(&group).unwrap();
        fs::write(group.join("cgroup.subtree_control"), "memory pids").unwrap();
        let limits = ResourceLimits {
            max_processes: Some(64),
            max_memory_bytes: Some(1 << 30),
        };
        let cgroups = Cgroups::prepare_in(root.path(), &own(&[("", "/svc")]), limits, "reapi")
            .unwrap()
            .unwrap();
        assert_eq!(
            fs::read_to_string(group.join("reapi/cgroup.subtree_control")).unwrap(),
            "+pids +memory"
        );
        let action = cgroups.action("a1").unwrap();
        let dir = group.join("reapi/a1");
        assert_eq!(fs::read_to_string(dir.join("pids.max")).unwrap(), "64");
        assert_eq!(
            fs::read_to_string(dir.join("memory.max")).unwrap(),
            "1073741824"
        );
        assert_eq!(action.procs(), [dir.join("cgroup.procs")]);
    }

    #[test]
    fn with_a_process_limit_only_v1_actions_are_born_in_their_group() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("pids/box")).unwrap();
        let groups = own(&[("", "/"), ("pids", "/box"), ("memory", "/box")]);
        let limits = |max_processes| ResourceLimits {
            max_processes: Some(max_processes),
            max_memory_bytes: None,
        };
        let cgroups = Cgroups::prepare_in(root.path(), &groups, limits(8), "reapi")
            .unwrap()
            .unwrap();
        let action = cgroups.action("a3").unwrap();
        assert!(action.procs().is_empty(), "no wrapper");
        let home = root.path().join("pids/box/tasks");
        let inside = root.path().join("pids/box/reapi/a3/tasks");
        let thread = rustix::thread::gettid().as_raw_nonzero().to_string();
        // The thread is in the action's group while it spawns, and back home after.
        let spawned = action
            .spawn_inside(|| Ok(fs::read_to_string(&inside).unwrap()))
            .unwrap();
        assert_eq!(spawned, thread);
        assert_eq!(fs::read_to_string(&home).unwrap(), thread);
        // A group that cannot be entered is the replica's failure, not a missing program,
        // and the thread is back home.
        fs::remove_dir_all(root.path().join("pids/box/reapi/a3")).unwrap();
        fs::write(&home, "").unwrap();
        let error = action.spawn_inside(|| Ok(())).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::Other, "{error}");
        assert!(error.to_string().contains("reapi/a3/tasks"), "{error}");
        assert_eq!(fs::read_to_string(&home).unwrap(), thread);
        // One process allowed: the thread would take it; the wrapper moves the process.
        let cgroups = Cgroups::prepare_in(root.path(), &groups, limits(1), "reapi")
            .unwrap()
            .unwrap();
        assert_eq!(cgroups.action("a4").unwrap().procs().len(), 1);
        // A home group that does not take a thread (here `tasks` is no file): the wrapper.
        fs::create_dir_all(root.path().join("pids/box2/tasks")).unwrap();
        let groups = own(&[("", "/"), ("pids", "/box2")]);
        let cgroups = Cgroups::prepare_in(root.path(), &groups, limits(8), "reapi")
            .unwrap()
            .unwrap();
        assert_eq!(cgroups.action("a5").unwrap().procs().len(), 1);
    }

    #[test]
    fn cgroup_v1_hierarchies_are_used_otherwise_and_a_missing_one_is_named() {
        let root = tempfile::tempdir().unwrap();
        for controller in ["pids", "memory"] {
            fs::create_dir_all(root.path().join(controller).join("box")).unwrap();
        }
        let groups = own(&[("", "/"), ("pids", "/box"), ("memory", "/box")]);
        let limits = ResourceLimits {
            max_processes: Some(32),
            max_memory_bytes: Some(4096),
        };
        let cgroups = Cgroups::prepare_in(root.path(), &groups, limits, "reapi")
            .unwrap()
            .unwrap();
        let action = cgroups.action("a2").unwrap();
        let pids = root.path().join("pids/box/reapi/a2");
        assert_eq!(fs::read_to_string(pids.join("pids.max")).unwrap(), "32");
        let memory = root.path().join("memory/box/reapi/a2");
        assert_eq!(
            fs::read_to_string(memory.join("memory.limit_in_bytes")).unwrap(),
            "4096"
        );
        assert_eq!(
            action.procs().len(),
            2,
            "a memory limit: moved by the wrapper"
        );
        let error =
            Cgroups::prepare_in(root.path(), &own(&[("", "/")]), limits, "reapi").unwrap_err();
        assert!(error.contains("no pids controller"), "{error}");
    }
}
