//! One port for everything: gRPC (by Content-Type `application/grpc*`), Connect (POST with
//! `application/proto` or `application/json` on the service paths), and web pages — the
//! routing both the worker and the controller serve with.

use std::net::SocketAddr;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, header};
use tower::ServiceExt;

/// Errors of serving.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's #[error] text is its documentation
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
