"""The cluster side of deploy: the InferenceService bockd builds, and how it is created, rolled out and back.

No Kubernetes API server can run here, so these tests use a TEST DOUBLE: `FakeKServe`, an HTTP server on
127.0.0.1 that answers exactly the API paths bockd uses
(``/apis/serving.kserve.io/v1beta1/namespaces/{ns}/inferenceservices[/{name}]``, GET/POST/PATCH), stores
the objects, applies JSON merge patches (RFC 7386), validates every object written against the real
KServe CRD schema (HTTP 422 otherwise, like an API server), records every request, and plays the KServe
controller: after a spec change, the status advances on successive GETs (Ready after n polls; Ready=False
with reason RevisionFailed for a storageUri it is told is bad; never ready for one it is told hangs).
The real Kubernetes client (``CustomObjectsApi``) talks to it over HTTP.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kube_api_double import (
    SCHEMAS,
    ApiRequest,
    CustomObjectDouble,
    client_configuration,
    k8s_status,
    serve_api,
)

from bockd.errors import BockdError, ConfigError
from bockd.serving.crd import CrdValidationError, crd_schema, validate_against_crd
from bockd.serving.deploy import (
    ANNOTATION_STABLE_URI,
    ANNOTATION_VERSION,
    DEPLOYMENT_MODE_ANNOTATION,
    LABEL_VERSION,
    DeployError,
    DeploySpec,
    KubeApi,
    Resources,
    build_inference_service,
    deploy_inference_service,
    load_kube_config,
    normalize_name,
)

CRD = SCHEMAS / "serving.kserve.io_inferenceservices.yaml"

NS = "kubeflow-user"
MODEL = "bockd-digits-resnet20-s3"
URI_V1 = "s3://mlflow/1/abc/artifacts/student"
URI_V2 = "s3://mlflow/1/def/artifacts/student"
BAD_URI = "s3://mlflow/1/missing/artifacts/student"
POLL = 0.01


# ------------------------------------------------------------------------------------------ test double


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


@dataclass
class FakeKServe(CustomObjectDouble):
    """Test double of the Kubernetes API server + KServe controller (no API server can run here).

    ``ready_after``: GETs after a spec change until the controller settles. ``failing``: storage URIs whose
    revision fails (Ready=False, reason ``fail_reason``). ``hanging``: URIs that never become ready.
    """

    group, version, plural = "serving.kserve.io", "v1beta1", "inferenceservices"
    ready_after: int = 2
    failing: set[str] = field(default_factory=set)
    hanging: set[str] = field(default_factory=set)
    fail_reason: str = "RevisionFailed"
    written: list[dict[str, Any]] = field(default_factory=list)  # every object as stored after a write
    _pending: dict[tuple[str, str], int] = field(default_factory=dict)
    _revisions: dict[tuple[str, str], list[tuple[str, str, bool]]] = field(default_factory=dict)

    # -- the API server

    def modify(self, request: ApiRequest, ns: str, name: str) -> tuple[int, dict[str, Any]]:
        if request.method != "PATCH":
            return 405, k8s_status(405, "only GET/PATCH of one object")
        if request.content_type != "application/merge-patch+json":
            return 415, k8s_status(415, f"unsupported patch type {request.content_type}")
        return self._patch(ns, name, request.body)

    def create(self, ns: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        name = body["metadata"]["name"]
        if (ns, name) in self.objects:
            return 409, k8s_status(409, f'inferenceservices.serving.kserve.io "{name}" already exists')
        obj = copy.deepcopy(body)
        obj["metadata"].update(namespace=ns, generation=1, uid=f"uid-{name}")
        obj.pop("status", None)
        return self._store(ns, name, obj, spec_changed=True)

    def _patch(self, ns: str, name: str, patch: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        old = self.objects[ns, name]
        new = merge_patch(old, {k: v for k, v in patch.items() if k != "status"})
        changed = new.get("spec") != old.get("spec")
        if changed:
            new["metadata"]["generation"] = old["metadata"]["generation"] + 1
        return self._store(ns, name, new, spec_changed=changed)

    def _store(
        self, ns: str, name: str, obj: dict[str, Any], spec_changed: bool
    ) -> tuple[int, dict[str, Any]]:
        try:  # what the API server does with a custom resource: check it against the CRD's schema
            validate_against_crd({k: v for k, v in obj.items() if k != "status"}, CRD)
        except CrdValidationError as e:
            self.rejected.append(str(e))
            return 422, k8s_status(422, str(e))
        self.objects[ns, name] = obj
        self.written.append(copy.deepcopy({k: v for k, v in obj.items() if k != "status"}))
        if spec_changed:
            self._pending[ns, name] = self.ready_after
        return 201 if obj["metadata"]["generation"] == 1 and spec_changed else 200, copy.deepcopy(obj)

    # -- the KServe controller

    def reconcile(self, ns: str, name: str) -> None:
        obj = self.objects[ns, name]
        status = obj.setdefault("status", {})
        if (ns, name) not in self._pending:
            return
        status["observedGeneration"] = obj["metadata"]["generation"]
        uris = _uris(obj)
        self._pending[ns, name] -= 1
        if self._pending[ns, name] > 0 or uris & self.hanging:
            status["conditions"] = [{"type": "Ready", "status": "Unknown"}]
            return
        del self._pending[ns, name]
        if obj["metadata"]["annotations"][DEPLOYMENT_MODE_ANNOTATION] == "Knative":
            self._settle_knative(ns, name, obj)
        else:
            self._settle_standard(obj)

    def _settle_knative(self, ns: str, name: str, obj: dict[str, Any]) -> None:
        predictor = obj["spec"]["predictor"]
        uri = predictor["model"]["storageUri"]
        revisions = self._revisions.setdefault((ns, name), [])
        template = json.dumps(
            {k: v for k, v in predictor.items() if k != "canaryTrafficPercent"}, sort_keys=True
        )
        if not revisions or revisions[-1][1] != template:  # a new revision for a new pod template
            revisions.append(
                (f"{name}-predictor-{len(revisions) + 1:05d}", template, uri not in self.failing)
            )
        latest, _, ok = revisions[-1]
        good = [r for r, _, fine in revisions if fine]
        status = obj["status"]
        rolled_out = status.get("components", {}).get("predictor", {}).get("latestRolledoutRevision")
        component: dict[str, Any] = {"latestCreatedRevision": latest, "url": _url(name, ns)}
        if good:
            component["latestReadyRevision"] = good[-1]
        canary = predictor.get("canaryTrafficPercent")
        if not ok:
            component["traffic"] = [{"revisionName": rolled_out, "percent": 100, "latestRevision": False}]
            message = f"Revision {latest} failed: storage-initializer: NoSuchKey {uri}"
            status["conditions"] = [
                {"type": "PredictorReady", "status": "False", "reason": self.fail_reason, "message": message},
                {"type": "Ready", "status": "False", "reason": self.fail_reason, "message": message},
            ]
        elif canary is not None and rolled_out and rolled_out != latest:
            component["traffic"] = [
                {"tag": "latest", "revisionName": latest, "percent": canary, "latestRevision": True},
                {"tag": "prev", "revisionName": rolled_out, "percent": 100 - canary, "latestRevision": False},
            ]
            component["latestRolledoutRevision"] = rolled_out
            component["previousRolledoutRevision"] = rolled_out
            status["conditions"] = _ready_conditions()
        else:
            component["traffic"] = [{"revisionName": latest, "percent": 100, "latestRevision": True}]
            component["latestRolledoutRevision"] = latest
            if rolled_out and rolled_out != latest:
                component["previousRolledoutRevision"] = rolled_out
            status["conditions"] = _ready_conditions()
        status.update(components={"predictor": component}, url=_url(name, ns), deploymentMode="Knative")

    def _settle_standard(self, obj: dict[str, Any]) -> None:
        status = obj["status"]
        name, ns = obj["metadata"]["name"], obj["metadata"]["namespace"]
        bad = _uris(obj) & self.failing
        status["canaryStatuses"] = [
            {
                "name": c["predictor"]["name"],
                "ready": c["predictor"]["model"]["storageUri"] not in self.failing,
                "trafficPercent": c["trafficPercent"],
            }
            for c in obj["spec"].get("canary") or []
        ] or None
        if status["canaryStatuses"] is None:
            del status["canaryStatuses"]
        if bad:
            message = f"model load failed for {sorted(bad)}"
            status["conditions"] = [
                {"type": "PredictorReady", "status": "False", "reason": self.fail_reason, "message": message},
                {"type": "Ready", "status": "False", "reason": self.fail_reason, "message": message},
            ]
        else:
            status["conditions"] = _ready_conditions()
        status.update(
            components={"predictor": {"url": _url(name, ns)}}, url=_url(name, ns), deploymentMode="Standard"
        )


def _uris(obj: dict[str, Any]) -> set[str]:
    spec = obj["spec"]
    uris = {spec["predictor"]["model"]["storageUri"]}
    return uris | {c["predictor"]["model"]["storageUri"] for c in spec.get("canary") or []}


def _url(name: str, ns: str) -> str:
    return f"http://{name}.{ns}.example.com"


def _ready_conditions() -> list[dict[str, str]]:
    return [{"type": "PredictorReady", "status": "True"}, {"type": "Ready", "status": "True"}]


@pytest.fixture
def fake() -> Iterator[FakeKServe]:
    """The test double of the API server + KServe controller (no Kubernetes API server can run here)."""
    with serve_api(FakeKServe()) as double:
        yield double


@pytest.fixture
def api(fake: FakeKServe) -> KubeApi:
    return KubeApi.from_config(client_configuration(fake))


def spec_for(uri: str = URI_V1, **kwargs: Any) -> DeploySpec:
    return DeploySpec.for_model(MODEL, NS, uri, mlflow_run_id="run123", **kwargs)


def deploy(api: KubeApi, spec: DeploySpec, version: str, timeout_s: float = 5.0) -> Any:
    return deploy_inference_service(api, spec, version, timeout_s=timeout_s, poll_s=POLL)


def served(fake: FakeKServe, spec: DeploySpec, version: str) -> None:
    """Start a test from an ISVC that already serves ``version`` (created through the double)."""
    fake.objects.pop((NS, spec.name), None)
    collection = f"/apis/serving.kserve.io/v1beta1/namespaces/{NS}/inferenceservices"
    body = build_inference_service(spec, version)
    fake.receive(ApiRequest("POST", collection, "", "application/json", body))
    while fake._pending:
        fake.receive(ApiRequest("GET", f"{collection}/{spec.name}", "", "", None))
    fake.requests.clear()
    fake.written.clear()


# ------------------------------------------------------------------------------------------ the ISVC


def test_isvc_puts_every_setting_where_kserve_expects_it() -> None:
    """Pure building (no API involved): the layout KServe's v1beta1 API reads, valid against the CRD."""
    spec = spec_for(backend="onnx", resources=Resources("500m", "1Gi", "1", "2Gi"), max_replicas=5)
    isvc = build_inference_service(spec, "7")
    validate_against_crd(isvc, CRD)
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    meta = isvc["metadata"]
    assert meta["name"] == MODEL and meta["namespace"] == NS
    assert meta["labels"][LABEL_VERSION] == "7"
    assert meta["annotations"][DEPLOYMENT_MODE_ANNOTATION] == "Knative"
    assert meta["annotations"]["bockd.io/registered-model"] == MODEL
    assert meta["annotations"]["bockd.io/mlflow-run-id"] == "run123"
    assert meta["annotations"][ANNOTATION_STABLE_URI] == URI_V1
    predictor = isvc["spec"]["predictor"]
    assert predictor["serviceAccountName"] == "bockd-s3"
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (1, 5)
    assert (predictor["scaleMetric"], predictor["scaleTarget"]) == ("concurrency", 8)
    assert "canaryTrafficPercent" not in predictor  # a first deployment takes all the traffic
    model = predictor["model"]
    assert model["modelFormat"] == {"name": "bockd", "version": "1"}
    assert model["runtime"] == "bockd-predictor"
    assert model["name"] == "kserve-container"
    assert model["storageUri"] == URI_V1
    assert model["args"] == ["--backend=onnx"]
    assert model["securityContext"]["runAsNonRoot"] is True
    assert model["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert model["resources"] == {
        "requests": {"cpu": "500m", "memory": "1Gi"},
        "limits": {"cpu": "1", "memory": "2Gi"},
    }


def test_isvc_defaults_and_standard_mode_autoscaling() -> None:
    """Pure building: default resources; Standard mode autoscales on CPU utilisation (HPA), not requests."""
    isvc = build_inference_service(spec_for(deployment_mode="RawDeployment"), "1")
    validate_against_crd(isvc, CRD)
    predictor = isvc["spec"]["predictor"]
    assert isvc["metadata"]["annotations"][DEPLOYMENT_MODE_ANNOTATION] == "Standard"
    assert (predictor["scaleMetric"], predictor["scaleMetricType"], predictor["scaleTarget"]) == (
        "cpu",
        "Utilization",
        80,
    )
    assert predictor["model"]["resources"] == {
        "requests": {"cpu": "1", "memory": "2Gi"},
        "limits": {"cpu": "2", "memory": "4Gi"},
    }
    assert predictor["model"]["args"] == ["--backend=torch"]
    with pytest.raises(ConfigError, match="scale_metric"):
        spec_for(deployment_mode="Standard", scale_metric="concurrency")


@pytest.mark.parametrize(
    ("registered", "name"),
    [
        ("bockd-digits-resnet20-s3", "bockd-digits-resnet20-s3"),
        ("BOC-KD/CIFAR10 ResNet110_S1", "boc-kd-cifar10-resnet110-s1"),
        ("3students", "m-3students"),
    ],
)
def test_names_are_normalised_to_dns_1035(registered: str, name: str) -> None:
    """Pure function: registered model names become valid ISVC names."""
    assert normalize_name(registered) == name


def test_long_names_stay_short_and_distinct() -> None:
    """Pure function: long names are cut and keep a hash of the whole name."""
    a, b = normalize_name("x" * 80 + "-s1"), normalize_name("x" * 80 + "-s2")
    assert a != b and len(a) <= 45 and len(b) <= 45
    assert re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", a)


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"name": "Bad_Name"}, "name"),
        ({"storage_uri": "gs://bucket/x"}, "storage_uri"),
        ({"backend": "tensorrt"}, "backend"),
        ({"deployment_mode": "ModelMesh"}, "deployment_mode"),
        ({"canary_traffic_percent": 100}, "canary_traffic_percent"),
        ({"min_replicas": 4, "max_replicas": 3}, "replicas"),
        ({"scale_target": 0}, "scale_target"),
    ],
)
def test_spec_names_the_bad_field(kwargs: dict[str, Any], field_name: str) -> None:
    """Pure validation: a DeploySpec that cannot be served names the offending field."""
    base = {"name": MODEL, "namespace": NS, "storage_uri": URI_V1}
    with pytest.raises(ConfigError, match=field_name):
        DeploySpec(**{**base, **kwargs})


def test_resources_must_be_quantities() -> None:
    """Pure validation: a request that is not a Kubernetes quantity is refused where it is made."""
    with pytest.raises(ConfigError, match="cpu_request"):
        Resources(cpu_request="lots")


def test_crd_helper_rejects_unknown_fields_kinds_and_versions() -> None:
    """Pure validation against the CRD file: strict on unknown fields, kind and apiVersion checked."""
    isvc = build_inference_service(spec_for(), "1")
    typo = copy.deepcopy(isvc)
    typo["spec"]["predictor"]["canaryTrafficPercentage"] = 10
    with pytest.raises(CrdValidationError, match="canaryTrafficPercentage"):
        validate_against_crd(typo, CRD)
    validate_against_crd(typo, CRD, strict=False)  # what the API server would prune instead
    wrong_type = copy.deepcopy(isvc)
    wrong_type["spec"]["predictor"]["minReplicas"] = "one"
    with pytest.raises(CrdValidationError, match=r"\$\.spec\.predictor\.minReplicas"):
        validate_against_crd(wrong_type, CRD)
    int_quantity = copy.deepcopy(isvc)
    int_quantity["spec"]["predictor"]["model"]["resources"]["limits"]["cpu"] = 2  # int-or-string
    validate_against_crd(int_quantity, CRD)
    with pytest.raises(CrdValidationError, match="kind"):
        validate_against_crd({**isvc, "kind": "ServingRuntime"}, CRD)
    with pytest.raises(CrdValidationError, match="v1alpha9"):
        validate_against_crd({**isvc, "apiVersion": "serving.kserve.io/v1alpha9"}, CRD)
    with pytest.raises(CrdValidationError, match="apiVersion"):
        validate_against_crd({**isvc, "apiVersion": "apps/v1"}, CRD)


def test_crd_has_a_standard_mode_canary_field() -> None:
    """Pure CRD reading: the schema copied from KServe has spec.canary[{predictor, trafficPercent}]."""
    spec = crd_schema(CRD, "v1beta1")["properties"]["spec"]["properties"]
    assert spec["canary"]["type"] == "array"
    assert spec["canary"]["items"]["required"] == ["predictor", "trafficPercent"]
    assert "canaryTrafficPercent" in spec["predictor"]["properties"]


# ------------------------------------------------------------------------------------------ deploying


def test_create_posts_the_built_isvc_and_waits_for_ready(fake: FakeKServe, api: KubeApi) -> None:
    """Through the test double (no Kubernetes API server can run here): create, poll until Ready, URL."""
    spec = spec_for()
    result = deploy(api, spec, "1")
    posts = fake.calls("POST")
    assert len(posts) == 1 and posts[0].body == build_inference_service(spec, "1")
    assert posts[0].path == f"/apis/serving.kserve.io/v1beta1/namespaces/{NS}/inferenceservices"
    validate_against_crd(posts[0].body, CRD)
    assert fake.calls("PATCH") == []
    assert len(fake.calls("GET")) >= 1 + fake.ready_after  # the existence check, then the polls
    assert result.url == _url(MODEL, NS)
    assert (result.name, result.model_version, result.previous_version) == (MODEL, "1", None)
    assert result.changed and not result.canary
    assert result.revision == f"{MODEL}-predictor-00001"


def test_create_that_fails_raises_without_a_rollback(fake: FakeKServe, api: KubeApi) -> None:
    """Through the test double (no Kubernetes API server can run here): nothing to roll back to."""
    fake.failing.add(BAD_URI)
    with pytest.raises(DeployError, match="RevisionFailed") as e:
        deploy(api, spec_for(BAD_URI), "1")
    assert "did not become ready" in str(e.value)
    assert fake.calls("PATCH") == []


def test_knative_canary_then_promotion(
    fake: FakeKServe, api: KubeApi, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the test double (no Kubernetes API server can run here): 10 % canary, then 100 %."""
    served(fake, spec_for(URI_V1), "1")
    spec = spec_for(URI_V2)
    with caplog.at_level(logging.INFO, logger="bockd.deploy"):
        result = deploy(api, spec, "2")
    canary, promotion = fake.calls("PATCH")
    predictor = canary.body["spec"]["predictor"]
    assert predictor["canaryTrafficPercent"] == 10
    assert predictor["model"]["storageUri"] == URI_V2
    assert "metadata" not in canary.body  # the served version's label moves only at the promotion
    assert promotion.body["spec"] == {"predictor": {"canaryTrafficPercent": None}}
    assert promotion.body["metadata"]["labels"][LABEL_VERSION] == "2"
    assert promotion.body["metadata"]["annotations"][ANNOTATION_STABLE_URI] == URI_V2
    stored = fake.objects[NS, spec.name]
    assert stored["spec"]["predictor"]["model"]["storageUri"] == URI_V2
    assert "canaryTrafficPercent" not in stored["spec"]["predictor"]
    assert (result.canary, result.previous_version, result.model_version) == (True, "1", "2")
    assert result.revision == f"{MODEL}-predictor-00002"
    assert any("latest 10%" in r.getMessage() for r in caplog.records)
    messages = [r.getMessage() for r in caplog.records]
    assert all(a != b for a, b in itertools.pairwise(messages)), "one log line per status change"
    for obj in fake.written:
        validate_against_crd(obj, CRD)


def test_rollback_on_revision_failed(fake: FakeKServe, api: KubeApi) -> None:
    """Through the test double (no Kubernetes API server can run here): a bad storageUri is rolled back."""
    served(fake, spec_for(URI_V1), "1")
    fake.failing.add(BAD_URI)
    with pytest.raises(DeployError) as e:
        deploy(api, spec_for(BAD_URI), "2")
    message = str(e.value)
    assert "RevisionFailed" in message and MODEL in message
    assert "previous version 1" in message and "keeps serving" in message
    assert isinstance(e.value, BockdError)
    first, last = fake.calls("PATCH")[0], fake.calls("PATCH")[-1]
    assert first.body["spec"]["predictor"]["model"]["storageUri"] == BAD_URI
    assert last.body["spec"]["predictor"]["model"]["storageUri"] == URI_V1
    assert last.body["spec"]["predictor"]["canaryTrafficPercent"] is None
    assert last.body["metadata"]["labels"][LABEL_VERSION] == "1"
    stored = fake.objects[NS, MODEL]
    assert stored["spec"]["predictor"]["model"]["storageUri"] == URI_V1
    assert stored["status"]["conditions"][-1]["status"] == "True"
    for obj in fake.written:
        validate_against_crd(obj, CRD)


def test_timeout_rolls_back(fake: FakeKServe, api: KubeApi) -> None:
    """Through the test double (no Kubernetes API server can run here): a version that never gets ready."""
    served(fake, spec_for(URI_V1), "1")
    fake.hanging.add(URI_V2)
    with pytest.raises(DeployError, match="not ready after") as e:
        deploy(api, spec_for(URI_V2), "2", timeout_s=0.2)
    assert "keeps serving" in str(e.value)
    last = fake.calls("PATCH")[-1]
    assert last.body["spec"]["predictor"]["model"]["storageUri"] == URI_V1
    assert fake.objects[NS, MODEL]["spec"]["predictor"]["model"]["storageUri"] == URI_V1


def test_failed_rollback_says_so(fake: FakeKServe, api: KubeApi) -> None:
    """Through the test double (no Kubernetes API server can run here): no promise that anything serves."""
    served(fake, spec_for(URI_V1), "1")
    fake.failing.update({URI_V1, BAD_URI})  # the old artifacts are gone too
    with pytest.raises(DeployError, match="did not become ready either") as e:
        deploy(api, spec_for(BAD_URI), "2")
    assert "keeps serving" not in str(e.value)


def test_same_version_is_a_no_op(fake: FakeKServe, api: KubeApi) -> None:
    """Through the test double (no Kubernetes API server can run here): re-running deploy sends no PATCH."""
    served(fake, spec_for(URI_V1), "1")
    result = deploy(api, spec_for(URI_V1), "1")
    assert fake.calls("PATCH") == [] and fake.calls("POST") == []
    assert result.url == _url(MODEL, NS) and not result.changed and result.previous_version == "1"


def test_interrupted_canary_rolls_back_to_the_stable_uri(fake: FakeKServe, api: KubeApi) -> None:
    """Through the test double (no Kubernetes API server can run here): a canary a dead run left behind."""
    served(fake, spec_for(URI_V1), "1")
    path = f"/apis/serving.kserve.io/v1beta1/namespaces/{NS}/inferenceservices/{MODEL}"
    half = {"spec": {"predictor": {"canaryTrafficPercent": 10, "model": {"storageUri": URI_V2}}}}
    fake.receive(ApiRequest("PATCH", path, "", "application/merge-patch+json", half))
    fake.failing.add(BAD_URI)
    with pytest.raises(DeployError, match="keeps serving"):
        deploy(api, spec_for(BAD_URI), "3")
    assert fake.objects[NS, MODEL]["spec"]["predictor"]["model"]["storageUri"] == URI_V1


def test_a_different_deployment_mode_is_refused(fake: FakeKServe, api: KubeApi) -> None:
    """Through the test double (no Kubernetes API server can run here): KServe cannot switch modes."""
    served(fake, spec_for(URI_V1), "1")
    with pytest.raises(DeployError, match="delete it first"):
        deploy(api, spec_for(URI_V2, deployment_mode="Standard"), "2")
    assert fake.calls("PATCH") == []


def test_standard_mode_canary_uses_spec_canary(fake: FakeKServe, api: KubeApi) -> None:
    """Through the test double (no Kubernetes API server can run here): spec.canary, then promotion."""
    served(fake, spec_for(URI_V1, deployment_mode="Standard"), "1")
    result = deploy(api, spec_for(URI_V2, deployment_mode="Standard"), "2")
    canary, promotion = fake.calls("PATCH")
    (entry,) = canary.body["spec"]["canary"]
    assert entry["trafficPercent"] == 10
    assert entry["predictor"]["name"] == "v2"
    assert entry["predictor"]["model"]["storageUri"] == URI_V2
    assert "predictor" not in canary.body["spec"]  # the stable predictor is untouched while the canary runs
    assert promotion.body["spec"]["canary"] is None
    assert promotion.body["spec"]["predictor"]["name"] == "v2"
    assert promotion.body["spec"]["predictor"]["model"]["storageUri"] == URI_V2
    stored = fake.objects[NS, MODEL]
    assert "canary" not in stored["spec"] and stored["metadata"]["labels"][LABEL_VERSION] == "2"
    assert result.canary and result.url == _url(MODEL, NS) and result.revision == "v2"
    for obj in fake.written:
        validate_against_crd(obj, CRD)


def test_standard_mode_canary_failure_removes_the_canary(fake: FakeKServe, api: KubeApi) -> None:
    """Through the test double (no Kubernetes API server can run here): the predictor never changed."""
    served(fake, spec_for(URI_V1, deployment_mode="Standard"), "1")
    fake.failing.add(BAD_URI)
    fake.fail_reason = "ModelLoadFailed"
    with pytest.raises(DeployError, match=r"ModelLoadFailed.*keeps serving"):
        deploy(api, spec_for(BAD_URI, deployment_mode="Standard"), "2")
    last = fake.calls("PATCH")[-1]
    assert last.body["spec"]["canary"] is None
    assert last.body["spec"]["predictor"]["model"]["storageUri"] == URI_V1
    assert "canary" not in fake.objects[NS, MODEL]["spec"]


def test_standard_mode_without_canary_rolls_in_one_step(fake: FakeKServe, api: KubeApi) -> None:
    """Through the test double (no Kubernetes API server can run here): one patch, the Deployment rolls."""
    served(fake, spec_for(URI_V1, deployment_mode="Standard"), "1")
    spec = spec_for(URI_V2, deployment_mode="Standard", canary_traffic_percent=None)
    result = deploy(api, spec, "2")
    (patch,) = fake.calls("PATCH")
    assert patch.body["spec"]["predictor"]["model"]["storageUri"] == URI_V2
    assert patch.body["metadata"]["labels"][LABEL_VERSION] == "2"
    assert not result.canary and result.previous_version == "1"


def test_same_files_under_a_new_version_move_the_label_without_a_canary(
    fake: FakeKServe, api: KubeApi
) -> None:
    """Through the test double (no Kubernetes API server can run here): no new revision, so no canary."""
    served(fake, spec_for(URI_V1), "1")
    result = deploy(api, spec_for(URI_V1), "2")
    (patch,) = fake.calls("PATCH")
    assert patch.body["metadata"]["labels"][LABEL_VERSION] == "2"
    assert patch.body["metadata"]["annotations"][ANNOTATION_VERSION] == "2"
    assert patch.body["spec"]["predictor"]["canaryTrafficPercent"] is None
    assert not result.canary and result.changed and result.previous_version == "1"


def test_kubeconfig_is_used_outside_a_cluster(
    fake: FakeKServe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the test double (no Kubernetes API server can run here): no in-cluster config, a kubeconfig."""
    from kubernetes.config import kube_config

    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": fake.host}}],
        "users": [{"name": "me", "user": {"token": "t0ken"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "me", "namespace": NS}}],
        "current-context": "test",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(kubeconfig))  # JSON is YAML
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    result = deploy(KubeApi.from_config(), spec_for(), "1")
    assert result.url == _url(MODEL, NS)
    assert {r.authorization for r in fake.requests} == {"Bearer t0ken"}
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "missing"))
    with pytest.raises(DeployError, match="no Kubernetes configuration"):
        load_kube_config()


def test_the_pipeline_deploy_step_in_cluster_mode(
    fake: FakeKServe,
    mlflow_stack: Any,
    ensemble_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`steps.deploy(mode="cluster")`: storageUri from the real MLflow registry (the files are really in S3),
    the InferenceService to the test double (no Kubernetes API server can run here)."""
    from kubernetes.config import kube_config
    from mlflow import MlflowClient

    from bockd import steps
    from bockd.export import export_student
    from bockd.model_registry import register_student
    from bockd.storage import S3Uri, client

    model_dir = tmp_path / "model"
    export_student(ensemble_run, steps.student_dir(model_dir, 2), index=1)
    mlflow = MlflowClient(mlflow_stack.mlflow_uri)
    run_id = mlflow.create_run(mlflow.create_experiment("deploy-step")).info.run_id
    reg = register_student(mlflow, run_id, steps.student_dir(model_dir, 2), prefix="dep", dataset="digits")

    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": fake.host}}],
        "users": [{"name": "me", "user": {"token": "t0ken"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "me"}}],
        "current-context": "test",
    }
    (tmp_path / "kubeconfig").write_text(json.dumps(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "kubeconfig"))

    registrations = [{"student": 2, "name": reg.name, "version": reg.version}]
    options = {
        "namespace": NS,
        "tracking_uri": mlflow_stack.mlflow_uri,
        "artifacts_destination": "s3://bockd/mlflow",
        "poll_s": POLL,
        "canary_traffic_percent": 20,
    }
    records = steps.deploy(model_dir, [2], registrations, mode="cluster", cluster_options=options)
    name = normalize_name(reg.name)
    assert records == [{"student": 2, "name": reg.name, "version": reg.version, "url": _url(name, NS)}]

    isvc = fake.objects[(NS, name)]
    uri = isvc["spec"]["predictor"]["model"]["storageUri"]
    loc = S3Uri.parse(uri)
    keys = {
        o.object_name.removeprefix(loc.prefix).lstrip("/")
        for o in client().list_objects(loc.bucket, loc.prefix + "/", recursive=True)
    }
    assert {"config.json", "model.safetensors", "model.onnx", "MLmodel"} <= keys  # what the predictor loads
    assert isvc["metadata"]["labels"]["bockd.io/model-version"] == reg.version
    with pytest.raises(ConfigError, match="deploy_options: unknown keys"):
        steps.deploy(
            model_dir, [2], registrations, mode="cluster", cluster_options={**options, "replicas": 2}
        )
