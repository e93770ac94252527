"""What each pipeline step does, as plain functions over folders (DESIGN.md section 2).

The KFP components in ``components/`` only parse their inputs, call one of these and write outputs, so
every step runs and is tested without KFP. Each is safe to re-run: the same inputs give the same
outputs, folders appear whole or not at all, and registration never creates a duplicate version.
Student numbers are 1-based here (S1 = 1), as users and pipeline parameters write them.
"""

from __future__ import annotations

import json
import logging
import re
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
from bockd.pipeline.options import CascadeOptions, MeasurementOptions, QuantizationOptions
from bockd.pipeline.records import (
    BaselineRecord,
    CascadeEndpoint,
    CascadeFitSummary,
    CascadeRecord,
    CascadeRegistration,
    CascadeStageResult,
    Endpoint,
    EvaluationRecord,
    Int8Verdict,
    MeasurementsRecord,
    Pick,
    Precision,
    Promotion,
    QuantizationRecord,
    Registration,
    SelectionRecord,
    StudentMeasurement,
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


def exported_students(model_dir: str | Path) -> list[int]:
    """The student numbers exported under ``model_dir/students``, ascending."""
    root = Path(model_dir) / STUDENTS_DIR
    return sorted(int(p.name[1:]) for p in root.iterdir() if p.is_dir() and re.fullmatch(r"s\d+", p.name))


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


# -- quantize ---------------------------------------------------------------------------------------
def quantize(
    data_dir: str | Path,
    model_dir: str | Path,
    evaluation: EvaluationRecord,
    options: dict[str, Any] | None,
    out_dir: str | Path,
) -> QuantizationRecord:
    """The int8 version of one evaluated student (`bockd.quantize.quantize_and_check`): static quantization
    calibrated on up to ``calibration_images`` training images, scored on the test split against the fp32
    student with ONNX Runtime. ``out_dir`` gets the int8 student in ``int8/`` (kept whether or not it
    passed: the measure step and the report show every one) and the record, also returned.

    With ``enabled: false`` nothing is quantized: the record says so. Raises ConfigError for bad
    ``options`` and what `quantize_and_check` raises (a student ONNX Runtime cannot quantize fails the
    step: a silent fp32-only run would hide it).
    """
    from bockd.quantize import quantize_and_check

    opts = QuantizationOptions.from_mapping(options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k = evaluation.student
    base = {
        "student": k,
        "label": evaluation.label,
        "student_name": evaluation.student_name,
        "max_drop": opts.max_drop,
        "test_set": evaluation.test_set,
    }
    if not opts.enabled:
        record = QuantizationRecord(**base, enabled=False, passed=False)
        record.write(out)
        return record
    dataset = ImageDataset.load(data_dir)
    int8_dir = out / QuantizationRecord.INT8_DIR
    check = quantize_and_check(
        student_dir(model_dir, k),
        int8_dir,
        dataset.train.x,
        dataset.test.x,
        dataset.test.y,
        max_drop=opts.max_drop,
        per_channel=opts.per_channel,
        reduce_range=opts.reduce_range,
        max_images=opts.calibration_images,
    )
    record = QuantizationRecord(
        **base,
        enabled=True,
        passed=check.passed,
        int8_name=read_student_config(int8_dir)["name"],
        fp32_top1=check.fp32_top1,
        int8_top1=check.int8_top1,
        drop=check.drop,
        agreement=check.agreement,
        fp32_bytes=check.fp32_bytes,
        int8_bytes=check.int8_bytes,
        num_test=check.num_test,
        calibration_images=min(opts.calibration_images, len(dataset.train.x)),
    )
    record.write(out)
    return record


def read_quantized(folders: list[str | Path]) -> dict[int, tuple[QuantizationRecord, Path]]:
    """Student number -> (its quantization record, its int8 student folder) from the quantize step's
    artifacts (the folder exists only for an enabled record)."""
    out = {}
    for folder in folders:
        record = QuantizationRecord.read(folder)
        out[record.student] = (record, Path(folder) / QuantizationRecord.INT8_DIR)
    return out


# -- measure ----------------------------------------------------------------------------------------
def int8_verdict(
    q: QuantizationRecord,
    fp32: StudentMeasurement | None,
    int8: StudentMeasurement | None,
    options: MeasurementOptions | None = None,
) -> Int8Verdict:
    """Whether ``q``'s int8 version ships: within its drop limit AND measurably faster at batch 1 than its
    fp32 version, both measured on the same machine (`bockd.platform.serving_benchmark.measurably_faster`).
    Without measurements (measurement off) it does not ship."""
    from bockd.platform.serving_benchmark import measurably_faster

    opts = options or MeasurementOptions()
    common = {"student": q.student, "label": q.label, "drop": q.drop, "max_drop": q.max_drop}
    if not q.enabled:
        return Int8Verdict(
            **common, outcome="off", shipped=False, faster=None, speedup=None, reason="quantization off"
        )
    drop = f"{q.drop_verdict} points of top-1 (fp32 {q.fp32_top1:.2f} %, int8 {q.int8_top1:.2f} %)"
    b1 = (fp32.at(1) if fp32 else None), (int8.at(1) if int8 else None)
    if b1[0] is None or b1[1] is None:
        outcome = "drop" if not q.passed else "not measured"
        why = "not measured through the model server: an int8 version ships only when measurably faster"
        return Int8Verdict(
            **common, outcome=outcome, shipped=False, faster=None, speedup=None, reason=f"{drop}; {why}"
        )
    faster, why = measurably_faster(
        b1[1].samples_ms, b1[0].samples_ms, confidence=opts.confidence, min_speedup=opts.min_speedup
    )
    outcome = "drop" if not q.passed else ("kept" if faster else "not faster")
    return Int8Verdict(
        **common,
        outcome=outcome,
        shipped=outcome == "kept",
        faster=faster,
        speedup=b1[0].p50_ms / b1[1].p50_ms,
        reason=f"{drop}; {why}",
    )


def int8_verdicts(
    quantizations: list[QuantizationRecord] | None, measurements: MeasurementsRecord | None
) -> dict[int, Int8Verdict]:
    """Student -> its int8 verdict: the measure step's, else (no measurements) judged unmeasured."""
    out = {}
    for q in quantizations or []:
        found = measurements.verdict(q.student) if measurements else None
        out[q.student] = found or int8_verdict(q, None, None)
    return out


def measure(
    data_dir: str | Path,
    model_dir: str | Path,
    quantized_dirs: list[str | Path],
    options: dict[str, Any] | None,
    out_dir: str | Path,
    *,
    tracking_uri: str = "",
    run_id: str = "",
) -> MeasurementsRecord:
    """Every student, fp32 and int8 (passed its drop limit or not), through the real model server on this
    machine, one student at a time, its two precisions together with their requests taking turns
    (`bockd.platform.serving_benchmark.measure_interleaved`) so that both see the machine in the same
    state; then each int8 version's verdict. Requests carry the test images. The record (with the machine
    as read before the first server started) goes to ``out_dir/measurements.json`` and, with
    ``tracking_uri`` and ``run_id``, to the MLflow run (metrics ``served/s<k>/<precision>/b<B>/...`` and
    the artifact ``measurements.json``).
    """
    from bockd.platform.serving_benchmark import MachineInfo, measure_interleaved

    opts = MeasurementOptions.from_mapping(options)
    quantized = read_quantized(quantized_dirs)
    measurements: list[StudentMeasurement] = []
    machine: MachineInfo | None = None
    if opts.enabled:
        images = ImageDataset.load(data_dir).test.x
        for k in exported_students(model_dir):
            folders: list[tuple[Precision, Path]] = [("fp32", student_dir(model_dir, k))]
            if k in quantized and quantized[k][0].enabled:
                folders.append(("int8", quantized[k][1]))
            # A student's precisions together, their requests taking turns: the same machine state for both.
            served = measure_interleaved(
                [folder for _, folder in folders],
                images,
                batch_sizes=opts.batch_sizes,
                requests={b: opts.requests_at(b) for b in opts.batch_sizes},
                warmup=opts.warmup,
                threads=opts.threads,
            )
            machine = machine or served[0].machine
            for (precision, _), m in zip(folders, served, strict=True):
                measurements.append(
                    StudentMeasurement(
                        student=k,
                        label=f"S{k}",
                        precision=precision,
                        student_name=m.student_name,
                        size_bytes=m.size_bytes,
                        threads=m.threads,
                        timings=m.timings,
                    )
                )
                p50 = [(t.batch, round(t.p50_ms, 3)) for t in m.timings]
                log.info("S%d %s measured: (batch, served p50 ms) %s", k, precision, p50)
    found = {(m.student, m.precision): m for m in measurements}
    verdicts = [
        int8_verdict(q, found.get((k, "fp32")), found.get((k, "int8")), opts)
        for k, (q, _) in sorted(quantized.items())
    ]
    record = MeasurementsRecord(
        enabled=opts.enabled,
        options=opts.model_dump(mode="json"),
        machine=machine,
        measurements=measurements,
        int8=verdicts,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record.write(out)
    if tracking_uri and run_id:
        _log_measurements(tracking_uri, run_id, record)
    return record


def _log_measurements(tracking_uri: str, run_id: str, record: MeasurementsRecord) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    metrics = []
    for m in record.measurements:
        key = f"served/s{m.student}/{m.precision}"
        metrics.append(Metric(f"{key}/size_bytes", float(m.size_bytes), 0, 0))
        for t in m.timings:
            for name, value in (
                ("p50_ms", t.p50_ms),
                ("p99_ms", t.p99_ms),
                ("images_per_s", t.images_per_s),
                ("raw_forward_ms", t.raw_forward_ms),
            ):
                metrics.append(Metric(f"{key}/b{t.batch}/{name}", float(value), 0, 0))
    for v in record.int8:
        if v.outcome != "off":
            metrics.append(Metric(f"int8/s{v.student}/shipped", float(v.shipped), 0, 0))
        if v.speedup is not None:
            metrics.append(Metric(f"int8/s{v.student}/speedup", v.speedup, 0, 0))
    mlflow = MlflowClient(tracking_uri)
    if metrics:
        mlflow.log_batch(run_id, metrics=metrics)
    mlflow.log_dict(run_id, record.model_dump(mode="json"), MeasurementsRecord.FILENAME)


# -- cascade ----------------------------------------------------------------------------------------
COST_BATCH = 32  # stage costs: the raw forward per image at this batch size (one of the measure step's)
NO_VALIDATION_SPLIT = "no validation split (set data.val_fraction)"


@dataclass(frozen=True)
class CascadeVariant:
    """The variant a chosen student runs as in the cascade, and why that precision."""

    student: int
    precision: Precision
    folder: Path
    reason: str


def cascade_variants(
    students: list[int],
    model_dir: str | Path,
    quantized: dict[int, tuple[QuantizationRecord, Path]],
    verdicts: dict[int, Int8Verdict],
) -> list[CascadeVariant]:
    """Each of ``students`` (in their order) at the precision it ships at: its int8 version when its verdict
    shipped it (within its drop limit AND measurably faster than fp32: the rule selection applies,
    `int8_verdict`), else the exported fp32 student."""
    out = []
    for k in students:
        verdict = verdicts.get(k)
        if verdict is not None and verdict.shipped and k in quantized:
            out.append(CascadeVariant(k, "int8", quantized[k][1], f"int8 {verdict.summary}"))
            continue
        why = "no int8 version" if verdict is None or verdict.outcome == "off" else f"int8 {verdict.summary}"
        out.append(CascadeVariant(k, "fp32", student_dir(model_dir, k), why))
    return out


def cascade_costs(
    variants: list[CascadeVariant],
    measurements: MeasurementsRecord | None,
    images: Any,
    batch: int = COST_BATCH,
) -> tuple[list[float], str]:
    """Each variant's cost per image (ms) and where it comes from.

    The measure step's raw ONNX Runtime forward at ``batch`` images (else the largest batch size every
    variant was measured at), divided by the batch: the model alone, as the cascade runs it inside one
    server. Without measurements (measurement off), each variant's `OnnxStudent.forward_ms` on up to
    ``batch`` of ``images`` (uint8 NHWC), timed on this step's machine.
    """
    measured = [
        measurements.of(v.student, v.precision) if measurements and measurements.enabled else None
        for v in variants
    ]
    if all(m is not None for m in measured):
        found = [m for m in measured if m is not None]
        sizes = set.intersection(*({t.batch for t in m.timings} for m in found))
        if sizes:
            b = batch if batch in sizes else max(sizes)
            costs = [{t.batch: t.raw_forward_ms for t in m.timings}[b] / b for m in found]
            return costs, f"raw ONNX Runtime forward per image at batch {b}, measured by the measure step"
    from bockd.onnx_student import OnnxStudent

    threads = int(measurements.options.get("threads", 1)) if measurements else 1
    sample = images[:batch]
    costs = [OnnxStudent(v.folder, threads=threads).forward_ms(sample) / len(sample) for v in variants]
    return costs, f"raw ONNX Runtime forward per image at batch {len(sample)}, timed by the cascade step"


def _check_trained_on(dataset: ImageDataset, variants: list[CascadeVariant]) -> None:
    """The validation split is held out only if the students were trained on this very dataset."""
    sha = dataset.sha256()
    for v in variants:
        trained_on = (read_student_config(v.folder).get("dataset") or {}).get("sha256")
        if trained_on != sha:
            raise DataError(
                f"dataset: S{v.student} was trained on dataset sha256 {str(trained_on)[:12]}, the prepared "
                f"dataset is {sha[:12]}; the thresholds must be fitted on the validation split that "
                "training held out"
            )


def cheaper(cost_ms: float, reference_ms: float) -> bool:
    """Whether ``cost_ms`` is below ``reference_ms`` by more than floating-point rounding (the expected cost
    of "S1 answers everything" is a mean of S1's own cost, which may round a hair below it)."""
    return cost_ms < reference_ms * (1 - 1e-9)


def cascade_verdict(fit: CascadeFitSummary, test: dict[str, Any], reference: str) -> str:
    """One line: whether the cascade is cheaper than the largest chosen student alone on the test split,
    at what change of top-1, or why not."""
    delta = test["top1"] - test["reference_top1"]
    cost, ref = test["cost_ms"], test["reference_cost_ms"]
    if cheaper(cost, ref):
        return (
            f"cheaper than {reference} alone at {delta:+.2f} points of test top-1 "
            f"({cost:.3g} vs {ref:.3g} ms per image, {100 * (1 - cost / ref):.0f} % less)"
        )
    if not fit.reached:
        return (
            f"not cheaper: the target {fit.target_top1:.2f} % was out of reach on the validation split; "
            f"{reference} answers alone"
        )
    if all(t > 1.0 for t in fit.thresholds):
        return (
            f"not cheaper: the fit kept {reference} alone (no smaller student pays for itself at the "
            f"target {fit.target_top1:.2f} %)"
        )
    return f"not cheaper on the test split: {cost:.3g} vs {ref:.3g} ms per image for {reference} alone"


def cascade(
    data_dir: str | Path,
    model_dir: str | Path,
    quantized_dirs: list[str | Path],
    measurements: MeasurementsRecord | None,
    options: dict[str, Any] | None,
    out_dir: str | Path,
    *,
    tracking_uri: str = "",
    run_id: str = "",
) -> CascadeRecord:
    """The confidence cascade of the chosen students (`bockd.cascade`), fitted and scored.

    Each chosen student (``cascade.students``, default the smallest, middle and largest) runs at the
    precision it ships at (`cascade_variants`) and costs what `cascade_costs` says. The thresholds are
    fitted on the prepared dataset's validation split ONLY (`bockd.cascade.build_cascade`: the target is
    ``target_top1`` or the largest chosen student's validation top-1 minus ``max_drop``), then the
    cascade, each student alone and the largest alone are scored on the test split
    (`bockd.cascade.evaluate_cascade`). ``out_dir`` gets the servable folder in ``cascade/`` and the
    record, also returned and, with ``tracking_uri`` and ``run_id``, logged to the MLflow run (metrics
    ``cascade/...`` and the artifact ``cascade-result.json``).

    Skipped (the record says why, the pipeline goes on) with ``enabled: false`` or when the prepared
    dataset has no validation split. Raises ConfigError for bad options or students outside the family,
    DataError when the students were not trained on the prepared dataset (their validation split would
    not be held out).
    """
    from bockd.cascade import build_cascade, evaluate_cascade, read_cascade
    from bockd.onnx_student import OnnxStudent, softmax

    opts = CascadeOptions.from_mapping(options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = ImageDataset.load(data_dir) if opts.enabled else None
    if dataset is None or dataset.val is None:
        reason = NO_VALIDATION_SPLIT if opts.enabled else "cascade off (cascade.enabled: false)"
        record = CascadeRecord(status="skipped", reason=reason, verdict=f"skipped: {reason}")
        log.info("cascade %s", record.verdict)
        record.write(out)
        if tracking_uri and run_id:
            _log_cascade(tracking_uri, run_id, record)
        return record

    chosen = opts.students_of(max(exported_students(model_dir)))
    quantized = read_quantized(quantized_dirs)
    verdicts = int8_verdicts([q for q, _ in quantized.values()], measurements)
    variants = cascade_variants(chosen, model_dir, quantized, verdicts)
    _check_trained_on(dataset, variants)
    costs, basis = cascade_costs(variants, measurements, dataset.val.x)
    folder = out / CascadeRecord.CASCADE_DIR
    fit = build_cascade(
        [v.folder for v in variants],
        folder,
        dataset.val.x,
        dataset.val.y,
        costs,
        target_top1=opts.target_top1,
        max_drop=opts.max_drop,
    )
    built = read_cascade(folder)  # scored as served: the folder's own copies of the students
    probs = [softmax(OnnxStudent(stage.folder).logits(dataset.test.x)) for stage in built.stages]
    test = evaluate_cascade(probs, dataset.test.y, fit.thresholds, costs)
    summary = CascadeFitSummary(**fit.to_dict())
    stages = [
        CascadeStageResult(
            student=v.student,
            label=stage.label,
            precision=v.precision,
            precision_reason=v.reason,
            student_name=stage.name,
            params=stage.params,
            cost_ms=cost,
            threshold=fit.thresholds[i] if i < len(fit.thresholds) else None,
            val_exit_fraction=fit.exit_fractions[i],
            test_exit_fraction=test["exit_fractions"][i],
            test_top1=100.0 * float((p.argmax(axis=1) == dataset.test.y).mean()),
        )
        for i, (v, stage, cost, p) in enumerate(zip(variants, built.stages, costs, probs, strict=True))
    ]
    record = CascadeRecord(
        status="fitted",
        verdict=cascade_verdict(summary, test, stages[-1].label),
        stages=stages,
        thresholds=list(fit.thresholds),
        cost_basis=basis,
        max_drop=None if opts.target_top1 is not None else opts.max_drop,
        fit=summary,
        test_top1=test["top1"],
        test_cost_ms=test["cost_ms"],
        test_exit_fractions=test["exit_fractions"],
        reference_top1=test["reference_top1"],
        reference_cost_ms=test["reference_cost_ms"],
        cheaper=cheaper(test["cost_ms"], test["reference_cost_ms"]),
        num_test=test["num_images"],
        test_set=dataset.sha256(),
    )
    log.info("cascade %s: %s", record.order, record.verdict)
    record.write(out)
    if tracking_uri and run_id:
        _log_cascade(tracking_uri, run_id, record)
    return record


def _log_cascade(tracking_uri: str, run_id: str, record: CascadeRecord) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    values = {"cascade/fitted": float(record.fitted)}
    if record.fitted and record.fit is not None:
        values |= {
            "cascade/val_top1": record.fit.val_top1,
            "cascade/target_top1": record.fit.target_top1,
            "cascade/val_expected_cost_ms": record.fit.expected_cost_ms,
            "cascade/test_top1": float(record.test_top1 or 0.0),
            "cascade/test_cost_ms": float(record.test_cost_ms or 0.0),
            "cascade/reference_top1": float(record.reference_top1 or 0.0),
            "cascade/reference_cost_ms": float(record.reference_cost_ms or 0.0),
            "cascade/cheaper": float(record.cheaper),
        }
        for stage in record.stages:
            key = f"cascade/s{stage.student}"
            values |= {f"{key}/cost_ms": stage.cost_ms, f"{key}/test_exit_fraction": stage.test_exit_fraction}
            if stage.threshold is not None:
                values[f"{key}/threshold"] = stage.threshold
    mlflow = MlflowClient(tracking_uri)
    mlflow.log_batch(run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in values.items()])
    mlflow.log_dict(run_id, record.model_dump(mode="json"), CascadeRecord.FILENAME)


# -- register ---------------------------------------------------------------------------------------
def register(
    model_dir: str | Path,
    evaluations: list[EvaluationRecord],
    baselines: list[BaselineRecord],
    *,
    tracking_uri: str,
    run_id: str,
    prefix: str,
    quantized_dirs: list[str | Path] | None = None,
    measurements: MeasurementsRecord | None = None,
) -> list[Registration]:
    """One registered model version per student (idempotent per run), tagged with its scores; beside it,
    in the same registered model, the student's int8 version when it passed its accuracy-drop limit
    (tag ``precision`` = ``int8``; its ``top1`` is the int8 one, with ``fp32_top1``, ``drop``,
    ``max_drop`` and the measured verdict). Versions carry the served p50 at batch 1 where measured."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from bockd.platform.model_registry import register_student

    mlflow = MlflowClient(tracking_uri)
    base = baseline_top1(baselines)
    quantized = read_quantized(list(quantized_dirs or []))
    out = []
    metrics = []

    def served(k: int, precision: str) -> dict[str, str]:
        m = measurements.of(k, precision) if measurements else None
        return {"served_p50_ms": f"{m.p50_ms:.4f}"} if m and m.p50_ms is not None else {}

    for ev in sorted(evaluations, key=lambda e: e.student):
        k = ev.student
        dataset = ev.config["dataset"]["name"]
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
        tags |= served(k, "fp32")
        reg = register_student(
            mlflow, run_id, student_dir(model_dir, k), prefix=prefix, dataset=dataset, tags=tags
        )
        out.append(
            Registration(student=k, registered_model=reg.name, version=reg.version, created=reg.created)
        )
        for key in ("top1", "top5", "flops", "params"):
            metrics.append(Metric(f"eval/s{k}/{key}", float(getattr(ev, key)), 0, 0))
        if k in base:
            metrics.append(Metric(f"eval/s{k}/baseline_top1", base[k], 0, 0))
        q, int8_dir = quantized.get(k, (None, None))
        if q is None or not q.enabled:
            continue
        metrics.append(Metric(f"eval/s{k}/int8_top1", float(q.int8_top1 or 0.0), 0, 0))
        metrics.append(Metric(f"eval/s{k}/int8_drop", float(q.drop or 0.0), 0, 0))
        if not q.passed:
            continue  # over its accuracy-drop limit: never registered
        verdict = measurements.verdict(k) if measurements else None
        int8_tags = {
            "top1": f"{q.int8_top1:.4f}",
            "fp32_top1": f"{q.fp32_top1:.4f}",
            "drop": f"{q.drop:.4f}",
            "max_drop": f"{q.max_drop:.4f}",
            "agreement": f"{q.agreement:.4f}",
            "test_set": ev.test_set,
            **served(k, "int8"),
        }
        if verdict is not None:
            int8_tags["int8_verdict"] = verdict.summary
        reg = register_student(mlflow, run_id, int8_dir, prefix=prefix, dataset=dataset, tags=int8_tags)
        out.append(
            Registration(
                student=k,
                registered_model=reg.name,
                version=reg.version,
                created=reg.created,
                precision="int8",
            )
        )
    mlflow.log_batch(run_id, metrics=metrics)
    return out


def register_cascade(
    cascade_dir: str | Path, *, tracking_uri: str, run_id: str, prefix: str
) -> CascadeRegistration | None:
    """The fitted cascade (the cascade step's artifact) as a version of its own registered model
    ``{prefix}-{dataset}-{arch}-cascade`` (`bockd.platform.model_registry.register_cascade`: idempotent per
    run, tagged ``kind=cascade``, its test top-1 and costs against the largest student alone); None when
    the cascade was skipped."""
    from mlflow import MlflowClient

    from bockd.platform.model_registry import register_cascade as register_folder

    record = CascadeRecord.read(cascade_dir)
    if not record.fitted:
        return None
    folder = Path(cascade_dir) / CascadeRecord.CASCADE_DIR
    first = read_student_config(folder / record.stages[0].label)
    tags = {
        "top1": f"{record.test_top1:.4f}",
        "expected_cost_ms": f"{record.test_cost_ms:.6g}",
        "reference_top1": f"{record.reference_top1:.4f}",
        "reference_cost_ms": f"{record.reference_cost_ms:.6g}",
        "cheaper": str(record.cheaper).lower(),
        "test_set": record.test_set,
    }
    if record.fit is not None:
        tags |= {"val_top1": f"{record.fit.val_top1:.4f}", "target_top1": f"{record.fit.target_top1:.4f}"}
    reg = register_folder(
        MlflowClient(tracking_uri),
        run_id,
        folder,
        prefix=prefix,
        dataset=first["dataset"]["name"],
        tags=tags,
    )
    return CascadeRegistration(registered_model=reg.name, version=reg.version, created=reg.created)


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
    quantizations: list[QuantizationRecord] | None = None,
    measurements: MeasurementsRecord | None = None,
) -> list[Candidate]:
    """The selection engine's candidates (0-based ``index``): every student at fp32 and, where quantization
    ran, at int8 (same params and size %, its own top-1 and latency), in student order.

    Latency: the p50 of one image served by the model server (batch 1) when ``measurements`` has it, else
    the evaluate step's in-process forward p50. An int8 candidate is excluded (it may not ship whatever the
    policy says) unless its verdict (`int8_verdict`) is "kept": within its drop limit and measurably
    faster than its fp32 version.
    """
    base = baseline_top1(baselines)
    champions = champions or {}
    quantized = {q.student: q for q in quantizations or [] if q.enabled}
    verdicts = int8_verdicts(quantizations, measurements)
    out = []
    for ev in sorted(evaluations, key=lambda e: e.student):
        k = ev.student
        fp32 = measurements.of(k, "fp32") if measurements else None
        common = {
            "index": k - 1,
            "params": ev.params,
            "size_pct": ev.size_pct,
            "baseline_top1": base.get(k),
            "champion_top1": champions.get(k),
        }
        out.append(
            Candidate(
                name=ev.student_name,
                top1=ev.top1,
                latency_ms=fp32.p50_ms if fp32 else ev.latency_p50_ms,
                latency_basis="served p50" if fp32 else "forward p50",
                **common,
            )
        )
        q = quantized.get(k)
        if q is None:
            continue
        int8 = measurements.of(k, "int8") if measurements else None
        verdict = verdicts[k]
        out.append(
            Candidate(
                name=q.int8_name or f"{ev.student_name}-int8",
                top1=float(q.int8_top1 or 0.0),
                latency_ms=int8.p50_ms if int8 else None,
                latency_basis="served p50",
                precision="int8",
                excluded=None if verdict.shipped else f"int8 not shipped: {verdict.reason}",
                **common,
            )
        )
    return out


def select_students(
    evaluations: list[EvaluationRecord],
    baselines: list[BaselineRecord],
    registrations: list[Registration],
    policy: dict[str, Any] | None,
    *,
    quantizations: list[QuantizationRecord] | None = None,
    measurements: MeasurementsRecord | None = None,
    tracking_uri: str = "",
    run_id: str = "",
) -> SelectionRecord:
    """Apply the selection policy; the chosen students become ``@champion`` where they beat it.

    A student is chosen when one of its precisions is; when both are, its int8 version is deployed (it
    passed the drop limit and is measurably faster: the point of having it). Each student is compared
    with its own registered model's champion, and only when both were scored on the same test set
    (promotion rules in :func:`bockd.platform.model_registry.promote_champion`); the version promoted is
    the deployed precision's.
    """
    rules = Policy.from_mapping(policy)
    versions = {(r.student, r.precision): r for r in registrations}
    scored = {e.student: e for e in evaluations}
    mlflow = None
    champions: dict[int, float | None] = {}
    if tracking_uri:
        from mlflow import MlflowClient

        mlflow = MlflowClient(tracking_uri)
        champions = {
            k: _champion_top1(mlflow, r.registered_model, scored[k].test_set)
            for (k, precision), r in versions.items()
            if precision == "fp32"
        }
    pool = candidates(evaluations, baselines, champions, quantizations, measurements)
    selection = select(pool, rules)
    chosen = sorted({c.index + 1 for c in selection.chosen})
    int8_chosen = {c.index + 1 for c in selection.chosen if c.precision == "int8"}
    picks = [Pick(student=k, precision="int8" if k in int8_chosen else "fp32") for k in chosen]
    top1 = {(c.index + 1, c.precision): c.top1 for c in pool}
    promotions = []
    if mlflow is not None:
        from bockd.platform.model_registry import promote_champion

        for pick in picks:
            k = pick.student
            reg, ev = versions[k, pick.precision], scored[k]
            moved, message = promote_champion(
                mlflow,
                reg.registered_model,
                reg.version,
                top1=top1[k, pick.precision],
                test_set=ev.test_set,
                run_id=run_id,
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
        picks=picks,
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
    quantizations: list[QuantizationRecord] | None = None,
    measurements: MeasurementsRecord | None = None,
    cascade: CascadeRecord | None = None,
    cascade_registration: CascadeRegistration | None = None,
    tracking_uri: str = "",
    run_id: str = "",
    pipeline_run_id: str = "",
) -> list[SummaryRow]:
    """Write the HTML report (and log it to the MLflow run); returns the per-student summary rows.

    ``evaluation_dirs``: the evaluate step's output folders (record and confusion matrix of one student).
    With ``measurements``, the report shows accuracy against the measured served latency with its Pareto
    front, and the measured table with every int8 verdict; with ``cascade`` (the cascade step's record)
    a section on the cascade (or why it was skipped) and its registered version."""
    from bockd.pipeline.report import render_report, summary_rows, write_report

    model_dir = Path(model_dir)
    evaluations = read_records(EvaluationRecord, evaluation_dirs)
    card = json.loads((model_dir / MODEL_CONFIG).read_text())
    history = json.loads((model_dir / HISTORY).read_text())
    verdicts = int8_verdicts(quantizations, measurements)
    rows = summary_rows(
        evaluations,
        baseline_top1(baselines),
        registrations,
        selection.chosen,
        picks={p.student: p.precision for p in selection.picks},
        quantizations=quantizations,
        measurements=measurements,
        verdicts=verdicts,
    )
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
        evaluations=evaluations,
        quantizations=quantizations or [],
        measurements=measurements,
        verdicts=verdicts,
        cascade=cascade,
        cascade_registration=cascade_registration,
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
# What a pipeline may set about each InferenceService (DeploySpec fields, bockd.platform.inference_service),
# how long to wait, and ``cascade``: whether the fitted cascade is deployed too.
CLUSTER_DEPLOY_OPTIONS = (
    "service_account", "runtime", "backend", "min_replicas", "max_replicas", "scale_metric", "scale_target",
    "canary_traffic_percent", "deployment_mode", "timeout_s", "poll_s", "cascade",
)  # fmt: skip
_NOT_SPEC_OPTIONS = ("timeout_s", "poll_s", "cascade")  # deploy_options keys that are no DeploySpec field


def check_deploy_option_keys(options: dict[str, Any]) -> None:
    """``deploy_options`` may hold only `CLUSTER_DEPLOY_OPTIONS`; ``cascade`` is a boolean."""
    unknown = sorted(set(options) - set(CLUSTER_DEPLOY_OPTIONS))
    if unknown:
        raise ConfigError(
            f"deploy_options: unknown keys {unknown}; expected some of {', '.join(CLUSTER_DEPLOY_OPTIONS)}"
        )
    if not isinstance(options.get("cascade", False), bool):
        raise ConfigError(f"deploy_options.cascade: expected true or false, got {options['cascade']!r}")


def deploy_spec_options(options: dict[str, Any]) -> dict[str, Any]:
    """The ``deploy_options`` that are `DeploySpec` fields."""
    return {k: v for k, v in options.items() if k not in _NOT_SPEC_OPTIONS}


@dataclass(frozen=True)
class ClusterTarget:
    """Where the deploy step serves on a cluster and where it finds the registered files (pipeline
    parameters of their own, kept apart from the user's ``deploy_options``)."""

    namespace: str  # "" = the namespace of the step's own pod
    tracking_uri: str  # the MLflow server the versions are registered in
    artifacts_destination: str  # its --artifacts-destination: where mlflow-artifacts:/ paths are in S3


def _deploy_cluster(
    models: list[tuple[str, str]], target: ClusterTarget, options: dict[str, Any]
) -> list[str]:
    """One InferenceService per (registered model, version), rolled out in turn; their URLs."""
    from mlflow import MlflowClient

    from bockd.platform.inference_service import DeploySpec, InferenceServiceApi, deploy_inference_service
    from bockd.platform.kube.client import pod_namespace
    from bockd.platform.model_registry import storage_uri

    check_deploy_option_keys(options)
    spec_options = deploy_spec_options(options)
    timeout, poll = float(options.get("timeout_s", 600)), float(options.get("poll_s", 5))
    namespace = pod_namespace(target.namespace, "serving_namespace")
    mlflow = MlflowClient(target.tracking_uri)
    api = InferenceServiceApi.from_config()
    urls = []
    for name, version in models:
        uri = storage_uri(mlflow, name, version, target.artifacts_destination)
        spec = DeploySpec.for_model(name, namespace, uri, **spec_options)
        urls.append(deploy_inference_service(api, spec, version, timeout_s=timeout, poll_s=poll).url)
    return urls


def _serve_locally(folder: Path, name: str, version: str, root: Path) -> str:
    """A KServe model server for ``folder`` on 127.0.0.1, served as ``name``; its URL. The new server is
    started and health-checked before the one serving an older version of ``name`` is stopped."""
    from bockd.platform.services.model_servers import start_local_server, stop_local_server

    # One state folder per model version: the served model name stays the registered name.
    state = root / f"{name}-v{version}"
    local = start_local_server([folder], name, state)
    for old in root.glob(f"{name}-v*"):
        if old != state and old.is_dir():
            stop_local_server(old, name)
            shutil.rmtree(old, ignore_errors=True)
    return local.url


def _endpoint(reg: Registration, url: str) -> Endpoint:
    return Endpoint(
        student=reg.student,
        registered_model=reg.registered_model,
        version=reg.version,
        url=url,
        precision=reg.precision,
    )


def deploy(
    model_dir: str | Path,
    chosen: list[int],
    registrations: list[Registration],
    *,
    mode: str,
    serving_dir: str | Path = "",
    cluster: ClusterTarget | None = None,
    deploy_options: dict[str, Any] | None = None,
    picks: dict[int, Precision] | None = None,
    int8_dirs: dict[int, Path] | None = None,
) -> list[Endpoint]:
    """Serve each chosen student (1-based numbers) at its picked precision; returns where each answers.

    ``picks``: student -> ``"fp32"`` (the default) or ``"int8"`` (the select step's `Pick`s); an int8
    student is served from ``int8_dirs[student]`` (locally) or its registered int8 version (cluster), on
    ONNX Runtime: it has no PyTorch weights, so ``deploy_options.backend: torch`` is refused for it.

    ``local``: one KServe model server per student on 127.0.0.1 (the quick start). The new server is
    started and health-checked before the one serving an older version of that model is stopped, so a
    failed deploy leaves the previous version serving.
    ``cluster``: one InferenceService per student on our ServingRuntime, its ``storageUri`` the registered
    version's files; a new version rolls out as a canary, is promoted once ready, and is rolled back on
    failure so the previous version keeps serving (:mod:`bockd.platform.inference_service`).
    The cascade (``deploy_options.cascade``) is `deploy_cascade`'s.
    """
    if mode not in DEPLOY_MODES:
        raise ConfigError(f"deploy_mode: expected one of {', '.join(DEPLOY_MODES)}, got {mode!r}")
    if mode == "none" or not chosen:
        return []
    versions = {(r.student, r.precision): r for r in registrations}
    targets: list[tuple[int, Precision]] = [(k, (picks or {}).get(k, "fp32")) for k in chosen]

    def check_targets() -> None:
        for k, precision in targets:
            if (k, precision) not in versions:
                raise ConfigError(f"deploy: S{k} ({precision}) was chosen but has no registered version")
            if precision == "int8" and (deploy_options or {}).get("backend") == "torch":
                raise ConfigError(
                    f"deploy_options.backend: S{k} is deployed as int8, which only ONNX Runtime serves; "
                    "use backend onnx"
                )

    if mode == "cluster":
        if cluster is None:
            raise ConfigError("deploy_mode: 'cluster' needs the serving namespace and the MLflow server")
        check_targets()
        regs = [versions[t] for t in targets]
        urls = _deploy_cluster([(r.registered_model, r.version) for r in regs], cluster, deploy_options or {})
        return [_endpoint(r, url) for r, url in zip(regs, urls, strict=True)]
    if not serving_dir:
        raise ConfigError("local_serving_dir: local deployment needs a folder for the servers' state")
    check_targets()
    endpoints = []
    for k, precision in targets:
        reg = versions[k, precision]
        folder = (int8_dirs or {}).get(k) if precision == "int8" else student_dir(model_dir, k)
        if folder is None:
            raise ConfigError(f"deploy: S{k} is deployed as int8 but its int8 folder was not given")
        url = _serve_locally(folder, reg.registered_model, reg.version, Path(serving_dir))
        endpoints.append(_endpoint(reg, url))
    return endpoints


def deploy_cascade(
    cascade_dir: str | Path,
    registration: CascadeRegistration | None,
    *,
    mode: str,
    serving_dir: str | Path = "",
    cluster: ClusterTarget | None = None,
    deploy_options: dict[str, Any] | None = None,
) -> CascadeEndpoint | None:
    """Serve the fitted cascade (the cascade step's artifact) as one endpoint when
    ``deploy_options.cascade`` is true (else, or with mode ``none``, nothing: None).

    The paths are `deploy`'s: ``local`` serves the cascade folder with a local model server named after
    its registered model (`bockd.serving` recognizes the folder by its ``cascade.json``); ``cluster`` makes
    one InferenceService (one predictor on the same runtime holding the chosen students, its
    ``storageUri`` the registered cascade version's files) with the same canary, promotion and rollback.
    Raises ConfigError when the cascade was skipped (naming why), has no registered version, or
    ``deploy_options.backend`` is torch (a cascade serves its students' ONNX only).
    """
    if mode not in DEPLOY_MODES:
        raise ConfigError(f"deploy_mode: expected one of {', '.join(DEPLOY_MODES)}, got {mode!r}")
    options = deploy_options or {}
    if mode == "none":
        return None
    check_deploy_option_keys(options)
    if not options.get("cascade"):
        return None
    record = CascadeRecord.read(cascade_dir)
    if not record.fitted:
        raise ConfigError(
            f"deploy_options.cascade: the cascade was skipped ({record.reason}), so there is none to "
            "deploy; fit one (cascade.enabled, data.val_fraction > 0) or leave deploy_options.cascade out"
        )
    if registration is None:
        raise ConfigError("deploy: the cascade was fitted but has no registered version")
    if options.get("backend") == "torch":
        raise ConfigError(
            "deploy_options.backend: a cascade serves its students' model.onnx, which only ONNX Runtime "
            "runs; use backend onnx"
        )
    name, version = registration.registered_model, registration.version
    if mode == "cluster":
        if cluster is None:
            raise ConfigError("deploy_mode: 'cluster' needs the serving namespace and the MLflow server")
        (url,) = _deploy_cluster([(name, version)], cluster, options)
    elif not serving_dir:
        raise ConfigError("local_serving_dir: local deployment needs a folder for the servers' state")
    else:
        folder = Path(cascade_dir) / CascadeRecord.CASCADE_DIR
        url = _serve_locally(folder, name, version, Path(serving_dir))
    return CascadeEndpoint(
        registered_model=name, version=version, url=url, labels=[s.label for s in record.stages]
    )
