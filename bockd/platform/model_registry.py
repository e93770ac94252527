"""Exported students as MLflow registered model versions, and the ``@champion`` alias.

A version's artifact is the exported student folder as an MLflow ONNX-flavour model: ``model.onnx``
plus an ``MLmodel`` file with the input/output signature, with ``model.safetensors`` and
``config.json`` beside them. Nothing is pickled. Registration is idempotent: a student already
registered from the same MLflow run returns its existing version and creates nothing.

An int8 student (``bockd.quantize``: ``"precision": "int8"`` in its config, no safetensors, its
accuracy check in ``quantization.json``) is another version of the same registered model; every version
carries the tag ``precision`` (``fp32`` or ``int8``), and idempotency is per run and precision.

A confidence cascade folder (``bockd.cascade.build_cascade``: ``cascade.json`` and one sub-folder per
student) is a registered model of its own, ``{prefix}-{dataset}-{arch}-cascade``, its version's files the
folder as it is (the model server serves it; there is no single ONNX graph for an MLflow flavour),
tagged ``kind=cascade``; idempotent per run like the students.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import mlflow.onnx
import numpy as np
import onnx
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from bockd.errors import ConfigError
from bockd.export_format import CONFIG_FILE, ONNX_FILE, read_student_config

CHAMPION = "champion"
PRECISION_TAG = "precision"
KIND_TAG = "kind"
CASCADE_KIND = "cascade"
CASCADE_ARTIFACT_PATH = "cascade"
_EXTRA_FILES = ("model.safetensors", CONFIG_FILE, "quantization.json")  # copied beside model.onnx if present


@dataclass(frozen=True)
class RegisteredStudent:
    name: str
    version: str
    source: str
    run_id: str
    created: bool  # False when the version already existed (a re-run)


def registered_model_name(prefix: str, dataset: str, arch: str, index: int) -> str:
    """``{prefix}-{dataset}-{arch}-s{k}``, in the characters every registry backend accepts."""
    raw = f"{prefix}-{dataset}-{arch}-s{index + 1}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw)


def cascade_model_name(prefix: str, dataset: str, arch: str) -> str:
    """``{prefix}-{dataset}-{arch}-cascade``, named like the students' (`registered_model_name`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{prefix}-{dataset}-{arch}-cascade")


def student_signature(config: dict) -> ModelSignature:
    c, h, w = config["input_shape"]
    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, c, h, w), "input")])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, config["num_classes"]), "logits")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def register_student(
    client: MlflowClient,
    run_id: str,
    folder: str | Path,
    *,
    prefix: str,
    dataset: str,
    tags: dict[str, str] | None = None,
) -> RegisteredStudent:
    """Log ``folder`` (an exported or int8 student) into ``run_id`` and register it as a new version of
    its student's registered model, tagged with its precision (``config.json`` ``"precision"``, fp32 when
    absent). A version of the same run and precision already there is returned instead."""
    folder = Path(folder)
    config = read_student_config(folder)
    precision = str(config.get(PRECISION_TAG, "fp32"))
    name = registered_model_name(prefix, dataset, config["arch"], config["index"])
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    # Versions registered before int8 existed carry no precision tag: they are fp32.
    same = [v for v in existing if (v.tags or {}).get(PRECISION_TAG, "fp32") == precision]
    if same:
        v = same[0]
        return RegisteredStudent(name, str(v.version), v.source, run_id, created=False)

    suffix = "" if precision == "fp32" else f"-{precision}"
    artifact_path = f"students/{config['student'].lower()}{suffix}"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        # pip_requirements given: MLflow would otherwise infer them by importing the model, which is slow.
        mlflow.onnx.save_model(
            onnx.load(str(folder / ONNX_FILE)),
            str(model_dir),
            signature=student_signature(config),
            pip_requirements=["onnxruntime"],
        )
        for extra in _EXTRA_FILES:
            if (folder / extra).is_file():
                shutil.copy2(folder / extra, model_dir / extra)
        client.log_artifacts(run_id, str(model_dir), artifact_path)
    version_tags = {
        "params": str(config["params"]),
        "size_pct": str(config["size_pct"]),
        "student": config["student"],
        PRECISION_TAG: precision,
        **(tags or {}),
    }
    description = f"BOC-KD student {config['student']} of {config['arch']}"
    return _new_version(client, name, description, run_id, artifact_path, version_tags)


def register_cascade(
    client: MlflowClient,
    run_id: str,
    folder: str | Path,
    *,
    prefix: str,
    dataset: str,
    tags: dict[str, str] | None = None,
) -> RegisteredStudent:
    """Log the cascade folder ``folder`` into ``run_id`` (under ``cascade/``) and register it as a new
    version of ``{prefix}-{dataset}-{arch}-cascade``, tagged ``kind=cascade``, its students (``S5,S3,S1``),
    their precisions and its thresholds, plus ``tags``. A version of the same run already there is
    returned instead. Raises CheckpointError when ``folder`` is not a readable cascade."""
    from bockd.cascade import read_cascade

    cascade = read_cascade(folder)
    arch = read_student_config(cascade.stages[0].folder)["arch"]
    name = cascade_model_name(prefix, dataset, arch)
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        v = existing[0]
        return RegisteredStudent(name, str(v.version), v.source, run_id, created=False)

    client.log_artifacts(run_id, str(folder), CASCADE_ARTIFACT_PATH)
    version_tags = {
        KIND_TAG: CASCADE_KIND,
        "students": ",".join(cascade.labels),
        "precisions": ",".join(stage.precision for stage in cascade.stages),
        "thresholds": ",".join(f"{t:.6g}" for t in cascade.thresholds),
        **(tags or {}),
    }
    description = f"BOC-KD confidence cascade of {arch} students (bockd.cascade)"
    return _new_version(client, name, description, run_id, CASCADE_ARTIFACT_PATH, version_tags)


def _new_version(
    client: MlflowClient,
    name: str,
    description: str,
    run_id: str,
    artifact_path: str,
    tags: dict[str, str],
) -> RegisteredStudent:
    """A new version of registered model ``name`` (created with ``description`` if missing) whose source is
    ``artifact_path`` of ``run_id``, already logged there."""
    try:
        client.create_registered_model(name, description=description)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":  # another run created it first: fine
            raise
    source = f"runs:/{run_id}/{artifact_path}"
    mv = client.create_model_version(name, source, run_id=run_id, tags=tags)
    return RegisteredStudent(name, str(mv.version), source, run_id, created=True)


def _is_not_found(err: MlflowException, alias: str) -> bool:
    """True only for "this model or alias does not exist": the one answer that means "no champion".

    MLflow answers an unknown registered model with RESOURCE_DOES_NOT_EXIST and an unset alias with
    INVALID_PARAMETER_VALUE "Registered model alias <alias> not found." (mlflow/store/model_registry/
    sqlalchemy_store.py and file_store.py, mlflow 3.17). Anything else (503, timeouts, auth) is an error.
    """
    if err.error_code == "RESOURCE_DOES_NOT_EXIST":
        return True
    return err.error_code == "INVALID_PARAMETER_VALUE" and f"alias {alias} not found" in err.message


def champion_version(client: MlflowClient, name: str) -> ModelVersion | None:
    """``name@champion``, or None when the model or the alias does not exist.

    Every other failure (a registry answering 503, a timeout, a refused login) propagates: reading it as
    "no champion" would promote a worse model over the real champion. The caller's step then fails and
    KFP retries it.
    """
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:
        if _is_not_found(err, CHAMPION):
            return None
        raise


def promote_champion(
    client: MlflowClient, name: str, version: str, *, top1: float, test_set: str, run_id: str
) -> tuple[bool, str]:
    """Move ``@champion`` to ``version`` only if it beats the current champion on the same test set.

    ``test_set`` identifies the evaluation data (its sha256): accuracies on different test sets are not
    comparable, so a champion scored elsewhere is never replaced automatically. Every move is recorded
    as a version tag with the time and the run that made it.
    """
    current = champion_version(client, name)
    if current is not None:
        if str(current.version) == str(version):
            return False, f"version {version} is already {CHAMPION}"
        if current.tags.get("test_set") != test_set:
            return False, f"{CHAMPION} v{current.version} was scored on another test set; not compared"
        best = float(current.tags.get("top1", "nan"))
        if not top1 > best:
            return False, f"top-1 {top1:.2f} % does not beat {CHAMPION} v{current.version} at {best:.2f} %"
    client.set_model_version_tag(name, version, "top1", str(top1))
    client.set_model_version_tag(name, version, "test_set", test_set)
    client.set_registered_model_alias(name, CHAMPION, version)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    client.set_model_version_tag(name, version, f"alias.{CHAMPION}.set", f"{stamp} by run {run_id}")
    previous = f" (was v{current.version})" if current is not None else " (first champion)"
    return True, f"v{version} is now {CHAMPION} at {top1:.2f} %{previous}"


def storage_uri(mlflow: MlflowClient, name: str, version: str, artifacts_destination: str) -> str:
    """The S3 location of a registered version's files, as KServe's storage initializer needs it.

    An MLflow server that proxies artifacts hands out ``mlflow-artifacts:/<path>``; the files are at
    ``<artifacts_destination>/<path>`` (the server's ``--artifacts-destination``).
    """
    uri = mlflow.get_model_version_download_uri(name, version)
    if uri.startswith("runs:/"):  # a version registered from a run's artifacts: resolve the run's root
        run_id, _, path = uri.removeprefix("runs:/").partition("/")
        uri = f"{mlflow.get_run(run_id).info.artifact_uri.rstrip('/')}/{path}"
    if uri.startswith("mlflow-artifacts:"):
        path = uri.removeprefix("mlflow-artifacts:").lstrip("/")
        return f"{artifacts_destination.rstrip('/')}/{path}"
    if uri.startswith("s3://"):
        return uri
    raise ConfigError(
        f"{name} v{version}: its files are at {uri!r}; KServe here can read only s3:// locations"
    )
