"""Small filesystem helpers shared by the data modules (atomic folders: `bockd.atomic`)."""

from __future__ import annotations

import os
from pathlib import Path

from bockd.errors import DataError


def existing_path(path: str | os.PathLike[str], what: str = "path") -> Path:
    """Return `path` as a Path, or raise DataError naming it when it does not exist."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{what} {str(p)!r} does not exist")
    return p


def cache_dir() -> Path:
    """Download cache: $BOCKD_CACHE, else ~/.cache/bockd."""
    env = os.environ.get("BOCKD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bockd"
