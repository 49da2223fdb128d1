//! `resources.disk_bytes`: what the task keeps on disk, measured now and then.
//!
//! Kernels enforce disk space per directory only with project quotas (XFS, or ext4 mounted
//! with `prjquota`), which hosts rarely have, or with a filesystem image per task, which
//! costs a `mkfs` and a loop device on every start. The supervisor does what kubelet does for
//! ephemeral storage instead: it measures the task's directories (its workdir, its rootfs'
//! upper layer, the process runtime's /tmp) and a container's /tmp (a tmpfs, read with one
//! `statfs`), and kills the task once they hold more than its limit. Nothing happens at start;
//! each measure is a walk of the task's files, in steps between the supervisor's other work
//! (see [`Walk`]: it never follows a link, and every inode counts), plus the deleted files the
//! task holds open, spaced so that walking costs at most about 1 % of one core (a walk of
//! 10 ms every second, of 100 ms every 10 s).

use std::collections::HashSet;
use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::dir::{Dir, OwningIter};
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::Pid;

use crate::cgroup::Layout;
use crate::runtime::DiskLimit;

/// The first measure, and the shortest spacing between two.
const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// The longest spacing, however slow a walk is.
const MAX_INTERVAL: Duration = Duration::from_secs(30);
/// Spacing as a multiple of the last walk's duration.
const COST_FACTOR: u32 = 100;
/// Entries one step of a walk looks at: the supervisor's loop (log pumping, kills, timeouts)
/// runs between steps, so a tree of millions of files never stalls it.
const STEP_ENTRIES: usize = 2048;
/// What an inode costs at least: the block a small file takes. Empty files and short
/// symlinks take no block, and would otherwise let a task use up the filesystem's inodes
/// within any byte limit.
const INODE_CHARGE: u64 = 4096;
/// Levels of directories a walk enters (it holds one descriptor per level). A tree deeper than
/// this is built to hide from the measure, and counts as over the limit.
const MAX_DEPTH: usize = 256;

/// When the task's disk use is measured next, and against what.
pub(super) struct DiskWatch {
    limit: DiskLimit,
    next: Instant,
    /// The walk under way, and the time its steps took so far.
    walk: Option<(Walk, Duration)>,
}

impl DiskWatch {
    pub(super) fn new(limit: DiskLimit, started: Instant) -> DiskWatch {
        DiskWatch { limit, next: started + MIN_INTERVAL, walk: None }
    }

    /// When [`DiskWatch::check`] should run next: at once while a walk is under way.
    pub(super) fn due(&self) -> Instant {
        if self.walk.is_some() { Instant::now() } else { self.next }
    }

    pub(super) fn limit_bytes(&self) -> u64 {
        self.limit.bytes
    }

    /// Takes one step of the measure of the task's use; once a walk is done, adds the
    /// container's /tmp (through its first process, `container_init`) and the deleted files
    /// the processes of `cgroup` hold open, and returns `Some(bytes)` when that is over the
    /// limit.
    pub(super) fn check(&mut self, container_init: Option<Pid>, cgroup: Option<&(Layout, String)>) -> Option<u64> {
        let start = Instant::now();
        let (mut walk, spent) = self.walk.take().unwrap_or_else(|| (Walk::new(&self.limit.paths), Duration::ZERO));
        if !walk.step(STEP_ENTRIES) {
            self.walk = Some((walk, spent + start.elapsed()));
            return None;
        }
        let mut used = walk.total;
        if let Some(pid) = container_init {
            used += tmpfs_used(&PathBuf::from(format!("/proc/{pid}/root/tmp")));
        }
        if let Some((layout, path)) = cgroup {
            let pids = layout.procs(path).unwrap_or_default();
            used += deleted_open(&pids, &walk.devices, &mut walk.linked);
        }
        if walk.too_deep {
            used = used.max(self.limit.bytes.saturating_add(1));
        }
        let took = spent + start.elapsed();
        self.next = Instant::now() + (took * COST_FACTOR).clamp(MIN_INTERVAL, MAX_INTERVAL);
        (used > self.limit.bytes).then_some(used)
    }
}

/// A walk of the files below some paths, resumable in steps. Every directory is opened from
/// its parent's descriptor with `O_NOFOLLOW | O_DIRECTORY`, never by path: a task that swaps
/// a directory for a symlink (to `/`, say) between two steps makes the open fail, and the
/// root supervisor never walks a host path. Other filesystems mounted below are not entered.
pub(super) struct Walk {
    roots: Vec<PathBuf>,
    /// The open directories on the way down, with the device of their root.
    stack: Vec<OwningIter>,
    dev: u64,
    /// A directory just found in the top one, entered at the next step.
    enter: Option<CString>,
    /// Files with several links, counted once.
    linked: HashSet<(u64, u64)>,
    /// The devices of the roots.
    devices: HashSet<u64>,
    total: u64,
    too_deep: bool,
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY.union(OFlag::O_DIRECTORY).union(OFlag::O_NOFOLLOW).union(OFlag::O_CLOEXEC);

impl Walk {
    pub(super) fn new(paths: &[PathBuf]) -> Walk {
        Walk {
            roots: paths.iter().rev().cloned().collect(),
            stack: Vec::new(),
            dev: 0,
            enter: None,
            linked: HashSet::new(),
            devices: HashSet::new(),
            total: 0,
            too_deep: false,
        }
    }

    /// Looks at up to `budget` entries; true once the walk is done.
    pub(super) fn step(&mut self, budget: usize) -> bool {
        let mut seen = 0;
        while seen < budget {
            if let Some(name) = self.enter.take() {
                let Some(parent) = self.stack.last() else { continue };
                if self.stack.len() >= MAX_DEPTH {
                    self.too_deep = true;
                    continue;
                }
                // ELOOP or ENOTDIR when it is no longer a directory: then it is not entered.
                if let Ok(dir) = Dir::openat(Some(parent.as_raw_fd()), name.as_c_str(), DIR_FLAGS, Mode::empty())
                    && nix::sys::stat::fstat(dir.as_raw_fd()).is_ok_and(|st| st.st_dev == self.dev)
                {
                    self.stack.push(dir.into_iter());
                }
                continue;
            }
            let Some(top) = self.stack.last_mut() else {
                let Some(root) = self.roots.pop() else { return true };
                if let Ok(dir) = Dir::open(&root, DIR_FLAGS, Mode::empty())
                    && let Ok(st) = nix::sys::stat::fstat(dir.as_raw_fd())
                {
                    self.dev = st.st_dev;
                    self.devices.insert(st.st_dev);
                    self.stack.push(dir.into_iter());
                }
                continue;
            };
            let Some(Ok(entry)) = top.next() else {
                self.stack.pop();
                continue;
            };
            seen += 1;
            let name = entry.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            let Ok(st) = nix::sys::stat::fstatat(Some(top.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW) else {
                continue;
            };
            if st.st_dev != self.dev {
                continue; // a mount point: another filesystem's files are not the task's
            }
            let is_dir = is_type(&st, SFlag::S_IFDIR);
            if !is_dir && st.st_nlink > 1 && !self.linked.insert((st.st_dev, st.st_ino)) {
                continue;
            }
            self.total += charge(&st);
            if is_dir {
                self.enter = Some(name.to_owned());
            }
        }
        false
    }
}

fn is_type(st: &FileStat, kind: SFlag) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == kind
}

/// What a file counts for: its blocks (a sparse file what it takes), at least one block.
fn charge(st: &FileStat) -> u64 {
    (st.st_blocks as u64 * 512).max(INODE_CHARGE)
}

/// Bytes of the files on `devices` that `pids` hold open after they were deleted (a deleted
/// file keeps its blocks until its last descriptor closes), each counted once.
fn deleted_open(pids: &[Pid], devices: &HashSet<u64>, seen: &mut HashSet<(u64, u64)>) -> u64 {
    let mut total = 0;
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for fd in fds.flatten() {
            // stat follows the descriptor's magic link to the open file itself.
            let Ok(st) = nix::sys::stat::stat(&fd.path()) else { continue };
            if st.st_nlink == 0
                && is_type(&st, SFlag::S_IFREG)
                && devices.contains(&st.st_dev)
                && seen.insert((st.st_dev, st.st_ino))
            {
                total += charge(&st);
            }
        }
    }
    total
}

/// Bytes the files below `paths` count for (see [`Walk`]), walked at once.
#[cfg(test)]
pub(super) fn usage(paths: &[PathBuf]) -> u64 {
    let mut walk = Walk::new(paths);
    while !walk.step(usize::MAX) {}
    walk.total
}

/// Bytes in use on the filesystem at `path` (a tmpfs: what its files hold).
fn tmpfs_used(path: &Path) -> u64 {
    match nix::sys::statvfs::statvfs(path) {
        Ok(s) => (s.blocks() - s.blocks_free()) * s.fragment_size(),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_blocks_once_per_file_and_walks_every_dir() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::create_dir_all(a.join("b")).unwrap();
        std::fs::write(a.join("b/one"), vec![1u8; 1 << 20]).unwrap();
        std::fs::hard_link(a.join("b/one"), a.join("link")).unwrap();
        std::os::unix::fs::symlink("/usr", a.join("sym")).unwrap();
        // Sparse: a terabyte of nothing takes no blocks.
        std::fs::File::create(a.join("sparse")).unwrap().set_len(1 << 40).unwrap();
        let used = usage(&[dir.path().to_path_buf()]);
        assert!((1 << 20..(1 << 20) + (64 << 10)).contains(&used), "{used}");
    }

    #[test]
    fn a_watch_over_its_limit_says_by_how_much_and_spaces_its_walks() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), vec![1u8; 256 << 10]).unwrap();
        let started = Instant::now();
        let limit = DiskLimit { bytes: 100 << 10, paths: vec![dir.path().to_path_buf()] };
        let mut w = DiskWatch::new(limit, started);
        assert_eq!(w.due(), started + MIN_INTERVAL);
        assert!(w.check(None, None).is_some_and(|used| used >= 256 << 10));
        assert!(w.due() >= started + MIN_INTERVAL);
        let mut ok = DiskWatch::new(DiskLimit { bytes: 1 << 30, paths: vec![dir.path().to_path_buf()] }, started);
        assert_eq!(ok.check(None, None), None);
    }

    /// Review of #14, finding 8: a directory swapped for a symlink between the moment the walk
    /// finds it and the moment it enters it is not followed (the old walk reopened it by path,
    /// and a root supervisor walked whatever the link named).
    #[test]
    fn a_directory_swapped_for_a_symlink_mid_walk_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let task = dir.path().join("task");
        std::fs::create_dir_all(task.join("d")).unwrap();
        let host = dir.path().join("host");
        std::fs::create_dir(&host).unwrap();
        std::fs::write(host.join("big"), vec![1u8; 4 << 20]).unwrap();
        let mut walk = Walk::new(std::slice::from_ref(&task));
        while walk.enter.is_none() {
            assert!(!walk.step(1), "the walk ended before it found d");
        }
        std::fs::remove_dir(task.join("d")).unwrap();
        std::os::unix::fs::symlink(&host, task.join("d")).unwrap();
        while !walk.step(1) {}
        assert!(walk.total < 1 << 20, "the walk followed the link: {}", walk.total);
    }

    #[test]
    fn empty_files_and_symlinks_count_a_block_each_and_deep_trees_count_as_over() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..1000 {
            std::fs::File::create(dir.path().join(format!("e{i}"))).unwrap();
        }
        std::os::unix::fs::symlink("x", dir.path().join("s")).unwrap();
        assert!(usage(&[dir.path().to_path_buf()]) >= 1001 * INODE_CHARGE);

        let deep = tempfile::tempdir().unwrap();
        let mut p = deep.path().to_path_buf();
        for _ in 0..MAX_DEPTH + 2 {
            p.push("d");
        }
        std::fs::create_dir_all(&p).unwrap();
        let limit = DiskLimit { bytes: 1 << 30, paths: vec![deep.path().to_path_buf()] };
        let mut w = DiskWatch::new(limit, Instant::now());
        let over = loop {
            let got = w.check(None, None);
            if w.walk.is_none() {
                break got;
            }
        };
        assert!(over.is_some_and(|used| used > 1 << 30), "{over:?}");
    }
}
