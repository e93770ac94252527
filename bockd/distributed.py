"""Multi-process training under ``torchrun``: launch detection, process group, and the few collectives
the engine needs.

A launch is distributed when the environment ``torchrun`` (or the Kubeflow Trainer) sets says
``WORLD_SIZE > 1``; ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` come with it. Every
helper here also works, as the identity, in a plain single process: ``rank() == 0``, ``world_size() == 1``,
``barrier()`` does nothing and ``all_reduce_sum(t)`` returns ``t``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist

from bockd.errors import ConfigError

__all__ = [
    "all_reduce_sum",
    "all_reduce_sums",
    "barrier",
    "broadcast_object",
    "broadcast_tensors",
    "convert_sync_batchnorm",
    "env_rank",
    "env_world_size",
    "init_from_env",
    "is_distributed",
    "local_rank",
    "rank",
    "shutdown",
    "use_sync_batchnorm",
    "world_size",
]

log = logging.getLogger("bockd.distributed")

_OWNED = False  # True when init_from_env created the process group (so shutdown() may destroy it)

# runtime.sync_batchnorm="auto" syncs below this many images per rank: BatchNorm's statistics over a small
# slice are noisy and its accuracy drops as the per-GPU batch shrinks (Wu & He, "Group Normalization", 2018).
SYNC_BN_MIN_SLICE = 32


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset): what the launcher asked for."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as err:
        raise ConfigError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from err


def env_rank() -> int:
    """``RANK`` from the environment (0 when unset): this process's rank before any process group."""
    return int(os.environ.get("RANK") or 0)


def is_distributed() -> bool:
    """True inside an initialized process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's index on its node (``LOCAL_RANK``; 0 when not set)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group a distributed launch describes and return this rank's device.

    Does nothing (and returns ``device``) in a single process. Backend: NCCL on CUDA, gloo on CPU. On
    CUDA each rank uses ``cuda:LOCAL_RANK`` (an index in ``runtime.device`` is overridden). Idempotent: a
    process group created before (by the caller, or a previous Trainer) is reused.
    """
    global _OWNED
    if env_world_size() <= 1:
        return device
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError(f"distributed training supports CUDA (NCCL) and CPU (gloo), not {device.type!r}")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
        _OWNED = True
        log.info("process group: backend=%s rank=%d/%d device=%s", backend, rank(), world_size(), device)
    return device


def shutdown() -> None:
    """Destroy the process group if ``init_from_env`` created it (one created by the caller is kept)."""
    global _OWNED
    if _OWNED and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over every rank, in place; returned for chaining (unchanged in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_sums(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor summed over every rank, in one collective; float32, in the given shapes. The sums
    travel as float64, so counts of samples and hits stay exact (in a single process: the values)."""
    if not is_distributed():
        return [t.float() for t in tensors]
    flat = all_reduce_sum(torch.cat([t.detach().double().flatten() for t in tensors]))
    parts = flat.split([t.numel() for t in tensors])
    return [part.view_as(t).float() for part, t in zip(parts, tensors, strict=True)]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled between our own processes; identity when single)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_tensors(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite every tensor, in place, with rank ``src``'s values (no-op in a single process)."""
    if is_distributed():
        for t in tensors:
            dist.broadcast(t, src=src)


def use_sync_batchnorm(mode: str, world_size: int, batch_size: int, device_type: str) -> bool:
    """Whether a run of ``world_size`` ranks with global ``batch_size`` should use SyncBatchNorm.

    ``mode`` is ``runtime.sync_batchnorm``: "off", "on", or "auto" (on when a rank's slice is below
    ``SYNC_BN_MIN_SLICE`` images). Never in one process. PyTorch's SyncBatchNorm runs on CUDA only, so
    "on" elsewhere is an error and "auto" falls back to per-rank BatchNorm.
    """
    if world_size <= 1 or mode == "off":
        return False
    if device_type != "cuda":
        if mode == "on":
            raise ConfigError(
                f"runtime.sync_batchnorm: 'on' needs CUDA (torch.nn.SyncBatchNorm rejects {device_type} "
                "tensors); use 'auto' or 'off'"
            )
        return False
    return mode == "on" or batch_size // world_size < SYNC_BN_MIN_SLICE


def convert_sync_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every BatchNorm layer replaced by a SyncBatchNorm holding the same parameters and
    buffers (state_dict keys unchanged, so checkpoints load either way). Call before wrapping in DDP."""
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
