"""Reproduce the paper's comparison: the BOC-KD ensemble against every student's own baseline.

For each seed, one ensemble run and one baseline run per chosen student on the identical schedule and
seed. Every run lives in its own folder and resumes, so an interrupted reproduction continues where it
stopped and a finished one is not trained again. Outputs, rewritten each time a seed's runs are all done
(so a long reproduction shows its results as they come): ``results.json``, ``results.md`` and
``accuracy_vs_params.png``. Gains are paired per seed, then averaged; each is read against the test set's
binomial noise (``bockd.significance``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bockd.checkpoint import atomic_write, write_json
from bockd.config import TrainConfig, build_config
from bockd.data import ImageDataset
from bockd.engine import Trainer, TrainResult, load_training_data
from bockd.errors import ConfigError
from bockd.models import student_table
from bockd.significance import NOISE_RULE, gain_noise, reading

log = logging.getLogger("bockd.reproduce")


def reproduction_configs(
    dataset: str,
    arch: str,
    preset: str,
    *,
    seeds: Sequence[int] = (0,),
    epochs: int | None = None,
    num_students: int = 5,
    data_path: str | None = None,
    overrides: dict[str, Any] | None = None,
    baselines: bool | Sequence[int] = True,
) -> dict[int, dict[str, TrainConfig]]:
    """Every run's validated config, per seed: ``{"ensemble": cfg, "baseline-s1": cfg, ...}``.

    ``baselines``: True for every student, False for none, or the 0-based indices of the students that
    get one (e.g. ``(0, 4)``: S1 and S5). Built in full before anything trains, so a bad value fails at
    once rather than after hours.
    """
    seeds = list(seeds)
    if not seeds:
        raise ConfigError("seeds: expected at least one seed, got none")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: each seed may appear once, got {seeds}")
    chosen = baseline_students(baselines, num_students)
    runs: dict[int, dict[str, TrainConfig]] = {}
    for seed in seeds:
        base: dict[str, Any] = {
            **(overrides or {}),
            "seed": seed,
            "model": {**(overrides or {}).get("model", {}), "arch": arch, "num_students": num_students},
            "data": {**(overrides or {}).get("data", {}), "dataset": dataset},
        }
        if data_path is not None:
            base["data"]["path"] = data_path
        if epochs is not None:
            base["epochs"] = epochs
        per_seed = {"ensemble": build_config(preset, {**base, "mode": "ensemble"})}
        for k in chosen:
            per_seed[f"baseline-s{k + 1}"] = build_config(preset, {**base, "mode": "baseline", "student": k})
        runs[seed] = per_seed
    return runs


def baseline_students(baselines: bool | Sequence[int], num_students: int) -> list[int]:
    """The sorted 0-based students that get a baseline run; ConfigError for an index out of range."""
    if baselines is True:
        return list(range(num_students))
    if baselines is False:
        return []
    chosen = sorted(set(baselines))
    bad = [k for k in chosen if not 0 <= k < num_students]
    if bad:
        raise ConfigError(
            f"baselines: students {[k + 1 for k in bad]} do not exist (expected 1..{num_students})"
        )
    return chosen


def identity_digest(config: TrainConfig) -> str:
    """12 hex digits naming what decides a run's weights (``TrainConfig.training_identity``)."""
    ident = json.dumps(config.training_identity(), sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


def run_folder(out_dir: Path, seed: int, name: str, config: TrainConfig, runs_dir: Path | None) -> Path:
    """Where a run lives: ``<out>/seed-<s>/<name>``, or in a shared ``runs_dir`` under a name that holds
    the digest of its training identity, so runs that would train the same weights (a baseline shared by
    several recipes with one schedule) are trained once."""
    if runs_dir is None:
        return out_dir / f"seed-{seed}" / name
    return runs_dir / f"seed-{seed}" / f"{name}-{identity_digest(config)}"


def mean_std(values: list[float]) -> dict[str, float]:
    """``{"mean", "std" (sample; 0 for one value), "values"}`` of per-seed figures."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def summarize(
    results: dict[int, dict[str, TrainResult]], table: list[dict[str, Any]], test_images: int | None = None
) -> dict[str, Any]:
    """Per student: params, size, baseline and BOC-KD top-1 (final and best epoch), gains, over seeds.

    With ``test_images`` (the test set's size) every gain is also read against the test set's binomial
    noise: ``noise_points`` (the band's half-width) and ``reading`` ("gain", "loss", "within noise").
    """
    seeds = sorted(results)
    students = []
    for row in table:
        label = row["student"].lower()
        entry: dict[str, Any] = {**row}
        ens = [results[s]["ensemble"].summary()["students"][label] for s in seeds]
        entry["bockd_final"] = mean_std([e["final_top1"] for e in ens])
        entry["bockd_best"] = mean_std([e["best_top1"] for e in ens])
        entry["bockd_best_epoch"] = [e["best_epoch"] for e in ens]
        base_key = f"baseline-{label}"
        if all(base_key in results[s] for s in seeds):
            base = [results[s][base_key].summary()["students"][label] for s in seeds]
            entry["baseline_final"] = mean_std([b["final_top1"] for b in base])
            entry["baseline_best"] = mean_std([b["best_top1"] for b in base])
            gains = [e["final_top1"] - b["final_top1"] for e, b in zip(ens, base, strict=True)]
            entry["gain_points"] = mean_std(gains)
            entry["positive_seeds"] = sum(g > 0 for g in gains)
            baseline_mean = entry["baseline_final"]["mean"]
            if test_images:
                bockd_mean, gain = entry["bockd_final"]["mean"], entry["gain_points"]["mean"]
                entry["noise_points"] = gain_noise(baseline_mean, bockd_mean, test_images)
                entry["reading"] = reading(gain, baseline_mean, bockd_mean, test_images)
            # Relative to a baseline at 0 % accuracy is meaningless: leave it out rather than print 1e11 %.
            if baseline_mean > 0:
                entry["gain_relative_pct"] = 100.0 * entry["gain_points"]["mean"] / baseline_mean
            entry["gain_best_points"] = entry["bockd_best"]["mean"] - entry["baseline_best"]["mean"]
        students.append(entry)
    ensemble = [results[s]["ensemble"].summary()["students"]["ensemble"] for s in seeds]
    return {
        "seeds": seeds,
        "test_images": test_images,
        "noise_rule": NOISE_RULE,
        "students": students,
        "ensemble": {
            "final": mean_std([e["final_top1"] for e in ensemble]),
            "best": mean_std([e["best_top1"] for e in ensemble]),
        },
    }


def _pm(stat: dict[str, Any] | None, signed: bool = False) -> str:
    if stat is None:
        return "-"
    mean = f"{stat['mean']:+.2f}" if signed else f"{stat['mean']:.2f}"
    return f"{mean} ± {stat['std']:.2f}" if len(stat["values"]) > 1 else mean


def _reading_cell(s: dict[str, Any]) -> str:
    if "reading" not in s:
        return "-"
    return f"{s['reading']} (±{s['noise_points']:.2f})"


def markdown_table(summary: dict[str, Any], title: str) -> str:
    seeds = summary["seeds"]
    n = summary.get("test_images")
    rows = [
        f"### {title}",
        "",
        f"Seeds: {', '.join(map(str, seeds))}. Top-1 test accuracy (%) at the final epoch, mean ± std over "
        "seeds; the gain is paired per seed (same seed, schedule and initial weights); best epoch beside "
        "it (the paper's choice)."
        + (
            f" Reading: {n:,} test images; {summary.get('noise_rule', NOISE_RULE)} (the band in brackets)."
            if n
            else ""
        ),
        "",
        "| student | params | size % | baseline top-1 | BOC-KD top-1 | gain (points) | gain (relative) "
        "| seeds with gain > 0 | reading | baseline best | BOC-KD best |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for s in summary["students"]:
        gain = _pm(s.get("gain_points"), signed=True)
        rel = f"{s['gain_relative_pct']:+.2f} %" if "gain_relative_pct" in s else "-"
        positive = f"{s['positive_seeds']}/{len(seeds)}" if "positive_seeds" in s else "-"
        rows.append(
            f"| {s['student']} | {s['params']:,} | {s['size_pct']:.2f} | {_pm(s.get('baseline_final'))} "
            f"| {_pm(s['bockd_final'])} | {gain} | {rel} | {positive} | {_reading_cell(s)} "
            f"| {_pm(s.get('baseline_best'))} | {_pm(s['bockd_best'])} |"
        )
    ens = summary["ensemble"]
    rows += [
        "",
        f"Ensemble (mean of the students' logits): {_pm(ens['final'])} final, {_pm(ens['best'])} best.",
    ]
    return "\n".join(rows) + "\n"


def plot_accuracy_vs_params(summary: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = summary["students"]
    params = [s["params"] for s in students]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ax.errorbar(
        params,
        [s["bockd_final"]["mean"] for s in students],
        yerr=[s["bockd_final"]["std"] for s in students],
        marker="o",
        capsize=3,
        label="BOC-KD student",
    )
    if all("baseline_final" in s for s in students):
        ax.errorbar(
            params,
            [s["baseline_final"]["mean"] for s in students],
            yerr=[s["baseline_final"]["std"] for s in students],
            marker="s",
            capsize=3,
            linestyle="--",
            label="baseline (CE only)",
        )
    ax.axhline(summary["ensemble"]["final"]["mean"], color="grey", linestyle=":", label="ensemble")
    for s in students:
        ax.annotate(
            s["student"],
            (s["params"], s["bockd_final"]["mean"]),
            textcoords="offset points",
            xytext=(4, 6),
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("top-1 test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


# How one run is trained: (config, data, run folder) -> its result, or None when it could not finish now
# (a time budget ran out: benchmarks/gpu_check.py). The default trains to the end, resuming.
Fit = Callable[[TrainConfig, ImageDataset, Path], "TrainResult | None"]


def fit_to_the_end(config: TrainConfig, data: ImageDataset, workdir: Path) -> TrainResult:
    """Train (or resume, or just read back a finished) run in ``workdir``."""
    return Trainer(config, data, workdir).fit()


def train_runs(
    configs: dict[int, dict[str, TrainConfig]],
    data: ImageDataset,
    folder: Callable[[int, str, TrainConfig], Path],
    on_seed_done: Callable[[dict[int, dict[str, TrainResult]]], None] | None = None,
    progress: tuple[int, int] = (0, 0),
    fit: Fit = fit_to_the_end,
) -> dict[int, dict[str, TrainResult]]:
    """Train every run, seed by seed; the result holds the seeds whose runs all finished. ``on_seed_done``
    gets those after each one. ``progress`` = (runs done before, runs in all) for the log lines."""
    done, total = progress
    total = total or sum(len(runs) for runs in configs.values())
    results: dict[int, dict[str, TrainResult]] = {}
    for seed, runs in configs.items():
        per_seed: dict[str, TrainResult | None] = {}
        for name, config in runs.items():
            done += 1
            log.info("run %d/%d: seed %d, %s (%d epochs)", done, total, seed, name, config.epochs)
            per_seed[name] = fit(config, data, folder(seed, name, config))
        if any(result is None for result in per_seed.values()):
            log.info("seed %d: not every run finished; left out of the results for now", seed)
            continue
        results[seed] = per_seed  # type: ignore[assignment]
        if on_seed_done is not None:
            on_seed_done(results)
    return results


def write_results(out_dir: Path, summary: dict[str, Any]) -> None:
    """results.json, results.md and accuracy_vs_params.png in ``out_dir``, each written atomically."""
    write_json(out_dir / "results.json", summary)
    atomic_write(
        out_dir / "results.md", lambda tmp: tmp.write_text(markdown_table(summary, summary["title"]))
    )
    plot_accuracy_vs_params(summary, out_dir / "accuracy_vs_params.png", summary["title"])


def full_summary(
    results: dict[int, dict[str, TrainResult]],
    data: ImageDataset,
    configs: dict[int, dict[str, TrainConfig]],
    preset: str,
) -> dict[str, Any]:
    """``summarize`` plus what the run was: dataset and its hash, arch, preset, epochs, config, title."""
    first = next(iter(configs.values()))["ensemble"]
    arch, num_students = first.model.arch, first.model.num_students
    table = student_table(
        arch, num_classes=data.num_classes, in_channels=data.in_channels, num_students=num_students
    )
    summary = summarize(results, table, test_images=len(data.test))
    subset = f", {len(data.train):,} training images" if first.data.train_subset else ""
    summary.update(
        {
            "dataset": data.name,
            "dataset_sha256": data.sha256(),
            "train_images": len(data.train),
            "arch": arch,
            "preset": preset,
            "epochs": first.epochs,
            "config": first.to_dict(),
            "title": f"{arch} on {data.name}{subset}, preset {preset}, {first.epochs} epochs",
        }
    )
    return summary


def reproduce(
    dataset: str,
    arch: str,
    preset: str,
    out_dir: str | Path,
    *,
    seeds: Sequence[int] = (0,),
    epochs: int | None = None,
    num_students: int = 5,
    data_path: str | None = None,
    overrides: dict[str, Any] | None = None,
    baselines: bool | Sequence[int] = True,
    runs_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train the ensemble and the chosen baselines for every seed, then write and return the summary.

    ``runs_dir``: keep the runs there under identity-digest names (``run_folder``) instead of in
    ``out_dir``, so several reproductions share the runs they have in common.
    """
    out_dir = Path(out_dir)
    configs = reproduction_configs(
        dataset,
        arch,
        preset,
        seeds=seeds,
        epochs=epochs,
        num_students=num_students,
        data_path=data_path,
        overrides=overrides,
        baselines=baselines,
    )
    data = load_training_data(next(iter(configs.values()))["ensemble"])
    shared = Path(runs_dir) if runs_dir is not None else None

    def seed_done(partial: dict[int, dict[str, TrainResult]]) -> None:
        write_results(out_dir, full_summary(partial, data, configs, preset))

    results = train_runs(
        configs, data, lambda seed, name, cfg: run_folder(out_dir, seed, name, cfg, shared), seed_done
    )
    return full_summary(results, data, configs, preset)
