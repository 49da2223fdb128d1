#!/usr/bin/env python3
"""Interop harness against the newest Iris (marin-iris 0.2.227, October 2026).

Runs with the interpreter of the venv scripts/setup builds
($IRIS_CACHE_DIR/iris-newest-venv, default /var/cache/iris-worker/iris-newest-venv), which has
Iris's controller, client and worker installed; everything here is Iris's own code, started on
loopback. Subcommands:

  controller     start Iris's newest controller with its embedded log server (finelog) on
                 loopback, print one JSON line {"controller", "log_server", "state_dir"} on
                 stdout, serve until SIGTERM/SIGINT.
  python-worker  run Iris's own newest worker (its process runtime: tasks are plain child
                 processes of the worker) against a controller: the behavioural reference.
  check          drive a running controller with Iris's own client and report each check:
                 one JSON line per check and a summary line on stdout; exit 1 if any failed.
                 The worker must run on this host (the cancel check looks for the task's
                 processes in /proc).
  run            all three at once: a controller, one worker (Iris's, or any command given
                 with --worker-cmd), the checks, then everything stopped. The worker command
                 is a template: {controller} {worker_id} {port} {state_dir} {cache_dir} are
                 filled in, e.g.
                   --worker-cmd 'iris-worker serve --controller {controller}
                                 --worker-id {worker_id} --listen 127.0.0.1:{port}
                                 --state-dir {state_dir}'

The checks (names for --only), each through Iris's client against the controller:
  echo_logs         a command job SUCCEEDED; its line read back from the log service
  callable          a pickled Python callable ran and saw IRIS_TASK_ID=<task>:0
  exit_code         `exit 3` -> job and task FAILED, exit code 3
  cancel            a running job cancelled -> KILLED, every process of the task gone
  replicas          a 2-replica job: both tasks SUCCEEDED, each logged its own task id
  workspace_bundle  the client's workspace bundle: a data file read, a module imported
  large_workdir_file  a workdir file over the controller's 10 KiB threshold (sent as a blob
                    ref, fetched from the controller) arrives whole
  exec              ExecInContainer through the controller: stdout, stderr, exit code
  exec_env          ... and the exec runs in the task's environment (IRIS_TASK_ID set)
  process_status    GetProcessStatus of the worker through the controller
  worker_log        the worker's own log lines in the log service under /system/worker/<id>
  worker_restart    (run mode only: the harness owns the worker) SIGKILL of the worker
                    while an attempt runs, worker restarted: the same attempt (0) finishes
                    SUCCEEDED and all its 40 lines are in the log service
Iris's own worker with its process runtime fails exec_env (its exec runs on the host with
the worker's environment, where `docker exec` would see the container's) and worker_restart
(it loses every attempt with its process: the controller retries the task as attempt 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rigging.timing import Duration

from finelog.rpc import logging_pb2
from iris.client.client import IrisClient
from iris.cluster.client.remote_client import RemoteClusterClient
from iris.cluster.backends.rpc.backend import RpcTaskBackend, RpcWorkerStubFactory
from iris.cluster.bundle import BundleStore
from iris.cluster.controller.auth import create_controller_auth
from iris.cluster.controller.backend import BackendCapability, BackendDescriptor, BackendKind
from iris.cluster.controller.controller import Controller, ControllerConfig
from iris.cluster.controller.db import ControllerDB
from iris.cluster.controller.log_stack import build_log_stack
from iris.cluster.runtime.process import ProcessRuntime
from iris.cluster.types import DEFAULT_BACKEND_ID, Entrypoint, EnvironmentSpec, ResourceSpec
from iris.cluster.worker.env_probe import FixedEnvironmentProvider, HardwareProbe, build_worker_metadata
from iris.cluster.worker.worker import Worker, WorkerConfig
from iris.resources.state import JobState, TaskState
from iris.rpc import controller_pb2, job_pb2
from iris.rpc.compression import IRIS_RPC_COMPRESSIONS
from iris.rpc.controller_connect import ControllerServiceClientSync

LOG = logging.getLogger("iris-newest-harness")

# Every check polls with a deadline; none sleeps to synchronise.
JOB_DEADLINE_S = 120.0
POLL_S = 0.2


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _poll(what: str, probe: Callable[[], object], deadline_s: float = JOB_DEADLINE_S) -> object:
    """Calls probe until it returns something truthy; raises TimeoutError naming `what`."""
    end = time.monotonic() + deadline_s
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > end:
            raise TimeoutError(f"{what}: not within {deadline_s:.0f} s")
        time.sleep(POLL_S)


# ---------------------------------------------------------------------------------------------
# controller


def start_controller(state_dir: Path, host: str, port: int, unreachable_grace_s: float):
    """Iris's controller as LocalCluster assembles it, minus the autoscaler: workers join by
    registering themselves (as iris-worker does), so the backend has no scale groups."""
    (state_dir / "bundles").mkdir(parents=True, exist_ok=True)
    db_dir = state_dir / "db"
    db_dir.mkdir(exist_ok=True)
    # No auth config: null-auth mode, as a single-host cluster on loopback runs.
    auth = create_controller_auth(None, cluster_name="iris-newest-harness")
    # An empty log_service_address makes the controller start finelog's native server in
    # process (on `host`) and register it as the /system/log-server endpoint.
    log_stack = build_log_stack(
        log_service_address="",
        local_log_dir=state_dir / "log-server",
        host=host,
        worker_token_provider=auth.worker_token_provider,
    )
    config = ControllerConfig(
        host=host,
        port=port or _free_port(host),
        remote_state_dir=f"file://{state_dir / 'bundles'}",
        local_state_dir=db_dir,
        auth_verifier=auth.verifier,
        auth_provider=auth.provider,
        auth=auth,
        worker_unreachable_grace=Duration.from_seconds(unreachable_grace_s),
    )
    backend = RpcTaskBackend(
        descriptor=BackendDescriptor(
            backend_id=DEFAULT_BACKEND_ID,
            display_name="worker",
            kind=BackendKind.WORKER,
            capabilities=frozenset({BackendCapability.WORKER_FLEET}),
        ),
        stub_factory=RpcWorkerStubFactory(),
    )
    controller = Controller(config=config, log_stack=log_stack, db=ControllerDB(db_dir=db_dir))
    controller.register_backend(backend)
    controller.start()
    return controller, log_stack.address


def cmd_controller(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir or tempfile.mkdtemp(prefix="iris-newest-controller-"))
    controller, log_address = start_controller(state_dir, args.host, args.port, args.unreachable_grace)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(json.dumps({"controller": controller.url, "log_server": log_address, "state_dir": str(state_dir)}), flush=True)
    stop.wait()
    controller.stop()
    return 0


# ---------------------------------------------------------------------------------------------
# Iris's own worker (the reference)


def cmd_python_worker(args: argparse.Namespace) -> int:
    cache_dir = Path(args.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    hardware = HardwareProbe(
        hostname=socket.gethostname(),
        ip_address="127.0.0.1",
        cpu_count=os.cpu_count() or 1,
        memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        disk_bytes=100 * 1024**3,
        gpu_count=0,
        gpu_name="",
        gpu_memory_mb=0,
        tpu_name="",
        tpu_type="",
        tpu_worker_hostnames="",
        tpu_worker_id="",
        tpu_chips_per_host_bounds="",
    )
    config = WorkerConfig(
        host="127.0.0.1",
        port=args.port or _free_port(),
        cache_dir=cache_dir,
        controller_address=args.controller,
        worker_id=args.worker_id,
        # The process runtime never pulls an image, but a worker refuses to start a task
        # when it has neither the task's image nor a default.
        default_task_image="process-runtime-unused",
        poll_interval=Duration.from_seconds(0.5),
    )
    worker = Worker(
        config,
        bundle_store=BundleStore(storage_dir=str(cache_dir / "bundles"), controller_address=args.controller),
        container_runtime=ProcessRuntime(cache_dir=cache_dir),
        environment_provider=FixedEnvironmentProvider(build_worker_metadata(hardware=hardware)),
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker.start()
    print(json.dumps({"worker_id": args.worker_id, "address": f"127.0.0.1:{config.port}"}), flush=True)
    stop.wait()
    worker.stop()
    return 0


# ---------------------------------------------------------------------------------------------
# checks


@dataclass
class Ctx:
    controller: str
    nonce: str
    # The worker under test, when known (`run` mode, or `check --worker-id`).
    worker_id: str | None = None
    # Set in `run` mode: kills the worker with SIGKILL and starts it again on the same state.
    restart_worker: Callable[[], None] | None = None
    clients: dict[str, object] = field(default_factory=dict)
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for client in self.clients.values():
            client.shutdown(wait=False)
        for step in self.cleanup:
            step()

    def client(self, workspace: Path | None = None):
        key = str(workspace)
        if key not in self.clients:
            self.clients[key] = IrisClient.remote(self.controller, workspace=workspace)
        return self.clients[key]

    def name(self, check: str) -> str:
        return f"{check.replace('_', '-')}-{self.nonce}"


class CheckFailed(AssertionError):
    pass


def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise CheckFailed(message)


def _resources():
    return ResourceSpec(cpu=0.5, memory="256m")


def _no_setup():
    # The default setup script syncs the workspace with uv from the package index; these
    # checks are about the wire, so tasks run without setup.
    return EnvironmentSpec(setup_scripts=[])


def _submit(ctx: Ctx, check: str, entrypoint, *, workspace: Path | None = None, **kw):
    return ctx.client(workspace).submit(
        entrypoint, ctx.name(check), _resources(), environment=_no_setup(), **kw
    )


def _wait_terminal(job):
    # With raise_on_failure=False, wait() returns the status once the job is terminal.
    return job.wait(timeout=JOB_DEADLINE_S, poll_interval=0.5, raise_on_failure=False)


def _log_lines(job, want: Callable[[list[str]], bool]) -> list[str]:
    """The job's log lines as Iris's client reads them (the controller's proxy to finelog),
    polled until `want` holds: a worker may push the last lines just after the job is
    terminal."""
    lines: list[str] = []

    def probe():
        nonlocal lines
        lines = [e.data for e in job.logs()]
        return want(lines)

    try:
        _poll("the expected log lines", probe, deadline_s=30)
    except TimeoutError as e:
        raise CheckFailed(f"{e}; read {lines!r}") from None
    return lines


def check_echo_logs(ctx: Ctx) -> str:
    marker = f"hello-from-{ctx.nonce}"
    job = _submit(ctx, "echo_logs", Entrypoint.from_command("bash", "-c", f"echo {marker}"))
    status = _wait_terminal(job)
    _expect(status.state is JobState.SUCCEEDED, f"job is {status.state}: {status.error_message}")
    _log_lines(job, lambda lines: marker in lines)
    return f"{job.job_id} SUCCEEDED, its line read back through the client"


def _say(marker: str) -> None:
    # Runs in the task (pickled by value with this module): prints from Python itself.
    import os

    print(marker, os.environ.get("IRIS_TASK_ID", ""), flush=True)


def check_callable(ctx: Ctx) -> str:
    marker = f"callable-{ctx.nonce}"
    job = _submit(ctx, "callable", Entrypoint.from_callable(_say, marker))
    status = _wait_terminal(job)
    _expect(status.state is JobState.SUCCEEDED, f"job is {status.state}: {status.error_message}")
    lines = _log_lines(job, lambda ls: any(line.startswith(marker) for line in ls))
    printed = next(line for line in lines if line.startswith(marker))
    want_id = f"{job.job_id.task(0)}:0"
    _expect(printed == f"{marker} {want_id}", f"the callable printed {printed!r}, IRIS_TASK_ID should be {want_id}")
    return f"the callable ran and saw IRIS_TASK_ID={want_id}"


def check_exit_code(ctx: Ctx) -> str:
    job = _submit(ctx, "exit_code", Entrypoint.from_command("bash", "-c", "exit 3"))
    status = _wait_terminal(job)
    _expect(status.state is JobState.FAILED, f"job is {status.state}, not FAILED")
    task = job.task(0).status()
    _expect(task.state is TaskState.FAILED, f"task is {task.state}")
    _expect(task.exit_code == 3, f"exit code {task.exit_code}, not 3 (error: {task.error_message!r})")
    return f"FAILED with exit code 3 ({task.error_message!r})"


def _processes_with(marker: str) -> list[int]:
    """Pids on this host whose command line holds `marker` (the task's processes, whatever
    pid namespace they run in, since the worker runs on this host)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                pids.append(int(entry))
    return pids


def check_cancel(ctx: Ctx) -> str:
    marker = f"iris-harness-sleeper-{ctx.nonce}"
    # Two processes under the task: a shell and a `sleep` renamed to the marker.
    job = _submit(
        ctx, "cancel", Entrypoint.from_command("bash", "-c", f"(exec -a {marker} sleep 600) & wait")
    )
    _poll("the job RUNNING", lambda: job.state is JobState.RUNNING)
    _poll("the task's sleeper process", lambda: _processes_with(marker))
    job.cancel()
    status = _wait_terminal(job)
    _expect(status.state is JobState.KILLED, f"job is {status.state}, not KILLED")
    task = job.task(0).status()
    _expect(task.state is TaskState.KILLED, f"task is {task.state}, not KILLED")
    try:
        _poll("every process of the task gone", lambda: not _processes_with(marker), deadline_s=30)
    except TimeoutError as e:
        raise CheckFailed(f"{e}: still {_processes_with(marker)}") from None
    return "KILLED, its processes gone"


def check_replicas(ctx: Ctx) -> str:
    job = _submit(
        ctx, "replicas", Entrypoint.from_command("bash", "-c", 'echo "replica $IRIS_TASK_ID"'), replicas=2
    )
    status = _wait_terminal(job)
    _expect(status.state is JobState.SUCCEEDED, f"job is {status.state}: {status.error_message}")
    want = {f"replica {job.job_id.task(i)}:0" for i in range(2)}
    _log_lines(job, lambda lines: want <= set(lines))
    return f"2 tasks SUCCEEDED, each logged its own IRIS_TASK_ID ({sorted(want)})"


def check_workspace_bundle(ctx: Ctx) -> str:
    workspace = Path(tempfile.mkdtemp(prefix="iris-newest-workspace-"))
    ctx.cleanup.append(lambda: shutil.rmtree(workspace, ignore_errors=True))
    (workspace / "pyproject.toml").write_text(
        '[project]\nname = "harness-workspace"\nversion = "0.1.0"\nrequires-python = ">=3.10"\n'
    )
    (workspace / "harness_mod.py").write_text(f'GREETING = "bundle-{ctx.nonce}"\n')
    (workspace / "data").mkdir()
    (workspace / "data" / "payload.txt").write_text(f"payload-{ctx.nonce}\n")
    # Iris's Docker runtime starts the command in $IRIS_WORKDIR, its process runtime in the
    # worker's own cwd: the task goes there itself.
    script = 'cd "$IRIS_WORKDIR" && cat data/payload.txt && "$IRIS_PYTHON" -c "import harness_mod; print(harness_mod.GREETING)"'
    job = _submit(ctx, "workspace_bundle", Entrypoint.from_command("bash", "-c", script), workspace=workspace)
    status = _wait_terminal(job)
    _expect(status.state is JobState.SUCCEEDED, f"job is {status.state}: {status.error_message}")
    want = {f"payload-{ctx.nonce}", f"bundle-{ctx.nonce}"}
    _log_lines(job, lambda lines: want <= set(lines))
    return "the task read a file and imported a module of the workspace bundle"


def check_large_workdir_file(ctx: Ctx) -> str:
    # Iris's controller keeps a workdir file over 10 KiB as a blob and sends only its sha256
    # (workdir_file_refs): the worker fetches it from the controller's /blobs/<sha256>.
    import hashlib

    content = f"large-{ctx.nonce}\n".encode() * 2000
    want = hashlib.sha256(content).hexdigest()
    script = 'cd "$IRIS_WORKDIR" && sha256sum data/large.bin'
    job = _submit(ctx, "large_workdir_file", Entrypoint(command=["bash", "-c", script], workdir_files={"data/large.bin": content}))
    status = _wait_terminal(job)
    _expect(status.state is JobState.SUCCEEDED, f"job is {status.state}: {status.error_message}")
    _log_lines(job, lambda lines: f"{want}  data/large.bin" in lines)
    return f"a {len(content)}-byte workdir file (a blob on the controller) arrived whole"


def _controller_stub(ctx: Ctx):
    return ControllerServiceClientSync(
        ctx.controller, timeout_ms=30000, accept_compression=IRIS_RPC_COMPRESSIONS, send_compression=None
    )


def _exec_in_task(ctx: Ctx, check: str, command: list[str]):
    """Runs `command` in a running task through the controller's ExecInContainer."""
    job = _submit(ctx, check, Entrypoint.from_command("bash", "-c", "exec sleep 600"))
    try:
        # The task, not the job: a job is RUNNING while its task is still BUILDING, and Iris's
        # worker (as iris-worker) refuses an exec into a task that is not RUNNING yet.
        _poll("the task RUNNING", lambda: job.task(0).status().state is TaskState.RUNNING)
        with _controller_stub(ctx) as stub:
            response = stub.exec_in_container(
                controller_pb2.Controller.ExecInContainerRequest(
                    task_id=str(job.job_id.task(0)), command=command, timeout_seconds=30
                )
            )
    finally:
        job.cancel()
    _expect(not response.error, f"exec failed: {response.error}")
    return job, response


def check_exec(ctx: Ctx) -> str:
    _, response = _exec_in_task(ctx, "exec", ["bash", "-c", "echo out; echo err >&2; exit 4"])
    _expect(response.stdout == "out\n", f"stdout {response.stdout!r}")
    _expect(response.stderr == "err\n", f"stderr {response.stderr!r}")
    _expect(response.exit_code == 4, f"exit code {response.exit_code}, not 4")
    return "ExecInContainer through the controller: stdout, stderr and exit code 4 back"


def check_exec_env(ctx: Ctx) -> str:
    # `docker exec` (Iris's Docker runtime) runs with the container's environment; so must
    # an exec into an iris-worker task.
    job, response = _exec_in_task(ctx, "exec_env", ["bash", "-c", 'echo "$IRIS_TASK_ID"'])
    want = f"{job.job_id.task(0)}:0"
    _expect(response.stdout.strip() == want, f"IRIS_TASK_ID in the exec is {response.stdout.strip()!r}, not {want!r}")
    return f"the exec saw the task's environment (IRIS_TASK_ID={want})"


def check_process_status(ctx: Ctx) -> str:
    with _controller_stub(ctx) as stub:
        workers = [w for w in stub.list_workers(controller_pb2.Controller.ListWorkersRequest()).workers if w.healthy]
        _expect(bool(workers), "no healthy worker")
        worker_id = ctx.worker_id or workers[0].worker_id
        response = stub.get_process_status(
            job_pb2.GetProcessStatusRequest(max_log_lines=0, target=f"/system/worker/{worker_id}")
        )
    info = response.process_info
    _expect(info.pid > 0, f"no pid in {info}")
    _expect(info.memory_rss_bytes > 0, f"no rss in {info}")
    return f"GetProcessStatus through the controller: worker {worker_id} pid {info.pid}, rss {info.memory_rss_bytes}"


def check_worker_log(ctx: Ctx) -> str:
    with _controller_stub(ctx) as stub:
        workers = [w for w in stub.list_workers(controller_pb2.Controller.ListWorkersRequest()).workers if w.healthy]
    _expect(bool(workers), "no healthy worker")
    worker_id = ctx.worker_id or workers[0].worker_id
    key = f"/system/worker/{worker_id}"
    entries: list = []

    # Iris's cluster client (its public ClusterClient protocol), as Iris's CLI reads a worker's
    # log, with the worker's key.
    cluster = RemoteClusterClient(ctx.controller)

    def probe():
        nonlocal entries
        response = cluster.fetch_logs(key, match_scope=logging_pb2.MATCH_SCOPE_EXACT)
        entries = list(response.entries)
        return bool(entries)

    try:
        _poll(f"lines under {key}", probe, deadline_s=30)
    except TimeoutError as e:
        raise CheckFailed(str(e)) from None
    finally:
        cluster.shutdown()
    return f"{len(entries)} lines of the worker's own log under {key}, the first {entries[0].data[:80]!r}"


def check_worker_restart(ctx: Ctx) -> str:
    if ctx.restart_worker is None:
        raise CheckFailed("needs `run` mode (the harness must own the worker)")
    # Lines over ~8 s, across a SIGKILL of the worker: the attempt must survive and every
    # line must reach the log service.
    script = "for i in $(seq 1 40); do echo line-$i; sleep 0.2; done"
    job = _submit(ctx, "worker_restart", Entrypoint.from_command("bash", "-c", script))
    _poll("the job RUNNING", lambda: job.state is JobState.RUNNING)
    _log_lines(job, lambda lines: "line-3" in lines)
    ctx.restart_worker()
    status = _wait_terminal(job)
    _expect(status.state is JobState.SUCCEEDED, f"job is {status.state}: {status.error_message}")
    task = job.task(0).status()
    _expect(task.current_attempt_number == 0, f"the attempt was replaced: now attempt {task.current_attempt_number}")
    want = [f"line-{i}" for i in range(1, 41)]
    _log_lines(job, lambda lines: [line for line in lines if line.startswith("line-")] == want)
    return "attempt 0 survived a SIGKILL of the worker and all 40 lines are in the log service"


CHECKS: dict[str, Callable[[Ctx], str]] = {
    "echo_logs": check_echo_logs,
    "callable": check_callable,
    "exit_code": check_exit_code,
    "cancel": check_cancel,
    "replicas": check_replicas,
    "workspace_bundle": check_workspace_bundle,
    "large_workdir_file": check_large_workdir_file,
    "exec": check_exec,
    "exec_env": check_exec_env,
    "process_status": check_process_status,
    "worker_log": check_worker_log,
    "worker_restart": check_worker_restart,
}


def run_checks(ctx: Ctx, names: list[str]) -> bool:
    """Runs each check in turn, printing one JSON line per check, then a summary line."""
    failed = []
    for name in names:
        started = time.monotonic()
        try:
            result = {"check": name, "ok": True, "detail": CHECKS[name](ctx)}
        except Exception as e:  # a check's failure is its result, never the harness's end
            failed.append(name)
            kind = "" if isinstance(e, CheckFailed) else f"{type(e).__name__}: "
            result = {"check": name, "ok": False, "detail": f"{kind}{e}"}
            LOG.info("check %s failed:\n%s", name, traceback.format_exc())
        result["seconds"] = round(time.monotonic() - started, 1)
        print(json.dumps(result), flush=True)
    print(json.dumps({"passed": len(names) - len(failed), "failed": failed}), flush=True)
    return not failed


def _check_names(only: str | None, run_mode: bool) -> list[str]:
    names = [n for n in CHECKS if run_mode or n != "worker_restart"]
    if only:
        wanted = [n.strip() for n in only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in CHECKS]
        if unknown:
            raise SystemExit(f"unknown check(s) {unknown}; known: {list(CHECKS)}")
        names = wanted
    return names


def _wait_for_worker(ctx: Ctx, worker_id: str) -> None:
    def registered():
        with _controller_stub(ctx) as stub:
            return any(w.worker_id == worker_id and w.healthy for w in stub.list_workers(controller_pb2.Controller.ListWorkersRequest()).workers)

    try:
        _poll(f"worker {worker_id} registered and healthy", registered, deadline_s=60)
    except TimeoutError as e:
        raise RuntimeError(f"{e} (ListWorkers of {ctx.controller})") from None


def cmd_check(args: argparse.Namespace) -> int:
    ctx = Ctx(controller=args.controller, nonce=uuid.uuid4().hex[:8], worker_id=args.worker_id)
    try:
        if args.worker_id:
            _wait_for_worker(ctx, args.worker_id)
        return 0 if run_checks(ctx, _check_names(args.only, run_mode=False)) else 1
    finally:
        ctx.close()


# ---------------------------------------------------------------------------------------------
# run: controller + worker + checks


class _Proc:
    """A child process of the harness, in its own process group, stopped on exit."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.argv = argv
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self.log, env=env, start_new_session=True
        )

    def first_line(self, deadline_s: float = 60) -> dict:
        """The JSON line the child prints once it is ready."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], deadline_s)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            raise RuntimeError(f"{shlex.join(self.argv[:4])}… printed nothing within {deadline_s:.0f} s (see {self.log.name})")
        return json.loads(line)

    def stop(self, sig: int = signal.SIGTERM, deadline_s: float = 20) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(deadline_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@contextlib.contextmanager
def _cluster(args: argparse.Namespace) -> Iterator[tuple[Ctx, Path]]:
    """A controller and one worker, both children of the harness; stopped on the way out,
    then the worker's cleanup command (if any) is run."""
    base = Path(args.base_dir or tempfile.mkdtemp(prefix="iris-newest-run-"))
    base.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, os.path.abspath(__file__)]
    controller = _Proc(
        [*me, "controller", "--state-dir", str(base / "controller"), "--unreachable-grace", str(args.unreachable_grace)],
        base / "controller.log",
    )
    workers: list[_Proc] = []
    fill: dict[str, str] = {}
    ctx: Ctx | None = None
    try:
        url = controller.first_line()["controller"]
        ctx = Ctx(controller=url, nonce=uuid.uuid4().hex[:8])
        worker_id = args.worker_id or f"harness-worker-{ctx.nonce}"
        ctx.worker_id = worker_id
        fill = {
            "controller": url,
            "worker_id": worker_id,
            "port": str(_free_port()),
            "state_dir": str(base / "worker-state"),
            "cache_dir": str(base / "worker-cache"),
        }
        if args.worker_cmd:
            argv = [part.format(**fill) for part in shlex.split(args.worker_cmd)]
        else:
            argv = [*me, "python-worker", "--controller", url, "--worker-id", worker_id,
                    "--port", fill["port"], "--cache-dir", fill["cache_dir"]]

        def start_worker() -> None:
            workers.append(_Proc(argv, base / "worker.log"))

        def restart_worker() -> None:
            # SIGKILL to the worker's process group only: its tasks (in sessions of their own,
            # under iris-worker's supervisors) are not hit.
            workers[-1].stop(signal.SIGKILL)
            start_worker()

        start_worker()
        ctx.restart_worker = restart_worker
        try:
            _wait_for_worker(ctx, worker_id)
        except RuntimeError as e:
            raise RuntimeError(f"{e}; the worker's log: {base / 'worker.log'}") from None
        print(json.dumps({"controller": url, "worker_id": worker_id, "logs": str(base)}), flush=True)
        yield ctx, base
    finally:
        if ctx is not None:
            ctx.close()
        for w in workers:
            w.stop()
        controller.stop()
        if args.worker_cleanup_cmd and fill:
            argv = [part.format(**fill) for part in shlex.split(args.worker_cleanup_cmd)]
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=open(base / "worker.log", "ab"), check=False)


def cmd_run(args: argparse.Namespace) -> int:
    names = _check_names(args.only, run_mode=True)
    try:
        with _cluster(args) as (ctx, base):
            ok = run_checks(ctx, names)
    except (RuntimeError, TimeoutError) as e:
        # The cluster did not come up (e.g. the worker never registered): every check fails.
        print(json.dumps({"passed": 0, "failed": names, "error": str(e)}), flush=True)
        return 1
    if ok and not args.base_dir:
        shutil.rmtree(base, ignore_errors=True)
    elif not ok:
        print(f"logs of the controller and the worker: {base}", file=sys.stderr)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="Iris's own logs on stderr")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("controller", help="start Iris's newest controller + its log server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = a free port")
    p.add_argument("--state-dir", help="default: a new temp dir")
    p.add_argument("--unreachable-grace", type=float, default=10.0,
                   help="seconds a worker may miss Reconciles before it is reaped (Iris: 50; its LocalCluster: 10)")

    p = sub.add_parser("python-worker", help="run Iris's own worker (process runtime)")
    p.add_argument("--controller", required=True)
    p.add_argument("--worker-id", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--cache-dir", required=True)

    p = sub.add_parser("check", help="drive a running controller with Iris's client")
    p.add_argument("--controller", required=True)
    p.add_argument("--worker-id", help="wait until this worker is registered and healthy first")
    p.add_argument("--only", help="comma-separated check names")

    p = sub.add_parser("run", help="controller + worker + checks")
    p.add_argument("--worker-cmd", help="worker command template (default: Iris's own worker)")
    p.add_argument("--only", help="comma-separated check names")
    p.add_argument("--worker-id", help="the worker's id, {worker_id} in the templates (default: harness-worker-<random>)")
    p.add_argument("--worker-cleanup-cmd", help="run after the worker stopped (same template), e.g. "
                   "'iris-worker cleanup --state-dir {state_dir}'")
    p.add_argument("--base-dir", help="where state and logs go, kept (default: a temp dir, removed if every check passed)")
    p.add_argument("--unreachable-grace", type=float, default=10.0)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose or args.cmd in ("controller", "python-worker") else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    return {
        "controller": cmd_controller,
        "python-worker": cmd_python_worker,
        "check": cmd_check,
        "run": cmd_run,
    }[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
