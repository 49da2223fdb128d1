//! The caches a task's environment comes from, owned in one place (preparing a task over them
//! is [`super::prepare`]): the venvs, the images built
//! from Dockerfiles, and the bundle cache and image store, each opened on first use (a worker
//! that never fetches a bundle or runs an image neither creates nor locks them). The task
//! manager asks it for a task's bundle and the store to pull its image from.

use std::path::PathBuf;

use tokio::sync::OnceCell;

use super::image::{ImageError, ImageStore, ImageStoreConfig};
use super::{VenvCache, VenvConfig};
use crate::bundle::{Bundle, BundleCache, BundleConfig, BundleError, Phase, SourcePolicy};
use crate::runtime::{Profile, RuntimeKind};

/// Why a task's environment could not be prepared. The text is the task's error (FAILED);
/// some name host paths the operator must fix (a missing root filesystem).
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// The message names no host path: it reaches the controller.
    #[error("writing workdir_files: {}", .0.reason())]
    WorkdirFiles(crate::taskdir::FileError),
    /// Writing the newest wire's secrets files failed.
    #[error("writing the task's secrets: {}", .0.reason())]
    Secrets(crate::taskdir::FileError),
    #[error("the task has neither a command nor an entrypoint")]
    NoCommand,
    #[error("the root filesystem {} does not exist (run scripts/fixtures)", .0.display())]
    NoRootfs(PathBuf),
    #[error("Python tasks (a bundle or an entrypoint) need the container runtime")]
    PythonNeedsContainers,
    #[error("the python root filesystem {} does not exist (run scripts/fixtures python)", .0.display())]
    NoPythonRootfs(PathBuf),
    /// The newest wire's container profile cannot be given here (its text names no path).
    #[error("container_profile {profile}: {reason}")]
    ContainerProfile { profile: &'static str, reason: &'static str },
    /// The same, for the newest wire's layout (its text names no path).
    #[error("the python root filesystem does not exist (run scripts/fixtures python)")]
    NoPythonRootfsForNewest,
    /// Opening the bundle cache, or fetching and extracting a bundle.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The thread that opened the bundle cache failed.
    #[error("{0}")]
    OpeningBundles(tokio::task::JoinError),
    #[error("opening the image store: {0}")]
    ImageStore(ImageError),
    /// The thread that opened the image store failed.
    #[error("opening the image store: {0}")]
    OpeningImages(tokio::task::JoinError),
    #[error(transparent)]
    Venv(#[from] super::VenvError),
    #[error("writing {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    /// `egress_policy` NONE or INTERNET cannot be kept by the process runtime.
    #[error("egress_policy {0} needs the container runtime (a network namespace of its own)")]
    NetworkNeedsContainers(&'static str),
    #[error("image {0:?}: images need the container runtime")]
    ImageNeedsContainers(String),
    #[error("image {reference:?}: {source}")]
    Image { reference: String, source: ImageError },
    /// The image's `User` cannot be found in its rootfs.
    #[error("image {reference:?}: {reason}")]
    ImageUser { reference: String, reason: String },
    #[error("image {0:?} has no Entrypoint or Cmd and the task gives no command")]
    NoEntrypoint(String),
    #[cfg(not(feature = "buildkit"))]
    #[error("image {0:?}: this worker was built without the buildkit feature")]
    NoBuildkitFeature(String),
    #[cfg(feature = "buildkit")]
    #[error("image {0:?} is built from the bundle's Dockerfile, but the task has no bundle")]
    DockerfileWithoutBundle(String),
    #[cfg(feature = "buildkit")]
    #[error(transparent)]
    Dockerfile(#[from] super::image_build::DockerfileError),
    #[error("the task has no run_command")]
    NoRunCommand,
    /// The newest wire's setup commands failed: how, and the last lines they printed.
    #[error("setup commands failed ({status}): {detail}")]
    SetupFailed {
        /// Exit code, signal, or why they could not run.
        status: String,
        /// Their last lines of output.
        detail: String,
    },
    #[error("the task's run_command has no argv")]
    EmptyRunCommand,
    #[error("workdir_file_refs[{rel:?}]: {reason}")]
    WorkdirFileRef { rel: String, reason: String },
    #[error("copying the bundle: {0}")]
    CopyingBundle(tokio::task::JoinError),
    #[error("copying the bundle into the workdir: {0}")]
    CopyBundle(std::io::Error),
}

/// What preparation needs to know of the worker.
#[derive(Debug, Clone)]
pub struct PrepareConfig {
    pub runtime: RuntimeKind,
    pub profile: Profile,
    /// The root filesystem of tasks that name no image.
    pub rootfs: PathBuf,
    /// The image of the newest wire's attempts whose request names no `task_image` (Iris's
    /// `defaults.default_task_image`); `None`: the python rootfs.
    pub default_task_image: Option<String>,
    /// What goes into every task's environment.
    pub env: super::WorkerEnv,
    /// `pids.max` of a task whose request sets none.
    pub default_pids_limit: Option<i64>,
    /// Size of /dev/shm when the request gives no memory limit.
    pub shm_bytes: u64,
    /// The host's cgroup layout, when tasks get cgroups.
    pub cgroups: Option<crate::cgroup::Layout>,
}

/// Where the environments' caches are.
#[derive(Debug, Clone)]
pub struct EnvironmentsConfig {
    /// Venv builds (the Python rootfs, uv's cache, …).
    pub venvs: VenvConfig,
    /// The bundle cache's directory (`<cache>/bundles`).
    pub bundle_dir: PathBuf,
    /// Where bundles may come from.
    pub bundle_sources: SourcePolicy,
    /// The image store.
    pub images: ImageStoreConfig,
    /// The BuildKit that builds `image = "dockerfile[:PATH]"` tasks; `None` fails them.
    pub buildkit: Option<String>,
    /// What preparing a task needs to know of the worker.
    pub prepare: PrepareConfig,
}

/// A bundle fetched for a task: held (the cache keeps it while the holder lives), with the
/// lease a task's supervisor holds on it.
pub struct FetchedBundle {
    pub bundle: Bundle,
    pub lease: crate::cachelock::Lease,
}

impl FetchedBundle {
    /// Where the bundle is extracted.
    pub fn dir(&self) -> PathBuf {
        self.bundle.path().to_path_buf()
    }

    /// The sha256 of its archive (hex).
    pub fn sha256(&self) -> &str {
        self.bundle.sha256()
    }
}

/// The caches of tasks' environments.
pub struct Environments {
    pub(super) config: PrepareConfig,
    venvs: VenvCache,
    #[cfg(feature = "buildkit")]
    built: super::image_build::DockerfileImages,
    /// Opened on first use; a failed open is tried again by the next task, never kept.
    bundles: OnceCell<BundleCache>,
    images: OnceCell<ImageStore>,
    bundle_dir: PathBuf,
    pub(super) bundle_sources: SourcePolicy,
    image_config: ImageStoreConfig,
}

impl Environments {
    pub fn new(config: EnvironmentsConfig) -> Environments {
        #[cfg(not(feature = "buildkit"))]
        let _ = &config.buildkit;
        Environments {
            config: config.prepare,
            venvs: VenvCache::new(config.venvs),
            #[cfg(feature = "buildkit")]
            built: super::image_build::DockerfileImages::new(config.buildkit),
            bundles: OnceCell::new(),
            images: OnceCell::new(),
            bundle_dir: config.bundle_dir,
            bundle_sources: config.bundle_sources,
            image_config: config.images,
        }
    }

    /// The venvs of Python tasks.
    pub fn venvs(&self) -> &VenvCache {
        &self.venvs
    }

    /// The images built from bundles' Dockerfiles.
    #[cfg(feature = "buildkit")]
    pub fn built_images(&self) -> &super::image_build::DockerfileImages {
        &self.built
    }

    /// The bundle cache, if a task has opened it.
    pub fn opened_bundles(&self) -> Option<&BundleCache> {
        self.bundles.get()
    }

    /// The image store, if a task has opened it.
    pub fn opened_images(&self) -> Option<&ImageStore> {
        self.images.get()
    }

    /// The image store, opened on first use (a worker that never runs an image needs none).
    pub async fn image_store(&self) -> Result<&ImageStore, EnvError> {
        self.images
            .get_or_try_init(|| async {
                // It creates directories and removes what crashed unpacks left: off the async threads.
                let config = self.image_config.clone();
                tokio::task::spawn_blocking(move || ImageStore::open(config))
                    .await
                    .map_err(EnvError::OpeningImages)?
                    .map_err(EnvError::ImageStore)
            })
            .await
    }

    /// The bundle cache, opened on first use: it locks its directory, and workers that never
    /// fetch a bundle (tests, command-only hosts) need not share or lock it.
    pub async fn bundle_cache(&self) -> Result<&BundleCache, EnvError> {
        self.bundles
            .get_or_try_init(|| async {
                // The cache budget bounds bundles with the other caches, across processes.
                let config = BundleConfig {
                    sources: self.bundle_sources.clone(),
                    max_bytes: u64::MAX,
                    max_entries: usize::MAX,
                    ..BundleConfig::new(self.bundle_dir.clone())
                };
                // Opening removes what dead processes left (whole extractions): off the async
                // threads.
                Ok(tokio::task::spawn_blocking(move || BundleCache::new(config))
                    .await
                    .map_err(EnvError::OpeningBundles)??)
            })
            .await
    }

    /// The bundle at `path`, extracted (`progress` is told each phase); `started` is called
    /// once the cache is open, before the fetch. The holder keeps it from eviction.
    pub async fn fetch_bundle(
        &self,
        path: &str,
        sha256: Option<&str>,
        started: impl FnOnce(),
        progress: impl Fn(Phase),
    ) -> Result<FetchedBundle, EnvError> {
        let cache = self.bundle_cache().await?;
        started();
        let bundle = cache.get(path, sha256, progress).await?;
        // The venv is mounted at /app/.venv over the read-only bundle: it needs a mount point.
        let _ = std::fs::create_dir_all(bundle.path().join(".venv"));
        let lease = self.bundle_lease(&bundle);
        Ok(FetchedBundle { bundle, lease })
    }

    /// The lease a task's supervisor holds on `bundle`.
    pub fn bundle_lease(&self, bundle: &Bundle) -> crate::cachelock::Lease {
        crate::cachelock::Lease {
            record: Some(self.bundle_dir.join(format!("{}.json", bundle.key()))),
            cache: self.bundle_dir.clone(),
            key: bundle.key().to_string(),
        }
    }
}
