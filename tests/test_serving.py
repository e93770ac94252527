"""KServe predictor: in-process through kserve's DataPlane, and over HTTP against real local model servers.

Uses the session's 3-student ensemble run (conftest.py); S1 and S3 are exported once for the module.
Reference outputs come straight from ``load_student`` on the same normalized input.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from kserve.errors import InvalidInput
from kserve.model_repository import ModelRepository
from kserve.protocol.dataplane import DataPlane
from numerics import probability_tolerance, reduction_length
from PIL import Image
from serving_requests import (
    b64,
    bad_requests,
    grey,
    in_process,
    png_bytes,
    standard_json,
    v2_body,
    v2_outputs,
)

from bockd.data import ImageDataset
from bockd.errors import CheckpointError
from bockd.export import export_student, load_student, read_student_config
from bockd.platform.services import processes as procs
from bockd.platform.services.model_servers import (
    LocalEndpoint,
    list_local_servers,
    start_local_server,
    stop_local_server,
)
from bockd.serving import EnsembleModel, ServingError, StudentModel, predict_files, predict_v1

pytestmark = pytest.mark.usefixtures("single_thread")

S1, S3 = 0, 2
# What the metadata says a request's one input may be (send exactly one of these; the name is not checked).
INPUTS = [
    {"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]},
    {"name": "input_uint8", "datatype": "UINT8", "shape": [-1, 8, 8, 1]},
    {"name": "input_bytes", "datatype": "BYTES", "shape": [-1]},
]
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# -- fixtures and helpers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def students(single_thread, ensemble_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("serving-export")
    return {i: export_student(ensemble_run, root / f"s{i + 1}", i) for i in (S1, S3)}


@pytest.fixture(scope="module")
def images(digits: ImageDataset) -> np.ndarray:
    """Eight test digits, uint8 [8, 8, 8, 1] (N, H, W, C)."""
    return np.ascontiguousarray(digits.test.x[:8])


@pytest.fixture(scope="module")
def models(students: dict[int, Path]) -> dict[str, Any]:
    built = {
        "torch": StudentModel("s3", students[S3], backend="torch"),
        "onnx": StudentModel("s3", students[S3], backend="onnx"),
        "ensemble-torch": EnsembleModel("ens", [students[S1], students[S3]], backend="torch"),
        "ensemble-onnx": EnsembleModel("ens", [students[S1], students[S3]], backend="onnx"),
    }
    for model in built.values():
        assert model.load() and model.ready
    return built


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serving-state")


@pytest.fixture(scope="module")
def server(students: dict[int, Path], state_dir: Path):
    """S3 alone, torch backend, in its own `python -m bockd.serving` process on 127.0.0.1."""
    endpoint = start_local_server([students[S3]], "s3", state_dir, backend="torch", timeout=120)
    yield endpoint
    stop_local_server(state_dir, "s3")


@pytest.fixture(scope="module")
def ensemble_server(students: dict[int, Path], state_dir: Path):
    """S1 + S3 averaged, ONNX Runtime backend."""
    endpoint = start_local_server([students[S1], students[S3]], "ens", state_dir, backend="onnx", timeout=120)
    yield endpoint
    stop_local_server(state_dir, "ens")


def normalize(images: np.ndarray, folder: Path) -> np.ndarray:
    """uint8 [N, H, W, C] -> float32 [N, C, H, W] with the export's own mean/std."""
    config = read_student_config(folder)
    mean = np.asarray(config["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(config["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def reference(folders: list[Path], images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean logits, softmax of them) of the students rebuilt by load_student."""
    x = torch.from_numpy(normalize(images, folders[0]))
    with torch.no_grad():
        logits = torch.stack([load_student(f)(x) for f in folders]).mean(0)
    return logits.numpy(), torch.softmax(logits, dim=1).numpy()


def tolerance(folders: list[Path], logits: np.ndarray) -> float:
    """For probabilities from other kernels (ONNX Runtime) or another process (its own thread count, so
    its own summation order): rounding at the logits' scale. In-process PyTorch does the reference's
    arithmetic exactly, so those answers keep atol=1e-6 on any CPU."""
    return probability_tolerance(logits, sum(reduction_length(load_student(f)) for f in folders))


def http(url: str, body: bytes | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with _DIRECT.open(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


# -- in process: outputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_v1_uint8_matches_load_student(models, students, images, backend: str) -> None:
    out = in_process(models[backend], {"instances": images.tolist()})
    logits, want = reference([students[S3]], images)
    probs = np.asarray([p["probabilities"] for p in out["predictions"]])
    np.testing.assert_allclose(
        probs, want, atol=1e-6 if backend == "torch" else tolerance([students[S3]], logits)
    )
    config = read_student_config(students[S3])
    for row, pred in zip(want, out["predictions"], strict=True):
        top = pred["top_k"]
        assert len(top) == 5 and top[0]["index"] == int(row.argmax())
        assert [t["class"] for t in top] == [config["classes"][t["index"]] for t in top]
        assert [t["probability"] for t in top] == sorted((t["probability"] for t in top), reverse=True)


def test_v1_float_chw_and_b64_png_equal_uint8(models, images) -> None:
    model = models["torch"]
    as_uint8 = in_process(model, {"instances": images.tolist()})
    chw = (images.transpose(0, 3, 1, 2) / 255.0).tolist()
    as_float = in_process(model, {"instances": chw})
    as_png = in_process(model, {"instances": [{"b64": b64(png_bytes(i))} for i in images]})
    for other in (as_float, as_png):
        np.testing.assert_allclose(
            [p["probabilities"] for p in other["predictions"]],
            [p["probabilities"] for p in as_uint8["predictions"]],
            atol=1e-6,
        )


def test_resize_and_channel_conversion_follow_config(models, images) -> None:
    """A 16x16 RGB image is converted to grey and resized to 8x8 (PIL bilinear), as config.json says."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    by_hand = np.asarray(Image.fromarray(rgb).convert("L").resize((8, 8), Image.Resampling.BILINEAR))
    model = models["torch"]
    got = in_process(model, {"instances": [rgb.tolist(), {"b64": b64(png_bytes(rgb))}]})["predictions"]
    want = in_process(model, {"instances": [by_hand[..., None].tolist()]})["predictions"][0]
    for pred in got:
        np.testing.assert_allclose(pred["probabilities"], want["probabilities"], atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_v2_fp32_uint8_bytes_match_load_student(models, students, images, backend: str) -> None:
    logits, want = reference([students[S3]], images)
    atol = 1e-6 if backend == "torch" else tolerance([students[S3]], logits)
    for kind in ("FP32", "UINT8", "BYTES"):
        outs = v2_outputs(in_process(models[backend], v2_body(images, kind), v2=True))
        probs = outs["probabilities"]
        assert (probs["datatype"], probs["shape"]) == ("FP32", [8, 10])
        np.testing.assert_allclose(np.reshape(probs["data"], (8, 10)), want, atol=atol)
        idx = np.reshape(outs["top_k_indices"]["data"], (8, 5))
        assert outs["top_k_indices"]["datatype"] == "INT64" and (idx[:, 0] == want.argmax(1)).all()
        assert outs["top_k_classes"]["datatype"] == "BYTES" and outs["top_k_classes"]["shape"] == [8, 5]
        assert outs["top_k_classes"]["data"] == [str(i) for i in idx.ravel()]  # digits: class i is "i"


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_ensemble_averages_student_logits(models, students, images, backend: str) -> None:
    model = models[f"ensemble-{backend}"]
    logits, want = reference([students[S1], students[S3]], images)
    out = in_process(model, {"instances": images.tolist()})
    atol = tolerance([students[S1], students[S3]], logits)  # the mean may be summed in another order
    np.testing.assert_allclose([p["probabilities"] for p in out["predictions"]], want, atol=atol)
    _, alone = reference([students[S3]], images)
    assert not np.allclose(want, alone, atol=1e-3)  # averaging really changed something


def test_metadata_describes_tensors(models) -> None:
    plane = DataPlane(model_registry=ModelRepository())
    plane.model_registry.update(models["onnx"])
    meta = asyncio.run(plane.model_metadata("s3"))
    assert meta["inputs"] == INPUTS
    assert meta["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "top_k_indices", "datatype": "INT64", "shape": [-1, 5]},
        {"name": "top_k_classes", "datatype": "BYTES", "shape": [-1, 5]},
    ]


def test_incompatible_ensemble_is_refused_at_load(students, tmp_path: Path) -> None:
    other = Path(shutil.copytree(students[S1], tmp_path / "s1-other-mean"))
    config = json.loads((other / "config.json").read_text())
    config["mean"] = [0.5]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="mean"):
        EnsembleModel("bad", [students[S3], other]).load()


def test_onnx_backend_needs_the_onnx_file(students, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(students[S3], tmp_path / "no-onnx"))
    (folder / "model.onnx").unlink()
    with pytest.raises(CheckpointError, match=r"model\.onnx"):
        StudentModel("s3", folder, backend="onnx").load()


def test_constructor_rejects_bad_settings(students) -> None:
    with pytest.raises(ValueError, match="backend"):
        StudentModel("s3", students[S3], backend="tensorrt")
    with pytest.raises(ValueError, match="max_batch"):
        StudentModel("s3", students[S3], max_batch=0)


# -- bad requests --------------------------------------------------------------------------------------------


def test_bad_requests_raise_invalid_input_in_process(models, images) -> None:
    for protocol, body, fragment in bad_requests(images):
        for model in (models["torch"], models["ensemble-onnx"]):
            with pytest.raises(InvalidInput) as err:
                in_process(model, body, v2=protocol == "v2")
            assert fragment in str(err.value), (protocol, fragment, str(err.value))


# -- over HTTP: real model servers --------------------------------------------------------------------------


def test_server_binds_loopback_and_is_recorded(server: LocalEndpoint, state_dir: Path) -> None:
    assert server.url == f"http://127.0.0.1:{server.port}"
    assert server.v1_predict_url == f"{server.url}/v1/models/s3:predict"
    assert server.v2_infer_url == f"{server.url}/v2/models/s3/infer"
    record = json.loads((state_dir / "s3.json").read_text())
    assert {record[k] for k in ("pid", "port", "url", "name")} == {server.pid, server.port, server.url, "s3"}
    assert "s3" in [e.name for e in list_local_servers(state_dir)]
    listening = Path("/proc/net/tcp").read_text().splitlines()[1:]
    local = {line.split()[1] for line in listening if line.split()[3] == "0A"}  # 0A: LISTEN
    assert f"0100007F:{server.port:04X}" in local  # 127.0.0.1, not 0.0.0.0
    assert f"00000000:{server.port:04X}" not in local


def test_http_v1_uint8_and_png_files(server: LocalEndpoint, students, images, tmp_path: Path) -> None:
    logits, want = reference([students[S3]], images)
    atol = tolerance([students[S3]], logits)
    got = predict_v1(server.url, "s3", list(images))
    np.testing.assert_allclose([p["probabilities"] for p in got], want, atol=atol)
    paths = []
    for i, image in enumerate(images[:3]):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(png_bytes(image))
    files = predict_files(server.url, "s3", paths)
    np.testing.assert_allclose([p["probabilities"] for p in files], want[:3], atol=atol)
    assert files[0]["top_k"][0]["class"] == str(int(want[0].argmax()))


def test_http_v2_three_formats(server: LocalEndpoint, students, images) -> None:
    logits, want = reference([students[S3]], images)
    for kind in ("FP32", "UINT8", "BYTES"):
        status, body = http(server.v2_infer_url, json.dumps(v2_body(images, kind)).encode())
        assert status == 200, body
        outs = v2_outputs(body)
        assert [o["name"] for o in body["outputs"]] == ["probabilities", "top_k_indices", "top_k_classes"]
        probs = np.reshape(outs["probabilities"]["data"], (8, 10))
        np.testing.assert_allclose(probs, want, atol=tolerance([students[S3]], logits))
        assert outs["top_k_indices"]["shape"] == [8, 5] and outs["top_k_classes"]["datatype"] == "BYTES"


def test_http_metadata_and_ready(server: LocalEndpoint) -> None:
    status, meta = http(server.v2_metadata_url)
    assert status == 200
    assert meta["name"] == "s3"
    assert meta["inputs"] == INPUTS
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("probabilities", "FP32", [-1, 10]),
        ("top_k_indices", "INT64", [-1, 5]),
        ("top_k_classes", "BYTES", [-1, 5]),
    ]
    assert http(server.ready_url) == (200, {"name": "s3", "ready": True})


def test_http_ensemble_onnx_averages_logits(ensemble_server: LocalEndpoint, students, images) -> None:
    logits, want = reference([students[S1], students[S3]], images)
    atol = tolerance([students[S1], students[S3]], logits)
    got = predict_v1(ensemble_server.url, "ens", list(images))
    np.testing.assert_allclose([p["probabilities"] for p in got], want, atol=atol)
    status, body = http(ensemble_server.v2_infer_url, json.dumps(v2_body(images, "UINT8")).encode())
    assert status == 200
    np.testing.assert_allclose(
        np.reshape(v2_outputs(body)["probabilities"]["data"], (8, 10)), want, atol=atol
    )


def test_http_hundred_bad_requests_each_4xx_then_good_ones_work(
    server: LocalEndpoint, students, images
) -> None:
    cases = bad_requests(images)
    extra = [
        ("v1", b"{not json", "Unrecognized request format"),
        ("v1", json.dumps({"instances": [grey(math.nan)]}).encode(), "Unrecognized request format"),
        ("v2", b'{"id": "no inputs"}', 'needs "inputs"'),
        ("v2", b"{not json", "is not valid JSON"),
        (
            "v2",
            b'{"inputs": [{"name": "a", "shape": ["x"], "datatype": "FP32", "data": []}]}',
            "non-negative ints",
        ),
    ]
    sent = 0
    while sent < 100:
        for protocol, body, fragment in [*cases, *extra]:
            url = server.v2_infer_url if protocol == "v2" else server.v1_predict_url
            status, answer = http(url, body if isinstance(body, bytes) else json.dumps(body).encode())
            if not isinstance(body, bytes) and not standard_json(body):  # NaN: refused by the JSON parser
                fragment = "not valid JSON" if protocol == "v2" else "Unrecognized request format"
            # 413 for what is over a budget, 400 for the rest
            want_status = 413 if "over the limit" in answer["error"] else 400
            assert status == want_status, (protocol, fragment, answer)
            assert fragment in answer["error"], (fragment, answer)
            sent += 1
    logits, want = reference([students[S3]], images)
    for _ in range(3):
        got = predict_v1(server.url, "s3", list(images))
        np.testing.assert_allclose(
            [p["probabilities"] for p in got], want, atol=tolerance([students[S3]], logits)
        )
    status, body = http(server.v2_infer_url, json.dumps(v2_body(images, "BYTES")).encode())
    assert status == 200 and v2_outputs(body)["probabilities"]["shape"] == [8, 10]


def test_client_reports_the_server_message(server: LocalEndpoint) -> None:
    with pytest.raises(ServingError, match=r"HTTP 400: instance 0: .*C = 1 or 3"):
        predict_v1(server.url, "s3", [np.zeros((8, 8, 4), np.uint8)])


# -- lifecycle -----------------------------------------------------------------------------------------------


def test_start_is_idempotent_and_refuses_a_taken_port(
    server: LocalEndpoint, students, state_dir: Path
) -> None:
    again = start_local_server([students[S3]], "s3", state_dir, backend="torch")
    assert again == server
    with pytest.raises(ServingError, match="already runs"):
        start_local_server([students[S1]], "s3", state_dir)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(ServingError, match=f"port {port} .*already in use"):
            start_local_server([students[S3]], "other", state_dir, port=port)
    assert not (state_dir / "other.json").exists()


def test_failed_start_reports_the_log_tail(tmp_path: Path) -> None:
    empty = tmp_path / "not-an-export"
    empty.mkdir()
    with pytest.raises(ServingError, match=r"(?s)exited with status 2.*no config\.json"):
        start_local_server([empty], "broken", tmp_path / "state", timeout=120)
    assert not (tmp_path / "state" / "broken.json").exists()


def test_stop_refuses_a_pid_that_is_not_our_server(tmp_path: Path) -> None:
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        fake = LocalEndpoint("ghost", other.pid, 1, "http://127.0.0.1:1")
        (tmp_path / "ghost.json").write_text(json.dumps(fake.to_record()))
        assert list_local_servers(tmp_path) == []
        assert stop_local_server(tmp_path, "ghost") is False
        assert other.poll() is None  # not signalled
        assert not (tmp_path / "ghost.json").exists()  # the stale record is gone
    finally:
        other.kill()
        other.wait()


def test_stop_local_server_stops_it(students, tmp_path: Path) -> None:
    endpoint = start_local_server([students[S3]], "short-lived", tmp_path, backend="onnx", timeout=120)
    assert [e.name for e in list_local_servers(tmp_path)] == ["short-lived"]
    assert stop_local_server(tmp_path, "short-lived") is True
    assert "bockd.serving" not in procs.cmdline(endpoint.pid)  # gone (or its PID reused by another)
    assert list_local_servers(tmp_path) == [] and not (tmp_path / "short-lived.json").exists()
    assert stop_local_server(tmp_path, "short-lived") is False
