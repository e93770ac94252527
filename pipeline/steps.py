"""What each pipeline step does, as plain functions over folders (DESIGN.md section 2).

The KFP components in ``components/`` only parse their inputs, call one of these and write outputs, so
every step runs and is tested without KFP. Each is safe to re-run: the same inputs give the same
outputs, folders appear whole or not at all, and registration never creates a duplicate version.
Student numbers are 1-based here (S1 = 1), as users and pipeline parameters write them.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bockd.config import TrainConfig, build_config
from bockd.data import ImageDataset
from bockd.engine import CHECKPOINT, HISTORY, MODEL_CONFIG, SUMMARY, WEIGHTS, load_training_data, train
from bockd.errors import ConfigError, DataError
from bockd.evaluate import confusion_matrix_png, evaluate_student
from bockd.export import export_student, read_student_config
from bockd.pipeline.records import (
    BaselineRecord,
    Endpoint,
    EvaluationRecord,
    Promotion,
    Registration,
    SelectionRecord,
    SummaryRow,
    TrainingResult,
    read_records,
)
from bockd.pipeline.selection import Candidate, Policy, select
from bockd.platform.s3 import S3Uri, client, is_s3_uri
from bockd.significance import gain_noise, reading

log = logging.getLogger("bockd.pipeline.steps")

CONFUSION_PNG = "confusion.png"
STUDENTS_DIR = "students"


def student_dir(model_dir: str | Path, student: int) -> Path:
    return Path(model_dir) / STUDENTS_DIR / f"s{student}"


def train_config(raw: dict[str, Any], **overrides: Any) -> TrainConfig:
    """The validated training config a pipeline parameter carries (a full ``TrainConfig.to_dict()``)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"train_config: expected a mapping, got {type(raw).__name__}")
    return build_config(None, {**raw, **overrides})


# -- prepare_data -----------------------------------------------------------------------------------
def prepare_data(raw_config: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Load ``config.data`` (a local path, an official archive, or an ``s3://`` prefix) into ``out_dir``.

    The folder holds uint8 arrays per split and meta.json (classes, counts, mean/std, sha256); the
    seeded training subset and validation split, if asked for, are drawn here so every later step sees
    the same ones.
    """
    config = train_config(raw_config)
    data = config.data
    with tempfile.TemporaryDirectory() as tmp:
        source: str | None = data.path
        if is_s3_uri(source):
            from bockd.platform.s3 import download_prefix

            source = str(download_prefix(source, Path(tmp) / "source"))
        dataset = load_training_data(config, source)
    dataset.save(out_dir)
    return dataset.meta()


def load_prepared(data_dir: str | Path, config: TrainConfig) -> ImageDataset:
    dataset = ImageDataset.load(data_dir)
    if dataset.name != config.data.dataset:
        raise DataError(
            f"dataset: the prepared data is {dataset.name!r} but train_config.data.dataset is "
            f"{config.data.dataset!r}"
        )
    return dataset


def checkpoint_prefix(checkpoint_uri: str, pipeline_run_id: str, task: str) -> str:
    """Where ``task`` of this pipeline run keeps its checkpoint ("" = only locally): a retried pod of the
    same run resumes from it, another run starts afresh."""
    return f"{checkpoint_uri.rstrip('/')}/{pipeline_run_id}/{task}" if checkpoint_uri else ""


def final_test_metrics(final: dict[str, float]) -> dict[str, float]:
    """``test/s1/top1`` -> ``s1-top1``: the last epoch's test metrics under KFP-friendly names."""
    return {k.removeprefix("test/").replace("/", "-"): v for k, v in final.items() if k.startswith("test/")}


def publish_ensemble(result: TrainingResult, model: Any, metrics: Any, mlflow_run_id_path: str) -> list[int]:
    """A training component's outputs from ``train_ensemble``'s result: the final test metrics, the Model
    artifact's metadata, the MLflow run id file; returns the student numbers (the evaluate loop's items)."""
    for key, value in final_test_metrics(result.final).items():
        metrics.log_metric(key, value)
    model.metadata.update({"students": result.students, "mlflow_run_id": result.mlflow_run_id})
    Path(mlflow_run_id_path).write_text(result.mlflow_run_id)
    return result.students


# -- checkpoints in S3, so a rescheduled training pod resumes ---------------------------------------
class S3CheckpointSync:
    """Engine callback: uploads every checkpoint to ``uri``; :meth:`restore` fetches it back first."""

    def __init__(self, uri: str) -> None:
        self.loc = S3Uri.parse(uri.rstrip("/") + "/" + CHECKPOINT, "checkpoint_uri")

    def restore(self, workdir: Path) -> bool:
        from minio.error import S3Error

        try:
            client().fget_object(self.loc.bucket, self.loc.prefix, str(workdir / CHECKPOINT))
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject"):
                return False
            raise
        log.info("restored checkpoint from %s", self.loc)
        return True

    def on_checkpoint(self, trainer: Any, path: Path) -> None:
        client().fput_object(self.loc.bucket, self.loc.prefix, str(path))


def _train(
    config: TrainConfig,
    data_dir: str | Path,
    out_dir: Path,
    callbacks: list[Any],
    checkpoint_uri: str,
) -> Any:
    """Train in a scratch folder (resuming from ``checkpoint_uri`` if set); copy the results to out_dir."""
    dataset = load_prepared(data_dir, config)
    with tempfile.TemporaryDirectory(prefix="bockd-train-") as scratch:
        workdir = Path(scratch)
        if checkpoint_uri:
            sync = S3CheckpointSync(checkpoint_uri)
            sync.restore(workdir)
            callbacks = [*callbacks, sync]
        result = train(config, workdir, callbacks, dataset=dataset)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in (WEIGHTS, MODEL_CONFIG, HISTORY, SUMMARY):
            shutil.copy2(workdir / name, out_dir / name)
    return result


# -- train_ensemble / train_baseline ----------------------------------------------------------------
def train_ensemble(
    raw_config: dict[str, Any],
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    tracking_uri: str = "",
    experiment: str = "bockd",
    pipeline_run_id: str = "",
    checkpoint_uri: str = "",
    tags: dict[str, str] | None = None,
) -> TrainingResult:
    """Train the BOC-KD ensemble and export every student to ``out_dir/students/s<k>``.

    With ``tracking_uri``, the config, every epoch's metrics and the summary go to the MLflow run of
    this pipeline run (found or created by ``pipeline_run_id``); its id is returned.
    """
    config = train_config(raw_config, mode="ensemble")
    out = Path(out_dir)
    callbacks: list[Any] = []
    run_id = ""
    if tracking_uri:
        from mlflow import MlflowClient

        from bockd.platform.tracking import MlflowCallback, find_or_create_run

        mlflow = MlflowClient(tracking_uri)
        run_name = f"{config.data.dataset}-{config.model.arch}-n{config.model.num_students}"
        run_id = find_or_create_run(mlflow, experiment, pipeline_run_id or "local", run_name)
        callbacks.append(MlflowCallback(tracking_uri, run_id=run_id, tags=tags))
    result = _train(config, data_dir, out, callbacks, checkpoint_uri)
    for k in range(1, config.model.num_students + 1):
        export_student(out, student_dir(out, k), index=k - 1)
    if run_id:
        mlflow.log_dict(run_id, config.to_dict(), "config/train_config.json")
        mlflow.log_artifact(run_id, str(out / MODEL_CONFIG), "config")
    return TrainingResult(
        students=list(range(1, config.model.num_students + 1)), mlflow_run_id=run_id, final=result.final
    )


def train_baseline(
    raw_config: dict[str, Any],
    data_dir: str | Path,
    student: int,
    out_dir: str | Path,
    *,
    checkpoint_uri: str = "",
) -> BaselineRecord:
    """Train student ``student`` alone (cross-entropy only, same schedule), export and evaluate it; the
    record is also written to ``out_dir/baseline.json``."""
    base = train_config(raw_config)
    n = base.model.num_students
    if not 1 <= student <= n:
        raise ConfigError(f"baseline_students: student {student} does not exist; expected 1..{n}")
    config = train_config(raw_config, mode="baseline", student=student - 1)
    out = Path(out_dir)
    _train(config, data_dir, out / "run", [], checkpoint_uri)
    exported = export_student(out / "run", out / "student", index=student - 1, onnx=False)
    evaluation = evaluate_student(exported, load_prepared(data_dir, config).test, latency_batch_sizes=())
    record = BaselineRecord(
        student=student, student_name=evaluation.name, top1=evaluation.top1, top5=evaluation.top5
    )
    record.write(out)
    return record


# -- evaluate ---------------------------------------------------------------------------------------
def evaluate(
    data_dir: str | Path, model_dir: str | Path, student: int, out_dir: str | Path, device: str = "cpu"
) -> EvaluationRecord:
    """Top-1/top-5, confusion matrix (JSON + PNG), params, FLOPs and latency of one exported student;
    the record is also written to ``out_dir/evaluation.json``, the matrix to ``out_dir/confusion.png``."""
    dataset = ImageDataset.load(data_dir)
    folder = student_dir(model_dir, student)
    evaluation = evaluate_student(folder, dataset.test, device=device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    measured = evaluation.to_dict()
    record = EvaluationRecord(
        student=student,
        label=evaluation.student,
        student_name=evaluation.name,
        classes=dataset.classes,
        test_set=dataset.sha256(),
        config=read_student_config(folder),
        **{k: measured[k] for k in _MEASURED},
    )
    confusion_matrix_png(evaluation, dataset.classes, out / CONFUSION_PNG)
    record.write(out)
    return record


# What an EvaluationRecord takes over from bockd.evaluate's StudentEvaluation as it is.
_MEASURED = (
    "params", "size_pct", "top1", "top5", "num_test", "confusion", "per_class_accuracy", "flops",
    "latency_ms",
)  # fmt: skip


def baseline_top1(baselines: list[BaselineRecord]) -> dict[int, float]:
    """Student number -> its baseline's top-1."""
    return {b.student: b.top1 for b in baselines}


# -- register ---------------------------------------------------------------------------------------
def register(
    model_dir: str | Path,
    evaluations: list[EvaluationRecord],
    baselines: list[BaselineRecord],
    *,
    tracking_uri: str,
    run_id: str,
    prefix: str,
) -> list[Registration]:
    """One registered model version per student (idempotent per run), tagged with its scores."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from bockd.platform.model_registry import register_student

    mlflow = MlflowClient(tracking_uri)
    base = baseline_top1(baselines)
    out = []
    metrics = []
    for ev in sorted(evaluations, key=lambda e: e.student):
        k = ev.student
        tags = {"top1": f"{ev.top1:.4f}", "top5": f"{ev.top5:.4f}", "test_set": ev.test_set}
        if k in base:
            gain, n = ev.top1 - base[k], ev.num_test
            tags |= {
                "baseline_top1": f"{base[k]:.4f}",
                "gain": f"{gain:+.4f}",
                # Read by anyone comparing versions: one seed's gain within the test set's noise is no gain.
                "gain_reading": reading(gain, base[k], ev.top1, n),
                "gain_noise_points": f"{gain_noise(base[k], ev.top1, n):.4f}",
            }
        reg = register_student(
            mlflow,
            run_id,
            student_dir(model_dir, k),
            prefix=prefix,
            dataset=ev.config["dataset"]["name"],
            tags=tags,
        )
        out.append(
            Registration(student=k, registered_model=reg.name, version=reg.version, created=reg.created)
        )
        for key in ("top1", "top5", "flops", "params"):
            metrics.append(Metric(f"eval/s{k}/{key}", float(getattr(ev, key)), 0, 0))
        if k in base:
            metrics.append(Metric(f"eval/s{k}/baseline_top1", base[k], 0, 0))
    mlflow.log_batch(run_id, metrics=metrics)
    return out


# -- select -----------------------------------------------------------------------------------------
def _champion_top1(mlflow: Any, name: str, test_set: str) -> float | None:
    """The top-1 of ``name@champion`` if it was scored on the same test set, else None (also when there
    is no champion). A registry that fails to answer raises: the step fails and KFP retries it."""
    from bockd.platform.model_registry import champion_version

    current = champion_version(mlflow, name)
    if current is None or current.tags.get("test_set") != test_set or "top1" not in current.tags:
        return None
    return float(current.tags["top1"])


def candidates(
    evaluations: list[EvaluationRecord],
    baselines: list[BaselineRecord],
    champions: dict[int, float | None] | None = None,
) -> list[Candidate]:
    """The selection engine's candidates (0-based ``index``), in student order."""
    base = baseline_top1(baselines)
    champions = champions or {}
    return [
        Candidate(
            name=ev.student_name,
            index=ev.student - 1,
            params=ev.params,
            size_pct=ev.size_pct,
            top1=ev.top1,
            latency_ms=ev.latency_p50_ms,
            baseline_top1=base.get(ev.student),
            champion_top1=champions.get(ev.student),
        )
        for ev in sorted(evaluations, key=lambda e: e.student)
    ]


def select_students(
    evaluations: list[EvaluationRecord],
    baselines: list[BaselineRecord],
    registrations: list[Registration],
    policy: dict[str, Any] | None,
    *,
    tracking_uri: str = "",
    run_id: str = "",
) -> SelectionRecord:
    """Apply the selection policy; the chosen students become ``@champion`` where they beat it.

    Each student is compared with its own registered model's champion, and only when both were scored
    on the same test set (promotion rules in :func:`bockd.platform.model_registry.promote_champion`).
    """
    rules = Policy.from_mapping(policy)
    versions = {r.student: r for r in registrations}
    scored = {e.student: e for e in evaluations}
    mlflow = None
    champions: dict[int, float | None] = {}
    if tracking_uri:
        from mlflow import MlflowClient

        mlflow = MlflowClient(tracking_uri)
        champions = {
            k: _champion_top1(mlflow, r.registered_model, scored[k].test_set) for k, r in versions.items()
        }
    selection = select(candidates(evaluations, baselines, champions), rules)
    chosen = [c.index + 1 for c in selection.chosen]
    promotions = []
    if mlflow is not None:
        from bockd.platform.model_registry import promote_champion

        for k in chosen:
            reg, ev = versions[k], scored[k]
            moved, message = promote_champion(
                mlflow, reg.registered_model, reg.version, top1=ev.top1, test_set=ev.test_set, run_id=run_id
            )
            promotions.append(
                Promotion(student=k, registered_model=reg.registered_model, promoted=moved, message=message)
            )
        if run_id:
            mlflow.log_dict(run_id, selection.to_dict(), "selection.json")
    return SelectionRecord(
        policy=rules.model_dump(exclude_none=True),
        selection=selection,
        chosen=chosen,
        promotions=promotions,
        markdown=selection.markdown(),
    )


# -- report -----------------------------------------------------------------------------------------
def report(
    model_dir: str | Path,
    evaluation_dirs: list[str | Path],
    baselines: list[BaselineRecord],
    registrations: list[Registration],
    selection: SelectionRecord,
    out_path: str | Path,
    *,
    tracking_uri: str = "",
    run_id: str = "",
    pipeline_run_id: str = "",
) -> list[SummaryRow]:
    """Write the HTML report (and log it to the MLflow run); returns the per-student summary rows.

    ``evaluation_dirs``: the evaluate step's output folders (record and confusion matrix of one student)."""
    from bockd.pipeline.report import render_report, summary_rows, write_report

    model_dir = Path(model_dir)
    evaluations = read_records(EvaluationRecord, evaluation_dirs)
    card = json.loads((model_dir / MODEL_CONFIG).read_text())
    history = json.loads((model_dir / HISTORY).read_text())
    rows = summary_rows(evaluations, baseline_top1(baselines), registrations, selection.chosen)
    cfg = card["config"]
    facts = {
        "dataset": f"{card['dataset']['name']} (sha256 {card['dataset']['sha256'][:12]})",
        "architecture": f"{cfg['model']['arch']}, {cfg['model']['num_students']} students",
        "schedule": f"{cfg['epochs']} epochs, batch {cfg['batch_size']}, {cfg['optim']['name']} "
        f"lr {cfg['optim']['lr']}",
        "loss": f"CE {cfg['loss']['ce_weight']} + hint {cfg['loss']['hint_weight']} + "
        f"KD {cfg['loss']['kd_weight']} at T={cfg['loss']['temperature']}",
        "test images": str(evaluations[0].num_test) if evaluations else "-",
    }
    if pipeline_run_id:
        facts["pipeline run"] = pipeline_run_id
    if run_id:
        facts["MLflow run"] = run_id
    pairs = sorted(zip(evaluation_dirs, evaluations, strict=True), key=lambda p: p[1].student)
    confusion = {f"{ev.label} ({ev.student_name})": Path(d) / CONFUSION_PNG for d, ev in pairs}
    ensemble = history[-1].get("test/ensemble/top1") if history else None
    content = render_report(
        title=f"bockd: {cfg['model']['arch']} on {card['dataset']['name']}",
        facts=facts,
        rows=rows,
        selection=selection,
        history=history,
        confusion_pngs=confusion,
        ensemble_top1=ensemble,
    )
    path = write_report(out_path, content)
    if tracking_uri and run_id:
        from mlflow import MlflowClient

        client_ = MlflowClient(tracking_uri)
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "report.html"
            shutil.copy2(path, copy)
            client_.log_artifact(run_id, str(copy))
        client_.log_dict(run_id, [r.model_dump(mode="json") for r in rows], "summary_rows.json")
    return rows


# -- deploy -----------------------------------------------------------------------------------------
DEPLOY_MODES = ("none", "local", "cluster")
# What a pipeline may set about each InferenceService (DeploySpec fields, bockd.platform.inference_service).
CLUSTER_DEPLOY_OPTIONS = (
    "service_account", "runtime", "backend", "min_replicas", "max_replicas", "scale_metric", "scale_target",
    "canary_traffic_percent", "deployment_mode", "timeout_s", "poll_s",
)  # fmt: skip


def check_deploy_option_keys(options: dict[str, Any]) -> None:
    """``deploy_options`` may hold only `CLUSTER_DEPLOY_OPTIONS`."""
    unknown = sorted(set(options) - set(CLUSTER_DEPLOY_OPTIONS))
    if unknown:
        raise ConfigError(
            f"deploy_options: unknown keys {unknown}; expected some of {', '.join(CLUSTER_DEPLOY_OPTIONS)}"
        )


@dataclass(frozen=True)
class ClusterTarget:
    """Where the deploy step serves on a cluster and where it finds the registered files (pipeline
    parameters of their own, kept apart from the user's ``deploy_options``)."""

    namespace: str  # "" = the namespace of the step's own pod
    tracking_uri: str  # the MLflow server the versions are registered in
    artifacts_destination: str  # its --artifacts-destination: where mlflow-artifacts:/ paths are in S3


def _deploy_cluster(
    chosen: list[int], versions: dict[int, Registration], target: ClusterTarget, options: dict[str, Any]
) -> list[Endpoint]:
    from mlflow import MlflowClient

    from bockd.platform.inference_service import DeploySpec, InferenceServiceApi, deploy_inference_service
    from bockd.platform.kube.client import pod_namespace
    from bockd.platform.model_registry import storage_uri

    check_deploy_option_keys(options)
    spec_options = {k: v for k, v in options.items() if k not in ("timeout_s", "poll_s")}
    timeout, poll = float(options.get("timeout_s", 600)), float(options.get("poll_s", 5))
    namespace = pod_namespace(target.namespace, "serving_namespace")
    mlflow = MlflowClient(target.tracking_uri)
    api = InferenceServiceApi.from_config()
    endpoints = []
    for k in chosen:
        reg = versions[k]
        uri = storage_uri(mlflow, reg.registered_model, reg.version, target.artifacts_destination)
        spec = DeploySpec.for_model(reg.registered_model, namespace, uri, **spec_options)
        result = deploy_inference_service(api, spec, reg.version, timeout_s=timeout, poll_s=poll)
        endpoints.append(_endpoint(reg, result.url))
    return endpoints


def _endpoint(reg: Registration, url: str) -> Endpoint:
    return Endpoint(student=reg.student, registered_model=reg.registered_model, version=reg.version, url=url)


def deploy(
    model_dir: str | Path,
    chosen: list[int],
    registrations: list[Registration],
    *,
    mode: str,
    serving_dir: str | Path = "",
    cluster: ClusterTarget | None = None,
    deploy_options: dict[str, Any] | None = None,
) -> list[Endpoint]:
    """Serve each chosen student (1-based numbers); returns where each one answers.

    ``local``: one KServe model server per student on 127.0.0.1 (the quick start). The new server is
    started and health-checked before the one serving an older version of that model is stopped, so a
    failed deploy leaves the previous version serving.
    ``cluster``: one InferenceService per student on our ServingRuntime, its ``storageUri`` the registered
    version's files; a new version rolls out as a canary, is promoted once ready, and is rolled back on
    failure so the previous version keeps serving (:mod:`bockd.platform.inference_service`).
    """
    if mode not in DEPLOY_MODES:
        raise ConfigError(f"deploy_mode: expected one of {', '.join(DEPLOY_MODES)}, got {mode!r}")
    if mode == "none" or not chosen:
        return []
    versions = {r.student: r for r in registrations}
    if mode == "cluster":
        if cluster is None:
            raise ConfigError("deploy_mode: 'cluster' needs the serving namespace and the MLflow server")
        return _deploy_cluster(chosen, versions, cluster, deploy_options or {})
    if not serving_dir:
        raise ConfigError("local_serving_dir: local deployment needs a folder for the servers' state")
    from bockd.platform.services.model_servers import start_local_server, stop_local_server

    root = Path(serving_dir)
    endpoints = []
    for k in chosen:
        reg = versions[k]
        name = reg.registered_model
        # One state folder per model version: the served model name stays the registered name.
        state = root / f"{name}-v{reg.version}"
        local = start_local_server([student_dir(model_dir, k)], name, state)
        for old in root.glob(f"{name}-v*"):
            if old != state and old.is_dir():
                stop_local_server(old, name)
                shutil.rmtree(old, ignore_errors=True)
        endpoints.append(_endpoint(reg, local.url))
    return endpoints
