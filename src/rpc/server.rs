//! One port for everything: gRPC (by Content-Type `application/grpc*`), Connect (POST with
//! `application/proto` or `application/json` on the service paths), and the web pages.

use std::future::Future;
use std::net::SocketAddr;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, header};
use tower::ServiceExt;

use super::connect::worker_router;
use super::{ServeOptions, WorkerServiceImpl};
use crate::proto::worker_service_server::WorkerServiceServer;

/// Errors of serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("building gRPC reflection: {0}")]
    Reflection(String),
    #[error("serving on {addr}: {source}")]
    Io { addr: SocketAddr, source: std::io::Error },
}

/// gRPC routes with reflection (v1 and v1alpha) over cluster.proto added.
pub fn grpc_with_reflection(routes: tonic::service::Routes) -> Result<Router, ServeError> {
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    Ok(routes.add_service(reflection_v1).add_service(reflection_v1alpha).into_axum_router())
}

/// One router for one port: requests whose Content-Type is `application/grpc*` go to `grpc`,
/// everything else (Connect calls and pages) to `http`.
pub fn one_port(grpc: Router, http: Router) -> Router {
    Router::new().fallback_service(tower::service_fn(move |req: Request<Body>| {
        let is_grpc =
            req.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let target = if is_grpc { grpc.clone() } else { http.clone() };
        target.oneshot(req)
    }))
}

/// The whole router: gRPC with reflection, Connect, and the web pages of [`crate::web`], with
/// the web's middleware counting WorkerService calls for `/metrics`.
pub fn router(service: WorkerServiceImpl, web: &crate::web::Web) -> Result<Router, ServeError> {
    let limit = super::connect::MAX_BODY as usize;
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
    super::listen::serve(listener, app, options.listen, shutdown)
        .await
        .map_err(|source| ServeError::Io { addr, source })
}
