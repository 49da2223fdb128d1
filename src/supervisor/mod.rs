//! The per-task supervisor: `iris-worker supervise <task-dir>`.
//!
//! One single-threaded process per task, in its own session, started by the worker and
//! outliving it (the model is containerd's shims). It creates the task through a runtime,
//! owns the task's stdout/stderr pipes, stamps every line with the time it was read and
//! appends it to the task's log, reaps the task, enforces the timeout and kill requests, and
//! records how the task ended in `exit.json` before removing the container and its cgroup.
//! It is the only writer of the task's log and exit record; the worker only reads them.

mod disk;
pub mod handle;
pub mod lease;
mod oom;
mod pump;

use std::fs::File;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Pid, pipe2};

use crate::logs::LogWriter;
use crate::runtime::{self, LaunchSpec, RuntimeError, TaskIo};
use crate::taskdir;
use crate::taskdir::{ExitRecord, FileError, KillReason, KillRequest, ProcessId, Started};
use iris_wire::clock::now_ms;
use pump::Pump;

/// Grace between SIGTERM and SIGKILL when a task times out.
pub const TIMEOUT_GRACE: Duration = Duration::from_secs(5);
/// How long to wait for the last output after the task's processes are gone (a descendant
/// that escaped the cgroup may hold the pipes open).
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// Errors that stop a supervisor before it can record an exit.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("task directory {0} has no spec.json")]
    NoSpec(PathBuf),
    #[error("{op}: {source}")]
    Sys { op: &'static str, source: Errno },
    #[error("opening the task log: {0}")]
    Log(#[from] crate::logs::LogError),
}

fn sys(op: &'static str) -> impl FnOnce(Errno) -> SupervisorError {
    move |source| SupervisorError::Sys { op, source }
}

/// The signals the supervisor handles through its signalfd. They are blocked in the
/// supervisor, and unblocked again in the task just before it execs.
pub fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [Signal::SIGCHLD, Signal::SIGUSR1, Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGPIPE] {
        set.add(s);
    }
    set
}

/// Runs the supervisor for `task_dir` to the end. `ready` (the worker's pipe) hears
/// `started` once the command runs, or `failed` if it never will.
pub fn run(task_dir: &Path, ready: Option<OwnedFd>) -> Result<(), SupervisorError> {
    runtime::phases::mark("supervisor: begin");
    let spec: LaunchSpec =
        taskdir::read_json(task_dir, taskdir::SPEC)?.ok_or_else(|| SupervisorError::NoSpec(task_dir.into()))?;
    // Room for the records the worker must get, before the task can fill the disk: how the
    // task ended is written even then.
    for (name, bytes) in [(taskdir::EXIT, taskdir::EXIT_RESERVE), (taskdir::STARTED, taskdir::SMALL_RESERVE)] {
        if let Err(e) = taskdir::reserve(task_dir, name, bytes) {
            tracing::warn!(file = name, error = %e, "setting room aside for a record");
        }
    }
    // Orphans of the task are re-parented to us, not to the host's init, so we reap them.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    // Signals are blocked before the pid file exists: whoever finds the file may send SIGUSR1,
    // whose default action would end the supervisor.
    let mask = handled_signals();
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None).map_err(sys("blocking signals"))?;
    if let Some(ms) = std::env::var("IRIS_TEST_SUPERVISOR_PID_DELAY_MS").ok().and_then(|v| v.parse().ok()) {
        // Test seam (tests/cluster.rs): widens the window between the worker spawning us and
        // our pid file, in which a worker killed and restarted must still find us.
        std::thread::sleep(Duration::from_millis(ms));
    }
    if let Some(me) = ProcessId::of(std::process::id() as i32) {
        taskdir::write_json(task_dir, taskdir::PID, &me)?;
    }
    let sigfd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC).map_err(sys("signalfd"))?;

    let (out_r, out_w) = pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(sys("pipe"))?;
    let (err_r, err_w) = pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(sys("pipe"))?;
    // The task must see blocking pipes.
    for fd in [&out_w, &err_w] {
        nix::fcntl::fcntl(std::os::fd::AsRawFd::as_raw_fd(fd), nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()))
            .map_err(sys("fcntl"))?;
    }
    let log_dir = spec.log_dir.clone().unwrap_or_else(|| task_dir.join(taskdir::LOGS));
    let log = LogWriter::open(&log_dir)?;
    let mut pump = Pump::new(log, out_r, err_r, spec.log_source);
    let mut ready = ready.map(File::from);
    let mut runtime = match runtime::for_spec(&spec) {
        Ok(r) => r,
        Err(e) => return fail_to_start(task_dir, &spec, e, &mut ready),
    };

    let pid = match runtime.create(&spec, task_dir, TaskIo { stdout: out_w, stderr: err_w }) {
        Ok(pid) => pid,
        Err(e) => {
            let _ = runtime.remove();
            return fail_to_start(task_dir, &spec, e, &mut ready);
        }
    };
    let started_at_ms = now_ms();
    let started_kernel_us = oom::kernel_clock_us();
    if let Err(e) = runtime.start() {
        let _ = kill(pid, Signal::SIGKILL);
        let _ = waitpid(pid, None);
        kill_cgroup(&spec);
        let _ = runtime.remove();
        return fail_to_start(task_dir, &spec, e, &mut ready);
    }
    // The cache entries the task uses stay share-locked until this process exits: no worker
    // evicts them while the task runs, even if its own worker restarts meanwhile. The worker
    // holds them already, so none is being evicted now. Taken once the task's processes exist,
    // so that none of them (the container's init is a fork of this process) holds a copy.
    let _leases: Vec<_> = spec
        .leases
        .iter()
        .filter_map(|l| match l.take() {
            Ok(Some(lock)) => Some(lock),
            Ok(None) => {
                tracing::warn!(entry = %l.key, "a cache entry of the task is being evicted");
                None
            }
            Err(e) => {
                tracing::warn!(entry = %l.key, error = %e, "holding a cache entry of the task");
                None
            }
        })
        .collect();
    taskdir::write_json(task_dir, taskdir::STARTED, &Started { pid: pid.as_raw(), started_at_ms })?;
    notify(&mut ready, "started");
    runtime::phases::mark("supervisor: started.json written, worker told");
    drop(ready);
    // The set-up's allocations (the OCI spec, libcontainer's state, the seccomp program) are
    // freed now and this process will live as long as the task: hand the heap's free pages
    // back rather than keep them for the task's whole life, once per task.
    // SAFETY: malloc_trim only releases free memory of this process's allocator.
    unsafe { libc::malloc_trim(0) };

    let mut exit = ExitRecord { started_at_ms: Some(started_at_ms), ..Default::default() };
    let started = Instant::now();
    let mut timeout_at = spec.timeout_ms.map(|ms| started + Duration::from_millis(ms));
    let mut sigkill_at: Option<Instant> = None;
    let mut drain_until: Option<Instant> = None;
    let mut status: Option<WaitStatus> = None;
    let mut disk = spec.disk_limit.clone().map(|limit| disk::DiskWatch::new(limit, started));
    // A container's /tmp is measured through its init's view of the container's mounts.
    let container_init = runtime.signals_through_init().then_some(pid);
    // The controller lease, when the task has one: see `lease`.
    let mut fence = lease::Watch::open(task_dir);
    // A kill asked for before this supervisor could be found (its pid not yet recorded, so no
    // signal came) is in its directory already: acted on now, as the signal would have been.
    if let Ok(Some(request)) = taskdir::read_json::<KillRequest>(task_dir, taskdir::KILL) {
        exit.killed = Some(KillReason::Requested);
        exit.worker_failure = request.worker_failure;
        sigkill_at =
            Some(terminate(&spec, pid, runtime.signals_through_init(), Duration::from_millis(request.grace_ms)));
    }

    loop {
        if status.is_some() && (pump.is_done() || drain_until.is_some_and(|d| Instant::now() >= d)) {
            break;
        }
        let now = Instant::now();
        let disk_at = disk.as_ref().filter(|_| status.is_none() && exit.killed.is_none()).map(|d| d.due());
        let next = [timeout_at, sigkill_at, drain_until, disk_at, fence.as_ref().map(lease::Watch::next_check)]
            .into_iter()
            .flatten()
            .min();
        let wait = match next {
            Some(t) => PollTimeout::try_from(t.saturating_duration_since(now).as_millis().min(60_000) as i32 + 1)
                .unwrap_or(PollTimeout::MAX),
            None => PollTimeout::NONE,
        };
        let mut fds = vec![PollFd::new(sigfd.as_fd(), PollFlags::POLLIN)];
        let streams = pump.poll_fds(&mut fds);
        match poll(&mut fds, wait) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(sys("poll")(e)),
        }
        let revents: Vec<PollFlags> = fds.iter().map(|f| f.revents().unwrap_or(PollFlags::empty())).collect();
        drop(fds);
        let ready: Vec<(usize, PollFlags)> = streams.into_iter().zip(revents[1..].iter().copied()).collect();
        pump.on_ready(&ready);

        if !revents[0].is_empty() {
            // SIGUSR1 is the worker's kill request. The supervisor ends only when its task
            // does: other signals (SIGTERM, SIGHUP, SIGINT …) are read and ignored.
            while let Ok(Some(info)) = sigfd.read_signal() {
                if Signal::try_from(info.ssi_signo as i32) == Ok(Signal::SIGUSR1)
                    && exit.killed.is_none()
                    && status.is_none()
                {
                    let request = taskdir::read_json::<KillRequest>(task_dir, taskdir::KILL).ok().flatten();
                    let grace = request.as_ref().map(|k| Duration::from_millis(k.grace_ms)).unwrap_or(TIMEOUT_GRACE);
                    exit.killed = Some(KillReason::Requested);
                    exit.worker_failure = request.and_then(|k| k.worker_failure);
                    sigkill_at = Some(terminate(&spec, pid, runtime.signals_through_init(), grace));
                }
            }
        }
        // Reap every child (the task and any orphan re-parented to us).
        loop {
            match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(ws) if ws.pid() == Some(pid) => {
                    runtime::phases::mark("supervisor: reaped");
                    status = Some(ws);
                    // The init is gone; whatever is left of the task dies with it.
                    kill_cgroup(&spec);
                    drain_until = Some(Instant::now() + DRAIN_LIMIT);
                    timeout_at = None;
                    sigkill_at = None;
                }
                Ok(_) => {}
            }
        }
        let now = Instant::now();
        if timeout_at.is_some_and(|t| now >= t) {
            timeout_at = None;
            if exit.killed.is_none() {
                exit.killed = Some(KillReason::Timeout);
                sigkill_at = Some(terminate(&spec, pid, runtime.signals_through_init(), TIMEOUT_GRACE));
            }
        }
        if disk_at.is_some_and(|t| now >= t)
            && status.is_none()
            && let Some(watch) = disk.as_mut()
            && let Some(used) = watch.check(container_init, spec.cgroup.as_ref())
        {
            // Past its limit the task only grows: no grace, as kubelet evicts at once.
            tracing::warn!(limit = watch.limit_bytes(), used, "the task exceeded its disk limit");
            exit.killed = Some(KillReason::Disk);
            exit.disk = Some((watch.limit_bytes(), used));
            timeout_at = None;
            let _ = kill(pid, Signal::SIGKILL);
            kill_cgroup(&spec);
        }
        if status.is_some() {
            fence = None;
        } else if let Some(expired) = fence.as_mut().and_then(|f| f.poll(now)) {
            fence = None;
            if exit.killed.is_none() {
                tracing::warn!(error = %expired.error, "the controller lease expired: ending the task");
                exit.killed = Some(KillReason::Fenced);
                exit.worker_failure = Some(expired.error);
                sigkill_at = Some(terminate(&spec, pid, runtime.signals_through_init(), expired.grace));
            } else {
                // Already ending (a kill or the timeout): no later than the fence allows.
                let fenced = now + expired.grace;
                sigkill_at = Some(sigkill_at.map_or(fenced, |t| t.min(fenced)));
            }
        }
        if sigkill_at.is_some_and(|t| now >= t) {
            sigkill_at = None;
            let _ = kill(pid, Signal::SIGKILL);
            kill_cgroup(&spec);
        }
    }
    pump.finish();

    // A container's first process is its init: the command's own end is what counts.
    match status.map(|s| runtime.command_status(s)) {
        Some(WaitStatus::Exited(_, code)) => exit.exit_code = Some(code),
        Some(WaitStatus::Signaled(_, sig, _)) => exit.signal = Some(sig as i32),
        _ => {}
    }
    if let Some((layout, path)) = &spec.cgroup {
        exit.stats = layout.stats(path).unwrap_or_default();
        if exit.stats.oom_kills > 0 {
            exit.oom_victims = oom::victims(path, started_kernel_us);
        }
    }
    exit.finished_at_ms = now_ms();
    // Nothing runs in the rootfs any more (the cgroup is empty); unmounted before the exit is
    // recorded, so whoever reads exit.json finds no mount left.
    release_rootfs(task_dir, &spec);
    taskdir::write_json(task_dir, taskdir::EXIT, &exit)?;
    runtime::phases::mark("supervisor: exit.json written");
    if let Err(e) = runtime.remove() {
        tracing::warn!(error = %e, "removing the task's container");
        kill_cgroup(&spec);
        if let Some((layout, path)) = &spec.cgroup {
            let _ = layout.remove(path);
        }
    }
    Ok(())
}

/// Unmounts the task's own overlay rootfs (an image's): nothing runs in it any more.
fn release_rootfs(task_dir: &Path, spec: &LaunchSpec) {
    if !spec.rootfs_overlay {
        return;
    }
    // What the task wrote into its rootfs goes with it (its workdir is elsewhere).
    runtime::rootfs::release(task_dir);
}

/// Sends SIGTERM to every process of the task and returns when SIGKILL is due. A container's
/// init (`pid` when `through_init`) is left out: it would forward the signal to the command,
/// which gets it directly, and a second SIGTERM means "hurry" to some programs.
fn terminate(spec: &LaunchSpec, pid: Pid, through_init: bool, grace: Duration) -> Instant {
    match &spec.cgroup {
        Some((layout, path)) => {
            let spare = through_init.then_some(pid);
            if !through_init {
                let _ = kill(pid, Signal::SIGTERM);
            }
            let _ = layout.signal_all_but(path, Signal::SIGTERM, spare);
        }
        None => {
            let _ = kill(pid, Signal::SIGTERM);
        }
    }
    Instant::now() + grace
}

/// Kills every process left in the task's cgroup and waits until it is empty.
fn kill_cgroup(spec: &LaunchSpec) {
    if let Some((layout, path)) = &spec.cgroup
        && let Err(e) = layout.kill_all(path, Duration::from_secs(10))
    {
        tracing::warn!(error = %e, "killing the task's remaining processes");
    }
}

fn notify(ready: &mut Option<File>, what: &str) {
    use std::io::Write;
    if let Some(f) = ready.as_mut() {
        let _ = writeln!(f, "{what}");
    }
}

fn fail_to_start(
    task_dir: &Path,
    spec: &LaunchSpec,
    e: RuntimeError,
    ready: &mut Option<File>,
) -> Result<(), SupervisorError> {
    tracing::warn!(error = %e, "the task could not be started");
    kill_cgroup(spec);
    release_rootfs(task_dir, spec);
    let record = ExitRecord { error: Some(e.to_string()), finished_at_ms: now_ms(), ..Default::default() };
    taskdir::write_json(task_dir, taskdir::EXIT, &record)?;
    notify(ready, "failed");
    Ok(())
}

/// Wraps the ready pipe's inherited descriptor.
///
/// # Safety
/// `fd` must be an open descriptor owned by nobody else in this process.
pub unsafe fn ready_fd(fd: i32) -> OwnedFd {
    // SAFETY: guaranteed by the caller.
    unsafe { OwnedFd::from_raw_fd(fd) }
}
