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

The ISVC is built from KServe's own typed models (``kserve.V1beta1*``) and serialized to the JSON the API
server takes; `DeploySpec` checks every value KServe's webhook or the API server would refuse, before any
request is sent.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bockd.errors import ConfigError
from bockd.platform.kube.names import (
    check_dns_1035_name,
    check_namespace,
    check_quantity,
    dns_1035_name,
    is_label_value,
)

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
# Knative's autoscaler (KPA) takes concurrency or rps (kserve v0.20.0 constants.go L290-294, enforced by
# the webhook's validateScalingKPACompExtension); Standard mode's HPA takes cpu or memory (L284-288).
_AUTOSCALE_METRICS = {KNATIVE: ("concurrency", "rps"), STANDARD: ("cpu", "memory")}
_AUTOSCALE_DEFAULTS = {KNATIVE: ("concurrency", 8), STANDARD: ("cpu", 80)}


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
    return dns_1035_name(registered_model, MAX_NAME_LENGTH, "model name")


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
    check_dns_1035_name(spec.name, MAX_NAME_LENGTH, "normalize_name() makes one")
    check_namespace(spec.namespace)
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
        if not is_label_value(value):
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


# -------------------------------------------------------------------------------------- the resource


def _kserve() -> Any:
    import kserve  # heavy, and parses sys.argv on import: only when an ISVC is built

    return kserve


def check_version(model_version: str) -> str:
    version = str(model_version)
    if not version or not is_label_value(version):
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
    return serialize(
        kserve.V1beta1CanarySpec(predictor=predictor, traffic_percent=spec.canary_traffic_percent)
    )


def build_metadata(spec: DeploySpec, model_version: str) -> Any:
    """``V1ObjectMeta`` with the deployment mode and what is served (model, version, MLflow run)."""
    from kubernetes import client

    version = check_version(model_version)
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
    return serialize(isvc)


def serialize(obj: Any) -> Any:
    from kubernetes import client

    return client.ApiClient().sanitize_for_serialization(obj)
