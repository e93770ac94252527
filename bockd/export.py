"""Export one trained student as a self-contained folder, and load it back without pickle.

An exported student is ``model.safetensors`` (weights), ``config.json`` (everything needed to rebuild
and feed it: architecture, widths, classes, mean/std, input shape) and ``model.onnx`` (the same network
for ONNX Runtime, batch dimension dynamic).

The folder's file names and config card format live in ``bockd.export_format`` (no torch), shared with
the model server; they are re-exported here.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from bockd.atomic import atomic_dir, write_json
from bockd.checkpoint import write_safetensors
from bockd.engine import MODEL_CONFIG, RUN_FORMAT, WEIGHTS
from bockd.errors import CheckpointError
from bockd.export_format import (
    CONFIG_FILE,
    ONNX_FILE,
    STUDENT_FORMAT,
    WEIGHTS_FILE,
    is_replaceable_student_folder,
    read_student_config,
    read_versioned_json,
)
from bockd.models import Student, build_student, create_model, student_table


def read_run_card(run_dir: str | Path) -> dict[str, Any]:
    return read_versioned_json(Path(run_dir) / MODEL_CONFIG, RUN_FORMAT, "a finished training run folder")


def _load_weights(model: torch.nn.Module, weights: Path, what: str, device: str = "cpu") -> None:
    """Load safetensors ``weights`` into ``model`` (strict); any failure is a CheckpointError naming it."""
    try:
        state = load_file(str(weights), device=device)
    except Exception as err:  # missing, truncated or not safetensors at all: whatever safetensors raised
        raise CheckpointError(f"{weights} cannot be read: {err}") from err
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{weights} does not match {what}: {err}") from err


def student_from_run(run_dir: str | Path, index: int | None = None) -> tuple[Student, dict[str, Any]]:
    """The student ``index`` (0-based) of an ensemble run, or the one student of a baseline run."""
    run_dir = Path(run_dir)
    card = read_run_card(run_dir)
    spec = card["ensemble"]
    n = spec["num_students"]
    weights = run_dir / WEIGHTS
    if card["mode"] == "baseline":
        if index not in (None, card["student"]):
            raise CheckpointError(
                f"student: {run_dir} is the baseline of S{card['student'] + 1} only, "
                f"not {_student_label(index)}"
            )
        index = card["student"]
        student = build_student(
            spec["arch"],
            num_classes=spec["num_classes"],
            in_channels=spec["in_channels"],
            num_students=n,
            index=index,
        )
        _load_weights(student, weights, f"the baseline S{index + 1} of {run_dir}")
    else:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
            raise CheckpointError(
                f"student: {run_dir} is a {n}-student ensemble: expected one of S1..S{n} "
                f"(0-based index 0..{n - 1}), got {_student_label(index)}"
            )
        ensemble = create_model(**spec)
        _load_weights(ensemble, weights, f"the {n}-student ensemble of {run_dir}")
        student = ensemble.extract_student(index)
    return student.eval(), card


def _student_label(index: Any) -> str:
    if isinstance(index, int) and not isinstance(index, bool):
        return f"S{index + 1} (index {index})"
    return "no student" if index is None else repr(index)


def export_student(
    run_dir: str | Path, out_dir: str | Path, index: int | None = None, onnx: bool = True
) -> Path:
    """Write the student as a folder (safetensors + config.json + ONNX). Replaces ``out_dir`` atomically."""
    student, card = student_from_run(run_dir, index)
    spec = student.spec
    k = spec["index"]
    table = student_table(
        spec["arch"],
        num_classes=spec["num_classes"],
        in_channels=spec["in_channels"],
        num_students=spec["num_students"],
    )[k]
    inp = card["input"]
    config = {
        "format": STUDENT_FORMAT,
        "name": f"{spec['arch']}-s{k + 1}",
        "arch": spec["arch"],
        "num_students": spec["num_students"],
        "index": k,
        "student": f"S{k + 1}",
        "width_multiplier": table["width_multiplier"],
        "params": table["params"],
        "size_pct": table["size_pct"],
        "num_classes": spec["num_classes"],
        "classes": card["classes"],
        "in_channels": spec["in_channels"],
        "input_shape": [inp["channels"], inp["height"], inp["width"]],
        "mean": inp["mean"],
        "std": inp["std"],
        "trained_as": card["mode"],
        "dataset": card["dataset"],
    }
    out_dir = Path(out_dir)
    # The old folder is deleted whole before the new one moves in: never let that be the run itself,
    # a folder holding it, or any folder that is not an earlier export (``--out .`` must not wipe cwd).
    if out_dir.exists() and not is_replaceable_student_folder(out_dir):
        raise CheckpointError(
            f"out: {out_dir} exists and is not an exported student folder; refusing to replace it "
            "(choose a new or empty folder)"
        )
    with atomic_dir(out_dir, CheckpointError) as tmp:  # readable by others: a serving container reads it
        write_safetensors(tmp / WEIGHTS_FILE, student.state_dict(), metadata={"format": "pt"})
        write_json(tmp / CONFIG_FILE, config)
        if onnx:
            export_onnx(student, tmp / ONNX_FILE, config["input_shape"])
    return out_dir


def export_onnx(student: Student, path: Path, input_shape: list[int]) -> None:
    """ONNX with a dynamic batch dimension: input ``input`` float NCHW (normalized), output ``logits``."""
    example = torch.zeros(2, *input_shape)
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter prints its progress to stdout; keep it out of our output.
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(
            student.eval(),
            (example,),
            str(path),
            dynamo=True,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            external_data=False,
        )
    _strip_exporter_metadata(path)


def _strip_exporter_metadata(path: Path) -> None:
    """Drop the exporter's per-node debug metadata (stack traces with this machine's absolute paths, FX
    node text: about a third of a small model's bytes): a served artifact names no build machine."""
    import onnx

    model = onnx.load(str(path))
    for graph in [model.graph, *(a.g for n in model.graph.node for a in n.attribute if a.HasField("g"))]:
        for item in [*graph.node, *graph.value_info, *graph.input, *graph.output, *graph.initializer]:
            del item.metadata_props[:]
            item.doc_string = ""
    onnx.save(model, str(path))


def load_student(folder: str | Path, device: str | torch.device = "cpu") -> Student:
    """Rebuild an exported student from its config and safetensors weights (no pickle), in eval mode."""
    config = read_student_config(folder)
    missing = [k for k in ("arch", "num_classes", "in_channels", "num_students", "index") if k not in config]
    if missing:
        raise CheckpointError(f"{Path(folder) / CONFIG_FILE}: lacks the field(s) {missing}")
    if config.get("precision", "fp32") != "fp32":  # bockd.quantize: an ONNX model only, no weights file
        raise CheckpointError(
            f"{folder}: a {config['precision']} student holds only {ONNX_FILE} (no {WEIGHTS_FILE}); "
            "serve it with --backend onnx"
        )
    student = build_student(
        config["arch"],
        num_classes=config["num_classes"],
        in_channels=config["in_channels"],
        num_students=config["num_students"],
        index=config["index"],
    )
    name = config.get("name", f"{config['arch']}-s{config['index'] + 1}")
    _load_weights(student, Path(folder) / WEIGHTS_FILE, name, device=str(device))
    return student.to(device).eval()
