"""CIFAR-10 / CIFAR-100 from the official python archive, its extracted folder, or uint8 .npz arrays."""

from __future__ import annotations

import os
import shutil
import tarfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bockd.data._util import cache_dir, existing_path
from bockd.data.archive import CORRUPT_ARCHIVE_ERRORS, safe_extract
from bockd.data.dataset import ImageDataset, ImageSplit
from bockd.data.safe_pickle import safe_loads
from bockd.errors import DataError

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl",
    "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair",
    "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin",
    "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp",
    "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck",
    "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television",
    "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf",
    "woman", "worm",
]  # fmt: skip
_ROW = 3 * 32 * 32  # one official row: 1024 R, then 1024 G, then 1024 B bytes


@dataclass(frozen=True)
class CifarSpec:
    name: str
    archive: str  # official tarball name
    folder: str  # its top-level folder
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: bytes
    names_key: bytes
    classes: list[str]
    torchvision_class: str


SPECS: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        "cifar10", "cifar-10-python.tar.gz", "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta",
        b"labels", b"label_names", CIFAR10_CLASSES, "CIFAR10",
    ),
    "cifar100": CifarSpec(
        "cifar100", "cifar-100-python.tar.gz", "cifar-100-python",
        ("train",), "test", "meta",
        b"fine_labels", b"fine_label_names", CIFAR100_CLASSES, "CIFAR100",
    ),
}  # fmt: skip


def load_cifar(
    name: str, path: str | os.PathLike[str] | None = None, *, download: bool = False
) -> ImageDataset:
    """Load `cifar10` or `cifar100`.

    `path` may be the official tarball, its extracted folder or the folder holding either, or a folder with
    `<name>_train.npz` + `<name>_test.npz`. With no path, the download cache is used; `download=True`
    fetches the official tarball there (or into `path`) when nothing is found.
    """
    spec = SPECS[name]
    found = locate_cifar(name, path, download=download) or _download(spec, _root(spec, path))
    kind, where = found
    return _READERS[kind](spec, where)


def _root(spec: CifarSpec, path: str | os.PathLike[str] | None) -> Path:
    return cache_dir() / spec.name if path is None else Path(path).expanduser()


def locate_cifar(
    name: str, path: str | os.PathLike[str] | None = None, *, download: bool = False
) -> tuple[str, Path] | None:
    """What `load_cifar` would read, ``(kind, path)``, checked without reading any image: None when it
    would download, DataError when the source is missing or incomplete."""
    spec = SPECS[name]
    root = _root(spec, path)
    if path is None:
        found = _find_source(spec, root) if root.is_dir() else None
        if found is None and not download:
            raise DataError(
                f"{name}: no path given and nothing cached in {str(root)!r}; pass path= or download=True"
            )
    else:
        found = _find_source(spec, root) if root.exists() else None
        if found is None and not download:
            existing_path(root, f"{name} path")
            raise DataError(
                f"{name}: {str(root)!r} holds none of: {spec.archive}, {spec.folder}/ (or its files), "
                f"{spec.name}_train.npz + {spec.name}_test.npz"
            )
        if found is None and root.is_file():
            raise DataError(f"{name}: {str(root)!r} is a file but not {spec.archive}")
    if found is not None and found[0] in _MEMBERS:
        for member in _MEMBERS[found[0]](spec):
            _member(spec, found[1], member)
    return found


def _find_source(spec: CifarSpec, p: Path) -> tuple[str, Path] | None:
    if p.is_file():
        return ("archive", p) if p.name.endswith((".tar.gz", ".tgz", ".tar")) else None
    if (p / spec.test_file).is_file() and (p / spec.train_files[0]).is_file():
        return ("folder", p)
    if (p / spec.folder).is_dir():
        return ("folder", p / spec.folder)
    if (p / f"{spec.name}_train.npz").is_file() or (p / f"{spec.name}_test.npz").is_file():
        return ("npz", p)
    if (p / spec.archive).is_file():
        return ("archive", p / spec.archive)
    return None


def _download(spec: CifarSpec, root: Path) -> tuple[str, Path]:
    """Fetch the official tarball with torchvision's downloader (md5-checked) and extract it safely.

    torchvision's CIFAR10 class itself is not used: its constructor reads the batches with plain pickle.
    """
    import torchvision.datasets as tv_datasets
    from torchvision.datasets import utils as tv_utils

    cls = getattr(tv_datasets, spec.torchvision_class)
    downloads = root / "downloads"
    try:
        tv_utils.download_url(cls.url, str(downloads), cls.filename, cls.tgz_md5)
    except Exception as e:  # network errors come in many types; all mean the same here
        raise DataError(f"{spec.name}: download of {cls.url} into {str(downloads)!r} failed: {e}") from e
    staging = root / ".extracting"
    safe_extract(downloads / cls.filename, staging)
    if not (staging / spec.folder).is_dir():
        shutil.rmtree(staging, ignore_errors=True)
        raise DataError(f"{spec.name}: downloaded archive {cls.filename} has no {spec.folder}/ folder")
    folder = root / spec.folder
    os.replace(staging / spec.folder, folder)  # leaves root/<folder>/, the "parent folder" layout
    shutil.rmtree(staging, ignore_errors=True)
    return ("folder", folder)


# ---- readers -------------------------------------------------------------------------------------------
def _member(spec: CifarSpec, folder: Path, member: str) -> Path:
    p = folder / member
    if not p.is_file():
        raise DataError(f"{spec.name}: {str(p)!r} is missing")
    return p


def _read_folder(spec: CifarSpec, folder: Path) -> ImageDataset:
    return _from_batches(spec, lambda member: _member(spec, folder, member).read_bytes(), str(folder))


def _read_archive(spec: CifarSpec, archive: Path) -> ImageDataset:
    """Read the batches straight out of the tarball (streamed, nothing written to disk)."""
    wanted = {*spec.train_files, spec.test_file, spec.meta_file}
    blobs: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:*") as tf:
            for m in tf:
                base = m.name.rsplit("/", 1)[-1]
                if base in wanted and m.isfile() and base not in blobs:
                    f = tf.extractfile(m)
                    assert f is not None  # regular file members always have a stream
                    blobs[base] = f.read()
    except CORRUPT_ARCHIVE_ERRORS as e:
        raise DataError(f"{spec.name}: archive {str(archive)!r} is corrupt or truncated: {e}") from e

    def read(member: str) -> bytes:
        if member not in blobs:
            raise DataError(f"{spec.name}: archive {str(archive)!r} has no member {spec.folder}/{member}")
        return blobs[member]

    return _from_batches(spec, read, str(archive))


def _from_batches(spec: CifarSpec, read: Callable[[str], bytes], where: str) -> ImageDataset:
    parts = [_parse_batch(spec, read(f), f"{where}/{f}") for f in spec.train_files]
    train = ImageSplit(x=np.concatenate([p.x for p in parts]), y=np.concatenate([p.y for p in parts]))
    test = _parse_batch(spec, read(spec.test_file), f"{where}/{spec.test_file}")
    try:
        meta_bytes = read(spec.meta_file)
    except DataError:
        classes = list(spec.classes)  # meta is optional: fall back to the published names
    else:
        classes = _parse_meta(spec, meta_bytes, f"{where}/{spec.meta_file}")
    return ImageDataset(name=spec.name, classes=classes, train=train, test=test)


def _parse_batch(spec: CifarSpec, raw: bytes, source: str) -> ImageSplit:
    d = _as_dict(safe_loads(raw, source), source)
    data = d.get(b"data")
    labels = d.get(spec.label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{source}: field 'data' must be a uint8 array [N, {_ROW}], got {got}")
    if labels is None:
        raise DataError(f"{source}: field {spec.label_key.decode()!r} is missing")
    y = _int_labels(labels, source, spec.label_key.decode())
    if y.shape[0] != data.shape[0]:
        raise DataError(
            f"{source}: field {spec.label_key.decode()!r} has {y.shape[0]} labels for {data.shape[0]} images"
        )
    x = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # CHW rows -> NHWC
    return ImageSplit(x=x, y=y)


def _parse_meta(spec: CifarSpec, raw: bytes, source: str) -> list[str]:
    d = _as_dict(safe_loads(raw, source), source)
    names = d.get(spec.names_key)
    if not isinstance(names, list) or not names:
        raise DataError(f"{source}: field {spec.names_key.decode()!r} must be a non-empty list of names")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _as_dict(obj: Any, source: str) -> Mapping[bytes, Any]:
    if not isinstance(obj, dict):
        raise DataError(f"{source}: expected a pickled dict, got {type(obj).__name__}")
    # Files re-pickled under Python 3 may have str keys; normalize to the bytes keys of the originals.
    return {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}


def _int_labels(labels: Any, source: str, field: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise DataError(
            f"{source}: field {field!r} must be a list of integer labels, got {arr.dtype} {arr.shape}"
        )
    return arr.astype(np.int64)


def _read_npz(spec: CifarSpec, folder: Path) -> ImageDataset:
    splits = {
        split: read_xy_npz(_member(spec, folder, f"{spec.name}_{split}.npz")) for split in ("train", "test")
    }
    classes = list(spec.classes)
    meta = folder / spec.meta_file
    if meta.is_file():
        classes = _parse_meta(spec, meta.read_bytes(), str(meta))
    return ImageDataset(name=spec.name, classes=classes, train=splits["train"], test=splits["test"])


def read_xy_npz(path: Path) -> ImageSplit:
    """Read an .npz with `x` uint8 [N, H, W, C] and integer `y` [N] (no pickle)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "x" not in npz.files or "y" not in npz.files:
                raise DataError(f"{str(path)!r}: expected arrays 'x' and 'y', found {sorted(npz.files)}")
            x, y = npz["x"], npz["y"]
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{str(path)!r} is not a readable .npz of plain arrays: {e}") from e
    if x.dtype != np.uint8 or x.ndim != 4:
        raise DataError(f"{str(path)!r}: array 'x' must be uint8 [N, H, W, C], got {x.dtype} {x.shape}")
    return ImageSplit(x=x, y=_int_labels(y, str(path), "y"))


# The files each kind of source must hold (an archive's members are only known once it is read).
_MEMBERS: dict[str, Callable[[CifarSpec], tuple[str, ...]]] = {
    "folder": lambda spec: (*spec.train_files, spec.test_file),
    "npz": lambda spec: (f"{spec.name}_train.npz", f"{spec.name}_test.npz"),
}
_READERS: dict[str, Callable[[CifarSpec, Path], ImageDataset]] = {
    "folder": _read_folder,
    "archive": _read_archive,
    "npz": _read_npz,
}
