"""Training checkpoints (no pickle on load) and safetensors weights, written atomically (`bockd.atomic`).

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over
the old one, so a process killed at any instant leaves either the previous checkpoint or the new one,
never half of one. Loading uses ``torch.load(weights_only=True)``: tensors and plain containers only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from bockd.atomic import atomic_write, current_umask, write_json
from bockd.errors import CheckpointError

__all__ = [
    "atomic_write",
    "current_umask",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "write_json",
    "write_safetensors",
]


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
