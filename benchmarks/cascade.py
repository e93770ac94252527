"""A confidence cascade of a trained family against each of its students, through the real model server.

From one finished ensemble run (e.g. ResNet-20 on CIFAR-10): export every student, fit a cascade
(``bockd.cascade.build_cascade``, smallest student first) on a validation split the run never trained on,
then serve each single student and the cascade with ``python -m bockd.serving`` (ONNX Runtime, one server at
a time, ``--threads`` intra-op threads) and send them the whole test set with a real Open Inference Protocol
client (``tritonclient.http``, V2, binary UINT8 tensors), sequentially:

- batch 32: every test image once (the accuracy of what was served, the mean latency per request and per
  image, throughput);
- batch 1: the first ``--batch1-images`` test images one request each (mean, p50 and p99 latency).

The validation split: the run's own (``data.val_fraction``), or, when the run trained on a seeded
class-balanced subset of the training split (``data.train_subset``), ``--val-size`` images drawn seeded from
the training images outside it. The data settings are the run's (its ``model.json``); the dataset rebuilt
from them must have the sha256 the run recorded, so the validation images are provably held out. The
cascade's stage costs for fitting are each student's raw ONNX forward per image at batch 32
(``OnnxStudent.forward_ms``) on this machine. Everything else running on the machine slows every number:
the 1-minute load average is recorded.

    python benchmarks/cascade.py --run RUN --data-path ../shared/data/cifar10 --students 5,3,1 \\
        --out benchmarks/results/cascade-cifar10

Writes ``<out>/cascade.{json,md,png}``; the exported students and the cascade folder go to ``--workdir``
(``<workdir>/students``, ``<workdir>/cascade``), outside the repository's results.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import command_line, machine, run_dataset, write_report

from bockd.cascade import build_cascade, evaluate_cascade, fit_thresholds
from bockd.config import build_config
from bockd.data import ImageSplit
from bockd.data.splits import balanced_subset
from bockd.engine import load_training_data
from bockd.errors import DataError
from bockd.export import export_student, read_run_card
from bockd.onnx_student import OnnxStudent, softmax
from bockd.platform.services.model_servers import start_local_server, stop_local_server


def log(msg: str) -> None:
    print(f"[cascade] {msg}", file=sys.stderr, flush=True)


def held_out_validation(args: argparse.Namespace, card: dict[str, Any]) -> tuple[Any, ImageSplit]:
    """The run's dataset (its own data settings, read from ``--data-path``; sha256 checked) and a validation
    split none of its training images are in: the run's own, else images outside its training subset."""
    dataset = run_dataset(card, args.data_path)
    settings = dict(card["config"]["data"])
    if args.data_path:
        settings["path"] = args.data_path
    if dataset.val is not None:
        return dataset, dataset.val
    subset = settings.get("train_subset")
    if not subset:
        raise DataError("data: the run trained on every training image and held no validation split out")
    whole = load_training_data(build_config(None, {"data": {**settings, "train_subset": None}}))
    trained = np.zeros(len(whole.train.y), bool)
    trained[balanced_subset(whole.train.y, subset, settings["split_seed"])] = True
    rest = np.flatnonzero(~trained)
    pick = np.sort(np.random.default_rng(settings["split_seed"]).permutation(rest)[: args.val_size])
    return dataset, ImageSplit(x=whole.train.x[pick], y=whole.train.y[pick])


def served(
    folder: Path, name: str, images: np.ndarray, batch: int, threads: int, state: Path
) -> dict[str, Any]:
    """Send ``images`` in batches of ``batch`` to a fresh server of ``folder``: answers and request times."""
    import tritonclient.http as http

    os.environ["OMP_NUM_THREADS"] = str(threads)  # the server's ONNX Runtime threads (its environment)
    endpoint = start_local_server([folder], name, state, timeout=120)
    try:
        client = http.InferenceServerClient(f"127.0.0.1:{endpoint.port}", network_timeout=300)
        probs, students, seconds = [], [], []
        warm = http.InferInput("input_uint8", [min(batch, len(images)), *images.shape[1:]], "UINT8")
        warm.set_data_from_numpy(np.ascontiguousarray(images[: min(batch, len(images))]), binary_data=True)
        for _ in range(5):
            client.infer(name, [warm])
        for i in range(0, len(images), batch):
            chunk = np.ascontiguousarray(images[i : i + batch])
            inp = http.InferInput("input_uint8", list(chunk.shape), "UINT8")
            inp.set_data_from_numpy(chunk, binary_data=True)
            start = time.perf_counter()
            result = client.infer(name, [inp])
            seconds.append(time.perf_counter() - start)
            probs.append(result.as_numpy("probabilities"))
            who = result.as_numpy("student")
            students.extend(["-"] * len(chunk) if who is None else [s.decode() for s in who.reshape(-1)])
        client.close()
    finally:
        stop_local_server(state, name)
    ms = np.asarray(seconds) * 1000.0
    return {
        "probs": np.concatenate(probs),
        "students": students,
        "requests": len(ms),
        "mean_ms": float(ms.mean()),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "ms_per_image": float(ms.sum() / len(images)),
        "images_per_s": float(len(images) / (ms.sum() / 1000.0)),
    }


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# Confidence cascade {report['cascade']['order']} against each student ({report['dataset']})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} ONNX Runtime thread(s) per server; "
        f"load average {m['load_start']:.2f} at start, {m['load_end']:.2f} at end. Test set: "
        f"{report['num_test']} images; validation (held out): {report['num_val']} images.",
        "",
        f"Thresholds {report['cascade']['thresholds']} fitted for a validation top-1 of "
        f"{report['cascade']['fit']['target_top1']:.2f} % (reached: {report['cascade']['fit']['reached']}); "
        f"answered on the test set by {report['cascade']['exit_fractions']}. Expected cost on the validation "
        f"split {report['cascade']['fit']['expected_cost_ms']:.3f} ms per image against "
        f"{report['cascade']['costs_ms'][-1]:.3f} ms for the largest student alone (raw forward, batch 32).",
        "",
        "| model | top-1 % (served) | batch 32: ms / request | ms / image | images/s "
        "| batch 1: mean ms | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        b32, b1 = row["batch32"], row["batch1"]
        lines.append(
            f"| {row['model']} | {row['top1']:.2f} | {b32['mean_ms']:.2f} | {b32['ms_per_image']:.3f} | "
            f"{b32['images_per_s']:.0f} | {b1['mean_ms']:.2f} | {b1['p50_ms']:.2f} | {b1['p99_ms']:.2f} |"
        )
    order = report["cascade"]["order"].split(" > ")
    lines += [
        "",
        f"The trade-off (one fit per allowed drop below {order[-1]}'s validation top-1; test top-1 and "
        "expected cost from each student's raw forward cost at batch 32, no server):",
        "",
        f"| allowed drop (points) | thresholds | test top-1 % | ms / image | {' / '.join(order)} answer |",
        "|---:|---|---:|---:|---|",
    ]
    for c in report["cascade"]["curve"]:
        shown = ", ".join("never" if t > 1 else f"{t:.3f}" for t in c["thresholds"])
        shares = " / ".join(f"{100 * e:.0f} %" for e in c["exit_fractions"])
        lines.append(
            f"| {c['max_drop']:g} | {shown} | {c['test_top1']:.2f} | {c['test_cost_ms']:.3f} | {shares} |"
        )
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in report["rows"]:
        is_cascade = row["model"].startswith("cascade")
        ax.scatter(row["batch32"]["ms_per_image"], row["top1"], marker="*" if is_cascade else "o",
                   s=160 if is_cascade else 50, color="C3" if is_cascade else "C0")  # fmt: skip
        ax.annotate(row["model"], (row["batch32"]["ms_per_image"], row["top1"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)  # fmt: skip
    ax.set_xlabel("served latency per image at batch 32 (ms)")
    ax.set_ylabel(f"top-1 on the {report['num_test']}-image test set (%)")
    ax.set_title("Cascade vs single students (measured through the model server)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="a finished ensemble run folder")
    p.add_argument("--data-path", help="where the run's dataset is (default: the run's data.path)")
    p.add_argument("--val-size", type=int, default=5000, help="held-out images outside the training subset")
    p.add_argument("--students", default="5,3,1", help="the cascade's students, smallest first")
    p.add_argument(
        "--max-drop", type=float, default=0.5, help="target: the largest student's top-1 minus this"
    )
    p.add_argument(
        "--curve",
        type=lambda text: [float(v) for v in text.split(",")],
        default=[0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0],
        help="allowed drops (points) of the offline trade-off table",
    )
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads of each server")
    p.add_argument("--batch1-images", type=int, default=1000, help="test images sent one per request")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cascade"))
    p.add_argument(
        "--workdir", type=Path, default=Path("runs/cascade-benchmark"), help="students and cascade"
    )
    args = p.parse_args(argv)

    order = [int(s) for s in args.students.split(",")]
    card = read_run_card(args.run)
    dataset, val = held_out_validation(args, card)
    test = dataset.test
    args.out.mkdir(parents=True, exist_ok=True)
    folders: dict[int, Path] = {}
    for k in range(1, card["ensemble"]["num_students"] + 1):
        folders[k] = export_student(args.run, args.workdir / "students" / f"s{k}", k - 1)
    log(f"exported S{', S'.join(map(str, folders))}; validation {len(val.y)}, test {len(test.y)} images")

    onnx = {k: OnnxStudent(f, threads=args.threads) for k, f in folders.items()}
    costs = [onnx[k].forward_ms(val.x[:32]) / 32 for k in order]
    fit = build_cascade(
        [folders[k] for k in order], args.workdir / "cascade", val.x, val.y, costs, max_drop=args.max_drop
    )
    val_probs = [softmax(onnx[k].logits(val.x)) for k in order]
    test_probs = [softmax(onnx[k].logits(test.x)) for k in order]
    offline = evaluate_cascade(test_probs, test.y, fit.thresholds, costs)
    # The trade-off: one fit per allowed drop, scored on the test set with the same raw costs (no server).
    curve = []
    for drop in args.curve:
        target = 100.0 * float(np.mean(val_probs[-1].argmax(1) == val.y)) - drop
        f = fit_thresholds(val_probs, val.y, costs, target)
        t = evaluate_cascade(test_probs, test.y, f.thresholds, costs)
        curve.append({"max_drop": drop, "thresholds": list(f.thresholds), "val_top1": f.val_top1,
                      "test_top1": t["top1"], "test_cost_ms": t["cost_ms"],
                      "exit_fractions": t["exit_fractions"]})  # fmt: skip
    log(
        f"thresholds {fit.thresholds}: validation {fit.val_top1:.2f} %, "
        f"test (offline) {offline['top1']:.2f} %"
    )

    load_start = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as state:
        models = [(f"S{k}", folders[k]) for k in sorted(folders)]
        models.append((f"cascade S{'>S'.join(map(str, order))}", args.workdir / "cascade"))
        for label, folder in models:
            name = label.split()[0].lower()
            b32 = served(folder, name, test.x, 32, args.threads, Path(state))
            b1 = served(folder, name, test.x[: args.batch1_images], 1, args.threads, Path(state))
            top1 = float(100.0 * np.mean(b32["probs"].argmax(1) == test.y))
            answered = {s: b32["students"].count(s) / len(test.y) for s in sorted(set(b32["students"]))}
            rows.append({
                "model": label,
                "top1": top1,
                "answered_by": answered,
                "batch32": {k: v for k, v in b32.items() if k not in ("probs", "students")},
                "batch1": {k: v for k, v in b1.items() if k not in ("probs", "students")},
            })  # fmt: skip
            log(f"{label}: top-1 {top1:.2f} %, {b32['ms_per_image']:.3f} ms/image at batch 32, "
                f"{b1['mean_ms']:.2f} ms at batch 1")  # fmt: skip
    report = {
        "format": "bockd-cascade-benchmark/1",
        "dataset": card["dataset"]["name"],
        "run": str(args.run),
        "num_val": len(val.y),
        "num_test": len(test.y),
        "cascade": {
            "order": " > ".join(f"S{k}" for k in order),
            "thresholds": [round(t, 4) for t in fit.thresholds],
            "costs_ms": costs,
            "fit": fit.to_dict(),
            "offline_test": offline,
            "curve": curve,
            "exit_fractions": rows[-1]["answered_by"],
        },
        "rows": rows,
        "machine": machine(load_start, threads=args.threads),
        "command": command_line("benchmarks/cascade.py", argv),
    }
    write_report(args.out, "cascade", report, markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
