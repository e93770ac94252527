"""Seeded, stratified index splits."""

from __future__ import annotations

import numpy as np

from bockd.errors import DataError


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices of `y` into (keep, holdout), holding out `fraction` of every class.

    Each class holds out round(fraction * n_class) samples, but always keeps at least one so no class
    vanishes from the kept part. Both index arrays are sorted, so the original sample order survives.
    The result depends only on (y, fraction, seed).
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"split fraction must be in (0, 1), got {fraction!r}")
    y = np.asarray(y)
    rng = np.random.Generator(np.random.PCG64(seed))
    holdout: list[np.ndarray] = []
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        n_out = min(round(fraction * idx.size), idx.size - 1)
        if n_out > 0:
            holdout.append(rng.permutation(idx)[:n_out])
    out = np.sort(np.concatenate(holdout)) if holdout else np.empty(0, dtype=np.int64)
    mask = np.ones(y.shape[0], dtype=bool)
    mask[out] = False
    return np.flatnonzero(mask).astype(np.int64), out.astype(np.int64)


def balanced_subset(y: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset of ``size`` samples with every class as equal as can be.

    Each of the K classes gets ``size // K`` samples, and ``size % K`` classes (a seeded choice) one more.
    Depends only on (y, size, seed). DataError if ``size`` exceeds the data or a class has too few samples.
    """
    y = np.asarray(y)
    classes = np.unique(y)
    if not 1 <= size <= y.shape[0]:
        raise DataError(f"train_subset: expected 1..{y.shape[0]} (the training split's size), got {size}")
    if size < classes.size:
        raise DataError(f"train_subset: {size} images cannot hold all {classes.size} classes")
    rng = np.random.Generator(np.random.PCG64(seed))
    per_class = np.full(classes.size, size // classes.size)
    per_class[rng.permutation(classes.size)[: size % classes.size]] += 1
    picked = []
    for cls, n in zip(classes, per_class, strict=True):
        idx = np.flatnonzero(y == cls)
        if idx.size < n:
            raise DataError(
                f"train_subset: class {int(cls)} has {idx.size} training images, a balanced subset of "
                f"{size} needs {int(n)}"
            )
        picked.append(rng.permutation(idx)[:n])
    return np.sort(np.concatenate(picked)).astype(np.int64)
