"""Confidence cascade: the smallest student answers what it is sure of and escalates the rest of the batch.

Method. Stages ``0 .. S-1`` are students ordered from the smallest (cheapest) to the largest, e.g.
S5 -> S3 -> S1. A batch runs through stage 0; a row whose confidence, the largest softmax probability
``max_k p_k``, is at least the stage's threshold ``t_0`` is answered there (its prediction and probabilities
are stage 0's), the other rows go on to stage 1, and so on; the last stage answers every row that reaches
it. A threshold above 1 (``NEVER``) keeps a stage from answering anything, so it is not run at all (the
fit may drop a student that does not pay for itself); 0 lets it answer everything.

Cost. A row that reaches stage ``i`` has run through every (running) stage before it, so the expected cost
per image is ``sum_i runs_i * reach_i * cost_i``, where ``reach_i`` is the fraction of images that reach
stage ``i`` (``reach_0 = 1``), ``cost_i`` the stage's cost per image (milliseconds, measured by the caller)
and ``runs_i`` 0 for a stage at ``NEVER``, else 1. Since "every threshold at ``NEVER``" is the largest
student alone at its own cost, the exact search never returns a cascade that costs more than it.

Fitting (`fit_thresholds`). On a held-out validation split, the thresholds minimise the expected cost
subject to the cascade's top-1 accuracy reaching a target (`build_cascade`'s default: the largest
student's own validation top-1 minus ``max_drop`` points). Candidate thresholds of a stage are its observed
validation confidences (all of them, or an empirical quantile grid when there are too many), plus
``NEVER``. Up to three thresholds (four stages) every combination of candidates is evaluated at once
(exact on the grid: per-stage histograms of the candidate levels with cumulative sums, no loop over
settings); with more, coordinate descent (below). Ties in cost go to the higher accuracy, then to the
first setting in grid order, so the fit is deterministic. When no setting reaches the target, the
thresholds are all ``NEVER`` (every image goes straight to the largest student, which answers with its
own accuracy at its own cost) and ``CascadeFit.reached`` is False.

Coordinate descent (four or more thresholds, or ``search="descent"``): start from all ``NEVER``; for each
stage in turn choose the candidate that is best with the other thresholds held fixed (one histogram pass:
O(N + grid) per stage), ordering settings by (points of accuracy short of the target, expected cost,
accuracy); repeat sweeps until none changes anything. It finds a coordinate-wise optimum, not necessarily
the global one on the grid; the tests compare it with the exact search. Its cost model charges a stage at
``NEVER`` as if it ran (conservative); the reported ``expected_cost_ms`` is that of the chosen setting.

Sources. Viola and Jones, "Rapid Object Detection using a Boosted Cascade of Simple Features" (CVPR 2001):
a chain of increasingly costly classifiers where the cheap early stages settle most inputs. Wang et al.,
"IDK Cascades: Fast Deep Learning by Learning not to Overthink" (arXiv 1706.00885, 2017; UAI 2018):
cascades of pre-trained models in which each model may defer ("I don't know") to a costlier one, trading
accuracy against expected computation; thresholding the largest softmax probability is one of their
deferral rules. Teerapittayanon, McDanel and Kung, "BranchyNet" (ICPR 2016): early exits inside one
network, taken when the softmax entropy is below a threshold. Here the "exits" are separate students of
one BOC-KD run and the confidence is the largest probability (Hendrycks and Gimpel, ICLR 2017, use it as
the baseline signal of a misclassified input).

The cascade folder (`build_cascade`, read by `read_cascade` and the model server): ``cascade.json`` (format
``bockd-cascade/1``) beside one sub-folder per student, named by its label (``S5/``, ``S3/`` ...), each a
copy of the exported (or int8-quantized) student without ``model.safetensors``: ONNX is what is served.
NumPy only (ONNX Runtime through `bockd.onnx_student` when students are scored).
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bockd.atomic import atomic_dir, write_json
from bockd.errors import CheckpointError, ConfigError, DataError
from bockd.export_format import WEIGHTS_FILE, read_student_config, read_versioned_json

__all__ = [
    "CASCADE_FILE",
    "CASCADE_FORMAT",
    "NEVER",
    "Cascade",
    "CascadeFit",
    "CascadeStage",
    "answers",
    "build_cascade",
    "confidence",
    "evaluate_cascade",
    "fit_thresholds",
    "read_cascade",
    "route",
    "run_cascade",
]

CASCADE_FILE = "cascade.json"
CASCADE_FORMAT = "bockd-cascade/1"
CONFIDENCE = "max_probability"  # cascade.json's "confidence": the rule `answers` applies
NEVER = 2.0  # a threshold above any probability: the stage never answers (JSON has no infinity)
SEARCHES = ("auto", "exact", "descent")
EXACT_MAX_THRESHOLDS = 3  # "auto" searches exactly up to this many thresholds (four stages)
GRID_CELLS = 1 << 20  # the exact search evaluates at most about this many settings (memory: ~8 B x 10 each)
DESCENT_GRID = 1024  # candidates per stage for coordinate descent
_MAX_SWEEPS = 100
# The students of a cascade must agree on these: one request is decoded once for all of them.
SHARED_FIELDS = ("classes", "num_classes", "in_channels", "input_shape", "mean", "std")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a label is also its sub-folder's name


# -- routing -------------------------------------------------------------------------------------------------


def confidence(probs: np.ndarray) -> np.ndarray:
    """The largest probability of each row of ``[N, K]`` probabilities, float64 ``[N]``.

    float64 so that comparing it with a threshold (a Python float) never rounds the threshold to float32.
    """
    return np.asarray(probs).max(axis=1).astype(np.float64)


def answers(probs: np.ndarray, threshold: float) -> np.ndarray:
    """bool ``[N]``: which rows a stage answers (confidence >= threshold) rather than escalates.

    The (float32) probability is compared exactly with the threshold: a threshold typed as 0.65 is above
    float32 0.65 (0.64999998). Fitted thresholds are observed confidences, so they compare as intended.
    """
    return confidence(probs) >= float(threshold)


def _probs(probs: Sequence[np.ndarray], what: str = "probs") -> list[np.ndarray]:
    if isinstance(probs, np.ndarray) and probs.ndim == 3:
        probs = list(probs)
    arrays = [np.asarray(p) for p in probs]
    if not arrays:
        raise DataError(f"{what}: expected the probabilities of at least one stage, got none")
    first = arrays[0].shape
    for i, p in enumerate(arrays):
        if p.ndim != 2 or p.shape[1] < 1:
            raise DataError(f"{what}[{i}]: expected [N, K] probabilities, got shape {list(p.shape)}")
        if p.shape != first:
            raise DataError(f"{what}[{i}]: shape {list(p.shape)} differs from stage 0's {list(first)}")
    return arrays


def _thresholds(thresholds: Sequence[float], stages: int) -> tuple[float, ...]:
    """``thresholds`` as floats, one per stage but the last, each finite and >= 0."""
    try:
        values = tuple(float(t) for t in thresholds)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"thresholds: expected numbers, got {thresholds!r}") from err
    if len(values) != stages - 1:
        raise ConfigError(
            f"thresholds: {stages} stages need {stages - 1} thresholds (none for the last), got {len(values)}"
        )
    for i, t in enumerate(values):
        if not math.isfinite(t) or t < 0:
            raise ConfigError(f"thresholds[{i}]: expected a finite number >= 0 (> 1: never answer), got {t}")
    return values


def _exits(conf: Sequence[np.ndarray], thresholds: Sequence[float]) -> np.ndarray:
    """int64 ``[N]``: the stage that answers each row, from each stage's confidences."""
    n = len(conf[0])
    last = len(conf) - 1
    exit_at = np.full(n, last, dtype=np.int64)
    open_ = np.ones(n, dtype=bool)
    for i, t in enumerate(thresholds):
        take = open_ & (conf[i] >= t)
        exit_at[take] = i
        open_ &= ~take
    return exit_at


def route(probs: Sequence[np.ndarray], thresholds: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Where each row of a batch is answered, given every stage's probabilities for the whole batch.

    ``probs``: one ``[N, K]`` array per stage, smallest student first; ``thresholds``: one per stage but
    the last. Stage ``i`` answers a row not answered before when its largest probability is
    ``>= thresholds[i]``; the last stage answers the rest. Returns ``(predictions, answered_by)``: int64
    ``[N]`` class indices (the answering stage's argmax, first on ties) and int64 ``[N]`` stage indices.
    Raises DataError for mismatched shapes, ConfigError for a wrong number of thresholds or a bad value.
    """
    arrays = _probs(probs)
    t = _thresholds(thresholds, len(arrays))
    exit_at = _exits([confidence(p) for p in arrays], t)
    top = np.stack([p.argmax(axis=1) for p in arrays])  # [S, N]
    return top[exit_at, np.arange(len(exit_at))].astype(np.int64), exit_at


def run_cascade(
    stages: Sequence[Callable[[np.ndarray], np.ndarray]], x: np.ndarray, thresholds: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Run a cascade on a batch, each stage only on the rows still open: what the model server does.

    ``stages``: callables, smallest student first, each mapping a batch (rows of ``x``) to ``[n, K]``
    probabilities. Stage 0 sees all of ``x``; each later stage only the rows the stages before it did not
    answer. Returns ``(probabilities [N, K], answered_by [N] int64)``, each row the answering stage's
    probabilities; ``route`` on the full per-stage probabilities gives the same rows and stages.
    """
    t = _thresholds(thresholds, len(stages))
    n = len(x)
    if n == 0:
        raise DataError("x: empty batch")
    answered_by = np.full(n, len(stages) - 1, dtype=np.int64)
    out: np.ndarray | None = None
    rows = np.arange(n)
    for i, stage in enumerate(stages):
        if i < len(t) and t[i] > 1.0:  # NEVER: the stage answers nothing, so it is not run at all
            continue
        p = np.asarray(stage(x if rows.size == n else x[rows]))
        if p.ndim != 2 or len(p) != len(rows):
            raise DataError(f"stage {i}: expected [{len(rows)}, K] probabilities, got {list(p.shape)}")
        if out is None:
            out = np.empty((n, p.shape[1]), dtype=p.dtype)
        take = answers(p, t[i]) if i < len(t) else np.ones(len(rows), dtype=bool)
        out[rows[take]] = p[take]
        answered_by[rows[take]] = i
        rows = rows[~take]
        if rows.size == 0:
            break
    assert out is not None
    return out, answered_by


# -- accuracy and cost ---------------------------------------------------------------------------------------


def _costs(costs_ms: Sequence[float], stages: int) -> np.ndarray:
    try:
        costs = np.asarray([float(c) for c in costs_ms], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"costs_ms: expected numbers (ms per image), got {costs_ms!r}") from err
    if len(costs) != stages:
        raise ConfigError(f"costs_ms: {stages} stages need {stages} costs (ms per image), got {len(costs)}")
    if not np.all(np.isfinite(costs) & (costs > 0)):
        raise ConfigError(f"costs_ms: every cost must be a finite number > 0 (ms per image), got {costs_ms}")
    return costs


def _labels(labels: Any, n: int, num_classes: int, what: str = "labels") -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or len(arr) != n:
        raise DataError(f"{what}: expected {n} labels (one per image), got shape {list(arr.shape)}")
    if arr.dtype.kind not in "iu":
        raise DataError(f"{what}: expected integer class indices, got {arr.dtype}")
    if n and (arr.min() < 0 or arr.max() >= num_classes):
        raise DataError(
            f"{what}: class indices must be in 0..{num_classes - 1}, got {int(arr.min())}..{int(arr.max())}"
        )
    return arr.astype(np.int64)


def _runs(thresholds: Sequence[float], stages: int) -> np.ndarray:
    """1.0 for each stage that runs, 0.0 for a stage at ``NEVER`` (never answers, so never run)."""
    return np.asarray([float(t <= 1.0) for t in thresholds] + [1.0] * (stages - len(thresholds)))


def _summary(
    exit_at: np.ndarray, correct: np.ndarray, costs: np.ndarray, thresholds: Sequence[float]
) -> dict[str, Any]:
    """top-1 (%), expected cost (ms) and exit fractions of a routing; ``correct`` is bool ``[S, N]``."""
    n = len(exit_at)
    s = len(costs)
    exits = np.bincount(exit_at, minlength=s)
    reach = n - np.concatenate([[0], np.cumsum(exits)[:-1]])  # images that reach each stage
    right = int(correct[exit_at, np.arange(n)].sum())
    return {
        "top1": 100.0 * right / n,
        "cost_ms": float(reach @ (costs * _runs(thresholds, s))) / n,
        "exit_fractions": [float(e) / n for e in exits],
    }


def evaluate_cascade(
    probs: Sequence[np.ndarray], labels: Any, thresholds: Sequence[float], costs_ms: Sequence[float]
) -> dict[str, Any]:
    """How a cascade does on a labelled set (e.g. the test split): ``top1`` (%), ``cost_ms`` (expected per
    image), ``exit_fractions`` (per stage), ``reference_top1`` / ``reference_cost_ms`` (the last stage
    alone) and ``num_images``. Arguments as for `route` and `fit_thresholds`."""
    arrays = _probs(probs)
    n, k = arrays[0].shape
    if n == 0:
        raise DataError("probs: no images")
    y = _labels(labels, n, k)
    t = _thresholds(thresholds, len(arrays))
    costs = _costs(costs_ms, len(arrays))
    correct = np.stack([p.argmax(axis=1) == y for p in arrays])
    out = _summary(_exits([confidence(p) for p in arrays], t), correct, costs, t)
    out["reference_top1"] = 100.0 * float(correct[-1].mean())
    out["reference_cost_ms"] = float(costs[-1])
    out["num_images"] = int(n)
    return out


# -- fitting -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CascadeFit:
    """Thresholds fitted on a validation split, and how the cascade did there.

    ``thresholds``: one per stage but the last (``NEVER``: the stage never answers); ``target_top1``,
    ``val_top1``, ``val_reference_top1`` (the last stage alone): top-1 in percent; ``expected_cost_ms``:
    mean cost per image; ``exit_fractions``: share of images each stage answered; ``reached``: whether
    ``val_top1 >= target_top1`` (False: the target was out of reach and every image escalates to the last
    stage); ``num_val``: validation images; ``search``: "exact" or "descent".
    """

    thresholds: tuple[float, ...]
    target_top1: float
    val_top1: float
    val_reference_top1: float
    expected_cost_ms: float
    exit_fractions: tuple[float, ...]
    reached: bool
    num_val: int
    search: str = "exact"

    def to_dict(self) -> dict[str, Any]:
        return {
            "thresholds": list(self.thresholds),
            "target_top1": self.target_top1,
            "val_top1": self.val_top1,
            "val_reference_top1": self.val_reference_top1,
            "expected_cost_ms": self.expected_cost_ms,
            "exit_fractions": list(self.exit_fractions),
            "reached": self.reached,
            "num_val": self.num_val,
            "search": self.search,
        }

    @classmethod
    def from_dict(cls, data: Any) -> CascadeFit:
        """The inverse of `to_dict`; CheckpointError naming the field when one is missing or malformed."""
        if not isinstance(data, dict):
            raise CheckpointError(f"fit: expected an object, got {type(data).__name__}")
        try:
            return cls(
                thresholds=tuple(float(t) for t in data["thresholds"]),
                target_top1=float(data["target_top1"]),
                val_top1=float(data["val_top1"]),
                val_reference_top1=float(data["val_reference_top1"]),
                expected_cost_ms=float(data["expected_cost_ms"]),
                exit_fractions=tuple(float(f) for f in data["exit_fractions"]),
                reached=bool(data["reached"]),
                num_val=int(data["num_val"]),
                search=str(data.get("search", "exact")),
            )
        except KeyError as err:
            raise CheckpointError(f"fit: lacks the field {err.args[0]!r}") from err
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"fit: malformed value: {err}") from err


def _candidates(conf: np.ndarray, grid: int) -> np.ndarray:
    """Sorted candidate thresholds of one stage: its observed confidences (an empirical quantile grid of
    at most ``grid`` of them when there are more; the lowest is always in, so "answer everything" is a
    candidate), then ``NEVER``."""
    values = np.unique(conf)
    if len(values) > grid:
        q = np.linspace(0.0, 1.0, grid)
        values = np.unique(np.quantile(conf, q, method="inverted_cdf"))  # observed values only
    return np.append(values, NEVER)


def _levels(conf: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """How many candidates are <= each confidence: the row answers at candidate j exactly when j < level."""
    return np.searchsorted(cand, conf, side="right").astype(np.int64)


def _cum_counts(levels: Sequence[np.ndarray], dims: Sequence[int], mask: np.ndarray | None) -> np.ndarray:
    """``C[a_0, ..]`` = number of rows (those in ``mask``) with ``levels[k] <= a_k`` for every k."""
    flat = np.ravel_multi_index(tuple(levels), tuple(dims))
    if mask is not None:
        flat = flat[mask]
    out = np.bincount(flat, minlength=int(np.prod(dims))).reshape(tuple(dims))
    for axis in range(len(dims)):
        out = np.cumsum(out, axis=axis)
    return out


def _exact(
    levels: list[np.ndarray], sizes: list[int], correct: np.ndarray, costs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(correct count, total cost) of every setting on the grid, shape ``sizes`` (one axis per threshold).

    Stage i (not last) answers a row correctly at setting J when the row reached it (``L_k <= j_k`` for
    every k < i), answers (``L_i > j_i``) and its prediction is right; the last stage when the row reached
    it. Both are cumulative counts over the candidate levels, read off at J.
    """
    m = len(sizes)
    dims = [g + 1 for g in sizes]  # a level runs 0..g
    right = np.zeros(sizes, dtype=np.int64)
    cost = np.zeros(sizes, dtype=np.float64)
    keep = tuple(slice(0, g) for g in sizes)
    for i in range(m + 1):
        shape = sizes[:i] + [1] * (m - i)  # what stage i depends on: thresholds 0..i-1
        reach = _cum_counts(levels[:i], dims[:i], None)[keep[:i]] if i else len(levels[0])
        term = costs[i] * np.reshape(reach, shape)
        if i < m:  # at NEVER (its last candidate) stage i answers nothing: it is skipped, not run
            runs = np.ones(sizes[i])
            runs[-1] = 0.0
            term = term * np.reshape(runs, [1] * i + [sizes[i]] + [1] * (m - i - 1))
        cost += term
        if i < m:  # reached stage i, and answered there: all of level i minus those at level <= j_i
            c = _cum_counts(levels[: i + 1], dims[: i + 1], correct[i])
            hit = c[(*keep[:i], slice(dims[i] - 1, dims[i]))] - c[keep[: i + 1]]
            right += np.reshape(hit, sizes[: i + 1] + [1] * (m - i - 1))
        else:
            right += np.reshape(_cum_counts(levels, dims, correct[m])[keep], sizes)
    return right, cost


def _best(right: np.ndarray, cost: np.ndarray, needed: int) -> tuple[int, bool]:
    """Flat index of the cheapest setting with at least ``needed`` right answers (ties: more right, then
    the first), or of the most accurate one (ties: cheaper, then the first) when none has; and whether the
    target was reached."""
    right, cost = right.ravel(), cost.ravel()
    feasible = right >= needed
    if feasible.any():
        low = cost[feasible].min()
        tied = feasible & np.isclose(cost, low, rtol=1e-12, atol=0.0)
        best = np.flatnonzero(tied & (right == right[tied].max()))[0]
        return int(best), True
    top = right == right.max()
    best = np.flatnonzero(top & np.isclose(cost, cost[top].min(), rtol=1e-12, atol=0.0))[0]
    return int(best), False


def _descent(
    levels: list[np.ndarray], sizes: list[int], correct: np.ndarray, costs: np.ndarray, needed: int
) -> tuple[list[int], bool]:
    """Coordinate descent over candidate indices (module docstring): (indices, target reached)."""
    m = len(sizes)
    n = correct.shape[1]
    cum_cost = np.cumsum(costs)  # what a row answered at stage i has cost
    js = [g - 1 for g in sizes]  # start: every stage NEVER (the last candidate)

    for _ in range(_MAX_SWEEPS):
        changed = False
        for i in range(m):
            # Exit stage of every row when stage i answers nothing (thresholds other than i fixed).
            fixed = [(lv > j) for lv, j in zip(levels, js, strict=True)]
            fixed[i] = np.zeros(n, dtype=bool)
            exit_at = np.full(n, m, dtype=np.int64)
            open_ = np.ones(n, dtype=bool)
            for k in range(m):
                take = open_ & fixed[k]
                exit_at[take] = k
                open_ &= ~take
            reach_i = exit_at >= i  # rows that get to stage i: every earlier stage escalated them
            base_right = correct[exit_at, np.arange(n)].astype(np.int64)
            base_cost = cum_cost[exit_at]
            # Answering at stage i instead changes a reaching row's outcome by (answer - escalate).
            d_right = np.where(reach_i, correct[i].astype(np.int64) - base_right, 0)
            d_cost = np.where(reach_i, cum_cost[i] - base_cost, 0.0)
            g = sizes[i]
            lv = levels[i]
            # Candidate j answers the rows with level > j: suffix sums over levels j+1..g.
            hist_r = np.bincount(lv, weights=d_right, minlength=g + 1)
            hist_c = np.bincount(lv, weights=d_cost, minlength=g + 1)
            suffix_r = np.cumsum(hist_r[::-1])[::-1][1:]  # [j] = sum over levels > j, j = 0..g-1
            suffix_c = np.cumsum(hist_c[::-1])[::-1][1:]
            right = int(base_right.sum()) + np.rint(suffix_r).astype(np.int64)
            cost = float(base_cost.sum()) + suffix_c
            short = np.maximum(needed - right, 0)
            best = int(np.lexsort((-right, cost, short))[0])  # by shortfall, then cost, then accuracy
            if _better((short[best], cost[best], right[best]), (short[js[i]], cost[js[i]], right[js[i]])):
                js[i] = best
                changed = True
        if not changed:
            break
    # Stage i answers at candidate j the rows whose level is > j, i.e. >= j + 0.5 (the last stage: the rest).
    exit_at = _exits([*(lv.astype(np.float64) for lv in levels), np.zeros(n)], [j + 0.5 for j in js])
    return js, int(correct[exit_at, np.arange(n)].sum()) >= needed


def _better(new: tuple[int, float, int], old: tuple[int, float, int]) -> bool:
    """Whether (shortfall, cost, right) ``new`` beats ``old``; costs within rounding count as equal, so
    the same setting reached through another coordinate never looks better than itself."""
    if new[0] != old[0]:
        return new[0] < old[0]
    tol = 1e-9 * max(1.0, abs(old[1]))
    if abs(new[1] - old[1]) > tol:
        return new[1] < old[1]
    return new[2] > old[2]


def fit_thresholds(
    probs: Sequence[np.ndarray],
    labels: Any,
    costs_ms: Sequence[float],
    target_top1: float,
    *,
    search: str = "auto",
    grid: int | None = None,
) -> CascadeFit:
    """The thresholds that reach ``target_top1`` on a validation set at the lowest expected cost.

    ``probs``: one ``[N, K]`` array of validation probabilities per stage, smallest student first;
    ``labels``: int ``[N]``; ``costs_ms``: each stage's cost per image (ms, > 0); ``target_top1``: percent.
    ``search``: "exact" (every combination of candidates; memory grows as grid^thresholds), "descent"
    (coordinate descent) or "auto" (exact up to three thresholds); ``grid``: candidates per stage (default:
    exact, as many as keep the search to about 2^20 settings: every observed confidence with one threshold,
    1024 with two, 101 with three; descent, 1024). The module docstring has the objective and the search.
    When no setting reaches the target, every threshold is ``NEVER`` and ``reached`` is False.
    Raises DataError / ConfigError naming the argument that is malformed.
    """
    arrays = _probs(probs)
    s = len(arrays)
    if s < 2:
        raise ConfigError(f"probs: a cascade needs at least 2 stages, got {s}")
    n, k = arrays[0].shape
    if n == 0:
        raise DataError("probs: no validation images")
    y = _labels(labels, n, k)
    costs = _costs(costs_ms, s)
    target = float(target_top1)
    if not math.isfinite(target) or not 0 < target <= 100:
        raise ConfigError(f"target_top1: expected a percentage in (0, 100], got {target_top1}")
    if search not in SEARCHES:
        raise ConfigError(f"search: expected one of {SEARCHES}, got {search!r}")
    m = s - 1
    method = search if search != "auto" else ("exact" if m <= EXACT_MAX_THRESHOLDS else "descent")
    if grid is None:
        grid = DESCENT_GRID if method == "descent" else max(2, int(round(GRID_CELLS ** (1 / m), 6)))
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
        raise ConfigError(f"grid: expected an integer >= 2 (candidate thresholds per stage), got {grid!r}")

    conf = [confidence(p) for p in arrays]
    correct = np.stack([p.argmax(axis=1) == y for p in arrays])  # [S, N]
    cands = [_candidates(conf[i], grid) for i in range(m)]
    levels = [_levels(conf[i], cands[i]) for i in range(m)]
    sizes = [len(c) for c in cands]
    needed = math.ceil(target * n / 100.0 - 1e-9)  # right answers the target asks for
    if method == "exact":
        right, cost = _exact(levels, sizes, correct, costs)
        flat, reached = _best(right, cost, needed)
        js = [int(j) for j in np.unravel_index(flat, sizes)]
    else:
        js, reached = _descent(levels, sizes, correct, costs, needed)
    thresholds = tuple(float(cands[i][j]) for i, j in enumerate(js)) if reached else (NEVER,) * m
    summary = _summary(_exits(conf, thresholds), correct, costs, thresholds)
    return CascadeFit(
        thresholds=thresholds,
        target_top1=target,
        val_top1=summary["top1"],
        val_reference_top1=100.0 * float(correct[-1].mean()),
        expected_cost_ms=summary["cost_ms"],
        exit_fractions=tuple(summary["exit_fractions"]),
        reached=reached,
        num_val=int(n),
        search=method,
    )


# -- the cascade folder --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CascadeStage:
    """One student of a cascade folder: ``label`` (its sub-folder, what a response names), ``folder``
    (absolute), ``name`` / ``precision`` / ``params`` from its config card, ``cost_ms`` per image."""

    label: str
    folder: Path
    name: str
    precision: str
    params: int | None
    cost_ms: float


@dataclass(frozen=True)
class Cascade:
    """A cascade folder as `read_cascade` found it: stages smallest first, their thresholds, the fit."""

    folder: Path
    stages: tuple[CascadeStage, ...]
    thresholds: tuple[float, ...]
    fit: CascadeFit
    classes: tuple[str, ...]
    input_shape: tuple[int, ...]

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(stage.label for stage in self.stages)


def _label(config: dict[str, Any], folder: Path) -> str:
    """What responses call a student: its card's ``student`` (``S5``), else its folder's name."""
    label = str(config.get("student") or folder.name)
    if not _LABEL.fullmatch(label):
        raise CheckpointError(
            f"{folder}: student label {label!r} is not a plain name (letters, digits, '.', '_', '-'); "
            "it names the student's sub-folder in the cascade"
        )
    return label


def _check_shared(configs: Sequence[dict[str, Any]], folders: Sequence[Path], where: str) -> None:
    first = configs[0]
    for folder, config in zip(folders[1:], configs[1:], strict=True):
        for field in SHARED_FIELDS:
            if config.get(field) != first.get(field):
                raise CheckpointError(
                    f"{where}: {folder} has {field}={config.get(field)!r} but {folders[0]} has "
                    f"{first.get(field)!r}; a cascade's students must share classes, input shape and "
                    "normalization"
                )


def read_cascade(folder: str | Path) -> Cascade:
    """Read and check a cascade folder written by `build_cascade` (its students' config cards too).

    Raises CheckpointError naming ``cascade.json`` and the field when the folder is not a readable cascade:
    wrong format, fewer than 2 students, a student sub-folder missing or outside the folder, students that
    disagree on classes or input, thresholds of the wrong number or value.
    """
    folder = Path(folder)
    path = folder / CASCADE_FILE
    card = read_versioned_json(path, CASCADE_FORMAT, "a cascade folder (bockd.cascade.build_cascade)")
    rule = card.get("confidence", CONFIDENCE)
    if rule != CONFIDENCE:
        raise CheckpointError(f"{path}: confidence {rule!r} is not {CONFIDENCE!r}")
    students = card.get("students")
    if not isinstance(students, list) or len(students) < 2:
        raise CheckpointError(f"{path}: students: expected a list of at least 2, got {students!r}")
    root = folder.resolve()
    stages, configs = [], []
    for i, entry in enumerate(students):
        if not isinstance(entry, dict):
            raise CheckpointError(f"{path}: students[{i}]: expected an object, got {entry!r}")
        try:
            label, sub, cost = str(entry["label"]), str(entry["dir"]), float(entry["cost_ms"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: students[{i}]: needs label, dir and cost_ms ({err})") from err
        stage_dir = (folder / sub).resolve()
        if not _LABEL.fullmatch(sub) or stage_dir.parent != root:
            raise CheckpointError(f"{path}: students[{i}].dir {sub!r} is not a sub-folder of {folder}")
        if not math.isfinite(cost) or cost <= 0:
            raise CheckpointError(f"{path}: students[{i}].cost_ms must be > 0, got {cost}")
        config = read_student_config(stage_dir)
        configs.append(config)
        params = entry.get("params", config.get("params"))
        stages.append(
            CascadeStage(
                label=label,
                folder=stage_dir,
                name=str(entry.get("name", config.get("name", label))),
                precision=str(entry.get("precision", config.get("precision", "fp32"))),
                params=int(params) if isinstance(params, int) else None,
                cost_ms=cost,
            )
        )
    labels = [s.label for s in stages]
    if len(set(labels)) != len(labels):
        raise CheckpointError(f"{path}: students: labels must be distinct, got {labels}")
    _check_shared(configs, [s.folder for s in stages], str(path))
    try:
        thresholds = _thresholds(card.get("thresholds", ()), len(stages))
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from err
    fit = CascadeFit.from_dict(card.get("fit"))
    return Cascade(
        folder=folder,
        stages=tuple(stages),
        thresholds=thresholds,
        fit=fit,
        classes=tuple(str(c) for c in configs[0].get("classes", [])),
        input_shape=tuple(int(v) for v in configs[0].get("input_shape", [])),
    )


def _replaceable(folder: Path) -> bool:
    """Only an empty folder or an earlier cascade may be deleted to make way for a new one."""
    if not folder.is_dir():
        return False
    return not any(folder.iterdir()) or (folder / CASCADE_FILE).is_file()


def _val_images(images: Any, input_shape: Sequence[int]) -> np.ndarray:
    arr = np.asarray(images)
    c, h, w = (int(v) for v in input_shape)
    if arr.dtype != np.uint8 or arr.ndim != 4 or tuple(arr.shape[1:]) != (h, w, c) or len(arr) == 0:
        raise DataError(
            f"val_images: expected uint8 [N, {h}, {w}, {c}] with N >= 1 (the students' input), "
            f"got {arr.dtype} {list(arr.shape)}"
        )
    return arr


def build_cascade(
    student_dirs: Sequence[str | Path],
    out_dir: str | Path,
    val_images: np.ndarray,
    val_labels: Any,
    costs_ms: Sequence[float],
    target_top1: float | None = None,
    max_drop: float = 0.5,
    *,
    search: str = "auto",
    grid: int | None = None,
    threads: int | None = None,
) -> CascadeFit:
    """Fit a cascade of exported students on a validation split and write its folder.

    ``student_dirs``: exported (``bockd.export``) or int8 (``bockd.quantize``) student folders, smallest
    first (the escalation order); ``val_images``: uint8 ``[N, H, W, C]`` held out from training and from
    the test split; ``val_labels``: int ``[N]``; ``costs_ms``: each student's cost per image (ms);
    ``target_top1`` (%): default the last (largest) student's validation top-1 minus ``max_drop`` points.
    ``search`` / ``grid``: as for `fit_thresholds`; ``threads``: ONNX Runtime's intra-op threads.

    Writes ``out_dir`` atomically (it may be new, empty or an earlier cascade): ``cascade.json`` and one
    sub-folder per student named by its label, a copy of the student folder without
    ``model.safetensors``. Returns the fit. Raises ConfigError (the students, costs, target), DataError
    (the validation data) or CheckpointError (an unreadable or mismatched student folder, an out_dir that
    is something else), each naming the field.
    """
    from bockd.onnx_student import OnnxStudent, softmax  # ONNX Runtime loads only when students are scored

    if isinstance(student_dirs, (str, Path)) or len(student_dirs) < 2:
        got = 1 if isinstance(student_dirs, (str, Path)) else len(student_dirs)
        raise ConfigError(f"students: a cascade needs at least 2 student folders, got {got}")
    folders = [Path(d) for d in student_dirs]
    resolved = [f.resolve() for f in folders]
    if len(set(resolved)) != len(resolved):
        raise ConfigError(f"students: the same folder is given twice: {[str(f) for f in folders]}")
    costs = _costs(costs_ms, len(folders))
    if not (isinstance(max_drop, (int, float)) and math.isfinite(max_drop) and max_drop >= 0):
        raise ConfigError(f"max_drop: expected points of top-1 >= 0, got {max_drop!r}")
    if target_top1 is not None and not (
        isinstance(target_top1, (int, float)) and math.isfinite(target_top1) and 0 < target_top1 <= 100
    ):
        raise ConfigError(f"target_top1: expected a percentage in (0, 100], got {target_top1!r}")
    configs = [read_student_config(f) for f in folders]
    labels = [_label(c, f) for c, f in zip(configs, folders, strict=True)]
    if len(set(labels)) != len(labels):
        raise ConfigError(
            f"students: labels must be distinct (they name the answering student), got {labels}"
        )
    _check_shared(configs, folders, "students")
    out_dir = Path(out_dir)
    if out_dir.exists() and not _replaceable(out_dir):
        raise CheckpointError(
            f"out: {out_dir} exists and is not a cascade folder; refusing to replace it "
            "(choose a new or empty folder)"
        )
    num_classes = int(configs[0]["num_classes"])
    images = _val_images(val_images, configs[0]["input_shape"])
    y = _labels(val_labels, len(images), num_classes, "val_labels")

    probs = [softmax(OnnxStudent(f, threads=threads).logits(images)) for f in folders]
    if target_top1 is None:
        reference = 100.0 * float((probs[-1].argmax(axis=1) == y).mean())
        target_top1 = max(reference - float(max_drop), 1e-6)
    fit = fit_thresholds(probs, y, costs, float(target_top1), search=search, grid=grid)

    card = {
        "format": CASCADE_FORMAT,
        "confidence": CONFIDENCE,
        "students": [
            {
                "label": label,
                "dir": label,
                "name": config.get("name", label),
                "precision": config.get("precision", "fp32"),
                "params": config.get("params"),
                "cost_ms": float(cost),
            }
            for label, config, cost in zip(labels, configs, costs, strict=True)
        ],
        "thresholds": list(fit.thresholds),
        "fit": fit.to_dict(),
        "classes": configs[0].get("classes"),
        "num_classes": num_classes,
        "input_shape": configs[0].get("input_shape"),
        "mean": configs[0].get("mean"),
        "std": configs[0].get("std"),
    }
    with atomic_dir(out_dir, CheckpointError) as tmp:  # readable by others: a serving container reads it
        for folder, label in zip(folders, labels, strict=True):
            shutil.copytree(folder, tmp / label, ignore=shutil.ignore_patterns(WEIGHTS_FILE))
        write_json(tmp / CASCADE_FILE, card)
    return fit
