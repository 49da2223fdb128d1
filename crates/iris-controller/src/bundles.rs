//! Inline bundles: what Iris's client sends as `LaunchJobRequest.bundle_blob` (the zipped
//! workspace; `IrisClient.remote(workspace=…)` ships code no other way). The controller keeps
//! each blob once, content-addressed, as `<state-dir>/bundles/<sha256>.zip` (written to a temp
//! name and renamed), serves it to workers at `GET /bundles/<sha256>.zip`, keeps the digest with
//! the job, and dispatches each task with the URL made from the controller's advertised URL of
//! the moment in `bundle_gcs_path` and the digest in `bundle_sha256`, so a worker verifies what
//! it fetched. A blob no live job names (by its digest) any more is removed.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The largest blob accepted (the Connect request that carries it is bounded a little above).
pub const MAX_BLOB_BYTES: usize = 60 << 20;

/// Errors of storing a blob.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("bundle_blob is {size} bytes, more than the {MAX_BLOB_BYTES} allowed")]
    TooLarge { size: usize },
    #[error("bundle_blob is not a zip archive")]
    NotZip,
    #[error("bundle_blob has sha256 {actual}, but bundle_sha256 says {expected}")]
    Mismatch { expected: String, actual: String },
    #[error("storing the bundle: {0}")]
    Io(#[from] std::io::Error),
}

/// The controller's blob directory.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
}

impl BlobStore {
    /// `<state_dir>/bundles`, created; temp files a crash left are removed.
    pub fn open(state_dir: &Path) -> std::io::Result<BlobStore> {
        let dir = state_dir.join("bundles");
        std::fs::create_dir_all(&dir)?;
        for e in std::fs::read_dir(&dir)?.flatten() {
            if e.file_name().to_string_lossy().starts_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(BlobStore { dir })
    }

    /// Stores `blob` (once per content); returns its sha256. `expected`, when given, must match.
    pub fn put(&self, blob: &[u8], expected: Option<&str>) -> Result<String, BlobError> {
        if blob.len() > MAX_BLOB_BYTES {
            return Err(BlobError::TooLarge { size: blob.len() });
        }
        // Every zip starts with a local file header (or, empty, the end-of-directory record).
        if !(blob.starts_with(b"PK\x03\x04") || blob.starts_with(b"PK\x05\x06")) {
            return Err(BlobError::NotZip);
        }
        let sha = hex::encode(Sha256::digest(blob));
        if let Some(e) = expected.map(|e| e.trim().to_ascii_lowercase()).filter(|e| !e.is_empty())
            && e != sha
        {
            return Err(BlobError::Mismatch { expected: e, actual: sha });
        }
        let path = self.path(&sha);
        if let Ok(f) = std::fs::File::options().write(true).open(&path) {
            // Already here: mark it as just asked for, so a sweep leaves it to this launch.
            f.set_modified(std::time::SystemTime::now())?;
        } else {
            let mut tmp = tempfile::Builder::new().prefix(".tmp").tempfile_in(&self.dir)?;
            tmp.write_all(blob)?;
            tmp.as_file().sync_all()?;
            tmp.persist(&path).map_err(|e| e.error)?;
        }
        Ok(sha)
    }

    /// Where the blob with `sha` is (whether or not it exists).
    pub fn path(&self, sha: &str) -> PathBuf {
        self.dir.join(format!("{sha}.zip"))
    }

    /// The sha256 named by a request path's file name (`<64 hex>.zip`), if it is one.
    pub fn sha_of_name(name: &str) -> Option<&str> {
        let sha = name.strip_suffix(".zip")?;
        (sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))).then_some(sha)
    }

    /// Removes every blob not in `keep` last stored longer than `min_age` ago; returns how
    /// many went.
    pub fn sweep(&self, keep: &HashSet<String>, min_age: std::time::Duration) -> usize {
        let mut removed = 0;
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let old = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()) >= Some(min_age);
            if let Some(sha) = Self::sha_of_name(&name)
                && !keep.contains(sha)
                && old
                && std::fs::remove_file(e.path()).is_ok()
            {
                removed += 1;
            }
        }
        removed
    }
}

/// The URL workers fetch the blob `sha` at from a controller advertised at `base`.
pub fn url(base: &str, sha: &str) -> String {
    format!("{}/bundles/{sha}.zip", base.trim_end_matches('/'))
}

/// The sha256 a bundle URL of the form `…/bundles/<sha>.zip` names, whatever its host: how
/// jobs recorded before the controller kept the digest name their blob.
pub fn sha_in_url(bundle_path: &str) -> Option<&str> {
    let (dir, name) = bundle_path.rsplit_once('/')?;
    dir.ends_with("/bundles").then(|| BlobStore::sha_of_name(name)).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_stored_once_checked_and_swept() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let zip = b"PK\x05\x06\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0".to_vec();
        let sha = store.put(&zip, None).unwrap();
        assert_eq!(store.put(&zip, Some(&sha.to_uppercase())).unwrap(), sha);
        assert_eq!(std::fs::read(store.path(&sha)).unwrap(), zip);
        assert!(matches!(store.put(&zip, Some(&"0".repeat(64))), Err(BlobError::Mismatch { .. })));
        assert!(matches!(store.put(b"not a zip", None), Err(BlobError::NotZip)));
        assert!(matches!(store.put(&vec![0; MAX_BLOB_BYTES + 1], None), Err(BlobError::TooLarge { .. })));
        assert_eq!(url("http://c:1/", &sha), format!("http://c:1/bundles/{sha}.zip"));
        assert_eq!(sha_in_url(&url("http://old:2", &sha)), Some(sha.as_str()));
        assert_eq!(sha_in_url("http://c:1/bundles/x.zip"), None);
        assert_eq!(sha_in_url(&format!("http://c:1/other/{sha}.zip")), None);
        let now = std::time::Duration::ZERO;
        assert_eq!(store.sweep(&HashSet::new(), std::time::Duration::from_secs(60)), 0, "too young to go");
        assert_eq!(store.sweep(&HashSet::from([sha.clone()]), now), 0);
        assert_eq!(store.sweep(&HashSet::new(), now), 1);
        assert!(!store.path(&sha).exists());
    }
}
