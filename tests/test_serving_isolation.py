"""The model server runs on ONNX Runtime alone: no PyTorch, no training module (the serving image has none).

A subprocess makes ``import torch`` / ``import torchvision`` fail (a meta-path finder that raises
ImportError), then runs the serving entrypoint exactly as the container does (``python -m bockd.serving``)
on an exported student, with the server's start replaced by one in-process V1 prediction. It reports the
bockd modules it imported and its answer; the answer must equal the PyTorch student's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from numerics import probability_tolerance, reduction_length

import bockd
from bockd.data import ImageDataset
from bockd.export import export_student, load_student

# What the serving entrypoint may import of bockd; everything else (engine, models, export, data, losses,
# checkpoint, config, ...) is training and needs torch.
SERVING_MODULES = {
    "bockd",
    "bockd.errors",
    "bockd.export_format",
    "bockd.imaging",  # one 8-bit decoding rule for training data and requests
    "bockd.onnx_student",  # one ONNX Runtime session setup and softmax (numpy + onnxruntime)
    "bockd.serving",
    "bockd.serving.__main__",
    "bockd.serving.model",
    "bockd.serving.preprocess",
    "bockd.serving.rest",
    "bockd.serving.server",
}
TRAINING_MODULES = {"bockd.engine", "bockd.models", "bockd.export", "bockd.data", "bockd.checkpoint"}

_BLOCK_TORCH = """
import sys

BLOCKED = []


class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "torchvision"):
            BLOCKED.append(name)
            raise ImportError(f"{name} is blocked: the model server must run without PyTorch")
        return None


sys.meta_path.insert(0, BlockTorch())
"""

_SERVE_ONE_REQUEST = """
import json
import runpy

folder, images = sys.argv[1], json.loads(sys.argv[2])
sys.argv = ["bockd.serving", "--model_dir", folder, "--model_name", "s2", "--http_port", "0"]

from bockd.errors import ConfigError
from bockd.serving import server
from bockd.serving.model import build_model


def start(self, models):  # instead of serving: answer one V1 request in process, report, return
    (model,) = models
    answer = model.postprocess(model.predict(model.preprocess({"instances": images})))
    try:
        build_model("t", [folder], backend="torch").load()
        torch_backend = "loaded"
    except ConfigError as err:
        torch_backend = str(err)
    modules = sorted(m for m in sys.modules if m == "bockd" or m.startswith("bockd."))
    torch_loaded = sorted(m for m in sys.modules if m.partition(".")[0] in ("torch", "torchvision"))
    report = {"modules": modules, "torch_loaded": torch_loaded, "blocked": BLOCKED}
    report |= {"backend": model.backend, "answer": answer, "torch_backend": torch_backend}
    print("REPORT " + json.dumps(report))


server.HostModelServer.start = start
runpy.run_module("bockd.serving", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def exported(single_thread, ensemble_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_student(ensemble_run, tmp_path_factory.mktemp("isolation") / "s2", index=1)


def serve_without_torch(folder: Path, images: np.ndarray) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(bockd.__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", _BLOCK_TORCH + _SERVE_ONE_REQUEST, str(folder), json.dumps(images.tolist())],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("REPORT ")]
    assert out.returncode == 0 and lines, f"exit {out.returncode}\n{out.stdout}\n{out.stderr}"
    return json.loads(lines[-1].removeprefix("REPORT "))


def test_serving_entrypoint_runs_on_onnx_runtime_without_torch(exported: Path, digits: ImageDataset) -> None:
    images = np.ascontiguousarray(digits.test.x[:4])
    report = serve_without_torch(exported, images)

    assert report["backend"] == "onnx"  # the server's default: what the serving image can run
    assert report["torch_loaded"] == []
    modules = set(report["modules"])
    assert not modules & TRAINING_MODULES, f"the model server imported training: {modules & TRAINING_MODULES}"
    assert modules <= SERVING_MODULES, f"unexpected bockd modules: {sorted(modules - SERVING_MODULES)}"
    assert "bockd.serving.model" in modules and "bockd.export_format" in modules
    # The torch backend says what to do instead of a bare ImportError.
    assert "backend torch needs PyTorch" in report["torch_backend"]
    assert "--backend onnx" in report["torch_backend"]

    # The answer is the student's: the same probabilities as PyTorch on the same normalized input.
    config = json.loads((exported / "config.json").read_text())
    mean = np.asarray(config["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(config["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    x = (images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - mean) / std
    student = load_student(exported)
    with torch.no_grad():
        logits = student(torch.from_numpy(x))
    want = torch.softmax(logits, dim=1).numpy()
    got = np.asarray([row["probabilities"] for row in report["answer"]["predictions"]])
    # ONNX Runtime's kernels vs PyTorch's: equal up to float32 rounding at the logits' scale.
    np.testing.assert_allclose(got, want, atol=probability_tolerance(logits, reduction_length(student)))


def test_onnx_threads_follow_the_containers_cpu_limit(tmp_path: Path, monkeypatch) -> None:
    """ONNX Runtime sizes its pool by the node's cores; a pod limited to 2 CPUs must use 2 threads."""
    from bockd.serving import model

    cpu_max = tmp_path / "cpu.max"
    for text, want in (
        ("200000 100000\n", 2),
        ("150000 100000\n", 2),
        ("50000 100000\n", 1),
        ("max 100000", None),
    ):
        cpu_max.write_text(text)
        assert model.cpu_limit(cpu_max) == want
    assert model.cpu_limit(tmp_path / "absent") is None
    cpu_max.write_text("300000 100000\n")
    monkeypatch.setattr(model, "CGROUP_CPU_MAX", cpu_max)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # as in the serving image
    assert model.intra_op_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's setting wins
    assert model.intra_op_threads() == 1
