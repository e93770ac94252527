"""The cascade step as plain functions, on a tiny real family trained with a validation split held out:
fitted on that split only and scored on the test split, its students at the precision the measured int8
verdicts ship (measurements injected), registered in MLflow, reported, summarised and served locally."""

from __future__ import annotations

import html as html_module
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow import MlflowClient

from bockd.cascade import CASCADE_FILE, NEVER, evaluate_cascade, fit_thresholds, read_cascade, route
from bockd.config import build_config
from bockd.data import ImageDataset
from bockd.errors import ConfigError, DataError
from bockd.onnx_student import OnnxStudent, softmax
from bockd.pipeline import steps
from bockd.pipeline.records import (
    CascadeFitSummary,
    CascadeRecord,
    CascadeRegistration,
    MeasurementsRecord,
    QuantizationRecord,
    StudentMeasurement,
)
from bockd.pipeline.report import cascade_section
from bockd.pipeline.summary import cascade_lines
from bockd.platform.services import ServicesInfo
from bockd.platform.services.model_servers import stop_all_local_servers
from bockd.platform.serving_benchmark import BatchTiming
from bockd.serving.client import predict_v1

pytestmark = pytest.mark.usefixtures("single_thread")

# The drop limit is out of the way: whether an int8 version ships is decided by the injected timings alone.
QUANTIZATION = {"calibration_images": 64, "max_drop": 100}
# Served p50 at batch 1 (ms) and raw forward at batch 32 (ms, the whole batch) the injected measurements
# report: S3's int8 version is twice as fast as fp32 (it ships), S2's is not faster (it does not); S1 has no
# int8 version at all.
P50 = {(1, "fp32"): 2.0, (2, "fp32"): 1.5, (2, "int8"): 1.5, (3, "fp32"): 1.2, (3, "int8"): 0.6}
FORWARD_B32 = {(1, "fp32"): 3.2, (2, "fp32"): 1.6, (2, "int8"): 1.6, (3, "fp32"): 0.64, (3, "int8"): 0.32}
REQUESTS = 12


def _timing(batch: int, p50: float, forward: float) -> BatchTiming:
    samples = list(p50 * (1 + 0.05 * np.linspace(-1, 1, REQUESTS)))  # deterministic +-5 % spread
    return BatchTiming(
        batch=batch, requests=REQUESTS, p50_ms=p50, p99_ms=max(samples), images_per_s=1000 * batch / p50,
        raw_forward_ms=forward, samples_ms=samples,
    )  # fmt: skip


def injected_measurements(quantized: dict[int, tuple[QuantizationRecord, Path]]) -> MeasurementsRecord:
    """A measure step's record with `P50` and `FORWARD_B32`, each int8 verdict by the real rule."""
    measured = {}
    for (k, precision), p50 in P50.items():
        measured[k, precision] = StudentMeasurement(
            student=k, label=f"S{k}", precision=precision, student_name=f"resnet20-s{k}", size_bytes=1,
            threads=1, timings=[_timing(1, p50, p50 / 4), _timing(32, 32 * p50, FORWARD_B32[k, precision])],
        )  # fmt: skip
    verdicts = [
        steps.int8_verdict(q, measured.get((k, "fp32")), measured.get((k, "int8")))
        for k, (q, _) in sorted(quantized.items())
    ]
    return MeasurementsRecord(
        enabled=True,
        options={"threads": 1},
        machine=None,
        measurements=list(measured.values()),
        int8=verdicts,
    )


@pytest.fixture(scope="module")
def flow(val_split_family: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The family with S2 and S3 quantized (S1 not), the injected measurements, and the cascade step's
    output with the default options (S3 -> S2 -> S1)."""
    root = tmp_path_factory.mktemp("cascade-steps")
    data, model = val_split_family / "data", val_split_family / "model"
    quantized_dirs = []
    for k in (2, 3):
        ev = steps.evaluate(data, model, k, root / f"ev{k}")
        steps.quantize(data, model, ev, QUANTIZATION, root / f"q{k}")
        quantized_dirs.append(root / f"q{k}")
    quantized = steps.read_quantized(quantized_dirs)
    measurements = injected_measurements(quantized)
    record = steps.cascade(data, model, quantized_dirs, measurements, {}, root / "cascade")
    return {
        "root": root,
        "data": data,
        "model": model,
        "quantized_dirs": quantized_dirs,
        "quantized": quantized,
        "measurements": measurements,
        "record": record,
        "out": root / "cascade",
        "dataset": ImageDataset.load(data),
    }


def variant_folders(flow: dict[str, Any], record: CascadeRecord) -> list[Path]:
    """The original folder of each stage's variant (not the cascade folder's copy)."""
    return [
        flow["quantized"][s.student][1]
        if s.precision == "int8"
        else steps.student_dir(flow["model"], s.student)
        for s in record.stages
    ]


def test_the_step_fits_on_the_validation_split_and_scores_the_test_split(flow: dict[str, Any]) -> None:
    record: CascadeRecord = flow["record"]
    dataset: ImageDataset = flow["dataset"]
    assert record.fitted and record.status == "fitted" and record.reason == ""
    assert [s.label for s in record.stages] == ["S3", "S2", "S1"]  # default: smallest, middle, largest
    assert record.order == "S3 (int8) -> S2 -> S1" and record.reference_label == "S1"

    # The fit is the one fit_thresholds finds on the validation split (never the test split) at the stage
    # costs, for the default target: S1's own validation top-1 minus 0.5 points.
    folders = variant_folders(flow, record)
    costs = [s.cost_ms for s in record.stages]
    val = [softmax(OnnxStudent(f).logits(dataset.val.x)) for f in folders]
    target = 100.0 * float((val[-1].argmax(1) == dataset.val.y).mean()) - 0.5
    expected = fit_thresholds(val, dataset.val.y, costs, target)
    assert record.fit is not None and record.fit.num_val == len(dataset.val.y)
    assert record.fit.target_top1 == pytest.approx(target) and record.max_drop == 0.5
    assert record.thresholds == list(expected.thresholds) == record.fit.thresholds
    assert record.fit.expected_cost_ms == pytest.approx(expected.expected_cost_ms)
    assert [s.val_exit_fraction for s in record.stages] == pytest.approx(list(expected.exit_fractions))
    assert [s.threshold for s in record.stages] == [*record.thresholds, None]

    # Test numbers: the cascade, each student alone and S1 alone, as evaluate_cascade computes them.
    test = [softmax(OnnxStudent(f).logits(dataset.test.x)) for f in folders]
    scored = evaluate_cascade(test, dataset.test.y, record.thresholds, costs)
    assert record.num_test == len(dataset.test.y) == scored["num_images"]
    assert record.test_top1 == pytest.approx(scored["top1"])
    assert record.test_cost_ms == pytest.approx(scored["cost_ms"])
    assert record.test_exit_fractions == pytest.approx(scored["exit_fractions"])
    assert [s.test_exit_fraction for s in record.stages] == pytest.approx(scored["exit_fractions"])
    assert (record.reference_top1, record.reference_cost_ms) == pytest.approx(
        (scored["reference_top1"], costs[-1])
    )
    alone = [100.0 * float((p.argmax(1) == dataset.test.y).mean()) for p in test]
    assert [s.test_top1 for s in record.stages] == pytest.approx(alone)
    assert record.cheaper == (scored["cost_ms"] < costs[-1] * (1 - 1e-9))
    delta = scored["top1"] - scored["reference_top1"]
    if record.cheaper:
        assert record.verdict.startswith(f"cheaper than S1 alone at {delta:+.2f} points of test top-1")
    else:
        assert record.verdict.startswith("not cheaper")
    assert record.test_set == dataset.sha256()


def test_costs_are_the_measured_raw_forward_per_image_and_int8_ships_by_the_measured_rule(
    flow: dict[str, Any],
) -> None:
    record: CascadeRecord = flow["record"]
    assert [(s.precision, s.precision_reason) for s in record.stages] == [
        ("int8", "int8 faster: kept"),
        ("fp32", "int8 not faster: not shipped"),
        ("fp32", "no int8 version"),
    ]
    assert [s.student_name for s in record.stages] == ["resnet20-s3-int8", "resnet20-s2", "resnet20-s1"]
    assert [s.cost_ms for s in record.stages] == pytest.approx([0.32 / 32, 1.6 / 32, 3.2 / 32])
    assert record.cost_basis == "raw ONNX Runtime forward per image at batch 32, measured by the measure step"
    # The folder is what the model server serves: the same thresholds, costs and variants.
    built = read_cascade(flow["out"] / CascadeRecord.CASCADE_DIR)
    assert built.labels == ("S3", "S2", "S1") and list(built.thresholds) == record.thresholds
    assert [st.precision for st in built.stages] == ["int8", "fp32", "fp32"]
    assert [st.cost_ms for st in built.stages] == pytest.approx([s.cost_ms for s in record.stages])
    assert not list((flow["out"] / CascadeRecord.CASCADE_DIR).rglob("model.safetensors"))


def test_the_record_names_its_own_format_apart_from_the_folders_card(
    flow: dict[str, Any], tmp_path: Path
) -> None:
    raw = json.loads((flow["out"] / CascadeRecord.FILENAME).read_text())
    card = json.loads((flow["out"] / CascadeRecord.CASCADE_DIR / CASCADE_FILE).read_text())
    assert (raw["format"], card["format"]) == ("bockd-cascade-result/1", "bockd-cascade/1")
    assert CascadeRecord.read(flow["out"]) == flow["record"]
    with pytest.raises(DataError, match="not a bockd-cascade-result/1 record"):
        CascadeRecord.read(flow["out"] / CascadeRecord.CASCADE_DIR / CASCADE_FILE)


def test_without_measurements_every_student_runs_fp32_timed_by_the_step(
    flow: dict[str, Any], tmp_path: Path
) -> None:
    record = steps.cascade(
        flow["data"], flow["model"], flow["quantized_dirs"], None, {"students": [1, 3]}, tmp_path
    )
    assert [s.label for s in record.stages] == ["S3", "S1"]  # ordered smallest first
    # No measurement: no int8 verdict says "faster", so none ships.
    assert [(s.precision, s.precision_reason) for s in record.stages] == [
        ("fp32", "int8 not measured: not shipped"),
        ("fp32", "no int8 version"),
    ]
    assert record.cost_basis == "raw ONNX Runtime forward per image at batch 32, timed by the cascade step"
    assert all(s.cost_ms > 0 for s in record.stages)
    assert len(record.thresholds) == 1


def test_a_target_out_of_reach_keeps_the_largest_student_alone(flow: dict[str, Any], tmp_path: Path) -> None:
    record = steps.cascade(
        flow["data"],
        flow["model"],
        [],
        flow["measurements"],
        {"students": [3, 1], "target_top1": 100},
        tmp_path,
    )
    assert record.fit is not None and not record.fit.reached and record.fit.target_top1 == 100
    assert record.max_drop is None and record.thresholds == [NEVER]
    assert record.test_cost_ms == pytest.approx(record.reference_cost_ms) and not record.cheaper
    assert record.test_top1 == record.reference_top1
    assert record.verdict == (
        "not cheaper: the target 100.00 % was out of reach on the validation split; S1 answers alone"
    )


def test_the_verdict_says_why_a_cascade_is_not_cheaper() -> None:
    def fit(thresholds: list[float], reached: bool = True) -> CascadeFitSummary:
        return CascadeFitSummary(
            thresholds=thresholds, target_top1=95.0, val_top1=95.5, val_reference_top1=95.5,
            expected_cost_ms=1.0, exit_fractions=[0.0] * (len(thresholds) + 1), reached=reached, num_val=100,
            search="exact",
        )  # fmt: skip

    def test(cost: float) -> dict[str, float]:
        return {"top1": 95.2, "reference_top1": 95.5, "cost_ms": cost, "reference_cost_ms": 1.0}

    assert steps.cascade_verdict(fit([0.9, 0.8]), test(0.4), "S1") == (
        "cheaper than S1 alone at -0.30 points of test top-1 (0.4 vs 1 ms per image, 60 % less)"
    )
    assert steps.cascade_verdict(fit([NEVER, NEVER]), test(1.0), "S1") == (
        "not cheaper: the fit kept S1 alone (no smaller student pays for itself at the target 95.00 %)"
    )
    assert steps.cascade_verdict(fit([NEVER], reached=False), test(1.0), "S2") == (
        "not cheaper: the target 95.00 % was out of reach on the validation split; S2 answers alone"
    )
    # Early stages that answer little on the test split: the test cost may not come out lower.
    assert steps.cascade_verdict(fit([0.99]), test(1.05), "S1") == (
        "not cheaper on the test split: 1.05 vs 1 ms per image for S1 alone"
    )
    assert not steps.cheaper(1.0 - 1e-12, 1.0) and steps.cheaper(0.999, 1.0)  # rounding is no saving


def test_skipped_without_a_validation_split_or_when_off(flow: dict[str, Any], tmp_path: Path) -> None:
    no_val = tmp_path / "no-val"
    steps.prepare_data(build_config("smoke").to_dict(), no_val)
    record = steps.cascade(no_val, flow["model"], [], None, {}, tmp_path / "a")
    assert (record.status, record.reason) == ("skipped", "no validation split (set data.val_fraction)")
    assert record.verdict == "skipped: no validation split (set data.val_fraction)"
    assert record.stages == [] and not (tmp_path / "a" / CascadeRecord.CASCADE_DIR).exists()
    assert CascadeRecord.read(tmp_path / "a") == record
    off = steps.cascade(flow["data"], flow["model"], [], None, {"enabled": False}, tmp_path / "b")
    assert off.verdict == "skipped: cascade off (cascade.enabled: false)"
    assert cascade_section(record) == (
        "<h2>Confidence cascade</h2><p>Skipped: no validation split (set data.val_fraction).</p>"
    )
    assert cascade_lines(record) == ["cascade: skipped: no validation split (set data.val_fraction)"]


def test_bad_options_and_data_the_students_did_not_hold_out_are_refused(
    flow: dict[str, Any], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"cascade.students: \[4\] not in the family of 3 students"):
        steps.cascade(flow["data"], flow["model"], [], None, {"students": [4, 1]}, tmp_path)
    with pytest.raises(ConfigError, match=r"invalid cascade:\n  students: expected at least 2"):
        steps.cascade(flow["data"], flow["model"], [], None, {"students": [2]}, tmp_path)
    other = tmp_path / "other"  # another split: its validation images were training images of the family
    steps.prepare_data(build_config("smoke", {"data": {"val_fraction": 0.3}}).to_dict(), other)
    with pytest.raises(DataError, match="the thresholds must be fitted on the validation split that"):
        steps.cascade(other, flow["model"], [], None, {}, tmp_path / "x")


def test_report_and_summary_show_the_order_thresholds_shares_and_verdict(flow: dict[str, Any]) -> None:
    record: CascadeRecord = flow["record"]
    reg = CascadeRegistration(registered_model="t-digits-resnet20-cascade", version="3", created=True)
    html = cascade_section(record, reg)
    assert "<b>S3 (int8) -&gt; S2 -&gt; S1</b>" in html and html_module.escape(record.verdict) in html
    for s in record.stages:
        row = f"<tr><td>{s.label}</td><td>{s.precision}</td>"
        assert html.count(row) == 1
        assert f"<td>{s.test_top1:.2f}</td>" in html
    assert f"<th>{record.test_top1:.2f}</th>" in html  # the cascade's own row
    assert "fitted on the validation split only" in html and "MLflow: t-digits-resnet20-cascade v3" in html
    first, second = cascade_lines(record)
    assert first.startswith(f"cascade {record.order} (thresholds ")
    assert f"test top-1 {record.test_top1:.2f} % at {record.test_cost_ms:.3g} ms per image" in first
    assert "alone: S3 " in first and ", S1 " in first
    assert second == f"  {record.verdict}"


def test_registration_is_idempotent_and_tagged_kind_cascade(
    flow: dict[str, Any], mlflow_stack: ServicesInfo, tmp_path: Path
) -> None:
    client = MlflowClient(mlflow_stack.mlflow_uri)
    run_id = client.create_run(client.create_experiment("cascade-register")).info.run_id
    uri = mlflow_stack.mlflow_uri
    first = steps.register_cascade(flow["out"], tracking_uri=uri, run_id=run_id, prefix="tc")
    again = steps.register_cascade(flow["out"], tracking_uri=uri, run_id=run_id, prefix="tc")
    assert first == CascadeRegistration(
        registered_model="tc-digits-resnet20-cascade", version="1", created=True
    )
    assert again == first.model_copy(update={"created": False})
    (version,) = client.search_model_versions("name = 'tc-digits-resnet20-cascade'")
    record: CascadeRecord = flow["record"]
    assert version.tags["kind"] == "cascade"
    assert (version.tags["students"], version.tags["precisions"]) == ("S3,S2,S1", "int8,fp32,fp32")
    assert float(version.tags["top1"]) == pytest.approx(record.test_top1, abs=1e-3)
    assert version.tags["test_set"] == record.test_set
    # The version's files are the servable folder itself.
    local = Path(client.download_artifacts(run_id, "cascade", str(tmp_path)))
    assert list(read_cascade(local).thresholds) == record.thresholds
    skipped = tmp_path / "skipped"
    skipped.mkdir()
    CascadeRecord(status="skipped", reason="x", verdict="skipped: x").write(skipped)
    assert steps.register_cascade(skipped, tracking_uri=uri, run_id=run_id, prefix="tc") is None


def test_the_step_logs_its_record_to_the_mlflow_run(
    flow: dict[str, Any], mlflow_stack: ServicesInfo, tmp_path: Path
) -> None:
    client = MlflowClient(mlflow_stack.mlflow_uri)
    run_id = client.create_run(client.create_experiment("cascade-log")).info.run_id
    record = steps.cascade(
        flow["data"], flow["model"], flow["quantized_dirs"], flow["measurements"], {}, tmp_path,
        tracking_uri=mlflow_stack.mlflow_uri, run_id=run_id,
    )  # fmt: skip
    metrics = client.get_run(run_id).data.metrics
    assert metrics["cascade/fitted"] == 1.0 and metrics["cascade/test_top1"] == pytest.approx(
        record.test_top1
    )
    assert metrics["cascade/s3/cost_ms"] == pytest.approx(0.01)
    assert metrics["cascade/s3/threshold"] == pytest.approx(record.thresholds[0])
    assert "cascade-result.json" in {a.path for a in client.list_artifacts(run_id)}


def test_the_cascade_is_deployed_locally_and_answers_with_the_student(
    flow: dict[str, Any], tmp_path: Path
) -> None:
    record: CascadeRecord = flow["record"]
    reg = CascadeRegistration(registered_model="t-cascade", version="1", created=True)
    for options in ({}, {"cascade": False}):
        assert (
            steps.deploy_cascade(flow["out"], reg, mode="local", serving_dir=tmp_path, deploy_options=options)
            is None
        )
    assert steps.deploy_cascade(flow["out"], reg, mode="none", deploy_options={"cascade": True}) is None
    with pytest.raises(ConfigError, match="only ONNX Runtime runs"):
        steps.deploy_cascade(flow["out"], reg, mode="local", serving_dir=tmp_path,
                             deploy_options={"cascade": True, "backend": "torch"})  # fmt: skip
    with pytest.raises(ConfigError, match=r"deploy_options\.cascade: expected true or false"):
        steps.deploy_cascade(
            flow["out"], reg, mode="local", serving_dir=tmp_path, deploy_options={"cascade": 1}
        )
    with pytest.raises(ConfigError, match="fitted but has no registered version"):
        steps.deploy_cascade(
            flow["out"], None, mode="local", serving_dir=tmp_path, deploy_options={"cascade": True}
        )
    skipped = tmp_path / "skipped"
    skipped.mkdir()
    steps.cascade(flow["data"], flow["model"], [], None, {"enabled": False}, skipped)
    with pytest.raises(ConfigError, match=r"the cascade was skipped \(cascade off"):
        steps.deploy_cascade(
            skipped, None, mode="local", serving_dir=tmp_path, deploy_options={"cascade": True}
        )
    try:
        endpoint = steps.deploy_cascade(
            flow["out"], reg, mode="local", serving_dir=tmp_path / "serving", deploy_options={"cascade": True}
        )
        assert endpoint is not None
        assert (endpoint.registered_model, endpoint.version, endpoint.labels) == (
            "t-cascade",
            "1",
            ["S3", "S2", "S1"],
        )
        images = flow["dataset"].test.x[:16]
        answers = predict_v1(endpoint.url, "t-cascade", list(images))
        # Each answer comes from the student the routing rule picks for it, with that student's probabilities.
        probs = [softmax(OnnxStudent(f).logits(images)) for f in variant_folders(flow, record)]
        _, answered_by = route(probs, record.thresholds)
        assert [a["student"] for a in answers] == [record.stages[i].label for i in answered_by]
        got = np.array([a["probabilities"] for a in answers])
        expected = np.stack([probs[i][row] for row, i in enumerate(answered_by)])
        np.testing.assert_allclose(got, expected, atol=1e-4)
    finally:
        stop_all_local_servers(tmp_path / "serving")
