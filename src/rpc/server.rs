//! The worker's one port: WorkerService over gRPC and Connect, and the web pages, on the
//! generic routing of [`iris_wire::server`].

use std::future::Future;

use axum::Router;
use iris_wire::server::{ServeError, grpc_with_reflection, one_port};

use super::connect_routes::worker_router;
use super::{ServeOptions, WorkerServiceImpl};
use crate::proto::worker_service_server::WorkerServiceServer;

/// The whole router: gRPC with reflection, Connect, and the web pages of [`crate::web`], with
/// the web's middleware counting WorkerService calls for `/metrics`.
pub fn router(service: WorkerServiceImpl, web: &crate::web::Web) -> Result<Router, ServeError> {
    let limit = iris_wire::connect::MAX_BODY as usize;
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
    let shutdown = async move {
        shutdown.await;
        web.close();
    };
    iris_wire::listen::serve(listener, app, options.listen, shutdown)
        .await
        .map_err(|source| ServeError::Io { addr, source })
}
