//! Runtimes: how the supervisor turns a [`LaunchSpec`] into running processes.
//!
//! Both runtimes run inside the per-task supervisor process (single-threaded), never inside
//! the worker. `container` uses youki's libcontainer; `process` runs a plain child for hosts
//! without container support. Both put the task in its cgroup, so stats and kills work the
//! same way.

#[cfg(feature = "container")]
pub mod container;
pub mod phases;
pub mod process;
pub mod rootfs;
pub(crate) mod spawn;
mod spec;

use std::os::fd::OwnedFd;
use std::path::Path;

use nix::unistd::Pid;

pub use spec::{DiskLimit, LaunchSpec, Mount, Profile, RuntimeKind, TaskUser};

/// Errors of creating, starting or removing a task's processes.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The runtime asked for was not compiled into this binary.
    #[error("runtime {0:?} is not available in this build (enable the `container` feature)")]
    Unavailable(RuntimeKind),
    /// Building the OCI configuration failed.
    #[error("building the container configuration: {0}")]
    Spec(String),
    /// libcontainer refused to create, start or delete the container.
    #[error("{op} container: {message}")]
    Container { op: &'static str, message: String },
    /// The plain process could not be spawned.
    #[error("spawning {argv0:?}: {source}")]
    Spawn { argv0: String, source: std::io::Error },
    /// The task's cgroup could not be set up.
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    /// A file of the task directory could not be written.
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: std::path::PathBuf, source: std::io::Error },
}

/// The task's standard output and error, the write ends of the supervisor's pipes.
pub struct TaskIo {
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// A way to run a task. Called in this order: `create` (processes exist, the command has not
/// run yet, or — for runtimes that cannot hold it — has just started), `start`, then, after
/// the supervisor has reaped the task, `remove`.
pub trait Runtime {
    /// Creates the task in its cgroup; returns the pid of its first process, which is a
    /// direct child of the caller (the caller reaps it).
    fn create(&mut self, spec: &LaunchSpec, task_dir: &Path, io: TaskIo) -> Result<Pid, RuntimeError>;
    /// Lets the task's command run.
    fn start(&mut self) -> Result<(), RuntimeError>;
    /// How the task's command ended, given how the process `create` returned ended (the same
    /// process, unless the runtime runs an init in front of the command).
    fn command_status(&mut self, first: nix::sys::wait::WaitStatus) -> nix::sys::wait::WaitStatus {
        first
    }
    /// True when the process `create` returned is an init that forwards signals to the
    /// command, rather than the command itself.
    fn signals_through_init(&self) -> bool {
        false
    }
    /// Removes what `create` made (container state, cgroup). The task's processes are gone.
    fn remove(&mut self) -> Result<(), RuntimeError>;
}

/// The runtime of `spec`: its kind's, or gVisor's for a container it names `runsc` for.
pub fn for_spec(spec: &LaunchSpec) -> Result<Box<dyn Runtime>, RuntimeError> {
    match spec.runtime {
        #[cfg(feature = "container")]
        RuntimeKind::Container => match &spec.gvisor {
            Some(runsc) => Ok(Box::new(container::gvisor::GvisorRuntime::new(runsc.clone()))),
            None => Ok(Box::new(container::ContainerRuntime::default())),
        },
        #[cfg(not(feature = "container"))]
        RuntimeKind::Container => Err(RuntimeError::Unavailable(spec.runtime)),
        RuntimeKind::Process => Ok(Box::new(process::ProcessRuntime::default())),
    }
}

/// Starts `argv` inside the running task of `spec` (its task directory `task_dir`), with `io`
/// as its stdout and stderr: in the task's container (its namespaces, cgroup, user,
/// capabilities, seccomp filter; see [`container::exec`]) or beside a process-runtime task (its
/// cgroup, cwd, environment and user; see [`process::enter`]). Returns the pid, a child of the
/// caller. Call only from a single-threaded process.
pub fn exec_in(spec: &LaunchSpec, task_dir: &Path, argv: &[String], io: TaskIo) -> Result<Pid, RuntimeError> {
    match spec.runtime {
        #[cfg(feature = "container")]
        RuntimeKind::Container => match &spec.gvisor {
            Some(runsc) => container::gvisor::enter(spec, task_dir, runsc, argv, io),
            None => container::exec::enter(spec, task_dir, argv, io),
        },
        #[cfg(not(feature = "container"))]
        RuntimeKind::Container => {
            let _ = (task_dir, argv, io);
            Err(RuntimeError::Unavailable(RuntimeKind::Container))
        }
        RuntimeKind::Process => process::enter(spec, argv, io),
    }
}

/// Gives SIGPIPE its default action back, in the task's process just before it execs. Rust's
/// runtime ignores SIGPIPE in the supervisor, and an ignored signal stays ignored across exec:
/// without this, `yes | head` in a task never ends (yes gets EPIPE forever instead of dying).
/// Async-signal-safe: one `signal` call.
pub(crate) fn restore_sigpipe() {
    // SAFETY: setting a disposition to SIG_DFL installs no handler.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}
