//! The dashboard, the JSON API and the Prometheus metrics, on the worker's one port (every
//! request that is not gRPC or Connect comes here).
//!
//! - [`pages`]: `/` (the task list) and `/task/<id>` (one task), with their assets
//!   (`/assets/…`, embedded in the binary);
//! - [`api`]: `/api/task/<id>`, `/api/logs/<id>`, `/api/stats/<id>`, `/api/worker`,
//!   `/health`, `/metrics`;
//! - [`iris`]: Iris's worker routes with Iris's shapes: `/api/stats`, `/api/tasks`,
//!   `/api/tasks/<id>`, `/api/tasks/<id>/logs`;
//! - [`sse`]: the live updates, `/api/events/tasks` and `/api/events/task/<id>`;
//! - [`snapshot`]: the list computed once a second for all viewers;
//! - [`metrics`]: the `/metrics` text and the RPC middleware that counts calls;
//! - [`cache`]: the caches and the disk: their metrics, and `/api/cache` for the dashboard;
//! - [`host`]: the host's CPU and memory for the list's header.
//!
//! Task ids contain `/`, so routes that take one end with it. Everything that comes from a
//! task is escaped: server-side with [`escape`], in the pages with `textContent`.

mod api;
mod host;
mod iris;
mod metrics;
mod pages;
mod snapshot;
mod sse;

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::routing::get;
use tokio::sync::watch;

pub use api::LOG_LINES_HEADER;
pub use metrics::{CACHES, Metrics, track_rpc};

use crate::task::TaskManager;

/// The web side of a worker. Cheap to clone.
#[derive(Clone)]
pub struct Web {
    inner: Arc<WebInner>,
}

struct WebInner {
    manager: TaskManager,
    metrics: Arc<Metrics>,
    host: host::HostSampler,
    /// The list's producer while anyone watches (see [`snapshot`]).
    snapshots: Mutex<Option<watch::Receiver<Arc<snapshot::Snapshot>>>>,
    /// Set when the server shuts down: event streams end.
    closing: watch::Sender<bool>,
}

impl Web {
    /// The web side over `manager`. Inside a tokio runtime it starts following the manager's
    /// events for the build and finished-task metrics.
    pub fn new(manager: TaskManager) -> Web {
        let metrics = Arc::new(Metrics::default());
        metrics.follow(&manager);
        Web {
            inner: Arc::new(WebInner {
                manager,
                metrics,
                host: host::HostSampler::default(),
                snapshots: Mutex::new(None),
                closing: watch::channel(false).0,
            }),
        }
    }

    /// Ends every event stream, now and from now on (the server is shutting down: a graceful
    /// shutdown waits for open responses, and an event stream never ends by itself).
    pub fn close(&self) {
        self.inner.closing.send_replace(true);
    }

    /// Completes once [`Web::close`] was called.
    fn closed(&self) -> impl std::future::Future<Output = ()> + Send + use<> {
        let mut rx = self.inner.closing.subscribe();
        async move {
            let _ = rx.wait_for(|closing| *closing).await;
        }
    }

    /// The figures behind `/metrics` (the RPC middleware records into them).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.inner.metrics.clone()
    }

    /// The pages, the API and the metrics.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/", get(pages::index))
            .route("/task/{*task_id}", get(pages::task))
            .route("/assets/{name}", get(pages::asset))
            .route("/health", get(|| async { "ok\n" }))
            .route("/metrics", get(api::metrics))
            .route("/api/stats", get(iris::stats))
            .route("/api/tasks", get(iris::tasks))
            .route("/api/tasks/{*rest}", get(iris::task_or_logs))
            .route("/api/task/{*task_id}", get(api::task))
            .route("/api/logs/{*task_id}", get(api::logs))
            .route("/api/stats/{*task_id}", get(api::stats))
            .route("/api/worker", get(api::worker_figures))
            .route("/api/cache", get(api::cache))
            .route("/api/events/tasks", get(sse::tasks))
            .route("/api/events/task/{*task_id}", get(sse::task))
            .with_state(self.clone())
    }

    /// `router` with the middleware that counts its WorkerService calls for `/metrics`.
    pub fn track_rpcs(&self, router: Router) -> Router {
        router.layer(axum::middleware::from_fn_with_state(self.metrics(), track_rpc))
    }
}

/// The web routes over `manager` (without RPC counting).
pub fn router(manager: TaskManager) -> Router {
    Web::new(manager).router()
}

pub use iris_wire::text::escape;
