"""What the Kubernetes API test doubles share: the KServe one (test_deploy_cluster.py) and the Kubeflow
Trainer one (test_trainjob.py).

No Kubernetes API server can run here, so each double is a TEST DOUBLE: an HTTP server on 127.0.0.1 that
answers the API paths bockd uses, so that the real Kubernetes client (``CustomObjectsApi``) talks to it
over real HTTP. This module holds the HTTP side (`serve_api`), the request record, the API server's error
body and where the real CRD schemas are; each test module holds its controller.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar, TypeVar

# The CRDs bockd's resources must satisfy: ../shared/schemas beside the checkout (CI puts it there too).
SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "schemas"


@dataclass
class ApiRequest:
    method: str
    path: str  # without the query string
    query: str
    content_type: str
    body: Any
    authorization: str = ""


def k8s_status(code: int, message: str) -> dict[str, Any]:
    """The body a Kubernetes API server answers an error with."""
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "message": message}


@dataclass
class ApiDouble:
    """Base of a double: records every request; ``handle`` answers one (under the lock) in a subclass."""

    host: str = ""  # set by serve_api: http://127.0.0.1:<free port>
    requests: list[ApiRequest] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # CRD violations of objects written or made up
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, request: ApiRequest) -> tuple[int, dict[str, Any]]:
        raise NotImplementedError

    def receive(self, request: ApiRequest) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.requests.append(copy.deepcopy(request))
            return self.handle(request)

    def calls(self, method: str) -> list[ApiRequest]:
        return [r for r in self.requests if r.method == method]


@dataclass
class CustomObjectDouble(ApiDouble):
    """The API of one namespaced custom resource: POST to the collection (``create``), GET of one object
    (after the controller's ``reconcile``), other verbs on one object (``modify``); a subclass plays the
    controller. An unknown path is a 404, an unknown object the API server's NotFound."""

    group: ClassVar[str]
    version: ClassVar[str]
    plural: ClassVar[str]
    objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def handle(self, request: ApiRequest) -> tuple[int, dict[str, Any]]:
        pattern = (
            rf"^/apis/{re.escape(self.group)}/{self.version}/namespaces/([^/]+)/{self.plural}(?:/([^/]+))?$"
        )
        m = re.match(pattern, request.path)
        if not m:
            return 404, k8s_status(404, f"no route {request.path}")
        ns, name = m.group(1), m.group(2)
        if name is None:
            if request.method == "POST":
                return self.create(ns, request.body)
            return 405, k8s_status(405, "only POST to the collection")
        if (ns, name) not in self.objects:
            return 404, k8s_status(404, f'{self.plural}.{self.group} "{name}" not found')
        if request.method == "GET":
            self.reconcile(ns, name)
            return 200, copy.deepcopy(self.objects[ns, name])
        return self.modify(request, ns, name)

    def create(self, ns: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        raise NotImplementedError

    def reconcile(self, ns: str, name: str) -> None:
        raise NotImplementedError

    def modify(self, request: ApiRequest, ns: str, name: str) -> tuple[int, dict[str, Any]]:
        return 405, k8s_status(405, request.method)


D = TypeVar("D", bound=ApiDouble)


def _handler(double: ApiDouble) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            path, _, query = self.path.partition("?")
            request = ApiRequest(
                method=self.command,
                path=path,
                query=query,
                content_type=(self.headers.get("Content-Type") or "").split(";")[0],
                body=json.loads(self.rfile.read(length)) if length else None,
                authorization=self.headers.get("Authorization") or "",
            )
            code, payload = double.receive(request)
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:  # quiet test output
            pass

    return Handler


@contextmanager
def serve_api(double: D) -> Iterator[D]:
    """Serve ``double`` on a free port of 127.0.0.1 (its ``host``) until the block ends; a block that ends
    normally must leave no CRD violation behind (an object bockd wrote, or a status the double made up)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(double))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    double.host = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield double
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert double.rejected == [], f"broke the CRD schema: {double.rejected}"


def client_configuration(double: ApiDouble) -> Any:
    """A kubernetes client Configuration that talks to ``double``."""
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = double.host
    return configuration
