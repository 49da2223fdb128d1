//! The TaskManager: accepts tasks, moves each attempt through its states, holds the
//! concurrency limit and the host ports, and finds tasks again after a restart.
//!
//! Each attempt (its record: `attempt`) is driven by one tokio task (`launch`): wait for a
//! slot (PENDING), prepare the environment once through [`crate::env::Environments::prepare`]
//! (BUILDING), start a supervisor and wait for it to say the command runs (RUNNING), then
//! (`watch`) wait for the supervisor to exit and read its `exit.json` (terminal). The
//! supervisor does the rest; the manager only reads its files. Kills are `kill`, status views
//! `report`, a restart's adoption `recover`; the host is reached through `seams` (fakes in
//! the unit tests, `tests`).

#![warn(missing_docs)]

mod attempt;
#[cfg(test)]
mod fake;
pub mod history;
mod kill;
mod launch;
pub mod lease;
mod ports;
mod recover;
mod report;
mod retention;
mod seams;
mod state;
pub mod store;
#[cfg(test)]
mod tests;
mod validate;
mod watch;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc};

use crate::cgroup::{CgroupError, CgroupStats, Layout};
use crate::logs::{LogError, LogFilter, LogLine};
use crate::runtime::{Profile, RuntimeKind};
use crate::taskdir::FileError;
use seams::Seams;

pub use crate::env::{Command, TaskSpec, WorkerEnv};
pub use history::{HistoryView, Sample};
pub use ports::{DEFAULT_PORT_LOCKS, remove_unheld_locks as remove_unheld_port_locks};
pub use state::TaskState;
pub use validate::{is_env_name, short};

use attempt::Attempt;
use ports::PortAllocator;

use crate::taskdir::PARENT_CGROUP as PARENT_CGROUP_FILE;

/// The grace between SIGTERM and SIGKILL when none is given (Iris's KillTask default).
pub const DEFAULT_GRACE_MS: u64 = 5000;

/// The error of an attempt ended by a controller's reset.
const RESET: &str = "the controller reset this worker (it did not know it)";

/// Errors of the task manager. `rpc/` maps them to status codes.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// A request field is wrong.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field, as the wire names it.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No task of that id.
    #[error("task {0:?} not found")]
    NotFound(String),
    /// The same attempt of the task was sent again.
    #[error("task {task_id:?} attempt {attempt_id} already exists")]
    AlreadyExists {
        /// The task.
        task_id: String,
        /// The attempt sent again.
        attempt_id: i32,
    },
    /// A request for an attempt older than the one the worker has.
    #[error("attempt {attempt_id} of task {task_id:?} is older than its current attempt {current}")]
    StaleAttempt {
        /// The task.
        task_id: String,
        /// The attempt asked for.
        attempt_id: i32,
        /// The worker's current attempt.
        current: i32,
    },
    /// KillTask of a task whose current attempt already ended (Iris's worker answers
    /// FAILED_PRECONDITION with these words).
    #[error("Task {task_id} already completed with state TASK_STATE_{}", state.name())]
    AlreadyCompleted {
        /// The task.
        task_id: String,
        /// How it ended.
        state: TaskState,
    },
    /// The task asked for more host ports than the range has free.
    #[error("no free host ports: {wanted} asked, none left in {first}-{last}")]
    PortsExhausted {
        /// How many it asked for.
        wanted: usize,
        /// The range's first port.
        first: u16,
        /// Its last.
        last: u16,
    },
    /// Reading or writing the task directory's files.
    #[error(transparent)]
    File(#[from] FileError),
    /// Reading the task's log.
    #[error(transparent)]
    Logs(#[from] LogError),
    /// Setting up the task's cgroups.
    #[error("setting up cgroups: {0}")]
    Cgroup(#[from] CgroupError),
    /// The state directory is another worker's (or could not be locked).
    #[error("locking the state directory {path}: {reason}")]
    Locked {
        /// Its lock file.
        path: PathBuf,
        /// Why it could not be taken.
        reason: String,
    },
    /// A filesystem the worker writes to is below the hard threshold (`--min-free-disk`): no
    /// new task until space returns. The message names the filesystem by role, not by path.
    #[error("{0}")]
    DiskPressure(String),
}

/// How a manager runs tasks.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// The state root: `tasks/`, `worker.lock`.
    pub state_dir: PathBuf,
    /// How tasks run: containers or plain processes.
    pub runtime: RuntimeKind,
    /// The security profile of containers.
    pub profile: Profile,
    /// The root filesystem of tasks that name no image.
    pub rootfs: PathBuf,
    /// The image of the newest wire's attempts whose request names no `task_image`; `None`:
    /// the python rootfs.
    pub default_task_image: Option<String>,
    /// Tasks running at once; more wait in PENDING.
    pub max_concurrent_tasks: usize,
    /// The host ports tasks are given, inclusive.
    pub port_range: (u16, u16),
    /// Where the host's workers lock the ports they hand out ([`DEFAULT_PORT_LOCKS`]): every
    /// worker of a host must use the same directory.
    pub port_lock_dir: PathBuf,
    /// What goes into every task's environment.
    pub env: WorkerEnv,
    /// The binary to run as `<exe> supervise <dir>` (this program by default).
    pub supervisor_exe: PathBuf,
    /// Size of /dev/shm when the request gives no memory limit.
    pub shm_bytes: u64,
    /// The cache root: bundles, venvs, uv's cache.
    pub cache_dir: PathBuf,
    /// How Python tasks (a bundle or a pickled entrypoint) get their environment.
    pub python: PythonConfig,
    /// How long a finished task's workdir is kept (its log is kept regardless); `None` keeps
    /// workdirs until `cleanup`.
    pub workdir_retention: Option<std::time::Duration>,
    /// The BuildKit that builds `image = "dockerfile[:PATH]"` tasks (`unix://`, `tcp://` or
    /// `docker-unix://`); `None` fails such tasks.
    pub buildkit: Option<String>,
    /// Where images come from and where their layers are kept (tasks with an `image`).
    pub images: crate::env::image::ImageStoreConfig,
    /// Where bundles may come from (`file://` directories, private http hosts).
    pub bundle_sources: crate::bundle::SourcePolicy,
    /// One budget over every cache, and the disk thresholds (see [`crate::cache`]).
    pub cache: crate::cache::CacheSettings,
    /// Resource bounds every task gets unless its request says less (see [`Bounds`]).
    pub bounds: Bounds,
    /// Reads a task's `request.pb` back, so a task the worker accepted but had not started
    /// when it stopped runs after a restart (the RPC layer's decoder; `None`: such tasks are
    /// WORKER_FAILED).
    pub request_decoder: Option<RequestDecoder>,
    /// The controller lease (see [`crate::supervisor::lease`]): tasks end when the worker has
    /// not heard from its controller for this long. `None` for a standalone worker.
    pub lease: Option<Duration>,
    /// The hooks that keep tasks off the worker's port (see [`crate::isolation`]), set up
    /// before any task is adopted or run; `None`: none (a library user's choice).
    pub isolation: Option<crate::isolation::IsolationConfig>,
}

/// Turns the bytes of a task's `request.pb` into its spec.
pub type RequestDecoder = fn(&[u8]) -> Result<TaskSpec, TaskError>;

/// What every task gets by default, so that no request can take the host's processes, disk or
/// memory: Iris sends no pids limit and no log size, and finished tasks would pile up forever.
#[derive(Debug, Clone, Default)]
pub struct Bounds {
    /// `pids.max` of a task whose request sets no `pids_limit`.
    pub default_pids_limit: Option<i64>,
    /// A task's log on disk at most (the head and the newest output are kept); a request's
    /// `max_log_bytes` may lower it.
    pub max_log_bytes: Option<u64>,
    /// Finished tasks kept at most (the oldest go first), and how long one is kept.
    pub retain_finished: Option<usize>,
    /// How long a finished task is kept; `None`: no age limit.
    pub retain_for: Option<std::time::Duration>,
}

/// The Python environment of tasks with a bundle or a pickled entrypoint.
#[derive(Debug, Clone)]
pub struct PythonConfig {
    /// The root filesystem (`scripts/fixtures python`).
    pub rootfs: PathBuf,
    /// Wheels for uv's `--find-links` (mounted read-only into builds).
    pub find_links: Option<PathBuf>,
    /// Builds never use the network (`UV_OFFLINE`).
    pub offline: bool,
    /// Memory limit of a venv build.
    pub build_memory_bytes: u64,
    /// The CA bundle venv builds trust (see [`crate::env::VenvConfig::ca_bundle`]).
    pub ca_bundle: Option<PathBuf>,
    /// `NAME=VALUE` variables for venv builds (index and proxy settings).
    pub build_env: Vec<String>,
}

/// A task's resource figures, read on demand.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    /// Memory its cgroup uses now, in bytes.
    pub memory_bytes: u64,
    /// Its highest memory use, in bytes.
    pub memory_peak_bytes: u64,
    /// CPU use over the last sampling interval ([`history::SAMPLE_INTERVAL`]; over the task's
    /// life before the first sample and at the end), 100 = one core.
    pub cpu_percent: f64,
    /// CPU time used so far, in nanoseconds.
    pub cpu_usage_ns: u64,
    /// Processes in its cgroup.
    pub processes: u64,
    /// Bytes it keeps in its workdir (and /tmp).
    pub disk_bytes: u64,
    /// CFS periods in which its CPU limit throttled it.
    pub cpu_throttled_periods: u64,
}

/// One attempt as seen from outside.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptView {
    /// The attempt's number: a higher one supersedes a lower.
    pub attempt_id: i32,
    /// Its state.
    pub state: TaskState,
    /// The command's exit code, when it exited.
    pub exit_code: i32,
    /// Why it failed or was killed, for people.
    pub error: String,
    /// When its command started (Unix ms; 0 before).
    pub started_at_ms: i64,
    /// When it ended (Unix ms; 0 while it lasts).
    pub finished_at_ms: i64,
    /// It ended by the worker's doing, not the task's.
    pub is_worker_failure: bool,
}

/// A task as seen from outside: its current attempt's figures plus every attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskView {
    /// The task's id (the wire's `task_id`).
    pub task_id: String,
    /// The job the task belongs to.
    pub job_id: String,
    /// The task's index within its job.
    pub task_index: i32,
    /// Its state.
    pub state: TaskState,
    /// What the attempt is doing now (while BUILDING, say).
    pub status_message: String,
    /// The command's exit code, when it exited.
    pub exit_code: i32,
    /// Why it failed or was killed, for people.
    pub error: String,
    /// When its command started (Unix ms; 0 before).
    pub started_at_ms: i64,
    /// When it ended (Unix ms; 0 while it lasts).
    pub finished_at_ms: i64,
    /// The host ports allocated to it, by name.
    pub ports: BTreeMap<String, u16>,
    /// Its resource figures, while it runs and at its end.
    pub usage: Option<Usage>,
    /// When the current attempt entered BUILDING and left it (Unix ms; 0 = not yet).
    pub build_started_ms: i64,
    /// When it left BUILDING (Unix ms; 0 = not yet).
    pub build_finished_ms: i64,
    /// The environment built or reused for the task: (from the cache, identifier such as
    /// `venv:<hash>`), for tasks that have one.
    pub build: Option<(bool, String)>,
    /// The attempt the figures above are of.
    pub current_attempt_id: i32,
    /// Every attempt the worker keeps, oldest first.
    pub attempts: Vec<AttemptView>,
}

/// An attempt of the newest wire, by its uid (see [`TaskManager::uid_attempts`]).
#[derive(Debug, Clone, PartialEq)]
pub struct UidAttempt {
    /// The newest wire's uid of the attempt.
    pub attempt_uid: String,
    /// The task's id (the wire's `task_id`).
    pub task_id: String,
    /// The attempt's number: a higher one supersedes a lower.
    pub attempt_id: i32,
    /// Its state.
    pub state: TaskState,
    /// What the attempt is doing now (while BUILDING, say).
    pub status_message: String,
    /// The command's exit code, when it exited.
    pub exit_code: i32,
    /// Why it failed or was killed, for people.
    pub error: String,
    /// When its command started (Unix ms; 0 before).
    pub started_at_ms: i64,
    /// When it ended (Unix ms; 0 while it lasts).
    pub finished_at_ms: i64,
    /// The attempt's directory name, which is also its container's id.
    pub container_id: String,
    /// Its task directory (the log is below it).
    pub dir: PathBuf,
}

#[cfg(test)]
impl UidAttempt {
    /// Attempt `u` (0) of task `/j/0`, succeeded at `finished_at_ms`, in `dir`: the ended
    /// attempt the newest wire's reporting tests start from.
    pub(crate) fn succeeded_for_test(finished_at_ms: i64, dir: PathBuf) -> UidAttempt {
        UidAttempt {
            attempt_uid: "u".into(),
            task_id: "/j/0".into(),
            attempt_id: 0,
            state: TaskState::Succeeded,
            status_message: String::new(),
            exit_code: 0,
            error: String::new(),
            started_at_ms: 1,
            finished_at_ms,
            container_id: "c-u".into(),
            dir,
        }
    }
}

/// A state change, for the controller reporter.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskEvent {
    /// The task's id (the wire's `task_id`).
    pub task_id: String,
    /// The job the task belongs to.
    pub job_id: String,
    /// The task's index within its job.
    pub task_index: i32,
    /// The attempt's number: a higher one supersedes a lower.
    pub attempt_id: i32,
    /// Its state.
    pub state: TaskState,
    /// The command's exit code, when it exited.
    pub exit_code: i32,
    /// Why it failed or was killed, for people.
    pub error: String,
    /// When it ended (Unix ms; 0 while it lasts).
    pub finished_at_ms: i64,
}

/// Worker-wide figures for HealthCheck.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Milliseconds since the task manager opened.
    pub uptime_ms: i64,
    /// Attempts RUNNING now.
    pub running_tasks: usize,
    /// Whether tasks can reach the worker's port (see [`crate::isolation`]); empty until the
    /// server set it up.
    pub task_isolation: String,
    /// Why new tasks are refused, while a filesystem is below the hard disk threshold.
    pub disk_pressure: Option<String>,
}

/// Runs and tracks tasks. Cheap to clone.
#[derive(Clone)]
pub struct TaskManager {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    config: ManagerConfig,
    /// The cgroup filesystem, the supervisors and the clock (fakes in unit tests).
    seams: Seams,
    /// The host's cgroup layout and the worker's parent cgroup path, when cgroups are usable.
    cgroups: Option<(Layout, String)>,
    tasks: Mutex<HashMap<String, Vec<Arc<Attempt>>>>,
    slots: Arc<Semaphore>,
    ports: Mutex<PortAllocator>,
    listeners: Mutex<Vec<mpsc::UnboundedSender<TaskEvent>>>,
    /// The caches tasks' environments come from (bundles, venvs, images).
    envs: crate::env::Environments,
    /// Keeps every cache within the budget and watches the disk.
    janitor: Arc<crate::janitor::Janitor>,
    started: Instant,
    /// What keeps tasks off the worker's port (see [`crate::isolation`]).
    isolation: Option<crate::isolation::TaskIsolation>,
    /// Attempts accepted (or adopted) so far: each attempt's `seq`.
    accepted: AtomicU64,
    lease: Option<lease::Lease>,
    /// The manager's loops and drivers, stopped by [`TaskManager::shutdown`].
    background: crate::background::Background,
    _lock: std::fs::File,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind: keep going.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl TaskManager {
    /// Opens the state directory (one worker per directory), prepares the worker's parent
    /// cgroup, and adopts the tasks a previous run left: live supervisors are watched again,
    /// finished tasks keep their real exit, the rest become WORKER_FAILED and are cleaned up.
    pub async fn open(config: ManagerConfig) -> Result<TaskManager, TaskError> {
        Self::open_with(config, Seams::real()).await
    }

    /// [`Self::open`] over the given seams (the unit tests' fakes).
    async fn open_with(config: ManagerConfig, seams: Seams) -> Result<TaskManager, TaskError> {
        let io = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| TaskError::File(FileError::Io { op, path, source })
        };
        // The state root and every directory below it are root's alone; so are the caches a
        // task's code writes into (venv builds, uv's cache) or that hold what a request chose
        // (bundles, image layers, which may carry setuid files).
        let tasks_dir = store::tasks_dir(&config.state_dir);
        for dir in [&config.state_dir, &tasks_dir] {
            crate::taskdir::make_private_dir(dir).map_err(io("creating", dir))?;
        }
        for dir in private_cache_dirs(&config) {
            crate::taskdir::make_private_dir(&dir).map_err(io("creating", &dir))?;
        }
        let lock_path = config.state_dir.join(crate::taskdir::STATE_LOCK);
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(crate::taskdir::PRIVATE_FILE_MODE)
            .open(&lock_path)
            .map_err(io("opening", &lock_path))?;
        if !lock_exclusive(&lock_file, LOCK_PATIENCE) {
            return Err(TaskError::Locked {
                path: lock_path,
                reason: "another worker is using this state directory".into(),
            });
        }
        let cgroups = seams.cgroups.prepare_parent(&config)?;
        if let Some((_, parent)) = &cgroups {
            // `cleanup` removes this parent even if no task ever ran.
            crate::taskdir::write_private(&config.state_dir.join(PARENT_CGROUP_FILE), parent.as_bytes())
                .map_err(io("writing", &config.state_dir.join(PARENT_CGROUP_FILE)))?;
        }
        // Before any task is adopted or run again, and before the port is bound: no task may
        // ever run without the hooks, nor take the port while the worker starts.
        let background = crate::background::Background::new();
        let isolation = config.isolation.as_ref().map(|c| crate::isolation::start(c, cgroups.as_ref(), &background));
        let (first, last) = config.port_range;
        let venvs = crate::env::VenvConfig {
            python_rootfs: config.python.rootfs.clone(),
            cache_dir: config.cache_dir.clone(),
            find_links: config.python.find_links.clone(),
            offline: config.python.offline,
            ca_bundle: config.python.ca_bundle.clone(),
            build_env: config.python.build_env.clone(),
            build_memory_bytes: config.python.build_memory_bytes,
            pids_limit: config.bounds.default_pids_limit,
            supervisor_exe: config.supervisor_exe.clone(),
            cgroups: cgroups.clone(),
        };
        let envs = crate::env::Environments::new(crate::env::EnvironmentsConfig {
            venvs,
            bundle_dir: config.cache_dir.join("bundles"),
            bundle_sources: config.bundle_sources.clone(),
            images: config.images.clone(),
            buildkit: config.buildkit.clone(),
            prepare: crate::env::PrepareConfig {
                runtime: config.runtime,
                profile: config.profile,
                rootfs: config.rootfs.clone(),
                default_task_image: config.default_task_image.clone(),
                env: config.env.clone(),
                default_pids_limit: config.bounds.default_pids_limit,
                shm_bytes: config.shm_bytes,
                cgroups: cgroups.as_ref().map(|(layout, _)| layout.clone()),
            },
        });
        let janitor = crate::janitor::Janitor::new(
            crate::cache::CacheDirs::new(&config.cache_dir, &config.images.dir),
            config.cache.clone(),
            &config.state_dir,
        );
        let inner = Arc::new(Inner {
            janitor: janitor.clone(),
            envs,
            slots: Arc::new(Semaphore::new(config.max_concurrent_tasks.max(1))),
            ports: Mutex::new(PortAllocator::new(first, last).with_host_locks(&config.port_lock_dir)),
            cgroups,
            seams,
            tasks: Mutex::new(HashMap::new()),
            listeners: Mutex::new(Vec::new()),
            started: Instant::now(),
            isolation,
            accepted: AtomicU64::new(0),
            lease: config.lease.map(|length| lease::Lease::open(&config.state_dir, length)),
            background,
            config,
            _lock: lock_file,
        });
        let state_dir = inner.config.state_dir.clone();
        tokio::task::spawn_blocking(move || retention::empty_trash(&state_dir));
        recover::adopt_all(&inner);
        lease::spawn_watch(&inner);
        spawn_sampler(&inner);
        retention::spawn_janitor(&inner);
        // This process's bundle index forgets what the budget (here or elsewhere) evicted.
        let weak = Arc::downgrade(&inner);
        janitor.after_scan(move |entries| {
            if let Some(inner) = weak.upgrade()
                && let Some(bundles) = inner.envs.opened_bundles()
            {
                let on_disk =
                    entries.iter().filter(|e| e.kind == crate::cache::Kind::Bundles).map(|e| e.key.as_str()).collect();
                bundles.forget_missing(&on_disk);
            }
        });
        janitor.start(&inner.background);
        Ok(TaskManager { inner })
    }

    /// The caches and the disk as the janitor last saw them, with this process's hits,
    /// misses and evictions (images: layers reused and unpacked).
    pub fn cache_status(&self) -> crate::cache::CacheStatus {
        let mut status = self.inner.janitor.status();
        let images = self.image_counters();
        if let Some(k) = status.kinds.iter_mut().find(|k| k.kind == "images") {
            k.hits = images.layer_hits;
            k.misses = images.layer_unpacks;
        }
        status
    }

    /// Why a new task would be refused now (a filesystem below the hard disk threshold).
    pub fn disk_pressure(&self) -> Option<String> {
        self.inner.janitor.refusal()
    }

    /// What the image store has pulled, unpacked and reused since the worker started (zeros
    /// before the first task with an image).
    pub fn image_counters(&self) -> crate::env::image::ImageCounters {
        match self.inner.envs.opened_images() {
            Some(store) => store.counters(),
            None => Default::default(),
        }
    }

    /// Accepts a task. Returns its state (PENDING: it runs as soon as a slot is free).
    /// A higher attempt of a task that still runs kills the old attempt first.
    pub fn run(&self, spec: TaskSpec) -> Result<TaskState, TaskError> {
        validate::validate(&spec)?;
        // Read now (a few statvfs calls), not from the janitor's last look: a disk that just
        // filled takes no task.
        if let Some(why) = self.inner.janitor.refusal() {
            return Err(TaskError::DiskPressure(why));
        }
        launch::accept(&self.inner, spec)
    }

    /// The task's current state and figures.
    pub fn status(&self, task_id: &str) -> Result<TaskView, TaskError> {
        let attempts = self.attempts(task_id)?;
        report::view(&self.inner, &attempts).ok_or_else(|| TaskError::NotFound(task_id.to_string()))
    }

    /// Every task the worker knows, in the order they arrived.
    pub fn list(&self) -> Vec<TaskView> {
        let tasks: Vec<Vec<Arc<Attempt>>> = lock(&self.inner.tasks).values().cloned().collect();
        let mut views: Vec<(i64, TaskView)> =
            tasks.iter().filter_map(|a| Some((a.first()?.meta.created_at_ms, report::view(&self.inner, a)?))).collect();
        views.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.task_id.cmp(&b.1.task_id)));
        views.into_iter().map(|(_, v)| v).collect()
    }

    /// The current attempt's log lines that pass `filter`.
    pub async fn logs(&self, task_id: &str, filter: LogFilter) -> Result<Vec<LogLine>, TaskError> {
        let dir = self.current(task_id)?.dir.join(crate::taskdir::LOGS);
        let lines = tokio::task::spawn_blocking(move || crate::logs::read(&dir, &filter)).await.map_err(|e| {
            TaskError::Logs(LogError::ReadData {
                path: PathBuf::from("log reader task"),
                source: std::io::Error::other(e),
            })
        })??;
        Ok(lines)
    }

    /// The resource history of the task's current attempt (see [`history`]): sampled every
    /// [`history::SAMPLE_INTERVAL`] while it runs, bounded in memory.
    pub fn history(&self, task_id: &str) -> Result<HistoryView, TaskError> {
        Ok(self.current(task_id)?.history())
    }

    /// Ends the task: SIGTERM to every process, SIGKILL after `grace_ms` (0 = the default).
    /// The task becomes KILLED once none of its processes remains. A task that already ended
    /// is [`TaskError::AlreadyCompleted`], as Iris's worker answers.
    pub fn kill(&self, task_id: &str, grace_ms: u64) -> Result<(), TaskError> {
        let grace_ms = if grace_ms == 0 { DEFAULT_GRACE_MS } else { grace_ms };
        self.current(task_id)?
            .request_kill(&self.inner, grace_ms)
            .map_err(|state| TaskError::AlreadyCompleted { task_id: task_id.to_string(), state })
    }

    /// Where the worker stands in accepting attempts: take it before a heartbeat, and pass it
    /// to [`Self::reset`] if the answer asks for a reset.
    pub fn fence_mark(&self) -> u64 {
        self.inner.accepted.load(Ordering::SeqCst)
    }

    /// A controller's `should_reset` (it does not know this worker): kills the attempts the
    /// worker accepted up to `fence` ([`Self::fence_mark`] taken before the heartbeat that got
    /// the answer) as worker failures, and forgets them once they have ended. Attempts accepted
    /// later are untouched: the controller that asked may have sent them right after it
    /// answered. Returns at once (heartbeats never wait for a reset); the handle ends when the
    /// attempts are forgotten.
    pub fn reset(&self, fence: u64) -> tokio::task::JoinHandle<()> {
        let held: Vec<Arc<Attempt>> =
            lock(&self.inner.tasks).values().flatten().filter(|a| a.seq <= fence).cloned().collect();
        for a in &held {
            let _ended = a.request_kill_for(&self.inner, DEFAULT_GRACE_MS, Some(RESET.to_string()));
        }
        let inner = self.inner.clone();
        self.inner.background.spawn(async move {
            for a in &held {
                a.wait_done().await;
            }
            let gone: std::collections::HashSet<u64> = held.iter().map(|a| a.seq).collect();
            lock(&inner.tasks).retain(|_, attempts| {
                attempts.retain(|a| !gone.contains(&a.seq));
                !attempts.is_empty()
            });
        })
    }

    /// The controller answered a heartbeat sent at `sent_ms` (CLOCK_BOOTTIME ms, from
    /// [`crate::supervisor::lease::boottime_ms`] taken before sending): renews the lease.
    /// Whatever the wire, this is how a worker's lease is renewed.
    pub fn heard_from_controller(&self, sent_ms: i64) {
        if let Some(lease) = &self.inner.lease
            && let Err(e) = lease.renew(sent_ms)
        {
            tracing::warn!(error = %e, "renewing the controller lease");
        }
    }

    /// How the worker asks its controller whether it still means an attempt before it starts
    /// it (see [`lease::ControllerCheck`]); set once, by the heartbeat.
    pub fn set_controller_check(&self, check: lease::ControllerCheck) {
        if let Some(lease) = &self.inner.lease {
            let _already = lease.check.set(check);
        }
    }

    /// How long after the send of its last answered heartbeat this worker's tasks are surely
    /// gone (the lease, the kill and some slack); `None` without a lease.
    pub fn fence(&self) -> Option<Duration> {
        self.inner.lease.as_ref().map(lease::Lease::fence)
    }

    /// Waits until the task's current attempt has ended; returns its final view.
    pub async fn wait(&self, task_id: &str) -> Result<TaskView, TaskError> {
        self.current(task_id)?.wait_done().await;
        self.status(task_id)
    }

    /// Uptime and the number of RUNNING tasks.
    pub fn health(&self) -> Health {
        let running = lock(&self.inner.tasks)
            .values()
            .filter_map(|a| a.last())
            .filter(|a| a.state() == TaskState::Running)
            .count();
        Health {
            uptime_ms: self.inner.started.elapsed().as_millis() as i64,
            running_tasks: running,
            task_isolation: self.inner.isolation.as_ref().map(|i| i.status().to_string()).unwrap_or_default(),
            // As the janitor last saw it (every 2 s): RunTask itself reads the disk now.
            disk_pressure: self.inner.janitor.status().pressure,
        }
    }

    /// The host's cgroup layout and the parent cgroup of this worker's tasks, when tasks get
    /// cgroups.
    pub fn tasks_cgroup(&self) -> Option<(Layout, String)> {
        self.inner.cgroups.clone()
    }

    /// What keeps tasks off the worker's port (HealthCheck and the dashboard show its status).
    pub fn isolation(&self) -> Option<&crate::isolation::TaskIsolation> {
        self.inner.isolation.as_ref()
    }

    /// Ids of tasks RUNNING or BUILDING (for the controller heartbeat).
    pub fn active_task_ids(&self) -> Vec<String> {
        lock(&self.inner.tasks)
            .iter()
            .filter(|(_, a)| a.last().is_some_and(|a| matches!(a.state(), TaskState::Running | TaskState::Building)))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Every attempt that carries an attempt uid (the newest wire's attempts), for Reconcile.
    pub fn uid_attempts(&self) -> Vec<UidAttempt> {
        let attempts: Vec<Arc<Attempt>> = lock(&self.inner.tasks).values().flatten().cloned().collect();
        attempts.iter().filter_map(|a| a.uid_view()).collect()
    }

    /// Ends the attempt `uid` as [`TaskManager::kill`] ends a task (SIGTERM, SIGKILL after
    /// `grace_ms`); an attempt that already ended is left as it is.
    pub fn kill_uid(&self, uid: &str, grace_ms: u64) -> Result<(), TaskError> {
        let attempt = lock(&self.inner.tasks)
            .values()
            .flatten()
            .find(|a| a.meta.attempt_uid.as_deref() == Some(uid))
            .cloned()
            .ok_or_else(|| TaskError::NotFound(uid.to_string()))?;
        let _already_ended = attempt.request_kill(&self.inner, if grace_ms == 0 { DEFAULT_GRACE_MS } else { grace_ms });
        Ok(())
    }

    /// The current attempt of `task_id` (its latest), for an exec into it: its attempt id,
    /// state and task directory (see [`crate::exec`]).
    pub fn exec_target(&self, task_id: &str) -> Result<(i32, TaskState, PathBuf), TaskError> {
        let attempt = self.current(task_id)?;
        let state = attempt.state();
        Ok((attempt.meta.attempt_id, state, attempt.dir.clone()))
    }

    /// This program, run as `<exe> supervise <dir>` for each task and `<exe> exec <dir>` for
    /// each exec.
    pub fn helper_exe(&self) -> &Path {
        &self.inner.config.supervisor_exe
    }

    /// The directory of the log of attempt `uid` (the newest wire's log pusher reads it).
    pub fn uid_log_dir(&self, uid: &str) -> Option<PathBuf> {
        lock(&self.inner.tasks)
            .values()
            .flatten()
            .find(|a| a.meta.attempt_uid.as_deref() == Some(uid))
            .map(|a| a.dir.join(crate::taskdir::LOGS))
    }

    /// Receives every state change from now on.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<TaskEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.inner.listeners).push(tx);
        rx
    }

    /// Where the worker's loops are spawned: [`Self::shutdown`] stops them.
    pub fn background(&self) -> &crate::background::Background {
        &self.inner.background
    }

    /// Stops the manager's drivers and loops (and whatever else was spawned on
    /// [`Self::background`]) and waits for them. Tasks keep running under their supervisors;
    /// a manager opened again on the state directory adopts them.
    pub async fn shutdown(&self) {
        self.inner.background.shutdown().await;
    }

    /// The worker id tasks see as IRIS_WORKER_ID.
    pub fn worker_id(&self) -> &str {
        &self.inner.config.env.worker_id
    }

    fn attempts(&self, task_id: &str) -> Result<Vec<Arc<Attempt>>, TaskError> {
        lock(&self.inner.tasks).get(task_id).cloned().ok_or_else(|| TaskError::NotFound(task_id.to_string()))
    }

    fn current(&self, task_id: &str) -> Result<Arc<Attempt>, TaskError> {
        self.attempts(task_id)?.last().cloned().ok_or_else(|| TaskError::NotFound(task_id.to_string()))
    }
}

/// How long the state directory's lock is tried before another worker is said to hold it.
/// Every descriptor the worker opens is close-on-exec, but a child forked a moment before a
/// `kill -9` holds copies of them until its exec: its copy of the lock goes a moment later.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3);

/// Takes an exclusive `flock` on `file`, retrying until `patience` has passed.
fn lock_exclusive(file: &std::fs::File, patience: std::time::Duration) -> bool {
    let deadline = Instant::now() + patience;
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(file), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The cache directories a task's request or code can put files into.
fn private_cache_dirs(config: &ManagerConfig) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = ["bundles", "venvs", "uv"].iter().map(|d| config.cache_dir.join(d)).collect();
    dirs.push(config.images.dir.clone());
    dirs
}

/// Samples every RUNNING attempt's cgroup into its history each [`history::SAMPLE_INTERVAL`],
/// until the manager is dropped.
fn spawn_sampler(inner: &Arc<Inner>) {
    let weak = Arc::downgrade(inner);
    inner.background.spawn(async move {
        let mut tick = tokio::time::interval(history::SAMPLE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(inner) = weak.upgrade() else { return };
            let running: Vec<Arc<Attempt>> = lock(&inner.tasks)
                .values()
                .filter_map(|a| a.last())
                .filter(|a| a.state() == TaskState::Running)
                .cloned()
                .collect();
            if running.is_empty() {
                continue;
            }
            // Small reads of cgroupfs files, off the async threads.
            let _ = tokio::task::spawn_blocking(move || running.iter().for_each(|a| a.sample(&inner))).await;
        }
    });
}

impl Inner {
    /// The `seq` of the next attempt.
    fn next_seq(&self) -> u64 {
        self.accepted.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn emit(&self, event: TaskEvent) {
        lock(&self.listeners).retain(|tx| tx.send(event.clone()).is_ok());
    }

    fn stats(&self, cgroup: &str, kept: &crate::cgroup::StatsCache) -> Option<CgroupStats> {
        let (layout, _) = self.cgroups.as_ref()?;
        self.seams.cgroups.stats(layout, cgroup, kept)
    }
}

/// Removes what a worker left on this host: every task directory's leftovers (container
/// state, cgroups), the worker's parent cgroups, and, with `remove_state`, the task
/// directories themselves. Refuses while a worker holds the state directory.
pub fn cleanup(state_dir: &Path, remove_state: bool) -> Result<usize, TaskError> {
    let lock_path = state_dir.join(crate::taskdir::STATE_LOCK);
    let held = std::fs::File::open(&lock_path).ok();
    if let Some(f) = &held
        && !lock_exclusive(f, LOCK_PATIENCE)
    {
        return Err(TaskError::Locked { path: lock_path, reason: "a worker is running on it; stop it first".into() });
    }
    let mut removed = 0;
    let mut parents = std::collections::BTreeSet::new();
    if let Ok(parent) = std::fs::read_to_string(state_dir.join(PARENT_CGROUP_FILE)) {
        parents.insert(parent.trim().to_string());
    }
    // A supervisor the worker started just before it stopped may not have recorded itself
    // yet: give it a moment, or its container would appear after we looked.
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    let tasks_dir = store::tasks_dir(state_dir);
    let running = crate::supervisor::handle::running_under(&tasks_dir);
    for (pid, dir) in &running {
        while !dir.join(crate::taskdir::PID).exists()
            && std::path::Path::new(&format!("/proc/{pid}")).exists()
            && Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    // A step of a task's preparation (a venv build, the newest wire's setup commands) runs
    // under a supervisor of its own in a directory below the task's: it ends too.
    for (pid, dir) in running.iter().filter(|(_, d)| d.parent().and_then(Path::parent) == Some(tasks_dir.as_path())) {
        let sup = crate::supervisor::handle::Supervisor::find(dir).unwrap_or(crate::supervisor::handle::Supervisor {
            id: crate::taskdir::ProcessId::of(*pid).unwrap_or(crate::taskdir::ProcessId { pid: *pid, start_time: 0 }),
        });
        sup.request_kill(dir, 0)?;
        let deadline = Instant::now() + std::time::Duration::from_secs(15);
        while sup.id.is_alive() && Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    for (dir, meta) in store::scan(state_dir) {
        if let Some(sup) = crate::supervisor::handle::Supervisor::find(&dir) {
            // A supervisor of a stopped worker still runs its task: end it, and let it
            // record the exit and remove its container.
            sup.request_kill(&dir, 1000)?;
            let deadline = Instant::now() + std::time::Duration::from_secs(15);
            while sup.id.is_alive() && Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        kill::remove_leftovers(&seams::HostCgroups, &dir, meta.cgroup.as_deref());
        if let Some((parent, _)) = meta.cgroup.as_deref().and_then(|c| c.rsplit_once('/')) {
            parents.insert(parent.to_string());
        }
        removed += 1;
    }
    if let Ok(layout) = Layout::detect() {
        for parent in parents {
            // The tasks are gone: so goes the hook that kept them off the worker's port.
            if let Ok(Some(dir)) = layout.unified_dir(&parent)
                && let Err(e) = crate::isolation::remove(&dir)
            {
                tracing::warn!(error = %e, "removing the task connect hook");
            }
            let _ = layout.release_parent(&parent);
        }
    }
    if remove_state {
        // Everything this worker wrote: task directories, the trash, the parent cgroup's
        // name, the lock (held until it goes, so no worker starts meanwhile), and the state
        // directory itself once nothing else is in it.
        let remove = |path: PathBuf| -> Result<(), TaskError> {
            let result = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            match result {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(TaskError::File(FileError::Io { op: "removing", path, source: e }))
                }
                _ => Ok(()),
            }
        };
        remove(store::tasks_dir(state_dir))?;
        remove(state_dir.join(crate::taskdir::TRASH))?;
        remove(state_dir.join(PARENT_CGROUP_FILE))?;
        remove(lock_path)?;
        // Not an error when something else is left in it (an operator's file).
        let _ = std::fs::remove_dir(state_dir);
    }
    Ok(removed)
}
