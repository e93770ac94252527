"""Serve a registered student on a cluster: one KServe InferenceService per model, rolled out safely.

The ISVC runs our ClusterServingRuntime (``bockd-predictor``, model format ``bockd`` version "1"); its
storage initializer downloads ``storageUri`` (the MLflow model version's S3 folder) to ``/mnt/models``
with the ServiceAccount ``bockd-s3`` (annotated with ``serving.kserve.io/s3-*``, referencing the S3 secret).
The backend (``torch`` | ``onnx``) travels as the container argument ``--backend=<b>``: KServe appends an
ISVC's ``model.args`` to the runtime's arguments, and ``python -m bockd.serving`` takes ``--backend``.

Rollout of a new version onto an ISVC that serves an older one (``deploy_inference_service``):

- Knative mode (legacy name ``Serverless``): patch the new predictor with ``canaryTrafficPercent: p``;
  wait until the new revision is ready and takes p % of the traffic; promote by removing
  ``canaryTrafficPercent`` (the new revision takes 100 %); wait Ready.
- Standard mode (legacy ``RawDeployment``): the CRD (shared/schemas, KServe main after 0.20) and the 0.21
  SDK (``V1beta1CanarySpec``) have ``spec.canary``, a list of ``{predictor, trafficPercent}``, each canary
  its own Deployment ``{isvc}-{predictor.name}-predictor``. Canary: add one named ``v<version>`` with p %;
  wait for its ``status.canaryStatuses`` entry to be ready; promote as the SDK's field documentation says:
  ``predictor.name`` = the canary's name and the entry removed (its Deployment becomes the predictor's).
  Without a canary percentage: patch the predictor and let the Deployment's rolling update replace the pods.
- Either mode: a canary only when the storageUri changes (the same files under a new version make no new
  revision for a percentage to point at): then one step.
- Failure (``Ready``/``PredictorReady`` False with a reason that is not a transient one) or timeout: the
  previous predictor is patched back (previous storageUri, no canary), waited for, and `DeployError` says
  which condition failed and that the previous version keeps serving.

The version that serves fully is the label ``bockd.io/model-version``; its storage URI the annotation
``bockd.io/stable-storage-uri``: a rollout interrupted half-way (canary patched, never promoted) is rolled
back to that URI, never to the half-rolled-out one. Deploying the version that already serves is a no-op.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bockd import kube
from bockd.errors import BockdError, ConfigError
from bockd.kube import CustomResourceApi

LOG = logging.getLogger("bockd.deploy")

GROUP = "serving.kserve.io"
VERSION = "v1beta1"
PLURAL = "inferenceservices"
KIND = "InferenceService"
API_VERSION = f"{GROUP}/{VERSION}"

DEPLOYMENT_MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
KNATIVE = "Knative"  # KServe >= 0.16 names; the controller still accepts the legacy ones
STANDARD = "Standard"
_MODE_ALIASES = {"knative": KNATIVE, "serverless": KNATIVE, "standard": STANDARD, "rawdeployment": STANDARD}

LABEL_VERSION = "bockd.io/model-version"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
ANNOTATION_MODEL = "bockd.io/registered-model"
ANNOTATION_VERSION = "bockd.io/model-version"
ANNOTATION_RUN = "bockd.io/mlflow-run-id"
ANNOTATION_STABLE_URI = "bockd.io/stable-storage-uri"

BACKENDS = ("torch", "onnx")
# Knative names revisions "{isvc}-predictor-00001" and uses them as label values (at most 63 characters);
# Standard-mode canaries add "-v<version>". 45 leaves room for both.
MAX_NAME_LENGTH = 45
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_QUANTITY = re.compile(r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE])?$")
_AUTOSCALE_METRICS = {KNATIVE: ("concurrency", "rps", "cpu", "memory"), STANDARD: ("cpu", "memory")}
_AUTOSCALE_DEFAULTS = {KNATIVE: ("concurrency", 8), STANDARD: ("cpu", 80)}
# Reasons KServe/Knative/Deployments report while pods are still coming up: not failures.
TRANSIENT_REASONS = frozenset({"MinimumReplicasUnavailable", "RevisionMissing", "Deploying", "Pending"})
_FAILING_CONDITIONS = ("Ready", "PredictorReady")


class DeployError(BockdError, RuntimeError):
    """An InferenceService could not be created, rolled out or rolled back."""


# ---------------------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class Resources:
    """Requests and limits of the predictor container (Kubernetes quantities)."""

    cpu_request: str = "1"
    memory_request: str = "2Gi"
    cpu_limit: str = "2"
    memory_limit: str = "4Gi"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, str) or not _QUANTITY.match(value):
                raise ConfigError(
                    f"resources.{f.name}: {value!r} is not a Kubernetes quantity (e.g. 2, 500m, 4Gi)"
                )


def normalize_name(registered_model: str) -> str:
    """A DNS-1035 label naming an ISVC after a registered model: ``BOC-KD/Digits_S3`` -> ``boc-kd-digits-s3``.

    Names longer than `MAX_NAME_LENGTH` keep their start and gain a hash of the whole name, so two long
    names that differ only at the end stay distinct.
    """
    name = re.sub(r"[^a-z0-9]+", "-", registered_model.lower()).strip("-")
    if not name:
        raise ConfigError(
            f"model name {registered_model!r}: no letters or digits to name an InferenceService"
        )
    if not name[0].isalpha():
        name = f"m-{name}"
    if len(name) > MAX_NAME_LENGTH:
        digest = hashlib.sha256(registered_model.encode()).hexdigest()[:8]
        name = f"{name[: MAX_NAME_LENGTH - 9].rstrip('-')}-{digest}"
    return name


def normalize_mode(mode: str) -> str:
    """``Knative``/``Serverless`` -> ``Knative``; ``Standard``/``RawDeployment`` -> ``Standard``."""
    try:
        return _MODE_ALIASES[mode.strip().lower()]
    except KeyError:
        raise ConfigError(
            f"deployment_mode: {mode!r} is not one of Knative (Serverless) or Standard (RawDeployment)"
        ) from None


@dataclass(frozen=True)
class DeploySpec:
    """What to serve and how. Validated here; `deployment_mode` is normalised to Knative or Standard.

    ``scale_metric``/``scale_target`` default per mode: Knative autoscales on ``concurrency`` (8 requests
    per pod), Standard mode's HPA only on ``cpu``/``memory`` (80 % utilisation; KServe's webhook rejects
    concurrency there).
    """

    name: str
    namespace: str
    storage_uri: str
    registered_model: str = ""
    mlflow_run_id: str | None = None
    service_account: str = "bockd-s3"
    runtime: str = "bockd-predictor"
    model_format: str = "bockd"
    model_format_version: str = "1"
    backend: str = "torch"
    resources: Resources = field(default_factory=Resources)
    min_replicas: int = 1
    max_replicas: int = 3
    scale_metric: str | None = None
    scale_target: int | None = None
    canary_traffic_percent: int | None = 10
    deployment_mode: str = KNATIVE
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        mode = normalize_mode(self.deployment_mode)
        object.__setattr__(self, "deployment_mode", mode)
        metric, target = _AUTOSCALE_DEFAULTS[mode]
        object.__setattr__(self, "scale_metric", self.scale_metric or metric)
        object.__setattr__(
            self, "scale_target", self.scale_target if self.scale_target is not None else target
        )
        object.__setattr__(self, "labels", dict(self.labels))
        object.__setattr__(self, "annotations", dict(self.annotations))
        _check_spec(self)

    @classmethod
    def for_model(cls, registered_model: str, namespace: str, storage_uri: str, **kwargs: Any) -> DeploySpec:
        """The spec of a registered model's ISVC, named after the model (see `normalize_name`)."""
        return cls(normalize_name(registered_model), namespace, storage_uri, registered_model, **kwargs)

    @property
    def knative(self) -> bool:
        return self.deployment_mode == KNATIVE


def _check_spec(spec: DeploySpec) -> None:
    if len(spec.name) > MAX_NAME_LENGTH or not _DNS_1035.match(spec.name):
        raise ConfigError(
            f"name: {spec.name!r} is not a DNS-1035 label of at most {MAX_NAME_LENGTH} characters "
            f"(lower-case letters, digits, '-', starting with a letter); normalize_name() makes one"
        )
    if len(spec.namespace) > 63 or not re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", spec.namespace):
        raise ConfigError(f"namespace: {spec.namespace!r} is not a Kubernetes namespace name")
    if not re.match(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$", spec.storage_uri):
        raise ConfigError(f"storage_uri: {spec.storage_uri!r} is not s3://<bucket>/<prefix>")
    if spec.backend not in BACKENDS:
        raise ConfigError(f"backend: {spec.backend!r} is not one of {', '.join(BACKENDS)}")
    if not 0 <= spec.min_replicas <= spec.max_replicas or spec.max_replicas < 1:
        raise ConfigError(
            f"replicas: need 0 <= min ({spec.min_replicas}) <= max ({spec.max_replicas}), max >= 1"
        )
    if spec.scale_metric not in _AUTOSCALE_METRICS[spec.deployment_mode]:
        allowed = ", ".join(_AUTOSCALE_METRICS[spec.deployment_mode])
        raise ConfigError(
            f"scale_metric: {spec.scale_metric!r} in {spec.deployment_mode} mode: use {allowed}"
        )
    if spec.scale_target is None or spec.scale_target < 1:
        raise ConfigError(f"scale_target: {spec.scale_target!r} must be a positive integer")
    p = spec.canary_traffic_percent
    if p is not None and not 0 < p < 100:
        raise ConfigError(f"canary_traffic_percent: {p} must be in 1..99, or None to roll out in one step")
    for key, value in spec.labels.items():
        if not isinstance(value, str) or len(value) > 63 or (value and not _LABEL_VALUE.match(value)):
            raise ConfigError(f"labels.{key}: {value!r} is not a Kubernetes label value")


# ---------------------------------------------------------------------------------------------- the ISVC


def _kserve() -> Any:
    import kserve  # heavy, and parses sys.argv on import: only when an ISVC is built

    return kserve


def _check_version(model_version: str) -> str:
    version = str(model_version)
    if len(version) > 63 or not _LABEL_VALUE.match(version):
        raise ConfigError(f"model_version: {version!r} must be a Kubernetes label value (e.g. '7')")
    return version


def canary_name(model_version: str) -> str:
    """The Standard-mode canary (and, once promoted, predictor) name of a version: ``v7``."""
    return "v" + re.sub(r"[^a-z0-9]+", "-", str(model_version).lower()).strip("-")


def build_predictor(
    spec: DeploySpec, name: str | None = None, canary_traffic_percent: int | None = None
) -> Any:
    """The typed ``V1beta1PredictorSpec``: our runtime, the model's storageUri, resources and autoscaling."""
    kserve = _kserve()
    from kubernetes import client

    r = spec.resources
    model = kserve.V1beta1ModelSpec(
        name="kserve-container",  # the runtime's container it merges into (the SDK's default is "")
        model_format=kserve.V1beta1ModelFormat(name=spec.model_format, version=spec.model_format_version),
        runtime=spec.runtime,
        storage_uri=spec.storage_uri,
        args=[f"--backend={spec.backend}"],  # appended to the runtime's args
        resources=client.V1ResourceRequirements(
            requests={"cpu": r.cpu_request, "memory": r.memory_request},
            limits={"cpu": r.cpu_limit, "memory": r.memory_limit},
        ),
        # our container only (the serving image runs as uid 1000); KServe's storage initializer keeps its own
        security_context=client.V1SecurityContext(
            run_as_non_root=True,
            allow_privilege_escalation=False,
            capabilities=client.V1Capabilities(drop=["ALL"]),
            seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault"),
        ),
    )
    return kserve.V1beta1PredictorSpec(
        name=name,
        model=model,
        service_account_name=spec.service_account,
        min_replicas=spec.min_replicas,
        max_replicas=spec.max_replicas,
        scale_metric=spec.scale_metric,
        scale_target=spec.scale_target,
        scale_metric_type=None if spec.knative else "Utilization",
        canary_traffic_percent=canary_traffic_percent,
    )


def build_metadata(spec: DeploySpec, model_version: str) -> Any:
    """``V1ObjectMeta`` with the deployment mode and what is served (model, version, MLflow run)."""
    from kubernetes import client

    version = _check_version(model_version)
    labels = {**spec.labels, LABEL_VERSION: version, LABEL_MANAGED_BY: "bockd"}
    annotations = {
        **spec.annotations,
        DEPLOYMENT_MODE_ANNOTATION: spec.deployment_mode,
        ANNOTATION_VERSION: version,
        ANNOTATION_STABLE_URI: spec.storage_uri,
    }
    if spec.registered_model:
        annotations[ANNOTATION_MODEL] = spec.registered_model
    if spec.mlflow_run_id:
        annotations[ANNOTATION_RUN] = spec.mlflow_run_id
    return client.V1ObjectMeta(
        name=spec.name, namespace=spec.namespace, labels=labels, annotations=annotations
    )


def build_inference_service(
    spec: DeploySpec, model_version: str, canary_traffic_percent: int | None = None
) -> dict[str, Any]:
    """The InferenceService of ``spec`` serving ``model_version``, as the JSON the API server takes."""
    kserve = _kserve()
    isvc = kserve.V1beta1InferenceService(
        api_version=API_VERSION,
        kind=KIND,
        metadata=build_metadata(spec, model_version),
        spec=kserve.V1beta1InferenceServiceSpec(
            predictor=build_predictor(spec, None, canary_traffic_percent)
        ),
    )
    return _serialize(isvc)


def _serialize(obj: Any) -> Any:
    from kubernetes import client

    return client.ApiClient().sanitize_for_serialization(obj)


def _standard_canary(spec: DeploySpec, model_version: str) -> list[dict[str, Any]]:
    kserve = _kserve()
    predictor = build_predictor(spec, name=canary_name(model_version))
    return _serialize(
        [kserve.V1beta1CanarySpec(predictor=predictor, traffic_percent=spec.canary_traffic_percent)]
    )


# ---------------------------------------------------------------------------------------------- the API


class KubeApi(CustomResourceApi):
    """The calls on InferenceServices that a deployment needs."""

    group, version, plural, kind, error = GROUP, VERSION, PLURAL, KIND, DeployError

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        obj = self.get(namespace, name)
        if obj is None:
            raise DeployError(f"InferenceService {namespace}/{name} disappeared while deploying")
        return obj.get("status") or {}


def load_kube_config() -> Any:
    """The client configuration: in-cluster (the pod's ServiceAccount) first, then ``~/.kube/config``."""
    return kube.load_kube_config(DeployError)


# ---------------------------------------------------------------------------------------------- status


@dataclass(frozen=True)
class Failure:
    condition: str
    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.condition}=False, reason {self.reason}" + (f": {self.message}" if self.message else "")


class _RolloutFailed(Exception):
    def __init__(self, failure: Failure | None, summary: str) -> None:
        super().__init__(str(failure) if failure else f"timed out, last status: {summary}")
        self.failure = failure


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return c
    return {}


def _observed(obj: dict[str, Any]) -> bool:
    """Whether the controller has seen the latest spec: before that, the status describes an older one."""
    generation = (obj.get("metadata") or {}).get("generation")
    observed = (obj.get("status") or {}).get("observedGeneration")
    return generation is None or (observed is not None and observed >= generation)


def _predictor_status(obj: dict[str, Any]) -> dict[str, Any]:
    return ((obj.get("status") or {}).get("components") or {}).get("predictor") or {}


def _latest_traffic(obj: dict[str, Any]) -> int | None:
    for t in _predictor_status(obj).get("traffic") or []:
        if t.get("latestRevision"):
            return int(t.get("percent") or 0)
    return None


def failure_of(obj: dict[str, Any]) -> Failure | None:
    """A terminal failure: Ready or PredictorReady False with a reason that is not a transient one."""
    for kind in _FAILING_CONDITIONS:
        c = _condition(obj, kind)
        reason = c.get("reason") or ""
        if c.get("status") == "False" and reason and reason not in TRANSIENT_REASONS:
            return Failure(kind, reason, c.get("message") or "")
    return None


def is_ready(obj: dict[str, Any]) -> bool:
    """Ready=True for the latest spec and, in Knative mode, the latest revision ready."""
    if not _observed(obj) or _condition(obj, "Ready").get("status") != "True":
        return False
    p = _predictor_status(obj)
    return p.get("latestCreatedRevision") is None or p.get("latestReadyRevision") == p.get(
        "latestCreatedRevision"
    )


def summarize(obj: dict[str, Any]) -> str:
    """One line of the status that matters while waiting (logged when it changes)."""
    ready = _condition(obj, "Ready")
    parts = [
        f"Ready={ready.get('status', 'Unknown')}" + (f" ({ready['reason']})" if ready.get("reason") else "")
    ]
    generation = (obj.get("metadata") or {}).get("generation")
    if generation is not None:
        parts.append(f"generation {(obj.get('status') or {}).get('observedGeneration', '-')}/{generation}")
    p = _predictor_status(obj)
    if p.get("latestCreatedRevision"):
        parts.append(f"revision {p.get('latestReadyRevision', '-')}/{p['latestCreatedRevision']}")
    if _latest_traffic(obj) is not None:
        parts.append(f"latest {_latest_traffic(obj)}%")
    for c in (obj.get("status") or {}).get("canaryStatuses") or []:
        parts.append(f"canary {c.get('name')} {c.get('trafficPercent')}% ready={c.get('ready')}")
    return ", ".join(parts)


def _wait(
    api: KubeApi,
    spec: DeploySpec,
    goal: Callable[[dict[str, Any]], bool],
    what: str,
    timeout_s: float,
    poll_s: float,
) -> dict[str, Any]:
    """Poll until ``goal`` holds for the latest spec; `_RolloutFailed` on a terminal failure or timeout."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        obj = api.get(spec.namespace, spec.name)
        if obj is None:
            raise DeployError(f"InferenceService {spec.namespace}/{spec.name} disappeared while deploying")
        summary = summarize(obj)
        if summary != last:
            LOG.info("%s/%s %s: %s", spec.namespace, spec.name, what, summary)
            last = summary
        if _observed(obj):
            failure = failure_of(obj)
            if failure is not None:
                raise _RolloutFailed(failure, summary)
            if goal(obj):
                return obj
        if time.monotonic() >= deadline:
            raise _RolloutFailed(None, summary)
        time.sleep(poll_s)


# ---------------------------------------------------------------------------------------------- deploy


@dataclass(frozen=True)
class DeployResult:
    name: str
    namespace: str
    url: str
    model_version: str
    revision: str | None  # Knative: the latest ready revision; Standard: the predictor's name, if any
    canary: bool  # whether the rollout went through a canary step
    previous_version: str | None
    changed: bool  # False: the version already served, nothing was sent


def served_version(obj: dict[str, Any]) -> str | None:
    """The model version an ISVC fully serves (our label), or None for one bockd did not create."""
    return ((obj.get("metadata") or {}).get("labels") or {}).get(LABEL_VERSION)


def _stable_storage_uri(obj: dict[str, Any]) -> str | None:
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    return annotations.get(ANNOTATION_STABLE_URI) or _predictor_of(obj).get("model", {}).get("storageUri")


def _predictor_of(obj: dict[str, Any]) -> dict[str, Any]:
    return (obj.get("spec") or {}).get("predictor") or {}


def _rollout_pending(obj: dict[str, Any]) -> bool:
    return _predictor_of(obj).get("canaryTrafficPercent") is not None or bool(
        (obj.get("spec") or {}).get("canary")
    )


def deploy_inference_service(
    api: KubeApi, spec: DeploySpec, model_version: str, timeout_s: float = 600, poll_s: float = 5
) -> DeployResult:
    """Create the ISVC, or roll ``model_version`` out onto it (canary, promotion; rollback on failure).

    Waits for each step up to ``timeout_s`` and returns the served URL. Raises `DeployError` when the new
    version fails; the previous version has then been restored and keeps serving.
    """
    version = _check_version(model_version)
    existing = api.get(spec.namespace, spec.name)
    if existing is None:
        return _create(api, spec, version, timeout_s, poll_s)
    _check_mode(existing, spec)
    previous = served_version(existing)
    current_uri = _predictor_of(existing).get("model", {}).get("storageUri")
    if previous == version and current_uri == spec.storage_uri and not _rollout_pending(existing):
        LOG.info("%s/%s already serves version %s: nothing to do", spec.namespace, spec.name, version)
        obj = _wait_or_raise(api, spec, is_ready, "ready", timeout_s, poll_s, version)
        return _result(obj, spec, version, canary=False, previous=previous, changed=False)
    try:
        obj, canary = _roll_out(
            api, spec, version, timeout_s, poll_s, same_files=current_uri == spec.storage_uri
        )
    except _RolloutFailed as e:
        raise _roll_back(api, spec, existing, timeout_s, poll_s, version, e) from e
    return _result(obj, spec, version, canary=canary, previous=previous, changed=True)


def _create(api: KubeApi, spec: DeploySpec, version: str, timeout_s: float, poll_s: float) -> DeployResult:
    body = build_inference_service(spec, version)
    LOG.info(
        "creating InferenceService %s/%s (version %s, %s)",
        spec.namespace,
        spec.name,
        version,
        spec.storage_uri,
    )
    api.create(spec.namespace, body)
    obj = _wait_or_raise(api, spec, is_ready, "create", timeout_s, poll_s, version)
    return _result(obj, spec, version, canary=False, previous=None, changed=True)


def _wait_or_raise(
    api: KubeApi,
    spec: DeploySpec,
    goal: Callable[[dict[str, Any]], bool],
    what: str,
    timeout_s: float,
    poll_s: float,
    version: str,
) -> dict[str, Any]:
    """Wait where there is no previous version to roll back to: a failure is the caller's error."""
    try:
        return _wait(api, spec, goal, what, timeout_s, poll_s)
    except _RolloutFailed as e:
        raise DeployError(
            f"InferenceService {spec.namespace}/{spec.name} (version {version}, {spec.storage_uri}) "
            f"did not become ready: {e}"
        ) from e


def _check_mode(existing: dict[str, Any], spec: DeploySpec) -> None:
    annotations = (existing.get("metadata") or {}).get("annotations") or {}
    mode = annotations.get(DEPLOYMENT_MODE_ANNOTATION) or (existing.get("status") or {}).get("deploymentMode")
    if mode and normalize_mode(mode) != spec.deployment_mode:
        # KServe's webhook rejects a change of mode; delete the ISVC to switch
        raise DeployError(
            f"InferenceService {spec.namespace}/{spec.name} runs in {mode} mode, not {spec.deployment_mode}: "
            f"KServe cannot change the mode of an existing InferenceService; delete it first"
        )


def _metadata_patch(spec: DeploySpec, version: str) -> dict[str, Any]:
    meta = _serialize(build_metadata(spec, version))
    return {"labels": meta["labels"], "annotations": meta["annotations"]}


def _roll_out(
    api: KubeApi, spec: DeploySpec, version: str, timeout_s: float, poll_s: float, same_files: bool
) -> tuple[dict[str, Any], bool]:
    """The rollout steps of the mode; returns the final object and whether a canary step ran.

    A canary is used only when the model files change: with the same storageUri, Knative would make no
    new revision for the canary percentage to point at.
    """
    if spec.canary_traffic_percent is None or same_files:
        return _roll_out_one_step(api, spec, version, timeout_s, poll_s), False
    if spec.knative:
        return _roll_out_knative_canary(api, spec, version, timeout_s, poll_s), True
    return _roll_out_standard_canary(api, spec, version, timeout_s, poll_s), True


def _roll_out_one_step(
    api: KubeApi, spec: DeploySpec, version: str, timeout_s: float, poll_s: float
) -> dict[str, Any]:
    """Knative: a new revision takes all the traffic when ready; Standard: the Deployment's rolling update."""
    predictor = _serialize(build_predictor(spec))
    predictor["canaryTrafficPercent"] = None  # a canary left by an interrupted rollout goes
    patch: dict[str, Any] = {"metadata": _metadata_patch(spec, version), "spec": {"predictor": predictor}}
    if not spec.knative:
        patch["spec"]["canary"] = None
    LOG.info("%s/%s: rolling out version %s in one step", spec.namespace, spec.name, version)
    api.patch(spec.namespace, spec.name, patch)
    return _wait(api, spec, is_ready, "rollout", timeout_s, poll_s)


def _roll_out_knative_canary(
    api: KubeApi, spec: DeploySpec, version: str, timeout_s: float, poll_s: float
) -> dict[str, Any]:
    """New revision at p % (``canaryTrafficPercent``), then promoted by removing the percentage."""
    ns, name, p = spec.namespace, spec.name, spec.canary_traffic_percent
    LOG.info("%s/%s: canary of version %s with %d%% of the traffic", ns, name, version, p)
    predictor = _serialize(build_predictor(spec, canary_traffic_percent=p))
    api.patch(ns, name, {"spec": {"predictor": predictor}})
    _wait(api, spec, functools.partial(_knative_at, percent=p), "canary", timeout_s, poll_s)
    LOG.info("%s/%s: promoting version %s to 100%%", ns, name, version)
    promote = {
        "metadata": _metadata_patch(spec, version),
        "spec": {"predictor": {"canaryTrafficPercent": None}},
    }
    api.patch(ns, name, promote)
    return _wait(api, spec, functools.partial(_knative_at, percent=100), "promotion", timeout_s, poll_s)


def _knative_at(obj: dict[str, Any], percent: int) -> bool:
    latest = _latest_traffic(obj)
    return is_ready(obj) and (latest == percent or (percent == 100 and latest is None))


def _roll_out_standard_canary(
    api: KubeApi, spec: DeploySpec, version: str, timeout_s: float, poll_s: float
) -> dict[str, Any]:
    """A ``spec.canary`` entry at p %, then promoted: the predictor takes its name, the entry goes."""
    ns, name, canary = spec.namespace, spec.name, canary_name(version)
    LOG.info(
        "%s/%s: canary %s (version %s) with %d%% of the traffic", ns, name, canary, version,
        spec.canary_traffic_percent,
    )  # fmt: skip
    api.patch(ns, name, {"spec": {"canary": _standard_canary(spec, version)}})
    _wait(api, spec, functools.partial(_canary_ready, canary=canary), "canary", timeout_s, poll_s)
    LOG.info("%s/%s: promoting canary %s (version %s)", ns, name, canary, version)
    predictor = _serialize(build_predictor(spec, name=canary))
    predictor["canaryTrafficPercent"] = None
    promote = {"metadata": _metadata_patch(spec, version), "spec": {"predictor": predictor, "canary": None}}
    api.patch(ns, name, promote)
    return _wait(api, spec, _no_canary_left, "promotion", timeout_s, poll_s)


def _no_canary_left(obj: dict[str, Any]) -> bool:
    return is_ready(obj) and not (obj.get("status") or {}).get("canaryStatuses")


def _canary_ready(obj: dict[str, Any], canary: str) -> bool:
    statuses = (obj.get("status") or {}).get("canaryStatuses") or []
    return is_ready(obj) and any(c.get("name") == canary and c.get("ready") for c in statuses)


def rollback_patch(existing: dict[str, Any], knative: bool) -> dict[str, Any]:
    """The merge patch that restores ``existing``'s fully served version: its predictor, URI and metadata."""
    predictor = copy.deepcopy(_predictor_of(existing))
    stable_uri = _stable_storage_uri(existing)
    if stable_uri:
        predictor.setdefault("model", {})["storageUri"] = stable_uri
    predictor["canaryTrafficPercent"] = None
    meta = existing.get("metadata") or {}
    patch: dict[str, Any] = {
        "metadata": {"labels": meta.get("labels") or {}, "annotations": meta.get("annotations") or {}},
        "spec": {"predictor": predictor},
    }
    if not knative:
        patch["spec"]["canary"] = None
    return patch


def _roll_back(
    api: KubeApi,
    spec: DeploySpec,
    existing: dict[str, Any],
    timeout_s: float,
    poll_s: float,
    version: str,
    cause: _RolloutFailed,
) -> DeployError:
    """Patch the previous version back and wait for it; the error to raise says how that went."""
    ns, name = spec.namespace, spec.name
    previous = served_version(existing) or "(unlabelled)"
    what = str(cause.failure) if cause.failure else f"not ready after {timeout_s:g} s ({cause})"
    LOG.warning(
        "%s/%s: version %s failed (%s); rolling back to version %s", ns, name, version, what, previous
    )
    api.patch(ns, name, rollback_patch(existing, spec.knative))
    try:
        _wait(api, spec, is_ready, "rollback", timeout_s, poll_s)
    except _RolloutFailed as e:
        return DeployError(
            f"InferenceService {ns}/{name}: version {version} ({spec.storage_uri}) failed: {what}; "
            f"the rollback to version {previous} ({_stable_storage_uri(existing)}) "
            f"did not become ready either: {e}"
        )
    return DeployError(
        f"InferenceService {ns}/{name}: version {version} ({spec.storage_uri}) failed: {what}; rolled back, "
        f"the previous version {previous} ({_stable_storage_uri(existing)}) keeps serving"
    )


def _result(
    obj: dict[str, Any], spec: DeploySpec, version: str, canary: bool, previous: str | None, changed: bool
) -> DeployResult:
    status = obj.get("status") or {}
    url = status.get("url") or ((status.get("address") or {}).get("url")) or ""
    revision = _predictor_status(obj).get("latestReadyRevision") or _predictor_of(obj).get("name")
    return DeployResult(spec.name, spec.namespace, url, version, revision, canary, previous, changed)
