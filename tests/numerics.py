"""Tolerances that follow the numerics, for comparing two float computations of the same quantity.

Two results that differ only in *how* they were computed (memory layout, instruction set, thread count,
ONNX Runtime vs PyTorch kernels) differ by rounding: every accumulated product or elementwise op adds an
error of at most eps/2 relative to the magnitude of the values it combines. Those errors are unbiased and
nearly independent, so over n accumulations they grow like sqrt(n) * eps (Higham & Mary, "A new approach
to probabilistic rounding error analysis", SIAM J. Sci. Comput. 2019: |error| <= lambda * sqrt(n) * u
with probability >= 1 - 2 exp(-lambda^2 / 2); lambda = 4 makes a miss a 1-in-3000 event per value).

So a tolerance is ``factor * eps(dtype) * sqrt(n) * scale``, where ``scale`` is the magnitude of the
*tensor* (not of each element: a small logit next to a large one carries the large one's rounding), and
``n`` is the reduction length. A real bug (a wrong layout, a wrong weight, a dropped term) changes the
result by O(scale), orders of magnitude above it. Comparisons of the *same* arithmetic on the same
machine need none of this: they are bit-equal on any CPU and stay exact (``torch.equal``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

DType = torch.dtype | np.dtype | type

LAMBDA = 4.0  # the probabilistic bound's multiplier (see the module docstring)


def eps(dtype: DType = torch.float32) -> float:
    """Machine epsilon of a torch or numpy float dtype."""
    if isinstance(dtype, torch.dtype):
        return float(torch.finfo(dtype).eps)
    return float(np.finfo(dtype).eps)


def reduction_length(model: nn.Module) -> int:
    """Products accumulated through ``model``: the sum of every conv / linear layer's fan-in.

    Summed over all layers, parallel branches included, so it bounds any one output's path from above.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n += m.in_channels // m.groups * math.prod(m.kernel_size)
        elif isinstance(m, nn.Linear):
            n += m.in_features
    return n


def rounding_tolerance(scale: float, terms: int, dtype: DType = torch.float32) -> float:
    """``LAMBDA * eps * sqrt(terms) * scale``: how far two orderings of ``terms`` roundings may drift."""
    return LAMBDA * eps(dtype) * math.sqrt(max(terms, 1)) * scale


def max_abs(x: torch.Tensor | np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(x, dtype=np.float64)))) if np.size(x) else 0.0


def assert_close_at_scale(
    actual: torch.Tensor | np.ndarray,
    expected: torch.Tensor | np.ndarray,
    *,
    terms: int,
    scale: float | None = None,
    dtype: DType = torch.float32,
) -> float:
    """Assert ``max |actual - expected| <= rounding_tolerance(scale, terms, dtype)``; returns the tolerance.

    ``scale`` defaults to ``max |expected|``, the magnitude of the whole tensor.
    """
    a = np.asarray(actual.detach().double() if isinstance(actual, torch.Tensor) else actual, np.float64)
    e = np.asarray(expected.detach().double() if isinstance(expected, torch.Tensor) else expected, np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != {e.shape}"
    tol = rounding_tolerance(max_abs(e) if scale is None else scale, terms, dtype)
    diff = float(np.max(np.abs(a - e))) if a.size else 0.0
    assert diff <= tol, f"max |difference| {diff:.3g} > tolerance {tol:.3g} (scale {scale}, {terms} terms)"
    return tol


def softmax_tolerance(logit_tolerance: float, classes: int) -> float:
    """Probabilities from logits that differ by at most ``logit_tolerance``: softmax's Jacobian has
    infinity-norm max_i 2 p_i (1 - p_i) <= 1/2, so they differ by at most half of it, plus the softmax's
    own rounding (a sum of ``classes`` terms of size <= 1)."""
    return 0.5 * logit_tolerance + rounding_tolerance(1.0, classes)


def probability_tolerance(logits: torch.Tensor | np.ndarray, terms: int) -> float:
    """Softmax outputs of a network whose float32 logits (``[batch, classes]``, accumulated over ``terms``
    products) were computed by other kernels or in another process (another thread count)."""
    return softmax_tolerance(rounding_tolerance(max_abs(logits), terms), int(np.shape(logits)[-1]))
