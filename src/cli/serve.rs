//! `iris-worker serve`.

use std::net::SocketAddr;

use anyhow::Context;

use super::config::{ServeArgs, ServeConfig};
use crate::heartbeat::{self, WorkerIdentity};
use crate::isolation::IsolationConfig;
use crate::rpc::WorkerServiceImpl;
use crate::rpc::connect::Generation;
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
    // The ports tasks may not reach, known before anything starts: the hooks go on before any
    // task is adopted and before the port is bound (see crate::isolation).
    let controller_port =
        if config.isolate_controller { local_controller_port(controller_url.as_deref()).await } else { None };
    let isolation = IsolationConfig {
        enabled: config.task_isolation,
        worker_port: Some(config.listen.port()).filter(|p| *p != 0),
        everywhere: config.isolate_remote_workers,
        local_ports: controller_port.into_iter().collect(),
        check_every: config.isolation_check_interval,
    };
    let controller_client = controller_url
        .as_deref()
        .map(|url| crate::rpc::connect::ConnectClient::with_security(url, &config.security.client));
    // Before the state directory is opened: a task accepted before a restart is read back
    // with the decoder of the generation served.
    let (generation, answered) =
        crate::join::generation(config.iris_wire, controller_client.as_ref(), &config.state_dir).await;
    let newest = generation == Generation::Newest;
    if newest && let Some(url) = &controller_url {
        crate::rpc::newest::convert::set_controller(url);
    }
    let manager = TaskManager::open(ManagerConfig {
        state_dir: config.state_dir.clone(),
        runtime: config.runtime,
        profile: config.profile,
        rootfs: config.rootfs.clone(),
        max_concurrent_tasks: config.max_concurrent_tasks,
        port_range: config.port_range,
        port_lock_dir: config.port_lock_dir.clone(),
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
        bundle_sources: config.bundle_sources.clone(),
        bounds: crate::task::Bounds {
            default_pids_limit: config.default_pids_limit,
            max_log_bytes: config.max_log_bytes,
            retain_finished: config.retain_finished,
            retain_for: config.retain_for,
        },
        request_decoder: Some(if newest {
            crate::rpc::newest::convert::decode_request
        } else {
            crate::rpc::decode_run_task
        }),
        isolation: Some(isolation),
        cache: config.cache.clone(),
        lease: config.lease,
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
    if answered && let Err(e) = crate::join::record(&config.state_dir, generation) {
        tracing::warn!(error = %e, "recording the controller's wire generation");
    }
    let listener = listen(config.listen).with_context(|| format!("listening on {}", config.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let keepalive = crate::join::KeepAlive::new(crate::join::DEFAULT_KEEPALIVE);
    if newest && let Some(client) = controller_client.clone() {
        let me = crate::join::Registration {
            worker_id: config.worker_id.clone(),
            address: format!("{}:{}", config.advertise_host, addr.port()),
            metadata: crate::join::host_metadata(&config.advertise_host, &config.cache_dir, &config.attributes),
        };
        crate::join::start(client, me, manager.clone(), keepalive.clone());
    } else if let Some(url) = &controller_url {
        let mut metadata = heartbeat::host_metadata(&config.advertise_host);
        for (k, v) in &config.attributes {
            metadata.attributes.insert(k.clone(), heartbeat::attribute_value(v));
        }
        let me = WorkerIdentity {
            worker_id: config.worker_id.clone(),
            address: format!("{}:{}", config.advertise_host, addr.port()),
            metadata,
        };
        let client = crate::rpc::connect::ConnectClient::with_security(url, &config.security.client);
        heartbeat::start_with_client(manager.clone(), client, me, config.heartbeat_interval);
    }
    if let Some(isolation) = manager.isolation() {
        if config.listen.port() == 0 {
            isolation.protect_worker_port(addr.port(), config.isolate_remote_workers);
        }
        let status = isolation.status();
        if status.is_on() {
            tracing::info!("task isolation {status}");
        } else {
            tracing::warn!("task isolation {status}");
        }
    }
    if let Some(warning) = &config.security.exposed_warning {
        tracing::warn!("{warning}");
    }
    let options = config.security.serve.clone();
    let server = if newest {
        let mut service =
            crate::rpc::newest::NewestService::new(manager.clone(), controller_url.clone(), config.cache_dir.clone())
                .with_keepalive(keepalive);
        if let Some(client) = controller_client.clone() {
            // Each attempt's lines go to Iris's log service; its end is reported once they are there.
            let pusher = crate::join::push::LogPusher::new(manager.clone(), client, config.security.client.clone());
            pusher.start();
            service = service.with_terminal_gate(std::sync::Arc::new(pusher));
        }
        tokio::spawn(async move {
            crate::server::serve_newest(listener, service, options, shutdown_signal())
                .await
                .map_err(anyhow::Error::from)
        })
    } else {
        let service = WorkerServiceImpl::new(manager.clone());
        tokio::spawn(async move {
            crate::server::serve_with(listener, service, options, shutdown_signal()).await.map_err(anyhow::Error::from)
        })
    };
    tracing::info!(%addr, worker_id = %config.worker_id, runtime = ?config.runtime, ?generation, "worker serving");
    Ok(Started { addr, server })
}

/// A listener on `addr`. On `[::]` it takes IPv4 too (a dual-stack socket, whatever
/// `net.ipv6.bindv6only` says), so no other process can take the port's IPv4 side; on a host
/// without IPv6 it falls back to `0.0.0.0`.
fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(v6) => match tokio::net::TcpSocket::new_v6() {
            Ok(s) => {
                if v6.ip().is_unspecified() {
                    nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Ipv6V6Only, &false)
                        .map_err(std::io::Error::from)?;
                }
                s
            }
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) && v6.ip().is_unspecified() => {
                tracing::info!("this host has no IPv6: listening on IPv4 only");
                return listen(SocketAddr::from(([0, 0, 0, 0], addr.port())));
            }
            Err(e) => return Err(e),
        },
    };
    // As tokio's TcpListener::bind: a restarted worker rebinds while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// The controller's port when `--controller` names an address of this host: tasks may not
/// reach it either.
async fn local_controller_port(controller: Option<&str>) -> Option<u16> {
    let controller = controller?;
    let url = url::Url::parse(controller).or_else(|_| url::Url::parse(&format!("http://{controller}"))).ok()?;
    let port = url.port_or_known_default()?;
    let host = url.host_str()?.trim_start_matches('[').trim_end_matches(']').to_string();
    let local = crate::isolation::local_prefixes();
    let resolved = tokio::net::lookup_host((host.as_str(), port)).await.ok()?;
    let mut resolved = resolved.map(|a| a.ip());
    resolved.any(|ip| crate::isolation::is_local(ip, &local)).then_some(port)
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
