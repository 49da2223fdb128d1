//! Tasks of the newest Iris wire against a real worker (`serve --iris-wire newest`, driven over
//! Connect as Iris's controller drives it) running real containers:
//! - ExecInContainer: the command runs inside the task — its filesystem, pid, mount, ipc and
//!   uts namespaces, its cgroup, user, capabilities and seccomp filter, its environment and
//!   workdir — with Iris's answers for exit codes, stderr, timeouts, unknown tasks and an empty
//!   command; beside a process-runtime task, in its cgroup and workdir;
//! - container profiles: each one's capabilities, filter and network, read from the task's own
//!   /proc entries.

#[path = "common/elf.rs"]
mod elf;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use iris_worker::proto::newest::iris::cluster::worker::{
    self, AttemptSpec, DesiredAttempt, ExecInContainerRequest, ExecInContainerResponse, ReconcileRequest,
    ReconcileResponse, desired_attempt::Intent,
};
use iris_worker::proto::newest::iris::job::{self, CommandEntrypoint, RunTaskRequest, RuntimeEntrypoint};
use iris_worker::rpc::connect::ConnectClient;

const SERVICE: &str = "iris.cluster.WorkerService";

fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_iris-worker")
}

fn cache() -> PathBuf {
    std::env::var_os("IRIS_CACHE_DIR").map_or_else(|| PathBuf::from("/var/cache/iris-worker"), PathBuf::from)
}

/// A worker on the newest wire (Connect only, no controller), removed with everything it left
/// when dropped.
struct NewestWorker {
    id: String,
    state: tempfile::TempDir,
    _cache: tempfile::TempDir,
    ports: tempfile::TempDir,
    child: Option<Child>,
    client: ConnectClient,
}

impl NewestWorker {
    async fn start(name: &str, extra: &[&str]) -> NewestWorker {
        NewestWorker::start_with_path(name, extra, None).await
    }

    /// ... with `path` as the worker's PATH (where it looks for runsc).
    async fn start_with_path(name: &str, extra: &[&str], path: Option<&str>) -> NewestWorker {
        let state = tempfile::Builder::new().prefix("iris-worker-test-").tempdir().unwrap();
        let own_cache = tempfile::Builder::new().prefix("iris-worker-test-cache-").tempdir().unwrap();
        let ports = tempfile::Builder::new().prefix("iris-worker-test-ports-").tempdir().unwrap();
        let id = format!("iwtest-{name}-{}", std::process::id());
        let port = loop {
            let p = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            if p >= 40_000 {
                break p;
            }
        };
        let log = std::fs::File::create(state.path().join("worker.log")).unwrap();
        let rootfs = std::env::var_os("IRIS_TEST_ROOTFS").map_or_else(|| cache().join("rootfs/busybox"), PathBuf::from);
        let child = Command::new(exe())
            .args(["serve", "--iris-wire", "newest", "--listen", &format!("127.0.0.1:{port}"), "--worker-id", &id])
            .arg("--state-dir")
            .arg(state.path())
            .arg("--cache-dir")
            .arg(own_cache.path())
            .arg("--rootfs")
            .arg(rootfs)
            .arg("--python-rootfs")
            .arg(cache().join("rootfs/python"))
            .arg("--port-lock-dir")
            .arg(ports.path())
            .args([
                "--min-free-disk",
                "0",
                "--soft-free-disk",
                "0",
                "--target-free-disk",
                "0",
                "--min-free-inodes",
                "0",
            ])
            .args(extra)
            .envs(path.map(|p| ("PATH", p)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut w = NewestWorker {
            id,
            state,
            _cache: own_cache,
            ports,
            child: Some(child),
            client: ConnectClient::new(&format!("http://127.0.0.1:{port}")),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let health: Result<worker::HealthResponse, _> =
                w.client.call(SERVICE, "HealthCheck", &job::Empty {}, Duration::from_secs(2)).await;
            if health.is_ok() {
                return w;
            }
            assert!(Instant::now() < deadline, "the worker did not answer: {}", w.log());
            if let Some(Some(status)) = w.child.as_mut().map(|c| c.try_wait().ok().flatten()) {
                panic!("the worker exited {status}: {}", w.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.state.path().join("worker.log")).unwrap_or_default()
    }

    async fn reconcile(&self, desired: Vec<DesiredAttempt>) -> ReconcileResponse {
        let req = ReconcileRequest { worker_id: self.id.clone(), desired };
        self.client.call(SERVICE, "Reconcile", &req, Duration::from_secs(10)).await.unwrap()
    }

    async fn exec(&self, task_id: &str, command: &[&str], timeout_seconds: i32) -> ExecInContainerResponse {
        self.try_exec(task_id, command, timeout_seconds).await.unwrap()
    }

    async fn try_exec(
        &self,
        task_id: &str,
        command: &[&str],
        timeout_seconds: i32,
    ) -> Result<ExecInContainerResponse, iris_worker::rpc::connect::ConnectError> {
        let req = ExecInContainerRequest {
            task_id: task_id.into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            timeout_seconds,
        };
        self.client.call(SERVICE, "ExecInContainer", &req, Duration::from_secs(120)).await
    }

    /// Polls the task's status until it is RUNNING.
    async fn until_running(&self, task_id: &str) {
        self.until_state(task_id, job::TaskState::Running).await;
    }

    /// Polls the task's status until it is `state`; past a minute, fails with the last status
    /// seen and the worker's log (a task that never gets there says why).
    async fn until_state(&self, task_id: &str, state: job::TaskState) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = self.task_status(task_id).await;
            if status.state == state as i32 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for the task {state:?}; its last status: {status:?}; the worker's log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asks, as Iris's controller does, that the attempt `attempt_uid` be stopped (cancelled).
    async fn stop(&self, attempt_uid: &str) {
        self.reconcile(vec![DesiredAttempt {
            attempt_uid: attempt_uid.into(),
            intent: Some(Intent::Stop(worker::StopReason::Cancelled as i32)),
        }])
        .await;
    }

    async fn task_status(&self, task_id: &str) -> job::TaskStatus {
        let req = worker::GetTaskStatusRequest { task_id: task_id.into() };
        self.client.call(SERVICE, "GetTaskStatus", &req, Duration::from_secs(10)).await.unwrap()
    }
}

impl Drop for NewestWorker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new(exe())
            .arg("cleanup")
            .arg("--state-dir")
            .arg(self.state.path())
            .arg("--all")
            .arg("--port-lock-dir")
            .arg(self.ports.path())
            .stdout(Stdio::null())
            .status();
    }
}

fn run(uid: &str, task_id: &str, script: &str) -> DesiredAttempt {
    run_as(uid, task_id, script, job::ContainerProfile::Unspecified)
}

fn run_as(uid: &str, task_id: &str, script: &str, profile: job::ContainerProfile) -> DesiredAttempt {
    let request = RunTaskRequest {
        container_profile: profile as i32,
        task_id: task_id.into(),
        num_tasks: 1,
        attempt_uid: uid.into(),
        entrypoint: Some(RuntimeEntrypoint {
            run_command: Some(CommandEntrypoint { argv: vec!["bash".into(), "-c".into(), script.into()] }),
            ..Default::default()
        }),
        ..Default::default()
    };
    DesiredAttempt { attempt_uid: uid.into(), intent: Some(Intent::Run(AttemptSpec { request: Some(request) })) }
}

/// Host pids of processes whose command line is exactly `argv`.
fn pids_with_cmdline(argv: &[&str]) -> Vec<i32> {
    let want: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want) {
            out.push(pid);
        }
    }
    out
}

async fn poll<T>(what: &str, within: Duration, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn status_line(pid: i32, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines().find(|l| l.starts_with(key)).unwrap_or_default().to_string()
}

fn ns(pid: &str, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap().to_string_lossy().into_owned()
}

#[tokio::test]
#[ignore = "root: the task runs in a container with cgroups; the exec enters it"]
async fn exec_runs_inside_the_task_container() {
    let w = NewestWorker::start("exec", &[]).await;
    let task = "/test/exec/0";
    // A marker the task writes in its workdir, and a command line no other process has.
    let nap = "987.654";
    let resp = w
        .reconcile(vec![run("00000000000000e1", task, &format!("echo written-by-task > marker.txt; exec sleep {nap}"))])
        .await;
    assert_eq!(resp.observed.len(), 1, "{resp:?}");
    w.until_running(task).await;
    let task_pid =
        poll("the task's sleep", Duration::from_secs(30), async || pids_with_cmdline(&["sleep", nap]).pop()).await;

    // The task's filesystem, from its workdir: the file the task wrote.
    let r = poll("the marker file", Duration::from_secs(30), async || {
        let r = w.exec(task, &["cat", "marker.txt"], 0).await;
        (r.exit_code == 0).then_some(r)
    })
    .await;
    assert_eq!((r.stdout.as_str(), r.error.as_str()), ("written-by-task\n", ""), "{r:?}");
    let r = w.exec(task, &["pwd"], 0).await;
    assert_eq!(r.stdout, "/app\n", "the task's workdir: {r:?}");

    // Its pid namespace: pid 1 is the task's init, and the task's command is there.
    let r = w.exec(task, &["cat", "/proc/1/cmdline"], 0).await;
    assert_eq!(r.stdout.trim_end_matches('\0'), "iris-init", "{r:?}");
    let r = w.exec(task, &["bash", "-c", "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done"], 0).await;
    assert!(r.stdout.lines().any(|l| l.trim() == format!("sleep {nap}")), "the task's command among {:?}", r.stdout);
    // Every namespace the task has, and not the host's.
    let r = w.exec(task, &["bash", "-c", "for n in mnt pid ipc uts net; do readlink /proc/self/ns/$n; done"], 0).await;
    let seen: Vec<&str> = r.stdout.lines().collect();
    for (i, kind) in ["mnt", "pid", "ipc", "uts", "net"].iter().enumerate() {
        assert_eq!(seen.get(i).copied(), Some(ns(&task_pid.to_string(), kind).as_str()), "{kind}: {r:?}");
    }
    assert_ne!(seen[0], ns("self", "mnt"), "not the host's mount namespace");
    // The hooks that keep tasks off the worker's port hold for the exec too (it is in the
    // task's unified cgroup, where they are attached).
    let port = w.client.base().rsplit(':').next().unwrap().to_string();
    let r = w.exec(task, &["bash", "-c", &format!("exec 3<>/dev/tcp/127.0.0.1/{port}")], 0).await;
    assert!(r.exit_code != 0 && r.stderr.contains("Operation not permitted"), "the worker's port: {r:?}");
    // The task's environment.
    let r = w.exec(task, &["bash", "-c", "echo $IRIS_TASK_ID"], 0).await;
    assert_eq!(r.stdout, format!("{task}:0\n"));

    // The task's user, capabilities, no-new-privileges and seccomp filter.
    let r = w
        .exec(
            task,
            &["bash", "-c", "id -u; id -g; grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status"],
            0,
        )
        .await;
    let want: Vec<String> =
        ["CapEff:", "CapBnd:", "NoNewPrivs:", "Seccomp:"].iter().map(|k| status_line(task_pid, k)).collect();
    let mut lines = r.stdout.lines();
    assert_eq!((lines.next(), lines.next()), (Some("0"), Some("0")), "{r:?}");
    let got: Vec<String> = lines.map(str::to_string).collect();
    assert_eq!(got, want, "the task's credentials and filter");
    assert!(want[3].ends_with('2'), "the task runs under a seccomp filter: {want:?}");

    // The task's cgroup, in every hierarchy, while the exec runs.
    let long = "321.5";
    let sleep_argv = ["sleep", long];
    let pending = w.exec(task, &sleep_argv, 30);
    let check = async {
        let pid =
            poll("the exec'd sleep", Duration::from_secs(30), async || pids_with_cmdline(&["sleep", long]).pop()).await;
        let cgroups = |p: i32| std::fs::read_to_string(format!("/proc/{p}/cgroup")).unwrap();
        assert_eq!(cgroups(pid), cgroups(task_pid), "the exec is in the task's cgroups");
        let memory = cgroups(pid).lines().find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()));
        if let Some(path) = memory {
            let procs = std::fs::read_to_string(format!("/sys/fs/cgroup/memory{path}/cgroup.procs")).unwrap();
            assert!(procs.lines().any(|l| l == pid.to_string()), "{pid} in the task's cgroup.procs: {procs}");
        }
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    };
    let (r, ()) = tokio::join!(pending, check);
    assert_eq!(r.exit_code, 128 + 9, "killed by SIGKILL: {r:?}");

    // Exit codes and stderr.
    let r = w.exec(task, &["bash", "-c", "echo out; echo err >&2; exit 7"], 0).await;
    assert_eq!((r.exit_code, r.stdout.as_str(), r.stderr.as_str(), r.error.as_str()), (7, "out\n", "err\n", ""));
    let r = w.exec(task, &["no-such-command"], 0).await;
    assert_eq!(r.exit_code, 127, "{r:?}");
    assert!(r.stderr.contains("no-such-command"), "{r:?}");

    // A container a worker started before the OCI config moved into the container's bundle
    // (its supervisor outlived the upgrade) has the config in its task directory.
    let task_dir = std::fs::read_dir(w.state.path().join("tasks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir())
        .unwrap();
    let root = iris_worker::runtime::container::state_root(&task_dir);
    let (bundled, in_task_dir) = (root.join("config.json"), task_dir.join("config.json"));
    // libcontainer's record of the container names its bundle: the task directory, then.
    let state_json = root.join(task_dir.file_name().unwrap()).join("state.json");
    let state = std::fs::read_to_string(&state_json).unwrap();
    let old_state =
        state.replace(&format!("\"bundle\":\"{}\"", root.display()), &format!("\"bundle\":\"{}\"", task_dir.display()));
    assert_ne!(old_state, state, "the bundle in {state}");
    std::fs::write(&state_json, &old_state).unwrap();
    std::fs::copy(&bundled, &in_task_dir).unwrap();
    std::fs::remove_file(&bundled).unwrap();
    let r = w.exec(task, &["cat", "marker.txt"], 0).await;
    assert_eq!((r.stdout.as_str(), r.exit_code), ("written-by-task\n", 0), "an older layout's task: {r:?}");
    std::fs::copy(&in_task_dir, &bundled).unwrap();
    std::fs::remove_file(&in_task_dir).unwrap();
    std::fs::write(&state_json, &state).unwrap();

    // Output is capped at 1 MiB per stream, with a marker.
    let r = w.exec(task, &["bash", "-c", "head -c 3000000 /dev/zero | tr '\\0' a"], 0).await;
    assert_eq!(r.exit_code, 0);
    assert!(r.stdout.starts_with(&"a".repeat(1 << 20)), "{}", r.stdout.len());
    assert!(
        r.stdout.ends_with(
            "[iris-worker: 1951424 more bytes of output dropped: an exec returns at most 1 MiB per stream]\n"
        )
    );

    // A timeout kills the command and what it started.
    let started = Instant::now();
    let r = w.exec(task, &["bash", "-c", "sleep 555.1 & sleep 555.2; echo never"], 1).await;
    assert!(r.error.contains("did not finish within 1 s"), "{r:?}");
    assert_eq!(r.exit_code, 128 + 9, "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
    for nap in ["555.1", "555.2"] {
        poll("the timed-out session gone", Duration::from_secs(10), async || {
            pids_with_cmdline(&["sleep", nap]).is_empty().then_some(())
        })
        .await;
    }

    // Unknown task: HTTP 200, exit code 0, the error. Empty command: INVALID_ARGUMENT.
    let r = w.exec("/test/no-such/0", &["true"], 0).await;
    assert_eq!((r.exit_code, r.error.as_str()), (0, "Task /test/no-such/0 not found"), "{r:?}");
    match w.try_exec(task, &[], 0).await {
        Err(iris_worker::rpc::connect::ConnectError::Status { code, message, .. }) => {
            assert_eq!(code, tonic::Code::InvalidArgument, "{message}");
            assert!(message.contains("command"), "{message}");
        }
        other => panic!("an empty command: {other:?}"),
    }

    // A task that is no longer running.
    w.stop("00000000000000e1").await;
    w.until_state(task, job::TaskState::Killed).await;
    let r = w.exec(task, &["true"], 0).await;
    assert_eq!((r.exit_code, r.error.as_str()), (0, "Task /test/exec/0 is not running (state=TASK_STATE_KILLED)"));
}

#[tokio::test]
#[ignore = "root: the process runtime's task runs in its own cgroup; the exec joins it"]
async fn exec_beside_a_process_runtime_task_joins_its_cgroup_and_workdir() {
    let w = NewestWorker::start("exec-process", &["--runtime", "process"]).await;
    let task = "/test/exec-process/0";
    let nap = "987.655";
    w.reconcile(vec![run("00000000000000e2", task, &format!("echo written-by-task > marker.txt; exec sleep {nap}"))])
        .await;
    w.until_running(task).await;
    let task_pid =
        poll("the task's sleep", Duration::from_secs(30), async || pids_with_cmdline(&["sleep", nap]).pop()).await;
    let r = poll("the marker file", Duration::from_secs(30), async || {
        let r = w.exec(task, &["cat", "marker.txt"], 0).await;
        (r.exit_code == 0).then_some(r)
    })
    .await;
    assert_eq!(r.stdout, "written-by-task\n", "{r:?}");
    // Its workdir (a host path: the process runtime has no mount namespace) and environment.
    let r = w.exec(task, &["bash", "-c", "pwd; echo $IRIS_TASK_ID"], 0).await;
    let cwd = std::fs::read_link(format!("/proc/{task_pid}/cwd")).unwrap();
    assert_eq!(r.stdout, format!("{}\n{task}:0\n", cwd.display()), "{r:?}");
    // Its cgroups, in every hierarchy.
    let r = w.exec(task, &["cat", "/proc/self/cgroup"], 0).await;
    let task_cgroups = std::fs::read_to_string(format!("/proc/{task_pid}/cgroup")).unwrap();
    assert_eq!(r.stdout, task_cgroups, "{r:?}");
    assert!(task_cgroups.contains(&w.id), "the task's own cgroup: {task_cgroups}");
}

/// PTRACE_SECCOMP_GET_FILTER (linux/ptrace.h).
const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;

/// The programs of the seccomp filters `pid` runs under, newest first, as the kernel holds them
/// (PTRACE_SECCOMP_GET_FILTER: root only). The process is seized and stopped for the reading,
/// then let go. Call without awaiting in between: the ptrace calls must come from one thread.
fn filters_of(pid: i32) -> Vec<Vec<u8>> {
    // SAFETY: ptrace and waitpid on a pid, with integer arguments.
    unsafe {
        assert_eq!(libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0), 0, "seizing {pid}");
        assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, pid, 0, 0), 0, "stopping {pid}");
        let mut status = 0;
        assert_eq!(libc::waitpid(pid, &mut status, libc::__WALL), pid);
    }
    let filters = filters_of_stopped(pid);
    // SAFETY: lets our stopped tracee go on.
    unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0) };
    filters
}

fn filters_of_stopped(pid: i32) -> Vec<Vec<u8>> {
    let mut filters = Vec::new();
    for index in 0usize.. {
        // SAFETY: a NULL buffer asks for the number of instructions.
        let len = unsafe { libc::ptrace(PTRACE_SECCOMP_GET_FILTER, pid, index, 0usize) };
        if len < 0 {
            break;
        }
        let mut program = vec![0u8; len as usize * 8];
        // SAFETY: `program` has room for `len` instructions.
        assert_eq!(unsafe { libc::ptrace(PTRACE_SECCOMP_GET_FILTER, pid, index, program.as_mut_ptr()) }, len);
        filters.push(program);
    }
    filters
}

/// The program libcontainer's own `initialize_seccomp` loads for the worker's profile (what
/// every task ran under when libcontainer loaded it in the init), read back from a child
/// that loaded it.
fn libcontainers_program(allow_tracing: bool) -> Vec<u8> {
    let profile = iris_worker::runtime::container::seccomp::default_profile(allow_tracing).unwrap();
    // SAFETY: the child makes syscalls, loads the filter and _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: as above; TRACEME first, since the filter refuses ptrace.
        unsafe {
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
            libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
            if libcontainer::seccomp::initialize_seccomp(&profile).is_err() {
                libc::_exit(3);
            }
            libc::raise(libc::SIGSTOP);
            libc::_exit(0);
        }
    }
    let mut status = 0;
    // SAFETY: waits for, then ends, our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(libc::WIFSTOPPED(status), "libcontainer's filter loaded (status {status:#x})");
    let filters = filters_of_stopped(pid);
    // SAFETY: as above.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, &mut status, 0);
    }
    assert_eq!(filters.len(), 1);
    filters.into_iter().next().unwrap()
}

/// A bash command writing [`elf::syscall_probe`] of `nr` to `path`.
fn write_syscall_probe(path: &str, nr: u32) -> String {
    let escaped: String = elf::syscall_probe(nr).iter().map(|b| format!("\\x{b:02x}")).collect();
    format!("printf '{escaped}' > {path} && chmod +x {path}")
}

#[tokio::test]
#[ignore = "root: tasks run in containers; their filters are read with PTRACE_SECCOMP_GET_FILTER"]
async fn the_init_the_task_and_an_exec_run_under_the_filter_libcontainer_loaded() {
    use job::ContainerProfile as P;
    let w = NewestWorker::start("filter", &[]).await;
    // keyctl is denied (EPERM, 1); clone3 answers ENOSYS (38), so that libc falls back to a
    // clone whose flags the filter can check.
    let probes = "/tmp/keyctl; k=$?; /tmp/clone3; echo $k $?";
    for (n, profile, tracing) in [(1, P::Restricted, false), (2, P::Default, true)] {
        let want = libcontainers_program(tracing);
        let task = format!("/test/filter-{n}/0");
        let nap = format!("765.{n}");
        let script = format!(
            "{} && {} && ({probes}) > /tmp/by-task; exec sleep {nap}",
            write_syscall_probe("/tmp/keyctl", 250),
            write_syscall_probe("/tmp/clone3", 435)
        );
        w.reconcile(vec![run_as(&format!("00000000000000b{n}"), &task, &script, profile)]).await;
        w.until_running(&task).await;
        let task_pid =
            poll("the task's sleep", Duration::from_secs(30), async || pids_with_cmdline(&["sleep", &nap]).pop()).await;
        let init_pid: i32 = status_line(task_pid, "PPid:").split_whitespace().nth(1).unwrap().parse().unwrap();
        let init_cmdline = std::fs::read(format!("/proc/{init_pid}/cmdline")).unwrap();
        assert!(init_cmdline.starts_with(b"iris-init"), "the task's parent is its init");
        let under_the_filter = |who: &str, pid: i32| {
            assert_eq!(status_line(pid, "Seccomp:"), "Seccomp:\t2", "{profile:?}: the {who}");
            assert_eq!(status_line(pid, "Seccomp_filters:"), "Seccomp_filters:\t1", "{profile:?}: the {who}");
            assert!(filters_of(pid) == vec![want.clone()], "{profile:?}: the {who} runs under libcontainer's program");
        };
        under_the_filter("init", init_pid);
        under_the_filter("task", task_pid);
        let r = w.exec(&task, &["cat", "/tmp/by-task"], 0).await;
        assert_eq!(r.stdout, "1 38\n", "{profile:?}: keyctl and clone3 in the task: {r:?}");
        let r = w.exec(&task, &["bash", "-c", probes], 0).await;
        assert_eq!(r.stdout, "1 38\n", "{profile:?}: keyctl and clone3 in an exec: {r:?}");

        let long = format!("432.{n}");
        let sleep_argv = ["sleep", long.as_str()];
        let pending = w.exec(&task, &sleep_argv, 30);
        let check = async {
            let pid =
                poll("the exec'd sleep", Duration::from_secs(30), async || pids_with_cmdline(&["sleep", &long]).pop())
                    .await;
            under_the_filter("exec", pid);
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        };
        let (r, ()) = tokio::join!(pending, check);
        assert_eq!(r.exit_code, 128 + 9, "{r:?}");
    }
}

/// (CapEff, NoNewPrivs, Seccomp) of a task started with `profile`, its network interfaces and
/// network namespace, read from the host's /proc.
async fn task_under(
    w: &NewestWorker,
    profile: job::ContainerProfile,
    n: u32,
) -> (String, String, String, Vec<String>, String) {
    task_with_egress(w, profile, job::EgressPolicy::Unspecified, n).await
}

async fn task_with_egress(
    w: &NewestWorker,
    profile: job::ContainerProfile,
    egress: job::EgressPolicy,
    n: u32,
) -> (String, String, String, Vec<String>, String) {
    let task = format!("/test/profile-{n}/0");
    let nap = format!("876.{n}");
    let mut desired = run_as(&format!("00000000000000f{n}"), &task, &format!("exec sleep {nap}"), profile);
    if let Some(Intent::Run(AttemptSpec { request: Some(r) })) = desired.intent.as_mut() {
        r.egress_policy = egress as i32;
    }
    w.reconcile(vec![desired]).await;
    let pid = poll("the task's sleep", Duration::from_secs(60), async || {
        let req = worker::GetTaskStatusRequest { task_id: task.clone() };
        let s: job::TaskStatus = w.client.call(SERVICE, "GetTaskStatus", &req, Duration::from_secs(10)).await.unwrap();
        assert!(s.state <= job::TaskState::Running as i32, "{profile:?}: {s:?}");
        pids_with_cmdline(&["sleep", &nap]).pop()
    })
    .await;
    let net = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap();
    // Two header lines, then "  name: counters".
    let interfaces = net.lines().skip(2).filter_map(|l| l.split(':').next()).map(|s| s.trim().to_string()).collect();
    let value = |k: &str| status_line(pid, k).split_whitespace().nth(1).unwrap_or_default().to_string();
    (value("CapEff:"), value("NoNewPrivs:"), value("Seccomp:"), interfaces, ns(&pid.to_string(), "net"))
}

#[tokio::test]
#[ignore = "root: tasks run in containers with cgroups, one per container profile"]
async fn container_profiles_set_capabilities_filter_and_network() {
    use job::ContainerProfile as P;
    let w = NewestWorker::start("profiles", &[]).await;
    let host_net = ns("self", "net");
    let own_caps = status_line(std::process::id() as i32, "CapEff:").split_whitespace().nth(1).unwrap().to_string();
    const PTRACE: &str = "0000000000080000"; // CAP_SYS_PTRACE alone (bit 19)
    const NONE: &str = "0000000000000000";

    let (caps, nnp, seccomp, _, net) = task_under(&w, P::Restricted, 1).await;
    assert_eq!((caps.as_str(), nnp.as_str(), seccomp.as_str()), (NONE, "1", "2"), "RESTRICTED");
    assert_eq!(net, host_net, "RESTRICTED shares the host's network");
    for (n, profile) in [(2, P::Default), (3, P::Unspecified)] {
        let (caps, nnp, seccomp, _, _) = task_under(&w, profile, n).await;
        assert_eq!((caps.as_str(), nnp.as_str(), seccomp.as_str()), (PTRACE, "1", "2"), "{profile:?}");
    }
    let (caps, nnp, seccomp, _, _) = task_under(&w, P::Privileged, 4).await;
    assert_eq!((caps.as_str(), nnp.as_str(), seccomp.as_str()), (own_caps.as_str(), "0", "0"), "PRIVILEGED");
    let (caps, nnp, seccomp, interfaces, net) = task_under(&w, P::Sandbox, 5).await;
    assert_eq!((caps.as_str(), nnp.as_str(), seccomp.as_str()), (PTRACE, "1", "2"), "SANDBOX");
    assert_eq!(interfaces, ["lo", "tap0"], "SANDBOX: its own lo and its filtered way out (INTERNET)");
    assert_ne!(net, host_net, "SANDBOX has a network namespace of its own");
    // egress_policy NONE: any profile without a network.
    let (caps, _, _, interfaces, net) = task_with_egress(&w, P::Default, job::EgressPolicy::None, 8).await;
    assert_eq!((caps.as_str(), interfaces.as_slice(), net != host_net), (PTRACE, &["lo".to_string()][..], true));
    // PRIVILEGED cannot keep INTERNET's promise (it could lift the filter): refused, naming the field.
    let resp = w
        .reconcile(vec![{
            let mut d = run_as("00000000000000f9", "/test/profile-9/0", "true", P::Privileged);
            if let Some(Intent::Run(AttemptSpec { request: Some(r) })) = d.intent.as_mut() {
                r.egress_policy = job::EgressPolicy::Internet as i32;
            }
            d
        }])
        .await;
    let o = &resp.observed[0];
    assert!(o.state == job::TaskState::Failed as i32 && o.error.contains("egress_policy"), "{o:?}");

    // DOCKER_ACCESS: the host's Docker socket when there is one, refused when there is none.
    use std::os::unix::fs::FileTypeExt;
    let socket = std::fs::metadata("/var/run/docker.sock").is_ok_and(|m| m.file_type().is_socket());
    if socket {
        let (caps, ..) = task_under(&w, P::DockerAccess, 7).await;
        assert_eq!(caps, PTRACE, "DOCKER_ACCESS");
    } else {
        let task = "/test/profile-7/0";
        w.reconcile(vec![run_as("00000000000000f7", task, "true", P::DockerAccess)]).await;
        poll("DOCKER_ACCESS refused", Duration::from_secs(60), async || {
            let req = worker::GetTaskStatusRequest { task_id: task.into() };
            let s: job::TaskStatus =
                w.client.call(SERVICE, "GetTaskStatus", &req, Duration::from_secs(10)).await.unwrap();
            (s.state == job::TaskState::Failed as i32).then_some(s)
        })
        .await;
        let req = worker::GetTaskStatusRequest { task_id: task.into() };
        let s: job::TaskStatus = w.client.call(SERVICE, "GetTaskStatus", &req, Duration::from_secs(10)).await.unwrap();
        assert!(s.error.contains("DOCKER_ACCESS") && s.error.contains("Docker socket"), "{s:?}");
    }
}

#[tokio::test]
#[ignore = "root: tasks run in containers with network namespaces, slirp4netns and nftables"]
async fn internet_egress_goes_out_through_slirp_and_refuses_private_addresses() {
    use job::ContainerProfile as P;
    // A server on the host's loopback: a CLUSTER task reaches it, an INTERNET task must not.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in server.incoming().flatten() {
            drop(conn);
        }
    });
    // The host's resolver: a private address that answers TCP on 53 from the host's network, and
    // that slirp4netns would carry a task to, were it not for the filter.
    let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap();
    let resolver = resolv
        .lines()
        .find_map(|l| l.strip_prefix("nameserver "))
        .map(str::trim)
        .expect("a nameserver in the host's /etc/resolv.conf")
        .to_string();
    let w = NewestWorker::start("egress", &[]).await;
    let probe = format!(
        "import socket, time\n\
         def try_(host, port):\n\
         \x20   s = socket.socket(); s.settimeout(5); t = time.time()\n\
         \x20   try:\n\
         \x20       s.connect((host, port)); r = 'connected'\n\
         \x20   except OSError as e:\n\
         \x20       r = type(e).__name__\n\
         \x20   print(host, r, round(time.time() - t, 1), flush=True)\n\
         for h, p in [('127.0.0.1', {port}), ('10.0.2.2', {port}), ('{resolver}', 53), ('169.254.169.254', 80)]:\n\
         \x20   try_(h, p)\n\
         print('resolver', open('/etc/resolv.conf').read().split(), flush=True)\n\
         time.sleep(600)\n"
    );
    let run_with = |uid: &str, task: &str, egress: job::EgressPolicy| {
        let mut d = run_as(uid, task, "", P::Default);
        if let Some(Intent::Run(AttemptSpec { request: Some(r) })) = d.intent.as_mut() {
            r.egress_policy = egress as i32;
            if let Some(e) = r.entrypoint.as_mut() {
                e.run_command = Some(CommandEntrypoint { argv: vec!["python3".into(), "-c".into(), probe.clone()] });
            }
        }
        d
    };
    let lines_of = async |task: &str, want: usize| -> Vec<String> {
        poll("the probe's lines", Duration::from_secs(60), async || {
            let dir = std::fs::read_dir(w.state.path().join("tasks"))
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .find(|p| p.to_string_lossy().contains(&task.replace('/', "_2f")))?;
            let lines = iris_worker::logs::read(&dir.join("logs"), &Default::default()).unwrap_or_default();
            let out: Vec<String> =
                lines.into_iter().filter(|l| l.source.as_str() == "stdout").map(|l| l.data).collect();
            (out.len() >= want).then_some(out)
        })
        .await
    };
    w.reconcile(vec![run_with("00000000000000e1", "/test/egress-cluster/0", job::EgressPolicy::Cluster)]).await;
    let cluster = lines_of("/test/egress-cluster/0", 5).await;
    assert!(cluster[0].starts_with("127.0.0.1 connected"), "the host's network reaches the server: {cluster:?}");
    assert!(
        cluster[2].starts_with(&format!("{resolver} connected")),
        "the host's network reaches its resolver: {cluster:?}"
    );

    w.reconcile(vec![run_with("00000000000000e2", "/test/egress-internet/0", job::EgressPolicy::Internet)]).await;
    let internet = lines_of("/test/egress-internet/0", 5).await;
    for line in &internet[..4] {
        // Refused at once (the filter rejects), not connected and not left to time out.
        assert!(!line.contains("connected") && !line.contains("timeout"), "{internet:?}");
    }
    assert_eq!(internet[4], "resolver ['nameserver', '10.0.2.3']", "{internet:?}");
    // The filter is in the task's own namespace, set before it ran.
    let pid = pids_with_cmdline(&["python3", "-c", &probe])
        .into_iter()
        .find(|p| ns(&p.to_string(), "net") != ns("self", "net"));
    let pid = pid.expect("the INTERNET task's python");
    let rules = Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args(["nft", "list", "ruleset"])
        .output()
        .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(rules.contains("iris_egress") && rules.contains("10.0.0.0/8") && rules.contains("reject"), "{rules}");
    let slirp = || pids_with_prefix(&["slirp4netns"]).len();
    assert_eq!(slirp(), 1, "one slirp4netns for the one INTERNET task");

    // Stopped: its slirp4netns goes with it.
    w.stop("00000000000000e2").await;
    poll("slirp4netns gone", Duration::from_secs(60), async || (slirp() == 0).then_some(())).await;
}

/// Host pids whose command line starts with `argv`.
fn pids_with_prefix(argv: &[&str]) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
            let args: Vec<String> =
                cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            argv.iter()
                .enumerate()
                .all(|(i, want)| args.get(i).is_some_and(|a| a == want || a.ends_with(&format!("/{want}"))))
        })
        .collect()
}

#[tokio::test]
#[ignore = "root: the task runs in a gVisor sandbox with cgroups (scripts/setup installs runsc)"]
async fn gvisor_runs_the_task_on_gvisors_kernel_and_exec_reaches_it_there() {
    use job::ContainerProfile as P;
    let w = NewestWorker::start("gvisor", &[]).await;
    let task = "/test/gvisor/0";
    let marker = "987.6";
    w.reconcile(vec![run_as("00000000000000a1", task, &format!("uname -r; exec sleep {marker}"), P::Gvisor)]).await;
    w.until_running(task).await;
    // gVisor's kernel answers the task, not the host's.
    let host = String::from_utf8(Command::new("uname").arg("-r").output().unwrap().stdout).unwrap();
    let dir = std::fs::read_dir(w.state.path().join("tasks")).unwrap().flatten().next().unwrap().path();
    let printed = poll("the task's line", Duration::from_secs(30), async || {
        let lines = iris_worker::logs::read(&dir.join("logs"), &Default::default()).unwrap_or_default();
        lines.into_iter().find(|l| l.source.as_str() == "stdout").map(|l| l.data)
    })
    .await;
    assert_ne!(printed.trim(), host.trim(), "the task saw the host's kernel");
    // Its processes are gVisor's: the task's sleep is no process of the host.
    assert!(pids_with_cmdline(&["sleep", marker]).is_empty(), "the task's command runs on the host's kernel");
    let r = w.exec(task, &["uname", "-r"], 30).await;
    assert_eq!((r.exit_code, r.stdout.trim()), (0, printed.trim()), "the exec is not in the sandbox: {r:?}");
    // ... with the task's environment, which no host command line carries.
    let r = w.exec(task, &["sh", "-c", "echo $IRIS_TASK_ID"], 30).await;
    assert_eq!(r.stdout.trim(), format!("{task}:0"), "{r:?}");

    // A stop ends it, runsc's own processes with it.
    w.stop("00000000000000a1").await;
    w.until_state(task, job::TaskState::Killed).await;
    let id = dir.file_name().unwrap().to_string_lossy().into_owned();
    let runsc_left = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .filter(|c| String::from_utf8_lossy(c).contains(&id) && String::from_utf8_lossy(c).contains("runsc"))
            .count()
    };
    poll("runsc's processes gone", Duration::from_secs(30), async || (runsc_left() == 0).then_some(())).await;

    // Without runsc on the worker's PATH, GVISOR is refused at once, naming it.
    let bare = NewestWorker::start_with_path("gvisor-none", &[], Some("/nonexistent")).await;
    let resp = bare.reconcile(vec![run_as("00000000000000a2", "/test/gvisor/1", "true", P::Gvisor)]).await;
    let o = &resp.observed[0];
    assert_eq!(o.state, job::TaskState::Failed as i32, "{o:?}");
    assert!(o.error.contains("GVISOR") && o.error.contains("runsc"), "{o:?}");
}

#[tokio::test]
#[ignore = "root: the task runs in a container; ProfileTask execs py-spy into it"]
async fn profile_task_answers_every_failure_in_its_error() {
    use job::{ProfileTaskRequest, ProfileTaskResponse, ProfileType, ThreadsProfile, profile_type::Profiler};
    let w = NewestWorker::start("profile", &[]).await;
    let task = "/test/profile/0";
    w.reconcile(vec![run("00000000000000d1", task, "exec sleep 765.4")]).await;
    w.until_running(task).await;
    let ask = async |target: &str, profiler: Option<Profiler>| -> ProfileTaskResponse {
        let req = ProfileTaskRequest {
            target: target.into(),
            duration_seconds: 0,
            profile_type: profiler.map(|p| ProfileType { profiler: Some(p) }),
        };
        w.client.call(SERVICE, "ProfileTask", &req, Duration::from_secs(60)).await.unwrap()
    };
    let threads = || Some(Profiler::Threads(ThreadsProfile { locals: false, native: false }));
    assert_eq!(ask(task, None).await.error, "profile_type is required");
    assert_eq!(ask("/test/nope/0", threads()).await.error, "Task /test/nope/0 not found");
    let r = ask(&format!("{task}:1"), threads()).await;
    assert!(r.error.contains("not its current attempt"), "{r:?}");
    // The python rootfs has no memray either: said so, from inside the task.
    let r = ask(task, Some(Profiler::Memory(Default::default()))).await;
    assert!(r.error.contains("memray is not installed in the task"), "{r:?}");
    // The python rootfs has no py-spy, and the task no venv: said so, from inside the task.
    let r = ask(&format!("{task}:0"), threads()).await;
    assert!(r.error.contains("py-spy is not installed in the task"), "{r:?}");
    assert!(r.profile_data.is_empty());
}

/// py-spy's binary, from its wheel in the fixtures (`scripts/fixtures wheels`).
fn py_spy_binary() -> Vec<u8> {
    let mut dirs = vec![cache().join("wheels")];
    // Another checkout's fixtures may point `wheels` at its own set: any set with py-spy will do.
    dirs.extend(
        std::fs::read_dir(cache())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("wheels-"))),
    );
    let wheel = dirs
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|rd| rd.flatten().map(|e| e.path()))
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("py_spy-")))
        .expect("no py-spy wheel in the fixtures: run scripts/fixtures wheels");
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
             n = next(n for n in z.namelist() if n.endswith('/scripts/py-spy')); sys.stdout.buffer.write(z.read(n))",
        )
        .arg(&wheel)
        .output()
        .unwrap();
    assert!(out.status.success() && !out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

#[tokio::test]
#[ignore = "root: the task runs in a container; ProfileTask runs py-spy inside it"]
async fn profile_task_dumps_the_task_threads_with_its_venv_py_spy() {
    use job::{ProfileTaskRequest, ProfileTaskResponse, ProfileType, ThreadsProfile, profile_type::Profiler};
    let w = NewestWorker::start("pyspy", &[]).await;
    let task = "/test/pyspy/0";
    // A thread that works (py-spy record samples busy threads) beside one that sleeps.
    let script = "import threading, time\ndef spinning_function():\n    while True:\n        sum(range(10000))\n\
                  threading.Thread(target=spinning_function, daemon=True).start()\n\
                  def napping_function():\n    time.sleep(600)\nnapping_function()\n";
    let request = RunTaskRequest {
        task_id: task.into(),
        num_tasks: 1,
        attempt_uid: "00000000000000d2".into(),
        entrypoint: Some(RuntimeEntrypoint {
            setup_commands: vec!["chmod +x .venv/bin/py-spy".into()],
            run_command: Some(CommandEntrypoint { argv: vec!["python3".into(), "-c".into(), script.into()] }),
            workdir_files: [(".venv/bin/py-spy".to_string(), py_spy_binary())].into(),
            ..Default::default()
        }),
        // A fifth of a core: the spinning thread shares the machine.
        resources: Some(job::ResourceSpecProto { cpu_millicores: 200, ..Default::default() }),
        ..Default::default()
    };
    let desired = DesiredAttempt {
        attempt_uid: "00000000000000d2".into(),
        intent: Some(Intent::Run(AttemptSpec { request: Some(request) })),
    };
    w.reconcile(vec![desired]).await;
    w.until_running(task).await;
    let req = ProfileTaskRequest {
        target: task.into(),
        duration_seconds: 0,
        profile_type: Some(ProfileType { profiler: Some(Profiler::Threads(ThreadsProfile::default())) }),
    };
    // The interpreter may still be starting: poll until the function is on its stack.
    let r = poll("a dump with the task's function", Duration::from_secs(60), async || {
        let r: ProfileTaskResponse =
            w.client.call(SERVICE, "ProfileTask", &req, Duration::from_secs(60)).await.unwrap();
        String::from_utf8_lossy(&r.profile_data).contains("napping_function").then_some(r)
    })
    .await;
    assert_eq!(r.error, "");
    // Every process of the task runs again after the dump (py-spy stops them while it reads).
    let pid = pids_with_cmdline(&["python3", "-c", script]).pop().expect("the task's python");
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let state = state.rsplit(')').next().unwrap().split_whitespace().next().unwrap().to_string();
    assert_ne!(state, "T", "the task is left stopped");

    // A CPU profile: py-spy record for the window asked, in the format asked, read back whole.
    let cpu = |format: job::cpu_profile::Format| ProfileTaskRequest {
        target: task.into(),
        duration_seconds: 1,
        profile_type: Some(ProfileType {
            profiler: Some(Profiler::Cpu(job::CpuProfile { format: format as i32, rate_hz: 50, native: Some(false) })),
        }),
    };
    let r: ProfileTaskResponse = w
        .client
        .call(SERVICE, "ProfileTask", &cpu(job::cpu_profile::Format::Speedscope), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(r.error, "");
    let profile: serde_json::Value = serde_json::from_slice(&r.profile_data).expect("speedscope JSON");
    assert!(profile["$schema"].as_str().is_some_and(|s| s.contains("speedscope")), "{profile}");
    assert!(String::from_utf8_lossy(&r.profile_data).contains("spinning_function"), "{profile}");
    let r: ProfileTaskResponse = w
        .client
        .call(SERVICE, "ProfileTask", &cpu(job::cpu_profile::Format::Flamegraph), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(r.error, "");
    assert!(String::from_utf8_lossy(&r.profile_data).contains("<svg"), "not a flamegraph SVG");
    // Nothing of it is left in the task's workdir.
    let workdir = w.state.path().join("tasks");
    let left: Vec<_> = walk(&workdir).into_iter().filter(|p| p.to_string_lossy().contains(".iris-profile-")).collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Every path below `dir`.
fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}
