//! The state directory's layout on disk, and the one way its files are written.
//!
//! ```text
//! <state-dir>/                 0700   one worker per state directory
//!   worker.lock                       held (flock) by the worker that owns the directory
//!   cgroup-parent                     the cgroup the worker's task cgroups are made below
//!   lease.json                        the controller lease, renewed by the worker
//!   iris-wire                         the wire generation the controller last answered
//!   credentials/worker.jwt 0700/0600  newest wire: the worker token as last renewed (join::token)
//!   trash/                            removed tasks' directories, deleted in the background
//!   tasks/                     0700   a directory per attempt (the key: task/store.rs)
//!     <attempt-key>/           0700
//!       task.json              0600   the worker's record of the attempt (task::store)
//!       request.pb             0600   the request as received: a restarted worker runs it
//!       spec.json              0600   how to launch it (runtime::LaunchSpec), for the supervisor
//!       supervisor.pid                the supervisor's ProcessId
//!       started.json                  Started: the task's command runs
//!       kill.json              0600   KillRequest, from the worker (then SIGUSR1)
//!       exit.json              0600   ExitRecord, from the supervisor, once
//!       ended.json             0600   the worker's EndRecord of an attempt no supervisor ended
//!       fence.json                    the lease the task is under (with a controller)
//!       log.pushed                    newest wire: lines Iris's log service acknowledged
//!       .<name>.tmp                   room set aside for a record (see [`reserve`])
//!       supervisor.log                the supervisor's own diagnostics, made at its first line
//!       logs/                         the task's log and its line index; with a cap: cap,
//!                                     dropped, tail.<first line>.{bin,idx} (format: `logs`)
//!       workdir/               0755   the task's /workdir
//!       tmp/                          the process runtime's /tmp
//!       build/                        a venv build step's own task directory
//!       setup/                        the newest wire's setup step's own task directory
//!       runtime/                      the container's OCI config (the bundle), libcontainer's state and
//!                                     its /etc files (hosts, resolv.conf), when the host has no tmpfs
//!                                     (runtime::container::state_root)
//!       rootfs/, overlay/             the image rootfs mount and its upper/work dirs
//!       run/rigging/secrets/   0700   newest wire: the task's secrets (0600 files), its /run
//! ```
//!
//! Each name is written here once, and each file has one writer: the supervisor writes
//! `supervisor.pid`, `started.json` and `exit.json`; the worker writes `spec.json`,
//! `kill.json`, `task.json`, `request.pb` and `ended.json`. Every record is written to a
//! temp name and renamed, so a reader never sees half a file, even if the writer is killed.

#![warn(missing_docs)]

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::cgroup::CgroupStats;

/// The lock of the worker that owns a state directory.
pub const STATE_LOCK: &str = "worker.lock";
/// The state directory's file naming the worker's parent cgroup.
pub const PARENT_CGROUP: &str = "cgroup-parent";
/// The state directory's controller lease, renewed by the worker.
pub const LEASE: &str = "lease.json";
/// The state directory's record of the wire generation the controller last answered.
pub const IRIS_WIRE: &str = "iris-wire";
/// The state directory's credentials kept by the worker (newest wire).
pub const CREDENTIALS: &str = "credentials";
/// ... the worker token as last renewed, in [`CREDENTIALS`].
pub const WORKER_TOKEN: &str = "worker.jwt";
/// Where a removed task's directories wait to be deleted: out of `tasks/`, so that a new
/// attempt with the same key never meets the old one's files, and a restart mid-delete never
/// adopts them.
pub const TRASH: &str = "trash";
/// The file in a task directory that puts the task under the lease.
pub const FENCE: &str = "fence.json";
/// Newest wire: the log lines of the attempt Iris's log service acknowledged.
pub const LOG_PUSHED: &str = "log.pushed";
/// The worker's record of the attempt (`task::store::TaskMeta`).
pub const TASK: &str = "task.json";
/// The request as received: a restarted worker prepares an accepted task from it.
pub const REQUEST: &str = "request.pb";
/// The worker's record of an attempt that ended with no `exit.json` behind it.
pub const ENDED: &str = "ended.json";
/// How to launch the task (`runtime::LaunchSpec`), from the worker for the supervisor.
pub const SPEC: &str = "spec.json";
/// The supervisor's [`ProcessId`].
pub const PID: &str = "supervisor.pid";
/// [`Started`]: the task's command runs.
pub const STARTED: &str = "started.json";
/// [`KillRequest`], from the worker.
pub const KILL: &str = "kill.json";
/// [`ExitRecord`], from the supervisor, once.
pub const EXIT: &str = "exit.json";
/// The task's log directory (its format: `logs`).
pub const LOGS: &str = "logs";
/// The task's /workdir.
pub const WORKDIR: &str = "workdir";
/// The supervisor's own diagnostics.
pub const SUPERVISOR_LOG: &str = "supervisor.log";
/// The process runtime's /tmp.
pub const TMP: &str = "tmp";
/// A venv build step's own task directory.
pub const BUILD: &str = "build";
/// The newest wire's setup step's own task directory.
pub const SETUP: &str = "setup";
/// The container's OCI config, in its bundle: the container's state root
/// (`runtime::container::state_root`), or gVisor's bundle directory.
pub const OCI_CONFIG: &str = "config.json";
/// The container's `/etc/hosts`, bound read-only; kept with the container's state
/// (`runtime::container::state_root`).
pub const HOSTS: &str = "hosts";
/// The container's `/etc/resolv.conf` when it has a network of its own with a way out; beside
/// [`HOSTS`].
pub const RESOLV_CONF: &str = "resolv.conf";
/// libcontainer's state.
pub const RUNTIME_STATE: &str = "runtime";
/// Where a task's image rootfs is mounted.
pub const ROOTFS: &str = "rootfs";
/// The rootfs overlay's upper and work directories.
pub const OVERLAY: &str = "overlay";
/// The task's `/run` when it has secrets: `rigging/secrets/<name>` files, root's only.
pub const RUN: &str = "run";
/// Where the secrets are below [`RUN`] (and below `/run` in the task: Iris's
/// `RIGGING_SECRETS_DIR`).
pub const SECRETS_BELOW_RUN: &str = "rigging/secrets";

/// Errors reading or writing the task directory's files.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// A file or directory could not be read, written or made.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done, e.g. "writing".
        op: &'static str,
        /// To which path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A record is not the JSON its reader expects (or could not be serialised).
    #[error("parsing {path}: {source}")]
    Parse {
        /// The record.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
}

impl FileError {
    /// What went wrong, without the path: for messages that leave the host (a task's error).
    pub fn reason(&self) -> String {
        match self {
            FileError::Io { op, source, .. } => format!("{op}: {source}"),
            FileError::Parse { source, .. } => format!("parsing: {source}"),
        }
    }
}

/// Room set aside for the exit record (an error message and the final figures fit easily).
pub const EXIT_RESERVE: u64 = 64 << 10;
/// Room set aside for a small record (`started.json`, `kill.json`).
pub const SMALL_RESERVE: u64 = 4 << 10;

/// Writes `value` as JSON to `dir/name` atomically (temp file + rename), readable by root
/// only: these files hold the task's command line and environment (secrets). When room was
/// set aside for it ([`reserve`]) the temp file is overwritten in place: no new blocks, so the
/// write lands even on a full disk.
pub fn write_json<T: Serialize>(dir: &Path, name: &str, value: &T) -> Result<(), FileError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let bytes = serde_json::to_vec_pretty(value).map_err(|source| FileError::Parse { path: path.clone(), source })?;
    let io_err = |op, path: &Path| {
        let path = path.to_path_buf();
        move |source| FileError::Io { op, path, source }
    };
    match fs::OpenOptions::new().write(true).open(&tmp) {
        Ok(f) if f.metadata().map(|m| m.len()).unwrap_or(0) >= bytes.len() as u64 => {
            use std::os::unix::fs::FileExt;
            f.set_permissions(fs::Permissions::from_mode(PRIVATE_FILE_MODE)).map_err(io_err("writing", &tmp))?;
            f.write_all_at(&bytes, 0).map_err(io_err("writing", &tmp))?;
            f.set_len(bytes.len() as u64).map_err(io_err("writing", &tmp))?;
        }
        _ => write_private(&tmp, &bytes).map_err(io_err("writing", &tmp))?,
    }
    fs::rename(&tmp, &path).map_err(io_err("renaming", &path))
}

/// Gives back the room set aside for `dir/name` when it was never used (the task ended
/// without that record).
pub fn release(dir: &Path, name: &str) {
    let _ = fs::remove_file(dir.join(format!(".{name}.tmp")));
}

/// Hands the room set aside for `from` (unused) to the next write of `to` (best effort).
pub fn move_reservation(dir: &Path, from: &str, to: &str) {
    let target = dir.join(format!(".{to}.tmp"));
    if !target.exists() {
        let _ = fs::rename(dir.join(format!(".{from}.tmp")), target);
    }
}

/// Sets `bytes` aside on disk for the next write of `dir/name` (its temp file, allocated
/// now, root's only), so that a record that must not be lost — how the task ended, a kill
/// request — is written even when the task has filled the disk since. Best effort: a
/// filesystem without `fallocate` gets a plain write later.
pub fn reserve(dir: &Path, name: &str, bytes: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let tmp = dir.join(format!(".{name}.tmp"));
    let f = fs::OpenOptions::new().create(true).write(true).truncate(false).mode(PRIVATE_FILE_MODE).open(&tmp)?;
    f.set_permissions(fs::Permissions::from_mode(PRIVATE_FILE_MODE))?;
    nix::fcntl::fallocate(f.as_raw_fd(), nix::fcntl::FallocateFlags::empty(), 0, bytes as i64).map_err(io::Error::from)
}

/// Mode of the files the worker and the supervisor write about a task (requests, specs,
/// records, logs): they may hold secrets, and only root reads them.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode of the directories that hold them (the state root, `tasks/`, each task's directory):
/// no other user may even look up a path below them, so nothing a task writes (a setuid
/// binary in its workdir) can be reached from the host by an unprivileged user.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Writes `bytes` to `path` (replacing it) as a file only root can read, whatever the umask
/// and whatever mode an earlier file of that name had.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(PRIVATE_FILE_MODE).open(path)?;
    f.set_permissions(fs::Permissions::from_mode(PRIVATE_FILE_MODE))?;
    f.write_all(bytes)
}

/// Creates `dir` (and missing parents) and makes it [`PRIVATE_DIR_MODE`], also when it existed
/// with a wider mode (a state root an operator made with `mkdir`).
pub fn make_private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(PRIVATE_DIR_MODE).create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(PRIVATE_DIR_MODE))
}

/// Reads `dir/name` as JSON; `Ok(None)` when it does not exist.
pub fn read_json<T: DeserializeOwned>(dir: &Path, name: &str) -> Result<Option<T>, FileError> {
    let path = dir.join(name);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|source| FileError::Parse { path, source }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(FileError::Io { op: "reading", path, source }),
    }
}

/// A process identity that survives pid reuse: the pid and its start time in clock ticks
/// since boot (field 22 of /proc/<pid>/stat).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessId {
    /// The pid.
    pub pid: i32,
    /// Its start time in clock ticks since boot.
    pub start_time: u64,
}

impl ProcessId {
    /// The identity of `pid` now, if it exists.
    pub fn of(pid: i32) -> Option<ProcessId> {
        let stat = procfs::process::Process::new(pid).and_then(|p| p.stat()).ok()?;
        Some(ProcessId { pid, start_time: stat.starttime })
    }

    /// True if this exact process still exists (and is not a zombie).
    pub fn is_alive(&self) -> bool {
        procfs::process::Process::new(self.pid)
            .and_then(|p| p.stat())
            .is_ok_and(|s| !matches!(s.state, 'Z' | 'X') && s.starttime == self.start_time)
    }
}

/// Why the supervisor killed the task.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KillReason {
    /// KillTask, a newer attempt, or a controller reset.
    Requested,
    /// The task ran past its `timeout_seconds`.
    Timeout,
    /// The task kept more on disk than its `resources.disk_bytes`.
    Disk,
    /// The worker lost contact with its controller for longer than its lease
    /// (`supervisor::lease`): the supervisor fenced the task off on its own.
    Fenced,
}

/// `kill.json`: the worker's request to end the task (then it sends SIGUSR1).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KillRequest {
    /// Time between SIGTERM and SIGKILL.
    pub grace_ms: u64,
    /// Set when the kill is the worker's own doing, not a request for the task (a controller
    /// reset): the attempt then ends WORKER_FAILED with this error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_failure: Option<String>,
}

/// `started.json`: the task's command is running.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Started {
    /// The task's first process, as the host sees it.
    pub pid: i32,
    /// When the command started (Unix ms).
    pub started_at_ms: i64,
}

/// `exit.json`: how the task ended, written once by the supervisor after the task's cgroup
/// is empty and before the cgroup is removed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExitRecord {
    /// When the command started (Unix ms), if it did.
    pub started_at_ms: Option<i64>,
    /// When the task's cgroup was found empty (Unix ms).
    pub finished_at_ms: i64,
    /// The exit status, when the task exited.
    pub exit_code: Option<i32>,
    /// The signal that ended the task, when one did.
    pub signal: Option<i32>,
    /// Why the task never ran (the runtime's error), when it did not.
    pub error: Option<String>,
    /// Why the supervisor killed the task, when it did.
    pub killed: Option<KillReason>,
    /// Why the task was killed for a reason of the worker's, not the task's or a user's (lost
    /// contact with the controller, a controller reset): the attempt is WORKER_FAILED.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_failure: Option<String>,
    /// The final cgroup figures (peak memory, CPU time, OOM kills).
    pub stats: CgroupStats,
    /// The processes the OOM killer chose, as `name (pid N)`, when the kernel's log says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub oom_victims: Vec<String>,
    /// When the task was killed for its disk use: (its limit, what it held), in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<(u64, u64)>,
}

/// Makes an attempt's directory: root's alone, with an empty workdir (0755: what the task
/// sees at /workdir) and `request.pb`. An existing directory is refused (`AlreadyExists`),
/// never reused: it holds another attempt's files. On failure nothing is left behind.
pub fn create(dir: &Path, raw_request: &[u8]) -> Result<(), FileError> {
    let io = |op, path: &Path| {
        let path = path.to_path_buf();
        move |source| FileError::Io { op, path, source }
    };
    fs::DirBuilder::new().mode(PRIVATE_DIR_MODE).create(dir).map_err(io("creating", dir))?;
    let request = dir.join(REQUEST);
    let made = fs::set_permissions(dir, fs::Permissions::from_mode(PRIVATE_DIR_MODE))
        .and_then(|()| fs::create_dir(dir.join(WORKDIR)))
        .map_err(io("creating", dir))
        .and_then(|()| write_private(&request, raw_request).map_err(io("writing", &request)));
    if made.is_err() {
        let _ = fs::remove_dir_all(dir);
    }
    made
}

/// Writes a task's secrets as files in `dir/run/rigging/secrets/`, directories 0700 and files
/// 0600, root's only (the task reads them as root in its container). Returns the `run`
/// directory. The names are file names (the wire layer checked them).
pub fn write_secrets<'a>(
    dir: &Path,
    secrets: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<PathBuf, FileError> {
    let run = dir.join(RUN);
    let secrets_dir = run.join(SECRETS_BELOW_RUN);
    make_private_dir(&secrets_dir).map_err(|source| FileError::Io {
        op: "creating",
        path: secrets_dir.clone(),
        source,
    })?;
    for (name, value) in secrets {
        let path = secrets_dir.join(name);
        write_private(&path, value.as_bytes()).map_err(|source| FileError::Io { op: "writing", path, source })?;
    }
    Ok(run)
}

/// Removes what preparing a task wrote into its directory (its launch spec, container
/// config and state, build step, rootfs dirs, /tmp, and the workdir's files), keeping its
/// record, request and log, so that it can be prepared again.
pub fn clear_preparation(dir: &Path) {
    let _ = fs::remove_file(dir.join(SPEC));
    for name in [RUNTIME_STATE, BUILD, SETUP, TMP, ROOTFS, OVERLAY, RUN] {
        let _ = fs::remove_dir_all(dir.join(name));
    }
    let workdir = dir.join(WORKDIR);
    let _ = fs::remove_dir_all(&workdir);
    if let Err(e) = fs::create_dir_all(&workdir) {
        tracing::warn!(dir = %workdir.display(), error = %e, "recreating a task's workdir");
    }
}

/// The `tasks/` directory of a state root: a directory per attempt, which the worker and the
/// attempt's supervisor write (here, below both, since the cache janitor watches its disk too).
pub fn tasks_dir(state_dir: &Path) -> std::path::PathBuf {
    state_dir.join("tasks")
}
