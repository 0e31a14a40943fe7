//! Memory and process limits for actions, through the kernel's control groups.
//!
//! Each action gets a control group of its own, made when it starts and removed when it
//! ends, under a group this replica makes for its actions. Its process limit (`pids.max`) stops
//! a fork bomb; its memory limit (`memory.max`, or `memory.limit_in_bytes` in version 1) has the
//! kernel kill the action's processes rather than the replica when an action allocates too much.
//! The action's first process enters the group before it runs anything (a `/bin/sh` wrapper
//! writes its own pid into `cgroup.procs`, then `exec`s the sandbox), so every process it
//! starts is counted from the first fork on.
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
}

/// The groups of one running action; dropping it removes them (they are empty by then: the
/// action's processes end with it).
#[derive(Debug)]
pub(crate) struct ActionGroup {
    dirs: Vec<PathBuf>,
}

impl ActionGroup {
    /// The `cgroup.procs` files the action's first process writes its pid into.
    pub(crate) fn procs(&self) -> impl Iterator<Item = PathBuf> + '_ {
        self.dirs.iter().map(|dir| dir.join("cgroup.procs"))
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
                }));
            }
        }
        // v1: a hierarchy per controller.
        let mut limits_v1 = Vec::new();
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
            limits_v1.push((base, file, *limit));
        }
        Ok(Some(Self { limits: limits_v1 }))
    }

    /// Makes the groups of one action (`id` unique among running actions) with their limits.
    pub(crate) fn action(&self, id: &str) -> io::Result<ActionGroup> {
        let mut group = ActionGroup { dirs: Vec::new() };
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
        assert_eq!(
            action.procs().collect::<Vec<_>>(),
            [dir.join("cgroup.procs")]
        );
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
        assert_eq!(action.procs().count(), 2);
        let error =
            Cgroups::prepare_in(root.path(), &own(&[("", "/")]), limits, "reapi").unwrap_err();
        assert!(error.contains("no pids controller"), "{error}");
    }
}
