//! `iris-worker serve`.

use std::net::SocketAddr;

use anyhow::Context;

use super::config::{ServeArgs, ServeConfig};
use crate::task::{Bounds, PythonConfig};
use crate::{Worker, WorkerConfig};

/// A worker started on a listener: its bound address and the serving task.
pub struct Started {
    pub addr: SocketAddr,
    pub server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// The library's config from the merged settings: the flags' meaning ends here.
pub fn worker_config(config: &ServeConfig) -> WorkerConfig {
    let mut worker = WorkerConfig::new(&config.state_dir);
    worker.listen = config.listen;
    worker.cache_dir = config.cache_dir.clone();
    worker.rootfs = config.rootfs.clone();
    worker.python = PythonConfig {
        rootfs: config.python_rootfs.clone(),
        find_links: config.uv_find_links.clone(),
        offline: config.uv_offline,
        build_memory_bytes: config.build_memory_bytes,
        ca_bundle: config.ca_bundle.clone(),
        build_env: config.build_env.clone(),
    };
    worker.workdir_retention = config.workdir_retention;
    worker.runtime = config.runtime;
    worker.profile = config.profile;
    worker.max_concurrent_tasks = config.max_concurrent_tasks;
    worker.port_range = config.port_range;
    worker.port_lock_dir = config.port_lock_dir.clone();
    worker.controller = config.controller.clone();
    worker.iris_wire = config.iris_wire;
    worker.worker_id = config.worker_id.clone();
    worker.advertise_host = config.advertise_host.clone();
    worker.bind_host = config.bind_host.clone();
    worker.heartbeat_interval = config.heartbeat_interval;
    worker.lease = config.lease;
    worker.attributes = config.attributes.clone();
    worker.buildkit = config.buildkit.clone();
    worker.images = config.images.clone();
    worker.task_isolation = config.task_isolation;
    worker.isolate_remote_workers = config.isolate_remote_workers;
    worker.isolation_check_interval = config.isolation_check_interval;
    worker.isolate_controller = config.isolate_controller;
    worker.serve = config.security.serve.clone();
    worker.client = config.security.client.clone();
    worker.bundle_sources = config.bundle_sources.clone();
    worker.bounds = Bounds {
        default_pids_limit: config.default_pids_limit,
        max_log_bytes: config.max_log_bytes,
        retain_finished: config.retain_finished,
        retain_for: config.retain_for,
    };
    worker.cache = config.cache.clone();
    worker
}

/// Builds the worker and serves it until Ctrl-C or SIGTERM.
pub async fn start(config: &ServeConfig) -> anyhow::Result<Started> {
    if let Some(warning) = &config.security.exposed_warning {
        tracing::warn!("{warning}");
    }
    let worker = Worker::builder(worker_config(config)).build().await?;
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
