"""A small Connect client (unary, JSON) on the standard library, for code running in tasks:
the controller's endpoint registry is what actors need."""

import json
import os
import urllib.error
import urllib.request

CONTROLLER = "iris.cluster.ControllerService"


class RpcError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def call(base_url: str, service: str, method: str, request: dict, timeout: float = 10.0) -> dict:
    req = urllib.request.Request(
        f"{base_url.rstrip('/')}/{service}/{method}",
        data=json.dumps(request).encode(),
        headers={"Content-Type": "application/json", "Connect-Protocol-Version": "1"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        body = json.loads(e.read() or b"{}")
        raise RpcError(body.get("code", "unknown"), body.get("message", "")) from None


def controller_address() -> str:
    """The controller a task's worker gave it (IRIS_CONTROLLER_ADDRESS)."""
    return os.environ["IRIS_CONTROLLER_ADDRESS"]


def register_endpoint(name: str, address: str, job_id: str, controller: str | None = None) -> str:
    resp = call(controller or controller_address(), CONTROLLER, "RegisterEndpoint",
                {"name": name, "address": address, "jobId": job_id})
    return resp.get("endpointId", "")


def list_endpoints(prefix: str, controller: str | None = None) -> list[dict]:
    resp = call(controller or controller_address(), CONTROLLER, "ListEndpoints", {"prefix": prefix})
    return resp.get("endpoints", [])


def lookup_endpoint(name: str, controller: str | None = None) -> dict:
    return call(controller or controller_address(), CONTROLLER, "LookupEndpoint", {"name": name})["endpoint"]
