//! A command run inside a running task's container (the newest Iris wire's ExecInContainer),
//! through libcontainer's own exec path: its tenant builder, as `youki exec` and `runc exec` do.
//!
//! The tenant joins every namespace the task's init has (mount, pid, ipc, uts, and the network
//! namespace when the task has its own), the task's cgroup in every v1 hierarchy (so the task's
//! memory, CPU and pids limits count the exec too), and takes the task's capabilities, user,
//! no-new-privileges and cwd from the task's `config.json`; its environment is the task's.
//! Three things the tenant builder of libcontainer 0.7 does not carry over are done here:
//! - the seccomp filter: the task's configuration has none (its init loads the compiled filter
//!   itself, see `super::seccomp`), so [`ExecExecutor`] loads the same program, the one of the
//!   task's profile, as the last step before exec (after no-new-privileges is set, so no
//!   privilege is needed to load it);
//! - the hybrid host's unified cgroup, which the v1 manager never joins and where the BPF hooks
//!   that keep tasks off the worker's port are attached ([`crate::isolation`]): the caller joins
//!   it for the time of the build, so the tenant inherits it, then leaves again;
//! - the rlimits (nofile, and memlock for privileged tasks), set on the caller before the build
//!   and inherited.
//!
//! Like creating a container, this forks and `chdir`s the calling process: call it only from a
//! single-threaded process (the `iris-worker exec` helper, see [`crate::exec`]).

use std::os::fd::AsRawFd;
use std::path::Path;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use nix::unistd::Pid;
use oci_spec::runtime::{PosixRlimitType, Spec};

use super::{lc_err, net_hierarchies, state_root};
use crate::runtime::{LaunchSpec, RuntimeError, TaskIo};

/// Starts `argv` in the running container of `spec` (whose task directory is `task_dir`), with
/// `io` as its stdout and stderr (stdin is /dev/null). Returns its pid, a child of the caller,
/// once it has exec'd (or failed to: then it exits 126 or 127 with the reason on its stderr,
/// as a shell does).
pub fn enter(spec: &LaunchSpec, task_dir: &Path, argv: &[String], io: TaskIo) -> Result<Pid, RuntimeError> {
    // In the container's bundle; a container started by a worker before the config moved
    // there (its supervisor outlived the upgrade) has it in its task directory.
    let bundled = state_root(task_dir).join(crate::taskdir::OCI_CONFIG);
    let config_path = if bundled.exists() { bundled } else { task_dir.join(crate::taskdir::OCI_CONFIG) };
    let config = Spec::load(&config_path)
        .map_err(|e| RuntimeError::Container { op: "reading the configuration of", message: e.to_string() })?;
    let process = config.process().as_ref();
    apply_rlimits(process.and_then(|p| p.rlimits().as_ref()).map(Vec::as_slice).unwrap_or(&[]));
    let seccomp = match config.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
        // A task created by a worker that still had libcontainer load the profile: the
        // profile its configuration names, compiled the same way.
        Some(profile) => Some(super::seccomp::compile(profile).map_err(|e| RuntimeError::Spec(e.to_string()))?),
        None => super::oci::seccomp_program(spec)?,
    };
    // libcgroups joins every v1 hierarchy it finds mounted: hide net_cls/net_prio, as the
    // supervisor does before it creates the container.
    net_hierarchies::hide_net_hierarchies()?;
    let me = Pid::this();
    let back = match &spec.cgroup {
        Some((layout, path)) => layout.enter_unified(path, me)?,
        None => None,
    };
    let user = spec.user.clone().unwrap_or_default();
    let devnull = std::fs::File::open("/dev/null").map_err(|source| RuntimeError::Io {
        op: "opening",
        path: "/dev/null".into(),
        source,
    })?;
    let built = ContainerBuilder::new(spec.id.clone(), SyscallType::default())
        .with_root_path(state_root(task_dir))
        .map_err(lc_err("preparing an exec into"))?
        .with_stdin(std::os::fd::OwnedFd::from(devnull))
        .with_stdout(io.stdout)
        .with_stderr(io.stderr)
        .with_executor(ExecExecutor { seccomp })
        .as_tenant()
        .with_container_args(argv.to_vec())
        .with_cwd(Some(&spec.cwd_in_task))
        .with_user(Some(user.uid))
        .with_group(Some(user.gid))
        .with_additional_gids(user.additional_gids)
        .with_detach(true)
        .build();
    // Out of the task's unified cgroup again: the caller is not the task's.
    if let (Some(before), Some((layout, _))) = (back, &spec.cgroup)
        && let Err(e) = layout.enter_unified(&before, me)
    {
        tracing::warn!(error = %e, "leaving the task's unified cgroup");
    }
    built.map_err(lc_err("entering"))
}

/// Raises this process's limits to the task's (the tenant inherits them). A limit the caller
/// cannot set stays as it is: the task's own were set the same way.
fn apply_rlimits(rlimits: &[oci_spec::runtime::PosixRlimit]) {
    for r in rlimits {
        let resource = match r.typ() {
            PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
            PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
            _ => continue,
        };
        let limit = libc::rlimit { rlim_cur: r.soft(), rlim_max: r.hard() };
        // SAFETY: setrlimit with a valid resource and a live struct.
        unsafe { libc::setrlimit(resource, &limit) };
    }
}

/// libcontainer's last step in the exec'd process, already in the task's namespaces, cgroup,
/// user and capabilities: load the task's seccomp filter, then exec the command.
#[derive(Clone)]
struct ExecExecutor {
    seccomp: Option<super::seccomp::Program>,
}

impl Executor for ExecExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        // The helper blocks the signals it reads through a signalfd; a blocked mask survives
        // exec, and the command must see SIGTERM and SIGINT.
        // SAFETY: sigprocmask with an initialised empty set; this process has one thread.
        unsafe {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        }
        crate::runtime::restore_sigpipe();
        if let Some(program) = &self.seccomp {
            // An error here is returned: libcontainer sends it to the caller, which reports
            // that the exec could not be set up (nothing ran).
            program.load().map_err(|e| ExecutorError::Other(format!("the task's seccomp filter: {e}")))?;
        }
        let argv = spec.process().as_ref().and_then(|p| p.args().clone()).unwrap_or_default();
        let cargs: Vec<std::ffi::CString> =
            argv.iter().filter_map(|a| std::ffi::CString::new(a.as_bytes()).ok()).collect();
        let Some(program) = cargs.first() else { return Err(ExecutorError::InvalidArg) };
        if cargs.len() != argv.len() {
            return Err(ExecutorError::Other("the command contains a NUL byte".into()));
        }
        // The environment is the task's (libcontainer set it up before this step).
        let err = nix::unistd::execvp(program, &cargs).err().unwrap_or(nix::errno::Errno::EINVAL);
        // As a shell: 127 when there is no such command, 126 when it cannot be run.
        let code = if err == nix::errno::Errno::ENOENT { 127 } else { 126 };
        let msg = format!("iris-worker exec: {}: {}\n", argv[0], err.desc());
        // SAFETY: write to our own stderr, then _exit without the helper's destructors.
        unsafe {
            libc::write(std::io::stderr().as_raw_fd(), msg.as_ptr().cast(), msg.len());
            libc::_exit(code)
        }
    }

    fn validate(&self, _spec: &Spec) -> Result<(), ExecutorValidationError> {
        // A command that is not there is the command's failure (exit 127 with the reason on
        // stderr), not a failure to enter the container.
        Ok(())
    }
}
