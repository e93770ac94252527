"""Small filesystem helpers shared by the data modules."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
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


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temp folder next to `dest`; on success it replaces `dest` by rename.

    The temp folder lives in dest's parent so the final rename stays on one filesystem (atomic). On any
    exception the temp folder is removed and `dest` is left exactly as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not dest.is_dir():
        raise DataError(f"output {str(dest)!r} exists and is not a folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(src: Path, dest: Path) -> None:
    if not dest.exists():
        os.replace(src, dest)
        return
    # rename() cannot replace a non-empty folder: move the old one aside first, then drop it.
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
    os.rmdir(old)
    os.replace(dest, old)
    try:
        os.replace(src, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def fsync_file(path: Path) -> None:
    """Flush a written file to disk so a crash after the final rename cannot expose an empty file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
