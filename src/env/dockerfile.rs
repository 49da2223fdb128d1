//! Task images built from the bundle's Dockerfile through BuildKit (`image = "dockerfile"` or
//! `"dockerfile:<path in the bundle>"`), cached by a hash of the Dockerfile and the build
//! context, built once however many tasks ask at the same time.
//!
//! The built root filesystem lives in `<cache>/images/dockerfile/<key>/rootfs` with the image
//! config beside it (`config.json`); a task runs on it directly as its read-only rootfs. The
//! build's log lines go into the asking task's log as source `build`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use crate::buildkit::{self, BuildRequest, ImageConfig};
use crate::logs::{LogRecord, LogWriter, Source};
use crate::supervisor::files;

/// Marks a cache entry as complete (written last).
const COMPLETE: &str = ".iris-complete";
const CONFIG: &str = "config.json";

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

/// A ready image.
#[derive(Debug, Clone)]
pub struct DockerfileImage {
    pub rootfs: PathBuf,
    pub config: ImageConfig,
    /// The cache key: sha256 of the Dockerfile's path and text and of the context's entries.
    pub key: String,
    /// True when this request built nothing.
    pub from_cache: bool,
}

type Flight = Arc<OnceCell<Result<(), String>>>;

/// The cache of images built from Dockerfiles.
pub struct DockerfileImages {
    dir: PathBuf,
    buildkit: Option<String>,
    flights: Mutex<HashMap<String, Flight>>,
    builds: AtomicU64,
}

impl DockerfileImages {
    /// Images under `<cache_dir>/images/dockerfile`, built by the BuildKit at `buildkit`.
    pub fn new(cache_dir: &Path, buildkit: Option<String>) -> DockerfileImages {
        DockerfileImages {
            dir: cache_dir.join("images").join("dockerfile"),
            buildkit,
            flights: Mutex::new(HashMap::new()),
            builds: AtomicU64::new(0),
        }
    }

    /// How many builds ran (for tests and metrics).
    pub fn builds(&self) -> u64 {
        self.builds.load(Ordering::Relaxed)
    }

    /// The image of `dockerfile` (a path in `context`): from the cache, from a build another
    /// task is running, or built now with its log in `task_dir`'s log.
    pub async fn get(
        &self,
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
        let entry = self.dir.join(&key);
        if entry.join(COMPLETE).exists() {
            return load(&entry, key, true);
        }
        let flight: Flight = {
            let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
            flights.entry(key.clone()).or_default().clone()
        };
        let mut built_here = false;
        let result = flight
            .get_or_init(|| {
                built_here = true;
                async {
                    self.build(&addr, context, dockerfile, &key, &entry, task_dir).await.map_err(|e| e.to_string())
                }
            })
            .await
            .clone();
        if result.is_err() {
            // A failed build is not remembered: the next request tries again.
            let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
            if flights.get(&key).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
                flights.remove(&key);
            }
        }
        result.map_err(DockerfileError::Shared)?;
        load(&entry, key, !built_here)
    }

    async fn build(
        &self,
        addr: &str,
        context: &Path,
        dockerfile: &str,
        key: &str,
        entry: &Path,
        task_dir: &Path,
    ) -> Result<(), DockerfileError> {
        self.builds.fetch_add(1, Ordering::Relaxed);
        let build_err = |source| DockerfileError::Build { dockerfile: dockerfile.to_string(), source };
        std::fs::create_dir_all(&self.dir).map_err(io("creating", &self.dir))?;
        let tmp = self.dir.join(format!(".tmp-{key}-{}", std::process::id()));
        let _ = remove_tree(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io("creating", &tmp))?;
        let log_dir = task_dir.join(files::LOGS);
        let mut log = LogWriter::open(&log_dir).ok();
        let mut write = |ts_ms: i64, text: &str| {
            if let Some(w) = log.as_mut()
                && let Err(e) = w.append(&[LogRecord { ts_ms, source: Source::Build, data: text.as_bytes() }])
            {
                tracing::warn!("writing the build log in {}: {e}", log_dir.display());
            }
        };
        write(files::now_ms(), &format!("building {dockerfile} through BuildKit at {addr}"));
        let result = async {
            let client = buildkit::Client::connect(addr).await.map_err(build_err)?;
            let req = BuildRequest {
                context_dir: context.to_path_buf(),
                dockerfile: dockerfile.into(),
                build_args: HashMap::new(),
                target: None,
            };
            client.build(&req, &tmp.join("rootfs"), |line| write(line.ts_ms, &line.text)).await.map_err(build_err)
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
                write(files::now_ms(), &e.to_string());
                let _ = remove_tree(&tmp);
                return Err(e);
            }
        };
        let config = serde_json::json!({
            "Env": out.config.env,
            "WorkingDir": out.config.working_dir,
            "Entrypoint": out.config.entrypoint,
            "Cmd": out.config.cmd,
            "User": out.config.user,
        });
        std::fs::write(tmp.join(CONFIG), config.to_string()).map_err(io("writing", &tmp.join(CONFIG)))?;
        match std::fs::rename(&tmp, entry) {
            Ok(()) => {}
            // Another worker on this cache finished first: theirs is as good.
            Err(_) if entry.join(COMPLETE).exists() => {
                let _ = remove_tree(&tmp);
            }
            Err(e) => return Err(io("renaming the image into", entry)(e)),
        }
        std::fs::write(entry.join(COMPLETE), key).map_err(io("marking complete", entry))?;
        Ok(())
    }
}

fn load(entry: &Path, key: String, from_cache: bool) -> Result<DockerfileImage, DockerfileError> {
    let path = entry.join(CONFIG);
    let text = std::fs::read_to_string(&path).map_err(io("reading", &path))?;
    let config: ImageConfig = serde_json::from_str(&text).map_err(|e| DockerfileError::Io {
        op: "parsing",
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    Ok(DockerfileImage { rootfs: entry.join("rootfs"), config, key, from_cache })
}

/// `remove_dir_all`, with a directory that is not there as success.
fn remove_tree(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// sha256 over the Dockerfile's path and text and each context entry's path, mode, owner,
/// link target and content: what the build's result depends on that the worker can see.
fn cache_key(context: &Path, dockerfile: &str) -> Result<String, DockerfileError> {
    let mut h = Sha256::new();
    h.update(b"iris-worker dockerfile image v1\0");
    h.update(dockerfile.as_bytes());
    h.update(b"\0");
    let df = context.join(dockerfile);
    let text = std::fs::read(&df).map_err(io("reading the Dockerfile", &df))?;
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
        let images = DockerfileImages::new(dir.path(), None);
        let e = images.get(dir.path(), "Dockerfile", dir.path()).await.unwrap_err();
        assert!(e.to_string().contains("--buildkit"), "{e}");
    }
}
