"""Draws docs/architecture.svg: the layers of bockd and the data flow of one pipeline run.

Run ``.venv/bin/python docs/architecture.py`` after changing a layer or a step; the SVG is committed.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

OUT = Path(__file__).with_name("architecture.svg")

# (layer, what is in it, colour), top to bottom: each imports only the ones below it.
LAYERS = [
    (
        "CLI",
        "bockd.cli: bockd train | export | reproduce | study | services | pipeline | serve | predict",
        "#f4d8cd",
    ),
    (
        "pipeline",
        "bockd.pipeline: steps, records, selection, report, trainjob_worker, the @dsl.pipeline,\n"
        "local run, cluster client   +   bockd.components: one KFP component per step",
        "#fbe7b5",
    ),
    (
        "platform",
        "bockd.platform: s3, tracking + model_registry (MLflow), kube (client, names, CRDs),\n"
        "inference_service (KServe rollout), trainjob (Trainer launcher), services (local stack),\n"
        "serving_benchmark (latency through the real model server)",
        "#d5e8d4",
    ),
    (
        "model server",
        "bockd.serving: the KServe model server (ONNX Runtime; no PyTorch, nothing of training)",
        "#dae8fc",
    ),
    (
        "method core",
        "bockd: models, data, losses, engine, config, checkpoint, export, evaluate, significance,\n"
        "reproduce, study, atomic, errors (PyTorch; no KFP, MLflow or KServe)",
        "#e1d5e7",
    ),
]

# (step, the record or artifact it writes, the platform part it uses)
STEPS = [
    ("prepare_data", "Dataset: uint8 arrays + meta.json", "s3 (an s3:// source)"),
    (
        "train_ensemble",
        "Model: weights, card, history,\nstudents/s<k> exports; TrainingResult",
        "tracking, s3 checkpoints\n(trainjob: several nodes)",
    ),
    (
        "train_baseline",
        "BaselineRecord (baseline.json): each\nbaseline student alone, beside the ensemble",
        "s3 checkpoints",
    ),
    ("evaluate", "EvaluationRecord (evaluation.json)\n+ confusion.png, per student", ""),
    ("quantize", "QuantizationRecord + int8 student,\nper student (after its evaluate)", ""),
    (
        "measure",
        "MeasurementsRecord: every student, fp32\n+ int8, through the model server",
        "serving_benchmark, tracking",
    ),
    ("cascade", "CascadeRecord + cascade folder:\nthresholds fitted on the validation split", "tracking"),
    ("register", "Registrations (fp32 + passed int8\n+ the cascade)", "model_registry (MLflow)"),
    ("select", "SelectionRecord (+ @champion)", "model_registry"),
    ("report", "HTML report + Summary", "tracking"),
    ("deploy", "Endpoints", "inference_service (cluster)\nservices.model_servers (local)"),
]


def box(ax, x, y, w, h, color, text, size=9, weight="normal", align="center") -> None:
    ax.add_patch(
        FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc=color, ec="#555")
    )
    tx = x + w / 2 if align == "center" else x + 0.15
    ax.text(tx, y + h / 2, text, ha=align, va="center", fontsize=size, weight=weight, wrap=True)


def arrow(ax, start, end, style="-|>", color="#333", ls="-") -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=12, color=color, linestyle=ls))


def main() -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(16, 8.6), gridspec_kw={"width_ratios": [1.25, 1]})
    for ax in (left, right):
        ax.set_axis_off()

    left.set_xlim(0, 10)
    left.set_ylim(0, 10.4)
    left.set_title("Layers: each imports only the ones below it (make imports)", fontsize=12, weight="bold")
    h, gap = 1.55, 0.45
    for i, (name, what, color) in enumerate(LAYERS):
        y = 10 - (i + 1) * h - i * gap
        box(left, 0.1, y, 1.9, h, color, name, size=10, weight="bold")
        box(left, 2.2, y, 7.7, h, color, what, size=8.5, align="left")
        if i:
            arrow(left, (5.5, y + h + gap - 0.03), (5.5, y + h + 0.03))
    left.text(
        5.5,
        -0.05,
        "arrows: imports (downward only); bockd.serving is also kept away from torch and the "
        "training modules",
        ha="center",
        fontsize=8,
        style="italic",
    )

    right.set_xlim(0, 10)
    right.set_ylim(0, 10.4)
    right.set_title("Data flow of one pipeline run (typed records between steps)", fontsize=12, weight="bold")
    n = len(STEPS)
    step_h = 10.0 / n
    for i, (step, writes, uses) in enumerate(STEPS):
        y = 10 - (i + 1) * step_h + 0.12
        color = "#fbe7b5" if step != "train_baseline" else "#fdf3d6"
        box(right, 0.1, y, 2.6, step_h - 0.3, color, step, size=9.5, weight="bold")
        right.text(2.95, y + (step_h - 0.3) / 2, writes, va="center", fontsize=8)
        if uses:
            right.text(7.0, y + (step_h - 0.3) / 2, uses, va="center", fontsize=7.5, color="#2d6a2d")
        if i:
            arrow(right, (1.4, y + step_h - 0.02), (1.4, y + step_h - 0.3 + 0.02 + 0.0))
    right.text(7.0, 10.15, "platform part used", fontsize=8, color="#2d6a2d", weight="bold")
    right.text(2.95, 10.15, "writes", fontsize=8, weight="bold")
    fig.tight_layout()
    fig.savefig(OUT, format="svg", metadata={"Date": None})
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
