//! The security options of the command line: what `serve` and `controller serve` demand of
//! callers (token, TLS, mTLS, Host names, connection bounds), and what the client verbs (and
//! the servers' own calls to each other) present.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::rpc::auth::{AllowedHosts, AuthToken, Gate};
use crate::rpc::listen::{DEFAULT_MAX_CONNECTIONS, DEFAULT_READ_TIMEOUT, ListenOptions, fit_connections};
use crate::rpc::tls::{ClientTlsFiles, server_config};
use crate::rpc::{ClientSecurity, ServeOptions};

/// How a client verb reaches a worker or controller. Flattened into each verb's options.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ClientArgs {
    /// A file holding the token to send (`Authorization: Bearer`) [default: none].
    #[arg(long, env = "IRIS_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// PEM CA certificate(s) to trust for the server; set, it makes the client speak TLS
    /// [default: the system's roots, for https:// URLs].
    #[arg(long, env = "IRIS_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// This client's PEM certificate, for servers that demand one (mTLS) [default: none].
    #[arg(long, env = "IRIS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The key of --tls-cert [default: none].
    #[arg(long, env = "IRIS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl ClientArgs {
    pub fn security(&self) -> anyhow::Result<ClientSecurity> {
        let token = read_token(self.auth_token_file.as_ref())?;
        let files = ClientTlsFiles { ca: self.tls_ca.clone(), cert: self.tls_cert.clone(), key: self.tls_key.clone() };
        ClientSecurity::new(token, &files).context("TLS")
    }
}

fn read_token(path: Option<&PathBuf>) -> anyhow::Result<Option<AuthToken>> {
    path.map(|p| AuthToken::read(p).context("auth_token_file")).transpose()
}

/// The security settings of a server, after flags, environment and file were merged.
#[derive(Debug, Clone, Default)]
pub struct ServerSecuritySettings {
    pub auth_token_file: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    /// CA of the peers this server calls (a worker's controller, a controller's workers).
    pub tls_ca: Option<PathBuf>,
    pub allowed_hosts: Vec<String>,
    pub max_connections: Option<usize>,
    pub read_timeout: Option<f64>,
}

/// What a server demands, and what it presents when it calls its peers.
#[derive(Clone)]
pub struct ServerSecurity {
    pub serve: ServeOptions,
    pub client: ClientSecurity,
    /// The warning line for a port anyone on the network may use, if this is one.
    pub exposed_warning: Option<String>,
}

impl std::fmt::Debug for ServerSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerSecurity")
            .field("token", &self.serve.gate.token.is_some())
            .field("tls", &self.serve.listen.tls.is_some())
            .field("max_connections", &self.serve.listen.max_connections)
            .finish()
    }
}

impl ServerSecuritySettings {
    /// Reads the files and checks the combination. `listen` is the server's address, `names`
    /// the other names it answers to (its advertised host).
    pub fn resolve(self, listen: SocketAddr, names: &[&str]) -> anyhow::Result<ServerSecurity> {
        let token = read_token(self.auth_token_file.as_ref())?;
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(server_config(cert, key, self.tls_client_ca.as_deref()).context("TLS")?),
            (None, None) if self.tls_client_ca.is_some() => bail!("tls_client_ca needs tls_cert and tls_key"),
            (None, None) => None,
            _ => bail!("tls_cert and tls_key go together"),
        };
        let mtls = tls.is_some() && self.tls_client_ca.is_some();
        let mut hosts = AllowedHosts::new(self.allowed_hosts.iter().map(String::as_str));
        for name in names {
            hosts.add(name);
        }
        let read_timeout = match self.read_timeout {
            None => DEFAULT_READ_TIMEOUT,
            Some(s) if s > 0.0 && s <= 3600.0 => Duration::from_secs_f64(s),
            Some(s) => bail!("read_timeout must be between 0 and 3600 seconds, not {s}"),
        };
        let wanted = self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if wanted == 0 {
            bail!("max_connections must be at least 1");
        }
        let max_connections = fit_connections(wanted);
        if max_connections < wanted {
            tracing::warn!(wanted, max_connections, "the descriptor limit leaves room for fewer connections");
        }
        let exposed_warning = (!listen.ip().is_loopback() && token.is_none() && !mtls).then(|| {
            format!(
                "listening on {listen} with neither --auth-token-file nor --tls-client-ca: anyone who can reach \
                 this port can run tasks as root"
            )
        });
        let client_files = ClientTlsFiles {
            ca: self.tls_ca.clone(),
            // Calls to peers present this server's own certificate, should the peer ask.
            cert: self.tls_cert.clone().filter(|_| self.tls_ca.is_some()),
            key: self.tls_key.clone().filter(|_| self.tls_ca.is_some()),
        };
        // The calls' token is its own copy: renewing it (the newest wire's worker token) does
        // not change what this server demands.
        let client = ClientSecurity::new(token.as_ref().map(AuthToken::detached), &client_files)
            .context("TLS of calls to peers")?;
        Ok(ServerSecurity {
            serve: ServeOptions {
                gate: Gate { token, hosts, tls: tls.is_some(), sessions: Default::default() },
                listen: ListenOptions { tls, max_connections, read_timeout },
            },
            client,
            exposed_warning,
        })
    }
}
