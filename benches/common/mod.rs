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
        if running.is_none() && matches!(state, Some(TaskState::Running) | Some(TaskState::Succeeded)) {
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
