"""evaluate: one exported student on the test split -> metrics, confusion matrix, evaluation record."""

from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output


def evaluate(
    student: int,
    dataset: Input[Dataset],
    model: Input[Model],
    device: str,
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
) -> float:
    """Top-1/top-5, params, size, FLOPs and latency of S<student>; returns its top-1 (%)."""
    from bockd.pipeline.steps import evaluate as run

    record = run(dataset.path, model.path, student, evaluation.path, device=device)
    for key in ("top1", "top5", "params", "size_pct", "flops"):
        metrics.log_metric(f"s{student}-{key}", getattr(record, key))
    confusion.log_confusion_matrix(record.classes, record.confusion)
    evaluation.metadata.update({"student": student, "student_name": record.student_name, "top1": record.top1})
    return record.top1
