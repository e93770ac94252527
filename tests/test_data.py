"""Tests of bockd.data: dataset type, loaders for every source form, safe archives/pickles, batches."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import shutil
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bockd.data as data
from bockd.data import (
    CIFAR10_CLASSES,
    FASHION_MNIST_CLASSES,
    BatchLoader,
    ImageDataset,
    ImageSplit,
    augment_batch,
    crop_flip,
    load_dataset,
    pad_for,
    read_idx,
    safe_extract,
    safe_loads,
    to_model_input,
)
from bockd.errors import DataError

# The project's shared data sits beside the checkout (../shared), as on CI; BOCKD_SHARED_DATA overrides.
SHARED_DATA = Path(
    os.environ.get("BOCKD_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
REAL_CIFAR10 = SHARED_DATA / "cifar10"


# ---- helpers -------------------------------------------------------------------------------------------
class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes protocol 2 the way Python 2 did for the official CIFAR files: every str/bytes is a BINSTRING."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def _save_binstring(self, obj: bytes | str) -> None:
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_binstring
    dispatch[str] = _save_binstring


def py2_pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 1.x (which wrote the real files) kept _reconstruct in numpy.core.multiarray.
    return buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def chw_rows(x_nhwc: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2).reshape(len(x_nhwc), 3072))


def fake_images(rng: np.random.Generator, n: int, h: int = 32, w: int = 32, c: int = 3) -> np.ndarray:
    return rng.integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def balanced_labels(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % k).astype(np.int64)


def make_tar(src: Path, archive: Path, arcname: str) -> Path:
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src, arcname=arcname)
    return archive


def tiny_dataset(n_train: int = 40, n_test: int = 10, k: int = 4, c: int = 3, seed: int = 0) -> ImageDataset:
    rng = np.random.default_rng(seed)
    return ImageDataset(
        name="tiny",
        classes=[f"c{i}" for i in range(k)],
        train=ImageSplit(fake_images(rng, n_train, 8, 8, c), balanced_labels(n_train, k, rng)),
        test=ImageSplit(fake_images(rng, n_test, 8, 8, c), balanced_labels(n_test, k, rng)),
    )


@pytest.fixture(scope="module")
def cifar10_fake(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An official-format CIFAR-10 tree (5 train batches + test + meta) and its tarball."""
    root = tmp_path_factory.mktemp("c10")
    folder = root / "parent" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    xs, ys = [], []
    for i in range(1, 6):
        x, y = fake_images(rng, 10), balanced_labels(10, 10, rng)
        batch = {
            b"batch_label": f"training batch {i} of 5".encode(),
            b"labels": [int(v) for v in y],
            b"data": chw_rows(x),
            b"filenames": [f"img_{i}_{j}.png".encode() for j in range(10)],
        }
        (folder / f"data_batch_{i}").write_bytes(py2_pickle(batch))
        xs.append(x)
        ys.append(y)
    xt, yt = fake_images(rng, 7), rng.integers(0, 10, 7).astype(np.int64)
    test = {b"batch_label": b"testing batch 1 of 1", b"labels": yt.tolist(), b"data": chw_rows(xt)}
    (folder / "test_batch").write_bytes(py2_pickle(test))
    names = [f"name{i}".encode() for i in range(10)]
    (folder / "batches.meta").write_bytes(py2_pickle({b"label_names": names, b"num_vis": 3072}))
    archive = make_tar(folder, root / "cifar-10-python.tar.gz", "cifar-10-batches-py")
    return {
        "folder": folder,
        "archive": archive,
        "x": np.concatenate(xs),
        "y": np.concatenate(ys),
        "xt": xt,
        "yt": yt,
        "classes": [n.decode() for n in names],
    }


# ---- CIFAR ---------------------------------------------------------------------------------------------
def test_cifar10_every_entry_form_gives_the_same_dataset(cifar10_fake: dict, tmp_path: Path) -> None:
    f = cifar10_fake
    holder = tmp_path / "holder"
    holder.mkdir()
    shutil.copy(f["archive"], holder / "cifar-10-python.tar.gz")
    forms = [f["archive"], f["folder"], f["folder"].parent, holder]
    loaded = [load_dataset("cifar10", p) for p in forms]
    for ds in loaded:
        assert ds.name == "cifar10"
        assert ds.classes == f["classes"]  # from batches.meta
        assert ds.counts() == {"train": 50, "test": 7}
        assert ds.image_shape == (32, 32, 3) and ds.in_channels == 3 and ds.num_classes == 10
        np.testing.assert_array_equal(ds.train.x, f["x"])  # CHW rows came back as NHWC pixels
        np.testing.assert_array_equal(ds.train.y, f["y"])
        np.testing.assert_array_equal(ds.test.x, f["xt"])
        assert ds.train.y.dtype == np.int64
    assert len({ds.sha256() for ds in loaded}) == 1


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    x, fine = fake_images(rng, 200), balanced_labels(200, 100, rng)
    coarse = fine // 5
    (folder / "train").write_bytes(
        py2_pickle({b"data": chw_rows(x), b"fine_labels": fine.tolist(), b"coarse_labels": coarse.tolist()})
    )
    xt, yt = fake_images(rng, 5), rng.integers(0, 100, 5)
    (folder / "test").write_bytes(
        py2_pickle({b"data": chw_rows(xt), b"fine_labels": yt.tolist(), b"coarse_labels": (yt // 5).tolist()})
    )
    names = [f"fine{i}" for i in range(100)]
    (folder / "meta").write_bytes(
        py2_pickle({b"fine_label_names": names, b"coarse_label_names": [f"c{i}" for i in range(20)]})
    )
    archive = make_tar(folder, tmp_path / "cifar-100-python.tar.gz", "cifar-100-python")
    for p in (folder, tmp_path, archive):
        ds = load_dataset("cifar100", p)
        assert ds.num_classes == 100 and ds.classes == names
        np.testing.assert_array_equal(ds.train.y, fine)
        np.testing.assert_array_equal(ds.train.x, x)


def test_cifar_npz_folder_with_and_without_meta(cifar10_fake: dict, tmp_path: Path) -> None:
    f = cifar10_fake
    np.savez(tmp_path / "cifar10_train.npz", x=f["x"], y=f["y"])
    np.savez(tmp_path / "cifar10_test.npz", x=f["xt"], y=f["yt"].astype(np.int32))  # any int dtype
    ds = load_dataset("cifar10", tmp_path)
    assert ds.classes == CIFAR10_CLASSES
    assert ds.test.y.dtype == np.int64
    np.testing.assert_array_equal(ds.train.x, f["x"])
    shutil.copy(f["folder"] / "batches.meta", tmp_path / "batches.meta")
    assert load_dataset("cifar10", tmp_path).classes == f["classes"]


@pytest.mark.skipif(not REAL_CIFAR10.is_dir(), reason="real CIFAR-10 arrays not present")
def test_real_cifar10_shapes_and_statistics() -> None:
    ds = load_dataset("cifar10", REAL_CIFAR10)
    assert ds.train.x.shape == (50000, 32, 32, 3) and ds.test.x.shape == (10000, 32, 32, 3)
    assert ds.classes == CIFAR10_CLASSES and ds.num_classes == 10
    assert np.bincount(ds.train.y).tolist() == [5000] * 10
    mean, std = ds.mean_std()
    np.testing.assert_allclose(mean, [0.4914, 0.4822, 0.4465], atol=1e-4)
    np.testing.assert_allclose(std, [0.2470, 0.2435, 0.2616], atol=1e-4)


def test_unpickler_refuses_os_system(cifar10_fake: dict, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(cifar10_fake["folder"], folder)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_3.*(posix|os)\.system"):
        load_dataset("cifar10", folder)
    assert not marker.exists()
    with pytest.raises(DataError, match=r"builtins\.eval"):
        safe_loads(b"cbuiltins\neval\n(S'1+1'\ntR.", "x.pkl")


def test_unpickler_reads_python3_pickles() -> None:
    arr = np.arange(3072 * 2, dtype=np.uint16).astype(np.uint8).reshape(2, 3072)
    # Every protocol: 0-2 from Python 3 encode bytes through _codecs.encode, 5 (HIGHEST_PROTOCOL) writes
    # arrays through numpy's _frombuffer.
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        obj = safe_loads(pickle.dumps({b"data": arr, b"labels": [1, 2]}, protocol=proto), "p3.pkl")
        np.testing.assert_array_equal(obj[b"data"], arr)
    evil = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x04\x00\x00\x00zlib\x86R."
    with pytest.raises(DataError, match="latin1"):
        safe_loads(evil, "p3.pkl")


def _frombuffer_pickle(dtype: str, shape: object) -> bytes:
    """A protocol-5 pickle calling numpy's _frombuffer(b"...", dtype, shape, "C") with chosen arguments."""

    class Call:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            from numpy._core.numeric import _frombuffer

            return (_frombuffer, (b"\x00" * 8, np.dtype(dtype), shape, "C"))

    return pickle.dumps(Call(), protocol=5)


def test_protocol_5_arrays_are_rebuilt_only_from_plain_bytes() -> None:
    np.testing.assert_array_equal(safe_loads(_frombuffer_pickle("u1", (2, 4)), "p5.pkl"), np.zeros((2, 4)))
    with pytest.raises(DataError, match="only plain dtypes"):
        safe_loads(_frombuffer_pickle("O", (1,)), "p5.pkl")
    with pytest.raises(DataError, match="expected a tuple of sizes"):
        safe_loads(_frombuffer_pickle("u1", [8]), "p5.pkl")
    out_of_band = pickle.dumps(
        np.zeros(4, np.uint8), protocol=5, buffer_callback=lambda b: False
    )  # data outside the stream: refused, never looked up elsewhere
    with pytest.raises(DataError, match="not a readable CIFAR pickle"):
        safe_loads(out_of_band, "p5.pkl")


def test_a_cifar_archive_pickled_with_protocol_5_loads(cifar10_fake: dict, tmp_path: Path) -> None:
    """What `pickle.HIGHEST_PROTOCOL` writes in Python 3 (str keys, _frombuffer) reads like the originals."""
    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(cifar10_fake["folder"], folder)
    for path in sorted(folder.iterdir()):
        batch = safe_loads(path.read_bytes(), path.name)
        as_py3 = {k.decode(): (v.decode() if isinstance(v, bytes) else v) for k, v in batch.items()}
        path.write_bytes(pickle.dumps(as_py3, protocol=pickle.HIGHEST_PROTOCOL))
    original = load_dataset("cifar10", cifar10_fake["folder"])
    assert load_dataset("cifar10", folder).sha256() == original.sha256()


def test_cifar_bad_batches_name_file_and_field(cifar10_fake: dict, tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(cifar10_fake["folder"], folder)
    (folder / "test_batch").write_bytes(py2_pickle({b"data": np.zeros((2, 3072), np.uint8)}))
    with pytest.raises(DataError, match=r"test_batch.*'labels' is missing"):
        load_dataset("cifar10", folder)
    (folder / "test_batch").write_bytes(
        py2_pickle({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    )
    with pytest.raises(DataError, match=r"test_batch.*'data'.*\[N, 3072\]"):
        load_dataset("cifar10", folder)
    (folder / "test_batch").write_bytes(
        py2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    )
    with pytest.raises(DataError, match=r"split 'test'.*label 10 outside.*\[0, 10\)"):
        load_dataset("cifar10", folder)
    (folder / "test_batch").write_bytes(b"\x80\x02}q\x01(U\x04data")  # truncated pickle
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", folder)
    (folder / "data_batch_2").unlink()
    with pytest.raises(DataError, match="data_batch_2"):
        load_dataset("cifar10", folder)


def test_cifar_truncated_archive_and_missing_paths(cifar10_fake: dict, tmp_path: Path) -> None:
    raw = cifar10_fake["archive"].read_bytes()
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz.*(corrupt|truncated)"):
        load_dataset("cifar10", bad)
    with pytest.raises(DataError, match="nope"):
        load_dataset("cifar10", tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty.*cifar-10-batches-py"):
        load_dataset("cifar10", empty)


def test_cifar_download_goes_through_cache(cifar10_fake: dict, tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets.utils as tv_utils

    calls = []

    def fake_download(url: str, root: str, filename: str, md5: str) -> None:
        calls.append((url, filename, md5))
        Path(root).mkdir(parents=True, exist_ok=True)
        shutil.copy(cifar10_fake["archive"], Path(root) / filename)

    monkeypatch.setenv("BOCKD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tv_utils, "download_url", fake_download)
    with pytest.raises(DataError, match="download=True"):
        load_dataset("cifar10")
    ds = load_dataset("cifar10", download=True)
    assert calls and calls[0][1] == "cifar-10-python.tar.gz"
    assert (tmp_path / "cache" / "cifar10" / "cifar-10-batches-py" / "test_batch").is_file()
    again = load_dataset("cifar10")  # served from the cache, no second download
    assert len(calls) == 1 and again.sha256() == ds.sha256()


# ---- Fashion-MNIST / idx -------------------------------------------------------------------------------
def idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_fashion(folder: Path, rng: np.random.Generator, gz: bool) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": fake_images(rng, 20, 28, 28, 1)[..., 0],
        "train-labels-idx1-ubyte": balanced_labels(20, 10, rng),
        "t10k-images-idx3-ubyte": fake_images(rng, 6, 28, 28, 1)[..., 0],
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 6),
    }
    for name, arr in arrays.items():
        blob = idx_bytes(arr)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(blob, mtime=0))
        else:
            (folder / name).write_bytes(blob)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_idx_files(tmp_path: Path, gz: bool) -> None:
    arrays = write_fashion(tmp_path, np.random.default_rng(3), gz)
    ds = load_dataset("fashion_mnist", tmp_path)
    assert ds.name == "fashion-mnist" and ds.classes == FASHION_MNIST_CLASSES
    assert ds.train.x.shape == (20, 28, 28, 1) and ds.test.x.shape == (6, 28, 28, 1)
    np.testing.assert_array_equal(ds.train.x[..., 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test.y, arrays["t10k-labels-idx1-ubyte"])


def test_idx_parser_errors_name_the_file(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    good = tmp_path / "good-idx3-ubyte"
    good.write_bytes(idx_bytes(arr))
    np.testing.assert_array_equal(read_idx(good), arr)
    wide = tmp_path / "wide-idx1"
    wide.write_bytes(bytes([0, 0, 0x0B, 1]) + struct.pack(">I", 3) + np.array([1, -2, 300], ">i2").tobytes())
    assert read_idx(wide).tolist() == [1, -2, 300]
    trunc = tmp_path / "train-images-idx3-ubyte"
    trunc.write_bytes(idx_bytes(arr)[:-5])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*truncated"):
        read_idx(trunc)
    magic = tmp_path / "magic"
    magic.write_bytes(b"\x12\x34" + idx_bytes(arr)[2:])
    with pytest.raises(DataError, match=r"magic.*bad magic number"):
        read_idx(magic)
    gz = tmp_path / "cut.gz"
    gz.write_bytes(gzip.compress(idx_bytes(arr))[:-12])
    with pytest.raises(DataError, match=r"cut\.gz"):
        read_idx(gz)
    write_fashion(tmp_path / "fm", np.random.default_rng(0), gz=False)
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_dataset("fashion-mnist", tmp_path / "fm")


def test_fashion_mnist_default_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No path: the Debian package's folder (its .gz files), then torchvision's layout in the cache.
    Small idx files stand in for both, so this runs whether or not the package is installed."""
    monkeypatch.setattr(data.idx, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    monkeypatch.setenv("BOCKD_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")
    torchvision_layout = tmp_path / "cache" / "fashion-mnist" / "FashionMNIST" / "raw"
    cached = write_fashion(torchvision_layout, np.random.default_rng(5), gz=False)
    np.testing.assert_array_equal(load_dataset("fashion-mnist").test.y, cached["t10k-labels-idx1-ubyte"])
    debian = write_fashion(tmp_path / "debian", np.random.default_rng(6), gz=True)
    ds = load_dataset("fashion-mnist")
    assert ds.train.x.shape == (20, 28, 28, 1) and ds.test.x.shape == (6, 28, 28, 1)
    np.testing.assert_array_equal(ds.train.x[..., 0], debian["train-images-idx3-ubyte"])  # Debian first


# ---- digits --------------------------------------------------------------------------------------------
def test_digits_shapes_scaling_and_seeded_split() -> None:
    from sklearn.datasets import load_digits

    a, b, c = load_dataset("digits", seed=0), load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    assert a.train.x.shape == (1438, 8, 8, 1) and a.test.x.shape == (359, 8, 8, 1)
    assert a.classes == [str(i) for i in range(10)] and a.train.x.dtype == np.uint8
    assert a.sha256() == b.sha256() != c.sha256()
    assert set(np.unique(a.test.y)) == set(range(10))
    raw = load_digits()
    allx = np.concatenate([a.train.x, a.test.x])[..., 0].reshape(-1, 64)
    expected = {tuple(np.rint(r * 255 / 16).astype(np.uint8)) for r in raw.data}
    assert {tuple(r) for r in allx} <= expected and allx.max() == 255
    big = load_dataset("digits", image_size=16)
    assert big.image_shape == (16, 16, 1) and big.counts() == a.counts()
    with pytest.raises(DataError, match="takes no path"):
        load_dataset("digits", "/tmp")


# ---- imagefolder ---------------------------------------------------------------------------------------
def write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).save(path)


def test_imagefolder_train_test_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    written = {}
    for split in ("train", "test"):
        for cls in ("cat", "ant"):
            for i in range(3):
                img = fake_images(rng, 1, 6, 5, 3)[0]
                write_png(tmp_path / split / cls / f"{i}.png", img)
                written[(split, cls, i)] = img
    (tmp_path / "train" / "ant" / "notes.txt").write_text("ignored")
    ds = load_dataset("imagefolder", tmp_path)
    assert ds.classes == ["ant", "cat"] and ds.image_shape == (6, 5, 3)
    assert ds.counts() == {"train": 6, "test": 6}
    assert ds.train.y.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(ds.train.x[3], written[("train", "cat", 0)])
    resized = load_dataset("imagefolder", tmp_path, image_size=4)
    assert resized.image_shape == (4, 4, 3)


def test_imagefolder_grey_flat_split_and_val(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    for cls in ("a", "b", "c"):
        for i in range(10):
            write_png(tmp_path / "flat" / cls / f"{i}.png", fake_images(rng, 1, 4, 4, 1)[0])
    ds = load_dataset("imagefolder", tmp_path / "flat", seed=7)
    assert ds.in_channels == 1 and ds.counts() == {"train": 24, "test": 6}
    assert np.bincount(ds.test.y).tolist() == [2, 2, 2]
    assert load_dataset("imagefolder", tmp_path / "flat", seed=7).sha256() == ds.sha256()
    assert load_dataset("imagefolder", tmp_path / "flat", seed=8).sha256() != ds.sha256()
    for split in ("train", "val"):
        for cls in ("x", "y"):
            write_png(tmp_path / "tv" / split / cls / "0.png", fake_images(rng, 1, 4, 4, 3)[0])
    tv = load_dataset("imagefolder", tmp_path / "tv")  # val/ serves as the test split
    assert tv.counts() == {"train": 2, "test": 2} and tv.val is None


def test_imagefolder_failures_name_the_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    for split, classes in (("train", ("a", "b")), ("test", ("a", "z"))):
        for cls in classes:
            write_png(tmp_path / "cls" / split / cls / "0.png", fake_images(rng, 1, 4, 4, 3)[0])
    with pytest.raises(DataError, match=r"classes of test/.*'z'"):
        load_dataset("imagefolder", tmp_path / "cls")
    write_png(tmp_path / "size" / "a" / "0.png", fake_images(rng, 1, 4, 4, 3)[0])
    write_png(tmp_path / "size" / "a" / "1.png", fake_images(rng, 1, 5, 4, 3)[0])
    write_png(tmp_path / "size" / "b" / "0.png", fake_images(rng, 1, 4, 4, 3)[0])
    with pytest.raises(DataError, match=r"1\.png.*4x5"):
        load_dataset("imagefolder", tmp_path / "size")
    assert load_dataset("imagefolder", tmp_path / "size", image_size=4).image_shape == (4, 4, 3)
    (tmp_path / "size" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=r"broken\.png.*cannot be decoded"):
        load_dataset("imagefolder", tmp_path / "size", image_size=4)
    good = io.BytesIO()
    Image.fromarray(fake_images(rng, 1, 16, 16, 3)[0]).save(good, format="PNG")
    (tmp_path / "size" / "b" / "broken.png").write_bytes(good.getvalue()[:60])  # valid header, cut data
    with pytest.raises(DataError, match=r"broken\.png"):
        load_dataset("imagefolder", tmp_path / "size", image_size=4)
    with pytest.raises(DataError, match="missing_dir"):
        load_dataset("imagefolder", tmp_path / "missing_dir")


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(DataError, match=r"'mnist'.*cifar10.*fashion-mnist.*digits.*imagefolder"):
        load_dataset("mnist")


# ---- ImageDataset --------------------------------------------------------------------------------------
def test_dataset_validation_names_the_problem() -> None:
    ds = tiny_dataset()
    x, y = ds.train.x, ds.train.y
    bad_label = y.copy()
    bad_label[3] = 9
    cases = [
        (dict(train=ImageSplit(x, bad_label)), r"split 'train'.*label 9 outside.*\[0, 4\)"),
        (dict(train=ImageSplit(x, y.astype(np.int32))), r"split 'train'.*y must be an int64"),
        (dict(train=ImageSplit(x[..., 0], y)), r"split 'train'.*x must be a uint8 array \[N, H, W, C\]"),
        (dict(train=ImageSplit(x.astype(np.float32), y)), r"split 'train'.*uint8"),
        (dict(train=ImageSplit(x[:5], y)), r"split 'train'.*5 images but y has 40 labels"),
        (
            dict(test=ImageSplit(np.zeros((2, 9, 8, 3), np.uint8), np.zeros(2, np.int64))),
            r"split 'test'.*shape",
        ),
        (dict(train=ImageSplit(x[y != 2], y[y != 2])), r"class 'c2'.*no images in the train split"),
        (dict(classes=["a", "a", "b", "c"]), "not unique"),
    ]
    for change, pattern in cases:
        fields = dict(name=ds.name, classes=ds.classes, train=ds.train, test=ds.test) | change
        with pytest.raises(DataError, match=pattern):
            ImageDataset(**fields)


def test_mean_std_matches_float64_numpy() -> None:
    ds = tiny_dataset(n_train=64)
    mean, std = ds.mean_std()
    ref = ds.train.x.astype(np.float64) / 255
    # Sums of positive float64 terms: 256 histogram bins here, numpy's pairwise sums there; both err by
    # < 300 eps (6.7e-14) whatever the CPU's order, far inside 1e-12 (4500 eps).
    np.testing.assert_allclose(mean, ref.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(std, ref.std(axis=(0, 1, 2)), rtol=1e-12)


def test_validation_split_is_stratified_and_seeded() -> None:
    ds = tiny_dataset(n_train=40)
    v = ds.with_validation_split(0.25, seed=3)
    assert v.counts() == {"train": 32, "test": 10, "val": 8}  # round(0.25 * 10) = 2 per class
    assert np.bincount(v.val.y).tolist() == [2, 2, 2, 2]
    rows = {r.tobytes() for r in np.concatenate([v.train.x, v.val.x])}
    assert rows == {r.tobytes() for r in ds.train.x}
    assert v.sha256() == ds.with_validation_split(0.25, seed=3).sha256()
    assert v.sha256() != ds.with_validation_split(0.25, seed=4).sha256()
    with pytest.raises(DataError, match="already has a validation split"):
        v.with_validation_split(0.1, seed=0)


def test_save_load_roundtrip_and_atomicity(tmp_path: Path, monkeypatch) -> None:
    ds = tiny_dataset(c=1).with_validation_split(0.25, seed=0)
    out = tmp_path / "artifact"
    ds.save(out)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["sha256"] == ds.sha256() and meta["counts"] == ds.counts()
    assert meta["image_shape"] == [8, 8, 1] and len(meta["mean"]) == 1
    back = ImageDataset.load(out)
    assert back.sha256() == ds.sha256() and back.classes == ds.classes and back.val is not None
    ds.save(out)  # re-run over an existing artifact replaces it whole
    assert ImageDataset.load(out).sha256() == ds.sha256()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        tiny_dataset(seed=9).save(tmp_path / "never")
    with pytest.raises(OSError, match="disk full"):
        tiny_dataset(seed=9).save(out)
    monkeypatch.undo()
    assert not (tmp_path / "never").exists()
    assert ImageDataset.load(out).sha256() == ds.sha256()  # the old artifact survived intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]  # no temp folders left

    meta["sha256"] = "0" * 64
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"meta\.json.*'sha256'"):
        ImageDataset.load(out)
    np.savez(out / "test.npz", x=np.array([object()]), y=np.zeros(1))
    with pytest.raises(DataError, match=r"test\.npz"):
        ImageDataset.load(out)
    with pytest.raises(DataError, match="not a saved bockd dataset"):
        ImageDataset.load(tmp_path)


# ---- archives ------------------------------------------------------------------------------------------
def _tar_with(path: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info, payload in members:
            tf.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return path


def _file(name: str, payload: bytes = b"hi") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    return info, payload


def _special(name: str, kind: bytes, link: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info, None


def test_safe_extract_good_archives(tmp_path: Path) -> None:
    tgz = _tar_with(
        tmp_path / "ok.tgz", _file("top/a.txt", b"A"), _special("top/l", tarfile.SYMTYPE, "a.txt")
    )
    out = safe_extract(tgz, tmp_path / "out")
    assert (out / "top" / "a.txt").read_bytes() == b"A" and (out / "top" / "l").read_bytes() == b"A"
    with zipfile.ZipFile(tmp_path / "ok.zip", "w") as zf:
        zf.writestr("d/b.txt", "B")
    assert (safe_extract(tmp_path / "ok.zip", tmp_path / "zout") / "d" / "b.txt").read_text() == "B"


@pytest.mark.parametrize(
    ("member", "pattern"),
    [
        (_file("../evil.txt"), r"'\.\./evil\.txt' escapes"),
        (_file("a/../../evil.txt"), "escapes"),
        (_file("/etc/evil.txt"), "absolute path"),
        (_special("link", tarfile.SYMTYPE, "/etc"), r"'link' is a symlink to '/etc'"),
        (_special("sub/link", tarfile.SYMTYPE, "../../x"), "symlink"),
        (_special("hard", tarfile.LNKTYPE, "../outside"), "hard link"),
        (_special("dev", tarfile.CHRTYPE), "device file"),
    ],
)
def test_safe_extract_refuses_malicious_members(tmp_path: Path, member, pattern: str) -> None:
    archive = _tar_with(tmp_path / "bad.tar.gz", _file("fine.txt"), member)
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match=pattern):
        safe_extract(archive, dest)
    assert not dest.exists() and not (tmp_path / "evil.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar.gz"]


def test_safe_extract_corrupt_archives(tmp_path: Path) -> None:
    big = np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    good = _tar_with(tmp_path / "good.tar.gz", _file("x/big.bin", big))
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[:100_000])
    with pytest.raises(DataError, match=r"cut\.tar\.gz.*corrupt or truncated"):
        safe_extract(cut, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    (tmp_path / "junk.zip").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(DataError, match=r"junk\.zip"):
        safe_extract(tmp_path / "junk.zip", tmp_path / "dest")
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.writestr("../evil.txt", "x")
    with pytest.raises(DataError, match=r"evil\.zip.*'\.\./evil\.txt' escapes"):
        safe_extract(tmp_path / "evil.zip", tmp_path / "dest")
    with pytest.raises(DataError, match=r"absent\.tar"):
        safe_extract(tmp_path / "absent.tar", tmp_path / "dest")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.tar.gz", "evil.zip", "good.tar.gz", "junk.zip"]


# ---- augmentation --------------------------------------------------------------------------------------
def test_pad_for_scales_the_paper_padding() -> None:
    assert [pad_for(s) for s in (8, 28, 32, 64, 224)] == [1, 4, 4, 8, 28]


def test_crop_flip_forced_flip_and_zero_borders() -> None:
    x = torch.randint(1, 256, (3, 5, 6, 2), dtype=torch.uint8)  # no zeros: any zero is padding
    zeros = torch.zeros(3, dtype=torch.long)
    flipped = crop_flip(x, zeros + 2, zeros + 2, torch.ones(3, dtype=torch.bool), pad=2)
    assert torch.equal(flipped, torch.flip(x, dims=[2]))
    shifted = crop_flip(x, zeros + 3, zeros + 0, None, pad=2)  # content moves up 1 row and right 2 columns
    padded = torch.nn.functional.pad(x.permute(0, 3, 1, 2), (2, 2, 2, 2)).permute(0, 2, 3, 1)
    assert torch.equal(shifted, padded[:, 3 : 3 + 5, 0:6])
    assert (shifted[:, -1] == 0).all() and (shifted[:, :, :2] == 0).all() and (shifted[:, :-1, 2:] > 0).all()


def test_augment_batch_is_a_seeded_crop_or_flip_of_each_image() -> None:
    pad = 2
    x = torch.randint(1, 256, (32, 6, 6, 3), dtype=torch.uint8)
    out = augment_batch(x, torch.Generator().manual_seed(0), pad=pad, flip=True)
    assert out.shape == x.shape and out.dtype == torch.uint8
    again = augment_batch(x, torch.Generator().manual_seed(0), pad=pad, flip=True)
    assert torch.equal(out, again)
    padded = torch.nn.functional.pad(x.permute(0, 3, 1, 2), (pad,) * 4).permute(0, 2, 3, 1)
    seen_flip = set()
    for b in range(32):
        matches = [
            (oy, ox, f)
            for oy in range(2 * pad + 1)
            for ox in range(2 * pad + 1)
            for f in (False, True)
            if torch.equal(out[b], (lambda c: c.flip(1) if f else c)(padded[b, oy : oy + 6, ox : ox + 6]))
        ]
        assert len(matches) == 1, b  # exactly one (offset, flip) explains each output
        seen_flip.add(matches[0][2])
    assert seen_flip == {False, True}
    no_flip = augment_batch(x, torch.Generator().manual_seed(1), pad=0, flip=False)
    assert torch.equal(no_flip, x)


def test_to_model_input_normalizes_and_sets_layout() -> None:
    x = torch.randint(0, 256, (2, 4, 5, 3), dtype=torch.uint8)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    out = to_model_input(x, mean, std, channels_last=True)
    ref = (
        x.permute(0, 3, 1, 2).double() / 255 - torch.tensor(mean).double().view(1, 3, 1, 1)
    ) / torch.tensor(std).double().view(1, 3, 1, 1)
    assert out.shape == (2, 3, 4, 5) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    # Three IEEE float32 ops, each correctly rounded on any CPU (error <= eps/2 of its result): x/255,
    # then - mean, both errors scaled by 1/std, then the division's own. Allowing eps per op is a bound.
    scaled = x.permute(0, 3, 1, 2).double() / 255
    mean_t, std_t = torch.tensor(mean).double().view(1, 3, 1, 1), torch.tensor(std).double().view(1, 3, 1, 1)
    bound = torch.finfo(torch.float32).eps * ((scaled + (scaled - mean_t).abs()) / std_t + ref.abs())
    assert ((out.double() - ref).abs() <= bound).all()
    plain = to_model_input(x, mean, std, channels_last=False, dtype=torch.bfloat16)
    assert plain.is_contiguous() and plain.dtype == torch.bfloat16


# ---- BatchLoader ---------------------------------------------------------------------------------------
def indexed_split(n: int = 50, k: int = 5) -> ImageSplit:
    """Images whose first pixel encodes their index, so batches can be traced back to samples."""
    x = np.zeros((n, 4, 4, 1), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(n)
    return ImageSplit(x=x, y=(np.arange(n) % k).astype(np.int64))


def _loader(split: ImageSplit, **kw) -> BatchLoader:
    args = dict(batch_size=8, mean=[0.0], std=[1.0], device=torch.device("cpu"), train=True, seed=0, pad=0)
    return BatchLoader(split, **(args | kw))


def _ids(batches) -> list[int]:
    return [int(v) for xb, _ in batches for v in (xb[:, 0, 0, 0] * 255).round().tolist()]


def test_batch_loader_sees_every_sample_once_and_is_deterministic() -> None:
    split = indexed_split()
    train = _loader(split, flip=False)
    assert len(train) == 7 and len(_loader(split, drop_last=True)) == 6
    e0 = _ids(train.epoch(0))
    assert sorted(e0) == list(range(50)) and e0 != list(range(50))
    assert _ids(train.epoch(0)) == e0  # replay after a "resume"
    assert _ids(_loader(split, flip=False).epoch(0)) == e0  # a fresh loader, same seed
    assert _ids(train.epoch(1)) != e0 and sorted(_ids(train.epoch(1))) == list(range(50))
    assert _ids(_loader(split, flip=False, seed=1).epoch(0)) != e0
    dropped = _ids(_loader(split, flip=False, drop_last=True).epoch(0))
    assert len(dropped) == 48 and len(set(dropped)) == 48
    labels = [int(v) for _, yb in train.epoch(0) for v in yb]
    assert labels == [i % 5 for i in e0]
    ev = _loader(split, train=False, pad=2, drop_last=True)
    assert len(ev) == 7 and _ids(ev.epoch(3)) == list(range(50))  # ordered, no aug, no drop


def test_batch_loader_workers_do_not_change_batches() -> None:
    ds = tiny_dataset(n_train=60, seed=2)
    mean, std = ds.mean_std()
    kw = dict(batch_size=16, mean=mean, std=std, pad=2, flip=True, seed=5)
    a = list(_loader(ds.train, num_workers=0, channels_last=True, **kw).epoch(4))
    w = _loader(ds.train, num_workers=2, channels_last=True, **kw)
    b = list(w.epoch(4))
    assert len(a) == len(b) == 4
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and ya.dtype == torch.int64
        assert xb.is_contiguous(memory_format=torch.channels_last)
    c = list(w.epoch(5))  # persistent workers pick up the next epoch
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, c, strict=True))
    assert [torch.equal(x1, x2) for (x1, _), (x2, _) in zip(list(w.epoch(4)), a, strict=True)] == [True] * 4


def test_batch_loader_normalization_is_standard_on_train() -> None:
    ds = load_dataset("digits")
    mean, std = ds.mean_std()
    loader = BatchLoader(
        ds.train, batch_size=256, mean=mean, std=std, device=torch.device("cpu"), train=False, seed=0, pad=1
    )
    allx = torch.cat([xb for xb, _ in loader.epoch(0)])
    assert allx.shape == (1438, 1, 8, 8)
    assert abs(allx.double().mean().item()) < 1e-5 and abs(allx.double().std().item() - 1) < 1e-3


def test_resident_path_matches_host_path_on_cpu() -> None:
    # The CUDA code path (split resident on the device, one re-seeded generator) run on the CPU must give
    # exactly the host path's batches: only the device differs on a GPU.
    ds = tiny_dataset(n_train=60, seed=3)
    for train in (True, False):
        loader = _loader(ds.train, batch_size=16, pad=2, train=train, seed=4, mean=[0.5] * 3, std=[0.2] * 3)
        loader._make_resident()
        resident = list(loader._resident_epoch(2))
        host = list(loader.epoch(2))
        assert len(resident) == len(host) == 4
        for (xa, ya), (xb, yb) in zip(resident, host, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batch_loader_cuda_matches_cpu_order() -> None:
    split = indexed_split()
    cpu = _ids(_loader(split, flip=False).epoch(2))
    gpu_loader = _loader(split, flip=False, device=torch.device("cuda"))
    batches = list(gpu_loader.epoch(2))
    assert all(xb.is_cuda and yb.is_cuda for xb, yb in batches)
    assert _ids(batches) == cpu
    aug = _loader(split, pad=1, device=torch.device("cuda"))
    assert all(torch.equal(p[0], q[0]) for p, q in zip(aug.epoch(1), aug.epoch(1), strict=True))
