//! The worker's side of the controller lease ([`crate::supervisor::lease`] has the whole
//! story): renewed when the controller answers a heartbeat, whatever the wire
//! ([`super::TaskManager::heard_from_controller`]); written to `<state-dir>/lease.json`, which
//! each fenced task's supervisor reads; a gate that keeps a task from starting until the worker
//! holds the lease and the controller says it still means the attempt; and a watch that ends,
//! when the lease lapses, the attempts no supervisor runs yet.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::watch;

use super::{Inner, lock};
use crate::supervisor::lease::{self as fence, FenceRecord, LeaseRecord};
use crate::taskdir::FileError;

/// Which attempt a [`ControllerCheck`] asks about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptOf {
    /// The job the task belongs to.
    pub job_id: String,
    /// The task's index within its job.
    pub task_index: i32,
    /// The task's id (the wire's `task_id`).
    pub task_id: String,
    /// The attempt's number: a higher one supersedes a lower.
    pub attempt_id: i32,
}

/// Asks the controller whether it still means an attempt to run on this worker: `Some(true)`
/// yes (or the controller cannot tell: it serves no such question), `Some(false)` no (it ran
/// the task elsewhere, or never sent it), `None` when it could not be asked. Whoever speaks to
/// the controller provides it (the heartbeat, whatever wire).
pub type ControllerCheck = Arc<dyn Fn(AttemptOf) -> Pin<Box<dyn Future<Output = Option<bool>> + Send>> + Send + Sync>;

/// A worker's lease.
pub(crate) struct Lease {
    file: PathBuf,
    length: Duration,
    /// When it expires (CLOCK_BOOTTIME ms; 0: never held).
    expires: watch::Sender<i64>,
    pub(crate) check: OnceLock<ControllerCheck>,
}

impl Lease {
    /// The lease of the worker on `state_dir`. A restarted worker carries on with the lease its
    /// previous run held: the supervisors of its tasks have enforced it meanwhile.
    pub(crate) fn open(state_dir: &Path, length: Duration) -> Lease {
        let file = state_dir.join(fence::LEASE);
        let expires = fence::read(&file).map(|r| r.expires_ms()).unwrap_or(0);
        Lease { file, length, expires: watch::channel(expires).0, check: OnceLock::new() }
    }

    /// The controller answered a heartbeat sent at `sent_ms` (CLOCK_BOOTTIME): the lease runs
    /// until `sent_ms` + its length. Written to the file before anything may rely on it.
    pub(crate) fn renew(&self, sent_ms: i64) -> Result<(), FileError> {
        let lease_ms = self.length.as_millis() as u64;
        let record = LeaseRecord { renewed_ms: sent_ms, lease_ms, boot_id: fence::boot_id() };
        let expires = record.expires_ms();
        if expires <= *self.expires.borrow() {
            return Ok(());
        }
        fence::write(&self.file, &record)?;
        self.expires.send_replace(expires);
        Ok(())
    }

    pub(crate) fn valid(&self) -> bool {
        *self.expires.borrow() > fence::boottime_ms()
    }

    /// Returns once the lease is held.
    pub(crate) async fn wait_valid(&self) {
        let mut rx = self.expires.subscribe();
        while !self.valid() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// What puts a task under this lease (its `fence.json`).
    pub(crate) fn fence_record(&self) -> FenceRecord {
        FenceRecord { lease_file: self.file.clone() }
    }

    /// How long after a heartbeat's send the worker's tasks are surely gone if the
    /// controller answers no later one (what the controller is told to wait).
    pub(crate) fn fence(&self) -> Duration {
        fence::fence(self.length)
    }
}

/// Watches the lease: when it lapses, every attempt accepted while it was held and not ended
/// is killed as a worker failure (the supervisors end the running ones on their own; this
/// also ends those still PENDING or BUILDING in the worker). Attempts accepted after it
/// lapsed wait at the gate for the next renewal instead.
pub(super) fn spawn_watch(inner: &Arc<Inner>) {
    let Some(lease) = inner.lease.as_ref() else { return };
    let mut rx = lease.expires.subscribe();
    let error = fence::lost_contact(lease.length.as_millis() as u64);
    // The supervisors' own grace: a kill from here must not end a task later than theirs.
    let grace_ms = fence::kill_grace(lease.length).as_millis() as u64;
    let weak = Arc::downgrade(inner);
    inner.background.spawn(async move {
        let mut ended_at = 0;
        loop {
            let expires = *rx.borrow_and_update();
            let left = expires - fence::boottime_ms();
            if left > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(left as u64)) => {}
                    changed = rx.changed() => if changed.is_err() { return },
                }
                continue;
            }
            if expires > ended_at {
                ended_at = expires;
                let Some(inner) = weak.upgrade() else { return };
                let held: Vec<_> = lock(&inner.tasks)
                    .values()
                    .flatten()
                    .filter(|a| a.accepted_boottime_ms < expires && !a.state().is_terminal())
                    .cloned()
                    .collect();
                if !held.is_empty() {
                    tracing::warn!(tasks = held.len(), "{error}: ending this worker's tasks");
                }
                for a in held {
                    let _ended = a.request_kill_for(&inner, grace_ms, Some(error.clone()));
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
}
