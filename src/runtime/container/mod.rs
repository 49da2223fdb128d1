//! The `container` runtime: youki's libcontainer, called in the single-threaded supervisor.
//!
//! Order of calls (see ENVIRONMENT.md): write config.json → `ContainerBuilder … build()`
//! (namespaces made, the init waits) → `start()` → the supervisor reaps the init → `delete`.
//! `build` and `start` chdir the whole process and fork: never call them from a
//! multi-threaded process.

mod oci;
mod seccomp;

use std::path::{Path, PathBuf};

use libcontainer::container::Container;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use nix::unistd::Pid;

use super::{LaunchSpec, Runtime, RuntimeError, TaskIo};

pub use seccomp::DENIED_SYSCALLS;

/// Runs tasks in libcontainer containers.
#[derive(Default)]
pub struct ContainerRuntime {
    container: Option<Container>,
    /// Where libcontainer keeps this container's state (`<task-dir>/runtime/<id>`).
    state_dir: Option<PathBuf>,
    /// The task's cgroup, whose directory in a hybrid host's unified tree is ours to remove.
    cgroup: Option<(crate::cgroup::Layout, String)>,
}

fn lc_err(op: &'static str) -> impl FnOnce(libcontainer::error::LibcontainerError) -> RuntimeError {
    move |e| RuntimeError::Container { op, message: e.to_string() }
}

/// The directory libcontainer keeps its state in, below the task directory.
pub fn state_root(task_dir: &Path) -> PathBuf {
    task_dir.join("runtime")
}

impl Runtime for ContainerRuntime {
    fn create(&mut self, spec: &LaunchSpec, task_dir: &Path, io: TaskIo) -> Result<Pid, RuntimeError> {
        let config = oci::build(spec)?;
        let config_path = task_dir.join("config.json");
        config.save(&config_path).map_err(|e| RuntimeError::Spec(format!("writing {}: {e}", config_path.display())))?;
        let root = state_root(task_dir);
        self.state_dir = Some(root.join(&spec.id));
        let container = ContainerBuilder::new(spec.id.clone(), SyscallType::default())
            .with_root_path(&root)
            .map_err(lc_err("preparing"))?
            .with_stdout(io.stdout)
            .with_stderr(io.stderr)
            .with_executor(UnmaskingExecutor)
            .validate_id()
            .map_err(lc_err("naming"))?
            .as_init(task_dir)
            .with_systemd(false)
            .with_detach(true)
            .build();
        let container = match container {
            Ok(c) => c,
            Err(e) => {
                // A half-made container (cgroup, state dir) must not outlive the failure.
                self.remove_leftovers();
                return Err(lc_err("creating")(e));
            }
        };
        let pid = container.pid().ok_or_else(|| RuntimeError::Container {
            op: "creating",
            message: "libcontainer returned no init pid".into(),
        })?;
        self.container = Some(container);
        if let Some((layout, path)) = &spec.cgroup {
            // On a hybrid host libcontainer joins the v1 hierarchies only; the init joins the
            // unified tree before it runs anything, so the task's sockets belong to the cgroup
            // the worker's connect hook is attached above (see crate::isolation).
            self.cgroup = Some((layout.clone(), path.clone()));
            layout.join_unified(path, pid)?;
        }
        Ok(pid)
    }

    fn start(&mut self) -> Result<(), RuntimeError> {
        let Some(container) = self.container.as_mut() else {
            return Err(RuntimeError::Container { op: "starting", message: "not created".into() });
        };
        container.start().map_err(lc_err("starting"))
    }

    fn remove(&mut self) -> Result<(), RuntimeError> {
        match self.container.as_mut() {
            Some(container) => container.delete(true).map_err(lc_err("deleting"))?,
            None => self.remove_leftovers(),
        }
        // libcontainer removed the v1 directories; what remains is the unified one, if any.
        if let Some((layout, path)) = self.cgroup.take() {
            layout.remove(&path)?;
        }
        Ok(())
    }
}

impl ContainerRuntime {
    fn remove_leftovers(&mut self) {
        if let Some(dir) = &self.state_dir
            && let Ok(mut c) = Container::load(dir.clone())
        {
            let _ = c.delete(true);
        }
    }
}

/// Runs the task's command like libcontainer's default executor, after restoring the signal
/// mask and SIGPIPE: the supervisor blocks the signals it reads through its signalfd, and a
/// blocked mask survives exec — the task would never see SIGTERM; and Rust's runtime ignores
/// SIGPIPE, which survives exec too — `yes | head` in the task would never end.
#[derive(Clone)]
struct UnmaskingExecutor;

impl Executor for UnmaskingExecutor {
    fn exec(&self, spec: &oci_spec::runtime::Spec) -> Result<(), ExecutorError> {
        let _ = nix::sys::signal::sigprocmask(
            nix::sys::signal::SigmaskHow::SIG_SETMASK,
            Some(&nix::sys::signal::SigSet::empty()),
            None,
        );
        crate::runtime::restore_sigpipe();
        let result = libcontainer::workload::default::get_executor().exec(spec);
        if let Err(e) = &result {
            // The task's stderr is the log: say there why the command never ran.
            let argv0 = spec.process().as_ref().and_then(|p| p.args().as_ref()).and_then(|a| a.first().cloned());
            eprintln!("iris-worker: cannot run {:?}: {e}", argv0.unwrap_or_default());
        }
        result
    }

    fn validate(&self, spec: &oci_spec::runtime::Spec) -> Result<(), ExecutorValidationError> {
        libcontainer::workload::default::get_executor().validate(spec)
    }
}

/// Removes a container a dead supervisor left behind (its state under `task_dir`). Safe to
/// call from the worker: deleting does not fork.
pub fn remove_leftover(task_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(state_root(task_dir)) else { return };
    for entry in entries.flatten() {
        if let Ok(mut c) = Container::load(entry.path()) {
            let _ = c.delete(true);
        }
    }
}
