"""Write images/serving/requirements.txt: what the model server needs, pinned at the versions installed here.

The serving image installs bockd with --no-deps (its dependencies include torch) and these pins instead: the
server's direct dependencies and everything they pull in, each at the version of the environment this runs
in, which should be the project's tested virtualenv. So the image runs what the test suite ran, and no
dependency floats to a newer release between two builds.

Usage: .venv/bin/python images/serving/lock.py > images/serving/requirements.txt
"""

from __future__ import annotations

import importlib.metadata as md
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# What bockd.serving imports (tests/test_images.py checks that these cover it), and nothing of training.
DIRECT = ("kserve", "onnxruntime", "numpy", "pillow")

HEADER = """\
# The model server's dependencies (python -m bockd.serving, ONNX Runtime backend), no torch: the direct ones
# ({direct}) and all they pull in, pinned at the versions the test suite runs with.
# bockd itself is installed with --no-deps on top. Written by images/serving/lock.py; do not edit by hand.
"""


def closure(names: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Every distribution ``names`` need, transitively, with the extras they ask for: {name: version}."""
    found: dict[str, str] = {}
    todo = [Requirement(name) for name in names]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        extras = {""} | set(req.extras)
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in found:
            continue
        found[key] = md.version(name)
        for dep in md.requires(name) or []:
            parsed = Requirement(dep)
            if parsed.marker is None or any(parsed.marker.evaluate({"extra": e}) for e in extras):
                todo.append(parsed)
    return {key.partition("[")[0]: version for key, version in found.items()}


def render(pins: dict[str, str]) -> str:
    lines = [f"{name}=={pins[name]}" for name in sorted(pins)]
    return HEADER.format(direct=", ".join(DIRECT)) + "\n".join(lines) + "\n"


def main() -> int:
    sys.stdout.write(render(closure(list(DIRECT))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
