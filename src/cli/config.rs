//! `serve` settings: flags > environment (IRIS_WORKER_*) > TOML file > defaults.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::WorkerConfig;
use crate::runtime::{Profile, RuntimeKind};

/// Every address of both families on one dual-stack socket: no other process can take the
/// port on the family the worker would not listen on (see `serve::listen`).
pub const DEFAULT_LISTEN: &str = "[::]:8080";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/iris-worker";
pub use iris_worker::worker::DEFAULT_CACHE_DIR;
pub const DEFAULT_MAX_CONCURRENT: usize = 64;
/// The controller lease in seconds: well under a controller's default dead-worker timeout
/// (60 s), so the lease and its kill are over before the controller runs the tasks elsewhere.
pub const DEFAULT_LEASE: f64 = 30.0;

/// Settings of `serve` (and `demo`). Every flag also reads IRIS_WORKER_<NAME> and the TOML
/// file's `<name>` key.
#[derive(clap::Args, Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (keys in snake_case).
    #[arg(long, env = "IRIS_WORKER_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address for gRPC, Connect and the dashboard; `[::]` takes IPv4 too [default: [::]:8080].
    #[arg(long, env = "IRIS_WORKER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// State root: task directories, logs, exit records [default: /var/lib/iris-worker].
    #[arg(long, env = "IRIS_WORKER_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Cache root: root filesystems, bundles, venvs, uv's cache, images [default: /var/cache/iris-worker].
    #[arg(long, env = "IRIS_WORKER_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Root filesystem of tasks that name no image [default: <cache-dir>/rootfs/busybox].
    #[arg(long, env = "IRIS_WORKER_ROOTFS")]
    pub rootfs: Option<PathBuf>,
    /// Root filesystem of Python tasks (a bundle or a pickled entrypoint)
    /// [default: <cache-dir>/rootfs/python].
    #[arg(long, env = "IRIS_WORKER_PYTHON_ROOTFS")]
    pub python_rootfs: Option<PathBuf>,
    /// Image of the newest Iris wire's attempts whose request names no task_image (Iris's
    /// defaults.default_task_image): a registry reference, `oci:<layout>[:tag]` or
    /// `containerd:<name>` [default: none: they run in the python rootfs].
    #[arg(long, env = "IRIS_WORKER_DEFAULT_TASK_IMAGE")]
    pub default_task_image: Option<String>,
    /// A TPU device whose holder, when not one of this worker's tasks, makes the worker
    /// unhealthy on the newest wire (repeatable) [default: the host's /dev/vfio/N and
    /// /dev/accelN].
    #[arg(long = "tpu-device", env = "IRIS_WORKER_TPU_DEVICES", value_delimiter = ',')]
    pub tpu_devices: Vec<PathBuf>,
    /// A directory of wheels uv may install from (`--find-links`) [default: none].
    #[arg(long, env = "IRIS_WORKER_UV_FIND_LINKS")]
    pub uv_find_links: Option<PathBuf>,
    /// Venv builds never use the network (uv's offline mode) [default: false].
    #[arg(long, env = "IRIS_WORKER_UV_OFFLINE")]
    pub uv_offline: Option<bool>,
    /// CA bundle (PEM) venv builds trust, mounted read-only into build containers with
    /// SSL_CERT_FILE and UV_NATIVE_TLS set; `none` for the rootfs's own
    /// [default: /etc/ssl/certs/ca-certificates.crt when the host has it].
    #[arg(long, env = "IRIS_WORKER_CA_BUNDLE")]
    pub ca_bundle: Option<String>,
    /// A variable for venv builds, NAME=VALUE (the value taken whole: commas are kept, as in
    /// NO_PROXY=localhost,10.0.0.0/8) or NAME (the worker's own value, left out when unset):
    /// the operator's index and proxy settings, e.g. UV_INDEX_URL, UV_EXTRA_INDEX_URL,
    /// UV_FIND_LINKS, PIP_INDEX_URL, HTTP_PROXY, HTTPS_PROXY, NO_PROXY. Visible to the build's
    /// code (a build backend of the job's bundle): no secrets. Repeatable (env: one per line).
    /// The variables the worker sets for builds itself are refused [default: none].
    #[arg(long = "build-env", env = "IRIS_WORKER_BUILD_ENV", value_delimiter = '\n')]
    pub build_env: Vec<String>,
    /// Memory limit of a venv build, e.g. 4G [default: 4G].
    #[arg(long, env = "IRIS_WORKER_BUILD_MEMORY")]
    pub build_memory: Option<String>,
    /// Seconds a finished task's workdir is kept (its log stays); 0 keeps it until
    /// `cleanup` [default: 86400].
    #[arg(long, env = "IRIS_WORKER_WORKDIR_RETENTION")]
    pub workdir_retention: Option<u64>,
    /// How tasks run [default: container].
    #[arg(long, env = "IRIS_WORKER_RUNTIME", value_enum)]
    pub runtime: Option<RuntimeKind>,
    /// Security profile of containers [default: restricted].
    #[arg(long, env = "IRIS_WORKER_PROFILE", value_enum)]
    pub profile: Option<Profile>,
    /// Tasks running at once; more wait in PENDING [default: 64].
    #[arg(long, env = "IRIS_WORKER_MAX_CONCURRENT_TASKS")]
    pub max_concurrent_tasks: Option<usize>,
    /// Host ports handed to tasks, as FIRST-LAST; may not contain the --listen port
    /// [default: 30000-39999 on the January wire; Iris's 12000-13999 on the newest].
    #[arg(long, env = "IRIS_WORKER_PORT_RANGE")]
    pub port_range: Option<String>,
    /// Where the host's workers lock the ports they hand out; every worker of a host must use
    /// the same one [default: /run/iris-worker/ports].
    #[arg(long, env = "IRIS_WORKER_PORT_LOCK_DIR")]
    pub port_lock_dir: Option<PathBuf>,
    /// Controller URL to register with and report to (Connect over HTTP) [default: none].
    #[arg(long, env = "IRIS_WORKER_CONTROLLER")]
    pub controller: Option<String>,
    /// Which generation of Iris's wire to serve: january (RegisterWorker, RunTask, our CLI and
    /// controller), newest (marin-iris 0.2.227: Register, Reconcile, logs pushed to Iris's log
    /// service) or auto: with --controller, the generation that controller answers (asked once
    /// at start; when it cannot be asked, the one it answered last time, else january);
    /// without one, january [default: auto].
    #[arg(long, env = "IRIS_WORKER_IRIS_WIRE", value_enum)]
    pub iris_wire: Option<crate::join::IrisWire>,
    /// This worker's id [default: the hostname].
    #[arg(long, env = "IRIS_WORKER_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Address the controller and others reach this worker and its tasks at (registered with
    /// the controller, given to tasks as IRIS_ADVERTISE_HOST) [default: the --listen IP when it
    /// is a specific address; on 0.0.0.0 the local address of the route toward --controller,
    /// else the first non-loopback IPv4].
    #[arg(long, env = "IRIS_WORKER_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,
    /// Address tasks' servers should bind, given to them as IRIS_BIND_HOST [default: 127.0.0.1].
    #[arg(long, env = "IRIS_WORKER_BIND_HOST")]
    pub bind_host: Option<String>,
    /// Log format [default: text].
    #[arg(long, env = "IRIS_WORKER_LOG_FORMAT", value_parser = ["text", "json"])]
    pub log_format: Option<String>,
    /// Seconds between heartbeats to the controller [default: 10].
    #[arg(long, env = "IRIS_WORKER_HEARTBEAT_INTERVAL")]
    pub heartbeat_interval: Option<f64>,
    /// Seconds without an answer from the controller after which the worker's tasks are
    /// killed (by their supervisors, even if the worker is dead) as WORKER_FAILED, so they
    /// never run twice; at least twice the heartbeat interval, and with its kill (a quarter,
    /// at most 5 s) under the controller's worker timeout; 0 = no lease. Only with
    /// --controller [default: 30].
    #[arg(long, env = "IRIS_WORKER_LEASE")]
    pub lease: Option<f64>,
    /// A worker attribute for job constraints, KEY=VALUE (repeatable; whole numbers become
    /// int attributes, other numbers float) [default: none].
    #[arg(long = "attribute", env = "IRIS_WORKER_ATTRIBUTES", value_delimiter = ',')]
    pub attributes: Vec<String>,
    /// BuildKit that builds `image = "dockerfile"` tasks: unix://PATH, tcp://HOST:PORT or
    /// docker-unix://PATH (a Docker daemon's embedded BuildKit) [default: none].
    #[arg(long, env = "IRIS_WORKER_BUILDKIT")]
    pub buildkit: Option<String>,
    /// The image store: unpacked layers and image records [default: <cache-dir>/images].
    #[arg(long, env = "IRIS_WORKER_IMAGE_DIR")]
    pub image_dir: Option<PathBuf>,
    /// Unpacked image layers and built images kept at most, e.g. 20G or 10% (a part of
    /// --cache-size; unused ones go first) [default: none, only --cache-size].
    #[arg(long, env = "IRIS_WORKER_IMAGE_CACHE_SIZE")]
    pub image_cache_size: Option<String>,
    /// All caches together (bundles, venvs, image layers and records, built images, uv's
    /// cache), bytes like 50G or a share of the cache filesystem like 30%; the least recently
    /// used entries no task uses go first, off the request path [default: 30%].
    #[arg(long, env = "IRIS_WORKER_CACHE_SIZE")]
    pub cache_size: Option<String>,
    /// A bound for one kind of cache within --cache-size, KIND=SIZE with KIND one of bundles,
    /// venvs, images, built, uv and SIZE like 10G or 5%; repeatable (env: comma-separated)
    /// [default: none].
    #[arg(long = "cache-limit", env = "IRIS_WORKER_CACHE_LIMITS", value_delimiter = ',')]
    pub cache_limits: Vec<String>,
    /// Below this much free space on the state, workdir, cache or image filesystem the worker
    /// takes no new task (RESOURCE_EXHAUSTED; the controller is told); bytes like 5G or a share
    /// like 5% [default: 5%].
    #[arg(long, env = "IRIS_WORKER_MIN_FREE_DISK")]
    pub min_free_disk: Option<String>,
    /// Below this much free space on a filesystem the caches there evict unused entries at
    /// once, until --target-free-disk is free [default: 10%].
    #[arg(long, env = "IRIS_WORKER_SOFT_FREE_DISK")]
    pub soft_free_disk: Option<String>,
    /// Where that eviction stops [default: 15%].
    #[arg(long, env = "IRIS_WORKER_TARGET_FREE_DISK")]
    pub target_free_disk: Option<String>,
    /// Free inodes below which no new task is taken (a count or a share like 5%); twice that
    /// starts eviction, three times is its target [default: 5%].
    #[arg(long, env = "IRIS_WORKER_MIN_FREE_INODES")]
    pub min_free_inodes: Option<String>,
    /// When an image's source is asked again: missing (use the image store's copy when it has
    /// one), always (ask which manifest a tag names now; fetch only new layers), never (an
    /// image not in the store fails its task at once). A reference pinned by digest
    /// (`name@sha256:…`) is always taken from the store when it is there [default: missing].
    #[arg(long, env = "IRIS_WORKER_PULL", value_enum)]
    pub pull: Option<crate::env::image::PullPolicy>,
    /// A registry (HOST:PORT, exactly as in image names) spoken to over plain http instead
    /// of https; repeat the flag for several (env: comma-separated) [default: none].
    #[arg(long = "insecure-registry", env = "IRIS_WORKER_INSECURE_REGISTRIES", value_delimiter = ',')]
    pub insecure_registries: Vec<String>,
    /// Registry credentials: a Docker-style config.json (`auths.<host>.auth` = base64
    /// user:password, or `registrytoken`) [default: none, anonymous].
    #[arg(long, env = "IRIS_WORKER_REGISTRY_AUTH")]
    pub registry_auth: Option<PathBuf>,
    /// containerd's socket, for `containerd:<name>` images (read from its content store only)
    /// [default: none].
    #[arg(long, env = "IRIS_WORKER_CONTAINERD_SOCKET")]
    pub containerd_socket: Option<PathBuf>,
    /// containerd namespace of `containerd:<name>` images [default: default].
    #[arg(long, env = "IRIS_WORKER_CONTAINERD_NAMESPACE")]
    pub containerd_namespace: Option<String>,
    /// Tasks can neither connect to this worker's port nor bind it: cgroup connect and bind
    /// hooks, checked at start and every --isolation-check-interval [default: true].
    #[arg(long, env = "IRIS_WORKER_TASK_ISOLATION")]
    pub task_isolation: Option<bool>,
    /// With task isolation, tasks cannot connect to the worker's port on other hosts either:
    /// every worker of a cluster listens on the same port, so a task could drive another
    /// host's worker (and tasks cannot reach any other service on that port). false: only
    /// this host's addresses are refused [default: true].
    #[arg(long, env = "IRIS_WORKER_ISOLATE_REMOTE_WORKERS")]
    pub isolate_remote_workers: Option<bool>,
    /// Seconds between the task isolation self-tests (a process in the tasks' cgroup must be
    /// refused the port); their result is HealthCheck's task_isolation [default: 60].
    #[arg(long, env = "IRIS_WORKER_ISOLATION_CHECK_INTERVAL")]
    pub isolation_check_interval: Option<f64>,
    /// With task isolation, tasks cannot reach the --controller's port either when it is on
    /// this host (Iris tasks use it for endpoints, actors and child jobs) [default: false].
    #[arg(long, env = "IRIS_WORKER_ISOLATE_CONTROLLER")]
    pub isolate_controller: Option<bool>,
    /// A file holding the token every request must carry (`Authorization: Bearer`), also sent
    /// on the worker's calls to its controller [default: none].
    #[arg(long, env = "IRIS_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// PEM certificate chain: the port speaks TLS (gRPC, Connect and pages) [default: none].
    #[arg(long, env = "IRIS_WORKER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The key of --tls-cert [default: none].
    #[arg(long, env = "IRIS_WORKER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// With TLS, clients must present a certificate this CA signed (mTLS) [default: none].
    #[arg(long, env = "IRIS_WORKER_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// The CA of the controller's certificate: calls to --controller speak TLS and present
    /// --tls-cert [default: the system's roots, for an https:// controller].
    #[arg(long, env = "IRIS_WORKER_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Another name requests without a token may carry in their Host header (repeatable; `*`
    /// for any) [default: IP addresses, localhost, the hostname, the advertised host].
    #[arg(long = "allowed-host", env = "IRIS_WORKER_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
    /// Connections open at once; at the bound the longest idle one is closed [default: 1024].
    #[arg(long, env = "IRIS_WORKER_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Seconds a client has for its TLS handshake, a request's headers and its body; a
    /// connection idle this long is closed [default: 30].
    #[arg(long, env = "IRIS_WORKER_READ_TIMEOUT")]
    pub read_timeout: Option<f64>,
    /// A directory `file://` bundles may be read from, with what is below it (repeatable)
    /// [default: none: file:// bundles are refused].
    #[arg(long = "allow-bundle-path", env = "IRIS_WORKER_ALLOW_BUNDLE_PATHS", value_delimiter = ',')]
    pub allow_bundle_paths: Vec<PathBuf>,
    /// http(s) bundles may come from loopback, private and link-local addresses (cloud
    /// metadata included) [default: false].
    #[arg(long, env = "IRIS_WORKER_ALLOW_PRIVATE_BUNDLE_HOSTS")]
    pub allow_private_bundle_hosts: Option<bool>,
    /// Processes and threads a task may have when its request sets no `pids_limit`; 0: no
    /// default [default: 4096].
    #[arg(long, env = "IRIS_WORKER_DEFAULT_PIDS_LIMIT")]
    pub default_pids_limit: Option<u64>,
    /// A task's log on disk at most, e.g. 1G: past it the log keeps its head and its newest
    /// output and says what it dropped; a task's `resources.max_log_bytes` may only lower it;
    /// 0: no cap [default: 1G].
    #[arg(long, env = "IRIS_WORKER_MAX_LOG_BYTES")]
    pub max_log_bytes: Option<String>,
    /// Finished tasks kept (their directory, log and record); older ones are removed; 0: no
    /// count limit [default: 1000].
    #[arg(long, env = "IRIS_WORKER_RETAIN_FINISHED")]
    pub retain_finished: Option<usize>,
    /// How long a finished task is kept, e.g. 7d, 12h, 30m, 90s; 0: no age limit [default: 7d].
    #[arg(long, env = "IRIS_WORKER_RETAIN_FOR")]
    pub retain_for: Option<String>,
}

/// Settings after merging: the library's [`WorkerConfig`], and what only the binary uses.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub worker: WorkerConfig,
    pub log_json: bool,
    /// Said at start when the port is open to other hosts without a token.
    pub exposed_warning: Option<String>,
}

impl ServeArgs {
    /// These settings (flags and environment) over the TOML file's: what is given here wins,
    /// a list given here replaces the file's.
    fn over(self, file: ServeArgs) -> ServeArgs {
        fn list<T>(given: Vec<T>, file: Vec<T>) -> Vec<T> {
            if given.is_empty() { file } else { given }
        }
        ServeArgs {
            config: self.config,
            listen: self.listen.or(file.listen),
            state_dir: self.state_dir.or(file.state_dir),
            cache_dir: self.cache_dir.or(file.cache_dir),
            rootfs: self.rootfs.or(file.rootfs),
            python_rootfs: self.python_rootfs.or(file.python_rootfs),
            default_task_image: self.default_task_image.or(file.default_task_image),
            tpu_devices: list(self.tpu_devices, file.tpu_devices),
            uv_find_links: self.uv_find_links.or(file.uv_find_links),
            uv_offline: self.uv_offline.or(file.uv_offline),
            ca_bundle: self.ca_bundle.or(file.ca_bundle),
            build_env: list(self.build_env, file.build_env),
            build_memory: self.build_memory.or(file.build_memory),
            workdir_retention: self.workdir_retention.or(file.workdir_retention),
            runtime: self.runtime.or(file.runtime),
            profile: self.profile.or(file.profile),
            max_concurrent_tasks: self.max_concurrent_tasks.or(file.max_concurrent_tasks),
            port_range: self.port_range.or(file.port_range),
            port_lock_dir: self.port_lock_dir.or(file.port_lock_dir),
            controller: self.controller.or(file.controller),
            iris_wire: self.iris_wire.or(file.iris_wire),
            worker_id: self.worker_id.or(file.worker_id),
            advertise_host: self.advertise_host.or(file.advertise_host),
            bind_host: self.bind_host.or(file.bind_host),
            log_format: self.log_format.or(file.log_format),
            heartbeat_interval: self.heartbeat_interval.or(file.heartbeat_interval),
            lease: self.lease.or(file.lease),
            attributes: list(self.attributes, file.attributes),
            buildkit: self.buildkit.or(file.buildkit),
            image_dir: self.image_dir.or(file.image_dir),
            image_cache_size: self.image_cache_size.or(file.image_cache_size),
            cache_size: self.cache_size.or(file.cache_size),
            cache_limits: list(self.cache_limits, file.cache_limits),
            min_free_disk: self.min_free_disk.or(file.min_free_disk),
            soft_free_disk: self.soft_free_disk.or(file.soft_free_disk),
            target_free_disk: self.target_free_disk.or(file.target_free_disk),
            min_free_inodes: self.min_free_inodes.or(file.min_free_inodes),
            pull: self.pull.or(file.pull),
            insecure_registries: list(self.insecure_registries, file.insecure_registries),
            registry_auth: self.registry_auth.or(file.registry_auth),
            containerd_socket: self.containerd_socket.or(file.containerd_socket),
            containerd_namespace: self.containerd_namespace.or(file.containerd_namespace),
            task_isolation: self.task_isolation.or(file.task_isolation),
            isolate_remote_workers: self.isolate_remote_workers.or(file.isolate_remote_workers),
            isolation_check_interval: self.isolation_check_interval.or(file.isolation_check_interval),
            isolate_controller: self.isolate_controller.or(file.isolate_controller),
            auth_token_file: self.auth_token_file.or(file.auth_token_file),
            tls_cert: self.tls_cert.or(file.tls_cert),
            tls_key: self.tls_key.or(file.tls_key),
            tls_client_ca: self.tls_client_ca.or(file.tls_client_ca),
            tls_ca: self.tls_ca.or(file.tls_ca),
            allowed_hosts: list(self.allowed_hosts, file.allowed_hosts),
            max_connections: self.max_connections.or(file.max_connections),
            read_timeout: self.read_timeout.or(file.read_timeout),
            allow_bundle_paths: list(self.allow_bundle_paths, file.allow_bundle_paths),
            allow_private_bundle_hosts: self.allow_private_bundle_hosts.or(file.allow_private_bundle_hosts),
            default_pids_limit: self.default_pids_limit.or(file.default_pids_limit),
            max_log_bytes: self.max_log_bytes.or(file.max_log_bytes),
            retain_finished: self.retain_finished.or(file.retain_finished),
            retain_for: self.retain_for.or(file.retain_for),
        }
    }

    /// Merges flags/env with the TOML file and the defaults into the worker's config.
    pub fn resolve(self) -> anyhow::Result<ServeConfig> {
        let file: ServeArgs = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => ServeArgs::default(),
        };
        let a = self.over(file);
        let cache_dir = a.cache_dir.unwrap_or_else(|| DEFAULT_CACHE_DIR.into());
        let log_format = a.log_format.unwrap_or_else(|| "text".into());
        if log_format != "text" && log_format != "json" {
            bail!("log_format must be text or json, not {log_format:?}");
        }
        let mut w = WorkerConfig::new(a.state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into()));
        w.max_concurrent_tasks = a.max_concurrent_tasks.unwrap_or(DEFAULT_MAX_CONCURRENT);
        if w.max_concurrent_tasks == 0 {
            bail!("max_concurrent_tasks must be at least 1");
        }
        w.listen = match a.listen {
            Some(l) => l,
            None => DEFAULT_LISTEN.parse().context("the default listen address")?,
        };
        w.controller = a.controller.filter(|c| !c.is_empty());
        w.advertise_host = match a.advertise_host {
            Some(host) => host,
            None => default_advertise_host(w.listen, w.controller.as_deref()),
        };
        let security = super::security::ServerSecuritySettings {
            auth_token_file: a.auth_token_file,
            tls_cert: a.tls_cert,
            tls_key: a.tls_key,
            tls_client_ca: a.tls_client_ca,
            tls_ca: a.tls_ca.clone(),
            allowed_hosts: a.allowed_hosts,
            max_connections: a.max_connections,
            read_timeout: a.read_timeout,
        }
        .resolve(w.listen, &[&w.advertise_host])?;
        // The controller's own bundles (Iris's inline ones) come from it with our token and CA.
        let bundle_controller = match &w.controller {
            Some(url) => {
                let ca_pem = match &a.tls_ca {
                    Some(p) => Some(std::fs::read(p).with_context(|| format!("reading tls_ca {}", p.display()))?),
                    None => None,
                };
                crate::bundle::sources::ControllerSource::new(url, security.client.token.clone(), ca_pem)
            }
            None => None,
        };
        w.bounds.default_pids_limit = match a.default_pids_limit.unwrap_or(4096) {
            0 => None,
            n => Some(i64::try_from(n).context("default_pids_limit is too large")?),
        };
        w.bounds.max_log_bytes =
            match parse_size(&a.max_log_bytes.unwrap_or_else(|| "1G".into())).context("max_log_bytes")? {
                0 => None,
                n if n < crate::logs::MIN_CAP => {
                    bail!("max_log_bytes must be 0 (no cap) or at least {} KiB, not {n}", crate::logs::MIN_CAP >> 10)
                }
                n => Some(n),
            };
        w.bounds.retain_for =
            match parse_duration(&a.retain_for.unwrap_or_else(|| "7d".into())).context("retain_for")? {
                d if d.is_zero() => None,
                d => Some(d),
            };
        w.bounds.retain_finished = match a.retain_finished.unwrap_or(1000) {
            0 => None,
            n => Some(n),
        };
        w.heartbeat_interval = {
            let secs = a.heartbeat_interval.unwrap_or(10.0);
            if !(secs > 0.0 && secs < 86_400.0) {
                bail!("heartbeat_interval must be between 0 and 86400 seconds, not {secs}");
            }
            std::time::Duration::from_secs_f64(secs)
        };
        w.lease = {
            let secs = a.lease.unwrap_or(DEFAULT_LEASE);
            if !(0.0..86_400.0).contains(&secs) {
                bail!("lease must be between 0 and 86400 seconds, not {secs}");
            }
            let lease = std::time::Duration::from_secs_f64(secs);
            // A lease must outlive a lost heartbeat or two, or a worker would kill its tasks
            // while the controller still counts it alive.
            if secs > 0.0 && lease < w.heartbeat_interval * 2 {
                bail!(
                    "lease ({secs} s) must be at least twice heartbeat_interval ({} s)",
                    w.heartbeat_interval.as_secs_f64()
                );
            }
            (secs > 0.0 && w.controller.is_some()).then_some(lease)
        };
        w.buildkit = a.buildkit.filter(|b| !b.is_empty());
        #[cfg(feature = "buildkit")]
        if let Some(addr) = &w.buildkit {
            crate::buildkit::connect::Address::parse(addr).context("buildkit")?;
        }
        w.cache = cache_settings(&CacheFlags {
            size: a.cache_size,
            limits: a.cache_limits,
            image_cache_size: a.image_cache_size,
            min_free_disk: a.min_free_disk,
            soft_free_disk: a.soft_free_disk,
            target_free_disk: a.target_free_disk,
            min_free_inodes: a.min_free_inodes,
        })?;
        w.rootfs = a.rootfs.unwrap_or_else(|| cache_dir.join("rootfs/busybox"));
        w.tpu_devices = (!a.tpu_devices.is_empty()).then_some(a.tpu_devices);
        w.default_task_image = match a.default_task_image {
            Some(image) if !image.is_empty() && a.runtime == Some(RuntimeKind::Process) => {
                bail!("--default-task-image {image}: images need the container runtime, not --runtime process")
            }
            Some(image) if !image.is_empty() => {
                crate::env::image::ImageRef::parse(&image).map_err(|e| anyhow::anyhow!("--default-task-image: {e}"))?;
                Some(image)
            }
            _ => None,
        };
        w.python = crate::task::PythonConfig {
            rootfs: a.python_rootfs.unwrap_or_else(|| cache_dir.join("rootfs/python")),
            offline: a.uv_offline.unwrap_or(false),
            ca_bundle: match a.ca_bundle {
                Some(v) if v == "none" || v.is_empty() => None,
                Some(v) => {
                    let path = PathBuf::from(v);
                    if !path.is_file() {
                        bail!("ca_bundle {} is not a file", path.display());
                    }
                    Some(path)
                }
                None => Some(PathBuf::from(HOST_CA_BUNDLE)).filter(|p| p.is_file()),
            },
            build_env: build_env(a.build_env, |name| std::env::var(name).ok(), a.uv_find_links.is_some())?,
            find_links: a.uv_find_links,
            build_memory_bytes: parse_size(&a.build_memory.unwrap_or_else(|| "4G".into())).context("build_memory")?,
        };
        w.workdir_retention = match a.workdir_retention.unwrap_or(86_400) {
            0 => None,
            s => Some(std::time::Duration::from_secs(s)),
        };
        w.runtime = a.runtime.unwrap_or_default();
        w.profile = a.profile.unwrap_or_default();
        // Without one, the wire generation's (settled when the worker is built).
        w.port_range = match a.port_range {
            Some(range) => {
                let (first, last) = parse_port_range(&range)?;
                if (first..=last).contains(&w.listen.port()) {
                    bail!(
                        "port_range {first}-{last} contains the listen port {}: a task could be handed the worker's \
                         own port",
                        w.listen.port()
                    );
                }
                Some((first, last))
            }
            None => None,
        };
        w.port_lock_dir = a.port_lock_dir.unwrap_or_else(|| crate::task::DEFAULT_PORT_LOCKS.into());
        w.iris_wire = a.iris_wire.unwrap_or_default();
        if let Some(id) = a.worker_id {
            w.worker_id = id;
        }
        w.bind_host = a.bind_host.unwrap_or_else(|| "127.0.0.1".into());
        w.attributes = a
            .attributes
            .iter()
            .map(|attribute| {
                let (k, v) = attribute
                    .split_once('=')
                    .filter(|(k, _)| !k.is_empty())
                    .with_context(|| format!("attribute {attribute:?} is not KEY=VALUE"))?;
                if k == crate::heartbeat::DISK_PRESSURE_ATTRIBUTE {
                    bail!("attribute {k:?} is the worker's own (it reports disk pressure)");
                }
                Ok((k.to_string(), v.to_string()))
            })
            .collect::<anyhow::Result<_>>()?;
        w.images = crate::env::image::ImageStoreConfig {
            dir: a.image_dir.unwrap_or_else(|| cache_dir.join("images")),
            insecure_registries: a.insecure_registries,
            auth_file: a.registry_auth,
            containerd: a.containerd_socket.map(|socket| crate::env::image::ContainerdConfig {
                socket,
                namespace: a.containerd_namespace.unwrap_or_else(|| "default".into()),
            }),
            // The cache budget evicts layers with the other caches (--image-cache-size is one
            // of its limits).
            max_bytes: u64::MAX,
            devices: w.profile == Profile::Privileged,
            pull: a.pull.unwrap_or_default(),
        };
        w.task_isolation = a.task_isolation.unwrap_or(true);
        w.isolate_remote_workers = a.isolate_remote_workers.unwrap_or(true);
        w.isolation_check_interval = {
            let secs = a.isolation_check_interval.unwrap_or(60.0);
            if !(0.1..=86_400.0).contains(&secs) {
                bail!("isolation_check_interval must be between 0.1 and 86400 seconds, not {secs}");
            }
            std::time::Duration::from_secs_f64(secs)
        };
        w.isolate_controller = a.isolate_controller.unwrap_or(false);
        w.bundle_sources = crate::bundle::SourcePolicy {
            allowed_dirs: a.allow_bundle_paths,
            allow_private_hosts: a.allow_private_bundle_hosts.unwrap_or(false),
            controller: bundle_controller,
        };
        w.serve = security.serve;
        w.client = security.client;
        w.cache_dir = cache_dir;
        Ok(ServeConfig { worker: w, log_json: log_format == "json", exposed_warning: security.exposed_warning })
    }
}

/// The cache flags as given.
struct CacheFlags {
    size: Option<String>,
    limits: Vec<String>,
    image_cache_size: Option<String>,
    min_free_disk: Option<String>,
    soft_free_disk: Option<String>,
    target_free_disk: Option<String>,
    min_free_inodes: Option<String>,
}

/// The cache budget and the disk thresholds from their flags (the defaults where not given):
/// each amount must parse, each limit name a kind, and the thresholds given in the same unit
/// must rise from hard to soft to target.
fn cache_settings(f: &CacheFlags) -> anyhow::Result<crate::cache::CacheSettings> {
    use crate::cache::{Amount, Kind};
    let d = crate::cache::CacheSettings::default();
    let amount = |v: &Option<String>, name: &str, default: Amount| -> anyhow::Result<Amount> {
        match v {
            Some(s) => Amount::parse(s).with_context(|| name.to_string()),
            None => Ok(default),
        }
    };
    let mut limits = Vec::new();
    if let Some(s) = &f.image_cache_size {
        limits.push((vec![Kind::Images, Kind::Built], Amount::parse(s).context("image_cache_size")?));
    }
    for item in &f.limits {
        let (kind, size) = item.split_once('=').with_context(|| format!("cache_limit {item:?} is not KIND=SIZE"))?;
        let kind = Kind::parse(kind.trim()).map_err(anyhow::Error::msg).context("cache_limit")?;
        let size = Amount::parse(size).with_context(|| format!("cache_limit {item:?}"))?;
        limits.push((vec![kind], size));
    }
    let t = crate::cache::pressure::Thresholds {
        min_free: amount(&f.min_free_disk, "min_free_disk", d.thresholds.min_free)?,
        soft_free: amount(&f.soft_free_disk, "soft_free_disk", d.thresholds.soft_free)?,
        target_free: amount(&f.target_free_disk, "target_free_disk", d.thresholds.target_free)?,
        min_free_inodes: amount(&f.min_free_inodes, "min_free_inodes", d.thresholds.min_free_inodes)?,
    };
    let rising = |a: Amount, b: Amount| match (a, b) {
        (Amount::Percent(x), Amount::Percent(y)) => x <= y,
        (Amount::Bytes(x), Amount::Bytes(y)) => x <= y,
        _ => true,
    };
    if !rising(t.min_free, t.soft_free) || !rising(t.soft_free, t.target_free) {
        bail!(
            "min_free_disk ({}) <= soft_free_disk ({}) <= target_free_disk ({}) must hold",
            t.min_free,
            t.soft_free,
            t.target_free
        );
    }
    Ok(crate::cache::CacheSettings { size: amount(&f.size, "cache_size", d.size)?, limits, thresholds: t })
}

/// The host's CA bundle on Debian and its derivatives.
const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// `--build-env` entries as NAME=VALUE: NAME alone takes the worker's own value (left out
/// when the worker has none). A name the worker sets for builds itself is refused, naming the
/// setting that controls it: given twice, one of the values would be silently ignored.
/// `UV_FIND_LINKS` is the operator's to give unless `--uv-find-links` sets it (that flag takes
/// a local directory; the variable may name an index page by URL).
fn build_env(
    list: Vec<String>,
    worker_env: impl Fn(&str) -> Option<String>,
    uv_find_links_given: bool,
) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for item in list {
        let (name, value) = match item.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (item.clone(), None),
        };
        let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            bail!("--build-env {item:?}: {name:?} is not a variable name");
        }
        let set_by = crate::env::venv::BUILD_ENV_SET_BY_WORKER
            .iter()
            .find(|(n, _)| *n == name || n.strip_suffix('*').is_some_and(|prefix| name.starts_with(prefix)))
            .map(|(_, by)| *by)
            .filter(|by| *by != "--uv-find-links" || uv_find_links_given);
        if let Some(by) = set_by {
            bail!("--build-env {name}: the worker sets it for builds itself ({by})");
        }
        if let Some(v) = value.or_else(|| worker_env(&name)) {
            out.push(format!("{name}={v}"));
        }
    }
    Ok(out)
}

/// Parses `64M`, `1G`, `512K` or plain bytes.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.parse().with_context(|| format!("{s:?} is not a size like 512M"))?;
    n.checked_mul(mul).with_context(|| format!("{s:?} is too large"))
}

/// Parses a duration: a number with `s`, `m`, `h` or `d`, or plain seconds (`90`, `90s`,
/// `30m`, `12h`, `7d`).
pub fn parse_duration(s: &str) -> anyhow::Result<std::time::Duration> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let mul: u64 = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => bail!("{s:?} is not a duration like 90s, 30m, 12h or 7d"),
    };
    let n: u64 = num.trim().parse().with_context(|| format!("{s:?} is not a duration like 90s, 30m, 12h or 7d"))?;
    let secs = n.checked_mul(mul).with_context(|| format!("{s:?} is too long"))?;
    Ok(std::time::Duration::from_secs(secs))
}

/// Parses `FIRST-LAST`.
pub fn parse_port_range(s: &str) -> anyhow::Result<(u16, u16)> {
    let (a, b) = s.split_once('-').with_context(|| format!("port range {s:?} is not FIRST-LAST"))?;
    let a: u16 = a.trim().parse().with_context(|| format!("port range {s:?}: bad first port"))?;
    let b: u16 = b.trim().parse().with_context(|| format!("port range {s:?}: bad last port"))?;
    if a == 0 || a > b {
        bail!("port range {s:?} must satisfy 0 < FIRST <= LAST");
    }
    Ok((a, b))
}

/// The address a worker that gives none advertises: the IP it listens on when that is a
/// specific one (a worker on 127.0.0.1 is reachable only there); on an unspecified address the
/// local address of the route toward the controller (what the controller can reach); else the
/// first non-loopback IPv4.
fn default_advertise_host(listen: SocketAddr, controller: Option<&str>) -> String {
    let ip = listen.ip();
    if !ip.is_unspecified() {
        return host_of(ip);
    }
    controller.and_then(route_source_toward).map(host_of).unwrap_or_else(first_ipv4)
}

/// An IP as the host part of `host:port` (IPv6 in brackets).
fn host_of(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// The local address the kernel would send from toward the controller at `url`: a UDP socket
/// "connected" to it (no packet is sent) has that address.
fn route_source_toward(url: &str) -> Option<std::net::IpAddr> {
    use std::net::ToSocketAddrs;
    let with_scheme = if url.contains("://") { url.to_string() } else { format!("http://{url}") };
    let parsed = url::Url::parse(&with_scheme).ok()?;
    let host = parsed.host_str()?.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = parsed.port_or_known_default().unwrap_or(80);
    let target = (host.as_str(), port).to_socket_addrs().ok()?.next()?;
    let bind: SocketAddr = if target.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let socket = std::net::UdpSocket::bind(bind).ok()?;
    socket.connect(target).ok()?;
    socket.local_addr().ok().map(|a| a.ip()).filter(|ip| !ip.is_unspecified())
}

pub(crate) fn first_ipv4() -> String {
    nix::ifaddrs::getifaddrs()
        .ok()
        .and_then(|addrs| {
            addrs
                .filter_map(|a| a.address.and_then(|s| s.as_sockaddr_in().map(|v4| v4.ip())))
                .find(|ip| !ip.is_loopback())
        })
        .map(|ip| ip.to_string())
        .unwrap_or_else(|| "127.0.0.1".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_which_wins_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:9000\"\nmax_concurrent_tasks = 3\nport_range = \"100-200\"\n")
            .unwrap();
        let args = ServeArgs { config: Some(file), max_concurrent_tasks: Some(7), ..Default::default() };
        let c = args.resolve().unwrap();
        assert_eq!(c.worker.listen.to_string(), "127.0.0.1:9000");
        assert_eq!(c.worker.max_concurrent_tasks, 7);
        assert_eq!(c.worker.port_range, Some((100, 200)));
        assert_eq!(c.worker.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
    }

    #[test]
    fn build_env_takes_values_or_the_workers_own_and_refuses_what_the_worker_sets() {
        let worker_env = |name: &str| (name == "HTTPS_PROXY").then(|| "http://proxy:3128".to_string());
        let got = build_env(
            vec!["UV_INDEX_URL=https://idx/simple".into(), "HTTPS_PROXY".into(), "NO_PROXY".into()],
            worker_env,
            false,
        )
        .unwrap();
        assert_eq!(got, ["UV_INDEX_URL=https://idx/simple", "HTTPS_PROXY=http://proxy:3128"]);
        for bad in ["UV_CACHE_DIR=/x", "IRIS_X=1", "1BAD=x", "=x"] {
            let err = build_env(vec![bad.into()], worker_env, false).unwrap_err().to_string();
            assert!(err.starts_with("--build-env "), "{bad}: {err}");
        }
        let none = ServeArgs { ca_bundle: Some("none".into()), ..Default::default() }.resolve().unwrap();
        assert_eq!(none.worker.python.ca_bundle, None);
        let missing = ServeArgs { ca_bundle: Some("/nonexistent/ca.pem".into()), ..Default::default() }.resolve();
        assert!(missing.unwrap_err().to_string().contains("ca_bundle"));
    }

    /// `serve`'s flags as clap parses them.
    fn parse(args: &[&str]) -> ServeArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        <Cli as clap::Parser>::try_parse_from([&["serve"], args].concat()).unwrap().serve
    }

    #[test]
    fn a_build_env_value_is_taken_whole_commas_and_all() {
        let args = parse(&["--build-env", "NO_PROXY=localhost,10.0.0.0/8,.corp", "--build-env", "UV_HTTP_TIMEOUT=60"]);
        assert_eq!(
            args.resolve().unwrap().worker.python.build_env,
            ["NO_PROXY=localhost,10.0.0.0/8,.corp", "UV_HTTP_TIMEOUT=60"]
        );
    }

    #[test]
    fn build_env_refuses_every_name_the_worker_sets_for_builds_naming_its_flag() {
        let none = |_: &str| None;
        for (name, flag) in [
            ("UV_OFFLINE", "--uv-offline"),
            ("UV_NATIVE_TLS", "--ca-bundle"),
            ("SSL_CERT_FILE", "--ca-bundle"),
            ("UV_NO_PROGRESS", "every build"),
            ("UV_PYTHON_PREFERENCE", "every build"),
            ("PATH", "every build"),
        ] {
            let err = build_env(vec![format!("{name}=1")], none, false).unwrap_err().to_string();
            assert_eq!(err, format!("--build-env {name}: the worker sets it for builds itself ({flag})"));
        }
        // UV_FIND_LINKS is the operator's unless --uv-find-links sets it.
        assert_eq!(build_env(vec!["UV_FIND_LINKS=https://idx/links/".into()], none, false).unwrap().len(), 1);
        let err = build_env(vec!["UV_FIND_LINKS=/w".into()], none, true).unwrap_err().to_string();
        assert!(err.contains("--uv-find-links"), "{err}");
        let both = parse(&["--uv-find-links", "/w", "--build-env", "UV_FIND_LINKS=/x"]).resolve().unwrap_err();
        assert!(format!("{both:#}").contains("--build-env UV_FIND_LINKS"), "{both:#}");
    }

    #[test]
    fn the_advertised_host_is_one_the_controller_can_reach() {
        let on = |listen: &str, controller: Option<&str>| default_advertise_host(listen.parse().unwrap(), controller);
        assert_eq!(on("127.0.0.1:8080", None), "127.0.0.1");
        assert_eq!(on("127.0.0.1:8080", Some("http://10.1.2.3:10000")), "127.0.0.1");
        assert_eq!(on("[::1]:8080", None), "[::1]");
        // On 0.0.0.0: the source of the route toward the controller (here the loopback).
        assert_eq!(on("0.0.0.0:8080", Some("http://127.0.0.1:10000")), "127.0.0.1");
        assert_eq!(on("0.0.0.0:8080", Some("127.0.0.1:10000")), "127.0.0.1");
        let flag = ServeArgs {
            listen: Some("127.0.0.1:1".parse().unwrap()),
            advertise_host: Some("w1.example".into()),
            ..Default::default()
        };
        assert_eq!(flag.resolve().unwrap().worker.advertise_host, "w1.example");
    }

    #[test]
    fn resource_bounds_have_their_defaults_and_0_turns_them_off() {
        let c = ServeArgs::default().resolve().unwrap();
        assert_eq!(c.worker.bounds.default_pids_limit, Some(4096));
        assert_eq!(c.worker.bounds.max_log_bytes, Some(1 << 30));
        assert_eq!(c.worker.bounds.retain_finished, Some(1000));
        assert_eq!(c.worker.bounds.retain_for, Some(std::time::Duration::from_secs(7 * 86_400)));
        let off = ServeArgs {
            default_pids_limit: Some(0),
            max_log_bytes: Some("0".into()),
            retain_finished: Some(0),
            retain_for: Some("0".into()),
            ..Default::default()
        };
        let c = off.resolve().unwrap();
        assert_eq!(
            (
                c.worker.bounds.default_pids_limit,
                c.worker.bounds.max_log_bytes,
                c.worker.bounds.retain_finished,
                c.worker.bounds.retain_for
            ),
            (None, None, None, None)
        );
        assert_eq!(parse_duration("90").unwrap().as_secs(), 90);
        assert_eq!(parse_duration("30m").unwrap().as_secs(), 1800);
        assert_eq!(parse_duration("12h").unwrap().as_secs(), 43_200);
        assert!(parse_duration("3w").is_err());
        assert!(parse_duration("h").is_err());
        let tiny = ServeArgs { max_log_bytes: Some("1K".into()), ..Default::default() };
        assert!(format!("{:#}", tiny.resolve().unwrap_err()).contains("max_log_bytes"));
    }

    #[test]
    fn cache_flags_become_the_budget_and_the_thresholds() {
        use crate::cache::{Amount, Kind};
        let c = ServeArgs::default().resolve().unwrap();
        assert_eq!(c.worker.cache, crate::cache::CacheSettings::default());
        assert_eq!(c.worker.images.pull, crate::env::image::PullPolicy::Missing);
        let c = ServeArgs {
            cache_size: Some("50G".into()),
            cache_limits: vec!["venvs=10G".into(), "uv=5%".into()],
            image_cache_size: Some("20G".into()),
            min_free_disk: Some("1G".into()),
            soft_free_disk: Some("2G".into()),
            target_free_disk: Some("3G".into()),
            pull: Some(crate::env::image::PullPolicy::Always),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(c.worker.cache.size, Amount::Bytes(50 << 30));
        assert_eq!(
            c.worker.cache.limits,
            vec![
                (vec![Kind::Images, Kind::Built], Amount::Bytes(20 << 30)),
                (vec![Kind::Venvs], Amount::Bytes(10 << 30)),
                (vec![Kind::Uv], Amount::Percent(5.0)),
            ]
        );
        assert_eq!(c.worker.cache.thresholds.min_free, Amount::Bytes(1 << 30));
        assert_eq!(c.worker.images.pull, crate::env::image::PullPolicy::Always);
        let refused = |args: ServeArgs, name: &str| {
            let e = format!("{:#}", args.resolve().unwrap_err());
            assert!(e.contains(name), "{e}");
        };
        refused(ServeArgs { cache_size: Some("lots".into()), ..Default::default() }, "cache_size");
        refused(ServeArgs { cache_limits: vec!["layers=1G".into()], ..Default::default() }, "cache_limit");
        refused(ServeArgs { cache_limits: vec!["venvs".into()], ..Default::default() }, "cache_limit");
        refused(ServeArgs { min_free_disk: Some("20%".into()), ..Default::default() }, "min_free_disk");
        refused(ServeArgs { attributes: vec!["disk_pressure=x".into()], ..Default::default() }, "disk_pressure");
    }

    #[test]
    fn a_port_range_holding_the_listen_port_is_refused() {
        let err = parse(&["--listen", "127.0.0.1:30005", "--port-range", "30000-30010"]).resolve().unwrap_err();
        assert!(err.to_string().contains("contains the listen port 30005"), "{err}");
        assert!(parse(&["--listen", "127.0.0.1:30011", "--port-range", "30000-30010"]).resolve().is_ok());
        let c = ServeArgs::default().resolve().unwrap();
        assert_eq!(c.worker.listen.to_string(), "[::]:8080");
        assert!(c.worker.task_isolation && c.worker.isolate_remote_workers);
    }

    #[test]
    fn bad_settings_are_refused_with_their_name() {
        assert!(parse_port_range("5-1").is_err());
        assert!(parse_port_range("abc").is_err());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.toml");
        std::fs::write(&file, "listn = \"x\"\n").unwrap();
        let err = ServeArgs { config: Some(file), ..Default::default() }.resolve().unwrap_err();
        assert!(format!("{err:#}").contains("listn"), "{err:#}");
    }

    #[test]
    fn a_worker_with_a_controller_has_a_lease_and_a_standalone_one_none() {
        let with = |controller: Option<&str>, lease: Option<f64>, heartbeat: Option<f64>| ServeArgs {
            controller: controller.map(str::to_string),
            lease,
            heartbeat_interval: heartbeat,
            ..Default::default()
        };
        assert_eq!(with(None, None, None).resolve().unwrap().worker.lease, None);
        let c = with(Some("http://c:10000"), None, None).resolve().unwrap();
        assert_eq!(c.worker.lease, Some(std::time::Duration::from_secs(30)));
        assert_eq!(with(Some("http://c:10000"), Some(0.0), None).resolve().unwrap().worker.lease, None);
        let err = with(Some("http://c:10000"), Some(15.0), None).resolve().unwrap_err();
        assert!(err.to_string().contains("twice heartbeat_interval"), "{err}");
        assert!(with(Some("http://c:10000"), Some(-1.0), None).resolve().is_err());
        let c = with(Some("http://c:10000"), Some(1.5), Some(0.3)).resolve().unwrap();
        assert_eq!(c.worker.lease, Some(std::time::Duration::from_millis(1500)));
    }
}
