"""The training engine on real data (scikit-learn digits): metrics, outputs, checkpoints, exact resume."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bockd.checkpoint import load_checkpoint, save_checkpoint
from bockd.config import build_config
from bockd.data import load_dataset
from bockd.engine import Trainer, load_training_data
from bockd.errors import CheckpointError

TINY = {
    "model": {"arch": "resnet20", "num_students": 3},
    "epochs": 2,
    "batch_size": 64,
    "runtime": {"progress": "off"},
}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def few(digits):
    """128 training digits (2 batches an epoch): for what holds at any size (keys, callbacks, resume)."""
    return digits.with_train_subset(128, seed=0)


def _config(**over):
    merged = {**TINY, **over}
    return build_config("smoke-paper", merged)  # the paper's loss: every term (hint included) is exercised


def test_ensemble_run_learns_and_reports_every_student(digits, tmp_path: Path) -> None:
    result = Trainer(_config(epochs=3), digits, tmp_path).fit()
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    last = result.final
    for label in ("s1", "s2", "s3"):
        for key in ("ce", "hint", "kd", "top1"):
            assert f"train/{label}/{key}" in last
        assert 0 <= last[f"test/{label}/top5"] <= 100
        assert last[f"test/{label}/top5"] >= last[f"test/{label}/top1"]
    assert last["train/s1/hint"] == 0.0 and last["train/s2/hint"] > 0
    assert 0 <= last["train/ensemble/top1"] <= 100
    # Three short epochs on digits: far above the 10 % of chance.
    assert last["test/ensemble/top1"] > 50
    assert result.history[0]["train/loss"] > last["train/loss"]
    assert last["images_per_s"] > 0 and last["lr"] == pytest.approx(_config(epochs=3).lr_at(2))
    for name in ("model.safetensors", "model.json", "history.json", "summary.json", "checkpoint.pt"):
        assert (tmp_path / name).is_file(), name
    card = json.loads((tmp_path / "model.json").read_text())
    assert card["ensemble"] == {"arch": "resnet20", "num_classes": 10, "in_channels": 1, "num_students": 3}
    assert card["classes"] == [str(i) for i in range(10)]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["students"]) == {"s1", "s2", "s3", "ensemble"}


def test_baseline_starts_from_the_ensemble_branch_weights(few, tmp_path: Path) -> None:
    """Same seed, same init: the baseline of S2 begins exactly where the ensemble's S2 begins."""
    ens = Trainer(_config(), few, tmp_path / "e")
    base = Trainer(_config(mode="baseline", student=1), few, tmp_path / "b")
    ens_student = ens.model.extract_student(1).state_dict()
    for name, value in base.model.state_dict().items():
        assert torch.equal(value, ens_student[name]), name
    result = base.fit()
    assert set(k.split("/")[1] for k in result.final if k.startswith("test/")) == {"s2"}
    assert "train/s2/kd" not in result.final


def test_validation_split_is_evaluated(tmp_path: Path) -> None:
    config = _config(epochs=1, data={"dataset": "digits", "val_fraction": 0.2, "train_subset": 160})
    dataset = load_training_data(config)
    assert dataset.val is not None
    result = Trainer(config, dataset, tmp_path).fit()
    assert "val/s1/top1" in result.final and "test/s1/top1" in result.final


def test_cpu_training_widens_the_onednn_kernel_cache_unless_set(digits, tmp_path: Path, monkeypatch) -> None:
    """An ensemble of DenseNet students outgrows oneDNN's default 1,024 cached kernels (recompiled every step
    otherwise); the engine raises the capacity for the process, and a value the user chose is kept."""
    from bockd.engine import ONEDNN_CACHE_CAPACITY, ONEDNN_CACHE_VAR

    monkeypatch.setenv(ONEDNN_CACHE_VAR, "0")  # recorded, so the test's change is undone afterwards
    monkeypatch.delenv(ONEDNN_CACHE_VAR)
    Trainer(_config(), digits, tmp_path / "a")
    assert os.environ[ONEDNN_CACHE_VAR] == ONEDNN_CACHE_CAPACITY
    monkeypatch.setenv(ONEDNN_CACHE_VAR, "2048")
    Trainer(_config(), digits, tmp_path / "b")
    assert os.environ[ONEDNN_CACHE_VAR] == "2048"


def test_finished_run_is_not_trained_again(few, tmp_path: Path) -> None:
    first = Trainer(_config(epochs=1), few, tmp_path).fit()
    before = load_file(str(tmp_path / "model.safetensors"))
    second = Trainer(_config(epochs=1), few, tmp_path).fit()
    assert second.history == first.history
    after = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_refuses_a_checkpoint_from_another_config(few, tmp_path: Path) -> None:
    Trainer(_config(epochs=1), few, tmp_path).fit()
    with pytest.raises(CheckpointError, match="different config"):
        Trainer(_config(epochs=1, optim={"lr": 0.01}), few, tmp_path).fit()


def _drop_one_parameter_from_the_optimizer_state(path: Path, epoch: int | None = None) -> None:
    """What a checkpoint written by a version with another optimizer layout looks like (``epoch``: as if
    it had been written after that epoch)."""
    state = load_checkpoint(path)
    state["optimizer"]["param_groups"][0]["params"].pop()
    if epoch is not None:
        state["epoch"] = epoch
    save_checkpoint(path, state)


def test_a_finished_run_reads_back_whatever_optimizer_layout_wrote_it(few, tmp_path: Path) -> None:
    first = Trainer(_config(epochs=1), few, tmp_path).fit()
    _drop_one_parameter_from_the_optimizer_state(tmp_path / "checkpoint.pt")
    assert Trainer(_config(epochs=1), few, tmp_path).fit().history == first.history


def test_an_unfinished_checkpoint_that_does_not_fit_is_refused_by_name(few, tmp_path: Path) -> None:
    Trainer(_config(), few, tmp_path).fit()
    _drop_one_parameter_from_the_optimizer_state(tmp_path / "checkpoint.pt", epoch=1)  # 1 of 2 epochs
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt does not fit .* delete it"):
        Trainer(_config(), few, tmp_path).fit()


def test_callbacks_see_every_epoch(few, tmp_path: Path) -> None:
    seen: list[str] = []

    class Recorder:
        def on_train_start(self, trainer):
            seen.append("start")

        def on_epoch_end(self, trainer, metrics):
            seen.append(f"epoch{int(metrics['epoch'])}")

        def on_train_end(self, trainer, result):
            seen.append("end")

    Trainer(_config(), few, tmp_path, callbacks=[Recorder()]).fit()
    assert seen == ["start", "epoch1", "epoch2", "end"]


def test_log_mode_writes_one_line_per_epoch(few, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="bockd.train")
    Trainer(_config(runtime={"progress": "log"}), few, tmp_path).fit()
    lines = [r.getMessage() for r in caplog.records if r.name == "bockd.train" and "epoch" in r.getMessage()]
    assert [line.split()[2] for line in lines] == ["1/2", "2/2"]
    assert all("test top-1 s1=" in line and "ens=" in line for line in lines)


def _train_cmd(workdir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bockd",
        "-q",
        "train",
        "--preset",
        "smoke",
        "--workdir",
        str(workdir),
        "--epochs",
        "4",
        "--progress",
        "off",
        "--set",
        "model.num_students=2",
        "--set",
        "batch_size=128",
    ]


def _checkpoint_epoch(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["epoch"])
    except Exception:
        return 0


@pytest.mark.slow
def test_sigkill_then_resume_ends_with_identical_weights(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_train_cmd(tmp_path / "straight"), check=True, env=env, timeout=600)

    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(_train_cmd(interrupted), env=env)
    deadline = time.monotonic() + 300
    while _checkpoint_epoch(interrupted / "checkpoint.pt") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: whatever is on disk is what resume gets
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (interrupted / "model.safetensors").exists(), "killed too late to test a resume"
    assert 2 <= _checkpoint_epoch(interrupted / "checkpoint.pt") < 4

    subprocess.run(_train_cmd(interrupted), check=True, env=env, timeout=600)
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(interrupted / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    hist_a = json.loads((tmp_path / "straight" / "history.json").read_text())
    hist_b = json.loads((interrupted / "history.json").read_text())
    assert [h["test/s1/top1"] for h in hist_a] == [h["test/s1/top1"] for h in hist_b]
