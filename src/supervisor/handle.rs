//! The worker's side of a supervisor: spawn it, learn when the task runs, ask it to kill the
//! task, and wait for it to exit (also for supervisors adopted after a restart).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::taskdir::{self, ExitRecord, FileError, KillRequest, ProcessId};

/// The descriptor number the supervisor finds its ready pipe on.
pub const READY_FD: i32 = 3;

/// The worker's variables a supervisor keeps: `PATH`, where the process runtime looks up a
/// task's command (as it did when supervisors inherited everything), `RUST_BACKTRACE`, and the
/// test seam of tests/cluster.rs (see `supervisor::run`).
pub const SUPERVISOR_ENV: &[&str] = &["PATH", "RUST_BACKTRACE", "IRIS_TEST_SUPERVISOR_PID_DELAY_MS"];

/// A running supervisor.
#[derive(Debug, Clone, Copy)]
pub struct Supervisor {
    pub id: ProcessId,
}

/// What the ready pipe said.
#[derive(Debug, PartialEq, Eq)]
pub enum Ready {
    Started,
    Failed,
}

/// Starts `exe supervise <task_dir>` in its own session, with stdio on /dev/null (the
/// supervisor logs to a file, the task's output goes through its own pipes).
pub fn spawn(exe: &Path, task_dir: &Path) -> io::Result<(Supervisor, tokio::net::unix::pipe::Receiver)> {
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let ready_w_raw = ready_w.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.arg("supervise").arg(task_dir).arg("--ready-fd").arg(READY_FD.to_string());
    // The worker's environment may hold cloud credentials and whatever its operator exported;
    // a supervisor needs none of it (a task's environment comes from its spec), so it starts
    // with only what [`SUPERVISOR_ENV`] keeps, as containerd starts its shims.
    cmd.env_clear();
    for name in SUPERVISOR_ENV {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: setsid and dup2 are async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::dup2(ready_w_raw, READY_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(ready_w);
    let pid = child.id() as i32;
    // The child is reaped by `wait_exit`; std's handle is not needed (dropping it neither
    // kills nor waits).
    drop(child);
    let id = ProcessId::of(pid).unwrap_or(ProcessId { pid, start_time: 0 });
    let receiver = tokio::net::unix::pipe::Receiver::from_owned_fd(ready_r)?;
    Ok((Supervisor { id }, receiver))
}

/// Reads the ready pipe: `Started` once the command runs, `Failed` if the supervisor says so
/// or closes the pipe without a word (it died, or could not start the task).
pub async fn wait_ready(pipe: tokio::net::unix::pipe::Receiver) -> Ready {
    let mut line = String::new();
    match BufReader::new(pipe).read_line(&mut line).await {
        Ok(_) if line.trim() == "started" => Ready::Started,
        _ => Ready::Failed,
    }
}

impl Supervisor {
    /// The supervisor recorded in `task_dir`, if that exact process is still alive.
    pub fn find(task_dir: &Path) -> Option<Supervisor> {
        let id: ProcessId = taskdir::read_json(task_dir, taskdir::PID).ok().flatten()?;
        id.is_alive().then_some(Supervisor { id })
    }

    /// Asks the supervisor to end the task: SIGTERM now, SIGKILL after `grace_ms`.
    pub fn request_kill(&self, task_dir: &Path, grace_ms: u64) -> Result<(), FileError> {
        self.request_kill_for(task_dir, grace_ms, None)
    }

    /// [`Self::request_kill`], for one of the worker's own reasons when `worker_failure` is
    /// set (the attempt then ends WORKER_FAILED with it).
    pub fn request_kill_for(
        &self,
        task_dir: &Path,
        grace_ms: u64,
        worker_failure: Option<&str>,
    ) -> Result<(), FileError> {
        let request = KillRequest { grace_ms, worker_failure: worker_failure.map(str::to_string) };
        taskdir::write_json(task_dir, taskdir::KILL, &request)?;
        self.deliver_kill();
        Ok(())
    }

    /// Tells the supervisor to act on the `kill.json` already written (a supervisor that is
    /// killing its task already ignores it).
    pub fn deliver_kill(&self) {
        if self.id.is_alive() {
            let _ = kill(Pid::from_raw(self.id.pid), Signal::SIGUSR1);
        }
    }

    /// Waits until the supervisor has exited, and reaps it if it is our child.
    pub async fn wait_exit(&self) -> io::Result<()> {
        let pid = self.id.pid;
        // SAFETY: pidfd_open takes a pid and flags, and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd >= 0 {
            // SAFETY: the descriptor was just returned to us and is owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
            // Between the spawn and pidfd_open the pid may have been reaped and reused: the
            // start time check guards against watching a stranger.
            if self.id.start_time == 0 || self.id.is_alive() || is_zombie_child(pid) {
                // SAFETY: the AsyncFd owns the pidfd, which nothing else closes or reuses.
                let afd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
                    .map_err(|e| io::Error::other(e.to_string()))?;
                let _guard = afd.readable().await?;
            }
        } else {
            // Without pidfds (old kernels): poll.
            while self.id.is_alive() {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        // Reap it if it is our child; ECHILD if it was adopted.
        let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        Ok(())
    }
}

fn is_zombie_child(pid: i32) -> bool {
    procfs::process::Process::new(pid).and_then(|p| p.stat()).is_ok_and(|s| s.state == 'Z')
}

/// Runs the launch spec already written in `dir` to its end under a new supervisor and
/// returns its exit record (for short steps such as environment builds).
pub async fn run_to_exit(exe: &Path, dir: &Path) -> Result<ExitRecord, FileError> {
    let io_err = |source| FileError::Io { op: "starting a supervisor in", path: dir.to_path_buf(), source };
    let (sup, ready) = spawn(exe, dir).map_err(io_err)?;
    let _ = wait_ready(ready).await;
    sup.wait_exit().await.map_err(io_err)?;
    taskdir::read_json(dir, taskdir::EXIT)?.ok_or_else(|| FileError::Io {
        op: "reading the exit record in",
        path: dir.to_path_buf(),
        source: io::Error::other("the supervisor recorded no exit"),
    })
}

/// Supervisors running for task directories below `tasks_dir`, found by their command line
/// (`<exe> supervise <task-dir> …`): also those that have not written `supervisor.pid` yet.
/// A container's init is a fork of its supervisor with the same command line, in the
/// container's pid namespace: only processes of our own pid namespace count.
pub fn running_under(tasks_dir: &Path) -> Vec<(i32, std::path::PathBuf)> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let own_ns = std::fs::read_link("/proc/self/ns/pid").ok();
    let mut out = Vec::new();
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        if own_ns.is_some() && std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok() != own_ns {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.len() >= 3 && args[1] == b"supervise" {
            let dir = std::path::PathBuf::from(String::from_utf8_lossy(args[2]).into_owned());
            if dir.starts_with(tasks_dir) {
                out.push((pid, dir));
            }
        }
    }
    out
}
