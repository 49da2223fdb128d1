//! The worker's side of a supervisor: spawn it, learn when the task runs, ask it to kill the
//! task, and wait for it to exit (also for supervisors adopted after a restart).

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

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
///
/// Through `posix_spawn` (glibc's is a `CLONE_VM | CLONE_VFORK` child that execs at once),
/// not `fork`: a fork copies the worker's page tables — tens of MB mapped, many threads —
/// only for the exec to throw them away, which was ~5% of the CPU a short task costs
/// (docs/ARCHITECTURE.md, Performance). `std::process::Command` would fork here, since the
/// child needs a session of its own and the ready pipe at [`READY_FD`].
pub fn spawn(exe: &Path, task_dir: &Path) -> io::Result<(Supervisor, tokio::net::unix::pipe::Receiver)> {
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // The worker's environment may hold cloud credentials and whatever its operator exported;
    // a supervisor needs none of it (a task's environment comes from its spec), so it starts
    // with only what [`SUPERVISOR_ENV`] keeps, as containerd starts its shims.
    let env: Vec<(&str, std::ffi::OsString)> =
        SUPERVISOR_ENV.iter().filter_map(|name| std::env::var_os(name).map(|v| (*name, v))).collect();
    let args = [
        exe.as_os_str(),
        std::ffi::OsStr::new("supervise"),
        task_dir.as_os_str(),
        std::ffi::OsStr::new("--ready-fd"),
        std::ffi::OsStr::new("3"),
    ];
    let pid = spawn_in_session(exe, &args, &env, ready_w.as_fd())?;
    drop(ready_w);
    let id = ProcessId::of(pid).unwrap_or(ProcessId { pid, start_time: 0 });
    let receiver = tokio::net::unix::pipe::Receiver::from_owned_fd(ready_r)?;
    Ok((Supervisor { id }, receiver))
}

/// `posix_spawn`s `exe` with `args` (the first is its name) and only `env`, in a new session,
/// with stdin, stdout and stderr on /dev/null and `ready` at [`READY_FD`], SIGPIPE at its
/// default and no signal blocked (as `std::process::Command` leaves them). Returns its pid: a
/// child of this process, for the caller to reap.
fn spawn_in_session(
    exe: &Path,
    args: &[&std::ffi::OsStr],
    env: &[(&str, std::ffi::OsString)],
    ready: std::os::fd::BorrowedFd<'_>,
) -> io::Result<i32> {
    use crate::runtime::spawn::{Spawn, c_string, env_entries};
    use std::os::unix::ffi::OsStrExt;
    let path = c_string(exe.as_os_str().as_bytes())?;
    let argv: Vec<_> = args.iter().map(|a| c_string(a.as_bytes())).collect::<io::Result<_>>()?;
    let envp = env_entries(env.iter().map(|(k, v)| (std::ffi::OsStr::new(k), v.as_os_str())))?;
    // dup2 onto itself would keep the close-on-exec flag: have it anywhere but READY_FD.
    let moved = (ready.as_raw_fd() == READY_FD).then(|| ready.try_clone_to_owned()).transpose()?;
    let ready_fd = moved.as_ref().map_or(ready.as_raw_fd(), |m| m.as_raw_fd());
    let devnull = c_string(b"/dev/null")?;
    let mut spawn = Spawn::new()?;
    spawn.new_session();
    // The ready pipe first: it may sit on 0, 1 or 2 when the worker's stdio is closed.
    spawn.dup2(ready_fd, READY_FD)?.open(0, &devnull, libc::O_RDONLY)?;
    for fd in [1, 2] {
        spawn.open(fd, &devnull, libc::O_WRONLY)?;
    }
    spawn.spawn(&path, &argv, &envp, false)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What a spawned supervisor starts with, as the old fork + `setsid` + `dup2` gave it: a
    /// session of its own, /dev/null on stdin, stdout and stderr, the ready pipe at fd 3, only
    /// the environment given, SIGPIPE at its default (this test process ignores it, as every
    /// Rust program does) and no signal blocked.
    #[test]
    fn a_spawned_process_has_its_own_session_null_stdio_the_ready_pipe_and_only_its_env() {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        // Builtins only until the masks are read: a shell waiting for a child blocks signals.
        let script = "read -r stat < /proc/$$/stat; echo \"stat $stat\" >&3; \
                      while read -r k v; do case $k in SigBlk:|SigIgn:) echo \"$k $v\" >&3;; esac; \
                      done < /proc/$$/status; \
                      for fd in 0 1 2; do echo \"fd$fd $(readlink /proc/$$/fd/$fd)\" >&3; done; \
                      env | sed 's/^/env /' >&3";
        let args = ["sh", "-c", script].map(std::ffi::OsStr::new);
        let env = [("IRIS_TEST_ONLY", std::ffi::OsString::from("yes"))];
        let pid = spawn_in_session(Path::new("/bin/sh"), &args, &env, w.as_fd()).unwrap();
        drop(w);
        let mut out = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(r), &mut out).unwrap();
        let status = nix::sys::wait::waitpid(Pid::from_raw(pid), None).unwrap();
        assert_eq!(status, nix::sys::wait::WaitStatus::Exited(Pid::from_raw(pid), 0), "{out}");

        let field = |prefix: &str| -> Vec<String> {
            out.lines().filter_map(|l| l.strip_prefix(prefix)).map(str::to_string).collect()
        };
        // /proc/<pid>/stat: pid (comm) state ppid pgrp session …
        let stat = field("stat ").pop().unwrap();
        let after_comm: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        assert_eq!(after_comm[3], pid.to_string(), "a session of its own: {stat}");
        for fd in 0..3 {
            assert_eq!(field(&format!("fd{fd} ")), ["/dev/null"], "{out}");
        }
        let mask = |name: &str| u64::from_str_radix(field(name).pop().unwrap().trim(), 16).unwrap();
        assert_eq!(mask("SigBlk:"), 0, "no signal blocked: {out}");
        assert_eq!(mask("SigIgn:") & (1 << (libc::SIGPIPE - 1)), 0, "SIGPIPE at its default: {out}");
        let env = field("env ");
        assert!(env.contains(&"IRIS_TEST_ONLY=yes".to_string()), "{out}");
        // The shell adds its own few; nothing of this process's environment comes through.
        let foreign: Vec<&String> = env
            .iter()
            .filter(|e| !["IRIS_TEST_ONLY=", "PWD=", "SHLVL=", "_=", "OLDPWD="].iter().any(|k| e.starts_with(k)))
            .collect();
        assert!(foreign.is_empty(), "only the given environment: {foreign:?}");
    }
}
