"""The cluster side of deploy: the InferenceService bockd builds, and how it is created, rolled out and back.

No Kubernetes API server can run here, so these tests use a TEST DOUBLE: `FakeKServe`, an HTTP server on
127.0.0.1 that answers exactly the API paths bockd uses (InferenceServices GET/POST/PATCH, Deployments and
ServiceAccounts GET) and behaves like the API server, KServe's webhooks and KServe's controller as far as
bockd depends on them; every rule it enforces is in its docstring with the upstream source. The real
Kubernetes client talks to it over HTTP.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kube_api_double import (
    ISVC_CRD,
    ApiRequest,
    CustomObjectDouble,
    Denied,
    client_configuration,
    k8s_status,
    merge_patch,
    not_allowed,
    serve_api,
    without,
)

from bockd.errors import BockdError, ConfigError
from bockd.platform.inference_service import (
    ANNOTATION_STABLE_URI,
    ANNOTATION_VERSION,
    DEPLOYMENT_MODE_ANNOTATION,
    LABEL_VERSION,
    DeployError,
    DeploySpec,
    InferenceServiceApi,
    Resources,
    build_inference_service,
    deploy_inference_service,
    load_kube_config,
    normalize_name,
)
from bockd.platform.kube.crd import CrdValidationError, crd_schema, prune_unknown_fields, validate_against_crd

CRD = ISVC_CRD

NS = "kubeflow-user"
MODEL = "bockd-digits-resnet20-s3"
URI_V1 = "s3://mlflow/1/abc/artifacts/student"
URI_V2 = "s3://mlflow/1/def/artifacts/student"
BAD_URI = "s3://mlflow/1/missing/artifacts/student"
POLL = 0.01
COLLECTION = f"/apis/serving.kserve.io/v1beta1/namespaces/{NS}/inferenceservices"
# where KServe puts the storageUri on a predictor's pod template (kserve v0.20.0 constants.go L157-158)
SOURCE_URI_ANNOTATION = "internal.serving.kserve.io/storage-initializer-sourceuri"


# ------------------------------------------------------------------------------------------ test double


@dataclass
class Revision:
    """A Knative revision: ready (or failed, for a bad storageUri) ``ready_after`` ticks after creation."""

    name: str
    ok: bool | None  # None: never settles (a hanging storageUri)
    age: int = 0


@dataclass
class Ksvc:
    """The Knative Service KServe keeps for a Knative-mode predictor (``{isvc}-predictor``)."""

    generation: int = 0
    template: str = ""
    traffic: list[tuple[str, str | None, int]] = field(default_factory=list)  # (tag, revision, percent)
    revisions: list[Revision] = field(default_factory=list)
    rolled_out: str | None = None  # KServe's latestRolledoutRevision
    previous: str | None = None


@dataclass
class Deployment:
    """A Deployment KServe keeps in Standard mode, with what the deployment controller reports."""

    name: str
    template: dict[str, Any]
    replicas: int
    ok: bool | None  # whether pods of the current template get ready (None: they hang)
    generation: int = 1
    observed: int = 0
    age: int = 0  # ticks since the current template's rollout started
    old_available: int = 0  # pods of the previous template still serving


@dataclass
class FakeKServe(CustomObjectDouble):
    """Test double of the Kubernetes API server + KServe 0.20 webhooks and controller (+ Knative and the
    deployment controller, as far as KServe reports them).

    API server (kube_api_double): pruning or strict refusal of unknown fields, the CRD schema (422),
    webhook denials as 403 Status objects. ``schema`` may be an older CRD's (`without`).

    KServe's mutating webhook (kserve v0.20.0 pkg/apis/serving/v1beta1/inference_service_defaults.go
    L164-176): the legacy mode names RawDeployment/Serverless become Standard/Knative.

    KServe's validating webhook ("inferenceservice.kserve-webhook-server.validator", kserve v0.20.0
    pkg/apis/serving/v1beta1/inference_service_validation.go):
    - ``predictor.model.name`` must be empty (validatePredictor, L268-300; since v0.16.0);
    - Knative mode: scaleMetric concurrency or rps (validateScalingKPACompExtension, L645-668);
    - spec.canary (validateCanarySpecs, L183-266): Standard mode annotation only, a predictor name, unique,
      not the stable one's, 0..100 % summing to <= 100, no maxReplicas/scaleTarget/scaleMetric/autoScaling
      ("canary uses fixed replicas"), minReplicas <= the stable one's (default 1);
    - on update: the mode cannot change from the one in status (validateDeploymentMode, L691-701); the
      predictor's name changes only with its storageUri (validatePredictorNameChange, L703-713).
    ``deny``: a further admission webhook (a cluster policy) that denies what it returns a message for.

    KServe's controller, one step per GET of the ISVC after ``lag`` GETs following a write (until then the
    status is the one computed before the write):
    - Knative mode (components/predictor.go reconcileKnativeDeployment, reconcilers/knative/ksvc_reconciler.go
      createKnativeService L88-224): the revision template is the predictor without its traffic split plus
      the ISVC's labels and annotations; a changed template makes a new revision; traffic is [latest p %,
      latestRolledoutRevision (100-p) %] while canaryTrafficPercent is set, else [latest 100 %]; Knative
      routes "latest" to the latest *ready* revision. Status (inference_service_status.go PropagateStatus
      L567-636): latestCreated/Ready/RolledoutRevision, traffic, PredictorReady = the Knative Service's
      Ready (False, RevisionFailed when the latest revision failed) and observedGeneration = the Knative
      Service's, not the ISVC's (L635).
    - Standard mode (components/predictor.go reconcileRawDeployment L795-803, reconcileCanaryDeployments
      L886-1040; reconcilers/deployment/deployment_reconciler.go L140-175): one Deployment
      ``{isvc}[-{predictor.name}]-predictor`` whose pod template carries the ISVC's labels and annotations
      and the storageUri annotation; one per canary, sized ceil(stable minReplicas * p / 100) and merged
      over the stable predictor, the stable one shrunk by as many (at least 1); orphans deleted. The
      deployment controller observes a new generation one step later and rolls: a surge pod of the new
      template, ready after ``ready_after`` steps unless its storageUri fails or hangs; a rollout still not
      done after ``progress_deadline`` steps turns Progressing False ProgressDeadlineExceeded. Status
      (inference_service_status.go PropagateRawStatus L360-458): PredictorReady from the stable
      Deployment's Available/Progressing conditions (still True while old pods serve a rolling update),
      observedGeneration = that Deployment's (L456), canaryStatuses ready = the canary Deployment has an
      available replica, condition CanaryPredictorReady.
    """

    group, version, plural, kind = "serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService"
    webhook = "inferenceservice.kserve-webhook-server.validator"  # inference_service_validation.go L67
    crd = ISVC_CRD
    ready_after: int = 2
    lag: int = 1
    progress_deadline: int = 6
    failing: set[str] = field(default_factory=set)
    hanging: set[str] = field(default_factory=set)
    deny: Callable[[dict[str, Any], dict[str, Any] | None], str | None] | None = None
    service_accounts: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    service_accounts_forbidden: bool = False
    written: list[dict[str, Any]] = field(default_factory=list)  # every object as stored after a write
    ksvcs: dict[tuple[str, str], Ksvc] = field(default_factory=dict)
    deployments: dict[tuple[str, str], Deployment] = field(default_factory=dict)
    _lagging: dict[tuple[str, str], int] = field(default_factory=dict)

    # -- the API server

    def handle_other(self, request: ApiRequest) -> tuple[int, dict[str, Any]]:
        m = re.match(r"^/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)$", request.path)
        if m and request.method == "GET":
            d = self.deployments.get((m.group(1), m.group(2)))
            if d is None:
                return 404, k8s_status(404, f'deployments.apps "{m.group(2)}" not found')
            return 200, _deployment_json(m.group(1), d, self.ready_after, self.progress_deadline)
        m = re.match(r"^/api/v1/namespaces/([^/]+)/serviceaccounts/([^/]+)$", request.path)
        if m and request.method == "GET":
            if self.service_accounts_forbidden:
                return 403, k8s_status(403, f'serviceaccounts "{m.group(2)}" is forbidden: User cannot get')
            account = self.service_accounts.get((m.group(1), m.group(2)))
            if account is None:
                return 404, k8s_status(404, f'serviceaccounts "{m.group(2)}" not found')
            return 200, copy.deepcopy(account)
        return super().handle_other(request)

    def modify(self, request: ApiRequest, ns: str, name: str) -> tuple[int, dict[str, Any]]:
        if request.method != "PATCH":
            return 405, k8s_status(405, "only GET/PATCH of one object")
        if request.content_type != "application/merge-patch+json":
            return 415, k8s_status(415, f"unsupported patch type {request.content_type}")
        old = self.objects[ns, name]
        patched = merge_patch({k: v for k, v in old.items() if k != "status"}, request.body)
        written = self.write(request, patched, old)
        if isinstance(written, tuple):
            return written
        if written.get("spec") != old.get("spec"):
            written["metadata"]["generation"] = old["metadata"]["generation"] + 1
        if "status" in old:
            written["status"] = old["status"]
        if written != old:
            self._lagging[ns, name] = self.lag
        self.objects[ns, name] = written
        self.written.append({k: v for k, v in written.items() if k != "status"})
        return 200, copy.deepcopy(written)

    def created(self, ns: str, name: str) -> None:
        self._lagging[ns, name] = self.lag
        self.written.append(copy.deepcopy(self.objects[ns, name]))

    # -- KServe's webhooks

    def default(self, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        annotations = obj["metadata"].setdefault("annotations", {})
        legacy = {"RawDeployment": "Standard", "Serverless": "Knative"}
        mode = annotations.get(DEPLOYMENT_MODE_ANNOTATION)
        if mode in legacy:
            annotations[DEPLOYMENT_MODE_ANNOTATION] = legacy[mode]

    def admit(self, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        predictor, mode = obj["spec"]["predictor"], _mode(obj)
        if (predictor.get("model") or {}).get("name"):
            raise Denied("the 'name' field is not allowed in standard predictor")
        metric = predictor.get("scaleMetric", "concurrency")
        if mode != "Standard" and metric not in ("concurrency", "rps"):
            raise Denied(f"[{metric}] is not a supported metric")
        _validate_canaries(obj)
        if old is not None:
            _validate_update(obj, old)
        message = self.deny(obj, old) if self.deny else None
        if message:
            raise Denied(message)

    # -- KServe's controller

    def reconcile(self, ns: str, name: str) -> None:
        if self._lagging.get((ns, name), 0) > 0:
            self._lagging[ns, name] -= 1  # not reconciled yet: the status is the one from before the write
            return
        obj = self.objects[ns, name]
        if _mode(obj) == "Knative":
            obj["status"] = self._knative(ns, name, obj)
        else:
            obj["status"] = self._standard(ns, name, obj)
        try:  # the statuses this double makes up are ones the real CRD allows
            validate_against_crd(obj, CRD)
        except CrdValidationError as e:
            self.rejected.append(str(e))

    def _ok(self, uri: str) -> bool | None:
        return None if uri in self.hanging else uri not in self.failing

    def _knative(self, ns: str, name: str, obj: dict[str, Any]) -> dict[str, Any]:
        k = self.ksvcs.setdefault((ns, name), Ksvc())
        predictor = obj["spec"]["predictor"]
        meta = obj["metadata"]
        template = json.dumps(
            [{k_: v for k_, v in predictor.items() if k_ != "canaryTrafficPercent"}, meta.get("labels"),
             meta.get("annotations")], sort_keys=True,
        )  # fmt: skip
        p = predictor.get("canaryTrafficPercent")
        traffic = [("latest", None, 100)]
        if p is not None and k.rolled_out:
            traffic = [("latest", None, p), ("prev", k.rolled_out, 100 - p)]
        if template != k.template or traffic != k.traffic:
            k.generation += 1  # a spec change of the Knative Service
        if template != k.template:
            uri = predictor["model"]["storageUri"]
            k.revisions.append(Revision(f"{name}-predictor-{len(k.revisions) + 1:05d}", self._ok(uri)))
            k.template = template
        k.traffic = traffic
        for r in k.revisions:
            r.age += 1
        return _knative_status(ns, name, k, self.ready_after)

    def _standard(self, ns: str, name: str, obj: dict[str, Any]) -> dict[str, Any]:
        wanted = _standard_deployments(obj)
        for dname in [d for (n, d) in self.deployments if n == ns and d.startswith(f"{name}-")]:
            if dname not in wanted:
                del self.deployments[ns, dname]  # orphans go (reconcileCanaryDeployments cleanup)
        for dname, (template, replicas) in wanted.items():
            ok = self._ok(template["annotations"][SOURCE_URI_ANNOTATION])
            d = self.deployments.get((ns, dname))
            if d is None:
                self.deployments[ns, dname] = Deployment(dname, template, replicas, ok)
                continue
            _update_deployment(d, template, replicas, ok, self.ready_after)
        for (n, _), d in self.deployments.items():
            if n == ns and d.name in wanted:
                _tick(d)
        return _standard_status(
            ns, name, obj, wanted, self.deployments, self.ready_after, self.progress_deadline
        )

    # -- helpers for tests

    def settle(self, ns: str = NS, name: str = MODEL, gets: int = 12) -> dict[str, Any]:
        for _ in range(gets):
            self.receive(
                ApiRequest(
                    "GET",
                    f"/apis/serving.kserve.io/v1beta1/namespaces/{ns}/inferenceservices/{name}",
                    "",
                    "",
                    None,
                )
            )
        return self.objects[ns, name]


def _mode(obj: dict[str, Any]) -> str:
    return (obj["metadata"].get("annotations") or {}).get(DEPLOYMENT_MODE_ANNOTATION, "Knative")


def _validate_canaries(obj: dict[str, Any]) -> None:
    """validateCanarySpecs (kserve v0.20.0 inference_service_validation.go L183-266)."""
    canaries, stable = obj["spec"].get("canary") or [], obj["spec"]["predictor"]
    if not canaries:
        return
    if _mode(obj) != "Standard":
        raise Denied("canary is only supported in Standard deployment mode")
    names: set[str] = set()
    total = 0
    for i, c in enumerate(canaries):
        p = c["predictor"]
        cname = p.get("name") or ""
        if not cname:
            raise Denied(f"canary[{i}] predictor.name is required")
        if cname in names:
            raise Denied(f'canary predictor.name "{cname}" is duplicated')
        names.add(cname)
        if cname == stable.get("name"):
            raise Denied(f'canary predictor.name "{cname}" conflicts with stable predictor name')
        total += c["trafficPercent"]
        for key in ("maxReplicas", "scaleTarget", "scaleMetric", "autoScaling"):
            if p.get(key):
                raise Denied(f'canary "{cname}" must not set {key} (canary uses fixed replicas)')
        if p.get("minReplicas") is not None and p["minReplicas"] > stable.get("minReplicas", 1):
            raise Denied(f'canary "{cname}" minReplicas must not exceed stable predictor minReplicas')
    if total > 100:
        raise Denied(f"sum of canary trafficPercent values ({total}) must be <= 100")


def _validate_update(obj: dict[str, Any], old: dict[str, Any]) -> None:
    """validateDeploymentMode and validatePredictorNameChange (L691-713)."""
    status_mode = (old.get("status") or {}).get("deploymentMode")
    if status_mode and _mode(obj) != status_mode:
        raise Denied(
            f"update rejected: deploymentMode cannot be changed from '{status_mode}' to '{_mode(obj)}'"
        )
    new_p, old_p = obj["spec"]["predictor"], old["spec"]["predictor"]
    if new_p.get("name") != old_p.get("name") and new_p["model"].get("storageUri") == old_p["model"].get(
        "storageUri"
    ):
        raise Denied("predictor.name change requires a model change (e.g. storageUri)")


def _knative_status(ns: str, name: str, k: Ksvc, ready_after: int) -> dict[str, Any]:
    def ready(r: Revision) -> bool:
        return r.ok is True and r.age >= ready_after

    latest = k.revisions[-1]
    ready_ones = [r.name for r in k.revisions if ready(r)]
    latest_ready = ready_ones[-1] if ready_ones else None
    traffic = [
        {"tag": tag, "revisionName": rev or latest_ready, "percent": pct, "latestRevision": tag == "latest"}
        for tag, rev, pct in k.traffic
        if rev or latest_ready
    ]
    for t in traffic:  # KServe tracks the revision that took all the traffic (PropagateStatus L582-591)
        if t["latestRevision"] and t["percent"] == 100 and k.rolled_out != t["revisionName"]:
            k.previous, k.rolled_out = k.rolled_out, t["revisionName"]
    if latest.ok is False and latest.age >= ready_after:
        message = f"Revision {latest.name} failed: storage-initializer: NoSuchKey"
        condition = {"status": "False", "reason": "RevisionFailed", "message": message}
    else:
        condition = {"status": "True" if ready(latest) else "Unknown"}
    component: dict[str, Any] = {
        "latestCreatedRevision": latest.name,
        "traffic": traffic,
        "url": _url(name, ns),
    }
    if latest_ready:
        component["latestReadyRevision"] = latest_ready
    if k.rolled_out:
        component["latestRolledoutRevision"] = k.rolled_out
    if k.previous:
        component["previousRolledoutRevision"] = k.previous
    return {
        "observedGeneration": k.generation,
        "conditions": _conditions(condition),
        "components": {"predictor": component},
        "url": _url(name, ns),
        "deploymentMode": "Knative",
    }


def _standard_deployments(obj: dict[str, Any]) -> dict[str, tuple[dict[str, Any], int]]:
    """Deployment name -> (pod template, replicas) KServe wants for the stable predictor and each canary."""
    name, meta, spec = obj["metadata"]["name"], obj["metadata"], obj["spec"]
    stable = spec["predictor"]
    stable_min = stable.get("minReplicas", 1)
    wanted = {}
    canary_total = 0
    for c in spec.get("canary") or []:
        replicas = c["predictor"].get("minReplicas") or math.ceil(stable_min * c["trafficPercent"] / 100)
        canary_total += replicas
        merged = merge_patch(stable, c["predictor"])
        wanted[f"{name}-{c['predictor']['name']}-predictor"] = (_pod_template(meta, merged), replicas)
    stable_name = f"{name}-{stable['name']}-predictor" if stable.get("name") else f"{name}-predictor"
    wanted[stable_name] = (_pod_template(meta, stable), max(stable_min - canary_total, 1))
    return wanted


def _pod_template(meta: dict[str, Any], predictor: dict[str, Any]) -> dict[str, Any]:
    return {
        "labels": dict(meta.get("labels") or {}),
        "annotations": {
            **(meta.get("annotations") or {}),
            SOURCE_URI_ANNOTATION: predictor["model"]["storageUri"],
        },
        "predictor": json.dumps(predictor, sort_keys=True),
    }


def _update_deployment(
    d: Deployment, template: dict[str, Any], replicas: int, ok: bool | None, ready_after: int
) -> None:
    if template != d.template:  # a rollout: the pods serving now keep serving until new ones are ready
        d.old_available = _available(d, ready_after)
        d.template, d.ok, d.age = template, ok, 0
        d.generation += 1
    if replicas != d.replicas:  # the HPA scales: a spec change too
        d.replicas = replicas
        d.generation += 1


def _tick(d: Deployment) -> None:
    if d.observed < d.generation:
        d.observed = d.generation  # the deployment controller observes the new spec
    else:
        d.age += 1


def _new_ready(d: Deployment, ready_after: int) -> bool:
    return d.observed == d.generation and d.ok is True and d.age >= ready_after


def _available(d: Deployment, ready_after: int) -> int:
    return d.replicas if _new_ready(d, ready_after) else min(d.old_available, d.replicas)


def _deployment_json(ns: str, d: Deployment, ready_after: int, deadline: int) -> dict[str, Any]:
    done = _new_ready(d, ready_after)
    available = _available(d, ready_after)
    updated = d.replicas if done else (1 if d.observed == d.generation else 0)
    total = d.replicas if done else d.old_available + updated
    if done:
        progressing = {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}
    elif d.age >= deadline:
        progressing = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                       "message": f'ReplicaSet "{d.name}-1" has timed out progressing.'}  # fmt: skip
    else:
        progressing = {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}
    if available >= d.replicas:
        available_c = {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}
    else:
        available_c = {"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": d.name, "namespace": ns, "generation": d.generation},
        "spec": {
            "replicas": d.replicas,
            "selector": {"matchLabels": {"app": f"isvc.{d.name}"}},
            "template": {
                "metadata": {"labels": d.template["labels"], "annotations": d.template["annotations"]}
            },
        },
        "status": {
            "observedGeneration": d.observed,
            "replicas": total,
            "updatedReplicas": updated,
            "availableReplicas": available,
            "conditions": [available_c, progressing],
        },
    }


def _predictor_ready(deployment: dict[str, Any]) -> dict[str, Any]:
    """PropagateRawStatus's PredictorReady from a Deployment's conditions (L372-451), rule for rule."""
    conditions = {c["type"]: c for c in deployment["status"]["conditions"]}
    available, progressing = conditions.get("Available"), conditions.get("Progressing")
    ready = {"status": "False", "reason": ""}
    if available and available["status"] == "True":
        ready = {"status": "True", "reason": available["reason"]}
    if progressing and progressing["status"] == "False" and progressing.get("message"):
        ready = {"status": "False", "reason": progressing["reason"], "message": progressing["message"]}
    elif progressing and progressing["status"] == "True":
        if progressing["reason"] == "NewReplicaSetAvailable":
            ready = {"status": "True", "reason": progressing["reason"]}
        elif not available or available["status"] != "True":
            ready = {"status": "Unknown", "reason": progressing["reason"]}
    if available and available["status"] == "False":
        ready = {"status": "False", "reason": available["reason"]}
    return ready


def _standard_status(
    ns: str, name: str, obj: dict[str, Any], wanted: dict[str, Any], deployments: dict[Any, Deployment],
    ready_after: int, deadline: int,
) -> dict[str, Any]:  # fmt: skip
    stable_name = list(wanted)[-1]
    stable = _deployment_json(ns, deployments[ns, stable_name], ready_after, deadline)
    status: dict[str, Any] = {
        "observedGeneration": stable["status"]["observedGeneration"],  # the Deployment's (L456)
        "conditions": _conditions(_predictor_ready(stable)),
        "components": {"predictor": {"url": _url(name, ns)}},
        "url": _url(name, ns),
        "deploymentMode": "Standard",
    }
    canaries = obj["spec"].get("canary") or []
    if canaries:
        status["canaryStatuses"] = [
            {
                "name": c["predictor"]["name"],
                "ready": _available(
                    deployments[ns, f"{name}-{c['predictor']['name']}-predictor"], ready_after
                )
                > 0,
                "trafficPercent": c["trafficPercent"],
            }
            for c in canaries
        ]
        all_ready = all(c["ready"] for c in status["canaryStatuses"])
        status["conditions"].append(
            {"type": "CanaryPredictorReady", "status": "True" if all_ready else "False",
             "reason": "AllCanariesReady" if all_ready else "CanariesNotReady"}
        )  # fmt: skip
    return status


def _conditions(predictor: dict[str, Any]) -> list[dict[str, Any]]:
    """PredictorReady, IngressReady and Ready (their conjunction, inference_service_status.go L295-298)."""
    ready = {k: v for k, v in predictor.items() if v}
    return [
        {"type": "IngressReady", "status": "True"},
        {"type": "PredictorReady", **ready},
        {"type": "Ready", **ready},
    ]


def _url(name: str, ns: str) -> str:
    return f"http://{name}.{ns}.example.com"


def _s3_account(ns: str = NS) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": "bockd-s3", "namespace": ns},
        "secrets": [{"name": "bockd-s3"}],
    }


@pytest.fixture
def fake() -> Iterator[FakeKServe]:
    """The test double of the API server + KServe (no Kubernetes API server can run here)."""
    with serve_api(FakeKServe(service_accounts={(NS, "bockd-s3"): _s3_account()})) as double:
        yield double
    assert not_allowed(double.requests) == [], "calls the pipeline's Role (manifests) does not allow"


@pytest.fixture
def api(fake: FakeKServe) -> InferenceServiceApi:
    return InferenceServiceApi.from_config(client_configuration(fake))


def spec_for(uri: str = URI_V1, **kwargs: Any) -> DeploySpec:
    return DeploySpec.for_model(MODEL, NS, uri, mlflow_run_id="run123", **kwargs)


def deploy(api: InferenceServiceApi, spec: DeploySpec, version: str, timeout_s: float = 5.0) -> Any:
    return deploy_inference_service(api, spec, version, timeout_s=timeout_s, poll_s=POLL)


def served(fake: FakeKServe, spec: DeploySpec, version: str) -> None:
    """Start a test from an ISVC that already serves ``version`` (created through the double)."""
    fake.objects.pop((NS, spec.name), None)
    body = build_inference_service(spec, version)
    code, answer = fake.receive(
        ApiRequest("POST", COLLECTION, "fieldValidation=Strict", "application/json", body)
    )
    assert code == 201, answer
    fake.settle(NS, spec.name)
    fake.requests.clear()
    fake.written.clear()


def _patch_request(body: dict[str, Any], query: str = "") -> ApiRequest:
    return ApiRequest("PATCH", f"{COLLECTION}/{MODEL}", query, "application/merge-patch+json", body)


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
    assert not model.get("name")  # KServe's webhook refuses a model name (validatePredictor)
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
    assert predictor["model"]["args"] == ["--backend=onnx"]  # the serving image has no PyTorch
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
        ({"scale_metric": "cpu"}, "scale_metric"),  # Knative's KPA: concurrency or rps only
        ({"deployment_mode": "Standard", "scale_target": 101}, "scale_target"),  # a CPU percentage
        ({"deployment_mode": "Standard", "min_replicas": 0}, "min_replicas"),  # a 0-replica canary
    ],
)
def test_spec_names_the_bad_field(kwargs: dict[str, Any], field_name: str) -> None:
    """Pure validation: a DeploySpec that cannot be served names the offending field."""
    base = {"name": MODEL, "namespace": NS, "storage_uri": URI_V1}
    with pytest.raises(ConfigError, match=field_name):
        DeploySpec(**{**base, **kwargs})


def test_resources_must_be_quantities() -> None:
    """Pure validation: a request that is not a Kubernetes quantity is refused where it is made."""
    for bad in ("lots", "2 Gi", "-1", "0"):
        with pytest.raises(ConfigError, match="cpu_request"):
            Resources(cpu_request=bad)
    Resources(cpu_request="1e3", memory_request="1.5Gi")


def test_crd_helper_rejects_unknown_fields_kinds_and_versions() -> None:
    """Pure validation against the CRD file: strict on unknown fields, kind and apiVersion checked."""
    isvc = build_inference_service(spec_for(), "1")
    typo = copy.deepcopy(isvc)
    typo["spec"]["predictor"]["canaryTrafficPercentage"] = 10
    with pytest.raises(CrdValidationError, match="canaryTrafficPercentage"):
        validate_against_crd(typo, CRD)
    validate_against_crd(typo, CRD, strict=False)  # what the API server would prune instead
    assert prune_unknown_fields(typo, CRD) == (isvc, ["spec.predictor.canaryTrafficPercentage"])
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


# ------------------------------------------------------------------------------- the double is upstream


def test_double_prunes_unknown_fields_unless_strict(fake: FakeKServe) -> None:
    """The API server drops undeclared fields of a custom resource (KEP-2332), or refuses them with 400
    under fieldValidation=Strict (what bockd asks for); a 422 for a schema violation."""
    served(fake, spec_for(deployment_mode="Standard"), "1")
    typo = {"spec": {"predictor": {"canaryTrafficPercentage": 10}}}
    code, answer = fake.receive(_patch_request(typo))
    assert code == 200 and "canaryTrafficPercentage" not in answer["spec"]["predictor"]
    code, answer = fake.receive(_patch_request(typo, "fieldValidation=Strict"))
    assert (code, answer["kind"], answer["reason"]) == (400, "Status", "BadRequest")
    assert (
        'strict decoding error: unknown field "spec.predictor.canaryTrafficPercentage"' in answer["message"]
    )
    code, answer = fake.receive(_patch_request({"spec": {"predictor": {"minReplicas": "one"}}}))
    assert (code, answer["reason"]) == (422, "Invalid")
    fake.rejected.clear()  # provoked on purpose


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"predictor": {"model": {"name": "kserve-container"}}}, "the 'name' field is not allowed"),
        ({"canary": [{"predictor": {"name": "v2", "maxReplicas": 3, "model": {}}, "trafficPercent": 10}]},
         'canary "v2" must not set maxReplicas (canary uses fixed replicas)'),
        ({"canary": [{"predictor": {"model": {}}, "trafficPercent": 10}]},
         "canary[0] predictor.name is required"),
        ({"predictor": {"name": "v9"}}, "predictor.name change requires a model change"),
    ],
)  # fmt: skip
def test_double_admission_denials_are_403_status_objects(
    fake: FakeKServe, change: dict[str, Any], message: str
) -> None:
    """KServe's webhook rules, answered as the API server does: 403 Forbidden, 'admission webhook ...
    denied the request: <message>'."""
    served(fake, spec_for(deployment_mode="Standard"), "1")
    for c in change.get("canary") or []:
        c["predictor"]["model"] = {
            **build_inference_service(spec_for(URI_V2), "2")["spec"]["predictor"]["model"]
        }
    code, answer = fake.receive(_patch_request({"spec": change}))
    assert (code, answer["reason"]) == (403, "Forbidden")
    assert answer["message"].startswith(f'admission webhook "{fake.webhook}" denied the request: ')
    assert message in answer["message"]


def test_double_takes_observed_generation_from_the_child(fake: FakeKServe) -> None:
    """status.observedGeneration is the Deployment's: a canary changes the ISVC's generation, not the
    stable Deployment's (inference_service_status.go L456)."""
    served(fake, spec_for(deployment_mode="Standard"), "1")
    stable = fake.objects[NS, MODEL]["status"]["observedGeneration"]
    canary = build_inference_service(spec_for(URI_V2, deployment_mode="Standard"), "2")["spec"]["predictor"]
    entry = {"predictor": {"name": "v2", "model": canary["model"]}, "trafficPercent": 10}
    assert fake.receive(_patch_request({"spec": {"canary": [entry]}}))[0] == 200
    obj = fake.settle()
    assert obj["metadata"]["generation"] == 2
    assert obj["status"]["observedGeneration"] == stable == 1
    assert obj["status"]["canaryStatuses"] == [{"name": "v2", "ready": True, "trafficPercent": 10}]


# ------------------------------------------------------------------------------------------ deploying


def test_create_posts_the_built_isvc_and_waits_for_ready(fake: FakeKServe, api: InferenceServiceApi) -> None:
    """Through the test double (no Kubernetes API server can run here): create, poll until Ready, URL."""
    spec = spec_for()
    result = deploy(api, spec, "1")
    posts = fake.calls("POST")
    assert len(posts) == 1 and posts[0].body == build_inference_service(spec, "1")
    assert posts[0].path == COLLECTION and posts[0].params == {"fieldValidation": "Strict"}
    assert fake.calls("PATCH") == []
    assert len(fake.calls("GET")) >= 1 + fake.ready_after  # the existence check, then the polls
    assert result.url == _url(MODEL, NS)
    assert (result.name, result.model_version, result.previous_version) == (MODEL, "1", None)
    assert result.changed and not result.canary
    assert result.revision == f"{MODEL}-predictor-00001"


def test_create_that_fails_raises_without_a_rollback(fake: FakeKServe, api: InferenceServiceApi) -> None:
    """Through the test double (no Kubernetes API server can run here): nothing to roll back to."""
    fake.failing.add(BAD_URI)
    with pytest.raises(DeployError, match="RevisionFailed") as e:
        deploy(api, spec_for(BAD_URI), "1")
    assert "did not become ready" in str(e.value)
    assert fake.calls("PATCH") == []


def test_knative_canary_then_promotion(
    fake: FakeKServe, api: InferenceServiceApi, caplog: pytest.LogCaptureFixture
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
    assert result.revision in (f"{MODEL}-predictor-00002", f"{MODEL}-predictor-00003")
    assert any("latest 10%" in r.getMessage() for r in caplog.records)
    messages = [r.getMessage() for r in caplog.records]
    assert all(a != b for a, b in itertools.pairwise(messages)), "one log line per status change"
    for obj in fake.written:
        validate_against_crd(obj, CRD)


def test_knative_gate_never_passes_on_the_previous_revisions_status(
    fake: FakeKServe, api: InferenceServiceApi
) -> None:
    """Through the test double: the Knative Service's generation is not the ISVC's (a label change made a
    revision, the ISVC's generation stayed), so a gate on observedGeneration passes on the stale status of
    the previous revision; a failing new revision must still be caught and rolled back."""
    served(fake, spec_for(URI_V1), "1")
    deploy(api, spec_for(URI_V1), "2")  # same files under a new version: labels only, a new revision
    obj = fake.settle()
    assert obj["status"]["observedGeneration"] > obj["metadata"]["generation"]
    fake.failing.add(BAD_URI)
    fake.lag = 3
    with pytest.raises(DeployError, match=r"RevisionFailed.*keeps serving"):
        deploy(api, spec_for(BAD_URI, canary_traffic_percent=None), "3")
    assert fake.objects[NS, MODEL]["spec"]["predictor"]["model"]["storageUri"] == URI_V1


def test_rollback_on_revision_failed(fake: FakeKServe, api: InferenceServiceApi) -> None:
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


def test_timeout_rolls_back(fake: FakeKServe, api: InferenceServiceApi) -> None:
    """Through the test double (no Kubernetes API server can run here): a version that never gets ready."""
    served(fake, spec_for(URI_V1), "1")
    fake.hanging.add(URI_V2)
    with pytest.raises(DeployError, match="not ready after") as e:
        deploy(api, spec_for(URI_V2), "2", timeout_s=0.2)
    assert "keeps serving" in str(e.value)
    last = fake.calls("PATCH")[-1]
    assert last.body["spec"]["predictor"]["model"]["storageUri"] == URI_V1
    assert fake.objects[NS, MODEL]["spec"]["predictor"]["model"]["storageUri"] == URI_V1


def test_failed_rollback_says_so(fake: FakeKServe, api: InferenceServiceApi) -> None:
    """Through the test double (no Kubernetes API server can run here): no promise that anything serves."""
    served(fake, spec_for(URI_V1), "1")
    fake.failing.update({URI_V1, BAD_URI})  # the old artifacts are gone too
    with pytest.raises(DeployError, match="did not become ready either") as e:
        deploy(api, spec_for(BAD_URI), "2")
    assert "keeps serving" not in str(e.value)


def test_same_version_is_a_no_op(fake: FakeKServe, api: InferenceServiceApi) -> None:
    """Through the test double (no Kubernetes API server can run here): re-running deploy sends no PATCH."""
    served(fake, spec_for(URI_V1), "1")
    result = deploy(api, spec_for(URI_V1), "1")
    assert fake.calls("PATCH") == [] and fake.calls("POST") == []
    assert result.url == _url(MODEL, NS) and not result.changed and result.previous_version == "1"


def test_interrupted_canary_rolls_back_to_the_stable_uri(fake: FakeKServe, api: InferenceServiceApi) -> None:
    """Through the test double (no Kubernetes API server can run here): a canary a dead run left behind."""
    served(fake, spec_for(URI_V1), "1")
    half = {"spec": {"predictor": {"canaryTrafficPercent": 10, "model": {"storageUri": URI_V2}}}}
    assert fake.receive(_patch_request(half))[0] == 200
    fake.failing.add(BAD_URI)
    with pytest.raises(DeployError, match="keeps serving"):
        deploy(api, spec_for(BAD_URI), "3")
    assert fake.objects[NS, MODEL]["spec"]["predictor"]["model"]["storageUri"] == URI_V1


def test_a_different_deployment_mode_is_refused(fake: FakeKServe, api: InferenceServiceApi) -> None:
    """Through the test double (no Kubernetes API server can run here): KServe cannot switch modes."""
    served(fake, spec_for(URI_V1), "1")
    with pytest.raises(DeployError, match="delete it first"):
        deploy(api, spec_for(URI_V2, deployment_mode="Standard"), "2")
    assert fake.calls("PATCH") == []


def test_standard_mode_canary_passes_kserve_webhook(fake: FakeKServe, api: InferenceServiceApi) -> None:
    """Through the test double: a spec.canary entry KServe admits (no autoscaling fields), waited for on
    its canaryStatuses entry, promoted by renaming the predictor; the Deployment of the promoted predictor
    has rolled out before the step returns."""
    served(fake, spec_for(URI_V1, deployment_mode="Standard"), "1")
    result = deploy(api, spec_for(URI_V2, deployment_mode="Standard"), "2")
    canary, promotion = fake.calls("PATCH")
    (entry,) = canary.body["spec"]["canary"]
    assert entry["trafficPercent"] == 10
    assert set(entry["predictor"]) == {"name", "model", "serviceAccountName"}
    assert entry["predictor"]["name"] == "v2"
    assert entry["predictor"]["model"]["storageUri"] == URI_V2
    assert "predictor" not in canary.body["spec"]  # the stable predictor is untouched while the canary runs
    assert promotion.body["spec"]["canary"] is None
    assert promotion.body["spec"]["predictor"]["name"] == "v2"
    assert promotion.body["spec"]["predictor"]["model"]["storageUri"] == URI_V2
    stored = fake.objects[NS, MODEL]
    assert "canary" not in stored["spec"] and stored["metadata"]["labels"][LABEL_VERSION] == "2"
    assert result.canary and result.url == _url(MODEL, NS) and result.revision == "v2"
    deployment = fake.deployments[NS, f"{MODEL}-v2-predictor"]
    assert deployment.template["labels"][LABEL_VERSION] == "2"
    assert _deployment_json(NS, deployment, fake.ready_after, 99)["status"]["updatedReplicas"] == 1
    assert (NS, f"{MODEL}-predictor") not in fake.deployments  # the old predictor's Deployment is gone
    for obj in fake.written:
        validate_against_crd(obj, CRD)


def test_standard_mode_canary_that_never_gets_ready_is_removed(
    fake: FakeKServe, api: InferenceServiceApi
) -> None:
    """Through the test double: KServe reports no failure of a canary (its entry just stays not ready),
    so the step times out and removes it; the stable predictor never changed."""
    served(fake, spec_for(URI_V1, deployment_mode="Standard"), "1")
    fake.failing.add(BAD_URI)
    with pytest.raises(DeployError, match=r"not ready after .*keeps serving"):
        deploy(api, spec_for(BAD_URI, deployment_mode="Standard"), "2", timeout_s=0.3)
    last = fake.calls("PATCH")[-1]
    assert last.body["spec"]["canary"] is None
    assert last.body["spec"]["predictor"]["model"]["storageUri"] == URI_V1
    assert "canary" not in fake.objects[NS, MODEL]["spec"]
    assert (NS, f"{MODEL}-v2-predictor") not in fake.deployments


def test_standard_mode_without_canary_rolls_in_one_step(fake: FakeKServe, api: InferenceServiceApi) -> None:
    """Through the test double (no Kubernetes API server can run here): one patch, the Deployment rolls;
    the step returns once the Deployment has rolled out (not when the ISVC first says Ready)."""
    served(fake, spec_for(URI_V1, deployment_mode="Standard"), "1")
    spec = spec_for(URI_V2, deployment_mode="Standard", canary_traffic_percent=None)
    result = deploy(api, spec, "2")
    (patch,) = fake.calls("PATCH")
    assert patch.body["spec"]["predictor"]["model"]["storageUri"] == URI_V2
    assert patch.body["metadata"]["labels"][LABEL_VERSION] == "2"
    assert not result.canary and result.previous_version == "1"
    deployment = _deployment_json(NS, fake.deployments[NS, f"{MODEL}-predictor"], fake.ready_after, 99)
    assert deployment["spec"]["template"]["metadata"]["annotations"][SOURCE_URI_ANNOTATION] == URI_V2
    assert deployment["status"]["updatedReplicas"] == deployment["status"]["availableReplicas"] == 1


def test_standard_mode_rolling_update_that_stalls_is_rolled_back(
    fake: FakeKServe, api: InferenceServiceApi
) -> None:
    """Through the test double: while new pods crash the old ones keep the ISVC Ready (PropagateRawStatus
    follows Available), so success is decided on the Deployment: past its progress deadline it failed."""
    served(fake, spec_for(URI_V1, deployment_mode="Standard"), "1")
    fake.failing.add(BAD_URI)
    with pytest.raises(DeployError, match=r"ProgressDeadlineExceeded.*keeps serving"):
        deploy(api, spec_for(BAD_URI, deployment_mode="Standard", canary_traffic_percent=None), "2")
    deployment = fake.deployments[NS, f"{MODEL}-predictor"]
    assert deployment.template["annotations"][SOURCE_URI_ANNOTATION] == URI_V1


def test_a_refused_patch_fails_clearly_and_changes_nothing(
    fake: FakeKServe, api: InferenceServiceApi
) -> None:
    """Through the test double: an admission webhook denies the rollout's first patch (HTTP 403): the step
    fails with the webhook's message, nothing was changed and nothing is rolled back."""
    served(fake, spec_for(URI_V1, deployment_mode="Standard"), "1")
    fake.deny = lambda obj, old: "policy: images must be signed" if old is not None else None
    with pytest.raises(DeployError) as e:
        deploy(api, spec_for(URI_V2, deployment_mode="Standard"), "2")
    message = str(e.value)
    assert "HTTP 403" in message and "denied the request: policy: images must be signed" in message
    assert "nothing was changed" in message and "previous version 1" in message and "keeps serving" in message
    assert len(fake.calls("PATCH")) == 1  # no rollback of what never happened


def test_a_refused_promotion_removes_the_canary(fake: FakeKServe, api: InferenceServiceApi) -> None:
    """Through the test double: the canary was admitted, the promotion is denied: the canary goes and the
    previous version keeps serving."""
    served(fake, spec_for(URI_V1, deployment_mode="Standard"), "1")

    def deny_renames(obj: dict[str, Any], old: dict[str, Any] | None) -> str | None:
        renamed = old and obj["spec"]["predictor"].get("name") != old["spec"]["predictor"].get("name")
        return "policy: no renames" if renamed else None

    fake.deny = deny_renames
    with pytest.raises(
        DeployError, match=r"denied the request: policy: no renames.*rolled back.*keeps serving"
    ):
        deploy(api, spec_for(URI_V2, deployment_mode="Standard"), "2")
    assert "canary" not in fake.objects[NS, MODEL]["spec"]


def test_kserve_without_spec_canary_rolls_out_in_one_step(
    api: InferenceServiceApi, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the test double with the CRD of KServe 0.16-0.19 (no spec.canary): the API server refuses
    the unknown field under strict validation, and the step rolls out in one step and says so."""
    old_kserve = FakeKServe(
        service_accounts={(NS, "bockd-s3"): _s3_account()},
        schema=without(crd_schema(CRD, "v1beta1"), "spec", "canary"),
    )
    with serve_api(old_kserve) as fake:
        api = InferenceServiceApi.from_config(client_configuration(fake))
        served(fake, spec_for(URI_V1, deployment_mode="Standard"), "1")
        with caplog.at_level(logging.WARNING, logger="bockd.deploy"):
            result = deploy(api, spec_for(URI_V2, deployment_mode="Standard"), "2")
        assert not result.canary and fake.objects[NS, MODEL]["metadata"]["labels"][LABEL_VERSION] == "2"
        assert fake.refused and 'unknown field "spec.canary"' in fake.refused[0]
        assert "KServe < 0.20" in caplog.text and "in one step" in caplog.text


def test_same_files_under_a_new_version_move_the_label_without_a_canary(
    fake: FakeKServe, api: InferenceServiceApi
) -> None:
    """Through the test double (no Kubernetes API server can run here): no new revision, so no canary."""
    served(fake, spec_for(URI_V1), "1")
    result = deploy(api, spec_for(URI_V1), "2")
    (patch,) = fake.calls("PATCH")
    assert patch.body["metadata"]["labels"][LABEL_VERSION] == "2"
    assert patch.body["metadata"]["annotations"][ANNOTATION_VERSION] == "2"
    assert patch.body["spec"]["predictor"]["canaryTrafficPercent"] is None
    assert not result.canary and result.changed and result.previous_version == "1"


# --------------------------------------------------------------------------- the S3 account, per namespace


def test_a_namespace_without_the_s3_account_fails_before_any_change(
    fake: FakeKServe, api: InferenceServiceApi
) -> None:
    """Through the test double: KServe would download with no credentials (it ignores a missing account),
    so the step refuses first and says how to create it."""
    fake.service_accounts.clear()
    with pytest.raises(DeployError, match=rf"ServiceAccount {NS}/bockd-s3 does not exist.*overlays/profile"):
        deploy(api, spec_for(), "1")
    assert fake.calls("POST") == [] and fake.calls("PATCH") == []
    fake.service_accounts[NS, "bockd-s3"] = {**_s3_account(), "secrets": []}
    with pytest.raises(DeployError, match="lists no Secret"):
        deploy(api, spec_for(), "1")
    assert fake.calls("POST") == []


def test_an_account_that_cannot_be_read_is_not_checked(
    fake: FakeKServe, api: InferenceServiceApi, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the test double: without RBAC to read ServiceAccounts the step warns and deploys."""
    fake.service_accounts_forbidden = True
    with caplog.at_level(logging.WARNING, logger="bockd.deploy"):
        assert deploy(api, spec_for(), "1").url == _url(MODEL, NS)
    assert "not checked" in caplog.text


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
    result = deploy(InferenceServiceApi.from_config(), spec_for(), "1")
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
    from mlflow import MlflowClient

    from bockd.export import export_student
    from bockd.pipeline import steps
    from bockd.pipeline.records import Endpoint, Registration
    from bockd.platform.model_registry import register_student
    from bockd.platform.s3 import S3Uri, client

    model_dir = tmp_path / "model"
    export_student(ensemble_run, steps.student_dir(model_dir, 2), index=1)
    mlflow = MlflowClient(mlflow_stack.mlflow_uri)
    run_id = mlflow.create_run(mlflow.create_experiment("deploy-step")).info.run_id
    reg = register_student(mlflow, run_id, steps.student_dir(model_dir, 2), prefix="dep", dataset="digits")

    _use_kubeconfig(fake, tmp_path, monkeypatch)

    registrations = [Registration(student=2, registered_model=reg.name, version=reg.version, created=True)]
    # Where to serve and the MLflow server are the step's own parameters, never deploy_options keys.
    target = steps.ClusterTarget(NS, mlflow_stack.mlflow_uri, "s3://bockd/mlflow")
    options = {"poll_s": POLL, "canary_traffic_percent": 20}
    served = steps.deploy(
        model_dir, [2], registrations, mode="cluster", cluster=target, deploy_options=options
    )
    name = normalize_name(reg.name)
    assert served == [Endpoint(student=2, registered_model=reg.name, version=reg.version, url=_url(name, NS))]

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
            model_dir,
            [2],
            registrations,
            mode="cluster",
            cluster=target,
            deploy_options={**options, "replicas": 2},
        )
    with pytest.raises(ConfigError, match="deploy_options: unknown keys"):  # no internal key rides along
        steps.deploy(
            model_dir, [2], registrations, mode="cluster", cluster=target, deploy_options={"namespace": NS}
        )


def _use_kubeconfig(fake: FakeKServe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside a cluster, a kubeconfig pointing at the test double."""
    from kubernetes.config import kube_config

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


def test_the_pipeline_deploys_the_cascade_as_one_inference_service(
    fake: FakeKServe,
    mlflow_stack: Any,
    val_split_family: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`steps.deploy_cascade(mode="cluster")`: the fitted cascade, registered in the real MLflow registry
    (its files really in S3), becomes ONE InferenceService on the students' runtime whose storageUri is the
    registered cascade folder; a new version rolls out by canary and a failing one is rolled back, as for
    a student. The ISVC goes to the test double (no Kubernetes API server can run here)."""
    from mlflow import MlflowClient

    from bockd.pipeline import steps
    from bockd.pipeline.records import CascadeEndpoint
    from bockd.platform.model_registry import storage_uri
    from bockd.platform.s3 import S3Uri, client

    out = tmp_path / "cascade"
    # No measurements: the step times the students itself; S3 -> S1.
    steps.cascade(val_split_family / "data", val_split_family / "model", [], None, {"students": [3, 1]}, out)
    mlflow = MlflowClient(mlflow_stack.mlflow_uri)
    experiment = mlflow.create_experiment("deploy-cascade")

    def registered() -> Any:  # the cascade of a new training run: a new version of the same model
        run_id = mlflow.create_run(experiment).info.run_id
        return steps.register_cascade(out, tracking_uri=mlflow_stack.mlflow_uri, run_id=run_id, prefix="dc")

    _use_kubeconfig(fake, tmp_path, monkeypatch)
    target = steps.ClusterTarget(NS, mlflow_stack.mlflow_uri, "s3://bockd/mlflow")
    options = {"poll_s": POLL, "canary_traffic_percent": 20, "cascade": True}
    first = registered()
    endpoint = steps.deploy_cascade(out, first, mode="cluster", cluster=target, deploy_options=options)
    name = normalize_name("dc-digits-resnet20-cascade")
    assert endpoint == CascadeEndpoint(
        registered_model="dc-digits-resnet20-cascade", version="1", url=_url(name, NS), labels=["S3", "S1"]
    )
    (isvc,) = fake.objects.values()
    model = isvc["spec"]["predictor"]["model"]
    assert (model["runtime"], model["modelFormat"], model["args"]) == (
        "bockd-predictor", {"name": "bockd", "version": "1"}, ["--backend=onnx"],
    )  # fmt: skip
    loc = S3Uri.parse(model["storageUri"])
    keys = {
        o.object_name.removeprefix(loc.prefix).lstrip("/")
        for o in client().list_objects(loc.bucket, loc.prefix + "/", recursive=True)
    }
    # What the model server loads from /mnt/models: the cascade card and each student's ONNX and card.
    assert keys == {"cascade.json", "S3/model.onnx", "S3/config.json", "S1/model.onnx", "S1/config.json"}
    assert isvc["metadata"]["labels"][LABEL_VERSION] == "1"

    second = registered()
    steps.deploy_cascade(out, second, mode="cluster", cluster=target, deploy_options=options)
    canary, promotion = fake.calls("PATCH")
    assert canary.body["spec"]["predictor"]["canaryTrafficPercent"] == 20
    assert promotion.body["metadata"]["labels"][LABEL_VERSION] == second.version == "2"
    stable = fake.objects[NS, name]["spec"]["predictor"]["model"]["storageUri"]
    assert (
        stable
        == storage_uri(mlflow, second.registered_model, "2", "s3://bockd/mlflow")
        != model["storageUri"]
    )

    third = registered()
    fake.failing.add(storage_uri(mlflow, third.registered_model, third.version, "s3://bockd/mlflow"))
    with pytest.raises(DeployError, match=r"RevisionFailed.*keeps serving"):
        steps.deploy_cascade(out, third, mode="cluster", cluster=target, deploy_options=options)
    assert fake.objects[NS, name]["spec"]["predictor"]["model"]["storageUri"] == stable
    for obj in fake.written:
        validate_against_crd(obj, CRD)

    # A skipped cascade, or one asked for with the torch backend, is refused before any request.
    fake.requests.clear()
    skipped = tmp_path / "skipped"
    steps.cascade(
        val_split_family / "data", val_split_family / "model", [], None, {"enabled": False}, skipped
    )
    with pytest.raises(ConfigError, match=r"deploy_options.cascade: the cascade was skipped \(cascade off"):
        steps.deploy_cascade(skipped, None, mode="cluster", cluster=target, deploy_options=options)
    with pytest.raises(ConfigError, match="only ONNX Runtime runs"):
        steps.deploy_cascade(
            out, third, mode="cluster", cluster=target, deploy_options={**options, "backend": "torch"}
        )
    assert fake.requests == []
