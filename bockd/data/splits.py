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
