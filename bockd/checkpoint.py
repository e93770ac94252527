"""Atomic files: training checkpoints (no pickle on load) and small JSON/safetensors writers.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over
the old one, so a process killed at any instant leaves either the previous checkpoint or the new one,
never half of one. Loading uses ``torch.load(weights_only=True)``: tensors and plain containers only.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from bockd.errors import CheckpointError


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` then move ``tmp`` onto ``path`` in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates 0600; outputs are read by other users (a non-root serving container).
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, data: Any) -> None:
    atomic_write(Path(path), lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n"))


def write_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    # safetensors refuses shared or non-contiguous storage: give each tensor its own copy.
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(Path(path), lambda tmp: save_file(plain, str(tmp), metadata=metadata))


def rng_state() -> dict[str, torch.Tensor]:
    """Global torch RNG states. Data order and augmentation use their own generators seeded by
    (seed, epoch), so these only matter for ops that draw from the global generator."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # a corrupt file must name itself, whatever torch raised
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {err}") from err
