//! Keeps containers out of the net_cls and net_prio v1 hierarchies.
//!
//! libcgroups' v1 manager puts a container's init into every v1 hierarchy it finds mounted,
//! net_cls and net_prio included, and cannot be told otherwise. On kernels before 5.15 a
//! process joining a net_prio cgroup (or given a net_cls classid) turns cgroup v2 socket
//! matching off for the whole host, and with it the hooks that keep tasks off the worker's
//! port (see [`crate::isolation`]). So before creating a container, the supervisor (a
//! single-threaded process of its own, one per task) moves into a private mount namespace in
//! which those hierarchies are not mounted: libcgroups then finds no mount point for them and
//! leaves the task where the supervisor is (their root, as every process on a host that does
//! not use them). The namespace is a slave of the host's, so mounts made on the host later
//! still reach the supervisor. Hosts that mount neither hierarchy (pure v2, and most hybrid
//! ones) need nothing and get nothing.

use std::path::PathBuf;

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};

use crate::runtime::RuntimeError;

/// The mount points of v1 hierarchies carrying net_cls or net_prio in `mountinfo`.
fn net_mounts(mountinfo: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let Some(mount_point) = left.split(' ').nth(4) else { continue };
        let mut right = right.split(' ');
        if right.next() != Some("cgroup") {
            continue;
        }
        let super_opts = right.nth(1).unwrap_or("");
        if super_opts.split(',').any(|o| crate::cgroup::V1_NET_CONTROLLERS.contains(&o)) {
            out.push(PathBuf::from(mount_point.replace("\\040", " ")));
        }
    }
    out
}

/// Hides the net_cls and net_prio hierarchies from this process (see the module's docs). Call
/// only in a single-threaded process: `unshare(CLONE_NEWNS)` refuses multi-threaded ones.
pub fn hide_net_hierarchies() -> Result<(), RuntimeError> {
    let err = |op: &'static str| move |e: nix::Error| RuntimeError::Container { op, message: e.to_string() };
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| RuntimeError::Io {
        op: "reading",
        path: "/proc/self/mountinfo".into(),
        source,
    })?;
    let mounts = net_mounts(&mountinfo);
    if mounts.is_empty() {
        return Ok(());
    }
    unshare(CloneFlags::CLONE_NEWNS).map_err(err("hiding net_cls/net_prio from"))?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>)
        .map_err(err("hiding net_cls/net_prio from"))?;
    for m in mounts {
        umount2(&m, MntFlags::MNT_DETACH).map_err(err("hiding net_cls/net_prio from"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn net_hierarchies_are_found_by_their_options() {
        let info = "\
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
36 31 0:33 / /sys/fs/cgroup/net_cls,net_prio rw,relatime - cgroup cgroup rw,net_cls,net_prio
37 31 0:34 / /mnt/prio\\040only rw,relatime - cgroup none rw,net_prio
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            super::net_mounts(info),
            vec![std::path::PathBuf::from("/sys/fs/cgroup/net_cls,net_prio"), "/mnt/prio only".into()]
        );
    }
}
