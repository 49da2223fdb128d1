//! Tasks cannot drive the worker (issue 14, section 1, and its security review): a task — in
//! a container or a plain process, on the host network — cannot connect to the worker's port on
//! 127.0.0.1, on any other loopback address, on 0.0.0.0, on the host's own addresses, through
//! IPv6 (`::1`, `::ffff:127.0.0.1`) or on another host (every worker listens on the same
//! port), nor bind that port on any address (not beside the worker on the other address
//! family, not while the worker is down), while its allocated port works and host processes
//! outside tasks still reach the worker. The hooks are on before a restarted worker runs any
//! task, stay while the worker is down and go with `iris-worker cleanup`; what HealthCheck
//! says is what a self-test saw (a detached hook, a full map are reported); where the host
//! cannot have it, the worker says so.

#[path = "common/cluster.rs"]
mod cluster_common;
mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Worker, exe, sh, state_of, wait_for};
use iris_worker::proto::{Empty, worker};
use iris_worker::task::TaskState;

const WITHIN: Duration = Duration::from_secs(60);
const HOOKS: [&str; 4] = ["iris_wk_conn4", "iris_wk_conn6", "iris_wk_bind4", "iris_wk_bind6"];

/// The host's addresses other than loopback ones (IPv4 and IPv6, link-local v6 left out:
/// it needs a scope id in a URL).
fn host_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    for a in nix::ifaddrs::getifaddrs().unwrap() {
        let Some(addr) = a.address else { continue };
        let ip = match (addr.as_sockaddr_in(), addr.as_sockaddr_in6()) {
            (Some(v4), _) => IpAddr::V4(v4.ip()),
            (_, Some(v6)) if (v6.ip().segments()[0] & 0xffc0) != 0xfe80 => IpAddr::V6(v6.ip()),
            _ => continue,
        };
        if !ip.is_loopback() && !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

fn url_host(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// GET `path` from `host:port` by hand (HTTP/1.0); the body, or the error.
fn http_get(host: &str, port: u16, path: &str) -> Result<String, String> {
    let addr = format!("{host}:{port}");
    let sock: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(3)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok(out.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

/// The tasks' parent cgroup in the cgroup2 tree (where the hook hangs), from the worker's
/// state directory.
fn hook_dir(w: &Worker) -> std::path::PathBuf {
    let parent = std::fs::read_to_string(w.state_dir().join("cgroup-parent")).unwrap();
    let layout = iris_worker::cgroup::Layout::detect().unwrap();
    layout.unified_dir(parent.trim()).unwrap().expect("this host has a cgroup2 tree")
}

async fn a_task_cannot_reach_the_worker(runtime: &str, busybox: &str) {
    let w = Worker::start_on(
        &format!("isolation-{runtime}"),
        "0.0.0.0",
        &["--runtime", runtime, "--port-range", "26210-26219"],
    )
    .await;
    let mut c = w.client().await;
    let health = c.health_check(Empty {}).await.unwrap().into_inner();
    assert!(
        health.task_isolation.starts_with(&format!("on: tasks cannot connect to port {}", w.port)),
        "HealthCheck says {:?}",
        health.task_isolation
    );
    assert!(w.logs().contains("task isolation on:"), "the worker says at start what tasks can reach:\n{}", w.logs());

    let mut targets: Vec<String> =
        ["127.0.0.1", "127.0.0.2", "0.0.0.0", "[::1]", "[::ffff:127.0.0.1]"].iter().map(|s| s.to_string()).collect();
    targets.extend(host_addresses().iter().map(url_host));
    let tries: String = targets
        .iter()
        .map(|t| {
            format!(
                "echo \"worker {t}: $({busybox} timeout 5 {busybox} wget -q -O - http://{t}:{port}/health 2>&1 | tr '\\n' ' ')\"\n",
                port = w.port
            )
        })
        .collect();
    // The task's own server is polled until it answers (10 s at most), not waited for.
    let script = format!(
        "mkdir -p /tmp/www && echo task-port-ok > /tmp/www/index.html\n\
         {busybox} httpd -f -p $IRIS_PORT_WEB -h /tmp/www &\n\
         i=0; until {busybox} wget -q -O /dev/null http://127.0.0.1:$IRIS_PORT_WEB/ 2>/dev/null; do \
           i=$((i+1)); [ $i -gt 200 ] && break; sleep 0.05; done\n\
         {tries}\
         echo \"bind: $({busybox} timeout 3 {busybox} nc -l -p {port} 2>&1)\"\n\
         echo \"bind v6: $({busybox} timeout 3 {busybox} httpd -f -p [::]:{port} -h /tmp/www 2>&1)\"\n\
         echo \"own port: $({busybox} timeout 5 {busybox} wget -q -O - http://127.0.0.1:$IRIS_PORT_WEB/ 2>&1)\"\n\
         echo tried\n\
         sleep 60\n",
        port = w.port
    );
    let id = format!("isolation-{runtime}/task-0");
    let mut req = sh(&id, &script);
    req.ports = vec!["web".into()];
    c.run_task(req).await.unwrap();
    let status = wait_for(&mut c, &id, WITHIN, |s| state_of(s) == TaskState::Running).await;
    let task_port = status.ports["web"] as u16;
    let deadline = Instant::now() + WITHIN;
    let log = loop {
        let lines: Vec<String> = common::all_logs(&mut c, &id).await.into_iter().map(|l| l.data).collect();
        if lines.iter().any(|l| l == "tried") {
            break lines;
        }
        assert!(Instant::now() < deadline, "the task did not finish its tries: {lines:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for t in &targets {
        let line = log.iter().find(|l| l.starts_with(&format!("worker {t}:"))).unwrap();
        // EPERM is the hook's answer; a refused or reached connection would be something else.
        assert!(line.contains("Operation not permitted"), "{runtime}: {line}\nwhole log: {log:#?}");
    }
    for what in ["bind:", "bind v6:"] {
        let line = log.iter().find(|l| l.starts_with(what)).unwrap();
        assert!(line.contains("Operation not permitted"), "{runtime}: {line}\nwhole log: {log:#?}");
    }
    assert!(log.iter().any(|l| l == "own port: task-port-ok"), "{runtime}: the task's own port works: {log:#?}");

    // Outside the task: the host reaches the worker on every address it listens on (0.0.0.0:
    // the IPv4 ones) and the task's port.
    let v4 = host_addresses().into_iter().filter(IpAddr::is_ipv4);
    for t in std::iter::once("127.0.0.1".to_string()).chain(v4.map(|ip| url_host(&ip))) {
        let body = http_get(&t, w.port, "/health").unwrap_or_else(|e| panic!("{t}: {e}"));
        assert_eq!(body.trim(), "ok", "the host reaches the worker on {t}");
    }
    assert_eq!(http_get("127.0.0.1", task_port, "/").unwrap().trim(), "task-port-ok");

    c.kill_task(worker::KillTaskRequest { task_id: id.clone(), term_timeout_ms: 100 }).await.unwrap();
    common::wait_end(&mut c, &id, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: containers, cgroups and a BPF connect hook"]
async fn a_container_task_cannot_connect_to_the_worker_on_any_local_address() {
    a_task_cannot_reach_the_worker("container", "/bin/busybox").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: plain processes in cgroups and a BPF connect hook"]
async fn a_process_task_cannot_connect_to_the_worker_on_any_local_address() {
    a_task_cannot_reach_the_worker("process", "/usr/bin/busybox").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: cgroups and a BPF connect hook"]
async fn the_hook_outlives_the_worker_and_goes_with_cleanup() {
    let mut w = Worker::start("isolation-cleanup", &[]).await;
    let dir = hook_dir(&w);
    let attached = iris_worker::isolation::attached(&dir).unwrap();
    assert_eq!(attached, HOOKS, "a connect and a bind hook per address family");

    // A restarted worker replaces the hooks rather than adding a second set.
    w.kill9();
    assert_eq!(iris_worker::isolation::attached(&dir).unwrap().len(), 4, "tasks stay fenced off while it is down");
    w.spawn().await;
    assert_eq!(iris_worker::isolation::attached(&dir).unwrap(), HOOKS);

    w.kill9();
    let out = Command::new(exe()).arg("cleanup").arg("--state-dir").arg(w.state_dir()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(iris_worker::isolation::attached(&dir).unwrap(), Vec::<String>::new(), "cleanup removed the hook");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: a worker in a mount namespace without cgroups"]
async fn a_host_without_the_hook_is_told_at_start_and_in_health_checks() {
    // Off by the operator's choice.
    let w = Worker::start("isolation-off", &["--task-isolation", "false"]).await;
    let h = w.client().await.health_check(Empty {}).await.unwrap().into_inner();
    assert!(h.task_isolation.starts_with("off"), "{:?}", h.task_isolation);
    drop(w);

    // Unavailable: a process-runtime worker that sees no cgroup filesystem (unmounted in its
    // own mount namespace) has nothing to hang the hook on.
    let state = tempfile::Builder::new().prefix("iris-worker-test-").tempdir().unwrap();
    let port = common::free_port();
    let log_path = state.path().join("worker.log");
    let script = format!(
        "umount -R -l /sys/fs/cgroup && exec {exe} serve --listen 127.0.0.1:{port} --state-dir {state} \
         --runtime process --worker-id {prefix}isolation-none-{pid} 2>{log}",
        exe = exe(),
        state = state.path().display(),
        prefix = common::TEST_PREFIX,
        pid = std::process::id(),
        log = log_path.display(),
    );
    let mut child =
        Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]).spawn().unwrap();
    let deadline = Instant::now() + WITHIN;
    let health = loop {
        if let Ok(mut c) =
            iris_worker::proto::worker_service_client::WorkerServiceClient::connect(format!("http://127.0.0.1:{port}"))
                .await
            && let Ok(h) = c.health_check(Empty {}).await
        {
            break h.into_inner();
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not start: {}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        health.task_isolation.starts_with("unavailable (tasks run without a cgroup"),
        "{:?}",
        health.task_isolation
    );
    let log = std::fs::read_to_string(&log_path).unwrap();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("task isolation")).collect();
    assert_eq!(lines.len(), 1, "one line says it: {log}");
    assert!(lines[0].contains("WARN") && lines[0].contains("--auth-token-file"), "{}", lines[0]);
    let _ = Command::new(exe()).arg("cleanup").arg("--state-dir").arg(state.path()).arg("--all").status();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: containers and a BPF connect hook"]
async fn the_local_controllers_port_is_fenced_off_only_when_asked() {
    // A stand-in for a controller on this host: the worker's heartbeats fail, which is fine
    // without a lease (with one, a worker runs only what its controller confirms).
    let controller = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = controller.local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    for (fenced, flag) in [(false, "false"), (true, "true")] {
        let w = Worker::start(
            &format!("isolation-controller-{flag}"),
            &["--controller", &url, "--heartbeat-interval", "5", "--lease", "0", "--isolate-controller", flag],
        )
        .await;
        let mut c = w.client().await;
        let id = format!("isolation-controller-{flag}/task-0");
        let script = format!("busybox timeout 3 busybox nc 127.0.0.1 {port} </dev/null; echo rc=$?");
        c.run_task(sh(&id, &script)).await.unwrap();
        common::wait_end(&mut c, &id, WITHIN).await;
        let log: Vec<String> = common::all_logs(&mut c, &id).await.into_iter().map(|l| l.data).collect();
        let refused = log.iter().any(|l| l.contains("Operation not permitted"));
        // Iris tasks reach the controller (IRIS_CONTROLLER_ADDRESS) for endpoints and child jobs.
        assert_eq!(refused, fenced, "--isolate-controller {flag}: {log:?}");
        let health = c.health_check(Empty {}).await.unwrap().into_inner();
        assert_eq!(health.task_isolation.contains(&port.to_string()), fenced, "{}", health.task_isolation);
    }
}

/// A Python program for the process runtime (the host's python3): tries `bind()` on
/// `[::]:PORT` alone (IPV6_V6ONLY, beside a worker on 0.0.0.0) and on `0.0.0.0:PORT`, each
/// `ROUNDS` times 50 ms apart, printing `<what> <errno name or "bound">` per try with a
/// sequence number.
const BINDER: &str = r#"
import errno, os, socket, sys, time
port, rounds = int(sys.argv[1]), int(sys.argv[2])
def attempt(fam, addr, v6only):
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        if v6only:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(addr)
        s.listen()
        return "bound"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    finally:
        s.close()
for i in range(rounds):
    print(i, "v6only", attempt(socket.AF_INET6, ("::", port), True), flush=True)
    print(i, "v4", attempt(socket.AF_INET, ("0.0.0.0", port), False), flush=True)
    time.sleep(0.05)
print("done", flush=True)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: plain processes in cgroups and BPF bind hooks"]
async fn a_task_cannot_take_the_workers_port_beside_it_nor_while_it_is_down() {
    // On 0.0.0.0, as workers listened before: IPv6 clients of `localhost` could be answered by
    // a task on [::]:PORT (IPV6_V6ONLY), and a task could take the port during a restart.
    let mut w = Worker::start_on("isolation-bind", "0.0.0.0", &["--runtime", "process"]).await;
    let port = w.port;
    let mut c = w.client().await;
    let id = "isolation-bind/task-0";
    c.run_task(common::task(id, &["/usr/bin/python3", "-c", BINDER, &port.to_string(), "400"])).await.unwrap();
    wait_for(&mut c, id, WITHIN, |s| state_of(s) == TaskState::Running).await;
    // Beside the running worker.
    let deadline = Instant::now() + WITHIN;
    let beside = loop {
        let lines: Vec<String> = common::all_logs(&mut c, id).await.into_iter().map(|l| l.data).collect();
        if lines.len() >= 4 {
            break lines;
        }
        assert!(Instant::now() < deadline, "the task printed nothing: {lines:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for line in &beside {
        assert!(line.ends_with(" EPERM"), "beside the worker: {line}\nwhole log: {beside:#?}");
    }

    // While the worker is down (killed, not cleaned up): the port is free, and still the
    // task's. The log is read from disk: no worker answers now.
    w.kill9();
    let killed_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let logs = w.state_dir().join("tasks").join(iris_worker::task::store::task_key(id, 0)).join("logs");
    let deadline = Instant::now() + WITHIN;
    let after: Vec<String> = loop {
        let filter = iris_worker::logs::LogFilter { start_ms: killed_ms, ..Default::default() };
        let lines: Vec<String> =
            iris_worker::logs::read(&logs, &filter).unwrap_or_default().into_iter().map(|l| l.data).collect();
        if lines.iter().filter(|l| l.contains(" v4 ")).count() >= 5 || lines.iter().any(|l| l == "done") {
            break lines;
        }
        assert!(Instant::now() < deadline, "the task printed nothing after the kill: {lines:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(after.iter().any(|l| l.contains(" v4 ")), "tries after the kill: {after:?}");
    for line in after.iter().filter(|l| *l != "done") {
        assert!(line.ends_with(" EPERM"), "while the worker is down: {line}\nafter the kill: {after:#?}");
    }
    w.spawn().await;
    let mut c = w.client().await;
    c.kill_task(worker::KillTaskRequest { task_id: id.into(), term_timeout_ms: 100 }).await.unwrap();
    common::wait_end(&mut c, id, WITHIN).await;
}

/// A web server on `addr` run by the test (busybox httpd), killed by pid on drop; `netns`
/// runs it in that network namespace.
struct Httpd {
    child: std::process::Child,
    _root: tempfile::TempDir,
}

impl Httpd {
    fn start(netns: Option<&str>, addr: &str, body: &str) -> Httpd {
        let root = tempfile::Builder::new().prefix("iris-worker-test-www-").tempdir().unwrap();
        std::fs::write(root.path().join("index.html"), body).unwrap();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg("/usr/bin/busybox");
                c
            }
            None => Command::new("/usr/bin/busybox"),
        };
        let child = cmd.args(["httpd", "-f", "-p", addr, "-h"]).arg(root.path()).spawn().unwrap();
        Httpd { child, _root: root }
    }
}

impl Drop for Httpd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: containers, a network namespace and BPF connect hooks"]
async fn a_task_cannot_reach_another_hosts_worker_on_the_shared_port() {
    // "Another host": a network namespace behind a veth pair, serving on the port every worker
    // of a cluster shares (this worker's), and on another port.
    let ns = cluster_common::Netns::create("i", 233);
    let mut w = Worker::start("isolation-remote", &[]).await;
    let other_port = common::free_port();
    let _worker_b = Httpd::start(Some(&ns.name), &format!("{}:{}", ns.ns_ip, w.port), "other-worker");
    let _service = Httpd::start(Some(&ns.name), &format!("{}:{other_port}", ns.ns_ip), "other-service");
    // Up, as seen from the host (outside the tasks).
    let deadline = Instant::now() + WITHIN;
    while http_get(&ns.ns_ip, w.port, "/").is_err() || http_get(&ns.ns_ip, other_port, "/").is_err() {
        assert!(Instant::now() < deadline, "the namespace's servers did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut c = w.client().await;
    let h = c.health_check(Empty {}).await.unwrap().into_inner();
    assert!(
        h.task_isolation.starts_with(&format!("on: tasks cannot connect to port {} on any address", w.port)),
        "{:?}",
        h.task_isolation
    );
    let script = format!(
        "echo \"worker: $(busybox timeout 5 busybox wget -q -O - http://{ip}:{port}/ 2>&1)\"\n\
         echo \"service: $(busybox timeout 5 busybox wget -q -O - http://{ip}:{other_port}/ 2>&1)\"\n",
        ip = ns.ns_ip,
        port = w.port
    );
    let run = |c: &mut common::Client, id: &'static str| {
        let mut c = c.clone();
        let script = script.clone();
        async move {
            c.run_task(sh(id, &script)).await.unwrap();
            common::wait_end(&mut c, id, WITHIN).await;
            common::all_logs(&mut c, id).await.into_iter().map(|l| l.data).collect::<Vec<String>>()
        }
    };
    let log = run(&mut c, "isolation-remote/task-0").await;
    assert!(
        log.iter().any(|l| l.starts_with("worker: ") && l.contains("Operation not permitted")),
        "the other host's worker port is refused: {log:?}"
    );
    assert!(log.iter().any(|l| l == "service: other-service"), "other ports there are not: {log:?}");

    // The documented opt-out: only this host's addresses.
    w.extra = vec!["--isolate-remote-workers".into(), "false".into()];
    w.kill9();
    w.spawn().await;
    let _worker_b2 = Httpd::start(Some(&ns.name), &format!("{}:{}", ns.ns_ip, w.port), "other-worker");
    let deadline = Instant::now() + WITHIN;
    while http_get(&ns.ns_ip, w.port, "/").is_err() {
        assert!(Instant::now() < deadline, "the namespace's server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut c = w.client().await;
    let h = c.health_check(Empty {}).await.unwrap().into_inner();
    assert!(h.task_isolation.contains("on this host's addresses"), "{:?}", h.task_isolation);
    let script = format!(
        "echo \"worker: $(busybox timeout 5 busybox wget -q -O - http://{ip}:{port}/ 2>&1)\"\n\
         echo \"here: $(busybox timeout 5 busybox wget -q -O - http://127.0.0.1:{port}/health 2>&1)\"\n",
        ip = ns.ns_ip,
        port = w.port
    );
    let id = "isolation-remote/task-1";
    c.run_task(sh(id, &script)).await.unwrap();
    common::wait_end(&mut c, id, WITHIN).await;
    let log: Vec<String> = common::all_logs(&mut c, id).await.into_iter().map(|l| l.data).collect();
    assert!(log.iter().any(|l| l == "worker: other-worker"), "opted out: {log:?}");
    assert!(log.iter().any(|l| l.starts_with("here: ") && l.contains("Operation not permitted")), "{log:?}");
}

/// Polls HealthCheck until its `task_isolation` passes `pred`; returns it.
async fn wait_isolation(c: &mut common::Client, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WITHIN;
    loop {
        let h = c.health_check(Empty {}).await.unwrap().into_inner();
        if pred(&h.task_isolation) {
            return h.task_isolation;
        }
        assert!(Instant::now() < deadline, "HealthCheck still says {:?}", h.task_isolation);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: cgroups and BPF hooks"]
async fn a_hook_that_stops_holding_is_reported_by_the_self_test() {
    let w = Worker::start("isolation-selftest", &["--isolation-check-interval", "0.5"]).await;
    let mut c = w.client().await;
    wait_isolation(&mut c, |s| s.starts_with("on:")).await;
    // What another program (or a process-runtime task, root on the host) could do.
    let removed = iris_worker::isolation::remove(&hook_dir(&w)).unwrap();
    assert_eq!(removed, 4);
    let said = wait_isolation(&mut c, |s| !s.starts_with("on:")).await;
    assert!(said.starts_with("failing (the self-test's process in the tasks' cgroup: connect to 127.0.0.1:"), "{said}");
    assert!(said.contains("was not refused") && said.contains("--auth-token-file"), "{said}");
    // The dashboard's figures say the same.
    let body = http_get("127.0.0.1", w.port, "/api/worker").unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert!(v["taskIsolation"].as_str().unwrap_or("").starts_with("failing"), "{v}");
    assert!(w.logs().contains("task isolation failing"), "logged when it changed:\n{}", w.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: a worker in a network namespace of its own, BPF hooks"]
async fn a_map_that_fills_up_is_reported_not_on() {
    // The worker in a namespace of its own, so the addresses it must fence off are the test's
    // to add; the hook's map holds 8192 entries per family.
    let ns = cluster_common::Netns::create("m", 234);
    let state = tempfile::Builder::new().prefix("iris-worker-test-").tempdir().unwrap();
    let port = common::free_port();
    let log_path = state.path().join("worker.log");
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name))
        .arg(exe())
        .args(["serve", "--listen", &format!("{}:{port}", ns.ns_ip)])
        .arg("--state-dir")
        .arg(state.path())
        .arg("--rootfs")
        .arg(common::rootfs())
        .args(["--worker-id", &format!("{}isolation-full-{}", common::TEST_PREFIX, std::process::id())])
        // Local addresses are in the map only for ports not refused everywhere.
        .args(["--isolate-remote-workers", "false", "--isolation-check-interval", "1"])
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    struct Cleanup<'a>(&'a mut std::process::Child, &'a std::path::Path);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            let _ = Command::new(exe()).arg("cleanup").arg("--state-dir").arg(self.1).arg("--all").status();
        }
    }
    let _cleanup = Cleanup(&mut child, state.path());
    let url = format!("http://{}:{port}", ns.ns_ip);
    let deadline = Instant::now() + WITHIN;
    let mut c = loop {
        if let Ok(mut c) = iris_worker::proto::worker_service_client::WorkerServiceClient::connect(url.clone()).await
            && c.health_check(Empty {}).await.is_ok()
        {
            break c;
        }
        assert!(Instant::now() < deadline, "no worker: {}", std::fs::read_to_string(&log_path).unwrap_or_default());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    wait_isolation(&mut c, |s| s.starts_with("on:")).await;
    // 8,300 more addresses on the namespace's loopback-free side: more than the map holds.
    let dev = {
        let out = Command::new("ip").args(["-n", &ns.name, "-o", "link", "show", "type", "veth"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.split(':').nth(1).unwrap().trim().split('@').next().unwrap().to_string()
    };
    let batch: String =
        (0..8300u32).map(|i| format!("addr add 10.99.{}.{}/32 dev {dev}\n", i / 250, i % 250 + 1)).collect();
    let mut ip =
        Command::new("ip").args(["-n", &ns.name, "-batch", "-"]).stdin(std::process::Stdio::piped()).spawn().unwrap();
    ip.stdin.take().unwrap().write_all(batch.as_bytes()).unwrap();
    assert!(ip.wait().unwrap().success());
    let said = wait_isolation(&mut c, |s| !s.starts_with("on:")).await;
    assert!(said.starts_with("failing (the hook's maps could not take every local address:"), "{said}");
    assert!(said.contains("8192 entries at most"), "{said}");
}

/// `iris-worker serve` on `port` over `w`'s state directory (the same worker id), its stderr
/// appended to `log`; killed by pid on drop.
struct Restarted(std::process::Child);

impl Restarted {
    fn spawn(w: &Worker, port: u16, log: &std::path::Path) -> Restarted {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = Command::new(exe())
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--state-dir")
            .arg(w.state_dir())
            .args(["--worker-id", &w.name])
            .arg("--rootfs")
            .arg(common::rootfs())
            .args(&w.extra)
            .stderr(log)
            .spawn()
            .unwrap();
        Restarted(child)
    }
}

impl Drop for Restarted {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: plain processes in cgroups, BPF hooks, a worker restarted on a taken port"]
async fn a_restarted_worker_fences_tasks_off_before_it_runs_any_or_binds_its_port() {
    let gate = tempfile::Builder::new().prefix("iris-worker-test-gate-").tempdir().unwrap();
    let release = gate.path().join("release");
    // One slot: task-0 holds it until the gate opens, task-1 waits (PENDING, its request on
    // disk) and, once it runs, tries the worker's port.
    let mut w = Worker::start("isolation-order", &["--runtime", "process", "--max-concurrent-tasks", "1"]).await;
    let port = w.port;
    let mut c = w.client().await;
    let hold = format!("until [ -e {} ]; do sleep 0.05; done", release.display());
    c.run_task(common::task("isolation-order/task-0", &["/bin/sh", "-c", &hold])).await.unwrap();
    wait_for(&mut c, "isolation-order/task-0", WITHIN, |s| state_of(s) == TaskState::Running).await;
    let probe = format!(
        "import errno, socket\ns = socket.socket()\nrc = s.connect_ex(('127.0.0.1', {port}))\n\
         print('connect:', errno.errorcode.get(rc, 'connected'), flush=True)\n"
    );
    c.run_task(common::task("isolation-order/task-1", &["/usr/bin/python3", "-c", &probe])).await.unwrap();
    assert_eq!(state_of(&common::status(&mut c, "isolation-order/task-1").await), TaskState::Pending);

    // A reboot, as far as the hooks go: the worker is gone and so are they. task-0 ends while
    // no worker runs, so the next one to start runs task-1 again at once.
    w.kill9();
    iris_worker::isolation::remove(&hook_dir(&w)).unwrap();
    std::fs::write(&release, b"").unwrap();
    let exit = w.state_dir().join("tasks").join(iris_worker::task::store::task_key("isolation-order/task-0", 0));
    let deadline = Instant::now() + WITHIN;
    while !exit.join(iris_worker::taskdir::EXIT).exists() {
        assert!(Instant::now() < deadline, "task-0 did not end");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Its port is taken by a host process: the restarted worker cannot bind it and exits.
    let log = w.state_dir().join("restarts.log");
    let taken = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let mut failed = Restarted::spawn(&w, port, &log);
    let deadline = Instant::now() + WITHIN;
    let code = loop {
        if let Some(code) = failed.0.try_wait().unwrap() {
            break code;
        }
        assert!(Instant::now() < deadline, "the worker started on a taken port");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!code.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains(&format!("listening on 127.0.0.1:{port}")), "{text}");
    // Yet the hooks were attached first: no task of this worker ran, or will run, without them.
    assert_eq!(
        iris_worker::isolation::attached(&hook_dir(&w)).unwrap(),
        HOOKS,
        "hooks attached before the port was bound:\n{text}"
    );

    // Once the port is free the worker starts; task-1 (run by the failed start, or now) never
    // reached the port.
    drop(taken);
    let _running = Restarted::spawn(&w, port, &log);
    let deadline = Instant::now() + WITHIN;
    let mut c = loop {
        if let Ok(mut c) =
            iris_worker::proto::worker_service_client::WorkerServiceClient::connect(format!("http://127.0.0.1:{port}"))
                .await
            && c.health_check(Empty {}).await.is_ok()
        {
            break c;
        }
        assert!(Instant::now() < deadline, "the worker did not restart: {}", std::fs::read_to_string(&log).unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    common::wait_end(&mut c, "isolation-order/task-1", WITHIN).await;
    let out: Vec<String> =
        common::all_logs(&mut c, "isolation-order/task-1").await.into_iter().map(|l| l.data).collect();
    assert_eq!(out, ["connect: EPERM"]);
}

#[test]
fn hybrid_hosts_with_kernels_before_5_15_are_reported_unavailable_with_the_reason() {
    use iris_worker::isolation::{IsolationError, IsolationStatus, hybrid_kernel_is_safe};
    assert!(!hybrid_kernel_is_safe("5.10.0-21-amd64"));
    assert!(!hybrid_kernel_is_safe("5.14.21"));
    assert!(hybrid_kernel_is_safe("5.15.0-91-generic"));
    assert!(hybrid_kernel_is_safe("6.1.0-13-amd64"));
    let status = IsolationStatus::Unavailable(IsolationError::OldHybridKernel("5.10.0-21-amd64".into()).to_string());
    let line = status.to_string();
    assert!(line.starts_with("unavailable (a hybrid cgroup v1/v2 host with kernel 5.10.0-21-amd64"), "{line}");
    assert!(line.contains("net_cls or net_prio") && line.contains("--auth-token-file"), "{line}");
}

/// The path of `pid`'s cgroup in the hierarchy that has `controller` (from the host's view).
fn cgroup_of(pid: i32, controller: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next()?, parts.next()?);
        controllers.split(',').any(|c| c == controller).then(|| path.to_string())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: a net_cls,net_prio hierarchy mounted in a mount namespace of the test's own"]
async fn tasks_are_never_placed_in_net_cls_or_net_prio() {
    // A hybrid host that mounts net_cls and net_prio (this one does not): the worker sees them
    // in a mount namespace of its own. The hierarchy is the kernel's one; everything made in
    // it below the worker's name is removed at the end.
    let mnt_parent = tempfile::Builder::new().prefix("iris-worker-test-netcls-").tempdir().unwrap();
    // libcgroups finds a v1 hierarchy by its mount point's name, as distributions mount it.
    let mnt = mnt_parent.path().join("net_cls,net_prio");
    std::fs::create_dir(&mnt).unwrap();
    let state = tempfile::Builder::new().prefix("iris-worker-test-").tempdir().unwrap();
    let name = format!("{}netcls-{}", common::TEST_PREFIX, std::process::id());
    let port = common::free_port();
    let mount = format!("mount -t cgroup -o net_cls,net_prio iris-worker-test {}", mnt.display());
    let log_path = state.path().join("worker.log");
    let script = format!(
        "{mount} && exec {exe} serve --listen 127.0.0.1:{port} --state-dir {state} --rootfs {rootfs} --worker-id {name} \
         2>{log}",
        exe = exe(),
        state = state.path().display(),
        rootfs = common::rootfs().display(),
        log = log_path.display(),
    );
    let mut child =
        Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]).spawn().unwrap();
    struct Cleanup {
        child: std::process::Child,
        state: std::path::PathBuf,
        mnt: std::path::PathBuf,
        name: String,
    }
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = Command::new(exe()).arg("cleanup").arg("--state-dir").arg(&self.state).arg("--all").status();
            // Whatever the worker's tasks left in the hierarchy (nothing, unless they were put
            // there), deepest first, then the mount goes with the namespace.
            let m = self.mnt.display();
            let sweep = format!(
                "mount -t cgroup -o net_cls,net_prio iris-worker-test {m} && \
                 find {m} -mindepth 1 -depth -type d -path '*{name}*' -exec rmdir {{}} \\; ; \
                 find {m} -mindepth 1 -depth -type d -name iris-worker -empty -exec rmdir {{}} \\; ; umount {m}",
                name = self.name
            );
            let _ = Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &sweep]).status();
        }
    }
    let _cleanup = Cleanup {
        child: std::mem::replace(&mut child, Command::new("true").spawn().unwrap()),
        state: state.path().to_path_buf(),
        mnt: mnt.clone(),
        name: name.clone(),
    };
    let _ = child.wait();
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + WITHIN;
    let mut c = loop {
        if let Ok(mut c) = iris_worker::proto::worker_service_client::WorkerServiceClient::connect(url.clone()).await
            && c.health_check(Empty {}).await.is_ok()
        {
            break c;
        }
        assert!(Instant::now() < deadline, "no worker: {}", std::fs::read_to_string(&log_path).unwrap_or_default());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let marker = format!("{}", 7_000_000 + std::process::id() % 1_000_000);
    let id = "netcls/task-0";
    c.run_task(sh(id, &format!("exec sleep {marker}"))).await.unwrap();
    wait_for(&mut c, id, WITHIN, |s| state_of(s) == TaskState::Running).await;
    let pid = loop {
        if let Some((pid, _)) = common::processes_with(&format!("sleep {marker}")).first() {
            break *pid;
        }
        assert!(Instant::now() < deadline, "the task's process did not show");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let memory = cgroup_of(pid, "memory").unwrap();
    assert!(memory.contains(&name), "the task has its own memory cgroup: {memory}");
    for controller in ["net_cls", "net_prio"] {
        let path = cgroup_of(pid, controller).expect("the hierarchy is mounted");
        assert_eq!(path, "/", "the task was put into a {controller} cgroup of its own");
    }
    c.kill_task(worker::KillTaskRequest { task_id: id.into(), term_timeout_ms: 100 }).await.unwrap();
    common::wait_end(&mut c, id, WITHIN).await;
}

#[test]
fn a_port_range_holding_the_workers_own_port_is_refused_at_start() {
    // A task handed the worker's port would hold it while the worker restarts.
    let state = tempfile::Builder::new().prefix("iris-worker-test-").tempdir().unwrap();
    let mut child = Command::new(exe())
        .args(["serve", "--listen", "127.0.0.1:30005", "--port-range", "30000-30010", "--task-isolation", "false"])
        .arg("--state-dir")
        .arg(state.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Refused as the settings are read, in milliseconds; a worker still running after this
    // started.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let _ = Command::new(exe()).arg("cleanup").arg("--state-dir").arg(state.path()).arg("--all").status();
            panic!("the worker started with its own port in --port-range");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("contains the listen port 30005"), "{err}");
}
