"""The training engine: one loop for the BOC-KD ensemble and for a single-student baseline.

Speed by construction: the whole step stays on the device (loss terms and accuracy counts accumulate
in device tensors and are read once per epoch), bf16 autocast, channels_last, cuDNN autotuning and a
fused optimizer on CUDA, optional ``torch.compile`` (``runtime.compile_mode``) and whole-step CUDA
graphs (``runtime.cuda_graph``, see ``bockd.step_graph``) for full batches. Exact resume: data order and
augmentation depend only on (seed, epoch), and a checkpoint holds model, optimizer, scheduler and RNG
states, written atomically every k epochs.

Distributed (``torchrun``, WORLD_SIZE > 1): one process per device, the model wrapped in
DistributedDataParallel. ``batch_size`` stays the global batch: every rank trains on its slice of the
single-process global batch (see ``bockd.data.loaders``), so one step of N ranks is the single-process
step with BatchNorm statistics taken per rank slice (plain BatchNorm per rank, as DDP does by default and
as the paper's multi-GPU setup would; running statistics are rank 0's, broadcast by DDP before every
forward and after every epoch), unless ``runtime.sync_batchnorm`` turns on SyncBatchNorm (CUDA; by
default when a rank's slice is below 32 images), which takes them over the whole global batch. Per-epoch
metrics are sums and counts all-reduced over ranks, so they are the whole epoch's. Evaluation is sharded
the same way and reduced (exact: it counts hits). Only rank 0 reads and writes the workdir (checkpoint,
outputs), logs and calls callbacks; the others wait at a barrier. Checkpoints hold the un-wrapped model,
so a run resumes with any number of ranks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bockd import distributed as dist
from bockd.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_json,
    write_safetensors,
)
from bockd.config import TrainConfig
from bockd.data import BatchLoader, ImageDataset, load_dataset, pad_for
from bockd.errors import CheckpointError, ConfigError
from bockd.losses import BOCKDLoss, LossOutput, baseline_loss
from bockd.models import BranchedEnsemble, create_model
from bockd.step_graph import GraphedStep

log = logging.getLogger("bockd.train")

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model.json"
HISTORY = "history.json"
SUMMARY = "summary.json"
RUN_FORMAT = "bockd-train/1"  # the model.json card a training run writes


class Callback(Protocol):
    """Hooks the pipeline uses to forward metrics (MLflow, KFP). Every method is optional."""

    def on_train_start(self, trainer: Trainer) -> None: ...
    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...
    def on_checkpoint(self, trainer: Trainer, path: Path) -> None: ...
    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None: ...


@dataclass
class TrainResult:
    workdir: Path
    labels: list[str]
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}

    def best(self, label: str, split: str = "test") -> tuple[float, int]:
        """Best top-1 of one student (or "ensemble") over epochs, and the 1-based epoch it came at."""
        key = f"{split}/{label}/top1"
        row = max(self.history, key=lambda h: h.get(key, -math.inf))
        return row[key], int(row["epoch"])

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"epochs": len(self.history), "students": {}}
        for label in [*self.labels, "ensemble"]:
            if f"test/{label}/top1" not in self.final:
                continue
            best, best_epoch = self.best(label)
            out["students"][label] = {
                "final_top1": self.final[f"test/{label}/top1"],
                "final_top5": self.final[f"test/{label}/top5"],
                "best_top1": best,
                "best_epoch": best_epoch,
            }
        return out


ONEDNN_CACHE_VAR = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_CAPACITY = "8192"  # 12 DenseNet-BC students would need ~4,800 (about 400 per student)


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device: {spec!r} was asked for but no CUDA device is available")
    return device


def load_training_data(config: TrainConfig, source: str | Path | None = None) -> ImageDataset:
    """The dataset named by ``config.data`` (read from ``source`` instead of ``data.path`` if given):
    the seeded class-balanced training subset drawn, then the seeded validation split carved out,
    each only if asked for."""
    data = config.data
    dataset = load_dataset(
        data.dataset,
        data.path if source is None else source,
        download=data.download,
        image_size=data.image_size,
        seed=data.split_seed,
    )
    if data.train_subset is not None:
        dataset = dataset.with_train_subset(data.train_subset, data.split_seed)
    if data.val_fraction > 0:
        dataset = dataset.with_validation_split(data.val_fraction, data.split_seed)
    return dataset


def run_finished(workdir: str | Path) -> bool:
    """Whether ``workdir`` holds a finished run's outputs (weights, card, history, summary: written together
    once the last epoch is done). Reading it back still goes through `Trainer`, which checks its identity."""
    return all((Path(workdir) / name).is_file() for name in (WEIGHTS, MODEL_CONFIG, HISTORY, SUMMARY))


class Trainer:
    """Trains ``config.mode`` ("ensemble" or "baseline") on ``dataset``, writing into ``workdir``."""

    def __init__(
        self,
        config: TrainConfig,
        dataset: ImageDataset,
        workdir: str | Path,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.config = config
        self.dataset = dataset
        self.workdir = Path(workdir)
        self.callbacks = list(callbacks)
        self.device = dist.init_from_env(resolve_device(config.runtime.device))
        self.rank, self.world_size = dist.rank(), dist.world_size()
        self.is_main = self.rank == 0
        if config.batch_size % self.world_size:
            raise ConfigError(
                f"batch_size ({config.batch_size}) is the global batch and must be divisible by the world "
                f"size ({self.world_size}): each rank processes batch_size / world_size samples per step"
            )
        cuda = self.device.type == "cuda"
        if self.device.type == "cpu":
            # oneDNN caches 1,024 compiled primitives by default; five DenseNet-BC students need 1,930, and
            # recompiling a third of them every step made the CPU step ~40 % slower (docs/benchmarks.md).
            # oneDNN reads this when it first runs a convolution, so it takes effect in a process that has
            # not convolved yet; a value the user set wins.
            os.environ.setdefault(ONEDNN_CACHE_VAR, ONEDNN_CACHE_CAPACITY)
        self.amp = config.runtime.amp == "bf16" or (config.runtime.amp == "auto" and cuda)
        if self.amp and cuda and not torch.cuda.is_bf16_supported():
            raise ConfigError("runtime.amp: bf16 was asked for but this GPU does not support it")
        # A CUDA graph capture must not keep autocast's cached weight casts (they would be freed memory).
        self._autocast_kwargs: dict[str, Any] = {"cache_enabled": False} if config.runtime.cuda_graph else {}
        self.channels_last = config.runtime.channels_last == "on" or (
            config.runtime.channels_last == "auto" and cuda
        )
        self._check_step_options()
        if cuda:
            # Every training batch but the last has one shape: let cuDNN time its algorithms once per shape.
            torch.backends.cudnn.benchmark = True
        self.ensemble_mode = config.mode == "ensemble"
        n = config.model.num_students

        # Baselines start from the very weights their branch has in the seeded ensemble: same seed,
        # same init, so the only difference from BOC-KD is the loss.
        torch.manual_seed(config.seed)
        ensemble = create_model(
            config.model.arch,
            num_classes=dataset.num_classes,
            in_channels=dataset.in_channels,
            num_students=n,
        )
        self.ensemble_spec = dict(ensemble.spec)
        # Without a hint term the adapters would never get a gradient: frozen, they stay out of the
        # optimizer and out of DDP's gradient reduction (which runs with find_unused_parameters off).
        self.uses_hint = self.ensemble_mode and config.loss.hint_weight > 0
        if self.ensemble_mode:
            self.model: nn.Module = ensemble
            self.labels = [f"s{k + 1}" for k in range(n)]
            ensemble.adapters.requires_grad_(self.uses_hint)
        else:
            self.model = ensemble.extract_student(config.student)
            self.labels = [f"s{config.student + 1}"]
        self.model.to(
            self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format
        )
        rt = config.runtime
        self.sync_batchnorm = dist.use_sync_batchnorm(
            rt.sync_batchnorm, self.world_size, config.batch_size, self.device.type
        )
        if self.sync_batchnorm:  # before DDP wraps it; the state_dict keys stay those of BatchNorm
            self.model = dist.convert_sync_batchnorm(self.model)
            if self.is_main:
                log.info(
                    "SyncBatchNorm: statistics over all %d ranks (runtime.sync_batchnorm)", self.world_size
                )
        # Under DDP the training forward goes through the wrapper (gradient all-reduce, rank 0's buffers
        # broadcast first); evaluation uses the plain module, whose buffers every rank holds identically.
        # Every parameter gets a gradient each step (the hint adapters through the loss, outside the
        # wrapper's forward, which DDP's per-parameter hooks handle), so find_unused_parameters stays off.
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        if self.world_size > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if cuda else None
            )
        # One process: full training batches take the fast step (_build_fast_step: compiled and/or one CUDA
        # graph), the rest this eager forward. Under DDP the wrapper itself is compiled, as PyTorch documents.
        self.forward = self._compiled(self.ddp) if self.ddp is not None else self.model
        self.eval_forward = self._compiled(self.model)

        self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda epoch: config.lr_at(epoch) / config.optim.lr
        )
        lc = config.loss
        self.loss = BOCKDLoss(
            lc.ce_weight, lc.hint_weight, lc.kd_weight, lc.temperature, lc.kd_t_squared, lc.teacher
        )
        self._build_fast_step()

        mean, std = dataset.mean_std()
        self.mean, self.std = mean, std
        image_size = dataset.image_shape[0]
        common = {
            "mean": mean,
            "std": std,
            "device": self.device,
            "seed": config.seed,
            "channels_last": self.channels_last,
            "num_workers": config.runtime.num_workers,
            "rank": self.rank,
            "world_size": self.world_size,
        }
        self.train_loader = BatchLoader(
            dataset.train,
            batch_size=config.batch_size,
            train=True,
            pad=pad_for(image_size) if config.data.augment else 0,
            flip=config.data.augment and config.data.flip,
            **common,
        )
        self.eval_loaders = {
            "test": BatchLoader(
                dataset.test, batch_size=max(config.batch_size, 256), train=False, pad=0, flip=False, **common
            )
        }
        if dataset.val is not None:
            self.eval_loaders["val"] = BatchLoader(
                dataset.val, batch_size=max(config.batch_size, 256), train=False, pad=0, flip=False, **common
            )
        self.history: list[dict[str, float]] = []
        self.start_epoch = 0

    # -- setup --------------------------------------------------------------------------------------
    def _build_optimizer(self) -> torch.optim.Optimizer:
        o = self.config.optim
        # Adapters included when the hint term trains them (they are part of the ensemble from step one).
        params = [p for p in self.model.parameters() if p.requires_grad]
        # On CUDA one fused kernel updates every parameter (foreach would launch dozens per step).
        fused: dict[str, Any] = {"fused": True} if self.device.type == "cuda" else {}
        if o.name == "sgd":
            return torch.optim.SGD(
                params,
                lr=o.lr,
                momentum=o.momentum,
                nesterov=o.nesterov,
                weight_decay=o.weight_decay,
                **fused,
            )
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay, **fused)

    def _autocast(self) -> Any:
        if not self.amp:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16, **self._autocast_kwargs)

    def _check_step_options(self) -> None:
        """Reject runtime options this device or launch cannot honour, before any tensor is allocated."""
        rt = self.config.runtime
        if rt.cuda_graph and self.device.type != "cuda":
            raise ConfigError(
                f"runtime.cuda_graph: CUDA graphs need a CUDA device, this run uses {self.device}"
            )
        if self.world_size > 1 and rt.cuda_graph:
            raise ConfigError(
                "runtime.cuda_graph: one process only (DDP's gradient all-reduce is not captured)"
            )
        if self.world_size > 1 and rt.compile_mode == "reduce-overhead":
            raise ConfigError(
                "runtime.compile_mode: 'reduce-overhead' (CUDA graphs) is for one process; under DDP use "
                "'default' or 'max-autotune-no-cudagraphs'"
            )

    def _compiled(self, module: nn.Module) -> Any:
        """``module`` under torch.compile with ``runtime.compile_mode`` (itself when compile is off). With
        reduce-overhead every call starts a new CUDA-graph step, so no replay overwrites outputs in use."""
        rt = self.config.runtime
        if not rt.compile:
            return module
        compiled = torch.compile(module, mode=rt.compile_mode)
        if rt.compile_mode != "reduce-overhead":
            return compiled

        def marked(*args: Any) -> Any:
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(*args)

        return marked

    def _build_fast_step(self) -> None:
        """The step of full training batches in one process: ``_loss_tensors`` compiled (static shape)
        and/or captured in one CUDA graph (``bockd.step_graph``). Nothing when neither is asked for."""
        rt = self.config.runtime
        self._full_batch = self.config.batch_size // self.world_size
        self._step_fn: Any = None
        self._graph: GraphedStep | None = None
        self._distill_t = torch.ones((), device=self.device)  # the ramp-up factor as a graph input
        if self.ddp is not None or not (rt.compile or rt.cuda_graph):
            return
        self._step_fn = self._loss_tensors
        if rt.compile:
            self._step_fn = torch.compile(self._loss_tensors, mode=rt.compile_mode, dynamic=False)
        if rt.cuda_graph:
            self._graph = GraphedStep(self._graph_body, self._zero_grad, self.device)

    # -- checkpoints --------------------------------------------------------------------------------
    @cached_property
    def _identity(self) -> str:
        return json.dumps(
            {"config": self.config.training_identity(), "dataset": self.dataset_sha256}, sort_keys=True
        )

    @cached_property
    def dataset_sha256(self) -> str:
        return self.dataset.sha256()  # ~0.5 s for CIFAR: once per run, not per checkpoint

    def save_checkpoint(self, epochs_done: int) -> None:
        save_checkpoint(
            self.workdir / CHECKPOINT,
            {
                "epoch": epochs_done,
                "identity": self._identity,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(),
                "history": json.dumps(self.history),
            },
        )

    def _read_checkpoint(self) -> dict[str, Any] | None:
        path = self.workdir / CHECKPOINT
        if not path.exists():
            return None
        state = load_checkpoint(path, map_location=self.device if self.world_size == 1 else "cpu")
        if state.get("identity") != self._identity:
            raise CheckpointError(
                f"{path} was written by a different config or dataset; use another workdir or delete it"
            )
        return state

    def _resume(self) -> None:
        path = self.workdir / CHECKPOINT
        if self.world_size == 1:
            state = self._read_checkpoint()
        else:  # rank 0 reads (only it needs the workdir) and hands the state, or its error, to every rank
            state, error = None, None
            if self.is_main:
                try:
                    state = self._read_checkpoint()
                except Exception as err:  # every rank must raise, not wait for a broadcast forever
                    error = err
            state, error = dist.broadcast_object((state, error))
            if error is not None:
                raise error
        if state is None:
            return
        epoch = int(state["epoch"])
        try:
            self.model.load_state_dict(state["model"])
            # A finished run only has its results read back: its optimizer state is not needed, so a
            # checkpoint whose optimizer layout an older bockd wrote (e.g. before unused hint adapters left
            # the optimizer) still counts as finished.
            if epoch < self.config.epochs:
                self.optimizer.load_state_dict(state["optimizer"])
                self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(
                f"{path} does not fit this version's model or optimizer ({err}); it was written by another "
                "bockd version: delete it to train this run from scratch, or finish it with that version"
            ) from None
        set_rng_state(state["rng"])
        self.history = json.loads(state["history"])
        self.start_epoch = epoch
        log.info("resumed from %s after epoch %d", path, self.start_epoch)

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self, resume: bool = True) -> TrainResult:
        if self.is_main:
            self.workdir.mkdir(parents=True, exist_ok=True)
        if resume:
            self._resume()
        done = self.start_epoch >= self.config.epochs and self.is_main and self._outputs_written()
        if dist.broadcast_object(done):
            # Finished before: same config and data (the resume checked). Nothing to train or rewrite,
            # so a re-run leaves every file as it was and calls no callback.
            log.info("%s already finished; nothing to do", self.workdir)
            return TrainResult(self.workdir, self.labels, list(self.history))
        callbacks = self.callbacks if self.is_main else []
        for cb in callbacks:
            _call(cb, "on_train_start", self)
        epochs = self.config.epochs
        bar = self._progress_bar(epochs) if self.is_main else None
        for epoch in range(self.start_epoch, epochs):
            metrics = self._train_epoch(epoch, bar)
            if self.evaluates_after(epoch):
                for split, loader in self.eval_loaders.items():
                    metrics.update(self.evaluate(loader, split))
            self.history.append(metrics)
            if self.is_main:
                self._log_epoch(metrics, bar)
            for cb in callbacks:
                _call(cb, "on_epoch_end", self, metrics)
            if (epoch + 1) % self.config.runtime.checkpoint_every == 0 or epoch + 1 == epochs:
                if self.is_main:
                    self.save_checkpoint(epoch + 1)
                for cb in callbacks:
                    _call(cb, "on_checkpoint", self, self.workdir / CHECKPOINT)
                dist.barrier()
        if bar is not None:
            bar.close()
        result = TrainResult(self.workdir, self.labels, list(self.history))
        if self.is_main:
            self._write_outputs(result)
        for cb in callbacks:
            _call(cb, "on_train_end", self, result)
        dist.barrier()
        return result

    def evaluates_after(self, epoch: int) -> bool:
        """Whether the held-out splits are scored after 0-based ``epoch`` (every k-th and the last)."""
        return (epoch + 1) % self.config.runtime.eval_every == 0 or epoch + 1 == self.config.epochs

    def _train_epoch(self, epoch: int, bar: tqdm | None) -> dict[str, float]:
        self.model.train()
        n = len(self.labels)
        terms = torch.zeros(3, n, device=self.device)  # ce / hint / kd, summed over samples
        heads = n + int(self.ensemble_mode)  # every student, then (ensemble mode) the mean-logit ensemble
        correct = torch.zeros(heads, device=self.device)
        seen = 0
        lr = self.optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        batch_size, n_train = self.config.batch_size, len(self.dataset.train)
        steps = len(self.train_loader)
        distill_sum = 0.0
        for i, (x, y) in enumerate(self.train_loader.epoch(epoch)):
            distill_scale = self.config.distill_scale(epoch + i / steps)
            distill_sum += distill_scale
            scale = 1.0
            if self.world_size > 1:
                # DDP averages the ranks' gradients with equal weights; a last global batch split into
                # unequal slices needs each rank's mean loss weighted by its share to give the batch mean.
                global_size = min(batch_size, n_train - i * batch_size)
                scale = y.shape[0] * self.world_size / global_size
            loss, logits = self.train_step(x, y, scale, distill_scale)
            with torch.no_grad():
                b = y.shape[0]
                terms += torch.stack([loss.ce, loss.hint, loss.kd]).detach() * b
                correct += count_correct(logits, y, self.ensemble_mode)
            seen += y.shape[0]
            if bar is not None:
                bar.update(1)
        if self.world_size > 1:
            # Sums and counts over every rank: the metrics of the whole global epoch. Then every rank
            # takes rank 0's BatchNorm buffers, so evaluation and checkpoints see one model.
            count = torch.tensor(float(seen), device=self.device)
            terms, correct, count = dist.all_reduce_sums(terms, correct, count)
            seen = int(count.item())
            dist.broadcast_tensors(list(self.model.buffers()))
        terms, correct = (terms / seen).cpu(), (correct * 100.0 / seen).cpu()  # the one sync per epoch
        seconds = time.perf_counter() - start
        self.scheduler.step()
        metrics: dict[str, float] = {
            "epoch": epoch + 1,
            "lr": lr,
            "seconds": seconds,
            "images_per_s": seen / seconds,
        }
        w = self.config.loss
        distill_scale = distill_sum / max(steps, 1)  # the epoch's mean ramp-up factor
        distill = distill_scale * (w.hint_weight * terms[1] + w.kd_weight * terms[2])
        total = (w.ce_weight * terms[0] + distill).sum()
        metrics["train/loss"] = float(terms[0].sum() if not self.ensemble_mode else total)
        if self.ensemble_mode:
            metrics["train/distill_scale"] = distill_scale
        for k, label in enumerate(self.labels):
            metrics[f"train/{label}/ce"] = float(terms[0, k])
            if self.ensemble_mode:
                metrics[f"train/{label}/hint"] = float(terms[1, k])
                metrics[f"train/{label}/kd"] = float(terms[2, k])
            metrics[f"train/{label}/top1"] = float(correct[k])
        if self.ensemble_mode:
            metrics["train/ensemble/top1"] = float(correct[n])
        return metrics

    def train_step(
        self, x: Tensor, y: Tensor, scale: float = 1.0, distill_scale: float = 1.0
    ) -> tuple[LossOutput, list[Tensor]]:
        """One optimizer step on (x, y); ``scale`` multiplies the loss that is back-propagated,
        ``distill_scale`` the hint and KD weights (the ramp-up). Full batches take the fast step when
        there is one; outputs of a CUDA-graph step are overwritten by the next step."""
        if self._step_fn is not None and scale == 1.0 and x.shape[0] == self._full_batch:
            out = (
                self._graph(x, y, distill_scale)
                if self._graph is not None
                else self._compiled_step(x, y, distill_scale)
            )
            loss, logits = LossOutput(*out[:4]), list(out[4:])
        else:
            # After a capture the graph owns the .grad tensors: zero them in place, never drop them.
            self._zero_grad(self._graph is None or not self._graph.captured)
            loss, logits = self._forward_loss(x, y, distill_scale)
            (loss.total if scale == 1.0 else loss.total * scale).backward()
        self.optimizer.step()
        return loss, logits

    def _forward_loss(
        self, x: Tensor, y: Tensor, distill_scale: float | Tensor
    ) -> tuple[LossOutput, list[Tensor]]:
        with self._autocast():
            if self.ensemble_mode:
                out = self.forward(x)
                model: BranchedEnsemble = self.model  # type: ignore[assignment]
                adapted = (
                    [model.adapt(i, out.features[i]) for i in range(1, model.num_students)]
                    if self.uses_hint
                    else None
                )
                loss = self.loss(out.logits, y, out.features[0], adapted, distill_scale)
                return loss, out.logits
            z = self.forward(x)
            return baseline_loss(z, y), [z]

    def _loss_tensors(self, x: Tensor, y: Tensor, distill_scale: Tensor) -> tuple[Tensor, ...]:
        """``_forward_loss`` flat (total, ce, hint, kd, *logits): what compile and CUDA graphs return."""
        loss, logits = self._forward_loss(x, y, distill_scale)
        return (loss.total, loss.ce, loss.hint, loss.kd, *logits)

    def _zero_grad(self, set_to_none: bool) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def _graph_body(self, x: Tensor, y: Tensor, distill_scale: Tensor) -> tuple[Tensor, ...]:
        out = self._step_fn(x, y, distill_scale)
        out[0].backward()
        return out

    def _compiled_step(self, x: Tensor, y: Tensor, distill_scale: float) -> tuple[Tensor, ...]:
        if self.config.runtime.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are done with
        self._zero_grad(True)
        return self._graph_body(x, y, self._distill_t.fill_(distill_scale))

    @torch.no_grad()
    def evaluate(self, loader: BatchLoader, split: str = "test") -> dict[str, float]:
        """Top-1 / top-5 (%) of every student and, in ensemble mode, of the mean-logit ensemble."""
        self.model.eval()
        labels = self.labels + (["ensemble"] if self.ensemble_mode else [])
        k = min(5, self.dataset.num_classes)
        hits = torch.zeros(len(labels), 2, device=self.device)
        count = 0
        for x, y in loader.epoch(0):
            with self._autocast():
                out = self.eval_forward(x)
            logits = [z.float() for z in (out.logits if self.ensemble_mode else [out])]
            if self.ensemble_mode:
                logits.append(torch.stack(logits).mean(0))
            for i, z in enumerate(logits):
                top = z.topk(k, dim=1).indices
                hits[i, 0] += (top[:, 0] == y).sum()
                hits[i, 1] += (top == y[:, None]).any(1).sum()
            count += y.shape[0]
        if self.world_size > 1:  # sharded evaluation: hit counts and sample counts summed over ranks
            hits, total = dist.all_reduce_sums(hits, torch.tensor(float(count), device=self.device))
            count = int(total.item())
        hits = (hits * 100.0 / max(count, 1)).cpu()
        out_metrics: dict[str, float] = {}
        for i, label in enumerate(labels):
            out_metrics[f"{split}/{label}/top1"] = float(hits[i, 0])
            out_metrics[f"{split}/{label}/top5"] = float(hits[i, 1])
        return out_metrics

    # -- outputs ------------------------------------------------------------------------------------
    def model_card(self) -> dict[str, Any]:
        """What a reader needs to rebuild and use the trained weights, as JSON."""
        h, w, c = self.dataset.image_shape
        return {
            "format": RUN_FORMAT,
            "mode": self.config.mode,
            "student": self.config.student if not self.ensemble_mode else None,
            "labels": self.labels,
            "ensemble": self.ensemble_spec,
            "classes": list(self.dataset.classes),
            "dataset": {"name": self.dataset.name, "sha256": self.dataset_sha256},
            "input": {"height": h, "width": w, "channels": c, "mean": list(self.mean), "std": list(self.std)},
            "config": self.config.to_dict(),
        }

    def _outputs_written(self) -> bool:
        return run_finished(self.workdir)

    def _write_outputs(self, result: TrainResult) -> None:
        write_safetensors(self.workdir / WEIGHTS, self.model.state_dict(), metadata={"format": "pt"})
        write_json(self.workdir / MODEL_CONFIG, self.model_card())
        write_json(self.workdir / HISTORY, result.history)
        write_json(self.workdir / SUMMARY, result.summary())

    # -- progress -----------------------------------------------------------------------------------
    def _progress_bar(self, epochs: int) -> tqdm | None:
        mode = self.config.runtime.progress
        if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
            total = (epochs - self.start_epoch) * len(self.train_loader)
            return tqdm(
                total=total,
                unit="batch",
                desc=f"{self.config.mode} {self.config.model.arch}",
                dynamic_ncols=True,
                leave=False,
            )
        return None

    def _log_epoch(self, m: dict[str, float], bar: tqdm | None) -> None:
        if self.config.runtime.progress == "off":
            return
        if f"test/{self.labels[0]}/top1" in m:
            accs = " ".join(f"{label}={m[f'test/{label}/top1']:.2f}" for label in self.labels)
            ens = f" ens={m['test/ensemble/top1']:.2f}" if "test/ensemble/top1" in m else ""
            scored = f" test top-1 {accs}{ens}"
        else:
            scored = " (not evaluated: runtime.eval_every)"
        line = (
            f"[{self.config.mode}] epoch {int(m['epoch'])}/{self.config.epochs} lr={m['lr']:.4g} "
            f"loss={m['train/loss']:.4f}{scored} ({m['images_per_s']:.0f} img/s)"
        )
        if bar is not None:
            bar.write(line)
        else:
            log.info(line)


def count_correct(logits: list[Tensor], y: Tensor, with_ensemble: bool) -> Tensor:
    """Correct top-1 predictions of every head, then (``with_ensemble``) of the mean-logit ensemble: a few
    kernels for all heads together, not three per head (launches are what a small step pays for)."""
    stacked = torch.stack(logits)
    if with_ensemble:
        stacked = torch.cat([stacked, stacked.mean(0, keepdim=True)])
    return (stacked.argmax(-1) == y).sum(1)


def _call(cb: Any, name: str, *args: Any) -> None:
    method = getattr(cb, name, None)
    if method is not None:
        method(*args)


def train(
    config: TrainConfig,
    workdir: str | Path,
    callbacks: Iterable[Callback] = (),
    dataset: ImageDataset | None = None,
) -> TrainResult:
    """Load the data named by ``config`` (unless given) and train; resumes from ``workdir`` if it can."""
    dataset = dataset if dataset is not None else load_training_data(config)
    try:
        return Trainer(config, dataset, workdir, list(callbacks)).fit()
    finally:
        dist.shutdown()  # only if the Trainer created the process group
