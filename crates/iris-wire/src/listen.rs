//! The accept loop of our servers (the worker's and the controller's port): every connection
//! served by hyper (HTTP/1.1 or HTTP/2, over TCP or TLS), and bounded so slow or idle clients
//! cannot take the server down.
//!
//! - At most `max_connections` connections are open. At the bound a new connection closes the
//!   connection idle the longest (no request in flight), as nginx reuses keep-alive
//!   connections when it runs out; only when every connection is busy does accepting wait. So
//!   a flood of idle connections neither exhausts descriptors nor locks out a health check.
//! - A client has `read_timeout` to finish its TLS handshake and to send each request's
//!   headers (hyper's header timeout, which on HTTP/1.1 also runs between requests), and a
//!   connection with no request in flight for that long is closed (gracefully: HTTP/2 clients
//!   get a GOAWAY and reconnect when they next call).
//! - On shutdown the server stops accepting, asks every connection to finish (idle ones close
//!   at once) and returns when all have.
//!
//! - Busy connections cannot hold the bound either. A Server-Sent Events stream (the
//!   dashboard's live views) never ends, so it does not count as busy: at the bound, once no
//!   connection is idle, the oldest stream is closed (browsers' EventSource reconnects), so
//!   1,024 `curl -N …/api/events/tasks` cannot stop the accept loop. A request body (gRPC's
//!   included: tonic has no body timeout) that sends no byte for `read_timeout` fails, so a
//!   request whose body never arrives does not keep its connection busy forever. HTTP/2
//!   connections take at most [`MAX_STREAMS`] requests at once.
//!
//! Request bodies are bounded in size where they are read (see `connect::server`).

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tower::ServiceExt;

/// How connections are admitted and timed out.
#[derive(Clone)]
pub struct ListenOptions {
    /// TLS on every connection (`None`: plain TCP).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Connections open at once.
    pub max_connections: usize,
    /// The TLS handshake and each request's headers (and, in `connect::server`, its body)
    /// must arrive within this; a connection without a request in flight for this long is
    /// closed.
    pub read_timeout: Duration,
}

/// Connections served at once when the operator sets no bound.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Requests in flight on one HTTP/2 connection (hyper's default is 200): our RPCs are short,
/// and a client that needs more opens another connection.
pub const MAX_STREAMS: u32 = 32;
/// How long a request's headers and body may take to arrive when the operator sets no bound.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Descriptors kept for everything but connections (logs, pipes, cgroup files, clients).
const RESERVED_FDS: u64 = 256;

impl Default for ListenOptions {
    fn default() -> Self {
        ListenOptions { tls: None, max_connections: DEFAULT_MAX_CONNECTIONS, read_timeout: DEFAULT_READ_TIMEOUT }
    }
}

/// Raises this process's soft descriptor limit to its hard limit (as Go's runtime and
/// containerd do) and returns the connection bound that fits in it: `wanted`, or less when
/// the limit leaves less than `RESERVED_FDS` for everything else.
pub fn fit_connections(wanted: usize) -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return wanted };
    let soft = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() { hard } else { soft };
    let room = soft.saturating_sub(RESERVED_FDS).max(16);
    wanted.min(usize::try_from(room).unwrap_or(usize::MAX))
}

/// One open connection, as the bound and the idle timer see it.
struct Conn {
    /// Requests whose response has not been sent to the end (event streams aside).
    busy: AtomicUsize,
    /// Event streams being sent: not idle, but closed at the bound when nothing idle is left.
    streams: AtomicUsize,
    /// When a request last started or ended (ms since the server started).
    last_active_ms: AtomicU64,
    /// Told to close at once (evicted while idle).
    evict: Notify,
}

/// The open connections, in the order they were accepted.
struct Registry {
    conns: Mutex<BTreeMap<u64, Arc<Conn>>>,
    /// Told whenever a connection ends.
    ended: Notify,
    started: Instant,
}

impl Registry {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn len(&self) -> usize {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Closes the connection idle the longest, or else the oldest one that only sends event
    /// streams; false when every connection is busy with a request.
    fn evict_idle(&self) -> bool {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let free = |c: &Conn| c.busy.load(Ordering::Acquire) == 0;
        let victim = conns
            .iter()
            .filter(|(_, c)| free(c) && c.streams.load(Ordering::Acquire) == 0)
            .min_by_key(|(_, c)| c.last_active_ms.load(Ordering::Acquire))
            .map(|(id, _)| *id)
            // Ids grow with accept order: the first found is the oldest.
            .or_else(|| conns.iter().find(|(_, c)| free(c)).map(|(id, _)| *id));
        match victim.and_then(|id| conns.remove(&id)) {
            Some(conn) => {
                conn.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Removes its connection from the registry when the connection's task ends.
struct Registered {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.conns.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
        self.registry.ended.notify_waiters();
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then waits for open requests.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    options: ListenOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let registry =
        Arc::new(Registry { conns: Mutex::new(BTreeMap::new()), ended: Notify::new(), started: Instant::now() });
    let (stop_tx, stop_rx) = watch::channel(false);
    let tls = options.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let options = Arc::new(options);
    let mut shutdown = pin!(shutdown);
    let mut next_id: u64 = 0;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut shutdown => return finish(&registry, stop_tx).await,
        };
        let tcp = match accepted {
            Ok((tcp, _peer)) => tcp,
            Err(e) => {
                // Out of descriptors (EMFILE/ENFILE) or a connection reset before accept:
                // make room if we can, and do not spin.
                if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                    registry.evict_idle();
                }
                tracing::debug!(error = %e, "accepting a connection");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // At the bound: make room for this connection by closing an idle one (or an event
        // stream), or wait for one to end. Room is made on demand, for a connection that is
        // here: made ahead, it would go to the newest connection, idle only because its first
        // request has not been read yet.
        while registry.len() >= options.max_connections.max(1) && !registry.evict_idle() {
            let ended = registry.ended.notified();
            tokio::select! {
                _ = ended => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = &mut shutdown => return finish(&registry, stop_tx).await,
            }
        }
        // Without TCP_NODELAY a response written in two pieces (HTTP/2 headers, then a body of
        // a few KB such as a log tail) waits for the client's delayed ACK: ~40 ms, not ~0.1.
        let _ = tcp.set_nodelay(true);
        next_id += 1;
        let conn = Arc::new(Conn {
            busy: AtomicUsize::new(0),
            streams: AtomicUsize::new(0),
            last_active_ms: AtomicU64::new(registry.now_ms()),
            evict: Notify::new(),
        });
        registry.conns.lock().unwrap_or_else(|p| p.into_inner()).insert(next_id, conn.clone());
        let registered = Registered { registry: registry.clone(), id: next_id };
        tokio::spawn(serve_connection(
            tcp,
            tls.clone(),
            app.clone(),
            options.clone(),
            conn,
            registered,
            stop_rx.clone(),
        ));
    }
}

/// Stops every connection gracefully and waits until all have ended.
async fn finish(registry: &Arc<Registry>, stop: watch::Sender<bool>) -> io::Result<()> {
    stop.send_replace(true);
    while registry.len() > 0 {
        let ended = registry.ended.notified();
        tokio::select! {
            _ = ended => {}
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    Ok(())
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: Router,
    options: Arc<ListenOptions>,
    conn: Arc<Conn>,
    registered: Registered,
    mut stop: watch::Receiver<bool>,
) {
    let registry = registered.registry.clone();
    let io = match tls {
        None => tokio_util::either::Either::Left(tcp),
        Some(acceptor) => {
            let handshake = acceptor.accept(tcp);
            tokio::select! {
                done = tokio::time::timeout(options.read_timeout, handshake) => match done {
                    Ok(Ok(stream)) => tokio_util::either::Either::Right(stream),
                    // A failed or slow handshake (a plain-HTTP client, a bad client certificate).
                    _ => return,
                },
                _ = conn.evict.notified() => return,
            }
        }
    };
    let service = {
        let conn = conn.clone();
        let registry = registry.clone();
        let read_timeout = crate::connect::ReadTimeout(options.read_timeout);
        hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(read_timeout);
            let guard = Busy::start(conn.clone(), registry.clone());
            let app = app.clone();
            let body_timeout = read_timeout.0;
            async move {
                let req = req.map(|b| Body::new(TimedBody::new(b, body_timeout)));
                let resp = app.oneshot(req).await.unwrap_or_else(|never| match never {});
                let guard = if is_event_stream(&resp) { guard.into_stream() } else { guard };
                Ok::<_, std::convert::Infallible>(resp.map(|body| Body::new(TrackedBody { body, _busy: guard })))
            }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(options.read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let connection = builder.serve_connection(TokioIo::new(io), service);
    let mut connection = pin!(connection);
    let mut closing = false;
    loop {
        let idle_for =
            Duration::from_millis(registry.now_ms().saturating_sub(conn.last_active_ms.load(Ordering::Acquire)));
        let idle_left = options.read_timeout.saturating_sub(idle_for);
        tokio::select! {
            _ = connection.as_mut() => break,
            _ = conn.evict.notified() => break,
            _ = tokio::time::sleep(idle_left), if !closing => {
                let idle = Duration::from_millis(registry.now_ms().saturating_sub(conn.last_active_ms.load(Ordering::Acquire)));
                let quiet = conn.busy.load(Ordering::Acquire) == 0 && conn.streams.load(Ordering::Acquire) == 0;
                if quiet && idle >= options.read_timeout {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
            _ = stop.changed(), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            // A connection asked to close that does not within the read timeout is dropped.
            _ = tokio::time::sleep(options.read_timeout), if closing => break,
        }
    }
    drop(registered);
}

/// Marks its connection busy from the request's start to its response's end (or, for an
/// event stream, streaming until the stream ends).
struct Busy {
    conn: Arc<Conn>,
    registry: Arc<Registry>,
    stream: bool,
}

impl Busy {
    fn start(conn: Arc<Conn>, registry: Arc<Registry>) -> Busy {
        conn.busy.fetch_add(1, Ordering::AcqRel);
        conn.last_active_ms.store(registry.now_ms(), Ordering::Release);
        Busy { conn, registry, stream: false }
    }

    /// The response is an event stream: its connection may be closed at the bound.
    fn into_stream(mut self) -> Busy {
        self.conn.streams.fetch_add(1, Ordering::AcqRel);
        self.conn.busy.fetch_sub(1, Ordering::AcqRel);
        self.stream = true;
        self
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.conn.last_active_ms.store(self.registry.now_ms(), Ordering::Release);
        let count = if self.stream { &self.conn.streams } else { &self.conn.busy };
        count.fetch_sub(1, Ordering::AcqRel);
    }
}

fn is_event_stream<B>(resp: &hyper::Response<B>) -> bool {
    resp.headers().get(hyper::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

/// A request body that fails when no frame arrives for `timeout`: a client cannot keep a
/// request (and its connection) in flight by never sending the body it announced.
struct TimedBody {
    body: Incoming,
    timeout: Duration,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl TimedBody {
    fn new(body: Incoming, timeout: Duration) -> TimedBody {
        TimedBody { body, timeout, timer: Box::pin(tokio::time::sleep(timeout)) }
    }
}

impl hyper::body::Body for TimedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match std::pin::Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = tokio::time::Instant::now() + self.timeout;
                self.timer.as_mut().reset(deadline);
                Poll::Ready(frame.map(|f| f.map_err(axum::Error::new)))
            }
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(axum::Error::new(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no byte of the request body within the read timeout",
                ))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A response body that keeps its connection busy until it is sent or dropped.
struct TrackedBody {
    body: Body,
    _busy: Busy,
}

impl hyper::body::Body for TrackedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
