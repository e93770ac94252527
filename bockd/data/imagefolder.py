"""ImageFolder layouts: `root/{train,test|val}/<class>/*.png`, or `root/<class>/*.png` split 80/20 by seed."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from bockd.data._util import existing_path
from bockd.data.dataset import ImageDataset, ImageSplit
from bockd.data.splits import stratified_split
from bockd.errors import DataError
from bockd.imaging import to_8bit

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# Everything PIL raises for a file it cannot decode (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def load_imagefolder(
    path: str | os.PathLike[str], *, image_size: int | None = None, seed: int = 0, test_fraction: float = 0.2
) -> ImageDataset:
    root = Path(path).expanduser()
    layout, classes = scan_imagefolder(root)
    files = {s: [(f, ci) for ci, c in enumerate(classes) for f in found[c]] for s, found in layout.items()}
    everything = [f for fs in files.values() for f, _ in fs]
    mode, size = _plan(everything, image_size)
    arrays = {s: _decode([f for f, _ in fs], mode, size) for s, fs in files.items()}
    labels = {s: np.array([ci for _, ci in fs], dtype=np.int64) for s, fs in files.items()}

    if "all" in arrays:
        x, y = arrays["all"], labels["all"]
        train_idx, test_idx = stratified_split(y, test_fraction, seed)
        splits = {
            "train": ImageSplit(x[train_idx], y[train_idx]),
            "test": ImageSplit(x[test_idx], y[test_idx]),
        }
    else:
        splits = {s: ImageSplit(arrays[s], labels[s]) for s in arrays}
    return ImageDataset(
        name=root.resolve().name or "imagefolder",
        classes=classes,
        train=splits["train"],
        test=splits["test"],
        val=splits.get("val"),
    )


def scan_imagefolder(path: str | os.PathLike[str]) -> tuple[dict[str, dict[str, list[Path]]], list[str]]:
    """The layout `load_imagefolder` reads (split -> class -> image files) and the sorted class names,
    checked without decoding any image: DataError for a missing path, mismatched classes or no images."""
    root = existing_path(path, "imagefolder path")
    if not root.is_dir():
        raise DataError(f"imagefolder path {str(root)!r} is not a folder")
    if (root / "train").is_dir():
        eval_name = "test" if (root / "test").is_dir() else "val" if (root / "val").is_dir() else None
        if eval_name is None:
            raise DataError(f"imagefolder {str(root)!r}: found train/ but neither test/ nor val/")
        layout = {"train": _scan(root / "train"), "test": _scan(root / eval_name)}
        if eval_name == "test" and (root / "val").is_dir():
            layout["val"] = _scan(root / "val")
        classes = sorted(layout["train"])
        for split, found in layout.items():
            if sorted(found) != classes:
                raise DataError(
                    f"imagefolder {str(root)!r}: classes of {split}/ {sorted(found)} "
                    f"differ from train/ {classes}"
                )
    else:
        layout = {"all": _scan(root)}
        classes = sorted(layout["all"])
    if not classes:
        raise DataError(f"imagefolder {str(root)!r}: no class folders found")
    if not any(files for found in layout.values() for files in found.values()):
        raise DataError(f"imagefolder {str(root)!r}: no images with extensions {IMAGE_EXTENSIONS}")
    return layout, classes


def _scan(folder: Path) -> dict[str, list[Path]]:
    """Class name -> sorted image files, for each non-hidden subfolder (images found recursively)."""
    out: dict[str, list[Path]] = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        out[d.name] = sorted(
            p
            for p in d.rglob("*")
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        )
    return out


def _plan(files: list[Path], image_size: int | None) -> tuple[str, tuple[int, int]]:
    """Read only the headers: pick L when every image is grey (else RGB) and the common size."""
    all_grey = True
    first_size: tuple[int, int] | None = None
    for f in files:
        try:
            with Image.open(f) as im:
                mode, size = im.mode, im.size
        except _DECODE_ERRORS as e:
            raise DataError(f"image {str(f)!r} cannot be decoded: {e}") from e
        all_grey = all_grey and mode in _GREY_MODES
        if image_size is None:
            if first_size is None:
                first_size = size
            elif size != first_size:
                raise DataError(
                    f"image {str(f)!r} is {size[0]}x{size[1]} but {str(files[0])!r} is "
                    f"{first_size[0]}x{first_size[1]}; pass image_size to resize all images"
                )
    if image_size is not None:
        if image_size < 1:
            raise DataError(f"image_size must be a positive integer, got {image_size}")
        first_size = (image_size, image_size)
    assert first_size is not None
    return ("L" if all_grey else "RGB"), first_size


def _decode(files: list[Path], mode: str, size: tuple[int, int]) -> np.ndarray:
    channels = 1 if mode == "L" else 3
    out = np.empty((len(files), size[1], size[0], channels), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(f) as im:
                    im.load()
                    img = to_8bit(im, f"image {str(f)!r}").convert(mode)
        except (*_DECODE_ERRORS, Image.DecompressionBombWarning) as e:
            raise DataError(f"image {str(f)!r} cannot be decoded: {e}") from e
        if img.size != size:
            img = img.resize(size, Image.Resampling.BILINEAR)
        out[i] = np.asarray(img, dtype=np.uint8).reshape(size[1], size[0], channels)
    return out
