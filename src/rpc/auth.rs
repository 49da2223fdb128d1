//! Who may call a server of ours: the bearer token, the dashboard's token cookie, and the Host
//! check, as one middleware in front of every route of the port (gRPC, Connect, pages, API,
//! metrics).
//!
//! - With a token (`--auth-token-file`), a request passes only with `Authorization: Bearer
//!   <token>` (gRPC metadata `authorization`) or the dashboard's cookie; otherwise it gets
//!   UNAUTHENTICATED with no detail (gRPC status 16, or Connect's JSON error with HTTP 401).
//!   A browser gives the token once, `GET /?token=<token>`: the answer sets an HttpOnly,
//!   SameSite=Strict cookie and redirects to the same page without the token in its URL.
//! - A request no token authenticated must name, in its Host (HTTP/2: `:authority`), an IP
//!   address or one of the names this server answers to (localhost, the host's name, the
//!   advertised host, `--allowed-host`): a page on another name that resolves here (DNS
//!   rebinding) is refused with PERMISSION_DENIED. An IP literal cannot be rebound, so any is
//!   accepted.
//!
//! Tokens are compared in constant time (SHA-256 of both sides, then `subtle`), so neither
//! their content nor their length leaks through timing, and never logged.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Status;

use super::connect::error_response;

/// The cookie that carries the dashboard's proof of the token.
pub const COOKIE: &str = "iris_worker_token";

/// Errors of reading a token file.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("reading the token file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("the token file {0} holds no token")]
    Empty(String),
    #[error("the token in {0} is not a single line of visible ASCII")]
    Malformed(String),
}

/// A shared secret: what clients send and servers check. Its `Debug` shows nothing of it.
#[derive(Clone)]
pub struct AuthToken {
    value: Arc<str>,
    digest: [u8; 32],
    cookie_digest: [u8; 32],
}

impl std::fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthToken(<redacted>)")
    }
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

impl AuthToken {
    /// The token in `path`: its first line, without surrounding whitespace.
    pub fn read(path: &Path) -> Result<AuthToken, AuthError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read { path: name.clone(), source })?;
        let token = text.lines().next().unwrap_or("").trim();
        if token.is_empty() {
            return Err(AuthError::Empty(name));
        }
        AuthToken::new(token).ok_or(AuthError::Malformed(name))
    }

    /// A token from its text (visible ASCII: it travels in an HTTP header).
    pub fn new(token: &str) -> Option<AuthToken> {
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return None;
        }
        Some(AuthToken {
            value: token.into(),
            digest: sha256(&[token.as_bytes()]),
            cookie_digest: sha256(&[b"iris-worker dashboard cookie\0", token.as_bytes()]),
        })
    }

    /// The token itself, for clients to send.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// `Bearer <token>`.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.value)
    }

    /// Whether `presented` is the token, in time independent of both.
    pub fn matches(&self, presented: &[u8]) -> bool {
        bool::from(sha256(&[presented]).ct_eq(&self.digest))
    }

    /// The cookie's value: a digest of the token (the browser never holds the token itself).
    fn cookie_value(&self) -> String {
        hex::encode(self.cookie_digest)
    }

    fn cookie_matches(&self, presented: &[u8]) -> bool {
        let Ok(bytes) = hex::decode(presented) else { return false };
        bytes.len() == 32 && bool::from(bytes.ct_eq(&self.cookie_digest))
    }
}

/// The names a request's Host may carry when no token authenticated it.
#[derive(Debug, Clone, Default)]
pub struct AllowedHosts {
    names: BTreeSet<String>,
    any: bool,
}

impl AllowedHosts {
    /// `localhost`, this host's name, and `extra` (names or `*` for any).
    pub fn new<'a>(extra: impl IntoIterator<Item = &'a str>) -> AllowedHosts {
        let mut allowed = AllowedHosts::default();
        allowed.add("localhost");
        if let Ok(name) = nix::unistd::gethostname()
            && let Some(name) = name.to_str()
        {
            allowed.add(name);
        }
        for e in extra {
            allowed.add(e);
        }
        allowed
    }

    /// Any Host at all (the check is off).
    pub fn any() -> AllowedHosts {
        AllowedHosts { names: BTreeSet::new(), any: true }
    }

    pub fn add(&mut self, name: &str) {
        let name = name.trim().trim_end_matches('.').to_ascii_lowercase();
        if name == "*" {
            self.any = true;
        } else if !name.is_empty() {
            self.names.insert(strip_port(&name).to_string());
        }
    }

    /// Whether a request naming `host` (with or without a port) may pass.
    pub fn allows(&self, host: &str) -> bool {
        if self.any {
            return true;
        }
        let name = strip_port(host.trim()).trim_end_matches('.').to_ascii_lowercase();
        let bare = name.trim_start_matches('[').trim_end_matches(']');
        bare.parse::<std::net::IpAddr>().is_ok() || self.names.contains(&name)
    }
}

/// `host[:port]` or `[v6][:port]` → the host part.
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// The middleware's settings. Without a token and with every Host allowed it lets everything
/// through.
#[derive(Debug, Clone)]
pub struct Gate {
    pub token: Option<AuthToken>,
    pub hosts: AllowedHosts,
    /// The cookie is marked `Secure` (the port speaks TLS).
    pub tls: bool,
}

impl Default for Gate {
    fn default() -> Self {
        Gate { token: None, hosts: AllowedHosts::any(), tls: false }
    }
}

impl Gate {
    /// `router` behind this gate.
    pub fn protect(self, router: axum::Router) -> axum::Router {
        router.layer(axum::middleware::from_fn_with_state(Arc::new(self), gate))
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The answer to a refused request, in the caller's protocol.
fn refuse(grpc: bool, status: Status) -> Response {
    if grpc {
        let mut resp = status.into_http::<Body>();
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        return resp.into_response();
    }
    let unauthenticated = status.code() == tonic::Code::Unauthenticated;
    let mut resp = error_response(&status);
    if unauthenticated {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}

fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let v = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = v.split_at(v.iter().position(|b| *b == b' ')?);
    scheme.eq_ignore_ascii_case(b"bearer").then(|| rest.trim_ascii())
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers.get_all(header::COOKIE).iter().find_map(|v| {
        v.as_bytes().split(|b| *b == b';').find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|b| *b == b'=')?;
            (pair[..eq] == *name.as_bytes()).then(|| &pair[eq + 1..])
        })
    })
}

/// The request's host: HTTP/2's `:authority` (in the URI), else the Host header.
fn request_host(req: &Request) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str().to_string());
    }
    req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string)
}

async fn gate(State(gate): State<Arc<Gate>>, req: Request, next: Next) -> Response {
    let grpc = is_grpc(req.headers());
    if let Some(token) = &gate.token {
        let headers = req.headers();
        let authenticated = bearer(headers).is_some_and(|t| token.matches(t))
            || cookie(headers, COOKIE).is_some_and(|c| token.cookie_matches(c));
        if authenticated {
            return next.run(req).await;
        }
        if let Some(resp) = accept_token_once(&gate, token, &req) {
            return resp;
        }
        return refuse(grpc, Status::unauthenticated("authentication required"));
    }
    let host_ok = request_host(&req).is_some_and(|h| gate.hosts.allows(&h));
    if !host_ok {
        return refuse(
            grpc,
            Status::permission_denied("the request's Host is not a name this server answers to (see --allowed-host)"),
        );
    }
    next.run(req).await
}

/// `GET <page>?token=<token>`: sets the cookie and redirects to the page without the token.
fn accept_token_once(gate: &Gate, token: &AuthToken, req: &Request) -> Option<Response> {
    if req.method() != axum::http::Method::GET {
        return None;
    }
    let query = req.uri().query()?;
    let mut presented = None;
    let mut rest = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        if k == "token" {
            presented = Some(v.into_owned());
        } else {
            rest.append_pair(&k, &v);
        }
    }
    if !token.matches(presented?.as_bytes()) {
        return None;
    }
    let rest = rest.finish();
    let location = if rest.is_empty() { req.uri().path().to_string() } else { format!("{}?{rest}", req.uri().path()) };
    let secure = if gate.tls { "; Secure" } else { "" };
    let cookie = format!("{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict{secure}", token.cookie_value());
    let mut resp = StatusCode::SEE_OTHER.into_response();
    let headers = resp.headers_mut();
    headers.insert(header::LOCATION, HeaderValue::from_str(&location).ok()?);
    headers.insert(header::SET_COOKIE, HeaderValue::from_str(&cookie).ok()?);
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Some(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_themselves_and_hide_in_debug() {
        let t = AuthToken::new("s3cret-token").unwrap();
        assert!(t.matches(b"s3cret-token"));
        assert!(!t.matches(b"s3cret-tokeN"));
        assert!(!t.matches(b"s3cret"));
        assert!(!t.matches(b""));
        assert!(!format!("{t:?}").contains("s3cret"));
        assert!(t.cookie_matches(t.cookie_value().as_bytes()));
        assert!(!t.cookie_matches(b"s3cret-token"));
        assert!(AuthToken::new("two words").is_none());
        assert!(AuthToken::new("").is_none());
    }

    #[test]
    fn hosts_are_ips_or_names_we_answer_to() {
        let h = AllowedHosts::new(["worker-7.example", "Other.Example."]);
        for ok in ["127.0.0.1:8080", "[::1]:8080", "10.1.2.3", "localhost:8080", "worker-7.example:80", "other.example"]
        {
            assert!(h.allows(ok), "{ok}");
        }
        for bad in ["evil.example", "evil.example:8080", "localhost.evil.example", ""] {
            assert!(!h.allows(bad), "{bad}");
        }
        assert!(AllowedHosts::new(["*"]).allows("anything.example"));
    }

    #[test]
    fn bearer_and_cookie_are_parsed() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer  abc "));
        assert_eq!(bearer(&h), Some(&b"abc"[..]));
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; iris_worker_token=ff; b=2"));
        assert_eq!(cookie(&h, COOKIE), Some(&b"ff"[..]));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
    }
}
