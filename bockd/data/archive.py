"""Safe extraction of .tar, .tar.gz/.tgz and .zip archives.

Every member is checked before anything is written: absolute names, `..` escapes, links leading outside the
destination and device files are refused. Extraction goes to a temp folder next to `dest` that is renamed into
place, so a refused or corrupt archive leaves nothing behind.
"""

from __future__ import annotations

import gzip
import lzma
import os
import posixpath
import shutil
import tarfile
import zipfile
import zlib
from pathlib import Path

from bockd.atomic import atomic_dir
from bockd.data._util import existing_path
from bockd.errors import DataError

# Errors that mean "the archive bytes are bad" (as opposed to, say, a full disk).
CORRUPT_ARCHIVE_ERRORS = (
    tarfile.TarError,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    lzma.LZMAError,
    zipfile.BadZipFile,
)
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def safe_extract(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Extract `archive` into the folder `dest` (replacing it if present) and return `dest`."""
    archive = existing_path(archive, "archive")
    dest = Path(dest)
    name = archive.name.lower()
    if name.endswith(".zip"):
        extract = _extract_zip
    elif name.endswith(_TAR_SUFFIXES):
        extract = _extract_tar
    else:
        raise DataError(f"archive {str(archive)!r}: unsupported type (expected .tar, .tar.gz, .tgz or .zip)")
    try:
        with atomic_dir(dest, DataError) as tmp:
            extract(archive, tmp)
    except DataError:
        raise
    except CORRUPT_ARCHIVE_ERRORS as e:
        raise DataError(f"archive {str(archive)!r} is corrupt or truncated: {e}") from e
    return dest


def check_member_name(archive: Path, name: str) -> str:
    """Return the normalized member name, or raise if it is absolute or escapes the destination."""
    if name.startswith(("/", "\\")) or posixpath.isabs(name) or (len(name) > 1 and name[1] == ":"):
        raise DataError(f"archive {str(archive)!r}: member {name!r} has an absolute path")
    norm = posixpath.normpath(name.replace("\\", "/"))
    if norm == ".." or norm.startswith("../"):
        raise DataError(f"archive {str(archive)!r}: member {name!r} escapes the destination folder")
    return norm


def _extract_tar(archive: Path, tmp: Path) -> None:
    with tarfile.open(archive, "r:*") as tf:
        members = tf.getmembers()  # reads the whole stream: truncation surfaces here, before any write
        for m in members:
            _check_tar_member(archive, m)
        if hasattr(tarfile, "data_filter"):
            # Second line of defence: the stdlib "data" filter re-checks links and drops odd mode bits.
            try:
                tf.extractall(tmp, members=members, filter="data")
            except tarfile.FilterError as e:
                raise DataError(f"archive {str(archive)!r}: member {e.tarinfo.name!r} refused: {e}") from e
        else:  # pragma: no cover - Python < 3.11.4
            tf.extractall(tmp, members=members)


def _check_tar_member(archive: Path, m: tarfile.TarInfo) -> None:
    norm = check_member_name(archive, m.name)
    if m.isfile() or m.isdir():
        return
    if m.issym():
        target = m.linkname
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(norm), target))
        if posixpath.isabs(target) or resolved == ".." or resolved.startswith("../"):
            raise DataError(
                f"archive {str(archive)!r}: member {m.name!r} is a symlink to {target!r}, "
                "outside the destination"
            )
        return
    if m.islnk():
        target = posixpath.normpath(m.linkname)
        if posixpath.isabs(m.linkname) or target == ".." or target.startswith("../"):
            raise DataError(
                f"archive {str(archive)!r}: member {m.name!r} is a hard link to {m.linkname!r}, "
                "outside the destination"
            )
        return
    kind = "device file" if (m.ischr() or m.isblk()) else "FIFO" if m.isfifo() else "special member"
    raise DataError(
        f"archive {str(archive)!r}: member {m.name!r} is a {kind}; only files and folders are allowed"
    )


def _extract_zip(archive: Path, tmp: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        names = [check_member_name(archive, info.filename) for info in infos]
        for info, norm in zip(infos, names, strict=True):
            mode = (info.external_attr >> 16) & 0o170000
            if mode and mode not in (0o100000, 0o040000):  # zip can carry unix symlinks/devices in the mode
                raise DataError(
                    f"archive {str(archive)!r}: member {info.filename!r} is not a regular file or folder"
                )
            target = tmp / norm
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:  # CRC is checked while reading
                shutil.copyfileobj(src, dst)
