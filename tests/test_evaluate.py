"""The evaluate step on exported students of the tiny digits ensemble run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bockd.data import ImageDataset, ImageSplit, to_model_input
from bockd.errors import DataError
from bockd.evaluate import (
    StudentEvaluation,
    confusion_matrix_png,
    evaluate_student,
    evaluate_students,
    evaluations_table_markdown,
)
from bockd.export import export_student, load_student, read_student_config
from bockd.models import student_table

NUM_STUDENTS = 3  # as in conftest.py

FAST = {"latency_batch_sizes": (1, 4), "latency_iters": 3}


@pytest.fixture(scope="module")
def folders(ensemble_run: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("students")
    return [export_student(ensemble_run, root / f"s{i + 1}", i, onnx=False) for i in range(NUM_STUDENTS)]


@pytest.fixture(scope="module")
def evals(folders: list[Path], digits: ImageDataset) -> list[StudentEvaluation]:
    torch.set_num_threads(1)
    return evaluate_students(folders, digits.test, batch_size=128, **FAST)


def test_top1_matches_independent_argmax(
    folders: list[Path], evals: list[StudentEvaluation], digits: ImageDataset
) -> None:
    for folder, ev in zip(folders, evals, strict=True):
        config = json.loads((folder / "config.json").read_text())
        x = to_model_input(torch.as_tensor(digits.test.x), config["mean"], config["std"], channels_last=False)
        with torch.no_grad():
            pred = load_student(folder)(x).argmax(dim=1).numpy()
        expected = 100.0 * float(np.mean(pred == digits.test.y))
        assert ev.top1 == pytest.approx(expected)
        assert ev.top1 <= ev.top5 <= 100.0
        assert ev.num_test == len(digits.test)


def test_confusion_and_per_class(evals: list[StudentEvaluation], digits: ImageDataset) -> None:
    for ev in evals:
        cm = np.asarray(ev.confusion)
        assert cm.shape == (digits.num_classes, digits.num_classes)
        assert cm.sum() == ev.num_test
        assert 100.0 * np.trace(cm) / ev.num_test == pytest.approx(ev.top1)
        np.testing.assert_array_equal(cm.sum(axis=1), np.bincount(digits.test.y, minlength=cm.shape[0]))
        for i, acc in enumerate(ev.per_class_accuracy):
            assert acc == pytest.approx(100.0 * cm[i, i] / cm[i].sum())


def test_params_flops_latency(
    evals: list[StudentEvaluation], folders: list[Path], digits: ImageDataset
) -> None:
    table = student_table(
        "resnet20", num_classes=digits.num_classes, in_channels=digits.in_channels, num_students=NUM_STUDENTS
    )
    assert [e.student for e in evals] == ["S1", "S2", "S3"]
    assert [e.params for e in evals] == [row["params"] for row in table]
    assert [e.size_pct for e in evals] == [row["size_pct"] for row in table]
    flops = [e.flops for e in evals]
    assert all(isinstance(f, int) and f > 0 for f in flops)
    assert flops[0] > flops[1] > flops[2]
    for ev in evals:
        assert set(ev.latency_ms) == {1, 4}
        for stats in ev.latency_ms.values():
            assert 0 < stats["p50"] <= stats["p99"]
    assert read_student_config(folders[2])["name"] == evals[2].name


def test_shape_mismatch_raises(folders: list[Path], digits: ImageDataset) -> None:
    x = digits.test.x[:8]
    wrong = ImageSplit(x=np.ascontiguousarray(np.repeat(x, 3, axis=3)), y=digits.test.y[:8])
    with pytest.raises(DataError, match="image shape"):
        evaluate_student(folders[0], wrong, **FAST)


def test_out_of_range_labels_raise(folders: list[Path], digits: ImageDataset) -> None:
    y = digits.test.y[:8].copy()
    y[3] = digits.num_classes
    with pytest.raises(DataError, match="num_classes"):
        evaluate_student(folders[0], ImageSplit(x=digits.test.x[:8], y=y), **FAST)


def test_png_markdown_json(evals: list[StudentEvaluation], digits: ImageDataset, tmp_path: Path) -> None:
    png = confusion_matrix_png(evals[0], digits.classes, tmp_path / "cm" / "s1.png")
    assert png.is_file() and png.stat().st_size > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    md = evaluations_table_markdown(evals)
    lines = md.strip().splitlines()
    assert len(lines) == 2 + len(evals)
    for ev, line in zip(evals, lines[2:], strict=True):
        assert line.startswith(f"| {ev.student} ")

    data = json.loads(json.dumps([ev.to_dict() for ev in evals]))
    assert data[0]["latency_ms"]["1"]["p50"] == evals[0].latency_ms[1]["p50"]
    assert data[0]["confusion"] == evals[0].confusion
