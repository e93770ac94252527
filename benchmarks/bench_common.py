"""What the benchmark scripts share: the machine they ran on, the synthetic CIFAR-shaped data they time."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bockd.data import ImageDataset, ImageSplit
from bockd.platform.serving_benchmark import cpu_model

__all__ = ["command_line", "cpu_model", "machine", "run_dataset", "synthetic_dataset", "write_report"]


def synthetic_dataset(n: int, image_size: int = 32, channels: int = 3, num_classes: int = 10) -> ImageDataset:
    """``n`` seeded random uint8 images (train and test alike): weights and speed do not depend on content."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, image_size, image_size, channels), dtype=np.uint8)
    y = np.arange(n, dtype=np.int64) % num_classes
    split = ImageSplit(x=x, y=y)
    return ImageDataset(
        name="synthetic", classes=[str(c) for c in range(num_classes)], train=split, test=split
    )


def run_dataset(card: dict, data_path: str | None) -> ImageDataset:
    """The dataset a finished run trained on (its ``model.json`` card: data settings and sha256), read from
    ``data_path`` (default: the run's ``data.path``); DataError when the content is not the run's."""
    from bockd.config import build_config
    from bockd.engine import load_training_data
    from bockd.errors import DataError

    settings = dict(card["config"]["data"])
    if data_path:
        settings["path"] = data_path
    dataset = load_training_data(build_config(None, {"data": settings}))
    recorded = card["dataset"]["sha256"]
    if dataset.sha256() != recorded:
        raise DataError(
            f"data: the data read is not the run's (sha256 {dataset.sha256()[:12]} != {recorded[:12]}); "
            "is --data-path the run's dataset?"
        )
    return dataset


def machine(load_start: float, **extra: Any) -> dict[str, Any]:
    """What a report says about the machine: CPU model, cores, ``extra`` (e.g. threads) and the 1-minute
    load average at the start (``load_start``) and now, so a busy machine shows in the figures' record."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        **extra,
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
    }


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command that made a report (``argv`` as given to ``main``, else the process's own)."""
    return f"python {script} " + " ".join(argv if argv is not None else sys.argv[1:])


def write_report(
    out: Path,
    stem: str,
    report: dict[str, Any],
    markdown: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any], Path], None],
) -> None:
    """``<out>/<stem>.json``, ``.md`` (``markdown(report)``) and ``.png`` (``plot``); prints the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (out / f"{stem}.md").write_text(md)
    plot(report, out / f"{stem}.png")
    print(md)
