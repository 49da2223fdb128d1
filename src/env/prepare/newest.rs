//! BUILDING for an attempt of the newest Iris wire (a spec with an attempt uid), laid out as
//! Iris's newest worker lays it out: the bundle unpacked into the task's workdir and the
//! entrypoint's workdir files beside it, the workdir at `/app` (= `$IRIS_WORKDIR`, read-write),
//! the setup commands run in order in a step of their own (a throw-away container with a
//! memory floor, logged as `build`; a failure fails the task with their last lines), then the
//! run command, in the workdir, with the newest `IRIS_*` environment.
//!
//! The root filesystem: the request's `task_image`, else the worker's default task image
//! (Iris's `defaults.default_task_image`), each pulled through the image store (no Docker) and
//! mounted as the attempt's own overlay, with the image's variables and user; without either,
//! the python rootfs (bash and python3, as Iris's task image has them).
//!
//! Secrets (`environment.secrets`) are files, as Iris delivers them: `$RIGGING_SECRETS_DIR`
//! (`/run/rigging/secrets`) holds one root-only file per secret, read-only; in a container the
//! task's `/run` is that directory tree (the shared rootfs has no `/run/rigging` to mount on).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{Environments, Preparing};
use crate::env::spec::{ContainerProfile, TaskSpec};
use crate::runtime::{LaunchSpec, Mount, Profile, RuntimeKind};

/// Where the workdir is in the task (Iris's `/app`).
pub const WORKDIR_IN_TASK: &str = "/app";

/// The script that runs the command (passed as `"$@"`): Iris's `_run.sh` (cd into the
/// workdir, the venv's activate when there is one, exec). The setup commands ran before, in a
/// step of their own ([`setup_spec`]).
fn run_script() -> String {
    let mut s = String::from("set -e\n");
    s.push_str(
        "cd \"$IRIS_WORKDIR\"\nif [ -f \"$IRIS_VENV/bin/activate\" ]; then . \"$IRIS_VENV/bin/activate\"; fi\nexec \"$@\"",
    );
    s
}

/// The task's environment: PATH and HOME, the request's variables (with what the wire layer
/// put there: the task's id with its attempt, uid, token, ...), then what the worker knows.
pub(super) fn task_env(
    spec: &TaskSpec,
    worker: &crate::env::WorkerEnv,
    ports: &BTreeMap<String, u16>,
    workdir: &str,
    python: &str,
    secrets_dir: Option<&str>,
) -> Vec<String> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    env.insert("HOME".into(), "/root".into());
    for (k, v) in &spec.env_vars {
        env.insert(k.clone(), v.clone());
    }
    let venv = format!("{}/.venv", workdir.trim_end_matches('/'));
    let mut set = |k: &str, v: String| {
        env.insert(k.to_string(), v);
    };
    set("IRIS_WORKDIR", workdir.to_string());
    set("IRIS_PYTHON", python.to_string());
    set("IRIS_VENV", venv.clone());
    set("UV_PROJECT_ENVIRONMENT", venv);
    set("IRIS_NUM_TASKS", spec.num_tasks.to_string());
    set("IRIS_WORKER_ID", worker.worker_id.clone());
    set("IRIS_BIND_HOST", worker.bind_host.clone());
    set("IRIS_ADVERTISE_HOST", worker.advertise_host.clone());
    if let Some(c) = &worker.controller_address {
        set("IRIS_CONTROLLER_ADDRESS", c.clone());
        set("IRIS_CONTROLLER_URL", c.clone());
    }
    for (name, port) in ports {
        set(&format!("IRIS_PORT_{}", name.to_ascii_uppercase()), port.to_string());
    }
    if let Some(dir) = secrets_dir {
        set("RIGGING_SECRETS_DIR", dir.to_string());
    }
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// Makes the launch spec of a newest-wire attempt (the workdir files are written already).
pub(super) async fn prepare(
    envs: &Environments,
    task: &dyn Preparing,
    spec: &TaskSpec,
    workdir: PathBuf,
) -> Result<LaunchSpec, crate::env::EnvError> {
    let Some(command) = &spec.command else {
        return Err(crate::env::EnvError::NoRunCommand);
    };
    if command.argv.is_empty() {
        return Err(crate::env::EnvError::EmptyRunCommand);
    }
    if !spec.workdir_file_refs.is_empty() {
        task.progress("downloading workdir files");
        for (rel, url, sha256) in &spec.workdir_file_refs {
            fetch_ref(envs, &workdir, rel, url, sha256).await?;
        }
    }
    if let Some(url) = &spec.bundle_gcs_path {
        let bundle = super::fetch_bundle(envs, task, url, spec.bundle_sha256.as_deref()).await?;
        task.progress("unpacking the bundle into the workdir");
        let (from, to) = (bundle.dir.clone(), workdir.clone());
        tokio::task::spawn_blocking(move || copy_tree(&from, &to))
            .await
            .map_err(crate::env::EnvError::CopyingBundle)?
            .map_err(crate::env::EnvError::CopyBundle)?;
    }
    // Secrets: root-only files in the task directory; in a container they are its /run,
    // read-only (the shared rootfs has no /run/rigging to mount on).
    let secrets_run = if spec.secrets.0.is_empty() {
        None
    } else {
        Some(crate::taskdir::write_secrets(task.dir(), &spec.secrets.0).map_err(crate::env::EnvError::Secrets)?)
    };
    let config = &envs.config;
    let mut argv = vec!["bash".to_string(), "-c".to_string(), run_script(), "iris-run".into()];
    argv.extend(command.argv.iter().cloned());
    let image = spec.image.as_ref().or(config.default_task_image.as_ref());
    let mut in_image = None;
    let (rootfs, mounts, cwd, python) = match config.runtime {
        RuntimeKind::Container => {
            let rootfs = match image {
                Some(reference) => {
                    let (rootfs, image) = mount_image(envs, task, reference).await?;
                    in_image = Some(image);
                    rootfs
                }
                None => envs.venvs().config().python_rootfs.clone(),
            };
            // The python rootfs is the worker's own, checked here; an image is not looked into
            // from the host (its links may point anywhere there): one without bash fails at
            // exec, exit 127.
            if image.is_none() && !rootfs.join("bin/bash").exists() && !rootfs.join("usr/bin/bash").exists() {
                return Err(crate::env::EnvError::NoPythonRootfsForNewest);
            }
            let mut mounts = vec![Mount { host: workdir.clone(), target: WORKDIR_IN_TASK.into(), read_only: false }];
            if let Some(run) = &secrets_run {
                mounts.push(Mount { host: run.clone(), target: "/run".into(), read_only: true });
            }
            // Iris's `python` in a task image; Debian's python rootfs has only `python3`.
            let python = if image.is_some() { "python" } else { "python3" };
            (rootfs, mounts, WORKDIR_IN_TASK.to_string(), python)
        }
        RuntimeKind::Process => {
            if let Some(reference) = image {
                return Err(crate::env::EnvError::ImageNeedsContainers(reference.clone()));
            }
            (PathBuf::from("/"), vec![], workdir.to_string_lossy().into_owned(), "python3")
        }
    };
    let secrets_dir = secrets_run.map(|run| match config.runtime {
        RuntimeKind::Container => format!("/run/{}", crate::taskdir::SECRETS_BELOW_RUN),
        RuntimeKind::Process => run.join(crate::taskdir::SECRETS_BELOW_RUN).to_string_lossy().into_owned(),
    });
    let mut env = task_env(spec, &config.env, task.ports(), &cwd, python, secrets_dir.as_deref());
    if let Some(image) = &in_image {
        env = with_image_env(&image.config.env, env, spec.env_vars.contains_key("PATH"));
    }
    if spec.container_profile == Some(ContainerProfile::Sandbox) {
        // As Iris's sandbox: no way back to the cluster from an untrusted task.
        env.retain(|v| !SANDBOX_WITHHELD.iter().any(|k| v.starts_with(&format!("{k}="))));
    }
    let mut launch = super::launch_spec(envs, task, spec, argv, env, cwd, rootfs, mounts);
    if let Some(image) = &in_image {
        launch.rootfs_overlay = true;
        launch.user = image.user.clone();
        if let Some(disk) = launch.disk_limit.as_mut() {
            // What the task writes into its rootfs lands in its overlay's upper layer.
            disk.paths.push(task.dir().join(crate::env::image::OVERLAY).join("upper"));
        }
    }
    if let Some(profile) = spec.container_profile {
        apply_profile(&mut launch, profile)?;
    }
    if spec.tpu {
        for_tpu(&mut launch);
    }
    if spec.no_network || spec.internet_only {
        if launch.runtime == RuntimeKind::Process {
            let policy = if spec.no_network { "NONE" } else { "INTERNET" };
            return Err(crate::env::EnvError::NetworkNeedsContainers(policy));
        }
        launch.own_network = true;
        launch.filtered_egress = spec.internet_only;
    }
    if !command.setup_commands.is_empty() {
        task.progress("syncing dependencies");
        let logs = task.dir().join(crate::taskdir::LOGS);
        run_setup(envs, task, setup_spec(&launch, &command.setup_commands, logs)).await?;
    }
    Ok(launch)
}

/// The attempt's image, mounted as its own overlay rootfs.
struct InImage {
    config: crate::env::image::ImageConfig,
    user: Option<crate::runtime::TaskUser>,
}

/// Pulls `reference` through the image store (no Docker) and mounts it as the task's own
/// rootfs; the task holds its layers until it ends. A failure after the mount leaves it to the
/// task manager, which releases a prepared rootfs whatever failed.
async fn mount_image(
    envs: &Environments,
    task: &dyn Preparing,
    reference: &str,
) -> Result<(PathBuf, InImage), crate::env::EnvError> {
    use crate::env::EnvError;
    let failed = |source| EnvError::Image { reference: reference.to_string(), source };
    let store = envs.image_store().await?;
    task.progress(&format!("pulling image {reference}"));
    let image = store.pull(reference).await.map_err(failed)?;
    let rootfs = store.mount(&image, task.dir()).map_err(failed)?;
    task.hold_image(&image);
    let user = match image.config.user.as_str() {
        "" | "root" | "0" | "0:0" => None,
        u => Some(
            crate::env::image::user::resolve(u, &rootfs)
                .map_err(|reason| EnvError::ImageUser { reference: reference.to_string(), reason })?,
        ),
    };
    Ok((rootfs, InImage { config: image.config.clone(), user }))
}

/// The image's variables under the task's: a task variable wins, except PATH, which the image
/// knows best (where its programs are) unless the request sets it.
fn with_image_env(image: &[String], task: Vec<String>, request_sets_path: bool) -> Vec<String> {
    let key = |v: &str| v.split('=').next().unwrap_or_default().to_string();
    let image_path = image.iter().any(|v| key(v) == "PATH");
    let mut env: Vec<String> = image.to_vec();
    for var in task {
        let k = key(&var);
        if k == "PATH" && image_path && !request_sets_path {
            continue;
        }
        env.retain(|e| key(e) != k);
        env.push(var);
    }
    env
}

/// A setup step's memory limit at least (Iris's build container: max(32 GiB, the task's)).
const SETUP_MEMORY_FLOOR: u64 = 32 << 30;

/// The setup commands' own step, as Iris runs them: a throw-away container like the task's
/// (same rootfs, mounts, environment, workdir, profile) but its own cgroup beside the task's,
/// a memory limit of at least [`SETUP_MEMORY_FLOOR`], no devices, its output logged as `build`;
/// each command run by bash in order, announced as `[iris setup] step i/N`, stopping at the
/// first that fails.
fn setup_spec(task: &LaunchSpec, steps: &[String], task_logs: PathBuf) -> LaunchSpec {
    let mut s = task.clone();
    s.id = format!("{}.setup", task.id);
    s.argv = vec![
        "bash".into(),
        "-c".into(),
        "set -e; n=$#; i=0; for step in \"$@\"; do i=$((i+1)); echo \"[iris setup] step $i/$n\"; bash -c \"$step\"; done"
            .into(),
        "iris-setup".into(),
    ];
    s.argv.extend(steps.iter().cloned());
    s.limits.memory_bytes = Some(task.limits.memory_bytes.unwrap_or(0).max(SETUP_MEMORY_FLOOR));
    s.cgroup = task.cgroup.as_ref().map(|(layout, path)| (layout.clone(), format!("{path}.setup")));
    // Into the task's log (its supervisor would otherwise write one of its own in `build/`).
    s.log_dir = Some(task_logs);
    s.log_source = Some(crate::logs::Source::Build);
    if s.profile == crate::runtime::Profile::Privileged {
        s.profile = crate::runtime::Profile::default();
    }
    s
}

/// Runs the setup step under a supervisor of its own in the task's `setup/` directory (where
/// a kill of the BUILDING task reaches it) and waits for it; a failure fails the task with the
/// step's last lines.
async fn run_setup(envs: &Environments, task: &dyn Preparing, setup: LaunchSpec) -> Result<(), crate::env::EnvError> {
    use crate::env::EnvError;
    let step = task.dir().join(crate::taskdir::SETUP);
    let could_not = |why: String| EnvError::SetupFailed { status: "they could not start".into(), detail: why };
    let _ = std::fs::remove_dir_all(&step);
    std::fs::create_dir_all(&step).map_err(|e| could_not(format!("making their directory: {}", e.kind())))?;
    crate::taskdir::write_json(&step, crate::taskdir::SPEC, &setup).map_err(|e| could_not(e.reason()))?;
    // A kill from here on finds the step's directory and leaves its request there, which the
    // step's supervisor reads once it runs; one asked for before is seen now.
    if task.killed() {
        return Err(EnvError::SetupFailed {
            status: "the attempt was killed".into(),
            detail: "before they ran".into(),
        });
    }
    let exit = crate::supervisor::handle::run_to_exit(&envs.venvs().config().supervisor_exe, &step).await;
    let status = match &exit {
        Ok(e) if e.exit_code == Some(0) => return Ok(()),
        Ok(e) => match (&e.error, e.exit_code, e.signal) {
            (Some(err), _, _) => {
                // Its message names host paths (mounts, the rootfs): the worker's log has it.
                tracing::warn!(task = %task.id(), error = %err, "the setup step could not start");
                "they could not start; the worker's log says why".into()
            }
            (None, Some(code), _) => format!("exit code {code}"),
            (None, None, Some(sig)) => format!("killed by signal {sig}"),
            _ => "no exit status".into(),
        },
        Err(e) => {
            tracing::warn!(task = %task.id(), error = %e, "the setup step's supervisor failed");
            "their supervisor failed; the worker's log says why".into()
        }
    };
    Err(EnvError::SetupFailed { status, detail: setup_log_tail(&task.dir().join(crate::taskdir::LOGS)) })
}

/// The last [`SETUP_TAIL`] lines the setup step printed, joined with ` | `.
fn setup_log_tail(log_dir: &std::path::Path) -> String {
    let filter = crate::logs::LogFilter {
        start_line: -(SETUP_TAIL as i64),
        source: Some(crate::logs::Source::Build),
        ..Default::default()
    };
    let lines = crate::logs::read(log_dir, &filter).unwrap_or_default();
    let text: Vec<&str> = lines.iter().map(|l| l.data.trim()).filter(|l| !l.is_empty()).collect();
    if text.is_empty() { "no output".into() } else { text.join(" | ") }
}

/// How many of the setup step's last lines a failure reports (Iris reports 50).
const SETUP_TAIL: usize = 50;

/// What a SANDBOX task does not get (Iris's `task_isolation`): the controller and the task's
/// credential.
const SANDBOX_WITHHELD: &[&str] = &["IRIS_CONTROLLER_ADDRESS", "IRIS_CONTROLLER_URL", "IRIS_TASK_TOKEN"];

/// The host's Docker socket, which a DOCKER_ACCESS task gets at the same path.
const DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// Maps the newest wire's container profile onto the launch spec (docs/ARCHITECTURE.md has the
/// table). The process runtime has no capabilities or namespaces to set: it runs every profile
/// as the task's plain process, except SANDBOX, whose promise (no network) it cannot keep.
fn apply_profile(launch: &mut LaunchSpec, profile: ContainerProfile) -> Result<(), crate::env::EnvError> {
    let refused = |reason: &'static str| crate::env::EnvError::ContainerProfile { profile: name(profile), reason };
    if launch.runtime == RuntimeKind::Process {
        return match profile {
            ContainerProfile::Sandbox => Err(refused("needs the container runtime (a network namespace of its own)")),
            ContainerProfile::Gvisor => Err(refused("needs the container runtime (gVisor runs containers)")),
            _ => Ok(()),
        };
    }
    launch.profile = match profile {
        ContainerProfile::Restricted => Profile::NoCapabilities,
        ContainerProfile::Privileged => Profile::Privileged,
        ContainerProfile::Default | ContainerProfile::DockerAccess | ContainerProfile::Sandbox => Profile::PtraceOnly,
        // As Iris's runsc containers: the default capabilities, which gVisor's kernel keeps
        // from the host's.
        ContainerProfile::Gvisor => Profile::Restricted,
    };
    match profile {
        ContainerProfile::Sandbox => launch.own_network = true,
        ContainerProfile::Gvisor => match find_runsc() {
            Some(runsc) => launch.gvisor = Some(runsc),
            None => return Err(refused("needs gVisor's runsc, which is not installed on this worker")),
        },
        ContainerProfile::DockerAccess => {
            use std::os::unix::fs::FileTypeExt;
            let socket = std::fs::metadata(DOCKER_SOCKET).is_ok_and(|m| m.file_type().is_socket());
            if !socket {
                return Err(refused("needs the host's Docker socket, and this host has none"));
            }
            launch.mounts.push(Mount { host: DOCKER_SOCKET.into(), target: DOCKER_SOCKET.into(), read_only: false });
        }
        _ => {}
    }
    Ok(())
}

/// /dev/shm of a TPU task without a memory limit (Iris's accelerator fallback).
const TPU_SHM_FALLBACK: u64 = 100 << 30;

/// A TPU attempt as Iris's Docker runtime runs it: privileged whatever its profile (VFIO needs
/// the device and the capabilities), its network as its egress policy says, memlock raised (the privileged
/// profile does), /dev/shm as large as its memory limit, or 100 GiB without one. The process
/// runtime has nothing to change.
fn for_tpu(launch: &mut LaunchSpec) {
    if launch.runtime == RuntimeKind::Process {
        return;
    }
    launch.profile = Profile::Privileged;
    // gVisor passes no accelerator through (the wire refuses a sandboxed TPU task; this holds
    // whatever asked).
    launch.gvisor = None;
    launch.shm_bytes = launch.limits.memory_bytes.unwrap_or(TPU_SHM_FALLBACK);
}

/// gVisor's `runsc` on this worker's PATH.
pub fn find_runsc() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join("runsc")).find(|p| p.is_file())
}

fn name(profile: ContainerProfile) -> &'static str {
    match profile {
        ContainerProfile::Restricted => "RESTRICTED",
        ContainerProfile::Default => "DEFAULT",
        ContainerProfile::DockerAccess => "DOCKER_ACCESS",
        ContainerProfile::Privileged => "PRIVILEGED",
        ContainerProfile::Sandbox => "SANDBOX",
        ContainerProfile::Gvisor => "GVISOR",
    }
}

/// A workdir file the controller keeps as a blob (Iris offloads those over 10 KiB): fetched
/// from `url` (the controller, a trusted source) into `workdir/rel`, its sha256 checked.
async fn fetch_ref(
    envs: &Environments,
    workdir: &Path,
    rel: &str,
    url: &str,
    sha256: &str,
) -> Result<(), crate::env::EnvError> {
    let failed = |reason: String| crate::env::EnvError::WorkdirFileRef { rel: rel.to_string(), reason };
    let location = crate::bundle::fetch::locate(url, &envs.bundle_sources).map_err(|e| failed(e.to_string()))?;
    let path = workdir.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| failed(format!("creating its directory: {e}")))?;
    }
    // Never through a planted symlink: the file must not exist yet.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| failed(format!("creating it: {e}")))?;
    let got = crate::bundle::fetch::download(url, &location, file, MAX_REF_BYTES).await;
    let got = match got {
        Ok(got) => got,
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            return Err(failed(e.to_string()));
        }
    };
    if !got.sha256.eq_ignore_ascii_case(sha256) {
        let _ = std::fs::remove_file(&path);
        return Err(failed(format!("the controller sent content whose sha256 is {}, not {sha256}", got.sha256)));
    }
    Ok(())
}

/// A workdir file from the controller at most (Iris's bundles are bounded at 25 MiB; a blob
/// ten times that is a mistake, not a file).
const MAX_REF_BYTES: u64 = 256 << 20;

/// Copies the extracted bundle below `to`: directories, regular files and symlinks (the
/// bundle cache refused any that leads out of the bundle), never over a file that is there
/// (the entrypoint's workdir files win, as in Iris, where they are written after the bundle),
/// without the `.venv` mount point the bundle cache makes.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(from.join(&rel))? {
            let entry = entry?;
            let name = rel.join(entry.file_name());
            if rel.as_os_str().is_empty() && (entry.file_name() == ".venv" || entry.file_name() == ".git") {
                continue;
            }
            let target = to.join(&name);
            let kind = entry.file_type()?;
            if kind.is_dir() {
                match std::fs::create_dir(&target) {
                    Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
                    _ => {}
                }
                stack.push(name);
            } else if std::fs::symlink_metadata(&target).is_ok() {
                continue;
            } else if kind.is_symlink() {
                std::os::unix::fs::symlink(std::fs::read_link(entry.path())?, &target)?;
            } else if kind.is_file() {
                std::fs::copy(entry.path(), &target)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_script_execs_the_command_in_the_workdir() {
        let s = run_script();
        assert!(s.starts_with("set -e\ncd \"$IRIS_WORKDIR\""));
        assert!(s.ends_with("exec \"$@\""));
    }

    fn a_task() -> LaunchSpec {
        LaunchSpec {
            runtime: RuntimeKind::Container,
            profile: crate::runtime::Profile::Privileged,
            id: "t.0".into(),
            argv: vec!["bash".into()],
            env: vec!["A=1".into()],
            cwd_in_task: WORKDIR_IN_TASK.into(),
            hostname: "h".into(),
            rootfs: "/r".into(),
            mounts: vec![],
            limits: crate::cgroup::Limits { memory_bytes: Some(1 << 30), ..Default::default() },
            shm_bytes: 0,
            cgroup: Some((crate::cgroup::Layout::V2 { root: "/sys/fs/cgroup".into() }, "w/t.0".into())),
            timeout_ms: None,
            log_dir: None,
            log_source: None,
            rootfs_overlay: false,
            user: None,
            disk_limit: None,
            leases: vec![],
            own_network: false,
            gvisor: None,
            filtered_egress: false,
        }
    }

    #[test]
    fn a_tpu_attempt_is_privileged_with_shm_as_large_as_its_memory_and_keeps_its_network() {
        let sandboxed = LaunchSpec { profile: Profile::PtraceOnly, own_network: true, ..a_task() };
        let mut tpu = sandboxed.clone();
        for_tpu(&mut tpu);
        assert_eq!((tpu.profile, tpu.own_network, tpu.shm_bytes), (Profile::Privileged, true, 1 << 30));
        let mut unbounded = LaunchSpec { limits: Default::default(), ..sandboxed };
        for_tpu(&mut unbounded);
        assert_eq!(unbounded.shm_bytes, 100 << 30, "Iris's accelerator fallback");
        let mut plain = LaunchSpec { runtime: RuntimeKind::Process, profile: Profile::PtraceOnly, ..a_task() };
        for_tpu(&mut plain);
        assert_eq!(plain.profile, Profile::PtraceOnly, "the process runtime has nothing to change");
    }

    #[test]
    fn the_setup_step_is_the_task_in_its_own_cgroup_with_a_memory_floor_logged_as_build() {
        let task = LaunchSpec { profile: crate::runtime::Profile::Privileged, ..a_task() };
        let s = setup_spec(&task, &["echo one".into(), "exit 4".into()], "/t/logs".into());
        assert_eq!(s.id, "t.0.setup");
        assert_eq!(s.argv[3..], ["iris-setup", "echo one", "exit 4"]);
        assert_eq!(s.limits.memory_bytes, Some(SETUP_MEMORY_FLOOR), "at least 32 GiB, as Iris");
        assert_eq!(s.cgroup.as_ref().map(|c| c.1.as_str()), Some("w/t.0.setup"));
        assert_eq!((s.log_source, s.log_dir.as_deref()), (Some(crate::logs::Source::Build), Some("/t/logs".as_ref())));
        assert_ne!(s.profile, crate::runtime::Profile::Privileged, "no devices for the setup step");
        assert_eq!((s.env, s.cwd_in_task, s.rootfs), (task.env.clone(), task.cwd_in_task.clone(), task.rootfs.clone()));
        let big =
            LaunchSpec { limits: crate::cgroup::Limits { memory_bytes: Some(64 << 30), ..Default::default() }, ..task };
        assert_eq!(setup_spec(&big, &[], "/t/logs".into()).limits.memory_bytes, Some(64 << 30));
    }

    #[test]
    fn the_bundle_is_copied_without_overwriting_workdir_files() {
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(from.path().join("data")).unwrap();
        std::fs::create_dir_all(from.path().join(".venv")).unwrap();
        std::fs::write(from.path().join("data/payload.txt"), "bundle").unwrap();
        std::fs::write(from.path().join("_callable.pkl"), "bundle").unwrap();
        std::fs::write(to.path().join("_callable.pkl"), "entrypoint").unwrap();
        copy_tree(from.path(), to.path()).unwrap();
        assert_eq!(std::fs::read_to_string(to.path().join("data/payload.txt")).unwrap(), "bundle");
        assert_eq!(std::fs::read_to_string(to.path().join("_callable.pkl")).unwrap(), "entrypoint");
        assert!(!to.path().join(".venv").exists());
    }

    #[test]
    fn worker_variables_win_over_the_request() {
        let spec = TaskSpec {
            num_tasks: 2,
            env_vars: [("IRIS_WORKDIR".to_string(), "/forged".to_string()), ("A".into(), "b".into())].into(),
            ..Default::default()
        };
        let worker = crate::env::WorkerEnv {
            worker_id: "w".into(),
            controller_address: Some("http://c:1".into()),
            bind_host: "127.0.0.1".into(),
            advertise_host: "10.0.0.1".into(),
        };
        let env = task_env(&spec, &worker, &[("http".to_string(), 12000)].into(), "/app", "python3", None);
        for want in [
            "IRIS_WORKDIR=/app",
            "A=b",
            "IRIS_PORT_HTTP=12000",
            "IRIS_CONTROLLER_URL=http://c:1",
            "IRIS_VENV=/app/.venv",
        ] {
            assert!(env.contains(&want.to_string()), "{want} in {env:?}");
        }
    }
}
