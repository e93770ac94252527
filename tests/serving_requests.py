"""Request bodies and an in-process DataPlane round trip shared by the model-server tests
(test_serving, test_serving_robustness, test_cascade): the formats a client sends and the malformed
requests every model must refuse with InvalidInput."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
from typing import Any

import numpy as np
from kserve.model_repository import ModelRepository
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.rest.v2_datamodels import InferenceRequest
from PIL import Image

from bockd.serving.preprocess import _MAX_B64_CHARS

# The max_batch the tests' models are built with (StudentModel's default).
MAX_BATCH = 256


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def v2_body(images: np.ndarray, kind: str) -> dict[str, Any]:
    n = len(images)
    if kind == "FP32":
        x = images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        return {
            "inputs": [
                {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
            ]
        }
    if kind == "UINT8":
        return {
            "inputs": [
                {
                    "name": "img",
                    "shape": list(images.shape),
                    "datatype": "UINT8",
                    "data": images.ravel().tolist(),
                }
            ]
        }
    return {
        "inputs": [
            {"name": "png", "shape": [n], "datatype": "BYTES", "data": [b64(png_bytes(i)) for i in images]}
        ]
    }


def in_process(model: Any, body: Any, v2: bool = False) -> Any:
    """Through kserve's own DataPlane: decode -> infer (preprocess/predict/postprocess) -> encode."""
    repo = ModelRepository()
    repo.update(model)
    plane = DataPlane(model_registry=repo)

    async def go() -> Any:
        raw = InferenceRequest.model_validate(body) if v2 else json.dumps(body).encode()
        request, _ = plane.decode(raw, {}, protocol_version="v2" if v2 else "v1", model_name=model.name)
        response, _ = await plane.infer(model.name, request, {})
        encoded, _ = plane.encode(model.name, response, {}, {})
        return encoded

    return asyncio.run(go())


def v2_outputs(response: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {out["name"]: out for out in response["outputs"]}


def grey(value: Any = 0, h: int = 8, w: int = 8) -> list:
    return [[[value] for _ in range(w)] for _ in range(h)]


def bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, format="PNG")  # ~25 MPixel from a few KiB
    return buf.getvalue()


def fp32(shape: list[int], data: list, **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": data}], **extra}


def standard_json(body: Any) -> bool:
    """Whether ``body`` is JSON without the NaN / Infinity that Python's json writes and parsers refuse."""
    try:
        json.dumps(body, allow_nan=False)
    except ValueError:
        return False
    return True


def bad_requests(images: np.ndarray) -> list[tuple[str, Any, str]]:
    """(protocol, body, fragment the error message must contain) for many kinds of malformed requests."""
    good_png = png_bytes(images[0])
    ones = [0.5] * 64
    v1 = [
        ({}, 'missing "instances"'),
        ({"inputs": [grey()]}, 'missing "instances"'),
        ({"instances": []}, "empty batch"),
        ({"instances": "x"}, '"instances" must be a list'),
        ([1, 2, 3], "expected a JSON object"),
        ({"instances": [[1, 2, 3]]}, "2-D or 3-D"),
        ({"instances": [grey(300)]}, "out of range 0..255"),
        ({"instances": [grey(-1)]}, "out of range 0..255"),
        ({"instances": [grey(1.5)]}, "out of range [0, 1]"),
        ({"instances": [[[[1], [2]], [[3]]]]}, "rectangular"),
        ({"instances": [grey("a")]}, "must be numbers"),
        ({"instances": [grey(True)]}, "must be numbers"),
        ({"instances": [None]}, "expected a nested list"),
        ({"instances": [5]}, "expected a nested list"),
        ({"instances": [[[[0, 0]] * 8] * 8]}, "C = 1 or 3"),
        ({"instances": [[[[0.0] * 8] * 8] * 2]}, "C = 1 or 3"),
        ({"instances": [{"b64": "!!not base64!!"}]}, "not valid base64"),
        ({"instances": [{"b64": b64(b"hello, not an image")}]}, "cannot decode the image"),
        ({"instances": [{"b64": b64(good_png[: len(good_png) // 2])}]}, "cannot decode the image"),
        ({"instances": [{"b64": 5}]}, "must be a string"),
        ({"instances": [{"b64": b64(good_png), "extra": 1}]}, '"b64"'),
        ({"instances": [{"url": "http://x"}]}, '"b64"'),
        ({"instances": [{"b64": b64(bomb_png())}]}, "over the limit"),
        ({"instances": [{"b64": "A" * (_MAX_B64_CHARS + 4)}]}, "over the limit"),
        ({"instances": [grey(0, 1, 0)]}, "empty image"),
        ({"instances": [grey()] * (MAX_BATCH + 1)}, "256 images per request (max_batch)"),
    ]
    v2 = [
        ({"inputs": []}, "exactly one input tensor"),
        ({"inputs": [fp32([1, 1, 8, 8], ones)["inputs"][0]] * 2}, "exactly one input tensor"),
        ({"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "INT32", "data": [0] * 64}]}, "INT32"),
        (fp32([1, 8, 8], ones), "shape must be [N, C, H, W]"),
        (fp32([1, 1, 8, 8], ones[:63]), "has 63 values but shape"),
        (fp32([1, 1, 8, 8], [2.0] * 64), "out of range [0, 1]"),
        (fp32([1, 1, 8, 8], [math.nan] * 64), "NaN"),
        (fp32([1, 1, 8, 8], [math.inf] * 64), "NaN or infinity"),
        (fp32([1, 1, 8, 8], ["a"] * 64), "must be numbers"),
        (fp32([0, 1, 8, 8], []), "empty batch"),
        (fp32([MAX_BATCH + 1, 1, 8, 8], [0.0] * 64), "256 images per request (max_batch)"),
        (fp32([-1, 1, 8, 8], ones), "non-negative ints"),
        (fp32([1, 2, 8, 8], ones * 2), "C = 1 or 3"),
        (fp32([1, 1, 8, 8], ones, outputs=[{"name": "logits"}]), "unknown output 'logits'"),
        (
            {"inputs": [{"name": "u", "shape": [1, 8, 8, 1], "datatype": "UINT8", "data": [256] * 64}]},
            "0..255",
        ),
        ({"inputs": [{"name": "u", "shape": [1, 8, 8, 1], "datatype": "UINT8", "data": ones}]}, "integers"),
        (
            {"inputs": [{"name": "u", "shape": [1, 5000, 5000, 1], "datatype": "UINT8", "data": [0]}]},
            "over the limit",
        ),
        ({"inputs": [{"name": "b", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]}, "not valid base64"),
        (
            {"inputs": [{"name": "b", "shape": [1], "datatype": "BYTES", "data": [b64(b"GIF89a")]}]},
            "cannot decode",
        ),
        (
            {"inputs": [{"name": "b", "shape": [2], "datatype": "BYTES", "data": [b64(good_png)]}]},
            "BYTES elements",
        ),
        (
            {"inputs": [{"name": "b", "shape": [1, 2], "datatype": "BYTES", "data": ["a", "b"]}]},
            "BYTES shape",
        ),
    ]
    return [("v1", body, frag) for body, frag in v1] + [("v2", body, frag) for body, frag in v2]
