//! Who may call a server of ours: the bearer token, the dashboard's token cookie, and the Host
//! check, as one middleware in front of every route of the port (gRPC, Connect, pages, API,
//! metrics).
//!
//! - With a token (`--auth-token-file`), a request passes only with `Authorization: Bearer
//!   <token>` (gRPC metadata `authorization`) or the dashboard's cookie; otherwise it gets
//!   UNAUTHENTICATED with no detail (gRPC status 16, or Connect's JSON error with HTTP 401).
//!   A browser gives the token once, `GET /?token=<token>`: the answer sets an HttpOnly,
//!   SameSite=Strict cookie and redirects to the same page without the token in its URL.
//!   The cookie is a session, not the token: browsers send a host's cookies to every port of
//!   it, so a web page a task serves on its own port receives it. So it is a random id this
//!   worker alone knows (in memory), it expires after [`SESSION_TTL`], and it opens the
//!   dashboard's read-only pages and API only (GET and HEAD of `/`, `/task/…`, `/assets/…`,
//!   `/api/…`, `/metrics`, `/health`), never an RPC (gRPC or Connect: RunTask, KillTask…).
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

use crate::connect::error_response;

/// The cookie that carries the dashboard's session.
pub const COOKIE: &str = "iris_worker_session";
/// How long a dashboard session lasts (a working day, as Grafana's default login).
pub const SESSION_TTL: std::time::Duration = std::time::Duration::from_secs(12 * 3600);
/// Sessions held at once; beyond it the one that expires first goes.
const MAX_SESSIONS: usize = 1024;

/// Errors of reading a token file.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's #[error] text is its documentation
pub enum AuthError {
    #[error("reading the token file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("the token file {0} holds no token")]
    Empty(String),
    #[error("the token in {0} is not a single line of visible ASCII")]
    Malformed(String),
}

/// A shared secret: what clients send and servers check. Its `Debug` shows nothing of it.
/// Clones share it: a token renewed ([`AuthToken::replace`]) is what every client holding a
/// clone sends from then on.
#[derive(Clone)]
pub struct AuthToken {
    current: Arc<std::sync::RwLock<Secret>>,
}

struct Secret {
    value: Arc<str>,
    digest: [u8; 32],
}

impl PartialEq for AuthToken {
    fn eq(&self, other: &AuthToken) -> bool {
        self.secret().digest == other.secret().digest
    }
}

impl Eq for AuthToken {}

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
        let secret = Secret { value: token.into(), digest: sha256(&[token.as_bytes()]) };
        Some(AuthToken { current: Arc::new(std::sync::RwLock::new(secret)) })
    }

    fn secret(&self) -> std::sync::RwLockReadGuard<'_, Secret> {
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The token itself, for clients to send.
    pub fn value(&self) -> Arc<str> {
        self.secret().value.clone()
    }

    /// `Bearer <token>`.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.secret().value)
    }

    /// Whether `presented` is the token, in time independent of both.
    pub fn matches(&self, presented: &[u8]) -> bool {
        bool::from(sha256(&[presented]).ct_eq(&self.secret().digest))
    }

    /// A copy of its own: a [`AuthToken::replace`] of either leaves the other as it is (what a
    /// server demands must not change when its client's credential is renewed).
    pub fn detached(&self) -> AuthToken {
        let secret = self.secret();
        let copy = Secret { value: secret.value.clone(), digest: secret.digest };
        AuthToken { current: Arc::new(std::sync::RwLock::new(copy)) }
    }

    /// Makes `token` the one this token and every clone of it sends (a renewed credential);
    /// `false`, changing nothing, when it is not a valid token.
    pub fn replace(&self, token: &str) -> bool {
        let Some(new) = AuthToken::new(token) else { return false };
        let secret = Secret { value: new.value(), digest: new.secret().digest };
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = secret;
        true
    }
}

/// The dashboard's sessions: digests of their random ids, with when each expires. Only the
/// digest is kept, so a lookup's timing says nothing about the ids.
#[derive(Debug, Default)]
pub struct Sessions {
    open: std::sync::Mutex<std::collections::HashMap<[u8; 32], std::time::Instant>>,
}

impl Sessions {
    /// A new session's id (32 random bytes, hex), valid for [`SESSION_TTL`].
    fn open(&self) -> Option<String> {
        let mut id = [0u8; 32];
        // SAFETY: getrandom fills at most the 32 bytes it is given.
        let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
        if n != id.len() as isize {
            return None;
        }
        let now = std::time::Instant::now();
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|_, expires| *expires > now);
        if open.len() >= MAX_SESSIONS
            && let Some(first) = open.iter().min_by_key(|(_, e)| **e).map(|(k, _)| *k)
        {
            open.remove(&first);
        }
        open.insert(sha256(&[&id]), now + SESSION_TTL);
        Some(hex::encode(id))
    }

    /// Whether `presented` is an open session.
    fn valid(&self, presented: &[u8]) -> bool {
        let Ok(id) = hex::decode(presented) else { return false };
        if id.len() != 32 {
            return false;
        }
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(&sha256(&[&id])).is_some_and(|expires| *expires > std::time::Instant::now())
    }
}

/// Whether a session may open `req`: the dashboard's read-only pages and API, never an RPC.
fn dashboard_read(req: &Request) -> bool {
    use axum::http::Method;
    let path = req.uri().path();
    (req.method() == Method::GET || req.method() == Method::HEAD)
        && !is_grpc(req.headers())
        && (path == "/"
            || path == "/metrics"
            || path == "/health"
            || ["/task/", "/assets/", "/api/"].iter().any(|p| path.starts_with(p)))
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

    /// Allows one more name (case and a trailing dot do not matter).
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
    /// The token every request must carry (a bearer header or the dashboard's cookie).
    pub token: Option<AuthToken>,
    /// The Host headers answered (DNS rebinding).
    pub hosts: AllowedHosts,
    /// The cookie is marked `Secure` (the port speaks TLS).
    pub tls: bool,
    /// The dashboard's sessions (shared by the clones of one server's gate).
    pub sessions: Arc<Sessions>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate { token: None, hosts: AllowedHosts::any(), tls: false, sessions: Arc::default() }
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
            || (dashboard_read(&req) && cookie(headers, COOKIE).is_some_and(|c| gate.sessions.valid(c)));
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
    let session = gate.sessions.open()?;
    let max_age = SESSION_TTL.as_secs();
    let cookie = format!("{COOKIE}={session}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}");
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
        let sessions = Sessions::default();
        let id = sessions.open().unwrap();
        assert!(sessions.valid(id.as_bytes()));
        assert_ne!(sessions.open().unwrap(), id, "random, not derived from the token");
        assert!(!sessions.valid(b"s3cret-token"));
        assert!(!Sessions::default().valid(id.as_bytes()), "known to the worker that opened it only");
        assert!(AuthToken::new("two words").is_none());
        assert!(AuthToken::new("").is_none());
    }

    #[test]
    fn a_replaced_token_is_what_every_clone_sends_but_not_a_detached_copy() {
        let t = AuthToken::new("old").unwrap();
        let (clone, copy) = (t.clone(), t.detached());
        assert!(t.replace("new"));
        assert_eq!((clone.bearer(), copy.bearer()), ("Bearer new".to_string(), "Bearer old".to_string()));
        assert!(clone.matches(b"new") && copy.matches(b"old") && !copy.matches(b"new"));
        assert!(!t.replace("not a token"), "refused, and nothing changed");
        assert_eq!(&*t.value(), "new");
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
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; iris_worker_session=ff; b=2"));
        assert_eq!(cookie(&h, COOKIE), Some(&b"ff"[..]));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
    }
}
