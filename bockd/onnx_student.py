"""An exported student's ``model.onnx`` on ONNX Runtime (CPU), fed uint8 images: no PyTorch needed.

Quantization (``bockd.quantize``) and the confidence cascade (``bockd.cascade``) score students exactly as
the model server runs them: the same ONNX file, the same normalization ``(x / 255 - mean) / std`` over
uint8 NHWC images (``bockd.data.augment.normalize`` does it in torch for training).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bockd.errors import CheckpointError, DataError
from bockd.export_format import ONNX_FILE, read_student_config

__all__ = ["OnnxStudent", "normalize_uint8", "onnx_session", "softmax", "topk_accuracy"]


def normalize_uint8(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 ``[N, H, W, C]`` -> float32 ``[N, C, H, W]`` computing ``(x / 255 - mean) / std`` per channel."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"images: expected uint8 [N, H, W, C], got {images.dtype} {list(images.shape)}")
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    return (x - m) / s


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``[N, K]`` logits in float32 (max subtracted first: no overflow)."""
    z = logits.astype(np.float32) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Percent of rows whose label is among the ``k`` largest logits (``k`` capped at the class count)."""
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float(100.0 * (top == labels[:, None]).any(axis=1).mean())


def onnx_session(folder: Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU ``InferenceSession`` on ``folder``'s ``model.onnx`` with ``threads`` intra-op
    threads (None or 0: ONNX Runtime's default). Raises `CheckpointError` when the file is missing or ONNX
    Runtime cannot load it. onnxruntime is imported here, so importing this module stays cheap."""
    import onnxruntime as ort

    path = Path(folder) / ONNX_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {ONNX_FILE}; export the student with ONNX")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
        raise CheckpointError(f"{path} cannot be loaded by ONNX Runtime: {err}") from err


class OnnxStudent:
    """``folder``'s ``model.onnx`` (an exported or quantized student) with its ``config.json``.

    ``threads``: ONNX Runtime's intra-op threads (None: its default). Raises `CheckpointError` when the
    folder holds no loadable student.
    """

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        self.folder = Path(folder)
        self.config: dict[str, Any] = read_student_config(self.folder)
        self.session = onnx_session(self.folder, threads)

    @property
    def input_hwc(self) -> tuple[int, int, int]:
        c, h, w = self.config["input_shape"]
        return h, w, c

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``[N, H, W, C]`` of this student's input size -> its float32 NCHW input."""
        if tuple(images.shape[1:]) != self.input_hwc:
            raise DataError(
                f"images: {self.folder.name} takes [N, {', '.join(map(str, self.input_hwc))}] uint8, "
                f"got {list(images.shape)}"
            )
        return normalize_uint8(images, self.config["mean"], self.config["std"])

    def run(self, x: np.ndarray) -> np.ndarray:
        """float32 NCHW (already normalized) -> logits ``[N, K]``."""
        return self.session.run(["logits"], {"input": x})[0]

    def logits(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """uint8 ``[N, H, W, C]`` -> float32 logits ``[N, K]``, ``batch_size`` images per run."""
        out = [
            self.run(self.normalize(images[i : i + batch_size])) for i in range(0, len(images), batch_size)
        ]
        if not out:
            return np.zeros((0, int(self.config["num_classes"])), np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    def forward_ms(self, images: np.ndarray, repeats: int = 20, warmup: int = 3) -> float:
        """Median wall time (ms) of one ONNX Runtime run on ``images`` (uint8 NHWC, normalized once,
        outside the timing), after ``warmup`` runs: the raw forward cost, no server, no decoding."""
        import time

        if repeats < 1 or warmup < 0:
            raise ValueError(f"repeats >= 1 and warmup >= 0 expected, got {repeats}, {warmup}")
        x = self.normalize(images)
        for _ in range(warmup):
            self.run(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            self.run(x)
            times.append(time.perf_counter() - start)
        return float(np.median(times) * 1000.0)
