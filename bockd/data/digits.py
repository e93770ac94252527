"""scikit-learn's 8x8 handwritten digits: ships inside the wheel, so it works fully offline."""

from __future__ import annotations

import numpy as np

from bockd.data.dataset import ImageDataset, ImageSplit
from bockd.data.splits import stratified_split


def load_digits_dataset(seed: int = 0, test_fraction: float = 0.2) -> ImageDataset:
    """1797 grey 8x8 digits as uint8 [N, 8, 8, 1] (0..16 scaled to 0..255), seeded stratified 80/20 split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float64)  # [N, 8, 8], values 0..16
    x = np.rint(images * 255.0 / 16.0).astype(np.uint8)[..., None]
    y = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    return ImageDataset(
        name="digits",
        classes=[str(d) for d in range(10)],
        train=ImageSplit(x=x[train_idx], y=y[train_idx]),
        test=ImageSplit(x=x[test_idx], y=y[test_idx]),
    )
