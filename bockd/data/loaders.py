"""Deterministic batches: every permutation and augmentation draw is a function of (seed, epoch, batch).

So an epoch replays bit-identically after a resume, and on CPU the result does not depend on num_workers.
(CPU and CUDA random streams differ, so CPU and CUDA runs augment differently; the order is the same.)

Sharding (distributed training): with ``world_size > 1`` the loader yields rank ``rank``'s part of every
*global* batch. The global batches are exactly the single-process ones (same seeded permutation, same
``batch_size``); each is split into ``world_size`` contiguous, near-equal slices (``Tensor.tensor_split``
sizes), and rank r takes slice r. Augmentation draws are made for the whole global batch from the
batch's seeded generator and then sliced, so the union over ranks of what they see is bit-identical to
the single-process batch, whatever the world size. A final training batch smaller than ``world_size``
(some rank would get no sample) is skipped on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bockd.data.augment import crop_flip, draw_crop_flip, to_model_input
from bockd.data.dataset import ImageSplit
from bockd.errors import ConfigError

_M64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def mix_seed(*values: int) -> int:
    """A 63-bit seed depending on every value (splitmix64 chain; Python's salted hash() is never used)."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _M64))
    return h >> 1


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of epoch `epoch`: int64 [n] on CPU, identical on every host and device."""
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, 0))
    return torch.randperm(n, generator=g)


def batch_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of the augmentation generator for batch `index` of `epoch`."""
    return mix_seed(seed, epoch, 1, index)


class BatchLoader:
    """Batches of (normalized float input [B, C, H, W], int64 labels [B]) on `device`.

    train=True: a fresh seeded permutation per epoch, pad + crop + flip augmentation, optional drop_last.
    train=False: sample order, no augmentation, the last partial batch kept.
    CUDA (any non-CPU device): the uint8 split is copied there once; batches are gathered and augmented
    there with no host sync and no DataLoader.
    CPU: a DataLoader whose items are whole batches, each built from its own seeded generator.
    """

    def __init__(
        self,
        split: ImageSplit,
        *,
        batch_size: int,
        mean: Sequence[float] | torch.Tensor,
        std: Sequence[float] | torch.Tensor,
        device: torch.device,
        train: bool,
        seed: int,
        pad: int,
        flip: bool = True,
        drop_last: bool = False,
        num_workers: int = 0,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size), got rank={rank} world_size={world_size}")
        if train and batch_size % world_size:
            raise ConfigError(
                f"batch_size ({batch_size}, the global batch) must be divisible by the world size "
                f"({world_size}): each rank processes batch_size / world_size samples per step"
            )
        if pad < 0:
            raise ConfigError(f"pad must be >= 0, got {pad}")
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
        channels = split.x.shape[3]
        mean_t = torch.as_tensor(mean, dtype=torch.float32).detach().cpu().clone().reshape(-1)
        std_t = torch.as_tensor(std, dtype=torch.float32).detach().cpu().clone().reshape(-1)
        if mean_t.numel() != channels or std_t.numel() != channels:
            raise ConfigError(
                f"mean/std must have one value per channel ({channels}), got {mean_t.numel()}/{std_t.numel()}"
            )
        if not bool((std_t > 0).all()):
            raise ConfigError(f"std must be positive, got {std_t.tolist()}")
        self.device = torch.device(device)
        self._spec = _BatchSpec(
            x=_tensor(split.x),
            y=_tensor(split.y),
            batch_size=batch_size,
            mean=mean_t,
            std=std_t,
            train=train,
            seed=seed,
            pad=pad,
            flip=flip,
            drop_last=drop_last and train,
            channels_last=channels_last,
            dtype=dtype,
            rank=rank,
            world_size=world_size,
        )
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers
        self._loader: DataLoader | None = None
        self._sampler: _EpochSampler | None = None
        if self.device.type != "cpu":
            self._make_resident()

    def _make_resident(self) -> None:
        """Copy the uint8 split to `device` once; batches are then gathered and augmented there."""
        s = self._spec
        self._x_dev, self._y_dev = s.x.to(self.device), s.y.to(self.device)
        self._mean_dev, self._std_dev = s.mean.to(self.device), s.std.to(self.device)
        self._gen = torch.Generator(device=self.device)

    def __len__(self) -> int:
        return self._spec.num_batches

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of `epoch`; the same (seed, epoch) always yields the same batches."""
        if self.device.type != "cpu":
            return self._resident_epoch(epoch)
        return self._cpu_epoch(epoch)

    def _resident_epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        s = self._spec
        perm = None
        if s.train:
            perm = epoch_permutation(s.n, s.seed, epoch)  # on CPU: the same order on every device
            if self.device.type == "cuda":
                perm = perm.pin_memory()
            perm = perm.to(self.device, non_blocking=True)
        for i in range(s.num_batches):
            if s.shard_size(i) == 0:  # evaluation only: fewer samples left than ranks
                continue
            yield s.build(epoch, i, self._x_dev, self._y_dev, perm, self._gen, self._mean_dev, self._std_dev)

    def _cpu_epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.num_workers == 0:
            for i in range(len(self)):
                if self._spec.shard_size(i) > 0:
                    yield self._spec.batch(epoch, i)
            return
        if self._loader is None:
            self._sampler = _EpochSampler(len(self))
            self._sampler.keep = [i for i in range(len(self)) if self._spec.shard_size(i) > 0]
            self._loader = DataLoader(
                _BatchDataset(self._spec),
                batch_size=None,  # items are whole batches already
                sampler=self._sampler,
                num_workers=self.num_workers,
                persistent_workers=True,  # workers survive across epochs; the epoch travels in the key
            )
        assert self._sampler is not None
        self._sampler.epoch = epoch
        yield from self._loader


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing `a`'s memory (copied only if `a` is read-only or not C-contiguous)."""
    return torch.from_numpy(np.require(a, requirements=["C_CONTIGUOUS", "WRITEABLE"]))


class _BatchSpec:
    """Everything needed to build batch i of an epoch on the CPU; picklable for DataLoader workers."""

    def __init__(
        self,
        *,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        mean: torch.Tensor,
        std: torch.Tensor,
        train: bool,
        seed: int,
        pad: int,
        flip: bool,
        drop_last: bool,
        channels_last: bool,
        dtype: torch.dtype,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.x, self.y = x, y
        self.rank, self.world_size = rank, world_size
        self.n = int(y.shape[0])
        self.batch_size = batch_size
        self.mean, self.std = mean, std
        self.train, self.seed, self.pad, self.flip = train, seed, pad, flip
        self.channels_last, self.dtype = channels_last, dtype
        self.num_batches = self.n // batch_size if drop_last else math.ceil(self.n / batch_size)
        if (
            train
            and world_size > 1
            and self.num_batches
            and self._global_size(self.num_batches - 1) < world_size
        ):
            self.num_batches -= 1  # the last batch cannot give every rank a sample: skipped on every rank
        self._perm_epoch: int | None = None
        self._perm: torch.Tensor | None = None

    def _global_size(self, i: int) -> int:
        return min((i + 1) * self.batch_size, self.n) - i * self.batch_size

    def _shard_bounds(self, m: int) -> tuple[int, int]:
        """This rank's [start, end) within a global batch of m samples (``tensor_split`` sizes)."""
        q, rem = divmod(m, self.world_size)
        start = self.rank * q + min(self.rank, rem)
        return start, start + q + (1 if self.rank < rem else 0)

    def shard_size(self, i: int) -> int:
        """How many samples of global batch i this rank gets."""
        start, end = self._shard_bounds(self._global_size(i))
        return end - start

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:  # each worker caches the current epoch's order
            self._perm = epoch_permutation(self.n, self.seed, epoch)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def batch(self, epoch: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch i of `epoch` from the host arrays, with its own CPU generator."""
        perm = self._permutation(epoch) if self.train else None
        return self.build(epoch, i, self.x, self.y, perm, torch.Generator(), self.mean, self.std)

    def build(
        self,
        epoch: int,
        i: int,
        x: torch.Tensor,
        y: torch.Tensor,
        perm: torch.Tensor | None,
        gen: torch.Generator,
        mean: torch.Tensor,
        std: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of batch i (the whole batch in one process) from tensors on any one device;
        `gen` (on that device) is re-seeded for this batch. A slice has the very samples and augmentation
        the single-process batch has at those positions: the draws are made for the whole global batch."""
        lo, hi = i * self.batch_size, min((i + 1) * self.batch_size, self.n)
        start, end = self._shard_bounds(hi - lo)
        if perm is None:
            xb, yb = x[lo + start : lo + end], y[lo + start : lo + end].clone()  # clone: never a dataset view
        else:
            idx = perm[lo + start : lo + end]
            xb, yb = x.index_select(0, idx), y.index_select(0, idx)
            if self.pad > 0 or self.flip:
                gen.manual_seed(batch_seed(self.seed, epoch, i))
                oy, ox, flips = draw_crop_flip(hi - lo, gen, self.pad, self.flip)
                mine = slice(start, end)
                xb = crop_flip(xb, oy[mine], ox[mine], None if flips is None else flips[mine], self.pad)
        return to_model_input(xb, mean, std, self.channels_last, self.dtype), yb


class _BatchDataset(Dataset):
    def __init__(self, spec: _BatchSpec) -> None:
        self.spec = spec

    def __len__(self) -> int:
        return self.spec.num_batches

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, i = key
        return self.spec.batch(epoch, i)


class _EpochSampler(Sampler[tuple[int, int]]):
    """Yields (epoch, batch index) keys; the main process sets `epoch` before each pass."""

    def __init__(self, num_batches: int) -> None:
        self.num_batches = num_batches
        self.epoch = 0
        self.keep = list(range(num_batches))  # batch indices that give this rank samples

    def __len__(self) -> int:
        return len(self.keep)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, i) for i in self.keep])
