//! The parts of OCI (and Docker v2) manifests, indexes and image configs the worker reads,
//! and the digests that name them. Parsed leniently: unknown fields are ignored.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::ImageError;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Manifest media types a registry may answer with.
pub const ACCEPTED: &[&str] = &[OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

/// Layer media types the worker unpacks (their compression is read from their first bytes).
const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

/// A `sha256:<64 hex>` digest, checked before it ever becomes part of a path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    pub fn parse(s: &str) -> Result<Digest, ImageError> {
        match s.strip_prefix("sha256:") {
            Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) => {
                Ok(Digest(s.to_string()))
            }
            _ => Err(ImageError::BadDigest(s.to_string())),
        }
    }

    pub fn of(bytes: &[u8]) -> Digest {
        Digest(format!("sha256:{}", hex::encode(Sha256::digest(bytes))))
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Fails unless `bytes` hash to this digest.
    pub fn verify(&self, what: &str, bytes: &[u8]) -> Result<(), ImageError> {
        let got = Digest::of(bytes);
        if &got == self {
            Ok(())
        } else {
            Err(ImageError::DigestMismatch { what: what.to_string(), expected: self.0.clone(), got: got.0 })
        }
    }
}

impl TryFrom<String> for Digest {
    type Error = ImageError;
    fn try_from(s: String) -> Result<Digest, ImageError> {
        Digest::parse(&s)
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: Digest,
    #[serde(default)]
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// A manifest or an index: which one is told by the fields present.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestDoc {
    #[serde(default)]
    pub media_type: Option<String>,
    #[serde(default)]
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

impl ManifestDoc {
    pub fn parse(bytes: &[u8], what: &str) -> Result<ManifestDoc, ImageError> {
        serde_json::from_slice(bytes)
            .map_err(|e| ImageError::Malformed { what: what.to_string(), reason: e.to_string() })
    }

    pub fn is_index(&self, media_type: &str) -> bool {
        media_type == OCI_INDEX || media_type == DOCKER_LIST || (self.config.is_none() && !self.manifests.is_empty())
    }

    /// The linux/amd64 manifest of an index (attestation manifests name no such platform).
    pub fn pick_platform(&self, what: &str) -> Result<Descriptor, ImageError> {
        let platforms: Vec<String> = self
            .manifests
            .iter()
            .map(|m| m.platform.as_ref().map(|p| format!("{}/{}", p.os, p.architecture)).unwrap_or("?".into()))
            .collect();
        self.manifests
            .iter()
            .find(|m| m.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == "amd64"))
            .or_else(|| {
                if self.manifests.len() == 1 && self.manifests[0].platform.is_none() {
                    self.manifests.first()
                } else {
                    None
                }
            })
            .cloned()
            .ok_or_else(|| ImageError::NoPlatform { what: what.to_string(), platforms })
    }

    /// The config and layers of an image manifest, every media type checked.
    pub fn image_parts(self, what: &str) -> Result<(Descriptor, Vec<Descriptor>), ImageError> {
        let config =
            self.config.ok_or_else(|| ImageError::Malformed { what: what.to_string(), reason: "no config".into() })?;
        for layer in &self.layers {
            if !LAYER_TYPES.contains(&layer.media_type.as_str()) {
                return Err(ImageError::UnsupportedMediaType {
                    what: format!("layer {} of {what}", layer.digest),
                    media_type: layer.media_type.clone(),
                });
            }
        }
        Ok((config, self.layers))
    }
}

/// What the image's config says about running it (`config` of the image config JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct ImageConfig {
    #[serde(rename = "Env", default)]
    pub env: Vec<String>,
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Vec<String>,
    #[serde(rename = "Cmd", default)]
    pub cmd: Vec<String>,
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: String,
    #[serde(rename = "User", default)]
    pub user: String,
}

#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    config: Option<NullableConfig>,
}

/// Docker writes `null` for empty lists.
#[derive(Deserialize)]
struct NullableConfig {
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "User", default)]
    user: Option<String>,
}

impl ImageConfig {
    pub fn parse(bytes: &[u8], what: &str) -> Result<ImageConfig, ImageError> {
        let file: ConfigFile = serde_json::from_slice(bytes)
            .map_err(|e| ImageError::Malformed { what: format!("the config of {what}"), reason: e.to_string() })?;
        Ok(file
            .config
            .map(|c| ImageConfig {
                env: c.env.unwrap_or_default(),
                entrypoint: c.entrypoint.unwrap_or_default(),
                cmd: c.cmd.unwrap_or_default(),
                working_dir: c.working_dir.unwrap_or_default(),
                user: c.user.unwrap_or_default(),
            })
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_checked_before_use() {
        assert!(Digest::parse("sha256:../../etc").is_err());
        assert!(Digest::parse(&format!("sha256:{}", "A".repeat(64))).is_err());
        let d = Digest::of(b"x");
        assert!(d.verify("x", b"x").is_ok());
        assert!(matches!(d.verify("x", b"y"), Err(ImageError::DigestMismatch { .. })));
    }

    #[test]
    fn picks_linux_amd64_from_an_index() {
        let d = |s: &str| Digest::of(s.as_bytes()).to_string();
        let index = format!(
            r#"{{"manifests":[
              {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1,"platform":{{"os":"linux","architecture":"arm64"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
            d("a"),
            d("b")
        );
        let doc = ManifestDoc::parse(index.as_bytes(), "x").unwrap();
        assert!(doc.is_index(""));
        assert_eq!(doc.pick_platform("x").unwrap().digest.to_string(), d("b"));
    }

    #[test]
    fn refuses_unknown_layer_types_and_reads_null_config_lists() {
        let m = format!(
            r#"{{"config":{{"mediaType":"x","digest":"{0}"}},"layers":[{{"mediaType":"application/vnd.wasm.content.layer.v1+wasm","digest":"{0}"}}]}}"#,
            Digest::of(b"c")
        );
        let err = ManifestDoc::parse(m.as_bytes(), "img").unwrap().image_parts("img").unwrap_err();
        assert!(err.to_string().contains("wasm"), "{err}");
        let c = ImageConfig::parse(br#"{"config":{"Env":null,"Cmd":["sh"],"WorkingDir":"/w"}}"#, "img").unwrap();
        assert_eq!(c.cmd, vec!["sh"]);
        assert_eq!(c.working_dir, "/w");
        assert!(c.env.is_empty());
    }
}
