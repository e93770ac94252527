"""Reproduce the paper's comparison: the BOC-KD ensemble against every student's own baseline.

For each seed, one ensemble run and one baseline run per student on the identical schedule and seed.
Every run lives in its own folder and resumes, so an interrupted reproduction continues where it
stopped and a finished one is not trained again. Outputs: ``results.json``, ``results.md`` and
``accuracy_vs_params.png``.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bockd.checkpoint import atomic_write, write_json
from bockd.config import TrainConfig, build_config
from bockd.engine import Trainer, TrainResult, load_training_data
from bockd.errors import ConfigError
from bockd.models import student_table

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
    baselines: bool = True,
) -> dict[int, dict[str, TrainConfig]]:
    """Every run's validated config, per seed: ``{"ensemble": cfg, "baseline-s1": cfg, ...}``.

    Built in full before anything trains, so a bad value fails at once rather than after hours.
    """
    seeds = list(seeds)
    if not seeds:
        raise ConfigError("seeds: expected at least one seed, got none")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: each seed may appear once, got {seeds}")
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
        if baselines:
            for k in range(num_students):
                per_seed[f"baseline-s{k + 1}"] = build_config(
                    preset, {**base, "mode": "baseline", "student": k}
                )
        runs[seed] = per_seed
    return runs


def _mean_std(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def summarize(results: dict[int, dict[str, TrainResult]], table: list[dict[str, Any]]) -> dict[str, Any]:
    """Per student: params, size, baseline and BOC-KD top-1 (final and best epoch), gains, over seeds."""
    seeds = sorted(results)
    students = []
    for row in table:
        label = row["student"].lower()
        entry: dict[str, Any] = {**row}
        ens = [results[s]["ensemble"].summary()["students"][label] for s in seeds]
        entry["bockd_final"] = _mean_std([e["final_top1"] for e in ens])
        entry["bockd_best"] = _mean_std([e["best_top1"] for e in ens])
        entry["bockd_best_epoch"] = [e["best_epoch"] for e in ens]
        base_key = f"baseline-{label}"
        if all(base_key in results[s] for s in seeds):
            base = [results[s][base_key].summary()["students"][label] for s in seeds]
            entry["baseline_final"] = _mean_std([b["final_top1"] for b in base])
            entry["baseline_best"] = _mean_std([b["best_top1"] for b in base])
            gains = [e["final_top1"] - b["final_top1"] for e, b in zip(ens, base, strict=True)]
            entry["gain_points"] = _mean_std(gains)
            baseline_mean = entry["baseline_final"]["mean"]
            # Relative to a baseline at 0 % accuracy is meaningless: leave it out rather than print 1e11 %.
            if baseline_mean > 0:
                entry["gain_relative_pct"] = 100.0 * entry["gain_points"]["mean"] / baseline_mean
            entry["gain_best_points"] = entry["bockd_best"]["mean"] - entry["baseline_best"]["mean"]
        students.append(entry)
    ensemble = [results[s]["ensemble"].summary()["students"]["ensemble"] for s in seeds]
    return {
        "seeds": seeds,
        "students": students,
        "ensemble": {
            "final": _mean_std([e["final_top1"] for e in ensemble]),
            "best": _mean_std([e["best_top1"] for e in ensemble]),
        },
    }


def _pm(stat: dict[str, float] | None) -> str:
    if stat is None:
        return "-"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}" if len(stat["values"]) > 1 else f"{stat['mean']:.2f}"


def markdown_table(summary: dict[str, Any], title: str) -> str:
    rows = [
        f"### {title}",
        "",
        f"Seeds: {', '.join(map(str, summary['seeds']))}. Top-1 test accuracy (%) at the final epoch; "
        "best epoch beside it (the paper's choice).",
        "",
        "| student | params | size % | baseline top-1 | BOC-KD top-1 | gain (points) | gain (relative) "
        "| baseline best | BOC-KD best |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary["students"]:
        gain = _pm(s.get("gain_points"))
        rel = f"{s['gain_relative_pct']:+.2f} %" if "gain_relative_pct" in s else "-"
        rows.append(
            f"| {s['student']} | {s['params']:,} | {s['size_pct']:.2f} | {_pm(s.get('baseline_final'))} "
            f"| {_pm(s['bockd_final'])} | {gain} | {rel} | {_pm(s.get('baseline_best'))} "
            f"| {_pm(s['bockd_best'])} |"
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
    baselines: bool = True,
) -> dict[str, Any]:
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
    first = next(iter(configs.values()))["ensemble"]
    data = load_training_data(first)
    results: dict[int, dict[str, TrainResult]] = {}
    for seed, runs in configs.items():
        results[seed] = {}
        for name, config in runs.items():
            log.info("seed %d: %s (%d epochs)", seed, name, config.epochs)
            results[seed][name] = Trainer(config, data, out_dir / f"seed-{seed}" / name).fit()

    table = student_table(
        arch, num_classes=data.num_classes, in_channels=data.in_channels, num_students=num_students
    )
    summary = summarize(results, table)
    title = f"{arch} on {data.name}, preset {preset}, {first.epochs} epochs"
    summary.update(
        {
            "dataset": data.name,
            "dataset_sha256": data.sha256(),
            "arch": arch,
            "preset": preset,
            "epochs": first.epochs,
            "config": first.to_dict(),
            "title": title,
        }
    )
    write_json(out_dir / "results.json", summary)
    atomic_write(out_dir / "results.md", lambda tmp: tmp.write_text(markdown_table(summary, title)))
    plot_accuracy_vs_params(summary, out_dir / "accuracy_vs_params.png", title)
    return summary
