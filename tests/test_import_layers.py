"""The layer rule holds, and `lint-imports` (its CI check, ``make imports``) fails when it is broken.

import-linter reads the package from the filesystem; the check runs on a copy of bockd laid out as it is
installed (``pipeline/`` as ``bockd/pipeline``, ``components/`` as ``bockd/components``), as the Makefile
does. Each violation below is planted in such a copy, never in the checkout.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _view(root: Path) -> Path:
    """A copy of bockd as installed, under ``root``."""
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "bockd", root / "bockd", ignore=skip)
    shutil.copytree(REPO / "pipeline", root / "bockd" / "pipeline", ignore=skip)
    shutil.copytree(REPO / "components", root / "bockd" / "components", ignore=skip)
    return root


def _lint(view: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(REPO / "pyproject.toml")],
        cwd=view,  # not the checkout: lint-imports puts the working folder first on sys.path
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _plant(view: Path, module: str, line: str) -> None:
    path = view / "bockd" / module
    path.write_text(path.read_text() + f"\n{line}\n")


def test_the_layers_hold(tmp_path: Path) -> None:
    result = _lint(_view(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 3 kept, 0 broken." in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # the model server reaching up into the platform layer
        (
            "serving/client.py",
            "from bockd.platform import s3",
            "bockd.serving is not allowed to import bockd.platform",
        ),
        # the method core reaching up into the pipeline
        (
            "evaluate.py",
            "from bockd.pipeline import steps",
            "bockd.evaluate is not allowed to import bockd.pipeline",
        ),
        # the model server loading PyTorch (or a training module) at import time
        ("serving/preprocess.py", "import torch", "bockd.serving is not allowed to import torch"),
        (
            "serving/server.py",
            "from bockd import engine",
            "bockd.serving is not allowed to import bockd.engine",
        ),
        # one platform part importing another
        (
            "platform/trainjob/spec.py",
            "from bockd.platform.inference_service import spec",
            "bockd.platform.trainjob is not allowed to import bockd.platform.inference_service",
        ),
    ],
)
def test_a_planted_violation_breaks_the_check(tmp_path: Path, module: str, line: str, broken: str) -> None:
    view = _view(tmp_path)
    _plant(view, module, line)
    result = _lint(view)
    assert result.returncode != 0
    assert broken in " ".join(result.stdout.split()), result.stdout  # its report wraps long lines
