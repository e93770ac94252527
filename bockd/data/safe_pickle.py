"""A restricted unpickler for the official CIFAR python batches.

A pickle can call any importable function while loading, so the CIFAR files are never read with plain
`pickle.load`. This unpickler resolves only the globals needed to rebuild numpy arrays; anything else
(os.system, builtins.eval, ...) is refused with a DataError before it can run.
"""

from __future__ import annotations

import codecs
import io
import pickle
from typing import Any

import numpy as np

from bockd.errors import DataError

# ndarray.__reduce__ hands out numpy's own _reconstruct, whichever module numpy keeps it in.
_RECONSTRUCT = np.empty(0).__reduce__()[0]


def _latin1_encode(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Stand-in for `_codecs.encode`, which Python 3 emits for bytes under pickle protocol <= 2."""
    if not isinstance(obj, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise DataError(f"pickle calls _codecs.encode with {encoding!r}; only latin1 text is allowed")
    return codecs.encode(obj, "latin1", errors)


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """Stand-in for numpy's `_frombuffer`, which protocol 5 (`pickle.HIGHEST_PROTOCOL`) emits for arrays:
    the same result, for plain (non-object) dtypes, in-band bytes and an integer shape only."""
    if not isinstance(buffer, bytes | bytearray | pickle.PickleBuffer):
        raise DataError(f"pickle calls numpy _frombuffer with a {type(buffer).__name__}, expected bytes")
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise DataError(f"pickle asks numpy _frombuffer for dtype {dtype!r}; only plain dtypes are allowed")
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise DataError(f"pickle asks numpy _frombuffer for shape {shape!r}; expected a tuple of sizes")
    if order not in ("C", "F"):
        raise DataError(f"pickle asks numpy _frombuffer for order {order!r}; expected 'C' or 'F'")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


# Every global numpy itself writes for an array, under every pickle protocol (0-2: _reconstruct with
# latin1 text, 3-4: _reconstruct, 5: _frombuffer), for numpy 1.x and 2.x module paths.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # written by numpy 1.x (the real files)
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # written by numpy 2.x
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,  # protocol 5, numpy 1.x
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,  # protocol 5, numpy 2.x
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler whose `find_class` knows only the numpy array globals in `_ALLOWED`."""

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file, encoding="bytes")  # the files come from Python 2: str -> bytes, keys too
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._source}: pickle references {module}.{name}, which is not allowed "
                "(only numpy array globals may be loaded)"
            ) from None


def safe_loads(data: bytes, source: str) -> Any:
    """Unpickle `data` with `NumpyOnlyUnpickler`; `source` names the file in error messages."""
    try:
        return NumpyOnlyUnpickler(io.BytesIO(data), source).load()
    except DataError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
    ) as e:
        raise DataError(f"{source}: not a readable CIFAR pickle: {type(e).__name__}: {e}") from e
