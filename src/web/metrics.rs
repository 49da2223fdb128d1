//! `/metrics` in the Prometheus text format (version 0.0.4), written by hand, and the figures
//! only the web layer sees: RPC counts and latencies (a middleware on the whole port), build
//! durations and finished tasks (from the task manager's events).
//!
//! Families (all prefixed `iris_worker_`):
//! - `info{worker_id,version}` 1, `uptime_seconds`
//! - `tasks{state}`: tasks the worker knows by their current state (every state, zeros too)
//! - `tasks_finished_total{state}`: attempts that ended since the worker started
//! - `task_memory_bytes`, `task_memory_peak_bytes`, `task_cpu_percent`,
//!   `task_cpu_seconds_total`, `task_processes`, `task_disk_bytes`, labelled `task_id`,
//!   `job_id`: one series per RUNNING task (read from its cgroup when scraped)
//! - `rpc_requests_total{method,code,protocol}` and the histogram
//!   `rpc_duration_seconds{method,code,protocol}`: WorkerService calls over gRPC and Connect,
//!   from the request to the end of the response body
//! - `build_duration_seconds`: histogram of the time attempts spent BUILDING
//! - `cache_hits_total{cache}`, `cache_misses_total{cache}` for `bundles`, `venvs`, `images`,
//!   `built`: each task's use of a cache entry, found ready or made (images count layers: a
//!   hit is a layer already unpacked, a miss one pulled and unpacked)
//! - the caches and the disk (metrics/cache.rs): `cache_bytes{kind}`, `cache_entries{kind}`,
//!   `cache_in_use{kind}`, `cache_limit_bytes{limit}`, `cache_evictions_total{kind}`,
//!   `cache_scan_seconds`, `disk_free_bytes{filesystem}`, `disk_size_bytes{filesystem}`,
//!   `disk_free_inodes{filesystem}`, `disk_inodes{filesystem}`, `disk_pressure{filesystem}`

mod cache;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::Response;
use http_body_util::BodyExt;
use tonic::Code;

use crate::rpc::connect::{CallCode, code_name};
use crate::task::{TaskEvent, TaskManager, TaskState, TaskView};

/// The WorkerService path prefix whose calls are counted.
const SERVICE_PREFIX: &str = "/iris.cluster.WorkerService/";
/// The methods counted by name; any other name is counted as `other`.
const METHODS: [&str; 6] = ["RunTask", "GetTaskStatus", "ListTasks", "FetchTaskLogs", "KillTask", "HealthCheck"];
/// Upper bounds of the RPC latency buckets, in seconds.
const RPC_BUCKETS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Upper bounds of the build duration buckets, in seconds.
const BUILD_BUCKETS: [f64; 12] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0 * 5.0];
/// The caches whose hits and misses are reported (uv's cache keeps its own).
pub const CACHES: [&str; 4] = ["bundles", "venvs", "images", "built"];
/// A cumulative histogram with fixed buckets.
#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, counts: vec![0; bounds.len()], count: 0, sum: 0.0 }
    }

    fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.counts[i] += 1;
        }
        self.count += 1;
        self.sum += v;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c;
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// (method, code, protocol) of a counted call.
type RpcKey = (&'static str, &'static str, &'static str);

#[derive(Debug, Default)]
struct Figures {
    rpc: BTreeMap<RpcKey, Histogram>,
    builds: Option<Histogram>,
    finished: BTreeMap<&'static str, u64>,
    /// Attempts now BUILDING: (task_id, attempt_id) → when they started.
    building: BTreeMap<(String, i32), Instant>,
}

/// The figures behind `/metrics` that the task manager does not keep.
#[derive(Debug, Default)]
pub struct Metrics {
    figures: Mutex<Figures>,
}

fn lock(m: &Mutex<Figures>) -> std::sync::MutexGuard<'_, Figures> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Metrics {
    /// Counts one RPC.
    pub fn observe_rpc(&self, method: &'static str, code: Code, protocol: &'static str, seconds: f64) {
        lock(&self.figures)
            .rpc
            .entry((method, code_name(code), protocol))
            .or_insert_with(|| Histogram::new(&RPC_BUCKETS))
            .observe(seconds);
    }

    /// Follows a task state change: times BUILDING, counts finished attempts.
    pub fn observe_event(&self, e: &TaskEvent, now: Instant) {
        let mut f = lock(&self.figures);
        let key = (e.task_id.clone(), e.attempt_id);
        match e.state {
            TaskState::Building => {
                f.building.entry(key).or_insert(now);
            }
            state => {
                if let Some(started) = f.building.remove(&key) {
                    let secs = now.duration_since(started).as_secs_f64();
                    f.builds.get_or_insert_with(|| Histogram::new(&BUILD_BUCKETS)).observe(secs);
                }
                if state.is_terminal() {
                    *f.finished.entry(state.name()).or_default() += 1;
                }
            }
        }
    }

    /// Listens to `manager`'s events until it is dropped (needs a tokio runtime).
    pub fn follow(self: &Arc<Self>, manager: &TaskManager) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        let mut events = manager.subscribe();
        let me = Arc::downgrade(self);
        rt.spawn(async move {
            while let Some(e) = events.recv().await {
                let Some(me) = me.upgrade() else { return };
                me.observe_event(&e, Instant::now());
            }
        });
    }

    /// The whole `/metrics` page for `tasks` (the manager's list) and the worker's figures.
    pub fn render(
        &self,
        worker_id: &str,
        uptime_ms: i64,
        tasks: &[TaskView],
        caches: &crate::cache::CacheStatus,
    ) -> String {
        let mut out = String::with_capacity(4096 + tasks.len() * 600);
        family(&mut out, "iris_worker_info", "gauge", "The worker's id and version.");
        let _ = writeln!(
            out,
            "iris_worker_info{{worker_id=\"{}\",version=\"{}\"}} 1",
            label(worker_id),
            env!("CARGO_PKG_VERSION")
        );
        family(&mut out, "iris_worker_uptime_seconds", "gauge", "Seconds since the worker started.");
        let _ = writeln!(out, "iris_worker_uptime_seconds {}", uptime_ms as f64 / 1000.0);

        family(
            &mut out,
            "iris_worker_tasks",
            "gauge",
            "Tasks the worker knows, by the state of their current attempt.",
        );
        for s in TaskState::ALL {
            let n = tasks.iter().filter(|t| t.state == s).count();
            let _ = writeln!(out, "iris_worker_tasks{{state=\"{}\"}} {n}", s.name());
        }
        let f = lock(&self.figures);
        family(
            &mut out,
            "iris_worker_tasks_finished_total",
            "counter",
            "Attempts that ended since the worker started.",
        );
        for s in TaskState::ALL.iter().filter(|s| s.is_terminal()) {
            let n = f.finished.get(s.name()).copied().unwrap_or(0);
            let _ = writeln!(out, "iris_worker_tasks_finished_total{{state=\"{}\"}} {n}", s.name());
        }

        let running: Vec<(&TaskView, String)> = tasks
            .iter()
            .filter(|t| t.state == TaskState::Running && t.usage.is_some())
            .map(|t| (t, format!("task_id=\"{}\",job_id=\"{}\"", label(&t.task_id), label(&t.job_id))))
            .collect();
        type Get = fn(&crate::task::Usage) -> f64;
        let per_task: [(&str, &str, &str, Get); 6] = [
            ("iris_worker_task_memory_bytes", "gauge", "Memory the task's cgroup uses now.", |u| u.memory_bytes as f64),
            ("iris_worker_task_memory_peak_bytes", "gauge", "The task's highest memory use.", |u| {
                u.memory_peak_bytes as f64
            }),
            ("iris_worker_task_cpu_percent", "gauge", "CPU use over the last second, 100 = one core.", |u| {
                u.cpu_percent
            }),
            ("iris_worker_task_cpu_seconds_total", "counter", "CPU time the task has used.", |u| {
                u.cpu_usage_ns as f64 / 1e9
            }),
            ("iris_worker_task_processes", "gauge", "Processes in the task's cgroup.", |u| u.processes as f64),
            ("iris_worker_task_disk_bytes", "gauge", "Bytes in the task's workdir.", |u| u.disk_bytes as f64),
        ];
        for (name, kind, help, get) in per_task {
            family(&mut out, name, kind, &format!("{help} One series per RUNNING task."));
            for (t, labels) in &running {
                if let Some(u) = &t.usage {
                    let _ = writeln!(out, "{name}{{{labels}}} {}", get(u));
                }
            }
        }

        family(
            &mut out,
            "iris_worker_rpc_requests_total",
            "counter",
            "WorkerService calls by method, code and protocol.",
        );
        for ((method, code, protocol), h) in &f.rpc {
            let _ = writeln!(
                out,
                "iris_worker_rpc_requests_total{{method=\"{method}\",code=\"{code}\",protocol=\"{protocol}\"}} {}",
                h.count
            );
        }
        family(
            &mut out,
            "iris_worker_rpc_duration_seconds",
            "histogram",
            "WorkerService call latency, from the request to the end of the response.",
        );
        for ((method, code, protocol), h) in &f.rpc {
            let labels = format!("method=\"{method}\",code=\"{code}\",protocol=\"{protocol}\"");
            h.write(&mut out, "iris_worker_rpc_duration_seconds", &labels);
        }

        family(&mut out, "iris_worker_build_duration_seconds", "histogram", "Time attempts spent BUILDING.");
        f.builds.clone().unwrap_or_else(|| Histogram::new(&BUILD_BUCKETS)).write(
            &mut out,
            "iris_worker_build_duration_seconds",
            "",
        );
        drop(f);
        for (name, what) in [("iris_worker_cache_hits_total", "hits"), ("iris_worker_cache_misses_total", "misses")] {
            family(
                &mut out,
                name,
                "counter",
                &format!("Cache {what}: a task's entry found ready, or made (images: layers)."),
            );
            for cache in CACHES {
                let k = caches.kinds.iter().find(|k| k.kind == cache);
                let n = k.map(|k| if what == "hits" { k.hits } else { k.misses }).unwrap_or(0);
                let _ = writeln!(out, "{name}{{cache=\"{cache}\"}} {n}");
            }
        }
        cache::write_metrics(&mut out, caches);
        out
    }
}

pub(super) fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {}", help.replace('\\', "\\\\").replace('\n', "\\n"));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Escapes a label value: backslash, double quote and newline.
pub fn label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The counted method name of a request path, if it is a WorkerService call.
fn rpc_method(path: &str) -> Option<&'static str> {
    let name = path.strip_prefix(SERVICE_PREFIX)?;
    Some(METHODS.iter().copied().find(|m| *m == name).unwrap_or("other"))
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

fn grpc_status(headers: &HeaderMap) -> Option<Code> {
    let v = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(Code::from_i32(v))
}

/// The code of a response that says nothing else: from its HTTP status.
fn code_of_http(status: u16) -> Code {
    match status {
        200..=299 => Code::Ok,
        400 => Code::InvalidArgument,
        404 => Code::NotFound,
        405 | 415 | 501 => Code::Unimplemented,
        408 | 504 => Code::DeadlineExceeded,
        409 => Code::AlreadyExists,
        429 => Code::ResourceExhausted,
        503 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

/// Records one call when dropped: after the response body ended (or was abandoned).
struct CallGuard {
    metrics: Arc<Metrics>,
    method: &'static str,
    protocol: &'static str,
    started: Instant,
    code: Option<Code>,
}

impl CallGuard {
    fn saw(&mut self, code: Option<Code>) {
        if code.is_some() {
            self.code = code;
        }
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        // A gRPC response whose trailers never came was cut off.
        let code = self.code.unwrap_or(Code::Cancelled);
        self.metrics.observe_rpc(self.method, code, self.protocol, self.started.elapsed().as_secs_f64());
    }
}

/// Middleware over the whole port: counts WorkerService calls by method, code and protocol.
/// Connect calls carry their code as a [`CallCode`] response extension; gRPC calls in the
/// `grpc-status` header (errors) or trailer (the rest), read as the body streams out.
pub async fn track_rpc(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let Some(method) = rpc_method(req.uri().path()) else { return next.run(req).await };
    let grpc = is_grpc(req.headers());
    let started = Instant::now();
    let resp = next.run(req).await;
    let code = if grpc {
        grpc_status(resp.headers())
    } else {
        Some(resp.extensions().get::<CallCode>().map(|c| c.0).unwrap_or_else(|| code_of_http(resp.status().as_u16())))
    };
    let mut guard = CallGuard { metrics, method, protocol: if grpc { "grpc" } else { "connect" }, started, code };
    let (parts, body) = resp.into_parts();
    let body = body.map_frame(move |frame| {
        // A method call: the closure owns the whole guard, which records when the body drops.
        guard.saw(frame.trailers_ref().and_then(grpc_status));
        frame
    });
    Response::from_parts(parts, Body::new(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn histograms_are_cumulative() {
        let mut h = Histogram::new(&[1.0, 2.0]);
        h.observe(0.5);
        h.observe(1.5);
        h.observe(9.0);
        let mut out = String::new();
        h.write(&mut out, "x", "a=\"b\"");
        assert_eq!(
            out,
            "x_bucket{a=\"b\",le=\"1\"} 1\nx_bucket{a=\"b\",le=\"2\"} 2\nx_bucket{a=\"b\",le=\"+Inf\"} 3\n\
             x_sum{a=\"b\"} 11\nx_count{a=\"b\"} 3\n"
        );
    }

    #[test]
    fn cache_hits_and_misses_come_from_the_cache_status() {
        let m = Metrics::default();
        let mut caches = crate::cache::CacheStatus::default();
        let text = m.render("w", 1, &[], &caches);
        for cache in CACHES {
            assert!(text.contains(&format!("iris_worker_cache_hits_total{{cache=\"{cache}\"}} 0\n")), "{text}");
        }
        caches.kinds.push(crate::cache::KindStatus { kind: "venvs", hits: 2, misses: 1, ..Default::default() });
        let text = m.render("w", 1, &[], &caches);
        assert!(text.contains("iris_worker_cache_hits_total{cache=\"venvs\"} 2\n"), "{text}");
        assert!(text.contains("iris_worker_cache_misses_total{cache=\"venvs\"} 1\n"), "{text}");
        assert!(text.contains("iris_worker_cache_hits_total{cache=\"bundles\"} 0\n"), "{text}");
    }

    #[test]
    fn methods_are_named_from_the_path() {
        assert_eq!(rpc_method("/iris.cluster.WorkerService/RunTask"), Some("RunTask"));
        assert_eq!(rpc_method("/iris.cluster.WorkerService/Nope"), Some("other"));
        assert_eq!(rpc_method("/api/tasks"), None);
    }

    #[test]
    fn build_durations_and_finished_attempts_come_from_events() {
        let m = Metrics::default();
        let t0 = Instant::now();
        let event = |state| TaskEvent {
            task_id: "j/t".into(),
            job_id: "j".into(),
            task_index: 0,
            attempt_id: 0,
            state,
            exit_code: 0,
            error: String::new(),
            finished_at_ms: 0,
        };
        m.observe_event(&event(TaskState::Building), t0);
        m.observe_event(&event(TaskState::Building), t0 + std::time::Duration::from_millis(10));
        m.observe_event(&event(TaskState::Running), t0 + std::time::Duration::from_millis(40));
        m.observe_event(&event(TaskState::Killed), t0 + std::time::Duration::from_secs(1));
        let text = m.render("w", 1500, &[], &Default::default());
        assert!(text.contains("iris_worker_build_duration_seconds_count 1\n"), "{text}");
        assert!(text.contains("iris_worker_build_duration_seconds_bucket{le=\"0.05\"} 1\n"), "{text}");
        assert!(text.contains("iris_worker_build_duration_seconds_bucket{le=\"0.025\"} 0\n"), "{text}");
        assert!(text.contains("iris_worker_tasks_finished_total{state=\"KILLED\"} 1\n"), "{text}");
        assert!(text.contains("iris_worker_uptime_seconds 1.5\n"), "{text}");
        assert!(text.contains("iris_worker_cache_hits_total{cache=\"venvs\"} 0\n"), "{text}");
    }
}
