//! A Connect client (HTTP/1.1, application/proto): how the worker calls a controller, since
//! Iris controllers serve Connect over HTTP/1.1, and how our controller calls workers. It
//! speaks TLS for `https://` URLs (and bare addresses once TLS is configured) and sends the
//! configured token (see [`crate::ClientSecurity`]).

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prost::Message;
use tonic::Code;

use super::code_from_name;
use crate::ClientSecurity;

/// Errors of a Connect call.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's #[error] text is its documentation
pub enum ConnectError {
    #[error("invalid URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("calling {url}: {source}")]
    Transport { url: String, source: hyper_util::client::legacy::Error },
    #[error("calling {url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("reading the answer of {url}: {reason}")]
    Body { url: String, reason: String },
    /// The server answered with a Connect error.
    #[error("{url} answered {code:?}: {message}")]
    Status { url: String, code: Code, message: String },
}

/// The Connect code of an HTTP status that came without a Connect error body.
fn code_of_http(status: hyper::StatusCode) -> Code {
    match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

/// Calls unary Connect methods on one server.
#[derive(Clone)]
pub struct ConnectClient {
    base: String,
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// Sent with every call as `Bearer <token>` (read at each call: a renewed token is sent
    /// from the next call on).
    token: Option<crate::auth::AuthToken>,
    /// Request bodies go zstd-compressed (`Content-Encoding: zstd`): for servers known to take
    /// it (Iris's log service, whose own clients send so).
    zstd_requests: bool,
}

impl ConnectClient {
    /// A client for the server at `base` (e.g. `http://controller:10000`), plain HTTP, or
    /// TLS with the system's roots for `https://`, without a token.
    pub fn new(base: &str) -> ConnectClient {
        ConnectClient::with_security(base, &ClientSecurity::default())
    }

    /// A client for the server at `base` that presents `security`'s token and TLS settings.
    pub fn with_security(base: &str, security: &ClientSecurity) -> ConnectClient {
        let connector = HttpsConnector::from((http_connector(), security.tls_for(b"http/1.1")));
        ConnectClient {
            base: security.url(base),
            http: Client::builder(TokioExecutor::new()).build(connector),
            token: security.token.clone(),
            zstd_requests: false,
        }
    }

    /// This client with zstd-compressed request bodies.
    pub fn with_zstd_requests(mut self) -> ConnectClient {
        self.zstd_requests = true;
        self
    }

    /// The server's base URL the client calls.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Calls `/<service>/<method>` with `req`, waiting at most `timeout`.
    pub async fn call<Req: Message, Resp: Message + Default>(
        &self,
        service: &str,
        method: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, ConnectError> {
        let url = format!("{}/{service}/{method}", self.base);
        let mut request = hyper::Request::post(&url);
        if let Some(token) = &self.token {
            request = request.header("authorization", token.bearer());
        }
        let mut body = req.encode_to_vec();
        if self.zstd_requests {
            body = zstd::encode_all(body.as_slice(), 0)
                .map_err(|e| ConnectError::Url { url: url.clone(), reason: format!("compressing the request: {e}") })?;
            request = request.header("content-encoding", "zstd");
        }
        let request = request
            .header("content-type", "application/proto")
            .header("connect-protocol-version", "1")
            .header("connect-timeout-ms", timeout.as_millis().to_string())
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ConnectError::Url { url: url.clone(), reason: e.to_string() })?;
        let response = tokio::time::timeout(timeout, self.http.request(request))
            .await
            .map_err(|_| ConnectError::Timeout { url: url.clone(), timeout })?
            .map_err(|source| ConnectError::Transport { url: url.clone(), source })?;
        let status = response.status();
        let body = tokio::time::timeout(timeout, response.into_body().collect())
            .await
            .map_err(|_| ConnectError::Timeout { url: url.clone(), timeout })?
            .map_err(|e| ConnectError::Body { url: url.clone(), reason: e.to_string() })?
            .to_bytes();
        if !status.is_success() {
            let (code, message) = match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(v) => (
                    code_from_name(v["code"].as_str().unwrap_or("unknown")),
                    v["message"].as_str().unwrap_or("").to_string(),
                ),
                // Not a Connect error (a proxy, a server without the route): the code the
                // Connect protocol gives the HTTP status.
                Err(_) => (code_of_http(status), format!("HTTP {status}: {}", String::from_utf8_lossy(&body))),
            };
            return Err(ConnectError::Status { url, code, message });
        }
        Resp::decode(body.as_ref()).map_err(|e| ConnectError::Body { url, reason: e.to_string() })
    }
}

fn http_connector() -> HttpConnector {
    let mut http = HttpConnector::new();
    // https:// URLs go through the same connector (hyper-rustls wraps it).
    http.enforce_http(false);
    http.set_nodelay(true);
    http
}
