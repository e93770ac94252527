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
from pathlib import Path
from typing import Any

from bockd.checkpoint import write_json
from bockd.config import TrainConfig, build_config
from bockd.data import ImageDataset
from bockd.engine import CHECKPOINT, HISTORY, MODEL_CONFIG, SUMMARY, WEIGHTS, load_training_data, train
from bockd.errors import ConfigError, DataError
from bockd.evaluate import confusion_matrix_png, evaluate_student
from bockd.export import export_student, read_student_config
from bockd.selection import Candidate, Policy, Selection, select
from bockd.significance import gain_noise, reading
from bockd.storage import S3Uri, client, is_s3_uri

log = logging.getLogger("bockd.steps")

EVALUATION_FILE = "evaluation.json"
CONFUSION_PNG = "confusion.png"
BASELINE_FILE = "baseline.json"
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
            from bockd.storage import download_prefix

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


def publish_ensemble(result: dict[str, Any], model: Any, metrics: Any, mlflow_run_id_path: str) -> list[int]:
    """A training component's outputs from ``train_ensemble``'s result: the final test metrics, the Model
    artifact's metadata, the MLflow run id file; returns the student numbers (the evaluate loop's items)."""
    for key, value in final_test_metrics(result["final"]).items():
        metrics.log_metric(key, value)
    model.metadata.update({"students": result["students"], "mlflow_run_id": result["mlflow_run_id"]})
    Path(mlflow_run_id_path).write_text(result["mlflow_run_id"])
    return result["students"]


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
) -> dict[str, Any]:
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

        from bockd.tracking import MlflowCallback, find_or_create_run

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
    return {
        "students": list(range(1, config.model.num_students + 1)),
        "mlflow_run_id": run_id,
        "final": result.final,
    }


def train_baseline(
    raw_config: dict[str, Any],
    data_dir: str | Path,
    student: int,
    out_dir: str | Path,
    *,
    checkpoint_uri: str = "",
) -> dict[str, Any]:
    """Train student ``student`` alone (cross-entropy only, same schedule), export and evaluate it."""
    base = train_config(raw_config)
    n = base.model.num_students
    if not 1 <= student <= n:
        raise ConfigError(f"baseline_students: student {student} does not exist; expected 1..{n}")
    config = train_config(raw_config, mode="baseline", student=student - 1)
    out = Path(out_dir)
    _train(config, data_dir, out / "run", [], checkpoint_uri)
    exported = export_student(out / "run", out / "student", index=student - 1, onnx=False)
    evaluation = evaluate_student(exported, load_prepared(data_dir, config).test, latency_batch_sizes=())
    record = {"student": student, "name": evaluation.name, "top1": evaluation.top1, "top5": evaluation.top5}
    write_json(out / BASELINE_FILE, record)
    return record


# -- evaluate ---------------------------------------------------------------------------------------
def evaluate(
    data_dir: str | Path, model_dir: str | Path, student: int, out_dir: str | Path, device: str = "cpu"
) -> dict[str, Any]:
    """Top-1/top-5, confusion matrix (JSON + PNG), params, FLOPs and latency of one exported student."""
    dataset = ImageDataset.load(data_dir)
    folder = student_dir(model_dir, student)
    evaluation = evaluate_student(folder, dataset.test, device=device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {**evaluation.to_dict(), "student_number": student, "classes": dataset.classes}
    record["test_set"] = dataset.sha256()
    record["config"] = read_student_config(folder)
    confusion_matrix_png(evaluation, dataset.classes, out / CONFUSION_PNG)
    write_json(out / EVALUATION_FILE, record)
    return record


def read_records(folders: list[str | Path], filename: str) -> list[dict[str, Any]]:
    return [json.loads((Path(f) / filename).read_text()) for f in folders]


def baseline_top1(baselines: list[dict[str, Any]]) -> dict[int, float]:
    return {int(b["student"]): float(b["top1"]) for b in baselines}


# -- register ---------------------------------------------------------------------------------------
def register(
    model_dir: str | Path,
    evaluations: list[dict[str, Any]],
    baselines: list[dict[str, Any]],
    *,
    tracking_uri: str,
    run_id: str,
    prefix: str,
) -> list[dict[str, Any]]:
    """One registered model version per student (idempotent per run), tagged with its scores."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from bockd.model_registry import register_student

    mlflow = MlflowClient(tracking_uri)
    base = baseline_top1(baselines)
    out = []
    metrics = []
    for ev in sorted(evaluations, key=lambda e: e["student_number"]):
        k = int(ev["student_number"])
        tags = {"top1": f"{ev['top1']:.4f}", "top5": f"{ev['top5']:.4f}", "test_set": ev["test_set"]}
        if k in base:
            gain, n = ev["top1"] - base[k], int(ev["num_test"])
            tags |= {
                "baseline_top1": f"{base[k]:.4f}",
                "gain": f"{gain:+.4f}",
                # Read by anyone comparing versions: one seed's gain within the test set's noise is no gain.
                "gain_reading": reading(gain, base[k], ev["top1"], n),
                "gain_noise_points": f"{gain_noise(base[k], ev['top1'], n):.4f}",
            }
        reg = register_student(
            mlflow,
            run_id,
            student_dir(model_dir, k),
            prefix=prefix,
            dataset=ev["config"]["dataset"]["name"],
            tags=tags,
        )
        out.append({"student": k, "name": reg.name, "version": reg.version, "created": reg.created})
        for key in ("top1", "top5", "flops", "params"):
            metrics.append(Metric(f"eval/s{k}/{key}", float(ev[key]), 0, 0))
        if k in base:
            metrics.append(Metric(f"eval/s{k}/baseline_top1", base[k], 0, 0))
    mlflow.log_batch(run_id, metrics=metrics)
    return out


# -- select -----------------------------------------------------------------------------------------
def _champion_top1(mlflow: Any, name: str, test_set: str) -> float | None:
    """The top-1 of ``name@champion`` if it was scored on the same test set, else None (also when there
    is no champion). A registry that fails to answer raises: the step fails and KFP retries it."""
    from bockd.model_registry import champion_version

    current = champion_version(mlflow, name)
    if current is None or current.tags.get("test_set") != test_set or "top1" not in current.tags:
        return None
    return float(current.tags["top1"])


def candidates(
    evaluations: list[dict[str, Any]],
    baselines: list[dict[str, Any]],
    champions: dict[int, float | None] | None = None,
) -> list[Candidate]:
    base = baseline_top1(baselines)
    champions = champions or {}
    out = []
    for ev in sorted(evaluations, key=lambda e: e["student_number"]):
        k = int(ev["student_number"])
        latency = ev.get("latency_ms", {}).get("1", {}).get("p50")
        out.append(
            Candidate(
                name=ev["name"],
                index=k - 1,
                params=int(ev["params"]),
                size_pct=float(ev["size_pct"]),
                top1=float(ev["top1"]),
                latency_ms=latency,
                baseline_top1=base.get(k),
                champion_top1=champions.get(k),
            )
        )
    return out


def select_students(
    evaluations: list[dict[str, Any]],
    baselines: list[dict[str, Any]],
    registrations: list[dict[str, Any]],
    policy: dict[str, Any] | None,
    *,
    tracking_uri: str = "",
    run_id: str = "",
) -> dict[str, Any]:
    """Apply the selection policy; the chosen students become ``@champion`` where they beat it.

    Each student is compared with its own registered model's champion, and only when both were scored
    on the same test set (promotion rules in :func:`bockd.model_registry.promote_champion`).
    """
    rules = Policy.from_mapping(policy)
    names = {int(r["student"]): r for r in registrations}
    test_set = {int(e["student_number"]): e["test_set"] for e in evaluations}
    mlflow = None
    champions: dict[int, float | None] = {}
    if tracking_uri:
        from mlflow import MlflowClient

        mlflow = MlflowClient(tracking_uri)
        champions = {k: _champion_top1(mlflow, r["name"], test_set[k]) for k, r in names.items()}
    selection = select(candidates(evaluations, baselines, champions), rules)
    promotions = []
    if mlflow is not None:
        from bockd.model_registry import promote_champion

        top1 = {int(e["student_number"]): float(e["top1"]) for e in evaluations}
        for choice in selection.chosen:
            k = choice.index + 1
            reg = names[k]
            moved, message = promote_champion(
                mlflow, reg["name"], reg["version"], top1=top1[k], test_set=test_set[k], run_id=run_id
            )
            promotions.append({"student": k, "name": reg["name"], "promoted": moved, "message": message})
        if run_id:
            mlflow.log_dict(run_id, selection.to_dict(), "selection.json")
    return {
        "policy": rules.model_dump(exclude_none=True),
        "selection": selection.to_dict(),
        "chosen": [c.index + 1 for c in selection.chosen],
        "promotions": promotions,
        "markdown": selection.markdown(),
    }


def selection_from_record(record: dict[str, Any]) -> Selection:
    return Selection.from_dict(record["selection"])


# -- report -----------------------------------------------------------------------------------------
def report(
    model_dir: str | Path,
    evaluation_dirs: list[str | Path],
    baselines: list[dict[str, Any]],
    registrations: list[dict[str, Any]],
    selection: dict[str, Any],
    out_path: str | Path,
    *,
    tracking_uri: str = "",
    run_id: str = "",
    pipeline_run_id: str = "",
) -> list[dict[str, Any]]:
    """Write the HTML report (and log it to the MLflow run); returns the per-student summary rows."""
    from bockd.report import render_report, summary_rows, write_report

    model_dir = Path(model_dir)
    evaluations = read_records(evaluation_dirs, EVALUATION_FILE)
    card = json.loads((model_dir / MODEL_CONFIG).read_text())
    history = json.loads((model_dir / HISTORY).read_text())
    rows = summary_rows(evaluations, baseline_top1(baselines), registrations, selection["chosen"])
    cfg = card["config"]
    facts = {
        "dataset": f"{card['dataset']['name']} (sha256 {card['dataset']['sha256'][:12]})",
        "architecture": f"{cfg['model']['arch']}, {cfg['model']['num_students']} students",
        "schedule": f"{cfg['epochs']} epochs, batch {cfg['batch_size']}, {cfg['optim']['name']} "
        f"lr {cfg['optim']['lr']}",
        "loss": f"CE {cfg['loss']['ce_weight']} + hint {cfg['loss']['hint_weight']} + "
        f"KD {cfg['loss']['kd_weight']} at T={cfg['loss']['temperature']}",
        "test images": str(evaluations[0]["num_test"]) if evaluations else "-",
    }
    if pipeline_run_id:
        facts["pipeline run"] = pipeline_run_id
    if run_id:
        facts["MLflow run"] = run_id
    pairs = sorted(zip(evaluation_dirs, evaluations, strict=True), key=lambda p: p[1]["student_number"])
    confusion = {f"{ev['student']} ({ev['name']})": Path(d) / CONFUSION_PNG for d, ev in pairs}
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
        client_.log_dict(run_id, rows, "summary_rows.json")
    return rows


# -- deploy -----------------------------------------------------------------------------------------
DEPLOY_MODES = ("none", "local", "cluster")
# What a pipeline may set about each InferenceService (DeploySpec fields; see bockd.serving.deploy).
CLUSTER_DEPLOY_OPTIONS = (
    "service_account", "runtime", "backend", "min_replicas", "max_replicas", "scale_metric", "scale_target",
    "canary_traffic_percent", "deployment_mode", "timeout_s", "poll_s",
)  # fmt: skip


def check_deploy_option_keys(options: dict[str, Any], internal: tuple[str, ...] = ()) -> None:
    """``deploy_options`` may hold only `CLUSTER_DEPLOY_OPTIONS` (and the ``internal`` keys the step adds)."""
    unknown = sorted(set(options) - {*CLUSTER_DEPLOY_OPTIONS, *internal})
    if unknown:
        raise ConfigError(
            f"deploy_options: unknown keys {unknown}; expected some of {', '.join(CLUSTER_DEPLOY_OPTIONS)}"
        )


def storage_uri(mlflow: Any, name: str, version: str, artifacts_destination: str) -> str:
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


def _deploy_cluster(
    chosen: list[int], versions: dict[int, dict[str, Any]], options: dict[str, Any]
) -> list[dict[str, Any]]:
    from mlflow import MlflowClient

    from bockd.kube import pod_namespace
    from bockd.serving.deploy import DeploySpec, KubeApi, deploy_inference_service

    opts = dict(options)
    check_deploy_option_keys(opts, internal=("namespace", "tracking_uri", "artifacts_destination"))
    namespace = pod_namespace(opts.pop("namespace", ""), "serving_namespace")
    mlflow = MlflowClient(opts.pop("tracking_uri"))
    destination = opts.pop("artifacts_destination")
    timeout = float(opts.pop("timeout_s", 600))
    poll = float(opts.pop("poll_s", 5))
    api = KubeApi.from_config()
    records = []
    for k in chosen:
        reg = versions[k]
        uri = storage_uri(mlflow, reg["name"], reg["version"], destination)
        spec = DeploySpec.for_model(reg["name"], namespace, uri, **opts)
        result = deploy_inference_service(api, spec, reg["version"], timeout_s=timeout, poll_s=poll)
        records.append({"student": k, "name": reg["name"], "version": reg["version"], "url": result.url})
    return records


def deploy(
    model_dir: str | Path,
    chosen: list[int],
    registrations: list[dict[str, Any]],
    *,
    mode: str,
    serving_dir: str | Path = "",
    cluster_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Serve each chosen student; returns ``{student, name, version, url}`` records.

    ``local``: one KServe model server per student on 127.0.0.1 (the quick start). The new server is
    started and health-checked before the one serving an older version of that model is stopped, so a
    failed deploy leaves the previous version serving.
    ``cluster``: one InferenceService per student on our ServingRuntime, its ``storageUri`` the registered
    version's files; a new version rolls out as a canary, is promoted once ready, and is rolled back on
    failure so the previous version keeps serving (:mod:`bockd.serving.deploy`).
    """
    if mode not in DEPLOY_MODES:
        raise ConfigError(f"deploy_mode: expected one of {', '.join(DEPLOY_MODES)}, got {mode!r}")
    if mode == "none" or not chosen:
        return []
    versions = {int(r["student"]): r for r in registrations}
    if mode == "cluster":
        return _deploy_cluster(chosen, versions, cluster_options or {})
    if not serving_dir:
        raise ConfigError("local_serving_dir: local deployment needs a folder for the servers' state")
    from bockd.serving.local import start_local_server, stop_local_server

    root = Path(serving_dir)
    records = []
    for k in chosen:
        reg = versions[k]
        # One state folder per model version: the served model name stays the registered name.
        state = root / f"{reg['name']}-v{reg['version']}"
        endpoint = start_local_server([student_dir(model_dir, k)], reg["name"], state)
        for old in root.glob(f"{reg['name']}-v*"):
            if old != state and old.is_dir():
                stop_local_server(old, reg["name"])
                shutil.rmtree(old, ignore_errors=True)
        records.append({"student": k, "name": reg["name"], "version": reg["version"], "url": endpoint.url})
    return records
