//! The gRPC client the CLI verbs (and the tests) use.

use anyhow::Context;
use tonic::transport::Channel;

use crate::proto::worker_service_client::WorkerServiceClient;

/// Connects to a worker at `addr` (`host:port` or a URL).
pub async fn connect(addr: &str) -> anyhow::Result<WorkerServiceClient<Channel>> {
    let url = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    WorkerServiceClient::connect(url.clone()).await.with_context(|| format!("connecting to the worker at {url}"))
}
