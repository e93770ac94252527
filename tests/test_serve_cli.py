"""`bockd serve` / `bockd predict`: a real KServe model server started from each kind of model source."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image

from bockd.cli import main
from bockd.export import export_student
from bockd.platform.model_registry import register_student
from bockd.platform.s3 import upload_folder
from bockd.platform.services import ServicesInfo
from bockd.platform.services.health import http_ok
from bockd.platform.services.processes import free_ports


@pytest.fixture(scope="module")
def exported(ensemble_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_student(ensemble_run, tmp_path_factory.mktemp("exp") / "resnet20-s2", index=1)


@pytest.fixture()
def png(tmp_path: Path, digits: object) -> Path:
    image = digits.test.x[0]  # type: ignore[attr-defined]
    path = tmp_path / "digit.png"
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path


def _serve(model: str, name: str | None, tmp_path: Path) -> Iterator[tuple[str, str]]:
    port = free_ports(1)[0]
    argv = [sys.executable, "-m", "bockd", "serve", "--model", model, "--port", str(port)]
    argv += ["--cache-dir", str(tmp_path / "cache")]
    if name:
        argv += ["--name", name]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    served = name or ""
    try:
        for _ in range(300):
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read().decode() if proc.stdout else "server exited")
            if served and http_ok(f"{url}/v2/models/{served}/ready"):
                break
            if not served:
                line = proc.stdout.readline().decode() if proc.stdout else ""
                if line.startswith("serving "):
                    served = line.split()[1]
                continue
            time.sleep(0.1)
        yield url, served
    finally:
        proc.terminate()
        proc.wait(15)


def test_serve_a_folder_and_predict_a_png(
    exported: Path, png: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for url, name in _serve(str(exported), None, tmp_path):
        assert name == "resnet20-s2"  # the folder's name
        assert main(["predict", "--url", url, "--name", name, "--top", "2", str(png)]) == 0
        line = capsys.readouterr().out.strip()
        assert line.startswith(f"{png}: ")
        assert len(line.split(": ", 1)[1].split(", ")) == 2


def test_serve_from_s3_and_from_the_registry(
    mlflow_stack: ServicesInfo, exported: Path, png: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    upload_folder(exported, "s3://bockd/exported/s2")
    for url, name in _serve("s3://bockd/exported/s2", "from-s3", tmp_path):
        assert main(["predict", "--url", url, "--name", name, str(png)]) == 0
    from_s3 = capsys.readouterr().out

    client = MlflowClient(mlflow_stack.mlflow_uri)
    run_id = client.create_run(client.create_experiment("serve-cli")).info.run_id
    reg = register_student(client, run_id, exported, prefix="cli", dataset="digits")
    client.set_registered_model_alias(reg.name, "champion", reg.version)
    for url, name in _serve(f"models:/{reg.name}@champion", None, tmp_path):
        assert name == reg.name
        assert main(["predict", "--url", url, "--name", name, str(png)]) == 0
    from_registry = capsys.readouterr().out
    assert from_s3.split(": ", 1)[1] == from_registry.split(": ", 1)[1]  # the same student answers the same


def test_serve_rejects_a_folder_that_is_not_an_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "neither an exported student folder" in capsys.readouterr().err
