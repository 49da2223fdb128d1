//! The worker's on-disk state: `tasks/<task-key>/` per attempt, with `task.json` (the worker's
//! record of the attempt) next to the supervisor's files.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::taskdir::tasks_dir;
use crate::taskdir::{self, FileError};

pub use crate::taskdir::{ENDED, REQUEST, TASK};

/// What the worker records about an attempt when it accepts it (read back after a restart).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TaskMeta {
    /// The task's id (the wire's `task_id`).
    pub task_id: String,
    /// The job the task belongs to.
    pub job_id: String,
    /// The task's index within its job.
    pub task_index: i32,
    /// How many tasks its job has.
    pub num_tasks: i32,
    /// The attempt's number: a higher one supersedes a lower.
    pub attempt_id: i32,
    /// The host ports allocated to it, by name.
    pub ports: BTreeMap<String, u16>,
    /// Seconds it may run, if limited.
    pub timeout_s: Option<u64>,
    /// When the worker accepted the attempt (Unix ms).
    pub created_at_ms: i64,
    /// The cgroup path of the task (stats are read from it while it runs).
    pub cgroup: Option<String>,
    /// The bundle the task runs from (a worker that adopts the task holds it in the cache).
    #[serde(default)]
    pub bundle: Option<String>,
    /// The newest Iris wire's attempt uid: a restarted worker finds the attempt by it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_uid: Option<String>,
    /// The attempt has a TPU: a failure with a bad-node signature is the host's, not the task's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tpu: bool,
}

/// How an attempt ended that no supervisor recorded: killed while PENDING or BUILDING, its
/// preparation failed, its bundle was refused, its supervisor could not be spawned or died
/// without an exit record. Written before anyone hears of the end, so a restarted worker finds
/// the attempt terminal as it was reported (it would otherwise take it for one accepted and
/// never started, and run it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndRecord {
    /// Its state.
    pub state: super::TaskState,
    /// The command's exit code, when it exited.
    pub exit_code: i32,
    /// Why it failed or was killed, for people.
    pub error: String,
    /// When it ended (Unix ms; 0 while it lasts).
    pub finished_at_ms: i64,
}

/// Writes `dir/ended.json` (atomically, root's only), in the room a kill request left unused
/// when there is some: the end of an attempt is recorded even on a full disk.
pub fn record_end(dir: &Path, record: &EndRecord) -> Result<(), FileError> {
    taskdir::move_reservation(dir, taskdir::KILL, ENDED);
    taskdir::write_json(dir, ENDED, record)
}

/// The end the worker recorded for the attempt in `dir`, if it did.
pub fn recorded_end(dir: &Path) -> Option<EndRecord> {
    match taskdir::read_json::<EndRecord>(dir, ENDED) {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "reading a task's end record");
            None
        }
    }
}

/// A directory name for a task id: `[A-Za-z0-9-]` kept, every other byte as `_XX`. Valid as a
/// file name, a cgroup name and a libcontainer id; distinct ids never collide.
pub fn escape(task_id: &str) -> String {
    let mut out = String::with_capacity(task_id.len());
    for b in task_id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    out
}

/// The key of an attempt: escaped task id, a dot, the attempt id.
pub fn task_key(task_id: &str, attempt_id: i32) -> String {
    format!("{}.{attempt_id}", escape(task_id))
}

/// The key of an attempt that may carry an attempt uid (the newest wire): the uid, escaped,
/// follows, since one task and attempt id can come back under a fresh uid.
pub fn attempt_key(task_id: &str, attempt_id: i32, attempt_uid: Option<&str>) -> String {
    match attempt_uid {
        Some(uid) => format!("{}.{}", task_key(task_id, attempt_id), escape(uid)),
        None => task_key(task_id, attempt_id),
    }
}

/// Creates an attempt's directory with its `task.json` and `request.pb`, and gives its log
/// its cap (every writer of the log, the task's supervisor and its build's, reads it there);
/// or nothing: a failure half-way (a full disk) removes what it made. A directory that exists
/// already is refused (an `AlreadyExists` error), never reused: it holds another attempt's
/// files (one the retention could not move away, say).
pub fn create(
    state_dir: &Path,
    meta: &TaskMeta,
    raw_request: &[u8],
    log_cap: Option<u64>,
) -> Result<PathBuf, FileError> {
    let dir = tasks_dir(state_dir).join(attempt_key(&meta.task_id, meta.attempt_id, meta.attempt_uid.as_deref()));
    taskdir::create(&dir, raw_request)?;
    let made = match log_cap {
        Some(cap) => crate::logs::set_cap(&dir.join(taskdir::LOGS), cap).map_err(|e| FileError::Io {
            op: "writing the log's cap in",
            path: dir.join(taskdir::LOGS),
            source: std::io::Error::other(e.to_string()),
        }),
        None => Ok(()),
    }
    .and_then(|()| taskdir::write_json(&dir, TASK, meta));
    if let Err(e) = made {
        let _ = fs::remove_dir_all(&dir);
        return Err(e);
    }
    // A kill request must reach the supervisor even after the task filled the disk.
    if let Err(e) = taskdir::reserve(&dir, taskdir::KILL, taskdir::SMALL_RESERVE) {
        tracing::warn!(dir = %dir.display(), error = %e, "setting room aside for a kill request");
    }
    Ok(dir)
}

/// Every attempt directory with a readable `task.json`, oldest first.
pub fn scan(state_dir: &Path) -> Vec<(PathBuf, TaskMeta)> {
    let Ok(entries) = fs::read_dir(tasks_dir(state_dir)) else { return Vec::new() };
    let mut out: Vec<(PathBuf, TaskMeta)> = entries
        .flatten()
        .filter_map(|e| {
            let dir = e.path();
            match taskdir::read_json::<TaskMeta>(&dir, TASK) {
                Ok(Some(meta)) => Some((dir, meta)),
                Ok(None) => None,
                Err(err) => {
                    tracing::warn!(dir = %dir.display(), error = %err, "skipping an unreadable task directory");
                    None
                }
            }
        })
        .collect();
    out.sort_by_key(|(_, m)| (m.created_at_ms, m.attempt_id));
    out
}

/// Writes the workdir files of a request below `workdir`, refusing any path that would leave it.
pub fn write_workdir_files(workdir: &Path, files: &[(String, Vec<u8>)]) -> Result<(), FileError> {
    for (rel, content) in files {
        let path = workdir.join(rel);
        let io = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| FileError::Io { op, path, source }
        };
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io("creating", parent))?;
        }
        // Never follow a symlink planted in the workdir: create_new fails on any existing path.
        let mut f = fs::OpenOptions::new().write(true).create_new(true).open(&path).map_err(io("creating", &path))?;
        std::io::Write::write_all(&mut f, content).map_err(io("writing", &path))?;
    }
    Ok(())
}

/// Bytes used by the files below `dir` (stops counting after `limit` entries: a workdir with
/// millions of files must not stall a status call).
pub fn disk_usage(dir: &Path, limit: usize) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    let mut seen = 0;
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            seen += 1;
            if seen > limit {
                return total;
            }
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                stack.push(e.path());
            } else {
                total += std::os::unix::fs::MetadataExt::blocks(&md) * 512;
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_safe_and_distinct() {
        assert_eq!(task_key("job/task-0", 2), "job_2ftask-0.2");
        assert_ne!(escape("a/b"), escape("a_2fb"));
        assert!(escape("../x").chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
    }

    fn meta(task_id: &str) -> TaskMeta {
        TaskMeta {
            task_id: task_id.into(),
            job_id: "j".into(),
            task_index: 0,
            num_tasks: 1,
            attempt_id: 0,
            ports: BTreeMap::new(),
            timeout_s: None,
            created_at_ms: 1,
            cgroup: None,
            bundle: None,
            attempt_uid: None,
            tpu: false,
        }
    }

    #[test]
    fn create_refuses_a_directory_that_exists_and_leaves_it_alone() {
        let state = tempfile::tempdir().unwrap();
        fs::create_dir(tasks_dir(state.path())).unwrap();
        let dir = create(state.path(), &meta("j/t"), b"first", None).unwrap();
        fs::write(dir.join(taskdir::WORKDIR).join("out"), "the first attempt's").unwrap();
        let err = create(state.path(), &meta("j/t"), b"second", None).unwrap_err();
        assert!(matches!(&err, FileError::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists));
        assert_eq!(fs::read(dir.join(REQUEST)).unwrap(), b"first");
        assert_eq!(fs::read_to_string(dir.join(taskdir::WORKDIR).join("out")).unwrap(), "the first attempt's");
    }

    #[test]
    fn workdir_files_do_not_follow_planted_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path().join("x"), dir.path().join("link")).unwrap();
        let err = write_workdir_files(dir.path(), &[("link".into(), b"x".to_vec())]);
        assert!(err.is_err());
        assert!(!outside.path().join("x").exists());
        write_workdir_files(dir.path(), &[("a/b.txt".into(), b"hi".to_vec())]).unwrap();
        assert_eq!(fs::read(dir.path().join("a/b.txt")).unwrap(), b"hi");
    }
}
