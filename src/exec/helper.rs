//! `iris-worker exec <task-dir> [--timeout-ms N] -- <command…>`: the single-threaded process
//! that runs one command inside a running task (see the module above).
//!
//! It reads the task's launch spec, blocks the signals it waits for (SIGCHLD; SIGTERM, SIGINT
//! and SIGHUP: the worker gave up) and reads them through a signalfd, starts the command
//! through the task's runtime with two pipes as its stdout and stderr, and then reads both
//! pipes until the command has exited (capped at [`OUTPUT_CAP`] each), or until the timeout
//! passes or the worker gives up: then every process of the command's session (the command
//! starts one: libcontainer's exec does `setsid`, and so does the process runtime's) is
//! SIGKILLed. A process that started a session of its own is not found that way; it stays in
//! the task's cgroup, and ends with the task.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Pid, pipe2};

use super::{ExecOutcome, OUTPUT_CAP};
use crate::runtime::{LaunchSpec, TaskIo};
use crate::taskdir as files;

/// One stream's capture: the first [`OUTPUT_CAP`] bytes, and how many more were dropped.
#[derive(Default)]
struct Capture {
    kept: Vec<u8>,
    dropped: u64,
    open: bool,
}

impl Capture {
    fn push(&mut self, bytes: &[u8]) {
        let room = OUTPUT_CAP.saturating_sub(self.kept.len());
        let (keep, drop) = bytes.split_at(room.min(bytes.len()));
        self.kept.extend_from_slice(keep);
        self.dropped += drop.len() as u64;
    }

    /// The text, with a marker line when output was dropped.
    fn text(&self) -> String {
        let mut s = String::from_utf8_lossy(&self.kept).into_owned();
        if self.dropped > 0 {
            if !s.ends_with('\n') {
                s.push('\n');
            }
            s.push_str(&format!(
                "[iris-worker: {} more bytes of output dropped: an exec returns at most {} MiB per stream]\n",
                self.dropped,
                OUTPUT_CAP >> 20
            ));
        }
        s
    }

    /// Reads what `fd` has now; marks the stream closed at end of file.
    fn read_from(&mut self, fd: &OwnedFd) {
        let mut buf = [0u8; 64 << 10];
        loop {
            match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
                Ok(0) => {
                    self.open = false;
                    return;
                }
                Ok(n) => self.push(&buf[..n]),
                Err(Errno::EINTR) => continue,
                // EAGAIN: nothing more now. Any other error ends the stream.
                Err(Errno::EAGAIN) => return,
                Err(_) => {
                    self.open = false;
                    return;
                }
            }
        }
    }
}

/// Why the command did not end by itself.
enum Stopped {
    Timeout(Duration),
    Cancelled,
}

/// Runs `argv` in the task of `task_dir`; every failure is in the outcome's `error`.
pub fn run(task_dir: &Path, argv: &[String], timeout: Option<Duration>) -> ExecOutcome {
    match run_inner(task_dir, argv, timeout) {
        Ok(outcome) => outcome,
        Err(error) => ExecOutcome { error, ..Default::default() },
    }
}

fn run_inner(task_dir: &Path, argv: &[String], timeout: Option<Duration>) -> Result<ExecOutcome, String> {
    if argv.is_empty() {
        return Err("no command to run".into());
    }
    let spec: LaunchSpec = files::read_json(task_dir, files::SPEC)
        .map_err(|e| format!("reading the task's launch spec: {e}"))?
        .ok_or("the task has no launch spec (it never started)")?;
    let mut signals = SigSet::empty();
    for s in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(s);
    }
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&signals), None).map_err(|e| format!("blocking signals: {e}"))?;
    let sigfd = SignalFd::with_flags(&signals, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| format!("a signalfd: {e}"))?;
    let pipe = || pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(|e| format!("a pipe: {e}"));
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    // The command's ends block: a command writing to a non-blocking stdout gets EAGAIN.
    for w in [&out_w, &err_w] {
        let _ = nix::fcntl::fcntl(w.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()));
    }
    let started = Instant::now();
    let pid = crate::runtime::exec_in(&spec, task_dir, argv, TaskIo { stdout: out_w, stderr: err_w })
        .map_err(|e| format!("entering the task: {}", without_paths(&e.to_string(), task_dir)))?;
    let deadline = timeout.map(|t| started + t);
    let mut out = Capture { open: true, ..Default::default() };
    let mut err = Capture { open: true, ..Default::default() };
    let mut stopped = None;
    let status = loop {
        if let Some(status) = reap(pid) {
            break status;
        }
        let wait = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() && stopped.is_none() {
                    stopped = timeout.map(Stopped::Timeout);
                    kill_session(pid);
                }
                PollTimeout::try_from(left.as_millis().min(60_000) as i32 + 1).unwrap_or(PollTimeout::MAX)
            }
            None => PollTimeout::NONE,
        };
        // After a kill, wait for the exit without a deadline (SIGKILL cannot be ignored).
        let wait = if stopped.is_some() { PollTimeout::NONE } else { wait };
        let mut fds = vec![PollFd::new(sigfd.as_fd(), PollFlags::POLLIN)];
        if out.open {
            fds.push(PollFd::new(out_r.as_fd(), PollFlags::POLLIN));
        }
        if err.open {
            fds.push(PollFd::new(err_r.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, wait) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                kill_session(pid);
                return Err(format!("waiting for the command: {e}"));
            }
        }
        drop(fds);
        while let Ok(Some(info)) = sigfd.read_signal() {
            let signo = info.ssi_signo as i32;
            if signo != libc::SIGCHLD && stopped.is_none() {
                stopped = Some(Stopped::Cancelled);
                kill_session(pid);
            }
        }
        if out.open {
            out.read_from(&out_r);
        }
        if err.open {
            err.read_from(&err_r);
        }
    };
    // What the command wrote before it ended is in the pipes; a process it left behind
    // (`sleep 100 &`) may hold them open, so read what is there and stop.
    out.read_from(&out_r);
    err.read_from(&err_r);
    let exit_code = match status {
        WaitStatus::Exited(_, code) => code,
        WaitStatus::Signaled(_, signal, _) => 128 + signal as i32,
        _ => -1,
    };
    let error = match stopped {
        Some(Stopped::Timeout(t)) => {
            format!(
                "the command did not finish within {} s and was killed (with every process of its session)",
                t.as_secs_f64()
            )
        }
        Some(Stopped::Cancelled) => "the exec was cancelled and the command killed".into(),
        None => String::new(),
    };
    tidy_cgroup(&spec, task_dir);
    Ok(ExecOutcome { exit_code, stdout: out.text(), stderr: err.text(), error })
}

/// The command's wait status, once it ended; reaps every other child too (libcontainer's
/// intermediate process).
fn reap(pid: Pid) -> Option<WaitStatus> {
    let mut ours = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return ours,
            Ok(status) if status.pid() == Some(pid) => ours = Some(status),
            Ok(_) => {}
        }
    }
}

/// SIGKILLs every process of the session `leader` started (the command and what it forked),
/// found by their session id in /proc, until none is left (a process forked meanwhile is
/// found on the next pass). Bounded: a session that keeps appearing after 100 passes is left
/// to the task's end.
fn kill_session(leader: Pid) {
    for _ in 0..100 {
        let members = session_members(leader);
        if members.is_empty() {
            return;
        }
        for p in members {
            let _ = kill(p, Signal::SIGKILL);
        }
    }
}

/// The live (not zombie) processes whose session is `leader`'s.
fn session_members(leader: Pid) -> Vec<Pid> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return vec![] };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // After the command name's ')': state ppid pgrp session …
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 3 && fields[0] != "Z" && fields[3].parse::<i32>().ok() == Some(leader.as_raw()) {
            out.push(Pid::from_raw(pid));
        }
    }
    out
}

/// If the task ended while the exec entered it, its supervisor may have removed the task's
/// cgroup just before the exec's runtime joined it (and so made it again): remove it when the
/// task's supervisor is gone and the cgroup is empty. Nothing is removed while the task runs.
fn tidy_cgroup(spec: &LaunchSpec, task_dir: &Path) {
    if crate::supervisor::handle::Supervisor::find(task_dir).is_some() {
        return;
    }
    if let Some((layout, path)) = &spec.cgroup
        && layout.procs(path).map(|p| p.is_empty()).unwrap_or(false)
    {
        let _ = layout.remove(path);
    }
}

/// An error message without the task directory's host path (answers never carry one).
fn without_paths(message: &str, task_dir: &Path) -> String {
    message.replace(&*task_dir.to_string_lossy(), "<task>")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_past_the_cap_is_counted_and_marked() {
        let mut c = Capture::default();
        c.push(&vec![b'a'; OUTPUT_CAP - 1]);
        c.push(b"bcd");
        assert_eq!(c.kept.len(), OUTPUT_CAP);
        assert_eq!(c.dropped, 2);
        let text = c.text();
        assert!(
            text.ends_with("[iris-worker: 2 more bytes of output dropped: an exec returns at most 1 MiB per stream]\n")
        );
        let small = Capture { kept: b"x\n".to_vec(), ..Default::default() };
        assert_eq!(small.text(), "x\n");
    }

    #[test]
    fn errors_do_not_name_the_task_directory() {
        let dir = Path::new("/var/lib/iris-worker/tasks/a.0");
        assert_eq!(
            without_paths("opening /var/lib/iris-worker/tasks/a.0/config.json", dir),
            "opening <task>/config.json"
        );
    }
}
