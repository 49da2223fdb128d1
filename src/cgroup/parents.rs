//! The parent cgroups of a worker's tasks (`<own cgroup>/iris-worker/<worker-id>`).
//!
//! On v1, libcontainer takes a task's cgroup path as absolute in *every* hierarchy, so
//! directories such as `/sys/fs/cgroup/cpu/process_api/<id>/iris-worker` have to be created
//! in hierarchies where this process is at the root. We create them, and we may remove only
//! what an iris worker created: every directory we make is recorded in a machine-wide ledger
//! (several workers on one host share the upper directories), and `release` removes recorded
//! directories once they are empty. On v2 it also enables the controllers on the way down.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

use super::layout::{CgroupError, Layout, create_chain, io_err, relative, remove_dir_retrying};

/// Where the ledger of created cgroup directories lives. /run: it must not outlive a reboot,
/// and neither do cgroups (in [`crate::cachelock::HOST_RUN_DIR`], root's alone).
const LEDGER: &str = "/run/iris-worker/cgroups-created";

/// How long a worker waits for another process's hold on the ledger before it fails (start,
/// `cleanup`): workers hold it for milliseconds, so a longer hold is a stuck or hostile
/// process, and failing with a clear error beats hanging for ever.
const LEDGER_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl Layout {
    /// Creates the directories of `path` (the worker's parent cgroup) in every hierarchy and
    /// records the ones that did not exist.
    pub fn prepare_parent(&self, path: &str) -> Result<(), CgroupError> {
        let mut made = Vec::new();
        for dir in self.dirs(path)? {
            made.extend(create_chain(&dir, !self.is_v2())?);
        }
        if !made.is_empty() {
            with_ledger(|set| set.extend(made.iter().cloned()))?;
        }
        if let Layout::V2 { root } = self {
            enable_controllers(root, path)?;
        }
        Ok(())
    }

    /// Removes the worker's parent cgroup `path` and its ancestors that an iris worker
    /// created, deepest first, where they are empty. Directories still in use (another
    /// worker's tasks) are kept, and stay recorded for a later release.
    pub fn release_parent(&self, path: &str) -> Result<(), CgroupError> {
        let ours = self.dirs(path)?;
        with_ledger(|set| {
            let mut dirs: Vec<PathBuf> =
                set.iter().filter(|d| ours.iter().any(|o| o.starts_with(d))).cloned().collect();
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for dir in dirs {
                let empty_of_children = fs::read_dir(&dir)
                    .map(|rd| !rd.flatten().any(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false)))
                    .unwrap_or(true);
                if empty_of_children && remove_dir_retrying(&dir).is_ok() {
                    set.remove(&dir);
                }
            }
        })
    }
}

/// The v2 controllers a task's cgroup gets (those of them the host has).
const V2_CONTROLLERS: &[&str] = &["cpu", "cpuset", "io", "memory", "pids"];

/// v2 gives a cgroup a controller only if its parent has it in `cgroup.subtree_control`, and
/// so on up to the root: enables ours, where available and not yet on, in every directory from
/// the root down to `path` (the parent of the tasks' cgroups, which hold their processes).
/// Fails with EBUSY where a directory holds processes itself (see [`Layout::task_root`]).
fn enable_controllers(root: &Path, path: &str) -> Result<(), CgroupError> {
    let mut dir = root.to_path_buf();
    let mut components = relative(path)?.split('/').filter(|c| !c.is_empty());
    loop {
        let available = fs::read_to_string(dir.join("cgroup.controllers"))
            .map_err(io_err("reading", &dir.join("cgroup.controllers")))?;
        let control = dir.join("cgroup.subtree_control");
        let enabled = fs::read_to_string(&control).map_err(io_err("reading", &control))?;
        let has = |text: &str, c: &str| text.split_whitespace().any(|x| x == c);
        for c in V2_CONTROLLERS.iter().filter(|c| has(&available, c) && !has(&enabled, c)) {
            fs::write(&control, format!("+{c}")).map_err(io_err("enabling controllers in", &control))?;
        }
        match components.next() {
            Some(c) => dir.push(c),
            None => return Ok(()),
        }
    }
}

/// Runs `f` on the ledger under an exclusive lock and writes the result back.
fn with_ledger(f: impl FnOnce(&mut BTreeSet<PathBuf>)) -> Result<(), CgroupError> {
    crate::cachelock::private_host_run_dir().map_err(io_err("creating", Path::new(crate::cachelock::HOST_RUN_DIR)))?;
    with_ledger_at(Path::new(LEDGER), LEDGER_WAIT, f)
}

fn with_ledger_at(
    path: &Path,
    wait: std::time::Duration,
    f: impl FnOnce(&mut BTreeSet<PathBuf>),
) -> Result<(), CgroupError> {
    let mut file = crate::cachelock::open_private_lock_file(path, true).map_err(io_err("opening", path))?;
    let lock = lock_within(&file, wait).map_err(io_err("locking", path))?;
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(io_err("reading", path))?;
    let mut set: BTreeSet<PathBuf> = text.lines().filter(|l| !l.is_empty()).map(PathBuf::from).collect();
    f(&mut set);
    let mut out = String::new();
    for d in &set {
        out.push_str(&d.to_string_lossy());
        out.push('\n');
    }
    file.set_len(0).map_err(io_err("writing", path))?;
    file.rewind().map_err(io_err("writing", path))?;
    file.write_all(out.as_bytes()).map_err(io_err("writing", path))?;
    drop(lock);
    Ok(())
}

/// Takes `file`'s exclusive flock, polling until `wait` has passed (flock itself has no
/// timeout); released when the returned handle drops.
fn lock_within(file: &fs::File, wait: std::time::Duration) -> io::Result<nix::fcntl::Flock<fs::File>> {
    let deadline = std::time::Instant::now() + wait;
    let mut pause = std::time::Duration::from_millis(5);
    loop {
        match nix::fcntl::Flock::lock(file.try_clone()?, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(200));
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("another process has held its lock for over {} s", wait.as_secs_f32()),
                ));
            }
            Err((_, e)) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn a_ledger_held_by_another_process_fails_after_the_wait_instead_of_hanging() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger");
        std::fs::write(&path, "/a\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        // Another open file description's flock: as another process's would be.
        let other = nix::fcntl::Flock::lock(std::fs::File::open(&path).unwrap(), nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            let _ = tx.send(with_ledger_at(&p, std::time::Duration::from_millis(300), |set| set.clear()));
        });
        let got = rx.recv_timeout(std::time::Duration::from_secs(60)).expect("with_ledger returned");
        let err = got.expect_err("the ledger was held");
        assert!(err.to_string().contains("held its lock"), "{err}");
        // Once free, it works, and the file is root's alone from then on.
        drop(other);
        with_ledger_at(&path, std::time::Duration::from_millis(300), |set| {
            set.insert(PathBuf::from("/b"));
        })
        .unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "/a\n/b\n");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        // Never through a symlink.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(with_ledger_at(&link, std::time::Duration::from_millis(300), |_| ()).is_err());
    }
}
