//! The client's session with BuildKit: BuildKit reaches back to the client (for local sources
//! and an exporter's output) through `Control.Session`, a stream of BytesMessage frames that
//! carries an HTTP/2 connection on which BuildKit is the gRPC *client*. This side runs tonic's
//! server on one end of an in-memory duplex pipe and pumps bytes between the other end and the
//! stream.
//!
//! Served: `moby.filesync.v1.FileSync/DiffCopy` (the directories named in [`SessionDirs`],
//! chosen by the `dir-name` header), `moby.filesync.v1.FileSend/DiffCopy` (the `tar`
//! exporter's tarball, written to a file) and `grpc.health.v1.Health/Check` (BuildKit closes a
//! session that stops answering it). The session announces them with the
//! `X-Docker-Expose-Session-*` headers.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status, Streaming};

use super::BuildkitError;
use super::fsutil::{self, Filter};
use super::proto::control::{BytesMessage, control_client::ControlClient};
use super::proto::filesync::{self, file_send_server, file_sync_server};
use super::proto::fsutil::types::Packet;
use super::proto::health::{self, HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus};

/// The methods this session serves, as announced to BuildKit.
pub const METHODS: [&str; 3] =
    ["/moby.filesync.v1.FileSync/DiffCopy", "/moby.filesync.v1.FileSend/DiffCopy", "/grpc.health.v1.Health/Check"];

/// The size of one BytesMessage frame of the tunnel.
const FRAME: usize = 32 << 10;

/// The local directories BuildKit may read, by the name its frontend asks for.
pub type SessionDirs = HashMap<String, PathBuf>;

/// A running session; dropping it (or [`Session::close`]) ends the tunnel and the server.
pub struct Session {
    pub id: String,
    shutdown: Option<oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    export: Arc<Mutex<ExportState>>,
}

/// What the FileSend service received.
#[derive(Debug, Default)]
struct ExportState {
    /// Bytes written to the export file, once a transfer completed.
    done: Option<u64>,
    error: Option<String>,
}

impl Session {
    /// Opens the session on `control`: BuildKit can read `dirs` and send the `tar` exporter's
    /// output, which lands in `export_file`.
    pub async fn start(
        control: &ControlClient<Channel>,
        id: String,
        dirs: SessionDirs,
        export_file: PathBuf,
    ) -> Result<Session, BuildkitError> {
        let export = Arc::new(Mutex::new(ExportState::default()));
        let router = Server::builder()
            .add_service(file_sync_server::FileSyncServer::new(FileSync { dirs: Arc::new(dirs) }))
            .add_service(file_send_server::FileSendServer::new(FileSend { path: export_file, state: export.clone() }))
            .add_service(health::health_server::HealthServer::new(Health));
        let (ours, theirs) = tokio::io::duplex(4 * FRAME);
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let incoming = futures::stream::iter([Ok::<_, std::io::Error>(ours)]).chain(futures::stream::pending());
        let server = tokio::spawn(async move {
            let _ = router
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = shutdown_rx.await;
                })
                .await;
        });

        let (mut from_server, mut to_server) = tokio::io::split(theirs);
        let (out_tx, out_rx) = mpsc::channel::<BytesMessage>(16);
        // Server → BuildKit: whatever tonic writes goes out as frames.
        let pump_out = tokio::spawn(async move {
            let mut buf = vec![0u8; FRAME];
            loop {
                match from_server.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if out_tx.send(BytesMessage { data: buf[..n].to_vec() }).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let mut request =
            Request::new(futures::stream::unfold(out_rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) }));
        set_session_headers(request.metadata_mut(), &id)?;
        let mut control = control.clone();
        // BuildKit → server. The call runs in its own task: it resolves only once BuildKit
        // answers, and the solve that makes BuildKit use the session must not wait for that.
        let pump_in = tokio::spawn(async move {
            let Ok(response) = control.session(request).await else { return };
            let mut stream = response.into_inner();
            while let Some(Ok(m)) = stream.next().await {
                if to_server.write_all(&m.data).await.is_err() {
                    return;
                }
            }
            let _ = to_server.shutdown().await;
        });
        Ok(Session { id, shutdown: Some(shutdown_tx), tasks: vec![server, pump_out, pump_in], export })
    }

    /// The size of the tarball the exporter sent, or why none arrived.
    pub fn exported(&self) -> Result<u64, BuildkitError> {
        let state = self.export.lock().unwrap_or_else(|p| p.into_inner());
        match (&state.error, state.done) {
            (Some(e), _) => Err(BuildkitError::Session(format!("receiving the exporter's output: {e}"))),
            (None, Some(n)) => Ok(n),
            (None, None) => Err(BuildkitError::Session("BuildKit sent no exporter output over the session".into())),
        }
    }

    /// Ends the session.
    pub fn close(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop();
    }
}

fn set_session_headers(md: &mut MetadataMap, id: &str) -> Result<(), BuildkitError> {
    let value = |s: &str| {
        AsciiMetadataValue::try_from(s)
            .map_err(|_| BuildkitError::BadRequest(format!("session header value {s:?} is not ASCII")))
    };
    md.insert("x-docker-expose-session-uuid", value(id)?);
    md.insert("x-docker-expose-session-name", value("iris-worker")?);
    md.insert("x-docker-expose-session-sharedkey", value(id)?);
    for m in METHODS {
        md.append("x-docker-expose-session-grpc-method", value(m)?);
    }
    Ok(())
}

/// The values of header `key`, URL-decoded when BuildKit sent `<key>-encoded: true` (it does
/// for values that are not plain ASCII).
fn header_values(md: &MetadataMap, key: &str) -> Vec<String> {
    let encoded =
        md.get(format!("{key}-encoded")).and_then(|v| v.to_str().ok()).is_some_and(|v| v == "true" || v == "1");
    md.get_all(key)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| if encoded { query_unescape(v) } else { v.to_string() })
        .collect()
}

/// Go's `url.QueryUnescape`: `%XX` escapes and `+` for a space.
fn query_unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

type PacketStream = Pin<Box<dyn Stream<Item = Result<Packet, Status>> + Send>>;
type BytesStream = Pin<Box<dyn Stream<Item = Result<filesync::BytesMessage, Status>> + Send>>;

struct FileSync {
    dirs: Arc<SessionDirs>,
}

#[tonic::async_trait]
impl file_sync_server::FileSync for FileSync {
    type DiffCopyStream = PacketStream;

    async fn diff_copy(&self, request: Request<Streaming<Packet>>) -> Result<Response<PacketStream>, Status> {
        let md = request.metadata();
        let name = header_values(md, "dir-name").into_iter().next().unwrap_or_default();
        let Some(root) = self.dirs.get(&name).cloned() else {
            return Err(Status::not_found(format!("no access allowed to dir {name:?}")));
        };
        let filter =
            Filter { include: header_values(md, "include-patterns"), exclude: header_values(md, "exclude-patterns") };
        tracing::debug!(dir = %name, root = %root.display(), ?filter, "BuildKit reads a local directory");
        let incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let err_tx = tx.clone();
        tokio::spawn(async move {
            if let Err(e) = fsutil::send(root, filter, incoming, tx).await {
                tracing::warn!(dir = %name, "serving the directory to BuildKit failed: {e}");
                let _ = err_tx.send(Err(Status::internal(e))).await;
            }
        });
        let out = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        Ok(Response::new(Box::pin(out)))
    }
}

struct FileSend {
    path: PathBuf,
    state: Arc<Mutex<ExportState>>,
}

#[tonic::async_trait]
impl file_send_server::FileSend for FileSend {
    type DiffCopyStream = BytesStream;

    async fn diff_copy(
        &self,
        request: Request<Streaming<filesync::BytesMessage>>,
    ) -> Result<Response<BytesStream>, Status> {
        let result = receive(&self.path, request.into_inner()).await;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(n) => {
                state.done = Some(n);
                Ok(Response::new(Box::pin(futures::stream::empty())))
            }
            Err(e) => {
                state.error = Some(e.clone());
                Err(Status::internal(e))
            }
        }
    }
}

/// Writes the stream's chunks to `path` until BuildKit closes its side.
async fn receive(path: &std::path::Path, mut stream: Streaming<filesync::BytesMessage>) -> Result<u64, String> {
    let mut f = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .await
        .map_err(|e| format!("creating {}: {e}", path.display()))?;
    let mut n = 0u64;
    while let Some(m) = stream.next().await {
        let m = m.map_err(|s| format!("the exporter's stream: {}", s.message()))?;
        f.write_all(&m.data).await.map_err(|e| format!("writing {}: {e}", path.display()))?;
        n += m.data.len() as u64;
    }
    f.flush().await.map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(n)
}

struct Health;

#[tonic::async_trait]
impl health::health_server::Health for Health {
    async fn check(&self, _: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        Ok(Response::new(HealthCheckResponse { status: ServingStatus::Serving as i32 }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_header_values_are_unescaped() {
        assert_eq!(query_unescape("a%2Fb+c"), "a/b c");
        assert_eq!(query_unescape("%E2%9C%93"), "✓");
        assert_eq!(query_unescape("100%"), "100%");
        let mut md = MetadataMap::new();
        md.append("include-patterns", "x%2A".parse().unwrap());
        md.append("include-patterns-encoded", "true".parse().unwrap());
        assert_eq!(header_values(&md, "include-patterns"), ["x*"]);
    }
}
