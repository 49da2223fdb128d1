//! The library's front door: a whole worker — the task manager, WorkerService (gRPC and
//! Connect) and the dashboard on one port, and, with a controller, the heartbeat or the
//! newest wire's registration and log pusher — built from one plain [`WorkerConfig`]:
//!
//! ```no_run
//! # async fn demo() -> Result<(), iris_worker::WorkerError> {
//! let config = iris_worker::WorkerConfig::new("/var/lib/iris-worker");
//! let worker = iris_worker::Worker::builder(config).build().await?;
//! println!("serving on {}", worker.local_addr());
//! worker.run(async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```
//!
//! When the shutdown future resolves, [`Worker::run`] stops in this order: the port stops
//! accepting and the open connections finish their requests (the listener is closed when
//! `run` returns); then every background loop — task drivers, the stats sampler, retention,
//! the cache janitor, the isolation watch, the heartbeat or registration, the log pusher — is
//! cancelled and awaited. Tasks are not touched: their supervisors keep them running, and the
//! next worker on the same state directory adopts them.

#![warn(missing_docs)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::heartbeat::{self, WorkerIdentity};
use crate::isolation::IsolationConfig;
use crate::join::IrisWire;
use crate::rpc::connect::Generation;
use crate::rpc::{ClientSecurity, ServeOptions, WorkerServiceImpl};
use crate::runtime::{Profile, RuntimeKind};
use crate::task::{Bounds, ManagerConfig, PythonConfig, TaskError, TaskManager, WorkerEnv};

/// The ports a worker gives tasks on the January wire unless told otherwise.
pub const JANUARY_PORT_RANGE: (u16, u16) = (30_000, 39_999);
/// The ports a worker gives tasks on the newest wire unless told otherwise: Iris's worker's
/// `DEFAULT_TASK_PORT_RANGE` (12000 up to, not including, 14000).
pub const NEWEST_PORT_RANGE: (u16, u16) = (12_000, 13_999);

/// The cache root of a worker built with [`WorkerConfig::new`].
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/iris-worker";

/// Everything a worker needs, as plain data. [`WorkerConfig::new`] gives the defaults of
/// `iris-worker serve` except the address: a library's worker listens on loopback, on a port
/// the kernel picks, until told otherwise.
#[derive(Clone)]
pub struct WorkerConfig {
    /// Address for gRPC, Connect and the dashboard; `[::]` takes IPv4 too.
    pub listen: SocketAddr,
    /// The state root: task directories, logs, exit records. One worker per directory.
    pub state_dir: PathBuf,
    /// The cache root: root filesystems, bundles, venvs, uv's cache.
    pub cache_dir: PathBuf,
    /// The root filesystem of tasks that name no image.
    pub rootfs: PathBuf,
    /// The image of the newest wire's attempts whose request names no `task_image` (Iris's
    /// `defaults.default_task_image`: a reference the image store pulls, e.g. a registry's
    /// or `oci:<layout>`); `None`: they run in the python rootfs.
    pub default_task_image: Option<String>,
    /// How Python tasks get their environment.
    pub python: PythonConfig,
    /// How long a finished task's workdir is kept; `None` keeps it until `cleanup`.
    pub workdir_retention: Option<Duration>,
    /// How tasks run: containers, or plain processes.
    pub runtime: RuntimeKind,
    /// The security profile of containers.
    pub profile: Profile,
    /// Tasks running at once; more wait in PENDING.
    pub max_concurrent_tasks: usize,
    /// The host ports tasks are given, inclusive; `None`: the wire generation's default
    /// ([`JANUARY_PORT_RANGE`], or Iris's own [`NEWEST_PORT_RANGE`] on the newest wire).
    pub port_range: Option<(u16, u16)>,
    /// Where the host's workers lock the ports they hand out (the same for every worker).
    pub port_lock_dir: PathBuf,
    /// The controller (`host:port` or a URL); `None`: a standalone worker.
    pub controller: Option<String>,
    /// The wire generation to speak (`Auto` is settled against the controller at build).
    pub iris_wire: IrisWire,
    /// The worker's name; its tasks' cgroups go below `iris-worker/<worker_id>` in the cgroup
    /// the worker runs in.
    pub worker_id: String,
    /// The host the controller and other tasks reach this worker's tasks on.
    pub advertise_host: String,
    /// The address tasks bind their ports on.
    pub bind_host: String,
    /// Time between heartbeats to a January controller.
    pub heartbeat_interval: Duration,
    /// The controller lease (see [`crate::supervisor::lease`]); `None`: none.
    pub lease: Option<Duration>,
    /// Attributes reported to the controller.
    pub attributes: Vec<(String, String)>,
    /// The BuildKit for Dockerfile images; `None` fails such tasks.
    pub buildkit: Option<String>,
    /// The image store: where layers are unpacked, registries, credentials, pull policy.
    pub images: crate::env::image::ImageStoreConfig,
    /// Keep tasks off the worker's port (see [`crate::isolation`]) ...
    pub task_isolation: bool,
    /// ... on every address, other hosts' included.
    pub isolate_remote_workers: bool,
    /// How often the isolation self-test runs.
    pub isolation_check_interval: Duration,
    /// ... and off the controller's port when the controller is on this host.
    pub isolate_controller: bool,
    /// What callers must present (token, TLS, Host names) and the connection bounds.
    pub serve: ServeOptions,
    /// What the worker presents to its controller.
    pub client: ClientSecurity,
    /// Where bundles may come from.
    pub bundle_sources: crate::bundle::SourcePolicy,
    /// Resource bounds every task gets unless its request says less.
    pub bounds: Bounds,
    /// The cache budget and the disk thresholds.
    pub cache: crate::cache::CacheSettings,
    /// The program run as `<exe> supervise <dir>` for each task, and as `<exe> exec <dir>` for
    /// each exec of the newest wire; `None`: this program (an embedder whose binary does not
    /// dispatch `supervise` to [`crate::supervisor`] and `exec` to [`crate::exec::helper`]
    /// points this at an `iris-worker` binary).
    pub supervisor_exe: Option<PathBuf>,
    /// Size of a task's /dev/shm when its request gives no memory limit.
    pub shm_bytes: u64,
    /// The TPU devices whose holders outside this worker's tasks make it unhealthy on the
    /// newest wire (see [`crate::devices`]); `None`: the host's own ([`crate::devices::tpu_devices`]).
    pub tpu_devices: Option<Vec<PathBuf>>,
}

impl WorkerConfig {
    /// A standalone worker on `state_dir` with `serve`'s defaults, listening on
    /// `127.0.0.1:0`.
    pub fn new(state_dir: impl Into<PathBuf>) -> WorkerConfig {
        let cache_dir = PathBuf::from(DEFAULT_CACHE_DIR);
        WorkerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            state_dir: state_dir.into(),
            rootfs: cache_dir.join("rootfs/busybox"),
            default_task_image: None,
            python: PythonConfig {
                rootfs: cache_dir.join("rootfs/python"),
                find_links: None,
                offline: false,
                build_memory_bytes: 4 << 30,
                ca_bundle: None,
                build_env: Vec::new(),
            },
            workdir_retention: Some(Duration::from_secs(86_400)),
            runtime: RuntimeKind::default(),
            profile: Profile::default(),
            max_concurrent_tasks: 64,
            port_range: None,
            port_lock_dir: crate::task::DEFAULT_PORT_LOCKS.into(),
            controller: None,
            iris_wire: IrisWire::default(),
            worker_id: nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "iris-worker".into()),
            advertise_host: "127.0.0.1".into(),
            bind_host: "127.0.0.1".into(),
            heartbeat_interval: heartbeat::HEARTBEAT_EVERY,
            lease: None,
            attributes: Vec::new(),
            buildkit: None,
            images: crate::env::image::ImageStoreConfig {
                dir: cache_dir.join("images"),
                insecure_registries: Vec::new(),
                auth_file: None,
                containerd: None,
                // The cache budget evicts layers with the other caches.
                max_bytes: u64::MAX,
                devices: false,
                pull: Default::default(),
            },
            task_isolation: true,
            isolate_remote_workers: true,
            isolation_check_interval: Duration::from_secs(60),
            isolate_controller: false,
            serve: ServeOptions {
                // Without a token, only requests naming this host (or an address) pass.
                gate: crate::rpc::auth::Gate { hosts: crate::rpc::auth::AllowedHosts::new([]), ..Default::default() },
                listen: Default::default(),
            },
            client: ClientSecurity::default(),
            bundle_sources: Default::default(),
            bounds: Bounds {
                default_pids_limit: Some(4096),
                max_log_bytes: Some(1 << 30),
                retain_finished: Some(1000),
                retain_for: Some(Duration::from_secs(7 * 86_400)),
            },
            cache: Default::default(),
            supervisor_exe: None,
            shm_bytes: 64 << 20,
            tpu_devices: None,
            cache_dir,
        }
    }
}

impl std::fmt::Debug for WorkerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The server's options hold keys and tokens: not printed.
        f.debug_struct("WorkerConfig")
            .field("listen", &self.listen)
            .field("state_dir", &self.state_dir)
            .field("worker_id", &self.worker_id)
            .field("controller", &self.controller)
            .field("runtime", &self.runtime)
            .finish_non_exhaustive()
    }
}

/// Why a worker could not be built or stopped serving. The cause is the error's
/// [`source`](std::error::Error::source) (print the chain, as `iris-worker` does).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The supervisors run as `<this program> supervise`, and its path could not be read.
    #[error("finding this program's path (for the supervisors)")]
    CurrentExe(#[source] std::io::Error),
    /// The task manager could not open (or lock) the state directory.
    #[error("opening the state directory {}", state_dir.display())]
    Open {
        /// The directory.
        state_dir: PathBuf,
        /// Why.
        source: TaskError,
    },
    /// The port could not be bound.
    #[error("listening on {addr}")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The task port range holds the worker's own port: a task could be handed it.
    #[error(
        "the task port range {first}-{last} contains the listen port {port}: a task could be handed the worker's own port"
    )]
    PortRange {
        /// The range's first port.
        first: u16,
        /// Its last.
        last: u16,
        /// The listen port.
        port: u16,
    },
    /// Setting up or running the server failed (TLS material, the accept loop).
    #[error(transparent)]
    Serve(#[from] crate::rpc::ServeError),
}

/// Builds a [`Worker`] (see [`Worker::builder`]).
#[derive(Debug)]
pub struct WorkerBuilder {
    config: WorkerConfig,
}

impl WorkerBuilder {
    /// Settles the wire generation, opens the state directory (adopting the tasks a previous
    /// worker left there), sets up task isolation and binds the port. Nothing is served and
    /// no controller is called (beyond asking its generation) until [`Worker::run`].
    pub async fn build(self) -> Result<Worker, WorkerError> {
        let config = self.config;
        let exe = match &config.supervisor_exe {
            Some(exe) => exe.clone(),
            None => std::env::current_exe().map_err(WorkerError::CurrentExe)?,
        };
        let controller_url = config.controller.clone();
        // The ports tasks may not reach, known before anything starts: the hooks go on before
        // any task is adopted and before the port is bound (see crate::isolation).
        let controller_port =
            if config.isolate_controller { local_controller_port(controller_url.as_deref()).await } else { None };
        let isolation = IsolationConfig {
            enabled: config.task_isolation,
            worker_port: Some(config.listen.port()).filter(|p| *p != 0),
            everywhere: config.isolate_remote_workers,
            local_ports: controller_port.into_iter().collect(),
            check_every: config.isolation_check_interval,
        };
        if controller_url.is_some()
            && let Some(token) = &config.client.token
        {
            // A token renewed by an earlier run (the newest wire's) outlasts the one given.
            crate::join::token::adopt_cached(token, &config.state_dir);
        }
        let controller_client =
            controller_url.as_deref().map(|url| crate::rpc::connect::ConnectClient::with_security(url, &config.client));
        // Before the state directory is opened: a task accepted before a restart is read back
        // with the decoder of the generation served.
        let (generation, answered) =
            crate::join::generation(config.iris_wire, controller_client.as_ref(), &config.state_dir).await;
        let newest = generation == Generation::Newest;
        let port_range = config.port_range.unwrap_or(if newest { NEWEST_PORT_RANGE } else { JANUARY_PORT_RANGE });
        if (port_range.0..=port_range.1).contains(&config.listen.port()) {
            return Err(WorkerError::PortRange { first: port_range.0, last: port_range.1, port: config.listen.port() });
        }
        if newest && let Some(url) = &controller_url {
            crate::rpc::newest::convert::set_controller(url);
        }
        let manager = TaskManager::open(ManagerConfig {
            state_dir: config.state_dir.clone(),
            runtime: config.runtime,
            profile: config.profile,
            rootfs: config.rootfs.clone(),
            default_task_image: config.default_task_image.clone(),
            max_concurrent_tasks: config.max_concurrent_tasks,
            port_range,
            port_lock_dir: config.port_lock_dir.clone(),
            env: WorkerEnv {
                worker_id: config.worker_id.clone(),
                controller_address: controller_url.clone(),
                bind_host: config.bind_host.clone(),
                advertise_host: config.advertise_host.clone(),
            },
            supervisor_exe: exe,
            shm_bytes: config.shm_bytes,
            cache_dir: config.cache_dir.clone(),
            workdir_retention: config.workdir_retention,
            buildkit: config.buildkit.clone(),
            images: config.images.clone(),
            bundle_sources: config.bundle_sources.clone(),
            bounds: config.bounds.clone(),
            request_decoder: Some(if newest {
                crate::rpc::newest::convert::decode_request
            } else {
                crate::rpc::decode_run_task
            }),
            isolation: Some(isolation),
            cache: config.cache.clone(),
            lease: config.lease,
            python: config.python.clone(),
        })
        .await
        .map_err(|source| WorkerError::Open { state_dir: config.state_dir.clone(), source })?;
        if answered && let Err(e) = crate::join::record(&config.state_dir, generation) {
            tracing::warn!(error = %e, "recording the controller's wire generation");
        }
        let bound = listen(config.listen).and_then(|l| Ok((l.local_addr()?, l)));
        let (addr, listener) = match bound {
            Ok(bound) => bound,
            Err(source) => {
                // The loops the manager started (adopted tasks' drivers, samplers) end here,
                // not when the runtime does.
                manager.shutdown().await;
                return Err(WorkerError::Listen { addr: config.listen, source });
            }
        };
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
        Ok(Worker { config, manager, listener, addr, generation, controller_client })
    }
}

/// A worker on its state directory and its bound port, ready to [`run`](Worker::run).
pub struct Worker {
    config: WorkerConfig,
    manager: TaskManager,
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    generation: Generation,
    controller_client: Option<crate::rpc::connect::ConnectClient>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("worker_id", &self.config.worker_id)
            .field("addr", &self.addr)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// The front door: `Worker::builder(config).build().await?.run(shutdown).await`.
    pub fn builder(config: WorkerConfig) -> WorkerBuilder {
        WorkerBuilder { config }
    }

    /// The address the port is bound to (the kernel's pick when the config said port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The task manager: run, watch, kill and read tasks without going through the port.
    pub fn manager(&self) -> &TaskManager {
        &self.manager
    }

    /// The wire generation served.
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// Starts the controller's loops (heartbeat, or the newest wire's registration and log
    /// pusher) and serves until `shutdown` resolves; then stops accepting, lets open
    /// connections finish, and cancels and awaits every background loop (see the module's
    /// documentation). Running tasks keep running under their supervisors.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), WorkerError> {
        let Worker { config, manager, listener, addr, generation, controller_client } = self;
        let newest = generation == Generation::Newest;
        let keepalive = crate::join::KeepAlive::new(crate::join::DEFAULT_KEEPALIVE);
        if newest && let Some(client) = controller_client.clone() {
            let me = crate::join::Registration {
                worker_id: config.worker_id.clone(),
                address: format!("{}:{}", config.advertise_host, addr.port()),
                metadata: crate::join::host_metadata(&config.advertise_host, &config.cache_dir, &config.attributes),
            };
            if let Some(token) = config.client.token.clone() {
                // Every client of the worker shares the token it renews.
                let renewing = crate::join::token::keep_renewed(client.clone(), token, config.state_dir.clone());
                manager.background().spawn(renewing);
            }
            crate::join::start(client, me, manager.clone(), keepalive.clone());
        } else if let Some(client) = controller_client.clone() {
            let mut metadata = heartbeat::host_metadata(&config.advertise_host);
            for (k, v) in &config.attributes {
                metadata.attributes.insert(k.clone(), heartbeat::attribute_value(v));
            }
            let me = WorkerIdentity {
                worker_id: config.worker_id.clone(),
                address: format!("{}:{}", config.advertise_host, addr.port()),
                metadata,
            };
            heartbeat::start_with_client(manager.clone(), client, me, config.heartbeat_interval);
        }
        tracing::info!(%addr, worker_id = %config.worker_id, runtime = ?config.runtime, ?generation, "worker serving");
        let served = if newest {
            let mut service =
                crate::rpc::newest::NewestService::new(manager.clone(), config.controller.clone(), config.cache_dir)
                    .with_keepalive(keepalive)
                    .with_tpu_watch(crate::devices::TpuWatch::new(
                        config.tpu_devices.unwrap_or_else(crate::devices::tpu_devices),
                        // The tasks' cgroups are named by the escaped worker id (task/seams.rs).
                        format!("/{}/{}/", crate::cgroup::ROOT_NAME, crate::task::store::escape(&config.worker_id)),
                    ));
            if let Some(client) = controller_client {
                // Each attempt's lines go to Iris's log service; its end is reported once they
                // are there.
                let pusher = crate::join::push::LogPusher::new(manager.clone(), client, config.client.clone());
                pusher.start();
                service = service.with_terminal_gate(std::sync::Arc::new(pusher));
            }
            crate::server::serve_newest(listener, service, config.serve, shutdown).await
        } else {
            crate::server::serve_with(listener, WorkerServiceImpl::new(manager.clone()), config.serve, shutdown).await
        };
        // The port is closed and no request is in flight: nothing starts new work any more.
        manager.shutdown().await;
        tracing::info!("stopped; running tasks keep running under their supervisors");
        Ok(served?)
    }
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

/// The controller's port when the controller is an address of this host: tasks may not reach
/// it either.
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
