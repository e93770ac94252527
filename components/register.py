"""register: one MLflow model version per student, its int8 version beside it when it passed, and the
fitted cascade as a model of its own (idempotent per training run)."""

from kfp.dsl import Artifact, Input, Model, Output


def register(
    model: Input[Model],
    evaluations: Input[list[Artifact]],
    baselines: Input[list[Model]],
    quantized: Input[list[Model]],
    measurements: Input[Artifact],
    cascade: Input[Model],
    mlflow_tracking_uri: str,
    mlflow_run_id: str,
    model_prefix: str,
    registrations: Output[Artifact],
) -> None:
    """Versions tagged with params, size %, top-1, baseline top-1, gain, precision and served latency, and
    the fitted cascade as a registered model of its own (kind=cascade); a re-run creates nothing."""
    from bockd.pipeline.records import (
        BaselineRecord,
        EvaluationRecord,
        MeasurementsRecord,
        Registrations,
        read_records,
    )
    from bockd.pipeline.steps import register as run
    from bockd.pipeline.steps import register_cascade

    records = run(
        model.path,
        read_records(EvaluationRecord, [e.path for e in evaluations]),
        read_records(BaselineRecord, [b.path for b in baselines]),
        tracking_uri=mlflow_tracking_uri,
        run_id=mlflow_run_id,
        prefix=model_prefix,
        quantized_dirs=[q.path for q in quantized],
        measurements=MeasurementsRecord.read(measurements.path),
    )
    fitted = register_cascade(
        cascade.path, tracking_uri=mlflow_tracking_uri, run_id=mlflow_run_id, prefix=model_prefix
    )
    Registrations(registrations=records, cascade=fitted).write(registrations.path)
    registrations.metadata["versions"] = {f"{r.registered_model} {r.precision}": r.version for r in records}
    if fitted is not None:
        registrations.metadata["versions"][fitted.registered_model] = fitted.version
