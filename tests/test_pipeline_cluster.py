"""Cluster operations (``bockd.pipeline.cluster``) against an HTTP test double of the KFP v2beta1 REST API.

No Kubeflow Pipelines API server can run here (it needs a Kubernetes cluster, MySQL and object storage),
so these tests talk to a **test double**: a ``ThreadingHTTPServer`` on 127.0.0.1 that implements the
v2beta1 endpoints the module uses (healthz, experiments, pipelines, pipeline versions and their multipart
upload, runs, recurring runs), keeps their state in memory, answers with v2beta1-shaped JSON and records
every request (method, path, query, headers, JSON body or multipart fields). The real ``kfp.Client``
(kfp 2.17.3) and its generated REST bindings make the requests, so the tests pin exactly what goes over
the wire. The pipeline package is a two-component pipeline compiled in the test (and, once, the real
bockd pipeline through ``bockd pipeline submit``/``schedule``).

The double refuses what the real API server (kubeflow/pipelines ``backend/src/apiserver``, tag 2.17.0,
commit 4a3592c) refuses in the requests this module sends, with its status and gRPC code:
runtime parameters checked against the pipeline's root ``inputDefinitions`` on run and recurring-run
creation (each value's JSON kind against its ``parameterType``, a required one missing, one the pipeline
does not declare), a run or recurring run without a display name, ``max_concurrency`` outside 1..10, an
uploaded spec whose ``schemaVersion`` is not 2.1.0, and names longer than the database columns. Each
rule's upstream file and line is beside its code below.

(No ``from __future__ import annotations`` here: kfp.dsl reads the components' annotations as types.)
"""

import email.parser
import email.policy
import hashlib
import importlib.util
import itertools
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kfp
import kfp_server_api
import pytest
import yaml
from google.protobuf import json_format
from kfp import compiler, dsl
from kfp.pipeline_spec import pipeline_spec_pb2

try:
    from bockd.pipeline import cluster
except ImportError:  # until the package mapping for pipeline/ is wired
    _spec = importlib.util.spec_from_file_location(
        "bockd_pipeline_cluster", Path(__file__).resolve().parents[1] / "pipeline" / "cluster.py"
    )
    assert _spec is not None and _spec.loader is not None
    cluster = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(cluster)

TOKEN = "s3cr3t-kfp-token-7f9c2a"
API = "/apis/v2beta1"
CREATED_AT = "2026-01-02T03:04:05Z"


# ------------------------------------------------------------------------------------------ test double


@dataclass
class Request:
    """One request the double received."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    body: Any = None  # parsed JSON body
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # multipart: field -> (filename, data)


def _matches(filter_json: str | None, item: dict[str, Any]) -> bool:
    """Apply a v2beta1 filter (only EQUALS predicates, as 1 or "EQUALS") to one resource."""
    if not filter_json:
        return True
    for predicate in json.loads(filter_json).get("predicates", []):
        assert predicate["operation"] in (1, "EQUALS"), predicate
        if item.get(predicate["key"]) != predicate["stringValue"]:
            return False
    return True


# -- upstream rules the double enforces (kubeflow/pipelines tag 2.17.0, backend/src/apiserver) --------

# template/v2_template.go validatePipelineJobInputs, lines 477-504: the JSON kind each parameterType takes
# (NUMBER_INTEGER takes any number, a string never).
_PARAMETER_KINDS: dict[str, tuple[type, ...]] = {
    "NUMBER_DOUBLE": (int, float),
    "NUMBER_INTEGER": (int, float),
    "STRING": (str,),
    "BOOLEAN": (bool,),
    "LIST": (list,),
    "STRUCT": (dict,),
}
# validation/length.go lines 41, 47, 51: the logical column sizes (checked since 2.15.0) that
# api_converter.go (lines 100, 233, 442) and pipeline_upload_server.go (line 285) enforce.
_MAX_NAME = {"experiment": 128, "pipeline": 128, "pipeline version": 127}


def _invalid(message: str) -> tuple[int, dict[str, Any]]:
    """util.NewInvalidInputError: gRPC InvalidArgument (3), HTTP 400 through grpc-gateway."""
    return 400, {"code": 3, "message": message, "details": []}


def runtime_parameter_error(spec: dict[str, Any], parameters: dict[str, Any]) -> str | None:
    """What validatePipelineJobInputs (v2_template.go lines 442-532) says about ``parameters``, or None.

    Run creation (RunWorkflow, line 373), a pinned recurring run (ScheduledWorkflow, line 129) and a
    "latest" one (resource_manager.go lines 1329-1358, against the latest version) all call it.
    """
    declared = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    for name, param in declared.items():
        if name not in parameters:
            # lines 468-474: a missing one needs isOptional or a default
            if not param.get("isOptional") and "defaultValue" not in param:
                return (
                    f"parameter {name} is not optional, yet has neither default value nor user provided value"
                )
            continue
        kinds = _PARAMETER_KINDS.get(param.get("parameterType", ""))
        if kinds is None:
            return f"input parameter {name} requires type unknown"
        if type(parameters[name]) not in kinds:  # type(): JSON true is no number (bool is an int here)
            wanted = param["parameterType"].lower()
            return (
                f"input parameter {name} requires type {wanted}, but the parameter value is not of that type"
            )
    extra = sorted(set(parameters) - set(declared))  # lines 519-529
    if extra:
        return f"parameter(s) provided are not required by pipeline: {', '.join(extra)}"
    return None


def _run_spec(body: dict[str, Any]) -> dict[str, Any]:
    """An inline spec as kfp sends it: bare, or {pipeline_spec, platform_spec} (api_util.go lines 125-148)."""
    spec = body.get("pipeline_spec") or {}
    return spec.get("pipeline_spec", spec)


def _name_error(kind: str, name: str) -> str | None:
    limit = _MAX_NAME[kind]
    return f"{kind} name length cannot exceed {limit}" if len(name) > limit else None


class KfpDouble:
    """In-memory stand-in for the KFP v2beta1 REST API (a test double: no KFP server can run here).

    It enforces these upstream rules (kubeflow/pipelines tag 2.17.0; file and line at each check):
    runtime parameters typed, required and declared as the pipeline's root inputDefinitions say
    (v2_template.go 442-532) on ``POST /runs`` and ``POST /recurringruns``; non-empty run and recurring
    run display names (run_server.go 140, api_converter.go 2041); ``max_concurrency`` in 1..10
    (api_converter.go 2084); uploaded specs of schemaVersion 2.1.0 (v2_template.go 230); name lengths
    (validation/length.go 41-51).
    """

    max_page_size = 2  # small, so that listing recurring runs needs several pages

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.experiments: dict[str, dict[str, Any]] = {}
        self.pipelines: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.recurring_runs: dict[str, dict[str, Any]] = {}
        self.uploads: dict[str, bytes] = {}  # pipeline_version_id -> uploaded package bytes
        self.echo_token_401 = False  # answer 401 with a body that echoes the Authorization header
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.host = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    # -- plumbing -------------------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # silence stderr
                pass

            def _serve(self) -> None:
                url = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                request = Request(
                    self.command, url.path, query, {k.lower(): v for k, v in self.headers.items()}
                )
                content_type = self.headers.get("Content-Type", "")
                if content_type.startswith("multipart/form-data"):
                    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw
                    )
                    for part in message.iter_parts():
                        name = part.get_param("name", header="content-disposition")
                        request.files[name] = (part.get_filename(), part.get_payload(decode=True))
                elif raw:
                    request.body = json.loads(raw)
                with double._lock:
                    double.requests.append(request)
                    status, payload = double.route(request)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _serve

        return Handler

    def __enter__(self) -> "KfpDouble":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)

    def _id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids):04d}"

    @staticmethod
    def _not_found(what: str) -> tuple[int, dict[str, Any]]:
        return 404, {"code": 5, "message": f"{what} not found", "details": []}

    def calls(self) -> list[tuple[str, str]]:
        """(method, path) of every request so far."""
        return [(r.method, r.path) for r in self.requests]

    def only(self, method: str, path: str) -> Request:
        matching = [r for r in self.requests if (r.method, r.path) == (method, path)]
        assert len(matching) == 1, (method, path, self.calls())
        return matching[0]

    # -- seeding (state that exists on the "server" before a test) ------------------------------------

    def seed_recurring_run(self, name: str, experiment_id: str, cron: str = "0 0 1 * * *") -> str:
        rid = self._id("rr")
        self.recurring_runs[rid] = {
            "recurring_run_id": rid,
            "display_name": name,
            "experiment_id": experiment_id,
            "namespace": "",
            "pipeline_version_reference": {"pipeline_id": "p-seed", "pipeline_version_id": "pv-seed"},
            "runtime_config": {"parameters": {}},
            "max_concurrency": "1",
            "no_catchup": True,
            "trigger": {"cron_schedule": {"cron": cron}},
            "mode": "ENABLE",
            "status": "ENABLED",
            "created_at": CREATED_AT,
            "updated_at": CREATED_AT,
        }
        return rid

    def seed_experiment(self, name: str) -> str:
        eid = self._id("exp")
        self.experiments[eid] = {
            "experiment_id": eid,
            "display_name": name,
            "namespace": "",
            "created_at": CREATED_AT,
            "storage_state": "AVAILABLE",
        }
        return eid

    # -- upstream checks that need the double's state ------------------------------------------------

    def _spec_of(self, body: dict[str, Any]) -> dict[str, Any]:
        """The spec a run or recurring run executes: inline, the pinned version's, or (a pipeline id
        only) the pipeline's latest version's (resource_manager.go 1303-1358)."""
        ref = body.get("pipeline_version_reference")
        if not ref:
            return _run_spec(body)
        if ref.get("pipeline_version_id"):
            return self.versions[ref["pipeline_version_id"]]["pipeline_spec"]
        versions = [v for v in self.versions.values() if v["pipeline_id"] == ref["pipeline_id"]]
        return versions[-1]["pipeline_spec"]

    def _recurring_run_error(self, body: dict[str, Any]) -> str | None:
        if not body.get("display_name"):  # api_converter.go 2041-2044
            return "Recurring run's name cannot be empty"
        if not 1 <= int(body.get("max_concurrency") or 0) <= 10:  # api_converter.go 2084-2086
            return "Max concurrency of a recurring run must be at least 1 and at most 10"
        params = body.get("runtime_config", {}).get("parameters", {})
        error = runtime_parameter_error(self._spec_of(body), params)
        return error and f"Failed to validate the input parameters: {error}"

    # -- the v2beta1 API ------------------------------------------------------------------------------

    def route(self, r: Request) -> tuple[int, Any]:
        if self.echo_token_401:
            return 401, {"code": 16, "message": f"invalid credentials: {r.headers.get('authorization')}"}
        parts = r.path.removeprefix(API).strip("/").split("/")
        match (r.method, parts):
            case ("GET", ["healthz"]):
                return 200, {"multi_user": False, "pipeline_store": "database"}
            case ("GET", ["experiments"]):
                found = [e for e in self.experiments.values() if _matches(r.query.get("filter"), e)]
                return 200, {"experiments": found, "total_size": len(found)} if found else {}
            case ("POST", ["experiments"]):
                if error := _name_error("experiment", r.body["display_name"]):
                    return _invalid(error)
                eid = self.seed_experiment(r.body["display_name"])
                self.experiments[eid]["namespace"] = r.body.get("namespace") or ""
                return 200, self.experiments[eid]
            case ("GET", ["pipelines"]):
                found = [p for p in self.pipelines.values() if _matches(r.query.get("filter"), p)]
                return 200, {"pipelines": found, "total_size": len(found)} if found else {}
            case ("POST", ["pipelines"]):
                if error := _name_error("pipeline", r.body["name"]):
                    return _invalid(error)
                pid = self._id("p")
                self.pipelines[pid] = {
                    "pipeline_id": pid,
                    "name": r.body["name"],
                    "display_name": r.body.get("display_name") or r.body["name"],
                    "namespace": r.body.get("namespace") or "",
                    "created_at": CREATED_AT,
                }
                return 200, self.pipelines[pid]
            case ("GET", ["pipelines", pid, "versions"]):
                if pid not in self.pipelines:
                    return self._not_found(f"pipeline {pid}")
                found = [
                    v
                    for v in self.versions.values()
                    if v["pipeline_id"] == pid and _matches(r.query.get("filter"), v)
                ]
                return 200, {"pipeline_versions": found, "total_size": len(found)} if found else {}
            case ("POST", ["pipelines", "upload_version"]):
                pid = r.query["pipelineid"]
                if pid not in self.pipelines:
                    return self._not_found(f"pipeline {pid}")
                name = r.query["name"]
                if any(v["pipeline_id"] == pid and v["name"] == name for v in self.versions.values()):
                    return 409, {"code": 6, "message": f"pipeline version {name} already exists"}
                if error := _name_error("pipeline version", name):  # pipeline_upload_server.go 285
                    return _invalid(error)
                filename, data = r.files["uploadfile"]
                assert filename.endswith(".yaml"), filename
                spec = next(yaml.safe_load_all(data))
                if spec.get("schemaVersion") != "2.1.0":  # v2_template.go 230-232
                    return _invalid("KFP only supports schema version 2.1.0")
                vid = self._id("pv")
                self.versions[vid] = {
                    "pipeline_id": pid,
                    "pipeline_version_id": vid,
                    "name": name,
                    "display_name": r.query.get("display_name") or name,
                    "created_at": CREATED_AT,
                    "pipeline_spec": spec,
                }
                self.uploads[vid] = data
                return 200, self.versions[vid]
            case ("POST", ["runs"]):
                if not r.body.get("display_name"):  # run_server.go 140-142
                    return _invalid("The run name is empty. Please specify a valid name")
                spec = self._spec_of(r.body)
                params = r.body.get("runtime_config", {}).get("parameters", {})
                if error := runtime_parameter_error(spec, params):
                    return _invalid(f"invalid pipeline job inputs: {error}")
                rid = self._id("run")
                self.runs[rid] = {
                    **r.body,
                    "run_id": rid,
                    "state": "PENDING",
                    "storage_state": "AVAILABLE",
                    "created_at": CREATED_AT,
                }
                return 200, self.runs[rid]
            case ("POST", ["recurringruns"]):
                if error := self._recurring_run_error(r.body):
                    return _invalid(error)
                rid = self._id("rr")
                enabled = r.body.get("mode", "ENABLE") == "ENABLE"
                self.recurring_runs[rid] = {
                    **r.body,
                    "recurring_run_id": rid,
                    "max_concurrency": str(r.body.get("max_concurrency", "1")),
                    "status": "ENABLED" if enabled else "DISABLED",
                    "namespace": "",
                    "created_at": CREATED_AT,
                    "updated_at": CREATED_AT,
                }
                return 200, self.recurring_runs[rid]
            case ("GET", ["recurringruns"]):
                found = [
                    rr
                    for rr in self.recurring_runs.values()
                    if r.query.get("experiment_id") in (None, rr["experiment_id"])
                ]
                size = min(int(r.query.get("page_size") or 10), self.max_page_size)
                start = int(r.query.get("page_token") or 0)
                page = found[start : start + size]
                # The proto field is `recurringRuns` (camelCase), unlike `experiments`, `pipeline_versions`...
                answer: dict[str, Any] = {"recurringRuns": page, "total_size": len(found)} if page else {}
                if start + size < len(found):
                    answer["next_page_token"] = str(start + size)
                return 200, answer
            case ("POST", ["recurringruns", action]) if ":" in action:
                rid, verb = action.split(":", 1)
                if rid not in self.recurring_runs or verb not in ("enable", "disable"):
                    return self._not_found(f"recurring run {rid}")
                rr = self.recurring_runs[rid]
                rr["mode"], rr["status"] = (
                    ("ENABLE", "ENABLED") if verb == "enable" else ("DISABLE", "DISABLED")
                )
                return 200, {}
            case ("DELETE", ["recurringruns", rid]):
                if self.recurring_runs.pop(rid, None) is None:
                    return self._not_found(f"recurring run {rid}")
                return 200, {}
        return 404, {"code": 5, "message": f"no route for {r.method} {r.path}"}


# ------------------------------------------------------------------------------------------- fixtures


@dsl.component(base_image="python:3.11-slim")
def _add(a: int, b: int) -> int:
    return a + b


@dsl.component(base_image="python:3.11-slim")
def _show(x: int) -> str:
    return f"sum={x}"


@dsl.pipeline(name="tiny-pipeline")
def _tiny(a: int = 1, b: int = 2) -> None:
    total = _add(a=a, b=b)
    _show(x=total.output)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-task pipeline compiled to YAML (caching on by default, as the compiler writes it)."""
    path = tmp_path_factory.mktemp("pkg") / "tiny.yaml"
    compiler.Compiler().compile(_tiny, str(path))
    return path


@pytest.fixture(autouse=True)
def _isolated_kfp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep kfp away from ~/.config/kfp/context.json and the KF_PIPELINES_* environment."""
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    for name in (
        "KFP_TOKEN",
        "KF_PIPELINES_ENDPOINT",
        "KF_PIPELINES_UI_ENDPOINT",
        "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME",
        "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME",
        "KF_PIPELINES_IAP_OAUTH2_CLIENT_ID",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def kfp_api() -> Iterator[KfpDouble]:
    """A fresh KFP v2beta1 test double (no real KFP server can run here)."""
    with KfpDouble() as double:
        yield double


def _spec_as_kfp_sends_it(package: Path, enable_caching: bool | None = None) -> dict[str, Any]:
    """The package's PipelineSpec round-tripped through protobuf JSON, as kfp puts it in a request."""
    spec = json_format.ParseDict(
        next(yaml.safe_load_all(package.read_text())), pipeline_spec_pb2.PipelineSpec()
    )
    if enable_caching is not None:
        for task in spec.root.dag.tasks.values():
            task.caching_options.enable_cache = enable_caching
    return json_format.MessageToDict(spec)


def _tasks(spec: dict[str, Any]) -> dict[str, Any]:
    return spec["root"]["dag"]["tasks"]


# -------------------------------------------------------------------------------------------- connect


def test_connect_reads_the_token_from_the_environment(kfp_api: KfpDouble, monkeypatch) -> None:
    """Against the KFP test double (no KFP server runs here): the token travels only as a Bearer header."""
    monkeypatch.setenv("MY_KFP_TOKEN", TOKEN)
    client = cluster.connect(kfp_api.host, token_env="MY_KFP_TOKEN")
    assert kfp_api.calls() == [("GET", f"{API}/healthz")]  # kfp asks whether the deployment is multi-user
    assert kfp_api.requests[0].headers["authorization"] == f"Bearer {TOKEN}"
    assert isinstance(client, kfp.Client)


def test_connect_with_a_namespace_sends_nothing_and_rejects_bad_hosts(kfp_api: KfpDouble) -> None:
    """Against the KFP test double (no KFP server runs here): a namespace skips the healthz probe."""
    client = cluster.connect(kfp_api.host, namespace="team-a")
    assert client.get_user_namespace() == "team-a"
    assert kfp_api.requests == []
    for host in ("", "127.0.0.1:8888", "ftp://kfp"):
        with pytest.raises(cluster.ClusterError, match="host"):
            cluster.connect(host)
    with pytest.raises(cluster.ClusterError, match="token_env"):
        cluster.connect(kfp_api.host, token_env="not a name")


# --------------------------------------------------------------------------------------------- submit


def test_submit_gets_or_creates_the_experiment_and_posts_the_run(
    kfp_api: KfpDouble, package: Path, monkeypatch
) -> None:
    """Against the KFP test double (no KFP server runs here): exact requests of two submissions."""
    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    client = cluster.connect(kfp_api.host)
    params = {"a": 3, "b": 4}
    info = cluster.submit(
        client, package, experiment="bockd-dev", run_name="nightly-1", params=params, namespace=None
    )
    assert kfp_api.calls() == [
        ("GET", f"{API}/healthz"),
        ("GET", f"{API}/experiments"),  # get ...
        ("POST", f"{API}/experiments"),  # ... or create
        ("POST", f"{API}/runs"),
    ]
    lookup = kfp_api.requests[1]
    assert json.loads(lookup.query["filter"]) == {
        "predicates": [{"operation": 1, "key": "display_name", "stringValue": "bockd-dev"}]
    }
    assert lookup.query["namespace"] == ""  # kfp sends its (empty) context namespace: single-user
    assert kfp_api.requests[2].body == {"display_name": "bockd-dev"}
    run = kfp_api.only("POST", f"{API}/runs").body
    assert run["display_name"] == "nightly-1"
    assert run["experiment_id"] == info.experiment_id == "exp-0001"
    assert run["pipeline_spec"] == _spec_as_kfp_sends_it(package)
    assert run["runtime_config"] == {"parameters": params}
    assert "pipeline_version_reference" not in run
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in kfp_api.requests)
    assert info == cluster.RunInfo(
        run_id="run-0002",
        name="nightly-1",
        experiment_id="exp-0001",
        url=f"{kfp_api.host}/#/runs/details/run-0002",
    )

    # A second submission finds the experiment: no POST /experiments.
    cluster.submit(client, package, experiment="bockd-dev", run_name="nightly-2", params={}, namespace=None)
    assert kfp_api.calls()[4:] == [("GET", f"{API}/experiments"), ("POST", f"{API}/runs")]
    assert kfp_api.requests[-1].body["experiment_id"] == "exp-0001"


def test_submit_without_a_token_sends_no_authorization_header(kfp_api: KfpDouble, package: Path) -> None:
    """Against the KFP test double (no KFP server runs here): $KFP_TOKEN unset means no auth header."""
    client = cluster.connect(kfp_api.host)
    cluster.submit(client, package, experiment="e", run_name="r", params={"a": 1}, namespace=None)
    assert len(kfp_api.requests) == 4
    assert all("authorization" not in r.headers for r in kfp_api.requests)


def test_submit_caching_override_rewrites_every_task(kfp_api: KfpDouble, package: Path) -> None:
    """Against the KFP test double (no KFP server runs here): enable_caching lands in each task's options.

    kfp sends the spec as protobuf JSON, where ``enableCache: false`` is the proto3 default and is
    omitted: a disabled task arrives as ``cachingOptions: {}``.
    """
    client = cluster.connect(kfp_api.host, namespace="team-a")
    cluster.submit(client, package, experiment="e", run_name="as-compiled", params={}, namespace="team-a")
    cluster.submit(
        client,
        package,
        experiment="e",
        run_name="no-cache",
        params={},
        namespace="team-a",
        enable_caching=False,
    )
    as_compiled, no_cache = (r.body for r in kfp_api.requests if r.path == f"{API}/runs")
    compiled_tasks = _tasks(as_compiled["pipeline_spec"]).values()
    assert [t["cachingOptions"] for t in compiled_tasks] == [{"enableCache": True}] * 2
    assert [t["cachingOptions"] for t in _tasks(no_cache["pipeline_spec"]).values()] == [{}, {}]
    assert no_cache["pipeline_spec"] == _spec_as_kfp_sends_it(package, enable_caching=False)
    assert kfp_api.requests[0].query["namespace"] == "team-a"
    assert kfp_api.requests[1].body == {"display_name": "e", "namespace": "team-a"}


def test_submit_rejects_bad_input_before_any_request(kfp_api: KfpDouble, package: Path, tmp_path) -> None:
    """Against the KFP test double (no KFP server runs here): local mistakes never reach the server."""
    client = cluster.connect(kfp_api.host, namespace="team-a")
    with pytest.raises(cluster.ClusterError, match="package_path"):
        cluster.submit(client, tmp_path / "missing.yaml", experiment="e", run_name="r", params={})
    with pytest.raises(cluster.ClusterError, match="package_path"):
        cluster.submit(client, tmp_path / "pipeline.tar.gz", experiment="e", run_name="r", params={})
    with pytest.raises(cluster.ClusterError, match="run_name"):
        cluster.submit(client, package, experiment="e", run_name=" ", params={})
    assert kfp_api.requests == []


@pytest.mark.parametrize(
    ("params", "detail"),
    [
        ({"a": "3"}, "input parameter a requires type number_integer"),  # a string for an int
        ({"a": True}, "input parameter a requires type number_integer"),  # JSON true is no number
        ({"a": 3, "c": 1}, "parameter(s) provided are not required by pipeline: c"),
    ],
)
def test_the_api_refuses_runtime_parameters_the_pipeline_does_not_declare_so(
    kfp_api: KfpDouble, package: Path, params: dict[str, Any], detail: str
) -> None:
    """Against the KFP test double, which checks runtime parameters as the API server does: a run whose
    parameters do not match the root inputDefinitions is refused (400) and none is created."""
    client = cluster.connect(kfp_api.host, namespace="team-a")
    with pytest.raises(cluster.ClusterError) as raised:
        cluster.submit(client, package, experiment="e", run_name="r", params=params)
    assert "answered 400" in str(raised.value) and detail in str(raised.value)
    assert kfp_api.runs == {}


def test_the_bockd_pipeline_submitted_and_scheduled_through_the_cli_passes_the_api_checks(
    kfp_api: KfpDouble,
) -> None:
    """Against the KFP test double: the real compiled bockd pipeline with the parameters the CLI builds
    (``RunParameters``) passes the API server's parameter checks, on run and recurring-run creation."""
    from bockd.cli import main

    host = ["--host", kfp_api.host, "--namespace", "team-a", "--baselines", "1,5"]
    assert main(["pipeline", "submit", *host, "--gpus", "2"]) == 0
    assert main(["pipeline", "schedule", *host, "--cron", "0 0 3 * * 1", "--version", "latest"]) == 0
    run = kfp_api.only("POST", f"{API}/runs").body
    declared = _run_spec(run)["root"]["inputDefinitions"]["parameters"]
    sent = run["runtime_config"]["parameters"]
    assert set(sent) == set(declared)
    assert sent["baseline_students"] == [1, 5]
    scheduled = kfp_api.only("POST", f"{API}/recurringruns").body
    assert scheduled["runtime_config"]["parameters"] == sent
    assert len(kfp_api.runs) == len(kfp_api.recurring_runs) == 1


# ------------------------------------------------------------------------------------------- schedule


def _schedule(client: kfp.Client, package: Path, **overrides: Any) -> cluster.ScheduleInfo:
    kwargs: dict[str, Any] = {
        "experiment": "bockd-nightly",
        "job_name": "nightly",
        "cron": "0 0 3 * * *",
        "params": {"a": 5, "b": 6},
        "pipeline_name": "bockd-tiny",
        "version": "pin",
    }
    return cluster.schedule(client, package, **{**kwargs, **overrides})


def test_schedule_pin_uploads_a_version_and_creates_a_pinned_recurring_run(
    kfp_api: KfpDouble, package: Path, monkeypatch
) -> None:
    """Against the KFP test double (no KFP server runs here): exact requests for a new pipeline."""
    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    client = cluster.connect(kfp_api.host)
    info = _schedule(client, package)
    assert kfp_api.calls() == [
        ("GET", f"{API}/healthz"),
        ("GET", f"{API}/experiments"),
        ("POST", f"{API}/experiments"),
        ("GET", f"{API}/pipelines"),
        ("POST", f"{API}/pipelines"),
        ("GET", f"{API}/pipelines/p-0002/versions"),
        ("POST", f"{API}/pipelines/upload_version"),
        ("POST", f"{API}/recurringruns"),
    ]
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in kfp_api.requests)
    pipeline_lookup = kfp_api.requests[3]
    assert json.loads(pipeline_lookup.query["filter"])["predicates"][0]["stringValue"] == "bockd-tiny"
    assert kfp_api.requests[4].body == {"name": "bockd-tiny", "display_name": "bockd-tiny"}

    # The upload is multipart; the package in it has caching off on every task (enable_caching=False).
    upload = kfp_api.only("POST", f"{API}/pipelines/upload_version")
    assert upload.headers["content-type"].startswith("multipart/form-data; boundary=")
    filename, data = upload.files["uploadfile"]
    assert filename == "tiny.yaml"
    uploaded = next(yaml.safe_load_all(data))
    assert [t["cachingOptions"] for t in _tasks(uploaded).values()] == [{"enableCache": False}] * 2
    compiled = next(yaml.safe_load_all(package.read_text()))
    assert {k: v for k, v in uploaded.items() if k != "root"} == {
        k: v for k, v in compiled.items() if k != "root"
    }
    version_name = f"bockd-tiny-sha256-{hashlib.sha256(data).hexdigest()[:16]}"
    assert upload.query == {"name": version_name, "pipelineid": "p-0002"}
    assert json.loads(kfp_api.requests[5].query["filter"])["predicates"][0]["stringValue"] == version_name

    body = kfp_api.only("POST", f"{API}/recurringruns").body
    assert body == {
        "display_name": "nightly",
        "experiment_id": "exp-0001",
        "pipeline_version_reference": {"pipeline_id": "p-0002", "pipeline_version_id": "pv-0003"},
        "runtime_config": {"parameters": {"a": 5, "b": 6}},
        "trigger": {"cron_schedule": {"cron": "0 0 3 * * *"}},
        "max_concurrency": "1",
        "no_catchup": True,
        "mode": "ENABLE",
    }
    assert "pipeline_spec" not in body  # the run executes the uploaded version's spec
    assert info == cluster.ScheduleInfo(
        id="rr-0004",
        name="nightly",
        cron="0 0 3 * * *",
        enabled=True,
        status="ENABLED",
        experiment_id="exp-0001",
        pipeline_id="p-0002",
        pipeline_version_id="pv-0003",
        max_concurrency=1,
        no_catchup=True,
    )


def test_schedule_again_reuses_pipeline_and_version_and_latest_drops_the_version(
    kfp_api: KfpDouble, package: Path
) -> None:
    """Against the KFP test double (no KFP server runs here): same package reused; 'latest' is unpinned."""
    client = cluster.connect(kfp_api.host, namespace="team-a")
    first = _schedule(client, package)
    start = len(kfp_api.requests)
    latest = _schedule(client, package, job_name="nightly-latest", version="latest", cron="30 2 * * mon-fri")
    assert kfp_api.calls()[start:] == [
        ("GET", f"{API}/experiments"),
        ("GET", f"{API}/pipelines"),
        ("GET", f"{API}/pipelines/p-0002/versions"),
        ("POST", f"{API}/recurringruns"),  # no pipeline, experiment or version created, nothing uploaded
    ]
    body = kfp_api.requests[-1].body
    assert body["pipeline_version_reference"] == {"pipeline_id": first.pipeline_id}
    assert body["trigger"] == {"cron_schedule": {"cron": "0 30 2 * * mon-fri"}}  # 5 fields: "0 " prefixed
    assert (latest.pipeline_id, latest.pipeline_version_id, latest.cron) == (
        "p-0002",
        None,
        "0 30 2 * * mon-fri",
    )
    assert kfp_api.requests[start + 1].query["namespace"] == "team-a"

    # A different package (here: caching left as compiled) is a new version of the same pipeline.
    start = len(kfp_api.requests)
    other = _schedule(
        client, package, job_name="cached", enable_caching=None, max_concurrency=2, no_catchup=False
    )
    assert kfp_api.calls()[start:] == [
        ("GET", f"{API}/experiments"),
        ("GET", f"{API}/pipelines"),
        ("GET", f"{API}/pipelines/p-0002/versions"),
        ("POST", f"{API}/pipelines/upload_version"),
        ("POST", f"{API}/recurringruns"),
    ]
    assert kfp_api.uploads[other.pipeline_version_id] == package.read_bytes()  # sent unchanged
    assert other.pipeline_version_id != first.pipeline_version_id
    assert kfp_api.requests[-1].body["max_concurrency"] == "2"
    assert kfp_api.requests[-1].body["no_catchup"] is False
    assert len(kfp_api.versions) == 2


@pytest.mark.parametrize("version", ["pin", "latest"])
def test_schedule_parameters_are_checked_against_the_version_that_runs(
    kfp_api: KfpDouble, package: Path, version: str
) -> None:
    """Against the KFP test double: a recurring run's parameters are checked against the pinned version,
    or the pipeline's latest one, as the API server does; a refused one creates no recurring run."""
    client = cluster.connect(kfp_api.host, namespace="team-a")
    with pytest.raises(cluster.ClusterError, match=r"answered 400.*input parameter b requires type"):
        _schedule(client, package, version=version, params={"a": 1, "b": "2"})
    assert kfp_api.recurring_runs == {}
    assert len(kfp_api.versions) == 1


def test_the_double_refuses_a_max_concurrency_outside_1_to_10(kfp_api: KfpDouble, package: Path) -> None:
    """The double itself (the client never sends it): api_converter.go's range check answers 400."""
    client = cluster.connect(kfp_api.host, namespace="team-a")
    info = _schedule(client, package)
    body = kfp_server_api.V2beta1RecurringRun(
        display_name="too-wide",
        experiment_id=info.experiment_id,
        pipeline_version_reference=kfp_server_api.V2beta1PipelineVersionReference(
            pipeline_id=info.pipeline_id, pipeline_version_id=info.pipeline_version_id
        ),
        trigger=kfp_server_api.V2beta1Trigger(
            cron_schedule=kfp_server_api.V2beta1CronSchedule(cron="@daily")
        ),
        max_concurrency="11",
        mode=kfp_server_api.RecurringRunMode.ENABLE,
    )
    with pytest.raises(kfp_server_api.ApiException) as raised:
        client.recurring_runs.recurring_run_service_create_recurring_run(recurring_run=body)
    assert raised.value.status == 400
    assert len(kfp_api.recurring_runs) == 1


@pytest.mark.parametrize(
    ("cron", "detail"),
    [
        ("* * *", "3 fields"),
        ("0 0 3 * * * *", "7 fields"),
        ("0 60 3 * * *", "minute field: 60 is out of range 0-59"),
        ("0 0 24 * * *", "hour field: 24 is out of range 0-23"),
        ("0 0 0 32 * *", "day-of-month field: 32 is out of range 1-31"),
        ("0 0 0 * 0 *", "month field: 0 is out of range 1-12"),
        ("0 0 0 * * 7", "day-of-week field: 7 is out of range 0-6"),
        ("0 0 0 * * funday", "day-of-week field: 'funday' is not a number 0-6 or a name"),
        ("0 0 0 L * *", "day-of-month field: 'L' is not a number 1-31"),
        ("0 */0 * * * *", "step '0'"),
        ("0 0 9-5 * * *", "range '9-5' runs backwards"),
        ("0 ? * * * *", "'?' is only allowed"),
        ("0 1,,2 * * * *", "empty list item"),
        ("@every", "exactly one duration"),
        ("@every 1 hour", "exactly one duration"),
        ("@every 1d", "not a Go duration"),
        ("@every 500ms", "shorter than one second"),
        ("@fortnightly", "unknown descriptor"),
        ("", "empty"),
    ],
)
def test_malformed_cron_raises_before_any_request(
    kfp_api: KfpDouble, package: Path, monkeypatch, cron: str, detail: str
) -> None:
    """Against the KFP test double (no KFP server runs here): a bad cron is refused with zero requests."""
    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    client = cluster.connect(kfp_api.host, namespace="team-a")  # a namespace: connect sends nothing
    with pytest.raises(cluster.ClusterError) as raised:
        _schedule(client, package, cron=cron)
    message = str(raised.value)
    assert message.startswith("cron: ")
    assert detail in message
    assert "6 space-separated fields 'second minute hour day-of-month month day-of-week'" in message
    assert kfp_api.requests == []


def test_schedule_rejects_other_bad_input_before_any_request(kfp_api: KfpDouble, package: Path) -> None:
    """Against the KFP test double (no KFP server runs here): every argument is checked before sending."""
    client = cluster.connect(kfp_api.host, namespace="team-a")
    for overrides, field_name in [
        ({"version": "newest"}, "version"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"max_concurrency": 11}, "max_concurrency"),  # the API keeps 1..10
        ({"pipeline_name": "p" * 104}, "pipeline_name"),  # + "-sha256-<16 hex>" > the API's 127
        ({"job_name": ""}, "job_name"),
        ({"pipeline_name": " "}, "pipeline_name"),
        ({"params": [1, 2]}, "params"),
    ]:
        with pytest.raises(cluster.ClusterError, match=f"^{field_name}: "):
            _schedule(client, package, **overrides)
    assert kfp_api.requests == []


@pytest.mark.parametrize(
    ("cron", "sent"),
    [
        ("0 0 3 * * *", "0 0 3 * * *"),
        ("  0  0   3 * *  * ", "0 0 3 * * *"),
        ("30 2 * * 1", "0 30 2 * * 1"),
        ("*/15 * * * * *", "*/15 * * * * *"),
        ("0 0 9-17/2 * * mon-fri", "0 0 9-17/2 * * mon-fri"),
        ("0 0 0 1,15 JAN,Jul ?", "0 0 0 1,15 JAN,Jul ?"),
        ("0 0 0 ? * SUN", "0 0 0 ? * SUN"),
        ("0 5/10 * * * *", "0 5/10 * * * *"),
        ("@daily", "@daily"),
        ("@Weekly", "@weekly"),
        ("@every 1h30m", "@every 1h30m"),
        ("@every 1.5s", "@every 1.5s"),
    ],
)
def test_validate_cron_accepts_robfig_syntax(cron: str, sent: str) -> None:
    """Pure function: the six-field (seconds first) form that is sent to KFP."""
    assert cluster.validate_cron(cron) == sent


# ---------------------------------------------------------------------------- list, pause, resume, delete


def test_list_schedules_pages_and_filters_by_experiment(kfp_api: KfpDouble) -> None:
    """Against the KFP test double (no KFP server runs here): pagination and the experiment_id filter."""
    nightly, other = kfp_api.seed_experiment("nightly"), kfp_api.seed_experiment("other")
    ids = [kfp_api.seed_recurring_run(f"job-{i}", nightly) for i in range(3)]
    kfp_api.seed_recurring_run("elsewhere", other, cron="@daily")
    client = cluster.connect(kfp_api.host, namespace="team-a")

    schedules = cluster.list_schedules(client, "nightly", namespace="team-a")
    assert [s.id for s in schedules] == ids
    assert kfp_api.calls() == [("GET", f"{API}/experiments")] + [("GET", f"{API}/recurringruns")] * 2
    first_page, second_page = kfp_api.requests[1:]
    assert first_page.query["experiment_id"] == second_page.query["experiment_id"] == nightly
    assert first_page.query["page_size"] == "100"
    assert (first_page.query["page_token"], second_page.query["page_token"]) == ("", "2")
    assert schedules[0] == cluster.ScheduleInfo(
        id=ids[0],
        name="job-0",
        cron="0 0 1 * * *",
        enabled=True,
        status="ENABLED",
        experiment_id=nightly,
        pipeline_id="p-seed",
        pipeline_version_id="pv-seed",
        max_concurrency=1,
        no_catchup=True,
    )

    everything = cluster.list_schedules(client, None, namespace="team-a")
    assert len(everything) == 4
    assert kfp_api.requests[-1].query["namespace"] == "team-a"
    assert "experiment_id" not in kfp_api.requests[-1].query

    with pytest.raises(cluster.ClusterError, match=r"^experiment: no experiment named 'missing'"):
        cluster.list_schedules(client, "missing", namespace="team-a")


def test_pause_resume_delete_hit_disable_enable_and_delete(kfp_api: KfpDouble, package: Path) -> None:
    """Against the KFP test double (no KFP server runs here): the :disable/:enable/DELETE endpoints."""
    client = cluster.connect(kfp_api.host, namespace="team-a")
    rid = _schedule(client, package).id
    start = len(kfp_api.requests)

    cluster.pause(client, rid)
    assert [s.enabled for s in cluster.list_schedules(client, None, namespace="team-a")] == [False]
    cluster.resume(client, rid)
    assert [s.status for s in cluster.list_schedules(client, None, namespace="team-a")] == ["ENABLED"]
    cluster.delete(client, rid)
    assert cluster.list_schedules(client, None, namespace="team-a") == []
    assert kfp_api.calls()[start:] == [
        ("POST", f"{API}/recurringruns/{rid}:disable"),
        ("GET", f"{API}/recurringruns"),
        ("POST", f"{API}/recurringruns/{rid}:enable"),
        ("GET", f"{API}/recurringruns"),
        ("DELETE", f"{API}/recurringruns/{rid}"),
        ("GET", f"{API}/recurringruns"),
    ]

    with pytest.raises(cluster.ClusterError, match=r"answered 404 Not Found.*rr-9999 not found"):
        cluster.pause(client, "rr-9999")
    with pytest.raises(cluster.ClusterError, match="recurring_run_id"):
        cluster.delete(client, "")


# ------------------------------------------------------------------------------------------ the token


def test_the_token_never_reaches_logs_output_or_errors(
    kfp_api: KfpDouble, package: Path, monkeypatch, caplog, capsys
) -> None:
    """Against the KFP test double (no KFP server runs here): debug logs, stdout and errors stay clean.

    The double also plays a misbehaving server that echoes the Authorization header in a 401 answer.
    """
    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    client = cluster.connect(kfp_api.host)
    cluster.submit(client, package, experiment="e", run_name="r", params={"a": 1}, namespace=None)
    info = _schedule(client, package)
    cluster.pause(client, info.id)
    cluster.list_schedules(client, "bockd-nightly", namespace=None)
    errors = []
    for call in (
        lambda: cluster.delete(client, "rr-missing"),
        lambda: _schedule(client, package, cron="0 0 25 * * *"),
    ):
        with pytest.raises(cluster.ClusterError) as raised:
            call()
        errors.append(raised.value)
    kfp_api.echo_token_401 = True
    with pytest.raises(cluster.ClusterError) as raised:
        cluster.resume(client, info.id)
    errors.append(raised.value)
    assert "answered 401" in str(raised.value)
    assert "Bearer ***" in str(raised.value)  # the echoed token is scrubbed
    assert raised.value.__cause__ is None and raised.value.__suppress_context__

    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in kfp_api.requests)
    out, err = capsys.readouterr()
    assert caplog.records  # something was logged, at debug level too
    assert "connecting to KFP" in caplog.text and "bearer token from $KFP_TOKEN" in caplog.text
    for text in (caplog.text, out, err, *map(str, errors), *(repr(e.args) for e in errors)):
        assert TOKEN not in text
