//! The `container` runtime: youki's libcontainer, called in the single-threaded supervisor.
//!
//! Order of calls (see ENVIRONMENT.md): write config.json → `ContainerBuilder … build()`
//! (namespaces made, the init waits) → `start()` → the supervisor reaps the init → `delete`.
//! `build` and `start` chdir the whole process and fork: never call them from a
//! multi-threaded process.

pub mod exec;
pub mod gvisor;
mod init;
pub use init::record_arg_area;
mod net_hierarchies;
mod oci;
mod seccomp;

use std::path::{Path, PathBuf};

use libcontainer::container::Container;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::wait::WaitStatus;
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
    /// Where the container's init reports how the task's command ended.
    status: Option<init::StatusPipe>,
}

fn lc_err(op: &'static str) -> impl FnOnce(libcontainer::error::LibcontainerError) -> RuntimeError {
    move |e| RuntimeError::Container { op, message: e.to_string() }
}

/// The directory libcontainer keeps its state in, below the task directory.
pub fn state_root(task_dir: &Path) -> PathBuf {
    task_dir.join(crate::taskdir::RUNTIME_STATE)
}

impl Runtime for ContainerRuntime {
    fn create(&mut self, spec: &LaunchSpec, task_dir: &Path, io: TaskIo) -> Result<Pid, RuntimeError> {
        super::phases::mark("create: begin");
        net_hierarchies::hide_net_hierarchies()?;
        super::phases::mark("net hierarchies hidden");
        let mut config = oci::build(spec)?;
        oci::add_hosts_file(&mut config, task_dir, &spec.hostname)?;
        let config_path = task_dir.join(crate::taskdir::OCI_CONFIG);
        config.save(&config_path).map_err(|e| RuntimeError::Spec(format!("writing {}: {e}", config_path.display())))?;
        super::phases::mark("config.json written");
        let root = state_root(task_dir);
        self.state_dir = Some(root.join(&spec.id));
        let mut status = init::StatusPipe::new()
            .map_err(|e| RuntimeError::Container { op: "preparing", message: format!("a pipe: {e}") })?;
        let container = ContainerBuilder::new(spec.id.clone(), SyscallType::default())
            .with_root_path(&root)
            .map_err(lc_err("preparing"))?
            .with_stdout(io.stdout)
            .with_stderr(io.stderr)
            .with_executor(init::InitExecutor { status_fd: status.write_fd() })
            .validate_id()
            .map_err(lc_err("naming"))?
            .as_init(task_dir)
            .with_systemd(false)
            .with_detach(true)
            .build();
        super::phases::mark("built: init waits");
        // The init has its copy of the write end now; ours would keep the pipe from ever
        // reading as empty.
        status.close_write();
        self.status = Some(status);
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
            super::phases::mark("joined the unified cgroup");
        }
        Ok(pid)
    }

    fn start(&mut self) -> Result<(), RuntimeError> {
        let Some(container) = self.container.as_mut() else {
            return Err(RuntimeError::Container { op: "starting", message: "not created".into() });
        };
        super::phases::mark("start: begin");
        let started = container.start().map_err(lc_err("starting"));
        super::phases::mark("started");
        started
    }

    fn command_status(&mut self, init: WaitStatus) -> WaitStatus {
        self.status.as_ref().and_then(init::StatusPipe::status).unwrap_or(init)
    }

    fn signals_through_init(&self) -> bool {
        true
    }

    fn remove(&mut self) -> Result<(), RuntimeError> {
        match self.container.as_mut() {
            Some(container) => container.delete(true).map_err(lc_err("deleting"))?,
            None => self.remove_leftovers(),
        }
        super::phases::mark("container deleted");
        // libcontainer removed the v1 directories; what remains is the unified one, if any.
        if let Some((layout, path)) = self.cgroup.take() {
            layout.remove(&path)?;
            super::phases::mark("unified cgroup removed");
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
