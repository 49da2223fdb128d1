//! TLS for our servers and clients, with rustls (ring): a server certificate, optionally a
//! client CA that every client must present a certificate of (mTLS); clients trust a given
//! CA (or the system's roots) and may present a certificate of their own.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Errors of setting TLS up (at start: they name the file).
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's #[error] text is its documentation
pub enum TlsError {
    #[error("reading {what} {path}: {source}")]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{what} {path} holds no {expected}")]
    Empty { what: &'static str, path: PathBuf, expected: &'static str },
    #[error("{what} {path}: {reason}")]
    Invalid { what: &'static str, path: PathBuf, reason: String },
    #[error("TLS settings: {0}")]
    Config(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_path_buf(), source })
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>().map_err(|e| TlsError::Invalid {
        what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Empty { what, path: path.to_path_buf(), expected: "PEM certificate" });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let what = "the TLS key";
    let pem = read(what, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Invalid {
        what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn roots(what: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certificates(what, path)? {
        store.add(cert).map_err(|e| TlsError::Invalid { what, path: path.to_path_buf(), reason: e.to_string() })?;
    }
    Ok(store)
}

/// The server side: `cert` (a PEM chain) and `key`; with `client_ca`, clients must present a
/// certificate it signed. Offers HTTP/2 and HTTP/1.1 (ALPN), as the port serves both.
pub fn server_config(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots("the client CA", ca)?),
                provider(),
            )
            .build()
            .map_err(|e| TlsError::Config(format!("the client CA {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certificates("the TLS certificate", cert)?, private_key(key)?)
        .map_err(|e| TlsError::Config(format!("the certificate {} and key {}: {e}", cert.display(), key.display())))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What a client of ours needs to speak TLS: the roots it trusts (`ca`, else the system's)
/// and, for mTLS, its own certificate and key.
#[derive(Debug, Clone, Default)]
pub struct ClientTlsFiles {
    /// PEM certificates of the CAs the server's certificate is checked against (else the
    /// system's roots).
    pub ca: Option<PathBuf>,
    /// PEM client certificate chain, for mTLS.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
}

impl ClientTlsFiles {
    /// Whether anything asks for TLS.
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }
}

fn client_builder() -> rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier> {
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        // ok: ring's provider supports TLS 1.2 and 1.3, the safe defaults.
        .expect("ring supports the default TLS versions")
}

fn native_roots() -> RootCertStore {
    let mut store = RootCertStore::empty();
    store.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    store
}

/// A client trusting the system's roots (for `https://` URLs without `--tls-ca`), made once.
pub fn system_roots() -> Arc<ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| Arc::new(client_builder().with_root_certificates(native_roots()).with_no_client_auth()))
        .clone()
}

/// The client side, offering `alpn` (`h2` for gRPC, `http/1.1` for Connect).
pub fn client_config(files: &ClientTlsFiles, alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = match &files.ca {
        Some(ca) => roots("the CA", ca)?,
        None => native_roots(),
    };
    let builder = client_builder().with_root_certificates(roots);
    let mut config = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => {
            builder.with_client_auth_cert(certificates("the TLS certificate", cert)?, private_key(key)?).map_err(
                |e| TlsError::Config(format!("the certificate {} and key {}: {e}", cert.display(), key.display())),
            )?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(TlsError::Config("--tls-cert and --tls-key go together".into())),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}
