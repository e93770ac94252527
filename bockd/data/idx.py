"""The idx file format (MNIST, Fashion-MNIST) parsed with numpy, and the Fashion-MNIST loader."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from bockd.data._util import cache_dir, existing_path
from bockd.data.dataset import ImageDataset, ImageSplit
from bockd.errors import DataError

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
# Where the Debian/Ubuntu package `dataset-fashion-mnist` installs the four .gz files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# idx type byte -> big-endian numpy dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse one idx file (optionally .gz): magic 0x0000 <type> <ndim>, ndim big-endian uint32 dims, data."""
    path = existing_path(path, "idx file")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; truncated gzip is EOFError
        raise DataError(f"idx file {str(path)!r}: cannot decompress: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(
            f"idx file {str(path)!r}: bad magic number {raw[:4].hex()} (expected 0000 <type> <ndim>)"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"idx file {str(path)!r}: truncated header ({len(raw)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(
            f"idx file {str(path)!r}: header promises dims {dims} ({expected} bytes in all) "
            f"but the file holds {len(raw)} bytes ({'truncated' if len(raw) < expected else 'trailing data'})"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"fashion-mnist: {str(folder / stem)!r}[.gz] is missing")


def locate_fashion_mnist(
    path: str | os.PathLike[str] | None = None, *, download: bool = False
) -> dict[str, Path] | None:
    """The four idx files `load_fashion_mnist` would read, found without reading them: None when it would
    download them, DataError naming what is missing."""
    root = None if path is None else Path(path).expanduser()
    folder = (
        _resolve(root)
        if root is not None
        else _resolve(DEBIAN_FASHION_MNIST) or _resolve(cache_dir() / "fashion-mnist")
    )
    if folder is None and download:
        return None
    if folder is None and root is None:
        raise DataError(
            f"fashion-mnist: no path given, {str(DEBIAN_FASHION_MNIST)!r} is absent (apt-get install "
            "dataset-fashion-mnist) and nothing is cached; pass path= or download=True"
        )
    if folder is None:
        folder = existing_path(root, "fashion-mnist folder")  # exists but incomplete: _find_idx names a file
    return {key: _find_idx(folder, stem) for key, stem in _FILES.items()}


def load_fashion_mnist(path: str | os.PathLike[str] | None = None, *, download: bool = False) -> ImageDataset:
    """Fashion-MNIST from a folder of the four idx files ([N, 28, 28, 1] uint8).

    With no path: the Debian package location, then the download cache; `download=True` fetches the
    files there with torchvision when neither has them.
    """
    files = locate_fashion_mnist(path, download=download)
    if files is None:
        folder = _download(cache_dir() / "fashion-mnist" if path is None else Path(path).expanduser())
        files = {key: _find_idx(folder, stem) for key, stem in _FILES.items()}
    arrays = {key: read_idx(file) for key, file in files.items()}
    splits = {}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        xf, yf = _FILES[f"{split}_x"], _FILES[f"{split}_y"]
        if x.dtype != np.uint8 or x.ndim != 3:
            raise DataError(f"fashion-mnist: {xf} must hold uint8 images [N, H, W], got {x.dtype} {x.shape}")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"fashion-mnist: {yf} has shape {y.shape}, expected [{x.shape[0]}] to match {xf}")
        splits[split] = ImageSplit(x=np.ascontiguousarray(x[..., None]), y=y.astype(np.int64))
    return ImageDataset(
        name="fashion-mnist", classes=list(FASHION_MNIST_CLASSES), train=splits["train"], test=splits["test"]
    )


def _resolve(root: Path) -> Path | None:
    """`root` or torchvision's `root/FashionMNIST/raw`, whichever holds all four idx files."""
    for folder in (root, root / "FashionMNIST" / "raw"):
        if folder.is_dir() and all(
            (folder / stem).is_file() or (folder / (stem + ".gz")).is_file() for stem in _FILES.values()
        ):
            return folder
    return None


def _download(root: Path) -> Path:
    """torchvision's FashionMNIST downloader (md5-checked, no pickle involved); returns the raw folder."""
    from torchvision.datasets import FashionMNIST

    try:
        FashionMNIST(str(root), train=True, download=True)
    except Exception as e:  # network errors come in many types; all mean the same here
        raise DataError(f"fashion-mnist: download into {str(root)!r} failed: {e}") from e
    return root / "FashionMNIST" / "raw"
