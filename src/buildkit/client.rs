//! The public surface: connect to BuildKit, list its workers, build a Dockerfile into a
//! directory.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use super::dockerfile::ImageConfig;
use super::error::io;
use super::progress::{LogLine, Progress};
use super::proto::control::{ListWorkersRequest, SolveRequest, StatusRequest, control_client::ControlClient};
use super::session::{Session, SessionDirs};
use super::{BuildkitError, connect, export};
use crate::archive::{self, Separators};

/// A connection to one BuildKit daemon.
#[derive(Clone)]
pub struct Client {
    addr: String,
    control: ControlClient<Channel>,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// The build context (sent to BuildKit as the `context` local source).
    pub context_dir: PathBuf,
    /// The Dockerfile, relative to `context_dir`.
    pub dockerfile: PathBuf,
    pub build_args: HashMap<String, String>,
    /// A stage to stop at (`--target`), if not the last.
    pub target: Option<String>,
}

/// A finished build.
#[derive(Debug, Clone)]
pub struct BuildOutput {
    /// The image's root filesystem (the directory `build` was given).
    pub rootfs: PathBuf,
    /// The image config: from the solve response when BuildKit returned one, else the
    /// Dockerfile's final stage (see [`super::dockerfile`]).
    pub config: ImageConfig,
    /// True when the config came from BuildKit's response rather than the Dockerfile.
    pub config_from_buildkit: bool,
    /// BuildKit's exporter response, as returned.
    pub exporter_response: HashMap<String, String>,
}

/// A BuildKit worker (what `ListWorkers` says).
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub id: String,
    pub labels: HashMap<String, String>,
    /// `os/architecture[/variant]`.
    pub platforms: Vec<String>,
}

/// A fresh random-enough id for sessions and build refs (BuildKit only needs uniqueness).
fn new_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = Sha256::new();
    h.update(std::process::id().to_le_bytes());
    h.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    h.update(now.as_nanos().to_le_bytes());
    hex::encode(h.finalize())[..25].to_string()
}

impl Client {
    /// Connects to `addr` (`unix://PATH`, `tcp://HOST:PORT` or `docker-unix://PATH`).
    pub async fn connect(addr: &str) -> Result<Client, BuildkitError> {
        let channel = connect::channel(addr).await?;
        let control = ControlClient::new(channel).max_decoding_message_size(64 << 20);
        Ok(Client { addr: addr.to_string(), control })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn call_error(&self, call: &'static str, status: tonic::Status) -> BuildkitError {
        BuildkitError::Call { addr: self.addr.clone(), call, status: Box::new(status) }
    }

    /// The daemon's workers (also a cheap check that it answers).
    pub async fn list_workers(&self) -> Result<Vec<WorkerInfo>, BuildkitError> {
        let resp = self
            .control
            .clone()
            .list_workers(ListWorkersRequest::default())
            .await
            .map_err(|s| self.call_error("ListWorkers", s))?;
        Ok(resp
            .into_inner()
            .record
            .into_iter()
            .map(|w| WorkerInfo {
                id: w.id,
                labels: w.labels,
                platforms: w
                    .platforms
                    .into_iter()
                    .map(|p| {
                        if p.variant.is_empty() {
                            format!("{}/{}", p.os, p.architecture)
                        } else {
                            format!("{}/{}/{}", p.os, p.architecture, p.variant)
                        }
                    })
                    .collect(),
            })
            .collect())
    }

    /// Builds `req` and unpacks the result into `dest` (missing or empty; its parent must
    /// exist and holds the exporter's tarball meanwhile). Every log line of the build goes to
    /// `on_log` as it arrives.
    pub async fn build(
        &self,
        req: &BuildRequest,
        dest: &Path,
        mut on_log: impl FnMut(LogLine) + Send,
    ) -> Result<BuildOutput, BuildkitError> {
        let (dockerfile_dir, dockerfile_name, dockerfile_text) = check_request(req)?;
        let parent = dest
            .parent()
            .ok_or_else(|| BuildkitError::BadRequest(format!("{} has no parent directory", dest.display())))?;
        let id = new_id();
        let tarball = parent.join(format!(".buildkit-{id}.tar"));
        let _remove_tarball = RemoveOnDrop(tarball.clone());
        let dirs: SessionDirs = HashMap::from([
            ("context".to_string(), req.context_dir.clone()),
            ("dockerfile".to_string(), dockerfile_dir),
        ]);
        let session = Session::start(&self.control, id.clone(), dirs, tarball.clone()).await?;

        // Status first, so no update is missed; BuildKit holds it until the solve starts.
        let build_ref = new_id();
        let (log_tx, mut log_rx) = mpsc::unbounded_channel::<LogLine>();
        let mut control = self.control.clone();
        let status_ref = build_ref.clone();
        let status = tokio::spawn(async move {
            let mut progress = Progress::default();
            let Ok(resp) = control.status(StatusRequest { r#ref: status_ref }).await else { return progress };
            let mut stream = resp.into_inner();
            while let Some(Ok(update)) = stream.next().await {
                for line in progress.lines(&update) {
                    let _ = log_tx.send(line);
                }
            }
            progress
        });

        let mut frontend_attrs = HashMap::from([("filename".to_string(), dockerfile_name)]);
        for (k, v) in &req.build_args {
            frontend_attrs.insert(format!("build-arg:{k}"), v.clone());
        }
        if let Some(t) = &req.target {
            frontend_attrs.insert("target".into(), t.clone());
        }
        let solve = SolveRequest {
            r#ref: build_ref,
            exporter: "tar".into(),
            exporter_attrs: HashMap::new(),
            session: session.id.clone(),
            frontend: "dockerfile.v0".into(),
            frontend_attrs,
            entitlements: vec![],
        };
        let mut control = self.control.clone();
        let solve = control.solve(solve);
        tokio::pin!(solve);
        let result = loop {
            tokio::select! {
                r = &mut solve => break r,
                Some(line) = log_rx.recv() => on_log(line),
            }
        };
        // The status stream ends shortly after the solve; its last lines (the error, DONE)
        // belong in the log.
        let progress = match tokio::time::timeout(std::time::Duration::from_secs(5), status).await {
            Ok(Ok(p)) => Some(p),
            _ => None,
        };
        while let Ok(line) = log_rx.try_recv() {
            on_log(line);
        }
        let exported = session.exported();
        session.close();
        let response = match result {
            Ok(r) => r.into_inner(),
            Err(status) => {
                let detail = progress
                    .map(|p| p.errors().join("; "))
                    .filter(|e| !e.is_empty())
                    .unwrap_or_else(|| status.message().to_string());
                return Err(match status.code() {
                    tonic::Code::Unavailable => {
                        BuildkitError::Unreachable { addr: self.addr.clone(), reason: status.message().to_string() }
                    }
                    _ => BuildkitError::BuildFailed(detail),
                });
            }
        };
        exported?;
        let unpack_tarball = tarball.clone();
        let unpack_dest = dest.to_path_buf();
        tokio::task::spawn_blocking(move || export::unpack(&unpack_tarball, &unpack_dest))
            .await
            .map_err(|e| BuildkitError::Session(format!("unpacking the build's output: {e}")))??;
        let from_response = ImageConfig::from_exporter_response(&response.exporter_response);
        Ok(BuildOutput {
            rootfs: dest.to_path_buf(),
            config_from_buildkit: from_response.is_some(),
            config: from_response.unwrap_or_else(|| ImageConfig::from_dockerfile(&dockerfile_text, &req.build_args)),
            exporter_response: response.exporter_response,
        })
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The Dockerfile's directory, file name and text, after checking it lies inside the context.
fn check_request(req: &BuildRequest) -> Result<(PathBuf, String, String), BuildkitError> {
    if !req.context_dir.is_dir() {
        return Err(BuildkitError::BadRequest(format!(
            "the build context {} is not a directory",
            req.context_dir.display()
        )));
    }
    if archive::entry_parts(req.dockerfile.as_os_str().as_bytes(), Separators::Slash).is_err() {
        return Err(BuildkitError::BadRequest(format!(
            "the Dockerfile path {} must be relative and inside the context",
            req.dockerfile.display()
        )));
    }
    let path = req.context_dir.join(&req.dockerfile);
    let text = std::fs::read_to_string(&path).map_err(io("reading the Dockerfile", &path))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).ok_or_else(|| {
        BuildkitError::BadRequest(format!("the Dockerfile path {} names no file", req.dockerfile.display()))
    })?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| req.context_dir.clone());
    Ok((dir, name, text))
}
