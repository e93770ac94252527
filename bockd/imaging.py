"""Decoding any Pillow image to 8-bit pixels, the one rule that training data and the model server share.

Pillow's ``convert("L")`` / ``convert("RGB")`` is right for 8-bit modes but clamps wider ones: a 16-bit
grey PNG opens as mode ``I;16`` (values 0..65535) and ``convert("L")`` turns every value above 255 into
255, so a normal 16-bit image comes out almost white. Here every integer mode wider than 8 bits is scaled
to 0..255 by its bit depth first (v * 255 / (2^bits - 1), rounded), so the same picture saved at 8 or 16
bits decodes to the same pixels (within rounding). Float images (mode ``F``) have no defined range and
are refused. Nothing here imports torch: the model server uses it too.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from bockd.errors import DataError

# Integer modes wider than 8 bits and their depth. Pillow opens 16-bit grey PNG/TIFF as I;16 (or I;16B);
# mode I holds 32-bit integers, which a 16-bit PNG also decodes to in some Pillow versions.
_WIDE_MODES = {"I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16}


def to_8bit(img: Image.Image, what: str = "image") -> Image.Image:
    """``img`` with 8-bit channels: unchanged for 8-bit modes, scaled by bit depth for 16/32-bit ones.

    The result's mode is one ``convert("L" | "RGB")`` handles correctly (``L`` for the wide grey modes).
    Raises DataError naming ``what`` for a float image or 32-bit values beyond 16 bits.
    """
    mode = img.mode
    if mode in _WIDE_MODES:
        return _scaled_grey(np.asarray(img), _WIDE_MODES[mode])
    if mode == "I":
        values = np.asarray(img)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DataError(
                f"{what}: 32-bit integer pixels outside 0..65535 (got {values.min()}..{values.max()}); "
                "expected an 8- or 16-bit image"
            )
        return _scaled_grey(values, 16)
    if mode == "F":
        raise DataError(
            f"{what}: floating-point images (Pillow mode F) have no defined range; save as 8/16-bit"
        )
    return img


def _scaled_grey(values: np.ndarray, bits: int) -> Image.Image:
    top = float((1 << bits) - 1)
    scaled = np.rint(values.astype(np.float64) * (255.0 / top))
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), mode="L")
