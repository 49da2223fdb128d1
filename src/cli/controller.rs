//! `iris-worker controller serve`: settings (flags > IRIS_CONTROLLER_* > TOML > defaults) and
//! the serving loop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

use iris_controller::{Controller, ControllerConfig};

pub const DEFAULT_LISTEN: &str = "0.0.0.0:10000";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/iris-controller";

#[derive(clap::Subcommand, Debug)]
pub enum ControllerVerb {
    /// Run the controller: ControllerService (gRPC + Connect) and its pages on one port.
    Serve(ControllerArgs),
}

/// Settings of `controller serve`. Every flag also reads IRIS_CONTROLLER_<NAME> and the TOML
/// file's `<name>` key.
#[derive(clap::Args, Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControllerArgs {
    /// TOML file with any of the settings below (keys in snake_case).
    #[arg(long, env = "IRIS_CONTROLLER_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address for gRPC, Connect and the pages [default: 0.0.0.0:10000].
    #[arg(long, env = "IRIS_CONTROLLER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Where the state database (controller.db) lives [default: /var/lib/iris-controller].
    #[arg(long, env = "IRIS_CONTROLLER_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Seconds without a heartbeat after which a worker is dead and its tasks are retried
    /// elsewhere [default: 60].
    #[arg(long, env = "IRIS_CONTROLLER_WORKER_TIMEOUT")]
    pub worker_timeout: Option<f64>,
    /// RunTask calls in flight at once [default: 64].
    #[arg(long, env = "IRIS_CONTROLLER_MAX_PARALLEL_DISPATCH")]
    pub max_parallel_dispatch: Option<usize>,
    /// Log format [default: text].
    #[arg(long, env = "IRIS_CONTROLLER_LOG_FORMAT", value_parser = ["text", "json"])]
    pub log_format: Option<String>,
    /// The URL workers reach this controller at; inline bundles (Iris's `bundle_blob`) are
    /// served to them from `<URL>/bundles/<sha256>.zip` [default: http://<the --listen address>,
    /// with the first non-loopback IPv4 when listening on 0.0.0.0].
    #[arg(long, env = "IRIS_CONTROLLER_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// A file holding the token every request must carry (`Authorization: Bearer`), also sent
    /// on the controller's calls to workers [default: none].
    #[arg(long, env = "IRIS_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// PEM certificate chain: the port speaks TLS [default: none].
    #[arg(long, env = "IRIS_CONTROLLER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The key of --tls-cert [default: none].
    #[arg(long, env = "IRIS_CONTROLLER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// With TLS, clients must present a certificate this CA signed (mTLS) [default: none].
    #[arg(long, env = "IRIS_CONTROLLER_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// The CA of the workers' certificates: calls to workers speak TLS and present --tls-cert
    /// [default: none, plain HTTP].
    #[arg(long, env = "IRIS_CONTROLLER_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Another name requests without a token may carry in their Host header (repeatable; `*`
    /// for any) [default: IP addresses, localhost, the hostname].
    #[arg(long = "allowed-host", env = "IRIS_CONTROLLER_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
    /// Connections open at once; at the bound the longest idle one is closed [default: 1024].
    #[arg(long, env = "IRIS_CONTROLLER_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Seconds a client has for its TLS handshake, a request's headers and its body; a
    /// connection idle this long is closed [default: 30].
    #[arg(long, env = "IRIS_CONTROLLER_READ_TIMEOUT")]
    pub read_timeout: Option<f64>,
    /// Test seam only: hold every RegisterWorker answer back this many ms (see
    /// `ControllerConfig::register_reply_delay`).
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub test_register_reply_delay_ms: Option<u64>,
}

/// Settings after merging.
#[derive(Debug, Clone)]
pub struct ControllerSettings {
    pub listen: SocketAddr,
    pub controller: ControllerConfig,
    pub log_json: bool,
    /// What callers must present.
    pub security: super::security::ServerSecurity,
}

impl ControllerArgs {
    /// These settings (flags and environment) over the TOML file's: what is given here wins.
    fn over(self, file: ControllerArgs) -> ControllerArgs {
        ControllerArgs {
            config: self.config,
            listen: self.listen.or(file.listen),
            state_dir: self.state_dir.or(file.state_dir),
            worker_timeout: self.worker_timeout.or(file.worker_timeout),
            max_parallel_dispatch: self.max_parallel_dispatch.or(file.max_parallel_dispatch),
            log_format: self.log_format.or(file.log_format),
            advertise_url: self.advertise_url.or(file.advertise_url),
            auth_token_file: self.auth_token_file.or(file.auth_token_file),
            tls_cert: self.tls_cert.or(file.tls_cert),
            tls_key: self.tls_key.or(file.tls_key),
            tls_client_ca: self.tls_client_ca.or(file.tls_client_ca),
            tls_ca: self.tls_ca.or(file.tls_ca),
            allowed_hosts: if self.allowed_hosts.is_empty() { file.allowed_hosts } else { self.allowed_hosts },
            max_connections: self.max_connections.or(file.max_connections),
            read_timeout: self.read_timeout.or(file.read_timeout),
            test_register_reply_delay_ms: self.test_register_reply_delay_ms,
        }
    }

    /// Merges flags/env with the TOML file and the defaults.
    pub fn resolve(self) -> anyhow::Result<ControllerSettings> {
        let file: ControllerArgs = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => ControllerArgs::default(),
        };
        let a = self.over(file);
        let listen = match a.listen {
            Some(l) => l,
            None => DEFAULT_LISTEN.parse().context("the default listen address")?,
        };
        let timeout = a.worker_timeout.unwrap_or(60.0);
        if !(timeout > 0.0 && timeout < 86_400.0) {
            bail!("worker_timeout must be between 0 and 86400 seconds, not {timeout}");
        }
        let parallel = a.max_parallel_dispatch.unwrap_or(64);
        if parallel == 0 {
            bail!("max_parallel_dispatch must be at least 1");
        }
        let log_format = a.log_format.unwrap_or_else(|| "text".into());
        if log_format != "text" && log_format != "json" {
            bail!("log_format must be text or json, not {log_format:?}");
        }
        let mut controller = ControllerConfig::new(a.state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into()));
        controller.worker_timeout = Duration::from_secs_f64(timeout);
        controller.max_parallel_dispatch = parallel;
        controller.advertise_url = a.advertise_url.unwrap_or_default();
        let mut advertised = String::new();
        if !controller.advertise_url.is_empty() {
            let u = url::Url::parse(&controller.advertise_url).context("advertise_url")?;
            if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
                bail!("advertise_url must be an http(s)://host[:port] URL, not {:?}", controller.advertise_url);
            }
            advertised = u.host_str().unwrap_or_default().to_string();
        }
        controller.register_reply_delay = Duration::from_millis(a.test_register_reply_delay_ms.unwrap_or(0));
        let security = super::security::ServerSecuritySettings {
            auth_token_file: a.auth_token_file,
            tls_cert: a.tls_cert,
            tls_key: a.tls_key,
            tls_client_ca: a.tls_client_ca,
            tls_ca: a.tls_ca,
            allowed_hosts: a.allowed_hosts,
            max_connections: a.max_connections,
            read_timeout: a.read_timeout,
        }
        .resolve(listen, &[&advertised])?;
        controller.workers = security.client.clone();
        Ok(ControllerSettings { listen, controller, log_json: log_format == "json", security })
    }
}

/// A controller serving on a bound port.
pub struct Started {
    pub addr: SocketAddr,
    pub controller: Controller,
    pub server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Opens the state and serves until `shutdown` completes.
pub async fn start(
    settings: &ControllerSettings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Started> {
    let dir = &settings.controller.state_dir;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("listening on {}", settings.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let mut config = settings.controller.clone();
    if config.advertise_url.is_empty() {
        // The bound port (the listen address may say 0).
        let host = if addr.ip().is_unspecified() {
            super::config::first_ipv4()
        } else {
            match addr.ip() {
                std::net::IpAddr::V6(v6) => format!("[{v6}]"),
                ip => ip.to_string(),
            }
        };
        config.advertise_url = format!("http://{host}:{}", addr.port());
    }
    let c = Controller::open(config).with_context(|| format!("opening the controller state in {}", dir.display()))?;
    let controller = c.clone();
    if let Some(warning) = &settings.security.exposed_warning {
        tracing::warn!("{warning}");
    }
    let options = settings.security.serve.clone();
    let server = tokio::spawn(async move {
        iris_controller::serve_with(listener, c, options, shutdown).await.map_err(anyhow::Error::from)
    });
    tracing::info!(%addr, state_dir = %dir.display(), "controller serving");
    Ok(Started { addr, controller, server })
}

pub async fn run(verb: ControllerVerb) -> anyhow::Result<()> {
    let ControllerVerb::Serve(args) = verb;
    let settings = args.resolve()?;
    super::init_logging(settings.log_json);
    let started = start(&settings, super::serve::shutdown_signal()).await?;
    started.server.await.context("the server task")??;
    tracing::info!("controller stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "worker_timeout = 5.0\nlisten = \"127.0.0.1:9\"\n").unwrap();
        let s =
            ControllerArgs { config: Some(file), worker_timeout: Some(2.0), ..Default::default() }.resolve().unwrap();
        assert_eq!(s.controller.worker_timeout, Duration::from_secs(2));
        assert_eq!(s.listen.to_string(), "127.0.0.1:9");
        assert_eq!(s.controller.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        let bad = ControllerArgs { worker_timeout: Some(0.0), ..Default::default() }.resolve().unwrap_err();
        assert!(bad.to_string().contains("worker_timeout"), "{bad}");
    }
}
