//! `spec.json`: everything the supervisor needs to run a task, written by the worker.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cgroup::{Layout, Limits};

/// How a task is isolated.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// A libcontainer container (namespaces, seccomp, capabilities dropped).
    #[default]
    Container,
    /// A plain child process in the task's cgroup, for hosts without container support.
    Process,
}

/// The security profile of a container (the README has the table).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Namespaces, a small capability set, no-new-privileges, seccomp, masked /proc paths.
    #[default]
    Restricted,
    /// For TPU/GPU hosts: all capabilities, host devices, no seccomp, unlimited memlock.
    Privileged,
    /// The newest Iris wire's RESTRICTED: as `Restricted`, but no capability at all (Docker's
    /// `--cap-drop ALL`). Not a worker-wide choice: a request's.
    #[value(skip)]
    #[serde(rename = "no-capabilities")]
    NoCapabilities,
    /// The newest Iris wire's DEFAULT: as `NoCapabilities`, plus CAP_SYS_PTRACE and the
    /// tracing syscalls the seccomp filter refuses otherwise (`--cap-drop ALL --cap-add
    /// SYS_PTRACE`, so that py-spy can read a task's own processes).
    #[value(skip)]
    #[serde(rename = "ptrace-only")]
    PtraceOnly,
}

/// A bind mount of a host path into the task.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Mount {
    pub host: PathBuf,
    pub target: String,
    pub read_only: bool,
}

/// What the supervisor runs. Paths are host paths unless named `*_in_task`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LaunchSpec {
    pub runtime: RuntimeKind,
    pub profile: Profile,
    /// The container id (unique on this host, valid for libcontainer).
    pub id: String,
    pub argv: Vec<String>,
    /// `KEY=VALUE` strings.
    pub env: Vec<String>,
    pub cwd_in_task: String,
    pub hostname: String,
    /// The root filesystem (read-only for containers: it is shared between tasks).
    pub rootfs: PathBuf,
    pub mounts: Vec<Mount>,
    pub limits: Limits,
    /// Size of /dev/shm.
    pub shm_bytes: u64,
    /// The task's cgroup path, and the host's layout; `None` when cgroups are not usable.
    pub cgroup: Option<(Layout, String)>,
    /// Kill the task after this many milliseconds of running.
    pub timeout_ms: Option<u64>,
    /// Where the output is logged, when not the task directory's `logs/` (an environment
    /// build logs into the log of the task it builds for).
    #[serde(default)]
    pub log_dir: Option<PathBuf>,
    /// Log both stdout and stderr under this source (`build` for environment builds).
    #[serde(default)]
    pub log_source: Option<crate::logs::Source>,
    /// The rootfs is this task's own overlay mount (an image): writable, and unmounted by
    /// the supervisor once the task is gone.
    #[serde(default)]
    pub rootfs_overlay: bool,
    /// Who the command runs as (an image's `User`); root when `None`.
    #[serde(default)]
    pub user: Option<TaskUser>,
    /// `resources.disk_bytes`, enforced by the supervisor.
    #[serde(default)]
    pub disk_limit: Option<DiskLimit>,
    /// Cache entries the task uses (bundle, venv, image layers, uv's cache for a build): the
    /// supervisor holds them share-locked until it exits, so no process evicts them while the
    /// task runs, even across a worker restart.
    #[serde(default)]
    pub leases: Vec<crate::cachelock::Lease>,
    /// A network namespace of its own, empty but for `lo` (the newest wire's SANDBOX); the
    /// task shares the host's network otherwise.
    #[serde(default)]
    pub own_network: bool,
    /// Run the container under gVisor: the `runsc` to run it with (the newest wire's GVISOR
    /// profile); libcontainer otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gvisor: Option<std::path::PathBuf>,
    /// With `own_network`: a way out to public addresses only (the newest wire's
    /// `egress_policy` INTERNET; see `runtime::container::egress`).
    #[serde(default)]
    pub filtered_egress: bool,
}

/// The most the task may keep on disk: the files below `paths` (its workdir, its rootfs'
/// upper layer, the process runtime's /tmp) and a container's /tmp together. The supervisor
/// measures them periodically and kills the task past `bytes`, as kubelet evicts a pod over
/// its ephemeral-storage limit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskLimit {
    pub bytes: u64,
    pub paths: Vec<PathBuf>,
}

impl LaunchSpec {
    /// The size of a container's /tmp (a tmpfs, whose pages count in the task's memory): the
    /// disk limit and the memory limit, the smaller when both are set; the kernel's default
    /// (half the host's memory) when neither is.
    pub fn tmp_bytes(&self) -> Option<u64> {
        match (self.disk_limit.as_ref().map(|d| d.bytes), self.limits.memory_bytes) {
            (Some(d), Some(m)) => Some(d.min(m)),
            (d, m) => d.or(m),
        }
    }
}

/// A numeric user, group and supplementary groups.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TaskUser {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}
