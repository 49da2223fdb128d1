//! `iris-worker serve`.

use std::net::SocketAddr;

use anyhow::Context;

use super::config::{ServeArgs, ServeConfig};
use crate::heartbeat::{self, WorkerIdentity};
use crate::rpc::WorkerServiceImpl;
use crate::task::{ManagerConfig, PythonConfig, TaskManager, WorkerEnv};

/// A worker started on a listener: its bound address and the serving task.
pub struct Started {
    pub addr: SocketAddr,
    pub server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Opens the state directory, binds the port and serves until Ctrl-C or SIGTERM.
pub async fn start(config: &ServeConfig) -> anyhow::Result<Started> {
    let exe = std::env::current_exe().context("finding this program's path (for the supervisors)")?;
    let controller_url = config.controller.clone();
    let manager = TaskManager::open(ManagerConfig {
        state_dir: config.state_dir.clone(),
        runtime: config.runtime,
        profile: config.profile,
        rootfs: config.rootfs.clone(),
        max_concurrent_tasks: config.max_concurrent_tasks,
        port_range: config.port_range,
        env: WorkerEnv {
            worker_id: config.worker_id.clone(),
            controller_address: controller_url.clone(),
            bind_host: config.bind_host.clone(),
            advertise_host: config.advertise_host.clone(),
        },
        supervisor_exe: exe,
        shm_bytes: 64 << 20,
        cache_dir: config.cache_dir.clone(),
        workdir_retention: config.workdir_retention,
        buildkit: config.buildkit.clone(),
        images: config.images.clone(),
        python: PythonConfig {
            rootfs: config.python_rootfs.clone(),
            find_links: config.uv_find_links.clone(),
            offline: config.uv_offline,
            build_memory_bytes: config.build_memory_bytes,
            ca_bundle: config.ca_bundle.clone(),
            build_env: config.build_env.clone(),
        },
    })
    .await
    .with_context(|| format!("opening the state directory {}", config.state_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    if let Some(url) = &controller_url {
        let mut metadata = heartbeat::host_metadata(&config.advertise_host);
        for (k, v) in &config.attributes {
            metadata.attributes.insert(k.clone(), heartbeat::attribute_value(v));
        }
        let me = WorkerIdentity {
            worker_id: config.worker_id.clone(),
            address: format!("{}:{}", config.advertise_host, addr.port()),
            metadata,
        };
        heartbeat::start_every(manager.clone(), url, me, config.heartbeat_interval);
    }
    let service = WorkerServiceImpl::new(manager.clone());
    let server = tokio::spawn(async move {
        crate::rpc::serve(listener, service, shutdown_signal()).await.map_err(anyhow::Error::from)
    });
    tracing::info!(%addr, worker_id = %config.worker_id, runtime = ?config.runtime, "worker serving");
    Ok(Started { addr, server })
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.resolve()?;
    super::init_logging(config.log_json);
    let started = start(&config).await?;
    started.server.await.context("the server task")??;
    tracing::info!("stopped; running tasks keep running under their supervisors");
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
