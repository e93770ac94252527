"""Distributed training (DDP, CPU + gloo, 2 ranks launched by ``torch.distributed.run``).

What "correct" means here. A 2-rank step is the single-process step on the same global batch with two
differences: (1) BatchNorm normalizes each rank's half-batch with that half's statistics (plain BN per
rank; running statistics are rank 0's), and (2) float sums happen in another order (gradient all-reduce,
metric all-reduce in float64, the last uneven batch's loss weights). (1) changes the math, so the exact
comparison is against ``ReferenceTrainer``: ONE process doing the same math (each global batch split
into the ranks' slices, a forward per slice, gradients weighted by slice size, rank 0's BN buffers kept).
Against it the loss curve must agree to 1e-5 relative and every weight to ATOL (below; measured:
bit-equal); against a plain single-process run (whole-batch BN) the loss curve agrees only to a few
percent (measured 0.3 % and 1.6 % in epochs 1 and 2), which is checked loosely to show the BN effect.

This module is also the worker script: ``python -m torch.distributed.run ... tests/test_distributed.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bockd.config import build_config
from bockd.data import BatchLoader, load_dataset
from bockd.engine import Trainer
from bockd.errors import ConfigError
from bockd.losses import LossOutput
from bockd.models import create_model

WORLD = 2
N_TRAIN = 701  # 10 global batches of 64 + one of 61: the last splits 31 / 30 (uneven shards)
EPOCHS = 2
# Measured (CPU, gloo): 2-rank vs ReferenceTrainer after 2 epochs (22 SGD steps): max |diff| over every
# weight and BN buffer is 0.0, loss curves bit-equal. That is expected with 2 ranks: DDP sums 2 gradients
# (commutative, one rounding) and divides by 2 (exact), the reference adds halves (exact scaling), and
# the last batch's 62/61 vs 31/61 weights differ by an exact factor 2. More ranks, NCCL's ring order or a
# different kernel per batch size would reorder sums, hence a tolerance, still far below what wrong
# sharding, weighting or buffer handling does (vs a plain single process: loss 0.3 % / 1.6 % off per
# epoch, weights up to ~5 off, mostly BN running variances).
ATOL = 1e-6
OUTPUTS = {"checkpoint.pt", "model.safetensors", "model.json", "history.json", "summary.json"}


def _overrides(runtime: dict | None = None, **over: object) -> dict:
    return {
        "model": {"arch": "resnet20", "num_students": 2},
        "epochs": EPOCHS,
        "batch_size": 64,
        "runtime": {"progress": "log", "checkpoint_every": 1, **(runtime or {})},
        **over,
    }


def _dataset():
    digits = load_dataset("digits", seed=0)
    return dataclasses.replace(digits, train=digits.train.subset(np.arange(N_TRAIN)))


class ReferenceTrainer(Trainer):
    """One process, the math of ``WORLD`` DDP ranks: per-slice BN, slice-weighted gradients, rank 0's
    BN buffers."""

    def train_step(self, x, y, scale=1.0, distill_scale=1.0):
        assert scale == 1.0
        n = y.shape[0]
        model = self.model
        self.optimizer.zero_grad(set_to_none=True)
        parts, logits, rank0_buffers = [], [], None
        for r, (xc, yc) in enumerate(zip(x.tensor_split(WORLD), y.tensor_split(WORLD), strict=True)):
            out = model(xc)
            adapted = [model.adapt(i, out.features[i]) for i in range(1, model.num_students)]
            loss = self.loss(out.logits, yc, out.features[0], adapted, distill_scale)
            w = yc.shape[0] / n
            (loss.total * w).backward()
            parts.append((w, loss))
            logits.append(out.logits)
            if r == 0:
                rank0_buffers = [b.clone() for b in model.buffers()]
        with torch.no_grad():
            for b, saved in zip(model.buffers(), rank0_buffers, strict=True):
                b.copy_(saved)
        self.optimizer.step()
        total = LossOutput(
            total=sum(w * p.total for w, p in parts),
            ce=sum(w * p.ce for w, p in parts),
            hint=sum(w * p.hint for w, p in parts),
            kd=sum(w * p.kd for w, p in parts),
        )
        return total, [torch.cat(z) for z in zip(*logits, strict=True)]


PRESET = "smoke-paper"  # the paper's loss: every term, the hint adapters included, crosses the ranks


# -- the worker (one per rank) ---------------------------------------------------------------------------
class _Recorder:
    """Writes which rank called which hook, and keeps a copy of every checkpoint (outside the workdir)."""

    def __init__(self, marks: Path) -> None:
        self.marks = marks

    def _mark(self, event: str) -> None:
        with open(self.marks / f"callbacks-rank{os.environ.get('RANK', '0')}.txt", "a") as fh:
            fh.write(event + "\n")

    def on_train_start(self, trainer):
        self._mark("start")

    def on_epoch_end(self, trainer, metrics):
        self._mark(f"epoch{int(metrics['epoch'])}")

    def on_checkpoint(self, trainer, path):
        shutil.copy(path, self.marks / f"checkpoint-epoch{len(trainer.history)}.pt")

    def on_train_end(self, trainer, result):
        self._mark("end")


def _worker(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", type=Path)
    parser.add_argument("marks", type=Path)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--baseline", action="store_true", help="train S2's baseline instead")
    parser.add_argument("--runtime", default="{}", help="runtime overrides as JSON")
    parser.add_argument("--preset", default=PRESET)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.marks.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        filename=args.marks / f"log-rank{os.environ['RANK']}.txt", level=logging.INFO, force=True
    )
    from bockd.engine import train

    over = {"mode": "baseline", "student": 1} if args.baseline else {}
    config = build_config(
        args.preset, _overrides(json.loads(args.runtime), batch_size=args.batch_size, **over)
    )
    train(config, args.workdir, callbacks=[_Recorder(args.marks)], dataset=_dataset())


def _launch(workdir: Path, marks: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    # The repository first, then whatever the caller had (the GPU check's wheel folder, for one).
    path = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, path))}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(WORLD),
        __file__,
        str(workdir),
        str(marks),
        *extra,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


# -- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dataset():
    return _dataset()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    root = tmp_path_factory.mktemp("ddp")
    start = time.perf_counter()
    _launch(root / "run", root / "marks")
    return root / "run", root / "marks", time.perf_counter() - start


@pytest.fixture(scope="module")
def reference_run(dataset, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """ReferenceTrainer's run, and a folder with a copy of its checkpoint after every epoch."""
    root = tmp_path_factory.mktemp("reference")
    (root / "marks").mkdir()
    config = build_config(PRESET, _overrides())
    ReferenceTrainer(config, dataset, root / "run", callbacks=[_Recorder(root / "marks")]).fit()
    return root / "run", root / "marks"


def _history(workdir: Path) -> list[dict]:
    return json.loads((workdir / "history.json").read_text())


def _weights(workdir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(workdir / "model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


# -- the tests -----------------------------------------------------------------------------------------
def test_two_ranks_match_the_single_process_reference(ddp_run, reference_run) -> None:
    workdir, _, seconds = ddp_run
    reference_run = reference_run[0]
    ddp, ref = _history(workdir), _history(reference_run)
    assert [h["epoch"] for h in ddp] == [1, 2]
    for a, b in zip(ddp, ref, strict=True):
        for key in ("train/loss", "train/s1/ce", "train/s2/ce", "train/s2/hint", "train/s1/kd"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
        # Accuracy counts every training sample once, over both ranks: same counts as one process.
        assert a["train/s1/top1"] == pytest.approx(b["train/s1/top1"], abs=0.2)
        assert a["test/ensemble/top1"] == pytest.approx(b["test/ensemble/top1"], abs=1.0)
    diff = _max_diff(_weights(workdir), _weights(reference_run))
    print(f"2-rank run took {seconds:.1f}s; max |weight diff| vs reference = {diff:.2e}")
    assert diff <= ATOL


def test_two_ranks_stay_close_to_a_plain_single_process_run(ddp_run, dataset, tmp_path: Path) -> None:
    """Whole-batch vs half-batch BatchNorm statistics: a real but small difference in the loss curve."""
    plain = Trainer(build_config(PRESET, _overrides()), dataset, tmp_path).fit().history
    ddp = _history(ddp_run[0])
    for a, b in zip(ddp, plain, strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=0.05)


def test_only_rank_zero_writes_logs_and_calls_back(ddp_run) -> None:
    workdir, marks, _ = ddp_run
    assert {p.name for p in workdir.iterdir()} == OUTPUTS  # no temporary files, nothing else
    state = torch.load(workdir / "checkpoint.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state["model"])
    assert (marks / "callbacks-rank0.txt").read_text().split() == ["start", "epoch1", "epoch2", "end"]
    assert not (marks / "callbacks-rank1.txt").exists()
    rank0, rank1 = (marks / "log-rank0.txt").read_text(), (marks / "log-rank1.txt").read_text()
    assert rank0.count("[ensemble] epoch") == EPOCHS
    assert "[ensemble] epoch" not in rank1


def test_two_rank_checkpoint_resumes_in_one_process(ddp_run, dataset, tmp_path: Path) -> None:
    """The epoch-1 checkpoint of the 2-rank run, resumed by one process doing the same math, ends where
    the 2-rank run ended."""
    workdir, marks, _ = ddp_run
    shutil.copy(marks / "checkpoint-epoch1.pt", tmp_path / "checkpoint.pt")
    trainer = ReferenceTrainer(build_config(PRESET, _overrides()), dataset, tmp_path)
    result = trainer.fit()
    assert trainer.start_epoch == 1
    ddp = _history(workdir)
    assert result.history[0] == ddp[0]  # carried over from the checkpoint, not retrained
    assert result.history[1]["train/loss"] == pytest.approx(ddp[1]["train/loss"], rel=1e-5)
    assert _max_diff(_weights(tmp_path), _weights(workdir)) <= ATOL


def test_single_process_checkpoint_resumes_under_two_ranks(reference_run, tmp_path: Path) -> None:
    """The other way: the reference's epoch-1 state resumed by 2 ranks ends on the reference's weights."""
    reference_run, reference_marks = reference_run
    run, marks = tmp_path / "run", tmp_path / "marks"
    run.mkdir()
    shutil.copy(reference_marks / "checkpoint-epoch1.pt", run / "checkpoint.pt")
    _launch(run, marks)
    assert (marks / "callbacks-rank0.txt").read_text().split() == ["start", "epoch2", "end"]
    assert _history(run)[1]["train/loss"] == pytest.approx(_history(reference_run)[1]["train/loss"], rel=1e-5)
    assert _max_diff(_weights(run), _weights(reference_run)) <= ATOL


def test_baseline_mode_runs_under_two_ranks(dataset, tmp_path: Path) -> None:
    """A single student (no adapters) under DDP: same loss curve as a plain run to the BN effect."""
    _launch(tmp_path / "run", tmp_path / "marks", "--baseline")
    ddp = _history(tmp_path / "run")
    plain = Trainer(build_config(PRESET, _overrides(mode="baseline", student=1)), dataset, tmp_path / "p")
    for a, b in zip(ddp, plain.fit().history, strict=True):
        assert set(a) == set(b)
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=0.05)


def test_the_default_recipe_without_hint_trains_under_two_ranks(dataset, tmp_path: Path) -> None:
    """bockd's recipe has no hint term: its adapters get no gradient, so they are frozen and DDP (run with
    find_unused_parameters off) must not wait for them. The same math as one process, adapters unchanged."""
    _launch(tmp_path / "run", tmp_path / "marks", "--preset", "smoke")
    config = build_config("smoke", _overrides())
    ReferenceTrainer(config, dataset, tmp_path / "ref").fit()
    for a, b in zip(_history(tmp_path / "run"), _history(tmp_path / "ref"), strict=True):
        assert a["train/s2/hint"] == 0.0 and a["train/s2/kd"] > 0
        for key in ("train/loss", "train/s1/ce", "train/s2/ce", "train/s1/kd"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    trained = _weights(tmp_path / "run")
    assert _max_diff(trained, _weights(tmp_path / "ref")) <= ATOL
    torch.manual_seed(config.seed)  # the initial weights, as the Trainer draws them
    initial = create_model("resnet20", num_classes=10, in_channels=1, num_students=2).state_dict()
    for key in (k for k in trained if k.startswith("adapters.")):
        assert torch.equal(trained[key], initial[key]), key


def test_batch_size_not_divisible_by_world_size_is_a_clear_error(tmp_path: Path) -> None:
    proc = _launch(tmp_path / "run", tmp_path / "marks", "--batch-size", "63", check=False)
    assert proc.returncode != 0
    assert "batch_size (63)" in proc.stdout + proc.stderr
    assert "divisible by the world size (2)" in proc.stdout + proc.stderr
    assert not (tmp_path / "run").exists()


def test_sync_batchnorm_on_cpu_ranks_is_a_clear_error(tmp_path: Path) -> None:
    proc = _launch(tmp_path / "run", tmp_path / "marks", "--runtime", '{"sync_batchnorm": "on"}', check=False)
    assert proc.returncode != 0
    assert "runtime.sync_batchnorm: 'on' needs CUDA" in proc.stdout + proc.stderr


CUDA_FP32 = {"device": "cuda", "amp": "off", "channels_last": "off"}


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason=f"needs {WORLD} GPUs")
def test_sync_batchnorm_makes_two_gpus_train_like_one_process(dataset, tmp_path: Path) -> None:
    """With SyncBatchNorm the ranks normalize with the whole global batch's statistics, so 2 GPUs train
    like one process on the whole batch (to summation order), where plain per-rank BN is a few % off."""
    runtime = {**CUDA_FP32, "sync_batchnorm": "on"}
    _launch(tmp_path / "run", tmp_path / "marks", "--runtime", json.dumps(runtime))
    log = (tmp_path / "marks" / "log-rank0.txt").read_text()
    assert "SyncBatchNorm: statistics over all 2 ranks" in log
    plain = Trainer(build_config(PRESET, _overrides(CUDA_FP32)), dataset, tmp_path / "one").fit().history
    for a, b in zip(_history(tmp_path / "run"), plain, strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-3)
        assert a["test/ensemble/top1"] == pytest.approx(b["test/ensemble/top1"], abs=1.0)


def test_shards_partition_the_single_process_batches(dataset) -> None:
    common = {"mean": [8.0], "std": [4.0], "device": torch.device("cpu"), "seed": 3, "pad": 1}
    for train in (True, False):
        whole = BatchLoader(dataset.train, batch_size=64, train=train, **common)
        shards = [
            BatchLoader(dataset.train, batch_size=64, train=train, rank=r, world_size=WORLD, **common)
            for r in range(WORLD)
        ]
        assert len(shards[0]) == len(whole)
        for (x, y), *parts in zip(whole.epoch(2), *(s.epoch(2) for s in shards), strict=True):
            assert [p[1].shape[0] for p in parts] == [t.shape[0] for t in y.tensor_split(WORLD)]
            assert torch.equal(torch.cat([p[0] for p in parts]), x)
            assert torch.equal(torch.cat([p[1] for p in parts]), y)
    # A last training batch smaller than the world size is skipped on every rank; in evaluation a rank
    # whose slice is empty just yields nothing for it (with and without DataLoader workers).
    tiny = dataset.train.subset(np.arange(65))
    assert len(BatchLoader(tiny, batch_size=64, train=True, rank=1, world_size=WORLD, **common)) == 1
    for workers in (0, 1):
        for rank, sizes in ((0, [32, 1]), (1, [32])):
            loader = BatchLoader(
                tiny, batch_size=64, train=False, rank=rank, world_size=WORLD, num_workers=workers, **common
            )
            assert [y.shape[0] for _, y in loader.epoch(0)] == sizes
    with pytest.raises(ConfigError, match="batch_size"):
        BatchLoader(dataset.train, batch_size=63, train=True, rank=0, world_size=WORLD, **common)


if __name__ == "__main__":
    _worker(sys.argv[1:])
