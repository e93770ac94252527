"""Export one trained student as a self-contained folder, and load it back without pickle.

An exported student is ``model.safetensors`` (weights), ``config.json`` (everything needed to rebuild
and feed it: architecture, widths, classes, mean/std, input shape) and ``model.onnx`` (the same network
for ONNX Runtime, batch dimension dynamic).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from bockd.checkpoint import write_json, write_safetensors
from bockd.engine import MODEL_CONFIG, WEIGHTS
from bockd.errors import CheckpointError
from bockd.models import Student, build_student, create_model, student_table

STUDENT_FORMAT = "bockd-student/1"
ONNX_FILE = "model.onnx"
CONFIG_FILE = "config.json"


def read_run_card(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / MODEL_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no {MODEL_CONFIG}; is this a finished training run folder?")
    return json.loads(path.read_text())


def student_from_run(run_dir: str | Path, index: int | None = None) -> tuple[Student, dict[str, Any]]:
    """The student ``index`` (0-based) of an ensemble run, or the one student of a baseline run."""
    run_dir = Path(run_dir)
    card = read_run_card(run_dir)
    spec = card["ensemble"]
    n = spec["num_students"]
    state = load_file(str(run_dir / WEIGHTS))
    if card["mode"] == "baseline":
        if index not in (None, card["student"]):
            raise CheckpointError(
                f"student: {run_dir} is the baseline of S{card['student'] + 1}, not S{index + 1}"
            )
        index = card["student"]
        student = build_student(
            spec["arch"],
            num_classes=spec["num_classes"],
            in_channels=spec["in_channels"],
            num_students=n,
            index=index,
        )
        student.load_state_dict(state)
    else:
        if index is None or not 0 <= index < n:
            raise CheckpointError(
                f"student: expected an index in 0..{n - 1} for this {n}-student ensemble, got {index}"
            )
        ensemble = create_model(**spec)
        ensemble.load_state_dict(state)
        student = ensemble.extract_student(index)
    return student.eval(), card


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
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write_safetensors(tmp / "model.safetensors", student.state_dict(), metadata={"format": "pt"})
        write_json(tmp / CONFIG_FILE, config)
        if onnx:
            export_onnx(student, tmp / ONNX_FILE, config["input_shape"])
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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


def read_student_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_FILE}; expected an exported student folder")
    config = json.loads(path.read_text())
    if config.get("format") != STUDENT_FORMAT:
        raise CheckpointError(f"{path}: format {config.get('format')!r} is not {STUDENT_FORMAT!r}")
    return config


def load_student(folder: str | Path, device: str | torch.device = "cpu") -> Student:
    """Rebuild an exported student from its config and safetensors weights (no pickle), in eval mode."""
    config = read_student_config(folder)
    student = build_student(
        config["arch"],
        num_classes=config["num_classes"],
        in_channels=config["in_channels"],
        num_students=config["num_students"],
        index=config["index"],
    )
    weights = Path(folder) / "model.safetensors"
    try:
        state = load_file(str(weights), device=str(device))
    except Exception as err:
        raise CheckpointError(f"{weights} cannot be read: {err}") from err
    try:
        student.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{weights} does not match {config['name']}: {err}") from err
    return student.to(device).eval()
