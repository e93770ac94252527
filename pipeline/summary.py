"""What ``bockd pipeline run --local`` prints at the end: one real prediction per endpoint, the table."""

from __future__ import annotations

import sys
from typing import TextIO

from bockd.pipeline.local import LocalRun
from bockd.pipeline.records import Endpoint, SummaryRow
from bockd.pipeline.report import format_gain, format_optional, noise_legend


def summary_table(rows: list[SummaryRow], endpoints: list[Endpoint]) -> str:
    """Markdown: student, params, size %, top-1, baseline top-1, gain, MLflow version, endpoint."""
    urls = {e.student: e.url for e in endpoints}
    lines = [
        "| student | params | size % | top-1 % | baseline top-1 % | gain | MLflow version | endpoint |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        version = f"{r.registered_model} v{r.version}" if r.version else "-"
        lines.append(
            f"| {r.label}{' *' if r.selected else ''} | {r.params:,} | {r.size_pct:.2f} | "
            f"{r.top1:.2f} | {format_optional(r.baseline_top1, '.2f')} | "
            f"{format_gain(r)} | "
            f"{version} | {urls.get(r.student, '-')} |"
        )
    legend = noise_legend(rows)
    return "\n".join(lines) + (f"\n{legend}" if legend else "")


PROBE_IMAGES = 8  # the first test images, sent in one request: each answer shown, right or wrong


def predict_once(run: LocalRun, endpoints: list[Endpoint], n: int = PROBE_IMAGES) -> list[str]:
    """Send the first ``n`` test images to every endpoint in one V1 request; a line per endpoint, then one
    per image (true class, top-1 answer and its probability, right or wrong)."""
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
    print(f"\nHTML report: {run.outputs['report']}", file=out)
    print(f"MLflow:      {mlflow_uri}", file=out)
    print(f"log:         {run.log}", file=out)
    if endpoints:
        print(
            "local model servers keep running; stop them and the services with: bockd services down", file=out
        )
