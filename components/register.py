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
    import json

    from bockd.steps import BASELINE_FILE, EVALUATION_FILE, read_records
    from bockd.steps import register as run

    records = run(
        model.path,
        read_records([e.path for e in evaluations], EVALUATION_FILE),
        read_records([b.path for b in baselines], BASELINE_FILE),
        tracking_uri=mlflow_tracking_uri,
        run_id=mlflow_run_id,
        prefix=model_prefix,
    )
    with open(registrations.path, "w") as f:
        json.dump(records, f, indent=2)
    registrations.metadata["versions"] = {r["name"]: r["version"] for r in records}
