"""The Dockerfiles, the serving image's pinned requirements and images/build.sh, checked statically.

Building and running the images takes root, buildah and about half an hour (``make images``); these tests
pin what that relies on: a pinned public base that a build argument can replace, non-root users, a
serving image whose requirements cover what the server imports (no torch), agree with pyproject.toml and
leave nothing to float, and a build context that holds what the Dockerfiles copy.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "images"
SERVING_REQUIREMENTS = IMAGES / "serving" / "requirements.txt"
# Every module the model server can import (tests/test_serving_isolation.py proves it imports no other).
SERVING_SOURCES = [
    "bockd/errors.py",
    "bockd/export_format.py",
    *(f"bockd/serving/{name}.py" for name in ("__init__", "__main__", "model", "preprocess", "server")),
    "bockd/serving/client.py",
    "bockd/serving/errors.py",
]
NOT_IN_SERVING = {"torch", "torchvision", "onnx", "onnxscript", "safetensors", "kfp", "mlflow"}


def dockerfile(image: str) -> str:
    return (IMAGES / image / "Dockerfile").read_text()


def pinned() -> dict[str, Requirement]:
    lines = (ln.split("#", 1)[0].strip() for ln in SERVING_REQUIREMENTS.read_text().splitlines())
    pins = [Requirement(ln) for ln in lines if ln]
    names = [canonicalize_name(pin.name) for pin in pins]
    assert len(names) == len(set(names)), "a package is pinned twice"
    return dict(zip(names, pins, strict=True))


def lock_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("serving_lock", IMAGES / "serving" / "lock.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("image", ["trainer", "serving"])
def test_dockerfile_base_is_a_pinned_public_image_a_build_arg_replaces(image: str) -> None:
    text = dockerfile(image)
    (default,) = re.findall(r"^ARG BASE_IMAGE=(\S+)$", text, flags=re.M)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", default), default
    assert re.findall(r"^FROM (\S+)", text, flags=re.M) == ["${BASE_IMAGE}"]
    assert ":latest" not in text
    assert re.search(r"^USER 1000$", text, flags=re.M)
    assert "PYTHONUNBUFFERED=1" in text
    # The same virtualenv layout on every base; python3 on PATH is the one bockd is installed into.
    assert "python3 -m venv /opt/bockd" in text and re.search(r"PATH=/opt/bockd/bin:", text)


def test_trainer_installs_bockd_with_the_pipeline_and_serving_extras() -> None:
    assert '"/tmp/bockd-src[pipeline,serving]"' in dockerfile("trainer")


def test_serving_dockerfile_installs_the_requirements_and_bockd_without_its_dependencies() -> None:
    text = dockerfile("serving")
    assert "COPY images/serving/requirements.txt" in text
    assert "pip install --no-cache-dir --no-compile --no-deps /tmp/bockd-src" in text
    assert "find_spec('torch') is None" in text  # the build fails if torch got in anyway
    assert re.search(r"^EXPOSE 8080$", text, flags=re.M)
    entrypoint = next(ln for ln in text.splitlines() if ln.startswith("ENTRYPOINT"))
    assert '"bockd.serving"' in entrypoint and "--backend" not in entrypoint  # the server's default: onnx


def test_serving_requirements_are_exact_pins_within_pyproject_ranges() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {
        canonicalize_name(Requirement(dep).name): Requirement(dep)
        for dep in [*project["dependencies"], *project["optional-dependencies"]["serving"]]
    }
    pins = pinned()
    for name, pin in pins.items():
        (spec,) = pin.specifier
        assert spec.operator == "==", f"{pin}: pin an exact version"
        if name in declared:
            assert declared[name].specifier.contains(spec.version), f"{pin} is outside pyproject's range"
    assert not set(pins) & NOT_IN_SERVING, set(pins) & NOT_IN_SERVING
    for direct in lock_script().DIRECT:
        assert canonicalize_name(direct) in declared, f"{direct}: a server dependency that bockd lacks"


def test_serving_requirements_pin_every_package_the_direct_ones_pull_in() -> None:
    """A complete lock: no dependency of kserve, onnxruntime, ... floats to a new release between builds."""
    lock = lock_script()
    needed = set(lock.closure(list(lock.DIRECT)))  # from this environment's installed metadata
    missing = needed - set(pinned())
    assert not missing, f"not pinned: {sorted(missing)}; run images/serving/lock.py (see its docstring)"


def third_party_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return {n for n in names if n != "bockd" and n not in sys.stdlib_module_names}


def test_serving_requirements_cover_every_import_of_the_model_server() -> None:
    pins = set(pinned())
    dists = md.packages_distributions()
    imports = set().union(*(third_party_imports(REPO / src) for src in SERVING_SOURCES))
    imports.discard("torch")  # imported lazily by the torch backend only, which the image does not offer
    assert {"kserve", "numpy", "PIL"} <= imports
    for module in sorted(imports):
        owners = {canonicalize_name(d) for d in dists.get(module, [])}
        assert owners & pins, f"{module} ({owners}) is imported by the server but not in the requirements"


def test_build_context_holds_what_the_dockerfiles_copy() -> None:
    ignored = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    assert {".venv", ".bockd", ".build", "runs", "**/.git"} <= set(ignored)
    assert not {"bockd", "components", "pipeline", "pyproject.toml", "README.md"} & set(ignored)
    assert "!images/serving/requirements.txt" in ignored  # images/ is ignored, this one file is not
    for image in ("trainer", "serving"):
        for src in re.findall(r"^COPY (.+) \S+$", dockerfile(image), flags=re.M):
            for path in src.split():
                assert (REPO / path).exists(), f"{image}: COPY {path}: no such file"


def test_build_script_is_strict_bash_and_make_images_runs_it() -> None:
    script = IMAGES / "build.sh"
    assert os.access(script, os.X_OK)
    assert "set -euo pipefail" in script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert re.search(r"^images:\n\timages/build\.sh all$", (REPO / "Makefile").read_text(), flags=re.M)
