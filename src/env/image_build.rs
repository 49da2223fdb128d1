//! Task images built from the bundle's Dockerfile through BuildKit (`image = "dockerfile"` or
//! `"dockerfile:<path in the bundle>"`), kept in the [`ImageStore`] as one-layer images named
//! `dockerfile@sha256:<key>`, where the key hashes the Dockerfile and the build context; built
//! once however many tasks ask at the same time. The build's log lines go into the asking
//! task's log as source `build`. The store's LRU may evict a built image's layer like any other
//! (never while a task uses it); the next request builds it again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use super::image::{self, Image, ImageStore};
use crate::buildkit::{self, BuildRequest};
use crate::logs::{LogRecord, LogWriter, Source};
use crate::taskdir;

/// The longest a build may take.
const BUILD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// The image name that asks for a build of the bundle's `Dockerfile`; `dockerfile:<path>`
/// names another file of the bundle.
pub const IMAGE_PREFIX: &str = "dockerfile";

/// Errors of building a task's image from its Dockerfile.
#[derive(Debug, thiserror::Error)]
pub enum DockerfileError {
    #[error("image {0:?} is built from a Dockerfile, but this worker has no BuildKit (serve --buildkit ADDR)")]
    NoBuildkit(String),
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("building the image from {dockerfile}: {source}")]
    Build { dockerfile: String, source: buildkit::BuildkitError },
    #[error("building the image from {dockerfile}: no result within {minutes} minutes")]
    TimedOut { dockerfile: String, minutes: u64 },
    #[error("storing the image built from {dockerfile}: {source}")]
    Store { dockerfile: String, source: image::ImageError },
    /// Another task's build of the same image failed.
    #[error("{0}")]
    Shared(String),
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DockerfileError + 'a {
    move |source| DockerfileError::Io { op, path: path.to_path_buf(), source }
}

/// The Dockerfile path an image name asks for (`None` when the image is not a Dockerfile
/// build).
pub fn dockerfile_of(image: &str) -> Option<&str> {
    match image.strip_prefix(IMAGE_PREFIX)? {
        "" => Some("Dockerfile"),
        rest => rest.strip_prefix(':').filter(|p| !p.is_empty()),
    }
}

/// The store's name of the image built for `key`.
pub fn reference(key: &str) -> String {
    format!("{IMAGE_PREFIX}@sha256:{key}")
}

/// A ready image.
#[derive(Debug, Clone)]
pub struct DockerfileImage {
    pub image: Image,
    /// The cache key: sha256 of the Dockerfile's path and text and of the context's entries.
    pub key: String,
    /// True when this request built nothing.
    pub from_cache: bool,
}

/// Builds Dockerfiles into the image store, once per key at a time.
pub struct DockerfileImages {
    buildkit: Option<String>,
    flights: super::flight::SingleFlight<()>,
    builds: AtomicU64,
}

impl DockerfileImages {
    /// Builds go to the BuildKit at `buildkit` (none: Dockerfile images fail).
    pub fn new(buildkit: Option<String>) -> DockerfileImages {
        DockerfileImages { buildkit, flights: Default::default(), builds: AtomicU64::new(0) }
    }

    /// How many builds ran (for tests and metrics).
    pub fn builds(&self) -> u64 {
        self.builds.load(Ordering::Relaxed)
    }

    /// The image of `dockerfile` (a path in `context`): from the store, from a build another
    /// task is running, or built now with its log in `task_dir`'s log.
    pub async fn get(
        &self,
        store: &ImageStore,
        context: &Path,
        dockerfile: &str,
        task_dir: &Path,
    ) -> Result<DockerfileImage, DockerfileError> {
        let Some(addr) = self.buildkit.clone() else {
            return Err(DockerfileError::NoBuildkit(format!("{IMAGE_PREFIX}:{dockerfile}")));
        };
        let key = {
            let (context, dockerfile) = (context.to_path_buf(), dockerfile.to_string());
            tokio::task::spawn_blocking(move || cache_key(&context, &dockerfile))
                .await
                .map_err(|e| DockerfileError::Shared(format!("hashing the build context: {e}")))??
        };
        let name = reference(&key);
        if let Some(image) = store.find(&name) {
            return Ok(DockerfileImage { image, key, from_cache: true });
        }
        // The flight only joins concurrent requests; later ones look in the store.
        let (result, built_here) = self
            .flights
            .run(&key, || async {
                self.build(store, &addr, context, dockerfile, &key, task_dir).await.map_err(|e| e.to_string())
            })
            .await;
        result.map_err(DockerfileError::Shared)?;
        let image = store.find(&name).ok_or_else(|| {
            DockerfileError::Shared(format!("the image built from {dockerfile} left the store before it was used"))
        })?;
        Ok(DockerfileImage { image, key, from_cache: !built_here })
    }

    async fn build(
        &self,
        store: &ImageStore,
        addr: &str,
        context: &Path,
        dockerfile: &str,
        key: &str,
        task_dir: &Path,
    ) -> Result<(), DockerfileError> {
        self.builds.fetch_add(1, Ordering::Relaxed);
        let build_err = |source| DockerfileError::Build { dockerfile: dockerfile.to_string(), source };
        let store_err = |source| DockerfileError::Store { dockerfile: dockerfile.to_string(), source };
        let staging = store.staging_dir().map_err(store_err)?;
        let log_dir = task_dir.join(taskdir::LOGS);
        let mut log = LogWriter::open(&log_dir).ok();
        let mut write = |ts_ms: i64, text: &str| {
            if let Some(w) = log.as_mut()
                && let Err(e) = w.append(&[LogRecord { ts_ms, source: Source::Build, data: text.as_bytes() }])
            {
                tracing::warn!("writing the build log in {}: {e}", log_dir.display());
            }
        };
        write(iris_wire::clock::now_ms(), &format!("building {dockerfile} through BuildKit at {addr}"));
        let result = async {
            let client = buildkit::Client::connect(addr).await.map_err(build_err)?;
            let req = BuildRequest {
                context_dir: context.to_path_buf(),
                dockerfile: dockerfile.into(),
                build_args: HashMap::new(),
                target: None,
            };
            client.build(&req, staging.path(), |line| write(line.ts_ms, &line.text)).await.map_err(build_err)
        };
        let result = match tokio::time::timeout(BUILD_TIMEOUT, result).await {
            Ok(r) => r,
            Err(_) => Err(DockerfileError::TimedOut {
                dockerfile: dockerfile.to_string(),
                minutes: BUILD_TIMEOUT.as_secs() / 60,
            }),
        };
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                write(iris_wire::clock::now_ms(), &e.to_string());
                return Err(e);
            }
        };
        let c = out.config;
        let config = image::ImageConfig {
            env: c.env,
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            working_dir: c.working_dir,
            user: c.user,
        };
        store.import(&reference(key), key, staging, config).map_err(store_err)?;
        Ok(())
    }
}

/// The largest Dockerfile read.
const MAX_DOCKERFILE: u64 = 1 << 20;

/// sha256 over the Dockerfile's path and text and each context entry's path, mode, owner,
/// link target and content: what the build's result depends on that the worker can see.
fn cache_key(context: &Path, dockerfile: &str) -> Result<String, DockerfileError> {
    let mut h = Sha256::new();
    h.update(b"iris-worker dockerfile image v1\0");
    h.update(dockerfile.as_bytes());
    h.update(b"\0");
    let df = context.join(dockerfile);
    // Not through a symlink (it could name any host file), only a regular file, and bounded.
    let text = {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&df)
            .map_err(io("opening the Dockerfile (not a symlink)", &df))?;
        let meta = f.metadata().map_err(io("reading the Dockerfile", &df))?;
        if !meta.is_file() {
            return Err(io("reading the Dockerfile", &df)(std::io::Error::other("not a regular file")));
        }
        let mut text = Vec::new();
        f.take(MAX_DOCKERFILE + 1).read_to_end(&mut text).map_err(io("reading the Dockerfile", &df))?;
        if text.len() as u64 > MAX_DOCKERFILE {
            return Err(io("reading the Dockerfile", &df)(std::io::Error::other("larger than 1 MiB")));
        }
        text
    };
    h.update(&text);
    let entries =
        buildkit::fsutil::walk(context, &Default::default()).map_err(io("listing the build context", context))?;
    for e in entries {
        let s = &e.stat;
        h.update(format!("\0{}\0{:o}\0{}:{}\0{}\0", s.path, s.mode, s.uid, s.gid, s.linkname).as_bytes());
        if let Some(path) = &e.data {
            use std::io::Read;
            let mut f = std::fs::File::open(path).map_err(io("reading", path))?;
            let mut fh = Sha256::new();
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = f.read(&mut buf).map_err(io("reading", path))?;
                if n == 0 {
                    break;
                }
                fh.update(&buf[..n]);
            }
            h.update(fh.finalize());
        }
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_choose_the_dockerfile() {
        assert_eq!(dockerfile_of("dockerfile"), Some("Dockerfile"));
        assert_eq!(dockerfile_of("dockerfile:docker/Dockerfile.gpu"), Some("docker/Dockerfile.gpu"));
        assert_eq!(dockerfile_of("dockerfile:"), None);
        assert_eq!(dockerfile_of("dockerfiles"), None);
        assert_eq!(dockerfile_of("python:3.11"), None);
    }

    #[test]
    fn the_key_follows_the_dockerfile_and_the_context_contents() {
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path();
        std::fs::create_dir_all(c.join("src/deep")).unwrap();
        std::fs::write(c.join("Dockerfile"), "FROM scratch\nCOPY . /\n").unwrap();
        std::fs::write(c.join("src/deep/a.txt"), "one").unwrap();
        let k1 = cache_key(c, "Dockerfile").unwrap();
        assert_eq!(cache_key(c, "Dockerfile").unwrap(), k1);
        std::fs::write(c.join("src/deep/a.txt"), "two").unwrap();
        let k2 = cache_key(c, "Dockerfile").unwrap();
        assert_ne!(k1, k2, "a nested file's content is part of the key");
        std::fs::write(c.join("Dockerfile"), "FROM scratch\nCOPY src /\n").unwrap();
        assert_ne!(cache_key(c, "Dockerfile").unwrap(), k2);
        assert!(cache_key(c, "missing/Dockerfile").is_err());
    }

    #[tokio::test]
    async fn no_buildkit_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(image::ImageStoreConfig {
            dir: dir.path().join("images"),
            insecure_registries: vec![],
            auth_file: None,
            containerd: None,
            max_bytes: 1 << 30,
            devices: false,
            pull: Default::default(),
        })
        .unwrap();
        let e = DockerfileImages::new(None).get(&store, dir.path(), "Dockerfile", dir.path()).await.unwrap_err();
        assert!(e.to_string().contains("--buildkit"), "{e}");
    }
}
