//! Small real filesystems for the cache and disk tests: a size-limited tmpfs the test mounts
//! on a directory of its own, unmounted and removed on drop (also when the test fails). Bind
//! it before the worker that uses it, so the worker (and its cleanup) goes first.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

pub struct SmallFs {
    pub dir: PathBuf,
}

impl SmallFs {
    /// A tmpfs of `size` (e.g. `300m`), and at most `inodes` inodes when given.
    pub fn tmpfs(size: &str, inodes: Option<u64>) -> SmallFs {
        let dir = tempfile::Builder::new().prefix("iwtest-smallfs-").tempdir().unwrap().keep();
        let mut options = format!("size={size},mode=0755");
        if let Some(n) = inodes {
            options.push_str(&format!(",nr_inodes={n}"));
        }
        nix::mount::mount(Some("tmpfs"), &dir, Some("tmpfs"), MsFlags::empty(), Some(options.as_str()))
            .unwrap_or_else(|e| panic!("mounting a tmpfs on {}: {e}", dir.display()));
        SmallFs { dir }
    }

    /// A directory on it (made if missing).
    pub fn path(&self, name: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// A temp dir on it, for a worker's state.
    pub fn tempdir(&self) -> tempfile::TempDir {
        tempfile::Builder::new().prefix("state-").tempdir_in(&self.dir).unwrap()
    }

    /// (size, bytes free) now.
    pub fn space(&self) -> (u64, u64) {
        let s = nix::sys::statvfs::statvfs(&self.dir).unwrap();
        let unit = s.fragment_size();
        (s.blocks() * unit, s.blocks_available() * unit)
    }

    /// Bytes in use.
    pub fn used(&self) -> u64 {
        let (size, free) = self.space();
        size - free
    }

    /// Fills it with a file of its own (`.filler`) until about `free` bytes are left; returns
    /// the file (remove it to give the space back).
    pub fn fill_until_free(&self, free: u64) -> PathBuf {
        use std::os::fd::AsRawFd;
        let path = self.dir.join(".filler");
        let (_, now) = self.space();
        let grow = now.saturating_sub(free);
        let f = std::fs::OpenOptions::new().create(true).append(true).open(&path).unwrap();
        let len = f.metadata().unwrap().len();
        nix::fcntl::fallocate(f.as_raw_fd(), nix::fcntl::FallocateFlags::empty(), len as i64, grow as i64).unwrap();
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        // Whatever is still mounted below it first (a task's overlay rootfs), deepest first.
        super::common::unmount_below(&self.dir);
        let _ = nix::mount::umount2(&self.dir, MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Bytes of `dir` as `du` counts them (blocks allocated), `.locks` included.
pub fn du(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else { continue };
            total += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}
