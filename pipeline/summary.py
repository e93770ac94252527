"""What ``bockd pipeline run --local`` prints at the end: one real prediction per endpoint, the table."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from bockd.pipeline.local import LocalRun

from bockd.report import format_optional


def summary_table(rows: list[dict[str, Any]], endpoints: list[dict[str, Any]]) -> str:
    """Markdown: student, params, size %, top-1, baseline top-1, gain, MLflow version, endpoint."""
    urls = {int(e["student"]): e["url"] for e in endpoints}
    lines = [
        "| student | params | size % | top-1 % | baseline top-1 % | gain | MLflow version | endpoint |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        version = f"{r['model']} v{r['version']}" if r.get("version") else "-"
        lines.append(
            f"| {r['student']}{' *' if r['selected'] else ''} | {r['params']:,} | {r['size_pct']:.2f} | "
            f"{r['top1']:.2f} | {format_optional(r['baseline_top1'], '.2f')} | "
            f"{format_optional(r['gain'], '+.2f')} | "
            f"{version} | {urls.get(r['number'], '-')} |"
        )
    return "\n".join(lines)


def predict_once(run: LocalRun, endpoints: list[dict[str, Any]]) -> list[str]:
    """Send the first test image to every endpoint; one line per answer."""
    from bockd.data import ImageDataset
    from bockd.serving.client import predict_v1

    test = ImageDataset.load(run.outputs["dataset"])
    classes = test.classes
    image, label = test.test.x[0], int(test.test.y[0])
    lines = []
    for e in endpoints:
        answer = predict_v1(e["url"], e["name"], [image])[0]
        top = answer["top_k"][0]
        lines.append(
            f"{e['name']} at {e['url']}: test image 0 (true class {classes[label]!r}) -> "
            f"{top['class']!r} with p={top['probability']:.3f}"
        )
    return lines


def print_local_summary(run: LocalRun, *, mlflow_uri: str, out: TextIO = sys.stdout) -> None:
    endpoints = run.endpoints()
    print("", file=out)
    for line in predict_once(run, endpoints):
        print(f"prediction: {line}", file=out)
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
