//! A task's figures in the units both wire generations carry (whole MB, millicores, whole
//! percent), worked out once: the generations differ in message types, not in arithmetic.

use crate::task::{TaskView, Usage};

const MB: u64 = 1 << 20;

/// [`Usage`] in the wire's units.
pub(crate) struct WireUsage {
    pub memory_mb: i64,
    pub disk_mb: i64,
    pub memory_peak_mb: i64,
    /// 1000 = one core.
    pub cpu_millicores: i32,
    /// 100 = one core.
    pub cpu_percent: i32,
    pub process_count: i32,
}

impl From<&Usage> for WireUsage {
    fn from(u: &Usage) -> WireUsage {
        WireUsage {
            memory_mb: (u.memory_bytes / MB) as i64,
            disk_mb: (u.disk_bytes / MB) as i64,
            memory_peak_mb: (u.memory_peak_bytes / MB) as i64,
            cpu_millicores: (u.cpu_percent * 10.0).round() as i32,
            cpu_percent: u.cpu_percent.round() as i32,
            process_count: u.processes as i32,
        }
    }
}

/// The current attempt's environment build, for BuildMetrics.
pub(crate) struct WireBuild {
    pub started_ms: i64,
    pub finished_ms: i64,
    /// The environment was reused from the cache.
    pub from_cache: bool,
    /// What was built or reused, e.g. `venv:<hash>`.
    pub image_tag: String,
}

impl WireBuild {
    /// `None` until the attempt has started building.
    pub fn of(v: &TaskView) -> Option<WireBuild> {
        (v.build_started_ms > 0).then(|| {
            let (from_cache, image_tag) = v.build.clone().unwrap_or_default();
            WireBuild { started_ms: v.build_started_ms, finished_ms: v.build_finished_ms, from_cache, image_tag }
        })
    }
}
