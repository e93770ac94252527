"""Serve a registered student on a cluster: one KServe InferenceService per model, rolled out safely.

The ISVC runs our ClusterServingRuntime (``bockd-predictor``, model format ``bockd`` version "1"); its
storage initializer downloads ``storageUri`` (the MLflow model version's S3 folder) to ``/mnt/models``
with the credentials of the ServiceAccount ``bockd-s3``: KServe reads the Secrets that account lists and
takes the ``serving.kserve.io/s3-*`` settings from the Secret's annotations (kserve v0.20.0
``pkg/credentials/service_account_credentials.go`` L261-266, ``pkg/credentials/s3/s3_secret.go`` L106). The
account must exist in the ISVC's namespace: KServe silently downloads with no credentials when it does
not (service_account_credentials.go L217-221), so the step checks it first (`check_service_account`).
The backend (``torch`` | ``onnx``) travels as the container argument ``--backend=<b>``: KServe appends an
ISVC's ``model.args`` to the runtime's arguments (``pkg/controller/v1beta1/inferenceservice/utils/utils.go``
MergeRuntimeContainers, L250-263), and ``python -m bockd.serving`` takes ``--backend``.

Rollout of a new version onto an ISVC that serves an older one (``deploy_inference_service``):

- Knative mode (legacy name ``Serverless``): patch the new predictor with ``canaryTrafficPercent: p``;
  wait until KServe reports a new revision (``status.components.predictor.latestCreatedRevision`` other than
  before the patch) that is ready (``latestReadyRevision`` equal to it) and takes p % of the traffic; promote
  by removing ``canaryTrafficPercent``; wait until the latest ready revision takes 100 %.
- Standard mode (legacy ``RawDeployment``, KServe >= 0.20 for ``spec.canary``): add a ``spec.canary`` entry
  named ``v<version>`` with p % (the canary carries no autoscaling fields: KServe's webhook refuses them,
  "canary uses fixed replicas"); wait for its ``status.canaryStatuses`` entry to be ready (KServe: the
  canary Deployment has an available replica); promote: ``predictor.name`` = the canary's name and the entry
  removed (its Deployment becomes the predictor's). Then, and for a rollout in one step, wait until the
  predictor's Deployment reflects the stored spec and has rolled out by kubectl's rule (the ISVC's own
  status stays Ready during a rolling update). On a KServe without ``spec.canary`` (< 0.20, the API server
  refuses the unknown field) the step rolls out in one step and logs that it did.
- ``status.observedGeneration`` is never compared with the ISVC's ``metadata.generation``: KServe copies it
  from the child (Knative Service or Deployment; kserve v0.20.0 ``inference_service_status.go`` L456, L635).
- Either mode: a canary only when the storageUri changes (the same files under a new version make no new
  revision for a percentage to point at): then one step.
- Failure (``Ready``/``PredictorReady`` False with a reason that is not a transient one, a Deployment past
  its progress deadline), a request the API server or an admission webhook refuses, or a timeout: the
  previous predictor is patched back (previous storageUri, no canary), waited for, and `DeployError` says
  what failed and that the previous version keeps serving. A refused first request changed nothing and is
  not rolled back.

The version that serves fully is the label ``bockd.io/model-version``; its storage URI the annotation
``bockd.io/stable-storage-uri``: a rollout interrupted half-way (canary patched, never promoted) is rolled
back to that URI, never to the half-rolled-out one. Deploying the version that already serves is a no-op.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bockd import kube
from bockd.errors import ConfigError
from bockd.kube import CustomResourceApi, KubeApiError, check_quantity, read_json

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
# KServe puts the storageUri on the predictor's pod template (kserve v0.20.0 components/predictor.go L299;
# the storage initializer injector reads it from the pod, storage_initializer_injector.go L202).
SOURCE_URI_ANNOTATION = "internal.serving.kserve.io/storage-initializer-sourceuri"
IRSA_ANNOTATION = "eks.amazonaws.com/role-arn"  # service_account_credentials.go L51, L241

BACKENDS = ("torch", "onnx")
# Knative names revisions "{isvc}-predictor-00001" and uses them as label values (at most 63 characters);
# Standard-mode canaries add "-v<version>". 45 leaves room for both.
MAX_NAME_LENGTH = 45
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
# Knative's autoscaler (KPA) takes concurrency or rps (kserve v0.20.0 constants.go L290-294, enforced by
# the webhook's validateScalingKPACompExtension); Standard mode's HPA takes cpu or memory (L284-288).
_AUTOSCALE_METRICS = {KNATIVE: ("concurrency", "rps"), STANDARD: ("cpu", "memory")}
_AUTOSCALE_DEFAULTS = {KNATIVE: ("concurrency", 8), STANDARD: ("cpu", 80)}
# Reasons KServe/Knative/Deployments report while pods are still coming up: not failures.
TRANSIENT_REASONS = frozenset({"MinimumReplicasUnavailable", "RevisionMissing", "Deploying", "Pending"})
_FAILING_CONDITIONS = ("Ready", "PredictorReady")
_PROGRESS_DEADLINE = "ProgressDeadlineExceeded"  # a Deployment's Progressing reason when it timed out


class DeployError(KubeApiError, RuntimeError):
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
            check_quantity(getattr(self, f.name), f"resources.{f.name}")


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
    per pod) or ``rps``, Standard mode's HPA on ``cpu`` (80 % utilisation) or ``memory``; KServe's webhook
    refuses the other mode's metrics.
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
    backend: str = "onnx"  # the serving image has no PyTorch (images/serving)
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
    _check_autoscaling(spec)
    p = spec.canary_traffic_percent
    if p is not None and not 0 < p < 100:
        raise ConfigError(f"canary_traffic_percent: {p} must be in 1..99, or None to roll out in one step")
    if p is not None and not spec.knative and spec.min_replicas < 1:
        # KServe sizes a Standard-mode canary ceil(stable minReplicas * p / 100): 0 replicas never get ready
        # (kserve v0.20.0 components/predictor.go canaryReplicaCount, L886-895)
        raise ConfigError("min_replicas: a Standard-mode canary needs min_replicas >= 1 (or no canary)")
    for key, value in spec.labels.items():
        if not isinstance(value, str) or len(value) > 63 or (value and not _LABEL_VALUE.match(value)):
            raise ConfigError(f"labels.{key}: {value!r} is not a Kubernetes label value")


def _check_autoscaling(spec: DeploySpec) -> None:
    if spec.scale_metric not in _AUTOSCALE_METRICS[spec.deployment_mode]:
        allowed = ", ".join(_AUTOSCALE_METRICS[spec.deployment_mode])
        raise ConfigError(
            f"scale_metric: {spec.scale_metric!r} in {spec.deployment_mode} mode: use {allowed}"
        )
    if spec.scale_target is None or spec.scale_target < 1:
        raise ConfigError(f"scale_target: {spec.scale_target!r} must be a positive integer")
    if spec.scale_metric == "cpu" and spec.scale_target > 100:
        # a CPU utilisation percentage (inference_service_validation.go validateScalingHPACompExtension)
        raise ConfigError(f"scale_target: {spec.scale_target} % CPU utilisation must be in 1..100")


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


def build_model(spec: DeploySpec) -> Any:
    """The typed ``V1beta1ModelSpec``: our runtime and format, the storageUri, args and resources.

    No container name: KServe's webhook refuses ``model.name`` ("the 'name' field is not allowed in standard
    predictor", inference_service_validation.go validatePredictor, since v0.16.0) and merges the model
    into the runtime's ``kserve-container`` by that constant (inferenceservice/utils/utils.go
    MergeServingRuntimeAndInferenceServiceSpecs).
    """
    kserve = _kserve()
    from kubernetes import client

    r = spec.resources
    return kserve.V1beta1ModelSpec(
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


def build_predictor(
    spec: DeploySpec, name: str | None = None, canary_traffic_percent: int | None = None
) -> Any:
    """The typed ``V1beta1PredictorSpec``: the model, the S3 ServiceAccount and autoscaling."""
    kserve = _kserve()
    return kserve.V1beta1PredictorSpec(
        name=name,
        model=build_model(spec),
        service_account_name=spec.service_account,
        min_replicas=spec.min_replicas,
        max_replicas=spec.max_replicas,
        scale_metric=spec.scale_metric,
        scale_target=spec.scale_target,
        scale_metric_type=None if spec.knative else "Utilization",
        canary_traffic_percent=canary_traffic_percent,
    )


def build_canary(spec: DeploySpec, name: str) -> dict[str, Any]:
    """A Standard-mode ``spec.canary`` entry: name, model and account only.

    KServe's webhook refuses maxReplicas, scaleTarget, scaleMetric and autoScaling on a canary and a
    minReplicas above the stable one's (kserve v0.20.0 inference_service_validation.go validateCanarySpecs,
    L235-258); the controller sizes the canary from the stable minReplicas and the percentage and merges
    the entry over the stable predictor (components/predictor.go canaryReplicaCount, buildCanaryPredictor,
    L886-911).
    """
    kserve = _kserve()
    predictor = kserve.V1beta1PredictorSpec(
        name=name, model=build_model(spec), service_account_name=spec.service_account
    )
    return _serialize(
        kserve.V1beta1CanarySpec(predictor=predictor, traffic_percent=spec.canary_traffic_percent)
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


# ---------------------------------------------------------------------------------------------- the API


class KubeApi(CustomResourceApi):
    """The calls a deployment needs: InferenceServices, and reading Deployments and ServiceAccounts."""

    group, version, plural, kind, error = GROUP, VERSION, PLURAL, KIND, DeployError

    def deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes import client

        read = client.AppsV1Api(self.api_client).read_namespaced_deployment
        return read_json(read, name, namespace, error=DeployError, what=f"Deployment {namespace}/{name}")

    def service_account(self, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes import client

        read = client.CoreV1Api(self.api_client).read_namespaced_service_account
        return read_json(read, name, namespace, error=DeployError, what=f"ServiceAccount {namespace}/{name}")


def load_kube_config() -> Any:
    """The client configuration: in-cluster (the pod's ServiceAccount) first, then ``~/.kube/config``."""
    return kube.load_kube_config(DeployError)


def check_service_account(api: KubeApi, spec: DeploySpec) -> None:
    """The ServiceAccount the storage initializer downloads with exists in the ISVC's namespace and names
    a Secret (or an IRSA role); `DeployError` with the remedy otherwise, before anything is changed.

    KServe looks the account up in the ISVC's namespace and, when there is none, downloads with no
    credentials at all (service_account_credentials.go L217-221). Without RBAC to read ServiceAccounts
    the check is skipped with a warning.
    """
    ns, name = spec.namespace, spec.service_account or "default"  # KServe's default too (L214-216)
    try:
        account = api.service_account(ns, name)
    except DeployError as e:
        if e.status != 403:
            raise
        LOG.warning("cannot read ServiceAccount %s/%s (RBAC: %s); not checked", ns, name, e.api_message)
        return
    remedy = (
        f"create the Secret bockd-s3 and the account in namespace {ns} (manifests/overlays/profile; "
        f"docs/operations.md, 'A namespace that serves')"
    )
    if account is None:
        raise DeployError(
            f"ServiceAccount {ns}/{name} does not exist: KServe would download {spec.storage_uri} with no "
            f"credentials; {remedy}"
        )
    annotations = (account.get("metadata") or {}).get("annotations") or {}
    if not account.get("secrets") and IRSA_ANNOTATION not in annotations:
        raise DeployError(
            f"ServiceAccount {ns}/{name} lists no Secret (and no {IRSA_ANNOTATION}): KServe would download "
            f"{spec.storage_uri} with no credentials; {remedy}"
        )


# ---------------------------------------------------------------------------------------------- status


@dataclass(frozen=True)
class Failure:
    condition: str
    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.condition}=False, reason {self.reason}" + (f": {self.message}" if self.message else "")


@dataclass(frozen=True)
class Refusal(Failure):
    """A request the API server or an admission webhook refused (an HTTP 4xx Status): nothing changed."""

    def __str__(self) -> str:
        return f"the request was refused ({self.reason}): {self.message}"


class _RolloutFailed(Exception):
    def __init__(self, failure: Failure | None, summary: str) -> None:
        super().__init__(str(failure) if failure else f"timed out, last status: {summary}")
        self.failure = failure


Verdict = bool | Failure  # True: done; False: not yet; a Failure: failed
Judge = Callable[[dict[str, Any]], Verdict]


def _status(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("status") or {}


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    for c in _status(obj).get("conditions") or []:
        if c.get("type") == kind:
            return c
    return {}


def _is_true(obj: dict[str, Any], kind: str) -> bool:
    return _condition(obj, kind).get("status") == "True"


def _predictor_status(obj: dict[str, Any]) -> dict[str, Any]:
    return (_status(obj).get("components") or {}).get("predictor") or {}


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


def summarize(obj: dict[str, Any]) -> str:
    """One line of the status that matters while waiting (logged when it changes)."""
    parts = []
    for kind in ("Ready", "PredictorReady"):
        c = _condition(obj, kind)
        reason = f" ({c['reason']})" if c.get("reason") else ""
        parts.append(f"{kind}={c.get('status', 'Unknown')}{reason}")
    p = _predictor_status(obj)
    if p.get("latestCreatedRevision"):
        parts.append(f"revision {p.get('latestReadyRevision', '-')}/{p['latestCreatedRevision']}")
    if _latest_traffic(obj) is not None:
        parts.append(f"latest {_latest_traffic(obj)}%")
    for c in _status(obj).get("canaryStatuses") or []:
        parts.append(f"canary {c.get('name')} {c.get('trafficPercent')}% ready={c.get('ready')}")
    return ", ".join(parts)


# -- Knative mode: revisions and traffic (kserve v0.20.0 inference_service_status.go PropagateStatus L567-636)


def _template(obj: dict[str, Any] | None) -> dict[str, Any]:
    """The predictor as it shapes the pod template: everything but the traffic split."""
    predictor = dict(_predictor_of(obj or {}))
    predictor.pop("canaryTrafficPercent", None)
    return predictor


def knative_judge(before: dict[str, Any] | None, after: dict[str, Any], percent: int) -> Judge:
    """Done when the revision of this change is ready and takes ``percent`` % of the traffic.

    ``before``/``after``: the ISVC as stored before and after the request. A change of the predictor (other
    than its traffic split) makes Knative create a revision, so until ``latestCreatedRevision`` moves on
    from ``before``'s the status describes the previous spec and is neither success nor failure.
    """
    old = _predictor_status(before or {}).get("latestCreatedRevision")
    needs_new = before is None or _template(before) != _template(after)

    def judge(obj: dict[str, Any]) -> Verdict:
        p = _predictor_status(obj)
        created = p.get("latestCreatedRevision")
        if not created or (needs_new and created == old):
            return False
        failure = failure_of(obj)
        if failure is not None:
            return failure
        return (
            _is_true(obj, "Ready")
            and p.get("latestReadyRevision") == created
            and _latest_traffic(obj) == percent
        )

    return judge


# -- Standard mode: Deployments (kubectl's rollout rule) and canary statuses


def deployment_name(obj: dict[str, Any]) -> str:
    """``{isvc}-predictor``, or ``{isvc}-{predictor.name}-predictor`` (kserve v0.20.0 constants.go
    PredictorServiceName, L799-804)."""
    name, predictor = obj["metadata"]["name"], _predictor_of(obj).get("name")
    return f"{name}-{predictor}-predictor" if predictor else f"{name}-predictor"


def rollout_status(deployment: dict[str, Any]) -> Verdict:
    """kubectl rollout status (kubernetes/kubectl v0.36.3 pkg/polymorphichelpers/rollout_status.go L75-89):
    the spec observed, not past its progress deadline, every replica updated and available, no old ones."""
    meta, spec, status = deployment["metadata"], deployment.get("spec") or {}, deployment.get("status") or {}
    if meta.get("generation", 0) > status.get("observedGeneration", 0):
        return False
    for c in status.get("conditions") or []:
        if c.get("type") == "Progressing" and c.get("reason") == _PROGRESS_DEADLINE:
            return Failure(
                "Progressing", _PROGRESS_DEADLINE, f"Deployment {meta['name']}: {c.get('message')}"
            )
    updated = status.get("updatedReplicas", 0)
    if spec.get("replicas") is not None and updated < spec["replicas"]:
        return False
    return status.get("replicas", 0) <= updated and status.get("availableReplicas", 0) >= updated


def _reflects(deployment: dict[str, Any], obj: dict[str, Any]) -> bool:
    """Whether KServe has written the stored ISVC into the Deployment's pod template: the storageUri
    annotation and the ISVC's labels go there (kserve v0.20.0 components/predictor.go buildObjectMeta
    L498-519, deployment_reconciler.go createRawDefaultDeployment L145-158)."""
    template = ((deployment.get("spec") or {}).get("template") or {}).get("metadata") or {}
    uri = _predictor_of(obj).get("model", {}).get("storageUri")
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return (template.get("annotations") or {}).get(SOURCE_URI_ANNOTATION) == uri and all(
        (template.get("labels") or {}).get(k) == v for k, v in labels.items()
    )


def standard_judge(api: KubeApi, namespace: str) -> Judge:
    """Done when the predictor's Deployment reflects the stored ISVC and has rolled out, no canary is left
    and the ISVC is Ready. The ISVC alone cannot say so: it stays Ready while the Deployment is Available,
    i.e. during a whole rolling update (inference_service_status.go PropagateRawStatus L360-458). Its
    conditions are believed once its status is computed from the current Deployment (the ISVC's
    observedGeneration is the Deployment's, L456)."""

    def judge(obj: dict[str, Any]) -> Verdict:
        if _status(obj).get("canaryStatuses"):
            return False
        deployment = api.deployment(namespace, deployment_name(obj))
        if deployment is None or not _reflects(deployment, obj):
            return False
        rolled_out = rollout_status(deployment)
        if not rolled_out or isinstance(rolled_out, Failure):
            return rolled_out
        if _status(obj).get("observedGeneration") != deployment["metadata"].get("generation"):
            return False
        return failure_of(obj) or _is_true(obj, "Ready")

    return judge


def canary_judge(canary: str) -> Judge:
    """Done when the canary's status entry is ready (KServe: its Deployment has an available replica,
    components/predictor.go reconcileCanaryDeployments L959-981). KServe reports no failure of a canary:
    a canary that never gets ready times out."""

    def judge(obj: dict[str, Any]) -> Verdict:
        statuses = _status(obj).get("canaryStatuses") or []
        return any(c.get("name") == canary and c.get("ready") for c in statuses)

    return judge


def _judge_for(
    api: KubeApi, spec: DeploySpec, before: dict[str, Any] | None, after: dict[str, Any], percent: int = 100
) -> Judge:
    return knative_judge(before, after, percent) if spec.knative else standard_judge(api, spec.namespace)


def _wait(
    api: KubeApi, spec: DeploySpec, judge: Judge, what: str, timeout_s: float, poll_s: float
) -> dict[str, Any]:
    """Poll until ``judge`` says done; `_RolloutFailed` on a failure it reports or on timeout."""
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
        verdict = judge(obj)
        if isinstance(verdict, Failure):
            raise _RolloutFailed(verdict, summary)
        if verdict:
            return obj
        if time.monotonic() >= deadline:
            raise _RolloutFailed(None, summary)
        time.sleep(poll_s)


def _patch(
    api: KubeApi, spec: DeploySpec, patch: dict[str, Any]
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(the ISVC before, as stored after) a merge patch; a refused patch raises `_RolloutFailed`."""
    before = api.get(spec.namespace, spec.name)
    try:
        return before, api.patch(spec.namespace, spec.name, patch)
    except DeployError as e:
        if not e.refused:
            raise
        raise _RolloutFailed(Refusal("request", f"HTTP {e.status}", e.api_message), "") from e


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
    check_service_account(api, spec)
    existing = api.get(spec.namespace, spec.name)
    if existing is None:
        return _create(api, spec, version, timeout_s, poll_s)
    _check_mode(existing, spec)
    previous = served_version(existing)
    current_uri = _predictor_of(existing).get("model", {}).get("storageUri")
    if previous == version and current_uri == spec.storage_uri and not _rollout_pending(existing):
        LOG.info("%s/%s already serves version %s: nothing to do", spec.namespace, spec.name, version)
        judge = _judge_for(api, spec, existing, existing)
        obj = _wait_or_raise(api, spec, judge, "ready", timeout_s, poll_s, version)
        return _result(obj, spec, version, canary=False, previous=previous, changed=False)
    try:
        obj, canary = _roll_out(
            api, spec, version, timeout_s, poll_s, same_files=current_uri == spec.storage_uri
        )
    except _RolloutFailed as e:
        if isinstance(e.failure, Refusal) and _unchanged(api, spec, existing):
            raise _refused(spec, version, previous, existing, e.failure) from e
        raise _roll_back(api, spec, existing, timeout_s, poll_s, version, e) from e
    return _result(obj, spec, version, canary=canary, previous=previous, changed=True)


def _unchanged(api: KubeApi, spec: DeploySpec, existing: dict[str, Any]) -> bool:
    """Whether the ISVC still has the spec and metadata it had before this rollout started."""
    now = api.get(spec.namespace, spec.name) or {}
    return now.get("spec") == existing.get("spec") and (now.get("metadata") or {}).get("labels") == (
        existing.get("metadata") or {}
    ).get("labels")


def _refused(
    spec: DeploySpec, version: str, previous: str | None, existing: dict[str, Any], refusal: Refusal
) -> DeployError:
    return DeployError(
        f"InferenceService {spec.namespace}/{spec.name}: version {version} ({spec.storage_uri}) failed: "
        f"{refusal}; nothing was changed, the previous version {previous or '(unlabelled)'} "
        f"({_stable_storage_uri(existing)}) keeps serving"
    )


def _create(api: KubeApi, spec: DeploySpec, version: str, timeout_s: float, poll_s: float) -> DeployResult:
    body = build_inference_service(spec, version)
    LOG.info(
        "creating InferenceService %s/%s (version %s, %s)",
        spec.namespace,
        spec.name,
        version,
        spec.storage_uri,
    )
    stored = api.create(spec.namespace, body)
    obj = _wait_or_raise(api, spec, _judge_for(api, spec, None, stored), "create", timeout_s, poll_s, version)
    return _result(obj, spec, version, canary=False, previous=None, changed=True)


def _wait_or_raise(
    api: KubeApi, spec: DeploySpec, judge: Judge, what: str, timeout_s: float, poll_s: float, version: str
) -> dict[str, Any]:
    """Wait where there is no previous version to roll back to: a failure is the caller's error."""
    try:
        return _wait(api, spec, judge, what, timeout_s, poll_s)
    except _RolloutFailed as e:
        raise DeployError(
            f"InferenceService {spec.namespace}/{spec.name} (version {version}, {spec.storage_uri}) "
            f"did not become ready: {e}"
        ) from e


def _check_mode(existing: dict[str, Any], spec: DeploySpec) -> None:
    annotations = (existing.get("metadata") or {}).get("annotations") or {}
    mode = annotations.get(DEPLOYMENT_MODE_ANNOTATION) or _status(existing).get("deploymentMode")
    if mode and normalize_mode(mode) != spec.deployment_mode:
        # KServe's webhook refuses a change of mode (validateDeploymentMode); delete the ISVC to switch
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
    return _roll_out_standard_canary(api, spec, version, timeout_s, poll_s)


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
    before, after = _patch(api, spec, patch)
    return _wait(api, spec, _judge_for(api, spec, before, after), "rollout", timeout_s, poll_s)


def _roll_out_knative_canary(
    api: KubeApi, spec: DeploySpec, version: str, timeout_s: float, poll_s: float
) -> dict[str, Any]:
    """New revision at p % (``canaryTrafficPercent``), then promoted by removing the percentage."""
    ns, name, p = spec.namespace, spec.name, spec.canary_traffic_percent
    assert p is not None
    LOG.info("%s/%s: canary of version %s with %d%% of the traffic", ns, name, version, p)
    predictor = _serialize(build_predictor(spec, canary_traffic_percent=p))
    before, after = _patch(api, spec, {"spec": {"predictor": predictor}})
    _wait(api, spec, knative_judge(before, after, p), "canary", timeout_s, poll_s)
    LOG.info("%s/%s: promoting version %s to 100%%", ns, name, version)
    promote = {
        "metadata": _metadata_patch(spec, version),
        "spec": {"predictor": {"canaryTrafficPercent": None}},
    }
    before, after = _patch(api, spec, promote)
    return _wait(api, spec, knative_judge(before, after, 100), "promotion", timeout_s, poll_s)


def _canary_name(existing: dict[str, Any], version: str) -> str:
    """``v<version>``, unless the stable predictor already bears that name (the webhook refuses a canary
    named like it, validateCanarySpecs L212-214)."""
    name = canary_name(version)
    return f"{name}-r" if _predictor_of(existing).get("name") == name else name


def _roll_out_standard_canary(
    api: KubeApi, spec: DeploySpec, version: str, timeout_s: float, poll_s: float
) -> tuple[dict[str, Any], bool]:
    """A ``spec.canary`` entry at p %, then promoted: the predictor takes its name, the entry goes.

    The deployment-mode annotation travels with the canary: the webhook admits a canary only when it says
    exactly ``Standard`` (validateCanarySpecs L188-191), not the legacy ``RawDeployment``. A KServe without
    ``spec.canary`` (< 0.20: the API server refuses the unknown field) gets a rollout in one step.
    """
    ns, name = spec.namespace, spec.name
    canary = _canary_name(api.get(ns, name) or {}, version)
    LOG.info(
        "%s/%s: canary %s (version %s) with %d%% of the traffic", ns, name, canary, version,
        spec.canary_traffic_percent,
    )  # fmt: skip
    patch = {
        "metadata": {"annotations": {DEPLOYMENT_MODE_ANNOTATION: STANDARD}},
        "spec": {"canary": [build_canary(spec, canary)]},
    }
    try:
        _patch(api, spec, patch)
    except _RolloutFailed as e:
        if not _lacks_canary_field(e.failure):
            raise
        LOG.warning(
            "%s/%s: this KServe has no spec.canary (KServe < 0.20; the API server refused the field): "
            "rolling out version %s in one step (a rolling update of the Deployment, no canary)",
            ns, name, version,
        )  # fmt: skip
        return _roll_out_one_step(api, spec, version, timeout_s, poll_s), False
    _wait(api, spec, canary_judge(canary), "canary", timeout_s, poll_s)
    LOG.info("%s/%s: promoting canary %s (version %s)", ns, name, canary, version)
    predictor = _serialize(build_predictor(spec, name=canary))
    predictor["canaryTrafficPercent"] = None
    promote = {"metadata": _metadata_patch(spec, version), "spec": {"predictor": predictor, "canary": None}}
    before, after = _patch(api, spec, promote)
    return _wait(api, spec, _judge_for(api, spec, before, after), "promotion", timeout_s, poll_s), True


def _lacks_canary_field(failure: Failure | None) -> bool:
    """A strict-validation refusal of ``spec.canary``: HTTP 400 ``strict decoding error: unknown field
    "spec.canary"`` (the installed CRD predates KServe 0.20)."""
    return (
        isinstance(failure, Refusal)
        and failure.reason == "HTTP 400"
        and 'unknown field "spec.canary' in failure.message
    )


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
    if cause.failure is None and not spec.knative:
        what += "; a Standard-mode canary that never reports a status: is KServe older than 0.20?"
    LOG.warning(
        "%s/%s: version %s failed (%s); rolling back to version %s", ns, name, version, what, previous
    )
    try:
        before, after = _patch(api, spec, rollback_patch(existing, spec.knative))
        _wait(api, spec, _judge_for(api, spec, before, after), "rollback", timeout_s, poll_s)
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
    status = _status(obj)
    url = status.get("url") or ((status.get("address") or {}).get("url")) or ""
    revision = _predictor_status(obj).get("latestReadyRevision") or _predictor_of(obj).get("name")
    return DeployResult(spec.name, spec.namespace, url, version, revision, canary, previous, changed)
