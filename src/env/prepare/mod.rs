//! Between "accepted" and "ready to launch" (the task's BUILDING): what a task runs in. A task with a bundle or a pickled entrypoint runs in the
//! Python environment (the python rootfs, its bundle at /app, a cached venv at /app/.venv);
//! any other task runs its command in the worker's default rootfs. Attempts of the newest
//! wire are laid out as Iris's newest worker does ([`newest`]); images built from the bundle's
//! Dockerfile are [`from_dockerfile`]'s.

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

mod from_dockerfile;
pub(super) mod newest;

use super::environments::Environments;
use super::spec::TaskSpec;
use super::{EnvError, PythonEnv, VenvRequest, entrypoint};
use crate::bundle::{Bundle, Phase};
use crate::cachelock::Lease;
use crate::env;
use crate::runtime::{LaunchSpec, Mount, RuntimeKind};
use crate::taskdir;

pub use from_dockerfile::dockerfile_of;
pub use newest::{WORKDIR_IN_TASK, find_runsc};

/// The attempt being prepared, as preparation sees it: where it lives, what it is called, and
/// where its progress and what it holds go. The task manager gives its attempt (what it is
/// told here shows in the task's status and is held until the attempt ends).
pub trait Preparing: Sync {
    /// The attempt's directory.
    fn dir(&self) -> &Path;
    /// The attempt's key: its container's id.
    fn id(&self) -> String;
    /// The key of the task's venv build (its log and directory).
    fn venv_key(&self) -> String;
    /// The host ports the attempt was given, by name.
    fn ports(&self) -> &BTreeMap<String, u16>;
    /// The attempt's cgroup path, when tasks get cgroups.
    fn cgroup(&self) -> Option<&str>;
    /// The status message while BUILDING.
    fn progress(&self, message: &str);
    /// A cache entry of `kind` was used (`from_cache`: it was there already).
    fn used(&self, kind: crate::cache::Kind, from_cache: bool);
    /// Holds the bundle the attempt runs from until it ends.
    fn hold_bundle(&self, bundle: Bundle, lease: Lease);
    /// Holds the image the attempt runs in (its layers' pins) until it ends.
    fn hold_image(&self, image: &env::image::Image);
    /// The venv the attempt runs in.
    fn hold_venv(&self, venv: &PythonEnv, lease: Lease);
    /// The attempt runs in an image built from a Dockerfile (`tag` names it).
    fn built_image(&self, from_cache: bool, tag: String);
    /// Every cache entry (and host port) the attempt uses, for its supervisor to hold.
    fn leases(&self) -> Vec<Lease>;
    /// A kill of the attempt was asked for: preparation starts nothing more.
    fn killed(&self) -> bool;
}

impl Environments {
    /// Makes the task's launch spec: environment, rootfs, mounts, limits, cgroup (its
    /// `workdir_files` are written already). Everything between "accepted" and "ready to
    /// launch": the bundle, the venv, the image pulled or built from a Dockerfile.
    pub async fn prepare(&self, spec: &TaskSpec, task: &dyn Preparing) -> Result<LaunchSpec, EnvError> {
        prepare(self, task, spec).await
    }
}

/// Makes the task's launch spec: environment, rootfs, mounts, limits, cgroup.
async fn prepare(envs: &Environments, task: &dyn Preparing, spec: &TaskSpec) -> Result<LaunchSpec, EnvError> {
    let workdir = task.dir().join(taskdir::WORKDIR);
    if spec.attempt_uid.is_some() {
        return newest::prepare(envs, task, spec, workdir).await;
    }
    if let Some(image) = &spec.image
        && let Some(dockerfile) = from_dockerfile::dockerfile_of(image)
    {
        return from_dockerfile::prepare(envs, task, spec, workdir, dockerfile).await;
    }
    if let Some(image) = &spec.image {
        return prepare_image(envs, task, spec, workdir, image).await;
    }
    if spec.bundle_gcs_path.is_some() || spec.serialized_entrypoint.is_some() {
        return prepare_python(envs, task, spec, workdir).await;
    }
    let config = &envs.config;
    let Some(command) = &spec.command else {
        return Err(EnvError::NoCommand);
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
        return Err(EnvError::NoRootfs(rootfs));
    }
    let env = super::variables::task_env(spec, &config.env, task.ports(), &cwd);
    Ok(launch_spec(envs, task, spec, command.to_argv(), env, cwd, rootfs, mounts))
}

/// The Python environment: bundle, venv, and either the command or the entrypoint runner.
async fn prepare_python(
    envs: &Environments,
    task: &dyn Preparing,
    spec: &TaskSpec,
    workdir: PathBuf,
) -> Result<LaunchSpec, EnvError> {
    if envs.config.runtime != RuntimeKind::Container {
        return Err(EnvError::PythonNeedsContainers);
    }
    let venvs = envs.venvs();
    let python_rootfs = venvs.config().python_rootfs.clone();
    if !python_rootfs.join("usr/bin/python3").exists() {
        return Err(EnvError::NoPythonRootfs(python_rootfs));
    }
    let bundle = match &spec.bundle_gcs_path {
        Some(path) => Some(fetch_bundle(envs, task, path, spec.bundle_sha256.as_deref()).await?),
        None => None,
    };
    let bundle_dir: Option<PathBuf> = bundle.as_ref().map(|b| b.dir.clone());
    task.progress("building the environment");
    let key = task.venv_key();
    let venv = venvs
        .get(&VenvRequest {
            bundle_dir: bundle_dir.as_deref(),
            bundle_sha256: bundle.as_ref().map(|b| b.sha256.as_str()),
            extras: &spec.extras,
            pip_packages: &spec.pip_packages,
            task_dir: task.dir(),
            task_key: &key,
        })
        .await?;
    task.used(crate::cache::Kind::Venvs, venv.from_cache);
    task.hold_venv(&venv, venvs.lease_of(&venv.key));

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
            std::fs::write(&path, pickle).map_err(|source| EnvError::Write { path: path.clone(), source })?;
            entrypoint::argv(&format!("{}/bin/python", env::VENV))
        }
        (None, None) => return Err(EnvError::NoCommand),
    };
    let mut env = super::variables::task_env(spec, &envs.config.env, task.ports(), "/workdir");
    for var in &mut env {
        if let Some(path) = var.strip_prefix("PATH=") {
            *var = format!("PATH={}/bin:{path}", env::VENV);
        }
    }
    env.push(format!("VIRTUAL_ENV={}", env::VENV));
    // `uv sync` installed a packaged project editable, pointing at /app; a project that is
    // not a package (no [build-system]) is importable from /app (and /app/src) all the same.
    env.push(format!("PYTHONPATH={}:{}/src", env::APP, env::APP));
    let cwd = if bundle_dir.is_some() { env::APP.to_string() } else { "/workdir".to_string() };
    Ok(launch_spec(envs, task, spec, argv, env, cwd, python_rootfs, mounts))
}

/// A bundle a task holds: where it is extracted, and the sha256 of its archive.
pub(super) struct FetchedBundle {
    pub(super) dir: PathBuf,
    pub(super) sha256: String,
}

/// The task's bundle, extracted (phases show in its status message). The attempt holds it
/// until it ends, so the cache never evicts a bundle a running task uses.
async fn fetch_bundle(
    envs: &Environments,
    task: &dyn Preparing,
    path: &str,
    sha256: Option<&str>,
) -> Result<FetchedBundle, EnvError> {
    let building = |message: &str| task.progress(message);
    let fetched = envs
        .fetch_bundle(path, sha256, || building(Phase::Downloading.message()), |phase| building(phase.message()))
        .await?;
    let held = FetchedBundle { dir: fetched.dir(), sha256: fetched.sha256().to_string() };
    task.used(crate::cache::Kind::Bundles, fetched.bundle.from_cache());
    task.hold_bundle(fetched.bundle, fetched.lease);
    Ok(held)
}

/// A task in an OCI image: the image's layers under the task's own overlay, its config's
/// Env, WorkingDir, Entrypoint/Cmd and User applied where the request says nothing.
async fn prepare_image(
    envs: &Environments,
    task: &dyn Preparing,
    spec: &TaskSpec,
    workdir: PathBuf,
    reference: &str,
) -> Result<LaunchSpec, EnvError> {
    if envs.config.runtime != RuntimeKind::Container {
        return Err(EnvError::ImageNeedsContainers(reference.to_string()));
    }
    let store = envs.image_store().await?;
    task.progress(&format!("pulling image {reference}"));
    let image =
        store.pull(reference).await.map_err(|source| EnvError::Image { reference: reference.to_string(), source })?;
    let bundle_dir: Option<PathBuf> = match &spec.bundle_gcs_path {
        Some(path) => Some(fetch_bundle(envs, task, path, spec.bundle_sha256.as_deref()).await?.dir),
        None => None,
    };
    launch_in_image(envs, task, spec, workdir, store, &image, reference, bundle_dir)
}

/// The launch spec of a task in `image` (pulled, or built from a Dockerfile): its own overlay
/// rootfs, the config's Env, WorkingDir, Entrypoint/Cmd and User where the request says
/// nothing, and the bundle at /app when given.
#[allow(clippy::too_many_arguments)]
pub(super) fn launch_in_image(
    envs: &Environments,
    task: &dyn Preparing,
    spec: &TaskSpec,
    workdir: PathBuf,
    store: &crate::env::image::ImageStore,
    image: &crate::env::image::Image,
    reference: &str,
    bundle_dir: Option<PathBuf>,
) -> Result<LaunchSpec, EnvError> {
    let rootfs = store
        .mount(image, task.dir())
        .map_err(|source| EnvError::Image { reference: reference.to_string(), source })?;
    task.hold_image(image);
    let config = &image.config;
    let user = match config.user.as_str() {
        "" | "root" | "0" | "0:0" => None,
        u => match crate::env::image::user::resolve(u, &rootfs) {
            Ok(user) => Some(user),
            Err(e) => {
                let _ = crate::env::image::unmount(task.dir());
                return Err(EnvError::ImageUser { reference: reference.to_string(), reason: e });
            }
        },
    };
    let cwd = if config.working_dir.is_empty() { "/workdir".to_string() } else { config.working_dir.clone() };
    // Docker's rule: the request's argv replaces Cmd; Entrypoint stays in front.
    let (argv, setup) = match (&spec.command, &spec.serialized_entrypoint) {
        (Some(c), _) if !c.argv.is_empty() => (c.argv.clone(), c.setup_commands.clone()),
        (Some(c), _) => (config.cmd.clone(), c.setup_commands.clone()),
        (None, Some(pickle)) => {
            let path = workdir.join(entrypoint::PICKLE);
            std::fs::write(&path, pickle).map_err(|source| EnvError::Write { path: path.clone(), source })?;
            (entrypoint::argv("python3"), vec![])
        }
        (None, None) => (config.cmd.clone(), vec![]),
    };
    let is_entrypoint = spec.command.is_none() && spec.serialized_entrypoint.is_some();
    let argv: Vec<String> = if is_entrypoint { argv } else { config.entrypoint.iter().cloned().chain(argv).collect() };
    let argv = crate::env::spec::Command { argv, setup_commands: setup }.to_argv();
    if argv.is_empty() {
        let _ = crate::env::image::unmount(task.dir());
        return Err(EnvError::NoEntrypoint(reference.to_string()));
    }
    // The image's variables first, then the request's, then IRIS_* (task_env's order).
    let mut env: Vec<String> = config.env.clone();
    let task_env = super::variables::task_env(spec, &envs.config.env, task.ports(), "/workdir");
    let image_path = config.env.iter().any(|e| e.starts_with("PATH="));
    for var in task_env {
        let key = var.split('=').next().unwrap_or_default();
        if key == "PATH" && image_path && !spec.env_vars.contains_key("PATH") {
            continue; // the image knows where its programs are
        }
        env.retain(|e| e.split('=').next() != Some(key));
        env.push(var);
    }
    let mut mounts = vec![Mount { host: workdir, target: "/workdir".into(), read_only: false }];
    if let Some(bundle) = bundle_dir {
        mounts.push(Mount { host: bundle, target: env::APP.into(), read_only: true });
    }
    let mut launch = launch_spec(envs, task, spec, argv, env, cwd, rootfs, mounts);
    launch.rootfs_overlay = true;
    launch.user = user;
    if let Some(disk) = launch.disk_limit.as_mut() {
        // What the task writes into its rootfs lands in its overlay's upper layer.
        disk.paths.push(task.dir().join(crate::env::image::OVERLAY).join("upper"));
    }
    Ok(launch)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn launch_spec(
    envs: &Environments,
    task: &dyn Preparing,
    spec: &TaskSpec,
    argv: Vec<String>,
    env: Vec<String>,
    cwd: String,
    rootfs: PathBuf,
    mounts: Vec<Mount>,
) -> LaunchSpec {
    let config = &envs.config;
    let mut env = env;
    let mut limits = spec.limits.clone();
    // Iris never sends a pids limit: the worker's default is what keeps a fork bomb in.
    limits.pids = limits.pids.or(config.default_pids_limit);
    let mut disk_paths = vec![task.dir().join(taskdir::WORKDIR)];
    if config.runtime == RuntimeKind::Process {
        // No mount namespace to give it a /tmp of its own: a directory of the task's, which
        // counts toward its disk limit and goes with its directory.
        let tmp = task.dir().join(taskdir::TMP);
        match std::fs::DirBuilder::new().mode(0o700).create(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                tracing::warn!(dir = %tmp.display(), error = %e, "creating the task's TMPDIR");
            }
            _ => {}
        }
        env.retain(|v| !v.starts_with("TMPDIR="));
        env.push(format!("TMPDIR={}", tmp.display()));
        disk_paths.push(tmp);
    }
    LaunchSpec {
        runtime: config.runtime,
        profile: config.profile,
        id: task.id(),
        argv,
        env,
        cwd_in_task: cwd,
        hostname: hostname_for(&spec.task_id),
        rootfs,
        mounts,
        limits,
        shm_bytes: spec.limits.memory_bytes.map(|m| m / 2).unwrap_or(config.shm_bytes),
        cgroup: match (&config.cgroups, task.cgroup()) {
            (Some(layout), Some(path)) => Some((layout.clone(), path.to_string())),
            _ => None,
        },
        timeout_ms: spec.timeout.map(|t| t.as_millis() as u64),
        log_dir: None,
        log_source: None,
        rootfs_overlay: false,
        user: None,
        disk_limit: spec.disk_bytes.map(|bytes| crate::runtime::DiskLimit { bytes, paths: disk_paths }),
        leases: task.leases(),
        own_network: false,
        gvisor: None,
        filtered_egress: false,
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
