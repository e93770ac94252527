"""`load_dataset`: the one entry point from a dataset name (+ optional path) to an ImageDataset."""

from __future__ import annotations

import os
from pathlib import Path

from bockd.data.cifar import load_cifar, locate_cifar
from bockd.data.dataset import ImageDataset
from bockd.data.digits import load_digits_dataset
from bockd.data.idx import load_fashion_mnist, locate_fashion_mnist
from bockd.data.imagefolder import load_imagefolder, scan_imagefolder
from bockd.data.resize import resize_dataset
from bockd.errors import DataError

DATASET_NAMES = ("cifar10", "cifar100", "fashion-mnist", "digits", "imagefolder")
_ALIASES = {"fashion_mnist": "fashion-mnist"}


def canonical_name(name: str) -> str:
    """The canonical dataset name for `name` (aliases resolved), or DataError listing the known names."""
    key = _ALIASES.get(name.strip().lower(), name.strip().lower()) if isinstance(name, str) else None
    if key not in DATASET_NAMES:
        known = ", ".join([*DATASET_NAMES, *_ALIASES])
        raise DataError(f"unknown dataset name {name!r}; known names: {known}")
    return key


def load_dataset(
    name: str,
    path: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    image_size: int | None = None,
    seed: int = 0,
) -> ImageDataset:
    """Load a dataset by name.

    - cifar10 / cifar100: official tarball, its extracted folder (or parent), or a folder of
      `<name>_{train,test}.npz`; with no path, the cache ($BOCKD_CACHE or ~/.cache/bockd), filled by
      `download=True`.
    - fashion-mnist: folder of the four idx files; default the Debian package location, then the cache.
    - digits: scikit-learn's bundled digits, split 80/20 (stratified) by `seed`; takes no path.
    - imagefolder: `path/{train,test|val}/<class>/...` or `path/<class>/...` (split 80/20 by `seed`).

    `image_size` resizes to image_size x image_size (for imagefolder while decoding, else afterwards).
    """
    key = canonical_name(name)
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    _check_path_given(key, path)
    if key in ("cifar10", "cifar100"):
        ds = load_cifar(key, path, download=download)
    elif key == "fashion-mnist":
        ds = load_fashion_mnist(path, download=download)
    elif key == "digits":
        ds = load_digits_dataset(seed=seed)
    else:
        return load_imagefolder(Path(path), image_size=image_size, seed=seed)
    return ds if image_size is None else resize_dataset(ds, image_size)


def check_source(name: str, path: str | os.PathLike[str] | None = None, *, download: bool = False) -> None:
    """Raise the reader's own DataError unless ``load_dataset(name, path, download=download)`` would find
    its files (present, in the expected layout), decoding no image: a check for before a long job."""
    key = canonical_name(name)
    _check_path_given(key, path)
    if key in ("cifar10", "cifar100"):
        locate_cifar(key, path, download=download)
    elif key == "fashion-mnist":
        locate_fashion_mnist(path, download=download)
    elif key == "imagefolder":
        scan_imagefolder(Path(path))


def _check_path_given(key: str, path: str | os.PathLike[str] | None) -> None:
    if key == "digits" and path is not None:
        raise DataError(f"digits ships with scikit-learn and takes no path, got {str(path)!r}")
    if key == "imagefolder" and path is None:
        raise DataError("imagefolder needs a path (a folder of class subfolders)")
