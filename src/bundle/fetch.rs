//! Fetching a bundle from an object store into a local file, hashing it on the way.
//!
//! `object_store` reads `file://` (or an absolute path), `http(s)://`, `gs://` and `s3://`;
//! cloud credentials come from the environment as its builders' `from_env` read them
//! (`AWS_*`, `GOOGLE_*`, and the instance metadata services when those are absent). The bytes
//! are written to disk as they arrive and never held whole in memory.

use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::{Arc, Once};

use futures::StreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::http::HttpBuilder;
use object_store::path::Path as ObjectPath;
use object_store::{ClientConfigKey, ClientOptions, GetResultPayload, ObjectStore, ObjectStoreExt, ObjectStoreScheme};
use sha2::{Digest, Sha256};
use url::Url;

use super::BundleError;
use super::sources::{FileOpenError, SourcePolicy};

/// No byte for this long fails a download; a slow one that keeps moving does not.
const READ_TIMEOUT: &str = "60s";
/// Connecting may take this long.
const CONNECT_TIMEOUT: &str = "10s";

/// Where a bundle lives: its store and its path in the store, or the local file, already
/// opened (see [`SourcePolicy::open_file`]: what was checked is what is read).
pub(crate) enum Location {
    Store { store: Arc<dyn ObjectStore>, path: ObjectPath },
    File(File),
}

/// Parses a bundle path into a store and a path inside it, if `policy` allows the location
/// (see [`super::sources`]). An absolute local path is taken as a `file://` URL.
pub(crate) fn locate(path: &str, policy: &SourcePolicy) -> Result<Location, BundleError> {
    let bad = |reason: String| BundleError::BadPath { path: path.to_owned(), reason };
    let refused = |reason: super::sources::Refused| BundleError::Refused { path: path.to_owned(), reason };
    let url = if path.starts_with('/') {
        Url::from_file_path(path).map_err(|()| bad("not a usable file path".to_owned()))?
    } else {
        Url::parse(path).map_err(|e| bad(e.to_string()))?
    };
    let (scheme, location) = ObjectStoreScheme::parse(&url).map_err(|e| bad(e.to_string()))?;
    let failed = |e: object_store::Error| bad(e.to_string());
    let (store, location): (Arc<dyn ObjectStore>, ObjectPath) = match scheme {
        ObjectStoreScheme::Local => {
            let file = url.to_file_path().map_err(|()| bad("not a usable file path".to_owned()))?;
            return match policy.open_file(&file) {
                Ok(file) => Ok(Location::File(file)),
                Err(FileOpenError::Refused(reason)) => Err(refused(reason)),
                Err(FileOpenError::NotRegular) => Err(bad("not a regular file".to_owned())),
                Err(FileOpenError::NotFound(e)) => Err(BundleError::NotFound {
                    path: path.to_owned(),
                    source: Arc::new(object_store::Error::NotFound { path: path.to_owned(), source: Box::new(e) }),
                }),
                Err(FileOpenError::Io(e)) if e.raw_os_error() == Some(libc::ENOSYS) => Err(bad(
                    "file bundles are opened with openat2, which this kernel lacks (Linux 5.6 or newer)".to_owned(),
                )),
                Err(FileOpenError::Io(e)) => {
                    Err(BundleError::Io { what: format!("opening bundle {path}"), source: Arc::new(e) })
                }
            };
        }
        ObjectStoreScheme::Http => {
            install_tls_provider();
            policy.check_url(&url).map_err(refused)?;
            let base = &url[..url::Position::BeforePath];
            let options = ClientOptions::new()
                .with_allow_http(url.scheme() == "http")
                .with_timeout_disabled()
                .with_config(ClientConfigKey::ReadTimeout, READ_TIMEOUT)
                .with_config(ClientConfigKey::ConnectTimeout, CONNECT_TIMEOUT);
            let mut options = options;
            let trusted = policy.controller.as_ref().filter(|c| c.serves(&url));
            if let Some(controller) = trusted {
                // Our own controller: its token and its CA go with the request.
                if let Some(token) = &controller.authorization {
                    let mut headers = http::HeaderMap::new();
                    let value = http::HeaderValue::from_str(&token.bearer()).map_err(|e| bad(e.to_string()))?;
                    headers.insert(http::header::AUTHORIZATION, value);
                    options = options.with_default_headers(headers);
                }
                if let Some(pem) = &controller.ca_pem {
                    for cert in object_store::Certificate::from_pem_bundle(pem).map_err(failed)? {
                        options = options.with_root_certificate(cert);
                    }
                }
            }
            let mut store = HttpBuilder::new().with_url(base).with_client_options(options);
            if !policy.allow_private_hosts {
                // Our controller's own name may resolve to a private address; where it
                // redirects is checked like any other URL (a redirect must not turn the
                // trusted fetch into a request to the host's or the cloud's services).
                let trusted_name = trusted.map(|c| c.host.clone());
                store = store.with_http_connector(PublicOnly { policy: policy.clone(), trusted_name });
            }
            (Arc::new(store.build().map_err(failed)?), location)
        }
        ObjectStoreScheme::AmazonS3 => {
            install_tls_provider();
            let client = |key| AmazonS3ConfigKey::Client(key);
            let store = AmazonS3Builder::from_env()
                .with_url(url.as_str())
                .with_config(client(ClientConfigKey::Timeout), "24h")
                .with_config(client(ClientConfigKey::ReadTimeout), READ_TIMEOUT)
                .with_config(client(ClientConfigKey::ConnectTimeout), CONNECT_TIMEOUT);
            (Arc::new(store.build().map_err(failed)?), location)
        }
        ObjectStoreScheme::GoogleCloudStorage => {
            install_tls_provider();
            let client = |key| GoogleConfigKey::Client(key);
            let store = GoogleCloudStorageBuilder::from_env()
                .with_url(url.as_str())
                .with_config(client(ClientConfigKey::Timeout), "24h")
                .with_config(client(ClientConfigKey::ReadTimeout), READ_TIMEOUT)
                .with_config(client(ClientConfigKey::ConnectTimeout), CONNECT_TIMEOUT);
            (Arc::new(store.build().map_err(failed)?), location)
        }
        other => return Err(bad(format!("{other:?} stores are not supported"))),
    };
    Ok(Location::Store { store, path: location })
}

/// Whether `policy` allows the location `path`: `file://` paths, http(s) hosts given as
/// addresses, and names by where they resolve now (a bundle cached under a wider policy is not
/// handed out under a narrower one).
pub(crate) async fn check(path: &str, policy: &SourcePolicy) -> Result<(), BundleError> {
    let refused = |reason| BundleError::Refused { path: path.to_owned(), reason };
    let url = if path.starts_with('/') { Url::from_file_path(path).ok() } else { Url::parse(path).ok() };
    let Some(url) = url else { return Ok(()) }; // malformed: locate() says why
    match url.scheme() {
        "file" => {
            let file = url.to_file_path().map_err(|()| refused(super::sources::Refused::PathNotAllowed))?;
            policy.check_file(&file).map(|_| ()).map_err(refused)
        }
        "http" | "https" => {
            policy.check_url(&url).map_err(refused)?;
            let host = url.host_str().unwrap_or("");
            if policy.allow_private_hosts || policy.trusts(&url) || super::sources::literal(host).is_some() {
                return Ok(());
            }
            let found = tokio::net::lookup_host((host, url.port_or_known_default().unwrap_or(80)))
                .await
                .map(|a| a.collect())
                .unwrap_or_default();
            policy.filter_resolved(host, found).map(|_| ()).map_err(refused)
        }
        _ => Ok(()),
    }
}

/// The HTTP client of http(s) bundles when private hosts are not allowed: every address it
/// connects to — of the URL and of each redirect — passes [`SourcePolicy`] first.
#[derive(Debug)]
struct PublicOnly {
    policy: SourcePolicy,
    /// The controller's name when this client fetches one of its inline bundles.
    trusted_name: Option<String>,
}

impl object_store::client::HttpConnector for PublicOnly {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<object_store::client::HttpClient> {
        let redirects = self.policy.clone();
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(PublicResolver {
                policy: self.policy.clone(),
                trusted_name: self.trusted_name.clone(),
            }))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= 10 {
                    return attempt.error("more than 10 redirects");
                }
                match redirects.check_url(attempt.url()) {
                    Ok(()) => attempt.follow(),
                    Err(refused) => attempt.error(refused),
                }
            }))
            // A proxy would connect for us to an address we never see.
            .no_proxy()
            .connect_timeout(std::time::Duration::from_secs(10))
            .read_timeout(std::time::Duration::from_secs(60))
            .no_gzip()
            .no_brotli()
            .no_zstd()
            .no_deflate()
            .build()
            .map_err(|e| object_store::Error::Generic { store: "HTTP", source: Box::new(e) })?;
        Ok(object_store::client::HttpClient::new(client))
    }
}

/// Resolves names as the system does, then keeps only the addresses the policy allows.
struct PublicResolver {
    policy: SourcePolicy,
    trusted_name: Option<String>,
}

impl reqwest::dns::Resolve for PublicResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        let trusted = self.trusted_name.as_deref().is_some_and(|t| t.eq_ignore_ascii_case(&host));
        Box::pin(async move {
            let found: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed = if trusted { found } else { policy.filter_resolved(&host, found)? };
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// rustls is built with ring alone (aws-lc-rs is a long C build); reqwest needs it installed
/// as the process's provider before its first client is made.
fn install_tls_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only if some other part of the program installed one first: that one is used.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// What a download produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Downloaded {
    /// Lowercase hex sha256 of the bytes.
    pub sha256: String,
    pub bytes: u64,
}

/// Copies the object at `location` into `dest` (an open, empty file), computing its sha256,
/// and fails once more than `max_bytes` arrive.
pub(crate) async fn download(
    source: &str,
    location: &Location,
    dest: File,
    max_bytes: u64,
) -> Result<Downloaded, BundleError> {
    let fetch_err = |e: object_store::Error| {
        // A refusal deep in the HTTP client (a name resolving to a private address, a redirect
        // to one) is reported as such, naming the flag.
        if let Some(reason) = refusal_in(&e) {
            return BundleError::Refused { path: source.to_owned(), reason };
        }
        match e {
            object_store::Error::NotFound { .. } => {
                BundleError::NotFound { path: source.to_owned(), source: Arc::new(e) }
            }
            e => BundleError::Fetch { path: source.to_owned(), source: Arc::new(e) },
        }
    };
    let write_err =
        |e: io::Error| BundleError::Io { what: format!("writing the download of {source}"), source: Arc::new(e) };
    let too_large = || BundleError::TooLarge { path: source.to_owned(), limit: max_bytes };
    let file = match location {
        // Read from the handle the policy opened, never reopened by name.
        Location::File(file) => {
            let read_err = |e| BundleError::Io { what: format!("reading {source}"), source: Arc::new(e) };
            let mut file = file.try_clone().map_err(read_err)?;
            io::Seek::rewind(&mut file).map_err(read_err)?;
            file
        }
        Location::Store { store, path } => {
            let result = store.get(path).await.map_err(fetch_err)?;
            if result.meta.size > max_bytes {
                return Err(too_large());
            }
            match result.payload {
                GetResultPayload::File(file, _) => file,
                GetResultPayload::Stream(mut stream) => {
                    let mut out = tokio::io::BufWriter::with_capacity(1 << 20, tokio::fs::File::from_std(dest));
                    let mut hasher = Sha256::new();
                    let mut bytes: u64 = 0;
                    while let Some(chunk) = stream.next().await {
                        let chunk = chunk.map_err(fetch_err)?;
                        bytes += chunk.len() as u64;
                        if bytes > max_bytes {
                            return Err(too_large());
                        }
                        hasher.update(&chunk);
                        tokio::io::AsyncWriteExt::write_all(&mut out, &chunk).await.map_err(write_err)?;
                    }
                    tokio::io::AsyncWriteExt::flush(&mut out).await.map_err(write_err)?;
                    return Ok(Downloaded { sha256: hex::encode(hasher.finalize()), bytes });
                }
            }
        }
    };
    // A local file: one blocking copy with a large buffer beats object_store's 8 KiB chunked
    // stream by a wide margin.
    let source = source.to_owned();
    let copied = tokio::task::spawn_blocking(move || copy_hashing(file, dest, max_bytes))
        .await
        .map_err(|e| BundleError::Internal { path: source.clone(), reason: format!("the copy task failed: {e}") })?;
    match copied {
        Ok(Some(done)) => Ok(done),
        Ok(None) => Err(too_large()),
        Err(e) => Err(BundleError::Io { what: format!("copying {source}"), source: Arc::new(e) }),
    }
}

/// The policy refusal somewhere in `e`'s chain of causes, if any.
fn refusal_in(e: &(dyn std::error::Error + 'static)) -> Option<super::sources::Refused> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(r) = c.downcast_ref::<super::sources::Refused>() {
            return Some(r.clone());
        }
        cause = c.source();
    }
    None
}

/// Copies `from` into `to` and hashes it; `None` when more than `max_bytes` were read.
fn copy_hashing(mut from: File, mut to: File, max_bytes: u64) -> io::Result<Option<Downloaded>> {
    let mut buffer = vec![0; 1 << 20];
    let mut hasher = Sha256::new();
    let mut bytes: u64 = 0;
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        bytes += n as u64;
        if bytes > max_bytes {
            return Ok(None);
        }
        hasher.update(&buffer[..n]);
        to.write_all(&buffer[..n])?;
    }
    to.flush()?;
    Ok(Some(Downloaded { sha256: hex::encode(hasher.finalize()), bytes }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_scheme_maps_to_its_store_without_network() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.zip"), b"zip").unwrap();
        let open =
            SourcePolicy { allowed_dirs: vec![dir.path().to_path_buf()], allow_private_hosts: true, controller: None };
        let b = dir.path().join("b.zip").display().to_string();
        for ok in [format!("file://{b}"), b.clone()] {
            let location = locate(&ok, &open).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert!(matches!(location, Location::File(_)), "{ok}: opened at once");
        }
        for ok in [
            "http://127.0.0.1:1/b.zip",
            "https://example.com/x/b.zip",
            "gs://bucket/dir/b.zip",
            "s3://bucket/dir/b.zip",
        ] {
            let Location::Store { path, .. } = locate(ok, &open).unwrap_or_else(|e| panic!("{ok}: {e}")) else {
                panic!("{ok}: not a store")
            };
            assert!(path.as_ref().ends_with("b.zip"), "{ok}: {path}");
        }
        for bad in ["relative/b.zip", "ftp://host/b.zip", "", "az://container/b.zip"] {
            let err = locate(bad, &SourcePolicy::default()).err().unwrap_or_else(|| panic!("{bad} was accepted"));
            assert!(matches!(err, BundleError::BadPath { .. }), "{bad}: {err}");
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[tokio::test]
    async fn a_local_file_is_copied_and_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("b.zip");
        std::fs::write(&src, b"hello").unwrap();
        let open = SourcePolicy { allowed_dirs: vec![dir.path().to_path_buf()], ..Default::default() };
        let location = locate(src.to_str().unwrap(), &open).unwrap();
        let dest = dir.path().join("copy");
        let got = download("b", &location, File::create(&dest).unwrap(), 100).await.unwrap();
        assert_eq!(got.bytes, 5);
        assert_eq!(got.sha256, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        assert_eq!(std::fs::read(&dest).unwrap(), b"hello");
        let err = download("b", &location, File::create(&dest).unwrap(), 4).await.unwrap_err();
        assert!(matches!(err, BundleError::TooLarge { limit: 4, .. }), "{err}");
        let err = locate(dir.path().join("nope.zip").to_str().unwrap(), &open).err().unwrap();
        assert!(matches!(err, BundleError::NotFound { .. }), "{err}");
    }

    /// Review of #14, finding 9: the file read is the file the policy checked. Swapping it for a
    /// link out of the allowed directory after the check (the old code reopened the path by
    /// name when it downloaded) reads the checked file, never the link's target.
    #[tokio::test]
    async fn a_file_swapped_for_a_link_after_the_check_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let allowed = dir.path().join("allowed");
        std::fs::create_dir(&allowed).unwrap();
        std::fs::write(dir.path().join("secret"), b"secret").unwrap();
        std::fs::write(allowed.join("b.zip"), b"hello").unwrap();
        let policy = SourcePolicy { allowed_dirs: vec![allowed.clone()], ..Default::default() };
        let location = locate(allowed.join("b.zip").to_str().unwrap(), &policy).unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), allowed.join("swap")).unwrap();
        std::fs::rename(allowed.join("swap"), allowed.join("b.zip")).unwrap();
        let dest = dir.path().join("copy");
        let got = download("b", &location, File::create(&dest).unwrap(), 100).await;
        assert_ne!(std::fs::read(&dest).unwrap(), b"secret", "the link planted after the check was followed");
        assert_eq!(got.unwrap().bytes, 5);
        // A FIFO is refused at once, not waited on.
        nix::unistd::mkfifo(&allowed.join("fifo.zip"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = locate(allowed.join("fifo.zip").to_str().unwrap(), &policy).err().unwrap();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
}
