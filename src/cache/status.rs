//! What the caches and the disk look like to the worker, and the settings they are kept under:
//! plain data, filled by [`crate::janitor`] and read by the web side and the heartbeat.

use super::pressure::{Filesystem, Level, Thresholds};
use super::{Amount, Kind};

/// The cache budget and the disk thresholds (`serve`'s flags).
#[derive(Debug, Clone, PartialEq)]
pub struct CacheSettings {
    /// `--cache-size`: every kind together, bytes or a share of the cache filesystem.
    pub size: Amount,
    /// Overrides for some kinds (`--cache-limit KIND=SIZE`; `--image-cache-size` is images
    /// and built images together), each bytes or a share of that kind's filesystem.
    pub limits: Vec<(Vec<Kind>, Amount)>,
    pub thresholds: Thresholds,
}

impl Default for CacheSettings {
    /// 30% of the cache filesystem, no overrides, [`Thresholds::default`].
    fn default() -> Self {
        CacheSettings { size: Amount::Percent(30.0), limits: Vec::new(), thresholds: Thresholds::default() }
    }
}

/// One kind's figures.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KindStatus {
    pub kind: &'static str,
    pub entries: u64,
    pub bytes: u64,
    /// Entries a process holds or a mount uses.
    pub in_use: u64,
    /// Its own limit, when it has one.
    pub limit_bytes: Option<u64>,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

/// A filesystem and where it stands.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FsStatus {
    #[serde(flatten)]
    pub fs: Filesystem,
    pub level: Level,
}

/// The caches and the disk, as of the last look.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CacheStatus {
    pub kinds: Vec<KindStatus>,
    pub total_bytes: u64,
    pub limit_bytes: u64,
    pub filesystems: Vec<FsStatus>,
    /// Why new tasks are refused, while a filesystem is below the hard threshold.
    pub pressure: Option<String>,
    /// When the caches were last scanned (Unix ms; 0 = not yet) and what it took.
    pub scanned_at_ms: i64,
    pub scan_micros: u64,
}
