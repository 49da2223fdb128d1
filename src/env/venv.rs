//! Venvs for bundles: `uv` run in a build container of the python rootfs, cached by a hash of
//! what determines the result, built once however many tasks ask at the same time.

use std::path::{Path, PathBuf};

use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::pyproject::ProjectFile;
use crate::cachelock::{EntryLock, EntryLocks};

use super::{APP, VENV};
use crate::cgroup::{Layout, Limits};
use crate::logs::{LogFilter, Source};
use crate::runtime::{LaunchSpec, Mount, Profile, RuntimeKind};
use crate::supervisor::handle;
use crate::taskdir::{self, FileError};
use iris_wire::clock::now_ms;

/// Marks a venv directory as complete (written last, after the rename).
const COMPLETE: &str = ".iris-complete";
/// The longest a build may run.
const BUILD_TIMEOUT_MS: u64 = 30 * 60 * 1000;

/// Errors of preparing a venv. Their messages reach the task's error and RPC answers, so they
/// name no host path: a venv by its key, a bundle's file by its path in the bundle; the host
/// path goes to the worker's own log (see [`io`]).
#[derive(Debug, thiserror::Error)]
pub enum VenvError {
    #[error("{op} {what}: {source}")]
    Io { op: &'static str, what: String, path: PathBuf, source: std::io::Error },
    /// The build ran and failed; `detail` is the end of its output.
    #[error("building the Python environment failed ({status}): {detail}")]
    BuildFailed { status: String, detail: String },
    /// Another task's build of the same environment failed.
    #[error("{0}")]
    Shared(String),
}

/// The error of `op` on `what` (no host path) at `path` (logged here, with the error).
fn io<'a>(op: &'static str, what: impl Into<String>, path: &'a Path) -> impl FnOnce(std::io::Error) -> VenvError + 'a {
    let what = what.into();
    move |source| {
        tracing::warn!(path = %path.display(), error = %source, "venv: {op} {what}");
        VenvError::Io { op, what, path: path.to_path_buf(), source }
    }
}

/// A task directory file error as a [`VenvError`] about `what` (its path logged only).
fn file_error(what: &str, e: FileError) -> VenvError {
    match e {
        FileError::Io { op, path, source } => io(op, what, &path)(source),
        FileError::Parse { path, source } => io("encoding", what, &path)(std::io::Error::other(source)),
    }
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
    /// The CA bundle builds trust (mounted read-only over the rootfs's
    /// `/etc/ssl/certs/ca-certificates.crt`, with `SSL_CERT_FILE` and `UV_NATIVE_TLS` set), so
    /// that an index behind a TLS-inspecting proxy or with a private CA verifies.
    pub ca_bundle: Option<PathBuf>,
    /// `NAME=VALUE` variables the operator gives builds: index and proxy settings
    /// (`UV_INDEX_URL`, `UV_EXTRA_INDEX_URL`, `HTTPS_PROXY`, …).
    pub build_env: Vec<String>,
    pub build_memory_bytes: u64,
    /// The build's pids limit (the worker's default for tasks: a package's build code is the
    /// request's code too).
    pub pids_limit: Option<i64>,
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
    /// The bundle's sha256 (of the archive as fetched): part of the key of a venv whose build
    /// installs anything from the bundle.
    pub bundle_sha256: Option<&'a str>,
    pub extras: &'a [String],
    pub pip_packages: &'a [String],
    /// The asking task's directory and key: a build logs into its log, as source `build`.
    pub task_dir: &'a Path,
    pub task_key: &'a str,
}

/// A ready venv.
#[derive(Debug, Clone)]
pub struct PythonEnv {
    /// The venv's shared lock: held while a task uses it, so that no worker process sharing
    /// the cache evicts it meanwhile (see [`crate::cachelock`]).
    pub lease: Arc<EntryLock>,
    /// The venv on the host (mounted read-only at /app/.venv).
    pub dir: PathBuf,
    /// The cache key: a hash of the project files, extras, pip_packages, the rootfs (and the
    /// bundle's sha256 when the build installs from the bundle; see [`VenvCache::key`]).
    pub key: String,
    /// True when this request built nothing.
    pub from_cache: bool,
    pub started_ms: i64,
    pub finished_ms: i64,
}

/// The venv cache.
pub struct VenvCache {
    config: VenvConfig,
    /// Builds under way in this process (tasks that need the same venv share one).
    flights: super::flight::SingleFlight<bool>,
    /// Across worker processes sharing the cache: one builds, the others wait and use it.
    locks: EntryLocks,
    builds: std::sync::atomic::AtomicU64,
}

impl VenvCache {
    pub fn new(config: VenvConfig) -> VenvCache {
        let locks = EntryLocks::new(&config.cache_dir.join("venvs"));
        VenvCache { config, flights: Default::default(), locks, builds: Default::default() }
    }

    pub fn config(&self) -> &VenvConfig {
        &self.config
    }

    /// How many builds this cache has run (for metrics and tests).
    pub fn builds(&self) -> u64 {
        self.builds.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The cache key of `req`: every `pyproject.toml`, `uv.lock` and `uv.toml` of the bundle
    /// (a workspace's members too, as Iris hashes them) by path and content, the extras, the
    /// extra packages and the rootfs; and when the build installs anything from the bundle
    /// (see [`super::pyproject`]) the bundle's sha256 too, so that such a venv serves only the
    /// bundle it was built from. Venvs of registry packages alone are shared across bundles.
    pub fn key(&self, req: &VenvRequest<'_>) -> Result<String, VenvError> {
        key_of(&self.config.python_rootfs, req)
    }

    /// [`VenvCache::key`] on the blocking pool: it walks the whole bundle and reads its
    /// project files, which must not hold up a runtime thread (other tasks' RPCs and logs).
    async fn key_off_runtime(&self, req: &VenvRequest<'_>) -> Result<String, VenvError> {
        let rootfs = self.config.python_rootfs.clone();
        let (bundle_dir, sha256) = (req.bundle_dir.map(Path::to_path_buf), req.bundle_sha256.map(str::to_owned));
        let (extras, pip, task_key) = (req.extras.to_vec(), req.pip_packages.to_vec(), req.task_key.to_owned());
        let task_dir = req.task_dir.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let req = VenvRequest {
                bundle_dir: bundle_dir.as_deref(),
                bundle_sha256: sha256.as_deref(),
                extras: &extras,
                pip_packages: &pip,
                task_dir: &task_dir,
                task_key: &task_key,
            };
            key_of(&rootfs, &req)
        })
        .await
        .map_err(|e| VenvError::Shared(format!("computing the venv's key: {e}")))?
    }
}

/// [`VenvCache::key`] of `req` for venvs of the python rootfs at `python_rootfs`.
fn key_of(python_rootfs: &Path, req: &VenvRequest<'_>) -> Result<String, VenvError> {
    let mut h = Sha256::new();
    // The layout of what a build leaves: 4 has every module compiled to bytecode, so venvs
    // built before are built again once rather than served without it.
    h.update(b"layout=4\n");
    if let Some(dir) = req.bundle_dir {
        let mut read = Vec::new();
        for (rel, path) in project_files(dir)? {
            let bytes = std::fs::read(&path).map_err(io("reading", format!("the bundle's {rel}"), &path))?;
            h.update(format!("{rel}\0{}\0", bytes.len()).as_bytes());
            h.update(&bytes);
            read.push((rel, bytes));
        }
        let project: Vec<ProjectFile<'_>> =
            read.iter().map(|(rel, bytes)| ProjectFile { rel, content: bytes }).collect();
        if let Some(why) = super::pyproject::installs_from_bundle(&project, req.pip_packages) {
            tracing::debug!(task = req.task_key, why, "the venv is keyed by its bundle");
            match req.bundle_sha256 {
                Some(sha) => h.update(format!("bundle={sha}\n").as_bytes()),
                // The bundle's digest unknown: a venv of this task's own, shared with none.
                None => h.update(format!("task={}\n", req.task_key).as_bytes()),
            }
        }
    }
    let mut extras = req.extras.to_vec();
    extras.sort();
    let mut pip = req.pip_packages.to_vec();
    pip.sort();
    h.update(format!("extras={extras:?}\npip={pip:?}\n").as_bytes());
    let rootfs =
        std::fs::canonicalize(python_rootfs).map_err(io("resolving", "the python root filesystem", python_rootfs))?;
    h.update(rootfs.to_string_lossy().as_bytes());
    Ok(hex::encode(h.finalize()))
}

impl VenvCache {
    /// A venv for `req`: from the cache, from a build another task (or another worker process
    /// on the same cache) is running, or built now. It comes with its shared lock. A venv the
    /// cache budget evicts between its build and the lease is built again.
    pub async fn get(&self, req: &VenvRequest<'_>) -> Result<PythonEnv, VenvError> {
        let started_ms = now_ms();
        let asked_ns = now_ns();
        let key = self.key_off_runtime(req).await?;
        let dir = self.config.cache_dir.join("venvs").join(&key);
        let lock_err = |e: std::io::Error| io("locking", format!("venv {key}"), &dir)(e);
        for _ in 0..3 {
            if dir.join(COMPLETE).exists()
                && let Some(lease) = self.locks.try_shared(&key).map_err(lock_err)?
                && dir.join(COMPLETE).exists()
            {
                self.touch(&key);
                let lease = Arc::new(lease);
                return Ok(PythonEnv { lease, dir, key, from_cache: true, started_ms, finished_ms: now_ms() });
            }
            let (result, built_here) = self
                .flights
                .run(&key, || async {
                    let published = || dir.join(COMPLETE).exists();
                    let venvs = self.config.cache_dir.join("venvs");
                    // A build another worker process ran, and that failed, since this request
                    // was made: this request fails with it rather than repeating it.
                    let failed = || failure_since(&venvs, &key, asked_ns);
                    let making = self
                        .locks
                        .exclusive_unless(&key, || published() || failed().is_some())
                        .await
                        .map_err(|e| format!("locking the venv: {e}"))?;
                    if let Some(error) = failed().filter(|_| !published()) {
                        return Err(error);
                    }
                    // Another worker process built it meanwhile.
                    let Some(making) = making.filter(|_| !published()) else { return Ok(false) };
                    let built = self.build(req, &key, &dir).await.map(|()| true).map_err(|e| e.to_string());
                    // Told to the processes waiting for it, under the lock (a success clears it).
                    record_failure(&venvs, &key, built.as_ref().err());
                    drop(making);
                    built
                })
                .await;
            let built = result.map_err(VenvError::Shared)?;
            let lease = Arc::new(self.locks.shared_async(&key).await.map_err(lock_err)?);
            if dir.join(COMPLETE).exists() {
                self.touch(&key);
                return Ok(PythonEnv {
                    lease,
                    dir,
                    key,
                    from_cache: !(built && built_here),
                    started_ms,
                    finished_ms: now_ms(),
                });
            }
        }
        Err(VenvError::Shared("the venv was evicted each time it was built (the cache is too small)".into()))
    }

    /// Marks the venv `key` as used now (its record's mtime is its last use).
    fn touch(&self, key: &str) {
        let record = self.config.cache_dir.join("venvs").join(format!("{key}.json"));
        if let Ok(f) = std::fs::File::options().append(true).open(record) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }

    /// The lease a task's supervisor holds on venv `key` (see [`crate::cachelock::Lease`]).
    pub fn lease_of(&self, key: &str) -> crate::cachelock::Lease {
        let venvs = self.config.cache_dir.join("venvs");
        crate::cachelock::Lease { record: Some(venvs.join(format!("{key}.json"))), cache: venvs, key: key.to_string() }
    }

    async fn build(&self, req: &VenvRequest<'_>, key: &str, dest: &Path) -> Result<(), VenvError> {
        self.builds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let venvs = self.config.cache_dir.join("venvs");
        let uv_cache = self.config.cache_dir.join("uv");
        let tmp = venvs.join(format!(".tmp-{key}-{}", std::process::id()));
        // uv's cache stays while the build uses it: this lease until the build's supervisor
        // holds its own (and the supervisor's until the build ends, whatever the worker does).
        let _uv = self.locks.shared_async(UV_LOCK_KEY).await.map_err(io("locking", "uv's cache", &uv_cache))?;
        for (d, what) in [(&venvs, "the venv cache"), (&uv_cache, "uv's cache")] {
            std::fs::create_dir_all(d).map_err(io("creating", what, d))?;
        }
        touch_uv_record(&venvs);
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io("creating", format!("the build directory of venv {key}"), &tmp))?;
        let step = req.task_dir.join(taskdir::BUILD);
        let _ = std::fs::remove_dir_all(&step);
        std::fs::create_dir_all(&step).map_err(io("creating", "the build's task directory", &step))?;

        let scratch = step.join("app");
        std::fs::create_dir_all(&scratch).map_err(io("creating", "the build's copy of the bundle", &scratch))?;
        let spec = self.build_spec(req, &tmp, &scratch)?;
        taskdir::write_json(&step, taskdir::SPEC, &spec).map_err(|e| file_error("the build's spec", e))?;
        let exit = handle::run_to_exit(&self.config.supervisor_exe, &step).await;
        // The copy of the project was only for uv to write into.
        let _ = std::fs::remove_dir_all(&scratch);
        let ok = matches!(&exit, Ok(e) if e.exit_code == Some(0));
        if !ok {
            let _ = std::fs::remove_dir_all(&tmp);
            // Why a build did not even start is the worker's business (its messages name host
            // paths: mounts, the rootfs): the worker's log has it, the task says where to look.
            let status = match &exit {
                Ok(e) => match (&e.error, e.exit_code, e.signal) {
                    (Some(err), _, _) => {
                        tracing::warn!(task = req.task_key, venv = key, error = %err, "the venv build could not start");
                        "the build could not start; the worker's log says why".into()
                    }
                    (None, Some(code), _) => format!("exit code {code}"),
                    (None, None, Some(sig)) => format!("killed by signal {sig}"),
                    _ => "no exit status".into(),
                },
                Err(e) => {
                    tracing::warn!(task = req.task_key, venv = key, error = %e, "the venv build's supervisor failed");
                    "the build's supervisor failed; the worker's log says why".into()
                }
            };
            return Err(VenvError::BuildFailed { status, detail: build_log_tail(&req.task_dir.join(taskdir::LOGS)) });
        }
        // Published whole: the marker is inside before the rename makes it visible. The
        // caller holds the venv's exclusive lock, so what is at `dest` without a marker is an
        // unfinished leftover (of a crash, or an older layout).
        std::fs::write(tmp.join(COMPLETE), key).map_err(io("marking complete", format!("venv {key}"), &tmp))?;
        if dest.exists() && !dest.join(COMPLETE).exists() {
            std::fs::remove_dir_all(dest).map_err(io("removing", format!("an unfinished venv {key}"), dest))?;
        }
        match std::fs::rename(&tmp, dest) {
            Ok(()) => {}
            Err(_) if dest.join(COMPLETE).exists() => {
                let _ = std::fs::remove_dir_all(&tmp);
            }
            Err(e) => return Err(io("publishing", format!("venv {key}"), dest)(e)),
        }
        // Its record: the size the cache budget counts; its mtime is the venv's last use.
        let dest_owned = dest.to_path_buf();
        let (bytes, files) =
            tokio::task::spawn_blocking(move || crate::cache::tree_size(&dest_owned)).await.unwrap_or((0, 0));
        let record = venvs.join(format!("{key}.json"));
        write_record(&record, &Record { bytes, files, measured_ms: now_ms() }).map_err(io(
            "writing the record of",
            format!("venv {key}"),
            &record,
        ))?;
        Ok(())
    }

    fn build_spec(&self, req: &VenvRequest<'_>, venv: &Path, scratch: &Path) -> Result<LaunchSpec, VenvError> {
        let c = &self.config;
        let mut mounts = Vec::new();
        let mut copy = None;
        if let Some(bundle) = req.bundle_dir {
            // `uv sync` writes into the project (a lock when there is none, a build backend's
            // files): the build copies the read-only bundle to a scratch /app, at the path the
            // task sees it at, so an editable install points at the task's /app.
            mounts.push(Mount { host: bundle.to_path_buf(), target: BUNDLE_IN_BUILD.into(), read_only: true });
            mounts.push(Mount { host: scratch.to_path_buf(), target: APP.into(), read_only: false });
            copy = Some(format!("IRIS_BUNDLE_COPY={BUNDLE_IN_BUILD}"));
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
            // Every module compiled to bytecode now: the venv is read-only in the tasks, so
            // without it each task's Python compiles every module it imports from the venv,
            // every time (cloudpickle alone, which every Iris task imports: ~7 ms; a project
            // importing numpy or jax: far more), and can never keep the result.
            "UV_COMPILE_BYTECODE=1".into(),
            format!("IRIS_EXTRAS={}", req.extras.join("\n")),
            format!("IRIS_PIP_PACKAGES={}", req.pip_packages.join("\n")),
        ];
        if let Some(links) = &c.find_links {
            mounts.push(Mount { host: links.clone(), target: "/wheels".into(), read_only: true });
            env.push("UV_FIND_LINKS=/wheels".into());
        }
        env.extend(copy);
        if c.offline {
            env.push("UV_OFFLINE=1".into());
        }
        if let Some(ca) = &c.ca_bundle {
            mounts.push(Mount { host: ca.clone(), target: CA_IN_BUILD.into(), read_only: true });
            env.push(format!("SSL_CERT_FILE={CA_IN_BUILD}"));
            env.push("UV_NATIVE_TLS=1".into());
        }
        env.extend(c.build_env.iter().cloned());
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
            limits: Limits { memory_bytes: Some(c.build_memory_bytes), pids: c.pids_limit, ..Default::default() },
            shm_bytes: 64 << 20,
            cgroup: c
                .cgroups
                .as_ref()
                .map(|(layout, parent)| (layout.clone(), format!("{parent}/{}.build", req.task_key))),
            timeout_ms: Some(BUILD_TIMEOUT_MS),
            log_dir: Some(req.task_dir.join(taskdir::LOGS)),
            log_source: Some(Source::Build),
            rootfs_overlay: false,
            user: None,
            disk_limit: None,
            leases: vec![crate::cachelock::Lease {
                cache: c.cache_dir.join("venvs"),
                key: UV_LOCK_KEY.to_string(),
                record: Some(c.cache_dir.join("venvs").join(UV_RECORD)),
            }],
            own_network: false,
            gvisor: None,
            filtered_egress: false,
        })
    }
}

/// The variables the worker sets for builds itself, with the setting that controls each
/// (`--build-env` refuses them: given twice, one value would be silently ignored). A name
/// ending in `*` is a prefix.
pub const BUILD_ENV_SET_BY_WORKER: &[(&str, &str)] = &[
    ("PATH", "every build"),
    ("HOME", "every build"),
    ("UV_CACHE_DIR", "every build"),
    ("UV_PROJECT_ENVIRONMENT", "every build"),
    ("UV_PYTHON*", "every build"),
    ("UV_LINK_MODE", "every build"),
    ("UV_NO_PROGRESS", "every build"),
    ("UV_COMPILE_BYTECODE", "every build"),
    ("IRIS_*", "every build"),
    ("UV_FIND_LINKS", "--uv-find-links"),
    ("UV_OFFLINE", "--uv-offline"),
    ("SSL_CERT_FILE", "--ca-bundle"),
    ("UV_NATIVE_TLS", "--ca-bundle"),
];

/// Where a build sees the bundle (read-only); it works on a copy at /app. A directory every
/// Debian rootfs has: a new mount point would be made in the shared rootfs.
const BUNDLE_IN_BUILD: &str = "/mnt";
/// Where a build finds the CA bundle it trusts: the Debian path, so every tool finds it.
const CA_IN_BUILD: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The bundle's `pyproject.toml`, `uv.lock` and `uv.toml` files (relative path, path), sorted;
/// `.venv`, `.git` and `node_modules` are not looked into, nor symlinked directories.
fn project_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, VenvError> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    // What the error names: the directory by its path in the bundle, never the host's.
    let rel = |p: &Path| match p.strip_prefix(dir).map(|r| r.display().to_string()) {
        Ok(r) if !r.is_empty() => format!("the bundle's {r}/"),
        _ => "the bundle".to_string(),
    };
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(io("reading", rel(&d), &d))? {
            let e = e.map_err(io("reading", rel(&d), &d))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let kind = e.file_type().map_err(io("reading", rel(&e.path()), &e.path()))?;
            if kind.is_dir() && !matches!(name.as_str(), ".venv" | ".git" | "node_modules" | "__pycache__") {
                stack.push(e.path());
            } else if kind.is_file() && matches!(name.as_str(), "pyproject.toml" | "uv.lock" | "uv.toml") {
                let rel = e.path().strip_prefix(dir).map(|p| p.to_string_lossy().into_owned()).unwrap_or(name);
                found.push((rel, e.path()));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// The build, as a shell script, as Iris's worker builds (`uv sync [--extra X]` into
/// /app/.venv): a venv; for a project, `uv sync` on a writable copy of the bundle (without its
/// `.venv` and `.git` directories, as Iris's client leaves them out of bundles) — the project
/// itself installed (editable, pointing at /app) with its dependencies and default dependency
/// groups (`dev`), the lock used when there is one and made when there is none; then the
/// extra packages, and cloudpickle if the project lacks it (every Iris task needs it to load
/// its entrypoint).
const BUILD_SCRIPT: &str = r#"set -e
py=/app/.venv/bin/python
set --
while IFS= read -r x; do [ -n "$x" ] && set -- "$@" --extra "$x"; done <<LIST
$IRIS_EXTRAS
LIST
echo "+ uv venv /app/.venv"
uv venv --allow-existing /app/.venv
if [ -n "$IRIS_BUNDLE_COPY" ]; then
    # Without the bundle's .venv (it would land in the venv being built, mounted at
    # /app/.venv) and .git (history uv never reads), at the top and below.
    for f in "$IRIS_BUNDLE_COPY"/* "$IRIS_BUNDLE_COPY"/.[!.]* "$IRIS_BUNDLE_COPY"/..?*; do
        case "${f##*/}" in .venv | .git) continue ;; esac
        if [ -e "$f" ] || [ -L "$f" ]; then cp -a "$f" /app/; fi
    done
    find /app -mindepth 1 -path /app/.venv -prune -o \( -name .venv -o -name .git \) -prune -exec rm -rf {} +
fi
if [ -f /app/pyproject.toml ]; then
    echo "+ uv sync $*"
    uv sync "$@"
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

/// A failed build's marker, `<venvs>/.failed-<key>.json`: when it failed and why. Requests
/// made before the failure (the ones waiting for that build, in any worker process) fail with
/// it; a request made after builds again (the cause may have been passing: an index down).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Failure {
    /// Nanoseconds since the epoch (a request made just after must not read it as its own).
    failed_ns: u64,
    error: String,
}

fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// How long a failure marker stays before the cache budget's tidying removes it: every
/// request that waited for the build has read it by then.
const FAILURE_KEPT: std::time::Duration = std::time::Duration::from_secs(600);

fn failure_path(venvs: &Path, key: &str) -> PathBuf {
    venvs.join(format!(".failed-{key}.json"))
}

/// The error of a build of `key` that failed at or after `since_ns`, if any.
fn failure_since(venvs: &Path, key: &str, since_ns: u64) -> Option<String> {
    let bytes = std::fs::read(failure_path(venvs, key)).ok()?;
    let failure: Failure = serde_json::from_slice(&bytes).ok()?;
    (failure.failed_ns >= since_ns).then_some(failure.error)
}

/// Records how the build of `key` ended for the processes waiting for it: a failure's marker,
/// or none. Called under the venv's exclusive lock. Best effort: a waiter that misses it builds
/// again, as before markers.
fn record_failure(venvs: &Path, key: &str, error: Option<&String>) {
    let path = failure_path(venvs, key);
    let written = match error {
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
        Some(error) => serde_json::to_vec(&Failure { failed_ns: now_ns(), error: error.clone() })
            .map_err(std::io::Error::other)
            .and_then(|json| {
                let tmp = path.with_extension(format!("json.tmp.{}", std::process::id()));
                std::fs::write(&tmp, json)?;
                std::fs::rename(&tmp, &path)
            }),
    };
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "recording how a venv build ended");
    }
}

/// The lock of uv's cache, in the venvs' lock directory (venv keys are hex digests: no clash).
pub const UV_LOCK_KEY: &str = "uv-cache";
/// The record of uv's cache: its size when last measured, and (its mtime) the last build.
const UV_RECORD: &str = ".uv-cache.json";

/// A venv's (or uv's cache's) record: what the cache budget counts.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct Record {
    bytes: u64,
    #[serde(default)]
    files: u64,
    /// When `bytes` was measured (uv's cache grows with each build).
    #[serde(default)]
    measured_ms: i64,
}

fn read_record(path: &Path) -> Option<(Record, std::time::SystemTime)> {
    let bytes = std::fs::read(path).ok()?;
    let record = serde_json::from_slice(&bytes).ok()?;
    let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok()?;
    Some((record, mtime))
}

fn write_record(path: &Path, record: &Record) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("json.tmp.{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec(record).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, path)
}

/// Writes `record` at `path` keeping `last_use` as its mtime.
fn write_record_at(path: &Path, record: &Record, last_use: std::time::SystemTime) -> std::io::Result<()> {
    write_record(path, record)?;
    std::fs::File::options().append(true).open(path)?.set_modified(last_use)
}

/// A build is about to use uv's cache: its record's mtime is the cache's last use.
fn touch_uv_record(venvs: &Path) {
    let path = venvs.join(UV_RECORD);
    match std::fs::File::options().append(true).open(&path) {
        Ok(f) => {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
        Err(_) => {
            let _ = write_record(&path, &Record::default());
        }
    }
}

fn is_key(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The venvs on disk under `venvs`, for the cache budget. A venv built before records existed
/// is measured once and recorded. With `tidy`, what nobody is making or evicting goes:
/// unfinished venvs and build leftovers (when nobody holds their key), records without their
/// venv, evicted trees not yet deleted.
pub(crate) fn disk_entries(venvs: &Path, tidy: bool) -> Vec<crate::cache::DiskEntry> {
    static RECORDS: crate::cache::Records<Record> = crate::cache::Records::new();
    let Ok(rd) = std::fs::read_dir(venvs) else { return Vec::new() };
    let locks = EntryLocks::new(venvs);
    let mut dirs = Vec::new();
    let mut records = std::collections::HashMap::new();
    for item in rd.flatten() {
        let name = item.file_name().to_string_lossy().into_owned();
        let path = item.path();
        if let Some(rest) = name.strip_prefix(".tmp-") {
            // `.tmp-<key>-<pid>`: a build's output, unless a build of that key runs now.
            let key = rest.get(..64).unwrap_or_default();
            if tidy
                && is_key(key)
                && let Ok(Some(_nobody_builds)) = locks.try_exclusive(key)
            {
                let _ = std::fs::remove_dir_all(&path);
            }
        } else if name.starts_with(".evicted-") {
            if tidy {
                let _ = std::fs::remove_dir_all(&path);
            }
        } else if name.starts_with(".failed-") {
            // A failed build's marker, read by the requests that waited for it.
            let old = item.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
            if tidy && old.is_some_and(|age| age > FAILURE_KEPT) {
                let _ = std::fs::remove_file(&path);
            }
        } else if let Some(key) = name.strip_suffix(".json") {
            if is_key(key) {
                records.insert(key.to_string(), item);
            }
        } else if is_key(&name) {
            dirs.push((name, path));
        }
    }
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (name, path) in dirs {
        // A record is written once the venv is published, so a venv with one is whole.
        let recorded = records.remove(&name).and_then(|item| {
            let meta = item.metadata().ok()?;
            seen.insert(item.path());
            let record = RECORDS.get(&item.path(), &meta, |b| serde_json::from_slice::<Record>(b).ok())?;
            Some((record, meta.modified().ok()?))
        });
        let (record, last_use) = match recorded {
            Some(found) => found,
            None if !path.join(COMPLETE).exists() => {
                // Unfinished (a crash mid-publication, an older layout): nobody may use it.
                if tidy
                    && let Ok(Some(nobody_makes_it)) = locks.try_exclusive(&name)
                    && !path.join(COMPLETE).exists()
                {
                    let _ = std::fs::remove_dir_all(&path);
                    nobody_makes_it.remove();
                }
                continue;
            }
            None => {
                // Built before venvs had records: measured once.
                let (bytes, files) = crate::cache::tree_size(&path);
                let built = std::fs::metadata(path.join(COMPLETE))
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::SystemTime::UNIX_EPOCH);
                let record = Record { bytes, files, measured_ms: now_ms() };
                if tidy {
                    let _ = write_record_at(&venvs.join(format!("{name}.json")), &record, built);
                }
                (record, built)
            }
        };
        out.push(crate::cache::DiskEntry {
            kind: crate::cache::Kind::Venvs,
            name: format!("venv:{}", &name[..16]),
            key: name,
            bytes: record.bytes,
            files: record.files,
            last_use,
        });
    }
    RECORDS.keep_only(venvs, &seen);
    if tidy {
        // Records whose venv is gone (an eviction cut short).
        for key in records.into_keys() {
            if let Ok(Some(_quiet)) = locks.try_exclusive(&key)
                && !venvs.join(&key).is_dir()
            {
                let _ = std::fs::remove_file(venvs.join(format!("{key}.json")));
            }
        }
    }
    out
}

/// A name for a tree being deleted, unique in this process.
fn trash_name(what: &str) -> String {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{what}-{}-{seq}-{}", std::process::id(), now_ms())
}

/// Evicts venv `key` if no process uses it: out of the cache at once (a rename), its record
/// next, then deleted. `Ok(None)` when someone holds it.
pub(crate) fn evict_on_disk(venvs: &Path, key: &str) -> std::io::Result<Option<u64>> {
    let locks = EntryLocks::new(venvs);
    let Some(evicting) = locks.try_exclusive(key)? else { return Ok(None) };
    let record = venvs.join(format!("{key}.json"));
    let bytes = read_record(&record).map(|(r, _)| r.bytes).unwrap_or(0);
    let trash = venvs.join(trash_name(&format!(".evicted-{key}")));
    match std::fs::rename(venvs.join(key), &trash) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    match std::fs::remove_file(&record) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    evicting.remove();
    let _ = std::fs::remove_dir_all(&trash);
    Ok(Some(bytes))
}

/// uv's cache under `cache_dir` as one entry (measured again after builds, in `tidy` passes).
pub(crate) fn uv_entry(cache_dir: &Path, tidy: bool) -> Option<crate::cache::DiskEntry> {
    if tidy && let Ok(rd) = std::fs::read_dir(cache_dir) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(".uv-evicted-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let uv = cache_dir.join("uv");
    if !uv.is_dir() {
        return None;
    }
    let record_path = cache_dir.join("venvs").join(UV_RECORD);
    let found = read_record(&record_path);
    let stale = match &found {
        None => true,
        Some((r, used)) => {
            let used_ms = used.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
            tidy && used_ms > r.measured_ms
        }
    };
    let (record, last_use) = match found {
        Some((record, used)) if !stale => (record, used),
        other => {
            let used = other.map(|(_, u)| u).unwrap_or_else(std::time::SystemTime::now);
            let (bytes, files) = crate::cache::tree_size(&uv);
            let record = Record { bytes, files, measured_ms: now_ms() };
            if tidy {
                let _ = std::fs::create_dir_all(cache_dir.join("venvs"));
                let _ = write_record_at(&record_path, &record, used);
            }
            (record, used)
        }
    };
    Some(crate::cache::DiskEntry {
        kind: crate::cache::Kind::Uv,
        key: "uv".into(),
        name: "uv's cache".into(),
        bytes: record.bytes,
        files: record.files,
        last_use,
    })
}

/// Evicts uv's whole cache if no build uses it (uv downloads again what the next build needs).
pub(crate) fn evict_uv(cache_dir: &Path) -> std::io::Result<Option<u64>> {
    let venvs = cache_dir.join("venvs");
    let locks = EntryLocks::new(&venvs);
    let Some(evicting) = locks.try_exclusive(UV_LOCK_KEY)? else { return Ok(None) };
    let record = venvs.join(UV_RECORD);
    let bytes = read_record(&record).map(|(r, _)| r.bytes).unwrap_or(0);
    // A sibling of uv/: the same filesystem, so the rename is one step.
    let trash = cache_dir.join(trash_name(".uv-evicted"));
    let moved = match std::fs::rename(cache_dir.join("uv"), &trash) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        // uv/ is a mount point of its own: empty it in place, under the lock.
        Err(_) => {
            let _ = std::fs::remove_dir_all(cache_dir.join("uv"));
            false
        }
    };
    let _ = std::fs::remove_file(&record);
    evicting.remove();
    if moved {
        let _ = std::fs::remove_dir_all(&trash);
    }
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(cache_dir: &Path, python_rootfs: &Path) -> VenvConfig {
        VenvConfig {
            python_rootfs: python_rootfs.into(),
            cache_dir: cache_dir.into(),
            find_links: None,
            offline: true,
            ca_bundle: None,
            build_env: vec![],
            build_memory_bytes: 1 << 30,
            pids_limit: None,
            supervisor_exe: "/nonexistent/exe".into(),
            cgroups: None,
        }
    }

    fn request(task_dir: &Path) -> VenvRequest<'_> {
        VenvRequest { bundle_dir: None, bundle_sha256: None, extras: &[], pip_packages: &[], task_dir, task_key: "t" }
    }

    #[test]
    fn a_venv_built_from_the_bundle_is_keyed_by_the_bundle_and_one_of_registry_packages_is_shared() {
        let dir = tempfile::tempdir().unwrap();
        let cache = VenvCache::new(config(&dir.path().join("cache"), dir.path()));
        let key = |pyproject: &str, sha: &str| {
            let bundle = tempfile::tempdir_in(dir.path()).unwrap();
            std::fs::write(bundle.path().join("pyproject.toml"), pyproject).unwrap();
            let req = VenvRequest { bundle_dir: Some(bundle.path()), bundle_sha256: Some(sha), ..request(dir.path()) };
            cache.key(&req).unwrap()
        };
        let registry = "[project]\nname = \"a\"\nversion = \"1\"\ndependencies = [\"six\"]\n";
        assert_eq!(key(registry, "1111"), key(registry, "2222"), "registry packages only: shared");
        let package =
            format!("{registry}[build-system]\nrequires = [\"flit_core\"]\nbuild-backend = \"flit_core.buildapi\"\n");
        assert_ne!(key(&package, "1111"), key(&package, "2222"), "the project is built: one venv per bundle");
        assert_eq!(key(&package, "1111"), key(&package, "1111"), "the same bundle shares it");
        assert_ne!(key(registry, "1111"), key(&package, "1111"));
    }

    /// The key walks the whole bundle: not on a runtime thread, where it would hold up every
    /// other task's RPCs and logs (review of #13, finding 21). The runtime's only blocking
    /// thread is kept busy first, so work handed to it cannot finish before `get` is polled:
    /// `get` is pending after its first poll (done on the runtime thread, it would have failed
    /// at once), and fails once the blocking thread is free.
    #[test]
    fn the_key_is_computed_off_the_runtime_threads() {
        let rt = tokio::runtime::Builder::new_current_thread().max_blocking_threads(1).build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let bundle = dir.path().join("bundle");
            std::fs::create_dir_all(bundle.join("pkg")).unwrap();
            std::fs::write(bundle.join("pyproject.toml"), "[project]\nname = \"a\"\n").unwrap();
            // A python rootfs that is not there: the key fails once the walk is done.
            let cache = VenvCache::new(config(&dir.path().join("cache"), &dir.path().join("rootfs")));
            let req = VenvRequest { bundle_dir: Some(&bundle), ..request(dir.path()) };
            let (release, wait) = std::sync::mpsc::channel::<()>();
            let busy = tokio::task::spawn_blocking(move || wait.recv());
            let mut get = std::pin::pin!(cache.get(&req));
            assert!(futures::poll!(get.as_mut()).is_pending(), "the bundle was walked on the runtime thread");
            release.send(()).unwrap();
            busy.await.unwrap().unwrap();
            let err = get.await.unwrap_err().to_string();
            assert!(err.starts_with("resolving the python root filesystem: "), "{err}");
        });
    }

    #[tokio::test]
    async fn venv_errors_name_the_venv_not_the_host_path() {
        let dir = tempfile::tempdir().unwrap();
        let (cache_dir, rootfs, task) = (dir.path().join("cache"), dir.path().join("rootfs"), dir.path().join("task"));
        // A python rootfs that is not there.
        let cache = VenvCache::new(config(&cache_dir, &rootfs));
        let err = cache.get(&request(&task)).await.unwrap_err().to_string();
        assert!(err.starts_with("resolving the python root filesystem: "), "{err}");
        assert!(!err.contains(dir.path().to_str().unwrap()), "{err}");
        // A venv that cannot be locked (the lock directory is a file).
        std::fs::create_dir_all(&rootfs).unwrap();
        let key = cache.key(&request(&task)).unwrap();
        let venv = cache_dir.join("venvs").join(&key);
        std::fs::create_dir_all(&venv).unwrap();
        std::fs::write(venv.join(COMPLETE), &key).unwrap();
        std::fs::write(cache_dir.join("venvs/.locks"), "").unwrap();
        let err = cache.get(&request(&task)).await.unwrap_err().to_string();
        assert!(err.starts_with(&format!("locking venv {key}: ")), "{err}");
        assert!(!err.contains(dir.path().to_str().unwrap()), "{err}");
    }

    #[test]
    fn every_variable_a_build_gets_from_the_worker_is_listed_as_set_by_it() {
        let cache = VenvCache::new(VenvConfig {
            find_links: Some("/wheels".into()),
            ca_bundle: Some("/ca.pem".into()),
            ..config(Path::new("/cache"), Path::new("/rootfs"))
        });
        let bundle = Path::new("/bundle");
        let req = VenvRequest {
            bundle_dir: Some(bundle),
            bundle_sha256: Some("ab"),
            extras: &[],
            pip_packages: &[],
            task_dir: Path::new("/task"),
            task_key: "t",
        };
        let spec = cache.build_spec(&req, Path::new("/venv"), Path::new("/scratch")).unwrap();
        for var in &spec.env {
            let name = var.split_once('=').map_or(var.as_str(), |(n, _)| n);
            let listed = BUILD_ENV_SET_BY_WORKER
                .iter()
                .any(|(n, _)| *n == name || n.strip_suffix('*').is_some_and(|p| name.starts_with(p)));
            assert!(listed, "{name} is set for builds but --build-env would accept it");
        }
    }
}
