"""The confidence cascade (bockd.cascade, bockd.serving.cascade): routing, fitted thresholds, the folder,
and one endpoint that answers like `route` in process and over HTTP.

Routing and fitting run on hand-made probabilities whose answer is known. The folder and the server use
the session's 3-student run (conftest.py), exported once for the module: the cascade S3 -> S2 -> S1 (S3
the smallest). Its thresholds are fitted on the first half of the digits test split; the served copy gets
thresholds set between the confidences of the request images, so that every student answers some of them
and no confidence is near a threshold (another batch size may round the last bit differently).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kserve.errors import InvalidInput
from kserve.model_repository import ModelRepository
from kserve.protocol.dataplane import DataPlane
from serving_requests import bad_requests, in_process, v2_body, v2_outputs

from bockd import cascade as core
from bockd.cascade import (
    CASCADE_FILE,
    NEVER,
    CascadeFit,
    build_cascade,
    evaluate_cascade,
    fit_thresholds,
    read_cascade,
    route,
    run_cascade,
)
from bockd.data import ImageDataset
from bockd.errors import CheckpointError, ConfigError, DataError
from bockd.export import export_student
from bockd.onnx_student import OnnxStudent, softmax
from bockd.platform.services.processes import free_ports
from bockd.serving import model as serving_model
from bockd.serving.cascade import CascadeModel
from bockd.serving.model import StudentModel, build_model

pytestmark = pytest.mark.usefixtures("single_thread")

LABELS = ["S3", "S2", "S1"]  # smallest first: the ensemble run has 3 students
COSTS = [1.0, 2.0, 4.0]
NAME = "cascade"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _probs(rows: list[list[float]]) -> np.ndarray:
    return np.asarray(rows, dtype=np.float32)


# -- routing -------------------------------------------------------------------------------------------------


def test_route_answers_at_the_first_confident_stage() -> None:
    # Binary fractions: float32 holds them exactly, so the equal cases below are really equal.
    stage0 = _probs([[0.875, 0.125], [0.75, 0.25], [0.375, 0.625], [0.5, 0.5], [0.625, 0.375]])
    stage1 = _probs([[0.25, 0.75], [0.25, 0.75], [0.25, 0.75], [0.375, 0.625], [0.5, 0.5]])
    stage2 = _probs([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    preds, by = route([stage0, stage1, stage2], [0.75, 0.625])
    # row 1: 0.75 >= 0.75 answers (the rule is >=); row 3: 0.625 at stage 1; row 4: under both thresholds
    assert by.tolist() == [0, 0, 1, 1, 2]
    assert preds.tolist() == [0, 0, 1, 1, 1]
    assert route([stage0, stage1, stage2], [NEVER, NEVER])[1].tolist() == [2] * 5
    assert route([stage0, stage1, stage2], [0.0, NEVER])[1].tolist() == [0] * 5
    assert route([stage0, stage1, stage2], [NEVER, 0.0])[1].tolist() == [1] * 5
    # A float32 probability of exactly 1 is still under NEVER: that stage never answers.
    sure = _probs([[1.0, 0.0]])
    assert route([sure, sure], [NEVER])[1].tolist() == [1]
    assert route([sure, sure], [1.0])[1].tolist() == [0]


def test_route_refuses_malformed_arguments() -> None:
    p = _probs([[0.6, 0.4]])
    with pytest.raises(ConfigError, match="thresholds: 3 stages need 2"):
        route([p, p, p], [0.5])
    with pytest.raises(ConfigError, match=r"thresholds\[0\]"):
        route([p, p], [float("nan")])
    with pytest.raises(ConfigError, match=r"thresholds\[0\]"):
        route([p, p], [-0.1])
    with pytest.raises(DataError, match=r"probs\[1\]: shape"):
        route([p, _probs([[0.6, 0.4], [0.5, 0.5]])], [0.5])
    with pytest.raises(DataError, match=r"probs\[0\]: expected \[N, K\]"):
        route([np.zeros(3), np.zeros(3)], [0.5])


def test_run_cascade_escalates_only_the_open_rows_and_agrees_with_route() -> None:
    rng = np.random.default_rng(0)
    full = [softmax(rng.normal(size=(50, 4)) * (1 + i)) for i in range(3)]
    seen: list[list[int]] = [[], [], []]

    def stage(i: int):
        def run(rows: np.ndarray) -> np.ndarray:  # "images" are row numbers: what did this stage see?
            seen[i] = rows.tolist()
            return full[i][rows]

        return run

    thresholds = [0.6, 0.5]
    probs, by = run_cascade([stage(0), stage(1), stage(2)], np.arange(50), thresholds)
    preds, want = route(full, thresholds)
    assert by.tolist() == want.tolist() and (probs.argmax(1) == preds).all()
    assert np.array_equal(probs, np.stack(full)[by, np.arange(50)])
    assert seen[0] == list(range(50))
    assert seen[1] == np.flatnonzero(want >= 1).tolist() and seen[2] == np.flatnonzero(want == 2).tolist()
    assert 0 < len(seen[2]) < len(seen[1]) < 50  # the case really escalates part of the batch
    # Once every row is answered, the larger stages are not run at all.
    seen[1] = seen[2] = []
    run_cascade([stage(0), stage(1), stage(2)], np.arange(50), [0.0, 0.0])
    assert seen[1] == seen[2] == []
    # A stage at NEVER answers nothing, so it is not run: its rows go straight on.
    seen[0] = seen[1] = seen[2] = []
    probs, by = run_cascade([stage(0), stage(1), stage(2)], np.arange(50), [NEVER, 0.5])
    assert seen[0] == [] and seen[1] == list(range(50))
    assert by.tolist() == route(full, [NEVER, 0.5])[1].tolist()


# -- fitting -------------------------------------------------------------------------------------------------


def _two_stage_case() -> tuple[list[np.ndarray], np.ndarray]:
    """Ten images of class 0 (of 10): a cheap stage with confidences 0.95 .. 0.2, right on rows 0-2 and 4-5
    (class 1 on the others); a costly one that is always right."""
    conf = [0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    right = [True, True, True, False, True, True, False, False, False, False]
    cheap = np.zeros((10, 10), np.float32)
    for row, (c, r) in enumerate(zip(conf, right, strict=True)):
        cheap[row] = (1 - c) / 9
        cheap[row, 0 if r else 1] = c
    costly = np.full((10, 10), 0.01 / 9, np.float32)
    costly[:, 0] = 0.99
    return [cheap, costly], np.zeros(10, dtype=np.int64)


def test_fit_reaches_the_target_at_the_known_lowest_cost() -> None:
    probs, labels = _two_stage_case()
    # 90 % allows one mistake: the cheap stage can answer rows 0-5 (one wrong: row 3), not row 6 too.
    fit = fit_thresholds(probs, labels, [1.0, 10.0], 90.0)
    assert fit.reached and fit.search == "exact"
    assert fit.thresholds == (pytest.approx(0.6),)
    assert fit.val_top1 == pytest.approx(90.0) and fit.val_reference_top1 == pytest.approx(100.0)
    assert fit.exit_fractions == pytest.approx((0.6, 0.4))
    assert fit.expected_cost_ms == pytest.approx(1.0 + 0.4 * 10.0)
    # 100 %: only the rows above the first mistake may stay.
    strict = fit_thresholds(probs, labels, [1.0, 10.0], 100.0)
    assert strict.thresholds == (pytest.approx(0.85),) and strict.expected_cost_ms == pytest.approx(8.0)
    # 50 %: everything is answered by the cheap stage, whose threshold is then its lowest confidence.
    loose = fit_thresholds(probs, labels, [1.0, 10.0], 50.0)
    assert loose.exit_fractions == (1.0, 0.0) and loose.expected_cost_ms == pytest.approx(1.0)


def _random_case(n: int, stages: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    probs = []
    for i in range(stages):
        logits = rng.normal(size=(n, 10))
        logits[np.arange(n), labels] += 1.0 + 0.8 * i  # larger stages: more often right, more confident
        probs.append(softmax(logits))
    return probs, labels


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_exact_search_is_the_brute_force_optimum(stages: int) -> None:
    probs, labels = _random_case(200, stages, seed=stages)
    costs = [2.0**i for i in range(stages)]
    target = evaluate_cascade(probs, labels, [NEVER] * (stages - 1), costs)["reference_top1"] - 1.0
    grid = 8
    fit = fit_thresholds(probs, labels, costs, target, search="exact", grid=grid)
    candidates = [core._candidates(core.confidence(p), grid) for p in probs[:-1]]
    best = min(
        (round(ev["cost_ms"], 9), -ev["top1"])
        for ts in itertools.product(*candidates)
        if (ev := evaluate_cascade(probs, labels, ts, costs))["top1"] >= target - 1e-9
    )
    assert fit.reached and (round(fit.expected_cost_ms, 9), -fit.val_top1) == best
    # Coordinate descent finds a feasible setting that costs no less than the optimum.
    descent = fit_thresholds(probs, labels, costs, target, search="descent", grid=grid)
    assert descent.reached and descent.val_top1 >= target - 1e-9
    assert descent.expected_cost_ms >= fit.expected_cost_ms - 1e-9


def test_five_stages_use_coordinate_descent_deterministically() -> None:
    probs, labels = _random_case(2000, 5, seed=5)
    costs = [1.0, 2.0, 4.0, 8.0, 16.0]
    target = evaluate_cascade(probs, labels, [NEVER] * 4, costs)["reference_top1"] - 0.5
    fit = fit_thresholds(probs, labels, costs, target)
    assert fit.search == "descent" and fit.reached and fit.val_top1 >= target
    assert fit.expected_cost_ms < costs[-1]  # cheaper than the largest student alone
    assert fit_thresholds(probs, labels, costs, target) == fit
    check = evaluate_cascade(probs, labels, fit.thresholds, costs)
    assert check["top1"] == pytest.approx(fit.val_top1) and check["cost_ms"] == pytest.approx(
        fit.expected_cost_ms
    )


def test_an_unreachable_target_escalates_everything_and_says_so() -> None:
    probs, labels = _random_case(300, 3, seed=1)
    fit = fit_thresholds(probs, labels, [1.0, 2.0, 4.0], 100.0)
    assert not fit.reached
    assert fit.thresholds == (NEVER, NEVER) and fit.exit_fractions == (0.0, 0.0, 1.0)
    assert fit.val_top1 == pytest.approx(fit.val_reference_top1) and fit.val_top1 < 100.0
    # every image goes straight to the largest student: the smaller ones are not run
    assert fit.expected_cost_ms == pytest.approx(4.0)


def test_a_cascade_that_does_not_pay_is_the_largest_student_alone() -> None:
    # Unsure small students (confidence ~1/K): running them first only adds their cost, so the cheapest
    # setting that reaches the target skips them and costs exactly the largest student alone.
    probs, labels = _random_case(300, 3, seed=2)
    flat = [np.full_like(probs[0], 0.1), np.full_like(probs[1], 0.1), probs[2]]
    target = evaluate_cascade(flat, labels, [NEVER, NEVER], [1.0, 2.0, 4.0])["reference_top1"]
    fit = fit_thresholds(flat, labels, [1.0, 2.0, 4.0], target)
    assert fit.reached and fit.thresholds == (NEVER, NEVER)
    assert fit.expected_cost_ms == pytest.approx(4.0)
    # A small student as good as the largest answers everything at its own cost; nothing else runs.
    fit = fit_thresholds([probs[2], flat[1], probs[2]], labels, [1.0, 2.0, 4.0], target)
    assert fit.exit_fractions == (1.0, 0.0, 0.0) and fit.expected_cost_ms == pytest.approx(1.0)


def test_higher_thresholds_and_targets_cost_more() -> None:
    probs, labels = _random_case(500, 2, seed=2)
    costs = [1.0, 5.0]
    sweep = [evaluate_cascade(probs, labels, [t], costs) for t in np.linspace(0.0, 1.0, 21)]
    first = [ev["exit_fractions"][0] for ev in sweep]
    cost = [ev["cost_ms"] for ev in sweep]
    assert first == sorted(first, reverse=True) and cost == sorted(cost)
    assert first[0] == 1.0 and first[-1] == 0.0
    targets = np.linspace(20.0, sweep[-1]["reference_top1"], 8)
    fits = [fit_thresholds(probs, labels, costs, t) for t in targets]
    assert all(f.reached for f in fits)
    assert [f.expected_cost_ms for f in fits] == sorted(f.expected_cost_ms for f in fits)
    assert [f.thresholds[0] for f in fits] == sorted(f.thresholds[0] for f in fits)


def test_fit_round_trips_and_refuses_bad_arguments() -> None:
    probs, labels = _two_stage_case()
    fit = fit_thresholds(probs, labels, [1.0, 10.0], 90.0)
    assert CascadeFit.from_dict(json.loads(json.dumps(fit.to_dict()))) == fit
    with pytest.raises(CheckpointError, match="fit: lacks the field 'reached'"):
        CascadeFit.from_dict({k: v for k, v in fit.to_dict().items() if k != "reached"})
    cases = [
        (dict(costs_ms=[1.0]), ConfigError, "costs_ms: 2 stages need 2"),
        (dict(costs_ms=[1.0, 0.0]), ConfigError, "costs_ms: every cost"),
        (dict(costs_ms=[1.0, float("nan")]), ConfigError, "costs_ms: every cost"),
        (dict(target_top1=0.0), ConfigError, "target_top1"),
        (dict(target_top1=101.0), ConfigError, "target_top1"),
        (dict(labels=np.full(10, 10)), DataError, r"labels: class indices must be in 0\.\.9"),
        (dict(labels=np.zeros(9, np.int64)), DataError, "labels: expected 10 labels"),
        (dict(labels=np.zeros(10)), DataError, "labels: expected integer"),
        (dict(probs=probs[:1]), ConfigError, "at least 2 stages"),
        (dict(search="random"), ConfigError, "search"),
        (dict(grid=1), ConfigError, "grid"),
    ]
    base = dict(probs=probs, labels=labels, costs_ms=[1.0, 10.0], target_top1=90.0)
    for change, error, message in cases:
        with pytest.raises(error, match=message):
            fit_thresholds(**{**base, **change})


# -- the cascade folder --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def students(single_thread, ensemble_run: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """S3, S2, S1 exported (smallest first)."""
    root = tmp_path_factory.mktemp("cascade-students")
    return [export_student(ensemble_run, root / label, int(label[1]) - 1) for label in LABELS]


@pytest.fixture(scope="module")
def split(digits: ImageDataset) -> dict[str, np.ndarray]:
    """The digits test split: its first 200 images for fitting, the next 64 as requests."""
    x, y = np.ascontiguousarray(digits.test.x), digits.test.y.astype(np.int64)
    return {"val_x": x[:200], "val_y": y[:200], "x": x[200:264], "y": y[200:264]}


@pytest.fixture(scope="module")
def cascade_dir(students: list[Path], split, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cascades") / "fitted"
    build_cascade(students, out, split["val_x"], split["val_y"], COSTS, threads=1)
    return out


def stage_probs(folder: Path, images: np.ndarray) -> list[np.ndarray]:
    """Each stage's probabilities for the whole batch, as `route` takes them."""
    return [softmax(OnnxStudent(s.folder, threads=1).logits(images)) for s in read_cascade(folder).stages]


def _between(conf: np.ndarray, quantile: float) -> float:
    """A threshold between two adjacent confidences near ``quantile``, at least 1e-4 from both."""
    values = np.unique(conf)
    start = int(quantile * (len(values) - 1))
    for i in sorted(range(len(values) - 1), key=lambda i: abs(i - start)):
        if values[i + 1] - values[i] > 2e-4:
            return float((values[i] + values[i + 1]) / 2)
    raise AssertionError("no gap between the confidences")


@pytest.fixture(scope="module")
def served_dir(cascade_dir: Path, split, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fitted cascade with thresholds that send a part of the requests to each student."""
    folder = Path(shutil.copytree(cascade_dir, tmp_path_factory.mktemp("cascades") / "served"))
    probs = stage_probs(folder, split["x"])
    t0 = _between(probs[0].max(1), 0.4)
    open_ = probs[0].max(1) < t0
    t1 = _between(probs[1][open_].max(1), 0.5)
    card = json.loads((folder / CASCADE_FILE).read_text())
    card["thresholds"] = [t0, t1]
    (folder / CASCADE_FILE).write_text(json.dumps(card))
    return folder


def test_build_cascade_writes_a_folder_the_server_reads(cascade_dir: Path, students, split) -> None:
    card = json.loads((cascade_dir / CASCADE_FILE).read_text())
    assert card["format"] == "bockd-cascade/1" and card["confidence"] == "max_probability"
    assert [s["label"] for s in card["students"]] == LABELS == [s["dir"] for s in card["students"]]
    assert [s["cost_ms"] for s in card["students"]] == COSTS
    assert [s["precision"] for s in card["students"]] == ["fp32"] * 3
    assert card["classes"] == [str(i) for i in range(10)] and card["input_shape"] == [1, 8, 8]
    for label in LABELS:
        assert sorted(p.name for p in (cascade_dir / label).iterdir()) == ["config.json", "model.onnx"]
    cascade = read_cascade(cascade_dir)
    assert cascade.labels == tuple(LABELS) and cascade.thresholds == tuple(card["thresholds"])
    fit = cascade.fit
    # The default target: the largest student's validation top-1 less half a point, which S1 alone meets.
    probs = stage_probs(cascade_dir, split["val_x"])
    s1 = 100.0 * float((probs[-1].argmax(1) == split["val_y"]).mean())
    assert fit.val_reference_top1 == pytest.approx(s1) and fit.target_top1 == pytest.approx(s1 - 0.5)
    assert fit.reached and fit.val_top1 >= fit.target_top1 and fit.num_val == 200
    assert fit.expected_cost_ms <= sum(COSTS)
    again = evaluate_cascade(probs, split["val_y"], fit.thresholds, COSTS)
    assert again["top1"] == pytest.approx(fit.val_top1)
    assert again["cost_ms"] == pytest.approx(fit.expected_cost_ms)
    assert again["exit_fractions"] == pytest.approx(list(fit.exit_fractions))


def test_build_cascade_accepts_int8_folders_and_refuses_bad_inputs(students, split, tmp_path: Path) -> None:
    int8 = Path(shutil.copytree(students[0], tmp_path / "s3-int8"))
    (int8 / "model.safetensors").unlink()  # what bockd.quantize writes: ONNX and the card only
    config = json.loads((int8 / "config.json").read_text())
    (int8 / "config.json").write_text(json.dumps({**config, "precision": "int8"}))
    out = tmp_path / "int8-cascade"
    build_cascade([int8, students[2]], out, split["val_x"], split["val_y"], [0.5, 4.0], threads=1)
    card = json.loads((out / CASCADE_FILE).read_text())
    assert [(s["label"], s["precision"]) for s in card["students"]] == [("S3", "int8"), ("S1", "fp32")]

    other = Path(shutil.copytree(students[1], tmp_path / "other-classes"))
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "classes": list("abcdefghij")}))
    junk = tmp_path / "not-a-cascade"
    junk.mkdir()
    (junk / "notes.txt").write_text("keep me")
    x, y = split["val_x"], split["val_y"]
    cases = [
        (dict(student_dirs=students[:1]), ConfigError, "students: a cascade needs at least 2"),
        (
            dict(student_dirs=[students[0], students[0], students[2]]),
            ConfigError,
            "students: the same folder",
        ),
        (dict(student_dirs=[students[0], other, students[2]]), CheckpointError, "classes"),
        (dict(student_dirs=[students[0], tmp_path, students[2]]), CheckpointError, r"no config\.json"),
        (dict(costs_ms=[1.0, 2.0]), ConfigError, "costs_ms: 3 stages need 3"),
        (dict(costs_ms=[1.0, -2.0, 4.0]), ConfigError, "costs_ms: every cost"),
        (dict(val_labels=y + 10), DataError, r"val_labels: class indices must be in 0\.\.9"),
        (dict(val_labels=y[:-1]), DataError, "val_labels: expected 200 labels"),
        (dict(val_images=x.astype(np.float32)), DataError, "val_images: expected uint8"),
        (dict(val_images=x[:, :4]), DataError, r"val_images: expected uint8 \[N, 8, 8, 1\]"),
        (dict(target_top1=0), ConfigError, "target_top1"),
        (dict(max_drop=-1.0), ConfigError, "max_drop"),
        (dict(out_dir=junk), CheckpointError, "out: .* is not a cascade folder"),
    ]
    base = dict(student_dirs=students, out_dir=tmp_path / "never", val_images=x, val_labels=y, costs_ms=COSTS)
    for change, error, message in cases:
        with pytest.raises(error, match=message):
            build_cascade(**{**base, **change})
    assert not (tmp_path / "never").exists() and (junk / "notes.txt").read_text() == "keep me"


def test_read_cascade_refuses_a_tampered_card(cascade_dir: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(cascade_dir, tmp_path / "tampered"))
    card = json.loads((folder / CASCADE_FILE).read_text())

    def write(**change: Any) -> None:
        (folder / CASCADE_FILE).write_text(json.dumps({**card, **change}))

    students = card["students"]
    for change, message in [
        (dict(format="bockd-cascade/0"), "format"),
        (dict(students=students[:1]), "at least 2"),
        (dict(students=[{**students[0], "dir": "../S3"}, *students[1:]]), "not a sub-folder"),
        (dict(students=[{**students[0], "cost_ms": 0}, *students[1:]]), "cost_ms must be > 0"),
        (dict(students=[students[0], students[0], students[2]]), "labels must be distinct"),
        (dict(thresholds=[0.5]), "3 stages need 2 thresholds"),
        (dict(confidence="entropy"), "confidence"),
    ]:
        write(**change)
        with pytest.raises(CheckpointError, match=message):
            read_cascade(folder)


# -- serving -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(served_dir: Path) -> CascadeModel:
    built = build_model(NAME, [served_dir])
    assert isinstance(built, CascadeModel) and built.load() and built.ready
    return built


@pytest.fixture(scope="module")
def expected(served_dir: Path, split) -> dict[str, Any]:
    """What `route` says for the request images: predictions, answering stage, its probabilities."""
    probs = stage_probs(served_dir, split["x"])
    preds, by = route(probs, read_cascade(served_dir).thresholds)
    assert set(by.tolist()) == {0, 1, 2}  # every student answers some of them
    rows = np.arange(len(by))
    return {"preds": preds, "by": by, "probs": np.stack(probs)[by, rows], "students": [LABELS[i] for i in by]}


def test_in_process_v1_and_v2_answer_like_route(model: CascadeModel, split, expected) -> None:
    images = split["x"]
    v1 = in_process(model, {"instances": images.tolist()})["predictions"]
    assert [row["student"] for row in v1] == expected["students"]
    assert [row["top_k"][0]["index"] for row in v1] == expected["preds"].tolist()
    assert set(v1[0]) == {"probabilities", "top_k", "student"}  # a student's fields, and who answered
    np.testing.assert_allclose([row["probabilities"] for row in v1], expected["probs"], atol=1e-5)
    for kind in ("UINT8", "BYTES"):
        body = in_process(model, v2_body(images, kind), v2=True)
        outs = v2_outputs(body)
        assert [o["name"] for o in body["outputs"]] == [
            "probabilities",
            "top_k_indices",
            "top_k_classes",
            "student",
        ]
        assert outs["student"]["datatype"] == "BYTES" and outs["student"]["shape"] == [len(images)]
        assert outs["student"]["data"] == expected["students"]
        top = np.reshape(outs["top_k_indices"]["data"], (len(images), 5))
        assert top[:, 0].tolist() == expected["preds"].tolist()
        np.testing.assert_allclose(
            np.reshape(outs["probabilities"]["data"], (len(images), 10)), expected["probs"], atol=1e-5
        )
    # Only the outputs asked for; the student among them.
    body = in_process(model, {**v2_body(images[:3], "UINT8"), "outputs": [{"name": "student"}]}, v2=True)
    assert [o["name"] for o in body["outputs"]] == ["student"]
    assert body["outputs"][0]["data"] == expected["students"][:3]


def test_metadata_lists_the_student_output(model: CascadeModel) -> None:
    plane = DataPlane(model_registry=ModelRepository())
    plane.model_registry.update(model)
    meta = asyncio.run(plane.model_metadata(NAME))
    assert meta["outputs"][-1] == {"name": "student", "datatype": "BYTES", "shape": [-1]}
    assert [o["name"] for o in meta["outputs"]] == [
        "probabilities",
        "top_k_indices",
        "top_k_classes",
        "student",
    ]
    assert [i["datatype"] for i in meta["inputs"]] == ["FP32", "UINT8", "BYTES"]


def test_bad_requests_are_refused_as_for_a_student(model: CascadeModel, students, split) -> None:
    student = StudentModel("s3", students[0])
    student.load()
    for protocol, body, fragment in bad_requests(split["x"][:8]):
        errors = []
        for each in (model, student):
            with pytest.raises(InvalidInput) as err:
                in_process(each, body, v2=protocol == "v2")
            errors.append(str(err.value))
        assert fragment in errors[0], (protocol, fragment, errors)
        if "unknown output" not in fragment:  # the one message that differs: it lists the outputs
            assert errors[0] == errors[1], (protocol, fragment, errors)
    with pytest.raises(InvalidInput, match=r"unknown output 'logits'; this model returns \[.*'student'\]"):
        in_process(model, {**v2_body(split["x"][:1], "UINT8"), "outputs": [{"name": "logits"}]}, v2=True)
    # and it still answers
    assert in_process(model, {"instances": split["x"][:2].tolist()})["predictions"][0]["student"] in LABELS


def test_build_model_serves_a_cascade_folder_alone_on_onnx(served_dir: Path, students) -> None:
    assert serving_model.CASCADE_FILE == CASCADE_FILE  # the server's own name for the card
    assert type(build_model("s3", [students[0]])) is StudentModel
    with pytest.raises(ValueError, match="a cascade folder is served alone"):
        build_model(NAME, [served_dir, students[0]])
    with pytest.raises(ValueError, match="--backend onnx"):
        build_model(NAME, [served_dir], backend="torch")
    with pytest.raises(CheckpointError, match=r"no cascade\.json"):
        CascadeModel(NAME, students[0]).load()


# -- over HTTP: python -m bockd.serving --model_dir CASCADE -------------------------------------------------


def http(url: str, body: bytes | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with _DIRECT.open(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.fixture(scope="module")
def server(served_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The cascade folder under the serving entrypoint, as the container runs it (one ONNX thread)."""
    port = free_ports(1)[0]
    log = tmp_path_factory.mktemp("cascade-server") / "server.log"
    argv = [sys.executable, "-m", "bockd.serving", "--model_dir", str(served_dir), "--model_name", NAME]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*argv, "--http_port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(OSError):
                if http(f"{url}/v2/models/{NAME}/ready")[0] == 200:
                    break
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(15)


def test_http_answers_like_route_and_survives_bad_requests(server: str, split, expected) -> None:
    predict, infer = f"{server}/v1/models/{NAME}:predict", f"{server}/v2/models/{NAME}/infer"
    assert http(f"{server}/v2/health/ready")[0] == 200
    status, meta = http(f"{server}/v2/models/{NAME}")
    assert status == 200 and meta["outputs"][-1]["name"] == "student"
    status, body = http(predict, json.dumps({"instances": split["x"].tolist()}).encode())
    assert status == 200, body
    assert [row["student"] for row in body["predictions"]] == expected["students"]
    np.testing.assert_allclose(
        [r["probabilities"] for r in body["predictions"]], expected["probs"], atol=1e-5
    )
    for protocol, bad, fragment in bad_requests(split["x"][:8])[::4]:
        status, answer = http(infer if protocol == "v2" else predict, json.dumps(bad).encode())
        assert 400 <= status < 500 and fragment in answer["error"], (protocol, fragment, status, answer)
    status, body = http(infer, json.dumps(v2_body(split["x"], "UINT8")).encode())
    assert status == 200 and v2_outputs(body)["student"]["data"] == expected["students"]
