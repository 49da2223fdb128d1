//! The host's TPU devices and who holds them open.
//!
//! A TPU is passed to one process at a time through VFIO: while a wedged container of an
//! earlier task still holds `/dev/vfio/<group>` open, every new TPU task fails to initialise
//! ("Couldn't open iommu group", Iris #2618 and #4783). The worker cannot take the device back,
//! but it can say so: a holder that is not one of its own tasks makes it unhealthy, with the
//! holder named, so the controller stops sending it TPU work and an operator knows which pid to
//! look at.

use std::path::{Path, PathBuf};

/// The host's TPU devices: the VFIO groups (`/dev/vfio/<n>`; `/dev/vfio/vfio` is the shared
/// container device every VFIO user opens, not a TPU) and the accel devices of newer TPU VMs
/// (`/dev/accel<n>`). Empty on a host without TPUs.
pub fn tpu_devices() -> Vec<PathBuf> {
    let mut found = Vec::new();
    let numbered = |dir: &Path, prefix: &str, found: &mut Vec<PathBuf>| {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.strip_prefix(prefix).is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) {
                found.push(e.path());
            }
        }
    };
    numbered(Path::new("/dev/vfio"), "", &mut found);
    numbered(Path::new("/dev"), "accel", &mut found);
    found.sort();
    found
}

/// A process holding one of the devices open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: i32,
    /// Its command name (`/proc/<pid>/comm`).
    pub comm: String,
    pub device: PathBuf,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The device by its name under /dev (`vfio/0`, `accel0`): no other host path.
        let device = self
            .device
            .strip_prefix("/dev")
            .unwrap_or(Path::new(self.device.file_name().map_or(std::ffi::OsStr::new("?"), |n| n)));
        write!(f, "{} is held by pid {} ({})", device.display(), self.pid, self.comm)
    }
}

/// The processes, other than those `ours` accepts, that hold one of `devices` open: every
/// process's open files (`/proc/<pid>/fd`) compared with the devices' paths. A process that
/// ends meanwhile is skipped.
pub fn holders(devices: &[PathBuf], ours: impl Fn(i32) -> bool) -> Vec<Holder> {
    let mut found = Vec::new();
    if devices.is_empty() {
        return found;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else { return found };
    let own = std::process::id() as i32;
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if pid == own {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else { continue };
            if let Some(device) = devices.iter().find(|d| **d == target) {
                if ours(pid) {
                    break;
                }
                let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default().trim().to_string();
                found.push(Holder { pid, comm, device: device.clone() });
                break;
            }
        }
    }
    found.sort_by_key(|h| h.pid);
    found
}

/// Whether `pid` runs in a cgroup below `marker` (e.g. `/iris-worker/<worker id>/`, where a
/// worker's tasks run), in any hierarchy.
pub fn in_cgroup_below(pid: i32, marker: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| c.lines().any(|l| l.contains(marker)))
}

/// What a TPU task prints when the host's TPU, not the task, is at fault (the bad-node
/// signatures Iris's worker knows): such a failure is the worker's.
pub const TPU_INIT_FAILURES: [&str; 5] = [
    "Couldn't open iommu group",
    "open(/dev/vfio",
    "Failed to initialize TPU system",
    "TPU initialization failed",
    "No accelerator found",
];

/// The first bad-node signature found in `lines`.
pub fn tpu_init_failure<'a>(lines: impl IntoIterator<Item = &'a str>) -> Option<&'static str> {
    lines.into_iter().find_map(|line| TPU_INIT_FAILURES.iter().copied().find(|p| line.contains(p)))
}

/// How long a look at the holders is reused: a Reconcile comes every second, and reading every
/// process's open files is not free on a busy host.
const LOOK_AGAIN_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// The worker's watch over its TPU devices: why it is unhealthy, if a process that is not one
/// of its tasks holds one.
#[derive(Debug)]
pub struct TpuWatch {
    devices: Vec<PathBuf>,
    /// What the cgroups of this worker's tasks have in their path.
    tasks_marker: String,
    last: std::sync::Mutex<Option<(std::time::Instant, Option<String>)>>,
}

impl TpuWatch {
    /// A watch over `devices` (none: never unhealthy) for the worker whose tasks' cgroups have
    /// `tasks_marker` in their path.
    pub fn new(devices: Vec<PathBuf>, tasks_marker: String) -> TpuWatch {
        TpuWatch { devices, tasks_marker, last: Default::default() }
    }

    /// Why the worker is unhealthy (each outside holder named), or `None`.
    pub fn unhealthy(&self) -> Option<String> {
        if self.devices.is_empty() {
            return None;
        }
        let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, why)) = last.as_ref()
            && at.elapsed() < LOOK_AGAIN_AFTER
        {
            return why.clone();
        }
        let outside = holders(&self.devices, |pid| in_cgroup_below(pid, &self.tasks_marker));
        let why = (!outside.is_empty()).then(|| {
            let named: Vec<String> = outside.iter().map(Holder::to_string).collect();
            format!("TPU device busy: {}, not a task of this worker", named.join("; "))
        });
        *last = Some((std::time::Instant::now(), why.clone()));
        why
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn a_process_holding_a_device_open_is_found_and_named_unless_it_is_ours() {
        // A regular file stands in for /dev/vfio/0 (no TPU here): what is read is the real
        // /proc of a real process that holds it open.
        let dir = tempfile::tempdir().unwrap();
        let device = dir.path().join("0");
        std::fs::write(&device, "").unwrap();
        let other = dir.path().join("1");
        std::fs::write(&other, "").unwrap();
        // Its stdin: held from the moment it runs (spawn returns once it has exec'd).
        let held = std::fs::File::open(&device).unwrap();
        let mut child = Command::new("sleep").arg("60").stdin(Stdio::from(held)).spawn().unwrap();
        let pid = child.id() as i32;

        let found = holders(&[device.clone(), other.clone()], |_| false);
        let mine: Vec<&Holder> = found.iter().filter(|h| h.pid == pid).collect();
        assert_eq!(mine.len(), 1, "{found:?}");
        assert_eq!(mine[0].device, device);
        assert_eq!(mine[0].comm, "sleep");
        assert_eq!(mine[0].to_string(), format!("0 is held by pid {pid} (sleep)"));
        assert!(holders(&[other], |_| false).iter().all(|h| h.pid != pid), "a file it does not hold");
        assert!(holders(&[device], |p| p == pid).iter().all(|h| h.pid != pid), "its own task's holder");
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn a_tpu_init_failure_is_recognised_in_any_line() {
        let lines = ["loading", "E1207 Couldn't open iommu group /dev/vfio/0: Device or resource busy", "bye"];
        assert_eq!(tpu_init_failure(lines), Some("Couldn't open iommu group"));
        assert_eq!(tpu_init_failure(["Traceback", "ValueError: bad input"]), None);
    }

    #[test]
    fn a_device_under_dev_is_named_by_its_path_there() {
        let h = Holder { pid: 7, comm: "python3".into(), device: "/dev/vfio/3".into() };
        assert_eq!(h.to_string(), "vfio/3 is held by pid 7 (python3)");
    }
}
