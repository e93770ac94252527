"""Training throughput of the BOC-KD ensemble step against the N separate baseline steps.

For each architecture: images/s of one full ensemble step (forward of all students, BOC-KD loss,
backward, optimizer step) at the given batch size, images/s of each student's baseline step
(CE only), and the ratio of one ensemble step to the N baseline steps together: below 1 means one
BOC-KD run costs less than training the N students one by one, which it must, since the base is shared.

It times ``bockd.engine.Trainer.train_step``, the very step training uses, with the engine's
settings (bf16 autocast and channels_last on CUDA, ``--compile`` for torch.compile).

    python benchmarks/train_step.py --archs resnet20 resnet110 --batch-size 128

Writes ``<out>/train_step-<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bockd.config import build_config
from bockd.data import ImageDataset, ImageSplit
from bockd.engine import Trainer


def synthetic_dataset(image_size: int, channels: int, num_classes: int, n: int = 256) -> ImageDataset:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, image_size, image_size, channels), dtype=np.uint8)
    y = np.arange(n, dtype=np.int64) % num_classes
    split = ImageSplit(x=x, y=y)
    return ImageDataset(
        name="synthetic", classes=[str(c) for c in range(num_classes)], train=split, test=split
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(trainer: Trainer, batch_size: int, warmup: int, iters: int) -> float:
    """Median seconds of one training step on a fixed, device-resident batch."""
    x, y = next(iter(trainer.train_loader.epoch(0)))
    reps = -(-batch_size // x.shape[0])
    x, y = x.repeat(reps, 1, 1, 1)[:batch_size], y.repeat(reps)[:batch_size]
    if trainer.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    trainer.model.train()
    for _ in range(warmup):
        trainer.train_step(x, y)
    _sync(trainer.device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        trainer.train_step(x, y)
        _sync(trainer.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def bench_arch(arch: str, args: argparse.Namespace, dataset: ImageDataset) -> dict[str, Any]:
    runtime = {"device": args.device, "compile": args.compile, "progress": "off"}
    common = {
        "batch_size": args.batch_size,
        "model": {"arch": arch, "num_students": args.num_students},
        "runtime": runtime,
        "data": {"dataset": "cifar10"},
    }
    ensemble = Trainer(build_config("paper-cifar10", common), dataset, args.workdir)
    t_ens = time_step(ensemble, args.batch_size, args.warmup, args.iters)
    row: dict[str, Any] = {
        "arch": arch,
        "device": str(ensemble.device),
        "bf16": ensemble.amp,
        "channels_last": ensemble.channels_last,
        "compile": args.compile,
        "batch_size": args.batch_size,
        "ensemble_step_s": t_ens,
        "ensemble_images_per_s": args.batch_size / t_ens,
        "baselines": [],
    }
    del ensemble
    for k in range(args.num_students):
        cfg = build_config("paper-cifar10", {**common, "mode": "baseline", "student": k})
        t = time_step(Trainer(cfg, dataset, args.workdir), args.batch_size, args.warmup, args.iters)
        row["baselines"].append({"student": f"S{k + 1}", "step_s": t, "images_per_s": args.batch_size / t})
    total = sum(b["step_s"] for b in row["baselines"])
    row["baselines_total_step_s"] = total
    row["ensemble_over_baselines"] = t_ens / total
    print(
        f"{arch}: ensemble {row['ensemble_images_per_s']:.0f} img/s, "
        f"{args.num_students} baselines {args.batch_size / total:.0f} img/s, ratio {t_ens / total:.2f}",
        file=sys.stderr,
    )
    return row


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    where = m.get("gpu") or f"{m['cpu']} ({m['cpu_threads']} threads)"
    lines = [
        f"Machine: {where}; torch {m['torch']}. Command: `{report['command']}`",
        "",
        "| arch | device | bf16 | compile | batch | ensemble img/s | "
        + " | ".join(f"S{k + 1} baseline img/s" for k in range(report["num_students"]))
        + " | ensemble step / sum of baseline steps |",
        "|---|---|---|---|---:|---:|" + "---:|" * report["num_students"] + "---:|",
    ]
    for r in report["results"]:
        base = " | ".join(f"{b['images_per_s']:.0f}" for b in r["baselines"])
        lines.append(
            f"| {r['arch']} | {r['device']} | {r['bf16']} | {r['compile']} | {r['batch_size']} "
            f"| {r['ensemble_images_per_s']:.0f} | {base} | {r['ensemble_over_baselines']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=["resnet20", "resnet110"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-students", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)

    dataset = synthetic_dataset(32, 3, 10)
    args.workdir = tempfile.mkdtemp(prefix="bockd-bench-")  # trainers write nothing here: no fit() is called
    report = {
        "benchmark": "train_step",
        "command": "python benchmarks/train_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "num_students": args.num_students,
        "results": [bench_arch(arch, args, dataset) for arch in args.archs],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = report["results"][0]["device"].split(":")[0]
    (out / f"train_step-{device}.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out / f"train_step-{device}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
