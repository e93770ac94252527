"""Recipe studies: the YAML is validated before anything trains, shared baselines are trained once, and
the comparison table, JSON and plot come out after every seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import bockd.study
from bockd.cli import main
from bockd.config import LossConfig
from bockd.errors import ConfigError
from bockd.reproduce import identity_digest
from bockd.study import (
    against_best_alone,
    comparison,
    comparison_markdown,
    gain_students,
    load_study,
    plot_comparison,
    run_study,
    study_configs,
)

pytestmark = pytest.mark.usefixtures("single_thread")

QUIET = {"runtime": {"progress": "off"}}
SPEC = {
    "dataset": "digits",
    "arch": "resnet20",
    "num_students": 2,
    "seeds": [0, 1],
    "epochs": 1,
    "baselines": [2],
    "common": QUIET,
    "recipes": {
        "paper": {"preset": "smoke-paper"},
        "ce1": {"preset": "smoke-paper", "loss": {"ce_weight": 1.0}},
    },
}


def _write(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bogus": 1}, "bogus: unknown key"),
        ({"recipes": {"a/b": {"preset": "smoke"}}}, "recipe name 'a/b'"),
        ({"recipes": {"runs": {"preset": "smoke"}}}, "not 'runs'"),
        ({"recipes": {"x": {"loss": {}}}}, "recipe 'x': expected a 'preset'"),
        ({"recipes": {}}, "recipes"),
        ({"seeds": []}, "seeds"),
        ({"baselines": "some"}, "baselines"),
        ({"recipes": {"x": {"preset": "smoke", "baselines": "some"}}}, r"recipe 'x': baselines: expected"),
        ({"recipes": {"x": {"preset": "smoke", "baselines": ["1"]}}}, r"recipe 'x': baselines: expected"),
    ],
)
def test_a_bad_study_file_names_the_field(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_study(_write(tmp_path, {**SPEC, **change}))


def test_a_bad_recipe_is_refused_before_anything_trains(tmp_path: Path, monkeypatch) -> None:
    spec = load_study(
        _write(
            tmp_path,
            {**SPEC, "recipes": {**SPEC["recipes"], "fast": {"preset": "smoke", "optim": {"lr": -1}}}},
        )
    )

    def forbidden(*args, **kw):
        raise AssertionError("data loading or training started")

    monkeypatch.setattr(bockd.study, "load_training_data", forbidden)
    with pytest.raises(ConfigError, match=r"(?s)recipe 'fast': .*optim\.lr"):
        run_study(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_recipes_must_share_the_data_settings(tmp_path: Path) -> None:
    recipes = {"a": {"preset": "smoke"}, "b": {"preset": "smoke", "data": {"train_subset": 500}}}
    with pytest.raises(ConfigError, match="same data settings"):
        study_configs(load_study(_write(tmp_path, {**SPEC, "recipes": recipes})))


def test_a_recipe_may_ask_for_its_own_baselines_and_still_shares_runs(tmp_path: Path) -> None:
    recipes = {**SPEC["recipes"], "ce1": {**SPEC["recipes"]["ce1"], "baselines": "all"}}
    plans = study_configs(load_study(_write(tmp_path, {**SPEC, "recipes": recipes})))
    assert sorted(plans["paper"][0]) == ["baseline-s2", "ensemble"]  # the study's [2]
    assert sorted(plans["ce1"][0]) == ["baseline-s1", "baseline-s2", "ensemble"]  # its own "all"
    # The key selects runs; it is not a training setting, so the shared baseline stays one run.
    shared = [identity_digest(plans[r][1]["baseline-s2"]) for r in ("ce1", "paper")]
    assert shared[0] == shared[1]


def test_students_without_a_baseline_in_the_first_recipe_are_still_plotted(tmp_path: Path) -> None:
    gain = {"mean": 2.0, "std": 0.0, "values": [2.0]}
    only_s1, both = _with_baseline([0], [70.0], [68.0]), _with_baseline([0], [70.0], [68.0])
    only_s1["students"][0]["gain_points"] = both["students"][0]["gain_points"] = gain
    both["students"][1].update(baseline_final=both["students"][0]["baseline_final"], gain_points=gain)
    table = comparison({"ref": only_s1, "new": both})
    assert gain_students(table["recipes"]) == ["S1", "S2"]
    plot_comparison(table, tmp_path / "study.png", "t")
    assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_study_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_study(tmp_path / "nope.yaml")


def test_a_tiny_study_trains_shared_baselines_once_and_compares_the_recipes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    table = run_study(load_study(_write(tmp_path, SPEC)), out)

    for seed in (0, 1):  # two ensembles, and the S2 baseline both recipes share (one schedule)
        names = sorted(p.name.rsplit("-", 1)[0] for p in (out / "runs" / f"seed-{seed}").iterdir())
        assert names == ["baseline-s2", "ensemble", "ensemble"]
    assert [row["recipe"] for row in table["recipes"]] == ["paper", "ce1"]
    for row in table["recipes"]:
        assert row["seeds"] == [0, 1]
        assert "gain_points" not in row["students"]["S1"]  # no S1 baseline asked for
        s2 = row["students"]["S2"]
        assert len(s2["gain_points"]["values"]) == 2 and s2["reading"] in ("gain", "loss", "within noise")
        per_recipe = json.loads((out / row["recipe"] / "results.json").read_text())
        assert per_recipe["students"][1]["gain_points"] == s2["gain_points"]
    # The two recipes' S2 gains are paired with the very same baseline runs.
    paper, ce1 = (json.loads((out / r / "results.json").read_text())["students"][1] for r in ("paper", "ce1"))
    assert paper["baseline_final"] == ce1["baseline_final"]
    assert "against_best_alone" not in table  # one schedule: the own-baseline gains already say it all

    saved = json.loads((out / "study.json").read_text())
    assert saved["recipes"] == json.loads(json.dumps(table["recipes"]))
    md = (out / "study.md").read_text()
    assert md == comparison_markdown(comparison(table["summaries"]), table["title"])
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    run_study(load_study(_write(tmp_path, SPEC)), out)  # finished: nothing is trained again
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()} == before


def _summary(gains: list[float], reading: str) -> dict:
    mean = sum(gains) / len(gains)
    return {
        "seeds": list(range(len(gains))),
        "students": [
            {
                "student": "S1",
                "bockd_final": {"mean": 90.0, "std": 0.0, "values": [90.0] * len(gains)},
                "gain_points": {"mean": mean, "std": 0.5, "values": gains},
                "positive_seeds": sum(g > 0 for g in gains),
                "noise_points": 0.8,
                "reading": reading,
            }
        ],
        "ensemble": {"final": {"mean": 91.0, "std": 0.25, "values": [91.0] * len(gains)}},
    }


def test_comparison_markdown_marks_gains_within_noise() -> None:
    md = comparison_markdown(
        comparison({"paper": _summary([0.2, 0.4], "within noise"), "new": _summary([1.5, 1.1], "gain")}), "t"
    )
    lines = md.splitlines()
    assert "| recipe | seeds | S1 | ensemble top-1 |" in lines
    assert "| paper | 2 | +0.30 ± 0.50 (2/2) ≈ | 91.00 ± 0.25 |" in lines
    assert "| new | 2 | +1.30 ± 0.50 (2/2) | 91.00 ± 0.25 |" in lines


def _with_baseline(seeds: list[int], ours: list[float], baseline: list[float]) -> dict:
    def stat(values: list[float]) -> dict:
        return {"mean": sum(values) / len(values), "std": 0.0, "values": values}

    return {
        "seeds": seeds,
        "test_images": 10_000,
        "students": [
            {"student": "S1", "bockd_final": stat(ours), "baseline_final": stat(baseline)},
            {"student": "S2", "bockd_final": stat(ours)},  # no baseline: not compared
        ],
        "ensemble": {"final": stat(ours)},
    }


def test_against_best_alone_takes_the_best_schedule_per_seed() -> None:
    # Recipe "cos" has a stronger S1 baseline on seed 0, "step" on seed 1; seed 2 only "step" finished.
    summaries = {
        "step": _with_baseline([0, 1, 2], [70.0, 71.0, 99.0], [68.0, 70.5, 10.0]),
        "cos": _with_baseline([0, 1], [72.0, 69.0], [71.0, 69.5]),
    }
    best = against_best_alone(summaries)
    assert best is not None and best["seeds"] == [0, 1]  # seeds every recipe finished
    step, cos = (row["students"]["S1"] for row in best["recipes"])
    assert list(best["recipes"][0]["students"]) == ["S1"]
    assert step["best_baseline"]["values"] == [71.0, 70.5]
    assert step["gain_points"]["values"] == [-1.0, 0.5] and step["positive_seeds"] == 1
    assert cos["gain_points"]["values"] == [1.0, -1.5] and cos["positive_seeds"] == 1
    assert step["reading"] == "within noise" and step["noise_points"] > 1.0  # 10,000 images at ~70 %

    md = comparison_markdown(comparison(summaries), "t").splitlines()
    assert "| recipe | S1 |" in md
    assert "| step | -0.25 ± 1.06 (1/2) ≈ |" in md


def test_against_best_alone_is_left_out_when_the_recipes_share_baselines() -> None:
    shared = {
        "a": _with_baseline([0], [70.0], [68.0]),
        "b": _with_baseline([0], [71.0], [68.0]),
    }
    assert against_best_alone(shared) is None
    assert against_best_alone({"a": shared["a"]}) is None
    disjoint = {"a": _with_baseline([0], [70.0], [68.0]), "b": _with_baseline([1], [71.0], [69.0])}
    assert against_best_alone(disjoint) is None  # no seed in common: nothing paired
    assert "against_best_alone" not in comparison(shared)


def test_cli_study_reports_a_bad_file_without_a_traceback(tmp_path: Path, capsys) -> None:
    assert main(["study", str(_write(tmp_path, {**SPEC, "bogus": 1})), "--out", str(tmp_path / "o")]) == 2
    assert "bogus: unknown key" in capsys.readouterr().err


def test_a_seed_whose_runs_did_not_all_finish_waits_for_the_next_call(tmp_path: Path) -> None:
    """A ``fit`` that runs out of time (the GPU check's) returns None: that seed stays out of the table
    until a later call finishes its runs; what finished is not trained again."""
    from bockd.reproduce import fit_to_the_end

    spec = load_study(_write(tmp_path, SPEC))

    def out_of_time_for_seed_1_baselines(config, data, folder):
        if config.mode == "baseline" and config.seed == 1:
            return None
        return fit_to_the_end(config, data, folder)

    out = tmp_path / "out"
    first = run_study(spec, out, fit=out_of_time_for_seed_1_baselines)
    assert [row["seeds"] for row in first["recipes"]] == [[0], [0]]
    assert json.loads((out / "study.json").read_text())["recipes"][0]["seeds"] == [0]
    done = {p: p.stat().st_mtime_ns for p in (out / "runs" / "seed-0").rglob("*") if p.is_file()}
    second = run_study(spec, out)
    assert [row["seeds"] for row in second["recipes"]] == [[0, 1], [0, 1]]
    assert {p: p.stat().st_mtime_ns for p in (out / "runs" / "seed-0").rglob("*") if p.is_file()} == done


def test_a_recipe_added_later_never_hides_finished_seeds(tmp_path: Path) -> None:
    """Resuming a finished two-seed study with a third recipe: the finished recipes' two seeds are in the
    tables before the new recipe's first run trains (it would otherwise come first: seed 0 before seed 1)."""
    from bockd.reproduce import fit_to_the_end

    out = tmp_path / "out"
    run_study(load_study(_write(tmp_path, SPEC)), out)
    kd1 = {"preset": "smoke-paper", "loss": {"kd_weight": 1}}
    grown = {**SPEC, "recipes": {**SPEC["recipes"], "kd1": kd1}}

    class Interrupted(Exception):
        pass

    def interrupted_on_new_runs(config, data, folder):
        if not (folder / "summary.json").is_file():
            seen = json.loads((out / "study.json").read_text())
            shown = [(r["recipe"], r["seeds"]) for r in seen["recipes"]]
            assert shown == [("paper", [0, 1]), ("ce1", [0, 1])]
            raise Interrupted
        return fit_to_the_end(config, data, folder)

    with pytest.raises(Interrupted):
        run_study(load_study(_write(tmp_path, grown)), out, fit=interrupted_on_new_runs)
    for recipe in ("paper", "ce1"):
        assert json.loads((out / recipe / "results.json").read_text())["seeds"] == [0, 1]
    table = run_study(load_study(_write(tmp_path, grown)), out)
    assert [(r["recipe"], r["seeds"]) for r in table["recipes"]] == [
        ("paper", [0, 1]),
        ("ce1", [0, 1]),
        ("kd1", [0, 1]),
    ]


def test_nothing_finished_writes_no_table(tmp_path: Path) -> None:
    out = tmp_path / "out"
    table = run_study(load_study(_write(tmp_path, SPEC)), out, fit=lambda config, data, folder: None)
    assert table["recipes"] == [] and not (out / "study.md").exists()


STUDIES = sorted((Path(__file__).parents[1] / "benchmarks" / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_committed_studies_are_valid_and_their_paper_recipe_is_the_papers(path: Path) -> None:
    """A study names its recipes; when a preset's defaults move (the bockd recipe became the default of
    `smoke`), a recipe built on it must not silently become another recipe under the same name."""
    plans = study_configs(load_study(path))
    paper = plans["paper"][load_study(path).seeds[0]]["ensemble"]
    assert paper.loss == LossConfig()  # 0.7 CE + 0.15 hint + 0.15 KD at T = 2, mean teacher, no ramp
    assert paper.optim.schedule == "step" and tuple(paper.optim.milestones) == (0.5, 0.75)
