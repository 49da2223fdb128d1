//! `scripts/bench controller`: the controller under load. An in-process controller (the
//! library's, served on loopback like `controller serve`) and N simulated workers: lightweight
//! in-process WorkerService servers (Connect, one port each) that register, accept RunTask and
//! report SUCCEEDED after a short delay — a load generator for this benchmark only.
//!
//! Figures: placement decision time per task (p50/p99), dispatch throughput (LaunchJob → every
//! RunTask received), end-to-end (→ every task SUCCEEDED), heartbeat handling (RegisterWorker
//! round trips), the controller's RSS growth, and SQLite writes per task.
//!
//! Options: --workers N (1000), --tasks N (10000), --jobs N (100), --delay-ms N (20).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use iris_controller::{Cluster, Controller, ControllerConfig};
use iris_worker::proto::controller as pc;
use iris_worker::proto::{CommandEntrypoint, Empty, ResourceSpecProto, TaskState, WorkerMetadata, worker};
use iris_worker::rpc::connect::ConnectClient;
use prost::Message;

const SERVICE: &str = "iris.cluster.ControllerService";

struct Opts {
    workers: usize,
    tasks: usize,
    jobs: usize,
    delay: Duration,
}

fn opts() -> Opts {
    let mut o = Opts { workers: 1000, tasks: 10_000, jobs: 100, delay: Duration::from_millis(20) };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let v = || args.get(i + 1).and_then(|v| v.parse::<usize>().ok());
        match args[i].as_str() {
            "--workers" => o.workers = v().unwrap_or(o.workers),
            "--tasks" => o.tasks = v().unwrap_or(o.tasks),
            "--jobs" => o.jobs = v().unwrap_or(o.jobs),
            "--delay-ms" => o.delay = Duration::from_millis(v().unwrap_or(20) as u64),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn figure(name: &str, value: f64, unit: &str) {
    println!("{name:<44} {value:>12.3} {unit}");
    eprintln!("{}", serde_json::json!({"bench": "controller", "figure": name, "value": value, "unit": unit}));
}

/// What the simulated workers saw.
#[derive(Default)]
struct Seen {
    run_tasks: AtomicU64,
    last_run_ns: AtomicU64,
}

/// One simulated worker: RunTask answers RUNNING at once and reports SUCCEEDED after `delay`.
fn sim_worker(worker_id: String, reporter: ConnectClient, seen: Arc<Seen>, t0: Instant, delay: Duration) -> Router {
    let handler = move |body: Bytes| {
        let (worker_id, reporter, seen) = (worker_id.clone(), reporter.clone(), seen.clone());
        async move {
            let Ok(req) = worker::RunTaskRequest::decode(body.as_ref()) else {
                return (axum::http::StatusCode::BAD_REQUEST, Vec::new());
            };
            seen.run_tasks.fetch_add(1, Ordering::Relaxed);
            seen.last_run_ns.fetch_max(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
            let resp = worker::RunTaskResponse { task_id: req.task_id.clone(), state: TaskState::Running as i32 };
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let report = pc::ReportTaskStateRequest {
                    worker_id,
                    task_id: req.task_id,
                    job_id: req.job_id,
                    task_index: req.task_index,
                    state: TaskState::Succeeded as i32,
                    attempt_id: req.attempt_id,
                    ..Default::default()
                };
                for _ in 0..20 {
                    let r = reporter
                        .call::<_, pc::ReportTaskStateResponse>(
                            SERVICE,
                            "ReportTaskState",
                            &report,
                            Duration::from_secs(10),
                        )
                        .await;
                    if r.is_ok() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
            (axum::http::StatusCode::OK, resp.encode_to_vec())
        }
    };
    Router::new()
        .route("/iris.cluster.WorkerService/RunTask", post(handler))
        .route("/iris.cluster.WorkerService/KillTask", post(|| async { Empty {}.encode_to_vec() }))
}

fn main() -> anyhow::Result<()> {
    let o = opts();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run(o))
}

async fn run(o: Opts) -> anyhow::Result<()> {
    println!(
        "controller benchmark: {} simulated workers, {} tasks in {} jobs, tasks end {:?} after RunTask",
        o.workers, o.tasks, o.jobs, o.delay
    );
    let state = tempfile::tempdir()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let url = format!("http://{addr}");
    let reporter = ConnectClient::new(&url);
    let seen = Arc::new(Seen::default());
    let t0 = Instant::now();

    // The simulated workers first, so the RSS baseline includes them.
    let mut workers = Vec::new();
    for i in 0..o.workers {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let waddr = l.local_addr()?;
        let id = format!("sim-{i}");
        let app = sim_worker(id.clone(), reporter.clone(), seen.clone(), t0, o.delay);
        tokio::spawn(async move { axum::serve(l, app).await });
        workers.push((id, waddr.to_string()));
    }
    let rss_before = rss_kib();
    let mut config = ControllerConfig::new(state.path());
    config.max_parallel_dispatch = 256;
    let controller = Controller::open(config)?;
    tokio::spawn(iris_controller::serve(listener, controller.clone(), std::future::pending()));

    // Registration, then a round of heartbeats, 32 at a time: their round-trip times.
    let register = |id: &str, address: &str| pc::RegisterWorkerRequest {
        worker_id: id.to_string(),
        address: address.to_string(),
        metadata: Some(WorkerMetadata { cpu_count: 16, memory_bytes: 64 << 30, ..Default::default() }),
        running_task_ids: vec![],
        ..Default::default()
    };
    let heartbeat_round = |label: &'static str| {
        let workers = workers.clone();
        let reporter = reporter.clone();
        async move {
            let started = Instant::now();
            let lat = futures::future::join_all(workers.chunks(workers.len().div_ceil(32)).map(|chunk| {
                let reporter = reporter.clone();
                async move {
                    let mut out = Vec::new();
                    for (id, address) in chunk {
                        let t = Instant::now();
                        let r: Result<pc::RegisterWorkerResponse, _> = reporter
                            .call(SERVICE, "RegisterWorker", &register(id, address), Duration::from_secs(10))
                            .await;
                        if r.is_ok() {
                            out.push(t.elapsed().as_micros() as u64);
                        }
                    }
                    out
                }
            }))
            .await;
            let mut lat: Vec<u64> = lat.into_iter().flatten().collect();
            lat.sort_unstable();
            (label, lat, started.elapsed())
        }
    };
    let (_, reg, _) = heartbeat_round("register").await;
    anyhow::ensure!(reg.len() == o.workers, "only {} of {} workers registered", reg.len(), o.workers);
    let (_, hb, hb_time) = heartbeat_round("heartbeat").await;

    // Launch every job at once.
    let cluster = Cluster::new(&url);
    let per_job = (o.tasks / o.jobs).max(1);
    let launch_started = Instant::now();
    let t_launch = t0.elapsed();
    let mut ids = Vec::new();
    for j in 0..o.jobs {
        let req = pc::LaunchJobRequest {
            name: format!("bench-{j}"),
            resources: Some(ResourceSpecProto { replicas: per_job as i32, cpu_millicores: 1000, ..Default::default() }),
            command: Some(CommandEntrypoint { argv: vec!["true".into()], setup_commands: vec![] }),
            ..Default::default()
        };
        ids.push(cluster.launch(&req).await?);
    }
    let launch_time = launch_started.elapsed();
    let total = (per_job * o.jobs) as u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    while seen.run_tasks.load(Ordering::Relaxed) < total {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} RunTask calls arrived",
            seen.run_tasks.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let dispatch_time = Duration::from_nanos(seen.last_run_ns.load(Ordering::Relaxed)) - t_launch;
    loop {
        let mut done = 0;
        for id in &ids {
            let s = cluster.status(id).await?;
            if s.state == iris_worker::proto::JobState::Succeeded as i32 {
                done += 1;
            }
        }
        if done == ids.len() {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "only {done} of {} jobs succeeded", ids.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let end_to_end = launch_started.elapsed();
    let rss_after = rss_kib();
    let (mut placement, rows, txs) = controller.figures();
    placement.sort_unstable();
    let db_bytes: u64 = ["controller.db", "controller.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(state.path().join(f)).ok())
        .map(|m| m.len())
        .sum();

    println!();
    figure("placement decision p50", pct(&placement, 0.50) as f64 / 1000.0, "µs/task");
    figure("placement decision p99", pct(&placement, 0.99) as f64 / 1000.0, "µs/task");
    figure("launch (LaunchJob calls)", launch_time.as_secs_f64() * 1000.0, "ms");
    figure("dispatch throughput (launch → last RunTask)", total as f64 / dispatch_time.as_secs_f64(), "tasks/s");
    figure("end to end (launch → all SUCCEEDED)", end_to_end.as_secs_f64(), "s");
    figure("end to end throughput", total as f64 / end_to_end.as_secs_f64(), "tasks/s");
    figure("heartbeat round trip p50", pct(&hb, 0.50) as f64, "µs");
    figure("heartbeat round trip p99", pct(&hb, 0.99) as f64, "µs");
    figure("heartbeats handled (32 in flight)", hb.len() as f64 / hb_time.as_secs_f64(), "heartbeats/s");
    figure(
        "controller RSS growth (over the sim workers)",
        (rss_after.saturating_sub(rss_before)) as f64 / 1024.0,
        "MiB",
    );
    figure("SQLite rows written per task", rows as f64 / total as f64, "rows");
    figure("SQLite transactions per task", txs as f64 / total as f64, "transactions");
    figure("SQLite file + WAL per task", db_bytes as f64 / total as f64, "bytes");
    Ok(())
}
