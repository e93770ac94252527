"""Raw client images -> the normalized float NCHW batch a student expects, driven by its config.json only.

Accepted images (each is resized to the config's H x W with PIL bilinear and converted to its channel count,
grey <-> RGB with PIL's ITU-R 601 luma, only when it does not match already):

* V1 ``{"instances": [...]}``, one instance per image:
  - a nested list of **ints** 0..255: uint8 pixels, HWC (``[H, W, C]``, C = 1 or 3, or ``[H, W]`` for grey);
  - a nested list of **floats** in [0, 1]: pixels already scaled by 1/255, CHW (``[C, H, W]`` or ``[H, W]``);
    the JSON number type decides, so ``255.0`` is a float and rejected (out of range);
  - ``{"b64": "<base64 of a PNG or JPEG file>"}``.
* V2 (Open Inference Protocol), exactly one input tensor (any name):
  - ``FP32 [N, C, H, W]`` pixels in [0, 1] (not normalized);
  - ``UINT8 [N, H, W, C]``;
  - ``BYTES [N]`` each element one base64 PNG/JPEG (a JSON string cannot hold raw image bytes; raw ``bytes``
    elements, as gRPC or in-process callers may send, are taken as the encoded file itself).

Every malformed input raises ``kserve.errors.InvalidInput`` (HTTP 400) naming the image and the problem.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferInput, InferRequest
from PIL import Image

from bockd.errors import CheckpointError

MAX_IMAGE_BYTES = 8 * 1024 * 1024  # per encoded image (PNG/JPEG), checked before decoding
MAX_PIXELS = 4096 * 4096  # per image, any source: guards against decompression bombs and giant arrays
_MAX_B64_CHARS = 4 * math.ceil(MAX_IMAGE_BYTES / 3)
_LUMA = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)  # what PIL's convert("L") uses
_FORMATS = ["PNG", "JPEG"]
V2_DATATYPES = ("FP32", "UINT8", "BYTES")


@dataclass(frozen=True)
class InputSpec:
    """What the network wants: channels, height, width, per-channel mean/std (pixel units in [0, 1])."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str = "config.json") -> InputSpec:
        try:
            c, h, w = (int(v) for v in config["input_shape"])
            mean = tuple(float(v) for v in config["mean"])
            std = tuple(float(v) for v in config["std"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{where}: input_shape/mean/std missing or malformed: {err}") from err
        if c not in (1, 3) or h < 1 or w < 1:
            raise CheckpointError(f"{where}: input_shape {[c, h, w]} is not [1 or 3, H, W]")
        if len(mean) != c or len(std) != c or not all(s > 0 for s in std):
            raise CheckpointError(f"{where}: mean/std need {c} values each (std > 0), got {mean} / {std}")
        return cls(c, h, w, mean, std)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def normalize(self, x01: np.ndarray) -> np.ndarray:
        """[N, C, H, W] in [0, 1] -> (x - mean) / std, float32, exactly as the training pipeline did."""
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, -1, 1, 1)
        return np.ascontiguousarray((x01.astype(np.float32) - mean) / std, dtype=np.float32)


# -- one image --------------------------------------------------------------------------------------------


def _check_pixels(h: int, w: int, what: str) -> None:
    if h < 1 or w < 1:
        raise InvalidInput(f"{what}: empty image ({h}x{w})")
    if h * w > MAX_PIXELS:
        raise InvalidInput(f"{what}: {w}x{h} pixels is over the limit of {MAX_PIXELS} (4096x4096)")


def _fit_pil(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """Any PIL image -> uint8 HWC with the spec's channels and size."""
    img = img.convert("L" if spec.channels == 1 else "RGB")
    if img.size != (spec.width, spec.height):
        img = img.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def from_uint8_hwc(arr: np.ndarray, spec: InputSpec, what: str) -> np.ndarray:
    """uint8 [H, W, C] (or [H, W]) -> float32 CHW in [0, 1] at the spec's shape."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise InvalidInput(f"{what}: uint8 image must be [H, W, C] with C = 1 or 3, got {list(arr.shape)}")
    h, w, c = arr.shape
    _check_pixels(h, w, what)
    if (c, h, w) != spec.shape:  # only touch pixels that need it: a matching image is used bit-exact
        arr = _fit_pil(Image.fromarray(arr[..., 0] if c == 1 else arr), spec)
    return arr.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)


def from_float_chw(arr: np.ndarray, spec: InputSpec, what: str) -> np.ndarray:
    """float [C, H, W] (or [H, W]) in [0, 1] -> float32 CHW at the spec's shape."""
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] not in (1, 3):
        raise InvalidInput(f"{what}: float image must be [C, H, W] with C = 1 or 3, got {list(arr.shape)}")
    c, h, w = arr.shape
    _check_pixels(h, w, what)
    arr = arr.astype(np.float32)
    if c != spec.channels:
        arr = np.tensordot(_LUMA, arr, axes=1)[None] if spec.channels == 1 else np.repeat(arr, 3, axis=0)
    if (h, w) != (spec.height, spec.width):
        size = (spec.width, spec.height)
        planes = [np.asarray(Image.fromarray(p).resize(size, Image.Resampling.BILINEAR)) for p in arr]
        arr = np.clip(np.stack(planes), 0.0, 1.0)
    return np.ascontiguousarray(arr, dtype=np.float32)


def from_encoded(data: bytes, spec: InputSpec, what: str) -> np.ndarray:
    """PNG/JPEG file bytes -> float32 CHW in [0, 1]. Size and pixel count are checked before decoding."""
    if not data:
        raise InvalidInput(f"{what}: empty image bytes")
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidInput(f"{what}: encoded image is {len(data)} bytes, over the limit of {MAX_IMAGE_BYTES}")
    try:
        img = Image.open(io.BytesIO(data), formats=_FORMATS)
        w, h = img.size
    except Exception as err:  # PIL raises many types for garbage (OSError, SyntaxError, ValueError, ...)
        raise InvalidInput(f"{what}: cannot decode the image as PNG or JPEG: {err}") from None
    _check_pixels(h, w, what)  # from the header alone: a bomb is refused before its pixels are inflated
    try:
        img.load()
        arr = _fit_pil(img, spec)
    except Exception as err:
        raise InvalidInput(f"{what}: cannot decode the image as PNG or JPEG: {err}") from None
    return arr.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)


def decode_b64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise InvalidInput(f"{what}: base64 image must be a string, got {type(text).__name__}")
    if len(text) > _MAX_B64_CHARS:
        raise InvalidInput(
            f"{what}: base64 image is {len(text)} characters, over the limit for {MAX_IMAGE_BYTES} bytes"
        )
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidInput(f"{what}: not valid base64: {err}") from None


def _as_array(data: Any, what: str) -> np.ndarray:
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError) as err:
        raise InvalidInput(f"{what}: not a rectangular array of numbers: {err}") from None
    if arr.dtype.kind not in "iuf":
        raise InvalidInput(f"{what}: pixel values must be numbers, got {arr.dtype.kind!r} data ({arr.dtype})")
    return arr


def check_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype.kind not in "iu":
        raise InvalidInput(f"{what}: uint8 pixels must be integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise InvalidInput(f"{what}: uint8 values out of range 0..255 (min {arr.min()}, max {arr.max()})")
    return arr.astype(np.uint8)


def check_unit_float(arr: np.ndarray, what: str) -> np.ndarray:
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise InvalidInput(f"{what}: pixel values contain NaN or infinity")
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise InvalidInput(
            f"{what}: float pixel values out of range [0, 1] (min {arr.min():g}, max {arr.max():g}); "
            "send ints 0..255 for uint8 HWC images"
        )
    return arr.astype(np.float32)


def _check_batch(n: int, max_batch: int) -> None:
    if n == 0:
        raise InvalidInput("empty batch: send at least one image")
    if n > max_batch:
        raise InvalidInput(f"batch of {n} images is larger than max_batch {max_batch}")


# -- V1: {"instances": [...]} --------------------------------------------------------------------------------


def _v1_instance(instance: Any, spec: InputSpec, what: str) -> np.ndarray:
    if isinstance(instance, dict):
        if set(instance) != {"b64"}:
            raise InvalidInput(f'{what}: an object instance must be {{"b64": "<base64 PNG/JPEG>"}} only')
        return from_encoded(decode_b64(instance["b64"], what), spec, what)
    if not isinstance(instance, list):
        raise InvalidInput(
            f"{what}: expected a nested list (uint8 HWC ints or [0, 1] CHW floats) or "
            f'{{"b64": ...}}, got {type(instance).__name__}'
        )
    arr = _as_array(instance, what)
    if arr.ndim not in (2, 3):
        raise InvalidInput(f"{what}: expected a 2-D or 3-D nested list, got shape {list(arr.shape)}")
    if arr.dtype.kind in "iu":
        return from_uint8_hwc(check_uint8(arr, what), spec, what)
    return from_float_chw(check_unit_float(arr, what), spec, what)


def batch_from_v1(payload: Any, spec: InputSpec, max_batch: int) -> np.ndarray:
    """A V1 request body -> normalized float32 [N, C, H, W]."""
    if not isinstance(payload, dict):
        raise InvalidInput(f'expected a JSON object {{"instances": [...]}}, got {type(payload).__name__}')
    if "instances" not in payload:
        raise InvalidInput('missing "instances": expected {"instances": [image, ...]}')
    instances = payload["instances"]
    if not isinstance(instances, list):
        raise InvalidInput(f'"instances" must be a list, got {type(instances).__name__}')
    _check_batch(len(instances), max_batch)
    x = [_v1_instance(inst, spec, f"instance {i}") for i, inst in enumerate(instances)]
    return spec.normalize(np.stack(x))


# -- V2: one tensor ------------------------------------------------------------------------------------------


def _v2_shape(inp: InferInput) -> list[int]:
    shape = inp.shape
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidInput(f"input {inp.name!r}: shape must be a list of non-negative ints, got {shape!r}")
    return list(shape)


def _v2_values(inp: InferInput, shape: list[int], what: str) -> np.ndarray:
    """The tensor's values as an array of ``shape``, without trusting the declared datatype for conversion."""
    data = inp.data
    if isinstance(data, (list, tuple)):
        arr = _as_array(data, what) if data else np.zeros(0, dtype=np.float32)
    else:  # raw binary (in-process or gRPC callers): kserve's own decoding
        try:
            arr = inp.as_numpy()
        except Exception as err:
            raise InvalidInput(f"{what}: cannot read the tensor data: {err}") from None
    need = math.prod(shape)
    if arr.size != need:
        raise InvalidInput(f"{what}: has {arr.size} values but shape {shape} needs {need}")
    return arr.reshape(shape)


def _v2_bytes_items(inp: InferInput, n: int, what: str) -> list[Any]:
    data = inp.data
    if not isinstance(data, (list, tuple)):
        try:
            data = inp.as_numpy().ravel().tolist()
        except Exception as err:
            raise InvalidInput(f"{what}: cannot read the BYTES data: {err}") from None
    items = [x for row in data for x in (row if isinstance(row, (list, tuple)) else [row])]
    if len(items) != n:
        raise InvalidInput(f"{what}: has {len(items)} BYTES elements but shape says {n}")
    return items


def batch_from_v2(request: InferRequest, spec: InputSpec, max_batch: int) -> np.ndarray:
    """A V2 InferRequest -> normalized float32 [N, C, H, W]."""
    inputs = request.inputs or []
    if len(inputs) != 1:
        names = [getattr(i, "name", "?") for i in inputs]
        raise InvalidInput(f"expected exactly one input tensor, got {len(inputs)} {names}")
    inp = inputs[0]
    what = f"input {inp.name!r}"
    dtype = str(inp.datatype).upper()
    shape = _v2_shape(inp)
    expected = {"FP32": "[N, C, H, W]", "UINT8": "[N, H, W, C]", "BYTES": "[N]"}
    if dtype not in expected:
        raise InvalidInput(
            f"{what}: datatype {dtype} is not supported; send FP32 [N, C, H, W] in [0, 1], "
            "UINT8 [N, H, W, C] or BYTES [N] (base64 PNG/JPEG)"
        )
    rank = 1 if dtype == "BYTES" else 4
    if len(shape) != rank and not (dtype == "BYTES" and len(shape) == 2 and shape[1] == 1):
        raise InvalidInput(f"{what}: {dtype} shape must be {expected[dtype]}, got {shape}")
    n = shape[0]
    _check_batch(n, max_batch)
    if dtype == "BYTES":
        items = _v2_bytes_items(inp, n, what)
        x = []
        for i, item in enumerate(items):
            where = f"{what}[{i}]"
            x.append(from_encoded(item if isinstance(item, bytes) else decode_b64(item, where), spec, where))
        return spec.normalize(np.stack(x))
    h, w = (shape[2], shape[3]) if dtype == "FP32" else (shape[1], shape[2])
    _check_pixels(h, w, what)
    arr = _v2_values(inp, shape, what)
    if dtype == "UINT8":
        arr = check_uint8(arr, what)
        x = [from_uint8_hwc(img, spec, f"{what}[{i}]") for i, img in enumerate(arr)]
    else:
        arr = check_unit_float(arr, what)
        x = [from_float_chw(img, spec, f"{what}[{i}]") for i, img in enumerate(arr)]
    return spec.normalize(np.stack(x))
