//! Who holds a cache entry: the kernel lists every `flock` in `/proc/locks` with the locking
//! process and the lock file's device and inode, so an entry's users are found without taking
//! its lock (taking it, even for a moment, would make a user's `try_shared` fail). A task's
//! supervisor holds the entries its task uses for the task's whole life (`LaunchSpec::leases`),
//! so a holder's command line names the task directory and, through its `task.json`, the task.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The flocks held on this host, by (device major, device minor, inode).
#[derive(Debug, Default)]
pub struct Held {
    by_file: HashMap<(u32, u32, u64), Vec<i32>>,
}

impl Held {
    /// Reads `/proc/locks` (empty when it cannot be read).
    ///
    /// The kernel lists it a page at a time, each page under the lock table's lock but not the
    /// whole: a lock taken or released between two pages shifts the rest, and a lock held all
    /// along can be skipped. Two listings in a row that agree were not disturbed, so it is read
    /// until two do (at most five times; under constant churn, what any listing saw — the
    /// answer is advisory, eviction takes the entry's lock anyway).
    pub fn read() -> Held {
        let mut seen = Held::default();
        let mut last: Option<String> = None;
        for _ in 0..5 {
            let text = std::fs::read_to_string("/proc/locks").unwrap_or_default();
            if last.as_deref() == Some(text.as_str()) {
                return Held::parse(&text);
            }
            for (file, pids) in Held::parse(&text).by_file {
                seen.by_file.entry(file).or_default().extend(pids);
            }
            last = Some(text);
        }
        seen
    }

    /// Parses `/proc/locks` text: `1: FLOCK  ADVISORY  READ  1234 fd:01:5678 0 EOF`; lines of
    /// blocked waiters (`1: -> FLOCK …`) hold nothing and are skipped.
    pub fn parse(text: &str) -> Held {
        let mut by_file: HashMap<(u32, u32, u64), Vec<i32>> = HashMap::new();
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 6 || fields[1] == "->" || fields[1] != "FLOCK" {
                continue;
            }
            let Ok(pid) = fields[4].parse::<i32>() else { continue };
            let mut parts = fields[5].split(':');
            let (Some(major), Some(minor), Some(ino)) = (parts.next(), parts.next(), parts.next()) else { continue };
            let (Ok(major), Ok(minor), Ok(ino)) =
                (u32::from_str_radix(major, 16), u32::from_str_radix(minor, 16), ino.parse::<u64>())
            else {
                continue;
            };
            by_file.entry((major, minor, ino)).or_default().push(pid);
        }
        Held { by_file }
    }

    /// The pids holding a lock on the file at `lock` (none when it does not exist).
    pub fn pids(&self, lock: &Path) -> Vec<i32> {
        let Ok(m) = std::fs::metadata(lock) else { return Vec::new() };
        let dev = m.dev();
        let key = (libc::major(dev), libc::minor(dev), m.ino());
        let mut pids = self.by_file.get(&key).cloned().unwrap_or_default();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    pub fn holds(&self, lock: &Path) -> bool {
        !self.pids(lock).is_empty()
    }

    /// The lock files in the `.locks/` directory `dir` that some process holds, found by the
    /// inodes `read_dir` gives (no stat per file: a cache may have tens of thousands).
    pub fn held_in(&self, dir: &Path) -> std::collections::HashSet<std::path::PathBuf> {
        use std::os::unix::fs::DirEntryExt;
        let mut out = std::collections::HashSet::new();
        let Ok(m) = std::fs::metadata(dir) else { return out };
        let (major, minor) = (libc::major(m.dev()), libc::minor(m.dev()));
        if self.by_file.keys().all(|(ma, mi, _)| (*ma, *mi) != (major, minor)) {
            return out;
        }
        let Ok(rd) = std::fs::read_dir(dir) else { return out };
        for e in rd.flatten() {
            if self.by_file.contains_key(&(major, minor, e.ino())) {
                out.insert(e.path());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_flocks_and_skips_waiters_and_posix_locks() {
        let text = "1: FLOCK  ADVISORY  READ  1234 fd:01:5678 0 EOF\n\
                    1: -> FLOCK  ADVISORY  WRITE 99 fd:01:5678 0 EOF\n\
                    2: FLOCK  ADVISORY  READ  4321 fd:01:5678 0 EOF\n\
                    3: POSIX  ADVISORY  WRITE 777 00:2a:12 0 EOF\n\
                    4: FLOCK  ADVISORY  WRITE 55 00:2a:12 0 EOF\n";
        let held = Held::parse(text);
        assert_eq!(held.by_file[&(0xfd, 1, 5678)], vec![1234, 4321]);
        assert_eq!(held.by_file[&(0, 0x2a, 12)], vec![55]);
    }

    #[test]
    fn finds_this_process_holding_a_real_lock() {
        let dir = tempfile::tempdir().unwrap();
        let locks = crate::cachelock::EntryLocks::new(dir.path());
        let path = locks.path("k");
        let lease = locks.shared("k").unwrap();
        let me = std::process::id() as i32;
        assert_eq!(Held::read().pids(&path), vec![me]);
        assert_eq!(Held::read().held_in(&dir.path().join(".locks")), [path.clone()].into());
        drop(lease);
        assert!(!Held::read().holds(&path));
        assert!(!Held::read().holds(&dir.path().join("missing.lock")));
    }
}
