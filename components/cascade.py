"""cascade: the confidence cascade of the chosen students, thresholds fitted on the validation split only."""

from typing import Any

from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output


def cascade(
    dataset: Input[Dataset],
    model: Input[Model],
    quantized: Input[list[Model]],
    measurements: Input[Artifact],
    cascade_options: dict[str, Any],
    mlflow_tracking_uri: str,
    mlflow_run_id: str,
    cascade: Output[Model],
    metrics: Output[Metrics],
) -> bool:
    """The servable cascade folder (``cascade/``) and its record in ``cascade``: each chosen student at the
    precision it ships at, costs from the measured raw forwards, test top-1 and cost against the largest
    student alone. Also logged to the MLflow run. Returns whether a cascade was fitted (False: skipped, the
    record says why)."""
    from bockd.pipeline.records import MeasurementsRecord
    from bockd.pipeline.steps import cascade as run

    record = run(
        dataset.path,
        model.path,
        [q.path for q in quantized],
        MeasurementsRecord.read(measurements.path),
        cascade_options,
        cascade.path,
        tracking_uri=mlflow_tracking_uri,
        run_id=mlflow_run_id,
    )
    cascade.metadata.update({"status": record.status, "verdict": record.verdict})
    if record.fitted:
        cascade.metadata["students"] = [s.label for s in record.stages]
        cascade.metadata["thresholds"] = record.thresholds
        for key in ("test_top1", "test_cost_ms", "reference_top1", "reference_cost_ms"):
            metrics.log_metric(f"cascade-{key}", float(getattr(record, key)))
    return record.fitted
