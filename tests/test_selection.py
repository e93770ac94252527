"""The select step: every rule alone and combined, with reasons that name the numbers."""

from __future__ import annotations

import json

import pytest

from bockd.errors import ConfigError
from bockd.pipeline.selection import Candidate, Policy, Selection, select


def _c(i: int, top1: float, params: int, latency: float | None = None) -> Candidate:
    return Candidate(f"s{i + 1}", i, params, size_pct=params / 10_000, top1=top1, latency_ms=latency)


@pytest.fixture
def cands() -> list[Candidate]:
    return [
        _c(0, 88.02, 100_000, 1.0),  # small, weak: on the front (fewest params)
        _c(1, 96.66, 171_248, 2.0),  # on the front
        _c(2, 95.10, 200_000, 3.0),  # dominated by s2
        _c(3, 97.50, 400_000, None),  # on the front (most accurate), no latency
        _c(4, 96.66, 171_248, 2.5),  # exact tie with s2
    ]


def _verdict(sel: Selection) -> dict[str, tuple[bool, str]]:
    return {c.name: (c.selected, c.reason) for c in sel.chosen + sel.rejected}


def _check_partition(sel: Selection, cands: list[Candidate]) -> None:
    names = [c.name for c in sel.chosen + sel.rejected]
    assert sorted(names) == sorted(c.name for c in cands)
    assert all(c.selected for c in sel.chosen) and not any(c.selected for c in sel.rejected)
    assert all(c.reason for c in sel.chosen + sel.rejected)


def test_empty_policy_selects_everyone(cands: list[Candidate]) -> None:
    sel = select(cands, Policy())
    _check_partition(sel, cands)
    assert sel.names == ["s1", "s2", "s3", "s4", "s5"]
    assert "every student is selected" in sel.chosen[0].reason
    assert select(cands).names == sel.names and select(cands, {}).names == sel.names


def test_explicit_students_are_one_based(cands: list[Candidate]) -> None:
    sel = select(cands, Policy(students=[1, 3]))
    assert sel.names == ["s1", "s3"]
    assert _verdict(sel)["s2"] == (False, "not listed in students (S1, S3)")


@pytest.mark.parametrize("bad", [[0], [6], [2, 9]])
def test_unknown_student_names_field_and_range(cands: list[Candidate], bad: list[int]) -> None:
    with pytest.raises(ConfigError, match=r"students") as err:
        select(cands, {"students": bad})
    if 0 not in bad:  # 0 is caught by the policy itself, before the candidates are known
        assert "valid students are 1..5" in str(err.value)


def test_duplicate_or_empty_students_rejected() -> None:
    for bad in ([1, 1], []):
        with pytest.raises(ConfigError, match=r"students: "):
            Policy.from_mapping({"students": bad})


def test_min_top1_floor_inclusive(cands: list[Candidate]) -> None:
    sel = select(cands, Policy(min_top1=95.10))
    assert sel.names == ["s2", "s3", "s4", "s5"]
    assert _verdict(sel)["s1"][1] == "top-1 88.02 % < floor 95.10 %"
    assert "top-1 95.10 % >= floor 95.10 %" in _verdict(sel)["s3"][1]


def test_param_and_size_budgets(cands: list[Candidate]) -> None:
    sel = select(cands, Policy(max_params=171_248))
    assert sel.names == ["s1", "s2", "s5"]
    assert _verdict(sel)["s3"][1] == "200,000 params > budget 171,248"
    sel = select(cands, Policy(max_size_pct=10.0))
    assert sel.names == ["s1"]
    assert _verdict(sel)["s4"][1] == "size 40.00 % > budget 10.00 %"


def test_latency_budget_and_missing_latency(cands: list[Candidate]) -> None:
    sel = select(cands, Policy(max_latency_ms=2.0))
    assert sel.names == ["s1", "s2"]
    v = _verdict(sel)
    assert v["s3"][1] == "latency 3.00 ms > budget 2.00 ms"
    assert v["s4"][1].startswith("no latency measured")


def test_pareto_front_dominated_and_tied(cands: list[Candidate]) -> None:
    sel = select(cands, Policy(pareto=True))
    _check_partition(sel, cands)
    assert sel.names == ["s1", "s2", "s4"]
    v = _verdict(sel)
    assert v["s2"][1] == "on the Pareto front of accuracy against size"
    assert v["s3"][1] == "dominated by s2: 96.66 % at 171,248 params (vs 95.10 % at 200,000 params)"
    assert v["s5"][1].startswith("tied with s2 (96.66 % at 171,248 params)")


def test_pareto_same_accuracy_more_params_is_dominated() -> None:
    cands = [_c(0, 90.0, 200), _c(1, 90.0, 100), _c(2, 80.0, 100), _c(3, 90.0, 100)]
    sel = select(cands, Policy(pareto=True))
    assert sel.names == ["s2"]
    v = _verdict(sel)
    assert v["s1"][1].startswith("dominated by s2: 90.00 % at 100 params")
    assert v["s3"][1].startswith("dominated by s2")
    assert v["s4"][1].startswith("tied with s2")
    # Order of the input list does not change the outcome.
    assert select(list(reversed(cands)), Policy(pareto=True)).names == ["s2"]


def test_champion_rule_is_strict(cands: list[Candidate]) -> None:
    sel = select(cands, Policy(beat_champion=True, champion_top1=96.66))
    assert sel.names == ["s4"]
    v = _verdict(sel)
    assert v["s2"][1] == "top-1 96.66 % does not beat champion 96.66 %"
    assert v["s4"][1] == "top-1 97.50 % beats champion 96.66 %"


def test_each_student_is_judged_against_its_own_champion(cands: list[Candidate]) -> None:
    """In the pipeline every student is its own registered model with its own @champion."""
    from dataclasses import replace

    own = [replace(c, champion_top1=t) for c, t in zip(cands, [80.0, 97.0, None, 97.5, 90.0], strict=True)]
    sel = select(own, Policy(beat_champion=True, champion_top1=99.0))
    v = _verdict(sel)
    assert sel.names == ["s1", "s5"]  # beat their own champions; s3 has none, so the policy's 99 applies
    assert v["s1"][1] == "top-1 88.02 % beats champion 80.00 %"
    assert v["s3"][1] == "top-1 95.10 % does not beat champion 99.00 %"
    assert v["s4"][1] == "top-1 97.50 % does not beat champion 97.50 %"


def test_champion_without_flag_or_value(cands: list[Candidate]) -> None:
    assert len(select(cands, Policy(champion_top1=99.0)).chosen) == 5  # informational only
    sel = select(cands, Policy(beat_champion=True))
    assert len(sel.chosen) == 5 and "no current champion" in sel.chosen[0].reason


def test_best_only_ties_prefer_fewer_params_then_index() -> None:
    cands = [_c(0, 90.0, 300), _c(1, 90.0, 200), _c(2, 85.0, 50), _c(3, 90.0, 200)]
    sel = select(cands, Policy(best_only=True))
    assert sel.names == ["s2"]
    v = _verdict(sel)
    assert v["s2"][1] == "best top-1 of 4 remaining (90.00 %)"
    assert v["s1"][1] == "not the best: s2 has 90.00 % at 200 params (vs 90.00 % at 300 params)"


def test_combined_rules_in_order(cands: list[Candidate]) -> None:
    policy = Policy(students=[2, 3, 4, 5], min_top1=90, max_params=300_000, pareto=True, best_only=True)
    sel = select(cands, policy)
    _check_partition(sel, cands)
    assert sel.names == ["s2"]
    v = _verdict(sel)
    assert v["s1"][1] == "not listed in students (S2, S3, S4, S5); top-1 88.02 % < floor 90.00 %"
    assert v["s4"][1] == "400,000 params > budget 300,000"
    assert v["s3"][1].startswith("dominated by s2")
    assert v["s5"][1].startswith("tied with s2")
    assert v["s2"][1] == (
        "listed in students (S2, S3, S4, S5); top-1 96.66 % >= floor 90.00 %; "
        "171,248 params <= budget 300,000; "
        "on the Pareto front of accuracy against size; best top-1 of 1 remaining (96.66 %)"
    )


def test_champion_then_pareto_then_best(cands: list[Candidate]) -> None:
    sel = select(cands, Policy(beat_champion=True, champion_top1=90.0, pareto=True, best_only=True))
    assert sel.names == ["s4"]
    assert _verdict(sel)["s2"][1].startswith("not the best: s4 has 97.50 %")


def test_policy_selecting_nothing_is_not_an_error(cands: list[Candidate]) -> None:
    sel = select(cands, Policy(min_top1=99.5, best_only=True, pareto=True))
    assert sel.chosen == [] and len(sel.rejected) == 5
    assert all("< floor 99.50 %" in c.reason for c in sel.rejected)
    assert sel.markdown().count("| no |") == 5


def test_empty_or_inconsistent_candidates_raise() -> None:
    with pytest.raises(ConfigError, match="candidates"):
        select([], Policy())
    with pytest.raises(ConfigError, match="duplicate"):
        select([_c(0, 90, 10), _c(0, 91, 10)], Policy())
    with pytest.raises(ConfigError, match="top-1"):
        select([_c(0, 190, 10)], Policy())


def test_to_dict_round_trips_through_json(cands: list[Candidate]) -> None:
    sel = select(cands, Policy(min_top1=90, pareto=True))
    d = sel.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert Selection.from_dict(json.loads(json.dumps(d))) == sel
    assert d["policy"]["min_top1"] == 90 and d["policy"]["pareto"] is True
    assert Policy.from_mapping(d["policy"]) == Policy(min_top1=90, pareto=True)


def test_markdown_one_row_per_candidate(cands: list[Candidate]) -> None:
    md = select(cands, Policy(pareto=True)).markdown()
    lines = md.strip().splitlines()
    assert lines[0] == "| student | params | size % | top-1 | selected | reason |"
    rows = lines[2:]
    assert len(rows) == len(cands)
    assert [r.split("|")[1].strip() for r in rows] == ["s1", "s2", "s3", "s4", "s5"]
    assert "| s3 | 200,000 | 20.00 | 95.10 | no | dominated by s2" in md


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"min_top": 90}, "min_top"),
        ({"min_top1": 101}, "min_top1"),
        ({"min_top1": "high"}, "min_top1"),
        ({"max_params": 0}, "max_params"),
        ({"max_size_pct": -1}, "max_size_pct"),
        ({"max_latency_ms": float("nan")}, "max_latency_ms"),
        ({"pareto": "maybe"}, "pareto"),
        ({"champion_top1": -3}, "champion_top1"),
        ({"students": ["x"]}, "students"),
        ({"students": [0]}, "students"),
    ],
)
def test_bad_policy_raises_config_error_naming_field(raw: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"(?m)^\s*{field}(\.\d+)?: "):
        Policy.from_mapping(raw)


def test_policy_is_frozen_and_not_a_mapping() -> None:
    with pytest.raises(ConfigError, match="mapping"):
        Policy.from_mapping([1, 2])  # type: ignore[arg-type]
    p = Policy()
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises its own frozen error
        p.min_top1 = 5  # type: ignore[misc]


# -- int8 versions: the same student at another precision --------------------------------------------------


def _q(i: int, top1: float, params: int, latency: float | None, excluded: str | None = None) -> Candidate:
    """Student i's int8 version: same params, its own top-1 and measured latency."""
    return Candidate(
        f"s{i + 1}-int8",
        i,
        params,
        size_pct=params / 10_000,
        top1=top1,
        latency_ms=latency,
        precision="int8",
        excluded=excluded,
        latency_basis="served p50",
    )


def test_a_kept_int8_version_competes_like_any_student() -> None:
    cands = [_c(0, 90.0, 100_000, 2.0), _q(0, 89.8, 100_000, 1.2), _c(1, 85.0, 50_000, 1.5)]
    sel = select(cands, Policy(max_latency_ms=1.4))
    verdict = _verdict(sel)
    assert [(c.name, c.precision) for c in sel.chosen] == [("s1-int8", "int8")]
    assert verdict["s1-int8"] == (True, "served p50 1.20 ms <= budget 1.40 ms")
    assert verdict["s1"] == (False, "latency 2.00 ms > budget 1.40 ms")
    _check_partition(sel, cands)


def test_an_excluded_int8_version_is_rejected_whatever_the_policy() -> None:
    why = "int8 not shipped: drop 1.30 > 1.00 points of top-1"
    cands = [_c(0, 90.0, 100_000, 2.0), _q(0, 88.7, 100_000, 1.0, excluded=why)]
    assert _verdict(select(cands, Policy())) == {
        "s1": (True, "no selection rule: every student is selected"),
        "s1-int8": (False, why),
    }
    # Every other rule it fails is named too.
    reason = _verdict(select(cands, Policy(min_top1=89)))["s1-int8"][1]
    assert reason == f"{why}; top-1 88.70 % < floor 89.00 %"


def test_best_only_prefers_a_faster_int8_version_tying_its_fp32() -> None:
    cands = [_c(0, 90.0, 100_000, 2.0), _q(0, 90.0, 100_000, 1.0)]
    sel = select(cands, Policy(best_only=True))
    assert sel.names == ["s1-int8"]
    assert _verdict(sel)["s1"][1].startswith("not the best: s1-int8 has 90.00 %")


def test_the_students_rule_and_pareto_see_both_precisions() -> None:
    cands = [_c(0, 90.0, 100_000, 2.0), _q(0, 89.5, 100_000, 1.0), _c(1, 80.0, 20_000, 1.0)]
    sel = select(cands, Policy(students=[1]))
    assert sel.names == ["s1", "s1-int8"]
    # Same params, lower top-1: the int8 version is off the front of accuracy against size.
    verdict = _verdict(select(cands, Policy(pareto=True)))
    assert verdict["s1-int8"] == (
        False,
        "dominated by s1: 90.00 % at 100,000 params (vs 89.50 % at 100,000 params)",
    )


def test_one_candidate_per_student_and_precision() -> None:
    twin = Candidate("other", 0, 100_000, 10.0, 90.0)
    with pytest.raises(ConfigError, match="duplicate student index and precision"):
        select([_c(0, 90.0, 100_000), twin], Policy())


def test_int8_verdicts_round_trip_and_list_after_their_fp32() -> None:
    cands = [_q(0, 89.0, 100_000, 1.0, excluded="int8 not shipped: not faster"), _c(0, 90.0, 100_000, 2.0)]
    sel = select(cands, Policy())
    d = json.loads(json.dumps(sel.to_dict()))
    assert Selection.from_dict(d) == sel
    rows = sel.markdown().strip().splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["s1", "s1-int8"]
    assert "| s1-int8 | 100,000 | 10.00 | 89.00 | no | int8 not shipped: not faster |" in rows
