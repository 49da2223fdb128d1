//! Who can reach the worker (issue 14, section 1): with `--auth-token-file` every request —
//! gRPC, Connect, pages, API, metrics — needs the token (the dashboard takes it once and keeps
//! a cookie); TLS and mTLS on the same port; a Host check against DNS rebinding; the warning
//! for an open port; and the clients of this crate (CLI verbs, the worker's calls to the
//! controller, the controller's calls to workers) present the token and certificates.

mod common;
#[path = "common/server.rs"]
mod server;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::exe;
use iris_worker::proto::Empty;
use iris_worker::proto::worker_service_client::WorkerServiceClient;
use server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "iwtest-token-5b1f0c2e9a";

/// A raw HTTP/1.1 exchange: (status, headers, body).
fn http(port: u16, request: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    split_response(&out)
}

fn split_response(out: &str) -> (u16, String, String) {
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((out, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

fn get(port: u16, path: &str, host: &str, extra_headers: &str) -> (u16, String, String) {
    http(port, &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra_headers}\r\n"))
}

/// A Connect JSON call (HealthCheck) with `extra_headers`.
fn connect_health(port: u16, extra_headers: &str) -> (u16, String, String) {
    http(
        port,
        &format!(
            "POST /iris.cluster.WorkerService/HealthCheck HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
             Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n{extra_headers}\r\n{{}}"
        ),
    )
}

fn token_file(dir: &Path) -> PathBuf {
    let f = dir.join("token");
    std::fs::write(&f, format!("{TOKEN}\n")).unwrap();
    f
}

async fn grpc_health(port: u16, token: Option<&str>) -> Result<(), tonic::Status> {
    let mut c = WorkerServiceClient::connect(format!("http://127.0.0.1:{port}")).await.unwrap();
    let mut req = tonic::Request::new(Empty {});
    if let Some(t) = token {
        req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    c.health_check(req).await.map(|_| ())
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(exe()).args(args).env_remove("IRIS_AUTH_TOKEN_FILE").output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: a worker with a token"]
async fn with_a_token_every_request_needs_it_and_the_dashboard_takes_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let tf = token_file(dir.path());
    let w = Server::start(true, "token", "127.0.0.1", &["--auth-token-file", tf.to_str().unwrap()]).await;
    let port = w.port;
    let host = format!("127.0.0.1:{port}");

    // gRPC: UNAUTHENTICATED without the token or with another, fine with it.
    assert_eq!(grpc_health(port, None).await.unwrap_err().code(), tonic::Code::Unauthenticated);
    assert_eq!(grpc_health(port, Some("wrong")).await.unwrap_err().code(), tonic::Code::Unauthenticated);
    grpc_health(port, Some(TOKEN)).await.unwrap();

    // Connect: Connect's JSON error, HTTP 401, no detail.
    let (status, _, body) = connect_health(port, "");
    assert_eq!(status, 401, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["code"], "unauthenticated");
    assert_eq!(v["message"], "authentication required");
    assert_eq!(connect_health(port, "Authorization: Bearer nope\r\n").0, 401);
    let (status, _, body) = connect_health(port, &format!("Authorization: Bearer {TOKEN}\r\n"));
    assert_eq!(status, 200, "{body}");

    // Pages, API, metrics, health: all behind the token.
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    for (path, with_token) in [
        ("/", 200),
        ("/task/x/task-0", 404),
        ("/api/tasks", 200),
        ("/api/worker", 200),
        ("/metrics", 200),
        ("/health", 200),
        ("/assets/style.css", 200),
    ] {
        assert_eq!(get(port, path, &host, "").0, 401, "{path} without the token");
        assert_eq!(get(port, path, &host, &auth).0, with_token, "{path} with the token");
    }

    // The dashboard: /?token= sets a cookie and sends the browser on without the token.
    assert_eq!(get(port, "/?token=wrong", &host, "").0, 401);
    let (status, head, _) = get(port, "/task/j/task-0?token=iwtest-token-5b1f0c2e9a&x=1", &host, "");
    assert_eq!(status, 303, "{head}");
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.split_once(": ").filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.to_string()))
            .unwrap_or_default()
    };
    assert_eq!(header("location"), "/task/j/task-0?x=1");
    let cookie = header("set-cookie");
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    assert!(!cookie.contains(TOKEN), "the cookie holds a session, not the token: {cookie}");
    assert!(cookie.contains("Max-Age=43200"), "a session expires: {cookie}");
    let pair = cookie.split(';').next().unwrap();
    // A session is random: a second login gets another (the cookie is no stand-in for the
    // token, the same on every worker, forever).
    let (_, again, _) = get(port, "/?token=iwtest-token-5b1f0c2e9a", &host, "");
    let again = again.lines().find(|l| l.to_ascii_lowercase().starts_with("set-cookie:")).unwrap_or_default();
    assert!(!again.contains(pair), "{again} vs {pair}");
    // Browsers send it to every port of the host, a task's web page included: it opens the
    // dashboard's read-only pages, never an RPC.
    let (status, _, body) = connect_health(port, &format!("Cookie: {pair}\r\n"));
    assert_eq!(status, 401, "an RPC with the dashboard's cookie: {body}");
    for path in ["/", "/api/worker", "/api/events/tasks"] {
        let (status, _, _) = if path.contains("events") {
            // An event stream never ends: read its head only.
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nCookie: {pair}\r\n\r\n").unwrap();
            let mut buf = [0u8; 512];
            let n = s.read(&mut buf).unwrap();
            split_response(&String::from_utf8_lossy(&buf[..n]))
        } else {
            get(port, path, &host, &format!("Cookie: {pair}\r\n"))
        };
        assert_eq!(status, 200, "{path} with the cookie");
    }
    assert_eq!(get(port, "/", &host, "Cookie: iris_worker_session=00ff\r\n").0, 401);
    let forged = format!("Cookie: iris_worker_session={}\r\n", "ab".repeat(32));
    assert_eq!(get(port, "/api/tasks", &host, &forged).0, 401);

    // The CLI presents the token from --auth-token-file (or IRIS_AUTH_TOKEN_FILE).
    let addr = format!("--addr={host}");
    let out = cli(&["task", "list", &addr]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unauthenticated"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&["task", "list", &addr, "--auth-token-file", tf.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(exe()).args(["task", "list", &addr]).env("IRIS_AUTH_TOKEN_FILE", &tf).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Never logged.
    assert!(!w.log().contains(TOKEN), "{}", w.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: a worker"]
async fn pages_and_calls_naming_a_foreign_host_are_refused_unless_a_token_vouches() {
    let w = Server::start(true, "hosts", "127.0.0.1", &["--allowed-host", "worker-7.example"]).await;
    let port = w.port;
    for ok in [format!("127.0.0.1:{port}"), format!("localhost:{port}"), "worker-7.example".into(), "[::1]".into()] {
        assert_eq!(get(port, "/api/worker", &ok, "").0, 200, "Host {ok}");
    }
    // A name that resolves here but is not ours: what DNS rebinding looks like.
    let (status, _, body) = get(port, "/api/tasks", "rebind.evil.example", "");
    assert_eq!(status, 403, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["code"], "permission_denied");
    assert!(v["message"].as_str().unwrap().contains("--allowed-host"));
    let (status, _, _) = http(
        port,
        "POST /iris.cluster.WorkerService/ListTasks HTTP/1.1\r\nHost: rebind.evil.example\r\n\
         Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    );
    assert_eq!(status, 403, "Connect calls from a rebound page too");
    drop(w);

    // With a token, the token is what counts.
    let dir = tempfile::tempdir().unwrap();
    let tf = token_file(dir.path());
    let w = Server::start(true, "hosts-token", "127.0.0.1", &["--auth-token-file", tf.to_str().unwrap()]).await;
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    assert_eq!(get(w.port, "/api/worker", "rebind.evil.example", &auth).0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: workers"]
async fn an_open_port_without_token_or_mtls_is_warned_about_once() {
    let warning = "anyone who can reach this port can run tasks as root";
    let open = Server::start(true, "warn-open", "0.0.0.0", &[]).await;
    assert_eq!(open.log().matches(warning).count(), 1, "{}", open.log());
    drop(open);
    let local = Server::start(true, "warn-local", "127.0.0.1", &[]).await;
    assert_eq!(local.log().matches(warning).count(), 0, "{}", local.log());
    drop(local);
    let dir = tempfile::tempdir().unwrap();
    let tf = token_file(dir.path());
    let guarded = Server::start(true, "warn-token", "0.0.0.0", &["--auth-token-file", tf.to_str().unwrap()]).await;
    assert_eq!(guarded.log().matches(warning).count(), 0, "{}", guarded.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: a controller and a worker with a token"]
async fn the_controller_the_worker_and_the_cli_all_present_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let tf = token_file(dir.path());
    let t = tf.to_str().unwrap();
    let controller = Server::start(false, "c", "127.0.0.1", &["--auth-token-file", t, "--worker-timeout", "5"]).await;
    let url = format!("http://127.0.0.1:{}", controller.port);
    let worker = Server::start(
        true,
        "token-cluster",
        "127.0.0.1",
        &["--auth-token-file", t, "--controller", &url, "--heartbeat-interval", "0.3", "--advertise-host", "127.0.0.1"],
    )
    .await;
    let ctl = format!("--controller={url}");
    // Without the token the controller answers nothing.
    let out = cli(&["worker", "list", &ctl]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The worker registered with the token.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = cli(&["worker", "list", &ctl, "--auth-token-file", t]);
        if String::from_utf8_lossy(&out.stdout).contains("token-cluster") {
            break;
        }
        assert!(Instant::now() < deadline, "the worker never registered: {}\n{}", worker.log(), controller.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The controller's RunTask to the worker carries the token: the job runs and succeeds.
    let out = cli(&["job", "launch", &ctl, "--auth-token-file", t, "--wait", "--", "/bin/sh", "-c", "echo ran"]);
    assert!(
        out.status.success(),
        "{}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        worker.log()
    );
    assert!(!worker.log().contains(TOKEN) && !controller.log().contains(TOKEN));
}

/// A CA, a server certificate for 127.0.0.1 and localhost, a client certificate of the CA, and
/// a client certificate of another CA, made by openssl.
struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    fn make() -> Certs {
        let dir = tempfile::tempdir().unwrap();
        let script = r#"set -e
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
ca() { key $1.key; openssl req -x509 -new -key $1.key -out $1.pem -days 2 -subj "/CN=$1" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign; }
leaf() { # name ca ext
    key $1.key
    openssl req -new -key $1.key -out $1.csr -subj "/CN=$1"
    printf '%s\n' "$3" > $1.ext
    openssl x509 -req -in $1.csr -CA $2.pem -CAkey $2.key -CAcreateserial -out $1.pem -days 2 -extfile $1.ext 2>/dev/null
}
ca ca; ca rogue
leaf server ca "subjectAltName=IP:127.0.0.1,DNS:localhost
extendedKeyUsage=serverAuth,clientAuth"
leaf client ca "extendedKeyUsage=clientAuth"
leaf intruder rogue "extendedKeyUsage=clientAuth"
"#;
        let out = Command::new("sh").arg("-c").arg(script).current_dir(dir.path()).output().unwrap();
        assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
        Certs { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }
}

/// GET /health over TLS with `client` (a name for its cert and key, or none).
async fn tls_get(port: u16, certs: &Certs, client: Option<&str>) -> Result<String, String> {
    let files = iris_worker::rpc::tls::ClientTlsFiles {
        ca: Some(certs.path("ca.pem").into()),
        cert: client.map(|c| certs.path(&format!("{c}.pem")).into()),
        key: client.map(|c| certs.path(&format!("{c}.key")).into()),
    };
    let config = iris_worker::rpc::tls::client_config(&files, &[b"http/1.1"]).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
    tls.write_all(format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
    let (status, _, body) = split_response(&String::from_utf8_lossy(&out));
    if status == 200 { Ok(body) } else { Err(format!("HTTP {status}")) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: workers with TLS"]
async fn tls_and_mtls_serve_grpc_connect_and_pages_on_one_port() {
    let certs = Certs::make();
    let (cert, key, ca) = (certs.path("server.pem"), certs.path("server.key"), certs.path("ca.pem"));
    let w = Server::start(true, "tls", "127.0.0.1", &["--tls-cert", &cert, "--tls-key", &key]).await;
    let addr = format!("--addr=127.0.0.1:{}", w.port);
    // Pages over https; the CLI's gRPC over TLS with --tls-ca; plain HTTP gets nowhere.
    assert_eq!(tls_get(w.port, &certs, None).await.unwrap().trim(), "ok");
    let out = cli(&["task", "list", &addr, "--tls-ca", &ca]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!cli(&["task", "list", &addr]).status.success(), "plain HTTP/2 to a TLS port");
    // Connect over TLS through the crate's client.
    let security = iris_worker::rpc::ClientSecurity::new(
        None,
        &iris_worker::rpc::tls::ClientTlsFiles { ca: Some(ca.clone().into()), cert: None, key: None },
    )
    .unwrap();
    let connect = iris_worker::rpc::connect::ConnectClient::with_security(&format!("127.0.0.1:{}", w.port), &security);
    assert!(connect.base().starts_with("https://"));
    let h: iris_worker::proto::worker::HealthResponse =
        connect.call("iris.cluster.WorkerService", "HealthCheck", &Empty {}, Duration::from_secs(5)).await.unwrap();
    assert!(h.healthy);
    drop(w);

    // mTLS: a client certificate of the CA is required.
    let w =
        Server::start(true, "mtls", "0.0.0.0", &["--tls-cert", &cert, "--tls-key", &key, "--tls-client-ca", &ca]).await;
    assert!(!w.log().contains("anyone who can reach this port"), "mTLS counts as authentication: {}", w.log());
    assert!(tls_get(w.port, &certs, None).await.is_err(), "no client certificate");
    assert!(tls_get(w.port, &certs, Some("intruder")).await.is_err(), "a certificate of another CA");
    assert_eq!(tls_get(w.port, &certs, Some("client")).await.unwrap().trim(), "ok");
    let addr = format!("--addr=127.0.0.1:{}", w.port);
    let with_cert = ["--tls-ca", &ca, "--tls-cert", &certs.path("client.pem"), "--tls-key", &certs.path("client.key")];
    let out = cli(&[&["task", "list", &addr][..], &with_cert[..]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!cli(&["task", "list", &addr, "--tls-ca", &ca]).status.success(), "the CLI without its certificate");
}
