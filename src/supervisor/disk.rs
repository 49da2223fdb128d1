//! `resources.disk_bytes`: what the task keeps on disk, measured now and then.
//!
//! Kernels enforce disk space per directory only with project quotas (XFS, or ext4 mounted
//! with `prjquota`), which hosts rarely have, or with a filesystem image per task, which
//! costs a `mkfs` and a loop device on every start. The supervisor does what kubelet does for
//! ephemeral storage instead: it measures the task's directories (its workdir, its rootfs'
//! upper layer, the process runtime's /tmp) and a container's /tmp (a tmpfs, read with one
//! `statfs`), and kills the task once they hold more than its limit. Nothing happens at start;
//! each measure is a walk of the task's files, spaced so that walking costs at most about 1 %
//! of one core (a walk of 10 ms every second, of 100 ms every 10 s).

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::unistd::Pid;

use crate::runtime::DiskLimit;

/// The first measure, and the shortest spacing between two.
const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// The longest spacing, however slow a walk is.
const MAX_INTERVAL: Duration = Duration::from_secs(30);
/// Spacing as a multiple of the last walk's duration.
const COST_FACTOR: u32 = 100;

/// When the task's disk use is measured next, and against what.
pub(super) struct DiskWatch {
    limit: DiskLimit,
    next: Instant,
}

impl DiskWatch {
    pub(super) fn new(limit: DiskLimit, started: Instant) -> DiskWatch {
        DiskWatch { limit, next: started + MIN_INTERVAL }
    }

    pub(super) fn due(&self) -> Instant {
        self.next
    }

    pub(super) fn limit_bytes(&self) -> u64 {
        self.limit.bytes
    }

    /// Measures the task's use (with the /tmp of the container whose first process is
    /// `container_init`); `Some(bytes)` when it is over the limit.
    pub(super) fn check(&mut self, container_init: Option<Pid>) -> Option<u64> {
        let start = Instant::now();
        let mut used = usage(&self.limit.paths);
        if let Some(pid) = container_init {
            used += tmpfs_used(&PathBuf::from(format!("/proc/{pid}/root/tmp")));
        }
        let took = start.elapsed();
        self.next = Instant::now() + (took * COST_FACTOR).clamp(MIN_INTERVAL, MAX_INTERVAL);
        (used > self.limit.bytes).then_some(used)
    }
}

/// Bytes allocated to the files below `paths` (blocks, so sparse files count as what they
/// take; a file with several links once; symlinks not followed).
pub(super) fn usage(paths: &[PathBuf]) -> u64 {
    let mut total = 0;
    let mut linked: HashSet<(u64, u64)> = HashSet::new();
    let mut stack: Vec<PathBuf> = paths.to_vec();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                stack.push(e.path());
            }
            if md.nlink() > 1 && !md.is_dir() && !linked.insert((md.dev(), md.ino())) {
                continue;
            }
            total += md.blocks() * 512;
        }
    }
    total
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
        assert!(w.check(None).is_some_and(|used| used >= 256 << 10));
        assert!(w.due() >= started + MIN_INTERVAL);
        let mut ok = DiskWatch::new(DiskLimit { bytes: 1 << 30, paths: vec![dir.path().to_path_buf()] }, started);
        assert_eq!(ok.check(None), None);
    }
}
