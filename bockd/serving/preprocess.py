"""Raw client images -> the normalized float NCHW batch a student expects, driven by its config.json only.

Accepted images (each is resized to the config's H x W with PIL bilinear and converted to its channel count,
grey <-> RGB with PIL's ITU-R 601 luma, only when it does not match already):

* V1 ``{"instances": [...]}``, one instance per image:
  - a nested list of **ints** 0..255: uint8 pixels, HWC (``[H, W, C]``, C = 1 or 3, or ``[H, W]`` for grey);
  - a nested list of **floats** in [0, 1]: pixels already scaled by 1/255, CHW (``[C, H, W]`` or ``[H, W]``);
    the JSON number type decides, so ``255.0`` is a float and rejected (out of range);
  - ``{"b64": "<base64 of a PNG or JPEG file>"}``.
* V2 (Open Inference Protocol), exactly one input tensor (any name; the metadata suggests ``input``,
  ``input_uint8`` and ``input_bytes``), as JSON or with the binary tensor extension:
  - ``FP32 [N, C, H, W]`` pixels in [0, 1] (not normalized);
  - ``UINT8 [N, H, W, C]``;
  - ``BYTES [N]``, each element one PNG/JPEG file: base64 text in JSON (a JSON string cannot hold raw
    bytes); in the binary extension either the file's own bytes (recognized by the PNG/JPEG signature) or
    base64 text.

PNG/JPEG files of any Pillow mode and bit depth decode to the right 8-bit pixels (``bockd.imaging.to_8bit``,
the rule the training data follows: a 16-bit PNG is scaled, not clamped).

Every request is budgeted as a whole before anything is decoded (``RequestLimits``): images per request,
pixels per image and per request (from the tensor shape or the image file's header), bytes per encoded
image; the HTTP layer (``bockd.serving.rest``) caps the body. What exceeds a budget raises
``RequestTooLarge`` (HTTP 413); any other malformed input raises ``kserve.errors.InvalidInput`` (HTTP 400).
Both name the image and the problem in a short message that never echoes the payload.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import reprlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

import numpy as np
import orjson
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput
from PIL import Image, UnidentifiedImageError

from bockd.errors import CheckpointError, DataError
from bockd.imaging import to_8bit

MiB = 1 << 20
MAX_IMAGE_BYTES = 8 * MiB  # per encoded image (PNG/JPEG), checked before decoding
MAX_PIXELS = 4096 * 4096  # per image, any source: guards against decompression bombs and giant arrays
MAX_BATCH_LIMIT = 4096  # the ONNX export's dynamic batch dimension allows at most this
_MAX_B64_CHARS = 4 * math.ceil(MAX_IMAGE_BYTES / 3)
_LUMA = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)  # what PIL's convert("L") uses
_FORMATS = ["PNG", "JPEG"]
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")  # a BYTES element that starts so is the file itself
V2_DATATYPES = ("FP32", "UINT8", "BYTES")
_V2_LAYOUTS = {"FP32": "[N, C, H, W]", "UINT8": "[N, H, W, C]", "BYTES": "[N]"}
# Little-endian, as the binary tensor extension sends them (BYTES elements are length-prefixed instead).
_FIXED_SIZE = {
    "BOOL": "?",
    "UINT8": "u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}

# Client values in messages: a name, a shape or a datatype is shown cut short, never in full.
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 48
_REPR.maxlist = _REPR.maxdict = 6
_REPR.maxlevel = 2


def short(value: Any) -> str:
    """``repr(value)`` cut to a few dozen characters: what an error message may quote of a request."""
    return _REPR.repr(value)


def clip(err: BaseException, limit: int = 120) -> str:
    """A library's error message, cut to ``limit`` characters (it may quote bytes it choked on)."""
    text = str(err)
    return text if len(text) <= limit else text[:limit] + "..."


class RequestTooLarge(InvalidInput):
    """A request over one of the server's budgets (HTTP 413). Raised before the part over it is decoded."""


@dataclass(frozen=True)
class RequestLimits:
    """What one request may hold, and how many requests are worked on at once.

    The defaults fit the shipped runtime (``limits.memory: 2Gi``, one CPU): a request at every limit peaks
    at a few hundred MB and ``max_concurrent_requests`` of them run at once (docs/serving.md, "Budgets").
    Every field is a server argument ``--<field>`` and an environment variable ``BOCKD_SERVING_<FIELD>``.
    """

    max_batch: int = 256  # images in one request
    max_request_bytes: int = 32 * MiB  # HTTP body of any kind, checked before it is read
    max_json_bytes: int = 4 * MiB  # a JSON body, or the JSON header of a binary-extension body
    max_request_pixels: int = MAX_PIXELS  # height x width summed over a request's images, as sent
    max_image_pixels: int = MAX_PIXELS  # height x width of one image, as sent
    max_image_bytes: int = MAX_IMAGE_BYTES  # one encoded PNG/JPEG
    max_concurrent_requests: int = 2  # read, decoded and run at once; later ones wait, bodies unread
    max_body_seconds: int = 60  # to receive a body once its request has a slot (408 past it)

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{field.name} must be a positive integer, got {value!r}")
        if self.max_batch > MAX_BATCH_LIMIT:
            raise ValueError(f"max_batch must be 1..{MAX_BATCH_LIMIT}, got {self.max_batch}")

    @property
    def max_b64_chars(self) -> int:
        return 4 * math.ceil(self.max_image_bytes / 3)


DEFAULT_LIMITS = RequestLimits()


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


# -- the budget of one request ------------------------------------------------------------------------------


def check_batch(n: int, limits: RequestLimits) -> None:
    if n == 0:
        raise InvalidInput("empty batch: send at least one image")
    if n > limits.max_batch:
        raise RequestTooLarge(
            f"batch of {n} images is over the limit of {limits.max_batch} images per request (max_batch)"
        )


class _Budget:
    """Pixels of one request, counted image by image from declared sizes before any of them is decoded."""

    def __init__(self, limits: RequestLimits) -> None:
        self.limits = limits
        self.pixels = 0

    def images(self, count: int, h: int, w: int, what: str) -> None:
        """Account for ``count`` images of ``h`` x ``w``; InvalidInput if empty, RequestTooLarge if over."""
        if h < 1 or w < 1:
            raise InvalidInput(f"{what}: empty image ({h}x{w})")
        if h * w > self.limits.max_image_pixels:
            raise RequestTooLarge(
                f"{what}: {w}x{h} is {h * w} pixels, over the limit of {self.limits.max_image_pixels} pixels "
                "per image (max_image_pixels)"
            )
        self.pixels += count * h * w
        if self.pixels > self.limits.max_request_pixels:
            raise RequestTooLarge(
                f"{what}: the request's images add up to {self.pixels} pixels, over the limit of "
                f"{self.limits.max_request_pixels} pixels per request (max_request_pixels)"
            )


# -- one image ----------------------------------------------------------------------------------------------


def _fit_pil(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """Any 8-bit PIL image -> uint8 HWC with the spec's channels and size."""
    img = img.convert("L" if spec.channels == 1 else "RGB")
    if img.size != (spec.width, spec.height):
        img = img.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def from_uint8_hwc(arr: np.ndarray, spec: InputSpec, what: str) -> np.ndarray:
    """uint8 [H, W, C] (or [H, W]) -> float32 CHW in [0, 1] at the spec's shape."""
    arr = _hwc(arr, what)
    h, w, c = arr.shape
    if (c, h, w) != spec.shape:  # only touch pixels that need it: a matching image is used bit-exact
        arr = _fit_pil(Image.fromarray(arr[..., 0] if c == 1 else arr), spec)
    return arr.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)


def from_float_chw(arr: np.ndarray, spec: InputSpec, what: str) -> np.ndarray:
    """float [C, H, W] (or [H, W]) in [0, 1] -> float32 CHW at the spec's shape."""
    arr = _chw(arr, what)
    c, h, w = arr.shape
    arr = arr.astype(np.float32, copy=False)
    if c != spec.channels:
        arr = np.tensordot(_LUMA, arr, axes=1)[None] if spec.channels == 1 else np.repeat(arr, 3, axis=0)
    if (h, w) != (spec.height, spec.width):
        size = (spec.width, spec.height)
        planes = [np.asarray(Image.fromarray(p).resize(size, Image.Resampling.BILINEAR)) for p in arr]
        arr = np.clip(np.stack(planes), 0.0, 1.0)
    return np.ascontiguousarray(arr, dtype=np.float32)


def _hwc(arr: np.ndarray, what: str) -> np.ndarray:
    arr = arr[..., None] if arr.ndim == 2 else arr
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise InvalidInput(f"{what}: uint8 image must be [H, W, C] with C = 1 or 3, got {list(arr.shape)}")
    return arr


def _chw(arr: np.ndarray, what: str) -> np.ndarray:
    arr = arr[None] if arr.ndim == 2 else arr
    if arr.ndim != 3 or arr.shape[0] not in (1, 3):
        raise InvalidInput(f"{what}: float image must be [C, H, W] with C = 1 or 3, got {list(arr.shape)}")
    return arr


def open_image(data: bytes | memoryview, what: str, budget: _Budget) -> Image.Image:
    """PNG/JPEG file bytes -> a PIL image of which only the header is read; its size goes on the budget."""
    if not len(data):
        raise InvalidInput(f"{what}: empty image bytes")
    if len(data) > budget.limits.max_image_bytes:
        raise RequestTooLarge(
            f"{what}: encoded image is {len(data)} bytes, over the limit of {budget.limits.max_image_bytes} "
            "bytes per image (max_image_bytes)"
        )
    try:
        img = Image.open(io.BytesIO(data), formats=_FORMATS)
        w, h = img.size
    except UnidentifiedImageError:
        raise InvalidInput(f"{what}: cannot decode the image: not a PNG or JPEG file") from None
    except Exception as err:  # PIL raises many types for garbage (OSError, SyntaxError, ValueError, ...)
        raise InvalidInput(f"{what}: cannot decode the image as PNG or JPEG: {clip(err)}") from None
    budget.images(1, h, w, what)  # from the header alone: a bomb is refused before its pixels are inflated
    return img


def decode_image(img: Image.Image, spec: InputSpec, what: str) -> np.ndarray:
    """An opened PIL image -> float32 CHW in [0, 1]; any mode and bit depth (``bockd.imaging.to_8bit``)."""
    try:
        img.load()
        arr = _fit_pil(to_8bit(img, what), spec)
    except DataError as err:  # a mode without a defined 8-bit meaning (float images, 32-bit values)
        raise InvalidInput(str(err)) from None
    except Exception as err:
        raise InvalidInput(f"{what}: cannot decode the image as PNG or JPEG: {clip(err)}") from None
    return arr.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)


def from_encoded(
    data: bytes, spec: InputSpec, what: str, limits: RequestLimits = DEFAULT_LIMITS
) -> np.ndarray:
    """PNG/JPEG file bytes -> float32 CHW in [0, 1]. Size and pixel count are checked before decoding."""
    return decode_image(open_image(data, what, _Budget(limits)), spec, what)


def decode_b64(text: Any, what: str, limits: RequestLimits = DEFAULT_LIMITS) -> bytes:
    """Base64 text (str or ASCII bytes) -> the bytes; its length is checked against max_image_bytes first."""
    if not isinstance(text, (str, bytes, bytearray, memoryview)):
        raise InvalidInput(f"{what}: base64 image must be a string, got {type(text).__name__}")
    if len(text) > limits.max_b64_chars:
        raise RequestTooLarge(
            f"{what}: base64 image is {len(text)} characters, over the limit for {limits.max_image_bytes} "
            "bytes per image (max_image_bytes)"
        )
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidInput(
            f"{what}: not valid base64 ({clip(err)}); an image is sent as base64 text (the only form "
            "a JSON string can carry) or, in the binary tensor extension, as the PNG/JPEG file itself"
        ) from None


def encoded_bytes(item: Any, what: str, limits: RequestLimits = DEFAULT_LIMITS) -> bytes | memoryview:
    """One BYTES element -> the PNG/JPEG file: a str is base64; bytes are the file when they start with a
    PNG/JPEG signature (the binary extension carries raw bytes), else base64 text."""
    if isinstance(item, str):
        return decode_b64(item, what, limits)
    if not isinstance(item, (bytes, bytearray, memoryview)):
        raise InvalidInput(f"{what}: expected a base64 string or the file's bytes, got {type(item).__name__}")
    raw = memoryview(item).cast("B")
    if bytes(raw[:8]).startswith(_SIGNATURES):
        return raw
    if len(raw) > limits.max_b64_chars:
        return decode_b64(raw, what, limits)  # refused for its length, before it is copied or scanned
    try:
        bytes(raw).decode("ascii")
    except UnicodeDecodeError:
        raise InvalidInput(f"{what}: neither a PNG/JPEG file nor base64 text of one") from None
    return decode_b64(bytes(raw), what, limits)


# -- pixel arrays -------------------------------------------------------------------------------------------


def _as_array(data: Any, what: str) -> np.ndarray:
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError) as err:
        raise InvalidInput(f"{what}: not a rectangular array of numbers: {clip(err)}") from None
    if arr.dtype.kind not in "iuf":
        raise InvalidInput(f"{what}: pixel values must be numbers, got {arr.dtype.kind!r} data ({arr.dtype})")
    return arr


def check_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype.kind not in "iu":
        raise InvalidInput(f"{what}: uint8 pixels must be integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise InvalidInput(f"{what}: uint8 values out of range 0..255 (min {arr.min()}, max {arr.max()})")
    return arr.astype(np.uint8, copy=False)


def check_unit_float(arr: np.ndarray, what: str) -> np.ndarray:
    """Finite values in [0, 1], checked in the array's own precision (no float64 copy of a float32 tensor)."""
    if arr.dtype.kind != "f":
        arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise InvalidInput(f"{what}: pixel values contain NaN or infinity")
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise InvalidInput(
            f"{what}: float pixel values out of range [0, 1] (min {arr.min():g}, max {arr.max():g}); "
            "send ints 0..255 for uint8 HWC images"
        )
    return arr.astype(np.float32, copy=False)


# -- V1: {"instances": [...]} --------------------------------------------------------------------------------

Decoder = Callable[[InputSpec], np.ndarray]


def _v1_list(instance: list, budget: _Budget, what: str) -> Decoder:
    # The JSON is parsed already (its size is capped), so the list becomes an array here; only its
    # resizing waits until the whole request is budgeted.
    arr = _as_array(instance, what)
    if arr.ndim not in (2, 3):
        raise InvalidInput(f"{what}: expected a 2-D or 3-D nested list, got shape {list(arr.shape)}")
    if arr.dtype.kind in "iu":
        arr = _hwc(check_uint8(arr, what), what)
        budget.images(1, arr.shape[0], arr.shape[1], what)
        return partial(from_uint8_hwc, arr, what=what)
    arr = _chw(check_unit_float(arr, what), what)
    budget.images(1, arr.shape[1], arr.shape[2], what)
    return partial(from_float_chw, arr, what=what)


def _v1_instance(instance: Any, budget: _Budget, what: str) -> Decoder:
    if isinstance(instance, dict):
        if set(instance) != {"b64"}:
            raise InvalidInput(f'{what}: an object instance must be {{"b64": "<base64 PNG/JPEG>"}} only')
        img = open_image(decode_b64(instance["b64"], what, budget.limits), what, budget)
        return partial(decode_image, img, what=what)
    if not isinstance(instance, list):
        raise InvalidInput(
            f"{what}: expected a nested list (uint8 HWC ints or [0, 1] CHW floats) or "
            f'{{"b64": ...}}, got {type(instance).__name__}'
        )
    return _v1_list(instance, budget, what)


def batch_from_v1(payload: Any, spec: InputSpec, limits: RequestLimits = DEFAULT_LIMITS) -> np.ndarray:
    """A V1 request body -> normalized float32 [N, C, H, W]; every image is budgeted before any is decoded."""
    if not isinstance(payload, dict):
        raise InvalidInput(f'expected a JSON object {{"instances": [...]}}, got {type(payload).__name__}')
    if "instances" not in payload:
        raise InvalidInput('missing "instances": expected {"instances": [image, ...]}')
    instances = payload["instances"]
    if not isinstance(instances, list):
        raise InvalidInput(f'"instances" must be a list, got {type(instances).__name__}')
    check_batch(len(instances), limits)
    budget = _Budget(limits)
    decoders = [_v1_instance(inst, budget, f"instance {i}") for i, inst in enumerate(instances)]
    return spec.normalize(np.stack([decode(spec) for decode in decoders]))


# -- V2: one tensor ------------------------------------------------------------------------------------------


def _v2_shape(shape: Any, what: str) -> list[int]:
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidInput(f"{what}: shape must be a list of non-negative ints, got {short(shape)}")
    return list(shape)


def _v2_values(inp: InferInput, shape: list[int], what: str) -> np.ndarray:
    """The tensor's values as an array of ``shape``, without trusting the declared datatype for conversion."""
    data = inp.data
    if isinstance(data, np.ndarray):  # the binary extension's tensor, straight from the body
        arr = data
    elif isinstance(data, (list, tuple)):
        arr = _as_array(data, what) if data else np.zeros(0, dtype=np.float32)
    else:  # raw binary (in-process or gRPC callers): kserve's own decoding
        try:
            arr = inp.as_numpy()
        except Exception as err:
            raise InvalidInput(f"{what}: cannot read the tensor data: {clip(err)}") from None
    need = math.prod(shape)
    if arr.size != need:
        raise InvalidInput(f"{what}: has {arr.size} values but shape {short(shape)} needs {need}")
    return arr.reshape(shape)


def _v2_bytes_items(inp: InferInput, n: int, what: str) -> list[Any]:
    data = inp.data
    if not isinstance(data, (list, tuple)):
        try:
            data = inp.as_numpy().ravel().tolist()
        except Exception as err:
            raise InvalidInput(f"{what}: cannot read the BYTES data: {clip(err)}") from None
    items = [x for row in data for x in (row if isinstance(row, (list, tuple)) else [row])]
    if len(items) != n:
        raise InvalidInput(f"{what}: has {len(items)} BYTES elements but shape says {n}")
    return items


def _v2_input(request: InferRequest) -> tuple[InferInput, str, str, list[int]]:
    """The request's one input: (input, how messages name it, datatype, shape), checked for rank."""
    inputs = request.inputs or []
    if len(inputs) != 1:
        names = [getattr(i, "name", "?") for i in inputs]
        raise InvalidInput(f"expected exactly one input tensor, got {len(inputs)} {short(names)}")
    inp = inputs[0]
    what = f"input {short(inp.name)}"
    dtype = str(inp.datatype).upper()
    if dtype not in _V2_LAYOUTS:
        raise InvalidInput(
            f"{what}: datatype {short(dtype)} is not supported; send FP32 [N, C, H, W] in [0, 1], "
            "UINT8 [N, H, W, C] or BYTES [N] (PNG/JPEG files)"
        )
    shape = _v2_shape(inp.shape, what)
    rank = 1 if dtype == "BYTES" else 4
    if len(shape) != rank and not (dtype == "BYTES" and len(shape) == 2 and shape[1] == 1):
        raise InvalidInput(f"{what}: {dtype} shape must be {_V2_LAYOUTS[dtype]}, got {short(shape)}")
    return inp, what, dtype, shape


def batch_from_v2(
    request: InferRequest, spec: InputSpec, limits: RequestLimits = DEFAULT_LIMITS
) -> np.ndarray:
    """A V2 InferRequest -> normalized float32 [N, C, H, W]; budgeted from the shape or the files' headers
    before any pixel is converted or decoded."""
    inp, what, dtype, shape = _v2_input(request)
    check_batch(shape[0], limits)
    budget = _Budget(limits)
    if dtype == "BYTES":
        decoders = []
        for i, item in enumerate(_v2_bytes_items(inp, shape[0], what)):
            where = f"{what}[{i}]"
            img = open_image(encoded_bytes(item, where, limits), where, budget)
            decoders.append(partial(decode_image, img, what=where))
        return spec.normalize(np.stack([decode(spec) for decode in decoders]))
    h, w = (shape[2], shape[3]) if dtype == "FP32" else (shape[1], shape[2])
    budget.images(shape[0], h, w, what)
    arr = _v2_values(inp, shape, what)
    if dtype == "UINT8":
        arr = check_uint8(arr, what)
        x = [from_uint8_hwc(img, spec, f"{what}[{i}]") for i, img in enumerate(arr)]
    else:
        arr = check_unit_float(arr, what)
        x = [from_float_chw(img, spec, f"{what}[{i}]") for i, img in enumerate(arr)]
    return spec.normalize(np.stack(x))


# -- V2 request bodies: JSON, or JSON + binary tensors (the binary tensor extension) ------------------------


def load_json(data: bytes | memoryview, what: str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as err:
        # orjson's messages say where, never what: "unexpected character: line 1 column 83 (char 82)"
        raise InvalidInput(f"{what} is not valid JSON (UTF-8, no NaN): {str(err)[:200]}") from None


def v2_request_from_json(
    body: bytes, model_name: str, limits: RequestLimits = DEFAULT_LIMITS
) -> InferRequest:
    """A V2 JSON body -> InferRequest, every field checked (400 naming it). The caller caps the body size."""
    return _v2_request(load_json(body, "the request body"), model_name, None, limits)


def v2_request_from_binary(
    body: bytes, header_length: str, model_name: str, limits: RequestLimits = DEFAULT_LIMITS
) -> InferRequest:
    """A binary-extension body (``header_length`` bytes of JSON, then the tensors) -> InferRequest.

    Tensors stay views of ``body`` (no copy, no Python lists); BYTES elements are split by their 4-byte
    little-endian length prefixes. Sizes must add up exactly: ``binary_data_size`` = shape x item size,
    and the inputs' sizes = what follows the header.
    """
    n = _header_length(header_length, len(body))
    if n > limits.max_json_bytes:
        raise RequestTooLarge(
            f"the JSON header is {n} bytes, over the limit of {limits.max_json_bytes} bytes (max_json_bytes)"
        )
    view = memoryview(body)
    header = load_json(view[:n], f"the JSON header (the body's first {n} bytes)")
    return _v2_request(header, model_name, view[n:], limits)


def _header_length(text: str, total: int) -> int:
    value = text.strip()
    if not (value.isascii() and value.isdigit() and len(value) <= 20) or not 0 < int(value) <= total:
        raise InvalidInput(
            f"Inference-Header-Content-Length {short(text)} is not a JSON header length within the "
            f"body's {total} bytes"
        )
    return int(value)


def _optional(obj: dict, key: str, kind: type, what: str) -> Any:
    value = obj.get(key)
    if value is not None and not isinstance(value, kind):
        raise InvalidInput(f'{what}: "{key}" must be {kind.__name__}, got {type(value).__name__}')
    return value


def _check_flag(params: dict | None, key: str, what: str) -> None:
    if params and key in params and not isinstance(params[key], bool):
        raise InvalidInput(f'{what}: parameter "{key}" must be true or false, got {short(params[key])}')


def _v2_request(obj: Any, model_name: str, tail: memoryview | None, limits: RequestLimits) -> InferRequest:
    if not isinstance(obj, dict):
        raise InvalidInput(f"an inference request must be a JSON object, got {type(obj).__name__}")
    request_id = _optional(obj, "id", str, "request")
    params = _optional(obj, "parameters", dict, "request")
    _check_flag(params, "binary_data_output", "request")
    raw_inputs = obj.get("inputs")
    if not isinstance(raw_inputs, list):
        raise InvalidInput('an inference request needs "inputs": a list of tensors')
    inputs, offset = [], 0
    for i, raw in enumerate(raw_inputs):
        inp, offset = _v2_tensor(raw, f"input {i}", tail, offset, limits)
        inputs.append(inp)
    if tail is not None and offset != len(tail):
        raise InvalidInput(
            f"{len(tail) - offset} bytes after the JSON header belong to no input (the inputs' "
            f"binary_data_size add up to {offset})"
        )
    outputs = _v2_outputs(obj.get("outputs"))
    return InferRequest(model_name, inputs, request_id=request_id, parameters=params, request_outputs=outputs)


def _v2_tensor(
    raw: Any, where: str, tail: memoryview | None, offset: int, limits: RequestLimits
) -> tuple[InferInput, int]:
    """One request input -> (InferInput, offset of the next binary tensor in ``tail``)."""
    if not isinstance(raw, dict):
        raise InvalidInput(f"{where}: must be an object with name, shape, datatype and data")
    name, datatype = raw.get("name"), raw.get("datatype")
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise InvalidInput(f'{where}: "name" and "datatype" must be strings')
    what = f"input {short(name)}"
    shape = _v2_shape(raw.get("shape"), what)
    params = _optional(raw, "parameters", dict, what)
    size = params.get("binary_data_size") if params else None
    if "data" in raw:
        if size is not None:
            raise InvalidInput(f'{what}: has both "data" and a binary_data_size parameter')
        if not isinstance(raw["data"], list):
            raise InvalidInput(f'{what}: "data" must be a list')
        return InferInput(name, shape, datatype, data=raw["data"], parameters=params), offset
    if size is None:
        raise InvalidInput(f'{what}: no "data", and no binary_data_size parameter for binary data')
    if tail is None:
        raise InvalidInput(
            f"{what}: binary_data_size is set but the body has no binary part "
            "(send the Inference-Header-Content-Length header)"
        )
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(tail) - offset:
        raise InvalidInput(
            f"{what}: binary_data_size {short(size)} is not a size within the {len(tail) - offset} "
            "bytes left after the JSON header and the inputs before it"
        )
    data = _binary_tensor(tail[offset : offset + size], shape, datatype.upper(), what, limits)
    rest = {k: v for k, v in params.items() if k != "binary_data_size"} or None  # as kserve's decoder does
    return InferInput(name, shape, datatype, data=data, parameters=rest), offset + size


def _binary_tensor(
    chunk: memoryview, shape: list[int], datatype: str, what: str, limits: RequestLimits
) -> np.ndarray | list[memoryview]:
    count = math.prod(shape)
    if datatype == "BYTES":
        return _bytes_elements(chunk, count, what, limits)
    if datatype not in _FIXED_SIZE:
        raise InvalidInput(f"{what}: datatype {short(datatype)} is not an Open Inference Protocol datatype")
    dtype = np.dtype(_FIXED_SIZE[datatype])
    if len(chunk) != count * dtype.itemsize:
        raise InvalidInput(
            f"{what}: binary_data_size is {len(chunk)} bytes but shape {short(shape)} of {datatype} needs "
            f"{count * dtype.itemsize}"
        )
    return np.frombuffer(chunk, dtype=dtype)


def _bytes_elements(chunk: memoryview, count: int, what: str, limits: RequestLimits) -> list[memoryview]:
    """Length-prefixed BYTES elements (4-byte little-endian length, then the bytes), as views of ``chunk``."""
    check_batch(count, limits)  # each element is an image: never split more than a batch of them
    items, pos = [], 0
    while pos < len(chunk) and len(items) < count:
        if pos + 4 > len(chunk):
            raise InvalidInput(f"{what}: BYTES element {len(items)}: its 4-byte length is cut off")
        n = int.from_bytes(chunk[pos : pos + 4], "little")
        if n > len(chunk) - pos - 4:
            raise InvalidInput(
                f"{what}: BYTES element {len(items)} says {n} bytes but {len(chunk) - pos - 4} are left"
            )
        items.append(chunk[pos + 4 : pos + 4 + n])
        pos += 4 + n
    if len(items) != count or pos != len(chunk):
        raise InvalidInput(
            f"{what}: binary data holds {len(items)} BYTES elements in {pos} of {len(chunk)} bytes but "
            f"shape {short([count])} needs {count} filling them"
        )
    return items


def _v2_outputs(raw: Any) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise InvalidInput(f'"outputs" must be a list of {{"name": ...}} objects, got {type(raw).__name__}')
    outputs = []
    for i, out in enumerate(raw):
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise InvalidInput(f'output {i}: must be an object with a string "name"')
        params = _optional(out, "parameters", dict, f"output {short(out['name'])}")
        _check_flag(params, "binary_data", f"output {short(out['name'])}")
        if params and params.get("classification"):
            raise InvalidInput(
                "the classification extension is not supported; ask for the top_k_classes output"
            )
        outputs.append(RequestedOutput(name=out["name"], parameters=params))
    return outputs
