"""measure: every student, fp32 and int8, through the real model server on the machine this step runs on."""

from typing import Any

from kfp.dsl import Artifact, Dataset, Input, Model, Output


def measure(
    dataset: Input[Dataset],
    model: Input[Model],
    quantized: Input[list[Model]],
    measurement: dict[str, Any],
    mlflow_tracking_uri: str,
    mlflow_run_id: str,
    measurements: Output[Artifact],
) -> None:
    """Served p50/p99 latency and throughput at each batch size, raw forward and size on disk of every
    student and int8 version, one at a time; each int8 version's verdict (faster or it does not ship).
    Also logged to the MLflow run."""
    from bockd.pipeline.steps import measure as run

    record = run(
        dataset.path,
        model.path,
        [q.path for q in quantized],
        measurement,
        measurements.path,
        tracking_uri=mlflow_tracking_uri,
        run_id=mlflow_run_id,
    )
    measurements.metadata["int8"] = {v.label: v.summary for v in record.int8}
    if record.machine is not None:
        measurements.metadata["cpu"] = record.machine.cpu
