"""The reproduction driver: paired configs, a tiny real reproduction, re-runs that do not retrain, and the
summary/markdown arithmetic on hand-built histories."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest

import bockd.reproduce
from bockd.engine import TrainResult
from bockd.errors import ConfigError
from bockd.models import student_table
from bockd.reproduce import markdown_table, reproduce, reproduction_configs, summarize

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = {"dataset": "digits", "arch": "resnet20", "preset": "smoke"}
TINY_KW = {"seeds": (0, 1), "epochs": 1, "num_students": 2, "overrides": {"runtime": {"progress": "off"}}}
RUN_NAMES = {"ensemble", "baseline-s1", "baseline-s2"}


def _without(config, *keys: str) -> dict:
    d = config.to_dict()
    for key in keys:
        d.pop(key)
    return d


# -- configs ------------------------------------------------------------------------------------------------


def test_every_baseline_shares_the_ensemble_seed_and_schedule() -> None:
    configs = reproduction_configs(
        "digits",
        "resnet20",
        "smoke",
        seeds=(0, 3),
        epochs=4,
        num_students=3,
        overrides={"optim": {"lr": 0.02}, "batch_size": 32},
    )
    assert list(configs) == [0, 3]
    for seed, runs in configs.items():
        assert set(runs) == {"ensemble", "baseline-s1", "baseline-s2", "baseline-s3"}
        ens = runs["ensemble"]
        assert ens.mode == "ensemble" and ens.seed == seed and ens.epochs == 4
        assert ens.model.arch == "resnet20" and ens.model.num_students == 3
        assert ens.data.dataset == "digits" and ens.optim.lr == 0.02 and ens.batch_size == 32
        for k in range(3):
            base = runs[f"baseline-s{k + 1}"]
            assert base.mode == "baseline" and base.student == k
            assert _without(base, "mode", "student") == _without(ens, "mode", "student")
            assert [base.lr_at(e) for e in range(4)] == [ens.lr_at(e) for e in range(4)]
    # Seeds differ in the seed only.
    assert _without(configs[0]["ensemble"], "seed") == _without(configs[3]["ensemble"], "seed")


def test_without_baselines_only_the_ensemble_is_configured() -> None:
    configs = reproduction_configs("digits", "resnet20", "smoke", seeds=(5,), num_students=2, baselines=False)
    assert {seed: set(runs) for seed, runs in configs.items()} == {5: {"ensemble"}}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"overrides": {"optim": {"lr": -1}}}, "optim.lr"),
        ({"epochs": 0}, "epochs"),
        ({"seeds": (0, -1)}, "seed"),
        ({"seeds": ()}, "seed"),
        ({"num_students": 1}, "num_students"),
        ({"overrides": {"bogus": 1}}, "bogus"),
    ],
)
def test_a_bad_value_is_refused_before_training(
    kwargs, field, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match=field):
        reproduction_configs("digits", "resnet20", "smoke", **kwargs)

    def forbidden(*args, **kw):
        raise AssertionError("training or data loading started")

    monkeypatch.setattr(bockd.reproduce, "Trainer", forbidden)
    monkeypatch.setattr(bockd.reproduce, "load_training_data", forbidden)
    with pytest.raises(ConfigError, match=field):
        reproduce("digits", "resnet20", "smoke", tmp_path / "out", **{"num_students": 2, **kwargs})
    assert not (tmp_path / "out").exists()


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"model\.arch"):
        reproduction_configs("digits", "nope", "smoke")


# -- a tiny real reproduction -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reproduced(single_thread, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("reproduce")
    return out, reproduce(out_dir=out, **TINY, **TINY_KW)


def _run_summary(out: Path, seed: int, name: str) -> dict:
    return json.loads((out / f"seed-{seed}" / name / "summary.json").read_text())["students"]


def _mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.glob("seed-*/*/*"))}


def test_reproduce_writes_every_run_and_the_results(reproduced) -> None:
    out, summary = reproduced
    for seed in (0, 1):
        assert {p.name for p in (out / f"seed-{seed}").iterdir()} == RUN_NAMES
        for name in RUN_NAMES:
            assert (out / f"seed-{seed}" / name / "model.safetensors").is_file()
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["seeds"] == [0, 1]
    assert summary["arch"] == "resnet20" and summary["dataset"] == "digits" and summary["epochs"] == 1
    table = student_table("resnet20", num_classes=10, in_channels=1, num_students=2)
    assert [s["student"] for s in summary["students"]] == ["S1", "S2"]
    assert [s["params"] for s in summary["students"]] == [r["params"] for r in table]

    md = (out / "results.md").read_text()
    assert md == markdown_table(summary, summary["title"])
    rows = [line for line in md.splitlines() if line.startswith("| S")]
    assert len(rows) == 2
    for row, entry in zip(rows, table, strict=True):
        assert row.startswith(f"| {entry['student']} | {entry['params']:,} | {entry['size_pct']:.2f} |")
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 11
        assert all("±" in c for c in cells[3:6] + cells[9:])  # 2 seeds: mean ± std
        assert cells[7] in ("0/2", "1/2", "2/2")  # seeds with a positive gain
        assert cells[8].startswith(("gain (±", "loss (±", "within noise (±"))
    assert sum(line.startswith("|---") for line in md.splitlines()) == 1
    assert sum(line.startswith("| student | params |") for line in md.splitlines()) == 1

    png = out / "accuracy_vs_params.png"
    assert png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_gains_are_bockd_minus_baseline_per_seed(reproduced) -> None:
    out, summary = reproduced
    for entry in summary["students"]:
        label = entry["student"].lower()
        ens = [_run_summary(out, s, "ensemble")[label] for s in (0, 1)]
        base = [_run_summary(out, s, f"baseline-{label}")[label] for s in (0, 1)]
        assert entry["bockd_final"]["values"] == [e["final_top1"] for e in ens]
        assert entry["baseline_final"]["values"] == [b["final_top1"] for b in base]
        gains = [e["final_top1"] - b["final_top1"] for e, b in zip(ens, base, strict=True)]
        assert entry["gain_points"]["values"] == pytest.approx(gains)
        assert entry["gain_points"]["mean"] == pytest.approx(statistics.fmean(gains))
        assert entry["gain_relative_pct"] == pytest.approx(
            100 * statistics.fmean(gains) / statistics.fmean(b["final_top1"] for b in base)
        )
        for e in ens:  # one epoch: final is best
            assert 0 <= e["final_top1"] <= 100 and e["best_top1"] == e["final_top1"]
    ens_runs = [_run_summary(out, s, "ensemble")["ensemble"]["final_top1"] for s in (0, 1)]
    assert summary["ensemble"]["final"]["values"] == ens_runs


def test_re_running_a_finished_reproduction_trains_nothing(reproduced, monkeypatch) -> None:
    out, summary = reproduced
    before = _mtimes(out)
    assert len(before) >= 6 * 5  # 6 runs, each with weights, card, history, summary, checkpoint
    results = (out / "results.json").read_text()

    again = reproduce(out_dir=out, **TINY, **TINY_KW)

    assert _mtimes(out) == before  # no run was trained, resumed or rewritten
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(summary))
    assert (out / "results.json").read_text() == results


def test_an_interrupted_reproduction_trains_only_what_is_missing(reproduced, tmp_path: Path) -> None:
    out = Path(shutil.copytree(reproduced[0], tmp_path / "out"))
    shutil.rmtree(out / "seed-1" / "baseline-s2")
    before = _mtimes(out)

    summary = reproduce(out_dir=out, **TINY, **TINY_KW)

    after = _mtimes(out)
    assert {k: v for k, v in after.items() if k in before} == before
    assert sorted(set(after) - set(before)) == sorted(
        f"seed-1/baseline-s2/{name}"
        for name in ("checkpoint.pt", "history.json", "model.json", "model.safetensors", "summary.json")
    )
    assert len(summary["students"][1]["baseline_final"]["values"]) == 2


def test_a_run_folder_from_another_config_is_not_reused(reproduced, tmp_path: Path) -> None:
    """A finished run with a different schedule must not be passed off as this one's result."""
    from bockd.errors import CheckpointError

    out = Path(shutil.copytree(reproduced[0], tmp_path / "out"))
    with pytest.raises(CheckpointError, match="different config"):
        reproduce(out_dir=out, **TINY, **{**TINY_KW, "overrides": {"optim": {"lr": 0.01}}})


# -- the arithmetic, on hand-built histories ----------------------------------------------------------------


def _result(labels: list[str], top1: dict[str, list[float]]) -> TrainResult:
    epochs = len(next(iter(top1.values())))
    history = [
        {
            "epoch": e + 1,
            **{f"test/{label}/top1": acc[e] for label, acc in top1.items()},
            **{f"test/{label}/top5": 100.0 for label in top1},
        }
        for e in range(epochs)
    ]
    return TrainResult(Path("."), labels, history)


TABLE = [
    {"student": "S1", "index": 0, "width_multiplier": 1.0, "params": 1000, "size_pct": 100.0},
    {"student": "S2", "index": 1, "width_multiplier": 0.5, "params": 250, "size_pct": 25.0},
]


def _handbuilt(baselines: bool = True) -> dict[int, dict[str, TrainResult]]:
    runs = {
        0: {"ensemble": _result(["s1", "s2"], {"s1": [80, 90], "s2": [85, 70], "ensemble": [82, 91]})},
        1: {"ensemble": _result(["s1", "s2"], {"s1": [70, 94], "s2": [60, 74], "ensemble": [75, 95]})},
    }
    if baselines:
        runs[0]["baseline-s1"] = _result(["s1"], {"s1": [80, 86]})
        runs[1]["baseline-s1"] = _result(["s1"], {"s1": [88, 90]})
        runs[0]["baseline-s2"] = _result(["s2"], {"s2": [60, 65]})
        runs[1]["baseline-s2"] = _result(["s2"], {"s2": [66, 62]})
    return runs


def test_summarize_means_stds_and_gains() -> None:
    summary = summarize(_handbuilt(), TABLE)
    assert summary["seeds"] == [0, 1]
    s1, s2 = summary["students"]
    assert s1["student"] == "S1" and s1["params"] == 1000 and s2["size_pct"] == 25.0
    # S1: BOC-KD 90, 94; baseline 86, 90.
    assert s1["bockd_final"] == {"mean": 92.0, "std": pytest.approx(2 * 2**0.5), "values": [90, 94]}
    assert s1["baseline_final"]["mean"] == 88.0
    assert s1["gain_points"] == {"mean": 4.0, "std": 0.0, "values": [4, 4]}
    assert s1["gain_relative_pct"] == pytest.approx(4 / 88 * 100)
    assert s1["bockd_best"]["mean"] == 92.0 and s1["bockd_best_epoch"] == [2, 2]
    assert s1["gain_best_points"] == pytest.approx(4.0)
    # S2: BOC-KD 70, 74 (best 85 at epoch 1, 74); baseline 65, 62 (best 65, 66).
    assert s2["bockd_final"]["mean"] == 72.0
    assert s2["baseline_final"] == {"mean": 63.5, "std": pytest.approx(2.1213203), "values": [65, 62]}
    assert s2["gain_points"]["values"] == [5, 12]
    assert s2["gain_points"]["mean"] == 8.5
    assert s2["gain_points"]["std"] == pytest.approx(statistics.stdev([5, 12]))
    assert s2["gain_relative_pct"] == pytest.approx(8.5 / 63.5 * 100)
    assert s2["bockd_best"] == {
        "mean": 79.5,
        "std": pytest.approx(statistics.stdev([85, 74])),
        "values": [85, 74],
    }
    assert s2["bockd_best_epoch"] == [1, 2]
    assert s2["baseline_best"]["mean"] == 65.5
    assert s2["gain_best_points"] == pytest.approx(14.0)
    assert summary["ensemble"]["final"]["mean"] == 93.0
    assert summary["ensemble"]["best"]["values"] == [91, 95]


def test_markdown_table_rows() -> None:
    md = markdown_table(summarize(_handbuilt(), TABLE), "hand-built")
    lines = md.splitlines()
    assert lines[0] == "### hand-built"
    assert (
        "| S1 | 1,000 | 100.00 | 88.00 ± 2.83 | 92.00 ± 2.83 | +4.00 ± 0.00 | +4.55 % | 2/2 | - "
        "| 88.00 ± 2.83 | 92.00 ± 2.83 |" in lines
    )
    assert (
        "| S2 | 250 | 25.00 | 63.50 ± 2.12 | 72.00 ± 2.83 | +8.50 ± 4.95 | +13.39 % | 2/2 | - "
        "| 65.50 ± 0.71 | 79.50 ± 7.78 |" in lines
    )
    assert "Ensemble (mean of the students' logits): 93.00 ± 2.83 final, 93.00 ± 2.83 best." in lines


def test_markdown_table_one_seed_and_no_baselines() -> None:
    one_seed = {0: _handbuilt()[0]}
    lines = markdown_table(summarize(one_seed, TABLE), "one seed").splitlines()
    assert "| S1 | 1,000 | 100.00 | 86.00 | 90.00 | +4.00 | +4.65 % | 1/1 | - | 86.00 | 90.00 |" in lines
    assert "| S2 | 250 | 25.00 | 65.00 | 70.00 | +5.00 | +7.69 % | 1/1 | - | 65.00 | 85.00 |" in lines
    assert not any("±" in line for line in lines if line.startswith("| S"))

    no_base = summarize(_handbuilt(baselines=False), TABLE)
    assert "gain_points" not in no_base["students"][0]
    lines = markdown_table(no_base, "no baselines").splitlines()
    assert "| S1 | 1,000 | 100.00 | - | 92.00 ± 2.83 | - | - | - | - | - | 92.00 ± 2.83 |" in lines


# -- baselines to choose, shared runs, noise, results as they come ------------------------------------------


def test_only_the_chosen_students_get_baselines() -> None:
    configs = reproduction_configs(
        "digits", "resnet20", "smoke", seeds=(0,), num_students=5, baselines=(0, 4)
    )
    assert set(configs[0]) == {"ensemble", "baseline-s1", "baseline-s5"}
    with pytest.raises(ConfigError, match=r"baselines: students \[6\] do not exist \(expected 1\.\.5\)"):
        reproduction_configs("digits", "resnet20", "smoke", num_students=5, baselines=(5,))


def test_reproductions_sharing_a_runs_dir_train_a_common_baseline_once(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    kw = {**TINY, "seeds": (0,), "epochs": 1, "num_students": 2, "baselines": (1,), "runs_dir": runs}
    quiet = {"runtime": {"progress": "off"}}
    reproduce(out_dir=tmp_path / "paper", **kw, overrides=quiet)
    first = _mtimes(runs)
    summary = reproduce(out_dir=tmp_path / "kd05", **kw, overrides={**quiet, "loss": {"kd_weight": 0.5}})
    folders = sorted(p.name.rsplit("-", 1)[0] for p in (runs / "seed-0").iterdir())
    assert folders == ["baseline-s2", "ensemble", "ensemble"]  # one baseline serves both recipes
    assert {k: v for k, v in _mtimes(runs).items() if k in first} == first
    assert summary["students"][1]["baseline_final"]["values"] == [
        json.loads(next((runs / "seed-0").glob("baseline-s2-*/summary.json")).read_text())["students"]["s2"][
            "final_top1"
        ]
    ]
    assert (tmp_path / "kd05" / "results.md").is_file() and not (tmp_path / "kd05" / "seed-0").exists()


def test_results_are_written_after_every_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[list[int]] = []
    real = bockd.reproduce.write_results

    def spy(out_dir: Path, summary: dict) -> None:
        written.append(summary["seeds"])
        real(out_dir, summary)

    monkeypatch.setattr(bockd.reproduce, "write_results", spy)
    reproduce(out_dir=tmp_path, **TINY, **{**TINY_KW, "num_students": 2, "baselines": False})
    assert written == [[0], [0, 1]]


def test_gains_are_read_against_the_test_set_noise() -> None:
    summary = summarize(_handbuilt(), TABLE, test_images=400)
    s1, s2 = summary["students"]
    # S1: baseline 88 %, BOC-KD 92 % on 400 images: 2 x sqrt(.88 .12 / 400 + .92 .08 / 400) = 4.23 points.
    assert s1["noise_points"] == pytest.approx(2 * (0.88 * 0.12 / 400 + 0.92 * 0.08 / 400) ** 0.5 * 100)
    assert s1["reading"] == "within noise" and s1["positive_seeds"] == 2
    assert s2["reading"] == "gain"  # +8.5 points against a band of about ±6.4
    assert summary["test_images"] == 400
    lines = markdown_table(summary, "noise").splitlines()
    assert any(line.startswith("| S1 |") and "| within noise (±4.23) |" in line for line in lines)
    assert any("400 test images" in line for line in lines)
