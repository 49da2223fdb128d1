//! The task manager's edges to the operating system, each behind a small trait: the cgroup
//! filesystem ([`Cgroups`]), the supervisor processes ([`Spawner`]) and time ([`Clock`]).
//!
//! The manager holds one `Arc<dyn …>` of each ([`Seams`]); production uses [`Seams::real`],
//! whose methods are the calls the manager made directly before: no extra syscall, a vtable
//! call each, and per attempt two small boxed futures (the supervisor's ready and exit waits,
//! next to a fork and exec). The unit tests of the state machine (`task::tests`) swap in the in-memory
//! fakes of `task::fake`, as youki's unit tests go through its `Syscall` trait; the same paths
//! run for real in tests/containers.rs (limits, kills, timeouts, adoption), tests/shared_host.rs
//! (kill -9 and restart in each state) and tests/cluster.rs.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{ManagerConfig, TaskError, store};
use crate::cgroup::{CgroupError, CgroupStats, Layout, StatsCache};
use crate::runtime::RuntimeKind;
use crate::supervisor::handle::{self as supervise, Ready, Supervisor};

/// A future the seams hand back (one per attempt at most, next to a process spawn).
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The cgroups of the worker's tasks: the worker's parent cgroup, and reading, killing and
/// removing a task's cgroup (its supervisor's runtime creates it).
pub(crate) trait Cgroups: Send + Sync {
    /// Prepares the host's shared directory (cgroup ledger, port locks) and creates the
    /// worker's parent cgroup; `None` when tasks run without cgroups.
    fn prepare_parent(&self, config: &ManagerConfig) -> Result<Option<(Layout, String)>, TaskError>;
    /// A reading of the task cgroup `path` of `layout`, if it can be read, through the
    /// attempt's `kept` files (opened at its first reading).
    fn stats(&self, layout: &Layout, path: &str, kept: &StatsCache) -> Option<CgroupStats>;
    /// Kills every process in the task cgroup `path` (a dead supervisor's leftovers).
    fn kill_all(&self, path: &str);
    /// Removes the (empty) task cgroup `path`.
    fn remove(&self, path: &str);
}

/// The supervisors of the worker's tasks: start one, find one a previous worker started, ask
/// it to act on the task's `kill.json`, and observe its exit.
pub(crate) trait Spawner: Send + Sync {
    /// Starts `exe supervise <dir>`; the future says whether it started the command.
    fn spawn(&self, exe: &Path, dir: &Path) -> io::Result<(Supervisor, BoxFuture<Ready>)>;
    /// The supervisor recorded in `dir`, if it still runs.
    fn find(&self, dir: &Path) -> Option<Supervisor>;
    /// Tells `sup` to act on the `kill.json` already written (SIGTERM, SIGKILL after its grace).
    fn deliver_kill(&self, sup: &Supervisor);
    /// Resolves once `sup` has exited (and reaps it when it is the worker's child).
    fn wait_exit(&self, sup: Supervisor) -> BoxFuture<io::Result<()>>;
    /// Supervisors running for directories below `dir`, by their command line (also those
    /// that have not recorded themselves yet).
    fn running_under(&self, dir: &Path) -> Vec<(i32, PathBuf)>;
}

/// Time as the task manager sees it.
pub(crate) trait Clock: Send + Sync {
    /// Wall-clock Unix milliseconds (the times a task's status reports).
    fn now_ms(&self) -> i64;
    /// A monotonic instant (the resource history's intervals).
    fn now(&self) -> Instant;
    /// Resolves after `d`.
    fn sleep(&self, d: Duration) -> BoxFuture<()>;
}

/// The seams a task manager runs over.
#[derive(Clone)]
pub(crate) struct Seams {
    pub(crate) cgroups: Arc<dyn Cgroups>,
    pub(crate) spawner: Arc<dyn Spawner>,
    pub(crate) clock: Arc<dyn Clock>,
}

impl Seams {
    /// The host's cgroups, real supervisor processes, the system clock.
    pub(crate) fn real() -> Seams {
        Seams { cgroups: Arc::new(HostCgroups), spawner: Arc::new(Supervisors), clock: Arc::new(SystemClock) }
    }
}

/// The host's cgroup filesystem.
pub(crate) struct HostCgroups;

impl Cgroups for HostCgroups {
    /// Finds the host's cgroups and creates the worker's parent cgroup
    /// (`<task root>/iris-worker/<worker-id>`, the task root being our own cgroup on v1 and its
    /// parent on v2: see [`Layout::task_root`]). Containers need cgroups; the process runtime
    /// runs without them when the host has none it may use.
    fn prepare_parent(&self, config: &ManagerConfig) -> Result<Option<(Layout, String)>, TaskError> {
        // The host's shared directory (cgroup ledger, port locks) is root's alone, also when
        // an older worker left it open: other users could flock its files and stall us.
        let run_dir = Path::new(crate::cachelock::HOST_RUN_DIR);
        crate::cachelock::private_host_run_dir().map_err(|source| {
            TaskError::File(crate::taskdir::FileError::Io { op: "creating", path: run_dir.to_path_buf(), source })
        })?;
        let attempt = || -> Result<(Layout, String), CgroupError> {
            let layout = Layout::detect()?;
            let base = layout.task_root()?;
            let parent = format!(
                "{}/{}/{}",
                base.trim_end_matches('/'),
                crate::cgroup::ROOT_NAME,
                store::escape(&config.env.worker_id)
            );
            layout.prepare_parent(&parent)?;
            Ok((layout, parent))
        };
        match attempt() {
            Ok(found) => Ok(Some(found)),
            Err(e) if config.runtime == RuntimeKind::Process => {
                tracing::warn!(error = %e, "no usable cgroups: tasks run without limits or stats");
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn stats(&self, layout: &Layout, path: &str, kept: &StatsCache) -> Option<CgroupStats> {
        kept.read(layout, path).ok().flatten()
    }

    fn kill_all(&self, path: &str) {
        if let Ok(layout) = Layout::detect() {
            let _ = layout.kill_all(path, Duration::from_secs(10));
        }
    }

    fn remove(&self, path: &str) {
        if let Ok(layout) = Layout::detect() {
            let _ = layout.remove(path);
        }
    }
}

/// Supervisor processes (`<exe> supervise <dir>`, see [`crate::supervisor`]).
pub(crate) struct Supervisors;

impl Spawner for Supervisors {
    fn spawn(&self, exe: &Path, dir: &Path) -> io::Result<(Supervisor, BoxFuture<Ready>)> {
        let (sup, pipe) = supervise::spawn(exe, dir)?;
        Ok((sup, Box::pin(supervise::wait_ready(pipe))))
    }

    fn find(&self, dir: &Path) -> Option<Supervisor> {
        Supervisor::find(dir)
    }

    fn deliver_kill(&self, sup: &Supervisor) {
        sup.deliver_kill();
    }

    fn wait_exit(&self, sup: Supervisor) -> BoxFuture<io::Result<()>> {
        Box::pin(async move { sup.wait_exit().await })
    }

    fn running_under(&self, dir: &Path) -> Vec<(i32, PathBuf)> {
        supervise::running_under(dir)
    }
}

/// The system's clocks and tokio's timer.
pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        iris_wire::clock::now_ms()
    }

    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep(&self, d: Duration) -> BoxFuture<()> {
        Box::pin(tokio::time::sleep(d))
    }
}
