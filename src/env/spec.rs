//! A task as the worker understands it: typed, validated, no protobuf.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cgroup::Limits;

/// What to run for a task: the validated form of a RunTask request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskSpec {
    pub task_id: String,
    pub job_id: String,
    pub task_index: i32,
    pub num_tasks: i32,
    pub attempt_id: i32,
    /// Our `command`: argv, run with `setup_commands` first.
    pub command: Option<Command>,
    /// A pickled Iris entrypoint (run by the Python environment).
    pub serialized_entrypoint: Option<Vec<u8>>,
    pub env_vars: BTreeMap<String, String>,
    /// `uv sync --extra` names for the bundle's project.
    pub extras: Vec<String>,
    /// Packages installed into the venv after the project's dependencies.
    pub pip_packages: Vec<String>,
    pub image: Option<String>,
    pub bundle_gcs_path: Option<String>,
    /// Our `bundle_sha256`: the bundle must hash to this (hex).
    pub bundle_sha256: Option<String>,
    pub timeout: Option<Duration>,
    /// Names of host ports to allocate; each becomes IRIS_PORT_<NAME>.
    pub ports: Vec<String>,
    pub limits: Limits,
    /// `resources.disk_bytes`: the workdir, /tmp and (images) the rootfs' writes together at
    /// most; the task fails past it.
    pub disk_bytes: Option<u64>,
    /// Ours: a cap of the task's log below the worker's `--max-log-bytes`.
    pub max_log_bytes: Option<u64>,
    /// Files written into the workdir before start: (relative path, content).
    pub workdir_files: Vec<(String, Vec<u8>)>,
    /// The request as received, kept in the task directory.
    pub raw_request: Vec<u8>,
    /// The newest Iris wire's identity of the attempt (16 hex characters from the controller):
    /// such a task runs in Iris's newest layout (see `env/prepare/newest.rs`), and the same task and
    /// attempt id may come back under a fresh uid.
    pub attempt_uid: Option<String>,
    /// The newest wire's large workdir files, fetched at start: (relative path, URL, sha256).
    pub workdir_file_refs: Vec<(String, String, String)>,
    /// The newest wire's secrets (`environment.secrets`): delivered to the task as files.
    pub secrets: Secrets,
    /// The newest wire's container profile (the controller authorized it); `None`: the
    /// worker's `--profile`.
    pub container_profile: Option<ContainerProfile>,
    /// The newest wire's attempt asks for a TPU (`resources.device.tpu`): as Iris runs one, it
    /// is privileged whatever its profile (the device needs it), with memlock raised and a
    /// /dev/shm of its memory limit (100 GiB without one).
    pub tpu: bool,
    /// The newest wire's attempt has no network (`egress_policy` NONE, or SANDBOX's default):
    /// a network namespace of its own with nothing but `lo`.
    pub no_network: bool,
    /// The newest wire's attempt reaches public addresses only (`egress_policy` INTERNET, and
    /// SANDBOX's default): a network namespace of its own with a filtered way out.
    pub internet_only: bool,
}

/// Secrets by file name. They reach the task only as root-only files (see
/// `env/prepare/newest.rs`); their `Debug` shows the names, never the values, so a logged spec
/// cannot leak them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secrets(pub BTreeMap<String, String>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// Iris's container profiles (the newest wire's `ContainerProfile`), as this worker serves
/// them (docs/ARCHITECTURE.md has the table). GVISOR is refused when the request is read on a
/// host without gVisor's `runsc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerProfile {
    /// No capability, no-new-privileges, the seccomp filter.
    Restricted,
    /// RESTRICTED plus CAP_SYS_PTRACE (UNSPECIFIED means this).
    Default,
    /// DEFAULT plus the host's Docker socket at `/var/run/docker.sock`.
    DockerAccess,
    /// Every capability, no seccomp filter, the host's devices.
    Privileged,
    /// DEFAULT in a network namespace of its own with nothing but `lo`.
    Sandbox,
    /// The container under gVisor's `runsc` with the default capabilities, on the host's
    /// network.
    Gvisor,
}

/// An argv with optional shell lines to run before it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub argv: Vec<String>,
    pub setup_commands: Vec<String>,
}

impl Command {
    /// The argv that runs the setup lines, then execs the command with its arguments intact.
    pub fn to_argv(&self) -> Vec<String> {
        if self.setup_commands.is_empty() {
            return self.argv.clone();
        }
        let script = format!("set -e\n{}\nexec \"$@\"", self.setup_commands.join("\n"));
        let mut argv = vec!["/bin/sh".to_string(), "-c".to_string(), script, "iris-setup".to_string()];
        argv.extend(self.argv.iter().cloned());
        argv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_commands_run_before_the_argv_through_sh() {
        let c = Command { argv: vec!["echo".into(), "a b".into()], setup_commands: vec!["cd /tmp".into()] };
        let argv = c.to_argv();
        assert_eq!(argv[0], "/bin/sh");
        assert!(argv[2].starts_with("set -e\ncd /tmp\n"));
        assert_eq!(&argv[4..], &["echo".to_string(), "a b".to_string()]);
        let plain = Command { argv: vec!["true".into()], setup_commands: vec![] };
        assert_eq!(plain.to_argv(), vec!["true".to_string()]);
    }
}
