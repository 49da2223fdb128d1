//! The `process` runtime: the task's command as a plain child of the supervisor, in the task's
//! cgroup when the host has usable cgroups. No namespaces, no rootfs: for development hosts
//! and for hosts where containers cannot run.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use nix::unistd::{ForkResult, Pid, fork, pipe2};

use super::{LaunchSpec, Runtime, RuntimeError, TaskIo};
use crate::cgroup::Layout;

/// Runs tasks as plain processes.
#[derive(Default)]
pub struct ProcessRuntime {
    /// Written to (then closed) to let the child exec: `create` holds it until `start`.
    go: Option<OwnedFd>,
    cgroup: Option<(Layout, String)>,
}

fn cstrings(items: &[String], what: &str) -> Result<Vec<CString>, RuntimeError> {
    items
        .iter()
        .map(|s| {
            CString::new(s.as_bytes()).map_err(|_| RuntimeError::Spec(format!("{what} contains a NUL byte: {s:?}")))
        })
        .collect()
}

/// In a forked child: the signals the supervisor blocks unblocked (they must not stay blocked
/// in the task), SIGPIPE at its default, stdout and stderr to the task's log pipes, stdin from
/// /dev/null.
///
/// # Safety
/// Only async-signal-safe calls: callable between fork and exec.
unsafe fn child_signals_and_stdio(io: &TaskIo) {
    // SAFETY: the caller is the forked child; every call here is async-signal-safe, and
    // `empty` is initialised by sigemptyset before use.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        crate::runtime::restore_sigpipe();
        libc::dup2(io.stdout.as_raw_fd(), 1);
        libc::dup2(io.stderr.as_raw_fd(), 2);
        let devnull = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
        if devnull >= 0 {
            libc::dup2(devnull, 0);
        }
    }
}

impl Runtime for ProcessRuntime {
    fn create(&mut self, spec: &LaunchSpec, _task_dir: &Path, io: TaskIo) -> Result<Pid, RuntimeError> {
        let argv = cstrings(&spec.argv, "argv")?;
        let env = cstrings(&spec.env, "env")?;
        let cwd =
            CString::new(spec.cwd_in_task.as_bytes()).map_err(|_| RuntimeError::Spec("cwd contains NUL".into()))?;
        let Some(argv0) = argv.first().cloned() else {
            return Err(RuntimeError::Spec("empty argv".into()));
        };
        if let Some((layout, path)) = &spec.cgroup {
            layout.create(path)?;
            layout.apply_limits(path, &spec.limits)?;
            self.cgroup = Some((layout.clone(), path.clone()));
        }
        let spawn_err = |e: nix::Error| RuntimeError::Spawn { argv0: spec.argv[0].clone(), source: e.into() };
        // Close-on-exec: the task must not inherit either end.
        let (go_r, go_w) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(spawn_err)?;
        // SAFETY: the supervisor is single-threaded, and the child only makes async-signal-safe
        // calls (read, dup2, chdir, execvpe, _exit) on data prepared before the fork.
        match unsafe { fork() }.map_err(spawn_err)? {
            ForkResult::Child => {
                drop(go_w);
                let mut byte = [0u8; 1];
                // Wait until the parent has put us in the cgroup and said go (EOF = abort).
                // SAFETY: `byte` is a live one-byte buffer; read is async-signal-safe.
                let n = unsafe { libc::read(go_r.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
                if n != 1 {
                    // SAFETY: _exit ends the forked child without running the parent's atexit
                    // handlers or destructors.
                    unsafe { libc::_exit(127) };
                }
                // SAFETY: the forked child, before exec: async-signal-safe calls on descriptors
                // and a C string prepared before the fork.
                unsafe {
                    child_signals_and_stdio(&io);
                    libc::chdir(cwd.as_ptr());
                }
                let _ = nix::unistd::execvpe(&argv0, &argv, &env);
                let msg = b"iris-worker: cannot run the task's command\n";
                // SAFETY: write of a static buffer to stderr, then _exit, both async-signal-safe.
                unsafe {
                    libc::write(2, msg.as_ptr().cast(), msg.len());
                    libc::_exit(127)
                }
            }
            ForkResult::Parent { child } => {
                drop(go_r);
                drop(io);
                if let Some((layout, path)) = &self.cgroup {
                    layout.add_process(path, child)?;
                }
                self.go = Some(go_w);
                Ok(child)
            }
        }
    }

    fn start(&mut self) -> Result<(), RuntimeError> {
        if let Some(go) = self.go.take() {
            nix::unistd::write(&go, &[1])
                .map_err(|e| RuntimeError::Spawn { argv0: "task".into(), source: e.into() })?;
        }
        Ok(())
    }

    fn remove(&mut self) -> Result<(), RuntimeError> {
        self.go = None;
        if let Some((layout, path)) = self.cgroup.take() {
            layout.remove(&path)?;
        }
        Ok(())
    }
}

/// Starts `argv` beside a running process-runtime task (the newest Iris wire's
/// ExecInContainer): in the task's cgroup (its limits count it; it is killed with the task),
/// its cwd and environment, as the task's user when the spec names one (the process runtime
/// runs the task itself as the worker's user, root), in a session of its own (so a timeout can
/// kill the whole tree). There are no namespaces to join: the task has none, and neither does
/// the exec — the isolation is the task's, its cgroup. stdin is /dev/null.
pub fn enter(spec: &LaunchSpec, argv: &[String], io: TaskIo) -> Result<Pid, RuntimeError> {
    let args = cstrings(argv, "the command")?;
    let env = cstrings(&spec.env, "env")?;
    let cwd = CString::new(spec.cwd_in_task.as_bytes()).map_err(|_| RuntimeError::Spec("cwd contains NUL".into()))?;
    let Some(argv0) = args.first().cloned() else {
        return Err(RuntimeError::Spec("empty command".into()));
    };
    let user = spec.user.clone();
    let gids: Vec<libc::gid_t> = user.iter().flat_map(|u| u.additional_gids.iter().copied()).collect();
    let spawn_err = |e: nix::Error| RuntimeError::Spawn { argv0: argv[0].clone(), source: e.into() };
    let (go_r, go_w) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(spawn_err)?;
    // SAFETY: the caller (the exec helper) is single-threaded, and the child only makes
    // async-signal-safe calls on data prepared before the fork.
    match unsafe { fork() }.map_err(spawn_err)? {
        ForkResult::Child => {
            drop(go_w);
            let mut byte = [0u8; 1];
            // Wait until the parent has put us in the task's cgroup (EOF = abort).
            // SAFETY: `byte` is a live one-byte buffer; read is async-signal-safe.
            if unsafe { libc::read(go_r.as_raw_fd(), byte.as_mut_ptr().cast(), 1) } != 1 {
                // SAFETY: _exit ends the forked child without the parent's destructors.
                unsafe { libc::_exit(127) };
            }
            // SAFETY: async-signal-safe calls on values prepared before the fork.
            unsafe {
                libc::setsid();
                child_signals_and_stdio(&io);
                if let Some(u) = &user
                    && (libc::setgroups(gids.len(), gids.as_ptr()) != 0
                        || libc::setgid(u.gid) != 0
                        || libc::setuid(u.uid) != 0)
                {
                    let msg = b"iris-worker exec: cannot switch to the task's user\n";
                    libc::write(2, msg.as_ptr().cast(), msg.len());
                    libc::_exit(126);
                }
                libc::chdir(cwd.as_ptr());
            }
            let err = nix::unistd::execvpe(&argv0, &args, &env).err().unwrap_or(nix::errno::Errno::EINVAL);
            let code = if err == nix::errno::Errno::ENOENT { 127 } else { 126 };
            let msg = b"iris-worker exec: cannot run the command\n";
            // SAFETY: write of a static buffer to stderr, then _exit, both async-signal-safe.
            unsafe {
                libc::write(2, msg.as_ptr().cast(), msg.len());
                libc::_exit(code)
            }
        }
        ForkResult::Parent { child } => {
            drop(go_r);
            drop(io);
            if let Some((layout, path)) = &spec.cgroup {
                // Never created here: the task's cgroup exists while it runs.
                if let Err(e) = layout.add_process(path, child) {
                    drop(go_w);
                    let _ = nix::sys::wait::waitpid(child, None);
                    return Err(e.into());
                }
            }
            nix::unistd::write(&go_w, &[1]).map_err(spawn_err)?;
            Ok(child)
        }
    }
}
