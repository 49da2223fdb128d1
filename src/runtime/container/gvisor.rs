//! The container under gVisor (`runsc`), for the newest wire's GVISOR profile: the task's
//! system calls go to gVisor's user-space kernel, not the host's.
//!
//! The same OCI configuration as a libcontainer container (rootfs, mounts, environment, user,
//! capabilities), less what gVisor does itself or cannot take: no seccomp filter (its sentry
//! is the filter), no cgroup path (`runsc run` runs, sandbox and gofer included, in the task's
//! cgroup, where the process runtime puts it with its limits: stats and kills work as for any
//! task). The bundle is `gvisor/` in the task directory, runsc's state `gvisor/state/`. The
//! network is the host's (runsc `--network=host`), or none for a task with a network of its
//! own (SANDBOX's promise).
//!
//! A stop signals every process of the cgroup, runsc's own included: the task is ended, not
//! asked (its SIGTERM handler may not run).

use std::path::{Path, PathBuf};

use nix::unistd::Pid;

use crate::runtime::process::ProcessRuntime;
use crate::runtime::{LaunchSpec, Runtime, RuntimeError, RuntimeKind, TaskIo};

/// The bundle directory in the task directory.
const BUNDLE: &str = "gvisor";
/// runsc's state, in the bundle directory.
const STATE: &str = "state";

/// Runs a task's container with `runsc run`, a plain child in the task's cgroup.
pub struct GvisorRuntime {
    runsc: PathBuf,
    runner: ProcessRuntime,
    /// (state root, container id) once created: what `remove` deletes.
    created: Option<(PathBuf, String)>,
}

impl GvisorRuntime {
    pub fn new(runsc: PathBuf) -> GvisorRuntime {
        GvisorRuntime { runsc, runner: ProcessRuntime::default(), created: None }
    }
}

/// The command that runs `spec`'s container from the bundle in `task_dir` (written by
/// [`write_bundle`]).
fn run_argv(runsc: &Path, spec: &LaunchSpec, task_dir: &Path) -> Vec<String> {
    let bundle = task_dir.join(BUNDLE);
    let network = if spec.own_network { "none" } else { "host" };
    vec![
        runsc.to_string_lossy().into_owned(),
        "--root".into(),
        bundle.join(STATE).to_string_lossy().into_owned(),
        format!("--network={network}"),
        "run".into(),
        "--bundle".into(),
        bundle.to_string_lossy().into_owned(),
        spec.id.clone(),
    ]
}

/// `spec` as the process runtime runs runsc with it: `argv` on the host, as root, in the task
/// directory and the task's cgroup (with its limits), PATH its only variable.
fn on_host(spec: &LaunchSpec, task_dir: &Path, argv: Vec<String>) -> LaunchSpec {
    LaunchSpec {
        runtime: RuntimeKind::Process,
        argv,
        env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
        cwd_in_task: task_dir.to_string_lossy().into_owned(),
        user: None,
        ..spec.clone()
    }
}

/// Writes the OCI bundle of `spec` for runsc into `task_dir/gvisor/`.
fn write_bundle(spec: &LaunchSpec, task_dir: &Path) -> Result<(), RuntimeError> {
    let bundle = task_dir.join(BUNDLE);
    // Errors name the task directory's entries, never a host path.
    let io = |op| move |source| RuntimeError::Io { op, path: PathBuf::from(BUNDLE), source };
    std::fs::create_dir_all(bundle.join(STATE)).map_err(io("creating"))?;
    let mut config = super::oci::build(spec)?;
    super::oci::add_hosts_file(&mut config, &bundle, &spec.hostname)?;
    if let Some(linux) = config.linux_mut() {
        linux.set_seccomp(None);
        linux.set_cgroups_path(None);
        linux.set_resources(None);
    }
    let path = bundle.join(crate::taskdir::OCI_CONFIG);
    config.save(&path).map_err(|_| RuntimeError::Spec(format!("writing {BUNDLE}/{}", crate::taskdir::OCI_CONFIG)))
}

impl Runtime for GvisorRuntime {
    fn create(&mut self, spec: &LaunchSpec, task_dir: &Path, io: TaskIo) -> Result<Pid, RuntimeError> {
        write_bundle(spec, task_dir)?;
        let runner = on_host(spec, task_dir, run_argv(&self.runsc, spec, task_dir));
        let pid = self.runner.create(&runner, task_dir, io)?;
        self.created = Some((task_dir.join(BUNDLE).join(STATE), spec.id.clone()));
        Ok(pid)
    }

    fn start(&mut self) -> Result<(), RuntimeError> {
        self.runner.start()
    }

    fn remove(&mut self) -> Result<(), RuntimeError> {
        if let Some((root, id)) = self.created.take() {
            // The sandbox is gone with the cgroup's processes; runsc forgets the container.
            let deleted = std::process::Command::new(&self.runsc)
                .arg("--root")
                .arg(&root)
                .args(["delete", "--force", &id])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
            if !deleted.is_ok_and(|s| s.success()) {
                tracing::warn!(id, "runsc could not delete the container (its state goes with the task directory)");
            }
        }
        self.runner.remove()
    }
}

/// Starts `argv` in the running gVisor container of `spec` (`runsc exec`), as the process
/// runtime starts an exec: in the task's cgroup, a session of its own. The command gets the
/// container's own process settings (environment, cwd, user, capabilities) through a
/// root-only process file: never on a command line, which any host user may read.
pub fn enter(
    spec: &LaunchSpec,
    task_dir: &Path,
    runsc: &Path,
    argv: &[String],
    io: TaskIo,
) -> Result<Pid, RuntimeError> {
    let bundle = task_dir.join(BUNDLE);
    let config_path = bundle.join(crate::taskdir::OCI_CONFIG);
    let unreadable = |why: String| RuntimeError::Spec(format!("the container's config: {why}"));
    let config: serde_json::Value = std::fs::read(&config_path)
        .map_err(|e| unreadable(e.kind().to_string()))
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| unreadable(e.to_string())))?;
    let mut process = config.get("process").cloned().ok_or_else(|| unreadable("no process".into()))?;
    process["args"] = serde_json::json!(argv);
    process["terminal"] = serde_json::json!(false);
    // The exec helper's pid names it: one helper runs one exec.
    let name = format!("exec-{}.json", std::process::id());
    let file = bundle.join(&name);
    let bytes = serde_json::to_vec(&process).map_err(|e| RuntimeError::Spec(e.to_string()))?;
    crate::taskdir::write_private(&file, &bytes).map_err(|source| RuntimeError::Io {
        op: "writing",
        path: PathBuf::from(&name),
        source,
    })?;
    let exec = vec![
        runsc.to_string_lossy().into_owned(),
        "--root".into(),
        bundle.join(STATE).to_string_lossy().into_owned(),
        "exec".into(),
        "--process".into(),
        file.to_string_lossy().into_owned(),
        spec.id.clone(),
    ];
    crate::runtime::process::enter(&on_host(spec, task_dir, vec![]), &exec, io)
}
