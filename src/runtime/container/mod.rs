//! The `container` runtime: youki's libcontainer, called in the single-threaded supervisor.
//!
//! Order of calls (docs/ARCHITECTURE.md, "Processes"): write config.json →
//! `ContainerBuilder … build()` (namespaces made, the init waits) → `start()` → the supervisor
//! reaps the init → `delete`.
//! `build` and `start` chdir the whole process and fork: never call them from a
//! multi-threaded process.

pub mod egress;
pub mod exec;
pub mod gvisor;
mod init;
pub use init::record_arg_area;
mod net_hierarchies;
mod oci;
pub mod seccomp;

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
    /// The container's filtered way out, when it has one.
    egress: Option<egress::Egress>,
}

fn lc_err(op: &'static str) -> impl FnOnce(libcontainer::error::LibcontainerError) -> RuntimeError {
    move |e| RuntimeError::Container { op, message: e.to_string() }
}

/// The directory libcontainer keeps a task's container state in (its `state.json`, the
/// copy of its config, its notify socket): in memory when the host has a tmpfs for it
/// ([`memory_state_base`]), as runc keeps its state in `/run/runc`; in the task directory
/// (`runtime/`) otherwise. The state lives only as long as the container, so a disk gains
/// nothing from holding it and costs the creation, rewrites and removal of five inodes per
/// task: on a loaded disk the removal alone took ~5 ms of a lifecycle (docs/ARCHITECTURE.md,
/// Performance). Derived from the task directory alone, so that the supervisor, an exec into the task and
/// a later worker's clean-up all find it.
pub fn state_root(task_dir: &Path) -> PathBuf {
    match memory_state_base() {
        Some(base) => memory_state_root(base, task_dir),
        None => disk_state_root(task_dir),
    }
}

fn disk_state_root(task_dir: &Path) -> PathBuf {
    task_dir.join(crate::taskdir::RUNTIME_STATE)
}

/// `<base>/<first 16 hex digits of the SHA-256 of the task directory's canonical path>`: one
/// directory per task directory (a task's environment build and setup steps have their own),
/// however its path was spelled.
fn memory_state_root(base: &Path, task_dir: &Path) -> PathBuf {
    use sha2::{Digest, Sha256};
    let canonical = std::fs::canonicalize(task_dir).unwrap_or_else(|_| task_dir.to_path_buf());
    let digest = Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    base.join(hex::encode(&digest[..8]))
}

/// The name of the directory of containers' state on a tmpfs.
const MEMORY_STATE_DIR: &str = "iris-worker-containers";

/// The tmpfs directory containers' state goes to on this host, decided once per process:
/// `/run/iris-worker-containers` when `/run` is a tmpfs (systemd hosts), else
/// `/dev/shm/iris-worker-containers`; `None` (the task directory then) when neither is a
/// tmpfs, or the directory is not one only this user can enter — `/dev/shm` is writable by
/// every user, and one of them may have made the name first.
pub fn memory_state_base() -> Option<&'static Path> {
    static BASE: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    BASE.get_or_init(|| {
        ["/run", "/dev/shm"]
            .iter()
            .map(Path::new)
            .filter(|p| is_tmpfs(p))
            .find_map(|p| private_dir(&p.join(MEMORY_STATE_DIR)))
    })
    .as_deref()
}

fn is_tmpfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

/// `dir`, made if missing, when it is a real directory (no symlink) of this user that no one
/// else may read, write or enter.
fn private_dir(dir: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if let Err(e) = std::fs::DirBuilder::new().mode(0o700).create(dir)
        && e.kind() != std::io::ErrorKind::AlreadyExists
    {
        return None;
    }
    let meta = std::fs::symlink_metadata(dir).ok()?;
    // The group's and others' permission bits.
    let shared = meta.mode() & 0o077;
    let ours = meta.file_type().is_dir() && meta.uid() == nix::unistd::geteuid().as_raw() && shared == 0;
    if !ours {
        tracing::warn!(dir = %dir.display(), "not a private directory of this user: containers' state stays on disk");
    }
    ours.then(|| dir.to_path_buf())
}

impl Runtime for ContainerRuntime {
    fn create(&mut self, spec: &LaunchSpec, task_dir: &Path, io: TaskIo) -> Result<Pid, RuntimeError> {
        super::phases::mark("create: begin");
        net_hierarchies::hide_net_hierarchies()?;
        super::phases::mark("net hierarchies hidden");
        let mut config = oci::build(spec)?;
        // The container's own /etc files go with its state (in memory where the host has a
        // tmpfs for it): no inode on the task directory's disk for them.
        let root = state_root(task_dir);
        std::fs::create_dir_all(&root).map_err(|source| RuntimeError::Io {
            op: "creating",
            path: "the container's state".into(),
            source,
        })?;
        oci::add_hosts_file(&mut config, &root, &spec.hostname)?;
        if spec.filtered_egress {
            oci::add_resolv_conf(&mut config, &root, egress::RESOLVER)?;
        }
        // The OCI config too (libcontainer reads it from the bundle directory, then keeps its
        // own copy in the container's state): the root is the bundle.
        let config_path = root.join(crate::taskdir::OCI_CONFIG);
        config.save(&config_path).map_err(|e| RuntimeError::Spec(format!("writing the OCI config: {e}")))?;
        super::phases::mark("config.json written");
        let seccomp = oci::seccomp_program(spec)?;
        super::phases::mark("seccomp program ready");
        self.state_dir = Some(root.join(&spec.id));
        let mut status = init::StatusPipe::new()
            .map_err(|e| RuntimeError::Container { op: "preparing", message: format!("a pipe: {e}") })?;
        let container = ContainerBuilder::new(spec.id.clone(), SyscallType::default())
            .with_root_path(&root)
            .map_err(lc_err("preparing"))?
            .with_stdout(io.stdout)
            .with_stderr(io.stderr)
            .with_executor(init::InitExecutor { status_fd: status.write_fd(), seccomp })
            .validate_id()
            .map_err(lc_err("naming"))?
            .as_init(&root)
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
        if spec.own_network && spec.filtered_egress {
            // Before the task runs: it never sees its network unfiltered.
            self.egress = Some(egress::attach(pid)?);
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
        // Its network is gone with the container: slirp4netns has nothing left to carry.
        self.egress = None;
        let deleted = match self.container.as_mut() {
            Some(container) => container.delete(true).map_err(lc_err("deleting")),
            None => {
                self.remove_leftovers();
                Ok(())
            }
        };
        if let Some(dir) = &self.state_dir {
            remove_memory_state(dir);
        }
        deleted?;
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
        if let Some(dir) = &self.state_dir {
            if let Ok(mut c) = Container::load(dir.clone()) {
                let _ = c.delete(true);
            }
            remove_memory_state(dir);
        }
    }
}

/// Removes a container a dead supervisor left behind (its state in the tmpfs or under
/// `task_dir`: both are looked at, in case the host's tmpfs changed since). Safe to call from
/// the worker: deleting does not fork.
pub fn remove_leftover(task_dir: &Path) {
    let memory = memory_state_base().map(|base| memory_state_root(base, task_dir));
    for root in memory.iter().cloned().chain([disk_state_root(task_dir)]) {
        let Ok(entries) = std::fs::read_dir(&root) else { continue };
        for entry in entries.flatten() {
            if let Ok(mut c) = Container::load(entry.path()) {
                let _ = c.delete(true);
            }
        }
    }
    if let Some(root) = memory {
        // What is left there — a container half made (the supervisor died before libcontainer
        // wrote its state), the container's /etc files — nothing else would ever remove.
        let _ = std::fs::remove_dir_all(root);
    }
}

/// Removes what is left of a container's state (`container_dir`) when it is in the tmpfs,
/// and its task's directory there: nothing else would (on disk, it goes with the task
/// directory). libcontainer's delete has removed `container_dir` already, unless it failed.
fn remove_memory_state(container_dir: &Path) {
    let Some(root) = container_dir.parent() else { return };
    if memory_state_base().is_some_and(|base| root.parent() == Some(base)) {
        // The root holds the container's /etc files beside its state: all of it goes.
        let _ = std::fs::remove_dir_all(root);
    }
}
