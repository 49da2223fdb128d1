//! The host's figures for the dashboard's header: CPU use (from `/proc/stat` between two
//! readings), memory (`/proc/meminfo`), load (`/proc/loadavg`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Readings closer together than this reuse the previous CPU figure.
const MIN_CPU_INTERVAL: Duration = Duration::from_millis(250);

/// What the header shows about the host.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HostFigures {
    pub cpus: usize,
    /// Busy time of all CPUs since the previous reading, 100 = all of them.
    pub cpu_percent: f64,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub load1: f64,
}

/// (busy, total) jiffies of the `cpu` line of /proc/stat.
fn parse_stat(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user/nice).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// (MemTotal, MemAvailable) in bytes.
fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// A /proc/stat reading: when, (busy, total) jiffies, and the CPU percent it gave.
type CpuReading = (Instant, (u64, u64), f64);

/// Keeps the previous CPU reading so each reading gives the use since the last one.
#[derive(Debug, Default)]
pub struct HostSampler {
    last: Mutex<Option<CpuReading>>,
}

impl HostSampler {
    pub fn read(&self) -> HostFigures {
        let now = Instant::now();
        let stat = std::fs::read_to_string("/proc/stat").ok().and_then(|t| parse_stat(&t));
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let cpu_percent = match (*last, stat) {
            (Some((at, _, pct)), _) if now.duration_since(at) < MIN_CPU_INTERVAL => pct,
            (Some((_, (busy0, total0), _)), Some((busy, total))) if total > total0 => {
                let pct = busy.saturating_sub(busy0) as f64 / (total - total0) as f64 * 100.0;
                *last = Some((now, (busy, total), pct));
                pct
            }
            (_, Some(s)) => {
                // The first reading: the average since boot.
                let pct = if s.1 > 0 { s.0 as f64 / s.1 as f64 * 100.0 } else { 0.0 };
                *last = Some((now, s, pct));
                pct
            }
            (_, None) => 0.0,
        };
        drop(last);
        let (memory_total_bytes, memory_available_bytes) =
            std::fs::read_to_string("/proc/meminfo").map(|t| parse_meminfo(&t)).unwrap_or((0, 0));
        let load1 = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|t| t.split_whitespace().next().and_then(|x| x.parse().ok()))
            .unwrap_or(0.0);
        HostFigures {
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            cpu_percent,
            memory_total_bytes,
            memory_available_bytes,
            load1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_are_parsed() {
        let stat = "cpu  100 5 50 800 20 1 2 3 0 0\ncpu0 1 2 3 4\n";
        assert_eq!(parse_stat(stat), Some((161, 981)));
        let meminfo = "MemTotal:       24000000 kB\nMemFree: 1 kB\nMemAvailable:   12000000 kB\n";
        assert_eq!(parse_meminfo(meminfo), (24_000_000 * 1024, 12_000_000 * 1024));
    }

    #[test]
    fn this_host_has_figures() {
        let h = HostSampler::default().read();
        assert!(h.cpus >= 1 && h.memory_total_bytes > 0 && h.memory_available_bytes > 0, "{h:?}");
        assert!((0.0..=100.0).contains(&h.cpu_percent), "{h:?}");
    }
}
