"""Latency and throughput of one exported student measured through the real model server, on this machine.

:func:`measure_served` starts ``python -m bockd.serving`` (ONNX Runtime backend) for one student folder on
127.0.0.1 (`bockd.platform.services.model_servers.start_local_server`), sends Open Inference Protocol (V2)
requests carrying a ``UINT8`` ``[B, H, W, C]`` tensor in the binary tensor extension over one keep-alive
HTTP connection (httpx, which the trainer image carries through kserve), one request at a time, and
records per batch size the p50/p99 latency of a request (ms, client side: HTTP, decoding, normalizing,
the forward, softmax, top-k, the binary answer) and the throughput of that sequential loop (images/s).
Beside it: the raw forward (`bockd.onnx_student.OnnxStudent.run` on the same normalized batch, no server,
median ms) and the size of ``model.onnx`` on disk.

What keeps two measurements comparable: every request body is encoded before the clock starts; warm-up
requests are sent and thrown away first; request counts are fixed; ONNX Runtime's intra-op threads are
fixed (``threads``, the server's through ``OMP_NUM_THREADS``, which `bockd.serving.model.intra_op_threads`
follows) and recorded with the machine (CPU model, cores, cgroup CPU limit, load average). The first
answer is checked against the student's own forward, so a server that answered with another model or
garbage never yields a timing. Two variants to compare (an int8 student and its fp32 version) are
measured together by :func:`measure_interleaved`: their requests take turns, so a change in the machine's
load hits both alike. Never run two measurements at the same time: they share the CPU.

:func:`measurably_faster` decides whether one variant (an int8 student) is faster than another (its fp32
version) from their per-request latencies at batch 1: a seeded bootstrap confidence interval of the ratio
of medians must lie above ``min_speedup`` (see its docstring).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from bockd.errors import DataError
from bockd.export_format import ONNX_FILE, read_student_config
from bockd.serving.errors import ServingError

__all__ = [
    "BatchTiming",
    "MachineInfo",
    "ServedMeasurement",
    "cpu_model",
    "machine_info",
    "measurably_faster",
    "measure_interleaved",
    "measure_served",
    "v2_binary_request",
]

DEFAULT_BATCH_SIZES = (1, 32)
DEFAULT_REQUESTS = {1: 30, 32: 8}  # timed requests per batch size (a batch size not listed gets 8)
DEFAULT_WARMUP = 3  # requests (and raw forwards) per batch size sent before the clock starts
INPUT_NAME = "input_uint8"  # the name the server's metadata gives the UINT8 NHWC input
_HEADER = "Inference-Header-Content-Length"
_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MachineInfo(_Frozen):
    """Where a measurement ran: numbers taken on another machine do not compare with these."""

    cpu: str  # the CPU's model name (/proc/cpuinfo), else what ``platform`` knows
    cores: int  # logical CPUs the kernel reports (os.cpu_count)
    usable_cores: int  # the CPUs this process may run on (its affinity mask)
    cpu_limit: int | None  # the container's cgroup v2 CPU limit in whole CPUs; None: none
    system: str  # e.g. "Linux-6.8.0-x86_64-with-glibc2.39"
    python: str
    onnxruntime: str
    load_1m: float | None  # the 1-minute load average when the measurement started: other work shows here


class BatchTiming(_Frozen):
    """One batch size through the server (sequential requests) and as a raw forward."""

    batch: int
    requests: int  # timed requests (after the warm-up)
    p50_ms: float  # per request, client side
    p99_ms: float  # with few requests this is close to the slowest one
    images_per_s: float  # batch x requests / the sum of their latencies (sequential requests)
    raw_forward_ms: float  # median of OnnxStudent.run on the same normalized batch, no server
    samples_ms: list[float] = Field(repr=False)  # every timed request, in order: the faster rule reads them


class ServedMeasurement(_Frozen):
    """One student folder measured through the model server (see the module docstring)."""

    folder: str
    student_name: str  # the folder's config.json "name"
    precision: str  # config.json "precision" (an int8 student says so), else "fp32"
    size_bytes: int  # model.onnx on disk
    threads: int  # ONNX Runtime intra-op threads, in the server and for the raw forward
    timings: list[BatchTiming]  # in batch-size order
    machine: MachineInfo

    def at(self, batch: int) -> BatchTiming | None:
        """The timing at ``batch`` images per request, if measured."""
        return next((t for t in self.timings if t.batch == batch), None)


# -- the machine --------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def machine_info() -> MachineInfo:
    """The machine this process runs on, as `MachineInfo`."""
    from bockd.serving.model import cpu_limit

    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        usable = os.cpu_count() or 1
    try:
        load: float | None = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    return MachineInfo(
        cpu=cpu_model(),
        cores=os.cpu_count() or 1,
        usable_cores=usable,
        cpu_limit=cpu_limit(),
        system=platform.platform(),
        python=platform.python_version(),
        onnxruntime=_package_version("onnxruntime"),
        load_1m=load,
    )


# -- requests -----------------------------------------------------------------------------------------------


def v2_binary_request(images: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """A V2 inference request for uint8 ``[B, H, W, C]`` ``images`` in the binary tensor extension: the
    body (JSON header, then the raw pixels) and its headers. The answer's ``probabilities`` come back as
    binary float32 too."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"images: expected uint8 [N, H, W, C], got {images.dtype} {list(images.shape)}")
    raw = np.ascontiguousarray(images).tobytes()
    header = {
        "inputs": [
            {
                "name": INPUT_NAME,
                "datatype": "UINT8",
                "shape": list(images.shape),
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/octet-stream", _HEADER: str(len(head))}
    return head + raw, headers


def probabilities_from_answer(body: bytes, header_length: str | None, batch: int) -> np.ndarray:
    """The float32 ``[batch, K]`` probabilities of a V2 answer (binary extension, or plain JSON)."""
    if header_length is None:
        answer = json.loads(body)
        out = next(o for o in answer["outputs"] if o["name"] == "probabilities")
        return np.asarray(out["data"], np.float32).reshape(out["shape"])
    n = int(header_length)
    answer = json.loads(body[:n])
    offset = n
    for out in answer["outputs"]:
        size = int(out.get("parameters", {}).get("binary_data_size", 0))
        if out["name"] == "probabilities":
            data = np.frombuffer(body[offset : offset + size], np.float32)
            return data.reshape(out["shape"])
        offset += size
    raise ServingError(f"the answer to a batch of {batch} holds no probabilities output: {answer}")


def _batches(images: np.ndarray, batch: int, count: int) -> list[np.ndarray]:
    """``count`` batches of ``batch`` images taken in order from ``images``, wrapping around."""
    n = len(images)
    return [images[np.arange(i * batch, (i + 1) * batch) % n] for i in range(count)]


# -- the measurement ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _server_threads(threads: int) -> Iterator[None]:
    """OMP_NUM_THREADS for the model server started inside: it sets ONNX Runtime's intra-op threads
    (`bockd.serving.model.intra_op_threads`). The server inherits this process's environment."""
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved


def _percentile(samples: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples, np.float64), q))


def measure_served(
    folder: str | Path,
    images: np.ndarray,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    requests: int | Mapping[int, int] | None = None,
    warmup: int = DEFAULT_WARMUP,
    *,
    threads: int = 1,
    state_dir: str | Path | None = None,
    timeout: float = 120,
    check_atol: float = 1e-3,
) -> ServedMeasurement:
    """Measure the student in ``folder`` (``config.json`` + ``model.onnx``) through a model server.

    ``images``: uint8 ``[N, H, W, C]`` at the student's input size (test images); a batch of B takes the
    next B of them, wrapping around. ``requests``: timed requests per batch size (an int for all, or
    ``{batch: count}``; default `DEFAULT_REQUESTS`), each after ``warmup`` untimed ones; the raw forward
    is timed as often. ``threads``: ONNX Runtime intra-op threads in the server and the raw forward.
    ``state_dir``: where the server's record and log go (default: a temporary folder, removed after).

    Raises `DataError` for images the student cannot take, `ServingError` if the server does not start,
    answers an error, or answers with probabilities more than ``check_atol`` from the student's own.
    """
    (measured,) = measure_interleaved(
        [folder],
        images,
        batch_sizes,
        requests,
        warmup,
        threads=threads,
        state_dir=state_dir,
        timeout=timeout,
        check_atol=check_atol,
    )
    return measured


def measure_interleaved(
    folders: Sequence[str | Path],
    images: np.ndarray,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    requests: int | Mapping[int, int] | None = None,
    warmup: int = DEFAULT_WARMUP,
    *,
    threads: int = 1,
    state_dir: str | Path | None = None,
    timeout: float = 120,
    check_atol: float = 1e-3,
) -> list[ServedMeasurement]:
    """`measure_served` for several student folders at once, one `ServedMeasurement` each, in order.

    One server per folder is started (and checked) before any clock starts; then at each batch size the
    timed requests take turns, A B A B ..., still one request at a time, and so do the raw forwards. A
    change in the machine's load during the measurement (another process waking up) then hits every
    folder alike instead of whichever was measured at that moment: this is how an int8 version is
    compared with its fp32 one. Every folder gets the same request bodies. Idle servers use no CPU.
    """
    import httpx

    from bockd.onnx_student import OnnxStudent, softmax
    from bockd.platform.services.model_servers import start_local_server, stop_local_server

    paths = [Path(f) for f in folders]
    if not paths:
        raise DataError("folders: give at least one student folder to measure")
    configs = [read_student_config(f) for f in paths]
    sizes = sorted(set(batch_sizes))
    if not sizes or sizes[0] < 1:
        raise DataError(f"batch_sizes: expected positive batch sizes, got {list(batch_sizes)}")
    if threads < 1 or warmup < 0:
        raise DataError(f"threads must be >= 1 and warmup >= 0, got threads={threads}, warmup={warmup}")
    counts = {b: _count(requests, b) for b in sizes}
    if images.ndim != 4 or len(images) == 0:
        raise DataError(f"images: expected uint8 [N, H, W, C] with N >= 1, got {list(images.shape)}")
    machine = machine_info()  # before the servers start: its load average is the machine's, not ours
    students = [OnnxStudent(f, threads=threads) for f in paths]
    for student in students:
        student.normalize(images[:1])  # the input size, checked before a server starts
    names = [
        _NAME.sub("-", f"measure-{i}-{config.get('name', folder.name)}")[:100]
        for i, (folder, config) in enumerate(zip(paths, configs, strict=True))
    ]
    samples: dict[tuple[int, int], list[float]] = {}  # (folder, batch) -> ms per timed request
    raw: dict[tuple[int, int], list[float]] = {}
    with contextlib.ExitStack() as stack:
        state = Path(state_dir) if state_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        urls = []
        for folder, name in zip(paths, names, strict=True):
            with _server_threads(threads):
                endpoint = start_local_server([folder], name, state, backend="onnx", timeout=timeout)
            stack.callback(stop_local_server, state, name)
            urls.append(endpoint.v2_infer_url)
        # Servers on this machine: never through a proxy from the environment (trust_env=False).
        http = stack.enter_context(httpx.Client(trust_env=False, timeout=timeout))

        def send(i: int, request: tuple[bytes, dict[str, str]], batch: int) -> httpx.Response:
            answer = http.post(urls[i], content=request[0], headers=request[1])
            if answer.status_code != 200:
                raise ServingError(
                    f"{urls[i]}: HTTP {answer.status_code} for a batch of {batch}: {answer.text[:300]}"
                )
            return answer

        for b in sizes:
            n = counts[b]
            batches = _batches(images, b, warmup + n)
            bodies = [v2_binary_request(x) for x in batches]  # encoded before any clock starts
            inputs = [student.normalize(batches[0]) for student in students]
            for i, student in enumerate(students):
                first = send(i, bodies[0], b)
                got = probabilities_from_answer(first.content, first.headers.get(_HEADER), b)
                want = softmax(student.run(inputs[i]))
                if got.shape != want.shape or not np.allclose(got, want, atol=check_atol):
                    diff = f"{np.abs(got - want).max():.3g}" if got.shape == want.shape else f"{got.shape}"
                    raise ServingError(
                        f"{urls[i]}: the server's probabilities for a batch of {b} differ from "
                        f"{paths[i]}'s own forward ({diff}; expected within {check_atol})"
                    )
                for request in bodies[1:warmup]:
                    send(i, request, b)
                for _ in range(warmup):
                    student.run(inputs[i])
            for request in bodies[warmup:]:
                for i in range(len(paths)):
                    start = time.perf_counter()
                    send(i, request, b)
                    samples.setdefault((i, b), []).append((time.perf_counter() - start) * 1000)
            for _ in range(n):
                for i, student in enumerate(students):
                    start = time.perf_counter()
                    student.run(inputs[i])
                    raw.setdefault((i, b), []).append((time.perf_counter() - start) * 1000)
    return [
        ServedMeasurement(
            folder=str(folder),
            student_name=str(config.get("name", folder.name)),
            precision=str(config.get("precision", "fp32")),
            size_bytes=(folder / ONNX_FILE).stat().st_size,
            threads=threads,
            timings=[_timing(b, samples[i, b], raw[i, b]) for b in sizes],
            machine=machine,
        )
        for i, (folder, config) in enumerate(zip(paths, configs, strict=True))
    ]


def _timing(batch: int, samples: list[float], raw: list[float]) -> BatchTiming:
    return BatchTiming(
        batch=batch,
        requests=len(samples),
        p50_ms=_percentile(samples, 50),
        p99_ms=_percentile(samples, 99),
        # Sequential requests: the images the server answers per second of its own request time.
        images_per_s=batch * len(samples) / (sum(samples) / 1000),
        raw_forward_ms=float(np.median(raw)),
        samples_ms=samples,
    )


def _count(requests: int | Mapping[int, int] | None, batch: int) -> int:
    if requests is None:
        n = DEFAULT_REQUESTS.get(batch, 8)
    elif isinstance(requests, int):
        n = requests
    else:
        n = int(requests.get(batch, 8))
    if n < 1:
        raise DataError(f"requests: expected at least 1 timed request at batch {batch}, got {n}")
    return n


# -- the faster rule ----------------------------------------------------------------------------------------

MIN_SAMPLES = 10  # fewer timed requests per variant than this cannot tell two medians apart


def measurably_faster(
    candidate_ms: Sequence[float],
    reference_ms: Sequence[float],
    *,
    confidence: float = 0.95,
    min_speedup: float = 1.0,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[bool, str]:
    """Whether ``candidate`` (an int8 student) is measurably faster than ``reference`` (its fp32 version).

    Both are per-request latencies (ms) of the same batch size on the same machine. The speedup is
    ``median(reference) / median(candidate)``; its two-sided ``confidence`` interval comes from a
    percentile bootstrap (``resamples`` resamples of each list, numpy's generator seeded with ``seed``, so
    the same samples always give the same verdict). The candidate is faster only when the whole interval
    lies above ``min_speedup`` (1.0: any speedup the noise cannot explain). Medians, not means: one
    request delayed by the scheduler moves a mean, not a median. Fewer than `MIN_SAMPLES` latencies on
    either side is never faster. Returns ``(faster, reason)``, the reason naming the medians, the speedup
    and its interval.
    """
    a = np.asarray(candidate_ms, np.float64)
    b = np.asarray(reference_ms, np.float64)
    if not 0 < confidence < 1 or min_speedup <= 0 or resamples < 100:
        raise ValueError(
            f"expected 0 < confidence < 1, min_speedup > 0, resamples >= 100; got {confidence}, "
            f"{min_speedup}, {resamples}"
        )
    if len(a) < MIN_SAMPLES or len(b) < MIN_SAMPLES:
        return False, (f"too few timed requests to tell ({len(a)} and {len(b)}; at least {MIN_SAMPLES} each)")
    if not (np.isfinite(a).all() and np.isfinite(b).all() and (a > 0).all() and (b > 0).all()):
        raise ValueError("latencies must be finite and positive")
    rng = np.random.default_rng(seed)
    med_a = np.median(a[rng.integers(0, len(a), (resamples, len(a)))], axis=1)
    med_b = np.median(b[rng.integers(0, len(b), (resamples, len(b)))], axis=1)
    ratios = med_b / med_a
    tail = (1 - confidence) / 2 * 100
    low, high = (float(x) for x in np.percentile(ratios, [tail, 100 - tail]))
    speedup = float(np.median(b) / np.median(a))
    numbers = (
        f"p50 {np.median(a):.3f} ms vs {np.median(b):.3f} ms: {speedup:.2f}x "
        f"({confidence:.0%} CI {low:.2f}-{high:.2f}x)"
    )
    if low > min_speedup:
        return True, f"faster: {numbers}"
    floor = "" if math.isclose(min_speedup, 1.0) else f" above {min_speedup:.2f}x"
    return False, f"not measurably faster{floor}: {numbers}"
