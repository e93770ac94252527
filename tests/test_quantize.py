"""int8 students (bockd.quantize): ONNX Runtime static quantization of an exported student and its check.

S3 of the session's 1-epoch ensemble run (conftest.py) is exported and quantized once for the module, on
the digits training split; its top-1 is low (one epoch) but the int8 copy must match the fp32 one.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from bockd import quantize as quantize_mod
from bockd.data import ImageDataset
from bockd.errors import CheckpointError, ConfigError, DataError
from bockd.export import export_student, read_student_config
from bockd.export_format import ONNX_FILE, WEIGHTS_FILE
from bockd.onnx_student import OnnxStudent
from bockd.quantize import (
    CHECK_FILE,
    CHECK_FORMAT,
    FP32,
    INT8,
    PRECISION_KEY,
    QuantizationCheck,
    check_quantized,
    precision_of,
    quantize_and_check,
    quantize_student,
    read_check,
)
from bockd.serving.model import build_model

pytestmark = pytest.mark.usefixtures("single_thread")

S3 = 2
NOISE_POINTS = 3.0  # one test digit is 0.28 points: a few flips of near-tied predictions are allowed


@pytest.fixture(scope="module")
def fp32(single_thread, ensemble_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_student(ensemble_run, tmp_path_factory.mktemp("quantize") / "s3", S3)


@pytest.fixture(scope="module")
def quantized(fp32: Path, digits: ImageDataset) -> tuple[Path, QuantizationCheck]:
    out = fp32.parent / "s3-int8"
    check = quantize_and_check(fp32, out, digits.train.x, digits.test.x, digits.test.y, max_drop=1.0)
    return out, check


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _siblings(folder: Path) -> set[str]:
    return {p.name for p in folder.parent.iterdir()}


# -- the int8 folder ----------------------------------------------------------------------------------------


def test_int8_folder_is_a_smaller_int8_copy_of_the_student(fp32: Path, quantized, digits) -> None:
    folder, check = quantized
    assert {p.name for p in folder.iterdir()} == {"config.json", ONNX_FILE, CHECK_FILE}  # no safetensors
    src, cfg = read_student_config(fp32), read_student_config(folder)
    assert precision_of(src) == FP32 and PRECISION_KEY not in src
    assert cfg[PRECISION_KEY] == INT8 and precision_of(cfg) == INT8
    assert cfg["name"] == f"{src['name']}-int8"
    # everything a server needs to feed the student is the fp32 card's
    new = ("name", PRECISION_KEY, "quantization")
    assert {k: v for k, v in cfg.items() if k not in new} == {k: v for k, v in src.items() if k != "name"}
    q = cfg["quantization"]
    assert (q["method"], q["format"], q["weights"], q["per_channel"]) == ("static", "QDQ", "int8", True)
    assert q["calibration_images"] == 512 < len(digits.train.x) and q["calibration_seed"] == 0
    assert q["source_sha256"] == _sha256(fp32 / ONNX_FILE) and q["onnxruntime"]
    size = (folder / ONNX_FILE).stat().st_size
    assert size == check.int8_bytes < check.fp32_bytes == (fp32 / ONNX_FILE).stat().st_size


def test_int8_model_is_qdq_with_int8_weights(quantized) -> None:
    model = onnx.load(str(quantized[0] / ONNX_FILE))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    int8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8) >= sum(n.op_type == "Conv" for n in model.graph.node)  # every conv's weights


def test_int8_top1_is_close_to_fp32(fp32: Path, quantized, digits) -> None:
    folder, check = quantized
    x, y = digits.test.x, digits.test.y
    fp32_logits, int8_logits = OnnxStudent(fp32, 1).logits(x), OnnxStudent(folder, 1).logits(x)
    assert int8_logits.shape == (len(x), 10) and np.isfinite(int8_logits).all()
    assert check.fp32_top1 == pytest.approx(100 * (fp32_logits.argmax(1) == y).mean())
    assert check.int8_top1 == pytest.approx(100 * (int8_logits.argmax(1) == y).mean())
    assert check.drop == pytest.approx(check.fp32_top1 - check.int8_top1)
    assert abs(check.drop) <= NOISE_POINTS and check.agreement >= 90
    assert (check.student, check.num_test, check.max_drop) == ("S3", len(x), 1.0)
    assert check.passed == (check.drop <= 1.0)


def test_quantization_json_is_the_returned_check(quantized) -> None:
    folder, check = quantized
    assert read_check(folder) == check
    assert quantize_mod.read_json(folder / CHECK_FILE)["format"] == CHECK_FORMAT


def test_model_server_serves_the_int8_student(quantized, digits) -> None:
    folder, _ = quantized
    images = np.ascontiguousarray(digits.test.x[:8])
    model = build_model("s3-int8", [folder])
    try:
        assert model.load() and model.ready
        response, _ = model.infer_sync({"instances": images.tolist()})
    finally:
        model.stop()
    preds = response["predictions"]
    want = OnnxStudent(folder, 1).logits(images).argmax(1)
    assert [p["top_k"][0]["index"] for p in preds] == want.tolist()
    np.testing.assert_allclose([sum(p["probabilities"]) for p in preds], 1.0, atol=1e-5)


def test_torch_backend_refuses_the_int8_student(quantized) -> None:
    """No int8 PyTorch weights exist: the torch backend refuses it, saying which backend serves it."""
    with pytest.raises(CheckpointError, match=rf"int8 student .*no {WEIGHTS_FILE}.*--backend onnx"):
        build_model("s3-int8", [quantized[0]], backend="torch").load()


def test_quantization_is_seeded_and_leaves_no_temp_files(
    fp32: Path, digits, tmp_path: Path, monkeypatch
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # ours and ORT's temp folders land here
    a = quantize_student(fp32, tmp_path / "a", digits.train.x, max_images=100, seed=1)
    b = quantize_student(fp32, tmp_path / "b", digits.train.x, max_images=100, seed=1)
    assert (a / ONNX_FILE).read_bytes() == (b / ONNX_FILE).read_bytes()
    q = read_student_config(a)["quantization"]
    assert (q["calibration_images"], q["calibration_seed"]) == (100, 1)
    assert list(scratch.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "scratch"]


# -- the check -----------------------------------------------------------------------------------------------


class _Scripted:
    """Stands in for OnnxStudent: fp32 is always right, int8 wrong on the first ``wrong`` images."""

    wrong = 0
    labels: np.ndarray = np.zeros(0, np.int64)

    def __init__(self, folder: Path, threads: int | None = None) -> None:
        self.precision = precision_of(read_student_config(folder))

    def logits(self, images: np.ndarray) -> np.ndarray:
        labels = _Scripted.labels
        pred = labels.copy()
        if self.precision == INT8:
            pred[: self.wrong] = (labels[: self.wrong] + 1) % 10
        return np.eye(10, dtype=np.float32)[pred]


@pytest.mark.parametrize(
    ("wrong", "max_drop", "passed"), [(0, 0.0, True), (1, 0.0, False), (4, 4.0, True), (5, 4.0, False)]
)
def test_max_drop_decides_passed(
    fp32: Path, quantized, monkeypatch, wrong: int, max_drop: float, passed
) -> None:
    """100 test images: each wrong one is exactly one point, so a drop equal to max_drop passes."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (100, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, 100)
    monkeypatch.setattr(_Scripted, "labels", labels)
    monkeypatch.setattr(_Scripted, "wrong", wrong)
    monkeypatch.setattr(quantize_mod, "OnnxStudent", _Scripted)
    check = check_quantized(fp32, quantized[0], images, labels, max_drop)
    assert (check.fp32_top1, check.int8_top1, check.drop) == (100.0, 100.0 - wrong, float(wrong))
    assert check.passed is passed and check.agreement == 100.0 - wrong


def test_a_failed_check_still_writes_the_folder(fp32: Path, digits, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(_Scripted, "labels", digits.test.y)
    monkeypatch.setattr(_Scripted, "wrong", 5)
    monkeypatch.setattr(quantize_mod, "OnnxStudent", _Scripted)
    check = quantize_and_check(fp32, tmp_path / "q", digits.train.x, digits.test.x, digits.test.y, max_drop=0)
    assert not check.passed and read_check(tmp_path / "q") == check


# -- errors --------------------------------------------------------------------------------------------------


def _copy_without_onnx(fp32: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "no-onnx"
    shutil.copytree(fp32, folder)
    (folder / ONNX_FILE).unlink()
    return folder


BAD_CALLS: list[tuple[str, Any, str]] = [
    ("max_drop", {"max_drop": -0.5}, "max_drop"),
    ("max_drop", {"max_drop": math.nan}, "max_drop"),
    ("max_drop", {"max_drop": True}, "max_drop"),
    ("max_images", {"max_images": 0}, "max_images"),
    ("calibration", {"train_images": np.zeros((0, 8, 8, 1), np.uint8)}, "calibration: no images"),
    ("calibration", {"train_images": np.zeros((4, 8, 8, 1), np.float32)}, "calibration: expected a uint8"),
    ("calibration", {"train_images": np.zeros((4, 8, 8, 3), np.uint8)}, r"calibration: .*\[N, 8, 8, 1\]"),
    ("calibration", {"train_images": [[0]]}, "calibration: expected a uint8"),
    ("test_images", {"test_images": np.zeros((4, 1, 8, 8), np.uint8)}, "test_images"),
    ("labels", {"test_labels": np.zeros(3, np.int64)}, "labels: 3 labels for 359 images"),
    ("labels", {"test_labels": np.full(359, 10)}, "labels: expected class indices 0..9"),
    ("labels", {"test_labels": np.zeros(359, np.float32)}, "labels: expected an integer"),
]
ERRORS = {
    "max_drop": ConfigError,
    "max_images": ConfigError,
    "calibration": DataError,
    "test_images": DataError,
    "labels": DataError,
}


@pytest.mark.parametrize(
    ("field", "change", "match"), BAD_CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_CALLS)]
)
def test_bad_inputs_raise_errors_naming_the_field(
    fp32: Path, digits, tmp_path: Path, field, change, match
) -> None:
    args: dict[str, Any] = {
        "train_images": digits.train.x,
        "test_images": digits.test.x,
        "test_labels": digits.test.y,
        "max_drop": 1.0,
    }
    kw = {k: v for k, v in change.items() if k not in args}
    args.update({k: v for k, v in change.items() if k in args})
    with pytest.raises(ERRORS[field], match=match):
        quantize_and_check(fp32, tmp_path / "out", **args, **kw)
    assert not (tmp_path / "out").exists()


def test_missing_onnx_and_int8_source_are_refused(fp32: Path, quantized, digits, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=f"no {ONNX_FILE}"):
        quantize_student(_copy_without_onnx(fp32, tmp_path), tmp_path / "out", digits.train.x)
    with pytest.raises(CheckpointError, match=r"student_dir: .* holds a student of precision int8"):
        quantize_student(quantized[0], tmp_path / "out", digits.train.x)
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        quantize_student(tmp_path, tmp_path / "out", digits.train.x)
    assert not (tmp_path / "out").exists()


def test_check_refuses_folders_that_do_not_belong_together(fp32: Path, quantized, digits, tmp_path) -> None:
    x, y = digits.test.x, digits.test.y
    with pytest.raises(CheckpointError, match=r"int8_dir: .* holds a student of precision fp32"):
        check_quantized(fp32, fp32, x, y, 1.0)
    other = tmp_path / "other"
    shutil.copytree(quantized[0], other)
    config = read_student_config(other)
    config["quantization"]["source_sha256"] = "0" * 64
    quantize_mod.write_json(other / "config.json", config)
    with pytest.raises(CheckpointError, match="source sha256 differs"):
        check_quantized(fp32, other, x, y, 1.0)


@pytest.mark.parametrize("where", ["source", "parent", "not-a-student"])
def test_out_dir_that_must_not_be_replaced_is_refused(fp32: Path, digits, tmp_path: Path, where: str) -> None:
    src = tmp_path / "work" / "s3"
    shutil.copytree(fp32, src)
    out = {"source": src, "parent": src.parent, "not-a-student": tmp_path / "notes"}[where]
    if where == "not-a-student":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(CheckpointError, match="out_dir"):
        quantize_student(src, out, digits.train.x)
    assert sorted(p.name for p in out.rglob("*")) == before


# -- atomicity -----------------------------------------------------------------------------------------------


def test_failure_mid_way_leaves_no_out_dir(fp32: Path, digits, tmp_path: Path, monkeypatch) -> None:
    """The int8 model is written, then the check fails: nothing appears, no temporary folder is left."""
    written: list[bool] = []

    def boom(fp32_dir: Path, int8_dir: Path, *args: Any) -> QuantizationCheck:
        written.append((Path(int8_dir) / ONNX_FILE).is_file())
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(quantize_mod, "check_quantized", boom)
    root = tmp_path / "out"
    root.mkdir()
    with pytest.raises(RuntimeError, match="killed mid-way"):
        quantize_and_check(fp32, root / "s3-int8", digits.train.x, digits.test.x, digits.test.y)
    assert written == [True] and os.listdir(root) == []


def test_failure_while_replacing_keeps_the_earlier_folder(
    quantized, fp32: Path, digits, tmp_path, monkeypatch
):
    earlier = tmp_path / "s3-int8"
    shutil.copytree(quantized[0], earlier)
    files = {p.name: p.read_bytes() for p in earlier.iterdir()}

    def boom(path: Any, data: Any, **kw: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(quantize_mod, "write_json", boom)  # after model.onnx, at config.json
    with pytest.raises(OSError, match="disk full"):
        quantize_student(fp32, earlier, digits.train.x)
    assert {p.name: p.read_bytes() for p in earlier.iterdir()} == files
    assert _siblings(earlier) == {"s3-int8"}
