//! What the benchmarks share: a figure's samples and percentiles, and a client for a worker
//! the benchmark started.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use iris_worker::proto::worker_service_client::WorkerServiceClient;
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
