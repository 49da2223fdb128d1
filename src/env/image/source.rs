//! Where an image's manifest and blobs come from: a registry (oci-client), an OCI image layout
//! directory, or a containerd's content store. Every byte that names a digest is checked
//! against it; layers are checked while they are unpacked.

use std::path::{Path, PathBuf};
use std::pin::Pin;

use oci_client::Reference;
use oci_client::secrets::RegistryAuth;
use tokio::io::AsyncRead;

use super::ImageError;
use super::manifest::{ACCEPTED, Descriptor, Digest, ManifestDoc};

/// The largest manifest, index or config read.
pub const MAX_SMALL_BLOB: u64 = 4 << 20;

/// A stream of a blob's bytes.
pub type BlobReader = Pin<Box<dyn AsyncRead + Send>>;

/// An image reference, parsed from a task's `image` field.
#[derive(Debug, Clone)]
pub enum ImageRef {
    /// `registry/repo:tag` or `…@sha256:…` (Docker Hub's defaults apply to short names).
    Registry(Reference),
    /// `oci:<dir>[:<tag>]`: an OCI image layout directory.
    Layout { dir: PathBuf, tag: Option<String> },
    /// `containerd:<name>`: an image in the worker's containerd, by its containerd name.
    Containerd { name: String },
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<ImageRef, ImageError> {
        let bad = |reason: &str| ImageError::BadReference { reference: s.to_string(), reason: reason.to_string() };
        if let Some(rest) = s.strip_prefix("oci:") {
            // The tag follows the last ':' unless that ':' is part of a path.
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((dir, tag)) if !tag.contains('/') && !dir.is_empty() => (dir, Some(tag.to_string())),
                _ => (rest, None),
            };
            if !dir.starts_with('/') {
                return Err(bad("an OCI layout path must be absolute"));
            }
            return Ok(ImageRef::Layout { dir: PathBuf::from(dir), tag });
        }
        if let Some(name) = s.strip_prefix("containerd:") {
            if name.is_empty() {
                return Err(bad("no image name after 'containerd:'"));
            }
            return Ok(ImageRef::Containerd { name: name.to_string() });
        }
        Reference::try_from(s).map(ImageRef::Registry).map_err(|e| bad(&e.to_string()))
    }

    /// Whether the pull policy applies: registries and containerd are sources the store keeps
    /// copies of; an OCI layout is a local directory, read each time (it may change in place).
    pub fn follows_pull_policy(&self) -> bool {
        !matches!(self, ImageRef::Layout { .. })
    }

    /// Whether the reference names a manifest by digest (`…@sha256:…`): its content can never
    /// change, so a copy in the store is always good.
    pub fn is_pinned(&self) -> bool {
        matches!(self, ImageRef::Registry(r) if r.digest().is_some())
    }
}

/// containerd's socket and namespace.
#[derive(Debug, Clone)]
pub struct ContainerdConfig {
    pub socket: PathBuf,
    pub namespace: String,
}

/// The connections and credentials sources use.
pub struct Sources {
    registry: oci_client::Client,
    auths: Vec<(String, RegistryAuth)>,
    containerd: Option<ContainerdConfig>,
}

impl Sources {
    pub fn new(
        insecure: &[String],
        auth_file: Option<&Path>,
        containerd: Option<ContainerdConfig>,
    ) -> Result<Sources, ImageError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let registry = oci_client::Client::new(oci_client::client::ClientConfig {
            protocol: oci_client::client::ClientProtocol::HttpsExcept(insecure.to_vec()),
            connect_timeout: Some(std::time::Duration::from_secs(10)),
            read_timeout: Some(std::time::Duration::from_secs(60)),
            ..Default::default()
        });
        let auths = match auth_file {
            Some(path) => read_auths(path)?,
            None => Vec::new(),
        };
        Ok(Sources { registry, auths, containerd })
    }

    fn auth(&self, registry: &str) -> RegistryAuth {
        self.auths.iter().find(|(host, _)| host == registry).map(|(_, a)| a.clone()).unwrap_or(RegistryAuth::Anonymous)
    }

    /// The top-level manifest (or index) the reference names, verified when the reference
    /// pins a digest. Returns its bytes, media type and digest.
    pub async fn top(&self, r: &ImageRef) -> Result<(Vec<u8>, String, Digest), ImageError> {
        match r {
            ImageRef::Registry(reference) => {
                let (bytes, _) = self
                    .registry
                    .pull_manifest_raw(reference, &self.auth(reference.resolve_registry()), ACCEPTED)
                    .await
                    .map_err(|e| registry_err(reference, e))?;
                let digest = Digest::of(&bytes);
                if let Some(pinned) = reference.digest() {
                    Digest::parse(pinned)?.verify(&format!("the manifest of {}", reference.whole()), &bytes)?;
                }
                let media_type = media_type_of(&bytes);
                Ok((bytes.to_vec(), media_type, digest))
            }
            ImageRef::Layout { dir, tag } => {
                let index_path = dir.join("index.json");
                let index = tokio::fs::read(&index_path)
                    .await
                    .map_err(|e| ImageError::Layout { path: index_path.clone(), reason: e.to_string() })?;
                let doc = ManifestDoc::parse(&index, &index_path.display().to_string())?;
                let wanted = |d: &&Descriptor| match tag {
                    Some(t) => {
                        d.annotations.as_ref().and_then(|a| a.get("org.opencontainers.image.ref.name")) == Some(t)
                    }
                    None => true,
                };
                let found: Vec<&Descriptor> = doc.manifests.iter().filter(wanted).collect();
                let desc = match (found.as_slice(), tag) {
                    ([one], _) => (*one).clone(),
                    ([], Some(t)) => {
                        return Err(ImageError::Layout { path: dir.clone(), reason: format!("no image tagged {t:?}") });
                    }
                    _ => {
                        return Err(ImageError::Layout {
                            path: dir.clone(),
                            reason: "several images and no tag to choose one".into(),
                        });
                    }
                };
                let bytes = self.blob(r, &desc).await?;
                Ok((bytes, desc.media_type.clone(), desc.digest))
            }
            ImageRef::Containerd { name } => {
                let desc = self.containerd_image(name).await?;
                let bytes = self.blob(r, &desc).await?;
                Ok((bytes, desc.media_type.clone(), desc.digest))
            }
        }
    }

    /// A small blob (a manifest or a config), read whole (at most [`MAX_SMALL_BLOB`]) and
    /// verified.
    pub async fn blob(&self, r: &ImageRef, desc: &Descriptor) -> Result<Vec<u8>, ImageError> {
        let what = format!("{} of {}", desc.digest, display(r));
        if desc.size > MAX_SMALL_BLOB {
            return Err(ImageError::Malformed {
                what,
                reason: format!("{} bytes, more than {MAX_SMALL_BLOB}", desc.size),
            });
        }
        let bytes = match r {
            ImageRef::Registry(reference) => {
                let pinned = reference.clone_with_digest(desc.digest.to_string());
                if desc.media_type.contains("manifest") || desc.media_type.contains("index") {
                    let (bytes, _) = self
                        .registry
                        .pull_manifest_raw(&pinned, &self.auth(reference.resolve_registry()), ACCEPTED)
                        .await
                        .map_err(|e| registry_err(reference, e))?;
                    bytes.to_vec()
                } else {
                    self.read_small(r, desc, &what).await?
                }
            }
            _ => self.read_small(r, desc, &what).await?,
        };
        desc.digest.verify(&what, &bytes)?;
        Ok(bytes)
    }

    async fn read_small(&self, r: &ImageRef, desc: &Descriptor, what: &str) -> Result<Vec<u8>, ImageError> {
        let reader = self.reader(r, desc).await?;
        let mut out = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::AsyncReadExt::take(reader, MAX_SMALL_BLOB + 1), &mut out)
            .await
            .map_err(|e| ImageError::Source { what: what.to_string(), reason: e.to_string() })?;
        if out.len() as u64 > MAX_SMALL_BLOB {
            return Err(ImageError::Malformed {
                what: what.to_string(),
                reason: format!("more than {MAX_SMALL_BLOB} bytes"),
            });
        }
        Ok(out)
    }

    /// A blob's bytes as they arrive (not verified here: the unpacker hashes them).
    pub async fn reader(&self, r: &ImageRef, desc: &Descriptor) -> Result<BlobReader, ImageError> {
        match r {
            ImageRef::Registry(reference) => {
                self.registry
                    .store_auth_if_needed(reference.resolve_registry(), &self.auth(reference.resolve_registry()))
                    .await;
                let pinned = reference.clone_with_digest(desc.digest.to_string());
                let stream = self
                    .registry
                    .pull_blob_stream(&pinned, desc.digest.as_str())
                    .await
                    .map_err(|e| registry_err(reference, e))?;
                Ok(Box::pin(tokio_util::io::StreamReader::new(stream.stream)))
            }
            ImageRef::Layout { dir, .. } => {
                let path = dir.join("blobs/sha256").join(desc.digest.hex());
                let file = tokio::fs::File::open(&path)
                    .await
                    .map_err(|e| ImageError::Layout { path: path.clone(), reason: e.to_string() })?;
                Ok(Box::pin(file))
            }
            ImageRef::Containerd { .. } => self.containerd_reader(desc).await,
        }
    }

    #[cfg(feature = "containerd")]
    fn containerd_config(&self) -> Result<&ContainerdConfig, ImageError> {
        self.containerd.as_ref().ok_or(ImageError::NoContainerd)
    }

    #[cfg(feature = "containerd")]
    async fn containerd_channel(&self) -> Result<(tonic::transport::Channel, &ContainerdConfig), ImageError> {
        let cfg = self.containerd_config()?;
        let channel = containerd_client::connect(&cfg.socket)
            .await
            .map_err(|e| ImageError::Containerd { socket: cfg.socket.clone(), reason: format!("connecting: {e}") })?;
        Ok((channel, cfg))
    }

    #[cfg(feature = "containerd")]
    fn namespaced<T>(cfg: &ContainerdConfig, message: T) -> Result<tonic::Request<T>, ImageError> {
        let mut req = tonic::Request::new(message);
        let value = cfg.namespace.parse().map_err(|_| ImageError::Containerd {
            socket: cfg.socket.clone(),
            reason: format!("namespace {:?} is not a valid header value", cfg.namespace),
        })?;
        req.metadata_mut().insert("containerd-namespace", value);
        Ok(req)
    }

    #[cfg(feature = "containerd")]
    async fn containerd_image(&self, name: &str) -> Result<Descriptor, ImageError> {
        use containerd_client::services::v1::GetImageRequest;
        use containerd_client::services::v1::images_client::ImagesClient;
        let (channel, cfg) = self.containerd_channel().await?;
        let err = |reason: String| ImageError::Containerd { socket: cfg.socket.clone(), reason };
        let image = ImagesClient::new(channel)
            .get(Self::namespaced(cfg, GetImageRequest { name: name.to_string() })?)
            .await
            .map_err(|e| err(format!("image {name:?} in namespace {:?}: {}", cfg.namespace, e.message())))?
            .into_inner()
            .image
            .ok_or_else(|| err(format!("image {name:?}: no image in the answer")))?;
        let target = image.target.ok_or_else(|| err(format!("image {name:?} has no target")))?;
        Ok(Descriptor {
            media_type: target.media_type,
            digest: Digest::parse(&target.digest)?,
            size: target.size as u64,
            platform: None,
            annotations: None,
        })
    }

    #[cfg(feature = "containerd")]
    async fn containerd_reader(&self, desc: &Descriptor) -> Result<BlobReader, ImageError> {
        use containerd_client::services::v1::ReadContentRequest;
        use containerd_client::services::v1::content_client::ContentClient;
        use futures::TryStreamExt;
        let (channel, cfg) = self.containerd_channel().await?;
        let socket = cfg.socket.clone();
        let stream = ContentClient::new(channel)
            .read(Self::namespaced(cfg, ReadContentRequest { digest: desc.digest.to_string(), offset: 0, size: 0 })?)
            .await
            .map_err(|e| ImageError::Containerd {
                socket: socket.clone(),
                reason: format!("reading {}: {}", desc.digest, e.message()),
            })?
            .into_inner();
        let bytes = stream
            .map_ok(|chunk| bytes::Bytes::from(chunk.data))
            .map_err(|status| std::io::Error::other(status.message().to_string()));
        Ok(Box::pin(tokio_util::io::StreamReader::new(bytes)))
    }

    #[cfg(not(feature = "containerd"))]
    async fn containerd_image(&self, _name: &str) -> Result<Descriptor, ImageError> {
        let _ = &self.containerd;
        Err(ImageError::NoContainerd)
    }

    #[cfg(not(feature = "containerd"))]
    async fn containerd_reader(&self, _desc: &Descriptor) -> Result<BlobReader, ImageError> {
        Err(ImageError::NoContainerd)
    }
}

/// How the image is named in errors.
pub fn display(r: &ImageRef) -> String {
    match r {
        ImageRef::Registry(reference) => reference.whole(),
        ImageRef::Layout { dir, tag: Some(t) } => format!("oci:{}:{t}", dir.display()),
        ImageRef::Layout { dir, tag: None } => format!("oci:{}", dir.display()),
        ImageRef::Containerd { name } => format!("containerd:{name}"),
    }
}

fn registry_err(reference: &Reference, e: oci_client::errors::OciDistributionError) -> ImageError {
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        source = s.source();
    }
    ImageError::Registry { registry: reference.resolve_registry().to_string(), reference: reference.whole(), reason }
}

/// A manifest's own `mediaType` field (registries also send it as a header, which the raw
/// pull does not return).
fn media_type_of(bytes: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Typed {
        #[serde(default)]
        media_type: String,
    }
    serde_json::from_slice::<Typed>(bytes).map(|t| t.media_type).unwrap_or_default()
}

/// Registry credentials from a Docker-style `config.json`: `auths.<host>.auth` (base64 of
/// `user:password`, basic auth) or `auths.<host>.registrytoken` (a bearer token).
fn read_auths(path: &Path) -> Result<Vec<(String, RegistryAuth)>, ImageError> {
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        auths: std::collections::BTreeMap<String, Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(default)]
        auth: Option<String>,
        #[serde(default)]
        registrytoken: Option<String>,
    }
    let bad = |reason: String| ImageError::Auth { path: path.to_path_buf(), reason };
    let text = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let file: File = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    let mut out = Vec::new();
    for (host, entry) in file.auths {
        let host = host.trim_start_matches("https://").trim_start_matches("http://");
        let host = host.split('/').next().unwrap_or(host).to_string();
        let auth = if let Some(token) = entry.registrytoken {
            RegistryAuth::Bearer(token)
        } else if let Some(basic) = entry.auth {
            use base64::Engine;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(basic.trim())
                .map_err(|e| bad(format!("auths.{host}.auth: {e}")))?;
            let decoded = String::from_utf8(decoded).map_err(|e| bad(format!("auths.{host}.auth: {e}")))?;
            let (user, password) =
                decoded.split_once(':').ok_or_else(|| bad(format!("auths.{host}.auth is not user:password")))?;
            RegistryAuth::Basic(user.to_string(), password.to_string())
        } else {
            continue;
        };
        out.push((host, auth));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_kinds_of_reference() {
        match ImageRef::parse("oci:/srv/layout:v1").unwrap() {
            ImageRef::Layout { dir, tag } => {
                assert_eq!(dir, PathBuf::from("/srv/layout"));
                assert_eq!(tag.as_deref(), Some("v1"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(ImageRef::parse("oci:/srv/layout").unwrap(), ImageRef::Layout { tag: None, .. }));
        assert!(ImageRef::parse("oci:relative").is_err());
        assert!(matches!(
            ImageRef::parse("containerd:docker.io/library/busybox:1").unwrap(),
            ImageRef::Containerd { .. }
        ));
        match ImageRef::parse("127.0.0.1:5000/python:test").unwrap() {
            ImageRef::Registry(r) => {
                assert_eq!(r.registry(), "127.0.0.1:5000");
                assert_eq!(r.repository(), "python");
                assert_eq!(r.tag(), Some("test"));
            }
            other => panic!("{other:?}"),
        }
        assert!(ImageRef::parse("has spaces:x y").is_err());
        assert!(ImageRef::parse("repo/Upper:x").is_err());
    }

    #[test]
    fn reads_docker_config_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"auths":{"https://reg.example:5000/v1/":{"auth":"dXNlcjpwYXNz"},"tok.example":{"registrytoken":"T"}}}"#,
        )
        .unwrap();
        let auths = read_auths(&path).unwrap();
        assert!(
            auths.iter().any(|(h, a)| h == "reg.example:5000"
                && matches!(a, RegistryAuth::Basic(u, p) if u == "user" && p == "pass"))
        );
        assert!(auths.iter().any(|(h, a)| h == "tok.example" && matches!(a, RegistryAuth::Bearer(t) if t == "T")));
    }
}
