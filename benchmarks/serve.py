"""Serving latency of exported students: the raw forward against a real local KServe model server.

For each chosen student of an ensemble and each backend (torch, onnx):

- raw forward, no server: p50/p99 ms at batch 1 and 32 (torch: ``load_student`` under
  ``torch.inference_mode()``; onnx: an ONNX Runtime session on the exported ``model.onnx``), on the very
  float NCHW batch the server's preprocess makes from the request below;
- served: ``bockd.platform.services.model_servers.start_local_server`` on 127.0.0.1, V1 ``:predict``
  requests carrying uint8
  HWC instances (what ``bockd.serving.client.predict_v1`` sends), from 1 and 16 concurrent client threads
  (urllib, JSON bodies encoded beforehand so the client's own encoding is not timed): p50/p99 latency per
  request and throughput in images/s over the whole burst.

The overhead column is served p50 minus raw p50 with one client: what the predictor adds (HTTP, JSON
decoding, uint8 -> normalized float, softmax, top-k, JSON answer). With 16 clients the latency is mostly
queueing, so only throughput is compared there. Every measurement follows a warm-up.

Weights do not matter for speed, so the students are not trained: a tiny synthetic dataset (64 random
uint8 32x32x3 images, 10 classes) goes through ``Trainer(config, dataset, workdir).fit()`` for one epoch
(it writes a finished run folder), and ``bockd.export.export_student`` exports each student with ONNX,
exactly as a trained run would be exported. ``--workdir`` keeps that folder and reuses it on a later call.

Threads: the benchmark process and every model server use ``--threads`` torch/ONNX Runtime threads
(``OMP_NUM_THREADS`` in the server's environment, which the server's ONNX session follows too), 1 by
default: on a 2-core machine the client threads and anything else running need the other core, and torch
with 2 intra-op threads and one core taken ran the batch-1 forward of S5 7x slower (18 ms against 2.5 ms).
One server runs at a time; the client threads share the machine's cores, as they would on one box. The
1-minute load average at start and end is recorded: other work on the machine shows up in every number.

    python benchmarks/serve.py --arch resnet110 --students 1,2,3,4,5 --out benchmarks/results
    python benchmarks/serve.py --students 5 --quick --workdir /tmp/bockd-serve   # smoke run

Writes ``<out>/serve-cpu.json`` and ``<out>/serve-cpu.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_common import cpu_model, synthetic_dataset

from bockd.config import build_config
from bockd.engine import Trainer
from bockd.export import ONNX_FILE, export_student, load_student, read_student_config
from bockd.platform.services.model_servers import (
    start_local_server,
    stop_all_local_servers,
    stop_local_server,
)
from bockd.serving.preprocess import InputSpec, batch_from_v1

BACKENDS = ("torch", "onnx")
BATCHES = (1, 32)
CLIENTS = (1, 16)
# A server on this machine must never be reached through an HTTP proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- setup: a finished run and its exported students ----------------------------------------------------


def export_students(arch: str, num_students: int, students: list[int], workdir: Path) -> dict[int, Path]:
    """Train one epoch on synthetic data (weights do not matter for speed) and export the students."""
    run_dir = workdir / f"{arch}-run"
    overrides = {
        "epochs": 1,
        "batch_size": 64,
        "model": {"arch": arch, "num_students": num_students},
        "runtime": {"device": "cpu", "progress": "off"},
    }
    start = time.perf_counter()
    Trainer(build_config("paper-cifar10", overrides), synthetic_dataset(64), run_dir).fit()  # resumes if done
    log(f"run {run_dir} ready ({time.perf_counter() - start:.0f} s)")
    folders = {}
    for k in students:
        folder = workdir / f"{arch}-s{k}"
        if not (folder / ONNX_FILE).is_file():
            start = time.perf_counter()
            export_student(run_dir, folder, k - 1, onnx=True)
            log(f"exported S{k} to {folder} ({time.perf_counter() - start:.0f} s)")
        folders[k] = folder
    return folders


# -- measurement helpers ----------------------------------------------------------------------------------


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "n": len(ms)}


def time_calls(fn: Any, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def images(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(batch, 32, 32, 3), dtype=np.uint8)


def v1_body(imgs: np.ndarray) -> bytes:
    return json.dumps({"instances": [img.tolist() for img in imgs]}).encode()


def raw_runner(folder: Path, backend: str, threads: int) -> Any:
    if backend == "torch":
        module = load_student(folder)

        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return module(torch.from_numpy(x)).numpy()

        return run
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads  # what the server sets (bockd.serving.model.intra_op_threads)
    session = ort.InferenceSession(
        str(folder / ONNX_FILE), sess_options=opts, providers=["CPUExecutionProvider"]
    )
    return lambda x: session.run(["logits"], {"input": x})[0]


def post(url: str, body: bytes) -> bytes:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    with _OPENER.open(req, timeout=120) as resp:
        return resp.read()


def served_burst(url: str, bodies: list[bytes], batch: int, clients: int, requests: int) -> dict[str, Any]:
    """``requests`` POSTs spread over ``clients`` threads started together; per-request latency and img/s."""
    per_client = [requests // clients + (i < requests % clients) for i in range(clients)]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        barrier.wait()
        try:
            for j in range(per_client[i]):
                body = bodies[(i + j) % len(bodies)]
                start = time.perf_counter()
                post(url, body)
                latencies[i].append(time.perf_counter() - start)
        except BaseException as err:  # reported after the burst, in the main thread
            errors.append(err)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{url}: a client failed: {errors[0]}") from errors[0]
    flat = [x for lat in latencies for x in lat]
    return {**percentiles(flat), "wall_s": wall, "images_per_s": batch * len(flat) / wall}


# -- the benchmark --------------------------------------------------------------------------------------


def bench_student(
    k: int, folder: Path, args: argparse.Namespace, state_dir: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    config = read_student_config(folder)
    spec = InputSpec.from_config(config)
    info = {"student": f"S{k}", "params": config["params"], "size_pct": config["size_pct"]}
    # Four different request bodies per batch size, and the exact tensor the server decodes from them.
    inputs = {b: [images(b, seed) for seed in range(4)] for b in BATCHES}
    bodies = {b: [v1_body(imgs) for imgs in inputs[b]] for b in BATCHES}
    tensors = {b: batch_from_v1({"instances": inputs[b][0].tolist()}, spec) for b in BATCHES}
    rows = []
    for backend in BACKENDS:
        run = raw_runner(folder, backend, args.threads)
        raw = {}
        for b in BATCHES:
            x = tensors[b]
            raw[b] = percentiles(time_calls(functools.partial(run, x), args.warmup[b], args.raw_iters[b]))
            log(f"S{k} {backend} raw batch {b}: p50 {raw[b]['p50_ms']:.2f} ms, p99 {raw[b]['p99_ms']:.2f} ms")
        name = f"bench-{args.arch}-s{k}-{backend}"
        endpoint = start_local_server([folder], name, state_dir, backend=backend, timeout=180)
        try:
            url = endpoint.v1_predict_url
            answer = json.loads(post(url, bodies[1][0]))
            assert len(answer["predictions"]) == 1, answer
            for b in BATCHES:
                # Warm-up: sequential requests, then one concurrent round at the widest client count.
                for i in range(args.warmup[b]):
                    post(url, bodies[b][i % 4])
                served_burst(url, bodies[b], b, max(CLIENTS), max(CLIENTS))
                for c in CLIENTS:
                    s = served_burst(url, bodies[b], b, c, args.requests[b])
                    over = s["p50_ms"] - raw[b]["p50_ms"] if c == 1 else None
                    rows.append(
                        {
                            **info,
                            "backend": backend,
                            "batch": b,
                            "clients": c,
                            "raw": raw[b],
                            "served": s,
                            "overhead_p50_ms": over,
                        }
                    )
                    log(
                        f"S{k} {backend} served batch {b} x{c} clients: p50 {s['p50_ms']:.2f} ms, "
                        f"p99 {s['p99_ms']:.2f} ms, {s['images_per_s']:.0f} img/s"
                        + (f", overhead {over:.2f} ms" if over is not None else "")
                    )
        finally:
            stop_local_server(state_dir, name)
    return info, rows


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


def machine(threads: int) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "onnxruntime": _version("onnxruntime"),
        "kserve": _version("kserve"),
        "loadavg_1m_at_start": os.getloadavg()[0],
    }
    return info


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"Machine: {m['cpu']} ({m['cpu_cores']} cores), {m['threads']} intra-op thread(s) per process; "
        f"torch {m['torch']}, onnxruntime {m['onnxruntime']}, kserve {m['kserve']}; 1-minute load average "
        f"{m['loadavg_1m_at_start']:.1f} at start, {m.get('loadavg_1m_at_end', float('nan')):.1f} at end. "
        f"Command: `{report['command']}`",
        "",
        "| student | params | backend | batch | clients | raw p50 ms | served p50 ms | served p99 ms "
        "| images/s | overhead ms |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        s, over = r["served"], r["overhead_p50_ms"]
        lines.append(
            f"| {r['student']} | {r['params']:,} | {r['backend']} | {r['batch']} | {r['clients']} "
            f"| {r['raw']['p50_ms']:.2f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {s['images_per_s']:.0f} "
            f"| {'' if over is None else f'{over:.2f}'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet110")
    p.add_argument("--num-students", type=int, default=5, help="students in the ensemble")
    p.add_argument(
        "--students", default=None, help="comma list of 1-based students to measure (default: all)"
    )
    p.add_argument(
        "--requests", type=int, default=200, help="timed requests per config at batch 1 (batch 32: 1/4)"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 32 requests at batch 1, 8 at batch 32")
    p.add_argument("--threads", type=int, default=1, help="torch/ONNX Runtime threads per process")
    p.add_argument("--workdir", default=None, help="keep the run and exports here (reused when present)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)

    students = (
        [int(s) for s in args.students.split(",")] if args.students else list(range(1, args.num_students + 1))
    )
    if any(not 1 <= k <= args.num_students for k in students):
        p.error(f"--students: each must be in 1..{args.num_students}")
    n1 = 32 if args.quick else args.requests
    args.requests = {1: n1, 32: max(8, n1 // 4)}
    args.raw_iters = args.requests
    args.warmup = {1: 10, 32: 3}

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)  # the servers' threads
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bockd-serve-"))
    workdir.mkdir(parents=True, exist_ok=True)
    state_dir = workdir / "servers"
    info = machine(args.threads)
    start = time.perf_counter()
    results = []
    try:
        folders = export_students(args.arch, args.num_students, students, workdir)
        for k in students:
            _, rows = bench_student(k, folders[k], args, state_dir)
            results.extend(rows)
    finally:
        stop_all_local_servers(state_dir)  # whatever an error or Ctrl-C left running
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report = {
        "benchmark": "serve",
        "command": "python benchmarks/serve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": info,
        "arch": args.arch,
        "num_students": args.num_students,
        "requests": {str(b): n for b, n in args.requests.items()},
        "warmup": {str(b): n for b, n in args.warmup.items()},
        "protocol": "V1 :predict, uint8 HWC instances as JSON lists, urllib (one connection per request)",
        "results": results,
        "total_s": time.perf_counter() - start,
    }
    report["machine"]["loadavg_1m_at_end"] = os.getloadavg()[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve-cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out / "serve-cpu.md").write_text(table)
    print(table)
    log(f"done in {report['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
