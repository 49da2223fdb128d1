//! A task's own root filesystem when its image gives it one: an overlay mounted at `rootfs/`
//! in the task directory, over its upper and work directories in `overlay/`. `env::image`
//! mounts it when the task is prepared; whoever sees the task end releases it: its supervisor,
//! or the worker for a task no supervisor ran. Here, below both, so neither calls up.

use std::path::Path;

use nix::mount::MntFlags;

pub use crate::taskdir::{OVERLAY, ROOTFS};

/// Unmounts the rootfs of the task at `task_dir`, if one is mounted (idempotent).
pub fn unmount(task_dir: &Path) -> std::io::Result<()> {
    match nix::mount::umount2(&task_dir.join(ROOTFS), MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(std::io::Error::other(format!("umount: {e}"))),
    }
}

/// Unmounts the task's rootfs and removes what the task wrote into it (its workdir is
/// elsewhere). Nothing may run in it any more.
pub fn release(task_dir: &Path) {
    if let Err(e) = unmount(task_dir) {
        tracing::warn!(error = %e, "unmounting the task's rootfs");
        return;
    }
    let dir = task_dir.join(OVERLAY);
    if let Err(e) = std::fs::remove_dir_all(&dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), error = %e, "removing a task's overlay dirs");
    }
}
