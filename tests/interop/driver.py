"""The interop tier's client: it behaves as Iris's client of January 2026 does, against
iris-worker's controller and workers (started by tests/interop.rs).

- It pickles `iris.cluster.types.Entrypoint` objects (the class comes from the workspace's own
  `iris` package, importable here: cloudpickle pickles it by reference, so a task can load it
  only from its venv, where `uv sync` installed the workspace);
- it zips the workspace as Iris's BundleCreator does and sends it inline as `bundle_blob`, with
  `resources` as Iris's ResourceSpec() sends them (replicas 0);
- it speaks Connect with application/proto through connect-python, as Iris's clients do;
- the functions it sends use pytest, a dev-group dependency of the workspace, the way functions
  defined in test modules do (a module-level reference pickled by name).

usage: driver.py cluster CONTROLLER_URL PREFIX     jobs, actors and a WorkerPool via the controller
       driver.py worker WORKER_ADDR PREFIX ZIP_DIR  a task straight over the worker wire
The stubs of proto/iris/cluster.proto are at $IRIS_INTEROP_STUBS (a cluster_pb2.py).
Every check is an assert; the last line printed is "ok <scenario>".
"""

import concurrent.futures
import importlib.util
import io
import json
import os
import pathlib
import sys
import time
import urllib.request
import zipfile

HERE = pathlib.Path(__file__).resolve().parent
WORKSPACE = HERE / "workspace"
sys.path.insert(0, str(WORKSPACE / "lib" / "iris"))

import cloudpickle  # noqa: E402
import pytest  # noqa: E402  (the dev-group dependency the sent functions reference)
from connectrpc.client import ConnectClientSync  # noqa: E402
from connectrpc.errors import ConnectError  # noqa: E402
from connectrpc.method import IdempotencyLevel, MethodInfo  # noqa: E402

from iris import actor  # noqa: E402
from iris.cluster.types import Entrypoint  # noqa: E402

_spec = importlib.util.spec_from_file_location("cluster_pb2", os.environ["IRIS_INTEROP_STUBS"])
pb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pb)

TERMINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_KILLED, pb.JOB_STATE_WORKER_FAILED,
            pb.JOB_STATE_UNSCHEDULABLE}
TASK_TERMINAL = {pb.TASK_STATE_SUCCEEDED, pb.TASK_STATE_FAILED, pb.TASK_STATE_KILLED, pb.TASK_STATE_WORKER_FAILED}


class Service:
    """Unary Connect calls of one service, application/proto, as Iris's generated clients."""

    def __init__(self, address: str, service: str, messages: dict):
        self.client = ConnectClientSync(address, timeout_ms=30000)
        self.service = service
        self.messages = messages

    def __getattr__(self, method):
        req_type, resp_type = self.messages[method]
        info = MethodInfo(name=method, service_name=self.service, input=req_type, output=resp_type,
                          idempotency_level=IdempotencyLevel.UNKNOWN)
        return lambda request: self.client.execute_unary(request=request, method=info)


C = pb.Controller
W = pb.Worker


def controller(url: str) -> Service:
    return Service(url, "iris.cluster.ControllerService", {
        "LaunchJob": (C.LaunchJobRequest, C.LaunchJobResponse),
        "GetJobStatus": (C.GetJobStatusRequest, C.GetJobStatusResponse),
        "TerminateJob": (C.TerminateJobRequest, pb.Empty),
        "GetTaskStatus": (C.GetTaskStatusRequest, C.GetTaskStatusResponse),
        "ListEndpoints": (C.ListEndpointsRequest, C.ListEndpointsResponse),
    })


def worker(address: str) -> Service:
    return Service(address, "iris.cluster.WorkerService", {
        "RunTask": (W.RunTaskRequest, W.RunTaskResponse),
        "GetTaskStatus": (W.GetTaskStatusRequest, pb.TaskStatus),
        "FetchTaskLogs": (W.FetchTaskLogsRequest, W.FetchTaskLogsResponse),
        "KillTask": (W.KillTaskRequest, pb.Empty),
    })


def bundle() -> bytes:
    """The workspace zipped as Iris's BundleCreator zips it (deflated, paths relative)."""
    skip = {"__pycache__", ".venv", ".pytest_cache", "uv.lock"}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(WORKSPACE.rglob("*")):
            rel = f.relative_to(WORKSPACE)
            if f.is_file() and not skip.intersection(rel.parts) and not f.name.endswith(".pyc"):
                z.write(f, rel)
    return out.getvalue()


def environment() -> pb.EnvironmentConfig:
    """What Iris's EnvironmentSpec().to_proto() sends by default."""
    return pb.EnvironmentConfig(workspace="/app", env_vars={"HF_DATASETS_TRUST_REMOTE_CODE": "1",
                                                             "TOKENIZERS_PARALLELISM": "false"})


# ---- the functions sent to tasks (pickled by value: they live in __main__) ----

def uses_the_workspace(tag):
    """A function as a test module defines it: it needs pytest (dev group), the project
    installed (its version, its console script) and iris from the venv."""
    import importlib.metadata
    import shutil
    import iris
    assert 0.1 + 0.2 == pytest.approx(0.3)
    report = {
        "tag": tag,
        "version": importlib.metadata.version("interop-app"),
        "script": shutil.which("interop-hello"),
        "iris": iris.__file__,
        "cwd": os.getcwd(),
        "advertise": os.environ.get("IRIS_ADVERTISE_HOST"),
        "bundle": os.environ.get("IRIS_BUNDLE_GCS_PATH"),
    }
    print("REPORT " + json.dumps(report), flush=True)
    return report


class Calc:
    def add(self, a, b):
        return a + b

    def where(self):
        return os.environ["IRIS_TASK_ID"]


def serve_calc(name):
    actor.ActorServer(name, Calc()).serve_forever()


def square(x):
    return x * x


# ---- helpers ----

def wait_job(ctl, job_id, timeout=300):
    deadline = time.monotonic() + timeout
    while True:
        job = ctl.GetJobStatus(C.GetJobStatusRequest(job_id=job_id)).job
        if job.state in TERMINAL:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {pb.JobState.Name(job.state)}: {job}"
        time.sleep(0.2)


def wait_for(what, fn, timeout=300):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.2)


def stdout_of_task(ctl, job_id, index=0):
    """As Iris's client reads logs: the task's worker from the controller, then the worker."""
    task = ctl.GetTaskStatus(C.GetTaskStatusRequest(job_id=job_id, task_index=index)).task
    w = worker(f"http://{task.worker_address}")
    logs = w.FetchTaskLogs(W.FetchTaskLogsRequest(task_id=task.task_id, filter=W.FetchLogsFilter())).logs
    return task, [entry.data for entry in logs if entry.source == "stdout"]


def report_of(lines):
    found = [json.loads(line[len("REPORT "):]) for line in lines if line.startswith("REPORT ")]
    assert len(found) == 1, lines
    return found[0]


def check_report(report, tag):
    assert report["tag"] == tag, report
    assert report["version"] == "0.3.0", report  # the project itself is installed
    assert report["script"] == "/app/.venv/bin/interop-hello", report  # with its console script
    assert report["iris"].startswith("/app/lib/iris/"), report  # iris: the workspace member
    assert report["cwd"] == "/app", report


def launch(ctl, name, entrypoint, blob, ports=()):
    """LaunchJob exactly as Iris's RemoteClusterClient.submit_job sends it with a bundle blob."""
    return ctl.LaunchJob(C.LaunchJobRequest(
        name=name,
        serialized_entrypoint=cloudpickle.dumps(entrypoint),
        resources=pb.ResourceSpecProto(cpu=0, memory_bytes=0, disk_bytes=0, replicas=0),
        environment=environment(),
        bundle_blob=blob,
        ports=list(ports),
        parent_job_id="",
        scheduling_timeout_seconds=0,
    )).job_id


# ---- scenarios ----

def cluster(url, prefix):
    ctl = controller(url)
    blob = bundle()

    # A job: the Entrypoint object, the inline bundle, replicas 0.
    job_id = launch(ctl, f"{prefix}-dev", Entrypoint.from_callable(uses_the_workspace, "via-controller"), blob)
    assert job_id == f"{prefix}-dev"
    job = wait_job(ctl, job_id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job
    assert len(job.tasks) == 1, job
    task, lines = stdout_of_task(ctl, job_id)
    report = report_of(lines)
    check_report(report, "via-controller")
    assert report["bundle"].endswith(".zip") and "/bundles/" in report["bundle"], report
    print("job ran on", task.worker_id, "at", task.worker_address, flush=True)

    # The same name again, now that the job has finished: ALREADY_EXISTS, as in Iris.
    try:
        launch(ctl, job_id, Entrypoint.from_callable(square, 2), blob)
        raise AssertionError("a finished job's name was launched again")
    except ConnectError as e:
        assert e.code.name.lower() == "already_exists", e

    # An actor: a task serves it and registers its endpoint; we resolve it through the
    # controller and call it.
    calc_name = f"{prefix}-calc"
    calc_job = launch(ctl, f"{prefix}-actor", Entrypoint.from_callable(serve_calc, calc_name), blob, ports=["actor"])
    resolver = actor.ClusterResolver(url)

    def calc_ready():
        job = ctl.GetJobStatus(C.GetJobStatusRequest(job_id=calc_job)).job
        assert job.state not in TERMINAL, f"the actor's job ended: {job}"
        return resolver.resolve(calc_name)

    addresses = wait_for("calc endpoint", calc_ready)
    pool = actor.ActorPool(addresses)
    assert pool.call("add", 2, 3) == 5
    assert pool.broadcast("where") == [f"{calc_job}/task-0"]
    ctl.TerminateJob(C.TerminateJobRequest(job_id=calc_job))
    assert wait_job(ctl, calc_job).state == pb.JOB_STATE_KILLED
    assert resolver.resolve(calc_name) == [], "the endpoint went with its job"

    # A WorkerPool-style fan-out: two worker jobs (one per worker), each an actor running what
    # it is sent; work spread over them, results gathered.
    n = 2
    pool_prefix = f"{prefix}-pool/"
    jobs = [launch(ctl, f"{prefix}-pool-{i}", Entrypoint.from_callable(actor.serve_pool_worker, f"{pool_prefix}w{i}"),
                   blob, ports=["actor"]) for i in range(n)]

    def pool_ready():
        for j in jobs:
            job = ctl.GetJobStatus(C.GetJobStatusRequest(job_id=j)).job
            assert job.state not in TERMINAL, f"pool job {j} ended: {job}"
        found = resolver.resolve_prefix(pool_prefix)
        return found if len(found) == n else None

    found = wait_for("pool workers", pool_ready)
    clients = [actor.ActorClient(a) for _, a in sorted(found.items())]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as ex:
        futures = [ex.submit(clients[i % n].call, "execute", square, (i,), {}) for i in range(8)]
        results = [f.result() for f in futures]
    assert results == [i * i for i in range(8)], results
    who = actor.ActorPool([a for _, a in sorted(found.items())]).broadcast("whoami")
    workers = sorted({w["worker_id"] for w in who})
    print("pool workers ran on", workers, flush=True)
    assert len(workers) == n, f"one pool worker per worker process (they share one cache): {who}"
    for j in jobs:
        ctl.TerminateJob(C.TerminateJobRequest(job_id=j))
        assert wait_job(ctl, j).state == pb.JOB_STATE_KILLED
    print("ok cluster", flush=True)


def direct(address, prefix, zip_dir):
    """RunTask as Iris's controller sends it: a file:// bundle it stored, the Entrypoint."""
    w = worker(f"http://{address}")
    path = pathlib.Path(zip_dir) / "bundle.zip"
    path.write_bytes(bundle())
    job_id = f"{prefix}-direct"
    task_id = f"{job_id}/task-0"
    resp = w.RunTask(W.RunTaskRequest(
        job_id=job_id, task_id=task_id, task_index=0, num_tasks=1,
        serialized_entrypoint=cloudpickle.dumps(Entrypoint.from_callable(uses_the_workspace, "via-worker")),
        environment=environment(), bundle_gcs_path=f"file://{path}",
        resources=pb.ResourceSpecProto(replicas=0), timeout_seconds=0, ports=[], attempt_id=0))
    assert resp.task_id == task_id, resp
    status = wait_for("the task's end", lambda: (lambda s: s if s.state in TASK_TERMINAL else None)(
        w.GetTaskStatus(W.GetTaskStatusRequest(task_id=task_id))))
    logs = w.FetchTaskLogs(W.FetchTaskLogsRequest(task_id=task_id, filter=W.FetchLogsFilter())).logs
    assert status.state == pb.TASK_STATE_SUCCEEDED, (status, [(entry.source, entry.data) for entry in logs])
    check_report(report_of([entry.data for entry in logs if entry.source == "stdout"]), "via-worker")

    # The worker answers as Iris's worker does.
    try:
        w.KillTask(W.KillTaskRequest(task_id=task_id, term_timeout_ms=5000))
        raise AssertionError("KillTask of an ended task succeeded")
    except ConnectError as e:
        assert e.code.name.lower() == "failed_precondition", e
        assert e.message == f"Task {task_id} already completed with state TASK_STATE_SUCCEEDED", e.message
    gone = w.FetchTaskLogs(W.FetchTaskLogsRequest(task_id=f"{prefix}-never/task-0", filter=W.FetchLogsFilter()))
    assert list(gone.logs) == []
    rows = json.loads(urllib.request.urlopen(f"http://{address}/api/tasks", timeout=10).read())
    assert isinstance(rows, list) and any(r["task_id"] == task_id and r["status"] == "TASK_STATE_SUCCEEDED"
                                          for r in rows), rows
    print("ok worker", flush=True)


if __name__ == "__main__":
    scenario = sys.argv[1]
    if scenario == "cluster":
        cluster(sys.argv[2], sys.argv[3])
    elif scenario == "worker":
        direct(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(f"unknown scenario {scenario}")
