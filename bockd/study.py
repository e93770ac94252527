"""A recipe study: several training recipes, each reproduced against its own baselines, in one table.

A study is data (YAML, read with ``safe_load``): the dataset, architecture, seeds and baselines shared by
every recipe, settings common to all, and the recipes, each a preset plus overrides::

    dataset: cifar10
    data_path: ../shared/data/cifar10
    arch: resnet20
    seeds: [0, 1]
    epochs: 30
    baselines: [1, 5]          # 1-based students, or "all"
    common: {data: {train_subset: 10000}, runtime: {eval_every: 5}}
    recipes:
      paper: {preset: paper-cifar10}
      ce1-rampup: {preset: paper-cifar10, loss: {ce_weight: 1.0, rampup: 0.3}, baselines: all}

A recipe's own ``baselines`` replaces the study's for that recipe (e.g. every student's baseline for the
candidate, S1 and S5 only for the reference); recipes with the same schedule still share their runs.

Every run of every recipe is validated before anything trains. Runs go to ``<out>/runs`` under names
that hold the digest of their training identity, so a baseline that several recipes share (same schedule
and seed) is trained once, and an interrupted study resumes where it stopped (run the same command). Seeds
come first (seed 0 of every recipe, then seed 1, ...), so a study cut short still compares the recipes
on the same seeds. After every finished seed of a recipe the outputs are rewritten: ``<out>/<recipe>/``
holds that recipe's ``bockd reproduce`` results, ``<out>/study.{json,md,png}`` the comparison.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from bockd.checkpoint import atomic_write, write_json
from bockd.config import TrainConfig, format_validation_errors, merge_overrides
from bockd.engine import TrainResult, load_training_data, run_finished
from bockd.errors import ConfigError
from bockd.reproduce import (
    Fit,
    fit_to_the_end,
    full_summary,
    mean_std,
    reproduction_configs,
    run_folder,
    train_runs,
    write_results,
)
from bockd.significance import NOISE_RULE, gain_noise, reading

log = logging.getLogger("bockd.study")

STUDY_JSON, STUDY_MD, STUDY_PNG = "study.json", "study.md", "study.png"

Baselines = Literal["all"] | list[int]
_BASELINES = TypeAdapter(Baselines)
_NOT_CONFIG = ("preset", "baselines")  # a recipe's keys that are not TrainConfig overrides


class StudySpec(BaseModel):
    """A study file, validated (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str
    data_path: str | None = None
    arch: str = "resnet20"
    num_students: int = Field(5, ge=2, le=64)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    epochs: int | None = Field(None, ge=1)
    baselines: Baselines = "all"
    common: dict[str, Any] = Field(default_factory=dict)
    recipes: dict[str, dict[str, Any]] = Field(min_length=1)

    @field_validator("recipes")
    @classmethod
    def _recipe_names_and_presets(cls, recipes: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, recipe in recipes.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or name == "runs":
                raise ValueError(
                    f"recipe name {name!r}: expected letters, digits, '.', '_' or '-' (it names a folder), "
                    "and not 'runs'"
                )
            if not isinstance(recipe.get("preset"), str):
                raise ValueError(f"recipe {name!r}: expected a 'preset' (e.g. paper-cifar10)")
            if "baselines" in recipe:
                try:
                    _BASELINES.validate_python(recipe["baselines"], strict=True)
                except ValidationError:
                    raise ValueError(
                        f'recipe {name!r}: baselines: expected "all" or a list of 1-based students, '
                        f"got {recipe['baselines']!r}"
                    ) from None
        return recipes

    def baseline_indices(self, recipe: str) -> bool | list[int]:
        """0-based students with a baseline (True = every student): the recipe's own ``baselines`` if it
        has one, else the study's."""
        chosen = self.recipes[recipe].get("baselines", self.baselines)
        return True if chosen == "all" else [k - 1 for k in chosen]


def load_study(path: str | Path) -> StudySpec:
    """Read and validate a study file; ConfigError naming the field at fault."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study: file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"study: {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"study: {path} must hold a mapping at the top level, got {type(raw).__name__}")
    try:
        return StudySpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_errors(err).replace("invalid config", "invalid study")) from None


def study_configs(spec: StudySpec) -> dict[str, dict[int, dict[str, TrainConfig]]]:
    """Every run's validated config: recipe -> seed -> run name -> config. ConfigError names the recipe."""
    plans: dict[str, dict[int, dict[str, TrainConfig]]] = {}
    for name, recipe in spec.recipes.items():
        overrides = merge_overrides(spec.common, {k: v for k, v in recipe.items() if k not in _NOT_CONFIG})
        try:
            plans[name] = reproduction_configs(
                spec.dataset,
                spec.arch,
                recipe["preset"],
                seeds=spec.seeds,
                epochs=spec.epochs,
                num_students=spec.num_students,
                data_path=spec.data_path,
                overrides=overrides,
                baselines=spec.baseline_indices(name),
            )
        except ConfigError as err:
            raise ConfigError(f"recipe {name!r}: {err}") from None
    first = [next(iter(plan.values()))["ensemble"].data for plan in plans.values()]
    if any(d != first[0] for d in first[1:]):
        raise ConfigError("recipes: every recipe must train on the same data settings (data.*)")
    return plans


def comparison(summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The study's table as data: per recipe, each student's gain (mean, std, seeds, reading)."""
    rows = []
    for name, summary in summaries.items():
        students = {
            s["student"]: {
                k: s[k]
                for k in ("gain_points", "positive_seeds", "noise_points", "reading", "bockd_final")
                if k in s
            }
            for s in summary["students"]
        }
        rows.append(
            {
                "recipe": name,
                "seeds": summary["seeds"],
                "students": students,
                "ensemble_final": summary["ensemble"]["final"],
            }
        )
    table: dict[str, Any] = {"noise_rule": NOISE_RULE, "recipes": rows}
    best = against_best_alone(summaries)
    if best is not None:
        table["against_best_alone"] = best
    return table


def against_best_alone(summaries: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Each recipe's students against the same student trained alone with the best schedule in the study.

    A recipe's own gain compares it with baselines of its own schedule; a user who only wants S1 could
    instead train S1 alone with whichever schedule does best. Per seed that every recipe has finished, each
    recipe's final top-1 minus the highest final top-1 of that student's baselines over all recipes (paired
    by seed), for students every recipe has a baseline of. Returns ``{"seeds", "recipes": [{"recipe",
    "students": {label: {"gain_points", "positive_seeds", "best_baseline", "noise_points"?, "reading"?}}}]}``,
    or None when the recipes share one set of baselines (nothing beyond `comparison`'s gains) or no seed is
    common to all of them.
    """
    if len(summaries) < 2:
        return None
    common = sorted(set.intersection(*(set(s["seeds"]) for s in summaries.values())))

    def per_seed(summary: dict[str, Any], stat: dict[str, Any]) -> list[float]:
        by_seed = dict(zip(summary["seeds"], stat["values"], strict=True))
        return [by_seed[seed] for seed in common]

    baselines: dict[str, list[list[float]]] = {}  # label -> one list of per-seed top-1s per recipe
    for summary in summaries.values():
        for st in summary["students"]:
            if "baseline_final" in st:
                baselines.setdefault(st["student"], []).append(per_seed(summary, st["baseline_final"]))
    labels = [label for label, runs in baselines.items() if len(runs) == len(summaries)]
    if not common or not labels or all(all(r == runs[0] for r in runs) for runs in baselines.values()):
        return None
    best = {label: [max(col) for col in zip(*baselines[label], strict=True)] for label in labels}
    test_images = next(iter(summaries.values())).get("test_images")
    rows = []
    for name, summary in summaries.items():
        cells: dict[str, Any] = {}
        for st in summary["students"]:
            label = st["student"]
            if label not in best:
                continue
            ours = per_seed(summary, st["bockd_final"])
            diffs = [o - b for o, b in zip(ours, best[label], strict=True)]
            cell: dict[str, Any] = {
                "gain_points": mean_std(diffs),
                "positive_seeds": sum(d > 0 for d in diffs),
                "best_baseline": mean_std(best[label]),
            }
            if test_images:
                base_mean, ours_mean = cell["best_baseline"]["mean"], mean_std(ours)["mean"]
                cell["noise_points"] = gain_noise(base_mean, ours_mean, test_images)
                cell["reading"] = reading(cell["gain_points"]["mean"], base_mean, ours_mean, test_images)
            cells[label] = cell
        rows.append({"recipe": name, "students": cells})
    return {"seeds": common, "recipes": rows}


def _gain_cell(cell: dict[str, Any], seeds: int) -> str:
    if "gain_points" not in cell:
        return f"{cell['bockd_final']['mean']:.2f} (no baseline)"
    g = cell["gain_points"]
    text = f"{g['mean']:+.2f}" + (f" ± {g['std']:.2f}" if seeds > 1 else "")
    mark = {"gain": "", "loss": "", "within noise": " ≈"}.get(cell.get("reading", ""), "")
    return f"{text} ({cell['positive_seeds']}/{seeds}){mark}"


def comparison_markdown(table: dict[str, Any], title: str) -> str:
    recipes = table["recipes"]
    students = list(recipes[0]["students"])
    lines = [
        f"### {title}",
        "",
        "Gain in top-1 points over each student's own baseline at the final epoch: mean ± std over seeds "
        f"(seeds with a positive gain); ≈ marks a mean gain within test-set noise ({table['noise_rule']}).",
        "",
        "| recipe | seeds | " + " | ".join(students) + " | ensemble top-1 |",
        "|---|---:|" + "---:|" * len(students) + "---:|",
    ]
    for row in recipes:
        n = len(row["seeds"])
        cells = [_gain_cell(row["students"][s], n) for s in students]
        ens = row["ensemble_final"]
        ens_text = f"{ens['mean']:.2f}" + (f" ± {ens['std']:.2f}" if n > 1 else "")
        lines.append(f"| {row['recipe']} | {n} | " + " | ".join(cells) + f" | {ens_text} |")
    best = table.get("against_best_alone")
    if best:
        labels = list(best["recipes"][0]["students"])
        n = len(best["seeds"])
        lines += [
            "",
            "Against the same student trained alone with the best schedule of the study (the highest "
            f"baseline top-1 of any recipe, paired per seed; seeds {', '.join(map(str, best['seeds']))}): "
            "what a user who wants one student gets from the family instead of training it alone.",
            "",
            "| recipe | " + " | ".join(labels) + " |",
            "|---|" + "---:|" * len(labels),
        ]
        for row in best["recipes"]:
            cells = [_gain_cell(row["students"][label], n) for label in labels]
            lines.append(f"| {row['recipe']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_comparison(table: dict[str, Any], path: Path, title: str) -> None:
    """Grouped bars: each recipe's mean gain per student, std as error bars, the noise band in grey; beside
    it, when the study has one (`against_best_alone`), the same against the best schedule's baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(table["recipes"], "gain over own baseline (top-1 points)")]
    if table.get("against_best_alone"):
        panels.append(
            (table["against_best_alone"]["recipes"], "against the best baseline of any schedule (points)")
        )
    students = gain_students(table["recipes"])
    if not students:
        return
    width = 1.6 + 1.3 * len(students)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 4.2), dpi=120, squeeze=False)
    for ax, (recipes, ylabel) in zip(axes[0], panels, strict=True):
        _gain_bars(ax, recipes, gain_students(recipes), ylabel)
    fig.suptitle(title + "\ngrey: test-set noise band", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def gain_students(recipes: list[dict[str, Any]]) -> list[str]:
    """The students that have a gain in at least one recipe, in the table's order (recipes may have
    baselines for different students)."""
    order = [s for row in recipes for s in row["students"]]
    has_gain = {s for row in recipes for s, cell in row["students"].items() if "gain_points" in cell}
    return [s for s in dict.fromkeys(order) if s in has_gain]


def _gain_bars(ax: Any, recipes: list[dict[str, Any]], students: list[str], ylabel: str) -> None:
    width = 0.8 / len(recipes)
    for k, s in enumerate(students):
        noise = max(r["students"].get(s, {}).get("noise_points", 0.0) for r in recipes)
        ax.fill_between([k - 0.45, k + 0.45], -noise, noise, color="0.88", zorder=0)
    nan = {"mean": float("nan"), "std": float("nan")}  # no baseline for this recipe: no bar
    for j, row in enumerate(recipes):
        xs = [k - 0.4 + width * (j + 0.5) for k in range(len(students))]
        gains = [row["students"].get(s, {}).get("gain_points", nan) for s in students]
        ax.bar(
            xs,
            [g["mean"] for g in gains],
            width,
            yerr=[g["std"] for g in gains],
            capsize=2,
            label=row["recipe"],
            zorder=2,
        )
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(students)), students)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, axis="y", alpha=0.3)


def run_study(
    spec: StudySpec, out_dir: str | Path, *, source: str | Path | None = None, fit: Fit = fit_to_the_end
) -> dict[str, Any]:
    """Train every recipe's runs (seed by seed), writing each recipe's results and the comparison as they
    finish; returns the comparison (``comparison``) with every recipe's full summary under ``summaries``.

    ``source``: read the dataset from there instead of the study's ``data_path``, without it entering the
    runs' identity (the same runs resume on another machine with the data elsewhere). ``fit`` trains one
    run (``bockd.reproduce.Fit``); a recipe's seed enters the results once all its runs have finished.
    """
    out_dir = Path(out_dir)
    plans = study_configs(spec)
    first_plan = next(iter(plans.values()))
    data = load_training_data(next(iter(first_plan.values()))["ensemble"], source)
    runs_dir = out_dir / "runs"
    folders = {
        run_folder(out_dir, seed, name, cfg, runs_dir)
        for plan in plans.values()
        for seed, runs in plan.items()
        for name, cfg in runs.items()
    }
    total, done = len(folders), set()
    summaries: dict[str, dict[str, Any]] = {}
    title = f"{spec.arch} on {data.name}, {len(data.train):,} training images"

    def in_study_order() -> dict[str, dict[str, Any]]:  # finished first, shown in the study file's order
        return {name: summaries[name] for name in plans if name in summaries}

    def write_comparison() -> dict[str, Any]:
        table = comparison(in_study_order())
        if not summaries:  # nothing finished yet (a budget ran out): no table to write
            return table
        write_json(out_dir / STUDY_JSON, {**table, "title": title, "summaries": in_study_order()})
        md = comparison_markdown(table, title)
        atomic_write(out_dir / STUDY_MD, lambda tmp: tmp.write_text(md))
        plot_comparison(table, out_dir / STUDY_PNG, title)
        return table

    results: dict[str, dict[int, dict[str, TrainResult]]] = {name: {} for name in plans}

    def folder(s: int, run: str, cfg: TrainConfig) -> Path:
        path = run_folder(out_dir, s, run, cfg, runs_dir)
        done.add(path)
        return path

    def fit_recipe_seed(name: str, seed: int) -> None:
        plan = plans[name]
        one_seed = train_runs({seed: plan[seed]}, data, folder, progress=(len(done), total), fit=fit)
        if seed not in one_seed:
            return
        results[name][seed] = one_seed[seed]
        summaries[name] = full_summary(results[name], data, plan, spec.recipes[name]["preset"])
        write_results(out_dir / name, summaries[name])
        write_comparison()
        log.info("study: recipe %s, seed %d done (%d/%d runs)", name, seed, len(done), total)

    # What has finished enters the tables before anything trains: a study resumed with a recipe added
    # never shows fewer seeds than it had, while the new recipe's first seed trains.
    pending = []
    for seed in spec.seeds:
        for name, plan in plans.items():
            if all(run_finished(run_folder(out_dir, seed, r, c, runs_dir)) for r, c in plan[seed].items()):
                fit_recipe_seed(name, seed)
            else:
                pending.append((name, seed))
    for name, seed in pending:
        fit_recipe_seed(name, seed)
    return {**write_comparison(), "title": title, "summaries": in_study_order()}
