"""Accuracy against served latency of a trained family, fp32 and int8, measured through the model server.

From one finished ensemble run (e.g. ResNet-20 on CIFAR-10), for every student: export it (fp32 ONNX), make
its int8 version (``bockd.quantize.quantize_and_check``: ONNX Runtime static QDQ, per-channel weights,
calibrated on ``--calibration-images`` of the run's own training images, top-1 checked on the test set),
then measure both through the real model server (``bockd.platform.serving_benchmark.measure_interleaved``:
V2 binary UINT8 requests of test images, batch 1 and 32, p50/p99 per request, throughput, the raw forward
beside it, ``--threads`` ONNX Runtime threads), the two precisions' requests taking turns, one at a time.
Whether int8 is faster is decided per batch size by ``measurably_faster`` (a seeded bootstrap interval of
the ratio of median latencies must lie above 1), the rule the pipeline's selection applies at batch 1.

    python benchmarks/pareto.py --run RUN --data-path ../shared/data/cifar10 \\
        --out benchmarks/results/pareto-cifar10

Writes ``<out>/pareto.{json,md,png}``; the student folders go to ``--workdir``. Everything else running on
the machine slows every number: the 1-minute load average is recorded.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import command_line, machine, run_dataset, write_report

from bockd.export import export_student, read_run_card
from bockd.platform.serving_benchmark import measurably_faster, measure_interleaved
from bockd.quantize import quantize_and_check


def log(msg: str) -> None:
    print(f"[pareto] {msg}", file=sys.stderr, flush=True)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (latency, accuracy) that no other point beats on both (lower latency and
    higher-or-equal accuracy, or equal latency and higher accuracy), in latency order."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# Accuracy against served latency, fp32 and int8 ({report['dataset']}, {report['arch']})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {report['threads']} ONNX Runtime thread(s) per server; "
        f"load average {m['load_start']:.2f} at start, {m['load_end']:.2f} at end. "
        f"Test set: {report['num_test']} images; int8 calibrated on {report['calibration_images']} "
        f"training images; drop limit {report['max_drop']:g} points. Latencies per request, client side, "
        "sequential requests.",
        "",
        "| student | precision | top-1 % | model.onnx KB | b1 p50 ms | b1 p99 ms | b32 p50 ms | b32 p99 ms "
        "| b32 images/s | raw b1 ms | raw b32 ms | Pareto (b1) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        b1, b32 = r["b1"], r["b32"]
        lines.append(
            f"| {r['student']} | {r['precision']} | {r['top1']:.2f} | {r['size_bytes'] / 1024:.0f} | "
            f"{b1['p50_ms']:.2f} | {b1['p99_ms']:.2f} | {b32['p50_ms']:.2f} | {b32['p99_ms']:.2f} | "
            f"{b32['images_per_s']:.0f} | {b1['raw_forward_ms']:.3f} | {b32['raw_forward_ms']:.2f} | "
            f"{'yes' if r['on_front'] else ''} |"
        )
    lines += ["", "int8 against fp32 (drop = fp32 top-1 - int8 top-1; faster: bootstrap rule, 95 %):", ""]
    lines += ["| student | drop (points) | drop check | batch 1 | batch 32 |", "|---|---:|---|---|---|"]
    for v in report["int8"]:
        lines.append(
            f"| {v['student']} | {v['drop']:+.2f} | {'passed' if v['passed'] else 'failed'} | "
            f"{v['b1_reason']} | {v['b32_reason']} |"
        )
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, batch in zip(axes, ("b1", "b32"), strict=True):
        rows = report["rows"]
        pts = [(r[batch]["p50_ms"], r["top1"]) for r in rows]
        for r, (x, y) in zip(rows, pts, strict=True):
            marker, color = ("o", "C0") if r["precision"] == "fp32" else ("s", "C1")
            ax.scatter(x, y, marker=marker, color=color)
            ax.annotate(f"{r['student']} {r['precision']}", (x, y), textcoords="offset points", xytext=(4, 3),
                        fontsize=7)  # fmt: skip
        front = pareto_front(pts)
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1, label="Pareto front")
        ax.set_xlabel(f"served p50 latency per request, batch {batch[1:]} (ms)")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("fp32 (circles) and int8 (squares), measured through the model server")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="a finished ensemble run folder")
    p.add_argument("--data-path", help="where the run's dataset is (default: the run's data.path)")
    p.add_argument("--max-drop", type=float, default=1.0, help="int8 accuracy-drop limit, points")
    p.add_argument("--calibration-images", type=int, default=512)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads of each server")
    p.add_argument("--requests-b1", type=int, default=200)
    p.add_argument("--requests-b32", type=int, default=50)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/pareto"))
    p.add_argument("--workdir", type=Path, default=Path("runs/pareto-benchmark"), help="student folders")
    args = p.parse_args(argv)

    card = read_run_card(args.run)
    dataset = run_dataset(card, args.data_path)
    test = dataset.test
    args.out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    rows, verdicts = [], []
    requests = {1: args.requests_b1, 32: args.requests_b32}
    for k in range(1, card["ensemble"]["num_students"] + 1):
        fp32 = export_student(args.run, args.workdir / f"s{k}", k - 1)
        check = quantize_and_check(
            fp32, args.workdir / f"s{k}-int8", dataset.train.x, test.x, test.y, max_drop=args.max_drop,
            max_images=args.calibration_images,
        )  # fmt: skip
        log(f"S{k}: fp32 {check.fp32_top1:.2f} %, int8 {check.int8_top1:.2f} % (drop {check.drop:+.2f})")
        measured = {}
        variants = (("fp32", fp32, check.fp32_top1), ("int8", args.workdir / f"s{k}-int8", check.int8_top1))
        # Both precisions' requests take turns: a change in load hits both alike (measure_interleaved).
        both = measure_interleaved([v[1] for v in variants], test.x, (1, 32), requests, threads=args.threads)
        for (precision, _, top1), m in zip(variants, both, strict=True):
            measured[precision] = m
            row = {"student": f"S{k}", "precision": precision, "top1": top1, "size_bytes": m.size_bytes}
            for batch in (1, 32):
                t = m.at(batch)
                assert t is not None
                row[f"b{batch}"] = t.model_dump(exclude={"samples_ms"})
            rows.append(row)
            log(
                f"S{k} {precision}: b1 p50 {row['b1']['p50_ms']:.2f} ms, "
                f"b32 p50 {row['b32']['p50_ms']:.2f} ms"
            )
        verdict: dict[str, Any] = {"student": f"S{k}", **check.to_dict()}
        for batch in (1, 32):
            faster, reason = measurably_faster(
                measured["int8"].at(batch).samples_ms,  # type: ignore[union-attr]
                measured["fp32"].at(batch).samples_ms,  # type: ignore[union-attr]
            )
            verdict[f"b{batch}_faster"], verdict[f"b{batch}_reason"] = faster, reason
        verdicts.append(verdict)
    front = set(pareto_front([(r["b1"]["p50_ms"], r["top1"]) for r in rows]))
    for i, r in enumerate(rows):
        r["on_front"] = i in front
    report = {
        "format": "bockd-pareto-benchmark/1",
        "dataset": card["dataset"]["name"],
        "arch": card["ensemble"]["arch"],
        "run": str(args.run),
        "num_test": len(test.y),
        "calibration_images": args.calibration_images,
        "max_drop": args.max_drop,
        "threads": args.threads,
        "rows": rows,
        "int8": verdicts,
        "machine": machine(load_start),
        "command": command_line("benchmarks/pareto.py", argv),
    }
    write_report(args.out, "pareto", report, markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
