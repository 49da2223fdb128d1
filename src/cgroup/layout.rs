//! Which cgroup layout this host has, and the per-task operations on it.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// Errors of cgroup discovery and manipulation.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No cgroup filesystem is mounted where /proc/self/mountinfo says.
    #[error("no usable cgroup hierarchy found (is /sys/fs/cgroup mounted?)")]
    NotMounted,
    /// A cgroup file could not be read or written.
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: io::Error },
    /// A path given to us is not an absolute cgroup path without `..`.
    #[error("invalid cgroup path {0:?}")]
    InvalidPath(String),
    /// Processes remained in the cgroup after the deadline.
    #[error("cgroup {path} still has processes after {waited:?}")]
    NotEmpty { path: String, waited: Duration },
}

pub(super) fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io { op, path: path.to_path_buf(), source }
}

/// The v1 controllers a task's cgroup is made in (libcgroups creates the task's cgroup in all
/// of these that are mounted; we prepare the same set). Never net_cls nor net_prio: on kernels
/// before 5.15, a process joining a net_prio cgroup (or given a net_cls classid) turns cgroup
/// v2 socket matching off host-wide, and with it the hooks that keep tasks off the worker's
/// port (see [`crate::isolation`]); the container runtime hides those hierarchies from
/// libcgroups for the same reason (`runtime::container::hide_net_hierarchies`).
pub const V1_NET_CONTROLLERS: &[&str] = &["net_cls", "net_prio"];

const V1_CONTROLLERS: &[&str] =
    &["cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "devices", "freezer", "hugetlb", "perf_event"];

/// The cgroup layout of this host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Layout {
    /// Pure cgroup v2: one tree.
    V2 { root: PathBuf },
    /// v1 hierarchies: (controller, mount point), one entry per mounted controller we use;
    /// `unified`: the cgroup2 tree a hybrid host mounts beside them (no controllers, but
    /// cgroup BPF programs attach there: tasks join it too, see [`crate::isolation`]).
    V1 {
        hierarchies: Vec<(String, PathBuf)>,
        #[serde(default)]
        unified: Option<PathBuf>,
    },
}

impl Layout {
    /// Finds the layout from /proc/self/mountinfo. A v2 tree with no controllers next to v1
    /// hierarchies (hybrid) counts as v1: the controllers are where the limits work.
    pub fn detect() -> Result<Layout, CgroupError> {
        let path = Path::new("/proc/self/mountinfo");
        let text = fs::read_to_string(path).map_err(io_err("reading", path))?;
        Self::from_mountinfo(&text).ok_or(CgroupError::NotMounted)
    }

    fn from_mountinfo(text: &str) -> Option<Layout> {
        let mut v1 = Vec::new();
        let mut v2 = None;
        for line in text.lines() {
            // fields: id parent major:minor root mountpoint options ... - fstype source superopts
            let Some((left, right)) = line.split_once(" - ") else { continue };
            let mount_point = left.split(' ').nth(4)?;
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let super_opts = right.nth(1).unwrap_or("");
            match fstype {
                "cgroup2" => v2 = Some(PathBuf::from(mount_point)),
                "cgroup" => {
                    for opt in super_opts.split(',') {
                        if V1_CONTROLLERS.contains(&opt) {
                            v1.push((opt.to_string(), PathBuf::from(mount_point)));
                        }
                    }
                }
                _ => {}
            }
        }
        if v1.is_empty() {
            v2.map(|root| Layout::V2 { root })
        } else {
            Some(Layout::V1 { hierarchies: v1, unified: v2 })
        }
    }

    /// True on a pure cgroup v2 host.
    pub fn is_v2(&self) -> bool {
        matches!(self, Layout::V2 { .. })
    }

    /// The cgroup path of this process: the memory controller's on v1 (the one the machine's
    /// supervisor places us in), the unified one on v2.
    pub fn own_path(&self) -> Result<String, CgroupError> {
        let path = Path::new("/proc/self/cgroup");
        let text = fs::read_to_string(path).map_err(io_err("reading", path))?;
        Ok(self.own_path_from(&text))
    }

    /// The cgroup below which this process makes its tasks' cgroups. v1: its own (the memory
    /// controller's). v2: the parent of its own, because a v2 cgroup that holds processes cannot
    /// give controllers to children (the "no internal processes" rule) and ours holds this
    /// process; in the root cgroup, which is exempt, the root. So on v2, run the worker in a
    /// leaf of a cgroup delegated to it (systemd: `Delegate=yes` with `DelegateSubgroup=`).
    pub fn task_root(&self) -> Result<String, CgroupError> {
        let own = self.own_path()?;
        Ok(self.task_root_from(&own))
    }

    fn task_root_from(&self, own: &str) -> String {
        match self {
            Layout::V1 { .. } => own.to_string(),
            Layout::V2 { .. } => match own.trim_end_matches('/').rsplit_once('/') {
                Some((parent, _)) if !parent.is_empty() => parent.to_string(),
                _ => "/".to_string(),
            },
        }
    }

    fn own_path_from(&self, text: &str) -> String {
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
            let (Some(controllers), Some(path)) = (controllers, path) else { continue };
            let wanted = match self {
                Layout::V2 { .. } => controllers.is_empty(),
                Layout::V1 { .. } => controllers.split(',').any(|c| c == "memory"),
            };
            if wanted {
                return path.to_string();
            }
        }
        "/".to_string()
    }

    /// Every directory that holds the cgroup `path` (one per v1 hierarchy and the hybrid
    /// host's unified tree, or one on v2).
    pub fn dirs(&self, path: &str) -> Result<Vec<PathBuf>, CgroupError> {
        let rel = relative(path)?;
        Ok(match self {
            Layout::V2 { root } => vec![root.join(rel)],
            Layout::V1 { hierarchies, unified } => {
                let mut dirs: Vec<PathBuf> = hierarchies.iter().map(|(_, m)| m.join(rel)).collect();
                dirs.extend(unified.iter().map(|u| u.join(rel)));
                dirs.dedup();
                dirs
            }
        })
    }

    /// The directory of `path` in the cgroup2 tree: the only tree on v2, the unified one
    /// beside the v1 hierarchies on a hybrid host (`None` on a host with v1 alone).
    pub fn unified_dir(&self, path: &str) -> Result<Option<PathBuf>, CgroupError> {
        let rel = relative(path)?;
        Ok(match self {
            Layout::V2 { root } => Some(root.join(rel)),
            Layout::V1 { unified, .. } => unified.as_ref().map(|u| u.join(rel)),
        })
    }

    /// Moves `pid` into `path` in the hybrid host's unified tree, creating the directory (the
    /// container runtime's v1 manager joins only the v1 hierarchies). Nothing to do on v2,
    /// where the runtime places the task itself, or without a unified tree.
    pub fn join_unified(&self, path: &str, pid: Pid) -> Result<(), CgroupError> {
        let Layout::V1 { unified: Some(unified), .. } = self else { return Ok(()) };
        let dir = unified.join(relative(path)?);
        create_chain(&dir, false)?;
        let file = dir.join("cgroup.procs");
        fs::write(&file, pid.to_string()).map_err(io_err("writing", &file))
    }

    /// On a hybrid host: moves `pid` into `path`'s existing directory of the unified tree and
    /// returns the unified cgroup `pid` was in before (`None` on v2 or v1 alone, where there is
    /// nothing to do). Unlike [`Self::join_unified`] it never creates the directory: an exec
    /// into a task must not bring back a cgroup the task's supervisor just removed.
    pub fn enter_unified(&self, path: &str, pid: Pid) -> Result<Option<String>, CgroupError> {
        let Layout::V1 { unified: Some(unified), .. } = self else { return Ok(None) };
        let own = Path::new("/proc/self/cgroup");
        let text = fs::read_to_string(own).map_err(io_err("reading", own))?;
        let before = text.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("/").to_string();
        let file = unified.join(relative(path)?).join("cgroup.procs");
        fs::write(&file, pid.to_string()).map_err(io_err("writing", &file))?;
        Ok(Some(before))
    }

    /// The directory of `path` in the hierarchy of `controller` (v1), or the unified one.
    pub fn dir_for(&self, controller: &str, path: &str) -> Result<Option<PathBuf>, CgroupError> {
        let rel = relative(path)?;
        Ok(match self {
            Layout::V2 { root } => Some(root.join(rel)),
            Layout::V1 { hierarchies, .. } => {
                hierarchies.iter().find(|(c, _)| c == controller).map(|(_, m)| m.join(rel))
            }
        })
    }

    /// The pids of every process in the cgroup (empty if the cgroup does not exist).
    pub fn procs(&self, path: &str) -> Result<Vec<Pid>, CgroupError> {
        let mut pids = Vec::new();
        for dir in self.dirs(path)? {
            let file = dir.join("cgroup.procs");
            match fs::read_to_string(&file) {
                Ok(text) => pids.extend(text.lines().filter_map(|l| l.trim().parse().ok()).map(Pid::from_raw)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("reading", &file)(e)),
            }
        }
        pids.sort();
        pids.dedup();
        Ok(pids)
    }

    /// Sends `signal` to every process of the cgroup once.
    pub fn signal_all(&self, path: &str, signal: Signal) -> Result<usize, CgroupError> {
        self.signal_all_but(path, signal, None)
    }

    /// Sends `signal` to every process of the cgroup once, except `spare`.
    pub fn signal_all_but(&self, path: &str, signal: Signal, spare: Option<Pid>) -> Result<usize, CgroupError> {
        let pids = self.procs(path)?;
        for pid in pids.iter().filter(|p| Some(**p) != spare) {
            // A process may exit between the read and the signal: that is fine.
            let _ = kill(*pid, signal);
        }
        Ok(pids.len())
    }

    /// Kills every process of the cgroup and waits until it is empty. On v2 `cgroup.kill`
    /// does it atomically; on v1 we repeat SIGKILL until no process is left (a fork racing
    /// the signal is caught on the next round).
    pub fn kill_all(&self, path: &str, deadline: Duration) -> Result<(), CgroupError> {
        if let Layout::V2 { root } = self {
            let file = root.join(relative(path)?).join("cgroup.kill");
            if file.exists() {
                let _ = fs::write(&file, "1");
            }
        }
        let start = Instant::now();
        loop {
            if self.signal_all(path, Signal::SIGKILL)? == 0 {
                return Ok(());
            }
            if start.elapsed() > deadline {
                return Err(CgroupError::NotEmpty { path: path.to_string(), waited: deadline });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Removes the cgroup's directories (they must be empty of processes). Missing ones are
    /// fine. Retries briefly: the kernel may hold a just-emptied cgroup busy for a moment.
    pub fn remove(&self, path: &str) -> Result<(), CgroupError> {
        for dir in self.dirs(path)? {
            remove_dir_retrying(&dir)?;
        }
        Ok(())
    }

    /// Creates the cgroup's directories (for runtimes that do not create their own, such as
    /// the plain process runtime). Returns the directories made.
    pub fn create(&self, path: &str) -> Result<Vec<PathBuf>, CgroupError> {
        let mut made = Vec::new();
        for dir in self.dirs(path)? {
            made.extend(create_chain(&dir, !self.is_v2())?);
        }
        Ok(made)
    }

    /// Moves process `pid` into the cgroup in every hierarchy.
    pub fn add_process(&self, path: &str, pid: Pid) -> Result<(), CgroupError> {
        for dir in self.dirs(path)? {
            let file = dir.join("cgroup.procs");
            fs::write(&file, pid.to_string()).map_err(io_err("writing", &file))?;
        }
        Ok(())
    }

    /// Writes the task's limits through the files of this layout (used by the process runtime;
    /// libcontainer applies them itself for containers).
    pub fn apply_limits(&self, path: &str, limits: &Limits) -> Result<(), CgroupError> {
        let mut writes: Vec<(&str, &str, String)> = Vec::new();
        match self {
            Layout::V2 { .. } => {
                if let Some(m) = limits.memory_bytes {
                    writes.push(("memory", "memory.max", m.to_string()));
                    writes.push(("memory", "memory.swap.max", "0".into()));
                }
                if let Some(p) = limits.pids {
                    writes.push(("pids", "pids.max", p.to_string()));
                }
                if let Some(mc) = limits.cpu_millicores {
                    writes.push(("cpu", "cpu.max", format!("{} 100000", u64::from(mc) * 100)));
                }
            }
            Layout::V1 { .. } => {
                if let Some(m) = limits.memory_bytes {
                    writes.push(("memory", "memory.limit_in_bytes", m.to_string()));
                }
                if let Some(p) = limits.pids {
                    writes.push(("pids", "pids.max", p.to_string()));
                }
                if let Some(mc) = limits.cpu_millicores {
                    writes.push(("cpu", "cpu.cfs_period_us", "100000".into()));
                    writes.push(("cpu", "cpu.cfs_quota_us", (u64::from(mc) * 100).to_string()));
                }
            }
        }
        for (controller, file, value) in writes {
            if let Some(dir) = self.dir_for(controller, path)? {
                let file = dir.join(file);
                fs::write(&file, value).map_err(io_err("writing", &file))?;
            }
        }
        Ok(())
    }
}

/// Resource limits of a task, in the units the kernel takes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Limits {
    /// CPU in thousandths of a core.
    pub cpu_millicores: Option<u32>,
    pub memory_bytes: Option<u64>,
    pub pids: Option<i64>,
}

pub(super) fn relative(path: &str) -> Result<&str, CgroupError> {
    let rel = path.trim_start_matches('/');
    if !path.starts_with('/') || rel.split('/').any(|c| c == ".." || c == ".") {
        return Err(CgroupError::InvalidPath(path.to_string()));
    }
    Ok(rel)
}

pub(super) fn remove_dir_retrying(dir: &Path) -> Result<(), CgroupError> {
    let start = Instant::now();
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && start.elapsed() < Duration::from_secs(2) => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(io_err("removing", dir)(e)),
        }
    }
}

/// Creates `dir` and any missing parents; returns the directories created, outermost first.
/// A new v1 cpuset cgroup starts with empty `cpus`/`mems` (no task could join it), so on `v1`
/// those are copied from the parent, as runc does (an empty v2 cpuset uses its parent's).
pub(super) fn create_chain(dir: &Path, v1: bool) -> Result<Vec<PathBuf>, CgroupError> {
    let copy_cpuset = |d: &Path| if v1 { copy_cpuset(d) } else { Ok(()) };
    let mut missing = Vec::new();
    let mut cur = dir;
    while !cur.exists() {
        missing.push(cur.to_path_buf());
        match cur.parent() {
            Some(p) => cur = p,
            None => break,
        }
    }
    missing.reverse();
    let mut made = Vec::new();
    for d in missing {
        // Another worker's release may remove an empty ancestor between our checks: retry.
        let mut result = fs::create_dir(&d);
        for _ in 0..3 {
            match &result {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if let Some(p) = d.parent() {
                        let _ = fs::create_dir_all(p);
                        if let Some(pp) = p.parent() {
                            let _ = copy_cpuset(pp);
                        }
                        let _ = copy_cpuset(p);
                    }
                    result = fs::create_dir(&d);
                }
                _ => break,
            }
        }
        match result {
            Ok(()) => made.push(d.clone()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("creating", &d)(e)),
        }
        copy_cpuset(&d)?;
    }
    Ok(made)
}

fn copy_cpuset(dir: &Path) -> Result<(), CgroupError> {
    let Some(parent) = dir.parent() else { return Ok(()) };
    for name in ["cpuset.cpus", "cpuset.mems"] {
        let file = dir.join(name);
        let Ok(current) = fs::read_to_string(&file) else { continue };
        if current.trim().is_empty() {
            let value = fs::read_to_string(parent.join(name)).map_err(io_err("reading", &parent.join(name)))?;
            fs::write(&file, value.trim()).map_err(io_err("writing", &file))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/net_cls,net_prio rw,relatime - cgroup cgroup rw,net_cls,net_prio
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn hybrid_host_is_v1_without_named_or_network_hierarchies() {
        let layout = Layout::from_mountinfo(HYBRID).unwrap();
        assert_eq!(
            layout,
            Layout::V1 {
                hierarchies: vec![
                    ("cpu".into(), "/sys/fs/cgroup/cpu".into()),
                    ("memory".into(), "/sys/fs/cgroup/memory".into()),
                ],
                unified: Some("/sys/fs/cgroup/unified".into()),
            }
        );
        let own = layout.own_path_from("4:memory:/process_api/x\n1:cpu:/\n0::/\n");
        assert_eq!(own, "/process_api/x");
        assert_eq!(
            layout.dirs("/a/b").unwrap(),
            vec![
                PathBuf::from("/sys/fs/cgroup/cpu/a/b"),
                PathBuf::from("/sys/fs/cgroup/memory/a/b"),
                PathBuf::from("/sys/fs/cgroup/unified/a/b")
            ]
        );
        assert_eq!(layout.unified_dir("/a/b").unwrap(), Some(PathBuf::from("/sys/fs/cgroup/unified/a/b")));
    }

    #[test]
    fn pure_v2_uses_the_unified_path() {
        let layout = Layout::from_mountinfo("30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n").unwrap();
        assert!(layout.is_v2());
        assert_eq!(layout.own_path_from("0::/init.scope\n"), "/init.scope");
        // Our own v2 cgroup holds us, so it cannot have controlled children: tasks go beside it.
        assert_eq!(layout.task_root_from("/init.scope"), "/");
        assert_eq!(layout.task_root_from("/system.slice/iris.service/worker"), "/system.slice/iris.service");
        assert_eq!(layout.task_root_from("/"), "/");
        let hybrid = Layout::from_mountinfo(HYBRID).unwrap();
        assert_eq!(hybrid.task_root_from("/process_api/x"), "/process_api/x");
    }

    #[test]
    fn escaping_paths_are_refused() {
        let layout = Layout::V2 { root: "/sys/fs/cgroup".into() };
        assert!(layout.dirs("/a/../b").is_err());
        assert!(layout.dirs("relative").is_err());
    }
}
