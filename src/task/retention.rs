//! What is kept of finished tasks, and for how long.
//!
//! A finished task's workdir goes after `workdir_retention` (it holds outputs, such as an Iris
//! entrypoint's `_result.pkl`, so the default period is long); the whole task — every
//! attempt's directory with its log, and the worker's record of it — goes once it is older
//! than `retain_for` or not among the newest `retain_finished` finished tasks, as kubelet
//! garbage-collects dead containers by age and count. Without that, memory and disk grow with
//! every task a worker ever ran.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{Inner, lock};
use crate::taskdir;
use iris_wire::clock::now_ms;

use crate::taskdir::TRASH;

/// Starts the janitor, when something is to be removed at all.
pub(super) fn spawn_janitor(inner: &Arc<Inner>) {
    let config = &inner.config;
    let bounds = &config.bounds;
    if config.workdir_retention.is_none() && bounds.retain_for.is_none() && bounds.retain_finished.is_none() {
        return;
    }
    let shortest = [config.workdir_retention, bounds.retain_for].into_iter().flatten().min();
    let period =
        shortest.map_or(Duration::from_secs(1), |d| d / 4).clamp(Duration::from_millis(200), Duration::from_secs(60));
    let weak = Arc::downgrade(inner);
    inner.background.spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            let Some(inner) = weak.upgrade() else { return };
            let trash = remove_finished_tasks(&inner);
            let workdirs = due_workdirs(&inner);
            drop(inner);
            if trash.is_empty() && workdirs.is_empty() {
                continue;
            }
            let _ = tokio::task::spawn_blocking(move || {
                for dir in workdirs.iter().chain(&trash) {
                    if let Err(e) = std::fs::remove_dir_all(dir)
                        && e.kind() != std::io::ErrorKind::NotFound
                    {
                        tracing::warn!(dir = %dir.display(), error = %e, "removing a finished task's files");
                    }
                }
            })
            .await;
        }
    });
}

/// Workdirs of tasks that finished more than `workdir_retention` ago.
fn due_workdirs(inner: &Inner) -> Vec<PathBuf> {
    let Some(retention) = inner.config.workdir_retention else { return Vec::new() };
    let cutoff = now_ms() - retention.as_millis() as i64;
    lock(&inner.tasks)
        .values()
        .flatten()
        .filter(|a| a.finished_at_ms().is_some_and(|t| t <= cutoff))
        .map(|a| a.dir.join(taskdir::WORKDIR))
        .filter(|w| w.exists())
        .collect()
}

/// Forgets the finished tasks past `retain_for` or beyond the newest `retain_finished`, and
/// moves their directories to the trash; returns the trash paths to delete.
///
/// The task table stays locked until the directories are out of `tasks/`: a RunTask for the
/// same task and attempt (new once the old record is gone) waits for the rename, so it never
/// makes its directory where the old one still is, to have it renamed into the trash and
/// deleted under it (and `store::create` refuses a directory that exists). A task whose
/// directory cannot be moved (a mount below it) stays, to be tried again.
fn remove_finished_tasks(inner: &Inner) -> Vec<PathBuf> {
    let bounds = &inner.config.bounds;
    if bounds.retain_for.is_none() && bounds.retain_finished.is_none() {
        return Vec::new();
    }
    let cutoff = bounds.retain_for.map(|d| now_ms() - d.as_millis() as i64);
    let mut tasks = lock(&inner.tasks);
    // Finished: every attempt has ended. By the end of the current attempt, newest first.
    let mut finished: Vec<(i64, String)> = tasks
        .iter()
        .filter_map(|(id, attempts)| {
            let ended = attempts.iter().map(|a| a.finished_at_ms()).collect::<Option<Vec<i64>>>()?;
            Some((ended.last().copied()?, id.clone()))
        })
        .collect();
    finished.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let keep = bounds.retain_finished.unwrap_or(usize::MAX);
    let due: Vec<String> = finished
        .iter()
        .enumerate()
        .filter(|(i, (ended, _))| *i >= keep || cutoff.is_some_and(|c| *ended <= c))
        .map(|(_, (_, id))| id.clone())
        .collect();
    if due.is_empty() {
        return Vec::new();
    }
    let trash_root = inner.config.state_dir.join(TRASH);
    if let Err(e) = taskdir::make_private_dir(&trash_root) {
        tracing::warn!(dir = %trash_root.display(), error = %e, "creating the trash");
        return Vec::new();
    }
    // An image task's rootfs is unmounted by its supervisor; one it could not unmount gets
    // another try, then the mounts are read once for every directory.
    for id in &due {
        for a in tasks.get(id).into_iter().flatten() {
            let _ = crate::env::image::unmount(&a.dir);
        }
    }
    let mounts = mount_points();
    let mut trash = Vec::new();
    for id in due {
        let attempts = tasks.get(&id).cloned().unwrap_or_default();
        if let Some(a) = attempts.iter().find(|a| has_mount_below(&a.dir, &mounts)) {
            tracing::warn!(dir = %a.dir.display(), "a finished task stays: something is still mounted below it");
            continue;
        }
        tasks.remove(&id);
        for a in attempts {
            tracing::info!(task_id = %a.meta.task_id, attempt = a.meta.attempt_id, "removing a finished task");
            match move_to_trash(&a.dir, &trash_root) {
                Ok(Some(t)) => trash.push(t),
                Ok(None) => {}
                Err(e) => tracing::warn!(dir = %a.dir.display(), error = %e, "moving a finished task to the trash"),
            }
        }
    }
    drop(tasks);
    trash
}

/// Renames `dir` into `trash_root` under a short name of its own (`None` if it is gone
/// already): a task's key may be up to 255 bytes, and a name made from it would not fit.
fn move_to_trash(dir: &Path, trash_root: &Path) -> std::io::Result<Option<PathBuf>> {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    if !dir.exists() {
        return Ok(None);
    }
    let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let target = trash_root.join(format!("{:x}-{}-{n}", now_ms(), std::process::id()));
    std::fs::rename(dir, &target)?;
    Ok(Some(target))
}

/// Every mount point of this process's mount namespace.
fn mount_points() -> Option<Vec<PathBuf>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    Some(info.lines().filter_map(|l| l.split(' ').nth(4)).map(PathBuf::from).collect())
}

/// Whether something is mounted at or below `dir` (deleting through a mount would delete
/// what it shows); true when the mounts could not be read.
fn has_mount_below(dir: &Path, mounts: &Option<Vec<PathBuf>>) -> bool {
    mounts.as_ref().is_none_or(|m| m.iter().any(|m| m.starts_with(dir)))
}

/// Deletes what a previous run left in the trash (it stopped mid-delete).
pub(super) fn empty_trash(state_dir: &Path) {
    let trash = state_dir.join(TRASH);
    if let Err(e) = std::fs::remove_dir_all(&trash)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %trash.display(), error = %e, "emptying the trash");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trash_name_is_short_and_unique_whatever_the_task_key() {
        let state = tempfile::tempdir().unwrap();
        let trash = state.path().join(TRASH);
        taskdir::make_private_dir(&trash).unwrap();
        // The longest key validation allows: 255 bytes.
        let key = format!("{}.0", "k".repeat(253));
        let mut moved = Vec::new();
        for _ in 0..2 {
            let dir = state.path().join(&key);
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("log"), "x").unwrap();
            let to = move_to_trash(&dir, &trash).unwrap().expect("moved");
            assert!(!dir.exists());
            assert!(to.file_name().unwrap().len() <= 64, "{}", to.display());
            assert_eq!(std::fs::read_to_string(to.join("log")).unwrap(), "x");
            moved.push(to);
        }
        assert_ne!(moved[0], moved[1], "two removals of one key in the same millisecond");
        assert_eq!(move_to_trash(&state.path().join(&key), &trash).unwrap(), None, "gone already");
    }
}
