"""A tiny V1 client for the model server (urllib only, no extra dependencies)."""

from __future__ import annotations

import base64
import contextlib
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bockd.serving.errors import ServingError

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# A server on this machine must never be reached through an HTTP proxy from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_DEFAULT = urllib.request.build_opener()


def post_json(url: str, body: Any, timeout: float = 30) -> Any:
    """POST ``body`` as JSON and return the decoded answer; an HTTP error carries the server's message."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    opener = _DIRECT if urllib.parse.urlsplit(url).hostname in _LOOPBACK else _DEFAULT
    try:
        with opener.open(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")
        with contextlib.suppress(ValueError, AttributeError):
            detail = json.loads(detail).get("error", detail)
        raise ServingError(f"{url}: HTTP {err.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as err:
        raise ServingError(f"{url}: cannot reach the model server: {err}") from None


def v1_url(url: str, name: str) -> str:
    return f"{url.rstrip('/')}/v1/models/{name}:predict"


def predict_v1(url: str, name: str, images: Sequence[np.ndarray], timeout: float = 30) -> list[dict]:
    """Classify uint8 HWC (or HW) images; one ``{"probabilities", "top_k"}`` dict per image."""
    instances = []
    for i, img in enumerate(images):
        arr = np.asarray(img)
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
            raise ValueError(f"image {i}: expected a uint8 HWC array, got {arr.dtype} {list(arr.shape)}")
        instances.append(arr.tolist())
    return post_json(v1_url(url, name), {"instances": instances}, timeout)["predictions"]


def predict_files(url: str, name: str, paths: Sequence[str | Path], timeout: float = 30) -> list[dict]:
    """Classify PNG/JPEG files, sent as base64 instances."""
    instances = [{"b64": base64.b64encode(Path(p).read_bytes()).decode("ascii")} for p in paths]
    return post_json(v1_url(url, name), {"instances": instances}, timeout)["predictions"]
