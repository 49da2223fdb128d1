//! `serve` settings: flags > environment (IRIS_WORKER_*) > TOML file > defaults.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::runtime::{Profile, RuntimeKind};

pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/iris-worker";
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/iris-worker";
pub const DEFAULT_PORT_RANGE: &str = "30000-39999";
pub const DEFAULT_MAX_CONCURRENT: usize = 64;

/// Settings of `serve` (and `demo`). Every flag also reads IRIS_WORKER_<NAME> and the TOML
/// file's `<name>` key.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (keys in snake_case).
    #[arg(long, env = "IRIS_WORKER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address for gRPC, Connect and the dashboard [default: 0.0.0.0:8080].
    #[arg(long, env = "IRIS_WORKER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// State root: task directories, logs, exit records [default: /var/lib/iris-worker].
    #[arg(long, env = "IRIS_WORKER_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Cache root: root filesystems and (later) bundles, venvs, layers [default: /var/cache/iris-worker].
    #[arg(long, env = "IRIS_WORKER_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Root filesystem of tasks that name no image [default: <cache-dir>/rootfs/busybox].
    #[arg(long, env = "IRIS_WORKER_ROOTFS")]
    pub rootfs: Option<PathBuf>,
    /// Root filesystem of Python tasks (a bundle or a pickled entrypoint)
    /// [default: <cache-dir>/rootfs/python].
    #[arg(long, env = "IRIS_WORKER_PYTHON_ROOTFS")]
    pub python_rootfs: Option<PathBuf>,
    /// A directory of wheels uv may install from (`--find-links`) [default: none].
    #[arg(long, env = "IRIS_WORKER_UV_FIND_LINKS")]
    pub uv_find_links: Option<PathBuf>,
    /// Venv builds never use the network (uv's offline mode) [default: false].
    #[arg(long, env = "IRIS_WORKER_UV_OFFLINE")]
    pub uv_offline: Option<bool>,
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
    /// Host ports handed to tasks, as FIRST-LAST [default: 30000-39999].
    #[arg(long, env = "IRIS_WORKER_PORT_RANGE")]
    pub port_range: Option<String>,
    /// Controller URL to register with and report to (Connect over HTTP) [default: none].
    #[arg(long, env = "IRIS_WORKER_CONTROLLER")]
    pub controller: Option<String>,
    /// This worker's id [default: the hostname].
    #[arg(long, env = "IRIS_WORKER_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Address others reach this host and its tasks at [default: the first non-loopback IPv4].
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
    /// Unpacked layers kept at most, e.g. 20G; unused ones go first [default: 20G].
    #[arg(long, env = "IRIS_WORKER_IMAGE_CACHE_SIZE")]
    pub image_cache_size: Option<String>,
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
}

/// The TOML file: the same settings, all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    state_dir: Option<PathBuf>,
    cache_dir: Option<PathBuf>,
    rootfs: Option<PathBuf>,
    python_rootfs: Option<PathBuf>,
    uv_find_links: Option<PathBuf>,
    uv_offline: Option<bool>,
    build_memory: Option<String>,
    workdir_retention: Option<u64>,
    runtime: Option<RuntimeKind>,
    profile: Option<Profile>,
    max_concurrent_tasks: Option<usize>,
    port_range: Option<String>,
    controller: Option<String>,
    worker_id: Option<String>,
    advertise_host: Option<String>,
    bind_host: Option<String>,
    log_format: Option<String>,
    heartbeat_interval: Option<f64>,
    attributes: Option<Vec<String>>,
    buildkit: Option<String>,
    image_dir: Option<PathBuf>,
    image_cache_size: Option<String>,
    insecure_registries: Option<Vec<String>>,
    registry_auth: Option<PathBuf>,
    containerd_socket: Option<PathBuf>,
    containerd_namespace: Option<String>,
}

/// Settings after merging.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub rootfs: PathBuf,
    pub python_rootfs: PathBuf,
    pub uv_find_links: Option<PathBuf>,
    pub uv_offline: bool,
    pub build_memory_bytes: u64,
    pub workdir_retention: Option<std::time::Duration>,
    pub runtime: RuntimeKind,
    pub profile: Profile,
    pub max_concurrent_tasks: usize,
    pub port_range: (u16, u16),
    pub controller: Option<String>,
    pub worker_id: String,
    pub advertise_host: String,
    pub bind_host: String,
    pub log_json: bool,
    pub heartbeat_interval: std::time::Duration,
    /// Attributes as KEY=VALUE pairs.
    pub attributes: Vec<(String, String)>,
    pub buildkit: Option<String>,
    pub images: crate::env::image::ImageStoreConfig,
}

impl ServeArgs {
    /// Merges flags/env with the TOML file and the defaults.
    pub fn resolve(self) -> anyhow::Result<ServeConfig> {
        let file: FileConfig = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let cache_dir = self.cache_dir.or(file.cache_dir).unwrap_or_else(|| DEFAULT_CACHE_DIR.into());
        let port_range = self.port_range.or(file.port_range).unwrap_or_else(|| DEFAULT_PORT_RANGE.into());
        let log_format = self.log_format.or(file.log_format).unwrap_or_else(|| "text".into());
        if log_format != "text" && log_format != "json" {
            bail!("log_format must be text or json, not {log_format:?}");
        }
        let max = self.max_concurrent_tasks.or(file.max_concurrent_tasks).unwrap_or(DEFAULT_MAX_CONCURRENT);
        if max == 0 {
            bail!("max_concurrent_tasks must be at least 1");
        }
        let listen = match self.listen.or(file.listen) {
            Some(l) => l,
            None => DEFAULT_LISTEN.parse().context("the default listen address")?,
        };
        let buildkit = self.buildkit.or(file.buildkit).filter(|b| !b.is_empty());
        #[cfg(feature = "buildkit")]
        if let Some(addr) = &buildkit {
            crate::buildkit::connect::Address::parse(addr).context("buildkit")?;
        }
        Ok(ServeConfig {
            listen,
            state_dir: self.state_dir.or(file.state_dir).unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            rootfs: self.rootfs.or(file.rootfs).unwrap_or_else(|| cache_dir.join("rootfs/busybox")),
            python_rootfs: self.python_rootfs.or(file.python_rootfs).unwrap_or_else(|| cache_dir.join("rootfs/python")),
            uv_find_links: self.uv_find_links.or(file.uv_find_links),
            uv_offline: self.uv_offline.or(file.uv_offline).unwrap_or(false),
            workdir_retention: match self.workdir_retention.or(file.workdir_retention).unwrap_or(86_400) {
                0 => None,
                s => Some(std::time::Duration::from_secs(s)),
            },
            build_memory_bytes: parse_size(&self.build_memory.or(file.build_memory).unwrap_or_else(|| "4G".into()))
                .context("build_memory")?,
            cache_dir: cache_dir.clone(),
            runtime: self.runtime.or(file.runtime).unwrap_or_default(),
            profile: self.profile.or(file.profile).unwrap_or_default(),
            max_concurrent_tasks: max,
            port_range: parse_port_range(&port_range)?,
            controller: self.controller.or(file.controller).filter(|c| !c.is_empty()),
            worker_id: match self.worker_id.or(file.worker_id) {
                Some(id) => id,
                None => nix::unistd::gethostname()
                    .ok()
                    .and_then(|h| h.into_string().ok())
                    .unwrap_or_else(|| "iris-worker".into()),
            },
            advertise_host: self.advertise_host.or(file.advertise_host).unwrap_or_else(first_ipv4),
            bind_host: self.bind_host.or(file.bind_host).unwrap_or_else(|| "127.0.0.1".into()),
            log_json: log_format == "json",
            heartbeat_interval: {
                let secs = self.heartbeat_interval.or(file.heartbeat_interval).unwrap_or(10.0);
                if !(secs > 0.0 && secs < 86_400.0) {
                    bail!("heartbeat_interval must be between 0 and 86400 seconds, not {secs}");
                }
                std::time::Duration::from_secs_f64(secs)
            },
            attributes: {
                let list =
                    if self.attributes.is_empty() { file.attributes.unwrap_or_default() } else { self.attributes };
                list.iter()
                    .map(|a| {
                        a.split_once('=')
                            .filter(|(k, _)| !k.is_empty())
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .with_context(|| format!("attribute {a:?} is not KEY=VALUE"))
                    })
                    .collect::<anyhow::Result<_>>()?
            },
            buildkit,
            images: crate::env::image::ImageStoreConfig {
                dir: self.image_dir.or(file.image_dir).unwrap_or_else(|| cache_dir.join("images")),
                insecure_registries: if self.insecure_registries.is_empty() {
                    file.insecure_registries.unwrap_or_default()
                } else {
                    self.insecure_registries
                },
                auth_file: self.registry_auth.or(file.registry_auth),
                containerd: self.containerd_socket.or(file.containerd_socket).map(|socket| {
                    crate::env::image::ContainerdConfig {
                        socket,
                        namespace: self
                            .containerd_namespace
                            .or(file.containerd_namespace)
                            .unwrap_or_else(|| "default".into()),
                    }
                }),
                max_bytes: parse_size(&self.image_cache_size.or(file.image_cache_size).unwrap_or_else(|| "20G".into()))
                    .context("image_cache_size")?,
                devices: self.profile.or(file.profile).unwrap_or_default() == Profile::Privileged,
            },
        })
    }
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

fn first_ipv4() -> String {
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
        assert_eq!(c.listen.to_string(), "127.0.0.1:9000");
        assert_eq!(c.max_concurrent_tasks, 7);
        assert_eq!(c.port_range, (100, 200));
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
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
}
