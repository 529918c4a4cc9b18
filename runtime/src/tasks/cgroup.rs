//! Holding a task to its memory and CPU through Linux control groups.
//!
//! An agent makes one group of its own, `dprim-<agent>`, under the group it
//! runs in, and one group per launch under that (`<task>-<launch>`), with:
//!
//! | | cgroup v2 | cgroup v1 |
//! |---|---|---|
//! | memory | `memory.max` (and `memory.swap.max` 0) | `memory.limit_in_bytes` |
//! | CPU | `cpu.max` (quota per 100 ms period) | `cpu.cfs_quota_us` / `cpu.cfs_period_us` |
//!
//! v2 is used when its hierarchy offers the `memory` controller and the
//! agent may enable it for its children; v1 when a v1 `memory` hierarchy is
//! mounted and writable (CPU too if a v1 `cpu` hierarchy is). Which one, or
//! why neither, is what [`Cgroups::detect`] reports; the agent falls back to
//! rlimits and says so in its registration.

use dprim::tasks::Resources;
use dprim::{Error, Result};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// The CFS period the CPU quota is expressed in (100 ms, the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;
/// The smallest quota the kernel accepts.
const MIN_CPU_QUOTA_US: u64 = 1_000;

/// One mounted cgroup hierarchy, from `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Mount {
    /// The cgroup path mounted there (`/` unless the mount is a subtree).
    root: String,
    mount_point: PathBuf,
    /// `cgroup2`, or `cgroup` for v1.
    fstype: String,
    /// For v1, the controllers (`memory`, `cpu`, ...) among the options.
    options: Vec<String>,
}

fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mut mounts = Vec::new();
    for line in text.lines() {
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = before.split(' ').collect();
        let rest: Vec<&str> = after.split(' ').collect();
        if fields.len() < 5 || rest.len() < 3 {
            continue;
        }
        let fstype = rest[0];
        if fstype != "cgroup" && fstype != "cgroup2" {
            continue;
        }
        mounts.push(Mount {
            root: unescape(fields[3]),
            mount_point: PathBuf::from(unescape(fields[4])),
            fstype: fstype.to_string(),
            options: rest[2].split(',').map(str::to_string).collect(),
        });
    }
    mounts
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The process's group in each hierarchy, from `/proc/self/cgroup`:
/// (controllers, path); v2 has no controllers listed.
fn parse_proc_cgroup(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            let controllers = controllers
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect();
            Some((controllers, path.to_string()))
        })
        .collect()
}

/// Where the process's own group of a hierarchy is on disk.
fn own_dir(mount: &Mount, path: &str) -> PathBuf {
    // A mount of a subtree shows paths relative to the host's root.
    let relative = if mount.root != "/" {
        path.strip_prefix(mount.root.as_str()).unwrap_or(path)
    } else {
        path
    };
    mount.mount_point.join(relative.trim_start_matches('/'))
}

/// The hierarchy an agent uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hierarchy {
    /// cgroup v2: one directory per group.
    V2 {
        /// The agent's group.
        base: PathBuf,
        /// Whether the `cpu` controller is enabled for its children too.
        cpu: bool,
    },
    /// cgroup v1: one directory per controller hierarchy.
    V1 {
        /// The agent's group in the `memory` hierarchy.
        memory: PathBuf,
        /// The agent's group in the `cpu` hierarchy, if there is one.
        cpu: Option<PathBuf>,
    },
}

/// An agent's control groups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroups {
    hierarchy: Hierarchy,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::unexpected(format!("{what} `{}`: {e}", path.display()))
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| io("cannot write", path, e))
}

/// Makes `base/name`, and `base` first if it is missing (another agent of
/// the same id on this machine may have released it meanwhile).
fn make_group(base: &Path, name: &str) -> Result<PathBuf> {
    let dir = base.join(name);
    for _ in 0..3 {
        make_dir(base)?;
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io("cannot create the control group", &dir, e)),
        }
    }
    Err(Error::unexpected(format!(
        "cannot create the control group `{}`: its parent keeps disappearing",
        dir.display()
    )))
}

fn make_dir(path: &Path) -> Result<()> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io("cannot create the control group", path, e)),
    }
}

impl Cgroups {
    /// Finds a usable hierarchy on this machine and makes the agent's own
    /// group `dprim-<agent>` in it. The error says why none is usable.
    pub fn detect(agent: &str) -> std::result::Result<Cgroups, String> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        Cgroups::detect_in(
            &parse_mountinfo(&mountinfo),
            &parse_proc_cgroup(&own),
            agent,
        )
    }

    fn detect_in(
        mounts: &[Mount],
        own: &[(Vec<String>, String)],
        agent: &str,
    ) -> std::result::Result<Cgroups, String> {
        let name = format!("dprim-{agent}");
        let mut why = Vec::new();
        // v2 first: the unified hierarchy, if it has the memory controller.
        if let (Some(mount), Some((_, path))) = (
            mounts.iter().find(|m| m.fstype == "cgroup2"),
            own.iter().find(|(c, _)| c.is_empty()),
        ) {
            let dir = own_dir(mount, path);
            let controllers =
                std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
            let offered: Vec<&str> = controllers.split_whitespace().collect();
            if !offered.contains(&"memory") {
                why.push(format!(
                    "cgroup v2 at {} offers no memory controller",
                    dir.display()
                ));
            } else {
                // Children only get a controller their parent enables;
                // the kernel refuses that while the parent holds processes
                // (other than at the root).
                let enable = |c: &str| {
                    std::fs::write(dir.join("cgroup.subtree_control"), format!("+{c}")).is_ok()
                };
                if enable("memory") {
                    let cpu = offered.contains(&"cpu") && enable("cpu");
                    let base = dir.join(&name);
                    match make_dir(&base).and_then(|()| {
                        let mut enabled = "+memory".to_string();
                        if cpu {
                            enabled.push_str(" +cpu");
                        }
                        write(&base.join("cgroup.subtree_control"), &enabled)
                    }) {
                        Ok(()) => {
                            return Ok(Cgroups {
                                hierarchy: Hierarchy::V2 { base, cpu },
                            })
                        }
                        Err(e) => why.push(format!("cgroup v2: {}", e.message())),
                    }
                } else {
                    why.push(format!(
                        "cgroup v2: cannot enable the memory controller below {}",
                        dir.display()
                    ));
                }
            }
        }
        // v1: separate hierarchies per controller.
        let v1 = |controller: &str| -> Option<PathBuf> {
            let mount = mounts
                .iter()
                .find(|m| m.fstype == "cgroup" && m.options.iter().any(|o| o == controller))?;
            let (_, path) = own
                .iter()
                .find(|(c, _)| c.iter().any(|x| x == controller))?;
            Some(own_dir(mount, path))
        };
        match v1("memory") {
            Some(dir) => {
                let memory = dir.join(&name);
                match make_dir(&memory) {
                    Ok(()) => {
                        let cpu = v1("cpu")
                            .map(|d| d.join(&name))
                            .filter(|d| make_dir(d).is_ok());
                        return Ok(Cgroups {
                            hierarchy: Hierarchy::V1 { memory, cpu },
                        });
                    }
                    Err(e) => why.push(format!("cgroup v1: {}", e.message())),
                }
            }
            None => why.push("no cgroup v1 memory hierarchy is mounted".into()),
        }
        Err(why.join("; "))
    }

    /// The hierarchy in use.
    pub fn hierarchy(&self) -> &Hierarchy {
        &self.hierarchy
    }

    /// A one-line description for logs and the agent's registration.
    pub fn describe(&self) -> String {
        match &self.hierarchy {
            Hierarchy::V2 { cpu: true, .. } => "cgroup v2: memory.max, cpu.max".into(),
            Hierarchy::V2 { cpu: false, .. } => {
                "cgroup v2: memory.max; cpu not enforced (no cpu controller)".into()
            }
            Hierarchy::V1 { cpu: Some(_), .. } => {
                "cgroup v1: memory.limit_in_bytes, cpu.cfs_quota_us".into()
            }
            Hierarchy::V1 { cpu: None, .. } => {
                "cgroup v1: memory.limit_in_bytes; cpu not enforced (no cpu hierarchy)".into()
            }
        }
    }

    /// The agent's own group in each hierarchy in use.
    fn own_dirs(&self) -> Vec<&PathBuf> {
        match &self.hierarchy {
            Hierarchy::V2 { base, .. } => vec![base],
            Hierarchy::V1 { memory, cpu } => std::iter::once(memory).chain(cpu).collect(),
        }
    }

    /// Removes the agent's own group if no task's group is left in it
    /// (a task still running after the agent left keeps it).
    pub fn release(&self) {
        for dir in self.own_dirs() {
            let _ = std::fs::remove_dir(dir);
        }
    }

    /// Removes the groups named in `ended` (launches of this agent that
    /// have ended) that are still there; returns how many directories
    /// went. The kernel refuses to remove a group that still has a
    /// process, so a group with anything left running stays.
    ///
    /// Only named groups are touched: another agent of the same id on
    /// this machine (another work dir) shares the agent's group, and a
    /// group made for a launch whose wrapper has not joined it yet is
    /// empty but must stay.
    ///
    /// A group is left behind when the kernel still counted its last
    /// process at the moment its task ended (cgroup v1 releases a group
    /// shortly after its last process exits), or when an agent crashed.
    pub fn sweep(&self, ended: &HashSet<String>) -> usize {
        let mut removed = 0;
        for dir in self.own_dirs() {
            for name in ended {
                if std::fs::remove_dir(dir.join(name)).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }

    /// The group `name` as [`Cgroups::create`] made it, without touching
    /// it: for a task taken back after an agent restart.
    pub fn existing(&self, name: &str) -> TaskCgroup {
        match &self.hierarchy {
            Hierarchy::V2 { base, .. } => TaskCgroup {
                dirs: vec![base.join(name)],
                v2: true,
            },
            Hierarchy::V1 { memory, cpu } => TaskCgroup {
                dirs: std::iter::once(memory)
                    .chain(cpu)
                    .map(|d| d.join(name))
                    .collect(),
                v2: false,
            },
        }
    }

    /// Makes the group `name` (a key segment: `<task>-<launch>`) with the
    /// limits of `resources` (0 memory or 0 CPUs: no limit of that kind).
    pub fn create(&self, name: &str, resources: &Resources) -> Result<TaskCgroup> {
        let quota = (resources.cpus > 0.0)
            .then(|| ((resources.cpus * CPU_PERIOD_US as f64) as u64).max(MIN_CPU_QUOTA_US));
        let memory = (resources.mem_bytes > 0).then_some(resources.mem_bytes);
        let group = match &self.hierarchy {
            Hierarchy::V2 { base, cpu } => {
                let dir = make_group(base, name)?;
                // Again, in case `base` was just made anew.
                let enabled = if *cpu { "+memory +cpu" } else { "+memory" };
                let _ = std::fs::write(base.join("cgroup.subtree_control"), enabled);
                let group = TaskCgroup {
                    dirs: vec![dir.clone()],
                    v2: true,
                };
                if let Some(bytes) = memory {
                    write(&dir.join("memory.max"), &bytes.to_string())?;
                    // Without this a task over its limit swaps instead of
                    // being stopped; not every kernel has swap accounting.
                    let _ = std::fs::write(dir.join("memory.swap.max"), "0");
                }
                if let (Some(quota), true) = (quota, *cpu) {
                    write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                }
                group
            }
            Hierarchy::V1 {
                memory: mem_base,
                cpu,
            } => {
                let mem_dir = make_group(mem_base, name)?;
                let mut dirs = vec![mem_dir.clone()];
                if let Some(bytes) = memory {
                    write(&mem_dir.join("memory.limit_in_bytes"), &bytes.to_string())?;
                }
                if let Some(cpu_base) = cpu {
                    let cpu_dir = make_group(cpu_base, name)?;
                    dirs.push(cpu_dir.clone());
                    if let Some(quota) = quota {
                        write(
                            &cpu_dir.join("cpu.cfs_period_us"),
                            &CPU_PERIOD_US.to_string(),
                        )?;
                        write(&cpu_dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                    }
                }
                TaskCgroup { dirs, v2: false }
            }
        };
        Ok(group)
    }
}

/// One launch's group (a directory per hierarchy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskCgroup {
    dirs: Vec<PathBuf>,
    v2: bool,
}

impl TaskCgroup {
    /// The `cgroup.procs` files a process writes its pid to, to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Moves process `pid` (and the children it starts later) into the group.
    pub fn join(&self, pid: u32) -> Result<()> {
        for file in self.procs_files() {
            write(&file, &pid.to_string())?;
        }
        Ok(())
    }

    /// How many times the kernel's OOM killer struck inside the group.
    pub fn oom_kills(&self) -> u64 {
        let Some(dir) = self.dirs.first() else {
            return 0;
        };
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        std::fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|n| n.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// Removes the group once its processes are gone. The kernel refuses
    /// while any remain, and cgroup v1 also for a moment after the last
    /// one exited (`EBUSY`); such a group is left for the agent's next
    /// sweep ([`Cgroups::sweep`]).
    pub fn remove(&self) {
        for dir in &self.dirs {
            match std::fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => {
                    tracing::debug!(group = %dir.display(), "task's control group still busy; the agent's sweep removes it")
                }
                Err(e) => {
                    tracing::warn!(group = %dir.display(), error = %e, "cannot remove a task's control group")
                }
            }
        }
    }
}

/// This machine's groups for a test agent named `prefix<pid>`, or `None`
/// (saying why) where the agent may not make groups: such a test then has
/// nothing to check.
#[cfg(test)]
pub(crate) fn usable_here(prefix: &str) -> Option<Cgroups> {
    match Cgroups::detect(&format!("{prefix}{}", std::process::id())) {
        Ok(c) => Some(c),
        Err(why) => {
            eprintln!("no usable control groups here ({why}); nothing to check");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn mountinfo_lists_cgroup_hierarchies_only() {
        let mounts = parse_mountinfo(HYBRID);
        assert_eq!(mounts.len(), 3);
        assert_eq!(mounts[0].mount_point, Path::new("/sys/fs/cgroup/cpu"));
        assert!(mounts[1].options.contains(&"memory".to_string()));
        assert_eq!(mounts[2].fstype, "cgroup2");
    }

    #[test]
    fn own_groups_are_found_under_their_mounts() {
        let own = parse_proc_cgroup("4:memory:/job/x\n1:cpu:/\n0::/\n");
        assert_eq!(own[0], (vec!["memory".to_string()], "/job/x".to_string()));
        assert!(own[2].0.is_empty());
        let mounts = parse_mountinfo(HYBRID);
        assert_eq!(
            own_dir(&mounts[1], "/job/x"),
            Path::new("/sys/fs/cgroup/memory/job/x")
        );
        // A container that sees only its own subtree mounted.
        let sub = Mount {
            root: "/job".into(),
            mount_point: "/sys/fs/cgroup/memory".into(),
            fstype: "cgroup".into(),
            options: vec!["memory".into()],
        };
        assert_eq!(
            own_dir(&sub, "/job/x"),
            Path::new("/sys/fs/cgroup/memory/x")
        );
    }

    #[test]
    fn no_hierarchy_says_why() {
        let why = Cgroups::detect_in(&[], &[], "a1").unwrap_err();
        assert!(why.contains("no cgroup v1 memory hierarchy"), "{why}");
    }

    /// On a machine where the agent may make groups: a task over its memory
    /// limit is stopped by the kernel, and the group counts it.
    #[test]
    fn a_task_over_its_memory_limit_is_stopped_where_groups_can_be_made() {
        let Some(cgroups) = usable_here("test-") else {
            return;
        };
        let resources = Resources {
            cpus: 0.5,
            mem_bytes: 32 << 20,
            ..Resources::default()
        };
        let group = cgroups.create("t1-1", &resources).unwrap();
        let procs = group
            .procs_files()
            .iter()
            .map(|p| format!("echo $$ > '{}'", p.display()))
            .collect::<Vec<_>>()
            .join(" && ");
        // dd allocates its whole block: 256 MiB against a 32 MiB limit.
        let status = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!(
                "{procs} && exec dd if=/dev/zero of=/dev/null bs=256M count=1"
            ))
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "{status:?}");
        assert!(group.oom_kills() >= 1);
        group.remove();
        for dir in &group.dirs {
            assert!(!dir.exists(), "{} left behind", dir.display());
        }
        match cgroups.hierarchy() {
            Hierarchy::V2 { base, .. } => {
                let _ = std::fs::remove_dir(base);
            }
            Hierarchy::V1 { memory, cpu } => {
                let _ = std::fs::remove_dir(memory);
                if let Some(cpu) = cpu {
                    let _ = std::fs::remove_dir(cpu);
                }
            }
        }
    }

    #[test]
    fn a_sweep_removes_only_named_groups_with_no_process_left() {
        let Some(cgroups) = usable_here("test-sweep-") else {
            return;
        };
        let none = Resources::default();
        let ended = cgroups.create("t-ended-1", &none).unwrap();
        let starting = cgroups.create("t-starting-1", &none).unwrap();
        let busy = cgroups.create("t-busy-1", &none).unwrap();
        let mut sleeper = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        busy.join(sleeper.id()).unwrap();

        let named = HashSet::from(["t-ended-1".to_string(), "t-busy-1".to_string()]);
        let removed = cgroups.sweep(&named);
        assert_eq!(
            removed,
            ended.dirs.len(),
            "only the ended group's directories"
        );
        assert!(ended.dirs.iter().all(|d| !d.exists()));
        assert!(
            starting.dirs.iter().all(|d| d.exists()),
            "not named: left alone"
        );
        assert!(
            busy.dirs.iter().all(|d| d.exists()),
            "a group with a process stays"
        );

        let _ = sleeper.kill();
        let _ = sleeper.wait();
        // Once its process is gone the busy group goes too (cgroup v1 may
        // take a moment to release it).
        for _ in 0..100 {
            cgroups.sweep(&named);
            if busy.dirs.iter().all(|d| !d.exists()) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(busy.dirs.iter().all(|d| !d.exists()));
        starting.remove();
        cgroups.release();
        for dir in cgroups.own_dirs() {
            assert!(!dir.exists(), "{} left behind", dir.display());
        }
    }
}
