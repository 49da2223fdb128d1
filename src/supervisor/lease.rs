//! The controller lease, enforced by each task's supervisor (fencing).
//!
//! A worker with a controller holds a lease of `--lease` seconds, renewed each time the
//! controller answers one of its heartbeats (whatever the wire: January's RegisterWorker or a
//! newer one): the renewal counts from the moment the answered heartbeat was *sent*, so the
//! worker's lease never outlasts what the controller saw. The worker writes the lease to
//! `<state-dir>/lease.json`; each fenced task's directory holds `fence.json`, naming that file.
//!
//! The supervisor reads the lease file when the lease is due to expire. If nobody renewed it,
//! the worker has not heard from its controller for the whole lease — it may be dead, or cut
//! off — and the controller may soon run the task elsewhere: the supervisor ends the task
//! (SIGTERM, SIGKILL [`kill_grace`] later) and records a worker failure. This holds while the
//! worker process itself is dead, which is why the supervisor, not the worker, enforces it.
//!
//! Times are CLOCK_BOOTTIME milliseconds: one clock for every process on the host, immune to
//! wall-clock steps, and counting time spent suspended.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::taskdir::{self, FileError};

pub use crate::taskdir::{FENCE, LEASE};

/// Added to the fence for the supervisor's own latency (waking up, reading the file, the
/// cgroup kill).
const SLACK: Duration = Duration::from_millis(250);

/// `lease.json`: the last renewal.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseRecord {
    /// When the heartbeat the controller answered was sent (CLOCK_BOOTTIME ms).
    pub renewed_ms: i64,
    /// The lease's length.
    pub lease_ms: u64,
    /// The kernel's boot id: CLOCK_BOOTTIME starts again at a reboot, so a record of an
    /// earlier boot means nothing (it reads as no lease).
    pub boot_id: String,
}

impl LeaseRecord {
    pub fn expires_ms(&self) -> i64 {
        self.renewed_ms.saturating_add(self.lease_ms as i64)
    }
}

/// `fence.json`: the lease file that fences this task.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FenceRecord {
    pub lease_file: PathBuf,
}

/// CLOCK_BOOTTIME in milliseconds.
pub fn boottime_ms() -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        // CLOCK_BOOTTIME exists on every kernel this runs on (2.6.39+); a clock that cannot
        // be read makes every lease look expired, which fails safe.
        return i64::MAX / 2;
    }
    ts.tv_sec * 1000 + ts.tv_nsec / 1_000_000
}

/// Between SIGTERM and SIGKILL when a lease expires: a quarter of the lease, at most 5 s.
pub fn kill_grace(lease: Duration) -> Duration {
    (lease / 4).min(Duration::from_secs(5))
}

/// How long after the send of its last answered heartbeat every fenced task of a worker is
/// surely gone: the lease, the kill grace and the supervisor's slack. The controller waits at
/// least this long before it runs the worker's tasks elsewhere.
pub fn fence(lease: Duration) -> Duration {
    lease + kill_grace(lease) + SLACK
}

pub use iris_wire::cluster::CONTROLLER_MARGIN;

/// The rule between a worker's lease and its controller's dead-worker timeout: the lease and
/// its kill are over before the controller declares the worker dead, so its tasks move as
/// soon as that happens (a longer lease is still safe, but its tasks wait for it to lapse).
pub fn check_against_worker_timeout(lease: Duration, worker_timeout: Duration) -> Result<(), String> {
    let needs = fence(lease) + CONTROLLER_MARGIN;
    if needs > worker_timeout {
        return Err(format!(
            "the workers' lease of {:.1} s, with its kill and margin, takes {:.2} s: more than the worker timeout \
             of {:.1} s (lower the lease or raise the timeout)",
            lease.as_secs_f64(),
            needs.as_secs_f64(),
            worker_timeout.as_secs_f64()
        ));
    }
    Ok(())
}

/// "lost contact with the controller for 30 s".
pub fn lost_contact(lease_ms: u64) -> String {
    let secs = lease_ms as f64 / 1000.0;
    if lease_ms.is_multiple_of(1000) {
        format!("lost contact with the controller for {secs:.0} s")
    } else {
        format!("lost contact with the controller for {secs:.1} s")
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Reads a lease file; `None` when it is missing, unreadable or of another boot.
pub fn read(path: &Path) -> Option<LeaseRecord> {
    let (dir, name) = (path.parent()?, path.file_name()?.to_str()?);
    let record: LeaseRecord = taskdir::read_json(dir, name).ok().flatten()?;
    (record.boot_id == boot_id()).then_some(record)
}

/// Writes a lease file atomically.
pub fn write(path: &Path, record: &LeaseRecord) -> Result<(), FileError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or(LEASE);
    taskdir::write_json(dir, name, record)
}

/// A lease that expired: what to record and how long the task gets after SIGTERM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    pub error: String,
    pub grace: Duration,
}

/// The supervisor's watch over its task's lease.
#[derive(Debug)]
pub struct Watch {
    lease_file: PathBuf,
    check_at: Instant,
}

impl Watch {
    /// The watch of a fenced task (`None`: the task has no lease, e.g. a standalone worker's).
    pub fn open(task_dir: &Path) -> Option<Watch> {
        let fence: FenceRecord = taskdir::read_json(task_dir, FENCE).ok().flatten()?;
        // Checked at once: a lease that expired before the task started ends it right away.
        Some(Watch { lease_file: fence.lease_file, check_at: Instant::now() })
    }

    /// When the lease must be read again.
    pub fn next_check(&self) -> Instant {
        self.check_at
    }

    /// Reads the lease when due. `Some` once it has expired without renewal (a missing or
    /// unreadable lease file counts as expired: nobody renews it).
    pub fn poll(&mut self, now: Instant) -> Option<Expired> {
        if now < self.check_at {
            return None;
        }
        let Some(lease) = read(&self.lease_file) else {
            let error = "lost contact with the controller (the worker's lease file is gone)".to_string();
            return Some(Expired { error, grace: Duration::ZERO });
        };
        let left = lease.expires_ms() - boottime_ms();
        if left > 0 {
            self.check_at = now + Duration::from_millis(left as u64);
            return None;
        }
        Some(Expired { error: lost_contact(lease.lease_ms), grace: kill_grace(Duration::from_millis(lease.lease_ms)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewed_lease_holds_and_an_expired_one_ends_the_task() {
        let dir = tempfile::tempdir().unwrap();
        let lease_file = dir.path().join(LEASE);
        let task = dir.path().join("task");
        std::fs::create_dir(&task).unwrap();
        assert!(Watch::open(&task).is_none(), "no fence.json: no lease");
        taskdir::write_json(&task, FENCE, &FenceRecord { lease_file: lease_file.clone() }).unwrap();
        let mut w = Watch::open(&task).unwrap();
        // No lease file at all: nobody renews it.
        assert!(w.poll(Instant::now()).is_some());

        let record = |renewed_ms, lease_ms| LeaseRecord { renewed_ms, lease_ms, boot_id: boot_id() };
        write(&lease_file, &record(boottime_ms(), 60_000)).unwrap();
        assert_eq!(w.poll(Instant::now()), None);
        assert!(w.next_check() > Instant::now() + Duration::from_secs(50));
        // Not due yet: the file is not even read.
        assert_eq!(w.poll(Instant::now()), None);

        write(&lease_file, &record(boottime_ms() - 2_000, 1_500)).unwrap();
        let expired = w.poll(w.next_check()).unwrap();
        assert_eq!(expired.error, "lost contact with the controller for 1.5 s");
        assert_eq!(expired.grace, Duration::from_millis(375));
        // A record of another boot is no lease at all.
        let other_boot = LeaseRecord { boot_id: "another boot".into(), ..record(boottime_ms(), 60_000) };
        write(&lease_file, &other_boot).unwrap();
        assert_eq!(read(&lease_file), None);
    }

    #[test]
    fn the_default_lease_fits_the_default_worker_timeout() {
        let (lease, timeout) = (Duration::from_secs(30), Duration::from_secs(60));
        assert!(check_against_worker_timeout(lease, timeout).is_ok());
        let e = check_against_worker_timeout(lease, Duration::from_secs(30)).unwrap_err();
        assert!(e.contains("worker timeout"), "{e}");
        assert!(check_against_worker_timeout(Duration::from_millis(1500), Duration::from_secs(3)).is_ok());
    }

    #[test]
    fn the_fence_covers_the_lease_and_the_kill() {
        assert_eq!(kill_grace(Duration::from_secs(30)), Duration::from_secs(5));
        assert_eq!(fence(Duration::from_secs(30)), Duration::from_millis(35_250));
        assert_eq!(lost_contact(30_000), "lost contact with the controller for 30 s");
    }
}
