"""Which trained students to deploy, and why (the pipeline's ``select`` step).

A :class:`Policy` is a set of optional rules combined with AND. They are applied in this fixed order:

0. exclusion           a candidate that may not ship whatever the policy says (``Candidate.excluded``: an
                       int8 version over its accuracy-drop limit or not measurably faster than its fp32)
1. ``students``        explicit list, 1-based as users type them (1 = S1); both precisions of a student
2. ``min_top1``        accuracy floor
3. ``max_params``      parameter budget
4. ``max_size_pct``    size budget (% of the whole ensemble)
5. ``max_latency_ms``  latency budget (``Candidate.latency_ms``: the pipeline passes the p50 of one image
                       served by the model server where measured); a student without a latency fails it
6. ``beat_champion``   top-1 strictly greater than the student's own @champion (``Candidate.champion_top1``,
                       else ``Policy.champion_top1``); equal is not better
7. ``pareto``          keep the Pareto front of (higher top-1, fewer params) among the survivors of 1-6
8. ``best_only``       keep the single best survivor by top-1 (ties: fewer params, then lower latency, then
                       lower index, then fp32)

A candidate is one student at one precision (``"fp32"``, or ``"int8"``: same student, same params).
Rules 0-6 judge each candidate on its own, so a rejected one's reason lists *every* such rule it fails.
Rules 7-8 compare students with each other, so they only see the students that passed 1-6. An empty policy
selects every student; a policy that selects nothing is not an error: the selection is empty and every
reason says why.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bockd.config import format_validation_errors
from bockd.errors import ConfigError

__all__ = ["Candidate", "Choice", "Policy", "Selection", "select"]


@dataclass(frozen=True)
class Candidate:
    """One trained student as the evaluate step measured it. ``index`` is 0-based, ``top1`` in %."""

    name: str
    index: int
    params: int
    size_pct: float
    top1: float
    latency_ms: float | None = None
    baseline_top1: float | None = None
    champion_top1: float | None = None  # this student's own @champion, if any (else Policy.champion_top1)
    precision: str = "fp32"
    excluded: str | None = None  # why it may not ship whatever the policy says (rule 0); None: it may
    latency_basis: str = "latency"  # what latency_ms is, as reasons name it ("served p50")


@dataclass(frozen=True)
class Choice:
    """The verdict on one candidate, with a reason that names the numbers it was judged on."""

    name: str
    index: int
    selected: bool
    reason: str
    precision: str = "fp32"


class Policy(BaseModel):
    """Selection rules, all optional, combined with AND (see the module docstring for the order)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    students: list[int] | None = Field(None, min_length=1)
    min_top1: float | None = Field(None, ge=0, le=100)
    max_params: int | None = Field(None, gt=0)
    max_size_pct: float | None = Field(None, gt=0)
    max_latency_ms: float | None = Field(None, gt=0)
    pareto: bool = False
    champion_top1: float | None = Field(None, ge=0, le=100)
    beat_champion: bool = False
    best_only: bool = False

    @field_validator("students")
    @classmethod
    def _students_positive_unique(cls, students: list[int] | None) -> list[int] | None:
        if students is None:
            return None
        if any(s < 1 for s in students):
            raise ValueError("students are numbered from 1 (1 = S1)")
        if len(set(students)) != len(students):
            raise ValueError("a student is listed more than once")
        return students

    @classmethod
    def from_mapping(cls, raw: dict[str, Any] | None) -> Policy:
        """A validated policy from a plain dict (YAML, CLI); errors become ConfigError naming the field."""
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"selection policy: expected a mapping, got {type(raw).__name__}")
        try:
            return cls.model_validate(raw or {})
        except ValidationError as err:
            msg = format_validation_errors(err).replace("invalid config:", "invalid selection policy:", 1)
            raise ConfigError(msg) from None


@dataclass(frozen=True)
class Selection:
    """The outcome: every candidate exactly once, in ``chosen`` or ``rejected`` (both in index order)."""

    chosen: list[Choice]
    rejected: list[Choice]
    policy: dict[str, Any]
    # Kept so the report table can show the measured numbers next to each verdict.
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.chosen]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: only str, int, float, bool, None, lists and dicts."""
        return {
            "chosen": [asdict(c) for c in self.chosen],
            "rejected": [asdict(c) for c in self.rejected],
            "policy": dict(self.policy),
            "candidates": [asdict(c) for c in self.candidates],
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Selection:
        return cls(
            chosen=[Choice(**c) for c in raw["chosen"]],
            rejected=[Choice(**c) for c in raw["rejected"]],
            policy=dict(raw["policy"]),
            candidates=[Candidate(**c) for c in raw.get("candidates", [])],
        )

    def markdown(self) -> str:
        """A Markdown table, one row per candidate in student order (fp32 before int8), for the report."""
        by_key = {(c.index, c.precision): c for c in self.candidates}
        verdicts = sorted(self.chosen + self.rejected, key=lambda c: (c.index, c.precision != "fp32"))
        lines = [
            "| student | params | size % | top-1 | selected | reason |",
            "|---|---:|---:|---:|:---:|---|",
        ]
        for v in verdicts:
            cand = by_key.get((v.index, v.precision))
            params = f"{cand.params:,}" if cand else "-"
            size = f"{cand.size_pct:.2f}" if cand else "-"
            top1 = f"{cand.top1:.2f}" if cand else "-"
            reason = v.reason.replace("|", "\\|")  # a bare pipe would split the cell
            lines.append(
                f"| {v.name} | {params} | {size} | {top1} | {'yes' if v.selected else 'no'} | {reason} |"
            )
        return "\n".join(lines) + "\n"


def _pct(x: float) -> str:
    return f"{x:.2f} %"


def _at(c: Candidate) -> str:
    return f"{_pct(c.top1)} at {c.params:,} params"


def _order(c: Candidate) -> tuple[int, bool]:
    """Student order, fp32 before int8: the order of verdicts and tables."""
    return (c.index, c.precision != "fp32")


def _rank_key(c: Candidate) -> tuple[float, int, float, int, bool]:
    # Best first: higher top-1, then fewer params, then lower latency (an int8 version that ties its fp32
    # on top-1 and is measurably faster wins), then lower index, then fp32 (deterministic tie-break).
    latency = c.latency_ms if c.latency_ms is not None else math.inf
    return (-c.top1, c.params, latency, c.index, c.precision != "fp32")


def _check_candidates(candidates: list[Candidate]) -> None:
    if not candidates:
        raise ConfigError("candidates: no students to select from")
    for c in candidates:
        if c.index < 0 or c.params < 0 or not math.isfinite(c.top1) or not 0 <= c.top1 <= 100:
            raise ConfigError(
                f"candidates: {c.name!r} has an impossible value (index {c.index}, params {c.params}, "
                f"top-1 {c.top1}); expected index >= 0, params >= 0, 0 <= top-1 <= 100"
            )
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise ConfigError(f"candidates: duplicate student name in {names}")
    keys = [(c.index, c.precision) for c in candidates]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"candidates: duplicate student index and precision in {keys}")


def _valid_range(candidates: list[Candidate]) -> str:
    numbers = sorted(c.index + 1 for c in candidates)
    if numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"{numbers[0]}..{numbers[-1]}"
    return ", ".join(map(str, numbers))


def _individual(c: Candidate, p: Policy) -> tuple[list[str], list[str]]:
    """(passed, failed) reasons for rules 1-6, which judge a candidate on its own."""
    ok: list[str] = []
    bad: list[str] = [c.excluded] if c.excluded else []

    def rule(passed: bool, yes: str, no: str) -> None:
        (ok if passed else bad).append(yes if passed else no)

    if p.students is not None:
        listed = ", ".join(f"S{s}" for s in p.students)
        rule(
            c.index + 1 in p.students, f"listed in students ({listed})", f"not listed in students ({listed})"
        )
    if p.min_top1 is not None:
        rule(
            c.top1 >= p.min_top1,
            f"top-1 {_pct(c.top1)} >= floor {_pct(p.min_top1)}",
            f"top-1 {_pct(c.top1)} < floor {_pct(p.min_top1)}",
        )
    if p.max_params is not None:
        rule(
            c.params <= p.max_params,
            f"{c.params:,} params <= budget {p.max_params:,}",
            f"{c.params:,} params > budget {p.max_params:,}",
        )
    if p.max_size_pct is not None:
        rule(
            c.size_pct <= p.max_size_pct,
            f"size {_pct(c.size_pct)} <= budget {_pct(p.max_size_pct)}",
            f"size {_pct(c.size_pct)} > budget {_pct(p.max_size_pct)}",
        )
    if p.max_latency_ms is not None:
        if c.latency_ms is None:
            bad.append(f"no latency measured (budget {p.max_latency_ms:.2f} ms)")
        else:
            what = f"{c.latency_basis} {c.latency_ms:.2f} ms"
            rule(
                c.latency_ms <= p.max_latency_ms,
                f"{what} <= budget {p.max_latency_ms:.2f} ms",
                f"{what} > budget {p.max_latency_ms:.2f} ms",
            )
    if p.beat_champion:
        champion = c.champion_top1 if c.champion_top1 is not None else p.champion_top1
        if champion is None:
            # No champion yet (first deployment): there is nothing to beat.
            ok.append("no current champion to beat")
        else:
            rule(
                c.top1 > champion,
                f"top-1 {_pct(c.top1)} beats champion {_pct(champion)}",
                f"top-1 {_pct(c.top1)} does not beat champion {_pct(champion)}",
            )
    return ok, bad


Key = tuple[int, str]  # (index, precision): one candidate


def _key(c: Candidate) -> Key:
    return (c.index, c.precision)


def _pareto(pool: list[Candidate]) -> dict[Key, str | None]:
    """key -> None if on the front of (higher top-1, fewer params), else why it is off the front."""
    out: dict[Key, str | None] = {}
    for c in pool:
        dominators = [
            d
            for d in pool
            if d is not c
            and d.top1 >= c.top1
            and d.params <= c.params
            and (d.top1 > c.top1 or d.params < c.params)
        ]
        # Exact ties (same top-1 and params) dominate nobody; keep the first in student order so the result
        # is stable (an int8 version tying its fp32 one is a twin: fp32 is kept).
        twins = [d for d in pool if d is not c and d.top1 == c.top1 and d.params == c.params]
        if dominators:
            d = min(dominators, key=_rank_key)
            out[_key(c)] = f"dominated by {d.name}: {_at(d)} (vs {_at(c)})"
        elif any(_order(t) < _order(c) for t in twins):
            t = min(twins, key=_order)
            out[_key(c)] = f"tied with {t.name} ({_at(c)}) on the Pareto front; the one listed first is kept"
        else:
            out[_key(c)] = None
    return out


def select(candidates: list[Candidate], policy: Policy | dict[str, Any] | None = None) -> Selection:
    """Apply ``policy`` to ``candidates``; every candidate gets a verdict and a reason."""
    candidates = sorted(candidates, key=_order)
    _check_candidates(candidates)
    if not isinstance(policy, Policy):
        policy = Policy.from_mapping(policy)
    if policy.students is not None:
        known = {c.index + 1 for c in candidates}
        unknown = [s for s in policy.students if s not in known]
        if unknown:
            raise ConfigError(
                f"students: unknown student(s) {', '.join(map(str, unknown))}; "
                f"valid students are {_valid_range(candidates)} (1 = S1)"
            )

    passed: dict[Key, list[str]] = {}
    reasons: dict[Key, tuple[bool, str]] = {}
    for c in candidates:
        ok, bad = _individual(c, policy)
        if bad:
            reasons[_key(c)] = (False, "; ".join(bad))
        else:
            passed[_key(c)] = ok

    pool = [c for c in candidates if _key(c) in passed]
    if policy.pareto and pool:
        front = _pareto(pool)
        for c in pool:
            why = front[_key(c)]
            if why is None:
                passed[_key(c)].append("on the Pareto front of accuracy against size")
            else:
                reasons[_key(c)] = (False, why)
        pool = [c for c in pool if front[_key(c)] is None]
    if policy.best_only and pool:
        best = min(pool, key=_rank_key)
        for c in pool:
            if c is best:
                passed[_key(c)].append(f"best top-1 of {len(pool)} remaining ({_pct(c.top1)})")
            else:
                reasons[_key(c)] = (False, f"not the best: {best.name} has {_at(best)} (vs {_at(c)})")
        pool = [best]
    for c in pool:
        reasons[_key(c)] = (
            True,
            "; ".join(passed[_key(c)]) or "no selection rule: every student is selected",
        )

    verdicts = [Choice(c.name, c.index, *reasons[_key(c)], precision=c.precision) for c in candidates]
    return Selection(
        chosen=[v for v in verdicts if v.selected],
        rejected=[v for v in verdicts if not v.selected],
        policy=policy.model_dump(mode="json"),
        candidates=candidates,
    )
