"""Readiness probes. Exceptions are swallowed on purpose: a probe answers yes or no, never leaks details."""

from __future__ import annotations

import urllib.error
import urllib.request

import minio
import urllib3

from bockd.platform.services.state import Credentials

# A local probe must never go through an HTTP proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def s3_client(endpoint: str, creds: Credentials, *, probe: bool = False) -> minio.Minio:
    host = endpoint.removeprefix("http://")
    # A probe asks once and quickly: minio's default client retries 5 times with a warning each time.
    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=2, read=5), retries=False) if probe else None
    return minio.Minio(
        host, access_key=creds.access_key, secret_key=creds.secret_key, secure=False, http_client=http
    )


def s3_ready(endpoint: str, creds: Credentials) -> bool:
    try:
        s3_client(endpoint, creds, probe=True).list_buckets()
    except Exception:
        return False
    return True


def ensure_bucket(endpoint: str, creds: Credentials, bucket: str) -> None:
    client = s3_client(endpoint, creds)
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def mlflow_ready(uri: str) -> bool:
    return http_ok(uri.rstrip("/") + "/health")
