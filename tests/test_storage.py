"""S3 data sources and checkpoints against the real embedded S3 server (SeaweedFS `weed mini`)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from bockd.data import ImageDataset
from bockd.errors import DataError
from bockd.pipeline import steps
from bockd.platform.s3 import S3Uri, _relative_key, client, delete_prefix, download_prefix, upload_folder
from bockd.platform.services import ServicesInfo


def _put(info: ServicesInfo, key: str, data: bytes) -> None:
    client().put_object(info.bucket, key, io.BytesIO(data), len(data))


@pytest.fixture(scope="module")
def cifar_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 train / 100 test seeded random 32x32 RGB images (10 balanced classes) in the npz layout bockd
    reads for CIFAR-10: the test is about S3, so the pixels need not be real ones."""
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("cifar10-slice")
    for split, n in (("train", 300), ("test", 100)):
        x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        np.savez(out / f"cifar10_{split}.npz", x=x, y=np.arange(n, dtype=np.int64) % 10)
    return out


def test_s3_uri_parsing() -> None:
    assert S3Uri.parse("s3://bucket/a/b") == S3Uri("bucket", "a/b")
    assert S3Uri.parse("s3://bucket") == S3Uri("bucket", "")
    with pytest.raises(DataError, match=r"data\.path: expected s3://bucket"):
        S3Uri.parse("/local/path", "data.path")


def test_prepare_data_reads_an_s3_prefix(
    mlflow_stack: ServicesInfo, cifar_slice: Path, tmp_path: Path
) -> None:
    keys = upload_folder(cifar_slice, "s3://bockd/datasets/cifar10-slice")
    assert sorted(keys) == [
        "datasets/cifar10-slice/cifar10_test.npz",
        "datasets/cifar10-slice/cifar10_train.npz",
    ]
    config = {"preset": "smoke", "data": {"dataset": "cifar10", "path": "s3://bockd/datasets/cifar10-slice"}}
    meta = steps.prepare_data(config, tmp_path / "prepared")
    assert meta["counts"] == {"train": 300, "test": 100}
    prepared = ImageDataset.load(tmp_path / "prepared")
    with np.load(cifar_slice / "cifar10_test.npz") as npz:
        np.testing.assert_array_equal(prepared.test.x, npz["x"])


def test_single_object_downloads_as_a_file(mlflow_stack: ServicesInfo, tmp_path: Path) -> None:
    _put(mlflow_stack, "single/archive.tar.gz", b"not really an archive")
    got = download_prefix("s3://bockd/single/archive.tar.gz", tmp_path / "dl")
    assert got == tmp_path / "dl" / "archive.tar.gz"
    assert got.read_bytes() == b"not really an archive"


@pytest.mark.parametrize("key", ["data/../../outside.txt", "data//etc/passwd/..", "data/"])
def test_keys_that_would_escape_the_folder_are_refused(key: str) -> None:
    """Another S3 client can store keys with '..' segments (minio's refuses to write them, so the guard is
    exercised directly): such a key must never become a path outside the download folder."""
    with pytest.raises(DataError, match="outside the download folder"):
        _relative_key(key, "data")
    assert _relative_key("data/sub/file.npz", "data").parts == ("sub", "file.npz")


def test_missing_prefix_and_bucket_are_clear_errors(mlflow_stack: ServicesInfo, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no objects under"):
        download_prefix("s3://bockd/does-not-exist/", tmp_path / "dl")
    with pytest.raises(DataError, match="bucket 'nope' does not exist"):
        download_prefix("s3://nope/x", tmp_path / "dl")


def test_delete_prefix_removes_that_folder_only(mlflow_stack: ServicesInfo) -> None:
    for key in ("stage/run-1/a.bin", "stage/run-1/sub/b.bin", "stage/run-10/c.bin", "stage/other.bin"):
        _put(mlflow_stack, key, b"x")
    assert delete_prefix(f"s3://{mlflow_stack.bucket}/stage/run-1") == 2
    listed = client().list_objects(mlflow_stack.bucket, prefix="stage/", recursive=True)
    left = {o.object_name for o in listed}
    assert left == {"stage/run-10/c.bin", "stage/other.bin"}
    assert delete_prefix(f"s3://{mlflow_stack.bucket}/stage/run-1/") == 0  # nothing left: not an error
    with pytest.raises(DataError, match="refusing to empty the whole bucket"):
        delete_prefix(f"s3://{mlflow_stack.bucket}/")
    assert {o.object_name for o in client().list_objects(mlflow_stack.bucket, recursive=True)} >= left


def test_checkpoint_sync_round_trip(mlflow_stack: ServicesInfo, tmp_path: Path) -> None:
    sync = steps.S3CheckpointSync("s3://bockd/checkpoints/test-run/ensemble")
    assert sync.restore(tmp_path) is False  # nothing there yet: start from scratch
    ckpt = tmp_path / "written" / "checkpoint.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"checkpoint bytes")
    sync.on_checkpoint(None, ckpt)
    restored = tmp_path / "restored"
    restored.mkdir()
    assert sync.restore(restored) is True
    assert (restored / "checkpoint.pt").read_bytes() == b"checkpoint bytes"
