"""The GPU step options: runtime.compile_mode, runtime.cuda_graph, runtime.sync_batchnorm, the fused
optimizer and the no-host-sync epoch.

What runs on a CPU: the config rules, the SyncBatchNorm rule and conversion, and the fast-step plumbing
with ``torch.compile`` replaced by a recorder that returns the function unchanged (so the compiled path
must train bit-identically to the eager one). What needs CUDA is marked ``cuda``. These tests use no
conftest fixture: the GPU check runs them with ``--noconftest`` (the conftest imports the services stack,
whose packages the GPU machine lacks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from bockd import distributed as dist
from bockd.config import build_config
from bockd.data import ImageDataset, load_dataset
from bockd.engine import Trainer, count_correct
from bockd.errors import ConfigError
from bockd.models import create_model

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TINY = {"model": {"arch": "resnet20", "num_students": 3}, "epochs": 1, "batch_size": 64}
FULL_BATCHES = 1437 // 64  # digits' training split: 22 full batches of 64 and one of 29
TIMING_KEYS = {"seconds", "images_per_s"}


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    return load_dataset("digits", seed=0)


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _config(runtime: dict[str, Any] | None = None, **over: Any):
    return build_config("smoke", {**TINY, **over, "runtime": {"progress": "off", **(runtime or {})}})


def _without_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in history]


# -- config -------------------------------------------------------------------------------------------
def test_runtime_defaults_change_nothing() -> None:
    rt = _config().runtime
    assert (rt.compile, rt.compile_mode, rt.cuda_graph, rt.sync_batchnorm) == (
        False,
        "default",
        False,
        "auto",
    )


@pytest.mark.parametrize(
    ("runtime", "message"),
    [
        ({"compile_mode": "reduce-overhead"}, "needs runtime.compile=true"),
        ({"compile": True, "compile_mode": "reduce-overhead", "cuda_graph": True}, "use one of the two"),
        ({"cuda_graph": True, "device": "cpu"}, "need a CUDA device"),
        ({"compile": True, "compile_mode": "max-autotune"}, "runtime.compile_mode"),
        ({"sync_batchnorm": "maybe"}, "runtime.sync_batchnorm"),
    ],
)
def test_impossible_runtime_options_are_rejected(runtime: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(runtime)


def test_runtime_options_are_not_part_of_the_training_identity() -> None:
    fast = _config({"compile": True, "compile_mode": "reduce-overhead", "sync_batchnorm": "on"})
    assert fast.training_identity() == _config().training_identity()  # a run resumes with any of them


# -- SyncBatchNorm ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mode", "world", "batch", "device", "expected"),
    [
        ("auto", 1, 8, "cuda", False),  # one process: nothing to sync
        ("auto", 4, 128, "cuda", False),  # 32 images per rank
        ("auto", 8, 128, "cuda", True),  # 16 per rank
        ("auto", 2, 62, "cuda", True),  # 31 per rank
        ("on", 2, 1024, "cuda", True),
        ("off", 64, 128, "cuda", False),
        ("auto", 8, 128, "cpu", False),  # SyncBatchNorm is CUDA-only: per-rank BatchNorm
    ],
)
def test_sync_batchnorm_rule(mode: str, world: int, batch: int, device: str, expected: bool) -> None:
    assert dist.use_sync_batchnorm(mode, world, batch, device) is expected


def test_sync_batchnorm_on_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="needs CUDA"):
        dist.use_sync_batchnorm("on", 2, 128, "cpu")


def test_sync_batchnorm_conversion_keeps_every_weight_and_key() -> None:
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, num_students=3)
    bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = dist.convert_sync_batchnorm(model)
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules()) == bn > 0
    assert not any(type(m) is torch.nn.BatchNorm2d for m in converted.modules())
    after = converted.state_dict()
    assert after.keys() == before.keys()  # checkpoints load into either form
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert converted.num_students == 3 and hasattr(converted, "adapt")  # still the ensemble


# -- the fast step on CPU (torch.compile recorded, not run) -------------------------------------------
class CompileRecorder:
    """Stands in for torch.compile: records each call's keyword arguments, counts calls of what it
    returns, and returns a function that runs the original (so the math is the eager math)."""

    def __init__(self) -> None:
        self.kwargs: list[dict[str, Any]] = []
        self.calls: list[int] = []

    def __call__(self, fn: Any, **kwargs: Any) -> Any:
        self.kwargs.append(kwargs)
        self.calls.append(0)
        slot = len(self.calls) - 1

        def run(*args: Any) -> Any:
            self.calls[slot] += 1
            return fn(*args)

        return run


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> CompileRecorder:
    rec = CompileRecorder()
    monkeypatch.setattr(torch, "compile", rec)
    return rec


def test_no_fast_step_without_compile_or_graph(digits: ImageDataset, tmp_path: Path) -> None:
    trainer = Trainer(_config(), digits, tmp_path)
    assert trainer._step_fn is None and trainer._graph is None
    assert trainer.forward is trainer.model and trainer.eval_forward is trainer.model


def test_compiled_step_trains_like_eager_and_runs_the_last_batch_eagerly(
    digits: ImageDataset, tmp_path: Path, recorder: CompileRecorder
) -> None:
    # A ramp-up makes the distillation factor change every step: it reaches the compiled step as a
    # device tensor filled in place, and must give the very weights the eager float does.
    over = {"loss": {"rampup": 0.5}}
    fast = Trainer(
        _config({"compile": True, "compile_mode": "max-autotune-no-cudagraphs"}, **over),
        digits,
        tmp_path / "c",
    )
    fast_history = fast.fit().history
    modes = [(k.get("mode"), k.get("dynamic")) for k in recorder.kwargs]
    # eval forward (dynamic shapes allowed), then the training step (one static shape)
    assert modes == [("max-autotune-no-cudagraphs", None), ("max-autotune-no-cudagraphs", False)]
    assert recorder.calls[1] == FULL_BATCHES  # the 29-image last batch took the eager forward
    eager_history = Trainer(_config(**over), digits, tmp_path / "e").fit().history
    assert _without_timing(fast_history) == _without_timing(eager_history)
    a, b = load_file(tmp_path / "c" / "model.safetensors"), load_file(tmp_path / "e" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_reduce_overhead_starts_a_cuda_graph_step_before_every_compiled_call(
    digits: ImageDataset, tmp_path: Path, recorder: CompileRecorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    marks: list[int] = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    trainer = Trainer(_config({"compile": True, "compile_mode": "reduce-overhead"}), digits, tmp_path)
    trainer.fit()
    eval_batches = len(trainer.eval_loaders["test"])
    assert recorder.calls == [eval_batches, FULL_BATCHES]
    assert len(marks) == FULL_BATCHES + eval_batches


def test_baseline_mode_takes_the_compiled_step_too(
    digits: ImageDataset, tmp_path: Path, recorder: CompileRecorder
) -> None:
    result = Trainer(_config({"compile": True}, mode="baseline", student=2), digits, tmp_path).fit()
    assert recorder.calls[1] == FULL_BATCHES
    assert result.final["train/s3/ce"] > 0 and "train/s3/kd" not in result.final


def test_cuda_graph_needs_cuda(digits: ImageDataset, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ConfigError, match="need a CUDA device"):
        Trainer(_config({"cuda_graph": True}), digits, tmp_path)


def test_count_correct_matches_one_head_at_a_time() -> None:
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(50, 10, generator=g) for _ in range(3)]
    y = torch.randint(0, 10, (50,), generator=g)
    heads = [*logits, torch.stack(logits).mean(0)]
    expected = [int((z.argmax(1) == y).sum()) for z in heads]
    assert count_correct(logits, y, with_ensemble=True).tolist() == expected
    assert count_correct(logits, y, with_ensemble=False).tolist() == expected[:3]


# -- CUDA ---------------------------------------------------------------------------------------------
@pytest.mark.cuda
@CUDA
def test_cuda_optimizer_is_fused_and_cudnn_autotunes(digits: ImageDataset, tmp_path: Path) -> None:
    trainer = Trainer(_config({"device": "cuda"}), digits, tmp_path)
    assert trainer.optimizer.param_groups[0]["fused"] is True
    assert torch.backends.cudnn.benchmark


def _steps(trainer: Trainer, epoch: int) -> None:
    for i, (x, y) in enumerate(trainer.train_loader.epoch(epoch)):
        trainer.train_step(x, y, distill_scale=trainer.config.distill_scale(epoch + i / 100))


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cuda_training_epoch_never_waits_for_the_gpu(
    digits: ImageDataset, tmp_path: Path, cuda_graph: bool
) -> None:
    """Batches built on the device, steps (eager or replayed) and the ramp-up factor: no host sync. The
    first epoch (cuDNN autotuning, graph warm-up and capture) runs before the check."""
    trainer = Trainer(
        _config({"device": "cuda", "cuda_graph": cuda_graph}, loss={"rampup": 0.5}), digits, tmp_path
    )
    trainer.model.train()
    _steps(trainer, 0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _steps(trainer, 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer._graph is None or trainer._graph.captured


@pytest.mark.cuda
@CUDA
def test_cuda_graph_trains_like_eager(digits: ImageDataset, tmp_path: Path) -> None:
    """fp32, same seed: the replayed graph runs the eager step's kernels, so the runs agree to rounding
    (cuDNN's autotuned algorithms may differ in summation order), ramp-up and partial batch included."""
    over = {"epochs": 2, "loss": {"rampup": 0.5}}
    common = {"device": "cuda", "amp": "off", "channels_last": "on"}
    graph = Trainer(_config({**common, "cuda_graph": True}, **over), digits, tmp_path / "g")
    graphed = graph.fit().history
    assert graph._graph is not None and graph._graph.captured
    eager = Trainer(_config(common, **over), digits, tmp_path / "e").fit().history
    for a, b in zip(graphed, eager, strict=True):
        for key in ("train/loss", "train/s1/ce", "train/s3/kd", "train/s2/hint"):
            assert a[key] == pytest.approx(b[key], rel=2e-3), key
        assert a["test/ensemble/top1"] == pytest.approx(b["test/ensemble/top1"], abs=1.5)


@pytest.mark.cuda
@CUDA
def test_cuda_graph_with_bf16_and_compile_learns(digits: ImageDataset, tmp_path: Path) -> None:
    """The fastest combination the GPU check times: inductor's kernels captured in one graph, bf16."""
    runtime = {"device": "cuda", "cuda_graph": True, "compile": True}
    result = Trainer(
        _config(runtime, epochs=3, model={"arch": "resnet20", "num_students": 2}), digits, tmp_path
    ).fit()
    assert result.final["test/ensemble/top1"] > 50  # chance is 10 %


@pytest.mark.cuda
@CUDA
def test_reduce_overhead_compile_learns(digits: ImageDataset, tmp_path: Path) -> None:
    runtime = {"device": "cuda", "compile": True, "compile_mode": "reduce-overhead"}
    result = Trainer(
        _config(runtime, epochs=3, model={"arch": "resnet20", "num_students": 2}), digits, tmp_path
    ).fit()
    assert result.final["test/ensemble/top1"] > 50
