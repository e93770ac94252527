"""Files and folders that appear whole or not at all: the one implementation every writer of bockd uses.

A file is written to a temporary file in the same folder, flushed to disk, then renamed over the target, so
a process killed at any instant leaves the old content or the new one, never half of one. A folder is
filled under a temporary name beside it and renamed into place the same way. Standard library only (the
model server and the platform layer use it without PyTorch).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bockd.errors import BockdError

__all__ = ["atomic_dir", "atomic_write", "current_umask", "fsync_file", "write_json", "write_text"]


def current_umask() -> int:
    """The process's umask (read by setting it, then restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[Path], None], *, mode: int | None = None
) -> None:
    """Call ``write(tmp)`` with a fresh temporary file beside ``path``, flush it, move it onto ``path``.

    ``mode``: the file's permission bits; None gives ``0o666`` less the umask, as ``open`` would (other
    users, e.g. a non-root serving container, read the outputs). The temporary file is created ``0o600``
    with ``O_EXCL`` (``mkstemp``), so a private file (``mode=0o600``) is never readable by others, not even
    for an instant, and never one that someone else created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~current_umask() if mode is None else mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike[str], text: str, *, mode: int | None = None) -> None:
    """``text`` (UTF-8) into ``path``, atomically (see `atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), mode=mode)


def write_json(path: str | os.PathLike[str], data: Any, *, mode: int | None = None) -> None:
    """``data`` as indented JSON (keys in their order, a final newline) into ``path``, atomically."""
    write_text(path, json.dumps(data, indent=2) + "\n", mode=mode)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a written file to disk so a crash after the final rename cannot expose an empty file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike[str], error: type[BockdError] = BockdError) -> Iterator[Path]:
    """Yield an empty folder beside ``dest``; when the block succeeds it replaces ``dest`` by rename.

    The folder lives in dest's parent so the final rename stays on one filesystem; it gets ``0o777`` less
    the umask (``mkdtemp`` makes ``0o700``; other users read what bockd writes). On any exception it is
    removed and ``dest`` is left exactly as it was. ``error`` (raised when ``dest`` is a file) lets a
    caller keep its own error type.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not dest.is_dir():
        raise error(f"output {str(dest)!r} exists and is not a folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        tmp.chmod(0o777 & ~current_umask())
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
