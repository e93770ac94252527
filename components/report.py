"""report: the HTML report the KFP UI renders (accuracy against size, table, selection, curves)."""

from kfp.dsl import HTML, Artifact, Input, Model, Output


def report(
    model: Input[Model],
    evaluations: Input[list[Artifact]],
    baselines: Input[list[Model]],
    registrations: Input[Artifact],
    selection: Input[Artifact],
    mlflow_tracking_uri: str,
    mlflow_run_id: str,
    pipeline_run_id: str,
    report: Output[HTML],
    summary: Output[Artifact],
) -> None:
    """Also logs the report to the MLflow run; ``summary`` holds the per-student rows as JSON."""
    import json

    from bockd.steps import BASELINE_FILE, read_records
    from bockd.steps import report as run

    with open(registrations.path) as f:
        registered = json.load(f)
    with open(selection.path) as f:
        chosen = json.load(f)
    rows = run(
        model.path,
        [e.path for e in evaluations],
        read_records([b.path for b in baselines], BASELINE_FILE),
        registered,
        chosen,
        report.path,
        tracking_uri=mlflow_tracking_uri,
        run_id=mlflow_run_id,
        pipeline_run_id=pipeline_run_id,
    )
    with open(summary.path, "w") as f:
        json.dump(rows, f, indent=2)
