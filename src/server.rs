//! One port for the worker: the WorkerService of [`crate::rpc`] (gRPC with reflection and
//! Connect, or the newest wire's Connect) and the pages of [`crate::web`], behind the access
//! gate, TLS and connection bounds. Above both, so neither names the other: the web's
//! middleware counts the WorkerService's calls for `/metrics`, and its event streams end when
//! the server shuts down.

#![warn(missing_docs)]

use std::future::Future;

use axum::Router;

use crate::proto::worker_service_server::WorkerServiceServer;
use crate::rpc::connect::connect_router;
use crate::rpc::newest::NewestService;
use crate::rpc::{ServeError, ServeOptions, WorkerServiceImpl, grpc_with_reflection, one_port, worker_router};

/// The whole router: gRPC with reflection, Connect, and the web pages of [`crate::web`], with
/// the web's middleware counting WorkerService calls for `/metrics`.
pub fn router(service: WorkerServiceImpl, web: &crate::web::Web) -> Result<Router, ServeError> {
    let limit = crate::rpc::connect::MAX_BODY as usize;
    let grpc_service = WorkerServiceServer::new(service.clone()).max_decoding_message_size(limit);
    let grpc = grpc_with_reflection(tonic::service::Routes::new(grpc_service))?;
    let http = worker_router(service.clone()).merge(web.router());
    Ok(web.track_rpcs(one_port(grpc, http)))
}

/// Serves `service` on `listener` until `shutdown` completes (then the web's event streams end,
/// so open dashboards do not hold the shutdown), with no token, no TLS and the default bounds.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: WorkerServiceImpl,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    serve_with(listener, service, ServeOptions::default(), shutdown).await
}

/// [`serve`] behind `options`' gate (token, Host check), TLS and connection bounds.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    service: WorkerServiceImpl,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let addr = listener.local_addr().map_err(|source| ServeError::Io { addr: ([0, 0, 0, 0], 0).into(), source })?;
    let web = crate::web::Web::new(service.manager().clone());
    let app = options.gate.protect(router(service, &web)?);
    serve_app(listener, addr, app, options.listen, web, shutdown).await
}

/// Serves the newest WorkerService (Connect) and the web pages on `listener` until `shutdown`,
/// behind `options`' gate, TLS and connection bounds. No gRPC: Iris's newest controller speaks
/// Connect only.
pub async fn serve_newest(
    listener: tokio::net::TcpListener,
    service: NewestService,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let addr = listener.local_addr().map_err(|source| ServeError::Io { addr: ([0, 0, 0, 0], 0).into(), source })?;
    let web = crate::web::Web::new(service.manager().clone());
    // `GET /health` answers as Iris's worker does (bootstrap scripts and load balancers read
    // it); everything else is the WorkerService and the pages.
    let health = || async { axum::Json(serde_json::json!({"status": "healthy"})) };
    let app = axum::Router::new()
        .route("/health", axum::routing::get(health))
        .fallback_service(connect_router(service).merge(web.router()));
    let app = options.gate.protect(web.track_rpcs(app));
    serve_app(listener, addr, app, options.listen, web, shutdown).await
}

/// Serves `app` on `listener` (at `addr`) until `shutdown` completes; then the web's event
/// streams end, so open dashboards do not hold the shutdown.
async fn serve_app(
    listener: tokio::net::TcpListener,
    addr: std::net::SocketAddr,
    app: Router,
    listen: crate::rpc::listen::ListenOptions,
    web: crate::web::Web,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let shutdown = async move {
        shutdown.await;
        web.close();
    };
    crate::rpc::listen::serve(listener, app, listen, shutdown).await.map_err(|source| ServeError::Io { addr, source })
}
