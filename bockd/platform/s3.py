"""S3 access for data sources and checkpoints, through the `minio` client (it talks to any S3 server).

The endpoint and credentials come from the environment (on a cluster, a Kubernetes Secret mounted as
variables): ``BOCKD_S3_ENDPOINT`` (or ``AWS_ENDPOINT_URL`` / ``MLFLOW_S3_ENDPOINT_URL``),
``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY``. They are never parameters, so they never reach logs
or compiled pipelines.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from bockd.atomic import atomic_dir
from bockd.errors import DataError
from bockd.platform.credentials import ACCESS_KEY_ID, SECRET_ACCESS_KEY

if TYPE_CHECKING:
    from minio import Minio

ENDPOINT_VARS = ("BOCKD_S3_ENDPOINT", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    prefix: str  # no leading slash; "" for the whole bucket

    @classmethod
    def parse(cls, uri: str, field: str = "uri") -> S3Uri:
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise DataError(f"{field}: expected s3://bucket[/prefix], got {uri!r}")
        return cls(parsed.netloc, parsed.path.lstrip("/"))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def is_s3_uri(value: str | os.PathLike[str] | None) -> bool:
    return isinstance(value, str) and value.startswith("s3://")


def endpoint_from_env() -> str | None:
    return next((os.environ[v] for v in ENDPOINT_VARS if os.environ.get(v)), None)


def client(endpoint: str | None = None) -> Minio:
    """A minio client for ``endpoint`` (default: from the environment) with the environment's credentials."""
    from minio import Minio

    endpoint = endpoint or endpoint_from_env()
    if not endpoint:
        raise DataError(
            f"S3 endpoint: none given and none of {', '.join(ENDPOINT_VARS)} is set "
            "(expected e.g. http://seaweedfs.kubeflow:9000, Kubeflow's own object store)"
        )
    parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise DataError(f"S3 endpoint: expected http(s)://host:port, got {endpoint!r}")
    return Minio(
        parsed.netloc,
        access_key=os.environ.get(ACCESS_KEY_ID),
        secret_key=os.environ.get(SECRET_ACCESS_KEY),
        secure=parsed.scheme == "https",
        region=os.environ.get("AWS_DEFAULT_REGION") or None,
    )


def check_bucket(uri: str, field: str = "uri", endpoint: str | None = None) -> S3Uri:
    """Fail with a message naming ``field`` unless the bucket of ``uri`` exists and can be read."""
    from minio.error import S3Error

    loc = S3Uri.parse(uri, field)
    try:
        exists = client(endpoint).bucket_exists(loc.bucket)
    except S3Error as e:
        raise DataError(f"{field}: cannot read bucket {loc.bucket!r}: {e.code}") from e
    if not exists:
        raise DataError(f"{field}: the S3 bucket {loc.bucket!r} does not exist (from {uri!r})")
    return loc


def _relative_key(key: str, prefix: str) -> PurePosixPath:
    rel = PurePosixPath(key[len(prefix) :].lstrip("/"))
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise DataError(f"S3 object {key!r} would be written outside the download folder; refusing it")
    return rel


def download_prefix(uri: str, dest: str | os.PathLike[str], endpoint: str | None = None) -> Path:
    """Copy every object under ``uri`` into ``dest`` (created whole or not at all).

    Returns ``dest``, or ``dest/<name>`` when ``uri`` names one object (``s3://b/cifar-10-python.tar.gz``).
    """
    loc = check_bucket(uri, "data source", endpoint)
    minio = client(endpoint)
    objects = [o for o in minio.list_objects(loc.bucket, prefix=loc.prefix, recursive=True) if not o.is_dir]
    if not objects:
        raise DataError(f"data source: no objects under {uri!r}")
    single = len(objects) == 1 and objects[0].object_name == loc.prefix
    base = loc.prefix.rsplit("/", 1)[0] if single else loc.prefix
    dest = Path(dest)
    with atomic_dir(dest, DataError) as tmp:
        for obj in objects:
            target = tmp.joinpath(*_relative_key(obj.object_name, base).parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            minio.fget_object(loc.bucket, obj.object_name, str(target))
    return dest / PurePosixPath(loc.prefix).name if single else dest


def upload_folder(folder: str | os.PathLike[str], uri: str, endpoint: str | None = None) -> list[str]:
    """Upload every file under ``folder`` to ``uri``/<relative path>; returns the object keys written."""
    loc = check_bucket(uri, "destination", endpoint)
    minio = client(endpoint)
    keys = []
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        key = str(PurePosixPath(loc.prefix) / path.relative_to(root).as_posix()).lstrip("/")
        minio.fput_object(loc.bucket, key, str(path))
        keys.append(key)
    return keys


def delete_prefix(uri: str, endpoint: str | None = None) -> int:
    """Delete every object under the folder ``uri`` (``s3://bucket/a/b`` removes ``a/b/...``, never
    ``a/bc``); returns how many. A whole bucket is refused: a prefix must be given."""
    from minio.deleteobjects import DeleteObject

    loc = check_bucket(uri, "staging", endpoint)
    prefix = loc.prefix.strip("/")
    if not prefix:
        raise DataError(f"staging: refusing to empty the whole bucket {loc.bucket!r}; give a prefix")
    minio = client(endpoint)
    names = [o.object_name for o in minio.list_objects(loc.bucket, prefix=f"{prefix}/", recursive=True)]
    errors = list(minio.remove_objects(loc.bucket, (DeleteObject(n) for n in names)))
    if errors:
        raise DataError(f"staging: could not delete {len(errors)} object(s) under {uri!r}: {errors[0]}")
    return len(names)


def put_json(uri: str, value: Any, endpoint: str | None = None) -> None:
    """Write ``value`` as one JSON object at ``uri`` (its bucket must exist)."""
    loc = check_bucket(uri, "destination", endpoint)
    data = json.dumps(value, indent=2, sort_keys=True).encode()
    client(endpoint).put_object(
        loc.bucket, loc.prefix, io.BytesIO(data), len(data), content_type="application/json"
    )


def get_json(uri: str, endpoint: str | None = None) -> Any:
    """The JSON object at ``uri``."""
    loc = S3Uri.parse(uri)
    response = client(endpoint).get_object(loc.bucket, loc.prefix)
    try:
        return json.loads(response.read())
    finally:
        response.close()
        response.release_conn()
