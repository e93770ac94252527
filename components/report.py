"""report: the HTML report the KFP UI renders (accuracy against size and against measured latency, tables,
the cascade, selection, curves)."""

from kfp.dsl import HTML, Artifact, Input, Model, Output


def report(
    model: Input[Model],
    evaluations: Input[list[Artifact]],
    baselines: Input[list[Model]],
    quantized: Input[list[Model]],
    measurements: Input[Artifact],
    registrations: Input[Artifact],
    selection: Input[Artifact],
    cascade: Input[Model],
    mlflow_tracking_uri: str,
    mlflow_run_id: str,
    pipeline_run_id: str,
    report: Output[HTML],
    summary: Output[Artifact],
) -> None:
    """Also logs the report to the MLflow run; ``summary`` holds the per-student rows as JSON."""
    from bockd.pipeline.records import (
        BaselineRecord,
        CascadeRecord,
        MeasurementsRecord,
        QuantizationRecord,
        Registrations,
        SelectionRecord,
        Summary,
        read_records,
    )
    from bockd.pipeline.steps import report as run

    rows = run(
        model.path,
        [e.path for e in evaluations],
        read_records(BaselineRecord, [b.path for b in baselines]),
        Registrations.read(registrations.path).registrations,
        SelectionRecord.read(selection.path),
        report.path,
        quantizations=read_records(QuantizationRecord, [q.path for q in quantized]),
        measurements=MeasurementsRecord.read(measurements.path),
        cascade=CascadeRecord.read(cascade.path),
        cascade_registration=Registrations.read(registrations.path).cascade,
        tracking_uri=mlflow_tracking_uri,
        run_id=mlflow_run_id,
        pipeline_run_id=pipeline_run_id,
    )
    Summary(rows=rows).write(summary.path)
