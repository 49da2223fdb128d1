//! The security settings of our servers and clients in one place: what a server demands
//! ([`ServeOptions`]: the gate of [`super::auth`], TLS and the connection bounds of
//! [`super::listen`]) and what a client presents ([`ClientSecurity`]: the token, TLS).

use std::sync::Arc;

use crate::auth::{AuthToken, Gate};
use crate::listen::ListenOptions;
use crate::tls::{ClientTlsFiles, TlsError, client_config};

/// How a server of ours admits connections and requests.
#[derive(Clone, Default)]
pub struct ServeOptions {
    /// Who is let through: token and Host check.
    pub gate: Gate,
    /// Connection bounds and timeouts, TLS.
    pub listen: ListenOptions,
}

/// What our clients present to a server: the token (sent as `Authorization: Bearer`) and TLS
/// (used for `https://` URLs, and for bare `host:port` addresses once TLS is configured).
#[derive(Clone, Default, Debug)]
pub struct ClientSecurity {
    /// The token sent with every call.
    pub token: Option<AuthToken>,
    /// The rustls settings (roots, client certificate); ALPN is set per protocol.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl ClientSecurity {
    /// From the client options (`--auth-token-file`, `--tls-ca`, `--tls-cert`, `--tls-key`).
    pub fn new(token: Option<AuthToken>, files: &ClientTlsFiles) -> Result<ClientSecurity, TlsError> {
        let tls = if files.is_set() { Some(client_config(files, &[])?) } else { None };
        Ok(ClientSecurity { token, tls })
    }

    /// The rustls settings offering `alpn`: the configured ones, or the system's roots (an
    /// `https://` URL without `--tls-ca`).
    pub fn tls_for(&self, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
        let base = self.tls.clone().unwrap_or_else(crate::tls::system_roots);
        let mut config = (*base).clone();
        config.alpn_protocols = vec![alpn.to_vec()];
        Arc::new(config)
    }

    /// The URL of `address` (`host:port` or a URL): a bare address gets `https://` when TLS
    /// is configured, else `http://`.
    pub fn url(&self, address: &str) -> String {
        if address.contains("://") {
            address.trim_end_matches('/').to_string()
        } else {
            let scheme = if self.tls.is_some() { "https" } else { "http" };
            format!("{scheme}://{}", address.trim_end_matches('/'))
        }
    }
}
