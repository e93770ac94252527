"""The GPU check: what a session that borrows the GPU machine runs (docs/benchmarks.md, "GPU check").

Two sides, one file:

    python benchmarks/gpu_check.py pack    # here (make gpu-pack): wheels + CIFAR-10 in parts, into .gpu/
    python3 benchmarks/gpu_check.py run    # on the GPU machine (make gpu-check), through the device tool

``run`` installs the packed wheels bockd needs and the machine lacks into ``$BOCKD_GPU_WORK/site`` (no
network there), stages the CIFAR-10 parts each call carries, assembles them once all are there (sha256
checked), restores the training state a previous call returned, then runs the phases asked for within
``--minutes``: ``tests`` (``pytest -m cuda``), ``bench`` (benchmarks/train_step.py variants) and ``train``
(the paper-cifar10 ResNet-20 ensemble and its five baselines, resumed where the last call stopped). All
results land in ``$OUT/gpu-check/``: ``summary.md``, ``results-00.tar`` (JSON, markdown, logs) and
``state-NN.tar`` (the runs' checkpoints, split under the 16 MiB a returned file may have), rewritten after
every run so a call killed at its limit still returns the latest state. Carry the state files back (as
``.gpu/state/``) and the next call continues.

The module imports only the standard library at the top: on the GPU machine bockd's dependencies are
importable only after the wheels are installed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import io
import json
import logging
import lzma
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PACK = REPO / ".gpu"  # ignored by git; each call carries the parts of it it needs
WHEELS = PACK / "wheels"
PACKED_DATA = PACK / "data"
CARRIED_STATE = PACK / "state"
MANIFEST = "cifar10.manifest.json"
FORMAT = "bockd-cifar10-pack/1"
MiB = 1 << 20
RETURN_FILE_LIMIT = 15 * MiB  # the device tool returns files of at most 16 MiB each
CALL_LIMIT = 64 * MiB  # working tree + carried paths, per call
# bockd's imports on the training path that the GPU machine's python3 lacks (docs/benchmarks.md): pydantic
# and its own dependencies. typing-extensions is there, but pydantic needs a recent one: carried too.
WHEEL_NAMES = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
RUN_NAMES = ("ensemble", "baseline-s1", "baseline-s2", "baseline-s3", "baseline-s4", "baseline-s5")
PAPER_RATIO = 0.40  # the paper: one BOC-KD ensemble step costs 0.40 of the five baselines' steps
SCHEDULE_IMAGES = 50_000 * 350  # images the paper-cifar10 schedule trains on

log = logging.getLogger("bockd.gpu_check")


def say(message: str) -> None:
    print(f"[gpu-check] {message}", flush=True)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def work_dir() -> Path:
    return Path(os.environ.get("BOCKD_GPU_WORK", "/tmp/bockd-gpu"))


# -- the image codec: lossless, about 0.56 of the raw bytes after xz ---------------------------------------
# CIFAR-10 is 184 MB raw, 162 MiB as the project's zip-deflated .npz; a call carries at most 64 MiB. Each
# plane's 2-D difference (predict a pixel from its left, upper and upper-left neighbours), then the red and
# blue residuals minus the green one, all mod 256, then xz: 98 MiB in all, so two parts. Both steps are
# linear mod 256, so decoding is two cumulative sums and two additions, exact.
def encode_images(x: Any) -> bytes:
    """uint8 [N, H, W, 3] -> residual bytes [N, 3, H, W] (same length)."""
    import numpy as np

    out = io.BytesIO()
    for start in range(0, x.shape[0], 10_000):
        p = x[start : start + 10_000].transpose(0, 3, 1, 2).astype(np.int16)
        d = np.diff(np.diff(p, axis=3, prepend=0), axis=2, prepend=0)
        d[:, 0] -= d[:, 1]
        d[:, 2] -= d[:, 1]
        out.write((d % 256).astype(np.uint8).tobytes())
    return out.getvalue()


def decode_images(buf: bytes, shape: Sequence[int]) -> Any:
    """The inverse of ``encode_images``: residual bytes -> uint8 [N, H, W, 3]."""
    import numpy as np

    n, h, w, c = shape
    d = np.frombuffer(buf, dtype=np.uint8).reshape(n, c, h, w)
    out = np.empty((n, h, w, c), dtype=np.uint8)
    for start in range(0, n, 10_000):
        r = d[start : start + 10_000].copy()
        r[:, 0] += r[:, 1]  # uint8 arithmetic wraps: mod 256
        r[:, 2] += r[:, 1]
        p = np.cumsum(np.cumsum(r, axis=2, dtype=np.uint8), axis=3, dtype=np.uint8)
        out[start : start + 10_000] = p.transpose(0, 2, 3, 1)
    return out


def array_sha256(a: Any) -> str:
    """sha256 of an array's raw C-order bytes (the form data/cifar10/PROVENANCE.md gives)."""
    import numpy as np

    return sha256_bytes(np.ascontiguousarray(a).tobytes())


# -- pack (here) ------------------------------------------------------------------------------------------
def pack_wheels(dest: Path, python_version: str) -> list[Path]:
    """Download the cp<version> manylinux wheels of WHEEL_NAMES at the versions installed here."""
    from importlib.metadata import version

    pins = [f"{name}=={version(name)}" for name in WHEEL_NAMES]
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    cmd += ["--python-version", python_version, "--implementation", "cp"]
    for plat in WHEEL_PLATFORMS:
        cmd += ["--platform", plat]
    subprocess.run([*cmd, *pins], check=True)
    (dest / "requirements.txt").write_text("\n".join(pins) + "\n")
    wheels = sorted(dest.glob("*.whl"))
    say(f"wheels for python {python_version}: {', '.join(w.name for w in wheels)}")
    return wheels


def _load_cifar_arrays(source: Path) -> list[tuple[str, str, Any]]:
    import numpy as np

    arrays = []
    for split in ("train", "test"):
        with np.load(source / f"cifar10_{split}.npz") as z:
            arrays += [(split, "x", z["x"]), (split, "y", z["y"])]
    return arrays


def pack_data(source: Path, dest: Path, part_mib: float) -> dict[str, Any]:
    """Encode, compress and split CIFAR-10 into ``dest``; skipped when the manifest matches the source."""
    sources = {p.name: sha256_file(p) for p in sorted(source.glob("cifar10_*.npz"))}
    old = dest / MANIFEST
    if old.is_file():
        manifest = json.loads(old.read_text())
        if manifest.get("source") == sources and all((dest / p["name"]).is_file() for p in manifest["parts"]):
            say(f"data: {dest} already packed from these files")
            return resplit(manifest, dest, int(part_mib * MiB))
    if len(sources) != 2:
        raise SystemExit(f"{source} must hold cifar10_train.npz and cifar10_test.npz")
    say("data: encoding and compressing CIFAR-10 (xz, one thread: about 5 minutes)")
    entries, payload = [], io.BytesIO()
    for split, name, a in _load_cifar_arrays(source):
        raw = encode_images(a) if name == "x" else a.astype("<i8").tobytes()
        entries.append(
            {"split": split, "name": name, "shape": list(a.shape), "dtype": str(a.dtype),
             "encoding": "diff2d-rgb" if name == "x" else "raw-int64-le", "bytes": len(raw),
             "sha256": array_sha256(a)}
        )  # fmt: skip
        payload.write(raw)
    stream = lzma.compress(payload.getvalue(), preset=6)
    manifest = {
        "format": FORMAT,
        "source": sources,
        "arrays": entries,
        "stream": {"codec": "xz", "bytes": len(stream), "sha256": sha256_bytes(stream)},
        "parts": write_parts(stream, dest, int(part_mib * MiB)),
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def resplit(manifest: dict[str, Any], dest: Path, part_bytes: int) -> dict[str, Any]:
    """The packed stream split anew when ``part_bytes`` changed (no re-compression)."""
    if manifest["parts"][0]["bytes"] == min(part_bytes, manifest["stream"]["bytes"]):
        return manifest
    manifest["parts"] = write_parts(read_parts(manifest, [dest]), dest, part_bytes)
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def write_parts(stream: bytes, dest: Path, part_bytes: int) -> list[dict[str, Any]]:
    """Split ``stream`` into ``cifar10.partN`` files of at most ``part_bytes`` (the first ones full)."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("cifar10.part*"):
        old.unlink()
    parts = []
    for i, start in enumerate(range(0, len(stream), part_bytes), start=1):
        chunk = stream[start : start + part_bytes]
        name = f"cifar10.part{i}"
        (dest / name).write_bytes(chunk)
        parts.append({"name": name, "bytes": len(chunk), "sha256": sha256_bytes(chunk)})
    return parts


def tree_bytes() -> int:
    """Bytes of what every call sends: tracked and untracked-not-ignored files."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout  # fmt: skip
    paths = {p for p in out.decode().split("\0") if p}
    return sum((REPO / p).stat().st_size for p in paths if (REPO / p).is_file())


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def call_plan(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The device calls of a first session: call k carries the wheels and part k; the first runs the tests
    and the benchmark, the last also carries the state and trains. Sizes include the working tree."""
    parts = manifest["parts"]
    tree, wheels, state = tree_bytes(), folder_bytes(WHEELS), folder_bytes(CARRIED_STATE)
    plan = []
    for k, part in enumerate(parts, start=1):
        carry = [".gpu/wheels", ".gpu/data/" + MANIFEST, ".gpu/data/" + part["name"]]
        size = tree + wheels + part["bytes"]
        phases = "tests,bench" if k == 1 else "stage"
        if k == len(parts):
            carry.append(".gpu/state")
            size += state
            phases = "train" if k > 1 else "tests,bench,train"
        plan.append({"call": k, "carry": carry, "bytes": size, "phases": phases})
    return plan


def verify_pack(dest: Path) -> None:
    """Decode the parts exactly as the GPU machine will and check every array's sha256."""
    manifest = json.loads((dest / MANIFEST).read_text())
    arrays = decode_stream(manifest, read_parts(manifest, [dest]))
    say(f"data: round trip verified ({', '.join(f'{s}.{n} {a.shape}' for (s, n), a in arrays.items())})")


def cmd_pack(args: argparse.Namespace) -> int:
    pack_wheels(WHEELS, args.python_version)
    manifest = pack_data(Path(args.data), PACKED_DATA, args.part_mib)
    verify_pack(PACKED_DATA)
    CARRIED_STATE.mkdir(parents=True, exist_ok=True)
    for call in call_plan(manifest):
        flag = "" if call["bytes"] <= CALL_LIMIT - MiB else "  <-- over the 63 MiB this plan allows"
        size = f"{call['bytes'] / MiB:.1f} MiB"
        say(f"call {call['call']} ({call['phases']}): carry {' '.join(call['carry'])}; {size}{flag}")
    return 0


# -- data on the device: stage the parts each call carries, assemble when all are there --------------------
class DataMissing(Exception):
    """Some part of the packed dataset has not arrived (or arrived damaged)."""


def read_parts(manifest: dict[str, Any], folders: Sequence[Path]) -> bytes:
    """The concatenated, sha256-checked parts, each looked up in ``folders`` in order."""
    chunks, missing = [], []
    for part in manifest["parts"]:
        found = next((f / part["name"] for f in folders if (f / part["name"]).is_file()), None)
        data = found.read_bytes() if found is not None else b""
        if found is None or sha256_bytes(data) != part["sha256"]:
            missing.append(part["name"] + ("" if found is None else " (damaged: sha256 differs)"))
        chunks.append(data)
    if missing:
        raise DataMissing(", ".join(missing))
    stream = b"".join(chunks)
    if sha256_bytes(stream) != manifest["stream"]["sha256"]:
        raise DataMissing("the joined parts do not match the manifest's stream sha256")
    return stream


def decode_stream(manifest: dict[str, Any], stream: bytes) -> dict[tuple[str, str], Any]:
    """{(split, name): array} from the xz stream, each array's sha256 checked."""
    import numpy as np

    payload = lzma.decompress(stream)
    arrays, offset = {}, 0
    for e in manifest["arrays"]:
        raw = payload[offset : offset + e["bytes"]]
        offset += e["bytes"]
        if e["encoding"] == "diff2d-rgb":
            a = decode_images(raw, e["shape"])
        else:
            a = np.frombuffer(raw, dtype="<i8").reshape(e["shape"]).astype(e["dtype"])
        if array_sha256(a) != e["sha256"]:
            raise DataMissing(f"{e['split']}.{e['name']}: decoded array's sha256 differs from the manifest")
        arrays[(e["split"], e["name"])] = a
    return arrays


def stage_parts(manifest: dict[str, Any], carried: Path, store: Path) -> list[str]:
    """Copy every intact carried part into ``store`` (kept while the machine stays warm); the names copied."""
    store.mkdir(parents=True, exist_ok=True)
    staged = []
    for part in manifest["parts"]:
        src, dst = carried / part["name"], store / part["name"]
        if src.is_file() and not dst.is_file() and sha256_file(src) == part["sha256"]:
            shutil.copyfile(src, dst)
            staged.append(part["name"])
    return staged


def prepare_data(carried: Path, work: Path) -> Path:
    """The folder of cifar10_{train,test}.npz, assembled from the parts on first use. Raises DataMissing
    naming what is missing."""
    import numpy as np

    if not (carried / MANIFEST).is_file():
        raise DataMissing(f"no {MANIFEST} carried (carry .gpu/data/{MANIFEST} in every call)")
    manifest = json.loads((carried / MANIFEST).read_text())
    data, ready = work / "data", work / "data" / "READY.json"
    if ready.is_file() and json.loads(ready.read_text()).get("stream") == manifest["stream"]["sha256"]:
        return data
    staged = stage_parts(manifest, carried, work / "parts")
    if staged:
        say(f"data: staged {', '.join(staged)} in {work / 'parts'}")
    arrays = decode_stream(manifest, read_parts(manifest, [work / "parts", carried]))
    data.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        np.savez(data / f"cifar10_{split}.npz", x=arrays[(split, "x")], y=arrays[(split, "y")])
    ready.write_text(json.dumps({"stream": manifest["stream"]["sha256"]}) + "\n")
    say(f"data: CIFAR-10 assembled in {data}, every array's sha256 verified")
    return data


# -- state that travels between calls: the runs' folders, in tar chunks under the return limit -------------
def write_chunked_tar(root: Path, members: Sequence[Path], out: Path, stem: str, limit: int) -> list[Path]:
    """A tar of ``members`` (paths under ``root``) written to ``out`` as ``stem-00.tar``, ``stem-01.tar``...
    each at most ``limit`` bytes; older chunks of that stem are removed first."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in members:
            tar.add(path, arcname=str(path.relative_to(root)))
    data = buf.getvalue()
    for old in out.glob(f"{stem}-*.tar"):
        old.unlink()
    paths = []
    for i, start in enumerate(range(0, max(len(data), 1), limit)):
        path = out / f"{stem}-{i:02d}.tar"
        atomic_write_bytes(path, data[start : start + limit])
        paths.append(path)
    return paths


def read_chunked_tar(folder: Path, stem: str, dest: Path) -> list[str]:
    """Join ``stem-NN.tar`` chunks from ``folder`` and extract them into ``dest``; the member names."""
    chunks = sorted(folder.glob(f"{stem}-*.tar"))
    if not chunks:
        return []
    data = b"".join(p.read_bytes() for p in chunks)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")  # no absolute paths, no escapes, no devices
        return tar.getnames()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def epochs_done(run: Path) -> int:
    progress = run / "progress.json"
    return int(json.loads(progress.read_text())["epochs_done"]) if progress.is_file() else -1


def run_dirs(root: Path) -> list[Path]:
    """Every run folder under ``root``, at any depth: those that wrote a progress.json (a study's runs
    live in ``study/runs/seed-<s>/<name>-<digest>``, the preset runs directly under ``root``)."""
    return sorted(p.parent for p in root.rglob("progress.json")) if root.is_dir() else []


def restore_state(carried: Path, runs: Path) -> list[str]:
    """Bring back the runs a previous call returned (carried as ``.gpu/state``), run by run, unless the
    machine still holds a run that got further."""
    if not carried.is_dir():
        return []
    unpacked = runs.parent / "state-unpacked"
    shutil.rmtree(unpacked, ignore_errors=True)
    if not read_chunked_tar(carried, "state", unpacked):
        return []
    restored = []
    for run in run_dirs(unpacked):
        here = runs / run.relative_to(unpacked)
        if epochs_done(run) > epochs_done(here):
            shutil.rmtree(here, ignore_errors=True)
            here.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(run), here)
            restored.append(f"{here.relative_to(runs)} (epoch {epochs_done(here)})")
    shutil.rmtree(unpacked, ignore_errors=True)
    return restored


# -- the device run -----------------------------------------------------------------------------------------
@dataclass
class Budget:
    """The call's wall-clock budget (``--minutes``), minus a reserve for writing the results."""

    deadline: float
    reserve: float = 40.0

    def left(self) -> float:
        return self.deadline - self.reserve - time.monotonic()


@dataclass
class Report:
    """What this call did, phase by phase; rendered as summary.md."""

    started: str
    tag: str = "call"  # names this call's files among the machine's results
    env: dict[str, Any] = field(default_factory=dict)
    lines: dict[str, list[str]] = field(default_factory=dict)

    def add(self, section: str, line: str) -> None:
        self.lines.setdefault(section, []).append(line)
        say(f"{section}: {line}")


def ensure_packages(work: Path) -> None:
    """Make bockd importable: install the carried wheels into ``work/site`` if pydantic is missing, and put
    it and the repository on sys.path and PYTHONPATH (subprocesses inherit that)."""
    site = work / "site"
    try:
        import pydantic  # noqa: F401
    except ImportError:
        wheels = sorted(WHEELS.glob("*.whl"))
        if not (site / "pydantic").is_dir():
            if not wheels:
                raise SystemExit(
                    "pydantic is missing and no wheels were carried: carry .gpu/wheels (every call does)"
                ) from None
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
            cmd += ["--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)]
            subprocess.run(cmd, check=True)
            names = ", ".join(w.name.split("-")[0] for w in wheels)
            say(f"installed {len(wheels)} wheels into {site}: {names}")
        sys.path[:0] = [str(site)]
    sys.path[:0] = [str(REPO)]
    paths = [str(site), str(REPO), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu_count": os.cpu_count(),
    }
    with contextlib.suppress(Exception):
        import pydantic

        env["pydantic"] = pydantic.VERSION
    env["source_sha256"] = source_digest()
    with contextlib.suppress(Exception):
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        env["nvidia_smi"] = smi.stdout.strip()
    return env


def source_digest() -> str:
    """sha256 (first 12 hex digits) of the Python sources that ran: the tree travels without .git, so this
    names the code version (``python benchmarks/gpu_check.py digest`` prints the same here)."""
    h = hashlib.sha256()
    for path in sorted(
        [*REPO.glob("bockd/**/*.py"), *REPO.glob("benchmarks/*.py"), *REPO.glob("tests/*.py")]
    ):
        h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def cuda_test_files() -> list[str]:
    """Test modules that hold CUDA tests (the others are not collected: their imports may be missing)."""
    return sorted(
        str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py") if "mark.cuda" in p.read_text()
    )


def run_logged(cmd: list[str], log_path: Path, timeout: float) -> tuple[int | None, str]:
    """Run ``cmd`` in the repository with its output in ``log_path``; (exit code or None on timeout, last
    output line)."""
    with open(log_path, "w") as fh:
        try:
            code: int | None = subprocess.run(
                cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, timeout=max(timeout, 1)
            ).returncode
        except subprocess.TimeoutExpired:
            code = None
    lines = [line.strip("= ") for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    return code, (lines[-1] if lines else "")


def phase_tests(args: argparse.Namespace, budget: Budget, results: Path, report: Report) -> None:
    files = cuda_test_files()
    # -v: each test's outcome is in the log even if the phase is cut short; cheap tests come first.
    cmd = [sys.executable, "-m", "pytest", "-v", "-m", "cuda", "--noconftest", "-p", "no:cacheprovider"]
    cmd += ["--continue-on-collection-errors", "--durations=10", *files]
    timeout = min(args.tests_minutes * 60, budget.left())
    code, last = run_logged(cmd, results / "tests-cuda.log", timeout)
    status = "timed out" if code is None else f"exit {code}"
    report.add("CUDA tests", f"`pytest -m cuda` on {len(files)} files: {last} ({status}; log tests-cuda.log)")


@dataclass(frozen=True)
class Variant:
    name: str
    flags: tuple[str, ...]
    cuda_only: bool
    compiles: bool


VARIANTS = {
    "eager": Variant("eager", (), False, False),
    "graph": Variant("graph", ("--cuda-graph",), True, False),
    "compile-graph": Variant("compile-graph", ("--compile", "--cuda-graph"), True, True),
    "reduce-overhead": Variant("reduce-overhead", ("--compile-mode", "reduce-overhead"), True, True),
    "compile": Variant("compile", ("--compile",), False, True),
}


def bench_plan(args: argparse.Namespace, cuda: bool, report: Report) -> list[tuple[Variant, str]]:
    """(variant, arch) in priority order: every arch eager and graphed first, compiled ones after (their
    compilation takes minutes), ResNet-20 before ResNet-110."""
    plan = []
    for name in args.bench_variants:
        variant = VARIANTS[name]
        if variant.cuda_only and not cuda:
            report.add("Step benchmark", f"{name}: skipped, needs CUDA")
            continue
        archs = args.bench_archs[:1] if variant.compiles else args.bench_archs
        plan += [(variant, arch) for arch in archs]
    return sorted(plan, key=lambda va: (va[0].compiles, args.bench_variants.index(va[0].name)))


def phase_bench(args: argparse.Namespace, budget: Budget, results: Path, report: Report, cuda: bool) -> None:
    out = results / "bench"
    out.mkdir(exist_ok=True)
    bench_deadline = time.monotonic() + min(args.bench_minutes * 60, budget.left())
    for variant, arch in bench_plan(args, cuda, report):
        left = bench_deadline - time.monotonic()
        if left < 20:
            report.add("Step benchmark", f"{variant.name} {arch}: not run, out of time")
            continue
        tag = f"{variant.name}-{arch}"
        cmd = [sys.executable, "benchmarks/train_step.py", "--archs", arch, "--epoch-estimate"]
        cmd += ["--iters", str(args.bench_iters), "--warmup", "5", "--rounds", "3"]
        cmd += [
            "--batch-size",
            str(args.bench_batch),
            "--device",
            args.device,
            "--tag",
            tag,
            "--out",
            str(out),
        ]
        start = time.monotonic()
        code, last = run_logged([*cmd, *variant.flags], out / f"{tag}.log", left)
        took = time.monotonic() - start
        status = "timed out" if code is None else ("ok" if code == 0 else f"failed, exit {code}: {last}")
        report.add("Step benchmark", f"{variant.name} {arch}: {status} in {took:.0f}s")
    for line in bench_table(out):
        report.lines.setdefault("Step benchmark table", []).append(line)


def bench_table(out: Path) -> list[str]:
    rows = [
        "| variant | arch | ensemble img/s | 5 baselines img/s "
        f"| ensemble / baselines (paper {PAPER_RATIO:.2f}) "
        "| 350 epochs, ensemble (min) | + 5 baselines (min) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for path in sorted(out.glob("train_step-*.json")):
        report = json.loads(path.read_text())
        variant = path.stem.split("-", 2)[-1].rsplit("-", 1)[0]
        for r in report["results"]:
            base = r["batch_size"] / r["baselines_total_step_s"]
            ens_min, base_min = (SCHEDULE_IMAGES / 60 / rate for rate in (r["ensemble_images_per_s"], base))
            rows.append(
                f"| {variant} | {r['arch']} | {r['ensemble_images_per_s']:.0f} | {base:.0f} "
                f"| {r['ensemble_over_baselines']:.2f} | {ens_min:.0f} | {ens_min + base_min:.0f} |"
            )
    return rows if len(rows) > 2 else []


class OutOfTime(Exception):
    """Raised from a checkpoint callback when the next epoch would not fit in the call's budget."""


class Deadline:
    """Engine callback: after each checkpoint, stop the run (raising OutOfTime) unless another epoch fits,
    and every ``save_every`` seconds write the state to $OUT (so a call killed at its limit still returns
    it)."""

    def __init__(self, budget: Budget, save: Any, save_every: float = 60.0) -> None:
        self.budget, self.save, self.save_every = budget, save, save_every
        self.mark = self.saved = time.monotonic()
        self.epoch_seconds = 0.0

    def on_train_start(self, trainer: Any) -> None:
        self.mark = time.monotonic()

    def on_checkpoint(self, trainer: Any, path: Path) -> None:
        now = time.monotonic()
        epoch, self.mark = now - self.mark, now
        # The slowest epoch so far decides: one that also evaluates (runtime.eval_every) takes longer.
        self.epoch_seconds = max(self.epoch_seconds, epoch)
        write_progress(trainer, epoch)
        if len(trainer.history) >= trainer.config.epochs:
            return  # the last epoch: let the run write its outputs
        if now - self.saved > self.save_every:
            self.save()
            self.saved = now
        if self.budget.left() < 1.15 * self.epoch_seconds:
            raise OutOfTime


def write_progress(trainer: Any, epoch_seconds: float) -> None:
    h = trainer.history[-1]
    scored = {k: v for k, v in h.items() if k.startswith("test/") and k.endswith("/top1")}
    progress = {
        "epochs_done": len(trainer.history),
        "epochs": trainer.config.epochs,
        "finished": len(trainer.history) >= trainer.config.epochs,
        "epoch_seconds": epoch_seconds,
        "train_images_per_s": h["images_per_s"],
        "last_test_top1": scored,
        "device": str(trainer.device),
        "cuda_graph": trainer.config.runtime.cuda_graph,
    }
    (trainer.workdir / "progress.json").write_text(json.dumps(progress, indent=2) + "\n")


def run_overrides(args: argparse.Namespace, name: str, cuda: bool) -> dict[str, Any]:
    """The run's config overrides. data.path stays unset: the data is read from this machine's folder
    (``load_training_data``'s ``source``), and a checkpoint's identity must not name a machine's path."""
    from bockd.config import merge_overrides, parse_assignments

    over: dict[str, Any] = {
        "model": {"arch": args.arch},
        "runtime": {
            "device": args.device,
            "progress": "log",
            "checkpoint_every": 1,
            "cuda_graph": cuda and not args.no_cuda_graph,
        },
    }
    if name != "ensemble":
        over |= {"mode": "baseline", "student": int(name.rsplit("s", 1)[1]) - 1}
    return merge_overrides(over, parse_assignments(args.set or []))


def phase_train(
    args: argparse.Namespace, budget: Budget, data: Path, runs: Path, report: Report, cuda: bool, save: Any
) -> None:
    from bockd.config import build_config
    from bockd.engine import load_training_data

    dataset, last_epoch = None, 0.0
    for name in args.runs:
        workdir = runs / name
        config = build_config(args.preset, run_overrides(args, name, cuda))
        if epochs_done(workdir) >= config.epochs:
            report.add("Training", f"{name}: finished earlier ({config.epochs} epochs)")
            continue
        if budget.left() < max(30.0, 1.5 * last_epoch):
            report.add(
                "Training", f"{name}: not started, out of time (at epoch {max(epochs_done(workdir), 0)})"
            )
            continue
        if dataset is None:
            dataset = load_training_data(config, source=data)
        try:
            last_epoch = train_run(config, dataset, workdir, budget, save) or last_epoch
        except Exception as err:  # the GPU path is new: report it, fall back, keep the other runs
            report.add("Training", f"{name}: failed with cuda_graph={config.runtime.cuda_graph}: {err!r}")
            if not config.runtime.cuda_graph:
                continue
            args.no_cuda_graph = True  # the runtime is not part of a checkpoint's identity: resume eagerly
            config = build_config(args.preset, run_overrides(args, name, cuda))
            report.add("Training", f"{name}: retrying without runtime.cuda_graph (and every later run)")
            last_epoch = train_run(config, dataset, workdir, budget, save) or last_epoch
        report.add("Training", run_line(name, workdir, config.epochs))
        save()


def phase_study(
    args: argparse.Namespace, budget: Budget, data: Path, runs: Path, report: Report, cuda: bool, save: Any
) -> None:
    """A recipe study (``--study``, e.g. stage B: bockd's recipe against the paper's on full CIFAR-10) as
    far as the budget goes, resumed across calls: ``bockd.study.run_study`` with a ``fit`` that trains
    within the budget. The comparison covers the seeds whose runs all finished."""
    from bockd.config import merge_overrides
    from bockd.engine import Trainer
    from bockd.study import load_study, run_study

    spec = load_study(args.study)
    last_epoch = 0.0

    def fit(config: Any, dataset: Any, workdir: Path) -> Any:
        nonlocal last_epoch
        runtime = run_overrides(args, "ensemble", cuda)["runtime"]  # not part of a run's identity
        config = type(config).model_validate(merge_overrides(config.to_dict(), {"runtime": runtime}))
        name = str(workdir.relative_to(runs))
        if epochs_done(workdir) < config.epochs:
            if budget.left() < max(30.0, 1.5 * last_epoch):
                report.add(
                    "Study", f"{name}: not started, out of time (at epoch {max(epochs_done(workdir), 0)})"
                )
                return None
            last_epoch = train_run(config, dataset, workdir, budget, save) or last_epoch
            report.add("Study", run_line(name, workdir, config.epochs))
            save()
        if epochs_done(workdir) < config.epochs:
            return None
        return Trainer(config, dataset, workdir).fit()  # finished: reads the run back, trains nothing

    table = run_study(spec, runs / "study", source=data, fit=fit)
    for row in table["recipes"]:
        gains = ", ".join(
            f"{label} {cell['gain_points']['mean']:+.2f}"
            for label, cell in row["students"].items()
            if "gain_points" in cell
        )
        report.add("Study", f"{row['recipe']}: seeds {row['seeds']}: {gains}")


def train_run(config: Any, dataset: Any, workdir: Path, budget: Budget, save: Any) -> float:
    """Train (resuming) until the run is done or the budget stops it; the last epoch's seconds."""
    import torch

    from bockd.engine import Trainer

    deadline = Deadline(budget, save)
    trainer = Trainer(config, dataset, workdir, callbacks=[deadline])
    try:
        with contextlib.suppress(OutOfTime):
            trainer.fit()
    finally:
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return deadline.epoch_seconds


def run_line(name: str, workdir: Path, epochs: int) -> str:
    if not (workdir / "progress.json").is_file():
        return f"{name}: no epoch finished"
    p = json.loads((workdir / "progress.json").read_text())
    accs = " ".join(f"{k.split('/')[1]}={v:.2f}" for k, v in p["last_test_top1"].items())
    scored = f"test top-1 {accs}" if accs else "not evaluated this epoch (runtime.eval_every)"
    left = (epochs - p["epochs_done"]) * p["epoch_seconds"] / 60
    return (
        f"{name}: epoch {p['epochs_done']}/{epochs}, {p['epoch_seconds']:.1f} s/epoch "
        f"({p['train_images_per_s']:.0f} img/s training), {scored}; about {left:.0f} min to go"
    )


def summary_markdown(report: Report) -> str:
    env = report.env
    lines = [
        f"# GPU check, {report.started}",
        "",
        f"Machine: {env.get('gpu') or 'no GPU'}; python {env.get('python')}, torch {env.get('torch')} "
        f"(CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}), pydantic {env.get('pydantic')}; "
        f"{env.get('cpu_count')} CPUs; sources {env.get('source_sha256')}.",
    ]
    for section, rows in report.lines.items():
        lines += ["", f"## {section}", ""]
        table = rows and rows[0].startswith("|")
        lines += rows if table else [f"- {r}" for r in rows]
    return "\n".join(lines) + "\n"


def write_out(out: Path, work: Path, report: Report) -> None:
    """$OUT/gpu-check: summary.md, results-NN.tar (every call's results on this machine and the runs'
    small files), state-NN.tar (the runs' folders)."""
    out.mkdir(parents=True, exist_ok=True)
    results, runs = work / "results", work / "runs"
    (results / f"summary-{report.tag}.md").write_text(summary_markdown(report))  # one per call
    (results / "env.json").write_text(json.dumps(report.env, indent=2) + "\n")
    atomic_write_bytes(out / "summary.md", summary_markdown(report).encode())
    small = [p for p in runs.rglob("*.json")] if runs.is_dir() else []
    write_chunked_tar(work, [results, *small], out, "results", RETURN_FILE_LIMIT)
    if runs.is_dir():
        write_chunked_tar(runs, run_dirs(runs), out, "state", RETURN_FILE_LIMIT)


def configure_logging(path: Path) -> None:
    fmt = logging.Formatter("%(asctime)s %(name)s %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(path)):
        handler.setFormatter(fmt)
        root.addHandler(handler)


def cmd_run(args: argparse.Namespace) -> int:
    budget = Budget(time.monotonic() + args.minutes * 60)
    work = work_dir()
    out = Path(os.environ.get("OUT") or args.out) / "gpu-check"
    results = work / "results"
    results.mkdir(parents=True, exist_ok=True)
    configure_logging(results / "gpu-check.log")
    report = Report(
        time.strftime("%Y-%m-%d %H:%M:%S %Z"), tag=time.strftime("%H%M%S-") + args.phases.replace(",", "+")
    )
    ensure_packages(work)
    import torch

    report.env = environment()
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if not cuda:
        report.add(
            "Note", "no CUDA device: CUDA-only parts are skipped (this is a rehearsal, not a measurement)"
        )
    data = stage_and_prepare(report, work)
    restored = restore_state(CARRIED_STATE, work / "runs")
    if restored:
        report.add("State", f"restored from .gpu/state: {', '.join(restored)}")

    def save() -> None:
        write_out(out, work, report)

    phases = set(args.phases.split(",")) - {"stage", "none", ""}
    unknown = phases - {"tests", "bench", "train"}
    if unknown:
        raise SystemExit(f"--phases: unknown {sorted(unknown)}; expected stage, tests, bench, train")
    failed = False
    if "tests" in phases:
        failed |= guarded(report, "CUDA tests", phase_tests, args, budget, results, report)
    if "bench" in phases:
        failed |= guarded(report, "Step benchmark", phase_bench, args, budget, results, report, cuda)
    if "train" in phases and data is None:
        report.add("Training", "not run: CIFAR-10 is incomplete on this machine (see Data)")
    elif "train" in phases:
        phase = phase_study if args.study else phase_train
        failed |= guarded(report, "Training", phase, args, budget, data, work / "runs", report, cuda, save)
    save()
    print(summary_markdown(report), flush=True)
    return 1 if failed else 0


def guarded(report: Report, section: str, phase: Any, *args: Any) -> bool:
    """Run a phase; an exception is reported (the other phases and the results still happen). True if
    it raised."""
    try:
        phase(*args)
    except Exception as err:
        report.add(section, f"stopped by {err!r} (traceback in the output)")
        log.exception("%s failed", section)
        return True
    return False


def stage_and_prepare(report: Report, work: Path) -> Path | None:
    try:
        data = prepare_data(PACKED_DATA, work)
    except DataMissing as missing:
        report.add(
            "Data",
            f"CIFAR-10 not complete yet, missing: {missing}. Carry the missing part in the next call, "
            "within 30 s (the machine stays warm 30 s after a call and keeps what earlier calls staged); "
            "if the machine went back in between, send every part again, one call each.",
        )
        return None
    report.add("Data", f"CIFAR-10 ready in {data} (every array's sha256 checked)")
    return data


# -- rehearsal (here): the device calls simulated on this machine ------------------------------------------
def device_tree(dest: Path, carry: Sequence[str], carried_from: dict[str, Path]) -> None:
    """What a device call sees: a copy of the working tree (tracked and untracked-not-ignored files) plus
    the carried paths, each copied from ``carried_from`` if named there, else from the repository."""
    shutil.rmtree(dest, ignore_errors=True)
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout  # fmt: skip
    for rel in filter(None, out.decode().split("\0")):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    for rel in carry:
        src = carried_from.get(rel, REPO / rel)
        if src.is_dir():
            shutil.copytree(src, dest / rel)
        elif src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def rehearse_call(args: argparse.Namespace, call: dict[str, Any], machine: Path, state: Path) -> Path:
    """One simulated device call on ``machine`` (its work folder persists while "warm"); the returned
    files land in ``machine/out-<name>``, the state files in ``state`` for the next call to carry."""
    tree, out = machine / "tree", machine / f"out-{call['name']}"
    device_tree(tree, call["carry"], {".gpu/state": state})
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "OUT": str(out), "BOCKD_GPU_WORK": str(machine / "work"), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    cmd = [args.python, "benchmarks/gpu_check.py", "run", "--phases", call["phases"]]
    cmd += ["--minutes", str(args.minutes), *args.run_args]
    say(f"--- call {call['name']}: carry {' '.join(call['carry'])}; $ {' '.join(cmd[1:])}")
    subprocess.run(cmd, cwd=tree, env=env, check=True)
    returned = sorted(p for p in out.rglob("*") if p.is_file())
    sizes = ", ".join(f"{p.relative_to(out)} {p.stat().st_size / MiB:.2f} MiB" for p in returned)
    say(f"--- call {call['name']} returned {len(returned)} files: {sizes}")
    if len(returned) > 8 or any(p.stat().st_size > 16 * MiB for p in returned):
        raise SystemExit("more than the device tool returns (8 files, 16 MiB each)")
    returned_state = sorted((out / "gpu-check").glob("state-*.tar"))
    if returned_state:  # what the session does: replace .gpu/state only with state a call returned
        shutil.rmtree(state, ignore_errors=True)
        state.mkdir(parents=True)
        for chunk in returned_state:
            shutil.copy2(chunk, state / chunk.name)
    return out


def cmd_rehearse(args: argparse.Namespace) -> int:
    """Two simulated sessions of two calls each (plus one call on a cold machine that lacks a part), with
    ``--python`` standing in for the GPU machine's python3 (one without pydantic)."""
    manifest = json.loads((PACKED_DATA / MANIFEST).read_text())
    first, last = call_plan(manifest)[0], call_plan(manifest)[-1]
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    state = root / "state"
    cold = {**last, "name": "cold-part2-only"}
    rehearse_call(args, cold, root / "machine-0", state)  # a fresh machine: part 1 never arrived
    for session in (1, 2):
        machine = root / f"machine-{session}"  # each session gets a fresh machine
        early = {**first, "name": f"s{session}-call1", "phases": first["phases"] if session == 1 else "stage"}
        rehearse_call(args, early, machine, state)
        rehearse_call(args, {**last, "name": f"s{session}-call2"}, machine, state)
    say(f"rehearsal done: every call's returned files are under {root}/machine-*/out-*")
    return 0


def cmd_digest(args: argparse.Namespace) -> int:
    print(source_digest())
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pk = sub.add_parser("pack", help="here: wheels and CIFAR-10 parts into .gpu/")
    pk.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    pk.add_argument("--python-version", default="3.12", help="the GPU machine's python3")
    pk.add_argument(
        "--part-mib",
        type=float,
        default=56.0,
        help="largest part (a call carries 64 MiB, the tree and wheels included)",
    )
    r = sub.add_parser("run", help="on the GPU machine: the phases, results to $OUT/gpu-check")
    r.add_argument(
        "--phases", default="tests,bench,train", help="comma-separated: stage, tests, bench, train"
    )
    r.add_argument("--minutes", type=float, default=9.0, help="wall-clock budget of this call")
    r.add_argument("--out", default="gpu-out", help="used when $OUT is unset")
    r.add_argument("--device", default="auto")
    r.add_argument("--tests-minutes", type=float, default=2.5)
    r.add_argument("--bench-minutes", type=float, default=4.0)
    r.add_argument("--bench-archs", nargs="+", default=["resnet20", "resnet110"])
    r.add_argument("--bench-variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    r.add_argument("--bench-iters", type=int, default=20)
    r.add_argument("--bench-batch", type=int, default=128)
    r.add_argument("--preset", default="paper-cifar10")
    r.add_argument("--arch", default="resnet20")
    r.add_argument("--runs", nargs="+", default=list(RUN_NAMES), choices=list(RUN_NAMES))
    r.add_argument("--no-cuda-graph", action="store_true", help="train without runtime.cuda_graph")
    r.add_argument(
        "--study",
        help="train this recipe study instead of --preset's runs (benchmarks/studies/stage-b-cifar10.yaml)",
    )
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="training config override")
    sub.add_parser("digest", help="the source digest a run reports (which code ran)")
    h = sub.add_parser("rehearse", help="here: simulate the device calls with another interpreter")
    h.add_argument("--python", required=True, help="an interpreter like the GPU machine's (no pydantic)")
    h.add_argument("--root", default="/tmp/bockd-gpu-rehearsal")
    h.add_argument("--minutes", type=float, default=3.0)
    h.add_argument("run_args", nargs=argparse.REMAINDER, help="after --: more arguments for each run call")
    args = p.parse_args(argv)
    if args.command == "rehearse" and args.run_args[:1] == ["--"]:
        args.run_args = args.run_args[1:]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    commands = {"pack": cmd_pack, "run": cmd_run, "rehearse": cmd_rehearse, "digest": cmd_digest}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
