//! BUILDING: what a task runs in. A task with a bundle or a pickled entrypoint runs in the
//! Python environment (the python rootfs, its bundle at /app, a cached venv at /app/.venv);
//! any other task runs its command in the worker's default rootfs.

use std::path::PathBuf;

use super::Inner;
use super::attempt::Attempt;
use super::spec::TaskSpec;
use super::state::TaskState;
use super::store;
use crate::env::{self, VenvRequest, entrypoint};
use crate::runtime::{LaunchSpec, Mount, RuntimeKind};
use crate::supervisor::files;

/// Makes the task's launch spec: environment, rootfs, mounts, limits, cgroup.
pub(super) async fn prepare(inner: &Inner, attempt: &Attempt, spec: &TaskSpec) -> Result<LaunchSpec, String> {
    let workdir = attempt.dir.join(files::WORKDIR);
    store::write_workdir_files(&workdir, &spec.workdir_files).map_err(|e| format!("writing workdir_files: {e}"))?;
    if let Some(image) = &spec.image
        && let Some(dockerfile) = super::dockerfile::dockerfile_of(image)
    {
        return super::dockerfile::prepare(inner, attempt, spec, workdir, dockerfile).await;
    }
    if let Some(image) = &spec.image {
        return Err(format!("image {image:?}: images are not supported by this worker yet"));
    }
    if spec.bundle_gcs_path.is_some() || spec.serialized_entrypoint.is_some() {
        return prepare_python(inner, attempt, spec, workdir).await;
    }
    let config = &inner.config;
    let Some(command) = &spec.command else {
        return Err("the task has neither a command nor an entrypoint".into());
    };
    let (cwd, mounts, rootfs) = match config.runtime {
        RuntimeKind::Container => (
            "/workdir".to_string(),
            vec![Mount { host: workdir.clone(), target: "/workdir".into(), read_only: false }],
            config.rootfs.clone(),
        ),
        RuntimeKind::Process => (workdir.to_string_lossy().into_owned(), vec![], PathBuf::from("/")),
    };
    if config.runtime == RuntimeKind::Container && !rootfs.join("bin").exists() {
        return Err(format!("the root filesystem {} does not exist (run scripts/fixtures)", rootfs.display()));
    }
    let env = super::env::task_env(spec, &config.env, &attempt.meta.ports, &cwd);
    Ok(launch_spec(inner, attempt, spec, command.to_argv(), env, cwd, rootfs, mounts))
}

/// The Python environment: bundle, venv, and either the command or the entrypoint runner.
async fn prepare_python(
    inner: &Inner,
    attempt: &Attempt,
    spec: &TaskSpec,
    workdir: PathBuf,
) -> Result<LaunchSpec, String> {
    if inner.config.runtime != RuntimeKind::Container {
        return Err("Python tasks (a bundle or an entrypoint) need the container runtime".into());
    }
    let venvs = &inner.venvs;
    let python_rootfs = venvs.config().python_rootfs.clone();
    if !python_rootfs.join("usr/bin/python3").exists() {
        return Err(format!(
            "the python root filesystem {} does not exist (run scripts/fixtures python)",
            python_rootfs.display()
        ));
    }
    let bundle_dir: Option<PathBuf> = match &spec.bundle_gcs_path {
        Some(path) => Some(inner.fetch_bundle(attempt, path, spec.bundle_sha256.as_deref()).await?),
        None => None,
    };
    attempt.set(inner, TaskState::Building, "building the environment");
    let key = store::task_key(&spec.task_id, spec.attempt_id);
    let venv = venvs
        .get(&VenvRequest {
            bundle_dir: bundle_dir.as_deref(),
            extras: &spec.extras,
            pip_packages: &spec.pip_packages,
            task_dir: &attempt.dir,
            task_key: &key,
        })
        .await
        .map_err(|e| e.to_string())?;
    attempt.set_build(&venv);

    let mut mounts = Vec::new();
    if let Some(bundle) = &bundle_dir {
        mounts.push(Mount { host: bundle.clone(), target: env::APP.into(), read_only: true });
    }
    mounts.push(Mount { host: venv.dir.clone(), target: env::VENV.into(), read_only: true });
    mounts.push(Mount { host: workdir.clone(), target: "/workdir".into(), read_only: false });

    let argv = match (&spec.command, &spec.serialized_entrypoint) {
        (Some(command), _) => command.to_argv(),
        (None, Some(pickle)) => {
            let path = workdir.join(entrypoint::PICKLE);
            std::fs::write(&path, pickle).map_err(|e| format!("writing {}: {e}", path.display()))?;
            entrypoint::argv(&format!("{}/bin/python", env::VENV))
        }
        (None, None) => return Err("the task has neither a command nor an entrypoint".into()),
    };
    let mut env = super::env::task_env(spec, &inner.config.env, &attempt.meta.ports, "/workdir");
    for var in env.iter_mut() {
        if let Some(path) = var.strip_prefix("PATH=") {
            *var = format!("PATH={}/bin:{path}", env::VENV);
        }
    }
    env.push(format!("VIRTUAL_ENV={}", env::VENV));
    // The project itself is not installed into the venv (the bundle is read-only): it is
    // importable from /app (and /app/src for src layouts).
    env.push(format!("PYTHONPATH={}:{}/src", env::APP, env::APP));
    let cwd = if bundle_dir.is_some() { env::APP.to_string() } else { "/workdir".to_string() };
    Ok(launch_spec(inner, attempt, spec, argv, env, cwd, python_rootfs, mounts))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn launch_spec(
    inner: &Inner,
    attempt: &Attempt,
    spec: &TaskSpec,
    argv: Vec<String>,
    env: Vec<String>,
    cwd: String,
    rootfs: PathBuf,
    mounts: Vec<Mount>,
) -> LaunchSpec {
    let config = &inner.config;
    LaunchSpec {
        runtime: config.runtime,
        profile: config.profile,
        id: store::task_key(&spec.task_id, spec.attempt_id),
        argv,
        env,
        cwd_in_task: cwd,
        hostname: hostname_for(&spec.task_id),
        rootfs,
        mounts,
        limits: spec.limits.clone(),
        shm_bytes: spec.limits.memory_bytes.map(|m| m / 2).unwrap_or(config.shm_bytes),
        cgroup: match (&inner.cgroups, &attempt.meta.cgroup) {
            (Some((layout, _)), Some(path)) => Some((layout.clone(), path.clone())),
            _ => None,
        },
        timeout_ms: spec.timeout.map(|t| t.as_millis() as u64),
        log_dir: None,
        log_source: None,
    }
}

/// A hostname from the task id: letters, digits and '-', at most 63 characters.
fn hostname_for(task_id: &str) -> String {
    let h: String = task_id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .take(63)
        .collect();
    let h = h.trim_matches('-').to_string();
    if h.is_empty() { "task".into() } else { h }
}
