"""The whole pipeline on digits under kfp.local, against the real SeaweedFS and MLflow servers and a real
KServe model server: `bockd pipeline run --local` exactly as a user runs it (shorter schedule)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from numerics import probability_tolerance, reduction_length

from bockd.cli import main
from bockd.data import ImageDataset
from bockd.export import load_student, read_student_config
from bockd.onnx_student import OnnxStudent, softmax
from bockd.pipeline import steps
from bockd.pipeline.local import _follow, failure_message
from bockd.pipeline.records import (
    BaselineRecord,
    CascadeRecord,
    Endpoints,
    EvaluationRecord,
    MeasurementsRecord,
    QuantizationRecord,
    Registrations,
    Summary,
    read_records,
)
from bockd.pipeline.summary import cascade_lines
from bockd.platform.s3 import client as s3_client
from bockd.platform.services import ServicesInfo
from bockd.platform.services.model_servers import stop_all_local_servers
from bockd.serving.client import predict_v1

pytestmark = pytest.mark.slow

# Two students, S2's baseline only: every behaviour below (a student with and one without a baseline, the
# size-limited selection, the served student) at the cost of the fewest kfp tasks.
STUDENTS = 2
ARGV = [
    "--epochs", "2", "--num-students", str(STUDENTS), "--baselines", "2",
    "--policy", "{max_size_pct: 50, best_only: true}", "--model-prefix", "e2e",
    "--measurement", "{requests: 15, batch_requests: 3}",
]  # fmt: skip


@pytest.fixture(scope="module")
def local_run(
    services_session: ServicesInfo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """The run, against the session's services (`up` finds them healthy in their state folder and starts
    nothing); the model servers it deployed are stopped after the module."""
    state = services_session.state_dir
    saved = dict(os.environ)
    out = tmp_path_factory.mktemp("stdout") / "out.txt"
    try:
        with open(out, "w") as f, contextlib.redirect_stdout(f):
            code = main(["pipeline", "run", "--local", "--state-dir", str(state), *ARGV])
        run_dir = next((state / "runs").iterdir())
        yield {
            "code": code,
            "state": state,
            "stdout": out.read_text(),
            "run_dir": run_dir,
            "outputs": json.loads((run_dir / "result.json").read_text()),
        }
    finally:
        stop_all_local_servers(state / "serving")
        os.environ.clear()
        os.environ.update(saved)


def test_the_run_succeeds_and_prints_the_summary(local_run: dict[str, Any]) -> None:
    assert local_run["code"] == 0
    text = local_run["stdout"]
    header = (
        "| student | params | size % | top-1 % | baseline top-1 % | gain | p50 ms | int8 | MLflow version "
        "| endpoint |"
    )
    assert header in text
    rows = [line for line in text.splitlines() if line.startswith("| S")]
    assert len(rows) == STUDENTS
    assert "prediction: e2e-digits-resnet20-s" in text
    # The served student classifies the first test images in one request; the tally counts the answers shown.
    images = [line for line in text.splitlines() if line.startswith("  image ")]
    assert len(images) == 8 and all(line.endswith((" right", " wrong")) for line in images)
    right = sum(line.endswith(" right") for line in images)
    assert f"the first 8 test images, {right} right" in text
    assert (local_run["run_dir"] / "report.html").is_file()
    for task in (
        "prepare-data", "train-ensemble", "train-baseline", "evaluate", "quantize", "measure", "cascade",
        "register", "deploy",
    ):  # fmt: skip
        assert f"task {task}" in text


def test_summary_rows_match_registry_tags(local_run: dict[str, Any]) -> None:
    raw = json.loads(Path(local_run["outputs"]["summary"]).read_text())
    assert raw["format"] == "bockd-summary/2"  # the record file names its format
    rows = Summary.read(local_run["outputs"]["summary"]).rows
    mlflow = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert [(r.student, r.label) for r in rows] == [(1, "S1"), (2, "S2")]
    for r in rows:
        assert r.registered_model == f"e2e-digits-resnet20-s{r.student}"
        version = _fp32_version(mlflow, r.registered_model)
        if r.precision != "int8":
            assert version.version == r.version
        assert float(version.tags["top1"]) == pytest.approx(r.top1, abs=1e-3)
        assert version.tags["params"] == str(r.params)
        if r.student == 2:  # the baseline asked for
            assert float(version.tags["baseline_top1"]) == pytest.approx(r.baseline_top1, abs=1e-3)
            assert float(version.tags["gain"]) == pytest.approx(r.top1 - r.baseline_top1, abs=1e-3)
        else:
            assert "baseline_top1" not in version.tags


def _fp32_version(mlflow: MlflowClient, name: str) -> Any:
    (version,) = [
        v for v in mlflow.search_model_versions(f"name = '{name}'") if v.tags["precision"] == "fp32"
    ]
    return version


def test_every_student_is_measured_through_the_server_and_int8_judged(local_run: dict[str, Any]) -> None:
    """Both precisions of both students measured; an int8 version is registered iff it passed its drop
    limit, and shipped only if also measurably faster; the report and MLflow carry the numbers."""
    root = next(local_run["run_dir"].glob("root/*"))
    measured = MeasurementsRecord.read(root / "measure" / "measurements")
    assert [(m.student, m.precision) for m in measured.measurements] == [
        (1, "fp32"), (1, "int8"), (2, "fp32"), (2, "int8"),
    ]  # fmt: skip
    assert all(
        [t.batch for t in m.timings] == [1, 32] and m.at(1).requests == 15 for m in measured.measurements
    )
    quantized = {
        q.student: q
        for q in read_records(QuantizationRecord, sorted(root.glob("for-loop-*/quantize/quantized")))
    }
    assert sorted(quantized) == [1, 2]
    mlflow = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    rows = Summary.read(local_run["outputs"]["summary"]).rows
    for r in rows:
        q, verdict = quantized[r.student], measured.verdict(r.student)
        assert verdict.shipped == (q.passed and bool(verdict.faster))
        assert r.int8_outcome == verdict.summary and r.served_p50_ms == measured.of(r.student).p50_ms
        int8 = [
            v
            for v in mlflow.search_model_versions(f"name = '{r.registered_model}'")
            if v.tags["precision"] == "int8"
        ]
        assert len(int8) == int(q.passed)
        assert r.int8_outcome in local_run["stdout"]
    html = (local_run["run_dir"] / "report.html").read_text()
    assert "Accuracy against measured latency" in html and "S2 int8" in html
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name("bockd").experiment_id])
    assert "measurements.json" in {a.path for a in mlflow.list_artifacts(run.info.run_id)}
    assert mlflow.get_metric_history(run.info.run_id, "served/s2/int8/b1/p50_ms")


def test_the_cascade_is_fitted_on_the_held_out_split_registered_reported_and_served(
    local_run: dict[str, Any],
) -> None:
    """The quick start holds out 10 % of train (the pipeline's default) and fits S2 -> S1 on it; the
    summary shows it in two lines, MLflow holds it as its own model, and its endpoint names who answered."""
    record = CascadeRecord.read(local_run["outputs"]["cascade"])
    dataset = ImageDataset.load(local_run["outputs"]["dataset"])
    assert record.fitted and [s.label for s in record.stages] == ["S2", "S1"]
    assert dataset.val is not None and record.fit.num_val == len(dataset.val.y) > 0
    assert record.num_test == len(dataset.test.y)
    # Costs are the measured raw forwards per image at batch 32 of the variant each stage runs as.
    root = next(local_run["run_dir"].glob("root/*"))
    measured = MeasurementsRecord.read(root / "measure" / "measurements")
    for s in record.stages:
        assert s.cost_ms == pytest.approx(measured.of(s.student, s.precision).at(32).raw_forward_ms / 32)
        assert (s.precision == "int8") == measured.verdict(s.student).shipped
    endpoint = Endpoints.read(local_run["outputs"]["endpoints"]).cascade
    assert endpoint is not None and endpoint.registered_model == "e2e-digits-resnet20-cascade"
    for line in cascade_lines(record, endpoint):
        assert line in local_run["stdout"]
    assert (
        f"prediction: e2e-digits-resnet20-cascade at {endpoint.url}: the first 8 test images"
        in (local_run["stdout"])
    )
    answers = predict_v1(endpoint.url, endpoint.registered_model, list(dataset.test.x[:4]))
    assert {a["student"] for a in answers} <= {"S2", "S1"}
    html = (local_run["run_dir"] / "report.html").read_text()
    assert "<h2>Confidence cascade</h2>" in html and "MLflow: e2e-digits-resnet20-cascade v1" in html
    mlflow = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    (version,) = mlflow.search_model_versions("name = 'e2e-digits-resnet20-cascade'")
    assert (version.version, version.tags["kind"], version.tags["students"]) == ("1", "cascade", "S2,S1")
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name("bockd").experiment_id])
    assert "cascade-result.json" in {a.path for a in mlflow.list_artifacts(run.info.run_id)}


def test_one_mlflow_run_holds_params_epoch_metrics_and_artifacts(local_run: dict[str, Any]) -> None:
    mlflow = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = mlflow.get_experiment_by_name("bockd")
    runs = mlflow.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["kfp.run_id"]
    assert run.data.tags["bockd.dataset"] == "digits"
    assert run.data.params["model.num_students"] == str(STUDENTS)
    for key in ("test/s1/top1", "test/s2/top1", "test/ensemble/top1", "train/s2/kd"):
        assert [m.step for m in mlflow.get_metric_history(run.info.run_id, key)] == [1, 2]
    names = {a.path for a in mlflow.list_artifacts(run.info.run_id)}
    assert {"report.html", "summary.json", "selection.json", "config", "students"} <= names


def test_artifacts_and_checkpoints_are_in_s3(local_run: dict[str, Any]) -> None:
    keys = [o.object_name for o in s3_client().list_objects("bockd", recursive=True)]
    assert any(k.startswith("mlflow/") and k.endswith("students/s1/model.onnx") for k in keys)
    assert any(k.startswith("mlflow/") and k.endswith("students/s2/model.safetensors") for k in keys)
    assert any(k.startswith("mlflow/") and k.endswith("report.html") for k in keys)
    assert any(k.startswith("checkpoints/") and k.endswith("/ensemble/checkpoint.pt") for k in keys)
    assert any(k.startswith("checkpoints/") and k.endswith("/baseline-s2/checkpoint.pt") for k in keys)


def test_selection_champion_and_the_served_student(local_run: dict[str, Any]) -> None:
    rows = Summary.read(local_run["outputs"]["summary"]).rows
    endpoints = Endpoints.read(local_run["outputs"]["endpoints"]).endpoints
    small = [r for r in rows if r.size_pct <= 50]
    best = max(small, key=lambda r: (r.top1, -r.params))
    assert [r.student for r in rows if r.selected] == [best.student]
    assert [e.student for e in endpoints] == [best.student]

    mlflow = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    champion = mlflow.get_model_version_by_alias(best.registered_model, "champion")
    assert champion.version == best.version
    assert "alias.champion.set" in champion.tags
    for r in rows:
        if not r.selected:
            assert "champion" not in mlflow.get_registered_model(r.registered_model).aliases

    # The served student answers with what the exported student (or its int8 version) computes.
    dataset = ImageDataset.load(local_run["outputs"]["dataset"])
    images = list(dataset.test.x[:4])
    answers = predict_v1(endpoints[0].url, endpoints[0].registered_model, images)
    got = np.array([a["probabilities"] for a in answers])
    if endpoints[0].precision == "int8":
        root = next(local_run["run_dir"].glob("root/*"))
        int8_dir = steps.read_quantized(sorted(root.glob("for-loop-*/quantize/quantized")))[best.student][1]
        np.testing.assert_allclose(got, softmax(OnnxStudent(int8_dir).logits(np.stack(images))), atol=1e-4)
        return
    model_dir = next(local_run["run_dir"].glob("root/*/train-ensemble/model"))
    student = steps.student_dir(model_dir, best.student)
    config = read_student_config(student)
    x = torch.as_tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(config["std"]).view(1, -1, 1, 1)
    model = load_student(student)
    with torch.no_grad():
        logits = model((x - mean) / std)
    expected = torch.softmax(logits, dim=1).numpy()
    # The server is another process with its own thread count, hence its own float32 summation order.
    np.testing.assert_allclose(got, expected, atol=probability_tolerance(logits, reduction_length(model)))


def test_register_again_creates_nothing(local_run: dict[str, Any]) -> None:
    """The register step re-run for the same training run returns the existing versions."""
    root = next(local_run["run_dir"].glob("root/*"))
    model_dir = root / "train-ensemble" / "model"
    evaluations = read_records(EvaluationRecord, sorted(root.glob("for-loop-*/evaluate/evaluation")))
    baselines = read_records(BaselineRecord, sorted(root.glob("for-loop-*/train-baseline/model")))
    run_id = (root / "train-ensemble" / "mlflow_run_id").read_text()
    again = steps.register(
        model_dir,
        evaluations,
        baselines,
        tracking_uri=os.environ["MLFLOW_TRACKING_URI"],
        run_id=run_id,
        prefix="e2e",
        quantized_dirs=sorted(root.glob("for-loop-*/quantize/quantized")),
    )
    first = Registrations.read(root / "register" / "registrations").registrations
    assert [r.created for r in again] == [False] * len(first)
    assert [(r.student, r.precision, r.version) for r in again] == [
        (r.student, r.precision, r.version) for r in first
    ]
    assert [r.version for r in again if r.precision == "fp32"] == ["1"] * STUDENTS


# -- a failed task: its own error, not kfp's traceback ------------------------------------------------------

# What kfp.local writes when prepare-data raises (trimmed): colour codes, the task's indented traceback,
# then the runner's own traceback for the pipeline.
KFP_FAILURE_LOG = """\
21:34:37.940 - INFO - Executing task \x1b[96m'prepare-data'\x1b[0m
21:34:37.941 - INFO - Streamed logs:

    [KFP Executor 2026-11-29 21:34:38,153 INFO]: Looking for component `prepare_data`
    Traceback (most recent call last):
      File "/work/main/bockd/data/_util.py", line 19, in existing_path
        raise DataError(f"{what} {str(p)!r} does not exist")
    bockd.errors.DataError: cifar10 path '/nonexistent' does not exist

21:34:51.727 - ERROR - Task \x1b[96m'prepare-data'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m
Traceback (most recent call last):
  File "/work/main/.venv/lib/python3.11/site-packages/kfp/local/pipeline_orchestrator.py", line 184
    raise RuntimeError(msg)
RuntimeError: Pipeline \x1b[95m'bockd'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m.
"""


class _Exited:
    returncode = 1

    def poll(self) -> int:
        return 1


def test_a_failed_task_is_reported_by_its_own_error(tmp_path: Path) -> None:
    log = tmp_path / "pipeline.log"
    log.write_text(KFP_FAILURE_LOG)
    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        failure = _follow(_Exited(), log, f)
    assert out.read_text() == "  task prepare-data     failure\n"
    assert failure == ("prepare-data", "cifar10 path '/nonexistent' does not exist")
    message = failure_message(failure, log, 1)
    assert message == f"task prepare-data failed: cifar10 path '/nonexistent' does not exist\nfull log: {log}"


def test_a_failed_worker_is_reported_by_its_last_error_without_colour(tmp_path: Path) -> None:
    log = tmp_path / "pipeline.log"
    log.write_text(
        KFP_FAILURE_LOG.split("21:34:37.941", 1)[0] + KFP_FAILURE_LOG.split("FAILURE\x1b[0m\n", 1)[1]
    )
    message = failure_message(None, log, 1)
    assert message.startswith("the local pipeline run failed: RuntimeError: Pipeline 'bockd' finished")
    assert "\x1b" not in message and "Traceback" not in message and str(log) in message


def test_a_real_failing_task_prints_its_error_and_the_log(
    local_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through kfp.local (the module's services reused): batches that pass the pre-flight (the files are
    there) but are not pickles fail in prepare-data; the user sees that task's DataError and the log."""
    for name in (
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
    ):
        (tmp_path / name).write_bytes(b"not a pickle")
    argv = ["--dataset", "cifar10", "--data-path", str(tmp_path), "--no-deploy", "--epochs", "1"]
    code = main(["pipeline", "run", "--local", "--state-dir", str(local_run["state"]), *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert (
        f"bockd: error: task prepare-data failed: {tmp_path}/data_batch_1: not a readable CIFAR pickle" in err
    )
    assert "\nfull log: " in err and err.rstrip().endswith("pipeline.log")
    assert "\x1b" not in err and "Traceback" not in err
