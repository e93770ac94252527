"""The ``evaluate`` step: score exported students on a test split.

Per student: top-1/top-5 accuracy, confusion matrix, per-class accuracy, parameter count (from the
export's config), FLOPs of one forward at batch 1 and latency percentiles. Each student is fed exactly as
it will be served: uint8 images normalized with the mean/std stored in its own ``config.json``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from bockd.data import ImageSplit, to_model_input
from bockd.errors import DataError
from bockd.export import load_student, read_student_config

TOP_K = 5


@dataclass
class StudentEvaluation:
    name: str
    student: str  # label, e.g. "S3"
    index: int
    params: int
    size_pct: float
    top1: float  # percent
    top5: float  # percent; top-k with k = min(5, classes)
    num_test: int
    confusion: list[list[int]]  # rows = true class, cols = predicted
    per_class_accuracy: list[float | None]  # percent; None for a class absent from the split
    flops: int
    latency_ms: dict[int, dict[str, float]] = field(default_factory=dict)
    folder: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        # JSON object keys must be strings.
        out["latency_ms"] = {str(b): dict(v) for b, v in self.latency_ms.items()}
        return out


def check_split(config: dict[str, Any], split: ImageSplit, folder: Path) -> None:
    """Raise DataError unless ``split`` matches the student's input shape and label range."""
    if split.x.ndim != 4:
        raise DataError(f"test split: expected images [N, H, W, C], got shape {list(split.x.shape)}")
    if len(split) == 0:
        raise DataError("test split: is empty")
    c, h, w = config["input_shape"]
    got = tuple(int(d) for d in split.x.shape[1:])
    if got != (h, w, c):
        raise DataError(
            f"test split: image shape (H, W, C) {got} differs from {folder}'s input_shape "
            f"[C, H, W] {[c, h, w]} (expected (H, W, C) {(h, w, c)})"
        )
    if split.x.shape[0] != split.y.shape[0]:
        raise DataError(f"test split: {split.x.shape[0]} images but {split.y.shape[0]} labels")
    n = int(config["num_classes"])
    lo, hi = int(split.y.min()), int(split.y.max())
    if lo < 0 or hi >= n:
        raise DataError(
            f"test split: labels span [{lo}, {hi}] but {folder} has num_classes {n} (expected 0..{n - 1})"
        )


def count_flops(model: torch.nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs (2 x multiply-accumulates) of one forward at batch 1, as torch's flop counter counts them."""
    x = torch.zeros(1, *input_shape, device=next(model.parameters()).device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return int(counter.get_total_flops())


def measure_latency(
    model: torch.nn.Module,
    input_shape: Sequence[int],
    device: torch.device,
    batch_sizes: Sequence[int],
    iters: int,
    warmup: int = 3,
) -> dict[int, dict[str, float]]:
    """p50/p99 wall time in ms of one forward per batch size, after warm-up (lazy init, allocator, cudnn)."""
    cuda = device.type == "cuda"
    out: dict[int, dict[str, float]] = {}
    with torch.no_grad():
        for b in batch_sizes:
            x = torch.randn(int(b), *input_shape, device=device)
            for _ in range(warmup):
                model(x)
            times = []
            for _ in range(max(1, iters)):
                if cuda:  # time the kernels, not just their launch
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                model(x)
                if cuda:
                    torch.cuda.synchronize(device)
                times.append((time.perf_counter() - t0) * 1000.0)
            p50, p99 = np.percentile(times, [50, 99])
            out[int(b)] = {"p50": float(p50), "p99": float(p99)}
    return out


def evaluate_student(
    folder: Path,
    split: ImageSplit,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    latency_batch_sizes: Sequence[int] = (1, 32),
    latency_iters: int = 20,
) -> StudentEvaluation:
    """Evaluate the exported student in ``folder`` on ``split`` (uint8 NHWC images, int labels)."""
    folder = Path(folder)
    config = read_student_config(folder)
    check_split(config, split, folder)
    dev = torch.device(device)
    model = load_student(folder, device=dev)
    n_cls = int(config["num_classes"])
    k = min(TOP_K, n_cls)

    y_all = torch.as_tensor(split.y, dtype=torch.int64)
    preds, top_hits = [], 0
    with torch.no_grad():
        for start in range(0, len(split), batch_size):
            xb = torch.as_tensor(split.x[start : start + batch_size]).to(dev)
            yb = y_all[start : start + batch_size].to(dev)
            logits = model(to_model_input(xb, config["mean"], config["std"], channels_last=False))
            topk = logits.topk(k, dim=1).indices
            top_hits += int((topk == yb[:, None]).any(dim=1).sum())
            preds.append(topk[:, 0].cpu())
    pred = torch.cat(preds)
    confusion = torch.bincount(y_all * n_cls + pred, minlength=n_cls * n_cls).reshape(n_cls, n_cls)
    support = confusion.sum(dim=1)
    diag = confusion.diag()
    num_test = len(split)
    per_class = [100.0 * int(diag[i]) / int(support[i]) if int(support[i]) else None for i in range(n_cls)]

    shape = config["input_shape"]
    return StudentEvaluation(
        name=config["name"],
        student=config["student"],
        index=int(config["index"]),
        params=int(config["params"]),
        size_pct=float(config["size_pct"]),
        top1=100.0 * int(diag.sum()) / num_test,
        top5=100.0 * top_hits / num_test,
        num_test=num_test,
        confusion=confusion.tolist(),
        per_class_accuracy=per_class,
        flops=count_flops(model, shape),
        latency_ms=measure_latency(model, shape, dev, latency_batch_sizes, latency_iters),
        folder=str(folder),
    )


def evaluate_students(folders: Sequence[Path], split: ImageSplit, **kw: Any) -> list[StudentEvaluation]:
    return [evaluate_student(Path(f), split, **kw) for f in folders]


def confusion_matrix_png(evaluation: StudentEvaluation, classes: Sequence[str], path: Path) -> Path:
    """Write the confusion matrix as a PNG heatmap; cell counts are printed when there are <= 20 classes."""
    import matplotlib

    matplotlib.use("Agg")  # headless: pipeline steps have no display
    import matplotlib.pyplot as plt

    cm = np.asarray(evaluation.confusion)
    n = cm.shape[0]
    if len(classes) != n:
        raise DataError(f"classes: {len(classes)} names for a {n}-class confusion matrix")
    side = min(4.0 + 0.45 * n, 30.0)
    fig, ax = plt.subplots(figsize=(side, side))
    try:
        im = ax.imshow(cm, cmap="Blues")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        fontsize = 9 if n <= 20 else max(3, int(180 / n))
        ax.set_xticks(range(n), [str(c) for c in classes], rotation=90, fontsize=fontsize)
        ax.set_yticks(range(n), [str(c) for c in classes], fontsize=fontsize)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{evaluation.name} ({evaluation.student}): top-1 {evaluation.top1:.2f}%")
        if n <= 20:
            thresh = cm.max() / 2 if cm.size else 0
            for i in range(n):
                for j in range(n):
                    ax.text(
                        j,
                        i,
                        str(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if cm[i, j] > thresh else "black",
                    )
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def evaluations_table_markdown(evals: Sequence[StudentEvaluation]) -> str:
    header = "| student | params | size % | top-1 % | top-5 % | FLOPs (M) | p50 latency @1 (ms) |"
    rows = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    for e in evals:
        lat = e.latency_ms.get(1)
        p50 = f"{lat['p50']:.3f}" if lat else "n/a"
        rows.append(
            f"| {e.student} ({e.name}) | {e.params:,} | {e.size_pct:.2f} | {e.top1:.2f} | {e.top5:.2f} "
            f"| {e.flops / 1e6:.2f} | {p50} |"
        )
    return "\n".join(rows) + "\n"
