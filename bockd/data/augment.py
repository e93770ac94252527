"""Batched, device-agnostic augmentation (pad + random crop + horizontal flip) and input normalization."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bockd.errors import ConfigError, DataError


def pad_for(image_size: int) -> int:
    """Crop padding for an image size: the paper's 4 px at 32 px, scaled, at least 1."""
    return max(1, round(4 * image_size / 32))


def crop_flip(
    x: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flips: torch.Tensor | None, pad: int
) -> torch.Tensor:
    """Deterministic core of `augment_batch`: explicit per-image offsets and flip mask.

    Image b is zero-padded by `pad`, cropped back to H x W at (oy[b], ox[b]) in [0, 2*pad] of the padded
    image, then mirrored left-right where flips[b]. Done as one gather with index arithmetic (no padded
    copy, no Python loop over images); out-of-image positions are zero.
    """
    b, h, w, _ = x.shape
    dev = x.device
    rows = oy.to(dev, torch.long)[:, None] - pad + torch.arange(h, device=dev)  # [B, H] source rows
    cols = ox.to(dev, torch.long)[:, None] - pad + torch.arange(w, device=dev)  # [B, W] source columns
    if flips is not None:
        cols = torch.where(flips.to(dev, torch.bool)[:, None], cols.flip(1), cols)
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]  # [B, H, W]
    batch = torch.arange(b, device=dev)[:, None, None]
    out = x[batch, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]  # [B, H, W, C]
    return out.masked_fill_(~inside[..., None], 0)


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int, flip: bool) -> torch.Tensor:
    """Random crop after zero padding by `pad` (own offset per image) and random flip with p = 0.5.

    x: uint8 [B, H, W, C] on any device; `generator` must live on x.device. Draw order, fixed so a
    seeded generator replays exactly: row offsets [B], column offsets [B], then (if flip) B uniforms.
    """
    if x.ndim != 4:
        raise DataError(f"augment_batch: x must be [B, H, W, C], got shape {tuple(x.shape)}")
    if pad < 0:
        raise ConfigError(f"augment_batch: pad must be >= 0, got {pad}")
    oy, ox, flips = draw_crop_flip(x.shape[0], generator, pad, flip)
    return crop_flip(x, oy, ox, flips, pad)


def draw_crop_flip(
    b: int, generator: torch.Generator, pad: int, flip: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`augment_batch`'s draws for a batch of ``b`` (on the generator's device): row offsets, column
    offsets, flips (None without flip). A rank slices the whole global batch's draws to its samples."""
    device = generator.device
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=device)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=device)
    flips = torch.rand(b, generator=generator, device=device) < 0.5 if flip else None
    return oy, ox, flips


def to_model_input(
    x: torch.Tensor,
    mean: torch.Tensor | Sequence[float],
    std: torch.Tensor | Sequence[float],
    channels_last: bool,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 [B, H, W, C] -> normalized `dtype` [B, C, H, W] computing (x / 255 - mean) / std.

    The NHWC -> NCHW permute is free and already has channels_last strides; the math keeps them, so
    channels_last output costs no extra copy. The arithmetic is float32 (cast to `dtype` at the end).
    Every op is elementwise and separately rounded, so results do not depend on thread count.
    """
    c = x.shape[3]
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device).reshape(1, c, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device).reshape(1, c, 1, 1)
    out = x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0).sub_(mean_t).div_(std_t)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return out.to(dtype=dtype, memory_format=fmt)
