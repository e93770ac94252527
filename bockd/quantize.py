"""int8 students: ONNX Runtime static quantization of an exported student, and its accuracy check.

``quantize_student`` turns an exported student folder (``bockd.export``) into an int8 one: its
``model.onnx`` goes through ONNX Runtime's pre-processing (``quant_pre_process``: symbolic and ONNX shape
inference, graph optimization) and then ``quantize_static``: QDQ format (QuantizeLinear/DequantizeLinear
pairs around each operator, fused by ONNX Runtime into integer kernels at load time), int8 weights with
one scale per output channel, 8-bit (uint8) activations whose ranges (MinMax) come from calibration images
of the training split. ``check_quantized`` scores both on the same test images with ONNX Runtime,
exactly as the model server runs them (``bockd.onnx_student``), and says whether the int8 top-1 stays
within ``max_drop`` points of the fp32 one. Only ONNX Runtime and numpy are needed: no PyTorch.

The int8 folder is a servable student (``config.json`` + ``model.onnx``, backend onnx) with
``"precision": "int8"`` in its config card and no ``model.safetensors``: there are no int8 PyTorch weights.

Sources:
- ONNX Runtime, "Quantize ONNX Models":
  https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html (pre-processing, static
  quantization, QDQ vs QOperator, data type selection, per-channel and reduce-range FAQ).
- ``onnxruntime.quantization.quantize_static``'s docstring, "Choosing parameters for CPU inference" (QDQ;
  uint8 activations and int8 weights on x86-64, ``reduce_range`` only without VNNI), and
  ``CalibrationDataReader``:
  https://github.com/microsoft/onnxruntime/blob/main/onnxruntime/python/tools/quantization/quantize.py
  and .../quantization/calibrate.py; ``quant_pre_process``: .../quantization/shape_inference.py.
"""

from __future__ import annotations

import hashlib
import logging
import math
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bockd.atomic import atomic_dir, write_json
from bockd.errors import CheckpointError, ConfigError, DataError
from bockd.export_format import (
    CONFIG_FILE,
    ONNX_FILE,
    is_replaceable_student_folder,
    read_json,
    read_student_config,
)
from bockd.onnx_student import OnnxStudent, normalize_uint8

__all__ = [
    "CALIBRATION_BATCH",
    "CHECK_FILE",
    "CHECK_FORMAT",
    "FP32",
    "INT8",
    "PRECISION_KEY",
    "QUANTIZATION_KEY",
    "QuantizationCheck",
    "check_quantized",
    "precision_of",
    "quantize_and_check",
    "quantize_student",
    "read_check",
]

INT8 = "int8"
FP32 = "fp32"
PRECISION_KEY = "precision"  # config.json key; an exported (fp32) student has none
QUANTIZATION_KEY = "quantization"  # config.json key: how the int8 model was made
CHECK_FILE = "quantization.json"  # the accuracy check, written beside the int8 model
CHECK_FORMAT = "bockd-quantization-check/1"
CALIBRATION_BATCH = 64  # images per calibration run: the batch dimension is dynamic

log = logging.getLogger(__name__)


def precision_of(config: dict[str, Any]) -> str:
    """A student config card's precision: its ``"precision"``, or ``FP32`` when it has none (exports)."""
    return str(config.get(PRECISION_KEY, FP32))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_images(name: str, images: Any, config: dict[str, Any]) -> np.ndarray:
    """``images`` as uint8 ``[N, H, W, C]`` of the student's input size, N >= 1; else DataError naming it."""
    c, h, w = config["input_shape"]
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        what = f"{images.dtype} {list(images.shape)}" if isinstance(images, np.ndarray) else type(images)
        raise DataError(f"{name}: expected a uint8 numpy array [N, {h}, {w}, {c}], got {what}")
    if tuple(images.shape[1:]) != (h, w, c):
        raise DataError(
            f"{name}: the student takes [N, {h}, {w}, {c}] uint8 images, got {list(images.shape)}"
        )
    if len(images) == 0:
        raise DataError(f"{name}: no images (an empty set cannot calibrate or score a student)")
    return images


def _check_labels(labels: Any, n: int, num_classes: int) -> np.ndarray:
    if not isinstance(labels, np.ndarray) or labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        what = f"{labels.dtype} {list(labels.shape)}" if isinstance(labels, np.ndarray) else type(labels)
        raise DataError(f"labels: expected an integer numpy array [N], got {what}")
    if len(labels) != n:
        raise DataError(f"labels: {len(labels)} labels for {n} images")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"labels: expected class indices 0..{num_classes - 1}, got {labels.min()}..{labels.max()}"
        )
    return labels


def _check_max_drop(max_drop: Any) -> float:
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not math.isfinite(max_drop):
        raise ConfigError(f"max_drop: expected a finite number of top-1 points >= 0, got {max_drop!r}")
    if max_drop < 0:
        raise ConfigError(f"max_drop: the allowed top-1 drop must be >= 0 points, got {max_drop}")
    return float(max_drop)


def _fp32_source(folder: Path, field: str) -> tuple[dict[str, Any], Path]:
    """The fp32 student's config card and its model.onnx; CheckpointError naming ``field`` otherwise."""
    config = read_student_config(folder)
    if precision_of(config) != FP32:
        raise CheckpointError(
            f"{field}: {folder} holds a student of precision {precision_of(config)}; quantize and compare "
            f"against the exported {FP32} student"
        )
    onnx_path = folder / ONNX_FILE
    if not onnx_path.is_file():
        raise CheckpointError(f"{field}: {folder} has no {ONNX_FILE}; export the student with ONNX")
    return config, onnx_path


def _check_out_dir(student_dir: Path, out_dir: Path) -> None:
    # atomic_dir deletes the old out_dir whole: never the source, a folder holding it, or a folder that is
    # not an earlier student (``--out .`` must not wipe the working directory).
    src, out = student_dir.resolve(), out_dir.resolve()
    if src == out or out in src.parents:
        raise CheckpointError(f"out_dir: {out_dir} is or holds the source student {student_dir}")
    if out_dir.exists() and not is_replaceable_student_folder(out_dir):
        raise CheckpointError(
            f"out_dir: {out_dir} exists and is not a student folder; refusing to replace it "
            "(choose a new or empty folder)"
        )


def _calibration_sample(calibration: np.ndarray, max_images: int, seed: int) -> np.ndarray:
    """Up to ``max_images`` images drawn without replacement, uniformly (labels unseen), seeded."""
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise ConfigError(f"max_images: expected an integer >= 1, got {max_images!r}")
    if len(calibration) <= max_images:
        return calibration
    index = np.random.default_rng(seed).choice(len(calibration), size=max_images, replace=False)
    return calibration[np.sort(index)]  # sorted: the same images in the same order for the same seed


def _calibration_reader(images: np.ndarray, config: dict[str, Any]) -> Any:
    """An ORT CalibrationDataReader feeding ``{"input": float32 NCHW}`` batches, normalized like serving.

    ORT's MinMax calibrator keeps only each batch's per-tensor min and max, so memory does not grow with
    the number of calibration images beyond the images themselves.
    """
    from onnxruntime.quantization import CalibrationDataReader

    def batches() -> Iterator[dict[str, np.ndarray]]:
        for i in range(0, len(images), CALIBRATION_BATCH):
            x = normalize_uint8(images[i : i + CALIBRATION_BATCH], config["mean"], config["std"])
            yield {"input": np.ascontiguousarray(x)}

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = batches()

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    return _Reader()


@dataclass(frozen=True)
class _Plan:
    """Validated inputs of one quantization: checked before any folder is created."""

    student_dir: Path
    out_dir: Path
    config: dict[str, Any]
    onnx_path: Path
    images: np.ndarray  # the calibration sample
    per_channel: bool
    reduce_range: bool
    seed: int


def _plan(
    student_dir: str | Path,
    out_dir: str | Path,
    calibration: Any,
    *,
    per_channel: bool = True,
    reduce_range: bool = False,
    max_images: int = 512,
    seed: int = 0,
) -> _Plan:
    student_dir, out_dir = Path(student_dir), Path(out_dir)
    config, onnx_path = _fp32_source(student_dir, "student_dir")
    _check_out_dir(student_dir, out_dir)
    images = _calibration_sample(_check_images("calibration", calibration, config), max_images, seed)
    return _Plan(student_dir, out_dir, config, onnx_path, images, bool(per_channel), bool(reduce_range), seed)


def _quantize_into(plan: _Plan, folder: Path) -> None:
    """Write the int8 ``model.onnx`` and ``config.json`` into the empty ``folder``."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    config = plan.config
    with tempfile.TemporaryDirectory(prefix="bockd-quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            # Shape inference + ORT graph optimization first, as the ORT docs recommend (not inside
            # quantize_static, which no longer optimizes by default).
            quant_pre_process(str(plan.onnx_path), str(prepared))
            quantize_static(
                str(prepared),
                str(folder / ONNX_FILE),
                _calibration_reader(plan.images, config),
                # QDQ: what ORT's CPU kernels are optimized for since 1.11. uint8 activations with int8
                # weights (U8S8): quantize_static's own guidance for x86-64 CPUs, where the model server
                # runs. On x86 ORT rewrites int8 QDQ activations to uint8 at load time anyway
                # (QDQS8ToU8Transformer); ARM CPUs run U8S8 too, though ORT prefers int8 activations there.
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                # One scale per output channel: conv filters of one layer differ widely in range.
                per_channel=plan.per_channel,
                # 7-bit weights: against U8S8 saturation on AVX2/AVX-512 CPUs without VNNI (ORT's guidance).
                reduce_range=plan.reduce_range,
                calibrate_method=CalibrationMethod.MinMax,
            )
        except (OSError, ValueError, RuntimeError) as err:  # ORT raises plain Python errors here
            raise CheckpointError(f"{plan.onnx_path} cannot be quantized by ONNX Runtime: {err}") from err
    int8_config = {
        **config,
        "name": f"{config.get('name', plan.student_dir.name)}-{INT8}",
        PRECISION_KEY: INT8,
        QUANTIZATION_KEY: {
            "method": "static",
            "format": "QDQ",
            "activations": "uint8",
            "weights": INT8,
            "per_channel": plan.per_channel,
            "reduce_range": plan.reduce_range,
            "calibrate_method": "MinMax",
            "calibration_images": len(plan.images),
            "calibration_seed": plan.seed,
            "onnxruntime": ort.__version__,
            "source_sha256": _sha256(plan.onnx_path),
        },
    }
    write_json(folder / CONFIG_FILE, int8_config)


def quantize_student(
    student_dir: str | Path,
    out_dir: str | Path,
    calibration: np.ndarray,
    *,
    per_channel: bool = True,
    reduce_range: bool = False,
    max_images: int = 512,
    seed: int = 0,
) -> Path:
    """Write an int8 copy of the exported student ``student_dir`` to ``out_dir``; return ``out_dir``.

    ``calibration``: uint8 ``[N, H, W, C]`` images of the student's input size (the training split);
    up to ``max_images`` of them, drawn without replacement with ``seed`` regardless of class, are
    normalized with the student's mean/std and fed to ONNX Runtime in batches of ``CALIBRATION_BATCH``
    to fix each activation's int8 range (MinMax). Weights: int8, one scale per output channel
    (``per_channel``); ``reduce_range``: 7-bit weights (see the module's sources).

    ``out_dir`` gets ``model.onnx`` (QDQ int8) and ``config.json``: the fp32 card with ``"name"`` suffixed
    ``-int8``, ``"precision": "int8"`` and ``"quantization"`` (method, format, per_channel, calibration
    images and seed, ONNX Runtime version, sha256 of the source ``model.onnx``). It appears whole or not
    at all, replacing an earlier student folder there.

    Raises CheckpointError (``student_dir`` is not an fp32 student with ``model.onnx``; ``out_dir`` is the
    source, holds it, or is a folder that is not a student; ONNX Runtime fails), DataError
    (``calibration``: not uint8 NHWC of the input size, or empty), ConfigError (``max_images`` < 1).
    """
    plan = _plan(
        student_dir,
        out_dir,
        calibration,
        per_channel=per_channel,
        reduce_range=reduce_range,
        max_images=max_images,
        seed=seed,
    )
    with atomic_dir(plan.out_dir, CheckpointError) as tmp:  # readable by others: a server reads it
        _quantize_into(plan, tmp)
    return plan.out_dir


@dataclass(frozen=True)
class QuantizationCheck:
    """The int8 student against its fp32 source on the same test images.

    Top-1s and ``drop`` are in percentage points (``drop`` = fp32 - int8, negative when int8 scores
    higher); ``agreement``: percent of test images on which both predict the same class. ``passed``:
    ``drop <= max_drop``. Sizes are the two ``model.onnx`` files, in bytes.
    """

    student: str
    fp32_top1: float
    int8_top1: float
    drop: float
    max_drop: float
    passed: bool
    agreement: float
    fp32_bytes: int
    int8_bytes: int
    num_test: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_quantized(
    fp32_dir: str | Path,
    int8_dir: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    max_drop: float,
    *,
    threads: int | None = None,
) -> QuantizationCheck:
    """Score the fp32 student and its int8 copy with ONNX Runtime on the same test images.

    ``images``: uint8 ``[N, H, W, C]``; ``labels``: integer class indices ``[N]``. ``max_drop``: the
    largest allowed top-1 drop, in points (>= 0). Top-1 is the first largest logit (numpy argmax); the
    drop is computed from the counts of correct images, so a drop of exactly ``max_drop`` passes.
    ``threads``: ONNX Runtime's intra-op threads (None: its default).

    Raises ConfigError (``max_drop``), DataError (``images``, ``labels``), CheckpointError (a folder is
    not the expected fp32 / int8 student, or ``int8_dir`` was not made from ``fp32_dir``'s model.onnx).
    """
    max_drop = _check_max_drop(max_drop)
    fp32_dir, int8_dir = Path(fp32_dir), Path(int8_dir)
    config, fp32_onnx = _fp32_source(fp32_dir, "fp32_dir")
    int8_config = read_student_config(int8_dir)
    if precision_of(int8_config) != INT8:
        raise CheckpointError(
            f"int8_dir: {int8_dir} holds a student of precision {precision_of(int8_config)}, not {INT8}"
        )
    source = int8_config.get(QUANTIZATION_KEY, {}).get("source_sha256")
    if source != _sha256(fp32_onnx):
        raise CheckpointError(
            f"int8_dir: {int8_dir} was not quantized from {fp32_onnx} (source sha256 differs)"
        )
    images = _check_images("images", images, config)
    labels = _check_labels(labels, len(images), int(config["num_classes"]))
    fp32_pred = OnnxStudent(fp32_dir, threads).logits(images).argmax(axis=1)
    int8_pred = OnnxStudent(int8_dir, threads).logits(images).argmax(axis=1)
    n = len(labels)
    fp32_ok, int8_ok = int((fp32_pred == labels).sum()), int((int8_pred == labels).sum())
    drop = 100.0 * (fp32_ok - int8_ok) / n
    return QuantizationCheck(
        student=str(config.get("student", config.get("name", fp32_dir.name))),
        fp32_top1=100.0 * fp32_ok / n,
        int8_top1=100.0 * int8_ok / n,
        drop=drop,
        max_drop=max_drop,
        passed=drop <= max_drop,
        agreement=float(100.0 * (fp32_pred == int8_pred).mean()),
        fp32_bytes=fp32_onnx.stat().st_size,
        int8_bytes=(int8_dir / ONNX_FILE).stat().st_size,
        num_test=n,
    )


def quantize_and_check(
    student_dir: str | Path,
    out_dir: str | Path,
    train_images: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    max_drop: float = 1.0,
    **kw: Any,
) -> QuantizationCheck:
    """`quantize_student` (``kw``: its keyword options) then `check_quantized`, into one folder.

    ``out_dir`` appears whole with the int8 model, its config and ``quantization.json`` (the check with
    ``"format": CHECK_FORMAT``), whether or not the check passed: the caller decides what to do with a
    failed one (the pipeline registers only passed ones). Inputs are validated before any work. Raises
    what those two raise.
    """
    max_drop = _check_max_drop(max_drop)
    plan = _plan(student_dir, out_dir, train_images, **kw)
    _check_images("test_images", test_images, plan.config)
    _check_labels(test_labels, len(test_images), int(plan.config["num_classes"]))
    with atomic_dir(plan.out_dir, CheckpointError) as tmp:
        _quantize_into(plan, tmp)
        check = check_quantized(plan.student_dir, tmp, test_images, test_labels, max_drop)
        write_json(tmp / CHECK_FILE, {"format": CHECK_FORMAT, **check.to_dict()})
    log.info(
        "%s int8: top-1 %.2f vs fp32 %.2f (drop %.2f, limit %.2f): %s",
        check.student,
        check.int8_top1,
        check.fp32_top1,
        check.drop,
        check.max_drop,
        "passed" if check.passed else "FAILED",
    )
    return check


def read_check(folder: str | Path) -> QuantizationCheck:
    """The `QuantizationCheck` that `quantize_and_check` wrote into ``folder``; CheckpointError if none."""
    path = Path(folder) / CHECK_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {CHECK_FILE}; run quantize_and_check")
    data = read_json(path)
    if data.pop("format", None) != CHECK_FORMAT:
        raise CheckpointError(f"{path}: format is not {CHECK_FORMAT!r}")
    try:
        return QuantizationCheck(**data)
    except TypeError as err:
        raise CheckpointError(f"{path}: {err}") from err
