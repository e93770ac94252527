"""The pipeline steps as plain functions (what every KFP component runs), without KFP or MLflow."""

from __future__ import annotations

import base64
import json
import re
import shutil
from html import escape as html_escape
from pathlib import Path
from typing import Any

import pytest
from conftest import NUM_STUDENTS, TINY

from bockd.config import build_config
from bockd.errors import ConfigError, DataError
from bockd.export import export_student
from bockd.pipeline import steps
from bockd.pipeline.records import BaselineRecord, EvaluationRecord, Registration, SelectionRecord, SummaryRow
from bockd.pipeline.report import format_gain, noise_legend
from bockd.significance import gain_noise, reading


@pytest.fixture(scope="module")
def flow(ensemble_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """prepare -> the session's trained ensemble, exported as train_ensemble does -> evaluate -> select."""
    root = tmp_path_factory.mktemp("steps")
    config = build_config("smoke", TINY).to_dict()
    meta = steps.prepare_data(config, root / "data")
    model_dir = root / "model"
    shutil.copytree(ensemble_run, model_dir)
    for k in range(1, NUM_STUDENTS + 1):
        export_student(model_dir, steps.student_dir(model_dir, k), index=k - 1, onnx=False)
    evaluations = [
        steps.evaluate(root / "data", model_dir, k, root / f"ev{k}") for k in range(1, NUM_STUDENTS + 1)
    ]
    baselines = [BaselineRecord(student=2, student_name="resnet20-s2", top1=50.0, top5=90.0)]
    selection = steps.select_students(evaluations, baselines, [], {"max_size_pct": 50})
    return {
        "root": root,
        "config": config,
        "meta": meta,
        "model_dir": model_dir,
        "evaluations": evaluations,
        "baselines": baselines,
        "selection": selection,
    }


def test_prepare_data_writes_the_dataset_artifact(flow: dict[str, Any]) -> None:
    meta = flow["meta"]
    assert meta["name"] == "digits"
    assert sum(meta["counts"].values()) == 1797  # every digit, split 80/20
    assert meta["counts"]["test"] == pytest.approx(0.2 * 1797, abs=2)
    assert json.loads((flow["root"] / "data" / "meta.json").read_text())["sha256"] == meta["sha256"]


def test_prepared_data_must_match_the_config(flow: dict[str, Any]) -> None:
    other = build_config("smoke", {**TINY, "data": {"dataset": "cifar10"}})
    with pytest.raises(DataError, match=r"train_config\.data\.dataset is 'cifar10'"):
        steps.load_prepared(flow["root"] / "data", other)


def test_evaluation_records_carry_what_later_steps_need(flow: dict[str, Any]) -> None:
    for k, ev in enumerate(flow["evaluations"], start=1):
        assert (ev.student, ev.label, ev.student_name) == (k, f"S{k}", f"resnet20-s{k}")
        assert ev.test_set == flow["meta"]["sha256"]
        assert len(ev.confusion) == 10
        assert (flow["root"] / f"ev{k}" / steps.CONFUSION_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert ev.latency_p50_ms is not None and ev.latency_p50_ms > 0
        # What the next task reads back is the record itself, its format named in the file.
        assert EvaluationRecord.read(flow["root"] / f"ev{k}") == ev
        raw = json.loads((flow["root"] / f"ev{k}" / EvaluationRecord.FILENAME).read_text())
        assert raw["format"] == "bockd-evaluation/2" and raw["student"] == k


def test_a_record_of_another_kind_or_version_is_refused(flow: dict[str, Any], tmp_path: Path) -> None:
    old = {"student_number": 1, "student": "S1", "name": "resnet20-s1", "top1": 50.0}  # an untyped v1 record
    (tmp_path / EvaluationRecord.FILENAME).write_text(json.dumps(old))
    with pytest.raises(DataError, match="not a bockd-evaluation/2 record"):
        EvaluationRecord.read(tmp_path)
    flow["baselines"][0].write(tmp_path / "b.json")
    with pytest.raises(DataError, match="not a bockd-evaluation/2 record"):
        EvaluationRecord.read(tmp_path / "b.json")


def test_selection_applies_the_policy_and_explains_every_student(flow: dict[str, Any]) -> None:
    record = flow["selection"]
    sizes = {ev.student: ev.size_pct for ev in flow["evaluations"]}
    assert record.chosen == [k for k, size in sizes.items() if size <= 50]
    assert len(record.selection.chosen) + len(record.selection.rejected) == NUM_STUDENTS
    assert record.promotions == []  # no MLflow: nothing to promote
    assert "size" in record.selection.rejected[0].reason
    record.write(flow["root"] / "selection.json")
    assert SelectionRecord.read(flow["root"] / "selection.json") == record


def test_report_is_one_self_contained_html_file(flow: dict[str, Any], tmp_path: Path) -> None:
    # A class name with markup must come out escaped, never as live HTML.
    evaluations = [
        ev.model_copy(update={"student_name": ev.student_name + "<script>"}) for ev in flow["evaluations"]
    ]
    ev_dirs = []
    for k, ev in enumerate(evaluations, start=1):
        d = tmp_path / f"ev{k}"
        shutil.copytree(flow["root"] / f"ev{k}", d)
        ev.write(d)
        ev_dirs.append(d)
    registrations = [Registration(student=1, registered_model="m-s1", version="7", created=True)]
    rows = steps.report(
        flow["model_dir"], ev_dirs, flow["baselines"], registrations, flow["selection"], tmp_path / "r.html"
    )
    html = (tmp_path / "r.html").read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert not re.search(r'src="(?!data:image/png;base64,)', html)  # every picture inlined
    pngs = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(pngs) == 2 + NUM_STUDENTS  # accuracy vs size, curves, one confusion matrix per student
    assert all(base64.b64decode(p)[:4] == b"\x89PNG" for p in pngs)
    assert html.count("<tr><td>S") == NUM_STUDENTS
    for choice in flow["selection"].selection.rejected:
        assert html_escape(choice.reason) in html
    by_student = {r.student: r for r in rows}
    assert by_student[2].baseline_top1 == 50.0
    assert by_student[2].gain == pytest.approx(by_student[2].top1 - 50.0)
    assert by_student[1].version == "7" and by_student[3].version is None
    # The gain is read against the test set's binomial noise, and the table says what the mark means.
    n = evaluations[1].num_test
    assert by_student[2].gain_noise == pytest.approx(gain_noise(50.0, by_student[2].top1, n))
    assert by_student[2].gain_reading == reading(by_student[2].gain, 50.0, by_student[2].top1, n)
    assert "within test-set noise" in html


def test_gains_within_noise_are_marked_in_every_table() -> None:
    def row(gain: float | None, reading_: str | None, noise: float | None) -> SummaryRow:
        return SummaryRow(
            student=1, label="S1", params=1, size_pct=100.0, top1=60.0, top5=90.0, baseline_top1=None,
            gain=gain, gain_noise=noise, gain_reading=reading_, flops=1, latency_ms=None,
            registered_model=None, version=None, selected=False,
        )  # fmt: skip

    rows = [row(0.56, "within noise", 3.2), row(-5.0, "loss", 3.0), row(None, None, None)]
    assert [format_gain(r) for r in rows] == ["+0.56 ≈", "-5.00", "-"]
    assert "±3.20 points" in noise_legend(rows) and noise_legend(rows[2:]) == ""


def test_bad_step_inputs_are_named(flow: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="baseline_students: student 9 does not exist"):
        steps.train_baseline(flow["config"], flow["root"] / "data", 9, tmp_path / "b")
    with pytest.raises(ConfigError, match="deploy_mode"):
        steps.deploy(flow["model_dir"], [1], [], mode="kubernetes")
    with pytest.raises(ConfigError, match="local_serving_dir"):
        steps.deploy(flow["model_dir"], [1], [], mode="local")
    assert steps.deploy(flow["model_dir"], [1], [], mode="none") == []
    with pytest.raises(ConfigError, match="train_config: expected a mapping"):
        steps.train_config(["not", "a", "dict"])  # type: ignore[arg-type]
