"""The pipeline's HTML report: one self-contained file (pictures inlined) that the KFP UI renders.

Accuracy against size (students and their baselines), the per-student table, the selection with its
reasons, training curves and every student's confusion matrix.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from bockd.atomic import write_text
from bockd.pipeline.records import EvaluationRecord, Registration, SelectionRecord, SummaryRow
from bockd.significance import gain_noise, reading


def _figure_to_data_uri(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _png_to_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_vs_size_plot(rows: list[SummaryRow], ensemble_top1: float | None) -> str:
    """Top-1 (%) against parameters (log scale): students, their baselines, the ensemble; a PNG data URI."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    params = [r.params for r in rows]
    ax.plot(params, [r.top1 for r in rows], marker="o", label="BOC-KD student")
    with_base = [r for r in rows if r.baseline_top1 is not None]
    if with_base:
        ax.plot(
            [r.params for r in with_base],
            [r.baseline_top1 for r in with_base],
            marker="s",
            linestyle="--",
            label="baseline (CE only)",
        )
    if ensemble_top1 is not None:
        ax.axhline(ensemble_top1, color="grey", linestyle=":", label="ensemble (mean of logits)")
    for r in rows:
        ax.annotate(r.label, (r.params, r.top1), textcoords="offset points", xytext=(4, 6))
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("top-1 test accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _figure_to_data_uri(fig)


def training_curves_plot(history: list[dict[str, float]], labels: list[str]) -> str:
    plt = _pyplot()
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    epochs = [h["epoch"] for h in history]
    for label, style in [*((label.upper(), "-") for label in labels), ("ensemble", "k:")]:
        key = f"test/{label.lower()}/top1"
        scored = [h for h in history if key in h]  # runtime.eval_every may skip epochs
        if scored:
            acc.plot([h["epoch"] for h in scored], [h[key] for h in scored], style, label=label)
    loss.plot(epochs, [h["train/loss"] for h in history], label="training loss")
    acc.set(xlabel="epoch", ylabel="test top-1 (%)", title="test accuracy")
    loss.set(xlabel="epoch", ylabel="loss", title="training loss (weighted sum over students)")
    for ax in (acc, loss):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _figure_to_data_uri(fig)


def summary_rows(
    evaluations: list[EvaluationRecord],
    baselines: dict[int, float],
    registrations: list[Registration],
    chosen: list[int],
) -> list[SummaryRow]:
    """One row per student: what the report, the CLI summary and MLflow tags all show.

    ``baselines``: student number -> its baseline's top-1 (%); ``chosen``: the selected student numbers.
    """
    versions = {r.student: r for r in registrations}
    rows = []
    for ev in sorted(evaluations, key=lambda e: e.student):
        k = ev.student
        base = baselines.get(k)
        reg = versions.get(k)
        gain = None if base is None else ev.top1 - base
        rows.append(
            SummaryRow(
                student=k,
                label=ev.label,
                params=ev.params,
                size_pct=ev.size_pct,
                top1=ev.top1,
                top5=ev.top5,
                baseline_top1=base,
                gain=gain,
                # One run, one seed: a gain only counts beyond the test set's binomial noise.
                gain_noise=None if base is None else gain_noise(base, ev.top1, ev.num_test),
                gain_reading=None if gain is None else reading(gain, base, ev.top1, ev.num_test),
                flops=ev.flops,
                latency_ms=ev.latency_p50_ms,
                registered_model=reg.registered_model if reg else None,
                version=reg.version if reg else None,
                selected=k in chosen,
            )
        )
    return rows


def format_optional(value: Any, spec: str = "", missing: str = "-") -> str:
    """``value`` formatted with ``spec``, or ``missing`` when there is none (no baseline, no version)."""
    return missing if value is None else format(value, spec)


WITHIN_NOISE_MARK = "≈"


def format_gain(row: SummaryRow) -> str:
    """A row's gain in points, marked ``≈`` when it lies within the test set's noise band."""
    if row.gain is None:
        return "-"
    mark = f" {WITHIN_NOISE_MARK}" if row.gain_reading == "within noise" else ""
    return f"{row.gain:+.2f}{mark}"


def noise_legend(rows: list[SummaryRow]) -> str:
    """One sentence saying what ``≈`` means for these rows, with the widest band among them."""
    bands = [r.gain_noise for r in rows if r.gain_noise is not None]
    if not bands:
        return ""
    return (
        f"{WITHIN_NOISE_MARK} = within test-set noise: a gain counts only beyond two binomial standard "
        f"errors of the difference (up to ±{max(bands):.2f} points here); one seed: small gains are none."
    )


def _table(rows: list[SummaryRow]) -> str:
    head = [
        "student", "params", "size %", "top-1 %", "top-5 %", "baseline top-1 %", "gain",
        "MFLOPs", "latency b1 ms", "MLflow model", "version", "selected",
    ]  # fmt: skip
    body = []
    for r in rows:
        cells = [
            r.label,
            f"{r.params:,}",
            f"{r.size_pct:.1f}",
            f"{r.top1:.2f}",
            f"{r.top5:.2f}",
            format_optional(r.baseline_top1, ".2f"),
            format_gain(r),
            f"{r.flops / 1e6:.2f}",
            format_optional(r.latency_ms, ".2f"),
            format_optional(r.registered_model),
            format_optional(r.version),
            "yes" if r.selected else "no",
        ]
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(body)}</tbody></table>"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
ul.reasons li { margin: 0.2em 0; } .chosen { color: #0a6b2d; } .rejected { color: #8a1c1c; }
.grid { display: flex; flex-wrap: wrap; gap: 1em; } figure { margin: 0; } img { max-width: 100%; }
"""


def render_report(
    *,
    title: str,
    facts: dict[str, str],
    rows: list[SummaryRow],
    selection: SelectionRecord,
    history: list[dict[str, float]],
    confusion_pngs: dict[str, Path],
    ensemble_top1: float | None,
) -> str:
    """The whole report as one HTML string; every value is escaped, every picture inlined."""
    esc = html.escape
    fact_rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in facts.items())
    reasons = []
    for kind, choices in (("chosen", selection.selection.chosen), ("rejected", selection.selection.rejected)):
        for c in choices:
            reasons.append(f'<li class="{kind}"><b>{esc(c.name)}</b> {kind}: {esc(c.reason)}</li>')
    promotions = "".join(
        f"<li>{esc(p.registered_model)}: {esc(p.message)}</li>" for p in selection.promotions
    )
    labels = [r.label.lower() for r in rows]
    confusions = "".join(
        f'<figure><img src="{_png_to_data_uri(path)}" alt="confusion matrix of {esc(name)}">'
        f"<figcaption>{esc(name)}</figcaption></figure>"
        for name, path in confusion_pngs.items()
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{esc(title)}</h1>
<table>{fact_rows}</table>
<h2>Accuracy against size</h2>
<img src="{accuracy_vs_size_plot(rows, ensemble_top1)}" alt="top-1 accuracy against parameters">
<h2>Students</h2>
{_table(rows)}
<p>{html.escape(noise_legend(rows))}</p>
<h2>Selection</h2>
<p>Policy: <code>{esc(str(selection.policy or "every student"))}</code></p>
<ul class="reasons">{"".join(reasons)}</ul>
{f"<h3>@champion</h3><ul>{promotions}</ul>" if promotions else ""}
<h2>Training</h2>
<img src="{training_curves_plot(history, labels)}" alt="training curves">
<h2>Confusion matrices</h2>
<div class="grid">{confusions}</div>
</body></html>
"""


def write_report(path: str | Path, content: str) -> Path:
    path = Path(path)
    write_text(path, content)
    return path
