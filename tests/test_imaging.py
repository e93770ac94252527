"""Every Pillow mode and bit depth decodes to the right 8-bit pixels, in training data and in serving alike
(the case in ../shared/cases/imagefolder-16bit-png: 16-bit PNGs used to be clamped to 255)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bockd.data import load_dataset
from bockd.errors import DataError
from bockd.imaging import to_8bit

GREY = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4  # 0..252


def _png_16bit(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB): grey [H, W] or RGB [H, W, 3]."""
    colour = pixels.ndim == 3
    h, w = pixels.shape[:2]
    rows = pixels.astype(">u2").reshape(h, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2 if colour else 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _decode(path: Path, mode: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(to_8bit(im, str(path)).convert(mode))


def test_a_16_bit_grey_png_decodes_like_its_8_bit_twin(tmp_path: Path) -> None:
    Image.fromarray(GREY, mode="L").save(tmp_path / "8.png")
    _png_16bit(tmp_path / "16.png", GREY.astype(np.uint16) * 257)  # the same picture at 16 bits
    with Image.open(tmp_path / "16.png") as im:
        assert im.mode.startswith("I")  # what made convert("L") clamp every value above 255
    np.testing.assert_array_equal(_decode(tmp_path / "16.png", "L"), _decode(tmp_path / "8.png", "L"))
    np.testing.assert_array_equal(_decode(tmp_path / "16.png", "RGB")[..., 1], GREY)


def test_a_16_bit_colour_png_decodes_like_its_8_bit_twin(tmp_path: Path) -> None:
    rgb = np.stack([GREY, 255 - GREY, GREY // 2], axis=-1)
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "8.png")
    _png_16bit(tmp_path / "16.png", rgb.astype(np.uint16) * 257)
    np.testing.assert_array_equal(_decode(tmp_path / "16.png", "RGB"), rgb)


def test_32_bit_integers_in_16_bit_range_scale_and_others_are_refused() -> None:
    scaled = to_8bit(Image.fromarray(GREY.astype(np.int32) * 257, mode="I"))
    np.testing.assert_array_equal(np.asarray(scaled), GREY)
    with pytest.raises(DataError, match=r"img\.tif: 32-bit integer pixels outside 0\.\.65535"):
        to_8bit(Image.fromarray(np.full((2, 2), 70_000, np.int32), mode="I"), "img.tif")
    with pytest.raises(DataError, match="floating-point images"):
        to_8bit(Image.fromarray(np.zeros((2, 2), np.float32), mode="F"))


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr"])
def test_8_bit_modes_are_left_to_pillow(mode: str) -> None:
    img = Image.fromarray(GREY, mode="L").convert(mode)
    assert to_8bit(img) is img


def test_an_image_folder_of_16_bit_pngs_trains_on_the_right_pixels(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for name, level in (("dark", 40), ("bright", 200)):
            folder = tmp_path / "16" / split / name
            folder.mkdir(parents=True)
            twin = tmp_path / "8" / split / name
            twin.mkdir(parents=True)
            for i in range(3):
                pixels = np.full((8, 8), level + i, np.uint8)
                _png_16bit(folder / f"{i}.png", pixels.astype(np.uint16) * 257)
                Image.fromarray(pixels, mode="L").save(twin / f"{i}.png")
    wide, narrow = load_dataset("imagefolder", tmp_path / "16"), load_dataset("imagefolder", tmp_path / "8")
    assert wide.sha256() == narrow.sha256()
    assert wide.train.x[wide.train.y == wide.classes.index("dark")].max() == 42
