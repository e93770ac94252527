"""The in-memory dataset type every loader returns, with validation, hashing and an on-disk artifact."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bockd.atomic import atomic_dir, fsync_file
from bockd.data._util import existing_path
from bockd.data.splits import balanced_subset, stratified_split
from bockd.errors import DataError

META_FILE = "meta.json"
FORMAT_VERSION = 1
SPLIT_NAMES = ("train", "test", "val")


# eq=False: field-wise == on numpy arrays is ambiguous; compare datasets with sha256() instead.
@dataclass(frozen=True, eq=False)
class ImageSplit:
    x: np.ndarray  # uint8, [N, H, W, C] (C = 1 for grey, 3 for colour)
    y: np.ndarray  # int64, [N]

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __repr__(self) -> str:  # shapes, not pixel dumps
        return f"ImageSplit(x={_describe(self.x)}, y={_describe(self.y)})"

    def subset(self, idx: np.ndarray) -> ImageSplit:
        return ImageSplit(x=np.ascontiguousarray(self.x[idx]), y=np.ascontiguousarray(self.y[idx]))


@dataclass(frozen=True, eq=False)
class ImageDataset:
    name: str
    classes: list[str]
    train: ImageSplit
    test: ImageSplit
    val: ImageSplit | None = None

    def __post_init__(self) -> None:
        self.validate()

    # ---- shape facts -------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        _, h, w, c = self.train.x.shape
        return (int(h), int(w), int(c))

    @property
    def in_channels(self) -> int:
        return self.image_shape[2]

    def splits(self) -> dict[str, ImageSplit]:
        """The present splits by name, in a fixed order (train, test, val)."""
        out = {"train": self.train, "test": self.test}
        if self.val is not None:
            out["val"] = self.val
        return out

    def counts(self) -> dict[str, int]:
        return {name: len(split) for name, split in self.splits().items()}

    # ---- validation --------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise DataError naming the split/field at fault unless the dataset is well formed."""
        if not isinstance(self.name, str) or not self.name:
            raise DataError(f"dataset name must be a non-empty string, got {self.name!r}")
        if not self.classes or not all(isinstance(c, str) for c in self.classes):
            raise DataError(f"dataset {self.name!r}: classes must be a non-empty list of str")
        if len(set(self.classes)) != len(self.classes):
            raise DataError(f"dataset {self.name!r}: class names are not unique: {self.classes}")
        shape = None
        for split_name, split in self.splits().items():
            where = f"dataset {self.name!r}, split {split_name!r}"
            if not isinstance(split, ImageSplit):
                raise DataError(f"{where}: expected an ImageSplit, got {type(split).__name__}")
            x, y = split.x, split.y
            if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
                raise DataError(f"{where}: x must be a uint8 array [N, H, W, C], got {_describe(x)}")
            if x.shape[3] not in (1, 3):
                raise DataError(f"{where}: x must have 1 (grey) or 3 (colour) channels, got shape {x.shape}")
            if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.ndim != 1:
                raise DataError(f"{where}: y must be an int64 array [N], got {_describe(y)}")
            if x.shape[0] != y.shape[0]:
                raise DataError(f"{where}: x has {x.shape[0]} images but y has {y.shape[0]} labels")
            if shape is None:
                shape = x.shape[1:]
            elif x.shape[1:] != shape:
                raise DataError(f"{where}: image shape {x.shape[1:]} differs from train's {shape}")
            if y.size:
                bad = y[(y < 0) | (y >= self.num_classes)]
                if bad.size:
                    raise DataError(
                        f"{where}: label {int(bad[0])} outside the class range [0, {self.num_classes})"
                    )
        present = np.bincount(self.train.y, minlength=self.num_classes)
        empty = np.flatnonzero(present == 0)
        if empty.size:
            raise DataError(
                f"dataset {self.name!r}: class {self.classes[int(empty[0])]!r} (index {int(empty[0])}) "
                "has no images in the train split"
            )

    # ---- statistics and derived datasets -------------------------------------------------------------
    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and (population) std of the TRAIN split, in [0, 1] units.

        Counted through a 256-bin histogram per channel, so the float64 result is exact and independent
        of the summation order, and no float copy of the images is ever made.
        """
        x = self.train.x
        c = x.shape[3]
        hist = np.zeros((c, 256), dtype=np.int64)
        step = max(1, (1 << 22) // max(1, x[0].size))  # ~4M pixels per chunk bounds the temporaries
        for start in range(0, x.shape[0], step):
            chunk = x[start : start + step]
            for ch in range(c):
                hist[ch] += np.bincount(chunk[..., ch].ravel(), minlength=256)
        values = np.arange(256, dtype=np.float64) / 255.0
        n = hist.sum(axis=1).astype(np.float64)
        mean = (hist * values).sum(axis=1) / n
        var = (hist * (values[None, :] - mean[:, None]) ** 2).sum(axis=1) / n
        return [float(m) for m in mean], [float(s) for s in np.sqrt(var)]

    def with_validation_split(self, fraction: float, seed: int) -> ImageDataset:
        """A copy whose `val` split is a stratified, seeded `fraction` of train (train shrinks by as much)."""
        if self.val is not None:
            raise DataError(f"dataset {self.name!r} already has a validation split")
        keep, held = stratified_split(self.train.y, fraction, seed)
        return ImageDataset(
            name=self.name,
            classes=list(self.classes),
            train=self.train.subset(keep),
            test=self.test,
            val=self.train.subset(held),
        )

    def with_train_subset(self, size: int, seed: int) -> ImageDataset:
        """A copy whose train split is a seeded, class-balanced subset of ``size`` images
        (``balanced_subset``); the test (and val) splits are kept whole."""
        keep = balanced_subset(self.train.y, size, seed)
        return ImageDataset(
            name=self.name,
            classes=list(self.classes),
            train=self.train.subset(keep),
            test=self.test,
            val=self.val,
        )

    def sha256(self) -> str:
        """Content hash over classes and every split's x and y (the name is not part of the content)."""
        h = hashlib.sha256()
        h.update(json.dumps({"classes": self.classes}, sort_keys=True).encode())
        for split_name, split in self.splits().items():
            header = {"split": split_name, "x": list(split.x.shape), "y": list(split.y.shape)}
            h.update(json.dumps(header, sort_keys=True).encode())
            h.update(np.ascontiguousarray(split.x).data)
            h.update(np.ascontiguousarray(split.y, dtype="<i8").data)
        return h.hexdigest()

    # ---- artifact on disk ----------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        mean, std = self.mean_std()
        return {
            "format": FORMAT_VERSION,
            "name": self.name,
            "classes": list(self.classes),
            "counts": self.counts(),
            "image_shape": list(self.image_shape),
            "mean": mean,
            "std": std,
            "sha256": self.sha256(),
        }

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write `<folder>/{train,test[,val]}.npz` + meta.json; the folder appears complete or not at all."""
        folder = Path(folder)
        meta = self.meta()
        with atomic_dir(folder, DataError) as tmp:
            for split_name, split in self.splits().items():
                path = tmp / f"{split_name}.npz"
                with open(path, "wb") as f:
                    np.savez(f, x=np.ascontiguousarray(split.x), y=np.ascontiguousarray(split.y))
                fsync_file(path)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            fsync_file(tmp / META_FILE)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike[str], *, verify: bool = True) -> ImageDataset:
        """Read a folder written by `save`; with `verify`, the content hash must match meta.json."""
        folder = existing_path(folder, "dataset folder")
        meta_path = folder / META_FILE
        if not meta_path.is_file():
            raise DataError(f"{str(meta_path)!r} is missing: {str(folder)!r} is not a saved bockd dataset")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{str(meta_path)!r} is not valid JSON: {e}") from e
        for key in ("name", "classes", "counts", "sha256"):
            if key not in meta:
                raise DataError(f"{str(meta_path)!r} lacks the field {key!r}")
        unknown = set(meta["counts"]) - set(SPLIT_NAMES)
        if unknown:
            raise DataError(f"{str(meta_path)!r}: field 'counts' names unknown splits {sorted(unknown)}")
        splits = {name: _load_split(folder / f"{name}.npz") for name in meta["counts"]}
        for name in ("train", "test"):
            if name not in splits:
                raise DataError(f"{str(meta_path)!r}: field 'counts' lacks the required split {name!r}")
        for name, split in splits.items():
            if len(split) != meta["counts"][name]:
                raise DataError(
                    f"{str(folder / f'{name}.npz')!r} holds {len(split)} samples, "
                    f"meta.json field 'counts' says {meta['counts'][name]}"
                )
        ds = cls(
            name=meta["name"],
            classes=list(meta["classes"]),
            train=splits["train"],
            test=splits["test"],
            val=splits.get("val"),
        )
        if verify and ds.sha256() != meta["sha256"]:
            raise DataError(
                f"{str(meta_path)!r}: field 'sha256' is {meta['sha256']}, "
                f"but the arrays hash to {ds.sha256()}"
            )
        return ds


def _load_split(path: Path) -> ImageSplit:
    if not path.is_file():
        raise DataError(f"split file {str(path)!r} is missing")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = {"x", "y"} - set(npz.files)
            if missing:
                raise DataError(f"{str(path)!r} lacks the arrays {sorted(missing)} (expected keys x, y)")
            return ImageSplit(x=npz["x"], y=npz["y"])
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # corrupt zip, truncated, object array
        raise DataError(f"{str(path)!r} is not a readable .npz of plain arrays: {e}") from e


def _describe(a: object) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} array of shape {a.shape}"
    return type(a).__name__
