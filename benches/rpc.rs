//! `scripts/bench rpc`: round trips of HealthCheck and GetTaskStatus (a running task, so its
//! cgroup figures are read on every call) through a real `iris-worker serve`, over gRPC (one
//! HTTP/2 connection) and Connect (HTTP/1.1 keep-alive, `application/proto`, the library's own
//! client), interleaved call by call. In µs: p50, p90, p99.

mod common;

use std::time::{Duration, Instant};

use common::{Figure, Row, Server};
use iris_worker::proto::{Empty, TaskStatus, worker};
use iris_worker::rpc::connect::ConnectClient;

const SERVICE: &str = "iris.cluster.WorkerService";

async fn measure(work: &std::path::Path, n: usize) -> anyhow::Result<Vec<Figure>> {
    let server = Server::start(work, "iris-bench-rpc", &[])?;
    let mut grpc = server.client().await?;
    let connect = ConnectClient::new(&server.url);
    let task_id = "bench/rpc-sleeper";
    grpc.run_task(common::command_task(task_id, &["sleep", "1000"])).await?;
    common::wait_running(&mut grpc, task_id).await?;
    let status_req = worker::GetTaskStatusRequest { task_id: task_id.into(), include_result: false };
    let timeout = Duration::from_secs(10);
    let mut f = vec![
        Figure::new("HealthCheck, gRPC"),
        Figure::new("HealthCheck, Connect (HTTP/1.1, proto)"),
        Figure::new("GetTaskStatus of a running task, gRPC"),
        Figure::new("GetTaskStatus of a running task, Connect"),
    ];
    // Warm both connections first.
    for i in 0..n + 50 {
        let t = Instant::now();
        grpc.health_check(Empty {}).await?;
        let a = t.elapsed();
        let t = Instant::now();
        let _: worker::HealthResponse = connect.call(SERVICE, "HealthCheck", &Empty {}, timeout).await?;
        let b = t.elapsed();
        let t = Instant::now();
        let s = grpc.get_task_status(status_req.clone()).await?.into_inner();
        let c = t.elapsed();
        let t = Instant::now();
        let s2: TaskStatus = connect.call(SERVICE, "GetTaskStatus", &status_req, timeout).await?;
        let d = t.elapsed();
        if s.resource_usage.is_none() || s2.resource_usage.is_none() {
            anyhow::bail!("GetTaskStatus of the running task carried no resource usage");
        }
        if i >= 50 {
            for (fig, took) in f.iter_mut().zip([a, b, c, d]) {
                fig.samples.push(took);
            }
        }
    }
    grpc.kill_task(worker::KillTaskRequest { task_id: task_id.into(), term_timeout_ms: 100 }).await?;
    Ok(f)
}

fn main() -> anyhow::Result<()> {
    let n = common::runs(2000);
    let work = tempfile::Builder::new().prefix("iris-bench-rpc-").tempdir()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let f = rt.block_on(measure(work.path(), n))?;
    let health = f[0].pct(0.5);
    let rows: Vec<Row> = f
        .iter()
        .map(|fig| {
            let r = Row::timed(fig, "µs");
            let ratio = r.p50 / (health * 1e3);
            r.vs(format!("this/HealthCheck gRPC {ratio:.2}x")).with("this_over_grpc_health", ratio)
        })
        .collect();
    common::report("rpc", &rows);
    Ok(())
}
