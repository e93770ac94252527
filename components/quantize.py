"""quantize: the int8 version of one evaluated student, scored against it; registered later if it passed."""

from typing import Any

from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output


def quantize(
    student: int,
    dataset: Input[Dataset],
    model: Input[Model],
    evaluation: Input[Artifact],
    quantization: dict[str, Any],
    quantized: Output[Model],
    metrics: Output[Metrics],
) -> bool:
    """ONNX Runtime static quantization of S<student> (int8 folder + record in ``quantized``); returns
    whether it passed the accuracy-drop limit (False when quantization is off)."""
    from bockd.pipeline.records import EvaluationRecord
    from bockd.pipeline.steps import quantize as run

    scored = EvaluationRecord.read(evaluation.path)
    record = run(dataset.path, model.path, scored, quantization, quantized.path)
    if record.enabled:
        for key in ("int8_top1", "drop", "int8_bytes"):
            metrics.log_metric(f"s{student}-{key}", float(getattr(record, key)))
    quantized.metadata.update({"student": student, "enabled": record.enabled, "passed": record.passed})
    return record.passed
