"""Multi-node, multi-GPU training of the ensemble: a Kubeflow Trainer TrainJob (trainer.kubeflow.org).

The launcher (the ``train_distributed`` KFP component, or :func:`train_distributed` here) stages the
prepared dataset and a JSON request in S3, creates one TrainJob on the ``torch-distributed``
ClusterTrainingRuntime, waits for it, and fetches the Model folder rank 0 uploaded. What it writes:

- ``spec.runtimeRef``: ``{name: torch-distributed, kind: ClusterTrainingRuntime}``.
- ``spec.trainer``: ``image``, ``command: [torchrun]``, ``args: [--module, bockd.trainjob, --request,
  s3://.../request.json]``, ``numNodes``, ``numProcPerNode`` (= GPUs per node; 1 on CPU),
  ``resourcesPerNode`` (cpu/memory requests, ``nvidia.com/gpu`` limit) and ``env``: plain values plus the
  S3 (and optional MLflow) credentials as ``valueFrom.secretKeyRef`` (secret names, never values). The
  Trainer's torch plugin sets ``PET_NNODES``/``PET_NPROC_PER_NODE``/``PET_NODE_RANK``/``PET_MASTER_ADDR``/
  ``PET_MASTER_PORT``, which torchrun reads as its defaults; torchrun then sets ``WORLD_SIZE``/``RANK``/
  ``LOCAL_RANK``/``MASTER_ADDR`` for each process.
- ``spec.runtimePatches`` (this CRD has no ``podSpecOverrides``/``podTemplateOverrides``): one patch,
  manager ``bockd.io/launcher``, on replicated job ``node`` (the torch-distributed runtime's only job, its
  container also named ``node``): ``nodeSelector``, ``tolerations``, a memory-backed ``emptyDir`` volume
  mounted at ``/dev/shm`` (the default 64 MiB starves DataLoader workers and NCCL). Trainer's webhook admits
  a patch only on jobs and containers the runtime has and without env on the ``node`` container, and a
  domain-prefixed manager (kubeflow/trainer v2.2.0 ``pkg/runtime/framework/plugins/jobset/jobset.go``
  Validate, L127-161); the ``PET_*`` variables are the torch plugin's (``plugins/torch/torch.go`` L56-80),
  so ``env`` may not set them.

``runtimePatches`` and ``activeDeadlineSeconds`` exist from Kubeflow Trainer 2.2 (absent from the v2.1.0
TrainJob CRD): on an older Trainer the API server refuses the unknown fields (bockd asks for strict field
validation) and `TrainJobError` says which version is needed.

Conditions (the Trainer controller's, kubeflow/trainer v2.2.0 ``pkg/apis/trainer/v1alpha1/trainjob_types.go``
L56-65): ``Suspended``, ``Complete``, ``Failed`` (``Complete``/``Failed`` copied from the JobSet's,
``jobset.go`` Status L328-347; ``Failed`` with reason ``DeadlineExceeded`` past ``activeDeadlineSeconds``,
``pkg/controller/trainjob_controller.go`` reconcileDeadline L171-201). A TrainJob held ``Suspended`` (e.g. by
Kueue, waiting for quota) is waited for like a running one.
:func:`run_trainjob` logs each change once, returns on ``Complete``, and deletes the TrainJob on
``Failed`` (raising `TrainJobError` with reason and message), on timeout, and on cancellation
(KeyboardInterrupt, or SIGTERM, which KFP sends the launcher pod when the run is cancelled: re-raised).
A retried launcher finds the TrainJob of its first attempt by name and watches it (one that already
failed is deleted and created anew; one with another spec, found through the ``bockd.io/spec-sha256``
annotation, is refused: Trainer's webhook stamps ``runtimePatches[].time`` on create, ``pkg/webhooks/
trainjob_webhook.go`` L60-68, so the stored spec is never compared with the built one).
``spec.activeDeadlineSeconds`` (the launcher's timeout) stops the TrainJob even when the launcher pod is
gone. After a success the launcher fetches the Model folder, then
deletes the TrainJob and the run's staging objects.

Worker side (``torchrun --module bockd.trainjob --request <uri>`` on every process): each rank downloads
the dataset and trains; rank 0 (``RANK`` unset counts as 0) also logs to MLflow, uploads checkpoints,
exports the students and uploads the Model folder and ``result.json`` (written last: the completion mark).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bockd.distributed import env_rank
from bockd.errors import BockdError, ConfigError
from bockd.kube import CustomResourceApi, KubeApiError, check_quantity, pod_namespace
from bockd.storage import get_json, put_json

LOG = logging.getLogger("bockd.trainjob")

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
# Keys of the secrets (pipeline/settings.py S3_SECRET_KEYS / MLFLOW_SECRET_KEYS); the pods see them under
# the same names.
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
# Plain variables the launcher passes on from its own environment when set.
FORWARDED_ENV = ("MLFLOW_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION")
ANNOTATION_RUN = "bockd.io/pipeline-run-id"
ANNOTATION_REQUEST = "bockd.io/request-uri"
ANNOTATION_SPEC = "bockd.io/spec-sha256"  # a found TrainJob is ours to watch only if its spec is the same
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"

REQUEST_FILE = "request.json"
RESULT_FILE = "result.json"
MODEL_PREFIX = "model"
DATASET_PREFIX = "dataset"

# JobSet names pods "{trainjob}-node-{job}-{pod}-{suffix}" and a headless Service after the TrainJob:
# 40 characters leave room for those within Kubernetes' 63-character limits.
MAX_NAME_LENGTH = 40
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}

SUSPENDED, COMPLETE, FAILED = "Suspended", "Complete", "Failed"
# torchrun variables the torch plugin sets: its webhook refuses them in spec.trainer.env (trainer v2.2.0
# pkg/constants/constants.go L178-190, L287)
TORCH_RESERVED_ENV = (
    "PET_NNODES",
    "PET_NPROC_PER_NODE",
    "PET_NODE_RANK",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
)
TRAINER_FLOOR = "2.2"  # runtimePatches and activeDeadlineSeconds


class TrainJobError(KubeApiError, RuntimeError):
    """A TrainJob could not be created, failed, timed out or was cancelled."""


# ---------------------------------------------------------------------------------------------- the spec


def trainjob_name(pipeline_run_id: str, suffix: str = "ensemble") -> str:
    """A DNS-1035 label for the TrainJob of one pipeline run: ``bockd-<run id>-<suffix>``.

    Long names keep their start and gain a hash of the whole, so two run ids never share a TrainJob;
    the same run id always gives the same name (a retried step finds its TrainJob).
    """
    raw = f"bockd-{pipeline_run_id}-{suffix}"
    name = re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-")
    if len(name) > MAX_NAME_LENGTH:
        digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
        name = f"{name[: MAX_NAME_LENGTH - 9].rstrip('-')}-{digest}"
    return name


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
    if len(spec.name) > MAX_NAME_LENGTH or not _DNS_1035.match(spec.name):
        raise ConfigError(
            f"name: {spec.name!r} is not a DNS-1035 label of at most {MAX_NAME_LENGTH} characters; "
            "trainjob_name() makes one"
        )
    if len(spec.namespace) > 63 or not _NAMESPACE.match(spec.namespace):
        raise ConfigError(f"namespace: {spec.namespace!r} is not a Kubernetes namespace name")
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
    secret_keys = {*S3_SECRET_KEYS, *MLFLOW_SECRET_KEYS} & set(spec.env)
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
                "args": ["--module", "bockd.trainjob", "--request", spec.request_uri],
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
        from bockd.serving.crd import validate_against_crd

        validate_against_crd(obj, crd_path)
    return obj


# ------------------------------------------------------------------------------------------ the API calls


class TrainJobApi(CustomResourceApi):
    """Get, create and delete TrainJobs."""

    group, version, plural, kind, error = GROUP, VERSION, PLURAL, KIND, TrainJobError

    def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """The created object, or None when one of that name exists already (HTTP 409)."""
        try:
            return super().create(namespace, body)
        except TrainJobError as e:
            if e.status == 409:
                return None
            if e.status == 400 and "unknown field" in e.api_message:
                raise TrainJobError(
                    f"{e} (the installed TrainJob CRD lacks a field bockd writes: runtimePatches and "
                    f"activeDeadlineSeconds need Kubeflow Trainer >= {TRAINER_FLOOR})",
                    status=e.status,
                    api_message=e.api_message,
                ) from e
            raise


# ---------------------------------------------------------------------------------------------- waiting


@dataclass(frozen=True)
class TrainJobResult:
    name: str
    namespace: str
    created: bool  # False: an existing TrainJob (a retried step's first attempt) was watched
    reason: str
    message: str
    status: dict[str, Any]


def condition(obj: Mapping[str, Any] | None, kind: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return c
    return {}


def _is_true(obj: Mapping[str, Any] | None, kind: str) -> bool:
    return condition(obj, kind).get("status") == "True"


def describe(obj: Mapping[str, Any] | None) -> str:
    """One line per state: the conditions (type=status reason) and the child jobs' counts."""
    status = (obj or {}).get("status") or {}
    parts = [
        f"{c.get('type')}={c.get('status')}" + (f" ({c['reason']})" if c.get("reason") else "")
        for c in status.get("conditions") or []
    ]
    for j in status.get("jobsStatus") or []:
        counts = ", ".join(
            f"{k} {j.get(k, 0)}" for k in ("active", "ready", "succeeded", "failed", "suspended")
        )
        parts.append(f"jobs {j.get('name')}: {counts}")
    return "; ".join(parts) or "no status yet"


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM (KFP cancelling the run kills the launcher pod) raises KeyboardInterrupt while waiting."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _delete_and_wait(api: TrainJobApi, spec: TrainJobSpec, deadline: float, poll_s: float) -> None:
    api.delete(spec.namespace, spec.name)
    while api.get(spec.namespace, spec.name) is not None:
        if time.monotonic() > deadline:
            raise TrainJobError(f"TrainJob {spec.namespace}/{spec.name} was not deleted in time")
        time.sleep(poll_s)


def run_trainjob(
    api: TrainJobApi,
    spec: TrainJobSpec,
    timeout_s: float = 24 * 3600,
    poll_s: float = 30,
    *,
    on_poll: Callable[[dict[str, Any]], None] | None = None,
    crd_path: str | Path | None = None,
) -> TrainJobResult:
    """Create (or find) the TrainJob, wait for ``Complete``; delete it on failure, timeout or cancellation.

    ``on_poll`` is called with each object read while waiting (tests raise KeyboardInterrupt from it).
    """
    body = build_trainjob(spec, crd_path)
    where = f"TrainJob {spec.namespace}/{spec.name}"
    deadline = time.monotonic() + timeout_s
    with _sigterm_raises():
        try:
            obj = api.get(spec.namespace, spec.name)
            created = False
            if obj is not None and _is_true(obj, FAILED):
                LOG.warning("%s failed before (%s); deleting it and starting again", where, describe(obj))
                _delete_and_wait(api, spec, deadline, poll_s)
                obj = None
            elif obj is not None:
                _check_same_spec(obj, body, where)
            if obj is None:
                obj = api.create(spec.namespace, body)
                created = obj is not None
                if created:
                    LOG.info(
                        "%s created: %d node(s) x %d process(es)", where, spec.num_nodes, spec.procs_per_node
                    )
                elif (raced := api.get(spec.namespace, spec.name)) is not None:  # made since our GET
                    _check_same_spec(raced, body, where)
            if not created:
                LOG.info("%s exists already (a retried step): watching it", where)
            return _wait(api, spec, created, deadline, timeout_s, poll_s, on_poll)
        except KeyboardInterrupt:
            LOG.warning("%s: cancelled; deleting it", where)
            api.delete(spec.namespace, spec.name)
            raise


def _check_same_spec(found: Mapping[str, Any], body: Mapping[str, Any], where: str) -> None:
    """A TrainJob of this name that another launch made (another config under the same run id) is not ours
    to watch: its result would pass for this run's."""
    theirs = ((found.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_SPEC)
    if theirs != body["metadata"]["annotations"][ANNOTATION_SPEC]:
        raise TrainJobError(
            f"{where} exists with another spec ({ANNOTATION_SPEC} {theirs or 'missing'}): another launch "
            "under the same pipeline run id? Wait for it or delete it "
            f"(kubectl -n {body['metadata']['namespace']} delete trainjob {body['metadata']['name']}), "
            "or use another run id"
        )


def _wait(
    api: TrainJobApi,
    spec: TrainJobSpec,
    created: bool,
    deadline: float,
    timeout_s: float,
    poll_s: float,
    on_poll: Callable[[dict[str, Any]], None] | None,
) -> TrainJobResult:
    where = f"TrainJob {spec.namespace}/{spec.name}"
    last = None
    while True:
        obj = api.get(spec.namespace, spec.name)
        if obj is None:
            raise TrainJobError(f"{where} disappeared while waiting for it (deleted by someone else?)")
        state = describe(obj)
        if state != last:
            LOG.info("%s: %s", where, state)
            last = state
        if _is_true(obj, COMPLETE):
            c = condition(obj, COMPLETE)
            return TrainJobResult(
                spec.name,
                spec.namespace,
                created,
                c.get("reason", ""),
                c.get("message", ""),
                obj.get("status") or {},
            )
        if _is_true(obj, FAILED):
            c = condition(obj, FAILED)
            api.delete(spec.namespace, spec.name)
            raise TrainJobError(
                f"{where} failed: reason {c.get('reason') or '?'}: {c.get('message') or 'no message'} "
                "(deleted; its pods' logs are gone with it, the MLflow run keeps the metrics so far)"
            )
        if on_poll is not None:
            on_poll(obj)
        if time.monotonic() >= deadline:
            api.delete(spec.namespace, spec.name)
            raise TrainJobError(
                f"{where} did not complete within {timeout_s:g} s (deleted); last status: {state}"
            )
        time.sleep(poll_s)


# --------------------------------------------------------------------------------------- the request


@dataclass(frozen=True)
class TrainRequest:
    """What every rank reads: the training config and where the data, outputs and trackers are."""

    train_config: dict[str, Any]
    data_uri: str  # s3:// prefix of the prepared Dataset folder
    output_uri: str  # s3:// prefix: rank 0 writes model/ and result.json there
    tracking_uri: str = ""
    experiment: str = "bockd"
    pipeline_run_id: str = ""
    checkpoint_uri: str = ""
    tags: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TrainRequest:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ConfigError(f"train request: unknown keys {unknown}; expected {sorted(names)}")
        return cls(**raw)


# ------------------------------------------------------------------------------------------ the worker


def run_worker(request: TrainRequest) -> dict[str, Any] | None:
    """Train this process's share; rank 0 also exports and uploads. Returns rank 0's result."""
    from bockd import steps
    from bockd.storage import download_prefix, upload_folder

    me = env_rank()
    with tempfile.TemporaryDirectory(prefix="bockd-worker-") as tmp:
        data_dir = download_prefix(request.data_uri, Path(tmp) / "data")
        if me != 0:
            _train_replica(request, data_dir, Path(tmp) / "work")
            return None
        out = Path(tmp) / "model"
        result = steps.train_ensemble(
            request.train_config,
            data_dir,
            out,
            tracking_uri=request.tracking_uri,
            experiment=request.experiment,
            pipeline_run_id=request.pipeline_run_id,
            checkpoint_uri=request.checkpoint_uri,
            tags=request.tags,
        )
        prefix = request.output_uri.rstrip("/")
        upload_folder(out, f"{prefix}/{MODEL_PREFIX}")
        put_json(f"{prefix}/{RESULT_FILE}", result)  # last: its presence says the model folder is whole
        LOG.info("rank 0: uploaded the model folder and %s to %s", RESULT_FILE, prefix)
        return result


def _train_replica(request: TrainRequest, data_dir: Path, workdir: Path) -> None:
    """A rank other than 0: the same training call, no tracking, no outputs.

    The engine (under torchrun) has rank 0 read the checkpoint rank 0 restored from S3 and broadcast it,
    syncs gradients, and writes only from rank 0: this rank's workdir stays empty.
    """
    from bockd import steps
    from bockd.engine import train

    config = steps.train_config(request.train_config, mode="ensemble")
    dataset = steps.load_prepared(data_dir, config)
    workdir.mkdir(parents=True, exist_ok=True)
    train(config, workdir, [], dataset=dataset)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bockd.trainjob", description=__doc__.split("\n")[0])
    parser.add_argument("--request", required=True, help="s3:// URI of the JSON train request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{env_rank()} %(name)s %(message)s")
    run_worker(TrainRequest.from_dict(get_json(args.request)))
    return 0


# ------------------------------------------------------------------------------------------ the launcher


def staging_prefix(staging_uri: str, pipeline_run_id: str) -> str:
    if not staging_uri.startswith("s3://"):
        raise ConfigError(f"staging_uri: expected an s3:// prefix, got {staging_uri!r}")
    return f"{staging_uri.rstrip('/')}/{pipeline_run_id or 'local'}/ensemble"


def train_distributed(
    raw_config: dict[str, Any],
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    staging_uri: str,
    image: str,
    namespace: str = "",
    num_nodes: int = 1,
    gpus_per_node: int = 1,
    tracking_uri: str = "",
    experiment: str = "bockd",
    pipeline_run_id: str = "",
    checkpoint_uri: str = "",
    tags: dict[str, str] | None = None,
    api: TrainJobApi | None = None,
    timeout_s: float = 24 * 3600,
    poll_s: float = 30,
    cleanup: bool = True,
    **spec_options: Any,
) -> dict[str, Any]:
    """Stage the dataset and request, run the TrainJob, fetch the Model folder into ``out_dir``.

    Returns rank 0's result (``students``, ``mlflow_run_id``, ``final``), as `bockd.steps.train_ensemble`.
    ``spec_options`` are further `TrainJobSpec` fields (tolerations, node_selector, secrets, env, ...).
    The TrainJob also carries ``timeout_s`` as its activeDeadlineSeconds, so the cluster stops it even
    when this launcher is gone. ``cleanup``: once the Model folder is here, delete the finished TrainJob
    and everything under the run's staging prefix (the dataset copy can be large); a failed run keeps its
    staging objects, since a retry uploads over them.
    """
    from bockd import steps
    from bockd.storage import delete_prefix, download_prefix, endpoint_from_env, upload_folder

    steps.train_config(raw_config, mode="ensemble")  # a bad config fails here, not on every node
    stage = staging_prefix(staging_uri, pipeline_run_id)
    request = TrainRequest(
        train_config=raw_config,
        data_uri=f"{stage}/{DATASET_PREFIX}/",
        output_uri=stage,
        tracking_uri=tracking_uri,
        experiment=experiment,
        pipeline_run_id=pipeline_run_id,
        checkpoint_uri=checkpoint_uri,
        tags=dict(tags or {}),
    )
    env = dict(spec_options.pop("env", {}) or {})
    endpoint = endpoint_from_env()
    if endpoint:
        env.setdefault("BOCKD_S3_ENDPOINT", endpoint)
    for name in FORWARDED_ENV:  # where MLflow's client finds S3 when the server does not proxy artifacts
        if os.environ.get(name):
            env.setdefault(name, os.environ[name])
    spec_options.setdefault("active_deadline_seconds", max(1, math.ceil(timeout_s)))
    spec = TrainJobSpec.for_run(
        pipeline_run_id or "local",
        pod_namespace(namespace),
        image,
        f"{stage}/{REQUEST_FILE}",
        num_nodes=num_nodes,
        gpus_per_node=gpus_per_node,
        env=env,
        **spec_options,
    )
    api = api or TrainJobApi.from_config()
    upload_folder(data_dir, request.data_uri)
    put_json(spec.request_uri, request.to_dict())
    run_trainjob(api, spec, timeout_s=timeout_s, poll_s=poll_s)
    try:
        result = get_json(f"{stage}/{RESULT_FILE}")
    except Exception as e:
        raise TrainJobError(
            f"TrainJob {spec.namespace}/{spec.name} completed but rank 0 left no {stage}/{RESULT_FILE}: {e}"
        ) from e
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="bockd-fetch-") as tmp:
        fetched = download_prefix(f"{stage}/{MODEL_PREFIX}/", Path(tmp) / MODEL_PREFIX)
        out.mkdir(parents=True, exist_ok=True)
        for path in sorted(p for p in fetched.rglob("*") if p.is_file()):
            target = out / path.relative_to(fetched)
            target.parent.mkdir(parents=True, exist_ok=True)
            path.replace(target)
    if cleanup:
        try:  # the trained model is safe by now: a failed cleanup is worth a warning, not a failed step
            api.delete(spec.namespace, spec.name)
            removed = delete_prefix(stage)
        except BockdError as e:
            LOG.warning("cleanup after TrainJob %s/%s failed: %s", spec.namespace, spec.name, e)
        else:
            LOG.info("TrainJob %s/%s and %d staging object(s) deleted", spec.namespace, spec.name, removed)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
