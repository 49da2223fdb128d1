//! Disk pressure: free space and inodes of the filesystems the worker writes to (its state
//! dir, the task workdirs, the cache dir, the image store), against three thresholds, as
//! kubelet's eviction thresholds and image GC do:
//! - below `soft_free` the caches evict at once (off the request path) until `target_free` is
//!   free again, or nothing unused is left on that filesystem;
//! - below `min_free` (hard) the worker refuses new tasks (RESOURCE_EXHAUSTED, "disk: N GiB free
//!   on <which> (minimum M GiB)") and says so in HealthCheck and in its heartbeat, so the
//!   controller places tasks elsewhere until space returns. Running tasks go on.
//!
//! Inodes have one threshold, `min_free_inodes` (hard); the soft one is twice it and the
//! target three times. A filesystem that reports no inode count (btrfs) has no inode pressure.
//! Messages name filesystems by role (`state`, `workdirs`, `cache`, `images`), never by path.

use std::path::{Path, PathBuf};

use super::size::{Amount, human_bytes};

/// The thresholds, each bytes or a share of the filesystem.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Hard: below this the worker takes no new task.
    pub min_free: Amount,
    /// Soft: below this the caches evict until `target_free` is free.
    pub soft_free: Amount,
    pub target_free: Amount,
    /// Hard, for inodes (a share, or a count given as a plain number).
    pub min_free_inodes: Amount,
}

impl Default for Thresholds {
    /// 5% hard, 10% soft, back to 15%; 5% of inodes.
    fn default() -> Self {
        Thresholds {
            min_free: Amount::Percent(5.0),
            soft_free: Amount::Percent(10.0),
            target_free: Amount::Percent(15.0),
            min_free_inodes: Amount::Percent(5.0),
        }
    }
}

/// One filesystem the worker uses, now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Filesystem {
    /// Its roles: `state`, `workdirs`, `cache`, `images`, joined with "/" (`state/workdirs`).
    pub name: String,
    #[serde(skip)]
    pub dev: u64,
    pub size_bytes: u64,
    /// Bytes available to the worker's writes (`df`'s "Avail").
    pub free_bytes: u64,
    pub inodes: u64,
    pub free_inodes: u64,
}

/// How a filesystem stands against the thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    /// Below the soft threshold: the caches evict.
    Soft,
    /// Below the hard threshold: no new tasks.
    Hard,
}

/// The paths to watch, by role.
pub fn watched(state_dir: &Path, cache_dir: &Path, image_dir: &Path) -> Vec<(&'static str, PathBuf)> {
    vec![
        ("state", state_dir.to_path_buf()),
        ("workdirs", crate::taskdir::tasks_dir(state_dir)),
        ("cache", cache_dir.to_path_buf()),
        ("images", image_dir.to_path_buf()),
    ]
}

/// The filesystems of `paths` now (one per device, its roles joined; a path that does not
/// exist yet counts as its nearest existing ancestor).
pub fn read(paths: &[(&'static str, PathBuf)]) -> Vec<Filesystem> {
    let mut out: Vec<(Vec<&'static str>, Filesystem)> = Vec::new();
    for (role, path) in paths {
        let dev = super::dev_of(path);
        if let Some((roles, _)) = out.iter_mut().find(|(_, f)| f.dev == dev) {
            if !roles.contains(role) {
                roles.push(role);
            }
            continue;
        }
        let Some(at) = existing(path) else { continue };
        let Ok(s) = nix::sys::statvfs::statvfs(at) else { continue };
        let unit = s.fragment_size();
        out.push((
            vec![*role],
            Filesystem {
                name: String::new(),
                dev,
                size_bytes: s.blocks() * unit,
                free_bytes: s.blocks_available() * unit,
                inodes: s.files(),
                free_inodes: s.files_available(),
            },
        ));
    }
    out.into_iter()
        .map(|(roles, mut f)| {
            f.name = roles.join("/");
            f
        })
        .collect()
}

fn existing(path: &Path) -> Option<&Path> {
    let mut p = Some(path);
    while let Some(at) = p {
        if at.exists() {
            return Some(at);
        }
        p = at.parent();
    }
    None
}

impl Thresholds {
    fn inode_limits(&self, fs: &Filesystem) -> Option<(u64, u64, u64)> {
        if fs.inodes == 0 {
            return None;
        }
        let hard = self.min_free_inodes.of(fs.inodes);
        Some((hard, hard.saturating_mul(2), hard.saturating_mul(3)))
    }

    /// Where `fs` stands.
    pub fn level(&self, fs: &Filesystem) -> Level {
        let inodes = self.inode_limits(fs);
        if fs.free_bytes < self.min_free.of(fs.size_bytes) || inodes.is_some_and(|(h, _, _)| fs.free_inodes < h) {
            Level::Hard
        } else if fs.free_bytes < self.soft_free.of(fs.size_bytes) || inodes.is_some_and(|(_, s, _)| fs.free_inodes < s)
        {
            Level::Soft
        } else {
            Level::Ok
        }
    }

    /// Why no new task is taken, when `fs` is below the hard threshold.
    pub fn refusal(&self, fs: &Filesystem) -> Option<String> {
        let min = self.min_free.of(fs.size_bytes);
        if fs.free_bytes < min {
            return Some(format!(
                "disk: {} free on {} (minimum {})",
                human_bytes(fs.free_bytes),
                fs.name,
                human_bytes(min)
            ));
        }
        match self.inode_limits(fs) {
            Some((hard, _, _)) if fs.free_inodes < hard => {
                Some(format!("disk: {} inodes free on {} (minimum {hard})", fs.free_inodes, fs.name))
            }
            _ => None,
        }
    }

    /// What `fs` must give back to be at the target again (bytes, inodes), when it is below
    /// the soft threshold.
    pub fn shortfall(&self, fs: &Filesystem) -> Option<(u64, u64)> {
        if self.level(fs) == Level::Ok {
            return None;
        }
        let bytes = self.target_free.of(fs.size_bytes).saturating_sub(fs.free_bytes);
        let inodes = self.inode_limits(fs).map(|(_, _, t)| t.saturating_sub(fs.free_inodes)).unwrap_or(0);
        Some((bytes, inodes))
    }

    /// The first refusal among `filesystems`.
    pub fn refusal_of(&self, filesystems: &[Filesystem]) -> Option<String> {
        filesystems.iter().find_map(|f| self.refusal(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fs(size: u64, free: u64, inodes: u64, free_inodes: u64) -> Filesystem {
        Filesystem { name: "state/workdirs".into(), dev: 1, size_bytes: size, free_bytes: free, inodes, free_inodes }
    }

    #[test]
    fn levels_and_messages_follow_the_thresholds() {
        let t = Thresholds::default();
        let gib = 1u64 << 30;
        assert_eq!(t.level(&fs(100 * gib, 50 * gib, 1000, 900)), Level::Ok);
        assert_eq!(t.level(&fs(100 * gib, 9 * gib, 1000, 900)), Level::Soft);
        assert_eq!(t.level(&fs(100 * gib, 4 * gib, 1000, 900)), Level::Hard);
        assert_eq!(
            t.refusal(&fs(100 * gib, 4 * gib, 1000, 900)).unwrap(),
            "disk: 4.0 GiB free on state/workdirs (minimum 5.0 GiB)"
        );
        assert_eq!(t.refusal(&fs(100 * gib, 9 * gib, 1000, 900)), None);
        // Inodes: 5% hard, 10% soft, 15% target.
        assert_eq!(t.level(&fs(100 * gib, 50 * gib, 1000, 80)), Level::Soft);
        assert_eq!(
            t.refusal(&fs(100 * gib, 50 * gib, 1000, 40)).unwrap(),
            "disk: 40 inodes free on state/workdirs (minimum 50)"
        );
        assert_eq!(t.level(&fs(100 * gib, 50 * gib, 0, 0)), Level::Ok, "no inode count, no inode pressure");
        assert_eq!(t.shortfall(&fs(100 * gib, 9 * gib, 1000, 80)), Some((6 * gib, 70)));
        assert_eq!(t.shortfall(&fs(100 * gib, 50 * gib, 1000, 900)), None);
        let absolute = Thresholds { min_free: Amount::Bytes(50 << 20), ..t };
        assert_eq!(
            absolute.refusal(&fs(100 << 20, 38 << 20, 0, 0)).unwrap(),
            "disk: 38 MiB free on state/workdirs (minimum 50 MiB)"
        );
    }

    #[test]
    fn filesystems_are_read_once_per_device_with_their_roles() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let found = read(&watched(&state, &dir.path().join("cache"), &dir.path().join("cache/images")));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].name, "state/workdirs/cache/images");
        assert!(found[0].size_bytes > 0 && found[0].free_bytes <= found[0].size_bytes);
    }
}
