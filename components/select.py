"""select: the selection policy over the evaluated students (fp32 and int8); chosen ones move @champion if
they beat it."""

from typing import Any

from kfp.dsl import Artifact, Input, Model, Output


def select(
    evaluations: Input[list[Artifact]],
    baselines: Input[list[Model]],
    quantized: Input[list[Model]],
    measurements: Input[Artifact],
    registrations: Input[Artifact],
    selection_policy: dict[str, Any],
    mlflow_tracking_uri: str,
    mlflow_run_id: str,
    selection: Output[Artifact],
) -> list[int]:
    """Writes the choices with a reason for each; returns the chosen student numbers (1-based)."""
    from bockd.pipeline.records import (
        BaselineRecord,
        EvaluationRecord,
        MeasurementsRecord,
        QuantizationRecord,
        Registrations,
        read_records,
    )
    from bockd.pipeline.steps import select_students

    record = select_students(
        read_records(EvaluationRecord, [e.path for e in evaluations]),
        read_records(BaselineRecord, [b.path for b in baselines]),
        Registrations.read(registrations.path).registrations,
        selection_policy,
        quantizations=read_records(QuantizationRecord, [q.path for q in quantized]),
        measurements=MeasurementsRecord.read(measurements.path),
        tracking_uri=mlflow_tracking_uri,
        run_id=mlflow_run_id,
    )
    record.write(selection.path)
    selection.metadata["chosen"] = record.chosen
    selection.metadata["precision"] = {f"S{p.student}": p.precision for p in record.picks}
    print(record.markdown)
    return record.chosen
