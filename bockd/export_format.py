"""The on-disk format of an exported student folder, readable without PyTorch.

``bockd.export`` writes the folder (it needs torch); the model server reads it (``bockd.serving``, which
must run on ONNX Runtime alone). Both take the file names and the config card's format from here, so this
module imports nothing but the standard library and ``bockd.errors``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bockd.errors import CheckpointError

STUDENT_FORMAT = "bockd-student/1"  # config.json's "format"
CONFIG_FILE = "config.json"  # everything needed to rebuild and feed the student
WEIGHTS_FILE = "model.safetensors"  # the student's weights (the torch backend)
ONNX_FILE = "model.onnx"  # the same network for ONNX Runtime, batch dimension dynamic


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; anything else is a CheckpointError naming the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} cannot be read as JSON: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_versioned_json(path: Path, fmt: str, what: str) -> dict[str, Any]:
    """A JSON card whose ``format`` must be ``fmt``; ``what`` says which folder was expected."""
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no {path.name}; expected {what}")
    data = read_json(path)
    if data.get("format") != fmt:
        raise CheckpointError(f"{path}: format {data.get('format')!r} is not {fmt!r}")
    return data


def read_student_config(folder: str | Path) -> dict[str, Any]:
    """The config card of an exported student folder (format checked, fields not)."""
    return read_versioned_json(Path(folder) / CONFIG_FILE, STUDENT_FORMAT, "an exported student folder")


def is_replaceable_student_folder(folder: Path) -> bool:
    """Whether ``folder`` may be deleted to make way for a student folder being written (an export, an int8
    version): only an empty folder or an earlier student folder, never anything else (``--out .`` must not
    wipe the working directory)."""
    if not folder.is_dir():
        return False
    if not any(folder.iterdir()):
        return True
    try:
        read_student_config(folder)
    except CheckpointError:
        return False
    return True
