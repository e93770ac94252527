"""What the Kubernetes API test doubles share: the KServe one (test_deploy_cluster.py) and the Kubeflow
Trainer one (test_trainjob.py).

No Kubernetes API server can run here, so each double is a TEST DOUBLE: an HTTP server on 127.0.0.1 that
answers the API paths bockd uses, so that the real Kubernetes client (``CustomObjectsApi``, ``AppsV1Api``,
``CoreV1Api``) talks to it over real HTTP. This module holds the HTTP side (`serve_api`), the request
record, the API server's error body, where the real CRD schemas are, and what the API server does with a
custom resource that is written (`CustomObjectDouble.write`), in the API server's order:

1. decoding: fields the CRD's structural schema does not declare are dropped (pruning), or, when the
   request asks ``fieldValidation=Strict``, refused with HTTP 400 BadRequest ``<Kind> in version "<v>"
   cannot be handled as a <Kind>: strict decoding error: unknown field "spec.x"`` (KEP-2332 pruning;
   server-side field validation, KEP-2885; kubernetes client 30.1.0 ``CustomObjectsApi`` docstring of
   ``field_validation``: Strict "will fail the request with a BadRequest error if any unknown fields would
   be dropped");
2. mutating admission (`CustomObjectDouble.default`, the project's webhook defaulter);
3. the CRD's schema: a violation is HTTP 422 Invalid (and recorded in ``rejected``: bockd must never write
   one);
4. validating admission (`CustomObjectDouble.admit`): a denial is HTTP 403 Forbidden whose message is
   ``admission webhook "<name>" denied the request: <reason>`` (kubernetes apiserver
   ``pkg/admission/plugin/webhook/errors/statuserror.go`` ToStatusErr; controller-runtime
   ``admission.Denied`` answers 403 Forbidden);
5. storage: ``status`` is never written through the main resource (both CRDs have a status subresource)
   and ``metadata.generation`` counts changes of everything but metadata and status.
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
from urllib.parse import parse_qs

from bockd.platform.kube.crd import CrdValidationError, crd_schema, prune, strict_error, validate_against_crd

# The CRDs bockd's resources must satisfy, vendored in tests/crds: KServe v0.20.0 and Kubeflow Trainer
# (tests/crds/PROVENANCE.md). Tests read every CRD from here.
SCHEMAS = Path(__file__).resolve().parent / "crds"
ISVC_CRD = SCHEMAS / "serving.kserve.io_inferenceservices.yaml"
TRAINJOB_CRD = SCHEMAS / "trainer.kubeflow.org_trainjobs.yaml"
# The Role the pipeline's steps run with: every request a test makes through bockd must be allowed by it.
ROLE = Path(__file__).resolve().parents[1] / "manifests" / "base" / "profile" / "rbac.yaml"


@dataclass
class ApiRequest:
    method: str
    path: str  # without the query string
    query: str
    content_type: str
    body: Any
    authorization: str = ""

    @property
    def params(self) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(self.query).items()}


_REASONS = {400: "BadRequest", 403: "Forbidden", 404: "NotFound", 409: "AlreadyExists", 422: "Invalid"}


def k8s_status(code: int, message: str) -> dict[str, Any]:
    """The body a Kubernetes API server answers an error with."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": code,
        "reason": _REASONS.get(code, ""),
        "message": message,
    }


def without(schema: dict[str, Any], *path: str) -> dict[str, Any]:
    """A copy of an ``openAPIV3Schema`` without the property at ``path`` (e.g. "spec", "canary"): the CRD
    of an older release that lacks a field."""
    out = copy.deepcopy(schema)
    node = out
    for key in path[:-1]:
        node = node["properties"][key]
    del node["properties"][path[-1]]
    return out


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


class Denied(Exception):
    """Raised by `CustomObjectDouble.admit` to deny a request with a message."""


@dataclass
class CustomObjectDouble(ApiDouble):
    """The API of one namespaced custom resource: POST to the collection (``create``), GET of one object
    (after the controller's ``reconcile``), other verbs on one object (``modify``); a subclass plays the
    project's webhooks and controller. An unknown path is answered by ``handle_other`` (404 by default),
    an unknown object is the API server's NotFound."""

    group: ClassVar[str]
    version: ClassVar[str]
    plural: ClassVar[str]
    kind: ClassVar[str]
    webhook: ClassVar[str]  # the validating webhook's name, as the API server quotes it
    crd: ClassVar[Path]
    objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    schema: dict[str, Any] | None = None  # the installed CRD's openAPIV3Schema (default: the `crd` file's)
    refused: list[str] = field(default_factory=list)  # messages of the 400/403 answers

    def __post_init__(self) -> None:
        if self.schema is None:
            self.schema = crd_schema(self.crd, self.version)

    def handle(self, request: ApiRequest) -> tuple[int, dict[str, Any]]:
        pattern = (
            rf"^/apis/{re.escape(self.group)}/{self.version}/namespaces/([^/]+)/{self.plural}(?:/([^/]+))?$"
        )
        m = re.match(pattern, request.path)
        if not m:
            return self.handle_other(request)
        ns, name = m.group(1), m.group(2)
        if name is None:
            if request.method == "POST":
                return self.create(ns, request)
            return 405, k8s_status(405, "only POST to the collection")
        if (ns, name) not in self.objects:
            return 404, k8s_status(404, f'{self.plural}.{self.group} "{name}" not found')
        if request.method == "GET":
            self.reconcile(ns, name)
            return 200, copy.deepcopy(self.objects[ns, name])
        return self.modify(request, ns, name)

    def handle_other(self, request: ApiRequest) -> tuple[int, dict[str, Any]]:
        return 404, k8s_status(404, f"no route {request.path}")

    # -- the API server's handling of a written object

    def write(
        self, request: ApiRequest, obj: dict[str, Any], old: dict[str, Any] | None
    ) -> tuple[int, dict[str, Any]] | dict[str, Any]:
        """Decode, default, validate and admit ``obj`` (the whole object after a create or a patch); the
        object to store, or the error answer."""
        assert self.schema is not None
        obj = {k: v for k, v in obj.items() if k != "status"}  # the status subresource is separate
        pruned, dropped = prune(obj, self.schema)
        if dropped and request.params.get("fieldValidation") == "Strict":
            return self._refuse(400, strict_error(self.kind, self.version, dropped))
        self.default(pruned, old)
        try:
            validate_against_crd(pruned, self.crd)
        except CrdValidationError as e:
            self.rejected.append(str(e))
            return 422, k8s_status(422, str(e))
        try:
            self.admit(pruned, old)
        except Denied as e:
            return self._refuse(403, f'admission webhook "{self.webhook}" denied the request: {e}')
        return pruned

    def _refuse(self, code: int, message: str) -> tuple[int, dict[str, Any]]:
        self.refused.append(message)
        return code, k8s_status(code, message)

    def default(self, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        """The project's mutating webhook."""

    def admit(self, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        """The project's validating webhook: raise `Denied` to refuse."""

    def create(self, ns: str, request: ApiRequest) -> tuple[int, dict[str, Any]]:
        body = request.body
        name = body["metadata"]["name"]
        if (ns, name) in self.objects:
            return 409, k8s_status(409, f'{self.plural}.{self.group} "{name}" already exists')
        if body["metadata"].get("namespace", ns) != ns:
            return 400, k8s_status(400, "the namespace of the object does not match the request's")
        written = self.write(request, copy.deepcopy(body), None)
        if isinstance(written, tuple):
            return written
        written["metadata"].update(namespace=ns, generation=1, uid=f"uid-{name}")
        self.objects[ns, name] = written
        self.created(ns, name)
        return 201, copy.deepcopy(written)

    def created(self, ns: str, name: str) -> None:
        """The controller hears of a new object."""

    def reconcile(self, ns: str, name: str) -> None:
        raise NotImplementedError

    def modify(self, request: ApiRequest, ns: str, name: str) -> tuple[int, dict[str, Any]]:
        return 405, k8s_status(405, request.method)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


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


def rbac_attributes(request: ApiRequest) -> tuple[str, str, str]:
    """(apiGroup, resource, verb) of a request, as the API server's authorizer sees it."""
    m = re.match(r"^/(?:api/v1|apis/([^/]+)/[^/]+)/namespaces/[^/]+/([^/]+)(/[^/]+)?$", request.path)
    assert m, f"not a namespaced resource path: {request.path}"
    named = m.group(3) is not None
    verbs = {"GET": "get" if named else "list", "POST": "create", "PATCH": "patch", "PUT": "update"}
    return m.group(1) or "", m.group(2), verbs.get(request.method, request.method.lower())


def not_allowed(requests: list[ApiRequest]) -> list[tuple[str, str, str]]:
    """The requests the pipeline's Role (`ROLE`) does not allow."""
    import yaml

    (role,) = [d for d in yaml.safe_load_all(ROLE.read_text()) if d["kind"] == "Role"]
    allowed = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    return sorted({rbac_attributes(r) for r in requests} - allowed)


def client_configuration(double: ApiDouble) -> Any:
    """A kubernetes client Configuration that talks to ``double``."""
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = double.host
    return configuration
