"""Actors in the shape of Iris's actor layer: a task serves an object (ActorServer) on its
allocated port and registers it as an endpoint with the controller; a client resolves the name
through the controller (ClusterResolver) and calls its methods (ActorClient, ActorPool with
call and broadcast). Calls are HTTP POSTs of cloudpickle((method, args, kwargs)); the answer is
cloudpickle(("ok", value)) or cloudpickle(("error", repr)).

WorkerPool fans callables out over N worker jobs, each an actor that runs what it is sent."""

import http.server
import os
import threading
import urllib.request

import cloudpickle

from iris import rpc


class ActorServer:
    """Serves `instance` under `name` and registers it for the task's job."""

    def __init__(self, name: str, instance, port_name: str = "actor"):
        self.name = name
        self.instance = instance
        host = os.environ.get("IRIS_BIND_HOST", "127.0.0.1")
        port = int(os.environ[f"IRIS_PORT_{port_name.upper()}"])
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                method, args, kwargs = cloudpickle.loads(body)
                try:
                    answer = ("ok", getattr(outer.instance, method)(*args, **kwargs))
                except Exception as e:  # the caller gets it
                    answer = ("error", repr(e))
                data = cloudpickle.dumps(answer)
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        self.address = f"{os.environ.get('IRIS_ADVERTISE_HOST', host)}:{port}"

    def serve_forever(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        rpc.register_endpoint(self.name, self.address, os.environ["IRIS_JOB_ID"])
        print(f"actor {self.name} serving at {self.address}", flush=True)
        threading.Event().wait()


class ActorClient:
    def __init__(self, address: str):
        self.address = address

    def call(self, method: str, *args, **kwargs):
        req = urllib.request.Request(f"http://{self.address}/", data=cloudpickle.dumps((method, args, kwargs)))
        with urllib.request.urlopen(req, timeout=60) as resp:
            kind, value = cloudpickle.loads(resp.read())
        if kind == "error":
            raise RuntimeError(value)
        return value


class ClusterResolver:
    """Names to addresses through the controller's endpoint registry."""

    def __init__(self, controller: str):
        self.controller = controller

    def resolve(self, name: str) -> list[str]:
        return [e["address"] for e in rpc.list_endpoints(name, self.controller) if e["name"] == name]

    def resolve_prefix(self, prefix: str) -> dict[str, str]:
        return {e["name"]: e["address"] for e in rpc.list_endpoints(prefix, self.controller)}


class ActorPool:
    def __init__(self, addresses: list[str]):
        self.clients = [ActorClient(a) for a in addresses]

    def call(self, method: str, *args, **kwargs):
        return self.clients[0].call(method, *args, **kwargs)

    def broadcast(self, method: str, *args, **kwargs) -> list:
        return [c.call(method, *args, **kwargs) for c in self.clients]


class TaskExecutor:
    """What a WorkerPool worker serves: runs the callables it is sent."""

    def execute(self, fn, args, kwargs):
        return fn(*args, **kwargs)

    def whoami(self):
        return {"task_id": os.environ["IRIS_TASK_ID"], "worker_id": os.environ.get("IRIS_WORKER_ID", "")}


def serve_pool_worker(name: str):
    """The entrypoint of a WorkerPool's worker job."""
    ActorServer(name, TaskExecutor()).serve_forever()
