"""benchmarks/gpu_check.py, the GPU machine's entry point: the lossless image codec, the dataset sent in
parts and assembled only when every part is intact, the state that travels between calls, the time budget
and the call plan. (The whole path, device calls simulated, is `gpu_check.py rehearse`.)"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
SHARED_DATA = Path(
    os.environ.get("BOCKD_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
CIFAR_TEST = SHARED_DATA / "cifar10" / "cifar10_test.npz"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


def _images(n: int, seed: int = 0) -> np.ndarray:
    """Gradients plus noise, wrapping at 256 (edges and all)."""
    rng = np.random.default_rng(seed)
    ramp = np.add.outer(np.arange(32), np.arange(32))[None, :, :, None] * rng.integers(1, 4, (n, 1, 1, 3))
    return ((ramp + rng.integers(0, 40, (n, 32, 32, 3))) % 256).astype(np.uint8)


def test_codec_round_trip_is_exact(gc) -> None:
    rng = np.random.default_rng(1)
    for x in (_images(23), rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)):
        buf = gc.encode_images(x)
        assert len(buf) == x.nbytes
        assert np.array_equal(gc.decode_images(buf, x.shape), x)


@pytest.mark.skipif(not CIFAR_TEST.is_file(), reason="needs the shared CIFAR-10 test split")
def test_codec_compresses_real_photos_better_than_raw_pixels(gc) -> None:
    """Measured on the first 300 test images: 0.555 of the raw bytes against xz's 0.751 on the pixels."""
    import lzma

    with np.load(CIFAR_TEST) as z:
        x = z["x"][:300]
    encoded = gc.encode_images(x)
    assert np.array_equal(gc.decode_images(encoded, x.shape), x)
    assert len(lzma.compress(encoded)) < 0.8 * len(lzma.compress(x.tobytes()))


def _fake_cifar(folder: Path) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True)
    arrays = {"train": _images(30, 2), "test": _images(12, 3)}
    for split, x in arrays.items():
        np.savez_compressed(folder / f"cifar10_{split}.npz", x=x, y=np.arange(len(x), dtype=np.int64) % 10)
    return arrays


@pytest.fixture
def packed(gc, tmp_path: Path) -> tuple[Path, dict]:
    source = tmp_path / "source"
    arrays = _fake_cifar(source)
    manifest = gc.pack_data(source, tmp_path / "pack", part_mib=30_000 / gc.MiB)
    assert len(manifest["parts"]) >= 3
    assert manifest["parts"][0]["bytes"] == 30_000  # the first parts are full, the last takes the rest
    return tmp_path / "pack", arrays


def _carry(pack: Path, dest: Path, names: list[str]) -> Path:
    """A call's .gpu/data: the manifest and the named parts."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ["cifar10.manifest.json", *names]:
        (dest / name).write_bytes((pack / name).read_bytes())
    return dest


def test_parts_assemble_across_calls_and_a_missing_part_is_named(gc, packed, tmp_path: Path) -> None:
    pack, arrays = packed
    parts = [p["name"] for p in json.loads((pack / gc.MANIFEST).read_text())["parts"]]
    work = tmp_path / "work"  # the machine's /tmp: kept while it stays warm
    with pytest.raises(gc.DataMissing) as missing:
        gc.prepare_data(_carry(pack, tmp_path / "call1", parts[:1]), work)
    assert str(missing.value) == ", ".join(parts[1:])
    assert (work / "parts" / parts[0]).is_file()  # staged for the next call
    data = gc.prepare_data(_carry(pack, tmp_path / "call2", parts[1:]), work)
    for split, x in arrays.items():
        with np.load(data / f"cifar10_{split}.npz") as z:
            assert np.array_equal(z["x"], x) and z["y"].dtype == np.int64
    assert gc.prepare_data(_carry(pack, tmp_path / "call3", []), work) == data  # assembled once


def test_a_damaged_part_is_not_staged_and_is_named(gc, packed, tmp_path: Path) -> None:
    pack, _ = packed
    manifest = json.loads((pack / gc.MANIFEST).read_text())
    names = [p["name"] for p in manifest["parts"]]
    carried = _carry(pack, tmp_path / "call", names)
    (carried / names[1]).write_bytes(b"x" + (carried / names[1]).read_bytes()[1:])
    with pytest.raises(gc.DataMissing, match=f"{names[1]} \\(damaged"):
        gc.prepare_data(carried, tmp_path / "work")
    assert not (tmp_path / "work" / "parts" / names[1]).exists()


def test_no_manifest_says_what_to_carry(gc, tmp_path: Path) -> None:
    with pytest.raises(gc.DataMissing, match=r"carry \.gpu/data/cifar10\.manifest\.json"):
        gc.prepare_data(tmp_path / "nothing", tmp_path / "work")


def test_state_travels_in_chunks_under_the_return_limit(gc, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for name, size in (("ensemble", 5000), ("baseline-s1", 3000)):
        (runs / name).mkdir(parents=True)
        (runs / name / "checkpoint.pt").write_bytes(np.random.default_rng(0).bytes(size))
    out = tmp_path / "out"
    out.mkdir()
    (out / "state-07.tar").write_bytes(b"stale")
    chunks = gc.write_chunked_tar(runs, sorted(runs.iterdir()), out, "state", limit=4096)
    assert len(chunks) >= 3 and all(p.stat().st_size <= 4096 for p in chunks)
    assert not (out / "state-07.tar").exists()
    back = tmp_path / "back"
    gc.read_chunked_tar(out, "state", back)
    for name in ("ensemble", "baseline-s1"):
        assert (back / name / "checkpoint.pt").read_bytes() == (runs / name / "checkpoint.pt").read_bytes()


def _run_folder(root: Path, name: str, epochs: int) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "progress.json").write_text(json.dumps({"epochs_done": epochs}))


def test_restore_keeps_whichever_copy_of_a_run_got_further(gc, tmp_path: Path) -> None:
    returned = tmp_path / "returned"
    _run_folder(returned, "ensemble", 3)
    _run_folder(returned, "baseline-s1", 9)
    carried = tmp_path / "carried"
    carried.mkdir()
    gc.write_chunked_tar(returned, sorted(returned.iterdir()), carried, "state", limit=1 << 20)
    runs = tmp_path / "work" / "runs"  # the warm machine already trained the ensemble further
    _run_folder(runs, "ensemble", 5)
    assert gc.restore_state(carried, runs) == ["baseline-s1 (epoch 9)"]
    assert gc.epochs_done(runs / "ensemble") == 5 and gc.epochs_done(runs / "baseline-s1") == 9


class _Trainer(SimpleNamespace):
    def __init__(self, workdir: Path, done: int, epochs: int) -> None:
        history = [{"images_per_s": 100.0, "test/s1/top1": 50.0}] * done
        runtime = SimpleNamespace(cuda_graph=False)
        super().__init__(history=history, config=SimpleNamespace(epochs=epochs, runtime=runtime))
        self.workdir, self.device = workdir, "cpu"


def test_deadline_stops_a_run_only_when_the_next_epoch_would_not_fit(gc, tmp_path: Path) -> None:
    saves = []
    budget = gc.Budget(deadline=time.monotonic() + 100, reserve=0)
    deadline = gc.Deadline(budget, lambda: saves.append(1), save_every=0)
    deadline.mark = time.monotonic() - 10  # the epoch took ten seconds; 100 s are left
    deadline.on_checkpoint(_Trainer(tmp_path, done=1, epochs=350), tmp_path)
    assert saves == [1] and json.loads((tmp_path / "progress.json").read_text())["epochs_done"] == 1
    deadline.mark = time.monotonic() - 90  # a 90 s epoch: another would overrun
    with pytest.raises(gc.OutOfTime):
        deadline.on_checkpoint(_Trainer(tmp_path, done=2, epochs=350), tmp_path)
    deadline.mark = time.monotonic() - 90
    deadline.on_checkpoint(_Trainer(tmp_path, done=350, epochs=350), tmp_path)  # the last: outputs next
    assert json.loads((tmp_path / "progress.json").read_text())["finished"] is True


def test_call_plan_carries_wheels_and_a_part_per_call_and_the_state_last(gc, monkeypatch) -> None:
    monkeypatch.setattr(gc, "tree_bytes", lambda: 1_000)
    monkeypatch.setattr(gc, "folder_bytes", lambda path: {"wheels": 10, "state": 100}[path.name])
    manifest = {"parts": [{"name": "cifar10.part1", "bytes": 5}, {"name": "cifar10.part2", "bytes": 7}]}
    first, last = gc.call_plan(manifest)
    assert first["carry"] == [".gpu/wheels", ".gpu/data/cifar10.manifest.json", ".gpu/data/cifar10.part1"]
    assert (first["phases"], first["bytes"]) == ("tests,bench", 1_015)
    assert last["carry"][-2:] == [".gpu/data/cifar10.part2", ".gpu/state"]
    assert (last["phases"], last["bytes"]) == ("train", 1_117)


def test_bench_plan_runs_cheap_variants_first_and_skips_cuda_ones_without_cuda(gc) -> None:
    args = SimpleNamespace(bench_variants=list(gc.VARIANTS), bench_archs=["resnet20", "resnet110"])
    report = gc.Report("now")
    on_gpu = [(v.name, a) for v, a in gc.bench_plan(args, True, report)]
    assert on_gpu[:4] == [
        ("eager", "resnet20"),
        ("eager", "resnet110"),
        ("graph", "resnet20"),
        ("graph", "resnet110"),
    ]
    assert {a for v, a in on_gpu[4:]} == {"resnet20"}  # compiled variants: the small network only
    on_cpu = [(v.name, a) for v, a in gc.bench_plan(args, False, report)]
    assert on_cpu == [("eager", "resnet20"), ("eager", "resnet110"), ("compile", "resnet20")]
    assert "graph: skipped, needs CUDA" in report.lines["Step benchmark"]


def test_cuda_test_files_are_found(gc) -> None:
    files = gc.cuda_test_files()
    assert "tests/test_gpu_path.py" in files and "tests/test_data.py" in files
    assert "tests/test_gpu_check.py" not in files


def _study_args(gc, tmp_path: Path) -> SimpleNamespace:
    import yaml

    study = tmp_path / "stage.yaml"
    recipes = {"paper": {"preset": "paper-cifar10"}, "bockd": {"preset": "bockd-cifar10"}}
    common = {"batch_size": 16, "runtime": {"progress": "off"}}
    spec = {"dataset": "cifar10", "num_students": 2, "seeds": [0], "epochs": 2, "baselines": [2]}
    study.write_text(yaml.safe_dump({**spec, "common": common, "recipes": recipes}, sort_keys=False))
    return SimpleNamespace(study=str(study), arch="resnet20", device="cpu", no_cuda_graph=True, set=None)


def test_a_study_trains_within_the_budget_and_its_runs_travel_in_the_state(gc, tmp_path: Path) -> None:
    """Stage B's path on the GPU machine: the study's runs (nested under study/runs/seed-0/) train within
    the call's budget, their state goes out and comes back by relative path, the comparison is written."""
    data = tmp_path / "cifar10"
    _fake_cifar(data)
    args, runs = _study_args(gc, tmp_path), tmp_path / "work" / "runs"
    report = gc.Report("now")
    gc.phase_study(
        args, gc.Budget(time.monotonic() + 600, reserve=0), data, runs, report, False, lambda: None
    )
    study = json.loads((runs / "study" / "study.json").read_text())
    assert [(row["recipe"], row["seeds"]) for row in study["recipes"]] == [("paper", [0]), ("bockd", [0])]
    assert len(gc.run_dirs(runs)) == 4  # two ensembles, each schedule's S2 baseline
    assert any(line.startswith("bockd: seeds [0]: S2 ") for line in report.lines["Study"])

    out = tmp_path / "out"
    (tmp_path / "work" / "results").mkdir()  # cmd_run makes it before any phase
    gc.write_out(out, tmp_path / "work", report)
    carried = tmp_path / "carried"
    carried.mkdir()
    for tar in out.glob("state-*.tar"):
        tar.rename(carried / tar.name)
    fresh = tmp_path / "fresh" / "runs"
    restored = gc.restore_state(carried, fresh)
    assert sorted(p.relative_to(fresh) for p in gc.run_dirs(fresh)) == sorted(
        p.relative_to(runs) for p in gc.run_dirs(runs)
    )
    assert all(name.startswith("study/runs/seed-0/") for name in restored)


def test_a_study_out_of_time_starts_nothing_and_writes_no_table(gc, tmp_path: Path) -> None:
    data = tmp_path / "cifar10"
    _fake_cifar(data)
    report, runs = gc.Report("now"), tmp_path / "runs"
    gc.phase_study(
        _study_args(gc, tmp_path), gc.Budget(time.monotonic(), 0), data, runs, report, False, lambda: None
    )
    assert all("not started, out of time" in line for line in report.lines["Study"])
    assert not (runs / "study" / "study.md").exists() and gc.run_dirs(runs) == []
