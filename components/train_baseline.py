"""train_baseline: one student alone, cross-entropy only, same schedule (what makes the gain real)."""

from typing import Any

from kfp.dsl import Dataset, Input, Metrics, Model, Output


def train_baseline(
    train_config: dict[str, Any],
    student: int,
    dataset: Input[Dataset],
    checkpoint_uri: str,
    pipeline_run_id: str,
    model: Output[Model],
    metrics: Output[Metrics],
) -> float:
    """Trains, exports and evaluates baseline S<student>; returns its test top-1 (%)."""
    from bockd.pipeline.steps import checkpoint_prefix
    from bockd.pipeline.steps import train_baseline as run

    ckpt = checkpoint_prefix(checkpoint_uri, pipeline_run_id, f"baseline-s{student}")
    record = run(train_config, dataset.path, student, model.path, checkpoint_uri=ckpt)
    metrics.log_metric(f"baseline-s{student}-top1", record.top1)
    metrics.log_metric(f"baseline-s{student}-top5", record.top5)
    model.metadata.update(record.model_dump(mode="json", exclude={"format"}))
    return record.top1
