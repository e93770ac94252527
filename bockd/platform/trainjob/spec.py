"""The TrainJob custom resource: `TrainJobSpec` (what to run and where, validated) and its object.

Field by field, with the Trainer sources behind each rule: the package docstring (`bockd.platform.trainjob`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bockd.errors import ConfigError
from bockd.platform.credentials import MLFLOW_SECRET_KEYS, S3_SECRET_KEYS, SECRET_KEYS
from bockd.platform.kube.client import KubeApiError
from bockd.platform.kube.crd import validate_against_crd
from bockd.platform.kube.names import check_dns_1035_name, check_namespace, check_quantity, dns_1035_name

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
KIND = "TrainJob"
API_VERSION = f"{GROUP}/{VERSION}"
RUNTIME = "torch-distributed"
RUNTIME_KIND = "ClusterTrainingRuntime"
NODE_JOB = "node"  # the torch-distributed runtime's replicated job and its trainer container
PATCH_MANAGER = "bockd.io/launcher"
SHM_VOLUME = "dshm"
GPU_RESOURCE = "nvidia.com/gpu"
# What torchrun runs on every process: the train_ensemble step of the pipeline layer (a module name, so the
# launcher does not import it).
WORKER_MODULE = "bockd.pipeline.trainjob_worker"
ANNOTATION_RUN = "bockd.io/pipeline-run-id"
ANNOTATION_REQUEST = "bockd.io/request-uri"
ANNOTATION_SPEC = "bockd.io/spec-sha256"  # a found TrainJob is ours to watch only if its spec is the same
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"

# JobSet names pods "{trainjob}-node-{job}-{pod}-{suffix}" and a headless Service after the TrainJob:
# 40 characters leave room for those within Kubernetes' 63-character limits.
MAX_NAME_LENGTH = 40
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}

# torchrun variables the torch plugin sets: its webhook refuses them in spec.trainer.env (trainer v2.2.0
# pkg/constants/constants.go L178-190, L287)
TORCH_RESERVED_ENV = (
    "PET_NNODES",
    "PET_NPROC_PER_NODE",
    "PET_NODE_RANK",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
)


class TrainJobError(KubeApiError, RuntimeError):
    """A TrainJob could not be created, failed, timed out or was cancelled."""


def trainjob_name(pipeline_run_id: str, suffix: str = "ensemble") -> str:
    """A DNS-1035 label for the TrainJob of one pipeline run: ``bockd-<run id>-<suffix>``.

    Long names keep their start and gain a hash of the whole, so two run ids never share a TrainJob;
    the same run id always gives the same name (a retried step finds its TrainJob).
    """
    return dns_1035_name(f"bockd-{pipeline_run_id}-{suffix}", MAX_NAME_LENGTH, "pipeline run id")


@dataclass(frozen=True)
class TrainJobSpec:
    """What to run and where. Validated on creation; `build_trainjob` turns it into the custom resource."""

    name: str
    namespace: str
    image: str
    request_uri: str  # s3:// of the JSON request every rank reads (see TrainRequest)
    num_nodes: int = 1
    gpus_per_node: int = 1  # 0: CPU nodes, one process each (gloo)
    cpu_request: str = "8"
    memory_request: str = "32Gi"
    shm_size: str = "8Gi"
    tolerations: tuple[Mapping[str, Any], ...] = ()
    node_selector: Mapping[str, str] = field(default_factory=dict)
    s3_secret: str | None = "bockd-s3"
    mlflow_secret: str | None = "bockd-mlflow"  # optional keys: a missing one is left unset
    env: Mapping[str, str] = field(default_factory=dict)  # plain values, e.g. BOCKD_S3_ENDPOINT
    runtime: str = RUNTIME
    active_deadline_seconds: int | None = None
    pipeline_run_id: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tolerations", tuple(dict(t) for t in self.tolerations))
        object.__setattr__(self, "node_selector", dict(self.node_selector))
        object.__setattr__(self, "env", dict(self.env))
        object.__setattr__(self, "labels", dict(self.labels))
        _check_spec(self)

    @classmethod
    def for_run(
        cls, pipeline_run_id: str, namespace: str, image: str, request_uri: str, **kw: Any
    ) -> TrainJobSpec:
        return cls(
            trainjob_name(pipeline_run_id),
            namespace,
            image,
            request_uri,
            pipeline_run_id=pipeline_run_id,
            **kw,
        )

    @property
    def procs_per_node(self) -> int:
        return max(self.gpus_per_node, 1)


def _check_spec(spec: TrainJobSpec) -> None:
    check_dns_1035_name(spec.name, MAX_NAME_LENGTH, "trainjob_name() makes one")
    check_namespace(spec.namespace)
    if not spec.image or any(c.isspace() for c in spec.image):
        raise ConfigError(f"image: {spec.image!r} is not a container image reference")
    if not spec.request_uri.startswith("s3://"):
        raise ConfigError(f"request_uri: expected s3://bucket/key, got {spec.request_uri!r}")
    if not isinstance(spec.num_nodes, int) or spec.num_nodes < 1:
        raise ConfigError(f"num_nodes: expected an integer >= 1, got {spec.num_nodes!r}")
    if not isinstance(spec.gpus_per_node, int) or spec.gpus_per_node < 0:
        raise ConfigError(f"gpus_per_node: expected an integer >= 0, got {spec.gpus_per_node!r}")
    for key in ("cpu_request", "memory_request", "shm_size"):
        check_quantity(getattr(spec, key), key)
    for i, t in enumerate(spec.tolerations):
        unknown = set(t) - _TOLERATION_KEYS
        if unknown or t.get("operator", "Equal") not in ("Equal", "Exists"):
            raise ConfigError(
                f"tolerations[{i}]: {t!r}: expected keys among {sorted(_TOLERATION_KEYS)}, "
                "operator Equal or Exists"
            )
    for k, v in spec.node_selector.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ConfigError(f"node_selector: {k!r}: {v!r}: keys and values must be strings")
    bad = [k for k in spec.env if not _ENV_NAME.match(k)]
    secret_keys = SECRET_KEYS & set(spec.env)
    if bad or secret_keys:
        raise ConfigError(
            f"env: {sorted(bad) or sorted(secret_keys)}: invalid names, or credentials given as plain "
            "values (they come from the secrets)"
        )
    reserved = sorted(set(TORCH_RESERVED_ENV) & set(spec.env))
    if reserved:
        raise ConfigError(f"env: {reserved}: set by Kubeflow Trainer's torch plugin, not by the launcher")
    if spec.active_deadline_seconds is not None and spec.active_deadline_seconds < 1:
        raise ConfigError(f"active_deadline_seconds: expected >= 1, got {spec.active_deadline_seconds}")


def _secret_env(secret: str, keys: tuple[str, ...], optional: bool) -> list[dict[str, Any]]:
    return [
        {"name": k, "valueFrom": {"secretKeyRef": {"name": secret, "key": k, "optional": optional}}}
        for k in keys
    ]


def spec_digest(obj: Mapping[str, Any]) -> str:
    """SHA-256 of a TrainJob's ``spec`` (canonical JSON): what tells a retried launch from another one."""
    return hashlib.sha256(json.dumps(obj["spec"], sort_keys=True).encode()).hexdigest()


def build_trainjob(spec: TrainJobSpec, crd_path: str | Path | None = None) -> dict[str, Any]:
    """The TrainJob custom resource; checked against the CRD in ``crd_path`` when given (tests do)."""
    env: list[dict[str, Any]] = [{"name": k, "value": str(v)} for k, v in sorted(spec.env.items())]
    env.append({"name": "PYTHONUNBUFFERED", "value": "1"})
    if spec.s3_secret:
        env += _secret_env(spec.s3_secret, S3_SECRET_KEYS, optional=False)
    if spec.mlflow_secret:
        env += _secret_env(spec.mlflow_secret, MLFLOW_SECRET_KEYS, optional=True)
    resources: dict[str, Any] = {"requests": {"cpu": spec.cpu_request, "memory": spec.memory_request}}
    if spec.gpus_per_node:
        resources["limits"] = {GPU_RESOURCE: str(spec.gpus_per_node)}
    pod: dict[str, Any] = {
        "volumes": [{"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}}],
        "containers": [{"name": NODE_JOB, "volumeMounts": [{"name": SHM_VOLUME, "mountPath": "/dev/shm"}]}],
    }
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["tolerations"] = [dict(t) for t in spec.tolerations]
    patch = {
        "manager": PATCH_MANAGER,
        "trainingRuntimeSpec": {
            "template": {
                "spec": {
                    "replicatedJobs": [{"name": NODE_JOB, "template": {"spec": {"template": {"spec": pod}}}}]
                }
            }
        },
    }
    annotations = {ANNOTATION_REQUEST: spec.request_uri}
    if spec.pipeline_run_id:
        annotations[ANNOTATION_RUN] = spec.pipeline_run_id
    obj: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": spec.name,
            "namespace": spec.namespace,
            "labels": {LABEL_MANAGED_BY: "bockd", **spec.labels},
            "annotations": annotations,
        },
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": RUNTIME_KIND, "name": spec.runtime},
            "trainer": {
                "image": spec.image,
                "command": ["torchrun"],
                "args": ["--module", WORKER_MODULE, "--request", spec.request_uri],
                "numNodes": spec.num_nodes,
                "numProcPerNode": spec.procs_per_node,
                "resourcesPerNode": resources,
                "env": env,
            },
            "runtimePatches": [patch],
        },
    }
    if spec.active_deadline_seconds is not None:
        obj["spec"]["activeDeadlineSeconds"] = spec.active_deadline_seconds
    annotations[ANNOTATION_SPEC] = spec_digest(obj)
    if crd_path is not None:
        validate_against_crd(obj, crd_path)
    return obj
