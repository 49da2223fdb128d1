//! What the benchmarks share: a figure's samples and percentiles, and a client for a worker
//! the benchmark started.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use anyhow::bail;
use iris_worker::proto::worker_service_client::WorkerServiceClient;
use iris_worker::proto::{TaskStatus, worker};
use iris_worker::task::TaskState;
use tonic::transport::Channel;

/// One measured figure: its samples, summarised by percentiles in milliseconds.
pub struct Figure {
    pub name: &'static str,
    pub samples: Vec<Duration>,
}

impl Figure {
    pub fn new(name: &'static str) -> Self {
        Self { name, samples: vec![] }
    }

    /// The `p` percentile (0..=1) in ms; NaN without samples.
    pub fn pct(&self, p: f64) -> f64 {
        let mut v: Vec<f64> = self.samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        if v.is_empty() {
            return f64::NAN;
        }
        v[((v.len() - 1) as f64 * p).round() as usize]
    }
}

/// A gRPC client of the worker at `url`, polling until it answers or `within` passes.
pub async fn connect(url: &str, within: Duration) -> anyhow::Result<WorkerServiceClient<Channel>> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(c) = WorkerServiceClient::connect(url.to_string()).await {
            return Ok(c);
        }
        if Instant::now() > deadline {
            anyhow::bail!("the worker at {url} did not answer within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The longest a benchmark task may take.
const TASK_DEADLINE: Duration = Duration::from_secs(180);

/// A benchmark task's timings: to RUNNING (or later) and to its end, and its final status.
pub struct Run {
    pub running: Duration,
    pub ended: Duration,
    pub status: TaskStatus,
}

/// Sends `req` and polls until the task ends, which must be SUCCEEDED.
pub async fn run(client: &mut WorkerServiceClient<Channel>, req: worker::RunTaskRequest) -> anyhow::Result<Run> {
    let task_id = req.task_id.clone();
    let t = Instant::now();
    client.run_task(req).await?;
    let mut running = None;
    loop {
        let s = client
            .get_task_status(worker::GetTaskStatusRequest { task_id: task_id.clone(), include_result: false })
            .await?
            .into_inner();
        let state = iris_worker::rpc::state_from_proto(s.state);
        if running.is_none() && matches!(state, Some(TaskState::Running | TaskState::Succeeded)) {
            running = Some(t.elapsed());
        }
        if state.is_some_and(|s| s.is_terminal()) {
            if state != Some(TaskState::Succeeded) {
                bail!("{task_id} ended {state:?}: {}", s.error);
            }
            return Ok(Run { running: running.unwrap_or_default(), ended: t.elapsed(), status: s });
        }
        if t.elapsed() > TASK_DEADLINE {
            bail!("{task_id} did not end within {TASK_DEADLINE:?}");
        }
        tokio::task::yield_now().await;
    }
}

/// Parses `--runs N` from the command line, else `default`.
pub fn runs(default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The cache directory of scripts/setup and scripts/fixtures.
pub fn cache_dir() -> std::path::PathBuf {
    std::env::var_os("IRIS_CACHE_DIR").map(Into::into).unwrap_or_else(|| "/var/cache/iris-worker".into())
}

/// The busybox test rootfs: `IRIS_BENCH_ROOTFS`, else scripts/fixtures' in the cache.
pub fn rootfs() -> std::path::PathBuf {
    std::env::var_os("IRIS_BENCH_ROOTFS").map(Into::into).unwrap_or_else(|| cache_dir().join("rootfs/busybox"))
}

/// The iris-worker binary the benchmarks serve (`IRIS_BENCH_EXE`, set by scripts/bench).
pub fn exe() -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    Ok(std::env::var_os("IRIS_BENCH_EXE").context("IRIS_BENCH_EXE: the iris-worker binary to serve")?.into())
}

/// One line of a benchmark's report: a headline value (`p50`: the median, or the figure
/// itself for rates and sizes), optional tail percentiles, what it is next to its peers, and
/// the goal when it has one.
pub struct Row {
    pub figure: String,
    pub runs: usize,
    pub unit: &'static str,
    pub p50: f64,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    /// Ratios to the peers measured in the same run, in words.
    pub vs: String,
    /// The goal for this figure, and whether this run met it.
    pub goal: Option<String>,
    /// More keys for the JSON line (ratios as numbers).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Row {
    /// A row of a timed figure in `unit` ("ms" or "µs").
    pub fn timed(f: &Figure, unit: &'static str) -> Row {
        let scale = if unit == "µs" { 1e3 } else { 1.0 };
        Row {
            figure: f.name.to_string(),
            runs: f.samples.len(),
            unit,
            p50: f.pct(0.5) * scale,
            p90: Some(f.pct(0.9) * scale),
            p99: Some(f.pct(0.99) * scale),
            vs: String::new(),
            goal: None,
            extra: Default::default(),
        }
    }

    /// A row of one value (a rate, a size).
    pub fn value(figure: impl Into<String>, runs: usize, unit: &'static str, value: f64) -> Row {
        Row {
            figure: figure.into(),
            runs,
            unit,
            p50: value,
            p90: None,
            p99: None,
            vs: String::new(),
            goal: None,
            extra: Default::default(),
        }
    }

    pub fn vs(mut self, vs: impl Into<String>) -> Row {
        self.vs = vs.into();
        self
    }

    /// Records a number for the JSON line.
    pub fn with(mut self, key: &str, value: f64) -> Row {
        self.extra.insert(key.to_string(), serde_json::json!(value));
        self
    }

    /// The goal "≤ limit" (or "≥ limit" when `at_least`) in this row's unit, and whether met.
    pub fn goal(mut self, at_least: bool, limit: f64) -> Row {
        let met = if at_least { self.p50 >= limit } else { self.p50 <= limit };
        let sign = if at_least { "≥" } else { "≤" };
        self.goal = Some(format!("{sign} {limit} {}: {}", self.unit, if met { "met" } else { "missed" }));
        self
    }

    /// A goal said in words (e.g. a ratio), met or not.
    pub fn goal_text(mut self, text: &str, met: bool) -> Row {
        self.goal = Some(format!("{text}: {}", if met { "met" } else { "missed" }));
        self
    }
}

/// Prints the benchmark's table, then one JSON line per row (`scripts/bench` collects those).
pub fn report(bench: &str, rows: &[Row]) {
    let num = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_default();
    println!("{:<58} {:>10} {:>10} {:>10} {:<8} vs peers / goal", "figure (runs)", "p50", "p90", "p99", "unit");
    for r in rows {
        let goal = r.goal.as_ref().map(|g| format!("  [goal {g}]")).unwrap_or_default();
        println!(
            "{:<58} {:>10.2} {:>10} {:>10} {:<8} {}{goal}",
            format!("{} ({})", r.figure, r.runs),
            r.p50,
            num(r.p90),
            num(r.p99),
            r.unit,
            r.vs
        );
    }
    for r in rows {
        let mut v = serde_json::json!({"bench": bench, "figure": r.figure, "runs": r.runs, "unit": r.unit,
            "p50": r.p50, "p90": r.p90, "p99": r.p99});
        if let Some(o) = v.as_object_mut() {
            if !r.vs.is_empty() {
                o.insert("vs".into(), r.vs.clone().into());
            }
            if let Some(g) = &r.goal {
                o.insert("goal".into(), g.clone().into());
            }
            o.extend(r.extra.clone());
        }
        println!("{v}");
    }
}

/// A real `iris-worker serve` on a free loopback port with its own state directory below
/// `work`. Dropping it kills it (by its pid) and runs `iris-worker cleanup --all` on its
/// state, so no cgroup, mount or supervisor outlives the benchmark.
pub struct Server {
    child: std::process::Child,
    exe: std::path::PathBuf,
    pub state: std::path::PathBuf,
    pub url: String,
    pub worker_id: String,
}

impl Server {
    pub fn start(work: &std::path::Path, worker_id: &str, extra: &[&std::ffi::OsStr]) -> anyhow::Result<Server> {
        use anyhow::Context;
        let exe = exe()?;
        let port = worker_port()?;
        let state = work.join(format!("state-{worker_id}"));
        let child = std::process::Command::new(&exe)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--worker-id", worker_id])
            .arg("--state-dir")
            .arg(&state)
            .arg("--rootfs")
            .arg(rootfs())
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting iris-worker serve")?;
        Ok(Server { child, exe, state, url: format!("http://127.0.0.1:{port}"), worker_id: worker_id.to_string() })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A gRPC client, once the server answers.
    pub async fn client(&self) -> anyhow::Result<WorkerServiceClient<Channel>> {
        connect(&self.url, Duration::from_secs(20)).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::process::Command::new(&self.exe)
            .arg("cleanup")
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--all")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// A command task's request.
pub fn command_task(task_id: &str, argv: &[&str]) -> worker::RunTaskRequest {
    worker::RunTaskRequest {
        job_id: "bench".into(),
        task_id: task_id.into(),
        num_tasks: 1,
        command: Some(iris_worker::proto::CommandEntrypoint {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            setup_commands: vec![],
        }),
        ..Default::default()
    }
}

/// Polls until the task is RUNNING (an end first is an error).
pub async fn wait_running(client: &mut WorkerServiceClient<Channel>, task_id: &str) -> anyhow::Result<TaskStatus> {
    let t = Instant::now();
    loop {
        let s = client
            .get_task_status(worker::GetTaskStatusRequest { task_id: task_id.into(), include_result: false })
            .await?
            .into_inner();
        match iris_worker::rpc::state_from_proto(s.state) {
            Some(TaskState::Running) => return Ok(s),
            Some(st) if st.is_terminal() => bail!("{task_id} ended {st:?} before running: {}", s.error),
            _ => {}
        }
        if t.elapsed() > TASK_DEADLINE {
            bail!("{task_id} did not run within {TASK_DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The resident set of process `pid` in KiB (VmRSS), if it exists.
pub fn rss_kib(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// An OCI bundle in `dir` for runc and youki: `runc spec`'s defaults with the busybox `rootfs`
/// read-only, `args`, no terminal, the worker's namespaces (no network namespace) and, when
/// given, `cgroupsPath` (youki puts an empty one at the hierarchy's root, where nothing of
/// ours may go; runc's default is below its own cgroup).
pub fn runc_bundle(
    rootfs: &std::path::Path,
    dir: &std::path::Path,
    args: &[&str],
    cgroup: Option<&str>,
) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    std::fs::create_dir_all(dir)?;
    let st = std::process::Command::new("runc").arg("spec").current_dir(dir).status().context("running runc spec")?;
    if !st.success() {
        bail!("runc spec failed");
    }
    let path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    config["process"]["terminal"] = false.into();
    config["process"]["args"] = serde_json::json!(args);
    config["root"]["path"] = rootfs.to_string_lossy().into_owned().into();
    config["root"]["readonly"] = true.into();
    config["linux"]["namespaces"] = serde_json::json!([{"type":"pid"},{"type":"ipc"},{"type":"uts"},{"type":"mount"}]);
    if let Some(c) = cgroup {
        config["linux"]["cgroupsPath"] = c.into();
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
    Ok(dir.to_path_buf())
}

/// The proportional set size of process `pid` in KiB (`Pss` of smaps_rollup): its private
/// pages plus its share of the pages it maps together with other processes (the binary's).
pub fn pss_kib(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("Pss:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A port free now for a worker to listen on, above the default task port range
/// (30000-39999): a worker refuses a `--port-range` that holds its own port, and the kernel's
/// ephemeral ports (from 32768) fall inside that range.
pub fn worker_port() -> anyhow::Result<u16> {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if port >= 40_000 {
            return Ok(port);
        }
    }
}
