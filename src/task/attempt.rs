//! One attempt of a task: its record, and the tokio task that drives it to a terminal state.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;

use super::history::{History, HistoryView};
use super::spec::TaskSpec;
use super::state::{TaskState, outcome};
use super::store::{self, TaskMeta};
use super::{AttemptView, DEFAULT_GRACE_MS, Inner, KillSwitch, TaskError, TaskEvent, TaskView, Usage, lock};
use crate::cgroup::CgroupStats;
use crate::supervisor::files::{self, ExitRecord, now_ms};
use crate::supervisor::handle::{self as supervise, Ready, Supervisor};

/// Workdir files beyond this many entries are not counted for disk use.
const DISK_SCAN_LIMIT: usize = 10_000;
/// The sampler's interval in ms.
const SAMPLE_MS: i64 = super::history::SAMPLE_INTERVAL.as_millis() as i64;

/// The changing part of an attempt.
#[derive(Debug)]
struct Status {
    state: TaskState,
    status_message: String,
    exit_code: i32,
    error: String,
    started_at_ms: i64,
    finished_at_ms: i64,
    supervisor: Option<Supervisor>,
    /// The supervisor said the command runs: kill requests can go to it directly.
    started: bool,
    final_stats: Option<CgroupStats>,
    /// When the attempt first became BUILDING, and when it left it (0: not yet).
    build_started_ms: i64,
    build_finished_ms: i64,
}

/// One attempt of a task.
pub(crate) struct Attempt {
    pub(crate) meta: TaskMeta,
    pub(crate) dir: PathBuf,
    /// The order in which this worker accepted (or adopted) its attempts: a controller's reset
    /// reaches only the attempts up to a mark ([`super::TaskManager::reset`]).
    pub(crate) seq: u64,
    /// When it was accepted (CLOCK_BOOTTIME ms): a lapsing lease ends the attempts accepted
    /// while it was held.
    pub(crate) accepted_boottime_ms: i64,
    status: Mutex<Status>,
    kill: KillSwitch,
    done: (watch::Sender<bool>, watch::Receiver<bool>),
    history: Mutex<History>,
    /// The environment's identity and whether it came from the cache (BuildMetrics).
    build: Mutex<Option<(bool, String)>>,
    /// The bundle the attempt runs from, held so the cache keeps it while the task runs.
    bundle: Mutex<Option<crate::bundle::Bundle>>,
    /// Shared locks on cache entries the attempt uses (its venv), released when it ends.
    leases: Mutex<Vec<std::sync::Arc<crate::cachelock::EntryLock>>>,
    /// The image the attempt runs in: its layers stay pinned until the attempt ends.
    image: Mutex<Option<crate::env::image::Image>>,
    /// Every cache entry the attempt uses, for its supervisor to hold and to mark as used when
    /// the attempt ends (so a long task's entries are not the first to go after it).
    uses: Mutex<Vec<crate::cachelock::Lease>>,
}

impl Attempt {
    fn new(meta: TaskMeta, dir: PathBuf, state: TaskState, seq: u64) -> Arc<Attempt> {
        Arc::new(Attempt {
            meta,
            dir,
            seq,
            accepted_boottime_ms: crate::supervisor::lease::boottime_ms(),
            status: Mutex::new(Status {
                state,
                status_message: String::new(),
                exit_code: 0,
                error: String::new(),
                started_at_ms: 0,
                finished_at_ms: 0,
                supervisor: None,
                started: false,
                final_stats: None,
                build_started_ms: 0,
                build_finished_ms: 0,
            }),
            kill: KillSwitch::default(),
            done: watch::channel(false),
            history: Mutex::new(History::default()),
            build: Mutex::new(None),
            bundle: Mutex::new(None),
            leases: Mutex::new(Vec::new()),
            image: Mutex::new(None),
            uses: Mutex::new(Vec::new()),
        })
    }

    /// The attempt as the newest wire sees it, when it has an attempt uid.
    pub(crate) fn uid_view(&self) -> Option<super::UidAttempt> {
        let uid = self.meta.attempt_uid.clone()?;
        let st = lock(&self.status);
        Some(super::UidAttempt {
            attempt_uid: uid,
            task_id: self.meta.task_id.clone(),
            attempt_id: self.meta.attempt_id,
            state: st.state,
            status_message: st.status_message.clone(),
            exit_code: st.exit_code,
            error: st.error.clone(),
            started_at_ms: st.started_at_ms,
            finished_at_ms: st.finished_at_ms,
            container_id: self.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            dir: self.dir.clone(),
        })
    }

    pub(crate) fn state(&self) -> TaskState {
        lock(&self.status).state
    }

    /// When the attempt ended, once it has.
    pub(crate) fn finished_at_ms(&self) -> Option<i64> {
        let st = lock(&self.status);
        st.state.is_terminal().then_some(st.finished_at_ms)
    }

    /// Ends the attempt: directly through its supervisor once the command runs, otherwise
    /// by parking the request for the driver (a PENDING or BUILDING attempt just stops).
    /// Asks for the attempt's end; `Err` with its state when it has ended already.
    /// The request is on disk before this returns (and so before KillTask is answered): a
    /// worker restarted after it finds an attempt that never started KILLED, and tells an
    /// adopted supervisor that had not started the command yet.
    pub(crate) fn request_kill(&self, grace_ms: u64) -> Result<(), TaskState> {
        self.request_kill_for(grace_ms, None)
    }

    /// [`Self::request_kill`] for one of the worker's own reasons (`worker_failure`: a reset,
    /// a lapsed lease), which makes the attempt WORKER_FAILED. The first request's reason
    /// stays: a later KillTask does not turn a worker failure into a user's kill, nor the
    /// reverse.
    pub(crate) fn request_kill_for(&self, grace_ms: u64, worker_failure: Option<String>) -> Result<(), TaskState> {
        let st = lock(&self.status);
        if st.state.is_terminal() {
            return Err(st.state);
        }
        let cause = {
            let mut grace = lock(&self.kill.grace_ms);
            let mut cause = lock(&self.kill.worker_failure);
            if grace.is_none() {
                *cause = worker_failure;
            }
            *grace = Some(grace_ms);
            cause.clone()
        };
        let request = files::KillRequest { grace_ms, worker_failure: cause };
        if let Err(e) = files::write_json(&self.dir, files::KILL, &request) {
            tracing::warn!(task_id = %self.meta.task_id, error = %e, "recording a kill request");
        }
        if let (Some(sup), true) = (st.supervisor, st.started) {
            sup.deliver_kill();
        }
        drop(st);
        self.kill.notify.notify_one();
        Ok(())
    }

    fn kill_requested(&self) -> Option<u64> {
        *lock(&self.kill.grace_ms)
    }

    fn kill_cause(&self) -> Option<String> {
        lock(&self.kill.worker_failure).clone()
    }

    /// Ends an attempt killed before its supervisor started the command.
    fn finish_unstarted(&self, inner: &Inner) {
        match self.kill_cause() {
            Some(cause) => self.finish(inner, TaskState::WorkerFailed, 0, cause, None),
            None => self.finish(inner, TaskState::Killed, 0, "killed before it started".into(), None),
        }
    }

    pub(crate) async fn wait_done(&self) {
        let mut rx = self.done.1.clone();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Adds cache entries (and host ports) the attempt uses: its supervisor holds them.
    pub(super) fn uses(&self, leases: impl IntoIterator<Item = crate::cachelock::Lease>) {
        let mut uses = lock(&self.uses);
        for l in leases {
            if !uses.contains(&l) {
                uses.push(l);
            }
        }
    }

    /// The cache entries the attempt uses.
    pub(super) fn leases(&self) -> Vec<crate::cachelock::Lease> {
        lock(&self.uses).clone()
    }

    /// Holds the image the attempt runs in (its layers' pins) until the attempt ends.
    pub(super) fn hold_image(&self, image: &crate::env::image::Image) {
        self.uses(image.leases());
        *lock(&self.image) = Some(image.clone());
    }

    /// Records the environment the attempt runs in.
    pub(super) fn set_build(&self, env: &crate::env::PythonEnv, lease: crate::cachelock::Lease) {
        self.uses([lease]);
        lock(&self.leases).push(env.lease.clone());
        let tag = format!("venv:{}", &env.key[..16.min(env.key.len())]);
        *lock(&self.build) = Some((env.from_cache, tag));
    }

    /// The attempt's environment is an image built from a Dockerfile (`tag` names it).
    #[cfg(feature = "buildkit")]
    pub(super) fn set_image_build(&self, from_cache: bool, tag: String) {
        *lock(&self.build) = Some((from_cache, tag));
    }

    pub(super) fn hold_bundle(&self, bundle: crate::bundle::Bundle, lease: crate::cachelock::Lease) {
        self.uses([lease]);
        *lock(&self.bundle) = Some(bundle);
    }

    /// (from_cache, image_tag) of the attempt's environment, once known.
    pub(super) fn build_info(&self) -> Option<(bool, String)> {
        lock(&self.build).clone()
    }

    pub(super) fn set(&self, inner: &Inner, state: TaskState, message: &str) {
        let mut st = lock(&self.status);
        st.state = state;
        st.status_message = message.to_string();
        if state == TaskState::Building && st.build_started_ms == 0 {
            st.build_started_ms = now_ms();
        }
        if state == TaskState::Running {
            st.started_at_ms = now_ms();
            st.build_finished_ms = st.started_at_ms;
        }
        drop(st);
        self.emit(inner);
    }

    fn emit(&self, inner: &Inner) {
        let st = lock(&self.status);
        let event = TaskEvent {
            task_id: self.meta.task_id.clone(),
            job_id: self.meta.job_id.clone(),
            task_index: self.meta.task_index,
            attempt_id: self.meta.attempt_id,
            state: st.state,
            exit_code: st.exit_code,
            error: st.error.clone(),
            finished_at_ms: st.finished_at_ms,
        };
        drop(st);
        inner.emit(event);
    }

    /// Records the end: state, exit, figures; releases the ports; wakes the waiters. An end
    /// no `exit.json` records (`exit` is `None`) is written to the attempt's `ended.json`
    /// first, so it is the end a restarted worker finds too.
    fn finish(&self, inner: &Inner, state: TaskState, exit_code: i32, error: String, exit: Option<&ExitRecord>) {
        let finished_at_ms = exit.map(|e| e.finished_at_ms).filter(|t| *t > 0).unwrap_or_else(now_ms);
        let record = store::EndRecord { state, exit_code, error, finished_at_ms };
        self.end(inner, record, exit, exit.is_none());
    }

    /// Ends the attempt as its `ended.json` says (a restarted worker's view of it).
    fn finish_recorded(&self, inner: &Inner, record: store::EndRecord) {
        self.end(inner, record, None, false);
    }

    fn end(&self, inner: &Inner, record: store::EndRecord, exit: Option<&ExitRecord>, persist: bool) {
        let mut st = lock(&self.status);
        if st.state.is_terminal() {
            return;
        }
        if persist && let Err(e) = store::record_end(&self.dir, &record) {
            tracing::warn!(task_id = %self.meta.task_id, error = %e, "recording how the task ended");
        }
        let store::EndRecord { state, exit_code, error, finished_at_ms } = record;
        st.state = state;
        st.exit_code = exit_code;
        st.error = error;
        st.status_message.clear();
        st.finished_at_ms = finished_at_ms;
        if let Some(e) = exit {
            if let Some(s) = e.started_at_ms {
                st.started_at_ms = s;
            }
            st.final_stats = Some(e.stats.clone());
        }
        if st.build_started_ms > 0 && st.build_finished_ms == 0 {
            st.build_finished_ms = st.finished_at_ms;
        }
        drop(st);
        lock(&self.history).end();
        lock(&inner.ports).release(self.meta.ports.values().copied());
        lock(&self.bundle).take();
        lock(&self.leases).clear();
        lock(&self.image).take();
        for used in lock(&self.uses).iter() {
            used.touch();
        }
        // No kill request will come any more: its room goes back.
        files::release(&self.dir, files::KILL);
        tracing::info!(task_id = %self.meta.task_id, attempt = self.meta.attempt_id, state = state.name(), "task ended");
        self.emit(inner);
        let _ = self.done.0.send(true);
    }

    fn finish_from_exit(&self, inner: &Inner) {
        match files::read_json::<ExitRecord>(&self.dir, files::EXIT) {
            Ok(Some(exit)) => {
                let mut o = outcome(&exit, self.meta.timeout_s);
                // A later kill request may have replaced kill.json before the supervisor read it.
                if o.state == TaskState::Killed
                    && let Some(cause) = self.kill_cause()
                {
                    (o.state, o.error) = (TaskState::WorkerFailed, cause);
                }
                // A pickled entrypoint that raised left its exception's summary behind.
                let raised = self.dir.join(files::WORKDIR).join(crate::env::entrypoint::ERROR);
                if o.state == TaskState::Failed
                    && let Ok(summary) = std::fs::read_to_string(&raised)
                {
                    o.error = format!("{}: {}", o.error, summary.trim());
                }
                self.finish(inner, o.state, o.exit_code, o.error, Some(&exit));
            }
            other => {
                let why = match other {
                    Err(e) => format!("the task's exit record is unreadable: {e}"),
                    _ => "the task's supervisor died without recording how the task ended".to_string(),
                };
                remove_leftovers(&self.dir, self.meta.cgroup.as_deref());
                self.finish(inner, TaskState::WorkerFailed, -1, why, None);
            }
        }
    }

    /// Takes one sample of a RUNNING attempt's cgroup into its history (the sampler's tick).
    pub(crate) fn sample(&self, inner: &Inner) {
        let started_at_ms = {
            let st = lock(&self.status);
            if st.state != TaskState::Running {
                return;
            }
            st.started_at_ms
        };
        let Some(stats) = self.meta.cgroup.as_deref().and_then(|cg| inner.stats(cg)) else { return };
        lock(&self.history).observe(&stats, Instant::now(), now_ms(), started_at_ms);
    }

    pub(crate) fn history(&self) -> HistoryView {
        lock(&self.history).view()
    }

    fn view(&self, inner: &Inner) -> (AttemptView, String, Option<Usage>, (i64, i64)) {
        let st = lock(&self.status);
        let usage = match (st.state, &self.meta.cgroup) {
            (TaskState::Running, Some(cg)) => inner.stats(cg).map(|s| {
                let cpu_ns = s.cpu_usage_ns.unwrap_or(0);
                // The sampler's figure over its last interval; the life average until it has one.
                let cpu_percent = match lock(&self.history).latest(now_ms(), 3 * SAMPLE_MS) {
                    Some(sample) => sample.cpu_percent,
                    None => {
                        let life_ms = (now_ms() - st.started_at_ms).max(1) as f64;
                        cpu_ns as f64 / (life_ms * 1e6) * 100.0
                    }
                };
                Usage {
                    memory_bytes: s.memory_bytes.unwrap_or(0),
                    memory_peak_bytes: s.memory_peak_bytes.unwrap_or(0),
                    cpu_percent,
                    cpu_usage_ns: cpu_ns,
                    processes: s.processes.unwrap_or(0),
                    disk_bytes: 0,
                    cpu_throttled_periods: s.cpu_throttled_periods.unwrap_or(0),
                }
            }),
            (state, _) if state.is_terminal() => st.final_stats.as_ref().map(|s| {
                let life_ms = (st.finished_at_ms - st.started_at_ms).max(1) as f64;
                // The cgroup also counts the container's setup, which a very short task's
                // life does not: never report more than the machine's CPUs could do.
                let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
                Usage {
                    memory_bytes: 0,
                    memory_peak_bytes: s.memory_peak_bytes.unwrap_or(0),
                    cpu_percent: (s.cpu_usage_ns.unwrap_or(0) as f64 / (life_ms * 1e6) * 100.0).min(cpus * 100.0),
                    cpu_usage_ns: s.cpu_usage_ns.unwrap_or(0),
                    processes: 0,
                    disk_bytes: 0,
                    cpu_throttled_periods: s.cpu_throttled_periods.unwrap_or(0),
                }
            }),
            _ => None,
        };
        let view = AttemptView {
            attempt_id: self.meta.attempt_id,
            state: st.state,
            exit_code: st.exit_code,
            error: st.error.clone(),
            started_at_ms: st.started_at_ms,
            finished_at_ms: st.finished_at_ms,
            is_worker_failure: st.state == TaskState::WorkerFailed,
        };
        let message = st.status_message.clone();
        let build = (st.build_started_ms, st.build_finished_ms);
        drop(st);
        let usage = usage.map(|mut u| {
            u.disk_bytes = store::disk_usage(&self.dir.join(files::WORKDIR), DISK_SCAN_LIMIT);
            u
        });
        (view, message, usage, build)
    }
}

/// The view of a task from its attempts (the last is current); `None` for no attempts.
pub(super) fn view(inner: &Inner, attempts: &[Arc<Attempt>]) -> Option<TaskView> {
    let mut views: Vec<AttemptView> = Vec::with_capacity(attempts.len());
    let mut current = None;
    for (i, a) in attempts.iter().enumerate() {
        let (v, message, usage, build) = a.view(inner);
        if i + 1 == attempts.len() {
            current = Some((a, v.clone(), message, usage, build));
        }
        views.push(v);
    }
    let (a, v, status_message, usage, (build_started_ms, build_finished_ms)) = current?;
    Some(TaskView {
        task_id: a.meta.task_id.clone(),
        job_id: a.meta.job_id.clone(),
        task_index: a.meta.task_index,
        state: v.state,
        status_message,
        exit_code: v.exit_code,
        error: v.error,
        started_at_ms: v.started_at_ms,
        finished_at_ms: v.finished_at_ms,
        ports: a.meta.ports.clone(),
        usage,
        build_started_ms,
        build_finished_ms,
        build: a.build_info(),
        current_attempt_id: a.meta.attempt_id,
        attempts: views,
    })
}

/// Registers a new attempt and starts its driver.
pub(super) fn accept(inner: &Arc<Inner>, spec: TaskSpec) -> Result<TaskState, TaskError> {
    let mut tasks = lock(&inner.tasks);
    let previous = tasks.get(&spec.task_id).and_then(|a| a.last().cloned());
    // On the newest wire the controller names attempts by uid: the same task and attempt id
    // under a fresh uid is another attempt once the old one ended (the reconcile rules of
    // `rpc/newest` have already dropped a duplicate of a live attempt).
    let uid_after_end = spec.attempt_uid.is_some() && previous.as_ref().is_some_and(|p| p.state().is_terminal());
    if let Some(prev) = previous.as_ref().filter(|_| !uid_after_end) {
        let current = prev.meta.attempt_id;
        if spec.attempt_id == current {
            return Err(TaskError::AlreadyExists { task_id: spec.task_id, attempt_id: spec.attempt_id });
        }
        if spec.attempt_id < current {
            return Err(TaskError::StaleAttempt { task_id: spec.task_id, attempt_id: spec.attempt_id, current });
        }
    }
    let port_numbers = if spec.ports.is_empty() {
        Vec::new()
    } else {
        let (first, last) = inner.config.port_range;
        lock(&inner.ports).allocate(spec.ports.len()).ok_or(TaskError::PortsExhausted {
            wanted: spec.ports.len(),
            first,
            last,
        })?
    };
    let ports = spec.ports.iter().cloned().zip(port_numbers).collect();
    let key = store::attempt_key(&spec.task_id, spec.attempt_id, spec.attempt_uid.as_deref());
    let meta = TaskMeta {
        task_id: spec.task_id.clone(),
        job_id: spec.job_id.clone(),
        task_index: spec.task_index,
        num_tasks: spec.num_tasks,
        attempt_id: spec.attempt_id,
        ports,
        timeout_s: spec.timeout.map(|t| t.as_secs()),
        created_at_ms: now_ms(),
        cgroup: inner.cgroups.as_ref().map(|(_, parent)| format!("{parent}/{key}")),
        bundle: spec.bundle_gcs_path.clone(),
        attempt_uid: spec.attempt_uid.clone(),
    };
    // A request may lower the worker's cap of its log, never raise it.
    let log_cap = match (spec.max_log_bytes, inner.config.bounds.max_log_bytes) {
        (Some(asked), Some(cap)) => Some(asked.min(cap)),
        (asked, cap) => cap.or(asked),
    };
    let dir = match store::create(&inner.config.state_dir, &meta, &spec.raw_request, log_cap) {
        Ok(d) => d,
        Err(e) => {
            lock(&inner.ports).release(meta.ports.values().copied());
            return Err(match e {
                // The attempt's directory is still there (its record was removed, its files
                // could not be): the attempt exists, as far as this worker can tell.
                crate::supervisor::files::FileError::Io { source, .. }
                    if source.kind() == std::io::ErrorKind::AlreadyExists =>
                {
                    TaskError::AlreadyExists { task_id: spec.task_id, attempt_id: spec.attempt_id }
                }
                e => e.into(),
            });
        }
    };
    let attempt = Attempt::new(meta, dir, TaskState::Pending, inner.next_seq());
    // Its supervisor keeps the ports reserved while the task runs, whatever its worker does.
    attempt.uses(lock(&inner.ports).leases(attempt.meta.ports.values().copied()));
    tasks.entry(spec.task_id.clone()).or_default().push(attempt.clone());
    drop(tasks);
    if let Some(prev) = &previous {
        // A newer attempt replaces the old one: end it first.
        let _ended = prev.request_kill(DEFAULT_GRACE_MS);
    }
    attempt.emit(inner);
    tokio::spawn(drive(inner.clone(), attempt, spec, previous));
    Ok(TaskState::Pending)
}

/// Drives an attempt from PENDING to its end.
async fn drive(inner: Arc<Inner>, attempt: Arc<Attempt>, spec: TaskSpec, previous: Option<Arc<Attempt>>) {
    if let Some(prev) = previous {
        prev.wait_done().await;
    }
    let permit = tokio::select! {
        p = inner.slots.clone().acquire_owned() => p.ok(),
        _ = attempt.kill.notify.notified() => None,
    };
    let killed_early = |a: &Attempt| a.kill_requested().is_some();
    if permit.is_none() || killed_early(&attempt) {
        attempt.finish_unstarted(&inner);
        return;
    }
    attempt.set(&inner, TaskState::Building, "preparing the environment");
    let prepared = super::prepare::prepare(&inner, &attempt, &spec).await;
    // Whatever the task fetched, built or pulled is in the caches now: the budget looks.
    inner.janitor.kick();
    let launch = match prepared {
        Ok(l) => l,
        Err(error) => {
            // An image rootfs may already be mounted when a later step failed.
            release_rootfs(&attempt.dir);
            attempt.finish(&inner, TaskState::Failed, -1, error, None);
            return;
        }
    };
    if let Err(e) = files::write_json(&attempt.dir, files::SPEC, &launch) {
        release_rootfs(&attempt.dir);
        attempt.finish(&inner, TaskState::Failed, -1, format!("writing the launch spec: {e}"), None);
        return;
    }
    if let Some(lease) = &inner.lease {
        // A task runs only while the worker holds its controller lease, and its supervisor
        // ends it when the lease lapses.
        if let Err(error) = admit(&inner, &attempt, lease).await {
            release_rootfs(&attempt.dir);
            attempt.finish(&inner, TaskState::WorkerFailed, 0, error, None);
            return;
        }
        if let Err(e) = files::write_json(&attempt.dir, crate::supervisor::lease::FENCE, &lease.fence_record()) {
            release_rootfs(&attempt.dir);
            attempt.finish(&inner, TaskState::Failed, -1, format!("writing the task's fence: {e}"), None);
            return;
        }
    }
    if killed_early(&attempt) {
        release_rootfs(&attempt.dir);
        attempt.finish_unstarted(&inner);
        return;
    }
    let (sup, ready) = match supervise::spawn(&inner.config.supervisor_exe, &attempt.dir) {
        Ok(s) => s,
        Err(e) => {
            release_rootfs(&attempt.dir);
            let exe = inner.config.supervisor_exe.display();
            attempt.finish(&inner, TaskState::Failed, -1, format!("starting the supervisor {exe}: {e}"), None);
            return;
        }
    };
    lock(&attempt.status).supervisor = Some(sup);
    attempt.set(&inner, TaskState::Building, "starting the container");
    if supervise::wait_ready(ready).await == Ready::Started {
        {
            let mut st = lock(&attempt.status);
            st.started = true;
        }
        attempt.set(&inner, TaskState::Running, "");
        // A kill that came while the supervisor was starting the task is delivered now.
        if let Some(grace) = attempt.kill_requested() {
            let _ = sup.request_kill_for(&attempt.dir, grace, attempt.kill_cause().as_deref());
        }
    }
    watch_until_exit(inner, attempt, sup, permit).await;
}

/// Holds an attempt until it may start under the lease: the worker must hold it, and the
/// controller must say it still means the attempt here. A RunTask sent before a partition can
/// be delivered when the partition heals — before or after the lease is renewed — once the
/// controller has run the task elsewhere: run then, it would be a second live copy. `Err`: the
/// controller does not mean it. Returns at once when a kill is requested (the caller ends it).
async fn admit(inner: &Inner, attempt: &Attempt, lease: &super::lease::Lease) -> Result<(), String> {
    let mut checked = false;
    loop {
        if attempt.kill_requested().is_some() {
            return Ok(());
        }
        if !lease.valid() {
            attempt.set(inner, TaskState::Building, "waiting for contact with the controller");
            tokio::select! {
                _ = lease.wait_valid() => {}
                _ = attempt.kill.notify.notified() => {}
            }
            continue;
        }
        if checked {
            return Ok(());
        }
        let Some(check) = lease.check.get() else { return Ok(()) };
        attempt.set(inner, TaskState::Building, "checking with the controller");
        let asked = super::lease::AttemptOf {
            job_id: attempt.meta.job_id.clone(),
            task_index: attempt.meta.task_index,
            task_id: attempt.meta.task_id.clone(),
            attempt_id: attempt.meta.attempt_id,
        };
        match check(asked).await {
            Some(true) => checked = true,
            Some(false) => {
                return Err("the controller does not run this attempt here (a RunTask that arrived late, or \
                            not from it)"
                    .into());
            }
            None => {
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    _ = attempt.kill.notify.notified() => {}
                }
            }
        }
    }
}

async fn watch_until_exit(
    inner: Arc<Inner>,
    attempt: Arc<Attempt>,
    sup: Supervisor,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    if let Err(e) = sup.wait_exit().await {
        tracing::warn!(task_id = %attempt.meta.task_id, error = %e, "waiting for the supervisor");
    }
    attempt.finish_from_exit(&inner);
    drop(permit);
}

/// Takes over the attempts a previous run of the worker left in the state directory.
pub(super) fn adopt_all(inner: &Arc<Inner>) {
    // A supervisor started a moment before the stop may not have recorded itself yet: it is
    // found by its command line, and given a moment to (it does so first thing).
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    for (pid, dir) in supervise::running_under(&store::tasks_dir(&inner.config.state_dir)) {
        while !dir.join(files::PID).exists() && Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    let mut again = Vec::new();
    for (dir, meta) in store::scan(&inner.config.state_dir) {
        let task_id = meta.task_id.clone();
        let attempt = Attempt::new(meta, dir, TaskState::Pending, inner.next_seq());
        let exit_recorded = attempt.dir.join(files::EXIT).exists();
        let ended = if exit_recorded { None } else { store::recorded_end(&attempt.dir) };
        let live = if exit_recorded || ended.is_some() { None } else { Supervisor::find(&attempt.dir) };
        let kill_request: Option<files::KillRequest> = files::read_json(&attempt.dir, files::KILL).ok().flatten();
        if let Some(k) = &kill_request {
            // The kill as it was asked for: its grace, and a worker failure's reason.
            *lock(&attempt.kill.grace_ms) = Some(k.grace_ms);
            *lock(&attempt.kill.worker_failure) = k.worker_failure.clone();
        }
        let kill_requested = kill_request.is_some() || attempt.dir.join(files::KILL).exists();
        if kill_requested && kill_request.is_none() {
            *lock(&attempt.kill.grace_ms) = Some(DEFAULT_GRACE_MS);
        }
        lock(&inner.tasks).entry(task_id).or_default().push(attempt.clone());
        if exit_recorded {
            // Ended while we were away (or long ago): its real exit.
            attempt.finish_from_exit(inner);
        } else if let Some(record) = ended {
            // Ended before a supervisor ran it (killed while PENDING, a failed preparation):
            // as it was reported.
            attempt.finish_recorded(inner, record);
        } else if let Some(sup) = live {
            let started: Option<files::Started> = files::read_json(&attempt.dir, files::STARTED).ok().flatten();
            {
                let mut st = lock(&attempt.status);
                st.supervisor = Some(sup);
                st.started = started.is_some();
                st.state = if started.is_some() { TaskState::Running } else { TaskState::Building };
                st.started_at_ms = started.map(|s| s.started_at_ms).unwrap_or(0);
            }
            for conflict in lock(&inner.ports).hold(attempt.meta.ports.values().copied(), Some(sup.id.pid)) {
                // Its supervisor did not hold the port (started by an older worker, or killed
                // with its worker before it took it), and another task has it now.
                tracing::warn!(task_id = %attempt.meta.task_id, %conflict, "a running task's port is not its own alone");
            }
            // Its supervisor holds the cache entries (and ports) it uses; they are marked used
            // when it ends.
            if let Ok(Some(spec)) = files::read_json::<crate::runtime::LaunchSpec>(&attempt.dir, files::SPEC) {
                attempt.uses(spec.leases);
            }
            let permit = inner.slots.clone().try_acquire_owned().ok();
            tracing::info!(task_id = %attempt.meta.task_id, pid = sup.id.pid, "adopted a running task");
            if kill_requested {
                // KillTask was answered: the kill may have come while the supervisor was still
                // starting the command, and never reached it. Once more (it ignores a second).
                sup.deliver_kill();
            }
            if let Some(path) = attempt.meta.bundle.clone() {
                // The running task's bundle must not be evicted: hold it again.
                let (inner, attempt) = (inner.clone(), attempt.clone());
                tokio::spawn(async move {
                    match inner.bundle_cache().await {
                        Ok(cache) => match cache.get(&path, None, |_| {}).await {
                            Ok(bundle) => {
                                let lease = inner.bundle_lease(&bundle);
                                attempt.hold_bundle(bundle, lease)
                            }
                            Err(e) => tracing::warn!(%path, error = %e, "holding an adopted task's bundle"),
                        },
                        Err(e) => tracing::warn!(error = %e, "opening the bundle cache"),
                    }
                });
            }
            tokio::spawn(watch_until_exit(inner.clone(), attempt, sup, permit));
        } else if !attempt.dir.join(files::PID).exists() && kill_requested {
            // Killed while PENDING or BUILDING, before the end was recorded: KillTask was
            // answered, so it stays killed (or WORKER_FAILED, for the worker's own reasons).
            attempt.finish_unstarted(inner);
            tokio::spawn(clear_unstarted(attempt.dir.clone(), attempt.meta.cgroup.clone()));
        } else if !attempt.dir.join(files::PID).exists() {
            // Accepted, PENDING or BUILDING: no supervisor ever ran the task. Its request is
            // on disk: it runs after all.
            again.push(attempt);
        } else {
            remove_leftovers(&attempt.dir, attempt.meta.cgroup.as_deref());
            attempt.finish(
                inner,
                TaskState::WorkerFailed,
                -1,
                "the worker restarted and the task's supervisor was gone".into(),
                None,
            );
        }
    }
    // Keep tasks in attempt order.
    for attempts in lock(&inner.tasks).values_mut() {
        attempts.sort_by_key(|a| a.meta.attempt_id);
    }
    for attempt in again {
        run_again(inner, attempt);
    }
}

/// Starts again an attempt the previous run of the worker accepted but never started: from
/// its `request.pb`, after removing what a half-done preparation left.
fn run_again(inner: &Arc<Inner>, attempt: Arc<Attempt>) {
    let attempts = lock(&inner.tasks).get(&attempt.meta.task_id).cloned().unwrap_or_default();
    let position = attempts.iter().position(|a| Arc::ptr_eq(a, &attempt));
    if position.is_some_and(|i| i + 1 < attempts.len()) {
        attempt.finish(inner, TaskState::Killed, 0, "replaced by a newer attempt before it started".into(), None);
        return;
    }
    let previous = position.and_then(|i| i.checked_sub(1)).map(|i| attempts[i].clone());
    let spec = match inner.config.request_decoder {
        Some(decode) => std::fs::read(attempt.dir.join(store::REQUEST))
            .map_err(|e| e.to_string())
            .and_then(|raw| decode(&raw).map_err(|e| e.to_string()))
            .and_then(|spec| super::validate::validate(&spec).map(|()| spec).map_err(|e| e.to_string())),
        None => Err("this worker cannot read requests back".into()),
    };
    let spec = match spec {
        Ok(spec) => spec,
        Err(e) => {
            remove_leftovers(&attempt.dir, attempt.meta.cgroup.as_deref());
            let error = format!("the worker restarted before the task started, and its request cannot be run: {e}");
            attempt.finish(inner, TaskState::WorkerFailed, -1, error, None);
            return;
        }
    };
    let conflicts = lock(&inner.ports).hold(attempt.meta.ports.values().copied(), None);
    if !conflicts.is_empty() {
        // Its ports were given out while no worker held them: the task would share them.
        let taken: Vec<String> = conflicts.iter().map(ToString::to_string).collect();
        lock(&inner.ports).release(attempt.meta.ports.values().copied());
        remove_leftovers(&attempt.dir, attempt.meta.cgroup.as_deref());
        let error =
            format!("the worker restarted before the task started, and its ports were taken: {}", taken.join(", "));
        attempt.finish(inner, TaskState::WorkerFailed, -1, error, None);
        return;
    }
    attempt.uses(lock(&inner.ports).leases(attempt.meta.ports.values().copied()));
    tracing::info!(task_id = %attempt.meta.task_id, attempt = attempt.meta.attempt_id, "running a task accepted before the restart");
    let inner = inner.clone();
    tokio::spawn(async move {
        clear_unstarted(attempt.dir.clone(), attempt.meta.cgroup.clone()).await;
        drive(inner, attempt, spec, previous).await;
    });
}

/// Removes what the previous run of the worker left of an attempt it never started: a build
/// it started (its own supervisor, writing into this task's log), the task's processes,
/// container state and cgroup, and what the preparation wrote.
async fn clear_unstarted(dir: PathBuf, cgroup: Option<String>) {
    for (pid, build_dir) in supervise::running_under(&dir) {
        let sup = Supervisor::find(&build_dir)
            .unwrap_or(Supervisor { id: files::ProcessId::of(pid).unwrap_or(files::ProcessId { pid, start_time: 0 }) });
        let _ = sup.request_kill(&build_dir, 0);
        let _ = sup.wait_exit().await;
    }
    let _ = tokio::task::spawn_blocking(move || {
        remove_leftovers(&dir, cgroup.as_deref());
        clear_preparation(&dir);
    })
    .await;
}

/// Removes what preparing a task wrote into its directory (its launch spec, container
/// config, build step, rootfs dirs, and the workdir's files), keeping its record, request and
/// log, so that it can be prepared again.
fn clear_preparation(dir: &Path) {
    for name in [files::SPEC, "config.json"] {
        let _ = std::fs::remove_file(dir.join(name));
    }
    for name in ["runtime", "build", "tmp", crate::env::image::ROOTFS, crate::env::image::OVERLAY] {
        let _ = std::fs::remove_dir_all(dir.join(name));
    }
    let workdir = dir.join(files::WORKDIR);
    let _ = std::fs::remove_dir_all(&workdir);
    if let Err(e) = std::fs::create_dir_all(&workdir) {
        tracing::warn!(dir = %workdir.display(), error = %e, "recreating a task's workdir");
    }
}

/// Unmounts the task's image rootfs, if it has one (before a supervisor exists to do it).
fn release_rootfs(dir: &Path) {
    match crate::env::image::unmount(dir) {
        Ok(()) => crate::env::image::remove_overlay_dirs(dir),
        Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "unmounting a task's rootfs"),
    }
}

/// Removes what a dead supervisor could not: the task's processes, container state, cgroup,
/// and the overlay mount of its image.
pub(super) fn remove_leftovers(dir: &Path, cgroup: Option<&str>) {
    if let Some(path) = cgroup
        && let Ok(layout) = crate::cgroup::Layout::detect()
    {
        let _ = layout.kill_all(path, std::time::Duration::from_secs(10));
    }
    #[cfg(feature = "container")]
    crate::runtime::container::remove_leftover(dir);
    release_rootfs(dir);
    if let Some(path) = cgroup
        && let Ok(layout) = crate::cgroup::Layout::detect()
    {
        let _ = layout.remove(path);
    }
}
