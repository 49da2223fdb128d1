//! `iris-worker serve`.

use std::net::SocketAddr;

use anyhow::Context;

use super::config::{ServeArgs, ServeConfig};
use crate::Worker;

/// A worker started on a listener: its bound address and the serving task.
pub struct Started {
    pub addr: SocketAddr,
    pub server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Builds the worker and serves it until Ctrl-C or SIGTERM.
pub async fn start(config: &ServeConfig) -> anyhow::Result<Started> {
    if let Some(warning) = &config.exposed_warning {
        tracing::warn!("{warning}");
    }
    let worker = Worker::builder(config.worker.clone()).build().await?;
    let addr = worker.local_addr();
    let server = tokio::spawn(async move { worker.run(shutdown_signal()).await.map_err(anyhow::Error::from) });
    Ok(Started { addr, server })
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.resolve()?;
    super::init_logging(config.log_json);
    let started = start(&config).await?;
    started.server.await.context("the server task")??;
    Ok(())
}

/// Ctrl-C or SIGTERM. Tasks are not killed: their supervisors keep them running, and the
/// next worker on this state directory adopts them.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}
