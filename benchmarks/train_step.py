"""Training throughput of the BOC-KD ensemble step against the N separate baseline steps.

For each architecture: images/s of one full ensemble step (forward of all students, BOC-KD loss,
backward, optimizer step) at the given batch size, images/s of each student's baseline step
(CE only), and the ratio of one ensemble step to the N baseline steps together: below 1 means one
BOC-KD run costs less than training the N students one by one, which it must, since the base is shared.

It times ``bockd.engine.Trainer.train_step``, the very step training uses, with the engine's
settings (bf16 autocast, channels_last, cuDNN autotuning and a fused optimizer on CUDA; ``--compile`` and
``--compile-mode`` for torch.compile, ``--cuda-graph`` for the whole-step CUDA graph).

    python benchmarks/train_step.py --archs resnet20 resnet110 --batch-size 128

Writes ``<out>/train_step-<device>.json`` and ``.md`` (``train_step-<device>-<tag>`` with ``--tag``).
On CUDA a step's time is the mean of ``--iters`` back-to-back steps between two synchronizations (the
median of ``--rounds`` such runs): how training runs, with no sync per step. On CPU each step is timed.

Multi-process mode (DDP, the engine's own sharding): ``--nproc N [N ...]`` launches, for each N and for
1, ``python -m torch.distributed.run --standalone --nproc_per_node N`` on this script (gloo on CPU, NCCL on
CUDA, chosen by the engine). Every rank builds the same Trainer as training does, takes its slice of the
same global batch (``--batch-size`` stays the global batch) and times ``train_step``; a step's time is the
slowest rank's (ranks start each step together after a barrier), its median over ``--iters`` steps is the
group's step time, and ``--batch-size`` / that is the group's images/s. Scaling efficiency is
N-process images/s / (N x 1-process images/s). Only the ensemble step is timed in this mode.

    OMP_NUM_THREADS=1 python benchmarks/train_step.py --archs resnet20 --batch-size 64 --nproc 2 \
        --threads-per-rank 1

writes ``<out>/train_step-ddp-<device>.json`` and ``.md`` (the single-process files are left alone).

``--epoch-estimate`` (either mode) adds the time of one 50,000-image epoch (CIFAR-10 or CIFAR-100) and of
the paper's 450-epoch schedule at each measured rate, training steps only (no evaluation, no data loading),
beside the paper's reference figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import cpu_model, synthetic_dataset

from bockd import distributed as dist
from bockd.config import build_config
from bockd.data import ImageDataset
from bockd.engine import Trainer

EPOCH_IMAGES = 50_000  # CIFAR-10 and CIFAR-100 training sets alike
PAPER_EPOCHS = 450  # the paper's schedule (the paper-cifar100 preset)
PAPER_REFERENCE = (
    "paper: 2,581 minutes (43.0 h) to train the CIFAR-100 ResNet-110 ensemble on GTX 1080 Ti GPUs, "
    "450 epochs (the paper's own figure, not measured here)"
)
CPU_ONLY = (
    "These are CPU figures, not comparable with the paper's GPUs; on a CUDA machine the same command "
    "measures with bf16 autocast and channels_last (add --compile for torch.compile)."
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fixed_batch(trainer: Trainer, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A device-resident batch of ``batch_size`` samples from the trainer's own (sharded) loader."""
    x, y = next(iter(trainer.train_loader.epoch(0)))
    reps = -(-batch_size // x.shape[0])
    x, y = x.repeat(reps, 1, 1, 1)[:batch_size], y.repeat(reps)[:batch_size]
    if trainer.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def _step_seconds(trainer: Trainer, batch_size: int, warmup: int, iters: int) -> list[float]:
    """Seconds of each timed training step on a fixed, device-resident batch of ``batch_size``. Every
    step starts after a barrier (nothing in one process), so under DDP the ranks start together."""
    x, y = _fixed_batch(trainer, batch_size)
    trainer.model.train()
    for _ in range(warmup):
        trainer.train_step(x, y)
    _sync(trainer.device)
    times = []
    for _ in range(iters):
        dist.barrier()
        start = time.perf_counter()
        trainer.train_step(x, y)
        _sync(trainer.device)
        times.append(time.perf_counter() - start)
    return times


def _steady_step_seconds(trainer: Trainer, batch_size: int, warmup: int, iters: int, rounds: int) -> float:
    """Seconds per step of ``iters`` back-to-back steps between two synchronizations, median over
    ``rounds``: the GPU's throughput as training sees it (a sync per step would add its latency)."""
    x, y = _fixed_batch(trainer, batch_size)
    trainer.model.train()
    for _ in range(warmup):
        trainer.train_step(x, y)
    _sync(trainer.device)
    per_step = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(iters):
            trainer.train_step(x, y)
        _sync(trainer.device)
        per_step.append((time.perf_counter() - start) / iters)
    return statistics.median(per_step)


def time_step(trainer: Trainer, batch_size: int, warmup: int, iters: int, rounds: int = 3) -> float:
    """Seconds of one training step on a fixed, device-resident batch: on CUDA the steady-state mean
    (``_steady_step_seconds``), elsewhere the median of individually timed steps."""
    if trainer.device.type == "cuda" and trainer.world_size == 1:
        return _steady_step_seconds(trainer, batch_size, warmup, iters, rounds)
    return statistics.median(_step_seconds(trainer, batch_size, warmup, iters))


def trainer_for(
    arch: str, args: argparse.Namespace, dataset: ImageDataset, workdir: str, **over: Any
) -> Trainer:
    """The training Trainer of the paper-cifar10 preset for ``arch`` and the command's settings."""
    common = {
        "batch_size": args.batch_size,
        "model": {"arch": arch, "num_students": args.num_students},
        "runtime": {
            "device": args.device,
            "compile": args.compile,
            "compile_mode": args.compile_mode,
            "cuda_graph": args.cuda_graph,
            "progress": "off",
        },
        "data": {"dataset": "cifar10"},
    }
    return Trainer(build_config("paper-cifar10", {**common, **over}), dataset, workdir)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def bench_arch(arch: str, args: argparse.Namespace, dataset: ImageDataset) -> dict[str, Any]:
    ensemble = trainer_for(arch, args, dataset, args.workdir)
    t_ens = time_step(ensemble, args.batch_size, args.warmup, args.iters, args.rounds)
    row: dict[str, Any] = {
        "arch": arch,
        "device": str(ensemble.device),
        "bf16": ensemble.amp,
        "channels_last": ensemble.channels_last,
        "compile": args.compile,
        "compile_mode": args.compile_mode if args.compile else None,
        "cuda_graph": args.cuda_graph,
        "batch_size": args.batch_size,
        "ensemble_step_s": t_ens,
        "ensemble_images_per_s": args.batch_size / t_ens,
        "baselines": [],
    }
    del ensemble
    for k in range(args.num_students):
        baseline = trainer_for(arch, args, dataset, args.workdir, mode="baseline", student=k)
        t = time_step(baseline, args.batch_size, args.warmup, args.iters, args.rounds)
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
        "| arch | device | bf16 | compile | CUDA graph | batch | ensemble img/s | "
        + " | ".join(f"S{k + 1} baseline img/s" for k in range(report["num_students"]))
        + " | ensemble step / sum of baseline steps |",
        "|---|---|---|---|---|---:|---:|" + "---:|" * report["num_students"] + "---:|",
    ]
    for r in report["results"]:
        base = " | ".join(f"{b['images_per_s']:.0f}" for b in r["baselines"])
        compiled = r.get("compile_mode") or r["compile"]
        lines.append(
            f"| {r['arch']} | {r['device']} | {r['bf16']} | {compiled} | {r.get('cuda_graph', False)} "
            f"| {r['batch_size']} "
            f"| {r['ensemble_images_per_s']:.0f} | {base} | {r['ensemble_over_baselines']:.2f} |"
        )
    return "\n".join(lines) + "\n"


# -- multi-process mode ------------------------------------------------------------------------------------
def time_step_ranks(trainer: Trainer, batch_size: int, warmup: int, iters: int) -> list[list[float]]:
    """Seconds of each timed step on every rank (``[rank][iter]``), each rank on its slice of one fixed
    global batch of ``batch_size``. Every rank starts each step after a barrier, so a step's group time is
    the slowest rank's."""
    times = _step_seconds(trainer, batch_size // trainer.world_size, warmup, iters)
    table = torch.zeros(trainer.world_size, iters, dtype=torch.float64, device=trainer.device)
    table[trainer.rank] = torch.tensor(times, dtype=torch.float64)
    return dist.all_reduce_sum(table).tolist()


def ddp_worker(args: argparse.Namespace) -> None:
    """One rank under ``torch.distributed.run``: times the ensemble step of every arch; rank 0 writes
    the figures to ``--worker-out``."""
    torch.set_num_threads(args.threads_per_rank)
    dataset = synthetic_dataset(256)
    workdir = tempfile.mkdtemp(prefix="bockd-bench-")  # no fit(): nothing is written there
    rows = []
    for arch in args.archs:
        trainer = trainer_for(arch, args, dataset, workdir)
        per_rank = time_step_ranks(trainer, args.batch_size, args.warmup, args.iters)
        group = [max(step) for step in zip(*per_rank, strict=True)]
        step_s = statistics.median(group)
        rows.append(
            {
                "arch": arch,
                "device": trainer.device.type,
                "backend": torch.distributed.get_backend() if trainer.world_size > 1 else "none",
                "bf16": trainer.amp,
                "channels_last": trainer.channels_last,
                "compile": args.compile,
                "nproc": trainer.world_size,
                "threads_per_rank": torch.get_num_threads(),
                "batch_size": args.batch_size,
                "batch_per_rank": args.batch_size // trainer.world_size,
                "step_s": step_s,
                "images_per_s": args.batch_size / step_s,
                "rank_median_step_s": [statistics.median(r) for r in per_rank],
            }
        )
        del trainer
    if dist.rank() == 0:
        Path(args.worker_out).write_text(json.dumps(rows, indent=2) + "\n")
    dist.barrier()
    dist.shutdown()


def launch(n: int, args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    """Run this script's worker on ``n`` ranks with ``torch.distributed.run --standalone``."""
    threads = args.threads_per_rank or int(
        os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // n)
    )
    repo = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
    cmd += [__file__, "--ddp-worker", "--worker-out", str(out), "--threads-per-rank", str(threads)]
    cmd += ["--archs", *args.archs, "--batch-size", str(args.batch_size)]
    cmd += ["--num-students", str(args.num_students), "--device", args.device]
    cmd += ["--warmup", str(args.warmup), "--iters", str(args.iters), "--compile-mode", args.compile_mode]
    cmd += ["--compile"] if args.compile else []
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"torch.distributed.run with {n} ranks failed ({proc.returncode}):\n{proc.stderr}")
    rows = json.loads(out.read_text())
    print(f"nproc {n}: done in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    return rows


def bench_ddp(args: argparse.Namespace) -> list[dict[str, Any]]:
    counts = sorted({1, *args.nproc})
    for n in counts:
        if n < 1 or args.batch_size % n:
            raise SystemExit(f"--batch-size ({args.batch_size}) must be divisible by every --nproc ({n})")
    if (
        torch.cuda.is_available()
        and args.device in ("auto", "cuda")
        and counts[-1] > torch.cuda.device_count()
    ):
        raise SystemExit(f"--nproc {counts[-1]} needs {counts[-1]} GPUs, found {torch.cuda.device_count()}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bockd-bench-ddp-") as tmp:
        for n in counts:
            rows += launch(n, args, Path(tmp) / f"nproc{n}.json")
    single = {r["arch"]: r["images_per_s"] for r in rows if r["nproc"] == 1}
    for r in rows:
        r["single_process_images_per_s"] = single[r["arch"]]
        r["scaling_efficiency"] = r["images_per_s"] / (r["nproc"] * single[r["arch"]])
        print(
            f"{r['arch']} nproc {r['nproc']}: {r['step_s'] * 1e3:.0f} ms/step, "
            f"{r['images_per_s']:.0f} img/s, scaling efficiency {r['scaling_efficiency']:.2f}",
            file=sys.stderr,
        )
    rows.sort(key=lambda r: (args.archs.index(r["arch"]), r["nproc"]))
    return rows


def markdown_ddp(report: dict[str, Any]) -> str:
    m = report["machine"]
    where = m.get("gpu") or m["cpu"]
    lines = [
        f"Machine: {where}; torch {m['torch']}. Command: `{report['command']}`",
        "",
        "| arch | device | backend | bf16 | compile | nproc | threads/rank | global batch | batch/rank "
        "| step ms | group img/s | 1-process img/s | scaling efficiency |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['arch']} | {r['device']} | {r['backend']} | {r['bf16']} | {r['compile']} | {r['nproc']} "
            f"| {r['threads_per_rank']} | {r['batch_size']} | {r['batch_per_rank']} "
            f"| {r['step_s'] * 1e3:.0f} | {r['images_per_s']:.0f} | {r['single_process_images_per_s']:.0f} "
            f"| {r['scaling_efficiency']:.2f} |"
        )
    return "\n".join(lines) + "\n"


# -- epoch estimate ----------------------------------------------------------------------------------------
def epoch_estimate(rows: list[dict[str, Any]], rate_key: str) -> str:
    """Add ``epoch_min`` and ``schedule_h`` to every row (at ``row[rate_key]`` images/s); the markdown."""
    lines = [
        "",
        f"Epoch estimate at the measured rate (training steps only: no evaluation, no data loading): one "
        f"epoch of {EPOCH_IMAGES:,} images, and the paper's {PAPER_EPOCHS}-epoch schedule.",
        "",
        "| arch | device | nproc | img/s | 1 epoch (min) | "
        f"{PAPER_EPOCHS} epochs (min) | {PAPER_EPOCHS} epochs (h) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        epoch_s = EPOCH_IMAGES / r[rate_key]
        r["epoch_min"] = epoch_s / 60
        r["schedule_epochs"] = PAPER_EPOCHS
        r["schedule_min"] = epoch_s * PAPER_EPOCHS / 60
        lines.append(
            f"| {r['arch']} | {r['device']} | {r.get('nproc', 1)} | {r[rate_key]:.0f} | {r['epoch_min']:.1f} "
            f"| {r['schedule_min']:,.0f} | {r['schedule_min'] / 60:,.1f} |"
        )
    lines += ["", f"Reference, {PAPER_REFERENCE}."]
    if all(r["device"].startswith("cpu") for r in rows):
        lines.append(CPU_ONLY)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=["resnet20", "resnet110"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-students", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument(
        "--compile-mode",
        choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
        default="default",
        help="torch.compile's mode (runtime.compile_mode); implies --compile unless 'default'",
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="capture each full step in one CUDA graph (runtime.cuda_graph)",
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="CUDA: timed runs of --iters steps (median)")
    p.add_argument("--tag", help="suffix of the output files (train_step-<device>-<tag>.json)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument(
        "--nproc",
        type=int,
        nargs="+",
        help="multi-process mode: time the ensemble step on N DDP ranks (torch.distributed.run; 1 is "
        "always added for the single-process figure); --batch-size is the global batch",
    )
    p.add_argument(
        "--threads-per-rank",
        type=int,
        help="torch threads per rank in --nproc mode (default: OMP_NUM_THREADS, else CPU cores / N)",
    )
    p.add_argument(
        "--epoch-estimate",
        action="store_true",
        help=f"also report one {EPOCH_IMAGES:,}-image epoch and the {PAPER_EPOCHS}-epoch schedule at the "
        "measured rate, beside the paper's reference figure",
    )
    p.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.compile = args.compile or args.compile_mode != "default"
    if args.cuda_graph:
        args.warmup = max(args.warmup, 5)  # the graph's own eager warm-up (3 steps) and its capture first
    if args.ddp_worker:
        ddp_worker(args)
        return 0

    command = "python benchmarks/train_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    if args.nproc:
        report: dict[str, Any] = {
            "benchmark": "train_step_ddp",
            "command": command,
            "machine": machine(),
            "num_students": args.num_students,
            "results": bench_ddp(args),
        }
        table = markdown_ddp(report)
        stem = "train_step-ddp"
        rate_key = "images_per_s"
    else:
        dataset = synthetic_dataset(256)
        args.workdir = tempfile.mkdtemp(
            prefix="bockd-bench-"
        )  # trainers write nothing here: no fit() is called
        report = {
            "benchmark": "train_step",
            "command": command,
            "machine": machine(),
            "num_students": args.num_students,
            "results": [bench_arch(arch, args, dataset) for arch in args.archs],
        }
        table = markdown(report)
        stem = "train_step"
        rate_key = "ensemble_images_per_s"
    if args.epoch_estimate:
        table += epoch_estimate(report["results"], rate_key)
        report["paper_reference"] = PAPER_REFERENCE
    out.mkdir(parents=True, exist_ok=True)
    device = report["results"][0]["device"].split(":")[0]
    name = f"{stem}-{device}" + (f"-{args.tag}" if args.tag else "")
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
