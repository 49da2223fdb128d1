//! The ImageStore: an image reference → its manifest (linux/amd64 from an index) → layers,
//! each verified against its digest and unpacked once into a content-addressed directory →
//! a task's rootfs, an overlay of those directories with a per-task upper directory.
//!
//! On disk, under the store's directory:
//! ```text
//! layers/<sha256 hex>/        one layer's tree, in overlayfs's lower-layer form (read-only)
//! layers/<sha256 hex>.json    its size and files (and, for a built image, its name); the
//!                             file's mtime is when a task last used it
//! images/<sha256 of name>.json  a reference → manifest digest, config, layer digests
//! tmp/                        layers being unpacked; renamed into layers/ when complete
//! ```
//! A layer directory exists only complete, so a crash mid-unpack leaves nothing a task could
//! use. Pulls of one image, and unpacks of one layer, happen once however many tasks ask.
//! Layers beyond the byte bound are removed oldest-used first, never while an overlay mount
//! (of any task, any worker) uses them or a pull is about to mount them (a pull holds their
//! shared locks, and a task's supervisor holds them for the task's life). In a worker the cache
//! budget ([`crate::cache`]) does this for the store with the other caches, through
//! [`disk_entries`] and [`evict_layer`].
//!
//! The pull policy says when a source is asked again: `missing` (the default) uses what the
//! store has under the reference, `always` asks the registry (or containerd) which manifest the
//! tag names now and fetches only the layers the store lacks, `never` never asks and fails at
//! once when the store lacks the image. A reference pinned by digest (`…@sha256:…`) is taken
//! from the store whenever it is there; an OCI layout (`oci:`) is always read.

pub mod manifest;
pub mod overlay;
pub mod source;
pub mod unpack;
pub mod user;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

pub use manifest::{Digest, ImageConfig};
use source::Sources;
pub use source::{ContainerdConfig, ImageRef};

pub use crate::runtime::rootfs::{OVERLAY, ROOTFS};

/// Errors of getting an image. Each names the image, layer or source that failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {reference:?}: {reason}")]
    BadReference { reference: String, reason: String },
    #[error("registry {registry} ({reference}): {reason}")]
    Registry { registry: String, reference: String, reason: String },
    #[error("OCI layout {path}: {reason}")]
    Layout { path: PathBuf, reason: String },
    #[error("containerd at {socket}: {reason}")]
    Containerd { socket: PathBuf, reason: String },
    #[error("containerd images need a containerd socket (serve --containerd-socket)")]
    NoContainerd,
    #[error("registry credentials {path}: {reason}")]
    Auth { path: PathBuf, reason: String },
    #[error("{what}: {reason}")]
    Source { what: String, reason: String },
    #[error("digest mismatch for {what}: expected {expected}, got {got}")]
    DigestMismatch { what: String, expected: String, got: String },
    #[error("{0:?} is not a sha256 digest")]
    BadDigest(String),
    #[error("{what} is malformed: {reason}")]
    Malformed { what: String, reason: String },
    #[error("{what}: unsupported media type {media_type:?}")]
    UnsupportedMediaType { what: String, media_type: String },
    #[error("{what} has no linux/amd64 image (it has: {})", platforms.join(", "))]
    NoPlatform { what: String, platforms: Vec<String> },
    #[error("unpacking layer {layer}: {source}")]
    Unpack { layer: String, source: unpack::UnpackError },
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("mounting the rootfs at {target}: {reason}")]
    Mount { target: PathBuf, reason: String },
    /// Named by the caller, which says which image it was.
    #[error("not in this worker's image store, and the pull policy is never (serve --pull)")]
    NotPresent,
}

/// When the store asks an image's source again (`serve --pull`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PullPolicy {
    /// Pull only what the store does not have under that reference.
    #[default]
    Missing,
    /// Ask which manifest a tag names now, each time; fetch only the layers the store lacks.
    Always,
    /// Never pull: an image the store lacks fails its task at once.
    Never,
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ImageError + 'a {
    move |source| ImageError::Io { op, path: path.to_path_buf(), source }
}

/// How the store finds and keeps images.
#[derive(Debug, Clone)]
pub struct ImageStoreConfig {
    /// The store's directory (`<cache>/images` by default).
    pub dir: PathBuf,
    /// Registries (`HOST:PORT`, exactly) spoken to over plain http; all others use https.
    pub insecure_registries: Vec<String>,
    /// A Docker-style `config.json` with registry credentials.
    pub auth_file: Option<PathBuf>,
    pub containerd: Option<ContainerdConfig>,
    /// Unpacked layers beyond this many bytes are removed, least recently used first.
    pub max_bytes: u64,
    /// Create the device nodes layers carry (privileged hosts); otherwise they are skipped.
    pub devices: bool,
    /// When a source is asked again.
    pub pull: PullPolicy,
}

/// An image ready to be mounted.
#[derive(Debug, Clone)]
pub struct Image {
    /// The reference it was asked by.
    pub reference: String,
    /// The manifest's digest (for a built image, the build's cache key).
    pub digest: String,
    pub config: ImageConfig,
    /// Layer directories, bottom first.
    pub layers: Vec<PathBuf>,
    /// Keeps the layers from eviction until the image is mounted (or dropped).
    _pin: Arc<Pin>,
}

/// What the store has done since it opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImageCounters {
    /// Images resolved from their source (a reference used again from the store is a hit).
    pub pulls: u64,
    pub image_hits: u64,
    pub layer_unpacks: u64,
    pub layer_hits: u64,
    pub layers_evicted: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct ImageRecord {
    reference: String,
    digest: String,
    config: ImageConfig,
    layers: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LayerMeta {
    bytes: u64,
    /// Files, directories and links (0 in records of older versions).
    #[serde(default)]
    files: u64,
    /// The name of the image built into this layer (`dockerfile@sha256:…`), for a built one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    built: Option<String>,
}

#[derive(Default)]
struct Counters {
    pulls: AtomicU64,
    image_hits: AtomicU64,
    layer_unpacks: AtomicU64,
    layer_hits: AtomicU64,
    layers_evicted: AtomicU64,
}

/// The store. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct ImageStore {
    inner: Arc<Store>,
}

struct Store {
    config: ImageStoreConfig,
    sources: Sources,
    flights: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pins: Arc<Mutex<HashMap<String, usize>>>,
    counters: Counters,
}

/// Layers a pulled image needs until its rootfs is mounted: pinned in this process, and
/// share-locked for the other worker processes on this store (see [`crate::cachelock`]).
#[derive(Debug)]
struct Pin {
    layers: Vec<String>,
    pins: Arc<Mutex<HashMap<String, usize>>>,
    _leases: Vec<crate::cachelock::EntryLock>,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut pins = lock(&self.pins);
        for l in &self.layers {
            if let Some(n) = pins.get_mut(l) {
                *n -= 1;
                if *n == 0 {
                    pins.remove(l);
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ImageStore {
    /// Opens (and creates) the store's directory.
    pub fn open(config: ImageStoreConfig) -> Result<ImageStore, ImageError> {
        for sub in ["layers", "images", "tmp"] {
            let d = config.dir.join(sub);
            std::fs::create_dir_all(&d).map_err(io("creating", &d))?;
        }
        // Unpacks a crashed run left behind (an hour old: another worker may share the store).
        if let Ok(rd) = std::fs::read_dir(config.dir.join("tmp")) {
            for e in rd.flatten() {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > Duration::from_secs(3600));
                if old {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let sources =
            Sources::new(&config.insecure_registries, config.auth_file.as_deref(), config.containerd.clone())?;
        Ok(ImageStore {
            inner: Arc::new(Store {
                config,
                sources,
                flights: Mutex::default(),
                pins: Arc::default(),
                counters: Counters::default(),
            }),
        })
    }

    pub fn config(&self) -> &ImageStoreConfig {
        &self.inner.config
    }

    pub fn counters(&self) -> ImageCounters {
        let c = &self.inner.counters;
        ImageCounters {
            pulls: c.pulls.load(Ordering::Relaxed),
            image_hits: c.image_hits.load(Ordering::Relaxed),
            layer_unpacks: c.layer_unpacks.load(Ordering::Relaxed),
            layer_hits: c.layer_hits.load(Ordering::Relaxed),
            layers_evicted: c.layers_evicted.load(Ordering::Relaxed),
        }
    }

    /// The image `reference` names, by the store's pull policy: from the store, or pulled
    /// and unpacked (only the layers the store lacks).
    pub async fn pull(&self, reference: &str) -> Result<Image, ImageError> {
        let r = ImageRef::parse(reference)?;
        let flight = self.flight(&format!("image {reference}"));
        let _one = flight.lock().await;
        let policy = self.inner.config.pull;
        let follows = r.follows_pull_policy();
        if follows
            && (policy != PullPolicy::Always || r.is_pinned())
            && let Some(image) = self.find(reference)
        {
            return Ok(self.hit(image));
        }
        if follows && policy == PullPolicy::Never {
            return Err(ImageError::NotPresent);
        }
        let what = source::display(&r);
        let (bytes, media_type, mut digest) = self.inner.sources.top(&r).await?;
        let mut doc = manifest::ManifestDoc::parse(&bytes, &what)?;
        let platform = if doc.is_index(&media_type) { Some(doc.pick_platform(&what)?) } else { None };
        if let Some(desc) = &platform {
            digest = desc.digest.clone();
        }
        // The tag still names the manifest the store has: nothing to fetch.
        if follows
            && let Some(image) = self.find(reference)
            && image.digest == digest.as_str()
        {
            return Ok(self.hit(image));
        }
        if let Some(desc) = platform {
            let bytes = self.inner.sources.blob(&r, &desc).await?;
            doc = manifest::ManifestDoc::parse(&bytes, &format!("the linux/amd64 manifest of {what}"))?;
        }
        let (config_desc, layers) = doc.image_parts(&what)?;
        let config = ImageConfig::parse(&self.inner.sources.blob(&r, &config_desc).await?, &what)?;
        let hexes: Vec<String> = layers.iter().map(|l| l.digest.hex().to_string()).collect();
        let pin = self.pin(&hexes);
        let unpacks = layers.iter().map(|l| self.layer(&r, l));
        let dirs = futures::future::try_join_all(unpacks).await?;
        let record =
            ImageRecord { reference: reference.to_string(), digest: digest.to_string(), config, layers: hexes };
        self.write_record(&record)?;
        self.inner.counters.pulls.fetch_add(1, Ordering::Relaxed);
        let image = Image {
            reference: record.reference,
            digest: record.digest,
            config: record.config,
            layers: dirs,
            _pin: pin,
        };
        // Eviction reads mountinfo and removes trees: off the async threads (while this
        // image's pin keeps its own layers).
        let store = self.clone();
        let _ = tokio::task::spawn_blocking(move || store.evict()).await;
        Ok(image)
    }

    /// Counts `image` as found in the store, each of its layers reused as it is.
    fn hit(&self, image: Image) -> Image {
        self.inner.counters.image_hits.fetch_add(1, Ordering::Relaxed);
        self.inner.counters.layer_hits.fetch_add(image.layers.len() as u64, Ordering::Relaxed);
        image
    }

    /// An image already in the store under `reference` (pulled or imported), all its layers
    /// present.
    pub fn find(&self, reference: &str) -> Option<Image> {
        let path = self.record_path(reference);
        let record: ImageRecord = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        // Pinned before looking, so eviction cannot take a layer between the look and the use.
        let pin = self.pin(&record.layers);
        let dirs: Vec<PathBuf> = record.layers.iter().map(|h| self.layer_dir(h)).collect();
        if !dirs.iter().all(|d| d.is_dir()) {
            return None;
        }
        Some(Image {
            reference: record.reference,
            digest: record.digest,
            config: record.config,
            layers: dirs,
            _pin: pin,
        })
    }

    /// A directory on the store's filesystem to fill with a root filesystem for
    /// [`ImageStore::import`] (a build's result). Removed if dropped unimported.
    pub fn staging_dir(&self) -> Result<tempfile::TempDir, ImageError> {
        let tmp = self.inner.config.dir.join("tmp");
        tempfile::Builder::new().prefix("import-").tempdir_in(&tmp).map_err(io("creating a directory in", &tmp))
    }

    /// Makes `rootfs` (filled in a [`staging_dir`](Self::staging_dir)) a one-layer image
    /// named `reference`, keyed by `key` (e.g. a build's cache key).
    pub fn import(
        &self,
        reference: &str,
        key: &str,
        rootfs: tempfile::TempDir,
        config: ImageConfig,
    ) -> Result<Image, ImageError> {
        let hex = hex::encode(Sha256::digest(format!("import\0{key}").as_bytes()));
        let pin = self.pin(std::slice::from_ref(&hex));
        let dir = self.layer_dir(&hex);
        if !dir.is_dir() {
            let (bytes, files) = crate::cache::tree_size(rootfs.path());
            self.write_layer_meta(&hex, LayerMeta { bytes, files, built: Some(reference.to_string()) })?;
            match std::fs::rename(rootfs.path(), &dir) {
                Ok(()) => {
                    let _ = rootfs.keep();
                }
                Err(_) if dir.is_dir() => {} // the same build, imported by someone else first
                Err(e) => return Err(io("moving the imported rootfs to", &dir)(e)),
            }
        }
        let record = ImageRecord {
            reference: reference.to_string(),
            digest: format!("sha256:{hex}"),
            config,
            layers: vec![hex.clone()],
        };
        self.write_record(&record)?;
        Ok(Image {
            reference: record.reference,
            digest: record.digest,
            config: record.config,
            layers: vec![dir],
            _pin: pin,
        })
    }

    /// Mounts `image` as the rootfs of the task whose directory is `task_dir`, and returns the
    /// mount point. [`unmount`] undoes it.
    pub fn mount(&self, image: &Image, task_dir: &Path) -> Result<PathBuf, ImageError> {
        let target = task_dir.join(ROOTFS);
        let overlay_dir = task_dir.join(OVERLAY);
        overlay::mount(&image.layers, &overlay_dir.join("upper"), &overlay_dir.join("work"), &target)?;
        let now = SystemTime::now();
        for layer in &image.layers {
            // The meta file's mtime is the layer's last use, for eviction.
            if let Ok(f) = std::fs::File::options().append(true).open(layer.with_extension("json")) {
                let _ = f.set_modified(now);
            }
        }
        Ok(target)
    }

    /// Removes unpacked layers, least recently used first, until the store is within its byte
    /// bound (`max_bytes`; nothing to do when it is `u64::MAX`, as in a worker, whose cache
    /// budget evicts for every cache). Layers in use (mounted by any overlay, pinned by a pull,
    /// held by a task's supervisor) stay.
    pub fn evict(&self) {
        let max = self.inner.config.max_bytes;
        if max == u64::MAX {
            return;
        }
        let dir = &self.inner.config.dir;
        let locks = crate::cachelock::EntryLocks::new(dir);
        let entries: Vec<crate::cache::Entry> = disk_entries(dir, false)
            .into_iter()
            .map(|e| {
                let lock = locks.path(&e.key);
                e.placed(0, lock)
            })
            .collect();
        let mounted = overlay::lower_dirs_in_use();
        let limit =
            crate::cache::Limit::bytes("image store", &[crate::cache::Kind::Images, crate::cache::Kind::Built], max);
        let pins = self.inner.pins.clone();
        let outcome = crate::cache::budget::enforce(
            &entries,
            &[limit],
            |e| lock(&pins).contains_key(&e.key),
            |e| match evict_layer(dir, &e.key, &mounted) {
                Ok(Some(bytes)) => {
                    self.inner.counters.layers_evicted.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(layer = %e.key, bytes, "evicted an unused layer");
                    true
                }
                Ok(None) => false,
                Err(err) => {
                    tracing::warn!(layer = %e.key, error = %err, "evicting a layer");
                    false
                }
            },
        );
        if !outcome.evicted.is_empty() {
            prune_records(dir);
        }
    }

    fn flight(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut flights = lock(&self.inner.flights);
        flights.retain(|_, m| Arc::strong_count(m) > 1);
        flights.entry(key.to_string()).or_default().clone()
    }

    fn pin(&self, layers: &[String]) -> Arc<Pin> {
        // Another process's eviction holds a layer's lock only while it moves it away: then
        // this waits a moment and finds the layer gone (and unpacks it again).
        let locks = crate::cachelock::EntryLocks::new(&self.inner.config.dir);
        let leases = layers.iter().filter_map(|l| locks.shared(l).ok()).collect();
        let mut pins = lock(&self.inner.pins);
        for l in layers {
            *pins.entry(l.clone()).or_default() += 1;
        }
        Arc::new(Pin { layers: layers.to_vec(), pins: self.inner.pins.clone(), _leases: leases })
    }

    fn layer_dir(&self, hex: &str) -> PathBuf {
        self.inner.config.dir.join("layers").join(hex)
    }

    fn record_path(&self, reference: &str) -> PathBuf {
        let name = hex::encode(Sha256::digest(reference.as_bytes()));
        self.inner.config.dir.join("images").join(format!("{name}.json"))
    }

    fn write_record(&self, record: &ImageRecord) -> Result<(), ImageError> {
        let path = self.record_path(&record.reference);
        let json = serde_json::to_vec_pretty(record)
            .map_err(|e| ImageError::Malformed { what: "the image record".into(), reason: e.to_string() })?;
        write_atomic(&path, &json)
    }

    fn write_layer_meta(&self, hex: &str, meta: LayerMeta) -> Result<(), ImageError> {
        let path = self.layer_dir(hex).with_extension("json");
        let json = serde_json::to_vec(&meta)
            .map_err(|e| ImageError::Malformed { what: "the layer record".into(), reason: e.to_string() })?;
        write_atomic(&path, &json)
    }

    /// The layer's directory, unpacked (once) if the store does not have it.
    async fn layer(&self, r: &ImageRef, desc: &manifest::Descriptor) -> Result<PathBuf, ImageError> {
        let hex = desc.digest.hex().to_string();
        let dir = self.layer_dir(&hex);
        if dir.is_dir() {
            self.inner.counters.layer_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(dir);
        }
        let flight = self.flight(&format!("layer {hex}"));
        let _one = flight.lock().await;
        if dir.is_dir() {
            self.inner.counters.layer_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(dir);
        }
        if desc.size == 0 {
            return Err(ImageError::Malformed {
                what: format!("layer {} of {}", desc.digest, source::display(r)),
                reason: "the manifest gives it no size".into(),
            });
        }
        // One byte more than the manifest says is enough to tell it lied.
        let reader: source::BlobReader =
            Box::pin(tokio::io::AsyncReadExt::take(self.inner.sources.reader(r, desc).await?, desc.size + 1));
        let tmp_root = self.inner.config.dir.join("tmp");
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{}-", &hex[..12]))
            .tempdir_in(&tmp_root)
            .map_err(io("creating a directory in", &tmp_root))?;
        let devices = self.inner.config.devices;
        // The unpacker owns its temp dir: if this pull is abandoned (another layer failed),
        // the dir is removed when the unpacker stops writing into it, not while it writes.
        let (unpacked, tmp) = tokio::task::spawn_blocking(move || {
            let sync = tokio_util::io::SyncIoBridge::new(reader);
            (unpack::unpack(sync, tmp.path(), devices), tmp)
        })
        .await
        .map_err(|e| ImageError::Source { what: format!("layer {}", desc.digest), reason: e.to_string() })?;
        let mismatch = |got: String| ImageError::DigestMismatch {
            what: format!("layer {} of {}", desc.digest, source::display(r)),
            expected: desc.digest.to_string(),
            got,
        };
        let unpacked = match unpacked {
            Ok(u) => u,
            Err(unpack::UnpackError::Broken { blob_sha256, cause }) if blob_sha256 != hex => {
                tracing::warn!(layer = %desc.digest, error = %cause, "a layer that does not match its digest");
                let got = if blob_sha256.starts_with('(') { blob_sha256 } else { format!("sha256:{blob_sha256}") };
                return Err(mismatch(got));
            }
            Err(unpack::UnpackError::Broken { cause, .. }) => {
                return Err(ImageError::Unpack { layer: desc.digest.to_string(), source: *cause });
            }
            Err(source) => return Err(ImageError::Unpack { layer: desc.digest.to_string(), source }),
        };
        if unpacked.blob_sha256 != hex {
            return Err(mismatch(format!("sha256:{}", unpacked.blob_sha256)));
        }
        if unpacked.blob_bytes != desc.size {
            return Err(ImageError::Malformed {
                what: format!("layer {}", desc.digest),
                reason: format!("{} bytes, the manifest says {}", unpacked.blob_bytes, desc.size),
            });
        }
        // The layer's root gets a root filesystem's mode (a temp dir is 0700).
        std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(io("chmod", tmp.path()))?;
        // The record first: a layer directory without one would never be counted or evicted.
        self.write_layer_meta(&hex, LayerMeta { bytes: unpacked.bytes, files: unpacked.entries, built: None })?;
        match std::fs::rename(tmp.path(), &dir) {
            Ok(()) => {
                let _ = tmp.keep();
            }
            // Another worker sharing the store put the same layer in place first.
            Err(_) if dir.is_dir() => {
                self.inner.counters.layer_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(dir);
            }
            Err(e) => return Err(io("moving the unpacked layer to", &dir)(e)),
        }
        self.inner.counters.layer_unpacks.fetch_add(1, Ordering::Relaxed);
        tracing::info!(layer = %desc.digest, bytes = unpacked.bytes, entries = unpacked.entries, "unpacked a layer");
        Ok(dir)
    }
}

/// Unmounts a task's rootfs, if it has one mounted (idempotent).
pub fn unmount(task_dir: &Path) -> Result<(), ImageError> {
    overlay::unmount(&task_dir.join(ROOTFS))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    // A name of this process's and thread's own: another writer of the same record (another
    // worker on the store, another task's pull) has its own.
    let tmp = path.with_extension(
        format!("tmp.{}.{:?}", std::process::id(), std::thread::current().id()).replace(['(', ')'], ""),
    );
    std::fs::write(&tmp, bytes).map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("renaming", &tmp))
}

/// Where layer `hex` of the store at `dir` is unpacked.
pub fn layer_dir(dir: &Path, hex: &str) -> PathBuf {
    dir.join("layers").join(hex)
}

/// The store's layers on disk (pulled ones as `images`, built images as `built`), for the
/// cache budget. With `tidy`, unpacks and evictions a crash left in `tmp/` go when they are an
/// hour old (another worker may share the store), and records of layers that are gone too.
pub(crate) fn disk_entries(dir: &Path, tidy: bool) -> Vec<crate::cache::DiskEntry> {
    let hour_old = |p: &Path| {
        std::fs::symlink_metadata(p)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(3600))
    };
    if tidy && let Ok(rd) = std::fs::read_dir(dir.join("tmp")) {
        for e in rd.flatten() {
            if hour_old(&e.path()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    static RECORDS: crate::cache::Records<LayerMeta> = crate::cache::Records::new();
    let layers = dir.join("layers");
    let Ok(rd) = std::fs::read_dir(&layers) else { return Vec::new() };
    let mut metas = Vec::new();
    let mut dirs = HashSet::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        match name.strip_suffix(".json") {
            Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
                metas.push((hex.to_string(), e));
            }
            Some(_) => {}
            None => {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.insert(name);
                }
            }
        }
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (hex, e) in metas {
        let path = e.path();
        if !dirs.contains(&hex) {
            // Written before its layer is renamed into place: only an old one is a leftover.
            if tidy && hour_old(&path) {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        }
        let Ok(m) = e.metadata() else { continue };
        seen.insert(path.clone());
        let Some(meta) = RECORDS.get(&path, &m, |b| serde_json::from_slice::<LayerMeta>(b).ok()) else { continue };
        let last_use = m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        let (kind, name) = match meta.built {
            Some(built) => (crate::cache::Kind::Built, built),
            None => (crate::cache::Kind::Images, format!("sha256:{hex}")),
        };
        out.push(crate::cache::DiskEntry {
            kind,
            key: hex,
            name,
            bytes: meta.bytes,
            files: meta.files.max(1),
            last_use,
        });
    }
    RECORDS.keep_only(&layers, &seen);
    out
}

/// Evicts layer `hex` of the store at `dir` unless an overlay mount uses it (`mounted`) or a
/// process holds it: out of `layers/` first (a rename), so no task ever sees half a layer,
/// then its record, then deleted. `Ok(None)` when it is in use.
pub(crate) fn evict_layer(dir: &Path, hex: &str, mounted: &HashSet<PathBuf>) -> std::io::Result<Option<u64>> {
    let layer = layer_dir(dir, hex);
    if mounted.contains(&layer) {
        return Ok(None);
    }
    let locks = crate::cachelock::EntryLocks::new(dir);
    let Some(evicting) = locks.try_exclusive(hex)? else { return Ok(None) };
    let meta = layer.with_extension("json");
    let bytes = std::fs::read(&meta)
        .ok()
        .and_then(|b| serde_json::from_slice::<LayerMeta>(&b).ok())
        .map(|m| m.bytes)
        .unwrap_or(0);
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp)?;
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let to = tmp.join(format!("evicted-{hex}-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
    match std::fs::rename(&layer, &to) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let _ = std::fs::remove_file(&meta);
    evicting.remove();
    let _ = std::fs::remove_dir_all(&to);
    Ok(Some(bytes))
}

/// Removes image records that name a layer the store no longer has (the image is pulled or
/// built again when a task asks for it).
pub(crate) fn prune_records(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir.join("images")) else { return };
    for e in rd.flatten() {
        if !e.file_name().to_string_lossy().ends_with(".json") {
            continue;
        }
        let Ok(bytes) = std::fs::read(e.path()) else { continue };
        let Ok(record) = serde_json::from_slice::<ImageRecord>(&bytes) else { continue };
        if record.layers.iter().any(|h| !layer_dir(dir, h).is_dir()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// For each layer of the store at `dir`, the images whose records name it.
pub fn layer_references(dir: &Path) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    let Ok(rd) = std::fs::read_dir(dir.join("images")) else { return out };
    for e in rd.flatten() {
        let Ok(bytes) = std::fs::read(e.path()) else { continue };
        let Ok(record) = serde_json::from_slice::<ImageRecord>(&bytes) else { continue };
        for h in record.layers {
            out.entry(h).or_default().push(record.reference.clone());
        }
    }
    for refs in out.values_mut() {
        refs.sort();
    }
    out
}

impl Image {
    /// The leases a task's supervisor holds on this image's layers (see
    /// [`crate::cachelock::Lease`]).
    pub fn leases(&self) -> Vec<crate::cachelock::Lease> {
        self.layers
            .iter()
            .filter_map(|layer| {
                let store = layer.parent()?.parent()?.to_path_buf();
                let key = layer.file_name()?.to_string_lossy().into_owned();
                Some(crate::cachelock::Lease { cache: store, key, record: Some(layer.with_extension("json")) })
            })
            .collect()
    }
}
