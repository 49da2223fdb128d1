//! Venvs for bundles: `uv` run in a build container of the python rootfs, cached by a hash of
//! what determines the result, built once however many tasks ask at the same time.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{APP, VENV};
use crate::cgroup::{Layout, Limits};
use crate::logs::{LogFilter, Source};
use crate::runtime::{LaunchSpec, Mount, Profile, RuntimeKind};
use crate::supervisor::files::{self, FileError, now_ms};
use crate::supervisor::handle;

/// Marks a venv directory as complete (written last, after the rename).
const COMPLETE: &str = ".iris-complete";
/// The longest a build may run.
const BUILD_TIMEOUT_MS: u64 = 30 * 60 * 1000;

/// Errors of preparing a venv.
#[derive(Debug, thiserror::Error)]
pub enum VenvError {
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    File(#[from] FileError),
    /// The build ran and failed; `detail` is the end of its output.
    #[error("building the Python environment failed ({status}): {detail}")]
    BuildFailed { status: String, detail: String },
    /// Another task's build of the same environment failed.
    #[error("{0}")]
    Shared(String),
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> VenvError + 'a {
    move |source| VenvError::Io { op, path: path.to_path_buf(), source }
}

/// How venvs are built.
#[derive(Debug, Clone)]
pub struct VenvConfig {
    /// The root filesystem builds and Python tasks run in.
    pub python_rootfs: PathBuf,
    /// `<cache>/venvs/<key>` holds the venvs, `<cache>/uv` uv's shared cache.
    pub cache_dir: PathBuf,
    /// A directory of wheels given to uv as `--find-links` (mounted read-only).
    pub find_links: Option<PathBuf>,
    /// Never touch the network (`UV_OFFLINE`): for hosts and tests without an index.
    pub offline: bool,
    pub build_memory_bytes: u64,
    /// The binary started as the build's supervisor.
    pub supervisor_exe: PathBuf,
    /// The host's cgroups and the worker's parent cgroup, for the build's own cgroup.
    pub cgroups: Option<(Layout, String)>,
}

/// What a venv is for.
#[derive(Debug, Clone)]
pub struct VenvRequest<'a> {
    /// The extracted bundle (the project), if the task has one.
    pub bundle_dir: Option<&'a Path>,
    pub extras: &'a [String],
    pub pip_packages: &'a [String],
    /// The asking task's directory and key: a build logs into its log, as source `build`.
    pub task_dir: &'a Path,
    pub task_key: &'a str,
}

/// A ready venv.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PythonEnv {
    /// The venv on the host (mounted read-only at /app/.venv).
    pub dir: PathBuf,
    /// The cache key: a hash of pyproject.toml, uv.lock, extras, pip_packages, the rootfs.
    pub key: String,
    /// True when this request built nothing.
    pub from_cache: bool,
    pub started_ms: i64,
    pub finished_ms: i64,
}

/// The venv cache.
pub struct VenvCache {
    config: VenvConfig,
    flights: super::flight::SingleFlight<PathBuf>,
    builds: std::sync::atomic::AtomicU64,
}

impl VenvCache {
    pub fn new(config: VenvConfig) -> VenvCache {
        VenvCache { config, flights: Default::default(), builds: Default::default() }
    }

    pub fn config(&self) -> &VenvConfig {
        &self.config
    }

    /// How many builds this cache has run (for metrics and tests).
    pub fn builds(&self) -> u64 {
        self.builds.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The cache key of `req`.
    pub fn key(&self, req: &VenvRequest<'_>) -> Result<String, VenvError> {
        let mut h = Sha256::new();
        for name in ["pyproject.toml", "uv.lock"] {
            h.update(name.as_bytes());
            if let Some(dir) = req.bundle_dir {
                match std::fs::read(dir.join(name)) {
                    Ok(bytes) => h.update(&bytes),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => h.update(b"\0absent"),
                    Err(e) => return Err(io("reading", &dir.join(name))(e)),
                }
            }
        }
        let mut extras = req.extras.to_vec();
        extras.sort();
        let mut pip = req.pip_packages.to_vec();
        pip.sort();
        h.update(format!("extras={extras:?}\npip={pip:?}\n").as_bytes());
        let rootfs = std::fs::canonicalize(&self.config.python_rootfs)
            .map_err(io("resolving the python rootfs", &self.config.python_rootfs))?;
        h.update(rootfs.to_string_lossy().as_bytes());
        Ok(hex::encode(h.finalize()))
    }

    /// A venv for `req`: from the cache, from a build another task is running, or built now.
    pub async fn get(&self, req: &VenvRequest<'_>) -> Result<PythonEnv, VenvError> {
        let started_ms = now_ms();
        let key = self.key(req)?;
        let dir = self.config.cache_dir.join("venvs").join(&key);
        if dir.join(COMPLETE).exists() {
            return Ok(PythonEnv { dir, key, from_cache: true, started_ms, finished_ms: now_ms() });
        }
        let (result, built_here) = self
            .flights
            .run(&key, || async { self.build(req, &key, &dir).await.map(|()| dir.clone()).map_err(|e| e.to_string()) })
            .await;
        match result {
            Ok(dir) => Ok(PythonEnv { dir, key, from_cache: !built_here, started_ms, finished_ms: now_ms() }),
            Err(e) => Err(VenvError::Shared(e)),
        }
    }

    async fn build(&self, req: &VenvRequest<'_>, key: &str, dest: &Path) -> Result<(), VenvError> {
        self.builds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let venvs = self.config.cache_dir.join("venvs");
        let uv_cache = self.config.cache_dir.join("uv");
        let tmp = venvs.join(format!(".tmp-{key}-{}", std::process::id()));
        for d in [&venvs, &uv_cache] {
            std::fs::create_dir_all(d).map_err(io("creating", d))?;
        }
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io("creating", &tmp))?;
        let step = req.task_dir.join("build");
        let _ = std::fs::remove_dir_all(&step);
        std::fs::create_dir_all(&step).map_err(io("creating", &step))?;

        let spec = self.build_spec(req, &tmp)?;
        files::write_json(&step, files::SPEC, &spec)?;
        let exit = handle::run_to_exit(&self.config.supervisor_exe, &step).await;
        let ok = matches!(&exit, Ok(e) if e.exit_code == Some(0));
        if !ok {
            let _ = std::fs::remove_dir_all(&tmp);
            let status = match &exit {
                Ok(e) => match (&e.error, e.exit_code, e.signal) {
                    (Some(err), _, _) => format!("the build could not start: {err}"),
                    (None, Some(code), _) => format!("exit code {code}"),
                    (None, None, Some(sig)) => format!("killed by signal {sig}"),
                    _ => "no exit status".into(),
                },
                Err(e) => e.to_string(),
            };
            return Err(VenvError::BuildFailed { status, detail: build_log_tail(&req.task_dir.join(files::LOGS)) });
        }
        match std::fs::rename(&tmp, dest) {
            Ok(()) => {}
            // Another worker process on this cache finished first: theirs is as good.
            Err(_) if dest.join(COMPLETE).exists() => {
                let _ = std::fs::remove_dir_all(&tmp);
            }
            Err(e) => return Err(io("renaming the venv into", dest)(e)),
        }
        std::fs::write(dest.join(COMPLETE), key).map_err(io("marking complete", dest))?;
        Ok(())
    }

    fn build_spec(&self, req: &VenvRequest<'_>, venv: &Path) -> Result<LaunchSpec, VenvError> {
        let c = &self.config;
        let mut mounts = Vec::new();
        if let Some(bundle) = req.bundle_dir {
            mounts.push(Mount { host: bundle.to_path_buf(), target: APP.into(), read_only: true });
        }
        mounts.push(Mount { host: venv.to_path_buf(), target: VENV.into(), read_only: false });
        mounts.push(Mount { host: c.cache_dir.join("uv"), target: "/uv-cache".into(), read_only: false });
        let mut env = vec![
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            "HOME=/root".into(),
            "UV_CACHE_DIR=/uv-cache".into(),
            format!("UV_PROJECT_ENVIRONMENT={VENV}"),
            "UV_PYTHON=/usr/bin/python3".into(),
            "UV_PYTHON_DOWNLOADS=never".into(),
            // The cache and the venv are different mounts: hard links cannot cross them.
            "UV_LINK_MODE=copy".into(),
            "UV_NO_PROGRESS=1".into(),
            format!("IRIS_EXTRAS={}", req.extras.join("\n")),
            format!("IRIS_PIP_PACKAGES={}", req.pip_packages.join("\n")),
        ];
        if let Some(links) = &c.find_links {
            mounts.push(Mount { host: links.clone(), target: "/wheels".into(), read_only: true });
            env.push("UV_FIND_LINKS=/wheels".into());
        }
        if c.offline {
            env.push("UV_OFFLINE=1".into());
        }
        Ok(LaunchSpec {
            runtime: RuntimeKind::Container,
            profile: Profile::Restricted,
            id: format!("{}.build", req.task_key),
            argv: vec!["/bin/sh".into(), "-c".into(), BUILD_SCRIPT.into()],
            env,
            cwd_in_task: if req.bundle_dir.is_some() { APP.into() } else { "/".into() },
            hostname: "build".into(),
            rootfs: c.python_rootfs.clone(),
            mounts,
            limits: Limits { memory_bytes: Some(c.build_memory_bytes), ..Default::default() },
            shm_bytes: 64 << 20,
            cgroup: c
                .cgroups
                .as_ref()
                .map(|(layout, parent)| (layout.clone(), format!("{parent}/{}.build", req.task_key))),
            timeout_ms: Some(BUILD_TIMEOUT_MS),
            log_dir: Some(req.task_dir.join(files::LOGS)),
            log_source: Some(Source::Build),
            rootfs_overlay: false,
            user: None,
        })
    }
}

/// The build, as a shell script: a venv, the project's dependencies (locked when there is a
/// uv.lock; the bundle is read-only, so uv never writes a lock), the extra packages, and
/// cloudpickle if the project lacks it (every Iris task needs it to load its entrypoint).
const BUILD_SCRIPT: &str = r#"set -e
py=/app/.venv/bin/python
set --
while IFS= read -r x; do [ -n "$x" ] && set -- "$@" --extra "$x"; done <<LIST
$IRIS_EXTRAS
LIST
echo "+ uv venv /app/.venv"
uv venv --allow-existing /app/.venv
if [ -f /app/uv.lock ]; then
    echo "+ uv sync --frozen --no-install-project $*"
    uv sync --frozen --no-install-project "$@"
elif [ -f /app/pyproject.toml ]; then
    echo "+ uv pip install -r pyproject.toml $*"
    uv pip install --python "$py" -r /app/pyproject.toml "$@"
fi
set --
while IFS= read -r x; do [ -n "$x" ] && set -- "$@" "$x"; done <<LIST
$IRIS_PIP_PACKAGES
LIST
if [ $# -gt 0 ]; then
    echo "+ uv pip install $*"
    uv pip install --python "$py" "$@"
fi
# A glob instead of `python -c 'import cloudpickle'`: the interpreter's start-up would be a
# good part of a small build.
found=
for d in /app/.venv/lib/python3*/site-packages/cloudpickle; do [ -d "$d" ] && found=1; done
if [ -z "$found" ]; then
    echo "+ uv pip install cloudpickle"
    uv pip install --python "$py" cloudpickle
fi
echo "environment ready"
"#;

/// What the build said went wrong, for the task's error: uv's error lines (`error:`, `×`,
/// `╰─▶`) when there are some, else its last lines.
fn build_log_tail(log_dir: &Path) -> String {
    let filter = LogFilter { start_line: -400, source: Some(Source::Build), ..Default::default() };
    let lines = crate::logs::read(log_dir, &filter).unwrap_or_default();
    let text: Vec<&str> = lines.iter().map(|l| l.data.trim()).filter(|l| !l.is_empty()).collect();
    let errors: Vec<&str> = text
        .iter()
        .copied()
        .filter(|l| l.starts_with("error:") || l.starts_with('×') || l.starts_with("╰─▶"))
        .take(3)
        .collect();
    let chosen = if errors.is_empty() { text[text.len().saturating_sub(3)..].to_vec() } else { errors };
    if chosen.is_empty() { "no output".into() } else { chosen.join(" | ") }
}
