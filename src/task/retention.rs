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
use std::time::Duration;

use super::attempt::Attempt;
use super::{Inner, lock};
use crate::supervisor::files::{self, now_ms};

/// Where a removed task's directories wait to be deleted: out of `tasks/`, so that a new
/// attempt with the same key never meets the old one's files, and a restart mid-delete never
/// adopts them.
pub(super) const TRASH: &str = "trash";

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
    tokio::spawn(async move {
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
        .map(|a| a.dir.join(files::WORKDIR))
        .filter(|w| w.exists())
        .collect()
}

/// Forgets the finished tasks past `retain_for` or beyond the newest `retain_finished`, and
/// moves their directories to the trash; returns the trash paths to delete.
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
    let mut gone: Vec<Arc<Attempt>> = Vec::new();
    for (i, (ended, id)) in finished.iter().enumerate() {
        if i >= keep || cutoff.is_some_and(|c| *ended <= c) {
            gone.extend(tasks.remove(id).unwrap_or_default());
        }
    }
    drop(tasks);
    let trash_root = inner.config.state_dir.join(TRASH);
    let mut trash = Vec::new();
    for a in gone {
        tracing::info!(task_id = %a.meta.task_id, attempt = a.meta.attempt_id, "removing a finished task");
        match move_to_trash(&a.dir, &trash_root) {
            Ok(Some(t)) => trash.push(t),
            Ok(None) => {}
            Err(e) => tracing::warn!(dir = %a.dir.display(), error = %e, "moving a finished task to the trash"),
        }
    }
    trash
}

/// Renames `dir` into `trash_root` (`None` if it is gone already). A directory with a mount
/// below it (an image rootfs whose unmount failed) stays where it is: deleting through a
/// mount would delete what it shows.
fn move_to_trash(dir: &Path, trash_root: &Path) -> std::io::Result<Option<PathBuf>> {
    if !dir.exists() {
        return Ok(None);
    }
    let _ = crate::env::image::unmount(dir);
    if has_mount_below(dir) {
        return Err(std::io::Error::other("something is still mounted below it"));
    }
    files::make_private_dir(trash_root)?;
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let target = trash_root.join(format!("{name}.{}", now_ms()));
    std::fs::rename(dir, &target)?;
    Ok(Some(target))
}

fn has_mount_below(dir: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return true };
    info.lines().filter_map(|l| l.split(' ').nth(4)).any(|m| Path::new(m).starts_with(dir))
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
