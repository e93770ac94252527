"""What ``bockd pipeline run --local`` prints at the end: one real prediction per endpoint, the table, the
cascade in two lines."""

from __future__ import annotations

import sys
from collections import Counter
from typing import TextIO

from bockd.pipeline.local import LocalRun
from bockd.pipeline.records import CascadeEndpoint, CascadeRecord, Endpoint, SummaryRow
from bockd.pipeline.report import cascade_exits, format_gain, format_optional, format_threshold, noise_legend


def int8_cell(row: SummaryRow) -> str:
    """The int8 outcome in a few words: ``97.22 % faster: kept``, ``96.94 % not faster: not shipped``,
    ``drop 1.30 > 1.00: not shipped`` (its top-1 is in the drop), ``off`` or ``-``."""
    if row.int8_outcome is None:
        return "-"
    if row.int8_top1 is None or row.int8_outcome.startswith(("drop", "off")):
        return row.int8_outcome
    return f"{row.int8_top1:.2f} % {row.int8_outcome}"


def summary_table(rows: list[SummaryRow], endpoints: list[Endpoint]) -> str:
    """Markdown: student, params, size %, top-1, baseline top-1, gain, served p50 at batch 1, the int8
    outcome, MLflow version (of the deployed precision), endpoint."""
    urls = {e.student: e.url for e in endpoints}
    lines = [
        "| student | params | size % | top-1 % | baseline top-1 % | gain | p50 ms | int8 | MLflow version "
        "| endpoint |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        version = f"{r.registered_model} v{r.version}" if r.version else "-"
        if r.selected and r.precision == "int8":
            version += " (int8)"
        lines.append(
            f"| {r.label}{' *' if r.selected else ''} | {r.params:,} | {r.size_pct:.2f} | "
            f"{r.top1:.2f} | {format_optional(r.baseline_top1, '.2f')} | "
            f"{format_gain(r)} | {format_optional(r.served_p50_ms, '.2f')} | {int8_cell(r)} | "
            f"{version} | {urls.get(r.student, '-')} |"
        )
    legend = noise_legend(rows)
    if any(r.served_p50_ms is not None for r in rows):
        lines.append("p50 ms: one image through the model server on this machine (fp32).")
    return "\n".join(lines) + (f"\n{legend}" if legend else "")


def cascade_lines(record: CascadeRecord | None, endpoint: CascadeEndpoint | None = None) -> list[str]:
    """The cascade after the table, at most two lines: order, thresholds, who answered what share, test
    top-1 and cost against the largest student alone and each chosen one; then the verdict and endpoint.
    One line when it was skipped; none without a record."""
    if record is None:
        return []
    if not record.fitted:
        return [f"cascade: {record.verdict}"]
    thresholds = ", ".join(format_threshold(t) for t in record.thresholds)
    alone = ", ".join(f"{s.label} {s.test_top1:.2f} % at {s.cost_ms:.3g} ms" for s in record.stages)
    where = f"; endpoint {endpoint.registered_model} at {endpoint.url}" if endpoint else ""
    return [
        f"cascade {record.order} (thresholds {thresholds}; answered {cascade_exits(record)}): test top-1 "
        f"{record.test_top1:.2f} % at {record.test_cost_ms:.3g} ms per image; alone: {alone}",
        f"  {record.verdict}{where}",
    ]


PROBE_IMAGES = 8  # the first test images, sent in one request: each answer shown, right or wrong


def predict_once(run: LocalRun, endpoints: list[Endpoint], n: int = PROBE_IMAGES) -> list[str]:
    """Send the first ``n`` test images to every endpoint in one V1 request; a line per endpoint, then one
    per image (true class, top-1 answer and its probability, right or wrong). The cascade's endpoint, if
    deployed, gets one line: its tally and which students answered how many."""
    from bockd.data import ImageDataset
    from bockd.serving.client import predict_v1

    test = ImageDataset.load(run.outputs["dataset"])
    classes = test.classes
    images, labels = test.test.x[:n], [int(y) for y in test.test.y[:n]]
    lines = []
    for e in endpoints:
        answers = predict_v1(e.url, e.registered_model, list(images))
        tops = [a["top_k"][0] for a in answers]
        right = sum(t["class"] == classes[y] for t, y in zip(tops, labels, strict=True))
        where = f"{e.registered_model} at {e.url}"
        lines.append(f"prediction: {where}: the first {len(labels)} test images, {right} right")
        for i, (top, y) in enumerate(zip(tops, labels, strict=True)):
            verdict = "right" if top["class"] == classes[y] else "wrong"
            lines.append(
                f"  image {i}: true {classes[y]!r} -> {top['class']!r} (p={top['probability']:.3f}) {verdict}"
            )
    cascade = run.cascade_endpoint()
    if cascade is not None:
        answers = predict_v1(cascade.url, cascade.registered_model, list(images))
        right = sum(a["top_k"][0]["class"] == classes[y] for a, y in zip(answers, labels, strict=True))
        who = Counter(a["student"] for a in answers)
        shares = ", ".join(f"{label} {who[label]}" for label in cascade.labels)
        lines.append(
            f"prediction: {cascade.registered_model} at {cascade.url}: the first {len(labels)} test images, "
            f"{right} right; answered: {shares}"
        )
    return lines


def print_local_summary(run: LocalRun, *, mlflow_uri: str, out: TextIO | None = None) -> None:
    out = out if out is not None else sys.stdout  # looked up per call: tests and callers redirect stdout
    endpoints = run.endpoints()
    print("", file=out)
    for line in predict_once(run, endpoints):
        print(line, file=out)
    print("", file=out)
    print(summary_table(run.summary(), endpoints), file=out)
    print("(* = selected and deployed)", file=out)
    for line in cascade_lines(run.cascade(), run.cascade_endpoint()):
        print(line, file=out)
    print(f"\nHTML report: {run.outputs['report']}", file=out)
    print(f"MLflow:      {mlflow_uri}", file=out)
    print(f"log:         {run.log}", file=out)
    if endpoints or run.cascade_endpoint():
        print(
            "local model servers keep running; stop them and the services with: bockd services down", file=out
        )
