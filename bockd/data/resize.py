"""Resizing whole uint8 image arrays (used when a fixed-size dataset is asked for another image_size)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from bockd.data.dataset import ImageDataset, ImageSplit


def resize_images(x: np.ndarray, size: int, chunk: int = 1024) -> np.ndarray:
    """Bilinear (antialiased when shrinking) resize of uint8 [N, H, W, C] to [N, size, size, C]."""
    if x.shape[1:3] == (size, size):
        return x
    out = np.empty((x.shape[0], size, size, x.shape[3]), dtype=np.uint8)
    for start in range(0, x.shape[0], chunk):
        t = torch.from_numpy(np.ascontiguousarray(x[start : start + chunk])).permute(0, 3, 1, 2).float()
        r = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[start : start + chunk] = r.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def resize_dataset(ds: ImageDataset, size: int) -> ImageDataset:
    """`ds` with every split resized to size x size (returned unchanged when it already is)."""
    if ds.image_shape[:2] == (size, size):
        return ds

    def r(split: ImageSplit) -> ImageSplit:
        return ImageSplit(x=resize_images(split.x, size), y=split.y)

    val = None if ds.val is None else r(ds.val)
    return ImageDataset(name=ds.name, classes=ds.classes, train=r(ds.train), test=r(ds.test), val=val)
