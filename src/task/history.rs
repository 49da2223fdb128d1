//! A running task's resource history, behind the dashboard's chart: memory, CPU and process
//! counts sampled from the task's cgroup every [`SAMPLE_INTERVAL`] by one sampler for the whole
//! worker (a few small cgroup file reads per running task per tick).
//!
//! Memory is bounded whatever the task's length. Each attempt keeps two fixed-size series:
//! - `recent`: a ring of the last [`RECENT_SAMPLES`] samples at full resolution;
//! - `life`: at most [`LIFE_POINTS`] points over the attempt's whole life. When it fills up,
//!   neighbouring points are merged pairwise and each point covers twice as many samples, so
//!   an hour-long task is drawn at ~15 s resolution and a week-long one at ~40 min.
//!
//! A merged point keeps the highest memory and process count of its samples (peaks matter)
//! and their mean CPU. When the attempt ends, `recent` is dropped and `life` kept.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::cgroup::CgroupStats;

/// How often running tasks are sampled.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// Samples kept at full resolution (5 minutes).
pub const RECENT_SAMPLES: usize = 300;
/// Points kept over the whole life (an even number).
pub const LIFE_POINTS: usize = 240;

/// One point of a task's resource history.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// When it was taken (Unix epoch ms); for a merged point, its last sample's time.
    pub at_ms: i64,
    /// Memory its cgroup used then, in bytes.
    pub memory_bytes: u64,
    /// CPU use since the previous sample, 100 = one core.
    pub cpu_percent: f64,
    /// Processes in its cgroup then.
    pub processes: u64,
}

/// A copy of an attempt's history, for readers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistoryView {
    /// Milliseconds between two samples.
    pub interval_ms: u64,
    /// How many samples each point of `life` covers (1, 2, 4, …).
    pub life_stride: u32,
    /// The whole life, oldest first, at most [`LIFE_POINTS`] (+1 point still filling).
    pub life: Vec<Sample>,
    /// The last samples, oldest first, at most [`RECENT_SAMPLES`].
    pub recent: Vec<Sample>,
}

/// The history of one attempt (see the module docs).
#[derive(Debug)]
pub(crate) struct History {
    recent: VecDeque<Sample>,
    life: Vec<Sample>,
    stride: u32,
    /// The point being filled: the merge of `.1` samples so far.
    pending: Option<(Sample, u32)>,
    /// CPU time and when it was read, for the next sample's CPU percent.
    last_cpu: Option<(u64, Instant)>,
    ended: bool,
}

impl Default for History {
    fn default() -> History {
        History {
            recent: VecDeque::with_capacity(RECENT_SAMPLES),
            life: Vec::with_capacity(LIFE_POINTS),
            stride: 1,
            pending: None,
            last_cpu: None,
            ended: false,
        }
    }
}

/// Merges `b` (later) into `a` covering `na` and `nb` samples.
fn merge(a: Sample, na: u32, b: Sample, nb: u32) -> Sample {
    let (na, nb) = (f64::from(na), f64::from(nb));
    Sample {
        at_ms: a.at_ms.max(b.at_ms),
        memory_bytes: a.memory_bytes.max(b.memory_bytes),
        cpu_percent: (a.cpu_percent * na + b.cpu_percent * nb) / (na + nb),
        processes: a.processes.max(b.processes),
    }
}

impl History {
    /// Records a reading of the task's cgroup taken at `now` (`now_ms` on the wall clock).
    /// CPU percent is measured since the previous reading; the first one averages over the
    /// task's life so far (from `started_at_ms`). Returns the sample.
    pub(crate) fn observe(&mut self, stats: &CgroupStats, now: Instant, now_ms: i64, started_at_ms: i64) -> Sample {
        let cpu_ns = stats.cpu_usage_ns.unwrap_or(0);
        let cpu_percent = match self.last_cpu {
            Some((prev, at)) if now > at && cpu_ns >= prev => {
                (cpu_ns - prev) as f64 / now.duration_since(at).as_nanos() as f64 * 100.0
            }
            _ if started_at_ms > 0 && now_ms > started_at_ms => {
                cpu_ns as f64 / ((now_ms - started_at_ms) as f64 * 1e6) * 100.0
            }
            _ => 0.0,
        };
        self.last_cpu = Some((cpu_ns, now));
        let sample = Sample {
            at_ms: now_ms,
            memory_bytes: stats.memory_bytes.unwrap_or(0),
            cpu_percent,
            processes: stats.processes.unwrap_or(0),
        };
        self.record(sample);
        sample
    }

    /// Adds a sample to both series.
    pub(crate) fn record(&mut self, s: Sample) {
        if self.ended {
            return;
        }
        if self.recent.len() == RECENT_SAMPLES {
            self.recent.pop_front();
        }
        self.recent.push_back(s);
        let (point, n) = match self.pending.take() {
            Some((p, n)) => (merge(p, n, s, 1), n + 1),
            None => (s, 1),
        };
        if n < self.stride {
            self.pending = Some((point, n));
            return;
        }
        if self.life.len() == LIFE_POINTS {
            // Halve the resolution: merge neighbours in place.
            let half = LIFE_POINTS / 2;
            for i in 0..half {
                self.life[i] = merge(self.life[2 * i], self.stride, self.life[2 * i + 1], self.stride);
            }
            self.life.truncate(half);
            self.stride *= 2;
            // The finished point now covers only half a stride: keep filling it.
            self.pending = Some((point, n));
            return;
        }
        self.life.push(point);
    }

    /// The last sample, if one was taken within `max_age_ms` of `now_ms`.
    pub(crate) fn latest(&self, now_ms: i64, max_age_ms: i64) -> Option<Sample> {
        self.recent.back().copied().filter(|s| now_ms - s.at_ms <= max_age_ms)
    }

    /// The attempt ended: keep the whole-life series only.
    pub(crate) fn end(&mut self) {
        self.ended = true;
        self.recent = VecDeque::new();
    }

    pub(crate) fn view(&self) -> HistoryView {
        let mut life = self.life.clone();
        if let Some((p, _)) = self.pending {
            life.push(p);
        }
        HistoryView {
            interval_ms: SAMPLE_INTERVAL.as_millis() as u64,
            life_stride: self.stride,
            life,
            recent: self.recent.iter().copied().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(i: i64) -> Sample {
        Sample { at_ms: i * 1000, memory_bytes: i as u64, cpu_percent: 10.0, processes: 1 }
    }

    #[test]
    fn short_lives_are_kept_at_full_resolution() {
        let mut h = History::default();
        for i in 0..100 {
            h.record(sample(i));
        }
        let v = h.view();
        assert_eq!((v.life.len(), v.recent.len(), v.life_stride), (100, 100, 1));
        assert_eq!(v.life, v.recent);
    }

    #[test]
    fn memory_stays_bounded_and_the_life_series_spans_the_whole_life() {
        let mut h = History::default();
        let n = 100_000;
        for i in 0..n {
            h.record(sample(i));
            assert!(h.life.len() <= LIFE_POINTS && h.recent.len() <= RECENT_SAMPLES);
        }
        assert!(h.life.capacity() <= LIFE_POINTS && h.recent.capacity() <= 2 * RECENT_SAMPLES);
        let v = h.view();
        assert_eq!(v.recent.len(), RECENT_SAMPLES);
        assert_eq!(v.recent.last().map(|s| s.at_ms), Some((n - 1) * 1000));
        // The life series starts near the beginning and ends at the last sample.
        assert!(v.life[0].at_ms < i64::from(v.life_stride) * 1000, "{:?}", v.life[0]);
        assert_eq!(v.life.last().map(|s| s.at_ms), Some((n - 1) * 1000));
        assert!(v.life.len() >= LIFE_POINTS / 2 && v.life.len() <= LIFE_POINTS + 1);
        // Points are in time order and keep the peak memory of what they cover.
        assert!(v.life.windows(2).all(|w| w[0].at_ms < w[1].at_ms));
        assert!(v.life.iter().all(|p| p.memory_bytes as i64 * 1000 == p.at_ms));
        assert!(v.life.iter().all(|p| (p.cpu_percent - 10.0).abs() < 1e-9));
        // n samples ÷ 240 points → a stride of at least n / 240.
        assert!(u64::from(v.life_stride) * LIFE_POINTS as u64 >= n as u64);
    }

    #[test]
    fn cpu_percent_is_measured_between_readings() {
        let mut h = History::default();
        let t0 = Instant::now();
        let stats = |ns| CgroupStats { cpu_usage_ns: Some(ns), memory_bytes: Some(5), ..Default::default() };
        // First reading: 1 s of CPU over a 2 s life.
        let s = h.observe(&stats(1_000_000_000), t0, 12_000, 10_000);
        assert!((s.cpu_percent - 50.0).abs() < 1e-6, "{s:?}");
        // Then 0.5 s of CPU in 0.5 s: one full core.
        let s = h.observe(&stats(1_500_000_000), t0 + Duration::from_millis(500), 12_500, 10_000);
        assert!((s.cpu_percent - 100.0).abs() < 1e-6, "{s:?}");
        assert_eq!(s.memory_bytes, 5);
        assert_eq!(h.latest(12_600, 2_000), Some(s));
        assert_eq!(h.latest(20_000, 2_000), None);
        h.end();
        h.record(sample(99));
        assert!(h.view().recent.is_empty());
        assert_eq!(h.view().life.len(), 2);
    }
}
