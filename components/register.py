"""register: one MLflow model version per student (idempotent per training run)."""

from kfp.dsl import Artifact, Input, Model, Output


def register(
    model: Input[Model],
    evaluations: Input[list[Artifact]],
    baselines: Input[list[Model]],
    mlflow_tracking_uri: str,
    mlflow_run_id: str,
    model_prefix: str,
    registrations: Output[Artifact],
) -> None:
    """Versions tagged with params, size %, top-1, baseline top-1 and gain; a re-run creates nothing."""
    from bockd.pipeline.records import BaselineRecord, EvaluationRecord, Registrations, read_records
    from bockd.pipeline.steps import register as run

    records = run(
        model.path,
        read_records(EvaluationRecord, [e.path for e in evaluations]),
        read_records(BaselineRecord, [b.path for b in baselines]),
        tracking_uri=mlflow_tracking_uri,
        run_id=mlflow_run_id,
        prefix=model_prefix,
    )
    Registrations(registrations=records).write(registrations.path)
    registrations.metadata["versions"] = {r.registered_model: r.version for r in records}
