"""The pipeline's HTML report: one self-contained file (pictures inlined) that the KFP UI renders.

Accuracy against size (students and their baselines), accuracy against the latency measured through the
model server (fp32 and int8, Pareto front marked) with the measured table and every int8 verdict, the
per-student table, the confidence cascade against its students, the selection with its reasons, training
curves and every student's confusion matrix.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bockd.atomic import write_text
from bockd.pipeline.records import (
    CascadeRecord,
    CascadeRegistration,
    EvaluationRecord,
    Int8Verdict,
    MeasurementsRecord,
    Precision,
    QuantizationRecord,
    Registration,
    SelectionRecord,
    StudentMeasurement,
    SummaryRow,
)
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


@dataclass(frozen=True)
class MeasuredPoint:
    """One student at one precision as measured through the model server, with its top-1."""

    student: int
    precision: Precision
    label: str  # "S3", "S3 int8"
    top1: float
    measurement: StudentMeasurement
    shippable: bool  # fp32, or an int8 version whose verdict is "kept"
    verdict: Int8Verdict | None  # int8 points only


def measured_points(
    evaluations: list[EvaluationRecord],
    quantizations: list[QuantizationRecord],
    measurements: MeasurementsRecord | None,
    verdicts: dict[int, Int8Verdict],
) -> list[MeasuredPoint]:
    """Every measured (student, precision), in student order, fp32 first."""
    if measurements is None:
        return []
    top1 = {(e.student, "fp32"): e.top1 for e in evaluations}
    top1 |= {(q.student, "int8"): q.int8_top1 for q in quantizations if q.enabled and q.int8_top1 is not None}
    points = []
    for m in sorted(measurements.measurements, key=lambda m: (m.student, m.precision != "fp32")):
        if (m.student, m.precision) not in top1 or m.p50_ms is None:
            continue
        verdict = verdicts.get(m.student) if m.precision == "int8" else None
        points.append(
            MeasuredPoint(
                student=m.student,
                precision=m.precision,
                label=m.label if m.precision == "fp32" else f"{m.label} int8",
                top1=top1[m.student, m.precision],
                measurement=m,
                shippable=m.precision == "fp32" or (verdict is not None and verdict.shipped),
                verdict=verdict,
            )
        )
    return points


def pareto_front(points: list[tuple[float, float]]) -> set[int]:
    """Indices of the (latency, top-1) ``points`` on the Pareto front: no other point is at least as fast
    and at least as accurate and strictly better in one of the two. Exact twins are both on it."""
    front = set()
    for i, (lat, acc) in enumerate(points):
        dominated = any(
            l2 <= lat and a2 >= acc and (l2 < lat or a2 > acc) for j, (l2, a2) in enumerate(points) if j != i
        )
        if not dominated:
            front.add(i)
    return front


def accuracy_vs_latency_plot(points: list[MeasuredPoint]) -> str:
    """Top-1 (%) against served p50 latency at batch 1 (ms): fp32 circles, int8 triangles (hollow: not
    shipped), the Pareto front of the shippable ones as a step line; a PNG data URI."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    ship = [p for p in points if p.shippable]
    on_front = pareto_front([(p.measurement.p50_ms or 0.0, p.top1) for p in ship])
    front = sorted((ship[i] for i in on_front), key=lambda p: (p.measurement.p50_ms, -p.top1))
    if front:
        ax.step(
            [p.measurement.p50_ms for p in front],
            [p.top1 for p in front],
            where="post",
            color="tab:green",
            alpha=0.6,
            label="Pareto front (shippable)",
        )
    for precision, marker in (("fp32", "o"), ("int8", "^")):
        for shipped in (True, False):
            group = [p for p in points if p.precision == precision and p.shippable == shipped]
            if not group:
                continue
            label = precision if shipped else f"{precision}, not shipped"
            ax.scatter(
                [p.measurement.p50_ms for p in group],
                [p.top1 for p in group],
                marker=marker,
                s=40,
                facecolors=("tab:blue" if precision == "fp32" else "tab:orange") if shipped else "none",
                edgecolors="tab:blue" if precision == "fp32" else "tab:orange",
                label=label,
                zorder=3,
            )
    for p in points:
        # int8 labels below their point, fp32 above: a student's two points often nearly coincide.
        offset = (4, 6) if p.precision == "fp32" else (4, -12)
        ax.annotate(p.label, (p.measurement.p50_ms, p.top1), textcoords="offset points", xytext=offset)
    latencies = [p.measurement.p50_ms or 0.0 for p in points]
    if latencies and min(latencies) > 0 and max(latencies) / min(latencies) > 10:
        ax.set_xscale("log")
    ax.set_xlabel("served p50 latency, batch 1 (ms)")
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
    *,
    picks: dict[int, Precision] | None = None,
    quantizations: list[QuantizationRecord] | None = None,
    measurements: MeasurementsRecord | None = None,
    verdicts: dict[int, Int8Verdict] | None = None,
) -> list[SummaryRow]:
    """One row per student: what the report, the CLI summary and MLflow tags all show.

    ``baselines``: student number -> its baseline's top-1 (%); ``chosen``: the selected student numbers;
    ``picks``: the precision each chosen one is deployed at (default fp32). The int8 columns come from
    ``quantizations`` and ``verdicts`` (student -> its int8 verdict), the served ones from ``measurements``.
    """
    versions = {(r.student, r.precision): r for r in registrations}
    quantized = {q.student: q for q in quantizations or [] if q.enabled}
    picks = picks or {}
    rows = []
    for ev in sorted(evaluations, key=lambda e: e.student):
        k = ev.student
        base = baselines.get(k)
        precision = picks.get(k, "fp32") if k in chosen else None
        reg = versions.get((k, precision or "fp32"))
        gain = None if base is None else ev.top1 - base
        fp32 = measurements.of(k, "fp32") if measurements else None
        int8 = measurements.of(k, "int8") if measurements else None
        q = quantized.get(k)
        verdict = (verdicts or {}).get(k)
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
                served_p50_ms=fp32.p50_ms if fp32 else None,
                size_bytes=fp32.size_bytes if fp32 else None,
                int8_top1=q.int8_top1 if q else None,
                int8_served_p50_ms=int8.p50_ms if int8 else None,
                int8_outcome=verdict.summary if verdict and q else None,
                precision=precision,
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


def _selected(row: SummaryRow) -> str:
    """``yes``, ``yes (int8)`` when its int8 version is what is deployed, or ``no``."""
    if not row.selected:
        return "no"
    return "yes (int8)" if row.precision == "int8" else "yes"


def _table(rows: list[SummaryRow]) -> str:
    head = [
        "student", "params", "size %", "top-1 %", "top-5 %", "baseline top-1 %", "gain",
        "MFLOPs", "forward b1 ms", "served p50 b1 ms", "int8 top-1 %", "int8", "MLflow model", "version",
        "selected",
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
            format_optional(r.served_p50_ms, ".2f"),
            format_optional(r.int8_top1, ".2f"),
            format_optional(r.int8_outcome),
            format_optional(r.registered_model),
            format_optional(r.version),
            _selected(r),
        ]
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _measured_table(points: list[MeasuredPoint], batch_sizes: list[int]) -> str:
    """One row per measured (student, precision): size on disk, served p50/p99 and images/s and the raw
    forward per batch size, whether it is on the front, the int8 verdict."""
    on_front = pareto_front([(p.measurement.p50_ms or 0.0, p.top1) for p in points if p.shippable])
    front_labels = {[p for p in points if p.shippable][i].label for i in on_front}
    head = ["student", "precision", "top-1 %", "size on disk KB"]
    for b in batch_sizes:
        head += [f"p50 b{b} ms", f"p99 b{b} ms", f"images/s b{b}", f"forward b{b} ms"]
    head += ["Pareto front", "int8 verdict"]
    body = []
    for p in points:
        m = p.measurement
        cells = [p.label, p.precision, f"{p.top1:.2f}", f"{m.size_bytes / 1024:.1f}"]
        for b in batch_sizes:
            t = m.at(b)
            cells += (
                [f"{t.p50_ms:.2f}", f"{t.p99_ms:.2f}", f"{t.images_per_s:.0f}", f"{t.raw_forward_ms:.3f}"]
                if t
                else ["-"] * 4
            )
        cells += ["yes" if p.label in front_labels else "no", p.verdict.summary if p.verdict else "-"]
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _measured_section(
    points: list[MeasuredPoint], measurements: MeasurementsRecord | None, verdicts: dict[int, Int8Verdict]
) -> str:
    """The "Measured where it runs" section: plot, table, the machine, every int8 verdict with its reason."""
    esc = html.escape
    items = "".join(
        f'<li class="{"chosen" if v.shipped else "rejected"}"><b>{esc(v.label)} int8</b> {esc(v.summary)}: '
        f"{esc(v.reason)}</li>"
        for _, v in sorted(verdicts.items())
        if v.outcome != "off"
    )
    verdict_list = f'<ul class="reasons">{items}</ul>' if items else ""
    if measurements is None or not measurements.enabled or not points:
        off = (
            "<h2>Measured latency</h2><p>Not measured through the model server (measurement off): selection "
            "used the evaluate step's in-process forward latency, and no int8 version ships.</p>"
        )
        return off + verdict_list
    opts, machine = measurements.options, measurements.machine
    where = ""
    if machine is not None:
        limit = f"cgroup limit {machine.cpu_limit} CPUs" if machine.cpu_limit else "no cgroup CPU limit"
        load = f", 1-minute load {machine.load_1m:.2f} at the start" if machine.load_1m is not None else ""
        where = (
            f"{machine.cpu}, {machine.cores} cores ({machine.usable_cores} usable, {limit}), "
            f"ONNX Runtime {machine.onnxruntime} with {opts.get('threads')} intra-op thread(s){load}"
        )
    how = (
        f"Every student through the real model server (V2 binary UINT8 requests of test images, one at a "
        f"time on one keep-alive connection): {opts.get('requests')} timed requests at batch 1 and "
        f"{opts.get('batch_requests')} at each larger batch, after {opts.get('warmup')} warm-up ones. "
        "Latency is per request, client side; forward is the model alone (ONNX Runtime, no server). "
        "An int8 version ships only within its accuracy-drop limit and when measurably faster than its "
        f"fp32 version at batch 1 (the {float(opts.get('confidence', 0.95)):.0%} bootstrap interval of the "
        "speedup of medians above 1). Selection's latency (max_latency_ms) is the served p50 at batch 1."
    )
    return f"""<h2>Accuracy against measured latency</h2>
<p>Measured on {esc(where)}.</p>
<img src="{accuracy_vs_latency_plot(points)}" alt="top-1 accuracy against served p50 latency">
{_measured_table(points, [int(b) for b in opts.get("batch_sizes", [1])])}
<p>{esc(how)}</p>
<h3>int8 versions</h3>
{verdict_list or "<p>No int8 versions (quantization off).</p>"}"""


def format_threshold(threshold: float | None) -> str:
    """A stage's threshold as tables show it: ``0.9731``, ``never`` (above 1: the stage is not run) or
    ``-`` (the last stage answers the rest)."""
    if threshold is None:
        return "-"
    return "never" if threshold > 1.0 else f"{threshold:.4f}"


def cascade_exits(record: CascadeRecord) -> str:
    """Who answered what share of the test images: ``S5 81 %, S3 12 %, S1 7 %``."""
    return ", ".join(f"{s.label} {100 * s.test_exit_fraction:.0f} %" for s in record.stages)


def _cascade_table(record: CascadeRecord) -> str:
    head = [
        "", "precision", "threshold", "cost ms / image", "test top-1 %", "answered (validation)",
        "answered (test)", "the cascade against it",
    ]  # fmt: skip
    top1, cost = float(record.test_top1 or 0.0), float(record.test_cost_ms or 0.0)
    body = []
    for st in record.stages:
        cells = [
            st.label,
            st.precision,
            format_threshold(st.threshold),
            f"{st.cost_ms:.4g}",
            f"{st.test_top1:.2f}",
            f"{100 * st.val_exit_fraction:.1f} %",
            f"{100 * st.test_exit_fraction:.1f} %",
            f"{top1 - st.test_top1:+.2f} points at {cost / st.cost_ms:.2f}x its cost",
        ]
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    cells = ["cascade", "-", "-", f"{cost:.4g}", f"{top1:.2f}", "100 %", "100 %", "-"]
    body.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells) + "</tr>")
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def cascade_section(record: CascadeRecord | None, registration: CascadeRegistration | None = None) -> str:
    """The "Confidence cascade" section: the order, the verdict, a table of each student alone against the
    cascade (threshold, cost, top-1, who answered what share), how the thresholds were fitted; or why
    there is no cascade. Empty without a record."""
    esc = html.escape
    if record is None:
        return ""
    if not record.fitted or record.fit is None:
        return f"<h2>Confidence cascade</h2><p>Skipped: {esc(record.reason)}.</p>"
    fit, ref = record.fit, record.reference_label
    rule = (
        f"{ref}'s validation top-1 minus {record.max_drop:g} points"
        if record.max_drop is not None
        else "cascade.target_top1"
    )
    reached = "reached" if fit.reached else "NOT reached: every image escalates to " + ref
    how = (
        f"Thresholds fitted on the validation split only ({fit.num_val} images held out of training): "
        f"target top-1 {fit.target_top1:.2f} % ({rule}), {reached} with {fit.val_top1:.2f} % at "
        f"{fit.expected_cost_ms:.4g} ms per image ({ref} alone: {fit.val_reference_top1:.2f} %; "
        f"{fit.search} search). Then scored on the {record.num_test} test images. A stage answers an image "
        "when its largest softmax probability is at least its threshold; the rest of the batch escalates. "
        f"Costs: {record.cost_basis}; an image that escalates pays for every stage it ran through."
    )
    precisions = "; ".join(f"{s.label} {s.precision} ({s.precision_reason})" for s in record.stages)
    registered = (
        f"<p>MLflow: {esc(registration.registered_model)} v{esc(registration.version)}</p>"
        if registration
        else ""
    )
    return f"""<h2>Confidence cascade</h2>
<p><b>{esc(record.order)}</b>: {esc(record.verdict)}.
Answered on the test split: {esc(cascade_exits(record))}.</p>
{_cascade_table(record)}
<p>{esc(how)}</p>
<p>Precisions: {esc(precisions)}.</p>
{registered}"""


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
    evaluations: list[EvaluationRecord] | None = None,
    quantizations: list[QuantizationRecord] | None = None,
    measurements: MeasurementsRecord | None = None,
    verdicts: dict[int, Int8Verdict] | None = None,
    cascade: CascadeRecord | None = None,
    cascade_registration: CascadeRegistration | None = None,
) -> str:
    """The whole report as one HTML string; every value is escaped, every picture inlined. With
    ``measurements`` (and the ``evaluations`` and ``quantizations`` whose top-1 they plot), a section on
    accuracy against the measured latency and the int8 verdicts; with ``cascade``, the cascade's
    (`cascade_section`)."""
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
    verdicts = verdicts or {}
    points = measured_points(evaluations or [], quantizations or [], measurements, verdicts)
    measured = _measured_section(points, measurements, verdicts) if measurements or verdicts else ""
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
{measured}
{cascade_section(cascade, cascade_registration)}
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
