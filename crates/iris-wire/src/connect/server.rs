//! Connect services as axum routes on `/<package.Service>/<Method>`: any service (the
//! worker's WorkerService, the controller's ControllerService) that implements
//! [`ConnectService`].

use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Path, State};
use axum::http::{Request as HttpRequest, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use prost::Message;
use tonic::{Code, Request, Status};

use super::codec::{Codec, Generation, gunzip};
use super::{code_name, http_status};

/// Largest request body accepted (as sent, and after inflating): RunTask carries workdir
/// files. gRPC calls have the same bound.
pub const MAX_BODY: u64 = 64 << 20;

/// A service served over Connect: its full name and one call per method.
pub trait ConnectService: Clone + Send + Sync + 'static {
    /// The fully qualified service name, e.g. `iris.cluster.WorkerService`.
    const NAME: &'static str;
    /// Calls `method` with a request body in `codec`; returns the encoded response.
    fn call(&self, method: &str, codec: Codec, body: Vec<u8>) -> impl Future<Output = Result<Vec<u8>, Status>> + Send;
}

/// The Connect routes of a service.
pub fn connect_router<S: ConnectService>(service: S) -> Router {
    Router::new().route(&format!("/{}/{{method}}", S::NAME), post(handle::<S>)).with_state(service)
}

/// The outcome of a Connect call, put on its response as an extension (the RPC metrics of
/// `web/` count calls by code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallCode(pub Code);

/// A Connect error response.
pub fn error_response(status: &Status) -> Response {
    let body = serde_json::json!({ "code": code_name(status.code()), "message": status.message() });
    let http = StatusCode::from_u16(http_status(status.code())).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (http, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
    resp.extensions_mut().insert(CallCode(status.code()));
    resp
}

async fn handle<S: ConnectService>(
    State(svc): State<S>,
    Path(method): Path<String>,
    req: HttpRequest<Body>,
) -> Response {
    let (parts, body) = req.into_parts();
    let headers = &parts.headers;
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let Some(codec) = Codec::from_content_type(content_type) else {
        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, format!("unsupported content type {content_type:?}"))
            .into_response();
    };
    let read_timeout = parts.extensions.get::<ReadTimeout>().map(|t| t.0).unwrap_or(DEFAULT_BODY_TIMEOUT);
    let body = match read_body(body, read_timeout).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let body = match headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()) {
        None | Some("identity") => body.to_vec(),
        Some("gzip") => match gunzip(&body, MAX_BODY) {
            Ok(b) => b,
            Err(e) => return error_response(&Status::invalid_argument(e)),
        },
        Some(other) => {
            return error_response(&Status::unimplemented(format!("unsupported content encoding {other:?}")));
        }
    };
    let timeout = headers
        .get("connect-timeout-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis);
    let call = svc.call(&method, codec, body);
    let result = match timeout {
        Some(t) => tokio::time::timeout(t, call)
            .await
            .unwrap_or_else(|_| Err(Status::deadline_exceeded("the call's Connect-Timeout-Ms passed"))),
        None => call.await,
    };
    match result {
        Ok(bytes) => {
            let mut resp = ([(header::CONTENT_TYPE, codec.content_type())], Body::from(bytes)).into_response();
            resp.extensions_mut().insert(CallCode(Code::Ok));
            resp
        }
        Err(status) => error_response(&status),
    }
}

/// How long a request's body may take to arrive: put on each request by the server's accept
/// loop ([`crate::listen`]), from its read timeout.
#[derive(Debug, Clone, Copy)]
pub struct ReadTimeout(pub Duration);

/// The body's bound in time when the server set none.
const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether `e`, or an error it wraps, is a timeout.
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut) {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Reads a request body of at most [`MAX_BODY`] bytes within `timeout`. Too large is
/// RESOURCE_EXHAUSTED in Connect's error form (HTTP 413), too slow DEADLINE_EXCEEDED.
async fn read_body(body: Body, timeout: Duration) -> Result<Bytes, Response> {
    let too_large = || {
        let status = Status::resource_exhausted(format!("the request body is larger than {MAX_BODY} bytes"));
        let mut resp = error_response(&status);
        *resp.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
        resp
    };
    // A Content-Length over the bound is answered before a byte of the body is read.
    if body.size_hint().lower() > MAX_BODY {
        return Err(too_large());
    }
    let limited = http_body_util::Limited::new(body, MAX_BODY as usize);
    match tokio::time::timeout(timeout, http_body_util::BodyExt::collect(limited)).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        // The listener's own body timeout (`rpc::listen`) may be the first to see the silence.
        Ok(Err(e)) if timed_out(&*e) => Err(error_response(&Status::deadline_exceeded(format!(
            "the request body did not arrive within {timeout:?}"
        )))),
        Ok(Err(_)) => Err(error_response(&Status::invalid_argument("the request body could not be read"))),
        Err(_) => Err(error_response(&Status::deadline_exceeded(format!(
            "the request body did not arrive within {timeout:?}"
        )))),
    }
}

/// Decodes a request of `req_name`, runs `call` (a tonic service method) and encodes its
/// response as `resp_name`: a January-wire method over Connect.
pub async fn unary<Req, Resp, F, Fut>(
    codec: Codec,
    req_name: &str,
    resp_name: &str,
    body: &[u8],
    call: F,
) -> Result<Vec<u8>, Status>
where
    Req: Message + Default,
    Resp: Message,
    F: FnOnce(Request<Req>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    unary_in(Generation::January, codec, req_name, resp_name, body, |req| async move {
        call(Request::new(req)).await.map(tonic::Response::into_inner)
    })
    .await
}

/// Decodes a request of `req_name` with `generation`'s descriptors, runs `call` and encodes
/// its answer as `resp_name`.
pub async fn unary_in<Req, Resp, F, Fut>(
    generation: Generation,
    codec: Codec,
    req_name: &str,
    resp_name: &str,
    body: &[u8],
    call: F,
) -> Result<Vec<u8>, Status>
where
    Req: Message + Default,
    Resp: Message,
    F: FnOnce(Req) -> Fut,
    Fut: Future<Output = Result<Resp, Status>>,
{
    let req: Req = codec.decode_in(generation, req_name, body).map_err(Status::invalid_argument)?;
    let resp = call(req).await?;
    codec.encode_in(generation, resp_name, &resp).map_err(Status::internal)
}
