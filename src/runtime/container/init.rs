//! The container's pid 1: the supervisor's own code, as `docker run --init` puts tini there.
//!
//! A program that runs as the pid 1 of a pid namespace gets no default signal actions: a Python
//! task there ignores SIGTERM, and every kill waits out its whole grace. Nor does a program
//! expect to reap orphans it never started. So the container's first process (forked by
//! libcontainer from the supervisor, already in the container's namespaces, cgroup, rootfs,
//! user and capabilities, under the seccomp filter [`InitExecutor`] loads) starts the task's
//! command as its child (a `posix_spawn`, see [`spawn_command`]) and stays as the init. It
//! forwards the signals it receives to the command, reaps every process that ends in the
//! namespace, and exits when the command does — taking the rest of the namespace with it, as
//! the kernel kills every process of a pid namespace whose init exits.
//!
//! No binary is mounted into the container and nothing more is exec'd: the init is memory the
//! supervisor already has. Unlike tini, which can only exit with 128+N for a command killed by
//! signal N, it hands the command's exact wait status to the supervisor through a pipe
//! inherited from it ([`StatusPipe`]), so "killed by SIGTERM" stays distinct from "exit 143".

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use libcontainer::workload::{Executor, ExecutorError, ExecutorSetEnvsError, ExecutorValidationError};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

/// Signals the init never waits for: those the kernel raises for a fault of the process
/// itself (blocking them would hide a crash), and the job-control signals a process without a
/// terminal never gets. tini leaves out the same set.
const NOT_FORWARDED: &[libc::c_int] = &[
    libc::SIGFPE,
    libc::SIGILL,
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGABRT,
    libc::SIGTRAP,
    libc::SIGSYS,
    libc::SIGTTIN,
    libc::SIGTTOU,
    libc::SIGKILL,
    libc::SIGSTOP,
];

/// The pipe on which the init reports the command's wait status. The supervisor makes it
/// before the container exists (the init inherits the write end), drops its own write end once
/// the container is created, and reads after it has reaped the init.
pub(super) struct StatusPipe {
    read: OwnedFd,
    write: Option<OwnedFd>,
}

impl StatusPipe {
    pub(super) fn new() -> nix::Result<StatusPipe> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
        Ok(StatusPipe { read, write: Some(write) })
    }

    /// The descriptor number the init writes to.
    pub(super) fn write_fd(&self) -> RawFd {
        self.write.as_ref().map_or(-1, AsRawFd::as_raw_fd)
    }

    /// The container exists: only its init holds the write end now.
    pub(super) fn close_write(&mut self) {
        self.write = None;
    }

    /// The command's wait status, if the init reported one (it did not if it was killed, or
    /// never got to start the command).
    pub(super) fn status(&self) -> Option<WaitStatus> {
        let mut raw = [0u8; 4];
        let n = nix::unistd::read(self.read.as_raw_fd(), &mut raw).ok()?;
        if n != raw.len() {
            return None;
        }
        decode(i32::from_le_bytes(raw))
    }
}

/// A raw wait status as the supervisor reports it (the init's pid stands in: only the
/// exit code or signal is used).
fn decode(raw: libc::c_int) -> Option<WaitStatus> {
    let pid = Pid::from_raw(1);
    if libc::WIFEXITED(raw) {
        return Some(WaitStatus::Exited(pid, libc::WEXITSTATUS(raw)));
    }
    if libc::WIFSIGNALED(raw) {
        let signal = nix::sys::signal::Signal::try_from(libc::WTERMSIG(raw)).ok()?;
        return Some(WaitStatus::Signaled(pid, signal, libc::WCOREDUMP(raw)));
    }
    None
}

/// libcontainer's last step in the container's first process: become the init, and run the
/// task's command in a child.
#[derive(Clone)]
pub(super) struct InitExecutor {
    /// Where the init writes the command's wait status (inherited from the supervisor).
    pub(super) status_fd: RawFd,
    /// The task's seccomp filter, compiled before the fork; `None` for a privileged task.
    pub(super) seccomp: Option<super::seccomp::Program>,
}

impl Executor for InitExecutor {
    fn exec(&self, spec: &oci_spec::runtime::Spec) -> Result<(), ExecutorError> {
        crate::runtime::phases::mark("init: set up (rootfs, capabilities, seccomp)");
        let waited = wait_set();
        // Blocked before the fork, so a SIGCHLD of a command that ends at once is not lost
        // (it stays pending until the loop waits for it).
        // SAFETY: sigprocmask with a valid set; this process has one thread.
        unsafe { libc::sigprocmask(libc::SIG_BLOCK, &waited, std::ptr::null_mut()) };
        crate::runtime::phases::mark("command: spawn");
        match spawn_command(spec, self.status_fd) {
            Ok(child) => init_loop(child, self.status_fd, &waited),
            // No process to be had (the pids limit, memory): the command runs as pid 1
            // itself, as it did before the init.
            Err(Spawn::NoChild) => run_command(spec, self.status_fd),
            Err(Spawn::Exec(errno)) => {
                // The task's stderr is the log: say there why the command never ran, and end
                // as a shell ends when it cannot run a command.
                let argv0 = command_args(spec).first().cloned().unwrap_or_default();
                eprintln!("iris-worker: cannot run {argv0:?}: {}", nix::errno::Errno::from_raw(errno));
                let raw: libc::c_int = 127 << 8;
                let bytes = raw.to_le_bytes();
                // SAFETY: writes 4 bytes from a live buffer to our own descriptor, then ends
                // the init (and with it the container).
                unsafe {
                    libc::write(self.status_fd, bytes.as_ptr().cast(), bytes.len());
                    libc::_exit(127)
                }
            }
        }
    }

    fn validate(&self, spec: &oci_spec::runtime::Spec) -> Result<(), ExecutorValidationError> {
        libcontainer::workload::default::get_executor().validate(spec)
    }

    /// libcontainer's last step before the init reports ready, right after the point where
    /// it would have loaded a `linux.seccomp` of the spec (after no_new_privs and the
    /// capabilities): the filter is loaded here, by the init, so the init and everything it
    /// starts run under it, and a failure fails the container's creation — the task never
    /// runs unfiltered.
    fn setup_envs(&self, envs: std::collections::HashMap<String, String>) -> Result<(), ExecutorSetEnvsError> {
        libcontainer::workload::default::get_executor().setup_envs(envs)?;
        if let Some(program) = &self.seccomp {
            program.load().map_err(|e| ExecutorSetEnvsError::Other(e.to_string()))?;
            crate::runtime::phases::mark("init: seccomp filter loaded");
        }
        Ok(())
    }
}

/// The set the init waits on: every signal but [`NOT_FORWARDED`].
fn wait_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigfillset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe {
        libc::sigfillset(&mut set);
        for &s in NOT_FORWARDED {
            libc::sigdelset(&mut set, s);
        }
    }
    set
}

/// Why the command has no process of its own.
enum Spawn {
    /// No child could be made (EAGAIN, ENOMEM): run the command in place.
    NoChild,
    /// The child could not exec the command (its errno).
    Exec(i32),
}

fn command_args(spec: &oci_spec::runtime::Spec) -> &[String] {
    spec.process().as_ref().and_then(|p| p.args().as_deref()).unwrap_or(&[])
}

/// Starts the task's command as a child of the init through [`crate::runtime::spawn`], not a
/// `fork`: the init is a copy of the supervisor, and a fork copied its page tables only for the
/// exec to drop them, ~1.7 ms of a container's start under load. The child has no signal
/// blocked (the init blocks those it waits for: the task would never see SIGTERM), SIGPIPE at
/// its default, and not the status pipe. The command is found on the `PATH` of the
/// environment libcontainer set up, as `execvp` finds it; a file without `#!` is not handed to
/// `/bin/sh` (execvp would), as runc and Docker do not either.
fn spawn_command(spec: &oci_spec::runtime::Spec, status_fd: RawFd) -> Result<Pid, Spawn> {
    use crate::runtime::spawn::{self, c_string};
    let argv: Vec<_> = command_args(spec)
        .iter()
        .map(|a| c_string(a.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|_| Spawn::Exec(libc::EINVAL))?;
    let Some(file) = argv.first() else { return Err(Spawn::Exec(libc::EINVAL)) };
    let vars: Vec<_> = std::env::vars_os().collect();
    let envp = spawn::env_entries(vars.iter().map(|(k, v)| (k.as_os_str(), v.as_os_str())))
        .map_err(|_| Spawn::Exec(libc::EINVAL))?;
    let started = spawn::Spawn::new().and_then(|mut s| s.close(status_fd)?.spawn(file, &argv, &envp, true));
    match started.map_err(|e| e.raw_os_error().unwrap_or(libc::EINVAL)) {
        Ok(pid) => Ok(Pid::from_raw(pid)),
        Err(libc::EAGAIN | libc::ENOMEM) => Err(Spawn::NoChild),
        Err(errno) => Err(Spawn::Exec(errno)),
    }
}

/// The task's command run in place of the init, with the signal state a fresh process has,
/// when the init could have no child. Never returns.
fn run_command(spec: &oci_spec::runtime::Spec, status_fd: RawFd) -> ! {
    // SAFETY: plain syscalls on values we own; this process has one thread.
    unsafe {
        libc::close(status_fd);
        // The supervisor blocks the signals it reads through its signalfd, and a blocked mask
        // survives exec: without this the task would never see SIGTERM.
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
    crate::runtime::restore_sigpipe();
    crate::runtime::phases::mark("command: exec");
    let result = libcontainer::workload::default::get_executor().exec(spec);
    if let Err(e) = &result {
        // The task's stderr is the log: say there why the command never ran.
        let argv0 = spec.process().as_ref().and_then(|p| p.args().as_ref()).and_then(|a| a.first().cloned());
        eprintln!("iris-worker: cannot run {:?}: {e}", argv0.unwrap_or_default());
    }
    // SAFETY: ends this process without running the supervisor's destructors in a fork.
    unsafe { libc::_exit(127) }
}

/// The supervisor's argument area (`arg_start`, `arg_end` of `/proc/self/stat`), recorded when
/// it starts: the init is a fork of the supervisor (same memory layout) and blanks it.
static ARG_AREA: std::sync::OnceLock<(usize, usize)> = std::sync::OnceLock::new();

/// The name the task sees for its pid 1, in `/proc/1/cmdline` and `/proc/1/comm`.
const INIT_NAME: &[u8] = b"iris-init";

/// Records where this process's arguments are, for [`hide_host_details`] in a later fork.
/// Call at the supervisor's start, on the host's /proc.
pub fn record_arg_area() {
    let area = procfs::process::Process::myself()
        .and_then(|p| p.stat())
        .ok()
        .and_then(|stat| Some((usize::try_from(stat.arg_start?).ok()?, usize::try_from(stat.arg_end?).ok()?)));
    if let Some(area) = area {
        let _ = ARG_AREA.set(area);
    }
}

/// What the task can learn about the host from its pid 1: the supervisor's command line holds
/// the worker's binary and the task's host path (`/var/lib/iris-worker/tasks/<key>`), so the
/// init overwrites it (and its name) with `iris-init`, as `ps` in a Docker container shows
/// `docker-init`. It is made non-dumpable explicitly (libcontainer does it too, but that is
/// its detail): then neither `/proc/1/environ` nor `/proc/1/mem` is the task's to read.
fn hide_host_details() {
    // SAFETY: prctl with integer arguments, and a NUL-terminated name that outlives the call.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        libc::prctl(libc::PR_SET_NAME, c"iris-init".as_ptr(), 0, 0, 0);
    }
    if let Some(&(start, end)) = ARG_AREA.get()
        && end > start
    {
        let len = end - start;
        // SAFETY: `start..end` is this process's own argument area (inherited from the
        // supervisor that recorded it), writable stack memory; this process has one thread
        // and nothing reads the arguments any more.
        unsafe {
            std::ptr::write_bytes(start as *mut u8, 0, len);
            std::ptr::copy_nonoverlapping(INIT_NAME.as_ptr(), start as *mut u8, INIT_NAME.len().min(len - 1));
        }
    }
}

/// The init: forward signals to the command, reap everything, and exit with the command.
fn init_loop(command: Pid, status_fd: RawFd, waited: &libc::sigset_t) -> ! {
    // Whatever the supervisor had open (its log, pipes, signalfd) is not the init's business.
    close_all_but(status_fd);
    hide_host_details();
    loop {
        // SAFETY: siginfo_t is plain data, filled in by sigwaitinfo.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `waited` is a valid set, `info` a valid out-parameter.
        let signal = unsafe { libc::sigwaitinfo(waited, &mut info) };
        if signal < 0 {
            continue; // EINTR
        }
        if signal != libc::SIGCHLD {
            // SAFETY: kill with a pid and a signal number.
            unsafe { libc::kill(command.as_raw(), signal) };
            continue;
        }
        loop {
            let mut raw: libc::c_int = 0;
            // SAFETY: waitpid with a valid out-parameter.
            let pid = unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG) };
            if pid <= 0 {
                break; // nothing more to reap now (0), or no children left (ECHILD)
            }
            if pid == command.as_raw() {
                let bytes = raw.to_le_bytes();
                // SAFETY: writes 4 bytes from a live buffer to our own descriptor.
                unsafe { libc::write(status_fd, bytes.as_ptr().cast(), bytes.len()) };
                let code = if libc::WIFEXITED(raw) { libc::WEXITSTATUS(raw) } else { 128 + libc::WTERMSIG(raw) };
                // SAFETY: ends the init; the kernel then kills what is left of the namespace.
                unsafe { libc::_exit(code) }
            }
        }
    }
}

/// Closes every descriptor from 3 up except `keep`.
fn close_all_but(keep: RawFd) {
    let close_range = |first: libc::c_uint, last: libc::c_uint| {
        if first <= last {
            // SAFETY: close_range only closes descriptors of this process.
            unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
        }
    };
    let keep = keep.max(0) as libc::c_uint;
    if keep >= 3 {
        close_range(3, keep - 1);
    }
    close_range(keep.max(2) + 1, libc::c_uint::MAX);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_statuses_decode_to_exits_and_signals() {
        // Linux encodes exit code N as N << 8, and death by signal S as S.
        assert_eq!(decode(3 << 8), Some(WaitStatus::Exited(Pid::from_raw(1), 3)));
        assert_eq!(
            decode(libc::SIGTERM),
            Some(WaitStatus::Signaled(Pid::from_raw(1), nix::sys::signal::Signal::SIGTERM, false))
        );
        assert_eq!(decode(0x7f), None, "a stopped child is no end");
    }

    #[test]
    fn the_wait_set_leaves_out_fault_signals() {
        let set = wait_set();
        // SAFETY: querying a valid set.
        unsafe {
            assert_eq!(libc::sigismember(&set, libc::SIGTERM), 1);
            assert_eq!(libc::sigismember(&set, libc::SIGCHLD), 1);
            assert_eq!(libc::sigismember(&set, libc::SIGSEGV), 0);
        }
    }
}
