"""select: the selection policy over the evaluated students; chosen ones move @champion if they beat it."""

from typing import Any

from kfp.dsl import Artifact, Input, Model, Output


def select(
    evaluations: Input[list[Artifact]],
    baselines: Input[list[Model]],
    registrations: Input[Artifact],
    selection_policy: dict[str, Any],
    mlflow_tracking_uri: str,
    mlflow_run_id: str,
    selection: Output[Artifact],
) -> list[int]:
    """Writes the choices with a reason for each; returns the chosen student numbers (1-based)."""
    import json

    from bockd.steps import BASELINE_FILE, EVALUATION_FILE, read_records, select_students

    with open(registrations.path) as f:
        registered = json.load(f)
    record = select_students(
        read_records([e.path for e in evaluations], EVALUATION_FILE),
        read_records([b.path for b in baselines], BASELINE_FILE),
        registered,
        selection_policy,
        tracking_uri=mlflow_tracking_uri,
        run_id=mlflow_run_id,
    )
    with open(selection.path, "w") as f:
        json.dump(record, f, indent=2)
    selection.metadata["chosen"] = record["chosen"]
    print(record["markdown"])
    return record["chosen"]
